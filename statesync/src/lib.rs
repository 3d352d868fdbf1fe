//! Live TCP migration between flowshift nodes: the connection snapshot model, the
//! inter-node envelope, and the migration protocol, as a sans-IO core.
//!
//! This crate contains no sockets, threads or clock reads, and depends on neither smoltcp
//! nor the tunnel. Its state machines take the current [`Instant`] as an argument, receive
//! decoded messages and the driver's answers, and hand out messages to send, actions for
//! the driver, and their next deadline. Tests run them on virtual time.
//!
//! | module | what |
//! |---|---|
//! | [`snapshot`] | [`ConnSnapshot`]: one TCP connection's state as moved between nodes; its invariants and its versioned encoding |
//! | [`envelope`] | [`Envelope`] / [`EnvelopeRepr`]: the 10-byte versioned header of every tunnel payload (forwarded packets, migration messages, diagnostics) |
//! | [`protocol`] | [`Message`] and its codec; the [`Source`] and [`Target`] state machines |
//! | [`time`] | [`Instant`]: microseconds from a driver-chosen epoch |
//!
//! # Driving the state machines
//!
//! ```text
//!                         start(now, peer, offers) / cancel(now, m)
//!   source driver   ───── captured(now, m, snapshots, failed) ─────►┌──────────┐
//!   (engine + tunnel)     handle_message(now, peer, msg)            │  Source  │
//!                         handle_timeout(now) / peer_restarted      │          │
//!                   ◄──── poll_transmit() → (peer, Message) ────────┤          │
//!                   ◄──── poll_action()   → SourceAction ───────────┤          │
//!                   ◄──── poll_timeout()  → Option<Instant> ────────┴──────────┘
//!
//!                         handle_message(now, peer, msg)            ┌──────────┐
//!   target driver   ───── admitted(now, peer, m, verdicts) ────────►│  Target  │
//!                         restored(now, peer, m, results)           │          │
//!                         handle_timeout(now) / peer_restarted      │          │
//!                   ◄──── poll_transmit() / poll_action() / poll_timeout() ─────┘
//! ```
//!
//! After any `handle_*`, `start`, `cancel`, `captured`, `admitted`, `restored` or
//! `peer_restarted` call the driver SHOULD drain `poll_transmit` (each message goes, inside
//! a [`Migration`](EnvelopeKind::Migration) envelope, on that peer's reliable tunnel
//! channel), then drain `poll_action`, and then arm its timer with `poll_timeout`. A node
//! usually runs one `Source` and one `Target`; it decodes each received message once and
//! routes it by [`Message::recipient`].
//!
//! # The migration, end to end
//!
//! ```text
//!  source driver        Source                                  Target          target driver
//!   start(offers) ──────►│── Offer{m, conns} ──────────────────────►│── Admit ───────────►│
//!                        │                                          │◄──── admitted() ────│ reserve room
//!   ◄── Refused ─────────│◄──────────────────── Accept{m, verdicts} ─│
//!   ◄── Capture ─────────│                                          │
//!   freeze + capture     │                                          │
//!   captured() ─────────►│── Transfer{m, snapshots, withdrawn} ×n ─►│── Restore ─────────►│
//!   ◄── Thaw (failed) ───│                                          │◄──── restored() ────│ rebuild sockets
//!   ◄── Moved / Thaw ────│◄────────────────── Commit{m, results} ×n ─│
//!   ◄── Finished ────────│                                          │
//!
//!   no Accept in 2 s:  Abort{flows} ─► target releases;   every flow Refused(timeout)
//!   no Commit in 3 s:  Abort{flows} ─► target discards;   those flows Thaw(timeout)
//!   late Accept/Commit after an abort: the same Abort again
//! ```
//!
//! **The source decides.** A flow is moved exactly when the source receives an `Ok`
//! Commit result for it; until then it stays frozen on the source, which (as the node where
//! the client's packets enter) relays nothing between the client and the target's copy.
//! When the source gives up, it thaws the flow and lists it in its Abort; the target
//! discards the copies it restored (silently, no RST). So a flow never runs on both nodes
//! and never on neither, as long as the Abort arrives — which the tunnel's reliable
//! channel ensures unless a node dies, in which case the dead node's flows are gone anyway
//! (the one leftover is a copy on the target that no packet reaches; see
//! `tests/protocol_sim.rs`). Each flow gets exactly one of
//! [`Refused`](SourceAction::Refused) (never frozen),
//! [`Moved`](SourceAction::Moved) or [`Thaw`](SourceAction::Thaw),
//! then its migration one [`Finished`](SourceAction::Finished) with a
//! [`MigrationReport`].
//!
//! Message layouts, timers and the handling of duplicates and crashes are in [`protocol`].
//!
//! # The snapshot
//!
//! [`ConnSnapshot`] is encoded `[SNAPSHOT_VERSION][postcard body]`; the field table with
//! every invariant is in [`snapshot`]. In short: the two addresses; the [`TcpState`] with
//! the FIN flags it implies; `snd_una`/`snd_nxt`/`rcv_nxt`; the client's window, window
//! scale, MSS, SACK and [`Timestamps`]; our window scale and the buffer capacities (at most
//! 16 MiB); the unacknowledged send bytes and the unread received bytes; the app's opaque
//! [`AppState`]; and the [`Ingress`] (where the client's packets enter). It holds stream
//! data and sequence numbers: it travels only over the encrypted tunnel.
//!
//! # Hostile input
//! Nothing a peer sends panics or allocates beyond its own length: snapshots, messages and
//! envelopes are decoded from checked views with explicit bounds (byte strings and lists are
//! refused from their length prefixes), every decoded value is validated, and the state
//! machines bound what one peer can make them keep. The `snapshot` and `message` fuzz
//! targets under `fuzz/` and the seeded tests feed them random and mutated input.

#![forbid(unsafe_code)]

mod codec;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod snapshot;
pub mod time;

pub use envelope::{Envelope, EnvelopeError, EnvelopeKind, EnvelopeRepr};
pub use protocol::{
    AbortReason, Config, ConnOffer, FlowOutcome, Message, MessageError, MigrationId,
    MigrationReport, RefuseReason, Source, SourceAction, StartError, Target, TargetAction, Verdict,
};
pub use snapshot::{
    AppState, ConnSnapshot, Ingress, InvalidSnapshot, SNAPSHOT_VERSION, SnapshotError, TcpState,
    Timestamps,
};
pub use time::Instant;
