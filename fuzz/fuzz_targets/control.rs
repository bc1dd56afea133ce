//! `control`: the control-request answers (list, info, stats, health, ready,
//! cache-train, app-submit, apps) with hostile headers, target ids and payloads.
//!
//! Input: a 64-byte request header, two state bits (ready, draining), then the
//! payload. The context has an empty model registry, no DAGs and no metrics
//! recorder: no daemon runs. Properties: `RequestHeader::parse` and
//! `control::answer` never panic; every answer with a byte payload is valid
//! JSON or the stats text; unknown targets answer `UnknownModel`; the cluster
//! kinds answer `BadPayload` (no `[cluster]`).

#![no_main]

use std::sync::{Arc, OnceLock};

use gatid::api::budget::ByteBudget;
use gatid::api::control::{answer, kind_name};
use gatid::api::listener::Allowlist;
use gatid::api::wire::{Kind, RequestHeader, Status, HEADER_LEN};
use gatid::api::{Limits, NodeState, ServeContext};
use gatid::infer::Registry;
use gatid::sched::DagService;
use libfuzzer_sys::fuzz_target;

fn context(ready: bool, draining: bool) -> &'static ServeContext {
    static CTX: OnceLock<[ServeContext; 4]> = OnceLock::new();
    let all = CTX.get_or_init(|| {
        std::array::from_fn(|i| {
            let state = NodeState::default();
            state.set_ready(i & 1 != 0);
            if i & 2 != 0 {
                state.start_draining();
            }
            ServeContext {
                registry: Arc::new(Registry::default()),
                dags: Arc::new(DagService::default()),
                limits: Limits {
                    max_frame_bytes: 1 << 20,
                    max_inflight_per_conn: 8,
                    max_connections: 8,
                    allow: Allowlist { uids: vec![], gids: vec![] },
                    busy_poll: std::time::Duration::ZERO,
                },
                metrics: None,
                state: Arc::new(state),
                budget: ByteBudget::new(1 << 20),
                stall_period: std::time::Duration::from_secs(1),
                steering: None,
            }
        })
    });
    &all[usize::from(ready) | usize::from(draining) << 1]
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<HEADER_LEN>() else { return };
    let (bits, payload) = rest.split_first().map_or((0, &[][..]), |(b, p)| (*b, p));
    let mut head = *head;
    // Most inputs should reach `answer`: force magic and version unless bit 7 says not to.
    if bits & 0x80 == 0 {
        head[..4].copy_from_slice(&gatid::api::wire::MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&gatid::api::wire::VERSION.to_le_bytes());
    }
    let Ok(header) = RequestHeader::parse(&head) else { return };
    let _ = header.dims();
    let Some(kind) = Kind::from_u16(header.kind.get()) else { return };
    let _ = kind_name(kind);
    let ctx = context(bits & 1 != 0, bits & 2 != 0);
    let a = answer(ctx, kind, &header, payload);
    match kind {
        Kind::Stats => assert_eq!(a.status, Status::Ok),
        _ => {
            let v: serde_json::Value = serde_json::from_slice(&a.body).expect("control answers are JSON");
            assert!(v.is_object());
        }
    }
    match kind {
        // The registry is empty: no model can be found, by id or by name.
        Kind::ModelInfo | Kind::CacheTrain => assert_eq!(a.status, Status::UnknownModel),
        Kind::Infer | Kind::Ping | Kind::InvokeDag => assert_eq!(a.status, Status::UnknownKind),
        Kind::ListModels | Kind::Health | Kind::Ready | Kind::Stats => assert_eq!(a.status, Status::Ok),
        // No peer service runs: the node has no [cluster] section.
        Kind::AppSubmit | Kind::Apps => assert_eq!(a.status, Status::BadPayload),
    }
    if kind == Kind::Ready {
        let v: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON");
        assert_eq!(v["ready"], serde_json::Value::Bool(bits & 1 != 0 && bits & 2 == 0));
    }
});
