//! The Internet checksum (RFC 1071), a word at a time.
//!
//! Every inbound packet not merged by the kernel has its TCP checksum verified over its whole
//! payload ([`crate::packet::classify`]): per uploaded byte, that sum is the stack's largest cost
//! after the copies. smoltcp's own sum adds 16-bit words; this one adds 32-bit words into a
//! 64-bit accumulator, which the compiler vectorises, and folds once at the end. The result is
//! the same: the ones'-complement sum does not depend on how the words are grouped, nor on
//! their byte order as long as the folded result is swapped back (RFC 1071, section 2).

use std::net::Ipv4Addr;

/// IP protocol number of TCP, for the pseudo-header.
const PROTO_TCP: u16 = 6;

/// The ones'-complement sum of `data` as big-endian 16-bit words (an odd last byte padded
/// with a zero byte), folded to 16 bits and not complemented.
pub fn ones_sum(data: &[u8]) -> u16 {
    fold(sum_ne(data)).to_be()
}

/// True if `segment` (a TCP header and payload) carries a valid checksum for the IPv4
/// addresses `src` and `dst` (the length in the pseudo-header is `segment.len()`, which must
/// fit 16 bits — it always does for a segment of an IPv4 packet).
pub fn tcp_ipv4_ok(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> bool {
    let Ok(len) = u16::try_from(segment.len()) else {
        return false;
    };
    let pseudo = words(src) + words(dst) + u64::from(PROTO_TCP) + u64::from(len);
    // The payload is summed in native byte order and swapped back when folded; the
    // pseudo-header words are already big-endian values.
    let data = u64::from(fold(sum_ne(segment)).to_be());
    fold(pseudo + data) == 0xffff
}

/// The two big-endian 16-bit words of an address, added.
fn words(a: Ipv4Addr) -> u64 {
    let o = a.octets();
    u64::from(u16::from_be_bytes([o[0], o[1]])) + u64::from(u16::from_be_bytes([o[2], o[3]]))
}

/// The ones'-complement sum of `data` as native-endian 64-bit words (the tail zero-padded),
/// with end-around carries: it folds to the sum of the native-endian 16-bit words, as
/// 2^16 ≡ 1 modulo 0xffff. Adding with carry eight bytes at a time is the cheapest way to
/// sum in portable code (an add and an add-with-carry per word).
fn sum_ne(data: &[u8]) -> u64 {
    let (words, rest) = data.as_chunks::<8>();
    let mut sum = 0u64;
    for w in words {
        sum = add_carry(sum, u64::from_ne_bytes(*w));
    }
    if !rest.is_empty() {
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        sum = add_carry(sum, u64::from_ne_bytes(tail));
    }
    sum
}

/// `a + b` with the carry out added back in (ones'-complement addition).
fn add_carry(a: u64, b: u64) -> u64 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u64::from(carry)
}

/// Folds a sum of 16-bit words with end-around carries (2^16 ≡ 1 mod 0xffff).
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, TcpPacket};

    /// RFC 1071 as written: big-endian 16-bit words, added into 32 bits, folded.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for w in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// Deterministic bytes (xorshift), so failures reproduce.
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_sum_is_rfc_1071s_for_every_length_and_alignment() {
        let data = bytes(4096, 1);
        for start in 0..8 {
            for len in (0..300).chain([1459, 1460, 1461, 4000]) {
                let d = &data[start..start + len];
                assert_eq!(ones_sum(d), reference(d), "start {start} len {len}");
            }
        }
        // All ones, and all zeros: the two zeros of ones'-complement arithmetic.
        assert_eq!(ones_sum(&[0xff; 64]), reference(&[0xff; 64]));
        assert_eq!(ones_sum(&[0; 64]), 0);
        assert_eq!(ones_sum(&[]), 0);
    }

    #[test]
    fn tcp_verification_agrees_with_smoltcp() {
        let src = Ipv4Addr::new(198, 18, 1, 2);
        let dst = Ipv4Addr::new(198, 19, 255, 1);
        for (i, len) in [20usize, 21, 33, 60, 1480, 1481, 65_515]
            .into_iter()
            .enumerate()
        {
            let mut seg = bytes(len, i as u64 + 7);
            seg[12] = 5 << 4;
            let mut tcp = TcpPacket::new_unchecked(&mut seg[..]);
            tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
            assert!(tcp_ipv4_ok(src, dst, &seg), "len {len}");
            // Any flipped bit is caught, in the payload, the header, or the addresses.
            for at in [0, 16, len / 2, len - 1] {
                seg[at] ^= 0x10;
                assert!(!tcp_ipv4_ok(src, dst, &seg), "len {len} bit at {at}");
                let smol = TcpPacket::new_unchecked(&seg[..]);
                assert!(!smol.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)));
                seg[at] ^= 0x10;
            }
            assert!(!tcp_ipv4_ok(Ipv4Addr::new(198, 18, 1, 3), dst, &seg));
        }
        // Longer than any IPv4 payload: refused, not wrapped.
        assert!(!tcp_ipv4_ok(src, dst, &vec![0; 70_000]));
    }

    #[test]
    fn random_segments_verify_as_smoltcp_says() {
        let src = Ipv4Addr::new(10, 0, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        for seed in 0..2_000u64 {
            let len = 20 + (seed as usize * 7919) % 200;
            let mut seg = bytes(len, seed);
            // Half of them with a valid checksum.
            if seed % 2 == 0 {
                TcpPacket::new_unchecked(&mut seg[..])
                    .fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
            }
            let smol = TcpPacket::new_unchecked(&seg[..])
                .verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
            assert_eq!(tcp_ipv4_ok(src, dst, &seg), smol, "seed {seed}");
        }
    }
}
