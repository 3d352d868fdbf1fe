//! End-to-end live migration: real clients in the client namespace, two nodes joined by the
//! tunnel, connections moved between them while they carry data. Every test checks the
//! client's bytes exactly, that the client saw no reset (its own result), and the nodes'
//! counters.

use std::io::Read;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowshift_tests::oracle::CountingVerifier;
use flowshift_tests::testbed::SERVICE_ADDR;
use flowshift_tests::tunnel::{start_tunnel_pair, wait_alive};
use flowshift_tests::{NodeHandle, Testbed, TestbedOptions, ensure_tools};

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
        .expect("migrate");
    assert_eq!(r["moved"], 1, "not moved: {r}\n{}", from.log());
    r
}

#[test]
fn curl_download_of_1_gb_moves_mid_stream_byte_exact() {
    ensure_tools(&["curl"]).unwrap();
    let (tb, a, b) = pair();
    let n: u64 = 1_000_000_000;
    let mut child = tb
        .spawn({
            let mut c = tb.client().command("curl");
            c.args([
                "-sS",
                "--fail",
                "--max-time",
                "300",
                &format!("http://{SERVICE_ADDR}/bytes/{n}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c
        })
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut v = CountingVerifier::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = out.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                v.feed(&buf[..k]).expect("counting stream");
                received.store(v.offset(), Ordering::Relaxed);
            }
            v.offset()
        })
    };
    eventually(60, "100 MB downloaded", || {
        received.load(Ordering::Relaxed) > 100_000_000
    });
    let ids = local_ids(&a);
    assert_eq!(ids.len(), 1, "one connection on a");
    let report = migrate(&a, "b", ids[0]);
    let at_move = received.load(Ordering::Relaxed);
    assert!(at_move < n, "the move happened mid-stream");
    let total = reader.join().unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(status.success(), "curl failed: {status} {err}");
    assert_eq!(total, n);
    // The bytes after the move came from b, through a.
    assert!(
        stat(&b, "app_bytes_out") >= n - at_move - 1_000_000,
        "{report}"
    );
    assert!(stat(&a, "relayed_from_owner") > 1000);
    assert_eq!(stat(&b, "tunnel_packets_refused"), 0);
    assert_eq!(stat(&a, "conns_moved_out"), 1);
    assert_eq!(stat(&b, "conns_restored"), 1);
    eprintln!("report: {report}");
}
