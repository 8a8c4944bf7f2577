//! Findings about this host that do not stop a policy from loading: paths
//! that do not exist (they grant nothing), unix users and groups that do not
//! exist (an `[llm]` endpoint_user too), and tenants that share a unix user.

use std::collections::BTreeMap;
use std::path::Path;

use nix::unistd::{Group, User};

use super::load::Parsed;

/// One warning line per finding, naming the file, line and key.
pub(crate) fn host_warnings(parsed: &[Parsed]) -> Vec<String> {
    let mut out = Vec::new();
    for p in parsed {
        path_warnings(p, &mut out);
        user_warnings(p, &mut out);
    }
    shared_user_warnings(parsed, &mut out);
    out
}

fn path_warnings(p: &Parsed, out: &mut Vec<String>) {
    let sandbox = &p.workflow.sandbox;
    for (key, paths) in
        [("sandbox.read", &sandbox.read), ("sandbox.write", &sandbox.write), ("sandbox.exec", &sandbox.exec)]
    {
        for (i, path) in paths.iter().enumerate() {
            let key = format!("{key}[{i}]");
            // Defaults name paths some hosts lack (/lib64); only warn about
            // what the file itself says.
            if path.is_workspace() || !p.lines.has(&key) {
                continue;
            }
            if !Path::new(path.as_str()).exists() {
                out.push(format!(
                    "{}: {path} does not exist on this host, so it grants nothing; \
                     remove it or create it",
                    p.place(&key)
                ));
            }
        }
    }
}

fn user_warnings(p: &Parsed, out: &mut Vec<String>) {
    let wf = &p.workflow;
    if let Some(user) = &wf.user {
        match User::from_name(user) {
            Ok(Some(_)) => {}
            Ok(None) => out.push(format!(
                "{}: user {user:?} does not exist on this host, so no worker can start: \
                 create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {user}`",
                p.place("workflow.user")
            )),
            Err(e) => out.push(format!("{}: failed to look up user {user:?}: {e}", p.place("workflow.user"))),
        }
    }
    if let Some(owner) = wf.llm.as_ref().and_then(|l| match &l.endpoint {
        super::Endpoint::OwnedPort { owner, .. } => Some(owner),
        super::Endpoint::UnixSocket { owner, .. } => owner.as_ref(),
        _ => None,
    }) {
        match User::from_name(owner) {
            Ok(Some(_)) => {}
            Ok(None) => out.push(format!(
                "{}: user {owner:?} does not exist on this host, so the broker trusts no listener for \
                 llm.base_url and every ask is refused; install the provider (Ollama's installer creates \
                 its user) or fix endpoint_user",
                p.place("llm.endpoint_user")
            )),
            Err(e) => out.push(format!("{}: failed to look up user {owner:?}: {e}", p.place("llm.endpoint_user"))),
        }
    }
    for (i, user) in wf.clients.users.iter().enumerate() {
        let at = p.place(&format!("workflow.clients.users[{i}]"));
        match User::from_name(user) {
            Ok(Some(_)) => {}
            Ok(None) => out.push(format!(
                "{at}: user {user:?} does not exist on this host, so this entry allows nobody: \
                 create it with `useradd {user}` or remove it"
            )),
            Err(e) => out.push(format!("{at}: failed to look up user {user:?}: {e}")),
        }
    }
    for (i, group) in wf.clients.groups.iter().enumerate() {
        let at = p.place(&format!("workflow.clients.groups[{i}]"));
        match Group::from_name(group) {
            Ok(Some(_)) => {}
            Ok(None) => out.push(format!(
                "{at}: group {group:?} does not exist on this host, so this entry allows nobody: \
                 create it with `groupadd --system {group}` or remove it"
            )),
            Err(e) => out.push(format!("{at}: failed to look up group {group:?}: {e}")),
        }
    }
}

/// Tenants are separated by unix user; two tenants naming one user can read
/// each other's workspaces.
fn shared_user_warnings(parsed: &[Parsed], out: &mut Vec<String>) {
    let mut first_tenant: BTreeMap<&str, &Parsed> = BTreeMap::new();
    for p in parsed {
        let Some(user) = p.workflow.user.as_deref() else {
            continue;
        };
        match first_tenant.get(user) {
            Some(first) if first.workflow.tenant != p.workflow.tenant => out.push(format!(
                "{}: tenants {:?} and {:?} (in {}) both run as user {user:?}, so they can read \
                 each other's workspaces: give each tenant its own user",
                p.place("workflow.user"),
                p.workflow.tenant.as_str(),
                first.workflow.tenant.as_str(),
                first.place("workflow.user"),
            )),
            Some(_) => {}
            None => {
                first_tenant.insert(user, p);
            }
        }
    }
}
