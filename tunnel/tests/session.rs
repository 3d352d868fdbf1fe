//! End-to-end tests of the sans-IO endpoint on a simulated link, on virtual time.

mod sim;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use flowshift_tunnel::{
    Config, Endpoint, Event, HandshakeError, Instant, Keypair, LoadReport, PeerConfig,
    PresharedKey, PublicKey,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use sim::{Link, Pair, Setup, mac1_for};

fn message(i: u32) -> Vec<u8> {
    const SIZES: [usize; 7] = [0, 1, 100, 1_400, 3_000, 20_000, 150_000];
    let len = SIZES[i as usize % SIZES.len()];
    let mut m = i.to_le_bytes().to_vec();
    m.extend((0..len).map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8));
    m
}

fn datagram(i: u32, to_b: bool) -> Vec<u8> {
    let mut d = i.to_le_bytes().to_vec();
    d.push(to_b as u8);
    d.resize(40 + (i as usize * 37) % 1_300, 0xd6);
    d
}

/// Queues `n` messages and datagrams each way, runs until every message arrived, and checks
/// exactly-once in-order delivery and at-most-once datagrams.
fn bidirectional_transfer(p: &mut Pair, n: u32, limit: Duration) {
    let (pa, pb) = (p.a.peer, p.b.peer);
    for i in 0..n {
        p.a.ep.send_message(pa, &message(i)).unwrap();
        p.b.ep.send_message(pb, &message(i + 1_000)).unwrap();
    }
    let mut sent = 0u32;
    let done = p.run_until(limit, |p| {
        p.a.messages.len() >= n as usize && p.b.messages.len() >= n as usize
    });
    // Datagrams interleaved with the stream, a few at a time.
    while sent < 200 {
        for _ in 0..10 {
            p.a.ep.send_datagram(pa, &datagram(sent, true)).unwrap();
            p.b.ep.send_datagram(pb, &datagram(sent, false)).unwrap();
            sent += 1;
        }
        p.run_for(Duration::from_millis(50));
    }
    p.run_for(Duration::from_secs(2));
    assert!(
        done,
        "transfer incomplete: a got {}, b got {}",
        p.a.messages.len(),
        p.b.messages.len()
    );
    let expect_b: Vec<Vec<u8>> = (0..n).map(message).collect();
    let expect_a: Vec<Vec<u8>> = (0..n).map(|i| message(i + 1_000)).collect();
    assert!(p.b.messages == expect_b, "b: wrong messages or order");
    assert!(p.a.messages == expect_a, "a: wrong messages or order");
    for (node, to_b) in [(&p.b, true), (&p.a, false)] {
        let mut seen = HashSet::new();
        for d in &node.datagrams {
            let id = u32::from_le_bytes(d[..4].try_into().unwrap());
            assert_eq!(d, &datagram(id, to_b), "datagram content");
            assert!(seen.insert(id), "datagram {id} delivered twice");
        }
    }
}

#[test]
fn handshake_message_datagram_heartbeat() {
    let mut p = Setup::new(1).build();
    p.connect();
    let (a, b) = (p.a.peer, p.b.peer);
    p.a.ep.send_message(a, b"hello b").unwrap();
    p.b.ep.send_message(b, b"hello a").unwrap();
    p.a.ep.send_datagram(a, b"dgram").unwrap();
    p.b.ep.set_load_report(LoadReport {
        cpu_busy: 0.5,
        connections: 7,
        ..Default::default()
    });
    assert!(p.run_until(Duration::from_secs(5), |p| {
        p.b.messages.len() == 1 && p.a.messages.len() == 1 && p.b.datagrams.len() == 1
    }));
    assert_eq!(p.b.messages[0], b"hello b");
    assert_eq!(p.a.messages[0], b"hello a");
    assert_eq!(p.b.datagrams[0], b"dgram");
    p.run_for(Duration::from_secs(3));
    assert!(p.a.count(|e| matches!(e, Event::HandshakeCompleted { .. })) >= 1);
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerAlive { .. })), 1);
    assert!(
        p.a.events
            .iter()
            .any(|e| matches!(e, Event::LoadReport { report, .. } if report.connections == 7))
    );
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 0);
    let s = p.b.ep.stats();
    assert_eq!(
        (s.rx_auth_failed, s.rx_replayed, s.rx_unknown_session),
        (0, 0, 0)
    );
}

#[test]
fn responder_only_peer_learns_address() {
    let mut s = Setup::new(2);
    s.b_knows_a_addr = false;
    let mut p = s.build();
    p.connect();
    assert_eq!(p.b.ep.peer_address(p.b.peer), Some(p.a.addr));
    p.b.ep.send_message(p.b.peer, b"back").unwrap();
    assert!(p.run_until(Duration::from_secs(1), |p| p.a.messages.len() == 1));
}

#[test]
fn reliable_delivery_on_a_perfect_link() {
    let mut p = Setup::new(3).build();
    p.connect();
    bidirectional_transfer(&mut p, 40, Duration::from_secs(60));
}

#[test]
fn reliable_delivery_under_loss_duplication_reordering_corruption() {
    for (seed, loss) in [(10, 0.0), (11, 0.05), (12, 0.1), (13, 0.2), (14, 0.3)] {
        let mut p = Setup::new(seed).links(Link::lossy(loss)).build();
        p.connect();
        bidirectional_transfer(&mut p, 30, Duration::from_secs(600));
        let lost = p.a.ep.peer_stats(p.a.peer).unwrap().packets_lost;
        if loss >= 0.1 {
            assert!(lost > 0, "loss {loss}: expected retransmissions");
        }
        // Corrupted packets were caught by authentication, duplicates by the window.
        let s = p.b.ep.stats().clone();
        if loss > 0.0 {
            assert!(
                s.rx_auth_failed + s.rx_malformed + s.rx_unknown_session + s.handshake_bad_mac > 0
            );
            assert!(
                s.rx_replayed > 0,
                "duplicates should be caught by the replay window"
            );
        }
    }
}

#[test]
fn rekey_in_the_middle_of_a_transfer_loses_nothing() {
    let mut p = Setup::new(20)
        .links(Link::lossy(0.05))
        .config(|c| {
            c.rekey_after_messages = 150;
            c.rekey_after_time = Duration::from_secs(3);
            c.reject_after_time = Duration::from_secs(20);
        })
        .build();
    p.connect();
    bidirectional_transfer(&mut p, 40, Duration::from_secs(600));
    let sa = p.a.ep.peer_stats(p.a.peer).unwrap();
    let sb = p.b.ep.peer_stats(p.b.peer).unwrap();
    assert!(
        sa.sessions_established >= 4,
        "a: {} sessions",
        sa.sessions_established
    );
    assert!(
        sb.sessions_established >= 4,
        "b: {} sessions",
        sb.sessions_established
    );
}

#[test]
fn time_based_rekey_keeps_the_tunnel_up() {
    let mut p = Setup::new(21)
        .config(|c| {
            c.rekey_after_time = Duration::from_secs(2);
            c.reject_after_time = Duration::from_secs(5);
        })
        .build();
    p.connect();
    let (pa, pb) = (p.a.peer, p.b.peer);
    for i in 0..60u32 {
        p.a.ep.send_message(pa, &i.to_le_bytes()).unwrap();
        p.b.ep.send_datagram(pb, &i.to_le_bytes()).unwrap();
        p.run_for(Duration::from_millis(500));
    }
    p.run_for(Duration::from_secs(1));
    let expect: Vec<Vec<u8>> = (0..60u32).map(|i| i.to_le_bytes().to_vec()).collect();
    assert_eq!(p.b.messages, expect);
    assert_eq!(
        p.a.datagrams.len(),
        60,
        "no datagram lost across rekeys on a perfect link"
    );
    assert!(p.a.ep.peer_stats(pa).unwrap().sessions_established >= 10);
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 0);
    assert_eq!(
        p.a.ep.stats().rx_unknown_session + p.b.ep.stats().rx_unknown_session,
        0
    );
}

#[test]
fn wrong_static_key_fails_with_clear_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let stranger = *Keypair::generate(&mut rng).public();
    let mut s = Setup::new(30);
    s.b_thinks_a_is = Some(stranger);
    let mut p = s.build();
    p.run_for(Duration::from_secs(12));
    assert!(!p.connected());
    let a_key = *p.a.keypair.public();
    // B decrypted A's initiation, found A's real key, and rejected it.
    assert!(p.b.events.iter().any(|e| matches!(
        e,
        Event::HandshakeFailed { peer: None, error: HandshakeError::UnknownPeer(k), .. } if *k == a_key
    )));
    assert!(p.b.ep.stats().handshake_unknown_peer > 0);
    // B's initiations were addressed to the wrong key: A drops them before any DH.
    assert!(p.a.ep.stats().handshake_bad_mac > 0);
    // A never hears back.
    assert!(p.a.events.iter().any(|e| matches!(
        e,
        Event::HandshakeFailed {
            peer: Some(_),
            error: HandshakeError::Timeout,
            ..
        }
    )));
    assert_eq!(
        p.a.count(|e| matches!(e, Event::HandshakeCompleted { .. })),
        0
    );
    assert_eq!(
        p.b.count(|e| matches!(e, Event::HandshakeCompleted { .. })),
        0
    );
    assert!(p.a.ep.send_message(p.a.peer, b"queued").is_ok());
}

#[test]
fn psk_mismatch_fails_with_response_authentication() {
    let mut s = Setup::new(31);
    s.psk_a = Some(PresharedKey::from_bytes([7; 32]));
    let mut p = s.build();
    p.run_for(Duration::from_secs(3));
    assert!(!p.connected());
    for n in [&p.a, &p.b] {
        assert!(n.events.iter().any(|e| matches!(
            e,
            Event::HandshakeFailed {
                error: HandshakeError::ResponseAuthentication,
                ..
            }
        )));
    }
    // With the same PSK on both sides it works.
    let mut s = Setup::new(31);
    s.psk_a = Some(PresharedKey::from_bytes([7; 32]));
    s.psk_b = Some(PresharedKey::from_bytes([7; 32]));
    s.build().connect();
}

fn data_packets(p: &Pair, to_b: bool) -> Vec<Vec<u8>> {
    p.wire
        .iter()
        .filter(|(dir, d)| *dir == to_b && d.len() > 1 && d[1] == 4)
        .map(|(_, d)| d.clone())
        .collect()
}

#[test]
fn replayed_forged_tampered_and_unknown_packets_are_rejected_and_counted() {
    // One datagram per record: each queued datagram makes a record to capture.
    let mut p = Setup::new(40).config(|c| c.pack_datagrams = false).build();
    p.connect();
    p.run_for(Duration::from_millis(100));
    let pa = p.a.peer;
    // Capture records without delivering them.
    p.record_wire = true;
    p.cut = true;
    for i in 0..5u32 {
        p.a.ep.send_datagram(pa, &i.to_le_bytes()).unwrap();
    }
    p.run_for(Duration::from_millis(1));
    p.cut = false;
    p.record_wire = false;
    let recs = data_packets(&p, true);
    assert!(recs.len() >= 5);
    let before = p.b.ep.stats().clone();

    // Tampered ciphertext, header (authenticated as associated data) and tag.
    for pos in [20, 2, recs[0].len() - 1] {
        let mut t = recs[0].clone();
        t[pos] ^= 0x40;
        p.inject(true, t);
    }
    // Forged: valid header and index, random body.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut forged = recs[0].clone();
    rng.fill_bytes(&mut forged[8..]);
    p.inject(true, forged);
    // Unknown receiver index.
    let mut unknown = recs[0].clone();
    unknown[4..8].copy_from_slice(
        &(u32::from_le_bytes(recs[0][4..8].try_into().unwrap()) ^ 1).to_le_bytes(),
    );
    p.inject(true, unknown);
    // Wrong version.
    let mut v1 = recs[0].clone();
    v1[0] = 1;
    p.inject(true, v1);
    p.run_for(Duration::from_millis(1));
    let s = p.b.ep.stats().clone();
    assert_eq!(s.rx_auth_failed - before.rx_auth_failed, 4);
    assert_eq!(s.rx_unknown_session - before.rx_unknown_session, 1);
    assert_eq!(s.rx_bad_version - before.rx_bad_version, 1);
    assert!(p.b.datagrams.is_empty());

    // The genuine records still decrypt (forgeries did not move the window), once each.
    for r in &recs {
        p.inject(true, r.clone());
    }
    p.run_for(Duration::from_millis(1));
    assert_eq!(p.b.datagrams.len(), 5);
    for r in &recs {
        p.inject(true, r.clone());
    }
    p.run_for(Duration::from_millis(1));
    assert_eq!(p.b.datagrams.len(), 5, "replays must not deliver twice");
    assert_eq!(
        p.b.ep.stats().rx_replayed - s.rx_replayed,
        recs.len() as u64
    );
}

#[test]
fn records_older_than_the_window_are_rejected() {
    // One datagram per record: each queued datagram makes a record to capture.
    let mut p = Setup::new(41).config(|c| c.pack_datagrams = false).build();
    p.connect();
    p.run_for(Duration::from_millis(100));
    let pa = p.a.peer;
    p.record_wire = true;
    p.cut = true;
    for i in 0..4_200u32 {
        p.a.ep.send_datagram(pa, &i.to_le_bytes()).unwrap();
        if i % 512 == 0 {
            p.run_for(Duration::from_micros(1));
        }
    }
    p.run_for(Duration::from_micros(1));
    p.cut = false;
    p.record_wire = false;
    let recs = data_packets(&p, true);
    assert!(recs.len() >= 4_200);
    let newest = recs.len() - 1;
    p.inject(true, recs[newest].clone());
    p.run_for(Duration::from_micros(1));
    let before = p.b.ep.stats().clone();
    // Oldest: beyond the window. Within the window but reordered: accepted.
    p.inject(true, recs[0].clone());
    p.inject(true, recs[newest - 2_000].clone());
    p.inject(true, recs[newest - 4_000].clone());
    p.run_for(Duration::from_micros(1));
    let s = p.b.ep.stats();
    assert_eq!(s.rx_too_old - before.rx_too_old, 1);
    assert_eq!(s.rx_records - before.rx_records, 2);
}

#[test]
fn initiations_are_rate_limited_before_any_dh() {
    let mut p = Setup::new(50)
        .config(|c| {
            c.handshake_rate_per_source = 10;
            c.handshake_burst_per_source = 5;
        })
        .build();
    // A stranger that knows B's public key (so mac1 is right) but is not B's peer, sending
    // from A's address: only that source's allowance is spent.
    let init = stranger_initiation(&p, 6);
    for _ in 0..100 {
        p.inject(true, init.clone());
    }
    p.run_for(Duration::from_millis(1));
    let s = p.b.ep.stats();
    assert_eq!(s.handshake_unknown_peer, 5, "only the burst reaches the DH");
    // Beyond it B is under load: no DH without a valid mac2, a cookie reply instead (to A's
    // address, where A drops them: they name none of its initiations).
    assert_eq!(s.handshake_mac2_rejected, 95);
    assert_eq!(s.cookie_replies_sent, 95);
    assert_eq!(s.handshake_rate_limited, 0);
    // Garbage with a valid header is dropped on mac1 without using tokens.
    let mut junk = init.clone();
    junk[40] ^= 1;
    p.inject(true, junk);
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.b.ep.stats().handshake_bad_mac, 1);
    assert!(p.a.ep.stats().rx_unknown_session >= 95);
    // The real peer still gets through: its source's bucket is empty, so it is under load
    // too, and gets in on the mac2 of the cookie it was sent.
    p.connect();
    assert!(p.a.ep.stats().cookie_replies_received >= 1);
}

/// Floods B with `init` from `source()` — 100 initiations every 5 ms of virtual time — until
/// the pair is connected; returns how long that took and how many initiations were sent.
fn flood_until_connected(
    p: &mut Pair,
    init: &[u8],
    mut source: impl FnMut() -> SocketAddr,
) -> (Duration, u64) {
    let start = p.now;
    let mut sent = 0;
    for _ in 0..400 {
        if p.connected() {
            break;
        }
        for _ in 0..100 {
            let mut d = init.to_vec();
            let now = p.now;
            assert!(p.b.ep.handle_datagram(now, source(), &mut d).is_none());
            sent += 1;
        }
        p.run_for(Duration::from_millis(5));
    }
    assert!(p.connected(), "A was locked out by the flood");
    (p.now - start, sent)
}

#[test]
fn a_handshake_flood_from_elsewhere_does_not_lock_a_peer_out() {
    // B does not initiate (it has no address for A): A's own initiations must get through.
    let mut setup = Setup::new(51);
    setup.b_knows_a_addr = false;
    let mut p = setup.build();
    p.allow_strays = true;
    let init = stranger_initiation(&p, 7);
    let mut buf = [0u8; 1500];

    // One busy source: its own bucket stops it long before it drains the shared one.
    let busy: SocketAddr = "198.18.9.9:4000".parse().unwrap();
    let (took, sent) = flood_until_connected(&mut p, &init, || busy);
    assert!(
        took < Duration::from_millis(500),
        "A got through only after {took:?}"
    );
    let s = p.b.ep.stats();
    assert_eq!(
        s.handshake_unknown_peer, 10,
        "the busy source's burst: {s:?}"
    );
    assert_eq!(s.handshake_mac2_rejected, sent - 10);
    assert!(s.cookie_replies_sent > 0 && s.cookie_replies_sent <= s.handshake_mac2_rejected);
    assert_eq!(
        p.stray_count, s.cookie_replies_sent,
        "cookie replies go to the source"
    );

    // Never-seen addresses drain the shared bucket. B now knows A's address (from the
    // handshake), and an initiation from a configured peer's address does not need that
    // bucket: a restarted A (same key, fresh state) is answered at once.
    let before = p.b.ep.stats().clone();
    for i in 0..1000u32 {
        let mut d = init.clone();
        let from = SocketAddr::from((Ipv4Addr::from(0xc613_0000 + i), 4000));
        let now = p.now;
        p.b.ep.handle_datagram(now, from, &mut d);
    }
    let s = p.b.ep.stats().clone();
    let dh = s.handshake_unknown_peer - before.handshake_unknown_peer;
    assert!(dh <= 20, "the shared bucket's burst bounds the DHs: {dh}");
    assert_eq!(
        dh + s.handshake_mac2_rejected - before.handshake_mac2_rejected,
        1000
    );
    while p.b.ep.poll_transmit(p.now, &mut buf).is_some() {}
    let mut restarted = Endpoint::new(Config::default(), p.a.keypair.clone(), [8; 32], p.now);
    restarted
        .add_peer(
            PeerConfig::new(*p.b.keypair.public(), Some(p.b.addr)),
            p.now,
        )
        .unwrap();
    let t = restarted.poll_transmit(p.now, &mut buf).unwrap();
    let mut a_init = buf[..t.size].to_vec();
    let now = p.now;
    p.b.ep.handle_datagram(now, p.a.addr, &mut a_init);
    assert_eq!(
        p.b.ep.stats().handshake_mac2_rejected,
        s.handshake_mac2_rejected,
        "the configured peer's initiation was rate-limited"
    );
    let response = p.b.ep.poll_transmit(p.now, &mut buf).expect("a response");
    assert_eq!(response.destination, p.a.addr);
}

/// An initiation from a stranger that knows B's public key (so its `mac1` is right) but is
/// not B's peer.
fn stranger_initiation(p: &Pair, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stranger = Endpoint::new(
        Config::default(),
        Keypair::generate(&mut rng),
        [seed as u8; 32],
        p.now,
    );
    stranger
        .add_peer(
            PeerConfig::new(*p.b.keypair.public(), Some(p.b.addr)),
            p.now,
        )
        .unwrap();
    let mut buf = [0u8; 1500];
    let t = stranger.poll_transmit(p.now, &mut buf).unwrap();
    buf[..t.size].to_vec()
}

/// Every 5 ms of virtual time hands B `per_tick` datagrams made by `next(i)` (as if from the
/// address it names), until `done` or until `limit` passed; returns whether `done`.
fn flood_b(
    p: &mut Pair,
    limit: Duration,
    per_tick: usize,
    mut next: impl FnMut(u64) -> (SocketAddr, Vec<u8>),
    mut done: impl FnMut(&Pair) -> bool,
) -> bool {
    let end = p.now + limit;
    let mut i = 0;
    while p.now < end {
        if done(p) {
            return true;
        }
        for _ in 0..per_tick {
            let (from, mut d) = next(i);
            i += 1;
            let now = p.now;
            let _ = p.b.ep.handle_datagram(now, from, &mut d);
        }
        p.run_for(Duration::from_millis(5));
    }
    done(p)
}

fn sessions(n: &sim::Node) -> u64 {
    n.ep.peer_stats(n.peer).unwrap().sessions_established
}

/// A rekeys every 3 s and drops a session after 8 s; B, as responder, would wait far longer,
/// so only A's initiations keep the tunnel up.
fn only_a_rekeys(seed: u64) -> Pair {
    only_a_rekeys_with(seed, |_| {})
}

/// [`only_a_rekeys`], with B's config changed by `b`.
fn only_a_rekeys_with(seed: u64, b: impl FnOnce(&mut Config)) -> Pair {
    let mut s = Setup::new(seed);
    s.config_a.rekey_after_time = Duration::from_secs(3);
    s.config_a.reject_after_time = Duration::from_secs(8);
    s.config_b.rekey_after_time = Duration::from_secs(1_000);
    s.config_b.reject_after_time = Duration::from_secs(2_000);
    b(&mut s.config_b);
    let mut p = s.build();
    p.allow_strays = true;
    p.connect();
    p.run_for(Duration::from_secs(1));
    p
}

/// That the flood ended because A completed its rekeys (`ok`), and the tunnel never went
/// down meanwhile.
fn assert_rekeyed_through(p: &Pair, ok: bool, start: u64) {
    let (sa, sb) = (p.a.ep.stats(), p.b.ep.stats());
    assert!(
        ok,
        "A completed {} rekeys; a: {sa:?}; b: {sb:?}",
        sessions(&p.a) - start
    );
    assert_tunnel_stayed_up(p);
}

fn assert_tunnel_stayed_up(p: &Pair) {
    for n in [&p.a, &p.b] {
        assert_eq!(n.count(|e| matches!(e, Event::PeerDead { .. })), 0);
    }
    assert!(p.connected());
}

#[test]
fn a_spoofed_flood_from_a_peers_address_does_not_stop_its_rekeys() {
    let mut p = only_a_rekeys(52);
    let init = stranger_initiation(&p, 9);
    let a_addr = p.a.addr;
    let start = sessions(&p.a);
    let b_initiated = p.b.ep.stats().handshake_initiated;
    // 20,000 initiations a second with A's address as source: A's own bucket at B is always
    // empty, so B is under load for every initiation from there.
    let ok = flood_b(
        &mut p,
        Duration::from_secs(30),
        100,
        |_| (a_addr, init.clone()),
        |p| sessions(&p.a) >= start + 5,
    );
    assert_rekeyed_through(&p, ok, start);
    let (sa, sb) = (p.a.ep.stats().clone(), p.b.ep.stats().clone());
    assert_eq!(sb.handshake_initiated, b_initiated, "B never initiated");
    assert!(sb.handshake_mac2_rejected > 10_000, "{sb:?}");
    assert!(sb.cookie_replies_sent > 0);
    assert!(sa.cookie_replies_received >= 1, "{sa:?}");
    // The flood's DHs are bounded by the per-source allowance: burst 10, then 5/s.
    assert!(sb.handshake_unknown_peer <= 10 + 5 * 30, "{sb:?}");
}

#[test]
fn a_flood_from_elsewhere_cannot_spend_the_cookie_replies_a_peer_needs() {
    // B's cookie replies are scarce (50/s). A spoof at A's own address (20/s, over A's 5/s
    // allowance) keeps B under load for A, so A needs a cookie for every rekey; meanwhile
    // 19,800 initiations a second from other addresses would take every reply of a shared
    // bucket. Replies to configured peers' addresses have a bucket of their own.
    let mut p = only_a_rekeys_with(54, |b| {
        b.cookie_reply_rate = 50;
        b.cookie_reply_burst = 50;
    });
    let init = stranger_initiation(&p, 11);
    let a_addr = p.a.addr;
    let start = sessions(&p.a);
    let ok = flood_b(
        &mut p,
        Duration::from_secs(30),
        100,
        |i| {
            if i % 1000 == 0 {
                (a_addr, init.clone())
            } else {
                let host = 0xc612_4000 + (i % 3000) as u32;
                (SocketAddr::from((Ipv4Addr::from(host), 4000)), init.clone())
            }
        },
        |p| sessions(&p.a) >= start + 5,
    );
    assert_rekeyed_through(&p, ok, start);
    let (sa, sb) = (p.a.ep.stats().clone(), p.b.ep.stats().clone());
    assert!(sa.cookie_replies_received >= 1, "{sa:?}");
    // The shared bucket ran dry: most of the flood got no reply.
    assert!(
        sb.cookie_replies_sent < sb.handshake_mac2_rejected / 10,
        "{sb:?}"
    );
}

#[test]
fn a_replay_flood_of_captured_initiations_does_not_stop_rekeys() {
    let mut p = only_a_rekeys(53);
    // Capture A's initiations, with mac2 too: a spoofed flood first puts B under load, so A
    // gets a cookie and sends initiations with a valid mac2.
    let stranger = stranger_initiation(&p, 10);
    let a_addr = p.a.addr;
    p.record_wire = true;
    let start = sessions(&p.a);
    assert!(flood_b(
        &mut p,
        Duration::from_secs(10),
        100,
        |_| (a_addr, stranger.clone()),
        |p| sessions(&p.a) >= start + 2,
    ));
    p.record_wire = false;
    let inits: Vec<Vec<u8>> = p
        .wire
        .iter()
        .filter(|(to_b, d)| *to_b && d.len() == 152 && d[1] == 1)
        .map(|(_, d)| d.clone())
        .collect();
    let with_mac2: Vec<Vec<u8>> = inits
        .iter()
        .filter(|d| d[136..].iter().any(|&b| b != 0))
        .cloned()
        .collect();
    assert!(!with_mac2.is_empty() && with_mac2.len() < inits.len());
    let captured = [inits[0].clone(), with_mac2[with_mac2.len() - 1].clone()];
    // Now replay both, from A's address, 20,000 a second, through several rekeys.
    let start = sessions(&p.a);
    let before = p.b.ep.stats().clone();
    let ok = flood_b(
        &mut p,
        Duration::from_secs(30),
        100,
        |i| (a_addr, captured[i as usize % 2].clone()),
        |p| sessions(&p.a) >= start + 5,
    );
    assert_rekeyed_through(&p, ok, start);
    let sb = p.b.ep.stats().clone();
    // The replays with a valid mac2 are dropped as verbatim repeats without a DH; the others
    // get cookie replies. Either way no replay completes a handshake.
    assert!(
        sb.handshake_replayed - before.handshake_replayed > 10_000,
        "{sb:?}"
    );
    assert!(sb.handshake_mac2_rejected - before.handshake_mac2_rejected > 10_000);
    assert_eq!(sb.handshake_rate_limited, before.handshake_rate_limited);
}

#[test]
fn a_flood_from_more_sources_than_the_table_holds_does_not_lock_out_a_known_peer() {
    let mut s = Setup::new(54).config(|c| {
        // One initiation a second per source: a source that sends more often than that stays
        // in the table.
        c.handshake_rate_per_source = 1;
        c.handshake_burst_per_source = 1;
        // No shared limit, so that the flood's sources do fill the table (with one, new
        // sources only get in at its rate).
        c.handshake_rate = 1_000_000;
        c.handshake_burst = 1_000_000;
    });
    s.config_a.rekey_after_time = Duration::from_secs(2);
    s.config_a.reject_after_time = Duration::from_secs(6);
    s.config_b.rekey_after_time = Duration::from_secs(1_000);
    s.config_b.reject_after_time = Duration::from_secs(2_000);
    let mut p = s.build();
    p.allow_strays = true;
    p.connect();
    p.run_for(Duration::from_secs(1));
    assert_eq!(p.b.ep.config().handshake_sources, 4096);
    let init = stranger_initiation(&p, 11);
    let start = sessions(&p.a);
    // 5,000 sources, each every 0.5 s: B's table of sources is full of active ones, and A's
    // address, quiet between rekeys, is forgotten to make room.
    let ok = flood_b(
        &mut p,
        Duration::from_secs(30),
        50,
        |i| {
            let ip = Ipv4Addr::from(0xc612_8000 + (i % 5_000) as u32);
            (SocketAddr::from((ip, 4000)), init.clone())
        },
        |p| sessions(&p.a) >= start + 2,
    );
    assert_rekeyed_through(&p, ok, start);
    let (sa, sb) = (p.a.ep.stats().clone(), p.b.ep.stats().clone());
    assert!(sb.handshake_mac2_rejected > 10_000, "{sb:?}");
    // A got in on its mac2, after a cookie reply.
    assert!(sa.cookie_replies_received >= 1, "a: {sa:?}\nb: {sb:?}");
}

#[test]
fn dead_peer_is_reported_and_its_return_too() {
    let mut p = Setup::new(60).build();
    p.connect();
    p.run_for(Duration::from_secs(2));
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerAlive { .. })), 1);
    p.cut = true;
    p.run_for(Duration::from_millis(3_500));
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 1);
    assert_eq!(p.b.count(|e| matches!(e, Event::PeerDead { .. })), 1);
    // Long outage: sessions expire, handshakes time out, messages wait.
    p.a.ep.send_message(p.a.peer, b"after the outage").unwrap();
    p.run_for(Duration::from_secs(200));
    assert!(p.a.events.iter().any(|e| matches!(
        e,
        Event::HandshakeFailed {
            error: HandshakeError::Timeout,
            ..
        }
    )));
    p.cut = false;
    assert!(p.run_until(Duration::from_secs(30), |p| {
        p.a.count(|e| matches!(e, Event::PeerAlive { .. })) == 2 && p.b.messages.len() == 1
    }));
    assert_eq!(p.b.messages[0], b"after the outage");
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 1);
}

#[test]
fn peer_restart_is_detected_and_channels_start_over() {
    let mut p = Setup::new(70).build();
    p.connect();
    p.a.ep.send_message(p.a.peer, b"one").unwrap();
    assert!(p.run_until(Duration::from_secs(2), |p| p.b.messages.len() == 1));
    // B restarts: same key, new state.
    let mut eb = Endpoint::new(Config::default(), p.b.keypair.clone(), [9; 32], p.now);
    p.b.peer = eb
        .add_peer(
            PeerConfig::new(*p.a.keypair.public(), Some(p.a.addr)),
            p.now,
        )
        .unwrap();
    p.b.ep = eb;
    p.b.messages.clear();
    assert!(p.run_until(Duration::from_secs(10), |p| {
        p.a.count(|e| matches!(e, Event::PeerRestarted { .. })) == 1
    }));
    p.a.ep.send_message(p.a.peer, b"two").unwrap();
    p.b.ep.send_message(p.b.peer, b"three").unwrap();
    assert!(
        p.run_until(Duration::from_secs(5), |p| p.b.messages.len() == 1
            && p.a.messages.len() == 1)
    );
    assert_eq!(p.b.messages[0], b"two");
    assert_eq!(p.a.messages[0], b"three");
}

#[test]
fn bulk_transfer_respects_the_congestion_window() {
    let mut p = Setup::new(80)
        .links(Link {
            delay: Duration::from_millis(20),
            ..Link::perfect()
        })
        .build();
    p.connect();
    let pa = p.a.peer;
    let chunk = vec![0x5a; 60_000];
    for _ in 0..50 {
        p.a.ep.send_message(pa, &chunk).unwrap();
    }
    let mtu = p.a.ep.config().max_udp_payload as u64;
    let mut max_flight = 0;
    let done = p.run_until(Duration::from_secs(60), |p| {
        let s = p.a.ep.peer_stats(p.a.peer).unwrap();
        assert!(
            s.bytes_in_flight <= s.cwnd + mtu,
            "in flight {} > cwnd {}",
            s.bytes_in_flight,
            s.cwnd
        );
        max_flight = max_flight.max(s.bytes_in_flight);
        p.b.messages.len() == 50
    });
    assert!(done);
    // Slow start opened the window beyond its initial 10 packets.
    assert!(max_flight > 10 * mtu, "max in flight {max_flight}");
    let s = p.a.ep.peer_stats(pa).unwrap();
    assert!(s.srtt.unwrap() >= Duration::from_millis(40));
    assert_eq!(s.packets_lost, 0);
}

#[test]
fn hostile_datagrams_never_panic() {
    let mut p = Setup::new(90).build();
    p.record_wire = true;
    p.connect();
    p.a.ep.send_message(p.a.peer, b"x").unwrap();
    p.run_for(Duration::from_millis(100));
    let samples: Vec<Vec<u8>> = p.wire.iter().map(|(_, d)| d.clone()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let from = p.a.addr;
    let now = p.now;
    for i in 0..20_000u32 {
        let mut d = samples[i as usize % samples.len()].clone();
        match i % 4 {
            0 => d.truncate((rng.next_u32() as usize) % (d.len() + 1)),
            1 => {
                let k = (rng.next_u32() as usize) % d.len();
                d[k] = rng.next_u32() as u8;
            }
            2 => {
                let len = (rng.next_u32() % 1600) as usize;
                d.resize(len, 0);
                rng.fill_bytes(&mut d[len.min(8)..]);
            }
            _ => d.extend_from_slice(&[0; 3]),
        }
        let _ = p.b.ep.handle_datagram(now, from, &mut d);
    }
    // Still works afterwards.
    p.a.ep.send_message(p.a.peer, b"y").unwrap();
    assert!(p.run_until(Duration::from_secs(5), |p| p.b.messages.len() == 2));
}

#[test]
fn api_errors() {
    let mut p = Setup::new(100).build();
    let big = vec![0u8; p.a.ep.max_datagram_payload() + 1];
    assert_eq!(
        p.a.ep.send_datagram(p.a.peer, &big),
        Err(flowshift_tunnel::SendError::DatagramTooLarge)
    );
    assert_eq!(p.a.ep.max_datagram_payload(), 1_409);
    let own = *p.a.keypair.public();
    assert_eq!(
        p.a.ep.add_peer(PeerConfig::new(own, None), p.now),
        Err(flowshift_tunnel::AddPeerError::OwnKey)
    );
    let b = *p.b.keypair.public();
    assert_eq!(
        p.a.ep.add_peer(PeerConfig::new(b, None), p.now),
        Err(flowshift_tunnel::AddPeerError::Duplicate)
    );
    assert_eq!(p.a.ep.peer_by_key(&b), Some(p.a.peer));
    assert!(p.a.ep.remove_peer(p.a.peer));
    assert_eq!(
        p.a.ep.send_message(p.a.peer, b"x"),
        Err(flowshift_tunnel::SendError::UnknownPeer)
    );
    assert_eq!(p.a.ep.poll_timeout(), None);
    let _ = (Instant::ZERO, PublicKey::from_bytes([0; 32]));
}

/// Many seeds, smaller transfers, with rekeys: a broad sweep for rare interleavings.
#[test]
fn seed_sweep() {
    let seeds: u64 = std::env::var("SWEEP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        let loss = [0.0, 0.05, 0.15, 0.3][seed as usize % 4];
        let mut p = Setup::new(1_000 + seed)
            .links(Link::lossy(loss))
            .config(|c| {
                c.rekey_after_messages = 40 + seed * 7;
                c.rekey_after_time = Duration::from_secs(2);
                c.reject_after_time = Duration::from_secs(30);
            })
            .build();
        p.connect();
        bidirectional_transfer(&mut p, 14, Duration::from_secs(900));
    }
}

#[test]
fn restart_of_a_responder_only_peer_is_found_through_dead_detection() {
    let mut s = Setup::new(71);
    s.b_knows_a_addr = false;
    let mut p = s.build();
    p.connect();
    p.run_for(Duration::from_secs(1));
    // B restarts and cannot initiate (it does not know A's address).
    let mut eb = Endpoint::new(Config::default(), p.b.keypair.clone(), [8; 32], p.now);
    p.b.peer = eb
        .add_peer(PeerConfig::new(*p.a.keypair.public(), None), p.now)
        .unwrap();
    p.b.ep = eb;
    p.a.ep
        .send_message(p.a.peer, b"lost with the old instance")
        .unwrap();
    // A's records hit unknown sessions; A misses heartbeats, declares B dead, handshakes.
    assert!(p.run_until(Duration::from_secs(10), |p| {
        p.a.count(|e| matches!(e, Event::PeerRestarted { .. })) == 1
    }));
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 1);
    assert!(p.b.ep.stats().rx_unknown_session > 0);
    // Unacknowledged messages were discarded with the old instance; new ones flow.
    p.a.ep.send_message(p.a.peer, b"are you there").unwrap();
    assert!(p.run_until(Duration::from_secs(2), |p| p.b.messages.len() == 1));
    assert_eq!(p.b.messages[0], b"are you there");
}

/// Every initiation A sent towards B in the recorded wire.
fn initiations_to_b(p: &Pair) -> Vec<Vec<u8>> {
    p.wire
        .iter()
        .filter(|(to_b, d)| *to_b && d.len() == 152 && d[1] == 1)
        .map(|(_, d)| d.clone())
        .collect()
}

#[test]
fn captured_initiations_stay_refused_after_the_peer_was_dead_or_removed() {
    let mut p = Setup::new(80).build();
    p.record_wire = true;
    p.connect();
    p.record_wire = false;
    p.run_for(Duration::from_secs(1));
    let captured = initiations_to_b(&p);
    assert!(!captured.is_empty());
    // An outage: B declares A dead. The captured initiations are injected during it, so B
    // has accepted no newer one from A in the meantime.
    p.cut = true;
    p.run_for(Duration::from_millis(3_500));
    assert_eq!(p.b.count(|e| matches!(e, Event::PeerDead { .. })), 1);
    let replay_all = |p: &mut Pair| {
        let before = p.b.ep.stats().clone();
        p.wire.clear();
        p.record_wire = true;
        for d in &captured {
            p.inject(true, d.clone());
        }
        p.run_for(Duration::from_millis(1));
        p.record_wire = false;
        let s = p.b.ep.stats();
        assert_eq!(
            s.handshake_replayed - before.handshake_replayed,
            captured.len() as u64,
            "every captured initiation refused: {s:?}"
        );
        let responses = p.wire.iter().filter(|(to_b, d)| !*to_b && d[1] == 2);
        assert_eq!(responses.count(), 0, "B answered a replay");
    };
    replay_all(&mut p);
    // Removed and added again: still refused.
    assert!(p.b.ep.remove_peer(p.b.peer));
    p.b.peer =
        p.b.ep
            .add_peer(
                PeerConfig::new(*p.a.keypair.public(), Some(p.a.addr)),
                p.now,
            )
            .unwrap();
    replay_all(&mut p);
    // The peer itself gets a new session once the outage ends.
    p.cut = false;
    p.connect();
}

#[test]
fn an_initiation_moves_the_peer_address_only_once_a_record_confirms_it() {
    let mut p = Setup::new(81).build();
    p.allow_strays = true;
    p.connect();
    p.run_for(Duration::from_secs(1));
    // A fresh initiation from A's key that B has not seen (say, captured and withheld),
    // delivered from somewhere else.
    let mut a2 = Endpoint::new(Config::default(), p.a.keypair.clone(), [9; 32], p.now);
    a2.add_peer(
        PeerConfig::new(*p.b.keypair.public(), Some(p.b.addr)),
        p.now,
    )
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let t = a2.poll_transmit(p.now, &mut buf).unwrap();
    let mut init = buf[..t.size].to_vec();
    let elsewhere: SocketAddr = "198.18.9.9:7000".parse().unwrap();
    let now = p.now;
    p.b.ep.handle_datagram(now, elsewhere, &mut init);
    // B answers there, but keeps A's address and keeps talking to A.
    let t = p.b.ep.poll_transmit(now, &mut buf).expect("a response");
    assert_eq!(t.destination, elsewhere);
    assert_eq!(buf[1], 2);
    let mut response = buf[..t.size].to_vec();
    assert_eq!(p.b.ep.peer_address(p.b.peer), Some(p.a.addr));
    let (pa, pb) = (p.a.peer, p.b.peer);
    p.b.ep.send_message(pb, b"still to a").unwrap();
    assert!(p.run_until(Duration::from_secs(1), |p| p.a.messages.len() == 1));
    assert_eq!(p.b.ep.peer_address(pb), Some(p.a.addr));
    // If the initiator really is there (A roamed), its first record under the new session
    // confirms the address, and B moves.
    let now = p.now;
    a2.handle_datagram(now, p.b.addr, &mut response);
    let t = a2
        .poll_transmit(now, &mut buf)
        .expect("the confirming record");
    assert_eq!(buf[1], 4);
    let mut record = buf[..t.size].to_vec();
    p.b.ep.handle_datagram(now, elsewhere, &mut record);
    assert_eq!(p.b.ep.peer_address(pb), Some(elsewhere));
    let _ = pa;
}

/// A pair whose A has sent its first initiation, held back from B (returned).
fn held_back_initiation(seed: u64) -> (Pair, Vec<u8>) {
    let mut s = Setup::new(seed);
    s.b_knows_a_addr = false;
    let mut p = s.build();
    p.cut = true;
    p.record_wire = true;
    p.run_for(Duration::from_millis(1));
    p.cut = false;
    p.record_wire = false;
    let inits = initiations_to_b(&p);
    assert_eq!(inits.len(), 1);
    let init = inits[0].clone();
    (p, init)
}

/// What an on-path injector can make: a response with the right receiver index and a valid
/// mac1, but a Noise message it could not make.
fn forged_response(p: &Pair, init: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut forged = vec![0u8; 84];
    forged[..4].copy_from_slice(&[2, 2, 0, 0]);
    forged[4..8].copy_from_slice(&7u32.to_le_bytes());
    forged[8..12].copy_from_slice(&init[4..8]);
    rng.fill_bytes(&mut forged[12..68]);
    let mac = mac1_for(p.a.keypair.public(), &forged[..68]);
    forged[68..].copy_from_slice(&mac);
    forged
}

fn response_failures_reported(p: &Pair) -> usize {
    p.a.events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::HandshakeFailed {
                    error: HandshakeError::ResponseAuthentication,
                    ..
                }
            )
        })
        .count()
}

#[test]
fn a_forged_response_does_not_abort_the_pending_handshake() {
    let (mut p, init) = held_back_initiation(82);
    // The injector answers first.
    let forged = forged_response(&p, &init, &mut ChaCha8Rng::seed_from_u64(3));
    p.inject(false, forged);
    p.inject(true, init);
    // The genuine response, one link delay later, completes the same initiation: no retry
    // (a second after the first attempt) is needed.
    assert!(p.run_until(Duration::from_millis(100), |p| p.connected()));
    let s = p.a.ep.stats();
    assert_eq!(s.handshake_failed, 1, "{s:?}");
    assert_eq!(s.handshake_initiated, 1, "{s:?}");
    assert_eq!(response_failures_reported(&p), 1);
}

#[test]
fn a_flood_of_forged_responses_costs_two_reads_per_initiation() {
    let (mut p, init) = held_back_initiation(83);
    // A thousand forgeries to the pending initiation.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..1000 {
        let forged = forged_response(&p, &init, &mut rng);
        p.inject(false, forged);
    }
    // Past two failed reads the rest (and the genuine response to this attempt) are
    // dropped unread; the next attempt, a retry interval later, connects.
    p.inject(true, init);
    assert!(p.run_until(Duration::from_secs(5), |p| p.connected()));
    let st = p.a.ep.stats();
    assert!(st.handshake_failed >= 1000, "{st:?}");
    assert_eq!(st.handshake_initiated, 2, "{st:?}");
    assert_eq!(
        response_failures_reported(&p),
        1,
        "one event per initiation, not per forgery"
    );
}

fn record_counter(d: &[u8]) -> u64 {
    u64::from_le_bytes(d[8..16].try_into().unwrap())
}

/// No time-based rekey within these tests.
fn no_time_rekey(c: &mut Config) {
    c.rekey_after_time = Duration::from_secs(10_000);
    c.reject_after_time = Duration::from_secs(20_000);
}

#[test]
fn the_message_limit_is_a_hard_cutoff_on_both_sides() {
    const LIMIT: u64 = 64;
    let setup = || {
        Setup::new(83).config(|c| {
            no_time_rekey(c);
            // No rekey on count either: only the hard limit ends a session.
            c.rekey_after_messages = u64::MAX;
            c.reject_after_messages = LIMIT;
        })
    };
    // Sender: never seals a record at or beyond the limit; it handshakes anew instead, and
    // nothing is lost.
    let mut p = setup().build();
    p.connect();
    p.record_wire = true;
    let pa = p.a.peer;
    for i in 0..300u32 {
        p.a.ep.send_datagram(pa, &datagram(i, true)).unwrap();
        p.run_for(Duration::from_millis(5));
    }
    p.run_for(Duration::from_secs(1));
    let records = data_packets(&p, true);
    assert!(records.len() >= 300);
    let top = records.iter().map(|d| record_counter(d)).max().unwrap();
    assert_eq!(
        top,
        LIMIT - 1,
        "the last counter used is the limit's predecessor"
    );
    assert_eq!(p.b.datagrams.len(), 300);
    assert!(sessions(&p.a) > 300 / LIMIT, "{} sessions", sessions(&p.a));
    assert_eq!(p.b.ep.stats().rx_too_old, 0);

    // Receiver: refuses records at or beyond the limit (sealed by a sender that ignores it),
    // before decrypting them.
    let mut p = setup().build();
    p.connect();
    p.run_for(Duration::from_millis(100));
    let pa = p.a.peer;
    let mut buf = vec![0u8; 256];
    let mut raw = Vec::new();
    loop {
        let t = p.a.ep.seal_raw_record(pa, &[0, 1], &mut buf).unwrap();
        let r = buf[..t.size].to_vec();
        let c = record_counter(&r);
        raw.push(r);
        if c >= LIMIT + 4 {
            break;
        }
    }
    let beyond = raw.iter().filter(|r| record_counter(r) >= LIMIT).count() as u64;
    assert_eq!(beyond, 5);
    let before = p.b.ep.stats().clone();
    for r in raw {
        p.inject(true, r);
    }
    p.run_for(Duration::from_millis(1));
    let s = p.b.ep.stats();
    assert_eq!(s.rx_too_old - before.rx_too_old, beyond);
    assert_eq!(s.rx_auth_failed, before.rx_auth_failed);
}

#[test]
fn rekey_on_message_count_alone_loses_nothing() {
    let mut p = Setup::new(84)
        .config(|c| {
            no_time_rekey(c);
            c.rekey_after_messages = 100;
        })
        .build();
    p.connect();
    bidirectional_transfer(&mut p, 30, Duration::from_secs(120));
    for n in [&p.a, &p.b] {
        assert!(sessions(n) >= 4, "{} sessions", sessions(n));
    }
    assert_eq!(p.a.count(|e| matches!(e, Event::PeerDead { .. })), 0);
}

#[test]
fn per_peer_byte_counts_cover_authenticated_records_only() {
    let mut p = Setup::new(85).links(Link::lossy(0.1)).build();
    p.connect();
    p.run_for(Duration::from_millis(100));
    let (pa, pb) = (p.a.peer, p.b.peer);
    let before = p.b.ep.peer_stats(pb).unwrap();
    let ep_before = p.b.ep.stats().clone();
    // Garbage, a forged record and a replayed handshake, all from A's address.
    p.record_wire = true;
    p.a.ep.send_datagram(pa, b"one").unwrap();
    p.run_for(Duration::from_millis(1));
    p.record_wire = false;
    let rec = data_packets(&p, true).pop().unwrap();
    let mut forged = rec.clone();
    forged[20] ^= 1;
    let now = p.now;
    let a_addr = p.a.addr;
    for mut d in [vec![2u8, 4, 0, 0, 9], forged, vec![0xff; 500], rec.clone()] {
        p.b.ep.handle_datagram(now, a_addr, &mut d);
    }
    let after = p.b.ep.peer_stats(pb).unwrap();
    let ep_after = p.b.ep.stats().clone();
    assert!(ep_after.rx_bytes - ep_before.rx_bytes > 500);
    // The genuine record may have arrived on the link too; the replay did not count.
    let genuine = after.rx_records - before.rx_records;
    assert!(genuine <= 1);
    assert_eq!(after.rx_bytes - before.rx_bytes, genuine * rec.len() as u64);
    // Loss is counted over the packets tracked for it.
    for i in 0..20 {
        p.a.ep.send_message(pa, &message(i)).unwrap();
    }
    assert!(p.run_until(Duration::from_secs(60), |p| p.b.messages.len() == 20));
    let s = p.a.ep.peer_stats(pa).unwrap();
    assert!(s.packets_sent > 100 && s.packets_lost > 0 && s.packets_lost < s.packets_sent);
    assert!(
        s.tx_packets > s.packets_sent,
        "ACK-only and handshake packets are sent too"
    );
    assert!(s.tx_bytes >= s.tx_packets * 32);
}

fn restart_a(p: &mut Pair, floor: Option<u64>) {
    let mut ea = Endpoint::new(Config::default(), p.a.keypair.clone(), [7; 32], p.now);
    if let Some(f) = floor {
        ea.set_initiation_floor(f);
    }
    p.a.peer = ea
        .add_peer(
            PeerConfig::new(*p.b.keypair.public(), Some(p.b.addr)),
            p.now,
        )
        .unwrap();
    p.a.ep = ea;
    p.a.events.clear();
}

#[test]
fn an_initiation_from_far_ahead_is_refused_and_not_remembered() {
    // Only A initiates (B does not know where A is).
    let mut setup = Setup::new(90);
    setup.b_knows_a_addr = false;
    let mut p = setup.build();
    // A's clock runs an hour ahead.
    p.a.ep
        .set_initiation_floor(p.now.as_micros() + 3_600_000_000);
    assert!(!p.run_until(Duration::from_secs(5), |p| p.connected()));
    assert!(p.b.ep.stats().handshake_clock_ahead > 0);
    assert!(
        p.b.count(|e| matches!(
            e,
            Event::HandshakeFailed {
                error: HandshakeError::ClockAhead {
                    ahead_s: 3590..=3600
                },
                ..
            }
        )) > 0
    );
    assert_eq!(p.b.ep.stats().handshake_completed, 0);
    // Its clock corrected (a restart with the right time): B did not remember the future.
    restart_a(&mut p, None);
    assert!(p.run_until(Duration::from_secs(5), |p| p.connected()));
}

#[test]
fn a_node_restarted_with_its_clock_behind_continues_above_what_peers_accepted() {
    // Only A initiates (B does not know where A is).
    let mut setup = Setup::new(91);
    setup.b_knows_a_addr = false;
    let mut p = setup.build();
    // A's clock is five minutes ahead (within the bound): B accepts and remembers that.
    p.a.ep.set_initiation_floor(p.now.as_micros() + 300_000_000);
    p.connect();
    let accepted = p.a.ep.accepted_initiation_timestamp();
    assert!(accepted > p.now.as_micros() + 290_000_000, "{accepted}");
    // Restarted with its clock corrected and nothing kept: its initiations look replayed.
    // (B, which knows A's address by now, may still reach it with initiations of its own.)
    restart_a(&mut p, None);
    let replayed = p.b.ep.stats().handshake_replayed;
    p.run_for(Duration::from_secs(3));
    assert!(p.b.ep.stats().handshake_replayed > replayed);
    assert_eq!(p.a.ep.accepted_initiation_timestamp(), 0, "B answered A");
    // Restarted with what the driver keeps across restarts: B answers A's initiations.
    restart_a(&mut p, Some(accepted));
    let replayed = p.b.ep.stats().handshake_replayed;
    assert!(p.run_until(
        Duration::from_secs(5),
        |p| p.a.ep.accepted_initiation_timestamp() > accepted
    ));
    assert_eq!(p.b.ep.stats().handshake_replayed, replayed);
}

/// A forwarded ACK as a node sends it (62 bytes with its envelope), numbered.
fn forwarded_ack(i: u32) -> Vec<u8> {
    let mut d = i.to_le_bytes().to_vec();
    d.resize(62, i as u8);
    d
}

fn records_from_peer(n: &sim::Node) -> u64 {
    n.ep.peer_stats(n.peer).unwrap().rx_records
}

/// Queues `count` forwarded ACKs from A to B at once, runs until B has them all, and returns
/// how many records B received meanwhile. B must get them exactly and in order.
fn ack_burst_a_to_b(p: &mut Pair, count: u32) -> u64 {
    let before = records_from_peer(&p.b);
    p.b.datagrams.clear();
    for i in 0..count {
        p.a.ep.send_datagram(p.a.peer, &forwarded_ack(i)).unwrap();
    }
    assert!(p.run_until(Duration::from_secs(2), |p| p.b.datagrams.len()
        >= count as usize));
    let expect: Vec<Vec<u8>> = (0..count).map(forwarded_ack).collect();
    assert!(
        p.b.datagrams == expect,
        "B got other datagrams or another order"
    );
    records_from_peer(&p.b) - before
}

/// 200 forwarded ACKs from A to B share records (about 22 to a record, so 10 records; a
/// few more may carry only ACKs), and B found none malformed.
fn assert_packed_burst(p: &mut Pair) {
    let records = ack_burst_a_to_b(p, 200);
    assert!(records <= 14, "200 forwarded ACKs took {records} records");
    assert_eq!(p.b.ep.stats().rx_bad_frames, 0);
}

/// A connected pair whose B neither packs nor takes packed records.
fn pair_where_b_does_not_pack(seed: u64) -> Pair {
    let mut setup = Setup::new(seed);
    setup.config_b.pack_datagrams = false;
    let mut p = setup.build();
    p.connect();
    p
}

#[test]
fn forwarded_acks_queued_together_share_records_once_the_peer_says_it_takes_them() {
    let mut p = Setup::new(120).build();
    p.connect();
    // The heartbeats (one is due at once) tell each side the other packs.
    assert!(p.run_until(Duration::from_secs(2), |p| {
        let packs = |n: &sim::Node| n.ep.peer_stats(n.peer).unwrap().packs_datagrams;
        packs(&p.a) && packs(&p.b)
    }));
    let sent = p.a.ep.stats().datagrams_sent;
    assert_packed_burst(&mut p);
    assert_eq!(p.a.ep.stats().datagrams_sent - sent, 200);
    assert_eq!(p.b.ep.stats().datagrams_received, 200);
    // Records still interleave the reliable stream with datagrams both ways.
    p.a.datagrams.clear();
    p.b.datagrams.clear();
    bidirectional_transfer(&mut p, 20, Duration::from_secs(30));
}

#[test]
fn a_peer_that_does_not_take_packed_records_gets_one_datagram_in_each() {
    let mut p = pair_where_b_does_not_pack(121);
    // Each side has heard the other's heartbeat: A knows B does not take packed records.
    let heard = |n: &sim::Node| n.count(|e| matches!(e, Event::LoadReport { .. })) > 0;
    assert!(p.run_until(Duration::from_secs(3), |p| heard(&p.a) && heard(&p.b)));
    assert!(!p.a.ep.peer_stats(p.a.peer).unwrap().packs_datagrams);
    // Nor does B pack for A, whatever A announces: it is switched off there (`peer_stats`
    // reports the packing in effect, so this holds by B's config alone).
    assert!(!p.b.ep.peer_stats(p.b.peer).unwrap().packs_datagrams);
    let records = ack_burst_a_to_b(&mut p, 100);
    assert!(records >= 100, "100 datagrams came in {records} records");
    assert_eq!(p.b.ep.stats().rx_bad_frames, 0);
    let before = records_from_peer(&p.a);
    for i in 0..100 {
        p.b.ep.send_datagram(p.b.peer, &forwarded_ack(i)).unwrap();
    }
    assert!(p.run_until(Duration::from_secs(2), |p| p.a.datagrams.len() >= 100));
    assert!(records_from_peer(&p.a) - before >= 100);
    p.a.datagrams.clear();
    p.b.datagrams.clear();
    bidirectional_transfer(&mut p, 20, Duration::from_secs(30));
}

/// B restarts with `config`, answering handshakes only (it does not know A's address), and
/// A finds out: through dead detection and its own initiation, so from B's handshake
/// response, before any record of B's has arrived.
fn restart_b_answering_only(p: &mut Pair, config: Config) {
    let mut eb = Endpoint::new(config, p.b.keypair.clone(), [9; 32], p.now);
    p.b.peer = eb
        .add_peer(PeerConfig::new(*p.a.keypair.public(), None), p.now)
        .unwrap();
    p.b.ep = eb;
    assert!(p.run_until(Duration::from_secs(20), |p| {
        p.a.count(|e| matches!(e, Event::PeerRestarted { .. })) == 1
    }));
}

#[test]
fn after_a_peer_restarts_datagrams_are_not_packed_until_it_says_it_takes_them() {
    let mut p = Setup::new(122).build();
    p.connect();
    assert!(p.run_until(Duration::from_secs(2), |p| {
        p.a.ep.peer_stats(p.a.peer).unwrap().packs_datagrams
    }));
    // B comes back as a node that does not take packed records (an older version), and
    // only answers handshakes: A finds it through dead detection and initiates, so A learns
    // of the restart from B's handshake response, before any record of B's (and heartbeat)
    // has arrived.
    let mut config = Config::default();
    config.pack_datagrams = false;
    restart_b_answering_only(&mut p, config);
    // Queued the moment A learns of the restart.
    let records = ack_burst_a_to_b(&mut p, 60);
    assert!(records >= 60, "60 datagrams came in {records} records");
    assert_eq!(p.b.ep.stats().rx_bad_frames, 0);
    assert!(!p.a.ep.peer_stats(p.a.peer).unwrap().packs_datagrams);
}

#[test]
fn after_a_peer_restarts_packing_resumes_once_its_heartbeat_says_it_takes_them() {
    let mut p = Setup::new(123).build();
    p.connect();
    let a_packs = |p: &Pair| p.a.ep.peer_stats(p.a.peer).unwrap().packs_datagrams;
    assert!(p.run_until(Duration::from_secs(2), a_packs));
    // B comes back (packing on, the default), answering handshakes only, as above.
    restart_b_answering_only(&mut p, Config::default());
    // Until B's first heartbeat reaches A, one datagram a record.
    assert!(!a_packs(&p));
    let records = ack_burst_a_to_b(&mut p, 60);
    assert!(records >= 60, "60 datagrams came in {records} records");
    // B's heartbeats (one is due at once on each side after a restart) say it takes them.
    assert!(p.run_until(Duration::from_secs(2), a_packs));
    assert_packed_burst(&mut p);
}

#[test]
fn a_packed_record_to_a_node_that_does_not_take_them_is_refused_but_its_other_frames_count() {
    use flowshift_tunnel::wire::Frame;
    use flowshift_tunnel::wire::coding::Writer;
    let mut p = pair_where_b_does_not_pack(124);
    p.run_for(Duration::from_millis(100));
    // A broken (or older-than-it-says) peer seals a heartbeat and two datagrams in one
    // record.
    let report = LoadReport {
        connections: 4242,
        ..Default::default()
    }
    .to_bytes();
    let mut plain = vec![0u8; 512];
    let n = {
        let mut w = Writer::new(&mut plain);
        w.varint(1 << 20).unwrap(); // a packet number far from the real ones
        for f in [
            Frame::Heartbeat(&report),
            Frame::Datagram(b"one"),
            Frame::Datagram(b"two"),
        ] {
            f.emit(&mut w).unwrap();
        }
        w.position()
    };
    let mut buf = vec![0u8; 600];
    let t =
        p.a.ep
            .seal_raw_record(p.a.peer, &plain[..n], &mut buf)
            .unwrap();
    let before = p.b.ep.stats().clone();
    p.b.datagrams.clear();
    p.inject(true, buf[..t.size].to_vec());
    p.run_for(Duration::from_millis(1));
    let s = p.b.ep.stats();
    assert_eq!(
        s.rx_bad_frames - before.rx_bad_frames,
        1,
        "refused and counted"
    );
    assert_eq!(s.datagrams_received, before.datagrams_received);
    assert!(p.b.datagrams.is_empty(), "no datagram of it delivered");
    // The frames before the refusal were taken, as for any malformed record.
    assert!(
        p.b.events
            .iter()
            .any(|e| matches!(e, Event::LoadReport { report, .. } if report.connections == 4242))
    );
}
