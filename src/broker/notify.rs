//! Talking to the service manager (`Type=notify`): readiness, status lines,
//! reload and stop, and a watchdog that only pets when the broker really
//! answers on its socket. Outside systemd every call is a no-op.

use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading, NotifyState::Status("reloading policies")]);
}

pub fn stopping(text: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(text)]);
}

/// Half the `WatchdogSec=` the manager asked for, if it asked.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Pets the watchdog every `every`, but only after a status request through
/// the broker's own socket succeeded: a broker that accepts nothing, or is
/// stopped, gets restarted.
pub async fn watchdog(every: Duration, socket: PathBuf) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let probe = crate::client::request(&socket, hyper::Method::GET, crate::api::STATUS_PATH, None);
        match tokio::time::timeout(every, probe).await {
            Ok(Ok((status, _))) if status.is_success() => send(&[NotifyState::Watchdog]),
            Ok(Ok((status, _))) => tracing::warn!("watchdog self-check answered {status}"),
            Ok(Err(e)) => tracing::warn!("watchdog self-check failed: {e}"),
            Err(_) => tracing::warn!("watchdog self-check timed out"),
        }
    }
}
