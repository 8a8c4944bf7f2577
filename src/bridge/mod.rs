//! Chat bridges: processes that carry a chat's messages to the broker's
//! socket as asks of the members who wrote them, and the answers back.
//! A bridge is a client like any other: it talks to the broker only
//! through the socket API, as a delegate (`x-corral-member`) that the
//! members file names.

pub mod botapi;
pub mod telegram;

use std::path::{Path, PathBuf};

/// The credential name of the bot token (systemd `LoadCredential=`).
pub const TOKEN_CREDENTIAL: &str = "telegram-token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no bot token: pass --token-file PATH, or run under systemd with \
         LoadCredential={TOKEN_CREDENTIAL}:/etc/corral/telegram-token (units/corral-bridge-telegram.service)"
    )]
    Missing,
    #[error("failed to read the bot token from {path} (is it readable by this user? systemd: LoadCredential=)")]
    Read { path: PathBuf, source: std::io::Error },
    // Never the content: a wrong file may still hold a secret.
    #[error(
        "{path} does not hold a bot token (one line, DIGITS:LETTERS as BotFather gives it); \
         write the token alone into the file"
    )]
    Malformed { path: PathBuf },
}

/// Reads the bot token: `token_file` when given, else the systemd
/// credential in `$CREDENTIALS_DIRECTORY`. Never argv or the environment:
/// both can be read by other processes (`/proc/PID/cmdline` by every user,
/// `environ` by the same uid) and end up in logs and crash reports.
pub fn read_token(token_file: Option<&Path>, credentials_dir: Option<&Path>) -> Result<String, TokenError> {
    let path = match (token_file, credentials_dir) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(dir)) => dir.join(TOKEN_CREDENTIAL),
        (None, None) => return Err(TokenError::Missing),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| TokenError::Read { path: path.clone(), source })?;
    let token = text.trim();
    if !is_token(token) {
        return Err(TokenError::Malformed { path });
    }
    Ok(token.to_string())
}

/// `DIGITS:REST` with REST of `[A-Za-z0-9_-]`: also what keeps the token
/// from changing the path of the Bot API's URLs.
fn is_token(t: &str) -> bool {
    let Some((id, secret)) = t.split_once(':') else {
        return false;
    };
    !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && !secret.is_empty()
        && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert!(is_token("123456:ABC-def_9"));
        for bad in ["", "123456", ":abc", "abc:def", "12:ab/../x", "12:a b", "12:"] {
            assert!(!is_token(bad), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("corral-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let file = dir.join(TOKEN_CREDENTIAL);
        std::fs::write(&file, "123:secret-value/x\n").unwrap_or_default();
        let e = read_token(None, Some(&dir)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("does not hold a bot token") && !e.contains("secret-value"), "{e}");
        std::fs::write(&file, "123:good_token\n").unwrap_or_default();
        assert_eq!(read_token(Some(&file), None).ok().as_deref(), Some("123:good_token"));
        assert!(matches!(read_token(None, None), Err(TokenError::Missing)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
