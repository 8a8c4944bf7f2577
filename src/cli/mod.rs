//! The client-side commands: `exec`, `ask`, `canary`, `usage`, `status`,
//! `policy check`, `doctor`.

pub mod ask;
pub mod audit;
pub mod canary;
pub mod check;
pub mod doctor;
pub mod exec;
pub mod sessions;
pub mod status;
pub mod usage;

use crate::api::ErrorReply;

/// Exit code for corral's own failures (as `env` and `docker run` do):
/// distinct from any exit code a command reports through `corral exec`.
pub const EXIT_CORRAL: u8 = 125;

/// A broker error body as one line for the terminal.
fn describe_error(status: hyper::StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorReply>(body) {
        Ok(e) => format!("{} [{}]", e.error.message, e.error.code),
        Err(_) => format!("broker answered {status}: {}", String::from_utf8_lossy(body)),
    }
}
