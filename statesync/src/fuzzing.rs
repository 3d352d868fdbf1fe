//! Harnesses shared by the fuzz targets (`statesync/fuzz`) and the tests that replay their
//! corpora and run them over seeded random inputs, so that CI exercises exactly what the
//! fuzzer runs. Not a public API.

use crate::snapshot::ConnSnapshot;

/// Decodes `data` as a snapshot. Whatever decodes must re-encode to an equal snapshot of
/// [`ConnSnapshot::encoded_len`] bytes. Returns whether `data` decoded.
///
/// # Panics
/// When the round trip fails: a bug in the codec.
pub fn snapshot(data: &[u8]) -> bool {
    let Ok(snap) = ConnSnapshot::decode(data) else {
        return false;
    };
    let bytes = snap.to_bytes();
    assert_eq!(bytes.len(), snap.encoded_len(), "encoded_len is exact");
    let again = ConnSnapshot::decode(&bytes).expect("a decoded snapshot re-encodes validly");
    assert_eq!(again, snap, "snapshot round trip");
    true
}
