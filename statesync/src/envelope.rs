//! The typed, versioned header of every datagram and message between nodes.
//!
//! The tunnel moves opaque payloads; this header says what a payload is and which flow it
//! belongs to, so that one tunnel carries forwarded client packets, the owner's replies,
//! the migration protocol and the diagnostic test stream side by side.
//!
//! ```text
//! 0        1        2                                              10
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! | version|  kind  |                   flow_id (u64, little-endian)                        |
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! | payload ...
//! ```
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0 | version | [`ENVELOPE_VERSION`] (1); a receiver drops any other |
//! | 1 | kind | [`EnvelopeKind`] code, table below |
//! | 2..10 | flow_id | little-endian `u64`; meaning depends on the kind |
//! | 10.. | payload | the rest of the datagram or message |
//!
//! | kind | code | channel | payload | `flow_id` |
//! |---|---|---|---|---|
//! | [`ToOwner`](EnvelopeKind::ToOwner) | 1 | datagram | a client IPv4 packet, forwarded by the ingress node to the node that owns the flow | the owner's flow id |
//! | [`ToIngress`](EnvelopeKind::ToIngress) | 2 | datagram | an IPv4 packet for the client, sent by the owner through the ingress node | the ingress node's flow id |
//! | [`Migration`](EnvelopeKind::Migration) | 3 | reliable | one [`protocol::Message`](crate::protocol::Message) | 0 |
//! | [`Diagnostic`](EnvelopeKind::Diagnostic) | 4 | either | the tunnel's diagnostic test stream | 0 |
//!
//! Following the `smoltcp::wire` pattern, [`Envelope`] is a zero-copy view whose
//! [`new_checked`](Envelope::new_checked) validates the length and the version once, after
//! which no accessor panics; [`EnvelopeRepr`] is the parsed header, which
//! [`parse`](EnvelopeRepr::parse) also checks for a known kind and a zero flow id where the
//! kind requires one, and which [`emit`](EnvelopeRepr::emit)s back.
//!
//! A new kind is a new code (old receivers see [`EnvelopeKind::Unknown`] and drop it); a
//! change of the header layout bumps [`ENVELOPE_VERSION`].

use core::fmt;

/// The envelope version this crate speaks (the first byte).
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the envelope header.
pub const HEADER_LEN: usize = 10;

mod field {
    pub(super) const VERSION: usize = 0;
    pub(super) const KIND: usize = 1;
    pub(super) const FLOW_ID: core::ops::Range<usize> = 2..10;
    pub(super) const PAYLOAD: core::ops::RangeFrom<usize> = 10..;
}

/// What an envelope carries (its second byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnvelopeKind {
    /// The tunnel's diagnostic test stream (code 4); flow id 0.
    Diagnostic,
    /// A migration protocol message on the reliable channel (code 3); flow id 0.
    Migration,
    /// A packet from the owner of a flow to its client, through the ingress node (code 2);
    /// flow id: the ingress node's.
    ToIngress,
    /// A client packet forwarded from the ingress node to the flow's owner (code 1); flow
    /// id: the owner's.
    ToOwner,
    /// Any other code.
    Unknown(u8),
}

impl From<u8> for EnvelopeKind {
    fn from(v: u8) -> EnvelopeKind {
        match v {
            1 => EnvelopeKind::ToOwner,
            2 => EnvelopeKind::ToIngress,
            3 => EnvelopeKind::Migration,
            4 => EnvelopeKind::Diagnostic,
            other => EnvelopeKind::Unknown(other),
        }
    }
}

impl From<EnvelopeKind> for u8 {
    fn from(k: EnvelopeKind) -> u8 {
        match k {
            EnvelopeKind::ToOwner => 1,
            EnvelopeKind::ToIngress => 2,
            EnvelopeKind::Migration => 3,
            EnvelopeKind::Diagnostic => 4,
            EnvelopeKind::Unknown(other) => other,
        }
    }
}

impl EnvelopeKind {
    /// Whether envelopes of this kind name a flow (a non-zero `flow_id` is allowed).
    pub const fn has_flow(self) -> bool {
        matches!(self, EnvelopeKind::ToOwner | EnvelopeKind::ToIngress)
    }
}

impl fmt::Display for EnvelopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeKind::Diagnostic => f.write_str("diagnostic"),
            EnvelopeKind::Migration => f.write_str("migration"),
            EnvelopeKind::ToIngress => f.write_str("to-ingress"),
            EnvelopeKind::ToOwner => f.write_str("to-owner"),
            EnvelopeKind::Unknown(k) => write!(f, "unknown kind {k}"),
        }
    }
}

/// Why bytes are not a usable envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// A kind without a flow carried a non-zero flow id.
    #[error("{kind} envelope with non-zero flow id {flow_id}")]
    FlowId {
        /// The kind.
        kind: EnvelopeKind,
        /// The flow id it carried.
        flow_id: u64,
    },
    /// Shorter than [`HEADER_LEN`].
    #[error("envelope of {0} bytes is shorter than its header")]
    Truncated(usize),
    /// A kind this version does not know.
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    /// A version this crate does not speak.
    #[error("unsupported envelope version {0}")]
    Version(u8),
}

/// A view of an envelope: header then payload.
#[derive(Debug, Clone)]
pub struct Envelope<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Envelope<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Envelope<T> {
        Envelope { buffer }
    }

    /// Wraps a buffer after checking its length and version; no accessor panics then.
    pub fn new_checked(buffer: T) -> Result<Envelope<T>, EnvelopeError> {
        let e = Envelope::new_unchecked(buffer);
        e.check()?;
        Ok(e)
    }

    /// Checks that the buffer holds a header of version [`ENVELOPE_VERSION`].
    pub fn check(&self) -> Result<(), EnvelopeError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(EnvelopeError::Truncated(b.len()));
        }
        match b[field::VERSION] {
            ENVELOPE_VERSION => Ok(()),
            v => Err(EnvelopeError::Version(v)),
        }
    }

    /// Consumes the view, returning the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The version byte.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// The kind.
    pub fn kind(&self) -> EnvelopeKind {
        EnvelopeKind::from(self.buffer.as_ref()[field::KIND])
    }

    /// The flow id.
    pub fn flow_id(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buffer.as_ref()[field::FLOW_ID]);
        u64::from_le_bytes(b)
    }

    /// Everything after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Envelope<T> {
    /// Sets the version byte.
    pub fn set_version(&mut self, v: u8) {
        self.buffer.as_mut()[field::VERSION] = v;
    }

    /// Sets the kind.
    pub fn set_kind(&mut self, kind: EnvelopeKind) {
        self.buffer.as_mut()[field::KIND] = kind.into();
    }

    /// Sets the flow id (an ingress node relaying a packet rewrites it in place).
    pub fn set_flow_id(&mut self, flow_id: u64) {
        self.buffer.as_mut()[field::FLOW_ID].copy_from_slice(&flow_id.to_le_bytes());
    }

    /// The payload, mutably (for in-place packet rewriting).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

/// The parsed header of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnvelopeRepr {
    /// What the payload is; never [`EnvelopeKind::Unknown`] after
    /// [`parse`](Self::parse).
    pub kind: EnvelopeKind,
    /// The flow, for kinds that have one ([`EnvelopeKind::has_flow`]); 0 otherwise.
    pub flow_id: u64,
}

impl EnvelopeRepr {
    /// Length of the header [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// A migration protocol envelope.
    pub const MIGRATION: EnvelopeRepr = EnvelopeRepr {
        kind: EnvelopeKind::Migration,
        flow_id: 0,
    };

    /// A diagnostic stream envelope.
    pub const DIAGNOSTIC: EnvelopeRepr = EnvelopeRepr {
        kind: EnvelopeKind::Diagnostic,
        flow_id: 0,
    };

    /// Parses a checked view: the kind must be known, and kinds without a flow must carry
    /// flow id 0.
    pub fn parse<T: AsRef<[u8]>>(e: &Envelope<T>) -> Result<EnvelopeRepr, EnvelopeError> {
        e.check()?;
        let kind = e.kind();
        if let EnvelopeKind::Unknown(k) = kind {
            return Err(EnvelopeError::UnknownKind(k));
        }
        let flow_id = e.flow_id();
        if !kind.has_flow() && flow_id != 0 {
            return Err(EnvelopeError::FlowId { kind, flow_id });
        }
        Ok(EnvelopeRepr { kind, flow_id })
    }

    /// Checks and parses the header at the start of `bytes`, returning it and the payload.
    pub fn split(bytes: &[u8]) -> Result<(EnvelopeRepr, &[u8]), EnvelopeError> {
        let e = Envelope::new_checked(bytes)?;
        let repr = EnvelopeRepr::parse(&e)?;
        Ok((repr, &bytes[HEADER_LEN..]))
    }

    /// Length of an envelope with `payload_len` payload bytes.
    pub const fn buffer_len(payload_len: usize) -> usize {
        HEADER_LEN + payload_len
    }

    /// Writes version, kind and flow id into the first [`HEADER_LEN`] bytes of `buf`.
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, buf: &mut [u8]) {
        let mut e = Envelope::new_unchecked(&mut buf[..HEADER_LEN]);
        e.set_version(ENVELOPE_VERSION);
        e.set_kind(self.kind);
        e.set_flow_id(self.flow_id);
    }

    /// The header as bytes.
    pub fn to_header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        self.emit(&mut h);
        h
    }

    /// Appends header and `payload` to `out` (which may already hold other bytes).
    pub fn encapsulate(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.to_header());
        out.extend_from_slice(payload);
    }

    /// A new vector holding header and `payload`.
    pub fn to_vec(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        self.encapsulate(payload, &mut out);
        out
    }
}

impl fmt::Display for EnvelopeRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.has_flow() {
            write!(f, "{} flow {}", self.kind, self.flow_id)
        } else {
            write!(f, "{}", self.kind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static PACKET_BYTES: [u8; 14] = [
        0x01, // version
        0x01, // ToOwner
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // flow id 0x0102030405060708
        0x45, 0x00, 0x00, 0x14, // payload (the start of an IPv4 header)
    ];

    static PAYLOAD_BYTES: [u8; 4] = [0x45, 0x00, 0x00, 0x14];

    #[test]
    fn test_deconstruct() {
        let e = Envelope::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(e.version(), 1);
        assert_eq!(e.kind(), EnvelopeKind::ToOwner);
        assert_eq!(e.flow_id(), 0x0102_0304_0506_0708);
        assert_eq!(e.payload(), &PAYLOAD_BYTES[..]);
    }

    #[test]
    fn test_construct() {
        let mut bytes = vec![0xa5; 14];
        let mut e = Envelope::new_unchecked(&mut bytes);
        e.set_version(1);
        e.set_kind(EnvelopeKind::ToOwner);
        e.set_flow_id(0x0102_0304_0506_0708);
        e.payload_mut().copy_from_slice(&PAYLOAD_BYTES[..]);
        assert_eq!(&bytes[..], &PACKET_BYTES[..]);
    }

    fn packet_repr() -> EnvelopeRepr {
        EnvelopeRepr {
            kind: EnvelopeKind::ToOwner,
            flow_id: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn test_parse() {
        let e = Envelope::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(EnvelopeRepr::parse(&e), Ok(packet_repr()));
        assert_eq!(
            EnvelopeRepr::split(&PACKET_BYTES),
            Ok((packet_repr(), &PAYLOAD_BYTES[..]))
        );
    }

    #[test]
    fn test_emit() {
        let repr = packet_repr();
        let mut bytes = vec![0xa5; EnvelopeRepr::buffer_len(PAYLOAD_BYTES.len())];
        repr.emit(&mut bytes);
        bytes[HEADER_LEN..].copy_from_slice(&PAYLOAD_BYTES);
        assert_eq!(&bytes[..], &PACKET_BYTES[..]);
        assert_eq!(repr.to_vec(&PAYLOAD_BYTES), PACKET_BYTES);
        let mut out = vec![9];
        repr.encapsulate(&PAYLOAD_BYTES, &mut out);
        assert_eq!(&out[1..], &PACKET_BYTES[..]);
        assert_eq!(repr.to_string(), "to-owner flow 72623859790382856");
    }

    #[test]
    #[should_panic]
    fn test_emit_short_buffer_panics() {
        packet_repr().emit(&mut [0u8; HEADER_LEN - 1]);
    }

    #[test]
    fn test_header_only() {
        let h = EnvelopeRepr::MIGRATION.to_header();
        assert_eq!(h, [1, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
        let (repr, payload) = EnvelopeRepr::split(&h).unwrap();
        assert_eq!(repr, EnvelopeRepr::MIGRATION);
        assert!(payload.is_empty());
        assert_eq!(EnvelopeRepr::DIAGNOSTIC.to_string(), "diagnostic");
    }

    #[test]
    fn test_truncated() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Envelope::new_checked(&PACKET_BYTES[..len]).unwrap_err(),
                EnvelopeError::Truncated(len)
            );
        }
    }

    #[test]
    fn test_wrong_version() {
        let mut bytes = PACKET_BYTES;
        bytes[0] = 2;
        assert_eq!(
            Envelope::new_checked(&bytes[..]).unwrap_err(),
            EnvelopeError::Version(2)
        );
        bytes[0] = 0;
        assert_eq!(
            EnvelopeRepr::split(&bytes).unwrap_err(),
            EnvelopeError::Version(0)
        );
    }

    #[test]
    fn test_unknown_kind() {
        let mut bytes = PACKET_BYTES;
        bytes[1] = 9;
        let e = Envelope::new_checked(&bytes[..]).unwrap();
        assert_eq!(e.kind(), EnvelopeKind::Unknown(9));
        assert_eq!(EnvelopeRepr::parse(&e), Err(EnvelopeError::UnknownKind(9)));
        for k in 0..=255u8 {
            assert_eq!(u8::from(EnvelopeKind::from(k)), k);
        }
    }

    #[test]
    fn test_flow_id_where_none_belongs() {
        let mut bytes = PACKET_BYTES;
        bytes[1] = 3; // Migration
        assert_eq!(
            EnvelopeRepr::split(&bytes),
            Err(EnvelopeError::FlowId {
                kind: EnvelopeKind::Migration,
                flow_id: 0x0102_0304_0506_0708
            })
        );
    }

    #[test]
    fn test_random_bytes_never_panic() {
        use rand_chacha::ChaCha8Rng;
        use rand_core::{RngCore, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut buf = [0u8; 32];
        for _ in 0..10_000 {
            let len = (rng.next_u32() as usize) % buf.len();
            rng.fill_bytes(&mut buf[..len]);
            if len >= 2 && rng.next_u32() % 4 != 0 {
                // Plausible headers, so that parse runs too.
                buf[0] = ENVELOPE_VERSION;
                buf[1] %= 6;
                if rng.next_u32() % 2 == 0 {
                    buf[2..len.min(HEADER_LEN)].fill(0);
                }
            }
            if let Ok(e) = Envelope::new_checked(&buf[..len]) {
                let _ = (e.kind(), e.flow_id(), e.payload());
                if let Ok(r) = EnvelopeRepr::parse(&e) {
                    assert_eq!(r.to_vec(e.payload()), &buf[..len]);
                }
            }
        }
    }
}
