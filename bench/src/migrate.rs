//! `flowshift-bench migrate`: live migration measured from the client, beside the kernel's
//! TCP_REPAIR handoff, in one run on one topology.
//!
//! Each run builds on the same testbed (client ── router ── node-a / node-b) and measures, in
//! this order (the kernel baseline goes first in every other run):
//!
//! 1. **stall**: two flowshift nodes joined by the tunnel; a kernel client in the client
//!    namespace downloads the counting stream from `source` (port 19) as fast as it reads,
//!    checking every byte; the connection is moved A→B→A… (a `migrate` request on the node's
//!    control socket, or with `--trigger ctl` a `flowshift ctl migrate` process; one
//!    request every `interval`, at most `max_seconds`). Per move: the longest gap between two
//!    client reads from `before` ahead of the request to `after` past its reply (the stall),
//!    the freeze time the node reports, the `ctl` round trip, the client's throughput in
//!    `bin`-wide bins around the request (the dip). Two controls, with no move: the same
//!    longest-gap measure over equal windows of the warm-up (the noise floor), and around a
//!    `status` request, sent the same way, half-way between two moves (what the request
//!    alone costs the client's reads on this 2-core machine).
//! 2. **steady**: one download moved to node-b (its packets enter at node-a and its replies are
//!    relayed back through it, or with `--direct-return` leave node-b straight) beside one that
//!    stays on node-a, read in alternate slices.
//! 3. **drain**: `idle` established idle connections to `echo` (port 7) on node-a, then
//!    `ctl drain --to b`; connections per second, then a sample of them echoes checked bytes
//!    and every one is polled for a reset or an end of stream.
//! 4. **kernel**: the flowshift nodes stopped, the kernel baseline (`repair.rs`): the same
//!    number of handoffs at the same interval with the same stall window.
//!
//! Runs that lost or corrupted a byte, or saw a reset, fail the benchmark (after printing what
//! was measured).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::plot::{self, Figure, RefLine, Series};
use crate::progress::Progress;
use crate::repair::{self, HandoffStats, RepairOptions, Summary};
use crate::stats::Spread;
use crate::{addr, load, sys};
use flowshift_testbed::kernel_handoff::HandoffOptions;
use flowshift_testbed::oracle::CountingVerifier;
use flowshift_testbed::testbed::SERVICE_ADDR;
use flowshift_testbed::tunnel::{TunnelKeys, tunnel_toml, wait_alive};
use flowshift_testbed::{Node, NodeConfig, NodeHandle, Testbed, TestbedOptions};

/// Bytes per read of the downloading clients.
const CHUNK: usize = 256 * 1024;
/// Port of the `source` service (the counting stream, forever).
const SOURCE_PORT: u16 = 19;
/// Port of the `echo` service.
const ECHO_PORT: u16 = 7;

/// How the benchmark asks a node to move a connection.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Trigger {
    /// The JSON request on the node's control socket, sent from the benchmark's own process
    /// (what an orchestrator does; the kernel baseline's handoff is also done in-process).
    Socket,
    /// A `flowshift ctl --json migrate` process per move (what an operator at a shell does:
    /// the process start competes with the client for the 2 cores).
    Ctl,
}

/// Which parts to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Part {
    /// Client-observed stall per move of a bulk download, and the dip around it.
    Stall,
    /// A moved download beside one that stayed.
    Steady,
    /// `ctl drain` with many idle connections.
    Drain,
    /// The kernel TCP_REPAIR baseline.
    Kernel,
}

/// Arguments of `flowshift-bench migrate`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Runs; every figure is given as the median and the range over runs. The kernel
    /// baseline goes first in every other run. About 2.5 minutes per run with the defaults.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Parts to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "stall,steady,drain,kernel"
    )]
    parts: Vec<Part>,
    /// Moves of the download (A→B, B→A, …), and handoffs of the kernel baseline.
    #[arg(long, default_value_t = 100)]
    moves: usize,
    /// Milliseconds from the start of one move to the start of the next (both flowshift and
    /// the kernel baseline; below 500 the kernel baseline stalls on the client's rate limit
    /// of answers to out-of-window probes, see `repair`).
    #[arg(long, default_value_t = 600)]
    interval_ms: u64,
    /// Milliseconds of download before the first move (the no-move noise floor is measured
    /// in it, after the first 500 ms).
    #[arg(long, default_value_t = 3000)]
    warmup_ms: u64,
    /// No move starts later than this many seconds into the download.
    #[arg(long, default_value_t = 90)]
    max_seconds: u64,
    /// The stall window starts this many milliseconds before each request…
    #[arg(long, default_value_t = 50)]
    before_ms: u64,
    /// …and ends this many milliseconds after its reply.
    #[arg(long, default_value_t = 200)]
    after_ms: u64,
    /// Width of the throughput bins around a move, milliseconds.
    #[arg(long, default_value_t = 100)]
    bin_ms: u64,
    /// Bins before the request.
    #[arg(long, default_value_t = 2)]
    bins_before: usize,
    /// Bins from the request on (keep `(bins_before + bins_after) × bin` below the interval).
    #[arg(long, default_value_t = 4)]
    bins_after: usize,
    /// Slices per download in the moved-beside-unmoved comparison (read alternately).
    #[arg(long, default_value_t = 4)]
    steady_slices: usize,
    /// Milliseconds per slice; the first 250 ms of each are not counted (the reader drains
    /// what the kernel buffered while the flow waited).
    #[arg(long, default_value_t = 1500)]
    steady_slice_ms: u64,
    /// Percent of the TCP packets the router forwards that it drops, at random, during the
    /// stall and kernel parts (the clients' traffic both ways; the tunnel's UDP is spared):
    /// moves of a download that is recovering losses, against TCP_REPAIR handoffs under the
    /// same loss. 0: no loss.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=50))]
    loss: u8,
    /// In the steady part, also read the same download from a kernel server on node-b
    /// reached through wireguard-go (the client's packets enter at node-a and cross
    /// wireguard-go to node-b, the replies come back the same way): the moved download's
    /// anchor, read in turn with the other two. `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wg: bool,
    /// Before the slices, read only the moved download for this many seconds (to profile
    /// the relay; the node pids are printed).
    #[arg(long, default_value_t = 0, hide = true)]
    steady_hold_s: u64,
    /// Idle connections to drain.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Drained connections whose echo is checked afterwards (all are polled for a reset).
    #[arg(long, default_value_t = 100)]
    sample: usize,
    /// veth MTU of every link in the testbed.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Worker threads of each node (default: the node's, one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Per-connection socket buffers of both nodes, bytes (default: the node's, 256 KiB).
    #[arg(long)]
    tcp_buffer: Option<usize>,
    /// node-b answers the clients of connections moved to it straight from its own TUN
    /// (`direct_return` on its peer entry for node-a) instead of relaying through node-a.
    #[arg(long)]
    direct_return: bool,
    /// Forwarded packets queued together share tunnel records (`[tunnel] pack_datagrams`
    /// of both nodes): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pack_datagrams: bool,
    /// Bytes per second the downloading clients (flowshift's and the kernel baseline's) read
    /// at (default: as fast as they can).
    #[arg(long)]
    client_rate: Option<u64>,
    /// TCP port of the kernel baseline's service in the first run (plus the run's index in
    /// the others).
    #[arg(long, default_value_t = 7019)]
    kernel_port: u16,
    /// How moves (and the no-move control request) are sent to the node.
    #[arg(long, value_enum, default_value = "socket")]
    trigger: Trigger,
    /// Half-way between two moves, send a `status` request (as `--trigger` says) to the
    /// connection's node and measure the client's read gap around it too (the cost of the
    /// request without a move): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sham: bool,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write migrate.json and migrate.md into this directory.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

impl Args {
    fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }
    fn before(&self) -> Duration {
        Duration::from_millis(self.before_ms)
    }
    fn after(&self) -> Duration {
        Duration::from_millis(self.after_ms)
    }
}

// ---------------------------------------------------------------------------------------
// Results

/// One move of the download as the client and `ctl` saw it.
#[derive(Debug, Clone, Serialize)]
struct MoveRecord {
    from: &'static str,
    to: &'static str,
    /// The node answered that it moved.
    moved: bool,
    /// Why not, when it did not (its reason, or the ctl error).
    reason: Option<String>,
    /// When `ctl migrate` was started / returned, ms from the run's start.
    request_ms: f64,
    reply_ms: f64,
    /// `ctl migrate` round trip (process start, request, migration, reply), ms.
    ctl_ms: f64,
    /// The node's own time for the request (`elapsed_ms`), ms.
    node_ms: f64,
    /// `conns[0].freeze_ms`.
    freeze_ms: Option<f64>,
    /// Longest gap between two client reads in the window, ms.
    stall_ms: f64,
    /// Client throughput over `before` ahead of the request / `after` past the reply.
    gbit_s_before: f64,
    gbit_s_after: f64,
    /// Client throughput per bin, from `bins_before` bins ahead of the request.
    bins_gbit_s: Vec<f64>,
}

/// The stall part.
#[derive(Debug, Clone, Serialize)]
struct StallStats {
    moves_requested: usize,
    moves_done: usize,
    moves_failed: usize,
    /// Bytes the client received, every one checked against the counting stream.
    bytes: u64,
    byte_exact: bool,
    reset: bool,
    /// What went wrong on the client, if anything.
    client_error: Option<String>,
    duration_s: f64,
    gbit_s: f64,
    steal_percent: f64,
    stall_ms: Summary,
    /// Longest gap in windows as long as a move's (median ctl time + before + after) in the
    /// warm-up, with no move.
    control_gap_ms: Summary,
    /// The same around a `status` request half-way between two moves (sent as moves are: a
    /// request, no move), where its window does not overlap a move's.
    sham_gap_ms: Summary,
    freeze_ms: Summary,
    ctl_ms: Summary,
    node_ms: Summary,
    gbit_s_before: Summary,
    gbit_s_after: Summary,
    /// Medians of the throughput before and after, for the moves A→B and B→A apart.
    gbit_s_a_to_b: [f64; 2],
    gbit_s_b_to_a: [f64; 2],
    /// Median per bin over the moves A→B (the flow becomes relayed) and B→A (it comes home),
    /// and over the warm-up's bins (no move).
    bin_ms: f64,
    bins_from_ms: f64,
    dip_a_to_b: Vec<f64>,
    dip_b_to_a: Vec<f64>,
    warmup_bin_gbit_s: Summary,
    /// Packets the nodes answered with a reset (unknown flow) during the part.
    node_resets: u64,
    tunnel_packets_refused: u64,
    /// Both nodes' /metrics samples that changed during the part (`a …`, `b …`).
    counters: BTreeMap<String, f64>,
    per_move: Vec<MoveRecord>,
}

/// The steady part.
#[derive(Debug, Clone, Serialize)]
struct SteadyStats {
    /// Per slice, Gbit/s.
    moved_gbit_s: Vec<f64>,
    local_gbit_s: Vec<f64>,
    moved_median: f64,
    local_median: f64,
    /// moved / local.
    ratio: f64,
    bytes: u64,
    byte_exact: bool,
    steal_percent: f64,
    /// CPU use during the moved / the local download's slices.
    moved_cpu: CpuView,
    local_cpu: CpuView,
    /// The wireguard-go anchor (`--wg`): per slice, Gbit/s; its median; moved / it (per
    /// round of slices, median); CPU during its slices (`node_*`: the two wireguard-go
    /// processes).
    #[serde(default)]
    wg_gbit_s: Vec<f64>,
    wg_median: Option<f64>,
    moved_vs_wg: Option<f64>,
    wg_cpu: Option<CpuView>,
    /// `ctl conns` row of the moved download on node-b and on node-a, after a slice of it.
    moved_conn: Vec<serde_json::Value>,
    /// `ctl peers` of both nodes at the end.
    peers: Vec<serde_json::Value>,
    /// Both nodes' /metrics samples that changed during the part.
    counters: BTreeMap<String, f64>,
}

/// CPU used while a download ran.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    node_s: f64,
    machine_s: f64,
    wall_s: f64,
    bytes: u64,
    ingress: Ingress,
}

/// CPU seconds of node-a's (the ingress's) threads: its workers (what its predictor's CPU
/// metric measures) and its tunnel thread.
#[derive(Debug, Clone, Copy, Default)]
struct Ingress {
    workers_s: f64,
    tunnel_s: f64,
}

impl Ingress {
    fn read(pid: u32) -> Self {
        Self {
            workers_s: sys::threads_cpu_seconds(pid, "fs-worker"),
            tunnel_s: sys::threads_cpu_seconds(pid, "fs-tunnel"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            workers_s: self.workers_s - before.workers_s,
            tunnel_s: self.tunnel_s - before.tunnel_s,
        }
    }
}

impl CpuUse {
    fn add(&mut self, node_s: f64, machine_s: f64, since: Instant, bytes: u64) {
        self.node_s += node_s;
        self.machine_s += machine_s;
        self.wall_s += since.elapsed().as_secs_f64();
        self.bytes += bytes;
    }

    fn add_ingress(&mut self, i: Ingress) {
        self.ingress.workers_s += i.workers_s;
        self.ingress.tunnel_s += i.tunnel_s;
    }

    fn view(&self) -> CpuView {
        let gb = (self.bytes as f64 / 1e9).max(1e-9);
        let wall = self.wall_s.max(1e-9);
        CpuView {
            node_cores: self.node_s / wall,
            machine_cores: self.machine_s / wall,
            node_cpu_s_per_gb: self.node_s / gb,
            machine_cpu_s_per_gb: self.machine_s / gb,
            ingress_workers_s_per_gb: self.ingress.workers_s / gb,
            ingress_tunnel_s_per_gb: self.ingress.tunnel_s / gb,
        }
    }
}

/// CPU used while a download ran: cores busy on average, and CPU seconds per GB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct CpuView {
    /// Both flowshift processes.
    node_cores: f64,
    /// The whole machine (busy time, steal left out).
    machine_cores: f64,
    node_cpu_s_per_gb: f64,
    machine_cpu_s_per_gb: f64,
    /// Node-a's worker threads (the CPU its predictor measures), CPU s per GB.
    ingress_workers_s_per_gb: f64,
    /// Node-a's tunnel thread, CPU s per GB.
    ingress_tunnel_s_per_gb: f64,
}

/// The drain part.
#[derive(Debug, Clone, Serialize)]
struct DrainStats {
    idle: usize,
    /// Seconds to open them (connect + one echoed byte each, one at a time).
    open_s: f64,
    moved: u64,
    left: u64,
    empty: bool,
    rounds: u64,
    /// The node's own time for the drain, ms.
    node_ms: f64,
    /// `ctl drain` round trip, ms.
    ctl_ms: f64,
    /// moved / node time.
    conns_per_s: f64,
    /// moved / ctl round trip.
    conns_per_s_ctl: f64,
    freeze_ms: Summary,
    /// Connections that stayed, by reason.
    stayed: Vec<(String, u64)>,
    /// Connections whose echo was checked after the drain, and how many failed.
    sampled: usize,
    sample_failures: usize,
    /// Round trip of the sampled echoes, ms (through node-a to node-b and back).
    sample_rtt_ms: Summary,
    /// Connections with an error, an end of stream or unexpected bytes when polled after
    /// the drain (every one of them).
    broken: usize,
    first_failure: Option<String>,
    node_resets: u64,
    tunnel_packets_refused: u64,
    steal_percent: f64,
    /// Both nodes' /metrics samples that changed during the part.
    counters: BTreeMap<String, f64>,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    run: usize,
    kernel_first: bool,
    /// /proc/loadavg when the run started and ended (other work on the machine shows here).
    loadavg: [String; 2],
    stall: Option<StallStats>,
    steady: Option<SteadyStats>,
    drain: Option<DrainStats>,
    kernel: Option<HandoffStats>,
    /// What failed, if anything (the figures above are what was measured up to there).
    errors: Vec<String>,
}

/// One headline figure over the runs.
#[derive(Debug, Clone, Serialize)]
struct Headline {
    name: String,
    unit: String,
    spread: Spread,
    per_run: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    machine: String,
    kernel: String,
    veth_mtu: u16,
    /// Node settings (`None`: the node's default).
    workers: Option<usize>,
    tcp_buffer: Option<usize>,
    /// Replies of moved connections leave node-b straight instead of through node-a.
    direct_return: bool,
    /// Percent of TCP packets the router dropped during the stall and kernel parts.
    #[serde(default)]
    loss_percent: u8,
    /// How moves were requested.
    trigger: Trigger,
    /// Bytes per second the downloading clients read at (`None`: as fast as they can).
    client_rate: Option<u64>,
    runs_requested: usize,
    moves: usize,
    interval_ms: u64,
    window_before_ms: u64,
    window_after_ms: u64,
    idle: usize,
    headlines: Vec<Headline>,
    runs: Vec<RunResult>,
    ok: bool,
}

// ---------------------------------------------------------------------------------------
// Statistics helpers

/// p50/p90/p99/max/mean by nearest rank (as `repair` computes them).
fn summary(v: Vec<f64>) -> Summary {
    Summary::of(v)
}

fn median(v: &[f64]) -> f64 {
    Spread::of(v.to_vec()).map_or(0.0, |s| s.median)
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

/// Client throughput over `[t0, t1]` (nanoseconds), Gbit/s.
fn rate(reads: &[(u64, u64)], t0: u64, t1: u64) -> f64 {
    if t1 <= t0 {
        return 0.0;
    }
    let bytes = received_by(reads, t1).saturating_sub(received_by(reads, t0));
    bytes as f64 * 8.0 / (t1 - t0) as f64
}

fn steal_since(steal0: f64, t0: Instant) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let wall = t0.elapsed().as_secs_f64() * cores;
    if wall > 0.0 {
        100.0 * (sys::machine_steal_seconds() - steal0) / wall
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// What a downloading client saw.
#[derive(Debug, Default)]
struct ClientReport {
    /// Every read: (ns from the epoch, bytes so far).
    reads: Vec<(u64, u64)>,
    received: u64,
    reset: bool,
    eof: bool,
    error: Option<String>,
}

/// A thread reading the counting stream from a connection until told to stop.
struct Downloader {
    handle: JoinHandle<ClientReport>,
    stop: Arc<AtomicBool>,
}

impl Downloader {
    fn start(mut s: TcpStream, epoch: Instant, rate: Option<u64>) -> anyhow::Result<Downloader> {
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("migrate-client".into())
            .spawn(move || {
                let mut r = ClientReport::default();
                r.reads.reserve(1 << 20);
                let mut buf = vec![0u8; CHUNK];
                let mut v = CountingVerifier::new();
                let mut last = Instant::now();
                let start = Instant::now();
                while !st.load(Ordering::Acquire) {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            r.eof = true;
                            r.error = Some("end of stream from a source that never ends".into());
                            break;
                        }
                        Ok(n) => {
                            let now = Instant::now();
                            last = now;
                            if let Err(m) = v.feed(&buf[..n]) {
                                r.error = Some(m.to_string());
                                break;
                            }
                            r.received += n as u64;
                            r.reads.push((ns(now.duration_since(epoch)), r.received));
                            if let Some(bps) = rate.filter(|&b| b > 0) {
                                let due =
                                    start + Duration::from_secs_f64(r.received as f64 / bps as f64);
                                if due > now {
                                    std::thread::sleep(due - now);
                                }
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            if last.elapsed() > Duration::from_secs(20) {
                                r.error = Some("no data for 20 s".into());
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            r.reset = e.kind() == io::ErrorKind::ConnectionReset;
                            r.error = Some(format!("read: {e}"));
                            break;
                        }
                    }
                }
                // Reset on close: the source never stops sending, and a FIN with unread
                // data would end in the client's RST anyway.
                reset_on_close(&s);
                r
            })?;
        Ok(Downloader { handle, stop })
    }

    fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    fn stop(self) -> ClientReport {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_else(|_| ClientReport {
            error: Some("client thread panicked".into()),
            ..Default::default()
        })
    }
}

/// SO_LINGER with a zero timeout: `close` sends RST instead of FIN.
fn reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` is a valid linger struct of the size given; `s` is an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn connect(tb: &Testbed, port: u16) -> anyhow::Result<TcpStream> {
    let a = addr(SERVICE_ADDR, port);
    tb.client()
        .run(move || TcpStream::connect_timeout(&a, Duration::from_secs(5)))
        .with_context(|| format!("connecting to {a}"))
}

// ---------------------------------------------------------------------------------------
// Nodes

struct Pair {
    a: NodeHandle,
    b: NodeHandle,
}

impl Pair {
    /// node-a and node-b with the standard services, joined by the tunnel.
    fn start(tb: &Testbed, o: &Args) -> anyhow::Result<Pair> {
        let ka = TunnelKeys::generate()?;
        let kb = TunnelKeys::generate()?;
        let config = |name: &str, tunnel: String| {
            let mut c = NodeConfig::standard(name);
            if let Some(w) = o.workers {
                c = c.workers(w);
            }
            if let Some(b) = o.tcp_buffer {
                c = c.tcp_buffers(b);
            }
            c.extra(&tunnel)
        };
        let packing = |t: String| {
            let line = format!("[tunnel]\npack_datagrams = {}\n", o.pack_datagrams);
            t.replacen("[tunnel]\n", &line, 1)
        };
        let a = config(
            "a",
            packing(tunnel_toml(tb, Node::A, &ka, Node::B, &kb.public)?),
        );
        let mut b_tunnel = packing(tunnel_toml(tb, Node::B, &kb, Node::A, &ka.public)?);
        if o.direct_return {
            // The `[[peer]]` table is the last one written.
            b_tunnel += "direct_return = true\n";
        }
        let b = config("b", b_tunnel);
        let a = tb.start_node(Node::A, &a).context("starting node-a")?;
        let b = tb.start_node(Node::B, &b).context("starting node-b")?;
        wait_alive(&a, &b, Duration::from_secs(15)).context("tunnel between a and b")?;
        Ok(Pair { a, b })
    }

    fn node(&self, on: usize) -> &NodeHandle {
        if on == 0 { &self.a } else { &self.b }
    }

    /// Sum of `stats.key` on both nodes.
    fn stat(&self, key: &str) -> u64 {
        [&self.a, &self.b]
            .iter()
            .map(|n| stat(n, key).unwrap_or(0))
            .sum()
    }

    /// Every numeric /metrics sample of both nodes, keyed `a name{labels}` / `b …`.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let mut all = BTreeMap::new();
        for (name, n) in NAMES.iter().zip([&self.a, &self.b]) {
            let Ok(text) = n.ctl(&["metrics"]) else {
                continue;
            };
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                if let Some((k, v)) = line.rsplit_once(' ')
                    && let Ok(v) = v.parse::<f64>()
                {
                    all.insert(format!("{name} {k}"), v);
                }
            }
        }
        all
    }

    fn stop(self) -> anyhow::Result<()> {
        for n in [self.a, self.b] {
            let name = n.name().to_owned();
            let status = n
                .terminate()
                .with_context(|| format!("stopping node {name}"))?;
            ensure!(status.success(), "node {name} exited with {status}");
        }
        Ok(())
    }
}

fn stat(node: &NodeHandle, key: &str) -> anyhow::Result<u64> {
    let s = node.ctl_json(&["status"])?;
    s["stats"][key]
        .as_u64()
        .ok_or_else(|| anyhow!("no stats.{key} in {s}"))
}

/// The id of the connection from `client` living (mode `local`) on `node`.
fn local_id(node: &NodeHandle, client: SocketAddrV4) -> anyhow::Result<Option<u64>> {
    let conns = node.ctl_json(&["conns"])?;
    let want = client.to_string();
    Ok(conns.as_array().and_then(|rows| {
        rows.iter()
            .find(|c| c["mode"] == "local" && c["client"].as_str() == Some(&want))
            .and_then(|c| c["id"].as_u64())
    }))
}

/// Which node the connection from `client` lives on, and its id there.
fn locate(p: &Pair, client: SocketAddrV4) -> anyhow::Result<(usize, u64)> {
    for on in [0, 1] {
        if let Some(id) = local_id(p.node(on), client)? {
            return Ok((on, id));
        }
    }
    bail!("the connection from {client} lives on neither node")
}

fn client_v4(s: &TcpStream) -> anyhow::Result<SocketAddrV4> {
    match s.local_addr()? {
        SocketAddr::V4(a) => Ok(a),
        other => bail!("client address {other} is not IPv4"),
    }
}

/// Result of one `ctl migrate --conn`.
struct Migrated {
    moved: bool,
    reason: Option<String>,
    remote_id: Option<u64>,
    freeze_ms: Option<f64>,
    node_ms: f64,
}

fn migrate_one(from: &NodeHandle, to: &str, id: u64, trigger: Trigger) -> anyhow::Result<Migrated> {
    let r = match trigger {
        Trigger::Socket => {
            from.request(&serde_json::json!({"cmd": "migrate", "to": to, "conns": [id]}))?
        }
        Trigger::Ctl => from.ctl_json(&["migrate", "--to", to, "--conn", &format!("{id:#x}")])?,
    };
    let c = &r["conns"][0];
    Ok(Migrated {
        moved: r["moved"].as_u64() == Some(1) && c["moved"].as_bool() == Some(true),
        reason: c["reason"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| r["abort"].as_str().map(str::to_owned)),
        remote_id: c["remote_id"].as_u64(),
        freeze_ms: c["freeze_ms"].as_f64(),
        node_ms: r["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
    })
}

const NAMES: [&str; 2] = ["a", "b"];

/// The samples that changed from `before` to `after` (histogram buckets and clocks left out).
fn changed(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter(|(k, _)| !k.contains("_bucket") && !k.contains("uptime") && !k.contains("_created"))
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Parts

fn stall_part(tb: &Testbed, p: &Pair, o: &Args) -> anyhow::Result<StallStats> {
    let (steal0, t_steal) = (sys::machine_steal_seconds(), Instant::now());
    let resets0 = p.stat("unknown_flow_packets");
    let refused0 = p.stat("tunnel_packets_refused");
    let m0 = p.metrics();
    let epoch = Instant::now();
    let s = connect(tb, SOURCE_PORT)?;
    let client = client_v4(&s)?;
    let dl = Downloader::start(s, epoch, o.client_rate)?;
    let (mut on, mut id) = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(id) = local_id(&p.a, client)? {
                break (0usize, id);
            }
            ensure!(
                Instant::now() < deadline,
                "node-a does not list the connection from {client}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let warmup_end = Duration::from_millis(o.warmup_ms);
    let sleep_until = |t: Instant, dl: &Downloader| -> bool {
        while Instant::now() < t {
            if dl.finished() {
                return false;
            }
            std::thread::sleep((t - Instant::now()).min(Duration::from_millis(5)));
        }
        !dl.finished()
    };
    let mut moves: Vec<(usize, usize, Duration, Duration, anyhow::Result<Migrated>)> = Vec::new();
    let mut next = epoch + warmup_end;
    let mut shams: Vec<(Duration, Duration)> = Vec::new();
    let max = Duration::from_secs(o.max_seconds);
    let interval = Duration::from_millis(o.interval_ms);
    for _ in 0..o.moves {
        if !sleep_until(next, &dl) || epoch.elapsed() >= max {
            break;
        }
        next += interval;
        let to = 1 - on;
        let t0 = epoch.elapsed();
        let r = migrate_one(p.node(on), NAMES[to], id, o.trigger);
        let t1 = epoch.elapsed();
        match &r {
            Ok(m) if m.moved => match m.remote_id {
                Some(rid) => (on, id) = (to, rid),
                None => (on, id) = locate(p, client)?,
            },
            _ => {
                // Stayed, or the request failed: find where the connection is now.
                (on, id) = locate(p, client)?;
            }
        }
        moves.push((to ^ 1, to, t0, t1, r));
        // Half-way to the next move, the same kind of request, moving nothing: the control
        // for what the request itself (and with `--trigger ctl`, its process) costs the client.
        if o.sham && sleep_until(next - interval / 2, &dl) {
            let s0 = epoch.elapsed();
            let r = match o.trigger {
                Trigger::Socket => p
                    .node(on)
                    .request(&serde_json::json!({"cmd": "status"}))
                    .map(drop),
                Trigger::Ctl => p.node(on).ctl(&["status"]).map(drop),
            };
            let s1 = epoch.elapsed();
            if r.is_ok() {
                shams.push((s0, s1));
            }
        }
    }
    let settle = Instant::now() + o.after() + Duration::from_millis(100);
    sleep_until(settle, &dl);
    let resets = p.stat("unknown_flow_packets") - resets0;
    let refused = p.stat("tunnel_packets_refused") - refused0;
    let counters = changed(&m0, &p.metrics());
    let duration = epoch.elapsed();
    let report = dl.stop();
    let reads = &report.reads;

    let before = o.before();
    let after = o.after();
    let bin = Duration::from_millis(o.bin_ms);
    let per_move: Vec<MoveRecord> = moves
        .into_iter()
        .map(|(from, to, t0, t1, r)| {
            let (moved, reason, freeze_ms, node_ms) = match r {
                Ok(m) => (m.moved, m.reason, m.freeze_ms, m.node_ms),
                Err(e) => (false, Some(format!("{e:#}")), None, f64::NAN),
            };
            let bins_gbit_s = (0..o.bins_before + o.bins_after)
                .map(|k| {
                    let start =
                        ns(t0) as i128 + (k as i128 - o.bins_before as i128) * ns(bin) as i128;
                    let start = start.max(0) as u64;
                    rate(reads, start, start + ns(bin))
                })
                .collect();
            MoveRecord {
                from: NAMES[from],
                to: NAMES[to],
                moved,
                reason,
                request_ms: ms(t0),
                reply_ms: ms(t1),
                ctl_ms: ms(t1 - t0),
                node_ms,
                freeze_ms,
                stall_ms: max_gap(reads, ns(t0.saturating_sub(before)), ns(t1 + after)) as f64
                    / 1e6,
                gbit_s_before: rate(reads, ns(t0.saturating_sub(before)), ns(t0)),
                gbit_s_after: rate(reads, ns(t1), ns(t1 + after)),
                bins_gbit_s,
            }
        })
        .collect();
    let done: Vec<&MoveRecord> = per_move.iter().filter(|m| m.moved).collect();
    let ctl = summary(done.iter().map(|m| m.ctl_ms).collect());
    // The noise floor: windows as long as a move's, in the warm-up after the first 500 ms.
    let len = before + after + Duration::from_secs_f64(ctl.p50 / 1e3);
    let mut control = Vec::new();
    let mut t = Duration::from_millis(500);
    while t + len <= warmup_end {
        control.push(max_gap(reads, ns(t), ns(t + len)) as f64 / 1e6);
        t += len;
    }
    // The stall measure around the ctl calls that moved nothing, where their window does not
    // overlap a move's.
    let windows: Vec<(Duration, Duration)> = per_move
        .iter()
        .map(|m| {
            let t0 = Duration::from_secs_f64(m.request_ms / 1e3).saturating_sub(before);
            (t0, Duration::from_secs_f64(m.reply_ms / 1e3) + after)
        })
        .collect();
    let sham: Vec<f64> = shams
        .iter()
        .map(|&(s0, s1)| (s0.saturating_sub(before), s1 + after))
        .filter(|&(w0, w1)| windows.iter().all(|&(m0, m1)| w1 <= m0 || w0 >= m1))
        .map(|(w0, w1)| max_gap(reads, ns(w0), ns(w1)) as f64 / 1e6)
        .collect();
    let mut warm_bins = Vec::new();
    let mut t = Duration::from_millis(500);
    while t + bin <= warmup_end {
        warm_bins.push(rate(reads, ns(t), ns(t + bin)));
        t += bin;
    }
    let around = |from: &str| -> [f64; 2] {
        let pick = |f: fn(&MoveRecord) -> f64| {
            median(
                &done
                    .iter()
                    .filter(|m| m.from == from)
                    .map(|m| f(m))
                    .collect::<Vec<_>>(),
            )
        };
        [pick(|m| m.gbit_s_before), pick(|m| m.gbit_s_after)]
    };
    let dip = |from: &str| -> Vec<f64> {
        (0..o.bins_before + o.bins_after)
            .map(|k| {
                median(
                    &done
                        .iter()
                        .filter(|m| m.from == from)
                        .map(|m| m.bins_gbit_s[k])
                        .collect::<Vec<_>>(),
                )
            })
            .collect()
    };
    Ok(StallStats {
        moves_requested: o.moves,
        moves_done: done.len(),
        moves_failed: per_move.len() - done.len(),
        bytes: report.received,
        byte_exact: report.error.is_none(),
        reset: report.reset,
        client_error: report.error.clone(),
        duration_s: duration.as_secs_f64(),
        gbit_s: report.received as f64 * 8.0 / duration.as_secs_f64() / 1e9,
        steal_percent: steal_since(steal0, t_steal),
        stall_ms: summary(done.iter().map(|m| m.stall_ms).collect()),
        control_gap_ms: summary(control),
        sham_gap_ms: summary(sham),
        freeze_ms: summary(done.iter().filter_map(|m| m.freeze_ms).collect()),
        ctl_ms: ctl,
        node_ms: summary(done.iter().map(|m| m.node_ms).collect()),
        gbit_s_before: summary(done.iter().map(|m| m.gbit_s_before).collect()),
        gbit_s_after: summary(done.iter().map(|m| m.gbit_s_after).collect()),
        gbit_s_a_to_b: around("a"),
        gbit_s_b_to_a: around("b"),
        bin_ms: o.bin_ms as f64,
        bins_from_ms: -((o.bins_before as u64 * o.bin_ms) as f64),
        dip_a_to_b: dip("a"),
        dip_b_to_a: dip("b"),
        warmup_bin_gbit_s: summary(warm_bins),
        node_resets: resets,
        tunnel_packets_refused: refused,
        counters,
        per_move,
    })
}

/// Reads `s` for `d`, checking the counting stream; returns Gbit/s over the part after
/// `skip`.
fn read_slice(
    s: &mut TcpStream,
    v: &mut CountingVerifier,
    buf: &mut [u8],
    d: Duration,
    skip: Duration,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut counted = None;
    loop {
        let now = t0.elapsed();
        if now >= d {
            break;
        }
        if counted.is_none() && now >= skip {
            counted = Some((v.offset(), Instant::now()));
        }
        match s.read(buf) {
            Ok(0) => bail!("end of stream"),
            Ok(n) => v.feed(&buf[..n])?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("read"),
        }
    }
    let (at, t) = counted.context("slice shorter than its skip")?;
    Ok((v.offset() - at) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9)
}

/// Random loss of TCP packets on the router while it lives (`--loss`).
struct RouterLoss<'a>(Option<&'a Testbed>);

impl<'a> RouterLoss<'a> {
    fn on(tb: &'a Testbed, percent: u8) -> anyhow::Result<Self> {
        if percent == 0 {
            return Ok(Self(None));
        }
        tb.set_router_loss_matching(percent, &["meta", "l4proto", "tcp"])
            .context("the router's loss rule")?;
        Ok(Self(Some(tb)))
    }
}

impl Drop for RouterLoss<'_> {
    fn drop(&mut self) {
        if let Some(tb) = self.0 {
            tb.clear_router_loss();
        }
    }
}

/// Where the wireguard-go anchor's kernel server listens, on node-b.
const WG_SERVICE: &str = "198.19.5.1";
/// The client's second address, the one it reaches [`WG_SERVICE`] from.
const WG_CLIENT: &str = "198.18.1.3";

/// The steady part's anchor: a kernel `source` server on node-b at [`WG_SERVICE`], reached
/// from the client through node-a, which forwards into wireguard-go to node-b: the path a
/// moved connection's packets take (they enter at node-a and cross a userspace tunnel to
/// node-b), with kernel TCP at the end instead of flowshift's. Its processes stop on drop;
/// its addresses and routes stay (set with `replace`, so the next run's anchor sets them
/// again) and go with the testbed's namespaces.
struct WgAnchor {
    wg: crate::wg::WireguardPair,
    server: std::process::Child,
}

impl WgAnchor {
    fn start(tb: &Testbed) -> anyhow::Result<Self> {
        flowshift_testbed::ensure_tools(&["wireguard-go", "wg"])?;
        let wg = crate::wg::WireguardPair::start_routing(
            tb,
            &crate::wg::Userspace::WireguardGo,
            [&["198.19.5.1/32"], &["198.18.1.3/32"]],
        )?;
        tb.node_b()
            .ip(&["addr", "replace", &format!("{WG_SERVICE}/32"), "dev", "lo"])?;
        tb.router().ip(&[
            "route",
            "replace",
            &format!("{WG_SERVICE}/32"),
            "via",
            &flowshift_testbed::testbed::NODE_A.to_string(),
        ])?;
        tb.client()
            .ip(&["addr", "replace", &format!("{WG_CLIENT}/24"), "dev", "eth0"])?;
        tb.client().ip(&[
            "route",
            "replace",
            &format!("{WG_SERVICE}/32"),
            "via",
            "198.18.1.1",
            "src",
            WG_CLIENT,
        ])?;
        let server = crate::kernel_server::spawn(tb, tb.node_b(), WG_SERVICE.parse()?)?;
        Ok(Self { wg, server })
    }

    fn connect(&self, tb: &Testbed) -> anyhow::Result<TcpStream> {
        let a = addr(WG_SERVICE.parse()?, SOURCE_PORT);
        let s = tb
            .client()
            .run(move || TcpStream::connect_timeout(&a, Duration::from_secs(5)))
            .with_context(|| format!("connecting to {a} through wireguard-go"))?;
        ensure!(
            client_v4(&s)?.ip().to_string() == WG_CLIENT,
            "the anchor's connection left from {}",
            client_v4(&s)?
        );
        Ok(s)
    }
}

impl Drop for WgAnchor {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn steady_part(
    tb: &Testbed,
    p: &Pair,
    o: &Args,
    anchor: Option<&WgAnchor>,
) -> anyhow::Result<SteadyStats> {
    let (steal0, t_steal) = (sys::machine_steal_seconds(), Instant::now());
    let m0 = p.metrics();
    let mut buf = vec![0u8; CHUNK];
    let slice = Duration::from_millis(o.steady_slice_ms);
    let skip = Duration::from_millis(250).min(slice / 2);
    let mut moved = connect(tb, SOURCE_PORT)?;
    moved.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut vm = CountingVerifier::new();
    read_slice(
        &mut moved,
        &mut vm,
        &mut buf,
        Duration::from_millis(500),
        Duration::ZERO,
    )
    .context("the download to move")?;
    let (on, id) = locate(p, client_v4(&moved)?)?;
    ensure!(on == 0, "a new connection should live on node-a");
    let m = migrate_one(&p.a, "b", id, o.trigger)?;
    ensure!(
        m.moved,
        "moving the steady download to b: {}",
        m.reason.unwrap_or_default()
    );
    let mut local = connect(tb, SOURCE_PORT)?;
    local.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut vl = CountingVerifier::new();
    let mut through_wg = match anchor {
        Some(a) => {
            let s = a.connect(tb)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Some(s)
        }
        None => None,
    };
    let mut vw = CountingVerifier::new();
    let (mut mg, mut lg, mut wgg) = (Vec::new(), Vec::new(), Vec::new());
    let mut use_w = CpuUse::default();
    let wg_pids = anchor.map(|a| a.wg.pids());
    let wg_cpu = || {
        wg_pids.map_or(0.0, |pids| {
            pids.iter()
                .map(|&p| sys::process_cpu_seconds(p))
                .sum::<f64>()
        })
    };
    let mut moved_conn = Vec::new();
    let moved_client = client_v4(&moved)?.to_string();
    if o.steady_hold_s > 0 {
        eprintln!(
            "    reading the moved download alone for {} s (node-a pid {}, node-b pid {})",
            o.steady_hold_s,
            p.a.pid(),
            p.b.pid()
        );
        let hold = Duration::from_secs(o.steady_hold_s);
        let r = read_slice(&mut moved, &mut vm, &mut buf, hold, Duration::ZERO)?;
        eprintln!("    {r:.2} Gbit/s");
    }
    // CPU of both node processes and of the machine, and bytes read, per kind of slice.
    let pids = [p.a.pid(), p.b.pid()];
    let node_cpu = || {
        pids.iter()
            .map(|&p| sys::process_cpu_seconds(p))
            .sum::<f64>()
    };
    let mut use_m = CpuUse::default();
    let mut use_l = CpuUse::default();
    let kinds = if through_wg.is_some() { 3 } else { 2 };
    for i in 0..o.steady_slices {
        // Rotate which goes first.
        for k in 0..kinds {
            let (c0, b0, t0) = (node_cpu(), sys::machine_busy_seconds(), Instant::now());
            let i0 = Ingress::read(p.a.pid());
            if let (2, Some(w)) = ((i + k) % kinds, through_wg.as_mut()) {
                let (w0, at) = (wg_cpu(), vw.offset());
                wgg.push(
                    read_slice(w, &mut vw, &mut buf, slice, skip)
                        .context("download through wireguard-go")?,
                );
                use_w.add(
                    wg_cpu() - w0,
                    sys::machine_busy_seconds() - b0,
                    t0,
                    vw.offset() - at,
                );
            } else if (i + k) % kinds == 0 {
                let at = vm.offset();
                mg.push(
                    read_slice(&mut moved, &mut vm, &mut buf, slice, skip)
                        .context("moved download")?,
                );
                use_m.add(
                    node_cpu() - c0,
                    sys::machine_busy_seconds() - b0,
                    t0,
                    vm.offset() - at,
                );
                use_m.add_ingress(Ingress::read(p.a.pid()).since(i0));
                if moved_conn.is_empty() {
                    for n in [&p.b, &p.a] {
                        let rows = n.ctl_json(&["conns"])?;
                        if let Some(row) = rows.as_array().and_then(|r| {
                            r.iter()
                                .find(|c| c["client"].as_str() == Some(&moved_client))
                        }) {
                            let mut row = row.clone();
                            row["seen_on"] = n.name().into();
                            moved_conn.push(row);
                        }
                    }
                }
            } else {
                let at = vl.offset();
                lg.push(
                    read_slice(&mut local, &mut vl, &mut buf, slice, skip)
                        .context("local download")?,
                );
                use_l.add(
                    node_cpu() - c0,
                    sys::machine_busy_seconds() - b0,
                    t0,
                    vl.offset() - at,
                );
                use_l.add_ingress(Ingress::read(p.a.pid()).since(i0));
            }
        }
    }
    // Both still on the nodes we think.
    let (on_m, _) = locate(p, client_v4(&moved)?)?;
    let (on_l, _) = locate(p, client_v4(&local)?)?;
    ensure!(
        on_m == 1 && on_l == 0,
        "the moved download lives on node {} and the local one on node {}",
        NAMES[on_m],
        NAMES[on_l]
    );
    let peers = [&p.a, &p.b]
        .iter()
        .filter_map(|n| {
            n.ctl_json(&["peers"])
                .ok()
                .map(|v| serde_json::json!({"node": n.name(), "peers": v}))
        })
        .collect();
    let counters = changed(&m0, &p.metrics());
    reset_on_close(&moved);
    reset_on_close(&local);
    if let Some(w) = &through_wg {
        reset_on_close(w);
    }
    let bytes = vm.offset() + vl.offset() + vw.offset();
    let (mm, lm) = (median(&mg), median(&lg));
    // Moved over wireguard-go, slice by slice in the same round.
    let per_round: Vec<f64> = mg
        .iter()
        .zip(&wgg)
        .filter(|(_, w)| **w > 0.0)
        .map(|(m, w)| m / w)
        .collect();
    Ok(SteadyStats {
        moved_gbit_s: mg,
        local_gbit_s: lg,
        moved_median: mm,
        local_median: lm,
        ratio: if lm > 0.0 { mm / lm } else { 0.0 },
        bytes,
        byte_exact: true,
        steal_percent: steal_since(steal0, t_steal),
        moved_cpu: use_m.view(),
        local_cpu: use_l.view(),
        wg_median: (!wgg.is_empty()).then(|| median(&wgg)),
        moved_vs_wg: (!per_round.is_empty()).then(|| median(&per_round)),
        wg_cpu: (!wgg.is_empty()).then(|| use_w.view()),
        wg_gbit_s: wgg,
        moved_conn,
        peers,
        counters,
    })
}

fn drain_part(tb: &Testbed, p: &Pair, o: &Args) -> anyhow::Result<DrainStats> {
    let resets0 = p.stat("unknown_flow_packets");
    let refused0 = p.stat("tunnel_packets_refused");
    let m0 = p.metrics();
    let t_open = Instant::now();
    let echo = addr(SERVICE_ADDR, ECHO_PORT);
    let n = o.idle;
    let mut conns = tb
        .client()
        .run(move || load::open_idle(echo, n, 1))
        .with_context(|| format!("opening {n} idle connections"))?;
    let open_s = t_open.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let (steal0, t_steal) = (sys::machine_steal_seconds(), Instant::now());
    let t0 = Instant::now();
    let r = p.a.ctl_json(&["drain", "--to", "b"]).context("ctl drain")?;
    let ctl_ms = ms(t0.elapsed());
    let steal = steal_since(steal0, t_steal);
    let moved = r["moved"].as_u64().unwrap_or(0);
    let node_ms = r["elapsed_ms"].as_f64().unwrap_or(f64::NAN);
    let outcomes = r["conns"].as_array().cloned().unwrap_or_default();
    let freeze: Vec<f64> = outcomes
        .iter()
        .filter(|c| c["moved"].as_bool() == Some(true))
        .filter_map(|c| c["freeze_ms"].as_f64())
        .collect();
    let mut stayed: Vec<(String, u64)> = Vec::new();
    for c in outcomes
        .iter()
        .filter(|c| c["moved"].as_bool() != Some(true))
    {
        let reason = c["reason"].as_str().unwrap_or("unknown").to_owned();
        match stayed.iter_mut().find(|(k, _)| *k == reason) {
            Some((_, k)) => *k += 1,
            None => stayed.push((reason, 1)),
        }
    }
    // Every connection: nothing to read, no error, no end of stream.
    let broken_before = poll_broken(&conns);
    // A sample echoes checked bytes (through node-a, to node-b, and back).
    let step = (conns.len() / o.sample.max(1)).max(1);
    let mut failures = Vec::new();
    let mut rtts = Vec::new();
    let mut sampled = 0;
    for (i, c) in conns.iter_mut().enumerate().step_by(step).take(o.sample) {
        sampled += 1;
        let msg = format!("drained connection {i:05} still echoes\n");
        let t = Instant::now();
        let r = (|| -> io::Result<Vec<u8>> {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(msg.as_bytes())?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got)?;
            Ok(got)
        })();
        match r {
            Ok(got) if got == msg.as_bytes() => rtts.push(ms(t.elapsed())),
            Ok(got) => failures.push(format!(
                "connection {i}: echoed {:?}",
                String::from_utf8_lossy(&got)
            )),
            Err(e) => failures.push(format!("connection {i}: {e}")),
        }
    }
    let broken_after = poll_broken(&conns);
    let broken = broken_before.0.max(broken_after.0);
    let first_failure = failures
        .first()
        .cloned()
        .or(broken_before.1)
        .or(broken_after.1);
    let resets = p.stat("unknown_flow_packets") - resets0;
    let refused = p.stat("tunnel_packets_refused") - refused0;
    let counters = changed(&m0, &p.metrics());
    for c in &conns {
        reset_on_close(c);
    }
    drop(conns);
    Ok(DrainStats {
        idle: n,
        open_s,
        moved,
        left: r["left"].as_u64().unwrap_or(0),
        empty: r["empty"].as_bool().unwrap_or(false),
        rounds: r["rounds"].as_u64().unwrap_or(0),
        node_ms,
        ctl_ms,
        conns_per_s: moved as f64 / (node_ms / 1e3),
        conns_per_s_ctl: moved as f64 / (ctl_ms / 1e3),
        freeze_ms: summary(freeze),
        stayed,
        sampled,
        sample_failures: failures.len(),
        sample_rtt_ms: summary(rtts),
        broken,
        first_failure,
        node_resets: resets,
        tunnel_packets_refused: refused,
        steal_percent: steal,
        counters,
    })
}

/// Connections with something to report when nothing should happen on them: readable
/// (bytes, an end of stream) or in error. Returns how many, and the first one's story.
fn poll_broken(conns: &[TcpStream]) -> (usize, Option<String>) {
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of pollfd of the length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if n <= 0 {
        return (0, None);
    }
    let first = fds.iter().position(|f| f.revents != 0).map(|i| {
        let err = conns[i].take_error().ok().flatten();
        let mut b = [0u8; 64];
        let peek = conns[i].peek(&mut b);
        format!(
            "connection {i}: poll revents {:#x}, error {err:?}, peek {peek:?}",
            fds[i].revents
        )
    });
    (n as usize, first)
}

// ---------------------------------------------------------------------------------------
// Runs

/// The kernel baseline's settings for run `run`. Each run serves another port: a second
/// handoff run on the same testbed and port fails to listen (EADDRINUSE on node-a, though
/// `ss` shows no socket on the port there).
fn kernel_options(o: &Args, run: usize) -> RepairOptions {
    let after = o.after();
    RepairOptions {
        handoff: HandoffOptions {
            port: o.kernel_port.wrapping_add(run as u16),
            handoffs: o.moves,
            interval: Duration::from_millis(o.interval_ms),
            warmup: Duration::from_millis(o.warmup_ms),
            settle: after + Duration::from_millis(100),
            max_duration: Duration::from_secs(o.max_seconds),
            total_bytes: None,
            client_rate: o.client_rate,
            fault: None,
        },
        before: o.before(),
        after,
    }
}

/// Seconds part `p` of one run is expected to take (for the progress estimate).
fn part_seconds(o: &Args, p: Part) -> f64 {
    if !o.has(p) {
        return 0.0;
    }
    let moving = |warmup_ms: u64| {
        warmup_ms as f64 / 1e3
            + (o.moves as f64 * o.interval_ms as f64 / 1e3).min(o.max_seconds as f64)
            + 3.0
    };
    match p {
        Part::Stall => moving(o.warmup_ms),
        Part::Kernel => moving(o.warmup_ms),
        Part::Steady => {
            (2.0 + f64::from(u8::from(o.wg))) * o.steady_slices as f64 * o.steady_slice_ms as f64
                / 1e3
                + o.steady_hold_s as f64
                + 3.0
                + if o.wg { 3.0 } else { 0.0 }
        }
        Part::Drain => 4.0 + o.idle as f64 * 1e-3,
    }
}

fn run_work(o: &Args) -> f64 {
    [Part::Stall, Part::Steady, Part::Drain, Part::Kernel]
        .into_iter()
        .map(|p| part_seconds(o, p))
        .sum()
}

fn flowshift_parts(
    tb: &Testbed,
    o: &Args,
    r: &mut RunResult,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let done = |progress: &mut Progress, p: Part, what: &str| {
        progress.done(
            part_seconds(o, p),
            &format!("run {} of {}: {what} done", r.run + 1, o.runs),
        );
    };
    if !(o.has(Part::Stall) || o.has(Part::Steady) || o.has(Part::Drain)) {
        return Ok(());
    }
    let p = Pair::start(tb, o)?;
    let mut result = Ok(());
    if o.has(Part::Stall) {
        eprintln!(
            "  flowshift: {} moves of a download, one every {} ms",
            o.moves, o.interval_ms
        );
        let lossy = RouterLoss::on(tb, o.loss)?;
        let stall = stall_part(tb, &p, o);
        drop(lossy);
        match stall {
            Ok(s) => {
                eprintln!(
                    "    stall p50 {:.2} ms p99 {:.2} ms max {:.2} ms; freeze p50 {:.2} ms; {} moved, {} failed; {:.2} GB byte-exact {}",
                    s.stall_ms.p50,
                    s.stall_ms.p99,
                    s.stall_ms.max,
                    s.freeze_ms.p50,
                    s.moves_done,
                    s.moves_failed,
                    s.bytes as f64 / 1e9,
                    s.byte_exact
                );
                if let Some(e) = &s.client_error {
                    r.errors.push(format!("stall: client: {e}"));
                }
                if s.moves_failed > 0 {
                    r.errors
                        .push(format!("stall: {} of the moves failed", s.moves_failed));
                }
                r.stall = Some(s);
            }
            Err(e) => r.errors.push(format!("stall: {e:#}")),
        }
        done(progress, Part::Stall, "flowshift stall");
    }
    if o.has(Part::Steady) {
        eprintln!(
            "  flowshift: a moved download beside a local one{}",
            if o.wg {
                ", and one through wireguard-go"
            } else {
                ""
            }
        );
        let anchor = if o.wg {
            match WgAnchor::start(tb) {
                Ok(a) => Some(a),
                Err(e) => {
                    r.errors
                        .push(format!("steady: the wireguard-go anchor: {e:#}"));
                    None
                }
            }
        } else {
            None
        };
        match steady_part(tb, &p, o, anchor.as_ref()) {
            Ok(s) => {
                eprintln!(
                    "    moved ({}) {:.2} Gbit/s, local {:.2} Gbit/s{}",
                    return_path(o.direct_return),
                    s.moved_median,
                    s.local_median,
                    s.wg_median
                        .map(|w| format!(", through wireguard-go {w:.2} Gbit/s"))
                        .unwrap_or_default()
                );
                r.steady = Some(s);
            }
            Err(e) => r.errors.push(format!("steady: {e:#}")),
        }
        drop(anchor);
        done(progress, Part::Steady, "flowshift steady");
    }
    if o.has(Part::Drain) {
        // Let the connections of the parts before close.
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("  flowshift: drain of {} idle connections", o.idle);
        match drain_part(tb, &p, o) {
            Ok(d) => {
                eprintln!(
                    "    {} moved in {:.0} ms ({:.0}/s), {} left; {} of {} sampled echoes failed, {} broken",
                    d.moved,
                    d.node_ms,
                    d.conns_per_s,
                    d.left,
                    d.sample_failures,
                    d.sampled,
                    d.broken
                );
                if d.sample_failures > 0 || d.broken > 0 {
                    r.errors.push(format!(
                        "drain: {} sampled echoes failed, {} connections broken: {}",
                        d.sample_failures,
                        d.broken,
                        d.first_failure.clone().unwrap_or_default()
                    ));
                }
                r.drain = Some(d);
            }
            Err(e) => r.errors.push(format!("drain: {e:#}")),
        }
        done(progress, Part::Drain, "flowshift drain");
    }
    if let Err(e) = p.stop() {
        result = Err(e);
    }
    result
}

fn one_run(tb: &Testbed, o: &Args, run: usize, progress: &mut Progress) -> RunResult {
    let kernel_first = run % 2 == 1;
    let mut r = RunResult {
        run,
        kernel_first,
        loadavg: [loadavg(), String::new()],
        stall: None,
        steady: None,
        drain: None,
        kernel: None,
        errors: Vec::new(),
    };
    let kernel = |r: &mut RunResult, progress: &mut Progress| {
        if !o.has(Part::Kernel) {
            return;
        }
        eprintln!(
            "  kernel TCP_REPAIR: {} handoffs, one every {} ms",
            o.moves, o.interval_ms
        );
        let lossy = match RouterLoss::on(tb, o.loss) {
            Ok(l) => l,
            Err(e) => {
                r.errors.push(format!("kernel: setting the loss: {e:#}"));
                return;
            }
        };
        let handoffs = repair::run_kernel_handoffs(tb, &kernel_options(o, run));
        drop(lossy);
        match handoffs {
            Ok(k) => {
                eprintln!(
                    "    stall p50 {:.2} ms p99 {:.2} ms max {:.2} ms; downtime p50 {:.3} ms",
                    k.stall_ms.p50,
                    k.stall_ms.p99,
                    k.stall_ms.max,
                    k.downtime_us.p50 / 1e3
                );
                r.kernel = Some(k);
            }
            Err(e) => r.errors.push(format!("kernel: {e:#}")),
        }
        progress.done(
            part_seconds(o, Part::Kernel),
            &format!("run {} of {}: kernel TCP_REPAIR done", run + 1, o.runs),
        );
    };
    if kernel_first {
        kernel(&mut r, progress);
    }
    if let Err(e) = flowshift_parts(tb, o, &mut r, progress) {
        r.errors.push(format!("flowshift nodes: {e:#}"));
    }
    if !kernel_first {
        kernel(&mut r, progress);
    }
    r.loadavg[1] = loadavg();
    r
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn headlines(runs: &[RunResult]) -> Vec<Headline> {
    type Get = fn(&RunResult) -> Option<f64>;
    let rows: [(&str, &str, Get); 38] = [
        ("flowshift stall p50", "ms", |r| {
            r.stall.as_ref().map(|s| s.stall_ms.p50)
        }),
        ("flowshift stall p99", "ms", |r| {
            r.stall.as_ref().map(|s| s.stall_ms.p99)
        }),
        ("flowshift stall max", "ms", |r| {
            r.stall.as_ref().map(|s| s.stall_ms.max)
        }),
        (
            "flowshift read gap without a move p50 (warm-up)",
            "ms",
            |r| r.stall.as_ref().map(|s| s.control_gap_ms.p50),
        ),
        (
            "flowshift read gap without a move max (warm-up)",
            "ms",
            |r| r.stall.as_ref().map(|s| s.control_gap_ms.max),
        ),
        (
            "flowshift read gap around a status request (no move) p50",
            "ms",
            |r| r.stall.as_ref().map(|s| s.sham_gap_ms.p50),
        ),
        (
            "flowshift read gap around a status request (no move) p99",
            "ms",
            |r| r.stall.as_ref().map(|s| s.sham_gap_ms.p99),
        ),
        ("flowshift freeze p50", "ms", |r| {
            r.stall.as_ref().map(|s| s.freeze_ms.p50)
        }),
        ("flowshift freeze p99", "ms", |r| {
            r.stall.as_ref().map(|s| s.freeze_ms.p99)
        }),
        ("migrate request round trip p50", "ms", |r| {
            r.stall.as_ref().map(|s| s.ctl_ms.p50)
        }),
        ("migrate request round trip p99", "ms", |r| {
            r.stall.as_ref().map(|s| s.ctl_ms.p99)
        }),
        ("flowshift moves done", "", |r| {
            r.stall.as_ref().map(|s| s.moves_done as f64)
        }),
        (
            "flowshift A→B: Gbit/s 50 ms before the request",
            "Gbit/s",
            |r| r.stall.as_ref().map(|s| s.gbit_s_a_to_b[0]),
        ),
        (
            "flowshift A→B: Gbit/s 200 ms after the reply",
            "Gbit/s",
            |r| r.stall.as_ref().map(|s| s.gbit_s_a_to_b[1]),
        ),
        (
            "flowshift B→A: Gbit/s 50 ms before the request",
            "Gbit/s",
            |r| r.stall.as_ref().map(|s| s.gbit_s_b_to_a[0]),
        ),
        (
            "flowshift B→A: Gbit/s 200 ms after the reply",
            "Gbit/s",
            |r| r.stall.as_ref().map(|s| s.gbit_s_b_to_a[1]),
        ),
        ("kernel TCP_REPAIR stall p50", "ms", |r| {
            r.kernel.as_ref().map(|k| k.stall_ms.p50)
        }),
        ("kernel TCP_REPAIR stall p99", "ms", |r| {
            r.kernel.as_ref().map(|k| k.stall_ms.p99)
        }),
        ("kernel TCP_REPAIR stall max", "ms", |r| {
            r.kernel.as_ref().map(|k| k.stall_ms.max)
        }),
        ("kernel read gap without a handoff max", "ms", |r| {
            r.kernel.as_ref().map(|k| k.control_gap_ms.max)
        }),
        ("kernel downtime p50", "ms", |r| {
            r.kernel.as_ref().map(|k| k.downtime_us.p50 / 1e3)
        }),
        ("kernel Gbit/s 50 ms before a handoff", "Gbit/s", |r| {
            r.kernel.as_ref().map(|k| k.gbit_s_before.p50)
        }),
        ("kernel Gbit/s 200 ms after a handoff", "Gbit/s", |r| {
            r.kernel.as_ref().map(|k| k.gbit_s_after.p50)
        }),
        ("stall p99 flowshift / kernel", "×", |r| {
            let (s, k) = (r.stall.as_ref()?, r.kernel.as_ref()?);
            (k.stall_ms.p99 > 0.0).then(|| s.stall_ms.p99 / k.stall_ms.p99)
        }),
        ("drain rate (node time)", "conns/s", |r| {
            r.drain.as_ref().map(|d| d.conns_per_s)
        }),
        ("drain rate (ctl round trip)", "conns/s", |r| {
            r.drain.as_ref().map(|d| d.conns_per_s_ctl)
        }),
        ("drain freeze p99", "ms", |r| {
            r.drain.as_ref().map(|d| d.freeze_ms.p99)
        }),
        ("moved download (on b)", "Gbit/s", |r| {
            r.steady.as_ref().map(|s| s.moved_median)
        }),
        ("local download", "Gbit/s", |r| {
            r.steady.as_ref().map(|s| s.local_median)
        }),
        ("moved / local", "×", |r| {
            r.steady.as_ref().map(|s| s.ratio)
        }),
        (
            "the same download through wireguard-go to a kernel server on b",
            "Gbit/s",
            |r| r.steady.as_ref().and_then(|s| s.wg_median),
        ),
        ("moved / through wireguard-go", "×", |r| {
            r.steady.as_ref().and_then(|s| s.moved_vs_wg)
        }),
        (
            "machine CPU per GB: moved / through wireguard-go",
            "×",
            |r| {
                r.steady.as_ref().and_then(|s| {
                    s.wg_cpu.map(|w| {
                        if w.machine_cpu_s_per_gb > 0.0 {
                            s.moved_cpu.machine_cpu_s_per_gb / w.machine_cpu_s_per_gb
                        } else {
                            0.0
                        }
                    })
                })
            },
        ),
        (
            "node-a's workers, CPU s per GB relaying the moved download",
            "s/GB",
            |r| {
                r.steady
                    .as_ref()
                    .map(|s| s.moved_cpu.ingress_workers_s_per_gb)
            },
        ),
        (
            "node-a's tunnel thread, CPU s per GB relaying the moved download",
            "s/GB",
            |r| {
                r.steady
                    .as_ref()
                    .map(|s| s.moved_cpu.ingress_tunnel_s_per_gb)
            },
        ),
        (
            "node-a's workers, CPU s per GB serving the local download",
            "s/GB",
            |r| {
                r.steady
                    .as_ref()
                    .map(|s| s.local_cpu.ingress_workers_s_per_gb)
            },
        ),
        ("node-a's workers per GB: relaying / serving", "×", |r| {
            r.steady.as_ref().and_then(|s| {
                (s.local_cpu.ingress_workers_s_per_gb > 0.0).then(|| {
                    s.moved_cpu.ingress_workers_s_per_gb / s.local_cpu.ingress_workers_s_per_gb
                })
            })
        }),
        ("CPU stolen by the hypervisor (stall part)", "%", |r| {
            r.stall.as_ref().map(|s| s.steal_percent)
        }),
    ];
    rows.iter()
        .filter_map(|(name, unit, get)| {
            let per_run: Vec<f64> = runs.iter().filter_map(get).collect();
            Spread::of(per_run.clone()).map(|spread| Headline {
                name: (*name).into(),
                unit: (*unit).into(),
                spread,
                per_run,
            })
        })
        .collect()
}

/// The targets against the medians over runs.
fn targets(res: &Results) -> String {
    let get = |name: &str| {
        res.headlines
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.spread.median)
    };
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let mut t = String::from("\nTargets (medians over runs):");
    if let Some(p99) = get("flowshift stall p99") {
        t += &format!(" stall p99 ≤ 5 ms: {} ({p99:.2} ms);", verdict(p99 <= 5.0));
    }
    if let Some(rate) = get("drain rate (node time)") {
        t += &format!(
            " drain ≥ 5,000 connections/s: {} ({rate:.0}/s);",
            verdict(rate >= 5000.0)
        );
    }
    if let (Some(f), Some(k)) = (
        get("flowshift stall p99"),
        get("kernel TCP_REPAIR stall p99"),
    ) {
        t += &format!(
            " stall p99 no worse than TCP_REPAIR's: {} ({f:.2} vs {k:.2} ms);",
            verdict(f <= k)
        );
    }
    t.pop();
    t + ".\n"
}

fn return_path(direct_return: bool) -> &'static str {
    if direct_return {
        "replies straight from b: direct return"
    } else {
        "replies relayed through a"
    }
}

fn markdown(res: &Results) -> String {
    let mut m = format!(
        "Machine: {} · kernel {} · veth MTU {} · {} run(s) · {} moves per run (A⇄B), one every \
         {} ms, requested by {} · stall window {} ms before the request to {} ms after the \
         reply · drain of {} idle connections{}\n\n",
        res.machine,
        res.kernel,
        res.veth_mtu,
        res.runs.len(),
        res.moves,
        res.interval_ms,
        match res.trigger {
            Trigger::Socket => "a request on the control socket",
            Trigger::Ctl => "a `flowshift ctl` process",
        },
        res.window_before_ms,
        res.window_after_ms,
        res.idle,
        if res.loss_percent > 0 {
            format!(
                " · the router drops {} % of the TCP packets (both ways) during the stall and \
                 kernel parts",
                res.loss_percent
            )
        } else {
            String::new()
        }
    );
    m += "| measure | median | min | max | per run |\n|---|---:|---:|---:|---|\n";
    for h in &res.headlines {
        let d = if h.unit.is_empty() || h.spread.median.abs() >= 100.0 {
            0
        } else {
            2
        };
        m += &format!(
            "| {}{} | {:.d$} | {:.d$} | {:.d$} | {} |\n",
            h.name,
            if h.unit.is_empty() {
                String::new()
            } else {
                format!(", {}", h.unit)
            },
            h.spread.median,
            h.spread.min,
            h.spread.max,
            h.per_run
                .iter()
                .map(|x| format!("{x:.d$}"))
                .collect::<Vec<_>>()
                .join(" · ")
        );
    }
    m += &targets(res);
    for r in &res.runs {
        m += &format!(
            "\n**Run {}** ({} first; load average {} → {})\n\n",
            r.run + 1,
            if r.kernel_first {
                "kernel"
            } else {
                "flowshift"
            },
            r.loadavg[0],
            r.loadavg[1]
        );
        if let Some(s) = &r.stall {
            m += &format!(
                "- flowshift stall: {} of {} moves done ({} failed); stall ms p50/p99/max \
                 {:.2}/{:.2}/{:.2}; read gap without a move p50/p99/max {:.2}/{:.2}/{:.2} in \
                 the warm-up ({} windows), {:.2}/{:.2}/{:.2} around a status request between moves \
                 ({} windows); \
                 freeze ms {:.2}/{:.2}/{:.2}; ctl ms {:.1}/{:.1}/{:.1}; node ms {:.1}/{:.1}/{:.1}; \
                 {:.2} GB at {:.2} Gbit/s, byte-exact {}, reset {}; node resets {}, tunnel \
                 packets refused {}; steal {:.0} %\n",
                s.moves_done,
                s.moves_requested,
                s.moves_failed,
                s.stall_ms.p50,
                s.stall_ms.p99,
                s.stall_ms.max,
                s.control_gap_ms.p50,
                s.control_gap_ms.p99,
                s.control_gap_ms.max,
                s.control_gap_ms.n,
                s.sham_gap_ms.p50,
                s.sham_gap_ms.p99,
                s.sham_gap_ms.max,
                s.sham_gap_ms.n,
                s.freeze_ms.p50,
                s.freeze_ms.p99,
                s.freeze_ms.max,
                s.ctl_ms.p50,
                s.ctl_ms.p99,
                s.ctl_ms.max,
                s.node_ms.p50,
                s.node_ms.p99,
                s.node_ms.max,
                s.bytes as f64 / 1e9,
                s.gbit_s,
                s.byte_exact,
                s.reset,
                s.node_resets,
                s.tunnel_packets_refused,
                s.steal_percent
            );
            let bins = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" · ")
            };
            m += &format!(
                "- throughput around a move, Gbit/s per {:.0} ms bin from {:.0} ms before the \
                 request (median over moves): A→B (moves away) {}; B→A (comes home) {}; \
                 warm-up bins (no move) p50 {:.2}\n",
                s.bin_ms,
                -s.bins_from_ms,
                bins(&s.dip_a_to_b),
                bins(&s.dip_b_to_a),
                s.warmup_bin_gbit_s.p50
            );
            if let Some(f) = s.per_move.iter().find(|m| !m.moved) {
                m += &format!(
                    "- first failed move: {}→{} at {:.0} ms: {}\n",
                    f.from,
                    f.to,
                    f.request_ms,
                    f.reason.as_deref().unwrap_or("?")
                );
            }
        }
        if let Some(s) = &r.steady {
            m += &format!(
                "- moved download (lives on b, {}) {:.2} Gbit/s, local one on a \
                 {:.2} Gbit/s (median of {} alternate slices each): {:.2}×; both nodes' CPU \
                 {:.2} / {:.2} cores, {:.2} / {:.2} CPU s per GB (machine {:.2} / {:.2} cores); \
                 steal {:.0} %\n",
                return_path(res.direct_return),
                s.moved_median,
                s.local_median,
                s.moved_gbit_s.len(),
                s.ratio,
                s.moved_cpu.node_cores,
                s.local_cpu.node_cores,
                s.moved_cpu.node_cpu_s_per_gb,
                s.local_cpu.node_cpu_s_per_gb,
                s.moved_cpu.machine_cores,
                s.local_cpu.machine_cores,
                s.steal_percent
            );
            m += &format!(
                "- node-a (where the moved download's packets enter) per GB: relaying it, \
                 workers {:.2} + tunnel thread {:.2} CPU s; serving the local one, workers {:.2} \
                 + tunnel thread {:.2}\n",
                s.moved_cpu.ingress_workers_s_per_gb,
                s.moved_cpu.ingress_tunnel_s_per_gb,
                s.local_cpu.ingress_workers_s_per_gb,
                s.local_cpu.ingress_tunnel_s_per_gb,
            );
            if let (Some(w), Some(r), Some(c)) = (s.wg_median, s.moved_vs_wg, s.wg_cpu) {
                m += &format!(
                    "- the same download through wireguard-go (packets entering at a, kernel TCP \
                     server on b) {w:.2} Gbit/s (median of {} slices, read in turn with the two \
                     above): moved / it {r:.2}×; machine CPU s per GB moved {:.2} / through \
                     wireguard-go {:.2} (the wireguard-go processes {:.2} CPU s per GB, {:.2} \
                     cores)\n",
                    s.wg_gbit_s.len(),
                    s.moved_cpu.machine_cpu_s_per_gb,
                    c.machine_cpu_s_per_gb,
                    c.node_cpu_s_per_gb,
                    c.node_cores,
                );
            }
        }
        if let Some(d) = &r.drain {
            m += &format!(
                "- drain: {} idle connections (opened in {:.1} s); {} moved, {} left (empty {}) \
                 in {} round(s), {:.0} ms node time / {:.0} ms ctl round trip: {:.0} / {:.0} \
                 conns/s; freeze ms p50/p99/max {:.1}/{:.1}/{:.1}; {} sampled echoes, {} failed \
                 (rtt ms p50 {:.2}); {} connections broken; node resets {}, tunnel packets \
                 refused {}; steal {:.0} %{}\n",
                d.idle,
                d.open_s,
                d.moved,
                d.left,
                d.empty,
                d.rounds,
                d.node_ms,
                d.ctl_ms,
                d.conns_per_s,
                d.conns_per_s_ctl,
                d.freeze_ms.p50,
                d.freeze_ms.p99,
                d.freeze_ms.max,
                d.sampled,
                d.sample_failures,
                d.sample_rtt_ms.p50,
                d.broken,
                d.node_resets,
                d.tunnel_packets_refused,
                d.steal_percent,
                if d.stayed.is_empty() {
                    String::new()
                } else {
                    format!("; stayed: {:?}", d.stayed)
                }
            );
        }
        if let Some(k) = &r.kernel {
            m += &format!(
                "- kernel TCP_REPAIR: {} of {} handoffs; stall ms p50/p99/max {:.2}/{:.2}/{:.2}; \
                 no-handoff read gap p50/p99/max {:.2}/{:.2}/{:.2}; downtime ms p50/p99 \
                 {:.3}/{:.3}; Gbit/s before/after p50 {:.2}/{:.2}; {:.2} GB byte-exact; steal \
                 {:.0} %\n",
                k.handoffs_done,
                k.handoffs_requested,
                k.stall_ms.p50,
                k.stall_ms.p99,
                k.stall_ms.max,
                k.control_gap_ms.p50,
                k.control_gap_ms.p99,
                k.control_gap_ms.max,
                k.downtime_us.p50 / 1e3,
                k.downtime_us.p99 / 1e3,
                k.gbit_s_before.p50,
                k.gbit_s_after.p50,
                k.bytes as f64 / 1e9,
                k.steal_percent
            );
        }
        for e in &r.errors {
            m += &format!("- **error**: {e}\n");
        }
    }
    m
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
    ensure!(
        args.runs > 0 && args.moves > 0,
        "--runs and --moves must be positive"
    );
    let tb = Testbed::new(TestbedOptions {
        mtu: args.mtu,
        watchdog: None,
        ..Default::default()
    })
    .context("building the testbed")?;
    let mut runs = Vec::new();
    let mut progress = Progress::new(args.runs as f64 * run_work(&args));
    for i in 0..args.runs {
        eprintln!("run {} of {}", i + 1, args.runs);
        runs.push(one_run(&tb, &args, i, &mut progress));
    }
    let ok = runs.iter().all(|r| r.errors.is_empty());
    let res = Results {
        machine: format!(
            "{} ({} cores)",
            sys::cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        kernel: sys::kernel_release(),
        veth_mtu: args.mtu,
        workers: args.workers,
        tcp_buffer: args.tcp_buffer,
        direct_return: args.direct_return,
        loss_percent: args.loss,
        trigger: args.trigger,
        client_rate: args.client_rate,
        runs_requested: args.runs,
        moves: args.moves,
        interval_ms: args.interval_ms,
        window_before_ms: args.before_ms,
        window_after_ms: args.after_ms,
        idle: args.idle,
        headlines: headlines(&runs),
        runs,
        ok,
    };
    let md = markdown(&res);
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("migrate.json"),
            serde_json::to_string_pretty(&res)?,
        )?;
        std::fs::write(dir.join("migrate.md"), &md)?;
        eprintln!("wrote {0}/migrate.json and {0}/migrate.md", dir.display());
        plot::after_run(plot::Bench::Migrate, &res, dir);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!("{md}");
    }
    ensure!(
        ok,
        "some measurements failed their checks (see the errors above)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Figures

/// Percentiles as saved (`p90` is missing in results written before it was added).
#[derive(Debug, Deserialize)]
struct SavedSummary {
    #[serde(default)]
    n: usize,
    p50: f64,
    #[serde(default)]
    p90: Option<f64>,
    p99: f64,
}

impl SavedSummary {
    /// p50, p90, p99 (scaled), those there are, when the sample is not empty.
    fn pcts(&self, scale: f64) -> [Option<f64>; 3] {
        let some = |x: f64| (self.n > 0).then_some(x * scale);
        [some(self.p50), self.p90.and_then(some), some(self.p99)]
    }
}

#[derive(Debug, Deserialize)]
struct SavedStall {
    #[serde(default)]
    steal_percent: f64,
    stall_ms: SavedSummary,
    freeze_ms: SavedSummary,
    #[serde(default)]
    bin_ms: f64,
    #[serde(default)]
    bins_from_ms: f64,
    #[serde(default)]
    dip_a_to_b: Vec<f64>,
    #[serde(default)]
    dip_b_to_a: Vec<f64>,
    warmup_bin_gbit_s: Option<SavedSummary>,
}

#[derive(Debug, Deserialize)]
struct SavedKernel {
    #[serde(default)]
    steal_percent: f64,
    stall_ms: SavedSummary,
    downtime_us: SavedSummary,
}

#[derive(Debug, Deserialize)]
struct SavedSteady {
    moved_gbit_s: Vec<f64>,
    local_gbit_s: Vec<f64>,
    #[serde(default)]
    wg_gbit_s: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct SavedDrain {
    idle: usize,
    conns_per_s: f64,
    conns_per_s_ctl: f64,
    #[serde(default)]
    steal_percent: f64,
}

#[derive(Debug, Deserialize)]
struct SavedRun {
    stall: Option<SavedStall>,
    kernel: Option<SavedKernel>,
    steady: Option<SavedSteady>,
    #[serde(default)]
    drain: Option<SavedDrain>,
}

/// What the figures take from `migrate.json`.
#[derive(Debug, Deserialize)]
struct Saved {
    runs: Vec<SavedRun>,
    moves: usize,
    interval_ms: u64,
    #[serde(default)]
    direct_return: bool,
}

/// The target for the stall's p99, ms.
const TARGET_STALL_P99_MS: f64 = 5.0;
/// The target for the drain rate, connections per second.
const TARGET_DRAIN_PER_S: f64 = 5000.0;

/// Draws `migrate-stall.svg` (stall and freeze percentiles, flowshift beside the kernel's
/// TCP_REPAIR handoff), `migrate-dip.svg` (throughput around a move) and
/// `migrate-steady.svg` (a moved download beside a local one) and `migrate-drain.svg` (the
/// drain rate) from a `migrate.json`, those whose parts were measured.
pub(crate) fn figures(
    v: &serde_json::Value,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let r: Saved = serde_json::from_value(v.clone()).context("migrate results")?;
    let runs = r.runs.len();
    let mut figures = Vec::new();
    // Per percentile (p50, p90, p99) every run's value (NaN: none).
    let per_run = |f: &dyn Fn(&SavedRun) -> Option<[Option<f64>; 3]>| -> Vec<Vec<f64>> {
        (0..3)
            .map(|p| {
                r.runs
                    .iter()
                    .map(|x| f(x).and_then(|v| v[p]).unwrap_or(f64::NAN))
                    .collect()
            })
            .collect()
    };
    // Per run: the part saw more steal than the flag's threshold (drawn hollow).
    let flags = |steal: &dyn Fn(&SavedRun) -> Option<f64>| -> Vec<Vec<bool>> {
        let per: Vec<bool> = r
            .runs
            .iter()
            .map(|x| steal(x).is_some_and(|s| s > crate::stats::STEAL_FLAG_PERCENT))
            .collect();
        vec![per; 6]
    };
    let fs_stall = per_run(&|x| Some(x.stall.as_ref()?.stall_ms.pcts(1.0)));
    let fs_freeze = per_run(&|x| Some(x.stall.as_ref()?.freeze_ms.pcts(1.0)));
    let k_stall = per_run(&|x| Some(x.kernel.as_ref()?.stall_ms.pcts(1.0)));
    let k_freeze = per_run(&|x| Some(x.kernel.as_ref()?.downtime_us.pcts(1e-3)));
    if fs_stall
        .iter()
        .chain(&k_stall)
        .flatten()
        .any(|v| v.is_finite())
    {
        let pct = ["p50", "p90", "p99"];
        figures.push((
            "migrate-stall",
            Figure {
                title: format!(
                    "client-observed stall and freeze per move ({} moves, one every {} ms; {runs} run(s))",
                    r.moves, r.interval_ms
                ),
                y_desc: "ms (log scale)".into(),
                categories: pct
                    .iter()
                    .map(|p| format!("stall {p}\n(longest read gap)"))
                    .chain(pct.iter().map(|p| format!("freeze {p}\n(kernel: downtime)")))
                    .collect(),
                series: vec![
                    Series {
                        label: "flowshift live migration".into(),
                        colour: plot::FLOWSHIFT,
                        values: fs_stall.into_iter().chain(fs_freeze).collect(),
                        flagged: flags(&|x| Some(x.stall.as_ref()?.steal_percent)),
},
                    Series {
                        label: "kernel TCP_REPAIR handoff".into(),
                        colour: plot::KERNEL,
                        values: k_stall.into_iter().chain(k_freeze).collect(),
                        flagged: flags(&|x| Some(x.kernel.as_ref()?.steal_percent)),
},
                ],
                refs: vec![RefLine {
                    label: format!("target: stall p99 ≤ {TARGET_STALL_P99_MS} ms"),
                    y: TARGET_STALL_P99_MS,
                    categories: vec![2],
                }],
                log_y: true,
                connect: false,
            },
        ));
    }
    let stalls: Vec<&SavedStall> = r.runs.iter().filter_map(|x| x.stall.as_ref()).collect();
    let bins = stalls
        .iter()
        .map(|s| s.dip_a_to_b.len().max(s.dip_b_to_a.len()))
        .max()
        .unwrap_or(0);
    if let Some(first) = stalls.first().filter(|_| bins > 0) {
        let dip = |f: fn(&SavedStall) -> &Vec<f64>| -> Vec<Vec<f64>> {
            (0..bins)
                .map(|b| stalls.iter().filter_map(|s| f(s).get(b).copied()).collect())
                .collect()
        };
        let warm: Vec<f64> = stalls
            .iter()
            .filter_map(|s| {
                s.warmup_bin_gbit_s
                    .as_ref()
                    .filter(|w| w.n > 0)
                    .map(|w| w.p50)
            })
            .collect();
        figures.push((
            "migrate-dip",
            Figure {
                title: format!(
                    "download throughput around a move, per {:.0} ms bin (median over moves; {runs} run(s))",
                    first.bin_ms
                ),
                y_desc: "Gbit/s".into(),
                categories: (0..bins)
                    .map(|b| {
                        let from = first.bins_from_ms + b as f64 * first.bin_ms;
                        format!("{from:+.0} ms\nfrom the request")
                    })
                    .collect(),
                series: vec![
                    Series {
                        label: "A→B (the flow becomes relayed)".into(),
                        colour: plot::PALETTE[0],
                        values: dip(|s| &s.dip_a_to_b),
                    ..Default::default()
},
                    Series {
                        label: "B→A (it comes home)".into(),
                        colour: plot::PALETTE[2],
                        values: dip(|s| &s.dip_b_to_a),
                    ..Default::default()
},
                ],
                refs: Spread::of(warm)
                    .map(|w| RefLine {
                        label: "no move (warm-up bins, median)".into(),
                        y: w.median,
                        categories: vec![],
                    })
                    .into_iter()
                    .collect(),
                log_y: false,
                connect: true,
            },
        ));
    }
    let steady: Vec<&SavedSteady> = r.runs.iter().filter_map(|x| x.steady.as_ref()).collect();
    if !steady.is_empty() {
        let all = |f: fn(&SavedSteady) -> &Vec<f64>| -> Vec<f64> {
            steady.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        let mut categories = vec![
            format!(
                "moved to node-b\n({})",
                if r.direct_return {
                    "direct return"
                } else {
                    "replies relayed through a"
                }
            ),
            "local on node-a".into(),
        ];
        let mut values = vec![all(|s| &s.moved_gbit_s), all(|s| &s.local_gbit_s)];
        let wg = all(|s| &s.wg_gbit_s);
        if !wg.is_empty() {
            categories.push("through wireguard-go\n(kernel TCP on node-b)".into());
            values.push(wg);
        }
        figures.push((
            "migrate-steady",
            Figure {
                title: format!(
                    "a moved download beside a local one, slices read in turn ({runs} run(s))"
                ),
                y_desc: "Gbit/s".into(),
                categories,
                series: vec![Series {
                    label: "Gbit/s (points: slices)".into(),
                    colour: plot::FLOWSHIFT,
                    values,
                    ..Default::default()
                }],
                refs: vec![],
                log_y: false,
                connect: false,
            },
        ));
    }
    let drains: Vec<&SavedDrain> = r.runs.iter().filter_map(|x| x.drain.as_ref()).collect();
    if let Some(first) = drains.first() {
        let flagged: Vec<bool> = drains
            .iter()
            .map(|d| d.steal_percent > crate::stats::STEAL_FLAG_PERCENT)
            .collect();
        figures.push((
            "migrate-drain",
            Figure {
                title: format!(
                    "ctl drain of {} idle connections to node-b ({} run(s))",
                    first.idle,
                    drains.len()
                ),
                y_desc: "connections per second".into(),
                categories: vec!["node's own time".into(), "ctl round trip".into()],
                series: vec![Series {
                    label: "connections moved per second".into(),
                    colour: plot::FLOWSHIFT,
                    values: vec![
                        drains.iter().map(|d| d.conns_per_s).collect(),
                        drains.iter().map(|d| d.conns_per_s_ctl).collect(),
                    ],
                    flagged: vec![flagged.clone(), flagged],
                }],
                refs: vec![RefLine {
                    label: format!("target ≥ {TARGET_DRAIN_PER_S:.0} per second"),
                    y: TARGET_DRAIN_PER_S,
                    categories: vec![],
                }],
                log_y: false,
                connect: false,
            },
        ));
    }
    plot::draw_all(dir, &figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_gaps_and_spreads() {
        // 1 byte per ns from 0 to 100, then nothing until 300.
        let r = [(0, 0), (50, 50), (100, 100), (300, 101)];
        assert_eq!(max_gap(&r, 60, 120), 200);
        assert!((rate(&r, 0, 100) - 8.0).abs() < 1e-9);
        assert_eq!(rate(&r, 100, 100), 0.0);
        let s = Spread::of(vec![3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert!(Spread::of(vec![f64::NAN]).is_none());
        let s = summary(vec![3.0, 1.0, 2.0, 4.0]);
        assert_eq!((s.p50, s.p99, s.max), (2.0, 4.0, 4.0));
    }

    #[test]
    fn figures_of_a_synthetic_run() {
        let sum = |p50: f64| summary(vec![p50, p50 * 1.5, p50 * 2.0, p50 * 4.0]);
        let stall = |k: f64| StallStats {
            moves_requested: 4,
            moves_done: 4,
            moves_failed: 0,
            bytes: 1_000_000,
            byte_exact: true,
            reset: false,
            client_error: None,
            duration_s: 1.0,
            gbit_s: 5.0,
            steal_percent: 1.0,
            stall_ms: sum(2.0 * k),
            control_gap_ms: sum(0.5),
            sham_gap_ms: sum(0.6),
            freeze_ms: sum(0.8 * k),
            ctl_ms: sum(3.0),
            node_ms: sum(2.0),
            gbit_s_before: sum(5.0),
            gbit_s_after: sum(4.0),
            gbit_s_a_to_b: [5.0, 4.0],
            gbit_s_b_to_a: [5.0, 5.0],
            bin_ms: 100.0,
            bins_from_ms: -200.0,
            dip_a_to_b: vec![5.0, 5.0, 3.0, 4.0, 4.5, 5.0],
            dip_b_to_a: vec![5.0, 5.0, 4.0, 5.0, 5.0, 5.0],
            warmup_bin_gbit_s: sum(5.0),
            node_resets: 0,
            tunnel_packets_refused: 0,
            counters: BTreeMap::new(),
            per_move: vec![MoveRecord {
                from: "a",
                to: "b",
                moved: true,
                reason: None,
                request_ms: 1.0,
                reply_ms: 2.0,
                ctl_ms: 1.0,
                node_ms: 1.0,
                freeze_ms: Some(0.8),
                stall_ms: 2.0,
                gbit_s_before: 5.0,
                gbit_s_after: 4.0,
                bins_gbit_s: vec![5.0; 6],
            }],
        };
        let steady = SteadyStats {
            moved_gbit_s: vec![2.0, 2.2, 2.1],
            local_gbit_s: vec![4.0, 4.1, 3.9],
            moved_median: 2.1,
            local_median: 4.0,
            ratio: 0.52,
            bytes: 1,
            byte_exact: true,
            steal_percent: 0.0,
            moved_cpu: CpuView::default(),
            local_cpu: CpuView::default(),
            wg_gbit_s: vec![0.3],
            wg_median: Some(0.3),
            moved_vs_wg: Some(7.0),
            wg_cpu: Some(CpuView::default()),
            moved_conn: vec![],
            peers: vec![],
            counters: BTreeMap::new(),
        };
        let runs: Vec<RunResult> = (0..2)
            .map(|i| RunResult {
                run: i,
                kernel_first: i % 2 == 1,
                loadavg: [String::new(), String::new()],
                stall: Some(stall(1.0 + i as f64)),
                steady: Some(steady.clone()),
                drain: None,
                // The kernel baseline's JSON is built from the saved form (its statistics
                // need a real handoff run).
                kernel: None,
                errors: vec![],
            })
            .collect();
        let res = Results {
            machine: "test (2 cores)".into(),
            kernel: "6.1".into(),
            veth_mtu: 1500,
            workers: None,
            tcp_buffer: None,
            direct_return: false,
            loss_percent: 0,
            trigger: Trigger::Socket,
            client_rate: None,
            runs_requested: 2,
            moves: 4,
            interval_ms: 600,
            window_before_ms: 50,
            window_after_ms: 200,
            idle: 10,
            headlines: headlines(&runs),
            runs,
            ok: true,
        };
        let mut v = serde_json::to_value(&res).unwrap();
        let kernel = serde_json::json!({
            "steal_percent": 12.0,
            "stall_ms": serde_json::to_value(sum(8.0)).unwrap(),
            "downtime_us": serde_json::to_value(sum(300.0)).unwrap(),
        });
        for r in v["runs"].as_array_mut().unwrap() {
            r["kernel"] = kernel.clone();
            r["drain"] = serde_json::json!({
                "idle": 10_000, "conns_per_s": 8000.0, "conns_per_s_ctl": 6000.0,
            });
        }
        let dir = crate::plot::tests::temp_dir("migrate");
        let paths = figures(&v, &dir).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "migrate-stall.svg",
                "migrate-dip.svg",
                "migrate-steady.svg",
                "migrate-drain.svg"
            ]
        );
        crate::plot::tests::assert_svg(
            &paths[3],
            &["ctl round trip", "target ≥ 5000 per second", "10000 idle"],
        );
        crate::plot::tests::assert_svg(
            &paths[0],
            &[
                "flowshift live migration",
                "kernel TCP_REPAIR handoff",
                "stall p90",
                "freeze p99",
                "target: stall p99 ≤ 5 ms",
                plot::FLAGGED,
            ],
        );
        crate::plot::tests::assert_svg(
            &paths[1],
            &[
                "A→B (the flow becomes relayed)",
                "B→A (it comes home)",
                "no move",
                "-200 ms",
            ],
        );
        crate::plot::tests::assert_svg(
            &paths[2],
            &["moved to node-b", "local on node-a", "through wireguard-go"],
        );
        if std::env::var_os("FLOWSHIFT_KEEP_PLOTS").is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
