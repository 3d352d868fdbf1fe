//! `flowshift-bench throughput`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::load::{self, Transfer};
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
    #[command(flatten)]
    out: Output,
}

/// One target's figures.
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
    /// Bytes per idle connection: flowshift RSS growth, or kernel slab growth (both sides).
    idle_bytes_per_conn: f64,
    idle_conns: usize,
    /// Share of the machine's CPU time the hypervisor gave to other guests during these
    /// measurements (a noisy neighbour, not our code).
    steal_percent: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    machine: String,
    kernel: String,
    veth_mtu: u16,
    tun_mtu: u16,
    offload: bool,
    workers: Option<usize>,
    duration_s: u64,
    kernel_tcp: Figures,
    flowshift: Figures,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
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
    eprintln!("measuring the kernel's TCP ({NODE_A})");
    let kernel_tcp = measure(&tb, NODE_A, d, args.conn_threads, args.idle, None)?;
    eprintln!("measuring flowshift ({SERVICE_ADDR})");
    let flowshift = measure(
        &tb,
        SERVICE_ADDR,
        d,
        args.conn_threads,
        args.idle,
        Some(pid),
    )?;

    let status = node.terminate().context("stopping the node")?;
    anyhow::ensure!(status.success(), "flowshift exited with {status}");

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
        duration_s: args.duration,
        kernel_tcp,
        flowshift,
    };
    let md = markdown(&results);
    crate::write_results(&args.out, "throughput", &results, &md)
}

fn measure(
    tb: &Testbed,
    target: Ipv4Addr,
    d: Duration,
    conn_threads: usize,
    idle: usize,
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
    eprintln!("  download   {:.2} Gbit/s", f.download.gbit_s());

    f.upload = client
        .run(|| load::upload(addr(target, 9), d))
        .context("upload")?;
    eprintln!("  upload     {:.2} Gbit/s", f.upload.gbit_s());
    f.parallel8 = client
        .run(|| load::parallel_download(addr(target, 19), 8, d))
        .context("8 flows")?;
    eprintln!("  8 flows    {:.2} Gbit/s", f.parallel8.gbit_s());
    f.connections_per_s = client
        .run(|| load::connection_rate(addr(target, 7), conn_threads, d))
        .context("connection rate")?;
    eprintln!("  new conns  {:.0}/s", f.connections_per_s);
    // Let TIME-WAIT and closing sockets settle before measuring memory.
    std::thread::sleep(Duration::from_secs(1));

    let before = match pid {
        Some(pid) => sys::process_rss_bytes(pid),
        None => sys::kernel_slab_bytes(),
    };
    let after = client
        .run(|| -> std::io::Result<u64> {
            let conns = load::open_idle(addr(target, 7), idle)?;
            std::thread::sleep(Duration::from_millis(500));
            let after = match pid {
                Some(pid) => sys::process_rss_bytes(pid),
                None => sys::kernel_slab_bytes(),
            };
            drop(conns);
            Ok(after)
        })
        .map_err(|e| anyhow::anyhow!("idle connections to {target}: {e}"))?;
    f.idle_conns = idle;
    f.idle_bytes_per_conn = after.saturating_sub(before) as f64 / idle.max(1) as f64;
    eprintln!(
        "  idle       {:.1} KiB per connection ({idle} open)",
        f.idle_bytes_per_conn / 1024.0
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let wall = t0.elapsed().as_secs_f64() * cores;
    if wall > 0.0 {
        f.steal_percent = 100.0 * (sys::machine_steal_seconds() - steal0) / wall;
    }
    Ok(f)
}

fn markdown(r: &Results) -> String {
    let k = &r.kernel_tcp;
    let f = &r.flowshift;
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    let mut s = format!(
        "Machine: {} · kernel {} · veth MTU {} · TUN MTU {} · offload {} · workers {} · {} s per test\n\n",
        r.machine,
        r.kernel,
        r.veth_mtu,
        r.tun_mtu,
        if r.offload { "on" } else { "off" },
        r.workers
            .map_or("default (cores)".to_string(), |w| w.to_string()),
        r.duration_s
    );
    s += "| measure | kernel TCP | flowshift | flowshift / kernel |\n|---|---:|---:|---:|\n";
    for (name, a, b) in [
        (
            "single-flow download, Gbit/s",
            k.download.gbit_s(),
            f.download.gbit_s(),
        ),
        (
            "single-flow upload, Gbit/s",
            k.upload.gbit_s(),
            f.upload.gbit_s(),
        ),
        (
            "8 parallel downloads, Gbit/s",
            k.parallel8.gbit_s(),
            f.parallel8.gbit_s(),
        ),
        (
            "new connections per second",
            k.connections_per_s,
            f.connections_per_s,
        ),
        (
            "machine CPU s per GB (download)",
            k.machine_cpu_s_per_gb,
            f.machine_cpu_s_per_gb,
        ),
    ] {
        s += &format!("| {name} | {a:.2} | {b:.2} | {} |\n", ratio(b, a));
    }
    s += &format!(
        "| flowshift process CPU s per GB (download) | - | {:.2} | - |\n",
        f.process_cpu_s_per_gb.unwrap_or(0.0)
    );
    s += &format!(
        "| memory per idle connection, KiB ({} open) | {:.1} (slab, both ends) | {:.1} (RSS) | - |\n",
        f.idle_conns,
        k.idle_bytes_per_conn / 1024.0,
        f.idle_bytes_per_conn / 1024.0
    );
    s += &format!(
        "| CPU stolen by the hypervisor meanwhile, % | {:.0} | {:.0} | - |\n",
        k.steal_percent, f.steal_percent
    );
    s
}
