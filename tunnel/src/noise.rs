//! The Noise handshake through `snow`, and the cheap `mac1` pre-check.
//!
//! Pattern `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` (WireGuard's): the initiator knows the
//! responder's static key in advance, both static keys are authenticated, and the session
//! keys come from ephemeral-ephemeral DH (forward secrecy). When a peer has no pre-shared
//! key configured, 32 zero bytes are used as the PSK (as WireGuard does), so one protocol
//! name covers both cases and a PSK configured on one side only makes the handshake fail.
//!
//! snow draws ephemeral keys from the resolver's RNG; ours is seeded per handshake from the
//! endpoint's own seeded ChaCha20 RNG, so the crate never reads OS randomness itself and
//! tests are deterministic.

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Mac, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState};

use crate::key::{KEY_LEN, PrivateKey, PublicKey};
use crate::wire::MAC_LEN;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Prologue mixed into the handshake hash: binds the wire version.
pub(crate) const PROLOGUE: &[u8] = b"flowshift-tunnel/2";
/// Position of the PSK token in `IKpsk2`.
pub(crate) const PSK_POSITION: u8 = 2;
const MAC1_LABEL: &[u8] = b"flowshift-mac1-v1";

struct SeededRandom(ChaCha20Rng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// snow's default primitives with our RNG.
struct SeededResolver {
    seed: [u8; 32],
}

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(ChaCha20Rng::from_seed(self.seed))))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

fn builder(seed: [u8; 32]) -> Result<Builder<'static>, snow::Error> {
    let params = NOISE_PARAMS.parse()?;
    Builder::with_resolver(params, Box::new(SeededResolver { seed })).prologue(PROLOGUE)
}

/// A handshake as initiator towards `remote`.
pub(crate) fn initiator(
    local: &PrivateKey,
    remote: &PublicKey,
    psk: &[u8; KEY_LEN],
    seed: [u8; 32],
) -> Result<HandshakeState, snow::Error> {
    builder(seed)?
        .local_private_key(local.dangerous_as_bytes())?
        .remote_public_key(remote.as_bytes())?
        .psk(PSK_POSITION, psk)?
        .build_initiator()
}

/// A handshake as responder; the PSK is set once the initiator is known.
pub(crate) fn responder(local: &PrivateKey, seed: [u8; 32]) -> Result<HandshakeState, snow::Error> {
    builder(seed)?
        .local_private_key(local.dangerous_as_bytes())?
        .build_responder()
}

/// The `mac1` key for messages sent *to* the holder of `receiver`.
pub(crate) fn mac1_key(receiver: &PublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, MAC1_LABEL);
    Digest::update(&mut h, receiver.as_bytes());
    h.finalize().into()
}

/// `mac1` over `data`.
pub(crate) fn mac1(key: &[u8; 32], data: &[u8]) -> [u8; MAC_LEN] {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
        .expect("32-byte key is valid for BLAKE2s");
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

/// Constant-time check of `mac1`.
pub(crate) fn verify_mac1(key: &[u8; 32], data: &[u8], mac: &[u8]) -> bool {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
        .expect("32-byte key is valid for BLAKE2s");
    Update::update(&mut m, data);
    m.verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::handshake::{
        INIT_PAYLOAD_LEN, NOISE_INIT_LEN, NOISE_RESPONSE_LEN, RESPONSE_PAYLOAD_LEN,
    };

    #[test]
    fn ik_psk2_round_trip_and_message_lengths() {
        let a = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let psk = [9u8; 32];
        let mut i = initiator(&a, &b.public_key(), &psk, [3; 32]).unwrap();
        let mut r = responder(&b, [4; 32]).unwrap();
        let mut m1 = [0u8; 256];
        let n1 = i.write_message(&[5u8; INIT_PAYLOAD_LEN], &mut m1).unwrap();
        assert_eq!(n1, NOISE_INIT_LEN);
        let mut p = [0u8; 64];
        assert_eq!(r.read_message(&m1[..n1], &mut p).unwrap(), INIT_PAYLOAD_LEN);
        assert_eq!(r.get_remote_static().unwrap(), a.public_key().as_bytes());
        r.set_psk(PSK_POSITION.into(), &psk).unwrap();
        let mut m2 = [0u8; 256];
        let n2 = r
            .write_message(&[6u8; RESPONSE_PAYLOAD_LEN], &mut m2)
            .unwrap();
        assert_eq!(n2, NOISE_RESPONSE_LEN);
        assert_eq!(
            i.read_message(&m2[..n2], &mut p).unwrap(),
            RESPONSE_PAYLOAD_LEN
        );
        assert!(i.is_handshake_finished() && r.is_handshake_finished());
        let (i1, i2) = i.dangerously_get_raw_split();
        let (r1, r2) = r.dangerously_get_raw_split();
        assert_eq!((i1, i2), (r1, r2));
        assert_ne!(i1, i2);
    }

    #[test]
    fn wrong_psk_fails_at_initiator() {
        let a = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let mut i = initiator(&a, &b.public_key(), &[0; 32], [3; 32]).unwrap();
        let mut r = responder(&b, [4; 32]).unwrap();
        let mut m = [0u8; 256];
        let mut p = [0u8; 64];
        let n = i.write_message(&[0; INIT_PAYLOAD_LEN], &mut m).unwrap();
        r.read_message(&m[..n], &mut p).unwrap();
        r.set_psk(2, &[1; 32]).unwrap();
        let n = r.write_message(&[0; RESPONSE_PAYLOAD_LEN], &mut m).unwrap();
        assert!(i.read_message(&m[..n], &mut p).is_err());
    }

    #[test]
    fn a_failed_read_leaves_the_initiator_usable() {
        let a = PrivateKey::from_bytes([1; 32]);
        let b = PrivateKey::from_bytes([2; 32]);
        let mut i = initiator(&a, &b.public_key(), &[0; 32], [3; 32]).unwrap();
        let mut r = responder(&b, [4; 32]).unwrap();
        let mut m = [0u8; 256];
        let mut p = [0u8; 64];
        let n = i.write_message(&[0; INIT_PAYLOAD_LEN], &mut m).unwrap();
        r.read_message(&m[..n], &mut p).unwrap();
        r.set_psk(PSK_POSITION.into(), &[0; 32]).unwrap();
        let n = r.write_message(&[6; RESPONSE_PAYLOAD_LEN], &mut m).unwrap();
        // Forgeries first: random bytes, and the genuine message with one bit flipped.
        assert!(i.read_message(&[0x5a; NOISE_RESPONSE_LEN], &mut p).is_err());
        let mut flipped = m[..n].to_vec();
        flipped[40] ^= 1;
        assert!(i.read_message(&flipped, &mut p).is_err());
        assert!(!i.is_handshake_finished());
        // The genuine one still completes the handshake, with the responder's keys.
        assert_eq!(
            i.read_message(&m[..n], &mut p).unwrap(),
            RESPONSE_PAYLOAD_LEN
        );
        assert_eq!(&p[..RESPONSE_PAYLOAD_LEN], &[6; RESPONSE_PAYLOAD_LEN]);
        assert!(i.is_handshake_finished());
        assert_eq!(i.dangerously_get_raw_split(), r.dangerously_get_raw_split());
    }

    #[test]
    fn mac1_verifies() {
        let k = mac1_key(&PublicKey::from_bytes([7; 32]));
        let m = mac1(&k, b"hello");
        assert!(verify_mac1(&k, b"hello", &m));
        assert!(!verify_mac1(&k, b"hellp", &m));
        assert!(!verify_mac1(
            &mac1_key(&PublicKey::from_bytes([8; 32])),
            b"hello",
            &m
        ));
    }
}
