//! `flowshift-bench throughput`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::load::{self, Transfer};
use crate::stats::Spread;
use crate::{Output, addr, secs, sys};
use flowshift_testbed::testbed::{NODE_A, SERVICE_ADDR};
use flowshift_testbed::{NodeConfig, Testbed, TestbedOptions};

/// Arguments of `flowshift-bench throughput`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Idle connections to open for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// veth MTU of every link in the testbed.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// MTU of flowshift's TUN device (default: the veth MTU).
    #[arg(long)]
    tun_mtu: Option<u16>,
    /// TUN offload on the node (TSO/GSO through IFF_VNET_HDR): `true` (the node's default) or
    /// `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    offload: bool,
    /// Worker threads of the node (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Per-connection socket buffers of the node, bytes.
    #[arg(long)]
    tcp_buffer: Option<usize>,
    /// Threads opening connections in the connection-rate test.
    #[arg(long, default_value_t = 4)]
    conn_threads: usize,
    /// Runs; each measures the kernel and flowshift back to back, in alternating order.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Parts to measure, comma-separated: `transfer` (the runs of downloads, uploads, 8 flows
    /// and new connections) and `idle` (memory per idle connection, once after the runs).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "transfer,idle"
    )]
    parts: Vec<Part>,
    #[command(flatten)]
    out: Output,
}

/// Which parts to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Downloads, uploads, 8 flows and the connection rate, `--runs` times.
    Transfer,
    /// Memory per idle connection.
    Idle,
}

/// One target's figures in one run.
#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    download: Transfer,
    upload: Transfer,
    parallel8: Transfer,
    connections_per_s: f64,
    /// Busy CPU seconds of the whole machine per GB downloaded (single flow).
    machine_cpu_s_per_gb: f64,
    /// CPU seconds of the flowshift process per GB downloaded (flowshift only).
    process_cpu_s_per_gb: Option<f64>,
    /// Share of the machine's CPU time the hypervisor gave to other guests during these
    /// measurements (a noisy neighbour, not our code).
    steal_percent: f64,
}

/// Memory per idle connection, measured once per target after the throughput runs.
#[derive(Debug, Clone, Default, Serialize)]
struct Idle {
    /// Bytes per idle connection: flowshift's RSS growth, or for the kernel half its slab
    /// growth (the client's sockets are kernel sockets of the same kind: half is the
    /// server's side).
    bytes_per_conn: f64,
    conns: usize,
    /// Bytes each connection echoed (each way) before going idle.
    payload: usize,
}

/// Which server a measurement went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Target {
    Kernel,
    Flowshift,
}

/// One row of the summary: a measure over the runs, for both targets.
#[derive(Debug, Clone, Serialize)]
struct Row {
    name: &'static str,
    kernel: Option<Spread>,
    flowshift: Option<Spread>,
    /// flowshift / kernel, run by run (each run measured both, one right after the other).
    ratio: Option<Spread>,
}

#[derive(Debug, Serialize)]
struct Results {
    machine: String,
    kernel: String,
    veth_mtu: u16,
    tun_mtu: u16,
    offload: bool,
    workers: Option<usize>,
    tcp_buffer: Option<usize>,
    duration_s: u64,
    runs: usize,
    /// Per run: the kernel's and flowshift's figures (measured back to back, in alternating
    /// order).
    kernel_tcp: Vec<Figures>,
    flowshift: Vec<Figures>,
    /// Runs in which either measurement saw more than [`STEAL_FLAG_PERCENT`] steal.
    flagged_runs: Vec<usize>,
    summary: Vec<Row>,
    kernel_idle: Vec<Idle>,
    flowshift_idle: Vec<Idle>,
}

/// Runs with more steal than this are flagged in the report.
const STEAL_FLAG_PERCENT: f64 = 10.0;

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let tun_mtu = args.tun_mtu.unwrap_or(args.mtu);
    let tb = Testbed::new(TestbedOptions {
        mtu: args.mtu,
        watchdog: None,
        ..Default::default()
    })
    .context("building the testbed")?;

    // The kernel baseline: plain socket servers in their own process in node-a, on node-a's
    // own address.
    let mut server = tb.node_a().command(
        std::env::current_exe()?
            .to_str()
            .context("non-UTF-8 path of this binary")?,
    );
    server
        .args(["kernel-server", "--addr", &NODE_A.to_string()])
        .stdout(std::process::Stdio::piped());
    let mut server = tb.spawn(server).context("starting the kernel servers")?;
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().context("kernel server stdout")?),
        &mut ready,
    )?;
    anyhow::ensure!(
        ready.trim() == "ready",
        "kernel server did not start: {ready:?}"
    );

    let mut config = NodeConfig::standard("a").mtu(tun_mtu).offload(args.offload);
    if let Some(w) = args.workers {
        config = config.workers(w);
    }
    if let Some(b) = args.tcp_buffer {
        config = config.tcp_buffers(b);
    }
    let node = tb
        .start_node(flowshift_testbed::Node::A, &config)
        .context("starting flowshift")?;
    let pid = node.pid();

    let d = secs(args.duration);
    let (mut kernel_tcp, mut flowshift) = (Vec::new(), Vec::new());
    let runs = if args.parts.contains(&Part::Transfer) {
        args.runs
    } else {
        0
    };
    for run in 0..runs {
        // Alternate who goes first, so a drift in the machine's speed hits both alike.
        let order = if run % 2 == 0 {
            [Target::Kernel, Target::Flowshift]
        } else {
            [Target::Flowshift, Target::Kernel]
        };
        for target in order {
            eprintln!("run {}/{}: {target:?}", run + 1, args.runs);
            let f = match target {
                Target::Kernel => measure(&tb, NODE_A, d, args.conn_threads, None)?,
                Target::Flowshift => measure(&tb, SERVICE_ADDR, d, args.conn_threads, Some(pid))?,
            };
            match target {
                Target::Kernel => kernel_tcp.push(f),
                Target::Flowshift => flowshift.push(f),
            }
        }
    }
    eprintln!("idle connections");
    let (mut kernel_idle, mut flowshift_idle) = (Vec::new(), Vec::new());
    let payloads: &[usize] = if args.parts.contains(&Part::Idle) {
        &[1, 64 * 1024]
    } else {
        &[]
    };
    for &payload in payloads {
        kernel_idle.push(idle_memory(&tb, NODE_A, args.idle, None, payload)?);
        flowshift_idle.push(idle_memory(
            &tb,
            SERVICE_ADDR,
            args.idle,
            Some(pid),
            payload,
        )?);
    }

    let status = node.terminate().context("stopping the node")?;
    anyhow::ensure!(status.success(), "flowshift exited with {status}");

    let flagged_runs = (0..runs)
        .filter(|&i| {
            kernel_tcp[i].steal_percent > STEAL_FLAG_PERCENT
                || flowshift[i].steal_percent > STEAL_FLAG_PERCENT
        })
        .map(|i| i + 1)
        .collect();
    let summary = summarize(&kernel_tcp, &flowshift);
    let results = Results {
        machine: format!(
            "{} ({} cores)",
            sys::cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        kernel: sys::kernel_release(),
        veth_mtu: args.mtu,
        tun_mtu,
        offload: args.offload,
        workers: args.workers,
        tcp_buffer: args.tcp_buffer,
        duration_s: args.duration,
        runs,
        kernel_tcp,
        flowshift,
        flagged_runs,
        summary,
        kernel_idle,
        flowshift_idle,
    };
    let md = markdown(&results);
    eprintln!("{md}");
    crate::write_results(&args.out, "throughput", &results, &md)
}

/// The throughput measures of one target, one after the other.
fn measure(
    tb: &Testbed,
    target: Ipv4Addr,
    d: Duration,
    conn_threads: usize,
    pid: Option<u32>,
) -> anyhow::Result<Figures> {
    let client = tb.client();
    let mut f = Figures::default();
    let (steal0, t0) = (sys::machine_steal_seconds(), std::time::Instant::now());

    let (busy0, proc0) = (
        sys::machine_busy_seconds(),
        pid.map(sys::process_cpu_seconds),
    );
    f.download = client
        .run(|| load::download(addr(target, 19), d))
        .context("download")?;
    let (busy1, proc1) = (
        sys::machine_busy_seconds(),
        pid.map(sys::process_cpu_seconds),
    );
    let gb = f.download.bytes as f64 / 1e9;
    f.machine_cpu_s_per_gb = (busy1 - busy0) / gb;
    f.process_cpu_s_per_gb = proc0.zip(proc1).map(|(a, b)| (b - a) / gb);
    eprintln!("  download   {:.2} Gbit/s (verified)", f.download.gbit_s());

    f.upload = client
        .run(|| load::upload(addr(target, 9), d))
        .context("upload")?;
    eprintln!("  upload     {:.2} Gbit/s (CRC checked)", f.upload.gbit_s());
    f.parallel8 = client
        .run(|| load::parallel_download(addr(target, 19), 8, d))
        .context("8 flows")?;
    eprintln!("  8 flows    {:.2} Gbit/s (verified)", f.parallel8.gbit_s());
    f.connections_per_s = client
        .run(|| load::connection_rate(addr(target, 7), conn_threads, d))
        .context("connection rate")?;
    eprintln!("  new conns  {:.0}/s", f.connections_per_s);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let wall = t0.elapsed().as_secs_f64() * cores;
    if wall > 0.0 {
        f.steal_percent = 100.0 * (sys::machine_steal_seconds() - steal0) / wall;
    }
    eprintln!("  steal      {:.0} %", f.steal_percent);
    Ok(f)
}

/// Memory per idle connection: `idle` connections that echoed `payload` bytes each way,
/// then held idle past flowshift's compaction delay.
fn idle_memory(
    tb: &Testbed,
    target: Ipv4Addr,
    idle: usize,
    pid: Option<u32>,
    payload: usize,
) -> anyhow::Result<Idle> {
    // Let TIME-WAIT and closing sockets settle before measuring memory.
    std::thread::sleep(Duration::from_secs(1));
    let before = match pid {
        Some(pid) => sys::process_rss_bytes(pid),
        None => sys::kernel_slab_bytes(),
    };
    let after = tb
        .client()
        .run(|| -> std::io::Result<u64> {
            let conns = load::open_idle(addr(target, 7), idle, payload)?;
            // Past the compaction delay, and long enough for flowshift's sweeps to compact
            // them all (each worker compacts up to 500 a second); the same wait for both.
            let compact = flowshift_core::stack::COMPACT_AFTER.total_millis();
            std::thread::sleep(Duration::from_millis(compact + 2_500 + idle as u64));
            let after = match pid {
                Some(pid) => sys::process_rss_bytes(pid),
                None => sys::kernel_slab_bytes(),
            };
            drop(conns);
            Ok(after)
        })
        .map_err(|e| anyhow::anyhow!("idle connections to {target}: {e}"))?;
    let grown = after.saturating_sub(before) as f64;
    let i = Idle {
        conns: idle,
        bytes_per_conn: if pid.is_some() { grown } else { grown / 2.0 } / idle.max(1) as f64,
        payload,
    };
    eprintln!(
        "  {target}: {:.1} KiB per idle connection ({idle} open, {payload} bytes echoed each)",
        i.bytes_per_conn / 1024.0
    );
    Ok(i)
}

fn summarize(k: &[Figures], f: &[Figures]) -> Vec<Row> {
    type Pick = fn(&Figures) -> f64;
    let measures: [(&'static str, Pick); 6] = [
        ("single-flow download, Gbit/s", |x| x.download.gbit_s()),
        ("single-flow upload, Gbit/s", |x| x.upload.gbit_s()),
        ("8 parallel downloads, Gbit/s", |x| x.parallel8.gbit_s()),
        ("new connections per second", |x| x.connections_per_s),
        ("machine CPU s per GB (download)", |x| {
            x.machine_cpu_s_per_gb
        }),
        ("steal, %", |x| x.steal_percent),
    ];
    let mut rows: Vec<Row> = measures
        .iter()
        .map(|&(name, pick)| Row {
            name,
            kernel: Spread::of(k.iter().map(pick).collect()),
            flowshift: Spread::of(f.iter().map(pick).collect()),
            // A ratio of steal says nothing.
            ratio: (name != "steal, %")
                .then(|| {
                    Spread::of(
                        k.iter()
                            .zip(f)
                            .filter(|(a, _)| pick(a) > 0.0)
                            .map(|(a, b)| pick(b) / pick(a))
                            .collect(),
                    )
                })
                .flatten(),
        })
        .collect();
    rows.push(Row {
        name: "flowshift process CPU s per GB (download)",
        kernel: None,
        flowshift: Spread::of(f.iter().filter_map(|x| x.process_cpu_s_per_gb).collect()),
        ratio: None,
    });
    rows
}

fn markdown(r: &Results) -> String {
    let mut s = format!(
        "Machine: {} · kernel {} · veth MTU {} · TUN MTU {} · offload {} · workers {} · socket buffers {} · {} runs of {} s per measure, kernel and flowshift back to back in alternating order\n\n",
        r.machine,
        r.kernel,
        r.veth_mtu,
        r.tun_mtu,
        if r.offload { "on" } else { "off" },
        r.workers
            .map_or("default (cores)".to_string(), |w| w.to_string()),
        r.tcp_buffer
            .map_or("default (64 KiB)".to_string(), |b| format!("{b} B")),
        r.runs,
        r.duration_s
    );
    s += "Median [min–max] over the runs; the ratio column is flowshift / kernel run by run. Every download was checked byte for byte against the counting stream and every upload's CRC-32 against what was sent.\n\n";
    s += "| measure | kernel TCP | flowshift | flowshift / kernel |\n|---|---:|---:|---:|\n";
    let show = |x: &Option<Spread>| x.map_or("-".to_string(), |s| s.show(2));
    for row in &r.summary {
        s += &format!(
            "| {} | {} | {} | {} |\n",
            row.name,
            show(&row.kernel),
            show(&row.flowshift),
            show(&row.ratio)
        );
    }
    for (k, f) in r.kernel_idle.iter().zip(&r.flowshift_idle) {
        s += &format!(
            "| memory per idle connection after echoing {} B, KiB ({} open) | {:.1} (half the slab growth) | {:.1} (RSS growth) | {:.2} |\n",
            f.payload,
            f.conns,
            k.bytes_per_conn / 1024.0,
            f.bytes_per_conn / 1024.0,
            f.bytes_per_conn / k.bytes_per_conn.max(1.0)
        );
    }
    s += "\nPer run (Gbit/s download / upload / 8 flows, steal %):\n\n| run | kernel | flowshift |\n|---|---|---|\n";
    for (i, (k, f)) in r.kernel_tcp.iter().zip(&r.flowshift).enumerate() {
        let one = |x: &Figures| {
            format!(
                "{:.2} / {:.2} / {:.2}, {:.0} %",
                x.download.gbit_s(),
                x.upload.gbit_s(),
                x.parallel8.gbit_s(),
                x.steal_percent
            )
        };
        let flag = if r.flagged_runs.contains(&(i + 1)) {
            " (steal > 10 %: flagged)"
        } else {
            ""
        };
        s += &format!("| {}{flag} | {} | {} |\n", i + 1, one(k), one(f));
    }
    s
}
