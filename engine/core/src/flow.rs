//! The flow table: one entry per TCP connection, with what migration will need of it.
//!
//! Besides the smoltcp socket handle and the app, a flow keeps what smoltcp does not let us read
//! back: the options of the client's SYN and of our SYN-ACK, the client's last window and TSval,
//! our last TSval, and a [mirror](crate::mirror) of the bytes the app wrote (smoltcp cannot read
//! its send buffer back). Every packet of a flow passes through the flow's [`FlowMode`]: a
//! frozen flow queues its inbound packets instead of delivering them.

use std::collections::VecDeque;
use std::hash::BuildHasherDefault;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::time::Instant;

use crate::app::{App, AppKind};
use crate::mirror::SendMirror;
use crate::packet::{FlowKey, SynOptions};
use crate::translate::Translation;

type FastMap<K, V> = hashbrown::HashMap<K, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// What the handshake and the packets seen so far tell about a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandshakeRecord {
    /// The client's SYN.
    pub client_syn: Option<SynOptions>,
    /// Our SYN-ACK (as smoltcp sent it).
    pub our_syn_ack: Option<SynOptions>,
    /// The raw window field of the client's last packet.
    pub client_window: u16,
    /// The client's last TSval.
    pub client_tsval: Option<u32>,
    /// Our last TSval.
    pub our_tsval: Option<u32>,
}

/// A node at the other end of the tunnel, as the driver names it (its tunnel peer id).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PeerRef(pub u32);

/// A flow on another node: which node, and the flow's id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Remote {
    /// The node.
    pub peer: PeerRef,
    /// The flow's id on that node.
    pub flow: u64,
}

/// How a flow's packets are handled.
pub enum FlowMode {
    /// Delivered to the local smoltcp socket.
    Local,
    /// Held: the socket is out of the interface's socket set, so it neither receives,
    /// transmits, nor runs a timer, and the app is not served; inbound packets are queued
    /// (bounded) until the flow is thawed or moved.
    Frozen {
        /// The socket, out of the set.
        socket: Box<smoltcp::socket::tcp::Socket<'static>>,
        /// Queued inbound packets, oldest first.
        queue: VecDeque<Vec<u8>>,
        /// Bytes in `queue`.
        queued_bytes: usize,
        /// When it was frozen.
        since: Instant,
        /// The node it is being moved to, if it is.
        moving_to: Option<PeerRef>,
        /// Packets for the client that node sent before this node learned that the move
        /// committed (the restored socket may send at once): written out if it commits,
        /// dropped if not. Bounded by [`EARLY_REPLIES`].
        early_replies: Vec<Vec<u8>>,
    },
    /// The connection lives on another node and its packets enter here: they are forwarded
    /// to the owner through the tunnel, and the owner's replies come back to be written to
    /// the TUN device. No socket, no app state.
    Moved {
        /// The owner.
        to: Remote,
        /// The client's FIN went through.
        client_fin: bool,
        /// The owner's FIN went through.
        owner_fin: bool,
        /// When the connection was seen to end (both FINs, or a RST): the entry is removed
        /// [`MOVED_LINGER`] later, so late retransmissions still reach the owner.
        ended: Option<Instant>,
        /// When the last packet of the flow passed here (either way).
        last_packet: Instant,
        /// Packets for the client from another node than `to`, held until `to` says the
        /// flow moved on there ([`crate::stack::Stack::rehome`]): the new owner may send
        /// before this node learns of the move. Bounded by [`EARLY_REPLIES`].
        successor_replies: Vec<(PeerRef, Vec<u8>)>,
    },
}

/// Most packets held per frozen flow from its target before the move commits.
pub const EARLY_REPLIES: usize = 256;

/// How long an entry for a moved connection stays after the connection ended.
pub const MOVED_LINGER: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(10);

/// How long a node that moved a connection on to a third node keeps forwarding what the
/// node where its packets enter still sends it, counted from the last such packet (that node
/// sends straight to the new owner once told).
pub const FORWARDER_IDLE: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(30);

/// How long an entry for a moved connection stays after the client's FIN when the owner's
/// FIN is never seen (the owner replies directly, not through this node), counted from the
/// flow's last packet.
pub const MOVED_IDLE_AFTER_FIN: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);

/// How a restored flow's replies reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReturnPath {
    /// Through the node where its packets enter (relay).
    Relay,
    /// Straight out of this node's TUN device, once the first forwarded client packet
    /// proved that the source moved the flow; through the ingress node until then.
    DirectPending,
    /// Straight out of this node's TUN device (direct server return).
    Direct,
}

impl std::fmt::Debug for FlowMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowMode::Local => f.write_str("Local"),
            FlowMode::Frozen { queue, .. } => write!(f, "Frozen({} queued)", queue.len()),
            FlowMode::Moved { to, .. } => write!(f, "Moved({to:?})"),
        }
    }
}

impl FlowMode {
    /// Short name for status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            FlowMode::Local => "local",
            FlowMode::Frozen { .. } => "frozen",
            FlowMode::Moved { .. } => "moved",
        }
    }
}

/// What a flow restored from another node keeps to speak the client's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Local image of the previous owner's `snd_nxt` (see [`crate::translate::AckCeiling`]).
    pub claimed: u32,
    /// The flow came home: before the restore it was moved to this node (where its packets
    /// enter), so a move called off after the restore makes it moved again.
    pub home_from: Option<Remote>,
    /// The node it was moved from: it forwards what it queued while the flow was frozen,
    /// and, when the flow moved on from a node where its packets do not enter, what the
    /// ingress node still sends there until told of the move.
    pub source: Option<PeerRef>,
}

/// Byte-rate estimate over the last sampling interval.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateSample {
    at: Option<Instant>,
    bytes_in: u64,
    bytes_out: u64,
    /// Bytes per second in, over the last interval.
    pub rate_in: f64,
    /// Bytes per second out, over the last interval.
    pub rate_out: f64,
}

impl RateSample {
    /// Updates the rates from the counters at `now`.
    pub fn update(&mut self, now: Instant, bytes_in: u64, bytes_out: u64) {
        if let Some(at) = self.at {
            let dt = (now - at).total_micros() as f64 / 1e6;
            if dt <= 0.0 {
                return;
            }
            self.rate_in = bytes_in.saturating_sub(self.bytes_in) as f64 / dt;
            self.rate_out = bytes_out.saturating_sub(self.bytes_out) as f64 / dt;
        }
        self.at = Some(now);
        self.bytes_in = bytes_in;
        self.bytes_out = bytes_out;
    }
}

/// Where a flow's smoltcp socket is: in the interface's socket set, where every poll visits
/// it, or parked beside the flow, where nothing does.
///
/// smoltcp's interface walks its whole socket set for every packet it takes in (to find the
/// socket) and every time it polls (to find what is due): a node holding many idle
/// connections would pay for each of them on every packet of a busy one. So a connection
/// that is idle with nothing in flight is parked (see `Stack`'s sweep) and comes back into
/// the set the moment anything touches it: a packet, the app, a timer of ours, a move.
pub enum SocketPlace {
    /// In the set (while the flow is [`FlowMode::Local`]).
    InSet(SocketHandle),
    /// Out of the set: no packet reaches it and no timer of its runs until it is put back.
    Parked(Box<smoltcp::socket::tcp::Socket<'static>>),
    /// Taken (the flow is frozen, moved or gone). Never a handle into the set: a handle left
    /// behind would name whichever connection's socket took its slot next.
    Gone,
}

impl SocketPlace {
    /// The socket, wherever it is. Panics (smoltcp's) if it is in the set and the handle is
    /// stale, as `SocketSet::get` does.
    pub fn get<'s>(
        &'s self,
        set: &'s SocketSet<'static>,
    ) -> &'s smoltcp::socket::tcp::Socket<'static> {
        match self {
            Self::InSet(h) => set.get(*h),
            Self::Parked(s) => s,
            Self::Gone => panic!("the socket of a flow that has none (frozen, moved or closed)"),
        }
    }

    /// The socket, if the flow has one.
    pub fn get_opt<'s>(
        &'s self,
        set: &'s SocketSet<'static>,
    ) -> Option<&'s smoltcp::socket::tcp::Socket<'static>> {
        match self {
            Self::InSet(h) => Some(set.get(*h)),
            Self::Parked(s) => Some(s),
            Self::Gone => None,
        }
    }

    /// The socket's handle in `set`, putting it back there first if it is parked: it is
    /// polled again from now on.
    pub fn unpark(&mut self, set: &mut SocketSet<'static>) -> SocketHandle {
        let h = match std::mem::replace(self, Self::Gone) {
            Self::InSet(h) => h,
            Self::Parked(s) => set.add(*s),
            Self::Gone => panic!("the socket of a flow that has none (frozen, moved or closed)"),
        };
        *self = Self::InSet(h);
        h
    }

    /// The socket, as mutable, back in `set` if it was parked (see [`unpark`](Self::unpark)).
    pub fn get_mut<'s>(
        &'s mut self,
        set: &'s mut SocketSet<'static>,
    ) -> &'s mut smoltcp::socket::tcp::Socket<'static> {
        let h = self.unpark(set);
        set.get_mut(h)
    }

    /// Takes the socket out of `set` and parks it (nothing if it already is).
    pub fn park(&mut self, set: &mut SocketSet<'static>) {
        if let Self::InSet(h) = *self {
            let smoltcp::socket::Socket::Tcp(s) = set.remove(h);
            *self = Self::Parked(Box::new(s));
        }
    }

    /// Takes the socket out, wherever it is, leaving [`Gone`](Self::Gone); `None` if it was
    /// gone already.
    pub fn take(
        &mut self,
        set: &mut SocketSet<'static>,
    ) -> Option<smoltcp::socket::tcp::Socket<'static>> {
        match std::mem::replace(self, Self::Gone) {
            Self::InSet(h) => {
                let smoltcp::socket::Socket::Tcp(s) = set.remove(h);
                Some(s)
            }
            Self::Parked(s) => Some(*s),
            Self::Gone => None,
        }
    }

    /// Whether it is parked.
    pub fn is_parked(&self) -> bool {
        matches!(self, Self::Parked(_))
    }
}

/// One connection.
pub struct Flow {
    /// Node-unique id, shown by `ctl conns`.
    pub id: u64,
    /// Its endpoints.
    pub key: FlowKey,
    /// The smoltcp socket, while the mode is [`FlowMode::Local`] (stale otherwise).
    pub socket: SocketPlace,
    /// The app serving it.
    pub app: Box<dyn App>,
    /// Which app.
    pub app_kind: AppKind,
    /// How its packets are handled.
    pub mode: FlowMode,
    /// Handshake options and last-seen header fields.
    pub record: HandshakeRecord,
    /// What the app wrote to the socket.
    pub mirror: SendMirror,
    /// Bytes the app consumed from the client.
    pub bytes_in: u64,
    /// Packets of the client delivered to the socket here (a GRO-merged packet counts once).
    pub packets_in: u64,
    /// Packets the socket here sent (a GSO packet counts once).
    pub packets_out: u64,
    /// Wire sequence number of the mirror's first byte (our ISN + 1, or a restored flow's
    /// `snd_una`); valid once our SYN-ACK went out.
    pub send_base: u32,
    /// Wire sequence number of the first byte counted in `bytes_in` (the client's ISN + 1,
    /// or where a restored flow's unread bytes began).
    pub recv_base: u32,
    /// Highest local sequence number sent so far (end of data, SYN and FIN included).
    pub snd_nxt: u32,
    /// Wire sequence number up to which smoltcp may hold the client's data out of order
    /// (beyond its `rcv_nxt`): direct receive waits until `rcv_nxt` passes it
    /// (`stack/direct.rs`).
    pub rx_pending: Option<u32>,
    /// Wire sequence number of the furthest right edge of the receive window we advertised
    /// (acknowledgement plus scaled window of our packets): the client's data beyond it is
    /// cut off before smoltcp sees it (`stack/direct.rs`).
    pub rx_edge: Option<u32>,
    /// Receive and send buffer capacities of its socket.
    pub buffers: (usize, usize),
    /// Local ↔ wire offsets of our sequence numbers and timestamps ([`crate::translate`]):
    /// every connection has its own (unpredictable ISNs, RFC 6528, [`crate::secure`]); a
    /// restored one those that map its socket onto the numbers the client knows.
    pub xlate: Translation,
    /// The wire ISN of a connection accepted here: when smoltcp's SYN-ACK goes out, `xlate`
    /// maps smoltcp's own ISN onto it.
    pub wire_isn: Option<u32>,
    /// Set when the flow was restored from another node.
    pub restored: Option<Restored>,
    /// Where the client's packets enter, when not here.
    pub ingress: Option<Remote>,
    /// With `ingress`: how replies reach the client.
    pub return_path: ReturnPath,
    /// When the SYN arrived (or the flow was restored here).
    pub created: Instant,
    /// When the app last took or gave a byte (idle timeout).
    pub active_at: Instant,
    /// Since when part of a request head is buffered in the app, if it is (head deadline).
    pub head_since: Option<Instant>,
    /// When the client's last packet arrived.
    pub last_rx: Instant,
    /// The app was told about the client's FIN.
    pub fin_delivered: bool,
    /// We called `close()` on the socket.
    pub close_sent: bool,
    /// Queued for app service in the current turn.
    pub dirty: bool,
    /// Its app is not served: a move is about to freeze it and its send buffer drains
    /// first ([`crate::stack::Stack::quiesce`]).
    pub quiescing: bool,
    /// Counted in the stack's half-open connections (SYN-RECEIVED).
    pub half_open: bool,
    /// Holds one of the node's `max_connections` slots (every flow with a socket does).
    pub counted: bool,
    /// Rates for status output.
    pub rates: RateSample,
    /// Bytes moved (in + out) when the flow was last compacted: it is compacted again only
    /// after it moved more.
    pub compacted_at: Option<u64>,
    /// Its exchanges and their response times here ([`FlowKpi`]).
    pub kpi: FlowKpi,
    /// Its loss-probe state ([`crate::probe`]).
    pub probe: crate::probe::LossProbe,
    /// Its class's allocation, when the node enforces them ([`crate::pace`]).
    pub pacer: Option<crate::pace::Pacer>,
    /// Whether its send buffer is what limits it, and its growth (`stack/grow.rs`).
    pub growth: Growth,
}

/// A flow's send-buffer growth (`stack/grow.rs`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// The app left the send ring full at the end of its last service.
    pub ring_full: bool,
    /// How much the app had written at its last service (`None`: not watched).
    pub seen: Option<u64>,
    /// Bytes the app wrote while the send buffer limited the flow (each service found all
    /// it had written sent, and it filled the ring again), since the flow last sent a
    /// buffer's worth without being so limited.
    pub limited: u64,
    /// Bytes the app wrote since the send buffer last limited the flow.
    pub unlimited: u64,
    /// Growing: the app is held since then until the client has acknowledged everything.
    pub draining: Option<Instant>,
    /// A drain was abandoned: the flow is not grown again (until it is compacted).
    pub gave_up: bool,
    /// The growth budget had no room for it once (counted once per connection).
    pub refused: bool,
}

impl Growth {
    /// Forgets what was watched (the flow cannot grow now, or just did).
    pub fn unwatch(&mut self) {
        self.seen = None;
        self.limited = 0;
        self.unlimited = 0;
    }
}

impl Flow {
    /// A local connection served by `app` on socket `handle` with buffers of `buffers`
    /// (rx, tx) bytes, created at `now`, holding a connection slot; everything else empty.
    /// Callers set what they know (the handshake, the numbers) with struct update syntax.
    pub fn new(
        id: u64,
        key: FlowKey,
        handle: SocketHandle,
        (app, app_kind): (Box<dyn App>, AppKind),
        buffers: (usize, usize),
        now: Instant,
    ) -> Self {
        Self {
            id,
            key,
            socket: SocketPlace::InSet(handle),
            app,
            app_kind,
            mode: FlowMode::Local,
            record: HandshakeRecord::default(),
            mirror: SendMirror::new(buffers.1),
            bytes_in: 0,
            packets_in: 0,
            packets_out: 0,
            send_base: 0,
            recv_base: 0,
            snd_nxt: 0,
            rx_pending: None,
            rx_edge: None,
            buffers,
            xlate: Translation::default(),
            wire_isn: None,
            restored: None,
            ingress: None,
            return_path: ReturnPath::Relay,
            created: now,
            active_at: now,
            head_since: None,
            last_rx: now,
            fin_delivered: false,
            close_sent: false,
            dirty: false,
            quiescing: false,
            half_open: false,
            counted: true,
            rates: RateSample::default(),
            compacted_at: None,
            kpi: FlowKpi::default(),
            probe: crate::probe::LossProbe::default(),
            pacer: None,
            growth: Growth::default(),
        }
    }

    /// Its app is not served for now: a move is about to freeze it, or its send buffer
    /// drains before it grows.
    pub fn app_held(&self) -> bool {
        self.quiescing || self.growth.draining.is_some()
    }

    /// Bytes the app wrote.
    pub fn bytes_out(&self) -> u64 {
        self.mirror.total()
    }
}

/// A connection's exchanges on this node and how quickly they were answered: the figures a
/// shadow trial compares between nodes (`docs/prediction.md`).
///
/// An *exchange* starts when the app takes client bytes while no earlier exchange is
/// outstanding, and is answered when the app writes its next byte. Its *response time* runs
/// from the turn that took the request to the turn that sees the client acknowledge the
/// response's first byte: the node's own delay plus one round trip to the client, as the
/// client feels it (a connection served through a relay pays the relay both ways). Apps that
/// speak first (a download with no request) have no exchanges; a stream the client keeps
/// sending on (an upload) is one exchange, never answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowKpi {
    /// Exchanges started here.
    pub requests: u64,
    /// Exchanges answered here (the app wrote a response byte).
    pub responses: u64,
    /// The current exchange's start, while the app has not answered it.
    waiting: Option<Instant>,
    /// The answered exchange whose first response byte the client has not acknowledged:
    /// its start and the stream offset of that byte.
    unacked: Option<(Instant, u64)>,
    /// Response times measured here: their sum in microseconds, and how many.
    latency_sum_us: u64,
    latencies: u64,
}

impl FlowKpi {
    /// The app took `n` client bytes at `now`.
    pub fn took(&mut self, now: Instant, n: usize) {
        if n > 0 && self.waiting.is_none() && self.unacked.is_none() {
            self.waiting = Some(now);
            self.requests += 1;
        }
    }

    /// The app is about to write its next bytes at stream offset `offset` (bytes written
    /// before them).
    pub fn answering(&mut self, offset: u64) {
        if let Some(at) = self.waiting.take() {
            self.responses += 1;
            self.unacked = Some((at, offset));
        }
    }

    /// The client has acknowledged every byte before stream offset `acked`, seen at `now`.
    pub fn acked(&mut self, now: Instant, acked: u64) {
        if let Some((at, offset)) = self.unacked
            && acked > offset
        {
            self.unacked = None;
            let us = (now - at).total_micros();
            self.latency_sum_us = self.latency_sum_us.saturating_add(us);
            self.latencies += 1;
        }
    }

    /// The mean response time here, if any exchange was answered and acknowledged here.
    pub fn mean_latency(&self) -> Option<smoltcp::time::Duration> {
        (self.latencies > 0)
            .then(|| smoltcp::time::Duration::from_micros(self.latency_sum_us / self.latencies))
    }

    /// Response times measured here.
    pub fn measured(&self) -> u64 {
        self.latencies
    }
}

/// Flows by index and by key.
#[derive(Default)]
pub struct FlowTable {
    slots: Vec<Option<Flow>>,
    free: Vec<usize>,
    by_key: FastMap<FlowKey, usize>,
    by_id: FastMap<u64, usize>,
}

impl FlowTable {
    /// Number of flows.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True if there are no flows.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The slot of the flow with `key`.
    pub fn lookup(&self, key: &FlowKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// Inserts `flow`, returning its slot. The key must not be present.
    pub fn insert(&mut self, flow: Flow) -> usize {
        let (key, id) = (flow.key, flow.id);
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(flow);
                i
            }
            None => {
                self.slots.push(Some(flow));
                self.slots.len() - 1
            }
        };
        let old = self.by_key.insert(key, slot);
        debug_assert!(old.is_none(), "flow key inserted twice");
        let old = self.by_id.insert(id, slot);
        debug_assert!(old.is_none(), "flow id inserted twice");
        slot
    }

    /// Removes the flow in `slot`.
    pub fn remove(&mut self, slot: usize) -> Option<Flow> {
        let flow = self.slots.get_mut(slot)?.take()?;
        self.by_key.remove(&flow.key);
        self.by_id.remove(&flow.id);
        self.free.push(slot);
        Some(flow)
    }

    /// The flow in `slot`.
    pub fn get(&self, slot: usize) -> Option<&Flow> {
        self.slots.get(slot)?.as_ref()
    }

    /// The flow in `slot`, mutably.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Flow> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// The slot of the flow with node-unique `id`.
    pub fn find_id(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Every occupied slot.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|_| i))
    }

    /// Every flow.
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.slots.iter().filter_map(Option::as_ref)
    }
}
