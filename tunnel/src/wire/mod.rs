//! Wire formats: typed, zero-copy views over byte buffers.
//!
//! Follows the `smoltcp::wire` pattern. Each packet type has a view `Foo<T: AsRef<[u8]>>`
//! whose `new_checked` validates the length once, after which no accessor panics, and a
//! `FooRepr` that is parsed from a checked view (validating the version and type) and
//! emitted back into one. `Repr::emit` never panics on a buffer of `Repr::buffer_len()`
//! bytes. Frames inside a decrypted record are decoded by [`frame::Frames`], an iterator
//! that yields an error, then stops, on malformed input.
//!
//! Every datagram starts with the same 4 bytes:
//!
//! ```text
//! 0        1        2                 4
//! +--------+--------+--------+--------+
//! | version|  type  |    reserved     |
//! +--------+--------+--------+--------+
//! ```
//!
//! `version` is [`PROTOCOL_VERSION`]; a receiver drops (and counts) any other. `reserved`
//! is sent as zero and ignored (data packets authenticate it as associated data).
//! Multi-byte integers in headers are little-endian (as in WireGuard); integers inside
//! frames are QUIC variable-length integers ([`coding`]).
//!
//! # Fuzzing
//! `fuzz/fuzz_targets/decode.rs` feeds arbitrary bytes to every parser here; the unit test
//! `tests::fuzz_corpus_replay` replays the committed corpus.

pub mod coding;
pub mod cookie;
pub mod data;
pub mod frame;
pub mod handshake;

pub use cookie::{COOKIE_REPLY_LEN, CookieReply, CookieReplyRepr};
pub use data::{DATA_HEADER_LEN, DataPacket, DataRepr};
pub use frame::{AckFrame, Frame, FrameType, Frames};
pub use handshake::{
    HANDSHAKE_INIT_LEN, HANDSHAKE_RESPONSE_LEN, HandshakeInit, HandshakeInitRepr,
    HandshakeResponse, HandshakeResponseRepr, MAC_LEN,
};

/// The wire-format version this crate speaks (2: `mac2` in initiations, cookie replies).
pub const PROTOCOL_VERSION: u8 = 2;
/// Length of the common header.
pub const HEADER_LEN: usize = 4;

/// A byte range inside a packet.
pub(crate) type Field = core::ops::Range<usize>;

mod field {
    use super::Field;
    pub(super) const VERSION: usize = 0;
    pub(super) const TYPE: usize = 1;
    pub(super) const RESERVED: Field = 2..4;
}

/// Why bytes could not be decoded or encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer is too small to emit into.
    #[error("buffer too small")]
    BufferTooSmall,
    /// Inconsistent field values (for example an ACK range below zero).
    #[error("malformed field")]
    Malformed,
    /// Wrong length for this message type.
    #[error("wrong length for message type")]
    Length,
    /// The input ended in the middle of a field.
    #[error("truncated input")]
    Truncated,
    /// A frame type this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    /// A message type this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// An integer too large for a variable-length integer (2^62 or more).
    #[error("integer too large to encode")]
    VarintRange,
    /// A protocol version this crate does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
}

/// Message types (the second header byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// A responder under load asks the initiator to prove its address (type 3).
    CookieReply,
    /// Encrypted transport record.
    Data,
    /// First handshake message (initiator to responder).
    HandshakeInit,
    /// Second handshake message (responder to initiator).
    HandshakeResponse,
    /// Any other value.
    Unknown(u8),
}

impl From<u8> for MessageType {
    fn from(v: u8) -> Self {
        match v {
            1 => MessageType::HandshakeInit,
            2 => MessageType::HandshakeResponse,
            3 => MessageType::CookieReply,
            4 => MessageType::Data,
            other => MessageType::Unknown(other),
        }
    }
}

impl From<MessageType> for u8 {
    fn from(t: MessageType) -> u8 {
        match t {
            MessageType::HandshakeInit => 1,
            MessageType::HandshakeResponse => 2,
            MessageType::CookieReply => 3,
            MessageType::Data => 4,
            MessageType::Unknown(other) => other,
        }
    }
}

/// A view of the common header of any datagram.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a buffer without checking its length; accessors may panic if it is shorter
    /// than [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Header<T> {
        Header { buffer }
    }

    /// Wraps a buffer after checking that it holds a header.
    pub fn new_checked(buffer: T) -> Result<Header<T>, WireError> {
        let h = Header::new_unchecked(buffer);
        h.check_len()?;
        Ok(h)
    }

    /// Checks that the buffer holds a header.
    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(WireError::Truncated)
        } else {
            Ok(())
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

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        MessageType::from(self.buffer.as_ref()[field::TYPE])
    }

    /// The reserved field.
    pub fn reserved(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::RESERVED];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Checks the version and returns the message type.
    pub fn check(&self) -> Result<MessageType, WireError> {
        match self.version() {
            PROTOCOL_VERSION => Ok(self.message_type()),
            v => Err(WireError::Version(v)),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Writes version [`PROTOCOL_VERSION`], `ty` and a zero reserved field.
    pub fn emit(&mut self, ty: MessageType) {
        let b = self.buffer.as_mut();
        b[field::VERSION] = PROTOCOL_VERSION;
        b[field::TYPE] = ty.into();
        b[field::RESERVED].fill(0);
    }
}

/// Decodes any datagram as far as possible without keys: the header, then the
/// type-specific view. Used by the fuzz target and the corpus replay test; never panics.
pub fn decode_any(bytes: &[u8]) -> Result<MessageType, WireError> {
    // Record plaintexts and load reports are decoded from raw bytes too, as an
    // authenticated but broken peer could send any of them.
    decode_record(bytes);
    let _ = crate::load::LoadReport::decode(bytes);
    let header = Header::new_checked(bytes)?;
    let ty = header.check()?;
    match ty {
        MessageType::HandshakeInit => {
            HandshakeInitRepr::parse(&HandshakeInit::new_checked(bytes)?)?;
        }
        MessageType::HandshakeResponse => {
            HandshakeResponseRepr::parse(&HandshakeResponse::new_checked(bytes)?)?;
        }
        MessageType::CookieReply => {
            CookieReplyRepr::parse(&CookieReply::new_checked(bytes)?)?;
        }
        MessageType::Data => {
            let p = DataPacket::new_checked(bytes)?;
            DataRepr::parse(&p)?;
            decode_record(p.ciphertext());
        }
        MessageType::Unknown(t) => return Err(WireError::UnknownType(t)),
    }
    Ok(ty)
}

fn decode_record(plain: &[u8]) {
    if let Ok((_, frames)) = frame::parse_record(plain) {
        for f in frames.flatten() {
            if let Frame::Heartbeat(report) = f {
                let _ = crate::load::LoadReport::decode(report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut buf = [0xffu8; 4];
        Header::new_checked(&mut buf[..])
            .unwrap()
            .emit(MessageType::Data);
        assert_eq!(buf, [2, 4, 0, 0]);
        let h = Header::new_checked(&buf[..]).unwrap();
        assert_eq!(h.check(), Ok(MessageType::Data));
        assert_eq!(h.reserved(), 0);
        assert_eq!(
            Header::new_checked(&buf[..3]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            Header::new_checked(&[1u8, 4, 0, 0][..]).unwrap().check(),
            Err(WireError::Version(1))
        );
        assert_eq!(MessageType::from(9), MessageType::Unknown(9));
        for t in 0..=255u8 {
            assert_eq!(u8::from(MessageType::from(t)), t);
        }
    }

    /// Property-style: random and truncated inputs never panic any decoder.
    #[test]
    fn random_bytes_never_panic() {
        use rand_chacha::ChaCha8Rng;
        use rand_core::{RngCore, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut buf = vec![0u8; 2048];
        for i in 0..20_000 {
            let len = (rng.next_u32() as usize) % buf.len();
            rng.fill_bytes(&mut buf[..len]);
            if i % 2 == 0 && len >= 2 {
                // Make the header plausible so the deeper parsers run too.
                buf[0] = PROTOCOL_VERSION;
                buf[1] = [1u8, 2, 3, 4][i % 4];
            }
            let _ = decode_any(&buf[..len]);
            // Every prefix of a plausible packet too.
            if i % 97 == 0 {
                for cut in 0..len.min(200) {
                    let _ = decode_any(&buf[..cut]);
                }
            }
        }
    }

    /// Replays every file committed under `fuzz/corpus/decode/`.
    #[test]
    fn fuzz_corpus_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
        // The same endpoint set-up as the fuzz target.
        let mut ep = crate::Endpoint::new(
            crate::Config::default(),
            crate::Keypair::from_private(crate::PrivateKey::from_bytes([1; 32])),
            [0; 32],
            crate::Instant::ZERO,
        );
        let peer = crate::PrivateKey::from_bytes([2; 32]).public_key();
        ep.add_peer(crate::PeerConfig::new(peer, None), crate::Instant::ZERO)
            .unwrap();
        let from = "198.18.2.2:51820".parse().unwrap();
        let mut n = 0;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let mut bytes = std::fs::read(entry.path()).unwrap();
                let _ = decode_any(&bytes);
                let _ = ep.handle_datagram(crate::Instant::from_secs(1), from, &mut bytes);
                n += 1;
            }
        }
        assert!(n > 0, "no corpus files in {}", dir.display());
    }
}
