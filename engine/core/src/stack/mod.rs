//! The per-worker TCP stack: smoltcp plus the flow table, sans-IO.
//!
//! A [`Stack`] owns one smoltcp [`Interface`] and [`SocketSet`], and the flows whose packets reach
//! this worker. It does no I/O and reads no clock: the driver hands it packets read from the TUN
//! queue ([`Stack::handle_packet`]), lets it run ([`Stack::poll`]), takes the packets to write
//! ([`Stack::drain_transmit`]) and sleeps until [`Stack::poll_at`].
//!
//! # Packet path
//! Each inbound packet is classified once ([`crate::packet::classify`]), looked up in the flow
//! table, and passed through its flow's [`FlowMode`] — the one per-flow hook — before smoltcp sees
//! it, one packet at a time, so the flow table and smoltcp always agree on which socket a packet
//! belongs to. A SYN for a configured port creates a socket that listens just for it; anything
//! smoltcp has no socket for is answered with RST by smoltcp itself. Outbound packets pass through
//! the hook too (to record our SYN-ACK and TSval).
//!
//! # Flow control
//! Apps read smoltcp's receive buffer in place and write its send buffer in place, only as much as
//! fits; a client that stops reading closes its own window and nothing grows.

use std::cell::Cell;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr,
};

use crate::app::{self, AppKind, counting};
use crate::config::{Ipv4Cidr, KEEPALIVE_PROBES, ServiceConfig, TcpConfig};
use crate::flow::SocketPlace;
use crate::flow::{
    FORWARDER_IDLE, Flow, FlowMode, FlowTable, HandshakeRecord, MOVED_IDLE_AFTER_FIN, MOVED_LINGER,
    Remote,
};
use crate::packet::{self, DropReason, FlowKey};
use crate::secure::Secrets;
use crate::timewait::{self, TIME_WAIT, TimeWait, TimeWaitTable, Verdict as TwVerdict};
use crate::translate::{AckCeiling, Translation, seq_gt};

mod compact;
pub use compact::COMPACT_AFTER;
mod cookie;
mod direct;
mod grow;
pub use grow::{DRAIN_MAX, DRAIN_MIN, DRAIN_RTTS, GROW_AFTER_BUFFERS};
mod forward;
mod migrate;

pub use forward::{ForwardKind, Forwarded};
pub use migrate::{CaptureError, Captured, RestoreError, RestoreParams, window_shift};

/// Most service addresses one node serves (smoltcp's interface address table).
pub const MAX_SERVICE_ADDRESSES: usize = 8;

/// Received bytes after which a connection's ACKs may be delayed (about 16 full segments,
/// Linux's `TCP_MAX_QUICKACKS`).
pub const QUICKACK_BYTES: u64 = 16 * 1448;
/// The ACK delay after that (smoltcp's default).
const ACK_DELAY: Duration = Duration::from_millis(10);

/// Most TIME-WAIT records one worker holds (Linux's `tcp_max_tw_buckets` is 262,144).
pub const MAX_TIME_WAIT: usize = 262_144;

/// How often flows are swept for rates, handshake deadlines and closed sockets.
const SWEEP_INTERVAL: Duration = Duration::from_millis(1000);
/// Transmit buffers kept across sweeps (the rest of a burst's are freed).
const TX_BUFFERS_KEPT: usize = 64;
/// Queued transmit bytes after which [`Stack::poll_flushing`] hands the queue to the driver
/// between two egress passes: two TSO packets' worth.
pub const TX_FLUSH_BYTES: usize = 128 * 1024;
/// Idle connections compacted per sweep at most (a few ms of a worker's time).
const MAX_COMPACTIONS_PER_SWEEP: usize = 500;
/// How long a connection may stay half-open (SYN received, our SYN-ACK unanswered).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose sent data stays unacknowledged this long is reset (smoltcp's timeout,
/// armed only while the send buffer holds data: smoltcp counts it from the last packet
/// received, so an idle connection would otherwise be reset), and so is a closing connection
/// (our FIN sent) that hears nothing from its client this long.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections open at once, shared by all workers of a node: in total and, if set, per
/// client address.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    open: Arc<AtomicUsize>,
    max: usize,
    per_source: Option<Arc<PerSource>>,
}

/// Connections per client address, in shards (one lock per accept, rarely contended).
#[derive(Debug)]
struct PerSource {
    max: u32,
    shards: [Mutex<HashMap<Ipv4Addr, u32>>; 16],
}

impl PerSource {
    fn shard(&self, ip: Ipv4Addr) -> std::sync::MutexGuard<'_, HashMap<Ipv4Addr, u32>> {
        let o = ip.octets();
        let shard = &self.shards[usize::from(o[3] ^ o[2]) % 16];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why the budget refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// `max_connections` are open.
    Total,
    /// The client's address holds `max_per_source` connections.
    Source,
}

impl ConnectionBudget {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            per_source: None,
        }
    }

    /// The same with at most `max` connections from any one client address.
    pub fn with_per_source(mut self, max: u32) -> Self {
        self.per_source = Some(Arc::new(PerSource {
            max,
            shards: Default::default(),
        }));
        self
    }

    fn take_total(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes one connection from `client` out of the budget.
    pub fn try_acquire(&self, client: Ipv4Addr) -> Result<(), BudgetRefusal> {
        let Some(ps) = &self.per_source else {
            return self.take_total().then_some(()).ok_or(BudgetRefusal::Total);
        };
        let mut shard = ps.shard(client);
        let n = shard.entry(client).or_insert(0);
        if *n >= ps.max {
            return Err(BudgetRefusal::Source);
        }
        if !self.take_total() {
            if *n == 0 {
                shard.remove(&client);
            }
            return Err(BudgetRefusal::Total);
        }
        *n += 1;
        Ok(())
    }

    /// Takes one connection for a connection that exists already (restored from another
    /// node): the per-source limit counts it but does not refuse it.
    pub fn try_acquire_existing(&self, client: Ipv4Addr) -> bool {
        if !self.take_total() {
            return false;
        }
        if let Some(ps) = &self.per_source {
            *ps.shard(client).entry(client).or_insert(0) += 1;
        }
        true
    }

    /// Returns one connection of `client` to the budget.
    pub fn release(&self, client: Ipv4Addr) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if let Some(ps) = &self.per_source {
            let mut shard = ps.shard(client);
            if let Some(n) = shard.get_mut(&client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&client);
                }
            }
        }
    }

    /// Client addresses holding connections now (with a per-source limit; else 0).
    pub fn sources(&self) -> usize {
        self.per_source.as_ref().map_or(0, |ps| {
            ps.shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
                .sum()
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// What a [`Stack`] is built from.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Worker index: the top bits of every flow id this stack gives out.
    pub worker: u16,
    /// Service addresses.
    pub addresses: Vec<Ipv4Cidr>,
    /// Services by port.
    pub services: Vec<ServiceConfig>,
    /// Socket buffer sizes.
    pub tcp: TcpConfig,
    /// IP MTU of the TUN device.
    pub mtu: usize,
    /// Largest packet the device hands over or takes (bigger than `mtu` with TUN offload).
    pub max_packet: usize,
    /// Packets queued per frozen flow before dropping.
    pub frozen_queue_packets: usize,
    /// Bytes queued per frozen flow before dropping.
    pub frozen_queue_bytes: usize,
    /// Bytes queued over all frozen flows of this stack before dropping.
    pub frozen_total_bytes: usize,
    /// A flow frozen this long is thawed, its queue delivered: a freeze nobody ends (a move
    /// whose coordinator is stuck, a forgotten `ctl freeze`) must not hold it for good.
    /// Far beyond the migration protocol's own deadlines.
    pub freeze_timeout: Duration,
    /// Connections in SYN-RECEIVED this stack holds at once; further SYNs get RST (or, with
    /// `syn_cookies_after`, a cookie).
    pub max_half_open: usize,
    /// Once this many handshakes are in progress, SYNs are answered with a SYN cookie and no
    /// state ([`crate::secure`]); `None`: never.
    pub syn_cookies_after: Option<usize>,
    /// Seed for smoltcp's own choices (its ISNs are mapped onto `secret`'s).
    pub seed: u64,
    /// The node's secret for ISNs, timestamp offsets and SYN cookies: the same on every
    /// worker of a node (a cookie may come back on another queue), drawn at start.
    pub secret: [u8; 16],
    /// Bytes kept free in front of every emitted packet (for the driver's virtio-net header).
    pub tx_headroom: usize,
    /// Largest TCP segment smoltcp may emit for the device to split (TSO), or `None` to
    /// segment at the MTU. Packets larger than the MTU carry their segment size in
    /// [`TxQueue`]'s per-packet `gso_size`.
    pub tso_max: Option<usize>,
}

impl StackConfig {
    /// A configuration serving `services` on `addresses` with `secret`, and defaults for the
    /// rest: worker 0, default buffers, a 1,500-byte MTU without offloads, the daemon's
    /// default limits.
    pub fn new(addresses: Vec<Ipv4Cidr>, services: Vec<ServiceConfig>, secret: [u8; 16]) -> Self {
        Self {
            worker: 0,
            addresses,
            services,
            tcp: TcpConfig::default(),
            mtu: 1500,
            max_packet: 1500,
            frozen_queue_packets: 1024,
            frozen_queue_bytes: 4 << 20,
            frozen_total_bytes: 256 << 20,
            freeze_timeout: Duration::from_secs(60),
            max_half_open: 2048,
            syn_cookies_after: Some(1024),
            seed: u64::from_le_bytes([secret[0], secret[1], secret[2], secret[3], 0, 0, 0, 1]),
            secret,
            tx_headroom: 0,
            tso_max: None,
        }
    }
}

/// Counters of one stack. Plain integers: the driver exports them on request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackStats {
    /// Packets read from the TUN device.
    pub packets_in: u64,
    /// Bytes read from the TUN device.
    pub bytes_in: u64,
    /// Packets emitted to the TUN device.
    pub packets_out: u64,
    /// Bytes emitted to the TUN device.
    pub bytes_out: u64,
    /// Inbound packets dropped, by [`DropReason::index`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Connections accepted (SYN given a socket).
    pub conns_accepted: u64,
    /// Connections whose socket closed and was reclaimed.
    pub conns_closed: u64,
    /// SYNs refused because `max_connections` was reached.
    pub refused_limit: u64,
    /// SYNs to a port with no service.
    pub refused_no_service: u64,
    /// SYNs refused while shutting down.
    pub refused_shutdown: u64,
    /// SYNs refused because `max_half_open` handshakes were in progress (a SYN flood).
    pub refused_half_open: u64,
    /// SYNs refused because their client address held `max_per_source` connections.
    pub refused_per_source: u64,
    /// SYNs answered with a SYN cookie (`syn_cookies_after` handshakes were in progress).
    pub syn_cookies_sent: u64,
    /// Connections opened by an ACK carrying a valid cookie.
    pub syn_cookies_accepted: u64,
    /// ACKs of unknown connections whose cookie did not check while cookies were in use.
    pub syn_cookies_invalid: u64,
    /// Half-open connections reset after [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeouts: u64,
    /// Closing connections (our FIN sent) reset after [`UNACKED_TIMEOUT`] of silence.
    pub close_timeouts: u64,
    /// Connections reset because the client answered no keepalive probe (a dead client).
    pub keepalive_timeouts: u64,
    /// Moved-connection entries (where their packets enter) removed after a silence longer
    /// than twice the keepalive's limit: the owner or the client went away unseen.
    pub moved_expired: u64,
    /// Idle connections re-homed into fresh sockets to give their memory back.
    pub compacted: u64,
    /// Send buffers grown: downloads their buffer limited, re-homed into a larger one
    /// (`stack/grow.rs`).
    pub tx_grown: u64,
    /// Send-buffer growths given up: the drain before it took too long, or the re-home failed.
    pub tx_grow_abandoned: u64,
    /// Send-buffer growths not started: the growth budget was spent.
    pub tx_grow_over_budget: u64,
    /// Send-buffer growth held by connections at the last sweep, bytes (a gauge).
    pub tx_grown_bytes: u64,
    /// Times an idle connection's socket was parked out of the interface's socket set.
    pub parked: u64,
    /// Packets for unknown flows handed to smoltcp (answered with RST).
    pub unknown_flow_packets: u64,
    /// Application bytes received from clients.
    pub app_bytes_in: u64,
    /// Of those, bytes the app took straight from the packet that carried them (direct
    /// receive, `tcp.direct_receive`): smoltcp never copied them.
    pub rx_direct_bytes: u64,
    /// Client segments that reached beyond the receive window we advertised: cut to it
    /// (counted once per segment) before smoltcp saw them.
    pub rx_beyond_window: u64,
    /// Application bytes sent to clients.
    pub app_bytes_out: u64,
    /// Application bytes, either way, that emulated work was done on
    /// ([`crate::config::ServiceConfig::work_passes`]; each pass costs a CRC-32 of them).
    pub work_bytes: u64,
    /// Client packets of moved connections forwarded to their owner.
    pub forwarded_to_owner: u64,
    /// Packets of connections restored here sent back to the node where they entered.
    pub forwarded_to_ingress: u64,
    /// Packets from the tunnel written to the TUN device for a moved connection.
    pub relayed_from_owner: u64,
    /// Packets from the tunnel refused (unknown flow, wrong peer, wrong 4-tuple, malformed).
    pub tunnel_packets_refused: u64,
    /// RSTs from the tunnel for a connection no longer here (a client answering segments
    /// still in flight after its connection ended): discarded, as TCP discards a RST that
    /// matches no connection. Not refusals.
    pub tunnel_late_resets: u64,
    /// Entries of moved connections removed after the connection ended.
    pub moved_closed: u64,
    /// Connections restored here from another node.
    pub conns_restored: u64,
    /// Connections moved from here to another node.
    pub conns_moved_out: u64,
    /// Restored connections dropped because their source called the move off.
    pub conns_discarded: u64,
    /// Connections in TIME-WAIT now (records, no socket): a gauge.
    pub time_wait: u64,
    /// SYNs accepted on the 4-tuple of a connection in TIME-WAIT (port reuse).
    pub time_wait_reused: u64,
    /// ACKs sent again from TIME-WAIT (a retransmitted FIN, or a SYN that could be old).
    pub time_wait_acks: u64,
    /// TIME-WAIT records dropped early because the table was full.
    pub time_wait_overflow: u64,
    /// Connections closed for idling between requests (`idle_timeout`).
    pub idle_closed: u64,
    /// Connections closed because a request head did not complete in time (`head_timeout`).
    pub head_timeouts: u64,
    /// Frozen connections thawed because nothing ended their freeze in time.
    pub freeze_timeouts: u64,
    /// Ended connections' KPIs dropped because nobody took them in time
    /// ([`Stack::take_ended`]; at most [`ENDED_KEPT`] wait).
    pub kpis_dropped: u64,
    /// Loss probes: retransmissions of a connection's earliest unacknowledged segment after
    /// about two round trips without an ACK ([`crate::probe`]).
    pub loss_probes: u64,
}

impl StackStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &StackStats) {
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        for (a, b) in self.dropped.iter_mut().zip(other.dropped) {
            *a += b;
        }
        self.conns_accepted += other.conns_accepted;
        self.conns_closed += other.conns_closed;
        self.refused_limit += other.refused_limit;
        self.refused_no_service += other.refused_no_service;
        self.refused_shutdown += other.refused_shutdown;
        self.refused_half_open += other.refused_half_open;
        self.refused_per_source += other.refused_per_source;
        self.syn_cookies_sent += other.syn_cookies_sent;
        self.syn_cookies_accepted += other.syn_cookies_accepted;
        self.syn_cookies_invalid += other.syn_cookies_invalid;
        self.handshake_timeouts += other.handshake_timeouts;
        self.close_timeouts += other.close_timeouts;
        self.keepalive_timeouts += other.keepalive_timeouts;
        self.moved_expired += other.moved_expired;
        self.compacted += other.compacted;
        self.tx_grown += other.tx_grown;
        self.tx_grow_abandoned += other.tx_grow_abandoned;
        self.tx_grow_over_budget += other.tx_grow_over_budget;
        self.tx_grown_bytes += other.tx_grown_bytes;
        self.parked += other.parked;
        self.unknown_flow_packets += other.unknown_flow_packets;
        self.app_bytes_in += other.app_bytes_in;
        self.rx_direct_bytes += other.rx_direct_bytes;
        self.rx_beyond_window += other.rx_beyond_window;
        self.app_bytes_out += other.app_bytes_out;
        self.work_bytes += other.work_bytes;
        self.forwarded_to_owner += other.forwarded_to_owner;
        self.forwarded_to_ingress += other.forwarded_to_ingress;
        self.relayed_from_owner += other.relayed_from_owner;
        self.tunnel_packets_refused += other.tunnel_packets_refused;
        self.tunnel_late_resets += other.tunnel_late_resets;
        self.moved_closed += other.moved_closed;
        self.conns_restored += other.conns_restored;
        self.conns_moved_out += other.conns_moved_out;
        self.conns_discarded += other.conns_discarded;
        self.time_wait += other.time_wait;
        self.time_wait_reused += other.time_wait_reused;
        self.time_wait_acks += other.time_wait_acks;
        self.time_wait_overflow += other.time_wait_overflow;
        self.idle_closed += other.idle_closed;
        self.head_timeouts += other.head_timeouts;
        self.freeze_timeouts += other.freeze_timeouts;
        self.kpis_dropped += other.kpis_dropped;
        self.loss_probes += other.loss_probes;
    }
}

/// One row of `ctl conns`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConnInfo {
    /// Node-unique id.
    pub id: u64,
    /// Client address:port.
    pub client: SocketAddrV4,
    /// Service address:port.
    pub service: SocketAddrV4,
    /// TCP state, as smoltcp names it.
    pub state: String,
    /// The app.
    pub app: AppKind,
    /// `local`, `frozen` or `moved`.
    pub mode: String,
    /// For a moved connection: the node it lives on, and its id there.
    pub owner: Option<Remote>,
    /// For a connection restored here whose packets enter at another node: that node, and
    /// the connection's id there.
    pub ingress: Option<Remote>,
    /// With `ingress`: how its replies reach the client.
    pub return_path: Option<crate::flow::ReturnPath>,
    /// Milliseconds since the SYN.
    pub age_ms: u64,
    /// App bytes received.
    pub bytes_in: u64,
    /// App bytes sent.
    pub bytes_out: u64,
    /// Receive rate, bytes/s, over the last second.
    pub rate_in: f64,
    /// Send rate, bytes/s, over the last second.
    pub rate_out: f64,
    /// Bytes in the socket's send buffer (unsent + unacknowledged).
    pub send_queue: usize,
    /// Bytes in the socket's receive buffer not yet read by the app.
    pub recv_queue: usize,
    /// Handshake options recorded for migration.
    pub handshake: HandshakeRecord,
    /// Idle with its socket parked out of the interface's polls (see
    /// [`crate::flow::SocketPlace`]).
    #[serde(default)]
    pub parked: bool,
    /// Smoothed round-trip time to the client as the loss probes measure it, µs (`None`
    /// until one was measured, or carried over by a move).
    #[serde(default)]
    pub srtt_us: Option<u64>,
    /// Its socket's send buffer, bytes (grown past `tcp.tx_buffer` when it limited a
    /// download; `stack/grow.rs`).
    #[serde(default)]
    pub send_buffer: usize,
    /// Its app is held while its send buffer drains, to grow it.
    #[serde(default)]
    pub growing: bool,
}

/// Errors of flow-level control operations.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum FlowError {
    /// No flow has this id on this stack.
    #[error("no connection with id {0:#x}")]
    NoSuchFlow(u64),
    /// The flow is not in a mode that allows the operation.
    #[error("connection {id:#x} is {mode}")]
    WrongMode {
        /// The flow.
        id: u64,
        /// Its current mode.
        mode: &'static str,
    },
}

thread_local! {
    /// Milliseconds for smoltcp's TSval generator: set from `now` on every stack entry, so the
    /// generator reads no clock (it has to be a plain `fn`).
    static TSVAL_MS: Cell<u32> = const { Cell::new(0) };
}

fn tsval_now() -> u32 {
    TSVAL_MS.with(Cell::get)
}

/// Bytes cleared at the front of every transmit buffer: the largest IPv4 and TCP headers
/// (60 bytes each).
const HEADER_CLEAR: usize = 120;

/// Bytes a rate-limited flow waits for before it is served again.
const PACE_QUANTUM: u64 = 4096;

/// One full segment, for the loss probes' delayed-ACK allowance (a typical MSS; a little off
/// for a clamped one only moves the allowance's threshold).
const PROBE_SEGMENT: u32 = 1448;

/// Ended connections' KPIs a stack keeps until [`Stack::take_ended`] takes them (the node's
/// predictor does every sample, 100 ms by default); beyond, the oldest go and are counted.
pub const ENDED_KEPT: usize = 4096;

/// A connection that ended here, with what a shadow trial compares (see
/// [`crate::flow::FlowKpi`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnEnd {
    /// Its id here.
    pub id: u64,
    /// For a connection restored here whose packets enter elsewhere: that node (its
    /// primary) and the connection's id there.
    pub ingress: Option<(crate::predict::NodeId, u64)>,
    /// Exchanges started here.
    pub requests: u64,
    /// Its mean response time here, if an exchange was answered and acknowledged here.
    pub latency: Option<Duration>,
    /// It ended in a reset, an abort or a timeout, not with both FINs.
    pub error: bool,
}

/// Packets smoltcp emitted, in reusable buffers, each with `headroom` bytes free in front.
#[derive(Debug, Default)]
pub struct TxQueue {
    bufs: Vec<Vec<u8>>,
    /// Per packet: the segment size the device must split it into (0: send as is).
    gso_sizes: Vec<u16>,
    len: usize,
    /// Bytes of the queued packets (headroom not counted).
    bytes: usize,
    headroom: usize,
}

impl TxQueue {
    fn push(&mut self, len: usize, gso_size: u16) -> &mut [u8] {
        if self.len == self.bufs.len() {
            self.bufs.push(Vec::new());
            self.gso_sizes.push(0);
        }
        self.gso_sizes[self.len] = gso_size;
        self.bytes += len;
        let buf = &mut self.bufs[self.len];
        let need = self.headroom + len;
        // Not zeroed whole (that was a 64 KiB memset per TSO packet): smoltcp writes every
        // byte of what it emits — the headers, options padded with End-of-List, then exactly
        // the payload. The header area is cleared all the same, so no byte of an earlier
        // packet could reach the wire through a field smoltcp skipped.
        if buf.len() < need {
            buf.resize(need, 0);
        } else {
            buf.truncate(need);
        }
        let head = need.min(self.headroom + HEADER_CLEAR);
        buf[..head].fill(0);
        self.len += 1;
        &mut buf[self.headroom..]
    }

    /// Frees the buffers beyond the first `keep` that are not in use: a burst grows the queue
    /// to a buffer per packet of one turn (up to 64 KiB each with TSO), which would otherwise
    /// stay resident for good.
    fn trim(&mut self, keep: usize) {
        let keep = keep.max(self.len);
        if self.bufs.len() > keep {
            self.bufs.truncate(keep);
            self.gso_sizes.truncate(keep);
            self.bufs.shrink_to_fit();
            self.gso_sizes.shrink_to_fit();
        }
    }

    /// Number of queued packets.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the queue; the buffers stay for reuse.
    fn clear(&mut self) {
        self.len = 0;
        self.bytes = 0;
    }
}

/// smoltcp device for one turn: at most one packet to receive, and the transmit queue.
struct TurnDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut TxQueue,
    caps: &'a DeviceCapabilities,
}

struct RxToken<'a>(&'a [u8]);
struct TxToken<'a> {
    queue: &'a mut TxQueue,
    gso_size: u16,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(self.queue.push(len, self.gso_size))
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.gso_size = meta.segmentation_offload_size.map_or(0, |s| s.get());
    }
}

impl phy::Device for TurnDevice<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let rx = self.rx.take()?;
        Some((
            RxToken(rx),
            TxToken {
                queue: self.tx,
                gso_size: 0,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            queue: self.tx,
            gso_size: 0,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// The per-worker stack. See the module docs.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    caps: DeviceCapabilities,
    tx: TxQueue,
    flows: FlowTable,
    /// Service per port; `None` where none is configured.
    services: Vec<Option<ServiceConfig>>,
    addresses: Vec<Ipv4Addr>,
    budget: ConnectionBudget,
    config: StackConfig,
    dirty: Vec<usize>,
    next_id: u64,
    accepting: bool,
    /// Flows in SYN-RECEIVED (those with `half_open` set); at most `config.max_half_open`.
    half_open: usize,
    next_sweep: Instant,
    stats: StackStats,
    forward: forward::ForwardQueue,
    /// The scratch interface restores run their synthetic handshakes in (made on first use).
    restore_iface: Option<migrate::ScratchIface>,
    /// Connections in TIME-WAIT, as records without a socket (see [`crate::timewait`]).
    time_wait: TimeWaitTable,
    /// Flows whose socket reached TIME-WAIT or CLOSED in the last poll: retired at the start
    /// of the next, after their last packets were drained with the flow still known.
    retiring: Vec<usize>,
    /// Hold every new connection's app at its accept ([`Stack::set_hold_accepted`]).
    hold_accepted: bool,
    /// Connections held at their accept since [`Stack::take_accepted_held`] last took them.
    accepted_held: Vec<u64>,
    /// Bytes queued over all frozen flows (bounded by `config.frozen_total_bytes`).
    frozen_bytes: usize,
    /// Connections that ended here since [`Stack::take_ended`] last took them.
    ended: VecDeque<ConnEnd>,
    /// The time of the current turn (set by `handle_packet` and `poll`).
    now: Instant,
    /// Slots of flows with data in flight, watched for loss probes ([`crate::probe`]).
    probe_timer: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize)>>,
    /// Flows held by their rate limit, and when each may move bytes again ([`crate::pace`]).
    paced: Vec<(Instant, usize)>,
    /// Send-buffer growth its flows hold or have reserved, bytes (`stack/grow.rs`; at most
    /// `config.tcp.tx_grow_budget`, recounted by each sweep).
    grown: usize,
    /// Flows with an allocation: while there are any, each turn serves them by priority.
    allocated: usize,
    /// Keyed functions for ISNs, timestamp offsets and cookies.
    secrets: Secrets,
    /// When the last SYN cookie was sent: ACKs of unknown flows are checked for a cookie
    /// only while cookies were sent in their lifetime (as Linux's
    /// `tcp_synq_no_recent_overflow`).
    last_cookie: Option<Instant>,
}

impl Stack {
    /// A stack serving `config`'s addresses and services, sharing `budget` with the other workers.
    pub fn new(config: StackConfig, budget: ConnectionBudget, now: Instant) -> Self {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = config.mtu;
        // Checksums were verified by `packet::classify`; smoltcp only fills them on transmit.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        if let Some(max) = config.tso_max.and_then(std::num::NonZeroUsize::new) {
            caps.segmentation.tcpv4 = Some(max);
            // smoltcp requires TCP checksum offload with TSO: the driver asks the kernel to
            // complete every TCP checksum (see `offload::prepare`).
            checksum.tcp = Checksum::None;
        }
        caps.checksum = checksum;

        let mut iface_config = IfaceConfig::new(HardwareAddress::Ip);
        iface_config.random_seed = config.seed;
        let mut tx = TxQueue {
            headroom: config.tx_headroom,
            ..Default::default()
        };
        let mut dev = TurnDevice {
            rx: None,
            tx: &mut tx,
            caps: &caps,
        };
        let mut iface = Interface::new(iface_config, &mut dev, now);
        iface.update_ip_addrs(|addrs| {
            for a in config.addresses.iter().take(MAX_SERVICE_ADDRESSES) {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a.addr), a.prefix_len));
            }
        });
        // With `Medium::Ip` the gateway is never resolved: any address routes everything back
        // into the TUN device, and the kernel forwards it from there.
        if let Some(first) = config.addresses.first() {
            let _ = iface.routes_mut().add_default_ipv4_route(first.addr);
        }

        let mut services = vec![None; 65536];
        for s in &config.services {
            services[usize::from(s.port)] = Some(s.clone());
        }
        let addresses = config.addresses.iter().map(|a| a.addr).collect();
        // TIME-WAIT records per worker: as many as the node has connection slots, within
        // bounds (a record is ~100 bytes).
        let budget_cap = budget.max().clamp(1024, MAX_TIME_WAIT);
        let secrets = Secrets::new(&config.secret);
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            caps,
            tx,
            flows: FlowTable::default(),
            services,
            addresses,
            budget,
            next_id: u64::from(config.worker) << 48 | 1,
            config,
            dirty: Vec::new(),
            accepting: true,
            half_open: 0,
            next_sweep: now + SWEEP_INTERVAL,
            stats: StackStats::default(),
            forward: Default::default(),
            restore_iface: None,
            time_wait: TimeWaitTable::new(budget_cap),
            retiring: Vec::new(),
            hold_accepted: false,
            accepted_held: Vec::new(),
            ended: VecDeque::new(),
            now,
            probe_timer: std::collections::BinaryHeap::new(),
            paced: Vec::new(),
            grown: 0,
            allocated: 0,
            frozen_bytes: 0,
            secrets,
            last_cookie: None,
        }
    }

    fn set_clock(now: Instant) {
        TSVAL_MS.with(|c| c.set(now.total_millis() as u32));
    }

    /// Handles one packet read from the TUN device. The packet is translated in place (see
    /// [`crate::translate`]): its contents are unspecified afterwards.
    pub fn handle_packet(&mut self, now: Instant, packet: &mut [u8]) {
        self.handle(now, packet, true);
    }

    /// Handles a TCP packet the kernel merged (GRO) from segments it validated: handed to
    /// smoltcp whole, checksums not verified (see [`crate::offload`]). Translated in place.
    pub fn handle_merged_packet(&mut self, now: Instant, packet: &mut [u8]) {
        self.handle(now, packet, false);
    }

    /// Counts a TUN read the driver could not use (a malformed virtio-net header).
    pub fn count_unusable_read(&mut self, why: &dyn std::fmt::Display) {
        self.stats.packets_in += 1;
        self.stats.dropped[DropReason::Malformed.index()] += 1;
        tracing::debug!(%why, "unusable TUN read");
    }

    fn handle(&mut self, now: Instant, packet: &mut [u8], verify_checksums: bool) {
        Self::set_clock(now);
        self.now = now;
        self.stats.packets_in += 1;
        self.stats.bytes_in += packet.len() as u64;
        let addresses = &self.addresses;
        let inbound =
            match packet::classify_with(packet, |a| addresses.contains(&a), verify_checksums) {
                Ok(p) => p,
                Err(reason) => {
                    self.drop_packet(reason, packet);
                    return;
                }
            };
        let packet = &mut packet[..inbound.ip_len];
        let fresh_syn = inbound.flags.syn && !inbound.flags.ack && !inbound.flags.rst;

        let mut slot = self.flows.lookup(&inbound.key);
        // A new SYN on the 4-tuple of a connection that just ended: its socket goes now.
        if let Some(s) = slot
            && fresh_syn
            && self.retire_if_ended(now, s)
        {
            slot = None;
        }
        // Our ISN for a new incarnation of a TIME-WAIT 4-tuple starts beyond the old one's
        // numbers (as Linux's `tcp_timewait_state_process`).
        let mut isn_floor = None;
        if slot.is_none()
            && let Some(tw) = self.time_wait.get(&inbound.key).copied()
        {
            match timewait::judge(&tw, &inbound) {
                TwVerdict::NewConnection => {
                    isn_floor = Some(tw.snd_nxt.wrapping_add(65_535 + 2));
                    self.time_wait.remove(&inbound.key);
                    self.stats.time_wait_reused += 1;
                    tracing::debug!(id = tw.id, client = %tw.key.client, "port reused: SYN on a TIME-WAIT 4-tuple accepted");
                }
                TwVerdict::Ack => {
                    self.time_wait_ack(&tw);
                    return;
                }
                TwVerdict::Remove => {
                    self.time_wait.remove(&inbound.key);
                    self.stats.time_wait = self.time_wait.len() as u64;
                    return;
                }
                TwVerdict::Drop => return,
            }
            self.stats.time_wait = self.time_wait.len() as u64;
        }
        let slot = match slot {
            Some(slot) => slot,
            None if fresh_syn => {
                if self.cookie_due(&inbound.key) {
                    self.send_cookie(now, &inbound, packet);
                    return;
                }
                match self.accept(now, &inbound.key, inbound.seq, packet, isn_floor) {
                    Some(slot) => {
                        self.ingress(now, packet);
                        self.drop_if_still_listening(slot);
                        return;
                    }
                    None => {
                        // smoltcp has no socket for it and answers with RST.
                        self.ingress_unknown(now, packet);
                        return;
                    }
                }
            }
            None => {
                if let Some(slot) = self.accept_cookie(now, &inbound, packet) {
                    self.deliver(now, slot, &inbound, packet);
                    return;
                }
                self.stats.unknown_flow_packets += 1;
                self.ingress_unknown(now, packet);
                return;
            }
        };

        self.deliver(now, slot, &inbound, packet);
    }

    /// The per-flow hook: every inbound packet of a known flow passes here, whether it came
    /// from the TUN device or, for a flow restored here, through the tunnel.
    fn deliver(&mut self, now: Instant, slot: usize, inbound: &packet::Inbound, packet: &mut [u8]) {
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        flow.record.client_window = inbound.window;
        let last_rx = std::mem::replace(&mut flow.last_rx, now);
        if inbound.tsval.is_some() {
            flow.record.client_tsval = inbound.tsval;
        }
        match &mut flow.mode {
            FlowMode::Local => {
                flow.socket.unpark(&mut self.sockets);
                flow.packets_in += 1;
                if !flow.dirty {
                    flow.dirty = true;
                    self.dirty.push(slot);
                }
                let ceiling = flow.restored.map(|r| AckCeiling {
                    sent: flow.snd_nxt,
                    claimed: r.claimed,
                });
                if (flow.xlate.is_identity() && ceiling.is_none())
                    || flow.xlate.inbound(packet, ceiling).is_ok()
                {
                    if inbound.payload_len == 0 {
                        self.ingress(now, packet);
                        return;
                    }
                    let (inbound, cut) = direct::cut_to_window(flow, inbound, packet);
                    let inbound = &inbound;
                    if cut {
                        self.stats.rx_beyond_window += 1;
                        tracing::debug!(
                            id = flow.id,
                            client = %flow.key.client,
                            "client data beyond the advertised window: cut to it"
                        );
                    }
                    let mut skip = 0;
                    if self.config.tcp.direct_receive {
                        let work = self
                            .services
                            .get(usize::from(flow.key.service.port()))
                            .and_then(Option::as_ref)
                            .map_or(0, |s| s.work_passes);
                        skip = direct::take(
                            flow,
                            &mut self.sockets,
                            &mut self.stats,
                            inbound,
                            packet,
                            work,
                            now,
                        );
                    }
                    self.ingress(now, &packet[skip..]);
                    // What smoltcp may hold out of order (direct receive and growth wait
                    // for it).
                    if let Some(flow) = self.flows.get_mut(slot) {
                        let end = inbound.seq.wrapping_add(inbound.payload_len as u32);
                        direct::note_segment(flow, &self.sockets, end);
                    }
                } else {
                    // Not for the socket: it does not count as hearing from the client (the
                    // keepalive deadlines run from what the socket heard).
                    flow.last_rx = last_rx;
                }
            }
            FlowMode::Frozen {
                queue,
                queued_bytes,
                ..
            } => {
                if queue.len() >= self.config.frozen_queue_packets
                    || *queued_bytes + packet.len() > self.config.frozen_queue_bytes
                    || self.frozen_bytes + packet.len() > self.config.frozen_total_bytes
                {
                    self.drop_packet(DropReason::FrozenQueueFull, packet);
                } else {
                    *queued_bytes += packet.len();
                    self.frozen_bytes += packet.len();
                    queue.push_back(packet.to_vec());
                }
            }
            FlowMode::Moved {
                to,
                client_fin,
                ended,
                owner_fin,
                last_packet,
                ..
            } => {
                *last_packet = now;
                *client_fin |= inbound.flags.fin;
                if ended.is_none() && (inbound.flags.rst || *client_fin && *owner_fin) {
                    *ended = Some(now);
                }
                let to = *to;
                self.stats.forwarded_to_owner += 1;
                self.forward.push(ForwardKind::ToOwner, to, packet, 0);
            }
        }
    }

    /// A socket created for a SYN that smoltcp did not take (a malformed SYN) would stay
    /// listening and catch the next client's SYN on that port, behind the flow table's back:
    /// remove it at once.
    fn drop_if_still_listening(&mut self, slot: usize) {
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        if flow.socket.get(&self.sockets).state() == tcp::State::Listen {
            let Some(mut flow) = self.flows.remove(slot) else {
                return;
            };
            self.half_open -= usize::from(flow.half_open);
            flow.socket.take(&mut self.sockets);
            self.budget.release(*flow.key.client.ip());
            self.stats.conns_accepted -= 1;
            self.stats.dropped[DropReason::Malformed.index()] += 1;
            tracing::debug!(client = %flow.key.client, "SYN not taken by smoltcp: dropped");
        } else if !flow.dirty {
            flow.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn drop_packet(&mut self, reason: DropReason, packet: &[u8]) {
        self.stats.dropped[reason.index()] += 1;
        tracing::trace!(
            reason = reason.as_str(),
            len = packet.len(),
            "dropped inbound packet"
        );
    }

    fn ingress(&mut self, now: Instant, packet: &[u8]) {
        let mut dev = TurnDevice {
            rx: Some(packet),
            tx: &mut self.tx,
            caps: &self.caps,
        };
        self.iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
    }

    /// A packet no socket is for: smoltcp answers it (RST, unless it is one) from an empty
    /// socket set — the flow table already said no socket matches, and walking the real set
    /// to find that out again would make every stray packet cost every connection.
    fn ingress_unknown(&mut self, now: Instant, packet: &[u8]) {
        let mut dev = TurnDevice {
            rx: Some(packet),
            tx: &mut self.tx,
            caps: &self.caps,
        };
        let mut none = SocketSet::new(&mut [][..]);
        self.iface.poll_ingress_single(now, &mut dev, &mut none);
    }

    /// A SYN for a flow we do not have: give it a socket if a service and the budget allow.
    fn accept(
        &mut self,
        now: Instant,
        key: &FlowKey,
        syn_seq: u32,
        syn: &[u8],
        isn_floor: Option<u32>,
    ) -> Option<usize> {
        let Some(ServiceConfig {
            app: kind,
            app_config,
            ..
        }) = self.services[usize::from(key.service.port())].clone()
        else {
            self.stats.refused_no_service += 1;
            return None;
        };
        if !self.accepting {
            self.stats.refused_shutdown += 1;
            return None;
        }
        if self.half_open >= self.config.max_half_open {
            self.stats.refused_half_open += 1;
            if self.stats.refused_half_open.is_power_of_two() {
                tracing::warn!(
                    max = self.config.max_half_open,
                    refused = self.stats.refused_half_open,
                    "max_half_open handshakes in progress (SYN flood?): refusing new connections"
                );
            }
            return None;
        }
        if let Err(why) = self.budget.try_acquire(*key.client.ip()) {
            self.count_budget_refusal(why, key);
            return None;
        }
        let mut socket = self.new_socket(
            key.service.port(),
            self.config.tcp.rx_buffer,
            self.config.tcp.tx_buffer,
        );
        let endpoint = (IpAddress::Ipv4(*key.service.ip()), key.service.port());
        if socket.listen(endpoint).is_err() {
            self.budget.release(*key.client.ip());
            return None;
        }
        let handle = self.sockets.add(socket);
        let id = self.next_id;
        self.next_id += 1;
        let mut wire_isn = self.secrets.isn(key.client, key.service, now);
        if let Some(floor) = isn_floor
            && seq_gt(floor, wire_isn)
        {
            wire_isn = floor;
        }
        let buffers = (self.config.tcp.rx_buffer, self.config.tcp.tx_buffer);
        let app = (app::new_app(kind, &app_config), kind);
        let flow = Flow {
            record: HandshakeRecord {
                client_syn: packet::syn_options(syn),
                ..Default::default()
            },
            recv_base: syn_seq.wrapping_add(1),
            // `seq_off` is known when smoltcp's SYN-ACK shows its ISN.
            xlate: Translation {
                seq_off: 0,
                ts_off: self.secrets.ts_offset(key.client, key.service),
                rcv_off: 0,
            },
            wire_isn: Some(wire_isn),
            half_open: true,
            ..Flow::new(id, *key, handle, app, buffers, now)
        };
        self.half_open += 1;
        self.stats.conns_accepted += 1;
        tracing::debug!(id, client = %key.client, service = %key.service, app = ?kind, "accepted");
        Some(self.flows.insert(flow))
    }

    /// Counts (and, sparingly, logs) a connection the budget refused.
    pub(super) fn count_budget_refusal(&mut self, why: BudgetRefusal, key: &FlowKey) {
        match why {
            BudgetRefusal::Total => {
                self.stats.refused_limit += 1;
                if self.stats.refused_limit.is_power_of_two() {
                    tracing::warn!(
                        max = self.budget.max(),
                        refused = self.stats.refused_limit,
                        "max_connections reached: refusing new connections"
                    );
                }
            }
            BudgetRefusal::Source => {
                self.stats.refused_per_source += 1;
                if self.stats.refused_per_source.is_power_of_two() {
                    tracing::warn!(
                        client = %key.client.ip(),
                        refused = self.stats.refused_per_source,
                        "limits.max_per_source reached: refusing a client's new connections"
                    );
                }
            }
        }
    }

    /// A socket as every flow's is set up, with buffers of `rx` and `tx` bytes.
    /// Set before `listen`: smoltcp arms the timer when the handshake completes.
    fn new_socket(&self, port: u16, rx: usize, tx: usize) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        socket.set_nagle_enabled(false);
        // Quick ACKs at the start, as Linux's quickack mode: a client whose request is split
        // over two writes (Nagle holds the second until the first is acknowledged) is not
        // held up by a delayed ACK. Delayed ACKs come on after `QUICKACK_BYTES` (`serve`).
        socket.set_ack_delay(None);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_tsval_generator(Some(tsval_now));
        // Keepalive probes (smoltcp sends one after each interval without sending anything);
        // the sweep resets a connection whose client answers none.
        socket.set_keep_alive(
            self.services[usize::from(port)]
                .as_ref()
                .and_then(|s| s.keepalive),
        );
        socket
    }

    /// Runs timers, serves the apps of flows that saw packets, and emits what is ready.
    pub fn poll(&mut self, now: Instant) {
        self.poll_flushing(now, |_| {});
    }

    /// [`poll`](Self::poll), handing the stack to `flush` whenever the transmit queue holds
    /// [`TX_FLUSH_BYTES`] or more between two of smoltcp's egress passes, for the driver to
    /// write what is queued ([`drain_transmit_batch`](Self::drain_transmit_batch)). A turn
    /// of several busy flows with grown send buffers emits megabytes: queued whole, every
    /// byte smoltcp copies into a packet has left the cache before the device write copies it
    /// again. Written in pieces, the few buffers reused stay in it. A pass emits at most one
    /// packet per socket, so every socket keeps its place; a `flush` that writes nothing only
    /// lets the queue grow, as [`poll`](Self::poll) does.
    pub fn poll_flushing(&mut self, now: Instant, mut flush: impl FnMut(&mut Self)) {
        Self::set_clock(now);
        self.now = now;
        let retiring = std::mem::take(&mut self.retiring);
        for &slot in &retiring {
            self.retire_if_ended(now, slot);
        }
        self.retiring = retiring;
        self.retiring.clear();
        if !self.paced.is_empty() {
            self.wake_paced(now);
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        if self.allocated > 0 {
            // Lower priority numbers first; connections without an allocation last.
            let flows = &self.flows;
            dirty.sort_by_key(|&slot| {
                flows
                    .get(slot)
                    .and_then(|f| f.pacer)
                    .map_or(u16::MAX, |p| u16::from(p.priority()))
            });
        }
        for &slot in &dirty {
            self.serve(now, slot);
        }
        if self.probe_timer.peek().is_some_and(|r| now >= r.0.0) {
            self.probe_losses(now);
        }
        // What `Interface::poll` does without a packet to receive, its egress loop ours.
        self.iface.poll_maintenance(now);
        loop {
            let mut dev = TurnDevice {
                rx: None,
                tx: &mut self.tx,
                caps: &self.caps,
            };
            if self.iface.poll_egress(now, &mut dev, &mut self.sockets) == PollResult::None {
                break;
            }
            if self.tx.bytes >= TX_FLUSH_BYTES {
                flush(self);
            }
        }
        for &slot in &dirty {
            if let Some(flow) = self.flows.get(slot)
                && matches!(flow.mode, FlowMode::Local)
                && matches!(
                    flow.socket.get(&self.sockets).state(),
                    tcp::State::TimeWait | tcp::State::Closed
                )
            {
                self.retiring.push(slot);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        if now >= self.next_sweep {
            self.sweep(now);
        }
    }

    /// Moves bytes between the socket and the app of the flow in `slot`.
    fn serve(&mut self, now: Instant, slot: usize) {
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        flow.dirty = false;
        if !matches!(flow.mode, FlowMode::Local) || flow.quiescing {
            return;
        }
        if !self.growth_turn(now, slot) {
            return;
        }
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        let socket = flow.socket.get_mut(&mut self.sockets);
        if flow.half_open && socket.state() != tcp::State::SynReceived {
            flow.half_open = false;
            self.half_open -= 1;
            // Accepted: held before its app sees a byte, for the driver to decide where it
            // is served (a shadow trial may move it).
            if self.hold_accepted && socket.state() == tcp::State::Established {
                flow.quiescing = true;
                self.accepted_held.push(flow.id);
                return;
            }
        }
        let in_before = flow.bytes_in;
        let mut wrote_any = false;
        let mut held = false;
        let work = self
            .services
            .get(usize::from(flow.key.service.port()))
            .and_then(Option::as_ref)
            .map_or(0, |s| s.work_passes);
        // Up to two passes: the app may produce output that frees its input buffer.
        for _ in 0..2 {
            while socket.can_recv() {
                let allow = flow.pacer.as_mut().map_or(usize::MAX, |p| {
                    p.allowance(now).min(usize::MAX as u64) as usize
                });
                if allow == 0 {
                    held = true;
                    break;
                }
                let app = &mut flow.app;
                let n = socket.recv(|data| {
                    let data = &data[..data.len().min(allow)];
                    let n = app.handle_recv(data);
                    if work > 0 {
                        crate::config::emulate_work(work, &data[..n.min(data.len())]);
                    }
                    (n, n)
                });
                if let (Ok(n), Some(p)) = (&n, flow.pacer.as_mut()) {
                    p.spend(*n as u64);
                }
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => took(
                        (&mut flow.kpi, &mut flow.bytes_in, &mut flow.active_at),
                        &mut self.stats,
                        n,
                        work,
                        now,
                    ),
                }
            }
            if !flow.fin_delivered && !socket.may_recv() && socket.recv_queue() == 0 {
                let remote_closed = matches!(
                    socket.state(),
                    tcp::State::CloseWait
                        | tcp::State::LastAck
                        | tcp::State::Closing
                        | tcp::State::TimeWait
                );
                if remote_closed {
                    flow.fin_delivered = true;
                    flow.app.handle_recv_fin();
                }
            }
            let mut wrote = 0;
            while socket.can_send() {
                let allow = match flow.pacer.as_mut() {
                    None => usize::MAX,
                    Some(p) => {
                        let room = p.send_room(socket.send_queue());
                        let tokens = p.allowance(now).min(usize::MAX as u64) as usize;
                        held |= tokens == 0;
                        room.min(tokens)
                    }
                };
                if allow == 0 {
                    break;
                }
                let app = &mut flow.app;
                let mirror = &mut flow.mirror;
                let kpi = &mut flow.kpi;
                let n = socket.send(|buf| {
                    let len = buf.len().min(allow);
                    let buf = &mut buf[..len];
                    let mut runs = counting::Runs::default();
                    let n = app.poll_send_marked(buf, &mut runs).min(len);
                    if n > 0 {
                        kpi.answering(mirror.total());
                    }
                    mirror.record(&buf[..n], &runs);
                    if work > 0 {
                        crate::config::emulate_work(work, &buf[..n]);
                    }
                    (n, n)
                });
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        wrote += n;
                        wrote_any = true;
                        self.stats.app_bytes_out += n as u64;
                        if work > 0 {
                            self.stats.work_bytes += n as u64;
                        }
                        if let Some(p) = flow.pacer.as_mut() {
                            p.spend(n as u64);
                        }
                    }
                }
            }
            if wrote == 0 {
                break;
            }
        }
        if flow.bytes_in != in_before || wrote_any {
            flow.active_at = now;
        }
        flow.growth.ring_full = socket.may_send() && socket.send_queue() == socket.send_capacity();
        // Held by its rate limit: served again once the bucket has refilled a little.
        if held
            && let Some(p) = flow.pacer.as_mut()
            && !p.waiting
            && let Some(at) = p.ready_at(PACE_QUANTUM)
        {
            p.waiting = true;
            self.paced.push((at, slot));
        }
        // Everything written before the send queue's bytes has been acknowledged.
        let acked = flow
            .mirror
            .total()
            .saturating_sub(socket.send_queue() as u64);
        flow.kpi.acked(now, acked);
        if flow.probe.in_flight() > 0 {
            flow.probe
                .observe(now, flow.send_base.wrapping_add(acked as u32));
            arm_probe(&mut self.probe_timer, &mut flow.probe, slot);
        }
        if !flow.close_sent && flow.bytes_in >= QUICKACK_BYTES && socket.ack_delay().is_none() {
            socket.set_ack_delay(Some(ACK_DELAY));
        }
        if !flow.close_sent && flow.app.wants_close() && socket.may_send() {
            // FIN goes out after everything already written. From now on ACKs go at once:
            // the one for the client's FIN must leave before the socket becomes a TIME-WAIT
            // record.
            socket.close();
            socket.set_ack_delay(None);
            flow.close_sent = true;
        }
        // smoltcp's timeout runs from the last packet received, data or not: armed only while
        // data waits for its acknowledgement, it resets a dead client, not an idle one.
        socket.set_timeout((socket.send_queue() > 0).then_some(UNACKED_TIMEOUT));
    }

    /// Retires the flow in `slot` if its socket's connection is over: a socket in TIME-WAIT
    /// becomes a record, a CLOSED one is reaped. True if the flow went.
    fn retire_if_ended(&mut self, now: Instant, slot: usize) -> bool {
        let Some(flow) = self.flows.get(slot) else {
            return false;
        };
        if !matches!(flow.mode, FlowMode::Local) {
            return false;
        }
        let socket = flow.socket.get(&self.sockets);
        match socket.state() {
            tcp::State::Closed => {
                self.reap_if_closed(slot);
                true
            }
            tcp::State::TimeWait => {
                let unread = socket.recv_queue() as u32;
                let Some(mut flow) = self.flows.remove(slot) else {
                    return false;
                };
                self.release(&mut flow, "closed: TIME-WAIT", true);
                // Wire numbers: the client's from `recv_base` and what the app took (with the
                // bytes it took straight from packets), ours from `send_base`.
                let rcv_nxt = flow
                    .recv_base
                    .wrapping_add(flow.bytes_in as u32)
                    .wrapping_add(unread)
                    .wrapping_add(1);
                let snd_nxt = flow
                    .send_base
                    .wrapping_add(flow.mirror.total() as u32)
                    .wrapping_add(1);
                let wscale = flow
                    .record
                    .our_syn_ack
                    .and_then(|s| s.window_scale)
                    .unwrap_or(0);
                let tw = TimeWait {
                    id: flow.id,
                    key: flow.key,
                    app: flow.app_kind,
                    created: flow.created,
                    rcv_nxt,
                    snd_nxt,
                    ts_recent: flow
                        .record
                        .client_syn
                        .and_then(|s| s.timestamp)
                        .and(flow.record.client_tsval),
                    ts_off: flow.xlate.ts_off,
                    window: (flow.buffers.0 >> wscale).min(usize::from(u16::MAX)) as u16,
                    ingress: flow
                        .ingress
                        .filter(|_| flow.return_path != crate::flow::ReturnPath::Direct),
                    deadline: now + TIME_WAIT,
                };
                if self.time_wait.insert(tw) {
                    self.stats.time_wait_overflow += 1;
                    if self.stats.time_wait_overflow.is_power_of_two() {
                        tracing::warn!(
                            overflows = self.stats.time_wait_overflow,
                            "TIME-WAIT table full: the oldest record was dropped"
                        );
                    }
                }
                self.stats.time_wait = self.time_wait.len() as u64;
                true
            }
            _ => false,
        }
    }

    /// Acknowledges the client's FIN again for a connection in TIME-WAIT.
    fn time_wait_ack(&mut self, tw: &TimeWait) {
        let repr = TcpRepr {
            src_port: tw.key.service.port(),
            dst_port: tw.key.client.port(),
            control: TcpControl::None,
            seq_number: TcpSeqNumber(tw.snd_nxt as i32),
            ack_number: Some(TcpSeqNumber(tw.rcv_nxt as i32)),
            window_len: tw.window,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: tw.ts_recent.map(|tsecr| TcpTimestampRepr {
                tsval: tsval_now().wrapping_add(tw.ts_off),
                tsecr,
            }),
            payload: &[],
        };
        let packet = packet::emit_ipv4_tcp(*tw.key.service.ip(), *tw.key.client.ip(), &repr);
        self.stats.time_wait_acks += 1;
        match tw.ingress {
            Some(to) => {
                self.stats.forwarded_to_ingress += 1;
                self.forward.push(ForwardKind::ToIngress, to, &packet, 0);
            }
            // No flow has this 4-tuple: the transmit hook passes it as it is.
            None => self.tx.push(packet.len(), 0).copy_from_slice(&packet),
        }
    }

    fn reap_if_closed(&mut self, slot: usize) {
        let Some(flow) = self.flows.get(slot) else {
            return;
        };
        if !matches!(flow.mode, FlowMode::Local)
            || flow.socket.get(&self.sockets).state() != tcp::State::Closed
        {
            return;
        }
        let Some(mut flow) = self.flows.remove(slot) else {
            return;
        };
        // Closed from LAST-ACK or CLOSING: both FINs went; from anywhere else: a reset.
        let clean = flow.fin_delivered && flow.close_sent;
        self.release(&mut flow, "closed", clean);
    }

    /// Marks the flows whose rate limit lets them move bytes again for service in this turn.
    fn wake_paced(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.paced.len() {
            let (at, slot) = self.paced[i];
            if at <= now {
                self.paced.swap_remove(i);
                if let Some(flow) = self.flows.get_mut(slot) {
                    if let Some(p) = flow.pacer.as_mut() {
                        p.waiting = false;
                    }
                    if !flow.dirty {
                        flow.dirty = true;
                        self.dirty.push(slot);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// How many connections served here hold an allocation ([`Self::set_allocation`]).
    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Gives connection `id` its class's allocation (rate limit, send-buffer budget,
    /// scheduling priority; [`crate::pace`]), or takes it away (`None`). The new limits apply
    /// from the connection's next service, which is now.
    pub fn set_allocation(
        &mut self,
        now: Instant,
        id: u64,
        alloc: Option<crate::predict::class::Allocation>,
    ) -> Result<(), FlowError> {
        let slot = self.flows.find_id(id).ok_or(FlowError::NoSuchFlow(id))?;
        let flow = self.flows.get_mut(slot).ok_or(FlowError::NoSuchFlow(id))?;
        // A moved connection is only forwarded here: its owner allocates it.
        if let FlowMode::Moved { .. } = flow.mode {
            return Err(FlowError::WrongMode { id, mode: "moved" });
        }
        let had = flow.pacer.is_some();
        flow.pacer = match (flow.pacer, alloc) {
            // The same allocation again: the bucket carries on.
            (Some(p), Some(a)) if p.allocation() == a => Some(p),
            // A class change: the bucket carries over (no fresh burst).
            (Some(p), Some(a)) => Some(p.reallocate(a, now)),
            (_, a) => a.map(|a| crate::pace::Pacer::new(a, now)),
        };
        match (had, flow.pacer.is_some()) {
            (false, true) => self.allocated += 1,
            (true, false) => self.allocated -= 1,
            _ => {}
        }
        if !flow.dirty {
            flow.dirty = true;
            self.dirty.push(slot);
        }
        Ok(())
    }

    /// Loss probes ([`crate::probe`]): for every flow whose entry in the probe timer is due,
    /// makes smoltcp retransmit the earliest unacknowledged segment if the probe is due
    /// indeed, and puts the flow back under its next deadline while data is in flight.
    ///
    /// The timer holds each flow under the deadline it had when armed; ACKs that move the
    /// deadline later do not touch the timer (an ACK costs no heap operation), so an entry
    /// can be early: it is checked here and re-armed at the flow's real deadline. A flow is
    /// visited about once per probe timeout while it sends, not at every earlier flow's.
    fn probe_losses(&mut self, now: Instant) {
        while let Some(&std::cmp::Reverse((at, slot))) = self.probe_timer.peek() {
            if at > now {
                break;
            }
            self.probe_timer.pop();
            let Some(flow) = self.flows.get_mut(slot) else {
                continue;
            };
            if flow.probe.queued != Some(at) {
                // Stale: the flow was re-armed earlier, or the slot holds another flow.
                continue;
            }
            flow.probe.queued = None;
            let socket = match (&flow.mode, flow.socket.get_opt(&self.sockets)) {
                (FlowMode::Local, Some(s)) => s,
                _ => continue,
            };
            let unacked = socket.send_queue();
            let acked = flow.mirror.total().saturating_sub(unacked as u64);
            if !flow
                .probe
                .observe(now, flow.send_base.wrapping_add(acked as u32))
            {
                continue;
            }
            let Some(due) = flow.probe.deadline(PROBE_SEGMENT) else {
                // Probed out: smoltcp's own timeout acts; an ACK brings the flow back.
                continue;
            };
            // smoltcp's fast retransmit resends data, in the states that take a plain ACK,
            // towards a client whose window stays open after the window update below.
            let state = socket.state();
            let can_probe = unacked > 0
                && flow.record.client_window >= 3
                && matches!(
                    state,
                    tcp::State::Established | tcp::State::CloseWait | tcp::State::FinWait1
                );
            if now >= due && !can_probe {
                // Due, but not for a probe (only a FIN in flight, a closed window, a state
                // that answers a plain ACK otherwise): the timeout backs off as if probed.
                flow.probe.probed(now);
            }
            if now >= due && can_probe {
                // The client's next sequence number, in the socket's numbers (the ACK goes
                // straight to smoltcp): what it sent, plus its FIN if it closed.
                let rcv_nxt = flow
                    .recv_base
                    .wrapping_add(flow.bytes_in as u32)
                    .wrapping_add(socket.recv_queue() as u32)
                    .wrapping_add(u32::from(state == tcp::State::CloseWait))
                    .wrapping_sub(flow.xlate.rcv_off);
                let snd_una_local = flow
                    .send_base
                    .wrapping_add(acked as u32)
                    .wrapping_sub(flow.xlate.seq_off);
                let key = flow.key;
                // One or two units below the client's window, alternating from probe to
                // probe: the first ACK must differ from the window smoltcp holds, which
                // after an earlier probe is that probe's, to count as a window update.
                let window =
                    flow.record.client_window - 1 - u16::from(flow.probe.probes() % 2 == 1);
                flow.probe.probed(now);
                let probes = flow.probe.probes();
                self.stats.loss_probes += 1;
                tracing::debug!(
                    id = flow.id,
                    client = %key.client,
                    in_flight = flow.probe.in_flight(),
                    probes,
                    "no ACK for a probe timeout: retransmitting the earliest unacknowledged segment"
                );
                // A window update resets smoltcp's duplicate-ACK count; three duplicates of
                // it start smoltcp's fast retransmit. The window is a unit or two smaller
                // than the client's, never larger; the client's next ACK sets it right.
                let repr = TcpRepr {
                    src_port: key.client.port(),
                    dst_port: key.service.port(),
                    control: TcpControl::None,
                    seq_number: TcpSeqNumber(rcv_nxt as i32),
                    ack_number: Some(TcpSeqNumber(snd_una_local as i32)),
                    window_len: window,
                    window_scale: None,
                    max_seg_size: None,
                    sack_permitted: false,
                    sack_ranges: [None; 3],
                    timestamp: None,
                    payload: &[],
                };
                let ack = packet::emit_ipv4_tcp(*key.client.ip(), *key.service.ip(), &repr);
                let mut dev = TurnDevice {
                    rx: None,
                    tx: &mut self.tx,
                    caps: &self.caps,
                };
                for _ in 0..4 {
                    dev.rx = Some(&ack);
                    self.iface
                        .poll_ingress_single(now, &mut dev, &mut self.sockets);
                }
            }
            if let Some(flow) = self.flows.get_mut(slot) {
                arm_probe(&mut self.probe_timer, &mut flow.probe, slot);
                // A deadline never lies in the past once handled (a due probe was sent or
                // backed off): this loop ends.
                debug_assert!(flow.probe.queued.is_none_or(|q| q > now));
            }
        }
    }

    /// What a connection that ended held: its socket, its slot, its half-open count; and
    /// its KPIs for [`Self::take_ended`]. `clean`: it ended with both FINs exchanged (not
    /// reset, aborted or timed out).
    fn release(&mut self, flow: &mut Flow, how: &'static str, clean: bool) {
        if flow.pacer.take().is_some() {
            self.allocated = self.allocated.saturating_sub(1);
        }
        if !flow.half_open {
            if self.ended.len() >= ENDED_KEPT {
                self.ended.pop_front();
                self.stats.kpis_dropped += 1;
            }
            self.ended.push_back(ConnEnd {
                id: flow.id,
                ingress: flow
                    .ingress
                    .map(|r| (crate::predict::NodeId(r.peer.0), r.flow)),
                requests: flow.kpi.requests,
                latency: flow.kpi.mean_latency(),
                error: !clean,
            });
        }
        self.half_open -= usize::from(flow.half_open);
        flow.socket.take(&mut self.sockets);
        if flow.counted {
            self.budget.release(*flow.key.client.ip());
        }
        self.stats.conns_closed += 1;
        tracing::debug!(
            id = flow.id,
            client = %flow.key.client,
            bytes_in = flow.bytes_in,
            bytes_out = flow.bytes_out(),
            "{how}"
        );
    }

    fn sweep(&mut self, now: Instant) {
        self.next_sweep = now + SWEEP_INTERVAL;
        self.tx.trim(TX_BUFFERS_KEPT);
        if self.time_wait.expire(now) > 0 {
            self.stats.time_wait = self.time_wait.len() as u64;
        }
        let slots: Vec<usize> = self.flows.slots().collect();
        let mut compactions = 0;
        let mut grown = 0;
        for slot in slots {
            let Some(flow) = self.flows.get_mut(slot) else {
                continue;
            };
            let out = flow.bytes_out();
            flow.rates.update(now, flow.bytes_in, out);
            match flow.mode {
                // Parked (idle, established, nothing in flight): nothing below applies until
                // one of our deadlines comes near; then it rejoins the set.
                FlowMode::Local
                    if flow.socket.is_parked()
                        && Self::wake_at(&self.services, flow).is_none_or(|at| now < at) => {}
                FlowMode::Local => {
                    let socket = flow.socket.get_mut(&mut self.sockets);
                    // smoltcp retransmits a SYN-ACK forever: a spoofed SYN flood would hold
                    // `max_connections` slots for good. Give handshakes a deadline.
                    if socket.state() == tcp::State::SynReceived
                        && now - flow.created > HANDSHAKE_TIMEOUT
                    {
                        socket.abort();
                        self.stats.handshake_timeouts += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "handshake timed out");
                        if !flow.dirty {
                            flow.dirty = true;
                            self.dirty.push(slot);
                        }
                    }
                    // Our FIN is out and the client has gone quiet (no ACK of the FIN, or no
                    // FIN of its own): as Linux's FIN timeout, give up.
                    let closing = matches!(
                        socket.state(),
                        tcp::State::FinWait1
                            | tcp::State::FinWait2
                            | tcp::State::Closing
                            | tcp::State::LastAck
                    );
                    // The service's deadlines: a request head that takes too long, and a
                    // connection idle between requests (graceful close, as nginx).
                    let service = self.services[usize::from(flow.key.service.port())].as_ref();
                    let (idle, head, keepalive) = service.map_or((None, None, None), |s| {
                        (s.idle_timeout, s.head_timeout, s.keepalive)
                    });
                    let mut close_why = None;
                    if flow.app.in_request_head() {
                        let since = *flow.head_since.get_or_insert(now);
                        if head.is_some_and(|h| now - since >= h) {
                            close_why = Some("request head not complete in time");
                            self.stats.head_timeouts += 1;
                        }
                    } else {
                        flow.head_since = None;
                    }
                    if close_why.is_none()
                        && idle.is_some_and(|t| now - flow.active_at >= t)
                        && socket.state() == tcp::State::Established
                        && socket.send_queue() == 0
                        && flow.app.is_quiescent()
                    {
                        close_why = Some("idle between requests");
                        self.stats.idle_closed += 1;
                    }
                    if let Some(why) = close_why
                        && !flow.close_sent
                    {
                        socket.close();
                        socket.set_ack_delay(None);
                        flow.close_sent = true;
                        tracing::debug!(id = flow.id, client = %flow.key.client, why, "closing");
                        if !flow.dirty {
                            flow.dirty = true;
                            self.dirty.push(slot);
                        }
                    }
                    // A client that answered none of the keepalive probes is gone.
                    if let Some(ka) = keepalive
                        && matches!(
                            socket.state(),
                            tcp::State::Established | tcp::State::CloseWait
                        )
                        && now - flow.last_rx >= ka * (KEEPALIVE_PROBES + 1)
                    {
                        socket.abort();
                        self.stats.keepalive_timeouts += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "no answer to keepalive probes: reset");
                        if !flow.dirty {
                            flow.dirty = true;
                            self.dirty.push(slot);
                        }
                    }
                    if closing && now - flow.last_rx > UNACKED_TIMEOUT {
                        socket.abort();
                        self.stats.close_timeouts += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "closing connection timed out");
                        if !flow.dirty {
                            flow.dirty = true;
                            self.dirty.push(slot);
                        }
                    }
                    self.reap_if_closed(slot);
                }
                FlowMode::Moved {
                    ended: Some(at), ..
                } if now - at >= MOVED_LINGER => {
                    if let Some(flow) = self.flows.remove(slot) {
                        self.stats.moved_closed += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "moved connection ended");
                    }
                }
                FlowMode::Moved {
                    client_fin: true,
                    ended: None,
                    last_packet,
                    ..
                } if now - last_packet >= MOVED_IDLE_AFTER_FIN => {
                    if let Some(flow) = self.flows.remove(slot) {
                        self.stats.moved_closed += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "moved connection idle since the client's FIN: entry removed");
                    }
                }
                FlowMode::Frozen { since, .. } if now - since >= self.config.freeze_timeout => {
                    let id = flow.id;
                    self.stats.freeze_timeouts += 1;
                    tracing::warn!(
                        id,
                        client = %flow.key.client,
                        frozen_s = (now - since).secs(),
                        "connection frozen too long: thawed, its queued packets delivered"
                    );
                    let _ = self.thaw(now, id);
                }
                // Moved on to a third node: forwarding what the ingress node still sends
                // here, until it has been told for long enough.
                FlowMode::Moved { last_packet, .. }
                    if flow.ingress.is_some() && now - last_packet >= FORWARDER_IDLE =>
                {
                    if let Some(flow) = self.flows.remove(slot) {
                        self.stats.moved_closed += 1;
                        tracing::debug!(id = flow.id, client = %flow.key.client, "forwarding entry of a connection moved on removed: idle");
                    }
                }
                // Where its packets enter, a moved connection nobody has sent a packet of for
                // twice the time the owner's keepalive gives a silent client (the owner's
                // probes, or the client's answers to them, would have passed here): the owner
                // or the client is gone without a FIN or RST passing here.
                FlowMode::Moved {
                    ended: None,
                    last_packet,
                    ..
                } if flow.ingress.is_none()
                    && self.services[usize::from(flow.key.service.port())]
                        .as_ref()
                        .and_then(|s| s.keepalive)
                        .is_some_and(|ka| {
                            now - last_packet >= ka * (2 * (KEEPALIVE_PROBES + 1))
                        }) =>
                {
                    if let Some(flow) = self.flows.remove(slot) {
                        self.stats.moved_closed += 1;
                        self.stats.moved_expired += 1;
                        tracing::info!(
                            id = flow.id,
                            client = %flow.key.client,
                            silent_s = (now - last_packet).secs(),
                            "moved connection silent past its keepalive: entry removed"
                        );
                    }
                }
                FlowMode::Frozen { .. } | FlowMode::Moved { .. } => {}
            }
            // Idle connections give their memory back, a bounded number per sweep (each
            // runs a synthetic handshake).
            if compactions < MAX_COMPACTIONS_PER_SWEEP && self.compaction_due(now, slot) {
                compactions += usize::from(self.compact(now, slot));
            }
            if self.park_due(now, slot)
                && let Some(flow) = self.flows.get_mut(slot)
            {
                flow.socket.park(&mut self.sockets);
                self.stats.parked += 1;
            }
            // Frozen ones too: a move given up thaws them with their buffers.
            if let Some(flow) = self.flows.get(slot)
                && matches!(flow.mode, FlowMode::Local | FlowMode::Frozen { .. })
            {
                grown += self.growth_held(flow);
            }
        }
        self.grown = grown;
        self.stats.tx_grown_bytes = grown as u64;
    }

    /// Hands every packet ready to go to `write`, after the per-flow outbound hook, and empties
    /// the queue.
    pub fn drain_transmit(&mut self, mut write: impl FnMut(&[u8])) {
        self.drain_transmit_batch(|bufs, _gso, headroom| {
            for b in bufs {
                write(&b[headroom..]);
            }
        });
    }

    /// Like [`drain_transmit`](Self::drain_transmit), but hands all packets at once, as buffers
    /// with [`StackConfig::tx_headroom`] free bytes in front, so the driver can batch them (and
    /// let the TUN device coalesce them), with each packet's TSO segment size (0: none; see
    /// [`StackConfig::tso_max`]). `write` may modify and grow the buffers.
    pub fn drain_transmit_batch(&mut self, write: impl FnOnce(&mut [Vec<u8>], &[u16], usize)) {
        let n = self.tx.len;
        let headroom = self.tx.headroom;
        let fix_checksum = self.caps.checksum.tcp.tx();
        // Packets for the TUN device are compacted to the front; those of flows whose
        // packets enter at another node go to the forward queue instead.
        let mut kept = 0;
        for i in 0..n {
            let buf = &mut self.tx.bufs[i];
            self.stats.packets_out += 1;
            self.stats.bytes_out += (buf.len() - headroom) as u64;
            let mut to_ingress = None;
            if let Some(out) = packet::outbound(&buf[headroom..])
                && let Some(slot) = self.flows.lookup(&out.key)
                && let Some(flow) = self.flows.get_mut(slot)
            {
                flow.packets_out += 1;
                if out.flags.syn || seq_gt(out.seq_end(), flow.snd_nxt) {
                    flow.snd_nxt = out.seq_end();
                }
                let syn_ack = out.flags.syn && out.flags.ack;
                if syn_ack && let Some(wire_isn) = flow.wire_isn {
                    flow.xlate.seq_off = wire_isn.wrapping_sub(out.seq);
                }
                if self.config.tcp.loss_probes
                    && out.payload_len > 0
                    && !out.flags.syn
                    && matches!(flow.mode, FlowMode::Local)
                    && let Some(socket) = flow.socket.get_opt(&self.sockets)
                {
                    let acked = flow
                        .mirror
                        .total()
                        .saturating_sub(socket.send_queue() as u64);
                    let in_flight = flow.probe.sent(
                        self.now,
                        flow.send_base.wrapping_add(acked as u32),
                        out.seq_end().wrapping_add(flow.xlate.seq_off),
                    );
                    if in_flight {
                        arm_probe(&mut self.probe_timer, &mut flow.probe, slot);
                    }
                }
                // Pure ACKs of a restored flow carry at least what the previous owner had
                // sent.
                let floor = flow
                    .restored
                    .map(|r| r.claimed)
                    .filter(|&claimed| seq_gt(claimed, flow.snd_nxt));
                if !flow.xlate.is_identity() || floor.is_some() {
                    let _ = flow
                        .xlate
                        .outbound(&mut buf[headroom..], fix_checksum, floor);
                }
                // The furthest edge advertised: smoltcp's scaled window rounds down, and an
                // edge it moves back by a few bytes must not cut data the client sent in
                // good faith (RFC 9293 asks receivers never to shrink their window).
                if let Some(ack) = out.ack {
                    let edge = direct::advertised_edge(flow, &out, ack);
                    if flow.rx_edge.is_none_or(|e| seq_gt(edge, e)) {
                        flow.rx_edge = Some(edge);
                    }
                }
                let tsval = out.tsval.map(|t| t.wrapping_add(flow.xlate.ts_off));
                if syn_ack {
                    flow.record.our_syn_ack = packet::syn_options(&buf[headroom..]);
                    flow.send_base = out.seq.wrapping_add(flow.xlate.seq_off).wrapping_add(1);
                }
                if tsval.is_some() {
                    flow.record.our_tsval = tsval;
                }
                if flow.return_path != crate::flow::ReturnPath::Direct {
                    to_ingress = flow.ingress;
                }
            }
            match to_ingress {
                Some(to) => {
                    let gso = self.tx.gso_sizes[i];
                    self.stats.forwarded_to_ingress += 1;
                    self.forward
                        .push(ForwardKind::ToIngress, to, &buf[headroom..], gso);
                }
                None => {
                    self.tx.bufs.swap(kept, i);
                    self.tx.gso_sizes.swap(kept, i);
                    kept += 1;
                }
            }
        }
        if kept > 0 {
            write(
                &mut self.tx.bufs[..kept],
                &self.tx.gso_sizes[..kept],
                headroom,
            );
        }
        self.tx.clear();
    }

    /// Hands every packet that leaves through the tunnel to `f` (see [`Forwarded`]) and
    /// empties that queue. Call after [`drain_transmit_batch`](Self::drain_transmit_batch).
    pub fn drain_forward(&mut self, f: impl FnMut(Forwarded<'_>)) {
        self.forward.drain(f);
    }

    /// Packets waiting in the forward queue.
    pub fn forward_len(&self) -> usize {
        self.forward.len()
    }

    /// When [`poll`](Self::poll) should run next, at the latest (never before `now`).
    pub fn poll_at(&mut self, now: Instant) -> Instant {
        // smoltcp says "now" as `Instant::from_millis(0)`.
        let at = match self.iface.poll_at(now, &self.sockets) {
            Some(t) if t < self.next_sweep => t,
            _ => self.next_sweep,
        };
        let at = self.probe_timer.peek().map_or(at, |r| r.0.0.min(at));
        let at = self.paced.iter().fold(at, |at, &(p, _)| p.min(at));
        // Flows resumed since the last poll are served at once.
        if !self.dirty.is_empty() {
            return now;
        }
        at.max(now)
    }

    /// How long the driver may sleep before calling [`poll`](Self::poll).
    ///
    /// Use this rather than subtracting instants: smoltcp's `Instant - Instant` is an absolute
    /// difference.
    pub fn poll_delay(&mut self, now: Instant) -> Duration {
        let at = self.poll_at(now);
        Duration::from_micros((at.total_micros() - now.total_micros()).max(0) as u64)
    }

    /// Refuses new connections (with RST) and restores from now on; open ones carry on.
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    /// Stops accepting connections and closes every open one (FIN after queued data). Frozen
    /// flows are thawed first: nothing is left half-moved.
    pub fn begin_shutdown(&mut self, now: Instant) {
        self.accepting = false;
        let frozen: Vec<u64> = self
            .flows
            .iter()
            .filter(|f| matches!(f.mode, FlowMode::Frozen { .. }))
            .map(|f| f.id)
            .collect();
        for id in frozen {
            let _ = self.thaw(now, id);
        }
        let moved = self
            .flows
            .iter()
            .filter(|f| matches!(f.mode, FlowMode::Moved { ended: None, .. }))
            .count();
        if moved > 0 {
            tracing::warn!(
                moved,
                "connections moved to other nodes still enter here; they end when this node stops"
            );
        }
        let slots: Vec<usize> = self.flows.slots().collect();
        // A flow held for a move (at its accept, or draining for a capture) is served first:
        // its app answers what the client sent before the FIN.
        self.hold_accepted = false;
        self.accepted_held.clear();
        for &slot in &slots {
            if let Some(flow) = self.flows.get_mut(slot)
                && matches!(flow.mode, FlowMode::Local)
                && flow.quiescing
            {
                flow.quiescing = false;
                self.serve(now, slot);
            }
        }
        for slot in slots {
            if let Some(flow) = self.flows.get_mut(slot)
                && matches!(flow.mode, FlowMode::Local)
            {
                let socket = flow.socket.get_mut(&mut self.sockets);
                if socket.state() == tcp::State::SynReceived {
                    // smoltcp would take the ACK of its SYN-ACK for the ACK of the FIN: the
                    // client never got a connection to close, so refuse it.
                    socket.abort();
                } else {
                    socket.close();
                }
                flow.close_sent = true;
                if !flow.dirty {
                    flow.dirty = true;
                    self.dirty.push(slot);
                }
            }
        }
    }

    /// Resets every connection still open here (after the shutdown deadline).
    pub fn abort_all(&mut self, now: Instant) {
        let frozen: Vec<u64> = self
            .flows
            .iter()
            .filter(|f| matches!(f.mode, FlowMode::Frozen { .. }))
            .map(|f| f.id)
            .collect();
        for id in frozen {
            let _ = self.thaw(now, id);
        }
        let slots: Vec<usize> = self.flows.slots().collect();
        for slot in slots {
            if let Some(flow) = self.flows.get_mut(slot)
                && matches!(flow.mode, FlowMode::Local)
            {
                flow.socket.get_mut(&mut self.sockets).abort();
                if !flow.dirty {
                    flow.dirty = true;
                    self.dirty.push(slot);
                }
            }
        }
    }

    /// Connections on this stack (TIME-WAIT and moved ones included).
    pub fn connection_count(&self) -> usize {
        self.flows.len()
    }

    /// Connections served here that still have a peer to talk to: all but TIME-WAIT, CLOSED
    /// and moved ones. A shutdown is complete when this reaches zero.
    pub fn live_connection_count(&self) -> usize {
        self.flows
            .iter()
            .filter(|f| {
                self.socket_of(f).is_some_and(|s| {
                    !matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed)
                })
            })
            .count()
    }

    /// The socket of `flow`: in the set while local, held aside while frozen, none once moved.
    fn socket_of<'a>(&'a self, flow: &'a Flow) -> Option<&'a tcp::Socket<'static>> {
        match &flow.mode {
            FlowMode::Local => Some(flow.socket.get(&self.sockets)),
            FlowMode::Frozen { socket, .. } => Some(socket),
            FlowMode::Moved { .. } => None,
        }
    }

    /// Counters.
    pub fn stats(&self) -> &StackStats {
        &self.stats
    }

    /// One row per connection in TIME-WAIT (a record: no socket, no app).
    pub fn time_wait_conns(&self, now: Instant) -> Vec<ConnInfo> {
        self.time_wait
            .iter()
            .map(|tw| ConnInfo {
                id: tw.id,
                client: tw.key.client,
                service: tw.key.service,
                state: tcp::State::TimeWait.to_string(),
                app: tw.app,
                mode: "time-wait".to_owned(),
                owner: None,
                ingress: tw.ingress,
                return_path: None,
                age_ms: (now - tw.created).total_millis(),
                bytes_in: 0,
                bytes_out: 0,
                rate_in: 0.0,
                rate_out: 0.0,
                send_queue: 0,
                recv_queue: 0,
                handshake: HandshakeRecord::default(),
                parked: false,
                srtt_us: None,
                send_buffer: 0,
                growing: false,
            })
            .collect()
    }

    /// One row per connection.
    pub fn conns(&self, now: Instant) -> Vec<ConnInfo> {
        self.flows
            .iter()
            .map(|f| {
                let socket = self.socket_of(f);
                ConnInfo {
                    id: f.id,
                    client: f.key.client,
                    service: f.key.service,
                    state: socket.map_or_else(|| "-".to_owned(), |s| s.state().to_string()),
                    app: f.app_kind,
                    mode: f.mode.as_str().to_owned(),
                    owner: match f.mode {
                        FlowMode::Moved { to, .. } => Some(to),
                        _ => None,
                    },
                    ingress: f.ingress,
                    return_path: f.ingress.map(|_| f.return_path),
                    age_ms: (now - f.created).total_millis(),
                    bytes_in: f.bytes_in,
                    bytes_out: f.bytes_out(),
                    rate_in: f.rates.rate_in,
                    rate_out: f.rates.rate_out,
                    send_queue: socket.map_or(0, |s| s.send_queue()),
                    recv_queue: socket.map_or(0, |s| s.recv_queue()),
                    handshake: f.record,
                    parked: matches!(f.mode, FlowMode::Local) && f.socket.is_parked(),
                    // Served elsewhere: the estimate here is the past owner's.
                    srtt_us: match f.mode {
                        FlowMode::Moved { .. } => None,
                        _ => f.probe.srtt().map(|d| d.total_micros()),
                    },
                    send_buffer: f.buffers.1,
                    growing: f.growth.draining.is_some(),
                }
            })
            .collect()
    }

    /// The connections that ended here since the last call, with their KPIs (oldest
    /// first; at most [`ENDED_KEPT`] are kept between calls).
    pub fn take_ended(&mut self) -> Vec<ConnEnd> {
        self.ended.drain(..).collect()
    }

    /// What the predictor samples of every connection
    /// ([`crate::predict::node::ConnSample`]): cumulative bytes each way, accept time, the
    /// app's priority class, whether it is served here, whether it may move (served here, in
    /// a state that moves, its packets entering here), and the bytes a move would copy.
    /// Packet and request counts are not kept per connection (0).
    pub fn predict_samples(&self) -> Vec<crate::predict::node::ConnSample> {
        use crate::predict::Priority;
        use crate::predict::node::ConnSample;
        use crate::predict::profile::{ConnCounters, ConnReport};
        self.flows
            .iter()
            .map(|f| {
                let socket = self.socket_of(f);
                let movable_state = socket.is_some_and(|s| {
                    matches!(
                        s.state(),
                        tcp::State::Established
                            | tcp::State::CloseWait
                            | tcp::State::FinWait1
                            | tcp::State::Closing
                            | tcp::State::LastAck
                    )
                });
                ConnSample {
                    report: ConnReport {
                        conn: f.id,
                        counters: ConnCounters {
                            bytes_in: f.bytes_in,
                            bytes_out: f.bytes_out(),
                            packets_in: f.packets_in,
                            packets_out: f.packets_out,
                            requests_in: f.kpi.requests,
                            requests_out: f.kpi.responses,
                        },
                        opened_at: f.created,
                        priority: match f.app_kind {
                            AppKind::Sink | AppKind::Source => Priority::Background,
                            AppKind::Http => Priority::Normal,
                            AppKind::Echo => Priority::Interactive,
                        },
                    },
                    here: socket.is_some(),
                    movable: matches!(f.mode, FlowMode::Local)
                        && movable_state
                        && f.ingress.is_none(),
                    buffered: socket.map_or(0, |s| (s.send_queue() + s.recv_queue()) as u64),
                    ingress: f
                        .ingress
                        .map(|r| (crate::predict::NodeId(r.peer.0), r.flow)),
                }
            })
            .collect()
    }

    /// Freezes the flow `id`: its socket leaves the socket set (no timer, no transmission,
    /// no delivery) and its inbound packets are queued from now on.
    pub fn freeze(&mut self, now: Instant, id: u64) -> Result<(), FlowError> {
        let slot = self.flows.find_id(id).ok_or(FlowError::NoSuchFlow(id))?;
        let flow = self.flows.get_mut(slot).ok_or(FlowError::NoSuchFlow(id))?;
        if !matches!(flow.mode, FlowMode::Local) {
            return Err(FlowError::WrongMode {
                id,
                mode: flow.mode.as_str(),
            });
        }
        self.cancel_drain(slot);
        let flow = self.flows.get_mut(slot).ok_or(FlowError::NoSuchFlow(id))?;
        let socket = Box::new(
            flow.socket
                .take(&mut self.sockets)
                .ok_or(FlowError::WrongMode {
                    id,
                    mode: "without a socket",
                })?,
        );
        flow.quiescing = false;
        flow.mode = FlowMode::Frozen {
            socket,
            queue: VecDeque::new(),
            queued_bytes: 0,
            since: now,
            moving_to: None,
            early_replies: Vec::new(),
        };
        Ok(())
    }

    /// Stops serving local flow `id`'s app ahead of a move, so that its socket's send buffer
    /// drains before the freeze: the snapshot then carries only what the client has not
    /// acknowledged yet, and the client reads what was buffered while the move begins,
    /// instead of waiting for it at the target. Received bytes wait in the socket (they move
    /// with it). Returns the bytes still queued to send (unsent and unacknowledged; see
    /// [`send_queued`](Self::send_queued)). [`freeze`](Self::freeze) and
    /// [`resume`](Self::resume) end it.
    pub fn quiesce(&mut self, id: u64) -> Result<usize, FlowError> {
        let slot = self.flows.find_id(id).ok_or(FlowError::NoSuchFlow(id))?;
        let flow = self.flows.get_mut(slot).ok_or(FlowError::NoSuchFlow(id))?;
        if !matches!(flow.mode, FlowMode::Local) {
            return Err(FlowError::WrongMode {
                id,
                mode: flow.mode.as_str(),
            });
        }
        flow.quiescing = true;
        Ok(flow.socket.get(&self.sockets).send_queue())
    }

    /// Bytes local flow `id` still has queued to send, unacknowledged ones included; `None`
    /// when it is gone or not local.
    pub fn send_queued(&self, id: u64) -> Option<usize> {
        let flow = self.flows.get(self.flows.find_id(id)?)?;
        matches!(flow.mode, FlowMode::Local).then(|| flow.socket.get(&self.sockets).send_queue())
    }

    /// Holds every connection accepted from now on (its handshake completed, as the next
    /// [`poll`](Self::poll) sees it) before its app sees a byte, as
    /// [`quiesce`](Self::quiesce) does, and lists it for
    /// [`take_accepted_held`](Self::take_accepted_held): the driver then moves it (a shadow
    /// trial's diversion, `docs/prediction.md`) or [`resume`](Self::resume)s it. What the
    /// client sends meanwhile waits, acknowledged, in the socket (and moves with it).
    /// Connections accepted by SYN cookie are never held.
    pub fn set_hold_accepted(&mut self, on: bool) {
        self.hold_accepted = on;
    }

    /// The connections held at their accept since the last call (see
    /// [`set_hold_accepted`](Self::set_hold_accepted)).
    pub fn take_accepted_held(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.accepted_held)
    }

    /// Whether local flow `id`'s app is held for a move ([`quiesce`](Self::quiesce), or at
    /// its accept): false once it is frozen, served again, or gone.
    pub fn is_held(&self, id: u64) -> bool {
        self.flows
            .find_id(id)
            .and_then(|slot| self.flows.get(slot))
            .is_some_and(|f| matches!(f.mode, FlowMode::Local) && f.quiescing)
    }

    /// Serves flow `id`'s app again after [`quiesce`](Self::quiesce) (the move did not
    /// happen). A flow that is gone or frozen is left as it is.
    pub fn resume(&mut self, id: u64) {
        let Some(slot) = self.flows.find_id(id) else {
            return;
        };
        if let Some(flow) = self.flows.get_mut(slot)
            && flow.quiescing
        {
            flow.quiescing = false;
            if !flow.dirty {
                flow.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Thaws the frozen flow `id`: its socket rejoins the set and its queued packets are
    /// delivered, in order, then new ones. Returns how many were queued.
    pub fn thaw(&mut self, now: Instant, id: u64) -> Result<usize, FlowError> {
        Self::set_clock(now);
        let slot = self.flows.find_id(id).ok_or(FlowError::NoSuchFlow(id))?;
        let flow = self.flows.get_mut(slot).ok_or(FlowError::NoSuchFlow(id))?;
        let (socket, queue) = match std::mem::replace(&mut flow.mode, FlowMode::Local) {
            FlowMode::Frozen {
                socket,
                queue,
                queued_bytes,
                ..
            } => {
                self.frozen_bytes = self.frozen_bytes.saturating_sub(queued_bytes);
                (socket, queue)
            }
            m => {
                let mode = m.as_str();
                flow.mode = m;
                return Err(FlowError::WrongMode { id, mode });
            }
        };
        flow.socket = SocketPlace::InSet(self.sockets.add(*socket));
        if !flow.dirty {
            flow.dirty = true;
            self.dirty.push(slot);
        }
        let n = queue.len();
        let key = flow.key;
        for packet in queue {
            // Queued packets were classified on arrival; they pass the hook again (a restored
            // flow translates them).
            let mut packet = packet;
            if let Ok(inbound) = packet::classify_with(&packet, |a| a == *key.service.ip(), false) {
                self.deliver(now, slot, &inbound, &mut packet);
            }
        }
        Ok(n)
    }

    /// How long flow `id` has been frozen, if it is.
    pub fn frozen_for(&self, now: Instant, id: u64) -> Option<Duration> {
        match self.flows.get(self.flows.find_id(id)?)?.mode {
            FlowMode::Frozen { since, .. } => Some(now - since),
            _ => None,
        }
    }

    /// Copies the bytes of flow `id` that smoltcp holds unacknowledged or unsent.
    pub fn unacked_bytes(&mut self, id: u64) -> Result<Vec<u8>, FlowError> {
        let slot = self.flows.find_id(id).ok_or(FlowError::NoSuchFlow(id))?;
        let flow = self.flows.get(slot).ok_or(FlowError::NoSuchFlow(id))?;
        let queued = self
            .socket_of(flow)
            .ok_or(FlowError::WrongMode { id, mode: "moved" })?
            .send_queue();
        let mut out = Vec::with_capacity(queued);
        flow.mirror
            .copy_last(queued, &mut out)
            .ok_or(FlowError::WrongMode {
                id,
                mode: "unmirrored",
            })?;
        Ok(out)
    }

    /// The smoltcp socket of a flow that has one (local or frozen), for tests and capture.
    pub fn socket(&self, id: u64) -> Option<&tcp::Socket<'static>> {
        self.socket_of(self.flows.get(self.flows.find_id(id)?)?)
    }
}

/// Puts the flow in `slot`, whose loss probe is `probe`, under its probe deadline in `timer`,
/// unless it is held there already under that deadline or an earlier one (a later deadline
/// is found when the earlier entry comes due: see `Stack::probe_losses`).
/// Accounts for `n` bytes the app of a flow took from the client at `now` (`work` passes
/// done on them): the flow's KPIs, its `bytes_in` and its last activity, and the stack's
/// counters.
fn took(
    (kpi, bytes_in, active_at): (&mut crate::flow::FlowKpi, &mut u64, &mut Instant),
    stats: &mut StackStats,
    n: usize,
    work: u32,
    now: Instant,
) {
    kpi.took(now, n);
    *bytes_in += n as u64;
    *active_at = now;
    stats.app_bytes_in += n as u64;
    if work > 0 {
        stats.work_bytes += n as u64;
    }
}

fn arm_probe(
    timer: &mut std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize)>>,
    probe: &mut crate::probe::LossProbe,
    slot: usize,
) {
    if let Some(at) = probe.deadline(PROBE_SEGMENT)
        && probe.queued.is_none_or(|q| at < q)
    {
        probe.queued = Some(at);
        timer.push(std::cmp::Reverse((at, slot)));
    }
}
