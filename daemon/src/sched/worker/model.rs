//! A model function as a worker: one invocation = one job on the model's
//! batcher (so batching, caches and early exits apply).
//!
//! Input: f32 little-endian rows in the model's input layout (`row_shape`,
//! already normalised; an upstream exec function does the preprocessing).
//! Output: the model's output rows as f32 little-endian. The batcher's reply
//! writes the result into a slot and signals the worker's eventfd.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Worker, WorkerError};
use crate::eventfd::EventFd;
use crate::infer::batcher::Rejected;
use crate::infer::{Job, JobResult, ModelHandle, Reply};

type Slot = Arc<Mutex<Option<Result<Vec<u8>, WorkerError>>>>;

/// Runs invocations on a served model.
pub struct ModelWorker {
    handle: Arc<ModelHandle>,
    wake: Arc<EventFd>,
    slot: Slot,
    time_limit: Duration,
    started: Option<Instant>,
    row_len: usize,
}

impl ModelWorker {
    pub fn new(handle: Arc<ModelHandle>, time_limit: Duration) -> Result<Self, WorkerError> {
        let wake = EventFd::new().map_err(|e| WorkerError::Start(format!("eventfd: {e}")))?;
        let row_len = handle.meta.row_shape.iter().product::<usize>().max(1);
        Ok(Self { handle, wake: Arc::new(wake), slot: Arc::default(), time_limit, started: None, row_len })
    }
}

/// f32 LE bytes → values; `None` unless the length is a whole number of rows.
fn rows_from_bytes(input: &[u8], row_len: usize) -> Option<(usize, Vec<f32>)> {
    if input.is_empty() || !input.len().is_multiple_of(4 * row_len) {
        return None;
    }
    let data: Vec<f32> = input.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    Some((data.len() / row_len, data))
}

impl Worker for ModelWorker {
    fn submit(&mut self, input: Vec<u8>) -> Result<(), WorkerError> {
        if self.started.is_some() {
            return Err(WorkerError::Busy);
        }
        let (rows, data) = rows_from_bytes(&input, self.row_len).ok_or_else(|| {
            WorkerError::BadInput(format!(
                "{} bytes is not a whole number of f32 rows of shape {:?}",
                input.len(),
                self.handle.meta.row_shape
            ))
        })?;
        let max = self.handle.target().max_batch;
        if rows > max {
            return Err(WorkerError::BadInput(format!("{rows} rows is more than the model's max_batch ({max})")));
        }
        let (slot, wake) = (Arc::clone(&self.slot), Arc::clone(&self.wake));
        let reply = Reply::new(move |r| {
            let out = match r {
                JobResult::Answer { data, .. } => Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
                JobResult::Expired => Err(WorkerError::TimedOut),
                JobResult::Failed(m) => Err(WorkerError::Failed(m)),
            };
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
            wake.signal();
        });
        let now = Instant::now();
        // One stream per worker: a DAG's model function sees its own traffic in order.
        let job = Job {
            rows,
            stream: self as *const Self as u64,
            calibrate: false,
            data,
            deadline: Some(now + self.time_limit),
            reply,
        };
        match self.handle.submit(job, false) {
            Ok(()) => {
                self.started = Some(now);
                Ok(())
            }
            Err((why, job)) => {
                job.reply.disarm();
                Err(match why {
                    Rejected::Closed => WorkerError::Crashed("the model's batcher is gone".into()),
                    Rejected::Unmeetable { estimate } => WorkerError::Failed(format!("unmeetable ({estimate:?})")),
                    Rejected::QueueFull => WorkerError::Failed("the model's queue is full".into()),
                })
            }
        }
    }

    fn fds(&self) -> [Option<RawFd>; 2] {
        [Some(self.wake.fd()), None]
    }

    fn try_take(&mut self) -> Option<Result<Vec<u8>, WorkerError>> {
        self.wake.drain();
        let out = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        self.started = None;
        Some(out)
    }

    fn overdue(&self) -> bool {
        // The batcher answers `Expired` at the time limit; this is the backstop.
        self.started.is_some_and(|s| s.elapsed() > self.time_limit + Duration::from_millis(100))
    }

    fn kill(&mut self) {
        // A queued job cannot be withdrawn: its late answer lands in a slot
        // nobody reads once this worker is dropped.
        self.started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::rows_from_bytes;

    #[test]
    fn input_must_be_whole_f32_rows() {
        let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(rows_from_bytes(&bytes, 2), Some((2, vec![1.0, 2.0, 3.0, 4.0])));
        assert_eq!(rows_from_bytes(&bytes, 3), None);
        assert_eq!(rows_from_bytes(&bytes[..7], 1), None);
        assert_eq!(rows_from_bytes(&[], 1), None);
    }
}
