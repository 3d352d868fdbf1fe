//! `flowshift-bench sim`: the prediction simulator (`flowshift_core::predict::sim`) run over
//! every workload × policy with several seeds. Needs no root and no network: it is arithmetic.
//!
//! Prints a markdown table (median and min–max over seeds), writes `sim.json` and `sim.md`, and
//! draws with plotters into `--out`: `sim-<workload>.svg` (every node's utilisation over time,
//! the highest of every second, under each policy, first seed, with the capacity line) and
//! `sim-overload.svg` (median overload-seconds and moves per workload, reactive vs predictive).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use flowshift_core::predict::sim::{self, SimConfig, SimPolicy, SimResult, Workload};
use plotters::prelude::*;
use serde::Serialize;
use smoltcp::time::Duration;

use crate::plot;

/// Arguments of `flowshift-bench sim`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Seeds per workload and policy (seeds 1..=N).
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Simulated seconds per run.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Nodes in the group.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Freeze per move, ms (the move's fixed cost; see docs/prediction.md for where the
    /// default comes from).
    #[arg(long, default_value_t = 5.0)]
    freeze_ms: f64,
    /// Extra freeze per MiB a move copies, ms.
    #[arg(long, default_value_t = 1.0)]
    per_mib_ms: f64,
    /// Share of a moved connection's load that stays on its home node, which forwards its
    /// packets (0: the target returns replies directly; docs/prediction.md).
    #[arg(long, default_value_t = 0.0)]
    relay_share: f64,
    /// How long a node counts what it moved to a peer on top of the peer's load reports, ms
    /// (the node's `report_delay_ms`; 0: the reports alone).
    #[arg(long, default_value_t = 3000)]
    floor_hold_ms: u64,
    /// How many of its errors at the horizon a node's predicted peak must stand above its
    /// current utilisation to count (`detect.confidence`; 0: the forecast as it is).
    #[arg(long, default_value_t = 0.0)]
    confidence: f64,
    /// Rebalance under the threshold onto the idlest peer (`plan.rebalance`), for both
    /// policies.
    #[arg(long, default_value_t = false)]
    rebalance: bool,
    /// Workloads to run, comma-separated (default: step, ramp, diurnal, flash-crowd,
    /// heavy-tail); `scale-out` is a group with an empty node, for `--rebalance`.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Where the table, JSON and plots go.
    #[arg(long, default_value = "bench-results/sim")]
    out: PathBuf,
}

/// One row of the table: a workload under a policy, over all seeds.
#[derive(Serialize)]
struct Row {
    workload: &'static str,
    policy: &'static str,
    overload_seconds: Spread,
    backlog_seconds: Spread,
    max_delay_ms: Spread,
    moves: Spread,
    conns_affected: Spread,
    conns: Spread,
    freeze_seconds: Spread,
    forecast_mape: Spread,
    first_move: Spread,
    first_overload: Spread,
}

/// Median, min and max over seeds (of the runs where the figure exists).
#[derive(Serialize, Clone, Copy)]
struct Spread {
    /// Runs where the figure exists (no first move in a run without moves).
    runs: usize,
    /// Runs in all.
    of: usize,
    median: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = Option<f64>>) -> Self {
        let all: Vec<Option<f64>> = values.into_iter().collect();
        let mut v: Vec<f64> = all.iter().flatten().copied().collect();
        v.sort_by(f64::total_cmp);
        let median = (!v.is_empty()).then(|| {
            let m = v.len() / 2;
            if v.len() % 2 == 1 {
                v[m]
            } else {
                (v[m - 1] + v[m]) / 2.0
            }
        });
        Self {
            runs: v.len(),
            of: all.len(),
            median,
            min: v.first().copied(),
            max: v.last().copied(),
        }
    }

    fn show(&self, digits: usize) -> String {
        let figure = match (self.median, self.min, self.max) {
            (Some(m), Some(lo), Some(hi)) if (hi - lo).abs() < 1e-12 => format!("{m:.digits$}"),
            (Some(m), Some(lo), Some(hi)) => format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})"),
            _ => return "–".into(),
        };
        if self.runs < self.of {
            format!("{figure} [{} of {} runs]", self.runs, self.of)
        } else {
            figure
        }
    }
}

/// Per-run figures for the JSON (without the utilisation traces).
#[derive(Serialize)]
struct Run {
    workload: &'static str,
    policy: &'static str,
    seed: u64,
    overload_seconds: f64,
    backlog_seconds: f64,
    max_delay_ms: f64,
    moves: u64,
    conns_affected: u64,
    conns: u64,
    freeze_seconds: f64,
    forecast_mape: Option<f64>,
    first_move: Option<f64>,
    first_overload: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    seeds: u64,
    freeze_ms: f64,
    per_mib_ms: f64,
    relay_share: f64,
    floor_hold_ms: u64,
    confidence: f64,
    rebalance: bool,
    duration_s: u64,
    nodes: usize,
    rows: Vec<Row>,
    runs: Vec<Run>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let mut config = SimConfig {
        nodes: args.nodes.max(2),
        duration: Duration::from_secs(args.duration.max(10)),
        ..SimConfig::default()
    };
    if !(0.0..=10.0).contains(&args.relay_share) {
        anyhow::bail!("--relay-share {} is not within 0–10", args.relay_share);
    }
    config.relay_share = args.relay_share;
    config.floor_hold = Duration::from_millis(args.floor_hold_ms.min(3_600_000));
    config.predict.detect.confidence = args.confidence;
    config.predict.plan.rebalance = args.rebalance;
    let workloads: Vec<Workload> = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|n| Workload::by_name(n).ok_or_else(|| anyhow!("no workload named {n:?}")))
            .collect::<anyhow::Result<_>>()?
    };
    let micros = |ms: f64| Duration::from_micros((ms.clamp(0.0, 60_000.0) * 1000.0).round() as u64);
    config.predict.plan.migration_cost.freeze = micros(args.freeze_ms);
    config.predict.plan.migration_cost.per_mib = micros(args.per_mib_ms);
    config
        .predict
        .validate()
        .map_err(|e| anyhow!("simulator's predictor config: {e}"))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let mut md = String::new();
    writeln!(
        md,
        "{} nodes, {} s, seeds 1..={}, move freeze {} ms + {} ms/MiB, relay share {}, moves counted on their target for {} ms, confidence {}, rebalance {}; median (min–max) over seeds\n",
        config.nodes,
        args.duration,
        args.seeds,
        args.freeze_ms,
        args.per_mib_ms,
        args.relay_share,
        args.floor_hold_ms,
        args.confidence,
        args.rebalance
    )?;
    md.push_str(
        "| workload | policy | overload-s | backlog-s | max delay (ms) | moves | conns moved | forecast MAPE | first move (s) | first overload (s) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &w in &workloads {
        let mut traces: Vec<(SimPolicy, Vec<Vec<f32>>)> = Vec::new();
        for policy in SimPolicy::ALL {
            let results: Vec<SimResult> = (1..=args.seeds.max(1))
                .map(|seed| sim::run(&config, w, policy, seed))
                .collect();
            let spread = |f: &dyn Fn(&SimResult) -> Option<f64>| Spread::of(results.iter().map(f));
            let row = Row {
                workload: w.name(),
                policy: policy.name(),
                overload_seconds: spread(&|r| Some(r.overload_seconds)),
                backlog_seconds: spread(&|r| Some(r.backlog_seconds)),
                max_delay_ms: spread(&|r| Some(r.max_delay * 1e3)),
                moves: spread(&|r| Some(r.moves as f64)),
                conns_affected: spread(&|r| Some(r.conns_affected as f64)),
                conns: spread(&|r| Some(r.conns as f64)),
                freeze_seconds: spread(&|r| Some(r.freeze_seconds)),
                forecast_mape: spread(&|r| r.forecast_mape.map(|m| m * 100.0)),
                first_move: spread(&|r| r.first_move),
                first_overload: spread(&|r| r.first_overload),
            };
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} % | {} | {} |",
                row.workload,
                row.policy,
                row.overload_seconds.show(1),
                row.backlog_seconds.show(1),
                row.max_delay_ms.show(0),
                row.moves.show(0),
                row.conns_affected.show(0),
                row.forecast_mape.show(1),
                row.first_move.show(1),
                row.first_overload.show(1),
            )?;
            rows.push(row);
            runs.extend(results.iter().map(|r| Run {
                workload: w.name(),
                policy: policy.name(),
                seed: r.seed,
                overload_seconds: r.overload_seconds,
                backlog_seconds: r.backlog_seconds,
                max_delay_ms: r.max_delay * 1e3,
                moves: r.moves,
                conns_affected: r.conns_affected,
                conns: r.conns,
                freeze_seconds: r.freeze_seconds,
                forecast_mape: r.forecast_mape,
                first_move: r.first_move,
                first_overload: r.first_overload,
            }));
            if let Some(first) = results.into_iter().next() {
                traces.push((policy, first.utilisation));
            }
        }
        let path = args.out.join(format!("sim-{}.svg", w.name()));
        plot_utilisation(&path, w, &traces, tick_seconds(&config))?;
    }
    md.push('\n');
    md.push_str(&comparison(&rows, &workloads));
    let path = args.out.join("sim-overload.svg");
    plot_overload(&path, &rows, &workloads)?;

    let report = Report {
        seeds: args.seeds,
        freeze_ms: args.freeze_ms,
        per_mib_ms: args.per_mib_ms,
        relay_share: args.relay_share,
        floor_hold_ms: args.floor_hold_ms,
        confidence: args.confidence,
        rebalance: args.rebalance,
        duration_s: args.duration,
        nodes: config.nodes,
        rows,
        runs,
    };
    std::fs::write(
        args.out.join("sim.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("sim.md"), &md)?;
    println!("{md}");
    println!(
        "wrote sim.json, sim.md and the plots to {}",
        args.out.display()
    );
    Ok(())
}

fn tick_seconds(config: &SimConfig) -> f64 {
    config.predict.interval.total_micros() as f64 / 1e6
}

/// Predictive against reactive, per workload, on the medians.
fn comparison(rows: &[Row], workloads: &[Workload]) -> String {
    let mut out = String::from(
        "| workload | overload-s: predictive vs reactive | max delay: predictive vs reactive | moves: predictive vs reactive |\n|---|---|---|---|\n",
    );
    for &w in workloads {
        let get = |p: SimPolicy| {
            rows.iter()
                .find(|r| r.workload == w.name() && r.policy == p.name())
        };
        let (Some(pred), Some(reac)) = (get(SimPolicy::Predictive), get(SimPolicy::Reactive))
        else {
            continue;
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:+.0} %", (a / b - 1.0) * 100.0),
            (Some(0.0), Some(_)) => "both 0".into(),
            (Some(a), Some(_)) => format!("{a:.1} vs 0"),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            w.name(),
            ratio(pred.overload_seconds.median, reac.overload_seconds.median),
            ratio(pred.max_delay_ms.median, reac.max_delay_ms.median),
            ratio(pred.moves.median, reac.moves.median),
        );
    }
    out
}

/// Nodes' colours: indexes into [`plot::PALETTE`].
const NODE_COLOURS: [usize; 4] = [3, 0, 2, 4];

/// One panel per policy: every node's utilisation over time, and the capacity line.
fn plot_utilisation(
    path: &Path,
    w: Workload,
    traces: &[(SimPolicy, Vec<Vec<f32>>)],
    tick_s: f64,
) -> anyhow::Result<()> {
    plot::svg(path, (900, 300 * traces.len() as u32), |root| {
        utilisation_panels(root, w, traces, tick_s)
    })
}

fn utilisation_panels(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    w: Workload,
    traces: &[(SimPolicy, Vec<Vec<f32>>)],
    tick_s: f64,
) -> anyhow::Result<()> {
    let panels = root.split_evenly((traces.len(), 1));
    let max_u = traces
        .iter()
        .flat_map(|(_, t)| t.iter().flatten())
        .fold(1.2f32, |m, u| m.max(*u)) as f64;
    for ((policy, nodes), area) in traces.iter().zip(panels) {
        let end = nodes.first().map_or(0, Vec::len) as f64 * tick_s;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{}: policy {}", w.name(), policy.name()),
                plot::CAPTION,
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..end, 0.0..max_u * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("utilisation (max per second)")
            .draw()?;
        // The highest utilisation of every second, so that the SVG stays small and short
        // overloads still show.
        let per_bin = ((1.0 / tick_s).round() as usize).max(1);
        for (n, trace) in nodes.iter().enumerate() {
            let colour = plot::PALETTE[NODE_COLOURS[n % NODE_COLOURS.len()]];
            chart
                .draw_series(LineSeries::new(
                    trace.chunks(per_bin).enumerate().map(|(b, bin)| {
                        let peak = bin.iter().fold(0.0f32, |m, u| m.max(*u));
                        ((b * per_bin) as f64 * tick_s, f64::from(peak))
                    }),
                    colour.stroke_width(1),
                ))?
                .label(format!("node {n}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (end, 1.0)],
                BLACK.stroke_width(2),
            ))?
            .label("capacity")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        plot::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

/// Reactive against predictive per workload: median overload-seconds and median moves, the
/// whisker spanning min–max over seeds. (No policy is left out: it is two orders of magnitude
/// above both; the table has it.)
fn plot_overload(path: &Path, rows: &[Row], workloads: &[Workload]) -> anyhow::Result<()> {
    plot::svg(path, (900, 640), |root| {
        let (top, bottom) = root.split_vertically(320);
        bars(&top, rows, workloads, "overload-seconds", |r| {
            r.overload_seconds
        })?;
        bars(&bottom, rows, workloads, "moves", |r| r.moves)
    })
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    rows: &[Row],
    workloads: &[Workload],
    what: &str,
    metric: fn(&Row) -> Spread,
) -> anyhow::Result<()> {
    let policies = [
        (SimPolicy::Reactive, plot::PALETTE[1]),
        (SimPolicy::Predictive, plot::PALETTE[0]),
    ];
    let names: Vec<String> = workloads.iter().map(|w| w.name().to_owned()).collect();
    let find = |w: Workload, p: SimPolicy| {
        rows.iter()
            .find(|r| r.workload == w.name() && r.policy == p.name())
            .map(metric)
    };
    let max = workloads
        .iter()
        .flat_map(|w| policies.iter().filter_map(|(p, _)| find(*w, *p)?.max))
        .fold(0.1f64, f64::max);
    let n = workloads.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{what}: reactive vs predictive (median, whisker min–max)"),
            plot::CAPTION,
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..max * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| plot::category_label(&names, *x))
        .y_desc(what)
        .draw()?;
    for (k, (policy, colour)) in policies.into_iter().enumerate() {
        let spreads: Vec<(f64, Spread)> = workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| Some((i as f64 - 0.3 + 0.3 * k as f64, find(*w, policy)?)))
            .collect();
        chart
            .draw_series(spreads.iter().map(|(x0, s)| {
                Rectangle::new(
                    [(*x0, 0.0), (x0 + 0.28, s.median.unwrap_or(0.0))],
                    colour.filled(),
                )
            }))?
            .label(policy.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        chart.draw_series(spreads.iter().map(|(x0, s)| {
            let x = x0 + 0.14;
            PathElement::new(
                [(x, s.min.unwrap_or(0.0)), (x, s.max.unwrap_or(0.0))],
                BLACK,
            )
        }))?;
    }
    plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)
}
