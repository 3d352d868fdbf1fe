//! Byte fixtures of the messages, and scripted exchanges between one [`Source`] and one
//! [`Target`] (the simulated network with loss, duplication, reordering and crashes is in
//! `tests/protocol_sim.rs`).

use std::time::Duration;

use super::*;
use crate::snapshot::{AppState, Ingress};
use crate::time::Instant;

fn offer(flow: u64) -> ConnOffer {
    ConnOffer {
        flow,
        client: "198.18.1.2:40000".parse().unwrap(),
        service: "198.19.255.1:80".parse().unwrap(),
        app_kind: 1,
        app_version: 2,
        state: TcpState::Established,
        rx_capacity: 65536,
        tx_capacity: 65536,
        our_wscale: 2,
    }
}

fn snap(flow: u64, send: usize) -> ConnSnapshot {
    let o = offer(flow);
    ConnSnapshot {
        client: o.client,
        service: o.service,
        state: TcpState::Established,
        snd_una: 1,
        snd_nxt: 1,
        rcv_nxt: 2,
        client_fin: false,
        our_fin: false,
        client_window: 100,
        client_wscale: None,
        our_wscale: o.our_wscale,
        rx_capacity: o.rx_capacity,
        tx_capacity: o.tx_capacity,
        client_mss: 1460,
        sack_permitted: false,
        timestamps: None,
        send_bytes: vec![flow as u8; send],
        unread: Vec::new(),
        app: AppState {
            kind: o.app_kind,
            version: o.app_version,
            bytes: Vec::new(),
            fin_delivered: false,
        },
        ingress: Ingress {
            node_key: [0; 32],
            flow_id: flow,
        },
        srtt_us: None,
    }
}

// ---- wire fixtures ----

static OFFER_BYTES: &[u8] = &[
    0x02, // protocol version
    0x03, // Offer
    0x07, // migration 7
    0x01, // one conn
    0xac, 0x02, // flow 300
    198, 18, 1, 2, 0xc0, 0xb8, 0x02, // client 198.18.1.2:40000
    198, 19, 255, 1, 0x50, // service 198.19.255.1:80
    0x01, 0x02, // app kind 1, version 2
    0x01, // Established
    0x80, 0x80, 0x04, // rx_capacity 65536
    0x80, 0x80, 0x04, // tx_capacity 65536
    0x02, // our_wscale
];

static ACCEPT_BYTES: &[u8] = &[
    0x02, 0x01, 0x07, 0x02, // version, Accept, migration 7, two verdicts
    0xac, 0x02, 0x00, // 300 accepted
    0xad, 0x02, 0x01, 0x04, // 301 refused: unknown app (4)
];

static COMMIT_BYTES: &[u8] = &[
    0x02, 0x02, 0x07, 0x02, // version, Commit, migration 7, two results
    0xac, 0x02, 0x00, 0x05, // 300: Ok(5)
    0xad, 0x02, 0x01, 0x01, // 301: Err(capacity)
];

static REHOME_BYTES: &[u8] = &[
    0x02, 0x05, 0x07, // version, Rehome, migration 7
    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, // owner key: 32 bytes, no length
    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0x01, 0xac, 0x02,
    0x05, // one flow: 300 here, 5 at the owner
];

static ABORT_BYTES: &[u8] = &[
    0x02, 0x00, 0x07, // version, Abort, migration 7
    0x00, 0x01, // from the source, timeout
    0x02, 0x01, 0xac, 0x02, // flows 1 and 300
];

fn fixtures() -> Vec<(&'static [u8], Message)> {
    vec![
        (
            OFFER_BYTES,
            Message::Offer(Offer {
                migration: MigrationId(7),
                conns: vec![offer(300)],
            }),
        ),
        (
            ACCEPT_BYTES,
            Message::Accept(Accept {
                migration: MigrationId(7),
                verdicts: vec![
                    (300, Verdict::Accepted),
                    (301, Verdict::Refused(RefuseReason::UnknownApp)),
                ],
            }),
        ),
        (
            COMMIT_BYTES,
            Message::Commit(Commit {
                migration: MigrationId(7),
                results: vec![(300, Ok(5)), (301, Err(RefuseReason::Capacity))],
            }),
        ),
        (
            ABORT_BYTES,
            Message::Abort(Abort {
                migration: MigrationId(7),
                from: Side::Source,
                reason: AbortReason::Timeout,
                flows: vec![1, 300],
            }),
        ),
        (
            REHOME_BYTES,
            Message::Rehome(Rehome {
                migration: MigrationId(7),
                owner_key: [0xab; 32],
                flows: vec![(300, 5)],
            }),
        ),
    ]
}

#[test]
fn test_emit() {
    for (bytes, msg) in fixtures() {
        assert_eq!(msg.to_bytes(), bytes, "{msg}");
        assert_eq!(msg.encoded_len(), bytes.len());
    }
}

#[test]
fn test_parse() {
    for (bytes, msg) in fixtures() {
        assert_eq!(Message::decode(bytes), Ok(msg));
    }
}

#[test]
fn transfer_nests_versioned_snapshots() {
    let s = snap(300, 3);
    let msg = Message::Transfer(Transfer {
        migration: MigrationId(7),
        snapshots: vec![(300, s.clone())],
        withdrawn: vec![(301, RefuseReason::CaptureFailed)],
    });
    let bytes = msg.to_bytes();
    let mut expected = vec![0x02, 0x04, 0x07, 0x01, 0xac, 0x02];
    s.encode(&mut expected); // the snapshot's own encoding, version byte first
    expected.extend_from_slice(&[0x01, 0xad, 0x02, 13]);
    assert_eq!(bytes, expected);
    assert_eq!(Message::decode(&bytes), Ok(msg));
    // An invalid snapshot inside makes the whole message malformed.
    let mut bad = bytes.clone();
    let at = 6 + 18; // our_fin (small sequence numbers: one byte each)
    assert_eq!(bad[at], 0);
    bad[at] = 1;
    assert!(matches!(
        Message::decode(&bad),
        Err(MessageError::Malformed(_))
    ));
    // So does a snapshot of another version.
    let mut bad = bytes;
    bad[6] = 3;
    assert!(matches!(
        Message::decode(&bad),
        Err(MessageError::Malformed(_))
    ));
}

#[test]
fn decode_rejects_framing() {
    assert_eq!(Message::decode(&[]), Err(MessageError::Empty));
    for old_or_new in [1, 3] {
        let mut b = OFFER_BYTES.to_vec();
        b[0] = old_or_new;
        assert_eq!(Message::decode(&b), Err(MessageError::Version(old_or_new)));
    }
    let mut b = OFFER_BYTES.to_vec();
    b.push(0);
    assert_eq!(Message::decode(&b), Err(MessageError::TrailingBytes(1)));
    let mut b = OFFER_BYTES.to_vec();
    b[1] = 6; // no such message
    assert!(matches!(
        Message::decode(&b),
        Err(MessageError::Malformed(_))
    ));
    for cut in 1..OFFER_BYTES.len() {
        assert!(Message::decode(&OFFER_BYTES[..cut]).is_err());
    }
}

#[test]
fn reason_codes_round_trip() {
    for code in 0..=255u8 {
        assert_eq!(u8::from(RefuseReason::from(code)), code);
        assert_eq!(u8::from(AbortReason::from(code)), code);
    }
    // An unknown reason from a newer node still decodes.
    let mut b = ACCEPT_BYTES.to_vec();
    *b.last_mut().unwrap() = 200;
    let Ok(Message::Accept(a)) = Message::decode(&b) else {
        panic!("decodes")
    };
    assert_eq!(
        a.verdicts[1].1,
        Verdict::Refused(RefuseReason::Unknown(200))
    );
    assert_eq!(RefuseReason::Unknown(200).to_string(), "unknown reason 200");
}

fn abort_with_flows(n: usize) -> Vec<u8> {
    let msg = Message::Abort(Abort {
        migration: MigrationId(7),
        from: Side::Source,
        reason: AbortReason::Timeout,
        flows: vec![0; n.min(MAX_BATCH)],
    });
    let mut b = msg.to_bytes();
    if n > MAX_BATCH {
        // Rewrite the length prefix (two varint bytes for both 4096 and 4097) and add
        // entries.
        assert_eq!(&b[5..7], &[0x80, 0x20]);
        b[5] = 0x80 | (n & 0x7f) as u8;
        b[6] = (n >> 7) as u8;
        b.extend(std::iter::repeat_n(0u8, n - MAX_BATCH));
    }
    b
}

#[test]
fn decode_rejects_oversize_batches() {
    assert!(Message::decode(&abort_with_flows(MAX_BATCH)).is_ok());
    assert!(matches!(
        Message::decode(&abort_with_flows(MAX_BATCH + 1)),
        Err(MessageError::Malformed(_))
    ));
    // A length prefix claiming far more entries than there are bytes fails without
    // allocating for them.
    let b = [0x02, 0x00, 0x07, 0x00, 0x01, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(matches!(
        Message::decode(&b),
        Err(MessageError::Malformed(_))
    ));
}

#[test]
fn recipients() {
    let msgs: Vec<Message> = fixtures().into_iter().map(|(_, m)| m).collect();
    let [offer_msg, accept, commit, abort, rehome] = <[Message; 5]>::try_from(msgs).unwrap();
    assert_eq!(offer_msg.recipient(), Recipient::Target);
    assert_eq!(accept.recipient(), Recipient::Source);
    assert_eq!(commit.recipient(), Recipient::Source);
    assert_eq!(abort.recipient(), Recipient::Target);
    assert_eq!(rehome.recipient(), Recipient::Ingress);
    assert_eq!(rehome.to_string(), "Rehome(migration 7, 1 flows)");
    assert_eq!(abort.migration(), MigrationId(7));
    assert_eq!(
        Message::Abort(Abort {
            migration: MigrationId(1),
            from: Side::Target,
            reason: AbortReason::Refused,
            flows: vec![],
        })
        .recipient(),
        Recipient::Source
    );
    assert_eq!(commit.to_string(), "Commit(migration 7, 1 of 2 restored)");
}

// ---- scripted exchanges ----

type Peer = u8;
const SRC: Peer = 1;
const DST: Peer = 2;

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

struct Pair {
    src: Source<Peer>,
    dst: Target<Peer>,
}

impl Pair {
    fn new() -> Pair {
        Pair {
            src: Source::new(Config::default(), 100),
            dst: Target::new(Config::default()),
        }
    }

    fn src_sends(&mut self) -> Vec<Message> {
        std::iter::from_fn(|| self.src.poll_transmit())
            .map(|(p, m)| {
                assert_eq!(p, DST);
                m
            })
            .collect()
    }

    fn dst_sends(&mut self) -> Vec<Message> {
        std::iter::from_fn(|| self.dst.poll_transmit())
            .map(|(p, m)| {
                assert_eq!(p, SRC);
                m
            })
            .collect()
    }

    fn src_actions(&mut self) -> Vec<SourceAction<Peer>> {
        std::iter::from_fn(|| self.src.poll_action()).collect()
    }

    fn dst_actions(&mut self) -> Vec<TargetAction<Peer>> {
        std::iter::from_fn(|| self.dst.poll_action()).collect()
    }

    fn deliver_to_dst(&mut self, now: Instant, msgs: Vec<Message>) {
        for m in msgs {
            let m = Message::decode(&m.to_bytes()).unwrap();
            self.dst.handle_message(now, SRC, m);
        }
    }

    fn deliver_to_src(&mut self, now: Instant, msgs: Vec<Message>) {
        for m in msgs {
            let m = Message::decode(&m.to_bytes()).unwrap();
            self.src.handle_message(now, DST, m);
        }
    }

    /// Start with `flows`, offer delivered, all admitted, accept delivered, capture
    /// requested. Returns the migration id.
    fn up_to_capture(&mut self, flows: &[u64]) -> MigrationId {
        let id = self
            .src
            .start(t(0), DST, flows.iter().map(|&f| offer(f)).collect())
            .unwrap();
        let msgs = self.src_sends();
        self.deliver_to_dst(t(1), msgs);
        let [TargetAction::Admit { offers, .. }] = &self.dst_actions()[..] else {
            panic!("admit")
        };
        let verdicts = offers.iter().map(|o| (o.flow, Verdict::Accepted)).collect();
        self.dst.admitted(t(1), SRC, id, verdicts);
        let msgs = self.dst_sends();
        self.deliver_to_src(t(2), msgs);
        let actions = self.src_actions();
        assert_eq!(
            actions,
            vec![SourceAction::Capture {
                migration: id,
                peer: DST,
                flows: flows.to_vec()
            }]
        );
        id
    }
}

fn finished(actions: &[SourceAction<Peer>]) -> &MigrationReport<Peer> {
    match actions.last() {
        Some(SourceAction::Finished { report, .. }) => report,
        other => panic!("expected Finished last, got {other:?}"),
    }
}

#[test]
fn happy_path_step_by_step() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[10, 11]);
    assert_eq!(id, MigrationId(100));
    assert_eq!(p.src.migration_of(10), Some(id));
    p.src
        .captured(t(3), id, vec![(10, snap(10, 5)), (11, snap(11, 0))], vec![]);
    let msgs = p.src_sends();
    assert_eq!(msgs.len(), 1);
    p.deliver_to_dst(t(4), msgs);
    let [TargetAction::Restore { snapshots, .. }] = &p.dst_actions()[..] else {
        panic!("restore")
    };
    assert_eq!(snapshots.len(), 2);
    p.dst
        .restored(t(5), SRC, id, vec![(10, Ok(1000)), (11, Ok(1001))]);
    let msgs = p.dst_sends();
    p.deliver_to_src(t(6), msgs);
    let actions = p.src_actions();
    assert_eq!(
        actions[..2],
        [
            SourceAction::Moved {
                migration: id,
                flow: 10,
                peer: DST,
                target_flow: 1000
            },
            SourceAction::Moved {
                migration: id,
                flow: 11,
                peer: DST,
                target_flow: 1001
            }
        ]
    );
    let report = finished(&actions);
    assert_eq!((report.moved, report.refused, report.thawed), (2, 0, 0));
    assert_eq!(report.transfers, 1);
    assert_eq!(report.finished - report.started, Duration::from_millis(6));
    assert_eq!(p.src.migration_of(10), None);
    assert_eq!(p.src.active_migrations(), 0);
    assert_eq!(p.dst.active_migrations(), 0);
    // Both forget after the linger time.
    assert_eq!(p.src.poll_timeout(), Some(t(6) + Duration::from_secs(60)));
    p.src.handle_timeout(t(70_000));
    p.dst.handle_timeout(t(70_000));
    assert_eq!(p.src.remembered_migrations(), 0);
    assert_eq!(p.dst.remembered_migrations(), 0);
    assert_eq!(p.src.poll_timeout(), None);
    assert_eq!(p.dst.poll_timeout(), None);
}

#[test]
fn start_errors() {
    let mut s: Source<Peer> = Source::new(Config::default(), 1);
    assert_eq!(s.start(t(0), DST, vec![]), Err(StartError::Empty));
    assert_eq!(
        s.start(t(0), DST, vec![offer(1), offer(1)]),
        Err(StartError::DuplicateFlow(1))
    );
    let mut bad = offer(2);
    bad.rx_capacity = 0;
    assert_eq!(
        s.start(t(0), DST, vec![bad]),
        Err(StartError::InvalidOffer(2))
    );
    assert_eq!(
        s.start(t(0), DST, (0..=MAX_BATCH as u64).map(offer).collect()),
        Err(StartError::TooMany(MAX_BATCH + 1))
    );
    let id = s.start(t(0), DST, vec![offer(1)]).unwrap();
    assert_eq!(
        s.start(t(0), DST, vec![offer(1)]),
        Err(StartError::FlowBusy {
            flow: 1,
            migration: id
        })
    );
}

#[test]
fn refusals_and_missing_verdicts() {
    let mut p = Pair::new();
    let id = p
        .src
        .start(t(0), DST, vec![offer(1), offer(2), offer(3)])
        .unwrap();
    let msgs = p.src_sends();
    p.deliver_to_dst(t(1), msgs);
    p.dst_actions();
    // Flow 3 gets no verdict from the driver.
    p.dst.admitted(
        t(1),
        SRC,
        id,
        vec![
            (1, Verdict::Accepted),
            (2, Verdict::Refused(RefuseReason::Capacity)),
        ],
    );
    let msgs = p.dst_sends();
    let Message::Accept(a) = &msgs[0] else {
        panic!()
    };
    assert_eq!(
        a.verdicts,
        vec![
            (1, Verdict::Accepted),
            (2, Verdict::Refused(RefuseReason::Capacity)),
            (3, Verdict::Refused(RefuseReason::NotAccepted)),
        ]
    );
    p.deliver_to_src(t(2), msgs);
    assert_eq!(
        p.src_actions(),
        vec![
            SourceAction::Refused {
                migration: id,
                flow: 2,
                reason: RefuseReason::Capacity
            },
            SourceAction::Refused {
                migration: id,
                flow: 3,
                reason: RefuseReason::NotAccepted
            },
            SourceAction::Capture {
                migration: id,
                peer: DST,
                flows: vec![1]
            },
        ]
    );
}

#[test]
fn duplicate_offer_and_transfer_are_answered_alike() {
    let mut p = Pair::new();
    let id = p.src.start(t(0), DST, vec![offer(1)]).unwrap();
    let offer_msgs = p.src_sends();
    p.deliver_to_dst(t(1), offer_msgs.clone());
    p.deliver_to_dst(t(1), offer_msgs.clone()); // while admitting: no second Admit
    assert_eq!(p.dst_actions().len(), 1);
    p.dst.admitted(t(1), SRC, id, vec![(1, Verdict::Accepted)]);
    let accept = p.dst_sends();
    p.deliver_to_dst(t(1), offer_msgs);
    assert_eq!(p.dst_sends(), accept, "same accept again");
    p.deliver_to_src(t(2), accept.clone());
    p.deliver_to_src(t(2), accept); // duplicate accept: ignored
    assert_eq!(p.src_actions().len(), 1);
    p.src.captured(t(3), id, vec![(1, snap(1, 1))], vec![]);
    let transfer = p.src_sends();
    p.deliver_to_dst(t(4), transfer.clone());
    p.deliver_to_dst(t(4), transfer.clone()); // while restoring: nothing
    assert_eq!(p.dst_actions().len(), 1);
    assert!(p.dst_sends().is_empty());
    p.dst.restored(t(5), SRC, id, vec![(1, Ok(77))]);
    let commit = p.dst_sends();
    p.deliver_to_dst(t(6), transfer);
    assert_eq!(p.dst_sends(), commit, "same commit again");
    assert!(p.dst_actions().is_empty(), "no second restore");
    p.deliver_to_src(t(7), commit.clone());
    p.deliver_to_src(t(7), commit); // duplicate commit of a moved flow: silence
    assert!(p.src_sends().is_empty());
    let actions = p.src_actions();
    assert_eq!(finished(&actions).moved, 1);
    assert_eq!(actions.len(), 2);
}

#[test]
fn accept_timeout_refuses_and_tells_the_target() {
    let mut p = Pair::new();
    let id = p.src.start(t(0), DST, vec![offer(1), offer(2)]).unwrap();
    let offer_msgs = p.src_sends();
    assert_eq!(p.src.poll_timeout(), Some(t(2000)));
    p.src.handle_timeout(t(1999));
    assert!(p.src_actions().is_empty());
    p.src.handle_timeout(t(2000));
    let actions = p.src_actions();
    assert_eq!(
        actions[..2],
        [
            SourceAction::Refused {
                migration: id,
                flow: 1,
                reason: RefuseReason::Timeout
            },
            SourceAction::Refused {
                migration: id,
                flow: 2,
                reason: RefuseReason::Timeout
            },
        ]
    );
    assert_eq!(finished(&actions).abort, Some(AbortReason::Timeout));
    let abort = p.src_sends();
    assert_eq!(
        abort,
        vec![Message::Abort(Abort {
            migration: id,
            from: Side::Source,
            reason: AbortReason::Timeout,
            flows: vec![1, 2]
        })]
    );
    // The offer was only slow: the target admits, then learns of the abort from the
    // source's answer to its Accept, and releases.
    p.deliver_to_dst(t(2500), offer_msgs);
    p.dst_actions();
    p.dst
        .admitted(t(2500), SRC, id, vec![(1, Verdict::Accepted)]);
    let accept = p.dst_sends();
    p.deliver_to_src(t(2600), accept);
    assert!(p.src_actions().is_empty(), "never acts twice");
    let again = p.src_sends();
    assert_eq!(again, abort);
    p.deliver_to_dst(t(2700), again);
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Release {
            peer: SRC,
            migration: id,
            flows: vec![1],
            reason: RefuseReason::Aborted
        }]
    );
    assert_eq!(p.dst.active_migrations(), 0);
}

#[test]
fn late_commit_after_abort_is_discarded() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2]);
    p.src
        .captured(t(3), id, vec![(1, snap(1, 1)), (2, snap(2, 1))], vec![]);
    let transfer = p.src_sends();
    p.deliver_to_dst(t(4), transfer);
    p.dst_actions();
    p.dst.restored(t(5), SRC, id, vec![(1, Ok(501))]);
    let commit1 = p.dst_sends();
    p.deliver_to_src(t(6), commit1);
    assert!(matches!(
        p.src_actions()[..],
        [SourceAction::Moved { flow: 1, .. }]
    ));
    // Flow 2's restore is slow; the source gives up on it: 3 s after the Transfer, plus 1 s
    // per MiB of it (a few hundred bytes here).
    let deadline = p.src.poll_timeout().expect("commit deadline");
    assert!(deadline >= t(3003) && deadline < t(3004), "{deadline:?}");
    p.src.handle_timeout(deadline);
    let actions = p.src_actions();
    assert_eq!(
        actions[0],
        SourceAction::Thaw {
            migration: id,
            flow: 2,
            reason: RefuseReason::Timeout
        }
    );
    assert_eq!(
        (finished(&actions).moved, finished(&actions).thawed),
        (1, 1)
    );
    let abort = p.src_sends();
    assert_eq!(
        abort,
        vec![Message::Abort(Abort {
            migration: id,
            from: Side::Source,
            reason: AbortReason::Timeout,
            flows: vec![2]
        })]
    );
    // The target finishes the restore; its Commit crosses the Abort.
    p.dst.restored(t(3004), SRC, id, vec![(2, Ok(502))]);
    let late_commit = p.dst_sends();
    p.deliver_to_dst(t(3005), abort.clone());
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Discard {
            peer: SRC,
            migration: id,
            flows: vec![502],
            reason: AbortReason::Timeout
        }]
    );
    p.deliver_to_src(t(3006), late_commit);
    assert!(p.src_actions().is_empty());
    let again = p.src_sends();
    assert_eq!(again, abort, "abort repeated");
    p.deliver_to_dst(t(3007), again);
    assert!(p.dst_actions().is_empty(), "discarded once only");
}

#[test]
fn restore_after_abort_is_discarded_without_commit() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1]);
    p.src.captured(t(3), id, vec![(1, snap(1, 1))], vec![]);
    let transfer = p.src_sends();
    p.deliver_to_dst(t(4), transfer);
    p.dst_actions();
    assert!(p.src.cancel(t(5), id));
    assert!(!p.src.cancel(t(5), id));
    let actions = p.src_actions();
    assert_eq!(
        actions[0],
        SourceAction::Thaw {
            migration: id,
            flow: 1,
            reason: RefuseReason::Aborted
        }
    );
    assert_eq!(finished(&actions).abort, Some(AbortReason::Cancelled));
    let abort = p.src_sends();
    p.deliver_to_dst(t(6), abort);
    assert!(p.dst_actions().is_empty());
    p.dst.restored(t(7), SRC, id, vec![(1, Ok(9))]);
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Discard {
            peer: SRC,
            migration: id,
            flows: vec![9],
            reason: AbortReason::Cancelled
        }]
    );
    assert!(p.dst_sends().is_empty());
    assert_eq!(p.dst.active_migrations(), 0);
}

#[test]
fn snapshots_checked_against_offers() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2, 3]);
    let mut wrong_buffers = snap(2, 0);
    wrong_buffers.rx_capacity = 1024;
    let mut wrong_app = snap(3, 0);
    wrong_app.app.version = 9;
    p.src.captured(
        t(3),
        id,
        vec![(1, snap(1, 0)), (2, wrong_buffers), (3, wrong_app)],
        vec![],
    );
    let transfer = p.src_sends();
    p.deliver_to_dst(t(4), transfer);
    let [TargetAction::Restore { snapshots, .. }] = &p.dst_actions()[..] else {
        panic!()
    };
    assert_eq!(snapshots.len(), 1);
    let Message::Commit(c) = &p.dst_sends()[0] else {
        panic!()
    };
    assert_eq!(
        c.results,
        vec![
            (2, Err(RefuseReason::BufferMismatch)),
            (3, Err(RefuseReason::AppVersion))
        ]
    );
}

#[test]
fn hostile_transfer_for_flows_not_accepted() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1]);
    p.deliver_to_dst(
        t(3),
        vec![Message::Transfer(Transfer {
            migration: id,
            snapshots: vec![(99, snap(99, 0))],
            withdrawn: vec![(98, RefuseReason::CaptureFailed)],
        })],
    );
    assert!(p.dst_actions().is_empty(), "the driver is not bothered");
    let Message::Commit(c) = &p.dst_sends()[0] else {
        panic!()
    };
    assert_eq!(c.results, vec![(99, Err(RefuseReason::NotAccepted))]);
    // A transfer for a migration the target never saw.
    p.deliver_to_dst(
        t(3),
        vec![Message::Transfer(Transfer {
            migration: MigrationId(5),
            snapshots: vec![(1, snap(1, 0))],
            withdrawn: vec![],
        })],
    );
    assert_eq!(
        p.dst_sends(),
        vec![Message::Abort(Abort {
            migration: MigrationId(5),
            from: Side::Target,
            reason: AbortReason::UnknownMigration,
            flows: vec![]
        })]
    );
}

#[test]
fn capture_failures_thaw_and_withdraw() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2, 3, 4]);
    let mut invalid = snap(3, 0);
    invalid.client_mss = 1;
    // 1 fails, 2 is captured, 3 is invalid, 4 is not mentioned.
    p.src.captured(
        t(3),
        id,
        vec![(2, snap(2, 0)), (3, invalid)],
        vec![(1, RefuseReason::Shutdown)],
    );
    let actions = p.src_actions();
    assert_eq!(
        actions,
        vec![
            SourceAction::Thaw {
                migration: id,
                flow: 1,
                reason: RefuseReason::Shutdown
            },
            SourceAction::Thaw {
                migration: id,
                flow: 3,
                reason: RefuseReason::CaptureFailed
            },
            SourceAction::Thaw {
                migration: id,
                flow: 4,
                reason: RefuseReason::CaptureFailed
            },
        ]
    );
    let msgs = p.src_sends();
    let [Message::Transfer(tr)] = &msgs[..] else {
        panic!()
    };
    assert_eq!(tr.snapshots.len(), 1);
    assert_eq!(
        tr.withdrawn,
        vec![
            (1, RefuseReason::Shutdown),
            (3, RefuseReason::CaptureFailed),
            (4, RefuseReason::CaptureFailed)
        ]
    );
    p.deliver_to_dst(t(4), msgs);
    let actions = p.dst_actions();
    assert!(matches!(
        &actions[..],
        [TargetAction::Release { flows, .. }, TargetAction::Restore { .. }] if *flows == vec![1, 3, 4]
    ));
}

#[test]
fn too_large_snapshots_stay_and_transfers_split() {
    let config = Config {
        max_message_bytes: MIN_MESSAGE_BYTES,
        ..Config::default()
    };
    let mut p = Pair::new();
    p.src = Source::new(config, 1);
    let flows: Vec<u64> = (1..=10).collect();
    let id = p.up_to_capture(&flows);
    let mut snaps: Vec<(u64, ConnSnapshot)> = (1..=9).map(|f| (f, snap(f, 5000))).collect();
    snaps.push((10, snap(10, MIN_MESSAGE_BYTES)));
    p.src.captured(t(3), id, snaps, vec![]);
    assert_eq!(
        p.src_actions(),
        vec![SourceAction::Thaw {
            migration: id,
            flow: 10,
            reason: RefuseReason::TooLarge
        }]
    );
    let msgs = p.src_sends();
    // 5 kB each, three per 16 KiB message, the withdrawn flow in the last one.
    assert_eq!(msgs.len(), 3);
    for m in &msgs {
        assert!(m.encoded_len() <= MIN_MESSAGE_BYTES, "{}", m.encoded_len());
    }
    p.deliver_to_dst(t(4), msgs);
    let restored: Vec<(u64, Result<u64, RefuseReason>)> = p
        .dst_actions()
        .into_iter()
        .filter_map(|a| match a {
            TargetAction::Restore { snapshots, .. } => Some(snapshots),
            _ => None,
        })
        .flatten()
        .map(|(f, _)| (f, Ok(f + 1000)))
        .collect();
    assert_eq!(restored.len(), 9);
    p.dst.restored(t(5), SRC, id, restored);
    let msgs = p.dst_sends();
    p.deliver_to_src(t(6), msgs);
    let actions = p.src_actions();
    let r = finished(&actions);
    assert_eq!((r.moved, r.thawed, r.transfers), (9, 1, 3));
}

#[test]
fn target_limits_concurrent_migrations_per_peer() {
    let config = Config {
        max_migrations_per_peer: 2,
        max_finished_per_peer: 1,
        ..Config::default()
    };
    let mut p = Pair::new();
    p.dst = Target::new(config);
    let ids: Vec<MigrationId> = (0..3)
        .map(|i| p.src.start(t(0), DST, vec![offer(i)]).unwrap())
        .collect();
    let msgs = p.src_sends();
    p.deliver_to_dst(t(1), msgs);
    assert_eq!(p.dst_actions().len(), 2);
    let refusal = p.dst_sends();
    assert_eq!(
        refusal,
        vec![Message::Abort(Abort {
            migration: ids[2],
            from: Side::Target,
            reason: AbortReason::Refused,
            flows: vec![]
        })]
    );
    p.deliver_to_src(t(2), refusal);
    let actions = p.src_actions();
    assert_eq!(
        actions[0],
        SourceAction::Refused {
            migration: ids[2],
            flow: 2,
            reason: RefuseReason::Aborted
        }
    );
    assert_eq!(finished(&actions).abort, Some(AbortReason::Refused));
    // Refusing everything finishes the first two at the target; only one is remembered
    // once a new offer arrives.
    for id in &ids[..2] {
        p.dst.admitted(t(3), SRC, *id, vec![]);
    }
    assert_eq!(p.dst.remembered_migrations(), 2);
    let id = p.src.start(t(4), DST, vec![offer(7)]).unwrap();
    let msgs = p.src_sends();
    p.deliver_to_dst(t(4), msgs);
    assert!(matches!(
        p.dst_actions()[..],
        [TargetAction::Admit { migration, .. }] if migration == id
    ));
    assert_eq!(p.dst.remembered_migrations(), 2);
}

#[test]
fn target_prefilters_offers() {
    let mut p = Pair::new();
    let mut bad = offer(3);
    bad.our_wscale = 15;
    let m = Message::Offer(Offer {
        migration: MigrationId(1),
        conns: vec![offer(1), offer(2), offer(1), bad],
    });
    p.deliver_to_dst(t(0), vec![m]);
    let [TargetAction::Admit { offers, .. }] = &p.dst_actions()[..] else {
        panic!()
    };
    assert_eq!(offers, &vec![offer(2)]);
    p.dst
        .admitted(t(1), SRC, MigrationId(1), vec![(2, Verdict::Accepted)]);
    let Message::Accept(a) = &p.dst_sends()[0] else {
        panic!()
    };
    assert_eq!(
        a.verdicts,
        vec![
            (1, Verdict::Refused(RefuseReason::Duplicate)),
            (2, Verdict::Accepted),
            (1, Verdict::Refused(RefuseReason::Duplicate)),
            (3, Verdict::Refused(RefuseReason::Malformed)),
        ]
    );
    // Flow 2 is reserved: offered again in another migration, it is a duplicate.
    let m = Message::Offer(Offer {
        migration: MigrationId(2),
        conns: vec![offer(2)],
    });
    p.deliver_to_dst(t(2), vec![m]);
    assert!(p.dst_actions().is_empty());
    let Message::Accept(a) = &p.dst_sends()[0] else {
        panic!()
    };
    assert_eq!(
        a.verdicts,
        vec![(2, Verdict::Refused(RefuseReason::Duplicate))]
    );
    // A different offer under a known id is a protocol violation.
    let m = Message::Offer(Offer {
        migration: MigrationId(1),
        conns: vec![offer(5)],
    });
    p.deliver_to_dst(t(3), vec![m]);
    assert!(matches!(
        &p.dst_sends()[..],
        [Message::Abort(Abort {
            reason: AbortReason::Protocol,
            from: Side::Target,
            ..
        })]
    ));
}

#[test]
fn reservations_expire() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2]);
    // 5 s, plus 1 s per MiB the reserved flows may bring (2 × 128 KiB of buffers).
    assert_eq!(
        p.dst.poll_timeout(),
        Some(t(1) + Duration::from_millis(5_250))
    );
    p.dst.handle_timeout(t(5250));
    assert!(p.dst_actions().is_empty(), "released before the deadline");
    p.dst.handle_timeout(t(5251));
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Release {
            peer: SRC,
            migration: id,
            flows: vec![1, 2],
            reason: RefuseReason::Expired
        }]
    );
    // The source was slow, not dead: its transfer is answered with the expiry.
    p.src
        .captured(t(6000), id, vec![(1, snap(1, 0)), (2, snap(2, 0))], vec![]);
    let msgs = p.src_sends();
    p.deliver_to_dst(t(6001), msgs);
    assert!(p.dst_actions().is_empty());
    let msgs = p.dst_sends();
    p.deliver_to_src(t(6002), msgs);
    let actions = p.src_actions();
    assert_eq!(
        actions[0],
        SourceAction::Thaw {
            migration: id,
            flow: 1,
            reason: RefuseReason::Expired
        }
    );
    assert_eq!(finished(&actions).thawed, 2);
}

/// A batch of full send buffers spans several Transfers: each one restarts the
/// reservations' clock, so a slow but progressing batch is not expired halfway.
#[test]
fn each_transfer_extends_the_reservations() {
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2]);
    let first = Message::Transfer(Transfer {
        migration: id,
        snapshots: vec![(1, snap(1, 0))],
        withdrawn: vec![],
    });
    p.deliver_to_dst(t(4000), vec![first]);
    // Flow 2 alone is reserved now: 5 s plus its 128 KiB of buffers at 1 s per MiB.
    assert_eq!(
        p.dst.poll_timeout(),
        Some(t(4000) + Duration::from_millis(5_125))
    );
    p.dst.handle_timeout(t(5300));
    assert!(
        !p.dst_actions()
            .iter()
            .any(|a| matches!(a, TargetAction::Release { .. })),
        "released while the batch was still arriving"
    );
    // No further Transfer: flow 2's reservation ends after the last one.
    p.dst.handle_timeout(t(9125));
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Release {
            peer: SRC,
            migration: id,
            flows: vec![2],
            reason: RefuseReason::Expired
        }]
    );
}

#[test]
fn peer_restarts() {
    // The target restarts while the source waits for commits.
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2]);
    p.src
        .captured(t(3), id, vec![(1, snap(1, 0)), (2, snap(2, 0))], vec![]);
    p.src_sends();
    p.src.peer_restarted(t(4), DST);
    let actions = p.src_actions();
    assert_eq!(finished(&actions).thawed, 2);
    assert_eq!(finished(&actions).abort, Some(AbortReason::PeerRestarted));
    assert!(p.src_sends().is_empty(), "nothing to tell a restarted peer");

    // The source restarts while the target holds reservations and a restore.
    let mut p = Pair::new();
    let id = p.up_to_capture(&[1, 2]);
    p.src.captured(t(3), id, vec![(1, snap(1, 0))], vec![]);
    // Only the Transfer for flow 1 (and the withdrawal of 2) arrives.
    let msgs = p.src_sends();
    p.deliver_to_dst(t(4), msgs);
    p.dst_actions();
    let id2 = p.src.start(t(4), DST, vec![offer(3)]).unwrap();
    let msgs = p.src_sends();
    p.deliver_to_dst(t(4), msgs);
    p.dst_actions();
    p.dst.admitted(t(4), SRC, id2, vec![(3, Verdict::Accepted)]);
    p.dst.peer_restarted(t(5), SRC);
    assert_eq!(
        p.dst_actions(),
        vec![TargetAction::Release {
            peer: SRC,
            migration: id2,
            flows: vec![3],
            reason: RefuseReason::Aborted
        }]
    );
    assert_eq!(p.dst.remembered_migrations(), 0);
    p.dst.restored(t(6), SRC, id, vec![(1, Ok(44))]);
    assert!(matches!(
        &p.dst_actions()[..],
        [TargetAction::Discard { flows, .. }] if *flows == vec![44]
    ));
}

#[test]
fn displays() {
    let a: SourceAction<Peer> = SourceAction::Thaw {
        migration: MigrationId(3),
        flow: 9,
        reason: RefuseReason::Timeout,
    };
    assert_eq!(a.to_string(), "migration 3: flow 9 thawed: timeout");
    let a: TargetAction<Peer> = TargetAction::Release {
        peer: 1,
        migration: MigrationId(3),
        flows: vec![1, 2],
        reason: RefuseReason::Expired,
    };
    assert_eq!(
        a.to_string(),
        "migration 3 from 1: release 2 reservations (reservation expired)"
    );
    assert_eq!(
        Verdict::Refused(RefuseReason::Capacity).to_string(),
        "refused: no capacity"
    );
}
