//! End-to-end tests of one node with real clients (curl, socat, wrk, kernel sockets) in the
//! namespace testbed. They need root and fail with a message saying so without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use flowshift_tests::oracle::{CountingVerifier, counting_crc32_hex, counting_fill, crc32_hex};
use flowshift_tests::testbed::{CLIENT_ADDR, SERVICE_ADDR};
use flowshift_tests::{Node, NodeConfig, NodeHandle, Testbed, TestbedOptions, ensure_tools};

fn setup(config: NodeConfig) -> (Testbed, NodeHandle) {
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    let node = tb.start_node(Node::A, &config).expect("node a");
    (tb, node)
}

fn service(port: u16) -> SocketAddr {
    SocketAddr::from((SERVICE_ADDR, port))
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&service(port), Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Deterministic pseudo-random bytes (xorshift), so echo tests are not fooled by patterns.
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

fn stat(node: &NodeHandle, key: &str) -> u64 {
    let s = node.ctl_json(&["status"]).expect("status");
    s["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{key} in {s}"))
}

/// A metric's value from `ctl metrics` (Prometheus text), by exact series name.
fn metric(node: &NodeHandle, series: &str) -> u64 {
    let text = node.ctl(&["metrics"]).expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Polls `f` every 20 ms until it is true; panics after `secs` (a liveness bound, not a timing
/// assertion: the conditions are reached in milliseconds when things work).
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not reached within {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A single download is limited by its send buffer (curl's kernel window is larger, the
/// `http` app always has more): the node grows the buffer, once, without a reset. With 16 KiB
/// buffers, so that the client keeps up even when the machine is busy (when curl reads late
/// its window holds the flow instead, and rightly nothing grows: seen under load with the
/// default 256 KiB).
#[test]
fn curl_downloads_200_mb_byte_exact_and_its_send_buffer_grows_once() {
    let config = NodeConfig::standard("a")
        .tcp_buffers(16 << 10)
        .tx_buffer_max(64 << 10);
    let (_tb, node) = curl_download(config);
    let grown = (stat(&node, "tx_grown"), stat(&node, "tx_grow_abandoned"));
    assert_eq!(grown, (1, 0), "(grown, abandoned)\n{}", node.log());
}

#[test]
fn curl_downloads_200_mb_byte_exact_without_tun_offload() {
    curl_download(NodeConfig::standard("a").offload(false));
}

/// With `tcp.tx_buffer_max` equal to the buffer, nothing grows.
#[test]
fn curl_downloads_200_mb_byte_exact_with_send_buffer_growth_off() {
    let (_tb, node) = curl_download(NodeConfig::standard("a").tx_buffer_max(256 << 10));
    assert_eq!(stat(&node, "tx_grown"), 0);
}

/// A growth budget too small for one growth per worker is said at start (nothing would
/// ever grow otherwise, silently); the node serves as usual.
#[test]
fn a_growth_budget_smaller_than_one_growth_per_worker_is_warned_about() {
    let config = NodeConfig::standard("a")
        .workers(2)
        .extra("[tcp]\ntx_grow_budget = 1048576\n");
    let (_tb, node) = curl_download(config);
    let log = node.log();
    assert!(log.contains("no send buffer will grow"), "{log}");
    assert_eq!(stat(&node, "tx_grown"), 0);
}

fn curl_download(config: NodeConfig) -> (Testbed, NodeHandle) {
    ensure_tools(&["curl"]).unwrap();
    let (tb, node) = setup(config);
    let n: u64 = 200_000_000;
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("curl");
            c.args([
                "-sS",
                "--fail",
                "--max-time",
                "120",
                &format!("http://{SERVICE_ADDR}/bytes/{n}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c
        })
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut v = CountingVerifier::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = out.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        v.feed(&buf[..k]).unwrap();
    }
    let status = child.wait().unwrap();
    let err = stderr_of(&mut child);
    assert!(status.success(), "curl failed: {status} {err}");
    assert_eq!(v.offset(), n);
    assert!(stat(&node, "app_bytes_out") >= n);
    (tb, node)
}

/// With TUN offload the kernel hands the node merged ~64 KB packets, and the app takes most
/// of each straight from the packet (direct receive).
#[test]
fn curl_uploads_100_mb_the_crc_matches_and_most_bytes_skip_smoltcps_copy() {
    let (_tb, node, n) = curl_upload(NodeConfig::standard("a"));
    let direct = stat(&node, "rx_direct_bytes");
    assert!(
        direct > n / 2,
        "{direct} of {n} bytes taken straight from packets"
    );
}

#[test]
fn curl_uploads_100_mb_and_the_crc_matches_without_direct_receive() {
    let (_tb, node, _) = curl_upload(NodeConfig::standard("a").direct_receive(false));
    assert_eq!(stat(&node, "rx_direct_bytes"), 0);
}

#[test]
fn curl_uploads_100_mb_and_the_crc_matches_without_tun_offload() {
    curl_upload(NodeConfig::standard("a").offload(false));
}

/// Uploads 100 MB of the counting stream with curl to `/upload` and checks the reply's byte
/// count and CRC; returns the testbed and the node (still running) and the byte count.
fn curl_upload(config: NodeConfig) -> (Testbed, NodeHandle, u64) {
    ensure_tools(&["curl"]).unwrap();
    let (tb, node) = setup(config);
    let n: u64 = 100_000_000;
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("curl");
            c.args([
                "-sS",
                "--fail",
                "--max-time",
                "120",
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
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < n {
            let k = (n - at).min(buf.len() as u64) as usize;
            counting_fill(at, &mut buf[..k]);
            stdin.write_all(&buf[..k]).unwrap();
            at += k as u64;
        }
    });
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
        Some(counting_crc32_hex(n).as_str()),
        "{reply}"
    );
    // Linux kept to the window the node advertised: nothing was cut.
    assert_eq!(stat(&node, "rx_beyond_window"), 0);
    (tb, node, n)
}

/// Reads one HTTP/1.1 response with Content-Length; returns (status, body).
fn read_response(r: &mut BufReader<TcpStream>) -> (u16, Vec<u8>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect(&line);
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, body)
}

#[test]
fn a_hundred_keep_alive_clients_make_a_hundred_requests_each() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    let ok = tb.client().run(|| {
        let handles: Vec<_> = (0..100)
            .map(|c| {
                std::thread::spawn(move || {
                    let s = connect(80);
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    let mut ok = 0;
                    for i in 0..100 {
                        let n = 1 + (c * 131 + i * 17) % 5000;
                        write!(w, "GET /bytes/{n} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                        let (status, body) = read_response(&mut r);
                        assert_eq!(status, 200);
                        assert_eq!(body.len(), n);
                        CountingVerifier::new().feed(&body).unwrap();
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .sum::<usize>()
    });
    assert_eq!(ok, 10_000);
    // Keep-alive: one connection per client.
    assert_eq!(stat(&node, "conns_accepted"), 100);
}

#[test]
fn socat_echo_session_of_10_mb_is_byte_exact() {
    ensure_tools(&["socat"]).unwrap();
    let (tb, _node) = setup(NodeConfig::standard("a"));
    let data = noise(10_000_000, 42);
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("socat");
            c.args([
                "-b",
                "65536",
                "-t",
                "10",
                "-",
                &format!("TCP:{SERVICE_ADDR}:7"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
            c
        })
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let mut got = Vec::new();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < data.len() {
        let k = out.read(&mut buf).unwrap();
        assert!(k > 0, "socat closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..k]);
    }
    writer.join().unwrap();
    assert!(got == data, "echoed bytes differ");
    assert!(child.wait().unwrap().success());
}

#[test]
fn source_and_sink_through_kernel_sockets() {
    let n = 10_000_000u64;
    let (tb, _node) = setup(NodeConfig::standard("a").source_bytes(1919, n));
    tb.client().run(|| {
        // source with bytes = N: exactly N bytes of the counting stream, then FIN.
        let mut s = connect(1919);
        let mut v = CountingVerifier::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = s.read(&mut buf).expect("no reset");
            if k == 0 {
                break;
            }
            v.feed(&buf[..k]).unwrap();
        }
        assert_eq!(v.offset(), n);

        // source forever: read a while, then close.
        let mut s = connect(19);
        let mut v = CountingVerifier::new();
        while v.offset() < 3_000_000 {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            v.feed(&buf[..k]).unwrap();
        }
        drop(s);

        // sink: bytes and CRC after the half-close.
        let data = noise(7_777_777, 9);
        let mut s = connect(9);
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut line = String::new();
        s.read_to_string(&mut line).expect("no reset");
        assert_eq!(line, format!("{} {}\n", data.len(), crc32_hex(&data)));
    });
}

#[test]
fn closed_port_gets_rst() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    tb.client().run(|| {
        let e = TcpStream::connect_timeout(&service(81), Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    });
    assert_eq!(
        metric(
            &node,
            "flowshift_connections_refused_total{reason=\"no_service\"}"
        ),
        1
    );
}

#[test]
fn max_connections_is_enforced_and_existing_connections_carry_on() {
    let (tb, node) = setup(NodeConfig::standard("a").max_connections(5));
    tb.client().run(|| {
        let mut open: Vec<TcpStream> = (0..5).map(|_| connect(7)).collect();
        for s in &mut open {
            s.write_all(b"hi").unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"hi");
        }
        let e = TcpStream::connect_timeout(&service(7), Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        for s in &mut open {
            s.write_all(b"still").unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"still");
        }
        // Closing one frees a slot.
        drop(open.pop());
        eventually(10, "a slot frees", || stat(&node, "conns_closed") == 1);
        let mut s = connect(7);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
    });
    assert_eq!(
        metric(
            &node,
            "flowshift_connections_refused_total{reason=\"max_connections\"}"
        ),
        1
    );
}

/// Builds an IPv4 packet (the kernel fills the IP checksum and length for raw sockets).
fn ip_packet(proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34];
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&CLIENT_ADDR.octets());
    p.extend_from_slice(&SERVICE_ADDR.octets());
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

/// A raw IPv4 socket (the caller builds the IP header; the kernel fills its checksum and
/// length) sending to the service address: from the node namespace, packets are routed into
/// the TUN device.
struct RawSocket(std::os::fd::OwnedFd);

impl RawSocket {
    fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); checked below and owned by the result.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        RawSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
    }

    fn send(&self, packet: &[u8]) {
        use std::os::fd::AsRawFd;
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(SERVICE_ADDR).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `dst` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            n,
            packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The five kinds of garbage, for source port `port`: a bad TCP checksum, UDP, a first
/// fragment, a truncated TCP header, and a data offset beyond the packet. Counted by the node
/// as `bad_checksum`, `not_tcp`, `fragment`, `malformed` and `malformed`.
fn garbage(port: u16) -> [Vec<u8>; 5] {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&port.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    let mut long = t.clone();
    long[12] = 15 << 4; // data offset beyond the packet
    // A checksum that is certainly wrong (a fixed value, zero say, is right for one port in
    // 65,536: a million packets would open connections).
    let mut bad = t.clone();
    let right = tcp_checksum(CLIENT_ADDR, SERVICE_ADDR, &t);
    bad[16..18].copy_from_slice(&(right ^ 0x00ff).to_be_bytes());
    [
        ip_packet(6, 0, &bad),
        ip_packet(17, 0, &[0, 53, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4]),
        ip_packet(6, 0x2000, &t),
        ip_packet(6, 0, &t[..9]),
        ip_packet(6, 0, &long),
    ]
}

#[test]
fn garbage_into_the_tun_does_not_disturb_a_transfer() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (tb, node) = setup(NodeConfig::standard("a"));
    // A download from `source` (endless) runs before, during and after the garbage: the
    // client reads until the garbage is all sent, then 10 MB more, every byte verified.
    let received = AtomicU64::new(0);
    let garbage_sent = AtomicBool::new(false);
    std::thread::scope(|s| {
        let transfer = s.spawn(|| {
            tb.client().run(|| {
                let mut c = connect(19);
                let mut v = CountingVerifier::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut stop_at = u64::MAX;
                let mut total = 0u64;
                while total < stop_at {
                    let k = match c.read(&mut buf) {
                        Ok(0) => panic!("source closed the connection after {total} bytes"),
                        Ok(k) => k,
                        Err(e) => panic!("connection failed after {total} bytes: {e}"),
                    };
                    v.feed(&buf[..k]).unwrap();
                    total += k as u64;
                    received.store(total, Ordering::Relaxed);
                    if stop_at == u64::MAX && garbage_sent.load(Ordering::Relaxed) {
                        stop_at = total + 10_000_000;
                    }
                }
                total
            })
        });
        eventually(10, "transfer started", || {
            received.load(Ordering::Relaxed) > 1_000_000
        });
        let reasons = ["bad_checksum", "not_tcp", "fragment", "malformed"];
        let drops = |reason: &str| {
            metric(
                &node,
                &format!("flowshift_packets_dropped_total{{reason=\"{reason}\"}}"),
            )
        };
        // One metrics request on the control socket (no process): the sender below paces on it.
        let counted = || {
            let text = node
                .request(&serde_json::json!({"cmd": "metrics"}))
                .expect("metrics");
            let text = text.as_str().expect("metrics text");
            reasons
                .iter()
                .map(|r| {
                    let series = format!("flowshift_packets_dropped_total{{reason=\"{r}\"}}");
                    text.lines()
                        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.strip_prefix(' ')))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or_else(|| panic!("no series {series}"))
                })
                .sum::<u64>()
        };
        assert_eq!(counted(), 0, "drops before the garbage");
        let tun_dropped = || {
            let link = tb
                .node_a()
                .ip(&["-s", "-j", "link", "show", "fs0"])
                .unwrap();
            let link: serde_json::Value = serde_json::from_str(&link).unwrap();
            link[0]["stats64"]["tx"]["dropped"].as_u64().unwrap()
        };
        let tun_dropped_before = tun_dropped();
        tb.node_a().run(|| {
            let raw = RawSocket::new();
            for chunk in 0..20u16 {
                for i in chunk * 10..(chunk + 1) * 10 {
                    for p in garbage(40000 + i) {
                        raw.send(&p);
                    }
                }
                // Paced: the node counts each chunk before the next, so the TUN device's
                // queue (500 packets) never overflows and every packet reaches the node.
                let sent = u64::from(chunk + 1) * 50;
                eventually(10, "the garbage counted", || counted() >= sent);
            }
        });
        garbage_sent.store(true, Ordering::Relaxed);
        let total = transfer.join().expect("transfer");
        assert!(total > 11_000_000, "{total}");
        // Every garbage packet reached the node and was counted under its reason, exactly.
        assert_eq!(
            tun_dropped(),
            tun_dropped_before,
            "the TUN queue overflowed"
        );
        for (reason, want) in [
            ("bad_checksum", 200),
            ("not_tcp", 200),
            ("fragment", 200),
            ("malformed", 400),
        ] {
            assert_eq!(drops(reason), want, "{reason}");
        }
    });
    // None of the garbage became a connection.
    assert_eq!(stat(&node, "conns_accepted"), 1);
}

#[test]
fn a_million_malformed_packets_during_a_transfer_are_all_counted_and_the_transfer_is_byte_exact() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const ROUNDS: u64 = 200_000; // five packets each
    let (tb, node) = setup(NodeConfig::standard("a"));
    let received = AtomicU64::new(0);
    let garbage_sent = AtomicBool::new(false);
    let reasons = ["bad_checksum", "not_tcp", "fragment", "malformed"];
    let drops = |reason: &str| {
        metric(
            &node,
            &format!("flowshift_packets_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    let counted = || reasons.iter().map(|r| drops(r)).sum::<u64>();
    let tun_dropped = || {
        let link = tb
            .node_a()
            .ip(&["-s", "-j", "link", "show", "fs0"])
            .unwrap();
        let link: serde_json::Value = serde_json::from_str(&link).unwrap();
        link[0]["stats64"]["tx"]["dropped"].as_u64().unwrap()
    };
    std::thread::scope(|s| {
        let transfer = s.spawn(|| {
            tb.client().run(|| {
                let mut c = connect(19);
                let mut v = CountingVerifier::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut stop_at = u64::MAX;
                while v.offset() < stop_at {
                    let k = match c.read(&mut buf) {
                        Ok(0) => panic!("source closed the connection after {}", v.offset()),
                        Ok(k) => k,
                        Err(e) => panic!("connection failed after {} bytes: {e}", v.offset()),
                    };
                    v.feed(&buf[..k]).unwrap();
                    received.store(v.offset(), Ordering::Relaxed);
                    if stop_at == u64::MAX && garbage_sent.load(Ordering::Relaxed) {
                        stop_at = v.offset() + 10_000_000;
                    }
                }
                v.offset()
            })
        });
        // However this ends (a failed assertion included), the reader stops: a scope waits
        // for it before passing a panic on.
        struct StopReader<'a>(&'a AtomicBool);
        impl Drop for StopReader<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop_reader = StopReader(&garbage_sent);
        eventually(10, "transfer started", || {
            received.load(Ordering::Relaxed) > 1_000_000
        });
        assert_eq!(counted(), 0, "drops before the garbage");
        let tun_dropped_before = tun_dropped();
        let start = Instant::now();
        tb.node_a().run(|| {
            let raw = RawSocket::new();
            let mut at_queue = 0;
            for round in 0..ROUNDS {
                for p in garbage(1024 + (round % 60_000) as u16) {
                    raw.send(&p);
                }
                // Paced: at most two bursts of 500 packets ahead of what the node has
                // counted, so that nearly all of it reaches the node rather than overflowing
                // the kernel's TUN queue (500 packets; what does is counted there, below),
                // however slow a loaded machine makes the node.
                // The queue's drop count costs a process to read: read again only when the
                // node's own count is short.
                if round % 100 == 99 {
                    let sent = (round + 1) * 5;
                    eventually(30, "the node keeping up", || {
                        if counted() + at_queue + 1_000 >= sent {
                            return true;
                        }
                        at_queue = tun_dropped() - tun_dropped_before;
                        false
                    });
                }
            }
        });
        let sent = ROUNDS * 5;
        // Every packet is accounted for: counted by the node under its reason, or dropped by
        // the kernel at the TUN queue before the node could read it (see below).
        let accounted = || counted() + (tun_dropped() - tun_dropped_before);
        let deadline = Instant::now() + Duration::from_secs(30);
        while accounted() < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The TUN queue also carries the download's ACKs, and the kernel counts those it drops
        // with the rest: the queue's drops may exceed the garbage it dropped, by the few ACKs
        // caught in the same overflows, never fall short of it.
        let per_reason: Vec<(&str, u64)> = reasons.iter().map(|r| (*r, drops(r))).collect();
        let (node_counted, queue) = (counted(), tun_dropped() - tun_dropped_before);
        assert!(
            node_counted <= sent
                && node_counted + queue >= sent
                && node_counted + queue <= sent + 1_000,
            "node: {per_reason:?}, TUN queue drops {queue}, sent {sent}"
        );
        let at_tun = tun_dropped() - tun_dropped_before;
        eprintln!(
            "{sent} malformed packets in {:.1} s: {} counted by the node, {at_tun} dropped at the TUN queue",
            start.elapsed().as_secs_f64(),
            counted()
        );
        drop(stop_reader);
        let total = transfer.join().expect("transfer");
        assert!(total > 11_000_000, "{total}");
        // Per reason, within what was sent of each kind (the kernel may have dropped some).
        for (reason, want) in [
            ("bad_checksum", ROUNDS),
            ("not_tcp", ROUNDS),
            ("fragment", ROUNDS),
            ("malformed", 2 * ROUNDS),
        ] {
            let got = drops(reason);
            assert!(
                got <= want && got + at_tun >= want,
                "{reason}: {got} of {want}"
            );
        }
        // Nearly all of it reached the node (the test is about the node, not the kernel).
        assert!(
            at_tun * 100 <= sent,
            "{at_tun} of {sent} dropped at the TUN queue"
        );
    });
    // None of it became a connection, and the node is still answering.
    assert_eq!(stat(&node, "conns_accepted"), 1);
    tb.client().run(|| {
        let mut c = connect(7);
        c.write_all(b"still here").unwrap();
        let mut back = [0u8; 10];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still here");
    });
}

#[test]
fn ctl_conns_shows_live_connections_with_byte_counts() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    tb.client().run(|| {
        let mut echo = connect(7);
        let data = noise(12_345, 1);
        echo.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        echo.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        let mut sink = connect(9);
        sink.write_all(&noise(54_321, 2)).unwrap();

        let echo_client = echo.local_addr().unwrap().to_string();
        let sink_client = sink.local_addr().unwrap().to_string();
        let find = |conns: &serde_json::Value, client: &str| -> serde_json::Value {
            conns
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["client"] == client)
                .cloned()
                .unwrap_or_default()
        };
        eventually(10, "sink bytes counted", || {
            let conns = node.ctl_json(&["conns"]).unwrap();
            find(&conns, &sink_client)["bytes_in"] == 54_321
        });
        let conns = node.ctl_json(&["conns"]).unwrap();
        assert_eq!(conns.as_array().unwrap().len(), 2, "{conns}");
        let e = find(&conns, &echo_client);
        assert_eq!(e["service"], format!("{SERVICE_ADDR}:7"));
        assert_eq!(e["app"], "echo");
        assert_eq!(e["state"], "ESTABLISHED");
        assert_eq!(e["bytes_in"], 12_345);
        assert_eq!(e["bytes_out"], 12_345);
        assert_eq!(e["send_queue"], 0);
        let s = find(&conns, &sink_client);
        assert_eq!(s["app"], "sink");
        assert_eq!(s["bytes_out"], 0);
        let table = node.ctl(&["conns"]).unwrap();
        assert!(
            table.contains(&echo_client) && table.contains(&sink_client),
            "{table}"
        );
        assert!(table.contains("2 connection(s)"), "{table}");
        drop((echo, sink));
    });
}

#[test]
fn sigterm_closes_gracefully_and_leaves_nothing_behind() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    let socket = node.control_socket().to_owned();
    let names = tb.namespace_names();
    let status = tb.client().run(|| {
        let mut s = connect(19);
        let mut buf = vec![0u8; 1 << 16];
        s.read_exact(&mut buf).unwrap();
        let mut v = CountingVerifier::new();
        v.feed(&buf).unwrap();
        // SIGTERM while the client keeps reading (a client that stops reading would hold the
        // FIN behind a full window until the deadline, and then be reset): the connection
        // is closed with FIN, not reset, so reading ends with EOF, every byte verified.
        std::thread::scope(|scope| {
            let stopping = scope.spawn(|| node.terminate().expect("node stops"));
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => v.feed(&buf[..k]).unwrap(),
                    Err(e) => panic!("connection reset instead of closed: {e}"),
                }
            }
            stopping.join().expect("terminate")
        })
    });
    assert!(status.success(), "node exited with {status}");
    assert!(
        tb.node_a().ip(&["link", "show", "fs0"]).is_err(),
        "TUN device left behind"
    );
    let routes = tb.node_a().ip(&["route", "show"]).unwrap();
    assert!(
        !routes.contains(&SERVICE_ADDR.to_string()),
        "route left behind: {routes}"
    );
    assert!(!socket.exists(), "control socket left behind");
    drop(tb);
    let left = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for n in names {
        assert!(!left.contains(&n), "namespace {n} left behind");
    }
}

#[test]
fn wrk_keep_alive_load_has_no_errors() {
    ensure_tools(&["wrk"]).unwrap();
    let (tb, node) = setup(NodeConfig::standard("a"));
    let out = tb
        .client()
        .exec(
            "wrk",
            &[
                "-t1",
                "-c10",
                "-d2s",
                &format!("http://{SERVICE_ADDR}/health"),
            ],
        )
        .expect("wrk");
    assert!(!out.contains("Socket errors"), "{out}");
    assert!(!out.contains("Non-2xx"), "{out}");
    let requests: u64 = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in")
                .map(|(n, _)| n.trim().parse().unwrap_or(0))
        })
        .expect(&out);
    assert!(requests > 0, "{out}");
    // wrk opens its 10 connections (and may probe with one more before it starts).
    assert!((10..=11).contains(&stat(&node, "conns_accepted")));
    assert_eq!(
        metric(
            &node,
            "flowshift_connections_refused_total{reason=\"max_connections\"}"
        ),
        0
    );
}

#[test]
fn metrics_are_served_over_http_and_control_survives_garbage() {
    ensure_tools(&["curl"]).unwrap();
    let (tb, node) = setup(NodeConfig::standard("a").metrics_listen("127.0.0.1:9464"));
    let text = tb
        .node_a()
        .exec("curl", &["-sS", "--fail", "http://127.0.0.1:9464/metrics"])
        .unwrap();
    assert!(text.contains("flowshift_tun_packets_in_total"), "{text}");
    assert!(text.contains("# EOF"), "{text}");
    // Garbage on the control socket gets an error reply and the node carries on.
    let mut s = std::os::unix::net::UnixStream::connect(node.control_socket()).unwrap();
    s.write_all(b"{\"cmd\":\"reboot\"}\n\x00\x01garbage\n")
        .unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
    }
    assert!(node.ctl(&["status"]).unwrap().contains("max_connections"));
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Writes `chunk` until a write stalls for half a second; returns the bytes written.
fn write_until_stalled(s: &mut TcpStream, chunk: &[u8], limit: usize) -> usize {
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sent = 0;
    loop {
        match s.write(chunk) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return sent;
            }
            Err(e) => panic!("write failed after {sent} bytes: {e}"),
        }
        assert!(
            sent < limit,
            "{sent} bytes written and the peer still accepts more: unbounded buffering"
        );
    }
}

#[test]
fn a_client_that_never_reads_cannot_make_the_node_buffer_without_bound() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    let before = rss_bytes(node.pid());
    tb.client().run(|| {
        // echo: everything is returned, so a client that never reads stalls itself.
        let mut echo = connect(7);
        let sent = write_until_stalled(&mut echo, &vec![7u8; 1 << 16], 100 << 20);
        // http: a pipelining client that never reads its responses.
        let mut http = connect(80);
        let request = b"GET /bytes/1000000 HTTP/1.1\r\nHost: t\r\n\r\n".repeat(64);
        let pipelined = write_until_stalled(&mut http, &request, 100 << 20);
        eprintln!("stalled after {sent} bytes to echo, {pipelined} bytes of requests to http");

        // Others are still served.
        let mut other = connect(7);
        other.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        other.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        drop((echo, http));
    });
    let grown = rss_bytes(node.pid()).saturating_sub(before);
    assert!(grown < 16 << 20, "node RSS grew by {grown} bytes");
}

#[test]
fn attaches_to_an_existing_tun_device_and_leaves_it_in_place() {
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    // An operator-made persistent, multiqueue TUN device (the node runs two workers).
    tb.node_a()
        .ip(&["tuntap", "add", "dev", "fs0", "mode", "tun", "multi_queue"])
        .unwrap();
    let node = tb
        .start_node(Node::A, &NodeConfig::standard("a").workers(2))
        .expect("node a");
    tb.client().run(|| {
        let mut s = connect(7);
        s.write_all(b"attached").unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"attached");
    });
    assert!(node.terminate().unwrap().success());
    // The device was not ours to remove; our route was.
    assert!(
        tb.node_a().ip(&["link", "show", "fs0"]).is_ok(),
        "pre-existing TUN device removed"
    );
    let routes = tb.node_a().ip(&["route", "show"]).unwrap();
    assert!(
        !routes.contains(&SERVICE_ADDR.to_string()),
        "route left behind: {routes}"
    );
}

#[test]
fn an_idle_node_sleeps() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    // Leave one idle connection open, as well.
    let _idle = tb.client().run(|| connect(7));
    let cpu = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        (f[0] + f[1]) as f64 / 100.0
    };
    let before = cpu(node.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu(node.pid()) - before;
    // Timers come from smoltcp's poll_at and a 1 s sweep: a busy loop would burn ~6 s here.
    assert!(used < 0.3, "idle node used {used} CPU seconds in 3 s");
}

/// What `child` (spawned with a piped stderr) printed there.
fn stderr_of(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// Starts `flowshift node --config config` in node-a and waits (at most 15 s) for it to exit;
/// returns whether it succeeded and what it printed.
fn run_second_node(tb: &Testbed, config: &std::path::Path) -> (bool, String) {
    let bin = flowshift_tests::flowshift_bin().unwrap();
    let mut cmd = tb.node_a().command(bin.to_str().unwrap());
    cmd.args(["node", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = tb.spawn(cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a second node on the same device kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = stderr_of(&mut child);
    (status.success(), err)
}

#[test]
fn a_second_node_is_refused_and_leaves_the_first_untouched() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    let echo = || {
        tb.client().run(|| {
            let mut s = connect(7);
            s.write_all(b"still here").unwrap();
            let mut b = [0u8; 10];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"still here");
        })
    };
    echo();
    // The same config: its control socket is in use.
    let (ok, err) = run_second_node(&tb, node.config_path());
    assert!(!ok, "second node started: {err}");
    assert!(err.contains("in use by a running node"), "{err}");
    assert!(node.control_socket().exists(), "control socket removed");
    echo();
    // Another control socket, the same TUN device and service address: the route is not
    // taken over (nor removed on the way out).
    let other = tb.dir().join("a2.toml");
    std::fs::write(
        &other,
        NodeConfig::standard("a2").to_toml(&tb.dir().join("a2.sock")),
    )
    .unwrap();
    let (ok, err) = run_second_node(&tb, &other);
    assert!(!ok, "second node started: {err}");
    assert!(err.contains("exists already"), "{err}");
    let routes = tb.node_a().ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains(&SERVICE_ADDR.to_string()),
        "the first node's route was removed: {routes}"
    );
    echo();
    assert!(node.terminate().unwrap().success());
}

#[test]
fn flows_spread_over_the_workers_and_each_is_served() {
    let (tb, node) = setup(NodeConfig::standard("a").workers(2));
    tb.client().run(|| {
        let mut conns: Vec<(TcpStream, Vec<u8>)> = (0..16)
            .map(|i| (connect(7), noise(100_000 + i * 1000, i as u64 + 1)))
            .collect();
        for (c, data) in &mut conns {
            c.write_all(data).unwrap();
        }
        for (c, data) in &mut conns {
            let mut back = vec![0u8; data.len()];
            c.read_exact(&mut back).unwrap();
            assert!(back == *data, "echo differs");
        }
        // A flow id's top 16 bits are its worker. The kernel picks the TUN queue by flow
        // hash: 16 flows all on one of two workers would happen once in 32,768 runs.
        let listed = node.ctl_json(&["conns"]).unwrap();
        let mut per_worker = [0usize; 2];
        for c in listed.as_array().unwrap() {
            let worker = (c["id"].as_u64().unwrap() >> 48) as usize;
            assert!(worker < 2, "{c}");
            per_worker[worker] += 1;
        }
        assert_eq!(per_worker.iter().sum::<usize>(), 16, "{listed}");
        assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
        drop(conns);
    });
}

#[test]
fn ctl_freeze_and_thaw_take_the_id_conns_shows() {
    let (tb, node) = setup(NodeConfig::standard("a"));
    tb.client().run(|| {
        let mut c = connect(7);
        c.write_all(b"before").unwrap();
        let mut b = [0u8; 6];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"before");
        // The table prints ids in hex; freeze takes that form.
        let table = node.ctl(&["conns"]).unwrap();
        let id = table
            .lines()
            .find_map(|l| l.split_whitespace().next().filter(|w| w.starts_with("0x")))
            .unwrap_or_else(|| panic!("no id in:\n{table}"))
            .to_owned();
        node.ctl(&["freeze", &id]).unwrap();
        // `--json` after the subcommand works too.
        let conns: serde_json::Value =
            serde_json::from_str(&node.ctl(&["conns", "--json"]).unwrap()).unwrap();
        assert_eq!(conns[0]["mode"], "frozen", "{conns}");
        // Written while frozen: queued on the node, delivered on thaw, byte-exact.
        let data = noise(20_000, 9);
        c.write_all(&data).unwrap();
        // Held while frozen: nothing reaches the app, nothing comes back.
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut probe = [0u8; 1];
        match c.read(&mut probe) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("a frozen connection answered: {other:?}"),
        }
        let conns = node.ctl_json(&["conns"]).unwrap();
        assert_eq!(
            conns[0]["bytes_in"], 6,
            "the app got bytes while frozen: {conns}"
        );
        assert_eq!(conns[0]["bytes_out"], 6, "{conns}");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let thawed = node.ctl_json(&["thaw", &id]).unwrap();
        assert!(
            thawed["replayed_packets"].as_u64().unwrap() > 0,
            "nothing was held: {thawed}"
        );
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).unwrap();
        assert!(back == data, "echo after thaw differs");
        let conns = node.ctl_json(&["conns"]).unwrap();
        assert_eq!(conns[0]["mode"], "local", "{conns}");
        // An id that is neither hex nor decimal is refused by the CLI.
        assert!(node.ctl(&["freeze", "zz"]).is_err());
    });
}

/// One HTTP request on a fresh connection (`Connection: close`, read to EOF) for `len` bytes
/// of the counting stream, every byte checked.
fn short_request(len: usize) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&service(80), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // One write, as real clients send a request (`write!` would make several small writes,
    // and Nagle would hold the later ones for the node's ACK).
    let request = format!("GET /bytes/{len} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).map_err(|e| format!("read: {e}"))?;
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no response head")?;
    if !all.starts_with(b"HTTP/1.1 200 ") {
        return Err(format!(
            "status: {}",
            String::from_utf8_lossy(&all[..head_end])
        ));
    }
    let body = &all[head_end + 4..];
    if body.len() != len {
        return Err(format!("{} body bytes, not {len}", body.len()));
    }
    CountingVerifier::new()
        .feed(body)
        .map_err(|e| format!("body: {e}"))
}

/// `n` sequential short HTTP connections from one kernel client (`Connection: close`, read to
/// the end), as health checkers and load generators make them: every one must succeed, byte
/// exact. Linux picks source ports with random increments, so ports come back while the node
/// still holds their previous connection in TIME-WAIT.
fn sequential_short_connections(timestamps: bool) {
    let (tb, node) = setup(NodeConfig::standard("a"));
    if !timestamps {
        tb.client().sysctl("net.ipv4.tcp_timestamps", "0").unwrap();
    }
    let n = 20_000usize;
    let failures = tb.client().run(move || {
        let mut failures = Vec::new();
        for i in 0..n {
            let len = 1 + (i * 37) % 1500;
            let r = short_request(len);
            if let Err(e) = r {
                failures.push(format!("connection {i}: {e}"));
                if failures.len() >= 10 {
                    break;
                }
            }
        }
        failures
    });
    assert!(failures.is_empty(), "failures: {failures:#?}");
    // The client's last FIN may still be on its way when its loop ends.
    eventually(10, "the last connection retired", || {
        node.ctl_json(&["status"]).unwrap()["connections"] == 0
    });
    let s = node.ctl_json(&["status"]).unwrap();
    let st = &s["stats"];
    assert_eq!(st["conns_accepted"], n as u64, "{s}");
    for refused in [
        "refused_limit",
        "refused_no_service",
        "refused_half_open",
        "refused_shutdown",
    ] {
        assert_eq!(st[refused], 0, "{refused}: {s}");
    }
    // The node closed each connection first: what is left is TIME-WAIT records, listed only
    // with --all, and ports did come back while their previous connection was in TIME-WAIT.
    assert!(
        st["time_wait_reused"].as_u64().unwrap() > 0,
        "no port came back: the test did not exercise reuse: {s}"
    );
    assert!(s["time_wait"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["connections"], 0, "{s}");
    let live = node.ctl_json(&["conns"]).unwrap();
    assert_eq!(live.as_array().unwrap().len(), 0, "{live}");
    let all = node.ctl_json(&["conns", "--all"]).unwrap();
    let all = all.as_array().unwrap();
    assert!(!all.is_empty());
    assert!(all.iter().all(|c| c["state"] == "TIME-WAIT"), "{all:?}");
    // Each connection's two socket buffers came from closed ones (the bytes were checked
    // above): all but the first few of each worker (4 KiB pages, as on every machine the
    // project runs on).
    let recycled = metric(&node, "flowshift_allocator_blocks_recycled_total");
    assert!(
        recycled >= 2 * n as u64 - 100,
        "{recycled} blocks recycled for {n} connections' {} buffers",
        2 * n
    );
}

#[test]
fn twenty_thousand_sequential_short_connections_from_one_client_all_succeed() {
    sequential_short_connections(true);
}

#[test]
fn twenty_thousand_sequential_short_connections_succeed_with_client_timestamps_off() {
    sequential_short_connections(false);
}

/// Runs `flowshift ctl --socket <socket> status` as `nobody` (the binary copied where that
/// user can run it); returns whether it succeeded and what it printed on stderr.
fn ctl_as_nobody(bin: &std::path::Path, socket: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin)
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .output()
        .expect("runuser");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_unprivileged_user_cannot_use_the_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    let (tb, node) = setup(NodeConfig::standard("a"));
    let socket = node.control_socket().to_owned();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    // A copy of the binary and a directory `nobody` can reach, holding the socket.
    let dir = tb.dir().join("open");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(tb.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("flowshift");
    std::fs::copy(flowshift_tests::flowshift_bin().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The file mode keeps `nobody` out, with a message saying what to do.
    let (ok, err) = ctl_as_nobody(&bin, &socket);
    assert!(!ok, "nobody used the control socket");
    assert!(err.contains("permission denied"), "{err}");
    // A mode loosened by hand: the node still refuses by the peer's credentials.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, err) = ctl_as_nobody(&bin, &socket);
    assert!(!ok, "nobody used the control socket");
    assert!(err.contains("permission denied: uid 65534"), "{err}");
    assert!(
        node.log().contains("control connection refused"),
        "{}",
        node.log()
    );
    // Root still can.
    assert!(node.ctl_json(&["status"]).is_ok());
}

/// The Internet checksum of a TCP segment over IPv4 (pseudo-header included).
fn tcp_checksum(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 6 + segment.len() as u32;
    for b in [src.octets(), dst.octets()] {
        sum += u32::from(u16::from_be_bytes([b[0], b[1]]))
            + u32::from(u16::from_be_bytes([b[2], b[3]]));
    }
    for w in segment.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A SYN from `src:port` to the http service, with the options a Linux client sends.
fn spoofed_syn(src: std::net::Ipv4Addr, port: u16, seq: u32) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(40);
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&80u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&[0xa0, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]); // 40-byte header, SYN
    tcp.extend_from_slice(&[2, 4, 0x05, 0xb4, 4, 2, 8, 10]); // MSS 1460, SACK-permitted, TS
    tcp.extend_from_slice(&seq.rotate_left(7).to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, 7]); // TSecr 0, NOP, window scale 7
    let sum = tcp_checksum(src, SERVICE_ADDR, &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&SERVICE_ADDR.octets());
    ip.extend_from_slice(&tcp);
    let len = ip.len() as u16;
    ip[2..4].copy_from_slice(&len.to_be_bytes());
    ip
}

#[test]
fn a_spoofed_syn_flood_of_25000_per_second_is_answered_with_cookies_and_real_requests_succeed() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    const SYNS: u64 = 200_000;
    const RATE: u64 = 25_000; // per second: 8 s of flood
    let (tb, node) = setup(NodeConfig::standard("a"));
    // The SYN-ACKs to the spoofed sources end in node-a's namespace (they are never routed
    // anywhere): 198.19.128.0/17 is assigned to nothing in the testbed.
    tb.node(Node::A)
        .ip(&["route", "add", "blackhole", "198.19.128.0/17"])
        .unwrap();
    // A keep-alive connection opened before the flood must carry on through it.
    let flooding = AtomicBool::new(true);
    let (sent, elapsed, failures, requests, keepalive_bytes) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            tb.client().run(|| {
                // SAFETY: plain socket(2); checked below and owned by `fd`.
                let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
                assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
                // SAFETY: `raw` is a fresh descriptor nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let dst = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(SERVICE_ADDR).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let start = Instant::now();
                let mut x = 0x9e37_79b9_7f4a_7c15_u64;
                let mut sent = 0u64;
                while sent < SYNS {
                    // Paced from the start: as many as the rate allows by now.
                    let due = (start.elapsed().as_micros() as u64 * RATE / 1_000_000).min(SYNS);
                    if sent >= due {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    while sent < due {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let src = std::net::Ipv4Addr::from(0xc613_8000 | (x as u32 & 0x7fff));
                        let syn =
                            spoofed_syn(src, 1024 + (x >> 17) as u16 % 60_000, (x >> 32) as u32);
                        // SAFETY: `syn` and `dst` are valid for the lengths given.
                        let n = unsafe {
                            libc::sendto(
                                fd.as_raw_fd(),
                                syn.as_ptr().cast(),
                                syn.len(),
                                0,
                                (&dst as *const libc::sockaddr_in).cast(),
                                std::mem::size_of::<libc::sockaddr_in>() as u32,
                            )
                        };
                        assert_eq!(
                            n,
                            syn.len() as isize,
                            "sendto: {}",
                            std::io::Error::last_os_error()
                        );
                        sent += 1;
                    }
                }
                (sent, start.elapsed())
            })
        });
        let keepalive = scope.spawn(|| {
            tb.client().run(|| {
                let mut c = connect(80);
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut bytes = 0u64;
                let mut i = 0usize;
                while flooding.load(Ordering::Relaxed) || i < 10 {
                    let len = 1000 + i % 5000;
                    c.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                        .expect("keep-alive request");
                    let (status, body) = read_response(&mut r);
                    assert_eq!(status, 200);
                    assert_eq!(body.len(), len);
                    CountingVerifier::new()
                        .feed(&body)
                        .expect("keep-alive body");
                    bytes += len as u64;
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                bytes
            })
        });
        // Real clients: fresh connections all through the flood.
        let (failures, requests) = tb.client().run(|| {
            let mut failures = Vec::new();
            let mut requests = 0usize;
            std::thread::sleep(Duration::from_millis(500));
            while !flood.is_finished() {
                if let Err(e) = short_request(1 + (requests * 131) % 20_000) {
                    failures.push(format!("request {requests}: {e}"));
                }
                requests += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (failures, requests)
        });
        let (sent, elapsed) = flood.join().unwrap();
        flooding.store(false, Ordering::Relaxed);
        let keepalive_bytes = keepalive.join().unwrap();
        (sent, elapsed, failures, requests, keepalive_bytes)
    });
    let rate = sent as f64 / elapsed.as_secs_f64();
    eprintln!(
        "flood: {sent} spoofed SYNs in {:.1} s ({rate:.0}/s); {requests} real requests, {} failed; keep-alive connection {keepalive_bytes} bytes",
        elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "failures: {failures:#?}");
    assert!(
        requests >= 50,
        "only {requests} requests made during the flood"
    );
    assert!(keepalive_bytes > 0);
    let cookies = |what: &str| {
        metric(
            &node,
            &format!("flowshift_syn_cookies_total{{reason=\"{what}\"}}"),
        )
    };
    let (cookies_sent, cookies_accepted) = (cookies("sent"), cookies("accepted"));
    eprintln!("cookies sent {cookies_sent}, accepted {cookies_accepted}");
    // What reached the node was answered with cookies beyond the threshold (the kernel may
    // drop some of the flood on the way; the node must answer nearly all of it).
    assert!(
        cookies_sent >= SYNS * 9 / 10,
        "{cookies_sent} cookies for {SYNS} SYNs"
    );
    // Real clients got in, through cookies while the flood held the handshake slots.
    assert!(cookies_accepted > 0 && cookies_accepted as usize <= requests + 1);
    assert_eq!(stat(&node, "refused_half_open"), 0);
    assert_eq!(stat(&node, "refused_limit"), 0);
}

#[test]
fn idle_connections_are_compacted_and_parked_hold_under_16_kib_each_and_carry_on_byte_exact() {
    const N: usize = 400;
    let (tb, node) = setup(NodeConfig::standard("a"));
    let pid = node.pid();
    let payload = noise(64 * 1024, 9);
    let rss0 = rss_bytes(pid);
    tb.client().run(|| {
        let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(7)).collect();
        let mut back = vec![0u8; payload.len()];
        for c in &mut conns {
            c.write_all(&payload).unwrap();
            c.read_exact(&mut back).unwrap();
            assert!(back == payload, "echo before the compaction");
        }
        let busy = rss_bytes(pid);
        // Idle past the compaction delay and a few sweeps.
        eventually(30, "every connection compacted and parked", || {
            stat(&node, "compacted") >= N as u64 && stat(&node, "parked") >= N as u64
        });
        let conns_json = node.ctl_json(&["conns"]).expect("conns");
        let parked = conns_json
            .as_array()
            .expect("conns array")
            .iter()
            .filter(|c| c["parked"] == true)
            .count();
        assert_eq!(parked, N, "every idle connection parked");
        // The next sweeps hand the freed memory back.
        std::thread::sleep(Duration::from_millis(2_500));
        let idle = rss_bytes(pid);
        eprintln!(
            "RSS per connection: {:.1} KiB after echoing 64 KiB, {:.1} KiB once compacted",
            busy.saturating_sub(rss0) as f64 / N as f64 / 1024.0,
            idle.saturating_sub(rss0) as f64 / N as f64 / 1024.0
        );
        assert!(
            idle < busy,
            "compaction gave nothing back: {busy} -> {idle}"
        );
        // The performance issue's bound for a connection that moved 64 KiB (measured: about
        // 2 KiB; the untouched fresh buffers cost nothing).
        let per_conn = idle.saturating_sub(rss0) as f64 / N as f64;
        assert!(
            per_conn <= 16.0 * 1024.0,
            "{:.1} KiB of RSS per idle connection",
            per_conn / 1024.0
        );
        // Every connection carries on, both ways, byte-exact: the kernel client saw nothing.
        let more = noise(100_000, 10);
        let mut back = vec![0u8; more.len()];
        for c in &mut conns {
            c.write_all(&more).unwrap();
            c.read_exact(&mut back).unwrap();
            assert!(back == more, "echo after the compaction");
        }
    });
    assert_eq!(stat(&node, "conns_accepted"), N as u64);
    assert_eq!(stat(&node, "keepalive_timeouts"), 0);
}

/// `[predict.class] enforce = true`: a connection gets its class's allocation. With every
/// class's rate limit set to 4 MB/s (both ways together), an echo session that sends 4 MB
/// and reads them back moves 8 MB through the limit: it cannot take less than 2 s (less a
/// 20 ms burst); every byte is echoed in order; `ctl plan` says the allocations are
/// enforced, and the log says so when the connection changes class.
#[test]
fn enforced_class_allocations_hold_a_connection_to_its_rate_limit() {
    const RATE: f64 = 4_000_000.0;
    let (tb, node) = setup(NodeConfig::standard("a").extra(
        "[predict]\n[predict.class]\nenforce = true\n\
         rate_limits = [4000000, 4000000, 4000000, 4000000]\n",
    ));
    let data = noise(4_000_000, 7);
    let input = data.clone();
    let (got, elapsed) = tb.client().run(move || {
        let mut s = connect(7);
        // Idle past a few samples: the connection has its class (micro) and allocation.
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let mut got = Vec::with_capacity(input.len());
        let mut buf = vec![0u8; 1 << 16];
        for chunk in input.chunks(64 * 1024) {
            s.write_all(chunk).unwrap();
            let want = got.len() + chunk.len();
            while got.len() < want {
                let k = s.read(&mut buf).expect("no reset");
                assert!(k > 0, "closed after {} bytes", got.len());
                got.extend_from_slice(&buf[..k]);
            }
        }
        (got, started.elapsed())
    });
    assert!(got == data, "echoed bytes differ");
    let least = Duration::from_secs_f64(2.0 * data.len() as f64 / RATE) - Duration::from_millis(40);
    assert!(
        elapsed >= least,
        "8 MB through a 4 MB/s limit in {elapsed:?} (at least {least:?})\n{}",
        node.log()
    );
    let plan = node.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan["classes"]["enforced"], true, "{plan:#}");
    assert!(
        node.log()
            .contains("predict: connection class changed (allocation enforced)"),
        "{}",
        node.log()
    );
}
