//! `flowshift demo`: a testbed, a node, a download through it, torn down again.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flowshift_tests::oracle::CountingVerifier;
use flowshift_tests::testbed::SERVICE_ADDR;
use flowshift_tests::{Node, NodeConfig, Testbed, TestbedOptions};
use indicatif::{ProgressBar, ProgressStyle};

pub(crate) fn run(bytes: u64) -> anyhow::Result<()> {
    flowshift_tests::require_root().context("the demo builds network namespaces")?;
    flowshift_tests::ensure_tools(&["ip"])?;
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
    let node = tb.start_node(Node::A, &NodeConfig::standard("a"))?;
    println!(
        "  node a running (pid {}), control socket {}",
        node.pid(),
        node.control_socket().display()
    );
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
                mid_conns = node.ctl(&["conns"]).ok();
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
    if let Some(c) = mid_conns {
        println!();
        println!("  flowshift ctl conns, taken half-way through the download:");
        for line in c.lines() {
            println!("    {line}");
        }
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
    let exit = node.terminate()?;
    println!("  node stopped on SIGTERM: {exit}");
    drop(tb);
    println!("  testbed removed: no namespace, TUN device or route left behind");
    if !exit.success() {
        bail!("node exited with {exit}");
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
