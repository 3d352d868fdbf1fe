//! Arbitrary bytes into every decoder (a load report among them), and into an endpoint as a
//! received datagram.
//! Nothing may panic. Seeds: `../corpus/decode/` (replayed by the crate's unit tests;
//! rewritten by `FLOWSHIFT_WRITE_CORPUS=1 cargo test -p flowshift-tunnel --test corpus`).

#![no_main]

use std::cell::RefCell;

use flowshift_tunnel::{Config, Endpoint, Instant, Keypair, PeerConfig, PrivateKey};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static ENDPOINT: RefCell<Endpoint> = RefCell::new({
        let mut ep = Endpoint::new(
            Config::default(),
            Keypair::from_private(PrivateKey::from_bytes([1; 32])),
            [0; 32],
            Instant::ZERO,
        );
        let peer = PrivateKey::from_bytes([2; 32]).public_key();
        ep.add_peer(PeerConfig::new(peer, None), Instant::ZERO).expect("fresh endpoint");
        ep
    });
}

fuzz_target!(|data: &[u8]| {
    let _ = flowshift_tunnel::wire::decode_any(data);
    // Load reports (heartbeat payloads, with every extension) also straight from the bytes.
    let _ = flowshift_tunnel::LoadReport::decode(data);
    let mut buf = data.to_vec();
    ENDPOINT.with(|ep| {
        let mut ep = ep.borrow_mut();
        let _ = ep.handle_datagram(
            Instant::from_secs(1),
            "198.18.2.2:51820".parse().unwrap(),
            &mut buf,
        );
        while ep.poll_event().is_some() {}
    });
});
