//! Writes seed inputs for the `decode` fuzz target: real handshake messages, a cookie reply
//! and records from a simulated session, record plaintexts with every frame type, load
//! reports, and truncations. Every run checks that each seed decodes without panicking; with
//! `FLOWSHIFT_WRITE_CORPUS=1` it also writes them to `fuzz/corpus/decode`.

mod sim;

use std::time::Duration;

use flowshift_tunnel::wire::coding::Writer;
use flowshift_tunnel::wire::{AckFrame, Frame};
use flowshift_tunnel::{
    KpiReport, LeaseRenewal, LoadForecast, LoadReport, SegmentReport, SegmentStat,
};
use sim::{Setup, mac1_for};

fn record(frames: &[Frame<'_>]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = Writer::new(&mut buf);
    w.varint(300).unwrap();
    for f in frames {
        f.emit(&mut w).unwrap();
    }
    let n = w.position();
    buf.truncate(n);
    buf
}

#[test]
fn fuzz_corpus_seeds_decode_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut p = Setup::new(7).build();
    p.record_wire = true;
    p.connect();
    p.a.ep.send_message(p.a.peer, &[1u8; 3000]).unwrap();
    p.a.ep.send_datagram(p.a.peer, b"datagram").unwrap();
    p.run_for(Duration::from_secs(2));
    // A cookie reply: B under load (A's source has spent its allowance) answers another
    // initiation with one. (Verbatim repeats are dropped as replays, so each copy gets its
    // own sender index and a valid mac1.)
    let init = p
        .wire
        .iter()
        .find(|(to_b, d)| *to_b && d[1] == 1)
        .map(|(_, d)| d.clone())
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut cookie_reply = None;
    for i in 0..20u32 {
        let (now, from) = (p.now, p.a.addr);
        let mut copy = init.clone();
        copy[4..8].copy_from_slice(&(0x7000 + i).to_le_bytes());
        let mac = mac1_for(p.b.keypair.public(), &copy[..120]);
        copy[120..136].copy_from_slice(&mac);
        p.b.ep.handle_datagram(now, from, &mut copy);
        while let Some(t) = p.b.ep.poll_transmit(now, &mut buf) {
            if buf[1] == 3 {
                cookie_reply = Some(buf[..t.size].to_vec());
            }
        }
    }
    let cookie_reply = cookie_reply.expect("a cookie reply");
    assert_eq!(
        flowshift_tunnel::wire::decode_any(&cookie_reply),
        Ok(flowshift_tunnel::wire::MessageType::CookieReply)
    );
    let mut seeds: Vec<(String, Vec<u8>)> = vec![("cookie-reply".into(), cookie_reply)];
    let mut kinds = std::collections::BTreeMap::new();
    for (_, d) in &p.wire {
        let ty = d[1];
        let n = kinds.entry(ty).or_insert(0);
        if *n < 3 {
            seeds.push((format!("wire-type{ty}-{n}"), d.clone()));
            *n += 1;
        }
    }
    let report = LoadReport {
        cpu_busy: 0.42,
        connections: 1234,
        bytes_in_per_sec: 1 << 30,
        bytes_out_per_sec: 99,
        forecast: Some(LoadForecast {
            horizon: Duration::from_secs(60),
            cpu_busy: 0.9,
            connections: 5000,
        }),
        leases: vec![
            LeaseRenewal {
                conn: 0x2_0000_0001,
                volume: Some(Duration::from_millis(4200)),
            },
            LeaseRenewal {
                conn: 3,
                volume: None,
            },
        ],
        kpis: vec![KpiReport {
            conn: 0x1_0000_0009,
            latency: Some(Duration::from_micros(850)),
            error: false,
        }],
        segments: vec![SegmentReport {
            conn: 0x1_0000_0009,
            segments: vec![
                SegmentStat {
                    start: 0,
                    len: Some(3 << 20),
                    bytes: 3 << 20,
                    packets: 2_100,
                    idle: Duration::from_millis(12_000),
                },
                SegmentStat {
                    start: 3 << 20,
                    len: None,
                    bytes: 70_000,
                    packets: 50,
                    idle: Duration::from_millis(30),
                },
            ],
        }],
    }
    .to_bytes();
    seeds.push(("load-report".into(), report.clone()));
    let ack = AckFrame::new(25, [100..=120, 90..=97, 0..=5]).unwrap();
    seeds.push((
        "record-all-frames".into(),
        record(&[
            Frame::Padding,
            Frame::Ping,
            Frame::Ack(ack),
            Frame::Stream {
                offset: 70_000,
                data: b"stream bytes",
            },
            Frame::Window(1 << 22),
            Frame::Heartbeat(&report),
            Frame::Datagram(b"ip packet"),
        ]),
    ));
    seeds.push((
        "record-unknown-frame".into(),
        record(&[Frame::Ping]).into_iter().chain([0x7f]).collect(),
    ));
    let truncated: Vec<(String, Vec<u8>)> = seeds
        .iter()
        .map(|(name, d)| (format!("{name}-truncated"), d[..d.len() / 2].to_vec()))
        .collect();
    seeds.extend(truncated);
    assert!(seeds.len() >= 10);
    for (_, data) in &seeds {
        let _ = flowshift_tunnel::wire::decode_any(data);
    }
    if std::env::var_os("FLOWSHIFT_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
