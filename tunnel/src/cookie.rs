//! WireGuard's cookie mechanism (WireGuard paper §5.4.7): a responder under load makes an
//! initiator prove that it receives packets at its source address before spending a DH.
//!
//! * The responder keeps a random secret, replaced every [`SECRET_LIFETIME`] (2 min). The
//!   cookie of a source address is `BLAKE2s-128(key = secret, ip bytes || port LE)`: nobody
//!   can compute it without the secret, and it is only sent to that address.
//! * Under load, an initiation without a valid `mac2` (keyed BLAKE2s-128 over the message up
//!   to `mac2`, keyed with the cookie) gets no DH but a cookie reply: the cookie sealed with
//!   XChaCha20-Poly1305 under `BLAKE2s-256("flowshift-cookie-v1" || responder public key)`,
//!   a random 24-byte nonce, and the initiation's `mac1` as associated data (so only its
//!   initiator accepts the reply, and a reply cannot be replayed for another initiation).
//! * The initiator stores the cookie with the time it arrived and puts `mac2` on its
//!   initiations for [`COOKIE_LIFETIME`] (it resends the initiation answered at once).
//! * An initiation with a valid `mac2` comes from the owner of its source address (or from
//!   a replay of one, which the endpoint filters), so it is limited by a bucket per source
//!   that spoofed floods cannot touch.
//!
//! Everything here is keyed hashing and one AEAD; time and randomness come from the caller.

use std::net::SocketAddr;
use std::time::Duration;

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, Mac, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use zeroize::Zeroize;

use crate::key::PublicKey;
use crate::time::Instant;
use crate::wire::cookie::{COOKIE_NONCE_LEN, COOKIE_REPLY_LEN};
use crate::wire::{CookieReply, CookieReplyRepr, MAC_LEN};

/// Length of a cookie.
pub(crate) const COOKIE_LEN: usize = 16;
/// The responder's secret changes this often; cookies made with an older one are invalid.
pub(crate) const SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// An initiator puts `mac2` on its initiations this long after a cookie arrived: a little
/// less than [`SECRET_LIFETIME`], so it never sends one made with a secret just rotated out
/// (WireGuard keeps the same 5 s margin).
pub(crate) const COOKIE_LIFETIME: Duration = Duration::from_secs(115);
const COOKIE_LABEL: &[u8] = b"flowshift-cookie-v1";

/// The key that seals cookie replies sent *by* the holder of `responder`.
pub(crate) fn cookie_key(responder: &PublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, COOKIE_LABEL);
    Digest::update(&mut h, responder.as_bytes());
    h.finalize().into()
}

fn keyed_mac(key: &[u8], data: &[&[u8]]) -> Blake2sMac<U16> {
    // Keys here are 16 or 32 bytes, both valid BLAKE2s key lengths.
    let mut m = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(key)
        .expect("16- and 32-byte keys are valid for BLAKE2s");
    for d in data {
        Update::update(&mut m, d);
    }
    m
}

/// `mac2` over `data` (the initiation up to `mac2`).
pub(crate) fn mac2(cookie: &[u8; COOKIE_LEN], data: &[u8]) -> [u8; MAC_LEN] {
    keyed_mac(cookie, &[data]).finalize_fixed().into()
}

/// Constant-time check of `mac2`.
fn verify_mac2(cookie: &[u8; COOKIE_LEN], data: &[u8], mac: &[u8]) -> bool {
    keyed_mac(cookie, &[data]).verify_slice(mac).is_ok()
}

/// Responder side: the rotating secret, cookies, `mac2` checks and cookie replies.
pub(crate) struct CookieMaker {
    /// Current secret; replaced once [`SECRET_LIFETIME`] old.
    secret: [u8; 32],
    /// When `secret` was drawn.
    born: Instant,
    /// Seals our cookie replies (derived from our public key).
    key: [u8; 32],
}

impl Drop for CookieMaker {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl CookieMaker {
    pub(crate) fn new(own: &PublicKey, rng: &mut ChaCha20Rng, now: Instant) -> CookieMaker {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        CookieMaker {
            secret,
            born: now,
            key: cookie_key(own),
        }
    }

    /// The cookie of `from`, with a secret younger than [`SECRET_LIFETIME`].
    fn cookie(
        &mut self,
        rng: &mut ChaCha20Rng,
        now: Instant,
        from: SocketAddr,
    ) -> [u8; COOKIE_LEN] {
        if now - self.born >= SECRET_LIFETIME || now < self.born {
            rng.fill_bytes(&mut self.secret);
            self.born = now;
        }
        // Every initiation under load comes through here: no allocation.
        let (v4, v6);
        let ip: &[u8] = match from.ip() {
            std::net::IpAddr::V4(a) => {
                v4 = a.octets();
                &v4
            }
            std::net::IpAddr::V6(a) => {
                v6 = a.octets();
                &v6
            }
        };
        keyed_mac(&self.secret, &[ip, &from.port().to_le_bytes()])
            .finalize_fixed()
            .into()
    }

    /// Whether `mac` is the `mac2` of `data` with the cookie of `from`.
    pub(crate) fn check_mac2(
        &mut self,
        rng: &mut ChaCha20Rng,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        mac: &[u8],
    ) -> bool {
        let cookie = self.cookie(rng, now, from);
        verify_mac2(&cookie, data, mac)
    }

    /// A cookie reply to the initiation from `from` with `sender_index` and `mac1`.
    pub(crate) fn reply(
        &mut self,
        rng: &mut ChaCha20Rng,
        now: Instant,
        from: SocketAddr,
        sender_index: u32,
        mac1: &[u8],
    ) -> [u8; COOKIE_REPLY_LEN] {
        let mut sealed = [0u8; COOKIE_LEN + 16];
        sealed[..COOKIE_LEN].copy_from_slice(&self.cookie(rng, now, from));
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&self.key));
        let (cookie, tag) = sealed.split_at_mut(COOKIE_LEN);
        // Sealing 16 bytes cannot exceed the AEAD's length limit.
        if let Ok(t) = cipher.encrypt_in_place_detached(XNonce::from_slice(&nonce), mac1, cookie) {
            tag.copy_from_slice(&t);
        }
        let mut out = [0u8; COOKIE_REPLY_LEN];
        let mut view = CookieReply::new_unchecked(&mut out[..]);
        CookieReplyRepr {
            receiver_index: sender_index,
        }
        .emit(&mut view);
        view.nonce_mut().copy_from_slice(&nonce);
        view.sealed_cookie_mut().copy_from_slice(&sealed);
        out
    }
}

/// Initiator side: the cookie in `reply`, if it was sealed by the holder of the key `key`
/// was derived from ([`cookie_key`]) for the initiation whose `mac1` is `mac1`.
pub(crate) fn open_reply(
    key: &[u8; 32],
    mac1: &[u8],
    reply: &CookieReply<&[u8]>,
) -> Option<[u8; COOKIE_LEN]> {
    let sealed = reply.sealed_cookie();
    let mut cookie = [0u8; COOKIE_LEN];
    cookie.copy_from_slice(&sealed[..COOKIE_LEN]);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(reply.nonce()),
            mac1,
            &mut cookie,
            Tag::from_slice(&sealed[COOKIE_LEN..]),
        )
        .ok()?;
    Some(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    use crate::key::PrivateKey;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cookie_reply_round_trip_binds_key_mac1_and_address() {
        let responder = PrivateKey::from_bytes([2; 32]).public_key();
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let t0 = Instant::from_secs(1);
        let mut maker = CookieMaker::new(&responder, &mut rng, t0);
        let from = addr("198.18.2.2:51820");
        let mac1 = [7u8; MAC_LEN];
        let reply = maker.reply(&mut rng, t0, from, 42, &mac1);
        let view = CookieReply::new_checked(&reply[..]).unwrap();
        assert_eq!(CookieReplyRepr::parse(&view).unwrap().receiver_index, 42);
        let key = cookie_key(&responder);
        let cookie = open_reply(&key, &mac1, &view).expect("opens");
        // The initiator's mac2 verifies at the responder, for that address only.
        let msg = [9u8; 136];
        let m = mac2(&cookie, &msg);
        assert!(maker.check_mac2(&mut rng, t0, from, &msg, &m));
        assert!(!maker.check_mac2(&mut rng, t0, addr("198.18.2.2:51821"), &msg, &m));
        assert!(!maker.check_mac2(&mut rng, t0, addr("198.18.2.3:51820"), &msg, &m));
        assert!(!maker.check_mac2(&mut rng, t0, from, &[8u8; 136], &m));
        assert!(!maker.check_mac2(&mut rng, t0, from, &msg, &[0; MAC_LEN]));
        // Wrong associated data (another initiation) or key (another responder): refused.
        assert!(open_reply(&key, &[8u8; MAC_LEN], &view).is_none());
        let other = cookie_key(&PrivateKey::from_bytes([3; 32]).public_key());
        assert!(open_reply(&other, &mac1, &view).is_none());
        let mut tampered = reply;
        tampered[40] ^= 1;
        let view = CookieReply::new_checked(&tampered[..]).unwrap();
        assert!(open_reply(&key, &mac1, &view).is_none());
        // Two replies use different nonces.
        let again = maker.reply(&mut rng, t0, from, 42, &mac1);
        assert_ne!(reply[8..32], again[8..32]);
    }

    #[test]
    fn secret_rotates_every_two_minutes() {
        let responder = PrivateKey::from_bytes([2; 32]).public_key();
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let t0 = Instant::from_secs(1);
        let mut maker = CookieMaker::new(&responder, &mut rng, t0);
        let from = addr("198.18.2.2:51820");
        let c0 = maker.cookie(&mut rng, t0, from);
        assert_eq!(
            maker.cookie(&mut rng, t0 + Duration::from_secs(119), from),
            c0
        );
        let c1 = maker.cookie(&mut rng, t0 + SECRET_LIFETIME, from);
        assert_ne!(c1, c0);
        let msg = [1u8; 10];
        assert!(!maker.check_mac2(&mut rng, t0 + SECRET_LIFETIME, from, &msg, &mac2(&c0, &msg)));
        assert!(maker.check_mac2(&mut rng, t0 + SECRET_LIFETIME, from, &msg, &mac2(&c1, &msg)));
    }
}
