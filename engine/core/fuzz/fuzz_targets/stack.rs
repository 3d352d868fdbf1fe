//! A sequence of packets (raw, checksummed by the harness, or TCP segments the harness wraps
//! and can point at a live connection) fed to a `Stack` on virtual time: nothing may panic,
//! every packet is counted, everything emitted is a valid packet
//! (`flowshift_core::fuzzing::StackHarness`). Seeds: `../corpus/stack/`, written and replayed
//! by `engine/core/tests/corpus.rs`.
//!
//! A stack costs far more to build than most inputs to run, so one serves 1,000 inputs;
//! each input ends with ten minutes of virtual time, which ends what it started. A crash
//! found this way reproduces from its input alone in most cases; if not, the inputs before it
//! are in the fuzzer's log.

#![no_main]

use std::cell::RefCell;

use flowshift_core::fuzzing::StackHarness;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static HARNESS: RefCell<(StackHarness, u32)> = RefCell::new((StackHarness::new(), 0));
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        if h.1 == 1_000 {
            *h = (StackHarness::new(), 0);
        }
        h.1 += 1;
        h.0.run(data);
    });
});
