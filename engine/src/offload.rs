//! TUN offload (`IFF_VNET_HDR`): the virtio-net header of every packet we write.
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
    fn rejects_what_it_cannot_segment() {
        assert!(prepare(&mut [0u8; 60], 10, 1460).is_err());
        assert!(prepare(&mut [0u8; 60], 4, 1460).is_err());
        let mut short = vec![0u8; 10 + 24];
        short[10] = 0x45;
        short[19] = 6;
        assert!(prepare(&mut short, 10, 1460).is_err());
    }
}
