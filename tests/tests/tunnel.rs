//! End-to-end tests of the tunnel between two nodes (node-a, node-b) through the router.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flowshift_tests::testbed::NODE_B;
use flowshift_tests::tunnel::{self, TUNNEL_PORT, TunnelKeys};
use flowshift_tests::{NodeHandle, Testbed, TestbedOptions};

/// Two nodes joined by the tunnel; `b_knows_a_as` overrides the key B has for A.
fn pair(tb: &Testbed, b_knows_a_as: Option<String>) -> (NodeHandle, NodeHandle) {
    tunnel::start_tunnel_pair(tb, b_knows_a_as.as_deref()).unwrap()
}

fn peer(node: &NodeHandle, name: &str) -> serde_json::Value {
    tunnel::peer(node, name).unwrap()
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
    tunnel::wait_alive(a, b, Duration::from_secs(20)).unwrap();
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
    let stranger = TunnelKeys::generate().unwrap().public;
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
    let rejected = || -> u64 {
        b.ctl(&["metrics"])
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("flowshift_tunnel_rejected_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(rejected(), 0, "rejected before the garbage");
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        // Random datagrams of every length from 1 to 1,499 bytes from the client, while A
        // sends to B: in chunks of 1,000, each counted by B before the next, so no socket
        // buffer overflows and every one must be accounted for. Bounded to 100 chunks.
        let flood = scope.spawn(|| {
            tb.client().run(|| {
                let s = UdpSocket::bind("198.18.1.2:0").unwrap();
                let target = SocketAddr::from((NODE_B, TUNNEL_PORT));
                let mut x = 0x2545_f491_4f6c_dd1du64;
                let mut d = [0u8; 1500];
                let mut sent = 0u64;
                for chunk in 0..100usize {
                    if sent > 2_000 && stop.load(Ordering::Relaxed) {
                        break;
                    }
                    for i in chunk * 1000..(chunk + 1) * 1000 {
                        let len = 1 + i % 1499;
                        for byte in &mut d[..len] {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            *byte = x as u8;
                        }
                        s.send_to(&d[..len], target).expect("send garbage");
                        sent += 1;
                    }
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while rejected() < sent {
                        assert!(
                            Instant::now() < deadline,
                            "{} of {sent} garbage datagrams counted",
                            rejected()
                        );
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                sent
            })
        });
        move_bytes(&a, &b, 200_000_000, 60);
        stop.store(true, Ordering::Relaxed);
        flood.join().unwrap()
    });
    // Each garbage datagram was rejected and counted once; nothing of the transfer was.
    assert_eq!(rejected(), sent, "{}", b.ctl(&["metrics"]).unwrap());
    // And the tunnel still works afterwards.
    move_bytes(&a, &b, 10_000_000, 60);
}

#[test]
fn nodes_keep_their_accepted_handshake_timestamp_across_restarts() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    // As if both nodes had run before with clocks five minutes ahead (within what peers
    // accept): their handshakes must carry timestamps above that, whatever the clock says.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let seeded = now_us + 300_000_000;
    let state = |n: &str| tb.dir().join(format!("{n}.key.state"));
    for n in ["a", "b"] {
        std::fs::write(state(n), format!("{seeded}\n")).unwrap();
    }
    let (a, b) = pair(&tb, None);
    alive(&a, &b);
    // Whichever node's initiation was answered kept the newer timestamp, above the floor.
    let kept: Vec<u64> = ["a", "b"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(state(n))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(kept.iter().all(|&k| k >= seeded), "{kept:?}");
    assert!(
        kept.iter().any(|&k| k > seeded),
        "no handshake above the floor: {kept:?}"
    );
}
