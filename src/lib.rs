//! corral — a containerless sandboxed worker pool for AI assistants on Linux.
//!
//! A broker keeps, per workflow, a pool of unprivileged worker processes.
//! Each worker confines itself (user switch, no capabilities,
//! `no_new_privs`, Landlock, seccomp) before it reads its first request, and
//! runs every tool call as a child under a further Landlock layer. Clients
//! talk HTTP/JSON to the broker over a Unix socket.
//!
//! # Layout
//!
//! - [`policy`]: the TOML policy schema, loading and validation.
//! - [`broker`]: the front door ([`broker::http`]: socket, accept loop with
//!   per-uid caps, timeouts and body budgets, routes), authorization,
//!   pools, worker launcher, the LLM gateway (keys, retries, budgets) and
//!   its token ledger, workspaces and their `disk_max` images, sessions
//!   (a directory and a history per conversation).
//! - [`worker`]: the worker process: confine, then serve tool calls (each
//!   with a receipt of what it changed in the workspace) and run the agent
//!   loop (model → tools → model …) of asks.
//! - [`sandbox`]: privilege drop, Landlock, seccomp, process control. All
//!   `unsafe` code and raw syscalls live here.
//! - [`protocol`] and [`frame`]: broker ↔ worker messages and their framing.
//! - [`cgroup`]: reading a worker's cgroup (v1 and v2).
//! - [`api`] and [`client`]: client ↔ broker HTTP types and a small client.
//! - [`cli`]: the client-side subcommands.
//! - [`utc`]: UTC day and hour arithmetic for budgets and the ledger.
//! - [`sockets`]: who owns a TCP socket here (`/proc/net/tcp`), so the
//!   broker can refuse a model endpoint another local user has bound.
//!
//! # Threat model
//!
//! A tool call is hostile: it runs whatever an LLM proposed. It must not read
//! or write outside its workflow's rules, reach the network unless allowed,
//! see or signal other workflows' processes, gain privileges, outlive its
//! call, open its workspace to other users (the directory above it is
//! root's), reach another session's files or the workspace above its own
//! from a call of a session, or fill the disk past its workflow's `disk_max`. The broker is trusted and holds what tools must not (keys, other
//! tenants' data); clients are authenticated by the kernel (`SO_PEERCRED`).
//! API keys live only in the broker: a worker asks it for completions over
//! its socket pair and never sees a key, and token counts come from the
//! provider's answers as the broker received them, so a worker cannot forge
//! its usage.
//! Every local user can reach the broker's socket: a user who is no
//! workflow's client, or a client who misbehaves, can hold only its own
//! share of connections and request-body memory, is refused before any
//! body byte it sends is read where it may not call, and learns nothing
//! of other tenants' workflows from an error.
//! A chat bot's uid speaks for many people: only a uid the members file
//! names as a delegate may say whom a call is for (`x-corral-member`), and
//! then that member's workflows, her rights in that kind of chat and her
//! limits apply; nobody else can claim to be a member.
//! Nor can a local user pose as a model provider: the broker sends prompts and
//! keys only to an endpoint no such user could have bound first (https, a
//! Unix socket in a protected directory, a privileged port, or a loopback
//! port whose listener belongs to the policy's `endpoint_user`).
//! Kernel bugs and side channels are out of scope. Where the running kernel
//! lacks a mechanism, the weaker result is reported, never hidden; a policy
//! marked `required` refuses to start instead.
//!
//! # Multithreading
//!
//! The broker is a multi-threaded tokio program; between its `clone` of a
//! worker (into new PID, mount and IPC namespaces) and the exec it only
//! makes async-signal-safe system calls (`dup2`, `setpgid`, `prctl`). It
//! makes its own mount namespace (for the `disk_max` mounts) in `main`,
//! before the runtime starts a thread. The worker is strictly single-threaded: it
//! confines itself with Landlock and seccomp (which bind the calling thread)
//! and forks tool children that may allocate before exec.

pub mod api;
pub mod bridge;
pub mod broker;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod frame;
pub mod policy;
pub mod protocol;
pub mod sandbox;
pub mod sockets;
pub mod utc;
pub mod worker;

/// An error and all its causes on one line: "failed to X: because Y: …".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
