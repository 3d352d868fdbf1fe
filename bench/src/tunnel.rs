//! `flowshift-bench tunnel`: flowshift's tunnel between node-a and node-b, beside kernel TCP over
//! the plain path (the ceiling) and kernel TCP through wireguard-go, on one topology, the same
//! number of bytes from memory each, runs interleaved.
//!
//! - **kernel TCP, plain**: iperf3 (`-n bytes`, CUBIC, and again with BBR, this machine's
//!   default) from node-a to node-b's own address through the router: no tunnel, no
//!   encryption.
//! - **kernel TCP through wireguard-go** and **through boringtun**: a userspace WireGuard
//!   interface in each node namespace (inner addresses 198.19.1.0/24 and 198.19.2.0/24), the
//!   same iperf3 across it.
//! - **flowshift reliable channel**: node A sends the bytes of the counting stream to node B
//!   (`ctl tunnel-send`); B verifies every byte and its order (`ctl peers`). The time runs from
//!   the request until B has verified everything.
//! - **flowshift datagrams**: the same offered as datagrams, which may be lost: the rate counts
//!   what was delivered and verified, and the delivered fraction is reported.
//!
//! Each run measures all four, kernel first in odd runs and flowshift first in even ones, then
//! the three stream transports again while the router drops `--loss` percent of packets. The
//! report gives the median and range over runs, and per run the ratio to the plain kernel
//! stream and to wireguard-go. CPU is reported twice: the whole machine's busy time (both ends,
//! router and kernel included), and the tunnel processes' own (the two flowshift nodes; the two
//! wireguard-go processes, without iperf3 and its kernel TCP; nothing for the plain path).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::plot::{self, Figure, RefLine, Series};
use crate::progress::Progress;
use crate::stats::Spread;
use crate::wg::{BT_INNER_B, Userspace, WG_INNER_B, WireguardPair, boringtun_bin};
use crate::{Output, sys};
use flowshift_testbed::testbed::NODE_B;
use flowshift_testbed::tunnel;
use flowshift_testbed::{NodeHandle, Testbed, TestbedOptions, ensure_tools};

/// Arguments of `flowshift-bench tunnel`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Runs; every figure is the median and range over them.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Bytes each stream transport moves (and offered as datagrams), per run.
    #[arg(long, default_value_t = 1_000_000_000)]
    bytes: u64,
    /// veth MTU of every link.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Also measure boringtun (`boringtun-cli`; installed with `cargo install` when it is
    /// neither on PATH nor in ~/.cargo/bin): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    boringtun: bool,
    /// Percent of packets the router drops in the lossy part of each run (0: skip it).
    #[arg(long, default_value_t = 5)]
    loss: u8,
    /// Bytes each stream transport moves through the loss (kernel CUBIC moves ~0.5 MB/s
    /// through 5 % loss here).
    #[arg(long, default_value_t = 20_000_000)]
    loss_bytes: u64,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Run {
    bytes: u64,
    seconds: f64,
    gbit_s: f64,
    machine_cpu_s_per_gb: f64,
    tunnel_cpu_s_per_gb: f64,
    /// Share of the machine's CPU time the hypervisor gave to other guests meanwhile: a run
    /// with much of it measured a noisy neighbour as much as the code.
    steal_percent: f64,
    /// Datagrams: delivered and verified bytes / offered bytes.
    delivered_fraction: Option<f64>,
}

/// What carried the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Transport {
    KernelPlain,
    KernelPlainBbr,
    KernelWireguardGo,
    KernelBoringtun,
    FlowshiftReliable,
    FlowshiftDatagram,
}

impl Transport {
    const ALL: [Transport; 6] = [
        Transport::KernelPlain,
        Transport::KernelPlainBbr,
        Transport::KernelWireguardGo,
        Transport::KernelBoringtun,
        Transport::FlowshiftReliable,
        Transport::FlowshiftDatagram,
    ];

    fn name(self) -> &'static str {
        match self {
            Transport::KernelPlain => "kernel TCP (CUBIC), plain path",
            Transport::KernelPlainBbr => "kernel TCP (BBR), plain path",
            Transport::KernelWireguardGo => "kernel TCP (CUBIC) through wireguard-go",
            Transport::KernelBoringtun => "kernel TCP (CUBIC) through boringtun",
            Transport::FlowshiftReliable => "flowshift reliable channel (verified)",
            Transport::FlowshiftDatagram => "flowshift datagrams (delivered, verified)",
        }
    }

    /// The name in a figure (`\n` breaks lines).
    fn short(self) -> &'static str {
        match self {
            Transport::KernelPlain => "kernel TCP CUBIC\nplain path",
            Transport::KernelPlainBbr => "kernel TCP BBR\nplain path",
            Transport::KernelWireguardGo => "kernel TCP CUBIC\nwireguard-go",
            Transport::KernelBoringtun => "kernel TCP CUBIC\nboringtun",
            Transport::FlowshiftReliable => "flowshift\nreliable channel",
            Transport::FlowshiftDatagram => "flowshift\ndatagrams",
        }
    }

    fn is_kernel(self) -> bool {
        !matches!(
            self,
            Transport::FlowshiftReliable | Transport::FlowshiftDatagram
        )
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    run: usize,
    transport: Transport,
    /// Through the router's loss.
    lossy: bool,
    result: Run,
}
/// Machine CPU readings at the start of a measurement.
struct CpuMark {
    busy: f64,
    steal: f64,
    at: Instant,
}

impl CpuMark {
    fn now() -> Self {
        CpuMark {
            busy: sys::machine_busy_seconds(),
            steal: sys::machine_steal_seconds(),
            at: Instant::now(),
        }
    }

    /// (busy CPU seconds, steal percent) since the mark.
    fn since(&self) -> (f64, f64) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.at.elapsed().as_secs_f64() * cores;
        let steal = sys::machine_steal_seconds() - self.steal;
        let percent = if wall > 0.0 {
            100.0 * steal / wall
        } else {
            0.0
        };
        (sys::machine_busy_seconds() - self.busy, percent)
    }
}

impl Run {
    /// `busy`: machine CPU seconds; `tunnel`: CPU seconds of the tunnel processes.
    fn new(bytes: u64, seconds: f64, (busy, steal_percent): (f64, f64), tunnel: f64) -> Self {
        let gb = bytes as f64 / 1e9;
        let per_gb = |x: f64| if gb > 0.0 { x / gb } else { 0.0 };
        Self {
            bytes,
            seconds,
            gbit_s: if seconds > 0.0 {
                bytes as f64 * 8.0 / seconds / 1e9
            } else {
                0.0
            },
            machine_cpu_s_per_gb: per_gb(busy),
            tunnel_cpu_s_per_gb: per_gb(tunnel),
            steal_percent,
            delivered_fraction: None,
        }
    }
}

/// CPU seconds used so far by all of `pids`.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| sys::process_cpu_seconds(p)).sum()
}

#[derive(Debug, Serialize, Deserialize)]
struct Results {
    machine: String,
    kernel: String,
    veth_mtu: u16,
    loss_percent: u8,
    bytes: u64,
    loss_bytes: u64,
    samples: Vec<Sample>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
    ensure_tools(&["iperf3", "wireguard-go", "wg"])?;
    ensure!(args.runs > 0, "--runs must be at least 1");
    let tb = Testbed::new(TestbedOptions {
        mtu: args.mtu,
        watchdog: None,
        ..Default::default()
    })?;
    // flowshift's nodes first: boringtun's connected UDP sockets take ephemeral ports, and
    // the nodes' tunnel port is one.
    let (a, b) = flowshift_pair(&tb)?;
    let wg = WireguardPair::start(&tb, &Userspace::WireguardGo).context("wireguard-go")?;
    let bt = match args.boringtun {
        true => Some(
            WireguardPair::start(&tb, &Userspace::Boringtun(boringtun_bin()?))
                .context("boringtun")?,
        ),
        false => None,
    };
    let mut samples = Vec::new();
    let mut progress = Progress::new(args.runs as f64);
    for run in 1..=args.runs {
        let kernel_first = run % 2 == 1;
        eprintln!(
            "run {run} of {} ({} first)",
            args.runs,
            if kernel_first { "kernel" } else { "flowshift" }
        );
        for lossy in [false, true] {
            if lossy && args.loss == 0 {
                continue;
            }
            if lossy {
                tb.set_router_loss(args.loss)?;
            }
            let bytes = if lossy { args.loss_bytes } else { args.bytes };
            let mut order = Transport::ALL.to_vec();
            if !kernel_first {
                order.rotate_left(4);
            }
            for t in order {
                // Datagrams through loss say only what the loss rate is.
                if lossy && t == Transport::FlowshiftDatagram {
                    continue;
                }
                let r = match t {
                    Transport::KernelPlain => iperf(&tb, NODE_B, bytes, "cubic", &[]),
                    Transport::KernelPlainBbr => iperf(&tb, NODE_B, bytes, "bbr", &[]),
                    Transport::KernelWireguardGo => {
                        iperf(&tb, WG_INNER_B.parse()?, bytes, "cubic", &wg.pids())
                    }
                    Transport::KernelBoringtun => match &bt {
                        Some(bt) => iperf(&tb, BT_INNER_B.parse()?, bytes, "cubic", &bt.pids()),
                        None => continue,
                    },
                    Transport::FlowshiftReliable => flowshift_send(&a, &b, bytes, false),
                    Transport::FlowshiftDatagram => flowshift_send(&a, &b, bytes, true),
                };
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tb.clear_router_loss();
                        return Err(e.context(format!(
                            "{}{}",
                            t.name(),
                            if lossy { " through loss" } else { "" }
                        )));
                    }
                };
                eprintln!(
                    "  {}{}: {:.2} Gbit/s{}",
                    t.name(),
                    if lossy {
                        format!(", {} % loss", args.loss)
                    } else {
                        String::new()
                    },
                    r.gbit_s,
                    r.delivered_fraction
                        .map_or(String::new(), |f| format!(", {:.1} % delivered", f * 100.0))
                );
                samples.push(Sample {
                    run,
                    transport: t,
                    lossy,
                    result: r,
                });
            }
            if lossy {
                tb.clear_router_loss();
            }
        }
        progress.done(1.0, &format!("run {run} of {} done", args.runs));
    }
    drop(wg);
    drop(bt);
    for (name, node) in [("a", a), ("b", b)] {
        let status = node.terminate()?;
        ensure!(status.success(), "node {name} exited with {status}");
    }
    let results = Results {
        machine: format!(
            "{} ({} cores)",
            sys::cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        kernel: sys::kernel_release(),
        veth_mtu: args.mtu,
        loss_percent: args.loss,
        bytes: args.bytes,
        loss_bytes: args.loss_bytes,
        samples,
    };
    let md = markdown(&results);
    crate::write_results(&args.out, "tunnel", &results, &md)?;
    plot::after_run(plot::Bench::Tunnel, &results, &args.out.out_dir);
    Ok(())
}

fn flowshift_pair(tb: &Testbed) -> anyhow::Result<(NodeHandle, NodeHandle)> {
    let (a, b) = tunnel::start_tunnel_pair(tb, None)?;
    tunnel::wait_alive(&a, &b, Duration::from_secs(20))?;
    Ok((a, b))
}

fn peer(node: &NodeHandle, name: &str) -> anyhow::Result<serde_json::Value> {
    Ok(tunnel::peer(node, name)?)
}

fn peer_u64(node: &NodeHandle, name: &str, field: &str) -> anyhow::Result<u64> {
    let p = peer(node, name)?;
    p[field]
        .as_u64()
        .with_context(|| format!("peer {name} has no numeric {field}: {p}"))
}

/// Sends `bytes` from A to B; returns when B has verified them all (reliable) or the count
/// stopped growing (datagrams).
fn flowshift_send(
    a: &NodeHandle,
    b: &NodeHandle,
    bytes: u64,
    datagram: bool,
) -> anyhow::Result<Run> {
    let field = if datagram {
        "rx_datagram_verified_bytes"
    } else {
        "rx_verified_bytes"
    };
    let errors = if datagram {
        "rx_datagram_errors"
    } else {
        "rx_errors"
    };
    let base = peer_u64(b, "a", field)?;
    let pids = [a.pid(), b.pid()];
    let cpu0 = cpu_of(&pids);
    let mark = CpuMark::now();
    let start = Instant::now();
    let n = bytes.to_string();
    let mut args = vec!["tunnel-send", "b", n.as_str()];
    if datagram {
        args.push("--datagram");
    }
    a.ctl(&args)?;
    let (mut last_got, mut last_change) = (0, Instant::now());
    let got = loop {
        let got = peer_u64(b, "a", field)?.saturating_sub(base);
        if got >= bytes {
            last_change = Instant::now();
            break got;
        }
        if got != last_got {
            (last_got, last_change) = (got, Instant::now());
        }
        let idle = last_change.elapsed();
        if datagram && idle > Duration::from_secs(2) {
            break got;
        }
        if idle > Duration::from_secs(30) {
            bail!("transfer stalled at {got} of {bytes} bytes");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = (last_change - start).as_secs_f64();
    let busy = mark.since();
    let cpu = cpu_of(&pids) - cpu0;
    let errs = peer_u64(b, "a", errors)?;
    ensure!(errs == 0, "{errs} verification errors on the receiver");
    let mut run = Run::new(got, seconds, busy, cpu);
    if datagram {
        run.delivered_fraction = Some(got as f64 / bytes as f64);
    }
    Ok(run)
}

/// iperf3 from node-a to `to` in node-b, `bytes` from memory, congestion control `cc`;
/// `pids`: the tunnel processes whose CPU is counted.
fn iperf(
    tb: &Testbed,
    to: std::net::Ipv4Addr,
    bytes: u64,
    cc: &str,
    pids: &[u32],
) -> anyhow::Result<Run> {
    let to = to.to_string();
    let mut server = tb.node_b().command("iperf3");
    server
        .args(["-s", "-1", "-B", &to])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = tb.spawn(server)?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_of(pids);
    let mark = CpuMark::now();
    let out = tb
        .node_a()
        .exec(
            "iperf3",
            &["-c", &to, "-n", &bytes.to_string(), "-C", cc, "-J"],
        )
        .context("iperf3 client");
    let busy = mark.since();
    let cpu = cpu_of(pids) - cpu0;
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out?)?;
    let sent = json["end"]["sum_sent"]["bytes"]
        .as_f64()
        .context("iperf3 bytes sent")? as u64;
    let end = &json["end"]["sum_received"];
    let got = end["bytes"].as_f64().context("iperf3 bytes")? as u64;
    let seconds = end["seconds"].as_f64().context("iperf3 seconds")?;
    ensure!(sent >= bytes, "iperf3 sent {sent} of {bytes} bytes to {to}");
    // The receiver's tally (its bytes and seconds give the rate) stops when the sender
    // reports the end, up to a few MB short at 20 Gbit/s.
    ensure!(
        got as f64 >= 0.9 * bytes as f64,
        "iperf3 delivered {got} of {bytes} bytes to {to}"
    );
    Ok(Run::new(got, seconds, busy, cpu))
}

fn markdown(r: &Results) -> String {
    let pick = |t: Transport, lossy: bool| -> Vec<&Sample> {
        r.samples
            .iter()
            .filter(|x| x.transport == t && x.lossy == lossy)
            .collect()
    };
    let spread = |v: &[&Sample], f: &dyn Fn(&Run) -> f64| {
        Spread::of(v.iter().map(|x| f(&x.result)).collect()).map_or("-".into(), |s| s.show(2))
    };
    // Rates: two decimals, or as many as a rate below 0.1 Gbit/s needs to show three digits.
    let rate = |v: &[&Sample]| {
        Spread::of(v.iter().map(|x| x.result.gbit_s).collect()).map_or("-".into(), |s| {
            let digits = if s.median > 0.0 && s.median < 0.1 {
                (2.0 - s.median.log10().floor()) as usize
            } else {
                2
            };
            s.show(digits.min(6))
        })
    };
    // Per run, this transport's rate over `base`'s in the same run and loss.
    let ratio = |v: &[&Sample], base: Transport| {
        let per_run: Vec<f64> = v
            .iter()
            .filter_map(|x| {
                r.samples
                    .iter()
                    .find(|b| b.run == x.run && b.lossy == x.lossy && b.transport == base)
                    .filter(|b| b.result.gbit_s > 0.0)
                    .map(|b| x.result.gbit_s / b.result.gbit_s)
            })
            .collect();
        Spread::of(per_run).map_or("-".into(), |s| s.show(2))
    };
    let runs = r.samples.iter().map(|x| x.run).max().unwrap_or(0);
    let mut s = format!(
        "Machine: {} · kernel {} · veth MTU {} · node-a → node-b through the router · {} run(s), \
         kernel first in odd runs · {} bytes per transport and run, {} through {} % loss\n\n",
        r.machine, r.kernel, r.veth_mtu, runs, r.bytes, r.loss_bytes, r.loss_percent
    );
    s += "Median [min–max] over runs; ratios are taken run by run.\n\n";
    s += "| transport | Gbit/s | vs kernel plain | vs wireguard-go | tunnel processes' CPU s per GB | machine CPU s per GB | steal % | delivered |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for lossy in [false, true] {
        for t in Transport::ALL {
            let v = pick(t, lossy);
            if v.is_empty() {
                continue;
            }
            let name = if lossy {
                format!("{}, router drops {} %", t.name(), r.loss_percent)
            } else {
                t.name().to_owned()
            };
            let delivered = Spread::of(
                v.iter()
                    .filter_map(|x| x.result.delivered_fraction.map(|f| f * 100.0))
                    .collect(),
            )
            .map_or("-".into(), |s| format!("{} %", s.show(1)));
            s += &format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {delivered} |\n",
                rate(&v),
                ratio(&v, Transport::KernelPlain),
                ratio(&v, Transport::KernelWireguardGo),
                if matches!(t, Transport::KernelPlain | Transport::KernelPlainBbr) {
                    "-".into()
                } else {
                    spread(&v, &|x| x.tunnel_cpu_s_per_gb)
                },
                spread(&v, &|x| x.machine_cpu_s_per_gb),
                spread(&v, &|x| x.steal_percent),
            );
        }
    }
    s += "\nPer run, Gbit/s (plain CUBIC / plain BBR / wireguard-go / boringtun / reliable / datagrams; then through loss: plain CUBIC / plain BBR / wireguard-go / boringtun / reliable):\n\n";
    for run in 1..=runs {
        let g = |t: Transport, lossy: bool| {
            r.samples
                .iter()
                .find(|x| x.run == run && x.transport == t && x.lossy == lossy)
                .map_or("-".into(), |x| format!("{:.3}", x.result.gbit_s))
        };
        s += &format!(
            "- run {run}: {} / {} / {} / {} / {} / {}; {} / {} / {} / {} / {}\n",
            g(Transport::KernelPlain, false),
            g(Transport::KernelPlainBbr, false),
            g(Transport::KernelWireguardGo, false),
            g(Transport::KernelBoringtun, false),
            g(Transport::FlowshiftReliable, false),
            g(Transport::FlowshiftDatagram, false),
            g(Transport::KernelPlain, true),
            g(Transport::KernelPlainBbr, true),
            g(Transport::KernelWireguardGo, true),
            g(Transport::KernelBoringtun, true),
            g(Transport::FlowshiftReliable, true),
        );
    }
    s
}

/// Draws `tunnel-throughput.svg`, `tunnel-loss.svg` and `tunnel-cpu.svg` from a
/// `tunnel.json` into `dir`.
pub(crate) fn figures(
    v: &serde_json::Value,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let r: Results = serde_json::from_value(v.clone()).context("tunnel results")?;
    let runs = r.samples.iter().map(|x| x.run).max().unwrap_or(0);
    let values = |t: Transport, lossy: bool, f: fn(&Run) -> f64| -> Vec<f64> {
        r.samples
            .iter()
            .filter(|x| x.transport == t && x.lossy == lossy)
            .map(|x| f(&x.result))
            .collect()
    };
    // Samples with more steal than the flag's threshold are drawn hollow.
    let flags = |t: Transport, lossy: bool| -> Vec<bool> {
        r.samples
            .iter()
            .filter(|x| x.transport == t && x.lossy == lossy)
            .map(|x| x.result.steal_percent > crate::stats::STEAL_FLAG_PERCENT)
            .collect()
    };
    let present = |lossy: bool| -> Vec<Transport> {
        Transport::ALL
            .into_iter()
            .filter(|&t| {
                r.samples
                    .iter()
                    .any(|x| x.transport == t && x.lossy == lossy)
            })
            .collect()
    };
    let clear = present(false);
    let category = |t: Transport| {
        let delivered: Vec<f64> = r
            .samples
            .iter()
            .filter(|x| x.transport == t && !x.lossy)
            .filter_map(|x| x.result.delivered_fraction)
            .collect();
        match crate::stats::Spread::of(delivered) {
            Some(d) => format!("{}\n{:.1} % delivered", t.short(), d.median * 100.0),
            None => t.short().to_owned(),
        }
    };
    // Kernel transports in one colour, flowshift's in another; each category has one.
    let by_owner = |transports: &[Transport], f: fn(&Run) -> f64| -> Vec<Series> {
        [
            ("kernel TCP", plot::KERNEL, true),
            ("flowshift", plot::FLOWSHIFT, false),
        ]
        .into_iter()
        .map(|(label, colour, kernel)| Series {
            label: label.into(),
            colour,
            values: transports
                .iter()
                .map(|&t| {
                    if t.is_kernel() == kernel {
                        values(t, false, f)
                    } else {
                        vec![]
                    }
                })
                .collect(),
            flagged: transports.iter().map(|&t| flags(t, false)).collect(),
        })
        .collect()
    };
    let ceiling = crate::stats::Spread::of(values(Transport::KernelPlain, false, |x| x.gbit_s));
    let throughput = Figure {
        title: format!(
            "node-a → node-b, {:.1} GB per transport and run ({runs} run(s), interleaved)",
            r.bytes as f64 / 1e9
        ),
        y_desc: "Gbit/s".into(),
        categories: clear.iter().map(|&t| category(t)).collect(),
        series: by_owner(&clear, |x| x.gbit_s),
        refs: ceiling
            .map(|c| RefLine {
                label: format!(
                    "plain path ceiling (kernel CUBIC median, {:.2} Gbit/s)",
                    c.median
                ),
                y: c.median,
                categories: vec![],
            })
            .into_iter()
            .collect(),
        log_y: false,
        connect: false,
    };
    // Loss: each stream transport without and with the router's loss.
    let lossy = present(true);
    let loss = Figure {
        title: format!(
            "throughput under {} % random loss at the router ({runs} run(s))",
            r.loss_percent
        ),
        y_desc: "Gbit/s (log scale)".into(),
        categories: vec!["no loss".into(), format!("{} % loss", r.loss_percent)],
        series: lossy
            .iter()
            .enumerate()
            .map(|(i, &t)| Series {
                label: t.short().replace('\n', ", "),
                colour: plot::PALETTE[i % plot::PALETTE.len()],
                values: vec![
                    values(t, false, |x| x.gbit_s),
                    values(t, true, |x| x.gbit_s),
                ],
                flagged: vec![flags(t, false), flags(t, true)],
            })
            .collect(),
        refs: vec![],
        log_y: true,
        connect: true,
    };
    let tunnels: Vec<Transport> = clear
        .iter()
        .copied()
        .filter(|t| !matches!(t, Transport::KernelPlain | Transport::KernelPlainBbr))
        .collect();
    let cpu = Figure {
        title: format!("CPU seconds per GB moved ({runs} run(s))"),
        y_desc: "CPU s per GB".into(),
        categories: tunnels.iter().map(|t| t.short().to_owned()).collect(),
        series: vec![
            Series {
                label: "tunnel processes (flowshift nodes / WireGuard daemons)".into(),
                colour: plot::PALETTE[2],
                values: tunnels
                    .iter()
                    .map(|&t| values(t, false, |x| x.tunnel_cpu_s_per_gb))
                    .collect(),
                flagged: tunnels.iter().map(|&t| flags(t, false)).collect(),
            },
            Series {
                label: "whole machine (busy time)".into(),
                colour: plot::PALETTE[4],
                values: tunnels
                    .iter()
                    .map(|&t| values(t, false, |x| x.machine_cpu_s_per_gb))
                    .collect(),
                flagged: tunnels.iter().map(|&t| flags(t, false)).collect(),
            },
        ],
        refs: vec![],
        log_y: false,
        connect: false,
    };
    let mut figures = vec![("tunnel-throughput", throughput), ("tunnel-cpu", cpu)];
    if !lossy.is_empty() {
        figures.insert(1, ("tunnel-loss", loss));
    }
    plot::draw_all(dir, &figures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{assert_svg, temp_dir};

    #[test]
    fn figures_of_a_synthetic_run() {
        let mut samples = Vec::new();
        for run in 1..=3 {
            for lossy in [false, true] {
                for (i, t) in Transport::ALL.into_iter().enumerate() {
                    if lossy && t == Transport::FlowshiftDatagram {
                        continue;
                    }
                    let gbit = (i + run) as f64 / if lossy { 50.0 } else { 1.0 };
                    let mut result = Run::new(
                        1_000_000_000,
                        8.0 / gbit,
                        (2.0 + i as f64, 1.0),
                        0.5 * i as f64,
                    );
                    if t == Transport::FlowshiftDatagram {
                        result.delivered_fraction = Some(0.97);
                    }
                    if run == 2 {
                        result.steal_percent = 15.0;
                    }
                    samples.push(Sample {
                        run,
                        transport: t,
                        lossy,
                        result,
                    });
                }
            }
        }
        let results = Results {
            machine: "test (2 cores)".into(),
            kernel: "6.1".into(),
            veth_mtu: 1500,
            loss_percent: 5,
            bytes: 1_000_000_000,
            loss_bytes: 20_000_000,
            samples,
        };
        let dir = temp_dir("tunnel");
        let paths = figures(&serde_json::to_value(&results).unwrap(), &dir).unwrap();
        assert_eq!(paths.len(), 3);
        assert!(paths[0].ends_with("tunnel-throughput.svg"));
        assert!(paths[1].ends_with("tunnel-loss.svg"));
        assert!(paths[2].ends_with("tunnel-cpu.svg"));
        assert_svg(
            &paths[0],
            &[
                "kernel TCP",
                "flowshift",
                "plain path ceiling",
                "wireguard-go",
                "boringtun",
                "97.0 % delivered",
                plot::FLAGGED,
            ],
        );
        assert_svg(
            &paths[1],
            &[
                "no loss",
                "5 % loss",
                "flowshift, reliable channel",
                "kernel TCP CUBIC, wireguard-go",
            ],
        );
        assert_svg(
            &paths[2],
            &["tunnel processes", "whole machine", "CPU s per GB"],
        );
        if std::env::var_os("FLOWSHIFT_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
