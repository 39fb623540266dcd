#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_common::config::JobConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

// Any text as a job config: an error, or a config that validates.
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = JobConfig::from_toml(text, Path::new("job.toml")) {
        let _ = cfg.trajectory_fingerprint();
        let _ = cfg.to_toml();
    }
});
