//! `config`: the TOML config loader and every validation step, from text.
//!
//! Input: the bytes of a config file (non-UTF-8 inputs are skipped: the loader
//! reads the file with `read_to_string`, which refuses them before parsing).
//! Properties: `config::parse` never panics; a refused config names at least
//! one issue, each with a line inside the text; an accepted config holds the
//! ranges validation promises.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A base that does not exist: relative model and program paths never
    // resolve to real files, so the outcome does not depend on the machine.
    match gatid::config::parse(text, Path::new("/nonexistent/gati-fuzz")) {
        Err(issues) => {
            assert!(!issues.is_empty(), "a refused config names its problems");
            let lines = text.split('\n').count();
            for i in &issues {
                if let Some(l) = i.line {
                    assert!((1..=lines).contains(&l), "issue {i} points outside the {lines}-line text");
                }
                let _ = i.to_string();
            }
        }
        Ok(c) => {
            let s = &c.server;
            assert!((1..=64).contains(&s.io_threads));
            assert!((1024..=(1 << 30)).contains(&s.max_frame_bytes));
            assert!(s.max_inflight_per_conn >= 1 && s.max_connections >= 1);
            assert!(s.socket_mode_bits() <= 0o777);
            for m in &c.models {
                assert!((1..=4096).contains(&m.max_batch));
                assert!((1..=8192).contains(&m.input.height) && (1..=8192).contains(&m.input.width));
                assert!((1..=4).contains(&m.input.channels));
                assert!(m.input.scale.is_finite() && m.input.scale != 0.0);
                assert!(m.input.mean.iter().all(|v| v.is_finite()));
                assert!(m.input.std.iter().all(|v| v.is_finite() && *v != 0.0));
            }
            for d in &c.dags {
                assert!(d.deadline_ms.is_finite() && d.deadline_ms > 0.0);
                let _ = d.deadline();
                let (nodes, _) = d.graph_parts();
                assert!(!nodes.is_empty());
            }
        }
    }
});
