//! The embedded steering program and its maps, loaded with aya: the only place
//! that makes BPF syscalls. [`Kernel::load`] loads `steer.bpf.o` once; the
//! route, socket and counter maps are then written and read through it, and
//! the load map is mapped into the daemon as a [`LoadBoard`].

use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, ReusePortSockArray, SockHash, SockMap};
use aya::programs::{SkReuseport, SkSkb};
use aya::Ebpf;

use super::layout::{Counter, SteerConn, SteerRoutes, MAX_ROUTES, MAX_SGS};
use super::SteerError;
use crate::sched::route::{LoadBoard, Route, SgsLoad};

/// The object the build script compiled (empty when it had no clang).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.bpf.o"));
/// `ok`, or why the build has no BPF object.
pub const BUILD: &str = env!("GATI_BPF_BUILD");
const PROGRAM: &str = "steer_udp";
const UNIX_PROGRAM: &str = "steer_unix";

/// Whether this build carries the program (else why not).
pub fn built() -> Result<(), SteerError> {
    if OBJECT.is_empty() {
        return Err(SteerError::Unavailable(BUILD.to_string()));
    }
    Ok(())
}

/// The loaded program and its maps.
pub struct Kernel {
    ebpf: Ebpf,
    routes: BpfHashMap<MapData, u32, SteerRoutes>,
    socks: ReusePortSockArray<MapData>,
    counters: PerCpuArray<MapData, u64>,
    load: Arc<LoadBoard>,
    /// The Unix stream verdict and its maps, or why the kernel refused them.
    unix: Result<UnixMaps, String>,
}

/// `steer_unix`'s maps (ebpf/steer.bpf.c): accepted connections (the verdict
/// is attached to this sockhash), the SGSs' sockets, per-connection state.
struct UnixMaps {
    conns: SockHash<MapData, u64>,
    sgs: SockMap<MapData>,
    state: BpfHashMap<MapData, u64, SteerConn>,
    counters: PerCpuArray<MapData, u64>,
}

impl Kernel {
    /// Loads the program into the kernel (root or CAP_BPF + CAP_NET_ADMIN).
    pub fn load() -> Result<Self, SteerError> {
        built()?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| SteerError::Load(Box::new(e)))?;
        let prog: &mut SkReuseport = ebpf
            .program_mut(PROGRAM)
            .ok_or(SteerError::Missing(PROGRAM))?
            .try_into()
            .map_err(|e| SteerError::Program(Box::new(e)))?;
        prog.load().map_err(|e| SteerError::Program(Box::new(e)))?;
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(SteerError::Missing(name));
        let routes = BpfHashMap::try_from(take("steer_routes")?).map_err(map_err)?;
        let socks = ReusePortSockArray::try_from(take("steer_socks")?).map_err(map_err)?;
        let counters = PerCpuArray::try_from(take("steer_counters")?).map_err(map_err)?;
        let load = match take("steer_load")? {
            aya::maps::Map::Array(data) => Arc::new(map_load(data)?),
            _ => return Err(SteerError::Missing("steer_load (an array)")),
        };
        let unix = load_unix(&mut ebpf).map_err(|e| super::chain(&e));
        if let Err(why) = &unix {
            tracing::warn!(why = %why, "the kernel refused the Unix stream verdict: Unix clients are steered in userspace");
        }
        Ok(Self { ebpf, routes, socks, counters, load, unix })
    }

    /// Whether the Unix stream verdict is loaded and attached (else why not).
    pub fn unix_ready(&self) -> Result<(), String> {
        self.unix.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    fn unix_maps(&mut self) -> Result<&mut UnixMaps, SteerError> {
        self.unix.as_mut().map_err(|why| SteerError::Unavailable(why.clone()))
    }

    /// Adds an accepted connection (its socket cookie `cookie`) to the verdict's
    /// sockhash, at a frame boundary.
    pub fn unix_adopt(&mut self, cookie: u64, socket: &impl AsRawFd) -> Result<(), SteerError> {
        let m = self.unix_maps()?;
        m.state.insert(cookie, SteerConn::default(), 0).map_err(map_err)?;
        if let Err(e) = m.conns.insert(cookie, socket.as_raw_fd(), 0) {
            let _ = m.state.remove(&cookie);
            return Err(map_err(e));
        }
        Ok(())
    }

    /// Makes the verdict pass everything on connection `cookie` from now on.
    pub fn unix_mark_lost(&mut self, cookie: u64) {
        if let Ok(m) = self.unix_maps() {
            let _ = m.state.insert(cookie, SteerConn { remaining: 0, lost: 1 }, 0);
        }
    }

    /// Forgets a connection (closing its socket removes it from the sockhash;
    /// this also removes its state).
    pub fn unix_forget(&mut self, cookie: u64) {
        if let Ok(m) = self.unix_maps() {
            let _ = m.conns.remove(&cookie);
            let _ = m.state.remove(&cookie);
        }
    }

    /// Puts SGS `slot`'s Unix socket where the verdict redirects its frames.
    pub fn unix_set_sgs(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<(), SteerError> {
        self.unix_maps()?.sgs.set(slot, socket, 0).map_err(map_err)
    }

    /// Empties SGS `slot`'s Unix slot (its frames then pass to the I/O thread).
    pub fn unix_clear_sgs(&mut self, slot: u32) {
        if let Ok(m) = self.unix_maps() {
            let _ = m.sgs.clear_index(&slot);
        }
    }

    /// The Unix verdict's counters summed over CPUs, in [`Counter::ALL`] order.
    pub fn unix_counters(&self) -> [u64; 5] {
        let mut out = [0; 5];
        if let Ok(m) = &self.unix {
            for (k, c) in Counter::ALL.iter().enumerate() {
                if let Ok(v) = m.counters.get(&(*c as u32), 0) {
                    out[k] = v.iter().sum();
                }
            }
        }
        out
    }

    /// `(run_time_ns, run_cnt)` of the Unix verdict (while stats are enabled).
    pub fn unix_run_stats(&self) -> Option<(u64, u64)> {
        let p: &SkSkb = self.ebpf.program(UNIX_PROGRAM)?.try_into().ok()?;
        let info = p.info().ok()?;
        Some((info.run_time().as_nanos() as u64, info.run_count()))
    }

    /// Makes the program the selector of `socket`'s `SO_REUSEPORT` group. It stays
    /// attached until every socket of the group is closed (dropping `Kernel` does not
    /// detach it).
    pub fn attach(&self, socket: impl AsFd) -> Result<(), SteerError> {
        self.program()?.attach(socket).map_err(|e| SteerError::Program(Box::new(e)))
    }

    fn program(&self) -> Result<&SkReuseport, SteerError> {
        self.ebpf
            .program(PROGRAM)
            .ok_or(SteerError::Missing(PROGRAM))?
            .try_into()
            .map_err(|e| SteerError::Program(Box::new(e)))
    }

    /// Puts `socket` in socket slot `slot` (an SGS index, or the default slot).
    pub fn set_socket(&mut self, slot: u32, socket: &impl AsRawFd) -> Result<(), SteerError> {
        self.socks.set(slot, socket, 0).map_err(map_err)
    }

    /// Empties socket slot `slot` (its datagrams then go to the default socket).
    pub fn clear_socket(&mut self, slot: u32) -> Result<(), SteerError> {
        match self.socks.clear_index(&slot) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Writes DAG `dag`'s routes (the first [`MAX_ROUTES`]); empty removes it.
    pub fn publish(&mut self, dag: u32, routes: &[Route]) -> Result<(), SteerError> {
        if routes.is_empty() {
            return match self.routes.remove(&dag) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(e)),
            };
        }
        let mut v = SteerRoutes::default();
        for (k, r) in routes.iter().take(MAX_ROUTES).enumerate() {
            v.sgs[k] = r.sgs as u32;
            v.weight[k] = r.weight;
        }
        v.n = routes.len().min(MAX_ROUTES) as u32;
        self.routes.insert(dag, v, 0).map_err(map_err)
    }

    /// DAG ids in the route map.
    pub fn dags(&self) -> Vec<u32> {
        self.routes.keys().filter_map(Result::ok).collect()
    }

    /// Each counter summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for (k, c) in Counter::ALL.iter().enumerate() {
            if let Ok(v) = self.counters.get(&(*c as u32), 0) {
                out[k] = v.iter().sum();
            }
        }
        out
    }

    /// The load map, as written by the SGSs and read by the program.
    pub fn load_board(&self) -> Arc<LoadBoard> {
        Arc::clone(&self.load)
    }

    /// `(run_time_ns, run_cnt)` of the program: counted only while some process
    /// holds `BPF_ENABLE_STATS` ([`enable_stats`]).
    pub fn run_stats(&self) -> Option<(u64, u64)> {
        let info = self.program().ok()?.info().ok()?;
        Some((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

/// Loads `steer_unix` and attaches it to its sockhash as the stream verdict.
fn load_unix(ebpf: &mut Ebpf) -> Result<UnixMaps, SteerError> {
    let mut take = |name: &'static str| ebpf.take_map(name).ok_or(SteerError::Missing(name));
    let conns = SockHash::try_from(take("steer_unix_conns")?).map_err(map_err)?;
    let sgs = SockMap::try_from(take("steer_unix_sgs")?).map_err(map_err)?;
    let state = BpfHashMap::try_from(take("steer_unix_state")?).map_err(map_err)?;
    let counters = PerCpuArray::try_from(take("steer_unix_counters")?).map_err(map_err)?;
    let prog: &mut SkSkb = ebpf
        .program_mut(UNIX_PROGRAM)
        .ok_or(SteerError::Missing(UNIX_PROGRAM))?
        .try_into()
        .map_err(|e| SteerError::Program(Box::new(e)))?;
    prog.load().map_err(|e| SteerError::Program(Box::new(e)))?;
    prog.attach(conns.fd()).map_err(|e| SteerError::Program(Box::new(e)))?;
    Ok(UnixMaps { conns, sgs, state, counters })
}

/// Turns on the kernel's run-time accounting of BPF programs while the fd lives.
pub fn enable_stats() -> Result<std::os::fd::OwnedFd, SteerError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| SteerError::Io { what: "BPF_ENABLE_STATS", source: std::io::Error::other(e.to_string()) })
}

fn map_err(e: aya::maps::MapError) -> SteerError {
    SteerError::Map(Box::new(e))
}

/// The mapping of the load array; unmapped when the board is dropped.
struct LoadMapping {
    addr: NonNull<libc::c_void>,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is only unmapped in Drop; the board accesses it through atomics.
unsafe impl Send for LoadMapping {}
// SAFETY: as for Send.
unsafe impl Sync for LoadMapping {}

impl Drop for LoadMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly what mmap returned; nothing borrows the
        // memory past the board that owns this mapping.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

/// Maps the `BPF_F_MMAPABLE` load array (`MAX_SGS` × 8-byte values, contiguous).
fn map_load(data: MapData) -> Result<LoadBoard, SteerError> {
    const _: () = assert!(size_of::<SgsLoad>() == 8, "array values are 8-byte strided");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let len = (MAX_SGS * size_of::<SgsLoad>()).next_multiple_of(page);
    let fd = data.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the map is
    // mmapable and the length fits, and zero-fills array values.
    let addr =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if addr == libc::MAP_FAILED {
        return Err(SteerError::Io { what: "mmap of steer_load", source: std::io::Error::last_os_error() });
    }
    let addr = NonNull::new(addr).ok_or(SteerError::Missing("steer_load mapping"))?;
    let base = addr.cast::<SgsLoad>();
    let mapping = LoadMapping { addr, len, _map: data };
    // SAFETY: the mapping holds MAX_SGS page-aligned, zeroed 8-byte values (valid
    // `SgsLoad`s); it lives as long as the board (it is the board's backing); the
    // kernel program only reads it, userspace only through atomics.
    Ok(unsafe { LoadBoard::from_raw(base, MAX_SGS, Box::new(mapping)) })
}
