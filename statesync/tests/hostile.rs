//! Hostile message bytes: random noise and mutations of real encodings go through
//! `Message::decode` and, when they decode, into a live Source and Target
//! (`fuzzing::MessageHarness`, the `message` fuzz target's harness). Nothing may panic, and
//! whatever decodes must round-trip.

mod common;

use flowshift_statesync::fuzzing::MessageHarness;
use flowshift_statesync::protocol::{Message, PROTOCOL_VERSION};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

#[test]
fn seeds_drive_both_state_machines() {
    let mut h = MessageHarness::new();
    for m in common::message_seeds() {
        assert!(h.run(&m.to_bytes()), "{m}");
    }
}

#[test]
fn random_and_mutated_messages_never_panic() {
    let seeds: Vec<Vec<u8>> = common::message_seeds()
        .iter()
        .map(Message::to_bytes)
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0xbad);
    let mut h = MessageHarness::new();
    let mut decoded = 0;
    for i in 0..100_000u32 {
        let base = &seeds[(rng.next_u32() as usize) % seeds.len()];
        let bytes = match i % 5 {
            0 => {
                let mut b = vec![0u8; (rng.next_u32() % 96) as usize];
                rng.fill_bytes(&mut b);
                if b.len() > 1 {
                    b[0] = PROTOCOL_VERSION;
                    b[1] %= 6;
                }
                b
            }
            1 | 2 => {
                let mut b = base.clone();
                for _ in 0..=(rng.next_u32() % 3) {
                    let at = (rng.next_u32() as usize) % b.len();
                    b[at] = rng.next_u32() as u8;
                }
                b
            }
            3 => {
                let mut b = base.clone();
                let at = (rng.next_u32() as usize) % b.len();
                match rng.next_u32() % 3 {
                    0 => b.truncate(at),
                    1 => b.insert(at, rng.next_u32() as u8),
                    _ => {
                        b.remove(at);
                    }
                }
                b
            }
            _ => base.clone(), // replays and duplicates of real messages
        };
        if h.run(&bytes) {
            decoded += 1;
        }
    }
    assert!(decoded > 25_000, "only {decoded} inputs decoded");
}
