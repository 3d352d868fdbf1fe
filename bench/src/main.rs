//! `flowshift-bench`: the bundled benchmarks.
//!
//! `flowshift-bench throughput` builds the namespace testbed, runs a flowshift node and a plain
//! kernel-socket server side by side in node-a, and measures both from the client namespace,
//! back to back in alternating order, over several runs: single-flow download and upload (bytes
//! verified), 8 parallel flows, new connections per second, CPU seconds per GB, steal, and memory
//! per idle connection. It writes JSON and a markdown table of medians and ranges.
//!
//! `flowshift-bench repair` is the kernel baseline of live migration: a download's kernel TCP
//! connection handed between node-a and node-b with TCP_REPAIR, stalls measured by the client.
//!
//! `flowshift-bench migrate` measures flowshift's live migration beside that baseline in one
//! run: the client-observed stall per move of a bulk download, the drain rate of idle
//! connections, the throughput dip around a move and of a moved (relayed) flow.
//!
//! `flowshift-bench plot <results.json>` redraws the figures (SVG) that `throughput`, `tunnel`
//! and `migrate` draw next to their JSON, from a saved JSON.
//!
//! `flowshift-bench sim` runs the prediction simulator (no root needed): overload-seconds,
//! moves and forecast error of no policy, reactive and predictive over synthetic workloads.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

mod kernel_server;
mod load;
mod migrate;
mod plot;
mod progress;
mod repair;
mod sim;
mod stats;
mod sys;
mod throughput;
mod tunnel;
mod wg;

/// flowshift benchmarks (need root: they build network namespaces).
#[derive(Parser)]
#[command(name = "flowshift-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// flowshift against the kernel's own TCP on the same topology, in one run.
    Throughput(throughput::Args),
    /// flowshift's tunnel between two nodes against kernel TCP on the plain path and through
    /// wireguard-go, the same bytes each, runs interleaved.
    Tunnel(tunnel::Args),
    /// The kernel baseline of live migration: a download's connection handed between node-a
    /// and node-b with Linux TCP_REPAIR (as CRIU does), stalls measured by the client.
    Repair(repair::Args),
    /// flowshift's live migration beside the kernel's TCP_REPAIR handoff, in one run: stall
    /// per move of a download, drain rate, throughput around a move and of a moved flow.
    Migrate(migrate::Args),
    /// The prediction simulator: every workload under no policy, reactive and predictive, with
    /// several seeds; a table, JSON and plots. Needs no root.
    Sim(sim::Args),
    /// Redraw the figures of a saved results JSON (of `throughput`, `tunnel` or `migrate`)
    /// without rerunning the benchmark. Needs no root.
    Plot {
        /// The results JSON (`throughput.json`, `tunnel.json` or `migrate.json`).
        results: PathBuf,
        /// Where the SVGs go (default: the JSON's directory).
        #[arg(long, visible_alias = "out-dir")]
        out: Option<PathBuf>,
    },
    /// Opens `n` connections to an echo server from `source`, each echoing `payload` bytes
    /// (checked), prints `ready <n>` and holds them idle until its stdin closes. The
    /// throughput benchmark's idle-memory part runs several in the client namespace.
    #[command(hide = true)]
    IdleClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        payload: usize,
        #[arg(long)]
        source: Ipv4Addr,
    },
    /// The kernel baseline's servers (source :19, sink :9, echo :7) on an address; runs until
    /// killed. The throughput benchmark starts it in node-a.
    #[command(hide = true)]
    KernelServer {
        /// Address to serve on.
        #[arg(long)]
        addr: Ipv4Addr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_nofile_limit();
    if matches!(
        cli.command,
        Command::Throughput(_) | Command::Tunnel(_) | Command::Repair(_) | Command::Migrate(_)
    ) {
        // Interrupted, a benchmark still removes its namespaces and stops its nodes.
        flowshift_testbed::teardown_on_signals()?;
    }
    match cli.command {
        Command::Throughput(args) => throughput::run(args),
        Command::Tunnel(args) => tunnel::run(args),
        Command::Repair(args) => repair::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Plot { results, out } => plot::redraw(&results, out.as_deref()),
        Command::IdleClient {
            addr,
            n,
            payload,
            source,
        } => {
            let conns = match load::open_idle_from(addr, n, payload, Some(source)) {
                Ok(c) => c,
                Err(e) => {
                    println!("error {e}");
                    std::process::exit(1);
                }
            };
            println!("ready {}", conns.len());
            std::io::Write::flush(&mut std::io::stdout())?;
            // Hold the connections until the benchmark closes our stdin.
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
            drop(conns);
            Ok(())
        }
        Command::KernelServer { addr: ip } => {
            kernel_server::source(addr(ip, 19))?;
            kernel_server::sink(addr(ip, 9))?;
            kernel_server::echo(addr(ip, 7))?;
            println!("ready");
            loop {
                std::thread::park();
            }
        }
    }
}

/// The idle-connection benchmark holds up to 100,000s of sockets, in this process (the
/// clients) and in the kernel-server child (which inherits the limit): raise the soft limit,
/// and as root the hard one too, to `fs.nr_open`'s bound.
fn raise_nofile_limit() {
    const WANT: libc::rlim_t = 1 << 20;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(WANT);
    // SAFETY: `lim` is a valid rlimit to fill and then read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.max(WANT.min(nr_open));
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 && lim.rlim_cur < lim.rlim_max {
            // Not allowed to raise the hard limit: the soft one up to it.
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Where the results go.
#[derive(clap::Args, Debug, Clone)]
struct Output {
    /// Write `<name>.json` and `<name>.md` here.
    #[arg(long, default_value = "bench-results")]
    out_dir: PathBuf,
}

fn write_results<T: Serialize>(
    out: &Output,
    name: &str,
    results: &T,
    markdown: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&out.out_dir)
        .with_context(|| format!("creating {}", out.out_dir.display()))?;
    let json = out.out_dir.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(results)?)?;
    let md = out.out_dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown)?;
    println!("{markdown}");
    println!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("flowshift-bench needs root: it builds network namespaces and TUN devices");
    }
    Ok(())
}

fn secs(d: u64) -> Duration {
    Duration::from_secs(d)
}
