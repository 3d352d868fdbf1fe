//! Numbers an off-path attacker must not guess: initial sequence numbers (RFC 6528),
//! per-connection timestamp offsets, and SYN cookies — all keyed hashes of the 4-tuple under a
//! secret the node draws at start (and shares between its workers).
//!
//! # Initial sequence numbers
//! As RFC 6528 and Linux's `secure_tcp_seq`: `ISN = M + F(4-tuple, secret)`, where `M` is a
//! timer ticking every 4 µs and `F` is SipHash-2-4. Consecutive connections' ISNs are not
//! derivable from one another (each 4-tuple has its own offset), they differ between nodes
//! (each has its own secret), and one 4-tuple's successive incarnations still see increasing
//! numbers (the timer). smoltcp draws its own ISNs; the stack maps them onto these with the
//! per-flow [`Translation`](crate::translate::Translation).
//!
//! # Timestamp offsets
//! As Linux's `secure_tcp_ts_off`: every (client, service) address pair sees our TSval clock
//! shifted by its own offset, so timestamps reveal neither the node's uptime nor how its
//! connections relate.
//!
//! # SYN cookies
//! Linux's encoding (`net/ipv4/syncookies.c`). With `count` a minute counter and `data` the
//! index of the client's MSS in [`COOKIE_MSS`]:
//!
//! ```text
//! cookie = H(4-tuple, 0) + client_isn + (count << 24) + ((H(4-tuple, count) + data) & 0xFFFFFF)
//! ```
//!
//! A cookie is valid for [`COOKIE_MAX_AGE_MIN`] minutes. When the client sent timestamps, its
//! window scale and SACK-permitted ride in the low 6 bits of our TSval ([`ts_encode`]), which
//! the client echoes back in TSecr; without timestamps the SYN-ACK offers neither (as Linux).

use std::hash::Hasher;
use std::net::SocketAddrV4;

use siphasher::sip::SipHasher24;
use smoltcp::time::Instant;

/// MSS values a cookie can encode (Linux's `msstab` for IPv4). The client's MSS is rounded
/// down to one of these.
pub const COOKIE_MSS: [u16; 4] = [536, 1300, 1440, 1460];

/// Minutes a cookie stays valid.
pub const COOKIE_MAX_AGE_MIN: u32 = 2;

const COOKIE_BITS: u32 = 24;
const COOKIE_MASK: u32 = (1 << COOKIE_BITS) - 1;

/// Bits of TSval that carry the options of a cookie-answered SYN.
const TS_BITS: u32 = 6;
const TS_WSCALE_MASK: u32 = 0x0f;
const TS_SACK: u32 = 1 << 4;

/// Hash domains: one secret, independent functions.
const DOMAIN_ISN: u8 = 1;
const DOMAIN_TS: u8 = 2;
const DOMAIN_COOKIE: u8 = 3;

/// A node's secret and the keyed functions over it. Cheap to copy.
#[derive(Clone, Copy)]
pub struct Secrets {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

/// The client's handshake options a cookie carries back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieOptions {
    /// MSS, rounded down to a [`COOKIE_MSS`] value.
    pub mss: u16,
    /// The client's window scale (only with timestamps).
    pub window_scale: Option<u8>,
    /// SACK permitted (only with timestamps).
    pub sack_permitted: bool,
}

impl Secrets {
    /// Keys from 16 secret bytes (the rest of a longer secret is ignored).
    pub fn new(secret: &[u8; 16]) -> Self {
        let (a, b) = secret.split_at(8);
        Self {
            k0: u64::from_le_bytes(a.try_into().unwrap_or_default()),
            k1: u64::from_le_bytes(b.try_into().unwrap_or_default()),
        }
    }

    fn hash(&self, domain: u8, client: SocketAddrV4, service: SocketAddrV4, extra: u32) -> u32 {
        let mut h = SipHasher24::new_with_keys(self.k0, self.k1);
        h.write_u8(domain);
        h.write(&client.ip().octets());
        h.write(&service.ip().octets());
        h.write_u16(client.port());
        h.write_u16(service.port());
        h.write_u32(extra);
        h.finish() as u32
    }

    /// Our wire ISN for a connection from `client` to `service` opened at `now` (RFC 6528).
    pub fn isn(&self, client: SocketAddrV4, service: SocketAddrV4, now: Instant) -> u32 {
        let ticks = (now.total_micros() / 4) as u32;
        self.hash(DOMAIN_ISN, client, service, 0)
            .wrapping_add(ticks)
    }

    /// Our TSval offset towards `client` from `service` (ports are not part of it, as Linux:
    /// one address pair sees one clock, which PAWS across port reuse relies on).
    pub fn ts_offset(&self, client: SocketAddrV4, service: SocketAddrV4) -> u32 {
        let a = SocketAddrV4::new(*client.ip(), 0);
        let b = SocketAddrV4::new(*service.ip(), 0);
        self.hash(DOMAIN_TS, a, b, 0)
    }

    /// The SYN cookie answering `client_isn` with the client's `mss` at `now`.
    pub fn cookie(
        &self,
        client: SocketAddrV4,
        service: SocketAddrV4,
        client_isn: u32,
        mss: u16,
        now: Instant,
    ) -> u32 {
        let count = minutes(now);
        let data = COOKIE_MSS.iter().rposition(|&m| m <= mss).unwrap_or(0) as u32;
        self.hash(DOMAIN_COOKIE, client, service, 0)
            .wrapping_add(client_isn)
            .wrapping_add(count << COOKIE_BITS)
            .wrapping_add(
                self.hash(DOMAIN_COOKIE, client, service, count)
                    .wrapping_add(data)
                    & COOKIE_MASK,
            )
    }

    /// Checks `cookie` (the client's ACK number minus one) against the client's ISN (its
    /// sequence number minus one); returns the MSS it encodes if it is valid at `now`.
    pub fn check_cookie(
        &self,
        client: SocketAddrV4,
        service: SocketAddrV4,
        client_isn: u32,
        cookie: u32,
        now: Instant,
    ) -> Option<u16> {
        let count = minutes(now);
        let c = cookie.wrapping_sub(
            self.hash(DOMAIN_COOKIE, client, service, 0)
                .wrapping_add(client_isn),
        );
        let age = count.wrapping_sub(c >> COOKIE_BITS) & (u32::MAX >> COOKIE_BITS);
        if age >= COOKIE_MAX_AGE_MIN {
            return None;
        }
        let data =
            c.wrapping_sub(self.hash(DOMAIN_COOKIE, client, service, count.wrapping_sub(age)))
                & COOKIE_MASK;
        COOKIE_MSS.get(data as usize).copied()
    }
}

/// The minute counter of cookies (8 bits of it survive in the cookie).
fn minutes(now: Instant) -> u32 {
    (now.total_millis().max(0) / 60_000) as u32
}

/// A TSval for a cookie SYN-ACK: `tsval` with its low bits replaced by the client's window
/// scale (`None`: 0xf, "no scaling") and SACK-permitted, never ahead of `tsval` (as Linux's
/// `cookie_init_timestamp`).
pub fn ts_encode(tsval: u32, window_scale: Option<u8>, sack_permitted: bool) -> u32 {
    let mut options = window_scale.map_or(TS_WSCALE_MASK, |w| u32::from(w.min(14)));
    if sack_permitted {
        options |= TS_SACK;
    }
    let mut ts = (tsval >> TS_BITS) << TS_BITS | options;
    if crate::translate::seq_gt(ts, tsval) {
        ts = (((tsval >> TS_BITS).wrapping_sub(1)) << TS_BITS) | options;
    }
    ts
}

/// The client's window scale and SACK-permitted from the TSecr of a cookie's ACK.
pub fn ts_decode(tsecr: u32) -> (Option<u8>, bool) {
    let w = tsecr & TS_WSCALE_MASK;
    let window_scale = (w <= 14).then_some(w as u8);
    (window_scale, tsecr & TS_SACK != 0)
}

impl CookieOptions {
    /// What a cookie's ACK says of the client's options: the cookie's MSS and, if the ACK
    /// carries timestamps, the window scale and SACK-permitted our TSval held.
    pub fn decode(mss: u16, tsecr: Option<u32>) -> Self {
        let (window_scale, sack_permitted) = tsecr.map_or((None, false), ts_decode);
        Self {
            mss,
            window_scale,
            sack_permitted,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn a(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), port)
    }
    fn s() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80)
    }
    const K1: Secrets = Secrets { k0: 1, k1: 2 };
    const K2: Secrets = Secrets { k0: 3, k1: 4 };

    #[test]
    fn isns_follow_the_clock_per_tuple_and_differ_between_tuples_and_nodes() {
        let t0 = Instant::from_millis(10_000);
        let t1 = t0 + smoltcp::time::Duration::from_micros(400);
        // One 4-tuple: the clock advances its ISN by exactly 100 ticks of 4 µs.
        assert_eq!(
            K1.isn(a(1000), s(), t1)
                .wrapping_sub(K1.isn(a(1000), s(), t0)),
            100
        );
        // Neighbouring ports: offsets unrelated (not a small difference either way).
        let d = K1
            .isn(a(1001), s(), t0)
            .wrapping_sub(K1.isn(a(1000), s(), t0));
        assert!(d > 1_000_000 && d < u32::MAX - 1_000_000, "difference {d}");
        // Another node's secret: another ISN for the same 4-tuple at the same time.
        assert_ne!(K1.isn(a(1000), s(), t0), K2.isn(a(1000), s(), t0));
    }

    #[test]
    fn ts_offsets_are_per_address_pair_not_per_port() {
        assert_eq!(K1.ts_offset(a(1000), s()), K1.ts_offset(a(2000), s()));
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 3), 1000);
        assert_ne!(K1.ts_offset(a(1000), s()), K1.ts_offset(other, s()));
        assert_ne!(K1.ts_offset(a(1000), s()), K2.ts_offset(a(1000), s()));
    }

    #[test]
    fn a_cookie_checks_for_two_minutes_and_carries_the_mss_rounded_down() {
        let t0 = Instant::from_millis(3_600_000);
        for (mss, want) in [
            (1460, 1460),
            (1448, 1440),
            (1400, 1300),
            (600, 536),
            (100, 536),
        ] {
            let c = K1.cookie(a(5000), s(), 777, mss, t0);
            assert_eq!(K1.check_cookie(a(5000), s(), 777, c, t0), Some(want));
            let later = t0 + smoltcp::time::Duration::from_secs(119);
            assert_eq!(K1.check_cookie(a(5000), s(), 777, c, later), Some(want));
            let expired = t0 + smoltcp::time::Duration::from_secs(121);
            assert_eq!(K1.check_cookie(a(5000), s(), 777, c, expired), None);
        }
    }

    #[test]
    fn a_cookie_fails_for_another_tuple_another_isn_another_secret_or_a_flipped_bit() {
        let t0 = Instant::from_millis(3_600_000);
        let c = K1.cookie(a(5000), s(), 777, 1460, t0);
        assert_eq!(K1.check_cookie(a(5001), s(), 777, c, t0), None);
        // The client's ISN enters additively (as in Linux): a different one shifts the data
        // field out of the four valid values.
        assert_eq!(K1.check_cookie(a(5000), s(), 777 + 100_000, c, t0), None);
        assert_eq!(K2.check_cookie(a(5000), s(), 777, c, t0), None);
        let mut accepted = 0;
        for bit in 0..32 {
            accepted += usize::from(
                K1.check_cookie(a(5000), s(), 777, c ^ (1 << bit), t0)
                    .is_some(),
            );
        }
        // Bits 0–1 of the data field may land on another valid MSS index; no other bit may.
        assert!(accepted <= 2, "{accepted} flipped cookies accepted");
    }

    #[test]
    fn guessed_cookies_are_rejected_about_as_often_as_the_encoding_allows() {
        // 4 valid data values of 2^24, two valid minutes of 256: ~1 in 2^(22+7) passes.
        let t0 = Instant::from_millis(3_600_000);
        let accepted = (0..200_000u32)
            .filter(|&g| {
                K1.check_cookie(a(5000), s(), 777, g.wrapping_mul(2_654_435_761), t0)
                    .is_some()
            })
            .count();
        assert_eq!(accepted, 0);
    }

    #[test]
    fn timestamp_encoding_round_trips_and_never_runs_ahead() {
        for tsval in [0u32, 1, 63, 64, 1000, u32::MAX] {
            for ws in [None, Some(0), Some(7), Some(14)] {
                for sack in [false, true] {
                    let ts = ts_encode(tsval, ws, sack);
                    assert_eq!(ts_decode(ts), (ws, sack), "tsval {tsval}");
                    assert!(
                        !crate::translate::seq_gt(ts, tsval),
                        "{ts} ahead of {tsval}"
                    );
                    assert!(tsval.wrapping_sub(ts) < 128);
                }
            }
        }
    }
}
