//! The testbed itself: addressing and routing work with plain kernel TCP, teardown happens on
//! drop and on panic, parallel testbeds do not collide, stale namespaces are removed, and the
//! router's loss rule really drops packets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use flowshift_tests::oracle::{CountingVerifier, counting_fill};
use flowshift_tests::testbed::{NODE_A, NODE_B};
use flowshift_tests::{Testbed, TestbedOptions};

fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Serves the counting stream once from `ns` on `addr`; the client reads `n` bytes through the
/// router and verifies every one.
fn kernel_transfer(tb: &Testbed, server_ns: &flowshift_tests::Netns, addr: SocketAddr, n: u64) {
    let listener = server_ns.run(|| TcpListener::bind(addr).expect("bind in node namespace"));
    std::thread::scope(|s| {
        s.spawn(|| {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut at = 0;
            while at < n {
                let k = (n - at).min(buf.len() as u64) as usize;
                counting_fill(at, &mut buf[..k]);
                c.write_all(&buf[..k]).unwrap();
                at += k as u64;
            }
        });
        tb.client().run(|| {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut v = CountingVerifier::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let k = c.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                v.feed(&buf[..k]).unwrap();
            }
            assert_eq!(v.offset(), n);
        });
    });
}

#[test]
fn kernel_tcp_crosses_the_router_to_both_nodes() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    kernel_transfer(
        &tb,
        tb.node_a(),
        SocketAddr::from((NODE_A, 5001)),
        10_000_000,
    );
    kernel_transfer(
        &tb,
        tb.node_b(),
        SocketAddr::from((NODE_B, 5001)),
        1_000_000,
    );
}

#[test]
fn loss_on_the_router_drops_packets_and_tcp_still_delivers() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    tb.set_router_loss(5).unwrap();
    kernel_transfer(
        &tb,
        tb.node_a(),
        SocketAddr::from((NODE_A, 5002)),
        10_000_000,
    );
    let drops = tb.router_loss_drops().unwrap();
    assert!(drops > 0, "the loss rule dropped nothing");
    tb.clear_router_loss();
    assert!(tb.router_loss_drops().is_err(), "loss table still present");
}

#[test]
fn namespaces_go_away_on_drop_and_on_panic() {
    let tb = Testbed::new(TestbedOptions {
        node_c: true,
        ..Default::default()
    })
    .unwrap();
    let names = tb.namespace_names();
    assert_eq!(names.len(), 5);
    let other = Testbed::new(TestbedOptions::default()).unwrap();
    assert!(
        other.namespace_names().iter().all(|n| !names.contains(n)),
        "names collide"
    );
    for n in &names {
        assert!(namespaces().contains(n), "{n} missing");
    }
    drop(tb);
    let left = namespaces();
    for n in &names {
        assert!(!left.contains(n), "{n} left after drop");
    }
    let other_names = other.namespace_names();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _keep = other;
        panic!("test body fails");
    }));
    assert!(r.is_err());
    let left = namespaces();
    for n in &other_names {
        assert!(!left.contains(n), "{n} left after panic");
    }
}

#[test]
fn stale_namespaces_of_dead_runs_are_removed() {
    // A pid that has exited: a namespace named after it is stale.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("fst{dead}x0-client");
    std::process::Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(namespaces().contains(&stale));
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    assert!(
        !namespaces().contains(&stale),
        "stale namespace {stale} survived"
    );
    // Our own live testbed is untouched by the next one's cleanup.
    let again = Testbed::new(TestbedOptions::default()).unwrap();
    for n in tb.namespace_names() {
        assert!(namespaces().contains(&n));
    }
    drop(again);
}

#[test]
fn the_watchdog_stops_a_stuck_test_s_processes_and_keeps_its_namespaces() {
    use std::os::unix::process::ExitStatusExt;
    let tb = Testbed::new(TestbedOptions {
        watchdog: Some(Duration::from_secs(2)),
        ..Default::default()
    })
    .unwrap();
    // A client that would wait far longer than any test should.
    let mut stuck = tb
        .spawn({
            let mut c = tb.client().command("sleep");
            c.arg("600");
            c
        })
        .unwrap();
    let status = stuck.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "the stuck process ended otherwise: {status:?}"
    );
    // The namespaces stay until the test drops the testbed.
    for n in tb.namespace_names() {
        assert!(namespaces().contains(&n), "{n} removed by the watchdog");
    }
}
