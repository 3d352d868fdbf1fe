//! Harnesses shared by the fuzz targets (`statesync/fuzz`) and the tests that replay their
//! corpora and run them over seeded random inputs, so that CI exercises exactly what the
//! fuzzer runs. Not a public API.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use crate::protocol::{
    Config, ConnOffer, Message, MigrationId, Source, SourceAction, Target, TargetAction, Verdict,
};
use crate::snapshot::{AppState, ConnSnapshot, Ingress, TcpState};
use crate::time::Instant;

/// Decodes `data` as a snapshot. Whatever decodes must re-encode to an equal snapshot of
/// [`ConnSnapshot::encoded_len`] bytes. Returns whether `data` decoded.
///
/// # Panics
/// When the round trip fails: a bug in the codec.
pub fn snapshot(data: &[u8]) -> bool {
    let Ok(snap) = ConnSnapshot::decode(data) else {
        return false;
    };
    let bytes = snap.to_bytes();
    assert_eq!(bytes.len(), snap.encoded_len(), "encoded_len is exact");
    let again = ConnSnapshot::decode(&bytes).expect("a decoded snapshot re-encodes validly");
    assert_eq!(again, snap, "snapshot round trip");
    true
}

/// A source and a target, each with migrations under way, that every input is handed to
/// as a message from the other (what a broken or malicious peer could send). Their own
/// answers are dropped; their actions are answered as a driver would. Virtual time moves on
/// 10 ms per input so that timers run, and new migrations start now and then. Nothing may
/// panic, and whatever decodes must re-encode to an equal message.
pub struct MessageHarness {
    src: Source<u8>,
    dst: Target<u8>,
    now: Instant,
    inputs: u64,
    next_flow: u64,
    next_target_flow: u64,
    /// Source flows being captured, for the driver's answers.
    capturing: Vec<(MigrationId, Vec<u64>)>,
}

/// The source node's handle of the target, and the other way round.
const SRC: u8 = 1;
const DST: u8 = 2;

/// The offer the harness makes for `flow` (a snapshot of [`harness_snapshot`] matches it).
pub fn harness_offer(flow: u64) -> ConnOffer {
    ConnOffer::from_snapshot(flow, &harness_snapshot(flow))
}

/// A valid snapshot of flow `flow`.
pub fn harness_snapshot(flow: u64) -> ConnSnapshot {
    ConnSnapshot {
        client: SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 1, 2),
            10_000 + (flow % 50_000) as u16,
        ),
        service: SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80),
        state: TcpState::Established,
        snd_una: flow as u32,
        snd_nxt: flow as u32 + 2,
        rcv_nxt: 7,
        client_fin: false,
        our_fin: false,
        client_window: 1000,
        client_wscale: Some(7),
        our_wscale: 2,
        rx_capacity: 65536,
        tx_capacity: 65536,
        client_mss: 1460,
        sack_permitted: true,
        timestamps: None,
        send_bytes: vec![1, 2, 3],
        unread: vec![4],
        app: AppState {
            kind: 1,
            version: 1,
            bytes: vec![],
            fin_delivered: false,
        },
        ingress: Ingress {
            node_key: [9; 32],
            flow_id: flow,
        },
        srtt_us: Some(1_000 + (flow % 1_000) as u32),
    }
}

impl Default for MessageHarness {
    fn default() -> Self {
        MessageHarness::new()
    }
}

impl MessageHarness {
    /// A source with a migration of flows 0..4 offered to the target (first id 1), and a
    /// target that admitted all of migration 1 from the source.
    pub fn new() -> MessageHarness {
        let now = Instant::from_secs(1);
        let mut h = MessageHarness {
            src: Source::new(Config::default(), 1),
            dst: Target::new(Config::default()),
            now,
            inputs: 0,
            next_flow: 0,
            next_target_flow: 1_000,
            capturing: Vec::new(),
        };
        h.start_migration();
        // The target gets the real offer, so that migration 1 is known on both sides.
        while let Some((_, msg)) = h.src.poll_transmit() {
            h.dst.handle_message(now, SRC, msg);
        }
        h.drive();
        h
    }

    fn start_migration(&mut self) {
        let offers = (self.next_flow..self.next_flow + 4)
            .map(harness_offer)
            .collect();
        self.next_flow += 4;
        let _ = self.src.start(self.now, DST, offers);
    }

    /// Answers every action as a driver would, and drops every message.
    fn drive(&mut self) {
        for _ in 0..16 {
            let mut progress = false;
            while self.src.poll_transmit().is_some() {}
            while self.dst.poll_transmit().is_some() {}
            while let Some(a) = self.src.poll_action() {
                progress = true;
                let _ = a.to_string();
                if let SourceAction::Capture {
                    migration, flows, ..
                } = a
                {
                    self.capturing.push((migration, flows));
                }
            }
            for (migration, flows) in core::mem::take(&mut self.capturing) {
                let snaps = flows.iter().map(|&f| (f, harness_snapshot(f))).collect();
                self.src.captured(self.now, migration, snaps, Vec::new());
            }
            while let Some(a) = self.dst.poll_action() {
                progress = true;
                let _ = a.to_string();
                match a {
                    TargetAction::Admit {
                        peer,
                        migration,
                        offers,
                    } => {
                        let verdicts = offers.iter().map(|o| (o.flow, Verdict::Accepted)).collect();
                        self.dst.admitted(self.now, peer, migration, verdicts);
                    }
                    TargetAction::Restore {
                        peer,
                        migration,
                        snapshots,
                    } => {
                        let results = snapshots
                            .iter()
                            .map(|(f, _)| {
                                self.next_target_flow += 1;
                                (*f, Ok(self.next_target_flow))
                            })
                            .collect();
                        self.dst.restored(self.now, peer, migration, results);
                    }
                    TargetAction::Discard { .. } | TargetAction::Release { .. } => {}
                }
            }
            if !progress {
                break;
            }
        }
    }

    /// Runs one input. Returns whether it decoded.
    ///
    /// # Panics
    /// When a state machine panics or a decoded message does not round-trip: bugs.
    pub fn run(&mut self, data: &[u8]) -> bool {
        self.inputs += 1;
        self.now += Duration::from_millis(10);
        if self.inputs.is_multiple_of(64) {
            self.start_migration();
        }
        let decoded = match Message::decode(data) {
            Ok(msg) => {
                let bytes = msg.to_bytes();
                assert_eq!(bytes.len(), msg.encoded_len(), "encoded_len is exact");
                assert_eq!(
                    Message::decode(&bytes).as_ref(),
                    Ok(&msg),
                    "message round trip"
                );
                let _ = msg.to_string();
                self.src.handle_message(self.now, DST, msg.clone());
                self.dst.handle_message(self.now, SRC, msg);
                true
            }
            Err(_) => false,
        };
        self.drive();
        if self.src.poll_timeout().is_some_and(|t| t <= self.now) {
            self.src.handle_timeout(self.now);
        }
        if self.dst.poll_timeout().is_some_and(|t| t <= self.now) {
            self.dst.handle_timeout(self.now);
        }
        self.drive();
        decoded
    }
}
