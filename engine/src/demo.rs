//! `flowshift demo`: a testbed, two nodes joined by the tunnel, a download through node a, a
//! bulk transfer from a to b over the tunnel through a lossy router, torn down again.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flowshift_testbed::oracle::CountingVerifier;
use flowshift_testbed::testbed::SERVICE_ADDR;
use flowshift_testbed::tunnel::{self, TUNNEL_PORT};
use flowshift_testbed::{NodeHandle, Testbed, TestbedOptions};
use indicatif::{ProgressBar, ProgressStyle};

pub(crate) fn run(bytes: u64, tunnel_bytes: u64, loss: u8) -> anyhow::Result<()> {
    flowshift_testbed::require_root().context("the demo builds network namespaces")?;
    flowshift_testbed::ensure_tools(&["ip", "nft"])?;
    // The testbed starts this very binary as the node.
    // SAFETY: set before any other thread exists.
    unsafe { std::env::set_var("FLOWSHIFT_BIN", std::env::current_exe()?) };

    println!("flowshift demo");
    println!("  building the testbed: client, router, node-a, node-b namespaces (198.18.0.0/15)");
    let tb = Testbed::new(TestbedOptions::default())?;
    println!("  namespaces: {}", tb.namespace_names().join(", "));
    println!();
    println!(
        "  client 198.18.1.2 ── router ── node-a 198.18.2.2 ── TUN fs0 ── flowshift (smoltcp)"
    );
    println!(
        "  service address {SERVICE_ADDR} is routed by the router to node-a, and by node-a into its TUN"
    );
    println!();
    println!(
        "  node-b 198.18.3.2 ── TUN fs0 ── flowshift; a ⇄ b: encrypted tunnel on UDP {TUNNEL_PORT}"
    );
    println!();
    let (node, node_b) = tunnel::start_tunnel_pair(&tb, None)?;
    for n in [&node, &node_b] {
        println!(
            "  node {} running (pid {}), control socket {}",
            n.name(),
            n.pid(),
            n.control_socket().display()
        );
    }
    println!();

    let progress = AtomicU64::new(0);
    let url_path = format!("/bytes/{bytes}");
    let (result, mid_conns) = std::thread::scope(|s| {
        let download = s.spawn(|| tb.client().run(|| download(&url_path, bytes, &progress)));
        let bar = ProgressBar::new(bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "  GET {msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("http://{SERVICE_ADDR}{url_path}"));
        let mut mid_conns = None;
        while !download.is_finished() {
            let done = progress.load(Ordering::Relaxed);
            bar.set_position(done);
            if mid_conns.is_none() && done > bytes / 2 {
                mid_conns = Some(node.ctl(&["conns"]));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bar.set_position(progress.load(Ordering::Relaxed));
        bar.finish();
        (
            download
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("download thread panicked"))),
            mid_conns,
        )
    });
    let (got, secs) = result?;
    println!();
    println!(
        "  downloaded {got} bytes in {secs:.2} s: {:.2} Gbit/s; every byte matched the counting stream",
        got as f64 * 8.0 / secs / 1e9
    );
    println!();
    match mid_conns {
        Some(Ok(c)) => {
            println!("  flowshift ctl conns, taken half-way through the download:");
            for line in c.lines() {
                println!("    {line}");
            }
        }
        Some(Err(e)) => println!("  flowshift ctl conns failed half-way through: {e}"),
        None => println!("  (the download finished before the half-way `ctl conns` look)"),
    }
    let status = node.ctl_json(&["status"])?;
    let stats = &status["stats"];
    println!();
    println!(
        "  node counters: {} packets in, {} out, {} connections accepted, {} packets dropped",
        stats["packets_in"],
        stats["packets_out"],
        stats["conns_accepted"],
        stats["dropped"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|v| v.as_u64()).sum::<u64>())
    );
    println!();
    tunnel_transfer(&tb, &node, &node_b, tunnel_bytes, loss)?;

    println!();
    for n in [node, node_b] {
        let name = n.name().to_owned();
        let exit = n.terminate()?;
        println!("  node {name} stopped on SIGTERM: {exit}");
        if !exit.success() {
            bail!("node {name} exited with {exit}");
        }
    }
    // The TUN devices and routes lived in the node namespaces: they go with them.
    let names = tb.namespace_names();
    drop(tb);
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| names.contains(n))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        bail!("namespaces left behind: {left:?}");
    }
    println!(
        "  testbed removed: its {} namespaces, and the TUN devices and routes in them, are gone",
        names.len()
    );
    Ok(())
}

/// Moves `bytes` of the counting stream from `a` to `b` over the tunnel's reliable channel
/// while the router drops `loss` percent of packets; shows progress from b's verified count.
fn tunnel_transfer(
    tb: &Testbed,
    a: &NodeHandle,
    b: &NodeHandle,
    bytes: u64,
    loss: u8,
) -> anyhow::Result<()> {
    tunnel::wait_alive(a, b, Duration::from_secs(20))?;
    println!("  tunnel a ⇄ b up (Noise IK handshake, ChaCha20-Poly1305 records)");
    if loss > 0 {
        tb.set_router_loss(loss)?;
        println!("  the router now drops {loss} % of packets at random");
    }
    let verified = || -> anyhow::Result<(u64, u64)> {
        let p = tunnel::peer(b, a.name())?;
        Ok((
            p["rx_verified_bytes"].as_u64().unwrap_or(0),
            p["rx_errors"].as_u64().unwrap_or(0),
        ))
    };
    let bar = ProgressBar::new(bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "  tunnel a → b [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let start = Instant::now();
    a.ctl(&["tunnel-send", b.name(), &bytes.to_string()])?;
    let mut last = (0, Instant::now());
    let errors = loop {
        let (got, errors) = verified()?;
        bar.set_position(got.min(bytes));
        if got >= bytes || errors > 0 {
            break errors;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            tb.clear_router_loss();
            bail!("the tunnel transfer stalled at {got} of {bytes} bytes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = start.elapsed().as_secs_f64();
    bar.finish();
    let drops = if loss > 0 {
        tb.router_loss_drops().unwrap_or(0)
    } else {
        0
    };
    tb.clear_router_loss();
    if errors > 0 {
        bail!("node b found {errors} messages out of order or corrupted");
    }
    let p = tunnel::peer(a, b.name())?;
    println!();
    println!(
        "  moved {bytes} bytes in {secs:.2} s: {:.2} Gbit/s; node b verified every byte, in order, exactly once",
        bytes as f64 * 8.0 / secs / 1e9
    );
    println!(
        "  the router dropped {drops} packets; node a resent {} bytes",
        p["retransmitted_bytes"]
    );
    println!();
    println!("  flowshift ctl peers on node a:");
    for line in a.ctl(&["peers"])?.lines() {
        println!("    {line}");
    }
    Ok(())
}

/// GET `path` over HTTP/1.1 from the service address; verify the body against the counting
/// stream. Returns the body length and the seconds it took.
fn download(path: &str, expect: u64, progress: &AtomicU64) -> anyhow::Result<(u64, f64)> {
    let addr = SocketAddr::from((SERVICE_ADDR, 80));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .context("connecting to the service")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let start = Instant::now();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = BufReader::with_capacity(256 * 1024, s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("unexpected status line: {status:?}");
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<u64>().ok();
        }
    }
    if length != Some(expect) {
        bail!("Content-Length {length:?}, expected {expect}");
    }
    let mut verifier = CountingVerifier::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        verifier.feed(&buf[..n])?;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    if verifier.offset() != expect {
        bail!("body ended after {} of {expect} bytes", verifier.offset());
    }
    Ok((expect, start.elapsed().as_secs_f64()))
}
