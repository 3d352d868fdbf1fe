//! The service address for kernel sockets: a node namespace can own 198.19.255.1 on its
//! loopback (so plain kernel sockets can serve it, as flowshift does on its TUN), and the
//! router's route for it can be switched in-process by rtnetlink — a few tens of microseconds
//! instead of an `ip` process per switch — between nodes or to a blackhole (packets to the
//! service address silently dropped at the router: the "network lock" CRIU takes while it
//! dumps a connection).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::testbed::{Node, SERVICE_ADDR, Testbed, TestbedError};

// rtnetlink constants. From include/uapi/linux/netlink.h:
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_REPLACE`.
const NLM_F_REPLACE: u16 = 0x100;
/// `NLM_F_CREATE`.
const NLM_F_CREATE: u16 = 0x400;
/// `NLMSG_ERROR` (also the type of an ACK, with error 0).
const NLMSG_ERROR: u16 = 0x2;
// From include/uapi/linux/rtnetlink.h:
/// `RTM_NEWROUTE`.
const RTM_NEWROUTE: u16 = 24;
/// `RTA_DST`.
const RTA_DST: u16 = 1;
/// `RTA_GATEWAY`.
const RTA_GATEWAY: u16 = 5;
/// `RT_TABLE_MAIN`.
const RT_TABLE_MAIN: u8 = 254;
/// `RTPROT_BOOT` (what `ip route replace` uses by default).
const RTPROT_BOOT: u8 = 3;
/// `RT_SCOPE_UNIVERSE`.
const RT_SCOPE_UNIVERSE: u8 = 0;
/// `RTN_UNICAST`.
const RTN_UNICAST: u8 = 1;
/// `RTN_BLACKHOLE`.
const RTN_BLACKHOLE: u8 = 6;

impl Testbed {
    /// Gives `node`'s namespace the service address 198.19.255.1/32 on its loopback device,
    /// so kernel sockets there can bind it and answer from it. Do not combine with a
    /// flowshift node on the same node (it owns the address on its TUN).
    pub fn add_service_address_to_lo(&self, node: Node) -> Result<(), TestbedError> {
        self.node(node)
            .ip(&["addr", "add", &format!("{SERVICE_ADDR}/32"), "dev", "lo"])
            .map(|_| ())
    }

    /// An rtnetlink handle on the router's routing table for switching the service route
    /// quickly (see [`ServiceRoute`]). [`Testbed::route_service_to`] does the same with `ip`.
    pub fn service_route(&self) -> Result<ServiceRoute, TestbedError> {
        let fd = self.router().run(|| {
            // SAFETY: plain socket(2); the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: `fd` is a fresh descriptor owned by nobody else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        });
        let fd = fd.map_err(|source| TestbedError::Io {
            what: "opening an rtnetlink socket in the router namespace".into(),
            source,
        })?;
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval of the size given; `fd` is open.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(ServiceRoute { fd, seq: 0 })
    }
}

/// The router's route for the service address, switched by rtnetlink from any thread (the
/// socket belongs to the router namespace). Each switch is one `RTM_NEWROUTE` with
/// `NLM_F_REPLACE` and waits for the kernel's acknowledgement, so when it returns the router
/// forwards by the new route.
#[derive(Debug)]
pub struct ServiceRoute {
    fd: OwnedFd,
    seq: u32,
}

impl ServiceRoute {
    /// Routes the service address to `node`.
    pub fn to_node(&mut self, node: Node) -> Result<(), TestbedError> {
        self.replace(RTN_UNICAST, Some(node.addr()))
    }

    /// Drops packets to the service address at the router, silently (a blackhole route sends
    /// no ICMP error).
    pub fn blackhole(&mut self) -> Result<(), TestbedError> {
        self.replace(RTN_BLACKHOLE, None)
    }

    fn replace(&mut self, kind: u8, gateway: Option<Ipv4Addr>) -> Result<(), TestbedError> {
        self.seq = self.seq.wrapping_add(1);
        let mut m: Vec<u8> = Vec::with_capacity(48);
        // struct nlmsghdr: len, type, flags, seq, pid (native endian).
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        m.extend_from_slice(
            &(NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE).to_ne_bytes(),
        );
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        m.extend_from_slice(&[
            libc::AF_INET as u8,
            32,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            kind,
        ]);
        m.extend_from_slice(&0u32.to_ne_bytes());
        let mut attr = |ty: u16, addr: Ipv4Addr| {
            m.extend_from_slice(&8u16.to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&addr.octets());
        };
        attr(RTA_DST, SERVICE_ADDR);
        if let Some(gw) = gateway {
            attr(RTA_GATEWAY, gw);
        }
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        let what = || {
            format!(
                "rtnetlink: route {SERVICE_ADDR}/32 {}",
                gateway.map_or("blackhole".to_string(), |g| format!("via {g}"))
            )
        };
        let fail = |source: io::Error| TestbedError::Io {
            what: what(),
            source,
        };
        // SAFETY: `m` is a valid buffer of `m.len()` bytes; the socket is open. The kernel
        // is the default destination of an unconnected netlink socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if n < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(fail(io::Error::last_os_error()));
            }
            let n = n as usize;
            if n < 20 {
                return Err(fail(io::Error::other("short rtnetlink reply")));
            }
            let ty = u16::from_ne_bytes([buf[4], buf[5]]);
            let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if ty != NLMSG_ERROR || seq != self.seq {
                continue; // not our acknowledgement
            }
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return if errno == 0 {
                Ok(())
            } else {
                Err(fail(io::Error::from_raw_os_error(-errno)))
            };
        }
    }
}
