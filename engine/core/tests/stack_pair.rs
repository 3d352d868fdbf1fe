//! The stack against a smoltcp client, in memory, on virtual time.
//!
//! No TUN, no root: every packet the stack emits is handed to a client-side smoltcp interface and
//! back. These tests pin the engine's behaviour at the packet level: handshake options recorded,
//! apps byte-exact, RST for closed ports, the connection limit, frozen flows, hostile packets.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};

use flowshift_core::app::{AppConfig, AppKind};
use flowshift_core::config::{Ipv4Cidr, ServiceConfig};
use flowshift_core::packet::DropReason;
use flowshift_core::stack::{ConnectionBudget, Stack, StackConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address};

const CLIENT: Ipv4Address = Ipv4Addr::new(198, 18, 1, 2);
const SERVICE: Ipv4Address = Ipv4Addr::new(198, 19, 255, 1);

#[derive(Default)]
struct Pipe {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}
impl phy::Device for Pipe {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

/// Sees every client→stack packet; returning false drops it.
type PacketFilter = Box<dyn FnMut(&mut Vec<u8>) -> bool>;

struct Pair {
    now: Instant,
    stack: Stack,
    client: Interface,
    pipe: Pipe,
    sockets: SocketSet<'static>,
    budget: ConnectionBudget,
    next_port: u16,
    /// Applied to every client→stack packet; returning false drops it.
    filter: Option<PacketFilter>,
    /// Applied to every stack→client packet; returning false drops it.
    tx_filter: Option<PacketFilter>,
    /// Merge the client's in-order data segments as the kernel's GRO does (see
    /// [`gro_merge`]) and hand them to the stack as merged packets.
    gro: bool,
    /// Per turn, the packets of each piece the stack handed out: while it polled
    /// ([`Stack::poll_flushing`]), then what was left after it.
    pieces: Vec<Vec<Vec<u8>>>,
}

/// Appends `next` to `p` if the kernel's GRO would merge them: the same flow, plain ACK-flagged
/// data segments with identical headers (options included) but for the sequence number, `next`
/// right after `p`, and at most 64 KiB in all. The merged packet's checksums are left stale,
/// as the stack does not verify a merged packet's.
fn gro_merge(p: &mut Vec<u8>, next: &[u8]) -> bool {
    use smoltcp::wire::{Ipv4Packet, TcpPacket};
    let (Ok(a), Ok(b)) = (
        Ipv4Packet::new_checked(&p[..]),
        Ipv4Packet::new_checked(next),
    ) else {
        return false;
    };
    let (Ok(ta), Ok(tb)) = (
        TcpPacket::new_checked(a.payload()),
        TcpPacket::new_checked(b.payload()),
    ) else {
        return false;
    };
    let plain = |t: &TcpPacket<&[u8]>| {
        t.ack() && !t.syn() && !t.fin() && !t.rst() && !t.urg() && !t.payload().is_empty()
    };
    let head = usize::from(tb.header_len());
    let total = usize::from(a.total_len()) + tb.payload().len();
    let fits = a.header_len() == 20
        && b.header_len() == 20
        && a.src_addr() == b.src_addr()
        && a.dst_addr() == b.dst_addr()
        && plain(&ta)
        && plain(&tb)
        && ta.header_len() == tb.header_len()
        && ta.src_port() == tb.src_port()
        && ta.dst_port() == tb.dst_port()
        && ta.ack_number() == tb.ack_number()
        && ta.window_len() == tb.window_len()
        && ta.options() == tb.options()
        && ta.seq_number() + ta.payload().len() == tb.seq_number()
        && total <= usize::from(u16::MAX);
    if !fits {
        return false;
    }
    let payload = &next[20 + head..usize::from(b.total_len())];
    p.truncate(usize::from(a.total_len()));
    p.extend_from_slice(payload);
    Ipv4Packet::new_unchecked(&mut p[..]).set_total_len(total as u16);
    true
}

impl Pair {
    fn new(max_connections: usize) -> Self {
        Self::new_with(max_connections, |_| {})
    }

    fn new_with(max_connections: usize, tune: impl FnOnce(&mut StackConfig)) -> Self {
        Self::with_budget(ConnectionBudget::new(max_connections), tune)
    }

    fn with_budget(budget: ConnectionBudget, tune: impl FnOnce(&mut StackConfig)) -> Self {
        let now = Instant::from_millis(1_000);
        let service = |port, app, bytes| ServiceConfig::new(port, app, AppConfig { bytes });
        let mut config = StackConfig {
            frozen_queue_packets: 64,
            frozen_total_bytes: 64 << 20,
            max_half_open: 4,
            syn_cookies_after: None,
            seed: 7,
            ..StackConfig::new(
                vec![Ipv4Cidr {
                    addr: SERVICE,
                    prefix_len: 32,
                }],
                vec![
                    service(7, AppKind::Echo, None),
                    service(9, AppKind::Sink, None),
                    service(19, AppKind::Source, Some(1_000_000)),
                    service(80, AppKind::Http, None),
                ],
                [7; 16],
            )
        };
        tune(&mut config);
        let stack = Stack::new(config, budget.clone(), now);
        let mut pipe = Pipe::default();
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = 11;
        let mut client = Interface::new(cfg, &mut pipe, now);
        client.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(CLIENT), 24)).unwrap();
        });
        client
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(198, 18, 1, 1))
            .unwrap();
        Self {
            now,
            stack,
            client,
            pipe,
            sockets: SocketSet::new(vec![]),
            budget,
            next_port: 40_000,
            filter: None,
            tx_filter: None,
            gro: false,
            pieces: Vec::new(),
        }
    }

    fn connect(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        self.next_port += 1;
        s.connect(
            self.client.context(),
            (IpAddress::Ipv4(SERVICE), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    /// One millisecond of both sides.
    fn step(&mut self) {
        self.client
            .poll(self.now, &mut self.pipe, &mut self.sockets);
        // The filter sees every packet the client sent (lost ones are not merged).
        let mut sent = std::mem::take(&mut self.pipe.tx);
        if let Some(f) = self.filter.as_mut() {
            sent.retain_mut(|p| f(p));
        }
        while let Some(mut p) = sent.pop_front() {
            if self.gro {
                let mut merged = false;
                while let Some(next) = sent.front()
                    && gro_merge(&mut p, next)
                {
                    sent.pop_front();
                    merged = true;
                }
                if merged {
                    self.stack.handle_merged_packet(self.now, &mut p);
                    continue;
                }
            }
            self.stack.handle_packet(self.now, &mut p);
        }
        // As the node's worker does: what the stack emits is handed out while it polls.
        let (rx, tx_filter, pieces) = (&mut self.pipe.rx, &mut self.tx_filter, &mut self.pieces);
        pieces.clear();
        self.stack.poll_flushing(self.now, |stack| {
            pieces.push(drain(stack, rx, tx_filter));
        });
        self.pieces.push(drain(
            &mut self.stack,
            &mut self.pipe.rx,
            &mut self.tx_filter,
        ));
        self.client
            .poll(self.now, &mut self.pipe, &mut self.sockets);
        self.now += Duration::from_millis(1);
    }

    fn run_until(&mut self, limit_ms: u64, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..limit_ms {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!("condition not reached within {limit_ms} virtual ms");
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

/// Hands what the stack sent to the client, through `tx_filter`; returns the packets (a
/// function of its own, so that a profile shows the node's transmit path apart from the
/// client's).
#[inline(never)]
fn drain(
    stack: &mut Stack,
    rx: &mut VecDeque<Vec<u8>>,
    tx_filter: &mut Option<PacketFilter>,
) -> Vec<Vec<u8>> {
    let trace = std::env::var_os("PAIR_TRACE").is_some();
    let mut piece = Vec::new();
    stack.drain_transmit(|p| {
        piece.push(p.to_vec());
        if let Some(f) = tx_filter.as_mut()
            && !f(&mut p.to_vec())
        {
            return;
        }
        if trace {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(p).unwrap();
            let t = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            eprintln!(
                "S->C seq {} ack {} syn {} fin {} rst {} len {}",
                t.seq_number(),
                t.ack_number(),
                t.syn(),
                t.fin(),
                t.rst(),
                t.payload().len()
            );
        }
        rx.push_back(p.to_vec())
    });
    piece
}

fn counting(offset: u64, n: usize) -> Vec<u8> {
    (offset..offset + n as u64)
        .map(|i| ((i / 8) >> (8 * (i % 8))) as u8)
        .collect()
}

#[test]
fn poll_delay_is_never_negative_nor_huge() {
    let mut p = Pair::new(10);
    let h = p.connect(19);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    for _ in 0..200 {
        p.step();
        let d = p.stack.poll_delay(p.now);
        // The sweep bounds every sleep to a second.
        assert!(d <= Duration::from_millis(1000), "{d}");
        assert!(p.stack.poll_at(p.now) >= p.now);
    }
}

#[test]
fn handshake_is_recorded() {
    let mut p = Pair::new(100);
    let h = p.connect(7);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    p.step();
    let conns = p.stack.conns(p.now);
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c.client, SocketAddrV4::new(CLIENT, 40_001));
    assert_eq!(c.service, SocketAddrV4::new(SERVICE, 7));
    assert_eq!(c.state, "ESTABLISHED");
    let syn = c.handshake.client_syn.expect("client SYN recorded");
    assert_eq!(syn.mss, Some(1460));
    let synack = c.handshake.our_syn_ack.expect("our SYN-ACK recorded");
    // 256 KiB receive buffer (the default): smoltcp advertises window scale
    // bitlen(262144) - 16 = 3.
    assert_eq!(synack.window_scale, Some(3));
    assert_ne!(synack.isn, 0);
}

/// Sends `data` on the client socket `h` (to `echo`) while reading what comes back, until as
/// many bytes came back as were sent; returns them.
fn echo_through(p: &mut Pair, h: SocketHandle, data: &[u8]) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    p.run_until(60_000, |p| {
        let s = p.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == data.len()
    });
    got
}

/// A service with emulated work (`work_passes`) serves the same bytes, and counts what it
/// worked on; one without counts nothing.
#[test]
fn emulated_work_changes_no_byte_and_is_counted() {
    let mut p = Pair::new_with(100, |c| {
        let echo = c.services.iter_mut().find(|s| s.port == 7).unwrap();
        echo.work_passes = 3;
    });
    let h = p.connect(7);
    let data = counting(3, 200_000);
    let got = echo_through(&mut p, h, &data);
    assert!(got == data, "echo with emulated work is not byte-exact");
    assert_eq!(p.stack.stats().work_bytes, 2 * data.len() as u64);
    let h = p.connect(19);
    p.run_until(20_000, |p| {
        let s = p.sock(h);
        while s.can_recv() {
            s.recv(|b| (b.len(), ())).unwrap();
        }
        !s.may_recv()
    });
    assert_eq!(p.stack.stats().work_bytes, 2 * data.len() as u64);
}

#[test]
fn echo_is_byte_exact_and_mirrored() {
    let mut p = Pair::new(100);
    let h = p.connect(7);
    let data = counting(0, 300_000);
    let got = echo_through(&mut p, h, &data);
    assert_eq!(got, data);
    let c = &p.stack.conns(p.now)[0];
    assert_eq!(c.bytes_in, data.len() as u64);
    assert_eq!(c.bytes_out, data.len() as u64);
    assert_eq!(p.stack.stats().app_bytes_out, data.len() as u64);
    // The predictor's sample counts the flow's packets each way: at least one per
    // 1,500-byte packet of data, at most every packet the stack handled.
    let sample = &p.stack.predict_samples()[0];
    let k = sample.report.counters;
    assert_eq!((k.bytes_in, k.bytes_out), (c.bytes_in, c.bytes_out));
    let least = data.len() as u64 / 1500;
    assert!(
        (least..=p.stack.stats().packets_in).contains(&k.packets_in),
        "{k:?}"
    );
    assert!(
        (least..=p.stack.stats().packets_out).contains(&k.packets_out),
        "{k:?}"
    );
}

#[test]
fn source_sends_n_bytes_then_fin() {
    let mut p = Pair::new(100);
    let h = p.connect(19);
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        let s = p.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv() && s.state() != tcp::State::SynSent && s.state() != tcp::State::Established
    });
    assert_eq!(got.len(), 1_000_000);
    assert!(got == counting(0, 1_000_000), "counting stream mismatch");
    p.sock(h).close();
    // We closed first: the socket goes as soon as it reaches TIME-WAIT (a record stays).
    p.run_until(100, |p| {
        p.stack.connection_count() == 0 && p.budget.open() == 0
    });
    assert_eq!(p.stack.stats().conns_closed, 1);
    assert_eq!(p.stack.stats().time_wait, 1);
}

#[test]
fn sink_reports_bytes_and_crc() {
    let mut p = Pair::new(100);
    let h = p.connect(9);
    let data = counting(5, 123_457);
    let mut sent = 0;
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        let s = p.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
            if sent == data.len() {
                s.close();
            }
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.ends_with(b"\n")
    });
    let want = format!("{} {:08x}\n", data.len(), crc32fast::hash(&data));
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

#[test]
fn closed_port_gets_rst_and_limit_is_enforced() {
    let mut p = Pair::new(2);
    let closed = p.connect(4444);
    p.run_until(100, |p| p.sock(closed).state() == tcp::State::Closed);
    assert_eq!(p.stack.stats().refused_no_service, 1);

    let a = p.connect(7);
    let b = p.connect(7);
    p.run_until(100, |p| {
        p.sock(a).state() == tcp::State::Established && p.sock(b).state() == tcp::State::Established
    });
    let c = p.connect(7);
    p.run_until(100, |p| p.sock(c).state() == tcp::State::Closed);
    assert_eq!(p.stack.stats().refused_limit, 1);
    assert_eq!(p.stack.connection_count(), 2);
    // The two admitted connections still work.
    p.sock(a).send_slice(b"ping").unwrap();
    let mut got = [0u8; 4];
    p.run_until(100, |p| p.sock(a).recv_slice(&mut got).unwrap_or(0) == 4);
    assert_eq!(&got, b"ping");
    // Closing one frees a slot.
    p.sock(b).close();
    p.run_until(2_000, |p| p.budget.open() == 1);
    let d = p.connect(7);
    p.run_until(100, |p| p.sock(d).state() == tcp::State::Established);
}

#[test]
fn frozen_flow_queues_then_resumes() {
    let mut p = Pair::new(10);
    let h = p.connect(7);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    let id = p.stack.conns(p.now)[0].id;
    p.stack.freeze(p.now, id).unwrap();
    p.sock(h).send_slice(b"hello while frozen").unwrap();
    for _ in 0..50 {
        p.step();
    }
    assert_eq!(
        p.sock(h).recv_queue(),
        0,
        "nothing may be delivered while frozen"
    );
    assert_eq!(p.stack.conns(p.now)[0].mode, "frozen");
    let replayed = p.stack.thaw(p.now, id).unwrap();
    assert!(replayed >= 1);
    let mut got = Vec::new();
    p.run_until(5_000, |p| {
        let mut b = [0u8; 64];
        let n = p.sock(h).recv_slice(&mut b).unwrap();
        got.extend_from_slice(&b[..n]);
        got.len() == 18
    });
    assert_eq!(&got, b"hello while frozen");
    assert_eq!(
        p.stack.stats().dropped[DropReason::FrozenQueueFull.index()],
        0
    );
}

/// Reads what the client socket holds into `got`.
fn read_into(p: &mut Pair, h: SocketHandle, got: &mut Vec<u8>) {
    let s = p.sock(h);
    while s.can_recv() {
        s.recv(|b| {
            got.extend_from_slice(b);
            (b.len(), ())
        })
        .unwrap();
    }
}

/// Ahead of a move the app is held: the socket sends what it has, nothing more, until the
/// buffer is drained; then the flow resumes (here by `resume`, or by a freeze and a thaw)
/// and the stream carries on byte-exact.
#[test]
fn a_quiescing_flow_drains_its_send_buffer_and_resumes_byte_exact() {
    for thaw in [false, true] {
        let mut p = Pair::new(100);
        let h = p.connect(19);
        let mut got = Vec::new();
        p.run_until(5_000, |p| {
            read_into(p, h, &mut got);
            got.len() > 100_000
        });
        let id = p.stack.conns(p.now)[0].id;
        let queued = p.stack.quiesce(id).unwrap();
        assert!(queued > 0, "a download has bytes queued");
        let written = p.stack.conns(p.now)[0].bytes_out;
        p.run_until(5_000, |p| {
            read_into(p, h, &mut got);
            p.stack.send_queued(id) == Some(0)
        });
        for _ in 0..20 {
            p.step();
            read_into(&mut p, h, &mut got);
        }
        assert_eq!(
            p.stack.conns(p.now)[0].bytes_out,
            written,
            "the app wrote while held"
        );
        assert_eq!(
            got.len() as u64,
            written,
            "the client has all the app wrote"
        );
        if thaw {
            p.stack.freeze(p.now, id).unwrap();
            assert!(matches!(
                p.stack.quiesce(id),
                Err(flowshift_core::stack::FlowError::WrongMode { .. })
            ));
            p.stack.thaw(p.now, id).unwrap();
        } else {
            p.stack.resume(id);
        }
        p.run_until(20_000, |p| {
            read_into(p, h, &mut got);
            !p.sock(h).may_recv()
        });
        assert!(got == counting(0, 1_000_000), "counting stream mismatch");
        assert_eq!(
            p.sock(h).state(),
            tcp::State::CloseWait,
            "closed by FIN, not reset"
        );
    }
}

#[test]
fn corrupted_packets_are_counted_and_do_not_disturb() {
    let mut p = Pair::new(10);
    let h = p.connect(7);
    // Corrupt every 7th client packet: TCP retransmits, the bytes still arrive exactly.
    let mut n = 0u32;
    p.filter = Some(Box::new(move |pkt| {
        n += 1;
        if n.is_multiple_of(7) {
            let last = pkt.len() - 1;
            pkt[last] ^= 0x5a;
        }
        true
    }));
    let data = counting(0, 50_000);
    let mut sent = 0;
    let mut got = Vec::new();
    p.run_until(60_000, |p| {
        let s = p.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == data.len()
    });
    assert!(got == data);
    assert!(p.stack.stats().dropped[DropReason::BadChecksum.index()] > 0);
    // Garbage of every shape.
    for len in 0..80usize {
        let junk: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        p.stack.handle_packet(p.now, &mut junk.clone());
        let mut v4 = junk.clone();
        if !v4.is_empty() {
            v4[0] = 0x45;
        }
        p.stack.handle_packet(p.now, &mut v4.clone());
    }
    p.step();
    assert_eq!(p.sock(h).state(), tcp::State::Established);
    assert_eq!(p.stack.connection_count(), 1);
}

#[test]
fn shutdown_closes_gracefully() {
    let mut p = Pair::new(10);
    let h = p.connect(7);
    let half_open = p.connect(7);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    p.step();
    // A handshake still in progress when the shutdown begins is refused.
    p.sock(half_open).abort();
    let half_open = p.connect(7);
    p.client.poll(p.now, &mut p.pipe, &mut p.sockets);
    while let Some(pkt) = p.pipe.tx.pop_front() {
        p.stack.handle_packet(p.now, &mut pkt.clone());
    }
    p.stack.begin_shutdown(p.now);
    p.run_until(1_000, |p| !p.sock(h).may_recv());
    p.run_until(1_000, |p| p.sock(half_open).state() == tcp::State::Closed);
    p.sock(h).close();
    p.run_until(2_000, |p| p.stack.live_connection_count() == 0);
    // New connections are refused while shutting down.
    let late = p.connect(7);
    p.run_until(100, |p| p.sock(late).state() == tcp::State::Closed);
    assert_eq!(p.stack.stats().refused_shutdown, 1);
}

#[test]
fn half_open_connections_time_out() {
    let mut p = Pair::new(10);
    // The client's SYN gets through; everything after it is lost.
    let mut seen = 0;
    p.filter = Some(Box::new(move |_| {
        seen += 1;
        seen == 1
    }));
    let _h = p.connect(7);
    p.run_until(100, |p| p.stack.connection_count() == 1);
    assert_eq!(p.stack.conns(p.now)[0].state, "SYN-RECEIVED");
    p.run_until(15_000, |p| p.stack.connection_count() == 0);
    assert_eq!(p.stack.stats().handshake_timeouts, 1);
    assert_eq!(p.budget.open(), 0);
}

#[test]
fn a_syn_smoltcp_rejects_leaves_no_listener_behind() {
    let mut p = Pair::new(10);
    // The first SYN is made malformed (SYN+FIN, checksum fixed so it passes classification).
    let mut first = true;
    p.filter = Some(Box::new(move |pkt| {
        if std::mem::take(&mut first) {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(&pkt[..]).unwrap();
            let (src, dst, hl) = (ip.src_addr(), ip.dst_addr(), usize::from(ip.header_len()));
            let mut tcp = smoltcp::wire::TcpPacket::new_checked(&mut pkt[hl..]).unwrap();
            tcp.set_fin(true);
            tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        }
        true
    }));
    let bad = p.connect(7);
    for _ in 0..5 {
        p.step();
    }
    p.sock(bad).abort();
    p.step();
    assert_eq!(p.budget.open(), 0, "a socket was left for the rejected SYN");
    // The next clients get their own sockets and their own bytes.
    let a = p.connect(7);
    let b = p.connect(7);
    p.run_until(1_000, |p| {
        p.sock(a).state() == tcp::State::Established && p.sock(b).state() == tcp::State::Established
    });
    p.sock(a).send_slice(b"for a").unwrap();
    p.sock(b).send_slice(b"for b").unwrap();
    let (mut ga, mut gb) = ([0u8; 5], [0u8; 5]);
    p.run_until(1_000, |p| {
        p.sock(a).recv_queue() == 5 && p.sock(b).recv_queue() == 5
    });
    p.sock(a).recv_slice(&mut ga).unwrap();
    p.sock(b).recv_slice(&mut gb).unwrap();
    assert_eq!((&ga, &gb), (b"for a", b"for b"));
    assert_eq!(p.stack.connection_count(), 2);
}

#[test]
fn a_syn_flood_is_bounded_by_max_half_open() {
    // Pair::new gives the stack max_half_open = 4. Until `pass` is set, only SYNs reach it:
    // every client's handshake stays half-open on the stack's side.
    let mut p = Pair::new(100);
    let pass = std::rc::Rc::new(std::cell::Cell::new(false));
    let gate = pass.clone();
    p.filter = Some(Box::new(move |pkt| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&pkt[..]).unwrap();
        let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        gate.get() || (tcp.syn() && !tcp.ack())
    }));
    let clients: Vec<SocketHandle> = (0..6).map(|_| p.connect(7)).collect();
    p.run_until(200, |p| p.stack.stats().refused_half_open == 2);
    assert_eq!(p.stack.connection_count(), 4);
    assert_eq!(p.budget.open(), 4);
    // The refused two were reset.
    p.run_until(200, |p| {
        clients
            .iter()
            .filter(|&&h| p.sock(h).state() == tcp::State::Closed)
            .count()
            == 2
    });
    // Once the ACKs get through, the handshakes complete and free their half-open slots:
    // new clients are accepted again and every admitted connection carries bytes.
    pass.set(true);
    let live: Vec<SocketHandle> = clients
        .iter()
        .copied()
        .filter(|&h| p.sock(h).state() != tcp::State::Closed)
        .collect();
    // The stack retransmits its SYN-ACK; the client's ACK of it completes the handshake.
    p.run_until(5_000, |p| {
        p.stack
            .conns(p.now)
            .iter()
            .all(|c| c.state == "ESTABLISHED")
    });
    let more: Vec<SocketHandle> = (0..4).map(|_| p.connect(7)).collect();
    p.run_until(200, |p| {
        more.iter()
            .all(|&h| p.sock(h).state() == tcp::State::Established)
    });
    assert_eq!(p.stack.stats().refused_half_open, 2);
    assert_eq!(p.stack.connection_count(), 8);
    for &h in live.iter().chain(&more) {
        p.sock(h).send_slice(b"hi").unwrap();
    }
    p.run_until(200, |p| {
        live.iter()
            .chain(&more)
            .all(|&h| p.sock(h).recv_queue() == 2)
    });
}

#[test]
fn timestamps_are_recorded_both_ways() {
    let mut p = Pair::new(100);
    let h = p.connect(7);
    // The client's clock runs at 1 kHz from 5000; the stack's from its own generator.
    p.sock(h).set_tsval_generator(Some(|| 5_000));
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    p.sock(h).send_slice(b"x").unwrap();
    p.run_until(100, |p| p.sock(h).recv_queue() == 1);
    let c = &p.stack.conns(p.now)[0];
    let syn = c.handshake.client_syn.expect("client SYN recorded");
    assert_eq!(syn.timestamp.map(|t| t.0), Some(5_000));
    assert_eq!(c.handshake.client_tsval, Some(5_000));
    assert!(c.handshake.our_tsval.is_some(), "{:?}", c.handshake);
}

#[test]
fn an_idle_connection_is_not_reset() {
    // smoltcp's timeout counts from the last packet received: armed for good, it would reset
    // every connection idle for two minutes.
    let mut p = Pair::new(10);
    let h = p.connect(7);
    let mut got = Vec::new();
    let mut sent = false;
    p.run_until(1_000, |p| {
        let s = p.sock(h);
        if !sent && s.can_send() {
            sent = s.send_slice(b"x").unwrap() == 1;
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got == b"x"
    });
    for _ in 0..2 {
        p.step();
    }
    // Ten minutes of silence, a second at a time.
    for _ in 0..600 {
        p.now += Duration::from_millis(999);
        p.step();
    }
    assert_eq!(p.sock(h).state(), tcp::State::Established);
    assert_eq!(p.stack.conns(p.now)[0].state, "ESTABLISHED");
    // And it still works.
    p.sock(h).send_slice(b"y").unwrap();
    p.run_until(1_000, |p| {
        let s = p.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got == b"xy"
    });
}

/// Downloads the source app's bytes and closes after its FIN, so the node closed first and
/// ends in TIME-WAIT. Returns the client's port and a copy of the client's FIN.
fn download_then_time_wait(p: &mut Pair) -> (u16, Vec<u8>) {
    let fins = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = fins.clone();
    p.filter = Some(Box::new(move |pkt| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&pkt[..]).unwrap();
        let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        if tcp.fin() {
            seen.borrow_mut().push(pkt.clone());
        }
        true
    }));
    let h = p.connect(19);
    let port = p.next_port;
    let mut got = 0;
    p.run_until(20_000, |p| {
        let s = p.sock(h);
        while s.can_recv() {
            got += s.recv(|b| (b.len(), b.len())).unwrap();
        }
        !s.may_recv() && s.state() != tcp::State::SynSent
    });
    assert_eq!(got, 1_000_000);
    let before = p.stack.stats().time_wait;
    p.sock(h).close();
    // The client got the ACK of its FIN before the node's socket went: CLOSED, not LAST-ACK.
    p.run_until(1_000, |p| p.sock(h).state() == tcp::State::Closed);
    p.run_until(100, |p| p.stack.stats().time_wait == before + 1);
    p.filter = None;
    let fin = fins.borrow().last().cloned().expect("the client's FIN");
    (port, fin)
}

/// A bare segment from the client's `port` to the source service.
fn client_segment(
    port: u16,
    control: smoltcp::wire::TcpControl,
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    raw_segment((port, 19), control, (seq, ack), (1000, None), &[])
}

/// A client segment `(from port, to port)`, `(seq, ack)`, `(window, window scale)` (a SYN
/// also offers MSS 1460), carrying `payload`.
fn raw_segment(
    (port, to): (u16, u16),
    control: smoltcp::wire::TcpControl,
    (seq, ack): (u32, Option<u32>),
    (window, window_scale): (u16, Option<u8>),
    payload: &[u8],
) -> Vec<u8> {
    use smoltcp::wire::{TcpRepr, TcpSeqNumber};
    let syn = control == smoltcp::wire::TcpControl::Syn;
    let repr = TcpRepr {
        src_port: port,
        dst_port: to,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: window,
        window_scale: window_scale.filter(|_| syn),
        max_seg_size: syn.then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    flowshift_core::packet::emit_ipv4_tcp(CLIENT, SERVICE, &repr)
}

/// Feeds `packet` to the stack and returns what it sends back.
fn exchange(p: &mut Pair, packet: &[u8]) -> Vec<smoltcp::wire::TcpRepr<'static>> {
    p.stack.handle_packet(p.now, &mut packet.to_vec());
    p.stack.poll(p.now);
    let mut out = Vec::new();
    p.stack.drain_transmit(|b| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(b).unwrap();
        let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        out.push((
            tcp.syn(),
            tcp.ack(),
            tcp.rst(),
            tcp.seq_number(),
            tcp.ack_number(),
        ));
    });
    out.into_iter()
        .map(|(syn, ack, rst, seq, ackn)| smoltcp::wire::TcpRepr {
            src_port: 19,
            dst_port: 0,
            control: if syn {
                smoltcp::wire::TcpControl::Syn
            } else if rst {
                smoltcp::wire::TcpControl::Rst
            } else {
                smoltcp::wire::TcpControl::None
            },
            seq_number: seq,
            ack_number: ack.then_some(ackn),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        })
        .collect()
}

fn fin_seq(fin: &[u8]) -> (u32, u32) {
    let ip = smoltcp::wire::Ipv4Packet::new_checked(fin).unwrap();
    let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
    (tcp.seq_number().0 as u32, tcp.ack_number().0 as u32)
}

#[test]
fn a_connection_the_node_closed_first_becomes_a_time_wait_record_without_a_socket() {
    let mut p = Pair::new(100);
    let (_port, fin) = download_then_time_wait(&mut p);
    assert_eq!(p.stack.connection_count(), 0);
    assert_eq!(p.budget.open(), 0, "the connection slot is free");
    assert!(p.stack.conns(p.now).is_empty());
    let tw = p.stack.time_wait_conns(p.now);
    assert_eq!(tw.len(), 1);
    assert_eq!(tw[0].state, "TIME-WAIT");
    assert_eq!(p.stack.stats().time_wait, 1);
    assert_eq!(p.stack.stats().conns_closed, 1);
    // The client's FIN again (our ACK was lost): acknowledged again from the record.
    let (seq, ack) = fin_seq(&fin);
    let out = exchange(&mut p, &fin);
    assert_eq!(out.len(), 1, "one ACK");
    assert_eq!(out[0].control, smoltcp::wire::TcpControl::None);
    assert_eq!(
        out[0].ack_number.map(|a| a.0 as u32),
        Some(seq.wrapping_add(1))
    );
    assert_eq!(out[0].seq_number.0 as u32, ack);
    assert_eq!(p.stack.stats().time_wait_acks, 1);
    // The record goes after 60 s.
    p.now += Duration::from_secs(61);
    p.run_until(2_000, |p| p.stack.stats().time_wait == 0);
    assert!(p.stack.time_wait_conns(p.now).is_empty());
}

#[test]
fn a_newer_syn_on_a_time_wait_4_tuple_opens_a_connection_and_an_older_one_is_acked() {
    let mut p = Pair::new(100);
    let (port, fin) = download_then_time_wait(&mut p);
    let (seq, _) = fin_seq(&fin);
    // Below the old rcv_nxt: maybe an old duplicate. ACKed, the record stays.
    let out = exchange(
        &mut p,
        &client_segment(
            port,
            smoltcp::wire::TcpControl::Syn,
            seq.wrapping_sub(5_000),
            None,
        ),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].control,
        smoltcp::wire::TcpControl::None,
        "not a SYN-ACK"
    );
    assert_eq!(p.stack.stats().time_wait, 1);
    assert_eq!(p.stack.connection_count(), 0);
    // Beyond it: a new connection at once, as Linux accepts it.
    let isn = seq.wrapping_add(100_000);
    let out = exchange(
        &mut p,
        &client_segment(port, smoltcp::wire::TcpControl::Syn, isn, None),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].control, smoltcp::wire::TcpControl::Syn, "SYN-ACK");
    assert_eq!(
        out[0].ack_number.map(|a| a.0 as u32),
        Some(isn.wrapping_add(1))
    );
    assert_eq!(p.stack.stats().time_wait_reused, 1);
    assert_eq!(p.stack.stats().time_wait, 0);
    assert_eq!(p.stack.connection_count(), 1);
    // A RST on another record ends its wait.
    let (port2, fin2) = download_then_time_wait(&mut p);
    let (seq2, _) = fin_seq(&fin2);
    assert_eq!(p.stack.stats().time_wait, 1);
    let out = exchange(
        &mut p,
        &client_segment(
            port2,
            smoltcp::wire::TcpControl::Rst,
            seq2.wrapping_add(1),
            None,
        ),
    );
    assert!(out.is_empty());
    assert_eq!(p.stack.stats().time_wait, 0);
}

fn recv_text(p: &mut Pair, h: SocketHandle) -> String {
    let mut got = Vec::new();
    let s = p.sock(h);
    while s.can_recv() {
        s.recv(|b| {
            got.extend_from_slice(b);
            (b.len(), ())
        })
        .unwrap();
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn an_http_connection_idle_between_requests_is_closed_and_an_echo_one_is_not() {
    let mut p = Pair::new(100);
    let http = p.connect(80);
    let echo = p.connect(7);
    p.run_until(1_000, |p| {
        p.sock(http).state() == tcp::State::Established
            && p.sock(echo).state() == tcp::State::Established
    });
    p.sock(http)
        .send_slice(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    p.run_until(1_000, |p| {
        text += &recv_text(p, http);
        text.ends_with("\r\n\r\n") || text.len() > 40 && text.contains("Content-Length: 10")
    });
    // 72 s (and 1.5 s of steps) idle: still open.
    p.now += Duration::from_secs(72);
    for _ in 0..1_500 {
        p.step();
    }
    assert!(p.sock(http).may_recv(), "closed before the idle timeout");
    // Past 75 s: a graceful close (FIN), counted; the echo connection stays.
    p.now += Duration::from_secs(3);
    p.run_until(2_000, |p| !p.sock(http).may_recv());
    assert_eq!(p.stack.stats().idle_closed, 1);
    // Ten idle minutes, in 30 s jumps (the client answers the keepalive probes between).
    for _ in 0..20 {
        p.now += Duration::from_secs(30);
        for _ in 0..50 {
            p.step();
        }
    }
    assert_eq!(p.sock(echo).state(), tcp::State::Established);
    assert_eq!(p.stack.stats().idle_closed, 1);
    assert_eq!(p.stack.stats().keepalive_timeouts, 0);
}

#[test]
fn a_request_head_that_never_completes_is_cut_off() {
    let mut p = Pair::new(100);
    let h = p.connect(80);
    p.run_until(1_000, |p| p.sock(h).state() == tcp::State::Established);
    // A slow client: a byte now and then, never the end of the head.
    p.sock(h).send_slice(b"GET /bytes/10 HTTP/1.1\r\n").unwrap();
    for i in 0..58 {
        p.now += Duration::from_secs(1);
        p.sock(h).send_slice(&[b'X' + (i % 2)]).unwrap();
        for _ in 0..10 {
            p.step();
        }
        assert!(p.sock(h).may_recv(), "cut off after {i} s");
    }
    p.now += Duration::from_secs(3);
    p.run_until(2_000, |p| !p.sock(h).may_recv());
    assert_eq!(p.stack.stats().head_timeouts, 1);
    assert_eq!(p.stack.stats().idle_closed, 0);
}

#[test]
fn a_request_split_over_two_writes_is_answered_without_waiting_for_a_delayed_ack() {
    let mut p = Pair::new(100);
    let h = p.connect(80);
    p.run_until(1_000, |p| p.sock(h).state() == tcp::State::Established);
    assert!(
        p.sock(h).nagle_enabled(),
        "the client must use Nagle for this test"
    );
    p.sock(h).send_slice(b"GET /bytes/10 HTTP/1.1\r\n").unwrap();
    p.step();
    // Nagle holds this until the first part is acknowledged.
    p.sock(h).send_slice(b"Host: t\r\n\r\n").unwrap();
    let start = p.now;
    let mut text = String::new();
    p.run_until(1_000, |p| {
        text += &recv_text(p, h);
        text.contains("Content-Length: 10\r\n")
    });
    // Virtual time: a delayed ACK would cost 10 ms here.
    assert!(
        p.now - start < Duration::from_millis(5),
        "answered {} after the second write",
        p.now - start
    );
}

#[test]
fn a_frozen_flow_queues_at_most_its_bytes_and_a_forgotten_freeze_ends() {
    let mut p = Pair::new_with(10, |c| {
        c.frozen_queue_bytes = 5_200;
        c.freeze_timeout = Duration::from_secs(60);
    });
    let h = p.connect(9);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    let id = p.stack.conns(p.now)[0].id;
    p.stack.freeze(p.now, id).unwrap();
    // Ten 1,040-byte packets while frozen (crafted: the queue does not look at sequence
    // numbers): five fit the 5,200-byte cap, five are dropped and counted.
    let port = p.next_port;
    for i in 0..10u32 {
        let repr = smoltcp::wire::TcpRepr {
            src_port: port,
            dst_port: 9,
            control: smoltcp::wire::TcpControl::Psh,
            seq_number: smoltcp::wire::TcpSeqNumber((i * 1000) as i32),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[0u8; 1000],
        };
        let packet = flowshift_core::packet::emit_ipv4_tcp(CLIENT, SERVICE, &repr);
        p.stack.handle_packet(p.now, &mut packet.clone());
    }
    let dropped = p.stack.stats().dropped[DropReason::FrozenQueueFull.index()];
    assert_eq!(dropped, 5, "{:?}", p.stack.stats());
    assert_eq!(p.stack.conns(p.now)[0].bytes_in, 0);
    // And the client's own bytes, sent while frozen.
    let data = counting(0, 100_000);
    let mut sent = 0;
    for _ in 0..200 {
        if sent < data.len() {
            sent += p.sock(h).send_slice(&data[sent..]).unwrap();
        }
        p.step();
    }
    assert_eq!(p.stack.conns(p.now)[0].bytes_in, 0);
    // Nobody thaws it: after freeze_timeout it thaws itself, and every byte arrives.
    p.now += Duration::from_secs(61);
    p.run_until(30_000, |p| {
        if sent < data.len() {
            sent += p.sock(h).send_slice(&data[sent..]).unwrap();
        }
        p.stack.conns(p.now)[0].bytes_in == 100_000
    });
    assert_eq!(p.stack.stats().freeze_timeouts, 1);
    assert_eq!(p.stack.conns(p.now)[0].mode, "local");
}

/// Our wire ISN of the connection from the client's `port` (from the SYN-ACK as it left).
fn wire_isn(p: &Pair, port: u16) -> u32 {
    p.stack
        .conns(p.now)
        .iter()
        .find(|c| c.client.port() == port)
        .and_then(|c| c.handshake.our_syn_ack)
        .expect("SYN-ACK recorded")
        .isn
}

/// Echoes `n` counting bytes over the established connection `h` and checks them.
fn echo_exact(p: &mut Pair, h: SocketHandle, n: usize) {
    let data = counting(0, n);
    assert_eq!(echo_through(p, h, &data), data);
    assert_eq!(p.sock(h).state(), tcp::State::Established);
}

#[test]
fn isns_are_the_keyed_hash_of_rfc_6528_unrelated_between_connections_and_nodes() {
    use flowshift_core::secure::Secrets;
    let mut a = Pair::new(100);
    let mut b = Pair::new_with(100, |c| c.secret = [8; 16]);
    let mut isns = Vec::new();
    for _ in 0..40 {
        let (ha, hb) = (a.connect(7), b.connect(7));
        let port = a.next_port;
        // The SYN reaches each stack in its next step.
        let (a_at, b_at) = (a.now, b.now);
        a.run_until(100, |p| p.sock(ha).state() == tcp::State::Established);
        b.run_until(100, |p| p.sock(hb).state() == tcp::State::Established);
        let client = SocketAddrV4::new(CLIENT, port);
        let service = SocketAddrV4::new(SERVICE, 7);
        let (isn_a, isn_b) = (wire_isn(&a, port), wire_isn(&b, port));
        assert_eq!(isn_a, Secrets::new(&[7; 16]).isn(client, service, a_at));
        assert_eq!(isn_b, Secrets::new(&[8; 16]).isn(client, service, b_at));
        // Another node's secret: an unrelated number for the same 4-tuple at the same time.
        let d = isn_b.wrapping_sub(Secrets::new(&[7; 16]).isn(client, service, b_at));
        assert!(
            d > 1 << 20 && d < u32::MAX - (1 << 20),
            "nodes {isn_a} {isn_b}"
        );
        isns.push(isn_a);
        // Both connections carry bytes both ways under the translation.
        a.sock(ha).send_slice(b"ping").unwrap();
        a.run_until(100, |p| p.sock(ha).recv_queue() == 4);
        a.sock(ha).abort();
        b.sock(hb).abort();
        a.step();
        b.step();
    }
    // Consecutive connections: no increment to learn (a clock-driven or counter ISN would
    // differ by a small or constant step).
    let steps: std::collections::HashSet<u32> =
        isns.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert_eq!(steps.len(), isns.len() - 1);
    for s in &steps {
        assert!(*s > 1 << 20 && *s < u32::MAX - (1 << 20), "step {s}");
    }
}

#[test]
fn a_syn_cookie_connection_carries_bytes_both_ways_with_and_without_timestamps() {
    for timestamps in [false, true] {
        let mut p = Pair::new_with(100, |c| c.syn_cookies_after = Some(0));
        let h = p.connect(7);
        if timestamps {
            p.sock(h).set_tsval_generator(Some(|| 5_000));
        }
        p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
        p.step(); // the client's ACK reaches the stack
        // Nothing was kept for the SYN: the connection came from the ACK's cookie.
        let st = p.stack.stats().clone();
        assert_eq!(st.syn_cookies_sent, 1, "timestamps {timestamps}");
        assert_eq!(st.syn_cookies_accepted, 1);
        assert_eq!(st.conns_accepted, 1);
        assert_eq!(p.stack.connection_count(), 1);
        echo_exact(&mut p, h, 300_000);
        let c = &p.stack.conns(p.now)[0];
        let syn = c.handshake.client_syn.unwrap();
        // The client's options came back through the cookie: its MSS (1460 is in the
        // table) and, with timestamps, its window scale (256 KiB buffer: bitlen - 16 = 3) and
        // TS.recent.
        assert_eq!(syn.mss, Some(1460));
        if timestamps {
            assert_eq!(syn.window_scale, Some(3));
            assert_eq!(c.handshake.client_tsval, Some(5_000));
        } else {
            assert_eq!(syn.window_scale, None);
        }
        // It closes as any connection does.
        p.sock(h).close();
        p.run_until(2_000, |p| p.stack.connection_count() == 0);
        assert_eq!(p.stack.stats().conns_closed, 1);
    }
}

#[test]
fn a_spoofed_syn_flood_gets_cookies_and_real_clients_still_get_in() {
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};
    // max_half_open 4, cookies after 2 handshakes in progress.
    let mut p = Pair::new_with(100, |c| c.syn_cookies_after = Some(2));
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut answered = 0;
    for i in 0..20_000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let src = Ipv4Addr::from(0xc612_0000 | (rng as u32 & 0xffff)); // 198.18.x.y
        let syn = TcpRepr {
            src_port: 1024 + (rng >> 20) as u16 % 60_000,
            dst_port: 7,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber((rng >> 32) as i32),
            ack_number: None,
            window_len: 64_240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: true,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let mut pkt = flowshift_core::packet::emit_ipv4_tcp(src, SERVICE, &syn);
        p.stack.handle_packet(p.now, &mut pkt);
        p.stack.poll(p.now);
        p.stack.drain_transmit(|_| answered += 1);
        if i % 1000 == 0 {
            p.now += Duration::from_millis(1);
        }
    }
    let st = p.stack.stats().clone();
    // Two handshakes hold state; every other SYN got a cookie and left nothing behind.
    assert_eq!(p.stack.connection_count(), 2);
    assert_eq!(st.syn_cookies_sent, 20_000 - 2);
    assert_eq!(st.refused_half_open, 0);
    assert_eq!(answered, 20_000, "every SYN answered with a SYN-ACK");
    // Real clients: all get in (by cookie) and carry bytes.
    let clients: Vec<SocketHandle> = (0..8).map(|_| p.connect(7)).collect();
    p.run_until(200, |p| {
        clients
            .iter()
            .all(|&h| p.sock(h).state() == tcp::State::Established)
    });
    for &h in &clients {
        echo_exact(&mut p, h, 20_000);
    }
    assert_eq!(p.stack.stats().syn_cookies_accepted, 8);
    assert_eq!(p.stack.stats().refused_half_open, 0);
}

#[test]
fn an_ack_with_a_forged_cookie_is_counted_and_reset() {
    use smoltcp::wire::TcpControl;
    let mut p = Pair::new_with(100, |c| c.syn_cookies_after = Some(0));
    // Cookies are in use (one real handshake by cookie).
    let h = p.connect(7);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    p.step();
    let forged = client_segment(50_000, TcpControl::None, 1_000, Some(123_456_789));
    // client_segment aims at port 19 (a service too).
    let out = exchange(&mut p, &forged);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].control, TcpControl::Rst);
    assert_eq!(p.stack.stats().syn_cookies_invalid, 1);
    assert_eq!(p.stack.connection_count(), 1);
    // Without cookies in use, ACKs of unknown connections are not even checked.
    let mut q = Pair::new(100);
    let forged = client_segment(50_000, TcpControl::None, 1_000, Some(123_456_789));
    let out = exchange(&mut q, &forged);
    assert_eq!(out[0].control, TcpControl::Rst);
    assert_eq!(q.stack.stats().syn_cookies_invalid, 0);
}

#[test]
fn keepalive_probes_an_idle_client_and_resets_a_dead_one() {
    let ka = Duration::from_secs(5);
    let mut p = Pair::new_with(100, |c| {
        for s in &mut c.services {
            s.keepalive = Some(ka);
        }
    });
    let alive = p.connect(7);
    let dead = p.connect(7);
    p.run_until(100, |p| {
        [alive, dead]
            .iter()
            .all(|&h| p.sock(h).state() == tcp::State::Established)
    });
    p.step();
    let dead_port = p.next_port;
    // From now on the dead client's packets vanish (it crashed without a word).
    p.filter = Some(Box::new(move |pkt| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&pkt[..]).unwrap();
        let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        tcp.src_port() != dead_port
    }));
    let out_before = p.stack.stats().packets_out;
    // Silent for 3 intervals: probes go out to both, only the living one answers.
    for _ in 0..15_500 {
        p.step();
    }
    let probes = p.stack.stats().packets_out - out_before;
    // Each of the two got probes every 5 s (the living one's answers rewind it; the idle
    // compaction at 2 s re-homes both sockets, which restarts their timers: 7 and 12 s).
    assert!((4..=8).contains(&probes), "{probes} packets out while idle");
    assert_eq!(p.stack.stats().compacted, 2);
    assert_eq!(p.stack.connection_count(), 2);
    assert_eq!(p.stack.stats().keepalive_timeouts, 0);
    // After 4 intervals of silence (20 s; the sweep runs every second) the dead one is
    // reset; the living one stays.
    p.run_until(7_000, |p| p.stack.stats().keepalive_timeouts == 1);
    assert!(p.now - Instant::from_millis(1_000) >= Duration::from_secs(20));
    assert_eq!(p.stack.connection_count(), 1);
    let c = &p.stack.conns(p.now)[0];
    assert_eq!(c.client.port(), dead_port - 1);
    // And it still carries bytes.
    echo_exact(&mut p, alive, 10_000);
}

#[test]
fn a_parked_idle_connection_still_sends_its_keepalive_probe_on_time_and_parks_again() {
    let ka = Duration::from_secs(30);
    let mut p = Pair::new_with(100, |c| {
        for s in &mut c.services {
            s.keepalive = Some(ka);
        }
    });
    let h = p.connect(7);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    echo_exact(&mut p, h, 10_000);
    let quiet_from = p.now;
    // Compacted after 2 s idle, parked the sweep after.
    p.run_until(6_000, |p| p.stack.conns(p.now)[0].parked);
    let out = p.stack.stats().packets_out;
    let in_ = p.stack.stats().packets_in;
    // Nothing leaves while parked, until the probe: smoltcp's keepalive timer restarted
    // when the compaction re-homed the socket (2–3 s in), so the probe is due 30 s later.
    p.run_until(40_000, |p| p.stack.stats().packets_out > out);
    let probe_at = p.now - quiet_from;
    assert!(
        probe_at >= ka && probe_at <= ka + Duration::from_secs(4),
        "keepalive probe {} ms after the last byte",
        probe_at.total_millis()
    );
    assert_eq!(p.stack.stats().packets_out, out + 1, "one probe");
    // The client answers; the connection parks again, and has not been reset.
    p.run_until(6_000, |p| {
        p.stack.stats().packets_in > in_ && p.stack.conns(p.now)[0].parked
    });
    assert_eq!(p.stack.stats().keepalive_timeouts, 0);
    assert_eq!(p.sock(h).state(), tcp::State::Established);
    echo_exact(&mut p, h, 5_000);
}

#[test]
fn a_client_address_holds_at_most_max_per_source_connections() {
    let mut p = Pair::with_budget(ConnectionBudget::new(100).with_per_source(3), |_| {});
    let hs: Vec<SocketHandle> = (0..5).map(|_| p.connect(7)).collect();
    p.run_until(500, |p| {
        hs.iter()
            .filter(|&&h| p.sock(h).state() == tcp::State::Established)
            .count()
            == 3
            && hs
                .iter()
                .filter(|&&h| p.sock(h).state() == tcp::State::Closed)
                .count()
                == 2
    });
    assert_eq!(p.stack.stats().refused_per_source, 2);
    assert_eq!(p.stack.stats().refused_limit, 0);
    assert_eq!(p.budget.open(), 3);
    assert_eq!(p.budget.sources(), 1);
    // One closes: its slot goes back to the address, and a new connection gets in.
    let live: Vec<SocketHandle> = hs
        .iter()
        .copied()
        .filter(|&h| p.sock(h).state() == tcp::State::Established)
        .collect();
    p.sock(live[0]).abort();
    p.run_until(500, |p| p.budget.open() == 2);
    let again = p.connect(7);
    p.run_until(500, |p| p.sock(again).state() == tcp::State::Established);
    echo_exact(&mut p, again, 5_000);
    assert_eq!(p.stack.stats().refused_per_source, 2);
    // Every connection gone: no address is tracked any more.
    for h in [live[1], live[2], again] {
        p.sock(h).abort();
    }
    p.run_until(500, |p| p.budget.open() == 0);
    assert_eq!(p.budget.sources(), 0);
}

/// One `GET /bytes/{n}` on the keep-alive connection `h`: the body, checked.
fn http_get_exact(p: &mut Pair, h: SocketHandle, n: usize) {
    let req = format!("GET /bytes/{n} HTTP/1.1\r\nHost: t\r\n\r\n");
    p.sock(h).send_slice(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        let s = p.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|e| got.len() - (e + 4) >= n)
    });
    let e = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    assert_eq!(&got[e + 4..], &counting(0, n)[..], "body of {n} bytes");
}

#[test]
fn an_idle_connection_is_compacted_and_carries_on_byte_exact() {
    use flowshift_core::stack::COMPACT_AFTER;
    let mut p = Pair::new(100);
    let http = p.connect(80);
    let echo = p.connect(7);
    p.sock(echo).set_tsval_generator(Some(|| 7_000));
    p.run_until(100, |p| {
        p.sock(http).state() == tcp::State::Established
            && p.sock(echo).state() == tcp::State::Established
    });
    http_get_exact(&mut p, http, 65_536);
    echo_exact(&mut p, echo, 65_536);
    let before = p.stack.conns(p.now);
    assert_eq!(p.stack.stats().compacted, 0);
    // Idle past COMPACT_AFTER: both are re-homed into fresh sockets, once.
    let idle_ms = COMPACT_AFTER.total_millis() + 1_500;
    for _ in 0..idle_ms {
        p.step();
    }
    assert_eq!(p.stack.stats().compacted, 2);
    // And parked out of the interface's polls, the sweep after.
    for _ in 0..1_000 {
        p.step();
    }
    assert!(p.stack.conns(p.now).iter().all(|c| c.parked));
    assert_eq!(p.stack.stats().parked, 2);
    for _ in 0..3_000 {
        p.step();
    }
    assert_eq!(
        p.stack.stats().compacted,
        2,
        "compacted again without moving a byte"
    );
    // The counters and the handshake record are those of before.
    let after = p.stack.conns(p.now);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (b.id, b.bytes_in, b.bytes_out),
            (a.id, a.bytes_in, a.bytes_out)
        );
        assert_eq!(b.handshake.our_syn_ack, a.handshake.our_syn_ack);
    }
    // Both carry on, byte-exact, in both directions (a packet brings a parked socket back
    // into the set); then idle again, compacted again.
    http_get_exact(&mut p, http, 200_000);
    echo_exact(&mut p, echo, 300_000);
    assert!(p.stack.conns(p.now).iter().all(|c| !c.parked));
    for _ in 0..idle_ms {
        p.step();
    }
    assert_eq!(p.stack.stats().compacted, 4);
    http_get_exact(&mut p, http, 1_000);
    assert_eq!(p.sock(http).state(), tcp::State::Established);
    assert_eq!(p.sock(echo).state(), tcp::State::Established);
}

/// Every exchange of an HTTP keep-alive connection is counted and timed (from the turn that
/// took the request to the client's acknowledgement of the response's first byte), and the
/// connection's end reports them with a clean close; a connection the client resets
/// reports an error.
#[test]
fn exchanges_are_counted_and_timed_and_the_end_reports_them() {
    let mut p = Pair::new(100);
    let h = p.connect(80);
    p.run_until(100, |p| p.sock(h).may_send());
    let request = b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..3 {
        p.sock(h).send_slice(request).unwrap();
        let mut got = Vec::new();
        p.run_until(1_000, |p| {
            read_into(p, h, &mut got);
            got.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|end| got.len() - (end + 4) >= 1000)
        });
        // Idle a while between requests.
        for _ in 0..50 {
            p.step();
        }
    }
    let sample = p.stack.predict_samples()[0].report.counters;
    assert_eq!((sample.requests_in, sample.requests_out), (3, 3));
    assert!(p.stack.take_ended().is_empty());
    p.sock(h).close();
    let mut ended = Vec::new();
    p.run_until(2_000, |p| {
        ended.extend(p.stack.take_ended());
        !ended.is_empty()
    });
    assert_eq!(ended.len(), 1, "{ended:?}");
    let e = ended[0];
    assert_eq!((e.requests, e.error, e.ingress), (3, false, None));
    // One client round trip on 1 ms steps, plus the client's delayed ACK (smoltcp's 10 ms).
    let latency = e.latency.expect("a response time");
    assert!(
        latency > Duration::ZERO && latency <= Duration::from_millis(50),
        "{latency}"
    );

    // A download with no request: no exchange, no response time; reset by the client: an
    // error.
    let h = p.connect(19);
    let mut got = Vec::new();
    p.run_until(1_000, |p| {
        read_into(p, h, &mut got);
        got.len() >= 10_000
    });
    p.sock(h).abort();
    let mut ended = Vec::new();
    p.run_until(1_000, |p| {
        ended.extend(p.stack.take_ended());
        !ended.is_empty()
    });
    let e = ended[0];
    assert_eq!((e.requests, e.latency, e.error), (0, None, true), "{e:?}");
}

/// Sends `n` bytes on `h` and returns the virtual milliseconds until all came back.
fn echo_round(p: &mut Pair, h: SocketHandle, n: usize) -> u64 {
    let start = p.now;
    let data = counting(0, n);
    p.sock(h).send_slice(&data).unwrap();
    let mut got = Vec::new();
    p.run_until(5_000, |p| {
        read_into(p, h, &mut got);
        got.len() >= n
    });
    assert_eq!(got, data);
    (p.now - start).total_millis()
}

/// A lost tail (here the only segment of an echo) has nothing after it to be acknowledged
/// twice: smoltcp repairs it only by its timeout, never under 1 s. The loss probe makes
/// smoltcp resend it after about two round trips and the delayed-ACK allowance, and a lost
/// probe is followed by a second after twice that; with probes off, the same loss takes over
/// a second.
#[test]
fn a_lost_tail_segment_is_probed_in_a_fraction_of_smoltcps_1_s_timeout() {
    /// (slowest clean exchange, the lossy exchange, probes sent), in virtual ms.
    fn run(loss_probes: bool, drops: u32) -> (u64, u64, u64) {
        let mut p = Pair::new_with(100, |c| c.tcp.loss_probes = loss_probes);
        let h = p.connect(7);
        p.run_until(100, |p| p.sock(h).may_send());
        // A few clean exchanges: a round-trip estimate.
        let clean = (0..5).map(|_| echo_round(&mut p, h, 100)).max().unwrap();
        // Drop the next `drops` data segments the stack sends: the echo, then its resends.
        let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
        let d = dropped.clone();
        p.tx_filter = Some(Box::new(move |pkt: &mut Vec<u8>| {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(&pkt[..]).unwrap();
            let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            if !tcp.payload().is_empty() && d.get() < drops {
                d.set(d.get() + 1);
                return false;
            }
            true
        }));
        let lossy = echo_round(&mut p, h, 100);
        assert_eq!(dropped.get(), drops);
        (clean, lossy, p.stack.stats().loss_probes)
    }
    let (clean, lossy, probes) = run(true, 1);
    eprintln!("clean exchange {clean} ms; lost echo with probes {lossy} ms");
    assert!(clean < 50, "clean exchange took {clean} ms");
    assert_eq!(probes, 1);
    // 2 × srtt (the client's 10 ms delayed ACK) + the 200 ms delayed-ACK allowance.
    assert!((200..400).contains(&lossy), "probed: {lossy} ms");
    // The probe lost too: a second one, twice the timeout later.
    let (_, lossy, probes) = run(true, 2);
    eprintln!("lost echo and lost probe {lossy} ms");
    assert_eq!(probes, 2);
    assert!((600..1000).contains(&lossy), "probed twice: {lossy} ms");
    let (_, lossy, probes) = run(false, 1);
    eprintln!("lost echo without probes {lossy} ms");
    assert_eq!(probes, 0);
    assert!(lossy >= 1000, "without probes: {lossy} ms");
}

/// Keep-alive HTTP objects while 3 % of the stack's packets are lost (a fixed pseudo-random
/// pattern): every body arrives intact and no object waits for smoltcp's 1 s timeout — the
/// worst is a lone lost tail's probe (two round trips and the 200 ms delayed-ACK
/// allowance), also when a probe is itself lost or a hole follows a probe.
#[test]
fn objects_under_random_loss_never_wait_for_smoltcps_timeout() {
    let mut p = Pair::new(100);
    let h = p.connect(80);
    p.run_until(100, |p| p.sock(h).may_send());
    let mut seed = 12345u64;
    let dropped = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let d = dropped.clone();
    p.tx_filter = Some(Box::new(move |_: &mut Vec<u8>| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let drop = (seed >> 33) % 100 < 3;
        d.set(d.get() + u64::from(drop));
        !drop
    }));
    let request = b"GET /bytes/16000 HTTP/1.1\r\nHost: x\r\n\r\n";
    let body = counting(0, 16_000);
    let mut worst = 0;
    for _ in 0..300 {
        let start = p.now;
        p.sock(h).send_slice(request).unwrap();
        let mut got = Vec::new();
        p.run_until(10_000, |p| {
            read_into(p, h, &mut got);
            got.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|end| got.len() - (end + 4) >= 16_000)
        });
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&got[end..], &body[..], "body differs");
        worst = worst.max((p.now - start).total_millis());
    }
    let probes = p.stack.stats().loss_probes;
    eprintln!(
        "{} packets dropped, {probes} probes, slowest object {worst} ms",
        dropped.get()
    );
    assert!(dropped.get() > 50);
    assert!(probes > 0);
    assert!(worst < 800, "an object took {worst} ms");
}

/// A class allocation, enforced: the connection moves no more than its rate limit (after a
/// burst of 20 ms worth), never queues more than its buffer budget in the send buffer, and
/// carries on at full speed once the allocation is lifted; every byte arrives in order.
#[test]
fn an_allocation_holds_a_download_to_its_rate_and_its_send_budget() {
    use flowshift_core::predict::class::Allocation;
    let mut p = Pair::new(100);
    let h = p.connect(19);
    p.run_until(100, |p| p.sock(h).may_recv());
    let id = p.stack.conns(p.now)[0].id;
    p.stack
        .set_allocation(
            p.now,
            id,
            Some(Allocation {
                rate_limit: Some(200_000),
                buffer_budget: 8192,
                priority: 0,
            }),
        )
        .unwrap();
    let start = p.now;
    let mut got = Vec::new();
    let mut most_queued = 0;
    for _ in 0..2_000 {
        p.step();
        read_into(&mut p, h, &mut got);
        most_queued = most_queued.max(p.stack.conns(p.now)[0].send_queue);
    }
    let secs = (p.now - start).total_millis() as f64 / 1e3;
    // 2 s at 200 kB/s, plus the first burst and what was written before the allocation.
    let rate = got.len() as f64 / secs;
    assert!(
        (150_000.0..260_000.0).contains(&rate),
        "{rate} B/s over {secs} s"
    );
    assert!(most_queued <= 8192, "{most_queued} bytes queued");
    // Lifted: the rest of the 1 MB comes at once.
    p.stack.set_allocation(p.now, id, None).unwrap();
    p.run_until(2_000, |p| {
        read_into(p, h, &mut got);
        got.len() >= 1_000_000
    });
    assert_eq!(got, counting(0, 1_000_000));
}

/// Uploads `UPLOAD_MB` MiB (default 4) into `sink` and checks its report: the deterministic
/// workload for the node's cost per uploaded byte. Under `valgrind --tool=callgrind`, the
/// node's share is the inclusive cost of `Stack::handle`, `Stack::poll` and `Pair::drain`
/// (the client's smoltcp and the test's own CRC are in the profile too). Of every `lose.0`
/// client data segments, `lose.1` in a row are dropped, three times (`lose.0` 0: none).
/// Returns the stack's counters.
fn upload_into_sink(
    gro: bool,
    direct_receive: bool,
    lose: (usize, usize),
) -> flowshift_core::stack::StackStats {
    let mb: usize = std::env::var("UPLOAD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let total = mb << 20;
    let chunk = counting(0, 64 * 1024);
    let mut p = Pair::new_with(10, |c| c.tcp.direct_receive = direct_receive);
    p.gro = gro;
    if lose.0 > 0 {
        let mut seen = 0;
        p.filter = Some(Box::new(move |pkt| {
            let data = pkt.len() > 100;
            seen += usize::from(data);
            !(data && seen < 3 * lose.0 && seen % lose.0 >= lose.0 - lose.1)
        }));
    }
    let h = p.connect(9);
    let mut sent = 0;
    let mut crc = crc32fast::Hasher::new();
    let mut got = Vec::new();
    p.run_until(100_000, |p| {
        let s = p.sock(h);
        while s.can_send() && sent < total {
            let at = sent % chunk.len();
            let end = chunk.len().min(at + total - sent);
            let n = s.send_slice(&chunk[at..end]).unwrap();
            crc.update(&chunk[at..at + n]);
            sent += n;
            if sent == total {
                s.close();
            }
        }
        read_into(p, h, &mut got);
        got.ends_with(b"\n")
    });
    let want = format!("{total} {:08x}\n", crc.finalize());
    assert_eq!(String::from_utf8(got).unwrap(), want);
    let stats = p.stack.stats().clone();
    assert_eq!(stats.app_bytes_in, total as u64);
    // The client kept to the window it was given: nothing was cut.
    assert_eq!(stats.rx_beyond_window, 0);
    stats
}

#[test]
fn a_long_upload_into_sink_is_byte_exact() {
    let stats = upload_into_sink(false, true, (0, 0));
    // Segments of one MSS are not worth taking straight from the packet.
    assert_eq!(stats.rx_direct_bytes, 0);
}

#[test]
fn a_long_upload_merged_by_gro_into_sink_is_byte_exact_and_mostly_skips_smoltcps_copy() {
    let stats = upload_into_sink(true, true, (0, 0));
    // All but the `MSS + 1` bytes of each merged packet kept for smoltcp's ACK clock, and
    // the first and smaller segments.
    assert_taken_directly(&stats, 0.9);
}

/// More than `share` of the bytes the app got were taken straight from the packets.
fn assert_taken_directly(stats: &flowshift_core::stack::StackStats, share: f64) {
    let (direct, total) = (stats.rx_direct_bytes, stats.app_bytes_in);
    assert!(
        direct as f64 > total as f64 * share,
        "{direct} of {total} bytes taken straight from the packets"
    );
}

#[test]
fn a_long_upload_merged_by_gro_without_direct_receive_goes_through_smoltcps_ring() {
    let stats = upload_into_sink(true, false, (0, 0));
    assert_eq!(stats.rx_direct_bytes, 0);
}

/// Lost segments leave smoltcp holding data out of order, at offsets from its own `rcv_nxt`:
/// direct receive must stop until the hole is filled (or those bytes land in the wrong place
/// and the CRC says so), then resume. Runs of lost segments make the client resend a burst
/// after its timeout, merged into one large in-order segment while the data beyond the hole
/// is still held.
#[test]
fn an_upload_merged_by_gro_with_lost_segments_is_byte_exact_and_resumes_direct_receive() {
    let stats = upload_into_sink(true, true, (600, 12));
    assert_taken_directly(&stats, 0.25);
}

/// The echo app takes only what fits its buffer: the rest of a payload goes through smoltcp's
/// ring, after the part the app took.
#[test]
fn an_echo_merged_by_gro_is_byte_exact_when_the_app_takes_part_of_a_payload() {
    let mut p = Pair::new(10);
    p.gro = true;
    let h = p.connect(7);
    let data = counting(11, 3_000_000);
    let got = echo_through(&mut p, h, &data);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    let stats = p.stack.stats();
    assert!(
        stats.rx_direct_bytes > 0,
        "no byte taken straight from a packet"
    );
    assert!(stats.rx_direct_bytes < data.len() as u64);
}

/// A hand-made client on `to_port` (window scaling offered with `wscale`): its SYN and the
/// ACK of the node's SYN-ACK, client ISN 1000. Returns the node's ISN + 1 (what the client
/// acknowledges) and the client's first sequence number.
fn handshake(p: &mut Pair, (port, to_port): (u16, u16), wscale: Option<u8>) -> (u32, u32) {
    use smoltcp::wire::TcpControl;
    let syn = raw_segment(
        (port, to_port),
        TcpControl::Syn,
        (1000, None),
        (60_000, wscale),
        &[],
    );
    let out = exchange(p, &syn);
    let ours = (out[0].seq_number.0 as u32).wrapping_add(1);
    let ack = raw_segment(
        (port, to_port),
        TcpControl::None,
        (1001, Some(ours)),
        (60_000, None),
        &[],
    );
    exchange(p, &ack);
    (ours, 1001)
}

/// A client segment beyond the window the node advertised: the node takes only what fits, with
/// direct receive as without (smoltcp alone takes what fits its window; bytes taken straight
/// from the packet move that window, in the client's numbers, by as many).
#[test]
fn no_byte_beyond_the_advertised_window_is_taken_with_or_without_direct_receive() {
    use smoltcp::wire::TcpControl;
    for direct in [false, true] {
        let mut p = Pair::new_with(10, |c| {
            c.tcp.rx_buffer = 8192;
            c.tcp.direct_receive = direct;
        });
        let to = (50_123, 9);
        let (ours, seq) = handshake(&mut p, to, None);
        // The node advertised 8,192 bytes (no window scaling); the client sends 20,000.
        let data = vec![0x5a_u8; 20_000];
        let seg = raw_segment(
            to,
            TcpControl::None,
            (seq, Some(ours)),
            (60_000, None),
            &data,
        );
        let out = exchange(&mut p, &seg);
        p.stack.poll(p.now);
        let acked = out
            .iter()
            .filter_map(|r| r.ack_number)
            .map(|a| (a.0 as u32).wrapping_sub(seq))
            .max();
        let stats = p.stack.stats();
        assert!(
            stats.app_bytes_in <= 8192,
            "direct receive {direct}: the app got {} bytes, the window was 8192",
            stats.app_bytes_in
        );
        assert!(
            acked.is_some_and(|a| a <= 8192),
            "direct receive {direct}: acked {acked:?}"
        );
        assert_eq!(stats.rx_beyond_window, 1, "direct receive {direct}");
    }
}

/// smoltcp keeps the in-window part of an out-of-order segment that reaches beyond its buffer:
/// those bytes must stay where they belong when later in-order bytes are taken straight from
/// their packets (the echo returns exactly the client's stream).
#[test]
fn out_of_order_bytes_from_a_segment_beyond_the_buffer_stay_in_place() {
    use smoltcp::wire::TcpControl;
    let mut p = Pair::new_with(10, |c| c.tcp.rx_buffer = 8192);
    let to = (50_124, 7);
    let (ours, seq) = handshake(&mut p, to, None);
    let ack = Some(ours);
    let stream = counting(0, 20_000);
    // Out of order, 100..9,100: beyond the 8,192-byte window (cut to it).
    let ooo = raw_segment(
        to,
        TcpControl::None,
        (seq + 100, ack),
        (60_000, None),
        &stream[100..9100],
    );
    exchange(&mut p, &ooo);
    // In order, 0..6,000.
    let first = raw_segment(
        to,
        TcpControl::None,
        (seq, ack),
        (60_000, None),
        &stream[..6000],
    );
    p.stack.handle_packet(p.now, &mut first.clone());
    let mut echoed = Vec::new();
    let mut their_ack = seq;
    for _ in 0..50 {
        p.stack.poll(p.now);
        p.stack.drain_transmit(|b| {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(b).unwrap();
            let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            echoed.extend_from_slice(tcp.payload());
            their_ack = tcp.ack_number().0 as u32;
        });
        let a = Some(ours.wrapping_add(echoed.len() as u32));
        let ack_seg = raw_segment(to, TcpControl::None, (their_ack, a), (60_000, None), &[]);
        p.stack.handle_packet(p.now, &mut ack_seg.clone());
        p.now += Duration::from_millis(20);
    }
    assert!(!echoed.is_empty());
    assert!(
        echoed[..] == stream[..echoed.len()],
        "the echoed bytes are not the client's stream"
    );
    assert!(
        their_ack.wrapping_sub(seq) as usize <= 9100,
        "acknowledged bytes never sent"
    );
}

/// The same with the default 256 KiB buffer and window scaling, into `sink`: an out-of-order
/// segment from 255,000 to 270,000 (its first 7,244 bytes inside the window), then the stream
/// from 100 on in segments large enough to be taken straight from their packets: none is
/// until the held bytes are behind `rcv_nxt`, then they are again.
#[test]
fn out_of_order_bytes_held_with_default_buffers_stay_in_place_with_or_without_direct_receive() {
    use smoltcp::wire::TcpControl;
    for direct in [true, false] {
        let mut p = Pair::new_with(10, |c| c.tcp.direct_receive = direct);
        let to = (50_201, 9);
        let (ours, seq) = handshake(&mut p, to, Some(7));
        let ack = Some(ours);
        let seg = |from: usize, data: &[u8]| {
            raw_segment(
                to,
                TcpControl::None,
                (seq + from as u32, ack),
                (60_000, None),
                data,
            )
        };
        let stream = counting(0, 300_000);
        // 100 bytes in order: the node's ACK advertises its scaled window, 100..262,244.
        exchange(&mut p, &seg(0, &stream[..100]));
        p.now += Duration::from_millis(50);
        exchange(&mut p, &seg(100, &[]));
        exchange(&mut p, &seg(255_000, &stream[255_000..270_000]));
        let mut at = 100;
        let mut report = Vec::new();
        while at < stream.len() {
            let end = (at + 6000).min(stream.len());
            p.stack.handle_packet(p.now, &mut seg(at, &stream[at..end]));
            at = end;
            p.stack.poll(p.now);
            p.stack.drain_transmit(|_| {});
            p.now += Duration::from_millis(1);
        }
        let fin = raw_segment(
            to,
            TcpControl::Fin,
            (seq + at as u32, ack),
            (60_000, None),
            &[],
        );
        p.stack.handle_packet(p.now, &mut fin.clone());
        for _ in 0..5 {
            p.stack.poll(p.now);
            p.stack.drain_transmit(|b| {
                let ip = smoltcp::wire::Ipv4Packet::new_checked(b).unwrap();
                let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
                report.extend_from_slice(tcp.payload());
            });
            p.now += Duration::from_millis(1);
        }
        let want = format!("{} {:08x}\n", stream.len(), crc32fast::hash(&stream));
        assert_eq!(
            String::from_utf8_lossy(&report),
            want,
            "direct receive {direct}"
        );
        let taken = p.stack.stats().rx_direct_bytes;
        assert_eq!(taken > 0, direct, "{taken} bytes taken directly");
        assert!(taken <= 300_000 - 262_244, "{taken} bytes taken directly");
    }
}

/// smoltcp's SYN-ACK advertises an unscaled window while its acceptance test scales it: until
/// its first ACK it would take data up to twice its 256 KiB buffer, and data beyond the buffer
/// wraps around its ring. Such a segment (from a client that ignores the window) loses its
/// data before smoltcp sees it, and the stream the app gets is exactly the client's.
#[test]
fn data_beyond_the_window_in_the_first_flight_never_reaches_the_app() {
    use smoltcp::wire::TcpControl;
    let mut p = Pair::new(10);
    let to = (50_301, 9);
    let (ours, seq) = handshake(&mut p, to, Some(7));
    let seg = |from: usize, data: &[u8]| {
        raw_segment(
            to,
            TcpControl::None,
            (seq.wrapping_add(from as u32), Some(ours)),
            (60_000, None),
            data,
        )
    };
    // 300,000..301,000: beyond the buffer, inside smoltcp's mis-scaled window.
    exchange(&mut p, &seg(300_000, &[0xee; 1000]));
    let stream = counting(0, 400_000);
    let mut at = 0;
    let mut report = Vec::new();
    while at < stream.len() {
        let end = (at + 1460).min(stream.len());
        p.stack.handle_packet(p.now, &mut seg(at, &stream[at..end]));
        at = end;
        p.stack.poll(p.now);
        p.stack.drain_transmit(|_| {});
        p.now += Duration::from_millis(1);
    }
    let fin = raw_segment(
        to,
        TcpControl::Fin,
        (seq + at as u32, Some(ours)),
        (60_000, None),
        &[],
    );
    p.stack.handle_packet(p.now, &mut fin.clone());
    for _ in 0..5 {
        p.stack.poll(p.now);
        p.stack.drain_transmit(|b| {
            let ip = smoltcp::wire::Ipv4Packet::new_checked(b).unwrap();
            let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
            report.extend_from_slice(tcp.payload());
        });
        p.now += Duration::from_millis(1);
    }
    let want = format!("{} {:08x}\n", stream.len(), crc32fast::hash(&stream));
    assert_eq!(String::from_utf8_lossy(&report), want);
    assert!(p.stack.stats().rx_beyond_window >= 1);
}

/// Bytes the `source` app of [`growing_pair`] sends: enough for the congestion window of the
/// in-memory client (one ACK per round trip: one segment more per round trip) to outgrow a
/// 64 KiB buffer, and for four buffers' worth more.
const DOWNLOAD: usize = 4_000_000;

/// A pair whose connections start with a 64 KiB send buffer that may grow to 256 KiB, within
/// `budget` bytes of growth; its `source` app sends [`DOWNLOAD`] bytes.
fn growing_pair(budget: usize) -> Pair {
    Pair::new_with(100, |c| {
        c.tcp.tx_buffer = 64 * 1024;
        c.tcp.tx_buffer_max = 256 * 1024;
        c.tcp.tx_grow_budget = budget;
        for s in c.services.iter_mut().filter(|s| s.port == 19) {
            s.app_config.bytes = Some(DOWNLOAD as u64);
        }
    })
}

/// Makes half of each step's packets from the stack reach the client a step late, so that it
/// acknowledges each flight in two parts (a real client acknowledges one in many): bytes are
/// still unacknowledged when the app is served, and a drain before growth takes a step.
/// Call what it returns once per step.
fn acks_in_two_parts(p: &mut Pair) -> impl FnMut(&mut Pair) + use<> {
    use std::{cell::RefCell, rc::Rc};
    let late = Rc::new(RefCell::new(Vec::new()));
    let held = late.clone();
    p.tx_filter = Some(Box::new(move |pk: &mut Vec<u8>| {
        held.borrow_mut().push(std::mem::take(pk));
        false
    }));
    let mut in_flight: Vec<Vec<u8>> = Vec::new();
    move |p: &mut Pair| {
        let mut sent = std::mem::take(&mut *late.borrow_mut());
        let rest = sent.split_off(sent.len() / 2);
        p.pipe.rx.extend(in_flight.drain(..).chain(sent));
        in_flight = rest;
    }
}

/// Reads the `source` download ([`DOWNLOAD`] bytes, then a FIN) on `h` to its end, calling
/// `each` after every step; returns the bytes and the send-buffer sizes its connection had.
fn source_download(
    p: &mut Pair,
    h: SocketHandle,
    mut each: impl FnMut(&mut Pair),
) -> (Vec<u8>, std::collections::BTreeSet<usize>) {
    let mut got = Vec::new();
    let mut sizes = std::collections::BTreeSet::new();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        sizes.extend(p.stack.conns(p.now).iter().map(|c| c.send_buffer));
        each(p);
        let s = p.sock(h);
        got.len() >= DOWNLOAD && !s.may_recv() && s.recv_queue() == 0
    });
    (got, sizes)
}

/// A download its 64 KiB send buffer limits (the client's window is larger and the app
/// always has more) grows to 256 KiB once, after four buffers' worth, and the stream is
/// byte-exact and ends with the source's FIN (no reset); the growth is held in the budget
/// while the connection lives and given back when it ends.
#[test]
fn a_download_its_send_buffer_limits_grows_once_and_stays_byte_exact() {
    use flowshift_core::stack::GROW_AFTER_BUFFERS;
    let mut p = growing_pair(1 << 20);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(19);
    let mut out_at_growth = None;
    let mut drained = false;
    let (got, sizes) = source_download(&mut p, h, |p| {
        deliver(p);
        drained |= p.stack.conns(p.now).iter().any(|c| c.growing);
        if out_at_growth.is_none() && p.stack.stats().tx_grown == 1 {
            out_at_growth = Some(p.stack.conns(p.now)[0].bytes_out);
        }
    });
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert!(drained, "grown without draining what was in flight");
    assert_eq!(p.sock(h).state(), tcp::State::CloseWait, "ended by the FIN");
    let stats = p.stack.stats();
    assert_eq!(
        (
            stats.tx_grown,
            stats.tx_grow_abandoned,
            stats.tx_grow_over_budget
        ),
        (1, 0, 0)
    );
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        [64 * 1024, 256 * 1024]
    );
    let out = out_at_growth.expect("grown");
    assert!(
        out >= GROW_AFTER_BUFFERS * 64 * 1024,
        "grown after {out} bytes, before {GROW_AFTER_BUFFERS} buffers' worth"
    );
    // The next sweep counts the growth the connection holds; once it is gone, none.
    for _ in 0..1_100 {
        deliver(&mut p);
        p.step();
    }
    assert_eq!(p.stack.stats().tx_grown_bytes, 192 * 1024);
    p.sock(h).close();
    p.run_until(100, |p| {
        deliver(p);
        p.stack.connection_count() == 0
    });
    for _ in 0..1_100 {
        p.step();
    }
    assert_eq!(p.stack.stats().tx_grown_bytes, 0);
}

/// A download the client's window limits (16 KiB) is not what a larger send buffer would
/// help: it keeps its buffer, byte-exact.
#[test]
fn a_download_the_clients_window_limits_keeps_its_send_buffer() {
    let mut p = growing_pair(1 << 20);
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 16 * 1024]),
        tcp::SocketBuffer::new(vec![0; 16 * 1024]),
    );
    p.next_port += 1;
    s.connect(
        p.client.context(),
        (IpAddress::Ipv4(SERVICE), 19),
        p.next_port,
    )
    .unwrap();
    let h = p.sockets.add(s);
    let (got, sizes) = source_download(&mut p, h, |_| {});
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert_eq!(p.sock(h).state(), tcp::State::CloseWait);
    assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [64 * 1024]);
    assert_eq!(p.stack.stats().tx_grown, 0);
    assert_eq!(p.stack.stats().tx_grow_over_budget, 0);
}

/// With no growth budget left, a download its buffer limits is counted as such (once) and keeps
/// its buffer, byte-exact.
#[test]
fn with_the_growth_budget_spent_a_limited_download_keeps_its_buffer() {
    let mut p = growing_pair(100 * 1024);
    let h = p.connect(19);
    let (got, sizes) = source_download(&mut p, h, |_| {});
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert_eq!(p.sock(h).state(), tcp::State::CloseWait);
    assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [64 * 1024]);
    assert_eq!(p.stack.stats().tx_grown, 0);
    assert_eq!(p.stack.stats().tx_grow_over_budget, 1, "counted once");
}

/// A client that half-closes while the send buffer drains to grow: the connection is no
/// longer established, so the growth is given up (and not tried again); the app is served
/// again and the download completes byte-exact, closed by FINs both ways.
#[test]
fn a_client_half_closing_during_the_drain_gets_its_download_byte_exact_without_growth() {
    let mut p = growing_pair(1 << 20);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(19);
    let mut closed = false;
    let (got, sizes) = source_download(&mut p, h, |p| {
        deliver(p);
        if !closed && p.stack.conns(p.now).iter().any(|c| c.growing) {
            p.sock(h).close();
            closed = true;
        }
    });
    assert!(closed, "the drain was never seen");
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    p.run_until(100, |p| {
        deliver(p);
        p.sock(h).state() == tcp::State::TimeWait
    });
    let stats = p.stack.stats();
    assert_eq!((stats.tx_grown, stats.tx_grow_abandoned), (0, 1));
    assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [64 * 1024]);
}

/// A grown keep-alive connection that goes idle is compacted back to the configured send
/// buffer (its growth returns to the budget), carries on byte-exact, and grows again when
/// its next response is limited by the buffer.
#[test]
fn a_grown_connection_shrinks_back_when_idle_and_grows_again() {
    use flowshift_core::stack::COMPACT_AFTER;
    let mut p = growing_pair(1 << 20);
    let h = p.connect(80);
    p.run_until(100, |p| p.sock(h).state() == tcp::State::Established);
    http_get_exact(&mut p, h, 2_000_000);
    assert_eq!(p.stack.stats().tx_grown, 1);
    assert_eq!(p.stack.conns(p.now)[0].send_buffer, 256 * 1024);
    for _ in 0..COMPACT_AFTER.total_millis() + 1_500 {
        p.step();
    }
    assert_eq!(p.stack.stats().compacted, 1);
    assert_eq!(p.stack.conns(p.now)[0].send_buffer, 64 * 1024);
    assert_eq!(p.stack.stats().tx_grown_bytes, 0);
    http_get_exact(&mut p, h, 2_000_000);
    assert_eq!(p.stack.stats().tx_grown, 2);
    assert_eq!(p.sock(h).state(), tcp::State::Established);
}

/// [`acks_in_two_parts`], with every stack→client packet also shown to `look` first.
fn acks_in_two_parts_seen<F: FnMut(&[u8]) + 'static>(
    p: &mut Pair,
    mut look: F,
) -> impl FnMut(&mut Pair) + use<F> {
    let mut deliver = acks_in_two_parts(p);
    let mut inner = p.tx_filter.take().expect("installed");
    p.tx_filter = Some(Box::new(move |pk: &mut Vec<u8>| {
        look(pk);
        inner(pk)
    }));
    move |p: &mut Pair| deliver(p)
}

/// Sequence number, acknowledgement number and payload length of a TCP/IPv4 packet.
fn tcp_of(pk: &[u8]) -> (u32, u32, usize) {
    let ip = smoltcp::wire::Ipv4Packet::new_checked(pk).unwrap();
    let t = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
    (
        t.seq_number().0 as u32,
        t.ack_number().0 as u32,
        t.payload().len(),
    )
}

/// The client's packet `template` re-emitted with `payload` at its sequence number plus
/// `gap` (wrapping: a negative gap is old data).
fn segment_from(template: &[u8], gap: u32, payload: &[u8]) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Ipv4Packet, TcpPacket, TcpRepr};
    let ip = Ipv4Packet::new_checked(template).unwrap();
    let t = TcpPacket::new_checked(ip.payload()).unwrap();
    let mut repr = TcpRepr::parse(
        &t,
        &ip.src_addr().into(),
        &ip.dst_addr().into(),
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    repr.seq_number = smoltcp::wire::TcpSeqNumber(repr.seq_number.0.wrapping_add(gap as i32));
    repr.payload = payload;
    repr.control = smoltcp::wire::TcpControl::None;
    flowshift_core::packet::emit_ipv4_tcp(CLIENT, SERVICE, &repr)
}

/// A `source` download during whose drain the client's segment `gap` bytes from its next
/// sequence number (10 bytes) reaches the stack (once, or in `every_step`), before the ACKs
/// that end the drain: smoltcp answers each at once. Returns the bytes, the stats, and the
/// stack's packets whose sequence number jumped out of the client's space.
fn download_with_segments_during_the_drain(
    gap: u32,
    every_step: bool,
) -> (Vec<u8>, flowshift_core::stack::StackStats, Vec<(u32, u32)>) {
    use std::{cell::RefCell, rc::Rc};
    let mut p = growing_pair(1 << 20);
    let bogus = Rc::new(RefCell::new(Vec::new()));
    let (b2, mut last) = (bogus.clone(), None::<u32>);
    let mut deliver = acks_in_two_parts_seen(&mut p, move |pk: &[u8]| {
        let (seq, _, _) = tcp_of(pk);
        match last {
            Some(l) if (seq.wrapping_sub(l) as i32).unsigned_abs() > 1 << 24 => {
                b2.borrow_mut().push((l, seq));
            }
            Some(l) if seq.wrapping_sub(l) as i32 <= 0 => {}
            _ => last = Some(seq),
        }
    });
    // The client's last packet to the stack (its current numbers and options).
    let template = Rc::new(RefCell::new(None::<Vec<u8>>));
    let t2 = template.clone();
    p.filter = Some(Box::new(move |pk| {
        *t2.borrow_mut() = Some(pk.clone());
        true
    }));
    let h = p.connect(19);
    let mut injected = 0;
    let (got, _) = source_download(&mut p, h, |p| {
        deliver(p);
        if (every_step || injected == 0)
            && p.stack.conns(p.now).iter().any(|c| c.growing)
            && let Some(t) = template.borrow().clone()
        {
            p.pipe.tx.push_back(segment_from(&t, gap, b"0123456789"));
            injected += 1;
        }
    });
    assert!(injected > 0, "the drain was never seen");
    let stats = p.stack.stats().clone();
    let bogus = bogus.borrow().clone();
    (got, stats, bogus)
}

/// A reply smoltcp made at once to a client segment (an ACK for old, duplicate data) is still
/// queued when the drain ends: it goes out in the old socket's numbers before the re-home,
/// which waits a turn for it. The flow grows; byte-exact; nothing out of the client's space.
#[test]
fn a_reply_queued_when_the_drain_ends_goes_out_in_the_old_sockets_numbers() {
    let (got, stats, bogus) = download_with_segments_during_the_drain(10u32.wrapping_neg(), false);
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert_eq!((stats.tx_grown, stats.tx_grow_abandoned), (1, 0));
    assert!(bogus.is_empty(), "(last good, bogus) seq: {bogus:?}");
}

/// Client data smoltcp holds out of order when the drain ends would be lost by the capture
/// (which takes in-order data) after the client saw it acknowledged selectively: the
/// re-home waits for the hole to fill. Here it never does, so the drain is abandoned at its
/// limit and the app served again; byte-exact, nothing out of the client's space.
#[test]
fn client_data_held_out_of_order_keeps_the_flow_from_being_re_homed() {
    let (got, stats, bogus) = download_with_segments_during_the_drain(5_000, true);
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert_eq!((stats.tx_grown, stats.tx_grow_abandoned), (0, 1));
    assert!(bogus.is_empty(), "(last good, bogus) seq: {bogus:?}");
}

/// A client that goes silent during the drain: the drain's time limit is a timer, so the
/// growth is abandoned by DRAIN_MAX at the latest, its reservation returned, and another
/// download grows into the budget.
#[test]
fn a_client_silent_during_the_drain_gives_the_budget_back_at_the_drain_limit() {
    use flowshift_core::stack::DRAIN_MAX;
    // Budget for exactly one growth.
    let mut p = growing_pair(192 * 1024);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(19);
    let port_a = p.next_port;
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        p.stack.conns(p.now).iter().any(|c| c.growing)
    });
    // From now on client A's packets are lost (a hostile or vanished client).
    p.filter = Some(Box::new(move |pk| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&pk[..]).unwrap();
        let t = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        t.src_port() != port_a
    }));
    for _ in 0..DRAIN_MAX.total_millis() + 5 {
        read_into(&mut p, h, &mut got);
        deliver(&mut p);
        p.step();
    }
    let a = p.stack.conns(p.now);
    assert!(!a[0].growing, "the drain outlived DRAIN_MAX");
    assert_eq!(p.stack.stats().tx_grow_abandoned, 1);
    let h2 = p.connect(19);
    let (got2, sizes) = source_download(&mut p, h2, |p| deliver(p));
    assert!(got2 == counting(0, DOWNLOAD), "counting stream mismatch");
    assert!(sizes.contains(&(256 * 1024)), "{sizes:?}");
    assert_eq!(p.stack.stats().tx_grown, 1);
    assert_eq!(p.stack.stats().tx_grow_over_budget, 0);
}

/// A flow frozen during its drain (a move) gives its reservation back; a frozen grown flow
/// still counts in the budget, so that a move given up (thawed) never leaves the stack
/// holding more growth than its budget.
#[test]
fn frozen_flows_count_in_the_growth_budget_and_a_frozen_drain_is_ended() {
    let mut p = growing_pair(192 * 1024);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(19);
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        p.stack.stats().tx_grown == 1
    });
    let a = p.stack.conns(p.now)[0].id;
    p.stack.freeze(p.now, a).unwrap();
    for _ in 0..1_100 {
        deliver(&mut p);
        p.step();
    }
    assert_eq!(
        p.stack.stats().tx_grown_bytes,
        192 * 1024,
        "frozen, still held"
    );
    // Another download finds the budget held by the frozen one.
    let h2 = p.connect(19);
    let (got2, _) = source_download(&mut p, h2, |p| deliver(p));
    assert!(got2 == counting(0, DOWNLOAD), "counting stream mismatch");
    assert_eq!(p.stack.stats().tx_grown, 1, "only the frozen one grew");
    assert_eq!(p.stack.stats().tx_grow_over_budget, 1, "counted once");
    // The move is given up: A carries on, byte-exact.
    p.stack.thaw(p.now, a).unwrap();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        got.len() >= DOWNLOAD
    });
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    assert!(p.stack.stats().tx_grown_bytes <= 192 * 1024);

    // Frozen mid-drain: the drain ends, its reservation returns at once.
    let mut p = growing_pair(192 * 1024);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(19);
    let mut got = Vec::new();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        p.stack.conns(p.now).iter().any(|c| c.growing)
    });
    let a = p.stack.conns(p.now)[0].id;
    p.stack.freeze(p.now, a).unwrap();
    assert!(!p.stack.conns(p.now)[0].growing);
    p.stack.thaw(p.now, a).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        seen.extend(p.stack.conns(p.now).iter().map(|c| c.send_buffer));
        got.len() >= DOWNLOAD
    });
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    // It earned its growth again after the thaw.
    assert_eq!(p.stack.stats().tx_grown, 1);
    assert_eq!(p.stack.stats().tx_grow_abandoned, 0);
}

/// A request pipelined during the drain waits unread in the old socket and moves with it
/// into the new one: the second response is exact.
#[test]
fn a_request_pipelined_during_the_drain_is_answered_exactly() {
    let mut p = growing_pair(1 << 20);
    let mut deliver = acks_in_two_parts(&mut p);
    let h = p.connect(80);
    p.run_until(100, |p| {
        deliver(p);
        p.sock(h).state() == tcp::State::Established
    });
    let (n1, n2) = (2_000_000, 300_000);
    p.sock(h)
        .send_slice(format!("GET /bytes/{n1} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let heads = |got: &[u8]| -> Vec<usize> {
        got.windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"\r\n\r\n")
            .map(|(i, _)| i)
            .collect()
    };
    let mut got = Vec::new();
    let mut sent2 = false;
    p.run_until(20_000, |p| {
        read_into(p, h, &mut got);
        deliver(p);
        if !sent2 && p.stack.conns(p.now).iter().any(|c| c.growing) {
            p.sock(h)
                .send_slice(format!("GET /bytes/{n2} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .unwrap();
            sent2 = true;
        }
        let heads = heads(&got);
        heads.len() == 2 && got.len() >= heads[1] + 4 + n2
    });
    assert!(sent2, "no drain seen");
    assert_eq!(p.stack.stats().tx_grown, 1);
    let heads = heads(&got);
    assert!(got[heads[0] + 4..heads[0] + 4 + n1] == counting(0, n1)[..]);
    assert!(got[heads[1] + 4..] == counting(0, n2)[..]);
    assert_eq!(p.sock(h).state(), tcp::State::Established);
}

/// An echo over GRO-merged segments (direct receive: the receive offset grows) whose send
/// buffer limits it grows, byte-exact.
#[test]
fn an_echo_taken_by_direct_receive_grows_byte_exact() {
    let mut p = growing_pair(1 << 20);
    p.gro = true;
    let h = p.connect(7);
    let data = counting(11, 8_000_000);
    let got = echo_through(&mut p, h, &data);
    assert!(got == data, "echo mismatch");
    let s = p.stack.stats();
    assert_eq!((s.tx_grown, s.tx_grow_abandoned), (1, 0));
    assert!(s.rx_direct_bytes > 0);
    assert_eq!(p.sock(h).state(), tcp::State::Established);
}

/// The single segment the drain waits for is lost: its loss probe waits for a delayed ACK
/// (200 ms) first, past the drain's limit, so the growth is abandoned, the app served again,
/// and the download completes byte-exact.
#[test]
fn a_tail_lost_during_the_drain_abandons_the_growth_and_the_download_completes() {
    use std::{cell::RefCell, rc::Rc};
    let mut p = growing_pair(1 << 20);
    let out = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
    let o2 = out.clone();
    p.tx_filter = Some(Box::new(move |pk: &mut Vec<u8>| {
        o2.borrow_mut().push(std::mem::take(pk));
        false
    }));
    let h = p.connect(19);
    let mut dropped = false;
    let mut in_flight: Vec<Vec<u8>> = Vec::new();
    let (got, _) = source_download(&mut p, h, |p| {
        let mut sent = std::mem::take(&mut *out.borrow_mut());
        let mut rest = sent.split_off(sent.len() / 2);
        if !dropped && p.stack.conns(p.now).iter().any(|c| c.growing) {
            // The tail of the flight the drain waits for.
            if let Some(i) = rest.iter().rposition(|b| tcp_of(b).2 > 0) {
                rest.remove(i);
                dropped = true;
            } else if let Some(i) = in_flight.iter().rposition(|b| tcp_of(b).2 > 0) {
                in_flight.remove(i);
                dropped = true;
            }
        }
        p.pipe.rx.extend(in_flight.drain(..).chain(sent));
        in_flight = rest;
    });
    assert!(dropped);
    assert!(got == counting(0, DOWNLOAD), "counting stream mismatch");
    let s = p.stack.stats();
    assert_eq!((s.tx_grown, s.tx_grow_abandoned), (0, 1));
    assert_eq!(p.sock(h).state(), tcp::State::CloseWait, "ended by the FIN");
}

/// Four downloads at once: a turn's packets leave in pieces of about
/// [`TX_FLUSH_BYTES`](flowshift_core::stack::TX_FLUSH_BYTES) while the stack polls (not
/// queued whole), each piece whole egress passes — every download still sending has one
/// packet in every pass, so none loses its place — and every stream is byte-exact and ends
/// with the source's FIN, never a reset.
#[test]
fn a_turn_of_several_downloads_leaves_in_pieces_and_every_socket_keeps_its_place() {
    use flowshift_core::stack::TX_FLUSH_BYTES;
    use std::collections::BTreeMap;
    let mut p = Pair::new(10);
    let handles: Vec<SocketHandle> = (0..4).map(|_| p.connect(19)).collect();
    let mut got = vec![Vec::new(); handles.len()];
    // Client port of a data packet the stack sent, else None; a reset fails the test.
    let data_port = |pkt: &[u8]| {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(pkt).unwrap();
        let t = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(!t.rst(), "a reset to port {}", t.dst_port());
        (!t.payload().is_empty()).then(|| t.dst_port())
    };
    let (mut split_turns, mut largest) = (0, 0);
    p.run_until(20_000, |p| {
        for (h, got) in handles.iter().zip(&mut got) {
            read_into(p, *h, got);
        }
        let (during, _after) = p.pieces.split_at(p.pieces.len().saturating_sub(1));
        if !during.is_empty() {
            split_turns += 1;
        }
        for (i, piece) in during.iter().enumerate() {
            let bytes: usize = piece.iter().map(Vec::len).sum();
            let most = piece.iter().map(Vec::len).max().unwrap_or(0);
            largest = largest.max(bytes);
            // Handed out at the first pass boundary past the mark: less than one more pass.
            assert!(bytes >= TX_FLUSH_BYTES, "a piece of {bytes} B");
            assert!(
                bytes < TX_FLUSH_BYTES + handles.len() * most,
                "a piece of {bytes} B"
            );
            let mut per_port: BTreeMap<u16, usize> = BTreeMap::new();
            for port in piece.iter().filter_map(|pkt| data_port(pkt)) {
                *per_port.entry(port).or_default() += 1;
            }
            // The downloads that still send after this piece sent in every pass of it.
            let next = &p.pieces[i + 1];
            let passes = per_port.values().copied().max().unwrap_or(0);
            for port in next.iter().filter_map(|pkt| data_port(pkt)) {
                assert_eq!(
                    per_port.get(&port),
                    Some(&passes),
                    "port {port} lost its place"
                );
            }
        }
        for pkt in p.pieces.iter().flatten() {
            data_port(pkt);
        }
        handles
            .iter()
            .zip(&got)
            .all(|(&h, got)| got.len() >= 1_000_000 && !p.sock(h).may_recv())
    });
    assert!(split_turns > 0, "no turn left in pieces");
    for got in &got {
        assert!(*got == counting(0, 1_000_000), "counting stream mismatch");
    }
    for &h in &handles {
        // The source's FIN, not a reset: the client's side is CLOSE-WAIT.
        assert_eq!(p.sock(h).state(), tcp::State::CloseWait);
    }
    eprintln!("turns left in pieces: {split_turns}; largest piece {largest} B");
}

/// Held at the accept (a shadow trial's diversion): the connection is listed once, its app
/// sees nothing — a request the client sends at once is acknowledged but not answered, a
/// source sends nothing — until it is resumed; then both are served byte-exact. Accepted
/// while nothing is held, a connection is neither listed nor held.
#[test]
fn a_connection_held_at_its_accept_is_served_only_once_resumed_and_stays_byte_exact() {
    let mut p = Pair::new(10);
    p.stack.set_hold_accepted(true);
    let echo = p.connect(7);
    let source = p.connect(19);
    let request = counting(5, 3_000);
    p.run_until(100, |p| p.sock(echo).state() == tcp::State::Established);
    assert_eq!(p.sock(echo).send_slice(&request).unwrap(), request.len());
    let mut held = Vec::new();
    for _ in 0..200 {
        p.step();
        held.extend(p.stack.take_accepted_held());
    }
    let ids: Vec<u64> = p.stack.conns(p.now).iter().map(|c| c.id).collect();
    held.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(held, want, "each connection listed once");
    for &id in &ids {
        assert!(p.stack.is_held(id));
    }
    // The request was acknowledged (the client's send buffer is empty) but not answered;
    // the source sent nothing.
    assert_eq!(p.sock(echo).send_queue(), 0);
    assert_eq!(p.sock(echo).recv_queue(), 0);
    assert_eq!(p.sock(source).recv_queue(), 0);
    assert_eq!(p.stack.stats().app_bytes_out, 0);
    assert_eq!(p.stack.stats().app_bytes_in, 0);

    p.stack.set_hold_accepted(false);
    for &id in &ids {
        p.stack.resume(id);
        assert!(!p.stack.is_held(id));
    }
    // Served at once: the next poll is due now.
    assert_eq!(p.stack.poll_delay(p.now), Duration::ZERO);
    let mut got = Vec::new();
    p.run_until(1_000, |p| {
        read_into(p, echo, &mut got);
        got.len() >= request.len()
    });
    assert!(got == request, "echo after the hold is not byte-exact");
    let mut down = Vec::new();
    p.run_until(20_000, |p| {
        read_into(p, source, &mut down);
        !p.sock(source).may_recv()
    });
    assert!(
        down == counting(0, 1_000_000),
        "download after the hold is not byte-exact"
    );
    assert_eq!(p.sock(source).state(), tcp::State::CloseWait);

    // Nothing held: a new connection is served at once and never listed.
    let h = p.connect(7);
    let got = echo_through(&mut p, h, &request);
    assert!(got == request);
    assert!(p.stack.take_accepted_held().is_empty());
}

/// A node shutting down serves a connection still held at its accept before closing it:
/// the request the client sent meanwhile is answered, byte-exact, before the FIN.
#[test]
fn a_shutdown_answers_a_connection_held_at_its_accept_before_its_fin() {
    let mut p = Pair::new(10);
    p.stack.set_hold_accepted(true);
    let echo = p.connect(7);
    p.run_until(100, |p| p.sock(echo).state() == tcp::State::Established);
    let request = counting(9, 3_000);
    assert_eq!(p.sock(echo).send_slice(&request).unwrap(), request.len());
    p.run_until(1_000, |p| {
        p.stack
            .conns(p.now)
            .first()
            .is_some_and(|c| c.recv_queue == request.len())
    });
    assert_eq!(p.stack.take_accepted_held().len(), 1);
    assert_eq!(p.stack.stats().app_bytes_out, 0);
    p.stack.begin_shutdown(p.now);
    let mut got = Vec::new();
    p.run_until(1_000, |p| {
        read_into(p, echo, &mut got);
        !p.sock(echo).may_recv()
    });
    assert!(
        got == request,
        "the held request was not answered before the FIN"
    );
    assert_eq!(p.sock(echo).state(), tcp::State::CloseWait);
}
