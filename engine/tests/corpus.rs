//! Seed inputs for the fuzz targets under `fuzz/`, and the replay of the committed corpora
//! through the same harnesses (`flowshift::fuzzing`), so that CI exercises what the fuzzer
//! runs, on stable. Every run checks that each seed does what it was made for; with
//! `FLOWSHIFT_WRITE_CORPUS=1` it also (re)writes the seeds to `fuzz/corpus/<target>/`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use flowshift::control::{MAX_LINE, Request};
use flowshift::fuzzing;
use flowshift::offload::{self, VNET_HDR_LEN};
use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn write_seeds(target: &str, seeds: &[(String, Vec<u8>)]) {
    if std::env::var_os("FLOWSHIFT_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Runs `harness` over every committed file of `target`'s corpus; returns how many files the
/// harness accepted. The files this test writes as `seed-*` must be accepted.
fn replay(target: &str, mut harness: impl FnMut(&[u8]) -> bool) -> usize {
    let dir = corpus_dir(target);
    let (mut n, mut accepted) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let ok = harness(&std::fs::read(entry.path()).unwrap());
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            ok || !name.starts_with("seed-"),
            "{target}/{name} is rejected: rewrite the corpus (FLOWSHIFT_WRITE_CORPUS=1)"
        );
        n += 1;
        accepted += usize::from(ok);
    }
    assert!(n >= 5, "only {n} corpus files in {}", dir.display());
    assert!(accepted > 0, "the {target} harness accepted nothing");
    accepted
}

fn tcp_packet(payload: &[u8]) -> Vec<u8> {
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 40000);
    let dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80);
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(7),
        ack_number: Some(TcpSeqNumber(9)),
        window_len: 64240,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    flowshift_core::packet::emit_ipv4_tcp(*src.ip(), *dst.ip(), &tcp)
}

/// What the kernel hands over: a header as `offload::prepare` writes it, then the packet.
fn read_of(payload: &[u8], gso_size: u16) -> Vec<u8> {
    let mut raw = vec![0u8; VNET_HDR_LEN];
    raw.extend_from_slice(&tcp_packet(payload));
    offload::prepare(&mut raw, VNET_HDR_LEN, gso_size).unwrap();
    raw
}

fn offload_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![
        ("seed-needs-csum".to_owned(), read_of(b"hello!!", 0)),
        ("seed-needs-csum-odd".into(), read_of(b"odd", 0)),
        ("seed-merged".into(), read_of(&[0x5a; 3000], 1460)),
    ];
    let mut plain = vec![0u8; VNET_HDR_LEN];
    plain.extend_from_slice(&tcp_packet(b"plain"));
    seeds.push(("seed-plain".into(), plain.clone()));
    let mut ecn = read_of(&[1; 2000], 1448);
    ecn[1] |= 0x80;
    seeds.push(("seed-merged-ecn".into(), ecn));
    let mut udp = plain.clone();
    udp[1] = 3;
    seeds.push(("reject-gso-udp".into(), udp));
    let mut bad = read_of(b"x", 0);
    bad[6..8].copy_from_slice(&1000u16.to_ne_bytes());
    seeds.push(("reject-offsets".into(), bad));
    seeds.push(("reject-short".into(), vec![1, 0, 0, 0]));
    seeds
}

#[test]
fn offload_seeds_parse() {
    let seeds = offload_seeds();
    for (name, bytes) in &seeds {
        assert_eq!(fuzzing::offload(bytes), name.starts_with("seed-"), "{name}");
    }
    write_seeds("offload", &seeds);
}

#[test]
fn offload_corpus_replay() {
    replay("offload", fuzzing::offload);
}

/// Kernel answers: acknowledgements and refusals of request 1 (built by echoing our own
/// request header in an NLMSG_ERROR, as the kernel does), another request's answer, and
/// truncations.
fn netlink_seeds() -> Vec<(String, Vec<u8>)> {
    let ack = |seq: u32, errno: i32, request: &[u8]| {
        let mut m = Vec::new();
        let len = 16 + 4 + request.len().min(16);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&request[..request.len().min(16)]);
        m
    };
    let add = fuzzing::netlink_request(true, Ipv4Addr::new(198, 19, 255, 1), 32, 5);
    let del = fuzzing::netlink_request(false, Ipv4Addr::new(198, 19, 0, 0), 16, 7);
    let mut seeds = vec![
        ("seed-ack".to_string(), ack(1, 0, &add)),
        ("seed-eexist".to_string(), ack(1, 17, &add)),
        ("seed-esrch".to_string(), ack(1, 3, &del)),
    ];
    let mut two = ack(2, 0, &del);
    two.extend(ack(1, 1, &add));
    seeds.push(("seed-second-of-two".into(), two));
    seeds.push(("reject-other-request".into(), ack(2, 0, &add)));
    let full = ack(1, 0, &add);
    seeds.push(("reject-truncated".into(), full[..full.len() - 3].to_vec()));
    seeds.push(("reject-request-not-an-answer".into(), add));
    seeds
}

#[test]
fn netlink_seeds_parse() {
    let seeds = netlink_seeds();
    for (name, bytes) in &seeds {
        assert_eq!(
            fuzzing::netlink_reply(bytes),
            name.starts_with("seed-"),
            "{name}"
        );
    }
    write_seeds("netlink", &seeds);
}

#[test]
fn netlink_corpus_replay() {
    assert!(replay("netlink", fuzzing::netlink_reply) >= 4);
}

fn control_seeds() -> Vec<(String, Vec<u8>)> {
    let requests = [
        Request::Conns { all: true },
        Request::Drain { to: "b".into() },
        Request::Freeze { id: 5 },
        Request::Metrics,
        Request::Migrate {
            to: "node-b".into(),
            conns: vec![1, 2, 3],
            port: Some(80),
            count: Some(10),
            all: false,
        },
        Request::Peers,
        Request::Status,
        Request::Thaw { id: u64::MAX },
        Request::TunnelSend {
            peer: "b".into(),
            bytes: 1 << 20,
            channel: Some("datagram".into()),
        },
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut input = vec![i as u8 * 3];
            input.extend(serde_json::to_vec(r).unwrap());
            input.push(b'\n');
            (format!("seed-{i:02}"), input)
        })
        .collect();
    seeds.push((
        "seed-mixed".into(),
        b"\x07\n  \r\n{\"cmd\":\"status\"}\ngarbage\n\xff\xfe\n{\"cmd\":\"conns\"}\r\n{\"cmd\":\"freeze\",\"id\":-1}\n{\"cmd\":\"migrate\",\"to\":\"b\",\"all\":true}"
            .to_vec(),
    ));
    seeds.push((
        "seed-short-forms".into(),
        b"\x00{\"cmd\":\"conns\"}\n{\"cmd\":\"migrate\",\"to\":\"b\",\"count\":2}\n{\"cmd\":\"tunnel_send\",\"peer\":\"p\",\"bytes\":0}\n".to_vec(),
    ));
    // A line past the limit after a valid one: an error, and the connection ends.
    let mut long = b"\xff{\"cmd\":\"peers\"}\n".to_vec();
    long.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
    long.extend_from_slice(b"\n{\"cmd\":\"status\"}\n");
    seeds.push(("seed-long-line".into(), long));
    seeds
}

#[test]
fn control_seeds_are_served() {
    let seeds = control_seeds();
    for (name, bytes) in &seeds {
        let run = fuzzing::control(bytes);
        assert!(!run.requests.is_empty(), "{name}: {run:?}");
    }
    let long = fuzzing::control(&seeds.last().unwrap().1);
    assert_eq!(
        long.replies.len(),
        2,
        "the request after the long line is not read"
    );
    write_seeds("control", &seeds);
}

#[test]
fn control_corpus_replay() {
    let mut requests = 0;
    replay("control", |b| {
        let run = fuzzing::control(b);
        requests += run.requests.len();
        !run.requests.is_empty()
    });
    assert!(requests > 0);
}
