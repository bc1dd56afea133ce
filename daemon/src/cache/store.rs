//! Cache state on disk: the active caches (with thresholds) and the training
//! window of one model, so a restart serves from warm caches at once.
//!
//! One file per model under `<state_dir>/caches/`, written to a temporary
//! file and renamed (a crash never leaves half a file). A file whose
//! fingerprint (model bytes, cuts, cache settings) does not match the model
//! being served is ignored with a warning, as is any file that does not parse:
//! a bad state file costs warm-up time, never the daemon.
//!
//! Layout (little endian): `GATICACH`, version u32, fingerprint u64, metadata
//! length u32 + JSON ([`Meta`]), rows u32, cuts u32, then per row: label u32,
//! weight f32 and per cut a length u32 + that many f32.

use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model_caches::Sample;
use super::Persisted;

const MAGIC: &[u8; 8] = b"GATICACH";
const VERSION: u32 = 4;
/// Largest feature vector accepted from a file.
const MAX_DIM: usize = 1 << 16;

/// What is saved besides the window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub generation: u64,
    pub budget_scale: f32,
    /// Per cut: the saved cache and its threshold; `None` for an inactive cut or
    /// a kind that is rebuilt from the window.
    pub cuts: Vec<Option<(Persisted, f32)>>,
}

/// Everything a model's caches persist.
pub struct State {
    pub meta: Meta,
    pub window: Vec<Sample>,
}

/// Why a state file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not a cache state file of this version")]
    Format(String),
    #[error("{0}: saved for another model or cache settings (fingerprint differs)")]
    Stale(String),
}

/// Writes `state` atomically to `path`.
pub fn save(path: &Path, fingerprint: u64, state: &State) -> Result<(), StoreError> {
    let io_err = |source| StoreError::Io { path: path.display().to_string(), source };
    let meta = serde_json::to_vec(&state.meta).map_err(|e| io_err(io::Error::other(e)))?;
    let cuts = state.window.first().map_or(0, |s| s.features.len());
    let mut buf = Vec::with_capacity(64 + meta.len() + state.window.len() * 64);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&fingerprint.to_le_bytes());
    buf.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    buf.extend_from_slice(&meta);
    let rows: Vec<&Sample> = state.window.iter().filter(|s| s.features.len() == cuts).collect();
    buf.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(cuts as u32).to_le_bytes());
    for s in rows {
        buf.extend_from_slice(&s.label.to_le_bytes());
        buf.extend_from_slice(&s.weight.to_le_bytes());
        for f in &s.features {
            buf.extend_from_slice(&(f.len() as u32).to_le_bytes());
            f.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    // A temporary file per writing thread: the trainer saves after a training
    // and the node saves at shutdown. Two writers of one temporary file
    // interleave their bytes and the rename installs the mix — a file that
    // fails to load, so the restarted node starts cold (seen under CPU
    // contention, when the trainer's save was still running at
    // SIGTERM). Each rename installs a whole file; the last one wins. (No lock:
    // the shutdown must not wait on a trainer that a busy machine slows.)
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    let tmp = path.with_extension(format!("tmp.{tid}"));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&buf).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // A full or read-only disk must not leave a partial file behind: the
        // previous state (if any) stays as it was.
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok(())
}

/// Removes temporary files that saves into `path` left behind (a node killed
/// mid-save); called before the node's first save, when no save is running.
pub fn remove_stale_temporaries(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else { return };
    let prefix = format!("{stem}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Reads the state at `path` if it was saved with `fingerprint`; `Ok(None)` when there is no file.
pub fn load(path: &Path, fingerprint: u64) -> Result<Option<State>, StoreError> {
    read(path, Some(fingerprint))
}

/// Reads the state at `path` whatever model and settings it was saved for
/// (offline replays of a recorded window); `Ok(None)` when there is no file.
pub fn load_any(path: &Path) -> Result<Option<State>, StoreError> {
    read(path, None)
}

fn read(path: &Path, fingerprint: Option<u64>) -> Result<Option<State>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path: path.display().to_string(), source }),
    };
    let name = path.display().to_string();
    let bad = || StoreError::Format(name.clone());
    let mut r = Reader { bytes: &bytes, at: 0 };
    if r.take(8).ok_or_else(bad)? != MAGIC || r.u32().ok_or_else(bad)? != VERSION {
        return Err(bad());
    }
    let saved = r.u64().ok_or_else(bad)?;
    if fingerprint.is_some_and(|f| f != saved) {
        return Err(StoreError::Stale(name));
    }
    let meta_len = r.u32().ok_or_else(bad)? as usize;
    let meta: Meta = serde_json::from_slice(r.take(meta_len).ok_or_else(bad)?).map_err(|_| bad())?;
    let (rows, cuts) = (r.u32().ok_or_else(bad)? as usize, r.u32().ok_or_else(bad)? as usize);
    if cuts > 64 {
        return Err(bad());
    }
    let mut window = Vec::with_capacity(rows.min(1 << 20));
    for _ in 0..rows {
        let label = r.u32().ok_or_else(bad)?;
        let weight = f32::from_bits(r.u32().ok_or_else(bad)?);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(bad());
        }
        let mut features = Vec::with_capacity(cuts);
        for _ in 0..cuts {
            let dim = r.u32().ok_or_else(bad)? as usize;
            if dim > MAX_DIM {
                return Err(bad());
            }
            let raw = r.take(dim * 4).ok_or_else(bad)?;
            features.push(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
        window.push(Sample { features, label, weight });
    }
    if r.at != bytes.len() {
        return Err(bad());
    }
    Ok(Some(State { meta, window }))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
}

/// FNV-1a over `parts`: the fingerprint of a model's bytes and cache settings.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::learned::{LearnedCache, LearnedParams};
    use crate::cache::{CutCache, Samples};

    #[test]
    fn a_failed_save_leaves_no_partial_file_and_the_old_state_in_place() {
        let dir = std::env::temp_dir().join(format!("gati-store-fail-{}", std::process::id()));
        // The state path is a non-empty directory: the final rename fails after the write.
        let path = dir.join("m.bin");
        std::fs::create_dir_all(path.join("occupied")).unwrap();
        let state = State { meta: Meta { generation: 1, budget_scale: 0.5, cuts: vec![None] }, window: vec![] };
        assert!(save(&path, 7, &state).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("m.bin")], "the partial file is removed");
        std::fs::write(dir.join("m.tmp.123"), b"half a file").unwrap();
        remove_stale_temporaries(&path);
        assert!(!dir.join("m.tmp.123").exists(), "a killed node's partial file is removed at start");
        assert!(path.join("occupied").exists(), "what was there stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The trainer and the shutdown may save at once: every file a save
    /// installs is whole (one writer's state), whoever renames last.
    #[test]
    fn concurrent_saves_never_install_a_mixed_file() {
        let dir = std::env::temp_dir().join(format!("gati-store-race-{}", std::process::id()));
        let path = dir.join("m.bin");
        let state = |label: u32| State {
            meta: Meta { generation: u64::from(label), budget_scale: 0.5, cuts: vec![None] },
            window: (0..2000)
                .map(|i| Sample { features: vec![vec![i as f32; 16]], label: label + (i % 2), weight: 1.0 })
                .collect(),
        };
        std::thread::scope(|s| {
            for label in [10, 20] {
                let (path, st) = (&path, state(label));
                s.spawn(move || {
                    for _ in 0..40 {
                        save(path, 7, &st).unwrap();
                        let got = load(path, 7).expect("a whole file").expect("present");
                        assert!([10, 20].contains(&got.meta.generation));
                        let first = u64::from(got.window[0].label);
                        assert_eq!(first, got.meta.generation, "window and meta from one save");
                    }
                });
            }
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip_and_every_bad_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("gati-store-{}", std::process::id()));
        let path = dir.join("caches/m.bin");
        let x: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
        let y: Vec<u32> = (0..16).map(|i| i % 2).collect();
        let cache = LearnedCache::fit(
            &Samples { features: &x, dim: 4, labels: &y, classes: 2, prior: false },
            &LearnedParams::default(),
        );
        // And one with a learned selector, as the trainer builds it.
        let gx: Vec<f32> = (0..256).map(|i| ((i * 37) % 11) as f32).collect();
        let gy: Vec<u32> = (0..64).map(|i| u32::from((i * 37) % 11 > 5)).collect();
        let config = crate::cache::train::tests::config(
            crate::config::CacheKind::Learned,
            crate::config::CacheSelector::Learned,
        );
        let gated = crate::cache::train::candidates(&config, 1, &gx, 4, &gy, 2, false)
            .iter()
            .filter_map(|c| c.cache.persist())
            .map(|Persisted::Learned(c)| c)
            .find(|c| c.gate().is_some_and(|g| g.reads() > crate::cache::selector::OUTPUT_INPUTS))
            .expect("a candidate with a learned selector reading the features");
        let window: Vec<Sample> = (0..16)
            .map(|i| Sample { features: vec![x[i * 4..i * 4 + 4].to_vec(), vec![]], label: y[i], weight: 1.0 })
            .collect();
        let state = State {
            meta: Meta {
                generation: 7,
                budget_scale: 0.5,
                cuts: vec![
                    Some((Persisted::Learned(cache.clone()), 0.9)),
                    None,
                    Some((Persisted::Learned(gated.clone()), 0.7)),
                ],
            },
            window,
        };
        save(&path, 42, &state).unwrap();
        let back = load(&path, 42).unwrap().unwrap();
        assert_eq!(back.meta.generation, 7);
        assert_eq!(back.window.len(), 16);
        assert_eq!(back.window[3].features, state.window[3].features);
        let Some((Persisted::Learned(c), t)) = &back.meta.cuts[0] else { panic!("cut 0 lost") };
        assert_eq!(*t, 0.9);
        assert_eq!(c.predict(&x, 4), cache.predict(&x, 4));
        let Some((Persisted::Learned(g), _)) = &back.meta.cuts[2] else { panic!("cut 2 lost") };
        assert_eq!(g, &gated, "the selector comes back with its predictor");
        assert_eq!(g.predict(&gx, 4), gated.predict(&gx, 4));
        assert!(matches!(load(&path, 43), Err(StoreError::Stale(_))));
        assert_eq!(load_any(&path).unwrap().unwrap().window.len(), 16, "a replay reads any fingerprint");
        assert!(load(&dir.join("none.bin"), 42).unwrap().is_none());
        // Truncated, extended and garbage files: refused, never a panic.
        let bytes = std::fs::read(&path).unwrap();
        for bad in [&bytes[..bytes.len() - 3], &[bytes.as_slice(), &[0]].concat()[..], b"GATICACHxxxx"] {
            std::fs::write(&path, bad).unwrap();
            assert!(matches!(load(&path, 42), Err(StoreError::Format(_))));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
