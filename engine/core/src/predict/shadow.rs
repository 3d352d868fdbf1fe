//! Shadow trials: trying a peer out on a small fraction of new connections before trusting it.
//!
//! A [`ShadowTrial`] per candidate peer sends a fraction of new connections to it right after
//! accept ([`ShadowTrial::admit`]), starting at [`ShadowConfig::steps`]`[0]` (5 %). The node
//! records a KPI sample (processing latency, and whether the connection ended in an error or a
//! reset) for connections served locally and for those served by the peer. Once both sides have
//! [`ShadowConfig::min_samples`], [`ShadowTrial::poll`] compares them:
//!
//! - the peer fails if its error rate exceeds the local one by more than
//!   [`ShadowConfig::max_error_excess`], or if its latency is significantly worse: a one-sided
//!   Mann–Whitney U test ([`mann_whitney`]) with p below [`ShadowConfig::significance`];
//! - otherwise the fraction ramps to the next step (5 → 10 → 25 → 50 %), and after the last the
//!   peer is trusted: the planner may shift connections to it and the trial stops diverting.
//!
//! On failure the trial stops diverting for [`ShadowConfig::backoff`], then starts over at the
//! first step. Samples are cleared after every evaluation, so each step is judged on its own.

use std::collections::VecDeque;

use smoltcp::time::{Duration, Instant};

use super::NodeId;
use super::config::{ConfigError, count_in, duration_in, in_range};

/// A connection's state as `ctl` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Served here.
    Active,
    /// Closed, or handed back; no longer this node's concern.
    Inactive,
    /// Sent to a peer under a shadow trial.
    Shadowing,
    /// Being offloaded by the planner to a trusted peer.
    Shifting,
}

impl ConnState {
    /// The name `ctl` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Active => "active",
            ConnState::Inactive => "inactive",
            ConnState::Shadowing => "shadowing",
            ConnState::Shifting => "shifting",
        }
    }
}

/// Settings of shadow trials.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowConfig {
    /// Fractions of new connections diverted, step by step; increasing, in `(0, 1]`.
    /// Default 5, 10, 25, 50 %.
    pub steps: [f64; 4],
    /// KPI samples needed on each side before a step is judged. Default 30.
    pub min_samples: usize,
    /// Most samples kept per side (oldest dropped). Default 1,000.
    pub max_samples: usize,
    /// p-value below which the peer's latency counts as worse. Default 0.05.
    pub significance: f64,
    /// How much higher the peer's error rate may be than the local one. Default 0.01.
    pub max_error_excess: f64,
    /// How long a failed trial waits before starting over. Default 60 s.
    pub backoff: Duration,
    /// How much slower the peer may be before its latency counts as worse, in the
    /// latency's unit (the node measures milliseconds): the test compares the peer's
    /// latencies less this margin with the local ones. A connection served on a peer
    /// through its ingress pays the relay's round trip, which a client does not notice
    /// but a rank test on a fast network always finds. Default 1.0.
    pub latency_margin: f64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            steps: [0.05, 0.10, 0.25, 0.50],
            min_samples: 30,
            max_samples: 1000,
            significance: 0.05,
            max_error_excess: 0.01,
            backoff: Duration::from_secs(60),
            latency_margin: 1.0,
        }
    }
}

impl ShadowConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut prev = 0.0;
        for step in self.steps {
            in_range("shadow.steps", step, 1e-6, 1.0)?;
            if step < prev {
                return Err(ConfigError::Order {
                    low: "shadow.steps[i]",
                    high: "shadow.steps[i + 1]",
                });
            }
            prev = step;
        }
        count_in("shadow.min_samples", self.min_samples, 2, 1 << 20)?;
        count_in(
            "shadow.max_samples",
            self.max_samples,
            self.min_samples,
            1 << 20,
        )?;
        in_range("shadow.significance", self.significance, 0.0, 1.0)?;
        in_range("shadow.max_error_excess", self.max_error_excess, 0.0, 1.0)?;
        in_range("shadow.latency_margin", self.latency_margin, 0.0, 1e9)?;
        duration_in(
            "shadow.backoff",
            self.backoff,
            Duration::ZERO,
            Duration::from_secs(86_400),
        )
    }
}

/// Where a trial stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialState {
    /// Failed; diverting nothing until `until`.
    BackingOff {
        /// When the trial starts over.
        until: Instant,
    },
    /// Diverting `steps[step]` of new connections.
    Ramping {
        /// Index into [`ShadowConfig::steps`].
        step: usize,
    },
    /// Every step passed.
    Trusted,
}

/// Why a step failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FailReason {
    /// Errors and resets above the local baseline.
    Errors {
        /// Local error rate.
        local: f64,
        /// The peer's.
        peer: f64,
    },
    /// The peer's latency is significantly worse.
    LatencyWorse {
        /// One-sided p-value of the Mann–Whitney U test.
        p: f64,
    },
}

/// What [`ShadowTrial::poll`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrialEvent {
    /// A step failed; backing off.
    Failed(FailReason),
    /// A step passed; diverting this fraction now.
    Ramped {
        /// The new fraction.
        fraction: f64,
    },
    /// The back-off ended; starting over at the first step.
    Resumed,
    /// The last step passed.
    Trusted,
}

/// One side of a judged step, as [`ShadowTrial::last_judgement`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Side {
    /// Connections sampled.
    pub connections: u64,
    /// Of those, ended in an error or a reset.
    pub errors: u64,
    /// Latency samples.
    pub latencies: usize,
    /// Their median.
    pub median: Option<f64>,
}

/// How the last step was judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// When.
    pub at: Instant,
    /// The step judged (index into [`ShadowConfig::steps`]).
    pub step: usize,
    /// The local baseline.
    pub local: Side,
    /// The peer.
    pub peer: Side,
    /// The one-sided p-value of "the peer's latencies, less the margin, are greater"; `None`
    /// when latencies were not compared (fewer than `min_samples` on either side: the
    /// step was judged on errors alone).
    pub p_worse: Option<f64>,
    /// Whether it passed.
    pub passed: bool,
}

/// KPI samples of one side.
#[derive(Debug, Clone, Default)]
struct Kpis {
    latencies: VecDeque<f64>,
    connections: u64,
    errors: u64,
}

impl Kpis {
    fn record(&mut self, latency: f64, error: bool, max: usize) {
        self.connections += 1;
        self.errors += u64::from(error);
        if latency.is_finite() {
            if self.latencies.len() >= max {
                self.latencies.pop_front();
            }
            self.latencies.push_back(latency);
        }
    }

    fn error_rate(&self) -> f64 {
        self.errors as f64 / self.connections.max(1) as f64
    }

    fn side(&self) -> Side {
        let mut sorted: Vec<f64> = self.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => None,
            n if n % 2 == 1 => Some(sorted[n / 2]),
            n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
        };
        Side {
            connections: self.connections,
            errors: self.errors,
            latencies: sorted.len(),
            median,
        }
    }
}

/// A shadow trial of one peer (see the module doc).
#[derive(Debug, Clone)]
pub struct ShadowTrial {
    peer: NodeId,
    config: ShadowConfig,
    state: TrialState,
    local: Kpis,
    remote: Kpis,
    /// New connections offered to [`Self::admit`] at this step, and how many were diverted.
    offered: u64,
    diverted: u64,
    last: Option<Judgement>,
}

impl ShadowTrial {
    /// A trial of `peer`, at the first step.
    pub fn new(peer: NodeId, config: ShadowConfig) -> Self {
        Self {
            peer,
            config,
            state: TrialState::Ramping { step: 0 },
            local: Kpis::default(),
            remote: Kpis::default(),
            offered: 0,
            diverted: 0,
            last: None,
        }
    }

    /// How the last step was judged, if one was.
    pub fn last_judgement(&self) -> Option<&Judgement> {
        self.last.as_ref()
    }

    /// KPI samples collected at the current step: (local, peer) connections.
    pub fn collected(&self) -> (u64, u64) {
        (self.local.connections, self.remote.connections)
    }

    /// New connections offered at the current step, and how many of them were diverted.
    pub fn offered(&self) -> (u64, u64) {
        (self.offered, self.diverted)
    }

    /// The peer on trial.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Where the trial stands.
    pub fn state(&self) -> TrialState {
        self.state
    }

    /// Fraction of new connections diverted now.
    pub fn fraction(&self) -> f64 {
        match self.state {
            TrialState::Ramping { step } => self.config.steps.get(step).copied().unwrap_or(0.0),
            TrialState::BackingOff { .. } | TrialState::Trusted => 0.0,
        }
    }

    /// Whether the new connection accepted now goes to the peer. Deterministic: exactly
    /// `fraction` of the calls, evenly spread.
    pub fn admit(&mut self) -> bool {
        self.offered += 1;
        let owed = self.fraction() * self.offered as f64 + 1e-9;
        let admit = (self.diverted + 1) as f64 <= owed;
        self.diverted += u64::from(admit);
        admit
    }

    /// A connection served locally: its latency (any unit, the same for both sides) and whether
    /// it ended in an error or reset. A non-finite latency counts only towards errors.
    pub fn record_local(&mut self, latency: f64, error: bool) {
        self.local.record(latency, error, self.config.max_samples);
    }

    /// A connection served by the peer (its KPIs as the peer reported them).
    pub fn record_peer(&mut self, latency: f64, error: bool) {
        self.remote.record(latency, error, self.config.max_samples);
    }

    /// Advances the trial: ends a back-off, or judges the current step once both sides have
    /// enough samples.
    pub fn poll(&mut self, now: Instant) -> Option<TrialEvent> {
        match self.state {
            TrialState::Trusted => None,
            TrialState::BackingOff { until } if now >= until => {
                self.restart(TrialState::Ramping { step: 0 });
                Some(TrialEvent::Resumed)
            }
            TrialState::BackingOff { .. } => None,
            TrialState::Ramping { step } => {
                let min = self.config.min_samples as u64;
                if self.local.connections < min || self.remote.connections < min {
                    return None;
                }
                // Latencies are compared when both sides have enough of them; connections
                // with no answered exchange (a download that needed no request, one whose
                // request was answered before it moved) count towards errors only.
                let min = self.config.min_samples;
                let p_worse = (self.local.latencies.len() >= min
                    && self.remote.latencies.len() >= min)
                    .then(|| {
                        let margin = self.config.latency_margin;
                        let remote: Vec<f64> =
                            self.remote.latencies.iter().map(|l| l - margin).collect();
                        let local: Vec<f64> = self.local.latencies.iter().copied().collect();
                        mann_whitney(&remote, &local).map(|t| t.p_greater)
                    })
                    .flatten();
                let (local, peer) = (self.local.error_rate(), self.remote.error_rate());
                let fail = if peer > local + self.config.max_error_excess {
                    Some(FailReason::Errors { local, peer })
                } else {
                    p_worse
                        .filter(|p| *p < self.config.significance)
                        .map(|p| FailReason::LatencyWorse { p })
                };
                self.last = Some(Judgement {
                    at: now,
                    step,
                    local: self.local.side(),
                    peer: self.remote.side(),
                    p_worse,
                    passed: fail.is_none(),
                });
                if let Some(reason) = fail {
                    self.restart(TrialState::BackingOff {
                        until: now + self.config.backoff,
                    });
                    return Some(TrialEvent::Failed(reason));
                }
                if step + 1 < self.config.steps.len() {
                    self.restart(TrialState::Ramping { step: step + 1 });
                    Some(TrialEvent::Ramped {
                        fraction: self.fraction(),
                    })
                } else {
                    self.restart(TrialState::Trusted);
                    Some(TrialEvent::Trusted)
                }
            }
        }
    }

    fn restart(&mut self, state: TrialState) {
        self.state = state;
        self.local = Kpis::default();
        self.remote = Kpis::default();
        self.offered = 0;
        self.diverted = 0;
    }
}

/// A Mann–Whitney U test of two samples, normal approximation with tie correction and
/// continuity correction (as `scipy.stats.mannwhitneyu(method="asymptotic")`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannWhitney {
    /// U of the first sample: how many (a, b) pairs have a > b (ties count ½).
    pub u: f64,
    /// Standard deviation of U under the null hypothesis, tie-corrected.
    pub sigma: f64,
    /// One-sided p-value of "the first sample tends to be larger".
    pub p_greater: f64,
    /// Two-sided p-value.
    pub p_two_sided: f64,
}

/// Runs the test on the finite values of `a` and `b`; `None` if either has none.
pub fn mann_whitney(a: &[f64], b: &[f64]) -> Option<MannWhitney> {
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, true))
        .chain(b.iter().map(|&x| (x, false)))
        .filter(|(x, _)| x.is_finite())
        .collect();
    let n1 = all.iter().filter(|(_, first)| *first).count() as f64;
    let n2 = all.len() as f64 - n1;
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (mut rank_sum, mut ties, mut i) = (0.0, 0.0, 0);
    while i < all.len() {
        let j = i + all[i..].iter().take_while(|(x, _)| *x == all[i].0).count();
        let t = (j - i) as f64;
        let rank = (i + j + 1) as f64 / 2.0; // average of ranks i+1..=j
        rank_sum += rank * all[i..j].iter().filter(|(_, first)| *first).count() as f64;
        ties += t * t * t - t;
        i = j;
    }
    let n = n1 + n2;
    let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    let sigma = var.max(0.0).sqrt();
    if sigma == 0.0 {
        return Some(MannWhitney {
            u,
            sigma,
            p_greater: 1.0,
            p_two_sided: 1.0,
        });
    }
    let p_greater = normal_sf((u - mean - 0.5) / sigma);
    let p_two_sided = (2.0 * normal_sf(((u - mean).abs() - 0.5) / sigma)).min(1.0);
    Some(MannWhitney {
        u,
        sigma,
        p_greater,
        p_two_sided,
    })
}

/// `P(Z > z)` for a standard normal Z.
fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function, fractional error below 1.2e-7 (Numerical Recipes' `erfcc`).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn mann_whitney_separated_samples() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let b = [6.0, 7.0, 8.0, 9.0, 10.0];
        let t = mann_whitney(&a, &b).unwrap();
        assert_eq!(t.u, 0.0);
        // σ = sqrt(5·5/12 · 11); scipy asymptotic two-sided p = 0.0121858.
        assert!(close(t.sigma, 4.787_135_538_781_69, 1e-12));
        assert!(
            close(t.p_two_sided, 0.012_185_780, 1e-6),
            "{}",
            t.p_two_sided
        );
        assert!(close(t.p_greater, 0.996_692_325, 1e-6), "{}", t.p_greater);
        let r = mann_whitney(&b, &a).unwrap();
        assert_eq!(r.u, 25.0);
        assert!(close(r.p_greater, 0.012_185_780 / 2.0, 1e-6));
    }

    #[test]
    fn mann_whitney_with_ties() {
        // Sorted: 1a 2a 2a 2b 3b 4b; the three 2s share rank 3. R_a = 1 + 3 + 3 = 7,
        // U_a = 7 − 6 = 1; tie term 3³ − 3 = 24; σ² = 9/12 · (7 − 24/30) = 4.65.
        let t = mann_whitney(&[1.0, 2.0, 2.0], &[2.0, 3.0, 4.0]).unwrap();
        assert_eq!(t.u, 1.0);
        assert!(close(t.sigma, 4.65f64.sqrt(), 1e-12));
        assert!(
            close(t.p_two_sided, 0.164_159_728, 1e-6),
            "{}",
            t.p_two_sided
        );
        // All equal: no evidence either way.
        let t = mann_whitney(&[1.0, 1.0], &[1.0, f64::NAN, 1.0]).unwrap();
        assert_eq!((t.u, t.p_two_sided), (2.0, 1.0));
        assert_eq!(mann_whitney(&[], &[1.0]), None);
    }

    fn trial() -> ShadowTrial {
        ShadowTrial::new(NodeId(2), ShadowConfig::default())
    }

    #[test]
    fn admits_exactly_the_fraction() {
        let mut t = trial();
        assert_eq!((0..100).filter(|_| t.admit()).count(), 5);
    }

    #[test]
    fn ramps_up_then_trusts_a_peer_as_good_as_local() {
        let mut t = trial();
        let now = Instant::from_secs(10);
        let mut events = Vec::new();
        for _ in 0..4 {
            assert_eq!(t.poll(now), None, "not enough samples");
            for i in 0..30 {
                t.record_local(10.0 + i as f64, false);
                t.record_peer(10.5 + i as f64, false);
            }
            events.push(t.poll(now).unwrap());
        }
        assert_eq!(
            events,
            [
                TrialEvent::Ramped { fraction: 0.10 },
                TrialEvent::Ramped { fraction: 0.25 },
                TrialEvent::Ramped { fraction: 0.50 },
                TrialEvent::Trusted
            ]
        );
        assert_eq!((t.state(), t.fraction()), (TrialState::Trusted, 0.0));
    }

    #[test]
    fn slower_peer_fails_backs_off_and_starts_over() {
        let mut t = trial();
        let now = Instant::from_secs(10);
        for i in 0..30 {
            t.record_local(10.0 + i as f64, false);
            t.record_peer(25.0 + i as f64, false);
        }
        let Some(TrialEvent::Failed(FailReason::LatencyWorse { p })) = t.poll(now) else {
            panic!("expected a latency failure")
        };
        assert!(p < 0.001, "{p}");
        let until = now + Duration::from_secs(60);
        assert_eq!(t.state(), TrialState::BackingOff { until });
        assert!(!t.admit());
        assert_eq!(t.poll(until - Duration::from_millis(1)), None);
        assert_eq!(t.poll(until), Some(TrialEvent::Resumed));
        assert_eq!(t.fraction(), 0.05);
    }

    #[test]
    fn a_peer_slower_by_less_than_the_margin_passes_and_one_slower_by_more_fails() {
        let now = Instant::from_secs(10);
        // 0.6 ms slower (a relay's round trip): within the 1 ms margin.
        let mut t = trial();
        for i in 0..30 {
            t.record_local(0.2 + 0.01 * i as f64, false);
            t.record_peer(0.8 + 0.01 * i as f64, false);
        }
        assert_eq!(t.poll(now), Some(TrialEvent::Ramped { fraction: 0.10 }));
        let j = t.last_judgement().unwrap();
        assert!(j.passed && j.p_worse.is_some_and(|p| p > 0.05), "{j:?}");
        // 3 ms slower: worse.
        for i in 0..30 {
            t.record_local(0.2 + 0.01 * i as f64, false);
            t.record_peer(3.2 + 0.01 * i as f64, false);
        }
        assert!(matches!(
            t.poll(now),
            Some(TrialEvent::Failed(FailReason::LatencyWorse { .. }))
        ));
    }

    #[test]
    fn without_enough_latencies_a_step_is_judged_on_errors_alone() {
        let now = Instant::from_secs(10);
        let mut t = trial();
        for _ in 0..30 {
            t.record_local(1.0, false);
            // Downloads moved after their request was answered: no latency here.
            t.record_peer(f64::NAN, false);
        }
        assert_eq!(t.poll(now), Some(TrialEvent::Ramped { fraction: 0.10 }));
        let j = t.last_judgement().unwrap();
        assert_eq!(
            (j.p_worse, j.peer.latencies, j.peer.connections),
            (None, 0, 30)
        );
        for i in 0..30 {
            t.record_local(f64::NAN, false);
            t.record_peer(f64::NAN, i < 3);
        }
        assert_eq!(
            t.poll(now),
            Some(TrialEvent::Failed(FailReason::Errors {
                local: 0.0,
                peer: 0.1
            }))
        );
    }

    #[test]
    fn erroring_peer_fails() {
        let mut t = trial();
        for i in 0..30 {
            t.record_local(10.0, false);
            t.record_peer(10.0, i % 10 == 0);
        }
        assert_eq!(
            t.poll(Instant::ZERO),
            Some(TrialEvent::Failed(FailReason::Errors {
                local: 0.0,
                peer: 0.1
            }))
        );
    }
}
