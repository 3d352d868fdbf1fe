//! Live migration between two stacks, in memory, on virtual time.
//!
//! A smoltcp client talks to node A (where its packets enter); flows are frozen, captured,
//! restored on node B and forwarded, exactly as the daemon does it but without threads or a
//! tunnel: A's forwarded packets are cut to tunnel-datagram size with `segment` and handed to
//! B, B's replies come back to A and from A to the client. Every test checks the client's
//! bytes exactly and that the client never saw a RST.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use flowshift_core::app::{AppConfig, AppKind};
use flowshift_core::coalesce::Coalescer;
use flowshift_core::config::{Ipv4Cidr, ServiceConfig};
use flowshift_core::flow::{MOVED_LINGER, PeerRef, Remote};
use flowshift_core::segment::segment;
use flowshift_core::stack::{
    ConnectionBudget, ForwardKind, RestoreParams, Stack, StackConfig, UNACKED_TIMEOUT,
};
use flowshift_statesync::snapshot::ConnSnapshot;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Packet, TcpPacket};

const CLIENT: Ipv4Address = Ipv4Addr::new(198, 18, 1, 2);
const SERVICE: Ipv4Address = Ipv4Addr::new(198, 19, 255, 1);
/// What a tunnel datagram carries of an IP packet (1,409 bytes minus the envelope).
const DATAGRAM_IP: usize = 1_399;
/// The MSS a restored socket may use so that its segments fit a datagram.
const MSS_CLAMP: u16 = (DATAGRAM_IP - 20 - 32) as u16;

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

/// A packet in the tunnel: kind, destination node, flow id there, source node.
struct InTunnel {
    kind: ForwardKind,
    to: usize,
    flow: u64,
    from: usize,
    packet: Vec<u8>,
}

/// Client options that the kernel lets a namespace turn off.
#[derive(Clone, Copy)]
struct ClientOpts {
    timestamps: bool,
    window_scale: bool,
}

impl ClientOpts {
    const DEFAULT: ClientOpts = ClientOpts {
        timestamps: true,
        window_scale: true,
    };
}

struct Net {
    now: Instant,
    /// A (where the client's packets enter), B and C.
    nodes: [Stack; 3],
    client: Interface,
    pipe: Pipe,
    sockets: SocketSet<'static>,
    tunnel: VecDeque<InTunnel>,
    next_port: u16,
    /// Packets the client received with RST set.
    client_rsts: usize,
    /// Packets node B or C wrote to its own TUN device (relay mode: there must be none).
    b_tun_packets: usize,
    /// Every `n`th tunnel packet is lost (0: none).
    tunnel_loss_every: usize,
    tunnel_count: usize,
    /// Packets the target sent before the source completed a move (held by the source).
    early_replies: usize,
    /// Packets a third node sent before the ingress node learned of the move (held there).
    successor_replies: usize,
    /// B replies straight to the client (direct server return): its TUN reaches the client.
    direct_return: bool,
    /// Percent of client <-> A packets lost, both ways (seeded).
    client_loss: u64,
    /// A node that has died: never polled, and the tunnel loses everything to or from it.
    dead: Option<usize>,
    rng: u64,
    scratch: Vec<u8>,
    /// The client's packets to A are merged as the kernel's GRO does, and A gets them as
    /// merged packets.
    gro: Option<Coalescer>,
}

fn node(worker: u16, seed: u64, now: Instant) -> Stack {
    Stack::new(node_config(worker, seed), ConnectionBudget::new(1000), now)
}

fn node_config(worker: u16, seed: u64) -> StackConfig {
    let service = |port, app, bytes| ServiceConfig::new(port, app, AppConfig { bytes });
    StackConfig {
        worker,
        frozen_queue_packets: 4096,
        frozen_total_bytes: 64 << 20,
        // Longer than any freeze here, which outlasts smoltcp's own timeout on
        // purpose (a_frozen_flow_sends_nothing_and_does_not_time_out).
        freeze_timeout: Duration::from_secs(600),
        max_half_open: 64,
        seed,
        ..StackConfig::new(
            vec![Ipv4Cidr {
                addr: SERVICE,
                prefix_len: 32,
            }],
            vec![
                service(7, AppKind::Echo, None),
                service(9, AppKind::Sink, None),
                service(19, AppKind::Source, Some(3_000_000)),
                service(20, AppKind::Source, Some(100_000)),
                service(80, AppKind::Http, None),
            ],
            {
                // Each node its own secret, as the daemon draws.
                let mut s = [0u8; 16];
                s[..8].copy_from_slice(&seed.to_le_bytes());
                s[8] = worker as u8;
                s
            },
        )
    }
}

impl Net {
    fn new() -> Self {
        let now = Instant::from_millis(5_000);
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
            // Different seeds: the restored socket's ISN differs from the original's.
            nodes: [node(0, 7, now), node(0, 99, now), node(0, 1234, now)],
            client,
            pipe,
            sockets: SocketSet::new(vec![]),
            tunnel: VecDeque::new(),
            next_port: 40_000,
            client_rsts: 0,
            b_tun_packets: 0,
            tunnel_loss_every: 0,
            tunnel_count: 0,
            early_replies: 0,
            successor_replies: 0,
            direct_return: false,
            client_loss: 0,
            dead: None,
            rng: 0x9e37_79b9_7f4a_7c15,
            scratch: Vec::new(),
            gro: None,
        }
    }

    fn connect(&mut self, port: u16, opts: ClientOpts) -> SocketHandle {
        // A small receive buffer without scaling: smoltcp picks the shift from the buffer.
        let rx = if opts.window_scale { 1 << 20 } else { 65_535 };
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; 1 << 20]),
        );
        if !opts.timestamps {
            s.set_tsval_generator(None);
        } else {
            s.set_tsval_generator(Some(client_tsval));
        }
        self.next_port += 1;
        s.connect(
            self.client.context(),
            (IpAddress::Ipv4(SERVICE), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    /// Node index of the other node, as a peer reference.
    fn peer(i: usize) -> PeerRef {
        PeerRef(i as u32 + 1)
    }

    fn node_of(peer: PeerRef) -> usize {
        peer.0 as usize - 1
    }

    /// One millisecond of everything.
    fn step(&mut self) {
        CLOCK_MS.with(|c| c.set(self.now.total_millis() as u32));
        self.client
            .poll(self.now, &mut self.pipe, &mut self.sockets);
        while let Some(p) = self.pipe.tx.pop_front() {
            if self.lose() {
                continue;
            }
            let (now, node) = (self.now, &mut self.nodes[0]);
            match &mut self.gro {
                Some(gro) => gro.push(&p, &mut |b, gso| {
                    if gso > 0 {
                        node.handle_merged_packet(now, b);
                    } else {
                        node.handle_packet(now, b);
                    }
                }),
                None => node.handle_packet(now, &mut p.clone()),
            }
        }
        if let Some(gro) = &mut self.gro {
            let (now, node) = (self.now, &mut self.nodes[0]);
            gro.flush(&mut |b, gso| {
                if gso > 0 {
                    node.handle_merged_packet(now, b);
                } else {
                    node.handle_packet(now, b);
                }
            });
        }
        self.exchange_nodes();
        self.client
            .poll(self.now, &mut self.pipe, &mut self.sockets);
        self.now += Duration::from_millis(1);
    }

    /// Both nodes run and the tunnel delivers, three rounds, without advancing time.
    fn exchange_nodes(&mut self) {
        for _round in 0..3 {
            for i in 0..self.nodes.len() {
                if self.dead == Some(i) {
                    continue;
                }
                self.nodes[i].poll(self.now);
                let mut out = Vec::new();
                let b_tun = &mut self.b_tun_packets;
                let direct = self.direct_return;
                self.nodes[i].drain_transmit(|p| {
                    if i == 0 || direct {
                        out.push(p.to_vec());
                    }
                    if i != 0 {
                        *b_tun += 1;
                    }
                });
                for p in out {
                    self.deliver_to_client(p);
                }
                let tunnel = &mut self.tunnel;
                let scratch = &mut self.scratch;
                self.nodes[i].drain_forward(|f| {
                    segment(f.packet, DATAGRAM_IP, scratch, |s| {
                        tunnel.push_back(InTunnel {
                            kind: f.kind,
                            to: Self::node_of(f.to.peer),
                            flow: f.to.flow,
                            from: i,
                            packet: s.to_vec(),
                        })
                    })
                    .expect("forwarded packets segment");
                });
            }
            // The tunnel delivers within the same millisecond.
            while let Some(t) = self.tunnel.pop_front() {
                self.tunnel_count += 1;
                if self.tunnel_loss_every > 0
                    && self.tunnel_count.is_multiple_of(self.tunnel_loss_every)
                {
                    continue;
                }
                if self.dead.is_some_and(|d| d == t.to || d == t.from) {
                    continue;
                }
                let from = Self::peer(t.from);
                match t.kind {
                    ForwardKind::ToOwner => self.nodes[t.to].handle_forwarded(
                        self.now,
                        from,
                        t.flow,
                        &mut t.packet.clone(),
                    ),
                    ForwardKind::ToIngress => {
                        if self.nodes[t.to].handle_from_owner(self.now, from, t.flow, &t.packet) {
                            self.client_rsts += usize::from(is_rst(&t.packet));
                            self.pipe.rx.push_back(t.packet);
                        }
                    }
                }
            }
        }
    }

    /// The nodes and the tunnel only (no client), at the current time.
    fn step_tunnel_only(&mut self) {
        self.exchange_nodes();
    }

    /// A seeded coin with `client_loss` percent for "lost".
    fn lose(&mut self) -> bool {
        if self.client_loss == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100 < self.client_loss
    }

    fn deliver_to_client(&mut self, p: Vec<u8>) {
        if self.lose() {
            return;
        }
        self.client_rsts += usize::from(is_rst(&p));
        self.pipe.rx.push_back(p);
    }

    /// `ms` of virtual time with nothing to do but timers, in 10 ms steps.
    fn idle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.step();
            self.now += Duration::from_millis(9);
        }
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

    /// Moves flow `id` from node `src` to node `dst`, frozen for `freeze_ms` of virtual time
    /// (packets arriving meanwhile are queued), and returns its id on `dst`.
    fn migrate(&mut self, src: usize, dst: usize, id: u64, freeze_ms: u64) -> u64 {
        self.nodes[src]
            .freeze_for_move(self.now, id, Self::peer(dst))
            .expect("freeze");
        for _ in 0..freeze_ms {
            self.step();
        }
        let captured = self.nodes[src].capture(id).expect("capture");
        // Through the wire format, as between nodes.
        let snapshot = ConnSnapshot::decode(&captured.snapshot.to_bytes()).expect("decodes");
        assert_eq!(snapshot, captured.snapshot);
        // Where the client's packets enter, as the target sees it: nowhere else if it is the
        // target itself.
        let ingress = match captured.ingress {
            None => Some(Remote {
                peer: Self::peer(src),
                flow: id,
            }),
            Some(r) if Self::node_of(r.peer) == dst => None,
            Some(r) => Some(r),
        };
        let new_id = self.nodes[dst]
            .restore(
                self.now,
                &snapshot,
                RestoreParams {
                    mss_clamp: MSS_CLAMP,
                    ingress,
                    max_buffer: 16 << 20,
                    direct_return: self.direct_return,
                    source: Some(Self::peer(src)),
                    path_rtt: Some(smoltcp::time::Duration::from_millis(1)),
                },
            )
            .expect("restore");
        // The restored socket may already send: the source holds that until it commits.
        self.step_tunnel_only();
        let early = self.nodes[src]
            .complete_move(
                self.now,
                id,
                Remote {
                    peer: Self::peer(dst),
                    flow: new_id,
                },
            )
            .expect("complete");
        self.early_replies += early.len();
        for p in early {
            self.deliver_to_client(p);
        }
        // Moved on from a node that is not where the packets enter: that node is told (the
        // daemon's Rehome), after the new owner may have sent already.
        if let Some(r) = captured.ingress
            && Self::node_of(r.peer) != dst
        {
            self.step_tunnel_only();
            let held = self.nodes[Self::node_of(r.peer)]
                .rehome(
                    self.now,
                    r.flow,
                    Self::peer(src),
                    Remote {
                        peer: Self::peer(dst),
                        flow: new_id,
                    },
                )
                .expect("rehome");
            self.successor_replies += held.len();
            for p in held {
                self.deliver_to_client(p);
            }
        }
        new_id
    }

    /// The id of the only connection that lives on node `i`.
    fn only_local(&self, i: usize) -> u64 {
        let conns: Vec<_> = self.nodes[i]
            .conns(self.now)
            .into_iter()
            .filter(|c| c.mode != "moved")
            .collect();
        assert_eq!(conns.len(), 1, "node {i}: {conns:?}");
        conns[0].id
    }
}

thread_local! {
    static CLOCK_MS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The client's TSval: a clock unrelated to the nodes', 1000 ms ahead.
fn client_tsval() -> u32 {
    CLOCK_MS.with(|c| c.get()).wrapping_add(1000)
}

fn is_rst(p: &[u8]) -> bool {
    let ip = Ipv4Packet::new_checked(p).unwrap();
    TcpPacket::new_checked(ip.payload()).unwrap().rst()
}

fn counting(offset: u64, n: usize) -> Vec<u8> {
    (offset..offset + n as u64)
        .map(|i| ((i / 8) >> (8 * (i % 8))) as u8)
        .collect()
}

fn recv_all(s: &mut tcp::Socket<'static>, into: &mut Vec<u8>) {
    while s.can_recv() {
        s.recv(|b| {
            into.extend_from_slice(b);
            (b.len(), ())
        })
        .unwrap();
    }
}

/// A counting-stream download moved from A to B mid-stream, under each client option set.
fn download_moved_once(opts: ClientOpts) {
    download_moved_once_on(Net::new(), opts);
}

/// Returns A's counters at the end.
fn download_moved_once_on(mut n: Net, opts: ClientOpts) -> flowshift_core::stack::StackStats {
    let h = n.connect(19, opts);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 500_000
    });
    let id = n.only_local(0);
    let moved = n.migrate(0, 1, id, 3);
    n.run_until(60_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert_eq!(got.len(), 3_000_000);
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
    assert_eq!(n.b_tun_packets, 0, "B wrote to its own TUN");
    let b = n.nodes[1].stats().clone();
    assert_eq!(b.conns_restored, 1);
    assert!(b.forwarded_to_ingress > 100, "{b:?}");
    assert_eq!(b.tunnel_packets_refused, 0);
    let a = n.nodes[0].stats().clone();
    assert_eq!(a.conns_moved_out, 1);
    // The restored socket sent at once; the source held that until the move completed.
    assert!(n.early_replies > 0);
    assert_eq!(a.tunnel_packets_refused, 0);
    assert!(a.relayed_from_owner > 100, "{a:?}");
    // The source sent its FIN from B: the client closes, and every node cleans up.
    n.sock(h).close();
    n.run_until(30_000, |n| {
        n.nodes[0].connection_count() == 0 && n.nodes[1].connection_count() == 0
    });
    assert_eq!(n.client_rsts, 0);
    let _ = moved;
    n.nodes[0].stats().clone()
}

#[test]
fn a_download_moved_mid_stream_is_byte_exact() {
    download_moved_once(ClientOpts::DEFAULT);
}

/// A download whose send buffer grew (64 KiB to 256 KiB) moves with its grown buffer: the
/// target restores it at that size and counts the growth as its own until the connection
/// ends (a move is never refused for it, even past the target's budget); byte-exact, no
/// reset.
#[test]
fn a_download_with_a_grown_send_buffer_moves_with_it_byte_exact() {
    let mut n = Net::new();
    for (i, seed) in [7, 99, 1234].into_iter().enumerate() {
        let mut config = node_config(0, seed);
        config.tcp.tx_buffer = 64 << 10;
        config.tcp.tx_buffer_max = 256 << 10;
        n.nodes[i] = Stack::new(config, ConnectionBudget::new(1000), n.now);
    }
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        n.nodes[0].stats().tx_grown == 1
    });
    let id = n.only_local(0);
    assert_eq!(n.nodes[0].conns(n.now)[0].send_buffer, 256 << 10);
    assert!(got.len() < 2_500_000, "grown too late to move mid-stream");
    n.migrate(0, 1, id, 3);
    let on_b = n.nodes[1].conns(n.now);
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].send_buffer, 256 << 10);
    n.run_until(60_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
    assert_eq!(n.nodes[1].stats().conns_restored, 1);
    // B's sweep counts the growth it now holds; an idle spell compacts it back.
    for _ in 0..1_100 {
        n.step();
    }
    assert_eq!(n.nodes[1].stats().tx_grown_bytes, 192 << 10);
    n.sock(h).close();
    n.run_until(30_000, |n| {
        n.nodes[0].connection_count() == 0 && n.nodes[1].connection_count() == 0
    });
    for _ in 0..1_100 {
        n.step();
    }
    assert_eq!(n.nodes[1].stats().tx_grown_bytes, 0);
    assert_eq!(n.client_rsts, 0);
}

/// A connection under a class allocation moves: the source stops counting it as allocated
/// (its turns go back to serving in arrival order), and the target serves it unlimited until
/// its own planner allocates it; the transfer stays byte-exact.
#[test]
fn an_allocated_connection_that_moves_away_leaves_no_allocation_behind() {
    use flowshift_core::predict::class::Allocation;
    let mut n = Net::new();
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 100_000
    });
    let id = n.only_local(0);
    let limited = Allocation {
        rate_limit: Some(2_000_000),
        buffer_budget: 32 << 10,
        priority: 1,
    };
    n.nodes[0]
        .set_allocation(n.now, id, Some(limited))
        .expect("allocate");
    assert_eq!(n.nodes[0].allocated(), 1);
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 300_000
    });
    n.migrate(0, 1, id, 3);
    assert_eq!(
        n.nodes[0].allocated(),
        0,
        "the source still counts the moved flow"
    );
    assert_eq!(n.nodes[1].allocated(), 0);
    // Allocating the forwarding entry is refused: nothing is served there.
    assert!(n.nodes[0].set_allocation(n.now, id, Some(limited)).is_err());
    n.run_until(60_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
}

#[test]
fn a_connection_born_of_a_syn_cookie_moves_byte_exact() {
    for opts in [
        ClientOpts::DEFAULT,
        ClientOpts {
            timestamps: false,
            ..ClientOpts::DEFAULT
        },
    ] {
        let mut n = Net::new();
        // A answers every SYN with a cookie: the connection is made from the client's ACK.
        let config = StackConfig {
            syn_cookies_after: Some(0),
            ..node_config(0, 7)
        };
        n.nodes[0] = Stack::new(config, ConnectionBudget::new(1000), n.now);
        let a = download_moved_once_on(n, opts);
        assert_eq!((a.syn_cookies_sent, a.syn_cookies_accepted), (1, 1));
    }
}

#[test]
fn a_download_moves_without_client_timestamps() {
    download_moved_once(ClientOpts {
        timestamps: false,
        window_scale: true,
    });
}

#[test]
fn a_download_moves_without_window_scaling() {
    download_moved_once(ClientOpts {
        timestamps: true,
        window_scale: false,
    });
}

#[test]
fn a_frozen_flow_sends_nothing_and_does_not_time_out() {
    let mut n = Net::new();
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 200_000
    });
    let id = n.only_local(0);
    n.nodes[0].freeze(n.now, id).unwrap();
    let before = n.nodes[0].stats().packets_out;
    // Longer than smoltcp's unacknowledged-data timeout: a socket still in the set would
    // retransmit, then reset the client.
    let frozen_ms = UNACKED_TIMEOUT.total_millis() + 5_000;
    for _ in 0..frozen_ms / 50 {
        n.now += Duration::from_millis(49);
        n.step();
    }
    assert_eq!(
        n.nodes[0].stats().packets_out,
        before,
        "a frozen flow transmitted"
    );
    let conns = n.nodes[0].conns(n.now);
    assert_eq!(conns[0].mode, "frozen");
    assert_eq!(conns[0].state, "ESTABLISHED");
    let replayed = n.nodes[0].thaw(n.now, id).unwrap();
    assert!(replayed > 0, "the client's retransmissions were queued");
    n.run_until(120_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
}

/// Uploads `len` bytes of the counting stream into `sink` on A, moves the connection to B
/// once A's app has taken `move_after` bytes, and checks the sink's report (byte count and
/// CRC), no reset and nothing written to B's TUN device. Returns A's directly taken bytes
/// (`rx_direct_bytes`) at the move.
fn upload_moved_once(mut n: Net, len: usize, move_after: u64) -> u64 {
    let h = n.connect(9, ClientOpts::DEFAULT);
    let data = counting(3, len);
    let mut sent = 0;
    let mut got = Vec::new();
    let mut direct_at_move = None;
    n.run_until(60_000, |n| {
        let s = n.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
            if sent == data.len() {
                s.close();
            }
        }
        recv_all(s, &mut got);
        if direct_at_move.is_none()
            && n.nodes[0]
                .conns(n.now)
                .first()
                .is_some_and(|c| c.bytes_in > move_after)
        {
            direct_at_move = Some(n.nodes[0].stats().rx_direct_bytes);
            let id = n.only_local(0);
            n.migrate(0, 1, id, 2);
        }
        got.ends_with(b"\n")
    });
    let want = format!("{} {:08x}\n", data.len(), crc32fast::hash(&data));
    assert_eq!(String::from_utf8(got).unwrap(), want);
    assert_eq!(n.client_rsts, 0);
    assert_eq!(n.b_tun_packets, 0);
    direct_at_move.expect("moved")
}

#[test]
fn an_upload_moved_mid_stream_is_byte_exact() {
    upload_moved_once(Net::new(), 2_000_000, 700_000);
}

/// A moves a connection whose app took most of the upload straight from merged packets
/// (direct receive): the client's numbers run ahead of A's socket's by those bytes, and the
/// snapshot must carry the client's, not the socket's. B is sent the rest through the tunnel
/// and takes it through its socket.
#[test]
fn an_upload_merged_by_gro_and_taken_straight_from_the_packets_moves_byte_exact() {
    let mut n = Net::new();
    n.gro = Some(Coalescer::new(0));
    let direct = upload_moved_once(n, 4_000_000, 1_500_000);
    assert!(
        direct > 1_000_000,
        "{direct} bytes taken straight from packets before the move"
    );
}

#[test]
fn an_echo_session_moves_back_and_forth_fifty_times() {
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    let mut on = 0usize;
    let mut id = n.only_local(0);
    let mut offset = 0u64;
    let mut got = Vec::new();
    for round in 0..50 {
        // Some bytes before each move, some still in flight when it freezes.
        let chunk = counting(offset, 20_000 + round * 97);
        offset += chunk.len() as u64;
        let mut sent = 0;
        n.run_until(5_000, |n| {
            let s = n.sock(h);
            if sent < chunk.len() && s.can_send() {
                sent += s.send_slice(&chunk[sent..]).unwrap();
            }
            recv_all(s, &mut got);
            sent == chunk.len() && got.len() as u64 > offset - 5_000
        });
        let to = 1 - on;
        id = n.migrate(on, to, id, 1 + round as u64 % 3);
        on = to;
    }
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() as u64 == offset
    });
    assert!(got == counting(0, offset as usize), "echo mismatch");
    assert_eq!(n.client_rsts, 0);
    // 50 moves end on A, where the packets enter: no entry left on B.
    assert_eq!(on, 0);
    assert_eq!(n.nodes[1].connection_count(), 0);
    assert_eq!(n.nodes[0].conns(n.now)[0].mode, "local");
    assert_eq!(n.nodes[0].stats().conns_restored, 25);
    assert_eq!(n.b_tun_packets, 0);
}

#[test]
fn unread_bytes_and_a_closed_window_move() {
    // The client writes to echo without reading: echo's buffer fills, then the node's receive
    // buffer (unread bytes), then the client's window closes. Move in that state.
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    let data = counting(0, 3_000_000);
    let mut sent = 0;
    n.run_until(20_000, |n| {
        let s = n.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        n.nodes[0]
            .conns(n.now)
            .first()
            .is_some_and(|c| c.recv_queue > 30_000)
    });
    let recv_queue = n.nodes[0].conns(n.now)[0].recv_queue;
    assert!(recv_queue > 30_000, "unread bytes: {recv_queue}");
    let id = n.only_local(0);
    n.migrate(0, 1, id, 5);
    let mut got = Vec::new();
    n.run_until(60_000, |n| {
        let s = n.sock(h);
        if s.can_send() && sent < data.len() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        recv_all(s, &mut got);
        got.len() == data.len()
    });
    assert!(got == data, "echo mismatch");
    assert_eq!(n.client_rsts, 0);
}

#[test]
fn a_move_over_a_lossy_tunnel_completes() {
    let mut n = Net::new();
    n.tunnel_loss_every = 10;
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 300_000
    });
    let id = n.only_local(0);
    n.migrate(0, 1, id, 3);
    n.run_until(300_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
}

/// Waits (client not reading) until node A's only flow is in `state`, moves it to B, then
/// reads everything: `want` bytes and the node's FIN.
fn move_in_state(port: u16, upload: &[u8], close_first: bool, state: &str, want: &[u8]) {
    let mut n = Net::new();
    // No window scaling: a 64 KiB client buffer, so the node's send buffer stays full.
    let h = n.connect(
        port,
        ClientOpts {
            timestamps: true,
            window_scale: false,
        },
    );
    let mut sent = 0;
    n.run_until(20_000, |n| {
        let s = n.sock(h);
        if s.can_send() && sent < upload.len() {
            sent += s.send_slice(&upload[sent..]).unwrap();
        }
        if close_first && sent == upload.len() && s.state() == tcp::State::Established {
            s.close();
        }
        n.nodes[0]
            .conns(n.now)
            .first()
            .is_some_and(|c| c.state == state)
    });
    let c = n.nodes[0].conns(n.now)[0].clone();
    assert!(c.send_queue > 0, "bytes in flight: {c:?}");
    n.migrate(0, 1, c.id, 2);
    let conns = n.nodes[1].conns(n.now);
    assert_eq!(conns[0].state, state, "restored in the same state");
    let mut got = Vec::new();
    n.run_until(20_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == want, "{} bytes, want {}", got.len(), want.len());
    n.sock(h).close();
    n.run_until(30_000, |n| {
        n.nodes[0].connection_count() == 0 && n.nodes[1].connection_count() == 0
    });
    assert_eq!(n.client_rsts, 0);
    assert_eq!(n.b_tun_packets, 0);
}

#[test]
fn a_flow_in_fin_wait_1_moves() {
    // The source app wrote its last byte and closed: FIN queued behind unacknowledged bytes.
    move_in_state(20, &[], false, "FIN-WAIT-1", &counting(0, 100_000));
}

#[test]
fn a_flow_in_close_wait_moves() {
    // The client sent everything and its FIN; echo has more to return than the client's
    // window (64 KiB), the node's send buffer and echo's own buffer take, so the node is in
    // CLOSE-WAIT with bytes to send (the rest waits in its receive buffer).
    let tcp = flowshift_core::config::TcpConfig::default();
    let held = 65_535 + tcp.tx_buffer + flowshift_core::app::MAX_APP_BUFFER;
    let data = counting(9, held + tcp.rx_buffer / 2);
    move_in_state(7, &data, true, "CLOSE-WAIT", &data);
}

#[test]
fn a_flow_in_last_ack_moves() {
    // Echo returned everything it will (100 KB after the client's FIN) and closed: FIN
    // queued behind bytes the closed client window holds back.
    let data = counting(9, 100_000);
    move_in_state(7, &data, true, "LAST-ACK", &data);
}

#[test]
fn a_download_moves_under_5_percent_loss_on_the_client_path() {
    for seed in 1..=4u64 {
        let mut n = Net::new();
        n.client_loss = 5;
        n.rng ^= seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let h = n.connect(19, ClientOpts::DEFAULT);
        let mut got = Vec::new();
        n.run_until(60_000, |n| {
            recv_all(n.sock(h), &mut got);
            got.len() > 300_000
        });
        let id = n.only_local(0);
        n.migrate(0, 1, id, 3);
        n.run_until(600_000, |n| {
            recv_all(n.sock(h), &mut got);
            !n.sock(h).may_recv()
        });
        assert!(
            got == counting(0, 3_000_000),
            "seed {seed}: counting stream mismatch"
        );
        assert_eq!(n.client_rsts, 0);
    }
}

#[test]
fn with_direct_return_the_target_sends_straight_to_the_client() {
    let mut n = Net::new();
    n.direct_return = true;
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() > 500_000
    });
    let id = n.only_local(0);
    n.migrate(0, 1, id, 3);
    n.run_until(60_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
    let b = n.nodes[1].stats().clone();
    // Until the first forwarded client packet, through A; then straight out.
    assert!(n.b_tun_packets > 1000, "{b:?}");
    assert!(b.forwarded_to_ingress < 50, "{b:?}");
    assert_eq!(
        n.nodes[1].conns(n.now)[0].return_path,
        Some(flowshift_core::flow::ReturnPath::Direct)
    );
}

#[test]
fn a_download_moves_on_to_a_third_node_and_home_byte_exact() {
    let mut n = Net::new();
    let h = n.connect(19, ClientOpts::DEFAULT);
    let mut got = Vec::new();
    let mut read_past = |n: &mut Net, bytes: usize| {
        n.run_until(20_000, |n| {
            recv_all(n.sock(h), &mut got);
            got.len() > bytes
        });
    };
    read_past(&mut n, 300_000);
    let on_a = n.only_local(0);
    let on_b = n.migrate(0, 1, on_a, 2);
    read_past(&mut n, 900_000);
    // B -> C: A is where the packets enter, neither source nor target.
    let on_c = n.migrate(1, 2, on_b, 2);
    read_past(&mut n, 1_500_000);
    let a_row = n.nodes[0].conns(n.now).remove(0);
    assert_eq!(a_row.mode, "moved");
    assert_eq!(
        a_row.owner,
        Some(Remote {
            peer: Net::peer(2),
            flow: on_c
        }),
        "A forwards straight to C"
    );
    let b_row = n.nodes[1].conns(n.now).remove(0);
    assert_eq!(b_row.mode, "moved", "B keeps forwarding what A still sends");
    assert_eq!(b_row.ingress.map(|r| r.peer), Some(Net::peer(0)));
    assert!(n.nodes[2].stats().forwarded_to_ingress > 100);
    // C sent before A was told; A held that and wrote it out once told.
    assert!(n.successor_replies > 0);
    // C -> A: home.
    let home = n.migrate(2, 0, on_c, 2);
    assert_eq!(home, on_a, "the connection keeps its id at home");
    n.run_until(60_000, |n| {
        recv_all(n.sock(h), &mut got);
        !n.sock(h).may_recv()
    });
    assert_eq!(got.len(), 3_000_000);
    assert!(got == counting(0, 3_000_000), "counting stream mismatch");
    assert_eq!(n.client_rsts, 0);
    assert_eq!(n.b_tun_packets, 0, "B or C wrote to its own TUN");
    for (i, node) in n.nodes.iter().enumerate() {
        assert_eq!(node.stats().tunnel_packets_refused, 0, "node {i}");
    }
    // B's forwarding entry goes once idle; C's went when the flow came home.
    assert_eq!(n.nodes[2].connection_count(), 0);
    n.sock(h).close();
    n.run_until(60_000, |n| {
        n.nodes.iter().all(|node| node.connection_count() == 0)
    });
    assert_eq!(n.client_rsts, 0);
}

#[test]
fn an_echo_session_tours_three_nodes_byte_exact() {
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    let mut on = 0usize;
    let mut id = n.only_local(0);
    let mut offset = 0u64;
    let mut got = Vec::new();
    // A B C B C A C A B A ...: every kind of move, home and third node alike.
    let tour = [1, 2, 1, 2, 0, 2, 0, 1, 0, 2, 1, 0];
    for (round, &to) in tour.iter().enumerate() {
        let chunk = counting(offset, 20_000 + round * 131);
        offset += chunk.len() as u64;
        let mut sent = 0;
        n.run_until(5_000, |n| {
            let s = n.sock(h);
            if sent < chunk.len() && s.can_send() {
                sent += s.send_slice(&chunk[sent..]).unwrap();
            }
            recv_all(s, &mut got);
            sent == chunk.len() && got.len() as u64 > offset - 5_000
        });
        id = n.migrate(on, to, id, 1 + round as u64 % 3);
        on = to;
    }
    n.run_until(10_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() as u64 == offset
    });
    assert!(got == counting(0, offset as usize), "echo mismatch");
    assert_eq!(n.client_rsts, 0);
    assert_eq!(on, 0);
    assert_eq!(n.nodes[0].conns(n.now)[0].mode, "local");
    assert_eq!(n.b_tun_packets, 0);
    for (i, node) in n.nodes.iter().enumerate() {
        assert_eq!(node.stats().tunnel_packets_refused, 0, "node {i}");
    }
}

#[test]
fn when_the_owner_restarts_the_ingress_drops_its_entry_and_the_client_gets_a_reset() {
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    n.sock(h).send_slice(b"before").unwrap();
    let mut got = Vec::new();
    n.run_until(1_000, |n| {
        recv_all(n.sock(h), &mut got);
        got == b"before"
    });
    let id = n.only_local(0);
    n.migrate(0, 1, id, 1);
    n.sock(h).send_slice(b" and moved").unwrap();
    n.run_until(1_000, |n| {
        recv_all(n.sock(h), &mut got);
        got == b"before and moved"
    });
    // B restarts: its connections are gone. Each side learns it from the tunnel.
    let (moved, restored) = n.nodes[0].peer_lost(n.now, Net::peer(1));
    assert_eq!((moved, restored), (1, 0));
    let (moved, restored) = n.nodes[1].peer_lost(n.now, Net::peer(0));
    assert_eq!((moved, restored), (0, 1));
    // The client's next bytes meet no connection at A: a RST, not silence.
    n.sock(h).send_slice(b"after").unwrap();
    n.run_until(1_000, |n| n.client_rsts > 0);
    n.run_until(1_000, |n| {
        n.nodes[0].connection_count() == 0 && n.nodes[1].connection_count() == 0
    });
    assert_eq!(n.sock(h).state(), tcp::State::Closed);
}

/// An echo session moved A → B whose bytes come back exact; returns the client's socket,
/// the bytes echoed so far, and the connection's id on B.
fn echo_moved_to_b(n: &mut Net) -> (SocketHandle, u64, u64) {
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    echo(n, h, 0, 10_000);
    let id = n.only_local(0);
    let on_b = n.migrate(0, 1, id, 1);
    echo(n, h, 10_000, 10_000);
    (h, 20_000, on_b)
}

fn srtt_of(n: &Net, node: usize, id: u64) -> Option<u64> {
    n.nodes[node]
        .conns(n.now)
        .into_iter()
        .find(|c| c.id == id)
        .expect("the connection is listed")
        .srtt_us
}

/// A move carries the source's round-trip estimate: the target times its loss probes from
/// it (plus the tunnel's round trip when the client's packets enter elsewhere) instead of
/// from nothing, until it has measured its own; back home, the estimate comes as it is.
#[test]
fn a_moved_connection_keeps_its_round_trip_estimate() {
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    echo(&mut n, h, 0, 10_000);
    let id = n.only_local(0);
    let at_a = srtt_of(&n, 0, id).expect("A measured a round trip");
    let on_b = n.migrate(0, 1, id, 1);
    // Before B has sent anything: A's estimate plus the tunnel's 1 ms (`Net::migrate`).
    assert_eq!(srtt_of(&n, 1, on_b), Some(at_a + 1_000));
    assert_eq!(srtt_of(&n, 0, id), None, "A only forwards it now");
    echo(&mut n, h, 10_000, 10_000);
    let at_b = srtt_of(&n, 1, on_b).expect("B kept or measured a round trip");
    let home = n.migrate(1, 0, on_b, 1);
    assert_eq!(home, id);
    assert_eq!(
        srtt_of(&n, 0, id),
        Some(at_b),
        "home: no tunnel on the path"
    );
    echo(&mut n, h, 20_000, 10_000);
    assert_eq!(n.client_rsts, 0);
}

/// `len` bytes of the counting stream from `offset` through echo, checked.
fn echo(n: &mut Net, h: SocketHandle, offset: u64, len: usize) {
    let chunk = counting(offset, len);
    let mut got = Vec::new();
    let mut sent = 0;
    n.run_until(5_000, |n| {
        let s = n.sock(h);
        if sent < chunk.len() && s.can_send() {
            sent += s.send_slice(&chunk[sent..]).unwrap();
        }
        recv_all(s, &mut got);
        got.len() == chunk.len()
    });
    assert!(got == chunk, "echo mismatch");
}

/// The daemon's default keepalive: 60 s, so a moved entry expires after 2 × 60 × 4 s.
const MOVED_EXPIRY_MS: u64 = 2 * 60_000 * (flowshift_core::config::KEEPALIVE_PROBES as u64 + 1);

#[test]
fn a_moved_entry_whose_owner_died_expires_after_twice_the_keepalive_limit() {
    let mut n = Net::new();
    echo_moved_to_b(&mut n);
    assert_eq!(n.nodes[0].conns(n.now)[0].mode, "moved");
    // B dies; the client stays idle: nothing of the connection passes A any more.
    n.dead = Some(1);
    n.idle(MOVED_EXPIRY_MS - 5_000);
    assert_eq!(n.nodes[0].connection_count(), 1, "expired too early");
    assert_eq!(n.nodes[0].stats().moved_expired, 0);
    n.idle(10_000);
    assert_eq!(n.nodes[0].connection_count(), 0, "the entry stayed");
    assert_eq!(n.nodes[0].stats().moved_expired, 1);
    assert_eq!(n.client_rsts, 0);
}

#[test]
fn an_idle_moved_connection_whose_owner_lives_keeps_its_entry_and_carries_on() {
    let mut n = Net::new();
    let (h, echoed, on_b) = echo_moved_to_b(&mut n);
    // Idle past the expiry: B's keepalive probes and the client's answers pass A.
    n.idle(MOVED_EXPIRY_MS + 60_000);
    assert_eq!(n.nodes[0].stats().moved_expired, 0);
    assert_eq!(n.nodes[0].conns(n.now)[0].mode, "moved");
    assert_eq!(n.only_local(1), on_b);
    echo(&mut n, h, echoed, 5_000);
    assert_eq!(n.client_rsts, 0);
}

#[test]
fn an_idle_orphaned_copy_is_reset_by_its_keepalive_and_the_connection_carries_on_at_the_source() {
    // The known gap: the target restored and committed, but the source never heard and
    // thawed. The copy on B receives nothing; A keeps serving the client.
    let mut n = Net::new();
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    echo(&mut n, h, 0, 10_000);
    // Everything acknowledged: the copy has nothing to send (an idle copy).
    n.idle(1_000);
    let id = n.only_local(0);
    n.nodes[0]
        .freeze_for_move(n.now, id, Net::peer(1))
        .expect("freeze");
    let captured = n.nodes[0].capture(id).expect("capture");
    assert!(captured.snapshot.send_bytes.is_empty());
    n.nodes[1]
        .restore(
            n.now,
            &captured.snapshot,
            RestoreParams {
                mss_clamp: MSS_CLAMP,
                ingress: Some(Remote {
                    peer: Net::peer(0),
                    flow: id,
                }),
                max_buffer: 16 << 20,
                direct_return: false,
                source: Some(Net::peer(0)),
                path_rtt: None,
            },
        )
        .expect("restore");
    n.nodes[0].thaw(n.now, id).expect("thaw");
    echo(&mut n, h, 10_000, 10_000);
    assert_eq!(n.nodes[1].connection_count(), 1);
    // The client stays idle; A's keepalive probes keep it alive there, B's copy hears nothing.
    n.idle(4 * 60_000 + 10_000);
    assert_eq!(n.nodes[1].connection_count(), 0, "the orphaned copy stayed");
    assert_eq!(
        n.nodes[1].stats().keepalive_timeouts,
        1,
        "{:?}",
        n.nodes[1].stats()
    );
    assert_eq!(n.nodes[0].stats().keepalive_timeouts, 0);
    echo(&mut n, h, 20_000, 5_000);
    assert_eq!(n.client_rsts, 0, "the copy's RST reached the client");
}

/// A 40-byte TCP segment (no options, no payload) from `src` to `dst`.
fn bare_segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), rst: bool) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.0.octets());
    p[16..20].copy_from_slice(&dst.0.octets());
    let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
    ip.fill_checksum();
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[8..12].copy_from_slice(&2000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = if rst { 0x14 } else { 0x10 };
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut tcp = TcpPacket::new_unchecked(t);
    tcp.fill_checksum(&src.0.into(), &dst.0.into());
    p
}

/// A connection that ended on its owner while the node where its packets enter still
/// forwards looks, to the owner, like an id it does not have: RSTs for such an id (the
/// client answering the owner's last segments; the owner's RSTs after the ingress entry
/// went) are discarded and counted as late, not as refusals; any other packet for it, or a
/// malformed one, is refused.
#[test]
fn resets_for_a_connection_not_here_are_late_and_anything_else_is_refused() {
    let now = Instant::from_secs(1);
    let mut b = node(0, 7, now);
    let client = (Ipv4Addr::new(198, 18, 0, 2), 40_000);
    let service = (Ipv4Addr::new(198, 19, 255, 1), 19);
    let from = PeerRef(1);
    b.handle_forwarded(now, from, 0x51, &mut bare_segment(client, service, true));
    assert_eq!(b.stats().tunnel_late_resets, 1);
    assert_eq!(b.stats().tunnel_packets_refused, 0);
    b.handle_forwarded(now, from, 0x51, &mut bare_segment(client, service, false));
    assert_eq!(b.stats().tunnel_packets_refused, 1);
    b.handle_forwarded(now, from, 0x51, &mut [0x45, 0, 0]);
    assert_eq!(b.stats().tunnel_packets_refused, 2);
    // The other way: the owner's RST for an ingress entry already gone.
    assert!(!b.handle_from_owner(now, from, 0x52, &bare_segment(service, client, true)));
    assert_eq!(b.stats().tunnel_late_resets, 2);
    assert!(!b.handle_from_owner(now, from, 0x52, &bare_segment(service, client, false)));
    assert_eq!(b.stats().tunnel_packets_refused, 3);
}

/// A moved connection the client resets ends on its owner at once; where its packets enter,
/// the entry lingers so that late packets still find the owner. A late RST from the client
/// (its answer to a segment still in flight) passes the lingering entry and is discarded at
/// the owner as late, not refused; after the linger it meets no entry where it enters and is
/// dropped there, unanswered (nobody answers a RST). Nothing is refused on either node, and
/// the client is sent no RST.
#[test]
fn a_moved_connection_reset_by_the_client_ends_on_both_nodes_and_its_late_resets_are_not_refused() {
    let mut n = Net::new();
    let (h, _, on_b) = echo_moved_to_b(&mut n);
    let client = (CLIENT, n.next_port);
    let service = (SERVICE, 7);
    n.sock(h).abort();
    n.run_until(100, |n| n.nodes[1].connection_count() == 0);
    assert!(
        !n.nodes[1].conns(n.now).iter().any(|c| c.id == on_b),
        "the owner still lists the connection"
    );
    let entry = n.nodes[0].conns(n.now);
    assert_eq!(entry.len(), 1, "{entry:?}");
    assert_eq!(entry[0].mode, "moved", "the ingress entry lingers");

    // The client's own RST ended the connection on B: it was not late.
    assert_eq!(n.nodes[1].stats().tunnel_late_resets, 0);
    let late = bare_segment(client, service, true);
    n.nodes[0].handle_packet(n.now, &mut late.clone());
    n.step_tunnel_only();
    assert_eq!(n.nodes[1].stats().tunnel_late_resets, 1);

    n.idle(MOVED_LINGER.total_millis() + 1_000);
    assert_eq!(
        n.nodes[0].connection_count(),
        0,
        "the entry outlived its linger"
    );
    assert_eq!(n.nodes[0].stats().moved_closed, 1);
    let unknown = n.nodes[0].stats().unknown_flow_packets;
    n.nodes[0].handle_packet(n.now, &mut late.clone());
    assert_eq!(n.nodes[0].stats().unknown_flow_packets, unknown + 1);
    n.nodes[0].poll(n.now);
    let mut replies = 0;
    n.nodes[0].drain_transmit(|_| replies += 1);
    assert_eq!(replies, 0, "a RST was answered");
    n.step_tunnel_only();
    assert_eq!(
        n.nodes[1].stats().tunnel_late_resets,
        1,
        "forwarded after the linger"
    );

    for (i, node) in n.nodes.iter().enumerate() {
        assert_eq!(node.stats().tunnel_packets_refused, 0, "node {i} refused");
    }
    assert_eq!(n.client_rsts, 0);
}

/// A shadow trial's diversion: a connection held at its accept on A, with the request the
/// client sent at once still unread there, moves to B; B's app answers it — A's never saw a
/// byte — and the session carries on byte-exact, without a reset.
#[test]
fn a_connection_held_at_its_accept_moves_and_its_first_request_is_answered_by_the_target() {
    let mut n = Net::new();
    n.nodes[0].set_hold_accepted(true);
    let h = n.connect(7, ClientOpts::DEFAULT);
    n.run_until(1_000, |n| n.sock(h).state() == tcp::State::Established);
    let request = counting(0, 5_000);
    assert_eq!(n.sock(h).send_slice(&request).unwrap(), request.len());
    let mut held = Vec::new();
    n.run_until(1_000, |n| {
        held.extend(n.nodes[0].take_accepted_held());
        n.nodes[0].conns(n.now)[0].recv_queue == request.len()
    });
    let id = n.only_local(0);
    assert_eq!(held, [id]);
    assert!(n.nodes[0].is_held(id));
    n.migrate(0, 1, id, 1);
    let mut got = Vec::new();
    n.run_until(5_000, |n| {
        recv_all(n.sock(h), &mut got);
        got.len() == request.len()
    });
    assert!(got == request, "first answer mismatch");
    assert_eq!(
        n.nodes[0].stats().app_bytes_in,
        0,
        "A's app saw the request"
    );
    assert_eq!(n.nodes[0].stats().app_bytes_out, 0, "A's app answered");
    assert_eq!(n.nodes[1].stats().app_bytes_out, request.len() as u64);
    // And on: a second exchange, served by B.
    let more = counting(5_000, 20_000);
    let mut sent = 0;
    n.run_until(5_000, |n| {
        let s = n.sock(h);
        if sent < more.len() && s.can_send() {
            sent += s.send_slice(&more[sent..]).unwrap();
        }
        recv_all(s, &mut got);
        got.len() == 25_000
    });
    assert!(got == counting(0, 25_000), "echo mismatch");
    assert_eq!(n.client_rsts, 0);
}
