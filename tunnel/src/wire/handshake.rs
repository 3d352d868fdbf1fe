//! Handshake messages: the two Noise IK messages with WireGuard-style session indices and
//! a cheap MAC that lets a responder drop garbage before doing any Diffie-Hellman.
//!
//! ```text
//! HandshakeInit (152 bytes)              HandshakeResponse (84 bytes)
//!   0..4    header (version, type 1)       0..4    header (version, type 2)
//!   4..8    sender index (LE)              4..8    sender index (LE)
//!   8..120  Noise message 1                8..12   receiver index (LE)
//!           e (32) | s+tag (48) |          12..68  Noise message 2
//!           payload+tag (16+16)                    e (32) | payload+tag (8+16)
//! 120..136  mac1                          68..84  mac1
//! 136..152  mac2
//! ```
//!
//! `mac1` is keyed BLAKE2s-128 over all preceding bytes, keyed with
//! `BLAKE2s-256("flowshift-mac1-v1" || receiver's static public key)`. `mac2` (initiations
//! only) is keyed BLAKE2s-128 over all preceding bytes (`mac1` included), keyed with a
//! cookie the responder sent in a [`CookieReply`](super::CookieReply); all zeros without
//! one (see `crate::cookie`).

use super::{Field, HEADER_LEN, Header, MessageType, WireError};

/// Length of `mac1`.
pub const MAC_LEN: usize = 16;
/// Length of the encrypted payload of Noise message 1 (timestamp and instance id).
pub const INIT_PAYLOAD_LEN: usize = 16;
/// Length of the encrypted payload of Noise message 2 (instance id).
pub const RESPONSE_PAYLOAD_LEN: usize = 8;
/// Length of Noise message 1 of `IKpsk2` with our payload.
pub const NOISE_INIT_LEN: usize = 32 + 32 + 16 + INIT_PAYLOAD_LEN + 16;
/// Length of Noise message 2 of `IKpsk2` with our payload.
pub const NOISE_RESPONSE_LEN: usize = 32 + RESPONSE_PAYLOAD_LEN + 16;
/// Total length of a handshake initiation.
pub const HANDSHAKE_INIT_LEN: usize = HEADER_LEN + 4 + NOISE_INIT_LEN + 2 * MAC_LEN;
/// Total length of a handshake response.
pub const HANDSHAKE_RESPONSE_LEN: usize = HEADER_LEN + 8 + NOISE_RESPONSE_LEN + MAC_LEN;

mod field {
    use super::*;
    pub(super) const SENDER: Field = 4..8;
    pub(super) const INIT_NOISE: Field = 8..8 + NOISE_INIT_LEN;
    pub(super) const INIT_MAC1: Field = 8 + NOISE_INIT_LEN..8 + NOISE_INIT_LEN + MAC_LEN;
    pub(super) const INIT_MAC2: Field = HANDSHAKE_INIT_LEN - MAC_LEN..HANDSHAKE_INIT_LEN;
    pub(super) const RESP_RECEIVER: Field = 8..12;
    pub(super) const RESP_NOISE: Field = 12..12 + NOISE_RESPONSE_LEN;
    pub(super) const RESP_MAC1: Field = HANDSHAKE_RESPONSE_LEN - MAC_LEN..HANDSHAKE_RESPONSE_LEN;
}

fn read_u32(b: &[u8], f: Field) -> u32 {
    let s = &b[f];
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

macro_rules! handshake_view {
    ($(#[$doc:meta])* $name:ident, $len:expr, $noise:expr, $mac:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Wraps a buffer without checking it; accessors may panic on a short buffer.
            pub const fn new_unchecked(buffer: T) -> Self {
                $name { buffer }
            }

            /// Wraps a buffer after checking its length (exactly the message length:
            /// trailing bytes are rejected).
            pub fn new_checked(buffer: T) -> Result<Self, WireError> {
                let p = Self::new_unchecked(buffer);
                p.check_len()?;
                Ok(p)
            }

            /// Checks the length.
            pub fn check_len(&self) -> Result<(), WireError> {
                if self.buffer.as_ref().len() == $len { Ok(()) } else { Err(WireError::Length) }
            }

            /// Consumes the view, returning the buffer.
            pub fn into_inner(self) -> T {
                self.buffer
            }

            /// The common header.
            pub fn header(&self) -> Header<&[u8]> {
                Header::new_unchecked(self.buffer.as_ref())
            }

            /// The sender's session index.
            pub fn sender_index(&self) -> u32 {
                read_u32(self.buffer.as_ref(), field::SENDER)
            }

            /// The Noise handshake message.
            pub fn noise(&self) -> &[u8] {
                &self.buffer.as_ref()[$noise]
            }

            /// The bytes that `mac1` covers.
            pub fn mac_input(&self) -> &[u8] {
                &self.buffer.as_ref()[..$mac.start]
            }

            /// `mac1`.
            pub fn mac1(&self) -> &[u8] {
                &self.buffer.as_ref()[$mac]
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            /// Sets the sender index.
            pub fn set_sender_index(&mut self, v: u32) {
                self.buffer.as_mut()[field::SENDER].copy_from_slice(&v.to_le_bytes());
            }

            /// The Noise message, mutable.
            pub fn noise_mut(&mut self) -> &mut [u8] {
                &mut self.buffer.as_mut()[$noise]
            }

            /// `mac1`, mutable.
            pub fn mac1_mut(&mut self) -> &mut [u8] {
                &mut self.buffer.as_mut()[$mac]
            }
        }
    };
}

handshake_view!(
    /// A view of a handshake initiation.
    HandshakeInit,
    HANDSHAKE_INIT_LEN,
    field::INIT_NOISE,
    field::INIT_MAC1
);
handshake_view!(
    /// A view of a handshake response.
    HandshakeResponse,
    HANDSHAKE_RESPONSE_LEN,
    field::RESP_NOISE,
    field::RESP_MAC1
);

impl<T: AsRef<[u8]>> HandshakeInit<T> {
    /// The bytes that `mac2` covers (everything before it, `mac1` included).
    pub fn mac2_input(&self) -> &[u8] {
        &self.buffer.as_ref()[..field::INIT_MAC2.start]
    }

    /// `mac2` (all zeros when the initiator has no cookie).
    pub fn mac2(&self) -> &[u8] {
        &self.buffer.as_ref()[field::INIT_MAC2]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> HandshakeInit<T> {
    /// `mac2`, mutable.
    pub fn mac2_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::INIT_MAC2]
    }
}

impl<T: AsRef<[u8]>> HandshakeResponse<T> {
    /// The initiator's session index this responds to.
    pub fn receiver_index(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::RESP_RECEIVER)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> HandshakeResponse<T> {
    /// Sets the receiver index.
    pub fn set_receiver_index(&mut self, v: u32) {
        self.buffer.as_mut()[field::RESP_RECEIVER].copy_from_slice(&v.to_le_bytes());
    }
}

/// The cleartext fields of a handshake initiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeInitRepr {
    /// The initiator's new session index.
    pub sender_index: u32,
}

impl HandshakeInitRepr {
    /// Parses a checked view, validating version and type.
    pub fn parse<T: AsRef<[u8]>>(p: &HandshakeInit<T>) -> Result<Self, WireError> {
        p.check_len()?;
        match p.header().check()? {
            MessageType::HandshakeInit => Ok(HandshakeInitRepr {
                sender_index: p.sender_index(),
            }),
            other => Err(WireError::UnknownType(other.into())),
        }
    }

    /// Length of the emitted message.
    pub const fn buffer_len(&self) -> usize {
        HANDSHAKE_INIT_LEN
    }

    /// Writes the header, the index and a zero `mac2`; the Noise message, `mac1` and (with
    /// a cookie) `mac2` are filled in separately.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut HandshakeInit<T>) {
        Header::new_unchecked(p.buffer.as_mut()).emit(MessageType::HandshakeInit);
        p.set_sender_index(self.sender_index);
        p.mac2_mut().fill(0);
    }
}

/// The cleartext fields of a handshake response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeResponseRepr {
    /// The responder's new session index.
    pub sender_index: u32,
    /// The initiator's session index from the initiation.
    pub receiver_index: u32,
}

impl HandshakeResponseRepr {
    /// Parses a checked view, validating version and type.
    pub fn parse<T: AsRef<[u8]>>(p: &HandshakeResponse<T>) -> Result<Self, WireError> {
        p.check_len()?;
        match p.header().check()? {
            MessageType::HandshakeResponse => Ok(HandshakeResponseRepr {
                sender_index: p.sender_index(),
                receiver_index: p.receiver_index(),
            }),
            other => Err(WireError::UnknownType(other.into())),
        }
    }

    /// Length of the emitted message.
    pub const fn buffer_len(&self) -> usize {
        HANDSHAKE_RESPONSE_LEN
    }

    /// Writes the header and indices; the Noise message and `mac1` are filled in separately.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut HandshakeResponse<T>) {
        Header::new_unchecked(p.buffer.as_mut()).emit(MessageType::HandshakeResponse);
        p.set_sender_index(self.sender_index);
        p.set_receiver_index(self.receiver_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_construct_and_parse() {
        let mut buf = [0u8; HANDSHAKE_INIT_LEN];
        let repr = HandshakeInitRepr {
            sender_index: 0x0403_0201,
        };
        let mut p = HandshakeInit::new_checked(&mut buf[..]).unwrap();
        repr.emit(&mut p);
        p.noise_mut().fill(0xaa);
        p.mac1_mut().fill(0xbb);
        p.mac2_mut().fill(0xcc);
        assert_eq!(HANDSHAKE_INIT_LEN, 152);
        assert_eq!(&buf[..8], &[2, 1, 0, 0, 1, 2, 3, 4]);
        assert_eq!(buf[8], 0xaa);
        assert_eq!(buf[119], 0xaa);
        assert_eq!(&buf[120..136], &[0xbb; 16]);
        assert_eq!(&buf[136..152], &[0xcc; 16]);
        let p = HandshakeInit::new_checked(&buf[..]).unwrap();
        assert_eq!(HandshakeInitRepr::parse(&p), Ok(repr));
        assert_eq!(p.mac_input().len(), 120);
        assert_eq!(p.mac2_input().len(), 136);
        assert_eq!(p.mac2(), &[0xcc; 16]);
        assert_eq!(
            HandshakeInit::new_checked(&buf[..151]).unwrap_err(),
            WireError::Length
        );
        let mut long = buf.to_vec();
        long.push(0);
        assert_eq!(
            HandshakeInit::new_checked(&long[..]).unwrap_err(),
            WireError::Length
        );
    }

    #[test]
    fn response_construct_and_parse() {
        let mut buf = [0u8; HANDSHAKE_RESPONSE_LEN];
        let repr = HandshakeResponseRepr {
            sender_index: 7,
            receiver_index: 9,
        };
        repr.emit(&mut HandshakeResponse::new_checked(&mut buf[..]).unwrap());
        assert_eq!(&buf[..12], &[2, 2, 0, 0, 7, 0, 0, 0, 9, 0, 0, 0]);
        let p = HandshakeResponse::new_checked(&buf[..]).unwrap();
        assert_eq!(HandshakeResponseRepr::parse(&p), Ok(repr));
        buf[1] = 1;
        let p = HandshakeResponse::new_checked(&buf[..]).unwrap();
        assert_eq!(
            HandshakeResponseRepr::parse(&p),
            Err(WireError::UnknownType(1))
        );
        buf[0] = 9;
        let p = HandshakeResponse::new_checked(&buf[..]).unwrap();
        assert_eq!(HandshakeResponseRepr::parse(&p), Err(WireError::Version(9)));
    }
}
