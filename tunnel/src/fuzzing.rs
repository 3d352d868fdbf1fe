//! Harnesses shared by the fuzz targets (`tunnel/fuzz`) and the tests that replay their
//! corpora, so that CI exercises exactly what the fuzzer runs. Not a public API.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Config, Endpoint, Instant, Keypair, PeerConfig, PeerId, PrivateKey};

/// Two endpoints with an established session. Each input is sealed by A as an
/// authenticated record with arbitrary plaintext (what a broken or malicious peer could
/// send) and handed to B; B's answers go back to A, and virtual time moves on 1 ms per
/// input so that timers run. Nothing may panic. (What an authenticated peer does to its own
/// stream is its own business: B may refuse or misassemble that peer's data, but nothing
/// else.)
pub struct RecordHarness {
    a: Endpoint,
    b: Endpoint,
    a_peer: PeerId,
    now: Instant,
    buf: Vec<u8>,
    processed: u64,
}

const ADDR_A: &str = "198.18.2.2:51871";
const ADDR_B: &str = "198.18.3.2:51871";

impl RecordHarness {
    /// A connected pair (the handshake runs here).
    ///
    /// # Panics
    /// If the handshake does not complete, which is a bug in the endpoint.
    pub fn new() -> RecordHarness {
        let ka = Keypair::from_private(PrivateKey::from_bytes([1; 32]));
        let kb = Keypair::from_private(PrivateKey::from_bytes([2; 32]));
        let now = Instant::from_secs(1_000);
        let addr_a: SocketAddr = ADDR_A.parse().expect("address");
        let addr_b: SocketAddr = ADDR_B.parse().expect("address");
        let mut a = Endpoint::new(Config::default(), ka.clone(), [3; 32], now);
        let mut b = Endpoint::new(Config::default(), kb.clone(), [4; 32], now);
        let a_peer = a
            .add_peer(PeerConfig::new(*kb.public(), Some(addr_b)), now)
            .expect("peer");
        b.add_peer(PeerConfig::new(*ka.public(), Some(addr_a)), now)
            .expect("peer");
        let mut h = RecordHarness {
            a,
            b,
            a_peer,
            now,
            buf: vec![0u8; 2048],
            processed: 0,
        };
        for _ in 0..10 {
            h.exchange();
        }
        assert!(
            h.a.peer_stats(a_peer).is_some_and(|s| s.has_session),
            "the harness handshake did not complete"
        );
        h
    }

    /// Delivers everything each side wants to send to the other, a few rounds.
    fn exchange(&mut self) {
        for _ in 0..4 {
            while let Some(t) = self.a.poll_transmit(self.now, &mut self.buf) {
                let from = ADDR_A.parse().expect("address");
                let _ = self
                    .b
                    .handle_datagram(self.now, from, &mut self.buf[..t.size]);
            }
            while let Some(t) = self.b.poll_transmit(self.now, &mut self.buf) {
                let from = ADDR_B.parse().expect("address");
                let _ = self
                    .a
                    .handle_datagram(self.now, from, &mut self.buf[..t.size]);
            }
            while self.a.poll_event().is_some() {}
            while self.b.poll_event().is_some() {}
        }
    }

    /// Runs one input: B authenticates the record and handles its frames.
    ///
    /// # Panics
    /// If B does not take the record as authenticated (the harness would silently test
    /// nothing from then on), or if a hostile record leaves the pair unable to make a new
    /// session: bugs either way.
    pub fn run(&mut self, plaintext: &[u8]) {
        let mut record = vec![0u8; plaintext.len() + 64];
        let sealed = match self.a.seal_raw_record(self.a_peer, plaintext, &mut record) {
            Some(t) => t,
            None => {
                // The session went (B may close it on a broken peer): make a new one.
                self.reconnect();
                self.a
                    .seal_raw_record(self.a_peer, plaintext, &mut record)
                    .expect("no session after a new handshake")
            }
        };
        let authenticated = |e: &Endpoint| e.stats().rx_records + e.stats().rx_bad_frames;
        let before = authenticated(&self.b);
        let from = ADDR_A.parse().expect("address");
        if let Some(r) = self
            .b
            .handle_datagram(self.now, from, &mut record[..sealed.size])
        {
            // What B hands up is what it validated: as many datagrams as it counted.
            assert_eq!(
                r.datagrams().count(),
                r.len(),
                "datagrams of a delivered record"
            );
            assert!(!r.is_empty(), "a record without datagrams was delivered");
        }
        assert!(
            authenticated(&self.b) > before,
            "B did not authenticate the harness's record: the harness tests nothing ({:?})",
            self.b.stats()
        );
        self.processed += 1;
        self.now += Duration::from_millis(1);
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.exchange();
    }

    /// Inputs B authenticated and handled so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }

    /// Lets virtual time run until A has a session with B again.
    fn reconnect(&mut self) {
        for _ in 0..200 {
            if self
                .a
                .peer_stats(self.a_peer)
                .is_some_and(|s| s.has_session)
            {
                return;
            }
            self.now += Duration::from_millis(100);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.exchange();
        }
        panic!("the harness pair could not make a new session");
    }
}

impl Default for RecordHarness {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::coding::Writer;
    use crate::wire::{AckFrame, Frame};

    fn record(pn: u64, frames: &[Frame<'_>]) -> Vec<u8> {
        let mut buf = vec![0u8; 1400];
        let mut w = Writer::new(&mut buf);
        w.varint(pn).unwrap();
        for f in frames {
            f.emit(&mut w).unwrap();
        }
        let n = w.position();
        buf.truncate(n);
        buf
    }

    /// Hand-made hostile records: acknowledgements of packets never sent, stream data at the
    /// edges of the offset space, windows that shrink, oversized message lengths.
    fn crafted() -> Vec<Vec<u8>> {
        let max = (1u64 << 62) - 1;
        vec![
            record(0, &[Frame::Ack(AckFrame::new(0, [0..=max]).unwrap())]),
            record(
                5,
                &[Frame::Ack(
                    AckFrame::new(u64::from(u32::MAX), [1000..=2000, 0..=10]).unwrap(),
                )],
            ),
            record(max, &[Frame::Ping]),
            record(
                7,
                &[Frame::Stream {
                    offset: max - 3,
                    data: b"edge",
                }],
            ),
            record(
                8,
                &[Frame::Stream {
                    offset: 0,
                    data: &[0xff; 16],
                }],
            ),
            record(
                9,
                &[Frame::Stream {
                    offset: 1 << 40,
                    data: b"far",
                }],
            ),
            record(10, &[Frame::Window(0)]),
            record(11, &[Frame::Window(max)]),
            record(12, &[Frame::Heartbeat(&[1, 0xff, 0xff, 0xff])]),
            record(13, &[Frame::Datagram(&[]), Frame::Datagram(b"two")]),
            record(14, &[Frame::Padding; 64]),
            vec![],
            vec![0xc0],
        ]
    }

    #[test]
    fn hostile_authenticated_records_never_panic() {
        let mut h = RecordHarness::new();
        for r in crafted() {
            h.run(&r);
        }
        // Random mutations of the crafted records and random bytes, seeded.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = crafted();
        for i in 0..20_000usize {
            let mut r = seeds[i % seeds.len()].clone();
            match next() % 4 {
                0 if !r.is_empty() => {
                    let k = next() as usize % r.len();
                    r[k] = next() as u8;
                }
                1 => r.truncate(next() as usize % (r.len() + 1)),
                2 => r.extend((0..next() % 64).map(|_| next() as u8)),
                _ => r = (0..next() % 200).map(|_| next() as u8).collect(),
            }
            h.run(&r);
        }
        assert_eq!(h.processed(), (crafted().len() + 20_000) as u64);
    }

    /// Replays every file committed under `fuzz/corpus/record/`.
    #[test]
    fn record_corpus_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/record");
        let mut h = RecordHarness::new();
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            h.run(&data);
            n += 1;
        }
        assert!(n >= 10, "only {n} seeds in {}", dir.display());
        assert_eq!(h.processed(), n);
    }

    /// Writes the crafted records as seeds: `cargo test -p
    /// flowshift-tunnel --lib write_record_corpus -- --ignored`.
    #[test]
    #[ignore]
    fn write_record_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/record");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, r) in crafted().into_iter().enumerate() {
            std::fs::write(dir.join(format!("crafted-{i:02}")), r).unwrap();
        }
    }
}
