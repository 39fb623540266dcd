#![no_main]
//! See docs/fuzzing.md: run with `scripts/fuzz.sh` (bounded) or `cargo +nightly fuzz run TARGET`.
use butler_coordinator::commits::{check_checkpoint_name, parse_state};
use libfuzzer_sys::fuzz_target;

// Any text as `state.json`: an error, or a state whose checkpoints stay inside the run directory.
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(st) = parse_state(text) {
        for c in &st.commits {
            check_checkpoint_name(&c.checkpoint).unwrap();
            let p = std::path::Path::new("/run").join(&c.checkpoint);
            assert!(
                p.starts_with("/run/")
                    && !p
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir)),
                "{p:?}"
            );
            let _ = c.first_epoch_redone();
            let _ = c.point();
        }
    }
});
