//! A deterministic two-node network on virtual time (quinn-proto's `Pair` idea): seeded
//! loss, duplication, reordering, corruption and delay; the clock jumps to the next event.

#![allow(dead_code, unreachable_pub)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::Duration;

use flowshift_tunnel::{
    Config, Endpoint, Event, Instant, Keypair, PeerConfig, PeerId, PresharedKey,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Impairments of one direction.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub corrupt: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

impl Link {
    pub fn perfect() -> Link {
        Link {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            corrupt: 0.0,
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
        }
    }

    pub fn lossy(loss: f64) -> Link {
        Link {
            loss,
            duplicate: 0.05,
            reorder: 0.1,
            corrupt: 0.02,
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(3),
        }
    }
}

pub struct Node {
    pub ep: Endpoint,
    pub addr: SocketAddr,
    /// The other node as this node's peer.
    pub peer: PeerId,
    pub keypair: Keypair,
    pub events: Vec<Event>,
    pub datagrams: Vec<Vec<u8>>,
    pub messages: Vec<Vec<u8>>,
    pub link_out: Link,
}

impl Node {
    pub fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Reverse<Instant>,
    seq: Reverse<u64>,
    to_b: bool,
    data: Vec<u8>,
}

pub struct Pair {
    pub now: Instant,
    pub a: Node,
    pub b: Node,
    rng: ChaCha8Rng,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    /// Every datagram either node sent, in order, for replay attacks: (to_b, bytes).
    pub wire: Vec<(bool, Vec<u8>)>,
    pub record_wire: bool,
    /// Set to drop everything (a cut cable).
    pub cut: bool,
    /// Datagrams sent to addresses other than the other node's (cookie replies to flood
    /// sources, responses to spoofed initiations), if `allow_strays`; else they fail the test.
    /// The first 1000 are kept, all are counted.
    pub strays: Vec<(bool, SocketAddr, Vec<u8>)>,
    pub stray_count: u64,
    pub allow_strays: bool,
}

pub fn keypair(rng: &mut ChaCha8Rng) -> Keypair {
    Keypair::generate(rng)
}

pub fn seed(rng: &mut ChaCha8Rng) -> [u8; 32] {
    let mut s = [0u8; 32];
    rng.fill_bytes(&mut s);
    s
}

pub const ADDR_A: &str = "198.18.2.2:51820";
pub const ADDR_B: &str = "198.18.3.2:51820";

pub struct Setup {
    pub seed: u64,
    pub config_a: Config,
    pub config_b: Config,
    pub link_ab: Link,
    pub link_ba: Link,
    /// Which key B configures for A (None: A's real key).
    pub b_thinks_a_is: Option<flowshift_tunnel::PublicKey>,
    /// Which key A configures for B (None: B's real key).
    pub a_thinks_b_is: Option<flowshift_tunnel::PublicKey>,
    pub psk_a: Option<PresharedKey>,
    pub psk_b: Option<PresharedKey>,
    /// Whether B knows A's address (else it only responds).
    pub b_knows_a_addr: bool,
}

impl Setup {
    pub fn new(seed: u64) -> Setup {
        Setup {
            seed,
            config_a: Config::default(),
            config_b: Config::default(),
            link_ab: Link::perfect(),
            link_ba: Link::perfect(),
            b_thinks_a_is: None,
            a_thinks_b_is: None,
            psk_a: None,
            psk_b: None,
            b_knows_a_addr: true,
        }
    }

    pub fn config(mut self, f: impl Fn(&mut Config)) -> Setup {
        f(&mut self.config_a);
        f(&mut self.config_b);
        self
    }

    pub fn links(mut self, link: Link) -> Setup {
        self.link_ab = link;
        self.link_ba = link;
        self
    }

    pub fn build(self) -> Pair {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let ka = keypair(&mut rng);
        let kb = keypair(&mut rng);
        let now = Instant::ZERO;
        let addr_a: SocketAddr = ADDR_A.parse().unwrap();
        let addr_b: SocketAddr = ADDR_B.parse().unwrap();
        let mut ea = Endpoint::new(self.config_a, ka.clone(), seed(&mut rng), now);
        let mut eb = Endpoint::new(self.config_b, kb.clone(), seed(&mut rng), now);
        let mut pa = PeerConfig::new(self.a_thinks_b_is.unwrap_or(*kb.public()), Some(addr_b));
        pa.preshared_key = self.psk_a;
        let mut pb = PeerConfig::new(
            self.b_thinks_a_is.unwrap_or(*ka.public()),
            self.b_knows_a_addr.then_some(addr_a),
        );
        pb.preshared_key = self.psk_b;
        let peer_a = ea.add_peer(pa, now).unwrap();
        let peer_b = eb.add_peer(pb, now).unwrap();
        Pair {
            now,
            a: Node {
                ep: ea,
                addr: addr_a,
                peer: peer_a,
                keypair: ka,
                events: vec![],
                datagrams: vec![],
                messages: vec![],
                link_out: self.link_ab,
            },
            b: Node {
                ep: eb,
                addr: addr_b,
                peer: peer_b,
                keypair: kb,
                events: vec![],
                datagrams: vec![],
                messages: vec![],
                link_out: self.link_ba,
            },
            rng,
            queue: BinaryHeap::new(),
            seq: 0,
            wire: vec![],
            record_wire: false,
            cut: false,
            strays: vec![],
            stray_count: 0,
            allow_strays: false,
        }
    }
}

impl Pair {
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    fn schedule(&mut self, to_b: bool, data: Vec<u8>) {
        if self.record_wire {
            self.wire.push((to_b, data.clone()));
        }
        let link = if to_b {
            self.a.link_out
        } else {
            self.b.link_out
        };
        if self.cut || self.chance(link.loss) {
            return;
        }
        let copies = if self.chance(link.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut data = data.clone();
            if self.chance(link.corrupt) && !data.is_empty() {
                let i = (self.rng.next_u64() % data.len() as u64) as usize;
                data[i] ^= 1 << (self.rng.next_u32() % 8);
            }
            let jitter_us = link.jitter.as_micros() as u64;
            let mut delay = link.delay
                + Duration::from_micros(if jitter_us > 0 {
                    self.rng.next_u64() % jitter_us
                } else {
                    0
                });
            if self.chance(link.reorder) {
                delay += Duration::from_millis(1 + self.rng.next_u64() % 20);
            }
            self.seq += 1;
            self.queue.push(InFlight {
                at: Reverse(self.now + delay),
                seq: Reverse(self.seq),
                to_b,
                data,
            });
        }
    }

    /// Injects raw bytes towards B (true) or A, delivered after the link delay, unimpaired.
    pub fn inject(&mut self, to_b: bool, data: Vec<u8>) {
        self.seq += 1;
        self.queue.push(InFlight {
            at: Reverse(self.now),
            seq: Reverse(self.seq),
            to_b,
            data,
        });
    }

    fn flush(&mut self) {
        let mut buf = vec![0u8; 2048];
        for to_b in [true, false] {
            loop {
                let node = if to_b { &mut self.a } else { &mut self.b };
                let Some(t) = node.ep.poll_transmit(self.now, &mut buf) else {
                    break;
                };
                let expect: SocketAddr = if to_b { ADDR_B } else { ADDR_A }.parse().unwrap();
                let data = buf[..t.size].to_vec();
                if t.destination != expect {
                    assert!(self.allow_strays, "datagram to {}", t.destination);
                    self.stray_count += 1;
                    if self.strays.len() < 1000 {
                        self.strays.push((to_b, t.destination, data));
                    }
                    continue;
                }
                self.schedule(to_b, data);
            }
        }
        for node in [&mut self.a, &mut self.b] {
            while let Some(e) = node.ep.poll_event() {
                if let Event::Message { data, .. } = &e {
                    node.messages.push(data.clone());
                    continue;
                }
                node.events.push(e);
            }
        }
    }

    fn deliver(&mut self, to_b: bool, mut data: Vec<u8>) {
        let (node, from) = if to_b {
            (&mut self.b, self.a.addr)
        } else {
            (&mut self.a, self.b.addr)
        };
        if let Some(r) = node.ep.handle_datagram(self.now, from, &mut data) {
            node.datagrams.extend(r.datagrams().map(<[u8]>::to_vec));
        }
    }

    /// Advances to the next event, but not beyond `deadline`.
    pub fn step(&mut self, deadline: Instant) {
        self.flush();
        let next_packet = self.queue.peek().map(|p| p.at.0);
        let timers = [self.a.ep.poll_timeout(), self.b.ep.poll_timeout()];
        let next = timers
            .iter()
            .flatten()
            .copied()
            .chain(next_packet)
            .min()
            .unwrap_or(deadline);
        self.now = self.now.max(next.min(deadline));
        while self.queue.peek().is_some_and(|p| p.at.0 <= self.now) {
            let p = self.queue.pop().unwrap();
            self.deliver(p.to_b, p.data);
        }
        if self.a.ep.poll_timeout().is_some_and(|t| t <= self.now) {
            self.a.ep.handle_timeout(self.now);
        }
        if self.b.ep.poll_timeout().is_some_and(|t| t <= self.now) {
            self.b.ep.handle_timeout(self.now);
        }
        self.flush();
    }

    /// Steps until `done` or until `limit` of virtual time passed; returns whether `done`.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let deadline = self.now + limit;
        let mut same_instant = 0u32;
        let mut last = self.now;
        while self.now < deadline {
            if done(self) {
                return true;
            }
            self.step(deadline);
            if self.now == last {
                same_instant += 1;
                assert!(same_instant < 100_000, "busy loop at {}", self.now);
            } else {
                same_instant = 0;
                last = self.now;
            }
        }
        done(self)
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    pub fn connected(&self) -> bool {
        let has = |n: &Node| n.ep.peer_stats(n.peer).is_some_and(|s| s.has_session);
        has(&self.a) && has(&self.b)
    }

    /// Runs until both sides have a session.
    pub fn connect(&mut self) {
        assert!(
            self.run_until(Duration::from_secs(60), |p| p.connected()),
            "no handshake"
        );
    }
}

/// `mac1` of a handshake message to the holder of `receiver` (as an on-path attacker, who
/// knows the public keys, can compute it).
pub fn mac1_for(receiver: &flowshift_tunnel::PublicKey, msg: &[u8]) -> [u8; 16] {
    use blake2::digest::consts::U16;
    use blake2::digest::{FixedOutput, KeyInit, Update};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let mut h = Blake2s256::new();
    Digest::update(&mut h, b"flowshift-mac1-v1");
    Digest::update(&mut h, receiver.as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(&key).unwrap();
    Update::update(&mut m, msg);
    m.finalize_fixed().into()
}
