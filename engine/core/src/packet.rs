//! Classification of packets read from the TUN device.
//!
//! Every packet is checked once, here, before anything else looks at it: IPv4 header and
//! checksum, no fragments, TCP header and checksum, addressed to one of our service addresses.
//! What fails is dropped with a [`DropReason`] that the stack counts; smoltcp is then told not to
//! verify checksums again.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, TcpPacket, TcpRepr};

use crate::checksum;

/// Why an inbound packet was dropped before reaching a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// IP or TCP checksum mismatch.
    BadChecksum,
    /// An IPv4 fragment (flowshift does not reassemble).
    Fragment,
    /// The packet's flow is frozen and its queue is full.
    FrozenQueueFull,
    /// Truncated, or a header that does not parse.
    Malformed,
    /// Addressed to an address this node does not serve.
    NotForUs,
    /// Not IPv4.
    NotIpv4,
    /// IPv4 but not TCP.
    NotTcp,
}

impl DropReason {
    /// Every reason, for exporting counters.
    pub const ALL: [DropReason; 7] = [
        DropReason::BadChecksum,
        DropReason::Fragment,
        DropReason::FrozenQueueFull,
        DropReason::Malformed,
        DropReason::NotForUs,
        DropReason::NotIpv4,
        DropReason::NotTcp,
    ];

    /// Stable label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BadChecksum => "bad_checksum",
            DropReason::Fragment => "fragment",
            DropReason::FrozenQueueFull => "frozen_queue_full",
            DropReason::Malformed => "malformed",
            DropReason::NotForUs => "not_for_us",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::NotTcp => "not_tcp",
        }
    }

    /// Index into a counter array of length `ALL.len()`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A TCP connection as seen from the node: the client's endpoint and the service endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The client's address and port.
    pub client: SocketAddrV4,
    /// Our service address and port.
    pub service: SocketAddrV4,
}

/// TCP control bits of interest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK.
    pub ack: bool,
    /// RST.
    pub rst: bool,
    /// FIN.
    pub fin: bool,
}

/// What a valid inbound TCP packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// Its flow.
    pub key: FlowKey,
    /// Control bits.
    pub flags: TcpFlags,
    /// IP total length (the packet may have been longer: link padding is cut).
    pub ip_len: usize,
    /// Sequence number.
    pub seq: u32,
    /// Raw (unscaled) window field.
    pub window: u16,
    /// The client's TSval, if the segment carries timestamps.
    pub tsval: Option<u32>,
    /// TCP payload length.
    pub payload_len: usize,
}

/// Classifies `packet` as read from the TUN device.
///
/// `is_ours` tells whether a destination address is one of ours. Never panics on any input.
pub fn classify(packet: &[u8], is_ours: impl Fn(Ipv4Addr) -> bool) -> Result<Inbound, DropReason> {
    classify_with(packet, is_ours, true)
}

/// Like [`classify`]; with `verify_checksums` false, the IP and TCP checksums are not checked
/// (for packets the kernel merged from validated segments, whose TCP checksum field holds
/// only a partial sum).
pub fn classify_with(
    packet: &[u8],
    is_ours: impl Fn(Ipv4Addr) -> bool,
    verify_checksums: bool,
) -> Result<Inbound, DropReason> {
    match packet.first() {
        None => return Err(DropReason::Malformed),
        Some(b) if b >> 4 != 4 => return Err(DropReason::NotIpv4),
        Some(_) => {}
    }
    let ip = Ipv4Packet::new_checked(packet).map_err(|_| DropReason::Malformed)?;
    if verify_checksums && !ip.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Err(DropReason::Fragment);
    }
    let dst = ip.dst_addr();
    if !is_ours(dst) {
        return Err(DropReason::NotForUs);
    }
    if ip.next_header() != IpProtocol::Tcp {
        return Err(DropReason::NotTcp);
    }
    let src = ip.src_addr();
    let ip_len = usize::from(ip.total_len());
    let tcp = TcpPacket::new_checked(ip.payload()).map_err(|_| DropReason::Malformed)?;
    // `crate::checksum` rather than smoltcp's `verify_checksum`: the same answer, at a
    // fraction of the cost per payload byte.
    if verify_checksums && !checksum::tcp_ipv4_ok(src, dst, ip.payload()) {
        return Err(DropReason::BadChecksum);
    }
    if tcp.src_port() == 0 || tcp.dst_port() == 0 || src.is_multicast() || src.is_broadcast() {
        return Err(DropReason::Malformed);
    }
    Ok(Inbound {
        key: FlowKey {
            client: SocketAddrV4::new(src, tcp.src_port()),
            service: SocketAddrV4::new(dst, tcp.dst_port()),
        },
        flags: TcpFlags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            rst: tcp.rst(),
            fin: tcp.fin(),
        },
        ip_len,
        seq: tcp.seq_number().0 as u32,
        window: tcp.window_len(),
        tsval: find_timestamp(tcp.options()).map(|(v, _)| v),
        payload_len: tcp.payload().len(),
    })
}

/// The TCP options a SYN or SYN-ACK carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SynOptions {
    /// Initial sequence number.
    pub isn: u32,
    /// Maximum segment size.
    pub mss: Option<u16>,
    /// Window scale shift.
    pub window_scale: Option<u8>,
    /// SACK permitted.
    pub sack_permitted: bool,
    /// Timestamps: (TSval, TSecr) of the SYN.
    pub timestamp: Option<(u32, u32)>,
    /// Raw window field of the SYN.
    pub window: u16,
}

/// Reads the options of a SYN or SYN-ACK at the IPv4 packet `packet`. Returns `None` if the packet
/// does not parse (callers use it on packets already classified or emitted by smoltcp).
pub fn syn_options(packet: &[u8]) -> Option<SynOptions> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let summary = tcp.options_summary().ok()?;
    Some(SynOptions {
        isn: tcp.seq_number().0 as u32,
        mss: summary.max_segment_size,
        window_scale: summary.window_scale,
        sack_permitted: summary.sack_permitted,
        timestamp: summary.timestamp,
        window: tcp.window_len(),
    })
}

/// Finds the TCP timestamp option (TSval, TSecr) in `options` without allocating; `None` if there
/// is none or the options are malformed.
pub fn find_timestamp(mut options: &[u8]) -> Option<(u32, u32)> {
    while let Some(&kind) = options.first() {
        match kind {
            0 => return None,
            1 => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1)?);
                if len < 2 || len > options.len() {
                    return None;
                }
                if kind == 8 && len == 10 {
                    let v = &options[2..10];
                    let tsval = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                    let tsecr = u32::from_be_bytes([v[4], v[5], v[6], v[7]]);
                    return Some((tsval, tsecr));
                }
                options = &options[len..];
            }
        }
    }
    None
}

/// What the stack needs of a packet it emits: its flow and whether it is a SYN-ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// Its flow.
    pub key: FlowKey,
    /// Control bits.
    pub flags: TcpFlags,
    /// Raw window field.
    pub window: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number, if ACK is set.
    pub ack: Option<u32>,
    /// Our TSval, if the packet carries timestamps.
    pub tsval: Option<u32>,
    /// TCP payload length.
    pub payload_len: usize,
}

impl Outbound {
    /// The sequence number after this segment (SYN and FIN count one each).
    pub fn seq_end(&self) -> u32 {
        self.seq
            .wrapping_add(self.payload_len as u32)
            .wrapping_add(u32::from(self.flags.syn) + u32::from(self.flags.fin))
    }
}

/// Parses a packet smoltcp emitted; `None` for anything that is not IPv4/TCP.
pub fn outbound(packet: &[u8]) -> Option<Outbound> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(Outbound {
        key: FlowKey {
            client: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
            service: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
        },
        flags: TcpFlags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            rst: tcp.rst(),
            fin: tcp.fin(),
        },
        window: tcp.window_len(),
        seq: tcp.seq_number().0 as u32,
        ack: tcp.ack().then(|| tcp.ack_number().0 as u32),
        tsval: find_timestamp(tcp.options()).map(|(v, _)| v),
        payload_len: tcp.payload().len(),
    })
}

/// Builds the IPv4 packet carrying `tcp` from `src` to `dst`, checksums filled in (for packets
/// the stack crafts itself, and for tests).
pub fn emit_ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr, tcp: &TcpRepr<'_>) -> Vec<u8> {
    let ip = IpRepr::Ipv4(Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    });
    let mut buf = vec![0u8; ip.buffer_len()];
    let checksums = ChecksumCapabilities::default();
    ip.emit(&mut buf[..], &checksums);
    let mut t = TcpPacket::new_unchecked(&mut buf[ip.header_len()..]);
    tcp.emit(&mut t, &ip.src_addr(), &ip.dst_addr(), &checksums);
    buf
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr};

    pub(crate) const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    pub(crate) const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

    /// Builds a valid IPv4/TCP packet.
    pub(crate) fn tcp_packet(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        control: TcpControl,
        seq: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: None,
            window_len: 64240,
            window_scale: if control == TcpControl::Syn {
                Some(7)
            } else {
                None
            },
            max_seg_size: if control == TcpControl::Syn {
                Some(1460)
            } else {
                None
            },
            sack_permitted: control == TcpControl::Syn,
            sack_ranges: [None; 3],
            timestamp: Some(TcpTimestampRepr {
                tsval: 1000,
                tsecr: 0,
            }),
            payload,
        };
        emit_ipv4_tcp(*src.ip(), *dst.ip(), &tcp)
    }

    fn ours(a: Ipv4Addr) -> bool {
        a == SERVICE
    }

    fn syn() -> Vec<u8> {
        tcp_packet(
            SocketAddrV4::new(CLIENT, 40000),
            SocketAddrV4::new(SERVICE, 80),
            TcpControl::Syn,
            12345,
            &[],
        )
    }

    #[test]
    fn classifies_a_syn() {
        let p = syn();
        let c = classify(&p, ours).unwrap();
        assert_eq!(c.key.client, SocketAddrV4::new(CLIENT, 40000));
        assert_eq!(c.key.service, SocketAddrV4::new(SERVICE, 80));
        assert!(c.flags.syn && !c.flags.ack);
        assert_eq!(c.seq, 12345);
        let o = syn_options(&p).unwrap();
        assert_eq!(o.isn, 12345);
        assert_eq!(o.mss, Some(1460));
        assert_eq!(o.window_scale, Some(7));
        assert!(o.sack_permitted);
        assert_eq!(o.timestamp, Some((1000, 0)));
    }

    #[test]
    fn rejects_bad_input() {
        let p = syn();
        assert_eq!(classify(&[], ours), Err(DropReason::Malformed));
        assert_eq!(classify(&[0x60; 60], ours), Err(DropReason::NotIpv4));
        for cut in 1..p.len() {
            assert!(classify(&p[..cut], ours).is_err(), "truncated to {cut}");
        }
        let mut bad = p.clone();
        *bad.last_mut().unwrap() ^= 0xff; // TCP header byte: checksum breaks
        assert_eq!(classify(&bad, ours), Err(DropReason::BadChecksum));
        let mut bad = p.clone();
        bad[8] ^= 1; // TTL: IP checksum breaks
        assert_eq!(classify(&bad, ours), Err(DropReason::BadChecksum));
        assert_eq!(classify(&p, |_| false), Err(DropReason::NotForUs));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let base = syn();
        for i in 0..20_000 {
            let mut p = base.clone();
            let n = 1 + (i % 6);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % p.len();
                p[at] = (x >> 32) as u8;
            }
            p.truncate(1 + (x as usize >> 40) % p.len());
            let _ = classify(&p, ours);
            let _ = syn_options(&p);
            let _ = outbound(&p);
        }
    }

    #[test]
    fn finds_timestamps() {
        let opts = [1, 1, 8, 10, 0, 0, 0, 5, 0, 0, 0, 7];
        assert_eq!(find_timestamp(&opts), Some((5, 7)));
        assert_eq!(find_timestamp(&[2, 4, 5, 180, 8, 10, 0]), None);
        assert_eq!(find_timestamp(&[3, 0]), None);
        assert_eq!(find_timestamp(&[0, 8, 10]), None);
    }
}
