//! Arbitrary bytes as what a client writes on the control socket: the line loop and the JSON
//! request parser, checked against a model of the framing and across read-buffer sizes
//! (`flowshift::fuzzing::control`). Seeds: `../corpus/control/`, written and replayed by
//! `engine/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift::fuzzing::control(data);
});
