//! Shared pieces of the steering tests (tests/steer.rs, tests/steer_unix.rs):
//! a private network namespace, raw request frames, and a daemon config serving
//! the fmnist model as the DAG `digits`.

use std::path::Path;
use std::process::Command;

use gatid::api::wire::{Dtype, Kind, RequestHeader};
use gatid::sched::route::Route;
use zerocopy::IntoBytes;

use super::{config, f32_bytes, fmnist_model, TestDaemon};

/// Moves this test's thread into a new network namespace with `lo` up.
pub fn private_netns() {
    // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's network
    // namespace (this test's thread); children it spawns inherit it.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let st = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("run ip");
    assert!(st.success(), "ip link set lo up");
}

pub fn datagram(kind: Kind, rid: u64, target: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut d = RequestHeader::new(kind, rid, target, Dtype::U8, &[n], n).as_bytes().to_vec();
    d.extend_from_slice(payload);
    d
}

pub fn routes(r: &[(usize, u32)]) -> Vec<Route> {
    r.iter().map(|&(sgs, weight)| Route { sgs, weight }).collect()
}

/// The fmnist model as the DAG `digits`'s one function, on 2 SGSs; UDP on port 0.
pub fn udp_config(dir: &Path, steer: &str) -> String {
    udp_config_sgs(dir, steer, 2)
}

pub fn udp_config_sgs(dir: &Path, steer: &str, sgs: usize) -> String {
    let parts = [
        fmnist_model("fmnist", ""),
        "[[functions]]\nname = \"fm\"\nkind = \"model\"\nmodel = \"fmnist\"\nexpected_ms = 2.0\nmin_warm = 1\n".into(),
        format!(
            "[[dags]]\nname = \"digits\"\ndeadline_ms = 5000\nchain = [\"fm\"]\nmin_sgs = {sgs}\nmax_sgs = {sgs}\n"
        ),
        format!("[steer]\n{steer}\n"),
    ];
    config(dir, "udp = \"127.0.0.1:0\"", &parts)
}

pub fn input() -> Vec<u8> {
    let v: Vec<f32> = (0..784).map(|i| ((i * 37) % 255) as f32 / 255.0 - 0.3).collect();
    f32_bytes(&v)
}

pub fn health_steer(d: &TestDaemon) -> serde_json::Value {
    let h = d.client().control_json(Kind::Health, 0, b"").unwrap();
    h["steer"].clone()
}
