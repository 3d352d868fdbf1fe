//! The node driver: TUN device, worker threads, control socket, signals.
//!
//! Thin by design: everything with logic in it lives in [`flowshift_core::stack`]. Each worker owns one
//! TUN queue (multiqueue: the kernel keeps a flow on the queue its replies are written to) and
//! one [`Stack`], and runs a mio loop that sleeps until the TUN queue is readable, a control
//! message arrives (a [`mio::Waker`]), or smoltcp's next timer.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::time::Instant;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::config::Config;
use crate::control::{self, Handler, Reply, Request};
use crate::metrics::{self, NodeGauges};
use crate::netlink;
use crate::offload;
use crate::predict::Predict;
use crate::tunnel;
use crate::tunnel::migrate::{ConnOutcome, MigrateReport, OfferResult};
use flowshift_core::coalesce::Coalescer;
use flowshift_core::flow::PeerRef;
use flowshift_core::flow::Remote;
use flowshift_core::predict::NodeId;
use flowshift_core::predict::lease::LeaseEvent;
use flowshift_core::predict::node::ConnSample;
use flowshift_core::predict::node::{NodePredictor, Observation, Outcome, PeerSample};
use flowshift_core::predict::plan::ReturnPath;
use flowshift_core::predict::profile::NodeReport;
use flowshift_core::predict::shadow::TrialEvent;
use flowshift_core::segment::segment;
use flowshift_core::stack::{CaptureError, ForwardKind, RestoreError, RestoreParams};
use flowshift_core::stack::{
    ConnInfo, ConnectionBudget, FlowError, Stack, StackConfig, StackStats,
};
use flowshift_statesync::envelope::{EnvelopeKind, EnvelopeRepr, HEADER_LEN};
use flowshift_statesync::protocol::{MigrationId, RefuseReason};
use flowshift_statesync::snapshot::ConnSnapshot;

const TUN: Token = Token(0);
const WAKER: Token = Token(1);
/// Packets read per turn before the worker serves its stack (fairness, bounded latency).
const READ_BATCH: usize = 256;
/// Largest socket buffer a connection moved here may bring (its window scale comes from it).
const MAX_RESTORED_BUFFER: usize = 16 << 20;
/// Largest TCP segment handed to the kernel for segmentation (TSO), IP header included.
const TSO_MAX: usize = 65_000;
/// How long a control request waits for each worker's answer. A worker answers within one
/// turn of its loop; only a stuck worker takes this long.
const WORKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of forwarded datagrams handed to the tunnel thread at a time.
const FORWARD_PIECE: usize = 64 * 1024;
/// Answers slower than this are logged.
const SLOW_WORKER_ANSWER: Duration = Duration::from_millis(500);

/// Errors that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The TUN device could not be created or configured.
    #[error("TUN device {name}: {source}")]
    Tun {
        /// Interface name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// A route could not be installed.
    #[error(transparent)]
    Route(#[from] netlink::NetlinkError),
    /// The control socket could not be bound.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The tunnel could not start.
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    /// The metrics listener could not be bound.
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A worker thread panicked (a bug): the node shut down rather than run on without the
    /// flows of its TUN queue.
    #[error("worker {0} panicked; the node shut down (see the log above)")]
    WorkerPanicked(usize),
    /// A thread, poller or signal handler could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> NodeError {
    move |source| NodeError::Setup { what, source }
}

/// Messages to a worker, from the control and tunnel threads.
/// A snapshot to restore, with how its packets reach this node.
#[derive(Debug)]
pub(crate) struct RestoreItem {
    /// The flow's id at the source.
    pub(crate) flow: u64,
    pub(crate) snapshot: ConnSnapshot,
    /// Where its packets enter, when not here.
    pub(crate) ingress: Option<Remote>,
    /// Replies straight out of this node's TUN device (see `PeerEntry::direct_return` of the
    /// ingress peer).
    pub(crate) direct_return: bool,
    /// The tunnel's round-trip time to the ingress peer, if measured.
    pub(crate) path_rtt: Option<Duration>,
}

pub(crate) enum WorkerMsg {
    /// Every connection; with `true`, those in TIME-WAIT too.
    Conns(Sender<Vec<ConnInfo>>, bool),
    Stats(Sender<StackStats>),
    /// What the predictor samples: time busy so far and every connection's counters.
    Sample(Sender<WorkerSample>),
    Freeze(u64, Sender<Result<(), FlowError>>),
    Thaw(u64, Sender<Result<usize, FlowError>>),
    /// Packets of moved flows that arrived through the tunnel.
    Tunnel(tunnel::TunnelBatch),
    /// What migration offers say of these flows (ids of other workers' flows are skipped).
    Offers(Vec<u64>, Sender<Vec<(u64, OfferResult)>>),
    /// Freeze and capture these flows for a move to `to`; answer with `Command::Captured`.
    Capture {
        migration: MigrationId,
        to: PeerRef,
        flows: Vec<u64>,
    },
    /// The target committed: forward the frozen flow to it; answer with `Command::MoveDone`.
    Complete {
        migration: MigrationId,
        flow: u64,
        to: Remote,
    },
    /// The move failed: thaw the frozen flow; answer with `Command::MoveDone`.
    ThawMoved {
        migration: MigrationId,
        flow: u64,
    },
    /// Restore these snapshots; answer with `Command::Restored`.
    Restore {
        peer: PeerRef,
        migration: MigrationId,
        items: Vec<RestoreItem>,
        mss_clamp: u16,
        max_buffer: usize,
    },
    /// This tunnel peer restarted: its flows are gone.
    PeerLost(PeerRef),
    /// Apply these class allocations to these flows (`[predict.class] enforce`; ids of
    /// flows that are gone are skipped).
    Allocate(Vec<(u64, flowshift_core::predict::class::Allocation)>),
    /// The owner (`from`) of moved flow `flow` moved it on to `to`.
    Rehome {
        from: PeerRef,
        flow: u64,
        to: Remote,
    },
    /// Drop these restored flows silently: their source kept them.
    Discard(Vec<u64>),
    /// Refuse new connections from now on (a drain).
    StopAccepting,
    /// Serve this connection's app again: held at its accept for a shadow move that did
    /// not happen (a no-op for a flow not held, frozen or gone).
    Resume(u64),
    Shutdown {
        deadline: StdInstant,
    },
}

/// One worker's sample for the predictor.
pub(crate) struct WorkerSample {
    /// Time the worker spent working (not waiting in `poll`) since it started.
    pub(crate) busy: smoltcp::time::Duration,
    /// CPU time the worker thread has run since it started, when the platform tells.
    pub(crate) cpu: Option<Duration>,
    /// Every connection.
    pub(crate) conns: Vec<ConnSample>,
    /// The connections that ended since the last sample, with their KPIs.
    pub(crate) ended: Vec<flowshift_core::stack::ConnEnd>,
}

/// A worker's inbox, with the waker that makes it look.
#[derive(Clone)]
pub(crate) struct WorkerHandle {
    tx: Sender<WorkerMsg>,
    waker: Arc<Waker>,
}

impl WorkerHandle {
    pub(crate) fn send(&self, msg: WorkerMsg) -> bool {
        self.tx.send(msg).is_ok() && self.waker.wake().is_ok()
    }
}

/// Monotonic clock of the node, as smoltcp instants.
#[derive(Clone, Copy)]
struct Clock(StdInstant);

impl Clock {
    fn now(&self) -> Instant {
        Instant::from_micros(self.0.elapsed().as_micros() as i64)
    }
}

struct Worker {
    index: usize,
    tun: SyncDevice,
    stack: Stack,
    poll: Poll,
    control: Receiver<WorkerMsg>,
    clock: Clock,
    tun_write_errors: Arc<AtomicU64>,
    packets: RxBuffers,
    /// The tunnel, where packets of moved flows go.
    tunnel: Option<tunnel::TunnelSender>,
    /// Scratch for cutting forwarded packets into datagrams.
    segment_buf: Vec<u8>,
    /// `stats().compacted` when free memory was last released, and when it may be again.
    compacted_seen: u64,
    next_trim: StdInstant,
    /// Merges relayed segments into TSO writes.
    relay: Coalescer,
    /// Time spent working since the start: from each wake-up to the next wait.
    busy: smoltcp::time::Duration,
    /// Captures waiting for their flows' send buffers to drain.
    quiescing: Vec<Quiescing>,
    /// The node's predictor: a shadow trial's diversion of new connections at their accept.
    predict: Arc<Predict>,
    /// Connections held at their accept that a trial admitted, and since when: held until
    /// their move captures them (or [`DIVERT_HOLD_MAX`]).
    diverted: Vec<(u64, Instant)>,
    /// Connections held at their accept not yet offered to the trial (the predictor was
    /// busy), and since when.
    undecided: Vec<(u64, Instant)>,
}

/// A connection a shadow trial admitted at its accept is served here if its move has not
/// captured it by then (the fs-predict thread was busy, or the move failed before reaching
/// this worker); the move may still take it later, as a move of a live connection.
const DIVERT_HOLD_MAX: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(500);
/// A connection held at its accept is offered to the trial in a later turn while the
/// predictor is busy (a sample being taken), but no longer than this: then it is served
/// here, and offered to the trial at the next sample.
const DIVERT_DECIDE_MAX: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(2);
/// How often a worker tries again meanwhile.
const DIVERT_RETRY: smoltcp::time::Duration = smoltcp::time::Duration::from_micros(200);

/// A capture deferred while its flows' apps are held and their send buffers drain
/// ([`Stack::quiesce`]): the snapshot then carries what the client has not acknowledged, not
/// a full buffer, and the client reads what was buffered meanwhile.
struct Quiescing {
    migration: MigrationId,
    to: PeerRef,
    flows: Vec<u64>,
    since: Instant,
}

/// A capture waits until each of its flows has at most this much queued to send (the tail a
/// delayed ACK may still hold)…
const QUIESCE_ENOUGH: usize = 16 * 1024;
/// …or this long, whichever comes first (a client that stopped reading never drains).
const QUIESCE_MAX: smoltcp::time::Duration = smoltcp::time::Duration::from_millis(5);

/// The receive buffer: one packet (with TUN offload, a virtio-net header and possibly a packet
/// the kernel merged, up to 64 KiB) per read.
struct RxBuffers {
    offload: bool,
    raw: Vec<u8>,
}

impl RxBuffers {
    fn new(offload: bool) -> Self {
        Self {
            offload,
            raw: vec![0u8; offload::VNET_HDR_LEN + 65536],
        }
    }
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut shutdown: Option<StdInstant> = None;
        let mut aborted = false;
        let mut more_to_read = true;
        let mut woke: Option<Instant> = None;
        loop {
            let now = self.clock.now();
            // The busy fraction the predictor reads: two clock readings the loop makes anyway.
            if let Some(w) = woke
                && now > w
            {
                self.busy += now - w;
            }
            let timeout = if more_to_read {
                Duration::ZERO
            } else {
                let mut delay = self.stack.poll_delay(now);
                if !self.undecided.is_empty() {
                    delay = delay.min(DIVERT_RETRY);
                }
                if let Some(at) = self.diverted.iter().map(|d| d.1 + DIVERT_HOLD_MAX).min() {
                    delay = delay.min(if at > now {
                        at - now
                    } else {
                        smoltcp::time::Duration::ZERO
                    });
                }
                if let Some(q) = self.quiescing.iter().map(|q| q.since + QUIESCE_MAX).min() {
                    delay = delay.min(if q > now {
                        q - now
                    } else {
                        smoltcp::time::Duration::ZERO
                    });
                }
                Duration::from_micros(delay.total_micros())
            };
            let timeout = match shutdown {
                Some(_) => timeout.min(Duration::from_millis(50)),
                None => timeout,
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(worker = self.index, error = %e, "poll failed; worker stops");
                return;
            }
            let now = self.clock.now();
            woke = Some(now);
            // The TUN device is read when it said it has packets (its readiness is
            // edge-triggered) or the last read stopped short of draining it: a turn woken by
            // a timer, the tunnel or a control message costs no read that finds nothing.
            if more_to_read || events.iter().any(|e| e.token() == TUN) {
                // New connections' socket buffers may reuse closed ones' (crate::alloc).
                more_to_read = crate::alloc::recycling(|| self.read_batch(now));
            }
            while let Ok(msg) = self.control.try_recv() {
                match msg {
                    WorkerMsg::Conns(reply, all) => {
                        let mut conns = self.stack.conns(now);
                        if all {
                            conns.extend(self.stack.time_wait_conns(now));
                        }
                        let _ = reply.send(conns);
                    }
                    WorkerMsg::Stats(reply) => {
                        let _ = reply.send(self.stack.stats().clone());
                    }
                    WorkerMsg::Sample(reply) => {
                        let _ = reply.send(WorkerSample {
                            busy: self.busy,
                            cpu: crate::cputime::current_thread(),
                            conns: self.stack.predict_samples(),
                            ended: self.stack.take_ended(),
                        });
                    }
                    WorkerMsg::Freeze(id, reply) => {
                        let _ = reply.send(self.stack.freeze(now, id));
                    }
                    WorkerMsg::Thaw(id, reply) => {
                        let _ = reply.send(self.stack.thaw(now, id));
                    }
                    WorkerMsg::Allocate(list) => {
                        for (id, alloc) in list {
                            // Gone since the sample: nothing to apply.
                            let _ = self.stack.set_allocation(now, id, Some(alloc));
                        }
                    }
                    WorkerMsg::Tunnel(packets) => self.tunnel_packets(now, packets),
                    WorkerMsg::Offers(ids, reply) => {
                        let offers = ids
                            .into_iter()
                            .filter_map(|id| match self.stack.offer(id) {
                                Err(CaptureError::NoSuchFlow(_)) => None,
                                r => Some((id, r.map_err(|e| e.to_string()))),
                            })
                            .collect();
                        let _ = reply.send(offers);
                    }
                    WorkerMsg::Capture {
                        migration,
                        to,
                        flows,
                    } => self.begin_capture(now, migration, to, flows),
                    WorkerMsg::Complete {
                        migration,
                        flow,
                        to,
                    } => {
                        // A fresh reading: the capture may have happened in this same turn.
                        let frozen = self
                            .stack
                            .frozen_for(self.clock.now(), flow)
                            .map(std_duration);
                        let moved = match self.stack.complete_move(now, flow, to) {
                            Ok(early) => {
                                self.write_relayed(&early);
                                true
                            }
                            Err(e) => {
                                tracing::warn!(%migration, flow = format_args!("{flow:#x}"), error = %e, "move not completed");
                                false
                            }
                        };
                        self.send_to_tunnel(tunnel::Command::MoveDone {
                            migration,
                            flow,
                            moved,
                            frozen,
                        });
                    }
                    WorkerMsg::ThawMoved { migration, flow } => {
                        // A fresh reading: the capture may have happened in this same turn.
                        let frozen = self
                            .stack
                            .frozen_for(self.clock.now(), flow)
                            .map(std_duration);
                        if let Err(e) = self.stack.thaw(now, flow) {
                            tracing::warn!(%migration, flow = format_args!("{flow:#x}"), error = %e, "thaw after a failed move");
                        }
                        self.send_to_tunnel(tunnel::Command::MoveDone {
                            migration,
                            flow,
                            moved: false,
                            frozen,
                        });
                    }
                    WorkerMsg::Restore {
                        peer,
                        migration,
                        items,
                        mss_clamp,
                        max_buffer,
                    } => {
                        let results = items
                            .into_iter()
                            .map(|item| {
                                let params = RestoreParams {
                                    mss_clamp,
                                    ingress: item.ingress,
                                    max_buffer,
                                    direct_return: item.direct_return,
                                    source: Some(peer),
                                    path_rtt: item.path_rtt.map(|d| {
                                        smoltcp::time::Duration::from_micros(
                                            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
                                        )
                                    }),
                                };
                                let (flow, snap) = (item.flow, &item.snapshot);
                                let r = self.stack.restore(now, snap, params).map_err(|e| {
                                    tracing::info!(%migration, flow = format_args!("{flow:#x}"), client = %snap.client, error = %e, "restore refused");
                                    refuse_reason(&e)
                                });
                                (flow, r)
                            })
                            .collect();
                        self.send_to_tunnel(tunnel::Command::Restored {
                            peer,
                            migration,
                            results,
                        });
                    }
                    WorkerMsg::PeerLost(peer) => {
                        let (moved, restored) = self.stack.peer_lost(now, peer);
                        if moved + restored > 0 {
                            tracing::warn!(
                                peer = peer.0,
                                moved,
                                restored,
                                "a peer restarted: connections moved to it are gone (their entries removed) and those whose packets entered there were reset"
                            );
                        }
                    }
                    WorkerMsg::Rehome { from, flow, to } => {
                        match self.stack.rehome(now, flow, from, to) {
                            Ok(held) => self.write_relayed(&held),
                            Err(e) => {
                                // Per connection, and a broken peer could send thousands: the
                                // Rehome itself is logged once by the tunnel thread.
                                tracing::debug!(flow = format_args!("{flow:#x}"), peer = from.0, error = %e, "move on to a third node refused");
                            }
                        }
                    }
                    WorkerMsg::Discard(flows) => {
                        for f in flows {
                            if let Err(e) = self.stack.discard(now, f) {
                                tracing::debug!(flow = format_args!("{f:#x}"), error = %e, "discard");
                            }
                        }
                    }
                    WorkerMsg::StopAccepting => self.stack.stop_accepting(),
                    WorkerMsg::Resume(id) => self.stack.resume(id),
                    WorkerMsg::Shutdown { deadline } => {
                        if shutdown.is_none() {
                            tracing::debug!(
                                worker = self.index,
                                open = self.stack.connection_count(),
                                "closing connections"
                            );
                            self.stack.begin_shutdown(now);
                            shutdown = Some(deadline);
                        }
                    }
                }
            }
            self.poll_and_flush(now);
            self.divert_turn(now);
            if !self.quiescing.is_empty() {
                self.capture_drained(self.clock.now(), shutdown.is_some());
            }
            // Connections were compacted: hand the heap memory they freed back to the
            // kernel (freed chunks stay resident in the allocator's arenas otherwise).
            let compacted = self.stack.stats().compacted;
            if compacted != self.compacted_seen && StdInstant::now() >= self.next_trim {
                self.compacted_seen = compacted;
                self.next_trim = StdInstant::now() + std::time::Duration::from_secs(1);
                release_free_memory();
            }
            if let Some(deadline) = shutdown {
                if self.stack.live_connection_count() == 0 {
                    return;
                }
                if StdInstant::now() >= deadline {
                    if aborted {
                        tracing::warn!(
                            worker = self.index,
                            left = self.stack.connection_count(),
                            "connections left after reset"
                        );
                        return;
                    }
                    tracing::warn!(
                        worker = self.index,
                        open = self.stack.connection_count(),
                        "shutdown deadline passed: resetting connections still open"
                    );
                    self.stack.abort_all(now);
                    self.stack.poll(now);
                    self.flush();
                    aborted = true;
                }
            }
        }
    }

    /// Shadow trials' diversion at the accept (`docs/prediction.md`): while the predictor
    /// diverts, new connections are held before their apps see a byte; each is offered to
    /// the trial at once, and the `fs-predict` thread moved it if admitted, or it is served
    /// here (resumed: the next turn, at once). One admitted but not captured within
    /// [`DIVERT_HOLD_MAX`] is served here after all.
    fn divert_turn(&mut self, now: Instant) {
        self.stack.set_hold_accepted(self.predict.diverts());
        let held = self.stack.take_accepted_held();
        self.undecided.extend(held.into_iter().map(|id| (id, now)));
        if !self.undecided.is_empty() {
            let stack = &mut self.stack;
            match self.predict.try_lock() {
                Some(mut p) => {
                    let mut admitted = false;
                    for (id, _) in self.undecided.drain(..) {
                        if p.admit_at_accept(id).is_some() {
                            self.diverted.push((id, now));
                            admitted = true;
                        } else {
                            stack.resume(id);
                        }
                    }
                    drop(p);
                    if admitted {
                        self.predict.moves_due();
                    }
                }
                // Busy: tried again in a later turn, for a moment.
                None => self.undecided.retain(|&(id, since)| {
                    let wait = now < since + DIVERT_DECIDE_MAX;
                    if !wait {
                        stack.resume(id);
                    }
                    wait
                }),
            }
        }
        let stack = &mut self.stack;
        self.diverted.retain(|&(id, since)| {
            if !stack.is_held(id) {
                return false;
            }
            if now < since + DIVERT_HOLD_MAX {
                return true;
            }
            tracing::warn!(
                conn = format_args!("{id:#x}"),
                held_ms = DIVERT_HOLD_MAX.total_millis(),
                "predict: shadow trial: a connection held at its accept for its move was not captured in time; served here until it moves"
            );
            stack.resume(id);
            false
        });
    }

    /// Reads up to a batch of packets; true if the queue may hold more.
    fn read_batch(&mut self, now: Instant) -> bool {
        for _ in 0..READ_BATCH {
            let rx = &mut self.packets;
            match self.tun.recv(&mut rx.raw) {
                Ok(n) if rx.offload => match offload::parse_read(&mut rx.raw[..n]) {
                    Ok(offload::Inbound::Packet(p)) => self.stack.handle_packet(now, p),
                    Ok(offload::Inbound::Merged(p)) => self.stack.handle_merged_packet(now, p),
                    Err(e) => self.stack.count_unusable_read(&e),
                },
                Ok(n) => self.stack.handle_packet(now, &mut rx.raw[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(worker = self.index, error = %e, "TUN read failed");
                    return false;
                }
            }
        }
        true
    }

    fn send_to_tunnel(&self, cmd: tunnel::Command) {
        if !self.tunnel.as_ref().is_some_and(|t| t.send(cmd)) {
            tracing::warn!(worker = self.index, "the tunnel thread is gone");
        }
    }

    /// Starts capturing `flows` for `migration`: their apps are held so their send buffers
    /// drain ([`Quiescing`]); flows with little queued are captured at once.
    fn begin_capture(
        &mut self,
        now: Instant,
        migration: MigrationId,
        to: PeerRef,
        flows: Vec<u64>,
    ) {
        let queued = flows
            .iter()
            .filter_map(|id| self.stack.quiesce(*id).ok())
            .max()
            .unwrap_or(0);
        if queued <= QUIESCE_ENOUGH {
            self.capture(now, migration, to, flows);
        } else {
            self.quiescing.push(Quiescing {
                migration,
                to,
                flows,
                since: now,
            });
        }
    }

    /// Captures the deferred migrations whose flows drained, or waited long enough (or
    /// all of them, when the node shuts down).
    fn capture_drained(&mut self, now: Instant, all: bool) {
        let mut i = 0;
        while i < self.quiescing.len() {
            let q = &self.quiescing[i];
            let left = q
                .flows
                .iter()
                .filter_map(|id| self.stack.send_queued(*id))
                .max()
                .unwrap_or(0);
            let expired = now >= q.since + QUIESCE_MAX;
            if all || expired || left <= QUIESCE_ENOUGH {
                let q = self.quiescing.swap_remove(i);
                tracing::debug!(
                    migration = %q.migration,
                    flows = q.flows.len(),
                    waited_us = (now - q.since).total_micros(),
                    queued = left,
                    expired,
                    "send buffers drained for the capture"
                );
                self.capture(now, q.migration, q.to, q.flows);
            } else {
                i += 1;
            }
        }
    }

    /// Freezes and captures `flows` for `migration`. A flow whose capture fails is thawed at
    /// once; a flow not local here (frozen by an operator, or gone) is left as it is.
    fn capture(&mut self, now: Instant, migration: MigrationId, to: PeerRef, flows: Vec<u64>) {
        // Packets smoltcp emitted before the freeze go out first, through the hook, so the
        // captured `snd_nxt` covers them.
        self.flush();
        let mut results = Vec::with_capacity(flows.len());
        for id in flows {
            let r = match self.stack.freeze_for_move(now, id, to) {
                Err(e) => {
                    tracing::info!(%migration, flow = format_args!("{id:#x}"), error = %e, "not captured");
                    // Held for the drain (if it was local): served again.
                    self.stack.resume(id);
                    Err(RefuseReason::CaptureFailed)
                }
                Ok(()) => match self.stack.capture(id) {
                    Ok(c) => Ok((c.snapshot, c.ingress)),
                    Err(e) => {
                        tracing::info!(%migration, flow = format_args!("{id:#x}"), error = %e, "not captured; thawed");
                        let _ = self.stack.thaw(now, id);
                        Err(RefuseReason::CaptureFailed)
                    }
                },
            };
            results.push((id, r));
        }
        self.send_to_tunnel(tunnel::Command::Captured { migration, results });
    }

    /// Packets of moved flows from the tunnel: client packets go to the stack, packets for
    /// the client to the TUN queue (this worker's: the flow id named it). With TUN offload,
    /// consecutive segments of a flow are merged back into one TSO write (`coalesce`).
    fn tunnel_packets(&mut self, now: Instant, mut packets: tunnel::TunnelBatch) {
        let Self {
            stack,
            tun,
            tun_write_errors,
            relay,
            packets: rx,
            ..
        } = self;
        let offload = rx.offload;
        let mut write = |buf: &mut Vec<u8>, gso: u16| write_merged(tun, tun_write_errors, buf, gso);
        packets.for_each(|p, packet| match p.kind {
            ForwardKind::ToOwner => stack.handle_forwarded(now, p.from, p.flow, packet),
            ForwardKind::ToIngress => {
                if !stack.handle_from_owner(now, p.from, p.flow, packet) {
                    return;
                }
                if offload {
                    relay.push(packet, &mut write);
                } else if let Err(e) = tun.send(packet) {
                    report_tun_error(tun_write_errors, e);
                }
            }
        });
        relay.flush(&mut write);
    }

    /// Writes packets for the clients of moved flows (held while a move completed).
    fn write_relayed(&mut self, packets: &[Vec<u8>]) {
        let (tun, errors) = (&self.tun, &self.tun_write_errors);
        if self.packets.offload {
            let mut write = |buf: &mut Vec<u8>, gso: u16| write_merged(tun, errors, buf, gso);
            for p in packets {
                self.relay.push(p, &mut write);
            }
            self.relay.flush(&mut write);
        } else {
            for p in packets {
                if let Err(e) = tun.send(p) {
                    report_tun_error(errors, e);
                }
            }
        }
    }

    /// Cuts the stack's forwarded packets into tunnel datagrams, in batches per peer of about
    /// [`FORWARD_PIECE`] bytes.
    fn flush_forward(&mut self) {
        if self.stack.forward_len() == 0 {
            return;
        }
        let Some(tunnel) = &self.tunnel else {
            self.stack.drain_forward(|_| {});
            return;
        };
        let room = tunnel.max_datagram.saturating_sub(HEADER_LEN);
        let mut batches: Vec<(PeerRef, tunnel::DatagramBatch)> = Vec::new();
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
                    batches.push((f.to.peer, Default::default()));
                    batches.len() - 1
                }
            };
            let batch = &mut batches[i].1;
            let cut = segment(f.packet, room, scratch, |seg| {
                batch.buf.extend_from_slice(&header);
                batch.buf.extend_from_slice(seg);
                batch.lens.push((HEADER_LEN + seg.len()) as u16);
            });
            if let Err(e) = cut {
                tracing::debug!(error = %e, "forwarded packet not sent");
            }
            // A window's worth leaves in pieces: the tunnel thread seals the first while
            // this one cuts the rest.
            if batch.buf.len() >= FORWARD_PIECE {
                // The next piece's buffer sized for a piece: no regrowing on the way.
                let next = tunnel::DatagramBatch {
                    buf: Vec::with_capacity(FORWARD_PIECE + 2 * (room + HEADER_LEN)),
                    lens: Vec::with_capacity(FORWARD_PIECE / room.max(1) + 2),
                };
                let (peer, batch) = (batches[i].0, std::mem::replace(&mut batches[i].1, next));
                tunnel.send(tunnel::Command::Datagrams { peer, batch });
            }
        });
        for (peer, batch) in batches {
            tunnel.send(tunnel::Command::Datagrams { peer, batch });
        }
    }

    fn flush(&mut self) {
        self.flush_tun();
        // After the TUN drain: it moves packets of flows whose packets enter elsewhere to the
        // forward queue.
        self.flush_forward();
    }

    fn flush_tun(&mut self) {
        write_tun(
            &mut self.stack,
            &self.tun,
            &self.tun_write_errors,
            self.packets.offload,
        );
    }

    /// The stack's turn ([`Stack::poll_flushing`]): what it emits is written to the TUN
    /// device as it goes, then the forward queue to the tunnel.
    fn poll_and_flush(&mut self, now: Instant) {
        let (tun, errors, offload) = (&self.tun, &self.tun_write_errors, self.packets.offload);
        self.stack
            .poll_flushing(now, |stack| write_tun(stack, tun, errors, offload));
        self.flush();
    }
}

/// Writes the stack's transmit queue to the TUN device.
fn write_tun(stack: &mut Stack, tun: &SyncDevice, errors: &AtomicU64, offload: bool) {
    let report = |e: io::Error| report_tun_error(errors, e);
    if offload {
        stack.drain_transmit_batch(|bufs, gso_sizes, headroom| {
            // Every packet gets its virtio-net header: TSO for smoltcp's large segments,
            // and a checksum request for all (smoltcp leaves TCP checksums to the device).
            for (buf, &gso) in bufs.iter_mut().zip(gso_sizes) {
                let sent = offload::prepare(buf, headroom, gso)
                    .and_then(|()| tun.send(&buf[headroom - offload::VNET_HDR_LEN..]));
                if let Err(e) = sent {
                    report(e);
                }
            }
        });
    } else {
        stack.drain_transmit(|packet| {
            if let Err(e) = tun.send(packet) {
                report(e);
            }
        });
    }
}

/// Writes a packet from the coalescer (after a virtio-net header's room) to an offload TUN.
fn write_merged(tun: &SyncDevice, errors: &AtomicU64, buf: &mut [u8], gso: u16) {
    let sent = offload::prepare(buf, offload::VNET_HDR_LEN, gso).and_then(|()| tun.send(buf));
    if let Err(e) = sent {
        report_tun_error(errors, e);
    }
}

/// Counts a failed TUN write; logs the first and then at every power of two.
fn report_tun_error(errors: &AtomicU64, e: io::Error) {
    if (errors.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two() {
        tracing::warn!(error = %e, "TUN write failed");
    }
}

struct Node {
    /// False once the node drains or shuts down: no new connections, no moves in.
    accepting: Arc<AtomicBool>,
    config: Config,
    workers: Vec<WorkerHandle>,
    budget: ConnectionBudget,
    started: StdInstant,
    tun_write_errors: Arc<AtomicU64>,
    tunnel: Option<tunnel::TunnelHandle>,
    clock: Clock,
    /// The predictor, fed by the `fs-predict` thread (and asked by the workers at a new
    /// connection's accept while a shadow trial diverts).
    predict: Arc<Predict>,
}

impl Node {
    /// Asks every worker and waits for each answer (at most [`WORKER_ANSWER_TIMEOUT`]): the
    /// answers that came, and the workers that did not answer in time (logged, with the
    /// request and the wait). Slow answers are logged too.
    fn ask_each<T>(
        &self,
        what: &'static str,
        make: impl Fn(Sender<T>) -> WorkerMsg,
    ) -> (Vec<T>, Vec<usize>) {
        let asked = StdInstant::now();
        let mut receivers = Vec::with_capacity(self.workers.len());
        for (i, w) in self.workers.iter().enumerate() {
            let (tx, rx) = bounded(1);
            receivers.push((i, w.send(make(tx)).then_some(rx)));
        }
        let mut replies = Vec::with_capacity(receivers.len());
        let mut silent = Vec::new();
        for (i, rx) in receivers {
            let left = WORKER_ANSWER_TIMEOUT.saturating_sub(asked.elapsed());
            match rx.map(|rx| rx.recv_timeout(left)) {
                Some(Ok(v)) => replies.push(v),
                Some(Err(_)) | None => silent.push(i),
            }
        }
        let waited_ms = asked.elapsed().as_millis() as u64;
        if !silent.is_empty() {
            tracing::warn!(
                request = what,
                workers = ?silent,
                waited_ms,
                "worker(s) did not answer a control request"
            );
        } else if asked.elapsed() > SLOW_WORKER_ANSWER {
            tracing::warn!(
                request = what,
                waited_ms,
                "workers were slow to answer a control request"
            );
        }
        (replies, silent)
    }

    /// [`ask_each`](Self::ask_each) where every worker must answer: a worker that does not
    /// is an error naming it — never an answer that silently leaves its connections out.
    fn ask_all<T>(
        &self,
        what: &'static str,
        make: impl Fn(Sender<T>) -> WorkerMsg,
    ) -> Result<Vec<T>, String> {
        let (replies, silent) = self.ask_each(what, make);
        if silent.is_empty() {
            Ok(replies)
        } else {
            Err(format!(
                "{what}: worker(s) {silent:?} did not answer within {} s",
                WORKER_ANSWER_TIMEOUT.as_secs()
            ))
        }
    }

    /// [`ask_each`](Self::ask_each) for figures where a silent worker only leaves its share
    /// out (it is logged there).
    fn ask<T>(&self, what: &'static str, make: impl Fn(Sender<T>) -> WorkerMsg) -> Vec<T> {
        self.ask_each(what, make).0
    }

    fn stats(&self) -> StackStats {
        let mut total = StackStats::default();
        for s in self.ask("stats", WorkerMsg::Stats) {
            total.add(&s);
        }
        total
    }

    fn conns(&self, time_wait: bool) -> Result<Vec<ConnInfo>, String> {
        let mut all: Vec<ConnInfo> = self
            .ask_all("connections", |tx| WorkerMsg::Conns(tx, time_wait))?
            .into_iter()
            .flatten()
            .collect();
        all.sort_by_key(|c| c.id);
        Ok(all)
    }

    /// `ctl conns`: every connection, with the names of the nodes it lives on and where its
    /// packets enter.
    fn conn_rows(&self, time_wait: bool) -> Result<Vec<serde_json::Value>, String> {
        let names: Vec<(u32, String)> = self
            .ask_tunnel(tunnel::Command::Peers)
            .map(|peers| peers.into_iter().map(|p| (p.id, p.name)).collect())
            .unwrap_or_default();
        let name = |r: &Option<Remote>| {
            r.map(|r| {
                names
                    .iter()
                    .find(|(id, _)| *id == r.peer.0)
                    .map_or_else(|| format!("peer {}", r.peer.0), |(_, n)| n.clone())
            })
        };
        let me = &self.config.node.name;
        let conns = self.conns(time_wait)?;
        let now = self.clock.now();
        let predictor = self.predict.lock();
        Ok(conns
            .into_iter()
            .map(|c| {
                let lives_on = name(&c.owner).unwrap_or_else(|| me.clone());
                let enters_at = name(&c.ingress).unwrap_or_else(|| me.clone());
                let mut v = serde_json::to_value(&c).unwrap_or_default();
                v["lives_on"] = lives_on.into();
                v["enters_at"] = enters_at.into();
                v["predict"] = predictor.conn_state(c.id).as_str().into();
                v["class"] = predictor
                    .class(c.id)
                    .map_or(serde_json::Value::Null, |k| k.as_str().into());
                let peer_name = |id: NodeId| {
                    names
                        .iter()
                        .find(|(i, _)| *i == id.0)
                        .map_or_else(|| format!("peer {}", id.0), |(_, n)| n.clone())
                };
                v["lease"] = match (predictor.lease(c.id), predictor.offload(c.id)) {
                    (Some(l), _) => crate::predict::lease_json(l, &peer_name(l.primary), now),
                    (None, Some(o)) => crate::predict::offload_json(o, &peer_name(o.holder)),
                    (None, None) => serde_json::Value::Null,
                };
                v
            })
            .collect())
    }

    fn gauges(&self) -> NodeGauges {
        NodeGauges {
            connections: self.budget.open() as u64,
            max_connections: self.budget.max() as u64,
            workers: self.workers.len() as u64,
            tun_write_errors: self.tun_write_errors.load(Ordering::Relaxed),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }

    fn metrics(&self) -> String {
        let migration = self.ask_tunnel(tunnel::Command::MigrationStats).ok();
        metrics::render(
            &self.stats(),
            &self.gauges(),
            self.tunnel_stats().as_ref(),
            migration.as_ref(),
            Some(&self.predict.metrics()),
        )
    }

    fn status(&self) -> serde_json::Value {
        let stats = self.stats();
        serde_json::json!({
            "node": self.config.node.name,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "workers": self.workers.len(),
            "tun": self.config.tun.name,
            "mtu": self.config.tun.mtu,
            "offload": self.config.tun.offload,
            "service_addresses": self.config.tun.service_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "services": self.config.services.iter().map(|s| serde_json::json!({"port": s.port, "app": s.app})).collect::<Vec<_>>(),
            "connections": self.budget.open(),
            "max_connections": self.budget.max(),
            "time_wait": stats.time_wait,
            "stats": stats,
        })
    }
}

impl Node {
    fn ask_tunnel<T>(&self, make: impl FnOnce(Sender<T>) -> tunnel::Command) -> Result<T, String> {
        let t = self.tunnel.as_ref().ok_or("this node has no [tunnel]")?;
        let (tx, rx) = bounded(1);
        if !t.send(make(tx)) {
            return Err("the tunnel thread is gone".into());
        }
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the tunnel thread did not answer".into())
    }

    fn tunnel_stats(&self) -> Option<flowshift_tunnel::Stats> {
        self.ask_tunnel(tunnel::Command::Stats).ok()
    }

    /// Tells the tunnel this node's load, for its heartbeats: the data path's busy fraction
    /// over the last second (the workers' and the tunnel thread's time, over the workers'
    /// cores, as they measure it), connections, and bytes/s since the last
    /// call; with the predictor's forecast, lease renewals, KPIs and the segment statistics
    /// of its hottest connections (their idle times as of `now`).
    fn report_load(&self, now: Instant, last: &mut (StdInstant, StackStats), cpu_busy: f64) {
        let Some(t) = &self.tunnel else { return };
        let stats = self.stats();
        let dt = last.0.elapsed().as_secs_f64().max(1e-3);
        let report = flowshift_tunnel::LoadReport {
            cpu_busy: (cpu_busy as f32).clamp(0.0, 1.0),
            connections: self.budget.open() as u64,
            bytes_in_per_sec: ((stats.app_bytes_in.saturating_sub(last.1.app_bytes_in)) as f64 / dt)
                as u64,
            bytes_out_per_sec: ((stats.app_bytes_out.saturating_sub(last.1.app_bytes_out)) as f64
                / dt) as u64,
            forecast: self.predict.forecast(),
            leases: self.predict.renewals(),
            kpis: self.predict.kpi_reports(),
            segments: self.predict.segment_reports(now),
        };
        t.send(tunnel::Command::Load(report));
        *last = (StdInstant::now(), stats);
    }
}

/// What the `fs-predict` thread carries from one sample to the next.
struct PredictDriver {
    /// The workers' summed busy time and when it was read.
    busy: Option<(Instant, smoltcp::time::Duration)>,
    /// Their summed CPU time and when it was read (`None` when a thread's is not known).
    cpu: Option<(Instant, smoltcp::time::Duration)>,
    /// Busy time at the last load report.
    report_busy: (Instant, smoltcp::time::Duration),
    /// The last load report: when, and the counters then.
    report: (StdInstant, StackStats),
    next_report: StdInstant,
    /// Per peer: the number of its last load report whose lease renewals were taken.
    renewals_taken: std::collections::HashMap<u32, u64>,
    /// `[predict.class] enforce`: the class whose allocation each connection was given.
    enforced: std::collections::HashMap<u64, flowshift_core::predict::class::Class>,
}

/// How often the load report for the heartbeats is made.
const LOAD_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Node {
    /// Runs the predictor (the `fs-predict` thread): a sample every interval, the plan's
    /// moves executed when the policy says so, and the load report once a second.
    fn run_predictor(&self) {
        let mut d = PredictDriver {
            busy: None,
            cpu: None,
            report_busy: (self.clock.now(), smoltcp::time::Duration::ZERO),
            report: (StdInstant::now(), self.stats()),
            next_report: StdInstant::now() + LOAD_REPORT_EVERY,
            renewals_taken: std::collections::HashMap::new(),
            enforced: std::collections::HashMap::new(),
        };
        loop {
            let now = self.clock.now();
            let due = self.predict.lock().poll_timeout();
            if let Some(due) = due
                && due > now
            {
                // Woken early: a worker's trial admitted a new connection, to move now.
                if self.predict.sleep(std_duration(due - now)) {
                    self.shadow_turn();
                }
                continue;
            }
            self.predict_turn(now, &mut d);
            if StdInstant::now() >= d.next_report {
                let (at, busy) = d.busy.unwrap_or(d.report_busy);
                let cpu = busy_fraction(d.report_busy, (at, busy), self.workers.len());
                self.report_load(now, &mut d.report, cpu);
                d.report_busy = (at, busy);
                d.next_report = StdInstant::now() + LOAD_REPORT_EVERY;
            }
        }
    }

    /// How a connection this node moves to peer `name` returns its replies, as the planner
    /// assumes it: what this node's own `[[peer]]` entry for it says (`direct_return` is set
    /// on the target, for the connections whose packets enter here; the two nodes' entries for
    /// each other are meant to agree, docs/prediction.md).
    fn return_path(&self, name: &str) -> ReturnPath {
        let direct = self
            .config
            .tunnel
            .as_ref()
            .is_some_and(|t| t.peers.iter().any(|e| e.name == name && e.direct_return));
        if direct {
            ReturnPath::Direct
        } else {
            ReturnPath::Relay
        }
    }

    /// One sample: the workers' connections and busy time, the peers' load reports; the
    /// plan, if one is made, is logged and executed.
    fn predict_turn(&self, now: Instant, d: &mut PredictDriver) {
        let samples = self.ask("predictor sample", WorkerMsg::Sample);
        let workers = samples.len();
        // The data path's CPU: the workers' and the tunnel thread's (which seals and opens
        // every forwarded packet: 0.85 s per GB relayed, docs/benchmarks.md), over the
        // workers' cores.
        let tunnel_busy = self
            .tunnel
            .as_ref()
            .map_or(0, |t| t.busy().as_micros() as u64);
        let busy = smoltcp::time::Duration::from_micros(
            samples.iter().map(|s| s.busy.total_micros()).sum::<u64>() + tunnel_busy,
        );
        let cpu_busy = d
            .busy
            .map_or(0.0, |prev| busy_fraction(prev, (now, busy), workers));
        d.busy = Some((now, busy));
        // The same threads' CPU time: their busy time less the waits for a CPU.
        let tunnel_cpu = match &self.tunnel {
            Some(t) => t.cpu_time(),
            None => Some(Duration::ZERO),
        };
        let cpu = samples
            .iter()
            .map(|s| s.cpu)
            .chain([tunnel_cpu])
            .sum::<Option<Duration>>()
            .map(|c| smoltcp::time::Duration::from_micros(c.as_micros() as u64));
        let cpu_time = match (d.cpu, cpu) {
            (Some(prev), Some(cpu)) => Some(busy_fraction(prev, (now, cpu), workers)),
            _ => None,
        };
        d.cpu = cpu.map(|c| (now, c));
        let mut ended = Vec::new();
        let conns: Vec<ConnSample> = samples
            .into_iter()
            .flat_map(|s| {
                ended.extend(s.ended);
                s.conns
            })
            .collect();
        self.take_kpis(&ended);

        let targets = &self.config.predict.targets;
        let listed = if self.tunnel.is_some() {
            self.ask_tunnel(tunnel::Command::Peers).unwrap_or_default()
        } else {
            Vec::new()
        };
        *self.predict.names.lock().unwrap_or_else(|e| e.into_inner()) =
            listed.iter().map(|p| (p.id, p.name.clone())).collect();
        let peers: Vec<PeerSample> = listed
            .iter()
            .filter(|p| targets.is_empty() || targets.contains(&p.name))
            .filter_map(|p| {
                let load = p.load.as_ref()?;
                Some(PeerSample {
                    id: NodeId(p.id),
                    alive: p.liveness == tunnel::Liveness::Alive,
                    cpu_busy: f64::from(load.cpu_busy),
                    connections: load.connections,
                    bandwidth: load.bytes_in_per_sec as f64 + load.bytes_out_per_sec as f64,
                    forecast: load
                        .forecast
                        .as_ref()
                        .map(|f| (f64::from(f.cpu_busy), f.connections)),
                    rtt: smoltcp::time::Duration::from_micros(
                        (p.rtt_ms.unwrap_or(0.0).max(0.0) * 1e3) as u64,
                    ),
                    return_path: self.return_path(&p.name),
                })
            })
            .collect();
        let node = NodeReport {
            cpu_busy,
            cpu_time,
            memory: resident_bytes(),
            connections: self.budget.open() as u64,
            queue_depth: 0,
        };
        let obs = Observation {
            node,
            conns: &conns,
            peers: &peers,
        };
        let (plan, executes) = {
            let mut p = self.predict.lock();
            let plan = p.handle_sample(now, &obs);
            self.predict
                .set_divert(p.diverts_at_accept() && self.accepting.load(Ordering::Acquire));
            (plan, p.executes())
        };
        self.lease_turn(now, &listed, d);
        self.shadow_turn();
        self.log_class_changes();
        if self.config.predict.enforce_classes {
            self.enforce_classes(d);
        }
        let Some(plan) = plan else { return };
        let policy = self.config.predict.node.policy;
        if plan.moves.is_empty() {
            tracing::debug!(%policy, status = %crate::predict::status_text(&plan.status), "predict: plan");
            return;
        }
        tracing::info!(
            %policy,
            moves = plan.moves.len(),
            executes,
            status = %crate::predict::status_text(&plan.status),
            "predict: plan made"
        );
        let mut by_target: Vec<(NodeId, Vec<u64>)> = Vec::new();
        for m in &plan.moves {
            let target = self.predict.name(m.target);
            tracing::info!(
                conn = format_args!("{:#x}", m.conn),
                %target,
                %policy,
                reason = %m.reason,
                "{}",
                if executes {
                    "predict: moving a connection"
                } else {
                    "predict: would move a connection (policy manual: not executed)"
                }
            );
            match by_target.iter_mut().find(|(t, _)| *t == m.target) {
                Some((_, ids)) => ids.push(m.conn),
                None => by_target.push((m.target, vec![m.conn])),
            }
        }
        if !executes {
            return;
        }
        // A draining or stopping node moves nothing on its own: the drain moves everything,
        // a shutdown closes everything.
        if !self.accepting.load(Ordering::Acquire) {
            tracing::info!(
                "predict: the node is draining or shutting down; planned moves not made"
            );
            let done = self.clock.now();
            let mut p = self.predict.lock();
            for m in &plan.moves {
                p.record(
                    done,
                    m.conn,
                    m.target,
                    Outcome::Stayed("the node is draining or shutting down".into()),
                );
            }
            return;
        }
        for (target, ids) in by_target {
            let name = self.predict.name(target);
            let result = self.migrate(&name, Selection::Planned(ids.clone()));
            let done = self.clock.now();
            let mut p = self.predict.lock();
            match result {
                Ok(report) => {
                    for id in &ids {
                        let outcome = match report.conns.iter().find(|c| c.id == *id) {
                            Some(c) if c.moved => Outcome::Moved,
                            Some(c) => Outcome::Stayed(
                                c.reason.clone().unwrap_or_else(|| "unknown".into()),
                            ),
                            None => Outcome::Failed("no outcome reported".into()),
                        };
                        if let (Outcome::Moved, Some(remote)) = (
                            &outcome,
                            report
                                .conns
                                .iter()
                                .find(|c| c.id == *id)
                                .and_then(|c| c.remote_id),
                        ) {
                            p.record(done, *id, target, outcome.clone());
                            p.record_offload(done, *id, target, remote);
                            tracing::info!(conn = format_args!("{id:#x}"), target = %name, remote = format_args!("{remote:#x}"), "predict: moved; its lease there is renewed while this node has no room for it");
                            continue;
                        }
                        match &outcome {
                            Outcome::Moved => {
                                tracing::info!(conn = format_args!("{id:#x}"), target = %name, "predict: moved")
                            }
                            Outcome::Stayed(why) | Outcome::Failed(why) => {
                                tracing::warn!(conn = format_args!("{id:#x}"), target = %name, reason = %why, "predict: planned move did not happen")
                            }
                            _ => {}
                        }
                        p.record(done, *id, target, outcome);
                    }
                }
                Err(e) => {
                    tracing::warn!(target = %name, error = %e, conns = ids.len(), "predict: planned moves failed");
                    for id in ids {
                        p.record(done, id, target, Outcome::Failed(e.clone()));
                    }
                }
            }
        }
    }
}

impl Node {
    /// Logs every connection that changed class, with its class's allocation: the
    /// allocations are computed and shown, not enforced (`docs/prediction.md`).
    fn log_class_changes(&self) {
        let changes = self.predict.lock().take_class_changes();
        let classes = &self.config.predict.config.class;
        for c in changes {
            let a = classes.allocation(c.to);
            tracing::info!(
                conn = format_args!("{:#x}", c.conn),
                from = c.from.as_str(),
                to = c.to.as_str(),
                forecast_bytes_per_sec = c.bandwidth as u64,
                rate_limit = ?a.rate_limit,
                buffer_budget = a.buffer_budget,
                priority = a.priority,
                "{}",
                if self.config.predict.enforce_classes {
                    "predict: connection class changed (allocation enforced)"
                } else {
                    "predict: connection class changed (allocation not enforced)"
                }
            );
        }
    }

    /// `[predict.class] enforce`: hands each worker the allocations of its connections
    /// whose class is new or changed since the last sample (a connection id's top 16 bits
    /// are its worker's index).
    fn enforce_classes(&self, d: &mut PredictDriver) {
        let classes = &self.config.predict.config.class;
        let mut per_worker: Vec<Vec<(u64, flowshift_core::predict::class::Allocation)>> =
            vec![Vec::new(); self.workers.len()];
        {
            let p = self.predict.lock();
            d.enforced.retain(|id, _| p.class(*id).is_some());
            for (id, class) in p.classes() {
                if d.enforced.insert(id, class) != Some(class)
                    && let Some(list) = per_worker.get_mut((id >> 48) as usize)
                {
                    list.push((id, classes.allocation(class)));
                }
            }
        }
        for (w, list) in self.workers.iter().zip(per_worker) {
            if !list.is_empty() {
                w.send(WorkerMsg::Allocate(list));
            }
        }
    }

    /// The KPIs of connections that ended since the last sample: one served here from
    /// its accept feeds the local baseline of the shadow trials under way; one restored
    /// here from a primary goes out in the next load reports, for the primary's trial.
    fn take_kpis(&self, ended: &[flowshift_core::stack::ConnEnd]) {
        if ended.is_empty() {
            return;
        }
        let ms = |d: smoltcp::time::Duration| d.total_micros() as f64 / 1e3;
        let mut p = self.predict.lock();
        for e in ended {
            match e.ingress {
                None => {
                    p.record_kpi(e.id, None, e.latency.map(ms), e.error);
                }
                Some(_) => self.predict.report_kpi(flowshift_tunnel::KpiReport {
                    conn: e.id,
                    latency: e.latency.map(|d| Duration::from_micros(d.total_micros())),
                    error: e.error,
                }),
            }
        }
    }

    /// Shadow trials (`docs/prediction.md`, Shadow trials in the node): moves the new
    /// connections the trials admitted to their peer, through the migrate path, and logs
    /// the trials' steps.
    fn shadow_turn(&self) {
        let (moves, events) = {
            let mut p = self.predict.lock();
            (p.take_shadow_moves(), p.take_trial_events())
        };
        for (peer, event) in events {
            let name = self.predict.name(peer);
            let judged = self
                .predict
                .lock()
                .trials()
                .find(|t| t.peer() == peer)
                .and_then(|t| t.last_judgement().copied());
            match judged {
                Some(j) if !matches!(event, TrialEvent::Resumed) => tracing::info!(
                    peer = %name,
                    event = ?event,
                    step = j.step + 1,
                    local_connections = j.local.connections,
                    local_errors = j.local.errors,
                    local_median_ms = ?j.local.median,
                    peer_connections = j.peer.connections,
                    peer_errors = j.peer.errors,
                    peer_median_ms = ?j.peer.median,
                    p_worse = ?j.p_worse,
                    "predict: shadow trial judged a step{}",
                    if j.p_worse.is_none() {
                        " (latencies not compared: too few on a side; errors only)"
                    } else {
                        ""
                    }
                ),
                _ => tracing::info!(peer = %name, event = ?event, "predict: shadow trial"),
            }
        }
        if moves.is_empty() {
            return;
        }
        let mut by_peer: Vec<(NodeId, Vec<u64>)> = Vec::new();
        for (conn, peer) in moves {
            match by_peer.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, ids)) => ids.push(conn),
                None => by_peer.push((peer, vec![conn])),
            }
        }
        for (peer, ids) in by_peer {
            let name = self.predict.name(peer);
            let accepting = self.accepting.load(Ordering::Acquire);
            let result = if accepting {
                self.migrate(&name, Selection::Planned(ids.clone()))
            } else {
                Err("the node is draining or shutting down".into())
            };
            let mut p = self.predict.lock();
            for id in ids {
                let row = result
                    .as_ref()
                    .ok()
                    .and_then(|r| r.conns.iter().find(|c| c.id == id));
                let outcome = match (&result, row) {
                    (Ok(_), Some(c)) if c.moved => Outcome::Moved,
                    (Ok(_), Some(c)) => {
                        Outcome::Stayed(c.reason.clone().unwrap_or_else(|| "unknown".into()))
                    }
                    (Ok(_), None) => Outcome::Failed("no outcome reported".into()),
                    (Err(e), _) => Outcome::Failed(e.clone()),
                };
                let remote = row.and_then(|c| c.remote_id);
                match &outcome {
                    Outcome::Moved => tracing::info!(
                        conn = format_args!("{id:#x}"),
                        peer = %name,
                        "predict: shadow trial: new connection moved to the peer on trial"
                    ),
                    Outcome::Stayed(why) | Outcome::Failed(why) => {
                        tracing::warn!(
                            conn = format_args!("{id:#x}"),
                            peer = %name,
                            reason = %why,
                            "predict: shadow trial: new connection stays here"
                        );
                        // Held at its accept: served here from now on.
                        for w in &self.workers {
                            w.send(WorkerMsg::Resume(id));
                        }
                    }
                    _ => {}
                }
                p.record_shadow(id, &outcome, remote);
            }
        }
    }

    /// Leases (`docs/prediction.md`, Leases): takes the renewals of every peer's new load
    /// report, then hands the connections of expired leases back to their primary. A
    /// connection that cannot go back stays here.
    fn lease_turn(&self, now: Instant, listed: &[tunnel::PeerInfo], d: &mut PredictDriver) {
        for peer in listed {
            let Some(load) = &peer.load else { continue };
            let last = d.renewals_taken.entry(peer.id).or_insert(0);
            if peer.load_reports <= *last {
                continue;
            }
            *last = peer.load_reports;
            let age = smoltcp::time::Duration::from_micros(
                (peer.load_age_ms.unwrap_or(0.0).clamp(0.0, 1e9) * 1e3) as u64,
            );
            let received = if now - Instant::ZERO > age {
                now - age
            } else {
                now
            };
            let kpis: Vec<(u64, Option<f64>, bool)> = load
                .kpis
                .iter()
                .map(|k| (k.conn, k.latency_ms, k.error))
                .collect();
            if !kpis.is_empty() {
                let taken = self.predict.lock().record_peer_kpis(NodeId(peer.id), &kpis);
                if taken > 0 {
                    tracing::debug!(peer = %peer.name, taken, "predict: KPIs of shadowed connections from the peer that served them");
                }
            }
            let renewals: Vec<(u64, Option<f64>)> =
                load.leases.iter().map(|l| (l.conn, l.volume_s)).collect();
            let granted = self
                .predict
                .lock()
                .handle_renewals(NodeId(peer.id), received, &renewals);
            for l in granted {
                tracing::info!(
                    conn = format_args!("{:#x}", l.conn),
                    primary = %peer.name,
                    length_ms = (l.expires - l.renewed).total_millis(),
                    basis = crate::predict::basis_name(l.basis),
                    "predict: lease granted on a connection offloaded here"
                );
            }
        }
        loop {
            let event = self.predict.lock().poll_lease(now);
            let Some(LeaseEvent::Expired { conn, primary, at }) = event else {
                break;
            };
            let name = self.predict.name(primary);
            tracing::info!(
                conn = format_args!("{conn:#x}"),
                primary = %name,
                expired_ms = at.total_millis(),
                "predict: lease expired (its primary stopped renewing it): handing the connection back"
            );
            let outcome = match self.migrate(&name, Selection::Planned(vec![conn])) {
                Ok(report) => match report.conns.iter().find(|c| c.id == conn) {
                    Some(c) if c.moved => Outcome::Moved,
                    Some(c) => {
                        Outcome::Stayed(c.reason.clone().unwrap_or_else(|| "unknown".into()))
                    }
                    None => Outcome::Failed("no outcome reported".into()),
                },
                Err(e) => Outcome::Failed(e),
            };
            match &outcome {
                Outcome::Moved => tracing::info!(
                    conn = format_args!("{conn:#x}"),
                    primary = %name,
                    "predict: lease expired; the connection is back at its primary"
                ),
                Outcome::Stayed(why) | Outcome::Failed(why) => tracing::warn!(
                    conn = format_args!("{conn:#x}"),
                    primary = %name,
                    reason = %why,
                    "predict: lease expired but the connection could not go back; it stays here without a lease"
                ),
                _ => {}
            }
            self.predict.lock().record_return(conn, outcome);
        }
    }
}

/// The busy fraction of `workers` cores between two readings of a summed busy time (the
/// workers' and the tunnel thread's), at most 1.
fn busy_fraction(
    (t0, b0): (Instant, smoltcp::time::Duration),
    (t1, b1): (Instant, smoltcp::time::Duration),
    workers: usize,
) -> f64 {
    if t1 <= t0 || b1 < b0 || workers == 0 {
        return 0.0;
    }
    let elapsed = (t1 - t0).total_micros() as f64 * workers as f64;
    ((b1 - b0).total_micros() as f64 / elapsed).clamp(0.0, 1.0)
}

/// Resident memory of this process (`/proc/self/statm`), 0 when unknown.
fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages.saturating_mul(page)
}

/// Which connections a `migrate` request names.
pub(crate) enum Selection {
    Ids(Vec<u64>),
    /// Ids the predictor planned: one that is gone by now stays (`closed`) instead of
    /// failing the request.
    Planned(Vec<u64>),
    Port(u16),
    Count(usize),
    All,
}

/// TCP states that move (as `ConnInfo::state` names them).
const MOVABLE: [&str; 5] = [
    "ESTABLISHED",
    "CLOSE-WAIT",
    "FIN-WAIT-1",
    "CLOSING",
    "LAST-ACK",
];

/// How long an operator waits for one migration's outcome: the protocol's own timeouts
/// (accept 2 s, commit 3 s) end every migration well before.
const MIGRATE_WAIT: Duration = Duration::from_secs(30);

/// Connections per migration when a request moves many (at most the protocol's `MAX_BATCH`):
/// each is frozen until its whole batch commits.
const MOVE_BATCH: usize = 64;

/// Migrations of one request under way at once.
const MOVES_IN_FLIGHT: usize = 6;

impl Node {
    /// Moves the selected connections to the peer named `to`.
    pub(crate) fn migrate(&self, to: &str, selection: Selection) -> Result<MigrateReport, String> {
        let started = StdInstant::now();
        if self.tunnel.is_none() {
            return Err("this node has no [tunnel]".into());
        }
        // A planned move names its connections, and the workers' offers say which are still
        // here: no listing of every connection (a shadow trial moves one at each accept).
        let planned = matches!(selection, Selection::Planned(_));
        let conns = if planned {
            Vec::new()
        } else {
            self.conns(false)?
        };
        let local = |c: &&ConnInfo| c.mode == "local" && MOVABLE.contains(&c.state.as_str());
        let ids: Vec<u64> = match selection {
            Selection::Planned(ids) => ids,
            Selection::Ids(ids) => {
                if let Some(id) = ids.iter().find(|id| !conns.iter().any(|c| c.id == **id)) {
                    return Err(FlowError::NoSuchFlow(*id).to_string());
                }
                ids
            }
            Selection::Port(p) => conns
                .iter()
                .filter(local)
                .filter(|c| c.service.port() == p)
                .map(|c| c.id)
                .collect(),
            Selection::Count(n) => conns.iter().filter(local).take(n).map(|c| c.id).collect(),
            Selection::All => conns.iter().filter(local).map(|c| c.id).collect(),
        };
        let mut stayed: Vec<ConnOutcome> = Vec::new();
        let mut offers = Vec::new();
        let mut answered = std::collections::HashSet::with_capacity(ids.len());
        for (id, r) in self
            .ask_all("migration offers", |tx| WorkerMsg::Offers(ids.clone(), tx))?
            .into_iter()
            .flatten()
        {
            answered.insert(id);
            match r {
                Ok(o) => offers.push(o),
                Err(reason) => stayed.push(ConnOutcome {
                    id,
                    client: conns.iter().find(|c| c.id == id).map(|c| c.client),
                    moved: false,
                    remote_id: None,
                    freeze_ms: None,
                    reason: Some(reason),
                }),
            }
        }
        // No worker has them: closed since they were planned.
        stayed.extend(
            ids.iter()
                .filter(|id| !answered.contains(id))
                .map(|&id| ConnOutcome {
                    id,
                    client: None,
                    moved: false,
                    remote_id: None,
                    freeze_ms: None,
                    reason: Some("closed before the move".into()),
                }),
        );
        let mut report = MigrateReport {
            peer: to.to_owned(),
            migration: None,
            moved: 0,
            stayed: 0,
            elapsed_ms: 0.0,
            abort: None,
            conns: stayed,
        };
        // A connection is frozen from its batch's capture to its batch's commit, so batches
        // are small; a few run at once, so that one batch's transfer overlaps the next one's
        // capture and the previous one's restore.
        let mut chunks = offers.chunks(MOVE_BATCH);
        let mut waiting = std::collections::VecDeque::new();
        loop {
            while waiting.len() < MOVES_IN_FLIGHT
                && let Some(chunk) = chunks.next()
            {
                let (tx, rx) = bounded(1);
                let cmd = tunnel::Command::Migrate {
                    peer: to.to_owned(),
                    offers: chunk.to_vec(),
                    reply: tx,
                };
                if !self.tunnel.as_ref().is_some_and(|t| t.send(cmd)) {
                    return Err("the tunnel thread is gone".into());
                }
                waiting.push_back(rx);
            }
            let Some(rx) = waiting.pop_front() else {
                break;
            };
            let r = rx
                .recv_timeout(MIGRATE_WAIT)
                .map_err(|_| "the tunnel thread did not answer".to_owned())??;
            report.migration = report.migration.or(r.migration);
            report.abort = report.abort.or(r.abort);
            report.conns.extend(r.conns);
        }
        report.conns.sort_by_key(|c| c.id);
        report.moved = report.conns.iter().filter(|c| c.moved).count();
        report.stayed = report.conns.len() - report.moved;
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            peer = to,
            moved = report.moved,
            stayed = report.stayed,
            elapsed_ms = report.elapsed_ms,
            "migrate request done"
        );
        Ok(report)
    }

    /// Stops accepting, then moves every connection to `to`, round after round, until none
    /// is left here or a round moves nothing.
    fn drain(&self, to: &str) -> Result<serde_json::Value, String> {
        let started = StdInstant::now();
        if self.tunnel.is_none() {
            return Err("this node has no [tunnel]".into());
        }
        self.accepting.store(false, Ordering::Release);
        for w in &self.workers {
            w.send(WorkerMsg::StopAccepting);
        }
        tracing::info!(
            peer = to,
            "draining: new connections refused, moving every connection"
        );
        let mut outcomes: Vec<ConnOutcome> = Vec::new();
        let mut rounds = 0;
        while rounds < 20 {
            rounds += 1;
            let report = self.migrate(to, Selection::All)?;
            let moved = report.moved;
            for c in report.conns {
                match outcomes.iter_mut().find(|o| o.id == c.id) {
                    Some(o) => *o = c,
                    None => outcomes.push(c),
                }
            }
            if moved == 0 {
                break;
            }
        }
        let left: Vec<ConnInfo> = self
            .conns(false)?
            .into_iter()
            .filter(|c| c.mode != "moved" && !matches!(c.state.as_str(), "TIME-WAIT" | "CLOSED"))
            .collect();
        let moved = outcomes.iter().filter(|c| c.moved).count();
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            peer = to,
            moved,
            left = left.len(),
            elapsed_ms,
            "drain done{}",
            if left.is_empty() {
                ": the node is empty"
            } else {
                ""
            }
        );
        Ok(serde_json::json!({
            "peer": to,
            "rounds": rounds,
            "moved": moved,
            "left": left.len(),
            "empty": left.is_empty(),
            "elapsed_ms": elapsed_ms,
            "left_conns": left.iter().map(|c| serde_json::json!({"id": c.id, "client": c.client, "state": c.state, "mode": c.mode})).collect::<Vec<_>>(),
            "conns": outcomes,
        }))
    }
}

impl Handler for Node {
    fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Migrate {
                to,
                conns,
                port,
                count,
                all,
            } => {
                let chosen = usize::from(!conns.is_empty())
                    + usize::from(port.is_some())
                    + usize::from(count.is_some())
                    + usize::from(all);
                if chosen != 1 {
                    return Reply::error(
                        "say which connections: exactly one of conns, port, count, all",
                    );
                }
                let selection = if all {
                    Selection::All
                } else if let Some(p) = port {
                    Selection::Port(p)
                } else if let Some(n) = count {
                    Selection::Count(n)
                } else {
                    Selection::Ids(conns)
                };
                match self.migrate(&to, selection) {
                    Ok(r) => Reply::ok(serde_json::to_value(r).unwrap_or_default()),
                    Err(e) => Reply::error(e),
                }
            }
            Request::Drain { to } => match self.drain(&to) {
                Ok(v) => Reply::ok(v),
                Err(e) => Reply::error(e),
            },
            Request::Peers => match self.ask_tunnel(tunnel::Command::Peers) {
                Ok(peers) => Reply::ok(serde_json::to_value(peers).unwrap_or_default()),
                Err(e) => Reply::error(e),
            },
            Request::TunnelSend {
                peer,
                bytes,
                channel,
            } => {
                let datagram = match channel.as_deref() {
                    None | Some("reliable") => false,
                    Some("datagram") => true,
                    Some(other) => {
                        return Reply::error(format!(
                            "unknown channel `{other}` (reliable or datagram)"
                        ));
                    }
                };
                match self.ask_tunnel(|reply| tunnel::Command::Send {
                    peer,
                    bytes,
                    datagram,
                    reply,
                }) {
                    Ok(Ok(())) => {
                        Reply::ok(serde_json::json!({"queued_bytes": bytes, "datagram": datagram}))
                    }
                    Ok(Err(e)) | Err(e) => Reply::error(e),
                }
            }
            Request::Plan => Reply::ok(
                self.predict
                    .plan_json(self.clock.now(), self.config.predict.enforce_classes),
            ),
            Request::Status => Reply::ok(self.status()),
            Request::Conns { all } => match self.conn_rows(all) {
                Ok(rows) => Reply::ok(serde_json::Value::Array(rows)),
                Err(e) => Reply::error(e),
            },
            Request::Metrics => Reply::ok(serde_json::Value::String(self.metrics())),
            Request::Freeze { id } => {
                let results = match self.ask_all("freeze", |tx| WorkerMsg::Freeze(id, tx)) {
                    Ok(r) => r,
                    Err(e) => return Reply::error(e),
                };
                match results
                    .iter()
                    .find(|r| !matches!(r, Err(FlowError::NoSuchFlow(_))))
                {
                    Some(Ok(())) => {
                        tracing::info!(id, "connection frozen by control request");
                        Reply::ok(serde_json::json!({"frozen": id}))
                    }
                    Some(Err(e)) => Reply::error(e.to_string()),
                    None => Reply::error(FlowError::NoSuchFlow(id).to_string()),
                }
            }
            Request::Thaw { id } => {
                let results = match self.ask_all("thaw", |tx| WorkerMsg::Thaw(id, tx)) {
                    Ok(r) => r,
                    Err(e) => return Reply::error(e),
                };
                match results
                    .iter()
                    .find(|r| !matches!(r, Err(FlowError::NoSuchFlow(_))))
                {
                    Some(Ok(n)) => {
                        tracing::info!(id, replayed = n, "connection thawed by control request");
                        Reply::ok(serde_json::json!({"thawed": id, "replayed_packets": n}))
                    }
                    Some(Err(e)) => Reply::error(e.to_string()),
                    None => Reply::error(FlowError::NoSuchFlow(id).to_string()),
                }
            }
        }
    }
}

/// Removes the control socket file and the routes when the node stops, however it stops:
/// only what this process made.
struct Cleanup {
    /// Set once our listener is bound at this path.
    socket: Option<PathBuf>,
    routes: Vec<(std::net::Ipv4Addr, u8, u32)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &(prefix, len, ifindex) in &self.routes {
            if let Err(e) = netlink::delete_route(prefix, len, ifindex) {
                // The route goes with the device anyway when we created it.
                tracing::debug!(error = %e, "route removal");
            }
        }
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn open_tun(config: &Config) -> Result<Vec<SyncDevice>, NodeError> {
    let name = config.tun.name.clone();
    let tun_err = |source| NodeError::Tun {
        name: name.clone(),
        source,
    };
    let workers = config.node.workers;
    let first = DeviceBuilder::new()
        .name(&config.tun.name)
        .mtu(config.tun.mtu)
        .multi_queue(workers > 1)
        .offload(config.tun.offload)
        .build_sync()
        .map_err(tun_err)?;
    first.set_mtu(config.tun.mtu).map_err(tun_err)?;
    first.enabled(true).map_err(tun_err)?;
    let mut queues = vec![first];
    for _ in 1..workers {
        let q = queues[0].try_clone().map_err(tun_err)?;
        queues.push(q);
    }
    for q in &queues {
        q.set_nonblocking(true).map_err(tun_err)?;
    }
    Ok(queues)
}

/// Socket buffers are mappings of their own ([`crate::alloc`]): warns when the kernel's limit
/// of mappings per process is below three per connection the node may hold.
fn warn_if_few_mappings(max_connections: usize) {
    let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let want = 3 * max_connections as u64 + 1_000;
    if limit < want {
        tracing::warn!(
            max_map_count = limit,
            max_connections,
            suggested = want,
            "vm.max_map_count is below three mappings per connection: near max_connections, after churn, the kernel may refuse to map a socket buffer and the node stops (sysctl -w vm.max_map_count={want})"
        );
    }
}

/// Returns the allocator's free memory to the kernel (glibc's `malloc_trim`).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas; it is
    // thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// 32 bytes from the kernel's CSPRNG (`getrandom(2)`).
pub fn os_random_seed() -> io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `seed`.
        let n =
            unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(seed)
}

/// Runs a node until SIGINT or SIGTERM, then closes its connections gracefully (within
/// `node.shutdown_timeout_ms`), removes what it created, and returns.
///
/// Socket buffers and send mirrors should get mappings of their own, as the `flowshift`
/// binary's allocator gives them ([`crate::alloc::NodeAlloc`]): idle connections then cost
/// only the pages they touched.
pub fn run(config: Config) -> Result<(), NodeError> {
    warn_if_few_mappings(config.limits.max_connections);
    if !crate::alloc::enable_recycling() {
        tracing::info!(
            "pages are not 4 KiB or /proc/self/pagemap is unreadable: freed socket buffers are \
             unmapped, not recycled (docs/architecture.md, Recycled buffers for new connections)"
        );
    }
    let started = StdInstant::now();
    let clock = Clock(started);
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(setup("signal handlers"))?;

    // The control socket first: a second node started with the same config stops here,
    // before it attaches queues to the first one's TUN device or touches its routes.
    let access = control::Access {
        group: config.node.control_group,
    };
    let listener = control::bind(&config.node.control_socket, access)?;
    let mut cleanup = Cleanup {
        socket: Some(config.node.control_socket.clone()),
        routes: Vec::new(),
    };
    let queues = open_tun(&config)?;
    let ifindex = queues[0].if_index().map_err(|source| NodeError::Tun {
        name: config.tun.name.clone(),
        source,
    })?;
    for a in &config.tun.service_addresses {
        netlink::add_route(a.network(), a.prefix_len, ifindex)?;
        cleanup.routes.push((a.network(), a.prefix_len, ifindex));
    }

    let budget = match config.limits.max_per_source {
        None => ConnectionBudget::new(config.limits.max_connections),
        Some(n) => ConnectionBudget::new(config.limits.max_connections).with_per_source(n),
    };
    let tun_write_errors = Arc::new(AtomicU64::new(0));
    let max_packet = if config.tun.offload {
        65536
    } else {
        usize::from(config.tun.mtu)
    };
    let seed = {
        let mut b = [0u8; 8];
        // A failed getrandom leaves a time-based seed: ISNs only need to be unpredictable-ish.
        // SAFETY: `b` is writable for its length.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n == 8 {
            u64::from_ne_bytes(b)
        } else {
            started.elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15
        }
    };

    // ISNs, timestamp offsets and SYN cookies: one secret for all workers (a cookie's ACK
    // may arrive on another queue than its SYN), never the same on two nodes or two runs.
    let secret = {
        let s = os_random_seed().map_err(setup("random secret"))?;
        let mut k = [0u8; 16];
        k.copy_from_slice(&s[..16]);
        k
    };
    let accepting = Arc::new(AtomicBool::new(true));
    // Every worker's inbox first: the tunnel thread delivers forwarded packets to them, and
    // the workers send theirs to the tunnel.
    let mut handles: Vec<WorkerHandle> = Vec::new();
    let mut inboxes = Vec::new();
    for tun in &queues {
        let poll = Poll::new().map_err(setup("mio poll"))?;
        let fd = tun.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), TUN, Interest::READABLE)
            .map_err(setup("register TUN queue"))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(setup("mio waker"))?);
        let (tx, rx) = unbounded();
        handles.push(WorkerHandle { tx, waker });
        inboxes.push((poll, rx));
    }
    let tunnel = match &config.tunnel {
        None => None,
        Some(t) => Some(tunnel::start(
            t,
            os_random_seed().map_err(setup("random seed"))?,
            handles.clone(),
            tunnel::migrate::Coordinator::new(
                tunnel::migrate::Admission {
                    addresses: config
                        .tun
                        .service_addresses
                        .iter()
                        .map(|a| a.addr)
                        .collect(),
                    max_buffer: MAX_RESTORED_BUFFER,
                    budget: budget.clone(),
                    accepting: accepting.clone(),
                },
                *t.private_key.public_key().as_bytes(),
                // Migration ids never repeat across restarts (a target remembers them).
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64),
            ),
        )?),
    };

    let growth = config
        .tcp
        .tx_buffer_max
        .saturating_sub(config.tcp.tx_buffer);
    let per_worker = config.tcp.tx_grow_budget / config.node.workers;
    if growth > 0 && config.tcp.tx_grow_budget > 0 && per_worker < growth {
        tracing::warn!(
            budget = config.tcp.tx_grow_budget,
            workers = config.node.workers,
            per_worker,
            growth,
            "tcp.tx_grow_budget split over the workers leaves each less than one growth \
             (tcp.tx_buffer_max - tcp.tx_buffer): no send buffer will grow"
        );
    }

    let predict = Arc::new(Predict::new(NodePredictor::new(
        config.predict.config.clone(),
        flowshift_core::predict::node::NodeSettings {
            workers: handles.len(),
            ..config.predict.node
        },
    )));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let cores = if config.node.pin_workers {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    for (index, (tun, (poll, rx))) in queues.into_iter().zip(inboxes).enumerate() {
        let stack = Stack::new(
            StackConfig {
                worker: index as u16,
                addresses: config.tun.service_addresses.clone(),
                services: config.services.clone(),
                tcp: flowshift_core::config::TcpConfig {
                    // The node's budget, shared among its workers.
                    tx_grow_budget: per_worker,
                    ..config.tcp.clone()
                },
                mtu: usize::from(config.tun.mtu),
                max_packet,
                frozen_queue_packets: config.limits.frozen_queue_packets,
                frozen_queue_bytes: config.limits.frozen_queue_bytes,
                frozen_total_bytes: config.limits.frozen_total_bytes / config.node.workers,
                freeze_timeout: smoltcp::time::Duration::from_millis(
                    config.limits.freeze_timeout_ms,
                ),
                max_half_open: config.limits.max_half_open.div_ceil(config.node.workers),
                syn_cookies_after: config.limits.syn_cookies.then(|| {
                    config
                        .limits
                        .syn_cookie_threshold
                        .div_ceil(config.node.workers)
                }),
                seed: seed.wrapping_add(index as u64),
                secret,
                tx_headroom: if config.tun.offload {
                    offload::VNET_HDR_LEN
                } else {
                    0
                },
                tso_max: config.tun.offload.then_some(TSO_MAX),
            },
            budget.clone(),
            clock.now(),
        );
        let worker = Worker {
            index,
            tun,
            stack,
            poll,
            control: rx,
            clock,
            tun_write_errors: tun_write_errors.clone(),
            packets: RxBuffers::new(config.tun.offload),
            tunnel: tunnel.as_ref().map(tunnel::TunnelHandle::sender),
            segment_buf: Vec::new(),
            relay: Coalescer::new(offload::VNET_HDR_LEN),
            compacted_seen: 0,
            next_trim: StdInstant::now(),
            busy: smoltcp::time::Duration::ZERO,
            quiescing: Vec::new(),
            predict: predict.clone(),
            diverted: Vec::new(),
            undecided: Vec::new(),
        };
        let core = cores.get(index % cores.len().max(1)).copied();
        let thread = std::thread::Builder::new()
            .name(format!("fs-worker-{index}"))
            .spawn(move || {
                let _guard = PanicGuard(index);
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                worker.run();
            })
            .map_err(setup("worker thread"))?;
        threads.push(thread);
    }

    let node = Arc::new(Node {
        accepting,
        config: config.clone(),
        workers: handles,
        budget,
        started,
        tun_write_errors,
        tunnel,
        clock,
        predict,
    });
    {
        let n = node.clone();
        std::thread::Builder::new()
            .name("fs-predict".into())
            // Ends with the process; the node holds no lock it would need.
            .spawn(move || n.run_predictor())
            .map_err(setup("predictor thread"))?;
    }
    if let Some(addr) = config.metrics_listen {
        let n = node.clone();
        metrics::serve_http(addr, Arc::new(move || n.metrics()))
            .map_err(|source| NodeError::Metrics { addr, source })?;
    }
    let handler: Arc<dyn Handler> = node.clone();
    std::thread::Builder::new()
        .name("fs-control".into())
        .spawn(move || control::serve(listener, handler, access))
        .map_err(setup("control thread"))?;

    tracing::info!(
        node = %config.node.name,
        tun = %config.tun.name,
        mtu = config.tun.mtu,
        workers = config.node.workers,
        addresses = ?config.tun.service_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        ports = ?config.services.iter().map(|s| s.port).collect::<Vec<_>>(),
        control = %config.node.control_socket.display(),
        "node running"
    );

    let signal = signals.forever().next().unwrap_or(libc::SIGTERM);
    let timeout = Duration::from_millis(config.node.shutdown_timeout_ms);
    tracing::info!(
        signal,
        open = node.budget.open(),
        timeout_ms = config.node.shutdown_timeout_ms,
        "shutting down: no new connections, closing open ones"
    );
    let deadline = StdInstant::now() + timeout;
    node.accepting.store(false, Ordering::Release);
    for w in &node.workers {
        w.send(WorkerMsg::Shutdown { deadline });
    }
    let mut panicked = None;
    for (index, t) in threads.into_iter().enumerate() {
        if t.join().is_err() {
            panicked.get_or_insert(index);
        }
    }
    drop(cleanup);
    if let Some(t) = &node.tunnel {
        t.stop();
    }
    tracing::info!(sockets_dropped = node.budget.open(), "node stopped");
    match panicked {
        Some(index) => Err(NodeError::WorkerPanicked(index)),
        None => Ok(()),
    }
}

fn std_duration(d: smoltcp::time::Duration) -> Duration {
    Duration::from_micros(d.total_micros())
}

/// The protocol's name for why a restore failed.
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

/// Lives on a worker's stack: if the worker unwinds, it logs that and signals the process
/// to shut down (the main thread waits for SIGINT/SIGTERM), so a bug takes the node down
/// cleanly instead of leaving one TUN queue unserved.
struct PanicGuard(usize);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(worker = self.0, "worker panicked: shutting the node down");
            // SAFETY: raise(3) has no preconditions.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }
}
