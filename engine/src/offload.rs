//! TUN offload (`IFF_VNET_HDR`): the virtio-net header of every packet we read and write.
//!
//! **Reading.** The kernel hands over what GRO merged as one large TCP packet with a header
//! saying `GSO_TCPV4`. Such packets were validated by the kernel (GRO only merges segments
//! whose checksums were verified, or that a local socket produced and nobody has checksummed
//! yet), so the stack takes them whole, with checksum verification skipped ([`Inbound`]):
//! one pass through smoltcp instead of one per 1460 bytes. A plain packet that asks for its
//! checksum to be completed (`NEEDS_CSUM`) gets it completed here, then is verified as usual.
//!
//! smoltcp, told the device segments TCP (`segmentation-offload`), emits segments larger than
//! the MTU and says which segment size to cut them into. The kernel does the cutting if the
//! packet is preceded by a virtio-net header asking for TCPv4 GSO. smoltcp then leaves TCP
//! checksums to the device (it insists), so every TCP packet asks the kernel to complete its
//! checksum (`NEEDS_CSUM`), with the TCP checksum field holding the pseudo-header sum.

use std::io;

/// Length of the virtio-net header tun-rs uses (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;
const _: () = assert!(VNET_HDR_LEN == tun_rs::VIRTIO_NET_HDR_LEN);
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// A packet read from an offload TUN device, ready for the stack.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// An ordinary packet: verify it.
    Packet(&'a mut [u8]),
    /// A TCPv4 packet the kernel merged (GRO) from validated segments: its checksum field is
    /// not meaningful and must not be verified.
    Merged(&'a mut [u8]),
}

/// Why a read from an offload TUN device was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Shorter than the virtio-net header.
    #[error("shorter than the virtio-net header")]
    Short,
    /// A GSO type other than TCPv4 (flowshift serves TCP over IPv4 only).
    #[error("unsupported GSO type {0}")]
    UnsupportedGso(u8),
    /// `csum_start`/`csum_offset` point outside the packet.
    #[error("checksum offsets outside the packet")]
    BadChecksumOffsets,
}

/// Takes apart what one read from an offload TUN device returned (`raw`: header + packet).
///
/// Never panics on any input; the packet may be completed in place (its checksum).
pub fn parse_read(raw: &mut [u8]) -> Result<Inbound<'_>, ReadError> {
    if raw.len() < VNET_HDR_LEN {
        return Err(ReadError::Short);
    }
    let (hdr, pkt) = raw.split_at_mut(VNET_HDR_LEN);
    let flags = hdr[0];
    let gso_type = hdr[1];
    let csum_start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
    match gso_type & !0x80 {
        // 0x80 is the ECN bit.
        VIRTIO_NET_HDR_GSO_TCPV4 => Ok(Inbound::Merged(pkt)),
        VIRTIO_NET_HDR_GSO_NONE => {
            if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                complete_checksum(pkt, csum_start, csum_offset)?;
            }
            Ok(Inbound::Packet(pkt))
        }
        other => Err(ReadError::UnsupportedGso(other)),
    }
}

/// Completes a partial checksum: the ones'-complement sum from `start` to the end, folded into
/// the 16-bit field at `start + offset` (which holds the pseudo-header sum).
fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), ReadError> {
    let field = start
        .checked_add(offset)
        .ok_or(ReadError::BadChecksumOffsets)?;
    if field + 2 > pkt.len() || start > pkt.len() {
        return Err(ReadError::BadChecksumOffsets);
    }
    let sum = flowshift_core::checksum::ones_sum(&pkt[start..]);
    pkt[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

/// Writes the virtio-net header for the IPv4/TCP packet at `buf[headroom..]` into the
/// `VNET_HDR_LEN` bytes before it — TCPv4 GSO in segments of `gso_size` if it is not 0 — and
/// replaces the TCP checksum with the pseudo-header sum for the kernel to complete.
pub fn prepare(buf: &mut [u8], headroom: usize, gso_size: u16) -> io::Result<()> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("TSO packet: {why}"));
    if headroom < VNET_HDR_LEN {
        return Err(bad("no headroom for the virtio-net header"));
    }
    let (head, pkt) = buf.split_at_mut(headroom);
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 6 {
        return Err(bad("not IPv4/TCP"));
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if pkt.len() < ihl + 20 {
        return Err(bad("truncated"));
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    if thl < 20 || pkt.len() < ihl + thl {
        return Err(bad("bad TCP header length"));
    }
    let tcp_len = (pkt.len() - ihl) as u32;
    let mut sum: u32 = 6 + tcp_len;
    for w in pkt[12..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    pkt[ihl + 16..ihl + 18].copy_from_slice(&(sum as u16).to_be_bytes());
    let hdr = &mut head[headroom - VNET_HDR_LEN..];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[1] = if gso_size > 0 {
        VIRTIO_NET_HDR_GSO_TCPV4
    } else {
        VIRTIO_NET_HDR_GSO_NONE
    };
    hdr[2..4].copy_from_slice(&((ihl + thl) as u16).to_ne_bytes());
    hdr[4..6].copy_from_slice(&gso_size.to_ne_bytes());
    hdr[6..8].copy_from_slice(&(ihl as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_ne_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_packets_only_ask_for_the_checksum() {
        let mut buf = vec![0u8; 10 + 40];
        buf[10] = 0x45;
        buf[19] = 6;
        buf[10 + 32] = 5 << 4;
        prepare(&mut buf, 10, 0).unwrap();
        assert_eq!(&buf[..2], &[1, 0]);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0);
    }

    #[test]
    fn builds_a_tso_header() {
        let mut buf = vec![0u8; 10 + 20 + 20 + 3000];
        let p = &mut buf[10..];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 255, 1]);
        p[16..20].copy_from_slice(&[198, 18, 1, 2]);
        p[20 + 12] = 5 << 4;
        prepare(&mut buf, 10, 1460).unwrap();
        assert_eq!(buf[0], 1);
        assert_eq!(buf[1], 1);
        assert_eq!(u16::from_ne_bytes([buf[2], buf[3]]), 40);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 1460);
        assert_eq!(u16::from_ne_bytes([buf[6], buf[7]]), 20);
        assert_eq!(u16::from_ne_bytes([buf[8], buf[9]]), 16);
        // Pseudo-header: 198.19 + 255.1 + 198.18 + 1.2 + 6 + 3020, folded.
        let mut sum: u32 = 0xc613 + 0xff01 + 0xc612 + 0x0102 + 6 + 3020;
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(u16::from_be_bytes([buf[10 + 36], buf[10 + 37]]), sum as u16);
    }

    #[test]
    fn reads_are_taken_apart_without_panicking() {
        assert_eq!(parse_read(&mut [0u8; 5]), Err(ReadError::Short));
        let mut merged = vec![0u8; 10 + 60];
        merged[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        assert!(matches!(parse_read(&mut merged), Ok(Inbound::Merged(p)) if p.len() == 60));
        let mut udp = vec![0u8; 30];
        udp[1] = 5;
        assert_eq!(parse_read(&mut udp), Err(ReadError::UnsupportedGso(5)));
        let mut bad = vec![0u8; 30];
        bad[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        bad[6..8].copy_from_slice(&100u16.to_ne_bytes());
        assert_eq!(parse_read(&mut bad), Err(ReadError::BadChecksumOffsets));
        for len in 0..64 {
            for flags in [0, 1] {
                let mut r: Vec<u8> = (0..len).map(|i| (i * 37 + flags) as u8).collect();
                if len > 1 {
                    r[0] = flags as u8;
                    r[1] = 0;
                }
                let _ = parse_read(&mut r);
            }
        }
    }

    #[test]
    fn completes_a_partial_checksum_to_a_valid_one() {
        // A real TCP packet with its checksum replaced by the pseudo-header sum, as the kernel
        // hands over CHECKSUM_PARTIAL packets.
        let src = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 1, 2), 40000);
        let dst = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(198, 19, 255, 1), 80);
        let tcp = smoltcp::wire::TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: smoltcp::wire::TcpControl::Psh,
            seq_number: smoltcp::wire::TcpSeqNumber(7),
            ack_number: None,
            window_len: 64240,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: b"",
        };
        // Odd and even lengths, short and full-sized.
        let data: Vec<u8> = (0..1460u32).map(|i| (i * 131 + i / 7) as u8).collect();
        for len in (0..=64).chain([1459, 1460]) {
            let tcp = smoltcp::wire::TcpRepr {
                payload: &data[..len],
                ..tcp
            };
            let good = flowshift_core::packet::emit_ipv4_tcp(*src.ip(), *dst.ip(), &tcp);
            let mut with_hdr = vec![0u8; 10];
            with_hdr.extend_from_slice(&good);
            prepare(&mut with_hdr, 10, 0).unwrap(); // writes NEEDS_CSUM + pseudo-header sum
            assert_ne!(with_hdr[10..], good[..], "len {len}");
            let Ok(Inbound::Packet(p)) = parse_read(&mut with_hdr) else {
                panic!("not a packet")
            };
            assert_eq!(p, &good[..], "len {len}");
        }
    }

    #[test]
    fn rejects_what_it_cannot_segment() {
        assert!(prepare(&mut [0u8; 60], 10, 1460).is_err());
        assert!(prepare(&mut [0u8; 60], 4, 1460).is_err());
        let mut short = vec![0u8; 10 + 24];
        short[10] = 0x45;
        short[19] = 6;
        assert!(prepare(&mut short, 10, 1460).is_err());
    }
}
