//! A deterministic trace-driven simulator of a lease group: N nodes, connections with load
//! traces, a policy, and moves with a cost (freeze time and bytes moved) taken as parameters.
//!
//! Time advances in ticks of [`super::PredictConfig::interval`] (100 ms). Every tick each active
//! connection puts its load on the node that holds it: `base × shape(t) × (1 + noise·N(0, 1))`
//! (clamped at 0), the noise drawn from a hash of (seed, connection, tick) so that every policy
//! sees exactly the same trace. Every node runs the predictor of this module on itself: a
//! [`Forecaster`] of its utilisation and one per connection, a [`Detector`] and a [`Planner`].
//! A planned move freezes the connection for [`MigrationCost::stall`] of its buffered bytes
//! (5 ms + 1 ms per MiB by default; see [`MigrationCost`] for where that comes from): its
//! load stays on the source until the freeze has ended, rounded up to whole ticks, and both ends
//! carry the move's own load ([`MigrationCost::load`]) for the freeze. Peers' loads are read as
//! the planner gets them from heartbeats, [`SimConfig::report_delay`] late, and each node counts
//! its own moves on top of them for [`SimConfig::floor_hold`] ([`PeerFloors`]), as a node does.
//!
//! The group starts with background connections on every node (0.3 utilisation each); the
//! workload adds load on node 0:
//!
//! | workload | what node 0 gets |
//! |---|---|
//! | step | 40 connections at once at D/3, until 5D/6 |
//! | ramp | 60 connections arriving evenly from D/6 to 2D/3, until 14D/15 |
//! | diurnal | 35 connections whose load follows `1 − 0.5 cos(2πt / (D/5))` (from a trough) |
//! | flash crowd | 50 connections arriving within D/30 from D/3 (densest first), living D/5–2D/5 |
//! | heavy tail | Poisson arrivals, 5/s, Pareto(α = 1.5, 2 s) lifetimes |
//!
//! (D is the duration, 300 s by default; every connection's base load is 0.02 of a node.)
//!
//! Metrics: overload-seconds (the sum over nodes of the time each spends above its capacity),
//! backlog: what a node cannot serve while above capacity waits, and drains at the capacity it
//! has left once below — backlog-seconds (the time nodes have work waiting, which outlasts the
//! overload) and the longest queueing delay (the largest backlog over its node's capacity) —
//! moves, connections moved at least once, total freeze, and the MAPE of every node's
//! utilisation forecast at the horizon against what the utilisation turned out to be.

use smoltcp::time::{Duration, Instant};

use super::PredictConfig;
use super::detect::Detector;
use super::forecast::Forecaster;
use super::node::NodeSettings;
use super::plan::{
    Candidate, MigrationCost, NodeLoad, Peer, PeerFloors, PlanInput, Planner, Policy, Residual,
    ReturnPath,
};
use super::{NodeId, Priority, secs};

/// A small seeded PRNG (SplitMix64): deterministic, not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Pareto with scale `xm` and shape `alpha`.
    pub fn pareto(&mut self, xm: f64, alpha: f64) -> f64 {
        xm / (1.0 - self.next_f64()).powf(1.0 / alpha)
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next_f64()).ln()
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A synthetic workload (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Sinusoidal load, five periods over the run.
    Diurnal,
    /// A surge of arrivals that then ends.
    FlashCrowd,
    /// Poisson arrivals with Pareto lifetimes.
    HeavyTail,
    /// Arrivals at a constant rate: load rising linearly.
    Ramp,
    /// Many connections at once.
    Step,
    /// A group just scaled out: every node but the last busy (0.8), the last one empty, and a
    /// step of load on the busy ones at a third of the run (+0.4 each). What rebalancing
    /// (`plan.rebalance`) is for: the new node is filled before the step, not during it. Not
    /// in [`Workload::ALL`] (the table of the five above); `flowshift-bench sim --workloads`.
    ScaleOut,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 5] = [
        Workload::Step,
        Workload::Ramp,
        Workload::Diurnal,
        Workload::FlashCrowd,
        Workload::HeavyTail,
    ];

    /// Its name in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Diurnal => "diurnal",
            Workload::FlashCrowd => "flash-crowd",
            Workload::HeavyTail => "heavy-tail",
            Workload::Ramp => "ramp",
            Workload::Step => "step",
            Workload::ScaleOut => "scale-out",
        }
    }

    /// The workload named `name` ([`Self::name`]).
    pub fn by_name(name: &str) -> Option<Workload> {
        Self::ALL
            .into_iter()
            .chain([Workload::ScaleOut])
            .find(|w| w.name() == name)
    }
}

/// The policy a simulated group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimPolicy {
    /// No moves at all.
    NoPolicy,
    /// [`Policy::Predictive`].
    Predictive,
    /// [`Policy::Reactive`].
    Reactive,
}

impl SimPolicy {
    /// Every policy, in table order.
    pub const ALL: [SimPolicy; 3] = [
        SimPolicy::NoPolicy,
        SimPolicy::Reactive,
        SimPolicy::Predictive,
    ];

    /// Its name in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::NoPolicy => "none",
            SimPolicy::Predictive => "predictive",
            SimPolicy::Reactive => "reactive",
        }
    }
}

/// A simulated group and its predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Nodes in the group. Default 3.
    pub nodes: usize,
    /// Capacity of each node, in load units. Default 1.0.
    pub capacity: f64,
    /// Length of the run. Default 300 s.
    pub duration: Duration,
    /// Relative noise (σ) of every connection's load every tick. Default 0.1.
    pub noise: f64,
    /// Bytes a move copies per unit of the connection's load (its buffers). Default 64 MiB: a
    /// connection at 0.02 of a node holds about 1.3 MB.
    pub buffered_per_load: f64,
    /// Bandwidth, bytes/s, per unit of load. Default 1 GB/s.
    pub bandwidth_per_load: f64,
    /// The share of a moved connection's load that stays on its home node (where its packets
    /// enter) while another node serves it: the forwarding of a relayed connection, which
    /// flowshift's planner counts as the candidate's [`Residual`]. 0 (the default): the
    /// target returns replies directly and forwarding the client's packets costs nothing.
    /// Relaying a bulk download of the built-in apps costs more than serving it (a share
    /// above 1, docs/benchmarks.md); for an app that works for its bytes it is far less.
    pub relay_share: f64,
    /// How old the peers' loads are when a node plans: a node computes its load report once
    /// a second and heartbeats carry it once a second, so what a peer knows is 0–2 s old.
    /// Default 1 s (the mean); zero: every node sees the others' loads of this very tick.
    pub report_delay: Duration,
    /// How long a node counts a move's load on its target on top of the target's reports
    /// ([`PeerFloors`], what a node does with its `report_delay` setting). Default: the
    /// node's default, 3 s; zero: a node plans on the reports alone.
    pub floor_hold: Duration,
    /// The predictor every node runs; its `plan.migration_cost` is also the simulated cost of a
    /// move, its `interval` the tick. Default: [`PredictConfig::default`] with Holt-Winters'
    /// season set to the diurnal period (600 samples).
    pub predict: PredictConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        let mut predict = PredictConfig::default();
        predict.forecast.season = 600;
        Self {
            nodes: 3,
            capacity: 1.0,
            duration: Duration::from_secs(300),
            noise: 0.1,
            buffered_per_load: 64.0 * 1024.0 * 1024.0,
            bandwidth_per_load: 1e9,
            relay_share: 0.0,
            report_delay: Duration::from_secs(1),
            floor_hold: NodeSettings::default().report_delay,
            predict,
        }
    }
}

/// Base load of every simulated connection, in node capacities.
const CONN_LOAD: f64 = 0.02;
/// Background connections per node.
const BACKGROUND: usize = 15;

/// One connection's trace.
#[derive(Debug, Clone, Copy)]
struct Spec {
    home: usize,
    start: u32,
    end: u32,
    base: f64,
    /// Period of the sinusoid in ticks, 0 for a flat load.
    period: u32,
}

/// Builds the traces of a workload.
fn workload(w: Workload, config: &SimConfig, ticks: u32, rng: &mut Rng) -> Vec<Spec> {
    let at = |num: u32, den: u32| (u64::from(ticks) * u64::from(num) / u64::from(den)) as u32;
    let spec = |home, start, end| Spec {
        home,
        start,
        end,
        base: CONN_LOAD,
        period: 0,
    };
    // A scaled-out group's last node has just joined: nothing on it.
    let busy = match w {
        Workload::ScaleOut => config.nodes.saturating_sub(1),
        _ => config.nodes,
    };
    let mut specs: Vec<Spec> = (0..busy)
        .flat_map(|n| (0..BACKGROUND).map(move |_| n))
        .map(|n| spec(n, 0, ticks))
        .collect();
    let tick_s = secs(config.predict.interval).max(1e-6);
    match w {
        Workload::Step => specs.extend((0..40).map(|_| spec(0, at(1, 3), at(5, 6)))),
        Workload::ScaleOut => {
            for n in 0..busy {
                // 0.3 of background + 0.5 from the start: 0.8, under the threshold.
                specs.extend((0..25).map(|_| spec(n, 0, ticks)));
                specs.extend((0..20).map(|_| spec(n, at(1, 3), at(5, 6))));
            }
        }
        Workload::Ramp => {
            let (from, to) = (at(1, 6), at(2, 3));
            specs.extend((0..60).map(|i| spec(0, from + (to - from) * i / 60, at(14, 15))));
        }
        Workload::Diurnal => specs.extend((0..35).map(|_| Spec {
            period: at(1, 5).max(1),
            ..spec(0, 0, ticks)
        })),
        Workload::FlashCrowd => {
            let (from, width) = (at(1, 3), at(1, 30));
            specs.extend((0..50u32).map(|i| {
                // Arrival times bunch up at the start: t = from + width · (i/50)².
                let start = from + (f64::from(width) * (f64::from(i) / 50.0).powi(2)) as u32;
                let life = at(1, 5) + (rng.next_f64() * f64::from(at(1, 5))) as u32;
                spec(0, start, start.saturating_add(life).min(ticks))
            }));
        }
        Workload::HeavyTail => {
            let mut t = 0.0;
            loop {
                t += rng.exponential(1.0 / 5.0);
                let start = (t / tick_s) as u32;
                if start >= ticks {
                    break;
                }
                let life = (rng.pareto(2.0, 1.5).min(1e6) / tick_s) as u32;
                specs.push(spec(0, start, start.saturating_add(life.max(1)).min(ticks)));
            }
        }
    }
    specs
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// The workload.
    pub workload: Workload,
    /// The policy.
    pub policy: SimPolicy,
    /// The seed.
    pub seed: u64,
    /// Sum over nodes of the seconds each spent above capacity.
    pub overload_seconds: f64,
    /// Sum over nodes of the seconds each had work waiting (see the module doc).
    pub backlog_seconds: f64,
    /// The longest a unit of work waited, seconds: the largest backlog over its node's
    /// capacity.
    pub max_delay: f64,
    /// Moves made.
    pub moves: u64,
    /// Connections moved at least once.
    pub conns_affected: u64,
    /// Connections in the run.
    pub conns: u64,
    /// Total freeze of all moves, seconds.
    pub freeze_seconds: f64,
    /// MAPE of the nodes' utilisation forecasts at the horizon (`None` if nothing to score).
    pub forecast_mape: Option<f64>,
    /// When the first move was planned, seconds from the start.
    pub first_move: Option<f64>,
    /// When a node first went above capacity, seconds from the start.
    pub first_overload: Option<f64>,
    /// Utilisation of each node at every tick (`utilisation[node][tick]`).
    pub utilisation: Vec<Vec<f32>>,
}

/// A connection during a run.
struct Conn {
    spec: Spec,
    node: usize,
    /// A move under way: (target, tick it lands).
    moving: Option<(usize, u32)>,
    last_moved: Option<Instant>,
    forecaster: Option<Forecaster>,
    load: f64,
}

/// A node during a run.
struct Node {
    forecaster: Forecaster,
    detector: Detector,
    planner: Planner,
    /// Extra load of moves in flight, per tick: (until tick, load).
    overhead: Vec<(u32, f64)>,
    /// Loads it moved to peers that their reports may not show yet.
    floors: PeerFloors,
}

/// A node's backlog after `dt` seconds at `load`: what it cannot serve above `capacity` waits,
/// and what it has left below serves the wait. In capacity-seconds, never negative.
fn queue(backlog: f64, load: f64, capacity: f64, dt: f64) -> f64 {
    let b = (backlog + (load - capacity) * dt).max(0.0);
    // What rounding leaves of a drained backlog is none.
    if b < 1e-9 { 0.0 } else { b }
}

/// Runs one workload under one policy with one seed.
///
/// `config.predict` should have passed [`PredictConfig::validate`]; a group of fewer than one
/// node is run as one node.
pub fn run(config: &SimConfig, w: Workload, policy: SimPolicy, seed: u64) -> SimResult {
    let config = &SimConfig {
        nodes: config.nodes.max(1),
        relay_share: if config.relay_share.is_finite() {
            config.relay_share.max(0.0)
        } else {
            0.0
        },
        ..config.clone()
    };
    let relayed = config.relay_share > 0.0;
    let p = &config.predict;
    let tick = if p.interval > Duration::ZERO {
        p.interval
    } else {
        PredictConfig::DEFAULT_INTERVAL
    };
    let tick_s = secs(tick);
    let ticks =
        (config.duration.total_micros() / tick.total_micros()).min(u64::from(u32::MAX)) as u32;
    let horizon = p.horizon_samples();
    // Every node's (load, predicted) of the last ticks, for the peers' delayed view.
    let delay_ticks =
        (config.report_delay.total_micros() / tick.total_micros().max(1)).min(1 << 16) as usize;
    let mut reports: std::collections::VecDeque<(Vec<f64>, Vec<f64>)> = Default::default();
    let mut rng = Rng::new(seed);
    let specs = workload(w, config, ticks, &mut rng);
    let mut conns: Vec<Conn> = specs
        .iter()
        .map(|&spec| Conn {
            spec,
            node: spec.home.min(config.nodes.saturating_sub(1)),
            moving: None,
            last_moved: None,
            forecaster: None,
            load: 0.0,
        })
        .collect();
    let mut plan_config = p.plan;
    plan_config.policy = match policy {
        SimPolicy::NoPolicy => Policy::Manual,
        SimPolicy::Predictive => Policy::Predictive,
        SimPolicy::Reactive => Policy::Reactive,
    };
    let mut nodes: Vec<Node> = (0..config.nodes)
        .map(|_| Node {
            forecaster: Forecaster::new(p.forecast),
            detector: Detector::new(p.detect),
            planner: Planner::new(plan_config, p.detect.horizon),
            overhead: Vec::new(),
            floors: PeerFloors::default(),
        })
        .collect();
    let cost: MigrationCost = p.plan.migration_cost;
    let noise_seed = mix(seed ^ 0x5eed);

    let mut result = SimResult {
        workload: w,
        policy,
        seed,
        overload_seconds: 0.0,
        backlog_seconds: 0.0,
        max_delay: 0.0,
        moves: 0,
        conns_affected: 0,
        conns: conns.len() as u64,
        freeze_seconds: 0.0,
        forecast_mape: None,
        first_move: None,
        first_overload: None,
        utilisation: vec![Vec::with_capacity((ticks as usize).min(1 << 20)); config.nodes],
    };
    // Forecasts at the horizon waiting to be scored: (tick, node, forecast).
    let mut pending: std::collections::VecDeque<(u32, usize, f64)> = Default::default();
    let (mut ape_sum, mut ape_n) = (0.0, 0u64);
    let mut load = vec![0.0; config.nodes];
    let mut predicted = vec![0.0; config.nodes];
    // What of it each node's planner counts (`detect.confidence`).
    let mut confident = vec![0.0; config.nodes];
    // Work each node could not serve yet, in capacity-seconds.
    let mut backlog = vec![0.0; config.nodes];

    for t in 0..ticks {
        let now = Instant::from_micros(i64::from(t) * tick.total_micros() as i64);
        // Loads of this tick.
        load.iter_mut().for_each(|l| *l = 0.0);
        for (i, c) in conns.iter_mut().enumerate() {
            if let Some((target, lands)) = c.moving
                && lands <= t
            {
                c.node = target;
                c.moving = None;
            }
            if t < c.spec.start || t >= c.spec.end {
                c.forecaster = None;
                c.load = 0.0;
                continue;
            }
            let shape = if c.spec.period > 0 {
                1.0 - 0.5 * (std::f64::consts::TAU * f64::from(t) / f64::from(c.spec.period)).cos()
            } else {
                1.0
            };
            let mut r = Rng::new(noise_seed ^ mix(i as u64) ^ mix(u64::from(t) << 32));
            c.load = (c.spec.base * shape * (1.0 + config.noise * r.normal())).max(0.0);
            load[c.node] += c.load;
            // Served away from home: its home still forwards its packets.
            let home = c.spec.home.min(config.nodes - 1);
            if c.node != home {
                load[home] += config.relay_share * c.load;
            }
            c.forecaster
                .get_or_insert_with(|| Forecaster::new(p.forecast))
                .observe(c.load);
        }
        for (n, node) in nodes.iter_mut().enumerate() {
            node.overhead.retain(|(until, _)| *until >= t);
            load[n] += node.overhead.iter().map(|(_, l)| l).sum::<f64>();
            let u = load[n] / config.capacity;
            result.utilisation[n].push(u as f32);
            if u > 1.0 {
                result.overload_seconds += tick_s;
                result
                    .first_overload
                    .get_or_insert(secs(now - Instant::ZERO));
            }
            // A tick above capacity leaves its excess waiting; one below serves it with what
            // it has left.
            backlog[n] = queue(backlog[n], load[n], config.capacity, tick_s);
            if backlog[n] > 0.0 {
                result.backlog_seconds += tick_s;
                if config.capacity > 0.0 {
                    result.max_delay = result.max_delay.max(backlog[n] / config.capacity);
                }
            }
            node.forecaster.observe(u);
            node.detector.observe(u);
            let peak = node.forecaster.peak(horizon).map_or(u, |f| f.value);
            predicted[n] = peak * config.capacity;
            confident[n] = node.detector.confident(peak, u) * config.capacity;
            if let Some(f) = node.forecaster.forecast(horizon) {
                pending.push_back((t + horizon as u32, n, f.value));
                node.detector.forecast_made(f.value, horizon);
            }
        }
        while let Some(&(due, n, f)) = pending.front() {
            if due > t {
                break;
            }
            pending.pop_front();
            let actual = result.utilisation[n][due as usize] as f64;
            if actual > 1e-9 {
                ape_sum += ((actual - f) / actual).abs();
                ape_n += 1;
            }
        }
        if policy == SimPolicy::NoPolicy {
            continue;
        }
        if delay_ticks > 0 {
            reports.push_back((load.clone(), predicted.clone()));
            if reports.len() > delay_ticks + 1 {
                reports.pop_front();
            }
        }
        // Plans, node by node; later nodes see the moves earlier ones planned.
        for n in 0..config.nodes {
            let node = &nodes[n];
            let threshold = node.detector.threshold();
            let local = NodeLoad {
                current: load[n],
                predicted: confident[n],
                capacity: config.capacity,
            };
            let above = match policy {
                SimPolicy::Predictive => {
                    local.current.max(local.predicted) / config.capacity > threshold
                }
                _ => local.current / config.capacity > p.plan.reactive_threshold,
            };
            nodes[n].floors.expire(now);
            let floors = &nodes[n].floors;
            let peers: Vec<Peer> = (0..config.nodes)
                .filter(|&m| m != n)
                .map(|m| {
                    // What its last load report said (the oldest kept; this tick's without
                    // a delay, with the moves planned so far this tick), raised to what this
                    // node has moved there since.
                    let (current, predicted) = match reports.front() {
                        Some((l, p)) => (l[m], p[m]),
                        None => (load[m], predicted[m]),
                    };
                    let id = NodeId(m as u32);
                    let current = floors.load(id, current);
                    Peer {
                        id,
                        load: NodeLoad {
                            current,
                            predicted: predicted.max(current),
                            capacity: config.capacity,
                        },
                        rtt: Duration::from_micros(500 * (1 + (m + n) as u64 % 3)),
                        // With a relay share, replies come back through the home node;
                        // without, a move takes a connection's whole load.
                        return_path: if relayed {
                            ReturnPath::Relay
                        } else {
                            ReturnPath::Direct
                        },
                    }
                })
                .collect();
            // Rebalancing plans under the threshold too: it needs the candidates always.
            let candidates: Vec<Candidate> = if above || p.plan.rebalance {
                conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.node == n && c.moving.is_none() && c.forecaster.is_some())
                    .map(|(i, c)| Candidate {
                        conn: i as u64,
                        current: c.load,
                        predicted: c
                            .forecaster
                            .as_ref()
                            .and_then(|f| f.forecast(horizon))
                            .map_or(c.load, |f| f.value),
                        age: tick * (t - c.spec.start),
                        bandwidth: c.load * config.bandwidth_per_load,
                        buffered: (c.load * config.buffered_per_load) as u64,
                        priority: Priority::Normal,
                        last_moved: c.last_moved,
                        // Moving a connection away from its home leaves the forwarding
                        // here; away from another node, nothing.
                        residual: if c.node == c.spec.home.min(config.nodes - 1) {
                            Residual {
                                relay: config.relay_share,
                                direct: 0.0,
                            }
                        } else {
                            Residual::default()
                        },
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let input = PlanInput {
                local,
                threshold,
                peers: &peers,
                candidates: &candidates,
                imbalance_threshold: config.predict.detect.imbalance_threshold,
            };
            let plan = nodes[n].planner.plan(now, &input);
            for m in plan.moves {
                let target = m.target.0 as usize;
                if let Some(p) = peers.iter().find(|p| p.id == m.target) {
                    let hold = config.floor_hold;
                    let l = m.reason.conn_load;
                    nodes[n]
                        .floors
                        .moved(now, hold, m.target, p.load.current, l);
                }
                let c = &mut conns[m.conn as usize];
                let stall = cost.stall((c.load * config.buffered_per_load) as u64);
                let stall_ticks = stall.total_micros().div_ceil(tick.total_micros()).max(1) as u32;
                c.moving = Some((target, t + 1 + stall_ticks));
                if c.last_moved.is_none() {
                    result.conns_affected += 1;
                }
                c.last_moved = Some(now);
                result.moves += 1;
                result.freeze_seconds += secs(stall);
                result.first_move.get_or_insert(secs(now - Instant::ZERO));
                let overhead = cost.load * secs(stall) / (tick_s * f64::from(stall_ticks));
                nodes[n].overhead.push((t + stall_ticks, overhead));
                nodes[target].overhead.push((t + stall_ticks, overhead));
                // What the next planners see.
                let l = m.reason.conn_load;
                let relief = l - m.reason.left;
                load[n] -= relief;
                predicted[n] -= relief;
                confident[n] -= relief;
                load[target] += l;
                predicted[target] += l;
                confident[target] += l;
            }
        }
    }
    result.forecast_mape = (ape_n > 0).then(|| ape_sum / ape_n as f64);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            duration: Duration::from_secs(90),
            ..SimConfig::default()
        }
    }

    /// A group just scaled out (two nodes at 0.8, the third empty) takes a step of +0.4 on
    /// the busy ones at a third of the run. Without rebalancing both policies wait for the
    /// step and shed during it, over capacity for seconds; with it, the empty node is filled
    /// under the threshold first and the step lands on three half-full nodes.
    #[test]
    fn rebalancing_fills_a_new_node_before_a_step_lands() {
        let plain = SimConfig::default();
        let mut rebalancing = SimConfig::default();
        rebalancing.predict.plan.rebalance = true;
        for policy in [SimPolicy::Reactive, SimPolicy::Predictive] {
            let without = run(&plain, Workload::ScaleOut, policy, 1);
            let with = run(&rebalancing, Workload::ScaleOut, policy, 1);
            assert!(without.overload_seconds >= 2.0, "{without:?}");
            assert!(
                with.overload_seconds * 10.0 <= without.overload_seconds,
                "{policy:?}: {} against {}",
                with.overload_seconds,
                without.overload_seconds
            );
            // The first moves come long before the step (at 100 s), under the threshold.
            assert!(with.first_move.is_some_and(|t| t < 10.0), "{with:?}");
        }
        assert_eq!(Workload::by_name("scale-out"), Some(Workload::ScaleOut));
        assert!(!Workload::ALL.contains(&Workload::ScaleOut));
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..4).map(|_| b.next_u64()).collect::<Vec<_>>());
        // SplitMix64 reference output for seed 0.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(1);
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        assert!((0..1000).all(|_| r.pareto(2.0, 1.5) >= 2.0));
    }

    #[test]
    fn a_backlog_piles_up_above_capacity_and_drains_below() {
        // 1.5 for 1 s on a capacity of 1: 0.5 capacity-seconds wait (a 0.5 s delay), then at
        // 0.75 they drain in 2 s.
        let mut b = 0.0;
        for _ in 0..10 {
            b = queue(b, 1.5, 1.0, 0.1);
        }
        assert!((b - 0.5).abs() < 1e-9, "{b}");
        let mut ticks = 0;
        while b > 0.0 {
            b = queue(b, 0.75, 1.0, 0.1);
            ticks += 1;
        }
        assert_eq!(ticks, 20);
        assert_eq!(queue(0.0, 0.2, 1.0, 0.1), 0.0);
        // In a run: without a policy the step's backlog outlasts its overload and its
        // worst wait is seconds; a policy that sheds in time leaves none.
        let config = small();
        let none = run(&config, Workload::Step, SimPolicy::NoPolicy, 1);
        assert!(none.overload_seconds > 0.0);
        assert!(
            none.backlog_seconds > none.overload_seconds,
            "{} {}",
            none.backlog_seconds,
            none.overload_seconds
        );
        assert!(none.max_delay > 1.0, "{}", none.max_delay);
        let ramp = run(&config, Workload::Ramp, SimPolicy::Reactive, 1);
        assert_eq!((ramp.overload_seconds, ramp.backlog_seconds), (0.0, 0.0));
        assert_eq!(ramp.max_delay, 0.0);
    }

    #[test]
    fn same_seed_same_result() {
        let config = small();
        for w in [Workload::Ramp, Workload::HeavyTail] {
            let a = run(&config, w, SimPolicy::Predictive, 3);
            let b = run(&config, w, SimPolicy::Predictive, 3);
            assert_eq!(a, b);
            let c = run(&config, w, SimPolicy::Predictive, 4);
            assert_ne!(a.utilisation, c.utilisation, "another seed, another trace");
        }
    }

    #[test]
    fn degenerate_groups_do_not_panic() {
        for (nodes, capacity, secs) in [(0, 1.0, 5), (2, 0.0, 5), (3, 1.0, 0)] {
            let config = SimConfig {
                nodes,
                capacity,
                duration: Duration::from_secs(secs),
                ..SimConfig::default()
            };
            for policy in SimPolicy::ALL {
                let r = run(&config, Workload::HeavyTail, policy, 1);
                assert_eq!(r.utilisation.len(), nodes.max(1));
            }
            // Reports older than the run, or none delayed.
            for delay in [Duration::ZERO, Duration::from_secs(100_000)] {
                let config = SimConfig {
                    report_delay: delay,
                    ..config.clone()
                };
                let r = run(&config, Workload::HeavyTail, SimPolicy::Predictive, 1);
                assert_eq!(r.utilisation.len(), nodes.max(1));
            }
        }
    }

    /// A moved connection's home keeps its relay share: a share of 1 or more relieves
    /// nothing, so nothing moves; a share of one half takes more moves than none for the same
    /// load, and the home node carries the forwarding (its load is higher than without).
    #[test]
    fn a_relayed_move_leaves_its_share_on_the_home_node() {
        let share = |relay_share| SimConfig {
            relay_share,
            ..SimConfig::default()
        };
        for policy in [SimPolicy::Reactive, SimPolicy::Predictive] {
            let dear = run(&share(1.5), Workload::Step, policy, 1);
            assert_eq!(dear.moves, 0, "{policy:?}");
            let free = run(&share(0.0), Workload::Step, policy, 1);
            let half = run(&share(0.5), Workload::Step, policy, 1);
            assert!(free.moves > 0);
            assert!(half.moves > free.moves, "{} vs {}", half.moves, free.moves);
            // Node 0, at the end of the step (5D/6): its moved connections ended, nothing
            // left either way; during it, the home carries more with a relay share.
            let mean = |r: &SimResult| {
                let u = &r.utilisation[0][1200..2400];
                u.iter().map(|&x| f64::from(x)).sum::<f64>() / u.len() as f64
            };
            assert!(
                mean(&half) > mean(&free),
                "{} vs {}",
                mean(&half),
                mean(&free)
            );
        }
        // Hostile values are clamped, not propagated.
        let r = run(&share(f64::NAN), Workload::Step, SimPolicy::Reactive, 1);
        assert!(r.utilisation[0].iter().all(|u| u.is_finite()));
    }

    #[test]
    fn predictive_moves_before_the_ramp_overloads() {
        let config = small();
        let none = run(&config, Workload::Ramp, SimPolicy::NoPolicy, 1);
        let overload = none
            .first_overload
            .expect("the ramp overloads node 0 without a policy");
        assert_eq!(none.moves, 0);
        let predictive = run(&config, Workload::Ramp, SimPolicy::Predictive, 1);
        let first_move = predictive.first_move.expect("predictive moves");
        assert!(
            first_move < overload,
            "first move at {first_move} s, overload at {overload} s"
        );
        assert!(predictive.overload_seconds < none.overload_seconds);
    }

    /// `detect.confidence`: a predicted peak counts only as far as it stands above the
    /// forecasts' own error at the horizon. On the heavy tail's bursts, which a trend reads as
    /// rises, predictive then moves far less; on a flash crowd with relayed moves, where
    /// moving early pays, it still removes most of reactive's overload, with no more moves.
    #[test]
    fn confidence_cuts_moves_on_noisy_load_and_keeps_the_flash_crowd_lead() {
        let total = |w: Workload, policy: SimPolicy, confidence: f64, share: f64| {
            let mut config = SimConfig {
                relay_share: share,
                ..SimConfig::default()
            };
            config.predict.detect.confidence = confidence;
            (1..=5).fold((0, 0.0), |(moves, overload), seed| {
                let r = run(&config, w, policy, seed);
                (moves + r.moves, overload + r.overload_seconds)
            })
        };
        let (plain, _) = total(Workload::HeavyTail, SimPolicy::Predictive, 0.0, 0.0);
        let (sure, _) = total(Workload::HeavyTail, SimPolicy::Predictive, 2.0, 0.0);
        let (reactive, _) = total(Workload::HeavyTail, SimPolicy::Reactive, 0.0, 0.0);
        assert!(sure < plain, "{sure} moves against {plain}");
        assert!(
            sure <= reactive + reactive / 10,
            "{sure} against reactive's {reactive}"
        );
        let (moves, overload) = total(Workload::FlashCrowd, SimPolicy::Predictive, 2.0, 0.5);
        let (r_moves, r_overload) = total(Workload::FlashCrowd, SimPolicy::Reactive, 0.0, 0.5);
        assert!(
            overload < 0.5 * r_overload,
            "{overload} s against {r_overload} s"
        );
        assert!(moves <= r_moves, "{moves} moves against {r_moves}");
    }

    /// Load reports a second old, relayed moves (each relieves half), a flash crowd: planning
    /// on the reports alone, node 0 fills a peer whose report does not show its last moves
    /// yet, past the level where that peer sheds (the detection ceiling, 0.85) — and the
    /// moves come back. Counting its own moves on top of the reports (what a node does), it
    /// moves less and never fills a peer that far.
    #[test]
    fn counting_its_own_moves_keeps_a_node_from_overfilling_a_peer_on_stale_reports() {
        let run_all = |hold: Duration| {
            let config = SimConfig {
                relay_share: 0.5,
                floor_hold: hold,
                ..SimConfig::default()
            };
            assert_eq!(config.report_delay, Duration::from_secs(1));
            (1..=5).fold((0, 0.0f32, 0.0), |(moves, peak, overload), seed| {
                let r = run(&config, Workload::FlashCrowd, SimPolicy::Predictive, seed);
                let peers = r.utilisation[1..].iter().flatten().copied();
                (
                    moves + r.moves,
                    peers.fold(peak, f32::max),
                    overload + r.overload_seconds,
                )
            })
        };
        let (blind_moves, blind_peak, _) = run_all(Duration::ZERO);
        let (moves, peak, overload) = run_all(NodeSettings::default().report_delay);
        let ceiling = crate::predict::detect::DetectConfig::default().ceiling as f32;
        assert!(
            blind_peak > ceiling,
            "{blind_peak}: the case no longer arises"
        );
        assert!(peak <= ceiling, "a peer filled to {peak}");
        assert!(moves < blind_moves, "{moves} moves against {blind_moves}");
        assert_eq!(overload, 0.0);
    }
}
