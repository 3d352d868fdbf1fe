//! The tunnel driver: runs the sans-IO [`flowshift_tunnel::Endpoint`] on a UDP socket.
//!
//! Thin by design. One thread owns the endpoint and a non-blocking UDP socket, polled with mio:
//! receives go through quinn-udp (`recvmmsg`, GRO: one call may return many datagrams), and
//! consecutive transmits to one peer of one size go out as one GSO send. The thread wakes on the
//! socket, on the endpoint's timer, and on a [`mio::Waker`] for commands from the control thread.
//!
//! Every datagram and message between nodes starts with a typed, versioned
//! [`Envelope`](flowshift_statesync::envelope): forwarded packets of moved connections
//! (`ToOwner`, `ToIngress`, each naming the flow's id on the receiving node, whose top bits
//! name the worker that owns it), migration protocol messages (`Migration`) and the
//! diagnostic test stream ([`diag`], `Diagnostic`). Forwarded packets go to the owning
//! worker's queue, never to the TUN device from this thread; what workers forward arrives as
//! ready-made datagrams ([`Command::Datagrams`]).

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, unbounded};
use flowshift_tunnel::{
    Config as TunnelCoreConfig, Endpoint, Event, Instant, Keypair, LoadReport, PeerConfig, PeerId,
    Stats,
};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use serde::Serialize;

use flowshift_core::flow::PeerRef;
use flowshift_core::flow::Remote;
use flowshift_core::stack::ForwardKind;
use flowshift_statesync::envelope::{EnvelopeKind, EnvelopeRepr};
use flowshift_statesync::protocol::{ConnOffer, MigrationId};

use crate::config::TunnelConfig;
use crate::cputime::ThreadClock;
use crate::node::{WorkerHandle, WorkerMsg};

mod diag;
pub mod migrate;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Receive buffers per `recvmmsg` call, each large enough for a GRO batch.
const RX_BATCH: usize = 8;
const RX_BUF: usize = 64 * 1024;
/// `recvmmsg` calls per loop turn before timers, commands and sends get their turn (a
/// flood must not keep the loop reading forever).
const RX_CALLS_PER_TURN: usize = 32;
/// Largest GSO send: one UDP payload may not exceed 65,507 bytes.
const MAX_GSO_BYTES: usize = 60 * 1024;

/// Errors that stop the tunnel from starting.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The UDP socket could not be set up.
    #[error("tunnel socket {addr}: {source}")]
    Socket {
        /// The listen address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A peer could not be added.
    #[error("peer {name}: {reason}")]
    Peer {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Liveness of a peer as the node last heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Heartbeats arrive.
    Alive,
    /// Heartbeats stopped.
    Dead,
    /// Never heard from.
    Never,
}

/// One row of `ctl peers`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// Configured name.
    pub name: String,
    /// The tunnel's number for the peer (what connection tables refer to).
    pub id: u32,
    /// Current address.
    pub endpoint: Option<SocketAddr>,
    /// Liveness.
    pub liveness: Liveness,
    /// Seconds since the last completed handshake.
    pub handshake_age_s: Option<f64>,
    /// Smoothed RTT of the reliable channel, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Loss rate of the reliable channel: ack-eliciting packets declared lost over
    /// ack-eliciting packets sent, since start (a retransmission is a new packet; records
    /// carrying only ACKs, heartbeats or datagrams are not tracked, so not counted).
    pub loss: f64,
    /// Bytes sent to the peer (UDP payload of records and handshake messages).
    pub tx_bytes: u64,
    /// Bytes received from the peer (UDP payload of authenticated records only: garbage or
    /// forgeries sent from the peer's address are not counted).
    pub rx_bytes: u64,
    /// UDP datagrams sent to the peer (records and handshake messages).
    pub tx_records: u64,
    /// Authenticated records received from the peer.
    pub rx_records: u64,
    /// The peer's heartbeats say it takes several forwarded packets in one record, and
    /// packets queued together for it share records.
    pub packs_datagrams: bool,
    /// Its last load report.
    pub load: Option<LoadView>,
    /// Load reports received so far (a new number: a new report).
    pub load_reports: u64,
    /// Milliseconds since its last load report arrived.
    pub load_age_ms: Option<f64>,
    /// Congestion window of the reliable channel, bytes.
    pub cwnd: u64,
    /// Current retransmission timeout, milliseconds.
    pub rto_ms: f64,
    /// Retransmission timeouts so far.
    pub timeouts: u64,
    /// Reliable-stream bytes sent again after a loss.
    pub retransmitted_bytes: u64,
    /// Reliable messages sent and not yet acknowledged, bytes (the send buffer).
    pub send_buffered: u64,
    /// Test-stream bytes received on the reliable channel and verified.
    pub rx_verified_bytes: u64,
    /// Test-stream messages that did not match (wrong offset or bytes).
    pub rx_errors: u64,
    /// Test-stream bytes received as datagrams and verified.
    pub rx_datagram_verified_bytes: u64,
    /// Test-stream datagrams that did not match.
    pub rx_datagram_errors: u64,
    /// Test-stream bytes still to send to this peer.
    pub tx_pending_bytes: u64,
}

/// A load report, for output.
#[derive(Debug, Clone, Serialize)]
pub struct LoadView {
    /// CPU busy fraction.
    pub cpu_busy: f32,
    /// Connections.
    pub connections: u64,
    /// Bytes/s in.
    pub bytes_in_per_sec: u64,
    /// Bytes/s out.
    pub bytes_out_per_sec: u64,
    /// The node's own forecast, if its report carries one.
    pub forecast: Option<ForecastView>,
    /// The leases it renews (connection ids at that node, with their predicted volume).
    pub leases: Vec<LeaseRenewalView>,
    /// KPIs of connections that ended there after their primary moved them there.
    pub kpis: Vec<KpiView>,
    /// Segment statistics of its hottest connections, hottest first.
    pub segments: Vec<SegmentsView>,
}

/// A connection's segment statistics in a load report, for output.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentsView {
    /// The connection's id at the sender.
    pub conn: u64,
    /// Its segments, in stream order.
    pub segments: Vec<SegmentView>,
}

/// One segment of a connection's stream in a load report, for output.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentView {
    /// First stream offset.
    pub start: u64,
    /// One past the last offset (`None`: the open-ended tail).
    pub end: Option<u64>,
    /// Bytes sent in it.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
    /// Milliseconds since its last activity, when the sender made the report.
    pub idle_ms: u64,
}

/// An ended connection's KPIs in a load report, for output.
#[derive(Debug, Clone, Serialize)]
pub struct KpiView {
    /// The connection's id at the sender.
    pub conn: u64,
    /// Its mean response time there, milliseconds (`None`: none measured).
    pub latency_ms: Option<f64>,
    /// It ended in an error or a reset.
    pub error: bool,
}

/// A lease renewal in a load report, for output.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRenewalView {
    /// The connection's id at the sender.
    pub conn: u64,
    /// Its predicted volume, seconds of capacity (`None`: no forecast).
    pub volume_s: Option<f64>,
}

/// A load report's forecast, for output.
#[derive(Debug, Clone, Serialize)]
pub struct ForecastView {
    /// How far ahead, milliseconds.
    pub horizon_ms: u64,
    /// Predicted peak CPU busy fraction.
    pub cpu_busy: f32,
    /// Predicted connections.
    pub connections: u64,
}

impl From<&LoadReport> for LoadView {
    fn from(r: &LoadReport) -> Self {
        Self {
            cpu_busy: r.cpu_busy,
            connections: r.connections,
            bytes_in_per_sec: r.bytes_in_per_sec,
            bytes_out_per_sec: r.bytes_out_per_sec,
            forecast: r.forecast.as_ref().map(|f| ForecastView {
                horizon_ms: u64::try_from(f.horizon.as_millis()).unwrap_or(u64::MAX),
                cpu_busy: f.cpu_busy,
                connections: f.connections,
            }),
            leases: r
                .leases
                .iter()
                .map(|l| LeaseRenewalView {
                    conn: l.conn,
                    volume_s: l.volume.map(|v| v.as_secs_f64()),
                })
                .collect(),
            kpis: r
                .kpis
                .iter()
                .map(|k| KpiView {
                    conn: k.conn,
                    latency_ms: k.latency.map(|v| v.as_secs_f64() * 1e3),
                    error: k.error,
                })
                .collect(),
            segments: r
                .segments
                .iter()
                .map(|c| SegmentsView {
                    conn: c.conn,
                    segments: c
                        .segments
                        .iter()
                        .map(|s| SegmentView {
                            start: s.start,
                            end: s.len.map(|l| s.start.saturating_add(l)),
                            bytes: s.bytes,
                            packets: s.packets,
                            idle_ms: u64::try_from(s.idle.as_millis()).unwrap_or(u64::MAX),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Commands to the tunnel thread.
pub enum Command {
    /// Every peer.
    Peers(Sender<Vec<PeerInfo>>),
    /// Endpoint counters.
    Stats(Sender<Stats>),
    /// Send `bytes` of the test stream to `peer`.
    Send {
        /// Peer name.
        peer: String,
        /// How many bytes.
        bytes: u64,
        /// As datagrams instead of reliable messages.
        datagram: bool,
        /// Whether the job was accepted.
        reply: Sender<Result<(), String>>,
    },
    /// The node's load, for the next heartbeats.
    Load(LoadReport),
    /// Datagrams a worker made of forwarded packets (envelope included), for `peer`.
    Datagrams {
        /// The peer.
        peer: PeerRef,
        /// The datagrams.
        batch: DatagramBatch,
    },
    /// Move these flows (offers made by their workers, with where their packets enter when
    /// not here) to the peer named `peer`.
    Migrate {
        /// The target's name.
        peer: String,
        /// The flows.
        offers: Vec<(ConnOffer, Option<Remote>)>,
        /// The outcome, when every flow's is known.
        reply: Sender<Result<migrate::MigrateReport, String>>,
    },
    /// A worker froze and captured flows of a migration.
    Captured {
        /// The migration.
        migration: MigrationId,
        /// Per flow: its snapshot and where its packets enter, or why it was not captured
        /// (then it was thawed).
        results: Vec<(u64, migrate::CaptureResult)>,
    },
    /// A worker restored flows of a migration.
    Restored {
        /// The source.
        peer: PeerRef,
        /// The migration.
        migration: MigrationId,
        /// Per source flow: its id here, or why it was not restored.
        results: Vec<(u64, migrate::RestoreResult)>,
    },
    /// A worker moved a flow to its target, or thawed it.
    MoveDone {
        /// The migration.
        migration: MigrationId,
        /// The flow.
        flow: u64,
        /// Moved (else thawed).
        moved: bool,
        /// How long it was frozen.
        frozen: Option<Duration>,
    },
    /// Migration counters.
    MigrationStats(Sender<migrate::MigrationStats>),
    /// Stop the thread.
    Shutdown,
}

/// Datagrams in one buffer, back to back.
#[derive(Debug, Default)]
pub struct DatagramBatch {
    /// The datagrams' bytes.
    pub buf: Vec<u8>,
    /// Each datagram's length, in order.
    pub lens: Vec<u16>,
}

/// A packet of a moved connection that arrived through the tunnel, for the worker that owns
/// the flow; its bytes are in the [`TunnelBatch`] it came in.
#[derive(Debug, Clone, Copy)]
pub struct TunnelPacket {
    /// `ToOwner`: a client packet for a flow restored here; `ToIngress`: a packet for the
    /// client of a flow moved away from here.
    pub kind: ForwardKind,
    /// The node it came from.
    pub from: PeerRef,
    /// The flow's id on this node.
    pub flow: u64,
    /// Where the IPv4 packet (complete checksums: see `flowshift_core::segment`) lies in the
    /// batch's bytes.
    at: usize,
    len: usize,
}

/// Packets that came through the tunnel for one worker, end to end in one buffer: one
/// allocation per batch, not one per packet (a relayed download brings tens of thousands a
/// second, each allocated on the tunnel thread and freed on the worker). A batch goes to its
/// worker after each receive call (up to `RX_BATCH` GRO buffers) or when it holds
/// [`TunnelBatch::PIECE`] bytes, whichever is first: the worker writes the first piece while this thread opens the next, and a piece's
/// buffer, sized up front, stays below the node allocator's threshold for a mapping of its
/// own (`crate::alloc::LARGE`: a mapping per batch, made here and unmapped on the worker,
/// cost more than the allocations it replaced).
#[derive(Debug, Default)]
pub struct TunnelBatch {
    bytes: Vec<u8>,
    packets: Vec<TunnelPacket>,
}

const _: () = assert!(TunnelBatch::PIECE < TunnelBatch::CAPACITY);
const _: () = assert!(TunnelBatch::CAPACITY < crate::alloc::LARGE);

impl TunnelBatch {
    /// Bytes after which a batch is handed over (less than one more datagram short of
    /// `crate::alloc::LARGE`).
    const PIECE: usize = 24 * 1024;
    /// The buffer a batch starts with: a piece and the datagram that passes it (tunnel
    /// datagrams are ~1.4 KB; a larger one regrows the buffer, which is only slower).
    const CAPACITY: usize = 31 * 1024;

    fn push(&mut self, kind: ForwardKind, from: PeerRef, flow: u64, packet: &[u8]) {
        if self.bytes.capacity() == 0 {
            self.bytes.reserve_exact(Self::CAPACITY.max(packet.len()));
        }
        self.packets.push(TunnelPacket {
            kind,
            from,
            flow,
            at: self.bytes.len(),
            len: packet.len(),
        });
        self.bytes.extend_from_slice(packet);
    }

    /// No packet in it.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Each packet in arrival order, with its bytes (writable: a packet for a restored flow
    /// is translated in place).
    pub fn for_each(&mut self, mut f: impl FnMut(&TunnelPacket, &mut [u8])) {
        for p in &self.packets {
            f(p, &mut self.bytes[p.at..p.at + p.len]);
        }
    }
}

/// What workers use to reach the tunnel thread.
#[derive(Clone)]
pub struct TunnelSender {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    /// Largest datagram payload the tunnel carries (envelope included).
    pub max_datagram: usize,
}

impl TunnelSender {
    /// Sends `cmd` to the tunnel thread.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok() && self.waker.wake().is_ok()
    }
}

/// The control side of a running tunnel thread.
pub struct TunnelHandle {
    sender: TunnelSender,
    /// Disconnects when the thread ends.
    done: Receiver<()>,
    /// Nanoseconds the thread has spent working (not waiting in `poll`).
    busy: Arc<AtomicU64>,
    /// The thread's CPU-time clock, set by the thread when it starts.
    cpu_clock: Arc<std::sync::OnceLock<ThreadClock>>,
}

impl TunnelHandle {
    /// Sends `cmd` to the tunnel thread.
    pub fn send(&self, cmd: Command) -> bool {
        self.sender.send(cmd)
    }

    /// Time the tunnel thread has spent working so far (every turn of its loop from the end
    /// of its wait to the start of the next), for the node's CPU load.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy.load(Ordering::Relaxed))
    }

    /// CPU time the tunnel thread has run so far (its working time without the waits for a
    /// CPU), for the node's CPU load; `None` before it started or after it ended.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.cpu_clock.get()?.read()
    }

    /// A sender for workers.
    pub fn sender(&self) -> TunnelSender {
        self.sender.clone()
    }

    /// Stops the thread and waits (briefly) for it to end.
    pub fn stop(&self) {
        self.send(Command::Shutdown);
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }
}

struct PeerSlot {
    name: String,
    id: PeerId,
    liveness: Liveness,
    handshake_at: Option<Instant>,
    load: Option<LoadReport>,
    /// Load reports received, and when the last one arrived.
    load_reports: (u64, Option<Instant>),
    /// The diagnostic test stream with this peer.
    diag: diag::Diagnostic,
    /// Connections moved here from this peer reply straight out of our TUN device.
    direct_return: bool,
}

impl PeerSlot {
    /// A peer not heard from yet, with no test stream either way.
    fn new(name: String, id: PeerId) -> Self {
        PeerSlot {
            name,
            id,
            liveness: Liveness::Never,
            handshake_at: None,
            load: None,
            load_reports: (0, None),
            diag: diag::Diagnostic::default(),
            direct_return: false,
        }
    }
}

/// Monotonic microseconds since the UNIX epoch: wall time at start plus a monotonic clock, so
/// handshake timestamps keep increasing across restarts (see docs/tunnel.md).
#[derive(Clone, Copy)]
struct Clock {
    base: u64,
    start: std::time::Instant,
}

impl Clock {
    fn new() -> Self {
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self {
            base,
            start: std::time::Instant::now(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.base + self.start.elapsed().as_micros() as u64)
    }
}

struct Driver {
    ep: Endpoint,
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
    poll: Poll,
    commands: Receiver<Command>,
    clock: Clock,
    /// Nanoseconds spent working, read by the node ([`TunnelHandle::busy`]): turns of a few
    /// microseconds each, so not rounded to microseconds per turn.
    busy: Arc<AtomicU64>,
    peers: Vec<PeerSlot>,
    rx_bufs: Vec<Vec<u8>>,
    tx_batch: Vec<u8>,
    /// Batches the socket would not take yet, in order.
    pending: VecDeque<Region>,
    /// The last turn queued test data and the endpoint could take more.
    feeding: bool,
    /// The last turn stopped reading before the socket was drained (and the first turn
    /// reads whatever arrived before the loop began).
    rx_more: bool,
    /// Sends the socket refused (other than "would block").
    send_errors: u64,
    scratch: Vec<u8>,
    /// The workers, to hand them forwarded packets.
    workers: Vec<WorkerHandle>,
    /// Forwarded packets received this turn, per worker.
    inbox: Vec<TunnelBatch>,
    /// Datagrams and messages refused (bad envelope, unknown kind, no such worker).
    refused_total: u64,
    /// Forwarded datagrams the endpoint would not queue.
    forward_dropped: u64,
    /// The migration coordinator.
    migration: migrate::Coordinator,
    /// Where the newest handshake timestamp peers accepted is kept across restarts.
    state_file: std::path::PathBuf,
    /// The value last written there.
    persisted_timestamp: u64,
}

/// Starts the tunnel thread for `config`, delivering forwarded packets to `workers` and
/// running migrations with `migration`.
pub(crate) fn start(
    config: &TunnelConfig,
    seed: [u8; 32],
    workers: Vec<WorkerHandle>,
    migration: migrate::Coordinator,
) -> Result<TunnelHandle, TunnelError> {
    let sock_err = |source| TunnelError::Socket {
        addr: config.listen,
        source,
    };
    let socket = UdpSocket::bind(config.listen).map_err(sock_err)?;
    let state = quinn_udp::UdpSocketState::new((&socket).into()).map_err(sock_err)?;
    // GSO sends and GRO receives move 64 KB at a time: give the socket room for bursts.
    socket_buffers(&socket, 4 << 20);
    let poll = Poll::new().map_err(sock_err)?;
    let mut socket = socket;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)
        .map_err(sock_err)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(sock_err)?);
    let clock = Clock::new();
    let keypair = Keypair::from_private(config.private_key.clone());
    let mut core = TunnelCoreConfig::default();
    core.pack_datagrams = config.pack_datagrams;
    let mut ep = Endpoint::new(core, keypair, seed, clock.now());
    // Our handshakes carry timestamps above what peers accepted before a restart, even if
    // the clock was stepped back meanwhile.
    let persisted_timestamp = read_timestamp_state(&config.state_file);
    ep.set_initiation_floor(persisted_timestamp);
    let mut peers = Vec::new();
    for p in &config.peers {
        let id = ep
            .add_peer(
                PeerConfig {
                    public_key: p.public_key,
                    preshared_key: p.preshared_key.clone(),
                    endpoint: p.endpoint,
                },
                clock.now(),
            )
            .map_err(|e| TunnelError::Peer {
                name: p.name.clone(),
                reason: e.to_string(),
            })?;
        let mut slot = PeerSlot::new(p.name.clone(), id);
        slot.direct_return = p.direct_return;
        peers.push(slot);
    }
    let (tx, commands) = unbounded();
    let payload = ep.config().max_udp_payload;
    let driver = Driver {
        ep,
        socket,
        state,
        poll,
        commands,
        clock,
        busy: Arc::new(AtomicU64::new(0)),
        peers,
        rx_bufs: vec![vec![0u8; RX_BUF]; RX_BATCH],
        tx_batch: vec![0u8; 256 * 1024 + payload],
        pending: VecDeque::new(),
        feeding: false,
        rx_more: true,
        send_errors: 0,
        scratch: diag::scratch(),
        inbox: workers.iter().map(|_| TunnelBatch::default()).collect(),
        workers,
        refused_total: 0,
        forward_dropped: 0,
        migration,
        state_file: config.state_file.clone(),
        persisted_timestamp,
    };
    let max_datagram = driver.ep.max_datagram_payload();
    let busy = driver.busy.clone();
    tracing::info!(
        listen = %config.listen,
        public_key = %config.private_key.public_key().to_base64(),
        peers = ?config.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        "tunnel listening"
    );
    let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
    let cpu_clock = Arc::new(std::sync::OnceLock::new());
    let own_clock = cpu_clock.clone();
    std::thread::Builder::new()
        .name("fs-tunnel".into())
        .spawn(move || {
            let _done = done_tx;
            if let Some(clock) = ThreadClock::current() {
                let _ = own_clock.set(clock);
            }
            driver.run();
        })
        .map_err(|source| TunnelError::Socket {
            addr: config.listen,
            source,
        })?;
    Ok(TunnelHandle {
        sender: TunnelSender {
            tx,
            waker,
            max_datagram,
        },
        done,
        busy,
        cpu_clock,
    })
}

impl Driver {
    fn run(mut self) {
        let mut events = Events::with_capacity(16);
        loop {
            let now = self.clock.now();
            let timeout = [self.ep.poll_timeout(), self.migration.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            // Spin only while a test transfer is being queued; once the endpoint pushes back,
            // acknowledgements (socket readable) wake the loop.
            let busy = self.feeding && self.pending.is_empty() || self.rx_more;
            let timeout = if busy { Duration::ZERO } else { timeout };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "tunnel poll failed; tunnel stops");
                return;
            }
            let woke = std::time::Instant::now();
            // The socket is read when it said it has datagrams (or errors) — its readiness is
            // edge-triggered — or the last turn stopped short of draining it: a turn woken by
            // a worker's datagrams, a command or a timer costs no read that finds nothing.
            let mut readable = self.rx_more;
            for ev in events.iter() {
                readable |= ev.token() == SOCKET && (ev.is_readable() || ev.is_error());
                if ev.token() == SOCKET && ev.is_writable() {
                    let _ = self.poll.registry().reregister(
                        &mut self.socket,
                        SOCKET,
                        Interest::READABLE,
                    );
                }
            }
            while let Ok(cmd) = self.commands.try_recv() {
                if !self.command(cmd) {
                    return;
                }
            }
            self.rx_more = readable && self.receive();
            let now = self.clock.now();
            self.ep.handle_timeout(now);
            self.events(now);
            self.feeding = self.feed_tests();
            self.migration_poll(self.clock.now());
            self.transmit();
            self.busy
                .fetch_add(woke.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn slot(&mut self, id: PeerId) -> Option<&mut PeerSlot> {
        self.peers.iter_mut().find(|p| p.id == id)
    }

    /// Handles one command; false to stop.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Peers(reply) => {
                let now = self.clock.now();
                let rows = self.peers.iter().map(|p| self.peer_info(p, now)).collect();
                let _ = reply.send(rows);
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.ep.stats().clone());
            }
            Command::Send {
                peer,
                bytes,
                datagram,
                reply,
            } => {
                let r = match self.peers.iter_mut().find(|p| p.name == peer) {
                    None => Err(format!("no peer named {peer}")),
                    Some(p) => p.diag.start(&p.name, bytes, datagram),
                };
                let _ = reply.send(r);
            }
            Command::Load(report) => self.ep.set_load_report(report),
            Command::Datagrams { peer, batch } => self.send_datagrams(peer, batch),
            Command::Migrate {
                peer,
                offers,
                reply,
            } => self.migration_start(self.clock.now(), peer, offers, reply),
            Command::Captured { migration, results } => {
                self.migration_captured(self.clock.now(), migration, results)
            }
            Command::Restored {
                peer,
                migration,
                results,
            } => {
                if let Some(id) = self
                    .peers
                    .iter()
                    .find(|p| p.id.as_u32() == peer.0)
                    .map(|p| p.id)
                {
                    self.migration_restored(self.clock.now(), id, migration, results);
                }
            }
            Command::MoveDone {
                migration,
                flow,
                moved,
                frozen,
            } => self.migration_move_done(migration, flow, moved, frozen),
            Command::MigrationStats(reply) => {
                let _ = reply.send(self.migration.stats.clone());
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn peer_info(&self, p: &PeerSlot, now: Instant) -> PeerInfo {
        let stats = self.ep.peer_stats(p.id).unwrap_or_default();
        PeerInfo {
            name: p.name.clone(),
            id: p.id.as_u32(),
            endpoint: self.ep.peer_address(p.id),
            liveness: p.liveness,
            handshake_age_s: p
                .handshake_at
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            rtt_ms: stats.srtt.map(|d| d.as_secs_f64() * 1e3),
            loss: if stats.packets_sent == 0 {
                0.0
            } else {
                stats.packets_lost as f64 / stats.packets_sent as f64
            },
            tx_bytes: stats.tx_bytes,
            rx_bytes: stats.rx_bytes,
            tx_records: stats.tx_packets,
            rx_records: stats.rx_records,
            packs_datagrams: stats.packs_datagrams,
            load: p.load.as_ref().map(LoadView::from),
            load_reports: p.load_reports.0,
            load_age_ms: p
                .load_reports
                .1
                .map(|t| now.saturating_duration_since(t).as_secs_f64() * 1e3),
            cwnd: stats.cwnd,
            rto_ms: stats.rto.as_secs_f64() * 1e3,
            timeouts: stats.rto_expirations,
            retransmitted_bytes: stats.stream_bytes_retransmitted,
            send_buffered: stats.send_buffered,
            rx_verified_bytes: p.diag.rx.verified,
            rx_errors: p.diag.rx.errors,
            rx_datagram_verified_bytes: p.diag.rx.dgram_verified,
            rx_datagram_errors: p.diag.rx.dgram_errors,
            tx_pending_bytes: p.diag.pending(),
        }
    }

    /// Reads and handles datagrams until the socket is drained (false) or this turn's share
    /// is used up (true: more may be waiting, and the socket, being edge-triggered, will not
    /// say so again).
    fn receive(&mut self) -> bool {
        let mut meta = [quinn_udp::RecvMeta::default(); RX_BATCH];
        let mut errors = 0;
        for _ in 0..RX_CALLS_PER_TURN {
            let n = {
                let mut slices: Vec<IoSliceMut<'_>> = self
                    .rx_bufs
                    .iter_mut()
                    .map(|b| IoSliceMut::new(b))
                    .collect();
                match self
                    .state
                    .recv((&self.socket).into(), &mut slices, &mut meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // ICMP errors (a peer's port unreachable) surface here once each,
                        // with datagrams still queued behind them; the channels' timers deal
                        // with the peer. Anything that repeats ends the turn.
                        tracing::debug!(error = %e, "tunnel receive failed");
                        errors += 1;
                        if errors > 4 {
                            return false;
                        }
                        continue;
                    }
                }
            };
            let now = self.clock.now();
            let mut bufs = std::mem::take(&mut self.rx_bufs);
            for (m, buf) in meta.iter().zip(bufs.iter_mut()).take(n) {
                let stride = m.stride.max(1);
                let mut at = 0;
                while at < m.len {
                    let end = (at + stride).min(m.len);
                    let dgram = &mut buf[at..end];
                    if let Some(r) = self.ep.handle_datagram(now, m.addr, dgram) {
                        for d in r.datagrams() {
                            self.dispatch_datagram(r.peer, d);
                        }
                    }
                    at = end;
                }
            }
            self.rx_bufs = bufs;
            self.events(now);
            self.deliver_to_workers();
        }
        true
    }

    fn events(&mut self, now: Instant) {
        while let Some(e) = self.ep.poll_event() {
            match e {
                Event::HandshakeCompleted { peer } => {
                    self.persist_timestamp();
                    if let Some(p) = self.slot(peer) {
                        if p.handshake_at.is_none() {
                            tracing::info!(peer = %p.name, "tunnel handshake completed");
                        }
                        p.handshake_at = Some(now);
                    }
                }
                Event::HandshakeFailed {
                    peer,
                    remote,
                    error,
                } => {
                    let name = peer.and_then(|id| self.slot(id).map(|p| p.name.clone()));
                    tracing::warn!(peer = ?name, ?remote, %error, "tunnel handshake failed");
                }
                Event::LoadReport { peer, report } => {
                    if let Some(p) = self.slot(peer) {
                        p.load = Some(report);
                        p.load_reports = (p.load_reports.0 + 1, Some(now));
                    }
                }
                Event::Message { peer, data } => self.dispatch_message(now, peer, &data),
                Event::PeerAlive { peer } => {
                    if let Some(p) = self.slot(peer) {
                        tracing::info!(peer = %p.name, "peer alive");
                        p.liveness = Liveness::Alive;
                    }
                }
                Event::PeerDead { peer } => {
                    // A peer never heard from stays `never`: its handshake errors say why.
                    if let Some(p) = self.slot(peer)
                        && p.liveness == Liveness::Alive
                    {
                        tracing::warn!(peer = %p.name, "peer dead: no heartbeat");
                        p.liveness = Liveness::Dead;
                    }
                }
                Event::PeerRestarted { peer } => {
                    if let Some(p) = self.slot(peer) {
                        tracing::warn!(peer = %p.name, "peer restarted: its reliable stream starts over");
                        p.diag.reset();
                    }
                    self.migration_peer_restarted(now, peer);
                    for w in &self.workers {
                        w.send(WorkerMsg::PeerLost(PeerRef(peer.as_u32())));
                    }
                }
                other => tracing::debug!(event = ?other, "tunnel event"),
            }
        }
    }

    /// Writes the newest handshake timestamp a peer accepted to the state file, if it grew.
    fn persist_timestamp(&mut self) {
        let ts = self.ep.accepted_initiation_timestamp();
        if ts <= self.persisted_timestamp {
            return;
        }
        match write_timestamp_state(&self.state_file, ts) {
            Ok(()) => self.persisted_timestamp = ts,
            Err(e) => {
                tracing::warn!(file = %self.state_file.display(), error = %e, "cannot keep the handshake timestamp across restarts: after a restart with the clock stepped back, peers would refuse this node's handshakes until the clock passes it")
            }
        }
    }

    /// Queues diagnostic data for every peer with a job; true if some was queued and the
    /// endpoint could take more.
    fn feed_tests(&mut self) -> bool {
        let mut more = false;
        for p in &mut self.peers {
            more |= p.diag.feed(&mut self.ep, p.id, &p.name, &mut self.scratch);
        }
        more
    }

    /// A datagram from `peer`: a forwarded packet for a worker, or the diagnostic stream.
    fn dispatch_datagram(&mut self, peer: PeerId, data: &[u8]) {
        let (envelope, payload) = match EnvelopeRepr::split(data) {
            Ok(e) => e,
            Err(e) => {
                self.refused(peer, "datagram", &e);
                return;
            }
        };
        let kind = match envelope.kind {
            EnvelopeKind::ToOwner => ForwardKind::ToOwner,
            EnvelopeKind::ToIngress => ForwardKind::ToIngress,
            EnvelopeKind::Diagnostic => {
                if let Some(p) = self.slot(peer) {
                    p.diag.verify(payload, true);
                }
                return;
            }
            other => {
                self.refused(
                    peer,
                    "datagram",
                    &format_args!("{other:?} is not a datagram kind"),
                );
                return;
            }
        };
        let worker = (envelope.flow_id >> 48) as usize;
        match self.inbox.get_mut(worker) {
            Some(batch) => {
                batch.push(kind, PeerRef(peer.as_u32()), envelope.flow_id, payload);
                if batch.bytes.len() >= TunnelBatch::PIECE
                    && !self.workers[worker].send(WorkerMsg::Tunnel(std::mem::take(batch)))
                {
                    tracing::debug!("a worker is gone; its forwarded packets are dropped");
                }
            }
            None => self.refused(
                peer,
                "datagram",
                &format_args!("flow id {:#x} names no worker", envelope.flow_id),
            ),
        }
    }

    /// A reliable message from `peer`: the migration protocol, or the diagnostic stream.
    fn dispatch_message(&mut self, now: Instant, peer: PeerId, data: &[u8]) {
        match EnvelopeRepr::split(data) {
            Ok((e, payload)) => match e.kind {
                EnvelopeKind::Migration => {
                    // Forwarded packets that arrived before the message go to the workers
                    // first: a Commit completes a move, and packets the ingress node sent
                    // the flow before it must reach it while it is still here.
                    self.deliver_to_workers();
                    self.migration_message(now, peer, payload)
                }
                EnvelopeKind::Diagnostic => {
                    if let Some(p) = self.slot(peer) {
                        p.diag.verify(payload, false);
                    }
                }
                other => self.refused(
                    peer,
                    "message",
                    &format_args!("{other:?} is not a message kind"),
                ),
            },
            Err(e) => self.refused(peer, "message", &e),
        }
    }

    /// Counts (and logs, sparingly) something `peer` sent that this node does not take.
    fn refused(&mut self, peer: PeerId, what: &str, why: &dyn std::fmt::Display) {
        self.refused_total += 1;
        if self.refused_total.is_power_of_two() {
            let name = self.slot(peer).map(|p| p.name.clone()).unwrap_or_default();
            tracing::warn!(peer = %name, what, %why, refused = self.refused_total, "tunnel input refused");
        }
    }

    /// Hands each worker the packets that arrived for its flows this turn, one wake-up each.
    fn deliver_to_workers(&mut self) {
        for (worker, batch) in self.workers.iter().zip(self.inbox.iter_mut()) {
            if !batch.is_empty() && !worker.send(WorkerMsg::Tunnel(std::mem::take(batch))) {
                tracing::debug!("a worker is gone; its forwarded packets are dropped");
            }
        }
    }

    /// Datagrams a worker made of forwarded packets: queued to `peer` as they are.
    fn send_datagrams(&mut self, peer: PeerRef, batch: DatagramBatch) {
        let Some(id) = self
            .peers
            .iter()
            .find(|p| p.id.as_u32() == peer.0)
            .map(|p| p.id)
        else {
            self.forward_dropped += batch.lens.len() as u64;
            return;
        };
        let mut at = 0;
        for &len in &batch.lens {
            let end = at + usize::from(len);
            let Some(d) = batch.buf.get(at..end) else {
                break;
            };
            if self.ep.send_datagram(id, d).is_err() {
                // The datagram queue is full or the peer has no session: TCP retransmits.
                self.forward_dropped += 1;
            }
            at = end;
        }
    }

    /// Sends what the endpoint has, batching consecutive equal-size datagrams to one
    /// destination into one GSO send.
    fn transmit(&mut self) {
        if !self.flush_pending() {
            return;
        }
        let max_segments = self.state.max_gso_segments().max(1);
        let payload = self.ep.config().max_udp_payload;
        let now = self.clock.now();
        let mut cur: Option<Region> = None;
        let mut end = 0;
        // The socket pushed back this call: finished batches wait for the end (one failed
        // send, not one per batch).
        let mut blocked = false;
        loop {
            if end + payload > self.tx_batch.len() {
                self.pending.extend(cur.take());
                if !self.flush_pending() {
                    return;
                }
                end = 0;
            }
            let Some(t) = self
                .ep
                .poll_transmit(now, &mut self.tx_batch[end..end + payload])
            else {
                break;
            };
            match cur.as_mut() {
                Some(r)
                    if r.dest == t.destination
                        && r.len % r.seg == 0
                        && t.size <= r.seg
                        && r.len / r.seg < max_segments
                        && r.len + t.size <= MAX_GSO_BYTES =>
                {
                    r.len += t.size;
                    if t.size < r.seg {
                        // A shorter datagram ends a GSO batch.
                        self.pending.extend(cur.take());
                    }
                }
                _ => {
                    if cur.is_some() {
                        self.pending.extend(cur.take());
                        // Each finished GSO batch leaves at once: the peer opens it while
                        // this thread seals the next (a full socket keeps it for later).
                        if !blocked {
                            blocked = !self.flush_pending();
                        }
                    }
                    cur = Some(Region {
                        dest: t.destination,
                        start: end,
                        len: t.size,
                        seg: t.size,
                    });
                }
            }
            end += t.size;
        }
        self.pending.extend(cur.take());
        self.flush_pending();
    }

    /// Sends the pending regions in order; false (with the rest kept) if the socket is full.
    fn flush_pending(&mut self) -> bool {
        while let Some(r) = self.pending.front().copied() {
            let transmit = quinn_udp::Transmit {
                destination: r.dest,
                ecn: None,
                contents: &self.tx_batch[r.start..r.start + r.len],
                segment_size: (r.len > r.seg).then_some(r.seg),
                src_ip: None,
            };
            match self.state.try_send((&self.socket).into(), &transmit) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = self.poll.registry().reregister(
                        &mut self.socket,
                        SOCKET,
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    return false;
                }
                Err(e) => {
                    self.send_errors += 1;
                    if self.send_errors.is_power_of_two() {
                        tracing::warn!(error = %e, dest = %r.dest, len = r.len, "tunnel send failed");
                    }
                }
            }
            self.pending.pop_front();
        }
        true
    }
}

/// Datagrams in `tx_batch[start..start + len]` for `dest`, in segments of `seg` bytes.
#[derive(Debug, Clone, Copy)]
struct Region {
    dest: SocketAddr,
    start: usize,
    len: usize,
    seg: usize,
}

/// Sets the socket's buffers to `bytes`, past `net.core.{r,w}mem_max` when privileged
/// (`SO_*BUFFORCE`), else as far as the limits allow.
fn socket_buffers(socket: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: `v` is a valid c_int of the size given; the fd is an open socket.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

/// The handshake timestamp kept in `path` (microseconds since the UNIX epoch, one decimal
/// line), or 0 if there is none yet. A file that does not parse is reported and ignored.
fn read_timestamp_state(path: &std::path::Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(ts) => ts,
            Err(_) => {
                tracing::warn!(file = %path.display(), "tunnel state file does not hold a timestamp: ignored");
                0
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the tunnel state file: ignored");
            0
        }
    }
}

/// Writes `ts` to `path` whole (a temporary file renamed into place).
fn write_timestamp_state(path: &std::path::Path, ts: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{ts}\n"))?;
    std::fs::rename(&tmp, path)
}
