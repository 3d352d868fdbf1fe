//! `flowshift-bench repair`: the kernel baseline of live migration. One kernel TCP connection
//! carrying a bulk download is handed between node-a and node-b with Linux TCP_REPAIR (what
//! CRIU and Prism do), N times, and the client measures each handoff: the longest gap between
//! two reads around it (the stall), and its throughput before and after. The handoff machinery
//! (capture, restore, route switch, the checked client) is `flowshift_testbed::kernel_handoff`;
//! this module turns its raw record into statistics and a report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::sys;
use flowshift_testbed::kernel_handoff::{self, HandoffOptions, HandoffRun};
use flowshift_testbed::{Testbed, TestbedOptions};

/// Arguments of `flowshift-bench repair`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Handoffs to do (A→B, B→A, …).
    #[arg(long, default_value_t = 100)]
    handoffs: usize,
    /// Milliseconds from the start of one handoff to the start of the next. Below 500 some
    /// handoffs stall until the next one (the client rate-limits its answers to the restored
    /// socket's window probe: net.ipv4.tcp_invalid_ratelimit).
    #[arg(long, default_value_t = 600)]
    interval_ms: u64,
    /// Milliseconds of download before the first handoff (also the no-handoff control).
    #[arg(long, default_value_t = 2000)]
    warmup_ms: u64,
    /// No handoff starts later than this many seconds into the download.
    #[arg(long, default_value_t = 90)]
    max_seconds: u64,
    /// The stall window starts this many milliseconds before each freeze…
    #[arg(long, default_value_t = 50)]
    before_ms: u64,
    /// …and ends this many milliseconds after each restore.
    #[arg(long, default_value_t = 200)]
    after_ms: u64,
    /// Bytes per second the client reads at (default: as fast as it can).
    #[arg(long)]
    client_rate: Option<u64>,
    /// veth MTU of every link in the testbed.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// TCP port of the service.
    #[arg(long, default_value_t = 7019)]
    port: u16,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write repair.json and repair.md into this directory.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// Options of [`run_kernel_handoffs`].
#[derive(Debug, Clone)]
pub(crate) struct RepairOptions {
    /// How the handoffs run.
    pub(crate) handoff: HandoffOptions,
    /// The stall window starts this long before each freeze…
    pub(crate) before: Duration,
    /// …and ends this long after each restore.
    pub(crate) after: Duration,
}

impl Default for RepairOptions {
    fn default() -> Self {
        let after = Duration::from_millis(200);
        Self {
            handoff: HandoffOptions {
                warmup: Duration::from_secs(2),
                settle: after + Duration::from_millis(100),
                ..HandoffOptions::default()
            },
            before: Duration::from_millis(50),
            after,
        }
    }
}

/// p50, p90, p99, max and mean of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Summary {
    /// Over the finite values of `v` (all zero when there are none).
    pub(crate) fn of(mut v: Vec<f64>) -> Summary {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Summary {
            n: v.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }
}

/// Median time of each step of a handoff, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Phases {
    /// Stopping the sending application on the source.
    pub(crate) pause_us: f64,
    /// Blackholing the router's route (the network lock).
    pub(crate) lock_us: f64,
    /// Repair mode on the source and reading its state and queues.
    pub(crate) capture_us: f64,
    /// Rebuilding the socket on the target (bind, sequence numbers, connect, options, queues,
    /// window).
    pub(crate) restore_us: f64,
    /// Pointing the router's route at the target.
    pub(crate) route_us: f64,
    /// Leaving repair mode on the target (sends the window probe).
    pub(crate) unrepair_us: f64,
}

/// One handoff as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PerHandoff {
    pub(crate) from: String,
    pub(crate) to: String,
    /// Stream bytes written when the application was paused.
    pub(crate) stream_offset: u64,
    pub(crate) send_queue_bytes: usize,
    pub(crate) unsent_bytes: usize,
    /// Freeze to restore, microseconds.
    pub(crate) downtime_us: f64,
    /// Longest gap between two client reads in the window, milliseconds.
    pub(crate) stall_ms: f64,
    pub(crate) gbit_s_before: f64,
    pub(crate) gbit_s_after: f64,
}

/// The kernel baseline's results.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HandoffStats {
    pub(crate) machine: String,
    pub(crate) kernel: String,
    pub(crate) veth_mtu: u16,
    pub(crate) handoffs_requested: usize,
    pub(crate) handoffs_done: usize,
    pub(crate) interval_ms: f64,
    pub(crate) window_before_ms: f64,
    pub(crate) window_after_ms: f64,
    /// Bytes the client received, all checked against the counting stream; the end of stream
    /// came after exactly the bytes written, the CRC-32s agree, and there was no reset
    /// (otherwise the run fails).
    pub(crate) bytes: u64,
    pub(crate) crc32: String,
    pub(crate) byte_exact: bool,
    pub(crate) resets: u32,
    pub(crate) duration_s: f64,
    /// Mean download rate over the whole run.
    pub(crate) gbit_s: f64,
    /// Share of the machine's CPU time the hypervisor gave to other guests during the run.
    pub(crate) steal_percent: f64,
    /// Handoffs per second during the handoff phase (set by the interval).
    pub(crate) handoffs_per_s: f64,
    /// 1 / mean downtime: handoffs per second if nothing else ran.
    pub(crate) max_handoffs_per_s: f64,
    /// Freeze to restore, microseconds.
    pub(crate) downtime_us: Summary,
    /// The kernel's part of it: route to blackhole → repair off on the target (without
    /// pausing the application), microseconds.
    pub(crate) repair_us: Summary,
    /// Longest gap between two client reads from `before` ahead of the freeze to `after`
    /// past the restore, milliseconds.
    pub(crate) stall_ms: Summary,
    /// The same over windows of the same length in the warm-up, with no handoff.
    pub(crate) control_gap_ms: Summary,
    /// Client throughput over `before` ahead of the freeze.
    pub(crate) gbit_s_before: Summary,
    /// Client throughput over `after` past the restore.
    pub(crate) gbit_s_after: Summary,
    pub(crate) phases: Phases,
    pub(crate) send_queue_bytes: Summary,
    pub(crate) unsent_bytes: Summary,
    pub(crate) per_handoff: Vec<PerHandoff>,
}

/// Runs the kernel TCP_REPAIR handoffs on `tb` (see `flowshift_testbed::kernel_handoff::run`:
/// node-a and node-b get the service address on their loopback for the run, so no flowshift
/// node may serve it there meanwhile) and computes the statistics. Fails unless the stream was
/// byte-exact without reset.
pub(crate) fn run_kernel_handoffs(
    tb: &Testbed,
    opts: &RepairOptions,
) -> anyhow::Result<HandoffStats> {
    let (steal0, t0) = (sys::machine_steal_seconds(), std::time::Instant::now());
    let run = kernel_handoff::run(tb, &opts.handoff).context("kernel TCP_REPAIR handoffs")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let steal =
        100.0 * (sys::machine_steal_seconds() - steal0) / (t0.elapsed().as_secs_f64() * cores);
    let mut s = stats(&run, opts, tb_mtu(tb));
    s.steal_percent = steal;
    Ok(s)
}

/// The veth MTU of the testbed (read back from the client's link).
fn tb_mtu(tb: &Testbed) -> u16 {
    tb.client()
        .exec("cat", &["/sys/class/net/eth0/mtu"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// Longest gap between consecutive reads whose interval overlaps `[w0, w1]` (nanoseconds);
/// a gap that starts before the window or ends after it counts whole.
fn max_gap(reads: &[(u64, u64)], w0: u64, w1: u64) -> u64 {
    let first = reads.partition_point(|r| r.0 <= w0).saturating_sub(1);
    reads[first..]
        .windows(2)
        .take_while(|p| p[0].0 < w1)
        .map(|p| p[1].0 - p[0].0)
        .max()
        .unwrap_or(0)
}

/// Bytes received by time `t` (nanoseconds).
fn received_by(reads: &[(u64, u64)], t: u64) -> u64 {
    match reads.partition_point(|r| r.0 <= t) {
        0 => 0,
        i => reads[i - 1].1,
    }
}

fn gbit_s(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
    }
}

fn stats(run: &HandoffRun, o: &RepairOptions, mtu: u16) -> HandoffStats {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let per: Vec<PerHandoff> = run
        .handoffs
        .iter()
        .map(|h| {
            let w0 = ns(h.freeze.saturating_sub(o.before));
            let w1 = ns(h.restored + o.after);
            let before = received_by(&run.reads, ns(h.freeze))
                - received_by(&run.reads, ns(h.freeze.saturating_sub(o.before)));
            let after = received_by(&run.reads, ns(h.restored + o.after))
                - received_by(&run.reads, ns(h.restored));
            PerHandoff {
                from: format!("{:?}", h.from),
                to: format!("{:?}", h.to),
                stream_offset: h.stream_offset,
                send_queue_bytes: h.send_queue,
                unsent_bytes: h.unsent,
                downtime_us: us(h.downtime()),
                stall_ms: max_gap(&run.reads, w0, w1) as f64 / 1e6,
                gbit_s_before: gbit_s(before, o.before),
                gbit_s_after: gbit_s(after, o.after),
            }
        })
        .collect();
    // Control: windows as long as a handoff's, in the warm-up after the first 500 ms (the
    // connection's slow start), with no handoff in them.
    let len = o.before + o.after + Duration::from_millis(1);
    let mut control = Vec::new();
    let mut t = Duration::from_millis(500).max(
        run.reads
            .first()
            .map_or(Duration::ZERO, |r| Duration::from_nanos(r.0)),
    );
    while t + len <= run.warmup_end {
        control.push(max_gap(&run.reads, ns(t), ns(t + len)) as f64 / 1e6);
        t += len;
    }
    let median = |f: fn(&kernel_handoff::HandoffRecord) -> Duration| {
        Summary::of(run.handoffs.iter().map(|h| us(f(h))).collect()).p50
    };
    let downtime = Summary::of(per.iter().map(|p| p.downtime_us).collect());
    let span = match (run.handoffs.first(), run.handoffs.last()) {
        (Some(a), Some(b)) => b.restored.saturating_sub(a.freeze),
        _ => Duration::ZERO,
    };
    HandoffStats {
        machine: format!(
            "{} ({} cores)",
            sys::cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        kernel: sys::kernel_release(),
        veth_mtu: mtu,
        handoffs_requested: run.requested,
        handoffs_done: run.handoffs.len(),
        interval_ms: o.handoff.interval.as_secs_f64() * 1e3,
        window_before_ms: o.before.as_secs_f64() * 1e3,
        window_after_ms: o.after.as_secs_f64() * 1e3,
        bytes: run.received,
        crc32: format!("{:08x}", run.crc32),
        byte_exact: true,
        resets: 0,
        duration_s: run.duration.as_secs_f64(),
        gbit_s: gbit_s(run.received, run.duration),
        steal_percent: 0.0,
        handoffs_per_s: if span.is_zero() {
            0.0
        } else {
            (run.handoffs.len() as f64 - 1.0).max(0.0) / span.as_secs_f64()
        },
        max_handoffs_per_s: if downtime.mean > 0.0 {
            1e6 / downtime.mean
        } else {
            0.0
        },
        downtime_us: downtime,
        repair_us: Summary::of(
            run.handoffs
                .iter()
                .map(|h| us(h.downtime().saturating_sub(h.pause)))
                .collect(),
        ),
        stall_ms: Summary::of(per.iter().map(|p| p.stall_ms).collect()),
        control_gap_ms: Summary::of(control),
        gbit_s_before: Summary::of(per.iter().map(|p| p.gbit_s_before).collect()),
        gbit_s_after: Summary::of(per.iter().map(|p| p.gbit_s_after).collect()),
        phases: Phases {
            pause_us: median(|h| h.pause),
            lock_us: median(|h| h.lock),
            capture_us: median(|h| h.capture),
            restore_us: median(|h| h.restore),
            route_us: median(|h| h.route),
            unrepair_us: median(|h| h.unrepair),
        },
        send_queue_bytes: Summary::of(per.iter().map(|p| p.send_queue_bytes as f64).collect()),
        unsent_bytes: Summary::of(per.iter().map(|p| p.unsent_bytes as f64).collect()),
        per_handoff: per,
    }
}

pub(crate) fn markdown(s: &HandoffStats) -> String {
    let mut m = format!(
        "Machine: {} · kernel {} · veth MTU {} · {} of {} handoffs (A⇄B), one every {:.0} ms · \
         stall window {:.0} ms before the freeze to {:.0} ms after the restore\n\n",
        s.machine,
        s.kernel,
        s.veth_mtu,
        s.handoffs_done,
        s.handoffs_requested,
        s.interval_ms,
        s.window_before_ms,
        s.window_after_ms
    );
    m += "| measure | p50 | p99 | max |\n|---|---:|---:|---:|\n";
    let row = |name: &str, x: &Summary, scale: f64, digits: usize| {
        format!(
            "| {name} | {:.d$} | {:.d$} | {:.d$} |\n",
            x.p50 * scale,
            x.p99 * scale,
            x.max * scale,
            d = digits
        )
    };
    m += &row("downtime: freeze → restored, ms", &s.downtime_us, 1e-3, 3);
    m += &row(
        "of which lock → capture → restore → route → repair off, ms",
        &s.repair_us,
        1e-3,
        3,
    );
    m += &row("client stall (longest read gap), ms", &s.stall_ms, 1.0, 3);
    m += &row(
        "longest read gap without handoff (warm-up), ms",
        &s.control_gap_ms,
        1.0,
        3,
    );
    m += &row(
        "throughput before the freeze, Gbit/s",
        &s.gbit_s_before,
        1.0,
        2,
    );
    m += &row(
        "throughput after the restore, Gbit/s",
        &s.gbit_s_after,
        1.0,
        2,
    );
    m += &row(
        "send queue moved, KiB",
        &s.send_queue_bytes,
        1.0 / 1024.0,
        0,
    );
    m += &row("of which never sent, KiB", &s.unsent_bytes, 1.0 / 1024.0, 0);
    let p = &s.phases;
    m += &format!(
        "\nMedian steps, µs: pause {:.0} · lock (route → blackhole) {:.0} · capture {:.0} · \
         restore {:.0} · route → target {:.0} · repair off {:.0}\n",
        p.pause_us, p.lock_us, p.capture_us, p.restore_us, p.route_us, p.unrepair_us
    );
    m += &format!(
        "\n{:.2} GB in {:.1} s ({:.2} Gbit/s mean), byte-exact (counting stream, CRC-32 {}), \
         no reset · {:.2} handoffs/s done, {:.0}/s possible at the mean downtime · CPU stolen \
         by the hypervisor {:.0} %\n",
        s.bytes as f64 / 1e9,
        s.duration_s,
        s.gbit_s,
        s.crc32,
        s.handoffs_per_s,
        s.max_handoffs_per_s,
        s.steal_percent
    );
    m
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
    let tb = Testbed::new(TestbedOptions {
        mtu: args.mtu,
        watchdog: None,
        ..Default::default()
    })
    .context("building the testbed")?;
    let after = Duration::from_millis(args.after_ms);
    let opts = RepairOptions {
        handoff: HandoffOptions {
            port: args.port,
            handoffs: args.handoffs,
            interval: Duration::from_millis(args.interval_ms),
            warmup: Duration::from_millis(args.warmup_ms),
            settle: after + Duration::from_millis(100),
            max_duration: Duration::from_secs(args.max_seconds),
            total_bytes: None,
            client_rate: args.client_rate,
            fault: None,
        },
        before: Duration::from_millis(args.before_ms),
        after,
    };
    eprintln!(
        "kernel TCP_REPAIR: {} handoffs between node-a and node-b during a download from {}",
        args.handoffs,
        flowshift_testbed::testbed::SERVICE_ADDR
    );
    let stats = run_kernel_handoffs(&tb, &opts)?;
    let md = markdown(&stats);
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("repair.json"),
            serde_json::to_string_pretty(&stats)?,
        )?;
        std::fs::write(dir.join("repair.md"), &md)?;
        eprintln!("wrote {0}/repair.json and {0}/repair.md", dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        println!("{md}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_windows() {
        // Reads at 0, 10, 20, 100, 110 ns.
        let r = [(0, 1), (10, 2), (20, 3), (100, 4), (110, 5)];
        assert_eq!(max_gap(&r, 15, 30), 80); // the gap from 20 to 100 overlaps the window
        assert_eq!(max_gap(&r, 0, 15), 10);
        assert_eq!(max_gap(&r, 101, 200), 10);
        assert_eq!(received_by(&r, 15), 2);
        assert_eq!(received_by(&r, 0), 1);
        let s = Summary::of(vec![3.0, 1.0, 2.0, 4.0]);
        assert_eq!((s.p50, s.p99, s.max, s.mean), (2.0, 4.0, 4.0, 2.5));
    }
}
