//! Arbitrary bytes into `Message::decode` and, when they decode, into a live Source and
//! Target with migrations under way (`fuzzing::MessageHarness`). Nothing may panic, and
//! whatever decodes must re-encode to an equal message. Seeds: `../corpus/message/`
//! (replayed by the crate's tests; rewritten by `FLOWSHIFT_WRITE_CORPUS=1 cargo test -p
//! flowshift-statesync --test corpus`).

#![no_main]

use std::cell::RefCell;

use flowshift_statesync::fuzzing::MessageHarness;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static HARNESS: RefCell<MessageHarness> = RefCell::new(MessageHarness::new());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        h.borrow_mut().run(data);
    });
});
