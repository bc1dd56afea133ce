//! `#[repr(C)]` mirrors of the map layouts fixed by `ebpf/steer.h`, and the
//! test that they agree with what the C compiler makes of the header (the
//! build script compiles and runs `ebpf/layout.c`, which prints them).

/// Most SGSs a node steers to (`STEER_MAX_SGS`); SGS i owns socket slot i.
pub const MAX_SGS: usize = 16;
/// Most routes one DAG may have in the kernel's map (`STEER_MAX_ROUTES`).
pub const MAX_ROUTES: usize = 8;
/// Socket slot of the I/O thread's socket (`STEER_DEFAULT_SLOT`).
pub const DEFAULT_SLOT: u32 = MAX_SGS as u32;
/// Slots of the socket map (`STEER_SOCK_SLOTS`).
pub const SOCK_SLOTS: u32 = DEFAULT_SLOT + 1;
/// Entries of the route map (`STEER_MAX_DAGS`).
pub const MAX_DAGS: u32 = 1024;
/// Bytes before the request header in the program's view of a UDP datagram
/// (`STEER_UDP_HDR_LEN`: its data starts at the UDP header).
pub const UDP_HDR_LEN: usize = 8;

/// Value of map `steer_routes` (`struct steer_routes`), key = DAG id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SteerRoutes {
    pub n: u32,
    pub pad: u32,
    pub sgs: [u32; MAX_ROUTES],
    pub weight: [u32; MAX_ROUTES],
}

// SAFETY: plain integers, no padding (72 bytes = 18 × u32), any bit pattern is valid.
unsafe impl aya::Pod for SteerRoutes {}

/// Header offset of the socket cookie the kernel writes into a steered Unix
/// frame (`STEER_OFF_STAMP`: the request header's `reserved` bytes).
pub const OFF_STAMP: usize = 56;
/// Most accepted Unix connections in the kernel's maps (`STEER_MAX_CONNS`).
pub const MAX_CONNS: u32 = 4096;

/// Value of map `steer_unix_state` (`struct steer_conn`), key = socket cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SteerConn {
    /// Bytes of a passed frame still to come.
    pub remaining: u32,
    /// 1: frame boundaries no longer known, everything passes.
    pub lost: u32,
}

// SAFETY: two u32, no padding, any bit pattern is valid.
unsafe impl aya::Pod for SteerConn {}

/// Index of map `steer_counters` (`enum steer_counter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// An InvokeDag selected its SGS's socket.
    Steered = 0,
    /// An InvokeDag for an unknown DAG or an empty slot went to the default socket.
    Fallback = 1,
    /// A well-formed header of another kind went to the default socket.
    Other = 2,
    /// Shorter than a header, or bad magic/version: the default socket.
    Malformed = 3,
    /// No socket could be selected (the kernel's hash chose).
    Dropped = 4,
}

impl Counter {
    pub const ALL: [Counter; 5] = [Self::Steered, Self::Fallback, Self::Other, Self::Malformed, Self::Dropped];

    /// The metric label / JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Steered => "steered",
            Self::Fallback => "fallback",
            Self::Other => "other",
            Self::Malformed => "malformed",
            Self::Dropped => "dropped",
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(gati_steer_layout)]
    #[test]
    fn rust_mirrors_agree_with_steer_h() {
        use std::mem::{offset_of, size_of};

        use super::*;
        use crate::api::wire::{Kind, RequestHeader, HEADER_LEN, MAGIC, VERSION};
        use crate::sched::route::SgsLoad;

        mod c {
            include!(concat!(env!("OUT_DIR"), "/steer_layout.rs"));
        }
        assert_eq!(c::STEER_MAX_SGS, MAX_SGS);
        assert_eq!(c::STEER_MAX_ROUTES, MAX_ROUTES);
        assert_eq!(c::STEER_DEFAULT_SLOT, DEFAULT_SLOT as usize);
        assert_eq!(c::STEER_SOCK_SLOTS, SOCK_SLOTS as usize);
        assert_eq!(c::STEER_MAX_DAGS, MAX_DAGS as usize);
        assert_eq!(c::SIZEOF_STEER_ROUTES, size_of::<SteerRoutes>());
        assert_eq!(c::OFFSETOF_STEER_ROUTES_N, offset_of!(SteerRoutes, n));
        assert_eq!(c::OFFSETOF_STEER_ROUTES_SGS, offset_of!(SteerRoutes, sgs));
        assert_eq!(c::OFFSETOF_STEER_ROUTES_WEIGHT, offset_of!(SteerRoutes, weight));
        assert_eq!(c::SIZEOF_STEER_LOAD, size_of::<SgsLoad>());
        assert_eq!(c::OFFSETOF_STEER_LOAD_QUEUED, offset_of!(SgsLoad, queued));
        assert_eq!(c::OFFSETOF_STEER_LOAD_IDLE, offset_of!(SgsLoad, idle));
        assert_eq!(c::STEER_COUNTERS, Counter::ALL.len());
        let counters = [c::STEER_STEERED, c::STEER_FALLBACK, c::STEER_OTHER, c::STEER_MALFORMED, c::STEER_DROPPED];
        for (k, want) in Counter::ALL.iter().zip(counters) {
            assert_eq!(*k as usize, want, "{k:?}");
        }
        // The header fields the program reads, against the wire format's own layout.
        assert_eq!(c::STEER_MAGIC, MAGIC as usize);
        assert_eq!(c::STEER_VERSION, usize::from(VERSION));
        assert_eq!(c::STEER_KIND_INVOKE_DAG, Kind::InvokeDag as usize);
        assert_eq!(c::STEER_HEADER_LEN, HEADER_LEN);
        assert_eq!(c::STEER_UDP_HDR_LEN, UDP_HDR_LEN);
        assert_eq!(c::STEER_OFF_MAGIC, offset_of!(RequestHeader, magic));
        assert_eq!(c::STEER_OFF_VERSION, offset_of!(RequestHeader, version));
        assert_eq!(c::STEER_OFF_KIND, offset_of!(RequestHeader, kind));
        assert_eq!(c::STEER_OFF_REQUEST_ID, offset_of!(RequestHeader, request_id));
        assert_eq!(c::STEER_OFF_TARGET_ID, offset_of!(RequestHeader, target_id));
        assert_eq!(c::STEER_OFF_PAYLOAD_LEN, offset_of!(RequestHeader, payload_len));
        assert_eq!(c::STEER_OFF_STAMP, offset_of!(RequestHeader, reserved));
        assert_eq!(c::STEER_OFF_STAMP, OFF_STAMP);
        assert_eq!(c::STEER_MAX_CONNS, MAX_CONNS as usize);
        assert_eq!(c::SIZEOF_STEER_CONN, size_of::<SteerConn>());
        assert_eq!(c::OFFSETOF_STEER_CONN_REMAINING, offset_of!(SteerConn, remaining));
        assert_eq!(c::OFFSETOF_STEER_CONN_LOST, offset_of!(SteerConn, lost));
    }

    #[cfg(not(gati_steer_layout))]
    #[test]
    #[ignore = "no host C compiler: ebpf/layout.c was not built"]
    fn rust_mirrors_agree_with_steer_h() {}
}
