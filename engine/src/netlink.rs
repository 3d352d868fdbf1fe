//! Routes into the TUN device, through rtnetlink (no shelling out to `ip`), with the
//! maintained netlink crates: `netlink-packet-route` builds and parses the messages,
//! `netlink-sys` owns the socket. No `unsafe` here.
//!
//! Only what the node needs: add and delete an IPv4 route `prefix dev <ifindex>` in the main
//! table, and read the kernel's acknowledgement. Each call opens its own socket; routes change
//! twice in a node's life.

use std::io;
use std::net::Ipv4Addr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Sequence number of our one request per socket.
const SEQ: u32 = 1;

/// Errors from route changes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be used.
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused the request.
    #[error("kernel refused {what} {prefix}/{len}: {source}")]
    Refused {
        /// `add route` or `delete route`.
        what: &'static str,
        /// The destination.
        prefix: Ipv4Addr,
        /// Its prefix length.
        len: u8,
        /// The errno the kernel answered.
        source: io::Error,
    },
    /// A route to this destination exists already: another node, or one left behind.
    #[error(
        "a route to {prefix}/{len} exists already (another node serving it, or a leftover: \
         `ip route del {prefix}/{len}`); not replacing it"
    )]
    RouteExists {
        /// The destination.
        prefix: Ipv4Addr,
        /// Its prefix length.
        len: u8,
    },
    /// The kernel's answer did not parse.
    #[error("malformed netlink reply")]
    MalformedReply,
}

/// Adds the route `prefix/len dev ifindex`. A route to the same destination that exists
/// already is left alone and reported ([`NetlinkError::RouteExists`]): it is not ours to
/// replace, and removing it on exit would break whoever made it.
pub fn add_route(prefix: Ipv4Addr, len: u8, ifindex: u32) -> Result<(), NetlinkError> {
    let msg = RouteNetlinkMessage::NewRoute(route(prefix, len, ifindex));
    match request(msg, NLM_F_CREATE | NLM_F_EXCL, "add route", prefix, len) {
        Err(NetlinkError::Refused { source, .. })
            if source.raw_os_error() == Some(libc::EEXIST) =>
        {
            Err(NetlinkError::RouteExists { prefix, len })
        }
        other => other,
    }
}

/// Deletes the route `prefix/len dev ifindex`.
pub fn delete_route(prefix: Ipv4Addr, len: u8, ifindex: u32) -> Result<(), NetlinkError> {
    let msg = RouteNetlinkMessage::DelRoute(route(prefix, len, ifindex));
    request(msg, 0, "delete route", prefix, len)
}

/// The route `prefix/len dev ifindex`, main table, static, link scope.
pub(crate) fn route(prefix: Ipv4Addr, len: u8, ifindex: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = len;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(prefix)),
        RouteAttribute::Oif(ifindex),
    ];
    m
}

/// `inner` as a request asking for an acknowledgement, serialised.
pub(crate) fn encode(inner: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = SEQ;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The acknowledgement of request `seq` in the datagram `reply`: `Some(0)` for success,
/// `Some(errno)` for a refusal, `None` if it is not there. Other messages are skipped; a
/// message that does not parse is an error.
pub(crate) fn parse_ack(mut reply: &[u8], seq: u32) -> Result<Option<i32>, NetlinkError> {
    while !reply.is_empty() {
        let len = NetlinkBuffer::new_checked(reply)
            .map_err(|_| NetlinkError::MalformedReply)?
            .length() as usize;
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..len])
            .map_err(|_| NetlinkError::MalformedReply)?;
        if msg.header.sequence_number == seq
            && let NetlinkPayload::Error(e) = msg.payload
        {
            // The kernel answers minus an errno; anything else is not an answer it gives
            // (the fuzzer found i32::MIN, whose negation overflows).
            return match e.code.map(|c| c.get()) {
                None => Ok(Some(0)),
                Some(c) if c < 0 && c > -4096 => Ok(Some(-c)),
                Some(_) => Err(NetlinkError::MalformedReply),
            };
        }
        // Messages are aligned to 4 bytes.
        reply = reply.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(None)
}

fn request(
    inner: RouteNetlinkMessage,
    flags: u16,
    what: &'static str,
    prefix: Ipv4Addr,
    len: u8,
) -> Result<(), NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    let msg = encode(inner, flags);
    socket.send(&msg, 0).map_err(NetlinkError::Socket)?;
    loop {
        let mut buf = Vec::with_capacity(8192);
        socket.recv(&mut buf, 0).map_err(NetlinkError::Socket)?;
        match parse_ack(&buf, SEQ)? {
            None => continue,
            Some(0) => return Ok(()),
            Some(errno) => {
                return Err(NetlinkError::Refused {
                    what,
                    prefix,
                    len,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::ErrorMessage;

    use super::*;

    #[test]
    fn builds_a_route_message_the_kernel_reads_as_ours() {
        let bytes = encode(
            RouteNetlinkMessage::NewRoute(route(Ipv4Addr::new(198, 19, 255, 1), 32, 5)),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        // struct nlmsghdr, struct rtmsg, RTA_DST (8), RTA_OIF (8).
        assert_eq!(bytes.len(), 16 + 12 + 8 + 8);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 24, "RTM_NEWROUTE");
        assert_eq!(
            u16::from_ne_bytes([bytes[6], bytes[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(bytes[16], libc::AF_INET as u8);
        assert_eq!(bytes[17], 32);
        assert_eq!(
            &bytes[20..24],
            &[254, 4, 253, 1],
            "main table, static, link, unicast"
        );
        assert_eq!(&bytes[32..36], &[198, 19, 255, 1]);
        assert_eq!(u32::from_ne_bytes(bytes[40..44].try_into().unwrap()), 5);
    }

    fn reply(seq: u32, code: i32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        e.header = vec![0; 16];
        let mut msg = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(e));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn parses_acks_and_rejects_garbage() {
        assert_eq!(parse_ack(&reply(1, 0), 1).unwrap(), Some(0));
        assert_eq!(parse_ack(&reply(1, -17), 1).unwrap(), Some(17));
        // Another request's answer is not ours.
        assert_eq!(parse_ack(&reply(2, -17), 1).unwrap(), None);
        // Two messages in one datagram: the second is ours.
        let mut two = reply(2, 0);
        two.extend(reply(1, -1));
        assert_eq!(parse_ack(&two, 1).unwrap(), Some(1));
        let good = reply(1, -17);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut p = good.clone();
            let at = (seed as usize) % p.len();
            p[at] = (seed >> 32) as u8;
            p.truncate((seed >> 40) as usize % (p.len() + 1));
            let _ = parse_ack(&p, 1);
        }
        assert!(parse_ack(&[1, 2, 3], 1).is_err());
        // Found by the fuzzer: an error code of i32::MIN (its negation overflows), and codes
        // the kernel never sends.
        for code in [i32::MIN, 5, -4096] {
            assert!(parse_ack(&reply(1, code), 1).is_err(), "{code}");
        }
    }
}
