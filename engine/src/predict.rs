//! The node's predictor as the control socket and the metrics see it: the shared
//! [`NodePredictor`] that the `fs-predict` thread (`node.rs`) feeds, and `ctl plan`'s JSON.
//!
//! The logic lives in [`flowshift_core::predict`] (sans-IO); this module only renders it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use flowshift_core::predict::NodeId;
use flowshift_core::predict::class::Class;
use flowshift_core::predict::lease::{Lease, LeaseBasis, Offload};
use flowshift_core::predict::node::{Decision, LeaseRecord, NodePredictor, Outcome};
use flowshift_core::predict::plan::{Move, Status};
use flowshift_core::predict::shadow::{Judgement, Side, TrialState};
use serde_json::{Value, json};
use smoltcp::time::Instant;

use crate::metrics::PredictMetrics;

/// The predictor and the peer names its ids stand for.
pub(crate) struct Predict {
    /// Fed by the `fs-predict` thread; read by `ctl plan`, `ctl conns` and the metrics.
    pub(crate) predictor: Mutex<NodePredictor>,
    /// Tunnel peer ids and names, as the tunnel last listed them.
    pub(crate) names: Mutex<Vec<(u32, String)>>,
    /// KPIs of connections that ended here after a primary moved them here, for the next
    /// load reports (so that the primary's shadow trial gets them).
    pub(crate) kpis: Mutex<KpiOutbox>,
    /// Whether the workers hold new connections at their accept for a shadow trial
    /// ([`NodePredictor::diverts_at_accept`] as of the last sample).
    divert: AtomicBool,
    /// Set (and the `fs-predict` thread woken) when a worker's trial admitted a connection
    /// at its accept: its move is due now, not at the next sample.
    moves_due: (Mutex<bool>, Condvar),
}

/// The ended connections' KPIs this node reports to their primaries: each goes out in
/// [`KPI_SENDS`] successive load reports (a heartbeat can be lost; the primary takes each
/// connection once), at most [`flowshift_tunnel::MAX_KPI_REPORTS`] per report, oldest first.
#[derive(Debug, Default)]
pub(crate) struct KpiOutbox {
    queue: std::collections::VecDeque<(flowshift_tunnel::KpiReport, u8)>,
    /// Queued in all.
    pub(crate) queued: u64,
    /// Dropped unsent because more than [`KPI_OUTBOX`] waited.
    pub(crate) dropped: u64,
}

/// Load reports each KPI goes out in.
const KPI_SENDS: u8 = 2;
/// KPIs that may wait for a load report (six go out a second: at most ~10 s of waiting);
/// beyond, the oldest are dropped and counted.
const KPI_OUTBOX: usize = 64;

impl KpiOutbox {
    pub(crate) fn push(&mut self, k: flowshift_tunnel::KpiReport) {
        if self.queue.len() >= KPI_OUTBOX {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back((k, 0));
        self.queued += 1;
    }

    /// The KPIs for the next load report.
    pub(crate) fn next_report(&mut self) -> Vec<flowshift_tunnel::KpiReport> {
        let out: Vec<_> = self
            .queue
            .iter_mut()
            .take(flowshift_tunnel::MAX_KPI_REPORTS)
            .map(|(k, sends)| {
                *sends += 1;
                *k
            })
            .collect();
        while self
            .queue
            .front()
            .is_some_and(|(_, sends)| *sends >= KPI_SENDS)
        {
            self.queue.pop_front();
        }
        out
    }

    /// Waiting to be sent.
    pub(crate) fn waiting(&self) -> usize {
        self.queue.len()
    }
}

impl Predict {
    /// The predictor, locked (a panic elsewhere while it was held does not stop the node).
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, NodePredictor> {
        self.predictor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The predictor if no one holds it now (a worker does not wait for a sample).
    pub(crate) fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, NodePredictor>> {
        match self.predictor.try_lock() {
            Ok(p) => Some(p),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub(crate) fn new(predictor: NodePredictor) -> Self {
        Self {
            predictor: Mutex::new(predictor),
            names: Mutex::new(Vec::new()),
            kpis: Mutex::new(KpiOutbox::default()),
            divert: AtomicBool::new(false),
            moves_due: (Mutex::new(false), Condvar::new()),
        }
    }

    /// Whether the workers hold new connections at their accept (see
    /// [`Self::set_divert`]).
    pub(crate) fn diverts(&self) -> bool {
        self.divert.load(Ordering::Relaxed)
    }

    pub(crate) fn set_divert(&self, on: bool) {
        self.divert.store(on, Ordering::Relaxed);
    }

    /// Wakes the `fs-predict` thread for the shadow moves due.
    pub(crate) fn moves_due(&self) {
        let (due, cv) = &self.moves_due;
        *due.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }

    /// Sleeps up to `d`; true when woken early by [`Self::moves_due`] (cleared).
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        let (due, cv) = &self.moves_due;
        let guard = due.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, d, |due| !*due)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *guard)
    }

    /// The name of peer `id`.
    pub(crate) fn name(&self, id: NodeId) -> String {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        name_in(&names, id)
    }

    /// `ctl plan`'s reply at `now`.
    pub(crate) fn plan_json(&self, now: Instant, enforce_classes: bool) -> Value {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut v = {
            let p = self.lock();
            let mut v = plan_json(&p, &names, now);
            // Outside `plan_json`'s `json!`, which is at the macro's recursion limit.
            v["segment_conns"] = p.estimate().segment_conns.into();
            v["segments"] = p.estimate().segments.into();
            // New connections are held at their accept and offered to a trial there.
            v["shadow"]["at_accept"] = p.diverts_at_accept().into();
            v
        };
        v["classes"]["enforced"] = enforce_classes.into();
        let o = self.kpis.lock().unwrap_or_else(|e| e.into_inner());
        v["shadow"]["kpis_reported"] = json!({
            "queued": o.queued,
            "waiting": o.waiting(),
            "dropped": o.dropped,
        });
        v
    }

    /// Queues the KPIs of a connection that ended here after `primary` moved it here.
    pub(crate) fn report_kpi(&self, k: flowshift_tunnel::KpiReport) {
        self.kpis.lock().unwrap_or_else(|e| e.into_inner()).push(k);
    }

    /// The KPIs for the next load report.
    pub(crate) fn kpi_reports(&self) -> Vec<flowshift_tunnel::KpiReport> {
        self.kpis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_report()
    }

    /// This node's forecast for its load report: the peak CPU busy fraction and connections
    /// over the horizon, in the metric the predictor forecasts (the other one as it is now).
    pub(crate) fn forecast(&self) -> Option<flowshift_tunnel::LoadForecast> {
        use flowshift_core::predict::node::LoadMetric;
        let p = self.lock();
        let e = p.estimate();
        e.model?;
        let predicted = e.predicted * p.settings().capacity;
        let (cpu_busy, connections) = match p.settings().metric {
            LoadMetric::Cpu => (predicted, e.connections),
            LoadMetric::Connections => (e.cpu_busy, predicted.round().max(0.0) as u64),
            LoadMetric::Bandwidth => return None,
        };
        Some(flowshift_tunnel::LoadForecast {
            horizon: std::time::Duration::from_micros(p.config().detect.horizon.total_micros()),
            cpu_busy: cpu_busy as f32,
            connections,
        })
    }

    /// The lease renewals for this node's next load report (rotating when there are more
    /// than a report carries).
    pub(crate) fn renewals(&self) -> Vec<flowshift_tunnel::LeaseRenewal> {
        self.lock()
            .renewals(flowshift_tunnel::MAX_LEASE_RENEWALS)
            .into_iter()
            .map(|(conn, volume)| flowshift_tunnel::LeaseRenewal {
                conn,
                volume: volume.and_then(|v| std::time::Duration::try_from_secs_f64(v).ok()),
            })
            .collect()
    }

    /// The segment statistics for this node's next load report at `now`: its hottest
    /// connections (at most [`flowshift_tunnel::MAX_SEGMENT_CONNS`]), each with a summary of
    /// at most [`flowshift_tunnel::MAX_SEGMENTS_PER_CONN`] segments (the ranges before the
    /// last few merged into one).
    pub(crate) fn segment_reports(&self, now: Instant) -> Vec<flowshift_tunnel::SegmentReport> {
        let p = self.lock();
        p.hottest()
            .take(flowshift_tunnel::MAX_SEGMENT_CONNS)
            .map(|(conn, segments)| flowshift_tunnel::SegmentReport {
                conn,
                segments: segments
                    .summary(flowshift_tunnel::MAX_SEGMENTS_PER_CONN)
                    .map(|s| flowshift_tunnel::SegmentStat {
                        start: s.start,
                        len: (s.end != u64::MAX).then(|| s.end.saturating_sub(s.start)),
                        bytes: s.bytes,
                        packets: s.packets,
                        idle: if now > s.last_activity {
                            std::time::Duration::from_micros((now - s.last_activity).total_micros())
                        } else {
                            std::time::Duration::ZERO
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    /// The figures `/metrics` shows.
    pub(crate) fn metrics(&self) -> PredictMetrics {
        let p = self.lock();
        let e = p.estimate();
        PredictMetrics {
            leases: p.lease_counters(),
            leases_held: p.leases().len() as u64,
            classes: p.class_counts(),
            kpis_taken: p.kpis_taken(),
            kpis_reported: {
                let o = self.kpis.lock().unwrap_or_else(|e| e.into_inner());
                (o.queued, o.dropped)
            },
            offloads: p.offloads().count() as u64,
            segment_conns: e.segment_conns as u64,
            segments: e.segments as u64,
            counts: p.counts(),
            utilisation: e.utilisation,
            predicted: e.predicted,
            threshold: e.threshold,
        }
    }
}

fn name_in(names: &[(u32, String)], id: NodeId) -> String {
    names
        .iter()
        .find(|(i, _)| *i == id.0)
        .map_or_else(|| format!("peer {}", id.0), |(_, n)| n.clone())
}

fn ms(t: Instant) -> f64 {
    t.total_micros() as f64 / 1e3
}

fn duration_ms(d: smoltcp::time::Duration) -> f64 {
    d.total_micros() as f64 / 1e3
}

/// Finite or null.
fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// A plan's status in words.
pub(crate) fn status_text(status: &Status) -> String {
    match *status {
        Status::Balanced {
            utilisation,
            threshold,
        } => format!("balanced: utilisation {utilisation:.2} at or below threshold {threshold:.2}"),
        Status::Manual => "manual: no plan".into(),
        Status::NoTarget { utilisation } => format!(
            "no target: utilisation {utilisation:.2} above the threshold, but no peer has room \
             for any candidate"
        ),
        Status::NotDue { next } => format!("not due until {:.0} ms", ms(next)),
        Status::Shedding { from, to } => {
            format!("shedding: utilisation {from:.2} down to {to:.2} once the moves are done")
        }
        Status::Rebalancing { from, to, idlest } => format!(
            "rebalancing: utilisation {from:.2} down to {to:.2} once the moves are done, the \
             idlest peer at {idlest:.2}"
        ),
    }
}

fn status_name(status: &Status) -> &'static str {
    match status {
        Status::Balanced { .. } => "balanced",
        Status::Manual => "manual",
        Status::NoTarget { .. } => "no-target",
        Status::NotDue { .. } => "not-due",
        Status::Shedding { .. } => "shedding",
        Status::Rebalancing { .. } => "rebalancing",
    }
}

fn outcome_json(o: &Outcome) -> (&'static str, Option<&str>) {
    match o {
        Outcome::Failed(why) => ("failed", Some(why)),
        Outcome::Moved => ("moved", None),
        Outcome::NotExecuted => ("not-executed", None),
        Outcome::Pending => ("pending", None),
        Outcome::Stayed(why) => ("stayed", Some(why)),
    }
}

fn move_json(m: &Move, names: &[(u32, String)]) -> Value {
    let r = &m.reason;
    json!({
        "conn": m.conn,
        "target": name_in(names, m.target),
        "reason": r.to_string(),
        "policy": r.policy.to_string(),
        "utilisation": num(r.utilisation),
        "threshold": num(r.threshold),
        "conn_load": num(r.conn_load),
        "left_here": num(r.left),
        "return_path": r.return_path.to_string(),
        "rebalance": r.rebalance.map(num),
        "age_s": duration_ms(r.age) / 1e3,
        "cost_load_s": num(r.cost),
        "target_utilisation": num(r.target_utilisation),
        "rtt_ms": duration_ms(r.rtt),
    })
}

fn judgement_json(j: &Judgement) -> Value {
    let side = |s: &Side| {
        json!({
            "connections": s.connections,
            "errors": s.errors,
            "latencies": s.latencies,
            "median_latency_ms": s.median.map(num),
        })
    };
    json!({
        "at_ms": ms(j.at),
        "step": j.step + 1,
        "local": side(&j.local),
        "peer": side(&j.peer),
        "p_worse": j.p_worse.map(num),
        "passed": j.passed,
    })
}

fn trial_state_name(s: TrialState) -> String {
    match s {
        TrialState::BackingOff { until } => format!("backing off until {:.0} ms", ms(until)),
        TrialState::Ramping { step } => format!("ramping (step {})", step + 1),
        TrialState::Trusted => "trusted".into(),
    }
}

/// Where a lease's length came from, in words.
pub(crate) fn basis_name(b: LeaseBasis) -> &'static str {
    match b {
        LeaseBasis::Default => "default",
        LeaseBasis::Forecast => "forecast",
    }
}

/// A lease held here, for `ctl conns` and `ctl plan`.
pub(crate) fn lease_json(l: &Lease, primary: &str, now: Instant) -> Value {
    json!({
        "held": true,
        "conn": l.conn,
        "primary": primary,
        "renewed_ms": ms(l.renewed),
        "expires_ms": ms(l.expires),
        "expires_in_ms": ms(l.expires) - ms(now),
        "length_ms": duration_ms(l.expires - l.renewed),
        "basis": basis_name(l.basis),
    })
}

/// A connection this node offloaded, for `ctl conns` and `ctl plan`.
pub(crate) fn offload_json(o: &Offload, holder: &str) -> Value {
    json!({
        "held": false,
        "conn": o.conn,
        "holder": holder,
        "remote_id": o.remote,
        "since_ms": ms(o.since),
        "load": num(o.load),
        "volume_s": o.volume().map(num),
        "renewing": o.renew,
    })
}

fn lease_record_json(r: &LeaseRecord, names: &[(u32, String)]) -> Value {
    let (outcome, detail) = match &r.outcome {
        Outcome::Moved => ("returned", None),
        Outcome::Pending => ("pending", None),
        Outcome::Failed(why) | Outcome::Stayed(why) => ("kept", Some(why.as_str())),
        Outcome::NotExecuted => ("not-executed", None),
    };
    json!({
        "at_ms": ms(r.at),
        "conn": r.conn,
        "primary": name_in(names, r.primary),
        "outcome": outcome,
        "detail": detail,
    })
}

fn decision_json(d: &Decision, names: &[(u32, String)]) -> Value {
    let (outcome, detail) = outcome_json(&d.outcome);
    let r = &d.reason;
    json!({
        "at_ms": ms(d.at),
        "conn": d.conn,
        "target": name_in(names, d.target),
        "current_utilisation": num(d.current),
        "utilisation": num(r.utilisation),
        "threshold": num(r.threshold),
        "conn_load": num(r.conn_load),
        "left_here": num(r.left),
        "return_path": r.return_path.to_string(),
        "rebalance": r.rebalance.map(num),
        "target_utilisation": num(r.target_utilisation),
        "reason": r.to_string(),
        "outcome": outcome,
        "detail": detail,
    })
}

/// `ctl plan`'s reply: settings, the estimate of the last sample, the last plan, the counts
/// and the last decisions (oldest first). Times are milliseconds since the node started.
pub(crate) fn plan_json(p: &NodePredictor, names: &[(u32, String)], now: Instant) -> Value {
    let s = p.settings();
    let c = p.config();
    let e = p.estimate();
    let counts = p.counts();
    let lc = p.lease_counters();
    let trials: Vec<Value> = p
        .trials()
        .map(|t| {
            let (local, peer) = t.collected();
            let (offered, diverted) = t.offered();
            json!({
                "peer": name_in(names, t.peer()),
                "state": trial_state_name(t.state()),
                "fraction": num(t.fraction()),
                "offered": offered,
                "diverted": diverted,
                "samples": {"local": local, "peer": peer},
                "last_judgement": t.last_judgement().map(judgement_json),
            })
        })
        .collect();
    let kpis_taken = json!({"local": p.kpis_taken().0, "from_peers": p.kpis_taken().1});
    json!({
        "policy": s.policy.to_string(),
        "executes": p.executes(),
        "metric": s.metric.as_str(),
        "capacity": num(s.capacity),
        "interval_ms": duration_ms(c.interval),
        "horizon_ms": duration_ms(c.detect.horizon),
        "replan_interval_ms": duration_ms(c.plan.replan_interval),
        "max_moves": c.plan.max_moves,
        "hysteresis": num(c.plan.hysteresis),
        "reactive_threshold": num(c.plan.reactive_threshold),
        "rebalance": c.plan.rebalance,
        "imbalance_threshold": num(c.detect.imbalance_threshold),
        "now_ms": ms(now),
        "sampled_at_ms": e.at.map(ms),
        "load": num(e.load),
        "utilisation": num(e.utilisation),
        "predicted_utilisation": num(e.predicted),
        "confident_utilisation": num(e.confident),
        "horizon_rmse": e.horizon_rmse.map(num),
        "model": e.model.map(|m| m.to_string()),
        "mape": e.mape.map(num),
        "threshold": num(e.threshold),
        "peak_utilisation": num(e.peak_utilisation),
        "cpu_busy": num(e.cpu_busy),
        "cpu_time": e.cpu_time.map(num),
        "connections": e.connections,
        "candidates": e.candidates,
        "peers": e.peers.iter().map(|peer| json!({
            "name": name_in(names, peer.id),
            "alive": peer.alive,
            "load": num(peer.load),
            "utilisation": num(peer.utilisation),
            "predicted": num(peer.predicted),
            "rtt_ms": duration_ms(peer.rtt),
            "return_path": peer.return_path.to_string(),
        })).collect::<Vec<_>>(),
        "imbalance": e.imbalance.map(|i| {
            let who = |id: NodeId| if id.0 == u32::MAX { "self".to_owned() } else { name_in(names, id) };
            json!({
                "busiest": who(i.busiest.0),
                "busiest_utilisation": num(i.busiest.1),
                "idlest": who(i.idlest.0),
                "idlest_utilisation": num(i.idlest.1),
            })
        }),
        "plan": p.last_plan().map(|(at, plan)| json!({
            "at_ms": ms(*at),
            "status": status_name(&plan.status),
            "status_text": status_text(&plan.status),
            "moves": plan.moves.iter().map(|m| move_json(m, names)).collect::<Vec<_>>(),
        })),
        "counts": {
            "samples": counts.samples,
            "plans": counts.plans,
            "planned": counts.planned,
            "executed": counts.executed,
            "failed": counts.failed,
        },
        "decisions": p.decisions().map(|d| decision_json(d, names)).collect::<Vec<_>>(),
        "leases": {
            "min_lease_ms": duration_ms(c.lease.min_lease),
            "max_lease_ms": duration_ms(c.lease.max_lease),
            "default_lease_ms": duration_ms(c.lease.default_lease),
            "utilisation_threshold": num(c.lease.utilisation_threshold),
            "held": p.leases().iter().map(|l| lease_json(l, &name_in(names, l.primary), now)).collect::<Vec<_>>(),
            "offloaded": p.offloads().map(|o| offload_json(o, &name_in(names, o.holder))).collect::<Vec<_>>(),
            "counts": {
                "granted": lc.granted,
                "renewed": lc.renewed,
                "expired": lc.expired,
                "returned": lc.returned,
                "kept": lc.kept,
            },
            "expired": p.lease_log().map(|r| lease_record_json(r, names)).collect::<Vec<_>>(),
        },
        "classes": {
            "enforced": false,
            "bounds_bytes_per_sec": c.class.bounds,
            "margin": num(c.class.margin),
            "counts": Class::ALL.iter().zip(p.class_counts()).map(|(k, n)| {
                let a = c.class.allocation(*k);
                json!({
                    "class": k.as_str(),
                    "connections": n,
                    "rate_limit_bytes_per_sec": a.rate_limit,
                    "buffer_budget": a.buffer_budget,
                    "priority": a.priority,
                })
            }).collect::<Vec<_>>(),
        },
        "shadow": {
            "enabled": s.shadow && p.executes(),
            "steps": c.shadow.steps,
            "min_samples": c.shadow.min_samples,
            "latency_margin_ms": c.shadow.latency_margin,
            "trials": trials,
            "shadowed": counts.shadowed,
            "failed": counts.shadow_failed,
            "kpis_taken": kpis_taken,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kpi_goes_out_in_two_reports_a_dozen_at_a_time_and_the_oldest_overflow() {
        let k = |conn| flowshift_tunnel::KpiReport {
            conn,
            latency: None,
            error: false,
        };
        let mut o = KpiOutbox::default();
        for c in 0..20 {
            o.push(k(c));
        }
        let ids =
            |v: Vec<flowshift_tunnel::KpiReport>| v.iter().map(|k| k.conn).collect::<Vec<_>>();
        assert_eq!(ids(o.next_report()), (0..12).collect::<Vec<_>>());
        assert_eq!(ids(o.next_report()), (0..12).collect::<Vec<_>>());
        assert_eq!(ids(o.next_report()), (12..20).collect::<Vec<_>>());
        assert_eq!(ids(o.next_report()), (12..20).collect::<Vec<_>>());
        assert!(o.next_report().is_empty());
        for c in 0..(KPI_OUTBOX as u64 + 3) {
            o.push(k(c));
        }
        assert_eq!(
            (o.waiting(), o.dropped, o.queued),
            (KPI_OUTBOX, 3, 20 + KPI_OUTBOX as u64 + 3)
        );
        assert_eq!(o.next_report()[0].conn, 3);
    }
    use flowshift_core::predict::PredictConfig;
    use flowshift_core::predict::node::{
        ConnSample, LoadMetric, NodeSettings, Observation, PeerSample,
    };
    use flowshift_core::predict::plan::{Policy, ReturnPath};
    use flowshift_core::predict::profile::{ConnCounters, ConnReport, NodeReport};

    #[test]
    fn plan_json_shows_the_plan_its_reasons_and_the_decisions() {
        let mut p = NodePredictor::new(
            PredictConfig::default(),
            NodeSettings {
                policy: Policy::Reactive,
                metric: LoadMetric::Connections,
                capacity: 8.0,
                ..NodeSettings::default()
            },
        );
        let conns: Vec<ConnSample> = (1..=8)
            .map(|id| ConnSample {
                report: ConnReport {
                    conn: id,
                    counters: ConnCounters::default(),
                    opened_at: Instant::ZERO,
                    priority: Default::default(),
                },
                here: true,
                movable: true,
                buffered: 0,
                ingress: None,
            })
            .collect();
        let peers = [PeerSample {
            id: NodeId(7),
            alive: true,
            cpu_busy: 0.1,
            connections: 0,
            bandwidth: 0.0,
            forecast: None,
            rtt: smoltcp::time::Duration::from_millis(1),
            return_path: ReturnPath::Relay,
        }];
        let now = Instant::from_secs(10);
        let obs = Observation {
            node: NodeReport::default(),
            conns: &conns,
            peers: &peers,
        };
        let plan = p.handle_sample(now, &obs).expect("a plan");
        // 8 of 8: shed to 0.75 of capacity, two moves.
        assert_eq!(plan.moves.len(), 2);
        let first = plan.moves[0].conn;
        p.record(now, first, NodeId(7), Outcome::Moved);
        let v = plan_json(&p, &[(7, "b".into())], now);
        assert_eq!(v["policy"], "reactive");
        assert_eq!(v["executes"], true);
        assert_eq!(v["metric"], "connections");
        assert_eq!(v["utilisation"], 1.0);
        assert_eq!(v["plan"]["status"], "shedding");
        assert_eq!(v["plan"]["moves"][0]["target"], "b");
        let reason = v["plan"]["moves"][0]["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("current utilisation 1.00 above threshold 0.85"),
            "{reason}"
        );
        assert_eq!(v["peers"][0]["name"], "b");
        assert_eq!(v["counts"]["executed"], 1);
        assert_eq!(v["decisions"][0]["outcome"], "moved");
        assert_eq!(v["decisions"][0]["at_ms"], 10_000.0);
        assert_eq!(v["decisions"][1]["outcome"], "pending");
    }
}
