//! Harnesses shared by the fuzz targets (`engine/core/fuzz`) and the tests that replay their
//! corpora (`tests/corpus.rs`), so that CI exercises exactly what the fuzzer runs. Not a
//! public API.
//!
//! Each harness checks invariants, not only the absence of panics, and returns what it did
//! with the input so that a replay test can tell a harness that stopped working (every input
//! rejected) from one that works.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket};

use crate::app::{self, App, AppConfig, AppKind};
use crate::config::{Ipv4Cidr, ServiceConfig, TcpConfig};
use crate::packet::{self, DropReason};
use crate::stack::{ConnectionBudget, Stack, StackConfig};

/// The service address of the harnesses' stack; [`classify`] counts all of 198.19.0.0/16 as
/// ours.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

/// Client addresses the [`StackHarness`] sends segments from (198.18.1.2 and on).
pub const CLIENT_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

/// Classifies `data` as a TUN packet, with and without checksum verification. Returns
/// whether it was accepted in either mode.
///
/// # Panics
/// When an accepted packet's reported lengths or fields are not those of the input, or a
/// packet accepted with checksums verified is classified differently without: bugs.
pub fn classify(data: &[u8]) -> bool {
    let ours = |a: Ipv4Addr| a.octets()[..2] == [198, 19];
    let verified = packet::classify_with(data, ours, true);
    let unverified = packet::classify_with(data, ours, false);
    if let Ok(v) = verified {
        assert_eq!(
            unverified,
            Ok(v),
            "checksum verification changes the classification"
        );
    }
    assert_eq!(
        packet::classify(data, ours),
        verified,
        "classify is classify_with(.., true)"
    );
    let Ok(inb) = unverified else {
        return false;
    };
    // Every field comes from within the input, where the headers say.
    assert!(inb.ip_len <= data.len(), "IP length beyond the input");
    let ip = Ipv4Packet::new_checked(&data[..inb.ip_len]).expect("accepted: IP header parses");
    let ihl = usize::from(ip.header_len());
    assert!(
        ihl >= 20 && ihl + 20 <= inb.ip_len,
        "headers beyond the IP length"
    );
    let tcp = &data[ihl..inb.ip_len];
    let thl = usize::from(tcp[12] >> 4) * 4;
    assert!(
        thl >= 20 && thl <= tcp.len(),
        "TCP header beyond the IP length"
    );
    assert_eq!(inb.payload_len, tcp.len() - thl, "payload length");
    assert_eq!(ip.next_header(), IpProtocol::Tcp);
    assert!(!ip.more_frags() && ip.frag_offset() == 0, "a fragment");
    assert!(ours(*inb.key.service.ip()), "not for us");
    assert_eq!(inb.key.client.ip().octets(), data[12..16], "source address");
    assert_eq!(
        inb.key.service.ip().octets(),
        data[16..20],
        "destination address"
    );
    let be16 = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    assert_eq!(inb.key.client.port(), be16(0), "source port");
    assert_eq!(inb.key.service.port(), be16(2), "destination port");
    assert!(inb.key.client.port() != 0 && inb.key.service.port() != 0);
    assert_eq!(
        inb.seq,
        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        "sequence number"
    );
    assert_eq!(inb.window, be16(14), "window");
    let bits = tcp[13];
    assert_eq!(
        (inb.flags.fin, inb.flags.syn, inb.flags.rst, inb.flags.ack),
        (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 16 != 0),
        "flags"
    );
    assert_eq!(
        inb.tsval,
        packet::find_timestamp(&tcp[20..thl]).map(|(v, _)| v),
        "timestamp"
    );
    // What the stack emits is parsed by `outbound`, which must agree (seen from our side).
    let out = packet::outbound(&data[..inb.ip_len]).expect("accepted: outbound parses");
    assert_eq!(
        (out.key.client, out.key.service),
        (inb.key.service, inb.key.client)
    );
    assert_eq!(
        (out.seq, out.window, out.payload_len),
        (inb.seq, inb.window, inb.payload_len)
    );
    assert_eq!((out.flags, out.tsval), (inb.flags, inb.tsval));
    if let Some(o) = packet::syn_options(&data[..inb.ip_len]) {
        assert_eq!((o.isn, o.window), (inb.seq, inb.window));
    }
    true
}

/// How one [`StackHarness::run`] went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackRun {
    /// Packets handed to the stack.
    pub packets: u64,
    /// Of those, how many classification did not drop.
    pub classified: u64,
    /// Packets the stack emitted.
    pub emitted: u64,
    /// Connections the stack accepted.
    pub accepted: u64,
    /// Bytes the apps sent.
    pub app_bytes_out: u64,
}

/// A [`Stack`] fed the packets each input describes (one harness may take many inputs: a
/// stack is expensive to build, and ten minutes of virtual time after each input end what it
/// started).
///
/// The input is a sequence of records `[op, len_lo, len_hi, bytes...]` (a short last record
/// takes what is left). `op & 3` says what `bytes` are: 0, a raw packet; 1, a raw IPv4 packet
/// whose checksums the harness fills in; 2, a TCP segment (header and payload) that the
/// harness wraps in an IPv4 header from a client to [`SERVICE`] and checksums, after the
/// adjustments its first byte asks for (see [`StackHarness::segment`]); 3, a raw packet handed
/// over as a kernel-merged (GRO) packet, unverified. `op >> 2` is the time that passes before
/// the packet: that many milliseconds, or 100 s for 63 (to run the timeouts).
///
/// After every packet the stack is polled and its output drained; after the last, time runs
/// on for ten minutes, polled every 10 s. Nothing may panic, `packets_in` counts every packet fed, no more drops
/// than packets are counted, and every packet the stack emits is a checksummed IPv4/TCP
/// packet from a service address.
pub struct StackHarness {
    stack: Stack,
    budget: ConnectionBudget,
    now: Instant,
    /// Per 4-tuple (client address and port, service port): the sequence number after the
    /// last segment the stack sent, and the acknowledgement number it carried.
    peers: HashMap<(Ipv4Addr, u16, u16), (u32, u32)>,
    run: StackRun,
}

impl Default for StackHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl StackHarness {
    /// A stack with echo (7), sink (9), source (19, 100,000 bytes) and HTTP (80) on
    /// [`SERVICE`], small buffers and low limits (so that the SYN cookie and refusal paths
    /// are reachable).
    pub fn new() -> Self {
        let now = Instant::from_secs(1_000);
        let service = |port, app, bytes| ServiceConfig::new(port, app, AppConfig { bytes });
        let config = StackConfig {
            tcp: TcpConfig {
                rx_buffer: 4096,
                tx_buffer: 4096,
                loss_probes: true,
                direct_receive: true,
                tx_buffer_max: 16384,
                tx_grow_budget: 32768,
            },
            frozen_queue_packets: 8,
            max_half_open: 6,
            syn_cookies_after: Some(3),
            ..StackConfig::new(
                vec![Ipv4Cidr {
                    addr: SERVICE,
                    prefix_len: 32,
                }],
                vec![
                    service(7, AppKind::Echo, None),
                    service(9, AppKind::Sink, None),
                    service(19, AppKind::Source, Some(100_000)),
                    service(80, AppKind::Http, None),
                ],
                [7; 16],
            )
        };
        let budget = ConnectionBudget::new(8).with_per_source(4);
        Self {
            stack: Stack::new(config, budget.clone(), now),
            budget,
            now,
            peers: HashMap::new(),
            run: StackRun::default(),
        }
    }

    /// Feeds the packets of `data` (see [`StackHarness`]) and checks the invariants.
    ///
    /// # Panics
    /// When the stack panics or an invariant does not hold: bugs.
    pub fn run(&mut self, data: &[u8]) -> StackRun {
        self.run = StackRun::default();
        let packets_before = self.stack.stats().packets_in;
        let accepted_before = self.stack.stats().conns_accepted;
        let app_out_before = self.stack.stats().app_bytes_out;
        let mut rest = data;
        while let Some((&op, tail)) = rest.split_first() {
            let (len, tail) = match tail {
                [lo, hi, tail @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])), tail),
                _ => (tail.len(), &[][..]),
            };
            let (bytes, tail) = tail.split_at(len.min(tail.len()));
            rest = tail;
            let wait = match op >> 2 {
                63 => Duration::from_secs(100),
                ms => Duration::from_millis(u64::from(ms)),
            };
            self.advance(wait);
            let mut packet = match op & 3 {
                0 | 3 => bytes.to_vec(),
                1 => {
                    let mut p = bytes.to_vec();
                    fill_checksums(&mut p);
                    p
                }
                _ => self.segment(bytes),
            };
            let classified = packet::classify_with(&packet, |a| a == SERVICE, op & 3 != 3).is_ok();
            let before = self.stack.stats().clone();
            if op & 3 == 3 {
                self.stack.handle_merged_packet(self.now, &mut packet);
            } else {
                self.stack.handle_packet(self.now, &mut packet);
            }
            self.run.packets += 1;
            let after = self.stack.stats();
            assert_eq!(
                after.packets_in,
                before.packets_in + 1,
                "packet not counted"
            );
            let dropped = |s: &crate::stack::StackStats| s.dropped.iter().sum::<u64>();
            if !classified {
                assert_eq!(
                    dropped(after),
                    dropped(&before) + 1,
                    "a packet classification refused was not counted as dropped once"
                );
            }
            self.run.classified += u64::from(classified);
            self.poll();
        }
        // Ten minutes, polled every 10 s: every timer (handshake, keepalive, idle, head,
        // TIME-WAIT, retransmission back-off) fires, late by at most that.
        for _ in 0..60 {
            self.now += Duration::from_secs(10);
            self.poll();
        }
        let stats = self.stack.stats();
        assert_eq!(
            stats.packets_in - packets_before,
            self.run.packets,
            "packets_in"
        );
        assert!(stats.dropped.iter().sum::<u64>() <= stats.packets_in);
        assert!(
            stats.dropped[DropReason::FrozenQueueFull.index()] == 0,
            "no flow was frozen"
        );
        self.run.accepted = stats.conns_accepted - accepted_before;
        self.run.app_bytes_out = stats.app_bytes_out - app_out_before;
        self.run
    }

    /// Lets `wait` pass, polling the stack at its deadlines on the way.
    fn advance(&mut self, wait: Duration) {
        let end = self.now + wait;
        loop {
            self.poll();
            let at = self.stack.poll_at(self.now);
            assert!(at >= self.now, "poll_at in the past");
            if at >= end {
                break;
            }
            // Deadlines as smoltcp reports them can be "now"; move on at least 1 ms.
            self.now = at.max(self.now + Duration::from_millis(1));
        }
        self.now = end;
        self.poll();
        assert!(
            self.stack.live_connection_count() <= self.budget.max(),
            "more live connections than the budget"
        );
    }

    fn poll(&mut self) {
        self.stack.poll(self.now);
        let (peers, run) = (&mut self.peers, &mut self.run);
        self.stack.drain_transmit(|p| {
            run.emitted += 1;
            let ip = Ipv4Packet::new_checked(p).expect("emitted: an IPv4 packet");
            assert!(ip.verify_checksum(), "emitted: IP checksum");
            assert_eq!(ip.src_addr(), SERVICE, "emitted: from the service address");
            assert_eq!(ip.next_header(), IpProtocol::Tcp, "emitted: TCP");
            assert_eq!(usize::from(ip.total_len()), p.len(), "emitted: IP length");
            let tcp = TcpPacket::new_checked(ip.payload()).expect("emitted: a TCP header");
            assert!(
                tcp.verify_checksum(
                    &IpAddress::Ipv4(ip.src_addr()),
                    &IpAddress::Ipv4(ip.dst_addr())
                ),
                "emitted: TCP checksum"
            );
            let out = packet::outbound(p).expect("emitted: outbound parses");
            let key = (*out.key.client.ip(), out.key.client.port(), tcp.src_port());
            peers.insert(key, (out.seq_end(), tcp.ack_number().0 as u32));
        });
    }

    /// The IPv4 packet for the TCP segment `bytes` (header and payload, from a client to
    /// [`SERVICE`]). The first byte is not sent; it asks for adjustments that a fuzzer could
    /// not find on its own: bits 0–1 pick the client address (`CLIENT_BASE` + 0..4); bit 2
    /// sets the acknowledgement number to what the stack last sent on this 4-tuple and the
    /// ACK flag; bit 3 sets the sequence number to what the stack last acknowledged; bit 4
    /// sets the data offset to 5 (no options). A segment shorter than a TCP header is padded
    /// with zeros.
    pub fn segment(&self, bytes: &[u8]) -> Vec<u8> {
        let (&adjust, tcp) = bytes.split_first().unwrap_or((&0, &[]));
        let mut tcp = tcp.to_vec();
        if tcp.len() < 20 {
            tcp.resize(20, 0);
        }
        let client = Ipv4Addr::from(u32::from(CLIENT_BASE) + u32::from(adjust & 3));
        let key = (
            client,
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        if let Some(&(seq_end, ack)) = self.peers.get(&key) {
            if adjust & 4 != 0 {
                tcp[8..12].copy_from_slice(&seq_end.to_be_bytes());
                tcp[13] |= 0x10;
            }
            if adjust & 8 != 0 {
                tcp[4..8].copy_from_slice(&ack.to_be_bytes());
            }
        }
        if adjust & 16 != 0 {
            tcp[12] = (tcp[12] & 0x0f) | 0x50;
        }
        let total = (20 + tcp.len()).min(usize::from(u16::MAX));
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&client.octets());
        p[16..20].copy_from_slice(&SERVICE.octets());
        p.extend_from_slice(&tcp[..total - 20]);
        fill_checksums(&mut p);
        p
    }
}

/// Fills in the IP header checksum and, if the packet is TCP and its headers parse, the TCP
/// checksum of a raw IPv4 packet (in place; whatever does not parse is left alone).
pub fn fill_checksums(p: &mut [u8]) {
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut *p) else {
        return;
    };
    ip.fill_checksum();
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    if let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) {
        tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
    }
}

/// Most response bytes [`http`] reads per run (`GET /bytes/N` may ask for any `N`).
const HTTP_OUTPUT_CAP: usize = 16 * 1024;

/// How one [`http`] run went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRun {
    /// Response bytes, at most [`HTTP_OUTPUT_CAP`].
    pub output: Vec<u8>,
    /// The app asked to close the connection.
    pub closed: bool,
    /// Request bytes the app consumed.
    pub consumed: usize,
    /// The run stopped at [`HTTP_OUTPUT_CAP`] response bytes.
    pub truncated: bool,
}

/// Drives an [`app::HttpApp`] through the [`App`] trait with the request stream
/// `data[2..]`, whole and then split at pseudo-random points chosen by `data[0]` (with, if
/// `data[1]` is odd, the app snapshotted and restored at up to 32 of the splits), and a send buffer of
/// 1 to 65,536 bytes (`data[1] >> 5` picks one of eight sizes). Returns the unsplit run.
///
/// Whatever the split, the responses, the close and what was consumed must be the same; the
/// app's state must pass the restore checks after every call of the unsplit run and at every
/// split where it is restored; it must never stall (consume
/// nothing with no response pending).
///
/// # Panics
/// When one of those does not hold: bugs.
pub fn http(data: &[u8]) -> HttpRun {
    let (seed, send, input) = match data {
        [a, b, rest @ ..] => (*a, *b, rest),
        _ => (0, 0, data),
    };
    let send_chunk = [1, 3, 64, 536, 1460, 4096, 16384, 65536][usize::from(send >> 5) & 7];
    let whole = http_run(input, &[input.len()], send_chunk, Check::EveryCall);
    // Pieces of 1 to 2^(seed % 8) bytes, from a generator seeded with `seed`.
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let max = 1usize << (seed % 8);
    let mut cuts = Vec::new();
    let mut left = input.len();
    while left > 0 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (x as usize % max + 1).min(left);
        cuts.push(n);
        left -= n;
    }
    let check = if send & 1 == 1 {
        Check::RestoreAtSplits
    } else {
        Check::None
    };
    let split = http_run(input, &cuts, 4096, check);
    assert_eq!(
        whole.truncated, split.truncated,
        "output length differs with the split"
    );
    if !whole.truncated {
        // (A run cut short may have read more or fewer requests ahead.)
        assert_eq!(whole.closed, split.closed, "close differs with the split");
        assert_eq!(
            whole.consumed, split.consumed,
            "consumption differs with the split"
        );
    }
    assert!(
        whole.output == split.output,
        "responses differ with the split: {:?} vs {:?}",
        String::from_utf8_lossy(&whole.output[..whole.output.len().min(512)]),
        String::from_utf8_lossy(&split.output[..split.output.len().min(512)]),
    );
    whole
}

/// What [`http_run`] checks of the app's states.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// [`check_state`] after every call that changes the state.
    EveryCall,
    /// Nothing.
    None,
    /// The app is replaced by a restored snapshot of itself after pieces of input (at most
    /// 32 times, spread evenly).
    RestoreAtSplits,
}

/// One run of [`http`]: `input` offered in pieces of the lengths `cuts`.
fn http_run(input: &[u8], cuts: &[usize], send_chunk: usize, check: Check) -> HttpRun {
    let mut app: Box<dyn App> = Box::new(app::HttpApp::new());
    let mut run = HttpRun {
        output: Vec::new(),
        closed: false,
        consumed: 0,
        truncated: false,
    };
    let mut buf = vec![0u8; send_chunk];
    let mut pos = 0;
    // At most 32 restores: a snapshot holds the partial head, up to 8 KiB.
    let restore_every = cuts.len().div_ceil(32);
    for (i, &cut) in cuts.iter().enumerate() {
        let piece = &input[pos..pos + cut];
        pos += cut;
        let mut done = 0;
        while done < piece.len() {
            let n = app.handle_recv(&piece[done..]);
            assert!(n <= piece.len() - done, "consumed more than offered");
            if check == Check::EveryCall {
                check_state(app.as_ref());
            }
            done += n;
            run.consumed += n;
            if done < piece.len() {
                // The app waits for its responses to be read.
                let sent = drain(app.as_mut(), &mut buf, &mut run.output);
                if check == Check::EveryCall {
                    check_state(app.as_ref());
                }
                if run.output.len() >= HTTP_OUTPUT_CAP {
                    run.output.truncate(HTTP_OUTPUT_CAP);
                    run.truncated = true;
                    return run;
                }
                assert!(
                    n > 0 || sent > 0,
                    "stalled: nothing consumed, nothing to send"
                );
            }
        }
        if check == Check::RestoreAtSplits && i % restore_every == 0 {
            app = app::restore(AppKind::Http, &app.snapshot()).expect("own snapshot restores");
        }
    }
    drain(app.as_mut(), &mut buf, &mut run.output);
    if run.output.len() < HTTP_OUTPUT_CAP {
        app.handle_recv_fin();
        drain(app.as_mut(), &mut buf, &mut run.output);
        run.closed = app.wants_close();
    }
    if check == Check::EveryCall {
        check_state(app.as_ref());
    }
    run.truncated = run.output.len() >= HTTP_OUTPUT_CAP;
    run.output.truncate(HTTP_OUTPUT_CAP);
    run
}

/// Reads everything `app` has to send, in `buf`-sized pieces, up to [`HTTP_OUTPUT_CAP`];
/// returns how many bytes.
fn drain(app: &mut dyn App, buf: &mut [u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    while out.len() < HTTP_OUTPUT_CAP {
        let n = poll_send_checked(app, buf);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out.len() - start
}

/// [`App::poll_send_marked`] into `buf`; returns how many bytes were written.
///
/// # Panics
/// When the app writes more than `buf`, or marks bytes that are not the counting stream at the
/// offset it gives (the send mirror would then regenerate wrong bytes on a move): bugs.
fn poll_send_checked(app: &mut dyn App, buf: &mut [u8]) -> usize {
    let mut runs = app::counting::Runs::default();
    let n = app.poll_send_marked(buf, &mut runs);
    assert!(n <= buf.len(), "wrote more than the room");
    assert_eq!(runs.check(&buf[..n]), Ok(()));
    n
}

/// Every state an app reaches must pass its own restore checks, and snapshot to the same bytes
/// once restored.
fn check_state(app: &dyn App) {
    let snapshot = app.snapshot();
    let restored = app::restore(app.kind(), &snapshot)
        .unwrap_or_else(|e| panic!("a state the app reached does not restore: {e}"));
    assert!(restored.snapshot() == snapshot, "snapshot round trip");
    assert_eq!(restored.is_quiescent(), app.is_quiescent());
    assert_eq!(restored.wants_close(), app.wants_close());
    assert_eq!(restored.in_request_head(), app.in_request_head());
}

/// Restores `data` as a snapshot of every [`AppKind`]. Whatever restores must report its kind,
/// snapshot to bytes that restore to the same snapshot, and then serve a little traffic (a
/// pipelined HTTP exchange, then FIN) with every state it reaches passing the restore checks.
/// Returns how many kinds accepted `data`.
///
/// # Panics
/// When one of those does not hold: bugs.
pub fn restore(data: &[u8]) -> usize {
    let mut accepted = 0;
    for kind in AppKind::ALL {
        let Ok(mut app) = app::restore(kind, data) else {
            continue;
        };
        accepted += 1;
        assert_eq!(app.kind(), kind);
        check_state(app.as_ref());
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        let mut input: &[u8] =
            b"GET /health HTTP/1.1\r\n\r\nPOST /upload HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /bytes/5000 HTTP/1.1\r\n\r\n";
        for _ in 0..64 {
            let n = app.handle_recv(input);
            assert!(n <= input.len());
            input = &input[n..];
            check_state(app.as_ref());
            if drain_bounded(app.as_mut(), &mut buf, &mut out) == 0 && n == 0 {
                break;
            }
        }
        app.handle_recv_fin();
        drain_bounded(app.as_mut(), &mut buf, &mut out);
        check_state(app.as_ref());
    }
    accepted
}

/// Like [`drain`], up to 16 KiB.
fn drain_bounded(app: &mut dyn App, buf: &mut [u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    while out.len() < 16 * 1024 {
        let n = poll_send_checked(app, buf);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out.len() - start
}
