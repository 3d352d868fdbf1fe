//! One [`Source`] and one [`Target`] with their drivers, joined by a simulated message
//! channel on virtual time (quinn-proto's `Pair` idea): seeded ChaCha delay jitter
//! (reordering), duplication, loss of chosen messages, and a crash of either node after a
//! given number of deliveries. The clock jumps to the next event.
//!
//! The drivers model what the daemon does with each action and assert, as they go, that no
//! action contradicts the flow's state (a Thaw for a flow that is not frozen, a Release of
//! nothing, a Discard of a flow that is not live, …). [`Sim::check`] then asserts the
//! end-to-end properties and returns exact counts for the scenario to compare.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use flowshift_statesync::protocol::{
    Config, ConnOffer, FlowOutcome, Message, MigrationId, MigrationReport, RefuseReason, Side,
    Source, SourceAction, Target, TargetAction, Verdict,
};
use flowshift_statesync::{ConnSnapshot, Instant, TcpState};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::common;

/// The source node's handle for the target, and the other way round.
pub type Peer = u8;
pub const SRC: Peer = 1;
pub const DST: Peer = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Abort,
    Accept,
    Commit,
    Offer,
    Transfer,
    Rehome,
}

pub fn kind(m: &Message) -> Kind {
    match m {
        Message::Abort(_) => Kind::Abort,
        Message::Accept(_) => Kind::Accept,
        Message::Commit(_) => Kind::Commit,
        Message::Offer(_) => Kind::Offer,
        Message::Transfer(_) => Kind::Transfer,
        Message::Rehome(_) => Kind::Rehome,
    }
}

/// The scenario.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub seed: u64,
    pub config: Config,
    /// One-way delay and uniform extra jitter (jitter above the gap between two messages
    /// reorders them).
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Extra delay of Commit messages.
    pub commit_delay: Duration,
    /// Lose the n-th (from 0) message of a kind.
    pub lose: Vec<(Kind, usize)>,
    /// Crash this side once this many messages have been delivered (0: right after start).
    pub crash: Option<(Side, usize)>,
    /// The survivor's tunnel notices the crash (peer restarted) this long after it.
    pub notice: Option<Duration>,
    /// Cancel the first migration at this time.
    pub cancel_at: Option<Instant>,
    /// Driver latencies.
    pub capture_delay: Duration,
    pub restore_delay: Duration,
    /// Driver policies by flow id: refuse at admission (`% 10 == 9`), fail capture
    /// (`% 10 == 8`), fail restore (`% 10 == 7`).
    pub refuse: bool,
    pub fail_capture: bool,
    pub fail_restore: bool,
    /// Migrations to start at time 0, each a number of flows.
    pub migrations: Vec<usize>,
    /// Unacknowledged bytes per snapshot: min, max.
    pub send_bytes: (usize, usize),
}

impl Knobs {
    pub fn new(seed: u64) -> Knobs {
        Knobs {
            seed,
            config: Config::default(),
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            duplicate: 0.0,
            commit_delay: Duration::ZERO,
            lose: Vec::new(),
            crash: None,
            notice: None,
            cancel_at: None,
            capture_delay: Duration::from_millis(2),
            restore_delay: Duration::from_millis(3),
            refuse: false,
            fail_capture: false,
            fail_restore: false,
            migrations: vec![20],
            send_bytes: (0, 200),
        }
    }

    pub fn policies(mut self) -> Knobs {
        self.refuse = true;
        self.fail_capture = true;
        self.fail_restore = true;
        self
    }
}

struct InFlight {
    at: Instant,
    seq: u64,
    to: Side,
    bytes: Vec<u8>,
}

/// A Restore the target driver works on: due time, migration, snapshots.
type PendingRestore = (Instant, MigrationId, Vec<(u64, ConnSnapshot)>);

/// What the source driver knows of a flow.
#[derive(Debug, Default)]
struct SrcFlow {
    frozen: bool,
    captured: bool,
    outcomes: Vec<FlowOutcome>,
}

/// Exact counts of a finished run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub moved: usize,
    pub refused: usize,
    pub thawed: usize,
    /// Reservations released by the target driver.
    pub released: usize,
    /// Restored flows discarded by the target driver.
    pub discarded: usize,
    /// Flows handed to the target driver to restore.
    pub restores: usize,
    /// Flows the target holds at the end.
    pub live: usize,
    /// Transfer messages and their largest encoding.
    pub transfers: usize,
    pub largest_transfer: usize,
    /// Outcome reasons seen on the source, with counts.
    pub reasons: BTreeMap<String, usize>,
}

pub struct Sim {
    pub now: Instant,
    rng: ChaCha8Rng,
    pub knobs: Knobs,
    pub src: Source<Peer>,
    pub dst: Target<Peer>,
    net: Vec<InFlight>,
    seq: u64,
    sent: HashMap<Kind, usize>,
    pub delivered: usize,
    crashed: Option<(Side, Instant)>,
    noticed: bool,
    cancelled: bool,
    started: Vec<MigrationId>,
    // source driver
    flows: BTreeMap<u64, SrcFlow>,
    reports: Vec<MigrationReport<Peer>>,
    captures: Vec<(Instant, MigrationId, Vec<u64>)>,
    /// Flow → target flow of every `Ok` Commit result delivered to the source.
    commits_delivered: HashMap<u64, u64>,
    // target driver
    reserved: HashSet<(MigrationId, u64)>,
    restores: Vec<PendingRestore>,
    /// Target flow → source flow.
    live: HashMap<u64, u64>,
    discarded: Vec<u64>,
    released: usize,
    restore_count: usize,
    next_target_flow: u64,
    transfer_sizes: Vec<usize>,
}

fn offer_for(flow: u64) -> ConnOffer {
    ConnOffer::from_snapshot(flow, &common::snapshot(flow, TcpState::Established, 0, 0))
}

impl Sim {
    /// Builds the pair and starts the migrations of `knobs.migrations` (flow ids counted
    /// up from 0 across them).
    pub fn new(knobs: Knobs) -> Sim {
        let mut sim = Sim {
            now: Instant::from_secs(1),
            rng: ChaCha8Rng::seed_from_u64(knobs.seed),
            src: Source::new(knobs.config.clone(), 1_000 + knobs.seed),
            dst: Target::new(knobs.config.clone()),
            knobs,
            net: Vec::new(),
            seq: 0,
            sent: HashMap::new(),
            delivered: 0,
            crashed: None,
            noticed: false,
            cancelled: false,
            started: Vec::new(),
            flows: BTreeMap::new(),
            reports: Vec::new(),
            captures: Vec::new(),
            commits_delivered: HashMap::new(),
            reserved: HashSet::new(),
            restores: Vec::new(),
            live: HashMap::new(),
            discarded: Vec::new(),
            released: 0,
            restore_count: 0,
            next_target_flow: 1_000_000,
            transfer_sizes: Vec::new(),
        };
        let mut next = 0u64;
        for n in sim.knobs.migrations.clone() {
            let offers: Vec<ConnOffer> = (next..next + n as u64).map(offer_for).collect();
            for o in &offers {
                sim.flows.insert(o.flow, SrcFlow::default());
            }
            next += n as u64;
            let id = sim.src.start(sim.now, DST, offers).expect("start");
            sim.started.push(id);
        }
        sim
    }

    fn alive(&self, side: Side) -> bool {
        !matches!(self.crashed, Some((s, _)) if s == side)
    }

    fn jitter(&mut self) -> Duration {
        let j = self.knobs.jitter.as_micros() as u64;
        if j == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.next_u64() % (j + 1))
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u32() as f64) < p * (u32::MAX as f64)
    }

    fn send(&mut self, from: Side, msg: Message) {
        let k = kind(&msg);
        let n = self.sent.entry(k).or_default();
        let index = *n;
        *n += 1;
        if !self.alive(from) || self.knobs.lose.contains(&(k, index)) {
            return;
        }
        let bytes = msg.to_bytes();
        assert_eq!(bytes.len(), msg.encoded_len());
        if k == Kind::Transfer {
            self.transfer_sizes.push(bytes.len());
        }
        let to = match from {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        };
        let copies = if self.chance(self.knobs.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = self.now + self.knobs.delay + self.jitter();
            if k == Kind::Commit {
                at += self.knobs.commit_delay;
            }
            self.seq += 1;
            self.net.push(InFlight {
                at,
                seq: self.seq,
                to,
                bytes: bytes.clone(),
            });
        }
    }

    /// Moves everything the state machines produced to the network and the drivers.
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some((peer, msg)) = self.src.poll_transmit() {
                assert_eq!(peer, DST);
                progress = true;
                self.send(Side::Source, msg);
            }
            while let Some((peer, msg)) = self.dst.poll_transmit() {
                assert_eq!(peer, SRC);
                progress = true;
                self.send(Side::Target, msg);
            }
            while let Some(a) = self.src.poll_action() {
                progress = true;
                if self.alive(Side::Source) {
                    self.on_source_action(a);
                }
            }
            while let Some(a) = self.dst.poll_action() {
                progress = true;
                if self.alive(Side::Target) {
                    self.on_target_action(a);
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn on_source_action(&mut self, a: SourceAction<Peer>) {
        // Every action must print (the driver logs them).
        assert!(!a.to_string().is_empty());
        match a {
            SourceAction::Capture {
                migration,
                peer,
                flows,
            } => {
                assert_eq!(peer, DST);
                for f in &flows {
                    let st = self.flows.get_mut(f).expect("offered flow");
                    assert!(!st.frozen && !st.captured && st.outcomes.is_empty(), "{f}");
                    st.frozen = true;
                    st.captured = true;
                }
                self.captures
                    .push((self.now + self.knobs.capture_delay, migration, flows));
            }
            SourceAction::Finished { report, .. } => self.reports.push(report),
            SourceAction::Moved {
                flow,
                peer,
                target_flow,
                ..
            } => {
                assert_eq!(peer, DST);
                let st = self.flows.get_mut(&flow).unwrap();
                assert!(st.frozen, "moved flow {flow} was not frozen");
                st.frozen = false;
                st.outcomes.push(FlowOutcome::Moved { target_flow });
            }
            SourceAction::Refused { flow, reason, .. } => {
                let st = self.flows.get_mut(&flow).unwrap();
                assert!(!st.frozen && !st.captured, "refused flow {flow} was frozen");
                st.outcomes.push(FlowOutcome::Refused(reason));
            }
            SourceAction::Thaw { flow, reason, .. } => {
                let st = self.flows.get_mut(&flow).unwrap();
                assert!(st.frozen, "thawed flow {flow} was not frozen");
                st.frozen = false;
                st.outcomes.push(FlowOutcome::Thawed(reason));
            }
        }
    }

    fn on_target_action(&mut self, a: TargetAction<Peer>) {
        assert!(!a.to_string().is_empty());
        match a {
            TargetAction::Admit {
                peer,
                migration,
                offers,
            } => {
                assert_eq!(peer, SRC);
                let verdicts: Vec<(u64, Verdict)> = offers
                    .iter()
                    .map(|o| {
                        if self.knobs.refuse && o.flow % 10 == 9 {
                            (o.flow, Verdict::Refused(RefuseReason::Capacity))
                        } else {
                            assert!(self.reserved.insert((migration, o.flow)));
                            (o.flow, Verdict::Accepted)
                        }
                    })
                    .collect();
                self.dst.admitted(self.now, SRC, migration, verdicts);
            }
            TargetAction::Discard { peer, flows, .. } => {
                assert_eq!(peer, SRC);
                for tf in flows {
                    assert!(self.live.remove(&tf).is_some(), "discard of {tf}: not live");
                    self.discarded.push(tf);
                }
            }
            TargetAction::Release {
                peer,
                migration,
                flows,
                ..
            } => {
                assert_eq!(peer, SRC);
                for f in flows {
                    assert!(
                        self.reserved.remove(&(migration, f)),
                        "release of {f}: not reserved"
                    );
                    self.released += 1;
                }
            }
            TargetAction::Restore {
                peer,
                migration,
                snapshots,
            } => {
                assert_eq!(peer, SRC);
                for (f, s) in &snapshots {
                    assert!(
                        self.reserved.remove(&(migration, *f)),
                        "restore of {f}: not reserved"
                    );
                    assert_eq!(s.ingress.flow_id, *f, "the right snapshot");
                }
                self.restore_count += snapshots.len();
                self.restores
                    .push((self.now + self.knobs.restore_delay, migration, snapshots));
            }
        }
    }

    fn capture(&mut self, migration: MigrationId, flows: Vec<u64>) {
        let mut snaps = Vec::new();
        let mut failed = Vec::new();
        let (lo, hi) = self.knobs.send_bytes;
        for f in flows {
            if self.knobs.fail_capture && f % 10 == 8 {
                failed.push((f, RefuseReason::CaptureFailed));
            } else {
                let send = lo + (self.rng.next_u64() as usize) % (hi - lo + 1);
                let unread = (self.rng.next_u64() as usize) % 64;
                snaps.push((f, common::snapshot(f, TcpState::Established, send, unread)));
            }
        }
        self.src.captured(self.now, migration, snaps, failed);
    }

    fn restore(&mut self, migration: MigrationId, snapshots: Vec<(u64, ConnSnapshot)>) {
        let mut results = Vec::new();
        for (f, _) in snapshots {
            if self.knobs.fail_restore && f % 10 == 7 {
                results.push((f, Err(RefuseReason::RestoreFailed)));
            } else {
                let tf = self.next_target_flow;
                self.next_target_flow += 1;
                self.live.insert(tf, f);
                results.push((f, Ok(tf)));
            }
        }
        self.dst.restored(self.now, SRC, migration, results);
    }

    fn deliver(&mut self, m: InFlight) {
        if !self.alive(m.to) {
            return;
        }
        let msg = Message::decode(&m.bytes).expect("own encoding decodes");
        self.delivered += 1;
        match m.to {
            Side::Source => {
                if let Message::Commit(c) = &msg {
                    for (f, r) in &c.results {
                        if let Ok(tf) = r {
                            self.commits_delivered.entry(*f).or_insert(*tf);
                        }
                    }
                }
                self.src.handle_message(self.now, DST, msg);
            }
            Side::Target => self.dst.handle_message(self.now, SRC, msg),
        }
    }

    /// Runs until nothing is left to happen (every timer, linger included, has fired).
    pub fn run(&mut self) {
        let end = self.now + Duration::from_secs(600);
        loop {
            if let Some((side, k)) = self.knobs.crash
                && self.crashed.is_none()
                && self.delivered >= k
            {
                self.crashed = Some((side, self.now));
                // What the crashed node had in flight dies with it.
                self.net.retain(|m| m.to == side);
            }
            self.pump();
            let mut next: Vec<(Instant, u8)> = Vec::new();
            if let Some(m) = self.net.iter().min_by_key(|m| (m.at, m.seq)) {
                next.push((m.at, 0));
            }
            if let Some(c) = self.captures.iter().map(|c| c.0).min() {
                next.push((c, 1));
            }
            if let Some(r) = self.restores.iter().map(|r| r.0).min() {
                next.push((r, 2));
            }
            if self.alive(Side::Source)
                && let Some(t) = self.src.poll_timeout()
            {
                next.push((t, 3));
            }
            if self.alive(Side::Target)
                && let Some(t) = self.dst.poll_timeout()
            {
                next.push((t, 4));
            }
            if let (Some((_, at)), Some(d), false) = (self.crashed, self.knobs.notice, self.noticed)
            {
                next.push((at + d, 5));
            }
            if let (Some(at), false) = (self.knobs.cancel_at, self.cancelled) {
                next.push((at, 6));
            }
            let Some(&(at, what)) = next.iter().min() else {
                break;
            };
            assert!(at <= end, "the simulation does not settle");
            if at > self.now {
                self.now = at;
            }
            match what {
                0 => {
                    let i = (0..self.net.len())
                        .min_by_key(|&i| (self.net[i].at, self.net[i].seq))
                        .unwrap();
                    let m = self.net.swap_remove(i);
                    self.deliver(m);
                }
                1 => {
                    let i = (0..self.captures.len())
                        .min_by_key(|&i| self.captures[i].0)
                        .unwrap();
                    let (_, m, flows) = self.captures.swap_remove(i);
                    if self.alive(Side::Source) {
                        self.capture(m, flows);
                    }
                }
                2 => {
                    let i = (0..self.restores.len())
                        .min_by_key(|&i| self.restores[i].0)
                        .unwrap();
                    let (_, m, snaps) = self.restores.swap_remove(i);
                    if self.alive(Side::Target) {
                        self.restore(m, snaps);
                    }
                }
                3 => self.src.handle_timeout(self.now),
                4 => self.dst.handle_timeout(self.now),
                5 => {
                    self.noticed = true;
                    match self.crashed {
                        Some((Side::Source, _)) => self.dst.peer_restarted(self.now, SRC),
                        Some((Side::Target, _)) => self.src.peer_restarted(self.now, DST),
                        None => unreachable!(),
                    }
                }
                _ => {
                    self.cancelled = true;
                    let first = self.started[0];
                    self.src.cancel(self.now, first);
                }
            }
        }
    }

    /// Asserts the end-to-end properties and returns the counts.
    pub fn check(&self) -> Summary {
        let src_alive = self.alive(Side::Source);
        let dst_alive = self.alive(Side::Target);
        let mut s = Summary {
            released: self.released,
            discarded: self.discarded.len(),
            restores: self.restore_count,
            live: self.live.len(),
            transfers: self.transfer_sizes.len(),
            largest_transfer: self.transfer_sizes.iter().copied().max().unwrap_or(0),
            ..Summary::default()
        };
        if src_alive {
            for (f, st) in &self.flows {
                assert_eq!(st.outcomes.len(), 1, "flow {f} resolved {:?}", st.outcomes);
                assert!(!st.frozen, "flow {f} left frozen");
                let outcome = st.outcomes[0];
                match outcome {
                    FlowOutcome::Moved { target_flow } => {
                        s.moved += 1;
                        assert_eq!(
                            self.commits_delivered.get(f),
                            Some(&target_flow),
                            "flow {f} moved without its commit"
                        );
                        if dst_alive {
                            assert_eq!(
                                self.live.get(&target_flow),
                                Some(f),
                                "moved flow {f} is live"
                            );
                        }
                    }
                    FlowOutcome::Refused(r) => {
                        s.refused += 1;
                        *s.reasons.entry(format!("refused: {r}")).or_default() += 1;
                    }
                    FlowOutcome::Thawed(r) => {
                        s.thawed += 1;
                        *s.reasons.entry(format!("thawed: {r}")).or_default() += 1;
                    }
                }
            }
            // One report per migration, agreeing with the actions.
            assert_eq!(self.reports.len(), self.started.len());
            for r in &self.reports {
                assert!(self.started.contains(&r.migration));
                for (f, o) in &r.outcomes {
                    assert_eq!(self.flows[f].outcomes, vec![*o]);
                }
                assert_eq!(r.moved + r.refused + r.thawed, r.outcomes.len());
            }
            let reported: usize = self.reports.iter().map(|r| r.outcomes.len()).sum();
            assert_eq!(reported, self.flows.len());
            assert_eq!(self.src.active_migrations(), 0);
            assert_eq!(self.src.remembered_migrations(), 0);
        }
        if dst_alive {
            assert!(
                self.reserved.is_empty(),
                "reservations left: {:?}",
                self.reserved
            );
            assert!(self.restores.is_empty());
            assert_eq!(self.dst.active_migrations(), 0);
            assert_eq!(self.dst.remembered_migrations(), 0);
            if src_alive {
                // The flows the target holds are exactly the moved ones.
                let moved: HashSet<u64> = self
                    .flows
                    .values()
                    .filter_map(|st| match st.outcomes[0] {
                        FlowOutcome::Moved { target_flow } => Some(target_flow),
                        _ => None,
                    })
                    .collect();
                let live: HashSet<u64> = self.live.keys().copied().collect();
                assert_eq!(live, moved, "target holds exactly the moved flows");
            }
        }
        s
    }

    /// Messages delivered in a run without crashes (to crash "at every step").
    pub fn deliveries(knobs: &Knobs) -> usize {
        let mut k = knobs.clone();
        k.crash = None;
        let mut sim = Sim::new(k);
        sim.run();
        sim.delivered
    }
}
