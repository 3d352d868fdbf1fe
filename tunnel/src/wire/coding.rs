//! Byte-level codec helpers: a bounds-checked [`Reader`] and [`Writer`] and QUIC
//! variable-length integers (RFC 9000 section 16: the two high bits of the first byte give
//! the length, 1, 2, 4 or 8 bytes; values up to 2^62 - 1).

use super::WireError;

/// Largest value a variable-length integer holds.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Encoded length of `v` (8 for values beyond [`VARINT_MAX`], which do not encode).
pub const fn varint_len(v: u64) -> usize {
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Reads fields from a byte slice; every method fails instead of reading past the end.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub const fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub const fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether everything was consumed.
    pub const fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.buf.get(self.pos).ok_or(WireError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// A little-endian `u16`.
    pub fn u16_le(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    /// A variable-length integer.
    pub fn varint(&mut self) -> Result<u64, WireError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.bytes(len - 1)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    /// A variable-length integer used as a length, then that many bytes.
    pub fn length_prefixed(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
        self.bytes(len)
    }
}

/// Writes fields into a byte slice; every method fails instead of writing past the end.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub const fn position(&self) -> usize {
        self.pos
    }

    /// Space left.
    pub const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> Result<(), WireError> {
        self.bytes(&[v])
    }

    /// A little-endian `u16`.
    pub fn u16_le(&mut self, v: u16) -> Result<(), WireError> {
        self.bytes(&v.to_le_bytes())
    }

    /// Raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> Result<(), WireError> {
        let end = self
            .pos
            .checked_add(v.len())
            .ok_or(WireError::BufferTooSmall)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?
            .copy_from_slice(v);
        self.pos = end;
        Ok(())
    }

    /// Reserves the next `n` bytes and returns them for the caller to fill.
    pub fn take(&mut self, n: usize) -> Result<&mut [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::BufferTooSmall)?;
        let out = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(WireError::BufferTooSmall)?;
        self.pos = end;
        Ok(out)
    }

    /// A variable-length integer.
    pub fn varint(&mut self, v: u64) -> Result<(), WireError> {
        if v > VARINT_MAX {
            return Err(WireError::VarintRange);
        }
        let len = varint_len(v);
        let tag: u64 = match len {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        let bytes = (v | (tag << (len * 8 - 2))).to_be_bytes();
        self.bytes(&bytes[8 - len..])
    }

    /// A variable-length length, then the bytes.
    pub fn length_prefixed(&mut self, v: &[u8]) -> Result<(), WireError> {
        self.varint(v.len() as u64)?;
        self.bytes(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_rfc_examples() {
        // RFC 9000 appendix A.1 examples.
        let cases: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, v) in cases {
            assert_eq!(Reader::new(bytes).varint(), Ok(v));
            let mut out = [0u8; 8];
            let mut w = Writer::new(&mut out);
            w.varint(v).unwrap();
            let n = w.position();
            assert_eq!(&out[..n], bytes);
            assert_eq!(varint_len(v), bytes.len());
        }
        for v in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            VARINT_MAX,
        ] {
            let mut out = [0u8; 8];
            let mut w = Writer::new(&mut out);
            w.varint(v).unwrap();
            let n = w.position();
            let mut r = Reader::new(&out[..n]);
            assert_eq!(r.varint(), Ok(v));
            assert!(r.is_empty());
        }
        let mut out = [0u8; 8];
        assert_eq!(
            Writer::new(&mut out).varint(VARINT_MAX + 1),
            Err(WireError::VarintRange)
        );
        assert_eq!(
            Writer::new(&mut out[..1]).varint(64),
            Err(WireError::BufferTooSmall)
        );
        assert_eq!(Reader::new(&[0x80, 1]).varint(), Err(WireError::Truncated));
        assert_eq!(
            Reader::new(&[0x05, 1]).length_prefixed(),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0xff; 8]).length_prefixed(),
            Err(WireError::Truncated)
        );
    }
}
