//! Static identities: X25519 key pairs and pre-shared keys, with WireGuard-style base64.
//!
//! `flowshift genkey` / `flowshift pubkey` use [`PrivateKey::generate`],
//! [`PrivateKey::to_base64`], [`PrivateKey::from_base64`] and [`PrivateKey::public_key`]:
//! the encodings are the same as `wg genkey | wg pubkey` (standard base64 with padding of
//! the 32 raw bytes), so keys can be moved between the two tools.

use core::fmt;
use core::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand_core::CryptoRng;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length in bytes of every key in this module.
pub const KEY_LEN: usize = 32;

/// Why a key could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text is not valid standard base64.
    #[error("key is not valid base64")]
    Base64,
    /// The decoded key does not have 32 bytes.
    #[error("key has {0} bytes, expected 32")]
    Length(usize),
}

fn decode32(text: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let text = text.trim();
    // 32 bytes are 44 base64 characters; refuse long input before decoding it.
    if text.len() > 64 {
        return Err(KeyParseError::Length(text.len() * 3 / 4));
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyParseError::Base64)?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyParseError::Length(bytes.len()))
}

/// A static X25519 public key: the identity of a node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> PublicKey {
        PublicKey(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Decodes the base64 form printed by `wg pubkey` / `flowshift pubkey`.
    pub fn from_base64(text: &str) -> Result<PublicKey, KeyParseError> {
        decode32(text).map(PublicKey)
    }

    /// The base64 form, as `wg pubkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<PublicKey, KeyParseError> {
        PublicKey::from_base64(s)
    }
}

/// A static X25519 private key. Zeroed on drop; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Draws a new key from `rng` and clamps it as X25519 (and `wg genkey`) does.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> PrivateKey {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        PrivateKey(bytes)
    }

    /// Wraps 32 raw bytes (clamping happens inside every X25519 operation).
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> PrivateKey {
        PrivateKey(bytes)
    }

    /// The raw secret bytes. Named so that reviewers notice where secrets leave this type.
    pub fn dangerous_as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Decodes the base64 form printed by `wg genkey` / `flowshift genkey`.
    pub fn from_base64(text: &str) -> Result<PrivateKey, KeyParseError> {
        decode32(text).map(PrivateKey)
    }

    /// The base64 form, as `wg genkey` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The matching public key (`X25519(self, 9)`, what `wg pubkey` prints).
    pub fn public_key(&self) -> PublicKey {
        // snow's default resolver always provides Curve25519; it is compiled in.
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow built with use-curve25519");
        dh.set(&self.0);
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(&dh.pubkey()[..KEY_LEN]);
        PublicKey(out)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A node's static key pair.
#[derive(Clone, Debug)]
pub struct Keypair {
    private: PrivateKey,
    public: PublicKey,
}

impl Keypair {
    /// Generates a new key pair from `rng` (the driver passes an OS-seeded CSPRNG).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Keypair {
        Keypair::from_private(PrivateKey::generate(rng))
    }

    /// The key pair of an existing private key.
    pub fn from_private(private: PrivateKey) -> Keypair {
        let public = private.public_key();
        Keypair { private, public }
    }

    /// The private half.
    pub fn private(&self) -> &PrivateKey {
        &self.private
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// An optional symmetric key shared by two peers, mixed into the handshake (the `psk2`
/// of `Noise_IKpsk2`) for post-quantum resistance and as a second factor. Zeroed on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    /// Draws a new random key from `rng` (what `wg genpsk` does).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> PresharedKey {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        PresharedKey(bytes)
    }

    /// Wraps 32 raw bytes.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> PresharedKey {
        PresharedKey(bytes)
    }

    /// The raw secret bytes.
    pub fn dangerous_as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Decodes the base64 form printed by `wg genpsk`.
    pub fn from_base64(text: &str) -> Result<PresharedKey, KeyParseError> {
        decode32(text).map(PresharedKey)
    }

    /// The base64 form.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// RFC 7748 section 6.1 (Alice).
    #[test]
    fn rfc7748_public_key() {
        let private = PrivateKey::from_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let expected = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(private.public_key().as_bytes(), &expected);
    }

    #[test]
    fn base64_round_trip_matches_wg_format() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let kp = Keypair::generate(&mut rng);
        let text = kp.private().to_base64();
        assert_eq!(text.len(), 44);
        assert!(text.ends_with('='));
        let back = PrivateKey::from_base64(&format!("{text}\n")).unwrap();
        assert_eq!(back, *kp.private());
        assert_eq!(back.public_key(), *kp.public());
        let public: PublicKey = kp.public().to_base64().parse().unwrap();
        assert_eq!(public, *kp.public());
        // Clamped like `wg genkey`.
        let raw = kp.private().dangerous_as_bytes();
        assert_eq!(raw[0] & 7, 0);
        assert_eq!(raw[31] & 0xc0, 0x40);
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert_eq!(
            PublicKey::from_base64("not base64!"),
            Err(KeyParseError::Base64)
        );
        assert_eq!(
            PublicKey::from_base64("AAAA"),
            Err(KeyParseError::Length(3))
        );
        assert!(PublicKey::from_base64(&"A".repeat(1000)).is_err());
        assert!(format!("{:?}", PrivateKey::from_bytes([1; 32])).contains("redacted"));
    }
}
