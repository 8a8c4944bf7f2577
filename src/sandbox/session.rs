//! The Landlock layer of a tool call that belongs to a session.
//!
//! Workers are shared by every session of their workflow, so a worker
//! cannot be confined to one session for life. Each call of a session
//! stacks one more Landlock layer on its tool child instead (layers
//! intersect): the rules of the ordinary per-call layer, with the workflow's
//! workspace replaced by the session's directory. A tool of session A then
//! reaches neither session B's files nor the workspace above its own
//! directory, whatever path it uses (`../`, absolute, a symlink): Landlock
//! checks the file a path resolves to, not the path.
//!
//! Where the kernel cannot draw that line (no Landlock, or a ruleset the
//! kernel would not enforce), the call is refused: sessions never share
//! files silently.

use std::path::{Path, PathBuf};

use super::landlock::{self, ChildLayer};
use super::spec::{Requirement, SandboxSpec};
use super::{connect_ports, seccomp, sys, SandboxError};

/// What a session call runs under: its layer and its directory.
pub struct SessionLayer {
    pub layer: ChildLayer,
    /// The session directory (the call's working directory).
    pub dir: PathBuf,
}

/// The rules of `paths` for a session in `dir`: the workspace becomes the
/// session directory, rules beneath the workspace are dropped (they would
/// reach other sessions or the workspace's own files), and a rule above
/// the workspace cannot be narrowed, so it makes sessions impossible.
fn narrow(paths: &[PathBuf], workspace: &Path, dir: &Path) -> Result<Vec<PathBuf>, SandboxError> {
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        if p == workspace {
            out.push(dir.to_path_buf());
        } else if p.starts_with(workspace) {
            continue;
        } else if workspace.starts_with(p) {
            return Err(SandboxError::SessionRuleAbove(p.clone()));
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Checks that `dir` is a directory strictly beneath `workspace` reached
/// through real directories only (no `..`, no symlink): the broker made it
/// so, and only a call outside every session could have changed it.
fn check_dir(workspace: &Path, dir: &Path) -> Result<(), SandboxError> {
    let bad = || SandboxError::SessionDir(dir.to_path_buf());
    let rel = dir.strip_prefix(workspace).map_err(|_| bad())?;
    if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(bad());
    }
    let mut at = workspace.to_path_buf();
    for c in rel.components() {
        at.push(c);
        let meta = std::fs::symlink_metadata(&at).map_err(|_| bad())?;
        if !meta.is_dir() {
            return Err(bad());
        }
    }
    Ok(())
}

/// Prepares the layer of a call of the session in `dir` (built in the
/// worker before the fork; the tool child enforces it with
/// [`super::spec::Requirement::Required`], so a ruleset the kernel would not enforce
/// stops the call instead of running it unconfined).
pub fn session_layer(spec: &SandboxSpec, dir: &Path) -> Result<SessionLayer, SandboxError> {
    let abi = sys::landlock_abi();
    if abi == 0 {
        return Err(SandboxError::SessionsNeedLandlock);
    }
    check_dir(&spec.workspace, dir)?;
    let read = narrow(&spec.read, &spec.workspace, dir)?;
    let write = narrow(&spec.write, &spec.workspace, dir)?;
    let exec = narrow(&spec.exec, &spec.workspace, dir)?;
    let ports = connect_ports(spec, abi);
    let layer = landlock::Layer {
        read: &read,
        write: &write,
        exec: &exec,
        extra_read: &[],
        tcp_connect: &ports,
        tcp_bind: &spec.tcp_bind,
    };
    // The policy's requirement decides only what a missing TCP right means
    // here (Landlock itself is there: checked above); the tool child
    // enforces this layer as required.
    let mut prepared = landlock::prepare(&layer, abi, spec.landlock)?;
    if abi < landlock::ABI_SCOPES {
        prepared.guard = Some(seccomp::tool_guard(std::process::id())?);
    }
    Ok(SessionLayer { layer: prepared.into_child_layer(Requirement::Required)?, dir: dir.to_path_buf() })
}

/// The environment of a session call: every value that names the
/// workspace (`HOME`, `TMPDIR`, `{workspace}` in `[env]`) names the session
/// directory instead.
pub fn session_env(spec: &SandboxSpec, dir: &Path) -> Vec<(String, String)> {
    let ws = spec.workspace.to_string_lossy();
    let dir = dir.to_string_lossy();
    spec.env
        .iter()
        .map(|(k, v)| {
            let v = match v.strip_prefix(ws.as_ref()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{dir}{rest}"),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_becomes_the_session_and_rules_above_it_are_refused() {
        let ws = Path::new("/s/workspaces/t/w");
        let dir = ws.join("sessions/uid-1/a");
        let paths = [PathBuf::from("/usr"), ws.to_path_buf(), ws.join("bin")];
        assert_eq!(narrow(&paths, ws, &dir).unwrap(), [PathBuf::from("/usr"), dir.clone()]);
        let above = [PathBuf::from("/s")];
        assert!(matches!(narrow(&above, ws, &dir), Err(SandboxError::SessionRuleAbove(_))));
        // A sibling with a common prefix is not the workspace.
        let sibling = [PathBuf::from("/s/workspaces/t/w2")];
        assert_eq!(narrow(&sibling, ws, &dir).unwrap(), sibling);
    }

    #[test]
    fn a_session_directory_must_be_beneath_the_workspace() {
        let ws = std::env::temp_dir().join(format!("corral-session-{}", std::process::id()));
        std::fs::create_dir_all(ws.join("sessions/u/a")).unwrap();
        assert!(check_dir(&ws, &ws.join("sessions/u/a")).is_ok());
        assert!(check_dir(&ws, &ws).is_err());
        assert!(check_dir(&ws, &ws.join("sessions/u/../u/a")).is_err());
        assert!(check_dir(&ws, Path::new("/tmp")).is_err());
        std::os::unix::fs::symlink(ws.join("sessions/u/a"), ws.join("sessions/u/b")).unwrap();
        assert!(check_dir(&ws, &ws.join("sessions/u/b")).is_err(), "a symlink is not a session");
        std::fs::remove_dir_all(&ws).unwrap();
    }
}
