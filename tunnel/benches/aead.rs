//! ChaCha20-Poly1305 record protection: `ring` against the RustCrypto crate, in place, at
//! 1400-byte records (a forwarded IP packet) and 64 bytes (an ACK).
//!
//! `cargo bench -p flowshift-tunnel --bench aead -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowshift_tunnel::aead::{Aead, RingChaCha20Poly1305, RustCryptoChaCha20Poly1305, TAG_LEN};

fn backends() -> Vec<(&'static str, Box<dyn Aead>)> {
    let key = [0x42u8; 32];
    vec![
        ("ring", Box::new(RingChaCha20Poly1305::new(&key))),
        (
            "chacha20poly1305",
            Box::new(RustCryptoChaCha20Poly1305::new(&key)),
        ),
    ]
}

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    for size in [1400usize, 64] {
        group.throughput(Throughput::Bytes(size as u64));
        for (name, aead) in backends() {
            let mut buf = vec![0xa5u8; size + TAG_LEN];
            let aad = [1u8; 16];
            let mut counter = 0u64;
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter(|| {
                    counter += 1;
                    aead.seal_in_place(counter, &aad, black_box(&mut buf))
                        .unwrap();
                })
            });
        }
    }
    group.finish();
}

fn open(c: &mut Criterion) {
    let mut group = c.benchmark_group("open");
    for size in [1400usize, 64] {
        group.throughput(Throughput::Bytes(size as u64));
        for (name, aead) in backends() {
            let aad = [1u8; 16];
            let mut sealed = vec![0xa5u8; size + TAG_LEN];
            aead.seal_in_place(7, &aad, &mut sealed).unwrap();
            let mut buf = sealed.clone();
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    aead.open_in_place(7, &aad, black_box(&mut buf)).unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, seal, open);
criterion_main!(benches);
