//! Arbitrary bytes as an app snapshot of every kind: whatever restores must snapshot and
//! restore again to the same bytes and serve traffic (`flowshift_core::fuzzing::restore`).
//! Seeds: `../corpus/restore/`, written and replayed by `engine/core/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift_core::fuzzing::restore(data);
});
