//! Per-flow sequence-number and timestamp translation, in place.
//!
//! A socket restored on another node (see [`crate::stack`]'s migration methods) has its own
//! initial sequence number and its own timestamp clock, while the client still speaks in the
//! numbers of the node that accepted the connection. A [`Translation`] maps between the two:
//!
//! | direction | field | rewrite |
//! |---|---|---|
//! | outbound (us → client) | sequence number | `+= seq_off` |
//! | outbound | TSval | `+= ts_off` |
//! | outbound | acknowledgement number | `+= rcv_off` |
//! | outbound | SACK blocks (they name the client's bytes) | `+= rcv_off` |
//! | inbound (client → us) | sequence number | `-= rcv_off` |
//! | inbound | acknowledgement number | `-= seq_off` |
//! | inbound | SACK blocks (they name our bytes) | `-= seq_off` |
//! | inbound | TSecr | `-= ts_off` |
//!
//! The client → us sequence space starts untranslated (`rcv_off` 0): a restore hands the
//! socket the client's own numbers. It moves when the app takes an in-order payload straight
//! from the packet, without smoltcp's copy into the socket's ring ([`crate::stack`]'s direct
//! receive): the socket never sees those bytes, so the client's numbers run ahead of the
//! socket's by `rcv_off`. The same layer serves any flow whose local numbers differ from the
//! wire's (unpredictable or cookie-derived initial sequence numbers).
//!
//! Checksums: an outbound packet's TCP checksum is recomputed when the stack computes
//! checksums (`fix_checksum`); with checksum offload the device completes it. Inbound packets
//! were verified when classified and smoltcp does not verify them again, so their checksum
//! field is left stale.
//!
//! # Hostile input
//! Inbound packets come from the network. Every rewrite works on checked views and walks TCP
//! options with bounds checks; a packet that does not parse is left untouched and reported.

use smoltcp::wire::{Ipv4Packet, TcpPacket, TcpSeqNumber};

/// TCP option kinds rewritten here.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;

/// Offsets between a flow's local and wire numbers. See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Translation {
    /// Wire sequence number minus local sequence number, for our direction.
    pub seq_off: u32,
    /// Wire TSval minus local TSval, for our timestamps.
    pub ts_off: u32,
    /// Wire sequence number minus local sequence number, for the client's direction: the
    /// bytes the app took straight from packets, which the socket never saw.
    pub rcv_off: u32,
}

/// Why a packet was not translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Not an IPv4 packet carrying a complete TCP header.
    #[error("not an IPv4/TCP packet")]
    Malformed,
}

/// An inbound acknowledgement beyond what the local socket has sent, but not beyond what the
/// flow's previous owner had sent: the client acknowledges bytes it got before the move, which
/// the restored socket has queued but not yet (re)sent. smoltcp answers an ACK of unsent data
/// with a challenge ACK and drops the segment (its payload too), so such ACKs are lowered to
/// `sent` until the socket catches up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckCeiling {
    /// Local sequence number up to which the socket has sent (highest seen outbound).
    pub sent: u32,
    /// Local image of the previous owner's `snd_nxt`: ACKs up to here are legitimate.
    pub claimed: u32,
}

impl Translation {
    /// True when nothing would change.
    pub fn is_identity(&self) -> bool {
        self.seq_off == 0 && self.ts_off == 0 && self.rcv_off == 0
    }

    /// Rewrites an outbound IPv4/TCP packet from local to wire numbers; with `fix_checksum`,
    /// recomputes the TCP checksum.
    ///
    /// `ack_floor` (local) raises the sequence number of a pure ACK (no data, SYN, FIN or RST)
    /// that lies below it: a restored socket starts at the previous owner's `snd_una` and, until
    /// it has resent what that owner had sent, would stamp its ACKs with numbers the client
    /// has already received — which the client discards, window update and all (RFC 9293's
    /// acceptability test), and which smoltcp clients never get past.
    pub fn outbound(
        &self,
        packet: &mut [u8],
        fix_checksum: bool,
        ack_floor: Option<u32>,
    ) -> Result<(), TranslateError> {
        let mut ip = Ipv4Packet::new_checked(packet).map_err(|_| TranslateError::Malformed)?;
        let mut tcp =
            TcpPacket::new_checked(ip.payload_mut()).map_err(|_| TranslateError::Malformed)?;
        let old_seq = tcp.seq_number().0 as u32;
        let mut local = old_seq;
        if let Some(floor) = ack_floor
            && tcp.payload_mut().is_empty()
            && !(tcp.syn() || tcp.fin() || tcp.rst())
            && seq_gt(floor, local)
        {
            local = floor;
        }
        let seq = local.wrapping_add(self.seq_off);
        tcp.set_seq_number(TcpSeqNumber(seq as i32));
        // The checksum is updated for what changed (RFC 1624), not recomputed over the
        // payload: sequence and acknowledgement numbers (at even offsets), TSval and SACK
        // edges (anywhere in the options).
        let mut delta = Delta::default();
        delta.replace(old_seq, seq, false);
        let (ts_off, rcv_off) = (self.ts_off, self.rcv_off);
        if rcv_off != 0 && tcp.ack() {
            let old = tcp.ack_number().0 as u32;
            let new = old.wrapping_add(rcv_off);
            tcp.set_ack_number(TcpSeqNumber(new as i32));
            delta.replace(old, new, false);
        }
        if ts_off != 0 || rcv_off != 0 {
            for_each_option(tcp.options_mut(), |kind, body, odd| match kind {
                OPT_TIMESTAMP if body.len() == 8 && ts_off != 0 => {
                    let old = be32(&body[0..4]);
                    let new = old.wrapping_add(ts_off);
                    body[0..4].copy_from_slice(&new.to_be_bytes());
                    delta.replace(old, new, odd);
                }
                OPT_SACK if body.len() % 8 == 0 && rcv_off != 0 => {
                    for edge in body.chunks_exact_mut(4) {
                        let old = be32(edge);
                        let new = old.wrapping_add(rcv_off);
                        edge.copy_from_slice(&new.to_be_bytes());
                        // Edges are 4 bytes apart: all share the option body's parity.
                        delta.replace(old, new, odd);
                    }
                }
                _ => {}
            });
        }
        if fix_checksum {
            let check = tcp.checksum();
            tcp.set_checksum(delta.apply(check));
        }
        Ok(())
    }

    /// Rewrites an inbound IPv4/TCP packet from wire to local numbers (its checksum is left
    /// stale: see the module docs), lowering an ACK of bytes the socket has not sent yet as
    /// `ceiling` says. Returns the local acknowledgement number (if the packet has ACK set).
    pub fn inbound(
        &self,
        packet: &mut [u8],
        ceiling: Option<AckCeiling>,
    ) -> Result<Option<u32>, TranslateError> {
        let mut ip = Ipv4Packet::new_checked(packet).map_err(|_| TranslateError::Malformed)?;
        let mut tcp =
            TcpPacket::new_checked(ip.payload_mut()).map_err(|_| TranslateError::Malformed)?;
        if self.rcv_off != 0 {
            let seq = (tcp.seq_number().0 as u32).wrapping_sub(self.rcv_off);
            tcp.set_seq_number(TcpSeqNumber(seq as i32));
        }
        let mut local_ack = None;
        if tcp.ack() {
            let mut ack = (tcp.ack_number().0 as u32).wrapping_sub(self.seq_off);
            if let Some(c) = ceiling
                && seq_gt(ack, c.sent)
                && !seq_gt(ack, c.claimed)
            {
                ack = c.sent;
            }
            tcp.set_ack_number(TcpSeqNumber(ack as i32));
            local_ack = Some(ack);
        }
        // TSecr means something only with ACK set (RFC 7323): a SYN's is left alone.
        let (seq_off, ts_off) = (self.seq_off, if tcp.ack() { self.ts_off } else { 0 });
        for_each_option(tcp.options_mut(), |kind, body, _| match kind {
            OPT_TIMESTAMP if body.len() == 8 => sub_be32(&mut body[4..8], ts_off),
            OPT_SACK if body.len() % 8 == 0 => {
                for edge in body.chunks_exact_mut(4) {
                    sub_be32(edge, seq_off);
                }
            }
            _ => {}
        });
        Ok(local_ack)
    }
}

/// `a > b` in 32-bit sequence space.
pub fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn be32(field: &[u8]) -> u32 {
    <[u8; 4]>::try_from(field).map_or(0, u32::from_be_bytes)
}

/// An incremental Internet-checksum update (RFC 1624, eqn. 3): `HC' = ~(~HC + ~m + m')`,
/// summed over every replaced 32-bit field.
#[derive(Default)]
struct Delta {
    sum: u64,
}

impl Delta {
    /// Accounts for `old` replaced by `new`; `odd` when the field starts at an odd offset
    /// from the start of the TCP header (its bytes then sit in swapped halves of the
    /// checksum's 16-bit words).
    fn replace(&mut self, old: u32, new: u32, odd: bool) {
        let (old, new) = if odd {
            (old.rotate_right(8), new.rotate_right(8))
        } else {
            (old, new)
        };
        for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
            self.sum += u64::from(!(o as u16)) + n as u64;
        }
    }

    fn apply(&self, check: u16) -> u16 {
        let mut sum = u64::from(!check) + self.sum;
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

fn add_be32(field: &mut [u8], off: u32) {
    if let Ok(b) = <[u8; 4]>::try_from(&field[..]) {
        field.copy_from_slice(&u32::from_be_bytes(b).wrapping_add(off).to_be_bytes());
    }
}

fn sub_be32(field: &mut [u8], off: u32) {
    add_be32(field, off.wrapping_neg());
}

/// Calls `f(kind, body, odd)` for every well-formed option in `options` (which start 20 bytes
/// into the TCP header), `odd` when the body starts at an odd offset; stops at the
/// end-of-list option or at the first malformed length.
fn for_each_option(mut options: &mut [u8], mut f: impl FnMut(u8, &mut [u8], bool)) {
    let mut at = 0usize;
    loop {
        let Some(&kind) = options.first() else { return };
        match kind {
            OPT_END => return,
            OPT_NOP => {
                options = &mut options[1..];
                at += 1;
            }
            _ => {
                let Some(&len) = options.get(1) else { return };
                let len = usize::from(len);
                if len < 2 || len > options.len() {
                    return;
                }
                let (this, rest) = options.split_at_mut(len);
                f(kind, &mut this[2..], (at + 2) % 2 == 1);
                options = rest;
                at += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, TcpControl, TcpRepr, TcpTimestampRepr};

    use super::*;
    use crate::packet::emit_ipv4_tcp;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    fn repr(seq: u32, ack: Option<u32>, sack: [Option<(u32, u32)>; 3]) -> TcpRepr<'static> {
        TcpRepr {
            src_port: 80,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: sack,
            timestamp: Some(TcpTimestampRepr {
                tsval: 100,
                tsecr: 7,
            }),
            payload: b"abc",
        }
    }

    fn parse(p: &[u8]) -> TcpRepr<'_> {
        let ip = Ipv4Packet::new_checked(p).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        TcpRepr::parse(
            &tcp,
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr()),
            &ChecksumCapabilities::default(),
        )
        .expect("checksum and header valid")
    }

    #[test]
    fn outbound_shifts_seq_and_tsval_with_a_valid_checksum() {
        let t = Translation {
            seq_off: 0xffff_fff0,
            ts_off: 1_000_000,
            rcv_off: 0,
        };
        let mut p = emit_ipv4_tcp(A, B, &repr(0x20, Some(5), [None; 3]));
        t.outbound(&mut p, true, None).unwrap();
        let r = parse(&p);
        assert_eq!(r.seq_number, TcpSeqNumber(0x10)); // wrapped
        assert_eq!(r.ack_number, Some(TcpSeqNumber(5))); // the client's space: untouched
        assert_eq!(r.timestamp.unwrap().tsval, 1_000_100);
        assert_eq!(r.timestamp.unwrap().tsecr, 7);
        assert_eq!(r.payload, b"abc");
    }

    #[test]
    fn with_a_receive_offset_outbound_acks_and_sacks_move_up_with_a_valid_checksum() {
        let t = Translation {
            seq_off: 7,
            ts_off: 0,
            rcv_off: 0xffff_ff00,
        };
        let sack = [Some((0x200, 0x300)), Some((0x400, 0x500)), None];
        let mut p = emit_ipv4_tcp(A, B, &repr(0x20, Some(0x150), sack));
        t.outbound(&mut p, true, None).unwrap();
        let r = parse(&p); // fails on a wrong checksum
        assert_eq!(r.seq_number, TcpSeqNumber(0x27));
        assert_eq!(r.ack_number, Some(TcpSeqNumber(0x50))); // wrapped
        assert_eq!(
            r.sack_ranges,
            [Some((0x100, 0x200)), Some((0x300, 0x400)), None]
        );
        assert_eq!(r.timestamp.unwrap().tsval, 100);
        // A packet without ACK (a SYN) keeps its acknowledgement field.
        let mut syn = repr(0x20, None, [None; 3]);
        syn.control = TcpControl::Syn;
        syn.payload = b"";
        let mut p = emit_ipv4_tcp(A, B, &syn);
        t.outbound(&mut p, true, None).unwrap();
        assert_eq!(parse(&p).ack_number, None);
    }

    #[test]
    fn with_a_receive_offset_inbound_sequence_numbers_move_down() {
        let t = Translation {
            seq_off: 1000,
            ts_off: 0,
            rcv_off: 300,
        };
        let mut p = emit_ipv4_tcp(B, A, &repr(100, Some(2000), [None; 3]));
        assert_eq!(t.inbound(&mut p, None), Ok(Some(1000)));
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(
            tcp.seq_number(),
            TcpSeqNumber(100u32.wrapping_sub(300) as i32)
        );
        assert_eq!(tcp.payload(), b"abc");
    }

    #[test]
    fn the_incremental_checksum_is_right_for_any_offsets_and_an_odd_aligned_timestamp() {
        // Options laid out as [NOP, TS, NOP, NOP, NOP]: the TSval starts at an odd offset.
        let mut p = emit_ipv4_tcp(A, B, &repr(0x20, Some(5), [None; 3]));
        {
            let mut ip = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            let mut tcp = TcpPacket::new_checked(ip.payload_mut()).unwrap();
            let opts = tcp.options_mut();
            assert_eq!(opts.len(), 12);
            let at = opts.iter().position(|&b| b == OPT_TIMESTAMP).unwrap();
            let ts: [u8; 10] = opts[at..at + 10].try_into().unwrap();
            opts.fill(OPT_NOP);
            opts[1..11].copy_from_slice(&ts);
            tcp.fill_checksum(&IpAddress::Ipv4(A), &IpAddress::Ipv4(B));
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let t = Translation {
                seq_off: seed as u32,
                ts_off: (seed >> 32) as u32,
                rcv_off: (seed >> 16) as u32,
            };
            let mut q = p.clone();
            t.outbound(&mut q, true, None).unwrap();
            let r = parse(&q); // fails on a wrong checksum
            assert_eq!(
                r.seq_number,
                TcpSeqNumber(0x20u32.wrapping_add(t.seq_off) as i32)
            );
            assert_eq!(r.timestamp.unwrap().tsval, 100u32.wrapping_add(t.ts_off));
            assert_eq!(
                r.ack_number,
                Some(TcpSeqNumber(5u32.wrapping_add(t.rcv_off) as i32))
            );
        }
    }

    #[test]
    fn a_syns_tsecr_is_left_alone() {
        let t = Translation {
            seq_off: 1000,
            ts_off: 50,
            rcv_off: 0,
        };
        let mut syn = repr(9, None, [None; 3]);
        syn.control = TcpControl::Syn;
        syn.payload = b"";
        let mut p = emit_ipv4_tcp(B, A, &syn);
        assert_eq!(t.inbound(&mut p, None), Ok(None));
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(tcp.options_summary().unwrap().timestamp, Some((100, 7)));
    }

    #[test]
    fn a_pure_ack_below_the_floor_is_raised_and_data_is_not() {
        let t = Translation {
            seq_off: 100,
            ts_off: 0,
            rcv_off: 0,
        };
        let mut ack = repr(50, Some(5), [None; 3]);
        ack.payload = b"";
        let mut p = emit_ipv4_tcp(A, B, &ack);
        t.outbound(&mut p, true, Some(80)).unwrap();
        assert_eq!(parse(&p).seq_number, TcpSeqNumber(180));
        let mut p = emit_ipv4_tcp(A, B, &ack);
        t.outbound(&mut p, true, Some(40)).unwrap();
        assert_eq!(parse(&p).seq_number, TcpSeqNumber(150));
        // Data keeps its number: it is a retransmission.
        let mut p = emit_ipv4_tcp(A, B, &repr(50, Some(5), [None; 3]));
        t.outbound(&mut p, true, Some(80)).unwrap();
        assert_eq!(parse(&p).seq_number, TcpSeqNumber(150));
    }

    #[test]
    fn inbound_shifts_ack_sack_and_tsecr() {
        let t = Translation {
            seq_off: 1000,
            ts_off: 50,
            rcv_off: 0,
        };
        let sack = [Some((3000, 4000)), Some((5000, 6000)), None];
        let mut p = emit_ipv4_tcp(B, A, &repr(9, Some(2000), sack));
        assert_eq!(t.inbound(&mut p, None), Ok(Some(1000)));
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(tcp.seq_number(), TcpSeqNumber(9));
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1000));
        let opts = tcp.options_summary().unwrap();
        assert_eq!(opts.timestamp, Some((100, 7u32.wrapping_sub(50))));
        let ranges = TcpRepr::parse(
            &tcp,
            &IpAddress::Ipv4(B),
            &IpAddress::Ipv4(A),
            &ChecksumCapabilities::ignored(),
        )
        .unwrap()
        .sack_ranges;
        assert_eq!(ranges, [Some((2000, 3000)), Some((4000, 5000)), None]);
    }

    #[test]
    fn inbound_ack_beyond_what_was_sent_is_lowered_within_the_claim_only() {
        let t = Translation {
            seq_off: 0,
            ts_off: 0,
            rcv_off: 0,
        };
        let ceiling = Some(AckCeiling {
            sent: 100,
            claimed: 500,
        });
        for (ack, want) in [(50, 50), (100, 100), (101, 100), (500, 100), (501, 501)] {
            let mut p = emit_ipv4_tcp(B, A, &repr(9, Some(ack), [None; 3]));
            assert_eq!(t.inbound(&mut p, ceiling), Ok(Some(want)), "ack {ack}");
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let t = Translation {
            seq_off: 1,
            ts_off: 1,
            rcv_off: 0,
        };
        let good = emit_ipv4_tcp(B, A, &repr(9, Some(1), [Some((1, 2)), None, None]));
        let mut seed = 0x1234_5678_u64;
        for _ in 0..20_000 {
            let mut p = good.clone();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 8) as usize;
            for i in 0..n {
                let at = ((seed >> (8 * i)) as usize) % p.len();
                p[at] = (seed >> (3 * i)) as u8;
            }
            p.truncate((seed >> 40) as usize % (p.len() + 1));
            let _ = t.inbound(&mut p.clone(), None);
            let _ = t.outbound(&mut p, true, Some(7));
        }
    }
}
