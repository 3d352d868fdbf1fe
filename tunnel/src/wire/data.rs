//! Transport records.
//!
//! ```text
//!  0..4    header (version, type 4, reserved)
//!  4..8    receiver index (LE): the receiver's session index, selects the keys
//!  8..16   counter (LE): the AEAD nonce, checked by the anti-replay window
//! 16..n-16 ciphertext of the record plaintext (see `frame`)
//! n-16..n  Poly1305 tag; the 16 header bytes are the associated data
//! ```

use super::{Field, HEADER_LEN, Header, MessageType, WireError};
use crate::aead::TAG_LEN;

/// Length of the cleartext part of a record (also its associated data).
pub const DATA_HEADER_LEN: usize = 16;

mod field {
    use super::Field;
    pub(super) const RECEIVER: Field = 4..8;
    pub(super) const COUNTER: Field = 8..16;
}

/// A view of a transport record.
#[derive(Debug, Clone)]
pub struct DataPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> DataPacket<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Self {
        DataPacket { buffer }
    }

    /// Wraps a buffer after checking that it holds the header and a tag.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the length.
    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() < DATA_HEADER_LEN + TAG_LEN {
            Err(WireError::Truncated)
        } else {
            Ok(())
        }
    }

    /// Consumes the view, returning the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The common header.
    pub fn header(&self) -> Header<&[u8]> {
        Header::new_unchecked(&self.buffer.as_ref()[..HEADER_LEN])
    }

    /// The receiver's session index.
    pub fn receiver_index(&self) -> u32 {
        let s = &self.buffer.as_ref()[field::RECEIVER];
        u32::from_le_bytes([s[0], s[1], s[2], s[3]])
    }

    /// The record counter.
    pub fn counter(&self) -> u64 {
        let s = &self.buffer.as_ref()[field::COUNTER];
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        u64::from_le_bytes(b)
    }

    /// The associated data: the cleartext header.
    pub fn aad(&self) -> &[u8] {
        &self.buffer.as_ref()[..DATA_HEADER_LEN]
    }

    /// Ciphertext followed by the tag.
    pub fn ciphertext(&self) -> &[u8] {
        &self.buffer.as_ref()[DATA_HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> DataPacket<T> {
    /// Splits into the associated data and the mutable ciphertext-with-tag, for in-place
    /// decryption or encryption.
    pub fn split_mut(&mut self) -> (&[u8], &mut [u8]) {
        let (aad, rest) = self.buffer.as_mut().split_at_mut(DATA_HEADER_LEN);
        (aad, rest)
    }

    /// Sets the receiver index.
    pub fn set_receiver_index(&mut self, v: u32) {
        self.buffer.as_mut()[field::RECEIVER].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the counter.
    pub fn set_counter(&mut self, v: u64) {
        self.buffer.as_mut()[field::COUNTER].copy_from_slice(&v.to_le_bytes());
    }
}

/// The cleartext fields of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRepr {
    /// The receiver's session index.
    pub receiver_index: u32,
    /// The record counter (nonce).
    pub counter: u64,
}

impl DataRepr {
    /// Parses a checked view, validating version and type.
    pub fn parse<T: AsRef<[u8]>>(p: &DataPacket<T>) -> Result<Self, WireError> {
        p.check_len()?;
        match p.header().check()? {
            MessageType::Data => Ok(DataRepr {
                receiver_index: p.receiver_index(),
                counter: p.counter(),
            }),
            other => Err(WireError::UnknownType(other.into())),
        }
    }

    /// Length of a record with `plaintext_len` bytes of plaintext.
    pub const fn buffer_len(plaintext_len: usize) -> usize {
        DATA_HEADER_LEN + plaintext_len + TAG_LEN
    }

    /// Writes the cleartext header.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut DataPacket<T>) {
        Header::new_unchecked(&mut p.buffer.as_mut()[..HEADER_LEN]).emit(MessageType::Data);
        p.set_receiver_index(self.receiver_index);
        p.set_counter(self.counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static PACKET_BYTES: [u8; 36] = [
        0x02, 0x04, 0x00, 0x00, // version 2, Data
        0x78, 0x56, 0x34, 0x12, // receiver index
        0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // counter 0x102
        0xde, 0xad, 0xbe, 0xef, // ciphertext
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // tag
    ];

    #[test]
    fn deconstruct() {
        let p = DataPacket::new_checked(&PACKET_BYTES[..]).unwrap();
        assert_eq!(p.receiver_index(), 0x1234_5678);
        assert_eq!(p.counter(), 0x102);
        assert_eq!(&p.ciphertext()[..4], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(p.aad(), &PACKET_BYTES[..16]);
        assert_eq!(
            DataRepr::parse(&p),
            Ok(DataRepr {
                receiver_index: 0x1234_5678,
                counter: 0x102
            })
        );
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 36];
        buf[16..20].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let repr = DataRepr {
            receiver_index: 0x1234_5678,
            counter: 0x102,
        };
        assert_eq!(DataRepr::buffer_len(4), 36);
        repr.emit(&mut DataPacket::new_checked(&mut buf[..]).unwrap());
        assert_eq!(buf, PACKET_BYTES);
    }

    #[test]
    fn truncated() {
        assert_eq!(
            DataPacket::new_checked(&PACKET_BYTES[..31]).unwrap_err(),
            WireError::Truncated
        );
        assert!(DataPacket::new_checked(&PACKET_BYTES[..32]).is_ok());
    }
}
