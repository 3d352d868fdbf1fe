//! Independent checks of what flowshift sends: the counting stream and CRC-32.
//!
//! Written apart from the engine's own generator on purpose, so a bug there cannot hide itself.

/// Byte `i` of the counting stream: byte `i mod 8` of the little-endian u64 `i / 8`.
pub fn counting_byte(i: u64) -> u8 {
    (i / 8).to_le_bytes()[(i % 8) as usize]
}

/// Fills `buf` with the counting stream from `offset`.
pub fn counting_fill(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = counting_byte(offset + k as u64);
    }
}

/// The first byte where a stream differed from the counting stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("counting stream mismatch at offset {offset}: got {got:#04x}, expected {expected:#04x}")]
pub struct Mismatch {
    /// Stream offset.
    pub offset: u64,
    /// The byte received.
    pub got: u8,
    /// The byte expected.
    pub expected: u8,
}

/// Checks a stream chunk by chunk against the counting stream.
#[derive(Debug, Clone, Default)]
pub struct CountingVerifier {
    offset: u64,
}

impl CountingVerifier {
    /// A verifier expecting the stream from offset 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes verified so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Checks the next `data`.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Mismatch> {
        let mut rest = data;
        let mut offset = self.offset;
        // Bytes up to the next multiple of 8, then whole little-endian words, then the tail.
        while !offset.is_multiple_of(8) && !rest.is_empty() {
            Self::check(offset, rest[0])?;
            rest = &rest[1..];
            offset += 1;
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            if u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) != offset / 8 {
                for (k, &b) in w.iter().enumerate() {
                    Self::check(offset + k as u64, b)?;
                }
            }
            offset += 8;
        }
        for &b in words.remainder() {
            Self::check(offset, b)?;
            offset += 1;
        }
        self.offset = offset;
        Ok(())
    }

    fn check(offset: u64, got: u8) -> Result<(), Mismatch> {
        let expected = counting_byte(offset);
        if got == expected {
            Ok(())
        } else {
            Err(Mismatch {
                offset,
                got,
                expected,
            })
        }
    }
}

/// CRC-32 (IEEE, as zlib) of `data`, as 8 lowercase hex digits.
pub fn crc32_hex(data: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(data))
}

/// CRC-32 of the first `n` bytes of the counting stream, as 8 lowercase hex digits.
pub fn counting_crc32_hex(n: u64) -> String {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0;
    while at < n {
        let k = (n - at).min(buf.len() as u64) as usize;
        counting_fill(at, &mut buf[..k]);
        h.update(&buf[..k]);
        at += k as u64;
    }
    format!("{:08x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let mut b = [0u8; 24];
        counting_fill(0, &mut b);
        assert_eq!(&b[..8], &[0; 8]);
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(counting_byte(8 * 0x0102 + 1), 0x01);
        assert_eq!(crc32_hex(b"123456789"), "cbf43926");
    }

    #[test]
    fn verifier_finds_the_first_bad_byte() {
        let mut data = vec![0u8; 1000];
        counting_fill(0, &mut data);
        let mut v = CountingVerifier::new();
        v.feed(&data[..300]).unwrap();
        data[517] ^= 1;
        let e = v.feed(&data[300..]).unwrap_err();
        assert_eq!(e.offset, 517);
        // Every split point and every corrupted position is found exactly.
        let mut data = vec![0u8; 100];
        counting_fill(3, &mut data);
        for bad in 0..data.len() {
            for split in 0..data.len() {
                let mut d = data.clone();
                d[bad] = d[bad].wrapping_add(1);
                let mut v = CountingVerifier { offset: 3 };
                let r = v.feed(&d[..split]).and_then(|_| v.feed(&d[split..]));
                assert_eq!(r.unwrap_err().offset, 3 + bad as u64);
            }
        }
    }
}
