//! End-to-end live migration: real clients in the client namespace, two nodes joined by the
//! tunnel, connections moved between them while they carry data. Every test checks the
//! client's bytes exactly, that the client saw no reset (its own result), and the nodes'
//! counters.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowshift_tests::oracle::CountingVerifier;
use flowshift_tests::testbed::SERVICE_ADDR;
use flowshift_tests::tunnel::{
    peer, start_tunnel_pair, start_tunnel_pair_with, start_tunnel_trio, wait_alive,
};
use flowshift_tests::{NodeConfig, NodeHandle, Testbed, TestbedOptions, ensure_tools};

fn pair() -> (Testbed, NodeHandle, NodeHandle) {
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    let (a, b) = start_tunnel_pair(&tb, None).expect("nodes");
    wait_alive(&a, &b, Duration::from_secs(10)).expect("tunnel up");
    (tb, a, b)
}

fn stat(node: &NodeHandle, key: &str) -> u64 {
    let s = node.ctl_json(&["status"]).expect("status");
    s["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{key} in {s}"))
}

/// Polls `f` every 10 ms until it is true; panics after `secs` (a liveness bound, not a
/// timing assertion).
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not reached within {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ids of the connections living on `node` (not moved away).
fn local_ids(node: &NodeHandle) -> Vec<u64> {
    let conns = node.ctl_json(&["conns"]).expect("conns");
    conns
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["mode"] == "local")
        .map(|c| c["id"].as_u64().unwrap())
        .collect()
}

/// `ctl migrate --to <to> --conn <id>`: asserts it moved, returns the report.
fn migrate(from: &NodeHandle, to: &str, id: u64) -> serde_json::Value {
    let id = format!("{id:#x}");
    let r = from
        .ctl_json(&["migrate", "--to", to, "--conn", &id])
        .unwrap_or_else(|e| panic!("migrate {id}: {e}\n{}", from.log()));
    assert_eq!(r["moved"], 1, "not moved: {r}\n{}", from.log());
    r
}

#[test]
fn curl_download_of_1_gb_moves_mid_stream_byte_exact() {
    ensure_tools(&["curl"]).unwrap();
    let (tb, a, b) = pair();
    // The client's receive buffer is small: what a sent before the move and the client had
    // not read yet is at most its window (its kernel would otherwise hold up to 6 MB).
    tb.client()
        .sysctl("net.ipv4.tcp_rmem", "4096 65536 131072")
        .unwrap();
    let n: u64 = 1_000_000_000;
    let (report, at_move) = download_moved(&tb, &a, n, 100_000_000);
    // The bytes after the move came from b, through a.
    assert!(
        stat(&b, "app_bytes_out") >= n - at_move - 1_000_000,
        "{report}"
    );
    assert!(stat(&a, "relayed_from_owner") > 1000);
    assert_eq!(stat(&b, "tunnel_packets_refused"), 0);
    assert_eq!(stat(&a, "conns_moved_out"), 1);
    assert_eq!(stat(&b, "conns_restored"), 1);
}

/// Reads the counting stream from `out` on a thread, publishing the verified byte count.
/// Reads curl's output, checks the counting stream and counts it; with `pace`, at most that
/// many bytes a second. The pace is what holds a download to a rate: curl 7.88's
/// `--limit-rate` lets transfers of a few MB through at full speed (2 MB at "250k" in
/// 0.3–1 s, measured on this machine).
fn verify_counting(
    mut out: impl Read + Send + 'static,
    pace: Option<u64>,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<u64>) {
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let handle = std::thread::spawn(move || {
        let mut v = CountingVerifier::new();
        let mut buf = vec![0u8; if pace.is_some() { 16 << 10 } else { 1 << 20 }];
        let start = Instant::now();
        loop {
            let k = out.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            v.feed(&buf[..k]).expect("counting stream");
            r.store(v.offset(), Ordering::Relaxed);
            if let Some(rate) = pace.filter(|r| *r > 0) {
                let due = start + Duration::from_secs_f64(v.offset() as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
        v.offset()
    });
    (received, handle)
}

/// Starts curl in the client namespace downloading `n` bytes of the counting stream
/// (`extra` goes before the URL); stdout and stderr piped.
fn curl_get(tb: &Testbed, n: u64, extra: &[&str]) -> std::process::Child {
    let mut c = tb.client().command("curl");
    c.args(["-sS", "--fail", "--max-time", "300"])
        .args(extra)
        .arg(format!("http://{SERVICE_ADDR}/bytes/{n}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tb.spawn(c).expect("curl")
}

/// Waits for curl to end and asserts it succeeded (a reset makes it fail).
fn curl_ok(mut child: std::process::Child) {
    let status = child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    assert!(status.success(), "curl failed (a reset?): {status} {err}");
}

/// curl downloads `n` bytes; the connection moves from a to b once `move_at` bytes arrived.
/// Returns the migrate report and the bytes the client had when the move was made.
fn download_moved(tb: &Testbed, a: &NodeHandle, n: u64, move_at: u64) -> (serde_json::Value, u64) {
    download_moved_with(tb, a, n, move_at, None)
}

/// [`download_moved`] read at `pace` bytes a second at most.
fn download_moved_with(
    tb: &Testbed,
    a: &NodeHandle,
    n: u64,
    move_at: u64,
    pace: Option<u64>,
) -> (serde_json::Value, u64) {
    let mut child = curl_get(tb, n, &[]);
    let (received, reader) = verify_counting(child.stdout.take().unwrap(), pace);
    eventually(120, "bytes before the move", || {
        received.load(Ordering::Relaxed) > move_at
    });
    let ids = local_ids(a);
    assert_eq!(ids.len(), 1, "one connection on a");
    let report = migrate(a, "b", ids[0]);
    let at_move = received.load(Ordering::Relaxed);
    assert!(at_move < n, "moved mid-stream");
    let total = reader.join().unwrap();
    curl_ok(child);
    assert_eq!(total, n);
    (report, at_move)
}

/// The client namespace turns one TCP option off; a download still moves byte-exact.
fn download_moves_with_client_sysctl(key: &str) {
    ensure_tools(&["curl"]).unwrap();
    let (tb, a, b) = pair();
    tb.client().sysctl(key, "0").unwrap();
    download_moved(&tb, &a, 200_000_000, 30_000_000);
    assert_eq!(stat(&b, "conns_restored"), 1);
    assert_eq!(stat(&b, "tunnel_packets_refused"), 0);
}

#[test]
fn a_download_moves_with_client_sack_off() {
    download_moves_with_client_sysctl("net.ipv4.tcp_sack");
}

#[test]
fn a_download_moves_with_client_timestamps_off() {
    download_moves_with_client_sysctl("net.ipv4.tcp_timestamps");
}

#[test]
fn a_download_moves_with_client_window_scaling_off() {
    download_moves_with_client_sysctl("net.ipv4.tcp_window_scaling");
}

#[test]
fn a_download_moves_under_5_percent_loss() {
    ensure_tools(&["curl", "nft"]).unwrap();
    let (tb, a, b) = pair();
    tb.set_router_loss(5).unwrap();
    // The transfer is small and rate-limited, so that the move lands mid-stream however
    // few packets happen to be lost; the client's receive buffer is small, or its kernel
    // would take the whole transfer at once (the node's loss probes recover a lost tail
    // within milliseconds) and the connection would be over on the node before the move.
    tb.client()
        .sysctl("net.ipv4.tcp_rmem", "4096 65536 131072")
        .unwrap();
    download_moved_with(&tb, &a, 600_000, 200_000, Some(150_000));
    assert_eq!(stat(&b, "conns_restored"), 1);
}

#[test]
fn curl_upload_of_200_mb_moves_mid_stream_and_the_crc_matches() {
    ensure_tools(&["curl"]).unwrap();
    let (tb, a, b) = pair();
    let n: u64 = 200_000_000;
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("curl");
            c.args([
                "-sS",
                "--fail",
                "--max-time",
                "300",
                "--data-binary",
                "@-",
                "-H",
                "Content-Type: application/octet-stream",
                &format!("http://{SERVICE_ADDR}/upload"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
            c
        })
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < n {
                let k = (n - at).min(buf.len() as u64) as usize;
                flowshift_tests::oracle::counting_fill(at, &mut buf[..k]);
                stdin.write_all(&buf[..k]).unwrap();
                at += k as u64;
            }
        })
    };
    // curl reads its whole input before it sends (the length goes in the header): watch the
    // node's byte count instead.
    let bytes_in = |node: &NodeHandle| {
        let conns = node.ctl_json(&["conns"]).unwrap();
        conns[0]["bytes_in"].as_u64().unwrap_or(0)
    };
    eventually(60, "50 MB uploaded", || bytes_in(&a) > 50_000_000);
    let ids = local_ids(&a);
    assert_eq!(ids.len(), 1);
    migrate(&a, "b", ids[0]);
    assert!(bytes_in(&b) < n, "moved mid-stream");
    let mut reply = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut reply)
        .unwrap();
    writer.join().unwrap();
    assert!(
        child.wait().unwrap().success(),
        "curl failed; reply {reply:?}"
    );
    let json: serde_json::Value = serde_json::from_str(&reply).expect("JSON reply");
    assert_eq!(json["bytes"].as_u64(), Some(n), "{reply}");
    assert_eq!(
        json["crc32"].as_str(),
        Some(flowshift_tests::oracle::counting_crc32_hex(n).as_str()),
        "{reply}"
    );
    assert!(stat(&b, "app_bytes_in") > 0);
    assert!(stat(&a, "forwarded_to_owner") > 1000);
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn a_socat_echo_session_moves_back_and_forth_50_times() {
    ensure_tools(&["socat"]).unwrap();
    let (tb, a, b) = pair();
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("socat");
            c.args(["-b", "65536", "-", &format!("TCP:{SERVICE_ADDR}:7")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            c
        })
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // socat blocks writing its stdout while we write its stdin: read on a thread, so a round
    // larger than the pipes cannot deadlock the test, and a stalled connection fails it in
    // bounded time instead of hanging.
    let (tx, echoed) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    if tx.send(buf[..k].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let nodes = [(&a, "a"), (&b, "b")];
    let mut on = 0;
    for round in 0..50u64 {
        let chunk = noise(100_000 + round as usize * 1000, round + 1);
        stdin.write_all(&chunk).unwrap();
        stdin.flush().unwrap();
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            match echoed.recv_timeout(Duration::from_secs(30)) {
                Ok(part) => got.extend_from_slice(&part),
                Err(e) => panic!(
                    "round {round}: {} of {} bytes echoed, then {e} (closed or stalled)\n--- a ---\n{}\n--- b ---\n{}",
                    got.len(),
                    chunk.len(),
                    a.log(),
                    b.log()
                ),
            }
        }
        assert!(got == chunk, "round {round}: echoed bytes differ");
        let ids = local_ids(nodes[on].0);
        assert_eq!(
            ids.len(),
            1,
            "round {round}: one connection on {}",
            nodes[on].1
        );
        let to = 1 - on;
        migrate(nodes[on].0, nodes[to].1, ids[0]);
        on = to;
    }
    drop(stdin);
    // socat ends once both directions are closed.
    match echoed.recv_timeout(Duration::from_secs(30)) {
        Ok(rest) => panic!("{} bytes echoed beyond what was sent", rest.len()),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
        Err(e) => panic!("socat did not end after its stdin closed: {e}"),
    }
    reader.join().unwrap();
    assert!(child.wait().unwrap().success(), "socat failed");
    // 50 moves: 25 to b, 25 back home to a.
    assert_eq!(stat(&a, "conns_moved_out"), 25);
    assert_eq!(stat(&b, "conns_moved_out"), 25);
    assert_eq!(stat(&a, "conns_restored"), 25);
    assert_eq!(stat(&b, "conns_restored"), 25);
    assert_eq!(
        stat(&a, "tunnel_packets_refused") + stat(&b, "tunnel_packets_refused"),
        0
    );
}

#[test]
fn a_connection_with_a_zero_window_moves() {
    let (tb, a, _b) = pair();
    let addr = SocketAddr::from((SERVICE_ADDR, 19));
    let mut s = tb
        .client()
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Read nothing until the node's send buffer is full and the window is closed.
    eventually(20, "the source app blocked on a zero window", || {
        let conns = a.ctl_json(&["conns"]).unwrap();
        conns[0]["send_queue"].as_u64().unwrap_or(0) >= 60_000
    });
    let id = local_ids(&a)[0];
    migrate(&a, "b", id);
    std::thread::sleep(Duration::from_millis(300));
    let mut v = CountingVerifier::new();
    let mut buf = vec![0u8; 1 << 20];
    while v.offset() < 100_000_000 {
        let k = s.read(&mut buf).expect("read (reset?)");
        assert!(k > 0, "closed early");
        v.feed(&buf[..k]).expect("counting stream");
    }
}

#[test]
fn the_target_killed_mid_transfer_leaves_the_flow_on_the_source() {
    ensure_tools(&["curl", "nft"]).unwrap();
    let (tb, a, b) = pair();
    // A slow reader keeps the node's send buffer full: the state to transfer is large (tens
    // of KB), larger than what the router lets through below. Slow enough that a node on a
    // loaded machine still fills it.
    let mut child = curl_get(&tb, 30_000_000, &[]);
    let (received, reader) = verify_counting(child.stdout.take().unwrap(), Some(2_000_000));
    eventually(60, "4 MB downloaded", || {
        received.load(Ordering::Relaxed) > 4_000_000
    });
    eventually(30, "a's send buffer holding more than a datagram", || {
        a.ctl_json(&["conns"]).unwrap()[0]["send_queue"]
            .as_u64()
            .is_some_and(|q| q > 16_000)
    });
    // The state transfer (large tunnel datagrams from a to b) never arrives; small ones
    // (the offer, heartbeats) do: the migration stalls after the target accepted.
    tb.router()
        .exec("nft", &["add", "table", "ip", "fs_block"])
        .expect("nft table");
    tb.router()
        .exec(
            "nft",
            &[
                "add",
                "chain",
                "ip",
                "fs_block",
                "forward",
                "{ type filter hook forward priority 0; }",
            ],
        )
        .expect("nft chain");
    tb.router()
        .exec(
            "nft",
            &[
                "add",
                "rule",
                "ip",
                "fs_block",
                "forward",
                "ip",
                "saddr",
                "198.18.2.2",
                "ip",
                "daddr",
                "198.18.3.2",
                "udp",
                "dport",
                "51871",
                "meta",
                "length",
                ">",
                "600",
                "drop",
            ],
        )
        .expect("nft rule");
    let id = local_ids(&a)[0];
    let a_ctl = a.control_socket().to_owned();
    let bin = flowshift_tests::flowshift_bin().unwrap();
    let mig = std::thread::spawn(move || {
        std::process::Command::new(bin)
            .args(["ctl", "-s"])
            .arg(a_ctl)
            .args([
                "migrate",
                "--json",
                "--to",
                "b",
                "--conn",
                &format!("{id:#x}"),
            ])
            .output()
            .expect("ctl")
    });
    eventually(10, "the flow frozen on a", || {
        a.ctl_json(&["conns"]).unwrap()[0]["mode"] == "frozen"
    });
    // SIGKILL the target.
    let pid = b.pid();
    // SAFETY: kill(2) on the pid of the node this test started (still running: its
    // handle is alive).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = mig.join().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(report["moved"], 0, "{report}");
    assert_eq!(report["stayed"], 1, "{report}");
    assert!(
        report["conns"][0]["freeze_ms"].as_f64().is_some(),
        "{report}"
    );
    let total = reader.join().unwrap();
    curl_ok(child);
    assert_eq!(total, 30_000_000);
    let conns = a.ctl_json(&["status"]).unwrap();
    assert_eq!(conns["stats"]["conns_moved_out"], 0);
}

#[test]
fn drain_under_wrk_load_moves_200_keep_alive_connections_without_a_failed_request() {
    ensure_tools(&["wrk"]).unwrap();
    let (tb, a, b) = pair();
    // wrk's duration is only an upper bound: it is stopped with SIGINT (it then prints its
    // report) once b has served requests after the drain, however slow the machine.
    let wrk = tb
        .spawn({
            let mut c = tb.client().command("wrk");
            c.args([
                "-t2",
                "-c200",
                "-d120s",
                "--timeout",
                "10s",
                &format!("http://{SERVICE_ADDR}/bytes/2000"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c
        })
        .unwrap();
    eventually(30, "wrk's 200 connections on a", || {
        local_ids(&a).len() >= 200
    });
    eventually(30, "a serving wrk", || {
        stat(&a, "app_bytes_out") > 1_000_000
    });
    let report = a.ctl_json(&["drain", "--to", "b"]).expect("drain");
    assert_eq!(report["empty"], true, "{report}");
    assert!(report["moved"].as_u64().unwrap() >= 200, "{report}");
    assert!(local_ids(&a).is_empty());
    // Requests keep being served after the drain, by b, on the moved connections.
    let served = stat(&b, "app_bytes_out");
    eventually(30, "b serving 1 MB after the drain", || {
        stat(&b, "app_bytes_out") > served + 1_000_000
    });
    // SAFETY: SIGINT to the wrk process this test started (`ip netns exec` execs it).
    unsafe { libc::kill(wrk.id() as i32, libc::SIGINT) };
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk: {text}");
    assert!(text.contains("requests in"), "no wrk report: {text}");
    assert!(!text.contains("Socket errors"), "{text}");
    assert!(!text.contains("Non-2xx"), "{text}");
    assert_eq!(stat(&b, "tunnel_packets_refused"), 0, "{}", b.log());
}

#[test]
fn idle_parked_connections_drain_to_b_and_carry_on_byte_exact() {
    const N: usize = 40;
    let (tb, a, b) = pair();
    tb.client().run(|| {
        let addr = SocketAddr::from((SERVICE_ADDR, 7));
        let mut conns: Vec<TcpStream> = (0..N)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
            .collect();
        let first = noise(70_000, 3);
        let mut back = vec![0u8; first.len()];
        for c in &mut conns {
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            c.write_all(&first).unwrap();
            c.read_exact(&mut back).unwrap();
            assert!(back == first, "echo on a");
        }
        // Idle: compacted, then parked out of a's interface polls.
        eventually(30, "every connection parked on a", || {
            stat(&a, "parked") >= N as u64
        });
        let report = a.ctl_json(&["drain", "--to", "b"]).expect("drain");
        assert_eq!(report["empty"], true, "{report}");
        assert_eq!(report["moved"], N as u64, "{report}");
        assert!(local_ids(&a).is_empty());
        assert_eq!(local_ids(&b).len(), N);
        // Every connection carries on from b, both ways, byte-exact; no reset (a reset
        // fails the write or the read).
        let more = noise(150_000, 4);
        let mut back = vec![0u8; more.len()];
        for c in &mut conns {
            c.write_all(&more).unwrap();
            c.read_exact(&mut back).unwrap();
            assert!(back == more, "echo from b");
        }
    });
    assert_eq!(stat(&b, "conns_restored"), N as u64);
    assert_eq!(stat(&a, "unknown_flow_packets"), 0);
}

#[test]
fn with_direct_return_the_target_replies_straight_to_the_client() {
    ensure_tools(&["curl"]).unwrap();
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    let (a, b) = start_tunnel_pair_with(
        &tb,
        NodeConfig::standard("a"),
        NodeConfig::standard("b"),
        true,
    )
    .expect("nodes");
    wait_alive(&a, &b, Duration::from_secs(10)).expect("tunnel up");
    // The client's receive buffer is small: what a sent before the move and the client
    // had not read yet is at most its window.
    tb.client()
        .sysctl("net.ipv4.tcp_rmem", "4096 65536 131072")
        .unwrap();
    let n = 500_000_000;
    let (_, at_move) = download_moved(&tb, &a, n, 50_000_000);
    // b's replies went out of its own TUN device (every byte after the move, headers
    // aside, less what a had sent into the client's window before it), not back through a.
    assert!(
        stat(&b, "bytes_out") >= n - at_move - 131_072,
        "b wrote {} bytes to its TUN, {} were left after the move",
        stat(&b, "bytes_out"),
        n - at_move
    );
    assert!(
        stat(&b, "forwarded_to_ingress") < 100,
        "b sent {} packets back through a",
        stat(&b, "forwarded_to_ingress")
    );
    assert!(stat(&a, "relayed_from_owner") < 100);
    assert!(stat(&a, "forwarded_to_owner") > 1000);
    // The client's ACKs crossed in shared records (the rate depends on how many a worker
    // reads per turn, so it is shown, not asserted).
    let (to_b, from_a) = (peer(&a, "b").unwrap(), peer(&b, "a").unwrap());
    assert_eq!(to_b["packs_datagrams"], true, "{to_b}");
    assert_eq!(from_a["packs_datagrams"], true, "{from_a}");
    eprintln!(
        "{} client packets forwarded a -> b in {} records",
        stat(&a, "forwarded_to_owner"),
        from_a["rx_records"]
    );
}

#[test]
fn a_target_without_room_refuses_and_the_connection_stays() {
    ensure_tools(&["curl"]).unwrap();
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    // b holds one connection at most, and has one already (its own client on port 7).
    let (a, b) = start_tunnel_pair_with(
        &tb,
        NodeConfig::standard("a"),
        NodeConfig::standard("b").max_connections(1),
        false,
    )
    .expect("nodes");
    wait_alive(&a, &b, Duration::from_secs(10)).expect("tunnel up");
    tb.route_service_to(flowshift_tests::Node::B).unwrap();
    let addr = SocketAddr::from((SERVICE_ADDR, 7));
    let _held = tb
        .client()
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .expect("connect to b");
    eventually(5, "b holds its connection", || local_ids(&b).len() == 1);
    tb.route_service_to(flowshift_tests::Node::A).unwrap();
    let mut child = curl_get(&tb, 300_000_000, &[]);
    let (received, reader) = verify_counting(child.stdout.take().unwrap(), None);
    eventually(60, "30 MB downloaded", || {
        received.load(Ordering::Relaxed) > 30_000_000
    });
    let id = local_ids(&a)[0];
    let report = a
        .ctl_json(&["migrate", "--to", "b", "--conn", &format!("{id:#x}")])
        .expect("migrate");
    assert_eq!(report["moved"], 0, "{report}");
    assert_eq!(report["conns"][0]["reason"], "no capacity", "{report}");
    // Refused before anything was frozen; still served by a.
    assert!(report["conns"][0]["freeze_ms"].is_null(), "{report}");
    assert_eq!(local_ids(&a), vec![id]);
    assert_eq!(reader.join().unwrap(), 300_000_000);
    curl_ok(child);
    assert_eq!(stat(&a, "conns_moved_out"), 0);
}

#[test]
fn moves_complete_under_10_percent_loss_on_the_tunnel_path() {
    ensure_tools(&["curl", "nft"]).unwrap();
    let (tb, a, b) = pair();
    let n: u64 = 2_000_000_000;
    let mut child = curl_get(&tb, n, &[]);
    let (received, reader) = verify_counting(child.stdout.take().unwrap(), None);
    eventually(60, "20 MB downloaded", || {
        received.load(Ordering::Relaxed) > 20_000_000
    });
    // Only the tunnel between the nodes loses packets: the protocol's messages and the
    // forwarded packets cross it, the client's own link is clean.
    tb.set_router_loss_matching(10, &["udp", "dport", "51871"])
        .unwrap();
    let nodes = [(&a, "a"), (&b, "b")];
    for round in 0..6 {
        let (from, to) = (nodes[round % 2], nodes[(round + 1) % 2]);
        let ids = local_ids(from.0);
        assert_eq!(ids.len(), 1, "round {round}");
        let r = from
            .0
            .ctl_json(&["migrate", "--to", to.1, "--conn", &format!("{:#x}", ids[0])])
            .expect("migrate");
        assert_eq!(r["moved"], 1, "round {round}: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let drops = tb.router_loss_drops().unwrap();
    tb.clear_router_loss();
    assert!(drops > 0, "the tunnel lost nothing");
    assert!(received.load(Ordering::Relaxed) < n, "moved mid-stream");
    assert_eq!(reader.join().unwrap(), n);
    curl_ok(child);
    assert_eq!(stat(&a, "conns_moved_out"), 3);
    assert_eq!(stat(&b, "conns_moved_out"), 3);
}

#[test]
fn a_download_moves_a_to_b_to_c_and_home_byte_exact() {
    ensure_tools(&["curl"]).unwrap();
    let tb = Testbed::new(TestbedOptions {
        node_c: true,
        ..Default::default()
    })
    .expect("testbed");
    let [a, b, c] = start_tunnel_trio(&tb).expect("nodes");
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        wait_alive(x, y, Duration::from_secs(10)).expect("tunnel up");
    }
    let n: u64 = 400_000_000;
    let mut child = curl_get(&tb, n, &[]);
    let (received, reader) = verify_counting(child.stdout.take().unwrap(), None);
    let past = |bytes: u64, what: &str| {
        eventually(120, what, || received.load(Ordering::Relaxed) > bytes);
    };
    past(20_000_000, "20 MB from a");
    let on_a = local_ids(&a);
    assert_eq!(on_a.len(), 1);
    migrate(&a, "b", on_a[0]);
    past(60_000_000, "40 MB more, from b");
    let on_b = local_ids(&b);
    assert_eq!(on_b.len(), 1);
    // b -> c: the client's packets enter at a, neither source nor target.
    let report = migrate(&b, "c", on_b[0]);
    let on_c = local_ids(&c);
    assert_eq!(on_c.len(), 1, "{report}");
    past(100_000_000, "40 MB more, from c");
    // a was told: it forwards to c, not through b.
    let row = a.ctl_json(&["conns"]).unwrap()[0].clone();
    assert_eq!(row["mode"], "moved", "{row}");
    assert_eq!(row["lives_on"], "c", "{row}");
    let through_b = stat(&b, "forwarded_to_owner");
    past(140_000_000, "40 MB more, from c");
    assert!(
        stat(&b, "forwarded_to_owner") <= through_b + 10,
        "a still forwards through b"
    );
    assert!(stat(&c, "forwarded_to_ingress") > 1000);
    // c -> a: home.
    migrate(&c, "a", on_c[0]);
    let at_home = received.load(Ordering::Relaxed);
    assert!(at_home < n, "moved mid-stream");
    assert_eq!(local_ids(&a), on_a, "the connection keeps its id at home");
    let total = reader.join().unwrap();
    curl_ok(child);
    assert_eq!(total, n);
    for (node, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        assert_eq!(
            stat(node, "tunnel_packets_refused"),
            0,
            "node {name}\n{}",
            node.log()
        );
        assert_eq!(stat(node, "conns_moved_out"), 1, "node {name}");
        assert_eq!(stat(node, "conns_restored"), 1, "node {name}");
    }
    // Nothing of the connection is left on c; b's forwarding entry goes once idle.
    eventually(10, "c empty", || {
        c.ctl_json(&["conns"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    });
}
