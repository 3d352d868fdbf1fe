//! The planner: which connections to offload, and to which peer.
//!
//! A plan is made at most once per [`PlanConfig::replan_interval`]. The policy decides what is
//! compared with what:
//!
//! - [`Policy::Predictive`]: the larger of the node's current and predicted peak load (over the
//!   horizon) against the learned threshold the caller passes ([`super::detect::Detector`]);
//!   connections weighed by their predicted load.
//! - [`Policy::Reactive`]: the current load against [`PlanConfig::reactive_threshold`];
//!   connections weighed by their current load. A baseline.
//! - [`Policy::Manual`]: never plans.
//!
//! Above the threshold the node sheds load until it is back at `threshold − hysteresis`, at most
//! [`PlanConfig::max_moves`] moves per plan. Candidates are taken in this order: priority class
//! ([`Priority::Background`] first, [`Priority::Interactive`] last), then net benefit, then age
//! (older first), then id. The net benefit of a move is the load it takes off over the
//! horizon — `load × min(horizon, age)` in load-seconds, the age standing in for the expected
//! remaining life (a connection that has lived for a minute is likely to live on; one that
//! started a second ago may be gone before the move pays off) — minus its [`MigrationCost`];
//! a candidate whose benefit does not exceed its cost is not moved. A connection moved less than
//! [`PlanConfig::cooldown`] ago is not moved again.
//!
//! A move does not always take a connection's whole load off this node. Its packets keep
//! entering here, and this node forwards them to the target: every packet both ways when the
//! target's replies come back through here ([`ReturnPath::Relay`]), only the client's when the
//! target answers from its own TUN ([`ReturnPath::Direct`]). What stays is the candidate's
//! [`Residual`], a share of its load by return path; a move relieves this node of the rest, and
//! only that counts towards the net benefit and the shedding. Relaying a byte can cost more than
//! serving it (a bulk download: [`PlanConfig::relay_cpu_s_per_gb`]): then moving the connection
//! to a relaying peer relieves nothing and is not planned. Forwarding only the client's ACKs of
//! a download returned directly costs about what serving it does on the machines measured
//! ([`PlanConfig::direct_cpu_s_per_gb`]): what a move relieves there is the app's own work.
//!
//! The target is chosen among the peers that stay at or below `threshold − hysteresis` after the
//! move (so a move never pushes a peer into shedding, which is what would make connections
//! ping-pong) and that relieve this node at all: those that leave the least here first (a
//! direct-return peer before a relaying one), then the lowest utilisation after the move; peers
//! within [`PlanConfig::rtt_tolerance`] of that lowest utilisation are tie-broken by the lower
//! RTT.
//!
//! **Rebalancing** ([`PlanConfig::rebalance`], off by default). At or below the threshold a node
//! also plans when the group is imbalanced: its utilisation more than
//! [`PlanInput::imbalance_threshold`] above its idlest peer's — a peer that has just joined
//! after a scale-out, or one that came back from a drain. It then hands connections to the
//! idlest peers until the spread is at most half that threshold, each move to the peer with the
//! lowest utilisation after it, never filling a peer above this node's own utilisation after
//! the move (so the two cannot swap roles and send the connection back) nor above
//! `threshold − hysteresis`. Candidates, costs, residuals and the cap on moves are as for
//! shedding.
//!
//! Loads are in units of capacity (CPU cores, or whatever the node's capacity is measured in);
//! utilisation is load / capacity.

use smoltcp::time::{Duration, Instant};

use super::config::{ConfigError, count_in, duration_in, in_range};
use super::{ConnId, NodeId, Priority, secs};

/// What the planner does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Never plans; moves are made by the operator.
    Manual,
    /// Plans on the forecast.
    #[default]
    Predictive,
    /// Plans on the current load.
    Reactive,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Manual => "manual",
            Policy::Predictive => "predictive",
            Policy::Reactive => "reactive",
        })
    }
}

/// The cost of moving one connection: the connection is frozen for
/// `freeze + per_mib × MiB moved`, and for that time the move keeps `load` units of capacity busy
/// (capturing, sending and restoring). In load-seconds: `load × (freeze + per_mib × MiB)`.
///
/// The defaults come from the `flowshift-bench migrate` run in `docs/benchmarks.md`
/// (2026-12-03, 2 vCPUs): 5 ms is the client-observed stall per move (p50 5.3 ms; the node's
/// own freeze is 0.74 ms p50), and 1 ms per MiB is the capture time's growth with the send
/// queue (4.4 ms p99 freeze with up to 4 MiB queued). Set them from a `flowshift-bench
/// migrate` run on the node's own hardware.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationCost {
    /// Fixed freeze per move. Default 5 ms.
    pub freeze: Duration,
    /// Extra freeze per MiB moved. Default 1 ms.
    pub per_mib: Duration,
    /// Capacity a move keeps busy while it runs. Default 0.1: an estimate, not a measurement
    /// (the freeze is mostly spent waiting for the peer, and `flowshift-bench migrate` does not
    /// measure the CPU a move takes).
    pub load: f64,
}

impl Default for MigrationCost {
    fn default() -> Self {
        Self {
            freeze: Duration::from_millis(5),
            per_mib: Duration::from_millis(1),
            load: 0.1,
        }
    }
}

impl MigrationCost {
    /// How long a connection with `bytes` to move is frozen.
    pub fn stall(&self, bytes: u64) -> Duration {
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let extra = (self.per_mib.total_micros() as f64 * mib).min(u64::MAX as f64 / 2.0);
        self.freeze + Duration::from_micros(extra as u64)
    }

    /// The cost in load-seconds of moving `bytes`.
    pub fn load_seconds(&self, bytes: u64) -> f64 {
        self.load * secs(self.stall(bytes))
    }
}

/// How a moved connection's replies reach its client, set per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnPath {
    /// Back through this node, which forwards the connection's packets both ways.
    #[default]
    Relay,
    /// Straight out of the target's own TUN (direct server return): this node forwards only
    /// what the client sends.
    Direct,
}

impl std::fmt::Display for ReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReturnPath::Relay => "relayed",
            ReturnPath::Direct => "direct return",
        })
    }
}

/// The share of a connection's load that stays on this node once it has moved, by return path
/// (0: the move takes it all; 1: nothing; above 1: the move adds load here).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Residual {
    /// Moved to a [`ReturnPath::Relay`] peer.
    pub relay: f64,
    /// Moved to a [`ReturnPath::Direct`] peer.
    pub direct: f64,
}

impl Residual {
    /// The share for `path`, finite and at least 0.
    pub fn share(&self, path: ReturnPath) -> f64 {
        let s = match path {
            ReturnPath::Relay => self.relay,
            ReturnPath::Direct => self.direct,
        };
        if s.is_finite() { s.max(0.0) } else { 1.0 }
    }
}

/// Settings of the planner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanConfig {
    /// What the planner does. Default [`Policy::Predictive`].
    pub policy: Policy,
    /// Shed down to `threshold − hysteresis`, and fill peers no higher. Default 0.1.
    pub hysteresis: f64,
    /// Least time between two plans. Default 1 s.
    pub replan_interval: Duration,
    /// Most moves per plan. Default 4.
    pub max_moves: usize,
    /// A connection moved less than this ago is not moved again. Default 30 s.
    pub cooldown: Duration,
    /// The cost of a move.
    pub migration_cost: MigrationCost,
    /// Threshold of [`Policy::Reactive`] on current utilisation. Default 0.85.
    pub reactive_threshold: f64,
    /// Peers within this much utilisation of the least loaded one are ranked by RTT. Default 0.05.
    pub rtt_tolerance: f64,
    /// Data-path CPU seconds (workers and tunnel thread) this node spends per GB it forwards
    /// for a moved connection, from which the node computes a candidate's [`Residual`] under
    /// the `cpu` metric (all its bytes forwarded when relayed, the client's when the target
    /// returns directly). Default 1.18, measured by `flowshift-bench migrate --parts steady`
    /// (docs/benchmarks.md: a relayed bulk download costs the workers 0.33 s/GB and the
    /// tunnel thread 0.85, against 0.22 for the workers serving it); set it from a run on the
    /// node's own hardware.
    pub relay_cpu_s_per_gb: f64,
    /// Data-path CPU seconds (workers and tunnel thread) this node spends per GB that a moved
    /// connection's target returns straight to the client ([`ReturnPath::Direct`]): the
    /// client's ACKs of those bytes still enter here and are forwarded, one small packet each.
    /// Default 0.43, measured by `flowshift-bench migrate --parts steady --direct-return`
    /// (docs/benchmarks.md: a direct-return download costs the ingress's workers 0.19 s/GB
    /// and its tunnel thread 0.24, against 0.39 for its workers serving it: on that machine
    /// such a move relieves nothing).
    pub direct_cpu_s_per_gb: f64,
    /// Also plan, at or below the threshold, when this node's utilisation is more than the
    /// imbalance threshold above its idlest peer's (see the module doc). Default off.
    pub rebalance: bool,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Predictive,
            hysteresis: 0.1,
            replan_interval: Duration::from_secs(1),
            max_moves: 4,
            cooldown: Duration::from_secs(30),
            migration_cost: MigrationCost::default(),
            reactive_threshold: 0.85,
            rtt_tolerance: 0.05,
            relay_cpu_s_per_gb: 1.18,
            direct_cpu_s_per_gb: 0.43,
            rebalance: false,
        }
    }
}

impl PlanConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range("plan.hysteresis", self.hysteresis, 0.0, 1.0)?;
        duration_in(
            "plan.replan_interval",
            self.replan_interval,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        count_in("plan.max_moves", self.max_moves, 1, 1 << 16)?;
        duration_in(
            "plan.cooldown",
            self.cooldown,
            Duration::ZERO,
            Duration::from_secs(86_400),
        )?;
        duration_in(
            "plan.migration_cost.freeze",
            self.migration_cost.freeze,
            Duration::ZERO,
            Duration::from_secs(60),
        )?;
        duration_in(
            "plan.migration_cost.per_mib",
            self.migration_cost.per_mib,
            Duration::ZERO,
            Duration::from_secs(1),
        )?;
        in_range(
            "plan.migration_cost.load",
            self.migration_cost.load,
            0.0,
            1e6,
        )?;
        in_range(
            "plan.reactive_threshold",
            self.reactive_threshold,
            0.0,
            10.0,
        )?;
        in_range("plan.rtt_tolerance", self.rtt_tolerance, 0.0, 10.0)?;
        in_range("plan.relay_cpu_s_per_gb", self.relay_cpu_s_per_gb, 0.0, 1e3)?;
        in_range(
            "plan.direct_cpu_s_per_gb",
            self.direct_cpu_s_per_gb,
            0.0,
            1e3,
        )?;
        Ok(())
    }
}

/// A node's load in units of its capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeLoad {
    /// Load over the last interval.
    pub current: f64,
    /// Predicted peak load over the horizon.
    pub predicted: f64,
    /// Capacity; a node with capacity `<= 0` is never a target and never sheds.
    pub capacity: f64,
}

/// A peer as its last load report describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peer {
    /// The peer.
    pub id: NodeId,
    /// Its load.
    pub load: NodeLoad,
    /// Round-trip time to it.
    pub rtt: Duration,
    /// How a connection moved to it returns its replies.
    pub return_path: ReturnPath,
}

/// What this node moved to each peer lately that the peer's load reports may not show yet.
///
/// A peer's report rides its heartbeats and is a second or two old when a plan reads it. A
/// plan made before the report has caught up with the last moves would see the peer as
/// empty as before them and fill it again: the moves pile onto one peer, push it over its
/// threshold and come back. So after each move the peer's load is taken as at least what it
/// was reported at then plus every load moved to it since, for `hold` after the last move
/// (long enough for a report that includes the move to arrive); a report above that floor
/// wins at once.
#[derive(Debug, Clone, Default)]
pub struct PeerFloors {
    /// Per peer: (until when, the floor).
    floors: std::collections::BTreeMap<NodeId, (Instant, f64)>,
}

impl PeerFloors {
    /// Records a move of `load` to `target`, whose report said `reported` when it was planned.
    pub fn moved(
        &mut self,
        now: Instant,
        hold: Duration,
        target: NodeId,
        reported: f64,
        load: f64,
    ) {
        let finite = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
        let until = now + hold;
        let floor = self.floors.entry(target).or_insert((until, 0.0));
        *floor = (until, floor.1.max(finite(reported)) + finite(load));
    }

    /// Forgets the floors that have run out.
    pub fn expire(&mut self, now: Instant) {
        self.floors.retain(|_, (until, _)| now < *until);
    }

    /// `reported`, the load `peer` reported, raised to its floor if it has one.
    pub fn load(&self, peer: NodeId, reported: f64) -> f64 {
        self.floors
            .get(&peer)
            .map_or(reported, |(_, floor)| reported.max(*floor))
    }
}

/// A connection that may be offloaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The connection.
    pub conn: ConnId,
    /// Its load over the last interval.
    pub current: f64,
    /// Its predicted load over the horizon.
    pub predicted: f64,
    /// Time since it was accepted.
    pub age: Duration,
    /// Its bandwidth, bytes/s both ways: what piles up during the freeze and must be moved too.
    pub bandwidth: f64,
    /// Bytes a move copies now (unacknowledged + unsent + unread).
    pub buffered: u64,
    /// Its priority class.
    pub priority: Priority,
    /// When it was last moved, if ever.
    pub last_moved: Option<Instant>,
    /// What of its load a move would leave here.
    pub residual: Residual,
}

/// What the planner reads.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// This node.
    pub local: NodeLoad,
    /// The learned threshold ([`super::detect::Detector::threshold`]); used by
    /// [`Policy::Predictive`].
    pub threshold: f64,
    /// The lease group's other nodes.
    pub peers: &'a [Peer],
    /// This node's connections that may move.
    pub candidates: &'a [Candidate],
    /// Spread of utilisation (this node's over its idlest peer's) above which the node
    /// rebalances, with [`PlanConfig::rebalance`] ([`super::detect::DetectConfig::imbalance_threshold`]).
    pub imbalance_threshold: f64,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    /// The connection to move.
    pub conn: ConnId,
    /// Where to.
    pub target: NodeId,
    /// Why, in figures; its `Display` is the human-readable reason.
    pub reason: Reason,
}

/// The figures behind a move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reason {
    /// The policy that planned it.
    pub policy: Policy,
    /// This node's utilisation that triggered the plan (predicted or current, per policy).
    pub utilisation: f64,
    /// The threshold it exceeded.
    pub threshold: f64,
    /// The connection's load (predicted or current, per policy).
    pub conn_load: f64,
    /// What of it stays here once moved (forwarding its packets).
    pub left: f64,
    /// How the target returns its replies.
    pub return_path: ReturnPath,
    /// The connection's age.
    pub age: Duration,
    /// The move's cost in load-seconds.
    pub cost: f64,
    /// The target's utilisation after the move.
    pub target_utilisation: f64,
    /// Round-trip time to the target.
    pub rtt: Duration,
    /// A rebalancing move (at or below the threshold): the idlest peer's utilisation when
    /// planned, and `threshold` is the imbalance threshold above it that this node exceeded.
    pub rebalance: Option<f64>,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.policy {
            Policy::Reactive => "current",
            _ => "predicted",
        };
        match self.rebalance {
            Some(idlest) => write!(
                f,
                "{what} utilisation {:.2} more than {:.2} above the idlest peer's {idlest:.2}: \
                 rebalancing",
                self.utilisation, self.threshold,
            )?,
            None => write!(
                f,
                "{what} utilisation {:.2} above threshold {:.2}",
                self.utilisation, self.threshold,
            )?,
        }
        write!(
            f,
            "; connection load {:.3}, {:.3} left \
             here {} (age {} s, move cost {:.3} load-s); target at {:.2} after the move, rtt {} ms",
            self.conn_load,
            self.left,
            self.return_path,
            self.age.secs(),
            self.cost,
            self.target_utilisation,
            self.rtt.total_millis(),
        )
    }
}

/// Where the planner stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Status {
    /// Utilisation at or below the threshold: nothing to do.
    Balanced {
        /// Utilisation compared (predicted or current, per policy).
        utilisation: f64,
        /// Threshold.
        threshold: f64,
    },
    /// [`Policy::Manual`].
    Manual,
    /// Above the threshold, but no candidate fits any peer.
    NoTarget {
        /// Utilisation compared.
        utilisation: f64,
    },
    /// Planned less than `replan_interval` ago.
    NotDue {
        /// When the next plan may be made.
        next: Instant,
    },
    /// Moves planned.
    Shedding {
        /// Utilisation before the moves.
        from: f64,
        /// Utilisation once they are done.
        to: f64,
    },
    /// Moves planned at or below the threshold, to even out the group
    /// ([`PlanConfig::rebalance`]).
    Rebalancing {
        /// Utilisation before the moves.
        from: f64,
        /// Utilisation once they are done.
        to: f64,
        /// The idlest peer's utilisation before the moves.
        idlest: f64,
    },
}

/// The moves to make now, and why there are (or are not) any.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The moves, in the order to make them.
    pub moves: Vec<Move>,
    /// The planner's state.
    pub status: Status,
}

impl Plan {
    fn none(status: Status) -> Self {
        Self {
            moves: Vec::new(),
            status,
        }
    }
}

/// Makes plans; remembers when it last did.
#[derive(Debug, Clone)]
pub struct Planner {
    config: PlanConfig,
    horizon: Duration,
    last_plan: Option<Instant>,
}

impl Planner {
    /// A planner looking `horizon` ahead (the detection horizon).
    pub fn new(config: PlanConfig, horizon: Duration) -> Self {
        Self {
            config,
            horizon,
            last_plan: None,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }

    /// When the next plan may be made (`None`: now).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.last_plan.map(|t| t + self.config.replan_interval)
    }

    /// Makes the plan for `now` (see the module doc).
    pub fn plan(&mut self, now: Instant, input: &PlanInput<'_>) -> Plan {
        let c = &self.config;
        let (predictive, threshold) = match c.policy {
            Policy::Manual => return Plan::none(Status::Manual),
            Policy::Predictive => (true, input.threshold),
            Policy::Reactive => (false, c.reactive_threshold),
        };
        if let Some(next) = self.poll_timeout().filter(|next| now < *next) {
            return Plan::none(Status::NotDue { next });
        }
        self.last_plan = Some(now);
        let node_load = |n: &NodeLoad| {
            let load = if predictive {
                n.current.max(n.predicted)
            } else {
                n.current
            };
            if load.is_finite() { load.max(0.0) } else { 0.0 }
        };
        let local = &input.local;
        if local.capacity.is_nan() || local.capacity <= 0.0 {
            return Plan::none(Status::Balanced {
                utilisation: 0.0,
                threshold,
            });
        }
        let mut load = node_load(local);
        let utilisation = load / local.capacity;
        let fill = threshold - c.hysteresis;
        let mut peers: Vec<(Peer, f64)> = input
            .peers
            .iter()
            .filter(|p| p.load.capacity.is_finite() && p.load.capacity > 0.0)
            .map(|p| (*p, node_load(&p.load)))
            .collect();
        let idlest = |peers: &[(Peer, f64)]| {
            peers
                .iter()
                .map(|(p, l)| l / p.load.capacity)
                .min_by(f64::total_cmp)
        };
        // At or below the threshold: nothing to do, unless rebalancing and the group is
        // imbalanced (then `spread` is the imbalance threshold and `idle` the idlest peer's
        // utilisation).
        let imbalance = input.imbalance_threshold;
        let rebalance = if utilisation <= threshold {
            match idlest(&peers) {
                Some(idle)
                    if c.rebalance && imbalance.is_finite() && utilisation - idle > imbalance =>
                {
                    Some(idle)
                }
                _ => {
                    return Plan::none(Status::Balanced {
                        utilisation,
                        threshold,
                    });
                }
            }
        } else {
            None
        };
        let goal = fill * local.capacity;
        let trigger = if rebalance.is_some() {
            imbalance
        } else {
            threshold
        };

        let conn_load = |cand: &Candidate| {
            let l = if predictive {
                cand.predicted
            } else {
                cand.current
            };
            if l.is_finite() { l.max(0.0) } else { 0.0 }
        };
        let horizon = secs(self.horizon);
        // A candidate is ranked by the most a move could relieve: through the return path
        // that leaves the least here among the peers there are.
        let paths: Vec<ReturnPath> = [ReturnPath::Direct, ReturnPath::Relay]
            .into_iter()
            .filter(|path| peers.iter().any(|(p, _)| p.return_path == *path))
            .collect();
        let mut ranked: Vec<(&Candidate, f64, f64)> = input
            .candidates
            .iter()
            .filter(|cand| cand.last_moved.is_none_or(|t| now >= t + c.cooldown))
            .filter_map(|cand| {
                let l = conn_load(cand);
                let left = paths
                    .iter()
                    .map(|p| cand.residual.share(*p))
                    .min_by(f64::total_cmp)?;
                let relief = l * (1.0 - left);
                let pending = (cand.bandwidth.max(0.0) * secs(c.migration_cost.freeze)) as u64;
                let cost = c
                    .migration_cost
                    .load_seconds(cand.buffered.saturating_add(pending));
                let benefit = relief * horizon.min(secs(cand.age)) - cost;
                (relief > 0.0 && benefit > 0.0).then_some((cand, benefit, cost))
            })
            .collect();
        ranked.sort_by(|(a, ab, _), (b, bb, _)| {
            a.priority
                .move_rank()
                .cmp(&b.priority.move_rank())
                .then(bb.total_cmp(ab))
                .then(b.age.cmp(&a.age))
                .then(a.conn.cmp(&b.conn))
        });

        // Rebalancing goes only to the peers this node is imbalanced with (more than the
        // imbalance threshold above them when the plan starts), each until within half of
        // it: a peer that is close already is not filled because another, which this node
        // cannot relieve itself onto (a relay that leaves more than it takes), is idle.
        let imbalanced: Vec<bool> = peers
            .iter()
            .map(|(p, l)| utilisation - l / p.load.capacity > imbalance)
            .collect();
        let mut moves = Vec::new();
        for (cand, _, cost) in ranked {
            let util = load / local.capacity;
            let open = |i: usize| {
                let (p, l) = &peers[i];
                imbalanced[i] && util - l / p.load.capacity > imbalance / 2.0
            };
            let done = match rebalance {
                None => load <= goal,
                Some(_) => !(0..peers.len()).any(open),
            };
            if done || moves.len() >= c.max_moves {
                break;
            }
            let l = conn_load(cand);
            // Shedding fills a peer up to `threshold − hysteresis`; rebalancing also never
            // makes it busier than this node is after the move (the two do not swap roles).
            let limit = |i: usize, share: f64| match rebalance {
                None => fill,
                Some(_) if open(i) => fill.min((load - l * (1.0 - share)) / local.capacity),
                Some(_) => f64::NEG_INFINITY,
            };
            let Some(i) = self.target(&peers, l, &cand.residual, limit) else {
                continue;
            };
            let (peer, peer_load) = &mut peers[i];
            let left = l * cand.residual.share(peer.return_path);
            let after = (*peer_load + l) / peer.load.capacity;
            *peer_load += l;
            load -= l - left;
            moves.push(Move {
                conn: cand.conn,
                target: peer.id,
                reason: Reason {
                    policy: c.policy,
                    utilisation,
                    threshold: trigger,
                    conn_load: l,
                    left,
                    return_path: peer.return_path,
                    age: cand.age,
                    cost,
                    target_utilisation: after,
                    rtt: peer.rtt,
                    rebalance,
                },
            });
        }
        let to = load / local.capacity;
        let status = match (moves.is_empty(), rebalance) {
            (true, None) => Status::NoTarget { utilisation },
            (true, Some(_)) => Status::Balanced {
                utilisation,
                threshold,
            },
            (false, None) => Status::Shedding {
                from: utilisation,
                to,
            },
            (false, Some(idlest)) => Status::Rebalancing {
                from: utilisation,
                to,
                idlest,
            },
        };
        Plan { moves, status }
    }

    /// The index of the peer that takes `l` (see the module doc), if any has room and relieves
    /// this node. `limit(i, share)` is the most utilisation peer `i` may have after the move,
    /// given the share of `l` the move would leave here (−∞: not a target).
    fn target(
        &self,
        peers: &[(Peer, f64)],
        l: f64,
        residual: &Residual,
        limit: impl Fn(usize, f64) -> f64,
    ) -> Option<usize> {
        let after = |(p, load): &(Peer, f64)| (load + l) / p.load.capacity;
        let left = |(p, _): &(Peer, f64)| residual.share(p.return_path);
        let relieving = || {
            peers
                .iter()
                .enumerate()
                .filter(|(i, p)| left(p) < 1.0 && after(p) <= limit(*i, left(p)))
        };
        let least_left = relieving().map(|(_, p)| left(p)).min_by(f64::total_cmp)?;
        let fits = || relieving().filter(|(_, p)| left(p) <= least_left);
        let lowest = fits().map(|(_, p)| after(p)).min_by(f64::total_cmp)?;
        fits()
            .filter(|(_, p)| after(p) <= lowest + self.config.rtt_tolerance)
            .min_by(|(_, a), (_, b)| {
                a.0.rtt
                    .cmp(&b.0.rtt)
                    .then(after(a).total_cmp(&after(b)))
                    .then(a.0.id.cmp(&b.0.id))
            })
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::ZERO;

    fn node(load: f64) -> NodeLoad {
        NodeLoad {
            current: load,
            predicted: load,
            capacity: 1.0,
        }
    }

    fn peer(id: u32, load: f64, rtt_ms: u64) -> Peer {
        Peer {
            id: NodeId(id),
            load: node(load),
            rtt: Duration::from_millis(rtt_ms),
            return_path: ReturnPath::Direct,
        }
    }

    fn cand(conn: ConnId, load: f64, age_s: u64, priority: Priority) -> Candidate {
        Candidate {
            conn,
            current: load,
            predicted: load,
            age: Duration::from_secs(age_s),
            bandwidth: 0.0,
            buffered: 0,
            priority,
            last_moved: None,
            residual: Residual::default(),
        }
    }

    /// A plan's input: this node at `local` (capacity 1), threshold 0.85, imbalance 0.3.
    fn input<'a>(local: f64, peers: &'a [Peer], candidates: &'a [Candidate]) -> PlanInput<'a> {
        PlanInput {
            local: node(local),
            threshold: 0.85,
            peers,
            candidates,
            imbalance_threshold: 0.3,
        }
    }

    fn planner(policy: Policy) -> Planner {
        let config = PlanConfig {
            policy,
            ..PlanConfig::default()
        };
        Planner::new(config, Duration::from_secs(5))
    }

    fn ids(plan: &Plan) -> Vec<(ConnId, u32)> {
        plan.moves.iter().map(|m| (m.conn, m.target.0)).collect()
    }

    #[test]
    fn a_peer_floor_adds_the_moves_until_it_runs_out_and_a_higher_report_wins() {
        let hold = Duration::from_secs(3);
        let mut f = PeerFloors::default();
        let (a, b) = (NodeId(1), NodeId(2));
        assert_eq!(f.load(a, 0.3), 0.3);
        // Two moves of 0.1 to `a`, reported at 0.3: at least 0.5 until 3 s after the second.
        f.moved(T0, hold, a, 0.3, 0.1);
        f.moved(T0 + Duration::from_secs(1), hold, a, 0.3, 0.1);
        assert!((f.load(a, 0.3) - 0.5).abs() < 1e-9);
        assert_eq!(f.load(a, 0.7), 0.7, "a report above the floor wins");
        assert_eq!(f.load(b, 0.2), 0.2, "other peers are untouched");
        // A later report that shows the moves raises the base of the next floor.
        f.moved(T0 + Duration::from_secs(2), hold, a, 0.6, 0.1);
        assert!((f.load(a, 0.0) - 0.7).abs() < 1e-9);
        // Hostile figures neither lower the floor nor poison it.
        f.moved(
            T0 + Duration::from_secs(2),
            hold,
            a,
            f64::NAN,
            f64::INFINITY,
        );
        assert!((f.load(a, 0.0) - 0.7).abs() < 1e-9);
        f.expire(T0 + Duration::from_millis(4_999));
        assert!((f.load(a, 0.0) - 0.7).abs() < 1e-9);
        f.expire(T0 + Duration::from_secs(5));
        assert_eq!(f.load(a, 0.0), 0.0);
    }

    fn rebalancer(policy: Policy, rebalance: bool) -> Planner {
        let config = PlanConfig {
            policy,
            rebalance,
            ..PlanConfig::default()
        };
        Planner::new(config, Duration::from_secs(5))
    }

    /// A node at 0.6, well under its threshold, beside a peer that has just joined (0.0):
    /// with `rebalance` it hands over connections until the two are within half the
    /// imbalance threshold (0.3 / 2), the last move leaving them even; without, nothing.
    #[test]
    fn rebalancing_evens_out_an_idle_peer_only_when_asked() {
        let candidates: Vec<Candidate> = (1..=6)
            .map(|i| cand(i, 0.1, 600, Priority::Normal))
            .collect();
        let peers = [peer(9, 0.0, 1)];
        let input = input(0.6, &peers, &candidates);
        for policy in [Policy::Reactive, Policy::Predictive] {
            let plan = rebalancer(policy, false).plan(T0, &input);
            assert_eq!(plan.moves, [], "{plan:?}");
            assert!(matches!(plan.status, Status::Balanced { .. }));

            let plan = rebalancer(policy, true).plan(T0, &input);
            assert_eq!(ids(&plan).len(), 3, "{plan:?}");
            assert!(ids(&plan).iter().all(|&(_, peer)| peer == 9));
            let Status::Rebalancing { from, to, idlest } = plan.status else {
                panic!("{:?}", plan.status)
            };
            assert_eq!((from, idlest), (0.6, 0.0));
            assert!((to - 0.3).abs() < 1e-9, "{to}");
            let last = plan.moves.last().unwrap().reason;
            assert!((last.target_utilisation - 0.3).abs() < 1e-9);
            assert_eq!(last.rebalance, Some(0.0));
            assert_eq!(last.threshold, 0.3);
            let text = last.to_string();
            assert!(
                text.contains(
                    "utilisation 0.60 more than 0.30 above the idlest peer's 0.00: rebalancing"
                ),
                "{text}"
            );
        }
    }

    /// Rebalancing needs a spread above the imbalance threshold, never makes the peer busier
    /// than this node (a connection too big to split evenly stays), never fills a peer past
    /// `threshold − hysteresis`, and keeps to `max_moves`.
    #[test]
    fn rebalancing_never_swaps_the_roles_nor_fills_a_peer() {
        let plan_for = |local: f64, cands: &[Candidate], peers: &[Peer]| {
            let input = input(local, peers, cands);
            rebalancer(Policy::Reactive, true).plan(T0, &input)
        };
        let small: Vec<Candidate> = (1..=8)
            .map(|i| cand(i, 0.05, 600, Priority::Normal))
            .collect();
        // A spread of 0.2: balanced enough.
        let plan = plan_for(0.4, &small, &[peer(9, 0.2, 1)]);
        assert_eq!(plan.moves, []);
        assert!(matches!(plan.status, Status::Balanced { .. }));
        // One connection of 0.4 against a peer at 0.1: moving it would leave 0.1 here and
        // 0.5 there. It stays.
        let big = [cand(1, 0.4, 600, Priority::Normal)];
        let plan = plan_for(0.5, &big, &[peer(9, 0.1, 1)]);
        assert_eq!(plan.moves, [], "{plan:?}");
        assert!(matches!(plan.status, Status::Balanced { .. }));
        // A node at the threshold (0.85) beside a peer at 0.5: two moves of 0.05 make them
        // 0.75 and 0.60, within 0.15: done, the peer under `threshold − hysteresis`.
        let plan = plan_for(0.85, &small, &[peer(9, 0.5, 1)]);
        assert_eq!(plan.moves.len(), 2, "{plan:?}");
        assert!(
            plan.moves
                .iter()
                .all(|m| m.reason.target_utilisation <= 0.75 + 1e-9)
        );
        // Many small connections: no more than `max_moves` (4) a plan.
        let tiny: Vec<Candidate> = (1..=40)
            .map(|i| cand(i, 0.02, 600, Priority::Normal))
            .collect();
        let plan = plan_for(0.8, &tiny, &[peer(9, 0.0, 1)]);
        assert_eq!(plan.moves.len(), 4, "{plan:?}");
        // Two idle peers: each move to the idlest after the moves before it.
        let plan = plan_for(0.6, &small, &[peer(8, 0.0, 1), peer(9, 0.0, 1)]);
        let targets: Vec<u32> = ids(&plan).iter().map(|&(_, p)| p).collect();
        assert_eq!(targets, [8, 9, 8, 9], "{plan:?}");
    }

    /// Rebalancing fills only the peers this node is imbalanced with. Here the idle peer
    /// relays, and relaying these connections would leave more here than they take (a
    /// residual of 1.5): no target; the other peer is only 0.2 below, no imbalance. Nothing
    /// moves. (It used to fill the near peer because the far one was idle.) Peers of
    /// infinite capacity are no peers.
    #[test]
    fn rebalancing_fills_only_peers_it_is_imbalanced_with() {
        let candidates: Vec<Candidate> = (1..=6)
            .map(|i| Candidate {
                residual: Residual {
                    relay: 1.5,
                    direct: 0.0,
                },
                ..cand(i, 0.1, 600, Priority::Normal)
            })
            .collect();
        let near = peer(2, 0.4, 1);
        let idle_relay = Peer {
            return_path: ReturnPath::Relay,
            ..peer(3, 0.0, 1)
        };
        let plan_for = |peers: &[Peer]| {
            let input = input(0.6, peers, &candidates);
            rebalancer(Policy::Reactive, true).plan(T0, &input)
        };
        let plan = plan_for(&[near, idle_relay]);
        assert_eq!(plan.moves, [], "{plan:?}");
        assert!(matches!(plan.status, Status::Balanced { .. }), "{plan:?}");
        // An idle direct-return peer takes them, and the near one none.
        let idle_direct = peer(4, 0.0, 1);
        let plan = plan_for(&[near, idle_relay, idle_direct]);
        assert!(!plan.moves.is_empty(), "{plan:?}");
        assert!(ids(&plan).iter().all(|&(_, p)| p == 4), "{plan:?}");
        let infinite = Peer {
            load: NodeLoad {
                capacity: f64::INFINITY,
                ..node(0.0)
            },
            ..peer(5, 0.0, 1)
        };
        let plan = plan_for(&[near, infinite]);
        assert_eq!(plan.moves, [], "{plan:?}");
    }

    #[test]
    fn ranks_by_class_then_benefit_then_age() {
        let candidates = [
            cand(1, 0.10, 60, Priority::Interactive),
            cand(2, 0.05, 60, Priority::Normal),
            cand(3, 0.05, 600, Priority::Normal),
            cand(4, 0.02, 600, Priority::Background),
            cand(5, 0.20, 1, Priority::Normal), // young: benefit 0.2 × 1 s < 0.05 × 5 s (less the 0.001 cost each)
            cand(6, 0.30, 0, Priority::Background), // just accepted: no benefit, never moved
        ];
        let peers = [peer(7, 0.0, 1)];
        let input = input(1.2, &peers, &candidates);
        let mut p = planner(Policy::Predictive);
        let mut config = *p.config();
        config.max_moves = 10;
        p.config = config;
        let plan = p.plan(T0, &input);
        // Shed from 1.2 to 0.75: 4 (0.02), 3 (0.05, older), 2 (0.05), 5 (0.2), 1 (0.1) = 0.42 → 0.78,
        // then nothing else is left.
        assert_eq!(ids(&plan), [(4, 7), (3, 7), (2, 7), (5, 7), (1, 7)]);
        let Status::Shedding { from, to } = plan.status else {
            panic!("{:?}", plan.status)
        };
        assert_eq!(from, 1.2);
        assert!((to - 0.78).abs() < 1e-9);
        let reason = plan.moves[0].reason.to_string();
        assert_eq!(
            reason,
            "predicted utilisation 1.20 above threshold 0.85; connection load 0.020, 0.000 left \
             here direct return (age 600 s, move cost 0.001 load-s); target at 0.02 after the \
             move, rtt 1 ms"
        );
    }

    #[test]
    fn target_has_room_lowest_load_lower_rtt_within_tolerance() {
        let candidates = [cand(1, 0.1, 60, Priority::Normal)];
        let run = |peers: &[Peer]| {
            let input = input(0.9, peers, &candidates);
            ids(&planner(Policy::Predictive).plan(T0, &input))
        };
        // 2 is least loaded; 3 is within 0.05 of it and nearer.
        assert_eq!(
            run(&[peer(1, 0.5, 1), peer(2, 0.30, 9), peer(3, 0.34, 2)]),
            [(1, 3)]
        );
        // 3 is now 0.06 above 2: the least loaded wins despite its RTT.
        assert_eq!(run(&[peer(2, 0.30, 9), peer(3, 0.36, 2)]), [(1, 2)]);
        // No room at 0.75 after the move anywhere.
        assert_eq!(run(&[peer(2, 0.66, 1)]), []);
    }

    /// A move relieves this node of a connection's load less what forwarding its packets
    /// leaves here: direct-return peers are preferred, shedding counts only the relief, and a
    /// move that would leave as much as it takes is not made.
    #[test]
    fn a_move_counts_only_the_load_it_takes_off_and_prefers_direct_return() {
        let residual = Residual {
            relay: 0.6,
            direct: 0.1,
        };
        let candidates: Vec<_> = (0..10)
            .map(|i| Candidate {
                residual,
                ..cand(i, 0.1, 60, Priority::Normal)
            })
            .collect();
        let relay = |id, load| Peer {
            return_path: ReturnPath::Relay,
            ..peer(id, load, 1)
        };
        let run = |peers: &[Peer]| {
            let mut p = planner(Policy::Predictive);
            p.config.max_moves = 10;
            p.plan(T0, &input(0.95, peers, &candidates))
        };
        // The relaying peer is idle, the direct one busier: the direct one takes the moves. From
        // 0.95 to 0.75 takes 0.2 of relief, 0.09 a move: three moves (0.95 − 0.27 = 0.68).
        let plan = run(&[relay(1, 0.0), peer(2, 0.3, 5)]);
        assert_eq!(ids(&plan), [(0, 2), (1, 2), (2, 2)]);
        let Status::Shedding { to, .. } = plan.status else {
            panic!("{:?}", plan.status)
        };
        assert!((to - 0.68).abs() < 1e-9, "{to}");
        let r = &plan.moves[0].reason;
        assert_eq!(r.return_path, ReturnPath::Direct);
        assert!((r.left - 0.01).abs() < 1e-12, "{}", r.left);
        assert!(
            r.to_string().contains("0.010 left here direct return"),
            "{r}"
        );
        // Once the direct peer is full (0.75 after the move at most: one move from 0.6), the
        // relaying one takes the rest, 0.04 of relief a move: 0.86, 0.82, 0.78, 0.74.
        let plan = run(&[relay(1, 0.0), peer(2, 0.6, 5)]);
        assert_eq!(ids(&plan), [(0, 2), (1, 1), (2, 1), (3, 1)]);
        let Status::Shedding { to, .. } = plan.status else {
            panic!("{:?}", plan.status)
        };
        assert!((to - (0.95 - 0.09 - 3.0 * 0.04)).abs() < 1e-9, "{to}");
        // Relaying alone takes five moves (0.2 of relief) where three do with direct return.
        let plan = run(&[relay(1, 0.0)]);
        assert_eq!(plan.moves.len(), 5, "{plan:?}");
        assert!(plan.moves.iter().all(|m| m.target == NodeId(1)));
        // Relaying costs more than serving: no move relieves anything, none is planned.
        let costly: Vec<_> = candidates
            .iter()
            .map(|c| Candidate {
                residual: Residual {
                    relay: 1.3,
                    direct: 0.1,
                },
                ..*c
            })
            .collect();
        let mut p = planner(Policy::Predictive);
        let plan = p.plan(
            T0,
            &PlanInput {
                local: node(0.95),
                threshold: 0.85,
                peers: &[relay(1, 0.0)],
                candidates: &costly,
                imbalance_threshold: 0.3,
            },
        );
        assert_eq!(plan.moves, []);
        assert_eq!(plan.status, Status::NoTarget { utilisation: 0.95 });
        // A hostile share (NaN) counts as leaving everything.
        assert_eq!(
            Residual {
                relay: f64::NAN,
                direct: -1.0
            }
            .share(ReturnPath::Relay),
            1.0
        );
    }

    #[test]
    fn hysteresis_and_reactive_baseline() {
        let candidates: Vec<_> = (0..10)
            .map(|i| cand(i, 0.05, 60, Priority::Normal))
            .collect();
        let peers = [peer(9, 0.0, 1)];
        let mut input = PlanInput {
            local: NodeLoad {
                current: 0.8,
                predicted: 0.95,
                capacity: 1.0,
            },
            threshold: 0.85,
            peers: &peers,
            candidates: &candidates,
            imbalance_threshold: 0.3,
        };
        // Predictive sees 0.95 coming and sheds 0.2 to reach 0.75 (max_moves 4 × 0.05).
        let plan = planner(Policy::Predictive).plan(T0, &input);
        assert_eq!(plan.moves.len(), 4);
        // Reactive sees 0.8 now: nothing.
        let plan = planner(Policy::Reactive).plan(T0, &input);
        assert!(
            matches!(plan.status, Status::Balanced { .. }),
            "{:?}",
            plan.status
        );
        // Between the goal and the threshold: nothing either.
        input.local.predicted = 0.8;
        let plan = planner(Policy::Predictive).plan(T0, &input);
        assert_eq!(plan.moves, []);
        assert_eq!(
            planner(Policy::Manual).plan(T0, &input).status,
            Status::Manual
        );
    }

    #[test]
    fn replan_interval_and_move_cap() {
        let candidates: Vec<_> = (0..20)
            .map(|i| cand(i, 0.05, 60, Priority::Normal))
            .collect();
        let peers = [peer(9, 0.0, 1)];
        let input = input(1.5, &peers, &candidates);
        let mut p = planner(Policy::Reactive);
        assert_eq!(p.plan(T0, &input).moves.len(), 4);
        let early = T0 + Duration::from_millis(999);
        assert_eq!(
            p.plan(early, &input).status,
            Status::NotDue {
                next: T0 + Duration::from_secs(1)
            }
        );
        assert_eq!(p.plan(T0 + Duration::from_secs(1), &input).moves.len(), 4);
    }

    /// Two nodes take turns being hot. Without a cooldown the same connections go back and
    /// forth; with it no connection moves twice.
    #[test]
    fn no_ping_pong() {
        let run = |cooldown: Duration| {
            let config = PlanConfig {
                cooldown,
                ..PlanConfig::default()
            };
            let mut planners = [
                Planner::new(config, Duration::from_secs(5)),
                Planner::new(config, Duration::from_secs(5)),
            ];
            // (conn, node, last moved)
            let mut conns: Vec<(ConnId, usize, Option<Instant>)> =
                (0..20).map(|i| (i, (i % 2) as usize, None)).collect();
            let mut moved = vec![0u32; conns.len()];
            for round in 0..20u64 {
                let now = T0 + Duration::from_secs(round);
                for (n, planner) in planners.iter_mut().enumerate() {
                    // Other traffic (0.5) makes node `round % 2` hot.
                    let load_of = |k: usize, c: &[(ConnId, usize, Option<Instant>)]| {
                        c.iter().filter(|x| x.1 == k).count() as f64 * 0.04
                            + if round % 2 == k as u64 { 0.5 } else { 0.0 }
                    };
                    let candidates: Vec<_> = conns
                        .iter()
                        .filter(|x| x.1 == n)
                        .map(|x| Candidate {
                            last_moved: x.2,
                            ..cand(x.0, 0.04, 60, Priority::Normal)
                        })
                        .collect();
                    let peers = [peer(1 - n as u32, load_of(1 - n, &conns), 1)];
                    let local = node(load_of(n, &conns));
                    let input = PlanInput {
                        local,
                        threshold: 0.85,
                        peers: &peers,
                        candidates: &candidates,
                        imbalance_threshold: 0.3,
                    };
                    for m in planner.plan(now, &input).moves {
                        let c = &mut conns[m.conn as usize];
                        c.1 = m.target.0 as usize;
                        c.2 = Some(now);
                        moved[m.conn as usize] += 1;
                    }
                }
            }
            moved.into_iter().max().unwrap_or(0)
        };
        assert!(
            run(Duration::ZERO) > 1,
            "the scenario does ping-pong without a cooldown"
        );
        assert_eq!(run(Duration::from_secs(30)), 1);
    }
}
