//! Arbitrary bytes as one read from an offload TUN device (virtio-net header, then the
//! packet): the header is taken apart, a partial checksum completed and checked, the packet
//! classified (`flowshift::fuzzing::offload`). Seeds: `../corpus/offload/`, written and
//! replayed by `engine/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift::fuzzing::offload(data);
});
