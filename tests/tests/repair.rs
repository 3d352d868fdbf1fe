//! The kernel baseline of live migration: one kernel TCP connection handed between node-a and
//! node-b with Linux TCP_REPAIR while a download runs, checked byte for byte by the client; and
//! a deliberately broken restore that the checks must catch.

use std::time::Duration;

use flowshift_tests::kernel_handoff::{self, Fault, HandoffOptions};
use flowshift_tests::oracle::counting_crc32_hex;
use flowshift_tests::{Node, Testbed, TestbedOptions};

const TOTAL: u64 = 200_000_000;

/// The client reads at 100 MB/s, so the 200 MB download lasts about 2 s and the handoffs
/// (from 0.3 s on, every 60 ms) happen while the client's window is the bottleneck: the
/// server's send queue holds bytes, sent and never sent, that must move with the socket.
fn options() -> HandoffOptions {
    HandoffOptions {
        port: 7019,
        handoffs: 10,
        interval: Duration::from_millis(60),
        warmup: Duration::from_millis(300),
        settle: Duration::from_millis(50),
        max_duration: Duration::from_secs(20),
        total_bytes: Some(TOTAL),
        client_rate: Some(100_000_000),
        fault: None,
    }
}

#[test]
fn ten_tcp_repair_handoffs_keep_a_200_mb_download_byte_exact() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let run = kernel_handoff::run(&tb, &options()).unwrap();

    // All handoffs done, alternating, each while the download was still running.
    assert_eq!(run.handoffs.len(), 10, "{run:?}");
    for (i, h) in run.handoffs.iter().enumerate() {
        let (from, to) = if i % 2 == 0 {
            (Node::A, Node::B)
        } else {
            (Node::B, Node::A)
        };
        assert_eq!((h.from, h.to), (from, to));
        assert!(
            h.stream_offset < TOTAL,
            "handoff {i} after the stream ended: {h:?}"
        );
        assert!(h.restored > h.freeze);
        // The restored socket sends full-size segments, as the source did.
        assert_eq!(h.target_mss, h.source_mss, "handoff {i}: {h:?}");
        assert!(h.source_mss > 1000, "handoff {i}: {h:?}");
    }
    // Real queues moved (the client was the bottleneck), including never-sent bytes.
    assert!(
        run.handoffs.iter().filter(|h| h.send_queue > 0).count() >= 5,
        "{:?}",
        run.handoffs
    );
    assert!(
        run.handoffs.iter().any(|h| h.unsent > 0),
        "{:?}",
        run.handoffs
    );
    // Byte-exact, no reset: run() checked every byte against the counting stream, the end of
    // stream after exactly the bytes written, and both CRC-32s; check against the oracle too.
    assert_eq!(run.received, TOTAL);
    assert_eq!(format!("{:08x}", run.crc32), counting_crc32_hex(TOTAL));
    // The stream kept flowing after the last handoff.
    let last = run.handoffs.last().unwrap().restored.as_nanos() as u64;
    let before = run
        .reads
        .iter()
        .take_while(|r| r.0 <= last)
        .last()
        .unwrap()
        .1;
    assert!(
        run.received > before,
        "nothing received after the last handoff"
    );
}

#[test]
fn a_corrupted_restore_is_caught_by_the_client() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let mut o = options();
    o.port = 7020;
    o.fault = Some(Fault::CorruptSendQueueTail);
    let e = kernel_handoff::run(&tb, &o).unwrap_err().to_string();
    assert!(e.contains("counting stream mismatch"), "{e}");
}
