//! Workspaces under attack: a tenant that opens its workspace to everyone
//! (`chmod 755 .. .`), one that fills the disk, and a state directory left
//! by an older version with a planted symlink. Each test also checks that
//! the owner and a neighbour are still served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn assert_ok(r: &Value) {
    assert_eq!(exit_code(r), Some(0), "{r:#}");
}

fn gid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap().gid.as_raw()
}

fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user).unwrap().unwrap().uid.as_raw()
}

/// A policy of `tenant` running as `user`, with `extra_read` added to its
/// read rules and `limits` to its [limits].
fn tenant_policy(name: &str, tenant: &str, user: &str, extra_read: &[&Path], limits: &str) -> PolicyFile {
    let mut p = policy(name, tenant, Some(user), "", limits, "min_idle = 1\nmax_workers = 1");
    let extra: String = extra_read.iter().map(|d| format!(", \"{}\"", d.display())).collect();
    p.text = p.text.replace(r#""/dev/urandom"]"#, &format!(r#""/dev/urandom"{extra}]"#));
    p
}

/// `runuser -u USER -- ARGS`: another local user, as a shell account has.
fn run_as(user: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser").args(["-u", user, "--"]).args(args).output().unwrap()
}

fn workflow_status<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["workflows"].as_array().unwrap().iter().find(|w| w["name"] == name).unwrap_or_else(|| panic!("{st:#}"))
}

#[test]
fn chmod_cannot_open_a_workspace_to_others() {
    if !full_sandbox() {
        return;
    }
    let dir = scratch_dir("ws-chmod");
    let workspaces = dir.join("state/workspaces");
    // snoop (another tenant) may read the whole workspaces tree as far as
    // Landlock goes: only file modes stand between it and kid's files.
    let b = Broker::start_in(
        "ws-chmod",
        dir.clone(),
        &[
            tenant_policy("homework", "kid", "corral-kid", &[], ""),
            tenant_policy("snoop", "alice", "corral-alice", &[&workspaces], ""),
        ],
        BrokerOptions::default(),
    );
    let ws = b.workspace("kid", "homework");
    let notes = ws.join("notes.txt");
    let notes = notes.to_str().unwrap();

    // The attack: a world-readable file, and every directory opened.
    let r = b.sh(
        "homework",
        "echo secret > notes.txt && chmod 644 notes.txt; chmod 755 ..; echo parent=$?; chmod 777 .; echo self=$?",
    );
    assert!(stdout(&r).contains("parent=1"), "chmod of the tenant directory succeeded: {r:#}");
    assert!(stdout(&r).contains("self=0"), "{r:#}");
    // The worker did open its own workspace; what is above it is root's.
    assert_eq!(std::fs::metadata(&ws).unwrap().permissions().mode() & 0o7777, 0o777);
    let tenant_dir = std::fs::metadata(workspaces.join("kid")).unwrap();
    assert_eq!(
        (tenant_dir.uid(), tenant_dir.gid(), tenant_dir.permissions().mode() & 0o7777),
        (0, gid_of("corral-kid"), 0o710)
    );

    // mallory, a local user with a shell.
    let out = run_as("mallory", &["cat", notes]);
    assert!(!out.status.success(), "mallory read kid's file: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    let out = run_as("mallory", &["ls", workspaces.to_str().unwrap()]);
    assert!(!out.status.success(), "mallory listed the tenants: {out:?}");

    // Another tenant's workflow.
    let r = b.exec("snoop", &["cat", notes]);
    assert_ne!(exit_code(&r), Some(0), "another tenant read kid's file: {r:#}");
    assert!(stderr(&r).contains("Permission denied"), "{r:#}");
    // …although Landlock lets it read there: a file of root's, readable by
    // all, in the same tree is read (so the denial above is the modes').
    let probe = workspaces.join("probe.txt");
    std::fs::write(&probe, "public\n").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = b.exec("snoop", &["cat", probe.to_str().unwrap()]);
    assert_ok(&r);
    assert_eq!(stdout(&r), "public\n");
    // And snoop's own workspace works.
    assert_ok(&b.sh("snoop", "echo mine > own.txt && cat own.txt"));

    // The owner still reads and writes.
    let r = b.sh("homework", "echo more >> notes.txt && cat notes.txt");
    assert_ok(&r);
    assert_eq!(stdout(&r), "secret\nmore\n");

    // The state directory and the ledger are closed to workers.
    let state = std::fs::metadata(dir.join("state")).unwrap();
    assert_eq!(state.permissions().mode() & 0o7777, 0o711);
    for entry in std::fs::read_dir(dir.join("state")).unwrap() {
        let m = entry.unwrap().metadata().unwrap();
        if m.is_file() {
            assert_eq!(m.permissions().mode() & 0o077, 0, "{m:?}");
        }
    }
    let out = run_as("corral-kid", &["ls", dir.join("state").to_str().unwrap()]);
    assert!(!out.status.success(), "a worker user listed the state directory: {out:?}");
}

#[test]
fn an_older_layout_is_repaired_and_a_planted_symlink_is_not_followed() {
    if !full_sandbox() {
        return;
    }
    let dir = scratch_dir("ws-migrate");
    let kid = (uid_of("corral-kid"), gid_of("corral-kid"));
    // What an older version left, after a hostile tenant had its way: the
    // tenant directory is the tenant's and open, one workspace is a symlink
    // to a file of root's, another holds the tenant's files.
    let victim = dir.join("victim");
    std::fs::write(&victim, "root only\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Two more now get disk_max: journal's files fit and move into its
    // image, hoard's 12M do not fit in 8M.
    let tenant_dir = dir.join("state/workspaces/kid");
    for wf in ["essay", "journal", "hoard"] {
        std::fs::create_dir_all(tenant_dir.join(wf)).unwrap();
        std::fs::write(tenant_dir.join(wf).join("draft.txt"), "draft\n").unwrap();
    }
    std::fs::write(tenant_dir.join("hoard/big"), vec![7u8; 12 << 20]).unwrap();
    std::os::unix::fs::symlink(&victim, tenant_dir.join("homework")).unwrap();
    let mut owned = vec![tenant_dir.clone()];
    for wf in ["essay", "journal", "hoard"] {
        owned.push(tenant_dir.join(wf));
        owned.push(tenant_dir.join(wf).join("draft.txt"));
    }
    for p in &owned {
        std::os::unix::fs::chown(p, Some(kid.0), Some(kid.1)).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let b = Broker::start_in(
        "ws-migrate",
        dir.clone(),
        &[
            tenant_policy("homework", "kid", "corral-kid", &[], ""),
            tenant_policy("essay", "kid", "corral-kid", &[], ""),
            disk_policy("journal", "kid", "corral-kid", "16M"),
            disk_policy("hoard", "kid", "corral-kid", "8M"),
            tenant_policy("chat", "alice", "corral-alice", &[], ""),
        ],
        BrokerOptions::default(),
    );
    // The symlink was not followed.
    let v = std::fs::metadata(&victim).unwrap();
    assert_eq!((v.uid(), v.permissions().mode() & 0o7777), (0, 0o600));
    let st = b.status();
    let why = workflow_status(&st, "homework")["unavailable"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("is not a directory"), "{st:#}");
    // The tenant directory is root's again.
    let t = std::fs::metadata(&tenant_dir).unwrap();
    assert_eq!((t.uid(), t.gid(), t.permissions().mode() & 0o7777), (0, kid.1, 0o710));
    let e = std::fs::metadata(tenant_dir.join("essay")).unwrap();
    assert_eq!((e.uid(), e.permissions().mode() & 0o7777), (kid.0, 0o700));
    // The other workflows are served, the old files intact.
    let r = b.sh("essay", "cat draft.txt && echo more >> draft.txt");
    assert_ok(&r);
    assert_eq!(stdout(&r), "draft\n");
    assert_ok(&b.sh("chat", "echo hi > x && cat x"));

    // journal's files are in its image now, and it is held to 16M.
    let r = b.sh("journal", "cat draft.txt && ls -ln draft.txt");
    assert_ok(&r);
    assert!(stdout(&r).starts_with("draft\n"), "{r:#}");
    assert!(stdout(&r).contains(&format!(" {} {} ", kid.0, kid.1)), "owner not kept: {r:#}");
    let r = write_mib(&b, "journal", "big", 20);
    assert!(limit(&r).contains("disk_max 16M of workflow journal was reached"), "{r:#}");
    // hoard's do not fit: refused, saying so, and nothing was deleted.
    let why = workflow_status(&st, "hoard")["unavailable"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("do not fit in disk_max 8M"), "{st:#}");
    assert_eq!(std::fs::metadata(tenant_dir.join("hoard/big")).unwrap().len(), 12 << 20);
}

/// A policy with `disk_max`.
fn disk_policy(name: &str, tenant: &str, user: &str, disk_max: &str) -> PolicyFile {
    tenant_policy(name, tenant, user, &[], &format!("disk_max = \"{disk_max}\"\nfile_size_max = \"1G\""))
}

/// Writes `mib` MiB to `file` in `workflow`'s workspace.
fn write_mib(b: &Broker, workflow: &str, file: &str, mib: u32) -> Value {
    b.sh(workflow, &format!("head -c {} /dev/urandom > {file}", u64::from(mib) << 20))
}

fn limit(r: &Value) -> &str {
    r["limit"].as_str().unwrap_or("")
}

#[test]
fn disk_max_stops_a_call_and_names_the_limit() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start(
        "ws-disk",
        &[disk_policy("homework", "kid", "corral-kid", "16M"), disk_policy("chat", "alice", "corral-alice", "16M")],
    );
    // The attack: more than disk_max in one call.
    let r = write_mib(&b, "homework", "big", 20);
    assert_ne!(exit_code(&r), Some(0), "wrote 20M into a 16M workspace: {r:#}");
    assert!(stderr(&r).contains("No space left on device"), "{r:#}");
    assert!(limit(&r).contains("disk_max 16M of workflow homework was reached"), "{r:#}");
    // The neighbour writes fine.
    let r = write_mib(&b, "chat", "data", 4);
    assert_ok(&r);
    assert_eq!(limit(&r), "", "{r:#}");
    // So does the workflow itself once it deleted the file.
    let r = b.sh("homework", &format!("rm big && head -c {} /dev/urandom > small && wc -c < small", 2 << 20));
    assert_ok(&r);
    assert_eq!(stdout(&r).trim(), (2u64 << 20).to_string());
    assert_eq!(limit(&r), "", "{r:#}");
    // Nothing may be executed from the workspace (no exec rule covers it).
    let r = b.sh("homework", "cp /bin/true ./t && ./t");
    assert_eq!(exit_code(&r), Some(126), "{r:#}");

    // Status shows the usage.
    let st = b.status();
    let disk = &workflow_status(&st, "homework")["disk"];
    assert_eq!(disk["disk_max"], "16M", "{st:#}");
    assert_eq!(disk["disk_max_bytes"], 16u64 << 20, "{st:#}");
    let used = disk["used_bytes"].as_u64().unwrap();
    assert!((2u64 << 20..16u64 << 20).contains(&used), "{disk:#}");
    let text = b.cli(None, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("used of disk_max 16M"), "{text}");
}

#[test]
fn the_quota_survives_a_restart_grows_and_refuses_to_shrink() {
    if !full_sandbox() {
        return;
    }
    let neighbour = || tenant_policy("chat", "alice", "corral-alice", &[], "");
    let b = Broker::start("ws-restart", &[disk_policy("homework", "kid", "corral-kid", "16M"), neighbour()]);
    assert_ok(&write_mib(&b, "homework", "keep", 4));

    // Same disk_max: the same image, files and limit.
    let b = b.restart("ws-restart", &[disk_policy("homework", "kid", "corral-kid", "16M"), neighbour()]);
    let r = b.sh("homework", "wc -c < keep");
    assert_ok(&r);
    assert_eq!(stdout(&r).trim(), (4u64 << 20).to_string());
    let r = write_mib(&b, "homework", "more", 14);
    assert!(limit(&r).contains("disk_max 16M"), "{r:#}");
    assert_ok(&b.sh("homework", "rm more"));

    // A larger disk_max grows it, files kept.
    let b = b.restart("ws-restart", &[disk_policy("homework", "kid", "corral-kid", "32M"), neighbour()]);
    let r = write_mib(&b, "homework", "more", 20);
    assert_ok(&r);
    assert_eq!(limit(&r), "", "{r:#}");
    assert_ok(&b.sh("homework", "wc -c < keep"));
    let st = b.status();
    assert_eq!(workflow_status(&st, "homework")["disk"]["disk_max"], "32M", "{st:#}");

    // A smaller one is refused, saying why; the neighbour is served.
    let b = b.restart("ws-restart", &[disk_policy("homework", "kid", "corral-kid", "16M"), neighbour()]);
    let st = b.status();
    let why = workflow_status(&st, "homework")["unavailable"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("disk_max 16M is smaller than the workspace's image (32M)"), "{st:#}");
    assert_ok(&b.sh("chat", "echo hi > x"));

    // Dropping disk_max is refused too: the files live in the image.
    let b = b.restart("ws-restart", &[tenant_policy("homework", "kid", "corral-kid", &[], ""), neighbour()]);
    let st = b.status();
    let why = workflow_status(&st, "homework")["unavailable"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("put disk_max back"), "{st:#}");
}

#[test]
fn policy_check_says_how_disk_max_is_held() {
    let dir = scratch_dir("ws-check");
    let p = disk_policy("homework", "kid", "corral-kid", "64M");
    std::fs::write(dir.join(&p.name), &p.text).unwrap();
    let out = Command::new(BIN).args(["policy", "check"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let supported = corral::broker::quota::host_support();
    match supported {
        Ok(_) => {
            assert!(out.status.success(), "{out:?}");
            assert!(text.contains("disk       disk_max 64M: an ext4 image of disk_max per workflow"), "{text}");
        }
        Err(why) => {
            assert!(!out.status.success(), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stderr).contains(&why), "{out:?}");
        }
    }
    let bad = PolicyFile { name: "x.toml".into(), text: p.text.replace("\"64M\"", "\"1M\"") };
    std::fs::write(dir.join(&p.name), &bad.text).unwrap();
    let out = Command::new(BIN).args(["policy", "check"]).arg(&dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.disk_max: size \"1M\" is too small"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loop devices whose backing file is `image`.
fn loops_backed_by(image: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(file) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(file.trim()) == image {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn a_killed_broker_leaves_no_mount_behind() {
    if !full_sandbox() {
        return;
    }
    let policies = || [disk_policy("homework", "kid", "corral-kid", "16M")];
    let b = Broker::start("ws-kill", &policies());
    assert_ok(&write_mib(&b, "homework", "keep", 2));
    let image = b.state.join("images/kid/homework.ext4");
    assert_eq!(loops_backed_by(&image).len(), 1, "the image is not loop-mounted");

    // kill -9: no chance to unmount. The mount namespace ends with the
    // broker and its workers, and the loop device with it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(b.pid()).unwrap()), nix::sys::signal::SIGKILL)
        .unwrap();
    let gone = poll(std::time::Duration::from_secs(10), || loops_backed_by(&image).is_empty().then_some(()));
    assert!(gone.is_some(), "loop devices left behind: {:?}", loops_backed_by(&image));

    // The next broker mounts the same image: the file is there.
    let b = b.restart("ws-kill", &policies());
    let r = b.sh("homework", "wc -c < keep");
    assert_ok(&r);
    assert_eq!(stdout(&r).trim(), (2u64 << 20).to_string());
    assert_eq!(loops_backed_by(&image).len(), 1);
}
