//! What the predictor costs per sample: [`NodePredictor::handle_sample`] with 1,000, 10,000
//! and 100,000 connections, one sample per 100 ms interval (the default), a tenth of the
//! connections moving bytes and the rest idle. The node takes one sample per interval on its
//! `fs-predict` thread, so the time per sample over 100 ms is the share of one core it costs.
//!
//! `cargo bench -p flowshift-core --bench predict -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flowshift_core::predict::node::{
    ConnSample, NodePredictor, NodeSettings, Observation, PeerSample,
};
use flowshift_core::predict::plan::ReturnPath;
use flowshift_core::predict::profile::{ConnCounters, ConnReport, NodeReport};
use flowshift_core::predict::{NodeId, PredictConfig, Priority};
use smoltcp::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(100);

fn connections(n: usize) -> Vec<ConnSample> {
    (0..n)
        .map(|i| ConnSample {
            report: ConnReport {
                conn: i as u64 + 1,
                counters: ConnCounters::default(),
                opened_at: Instant::from_millis(0),
                priority: Priority::Normal,
            },
            here: true,
            movable: true,
            buffered: 0,
            ingress: None,
        })
        .collect()
}

fn sample(c: &mut Criterion) {
    let mut group = c.benchmark_group("handle_sample");
    for n in [1_000usize, 10_000, 100_000] {
        let mut predictor = NodePredictor::new(PredictConfig::default(), NodeSettings::default());
        let mut conns = connections(n);
        let peers = [PeerSample {
            id: NodeId(2),
            alive: true,
            cpu_busy: 0.2,
            connections: 100,
            bandwidth: 1e8,
            forecast: None,
            rtt: Duration::from_micros(200),
            return_path: ReturnPath::Relay,
        }];
        let mut now = Instant::from_millis(0);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                now += INTERVAL;
                // A tenth of the connections moved 1 MB out and 1 KB in this interval.
                for c in conns.iter_mut().step_by(10) {
                    c.report.counters.bytes_out += 1_000_000;
                    c.report.counters.packets_out += 20;
                    c.report.counters.bytes_in += 1_000;
                    c.report.counters.packets_in += 10;
                }
                let obs = Observation {
                    node: NodeReport {
                        cpu_busy: 0.5,
                        cpu_time: Some(0.4),
                        memory: 1 << 30,
                        connections: n as u64,
                        queue_depth: 0,
                    },
                    conns: &conns,
                    peers: &peers,
                };
                black_box(predictor.handle_sample(now, &obs))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sample);
criterion_main!(benches);
