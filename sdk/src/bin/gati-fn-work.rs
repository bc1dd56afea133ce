//! Example function: a fixed amount of real CPU work per request, for the
//! dispatch benchmark.
//!
//! argv[1]: the work in µs *as measured on an idle core* (default 1000).
//! At start the function calibrates how many FNV-1a rounds over a 4 KiB
//! buffer fit in that time (best of several short runs, so a busy start
//! does not shrink the work); each request then hashes that many rounds — the
//! same work whatever else runs, so contention shows up as longer
//! execution, as it would for a real function. Output: the input unchanged
//! (so functions chain); the hash is kept from being optimised away.

use std::hint::black_box;
use std::time::{Duration, Instant};

const BUF: usize = 4096;

fn main() {
    let us: u64 = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 1000,
        Some(Ok(us)) if us <= 10_000_000 => us,
        _ => {
            eprintln!("gati-fn-work: argv[1] must be the work in microseconds (<= 10 s)");
            std::process::exit(64);
        }
    };
    let buf: Vec<u8> = (0..BUF).map(|i| (i * 31 % 251) as u8).collect();
    let rounds = calibrate(&buf, Duration::from_micros(us));
    gati_sdk::serve(move |input: &[u8]| {
        black_box(work(&buf, rounds));
        Ok(input.to_vec())
    })
}

/// FNV-1a over `buf`, `rounds` times.
fn work(buf: &[u8], rounds: u64) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for _ in 0..rounds {
        for &b in black_box(buf) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// Rounds that take `target` on this core: the fastest of 5 timed runs of
/// 20 rounds each, scaled.
fn calibrate(buf: &[u8], target: Duration) -> u64 {
    const PROBE: u64 = 20;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            black_box(work(buf, PROBE));
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_micros(1))
        .max(Duration::from_nanos(1));
    ((target.as_secs_f64() / best.as_secs_f64()) * PROBE as f64).round().max(0.0) as u64
}
