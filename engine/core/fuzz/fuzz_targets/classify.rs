//! Arbitrary bytes as a packet read from the TUN device, classified with and without checksum
//! verification: an accepted packet's fields must be those of the input
//! (`flowshift_core::fuzzing::classify`). Seeds: `../corpus/classify/`, written and replayed
//! by `engine/core/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift_core::fuzzing::classify(data);
});
