//! A DAG invocation as the SGS receives it, and its answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dag::Dag;

/// One invocation of a DAG.
pub struct DagRequest {
    pub dag: Arc<Dag>,
    /// Input of every source function.
    pub input: Vec<u8>,
    /// Absolute deadline; `None` = arrival + the DAG's configured deadline.
    pub deadline: Option<Instant>,
    pub reply: DagReply,
}

/// Time spent by one function of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FnTiming {
    pub function: String,
    /// Ready (inputs complete) → dispatched to a worker.
    pub queued: Duration,
    /// Dispatched → output back (the successful attempt).
    pub ran: Duration,
    /// 1 unless the function was retried after a worker crash.
    pub attempts: u8,
}

/// The answer to a [`DagRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DagResult {
    /// The sink function's output, and each function's timing in completion order.
    Ok { output: Vec<u8>, timings: Vec<FnTiming> },
    /// The deadline passed, or the remaining work could no longer meet it
    /// (answered as soon as that is known, not run).
    DeadlineMissed,
    /// A function failed, or its worker crashed with no slack left to retry.
    Failed(String),
}

/// Where a request's answer goes (answered `Failed` if dropped unanswered).
pub type DagReply = crate::reply::Reply<DagResult>;

impl crate::reply::Unanswered for DagResult {
    fn unanswered() -> Self {
        DagResult::Failed("request dropped by the scheduler".into())
    }
}
