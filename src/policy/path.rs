//! [`PathTemplate`]: a sandbox path, absolute or under `{workspace}`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// The one placeholder a path may start with.
pub const WORKSPACE: &str = "{workspace}";

/// A path that cannot be a [`PathTemplate`]; the message says why and what
/// would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path {input:?}: {reason}")]
pub struct InvalidPath {
    /// The path as written.
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// An absolute path, or one starting with `{workspace}` followed by nothing
/// or `/...`. No other placeholder, no `..` component, no NUL byte.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathTemplate(String);

impl PathTemplate {
    /// The path with `{workspace}` replaced by `workspace`.
    pub fn expand(&self, workspace: &Path) -> PathBuf {
        match self.0.strip_prefix(WORKSPACE) {
            Some(rest) => {
                let rest = rest.trim_start_matches('/');
                if rest.is_empty() {
                    workspace.to_path_buf()
                } else {
                    workspace.join(rest)
                }
            }
            None => PathBuf::from(&self.0),
        }
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the path lies in the workspace (starts with `{workspace}`).
    pub fn is_workspace(&self) -> bool {
        self.0.starts_with(WORKSPACE)
    }
}

impl FromStr for PathTemplate {
    type Err = InvalidPath;

    fn from_str(s: &str) -> Result<Self, InvalidPath> {
        let err = |reason| InvalidPath { input: s.to_owned(), reason };
        let rest = match s.strip_prefix(WORKSPACE) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            Some(_) => return Err(err("{workspace} must be followed by nothing or '/', e.g. \"{workspace}/cache\"")),
            None if s.starts_with('{') => {
                return Err(err("the only placeholder is {workspace}, e.g. \"{workspace}/cache\""))
            }
            None if s.starts_with('/') => s,
            None => return Err(err("must be absolute (start with '/') or start with {workspace}, e.g. \"/usr\"")),
        };
        if rest.contains(['{', '}']) {
            return Err(err("the only placeholder is {workspace}, and only at the start, e.g. \"{workspace}/cache\""));
        }
        if rest.contains('\0') {
            return Err(err("contains a NUL byte"));
        }
        if rest.split('/').any(|c| c == "..") {
            return Err(err("'..' is not allowed; write the path it resolves to"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for PathTemplate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> PathTemplate {
        s.parse().unwrap()
    }

    #[test]
    fn accepts_and_expands() {
        let ws = Path::new("/var/lib/corral/workspaces/kid/homework");
        assert_eq!(t("{workspace}").expand(ws), ws);
        assert_eq!(t("{workspace}/").expand(ws), ws);
        assert_eq!(t("{workspace}/cache/x").expand(ws), ws.join("cache/x"));
        assert_eq!(t("/usr").expand(ws), Path::new("/usr"));
        assert_eq!(t("/").expand(ws), Path::new("/"));
        assert!(t("{workspace}/a").is_workspace());
        assert!(!t("/usr").is_workspace());
        assert_eq!(t("/etc/ssl").as_str(), "/etc/ssl");
        assert!(t("/a..b/c...").as_str().ends_with("c..."), ".. inside a name is fine");
    }

    #[test]
    fn rejects() {
        let cases = [
            ("{workspce}/x", "the only placeholder is {workspace}"),
            ("{workspace}x", "{workspace} must be followed by nothing or '/'"),
            ("/a/{workspace}", "the only placeholder is {workspace}, and only at the start"),
            ("{workspace}/{tenant}", "the only placeholder is {workspace}, and only at the start"),
            ("relative", "must be absolute"),
            ("", "must be absolute"),
            ("./x", "must be absolute"),
            ("~/x", "must be absolute"),
            ("/a/../b", "'..' is not allowed"),
            ("{workspace}/..", "'..' is not allowed"),
            ("/a\0b", "contains a NUL byte"),
        ];
        for (input, reason) in cases {
            let e = input.parse::<PathTemplate>().unwrap_err();
            assert!(e.reason.starts_with(reason), "{input:?}: {e}");
        }
        assert_eq!(
            "{workspce}/x".parse::<PathTemplate>().unwrap_err().to_string(),
            r#"invalid path "{workspce}/x": the only placeholder is {workspace}, e.g. "{workspace}/cache""#
        );
    }
}
