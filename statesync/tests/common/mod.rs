//! Builders shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::net::{Ipv4Addr, SocketAddrV4};

use flowshift_statesync::{AppState, ConnSnapshot, Ingress, TcpState, Timestamps};

/// The client address of test flow `flow`.
pub fn client(flow: u64) -> SocketAddrV4 {
    let n = flow as u32;
    SocketAddrV4::new(
        Ipv4Addr::new(198, 18, 1, 2 + (n >> 16) as u8),
        10_000 + (n & 0xffff) as u16,
    )
}

/// The service address.
pub fn service() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80)
}

/// A valid snapshot of test flow `flow` in `state`, with `send` unacknowledged bytes and
/// `unread` unread bytes (contents derived from `flow`).
pub fn snapshot(flow: u64, state: TcpState, send: usize, unread: usize) -> ConnSnapshot {
    let (client_fin, our_fin) = state.fin_flags();
    let snd_una = (flow as u32).wrapping_mul(2_654_435_761);
    ConnSnapshot {
        client: client(flow),
        service: service(),
        state,
        snd_una,
        snd_nxt: snd_una.wrapping_add((send / 2) as u32),
        rcv_nxt: (flow as u32).wrapping_mul(40_503).wrapping_sub(7),
        client_fin,
        our_fin,
        client_window: 1024,
        client_wscale: if flow.is_multiple_of(3) {
            None
        } else {
            Some(7)
        },
        our_wscale: 2,
        rx_capacity: 256 * 1024,
        tx_capacity: 256 * 1024,
        client_mss: if flow.is_multiple_of(5) { 536 } else { 1460 },
        sack_permitted: flow.is_multiple_of(2),
        timestamps: (flow % 4 != 1).then_some(Timestamps {
            ts_recent: flow as u32 ^ 0x5555,
            our_tsval: flow as u32 ^ 0xaaaa,
        }),
        send_bytes: (0..send).map(|i| (i as u64 ^ flow) as u8).collect(),
        unread: (0..unread).map(|i| (i as u64 + flow) as u8).collect(),
        app: AppState {
            kind: 1,
            version: 1,
            bytes: flow.to_le_bytes().to_vec(),
            fin_delivered: false,
        },
        ingress: Ingress {
            node_key: [0x42; 32],
            flow_id: flow,
        },
        srtt_us: Some(200),
    }
}

/// One snapshot per state, with and without buffers and options.
pub fn snapshot_seeds() -> Vec<ConnSnapshot> {
    let states = [
        TcpState::Established,
        TcpState::CloseWait,
        TcpState::FinWait1,
        TcpState::Closing,
        TcpState::LastAck,
    ];
    let mut out = Vec::new();
    for (i, state) in states.into_iter().enumerate() {
        out.push(snapshot(i as u64, state, 0, 0));
        out.push(snapshot(10 + i as u64, state, 300, 40));
    }
    let mut told = snapshot(98, TcpState::LastAck, 10, 0);
    told.app.fin_delivered = true;
    out.push(told);
    let mut wrap = snapshot(99, TcpState::FinWait1, 3, 0);
    wrap.snd_una = u32::MAX - 1;
    wrap.snd_nxt = 2;
    out.push(wrap);
    out
}

/// Real messages of migration 1 between the `fuzzing::MessageHarness` source and target,
/// one of each kind and variant: seeds for the `message` fuzz target and the hostile-input
/// tests.
pub fn message_seeds() -> Vec<flowshift_statesync::protocol::Message> {
    use flowshift_statesync::fuzzing::{harness_offer, harness_snapshot};
    use flowshift_statesync::protocol::*;
    let m = MigrationId(1);
    vec![
        Message::Offer(Offer {
            migration: m,
            conns: (0..4).map(harness_offer).collect(),
        }),
        Message::Accept(Accept {
            migration: m,
            verdicts: vec![
                (0, Verdict::Accepted),
                (1, Verdict::Accepted),
                (2, Verdict::Accepted),
                (3, Verdict::Refused(RefuseReason::Capacity)),
            ],
        }),
        Message::Transfer(Transfer {
            migration: m,
            snapshots: (0..3).map(|f| (f, harness_snapshot(f))).collect(),
            withdrawn: vec![(3, RefuseReason::CaptureFailed)],
        }),
        Message::Commit(Commit {
            migration: m,
            results: vec![
                (0, Ok(1000)),
                (1, Ok(1001)),
                (2, Err(RefuseReason::RestoreFailed)),
            ],
        }),
        Message::Abort(Abort {
            migration: m,
            from: Side::Source,
            reason: AbortReason::Timeout,
            flows: vec![0, 1, 2, 3],
        }),
        Message::Rehome(Rehome {
            migration: m,
            owner_key: [7; 32],
            flows: vec![(0, 1000), (1, 1001)],
        }),
        Message::Abort(Abort {
            migration: m,
            from: Side::Target,
            reason: AbortReason::UnknownMigration,
            flows: vec![],
        }),
    ]
}
