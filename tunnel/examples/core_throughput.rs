//! How fast the sans-IO core moves reliable messages and datagrams when the network costs
//! nothing: two endpoints in one thread, every transmit handed straight to the other side, real
//! time as the clock. An upper bound for what a driver can get out of the core on one core
//! (both ends' crypto and bookkeeping run on it).
//!
//! The last part sends forwarded ACKs (62-byte datagrams, a client ACK with its envelope) in
//! bursts, one per record and packed, and gives the core's cost per ACK, both ends.
//!
//! `cargo run --release -p flowshift-tunnel --example core_throughput [MB]`

use std::net::SocketAddr;
use std::time::Instant as StdInstant;

use flowshift_tunnel::{Config, Endpoint, Event, Instant, Keypair, PeerConfig, PeerId};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

const ADDR_A: &str = "198.18.2.2:51871";
const ADDR_B: &str = "198.18.3.2:51871";

/// Two endpoints that know each other, and A's id for B.
fn pair(config: &Config, now: Instant) -> (Endpoint, Endpoint, PeerId) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (ka, kb) = (Keypair::generate(&mut rng), Keypair::generate(&mut rng));
    let mut a = Endpoint::new(config.clone(), ka.clone(), [1; 32], now);
    let mut b = Endpoint::new(config.clone(), kb.clone(), [2; 32], now);
    let pa = a
        .add_peer(
            PeerConfig::new(*kb.public(), Some(ADDR_B.parse().unwrap())),
            now,
        )
        .unwrap();
    b.add_peer(
        PeerConfig::new(*ka.public(), Some(ADDR_A.parse().unwrap())),
        now,
    )
    .unwrap();
    (a, b, pa)
}

/// Hands everything either side has to send to the other; returns the records moved and
/// the datagrams delivered.
fn pump(a: &mut Endpoint, b: &mut Endpoint, now: Instant, buf: &mut [u8]) -> (usize, usize) {
    let (addr_a, addr_b): (SocketAddr, SocketAddr) =
        (ADDR_A.parse().unwrap(), ADDR_B.parse().unwrap());
    let (mut moved, mut delivered) = (0, 0);
    for a_to_b in [true, false] {
        let (from, to, from_addr) = if a_to_b {
            (&mut *a, &mut *b, addr_a)
        } else {
            (&mut *b, &mut *a, addr_b)
        };
        from.handle_timeout(now);
        while let Some(tx) = from.poll_transmit(now, buf) {
            if let Some(r) = to.handle_datagram(now, from_addr, &mut buf[..tx.size]) {
                delivered += r.datagrams().count();
            }
            moved += 1;
        }
    }
    (moved, delivered)
}

fn main() {
    let mb: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let total = mb * 1_000_000;
    let start = StdInstant::now();
    let now = || Instant::from_micros(start.elapsed().as_micros() as u64 + 1_000_000);
    let (mut a, mut b, pa) = pair(&Config::default(), now());
    let mut buf = vec![0u8; 2048];
    // Handshake.
    for _ in 0..100 {
        pump(&mut a, &mut b, now(), &mut buf);
    }
    let chunk = vec![0x5au8; 64 * 1024];
    for (name, datagram) in [("reliable messages", false), ("datagrams", true)] {
        let t0 = StdInstant::now();
        let (mut sent, mut got) = (0u64, 0u64);
        let piece = if datagram {
            a.max_datagram_payload()
        } else {
            chunk.len()
        };
        while got < total {
            while sent < total {
                let r = if datagram {
                    a.send_datagram(pa, &chunk[..piece])
                } else {
                    a.send_message(pa, &chunk[..piece])
                };
                match r {
                    Ok(()) => sent += piece as u64,
                    Err(_) => break,
                }
            }
            let (moved, _) = pump(&mut a, &mut b, now(), &mut buf);
            while let Some(e) = b.poll_event() {
                if let Event::Message { data, .. } = e {
                    got += data.len() as u64;
                }
            }
            while a.poll_event().is_some() {}
            if datagram {
                // Datagrams are delivered by handle_datagram; count what left A.
                got = sent;
                if moved == 0 && sent >= total {
                    break;
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{name}: {} MB in {secs:.2} s = {:.2} Gbit/s (both ends on one core)",
            got / 1_000_000,
            got as f64 * 8.0 / secs / 1e9
        );
    }
    forwarded_acks(&now, &mut buf);
}

/// Forwarded ACKs in bursts of 1, 4 and 16 (what a worker hands over in one turn), one per
/// record and packed: the core's time per ACK, sender and receiver together.
fn forwarded_acks(now: &dyn Fn() -> Instant, buf: &mut [u8]) {
    const ACKS: usize = 400_000;
    let ack = [0x45u8; 62];
    for burst in [1, 4, 16] {
        for pack in [false, true] {
            let mut config = Config::default();
            config.pack_datagrams = pack;
            let (mut a, mut b, pa) = pair(&config, now());
            // Handshake and heartbeats (they say who packs).
            for _ in 0..100 {
                pump(&mut a, &mut b, now(), buf);
            }
            let t0 = StdInstant::now();
            let (mut records, mut delivered) = (0, 0);
            for _ in 0..ACKS / burst {
                for _ in 0..burst {
                    a.send_datagram(pa, &ack).unwrap();
                }
                let (r, d) = pump(&mut a, &mut b, now(), buf);
                records += r;
                delivered += d;
            }
            let ns = t0.elapsed().as_secs_f64() * 1e9 / ACKS as f64;
            assert_eq!(delivered, ACKS, "every ACK delivered");
            println!(
                "forwarded ACKs in bursts of {burst:2}, {}: {ns:.0} ns each, {:.2} per record",
                if pack { "packed      " } else { "one a record" },
                ACKS as f64 / records as f64
            );
            while a.poll_event().is_some() || b.poll_event().is_some() {}
        }
    }
}
