//! Software segmentation of IPv4/TCP packets, for the tunnel.
//!
//! A tunnel datagram holds about 1,400 bytes, less than one 1,500-byte packet and far less than
//! the 64 KB segments smoltcp emits with TSO or the kernel merges with GRO. A packet that
//! crosses the tunnel is therefore cut into TCP segments that each fit one datagram, as a NIC
//! does for TSO: the IP and TCP headers (options included) are copied onto every piece,
//! sequence numbers advance, FIN and PSH stay on the last piece and CWR on the first, and
//! every piece leaves with full, valid IP and TCP checksums — whatever checksum the input
//! carried (TSO and GRO packets carry only a partial one). That is the tunnel's checksum
//! policy: what crosses it is always complete, so the receiving node may write it to its TUN
//! device or hand it to its stack without knowing where it came from.
//!
//! Splitting a segment into smaller ones is always legal TCP; a lost piece costs one
//! retransmitted piece, where fragmenting the packet across datagrams would lose all of it.

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber};

/// Why a packet could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Not an IPv4 packet carrying a complete TCP header.
    #[error("not an IPv4/TCP packet")]
    Malformed,
    /// The headers alone do not fit the size limit, or a SYN or RST carries more payload
    /// than fits (those are never split).
    #[error("packet cannot be cut to {0} bytes")]
    TooLarge(usize),
}

/// Cuts the IPv4/TCP `packet` into packets of at most `max_len` bytes and hands each to `emit`
/// (one reused buffer, `scratch`). A packet that fits is emitted once, its checksums made
/// complete. Returns the number of packets emitted.
pub fn segment(
    packet: &[u8],
    max_len: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, SegmentError> {
    let ip = Ipv4Packet::new_checked(packet).map_err(|_| SegmentError::Malformed)?;
    if ip.next_header() != IpProtocol::Tcp {
        return Err(SegmentError::Malformed);
    }
    let ip_hl = usize::from(ip.header_len());
    let tcp = TcpPacket::new_checked(ip.payload()).map_err(|_| SegmentError::Malformed)?;
    let tcp_hl = usize::from(tcp.header_len());
    let headers = ip_hl + tcp_hl;
    let payload = tcp.payload();
    let room = max_len.saturating_sub(headers);
    if room == 0 && !payload.is_empty() || headers > max_len {
        return Err(SegmentError::TooLarge(max_len));
    }
    let pieces = if payload.is_empty() {
        1
    } else {
        payload.len().div_ceil(room)
    };
    if pieces > 1 && (tcp.syn() || tcp.rst()) {
        return Err(SegmentError::TooLarge(max_len));
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let seq = tcp.seq_number().0 as u32;
    let ident = ip.ident();
    let (fin, psh, cwr) = (tcp.fin(), tcp.psh(), tcp.cwr());
    let header_bytes = &packet[..headers];
    for i in 0..pieces {
        let start = i * room;
        let chunk = &payload[start.min(payload.len())..(start + room).min(payload.len())];
        scratch.clear();
        scratch.extend_from_slice(header_bytes);
        scratch.extend_from_slice(chunk);
        let last = i + 1 == pieces;
        let total = scratch.len();
        let mut ip = Ipv4Packet::new_unchecked(&mut scratch[..]);
        ip.set_total_len(total as u16);
        ip.set_ident(ident.wrapping_add(i as u16));
        ip.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(&mut scratch[ip_hl..]);
        tcp.set_seq_number(TcpSeqNumber(seq.wrapping_add(start as u32) as i32));
        tcp.set_fin(fin && last);
        tcp.set_psh(psh && last);
        tcp.set_cwr(cwr && i == 0);
        tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        emit(scratch);
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{TcpControl, TcpRepr, TcpTimestampRepr};

    use super::*;
    use crate::packet::emit_ipv4_tcp;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    fn big(payload: &[u8], control: TcpControl) -> Vec<u8> {
        emit_ipv4_tcp(
            A,
            B,
            &TcpRepr {
                src_port: 80,
                dst_port: 40000,
                control,
                seq_number: TcpSeqNumber(-10),
                ack_number: Some(TcpSeqNumber(77)),
                window_len: 500,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: Some(TcpTimestampRepr { tsval: 1, tsecr: 2 }),
                payload,
            },
        )
    }

    #[test]
    fn pieces_reassemble_to_the_original_with_valid_checksums() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut p = big(&payload, TcpControl::Fin);
        // A partial checksum, as TSO hands it over: must not matter.
        p[20 + 16] ^= 0x5a;
        let mut scratch = Vec::new();
        let mut got = Vec::new();
        let mut fins = 0;
        let mut expect_seq = -10i32;
        let n = segment(&p, 1400, &mut scratch, |s| {
            assert!(s.len() <= 1400);
            let ip = Ipv4Packet::new_checked(s).unwrap();
            assert!(ip.verify_checksum());
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let r = TcpRepr::parse(
                &tcp,
                &IpAddress::Ipv4(A),
                &IpAddress::Ipv4(B),
                &ChecksumCapabilities::default(),
            )
            .expect("valid checksum");
            assert_eq!(r.seq_number, TcpSeqNumber(expect_seq));
            assert_eq!(r.ack_number, Some(TcpSeqNumber(77)));
            assert!(r.timestamp.is_some());
            expect_seq = expect_seq.wrapping_add(r.payload.len() as i32);
            fins += usize::from(tcp.fin());
            got.extend_from_slice(r.payload);
        })
        .unwrap();
        assert_eq!(n, 10_000usize.div_ceil(1400 - 20 - 32));
        assert_eq!(got, payload);
        assert_eq!(fins, 1);
    }

    #[test]
    fn a_small_packet_passes_once_with_complete_checksums() {
        let mut p = big(b"hi", TcpControl::Psh);
        p[20 + 16] = 0;
        let mut out = Vec::new();
        assert_eq!(
            segment(&p, 1400, &mut Vec::new(), |s| out = s.to_vec()),
            Ok(1)
        );
        assert_eq!(out, big(b"hi", TcpControl::Psh));
    }

    #[test]
    fn refuses_what_cannot_be_cut() {
        let mut scratch = Vec::new();
        assert_eq!(
            segment(
                &big(&[0; 3000], TcpControl::Syn),
                1400,
                &mut scratch,
                |_| {}
            ),
            Err(SegmentError::TooLarge(1400))
        );
        assert_eq!(
            segment(&big(b"x", TcpControl::Psh), 40, &mut scratch, |_| {}),
            Err(SegmentError::TooLarge(40))
        );
        assert_eq!(
            segment(&[0x45, 0, 0], 1400, &mut scratch, |_| {}),
            Err(SegmentError::Malformed)
        );
    }
}
