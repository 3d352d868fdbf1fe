//! `flowshift-bench throughput`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::load::{self, Transfer};
use crate::plot::{self, Figure, RefLine, Series};
use crate::progress::Progress;
use crate::stats::{STEAL_FLAG_PERCENT, Spread};
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
    /// Pin the node's workers to cores (`node.pin_workers`): `true` (the default) or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pin_workers: bool,
    /// Threads opening connections in the connection-rate test.
    #[arg(long, default_value_t = 4)]
    conn_threads: usize,
    /// Runs; each measures the kernel and flowshift back to back, in alternating order.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Parts to measure, comma-separated: `transfer` (the runs of downloads, uploads, 8 flows
    /// and new connections), `http` (in the same runs: curl downloading from the `http` app
    /// and from nginx) and `idle` (memory per idle connection, once after the runs).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "transfer,http,idle"
    )]
    parts: Vec<Part>,
    /// Bytes curl downloads per measurement in the `http` part.
    #[arg(long, default_value_t = 400_000_000)]
    http_bytes: u64,
    /// Percent of packets the router drops, at random, during the `loss` part.
    #[arg(long, default_value_t = 2)]
    loss_percent: u8,
    /// Bytes curl downloads through the loss (`loss` part).
    #[arg(long, default_value_t = 4_000_000)]
    loss_bytes: u64,
    /// Objects curl fetches one after the other on one keep-alive connection through the
    /// loss (`loss` part), and their size.
    #[arg(long, default_value_t = 200)]
    loss_objects: usize,
    #[arg(long, default_value_t = 16_000)]
    loss_object_bytes: u64,
    /// The node's loss probes (`tcp.loss_probes`): `true` (the default) or `false`, to
    /// measure what they change.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    loss_probes: bool,
    /// The node's direct receive (`tcp.direct_receive`): `true` (the default) or `false`, to
    /// measure what it changes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    direct_receive: bool,
    /// The node's `tcp.tx_buffer_max` (the send buffer a download it limits grows to), bytes;
    /// the send buffer's size turns growth off. Default: the node's (1 MiB).
    #[arg(long)]
    tx_buffer_max: Option<usize>,
    #[command(flatten)]
    out: Output,
}

/// Which parts to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Downloads, uploads, 8 flows and the connection rate, `--runs` times.
    Transfer,
    /// curl downloading `--http-bytes` over HTTP, `--runs` times: from the `http` app, and
    /// from nginx (one process, sendfile) on node-a's own address as the kernel's figure.
    Http,
    /// Memory per idle connection.
    Idle,
    /// In the same runs, with the router dropping `--loss-percent` of the packets: curl
    /// downloading `--loss-bytes`, and fetching `--loss-objects` small objects on one
    /// keep-alive connection (per-object time), from the `http` app and from nginx.
    Loss,
}

/// One target's figures in one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Figures {
    download: Transfer,
    upload: Transfer,
    parallel8: Transfer,
    /// curl's download over HTTP (`http` part): nginx for the kernel, the `http` app for
    /// flowshift; verified byte for byte.
    http_download: Option<Transfer>,
    connections_per_s: f64,
    /// Busy CPU seconds of the whole machine per GB downloaded (single flow).
    machine_cpu_s_per_gb: f64,
    /// CPU seconds of the serving process (flowshift's node, or the kernel-socket servers)
    /// per GB downloaded.
    process_cpu_s_per_gb: Option<f64>,
    /// Busy CPU seconds of the whole machine per GB uploaded (single flow, CRC checked),
    /// taken like the download's; `None` in results from before it was measured.
    upload_machine_cpu_s_per_gb: Option<f64>,
    /// CPU seconds of the serving process per GB uploaded, taken like the download's.
    upload_process_cpu_s_per_gb: Option<f64>,
    /// The `loss` part: curl's download through the router's loss, verified.
    loss_download: Option<Transfer>,
    /// The `loss` part: per-object times (curl's `time_total`) of the small objects fetched
    /// one after the other on one connection through the loss: p50, p99 and max, ms.
    loss_object_ms: Option<[f64; 3]>,
    /// Packets the router dropped during the `loss` part.
    loss_drops: u64,
    /// The node's loss probes during the `loss` part (flowshift only).
    loss_probes: Option<u64>,
    /// The node's loss probes during the clean transfers of the `transfer` part (flowshift
    /// only): each one a segment sent twice and a halved window for nothing.
    #[serde(default)]
    clean_loss_probes: Option<u64>,
    /// Send buffers the node grew during the single-flow download (`tcp.tx_buffer_max`;
    /// flowshift only).
    #[serde(default)]
    download_tx_grown: Option<u64>,
    /// Share of the machine's CPU time the hypervisor gave to other guests during these
    /// measurements (a noisy neighbour, not our code).
    steal_percent: f64,
}

/// Memory per idle connection, measured once per target after the throughput runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Idle {
    /// Bytes per idle connection: flowshift's RSS growth, or for the kernel half its slab
    /// growth (the client's sockets are kernel sockets of the same kind: half is the
    /// server's side).
    bytes_per_conn: f64,
    conns: usize,
    /// Bytes each connection echoed (each way) before going idle.
    payload: usize,
    /// Seconds the node took to see every connection closed after the clients closed them
    /// (flowshift only; the next measurement waits for it).
    #[serde(default)]
    close_s: Option<f64>,
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
    /// `node.pin_workers`.
    #[serde(default)]
    pin_workers: bool,
    tcp_buffer: Option<usize>,
    duration_s: u64,
    /// Bytes per curl download (`http` part), 0 when not measured.
    http_bytes: u64,
    /// The `loss` part: the router's loss in percent (0: not measured), the download's and
    /// the objects' sizes, and whether the node's loss probes were on.
    #[serde(default)]
    loss_percent: u8,
    #[serde(default)]
    loss_bytes: u64,
    #[serde(default)]
    loss_objects: usize,
    #[serde(default)]
    loss_object_bytes: u64,
    #[serde(default)]
    loss_probes: bool,
    /// `tcp.direct_receive`.
    direct_receive: bool,
    /// `tcp.tx_buffer_max`, when set (else the node's default).
    #[serde(default)]
    tx_buffer_max: Option<usize>,
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
    let server = crate::kernel_server::spawn(&tb, tb.node_a(), NODE_A)?;
    let server_pid = server.id();

    let mut config = NodeConfig::standard("a").mtu(tun_mtu).offload(args.offload);
    if let Some(w) = args.workers {
        config = config.workers(w);
    }
    if let Some(b) = args.tcp_buffer {
        config = config.tcp_buffers(b);
    }
    if !args.pin_workers {
        config = config.pin_workers(false);
    }
    if !args.loss_probes {
        config = config.loss_probes(false);
    }
    if !args.direct_receive {
        config = config.direct_receive(false);
    }
    if let Some(b) = args.tx_buffer_max {
        config = config.tx_buffer_max(b);
    }
    let node = tb
        .start_node(flowshift_testbed::Node::A, &config)
        .context("starting flowshift")?;

    let http_part = args.parts.contains(&Part::Http);
    let loss = args.parts.contains(&Part::Loss).then_some(LossArgs {
        percent: args.loss_percent,
        bytes: args.loss_bytes,
        objects: args.loss_objects,
        object_bytes: args.loss_object_bytes,
    });
    if let Some(l) = &loss {
        flowshift_testbed::ensure_tools(&["nft"])?;
        anyhow::ensure!(
            (1..100).contains(&l.percent) && l.objects > 0 && l.bytes > 0 && l.object_bytes > 0,
            "--loss-percent must be 1..99 and the loss sizes above 0"
        );
    }
    let mut files = Vec::new();
    if http_part {
        files.push(args.http_bytes);
    }
    if let Some(l) = &loss {
        files.extend([l.bytes, l.object_bytes]);
    }
    let nginx = if files.is_empty() {
        None
    } else {
        Some(Nginx::start(&tb, &files).context("starting nginx")?)
    };
    let http_bytes = http_part.then_some(args.http_bytes);
    let transfer = args.parts.contains(&Part::Transfer);

    let d = secs(args.duration);
    // Expected seconds: four measures of `duration` and their set-up per target and run;
    // per idle measurement the settling, the compaction wait and opening the connections.
    let measure_s = if transfer {
        4.0 * args.duration as f64 + 0.5
    } else {
        0.0
    } + http_bytes.map_or(0.0, |n| n as f64 / 5e8 + 0.5)
        + loss.as_ref().map_or(0.0, |l| 3.0 + l.objects as f64 * 0.05);
    let idle_s = 3.5
        + flowshift_core::stack::COMPACT_AFTER.total_millis() as f64 / 1e3
        + args.idle as f64 * 1.5e-3;
    let mut progress = Progress::new(2.0 * args.runs as f64 * measure_s + 4.0 * idle_s);
    let (mut kernel_tcp, mut flowshift) = (Vec::new(), Vec::new());
    let runs = if transfer || http_bytes.is_some() || loss.is_some() {
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
                Target::Kernel => measure(
                    &tb,
                    NODE_A,
                    transfer.then_some(d),
                    http_bytes,
                    loss.as_ref(),
                    args.conn_threads,
                    Server::Kernel(server_pid),
                )?,
                Target::Flowshift => measure(
                    &tb,
                    SERVICE_ADDR,
                    transfer.then_some(d),
                    http_bytes,
                    loss.as_ref(),
                    args.conn_threads,
                    Server::Flowshift(&node),
                )?,
            };
            match target {
                Target::Kernel => kernel_tcp.push(f),
                Target::Flowshift => flowshift.push(f),
            }
            progress.done(
                measure_s,
                &format!("run {}/{}: {target:?} measured", run + 1, args.runs),
            );
        }
    }
    eprintln!("idle connections");
    let (mut kernel_idle, mut flowshift_idle) = (Vec::new(), Vec::new());
    // The 64 KiB case first: it is the one with a target, and the first to open this many
    // connections also pays for the tables that grow to hold them (both sides alike).
    let payloads: &[usize] = if args.parts.contains(&Part::Idle) {
        &[64 * 1024, 1]
    } else {
        &[]
    };
    // The kernel's server holds a descriptor per connection, under this machine's limit.
    let kernel_n = args.idle.min(kernel_idle_max());
    if kernel_n < args.idle {
        eprintln!(
            "  the kernel baseline holds {kernel_n} connections (its one server process may open no more files)"
        );
    }
    for &payload in payloads {
        kernel_idle.push(idle_memory(&tb, NODE_A, kernel_n, None, payload)?);
        progress.done(
            idle_s,
            &format!("idle connections, {payload} B echoed: kernel"),
        );
        flowshift_idle.push(idle_memory(
            &tb,
            SERVICE_ADDR,
            args.idle,
            Some(&node),
            payload,
        )?);
        progress.done(
            idle_s,
            &format!("idle connections, {payload} B echoed: flowshift"),
        );
    }

    drop(nginx);
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
        pin_workers: args.pin_workers,
        tcp_buffer: args.tcp_buffer,
        duration_s: args.duration,
        http_bytes: http_bytes.unwrap_or(0),
        loss_percent: loss.as_ref().map_or(0, |l| l.percent),
        loss_bytes: loss.as_ref().map_or(0, |l| l.bytes),
        loss_objects: loss.as_ref().map_or(0, |l| l.objects),
        loss_object_bytes: loss.as_ref().map_or(0, |l| l.object_bytes),
        loss_probes: args.loss_probes,
        direct_receive: args.direct_receive,
        tx_buffer_max: args.tx_buffer_max,
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
    crate::write_results(&args.out, "throughput", &results, &md)?;
    plot::after_run(plot::Bench::Throughput, &results, &args.out.out_dir);
    Ok(())
}

/// What the `loss` part measures.
#[derive(Debug, Clone, Copy)]
struct LossArgs {
    percent: u8,
    bytes: u64,
    objects: usize,
    object_bytes: u64,
}

/// The process serving a target: the kernel-socket servers' (by pid) or flowshift's node.
#[derive(Clone, Copy)]
enum Server<'a> {
    Kernel(u32),
    Flowshift(&'a flowshift_testbed::NodeHandle),
}

/// The throughput measures of one target, one after the other: the kernel-socket transfers
/// for `d` each (when given), then curl's HTTP download of `http_bytes` (when given), then
/// the `loss` part (when given).
#[allow(clippy::too_many_arguments)]
fn measure(
    tb: &Testbed,
    target: Ipv4Addr,
    d: Option<Duration>,
    http_bytes: Option<u64>,
    loss: Option<&LossArgs>,
    conn_threads: usize,
    server: Server<'_>,
) -> anyhow::Result<Figures> {
    let (pid, node) = match server {
        Server::Kernel(pid) => (Some(pid), None),
        Server::Flowshift(n) => (Some(n.pid()), Some(n)),
    };
    let client = tb.client();
    let mut f = Figures::default();
    let (steal0, t0) = (sys::machine_steal_seconds(), std::time::Instant::now());

    let stat = |key: &str| {
        node.and_then(|n| n.ctl_json(&["status"]).ok())
            .and_then(|v| v["stats"][key].as_u64())
    };
    let probes = || stat("loss_probes");
    if let Some(d) = d {
        let probes0 = probes();
        let grown0 = stat("tx_grown");
        let cpu;
        (f.download, cpu) = with_cpu_per_gb(pid, || {
            client
                .run(|| load::download(addr(target, 19), d))
                .context("download")
        })?;
        (f.machine_cpu_s_per_gb, f.process_cpu_s_per_gb) = (cpu.machine, cpu.process);
        f.download_tx_grown = stat("tx_grown")
            .zip(grown0)
            .map(|(b, a)| b.saturating_sub(a));
        eprintln!(
            "  download   {:.2} Gbit/s (verified); {}{}",
            f.download.gbit_s(),
            cpu.show(),
            f.download_tx_grown
                .map_or(String::new(), |n| format!("; send buffers grown: {n}"))
        );

        let cpu;
        (f.upload, cpu) = with_cpu_per_gb(pid, || {
            client
                .run(|| load::upload(addr(target, 9), d))
                .context("upload")
        })?;
        (f.upload_machine_cpu_s_per_gb, f.upload_process_cpu_s_per_gb) =
            (Some(cpu.machine), cpu.process);
        eprintln!(
            "  upload     {:.2} Gbit/s (CRC checked); {}",
            f.upload.gbit_s(),
            cpu.show()
        );
        f.parallel8 = client
            .run(|| load::parallel_download(addr(target, 19), 8, d))
            .context("8 flows")?;
        eprintln!("  8 flows    {:.2} Gbit/s (verified)", f.parallel8.gbit_s());
        f.connections_per_s = client
            .run(|| load::connection_rate(addr(target, 7), conn_threads, d))
            .context("connection rate")?;
        eprintln!("  new conns  {:.0}/s", f.connections_per_s);
        f.clean_loss_probes = probes0.zip(probes()).map(|(a, b)| b.saturating_sub(a));
        if let Some(p) = f.clean_loss_probes {
            eprintln!("  loss probes in these clean transfers: {p}");
        }
    }
    if let Some(n) = http_bytes {
        let t = curl_download(tb, target, n).context("curl over HTTP")?;
        eprintln!("  curl HTTP  {:.2} Gbit/s (verified)", t.gbit_s());
        f.http_download = Some(t);
    }
    if let Some(l) = loss {
        let probes0 = probes();
        tb.set_router_loss(l.percent).context("router loss")?;
        let result = (|| -> anyhow::Result<(Transfer, [f64; 3])> {
            let t = curl_download(tb, target, l.bytes).context("curl through loss")?;
            let objects = curl_objects(tb, target, l.objects, l.object_bytes)
                .context("objects through loss")?;
            Ok((t, objects))
        })();
        f.loss_drops = tb.router_loss_drops().unwrap_or(0);
        tb.clear_router_loss();
        let (t, objects) = result?;
        f.loss_probes = probes0.zip(probes()).map(|(a, b)| b.saturating_sub(a));
        eprintln!(
            "  {} % loss  download {:.1} Mbit/s (verified); {} objects p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} packets dropped{}",
            l.percent,
            t.gbit_s() * 1e3,
            l.objects,
            objects[0],
            objects[1],
            objects[2],
            f.loss_drops,
            f.loss_probes
                .map_or(String::new(), |p| format!("; {p} loss probes"))
        );
        f.loss_download = Some(t);
        f.loss_object_ms = Some(objects);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let wall = t0.elapsed().as_secs_f64() * cores;
    if wall > 0.0 {
        f.steal_percent = 100.0 * (sys::machine_steal_seconds() - steal0) / wall;
    }
    eprintln!("  steal      {:.0} %", f.steal_percent);
    Ok(f)
}

/// CPU seconds per GB a transfer moved.
#[derive(Debug, Clone, Copy)]
struct CpuPerGb {
    /// Busy time of the whole machine (client, router, server and the kernel's work for
    /// them).
    machine: f64,
    /// The serving process's threads' user + system time (`None` without its pid).
    process: Option<f64>,
}

impl CpuPerGb {
    fn show(&self) -> String {
        format!(
            "CPU s per GB: machine {:.2}, server process {}",
            self.machine,
            self.process.map_or("-".to_string(), |p| format!("{p:.2}"))
        )
    }
}

/// Runs `transfer` and takes the CPU time spent while it ran, per GB it moved: the whole
/// machine's busy time, and the process `pid`'s (the server). Only a transfer that
/// succeeded (its bytes verified, or its CRC checked) gives figures.
fn with_cpu_per_gb(
    pid: Option<u32>,
    transfer: impl FnOnce() -> anyhow::Result<Transfer>,
) -> anyhow::Result<(Transfer, CpuPerGb)> {
    let (busy0, proc0) = (
        sys::machine_busy_seconds(),
        pid.map(sys::process_cpu_seconds),
    );
    let t = transfer()?;
    let (busy1, proc1) = (
        sys::machine_busy_seconds(),
        pid.map(sys::process_cpu_seconds),
    );
    let gb = t.bytes as f64 / 1e9;
    let cpu = CpuPerGb {
        machine: (busy1 - busy0) / gb,
        process: proc0.zip(proc1).map(|(a, b)| (b - a) / gb),
    };
    Ok((t, cpu))
}

/// Where the `http` part keeps nginx's files and curl's downloads: tmpfs, so neither side
/// waits for a disk.
const HTTP_DIR: &str = "/dev/shm";

/// The kernel's web server for the `http` part: nginx in node-a, one process (no master),
/// `sendfile on`, serving the counting stream as a file at the path the `http` app answers
/// (`/bytes/N`) on port 80 of node-a's own address. Stopped and its files removed on drop.
struct Nginx {
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Nginx {
    fn start(tb: &Testbed, sizes: &[u64]) -> anyhow::Result<Nginx> {
        flowshift_testbed::ensure_tools(&["nginx"])?;
        let dir =
            std::path::Path::new(HTTP_DIR).join(format!("fsbench-nginx-{}", std::process::id()));
        let mut me = Nginx { dir, child: None };
        let www = me.dir.join("www/bytes");
        std::fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        std::fs::create_dir_all(me.dir.join("tmp"))?;
        // The counting stream from offset 0, as `GET /bytes/N` of the http app sends it.
        for &bytes in sizes {
            use std::io::Write;
            let path = www.join(bytes.to_string());
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&path)
                    .with_context(|| format!("creating {}", path.display()))?,
            );
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < bytes {
                let k = (bytes - at).min(buf.len() as u64) as usize;
                flowshift_core::app::counting::fill(at, &mut buf[..k]);
                file.write_all(&buf[..k])?;
                at += k as u64;
            }
            file.flush()?;
        }
        let d = me.dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n\
               client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
               uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               server {{ listen {NODE_A}:80; root {d}/www; }}\n}}\n"
        );
        let conf_path = me.dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = tb.node_a().command("nginx");
        cmd.arg("-e")
            .arg(me.dir.join("error.log"))
            .arg("-p")
            .arg(&me.dir)
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        me.child = Some(tb.spawn(cmd)?);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let target = addr(NODE_A, 80);
        loop {
            let up = tb
                .client()
                .run(move || {
                    std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
                })
                .is_ok();
            if up {
                return Ok(me);
            }
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(me.dir.join("error.log")).unwrap_or_default();
                anyhow::bail!("nginx exited with {status}: {}", log.trim());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nginx did not listen on {target} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Our own child, by its PID.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl in the client namespace downloads `GET /bytes/n` from `target` port 80 into tmpfs;
/// the time is curl's own (`time_total`, connect included), the file is then checked byte for
/// byte against the counting stream and removed.
fn curl_download(tb: &Testbed, target: Ipv4Addr, n: u64) -> anyhow::Result<Transfer> {
    let out = std::path::Path::new(HTTP_DIR)
        .join(format!("fsbench-curl-{}-{target}", std::process::id()));
    let mut cmd = tb.client().command("curl");
    cmd.args(["-sS", "--fail", "--max-time", "300", "-o"])
        .arg(&out)
        .args(["-w", "%{time_total} %{size_download}"])
        .arg(format!("http://{target}/bytes/{n}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let result = tb
        .spawn(cmd)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(c.wait_with_output()?))
        .and_then(|o| {
            anyhow::ensure!(
                o.status.success(),
                "curl: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let mut it = text.split_whitespace();
            let seconds: f64 = it
                .next()
                .and_then(|x| x.parse().ok())
                .context("curl's time_total")?;
            let size: u64 = it
                .next()
                .and_then(|x| x.parse().ok())
                .context("curl's size_download")?;
            anyhow::ensure!(size == n, "curl downloaded {size} bytes, not {n}");
            verify_counting_file(&out, n)?;
            Ok(Transfer { bytes: n, seconds })
        });
    let _ = std::fs::remove_file(&out);
    result
}

/// curl in the client namespace fetches `GET /bytes/size` from `target` port 80 `count`
/// times, one after the other on one keep-alive connection; every body is checked against
/// the counting stream. Returns the per-object times (curl's `time_total` of each transfer)
/// at p50, p99 and max, in ms.
fn curl_objects(
    tb: &Testbed,
    target: Ipv4Addr,
    count: usize,
    size: u64,
) -> anyhow::Result<[f64; 3]> {
    let url = format!("http://{target}/bytes/{size}");
    let mut cmd = tb.client().command("curl");
    cmd.args([
        "-sS",
        "--fail",
        "--max-time",
        "600",
        "-w",
        "%{stderr}%{time_total}\\n",
    ])
    .args(std::iter::repeat_n(&url, count))
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let out = tb.spawn(cmd)?.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "curl: {} {}",
        out.status,
        stderr.trim()
    );
    anyhow::ensure!(
        out.stdout.len() as u64 == count as u64 * size,
        "curl fetched {} bytes, not {count} × {size}",
        out.stdout.len()
    );
    for body in out.stdout.chunks(size as usize) {
        let mut verifier = flowshift_testbed::oracle::CountingVerifier::new();
        verifier.feed(body)?;
    }
    let mut ms: Vec<f64> = stderr
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|s| s * 1e3)
        .collect();
    anyhow::ensure!(
        ms.len() == count,
        "curl reported {} times for {count} objects: {}",
        ms.len(),
        stderr.trim()
    );
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok([at(0.5), at(0.99), ms[ms.len() - 1]])
}

/// Checks that the file at `path` is the first `n` bytes of the counting stream.
fn verify_counting_file(path: &std::path::Path, n: u64) -> anyhow::Result<()> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut verifier = flowshift_testbed::oracle::CountingVerifier::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = file.read(&mut buf)?;
        if k == 0 {
            break;
        }
        verifier.feed(&buf[..k])?;
    }
    anyhow::ensure!(
        verifier.offset() == n,
        "{} holds {} bytes, not {n}",
        path.display(),
        verifier.offset()
    );
    Ok(())
}

/// Connections one idle-client process holds at most: this machine kind's hard limit of open
/// files is 20,000 and cannot be raised in its containers.
const CONNS_PER_CLIENT: usize = 15_000;

/// Client processes (each with a source address of its own) for `idle` connections: four, or
/// more when four cannot hold them.
fn idle_clients(idle: usize) -> usize {
    idle.div_ceil(CONNS_PER_CLIENT).clamp(4, 40)
}

/// The connections the kernel baseline holds at most: its server is one process, under the
/// same limit of open files.
fn kernel_idle_max() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        (lim.rlim_cur as usize).saturating_sub(1_000).max(1_000)
    } else {
        CONNS_PER_CLIENT
    }
}

/// Memory per idle connection: `idle` connections that echoed `payload` bytes each way,
/// then held idle past flowshift's compaction delay. The connections are held by client
/// processes (`idle-client`) in the client namespace, a source address each.
fn idle_memory(
    tb: &Testbed,
    target: Ipv4Addr,
    idle: usize,
    node: Option<&flowshift_testbed::NodeHandle>,
    payload: usize,
) -> anyhow::Result<Idle> {
    let pid = node.map(|n| n.pid());
    // Let TIME-WAIT and closing sockets settle before measuring memory.
    std::thread::sleep(Duration::from_secs(1));
    let before = match pid {
        Some(pid) => sys::process_rss_bytes(pid),
        None => sys::kernel_slab_bytes(),
    };
    let clients = idle_clients(idle);
    let share = idle.div_ceil(clients);
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("non-UTF-8 path of this binary")?;
    let mut children = Vec::new();
    let t_open = std::time::Instant::now();
    for i in 0..clients {
        let n = share.min(idle.saturating_sub(i * share));
        if n == 0 {
            break;
        }
        let source = Ipv4Addr::new(198, 18, 1, 10 + i as u8);
        let have = tb.client().ip(&["-4", "addr", "show", "dev", "eth0"])?;
        if !have.contains(&format!("{source}/")) {
            tb.client()
                .ip(&["addr", "add", &format!("{source}/24"), "dev", "eth0"])?;
        }
        let mut cmd = tb.client().command(exe);
        cmd.args([
            "idle-client",
            "--addr",
            &addr(target, 7).to_string(),
            "--n",
            &n.to_string(),
            "--payload",
            &payload.to_string(),
            "--source",
            &source.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
        children.push(tb.spawn(cmd).context("starting an idle client")?);
    }
    let mut held = 0;
    for c in &mut children {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.as_mut().context("idle client stdout")?),
            &mut line,
        )?;
        held += line
            .trim()
            .strip_prefix("ready ")
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("idle client to {target}: {}", line.trim()))?;
    }
    anyhow::ensure!(held == idle, "{held} of {idle} idle connections opened");
    let open_s = t_open.elapsed().as_secs_f64();
    // Past the compaction delay, and long enough for flowshift's sweeps to compact them all
    // (each worker compacts up to 500 a second); the same wait for both.
    let compact = flowshift_core::stack::COMPACT_AFTER.total_millis();
    std::thread::sleep(Duration::from_millis(compact + 2_500 + idle as u64));
    let after = match pid {
        Some(pid) => sys::process_rss_bytes(pid),
        None => sys::kernel_slab_bytes(),
    };
    // Closing their stdin ends the clients, and with them the connections.
    for mut c in children {
        drop(c.stdin.take());
        let status = c.wait()?;
        anyhow::ensure!(status.success(), "an idle client exited with {status}");
    }
    // The node's side of the closes: wait until it holds no connection, so the next
    // measurement starts from an empty node (bounded: a liveness limit, not a figure).
    let t_close = std::time::Instant::now();
    let close_s = match node {
        Some(n) => loop {
            let open = n
                .ctl_json(&["status"])
                .ok()
                .and_then(|s| s["connections"].as_u64());
            if open == Some(0) {
                break Some(t_close.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                t_close.elapsed() < Duration::from_secs(900),
                "the node still holds {open:?} connections 15 minutes after the clients closed them"
            );
            std::thread::sleep(Duration::from_millis(200));
        },
        None => None,
    };
    let grown = after.saturating_sub(before) as f64;
    let i = Idle {
        conns: idle,
        bytes_per_conn: if pid.is_some() { grown } else { grown / 2.0 } / idle.max(1) as f64,
        payload,
        close_s,
    };
    eprintln!(
        "  {target}: {:.1} KiB per idle connection ({idle} open in {open_s:.0} s by {clients} clients, {payload} bytes echoed each{})",
        i.bytes_per_conn / 1024.0,
        close_s.map_or(String::new(), |c| format!(
            "; all closed at the node {c:.1} s after the clients closed them"
        ))
    );
    Ok(i)
}

fn summarize(k: &[Figures], f: &[Figures]) -> Vec<Row> {
    type Pick = fn(&Figures) -> f64;
    let measures: [(&'static str, Pick); 7] = [
        ("single-flow download, Gbit/s", |x| x.download.gbit_s()),
        ("single-flow upload, Gbit/s", |x| x.upload.gbit_s()),
        ("8 parallel downloads, Gbit/s", |x| x.parallel8.gbit_s()),
        ("new connections per second", |x| x.connections_per_s),
        ("machine CPU s per GB (download)", |x| {
            x.machine_cpu_s_per_gb
        }),
        ("machine CPU s per GB (upload)", |x| {
            x.upload_machine_cpu_s_per_gb.unwrap_or(f64::NAN)
        }),
        ("steal, %", |x| x.steal_percent),
    ];
    // Without the `transfer` part only steal is left of these.
    let transfers = k.iter().chain(f).any(|x| x.download.bytes > 0);
    let mut rows: Vec<Row> = measures
        .iter()
        .filter(|(name, _)| transfers || *name == "steal, %")
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
    let http = |x: &Figures| x.http_download.map_or(f64::NAN, |t| t.gbit_s());
    if k.iter().chain(f).any(|x| x.http_download.is_some()) {
        rows.push(Row {
            name: "curl download over HTTP (kernel: nginx, sendfile), Gbit/s",
            kernel: Spread::of(k.iter().map(http).collect()),
            flowshift: Spread::of(f.iter().map(http).collect()),
            ratio: Spread::of(k.iter().zip(f).map(|(a, b)| http(b) / http(a)).collect()),
        });
    }
    if k.iter().chain(f).any(|x| x.loss_download.is_some()) {
        type PickOpt = fn(&Figures) -> f64;
        let loss: [(&'static str, PickOpt); 4] = [
            ("curl download through the router's loss, Mbit/s", |x| {
                x.loss_download.map_or(f64::NAN, |t| t.gbit_s() * 1e3)
            }),
            ("small object through the loss, p50 ms", |x| {
                x.loss_object_ms.map_or(f64::NAN, |m| m[0])
            }),
            ("small object through the loss, p99 ms", |x| {
                x.loss_object_ms.map_or(f64::NAN, |m| m[1])
            }),
            ("small object through the loss, max ms", |x| {
                x.loss_object_ms.map_or(f64::NAN, |m| m[2])
            }),
        ];
        for (name, pick) in loss {
            rows.push(Row {
                name,
                kernel: Spread::of(k.iter().map(pick).collect()),
                flowshift: Spread::of(f.iter().map(pick).collect()),
                ratio: Spread::of(k.iter().zip(f).map(|(a, b)| pick(b) / pick(a)).collect()),
            });
        }
        rows.push(Row {
            name: "loss probes per run (flowshift)",
            kernel: None,
            flowshift: Spread::of(
                f.iter()
                    .filter_map(|x| x.loss_probes.map(|p| p as f64))
                    .collect(),
            ),
            ratio: None,
        });
    }
    let process: [(&'static str, Pick); 2] = [
        (
            "server process CPU s per GB (download; its threads' user + system time)",
            |x| x.process_cpu_s_per_gb.unwrap_or(f64::NAN),
        ),
        (
            "server process CPU s per GB (upload; its threads' user + system time)",
            |x| x.upload_process_cpu_s_per_gb.unwrap_or(f64::NAN),
        ),
    ];
    if transfers {
        rows.extend(process.into_iter().map(|(name, pick)| Row {
            name,
            kernel: Spread::of(k.iter().map(pick).collect()),
            flowshift: Spread::of(f.iter().map(pick).collect()),
            ratio: Spread::of(k.iter().zip(f).map(|(a, b)| pick(b) / pick(a)).collect()),
        }));
    }
    rows.extend(transfers.then(|| {
        Row {
            name: "flowshift loss probes during the clean transfers",
            kernel: None,
            flowshift: Spread::of(
                f.iter()
                    .filter_map(|x| x.clean_loss_probes.map(|p| p as f64))
                    .collect(),
            ),
            ratio: None,
        }
    }));
    rows
}

fn markdown(r: &Results) -> String {
    let mut s = format!(
        "Machine: {} · kernel {} · veth MTU {} · TUN MTU {} · offload {} · workers {}{} · socket buffers {} · {} runs of {} s per measure, kernel and flowshift back to back in alternating order\n\n",
        r.machine,
        r.kernel,
        r.veth_mtu,
        r.tun_mtu,
        if r.offload { "on" } else { "off" },
        r.workers
            .map_or("default (cores)".to_string(), |w| w.to_string()),
        if r.pin_workers {
            ", pinned"
        } else {
            ", not pinned"
        },
        r.tcp_buffer
            .map_or("default (256 KiB)".to_string(), |b| format!("{b} B")),
        r.runs,
        r.duration_s
    );
    s += "Median [min–max] over the runs; the ratio column is flowshift / kernel run by run. Every download was checked byte for byte against the counting stream and every upload's CRC-32 against what was sent.";
    if r.http_bytes > 0 {
        s += &format!(
            " curl's HTTP downloads were {} bytes each (`GET /bytes/N`; the kernel's from nginx with sendfile, one process, on node-a's own address), timed by curl (`time_total`) into tmpfs and verified afterwards.",
            r.http_bytes
        );
    }
    if r.loss_percent > 0 {
        s += &format!(
            " Through the loss: the router drops {} % of the packets it forwards, at random, both ways (nftables, one segment per packet); curl downloads {} bytes, then fetches {} objects of {} bytes one after the other on one keep-alive connection, each timed by curl (`time_total`); every body verified; the node's loss probes (`tcp.loss_probes`) {}.",
            r.loss_percent,
            r.loss_bytes,
            r.loss_objects,
            r.loss_object_bytes,
            if r.loss_probes { "on" } else { "off" }
        );
    }
    if !r.direct_receive {
        s += " The node's direct receive (`tcp.direct_receive`) was off: every received byte went through smoltcp's receive ring.";
    }
    if let Some(b) = r.tx_buffer_max {
        s += &format!(" The node's `tcp.tx_buffer_max` was {b} bytes.");
    }
    let grown: Vec<u64> = r
        .flowshift
        .iter()
        .filter_map(|f| f.download_tx_grown)
        .collect();
    if !grown.is_empty() {
        s += &format!(
            " Send buffers the node grew during each run's single-flow download: {grown:?}."
        );
    }
    s += "\n\n";
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
    let flag = |i: usize| {
        if r.flagged_runs.contains(&(i + 1)) {
            " (steal > 10 %: flagged)"
        } else {
            ""
        }
    };
    let runs = r.kernel_tcp.iter().zip(&r.flowshift).enumerate();
    let transfers = r
        .kernel_tcp
        .iter()
        .chain(&r.flowshift)
        .any(|x| x.download.bytes > 0 || x.http_download.is_some());
    if transfers {
        s += "\nPer run (Gbit/s download / upload / 8 flows / curl over HTTP, steal %):\n\n| run | kernel | flowshift |\n|---|---|---|\n";
        for (i, (k, f)) in runs.clone() {
            let one = |x: &Figures| {
                format!(
                    "{:.2} / {:.2} / {:.2} / {}, {:.0} %",
                    x.download.gbit_s(),
                    x.upload.gbit_s(),
                    x.parallel8.gbit_s(),
                    x.http_download
                        .map_or("-".to_string(), |t| format!("{:.2}", t.gbit_s())),
                    x.steal_percent
                )
            };
            s += &format!("| {}{} | {} | {} |\n", i + 1, flag(i), one(k), one(f));
        }
    }
    if r.loss_percent > 0 {
        s += "\nPer run through the loss (download Mbit/s / object p99 ms / object max ms, packets dropped, flowshift's loss probes):\n\n| run | kernel | flowshift |\n|---|---|---|\n";
        for (i, (k, f)) in runs {
            let one = |x: &Figures| {
                let [_, p99, max] = x.loss_object_ms.unwrap_or([f64::NAN; 3]);
                format!(
                    "{:.1} / {p99:.1} / {max:.1}, {} dropped{}",
                    x.loss_download.map_or(f64::NAN, |t| t.gbit_s() * 1e3),
                    x.loss_drops,
                    x.loss_probes
                        .map_or(String::new(), |p| format!(", {p} probes"))
                )
            };
            s += &format!("| {}{} | {} | {} |\n", i + 1, flag(i), one(k), one(f));
        }
    }
    s
}

/// What the figures take from `throughput.json`.
#[derive(Debug, Deserialize)]
struct Saved {
    kernel_tcp: Vec<Figures>,
    flowshift: Vec<Figures>,
    #[serde(default)]
    kernel_idle: Vec<Idle>,
    #[serde(default)]
    flowshift_idle: Vec<Idle>,
    #[serde(default)]
    duration_s: u64,
    #[serde(default)]
    flagged_runs: Vec<usize>,
}

/// The targets for flowshift / kernel: single-flow download ≥ 0.6, upload and 8
/// flows ≥ 0.8 (issue 13).
const TARGET_DOWNLOAD: f64 = 0.6;
const TARGET_UPLOAD_8FLOWS: f64 = 0.8;
/// The target for node RSS per idle connection that has moved 64 KiB.
const TARGET_IDLE_KIB: f64 = 16.0;

/// Draws `throughput-ratios.svg`, `throughput-cpu.svg` and `throughput-memory.svg` from a
/// `throughput.json` into `dir`.
pub(crate) fn figures(
    v: &serde_json::Value,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let r: Saved = serde_json::from_value(v.clone()).context("throughput results")?;
    let runs = r.kernel_tcp.len().min(r.flowshift.len());
    let title_runs = format!(
        "{runs} run(s){}",
        if r.duration_s > 0 {
            format!(" of {} s", r.duration_s)
        } else {
            String::new()
        }
    );
    // Per run: flagged for steal (drawn hollow).
    let flagged: Vec<bool> = (1..=runs).map(|i| r.flagged_runs.contains(&i)).collect();
    type Pick = fn(&Figures) -> f64;
    let measures: [(&str, Pick); 5] = [
        ("single-flow\ndownload", |x| x.download.gbit_s()),
        ("single-flow\nupload", |x| x.upload.gbit_s()),
        ("8 parallel\ndownloads", |x| x.parallel8.gbit_s()),
        ("new connections\nper second", |x| x.connections_per_s),
        ("curl over HTTP\n(vs nginx)", |x| {
            x.http_download.map_or(f64::NAN, |t| t.gbit_s())
        }),
    ];
    let ratios = Figure {
        title: format!("flowshift / kernel TCP, run by run ({title_runs})"),
        y_desc: "flowshift / kernel".into(),
        categories: measures.iter().map(|(n, _)| (*n).to_owned()).collect(),
        series: vec![Series {
            label: "flowshift / kernel (points: runs, bar: median, whisker: min–max)".into(),
            colour: plot::FLOWSHIFT,
            values: measures
                .iter()
                .map(|(_, pick)| {
                    r.kernel_tcp
                        .iter()
                        .zip(&r.flowshift)
                        .map(|(k, f)| {
                            if pick(k) > 0.0 {
                                pick(f) / pick(k)
                            } else {
                                f64::NAN
                            }
                        })
                        .collect()
                })
                .collect(),
            flagged: vec![flagged.clone(); measures.len()],
        }],
        refs: vec![
            RefLine {
                label: "kernel = 1".into(),
                y: 1.0,
                categories: vec![],
            },
            RefLine {
                label: format!("target ≥ {TARGET_DOWNLOAD} (downloads)"),
                y: TARGET_DOWNLOAD,
                categories: vec![0, 4],
            },
            RefLine {
                label: format!("target ≥ {TARGET_UPLOAD_8FLOWS} (upload, 8 flows)"),
                y: TARGET_UPLOAD_8FLOWS,
                categories: vec![1, 2],
            },
        ],
        log_y: false,
        connect: false,
    };
    // CPU per GB, per direction: the whole machine's and the server process's; the upload's
    // only where measured (not in results from before it was).
    let mut cpu_measures: Vec<(&str, Pick)> = vec![
        ("download\nwhole machine\n(busy time)", |x| {
            x.machine_cpu_s_per_gb
        }),
        ("download\nserver process\nonly", |x| {
            x.process_cpu_s_per_gb.unwrap_or(f64::NAN)
        }),
    ];
    let uploads = r
        .kernel_tcp
        .iter()
        .chain(&r.flowshift)
        .any(|x| x.upload_machine_cpu_s_per_gb.is_some());
    if uploads {
        cpu_measures.extend::<[(&str, Pick); 2]>([
            ("upload\nwhole machine\n(busy time)", |x| {
                x.upload_machine_cpu_s_per_gb.unwrap_or(f64::NAN)
            }),
            ("upload\nserver process\nonly", |x| {
                x.upload_process_cpu_s_per_gb.unwrap_or(f64::NAN)
            }),
        ]);
    }
    let cpu_series = |label: &str, colour, v: &[Figures]| Series {
        label: label.into(),
        colour,
        values: cpu_measures
            .iter()
            .map(|(_, pick)| v.iter().map(pick).collect())
            .collect(),
        flagged: vec![flagged.clone(); cpu_measures.len()],
    };
    let cpu = Figure {
        title: format!(
            "CPU seconds per GB {}, single flow ({title_runs})",
            if uploads {
                "downloaded and uploaded"
            } else {
                "downloaded"
            }
        ),
        y_desc: "CPU s per GB".into(),
        categories: cpu_measures.iter().map(|(n, _)| (*n).to_owned()).collect(),
        series: vec![
            cpu_series("kernel TCP", plot::KERNEL, &r.kernel_tcp),
            cpu_series("flowshift", plot::FLOWSHIFT, &r.flowshift),
        ],
        refs: vec![],
        log_y: false,
        connect: false,
    };
    let idle_cat = |i: &Idle| {
        format!(
            "idle after echoing {}\n({} connections)",
            if i.payload >= 1024 {
                format!("{} KiB", i.payload / 1024)
            } else {
                format!("{} B", i.payload)
            },
            i.conns
        )
    };
    let kib = |v: &[Idle]| -> Vec<Vec<f64>> {
        v.iter().map(|i| vec![i.bytes_per_conn / 1024.0]).collect()
    };
    let memory = Figure {
        title: "memory per idle connection".into(),
        y_desc: "KiB per connection".into(),
        categories: r.flowshift_idle.iter().map(idle_cat).collect(),
        series: vec![
            Series {
                label: "kernel TCP (half the slab growth)".into(),
                colour: plot::KERNEL,
                values: kib(&r.kernel_idle),
                ..Default::default()
            },
            Series {
                label: "flowshift (node RSS growth)".into(),
                colour: plot::FLOWSHIFT,
                values: kib(&r.flowshift_idle),
                ..Default::default()
            },
        ],
        refs: r
            .flowshift_idle
            .iter()
            .position(|i| i.payload >= 64 * 1024)
            .map(|i| RefLine {
                label: format!("target ≤ {TARGET_IDLE_KIB} KiB"),
                y: TARGET_IDLE_KIB,
                categories: vec![i],
            })
            .into_iter()
            .collect(),
        log_y: false,
        connect: false,
    };
    plot::draw_all(
        dir,
        &[
            ("throughput-ratios", ratios),
            ("throughput-cpu", cpu),
            ("throughput-memory", memory),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{assert_svg, temp_dir};

    fn figures_of(k: f64, f: f64) -> Figures {
        let t = |gbit: f64| Transfer {
            bytes: (gbit * 1e9 / 8.0) as u64,
            seconds: 1.0,
        };
        Figures {
            download: t(10.0 * f),
            upload: t(8.0 * f),
            parallel8: t(12.0 * f),
            http_download: Some(t(9.0 * f)),
            connections_per_s: 20_000.0 * f,
            machine_cpu_s_per_gb: 1.0 / f,
            process_cpu_s_per_gb: Some(0.35 / f),
            upload_machine_cpu_s_per_gb: Some(1.2 / f),
            upload_process_cpu_s_per_gb: Some(0.5 / f),
            steal_percent: 3.0 * k,
            loss_download: Some(t(0.05 * f)),
            loss_object_ms: Some([0.1, 200.0 / f, 400.0 / f]),
            loss_drops: 100,
            loss_probes: (f < 1.0).then_some(120),
            clean_loss_probes: (f < 1.0).then_some(0),
            download_tx_grown: (f < 1.0).then_some(1),
        }
    }

    #[test]
    fn the_loss_part_is_summarised_with_its_ratios() {
        let k = vec![figures_of(1.0, 1.0); 3];
        let f = vec![figures_of(1.0, 0.5); 3];
        let rows = summarize(&k, &f);
        let row = |name: &str| rows.iter().find(|r| r.name == name).unwrap();
        let p99 = row("small object through the loss, p99 ms");
        assert_eq!(p99.ratio.unwrap().median, 2.0);
        let dl = row("curl download through the router's loss, Mbit/s");
        assert!((dl.ratio.unwrap().median - 0.5).abs() < 1e-9);
        assert_eq!(
            row("loss probes per run (flowshift)")
                .flowshift
                .unwrap()
                .median,
            120.0
        );
    }

    #[test]
    fn cpu_per_gb_is_summarised_for_both_directions() {
        let k = vec![figures_of(1.0, 1.0); 3];
        let f = vec![figures_of(1.0, 0.5); 3];
        let rows = summarize(&k, &f);
        let row = |name: &str| rows.iter().find(|r| r.name.starts_with(name)).unwrap();
        for (name, kernel) in [
            ("machine CPU s per GB (download)", 1.0),
            ("machine CPU s per GB (upload)", 1.2),
            ("server process CPU s per GB (download;", 0.35),
            ("server process CPU s per GB (upload;", 0.5),
        ] {
            let r = row(name);
            assert!((r.kernel.unwrap().median - kernel).abs() < 1e-9, "{name}");
            assert!(
                (r.flowshift.unwrap().median - 2.0 * kernel).abs() < 1e-9,
                "{name}"
            );
            assert!((r.ratio.unwrap().median - 2.0).abs() < 1e-9, "{name}");
        }
    }

    #[test]
    fn figures_of_a_synthetic_run() {
        let results = Results {
            machine: "test machine (2 cores)".into(),
            kernel: "6.1".into(),
            veth_mtu: 1500,
            tun_mtu: 1500,
            offload: true,
            workers: None,
            pin_workers: true,
            tcp_buffer: None,
            duration_s: 1,
            http_bytes: 1_000_000,
            loss_percent: 2,
            loss_bytes: 4_000_000,
            loss_objects: 200,
            loss_object_bytes: 16_000,
            loss_probes: true,
            direct_receive: true,
            tx_buffer_max: None,
            runs: 3,
            kernel_tcp: vec![figures_of(1.0, 1.0); 3],
            flowshift: vec![
                figures_of(1.0, 0.5),
                figures_of(1.0, 0.6),
                figures_of(1.0, 0.7),
            ],
            flagged_runs: vec![2],
            summary: vec![],
            kernel_idle: vec![
                Idle {
                    bytes_per_conn: 4096.0,
                    conns: 100,
                    payload: 1,
                    close_s: None,
                },
                Idle {
                    bytes_per_conn: 8192.0,
                    conns: 100,
                    payload: 65536,
                    close_s: None,
                },
            ],
            flowshift_idle: vec![
                Idle {
                    bytes_per_conn: 2048.0,
                    conns: 100,
                    payload: 1,
                    close_s: None,
                },
                Idle {
                    bytes_per_conn: 140_000.0,
                    conns: 100,
                    payload: 65536,
                    close_s: None,
                },
            ],
        };
        let dir = temp_dir("throughput");
        let paths = figures(&serde_json::to_value(&results).unwrap(), &dir).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "throughput-ratios.svg",
                "throughput-cpu.svg",
                "throughput-memory.svg"
            ]
        );
        assert_svg(
            &paths[0],
            &[
                plot::FLAGGED,
                "flowshift / kernel",
                "target ≥ 0.6 (downloads)",
                "curl over HTTP",
                "target ≥ 0.8 (upload, 8 flows)",
                "single-flow",
                "8 parallel",
            ],
        );
        assert_svg(
            &paths[1],
            &[
                "kernel TCP",
                "flowshift",
                "CPU s per GB",
                "server process",
                "upload",
                "downloaded and uploaded",
            ],
        );
        assert_svg(
            &paths[2],
            &[
                "kernel TCP (half the slab growth)",
                "flowshift (node RSS growth)",
                "target ≤ 16 KiB",
                "64 KiB",
            ],
        );
        // `flowshift-bench plot` on the saved JSON: the same figures, next to it.
        let json = dir.join("throughput.json");
        std::fs::write(&json, serde_json::to_string_pretty(&results).unwrap()).unwrap();
        for p in &paths {
            std::fs::remove_file(p).unwrap();
        }
        plot::redraw(&json, None).unwrap();
        for p in &paths {
            assert_svg(p, &["flowshift"]);
        }
        if std::env::var_os("FLOWSHIFT_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
