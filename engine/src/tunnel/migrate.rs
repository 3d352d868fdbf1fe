//! The migration coordinator: the statesync [`Source`] and [`Target`] machines, run in the
//! tunnel thread, and the glue to the workers that own the flows.
//!
//! The machines decide; this module carries their decisions out. Protocol messages travel
//! as reliable tunnel messages in a `Migration` envelope. Work on flows goes to the worker
//! that owns them (a flow id's top bits name it) and comes back as [`Command`]s, so the
//! tunnel thread never waits for a worker:
//!
//! | machine action | worker work | answer |
//! |---|---|---|
//! | source `Capture` | freeze + capture each flow | [`Command::Captured`] → `Source::captured` |
//! | source `Moved` | forward the flow to the target (`complete_move`) | [`Command::MoveDone`] |
//! | source `Thaw` | thaw the flow (its queued packets delivered locally) | [`Command::MoveDone`] |
//! | target `Admit` | — (decided here: capacity, apps, buffers, window scale) | `Target::admitted` |
//! | target `Restore` | restore each snapshot | [`Command::Restored`] → `Target::restored` |
//! | target `Discard` | drop restored copies silently | — |
//!
//! An operator's request (`ctl migrate`, `ctl drain`) is answered once the source machine
//! finished the migration and every worker confirmed its flows' outcome, with each flow's
//! freeze time as the worker measured it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;
use flowshift_core::app::{self, AppKind};
use flowshift_core::flow::{PeerRef, Remote};
use flowshift_core::stack::{ConnectionBudget, window_shift};
use flowshift_statesync::envelope::EnvelopeRepr;
use flowshift_statesync::protocol::{
    Config as ProtocolConfig, ConnOffer, FlowOutcome, MAX_BATCH, Message, MigrationId,
    MigrationReport, Recipient, RefuseReason, Rehome, Source, SourceAction, Target, TargetAction,
    Verdict,
};
use flowshift_statesync::snapshot::ConnSnapshot;
use flowshift_tunnel::{Instant, PeerId, SendError};
use serde::{Deserialize, Serialize};

use super::Driver;
use crate::node::{RestoreItem, WorkerMsg};

/// A flow's offer made by its worker, with where its packets enter when not here.
pub(crate) type OfferResult = Result<(ConnOffer, Option<Remote>), String>;
/// A flow captured by its worker (with where its packets enter), or why not.
pub(crate) type CaptureResult = Result<(ConnSnapshot, Option<Remote>), RefuseReason>;
/// A flow restored by a worker (its id there), or why not.
pub(crate) type RestoreResult = Result<u64, RefuseReason>;

/// A flow's outcome, as `ctl migrate` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnOutcome {
    /// The connection's id on this node.
    pub id: u64,
    /// The client.
    pub client: Option<SocketAddrV4>,
    /// It lives on the target now.
    pub moved: bool,
    /// Its id on the target, when moved.
    pub remote_id: Option<u64>,
    /// How long it was frozen (no packet delivered or sent), milliseconds; none if it was
    /// never frozen.
    pub freeze_ms: Option<f64>,
    /// Why it stayed, when it did.
    pub reason: Option<String>,
}

/// The answer to `ctl migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateReport {
    /// The target peer.
    pub peer: String,
    /// The migration's id (in the logs of both nodes).
    pub migration: Option<u64>,
    /// Connections moved.
    pub moved: usize,
    /// Connections that stayed.
    pub stayed: usize,
    /// Wall time from the request to the last outcome, milliseconds.
    pub elapsed_ms: f64,
    /// Why the migration was given up, if it was.
    pub abort: Option<String>,
    /// Every connection's outcome.
    pub conns: Vec<ConnOutcome>,
}

/// Counters of the coordinator, for `/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Connections moved away from this node.
    pub moved_out: u64,
    /// Connections restored here from another node.
    pub moved_in: u64,
    /// Connections that stayed, by reason.
    pub stayed: Vec<(String, u64)>,
    /// Migrations aborted, by reason.
    pub aborts: Vec<(String, u64)>,
    /// Freeze times of moved connections: counts per bucket of [`FREEZE_BUCKETS_MS`]
    /// (the last counts everything above).
    pub freeze_buckets: Vec<u64>,
    /// Sum of the freeze times of moved connections, seconds.
    pub freeze_sum_s: f64,
    /// Migration messages refused (malformed, wrong version).
    pub messages_refused: u64,
}

/// Upper bounds of the freeze-time histogram, milliseconds.
pub const FREEZE_BUCKETS_MS: [f64; 10] =
    [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 2000.0];

fn bump(list: &mut Vec<(String, u64)>, key: String) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => list.push((key, 1)),
    }
}

/// What this node accepts of a migration offer.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    /// Service addresses of this node.
    pub(crate) addresses: Vec<std::net::Ipv4Addr>,
    /// Largest socket buffer accepted.
    pub(crate) max_buffer: usize,
    /// Shared with the workers: the node's connection slots.
    pub(crate) budget: ConnectionBudget,
    /// False while draining or shutting down: offers are refused.
    pub(crate) accepting: Arc<AtomicBool>,
}

/// An operator's request in progress.
struct Pending {
    peer_name: String,
    reply: Sender<Result<MigrateReport, String>>,
    started: std::time::Instant,
    outcomes: HashMap<u64, ConnOutcome>,
    /// Flows handed to workers to move or thaw, not yet confirmed.
    unconfirmed: usize,
    report: Option<MigrationReport<PeerId>>,
    /// Where each offered flow's packets enter, when not here.
    ingress: HashMap<u64, Option<Remote>>,
}

/// Results gathered from several workers.
struct Gather<T> {
    waiting: usize,
    results: Vec<T>,
}

/// Source and target sides of every migration of this node.
pub(crate) struct Coordinator {
    source: Source<PeerId>,
    target: Target<PeerId>,
    admission: Admission,
    own_key: [u8; 32],
    pending: HashMap<MigrationId, Pending>,
    captures: HashMap<MigrationId, Gather<(u64, CaptureResult)>>,
    restores: HashMap<(PeerId, MigrationId), Gather<(u64, RestoreResult)>>,
    /// Encoded messages the endpoint would not take yet (its send buffer was full).
    outbox: VecDeque<(PeerId, Vec<u8>)>,
    /// Flows moved on to a third node, by (their ingress node, migration, new owner):
    /// `(flow id at the ingress node, flow id at the owner)`, to send as Rehome messages.
    rehomes: HashMap<(PeerId, MigrationId, PeerId), Vec<(u64, u64)>>,
    next_worker: usize,
    pub(crate) stats: MigrationStats,
}

impl Coordinator {
    pub(crate) fn new(admission: Admission, own_key: [u8; 32], first_id: u64) -> Self {
        let config = ProtocolConfig::default();
        Self {
            source: Source::new(config.clone(), first_id),
            target: Target::new(config),
            admission,
            own_key,
            pending: HashMap::new(),
            captures: HashMap::new(),
            restores: HashMap::new(),
            outbox: VecDeque::new(),
            rehomes: HashMap::new(),
            next_worker: 0,
            stats: MigrationStats {
                freeze_buckets: vec![0; FREEZE_BUCKETS_MS.len() + 1],
                ..Default::default()
            },
        }
    }

    /// The earliest deadline of either machine.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let at = [self.source.poll_timeout(), self.target.poll_timeout()]
            .into_iter()
            .flatten()
            .min()?;
        Some(Instant::from_micros(at.as_micros()))
    }

    fn record_freeze(&mut self, frozen: Duration) {
        let ms = frozen.as_secs_f64() * 1e3;
        let i = FREEZE_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(FREEZE_BUCKETS_MS.len());
        self.stats.freeze_buckets[i] += 1;
        self.stats.freeze_sum_s += frozen.as_secs_f64();
    }
}

fn sync_now(now: Instant) -> flowshift_statesync::Instant {
    flowshift_statesync::Instant::from_micros(now.as_micros())
}

/// The worker that owns flow `id`.
fn worker_of(id: u64) -> usize {
    (id >> 48) as usize
}

impl Driver {
    /// Starts moving `offers` to the peer named `peer`; the answer goes to `reply` when done.
    pub(super) fn migration_start(
        &mut self,
        now: Instant,
        peer: String,
        offers: Vec<(ConnOffer, Option<Remote>)>,
        reply: Sender<Result<MigrateReport, String>>,
    ) {
        let Some(slot) = self.peers.iter().find(|p| p.name == peer) else {
            let _ = reply.send(Err(format!("no peer named {peer}")));
            return;
        };
        let peer_id = slot.id;
        let mut outcomes = HashMap::new();
        let mut ingress = HashMap::new();
        let mut go = Vec::new();
        for (offer, from) in offers {
            if !offer.is_valid() {
                outcomes.insert(
                    offer.flow,
                    stayed(
                        offer.flow,
                        Some(offer.client),
                        None,
                        "its buffers are larger than a move carries (16 MiB)".into(),
                    ),
                );
                continue;
            }
            // A flow whose packets enter at a third node may move on: that node is told
            // (a Rehome) once the flow is moved.
            ingress.insert(offer.flow, from);
            go.push(offer);
        }
        let started = std::time::Instant::now();
        if go.is_empty() {
            let _ = reply.send(Ok(finish_report(peer, None, started, outcomes, None)));
            return;
        }
        let clients: HashMap<u64, SocketAddrV4> = go.iter().map(|o| (o.flow, o.client)).collect();
        match self.migration.source.start(sync_now(now), peer_id, go) {
            Ok(migration) => {
                tracing::info!(%migration, %peer, flows = clients.len(), "migration started");
                for (flow, client) in clients {
                    outcomes.insert(flow, stayed(flow, Some(client), None, String::new()));
                }
                self.migration.pending.insert(
                    migration,
                    Pending {
                        peer_name: peer,
                        reply,
                        started,
                        outcomes,
                        unconfirmed: 0,
                        report: None,
                        ingress,
                    },
                );
            }
            Err(e) => {
                let _ = reply.send(Err(format!("migration not started: {e}")));
            }
        }
        self.migration_poll(now);
    }

    /// A migration protocol message from `peer`.
    pub(super) fn migration_message(&mut self, now: Instant, peer: PeerId, payload: &[u8]) {
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.migration.stats.messages_refused += 1;
                self.refused(peer, "migration message", &e);
                return;
            }
        };
        let now_s = sync_now(now);
        tracing::debug!(migration = %msg.migration(), kind = ?msg.recipient(), "migration message");
        match msg.recipient() {
            Recipient::Source => self.migration.source.handle_message(now_s, peer, msg),
            Recipient::Target => self.migration.target.handle_message(now_s, peer, msg),
            Recipient::Ingress => {
                if let Message::Rehome(r) = msg {
                    self.rehome(peer, r);
                }
            }
        }
        self.migration_poll(now);
    }

    /// The peer restarted: its migrations end now.
    pub(super) fn migration_peer_restarted(&mut self, now: Instant, peer: PeerId) {
        self.migration.source.peer_restarted(sync_now(now), peer);
        self.migration.target.peer_restarted(sync_now(now), peer);
        self.migration_poll(now);
    }

    /// Runs both machines' timers, carries out their actions and sends their messages.
    pub(super) fn migration_poll(&mut self, now: Instant) {
        let now_s = sync_now(now);
        self.migration.source.handle_timeout(now_s);
        self.migration.target.handle_timeout(now_s);
        loop {
            let mut busy = false;
            while let Some(a) = self.migration.source.poll_action() {
                busy = true;
                self.source_action(now, a);
            }
            while let Some(a) = self.migration.target.poll_action() {
                busy = true;
                self.target_action(now, a);
            }
            if !busy {
                break;
            }
        }
        while let Some((peer, msg)) = self.migration.source.poll_transmit() {
            self.queue_migration_message(peer, &msg);
        }
        self.send_rehomes();
        while let Some((peer, msg)) = self.migration.target.poll_transmit() {
            self.queue_migration_message(peer, &msg);
        }
        self.flush_migration_outbox();
    }

    /// Tells the nodes where moved flows' packets enter (third nodes) where they live now.
    fn send_rehomes(&mut self) {
        let rehomes = std::mem::take(&mut self.migration.rehomes);
        for ((ingress, migration, owner), flows) in rehomes {
            let Some(owner_key) = self.ep.peer_public_key(owner).map(|k| *k.as_bytes()) else {
                continue;
            };
            for chunk in flows.chunks(MAX_BATCH) {
                tracing::info!(%migration, ?ingress, flows = chunk.len(), "telling the node where their packets enter that they moved on");
                let msg = Message::Rehome(Rehome {
                    migration,
                    owner_key,
                    flows: chunk.to_vec(),
                });
                self.queue_migration_message(ingress, &msg);
            }
        }
    }

    /// A Rehome from `peer`: flows moved from here to `peer` were moved on by it.
    fn rehome(&mut self, peer: PeerId, msg: Rehome) {
        let Some(owner) = self
            .peers
            .iter()
            .find(|p| self.ep.peer_public_key(p.id).map(|k| *k.as_bytes()) == Some(msg.owner_key))
            .map(|p| p.id)
        else {
            self.migration.stats.messages_refused += 1;
            tracing::warn!(migration = %msg.migration, ?peer, flows = msg.flows.len(), "connections moved on to a node this node has no tunnel to: their packets keep going to the previous owner");
            return;
        };
        tracing::info!(migration = %msg.migration, from = ?peer, to = ?owner, flows = msg.flows.len(), "connections moved on: forwarding to their new owner");
        for (flow, owner_flow) in msg.flows {
            if let Some(w) = self.workers.get(worker_of(flow)) {
                w.send(WorkerMsg::Rehome {
                    from: PeerRef(peer.as_u32()),
                    flow,
                    to: Remote {
                        peer: PeerRef(owner.as_u32()),
                        flow: owner_flow,
                    },
                });
            }
        }
    }

    fn queue_migration_message(&mut self, peer: PeerId, msg: &Message) {
        let mut bytes = Vec::with_capacity(EnvelopeRepr::HEADER_LEN + msg.encoded_len());
        bytes.extend_from_slice(&EnvelopeRepr::MIGRATION.to_header());
        msg.encode(&mut bytes);
        self.migration.outbox.push_back((peer, bytes));
    }

    fn flush_migration_outbox(&mut self) {
        while let Some((peer, bytes)) = self.migration.outbox.front() {
            match self.ep.send_message(*peer, bytes) {
                Ok(()) => {}
                // The reliable channel's buffer is full: try again next turn.
                Err(SendError::BufferFull) => return,
                Err(e) => {
                    // The machines' timers deal with a message that never arrives.
                    tracing::warn!(error = %e, "migration message not sent");
                }
            }
            self.migration.outbox.pop_front();
        }
    }

    fn source_action(&mut self, now: Instant, action: SourceAction<PeerId>) {
        match action {
            SourceAction::Capture {
                migration,
                flows,
                peer,
            } => {
                let to = PeerRef(peer.as_u32());
                let mut per_worker: Vec<Vec<u64>> = vec![Vec::new(); self.workers.len()];
                let mut missing = Vec::new();
                for f in flows {
                    match per_worker.get_mut(worker_of(f)) {
                        Some(v) => v.push(f),
                        None => missing.push((f, Err(RefuseReason::CaptureFailed))),
                    }
                }
                let mut waiting = 0;
                for (w, flows) in per_worker.into_iter().enumerate() {
                    if !flows.is_empty()
                        && self.workers[w].send(WorkerMsg::Capture {
                            migration,
                            to,
                            flows,
                        })
                    {
                        waiting += 1;
                    }
                }
                self.migration.captures.insert(
                    migration,
                    Gather {
                        waiting,
                        results: missing,
                    },
                );
                if waiting == 0 {
                    self.migration_captured(now, migration, Vec::new());
                }
            }
            SourceAction::Moved {
                migration,
                flow,
                peer,
                target_flow,
            } => {
                let to = Remote {
                    peer: PeerRef(peer.as_u32()),
                    flow: target_flow,
                };
                self.send_to_worker(
                    migration,
                    flow,
                    WorkerMsg::Complete {
                        migration,
                        flow,
                        to,
                    },
                );
                if let Some(p) = self.migration.pending.get_mut(&migration) {
                    if let Some(o) = p.outcomes.get_mut(&flow) {
                        o.remote_id = Some(target_flow);
                    }
                    // Its packets enter at a third node: tell it where the flow lives now.
                    if let Some(Some(ingress)) = p.ingress.get(&flow)
                        && ingress.peer != to.peer
                        && let Some(at) =
                            self.peers.iter().find(|e| e.id.as_u32() == ingress.peer.0)
                    {
                        self.migration
                            .rehomes
                            .entry((at.id, migration, peer))
                            .or_default()
                            .push((ingress.flow, target_flow));
                    }
                }
            }
            SourceAction::Thaw {
                migration,
                flow,
                reason,
            } => {
                tracing::info!(%migration, flow = format_args!("{flow:#x}"), %reason, "connection stays: thawed");
                if let Some(p) = self.migration.pending.get_mut(&migration)
                    && let Some(o) = p.outcomes.get_mut(&flow)
                {
                    o.reason = Some(reason.to_string());
                }
                bump(&mut self.migration.stats.stayed, reason.to_string());
                self.send_to_worker(migration, flow, WorkerMsg::ThawMoved { migration, flow });
            }
            SourceAction::Refused {
                migration,
                flow,
                reason,
            } => {
                tracing::info!(%migration, flow = format_args!("{flow:#x}"), %reason, "connection stays: refused by the target");
                bump(&mut self.migration.stats.stayed, reason.to_string());
                if let Some(p) = self.migration.pending.get_mut(&migration)
                    && let Some(o) = p.outcomes.get_mut(&flow)
                {
                    o.reason = Some(reason.to_string());
                }
            }
            SourceAction::Finished { migration, report } => {
                tracing::info!(%report, "migration finished");
                if let Some(reason) = report.abort {
                    bump(&mut self.migration.stats.aborts, reason.to_string());
                }
                if let Some(p) = self.migration.pending.get_mut(&migration) {
                    p.report = Some(report);
                }
                self.maybe_answer(migration);
            }
            #[allow(unreachable_patterns)]
            other => tracing::debug!(?other, "source action"),
        }
    }

    /// Hands `msg` about `flow` to its worker, counting it as unconfirmed for the request.
    fn send_to_worker(&mut self, migration: MigrationId, flow: u64, msg: WorkerMsg) {
        let sent = self
            .workers
            .get(worker_of(flow))
            .is_some_and(|w| w.send(msg));
        if sent && let Some(p) = self.migration.pending.get_mut(&migration) {
            p.unconfirmed += 1;
        }
    }

    /// A worker's captures for `migration`.
    pub(super) fn migration_captured(
        &mut self,
        now: Instant,
        migration: MigrationId,
        results: Vec<(u64, CaptureResult)>,
    ) {
        let Some(g) = self.migration.captures.get_mut(&migration) else {
            return;
        };
        g.results.extend(results);
        g.waiting = g.waiting.saturating_sub(1);
        if g.waiting > 0 {
            return;
        }
        let Some(g) = self.migration.captures.remove(&migration) else {
            return;
        };
        let mut snapshots = Vec::new();
        let mut failed = Vec::new();
        for (flow, r) in g.results {
            match r {
                Ok((mut snap, ingress)) => {
                    snap.ingress.node_key = match ingress {
                        None => self.own_key(),
                        Some(r) => self
                            .peers
                            .iter()
                            .find(|p| p.id.as_u32() == r.peer.0)
                            .and_then(|p| self.ep.peer_public_key(p.id))
                            .map_or([0; 32], |k| *k.as_bytes()),
                    };
                    snapshots.push((flow, snap));
                }
                Err(reason) => failed.push((flow, reason)),
            }
        }
        self.migration
            .source
            .captured(sync_now(now), migration, snapshots, failed);
        self.migration_poll(now);
    }

    fn own_key(&self) -> [u8; 32] {
        self.migration.own_key
    }

    /// A worker applied a Moved or Thaw decision.
    pub(super) fn migration_move_done(
        &mut self,
        migration: MigrationId,
        flow: u64,
        moved: bool,
        frozen: Option<Duration>,
    ) {
        if moved {
            self.migration.stats.moved_out += 1;
            if let Some(f) = frozen {
                self.migration.record_freeze(f);
            }
        }
        let remote = self
            .migration
            .pending
            .get(&migration)
            .and_then(|p| p.outcomes.get(&flow))
            .and_then(|o| o.remote_id);
        tracing::info!(
            %migration,
            flow = format_args!("{flow:#x}"),
            moved,
            remote = ?remote.map(|r| format!("{r:#x}")),
            freeze_ms = frozen.map(|d| d.as_secs_f64() * 1e3),
            "{}",
            if moved { "connection moved" } else { "connection thawed: it stays here" }
        );
        if let Some(p) = self.migration.pending.get_mut(&migration) {
            p.unconfirmed = p.unconfirmed.saturating_sub(1);
            if let Some(o) = p.outcomes.get_mut(&flow) {
                o.moved = moved;
                o.freeze_ms = frozen.map(|d| d.as_secs_f64() * 1e3);
                if moved {
                    o.reason = None;
                }
            }
        }
        self.maybe_answer(migration);
    }

    /// Answers the operator once the machine is done and every worker confirmed.
    fn maybe_answer(&mut self, migration: MigrationId) {
        let done = self
            .migration
            .pending
            .get(&migration)
            .is_some_and(|p| p.report.is_some() && p.unconfirmed == 0);
        if !done {
            return;
        }
        let Some(p) = self.migration.pending.remove(&migration) else {
            return;
        };
        let report = p.report.as_ref();
        let mut outcomes = p.outcomes;
        if let Some(r) = report {
            for (flow, outcome) in &r.outcomes {
                if let Some(o) = outcomes.get_mut(flow) {
                    match outcome {
                        FlowOutcome::Moved { target_flow } => o.remote_id = Some(*target_flow),
                        FlowOutcome::Refused(reason) | FlowOutcome::Thawed(reason) => {
                            o.moved = false;
                            o.reason.get_or_insert_with(|| reason.to_string());
                        }
                    }
                }
            }
        }
        let abort = report.and_then(|r| r.abort).map(|a| a.to_string());
        let _ = p.reply.send(Ok(finish_report(
            p.peer_name,
            Some(migration.0),
            p.started,
            outcomes,
            abort,
        )));
    }

    fn target_action(&mut self, now: Instant, action: TargetAction<PeerId>) {
        match action {
            TargetAction::Admit {
                peer,
                migration,
                offers,
            } => {
                let verdicts = self.admit(&offers);
                for (flow, v) in &verdicts {
                    if let Verdict::Refused(reason) = v {
                        tracing::info!(%migration, flow = format_args!("{flow:#x}"), %reason, "offered connection refused");
                    }
                }
                self.migration
                    .target
                    .admitted(sync_now(now), peer, migration, verdicts);
            }
            TargetAction::Restore {
                peer,
                migration,
                snapshots,
            } => self.restore(now, peer, migration, snapshots),
            TargetAction::Release {
                peer,
                migration,
                flows,
                reason,
            } => {
                tracing::info!(%migration, ?peer, flows = flows.len(), %reason, "reservations released: the snapshots will not come");
            }
            TargetAction::Discard {
                peer,
                migration,
                flows,
                reason,
            } => {
                tracing::info!(%migration, ?peer, flows = flows.len(), %reason, "restored connections discarded: the source kept them");
                let mut per_worker: Vec<Vec<u64>> = vec![Vec::new(); self.workers.len()];
                for f in flows {
                    if let Some(v) = per_worker.get_mut(worker_of(f)) {
                        v.push(f);
                    }
                }
                for (w, flows) in per_worker.into_iter().enumerate() {
                    if !flows.is_empty() {
                        self.workers[w].send(WorkerMsg::Discard(flows));
                    }
                }
            }
            #[allow(unreachable_patterns)]
            other => tracing::debug!(?other, "target action"),
        }
    }

    /// Decides on each offered flow: this node must accept connections, know the app, have a
    /// slot, and give the same window scale for the same buffer.
    fn admit(&self, offers: &[ConnOffer]) -> Vec<(u64, Verdict)> {
        let a = &self.migration.admission;
        let mut free = a.budget.max().saturating_sub(a.budget.open());
        offers
            .iter()
            .map(|o| {
                let refuse = |r| (o.flow, Verdict::Refused(r));
                if !a.accepting.load(Ordering::Acquire) {
                    return refuse(RefuseReason::Shutdown);
                }
                if !a.addresses.contains(o.service.ip()) {
                    return refuse(RefuseReason::Malformed);
                }
                if AppKind::from_code(o.app_kind).is_none() {
                    return refuse(RefuseReason::UnknownApp);
                }
                if o.app_version != app::SNAPSHOT_VERSION {
                    return refuse(RefuseReason::AppVersion);
                }
                let (rx, tx) = (o.rx_capacity as usize, o.tx_capacity as usize);
                if rx > a.max_buffer || tx > a.max_buffer || rx == 0 || tx == 0 {
                    return refuse(RefuseReason::BufferMismatch);
                }
                // A flow without window scaling reports 0; otherwise the same capacity
                // must give the same shift here.
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

    /// Hands snapshots to workers: a flow that comes home to the worker that holds it, the
    /// others round-robin.
    fn restore(
        &mut self,
        now: Instant,
        peer: PeerId,
        migration: MigrationId,
        snapshots: Vec<(u64, ConnSnapshot)>,
    ) {
        let own = self.own_key();
        let mut per_worker: Vec<Vec<RestoreItem>> = std::iter::repeat_with(Vec::new)
            .take(self.workers.len())
            .collect();
        let mut results = Vec::new();
        for (flow, snapshot) in snapshots {
            let (worker, ingress, direct_return, path_rtt) = if snapshot.ingress.node_key == own {
                // Coming home: to the worker that holds its entry.
                (worker_of(snapshot.ingress.flow_id), None, false, None)
            } else {
                // Its packets enter at the source, or at a third node the source moved it
                // from: a peer of this node either way.
                let key = snapshot.ingress.node_key;
                let Some(entry) = self
                    .peers
                    .iter()
                    .find(|p| self.ep.peer_public_key(p.id).map(|k| *k.as_bytes()) == Some(key))
                else {
                    tracing::info!(%migration, flow = format_args!("{flow:#x}"), "refused: its packets enter at a node this node has no tunnel to");
                    results.push((flow, Err(RefuseReason::RestoreFailed)));
                    continue;
                };
                let w = self.migration.next_worker % self.workers.len().max(1);
                self.migration.next_worker += 1;
                let ingress = Remote {
                    peer: PeerRef(entry.id.as_u32()),
                    flow: snapshot.ingress.flow_id,
                };
                let path_rtt = self.ep.peer_stats(entry.id).and_then(|s| s.srtt);
                (w, Some(ingress), entry.direct_return, path_rtt)
            };
            match per_worker.get_mut(worker) {
                Some(v) => v.push(RestoreItem {
                    flow,
                    snapshot,
                    ingress,
                    direct_return,
                    path_rtt,
                }),
                None => results.push((flow, Err(RefuseReason::Malformed))),
            }
        }
        let mut waiting = 0;
        let mss_clamp = self.mss_clamp();
        for (w, items) in per_worker.into_iter().enumerate() {
            if !items.is_empty()
                && self.workers[w].send(WorkerMsg::Restore {
                    peer: PeerRef(peer.as_u32()),
                    migration,
                    items,
                    mss_clamp,
                    max_buffer: self.migration.admission.max_buffer,
                })
            {
                waiting += 1;
            }
        }
        self.migration
            .restores
            .insert((peer, migration), Gather { waiting, results });
        if waiting == 0 {
            self.migration_restored(now, peer, migration, Vec::new());
        }
    }

    /// The MSS a restored flow may use: its segments must fit one datagram with the
    /// envelope, IPv4 and TCP headers and the timestamp option.
    fn mss_clamp(&self) -> u16 {
        let room = self
            .ep
            .max_datagram_payload()
            .saturating_sub(EnvelopeRepr::HEADER_LEN + 20 + 20 + 12);
        room.clamp(536, usize::from(u16::MAX)) as u16
    }

    /// A worker's restore results.
    pub(super) fn migration_restored(
        &mut self,
        now: Instant,
        peer: PeerId,
        migration: MigrationId,
        results: Vec<(u64, Result<u64, RefuseReason>)>,
    ) {
        let key = (peer, migration);
        let Some(g) = self.migration.restores.get_mut(&key) else {
            return;
        };
        self.migration.stats.moved_in += results.iter().filter(|(_, r)| r.is_ok()).count() as u64;
        g.results.extend(results);
        g.waiting = g.waiting.saturating_sub(1);
        if g.waiting > 0 {
            return;
        }
        let Some(g) = self.migration.restores.remove(&key) else {
            return;
        };
        self.migration
            .target
            .restored(sync_now(now), peer, migration, g.results);
        self.migration_poll(now);
    }
}

fn stayed(
    id: u64,
    client: Option<SocketAddrV4>,
    freeze_ms: Option<f64>,
    reason: String,
) -> ConnOutcome {
    ConnOutcome {
        id,
        client,
        moved: false,
        remote_id: None,
        freeze_ms,
        reason: (!reason.is_empty()).then_some(reason),
    }
}

fn finish_report(
    peer: String,
    migration: Option<u64>,
    started: std::time::Instant,
    outcomes: HashMap<u64, ConnOutcome>,
    abort: Option<String>,
) -> MigrateReport {
    let mut conns: Vec<ConnOutcome> = outcomes.into_values().collect();
    conns.sort_by_key(|c| c.id);
    let moved = conns.iter().filter(|c| c.moved).count();
    MigrateReport {
        peer,
        migration,
        moved,
        stayed: conns.len() - moved,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        abort,
        conns,
    }
}
