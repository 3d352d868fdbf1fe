//! The predictor as a node runs it: one [`NodePredictor`] ties the sampler, the forecasters,
//! the detector and the planner together, and remembers its decisions and their outcomes.
//!
//! The node's driver thread calls [`NodePredictor::handle_sample`] every
//! [`super::PredictConfig::interval`] with `now`, the node's figures, every connection's
//! cumulative counters and the peers' last load reports. When the planner runs (at most once
//! per `replan_interval`) the plan comes back; the driver executes its moves when
//! [`NodePredictor::executes`] says so (policy `reactive` or `predictive`) and reports each
//! outcome with [`NodePredictor::record`]. With policy `manual` the plan is still computed as
//! the predictive policy would make it, and shown, but nothing moves by itself.
//!
//! **Load.** The planner weighs node and connections in one unit, the node's capacity, chosen
//! by [`LoadMetric`]:
//!
//! - [`LoadMetric::Cpu`]: the node's load is the workers' busy fraction (as the workers
//!   measure it); a connection's share of it is the share of the node's bandwidth it carried
//!   over the interval. A peer's load is the CPU busy fraction of its load report.
//! - [`LoadMetric::Connections`]: every connection served here weighs 1; a peer's load is the
//!   connection count of its load report.
//! - [`LoadMetric::Bandwidth`]: a connection weighs its bytes/s both ways; a peer's load is
//!   the bytes/s of its load report.
//!
//! Peers are assumed to have this node's capacity (a load report carries no capacity).
//!
//! **Leases.** A connection this node moved by plan is an [`Offload`]: its lease at the
//! holder is renewed through this node's load reports ([`NodePredictor::renewals`]) while
//! taking it back would push this node above its shedding level (threshold − hysteresis,
//! by the larger of its current and predicted load), and at least for the planner's
//! `cooldown` after the move; once there is room, this node stops
//! renewing, the lease runs out and the holder hands the connection back. As a holder, the
//! node grants a lease on a connection restored here when its primary first asks for one
//! ([`NodePredictor::handle_renewals`]), renews it on every later report, and reports each
//! expiry ([`NodePredictor::poll_lease`]); the driver moves the connection back and reports
//! the outcome ([`NodePredictor::record_return`]). A connection is never dropped because of
//! a lease: one that cannot go back stays.
//!
//! **Stale reports.** A peer's report rides its heartbeats and is up to a couple of seconds
//! old. After a move the peer's load is taken as at least what it was reported at plus the
//! load moved to it, for [`NodeSettings::report_delay`], so the next plan does not fill a
//! peer whose report has not caught up yet ([`PeerFloors`]; the simulator does the same).

use std::collections::{BTreeMap, VecDeque};

use smoltcp::time::{Duration, Instant};

use super::class::{Class, ClassConfig, Segments};
use super::detect::{Detector, Imbalance, imbalance};
use super::forecast::{ForecastConfig, Forecaster, ModelChoice};
use super::lease::{Lease, LeaseCounters, LeaseEvent, Leases, Offload};
use super::plan::{
    Candidate, NodeLoad, Peer, PeerFloors, Plan, PlanInput, Planner, Policy, Reason, Residual,
    ReturnPath, Status,
};
use super::profile::{ConnCounters, ConnProfile, ConnRates, ConnReport, NodeReport, Sampler};
use super::shadow::{ConnState, ShadowTrial, TrialEvent, TrialState};
use super::{ConnId, NodeId, PredictConfig, secs};

/// Maps and sets keyed by connection and node ids, which this node or its authenticated peers
/// assign (no client chooses them): FxHash, not SipHash, which was a fifth of a sample's cost
/// at 100,000 connections (`benches/predict.rs`).
type HashMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;
type HashSet<K> = std::collections::HashSet<K, rustc_hash::FxBuildHasher>;

/// What a node's load is measured in (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMetric {
    /// Bytes/s both ways.
    Bandwidth,
    /// Connections served here.
    Connections,
    /// The workers' busy fraction.
    #[default]
    Cpu,
}

impl LoadMetric {
    /// The name used in config files and output.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadMetric::Bandwidth => "bandwidth",
            LoadMetric::Connections => "connections",
            LoadMetric::Cpu => "cpu",
        }
    }
}

/// How a node runs the predictor, beyond [`PredictConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeSettings {
    /// What the node does with plans. [`Policy::Manual`] plans as [`Policy::Predictive`]
    /// would, and executes nothing.
    pub policy: Policy,
    /// What load is measured in.
    pub metric: LoadMetric,
    /// The node's capacity in the metric's unit (1.0 for CPU: all workers busy). Must be
    /// finite and positive.
    pub capacity: f64,
    /// How long a move's load is added to its target's reported load. Default 3 s.
    pub report_delay: Duration,
    /// Decisions kept for display. Default 64.
    pub history: usize,
    /// Connections with a forecaster of their own (those with the highest load); the others
    /// are weighed by their current load. Bounds the predictor's memory and work per sample
    /// (a forecaster keeps about 2 KB). Default 1,024.
    pub max_tracked: usize,
    /// Shadow trials: a fraction of new connections goes to each peer not yet trusted
    /// (only when the policy executes). Default off.
    pub shadow: bool,
    /// Worker threads, over which the `cpu` metric's busy fraction is averaged: what turns the
    /// CPU seconds of forwarding a moved connection into load ([`Residual`]). Default 1.
    pub workers: usize,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            policy: Policy::Manual,
            metric: LoadMetric::Cpu,
            capacity: 1.0,
            report_delay: Duration::from_secs(3),
            history: 64,
            max_tracked: 1024,
            shadow: false,
            workers: 1,
        }
    }
}

/// One connection as the node samples it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnSample {
    /// Its counters, accept time and priority.
    pub report: ConnReport,
    /// Served by this node's stack (not moved away).
    pub here: bool,
    /// Served here, in a TCP state that moves, and its packets enter here: a candidate.
    pub movable: bool,
    /// Bytes a move would copy now (send and receive queues).
    pub buffered: u64,
    /// For a connection restored here whose packets enter at another node (its primary):
    /// that node and the connection's id there.
    pub ingress: Option<(NodeId, ConnId)>,
}

/// A peer's last load report, as the tunnel knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerSample {
    /// The peer.
    pub id: NodeId,
    /// Its tunnel is alive; a dead peer is never a target.
    pub alive: bool,
    /// Its report's CPU busy fraction.
    pub cpu_busy: f64,
    /// Its report's connection count.
    pub connections: u64,
    /// Its report's bytes/s both ways.
    pub bandwidth: f64,
    /// Its own forecast of its peak CPU busy fraction and connections over its horizon, when
    /// its report carries one (the `forecast` extension).
    pub forecast: Option<(f64, u64)>,
    /// Round-trip time to it.
    pub rtt: Duration,
    /// How a connection moved to it returns its replies (the `[[peer]]`'s `direct_return`).
    pub return_path: ReturnPath,
}

/// What the node saw this interval.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The node's own figures.
    pub node: NodeReport,
    /// Every connection.
    pub conns: &'a [ConnSample],
    /// Every peer with a load report.
    pub peers: &'a [PeerSample],
}

/// What became of a planned move.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The move failed as a whole (the tunnel or the peer did not answer).
    Failed(String),
    /// The connection lives on the target now.
    Moved,
    /// Not executed: the policy is manual.
    NotExecuted,
    /// Planned; the driver has not reported yet.
    Pending,
    /// The target or the source kept it here, for the reason given.
    Stayed(String),
}

/// A planned move and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// When it was planned.
    pub at: Instant,
    /// The connection.
    pub conn: ConnId,
    /// Where to.
    pub target: NodeId,
    /// Why.
    pub reason: Reason,
    /// Its outcome.
    pub outcome: Outcome,
    /// The node's current utilisation when it was planned (for [`Policy::Predictive`] the
    /// reason's utilisation is the predicted one).
    pub current: f64,
}

/// A connection that changed class (see [`super::class`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassChange {
    /// The connection.
    pub conn: ConnId,
    /// Its class before.
    pub from: Class,
    /// Its class now.
    pub to: Class,
    /// The bandwidth (bytes/s both ways) that moved it: its forecast bandwidth's recent peak
    /// (see [`CLASS_DECAY`]).
    pub bandwidth: f64,
}

/// An expired lease and what became of its connection.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRecord {
    /// When the lease expired.
    pub at: Instant,
    /// The connection, by its id here.
    pub conn: ConnId,
    /// Its primary.
    pub primary: NodeId,
    /// [`Outcome::Moved`]: back at its primary; [`Outcome::Stayed`] or [`Outcome::Failed`]:
    /// kept here, for the reason given; [`Outcome::Pending`]: the move back is under way.
    pub outcome: Outcome,
}

/// Counts since the node started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Samples taken.
    pub samples: u64,
    /// Plans made.
    pub plans: u64,
    /// Moves planned (also under the manual policy).
    pub planned: u64,
    /// Moves executed: the connection moved.
    pub executed: u64,
    /// Moves that did not happen: the connection stayed, or the move failed.
    pub failed: u64,
    /// New connections moved to a peer under a shadow trial.
    pub shadowed: u64,
    /// Shadow moves that did not happen.
    pub shadow_failed: u64,
}

/// A peer's load as the last plan saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerView {
    /// The peer.
    pub id: NodeId,
    /// Its load in the metric's unit, with the moves its report does not show yet.
    pub load: f64,
    /// Its utilisation (load / capacity).
    pub utilisation: f64,
    /// Its predicted load (its own forecast, in the metric's unit), or `load` without one.
    pub predicted: f64,
    /// Round-trip time.
    pub rtt: Duration,
    /// Alive.
    pub alive: bool,
    /// How a connection moved to it returns its replies.
    pub return_path: ReturnPath,
}

/// Where the predictor stands, for `ctl plan`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Estimate {
    /// When it was last sampled.
    pub at: Option<Instant>,
    /// The node's load over the last interval, in the metric's unit.
    pub load: f64,
    /// Its utilisation.
    pub utilisation: f64,
    /// The predicted peak utilisation over the horizon.
    pub predicted: f64,
    /// What of it the planner counts: `predicted` less `detect.confidence` times the
    /// forecasts' RMSE at the horizon, never below `utilisation`.
    pub confident: f64,
    /// The RMSE of the node's forecasts at the horizon, once one was scored.
    pub horizon_rmse: Option<f64>,
    /// The model of the node's forecast.
    pub model: Option<ModelChoice>,
    /// That model's recent MAPE.
    pub mape: Option<f64>,
    /// The learned threshold.
    pub threshold: f64,
    /// The highest utilisation sampled so far.
    pub peak_utilisation: f64,
    /// The workers' busy fraction.
    pub cpu_busy: f64,
    /// The data path's CPU-time fraction, when known ([`NodeReport::cpu_time`]).
    pub cpu_time: Option<f64>,
    /// Connections served here.
    pub connections: u64,
    /// Candidates (connections that may move).
    pub candidates: usize,
    /// Connections served here with segment statistics (those that sent bytes here).
    pub segment_conns: usize,
    /// Their segments in all.
    pub segments: usize,
    /// The peers.
    pub peers: Vec<PeerView>,
    /// Imbalance across the group, if any.
    pub imbalance: Option<Imbalance>,
}

/// How long after a shadowed connection is gone from here its KPIs are still awaited from
/// the peer that served it (its end reaches this node with the peer's next load reports,
/// a second or two later).
pub const KPI_WAIT: Duration = Duration::from_secs(60);

/// Connections whose segment statistics the load reports carry: the hottest of those that
/// moved bytes here ([`NodePredictor::hottest`]).
pub const HOT_CONNS: usize = 4;

/// The time constant over which a connection's class bandwidth falls (it rises at once): a
/// connection is classed by its recent peak, so a bursty one (a rate-limited download whose
/// 100-ms samples swing tenfold) keeps its class, and one that goes quiet keeps its
/// allocation for a second or two.
pub const CLASS_DECAY: Duration = Duration::from_secs(1);

/// The bandwidth a connection is classed on this sample: `now` (its forecast bandwidth) if
/// that is higher than the last (`None`: its first classing), otherwise the last decayed
/// towards `now` by `decay` (`exp(−interval / CLASS_DECAY)`).
fn class_bandwidth(last: Option<f64>, now: f64, decay: f64) -> f64 {
    if !now.is_finite() {
        return last.unwrap_or(0.0);
    }
    match last {
        Some(last) if last > now => now + (last - now) * decay,
        _ => now,
    }
}

/// A connection's segments are maintained (idle ones merged) every this many samples.
const MAINTAIN_EVERY: u64 = 10;

/// A connection of the last sample, as [`NodePredictor`] remembers it.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The number of the sample that reported it ([`Counts::samples`]; 0: none).
    sample: u64,
    /// Movable, by its last report in that sample.
    movable: bool,
    /// Served here, by any of its reports in that sample.
    here: bool,
    /// Its age, by its last report in that sample as not served here, if any.
    away: Option<Duration>,
    /// Its class (see [`super::class`]), meaningful only while it is served here: every
    /// sample classifies the connections served here, and keeps a class for the next only
    /// of a connection served here.
    class: Option<Class>,
    /// The bandwidth its class is judged on: its forecast bandwidth when that rises, decaying
    /// towards it with [`CLASS_DECAY`] when it falls (see [`class_bandwidth`]).
    class_bandwidth: f64,
    /// Its segment statistics, kept like its class only while it is served here, and only
    /// once it sent bytes here (most connections of a large node are idle: they cost no
    /// allocation).
    stream: Option<Box<Stream>>,
}

/// What a connection served here sent to its client: the segment statistics of that stream
/// (the node's download direction, the one that loads it: its send buffers, its pacing,
/// what a move copies), and the counters they were fed up to.
#[derive(Debug, Clone)]
struct Stream {
    /// Bytes sent, by its counters at the last sample that reported it here (the stream
    /// offset the next sample's bytes start at: offsets count from its accept, or from its
    /// restore for a connection restored here).
    sent: u64,
    /// Packets sent, likewise.
    packets: u64,
    /// Its segments.
    segments: Segments,
}

impl Stream {
    /// Feeds the counters of a report of the connection served here. Counters that went
    /// backwards start a new stream (the id was reused) on the sample's first report of
    /// it (`first`), and are ignored on a repeat.
    fn feed(
        stream: &mut Option<Box<Stream>>,
        config: &ClassConfig,
        now: Instant,
        counters: &ConnCounters,
        first: bool,
    ) {
        let (mut sent, mut packets) = stream.as_ref().map_or((0, 0), |s| (s.sent, s.packets));
        let out = counters.bytes_out;
        if out < sent {
            if !first {
                return;
            }
            *stream = None;
            (sent, packets) = (0, 0);
        }
        if out == sent {
            return;
        }
        let s = stream.get_or_insert_with(|| {
            Box::new(Stream {
                sent: 0,
                packets: 0,
                segments: Segments::new(config, now),
            })
        });
        let delta = counters.packets_out.saturating_sub(packets);
        s.segments.record_packets(now, sent, out - sent, delta);
        s.sent = out;
        s.packets = counters.packets_out.max(packets);
    }
}

/// Buffers of one sample kept for the next, which clears and refills them instead of
/// allocating its own (at 100,000 connections, several MB per sample).
#[derive(Debug, Default)]
struct Scratch {
    /// The connections served here, by their index in the sample, with their load.
    loads: Vec<(usize, f64)>,
    /// With more of them than are tracked: each one's load, whether it is untracked so far,
    /// and its id, to pick those to track.
    order: Vec<(f64, bool, ConnId)>,
    /// The connections to track, when not all of those served here.
    tracked: HashSet<ConnId>,
    /// The planner's candidates.
    candidates: Vec<Candidate>,
    /// The connections restored here (by their id here), when leases are held.
    restored: HashSet<ConnId>,
    /// The hottest connections with segment statistics so far: forecast bandwidth and id,
    /// at most [`HOT_CONNS`], in no order.
    hot: Vec<(f64, ConnId)>,
}

/// The predictor of one node (see the module doc).
#[derive(Debug)]
pub struct NodePredictor {
    config: PredictConfig,
    settings: NodeSettings,
    sampler: Sampler,
    node: Forecaster,
    conns: HashMap<ConnId, Forecaster>,
    /// The per-connection forecasters' settings: the node's without a season (a season of an
    /// hour at 100 ms is 36,000 values per forecaster, times `max_tracked`).
    conn_forecast: ForecastConfig,
    detector: Detector,
    planner: Planner,
    last_moved: HashMap<ConnId, Instant>,
    shifting: HashSet<ConnId>,
    /// Every connection of the last sample, with the class of those served here. A sample
    /// updates it in place: it stamps the connections it reports with its number, and
    /// forgets the others only when there are any (the map holds more connections than it
    /// stamped).
    known: HashMap<ConnId, Seen>,
    /// Per peer: its load is at least this until then (moves its report does not show yet).
    floors: PeerFloors,
    estimate: Estimate,
    last_plan: Option<(Instant, Plan)>,
    decisions: VecDeque<Decision>,
    counts: Counts,
    /// Leases held here on connections offloaded to this node.
    leases: Leases,
    /// Connections restored here by their primary and id there, from the last sample.
    ingress: HashMap<(NodeId, ConnId), ConnId>,
    /// Expired leases and their outcome, oldest first.
    lease_log: VecDeque<LeaseRecord>,
    /// Connections this node offloaded by plan, by their id here.
    offloads: BTreeMap<ConnId, Offload>,
    /// Where the next report's renewals start when there are more than fit.
    renew_cursor: usize,
    /// Shadow trials, per peer.
    trials: BTreeMap<NodeId, ShadowTrial>,
    /// New connections already offered to a trial (admitted or not).
    offered: HashSet<ConnId>,
    /// Connections sent (or being sent) to a peer under a shadow trial: the peer, and
    /// whether the move is done.
    shadowing: HashMap<ConnId, (NodeId, bool)>,
    /// Shadowed connections by their peer and id there, whose KPIs that peer will report:
    /// the connection's id here, and since when it is gone from here (its KPIs are awaited
    /// [`KPI_WAIT`] longer).
    shadow_remote: HashMap<(NodeId, ConnId), (ConnId, Option<Instant>)>,
    /// KPI samples taken: (local, from peers).
    kpis_taken: (u64, u64),
    /// Shadow moves for the driver, since it last took them.
    shadow_moves: Vec<(ConnId, NodeId)>,
    /// Trial events for the driver to log, since it last took them.
    trial_events: Vec<(NodeId, TrialEvent)>,
    /// The next untrusted peer to offer a new connection to (round robin).
    shadow_cursor: usize,
    /// The alive peers on trial as of the last sample, at a step that diverts (not backing
    /// off): new connections are offered to them at their accept ([`Self::admit_at_accept`]).
    on_trial: Vec<NodeId>,
    /// Connections offered at their accept that no sample has seen yet (a worker may answer
    /// a sample, then accept): their `offered` and `shadowing` entries are kept for up to
    /// this many samples that miss them.
    accepted: HashMap<ConnId, u8>,
    /// Class changes for the driver to log, since it last took them.
    class_changes: Vec<ClassChange>,
    /// The last sample's hottest connections with segment statistics, hottest first (see
    /// [`Self::hottest`]).
    hottest: Vec<ConnId>,
    /// Buffers reused from sample to sample.
    scratch: Scratch,
}

impl NodePredictor {
    /// A predictor with no history. `config` should have passed [`PredictConfig::validate`];
    /// its `plan.policy` is replaced by `settings.policy` (predictive for manual).
    pub fn new(config: PredictConfig, settings: NodeSettings) -> Self {
        let mut plan = config.plan;
        plan.policy = match settings.policy {
            Policy::Manual => Policy::Predictive,
            p => p,
        };
        Self {
            sampler: Sampler::new(config.interval),
            node: Forecaster::new(config.forecast),
            conns: HashMap::default(),
            conn_forecast: ForecastConfig {
                season: 0,
                ..config.forecast
            },
            detector: Detector::new(config.detect),
            planner: Planner::new(plan, config.detect.horizon),
            last_moved: HashMap::default(),
            shifting: HashSet::default(),
            known: HashMap::default(),
            floors: PeerFloors::default(),
            estimate: Estimate::default(),
            last_plan: None,
            decisions: VecDeque::new(),
            counts: Counts::default(),
            leases: Leases::new(config.lease),
            ingress: HashMap::default(),
            lease_log: VecDeque::new(),
            offloads: BTreeMap::new(),
            renew_cursor: 0,
            trials: BTreeMap::new(),
            offered: HashSet::default(),
            shadowing: HashMap::default(),
            shadow_remote: HashMap::default(),
            kpis_taken: (0, 0),
            shadow_moves: Vec::new(),
            trial_events: Vec::new(),
            shadow_cursor: 0,
            on_trial: Vec::new(),
            accepted: HashMap::default(),
            class_changes: Vec::new(),
            hottest: Vec::new(),
            scratch: Scratch::default(),
            config,
            settings,
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// Its predictor settings.
    pub fn config(&self) -> &PredictConfig {
        &self.config
    }

    /// What of a connection's `load` (now, in CPU time: see [`Self::cpu_time_share`]) a move
    /// would leave here, by return path: under the `cpu` metric, the data path's time (workers
    /// and tunnel thread) to forward its packets. Relayed: all its bytes both ways (`rates`'
    /// bandwidth) at [`super::plan::PlanConfig::relay_cpu_s_per_gb`]. Returned directly: the
    /// client's bytes at that rate, and the ACKs of the bytes the target sends at
    /// [`super::plan::PlanConfig::direct_cpu_s_per_gb`]. The other metrics do not count a
    /// forwarded connection (neither its bytes nor itself): a move takes its whole load.
    fn residual(&self, load: f64, rates: &ConnRates) -> Residual {
        if self.settings.metric != LoadMetric::Cpu {
            return Residual::default();
        }
        let cores = self.settings.workers.max(1) as f64;
        let plan = &self.config.plan;
        let share = |cpu_s: f64| {
            let left = cpu_s / cores;
            match left {
                l if l <= 0.0 => 0.0,
                l if load > 0.0 => l / load,
                _ => 1.0,
            }
        };
        let gb = |bytes: f64| bytes.max(0.0) / 1e9;
        Residual {
            relay: share(plan.relay_cpu_s_per_gb * gb(rates.bandwidth())),
            direct: share(
                plan.relay_cpu_s_per_gb * gb(rates.bytes_in)
                    + plan.direct_cpu_s_per_gb * gb(rates.bytes_out),
            ),
        }
    }

    /// The part of the workers' busy time that was CPU time (`cpu_time / cpu_busy`), by which
    /// a connection's load becomes CPU time before it is weighed against
    /// `relay_cpu_s_per_gb`, a CPU-time figure. Busy time also counts the waits for a CPU
    /// that other processes hold: on a crowded machine (8 downloads, their clients and
    /// verifiers on 2 vCPUs) the workers were busy 1.25 s per GB served while running about
    /// a third of that, which made relaying a bulk download look cheaper than serving it.
    /// 1 when CPU time is not known; never above 1 (what a thread runs is within its busy
    /// time, up to the instants the two clocks are read).
    fn cpu_time_share(node: &NodeReport) -> f64 {
        match node.cpu_time {
            Some(t) if node.cpu_busy > 0.0 => (t / node.cpu_busy).clamp(0.0, 1.0),
            _ => 1.0,
        }
    }

    /// The driver executes plans (policy reactive or predictive).
    pub fn executes(&self) -> bool {
        self.settings.policy != Policy::Manual
    }

    /// When the next sample is due (`None`: now).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sampler.poll_timeout()
    }

    /// Takes the sample of `now`. Returns the plan when the planner ran (its moves are to be
    /// executed when [`Self::executes`]); `None` when it was not due, or the sample was not
    /// later than the last.
    pub fn handle_sample(&mut self, now: Instant, obs: &Observation<'_>) -> Option<Plan> {
        let interval = self
            .sampler
            .sample(now, obs.node, obs.conns.iter().map(|c| c.report))?;
        self.counts.samples += 1;
        let forgotten = self.update_known(now, obs, &interval.conns);
        let mut scratch = std::mem::take(&mut self.scratch);
        let capacity = self.settings.capacity;
        let bandwidth_of = |i: usize| interval.conns.get(i).map_or(0.0, |p| p.rates.bandwidth());
        let here_bandwidth: f64 = obs
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.here)
            .map(|(i, _)| bandwidth_of(i))
            .sum();
        let connections = obs.conns.iter().filter(|c| c.here).count() as u64;
        let load = match self.settings.metric {
            LoadMetric::Cpu => interval.node.cpu_busy,
            LoadMetric::Connections => connections as f64,
            LoadMetric::Bandwidth => here_bandwidth,
        };
        let conn_load = |i: usize| match self.settings.metric {
            LoadMetric::Cpu if here_bandwidth > 0.0 => load * bandwidth_of(i) / here_bandwidth,
            LoadMetric::Cpu => 0.0,
            LoadMetric::Connections => 1.0,
            LoadMetric::Bandwidth => bandwidth_of(i),
        };
        let utilisation = load / capacity;
        self.node.observe(utilisation);
        self.detector.observe(utilisation);
        let horizon = self.config.horizon_samples();
        let forecast = self.node.peak(horizon);
        let predicted = forecast.map_or(utilisation, |f| f.value);
        // What of it the planner counts (`detect.confidence`), and the forecast to score.
        let confident = self.detector.confident(predicted, utilisation);
        if let Some(f) = self.node.forecast(horizon) {
            self.detector.forecast_made(f.value, horizon);
        }

        // Per-connection forecasts, for at most `max_tracked` connections: those with the
        // highest load (those already tracked first among equals, then the lowest id). The
        // others are weighed by their current load.
        let loads = &mut scratch.loads;
        loads.clear();
        loads.extend(
            obs.conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.here)
                .map(|(i, _)| {
                    let l = conn_load(i);
                    (i, if l.is_finite() { l.max(0.0) } else { 0.0 })
                }),
        );
        let max_tracked = self.settings.max_tracked;
        // When they fit, every connection served here is tracked; otherwise those in
        // `scratch.tracked`.
        let all_tracked = loads.len() <= max_tracked;
        let tracked = &mut scratch.tracked;
        tracked.clear();
        if !all_tracked {
            // The order's key is computed once per connection, not per comparison.
            let order = &mut scratch.order;
            order.clear();
            order.extend(loads.iter().map(|&(i, l)| {
                let id = obs.conns[i].report.conn;
                (l, !self.conns.contains_key(&id), id)
            }));
            if max_tracked > 0 {
                order.select_nth_unstable_by(max_tracked - 1, |a, b| {
                    b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)))
                });
            }
            tracked.extend(order.iter().take(max_tracked).map(|&(_, _, id)| id));
        }
        let known = &self.known;
        self.conns.retain(|id, _| {
            if all_tracked {
                known.get(id).is_some_and(|s| s.here)
            } else {
                tracked.contains(id)
            }
        });
        self.admit_shadow(now, obs, &interval.conns);
        // Candidates are only built when the planner is due.
        let due = self.planner.poll_timeout().is_none_or(|t| now >= t);
        let candidates = &mut scratch.candidates;
        candidates.clear();
        let hot = &mut scratch.hot;
        hot.clear();
        let (mut segment_conns, mut segments) = (0, 0);
        let decay = (-secs(self.config.interval) / secs(CLASS_DECAY)).exp();
        let mut candidate_count = 0;
        let cpu_time_share = Self::cpu_time_share(&interval.node);
        for &(i, current) in &scratch.loads {
            let c = &obs.conns[i];
            let id = c.report.conn;
            let f = if all_tracked || scratch.tracked.contains(&id) {
                let f = self
                    .conns
                    .entry(id)
                    .or_insert_with(|| Forecaster::new(self.conn_forecast));
                f.observe(current);
                Some(&*f)
            } else {
                None
            };
            // Its class, from its forecast bandwidth: its bandwidth now, scaled by what its
            // load forecast expects of its load (the forecasters forecast load in the
            // metric's unit, not bandwidth).
            let bandwidth = interval.conns.get(i).map_or(0.0, |p| p.rates.bandwidth());
            let predicted = f.and_then(|f| f.peak(horizon)).map(|f| f.value);
            let forecast_bandwidth = match predicted {
                Some(p) if current > 0.0 && p.is_finite() => bandwidth * p / current,
                _ => bandwidth,
            };
            // Every connection of the sample is known (`update_known`).
            let seen = self.known.entry(id).or_default();
            if let Some(stream) = &mut seen.stream {
                // Idle segments merge after seconds (`class.idle`): looking every tenth
                // sample, each connection in its turn, is soon enough.
                if id
                    .wrapping_add(self.counts.samples)
                    .is_multiple_of(MAINTAIN_EVERY)
                {
                    stream.segments.maintain(now);
                }
                segment_conns += 1;
                segments += stream.segments.segments().len();
                let heat = if forecast_bandwidth.is_finite() {
                    forecast_bandwidth.max(0.0)
                } else {
                    0.0
                };
                offer_hot(hot, heat, id);
            }
            seen.class_bandwidth = class_bandwidth(
                seen.class.map(|_| seen.class_bandwidth),
                forecast_bandwidth,
                decay,
            );
            let slot = &mut seen.class;
            let before = *slot;
            let class = self.config.class.classify(before, seen.class_bandwidth);
            if let Some(from) = before
                && from != class
                && self.class_changes.len() < 4096
            {
                self.class_changes.push(ClassChange {
                    conn: id,
                    from,
                    to: class,
                    bandwidth: seen.class_bandwidth,
                });
            }
            *slot = Some(class);
            if !c.movable || self.shifting.contains(&id) || self.shadowing.contains_key(&id) {
                continue;
            }
            candidate_count += 1;
            if !due {
                continue;
            }
            let profile = interval.conns.get(i);
            let rates = profile.map(|p| p.rates).unwrap_or_default();
            candidates.push(Candidate {
                conn: id,
                current,
                predicted: f.and_then(|f| f.peak(horizon)).map_or(current, |f| f.value),
                age: profile.map_or(Duration::ZERO, |p| p.age),
                bandwidth: rates.bandwidth(),
                buffered: c.buffered,
                priority: c.report.priority,
                last_moved: self.last_moved.get(&id).copied(),
                residual: self.residual(current * cpu_time_share, &rates),
            });
        }
        hot.sort_unstable_by(hotter);
        self.hottest.clear();
        self.hottest.extend(hot.iter().map(|&(_, id)| id));
        // Forget what is kept of connections gone: `known` holds this sample's connections
        // (`update_known`). `self.conns` holds tracked connections only, all in the sample.
        let known = &self.known;
        self.last_moved.retain(|id, _| known.contains_key(id));
        self.shifting.retain(|id| known.contains_key(id));
        self.accepted.retain(|id, left| {
            *left = left.saturating_sub(1);
            !known.contains_key(id) && *left > 0
        });
        let accepted = &self.accepted;
        // Only connections of the last sample or of this one were offered (or, at their
        // accept, since this one was taken): with none of the last one gone, none is to
        // forget.
        if forgotten {
            self.offered
                .retain(|id| known.contains_key(id) || accepted.contains_key(id));
        }
        // A shadowed connection is shadowing while it lives on the peer, or the move is
        // under way.
        self.shadowing.retain(|id, (_, moved)| {
            accepted.contains_key(id) || known.get(id).is_some_and(|s| !(*moved && s.here))
        });
        self.shadow_remote.retain(|_, (id, gone)| {
            if known.get(id).is_some_and(|s| !s.here) {
                *gone = None;
                return true;
            }
            let since = *gone.get_or_insert(now);
            now - since < KPI_WAIT
        });
        // Leases live while their connection is here; offloads while it is away.
        self.ingress.clear();
        self.ingress.extend(
            obs.conns
                .iter()
                .filter(|c| c.here)
                .filter_map(|c| c.ingress.map(|i| (i, c.report.conn))),
        );
        if !self.leases.is_empty() {
            let restored = &mut scratch.restored;
            restored.clear();
            restored.extend(self.ingress.values().copied());
            self.leases.retain(|id| restored.contains(&id));
        }
        self.offloads
            .retain(|id, o| match known.get(id).and_then(|s| s.away) {
                Some(age) => {
                    o.age = age;
                    true
                }
                None => false,
            });
        self.sampler.recycle(interval.conns);
        self.floors.expire(now);

        let peers: Vec<PeerView> = obs
            .peers
            .iter()
            .map(|p| {
                let reported = match self.settings.metric {
                    LoadMetric::Cpu => p.cpu_busy,
                    LoadMetric::Connections => p.connections as f64,
                    LoadMetric::Bandwidth => p.bandwidth,
                };
                let reported = if reported.is_finite() {
                    reported.max(0.0)
                } else {
                    0.0
                };
                let load = self.floors.load(p.id, reported);
                let forecast = match (self.settings.metric, p.forecast) {
                    (LoadMetric::Cpu, Some((cpu, _))) => Some(cpu),
                    (LoadMetric::Connections, Some((_, conns))) => Some(conns as f64),
                    _ => None,
                };
                let predicted = forecast
                    .filter(|f| f.is_finite())
                    .map_or(load, |f| f.max(load));
                PeerView {
                    id: p.id,
                    load,
                    utilisation: load / capacity,
                    predicted,
                    rtt: p.rtt,
                    alive: p.alive,
                    return_path: p.return_path,
                }
            })
            .collect();
        let mut group: Vec<(NodeId, f64)> = vec![(NodeId(u32::MAX), utilisation)];
        group.extend(
            peers
                .iter()
                .filter(|p| p.alive)
                .map(|p| (p.id, p.utilisation)),
        );
        self.estimate = Estimate {
            at: Some(now),
            load,
            utilisation,
            predicted,
            confident,
            horizon_rmse: self.detector.horizon_rmse(),
            model: forecast.map(|f| f.model),
            mape: forecast.and_then(|f| f.mape),
            threshold: self.detector.threshold(),
            peak_utilisation: self.estimate.peak_utilisation.max(utilisation),
            cpu_busy: interval.node.cpu_busy,
            cpu_time: interval.node.cpu_time,
            connections,
            candidates: candidate_count,
            segment_conns,
            segments,
            imbalance: imbalance(&group, self.config.detect.imbalance_threshold),
            peers,
        };

        self.update_renewals(now, load, predicted * capacity);

        let plan_peers: Vec<Peer> = self
            .estimate
            .peers
            .iter()
            .filter(|p| p.alive && self.trusts(p.id))
            .map(|p| Peer {
                id: p.id,
                load: NodeLoad {
                    current: p.load,
                    predicted: p.predicted,
                    capacity,
                },
                rtt: p.rtt,
                return_path: p.return_path,
            })
            .collect();
        let input = PlanInput {
            local: NodeLoad {
                current: load,
                predicted: confident * capacity,
                capacity,
            },
            threshold: self.estimate.threshold,
            peers: &plan_peers,
            candidates: &scratch.candidates,
            imbalance_threshold: self.config.detect.imbalance_threshold,
        };
        let plan = self.planner.plan(now, &input);
        self.scratch = scratch;
        if matches!(plan.status, Status::NotDue { .. }) {
            return None;
        }
        self.counts.plans += 1;
        self.counts.planned += plan.moves.len() as u64;
        let executes = self.executes();
        for m in &plan.moves {
            if executes {
                self.shifting.insert(m.conn);
            }
            self.push_decision(Decision {
                at: now,
                conn: m.conn,
                target: m.target,
                reason: m.reason,
                outcome: if executes {
                    Outcome::Pending
                } else {
                    Outcome::NotExecuted
                },
                current: utilisation,
            });
        }
        self.last_plan = Some((now, plan.clone()));
        Some(plan)
    }

    /// Stamps the sample's connections in `known` with its number (what they are this
    /// sample: see [`Seen`]) and forgets the others. Returns whether a connection of the
    /// last sample is gone.
    fn update_known(
        &mut self,
        now: Instant,
        obs: &Observation<'_>,
        profiles: &[ConnProfile],
    ) -> bool {
        let sample = self.counts.samples;
        let mut reported = 0;
        for (i, c) in obs.conns.iter().enumerate() {
            let s = self.known.entry(c.report.conn).or_default();
            let first = s.sample != sample;
            if first {
                // Its first report in this sample. It keeps its class and its segment
                // statistics if it was served here in the last sample (the only one `known`
                // holds).
                let here = s.here;
                *s = Seen {
                    sample,
                    class: s.class.filter(|_| here),
                    class_bandwidth: s.class_bandwidth,
                    stream: s.stream.take().filter(|_| here),
                    ..Seen::default()
                };
                reported += 1;
            }
            s.movable = c.movable;
            if c.here {
                s.here = true;
                Stream::feed(
                    &mut s.stream,
                    &self.config.class,
                    now,
                    &c.report.counters,
                    first,
                );
            } else {
                s.away = Some(profiles.get(i).map_or(Duration::ZERO, |p| p.age));
            }
        }
        let forgotten = self.known.len() > reported;
        if forgotten {
            self.known.retain(|_, s| s.sample == sample);
        }
        forgotten
    }

    /// Shadow trials: every new connection (movable, at most a second old, not offered
    /// before) is offered to the next peer not yet trusted (round robin over the alive
    /// peers), whose trial admits the step's fraction of them; and every trial is polled.
    fn admit_shadow(
        &mut self,
        now: Instant,
        obs: &Observation<'_>,
        profiles: &[super::profile::ConnProfile],
    ) {
        self.on_trial.clear();
        if !(self.settings.shadow && self.executes()) {
            return;
        }
        let config = self.config.shadow;
        for p in obs.peers.iter().filter(|p| p.alive) {
            self.trials
                .entry(p.id)
                .or_insert_with(|| ShadowTrial::new(p.id, config));
        }
        for (id, trial) in &mut self.trials {
            if let Some(e) = trial.poll(now) {
                self.trial_events.push((*id, e));
            }
        }
        let untrusted: Vec<NodeId> = obs
            .peers
            .iter()
            .filter(|p| p.alive)
            .map(|p| p.id)
            .filter(|id| {
                self.trials
                    .get(id)
                    .is_some_and(|t| !matches!(t.state(), TrialState::Trusted))
            })
            .collect();
        if untrusted.is_empty() {
            return;
        }
        let trials = &self.trials;
        self.on_trial.extend(
            untrusted
                .iter()
                .filter(|id| trials.get(id).is_some_and(|t| t.fraction() > 0.0)),
        );
        // Connections not offered at their accept (accepted before a trial began, by SYN
        // cookie, or while the node had no trial): offered now, after it.
        for (i, c) in obs.conns.iter().enumerate() {
            let id = c.report.conn;
            let young = profiles
                .get(i)
                .is_some_and(|p| p.age <= Duration::from_secs(1));
            if !(c.here && c.movable && young) || self.offered.contains(&id) {
                continue;
            }
            self.offered.insert(id);
            let peer = untrusted[self.shadow_cursor % untrusted.len()];
            self.shadow_cursor = self.shadow_cursor.wrapping_add(1);
            if let Some(trial) = self.trials.get_mut(&peer)
                && trial.admit()
            {
                self.shadowing.insert(id, (peer, false));
                self.shadow_moves.push((id, peer));
            }
        }
    }

    /// Whether new connections are to be offered to a shadow trial at their accept (a trial
    /// is under way with an alive peer, as of the last sample): the workers then hold each
    /// one before its app sees a byte and ask [`Self::admit_at_accept`].
    pub fn diverts_at_accept(&self) -> bool {
        !self.on_trial.is_empty()
    }

    /// Offers connection `conn`, just accepted and held, to the next peer on trial (round
    /// robin): `Some(peer)` when that peer's trial admits it — it is then `shadowing`, and
    /// its move is among [`Self::take_shadow_moves`] — else `None` (it is served here and
    /// never offered again).
    pub fn admit_at_accept(&mut self, conn: ConnId) -> Option<NodeId> {
        if self.on_trial.is_empty() || !self.offered.insert(conn) {
            return None;
        }
        // Kept until a sample has seen it (at most two that miss it: then it is gone).
        self.accepted.insert(conn, 3);
        let peer = self.on_trial[self.shadow_cursor % self.on_trial.len()];
        self.shadow_cursor = self.shadow_cursor.wrapping_add(1);
        let trial = self.trials.get_mut(&peer)?;
        if !trial.admit() {
            return None;
        }
        self.shadowing.insert(conn, (peer, false));
        self.shadow_moves.push((conn, peer));
        Some(peer)
    }

    /// The shadow moves to execute (new connections admitted by a trial, with their peer),
    /// since the last call. Report each outcome with [`Self::record_shadow`].
    pub fn take_shadow_moves(&mut self) -> Vec<(ConnId, NodeId)> {
        std::mem::take(&mut self.shadow_moves)
    }

    /// Trial events since the last call (steps passed or failed, back-offs ended), to log.
    pub fn take_trial_events(&mut self) -> Vec<(NodeId, TrialEvent)> {
        std::mem::take(&mut self.trial_events)
    }

    /// Records what became of a shadow move: moved (to connection `remote` at the peer,
    /// when the peer said), the connection is `shadowing` while it lives on the peer and
    /// its KPIs are awaited from the peer; otherwise it is served here as any other.
    pub fn record_shadow(&mut self, conn: ConnId, outcome: &Outcome, remote: Option<ConnId>) {
        if *outcome == Outcome::Moved {
            self.counts.shadowed += 1;
            if let Some(s) = self.shadowing.get_mut(&conn) {
                s.1 = true;
                if let Some(remote) = remote {
                    self.shadow_remote.insert((s.0, remote), (conn, None));
                }
            }
        } else {
            self.counts.shadow_failed += 1;
            self.shadowing.remove(&conn);
        }
    }

    /// The hottest connections served here at the last sample among those that sent bytes
    /// here, hottest first, with their segment statistics: at most [`HOT_CONNS`], by their
    /// forecast bandwidth (that of their class; the lower id first among equals). What the
    /// node's load reports carry.
    pub fn hottest(&self) -> impl Iterator<Item = (ConnId, &Segments)> {
        self.hottest
            .iter()
            .filter_map(|id| Some((*id, &self.known.get(id)?.stream.as_ref()?.segments)))
    }

    /// A connection's segment statistics: what it sent to its client while served here
    /// (none before it sent a byte here).
    pub fn segments(&self, conn: ConnId) -> Option<&Segments> {
        let seen = self.known.get(&conn).filter(|s| s.here)?;
        Some(&seen.stream.as_ref()?.segments)
    }

    /// A connection's class, while it is served here.
    pub fn class(&self, conn: ConnId) -> Option<Class> {
        self.known
            .get(&conn)
            .filter(|s| s.here)
            .and_then(|s| s.class)
    }

    /// Every connection served here with its class (as of the last sample).
    pub fn classes(&self) -> impl Iterator<Item = (ConnId, Class)> + '_ {
        self.known
            .iter()
            .filter(|(_, s)| s.here)
            .filter_map(|(id, s)| s.class.map(|c| (*id, c)))
    }

    /// Connections served here per class, micro to large.
    pub fn class_counts(&self) -> [u64; 4] {
        let mut n = [0u64; 4];
        for c in self
            .known
            .values()
            .filter(|s| s.here)
            .filter_map(|s| s.class)
        {
            n[c as usize] += 1;
        }
        n
    }

    /// Class changes since the last call (at most 4,096 kept), to log.
    pub fn take_class_changes(&mut self) -> Vec<ClassChange> {
        std::mem::take(&mut self.class_changes)
    }

    /// A KPI sample of a connection that ended: its processing latency (any unit, the same
    /// on every node) and whether it ended in an error or a reset. `served_by`: `None` for a
    /// connection served here — a sample of the local baseline of every trial under way —,
    /// `Some(peer)` for one a trial shadowed to `peer`, as the peer reported it (a sample
    /// for that peer's trial only, and only for a connection this node shadowed there).
    /// Returns whether a trial took it. The daemon does not call this yet: no node measures
    /// these KPIs (`docs/prediction.md`, Shadow trials in the node).
    pub fn record_kpi(
        &mut self,
        conn: ConnId,
        served_by: Option<NodeId>,
        latency: Option<f64>,
        error: bool,
    ) -> bool {
        let latency = latency.unwrap_or(f64::NAN);
        match served_by {
            None => {
                let mut took = false;
                for t in self.trials.values_mut() {
                    if matches!(t.state(), TrialState::Ramping { .. }) {
                        t.record_local(latency, error);
                        took = true;
                    }
                }
                self.kpis_taken.0 += u64::from(took);
                took
            }
            Some(peer) => {
                let shadowed = self.shadowing.get(&conn).is_some_and(|(p, _)| *p == peer)
                    || self
                        .shadow_remote
                        .iter()
                        .any(|((p, _), (c, _))| *p == peer && *c == conn);
                if !shadowed {
                    return false;
                }
                let took = self.trials.get_mut(&peer).is_some_and(|t| {
                    t.record_peer(latency, error);
                    true
                });
                self.kpis_taken.1 += u64::from(took);
                took
            }
        }
    }

    /// The KPIs `peer` reported for connections that ended there, each by its id *there*
    /// with its latency (if it had one) and whether it ended in an error: those this node
    /// shadowed to `peer` go to that peer's trial, each once. Returns how many were taken.
    pub fn record_peer_kpis(
        &mut self,
        peer: NodeId,
        kpis: &[(ConnId, Option<f64>, bool)],
    ) -> usize {
        let mut taken = 0;
        for &(remote, latency, error) in kpis {
            let Some((conn, _)) = self.shadow_remote.remove(&(peer, remote)) else {
                continue;
            };
            if let Some(t) = self.trials.get_mut(&peer) {
                t.record_peer(latency.unwrap_or(f64::NAN), error);
                taken += 1;
            }
            // Ended at the peer: no longer shadowing.
            self.shadowing.remove(&conn);
        }
        self.kpis_taken.1 += taken as u64;
        taken
    }

    /// KPI samples the trials took so far: (served here, reported by peers).
    pub fn kpis_taken(&self) -> (u64, u64) {
        self.kpis_taken
    }

    /// Whether the planner may shift connections to `peer`: with shadow trials on (and a
    /// policy that executes), only once its trial trusts it.
    pub fn trusts(&self, peer: NodeId) -> bool {
        !(self.settings.shadow && self.executes())
            || self
                .trials
                .get(&peer)
                .is_some_and(|t| t.state() == TrialState::Trusted)
    }

    /// The shadow trials, by peer.
    pub fn trials(&self) -> impl Iterator<Item = &ShadowTrial> {
        self.trials.values()
    }

    /// Which offloaded connections keep their lease: taking one back must leave this node at
    /// or below its shedding level (threshold − hysteresis) by the larger of its current and
    /// predicted load; the oldest offloads come back first. Like any move, a connection is
    /// not taken back before the planner's `cooldown` since it moved: right after a move the
    /// forecast sees the drop the move made, not the load that caused it. With `rebalance`,
    /// taking one back must also leave this node within half the imbalance threshold of every
    /// alive peer (its holder counted without it), or rebalancing would hand it, or another,
    /// over again at the next plan.
    fn update_renewals(&mut self, now: Instant, load: f64, predicted: f64) {
        let cooldown = self.config.plan.cooldown;
        let threshold = match self.settings.policy {
            Policy::Reactive => self.config.plan.reactive_threshold,
            Policy::Manual | Policy::Predictive => self.estimate.threshold,
        };
        let level = (threshold - self.config.plan.hysteresis) * self.settings.capacity;
        let mut room = level - load.max(predicted);
        if !room.is_finite() {
            room = 0.0;
        }
        // Rebalancing: a connection comes back only if that leaves this node within half the
        // imbalance threshold of every alive peer (the holder counted after the return), where
        // rebalancing stops; else the next plan would hand it, or another, over again.
        let capacity = self.settings.capacity;
        let even = (self.config.plan.rebalance && capacity > 0.0)
            .then_some(self.config.detect.imbalance_threshold / 2.0);
        let mut here = load.max(predicted);
        let mut others: BTreeMap<NodeId, f64> = self
            .estimate
            .peers
            .iter()
            .filter(|p| p.alive && p.load.is_finite())
            .map(|p| (p.id, p.load))
            .collect();
        let mut order: Vec<&mut Offload> = self.offloads.values_mut().collect();
        order.sort_by_key(|o| (o.since, o.conn));
        for o in order {
            let holder = others.get(&o.holder).copied();
            let load = if o.load.is_finite() {
                // Its load when it moved; no more than its holder carries now.
                o.load
                    .max(0.0)
                    .min(holder.unwrap_or(f64::INFINITY).max(0.0))
            } else {
                0.0
            };
            let evens_out = even.is_none_or(|half| {
                let lowest = others
                    .iter()
                    .map(|(id, l)| if *id == o.holder { l - load } else { *l })
                    .fold(f64::INFINITY, f64::min);
                !lowest.is_finite() || ((here + load) - lowest) / capacity <= half
            });
            if now < o.since + cooldown {
                o.renew = true;
            } else if load <= room && evens_out {
                room -= load;
                here += load;
                if let Some(h) = others.get_mut(&o.holder) {
                    *h -= load;
                }
                o.renew = false;
            } else {
                o.renew = true;
            }
        }
    }

    fn push_decision(&mut self, d: Decision) {
        while self.decisions.len() >= self.settings.history.max(1) {
            self.decisions.pop_front();
        }
        self.decisions.push_back(d);
    }

    /// Records what became of the planned move of `conn` to `target`: its decision gets the
    /// outcome, the connection is not moved again before the cooldown (also when it stayed:
    /// it is not retried at once), and a move's load counts on the target until its reports
    /// catch up.
    pub fn record(&mut self, now: Instant, conn: ConnId, target: NodeId, outcome: Outcome) {
        self.shifting.remove(&conn);
        self.last_moved.insert(conn, now);
        let load = self
            .decisions
            .iter()
            .rev()
            .find(|d| d.conn == conn && d.target == target && d.outcome == Outcome::Pending)
            .map(|d| d.reason.conn_load);
        match &outcome {
            Outcome::Moved => {
                self.counts.executed += 1;
                let reported = self
                    .estimate
                    .peers
                    .iter()
                    .find(|p| p.id == target)
                    .map_or(0.0, |p| p.load);
                self.floors.moved(
                    now,
                    self.settings.report_delay,
                    target,
                    reported,
                    load.unwrap_or(0.0),
                );
            }
            Outcome::Failed(_) | Outcome::Stayed(_) => self.counts.failed += 1,
            Outcome::NotExecuted | Outcome::Pending => {}
        }
        if let Some(d) = self
            .decisions
            .iter_mut()
            .rev()
            .find(|d| d.conn == conn && d.target == target && d.outcome == Outcome::Pending)
        {
            d.outcome = outcome;
        }
    }

    /// Records that the planned move of `conn` to `holder` made it connection `remote` there:
    /// from now on this node renews its lease at `holder` while it has no room to take it
    /// back. Call after [`Self::record`] with [`Outcome::Moved`].
    pub fn record_offload(&mut self, now: Instant, conn: ConnId, holder: NodeId, remote: ConnId) {
        let capacity = self.settings.capacity;
        let load = self
            .decisions
            .iter()
            .rev()
            .find(|d| d.conn == conn && d.target == holder)
            .map_or(0.0, |d| d.reason.conn_load);
        let horizon = self.config.horizon_samples();
        let rate = self
            .conns
            .get(&conn)
            .and_then(|f| f.peak(horizon))
            .filter(|f| !matches!(f.model, ModelChoice::LastValue(_)))
            .map(|f| f.value / capacity)
            .filter(|r| r.is_finite());
        self.offloads.insert(
            conn,
            Offload {
                conn,
                holder,
                remote,
                since: now,
                load,
                rate,
                age: Duration::ZERO,
                renew: true,
            },
        );
    }

    /// The lease renewals for this node's next load report: its offloaded connections that
    /// keep their lease (by their id here, with their predicted volume in seconds of
    /// capacity), at most `max`; with more, successive calls rotate through them.
    pub fn renewals(&mut self, max: usize) -> Vec<(ConnId, Option<f64>)> {
        let all: Vec<(ConnId, Option<f64>)> = self
            .offloads
            .values()
            .filter(|o| o.renew)
            .map(|o| (o.conn, o.volume()))
            .collect();
        if all.len() <= max {
            self.renew_cursor = 0;
            return all;
        }
        let start = self.renew_cursor % all.len();
        self.renew_cursor = start + max;
        all.iter().cycle().skip(start).take(max).copied().collect()
    }

    /// Takes the lease renewals of a load report from `primary`, received at `received`: a
    /// listed connection restored here from `primary` gets a lease if it has none (returned,
    /// for the log) or has it renewed. Ids that name no such connection are ignored.
    pub fn handle_renewals(
        &mut self,
        primary: NodeId,
        received: Instant,
        renewals: &[(ConnId, Option<f64>)],
    ) -> Vec<Lease> {
        let mut granted = Vec::new();
        for &(remote, volume) in renewals {
            let Some(&conn) = self.ingress.get(&(primary, remote)) else {
                continue;
            };
            if self.leases.renew(received, conn, volume).is_none() {
                granted.push(self.leases.grant(received, conn, primary, volume));
            }
        }
        granted
    }

    /// When the next lease expires.
    pub fn poll_lease_timeout(&self) -> Option<Instant> {
        self.leases.poll_timeout()
    }

    /// The next lease expired by `now` (earliest first), removed and counted: the driver
    /// moves its connection back to its primary and reports with [`Self::record_return`].
    pub fn poll_lease(&mut self, now: Instant) -> Option<LeaseEvent> {
        let event = self.leases.poll_event(now)?;
        let LeaseEvent::Expired { conn, primary, at } = event;
        while self.lease_log.len() >= self.settings.history.max(1) {
            self.lease_log.pop_front();
        }
        self.lease_log.push_back(LeaseRecord {
            at,
            conn,
            primary,
            outcome: Outcome::Pending,
        });
        Some(event)
    }

    /// Records what became of the connection of an expired lease: [`Outcome::Moved`] (back at
    /// its primary) or kept here ([`Outcome::Stayed`], [`Outcome::Failed`]).
    pub fn record_return(&mut self, conn: ConnId, outcome: Outcome) {
        self.leases.record_return(outcome == Outcome::Moved);
        if let Some(r) = self
            .lease_log
            .iter_mut()
            .rev()
            .find(|r| r.conn == conn && r.outcome == Outcome::Pending)
        {
            r.outcome = outcome;
        }
    }

    /// The lease held here on `conn`.
    pub fn lease(&self, conn: ConnId) -> Option<&Lease> {
        self.leases.lease(conn)
    }

    /// The leases held here, by connection id.
    pub fn leases(&self) -> Vec<Lease> {
        let mut all: Vec<Lease> = self.leases.iter().copied().collect();
        all.sort_by_key(|l| l.conn);
        all
    }

    /// Lease counts since the start.
    pub fn lease_counters(&self) -> LeaseCounters {
        self.leases.counters()
    }

    /// Expired leases and their outcome, oldest first.
    pub fn lease_log(&self) -> impl Iterator<Item = &LeaseRecord> {
        self.lease_log.iter()
    }

    /// This node's offload of `conn`, if it moved it by plan and it is still away.
    pub fn offload(&self, conn: ConnId) -> Option<&Offload> {
        self.offloads.get(&conn)
    }

    /// Every offload, by connection id.
    pub fn offloads(&self) -> impl Iterator<Item = &Offload> {
        self.offloads.values()
    }

    /// A connection's state: shadowing while it is sent to, or lives on, a peer under a
    /// shadow trial; shifting while a planned move is under way, active while it may be
    /// moved, inactive otherwise (moved away, closing, or not seen).
    pub fn conn_state(&self, conn: ConnId) -> ConnState {
        if self.shadowing.contains_key(&conn) {
            ConnState::Shadowing
        } else if self.shifting.contains(&conn) {
            ConnState::Shifting
        } else if self.known.get(&conn).is_some_and(|s| s.movable) {
            ConnState::Active
        } else {
            ConnState::Inactive
        }
    }

    /// Where the predictor stood at the last sample.
    pub fn estimate(&self) -> &Estimate {
        &self.estimate
    }

    /// The last plan made, and when.
    pub fn last_plan(&self) -> Option<&(Instant, Plan)> {
        self.last_plan.as_ref()
    }

    /// The last decisions, oldest first.
    pub fn decisions(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter()
    }

    /// Counts since the start.
    pub fn counts(&self) -> Counts {
        self.counts
    }
}

/// `a` is hotter than `b`: more forecast bandwidth, or as much and a lower id.
fn hotter(a: &(f64, ConnId), b: &(f64, ConnId)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Keeps `(heat, id)` in `hot` if it is among the [`HOT_CONNS`] hottest offered so far.
fn offer_hot(hot: &mut Vec<(f64, ConnId)>, heat: f64, id: ConnId) {
    let c = (heat, id);
    if hot.len() < HOT_CONNS {
        hot.push(c);
        return;
    }
    // The coldest kept: replaced by a hotter one.
    if let Some(coldest) = hot.iter_mut().max_by(|a, b| hotter(a, b))
        && hotter(&c, coldest).is_lt()
    {
        *coldest = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::Priority;
    use crate::predict::lease::LeaseBasis;
    use crate::predict::profile::ConnCounters;

    fn conn(id: ConnId, bytes_out: u64, opened_ms: i64) -> ConnSample {
        ConnSample {
            report: ConnReport {
                conn: id,
                counters: ConnCounters {
                    bytes_out,
                    ..ConnCounters::default()
                },
                opened_at: Instant::from_millis(opened_ms),
                priority: Priority::Normal,
            },
            here: true,
            movable: true,
            buffered: 0,
            ingress: None,
        }
    }

    /// One sample at `t` ms: `conns` and `peers`, an idle node.
    fn observe(p: &mut NodePredictor, conns: &[ConnSample], peers: &[PeerSample], t: i64) {
        p.handle_sample(
            Instant::from_millis(t),
            &Observation {
                node: NodeReport::default(),
                conns,
                peers,
            },
        );
    }

    fn peer(connections: u64) -> PeerSample {
        PeerSample {
            id: NodeId(1),
            alive: true,
            cpu_busy: 0.0,
            connections,
            bandwidth: 0.0,
            forecast: None,
            rtt: Duration::from_millis(1),
            return_path: ReturnPath::Relay,
        }
    }

    fn settings(policy: Policy) -> NodeSettings {
        NodeSettings {
            policy,
            metric: LoadMetric::Connections,
            capacity: 10.0,
            ..NodeSettings::default()
        }
    }

    /// One connection more every second (10 samples); returns the predictor and the number of
    /// connections when the first move was planned.
    fn ramp(policy: Policy, peer_conns: u64) -> (NodePredictor, Option<usize>) {
        ramp_with(settings(policy), peer_conns)
    }

    fn ramp_with(settings: NodeSettings, peer_conns: u64) -> (NodePredictor, Option<usize>) {
        let mut p = NodePredictor::new(PredictConfig::default(), settings);
        let mut conns = Vec::new();
        let mut first = None;
        for tick in 0..200i64 {
            let now = Instant::from_millis(tick * 100);
            if tick % 10 == 0 && conns.len() < 20 {
                conns.push(conn(conns.len() as u64 + 1, 0, tick * 100));
            }
            for c in &mut conns {
                c.report.counters.bytes_out += 1000;
            }
            let peers = [peer(peer_conns)];
            let obs = Observation {
                node: NodeReport::default(),
                conns: &conns,
                peers: &peers,
            };
            if let Some(plan) = p.handle_sample(now, &obs) {
                for m in &plan.moves {
                    first.get_or_insert(conns.iter().filter(|c| c.here).count());
                    if p.executes() {
                        let c = conns.iter_mut().find(|c| c.report.conn == m.conn).unwrap();
                        c.here = false;
                        c.movable = false;
                        p.record(now, m.conn, m.target, Outcome::Moved);
                    }
                }
            }
        }
        (p, first)
    }

    /// The last plan of a reactive node under the `cpu` metric (2 workers, capacity 1) that
    /// serves two downloads of `bytes_per_sample` each every 100 ms, its workers 95 % busy and
    /// running `cpu_time` of the wall clock, with `peers`.
    fn two_downloads(bytes_per_sample: u64, cpu_time: Option<f64>, peers: &[PeerSample]) -> Plan {
        let settings = NodeSettings {
            policy: Policy::Reactive,
            metric: LoadMetric::Cpu,
            capacity: 1.0,
            workers: 2,
            ..NodeSettings::default()
        };
        let mut p = NodePredictor::new(PredictConfig::default(), settings);
        let mut last = None;
        for s in 0..30u64 {
            let t = Instant::from_secs(60) + Duration::from_millis(s * 100);
            let bytes = s * bytes_per_sample;
            let conns = [conn(1, bytes, 0), conn(2, bytes, 0)];
            let obs = Observation {
                node: NodeReport {
                    cpu_busy: 0.95,
                    cpu_time,
                    ..NodeReport::default()
                },
                conns: &conns,
                peers,
            };
            if let Some(plan) = p.handle_sample(t, &obs)
                && s > 1
            {
                last = Some(plan);
            }
        }
        last.expect("a plan")
    }

    /// Under the `cpu` metric a move leaves the work of forwarding the connection's packets
    /// here. Two downloads at 4 GB/s each (400 MB a sample), each 0.475 of the node, that this
    /// node serves cheaply: relaying one would leave 2.36 here (1.18 s per GB, workers and
    /// tunnel thread, over 2 workers' cores), and even a direct-return peer would leave the
    /// forwarding of its client's ACKs, 0.86 (0.43 s per GB sent): neither relieves this node,
    /// so nothing moves and the plan says why. CPU time not known: busy time stands in.
    #[test]
    fn a_cheaply_served_bulk_download_is_moved_to_no_peer() {
        let relaying = PeerSample {
            cpu_busy: 0.1,
            ..peer(0)
        };
        let direct = PeerSample {
            id: NodeId(2),
            cpu_busy: 0.2,
            return_path: ReturnPath::Direct,
            ..peer(0)
        };
        for peers in [&[relaying][..], &[direct], &[relaying, direct]] {
            let plan = two_downloads(400_000_000, None, peers);
            assert_eq!(plan.moves, [], "{plan:?}");
            assert_eq!(plan.status, Status::NoTarget { utilisation: 0.95 });
        }
    }

    /// Downloads dearer to serve than to forward: the same 0.475 each at 1.5 GB/s (150 MB a
    /// sample). Relaying one would still leave more than it (0.89), returning it directly
    /// leaves the ACKs' 0.32: it moves, only to the direct-return peer, and the reason says
    /// what stays here.
    #[test]
    fn a_download_dearer_to_serve_than_to_forward_moves_only_to_a_direct_return_peer() {
        let relaying = PeerSample {
            cpu_busy: 0.1,
            ..peer(0)
        };
        let plan = two_downloads(150_000_000, None, &[relaying]);
        assert_eq!(plan.moves, [], "{plan:?}");
        let direct = PeerSample {
            id: NodeId(2),
            cpu_busy: 0.2,
            return_path: ReturnPath::Direct,
            ..peer(0)
        };
        let plan = two_downloads(150_000_000, None, &[relaying, direct]);
        assert!(!plan.moves.is_empty(), "{plan:?}");
        let left = 0.43 * 1.5 / 2.0;
        for m in &plan.moves {
            assert_eq!(m.target, NodeId(2));
            assert_eq!(m.reason.return_path, ReturnPath::Direct);
            assert!((m.reason.left - left).abs() < 1e-6, "{m:?}");
            assert!(m.reason.left < m.reason.conn_load, "{m:?}");
        }
        assert!(matches!(plan.status, Status::Shedding { .. }), "{plan:?}");
    }

    /// The same question on a crowded machine: two downloads at 200 MB/s each, the workers
    /// busy 95 % of the wall clock but running 10 % of it (waiting for the CPUs the rest).
    /// Weighed in busy time, serving costs 4.75 s per GB and relaying (1.18) looks cheaper:
    /// the relaying peer would get them and relieve nothing. Weighed in CPU time (0.5 s per
    /// GB), relaying costs more than serving, and nothing moves.
    #[test]
    fn a_relay_is_weighed_against_cpu_time_not_busy_time() {
        let relaying = [PeerSample {
            cpu_busy: 0.1,
            ..peer(0)
        }];
        let plan = two_downloads(20_000_000, Some(0.1), &relaying);
        assert_eq!(plan.moves, [], "{plan:?}");
        assert_eq!(plan.status, Status::NoTarget { utilisation: 0.95 });
        // Without CPU time the busy time stands in for it, and the relay looks cheap.
        let plan = two_downloads(20_000_000, None, &relaying);
        assert!(!plan.moves.is_empty(), "{plan:?}");
        assert!(
            plan.moves
                .iter()
                .all(|m| m.reason.left < m.reason.conn_load)
        );
    }

    #[test]
    fn predictive_moves_before_the_node_is_full_and_never_fills_it() {
        let (p, first) = ramp(Policy::Predictive, 0);
        let first = first.expect("a move");
        assert!(first < 9, "first move at {first} connections");
        assert!(p.estimate().peak_utilisation < 1.0, "{:?}", p.estimate());
        let c = p.counts();
        assert!(c.executed > 0 && c.executed == c.planned, "{c:?}");
        assert!(
            p.decisions().all(|d| d.outcome == Outcome::Moved),
            "{:?}",
            p.decisions().collect::<Vec<_>>()
        );
        // The peer is never filled above threshold − hysteresis by this node's own moves.
        let fill = 0.85 - 0.1;
        assert!(
            p.decisions()
                .all(|d| d.reason.target_utilisation <= fill + 1e-9)
        );
    }

    /// With shadow trials on, the planner shifts nothing to a peer its trial does not trust
    /// yet (the trial only diverts its fraction of new connections there).
    #[test]
    fn with_shadow_trials_the_planner_shifts_only_to_a_trusted_peer() {
        let (p, first) = ramp_with(
            NodeSettings {
                shadow: true,
                ..settings(Policy::Reactive)
            },
            0,
        );
        assert_eq!(first, None, "{:?}", p.last_plan());
        assert!(!p.trusts(NodeId(1)));
        assert!(matches!(
            p.last_plan().map(|(_, plan)| plan.status),
            Some(Status::NoTarget { .. })
        ));
        // The same ramp without trials moves.
        assert!(ramp(Policy::Reactive, 0).1.is_some());
    }

    #[test]
    fn reactive_moves_later_than_predictive() {
        let (_, predictive) = ramp(Policy::Predictive, 0);
        let (_, reactive) = ramp(Policy::Reactive, 0);
        assert!(predictive.unwrap() < reactive.unwrap());
    }

    #[test]
    fn manual_plans_but_executes_nothing() {
        let (p, first) = ramp(Policy::Manual, 0);
        assert!(first.is_some());
        assert!(!p.executes());
        let c = p.counts();
        assert!(c.planned > 0);
        assert_eq!((c.executed, c.failed), (0, 0));
        assert!(p.decisions().all(|d| d.outcome == Outcome::NotExecuted));
        assert_eq!(p.estimate().connections, 20);
        assert_eq!(p.conn_state(1), ConnState::Active);
        assert_eq!(p.conn_state(99), ConnState::Inactive);
    }

    #[test]
    fn a_full_peer_takes_nothing() {
        let (p, _) = ramp(Policy::Predictive, 10);
        assert_eq!(p.counts().planned, 0);
        assert!(matches!(
            p.last_plan().map(|(_, plan)| plan.status),
            Some(Status::NoTarget { .. })
        ));
    }

    #[test]
    fn a_move_counts_on_its_target_until_reports_catch_up() {
        let mut p = NodePredictor::new(PredictConfig::default(), settings(Policy::Predictive));
        let conns: Vec<ConnSample> = (1..=10).map(|i| conn(i, 0, 0)).collect();
        let peers = [peer(0)];
        let obs = Observation {
            node: NodeReport::default(),
            conns: &conns,
            peers: &peers,
        };
        let plan = p.handle_sample(Instant::from_secs(60), &obs).unwrap();
        // 10 of 10: shed to 0.85 − 0.1 of capacity, 7.5 connections.
        assert_eq!(plan.moves.len(), 3);
        assert_eq!(p.conn_state(plan.moves[0].conn), ConnState::Shifting);
        for m in &plan.moves {
            p.record(Instant::from_secs(60), m.conn, m.target, Outcome::Moved);
        }
        assert_eq!(p.conn_state(plan.moves[0].conn), ConnState::Active);
        p.record(
            Instant::from_secs(60),
            77,
            NodeId(1),
            Outcome::Stayed("no".into()),
        );
        assert_eq!(p.counts().failed, 1);
        // The peer still reports 0 connections; it counts 3 until the report delay passes.
        p.handle_sample(Instant::from_millis(60_100), &obs);
        assert_eq!(p.estimate().peers[0].load, 3.0);
        p.handle_sample(Instant::from_millis(63_100), &obs);
        assert_eq!(p.estimate().peers[0].load, 0.0);
    }

    #[test]
    fn a_peer_forecasting_a_rise_takes_less() {
        // The peer reports 0 connections now but forecasts 6: of the 3 moves it could take at
        // 0, only 1 fits under 0.75 of its capacity.
        let mut p = NodePredictor::new(PredictConfig::default(), settings(Policy::Predictive));
        let conns: Vec<ConnSample> = (1..=10).map(|i| conn(i, 0, 0)).collect();
        let peers = [PeerSample {
            forecast: Some((0.0, 6)),
            ..peer(0)
        }];
        let obs = Observation {
            node: NodeReport::default(),
            conns: &conns,
            peers: &peers,
        };
        let plan = p.handle_sample(Instant::from_secs(60), &obs).unwrap();
        assert_eq!(plan.moves.len(), 1, "{plan:?}");
        assert_eq!(p.estimate().peers[0].predicted, 6.0);
    }

    #[test]
    fn only_the_busiest_connections_get_a_forecaster() {
        let mut p = NodePredictor::new(
            PredictConfig::default(),
            NodeSettings {
                policy: Policy::Predictive,
                metric: LoadMetric::Bandwidth,
                capacity: 1e9,
                max_tracked: 2,
                ..NodeSettings::default()
            },
        );
        let mut conns: Vec<ConnSample> = (1..=5).map(|i| conn(i, 0, 0)).collect();
        for t in 1..=20i64 {
            for c in &mut conns {
                // Connection i sends i kB per interval.
                c.report.counters.bytes_out += c.report.conn * 1000;
            }
            let obs = Observation {
                node: NodeReport::default(),
                conns: &conns,
                peers: &[],
            };
            p.handle_sample(Instant::from_millis(t * 100), &obs);
        }
        let mut tracked: Vec<ConnId> = p.conns.keys().copied().collect();
        tracked.sort_unstable();
        assert_eq!(tracked, [4, 5]);
        assert_eq!(p.estimate().candidates, 5);
    }

    /// With `rebalance`, a node far under its threshold (6 connections of a capacity of 10)
    /// beside an empty peer hands it 3 (0.6 / 0.0 → 0.3 / 0.3), and keeps their leases
    /// renewed past the cooldown although it has room for them: taking one back would open
    /// the spread again (0.4 / 0.2), and it would be handed over again — connections would
    /// go back and forth. Once the peer is busier (8 connections), it lets them come back.
    #[test]
    fn rebalancing_hands_an_idle_peer_connections_and_does_not_take_them_back_at_once() {
        let mut config = PredictConfig::default();
        config.plan.rebalance = true;
        let mut a = NodePredictor::new(config, settings(Policy::Reactive));
        let mut conns: Vec<ConnSample> = (1..=6).map(|i| conn(i, 0, 0)).collect();
        let mut peer_conns = 0;
        let sample = |a: &mut NodePredictor, conns: &[ConnSample], peer_conns, t| {
            a.handle_sample(
                t,
                &Observation {
                    node: NodeReport::default(),
                    conns,
                    peers: &[peer(peer_conns)],
                },
            )
        };
        // Warm the forecasters up with nothing movable, then plan at 60 s.
        for c in &mut conns {
            c.movable = false;
        }
        for ms in (50_000..60_000).step_by(100) {
            sample(&mut a, &conns, peer_conns, Instant::from_millis(ms));
        }
        for c in &mut conns {
            c.movable = true;
        }
        let t0 = Instant::from_secs(60);
        let plan = sample(&mut a, &conns, peer_conns, t0).expect("a plan");
        assert_eq!(plan.moves.len(), 3, "{plan:?}");
        assert!(
            matches!(plan.status, Status::Rebalancing { .. }),
            "{plan:?}"
        );
        for (k, m) in plan.moves.iter().enumerate() {
            a.record(t0, m.conn, m.target, Outcome::Moved);
            a.record_offload(t0, m.conn, m.target, 100 + k as u64);
            let c = conns.iter_mut().find(|c| c.report.conn == m.conn).unwrap();
            c.here = false;
            c.movable = false;
        }
        peer_conns = 3;
        // 40 s, past the 30-s cooldown: nothing more moves, and all three stay renewed.
        for s in 1..=40u64 {
            let t = t0 + Duration::from_secs(s);
            if let Some(plan) = sample(&mut a, &conns, peer_conns, t) {
                assert_eq!(plan.moves, [], "{plan:?}");
            }
            assert_eq!(a.renewals(48).len(), 3, "at {s} s");
        }
        // The peer fills up (8), but a third node is idle: taking them back would leave this
        // node 0.3–0.6 above it, and rebalancing would send them out again. Renewed.
        let idle = PeerSample {
            id: NodeId(2),
            ..peer(0)
        };
        let third = |a: &mut NodePredictor, c: u64, t| {
            let peers = [
                peer(8),
                PeerSample {
                    connections: c,
                    ..idle
                },
            ];
            a.handle_sample(
                t,
                &Observation {
                    node: NodeReport::default(),
                    conns: &conns,
                    peers: &peers,
                },
            );
        };
        third(&mut a, 0, t0 + Duration::from_secs(41));
        assert_eq!(a.renewals(48).len(), 3, "an idle third node");
        // Both others busier: they come back.
        third(&mut a, 5, t0 + Duration::from_secs(42));
        assert_eq!(a.renewals(48), [], "the peers are busier now");
    }

    /// A (primary) offloads 3 of 10 connections to B, renews their leases while it is
    /// full, and lets them run out once it has room; B grants, renews, expires and records
    /// the returns, on virtual time.
    #[test]
    fn leases_are_granted_renewed_and_expire_once_the_primary_has_room() {
        let a_id = NodeId(7);
        let mut a = NodePredictor::new(PredictConfig::default(), settings(Policy::Predictive));
        let mut b = NodePredictor::new(PredictConfig::default(), settings(Policy::Manual));
        let mut a_conns: Vec<ConnSample> = (1..=10).map(|i| conn(i, 0, 0)).collect();
        let peers = [peer(0)];
        let sample_a = |a: &mut NodePredictor, conns: &[ConnSample], t: Instant| {
            a.handle_sample(
                t,
                &Observation {
                    node: NodeReport::default(),
                    conns,
                    peers: &peers,
                },
            )
        };
        // Warm the per-connection forecasters up (nothing may move yet), then plan at 60 s.
        for c in &mut a_conns {
            c.movable = false;
        }
        for ms in (50_000..60_000).step_by(100) {
            sample_a(&mut a, &a_conns, Instant::from_millis(ms));
        }
        for c in &mut a_conns {
            c.movable = true;
        }
        let t0 = Instant::from_secs(60);
        let plan = sample_a(&mut a, &a_conns, t0).expect("a plan");
        assert_eq!(plan.moves.len(), 3);
        let mut b_conns = Vec::new();
        for (k, m) in plan.moves.iter().enumerate() {
            a.record(t0, m.conn, m.target, Outcome::Moved);
            let remote = 100 + k as u64;
            a.record_offload(t0, m.conn, m.target, remote);
            let c = a_conns
                .iter_mut()
                .find(|c| c.report.conn == m.conn)
                .unwrap();
            c.here = false;
            c.movable = false;
            let mut restored = conn(remote, 0, 60_000);
            restored.movable = false;
            restored.ingress = Some((a_id, m.conn));
            b_conns.push(restored);
        }
        let moved: Vec<ConnId> = plan.moves.iter().map(|m| m.conn).collect();
        let sample_b = |b: &mut NodePredictor, conns: &[ConnSample], t: Instant| {
            b.handle_sample(
                t,
                &Observation {
                    node: NodeReport::default(),
                    conns,
                    peers: &[],
                },
            );
        };

        // One report a second while A holds 7 of 10 (room 0.5 below 0.75 of capacity): A
        // renews all three; B grants at the first report and renews after.
        let mut granted = Vec::new();
        for s in 0..10u64 {
            let t = t0 + Duration::from_millis(100 + s * 1000);
            sample_a(&mut a, &a_conns, t);
            sample_b(&mut b, &b_conns, t);
            let renewals = a.renewals(48);
            assert_eq!(renewals.len(), 3, "{renewals:?}");
            let (_, volume) = renewals[0];
            // 0.1 of capacity over the connection's life so far (60–69 s): 6–6.9 s of
            // capacity, a lease of 7.5–8.6 s at 0.8.
            let expected = t.total_millis() as f64 / 1e4;
            assert!((volume.unwrap() - expected).abs() < 0.05, "{volume:?}");
            granted.extend(b.handle_renewals(a_id, t, &renewals));
            assert_eq!(b.poll_lease(t), None);
        }
        assert_eq!(granted.len(), 3);
        assert!(granted.iter().all(|l| l.basis == LeaseBasis::Forecast));
        let lease = *b.lease(100).unwrap();
        assert_eq!(lease.primary, a_id);
        let length = lease.expires - lease.renewed;
        // The last renewal, at 69.1 s: 6.91 / 0.8.
        assert!((8_630..=8_645).contains(&length.total_millis()), "{length}");
        let c = b.lease_counters();
        assert_eq!((c.granted, c.renewed, c.expired), (3, 27, 0));
        assert!(
            moved
                .iter()
                .all(|id| a.offload(*id).is_some_and(|o| o.renew))
        );

        // Four of A's own connections close: A has room for all three and stops renewing.
        let mut kept_here = 0;
        a_conns.retain(|c| {
            kept_here += usize::from(c.here);
            !c.here || kept_here <= 3
        });
        let here = a_conns.iter().filter(|c| c.here).count();
        assert_eq!(here, 3, "{a_conns:?}");
        // It has room once its forecast has followed the drop (the predicted peak counts,
        // not only the current load), but takes nothing back within the cooldown (30 s)
        // after the move; then it stops renewing all three.
        for ms in (11_000..29_900).step_by(100) {
            sample_a(&mut a, &a_conns, t0 + Duration::from_millis(ms));
        }
        assert_eq!(a.renewals(48).len(), 3);
        for ms in (29_900..31_000).step_by(100) {
            sample_a(&mut a, &a_conns, t0 + Duration::from_millis(ms));
        }
        assert!(a.renewals(48).is_empty());
        assert!(
            moved
                .iter()
                .all(|id| a.offload(*id).is_some_and(|o| !o.renew))
        );
        // B's leases run out 8.6 s after the last renewal.
        let last = lease.renewed;
        assert_eq!(b.poll_lease_timeout(), Some(lease.expires));
        assert_eq!(b.poll_lease(last + Duration::from_secs(8)), None);
        let late = last + Duration::from_secs(9);
        let mut expired = Vec::new();
        while let Some(LeaseEvent::Expired { conn, primary, .. }) = b.poll_lease(late) {
            assert_eq!(primary, a_id);
            expired.push(conn);
        }
        expired.sort_unstable();
        assert_eq!(expired, [100, 101, 102]);
        b.record_return(100, Outcome::Moved);
        b.record_return(101, Outcome::Moved);
        b.record_return(102, Outcome::Stayed("the primary refused it".into()));
        let c = b.lease_counters();
        assert_eq!((c.expired, c.returned, c.kept), (3, 2, 1));
        let log: Vec<&LeaseRecord> = b.lease_log().collect();
        assert_eq!(log.len(), 3);
        assert_eq!(
            log[2].outcome,
            Outcome::Stayed("the primary refused it".into())
        );
        // The one kept stays here without a lease; a connection back home ends its offload.
        sample_b(&mut b, &b_conns[2..], late);
        assert!(b.leases().is_empty());
        for c in &mut a_conns {
            if c.report.conn == moved[0] {
                c.here = true;
            }
        }
        sample_a(&mut a, &a_conns, t0 + Duration::from_secs(32));
        assert!(a.offload(moved[0]).is_none());
        assert_eq!(a.offloads().count(), 2);
    }

    #[test]
    fn renewals_name_only_connections_restored_from_their_sender() {
        let mut b = NodePredictor::new(PredictConfig::default(), settings(Policy::Manual));
        let mut c = conn(5, 0, 0);
        c.movable = false;
        c.ingress = Some((NodeId(2), 50));
        let local = conn(6, 0, 0);
        let conns = [c, local];
        let t = Instant::from_secs(1);
        b.handle_sample(
            t,
            &Observation {
                node: NodeReport::default(),
                conns: &conns,
                peers: &[],
            },
        );
        // Another primary, an unknown id, a local connection's id: nothing.
        assert!(
            b.handle_renewals(NodeId(3), t, &[(50, Some(1.0))])
                .is_empty()
        );
        assert!(
            b.handle_renewals(NodeId(2), t, &[(51, Some(1.0)), (6, None)])
                .is_empty()
        );
        // Its primary, with a forecast that is not a number: the default lease.
        let g = b.handle_renewals(NodeId(2), t, &[(50, Some(f64::NAN)), (50, Some(-3.0))]);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].basis, LeaseBasis::Default);
        assert_eq!(g[0].expires, t + Duration::from_secs(30));
        assert_eq!(b.lease(5).map(|l| l.primary), Some(NodeId(2)));
    }

    #[test]
    fn renewals_rotate_when_more_than_fit() {
        let mut a = NodePredictor::new(PredictConfig::default(), settings(Policy::Predictive));
        for id in 1..=5 {
            a.record_offload(Instant::from_secs(1), id, NodeId(1), id + 10);
        }
        let first: Vec<ConnId> = a.renewals(2).iter().map(|r| r.0).collect();
        let second: Vec<ConnId> = a.renewals(2).iter().map(|r| r.0).collect();
        let third: Vec<ConnId> = a.renewals(2).iter().map(|r| r.0).collect();
        assert_eq!((first, second, third), (vec![1, 2], vec![3, 4], vec![5, 1]));
    }

    #[test]
    fn shadow_trials_send_the_steps_fraction_of_new_connections_to_an_untrusted_peer() {
        let run = |policy: Policy| {
            let mut config = PredictConfig::default();
            config.shadow.steps = [0.25, 0.5, 0.75, 1.0];
            let mut p = NodePredictor::new(
                config,
                NodeSettings {
                    shadow: true,
                    capacity: 1000.0,
                    ..settings(policy)
                },
            );
            let peers = [peer(0)];
            // An old connection (not new: never shadowed), then one new connection per
            // sample; a connection still in its handshake (not movable) waits its turn.
            let mut conns = vec![conn(1, 0, -60_000)];
            let mut moves = Vec::new();
            for t in 0..10i64 {
                let now = Instant::from_millis(1000 + t * 100);
                for c in &mut conns {
                    c.movable = true;
                }
                let mut fresh = conn(10 + t as u64, 0, 1000 + t * 100);
                fresh.movable = false;
                conns.push(fresh);
                p.handle_sample(
                    now,
                    &Observation {
                        node: NodeReport::default(),
                        conns: &conns,
                        peers: &peers,
                    },
                );
                for (id, target) in p.take_shadow_moves() {
                    assert_eq!(target, NodeId(1));
                    assert_eq!(p.conn_state(id), ConnState::Shadowing);
                    moves.push(id);
                }
            }
            (p, moves)
        };
        let (mut p, moves) = run(Policy::Predictive);
        // 9 new connections became movable: a quarter of them, evenly spread.
        assert_eq!(moves, [13, 17]);
        p.record_shadow(13, &Outcome::Moved, Some(1));
        p.record_shadow(17, &Outcome::Stayed("refused".into()), None);
        assert_eq!(p.conn_state(13), ConnState::Shadowing);
        assert_eq!(p.conn_state(17), ConnState::Active);
        assert_eq!(p.conn_state(1), ConnState::Active);
        let c = p.counts();
        assert_eq!((c.shadowed, c.shadow_failed), (1, 1));
        let trial = p.trials().next().unwrap();
        assert_eq!(trial.state(), TrialState::Ramping { step: 0 });
        assert_eq!(trial.fraction(), 0.25);
        // Under the manual policy nothing is moved, shadow trials included.
        let (p, moves) = run(Policy::Manual);
        assert!(moves.is_empty());
        assert_eq!(p.trials().count(), 0);
    }

    /// At the accept: once a sample saw a peer on trial, each connection a worker offers
    /// (held at its accept) is admitted at the step's fraction, evenly spread, and once only;
    /// admitted ones are shadowing and among the shadow moves; a sample that missed them
    /// (taken before their accept) forgets none, and the samples after do not offer them
    /// again. Without a trial (shadow off, or the manual policy) nothing diverts.
    #[test]
    fn new_connections_are_offered_to_a_trial_at_their_accept_once_each() {
        let make = |shadow: bool, policy: Policy| {
            let mut config = PredictConfig::default();
            config.shadow.steps = [0.25, 0.5, 0.75, 1.0];
            NodePredictor::new(
                config,
                NodeSettings {
                    shadow,
                    capacity: 1000.0,
                    ..settings(policy)
                },
            )
        };
        let peers = [peer(0)];
        let sample =
            |p: &mut NodePredictor, conns: &[ConnSample], t: i64| observe(p, conns, &peers, t);
        let mut p = make(true, Policy::Predictive);
        assert!(!p.diverts_at_accept(), "no sample yet: no trial");
        assert_eq!(p.admit_at_accept(1), None);
        sample(&mut p, &[conn(1, 0, -60_000)], 1000);
        assert!(p.diverts_at_accept());
        let admitted: Vec<ConnId> = (10..18)
            .filter(|&id| p.admit_at_accept(id) == Some(NodeId(1)))
            .collect();
        assert_eq!(admitted, [13, 17]);
        // Offered once: asking again admits nothing more.
        assert_eq!(p.admit_at_accept(13), None);
        assert_eq!(p.admit_at_accept(14), None);
        let moves = p.take_shadow_moves();
        assert_eq!(moves, [(13, NodeId(1)), (17, NodeId(1))]);
        // A sample taken before their accept (the worker answered it first) and with a
        // connection gone: they are not forgotten.
        sample(&mut p, &[], 1100);
        assert_eq!(p.conn_state(13), ConnState::Shadowing);
        assert_eq!(p.admit_at_accept(14), None, "offered again");
        // The next sample sees them all, new and movable: none is offered again.
        let conns: Vec<ConnSample> = (10..18)
            .map(|id| {
                let mut c = conn(id, 0, 1050);
                c.movable = true;
                c
            })
            .collect();
        sample(&mut p, &conns, 1200);
        assert!(p.take_shadow_moves().is_empty());
        for id in 10..18 {
            let want = if admitted.contains(&id) {
                ConnState::Shadowing
            } else {
                ConnState::Active
            };
            assert_eq!(p.conn_state(id), want, "connection {id}");
        }
        assert_eq!(p.trials().next().unwrap().fraction(), 0.25);

        for (shadow, policy) in [(false, Policy::Predictive), (true, Policy::Manual)] {
            let mut p = make(shadow, policy);
            sample(&mut p, &[], 1000);
            assert!(!p.diverts_at_accept());
            assert!((10..18).all(|id| p.admit_at_accept(id).is_none()));
        }
    }

    /// KPIs reach the right trial: the local baseline from connections served here, the
    /// peer's side only for connections shadowed to it; the trial ramps up on comparable
    /// latency and backs off on worse.
    #[test]
    fn kpis_judge_the_trial_of_the_peer_that_served_the_connection() {
        let mut config = PredictConfig::default();
        config.shadow.steps = [1.0; 4];
        config.shadow.min_samples = 5;
        let mut p = NodePredictor::new(
            config,
            NodeSettings {
                shadow: true,
                capacity: 1000.0,
                ..settings(Policy::Predictive)
            },
        );
        let peers = [peer(0)];
        let mut conns = Vec::new();
        let mut shadowed = Vec::new();
        let mut t = 1000i64;
        let sample = |p: &mut NodePredictor, conns: &[ConnSample], t: i64| {
            observe(p, conns, &peers, t);
            p.take_shadow_moves()
        };
        // Every new connection goes to the peer at a 100 % step.
        for id in 1..=12 {
            conns.push(conn(id, 0, t));
            t += 100;
            for (c, _) in sample(&mut p, &conns, t) {
                // The peer restored it as its connection 500 + c.
                p.record_shadow(c, &Outcome::Moved, Some(500 + c));
                let moved = conns.iter_mut().find(|x| x.report.conn == c).unwrap();
                moved.here = false;
                moved.movable = false;
                shadowed.push(c);
            }
        }
        assert_eq!(shadowed.len(), 12);
        // Not shadowed there, or another peer: not taken.
        assert!(!p.record_kpi(99, Some(NodeId(1)), Some(1.0), false));
        assert!(!p.record_kpi(1, Some(NodeId(2)), Some(1.0), false));
        // Comparable latency on both sides: the step passes. The peer reports by its own
        // ids; ids it did not get from here, or from another peer, are not taken, and a
        // report seen twice (heartbeats repeat) counts once.
        let reported: Vec<(ConnId, Option<f64>, bool)> = shadowed
            .iter()
            .take(6)
            .enumerate()
            .map(|(k, c)| (500 + c, Some(10.0 + k as f64), false))
            .chain([(9999, Some(1.0), false)])
            .collect();
        assert_eq!(p.record_peer_kpis(NodeId(2), &reported), 0);
        assert_eq!(p.record_peer_kpis(NodeId(1), &reported), 6);
        assert_eq!(p.record_peer_kpis(NodeId(1), &reported), 0);
        for k in 0..6 {
            assert!(p.record_kpi(1000 + k as u64, None, Some(10.5 + k as f64), false));
        }
        assert_eq!(p.kpis_taken(), (6, 6));
        // A connection whose KPIs came is no longer shadowing.
        assert_eq!(p.conn_state(shadowed[0]), ConnState::Inactive);
        t += 100;
        sample(&mut p, &conns, t);
        let events = p.take_trial_events();
        assert!(
            matches!(events[..], [(NodeId(1), TrialEvent::Ramped { .. })]),
            "{events:?}"
        );
        // The peer much slower: the next step fails and the trial backs off.
        for (k, c) in shadowed.iter().skip(6).enumerate() {
            assert!(p.record_kpi(*c, Some(NodeId(1)), Some(100.0 + k as f64), false));
            assert!(p.record_kpi(2000 + k as u64, None, Some(10.0 + k as f64), false));
        }
        t += 100;
        sample(&mut p, &conns, t);
        let events = p.take_trial_events();
        assert!(
            matches!(events[..], [(NodeId(1), TrialEvent::Failed(_))]),
            "{events:?}"
        );
        assert!(matches!(
            p.trials().next().unwrap().state(),
            TrialState::BackingOff { .. }
        ));
        // Backing off: the local baseline goes nowhere.
        assert!(!p.record_kpi(3000, None, Some(1.0), false));
    }

    #[test]
    fn connections_change_class_with_their_bandwidth() {
        let mut p = NodePredictor::new(PredictConfig::default(), settings(Policy::Manual));
        let mut conns = vec![conn(1, 0, 0)];
        let mut changes = Vec::new();
        for t in 1..=40i64 {
            // 50 B per 100 ms (500 B/s, micro), then 50 kB (500 kB/s, medium).
            conns[0].report.counters.bytes_out += if t <= 20 { 50 } else { 50_000 };
            let obs = Observation {
                node: NodeReport::default(),
                conns: &conns,
                peers: &[],
            };
            p.handle_sample(Instant::from_millis(t * 100), &obs);
            if t == 20 {
                assert_eq!(p.class(1), Some(Class::Micro));
                assert_eq!(p.class_counts(), [1, 0, 0, 0]);
            }
            changes.extend(p.take_class_changes());
        }
        assert_eq!(p.class(1), Some(Class::Medium));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(
            (changes[0].from, changes[0].to),
            (Class::Micro, Class::Medium)
        );
        // Gone: no class.
        let obs = Observation {
            node: NodeReport::default(),
            conns: &[],
            peers: &[],
        };
        p.handle_sample(Instant::from_millis(4_100), &obs);
        assert_eq!(p.class(1), None);
    }

    /// A rate-limited download arrives in bursts: its 100-ms samples swing tenfold (4.6 kB
    /// then 53 kB, as the e2e shadow test's downloads did, each swing a class change). It is
    /// classed by its recent peak: medium throughout, no change. Once it stops, its class
    /// falls within two seconds or so (the peak decays with a 1-s time constant).
    /// Sample number `t` (every 100 ms) of `conns`, no peers.
    fn sample(p: &mut NodePredictor, conns: &[ConnSample], t: i64) {
        let obs = Observation {
            node: NodeReport::default(),
            conns,
            peers: &[],
        };
        p.handle_sample(Instant::from_millis(t * 100), &obs);
    }

    #[test]
    fn a_bursty_connection_keeps_its_class_and_a_quiet_one_falls_within_seconds() {
        let mut p = NodePredictor::new(PredictConfig::default(), settings(Policy::Manual));
        let mut conns = vec![conn(1, 0, 0)];
        for t in 1..=40i64 {
            conns[0].report.counters.bytes_out += if t % 2 == 0 { 53_000 } else { 4_600 };
            sample(&mut p, &conns, t);
        }
        assert_eq!(p.class(1), Some(Class::Medium));
        let changes = p.take_class_changes();
        // Its first sample may class it lower (a quiet first 100 ms); after that, none.
        assert!(changes.len() <= 1, "{changes:?}");
        assert!(changes.iter().all(|c| c.to == Class::Medium), "{changes:?}");
        // Quiet: 530 kB/s decays below 80 kB/s (small's lower edge less the margin) after
        // ln(530 / 80) ≈ 1.9 s, and below 800 B/s to micro after ~6.5 s.
        let mut fell = Vec::new();
        for t in 41..=120i64 {
            sample(&mut p, &conns, t);
            fell.extend(p.take_class_changes().into_iter().map(|c| (t, c.to)));
        }
        let at = |class| fell.iter().find(|(_, c)| *c == class).map(|(t, _)| *t);
        let small = at(Class::Small).expect("fell to small");
        assert!((55..=62).contains(&small), "{fell:?}");
        let micro = at(Class::Micro).expect("fell to micro");
        assert!((100..=110).contains(&micro), "{fell:?}");
    }

    #[test]
    fn connections_keep_segment_statistics_of_what_they_sent() {
        let mut config = PredictConfig::default();
        config.class.split_bytes = 1_000;
        config.class.max_segments = 4;
        config.class.idle = Duration::from_secs(5);
        let mut p = NodePredictor::new(config, settings(Policy::Manual));
        // 1..=6 send 100·id bytes in 2 packets per 100 ms; 7 sends nothing.
        let mut conns: Vec<ConnSample> = (1..=7).map(|id| conn(id, 0, 0)).collect();
        for t in 1..=30 {
            for c in conns.iter_mut().take(6) {
                c.report.counters.bytes_out += 100 * c.report.conn;
                c.report.counters.packets_out += 2;
            }
            sample(&mut p, &conns, t);
            let s = p.segments(6).unwrap().segments();
            assert!(s.len() <= 4, "{s:?}");
        }
        // The idle connection has none, and the hottest are the four fastest.
        assert!(p.segments(7).is_none());
        let hottest: Vec<ConnId> = p.hottest().map(|(id, _)| id).collect();
        assert_eq!(hottest, [6, 5, 4, 3]);
        assert_eq!(
            (p.estimate().segment_conns, p.estimate().segments > 6),
            (6, true)
        );
        // Every byte and packet sent is counted once, at its offset: the first conn's 100 B
        // a sample split at 1,000 B (once it reached the split size) into [0, 1000).
        for c in &conns[..6] {
            let s = p.segments(c.report.conn).unwrap();
            assert_eq!(s.bytes(), c.report.counters.bytes_out);
            let packets: u64 = s.segments().iter().map(|x| x.packets).sum();
            assert_eq!(packets, 60);
        }
        let first = p.segments(1).unwrap().segments();
        assert_eq!(
            (first[0].start, first[0].end, first[0].bytes),
            (0, 1_000, 1_000)
        );
        assert_eq!(first.last().unwrap().end, u64::MAX);
        // The hot tail splits at the end of the stream: the last closed segment ends at a
        // sample's offset.
        let tail = p.segments(6).unwrap().segments();
        let closed = tail[tail.len() - 2];
        assert_eq!(closed.end % 600, 0, "{tail:?}");
        assert!(tail.len() >= 3, "{tail:?}");
        // Idle for the idle time (5 s after the last split, and at most a second more
        // until each connection's turn to be maintained): the segments merge back into one,
        // figures kept.
        for t in 31..=90 {
            sample(&mut p, &conns, t);
        }
        let s = p.segments(6).unwrap().segments();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].bytes, s[0].packets), (18_000, 60));
        assert_eq!(p.segments(1).unwrap().segments().len(), 1);
        // A reused id (counters back to fewer bytes) starts a new stream; a connection not
        // served here and a connection gone lose theirs.
        conns[4].report.counters = ConnCounters {
            bytes_out: 70,
            packets_out: 1,
            ..ConnCounters::default()
        };
        conns[3].here = false;
        conns.remove(5);
        sample(&mut p, &conns, 91);
        let s = p.segments(5).unwrap().segments();
        assert_eq!(
            (s.len(), s[0].start, s[0].bytes, s[0].packets),
            (1, 0, 70, 1)
        );
        assert!(p.segments(4).is_none());
        assert!(p.segments(6).is_none());
        conns[3].here = true;
        sample(&mut p, &conns, 92);
        // Back here: counted from its counters (a connection restored here counts from its
        // restore).
        assert_eq!(p.segments(4).unwrap().bytes(), 12_000);
        let hottest: Vec<ConnId> = p.hottest().map(|(id, _)| id).collect();
        assert!(!hottest.contains(&6) && hottest.len() == 4, "{hottest:?}");
    }

    #[test]
    fn hostile_figures_do_not_panic() {
        let mut p = NodePredictor::new(
            PredictConfig::default(),
            NodeSettings {
                policy: Policy::Predictive,
                ..NodeSettings::default()
            },
        );
        let mut far = conn(1, u64::MAX, 0);
        far.report.opened_at = Instant::from_micros(i64::MAX / 2);
        let conns = [far, conn(1, 0, -5)];
        let peers = [PeerSample {
            cpu_busy: f64::NAN,
            bandwidth: f64::INFINITY,
            ..peer(u64::MAX)
        }];
        for t in 0..30 {
            let obs = Observation {
                node: NodeReport {
                    cpu_busy: f64::NAN,
                    ..NodeReport::default()
                },
                conns: &conns,
                peers: &peers,
            };
            p.handle_sample(Instant::from_millis(t * 100), &obs);
        }
        assert!(p.estimate().utilisation.is_finite());
    }
}
