//! The record cipher behind a small seam: ChaCha20-Poly1305 with a 64-bit counter nonce.
//!
//! The 96-bit nonce is 32 zero bits followed by the little-endian record counter, as in
//! Noise and WireGuard. Two implementations: [`RingChaCha20Poly1305`] (ring, assembly) and
//! [`RustCryptoChaCha20Poly1305`] (the `chacha20poly1305` crate, pure Rust); `benches/aead.rs`
//! compares them and [`AeadBackend::default`] picks the faster one measured there.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag};

/// Length of the Poly1305 tag appended to every record.
pub const TAG_LEN: usize = 16;
/// Length of a record key.
pub const AEAD_KEY_LEN: usize = 32;

/// Why sealing or opening failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AeadError {
    /// The tag did not verify: the record is forged, tampered with, or for another key.
    #[error("record failed authentication")]
    Authentication,
    /// The buffer is shorter than a tag.
    #[error("buffer too short for the authentication tag")]
    TooShort,
}

/// An AEAD key for one direction of a session.
pub trait Aead: Send + Sync {
    /// Encrypts `in_out[..len - TAG_LEN]` in place and writes the tag into the last
    /// [`TAG_LEN`] bytes, authenticating `aad` too.
    fn seal_in_place(&self, counter: u64, aad: &[u8], in_out: &mut [u8]) -> Result<(), AeadError>;

    /// Verifies the tag in the last [`TAG_LEN`] bytes of `in_out` and decrypts the rest in
    /// place; returns the plaintext length. On error the buffer content is unspecified.
    fn open_in_place(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, AeadError>;
}

fn nonce_bytes(counter: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_le_bytes());
    nonce
}

/// Which [`Aead`] implementation sessions use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AeadBackend {
    /// `ring`'s ChaCha20-Poly1305 (the faster one in `benches/aead.rs`; default).
    #[default]
    Ring,
    /// The RustCrypto `chacha20poly1305` crate.
    RustCrypto,
}

impl AeadBackend {
    /// A key of this backend.
    pub fn key(self, key: &[u8; AEAD_KEY_LEN]) -> Box<dyn Aead> {
        match self {
            AeadBackend::Ring => Box::new(RingChaCha20Poly1305::new(key)),
            AeadBackend::RustCrypto => Box::new(RustCryptoChaCha20Poly1305::new(key)),
        }
    }
}

/// ChaCha20-Poly1305 from `ring`.
pub struct RingChaCha20Poly1305(ring::aead::LessSafeKey);

impl RingChaCha20Poly1305 {
    /// A key.
    pub fn new(key: &[u8; AEAD_KEY_LEN]) -> Self {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
            .expect("32 bytes is the ChaCha20-Poly1305 key length");
        RingChaCha20Poly1305(ring::aead::LessSafeKey::new(unbound))
    }
}

impl Aead for RingChaCha20Poly1305 {
    fn seal_in_place(&self, counter: u64, aad: &[u8], in_out: &mut [u8]) -> Result<(), AeadError> {
        let split = in_out
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(AeadError::TooShort)?;
        let (data, tag_out) = in_out.split_at_mut(split);
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), data)
            .map_err(|_| AeadError::TooShort)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    fn open_in_place(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, AeadError> {
        if in_out.len() < TAG_LEN {
            return Err(AeadError::TooShort);
        }
        let nonce = ring::aead::Nonce::assume_unique_for_key(nonce_bytes(counter));
        self.0
            .open_in_place(nonce, ring::aead::Aad::from(aad), in_out)
            .map(|plain| plain.len())
            .map_err(|_| AeadError::Authentication)
    }
}

/// ChaCha20-Poly1305 from the RustCrypto `chacha20poly1305` crate.
pub struct RustCryptoChaCha20Poly1305(chacha20poly1305::ChaCha20Poly1305);

impl RustCryptoChaCha20Poly1305 {
    /// A key.
    pub fn new(key: &[u8; AEAD_KEY_LEN]) -> Self {
        RustCryptoChaCha20Poly1305(chacha20poly1305::ChaCha20Poly1305::new(key.into()))
    }
}

impl Aead for RustCryptoChaCha20Poly1305 {
    fn seal_in_place(&self, counter: u64, aad: &[u8], in_out: &mut [u8]) -> Result<(), AeadError> {
        let split = in_out
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(AeadError::TooShort)?;
        let (data, tag_out) = in_out.split_at_mut(split);
        let nonce = nonce_bytes(counter);
        let tag = self
            .0
            .encrypt_in_place_detached((&nonce).into(), aad, data)
            .map_err(|_| AeadError::TooShort)?;
        tag_out.copy_from_slice(&tag);
        Ok(())
    }

    fn open_in_place(
        &self,
        counter: u64,
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, AeadError> {
        let split = in_out
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(AeadError::TooShort)?;
        let (data, tag) = in_out.split_at_mut(split);
        let nonce = nonce_bytes(counter);
        self.0
            .decrypt_in_place_detached((&nonce).into(), aad, data, Tag::from_slice(tag))
            .map(|()| split)
            .map_err(|_| AeadError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(key: &[u8; 32]) -> [Box<dyn Aead>; 2] {
        [AeadBackend::Ring.key(key), AeadBackend::RustCrypto.key(key)]
    }

    #[test]
    fn backends_interoperate() {
        let key = [7u8; 32];
        let [a, b] = both(&key);
        for len in [0usize, 1, 63, 64, 65, 1400] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = plain.clone();
            buf.extend_from_slice(&[0; TAG_LEN]);
            a.seal_in_place(42, b"hdr", &mut buf).unwrap();
            let mut buf2 = plain.clone();
            buf2.extend_from_slice(&[0; TAG_LEN]);
            b.seal_in_place(42, b"hdr", &mut buf2).unwrap();
            assert_eq!(buf, buf2, "same ciphertext and tag for len {len}");
            let n = b.open_in_place(42, b"hdr", &mut buf).unwrap();
            assert_eq!(&buf[..n], &plain[..]);
            let n = a.open_in_place(42, b"hdr", &mut buf2).unwrap();
            assert_eq!(&buf2[..n], &plain[..]);
        }
    }

    /// RFC 8439 section 2.8.2 test vector (nonce 07000000 4041424344454647).
    #[test]
    fn rfc8439_vector() {
        let key: [u8; 32] = core::array::from_fn(|i| 0x80 + i as u8);
        let aad = [
            0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
        ];
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        // Our nonce layout fixes the first four bytes to zero, so check our framing against
        // the crate directly with the RFC nonce, then our wrappers against each other.
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&key).into());
        let nonce = [7, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47];
        let mut buf = plain.to_vec();
        let tag = cipher
            .encrypt_in_place_detached((&nonce).into(), &aad, &mut buf)
            .unwrap();
        assert_eq!(
            &tag[..],
            &[
                0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a, 0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60,
                0x06, 0x91
            ]
        );
        assert_eq!(nonce_bytes(0x0102), [0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn tampering_and_wrong_key_fail() {
        let [a, _] = both(&[1; 32]);
        let [_, other] = both(&[2; 32]);
        let mut buf = vec![0u8; 100 + TAG_LEN];
        a.seal_in_place(1, b"", &mut buf).unwrap();
        let mut tampered = buf.clone();
        tampered[3] ^= 1;
        assert_eq!(
            a.open_in_place(1, b"", &mut tampered),
            Err(AeadError::Authentication)
        );
        assert_eq!(
            a.open_in_place(2, b"", &mut buf.clone()),
            Err(AeadError::Authentication)
        );
        assert_eq!(
            a.open_in_place(1, b"x", &mut buf.clone()),
            Err(AeadError::Authentication)
        );
        assert_eq!(
            other.open_in_place(1, b"", &mut buf.clone()),
            Err(AeadError::Authentication)
        );
        assert_eq!(
            a.open_in_place(1, b"", &mut [0u8; 15]),
            Err(AeadError::TooShort)
        );
        assert_eq!(
            a.seal_in_place(1, b"", &mut [0u8; 15]),
            Err(AeadError::TooShort)
        );
    }
}
