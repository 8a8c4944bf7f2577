//! API keys: read by the broker, per call, from
//! `$CREDENTIALS_DIRECTORY/<name>` (systemd `LoadCredential=`) or, failing
//! that, from the broker's environment variable `<name>`. A key never goes
//! into a frame, a log line or a worker's environment.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// An API key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("failed to read credential {path}: {source}; check the LoadCredential= line of corral.service")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Where keys come from. Built by `main` from the process environment: the
/// library never reads the environment itself.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    /// `$CREDENTIALS_DIRECTORY`, when systemd set it.
    pub dir: Option<PathBuf>,
    /// The broker's environment at start.
    pub env: BTreeMap<String, String>,
}

impl fmt::Display for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dir {
            Some(d) => write!(f, "{} or the environment", d.display()),
            None => f.write_str("the environment ($CREDENTIALS_DIRECTORY is not set)"),
        }
    }
}

impl CredentialStore {
    /// The key named `name`: the credential file first (whitespace around it
    /// trimmed), then the environment. `Ok(None)` when neither has it.
    pub fn lookup(&self, name: &str) -> Result<Option<Key>, CredentialError> {
        if let Some(dir) = &self.dir {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Ok(Some(Key(text.trim().to_string())).filter(|k| !k.0.is_empty())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CredentialError::Read { path, source }),
            }
        }
        Ok(self.env.get(name).map(|v| Key(v.trim().to_string())).filter(|k| !k.0.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_wins_over_environment_and_debug_hides_the_key() {
        let dir = std::env::temp_dir().join(format!("corral-cred-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("openai"), "sk-file\n").unwrap();
        let store = CredentialStore {
            dir: Some(dir.clone()),
            env: [("openai".to_string(), "sk-env".to_string()), ("groq".to_string(), "gsk".to_string())]
                .into_iter()
                .collect(),
        };
        assert_eq!(store.lookup("openai").unwrap().unwrap().expose(), "sk-file");
        assert_eq!(store.lookup("groq").unwrap().unwrap().expose(), "gsk");
        assert!(store.lookup("ollama").unwrap().is_none());
        assert!(!format!("{:?}", store.lookup("openai").unwrap()).contains("sk-"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
