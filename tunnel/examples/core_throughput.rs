//! How fast the sans-IO core moves reliable messages and datagrams when the network costs
//! nothing: two endpoints in one thread, every transmit handed straight to the other side, real
//! time as the clock. An upper bound for what a driver can get out of the core on one core
//! (both ends' crypto and bookkeeping run on it).
//!
//! `cargo run --release -p flowshift-tunnel --example core_throughput [MB]`

use std::net::SocketAddr;
use std::time::Instant as StdInstant;

use flowshift_tunnel::{Config, Endpoint, Event, Instant, Keypair, PeerConfig};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

fn main() {
    let mb: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let total = mb * 1_000_000;
    let start = StdInstant::now();
    let now = || Instant::from_micros(start.elapsed().as_micros() as u64 + 1_000_000);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (ka, kb) = (Keypair::generate(&mut rng), Keypair::generate(&mut rng));
    let (addr_a, addr_b): (SocketAddr, SocketAddr) = (
        "198.18.2.2:51871".parse().unwrap(),
        "198.18.3.2:51871".parse().unwrap(),
    );
    let mut a = Endpoint::new(Config::default(), ka.clone(), [1; 32], now());
    let mut b = Endpoint::new(Config::default(), kb.clone(), [2; 32], now());
    let pa = a
        .add_peer(
            PeerConfig {
                public_key: *kb.public(),
                preshared_key: None,
                endpoint: Some(addr_b),
            },
            now(),
        )
        .unwrap();
    let _pb = b
        .add_peer(
            PeerConfig {
                public_key: *ka.public(),
                preshared_key: None,
                endpoint: Some(addr_a),
            },
            now(),
        )
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut pump = |a: &mut Endpoint, b: &mut Endpoint| -> usize {
        let mut moved = 0;
        for a_to_b in [true, false] {
            let (from, to, from_addr) = if a_to_b {
                (&mut *a, &mut *b, addr_a)
            } else {
                (&mut *b, &mut *a, addr_b)
            };
            let t = now();
            from.handle_timeout(t);
            while let Some(tx) = from.poll_transmit(t, &mut buf) {
                let _ = to.handle_datagram(t, from_addr, &mut buf[..tx.size]);
                moved += 1;
            }
        }
        moved
    };
    // Handshake.
    for _ in 0..100 {
        pump(&mut a, &mut b);
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
            let moved = pump(&mut a, &mut b);
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
}
