//! The target side: the node that flows move to.

use core::fmt;
use core::hash::Hash;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tracing::{debug, warn};

use super::{
    Abort, AbortReason, Accept, Commit, Config, ConnOffer, Message, MigrationId, Offer,
    RefuseReason, Side, Transfer, Verdict,
};
use crate::snapshot::ConnSnapshot;
use crate::time::Instant;

/// The migration protocol, target side: has the driver admit offered flows, restore the
/// snapshots that arrive, and clean up what the source gives up.
///
/// `P` is the driver's handle for a peer node (the tunnel's `PeerId`). A migration is
/// named by its source peer and [`MigrationId`].
///
/// # Driving it
/// * Feed every [`Message`] whose [`recipient`](Message::recipient) is [`Recipient::Target`](super::Recipient::Target) to
///   [`handle_message`](Self::handle_message); answer every [`TargetAction::Admit`] with
///   [`admitted`](Self::admitted) and every [`TargetAction::Restore`] with
///   [`restored`](Self::restored) (possibly in several calls, each flow once); call
///   [`handle_timeout`](Self::handle_timeout) when the deadline of
///   [`poll_timeout`](Self::poll_timeout) passes and
///   [`peer_restarted`](Self::peer_restarted) when the tunnel reports that a peer lost its
///   state.
/// * After each of these calls, drain [`poll_transmit`](Self::poll_transmit) and
///   [`poll_action`](Self::poll_action), then re-arm the timer.
///
/// # Guarantees
/// * Every flow the driver accepted is, exactly once, either released
///   ([`Release`](TargetAction::Release)) or handed to the driver to restore
///   ([`Restore`](TargetAction::Restore)); a snapshot for a flow not accepted, or not
///   matching its offer, is refused in the Commit without bothering the driver.
/// * Every flow the driver restored either stays (its Commit said `Ok` and the source did
///   not list it in an Abort) or is discarded exactly once
///   ([`Discard`](TargetAction::Discard)): when the source's Abort lists it, or when it was
///   restored after the source gave up.
/// * Per source peer, at most `max_migrations_per_peer` unfinished and
///   `max_finished_per_peer` finished migrations are kept.
#[derive(Debug)]
pub struct Target<P> {
    config: Config,
    seq: u64,
    migrations: HashMap<(P, MigrationId), Migration>,
    transmit: VecDeque<(P, Message)>,
    actions: VecDeque<TargetAction<P>>,
}

#[derive(Debug)]
struct Migration {
    /// Creation order, for deterministic iteration and eviction.
    seq: u64,
    /// The Offer as received (a duplicate must match it).
    offers: Vec<ConnOffer>,
    /// Source flow → index in `offers`.
    index: HashMap<u64, usize>,
    /// Flows refused before the driver saw the offer.
    prefiltered: HashMap<u64, RefuseReason>,
    phase: Phase,
    /// The verdicts sent in the Accept (re-sent for duplicate Offers).
    verdicts: Option<Vec<(u64, Verdict)>>,
    /// Set when the source gave up, with its reason.
    aborted: Option<AbortReason>,
    /// Accepted flows, by source flow id.
    flows: BTreeMap<u64, Flow>,
    /// While flows are reserved: when they expire (`transfer_timeout` after the Accept or the
    /// latest Transfer).
    transfer_deadline: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Admit requested from the driver.
    Admitting,
    /// Accept sent; flows reserved or being restored.
    Active,
    /// Nothing reserved or restoring; remembered until `forget_at`.
    Done { forget_at: Instant },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// Accepted, waiting for the snapshot.
    Reserved,
    /// Snapshot handed to the driver.
    Restoring,
    /// Restored as `target_flow`, Commit `Ok` sent.
    Restored { target_flow: u64 },
    /// Restore or snapshot check failed; Commit `Err` sent.
    Failed(RefuseReason),
    /// Reservation released.
    Released(RefuseReason),
    /// Restored, then discarded because the source gave up.
    Discarded { target_flow: u64 },
}

/// Work for the target's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetAction<P> {
    /// Decide on these offered flows (capacity, app, buffers, window scale), reserve room
    /// for the accepted ones, and call [`Target::admitted`]. Offers already refused by the
    /// state machine (out of range, duplicates) are not included.
    Admit {
        /// The source.
        peer: P,
        /// The migration.
        migration: MigrationId,
        /// The flows to decide on.
        offers: Vec<ConnOffer>,
    },
    /// Drop these restored flows silently (no RST): the source kept them.
    Discard {
        /// The source.
        peer: P,
        /// The migration.
        migration: MigrationId,
        /// Target flow ids (as given to [`Target::restored`]).
        flows: Vec<u64>,
        /// Why the source gave up.
        reason: AbortReason,
    },
    /// Free the room reserved for these accepted flows: their snapshots will not come.
    Release {
        /// The source.
        peer: P,
        /// The migration.
        migration: MigrationId,
        /// Source flow ids.
        flows: Vec<u64>,
        /// Why.
        reason: RefuseReason,
    },
    /// Rebuild these connections, then call [`Target::restored`] with each flow's result.
    /// A restored flow SHOULD only reach its client through the ingress node until the
    /// first client packet arrives forwarded (which proves the source moved it).
    Restore {
        /// The source.
        peer: P,
        /// The migration.
        migration: MigrationId,
        /// `(source flow, snapshot)`, each checked against its offer.
        snapshots: Vec<(u64, ConnSnapshot)>,
    },
}

impl<P: fmt::Debug> fmt::Display for TargetAction<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAction::Admit {
                peer,
                migration,
                offers,
            } => write!(
                f,
                "migration {migration} from {peer:?}: admit {} flows?",
                offers.len()
            ),
            TargetAction::Discard {
                peer,
                migration,
                flows,
                reason,
            } => write!(
                f,
                "migration {migration} from {peer:?}: discard {} restored flows ({reason})",
                flows.len()
            ),
            TargetAction::Release {
                peer,
                migration,
                flows,
                reason,
            } => write!(
                f,
                "migration {migration} from {peer:?}: release {} reservations ({reason})",
                flows.len()
            ),
            TargetAction::Restore {
                peer,
                migration,
                snapshots,
            } => write!(
                f,
                "migration {migration} from {peer:?}: restore {} flows",
                snapshots.len()
            ),
        }
    }
}

impl<P: Copy + Eq + Hash + fmt::Debug> Target<P> {
    /// A target with no migrations.
    pub fn new(config: Config) -> Target<P> {
        Target {
            config,
            seq: 0,
            migrations: HashMap::new(),
            transmit: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Migrations not yet finished (admitting, reserved or restoring flows).
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

    /// Handles a message from `peer` whose [`recipient`](Message::recipient) is the
    /// target; others are ignored.
    pub fn handle_message(&mut self, now: Instant, peer: P, msg: Message) {
        match msg {
            Message::Offer(o) => self.on_offer(now, peer, o),
            Message::Transfer(t) => self.on_transfer(now, peer, t),
            Message::Abort(a) if a.from == Side::Source => self.on_abort(now, peer, a),
            other => debug!(?peer, msg = %other, "not a message for the target: ignored"),
        }
    }

    /// The driver's answer to [`TargetAction::Admit`]: a verdict per offered flow (flows
    /// without one are refused, [`RefuseReason::NotAccepted`]). Queues the Accept. If the
    /// source gave up meanwhile, the accepted flows are released at once.
    pub fn admitted(
        &mut self,
        now: Instant,
        peer: P,
        migration: MigrationId,
        verdicts: Vec<(u64, Verdict)>,
    ) {
        let Some(m) = self.migrations.get_mut(&(peer, migration)) else {
            warn!(%migration, ?peer, "admitted() for an unknown migration: accepted flows released");
            let flows = accepted(&verdicts);
            if !flows.is_empty() {
                self.actions.push_back(TargetAction::Release {
                    peer,
                    migration,
                    flows,
                    reason: RefuseReason::Aborted,
                });
            }
            return;
        };
        if m.phase != Phase::Admitting {
            warn!(%migration, ?peer, "admitted() twice: ignored");
            return;
        }
        let mut given: HashMap<u64, Verdict> = HashMap::new();
        let mut stray = Vec::new();
        for (flow, v) in verdicts {
            let admitted = m.index.contains_key(&flow) && !m.prefiltered.contains_key(&flow);
            if !admitted {
                if v == Verdict::Accepted {
                    stray.push(flow);
                }
            } else {
                given.entry(flow).or_insert(v); // the first verdict wins
            }
        }
        if !stray.is_empty() {
            warn!(%migration, ?peer, flows = stray.len(), "verdicts for flows not offered: released");
            self.actions.push_back(TargetAction::Release {
                peer,
                migration,
                flows: stray,
                reason: RefuseReason::NotAccepted,
            });
        }
        let mut out = Vec::with_capacity(m.offers.len());
        for o in &m.offers {
            let v = match m.prefiltered.get(&o.flow) {
                Some(r) => Verdict::Refused(*r),
                None => given
                    .get(&o.flow)
                    .copied()
                    .unwrap_or(Verdict::Refused(RefuseReason::NotAccepted)),
            };
            if v == Verdict::Accepted && !m.flows.contains_key(&o.flow) {
                m.flows.insert(o.flow, Flow::Reserved);
            }
            out.push((o.flow, v));
        }
        if let Some(reason) = m.aborted {
            let flows: Vec<u64> = m.flows.keys().copied().collect();
            for f in m.flows.values_mut() {
                *f = Flow::Released(RefuseReason::Aborted);
            }
            debug!(%migration, ?peer, %reason, "admitted after the source gave up: released");
            if !flows.is_empty() {
                self.actions.push_back(TargetAction::Release {
                    peer,
                    migration,
                    flows,
                    reason: RefuseReason::Aborted,
                });
            }
            m.phase = Phase::Active;
            check_done(&self.config, now, m);
            return;
        }
        debug!(%migration, ?peer, accepted = m.flows.len(), offered = m.offers.len(), "accept sent");
        m.phase = Phase::Active;
        m.transfer_deadline = reservation_deadline(&self.config, now, m);
        m.verdicts = Some(out.clone());
        self.transmit.push_back((
            peer,
            Message::Accept(Accept {
                migration,
                verdicts: out,
            }),
        ));
        check_done(&self.config, now, m);
    }

    /// The driver's answer to [`TargetAction::Restore`]: per source flow, the restored
    /// flow's id on this node, or why it could not be restored. Queues a Commit; a flow
    /// restored after the source gave up is discarded at once.
    pub fn restored(
        &mut self,
        now: Instant,
        peer: P,
        migration: MigrationId,
        results: Vec<(u64, Result<u64, RefuseReason>)>,
    ) {
        let Some(m) = self.migrations.get_mut(&(peer, migration)) else {
            let flows: Vec<u64> = results.iter().filter_map(|(_, r)| r.ok()).collect();
            debug!(%migration, ?peer, "restored() for a forgotten migration: discarded");
            if !flows.is_empty() {
                self.actions.push_back(TargetAction::Discard {
                    peer,
                    migration,
                    flows,
                    reason: AbortReason::PeerRestarted,
                });
            }
            return;
        };
        let mut commit = Vec::new();
        let mut discard = Vec::new();
        for (flow, result) in results {
            if m.flows.get(&flow) != Some(&Flow::Restoring) {
                warn!(%migration, flow, "restored() for a flow not being restored");
                if let Ok(target_flow) = result {
                    discard.push(target_flow);
                }
                continue;
            }
            match (result, m.aborted) {
                (Ok(target_flow), Some(_)) => {
                    m.flows.insert(flow, Flow::Discarded { target_flow });
                    discard.push(target_flow);
                }
                (Ok(target_flow), None) => {
                    m.flows.insert(flow, Flow::Restored { target_flow });
                    commit.push((flow, Ok(target_flow)));
                }
                (Err(reason), _) => {
                    m.flows.insert(flow, Flow::Failed(reason));
                    commit.push((flow, Err(reason)));
                }
            }
        }
        if !discard.is_empty() {
            self.actions.push_back(TargetAction::Discard {
                peer,
                migration,
                flows: discard,
                reason: m.aborted.unwrap_or(AbortReason::Protocol),
            });
        }
        if !commit.is_empty() && m.aborted.is_none() {
            debug!(%migration, ?peer, results = commit.len(), "commit sent");
            self.transmit.push_back((
                peer,
                Message::Commit(Commit {
                    migration,
                    results: commit,
                }),
            ));
        }
        check_done(&self.config, now, m);
    }

    /// Runs the timers: reservations without snapshots expire; finished migrations past
    /// their linger time are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due: Vec<(u64, (P, MigrationId))> = self
            .migrations
            .iter()
            .filter(|(_, m)| deadline(m).is_some_and(|d| d <= now))
            .map(|(k, m)| (m.seq, *k))
            .collect();
        due.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, key) in due {
            let Some(m) = self.migrations.get_mut(&key) else {
                continue;
            };
            if let Phase::Done { forget_at } = m.phase {
                if forget_at <= now {
                    self.migrations.remove(&key);
                }
                continue;
            }
            if m.transfer_deadline.is_some_and(|d| d <= now) {
                let flows = release_reserved(m, RefuseReason::Expired);
                debug!(migration = %key.1, peer = ?key.0, flows = flows.len(), "reservations expired");
                if !flows.is_empty() {
                    self.actions.push_back(TargetAction::Release {
                        peer: key.0,
                        migration: key.1,
                        flows,
                        reason: RefuseReason::Expired,
                    });
                }
                check_done(&self.config, now, m);
            }
        }
    }

    /// `peer` lost its state (the tunnel saw it restart): its migrations end at once.
    /// Reservations are released; flows being restored are discarded when the driver
    /// reports them. Flows already restored and committed stay: whether the source moved
    /// them is unknown, and the driver's flow table owns them now.
    pub fn peer_restarted(&mut self, _now: Instant, peer: P) {
        let mut keys: Vec<(u64, (P, MigrationId))> = self
            .migrations
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|(k, m)| (m.seq, *k))
            .collect();
        keys.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, key) in keys {
            let Some(mut m) = self.migrations.remove(&key) else {
                continue;
            };
            let flows = release_reserved(&mut m, RefuseReason::Aborted);
            debug!(migration = %key.1, ?peer, released = flows.len(), "source restarted: migration dropped");
            if !flows.is_empty() {
                self.actions.push_back(TargetAction::Release {
                    peer,
                    migration: key.1,
                    flows,
                    reason: RefuseReason::Aborted,
                });
            }
        }
    }

    /// The next message to send on `P`'s reliable channel.
    pub fn poll_transmit(&mut self) -> Option<(P, Message)> {
        self.transmit.pop_front()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<TargetAction<P>> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.migrations.values().filter_map(deadline).min()
    }

    fn on_offer(&mut self, now: Instant, peer: P, o: Offer) {
        let key = (peer, o.migration);
        if let Some(m) = self.migrations.get(&key) {
            if m.offers != o.conns {
                debug!(migration = %o.migration, ?peer, "a different offer under a known id: aborted");
                self.transmit
                    .push_back((peer, target_abort(o.migration, AbortReason::Protocol)));
            } else if let (Some(v), None) = (&m.verdicts, m.aborted) {
                debug!(migration = %o.migration, ?peer, "duplicate offer: accept repeated");
                self.transmit.push_back((
                    peer,
                    Message::Accept(Accept {
                        migration: o.migration,
                        verdicts: v.clone(),
                    }),
                ));
            }
            return;
        }
        let active = self
            .migrations
            .iter()
            .filter(|((p, _), m)| *p == peer && !matches!(m.phase, Phase::Done { .. }))
            .count();
        if active >= self.config.max_migrations_per_peer {
            debug!(migration = %o.migration, ?peer, active, "too many migrations from this peer: refused");
            self.transmit
                .push_back((peer, target_abort(o.migration, AbortReason::Refused)));
            return;
        }
        // Flows of this peer already reserved or restoring in another migration.
        let busy: HashSet<u64> = self
            .migrations
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .flat_map(|(_, m)| {
                m.flows
                    .iter()
                    .filter(|(_, f)| matches!(f, Flow::Reserved | Flow::Restoring))
                    .map(|(id, _)| *id)
            })
            .collect();
        let mut index = HashMap::with_capacity(o.conns.len());
        let mut prefiltered = HashMap::new();
        let mut admit = Vec::with_capacity(o.conns.len());
        for (i, c) in o.conns.iter().enumerate() {
            if index.contains_key(&c.flow) {
                prefiltered.insert(c.flow, RefuseReason::Duplicate);
                continue;
            }
            index.insert(c.flow, i);
            if !c.is_valid() {
                prefiltered.insert(c.flow, RefuseReason::Malformed);
            } else if busy.contains(&c.flow) {
                prefiltered.insert(c.flow, RefuseReason::Duplicate);
            } else {
                admit.push(*c);
            }
        }
        // A flow id offered twice: both copies are refused.
        for c in &o.conns {
            if prefiltered.get(&c.flow) == Some(&RefuseReason::Duplicate) {
                admit.retain(|a| a.flow != c.flow);
            }
        }
        self.seq += 1;
        let m = Migration {
            seq: self.seq,
            offers: o.conns,
            index,
            prefiltered,
            phase: Phase::Admitting,
            verdicts: None,
            aborted: None,
            flows: BTreeMap::new(),
            transfer_deadline: None,
        };
        self.migrations.insert(key, m);
        self.evict_finished(peer);
        if admit.is_empty() {
            debug!(migration = %o.migration, ?peer, "nothing admissible: all refused");
            self.admitted(now, peer, o.migration, Vec::new());
            return;
        }
        debug!(migration = %o.migration, ?peer, flows = admit.len(), "offer received: admit requested");
        self.actions.push_back(TargetAction::Admit {
            peer,
            migration: o.migration,
            offers: admit,
        });
    }

    fn on_transfer(&mut self, now: Instant, peer: P, t: Transfer) {
        let Some(m) = self.migrations.get_mut(&(peer, t.migration)) else {
            debug!(migration = %t.migration, ?peer, "transfer for an unknown migration: aborted");
            self.transmit.push_back((
                peer,
                target_abort(t.migration, AbortReason::UnknownMigration),
            ));
            return;
        };
        if m.aborted.is_some() || m.phase == Phase::Admitting {
            debug!(migration = %t.migration, ?peer, "transfer after abort or before accept: ignored");
            return;
        }
        let mut release = Vec::new();
        let mut release_reason = None;
        for (flow, reason) in t.withdrawn {
            if m.flows.get(&flow) == Some(&Flow::Reserved) {
                m.flows.insert(flow, Flow::Released(reason));
                release.push(flow);
                release_reason.get_or_insert(reason);
            }
        }
        let mut results = Vec::new();
        let mut restore = Vec::new();
        for (flow, snap) in t.snapshots {
            match m.flows.get(&flow).copied() {
                None => results.push((flow, Err(RefuseReason::NotAccepted))),
                Some(Flow::Reserved) => {
                    let checked = match m.index.get(&flow) {
                        Some(&i) => m.offers[i].check_snapshot(&snap),
                        None => Err(RefuseReason::NotAccepted),
                    };
                    match checked {
                        Ok(()) => {
                            m.flows.insert(flow, Flow::Restoring);
                            restore.push((flow, snap));
                        }
                        Err(reason) => {
                            debug!(migration = %t.migration, flow, %reason, "snapshot does not match its offer");
                            m.flows.insert(flow, Flow::Failed(reason));
                            results.push((flow, Err(reason)));
                        }
                    }
                }
                Some(Flow::Restoring) => {}
                Some(Flow::Restored { target_flow }) => results.push((flow, Ok(target_flow))),
                Some(Flow::Failed(r) | Flow::Released(r)) => results.push((flow, Err(r))),
                Some(Flow::Discarded { .. }) => {
                    results.push((flow, Err(RefuseReason::Aborted)));
                }
            }
        }
        if let Some(reason) = release_reason {
            // Withdrawn entries of one Transfer may carry different reasons; the driver
            // frees room alike, so one action names the first.
            self.actions.push_back(TargetAction::Release {
                peer,
                migration: t.migration,
                flows: release,
                reason,
            });
        }
        if !restore.is_empty() {
            debug!(migration = %t.migration, ?peer, flows = restore.len(), "restore requested");
            self.actions.push_back(TargetAction::Restore {
                peer,
                migration: t.migration,
                snapshots: restore,
            });
        }
        if !results.is_empty() {
            self.transmit.push_back((
                peer,
                Message::Commit(Commit {
                    migration: t.migration,
                    results,
                }),
            ));
        }
        // Counted again from each Transfer: a batch of full send buffers spans several
        // messages, and over a lossy tunnel they arrive over seconds. The source's commit
        // deadline bounds the whole.
        m.transfer_deadline = reservation_deadline(&self.config, now, m);
        check_done(&self.config, now, m);
    }

    fn on_abort(&mut self, now: Instant, peer: P, a: Abort) {
        let Some(m) = self.migrations.get_mut(&(peer, a.migration)) else {
            debug!(migration = %a.migration, ?peer, "abort for an unknown migration: nothing held");
            return;
        };
        m.aborted.get_or_insert(a.reason);
        let kept: HashSet<u64> = a.flows.into_iter().collect();
        let mut release = Vec::new();
        let mut discard = Vec::new();
        for (flow, state) in m.flows.iter_mut() {
            match *state {
                Flow::Reserved => {
                    *state = Flow::Released(RefuseReason::Aborted);
                    release.push(*flow);
                }
                Flow::Restored { target_flow } if kept.contains(flow) => {
                    *state = Flow::Discarded { target_flow };
                    discard.push(target_flow);
                }
                _ => {}
            }
        }
        debug!(
            migration = %a.migration,
            ?peer,
            reason = %a.reason,
            released = release.len(),
            discarded = discard.len(),
            "source aborted"
        );
        if !release.is_empty() {
            self.actions.push_back(TargetAction::Release {
                peer,
                migration: a.migration,
                flows: release,
                reason: RefuseReason::Aborted,
            });
        }
        if !discard.is_empty() {
            self.actions.push_back(TargetAction::Discard {
                peer,
                migration: a.migration,
                flows: discard,
                reason: a.reason,
            });
        }
        m.transfer_deadline = None;
        check_done(&self.config, now, m);
    }

    /// Forgets the oldest finished migrations of `peer` beyond `max_finished_per_peer`.
    fn evict_finished(&mut self, peer: P) {
        let mut done: Vec<(u64, MigrationId)> = self
            .migrations
            .iter()
            .filter(|((p, _), m)| *p == peer && matches!(m.phase, Phase::Done { .. }))
            .map(|((_, id), m)| (m.seq, *id))
            .collect();
        if done.len() <= self.config.max_finished_per_peer {
            return;
        }
        done.sort_unstable();
        let excess = done.len() - self.config.max_finished_per_peer;
        for (_, id) in done.into_iter().take(excess) {
            self.migrations.remove(&(peer, id));
        }
    }
}

fn accepted(verdicts: &[(u64, Verdict)]) -> Vec<u64> {
    verdicts
        .iter()
        .filter(|(_, v)| *v == Verdict::Accepted)
        .map(|(f, _)| *f)
        .collect()
}

fn target_abort(migration: MigrationId, reason: AbortReason) -> Message {
    Message::Abort(Abort {
        migration,
        from: Side::Target,
        reason,
        flows: Vec::new(),
    })
}

/// Marks every reserved flow released and returns them.
fn release_reserved(m: &mut Migration, reason: RefuseReason) -> Vec<u64> {
    let mut out = Vec::new();
    for (flow, state) in m.flows.iter_mut() {
        if *state == Flow::Reserved {
            *state = Flow::Released(reason);
            out.push(*flow);
        }
    }
    m.transfer_deadline = None;
    out
}

/// Most time a reservation waits beyond `transfer_timeout` for a large batch.
const MAX_RESERVATION_EXTRA: Duration = Duration::from_secs(60);

/// When the flows of `m` still reserved expire, counted from `now`: `transfer_timeout`,
/// plus `commit_timeout_per_mib` for every MiB those flows may bring (their offered buffer
/// capacities, the most their snapshots carry), as the source budgets its commit deadline;
/// `None` when nothing is reserved.
fn reservation_deadline(config: &Config, now: Instant, m: &Migration) -> Option<Instant> {
    let mut any = false;
    let mut bytes = 0u64;
    for (flow, _) in m.flows.iter().filter(|(_, f)| **f == Flow::Reserved) {
        any = true;
        if let Some(o) = m.index.get(flow).and_then(|&i| m.offers.get(i)) {
            bytes += u64::from(o.rx_capacity) + u64::from(o.tx_capacity);
        }
    }
    let extra = config
        .commit_timeout_per_mib
        .mul_f64(bytes as f64 / f64::from(1u32 << 20))
        .min(MAX_RESERVATION_EXTRA);
    any.then(|| now + config.transfer_timeout + extra)
}

fn deadline(m: &Migration) -> Option<Instant> {
    match m.phase {
        Phase::Done { forget_at } => Some(forget_at),
        _ => m.transfer_deadline,
    }
}

/// Moves an active migration with nothing reserved or restoring to `Done`.
fn check_done(config: &Config, now: Instant, m: &mut Migration) {
    if m.phase != Phase::Active {
        return;
    }
    if m.flows
        .values()
        .any(|f| matches!(f, Flow::Reserved | Flow::Restoring))
    {
        return;
    }
    m.transfer_deadline = None;
    m.phase = Phase::Done {
        forget_at: now + config.linger,
    };
}
