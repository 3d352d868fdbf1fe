//! The cookie reply: what a responder under load sends instead of a handshake response.
//!
//! ```text
//! CookieReply (64 bytes)
//!   0..4    header (version, type 3)
//!   4..8    receiver index (LE): the sender index of the initiation it answers
//!   8..32   nonce (24 random bytes)
//!  32..64   the 16-byte cookie, XChaCha20-Poly1305-sealed (16 + 16)
//! ```
//!
//! The seal's key is `BLAKE2s-256("flowshift-cookie-v1" || responder static public key)`
//! and its associated data the `mac1` of the initiation answered, so only the initiator that
//! sent that initiation (and knows whom it sent it to) accepts it. See `crate::cookie`.

use super::{Field, HEADER_LEN, Header, MessageType, WireError};

/// Length of the cookie reply nonce.
pub const COOKIE_NONCE_LEN: usize = 24;
/// Length of the sealed cookie (cookie and tag).
pub const SEALED_COOKIE_LEN: usize = 16 + 16;
/// Total length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = HEADER_LEN + 4 + COOKIE_NONCE_LEN + SEALED_COOKIE_LEN;

mod field {
    use super::*;
    pub(super) const RECEIVER: Field = 4..8;
    pub(super) const NONCE: Field = 8..8 + COOKIE_NONCE_LEN;
    pub(super) const SEALED: Field = NONCE.end..NONCE.end + SEALED_COOKIE_LEN;
}

/// A view of a cookie reply.
#[derive(Debug, Clone)]
pub struct CookieReply<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> CookieReply<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Self {
        CookieReply { buffer }
    }

    /// Wraps a buffer after checking its length (exactly [`COOKIE_REPLY_LEN`]).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the length.
    pub fn check_len(&self) -> Result<(), WireError> {
        if self.buffer.as_ref().len() == COOKIE_REPLY_LEN {
            Ok(())
        } else {
            Err(WireError::Length)
        }
    }

    /// Consumes the view, returning the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The common header.
    pub fn header(&self) -> Header<&[u8]> {
        Header::new_unchecked(self.buffer.as_ref())
    }

    /// The initiator's session index this answers.
    pub fn receiver_index(&self) -> u32 {
        let s = &self.buffer.as_ref()[field::RECEIVER];
        u32::from_le_bytes([s[0], s[1], s[2], s[3]])
    }

    /// The nonce.
    pub fn nonce(&self) -> &[u8] {
        &self.buffer.as_ref()[field::NONCE]
    }

    /// The sealed cookie.
    pub fn sealed_cookie(&self) -> &[u8] {
        &self.buffer.as_ref()[field::SEALED]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> CookieReply<T> {
    /// The nonce, mutable.
    pub fn nonce_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::NONCE]
    }

    /// The sealed cookie, mutable.
    pub fn sealed_cookie_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::SEALED]
    }
}

/// The cleartext fields of a cookie reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieReplyRepr {
    /// The initiator's session index.
    pub receiver_index: u32,
}

impl CookieReplyRepr {
    /// Parses a checked view, validating version and type.
    pub fn parse<T: AsRef<[u8]>>(p: &CookieReply<T>) -> Result<Self, WireError> {
        p.check_len()?;
        match p.header().check()? {
            MessageType::CookieReply => Ok(CookieReplyRepr {
                receiver_index: p.receiver_index(),
            }),
            other => Err(WireError::UnknownType(other.into())),
        }
    }

    /// Length of the emitted message.
    pub const fn buffer_len(&self) -> usize {
        COOKIE_REPLY_LEN
    }

    /// Writes the header and index; nonce and sealed cookie are filled in separately.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut CookieReply<T>) {
        Header::new_unchecked(p.buffer.as_mut()).emit(MessageType::CookieReply);
        p.buffer.as_mut()[field::RECEIVER].copy_from_slice(&self.receiver_index.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construct_and_parse() {
        let mut buf = [0u8; COOKIE_REPLY_LEN];
        let repr = CookieReplyRepr {
            receiver_index: 0x0403_0201,
        };
        let mut p = CookieReply::new_checked(&mut buf[..]).unwrap();
        repr.emit(&mut p);
        p.nonce_mut().fill(0xaa);
        p.sealed_cookie_mut().fill(0xbb);
        assert_eq!(COOKIE_REPLY_LEN, 64);
        assert_eq!(&buf[..8], &[2, 3, 0, 0, 1, 2, 3, 4]);
        assert_eq!(&buf[8..32], &[0xaa; 24]);
        assert_eq!(&buf[32..64], &[0xbb; 32]);
        let p = CookieReply::new_checked(&buf[..]).unwrap();
        assert_eq!(CookieReplyRepr::parse(&p), Ok(repr));
        assert_eq!(p.nonce(), &[0xaa; 24]);
        assert_eq!(p.sealed_cookie(), &[0xbb; 32]);
        assert_eq!(
            CookieReply::new_checked(&buf[..63]).unwrap_err(),
            WireError::Length
        );
        buf[1] = 2;
        let p = CookieReply::new_checked(&buf[..]).unwrap();
        assert_eq!(CookieReplyRepr::parse(&p), Err(WireError::UnknownType(2)));
        buf[0] = 1;
        let p = CookieReply::new_checked(&buf[..]).unwrap();
        assert_eq!(CookieReplyRepr::parse(&p), Err(WireError::Version(1)));
    }
}
