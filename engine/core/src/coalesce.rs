//! Merging consecutive TCP segments of a flow into one large segment, for one TSO write.
//!
//! The counterpart of [`crate::segment`]: a connection moved to another node sends its
//! replies back to the node where its packets enter, cut into tunnel-sized segments
//! (~1,400 bytes). Written to the TUN device one by one, each costs a trip through the
//! kernel's whole receive and forwarding path; merged back into a 64 KB segment with a
//! virtio-net GSO header, a run of them costs one. The rules are those of Linux's GRO
//! (`tcp_gro_receive`), so that the kernel's segmentation of the merged packet gives back
//! exactly the packets that were merged:
//!
//! - only IPv4 without options or fragmentation, TCP with ACK and at most PSH besides, and
//!   a non-empty payload;
//! - the same addresses, TOS, TTL, ports, acknowledgement number, window, urgent pointer and
//!   TCP options (timestamps included) as the held packet, and the next sequence number;
//! - every segment as long as the first except the last, which may be shorter; a shorter
//!   segment or one with PSH ends the run (TSO sets PSH on the last segment only);
//! - at most 65,535 bytes of IP packet.
//!
//! Anything else is written as it came, after the held run of its flow, so the order of each
//! flow's packets is kept. Runs of up to [`MAX_HELD`] flows are held at once; [`Coalescer::flush`]
//! writes them all, at the end of each batch.

use smoltcp::wire::{Ipv4Packet, TcpPacket};

/// Flows whose runs are held at once; a packet of another flow writes out the oldest.
pub const MAX_HELD: usize = 8;

/// Largest merged packet: the IPv4 total length field.
pub const MAX_MERGED: usize = 65_535;

/// A run of merged segments of one flow, after `headroom` bytes.
#[derive(Debug)]
struct Run {
    buf: Vec<u8>,
    /// IP + TCP header length.
    headers: usize,
    /// Payload length of the first segment: the GSO segment size.
    seg: usize,
    /// Sequence number the next segment must carry.
    next_seq: u32,
    segments: usize,
}

/// What the coalescer hands its writer: the packet (after `headroom` bytes of `buf`) and its
/// GSO segment size (0: a plain packet).
pub type Emit<'a> = dyn FnMut(&mut Vec<u8>, u16) + 'a;

/// Per-writer merge state; see the module documentation.
#[derive(Debug)]
pub struct Coalescer {
    headroom: usize,
    runs: Vec<Run>,
    spare: Vec<Vec<u8>>,
    merged: u64,
}

/// The parts of a packet that decide whether it merges.
struct Parsed {
    headers: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

fn parse(packet: &[u8]) -> Option<Parsed> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.header_len() != 20
        || ip.next_header() != smoltcp::wire::IpProtocol::Tcp
        || ip.more_frags()
        || ip.frag_offset() != 0
        || usize::from(ip.total_len()) != packet.len()
    {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    // ACK, optionally PSH; nothing else (SYN, FIN, RST, URG, ECE, CWR end or start a run
    // in ways a TSO write cannot reproduce).
    let flags = packet[20 + 13];
    if flags & !0x08 != 0x10 || packet[20 + 12] & 0x0f != 0 {
        return None;
    }
    let headers = 20 + usize::from(tcp.header_len());
    let payload = packet.len() - headers;
    (payload > 0).then_some(Parsed {
        headers,
        seq: tcp.seq_number().0 as u32,
        payload,
        psh: tcp.psh(),
    })
}

/// Whether `packet` (parsed as `p`) continues `run`.
fn continues(run: &Run, headroom: usize, packet: &[u8], p: &Parsed) -> bool {
    let held = &run.buf[headroom..];
    let same = |r: std::ops::Range<usize>| held[r.clone()] == packet[r];
    p.headers == run.headers
        && p.seq == run.next_seq
        && p.payload <= run.seg
        && held.len() + p.payload <= MAX_MERGED
        // version/IHL, TOS
        && same(0..2)
        // TTL, protocol
        && same(8..10)
        // addresses
        && same(12..20)
        // ports
        && same(20..24)
        // acknowledgement, data offset
        && same(28..33)
        // flags but PSH (never held: it ends a run), window
        && held[33] == packet[33] & !0x08
        && same(34..36)
        // after the checksum, the urgent pointer and the options
        && same(38..p.headers)
}

fn same_flow(run: &Run, headroom: usize, packet: &[u8]) -> bool {
    let held = &run.buf[headroom..];
    packet.len() >= 24 && held[12..24] == packet[12..24]
}

impl Coalescer {
    /// A coalescer whose emitted buffers have `headroom` free bytes before the packet (for
    /// the virtio-net header).
    pub fn new(headroom: usize) -> Self {
        Self {
            headroom,
            runs: Vec::with_capacity(MAX_HELD),
            spare: Vec::new(),
            merged: 0,
        }
    }

    /// Segments merged into an earlier one so far (each saved one write).
    pub fn merged(&self) -> u64 {
        self.merged
    }

    /// Adds `packet` (a complete IPv4 packet). What can no longer grow is handed to `emit`.
    pub fn push(&mut self, packet: &[u8], emit: &mut Emit<'_>) {
        let parsed = parse(packet);
        let found = self
            .runs
            .iter()
            .position(|r| same_flow(r, self.headroom, packet));
        if let (Some(i), Some(p)) = (found, &parsed)
            && continues(&self.runs[i], self.headroom, packet, p)
        {
            let run = &mut self.runs[i];
            run.buf.extend_from_slice(&packet[p.headers..]);
            run.next_seq = p.seq.wrapping_add(p.payload as u32);
            run.segments += 1;
            self.merged += 1;
            if p.psh || p.payload < run.seg {
                // The last segment of a TSO write: PSH on the merged packet.
                let run = self.runs.remove(i);
                let headroom = self.headroom;
                if p.psh {
                    let mut run = run;
                    run.buf[headroom + 33] |= 0x08;
                    self.write(run, emit);
                } else {
                    self.write(run, emit);
                }
            }
            return;
        }
        // Not a continuation: the flow's held run goes first, keeping its order.
        if let Some(i) = found {
            let run = self.runs.remove(i);
            self.write(run, emit);
        }
        match parsed {
            Some(p) if !p.psh => {
                if self.runs.len() == MAX_HELD {
                    let oldest = self.runs.remove(0);
                    self.write(oldest, emit);
                }
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(self.headroom, 0);
                buf.extend_from_slice(packet);
                self.runs.push(Run {
                    buf,
                    headers: p.headers,
                    seg: p.payload,
                    next_seq: p.seq.wrapping_add(p.payload as u32),
                    segments: 1,
                });
            }
            _ => {
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.clear();
                buf.resize(self.headroom, 0);
                buf.extend_from_slice(packet);
                emit(&mut buf, 0);
                self.spare.push(buf);
            }
        }
    }

    /// Hands every held run to `emit`.
    pub fn flush(&mut self, emit: &mut Emit<'_>) {
        while !self.runs.is_empty() {
            let run = self.runs.remove(0);
            self.write(run, emit);
        }
    }

    fn write(&mut self, mut run: Run, emit: &mut Emit<'_>) {
        let gso = if run.segments > 1 {
            let total = run.buf.len() - self.headroom;
            let mut ip = Ipv4Packet::new_unchecked(&mut run.buf[self.headroom..]);
            ip.set_total_len(total as u16);
            ip.fill_checksum();
            run.seg as u16
        } else {
            0
        };
        emit(&mut run.buf, gso);
        self.spare.push(run.buf);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr};

    use super::*;
    use crate::packet::emit_ipv4_tcp;
    use crate::segment::segment;

    const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    fn packet(port: u16, seq: u32, payload: &[u8], control: TcpControl, tsval: u32) -> Vec<u8> {
        emit_ipv4_tcp(
            SERVICE,
            CLIENT,
            &TcpRepr {
                src_port: 19,
                dst_port: port,
                control,
                seq_number: TcpSeqNumber(seq as i32),
                ack_number: Some(TcpSeqNumber(77)),
                window_len: 500,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: Some(TcpTimestampRepr { tsval, tsecr: 2 }),
                payload,
            },
        )
    }

    /// Runs `packets` through a coalescer and returns what it wrote: (packet, gso size).
    fn run(packets: &[Vec<u8>]) -> Vec<(Vec<u8>, u16)> {
        let mut c = Coalescer::new(10);
        let mut out = Vec::new();
        let mut emit = |b: &mut Vec<u8>, gso: u16| out.push((b[10..].to_vec(), gso));
        for p in packets {
            c.push(p, &mut emit);
        }
        c.flush(&mut emit);
        out
    }

    /// What the kernel's TSO makes of a written packet.
    fn resegment(packet: &[u8], gso: u16) -> Vec<Vec<u8>> {
        if gso == 0 {
            return vec![packet.to_vec()];
        }
        let headers = 20 + usize::from(packet[32] >> 4) * 4;
        let mut out = Vec::new();
        segment(packet, headers + usize::from(gso), &mut Vec::new(), |p| {
            out.push(p.to_vec())
        })
        .unwrap();
        out
    }

    fn payload(n: usize, from: usize) -> Vec<u8> {
        (from..from + n).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_cut_segment_is_merged_back_into_one_write_that_resegments_to_the_same_packets() {
        let data = payload(20_000, 0);
        let big = packet(40000, 1000, &data, TcpControl::Psh, 5);
        let mut pieces = Vec::new();
        segment(&big, 1400, &mut Vec::new(), |p| pieces.push(p.to_vec())).unwrap();
        assert_eq!(pieces.len(), 15);
        let out = run(&pieces);
        assert_eq!(out.len(), 1, "one write");
        let (merged, gso) = &out[0];
        assert_eq!(usize::from(*gso), pieces[0].len() - 52);
        let ip = Ipv4Packet::new_checked(&merged[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(&merged[52..], &data[..]);
        assert_ne!(merged[33] & 0x08, 0, "PSH on the merged packet");
        // The kernel's segmentation of the write gives back the pieces, byte for byte
        // (checksums aside: the write asks the kernel to fill them).
        let again = resegment(merged, *gso);
        assert_eq!(again.len(), pieces.len());
        for (a, b) in again.iter().zip(&pieces) {
            assert_eq!(a, b);
        }
    }

    #[test]
    fn nothing_is_merged_across_a_gap_a_different_ack_or_different_options() {
        let a = packet(40000, 0, &payload(100, 0), TcpControl::None, 5);
        let gap = packet(40000, 101, &payload(100, 101), TcpControl::None, 5);
        let b = packet(40000, 201, &payload(100, 201), TcpControl::None, 6);
        let out = run(&[a.clone(), gap.clone(), b.clone()]);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|(_, gso)| *gso == 0));
        assert_eq!(out[0].0, a);
        assert_eq!(out[1].0, gap);
        assert_eq!(out[2].0, b);
    }

    #[test]
    fn control_segments_and_pure_acks_pass_alone_in_order() {
        let a = packet(40000, 0, &payload(100, 0), TcpControl::None, 5);
        let b = packet(40000, 100, &payload(100, 100), TcpControl::None, 5);
        let fin = packet(40000, 200, &payload(50, 200), TcpControl::Fin, 5);
        let ack = packet(40000, 250, &[], TcpControl::None, 5);
        let out = run(&[a, b, fin.clone(), ack.clone()]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].1, 100);
        assert_eq!(&out[0].0[52..], &payload(200, 0)[..]);
        assert_eq!(out[1], (fin, 0));
        assert_eq!(out[2], (ack, 0));
    }

    #[test]
    fn a_shorter_segment_ends_the_run_and_a_longer_one_starts_another() {
        let a = packet(40000, 0, &payload(100, 0), TcpControl::None, 5);
        let b = packet(40000, 100, &payload(100, 100), TcpControl::None, 5);
        let short = packet(40000, 200, &payload(40, 200), TcpControl::None, 5);
        let long = packet(40000, 240, &payload(300, 240), TcpControl::None, 5);
        let long2 = packet(40000, 540, &payload(300, 540), TcpControl::None, 5);
        let out = run(&[a, b, short, long, long2]);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].1, out[0].0.len() - 52), (100, 240));
        assert_eq!((out[1].1, out[1].0.len() - 52), (300, 600));
        assert_eq!(&out[1].0[52..], &payload(600, 240)[..]);
    }

    #[test]
    fn interleaved_flows_merge_each_and_keep_their_own_order() {
        let mut packets = Vec::new();
        for i in 0..10u32 {
            for port in [40000, 40001, 40002] {
                packets.push(packet(
                    port,
                    i * 100,
                    &payload(100, i as usize * 100),
                    TcpControl::None,
                    5,
                ));
            }
        }
        let out = run(&packets);
        assert_eq!(out.len(), 3);
        for (merged, gso) in &out {
            assert_eq!(*gso, 100);
            assert_eq!(&merged[52..], &payload(1000, 0)[..]);
        }
    }

    #[test]
    fn more_flows_than_held_runs_write_the_oldest_first() {
        let mut packets = Vec::new();
        for port in 0..(MAX_HELD as u16 + 3) {
            packets.push(packet(
                40000 + port,
                0,
                &payload(10, 0),
                TcpControl::None,
                5,
            ));
        }
        let out = run(&packets);
        assert_eq!(out.len(), packets.len());
        for (o, p) in out.iter().zip(&packets) {
            assert_eq!(&o.0, p);
        }
    }

    #[test]
    fn a_merged_packet_never_exceeds_the_ipv4_length() {
        let mut packets = Vec::new();
        for i in 0..100u32 {
            packets.push(packet(
                40000,
                i * 1400,
                &payload(1400, i as usize * 1400),
                TcpControl::None,
                5,
            ));
        }
        let out = run(&packets);
        assert!(out.len() >= 3);
        let mut data = Vec::new();
        for (p, gso) in &out {
            assert!(p.len() <= MAX_MERGED);
            assert!(*gso == 1400 || *gso == 0);
            data.extend_from_slice(&p[52..]);
        }
        assert_eq!(data, payload(140_000, 0));
    }

    #[test]
    fn garbage_is_written_as_it_came() {
        for junk in [&[][..], &[0x45; 30][..], &[0xff; 80][..]] {
            assert_eq!(run(&[junk.to_vec()]), vec![(junk.to_vec(), 0)]);
        }
    }
}
