//! Names that end up in systemd unit names and paths: workflows and tenants,
//! plus the check for unix user and group names.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// A name that is not `[a-z0-9][a-z0-9-]{0,39}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: use 1-40 lowercase letters, digits and '-', starting with a letter or digit")]
pub struct InvalidName(pub String);

const MAX_NAME: usize = 40;

fn check_name(s: &str) -> Result<(), InvalidName> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName(s.to_owned()))
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The name as written in the policy.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                check_name(s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                check_name(&s)?;
                Ok(Self(s))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

name_type!(
    /// `[workflow].name`: `[a-z0-9][a-z0-9-]{0,39}`, safe in systemd unit
    /// names and as a path component.
    WorkflowName
);
name_type!(
    /// `[workflow].tenant`: same charset as [`WorkflowName`].
    TenantName
);

/// Checks a unix user or group name as `useradd` accepts it by default:
/// `[a-z_][a-z0-9_-]*[$]?`, at most 32 characters. Returns what is wrong.
pub(crate) fn check_unix_name(s: &str) -> Result<(), String> {
    let body = s.strip_suffix('$').unwrap_or(s);
    let ok = !body.is_empty()
        && s.len() <= 32
        && body.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && body.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid unix name {s:?}: use up to 32 lowercase letters, digits, '_' and '-', \
             starting with a letter or '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "0", "homework", "family-chat", "a-", &"x".repeat(40)] {
            assert!(good.parse::<WorkflowName>().is_ok(), "{good}");
            assert!(good.parse::<TenantName>().is_ok(), "{good}");
        }
        for bad in ["", "-a", "Bad_Name", "a.b", "a b", "é", &"x".repeat(41)] {
            assert_eq!(bad.parse::<WorkflowName>(), Err(InvalidName(bad.to_owned())));
        }
        assert_eq!(
            "Bad_Name".parse::<TenantName>().unwrap_err().to_string(),
            r#"invalid name "Bad_Name": use 1-40 lowercase letters, digits and '-', starting with a letter or digit"#
        );
        let name: WorkflowName = "homework".parse().unwrap();
        assert_eq!(name.as_str(), "homework");
        assert_eq!(serde_json::to_string(&name).unwrap(), r#""homework""#);
    }

    #[test]
    fn unix_names() {
        for good in ["root", "corral-kid", "_apt", "u1", "machine$"] {
            assert!(check_unix_name(good).is_ok(), "{good}");
        }
        for bad in ["", "$", "1abc", "-a", "Alice", "a b", "a/b", &"x".repeat(33)] {
            assert!(check_unix_name(bad).is_err(), "{bad:?}");
        }
    }
}
