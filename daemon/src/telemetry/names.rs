//! Every metric family the daemon exports: its name, type, unit and HELP text,
//! in one table ([`FAMILIES`]) that [`describe_all`] hands to the recorder at
//! install.
//!
//! A metric is recorded with one of these constants (or the same literal);
//! the unit tests read the daemon's sources and fail on any `counter!`,
//! `gauge!` or `histogram!` whose name is not in the table or is recorded as
//! another type, so a new family cannot ship without its HELP text. Units are
//! metadata only: the exporter does not append them (names already end in
//! `_seconds`, `_bytes`, `_total`, as the Prometheus naming rules want).

use metrics::{KeyName, SharedString, Unit};

/// Infer requests answered.
pub const REQUESTS_TOTAL: &str = "gati_requests_total";
/// Time from receipt to answer of successful infer requests.
pub const REQUEST_DURATION_SECONDS: &str = "gati_request_duration_seconds";
/// Control requests answered.
pub const CONTROL_REQUESTS_TOTAL: &str = "gati_control_requests_total";
/// Time one pipeline stage took for one batch.
pub const STAGE_DURATION_SECONDS: &str = "gati_stage_duration_seconds";
/// Rows per batch.
pub const BATCH_ROWS: &str = "gati_batch_rows";
/// Rows waiting in a model's queue.
pub const QUEUE_ROWS: &str = "gati_queue_rows";
/// Requests in flight.
pub const INFLIGHT_REQUESTS: &str = "gati_inflight_requests";
/// Open client connections.
pub const CONNECTIONS: &str = "gati_connections";
/// Connections refused.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "gati_connections_refused_total";
/// Requests refused before they were queued.
pub const REQUESTS_REFUSED_TOTAL: &str = "gati_requests_refused_total";
/// Request bytes the node holds against its budget.
pub const QUEUED_BYTES: &str = "gati_queued_bytes";
/// Peer frames accepted (cluster).
pub const PEER_FRAMES_TOTAL: &str = "gati_peer_frames_total";
/// Peer frames refused (cluster).
pub const PEER_FRAMES_REJECTED_TOTAL: &str = "gati_peer_frames_rejected_total";
/// Peer frames written (cluster).
pub const PEER_FRAMES_SENT_TOTAL: &str = "gati_peer_frames_sent_total";
/// Inbound peer connections refused at accept (cluster), by reason.
pub const CLUSTER_PEER_CONNECTIONS_REFUSED_TOTAL: &str = "gati_cluster_peer_connections_refused_total";
/// Inbound peer connections open (cluster), by state.
pub const CLUSTER_PEER_CONNECTIONS: &str = "gati_cluster_peer_connections";
/// Offers the arbiter sent to agents (cluster).
pub const AUCTION_OFFERS_TOTAL: &str = "gati_auction_offers_total";
/// Bids: sent by this node's agents, or taken/refused/missing on the arbiter.
pub const AUCTION_BIDS_TOTAL: &str = "gati_auction_bids_total";
/// Submits this node sent again to a (new) arbiter that had not shown it has them.
pub const CLUSTER_SUBMITS_RESENT_TOTAL: &str = "gati_cluster_submits_resent_total";
/// Agents of this node's apps given back by the arbiter (`home` messages) after a restart.
pub const CLUSTER_AGENTS_RESTORED_TOTAL: &str = "gati_cluster_agents_restored_total";
/// Resyncs the arbiter sent a member on a new link, by reason (`backlog`, `large`).
pub const CLUSTER_LINK_RESYNCS_TOTAL: &str = "gati_cluster_link_resyncs_total";
/// Leases in this node's view of the cluster.
pub const CLUSTER_LEASES: &str = "gati_cluster_leases";
/// Cluster members (on the arbiter).
pub const CLUSTER_NODES: &str = "gati_cluster_nodes";
/// Leases a node ended itself: past their expiry, neither renewed nor revoked.
pub const CLUSTER_LEASES_LAPSED_TOTAL: &str = "gati_cluster_leases_lapsed_total";
/// 1 on the node that is the cluster's arbiter now, else 0.
pub const CLUSTER_ARBITER: &str = "gati_cluster_arbiter";
/// 1 for the way apps are kept to their GPUs on this node (label mode: cgroup-v1, env).
pub const CLUSTER_GPU_DEVICE_RULES: &str = "gati_cluster_gpu_device_rules";
/// Apps whose GPU device rules could not be set.
pub const CLUSTER_GPU_DEVICE_RULE_FAILURES_TOTAL: &str = "gati_cluster_gpu_device_rule_failures_total";
/// etcd operations that failed (cluster on etcd), by operation.
pub const ETCD_ERRORS_TOTAL: &str = "gati_etcd_errors_total";
/// Times this node won the arbiter election (cluster on etcd).
pub const CLUSTER_ELECTIONS_WON_TOTAL: &str = "gati_cluster_elections_won_total";
/// Data-plane threads restarted after a failure.
pub const THREAD_RESTARTS_TOTAL: &str = "gati_thread_restarts_total";
/// Rows answered, by the stage that answered them.
pub const EXITS_TOTAL: &str = "gati_exits_total";
/// Rows by the earliest stage whose active predictor had the full model's answer.
pub const ORACLE_EXITS_TOTAL: &str = "gati_cache_oracle_exits_total";
/// Shadow-checked disagreement of cache answers with the full model.
pub const CACHE_LIVE_DISAGREEMENT: &str = "gati_cache_live_disagreement";
/// Memory held by a model's active caches.
pub const CACHE_MEMORY_BYTES: &str = "gati_cache_memory_bytes";
/// Training generation of a model's live caches.
pub const CACHE_GENERATION: &str = "gati_cache_generation";
/// Gauge `{model, cut, state}`: 1 for each cut's current state, 0 for the others.
pub const CACHE_CUT_STATE: &str = "gati_cache_cut_state";
/// Gauge `{model, cut}`: held-out share of rows the live plan expects each cut to answer.
pub const CACHE_CUT_EXIT_SHARE: &str = "gati_cache_cut_exit_share";
/// Expected per-request latency with the live cache placement.
pub const CACHE_EXPECTED_LATENCY_SECONDS: &str = "gati_cache_expected_latency_seconds";
/// Per-request latency the same placement estimate gives without caches.
pub const CACHE_BASELINE_LATENCY_SECONDS: &str = "gati_cache_baseline_latency_seconds";
/// DAG invocations answered.
pub const DAG_REQUESTS_TOTAL: &str = "gati_dag_requests_total";
/// Time from receipt to answer of successful DAG invocations.
pub const DAG_REQUEST_DURATION_SECONDS: &str = "gati_dag_request_duration_seconds";
/// DAG invocations answered within their deadline.
pub const DAG_DEADLINE_MET_TOTAL: &str = "gati_dag_deadline_met_total";
/// DAG invocations that missed their deadline.
pub const DAG_DEADLINE_MISSED_TOTAL: &str = "gati_dag_deadline_missed_total";
/// DAG invocations that failed.
pub const DAG_FAILED_TOTAL: &str = "gati_dag_failed_total";
/// SGSs a DAG is routed to.
pub const DAG_SGS: &str = "gati_dag_sgs";
/// Workers started on the request path.
pub const SCHED_COLD_STARTS_TOTAL: &str = "gati_sched_cold_starts_total";
/// Workers started ahead of demand.
pub const SCHED_PRESTARTS_TOTAL: &str = "gati_sched_prestarts_total";
/// Workers that died.
pub const SCHED_WORKER_CRASHES_TOTAL: &str = "gati_sched_worker_crashes_total";
pub const FUNCTION_STDERR_LINES_TOTAL: &str = "gati_function_stderr_lines_total";
/// Function runs retried.
pub const SCHED_RETRIES_TOTAL: &str = "gati_sched_retries_total";
/// Live workers per function.
pub const SCHED_FUNCTION_WORKERS: &str = "gati_sched_function_workers";
/// Requests seen by the steering layer (kernel program or the UDP I/O thread).
pub const STEER_REQUESTS_TOTAL: &str = "gati_steer_requests_total";
/// Requests an SGS holds, as the steering rule reads it.
pub const STEER_SGS_QUEUED: &str = "gati_steer_sgs_queued";
/// 1 when kernel (eBPF) steering is active, else 0.
pub const STEER_KERNEL: &str = "gati_steer_kernel";

/// The Prometheus type of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: what the recorder is told about it.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn family(name: &'static str, kind: Kind, unit: Option<Unit>, help: &'static str) -> Family {
    Family { name, kind, unit, help }
}

use Kind::{Counter, Gauge, Histogram};

/// Every family the daemon records.
pub const FAMILIES: &[Family] = &[
    family(
        PEER_FRAMES_TOTAL,
        Counter,
        Some(Unit::Count),
        "Peer-protocol frames accepted and applied, by message kind (join, heartbeat, submit, grant, revoke, ...).",
    ),
    family(
        PEER_FRAMES_REJECTED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Peer-protocol frames refused, by reason (unauthenticated, replayed, malformed, version, refused, io, timeout: an established connection idle for 30 s, handshake_timeout: no authentic first frame within peer_handshake_timeout_s).",
    ),
    family(
        PEER_FRAMES_SENT_TOTAL,
        Counter,
        Some(Unit::Count),
        "Peer-protocol frames written to a peer's connection, by message kind (node to arbiter, and arbiter to members).",
    ),
    family(
        CLUSTER_PEER_CONNECTIONS_REFUSED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Inbound peer connections closed at accept, by reason (per_ip: the source IP has peer_max_per_ip in handshake; handshakes: half of peer_max_connections in handshake and the IP not a known peer's; total: peer_max_connections open).",
    ),
    family(
        CLUSTER_PEER_CONNECTIONS,
        Gauge,
        Some(Unit::Count),
        "Inbound peer connections open, by state (handshake: before their first authentic frame; established).",
    ),
    family(
        AUCTION_OFFERS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Offers of free GPUs the arbiter sent to apps' agents (one per offered app and round).",
    ),
    family(
        AUCTION_BIDS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Bids, by result: sent (by this node's agents), accepted, missing (offered, no bid by the deadline), or refused as stale, not_offered, invalid, too_many_options, duplicate (on the arbiter).",
    ),
    family(
        CLUSTER_AGENTS_RESTORED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Agents of apps submitted on this node that the arbiter gave back (a home message for an app this node did not keep, e.g. after a restart).",
    ),
    family(
        CLUSTER_SUBMITS_RESENT_TOTAL,
        Counter,
        Some(Unit::Count),
        "Submits of apps of this node sent again on an arbiter's welcome, because the node had not yet seen them in the arbiter's state.",
    ),
    family(
        CLUSTER_LINK_RESYNCS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Resyncs (welcome, the member's home apps, every lease) the arbiter sent a member on a new link, by reason: backlog (the member's queue was full: its backlog was dropped and replaced by the resync), large (a resync bigger than the room left on the member's link).",
    ),
    family(CLUSTER_LEASES, Gauge, Some(Unit::Count), "GPU leases in this node's view of the cluster."),
    family(
        CLUSTER_LEASES_LAPSED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Leases this node ended itself: past their expiry by 2 × round_s + 1 s (arbiter's clock) with no renewal or revoke from the arbiter (gone, or cut off); their processes here were stopped.",
    ),
    family(CLUSTER_NODES, Gauge, Some(Unit::Count), "Members of the cluster, as the arbiter node sees them."),
    family(
        CLUSTER_ARBITER,
        Gauge,
        None,
        "1 while this node is the cluster's arbiter (static, or elected on etcd and running rounds), else 0; label node.",
    ),
    family(
        CLUSTER_GPU_DEVICE_RULES,
        Gauge,
        None,
        "1 for how this node keeps app processes to their granted GPUs: mode cgroup-v1 (device rules in a cgroup per app) or env (CUDA_VISIBLE_DEVICES only).",
    ),
    family(
        CLUSTER_GPU_DEVICE_RULE_FAILURES_TOTAL,
        Counter,
        Some(Unit::Count),
        "App starts whose GPU device rules could not be set (gpu_devices = auto: started with CUDA_VISIBLE_DEVICES only; cgroup: not started).",
    ),
    family(
        ETCD_ERRORS_TOTAL,
        Counter,
        Some(Unit::Count),
        "etcd operations that failed, by op (connect, register, keepalive, campaign, observe, snapshot, watch, commit, fenced, revoke).",
    ),
    family(
        CLUSTER_ELECTIONS_WON_TOTAL,
        Counter,
        Some(Unit::Count),
        "Times this node won the arbiter election on etcd and took over the lease rounds.",
    ),
    family(
        REQUESTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Infer requests answered, by model and wire status (ok, busy, deadline_exceeded, bad_request, ...).",
    ),
    family(
        REQUEST_DURATION_SECONDS,
        Histogram,
        Some(Unit::Seconds),
        "Time in the daemon from receipt to answer of infer requests answered ok, by model.",
    ),
    family(
        CONTROL_REQUESTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Control requests answered on the socket (ping, list, info, stats, health, ready, ...), by kind.",
    ),
    family(
        STAGE_DURATION_SECONDS,
        Histogram,
        Some(Unit::Seconds),
        "Time one pipeline stage took to run one batch, by model and stage (1-based).",
    ),
    family(BATCH_ROWS, Histogram, Some(Unit::Count), "Rows in each batch a model's batcher ran, by model."),
    family(QUEUE_ROWS, Gauge, Some(Unit::Count), "Rows waiting in a model's queue for its batcher, by model."),
    family(
        INFLIGHT_REQUESTS,
        Gauge,
        Some(Unit::Count),
        "Infer and DAG requests received and not yet answered, over all connections.",
    ),
    family(CONNECTIONS, Gauge, Some(Unit::Count), "Open client connections on the daemon's socket."),
    family(
        CONNECTIONS_REFUSED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Client connections closed at accept, by reason (too_many_connections, unauthorized).",
    ),
    family(
        REQUESTS_REFUSED_TOTAL,
        Counter,
        Some(Unit::Count),
        "Requests answered Busy or TooLarge before anything was queued for them, by reason (queued_bytes, \
         model_queue, sgs_queue, inflight_per_conn, too_large).",
    ),
    family(
        QUEUED_BYTES,
        Gauge,
        Some(Unit::Bytes),
        "Request bytes the node holds (payloads being received, decoded inputs queued, answers awaiting slow \
         readers) against [server] max_queued_bytes.",
    ),
    family(
        THREAD_RESTARTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Data-plane threads restarted after a panic or ring error, by role (io, batcher: the batch that panicked \
         was answered Failed, trainer).",
    ),
    family(
        EXITS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Rows of models with caches answered, by model and stage: the cut whose cache answered (0 = the input), or the \
         stage count for a full-model answer.",
    ),
    family(
        ORACLE_EXITS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Rows of models with caches by the earliest stage at which an active predictor guessed the full model's answer \
         (the full model's where it ran, else the cache's): where a perfect selector would have answered them; the \
         stage count when none did.",
    ),
    family(
        CACHE_LIVE_DISAGREEMENT,
        Gauge,
        None,
        "Share (0-1) of shadow-checked cache answers that disagreed with the full model, by model.",
    ),
    family(CACHE_MEMORY_BYTES, Gauge, Some(Unit::Bytes), "Memory held by a model's live caches, by model."),
    family(
        CACHE_GENERATION,
        Gauge,
        Some(Unit::Count),
        "Training generation of a model's live caches (0 = never trained; grows by one per training), by model.",
    ),
    family(
        CACHE_CUT_STATE,
        Gauge,
        None,
        "Why each cut of a model answers or not, by model, cut (0 = the input) and state: 1 for the current state \
         (active, untrained, no_features, uncertifiable: too few rows certified within the budget, does_not_pay: its \
         lookup costs more than its exits save, not_chosen: earlier cuts already answer its rows, over_memory, \
         live_disagreement: switched off by shadow checks), 0 for the others.",
    ),
    family(
        CACHE_CUT_EXIT_SHARE,
        Gauge,
        None,
        "Share (0-1) of rows the live placement expects each cut to answer (held-out estimate), by model and cut.",
    ),
    family(
        CACHE_EXPECTED_LATENCY_SECONDS,
        Gauge,
        Some(Unit::Seconds),
        "Expected compute time per request row with the live cache placement, by model.",
    ),
    family(
        CACHE_BASELINE_LATENCY_SECONDS,
        Gauge,
        Some(Unit::Seconds),
        "Compute time per request row the same cost model gives without caches, by model.",
    ),
    family(DAG_REQUESTS_TOTAL, Counter, Some(Unit::Count), "DAG invocations answered, by DAG and wire status."),
    family(
        DAG_REQUEST_DURATION_SECONDS,
        Histogram,
        Some(Unit::Seconds),
        "Time in the daemon from receipt to answer of DAG invocations answered ok, by DAG.",
    ),
    family(
        DAG_DEADLINE_MET_TOTAL,
        Counter,
        Some(Unit::Count),
        "DAG invocations answered within their deadline (scheduler counters; restart from 0 when a reload replaces the \
         scheduler), by DAG.",
    ),
    family(
        DAG_DEADLINE_MISSED_TOTAL,
        Counter,
        Some(Unit::Count),
        "DAG invocations shed, refused at arrival or answered late (scheduler counters; restart from 0 when a reload \
         replaces the scheduler), by DAG.",
    ),
    family(
        DAG_FAILED_TOTAL,
        Counter,
        Some(Unit::Count),
        "DAG invocations that failed (a function error or crash past its retries; scheduler counters), by DAG.",
    ),
    family(DAG_SGS, Gauge, Some(Unit::Count), "SGSs the load balancer routes a DAG to now, by DAG."),
    family(
        SCHED_COLD_STARTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Function workers started because a request found none idle (all SGSs).",
    ),
    family(
        SCHED_PRESTARTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Function workers started ahead of demand by the warm pools (all SGSs).",
    ),
    family(
        FUNCTION_STDERR_LINES_TOTAL,
        Counter,
        Some(Unit::Count),
        "Lines function workers wrote to stderr, by function and result: logged, or dropped over the per-function rate limit.",
    ),
    family(
        SCHED_WORKER_CRASHES_TOTAL,
        Counter,
        Some(Unit::Count),
        "Function workers that died or were killed (crash, time limit, protocol error; all SGSs).",
    ),
    family(
        STEER_REQUESTS_TOTAL,
        Counter,
        Some(Unit::Count),
        "Requests seen by the steering layer, by path (kernel: the SK_REUSEPORT program's per-CPU counters; \
         userspace: the UDP I/O thread; unix_kernel: the Unix stream verdict's, per client write; unix_sgs: \
         Unix frames the SGSs read) and outcome (steered, fallback, other, malformed, dropped).",
    ),
    family(STEER_SGS_QUEUED, Gauge, Some(Unit::Count), "Requests an SGS holds, as the steering rule reads it, by SGS."),
    family(STEER_KERNEL, Gauge, None, "1 when kernel (eBPF) steering is active, 0 with the userspace table."),
    family(
        SCHED_RETRIES_TOTAL,
        Counter,
        Some(Unit::Count),
        "Function runs retried after a worker was lost (all SGSs).",
    ),
    family(
        SCHED_FUNCTION_WORKERS,
        Gauge,
        Some(Unit::Count),
        "Live workers (idle + busy) of a function over all SGSs, by function.",
    ),
];

/// Tells the installed recorder every family's type, unit and HELP text.
pub fn describe_all() {
    metrics::with_recorder(|recorder| {
        for f in FAMILIES {
            let (name, help) = (KeyName::from_const_str(f.name), SharedString::const_str(f.help));
            match f.kind {
                Kind::Counter => recorder.describe_counter(name, f.unit, help),
                Kind::Gauge => recorder.describe_gauge(name, f.unit, help),
                Kind::Histogram => recorder.describe_histogram(name, f.unit, help),
            }
        }
    });
}

#[cfg(test)]
mod tests;
