//! Arbitrary record plaintexts, sealed by an authenticated peer and handed to a live
//! endpoint: frame handling, the reliable channel and ACK processing under a broken or
//! malicious peer. Nothing may panic. Seeds: `../corpus/record/` (replayed by the crate's
//! unit tests, which run the same harness).

#![no_main]

use std::cell::RefCell;

use flowshift_tunnel::fuzzing::RecordHarness;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static HARNESS: RefCell<RecordHarness> = RefCell::new(RecordHarness::new());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| h.borrow_mut().run(data));
});
