//! Supervision of an I/O thread: a panic or ring error costs that thread's
//! connections, not the node's service (see `liveness.rs` for the rest).

use std::time::{Duration, Instant};

use super::{new_ring, Worker};
use crate::telemetry;

/// Restarts after one failure at most this often; more means a fault that a
/// new ring will not cure, and the thread dies (so the process exits for
/// systemd to restart it).
const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(1);

/// Runs an I/O thread's loop; a panic or ring error closes that thread's
/// connections (their clients see the close; other threads' clients nothing)
/// and starts it again on a new ring, accepting as before.
pub(super) fn supervise(mut worker: Worker) {
    let mut last_failure: Option<Instant> = None;
    loop {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("ring error: {e}"),
            Err(p) => format!("panicked: {}", crate::liveness::panic_message(&*p)),
        };
        tracing::error!(thread = %worker.beat.name(), error = %why, "I/O thread failed; closing its connections");
        worker.close_all();
        if last_failure.is_some_and(|t| t.elapsed() < MIN_RESTART_INTERVAL) {
            worker.beat.died(why);
            return;
        }
        last_failure = Some(Instant::now());
        let ring = match new_ring() {
            Ok(r) => r,
            Err(e) => {
                worker.beat.died(format!("{why}; new ring: {e}"));
                return;
            }
        };
        worker.beat.restarted(why);
        telemetry::thread_restarted("io");
        worker = worker.renew(ring);
    }
}
