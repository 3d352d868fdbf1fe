//! The source side: the node that flows leave.

use core::fmt;
use core::hash::Hash;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tracing::{debug, warn};

use super::{
    Abort, AbortReason, Accept, Commit, Config, ConnOffer, MAX_BATCH, MIN_MESSAGE_BYTES, Message,
    MigrationId, Offer, RefuseReason, Side, Transfer, Verdict,
};
use crate::codec;
use crate::snapshot::ConnSnapshot;
use crate::time::Instant;

/// The migration protocol, source side: offers flows to a target, has the driver capture
/// the accepted ones, transfers their snapshots and decides, per flow, moved or thawed.
///
/// `P` is the driver's handle for a peer node (the tunnel's `PeerId`).
///
/// # Driving it
/// * [`start`](Self::start) a migration; feed every [`Message`] whose
///   [`recipient`](Message::recipient) is [`Recipient::Source`](super::Recipient::Source) to
///   [`handle_message`](Self::handle_message); answer every
///   [`SourceAction::Capture`] with [`captured`](Self::captured); call
///   [`handle_timeout`](Self::handle_timeout) when the deadline of
///   [`poll_timeout`](Self::poll_timeout) passes and
///   [`peer_restarted`](Self::peer_restarted) when the tunnel reports that a peer lost its
///   state.
/// * After each of these calls, drain [`poll_transmit`](Self::poll_transmit) (send each
///   message on the peer's reliable channel) and [`poll_action`](Self::poll_action), then
///   re-arm the timer with [`poll_timeout`](Self::poll_timeout).
///
/// # Guarantees
/// Every offered flow is resolved exactly once, by exactly one of
/// [`Refused`](SourceAction::Refused) (it was never frozen),
/// [`Moved`](SourceAction::Moved) (the target reported it restored) or
/// [`Thaw`](SourceAction::Thaw) (it was frozen and stays); then the migration ends with
/// one [`Finished`](SourceAction::Finished). A flow is in at most one unfinished
/// migration.
#[derive(Debug)]
pub struct Source<P> {
    config: Config,
    next_id: u64,
    migrations: BTreeMap<MigrationId, Migration<P>>,
    out: Outputs<P>,
}

/// The queues and the busy-flow index, apart from the migrations so that both can be
/// borrowed at once.
#[derive(Debug)]
struct Outputs<P> {
    transmit: VecDeque<(P, Message)>,
    actions: VecDeque<SourceAction<P>>,
    /// Source flow → the unfinished migration it belongs to.
    busy: HashMap<u64, MigrationId>,
}

#[derive(Debug)]
struct Migration<P> {
    peer: P,
    started: Instant,
    phase: Phase,
    /// Set when the migration is given up (by us or by the peer).
    abort: Option<AbortReason>,
    /// Per source flow, in flow id order.
    flows: BTreeMap<u64, FlowState>,
    unresolved: usize,
    transfers: usize,
    transfer_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Offer sent.
    AwaitAccept { deadline: Instant },
    /// Capture requested from the driver.
    Capturing,
    /// Transfers sent.
    AwaitCommit { deadline: Instant },
    /// Every flow resolved; remembered until `forget_at` to answer late messages.
    Done { forget_at: Instant },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlowState {
    Offered,
    Capturing,
    Transferred,
    Resolved(FlowOutcome),
}

/// How one flow of a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowOutcome {
    /// The flow lives on the target now, as `target_flow`.
    Moved {
        /// The target's flow id.
        target_flow: u64,
    },
    /// Refused before anything was frozen.
    Refused(RefuseReason),
    /// Frozen, then thawed: it stays on the source.
    Thawed(RefuseReason),
}

impl fmt::Display for FlowOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowOutcome::Moved { target_flow } => write!(f, "moved (target flow {target_flow})"),
            FlowOutcome::Refused(r) => write!(f, "refused: {r}"),
            FlowOutcome::Thawed(r) => write!(f, "thawed: {r}"),
        }
    }
}

/// The outcome of a whole migration, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport<P> {
    /// The migration.
    pub migration: MigrationId,
    /// The target.
    pub peer: P,
    /// When [`Source::start`] was called.
    pub started: Instant,
    /// When the last flow was resolved.
    pub finished: Instant,
    /// Why the migration was given up, if it was.
    pub abort: Option<AbortReason>,
    /// Flows moved.
    pub moved: usize,
    /// Flows refused before anything was frozen.
    pub refused: usize,
    /// Flows frozen then thawed.
    pub thawed: usize,
    /// Transfer messages sent.
    pub transfers: usize,
    /// Encoded bytes of those Transfer messages.
    pub transfer_bytes: usize,
    /// Every offered flow's outcome, by source flow id.
    pub outcomes: Vec<(u64, FlowOutcome)>,
}

impl<P: fmt::Debug> fmt::Display for MigrationReport<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migration {} to {:?}: {} moved, {} refused, {} thawed in {} ms ({} transfers, {} bytes)",
            self.migration,
            self.peer,
            self.moved,
            self.refused,
            self.thawed,
            (self.finished - self.started).as_millis(),
            self.transfers,
            self.transfer_bytes
        )?;
        if let Some(reason) = self.abort {
            write!(f, ", aborted: {reason}")?;
        }
        Ok(())
    }
}

/// Work for the source's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAction<P> {
    /// Freeze these flows (queue their packets, stop their timers and transmissions) and
    /// capture their snapshots, then call [`Source::captured`] with the results. Every
    /// flow listed here later gets exactly one `Moved` or `Thaw`.
    Capture {
        /// The migration.
        migration: MigrationId,
        /// The target.
        peer: P,
        /// Source flow ids.
        flows: Vec<u64>,
    },
    /// Every flow of the migration is resolved; answer the operator with the report.
    Finished {
        /// The migration.
        migration: MigrationId,
        /// Counts and per-flow outcomes.
        report: MigrationReport<P>,
    },
    /// The flow lives on `peer` now: forward its queued and future client packets there
    /// (in `ToOwner` envelopes with `target_flow`), relay the target's `ToIngress` packets
    /// to the client, and drop the local socket without RST.
    Moved {
        /// The migration.
        migration: MigrationId,
        /// Source flow id.
        flow: u64,
        /// The target.
        peer: P,
        /// The flow's id on the target.
        target_flow: u64,
    },
    /// The flow was refused before anything was frozen; nothing to undo.
    Refused {
        /// The migration.
        migration: MigrationId,
        /// Source flow id.
        flow: u64,
        /// Why.
        reason: RefuseReason,
    },
    /// The flow stays here: thaw it and deliver the packets queued while it was frozen.
    Thaw {
        /// The migration.
        migration: MigrationId,
        /// Source flow id.
        flow: u64,
        /// Why it did not move.
        reason: RefuseReason,
    },
}

impl<P: fmt::Debug> fmt::Display for SourceAction<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceAction::Capture {
                migration,
                peer,
                flows,
            } => write!(
                f,
                "migration {migration}: capture {} flows for {peer:?}",
                flows.len()
            ),
            SourceAction::Finished { report, .. } => write!(f, "{report}"),
            SourceAction::Moved {
                migration,
                flow,
                peer,
                target_flow,
            } => write!(
                f,
                "migration {migration}: flow {flow} moved to {peer:?} as flow {target_flow}"
            ),
            SourceAction::Refused {
                migration,
                flow,
                reason,
            } => write!(f, "migration {migration}: flow {flow} refused: {reason}"),
            SourceAction::Thaw {
                migration,
                flow,
                reason,
            } => write!(f, "migration {migration}: flow {flow} thawed: {reason}"),
        }
    }
}

/// Why [`Source::start`] refused to start a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The same flow id is offered twice.
    #[error("flow {0} offered twice")]
    DuplicateFlow(u64),
    /// No flows.
    #[error("no flows to migrate")]
    Empty,
    /// The flow is already part of an unfinished migration.
    #[error("flow {flow} is already in migration {migration}")]
    FlowBusy {
        /// The flow.
        flow: u64,
        /// Its migration.
        migration: MigrationId,
    },
    /// An offer's capacities or window scale are out of range.
    #[error("offer for flow {0} is out of range")]
    InvalidOffer(u64),
    /// More than [`MAX_BATCH`] flows.
    #[error("{0} flows exceed the {MAX_BATCH} of one migration")]
    TooMany(usize),
}

impl<P: Copy + Eq + Hash + fmt::Debug> Source<P> {
    /// A source with no migrations, whose first migration gets id `first_id` (ids then
    /// count up). A restarted node SHOULD pick `first_id` so that it does not reuse ids of
    /// its previous life that targets may remember, e.g. microseconds since the UNIX epoch.
    pub fn new(config: Config, first_id: u64) -> Source<P> {
        Source {
            config,
            next_id: first_id,
            migrations: BTreeMap::new(),
            out: Outputs {
                transmit: VecDeque::new(),
                actions: VecDeque::new(),
                busy: HashMap::new(),
            },
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Migrations not yet finished.
    pub fn active_migrations(&self) -> usize {
        self.migrations
            .values()
            .filter(|m| !matches!(m.phase, Phase::Done { .. }))
            .count()
    }

    /// Migrations remembered, finished ones included.
    pub fn remembered_migrations(&self) -> usize {
        self.migrations.len()
    }

    /// The unfinished migration `flow` belongs to, if any.
    pub fn migration_of(&self, flow: u64) -> Option<MigrationId> {
        self.out.busy.get(&flow).copied()
    }

    /// Offers `offers` to `peer` (queues an Offer). The flows keep running until the
    /// target accepts them and [`SourceAction::Capture`] asks the driver to freeze them.
    pub fn start(
        &mut self,
        now: Instant,
        peer: P,
        offers: Vec<ConnOffer>,
    ) -> Result<MigrationId, StartError> {
        if offers.is_empty() {
            return Err(StartError::Empty);
        }
        if offers.len() > MAX_BATCH {
            return Err(StartError::TooMany(offers.len()));
        }
        let mut flows = BTreeMap::new();
        for o in &offers {
            if !o.is_valid() {
                return Err(StartError::InvalidOffer(o.flow));
            }
            if let Some(&migration) = self.out.busy.get(&o.flow) {
                return Err(StartError::FlowBusy {
                    flow: o.flow,
                    migration,
                });
            }
            if flows.insert(o.flow, FlowState::Offered).is_some() {
                return Err(StartError::DuplicateFlow(o.flow));
            }
        }
        let id = self.allocate_id();
        for &flow in flows.keys() {
            self.out.busy.insert(flow, id);
        }
        debug!(migration = %id, ?peer, flows = flows.len(), "migration started: offer sent");
        self.migrations.insert(
            id,
            Migration {
                peer,
                started: now,
                phase: Phase::AwaitAccept {
                    deadline: now + self.config.accept_timeout,
                },
                abort: None,
                unresolved: flows.len(),
                flows,
                transfers: 0,
                transfer_bytes: 0,
            },
        );
        self.out.transmit.push_back((
            peer,
            Message::Offer(Offer {
                migration: id,
                conns: offers,
            }),
        ));
        Ok(id)
    }

    fn allocate_id(&mut self) -> MigrationId {
        loop {
            let id = MigrationId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1);
            if !self.migrations.contains_key(&id) {
                return id;
            }
        }
    }

    /// Gives up on `migration`: flows not yet moved are refused or thawed, and the target
    /// is told ([`AbortReason::Cancelled`]). Returns false if the migration is unknown or
    /// already finished. Flows the driver is capturing are thawed when it calls
    /// [`captured`](Self::captured).
    pub fn cancel(&mut self, now: Instant, migration: MigrationId) -> bool {
        match self.migrations.get(&migration) {
            Some(m) if !matches!(m.phase, Phase::Done { .. }) && m.abort.is_none() => {
                self.abort(now, migration, AbortReason::Cancelled, true);
                true
            }
            _ => false,
        }
    }

    /// Handles a message from `peer` whose [`recipient`](Message::recipient) is the source;
    /// others are ignored.
    pub fn handle_message(&mut self, now: Instant, peer: P, msg: Message) {
        match msg {
            Message::Accept(a) => self.on_accept(now, peer, a),
            Message::Commit(c) => self.on_commit(now, peer, c),
            Message::Abort(a) if a.from == Side::Target => self.on_abort(now, peer, a),
            other => debug!(?peer, msg = %other, "not a message for the source: ignored"),
        }
    }

    /// The driver's answer to [`SourceAction::Capture`]: the snapshots it captured and the
    /// flows it could not capture (both frozen until resolved). Flows of the Capture that
    /// appear in neither list count as failed ([`RefuseReason::CaptureFailed`]). Queues the
    /// Transfer message(s); a flow whose snapshot is invalid or does not fit in one message
    /// thaws at once.
    pub fn captured(
        &mut self,
        now: Instant,
        migration: MigrationId,
        snapshots: Vec<(u64, ConnSnapshot)>,
        failed: Vec<(u64, RefuseReason)>,
    ) {
        let Some(m) = self.migrations.get_mut(&migration) else {
            warn!(%migration, "captured() for an unknown migration: ignored");
            return;
        };
        if m.phase != Phase::Capturing {
            warn!(%migration, phase = ?m.phase, "captured() outside the capture phase: ignored");
            return;
        }
        let mut given: HashMap<u64, Result<ConnSnapshot, RefuseReason>> = HashMap::new();
        for (flow, reason) in failed {
            given.entry(flow).or_insert(Err(reason));
        }
        for (flow, snap) in snapshots {
            given.entry(flow).or_insert(Ok(snap));
        }
        let max_bytes = self.config.max_message_bytes.max(MIN_MESSAGE_BYTES);
        let base = transfer_base_len(migration);
        let mut items: Vec<(Item, usize)> = Vec::new();
        let capturing: Vec<u64> = m
            .flows
            .iter()
            .filter(|(_, s)| **s == FlowState::Capturing)
            .map(|(f, _)| *f)
            .collect();
        for flow in capturing {
            if m.abort.is_some() {
                resolve(
                    &mut self.out,
                    migration,
                    m,
                    flow,
                    FlowOutcome::Thawed(RefuseReason::Aborted),
                );
                continue;
            }
            let withdraw = match given.remove(&flow) {
                Some(Ok(snap)) => match snap.validate() {
                    Err(e) => {
                        warn!(%migration, flow, error = %e, "captured an invalid snapshot");
                        Some(RefuseReason::CaptureFailed)
                    }
                    Ok(()) => {
                        let len = codec::encoded_size(&(flow, &snap));
                        if base + len > max_bytes {
                            Some(RefuseReason::TooLarge)
                        } else {
                            m.flows.insert(flow, FlowState::Transferred);
                            items.push((Item::Snapshot(flow, snap), len));
                            None
                        }
                    }
                },
                Some(Err(reason)) => Some(reason),
                None => Some(RefuseReason::CaptureFailed),
            };
            if let Some(reason) = withdraw {
                resolve(
                    &mut self.out,
                    migration,
                    m,
                    flow,
                    FlowOutcome::Thawed(reason),
                );
                let len = codec::encoded_size(&(flow, reason));
                items.push((Item::Withdrawn(flow, reason), len));
            }
        }
        if !given.is_empty() {
            warn!(%migration, flows = given.len(), "captured() named flows not being captured: ignored");
        }
        if m.abort.is_some() {
            finish(&mut self.out, &self.config, now, migration, m);
            return;
        }
        // Greedy packing in flow order: each message holds what fits in `max_bytes`.
        let peer = m.peer;
        let mut current = empty_transfer(migration);
        let mut current_len = base;
        for (item, len) in items {
            if current_len + len > max_bytes && current_len > base {
                let full = core::mem::replace(&mut current, empty_transfer(migration));
                queue_transfer(&mut self.out, m, peer, full);
                current_len = base;
            }
            match item {
                Item::Snapshot(flow, snap) => current.snapshots.push((flow, snap)),
                Item::Withdrawn(flow, reason) => current.withdrawn.push((flow, reason)),
            }
            current_len += len;
        }
        if current_len > base {
            queue_transfer(&mut self.out, m, peer, current);
        }
        if m.unresolved == 0 {
            finish(&mut self.out, &self.config, now, migration, m);
        } else {
            debug!(%migration, transfers = m.transfers, bytes = m.transfer_bytes, "snapshots sent: awaiting commit");
            // Large transfers take longer to cross a lossy tunnel: the deadline grows with
            // the bytes sent.
            let per_mib = self.config.commit_timeout_per_mib.as_secs_f64();
            let extra =
                Duration::from_secs_f64(per_mib * m.transfer_bytes as f64 / (1 << 20) as f64);
            m.phase = Phase::AwaitCommit {
                deadline: now + self.config.commit_timeout + extra,
            };
        }
    }

    /// Runs the timers: missing Accepts and Commits abort their migrations; finished
    /// migrations past their linger time are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<(MigrationId, Phase)> = self
            .migrations
            .iter()
            .filter(|(_, m)| deadline(m.phase).is_some_and(|d| d <= now))
            .map(|(id, m)| (*id, m.phase))
            .collect();
        for (id, phase) in due {
            match phase {
                Phase::AwaitAccept { .. } => {
                    debug!(migration = %id, "no accept in time");
                    self.abort(now, id, AbortReason::Timeout, true);
                }
                Phase::AwaitCommit { .. } => {
                    debug!(migration = %id, "no commit in time");
                    self.abort(now, id, AbortReason::Timeout, true);
                }
                Phase::Done { .. } => {
                    self.migrations.remove(&id);
                }
                Phase::Capturing => {}
            }
        }
    }

    /// `peer` lost its state (the tunnel saw it restart): its unfinished migrations end at
    /// once, their flows refused or thawed ([`AbortReason::PeerRestarted`]). Nothing is sent:
    /// the restarted peer knows nothing of them.
    pub fn peer_restarted(&mut self, now: Instant, peer: P) {
        let ids: Vec<MigrationId> = self
            .migrations
            .iter()
            .filter(|(_, m)| {
                m.peer == peer && !matches!(m.phase, Phase::Done { .. }) && m.abort.is_none()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.abort(now, id, AbortReason::PeerRestarted, false);
        }
    }

    /// The next message to send on `P`'s reliable channel.
    pub fn poll_transmit(&mut self) -> Option<(P, Message)> {
        self.out.transmit.pop_front()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<SourceAction<P>> {
        self.out.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.migrations
            .values()
            .filter_map(|m| deadline(m.phase))
            .min()
    }

    fn on_accept(&mut self, now: Instant, peer: P, a: Accept) {
        let Some(m) = self
            .migrations
            .get_mut(&a.migration)
            .filter(|m| m.peer == peer)
        else {
            let flows: Vec<u64> = a
                .verdicts
                .iter()
                .filter(|(_, v)| *v == Verdict::Accepted)
                .map(|(f, _)| *f)
                .collect();
            debug!(migration = %a.migration, ?peer, "accept for an unknown migration");
            if !flows.is_empty() {
                self.out.transmit.push_back((
                    peer,
                    abort_msg(a.migration, AbortReason::UnknownMigration, flows),
                ));
            }
            return;
        };
        match m.phase {
            Phase::AwaitAccept { .. } => {}
            Phase::Done { .. } => {
                let claims_unmoved = a.verdicts.iter().any(|(f, v)| {
                    *v == Verdict::Accepted && !matches!(m.flows.get(f), Some(s) if is_moved(s))
                });
                if claims_unmoved {
                    repeat_abort(&mut self.out, a.migration, m);
                }
                return;
            }
            Phase::Capturing | Phase::AwaitCommit { .. } => {
                debug!(migration = %a.migration, "duplicate accept: ignored");
                return;
            }
        }
        let mut verdicts: HashMap<u64, Verdict> = HashMap::new();
        for (flow, v) in a.verdicts {
            verdicts.entry(flow).or_insert(v);
        }
        let offered: Vec<u64> = m.flows.keys().copied().collect();
        let mut capture = Vec::new();
        for flow in offered {
            match verdicts.get(&flow) {
                Some(Verdict::Accepted) => {
                    m.flows.insert(flow, FlowState::Capturing);
                    capture.push(flow);
                }
                Some(Verdict::Refused(r)) => {
                    resolve(
                        &mut self.out,
                        a.migration,
                        m,
                        flow,
                        FlowOutcome::Refused(*r),
                    );
                }
                None => resolve(
                    &mut self.out,
                    a.migration,
                    m,
                    flow,
                    FlowOutcome::Refused(RefuseReason::NotAccepted),
                ),
            }
        }
        if capture.is_empty() {
            finish(&mut self.out, &self.config, now, a.migration, m);
            return;
        }
        debug!(migration = %a.migration, accepted = capture.len(), "accepted: capture requested");
        m.phase = Phase::Capturing;
        self.out.actions.push_back(SourceAction::Capture {
            migration: a.migration,
            peer,
            flows: capture,
        });
    }

    fn on_commit(&mut self, now: Instant, peer: P, c: Commit) {
        let Some(m) = self
            .migrations
            .get_mut(&c.migration)
            .filter(|m| m.peer == peer)
        else {
            let flows: Vec<u64> = c
                .results
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(f, _)| *f)
                .collect();
            debug!(migration = %c.migration, ?peer, "commit for an unknown migration");
            if !flows.is_empty() {
                self.out.transmit.push_back((
                    peer,
                    abort_msg(c.migration, AbortReason::UnknownMigration, flows),
                ));
            }
            return;
        };
        match m.phase {
            Phase::AwaitCommit { .. } => {}
            Phase::Done { .. } => {
                let claims_unmoved = c.results.iter().any(|(f, r)| match r {
                    Ok(tf) => {
                        m.flows.get(f)
                            != Some(&FlowState::Resolved(FlowOutcome::Moved {
                                target_flow: *tf,
                            }))
                    }
                    Err(_) => false,
                });
                if claims_unmoved {
                    repeat_abort(&mut self.out, c.migration, m);
                }
                return;
            }
            Phase::AwaitAccept { .. } | Phase::Capturing => {
                debug!(migration = %c.migration, "commit before transfer: ignored");
                return;
            }
        }
        for (flow, result) in c.results {
            if m.flows.get(&flow) != Some(&FlowState::Transferred) {
                continue; // a duplicate, or a flow that was never sent
            }
            let outcome = match result {
                Ok(target_flow) => FlowOutcome::Moved { target_flow },
                Err(reason) => FlowOutcome::Thawed(reason),
            };
            resolve(&mut self.out, c.migration, m, flow, outcome);
        }
        if m.unresolved == 0 {
            finish(&mut self.out, &self.config, now, c.migration, m);
        }
    }

    fn on_abort(&mut self, now: Instant, peer: P, a: Abort) {
        let known = self
            .migrations
            .get(&a.migration)
            .is_some_and(|m| m.peer == peer && !matches!(m.phase, Phase::Done { .. }));
        if !known {
            debug!(migration = %a.migration, ?peer, "abort for an unknown or finished migration: ignored");
            return;
        }
        debug!(migration = %a.migration, reason = %a.reason, "target aborted");
        self.abort(now, a.migration, a.reason, false);
    }

    /// Gives up on a migration: offered flows are refused, transferred ones thawed (flows
    /// being captured thaw in `captured`); with `notify`, the target gets an Abort listing
    /// every flow that has not moved.
    fn abort(&mut self, now: Instant, id: MigrationId, reason: AbortReason, notify: bool) {
        let Some(m) = self.migrations.get_mut(&id) else {
            return;
        };
        if matches!(m.phase, Phase::Done { .. }) {
            return;
        }
        m.abort.get_or_insert(reason);
        let why = match reason {
            AbortReason::Timeout => RefuseReason::Timeout,
            _ => RefuseReason::Aborted,
        };
        let flows: Vec<(u64, FlowState)> = m.flows.iter().map(|(f, s)| (*f, *s)).collect();
        for (flow, state) in flows {
            match state {
                FlowState::Offered => {
                    resolve(&mut self.out, id, m, flow, FlowOutcome::Refused(why));
                }
                FlowState::Transferred => {
                    resolve(&mut self.out, id, m, flow, FlowOutcome::Thawed(why));
                }
                FlowState::Capturing | FlowState::Resolved(_) => {}
            }
        }
        debug!(migration = %id, %reason, notify, "migration aborted");
        if notify {
            self.out
                .transmit
                .push_back((m.peer, abort_msg(id, reason, unmoved(m))));
        }
        if m.unresolved == 0 {
            finish(&mut self.out, &self.config, now, id, m);
        }
    }
}

enum Item {
    Snapshot(u64, ConnSnapshot),
    Withdrawn(u64, RefuseReason),
}

fn empty_transfer(migration: MigrationId) -> Transfer {
    Transfer {
        migration,
        snapshots: Vec::new(),
        withdrawn: Vec::new(),
    }
}

/// Encoded length of a Transfer with no entries, plus room for both list lengths to
/// grow to [`MAX_BATCH`] (two varint bytes each instead of one).
fn transfer_base_len(migration: MigrationId) -> usize {
    Message::Transfer(empty_transfer(migration)).encoded_len() + 2
}

fn queue_transfer<P: Copy>(out: &mut Outputs<P>, m: &mut Migration<P>, peer: P, t: Transfer) {
    let msg = Message::Transfer(t);
    m.transfers += 1;
    m.transfer_bytes += msg.encoded_len();
    out.transmit.push_back((peer, msg));
}

fn deadline(phase: Phase) -> Option<Instant> {
    match phase {
        Phase::AwaitAccept { deadline } | Phase::AwaitCommit { deadline } => Some(deadline),
        Phase::Done { forget_at } => Some(forget_at),
        Phase::Capturing => None,
    }
}

fn is_moved(s: &FlowState) -> bool {
    matches!(s, FlowState::Resolved(FlowOutcome::Moved { .. }))
}

/// Every flow of `m` that has not moved (what an Abort from the source lists).
fn unmoved<P>(m: &Migration<P>) -> Vec<u64> {
    m.flows
        .iter()
        .filter(|(_, s)| !is_moved(s))
        .map(|(f, _)| *f)
        .collect()
}

fn abort_msg(migration: MigrationId, reason: AbortReason, flows: Vec<u64>) -> Message {
    Message::Abort(Abort {
        migration,
        from: Side::Source,
        reason,
        flows,
    })
}

/// Answers a late message that claims a flow the source did not move: the same Abort
/// again (or [`AbortReason::Stale`] for a migration that ended without one).
fn repeat_abort<P: Copy + fmt::Debug>(out: &mut Outputs<P>, id: MigrationId, m: &Migration<P>) {
    let reason = m.abort.unwrap_or(AbortReason::Stale);
    debug!(migration = %id, %reason, "late message for a finished migration: abort repeated");
    out.transmit
        .push_back((m.peer, abort_msg(id, reason, unmoved(m))));
}

/// Records `outcome` for `flow` and tells the driver.
fn resolve<P: Copy + fmt::Debug>(
    out: &mut Outputs<P>,
    id: MigrationId,
    m: &mut Migration<P>,
    flow: u64,
    outcome: FlowOutcome,
) {
    let Some(state) = m.flows.get_mut(&flow) else {
        return;
    };
    if matches!(state, FlowState::Resolved(_)) {
        return;
    }
    *state = FlowState::Resolved(outcome);
    m.unresolved -= 1;
    out.busy.remove(&flow);
    debug!(migration = %id, flow, %outcome, "flow resolved");
    out.actions.push_back(match outcome {
        FlowOutcome::Moved { target_flow } => SourceAction::Moved {
            migration: id,
            flow,
            peer: m.peer,
            target_flow,
        },
        FlowOutcome::Refused(reason) => SourceAction::Refused {
            migration: id,
            flow,
            reason,
        },
        FlowOutcome::Thawed(reason) => SourceAction::Thaw {
            migration: id,
            flow,
            reason,
        },
    });
}

/// Ends a migration whose flows are all resolved.
fn finish<P: Copy + fmt::Debug>(
    out: &mut Outputs<P>,
    config: &Config,
    now: Instant,
    id: MigrationId,
    m: &mut Migration<P>,
) {
    debug_assert_eq!(m.unresolved, 0);
    m.phase = Phase::Done {
        forget_at: now + config.linger,
    };
    let mut report = MigrationReport {
        migration: id,
        peer: m.peer,
        started: m.started,
        finished: now,
        abort: m.abort,
        moved: 0,
        refused: 0,
        thawed: 0,
        transfers: m.transfers,
        transfer_bytes: m.transfer_bytes,
        outcomes: Vec::with_capacity(m.flows.len()),
    };
    for (&flow, state) in &m.flows {
        let FlowState::Resolved(outcome) = *state else {
            continue;
        };
        match outcome {
            FlowOutcome::Moved { .. } => report.moved += 1,
            FlowOutcome::Refused(_) => report.refused += 1,
            FlowOutcome::Thawed(_) => report.thawed += 1,
        }
        report.outcomes.push((flow, outcome));
    }
    debug!(report = %report, "migration finished");
    out.actions.push_back(SourceAction::Finished {
        migration: id,
        report,
    });
}
