//! `flowshift-bench tunnel`: flowshift's tunnel between node-a and node-b, beside wireguard-go
//! carrying iperf3 on the same topology, in one run.
//!
//! flowshift: node A sends N bytes of the counting stream to node B over the reliable channel
//! (and, separately, as datagrams) through `ctl tunnel-send`; B verifies every byte and counts
//! them (`ctl peers`). The time runs from the request until B has verified everything (reliable)
//! or until the sender is done and the count settles (datagrams, which may be lost).
//!
//! wireguard-go: a userspace WireGuard interface in each node namespace (inner addresses
//! 198.19.1.1/24 and .2), iperf3 from node-a to node-b across it.
//!
//! Both are measured again while the router drops `--loss` percent of packets (nft), the
//! reliable channel against TCP over wireguard-go. CPU is reported twice: the whole machine's
//! busy time (both ends, router and kernel included), and the tunnel processes' own (the two
//! flowshift nodes; the two wireguard-go processes, without iperf3 and its kernel TCP).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use crate::{Output, sys};
use flowshift_testbed::testbed::{NODE_A, NODE_B};
use flowshift_testbed::tunnel;
use flowshift_testbed::{Netns, NodeHandle, Testbed, TestbedOptions, ensure_tools};

/// Arguments of `flowshift-bench tunnel`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// Bytes to move over flowshift's reliable channel.
    #[arg(long, default_value_t = 2_000_000_000)]
    bytes: u64,
    /// Bytes to offer as datagrams.
    #[arg(long, default_value_t = 1_000_000_000)]
    datagram_bytes: u64,
    /// Seconds of iperf3 over wireguard-go.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// veth MTU of every link.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Percent of packets the router drops in the lossy runs (0: skip them).
    #[arg(long, default_value_t = 5)]
    loss: u8,
    /// Bytes to move over the reliable channel in the lossy run.
    #[arg(long, default_value_t = 500_000_000)]
    loss_bytes: u64,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Run {
    bytes: u64,
    seconds: f64,
    gbit_s: f64,
    machine_cpu_s_per_gb: f64,
    tunnel_cpu_s_per_gb: f64,
    /// Share of the machine's CPU time the hypervisor gave to other guests meanwhile: a run
    /// with much of it measured a noisy neighbour as much as the code.
    steal_percent: f64,
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
        }
    }
}

/// CPU seconds used so far by all of `pids`.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| sys::process_cpu_seconds(p)).sum()
}

#[derive(Debug, Serialize)]
struct Results {
    machine: String,
    kernel: String,
    veth_mtu: u16,
    loss_percent: u8,
    flowshift_reliable: Run,
    flowshift_datagram: Run,
    wireguard_go_iperf3: Run,
    flowshift_reliable_lossy: Option<Run>,
    wireguard_go_iperf3_lossy: Option<Run>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    crate::require_root()?;
    ensure_tools(&["iperf3", "wireguard-go", "wg"])?;
    let tb = Testbed::new(TestbedOptions {
        mtu: args.mtu,
        watchdog: None,
        ..Default::default()
    })?;

    // wireguard-go + iperf3 first: nothing of flowshift's runs yet.
    let (wireguard, wireguard_lossy) =
        wireguard_iperf(&tb, args.duration, args.loss).context("wireguard-go + iperf3")?;
    eprintln!("  wireguard-go + iperf3: {:.2} Gbit/s", wireguard.gbit_s);
    if let Some(r) = &wireguard_lossy {
        eprintln!("    at {} % loss:        {:.2} Gbit/s", args.loss, r.gbit_s);
    }

    let (a, b) = flowshift_pair(&tb)?;
    let reliable = flowshift_send(&a, &b, args.bytes, false).context("reliable channel")?;
    eprintln!("  flowshift reliable:    {:.2} Gbit/s", reliable.gbit_s);
    let datagram = flowshift_send(&a, &b, args.datagram_bytes, true).context("datagrams")?;
    eprintln!("  flowshift datagrams:   {:.2} Gbit/s", datagram.gbit_s);
    let reliable_lossy = if args.loss > 0 {
        tb.set_router_loss(args.loss)?;
        let r = flowshift_send(&a, &b, args.loss_bytes, false);
        tb.clear_router_loss();
        let r = r.context("reliable channel through loss")?;
        eprintln!("    at {} % loss:        {:.2} Gbit/s", args.loss, r.gbit_s);
        Some(r)
    } else {
        None
    };
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
        flowshift_reliable: reliable,
        flowshift_datagram: datagram,
        wireguard_go_iperf3: wireguard,
        flowshift_reliable_lossy: reliable_lossy,
        wireguard_go_iperf3_lossy: wireguard_lossy,
    };
    let md = markdown(&results);
    crate::write_results(&args.out, "tunnel", &results, &md)
}

/// `<tool> genkey | <tool> pubkey` (flowshift and wg print the same key format).
fn keypair_with(bin: &std::path::Path) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(bin).arg("genkey").output()?;
    ensure!(out.status.success(), "{} genkey failed", bin.display());
    let private = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut child = std::process::Command::new(bin)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        format!("{private}\n").as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{} pubkey failed", bin.display());
    Ok((private, String::from_utf8(out.stdout)?.trim().to_owned()))
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
    Ok(Run::new(got, seconds, busy, cpu))
}

/// A wireguard-go process: stopped with SIGTERM (so it removes its interface and UAPI socket),
/// killed if it lingers; the socket file is removed either way.
struct Wg {
    child: Child,
    uapi: String,
}

impl Drop for Wg {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process this benchmark started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.uapi);
    }
}

/// One end of the wireguard-go tunnel.
struct WgSide<'a> {
    ns: &'a Netns,
    ifname: String,
    key_path: String,
    public: String,
    /// Outer address (its node's).
    outer: std::net::Ipv4Addr,
    /// Address inside the tunnel.
    inner: &'static str,
}

/// Starts wireguard-go for `me`, configured with `wg` to talk to `peer`.
fn wireguard(tb: &Testbed, me: &WgSide<'_>, peer: &WgSide<'_>) -> anyhow::Result<Wg> {
    let mut cmd = me.ns.command("wireguard-go");
    cmd.args(["-f", &me.ifname])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = tb.spawn(cmd)?;
    let sock = format!("/var/run/wireguard/{}.sock", me.ifname);
    let wg = Wg {
        child,
        uapi: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&sock).exists() {
        ensure!(
            Instant::now() < deadline,
            "wireguard-go did not create {sock}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    me.ns.exec(
        "wg",
        &[
            "set",
            &me.ifname,
            "private-key",
            &me.key_path,
            "listen-port",
            "51820",
            "peer",
            &peer.public,
            "endpoint",
            &format!("{}:51820", peer.outer),
            "allowed-ips",
            &format!("{}/32", peer.inner),
        ],
    )?;
    me.ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", me.inner),
        "dev",
        &me.ifname,
    ])?;
    me.ns.ip(&["link", "set", &me.ifname, "up"])?;
    Ok(wg)
}

/// iperf3 over wireguard-go: a clean run, then (if `loss` > 0) one through router loss.
fn wireguard_iperf(tb: &Testbed, duration: u64, loss: u8) -> anyhow::Result<(Run, Option<Run>)> {
    // UAPI sockets live in the shared /var/run/wireguard: names unique per run.
    let tag = std::process::id() % 100_000;
    let mut sides = Vec::new();
    for (ns, end, outer, inner) in [
        (tb.node_a(), "a", NODE_A, "198.19.1.1"),
        (tb.node_b(), "b", NODE_B, "198.19.1.2"),
    ] {
        let (private, public) = keypair_with(std::path::Path::new("wg"))?;
        let key = tb.dir().join(format!("wg{end}.key"));
        std::fs::write(&key, format!("{private}\n"))?;
        sides.push(WgSide {
            ns,
            ifname: format!("wgfs{tag}{end}"),
            key_path: key.display().to_string(),
            public,
            outer,
            inner,
        });
    }
    let wa = wireguard(tb, &sides[0], &sides[1])?;
    let wb = wireguard(tb, &sides[1], &sides[0])?;
    let pids = [wa.child.id(), wb.child.id()];
    let clean = iperf(tb, duration, &pids)?;
    let lossy = if loss > 0 {
        tb.set_router_loss(loss)?;
        let r = iperf(tb, duration, &pids);
        tb.clear_router_loss();
        Some(r.context("through loss")?)
    } else {
        None
    };
    Ok((clean, lossy))
}

/// One iperf3 run from node-a to node-b across the wireguard-go interfaces.
fn iperf(tb: &Testbed, duration: u64, pids: &[u32]) -> anyhow::Result<Run> {
    let mut server = tb.node_b().command("iperf3");
    server
        .args(["-s", "-1", "-B", "198.19.1.2"])
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
            &["-c", "198.19.1.2", "-t", &duration.to_string(), "-J"],
        )
        .context("iperf3 client")?;
    let busy = mark.since();
    let cpu = cpu_of(pids) - cpu0;
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let end = &json["end"]["sum_received"];
    let bytes = end["bytes"].as_f64().context("iperf3 bytes")? as u64;
    let seconds = end["seconds"].as_f64().context("iperf3 seconds")?;
    Ok(Run::new(bytes, seconds, busy, cpu))
}

fn markdown(r: &Results) -> String {
    let ratio = |x: &Run, base: &Run| {
        if base.gbit_s > 0.0 {
            format!("{:.2}", x.gbit_s / base.gbit_s)
        } else {
            "-".into()
        }
    };
    let wg = &r.wireguard_go_iperf3;
    let mut s = format!(
        "Machine: {} · kernel {} · veth MTU {} · node-a → node-b through the router\n\n",
        r.machine, r.kernel, r.veth_mtu
    );
    s += "| transport | Gbit/s | tunnel processes' CPU s per GB | machine CPU s per GB | vs wireguard-go | steal % |\n|---|---:|---:|---:|---:|---:|\n";
    let mut row = |name: String, run: &Run, base: &Run| {
        s += &format!(
            "| {name} | {:.2} | {:.2} | {:.2} | {} | {:.0} |\n",
            run.gbit_s,
            run.tunnel_cpu_s_per_gb,
            run.machine_cpu_s_per_gb,
            ratio(run, base),
            run.steal_percent
        );
    };
    row(
        "flowshift reliable channel (counting stream, verified)".into(),
        &r.flowshift_reliable,
        wg,
    );
    row(
        "flowshift datagrams (delivered, verified)".into(),
        &r.flowshift_datagram,
        wg,
    );
    row("wireguard-go + iperf3 (TCP)".into(), wg, wg);
    if let (Some(f), Some(w)) = (&r.flowshift_reliable_lossy, &r.wireguard_go_iperf3_lossy) {
        let pct = r.loss_percent;
        row(
            format!("flowshift reliable channel, router drops {pct} %"),
            f,
            w,
        );
        row(format!("wireguard-go + iperf3, router drops {pct} %"), w, w);
    }
    s
}
