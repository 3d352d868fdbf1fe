//! A whole live migration on virtual time: a smoltcp client and two nodes, each running its
//! real [`Stack`], tunnel [`Endpoint`] and migration machines ([`Source`], [`Target`]), with
//! the glue the daemon runs between them, joined by seeded links (quinn-proto's `Pair` idea,
//! as in tunnel/tests/sim). The clock jumps to the next deadline of anything.
//!
//! The glue in [`Node`] mirrors the daemon function by function (each comment names the
//! function): the coordinator of engine/src/tunnel/migrate.rs, the tunnel driver of
//! engine/src/tunnel/mod.rs and the worker of engine/src/node.rs, one worker per node, the
//! channels between tunnel thread and worker as two queues. The client's packets enter at
//! node A; node B's TUN device reaches no client (relay mode), so anything B writes there is
//! counted as lost. A crash hook kills a node at a chosen step of the protocol: a dead node
//! does nothing more and whatever reaches it is lost.
//!
//! Every test checks the client's bytes exactly, that it never saw a RST, where the
//! connection lives at the end, and that every offered flow was resolved exactly once.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};

use flowshift_core::app::{self, AppConfig, AppKind};
use flowshift_core::config::{Ipv4Cidr, ServiceConfig};
use flowshift_core::flow::{PeerRef, Remote};
use flowshift_core::segment::segment;
use flowshift_core::stack::{
    ConnectionBudget, ForwardKind, RestoreError, RestoreParams, Stack, StackConfig, window_shift,
};
use flowshift_statesync::envelope::{EnvelopeKind, EnvelopeRepr, HEADER_LEN};
use flowshift_statesync::protocol::{
    Config as ProtocolConfig, ConnOffer, FlowOutcome, Message, MigrationId, MigrationReport,
    Recipient, RefuseReason, Source, SourceAction, Target, TargetAction, Verdict,
};
use flowshift_statesync::snapshot::ConnSnapshot;
use flowshift_tunnel::{Config as TunnelConfig, Endpoint, Event, Keypair, PeerConfig, PeerId};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Packet, TcpPacket};

type SInstant = smoltcp::time::Instant;
type TInstant = flowshift_tunnel::Instant;

const CLIENT: Ipv4Address = Ipv4Addr::new(198, 18, 1, 2);
const SERVICE: Ipv4Address = Ipv4Addr::new(198, 19, 255, 1);
const A: usize = 0;
const B: usize = 1;
/// The download of port 19, bytes.
const DOWNLOAD: usize = 2_000_000;
/// The download of port 20, bytes.
const SMALL_DOWNLOAD: usize = 300_000;
/// Largest socket buffer a moved connection may bring (node.rs `MAX_RESTORED_BUFFER`).
const MAX_RESTORED_BUFFER: usize = 16 << 20;
const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

// ------------------------------------------------------------------------------ links

/// Impairments of one direction of a path.
#[derive(Clone, Copy, Debug)]
struct Link {
    loss: f64,
    duplicate: f64,
    reorder: f64,
    /// One-way delay and uniform extra jitter, microseconds.
    delay: u64,
    jitter: u64,
}

impl Link {
    fn perfect(delay_ms: u64) -> Link {
        Link {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: delay_ms * MS,
            jitter: 0,
        }
    }

    /// `loss`, 5 % duplicates and 10 % reordered by up to 20 ms, on a 1 ms path.
    fn lossy(loss: f64) -> Link {
        Link {
            loss,
            duplicate: 0.05,
            reorder: 0.1,
            delay: MS,
            jitter: 300,
        }
    }
}

/// Where a packet in flight goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum To {
    /// The client's interface.
    Client,
    /// A node's TUN device (only A's is reachable from the client).
    Tun(usize),
    /// A node's tunnel UDP socket.
    Udp(usize),
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    seq: u64,
    to: To,
    data: Vec<u8>,
}

// ------------------------------------------------------------------------------ client

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
    fn receive(&mut self, _: SInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: SInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1500;
        c
    }
}

thread_local! {
    static CLIENT_MS: Cell<u32> = const { Cell::new(0) };
}

/// The client's TSval: its own clock, unrelated to the nodes'.
fn client_tsval() -> u32 {
    CLIENT_MS.with(Cell::get).wrapping_add(1000)
}

struct Client {
    iface: Interface,
    pipe: Pipe,
    sockets: SocketSet<'static>,
    next_port: u16,
    /// Packets received with RST set.
    rsts: usize,
}

impl Client {
    fn new(now: SInstant) -> Client {
        let mut pipe = Pipe::default();
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = 11;
        let mut iface = Interface::new(cfg, &mut pipe, now);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(CLIENT), 24)).unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Addr::new(198, 18, 1, 1))
            .unwrap();
        Client {
            iface,
            pipe,
            sockets: SocketSet::new(vec![]),
            next_port: 40_000,
            rsts: 0,
        }
    }

    fn connect(&mut self, port: u16, rx_buffer: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx_buffer]),
            tcp::SocketBuffer::new(vec![0; 256 << 10]),
        );
        s.set_tsval_generator(Some(client_tsval));
        self.next_port += 1;
        s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(SERVICE), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Reads what `h` has, up to `limit` bytes in `into` altogether.
    fn read(&mut self, h: SocketHandle, into: &mut Vec<u8>, limit: usize) {
        let s = self.sock(h);
        while s.can_recv() && into.len() < limit {
            s.recv(|b| {
                let n = b.len().min(limit - into.len());
                into.extend_from_slice(&b[..n]);
                (n, ())
            })
            .unwrap();
        }
    }
}

// ------------------------------------------------------------------------------ crash hook

/// Migration message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Abort,
    Accept,
    Commit,
    Offer,
    Transfer,
    Rehome,
}

fn kind(m: &Message) -> Kind {
    match m {
        Message::Abort(_) => Kind::Abort,
        Message::Accept(_) => Kind::Accept,
        Message::Commit(_) => Kind::Commit,
        Message::Offer(_) => Kind::Offer,
        Message::Transfer(_) => Kind::Transfer,
        Message::Rehome(_) => Kind::Rehome,
    }
}

/// A step of the protocol at one node, where a crash hook fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moment {
    /// A message of this kind arrived (before it is handled).
    Received(Kind),
    /// A message of this kind was handed to the endpoint, but nothing of it left yet.
    Queued(Kind),
    /// A message of this kind left: its datagrams are on the wire.
    Sent(Kind),
    /// The worker restored the snapshots (before the coordinator hears of it).
    Restored,
}

// ------------------------------------------------------------------------------ node

/// Tunnel thread → worker (node.rs `WorkerMsg`, the migration part).
enum WorkerMsg {
    Tunnel(TunnelPacket),
    Capture {
        migration: MigrationId,
        to: PeerRef,
        flows: Vec<u64>,
    },
    Complete {
        migration: MigrationId,
        flow: u64,
        to: Remote,
    },
    ThawMoved {
        migration: MigrationId,
        flow: u64,
    },
    Restore {
        peer: PeerRef,
        migration: MigrationId,
        items: Vec<(u64, ConnSnapshot, Option<Remote>)>,
        mss_clamp: u16,
        max_buffer: usize,
    },
    Discard(Vec<u64>),
}

/// tunnel/mod.rs `TunnelPacket`.
struct TunnelPacket {
    kind: ForwardKind,
    from: PeerRef,
    flow: u64,
    packet: Vec<u8>,
}

type CaptureResult = Result<(ConnSnapshot, Option<Remote>), RefuseReason>;
type RestoreResult = Result<u64, RefuseReason>;

/// Worker → tunnel thread (tunnel/mod.rs `Command`, the migration part).
enum Command {
    Datagrams {
        peer: PeerRef,
        datagrams: Vec<Vec<u8>>,
    },
    Captured {
        migration: MigrationId,
        results: Vec<(u64, CaptureResult)>,
    },
    Restored {
        peer: PeerRef,
        migration: MigrationId,
        results: Vec<(u64, RestoreResult)>,
    },
    MoveDone {
        migration: MigrationId,
        flow: u64,
        moved: bool,
    },
}

/// What the glue did, for the checks.
#[derive(Clone, Debug, PartialEq)]
enum Record {
    /// Source: a flow's outcome (`Moved`, `Refused` or `Thaw`).
    Resolved(MigrationId, u64, FlowOutcome),
    /// Source: the migration ended.
    Finished(MigrationReport<PeerId>),
    /// Source worker: a `Moved` or `Thaw` carried out.
    MoveDone(MigrationId, u64, bool),
    /// Target: reservations released.
    Released(MigrationId, Vec<u64>),
    /// Target: restored copies discarded.
    Discarded(MigrationId, Vec<u64>),
    /// Target worker: restore results.
    Restored(MigrationId, Vec<(u64, RestoreResult)>),
}

/// An operator's request in progress (migrate.rs `Pending`).
#[derive(Default)]
struct Pending {
    unconfirmed: usize,
    report: Option<MigrationReport<PeerId>>,
}

/// One node: the worker's stack, the tunnel thread's endpoint and coordinator.
struct Node {
    alive: bool,
    /// The stack's clock runs this far ahead of virtual time (nodes' clocks differ).
    clock_offset: u64,
    stack: Stack,
    budget: ConnectionBudget,
    ep: Endpoint,
    addr: SocketAddr,
    /// The other node, as this endpoint's peer.
    peer: PeerId,
    source: Source<PeerId>,
    target: Target<PeerId>,
    /// migrate.rs `Coordinator::outbox`.
    outbox: VecDeque<(PeerId, Vec<u8>)>,
    /// Gathered restore results (migrate.rs `Coordinator::restores`, one worker).
    restores: HashMap<(PeerId, MigrationId), Vec<(u64, RestoreResult)>>,
    /// Capture failures found before asking the worker (migrate.rs `Coordinator::captures`).
    captures: HashMap<MigrationId, Vec<(u64, CaptureResult)>>,
    pending: HashMap<MigrationId, Pending>,
    /// Answered operator requests.
    answers: HashMap<MigrationId, MigrationReport<PeerId>>,
    inbox: VecDeque<WorkerMsg>,
    commands: VecDeque<Command>,
    /// Packets the worker wrote to its TUN device this turn.
    tun_out: Vec<Vec<u8>>,
    log: Vec<Record>,
    /// Tunnel input refused (tunnel/mod.rs `refused_total`).
    refused: u64,
    /// Forwarded datagrams the endpoint would not take (tunnel/mod.rs `forward_dropped`).
    forward_dropped: u64,
    /// The crash hook: when this node reaches the moment, the victim dies (`true`: this node).
    hook: Option<(Moment, bool)>,
    /// The hook fired for the other node.
    kill_other: bool,
    /// A `Queued` or `Sent` hook's message was queued: it fires before or after the
    /// endpoint's next transmission.
    sent_armed: bool,
    segment_buf: Vec<u8>,
}

/// A node's secret: distinct per node, as the daemon draws its own.
fn secret(seed: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..].copy_from_slice(&seed.rotate_left(29).to_le_bytes());
    s
}

fn node_stack(seed: u64, now: SInstant, budget: ConnectionBudget) -> Stack {
    let service = |port, app, bytes| ServiceConfig::new(port, app, AppConfig { bytes });
    Stack::new(
        StackConfig {
            frozen_queue_packets: 4096,
            frozen_total_bytes: 64 << 20,
            max_half_open: 64,
            seed,
            ..StackConfig::new(
                vec![Ipv4Cidr {
                    addr: SERVICE,
                    prefix_len: 32,
                }],
                vec![
                    service(7, AppKind::Echo, None),
                    service(19, AppKind::Source, Some(DOWNLOAD as u64)),
                    service(20, AppKind::Source, Some(SMALL_DOWNLOAD as u64)),
                ],
                secret(seed),
            )
        },
        budget,
        now,
    )
}

/// tunnel/mod.rs `sync_now`.
fn sync_now(now: TInstant) -> flowshift_statesync::Instant {
    flowshift_statesync::Instant::from_micros(now.as_micros())
}

/// migrate.rs `worker_of`.
fn worker_of(id: u64) -> usize {
    (id >> 48) as usize
}

/// node.rs `refuse_reason`.
fn refuse_reason(e: &RestoreError) -> RefuseReason {
    match e {
        RestoreError::Duplicate(..) => RefuseReason::Duplicate,
        RestoreError::NotOurAddress(_) => RefuseReason::Malformed,
        RestoreError::Shutdown => RefuseReason::Shutdown,
        RestoreError::Capacity => RefuseReason::Capacity,
        RestoreError::BufferTooLarge { .. } => RefuseReason::BufferMismatch,
        RestoreError::WindowScaleMismatch { .. } => RefuseReason::WindowScaleMismatch,
        RestoreError::UnknownApp(_) => RefuseReason::UnknownApp,
        RestoreError::AppVersion(_) => RefuseReason::AppVersion,
        RestoreError::App(_) | RestoreError::Handshake(_) => RefuseReason::RestoreFailed,
    }
}

impl Node {
    fn snow(&self, now: u64) -> SInstant {
        SInstant::from_micros((now + self.clock_offset) as i64)
    }

    fn own_key(&self) -> [u8; 32] {
        *self.ep.public_key().as_bytes()
    }

    /// Fires the hook if this is its moment; true if this node just died.
    fn hook(&mut self, moment: Moment) -> bool {
        match self.hook {
            Some((m, me)) if m == moment => {
                self.hook = None;
                if me {
                    self.alive = false;
                } else {
                    self.kill_other = true;
                }
                me
            }
            _ => false,
        }
    }

    // ---------------------------------------------------------------- tunnel thread

    /// One turn of the tunnel thread (tunnel/mod.rs `Driver::run`): worker commands, the
    /// endpoint's timer and events, the machines.
    fn tunnel_turn(&mut self, now: TInstant) {
        while let Some(cmd) = self.commands.pop_front() {
            self.command(now, cmd);
        }
        if self.ep.poll_timeout().is_some_and(|t| t <= now) {
            self.ep.handle_timeout(now);
        }
        self.events(now);
        if self.alive {
            self.migration_poll(now);
        }
    }

    /// tunnel/mod.rs `Driver::command`, the migration part.
    fn command(&mut self, now: TInstant, cmd: Command) {
        match cmd {
            Command::Datagrams { peer, datagrams } => self.send_datagrams(peer, datagrams),
            Command::Captured { migration, results } => {
                self.migration_captured(now, migration, results)
            }
            Command::Restored {
                peer,
                migration,
                results,
            } => {
                let id = self.ep.peers().find(|p| p.as_u32() == peer.0);
                if let Some(id) = id {
                    self.migration_restored(now, id, migration, results);
                }
            }
            Command::MoveDone {
                migration,
                flow,
                moved,
            } => self.migration_move_done(migration, flow, moved),
        }
    }

    /// tunnel/mod.rs `Driver::send_datagrams`.
    fn send_datagrams(&mut self, peer: PeerRef, datagrams: Vec<Vec<u8>>) {
        let Some(id) = self.ep.peers().find(|p| p.as_u32() == peer.0) else {
            self.forward_dropped += datagrams.len() as u64;
            return;
        };
        for d in datagrams {
            if self.ep.send_datagram(id, &d).is_err() {
                self.forward_dropped += 1;
            }
        }
    }

    /// tunnel/mod.rs `Driver::events`, what migrations need of it.
    fn events(&mut self, now: TInstant) {
        while let Some(e) = self.ep.poll_event() {
            match e {
                Event::Message { peer, data } => self.dispatch_message(now, peer, &data),
                Event::PeerRestarted { peer } => self.migration_peer_restarted(now, peer),
                _ => {}
            }
            if !self.alive {
                return;
            }
        }
    }

    /// tunnel/mod.rs `Driver::dispatch_datagram`.
    fn dispatch_datagram(&mut self, peer: PeerId, data: &[u8]) {
        let Ok((envelope, payload)) = EnvelopeRepr::split(data) else {
            self.refused += 1;
            return;
        };
        let kind = match envelope.kind {
            EnvelopeKind::ToOwner => ForwardKind::ToOwner,
            EnvelopeKind::ToIngress => ForwardKind::ToIngress,
            _ => {
                self.refused += 1;
                return;
            }
        };
        if worker_of(envelope.flow_id) != 0 {
            self.refused += 1;
            return;
        }
        self.inbox.push_back(WorkerMsg::Tunnel(TunnelPacket {
            kind,
            from: PeerRef(peer.as_u32()),
            flow: envelope.flow_id,
            packet: payload.to_vec(),
        }));
    }

    /// tunnel/mod.rs `Driver::dispatch_message`.
    fn dispatch_message(&mut self, now: TInstant, peer: PeerId, data: &[u8]) {
        match EnvelopeRepr::split(data) {
            Ok((e, payload)) if e.kind == EnvelopeKind::Migration => {
                self.migration_message(now, peer, payload)
            }
            _ => self.refused += 1,
        }
    }

    /// node.rs `Node::migrate` (the worker's offers) and migrate.rs
    /// `Driver::migration_start`; the migration's id, or `None` if no flow could go.
    fn migrate(&mut self, now: TInstant, ids: &[u64]) -> Option<MigrationId> {
        let peer_id = self.peer;
        let peer_ref = PeerRef(peer_id.as_u32());
        let mut go = Vec::new();
        for &id in ids {
            match self.stack.offer(id) {
                // A flow whose packets enter at a third node cannot move on yet.
                Ok((_, Some(r))) if r.peer != peer_ref => {}
                Ok((offer, _)) => go.push(offer),
                Err(_) => {}
            }
        }
        if go.is_empty() {
            return None;
        }
        let migration = self.source.start(sync_now(now), peer_id, go).ok()?;
        self.pending.insert(migration, Pending::default());
        self.migration_poll(now);
        Some(migration)
    }

    /// migrate.rs `Driver::migration_message`.
    fn migration_message(&mut self, now: TInstant, peer: PeerId, payload: &[u8]) {
        let Ok(msg) = Message::decode(payload) else {
            self.refused += 1;
            return;
        };
        if self.hook(Moment::Received(kind(&msg))) {
            return;
        }
        let now_s = sync_now(now);
        match msg.recipient() {
            Recipient::Source => self.source.handle_message(now_s, peer, msg),
            Recipient::Target => self.target.handle_message(now_s, peer, msg),
            // Two nodes: no flow's packets enter at a third one.
            Recipient::Ingress => self.refused += 1,
        }
        self.migration_poll(now);
    }

    /// migrate.rs `Driver::migration_peer_restarted`.
    fn migration_peer_restarted(&mut self, now: TInstant, peer: PeerId) {
        self.source.peer_restarted(sync_now(now), peer);
        self.target.peer_restarted(sync_now(now), peer);
        self.migration_poll(now);
    }

    /// migrate.rs `Driver::migration_poll`.
    fn migration_poll(&mut self, now: TInstant) {
        let now_s = sync_now(now);
        self.source.handle_timeout(now_s);
        self.target.handle_timeout(now_s);
        loop {
            let mut busy = false;
            while let Some(a) = self.source.poll_action() {
                busy = true;
                self.source_action(now, a);
            }
            while let Some(a) = self.target.poll_action() {
                busy = true;
                self.target_action(now, a);
            }
            if !busy || !self.alive {
                break;
            }
        }
        while let Some((peer, msg)) = self.source.poll_transmit() {
            self.queue_migration_message(peer, &msg);
        }
        while let Some((peer, msg)) = self.target.poll_transmit() {
            self.queue_migration_message(peer, &msg);
        }
        // migrate.rs `flush_migration_outbox`.
        while let Some((peer, bytes)) = self.outbox.front() {
            if let Err(flowshift_tunnel::SendError::BufferFull) = self.ep.send_message(*peer, bytes)
            {
                return;
            }
            self.outbox.pop_front();
        }
    }

    /// migrate.rs `Driver::queue_migration_message`.
    fn queue_migration_message(&mut self, peer: PeerId, msg: &Message) {
        let k = kind(msg);
        if self
            .hook
            .is_some_and(|(m, _)| m == Moment::Sent(k) || m == Moment::Queued(k))
        {
            self.sent_armed = true;
        }
        let mut bytes = Vec::with_capacity(EnvelopeRepr::HEADER_LEN + msg.encoded_len());
        bytes.extend_from_slice(&EnvelopeRepr::MIGRATION.to_header());
        msg.encode(&mut bytes);
        self.outbox.push_back((peer, bytes));
    }

    /// migrate.rs `Driver::source_action`.
    fn source_action(&mut self, now: TInstant, action: SourceAction<PeerId>) {
        match action {
            SourceAction::Capture {
                migration,
                flows,
                peer,
            } => {
                let to = PeerRef(peer.as_u32());
                let (mine, missing): (Vec<u64>, Vec<u64>) =
                    flows.into_iter().partition(|f| worker_of(*f) == 0);
                let missing = missing
                    .into_iter()
                    .map(|f| (f, Err(RefuseReason::CaptureFailed)))
                    .collect();
                self.captures.insert(migration, missing);
                if mine.is_empty() {
                    self.migration_captured(now, migration, Vec::new());
                } else {
                    self.inbox.push_back(WorkerMsg::Capture {
                        migration,
                        to,
                        flows: mine,
                    });
                }
            }
            SourceAction::Moved {
                migration,
                flow,
                peer,
                target_flow,
            } => {
                self.log.push(Record::Resolved(
                    migration,
                    flow,
                    FlowOutcome::Moved { target_flow },
                ));
                let to = Remote {
                    peer: PeerRef(peer.as_u32()),
                    flow: target_flow,
                };
                self.send_to_worker(
                    migration,
                    WorkerMsg::Complete {
                        migration,
                        flow,
                        to,
                    },
                );
            }
            SourceAction::Thaw {
                migration,
                flow,
                reason,
            } => {
                self.log.push(Record::Resolved(
                    migration,
                    flow,
                    FlowOutcome::Thawed(reason),
                ));
                self.send_to_worker(migration, WorkerMsg::ThawMoved { migration, flow });
            }
            SourceAction::Refused {
                migration,
                flow,
                reason,
            } => {
                self.log.push(Record::Resolved(
                    migration,
                    flow,
                    FlowOutcome::Refused(reason),
                ));
            }
            SourceAction::Finished { migration, report } => {
                self.log.push(Record::Finished(report.clone()));
                if let Some(p) = self.pending.get_mut(&migration) {
                    p.report = Some(report);
                }
                self.maybe_answer(migration);
            }
        }
    }

    /// migrate.rs `Driver::send_to_worker`.
    fn send_to_worker(&mut self, migration: MigrationId, msg: WorkerMsg) {
        self.inbox.push_back(msg);
        if let Some(p) = self.pending.get_mut(&migration) {
            p.unconfirmed += 1;
        }
    }

    /// migrate.rs `Driver::migration_captured`.
    fn migration_captured(
        &mut self,
        now: TInstant,
        migration: MigrationId,
        results: Vec<(u64, CaptureResult)>,
    ) {
        let Some(mut all) = self.captures.remove(&migration) else {
            return;
        };
        all.extend(results);
        let mut snapshots = Vec::new();
        let mut failed = Vec::new();
        for (flow, r) in all {
            match r {
                Ok((mut snap, ingress)) => {
                    snap.ingress.node_key = match ingress {
                        None => self.own_key(),
                        Some(r) => self
                            .ep
                            .peers()
                            .find(|p| p.as_u32() == r.peer.0)
                            .and_then(|p| self.ep.peer_public_key(p))
                            .map_or([0; 32], |k| *k.as_bytes()),
                    };
                    snapshots.push((flow, snap));
                }
                Err(reason) => failed.push((flow, reason)),
            }
        }
        self.source
            .captured(sync_now(now), migration, snapshots, failed);
        self.migration_poll(now);
    }

    /// migrate.rs `Driver::migration_move_done`.
    fn migration_move_done(&mut self, migration: MigrationId, flow: u64, moved: bool) {
        self.log.push(Record::MoveDone(migration, flow, moved));
        if let Some(p) = self.pending.get_mut(&migration) {
            p.unconfirmed = p.unconfirmed.saturating_sub(1);
        }
        self.maybe_answer(migration);
    }

    /// migrate.rs `Driver::maybe_answer`.
    fn maybe_answer(&mut self, migration: MigrationId) {
        let done = self
            .pending
            .get(&migration)
            .is_some_and(|p| p.report.is_some() && p.unconfirmed == 0);
        if done && let Some(Pending { report, .. }) = self.pending.remove(&migration) {
            self.answers.insert(migration, report.expect("checked"));
        }
    }

    /// migrate.rs `Driver::target_action`.
    fn target_action(&mut self, now: TInstant, action: TargetAction<PeerId>) {
        match action {
            TargetAction::Admit {
                peer,
                migration,
                offers,
            } => {
                let verdicts = self.admit(&offers);
                self.target
                    .admitted(sync_now(now), peer, migration, verdicts);
            }
            TargetAction::Restore {
                peer,
                migration,
                snapshots,
            } => self.restore(now, peer, migration, snapshots),
            TargetAction::Release {
                migration, flows, ..
            } => self.log.push(Record::Released(migration, flows)),
            TargetAction::Discard {
                migration, flows, ..
            } => {
                self.log.push(Record::Discarded(migration, flows.clone()));
                let mine = flows.into_iter().filter(|f| worker_of(*f) == 0).collect();
                self.inbox.push_back(WorkerMsg::Discard(mine));
            }
        }
    }

    /// migrate.rs `Driver::admit` (the node accepts connections).
    fn admit(&self, offers: &[ConnOffer]) -> Vec<(u64, Verdict)> {
        let mut free = self.budget.max().saturating_sub(self.budget.open());
        offers
            .iter()
            .map(|o| {
                let refuse = |r| (o.flow, Verdict::Refused(r));
                if *o.service.ip() != SERVICE {
                    return refuse(RefuseReason::Malformed);
                }
                if AppKind::from_code(o.app_kind).is_none() {
                    return refuse(RefuseReason::UnknownApp);
                }
                if o.app_version != app::SNAPSHOT_VERSION {
                    return refuse(RefuseReason::AppVersion);
                }
                let (rx, tx) = (o.rx_capacity as usize, o.tx_capacity as usize);
                if rx > MAX_RESTORED_BUFFER || tx > MAX_RESTORED_BUFFER || rx == 0 || tx == 0 {
                    return refuse(RefuseReason::BufferMismatch);
                }
                if o.our_wscale != 0 && window_shift(rx) != o.our_wscale {
                    return refuse(RefuseReason::WindowScaleMismatch);
                }
                if free == 0 {
                    return refuse(RefuseReason::Capacity);
                }
                free -= 1;
                (o.flow, Verdict::Accepted)
            })
            .collect()
    }

    /// migrate.rs `Driver::restore` (one worker).
    fn restore(
        &mut self,
        now: TInstant,
        peer: PeerId,
        migration: MigrationId,
        snapshots: Vec<(u64, ConnSnapshot)>,
    ) {
        let own = self.own_key();
        let source_key = self.ep.peer_public_key(peer).map(|k| *k.as_bytes());
        let mut items = Vec::new();
        let mut results = Vec::new();
        for (flow, snap) in snapshots {
            let (worker, ingress) = if snap.ingress.node_key == own {
                (worker_of(snap.ingress.flow_id), None)
            } else if Some(snap.ingress.node_key) == source_key {
                let ingress = Remote {
                    peer: PeerRef(peer.as_u32()),
                    flow: snap.ingress.flow_id,
                };
                (0, Some(ingress))
            } else {
                results.push((flow, Err(RefuseReason::RestoreFailed)));
                continue;
            };
            if worker == 0 {
                items.push((flow, snap, ingress));
            } else {
                results.push((flow, Err(RefuseReason::Malformed)));
            }
        }
        self.restores.insert((peer, migration), results);
        if items.is_empty() {
            self.migration_restored(now, peer, migration, Vec::new());
        } else {
            self.inbox.push_back(WorkerMsg::Restore {
                peer: PeerRef(peer.as_u32()),
                migration,
                items,
                mss_clamp: self.mss_clamp(),
                max_buffer: MAX_RESTORED_BUFFER,
            });
        }
    }

    /// migrate.rs `Driver::mss_clamp`.
    fn mss_clamp(&self) -> u16 {
        let room = self
            .ep
            .max_datagram_payload()
            .saturating_sub(EnvelopeRepr::HEADER_LEN + 20 + 20 + 12);
        room.clamp(536, usize::from(u16::MAX)) as u16
    }

    /// migrate.rs `Driver::migration_restored`.
    fn migration_restored(
        &mut self,
        now: TInstant,
        peer: PeerId,
        migration: MigrationId,
        results: Vec<(u64, RestoreResult)>,
    ) {
        let Some(mut all) = self.restores.remove(&(peer, migration)) else {
            return;
        };
        all.extend(results);
        self.target.restored(sync_now(now), peer, migration, all);
        self.migration_poll(now);
    }

    // ---------------------------------------------------------------- worker

    /// One turn of the worker (node.rs `Worker::run`): its inbox, then the stack.
    fn worker_turn(&mut self, now: SInstant) {
        while let Some(msg) = self.inbox.pop_front() {
            self.worker_msg(now, msg);
            if !self.alive {
                return;
            }
        }
        self.stack.poll(now);
        self.flush();
    }

    /// node.rs `Worker::run`, the migration messages.
    fn worker_msg(&mut self, now: SInstant, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Tunnel(p) => self.tunnel_packet(now, p),
            WorkerMsg::Capture {
                migration,
                to,
                flows,
            } => self.capture(now, migration, to, flows),
            WorkerMsg::Complete {
                migration,
                flow,
                to,
            } => {
                let moved = match self.stack.complete_move(now, flow, to) {
                    Ok(early) => {
                        self.tun_out.extend(early);
                        true
                    }
                    Err(_) => false,
                };
                self.commands.push_back(Command::MoveDone {
                    migration,
                    flow,
                    moved,
                });
            }
            WorkerMsg::ThawMoved { migration, flow } => {
                let _ = self.stack.thaw(now, flow);
                self.commands.push_back(Command::MoveDone {
                    migration,
                    flow,
                    moved: false,
                });
            }
            WorkerMsg::Restore {
                peer,
                migration,
                items,
                mss_clamp,
                max_buffer,
            } => {
                let results: Vec<_> = items
                    .into_iter()
                    .map(|(flow, snap, ingress)| {
                        let params = RestoreParams {
                            mss_clamp,
                            ingress,
                            max_buffer,
                            direct_return: false,
                            source: Some(peer),
                            path_rtt: None,
                        };
                        let r = self.stack.restore(now, &snap, params);
                        (flow, r.map_err(|e| refuse_reason(&e)))
                    })
                    .collect();
                self.log.push(Record::Restored(migration, results.clone()));
                if self.hook(Moment::Restored) {
                    return;
                }
                self.commands.push_back(Command::Restored {
                    peer,
                    migration,
                    results,
                });
            }
            WorkerMsg::Discard(flows) => {
                for f in flows {
                    let _ = self.stack.discard(now, f);
                }
            }
        }
    }

    /// node.rs `Worker::capture`.
    fn capture(&mut self, now: SInstant, migration: MigrationId, to: PeerRef, flows: Vec<u64>) {
        self.flush();
        let mut results = Vec::with_capacity(flows.len());
        for id in flows {
            let r = match self.stack.freeze_for_move(now, id, to) {
                Err(_) => Err(RefuseReason::CaptureFailed),
                Ok(()) => match self.stack.capture(id) {
                    Ok(c) => Ok((c.snapshot, c.ingress)),
                    Err(_) => {
                        let _ = self.stack.thaw(now, id);
                        Err(RefuseReason::CaptureFailed)
                    }
                },
            };
            results.push((id, r));
        }
        self.commands
            .push_back(Command::Captured { migration, results });
    }

    /// node.rs `Worker::tunnel_packets`.
    fn tunnel_packet(&mut self, now: SInstant, p: TunnelPacket) {
        match p.kind {
            ForwardKind::ToOwner => {
                self.stack
                    .handle_forwarded(now, p.from, p.flow, &mut p.packet.clone())
            }
            ForwardKind::ToIngress => {
                if self.stack.handle_from_owner(now, p.from, p.flow, &p.packet) {
                    self.tun_out.push(p.packet);
                }
            }
        }
    }

    /// node.rs `Worker::flush`: the TUN device, then the tunnel (`flush_forward`).
    fn flush(&mut self) {
        let tun = &mut self.tun_out;
        self.stack.drain_transmit(|p| tun.push(p.to_vec()));
        if self.stack.forward_len() == 0 {
            return;
        }
        let room = self.ep.max_datagram_payload().saturating_sub(HEADER_LEN);
        let mut batches: Vec<(PeerRef, Vec<Vec<u8>>)> = Vec::new();
        let scratch = &mut self.segment_buf;
        self.stack.drain_forward(|f| {
            let kind = match f.kind {
                ForwardKind::ToOwner => EnvelopeKind::ToOwner,
                ForwardKind::ToIngress => EnvelopeKind::ToIngress,
            };
            let header = EnvelopeRepr {
                kind,
                flow_id: f.to.flow,
            }
            .to_header();
            let i = match batches.iter().position(|(p, _)| *p == f.to.peer) {
                Some(i) => i,
                None => {
                    batches.push((f.to.peer, Vec::new()));
                    batches.len() - 1
                }
            };
            let batch = &mut batches[i].1;
            segment(f.packet, room, scratch, |seg| {
                let mut d = header.to_vec();
                d.extend_from_slice(seg);
                batch.push(d);
            })
            .expect("forwarded packets segment");
        });
        for (peer, datagrams) in batches {
            self.commands
                .push_back(Command::Datagrams { peer, datagrams });
        }
    }
}

// ------------------------------------------------------------------------------ cluster

/// Where a connection lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lives {
    /// On A, where its packets enter.
    A,
    /// On B, its packets forwarded by A.
    B,
    /// Nowhere alive.
    Gone,
}

struct Cluster {
    /// Virtual time, microseconds.
    now: u64,
    nodes: [Node; 2],
    client: Client,
    client_link: Link,
    /// A → B and B → A.
    tunnel_links: [Link; 2],
    rng: ChaCha8Rng,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// Packets B wrote to its TUN device, which reaches no client.
    lost_tun: usize,
    /// Packets and datagrams the links lost.
    lost: usize,
    scratch: Vec<u8>,
}

const ADDR_A: &str = "198.18.2.2:51820";
const ADDR_B: &str = "198.18.3.2:51820";

impl Cluster {
    fn new(seed: u64, client_link: Link, tunnel_link: Link) -> Cluster {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seed32 = || {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            s
        };
        let (seed_a, seed_b) = (seed32(), seed32());
        let ka = Keypair::generate(&mut rng);
        let kb = Keypair::generate(&mut rng);
        let kc = Keypair::generate(&mut rng);
        let t0 = TInstant::from_micros(0);
        let addr_a: SocketAddr = ADDR_A.parse().unwrap();
        let addr_b: SocketAddr = ADDR_B.parse().unwrap();
        let mut ea = Endpoint::new(TunnelConfig::default(), ka.clone(), seed_a, t0);
        let mut eb = Endpoint::new(TunnelConfig::default(), kb.clone(), seed_b, t0);
        let peer_a = ea
            .add_peer(PeerConfig::new(*kb.public(), Some(addr_b)), t0)
            .unwrap();
        // A third peer that never speaks, so that the two nodes number each other differently.
        eb.add_peer(PeerConfig::new(*kc.public(), None), t0)
            .unwrap();
        let peer_b = eb
            .add_peer(PeerConfig::new(*ka.public(), Some(addr_a)), t0)
            .unwrap();
        assert_ne!(peer_a, peer_b);
        let node = |ep, addr, peer, clock_offset: u64, stack_seed, first_id| {
            let budget = ConnectionBudget::new(1000);
            Node {
                alive: true,
                clock_offset,
                stack: node_stack(
                    stack_seed,
                    SInstant::from_micros(clock_offset as i64),
                    budget.clone(),
                ),
                budget,
                ep,
                addr,
                peer,
                source: Source::new(ProtocolConfig::default(), first_id),
                target: Target::new(ProtocolConfig::default()),
                outbox: VecDeque::new(),
                restores: HashMap::new(),
                captures: HashMap::new(),
                pending: HashMap::new(),
                answers: HashMap::new(),
                inbox: VecDeque::new(),
                commands: VecDeque::new(),
                tun_out: Vec::new(),
                log: Vec::new(),
                refused: 0,
                forward_dropped: 0,
                hook: None,
                kill_other: false,
                sent_armed: false,
                segment_buf: Vec::new(),
            }
        };
        let mut c = Cluster {
            now: 0,
            nodes: [
                // Different stack seeds (ISNs) and clocks: the restored socket's numbers
                // differ from the original's.
                node(ea, addr_a, peer_a, 5 * SEC, seed ^ 7, 1_000),
                node(eb, addr_b, peer_b, 7_777 * SEC, seed ^ 99, 50_000),
            ],
            client: Client::new(SInstant::from_micros(0)),
            client_link,
            tunnel_links: [tunnel_link; 2],
            rng,
            wire: BinaryHeap::new(),
            seq: 0,
            lost_tun: 0,
            lost: 0,
            scratch: vec![0; 2048],
        };
        let connected = |c: &mut Cluster| {
            c.nodes
                .iter()
                .all(|n| n.ep.peer_stats(n.peer).is_some_and(|s| s.has_session))
        };
        c.run_until(10 * SEC, connected);
        c
    }

    fn tnow(&self) -> TInstant {
        TInstant::from_micros(self.now)
    }

    fn cnow(&self) -> SInstant {
        SInstant::from_micros(self.now as i64)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    /// Puts `data` on the link towards `to`, impaired as that link is.
    fn send(&mut self, to: To, data: Vec<u8>) {
        let link = match to {
            To::Client | To::Tun(_) => self.client_link,
            To::Udp(i) => self.tunnel_links[1 - i],
        };
        if self.chance(link.loss) {
            self.lost += 1;
            return;
        }
        let copies = if self.chance(link.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut at = self.now + link.delay;
            if link.jitter > 0 {
                at += self.rng.next_u64() % link.jitter;
            }
            if self.chance(link.reorder) {
                at += MS + self.rng.next_u64() % (20 * MS);
            }
            self.seq += 1;
            self.wire.push(Reverse(InFlight {
                at,
                seq: self.seq,
                to,
                data: data.clone(),
            }));
        }
    }

    /// Kills node `i`: it does nothing more, and what reaches it is lost.
    fn crash(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Kills `victim` when node `at` reaches `moment` of the protocol.
    fn crash_when(&mut self, victim: usize, at: usize, moment: Moment) {
        self.nodes[at].hook = Some((moment, victim == at));
    }

    /// The earliest deadline of anything.
    fn next_event(&mut self) -> u64 {
        let mut next = self.wire.peek().map_or(u64::MAX, |p| p.0.at);
        let now = self.now;
        for n in self.nodes.iter_mut().filter(|n| n.alive) {
            let snow = n.snow(now);
            let stack_at = n.stack.poll_at(snow).total_micros() as u64 - n.clock_offset;
            let timers = [
                n.ep.poll_timeout().map(|t| t.as_micros()),
                n.source.poll_timeout().map(|t| t.as_micros()),
                n.target.poll_timeout().map(|t| t.as_micros()),
            ];
            next = timers
                .into_iter()
                .flatten()
                .fold(next.min(stack_at), u64::min);
        }
        if let Some(t) = self.client.iface.poll_at(self.cnow(), &self.client.sockets) {
            next = next.min(t.total_micros().max(0) as u64);
        }
        next.max(now)
    }

    /// Everything the endpoints have to send goes on the wire; `Queued` hooks fire before,
    /// `Sent` hooks after.
    fn transmit(&mut self) {
        let now = self.tnow();
        for i in [A, B] {
            let armed = std::mem::take(&mut self.nodes[i].sent_armed);
            let fire = |c: &mut Cluster, sent: bool| {
                if let Some((m, me)) = c.nodes[i].hook
                    && armed
                    && matches!(m, Moment::Sent(_)) == sent
                {
                    c.nodes[i].hook = None;
                    c.crash(if me { i } else { 1 - i });
                }
            };
            fire(self, false);
            if !self.nodes[i].alive {
                continue;
            }
            while let Some(t) = self.nodes[i].ep.poll_transmit(now, &mut self.scratch) {
                assert_eq!(t.destination, self.nodes[1 - i].addr);
                let data = self.scratch[..t.size].to_vec();
                self.send(To::Udp(1 - i), data);
            }
            fire(self, true);
        }
    }

    /// Advances to the next event and handles everything due then.
    fn step(&mut self) {
        self.transmit();
        self.now = self.next_event();
        let (now, tnow) = (self.now, self.tnow());
        CLIENT_MS.with(|c| c.set((now / MS) as u32));
        while self.wire.peek().is_some_and(|p| p.0.at <= now) {
            let Reverse(mut p) = self.wire.pop().expect("peeked");
            match p.to {
                To::Client => {
                    self.client.rsts += usize::from(is_rst(&p.data));
                    self.client.pipe.rx.push_back(p.data);
                }
                To::Tun(i) if self.nodes[i].alive => {
                    let n = &mut self.nodes[i];
                    n.stack.handle_packet(n.snow(now), &mut p.data.clone());
                }
                To::Udp(i) if self.nodes[i].alive => {
                    let from = self.nodes[1 - i].addr;
                    let n = &mut self.nodes[i];
                    if let Some(r) = n.ep.handle_datagram(tnow, from, &mut p.data) {
                        for d in r.datagrams() {
                            n.dispatch_datagram(r.peer, d);
                        }
                    }
                }
                To::Tun(_) | To::Udp(_) => {}
            }
        }
        for i in [A, B] {
            self.settle(i);
        }
        let cnow = self.cnow();
        let c = &mut self.client;
        c.iface.poll(cnow, &mut c.pipe, &mut c.sockets);
        while let Some(p) = self.client.pipe.tx.pop_front() {
            self.send(To::Tun(A), p);
        }
        self.transmit();
    }

    /// Runs node `i`'s tunnel thread and worker until neither has work for the other.
    fn settle(&mut self, i: usize) {
        let (tnow, snow) = (self.tnow(), self.nodes[i].snow(self.now));
        for _ in 0..100 {
            let n = &mut self.nodes[i];
            if n.alive {
                n.tunnel_turn(tnow);
            }
            if n.alive {
                n.worker_turn(snow);
            }
            if std::mem::take(&mut n.kill_other) {
                self.crash(1 - i);
            }
            let n = &mut self.nodes[i];
            let out = if n.alive {
                std::mem::take(&mut n.tun_out)
            } else {
                Vec::new()
            };
            for p in out {
                if i == A {
                    self.send(To::Client, p);
                } else {
                    self.lost_tun += 1;
                }
            }
            let n = &self.nodes[i];
            if !n.alive || n.commands.is_empty() && n.inbox.is_empty() {
                return;
            }
        }
        panic!("node {i} does not settle");
    }

    /// Steps until `done` or until `limit` microseconds passed; returns whether `done`.
    fn run_until(&mut self, limit: u64, mut done: impl FnMut(&mut Cluster) -> bool) -> bool {
        let deadline = self.now + limit;
        let (mut last, mut same) = (self.now, 0);
        while self.now < deadline {
            if done(self) {
                return true;
            }
            self.step();
            if self.now == last {
                same += 1;
                assert!(same < 10_000, "busy loop at {} us", self.now);
            } else {
                (last, same) = (self.now, 0);
            }
        }
        done(self)
    }

    /// Runs until `done`, which must happen within `limit` microseconds.
    fn expect(&mut self, limit: u64, what: &str, done: impl FnMut(&mut Cluster) -> bool) {
        assert!(self.run_until(limit, done), "{what}: not within {limit} us");
    }

    /// Starts moving flows `ids` from node `from` to the other node.
    fn migrate(&mut self, from: usize, ids: &[u64]) -> MigrationId {
        let now = self.tnow();
        self.nodes[from]
            .migrate(now, ids)
            .expect("a migration starts")
    }

    /// Waits for the operator's answer to `migration` at node `from`.
    /// The protocol's own timers end every migration within this (the node's operator
    /// request waits as long, `MIGRATE_WAIT`).
    fn answer(&mut self, from: usize, migration: MigrationId) -> MigrationReport<PeerId> {
        self.expect(30 * SEC, "migration answered", |c| {
            c.nodes[from].answers.contains_key(&migration)
        });
        self.nodes[from].answers[&migration].clone()
    }

    /// Moves flow `id` from `from` to the other node and waits for the outcome.
    fn move_one(&mut self, from: usize, id: u64) -> FlowOutcome {
        let m = self.migrate(from, &[id]);
        let report = self.answer(from, m);
        assert_eq!(report.outcomes.len(), 1, "{report}");
        self.check_resolved(from, m, &[id]);
        report.outcomes[0].1
    }

    /// Each of `flows` was resolved exactly once in `migration` at `node`, the migration
    /// finished once, and each Moved or Thaw was carried out once by the worker.
    fn check_resolved(&self, node: usize, migration: MigrationId, flows: &[u64]) {
        let log = &self.nodes[node].log;
        let finished = log
            .iter()
            .filter(|r| matches!(r, Record::Finished(rep) if rep.migration == migration))
            .count();
        assert_eq!(
            finished, 1,
            "migration {migration} finished {finished} times"
        );
        for &f in flows {
            let outcomes: Vec<_> = log
                .iter()
                .filter_map(|r| match r {
                    Record::Resolved(m, flow, o) if *m == migration && *flow == f => Some(*o),
                    _ => None,
                })
                .collect();
            assert_eq!(outcomes.len(), 1, "flow {f:#x}: {outcomes:?}");
            let done: Vec<bool> = log
                .iter()
                .filter_map(|r| match r {
                    Record::MoveDone(m, flow, moved) if *m == migration && *flow == f => {
                        Some(*moved)
                    }
                    _ => None,
                })
                .collect();
            match outcomes[0] {
                FlowOutcome::Moved { .. } => assert_eq!(done, [true], "flow {f:#x}"),
                FlowOutcome::Thawed(_) => assert_eq!(done, [false], "flow {f:#x}"),
                FlowOutcome::Refused(_) => assert!(done.is_empty(), "flow {f:#x}"),
            }
        }
    }

    /// Ids of the connections that live on node `i` (not moved away, not closed).
    fn local(&self, i: usize) -> Vec<u64> {
        let now = self.nodes[i].snow(self.now);
        self.nodes[i]
            .stack
            .conns(now)
            .into_iter()
            .filter(|c| c.mode == "local")
            .map(|c| c.id)
            .collect()
    }

    fn only_local(&self, i: usize) -> u64 {
        let ids = self.local(i);
        assert_eq!(ids.len(), 1, "node {i}: {ids:?}");
        ids[0]
    }

    /// Where the connection of client port `port` lives.
    fn lives(&self, port: u16) -> Lives {
        let mode = |i: usize| {
            let n = &self.nodes[i];
            if !n.alive {
                return None;
            }
            n.stack
                .conns(n.snow(self.now))
                .into_iter()
                .find(|c| c.client.port() == port)
                .map(|c| c.mode)
        };
        match (mode(A).as_deref(), mode(B).as_deref()) {
            (Some("local"), None) => Lives::A,
            (Some("moved"), Some("local")) => Lives::B,
            (None | Some("moved"), None) => Lives::Gone,
            other => panic!("port {port}: inconsistent modes {other:?}"),
        }
    }

    fn port(&mut self, h: SocketHandle) -> u16 {
        self.client
            .sock(h)
            .local_endpoint()
            .expect("connected")
            .port
    }
}

fn is_rst(p: &[u8]) -> bool {
    let ip = Ipv4Packet::new_checked(p).unwrap();
    TcpPacket::new_checked(ip.payload()).unwrap().rst()
}

/// The counting stream of the source app, from byte `offset`.
fn counting(offset: u64, n: usize) -> Vec<u8> {
    (offset..offset + n as u64)
        .map(|i| ((i / 8) >> (8 * (i % 8))) as u8)
        .collect()
}

// ------------------------------------------------------------------------------ tests

/// Starts a 2 MB download through A and waits until the client read `before` bytes.
fn download(c: &mut Cluster, before: usize) -> (SocketHandle, Vec<u8>) {
    let h = c.client.connect(19, 1 << 20);
    let mut got = Vec::new();
    c.expect(10 * SEC, "download under way", |c| {
        c.client.read(h, &mut got, usize::MAX);
        got.len() > before
    });
    (h, got)
}

/// Reads until the server's FIN, within `limit`; returns whether it came.
fn read_to_end(c: &mut Cluster, h: SocketHandle, got: &mut Vec<u8>, limit: u64) -> bool {
    c.run_until(limit, |c| {
        c.client.read(h, got, usize::MAX);
        !c.client.sock(h).may_recv()
    })
}

/// Closes the client's side and waits until neither node holds anything of it.
fn close_and_clean_up(c: &mut Cluster, h: SocketHandle) {
    c.client.sock(h).close();
    c.expect(30 * SEC, "every node cleans up", |c| {
        c.nodes
            .iter()
            .all(|n| !n.alive || n.stack.connection_count() == 0)
    });
}

/// A download moved A → B over `tunnel`, byte-exact.
fn download_moved(seed: u64, tunnel: Link) {
    let mut c = Cluster::new(seed, Link::perfect(2), tunnel);
    let (h, mut got) = download(&mut c, 400_000);
    let port = c.port(h);
    let id = c.only_local(A);
    let outcome = c.move_one(A, id);
    assert!(
        matches!(outcome, FlowOutcome::Moved { .. }),
        "seed {seed}: {outcome}"
    );
    assert_eq!(c.lives(port), Lives::B);
    assert!(read_to_end(&mut c, h, &mut got, 600 * SEC), "seed {seed}");
    assert_eq!(got.len(), DOWNLOAD, "seed {seed}");
    assert!(got == counting(0, DOWNLOAD), "seed {seed}: counting stream");
    assert_eq!(c.client.rsts, 0, "seed {seed}");
    assert_eq!(c.lost_tun, 0, "seed {seed}: B wrote to its own TUN");
    let (a, b) = (c.nodes[A].stack.stats(), c.nodes[B].stack.stats());
    assert_eq!((a.conns_moved_out, b.conns_restored), (1, 1));
    assert!(b.forwarded_to_ingress > 100 && a.relayed_from_owner > 100);
    assert_eq!(a.tunnel_packets_refused + b.tunnel_packets_refused, 0);
    assert_eq!(c.nodes[A].refused + c.nodes[B].refused, 0);
    assert_eq!(c.nodes[A].forward_dropped + c.nodes[B].forward_dropped, 0);
    assert_eq!(c.lost > 0, tunnel.loss > 0.0);
    // Nothing left over in the machines: one migration each side, finished.
    assert_eq!(c.nodes[A].source.active_migrations(), 0);
    assert_eq!(c.nodes[B].target.active_migrations(), 0);
    close_and_clean_up(&mut c, h);
    assert_eq!(c.client.rsts, 0);
}

#[test]
fn a_download_moves_over_a_perfect_tunnel() {
    download_moved(1, Link::perfect(1));
}

#[test]
fn a_download_moves_over_a_tunnel_with_loss_duplicates_and_reordering() {
    for seed in 1..=4 {
        download_moved(seed, Link::lossy(0.1));
    }
}

/// An echo session moved A -> B -> A ... 20 times, each move over a tunnel with 10 % loss,
/// duplicates and reordering. Between moves the tunnel is clean: over a steadily lossy path,
/// echo traffic can deadlock the smoltcp client and the node's smoltcp socket, moved or not
/// (after a retransmission timeout both send pure ACKs below the other's RCV.NXT, and each
/// drops such segments whole, ACK field included).
#[test]
fn an_echo_session_moves_back_and_forth_twenty_times_over_a_lossy_tunnel() {
    for seed in 1..=3 {
        let mut c = Cluster::new(seed, Link::perfect(2), Link::perfect(1));
        let h = c.client.connect(7, 256 << 10);
        c.expect(SEC, "connected", |c| {
            c.client.sock(h).state() == tcp::State::Established
        });
        let port = c.port(h);
        let (mut on, mut id) = (A, c.only_local(A));
        let (mut offset, mut got) = (0u64, Vec::new());
        for round in 0..20 {
            // Some bytes before each move, some still in flight when it freezes.
            let chunk = counting(offset, 20_000 + round * 97);
            offset += chunk.len() as u64;
            let mut sent = 0;
            c.expect(60 * SEC, "echoed", |c| {
                let s = c.client.sock(h);
                if sent < chunk.len() && s.can_send() {
                    sent += s.send_slice(&chunk[sent..]).unwrap();
                }
                c.client.read(h, &mut got, usize::MAX);
                sent == chunk.len() && got.len() as u64 > offset - 5_000
            });
            c.tunnel_links = [Link::lossy(0.1); 2];
            let outcome = c.move_one(on, id);
            c.tunnel_links = [Link::perfect(1); 2];
            let FlowOutcome::Moved { target_flow } = outcome else {
                panic!("seed {seed} round {round}: {outcome}");
            };
            (on, id) = (1 - on, target_flow);
            assert_eq!(c.lives(port), if on == A { Lives::A } else { Lives::B });
        }
        c.expect(60 * SEC, "everything echoed", |c| {
            c.client.read(h, &mut got, usize::MAX);
            got.len() as u64 == offset
        });
        assert!(
            got == counting(0, offset as usize),
            "seed {seed}: echo mismatch"
        );
        assert_eq!(c.client.rsts, 0, "seed {seed}");
        // 20 moves end on A, where the packets enter: nothing left on B.
        assert_eq!(c.lives(port), Lives::A);
        assert_eq!(c.nodes[B].stack.connection_count(), 0);
        assert_eq!(c.nodes[A].stack.stats().conns_restored, 10);
        assert_eq!(c.nodes[B].stack.stats().conns_restored, 10);
        assert_eq!(c.lost_tun, 0);
        assert!(c.lost > 0);
        close_and_clean_up(&mut c, h);
    }
}

/// What node A's source saw of a one-flow migration whose target died at `moment`.
fn target_dies(moment: Moment) -> (Cluster, SocketHandle, Vec<u8>, FlowOutcome) {
    let mut c = Cluster::new(5, Link::perfect(2), Link::perfect(1));
    let (h, got) = download(&mut c, 400_000);
    let id = c.only_local(A);
    c.crash_when(B, B, moment);
    let outcome = c.move_one(A, id);
    assert!(!c.nodes[B].alive, "{moment:?}: the hook did not fire");
    (c, h, got, outcome)
}

/// The target dies before the source learns that it restored the flow: the source gives up
/// (no Accept, or no Commit, in time), the flow thaws on A and the download completes.
#[test]
fn the_target_dying_before_the_commit_leaves_the_download_on_a() {
    use Kind::*;
    use Moment::*;
    // The moment, what the source decides, and whether B had restored the flow.
    let cases = [
        (
            Received(Offer),
            FlowOutcome::Refused(RefuseReason::Timeout),
            false,
        ),
        (
            Sent(Accept),
            FlowOutcome::Thawed(RefuseReason::Timeout),
            false,
        ),
        (
            Received(Transfer),
            FlowOutcome::Thawed(RefuseReason::Timeout),
            false,
        ),
        (Restored, FlowOutcome::Thawed(RefuseReason::Timeout), true),
        (
            Queued(Commit),
            FlowOutcome::Thawed(RefuseReason::Timeout),
            true,
        ),
    ];
    for (moment, want, restored) in cases {
        let (mut c, h, mut got, outcome) = target_dies(moment);
        assert_eq!(outcome, want, "{moment:?}");
        assert_eq!(
            c.nodes[B].stack.stats().conns_restored,
            u64::from(restored),
            "{moment:?}"
        );
        let port = c.port(h);
        assert_eq!(c.lives(port), Lives::A, "{moment:?}");
        assert!(read_to_end(&mut c, h, &mut got, 60 * SEC), "{moment:?}");
        assert!(got == counting(0, DOWNLOAD), "{moment:?}: counting stream");
        assert_eq!(c.client.rsts, 0, "{moment:?}");
        let a = c.nodes[A].stack.stats();
        assert_eq!(a.conns_moved_out, 0, "{moment:?}");
        close_and_clean_up(&mut c, h);
    }
}

/// The target dies once its Commit is on the wire: the source moves the flow to a dead
/// node. The client stalls, and sees neither wrong bytes nor a RST.
#[test]
fn the_target_dying_after_its_commit_left_takes_the_flow_with_it() {
    let (mut c, h, mut got, outcome) = target_dies(Moment::Sent(Kind::Commit));
    assert!(matches!(outcome, FlowOutcome::Moved { .. }), "{outcome}");
    let port = c.port(h);
    assert_eq!(c.lives(port), Lives::Gone);
    c.run_until(5 * SEC, |c| {
        c.client.read(h, &mut got, usize::MAX);
        false
    });
    let stalled_at = got.len();
    c.run_until(60 * SEC, |c| {
        c.client.read(h, &mut got, usize::MAX);
        false
    });
    assert_eq!(got.len(), stalled_at, "bytes after the stall");
    assert!(got.len() < DOWNLOAD);
    assert!(got == counting(0, got.len()), "wrong bytes");
    assert_eq!(c.client.rsts, 0);
    assert_eq!(c.client.sock(h).state(), tcp::State::Established);
    assert_eq!(c.nodes[A].stack.stats().conns_moved_out, 1);
}

/// The source dies after the target accepted: the reservation expires.
#[test]
fn the_source_dying_before_its_transfer_leaves_nothing_on_the_target() {
    let mut c = Cluster::new(6, Link::perfect(2), Link::perfect(1));
    let (_h, _got) = download(&mut c, 400_000);
    let id = c.only_local(A);
    c.crash_when(A, A, Moment::Received(Kind::Accept));
    let m = c.migrate(A, &[id]);
    c.expect(SEC, "A dies", |c| !c.nodes[A].alive);
    assert_eq!(c.nodes[B].target.active_migrations(), 1);
    c.expect(10 * SEC, "the reservation expires", |c| {
        c.nodes[B].target.active_migrations() == 0
    });
    assert_eq!(c.nodes[B].log, [Record::Released(m, vec![id])]);
    assert_eq!(c.nodes[B].stack.connection_count(), 0);
    c.expect(70 * SEC, "the migration is forgotten", |c| {
        c.nodes[B].target.remembered_migrations() == 0
    });
}

/// The source dies once the target has the snapshot: the target restores the flow and
/// commits to nobody. The download's restored socket cannot reach the client any more (its
/// packets enter at A) and times out; nothing is left on B.
#[test]
fn the_source_dying_after_its_transfer_leaves_nothing_on_the_target() {
    let mut c = Cluster::new(7, Link::perfect(2), Link::perfect(1));
    let (h, mut got) = download(&mut c, 400_000);
    let id = c.only_local(A);
    c.crash_when(A, B, Moment::Received(Kind::Transfer));
    let m = c.migrate(A, &[id]);
    c.expect(SEC, "A dies", |c| !c.nodes[A].alive);
    c.expect(SEC, "B restores", |c| {
        c.nodes[B].stack.stats().conns_restored == 1
    });
    let restored = c.local(B);
    assert_eq!(restored.len(), 1);
    assert!(matches!(
        &c.nodes[B].log[..],
        [Record::Restored(mm, r)] if *mm == m && r[..] == [(id, Ok(restored[0]))]
    ));
    c.expect(300 * SEC, "B's copy times out", |c| {
        c.nodes[B].stack.connection_count() == 0
    });
    assert_eq!(c.nodes[B].stack.stats().conns_closed, 1);
    assert_eq!(c.nodes[B].budget.open(), 0);
    assert_eq!(c.nodes[B].target.active_migrations(), 0);
    // The client saw a stall, not wrong bytes.
    c.client.read(h, &mut got, usize::MAX);
    assert!(got.len() < DOWNLOAD && got == counting(0, got.len()));
    assert_eq!(c.client.rsts, 0);
}

/// 50 downloads, their windows closed by a client that stopped reading (so each snapshot
/// carries a full 256 KiB send buffer: 12.6 MB of Transfers, in messages of at most 4 MiB),
/// moved in one migration over a tunnel that loses 10 % of the datagrams, and completed
/// over it.
#[test]
fn fifty_downloads_move_in_one_migration_over_a_lossy_tunnel() {
    let tunnel = Link {
        loss: 0.1,
        ..Link::perfect(1)
    };
    let mut c = Cluster::new(8, Link::perfect(2), tunnel);
    let handles: Vec<_> = (0..50).map(|_| c.client.connect(20, 64 << 10)).collect();
    let mut got = vec![Vec::new(); handles.len()];
    c.expect(60 * SEC, "every download under way", |c| {
        for (h, g) in handles.iter().zip(&mut got) {
            c.client.read(*h, g, 30_000);
        }
        got.iter().all(|g| g.len() == 30_000)
    });
    let ids = c.local(A);
    assert_eq!(ids.len(), 50);
    let m = c.migrate(A, &ids);
    let report = c.answer(A, m);
    c.check_resolved(A, m, &ids);
    assert_eq!(report.moved, 50, "{report}");
    assert!(report.transfer_bytes > 50 * 250_000, "{report}");
    let max_message = ProtocolConfig::default().max_message_bytes;
    assert!(
        report.transfers >= report.transfer_bytes.div_ceil(max_message),
        "{report}"
    );
    assert_eq!(c.local(B).len(), 50);
    for h in &handles {
        let port = c.port(*h);
        assert_eq!(c.lives(port), Lives::B);
    }
    c.expect(600 * SEC, "every download complete", |c| {
        for (h, g) in handles.iter().zip(&mut got) {
            c.client.read(*h, g, usize::MAX);
        }
        handles.iter().all(|h| !c.client.sock(*h).may_recv())
    });
    for g in &got {
        assert!(*g == counting(0, SMALL_DOWNLOAD), "counting stream");
    }
    assert_eq!(c.client.rsts, 0);
    assert_eq!(c.lost_tun, 0);
    assert!(c.lost > 100, "{} datagrams lost", c.lost);
}

/// 50 echo sessions with bytes in flight both ways, moved in one migration while the tunnel
/// loses, duplicates and reorders datagrams, then used again.
#[test]
fn fifty_echo_sessions_move_in_one_migration_over_a_lossy_tunnel() {
    let mut c = Cluster::new(9, Link::perfect(2), Link::perfect(1));
    let handles: Vec<_> = (0..50).map(|_| c.client.connect(7, 64 << 10)).collect();
    let data: Vec<Vec<u8>> = (0..50).map(|i| counting(i * 7919, 12_000)).collect();
    let mut sent = vec![0; 50];
    let mut got = vec![Vec::new(); 50];
    // The first half of each, the move once some of it is back.
    let mut exchange = |c: &mut Cluster, upto: usize, want: usize| {
        for (i, h) in handles.iter().enumerate() {
            let s = c.client.sock(*h);
            if sent[i] < upto && s.can_send() {
                sent[i] += s.send_slice(&data[i][sent[i]..upto]).unwrap();
            }
            c.client.read(*h, &mut got[i], usize::MAX);
        }
        got.iter().all(|g| g.len() >= want)
    };
    c.expect(10 * SEC, "half echoed", |c| exchange(c, 6_000, 3_000));
    let ids = c.local(A);
    assert_eq!(ids.len(), 50);
    c.tunnel_links = [Link::lossy(0.1); 2];
    let m = c.migrate(A, &ids);
    let report = c.answer(A, m);
    c.tunnel_links = [Link::perfect(1); 2];
    c.check_resolved(A, m, &ids);
    assert_eq!(report.moved, 50, "{report}");
    assert_eq!(c.local(B).len(), 50);
    c.expect(60 * SEC, "all echoed", |c| exchange(c, 12_000, 12_000));
    for (g, d) in got.iter().zip(&data) {
        assert!(g == d, "echo mismatch");
    }
    assert_eq!(c.client.rsts, 0);
    assert_eq!(c.lost_tun, 0);
    assert!(c.lost > 0);
    for h in &handles {
        let port = c.port(*h);
        assert_eq!(c.lives(port), Lives::B);
    }
}

/// An established connection that nothing is sent on stays open: `UNACKED_TIMEOUT` is
/// about unacknowledged data (stack/mod.rs), not idleness.
#[test]
fn an_idle_connection_is_not_reset() {
    let mut c = Cluster::new(1, Link::perfect(2), Link::perfect(1));
    let h = c.client.connect(7, 64 << 10);
    let (mut sent, mut got) = (false, Vec::new());
    c.expect(SEC, "echoed", |c| {
        let s = c.client.sock(h);
        if !sent && s.can_send() {
            sent = s.send_slice(b"x").unwrap() == 1;
        }
        c.client.read(h, &mut got, usize::MAX);
        got == b"x"
    });
    // Everything acknowledged both ways; then nobody says anything for 130 s.
    c.run_until(130 * SEC, |_| false);
    assert_eq!(c.client.rsts, 0, "the node reset an idle connection");
    assert_eq!(c.client.sock(h).state(), tcp::State::Established);
    assert_eq!(c.nodes[A].stack.connection_count(), 1);
}

/// 50 downloads whose snapshots (a full 256 KiB send buffer each: ~10 MB in several
/// Transfers) cross a tunnel with 10 % loss, duplicates and reordering, moved in one
/// migration: the source's commit deadline and the target's reservations grow with the
/// transfer.
#[test]
fn fifty_busy_downloads_move_over_a_tunnel_with_loss_duplicates_and_reordering() {
    let mut c = Cluster::new(8, Link::perfect(2), Link::lossy(0.1));
    let handles: Vec<_> = (0..50).map(|_| c.client.connect(20, 64 << 10)).collect();
    let mut got = vec![Vec::new(); handles.len()];
    c.expect(60 * SEC, "every download under way", |c| {
        for (h, g) in handles.iter().zip(&mut got) {
            c.client.read(*h, g, 30_000);
        }
        got.iter().all(|g| g.len() == 30_000)
    });
    let ids = c.local(A);
    let m = c.migrate(A, &ids);
    let report = c.answer(A, m);
    assert_eq!(report.moved, 50, "{report}");
}
