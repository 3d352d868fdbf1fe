//! Harnesses shared by the fuzz targets (`engine/fuzz`) and the tests that replay their
//! corpora (`tests/corpus.rs`), so that CI exercises exactly what the fuzzer runs. Not a
//! public API.

use std::io::BufReader;
use std::sync::Mutex;

use crate::control::{self, Handler, MAX_LINE, Reply, Request};
use crate::offload::{self, Inbound, ReadError, VNET_HDR_LEN};

/// Takes `data` apart as one read from an offload TUN device (virtio-net header and packet),
/// then classifies the packet as the daemon does. Returns whether the header was usable.
///
/// A merged packet is the input after the header, untouched; a plain one too, except for
/// the two bytes of a checksum the header asked to complete, which must then be the one that
/// makes the ones'-complement sum over the checksummed range and the pseudo-header sum that
/// the field held come out right. A refused read leaves the bytes alone.
///
/// # Panics
/// When one of those does not hold: bugs.
pub fn offload(data: &[u8]) -> bool {
    let mut buf = data.to_vec();
    let result = offload::parse_read(&mut buf);
    let (flags, gso) = (
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    );
    let ne16 = |at: usize| usize::from(u16::from_ne_bytes([data[at], data[at + 1]]));
    let (packet, verify) = match result {
        Err(ReadError::Short) => {
            assert!(data.len() < VNET_HDR_LEN);
            return false;
        }
        Err(ReadError::UnsupportedGso(g)) => {
            assert_eq!(g, gso & !0x80);
            assert!(g > 1, "a supported GSO type refused");
            assert_eq!(buf, data, "a refused read was modified");
            return false;
        }
        Err(ReadError::BadChecksumOffsets) => {
            let (start, field) = (ne16(6), ne16(6) + ne16(8));
            let len = data.len() - VNET_HDR_LEN;
            assert!(flags & 1 != 0 && gso & !0x80 == 0);
            assert!(start > len || field + 2 > len, "valid offsets refused");
            assert_eq!(buf, data, "a refused read was modified");
            return false;
        }
        Ok(Inbound::Merged(p)) => {
            assert_eq!(gso & !0x80, 1, "merged without GSO_TCPV4");
            assert_eq!(p, &data[VNET_HDR_LEN..], "a merged packet was modified");
            (p.to_vec(), false)
        }
        Ok(Inbound::Packet(p)) => {
            assert_eq!(gso & !0x80, 0, "a plain packet with a GSO type");
            let original = &data[VNET_HDR_LEN..];
            assert_eq!(p.len(), original.len());
            if flags & 1 == 0 {
                assert_eq!(p, original, "a packet without NEEDS_CSUM was modified");
            } else {
                let (start, offset) = (ne16(6), ne16(8));
                let field = start + offset;
                for (i, (a, b)) in p.iter().zip(original).enumerate() {
                    assert!(
                        a == b || i == field || i == field + 1,
                        "byte {i} outside the checksum field modified"
                    );
                }
                if offset % 2 == 0 {
                    let pseudo = u16::from_be_bytes([original[field], original[field + 1]]);
                    assert_eq!(
                        ones_sum(&p[start..], u64::from(pseudo)),
                        0xffff,
                        "completed checksum does not verify"
                    );
                }
            }
            (p.to_vec(), true)
        }
    };
    let _ = flowshift_core::packet::classify_with(&packet, |_| true, verify);
    true
}

/// The folded ones'-complement sum of `data` (as 16-bit big-endian words, an odd last byte
/// padded with zero), plus `initial`.
fn ones_sum(data: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// How one [`control`] run went.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ControlRun {
    /// Requests handed to the handler, in order.
    pub requests: Vec<Request>,
    /// Replies written, in order.
    pub replies: Vec<Reply>,
}

/// A handler that records every request and answers with it.
#[derive(Default)]
struct Recorder(Mutex<Vec<Request>>);

impl Handler for Recorder {
    fn handle(&self, request: Request) -> Reply {
        let value = serde_json::to_value(&request).expect("a request serialises");
        self.0.lock().expect("not poisoned").push(request);
        Reply::ok(value)
    }
}

/// Serves `data[1..]` as what a client wrote on the control socket, read through a buffer of
/// `data[0] + 1` bytes and again through the default buffer. The replies must not depend on
/// the buffer; each must be one line of a valid [`Reply`]; and they must be what a model of
/// the framing expects: one per non-blank line, in order, the request handled if the line is
/// a valid one (which then serialises back to itself), an error otherwise, and after a line
/// longer than [`MAX_LINE`] an error and nothing more.
///
/// # Panics
/// When one of those does not hold: bugs.
pub fn control(data: &[u8]) -> ControlRun {
    let (capacity, input) = match data.split_first() {
        Some((&c, rest)) => (usize::from(c) + 1, rest),
        None => (1, data),
    };
    let (requests, out) = serve(BufReader::with_capacity(capacity, input));
    let (large_requests, large_out) = serve(BufReader::new(input));
    assert!(
        out == large_out && requests == large_requests,
        "replies depend on the read buffer"
    );
    let text = std::str::from_utf8(&out).expect("replies are UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a reply without its newline"
    );
    let replies: Vec<Reply> = text
        .lines()
        .map(|l| serde_json::from_str::<Reply>(l).expect("each reply line is a Reply"))
        .collect();

    // The model: lines as the slices between newlines.
    let mut expected: Vec<Option<Request>> = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let window = &rest[..rest.len().min(MAX_LINE + 1)];
        let end = window
            .iter()
            .position(|&b| b == b'\n')
            .map_or(window.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        if line.len() > MAX_LINE {
            expected.push(None);
            break;
        }
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            continue;
        }
        expected.push(serde_json::from_str(text.trim()).ok());
    }
    assert_eq!(replies.len(), expected.len(), "one reply per request line");
    let mut handled = requests.iter();
    for (reply, want) in replies.iter().zip(&expected) {
        match want {
            Some(request) => {
                assert!(reply.ok, "a valid request refused: {reply:?}");
                assert_eq!(handled.next(), Some(request), "requests out of order");
                let text = serde_json::to_string(request).expect("a request serialises");
                let again: Request = serde_json::from_str(&text).expect("it parses back");
                assert_eq!(&again, request, "request round trip");
            }
            None => assert!(
                !reply.ok && reply.error.is_some(),
                "garbage accepted: {reply:?}"
            ),
        }
    }
    assert!(
        handled.next().is_none(),
        "a request handled without a reply"
    );
    ControlRun { requests, replies }
}

/// One run of [`control`]'s input through the control socket's line loop: the requests
/// handled and the bytes written.
fn serve(reader: BufReader<&[u8]>) -> (Vec<Request>, Vec<u8>) {
    let recorder = Recorder::default();
    let mut out = Vec::new();
    control::serve_lines(reader, &mut out, &recorder).expect("reading a slice cannot fail");
    (recorder.0.into_inner().expect("not poisoned"), out)
}

/// Parses `data` as the kernel's answer to a route request (one netlink datagram, possibly
/// several messages). Returns whether it held an acknowledgement of request 1. Never panics;
/// an answer that does not parse is an error, not an acknowledgement.
pub fn netlink_reply(data: &[u8]) -> bool {
    matches!(crate::netlink::parse_ack(data, 1), Ok(Some(_)))
}

/// A route request as the node sends it, for the netlink seeds: `add` or delete
/// `prefix/len dev ifindex`.
pub fn netlink_request(add: bool, prefix: std::net::Ipv4Addr, len: u8, ifindex: u32) -> Vec<u8> {
    use netlink_packet_route::RouteNetlinkMessage;
    let route = crate::netlink::route(prefix, len, ifindex);
    let msg = if add {
        RouteNetlinkMessage::NewRoute(route)
    } else {
        RouteNetlinkMessage::DelRoute(route)
    };
    crate::netlink::encode(msg, 0)
}
