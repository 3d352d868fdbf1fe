//! `flowshift demo`: a testbed, two nodes joined by the tunnel, and a running download moved
//! from node a to node b and back while the client keeps reading; torn down again.

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

pub(crate) fn run(bytes: u64) -> anyhow::Result<()> {
    flowshift_testbed::require_root().context("the demo builds network namespaces")?;
    flowshift_testbed::ensure_tools(&["ip", "nft"])?;
    // The testbed starts this very binary as the node.
    // SAFETY: set before any other thread exists.
    unsafe { std::env::set_var("FLOWSHIFT_BIN", std::env::current_exe()?) };

    // Interrupted (Ctrl-C), the demo still removes its namespaces and stops its nodes.
    flowshift_testbed::teardown_on_signals()?;
    println!("flowshift demo");
    println!("  building the testbed: client, router, node-a, node-b namespaces (198.18.0.0/15)");
    let tb = Testbed::new(TestbedOptions {
        watchdog: None,
        ..Default::default()
    })?;
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

    tunnel::wait_alive(&node, &node_b, Duration::from_secs(20))?;
    println!("  tunnel a ⇄ b up (Noise IK handshake, ChaCha20-Poly1305 records)");
    println!();

    let progress = AtomicU64::new(0);
    let url_path = format!("/bytes/{bytes}");
    let (result, moves) = std::thread::scope(|s| {
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
        // Move the download to b at a third, and back home to a at two thirds.
        let plan = [(&node, &node_b, bytes / 3), (&node_b, &node, 2 * bytes / 3)];
        let mut moves = Vec::new();
        while !download.is_finished() {
            let done = progress.load(Ordering::Relaxed);
            bar.set_position(done);
            if let Some(&(from, to, at)) = plan.get(moves.len())
                && done >= at
            {
                let m = move_download(from, to);
                if let Ok(m) = &m {
                    let mut text = format!(
                        "  moved {} → {} at {} MB: frozen {:.2} ms (the client's connection never closed)\n",
                        from.name(),
                        to.name(),
                        done / 1_000_000,
                        m.freeze_ms
                    );
                    for line in m.tables.lines() {
                        text += &format!("    {line}\n");
                    }
                    // A hidden bar (no terminal) prints nothing of its own.
                    if bar.is_hidden() {
                        print!("{text}");
                    } else {
                        bar.println(text.trim_end());
                    }
                }
                moves.push(m);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bar.set_position(progress.load(Ordering::Relaxed));
        bar.finish();
        (
            download
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("download thread panicked"))),
            moves,
        )
    });
    let (got, secs) = result?;
    let mut freezes = Vec::new();
    for m in moves {
        freezes.push(m?.freeze_ms);
    }
    if freezes.len() < 2 {
        bail!(
            "the download finished before both moves ({} done): try a larger --bytes",
            freezes.len()
        );
    }
    println!();
    println!(
        "  downloaded {got} bytes in {secs:.2} s ({:.2} Gbit/s) over one TCP connection, moved a → b → a",
        got as f64 * 8.0 / secs / 1e9
    );
    println!(
        "  every byte matched the counting stream, in order, and the client saw no reset; frozen {}",
        freezes
            .iter()
            .map(|f| format!("{f:.2} ms"))
            .collect::<Vec<_>>()
            .join(" and ")
    );
    for n in [&node, &node_b] {
        let stats = &n.ctl_json(&["status"])?["stats"];
        println!(
            "  node {}: {} connection(s) moved out, {} restored, {} packets relayed for moved connections",
            n.name(),
            stats["conns_moved_out"],
            stats["conns_restored"],
            stats["relayed_from_owner"].as_u64().unwrap_or(0)
                + stats["forwarded_to_ingress"].as_u64().unwrap_or(0)
        );
    }
    println!();
    println!("  flowshift ctl peers on node a:");
    for line in node.ctl(&["peers"])?.lines() {
        println!("    {line}");
    }
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

/// One move of the demo's download.
struct Move {
    freeze_ms: f64,
    /// `ctl conns` of both nodes right after the move.
    tables: String,
}

/// Moves the one connection living on `from` to `to` with `ctl migrate`.
fn move_download(from: &NodeHandle, to: &NodeHandle) -> anyhow::Result<Move> {
    let conns = from.ctl_json(&["conns"])?;
    let id = conns
        .as_array()
        .and_then(|a| a.iter().find(|c| c["mode"] == "local"))
        .and_then(|c| c["id"].as_u64())
        .with_context(|| format!("no connection lives on {}", from.name()))?;
    let report = from.ctl_json(&["migrate", "--to", to.name(), "--conn", &format!("{id:#x}")])?;
    if report["moved"] != 1 {
        bail!("the move failed: {report}");
    }
    let freeze_ms = report["conns"][0]["freeze_ms"].as_f64().unwrap_or(f64::NAN);
    let mut tables = String::new();
    for n in [from, to] {
        tables += &format!("ctl conns on node {}:\n", n.name());
        for line in n.ctl(&["conns"])?.lines() {
            tables += &format!("  {line}\n");
        }
    }
    Ok(Move { freeze_ms, tables })
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
