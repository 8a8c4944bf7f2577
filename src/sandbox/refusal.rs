//! Which rule refused: a hint that names the path and the rule when a tool
//! failed on a path the sandbox keeps it from.
//!
//! Landlock reports denials only to the audit subsystem (ABI 7, Linux 6.15),
//! which takes audit netlink and `CAP_AUDIT_READ` to read; corral does not
//! read it. So the hint is inferred: a call that failed and whose stderr
//! names an absolute path next to "Permission denied" / "Operation not
//! permitted" (`EACCES`, `EPERM`, Python's `[Errno 13]`) is checked against
//! the spec the worker enforces. A path outside the rule its use needs gets
//! a line naming both; a path every rule covers gets none (then it was the
//! program, or the file's own mode, not the sandbox).

use std::path::{Component, Path, PathBuf};

use super::spec::SandboxSpec;

/// At most this many paths are named in one hint.
const MAX_PATHS: usize = 3;
/// Only so much of stderr is searched (its end, where errors are).
const SCAN_MAX: usize = 64 * 1024;

/// One path a call was refused and the rules it falls outside of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub path: PathBuf,
    /// The policy keys whose rules do not cover the path, e.g.
    /// `["sandbox.read", "sandbox.write"]`.
    pub outside: Vec<&'static str>,
}

impl Refusal {
    fn render(&self, workflow: &str) -> String {
        let p = self.path.display();
        let read = self.outside.contains(&"sandbox.read");
        if read {
            format!(
                "{p} is outside every sandbox.read and sandbox.write rule of workflow {workflow}: Landlock refuses \
                 any access to it (grant it read-only in sandbox.read, or set the tool's switch that skips it in [env])"
            )
        } else {
            format!(
                "{p} is outside {} of workflow {workflow}: Landlock refuses {} there",
                self.outside.join(" and "),
                self.outside
                    .iter()
                    .map(|r| match *r {
                        "sandbox.write" => "writing, creating and removing",
                        _ => "executing",
                    })
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        }
    }
}

/// Whether `path` is `rule` or beneath it, both taken lexically.
fn covered(path: &Path, rules: &[PathBuf]) -> bool {
    rules.iter().any(|r| path.starts_with(r))
}

/// `path` without `.` and `..` (lexically; a refused path need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Whether a line of stderr reports a refusal.
fn refusal_line(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("permission denied") || l.contains("operation not permitted") || l.contains("[errno 13]")
}

/// The paths named on a line: runs of non-space characters that start with
/// `/` (or `./`, `../`: taken from `cwd`, the workspace), without the quotes
/// and punctuation around them.
fn paths_in<'a>(line: &'a str, cwd: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
    line.split(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '`' | '(' | ')' | ',' | ';' | '[' | ']'))
        .filter_map(move |w| {
            let w = w.trim_end_matches(':');
            let w = if w.ends_with("..") { w } else { w.trim_end_matches('.') };
            if w.starts_with('/') && w.len() > 1 {
                Some(PathBuf::from(w))
            } else if w.starts_with("./") || w.starts_with("../") {
                Some(cwd.join(w))
            } else {
                None
            }
        })
}

/// The paths a failed call was refused that the spec's rules do not cover,
/// from its stderr.
pub fn refusals(spec: &SandboxSpec, stderr: &[u8]) -> Vec<Refusal> {
    let tail = &stderr[stderr.len().saturating_sub(SCAN_MAX)..];
    let text = String::from_utf8_lossy(tail);
    let mut out: Vec<Refusal> = Vec::new();
    for line in text.lines().filter(|l| refusal_line(l)) {
        for raw in paths_in(line, &spec.workspace) {
            let path = normalize(&raw);
            if out.iter().any(|r| r.path == path) || out.len() >= MAX_PATHS {
                continue;
            }
            let mut outside = Vec::new();
            if !covered(&path, &spec.read) && !covered(&path, &spec.write) {
                outside.push("sandbox.read");
                outside.push("sandbox.write");
            } else {
                if !covered(&path, &spec.write) {
                    outside.push("sandbox.write");
                }
                if !covered(&path, &spec.exec) {
                    outside.push("sandbox.exec");
                }
            }
            if !outside.is_empty() {
                out.push(Refusal { path, outside });
            }
        }
    }
    out
}

/// The hint for a call that ended with `failed` (a non-zero exit, a
/// signal), or `None` when nothing points at the sandbox.
pub fn hint(spec: &SandboxSpec, stderr: &[u8], failed: bool) -> Option<String> {
    if !failed {
        return None;
    }
    let found = refusals(spec, stderr);
    if found.is_empty() {
        return None;
    }
    let lines: Vec<String> = found.iter().map(|r| r.render(&spec.workflow)).collect();
    Some(format!("the sandbox likely refused this call: {}", lines.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::spec::{Requirement, ToolLimits};

    fn spec() -> SandboxSpec {
        SandboxSpec {
            workflow: "coding".into(),
            broker_pid: 1,
            credentials: None,
            landlock: Requirement::Required,
            read: vec!["/usr".into(), "/etc/ssl".into()],
            write: vec!["/ws".into()],
            exec: vec!["/usr/bin".into()],
            tcp_connect: vec![],
            tcp_bind: vec![],
            egress_proxy: None,
            workspace: "/ws".into(),
            scope: None,
            tool: ToolLimits {
                output_max: 1,
                file_size_max: 1,
                open_files_max: 1,
                data_max: None,
                address_space_max: None,
                processes_max: None,
            },
            env: vec![],
        }
    }

    #[test]
    fn names_the_path_and_the_rule() {
        let s = spec();
        let git = b"warning: unable to access '/etc/gitconfig': Permission denied\nfatal: unknown error\n";
        let r = refusals(&s, git);
        assert_eq!(r, vec![Refusal { path: "/etc/gitconfig".into(), outside: vec!["sandbox.read", "sandbox.write"] }]);
        let h = hint(&s, git, true).unwrap();
        assert!(h.contains("/etc/gitconfig is outside every sandbox.read and sandbox.write rule of workflow coding"));
        // A call that succeeded gets no hint, even with the same stderr.
        assert_eq!(hint(&s, git, false), None);

        let py = b"PermissionError: [Errno 13] Permission denied: '/usr/lib/x.txt'\n";
        let r = refusals(&s, py);
        assert_eq!(r[0].outside, vec!["sandbox.write", "sandbox.exec"]);
        let sh = b"sh: 1: ./a.out: Permission denied\n";
        assert_eq!(refusals(&s, sh)[0].outside, vec!["sandbox.exec"]);
        assert!(hint(&s, sh, true).unwrap().contains("/ws/a.out is outside sandbox.exec of workflow coding"));
        let dots = b"cat: /ws/../etc/shadow: Permission denied\n";
        assert_eq!(refusals(&s, dots)[0].path, PathBuf::from("/etc/shadow"));
    }

    #[test]
    fn no_hint_where_every_rule_covers_the_path() {
        let mut s = spec();
        s.exec.push("/ws".into());
        // The workspace is readable, writable and executable: a refusal
        // there is the file's own mode, not the sandbox.
        assert_eq!(refusals(&s, b"sh: /ws/x: Permission denied\n"), vec![]);
        // No refusal words, no hint.
        assert_eq!(refusals(&s, b"cat: /etc/nothing: No such file or directory\n"), vec![]);
        // No path, no hint.
        assert_eq!(refusals(&s, b"unshare: unshare failed: Operation not permitted\n"), vec![]);
    }
}
