//! A request stream into the HTTP app, whole and split at arbitrary points (with snapshot and
//! restore at the splits): the responses must not depend on the split, and every state the
//! app reaches must pass its restore checks (`flowshift_core::fuzzing::http`). Seeds:
//! `../corpus/http/`, written and replayed by `engine/core/tests/corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flowshift_core::fuzzing::http(data);
});
