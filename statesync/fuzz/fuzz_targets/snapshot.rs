//! Arbitrary bytes into `ConnSnapshot::decode`. Nothing may panic, and whatever decodes must
//! re-encode to an equal snapshot. Seeds: `../corpus/snapshot/` (replayed by the crate's
//! tests; rewritten by `FLOWSHIFT_WRITE_CORPUS=1 cargo test -p flowshift-statesync --test
//! corpus`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift_statesync::fuzzing::snapshot(data);
});
