//! End-to-end predictive offload: node A runs the predictor with policy `predictive`, B is
//! its peer. An increasing number of downloads on A makes A move connections to B before A
//! reaches its configured capacity; every download stays byte-exact, without a reset.
//!
//! The load is measured in connections (`metric = "connections"`, `capacity = 10`), so what
//! the predictor sees depends on the test's own steps, not on the machine's CPU. Assertions are
//! on the orderings and counts the nodes report (`ctl plan`, `/metrics`, `status`), never on
//! durations; the deadlines are liveness bounds.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use flowshift_tests::oracle::CountingVerifier;
use flowshift_tests::testbed::SERVICE_ADDR;
use flowshift_tests::tunnel::{
    peer, start_tunnel_pair_returning, start_tunnel_pair_with, wait_alive,
};
use flowshift_tests::{NodeConfig, NodeHandle, Testbed, TestbedOptions, ensure_tools};

/// Downloads opened on A, one after the other: more than A's capacity.
const DOWNLOADS: usize = 13;
/// A's capacity in connections.
const CAPACITY: usize = 10;
/// Bytes per download, rate-limited by curl so that all of them are running at the peak.
/// 40 s per download: the ramp (13 s, longer on a busy machine) ends well before the first
/// one does.
const BYTES: u64 = 10_000_000;
const RATE: &str = "250k";
/// The same, as the test's reader paces itself (see `verify_counting`).
const RATE_BYTES: u64 = 250_000;

/// A's predictor: connections as the load, capacity 10; a trend factor that follows a ramp
/// of one connection a second (the default 0.02 is tuned for noisy CPU load).
const A_PREDICT: &str = "[predict]\npolicy = \"predictive\"\nmetric = \"connections\"\n\
capacity = 10\n[predict.forecast]\nbeta = 0.2\n";

/// Waits until `a`'s predictor has `b`'s load report (a heartbeat a second): a shadow trial
/// starts with it, and only connections accepted after that (younger than 1 s) are offered.
fn wait_for_trial(a: &NodeHandle) {
    eventually(20, "a's shadow trial with b", || {
        a.ctl_json(&["plan"]).is_ok_and(|p| {
            p["shadow"]["trials"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["peer"] == "b"))
        })
    });
}

/// Polls `f` every 20 ms until it is true; panics after `secs` (a liveness bound).
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

/// Waits for a curl download to end: curl succeeded (no reset), and the counting stream it
/// printed was `bytes` long, every byte checked by `reader`.
fn finish_download(
    mut child: std::process::Child,
    reader: std::thread::JoinHandle<u64>,
    bytes: u64,
) {
    let total = reader.join().unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    assert!(status.success(), "curl failed (a reset?): {status} {err}");
    assert_eq!(total, bytes, "byte-exact download");
}

/// Reads curl's output at [`RATE_BYTES`] a second at most and checks the counting stream.
/// The pace is what holds a download to its rate: curl 7.88's `--limit-rate` lets a 2 MB
/// transfer through in 0.3–1 s (measured on this machine), and through the pipe, curl's
/// buffer and the client's capped receive buffer (`nodes`) the node can run at most some
/// 500 KB ahead of this reader.
fn verify_counting(out: impl Read + Send + 'static) -> std::thread::JoinHandle<u64> {
    verify_counting_at(out, Some(RATE_BYTES))
}

/// Reads the counting stream from `out` on a thread, at most `rate` bytes a second (`None`: as
/// fast as it comes); returns the verified byte count.
fn verify_counting_at(
    mut out: impl Read + Send + 'static,
    rate: Option<u64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut v = CountingVerifier::new();
        let mut buf = vec![0u8; 16 << 10];
        let start = Instant::now();
        loop {
            let k = out.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            v.feed(&buf[..k]).expect("counting stream");
            let Some(rate) = rate else { continue };
            let due = start + Duration::from_secs_f64(v.offset() as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        v.offset()
    })
}

/// Opens the `i`-th (from 0) rate-limited download ([`RATE`]) of `bytes` from A's `http` app,
/// its bytes checked as they come ([`verify_counting`]), and waits until A has accepted
/// `i + 1` connections.
fn open_download(
    tb: &Testbed,
    a: &NodeHandle,
    i: usize,
    bytes: u64,
) -> (std::process::Child, std::thread::JoinHandle<u64>) {
    let mut c = tb.client().command("curl");
    c.args(["-sS", "--fail", "--max-time", "300", "--limit-rate", RATE])
        .arg(format!("http://{SERVICE_ADDR}/bytes/{bytes}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tb.spawn(c).expect("curl");
    let reader = verify_counting(child.stdout.take().unwrap());
    let what = format!("download {i}'s connection on A");
    eventually(20, &what, || stat(a, "conns_accepted") == i as u64 + 1);
    (child, reader)
}

fn stat(node: &NodeHandle, key: &str) -> u64 {
    let s = node.ctl_json(&["status"]).expect("status");
    s["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{key} in {s}"))
}

/// A metric's value in `ctl metrics`.
fn metric(node: &NodeHandle, name: &str) -> u64 {
    let text = node.ctl(&["metrics"]).expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
}

/// Nodes A (with `a_predict` appended to its config) and B joined by the tunnel, B's load
/// report seen at A, and the client's receive buffers bounded.
fn nodes(a_predict: &str) -> (Testbed, NodeHandle, NodeHandle) {
    ensure_tools(&["curl"]).unwrap();
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    let (a, b) = start_tunnel_pair_with(
        &tb,
        NodeConfig::standard("a").extra(a_predict),
        NodeConfig::standard("b"),
        false,
    )
    .expect("nodes");
    wait_alive(&a, &b, Duration::from_secs(10)).expect("tunnel up");
    // The client's kernel would otherwise take a whole download into its receive buffer (up
    // to 6 MB) at once, ending the connection on the node while curl reads at its pace.
    tb.client()
        .sysctl("net.ipv4.tcp_rmem", "4096 65536 131072")
        .unwrap();
    // A plans with B's load report, which rides B's heartbeats.
    eventually(20, "B's load report at A", || {
        !peer(&a, "b").unwrap()["load"].is_null()
    });
    (tb, a, b)
}

/// Opens [`DOWNLOADS`] rate-limited downloads on A, one a second, then waits for every one
/// and asserts each succeeded (no reset) byte-exact. Returns the moves A had executed just
/// before it opened the last one (the load peak), and just after.
fn ramp(tb: &Testbed, a: &NodeHandle) -> (u64, u64) {
    let executed = || {
        a.ctl_json(&["plan"]).unwrap()["counts"]["executed"]
            .as_u64()
            .unwrap()
    };
    let mut downloads = Vec::new();
    let mut executed_before_peak = 0;
    for i in 0..DOWNLOADS {
        if i == DOWNLOADS - 1 {
            // The last download makes the peak: what has A moved before it?
            executed_before_peak = executed();
        }
        let (child, reader) = open_download(tb, a, i, BYTES);
        downloads.push((child, reader));
        // One more connection a second: a ramp the forecast can follow.
        std::thread::sleep(Duration::from_secs(1));
    }
    let at_peak = executed();
    // The conns table shows each connection's predictor state.
    let conns = a.ctl_json(&["conns"]).unwrap();
    for c in conns.as_array().unwrap() {
        let expected = if c["mode"] == "moved" {
            ["inactive"].as_slice()
        } else {
            ["active", "shifting", "inactive"].as_slice()
        };
        assert!(
            expected.contains(&c["predict"].as_str().unwrap_or("")),
            "{c}"
        );
    }

    for (child, reader) in downloads {
        finish_download(child, reader, BYTES);
    }

    (executed_before_peak, at_peak)
}

#[test]
fn rising_downloads_are_offloaded_to_b_before_a_saturates_byte_exact() {
    let (tb, a, b) = nodes(A_PREDICT);
    let plan = a.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan["policy"], "predictive");
    assert_eq!(plan["executes"], true);
    assert_eq!(plan["metric"], "connections");
    assert_eq!(plan["counts"]["executed"], 0, "{plan}");
    let (before, at_peak) = ramp(&tb, &a);

    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || format!("{plan:#}\n--- a's log:\n{}", a.log());
    // Moves happened before the peak (the last download), and A never held as many
    // connections as its capacity, although more downloads than that were opened on it.
    assert!(before >= 1, "no move before the peak: {}", log());
    let peak = plan["peak_utilisation"].as_f64().unwrap();
    assert!(peak < 1.0, "A reached its capacity: {}", log());
    const { assert!(DOWNLOADS > CAPACITY) };
    let executed = plan["counts"]["executed"].as_u64().unwrap();
    assert!(executed >= (DOWNLOADS - CAPACITY + 1) as u64, "{}", log());
    assert!(before <= at_peak && at_peak <= executed);
    assert_eq!(plan["counts"]["failed"], 0, "{}", log());

    // Every decision moved its connection, the first one on the forecast: the predicted
    // utilisation that triggered it was above the current one, which was below capacity.
    let decisions = plan["decisions"].as_array().unwrap();
    assert_eq!(decisions.len() as u64, executed, "{}", log());
    assert!(
        decisions.iter().all(|d| d["outcome"] == "moved"),
        "{}",
        log()
    );
    assert!(decisions.iter().all(|d| d["target"] == "b"), "{}", log());
    let first = &decisions[0];
    let current = first["current_utilisation"].as_f64().unwrap();
    let trigger = first["utilisation"].as_f64().unwrap();
    assert!(current < 1.0, "{}", log());
    assert!(
        trigger > current,
        "the first move was not made on the forecast: {}",
        log()
    );
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .starts_with("predicted utilisation"),
        "{}",
        log()
    );
    assert!(
        a.log().contains("predict: moving a connection"),
        "{}",
        log()
    );

    // The nodes' own counters agree.
    assert_eq!(
        metric(&a, "flowshift_predict_moves_executed_total"),
        executed
    );
    assert_eq!(metric(&a, "flowshift_predict_moves_failed_total"), 0);
    assert!(metric(&a, "flowshift_predict_moves_planned_total") >= executed);
    assert_eq!(stat(&a, "conns_moved_out"), executed);
    assert_eq!(stat(&b, "conns_restored"), executed);
    // B's heartbeats carry its own forecast (the load report's `forecast` extension).
    let b_load = peer(&a, "b").unwrap()["load"].clone();
    assert!(b_load["forecast"]["horizon_ms"] == 5000, "{b_load}");
    // B (policy manual by default) moved nothing by itself.
    let plan_b = b.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan_b["policy"], "manual");
    assert_eq!(plan_b["counts"]["executed"], 0);
    let table = a.ctl(&["plan"]).unwrap();
    eprintln!("{table}");
    assert!(table.contains("policy predictive"), "{table}");
    assert!(table.contains("moved"), "{table}");
}

/// Bytes of the long downloads of the lease test (60 s at 250 kB/s) and of the short ones
/// (10 s): the short ones end long before the long ones, which A offloaded first (the
/// planner moves the oldest connections first). A takes nothing back within the planner's
/// cooldown (30 s) after a move; the leases then run out (at least 5 s) and B hands the
/// connections back with about 20 s of their download left.
const LONG_BYTES: u64 = 15_000_000;
const SHORT_BYTES: u64 = 2_500_000;
/// Downloads of the lease test, the first [`LONG_DOWNLOADS`] of them long.
const LEASE_DOWNLOADS: usize = 9;
const LONG_DOWNLOADS: usize = 4;

/// Leases: A offloads connections to B during a ramp; B grants each a lease when A's
/// heartbeats first renew it, and A renews them while it is full. When the short downloads
/// end, A has room again and stops renewing; B's leases expire and B hands the connections
/// back to A mid-transfer. Every download is byte-exact, without a reset.
#[test]
fn offloaded_connections_hold_leases_and_go_back_when_their_primary_has_room() {
    let (tb, a, b) = nodes(A_PREDICT);
    let mut downloads = Vec::new();
    for i in 0..LEASE_DOWNLOADS {
        let bytes = if i < LONG_DOWNLOADS {
            LONG_BYTES
        } else {
            SHORT_BYTES
        };
        let (child, reader) = open_download(&tb, &a, i, bytes);
        downloads.push((child, reader, bytes));
        std::thread::sleep(Duration::from_secs(1));
    }
    // While A is full, B holds a lease on what A moved to it, and A renews it.
    let mut held = serde_json::Value::Null;
    eventually(20, "a lease held at B", || {
        let conns = b.ctl_json(&["conns"]).unwrap();
        match conns
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["lease"]["held"] == true)
        {
            Some(c) => {
                held = c["lease"].clone();
                true
            }
            None => false,
        }
    });
    assert_eq!(held["primary"], "a", "{held}");
    assert!(held["expires_in_ms"].as_f64().unwrap() > 0.0, "{held}");
    let table = b.ctl(&["conns"]).unwrap();
    assert!(table.contains("from a "), "{table}");
    let plan_a = a.ctl_json(&["plan"]).unwrap();
    let offloaded = plan_a["leases"]["offloaded"].as_array().unwrap();
    assert!(offloaded.iter().any(|o| o["holder"] == "b"), "{plan_a:#}");

    for (child, reader, bytes) in downloads {
        finish_download(child, reader, bytes);
    }

    let plan_b = b.ctl_json(&["plan"]).unwrap();
    let log = || {
        format!(
            "{plan_b:#}\n--- a's plan:\n{:#}\n--- b's log:\n{}",
            a.ctl_json(&["plan"]).unwrap(),
            b.log()
        )
    };
    let counts = &plan_b["leases"]["counts"];
    let granted = counts["granted"].as_u64().unwrap();
    let expired = counts["expired"].as_u64().unwrap();
    let returned = counts["returned"].as_u64().unwrap();
    assert!(granted >= 1, "{}", log());
    assert!(counts["renewed"].as_u64().unwrap() >= 1, "{}", log());
    // At least one lease ran out while its download was still running, and its connection
    // went back to A; a lease kept here can only be one whose connection closed as it
    // expired.
    assert!(returned >= 1, "no connection went back: {}", log());
    assert_eq!(
        expired,
        returned + counts["kept"].as_u64().unwrap(),
        "{}",
        log()
    );
    for e in plan_b["leases"]["expired"].as_array().unwrap() {
        assert!(
            e["outcome"] == "returned" || e["detail"].as_str().unwrap_or("").contains("closed"),
            "{}",
            log()
        );
        assert_eq!(e["primary"], "a");
    }
    assert!(b.log().contains("predict: lease granted"), "{}", log());
    assert!(
        b.log()
            .contains("predict: lease expired; the connection is back at its primary"),
        "{}",
        log()
    );
    // The nodes' counters agree: every return is a move out of B and a restore at A.
    assert_eq!(
        metric(&b, "flowshift_predict_leases_returned_total"),
        returned
    );
    assert_eq!(
        metric(&b, "flowshift_predict_leases_expired_total"),
        expired
    );
    // A lease goes with its connection once it is closed and gone from B's table.
    eventually(30, "B's leases released", || {
        metric(&b, "flowshift_predict_leases_held") == 0
    });
    assert_eq!(stat(&b, "conns_moved_out"), returned);
    assert_eq!(stat(&a, "conns_restored"), returned);
    // A moved by plan only, and every planned move happened.
    let plan_a = a.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan_a["counts"]["failed"], 0, "{}", log());
    assert!(plan_a["counts"]["executed"].as_u64().unwrap() >= returned);
    let table = b.ctl(&["plan"]).unwrap();
    eprintln!("{table}");
    assert!(table.contains(&format!("returned {returned}")), "{table}");
}

/// Shadow trials: with `[predict.shadow]` on and a first step of 25 %, a quarter of the new
/// connections on A are moved to B (not yet trusted) right after accept, through the
/// migrate path, and served there to the end, byte-exact and without a reset. A's capacity
/// is far above the load, so nothing moves by plan.
#[test]
fn shadow_trial_moves_a_fraction_of_new_connections_to_the_untrusted_peer_byte_exact() {
    const NEW: usize = 8;
    const SHADOW_BYTES: u64 = 2_000_000;
    let (tb, a, b) = nodes(
        "[predict]\npolicy = \"predictive\"\nmetric = \"connections\"\ncapacity = 100\n\
         [predict.shadow]\nenabled = true\nsteps = [0.25, 0.5, 0.75, 1.0]\n",
    );
    wait_for_trial(&a);
    let mut downloads = Vec::new();
    let mut seen_shadowing = false;
    let mut seen_medium = false;
    for i in 0..NEW {
        let (child, reader) = open_download(&tb, &a, i, SHADOW_BYTES);
        downloads.push((child, reader));
        std::thread::sleep(Duration::from_millis(500));
        let conns = a.ctl_json(&["conns"]).unwrap();
        seen_shadowing |= conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["predict"] == "shadowing" && c["mode"] == "moved");
        // A download at 250 kB/s served here is in the medium class (100 kB/s to 10 MB/s).
        seen_medium |= conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["class"] == "medium" && c["mode"] == "local");
    }
    assert!(seen_medium, "no download in the medium class:\n{}", a.log());
    assert!(
        seen_shadowing,
        "no connection shown as shadowing:\n{:#}\n{:#}\n{:#}\n{}",
        a.ctl_json(&["status"]).unwrap(),
        a.ctl_json(&["plan"]).unwrap()["shadow"],
        a.ctl_json(&["conns"]).unwrap(),
        a.log()
    );
    for (child, reader) in downloads {
        finish_download(child, reader, SHADOW_BYTES);
    }
    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || format!("{plan:#}\n--- a's log:\n{}", a.log());
    let shadow = &plan["shadow"];
    assert_eq!(shadow["enabled"], true, "{}", log());
    let shadowed = shadow["shadowed"].as_u64().unwrap();
    // Some, at most the step's quarter of the new connections (each is offered once).
    assert!((1..=(NEW / 4) as u64).contains(&shadowed), "{}", log());
    assert_eq!(shadow["failed"], 0, "{}", log());
    assert_eq!(shadow["trials"][0]["peer"], "b", "{}", log());
    assert_eq!(shadow["trials"][0]["fraction"], 0.25, "{}", log());
    // Nothing moved by plan; every move out of A was a shadow move, restored on B.
    assert_eq!(plan["counts"]["planned"], 0, "{}", log());
    assert_eq!(stat(&a, "conns_moved_out"), shadowed);
    assert_eq!(stat(&b, "conns_restored"), shadowed);
    assert_eq!(metric(&a, "flowshift_predict_shadow_moves_total"), shadowed);
    assert!(
        a.log()
            .contains("predict: shadow trial: new connection moved to the peer on trial"),
        "{}",
        log()
    );
    let table = a.ctl(&["plan"]).unwrap();
    assert!(
        table.contains(&format!(
            "shadow trials: {shadowed} new connection(s) moved"
        )),
        "{table}"
    );
}

/// Shadow trials judged on KPIs: echo sessions that exchange lines a while after their
/// accept (so that the exchanges happen where the connection is served, after a shadow
/// move). Half of A's new connections go to B; each connection's exchanges are timed where
/// it is served, B reports those it served in its load reports, A takes its own as the
/// local baseline, and once each side has `min_samples` the trial judges the step on errors
/// and on latency and ramps up. Every session is echoed byte-exact and ends cleanly, and
/// nothing moves by plan to the peer while it is on trial.
#[test]
fn a_shadow_trial_judges_its_step_on_kpis_the_peer_reports_and_ramps_up() {
    const SESSIONS: usize = 16;
    const MIN: u64 = 4;
    ensure_tools(&["socat"]).unwrap();
    // A latency margin far above this machine's jitter: the test checks that the KPIs are
    // measured, carried and judged, not how fast this machine is.
    let (tb, a, b) = nodes(&format!(
        "[predict]\npolicy = \"predictive\"\nmetric = \"connections\"\ncapacity = 100\n\
         [predict.shadow]\nenabled = true\nsteps = [0.5, 0.5, 1.0, 1.0]\nmin_samples = {MIN}\n\
         latency_margin_ms = 200.0\n"
    ));
    wait_for_trial(&a);
    let session = |i: usize| {
        let lines: Vec<String> = (0..3).map(|k| format!("session {i} line {k}\n")).collect();
        // Wait 0.6 s after connecting (a shadow move happens within a sample or two of
        // the accept), then three exchanges 0.15 s apart, then half-close.
        let script = format!(
            "(sleep 0.6; {}sleep 0.3) | socat -t 5 - TCP:{SERVICE_ADDR}:7",
            lines
                .iter()
                .map(|l| format!("printf '{}'; sleep 0.15; ", l.trim_end().to_owned() + "\\n"))
                .collect::<String>()
        );
        (script, lines.concat())
    };
    echo_sessions(&tb, SESSIONS, Duration::from_millis(400), session);
    // B reports the ended connections it served in its next load reports (once a second,
    // on its heartbeats); A judges the step at its next sample.
    let judged = || {
        let plan = a.ctl_json(&["plan"]).unwrap();
        let j = plan["shadow"]["trials"][0]["last_judgement"].clone();
        (!j.is_null()).then_some((plan, j))
    };
    eventually(20, "a judged step of B's trial", || judged().is_some());
    let (plan, j) = judged().unwrap();
    eprintln!("judged: {j:#}");
    let log = || both_logs(&plan, &a, &b);
    let shadowed = plan["shadow"]["shadowed"].as_u64().unwrap();
    assert!(shadowed >= MIN, "{}", log());
    assert_eq!(stat(&b, "conns_restored"), shadowed, "{}", log());
    // The first step passed on both errors and latency: each side had its samples, each
    // with its exchanges timed, nobody reset.
    assert_eq!(j["step"], 1, "{}", log());
    assert_eq!(j["passed"], true, "{}", log());
    assert!(
        j["p_worse"].as_f64().is_some(),
        "latencies not compared: {}",
        log()
    );
    for side in ["local", "peer"] {
        assert!(j[side]["connections"].as_u64().unwrap() >= MIN, "{}", log());
        assert!(j[side]["latencies"].as_u64().unwrap() >= MIN, "{}", log());
        assert_eq!(j[side]["errors"], 0, "{}", log());
        let median = j[side]["median_latency_ms"].as_f64().unwrap();
        assert!(median > 0.0 && median < 1000.0, "{}", log());
    }
    let trial = &plan["shadow"]["trials"][0];
    assert_ne!(trial["state"], "ramping (step 1)", "{}", log());
    let taken = &plan["shadow"]["kpis_taken"];
    assert!(taken["from_peers"].as_u64().unwrap() >= MIN, "{}", log());
    assert!(taken["local"].as_u64().unwrap() >= MIN, "{}", log());
    assert!(
        metric(&b, "flowshift_predict_kpis_reported_total") >= MIN,
        "{}",
        log()
    );
    assert!(
        a.log().contains("predict: shadow trial judged a step"),
        "{}",
        log()
    );
    assert_eq!(plan["counts"]["planned"], 0, "{}", log());
}

/// Diverted at the accept: echo sessions that send their first line at once. Half of A's
/// new connections go to B (the trial's first step), each held at its accept before A's
/// app saw a byte, so B answers even the first line: B's app echoes exactly the shadowed
/// sessions' bytes and A's exactly the others'. Every session is echoed byte-exact, and no
/// held connection was left to be served at A after all.
#[test]
fn a_shadowed_connection_is_diverted_at_its_accept_and_the_peer_answers_its_first_request() {
    const SESSIONS: usize = 8;
    ensure_tools(&["socat"]).unwrap();
    // min_samples far above the sessions: the first step (half) is never judged here.
    let (tb, a, b) = nodes(
        "[predict]\npolicy = \"predictive\"\nmetric = \"connections\"\ncapacity = 100\n\
         [predict.shadow]\nenabled = true\nsteps = [0.5, 0.5, 1.0, 1.0]\nmin_samples = 1000\n",
    );
    wait_for_trial(&a);
    let session = |i: usize| {
        let lines: Vec<String> = (0..2)
            .map(|k| format!("session {i:02} line {k}\n"))
            .collect();
        // The first line at once (it reaches A before any move can), the second later.
        let script = format!(
            "(printf '{}'; sleep 0.3; printf '{}'; sleep 0.3) | socat -t 5 - TCP:{SERVICE_ADDR}:7",
            lines[0].trim_end().to_owned() + "\\n",
            lines[1].trim_end().to_owned() + "\\n",
        );
        (script, lines.concat())
    };
    echo_sessions(&tb, SESSIONS, Duration::from_millis(300), session);
    let per_session = session_bytes();
    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || both_logs(&plan, &a, &b);
    // Each connection offered once, at its accept; the step admits exactly half.
    let shadowed = plan["shadow"]["shadowed"].as_u64().unwrap();
    assert_eq!(shadowed, (SESSIONS / 2) as u64, "{}", log());
    assert_eq!(plan["shadow"]["failed"], 0, "{}", log());
    assert_eq!(stat(&a, "conns_moved_out"), shadowed, "{}", log());
    assert_eq!(stat(&b, "conns_restored"), shadowed, "{}", log());
    // Whose app answered what: B every byte of the shadowed sessions, the first line
    // included; A the rest.
    let diverted = shadowed * per_session;
    let served_here = (SESSIONS as u64 - shadowed) * per_session;
    assert_eq!(stat(&b, "app_bytes_out"), diverted, "{}", log());
    assert_eq!(stat(&b, "app_bytes_in"), diverted, "{}", log());
    assert_eq!(stat(&a, "app_bytes_out"), served_here, "{}", log());
    assert_eq!(stat(&a, "app_bytes_in"), served_here, "{}", log());
    assert!(!a.log().contains("was not captured in time"), "{}", log());
    assert_eq!(plan["counts"]["planned"], 0, "{}", log());
    assert_eq!(plan["shadow"]["at_accept"], true, "{}", log());
    let table = a.ctl(&["plan"]).unwrap();
    assert!(table.contains("; diverting at the accept"), "{table}");
}

/// Bytes one session of the test above echoes (two lines of the same length).
fn session_bytes() -> u64 {
    (0..2)
        .map(|k| format!("session 00 line {k}\n").len() as u64)
        .sum()
}

/// Segment statistics ride the load reports: a connection on A echoes 3 MB and stays open;
/// B's `ctl peers` shows it as A's hottest connection, its segments (split at 1 MiB)
/// covering the stream from 0 and adding up to the bytes A sent it, and A's metrics count it.
#[test]
fn a_peer_shows_the_hottest_connections_segments_from_the_load_reports() {
    const ECHOED: u64 = 3_000_000;
    ensure_tools(&["socat"]).unwrap();
    let (tb, a, b) = nodes("[predict]\nmetric = \"connections\"\n");
    // 3 MB to the echo service, then the connection stays open (idle) for a while.
    let mut c = tb.client().command("sh");
    c.args([
        "-c",
        &format!(
            "(head -c {ECHOED} /dev/zero; sleep 15) | socat -t 5 - TCP:{SERVICE_ADDR}:7 | wc -c"
        ),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = tb.spawn(c).expect("socat");
    // A's connection, once it echoed everything.
    let mut id = 0;
    eventually(30, "the echo on A", || {
        let conns = a.ctl_json(&["conns"]).unwrap();
        match conns.as_array().unwrap().as_slice() {
            [c] if c["bytes_out"] == ECHOED => {
                id = c["id"].as_u64().unwrap();
                true
            }
            _ => false,
        }
    });
    // B's view of A's hottest connections, once a report counts every byte.
    let hottest = || peer(&b, "a").unwrap()["load"]["segments"].clone();
    let total = |e: &serde_json::Value| -> u64 {
        e["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["bytes"].as_u64().unwrap())
            .sum()
    };
    eventually(20, "A's report of the echo's segments at B", || {
        hottest()
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["conn"] == id && total(e) == ECHOED))
    });
    let h = hottest();
    let log = || format!("{h:#}\n--- a's log:\n{}", a.log());
    let entries = h.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{}", log());
    let segments = entries[0]["segments"].as_array().unwrap();
    // At least one split (3 MB past the 1 MiB split size) unless idle ranges merged since;
    // never more than a report carries; from offset 0, without gaps, the tail open.
    assert!((1..=4).contains(&segments.len()), "{}", log());
    assert_eq!(segments[0]["start"], 0, "{}", log());
    for w in segments.windows(2) {
        assert_eq!(w[0]["end"], w[1]["start"], "{}", log());
    }
    assert!(segments.last().unwrap()["end"].is_null(), "{}", log());
    let packets: u64 = segments
        .iter()
        .map(|s| s["packets"].as_u64().unwrap())
        .sum();
    assert!(packets > 0, "{}", log());
    let text = b.ctl(&["peers"]).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("a's hottest connections") && text.contains(&format!("{id:#x}: 0B-")),
        "{text}"
    );
    assert_eq!(metric(&a, "flowshift_predict_segment_connections"), 1);
    assert!(metric(&a, "flowshift_predict_segments") >= 1);
    // The echo completed byte for byte.
    let out = child.wait_with_output().expect("socat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ECHOED.to_string()
    );
}

/// Waits for an echo session and checks it echoed exactly what it sent and ended cleanly.
/// Runs `count` echo sessions on the client, a new one every `every`, at most two at a time:
/// `session(i)` gives each one's shell script (socat to the service) and the bytes it must
/// get back; each must end cleanly with exactly those bytes echoed.
fn echo_sessions(
    tb: &Testbed,
    count: usize,
    every: Duration,
    session: impl Fn(usize) -> (String, String),
) {
    let spawn = |i| {
        let (script, want) = session(i);
        let mut c = tb.client().command("sh");
        c.args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        (tb.spawn(c).expect("socat"), want)
    };
    let mut running = Vec::new();
    for i in 0..count {
        running.push(spawn(i));
        std::thread::sleep(every);
        if running.len() >= 3 {
            let (child, want) = running.remove(0);
            finish_echo(child, &want);
        }
    }
    for (child, want) in running {
        finish_echo(child, &want);
    }
}

/// `plan`, then A's and B's logs, for a failed assertion's message.
fn both_logs(plan: &serde_json::Value, a: &NodeHandle, b: &NodeHandle) -> String {
    format!(
        "{plan:#}\n--- a's log:\n{}\n--- b's log:\n{}",
        a.log(),
        b.log()
    )
}

fn finish_echo(child: std::process::Child, want: &str) {
    let out = child.wait_with_output().expect("socat");
    assert!(
        out.status.success(),
        "echo session failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "echoed bytes differ"
    );
}

/// The baseline: with the default policy (`manual`) the same ramp is planned and shown, and
/// nothing moves: A goes past its capacity.
#[test]
fn with_policy_manual_the_plan_is_shown_and_nothing_moves() {
    let (tb, a, b) = nodes(
        "[predict]\nmetric = \"connections\"\ncapacity = 10\n[predict.forecast]\nbeta = 0.2\n",
    );
    let (before, at_peak) = ramp(&tb, &a);
    assert_eq!((before, at_peak), (0, 0));
    let plan = a.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan["policy"], "manual", "{plan:#}");
    assert_eq!(plan["executes"], false);
    // A held every download: past its capacity.
    let peak = plan["peak_utilisation"].as_f64().unwrap();
    assert!(
        peak >= DOWNLOADS as f64 / CAPACITY as f64 - 1e-9,
        "{plan:#}"
    );
    // Moves were planned, with their reasons, and none executed.
    let decisions = plan["decisions"].as_array().unwrap();
    assert!(!decisions.is_empty(), "{plan:#}");
    assert!(
        decisions.iter().all(|d| d["outcome"] == "not-executed"
            && d["reason"].as_str().unwrap().contains("above threshold")),
        "{plan:#}"
    );
    assert_eq!(plan["counts"]["executed"], 0);
    assert_eq!(plan["counts"]["failed"], 0);
    assert!(plan["counts"]["planned"].as_u64().unwrap() >= decisions.len() as u64);
    assert!(
        a.log()
            .contains("would move a connection (policy manual: not executed)")
    );
    assert_eq!(metric(&a, "flowshift_predict_moves_executed_total"), 0);
    assert!(metric(&a, "flowshift_predict_moves_planned_total") > 0);
    assert_eq!(stat(&a, "conns_moved_out"), 0);
    assert_eq!(stat(&b, "conns_restored"), 0);
}

/// Downloads of the `cpu`-metric tests, all at once, each as fast as it goes.
const CPU_DOWNLOADS: usize = 8;
/// Bytes per download of the `cpu`-metric tests: several seconds of transfer on this machine
/// kind (the predictor needs B's load report, a forecast and a plan a second).
const CPU_BYTES: u64 = 1_000_000_000;

/// Nodes A and B for the `cpu`-metric tests: A runs the predictive policy on its data path's
/// CPU busy fraction, with a capacity of a quarter of its workers. [`CPU_DOWNLOADS`] bulk
/// downloads keep A's workers busy — at any busy fraction from 0.25 to 1 that is 1–4 times
/// A's capacity, and one download is an eighth of it (0.125–0.5 of a capacity), which an
/// idle peer has room for. What the test shows is then which peer the planner takes, not
/// the machine's speed. With `direct_return`, both nodes' peer entries say that B returns
/// the replies of connections moved to it from its own TUN.
fn cpu_nodes(direct_return: bool, services: &str) -> (Testbed, NodeHandle, NodeHandle) {
    ensure_tools(&["curl"]).unwrap();
    let tb = Testbed::new(TestbedOptions::default()).expect("testbed");
    let (a, b) = start_tunnel_pair_returning(
        &tb,
        NodeConfig::standard("a").extra(&format!(
            "[predict]\npolicy = \"predictive\"\nmetric = \"cpu\"\ncapacity = 0.25\n{services}"
        )),
        NodeConfig::standard("b").extra(services),
        direct_return,
        direct_return,
    )
    .expect("nodes");
    wait_alive(&a, &b, Duration::from_secs(10)).expect("tunnel up");
    eventually(20, "B's load report at A", || {
        !peer(&a, "b").unwrap()["load"].is_null()
    });
    let plan = a.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan["metric"], "cpu", "{plan}");
    assert_eq!(plan["policy"], "predictive", "{plan}");
    (tb, a, b)
}

/// Opens [`CPU_DOWNLOADS`] downloads from the `http` app on `port` of A at once, calls
/// `during` every 100 ms while they run (until it returns true or they end), waits for every
/// one and asserts each is byte-exact, without a reset. Returns whether `during` returned
/// true.
fn bulk_downloads(tb: &Testbed, port: u16, mut during: impl FnMut() -> bool) -> bool {
    let mut downloads = Vec::new();
    for _ in 0..CPU_DOWNLOADS {
        let mut c = tb.client().command("curl");
        c.args(["-sS", "--fail", "--max-time", "600"])
            .arg(format!("http://{SERVICE_ADDR}:{port}/bytes/{CPU_BYTES}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = tb.spawn(c).expect("curl");
        let reader = verify_counting_at(child.stdout.take().unwrap(), None);
        downloads.push((child, reader));
    }
    let mut seen = false;
    while !seen && downloads.iter().any(|(_, r)| !r.is_finished()) {
        seen = during();
        std::thread::sleep(Duration::from_millis(100));
    }
    for (child, reader) in downloads {
        finish_download(child, reader, CPU_BYTES);
    }
    seen
}

/// Under the `cpu` metric a move to a relaying peer leaves this node the forwarding of every
/// byte, which for a bulk download costs more CPU than serving it (`relay_cpu_s_per_gb`): A,
/// far above its capacity with bulk downloads and B idle, plans no move and says why ("no
/// target"); every download is served by A, byte-exact. What holds it: serving costs A's data
/// path less CPU time per GB than the 1.18 s relaying would (about 0.6 here, with the clients
/// and verifiers on the same 2 vCPUs) — a machine over twice as slow per byte would need its
/// own `relay_cpu_s_per_gb`, as docs/prediction.md says.
#[test]
fn under_the_cpu_metric_bulk_downloads_are_not_moved_to_a_relaying_peer() {
    let (tb, a, b) = cpu_nodes(false, "");
    let mut above = None;
    let no_target = bulk_downloads(&tb, 80, || {
        let plan = a.ctl_json(&["plan"]).unwrap();
        if plan["plan"]["status"] == "no-target" {
            above = Some(plan);
            return true;
        }
        false
    });
    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || format!("{plan:#}\n--- a's log:\n{}", a.log());
    assert!(no_target, "A never planned above its threshold: {}", log());
    let above = above.unwrap();
    assert!(
        above["plan"]["moves"]
            .as_array()
            .is_some_and(|m| m.is_empty()),
        "{above}"
    );
    // What the planner weighed: the workers' busy time and, of it, their CPU time.
    eprintln!(
        "no target at busy {} (cpu time {}), utilisation {}",
        above["cpu_busy"], above["cpu_time"], above["utilisation"]
    );
    let utilisation = above["utilisation"].as_f64().unwrap();
    let predicted = above["predicted_utilisation"].as_f64().unwrap();
    let threshold = above["threshold"].as_f64().unwrap();
    assert!(
        utilisation.max(predicted) > threshold,
        "no-target below the threshold: {above}"
    );
    assert_eq!(above["peers"][0]["return_path"], "relayed", "{above}");
    assert_eq!(plan["counts"]["planned"], 0, "{}", log());
    assert_eq!(plan["counts"]["executed"], 0, "{}", log());
    assert!(
        plan["decisions"].as_array().unwrap().is_empty(),
        "{}",
        log()
    );
    assert_eq!(stat(&a, "conns_moved_out"), 0);
    assert_eq!(stat(&b, "conns_restored"), 0);
}

/// Emulated application work on the `cpu`-metric tests' dear service (both nodes): CRC-32
/// passes over every byte served, about 0.04 CPU s per GB each on an AMD EPYC of this machine
/// kind (serving then costs A's data path about 1.05 s per GB), far less on an Intel Xeon
/// (about 0.32 s per GB with the serving, measured from the node's own `ctl plan` on
/// 2026-12-07).
const WORK_PASSES: u32 = 16;
/// What forwarding a direct-return download's ACKs costs the ingress, as the test's planner
/// assumes (`[predict.plan] direct_cpu_s_per_gb`; the default 0.43 was measured on the AMD,
/// where serving costs more too). Below what serving the dear service costs on either
/// machine: the test shows which peer the planner takes and what a move carries, not a
/// calibration of the default.
const DIRECT_CPU_S_PER_GB: f64 = 0.1;
/// Port of that service (`http` with [`WORK_PASSES`]).
const DEAR_PORT: u16 = 8080;

/// The same bulk downloads of an app that computes on what it serves ([`WORK_PASSES`] on
/// both nodes), with B returning moved connections' replies from its own TUN: a move leaves
/// A only the client's ACKs to forward, far less than serving, so A, above its capacity on
/// its workers' measured CPU, moves downloads to B; the work goes with them (B's own
/// `work_bytes` counter), and every download stays byte-exact, without a reset. (Without the
/// work, serving a download of the built-in apps costs about what forwarding its ACKs does,
/// and the planner weighs it so: `a_cheaply_served_bulk_download_is_moved_to_no_peer`.)
#[test]
fn under_the_cpu_metric_downloads_dear_to_serve_move_to_a_direct_return_peer_byte_exact() {
    let dear = format!(
        "[[service]]\nport = {DEAR_PORT}\napp = \"http\"\nwork_passes = {WORK_PASSES}\n\
         [predict.plan]\ndirect_cpu_s_per_gb = {DIRECT_CPU_S_PER_GB}\n"
    );
    let (tb, a, b) = cpu_nodes(true, &dear);
    bulk_downloads(&tb, DEAR_PORT, || false);
    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || format!("{plan:#}\n--- a's log:\n{}", a.log());
    let executed = plan["counts"]["executed"].as_u64().unwrap();
    assert!(executed >= 1, "nothing moved: {}", log());
    assert_eq!(plan["counts"]["failed"], 0, "{}", log());
    let decisions = plan["decisions"].as_array().unwrap();
    assert_eq!(decisions.len() as u64, executed, "{}", log());
    for d in decisions {
        assert_eq!(d["outcome"], "moved", "{}", log());
        assert_eq!(d["target"], "b", "{}", log());
        assert_eq!(d["return_path"], "direct return", "{}", log());
        // Above the threshold on the CPU A's workers measured, not on a guess.
        let utilisation = d["utilisation"].as_f64().unwrap();
        assert!(utilisation > d["threshold"].as_f64().unwrap(), "{}", log());
        let conn_load = d["conn_load"].as_f64().unwrap();
        assert!(conn_load > 0.0, "{}", log());
        // The ACKs' forwarding is counted, and is less than serving.
        let left = d["left_here"].as_f64().unwrap();
        assert!(left > 0.0 && left < conn_load, "{}", log());
        eprintln!(
            "moved at utilisation {utilisation:.2}: connection {conn_load:.3}, left here {left:.3}"
        );
    }
    assert_eq!(stat(&a, "conns_moved_out"), executed);
    assert_eq!(stat(&b, "conns_restored"), executed);
    // B did the app's work for the connections it took over.
    assert!(stat(&b, "work_bytes") > 0, "{}", log());
    assert!(stat(&a, "work_bytes") > 0, "{}", log());
}

/// Downloads of the rebalancing test: 6 of capacity 10 on A, under its threshold all along.
const REBALANCE_DOWNLOADS: usize = 6;
/// 60 s at 250 kB/s: well past the planner's 30-s cooldown after the moves, when A could
/// take a connection back.
const REBALANCE_BYTES: u64 = 15_000_000;
/// The cooldown after a move during which A renews its lease whatever its load.
const COOLDOWN: Duration = Duration::from_secs(30);

/// Rebalancing after a scale-out: A (`rebalance = true`, policy `reactive`, capacity 10
/// connections) holds 6 downloads, never above its threshold, beside an empty B (a node that
/// has just joined). A hands B connections until the two are within half the imbalance
/// threshold (0.3) of each other, each decision saying so ("rebalancing"), and keeps them
/// there: no connection comes back and nothing more moves while the downloads run on past
/// the cooldown, A renewing their leases although it has room for them (taking one back
/// would open the spread again). Every download is byte-exact, without a reset.
#[test]
fn an_empty_peer_is_given_connections_by_rebalancing_and_they_stay_byte_exact() {
    let (tb, a, b) = nodes(
        "[predict]\npolicy = \"reactive\"\nmetric = \"connections\"\ncapacity = 10\n\
         [predict.plan]\nrebalance = true\n",
    );
    let plan = a.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan["rebalance"], true, "{plan}");
    let mut downloads = Vec::new();
    for i in 0..REBALANCE_DOWNLOADS {
        let (child, reader) = open_download(&tb, &a, i, REBALANCE_BYTES);
        downloads.push((child, reader));
    }
    // Served here / restored at B, from A's and B's own counters.
    let split = || {
        let moved = stat(&a, "conns_moved_out") - stat(&a, "conns_restored");
        (REBALANCE_DOWNLOADS as u64 - moved, moved)
    };
    // A plan evens the two out (3 / 3 from 6 / 0); one made while the downloads were still
    // being opened may stop at 2 / 2, and the last two leave 4 / 2, a spread (0.2) under the
    // imbalance threshold: both are settled. A plan's moves run one after the other, so the
    // split is read again once they are done.
    eventually(30, "A rebalancing to B", || {
        let (here, there) = split();
        there >= 1 && here <= there + 2
    });
    std::thread::sleep(Duration::from_secs(3));
    let settled = split();
    assert!(settled.1 >= 1 && settled.0 <= settled.1 + 2, "{settled:?}");
    let settled_at = Instant::now();
    let executed = || {
        a.ctl_json(&["plan"]).unwrap()["counts"]["executed"]
            .as_u64()
            .unwrap()
    };
    let moves = executed();
    // The downloads run on past the cooldown (30 s after the last move): nothing more moves
    // and nothing comes back, while A renews the leases.
    let mut renewing = false;
    while downloads.iter().any(|(_, r)| !r.is_finished()) {
        std::thread::sleep(Duration::from_millis(500));
        if downloads.iter().any(|(_, r)| r.is_finished()) {
            break; // the first download ended: the loads change from here on
        }
        assert_eq!(split(), settled, "a connection moved again: {}", a.log());
        if settled_at.elapsed() > COOLDOWN + Duration::from_secs(2) {
            let plan = a.ctl_json(&["plan"]).unwrap();
            renewing |= plan["leases"]["offloaded"]
                .as_array()
                .is_some_and(|o| !o.is_empty() && o.iter().all(|x| x["renewing"] == true));
        }
    }
    for (child, reader) in downloads {
        finish_download(child, reader, REBALANCE_BYTES);
    }

    let plan = a.ctl_json(&["plan"]).unwrap();
    let log = || format!("{plan:#}\n--- a's log:\n{}", a.log());
    assert_eq!(executed(), moves, "{}", log());
    assert_eq!(moves, settled.1, "{}", log());
    assert_eq!(plan["counts"]["failed"], 0, "{}", log());
    assert!(
        renewing,
        "A did not renew its offloaded leases past the cooldown: {}",
        log()
    );
    // Never above the threshold: every move was a rebalancing one.
    assert!(
        plan["peak_utilisation"].as_f64().unwrap() < 0.85,
        "{}",
        log()
    );
    let decisions = plan["decisions"].as_array().unwrap();
    assert_eq!(decisions.len() as u64, moves, "{}", log());
    for d in decisions {
        assert_eq!(d["outcome"], "moved", "{}", log());
        assert_eq!(d["target"], "b", "{}", log());
        assert!(d["rebalance"].is_number(), "{}", log());
        let reason = d["reason"].as_str().unwrap();
        assert!(reason.contains("rebalancing"), "{}", log());
    }
    assert!(
        a.log().contains("predict: moving a connection"),
        "{}",
        log()
    );
    // B handed nothing back.
    let plan_b = b.ctl_json(&["plan"]).unwrap();
    assert_eq!(plan_b["leases"]["counts"]["returned"], 0, "{plan_b:#}");
    assert_eq!(stat(&b, "conns_restored"), moves);
    assert_eq!(stat(&b, "conns_moved_out"), 0);
}
