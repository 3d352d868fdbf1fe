//! Seed inputs for the fuzz targets under `fuzz/`, and the replay of the committed corpora
//! through the same harnesses (`flowshift_core::fuzzing`), so that CI exercises what the
//! fuzzer runs, on stable. Every run checks that each seed does what it was made for; with
//! `FLOWSHIFT_WRITE_CORPUS=1` it also (re)writes the seeds to `fuzz/corpus/<target>/`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use flowshift_core::app::{self, AppConfig, AppKind};
use flowshift_core::fuzzing::{self, CLIENT_BASE, SERVICE, StackHarness};
use flowshift_core::packet::emit_ipv4_tcp;
use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr};

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

/// Runs `harness` over every committed file of `target`'s corpus; returns how many files and
/// how many the harness accepted. The files this test writes (`seed-*`) must be accepted: a
/// format change without a corpus rewrite fails here.
fn replay(target: &str, mut harness: impl FnMut(&[u8]) -> bool) -> (usize, usize) {
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
    (n, accepted)
}

struct Seg<'a> {
    control: TcpControl,
    port: u16,
    seq: u32,
    ack: Option<u32>,
    payload: &'a [u8],
    options: bool,
}

impl Seg<'_> {
    fn repr(&self, src_port: u16) -> TcpRepr<'_> {
        let syn = self.control == TcpControl::Syn;
        TcpRepr {
            src_port,
            dst_port: self.port,
            control: self.control,
            seq_number: TcpSeqNumber(self.seq as i32),
            ack_number: self.ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 64240,
            window_scale: (syn && self.options).then_some(7),
            max_seg_size: (syn && self.options).then_some(1460),
            sack_permitted: syn && self.options,
            sack_ranges: [None; 3],
            timestamp: self.options.then_some(TcpTimestampRepr {
                tsval: 1000,
                tsecr: 0,
            }),
            payload: self.payload,
        }
    }

    /// A whole IPv4 packet from `client` to the service.
    fn packet(&self, client: SocketAddrV4) -> Vec<u8> {
        emit_ipv4_tcp(*client.ip(), SERVICE, &self.repr(client.port()))
    }
}

fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 40000)
}

fn classify_seeds() -> Vec<(String, Vec<u8>)> {
    let seg = |control, payload: &'static [u8], options| Seg {
        control,
        port: 80,
        seq: 12345,
        ack: (control != TcpControl::Syn).then_some(777),
        payload,
        options,
    };
    let syn = seg(TcpControl::Syn, b"", true).packet(client());
    let mut seeds = vec![
        ("seed-syn".to_owned(), syn.clone()),
        (
            "seed-syn-plain".into(),
            seg(TcpControl::Syn, b"", false).packet(client()),
        ),
        (
            "seed-data".into(),
            seg(TcpControl::Psh, b"GET /health HTTP/1.1\r\n\r\n", true).packet(client()),
        ),
        (
            "seed-fin".into(),
            seg(TcpControl::Fin, b"", true).packet(client()),
        ),
        (
            "seed-rst".into(),
            seg(TcpControl::Rst, b"", false).packet(client()),
        ),
    ];
    let mut padded = syn.clone();
    padded.extend_from_slice(&[0; 14]); // link padding past the IP length
    seeds.push(("seed-padded".into(), padded));
    // Accepted only without checksum verification (a merged packet).
    let mut bad_sum = seg(TcpControl::Psh, b"merged", true).packet(client());
    let n = bad_sum.len();
    bad_sum[n - 1] ^= 0xff;
    seeds.push(("seed-bad-checksum".into(), bad_sum));
    // Rejected: a fragment, UDP, IPv6, truncated, not for us.
    let mut frag = syn.clone();
    frag[6] |= 0x20;
    seeds.push(("reject-fragment".into(), frag));
    let mut udp = syn.clone();
    udp[9] = 17;
    seeds.push(("reject-udp".into(), udp));
    seeds.push(("reject-ipv6".into(), vec![0x60; 60]));
    seeds.push(("reject-truncated".into(), syn[..30].to_vec()));
    let mut other = syn.clone();
    other[16] = 10;
    seeds.push(("reject-not-ours".into(), other));
    seeds
}

#[test]
fn classify_seeds_are_classified() {
    let seeds = classify_seeds();
    for (name, bytes) in &seeds {
        assert_eq!(
            fuzzing::classify(bytes),
            name.starts_with("seed-"),
            "{name}"
        );
    }
    write_seeds("classify", &seeds);
}

#[test]
fn classify_corpus_replay() {
    replay("classify", fuzzing::classify);
}

/// One record of the stack harness's input.
fn record(op: u8, bytes: &[u8]) -> Vec<u8> {
    let mut r = vec![op];
    r.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    r.extend_from_slice(bytes);
    r
}

/// A segment record (kind 2) with `adjust` bits (see `StackHarness::segment`), after `ms`
/// milliseconds.
fn segment(ms: u8, adjust: u8, seg: &Seg<'_>, port: u16) -> Vec<u8> {
    let packet = seg.packet(SocketAddrV4::new(CLIENT_BASE, port));
    let mut bytes = vec![adjust];
    bytes.extend_from_slice(&packet[20..]);
    record(ms << 2 | 2, &bytes)
}

/// A whole connection to `service`: handshake, `request` (in two pieces), FIN, the ACKs of
/// what the stack sends, with `options` or not.
fn conversation(service: u16, request: &[u8], options: bool) -> Vec<u8> {
    let port = 40_000 + service;
    let seg = |control, payload| Seg {
        control,
        port: service,
        seq: 1000,
        ack: None,
        payload,
        options,
    };
    let auto = 4 | 8; // ACK what the stack sent, at the sequence number it expects
    let (a, b) = request.split_at(request.len() / 2);
    let mut input = segment(0, 0, &seg(TcpControl::Syn, b""), port);
    input.extend(segment(1, auto, &seg(TcpControl::None, b""), port));
    input.extend(segment(1, auto, &seg(TcpControl::Psh, a), port));
    input.extend(segment(2, auto, &seg(TcpControl::Psh, b), port));
    for _ in 0..4 {
        input.extend(segment(5, auto, &seg(TcpControl::None, b""), port));
    }
    input.extend(segment(1, auto, &seg(TcpControl::Fin, b""), port));
    input.extend(segment(20, auto, &seg(TcpControl::None, b""), port));
    input
}

fn stack_seeds() -> Vec<(String, Vec<u8>)> {
    let get = b"GET /bytes/3000 HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n\r\n";
    let upload =
        b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut seeds = vec![
        ("seed-http-get".to_owned(), conversation(80, get, true)),
        ("seed-http-upload".into(), conversation(80, upload, false)),
        (
            "seed-echo".into(),
            conversation(7, b"echo me, please", true),
        ),
        (
            "seed-sink".into(),
            conversation(9, b"discard these bytes", false),
        ),
        ("seed-source".into(), conversation(19, b"", true)),
        ("seed-closed-port".into(), conversation(5, b"x", true)),
    ];
    // A SYN flood from the four clients: cookies and refusals.
    let mut flood = Vec::new();
    for i in 0..16u16 {
        let syn = Seg {
            control: TcpControl::Syn,
            port: 80,
            seq: u32::from(i) * 1000,
            ack: None,
            payload: b"",
            options: i % 2 == 0,
        };
        flood.extend(segment(0, (i % 4) as u8, &syn, 50_000 + i));
    }
    seeds.push(("seed-syn-flood".into(), flood));
    // Raw packets: one with checksums to fill, one merged, one garbage.
    let data = Seg {
        control: TcpControl::Psh,
        port: 7,
        seq: 1,
        ack: Some(1),
        payload: b"no connection",
        options: true,
    }
    .packet(client());
    let mut unsummed = data.clone();
    unsummed[10] = 0;
    unsummed[11] = 0;
    let mut raw = record(1, &unsummed);
    raw.extend(record(3, &data));
    raw.extend(record(0, b"\x45garbage"));
    raw.extend(record(63 << 2, &data));
    seeds.push(("seed-raw".into(), raw));
    seeds
}

#[test]
fn stack_seeds_run() {
    let seeds = stack_seeds();
    let mut h = StackHarness::new();
    for (name, bytes) in &seeds {
        let run = h.run(bytes);
        assert!(run.packets > 0 && run.emitted > 0, "{name}: {run:?}");
        if name.starts_with("seed-http") || name == "seed-echo" || name == "seed-sink" {
            assert!(run.accepted == 1, "{name}: {run:?}");
        }
    }
    // The conversations get their responses: the segment adjustments work.
    let run = StackHarness::new().run(&seeds[0].1);
    assert!(run.app_bytes_out > 3000, "{run:?}");
    write_seeds("stack", &seeds);
}

#[test]
fn stack_corpus_replay() {
    let mut h = StackHarness::new();
    let (mut packets, mut accepted, mut served) = (0, 0, 0);
    replay("stack", |b| {
        let run = h.run(b);
        packets += run.packets;
        accepted += run.accepted;
        served += run.app_bytes_out;
        run.classified > 0
    });
    assert!(
        packets > 0 && accepted > 0 && served > 0,
        "{packets} packets, {accepted} connections, {served} bytes served"
    );
}

fn http_seeds() -> Vec<(String, Vec<u8>)> {
    let requests: [&[u8]; 10] = [
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\nGET /bytes/5000 HTTP/1.1\r\n\r\nHEAD /bytes/10 HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\nhello world",
        b"POST /upload HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n5\r\nhello\r\n6 ; ext=\"v\"\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\nGET /health HTTP/1.1\n\n",
        b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /health HTTP/1.0\r\n\r\n",
        b"GET /bytes/100 HTTP/1.1\r\nConnection: close\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        b"DELETE /health HTTP/1.1\r\n\r\nGET /upload HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut input = vec![(i as u8).wrapping_mul(37), (i as u8).wrapping_mul(11)];
            input.extend_from_slice(r);
            (format!("seed-{i:02}"), input)
        })
        .collect();
    // Nine pipelined requests (past the pending-response limit), and a head too large.
    let mut pipelined = vec![3, 8];
    for _ in 0..9 {
        pipelined.extend_from_slice(b"GET /bytes/2000 HTTP/1.1\r\n\r\n");
    }
    seeds.push(("seed-pipelined".into(), pipelined));
    let mut big = b"\x05\x07GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    big.resize(9000, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    seeds.push(("seed-big-head".into(), big));
    seeds
}

#[test]
fn http_seeds_are_answered() {
    let seeds = http_seeds();
    for (name, bytes) in &seeds {
        let run = fuzzing::http(bytes);
        assert!(
            run.output.starts_with(b"HTTP/1.1 "),
            "{name}: {:?}",
            String::from_utf8_lossy(&run.output)
        );
    }
    write_seeds("http", &seeds);
}

#[test]
fn http_corpus_replay() {
    replay("http", |b| !fuzzing::http(b).output.is_empty());
}

fn restore_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let input: &[u8] =
        b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabGET /bytes/100";
    for kind in AppKind::ALL {
        let mut app = app::new_app(kind, &AppConfig { bytes: Some(1000) });
        let mut buf = [0u8; 30];
        seeds.push((format!("seed-{kind:?}-0"), app.snapshot()));
        for (i, piece) in input.chunks(20).enumerate() {
            app.handle_recv(piece);
            app.poll_send(&mut buf);
            if i % 2 == 1 {
                seeds.push((format!("seed-{kind:?}-{}", i + 1), app.snapshot()));
            }
        }
        app.handle_recv_fin();
        seeds.push((format!("seed-{kind:?}-fin"), app.snapshot()));
    }
    seeds
}

#[test]
fn restore_seeds_restore() {
    let seeds = restore_seeds();
    for (name, bytes) in &seeds {
        assert!(fuzzing::restore(bytes) >= 1, "{name}");
    }
    write_seeds("restore", &seeds);
}

#[test]
fn restore_corpus_replay() {
    replay("restore", |b| fuzzing::restore(b) > 0);
}
