//! systemd integration: readiness, status, watchdog, stopping. Every call is a
//! no-op when the daemon is not run by systemd (no `NOTIFY_SOCKET`).

use sd_notify::NotifyState;

/// Tells the service manager the daemon serves.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A human-readable status line (`systemctl status`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload began (READY=1 follows when it ends).
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading configuration")]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown began.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining in-flight requests")]);
}

/// Keep-alive ping for `WatchdogSec=`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog, if systemd asked for it (half its timeout).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
