//! [`PolicyError`]: every message names the file, the line and the key, and
//! says what would be valid.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where in a policy something is: `file:line: key`, with the line and key
/// left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The policy file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `limits.memory_max` or `sandbox.read[2]`.
    pub key: Option<String>,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        Ok(())
    }
}

/// A policy that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy directory could not be listed.
    #[error("failed to read policy directory {}: {source}; check that it exists and is readable", .dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A policy file could not be read.
    #[error("failed to read {}: {source}", .path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The directory holds no `*.toml` file.
    #[error("no policies found in {}: add one file per workflow, see policies/ for examples", .dir.display())]
    NoPolicies {
        /// The directory.
        dir: PathBuf,
    },
    /// The file is not valid TOML.
    #[error("{at}: invalid TOML: {message}")]
    Syntax {
        /// File and line.
        at: Place,
        /// The TOML parser's message.
        message: String,
    },
    /// A key the schema does not know (a typo, or a key in the wrong table).
    #[error("{at}: unknown key; valid keys {} are: {valid}{hint}", scope(.at))]
    UnknownKey {
        /// File, line and the unknown key.
        at: Place,
        /// The valid keys of its table, comma-separated.
        valid: String,
        /// Empty, or `; did you mean ...?`.
        hint: String,
    },
    /// A required table is absent.
    #[error("{}: missing [{table}] table; add it, e.g. {example}", .file.display())]
    MissingTable {
        /// The policy file.
        file: PathBuf,
        /// The table name.
        table: &'static str,
        /// A minimal example.
        example: &'static str,
    },
    /// A required key is absent; the line is that of its table.
    #[error("{at}: missing key; add it, e.g. {example}")]
    MissingKey {
        /// File, line of the table, and the missing key.
        at: Place,
        /// An example line.
        example: &'static str,
    },
    /// A value of the wrong type or out of range.
    #[error("{at}: {message}")]
    Invalid {
        /// File, line and key.
        at: Place,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// Two files define the same workflow name.
    #[error(
        "{at}: workflow name {name:?} is already used by {first}; workflow names must be unique, rename one of them"
    )]
    DuplicateWorkflow {
        /// The later definition.
        at: Place,
        /// The name.
        name: String,
        /// The earlier definition.
        first: Box<Place>,
    },
    /// Two workflows of one tenant run as different unix users.
    #[error(
        "{at}: tenant {tenant:?} runs as {user} here but as {} in {}; a tenant is one unix user, so all its workflows must name the same user",
        .first.user, .first.at
    )]
    TenantUserConflict {
        /// The later workflow's `user` (or `tenant` when it has no `user`).
        at: Place,
        /// The tenant.
        tenant: String,
        /// This workflow's user, rendered (`user "corral-kid"`).
        user: String,
        /// The earlier workflow of the tenant.
        first: Box<FirstUser>,
    },
    /// Two workflows of one tenant have different `[tenant]` tables.
    #[error(
        "{at}: `[tenant]` of tenant {tenant:?} differs from the one in {first} ({diff}); a tenant's slice has one set of limits: make them equal or keep [tenant] in one file only"
    )]
    TenantLimitsConflict {
        /// The later workflow's first differing key (or its `[tenant]` header).
        at: Place,
        /// The tenant.
        tenant: String,
        /// What differs, e.g. `memory_max "512M" here but "1G" there`.
        diff: String,
        /// The same in the earlier workflow of the tenant with a `[tenant]` table.
        first: Box<Place>,
    },
}

/// The earlier side of a [`PolicyError::TenantUserConflict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstUser {
    /// Its `user` key (or `tenant` when it has no `user`).
    pub at: Place,
    /// Its user, rendered.
    pub user: String,
}

/// `in [sandbox]` or `at the top level`, for an unknown key at `at`.
fn scope(at: &Place) -> String {
    match at.key.as_deref().and_then(|k| k.rsplit_once('.')) {
        Some((table, _)) => format!("in [{table}]"),
        None => "at the top level".to_owned(),
    }
}

impl PolicyError {
    /// Where the error is, for errors inside one file.
    pub fn place(&self) -> Option<&Place> {
        match self {
            Self::Syntax { at, .. }
            | Self::UnknownKey { at, .. }
            | Self::MissingKey { at, .. }
            | Self::Invalid { at, .. }
            | Self::DuplicateWorkflow { at, .. }
            | Self::TenantUserConflict { at, .. }
            | Self::TenantLimitsConflict { at, .. } => Some(at),
            Self::ReadDir { .. } | Self::ReadFile { .. } | Self::NoPolicies { .. } | Self::MissingTable { .. } => None,
        }
    }
}

/// All errors of a policy directory; displays one error per line.
#[derive(Debug)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        Self(vec![e])
    }
}
