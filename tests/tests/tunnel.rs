//! End-to-end tests of the tunnel between two nodes (node-a, node-b) through the router.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowshift_tests::testbed::{NODE_A, NODE_B};
use flowshift_tests::{Node, NodeConfig, NodeHandle, Testbed, TestbedOptions, flowshift_bin};

/// `flowshift genkey | flowshift pubkey`.
fn keypair() -> (String, String) {
    let bin = flowshift_bin().unwrap();
    let out = Command::new(&bin).arg("genkey").output().unwrap();
    assert!(out.status.success());
    let private = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut child = Command::new(&bin)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{private}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    (
        private,
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
    )
}

/// Writes a key file readable by its owner only (the node warns about anything laxer).
fn write_secret(path: &std::path::Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn tunnel_toml(
    tb: &Testbed,
    me: &str,
    listen: std::net::Ipv4Addr,
    private: &str,
    peer: &str,
    endpoint: std::net::Ipv4Addr,
    public: &str,
) -> String {
    let key = tb.dir().join(format!("{me}.key"));
    write_secret(&key, &format!("{private}\n"));
    format!(
        "[tunnel]\nlisten = \"{listen}:51871\"\nprivate_key_file = \"{}\"\n[[peer]]\nname = \"{peer}\"\nendpoint = \"{endpoint}:51871\"\npublic_key = \"{public}\"\n",
        key.display()
    )
}

/// Two nodes; `b_knows_a_as` is the public key node B is configured with for A.
fn pair(tb: &Testbed, b_knows_a_as: Option<String>) -> (NodeHandle, NodeHandle) {
    let (a_priv, a_pub) = keypair();
    let (b_priv, b_pub) = keypair();
    let a_key_at_b = b_knows_a_as.unwrap_or(a_pub);
    let a = NodeConfig::standard("a")
        .extra(&tunnel_toml(tb, "a", NODE_A, &a_priv, "b", NODE_B, &b_pub));
    let b = NodeConfig::standard("b").extra(&tunnel_toml(
        tb,
        "b",
        NODE_B,
        &b_priv,
        "a",
        NODE_A,
        &a_key_at_b,
    ));
    (
        tb.start_node(Node::A, &a).unwrap(),
        tb.start_node(Node::B, &b).unwrap(),
    )
}

fn peer(node: &NodeHandle, name: &str) -> serde_json::Value {
    let peers = node.ctl_json(&["peers"]).unwrap();
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {name}: {peers}"))
}

fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not reached within {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(a: &NodeHandle, b: &NodeHandle) {
    eventually(20, "both peers alive", || {
        peer(a, "b")["liveness"] == "alive" && peer(b, "a")["liveness"] == "alive"
    });
}

/// Sends `bytes` of the test stream from A to B and waits until B verified all of them.
fn move_bytes(a: &NodeHandle, b: &NodeHandle, bytes: u64, secs: u64) {
    let before = peer(b, "a")["rx_verified_bytes"].as_u64().unwrap();
    a.ctl(&["tunnel-send", "b", &bytes.to_string()]).unwrap();
    let mut last = (before, Instant::now());
    eventually(secs, "all bytes verified", || {
        let p = peer(b, "a");
        assert_eq!(p["rx_errors"], 0, "verification errors: {p}");
        let got = p["rx_verified_bytes"].as_u64().unwrap();
        if got != last.0 {
            last = (got, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(30),
            "transfer stalled at {got}: {p}\n{}",
            a.log()
        );
        got - before >= bytes
    });
    let p = peer(b, "a");
    assert_eq!(
        p["rx_verified_bytes"].as_u64().unwrap() - before,
        bytes,
        "more bytes than sent: {p}"
    );
}

#[test]
fn one_gigabyte_over_the_reliable_channel_through_5_percent_loss() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let (a, b) = pair(&tb, None);
    alive(&a, &b);
    tb.set_router_loss(5).unwrap();
    let start = Instant::now();
    move_bytes(&a, &b, 1_000_000_000, 600);
    let secs = start.elapsed().as_secs_f64();
    let drops = tb.router_loss_drops().unwrap();
    eprintln!(
        "1 GB at 5 % loss in {secs:.1} s ({:.2} Gbit/s); router dropped {drops} packets",
        8.0 / secs
    );
    assert!(drops > 0, "the router dropped nothing");
    // The sender saw the loss and repaired it (the bytes were verified above).
    let loss = peer(&a, "b")["loss"].as_f64().unwrap();
    assert!(loss > 0.0, "A declared no packet lost: {}", peer(&a, "b"));
    // Both sides still see each other, and each reports the other's load.
    assert_eq!(peer(&a, "b")["liveness"], "alive");
    tb.clear_router_loss();
    eventually(10, "load reports arrive", || {
        peer(&a, "b")["load"].is_object()
    });
    let text = a.ctl(&["peers"]).unwrap();
    assert!(text.contains("alive"), "{text}");
}

#[test]
fn a_wrong_peer_key_never_becomes_alive_and_is_counted() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let (_, stranger) = keypair();
    let (a, b) = pair(&tb, Some(stranger));
    std::thread::sleep(Duration::from_secs(4));
    assert_ne!(peer(&a, "b")["liveness"], "alive");
    assert_ne!(peer(&b, "a")["liveness"], "alive");
    let metrics = b.ctl(&["metrics"]).unwrap();
    let unknown: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("flowshift_tunnel_rejected_total{reason=\"handshake_unknown_peer\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no handshake_unknown_peer counter:\n{metrics}"));
    assert!(
        unknown > 0,
        "B did not count A's handshakes as from an unknown key"
    );
    // Each side says what went wrong: B names the key it does not know, A (after its 10 s
    // handshake timeout) that no response came.
    let log_b = b.log();
    assert!(
        log_b.contains("tunnel handshake failed") && log_b.contains("unknown static key"),
        "B's log does not explain the rejection:\n{log_b}"
    );
    eventually(20, "A logs the handshake timeout", || {
        let log_a = a.log();
        log_a.contains("tunnel handshake failed") && log_a.contains("no handshake response")
    });
    assert_eq!(peer(&a, "b")["liveness"], "never");
}

#[test]
fn garbage_at_the_tunnel_port_is_counted_and_the_tunnel_carries_on() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let (a, b) = pair(&tb, None);
    alive(&a, &b);
    tb.client().run(|| {
        let s = UdpSocket::bind("198.18.1.2:0").unwrap();
        let target = SocketAddr::from((NODE_B, 51871));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..2000usize {
            let len = i % 1500;
            let d: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = s.send_to(&d, target);
        }
    });
    let metrics = b.ctl(&["metrics"]).unwrap();
    let rejected: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("flowshift_tunnel_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(rejected >= 1000, "rejected {rejected}:\n{metrics}");
    move_bytes(&a, &b, 50_000_000, 60);
}
