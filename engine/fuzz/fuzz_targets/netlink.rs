//! Arbitrary bytes as the kernel's answer to a route request: parsed for the acknowledgement
//! of request 1 (`flowshift::fuzzing::netlink_reply`). Seeds: `../corpus/netlink/`, written and
//! replayed by `engine/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift::fuzzing::netlink_reply(data);
});
