//! Routes into the TUN device, through rtnetlink (no shelling out to `ip`).
//!
//! Only what the node needs: add and delete an IPv4 route `prefix dev <ifindex>` in the main
//! table, and read the kernel's acknowledgement. Each call opens its own socket; routes change
//! twice in a node's life.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

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
    match request(
        RTM_NEWROUTE,
        NLM_F_CREATE | NLM_F_EXCL,
        prefix,
        len,
        ifindex,
        "add route",
    ) {
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
    request(RTM_DELROUTE, 0, prefix, len, ifindex, "delete route")
}

fn push_attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    while !msg.len().is_multiple_of(4) {
        msg.push(0);
    }
}

/// Builds an RTM_NEWROUTE / RTM_DELROUTE message.
fn route_message(
    kind: u16,
    flags: u16,
    seq: u32,
    prefix: Ipv4Addr,
    len: u8,
    ifindex: u32,
) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&[0; 4]); // length, filled below
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns
    // struct rtmsg
    msg.extend_from_slice(&[
        libc::AF_INET as u8,
        len,
        0, // src_len
        0, // tos
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        RT_SCOPE_LINK,
        RTN_UNICAST,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    debug_assert_eq!(msg.len(), NLMSG_HDRLEN + RTMSG_LEN);
    push_attr(&mut msg, RTA_DST, &prefix.octets());
    push_attr(&mut msg, RTA_OIF, &ifindex.to_ne_bytes());
    let total = msg.len() as u32;
    msg[..4].copy_from_slice(&total.to_ne_bytes());
    msg
}

/// Parses the kernel's ack: `Ok(errno)` where 0 means success.
fn parse_ack(reply: &[u8], seq: u32) -> Result<i32, NetlinkError> {
    let mut rest = reply;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(
            rest[0..4]
                .try_into()
                .map_err(|_| NetlinkError::MalformedReply)?,
        ) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let rseq = u32::from_ne_bytes(
            rest[8..12]
                .try_into()
                .map_err(|_| NetlinkError::MalformedReply)?,
        );
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(NetlinkError::MalformedReply);
        }
        if kind == NLMSG_ERROR && rseq == seq {
            let body = &rest[NLMSG_HDRLEN..len];
            let errno = body.get(0..4).ok_or(NetlinkError::MalformedReply)?;
            return Ok(-i32::from_ne_bytes(
                errno.try_into().map_err(|_| NetlinkError::MalformedReply)?,
            ));
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Err(NetlinkError::MalformedReply)
}

fn request(
    kind: u16,
    flags: u16,
    prefix: Ipv4Addr,
    len: u8,
    ifindex: u32,
    what: &'static str,
) -> Result<(), NetlinkError> {
    let fd = open()?;
    let seq = 1;
    let msg = route_message(kind, flags, seq, prefix, len, ifindex);
    // SAFETY: `fd` is an open netlink socket; `msg` is a valid buffer of `msg.len()` bytes.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(NetlinkError::Socket(io::Error::last_os_error()));
    }
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(NetlinkError::Socket(io::Error::last_os_error()));
    }
    match parse_ack(&buf[..n as usize], seq)? {
        0 => Ok(()),
        errno => Err(NetlinkError::Refused {
            what,
            prefix,
            len,
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

fn open() -> Result<OwnedFd, NetlinkError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(NetlinkError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl with only the family set is a valid "kernel assigns" address.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `addr` is a valid sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(NetlinkError::Socket(io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_route_message() {
        let m = route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE,
            7,
            Ipv4Addr::new(198, 19, 255, 1),
            32,
            5,
        );
        assert_eq!(m.len(), 16 + 12 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWROUTE);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 32);
        assert_eq!(&m[32..36], &[198, 19, 255, 1]);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 5);
    }

    #[test]
    fn parses_acks_and_rejects_garbage() {
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&9u32.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(parse_ack(&ack, 9).unwrap(), 17);
        assert!(parse_ack(&ack, 8).is_err());
        assert!(parse_ack(&ack[..10], 9).is_err());
        let mut bad = ack.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_ack(&bad, 9).is_err());
    }
}
