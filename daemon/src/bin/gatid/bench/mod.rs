//! Benchmarks: commands that measure the daemon against a baseline in the same
//! run, print a table and write JSON under `bench/results/`.

pub mod auction;
pub mod bound;
mod cache_streams;
pub mod caches;
pub mod dispatch;
pub mod gpu;
pub mod harness;
pub mod loadgen;
pub mod plot;
pub mod selector;
pub mod serving;
pub mod soak;
pub mod steer;
mod trainer_p99;
