//! The migration protocol: messages, their codec, and the two sans-IO state machines
//! ([`Source`] and [`Target`]) that exchange them.
//!
//! # Messages
//! Every message travels on the tunnel's reliable channel inside a
//! [`Migration`](crate::envelope::EnvelopeKind::Migration) envelope, encoded as
//! `[PROTOCOL_VERSION][postcard Message]`. [`Message::decode`] rejects other versions,
//! trailing bytes, malformed bodies, invalid snapshots and lists of more than
//! [`MAX_BATCH`] entries (refused from their length prefix, before any entry is decoded).
//!
//! | # | message | direction | fields | meaning |
//! |---|---|---|---|---|
//! | 0 | [`Abort`] | either way | `migration, from, reason, flows` | the sender gives up on the migration; from the source, `flows` lists every offered flow that stays on the source (the target discards its copies of those) |
//! | 1 | [`Accept`] | target → source | `migration, verdicts: [(flow, Verdict)]` | the target's answer to an Offer, one verdict per offered flow |
//! | 2 | [`Commit`] | target → source | `migration, results: [(flow, Result<target flow, RefuseReason>)]` | restore results, for the flows of one or more Transfers |
//! | 3 | [`Offer`] | source → target | `migration, conns: [ConnOffer]` | flows the source would like to move, without their state |
//! | 4 | [`Transfer`] | source → target | `migration, snapshots: [(flow, ConnSnapshot)], withdrawn: [(flow, RefuseReason)]` | the frozen state of accepted flows (several messages of at most `max_message_bytes`), and the accepted flows that will not come |
//! | 5 | [`Rehome`] | source → ingress node | `migration, owner_key, flows: [(ingress flow, owner flow)]` | flows whose packets enter at a third node moved on to the target: that node sends them there from now on (not part of the state machines: the driver sends it once a flow is moved) |
//!
//! `#` is the postcard variant index. Integers are varints, a [`MigrationId`] is a `u64`,
//! [`Side`] is 0 (source) or 1 (target), [`RefuseReason`] and [`AbortReason`] are one-byte
//! codes (unknown codes decode as `Unknown(code)` so that old nodes read new reasons),
//! [`Verdict`] is 0 (accepted) or 1 then a reason, `Result` is 0 then the value or 1 then
//! the reason, and a snapshot is its own versioned encoding
//! ([`snapshot`](crate::snapshot)). A new message or a change of meaning bumps
//! [`PROTOCOL_VERSION`].
//!
//! # The exchange
//! ```text
//!  source driver        Source                                  Target          target driver
//!   start(offers) ──────►│── Offer{m, conns} ──────────────────────►│── Admit ───────────►│
//!                        │                                          │◄──── admitted() ────│ (reserve)
//!   ◄── Refused (each ───│◄──────────────────── Accept{m, verdicts} ─│
//!       refused flow)    │                                          │
//!   ◄── Capture ─────────│                                          │
//!   (freeze, capture)    │                                          │
//!   captured() ─────────►│── Transfer{m, snapshots, withdrawn} ×n ─►│── Restore ─────────►│
//!   ◄── Thaw (withdrawn)─│                                          │◄──── restored() ────│
//!   ◄── Moved / Thaw ────│◄────────────────── Commit{m, results} ×n ─│
//!   ◄── Finished ────────│                                          │
//! ```
//! The source decides: a flow is moved exactly when the source has received its `Commit`
//! result `Ok`. Until then the source keeps the frozen flow and, as the node where the
//! client's packets enter, relays nothing of the target's copy; a source that gives up
//! (timeout, cancel, the target restarted) thaws the flow and sends an `Abort` that lists
//! every flow it kept, and the target discards its copies of those (without RST). A
//! `Commit` or `Accept` that reaches the source after it gave up is answered with the same
//! `Abort` again, so a target always learns which of its copies to drop.
//!
//! # Timers (see [`Config`])
//! * source, `accept_timeout` (2 s) from the Offer: no Accept → Abort, every flow Refused.
//! * source, `commit_timeout` (3 s, plus `commit_timeout_per_mib`, 1 s per MiB of Transfer
//!   messages) from the Transfers: flows without a Commit result → Abort, those flows Thaw.
//! * target, `transfer_timeout` (5 s, plus `commit_timeout_per_mib` per MiB of the buffer
//!   capacities offered for the flows still reserved, at most 60 s more) from the Accept and
//!   again from each Transfer: accepted flows without a snapshot → Release.
//! * both, `linger` (60 s): a finished migration is kept to answer late duplicates, then
//!   forgotten.
//!
//! # Duplicates, reordering, crashes
//! The tunnel's reliable channel delivers each message once and in order; the state
//! machines nevertheless tolerate duplicated and reordered messages (a duplicate Offer gets
//! the same Accept, a duplicate Transfer the same Commit results without a second Restore,
//! a duplicate Accept or Commit is ignored) and peers that crash and lose their state (the
//! timers above). [`Source::peer_restarted`] and [`Target::peer_restarted`] end a restarted
//! peer's migrations at once.
//!
//! A migration id is chosen by the source and names the migration together with the
//! source's peer handle. A source that restarts MUST NOT reuse ids a target may still
//! remember (for `linger`): [`Source::new`] takes the first id, which the daemon derives
//! from the clock.

mod source;
mod target;

use core::fmt;
use std::net::SocketAddrV4;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::snapshot::{ConnSnapshot, MAX_BUFFER, MAX_WINDOW_SCALE, TcpState};

pub use source::{FlowOutcome, MigrationReport, Source, SourceAction, StartError};
pub use target::{Target, TargetAction};

/// Version of the message encoding (the first byte of every message).
pub const PROTOCOL_VERSION: u8 = 2;
/// Most entries in any list of one message (and so most flows in one migration).
pub const MAX_BATCH: usize = 4096;
/// Smallest `max_message_bytes` honoured (smaller values are raised to it).
pub const MIN_MESSAGE_BYTES: usize = 16 * 1024;

/// Identifies a migration, together with the source node (ids are the source's).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MigrationId(pub u64);

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The two roles in a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The node the flows leave (wire value 0).
    Source,
    /// The node the flows move to (wire value 1).
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Tunables of both state machines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Source: how long to wait for the Accept after sending the Offer.
    pub accept_timeout: Duration,
    /// Source: how long to wait for every Commit result after queueing the Transfers…
    pub commit_timeout: Duration,
    /// …plus this much per MiB of Transfer messages (a large batch over a lossy tunnel).
    pub commit_timeout_per_mib: Duration,
    /// Target: how long an accepted flow stays reserved without its snapshot, counted from
    /// the Accept and again from each Transfer of the migration.
    pub transfer_timeout: Duration,
    /// Both: how long a finished migration is remembered to answer late duplicates.
    pub linger: Duration,
    /// Source: largest encoded Transfer message (at least [`MIN_MESSAGE_BYTES`]); a flow
    /// whose snapshot alone does not fit stays ([`RefuseReason::TooLarge`]). Keep it at or
    /// below the tunnel's `max_message_size`.
    pub max_message_bytes: usize,
    /// Target: most unfinished migrations per source peer; further Offers are answered
    /// with `Abort` ([`AbortReason::Refused`]).
    pub max_migrations_per_peer: usize,
    /// Target: most finished migrations remembered per source peer (the oldest are
    /// forgotten first, even before `linger`).
    pub max_finished_per_peer: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            accept_timeout: Duration::from_secs(2),
            commit_timeout: Duration::from_secs(3),
            commit_timeout_per_mib: Duration::from_secs(1),
            transfer_timeout: Duration::from_secs(5),
            linger: Duration::from_secs(60),
            max_message_bytes: 4 << 20,
            max_migrations_per_peer: 16,
            max_finished_per_peer: 256,
        }
    }
}

/// Why a flow does not move (refused at offer time, or failed later).
///
/// Encoded as the one-byte code given on each variant; unknown codes decode as
/// [`Unknown`](Self::Unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
#[non_exhaustive]
pub enum RefuseReason {
    /// The migration was aborted (12).
    Aborted,
    /// The target does not run this app version (5).
    AppVersion,
    /// The target cannot offer the buffer capacities the flow needs (2).
    BufferMismatch,
    /// The target has no room for more flows (1).
    Capacity,
    /// The source could not capture the flow (13).
    CaptureFailed,
    /// The flow is offered twice, or is already part of another migration (7).
    Duplicate,
    /// The reservation expired before the snapshot arrived (15).
    Expired,
    /// The offer or snapshot is inconsistent (8).
    Malformed,
    /// The target did not accept this flow (9).
    NotAccepted,
    /// The target could not rebuild the connection (10).
    RestoreFailed,
    /// The node is shutting down (6).
    Shutdown,
    /// No answer in time (11).
    Timeout,
    /// The snapshot alone exceeds the largest Transfer message (14).
    TooLarge,
    /// A code this version does not know.
    Unknown(u8),
    /// The target does not run this app (4).
    UnknownApp,
    /// The target cannot use the window scale the flow advertised (3).
    WindowScaleMismatch,
}

impl From<u8> for RefuseReason {
    fn from(code: u8) -> RefuseReason {
        use RefuseReason as R;
        match code {
            1 => R::Capacity,
            2 => R::BufferMismatch,
            3 => R::WindowScaleMismatch,
            4 => R::UnknownApp,
            5 => R::AppVersion,
            6 => R::Shutdown,
            7 => R::Duplicate,
            8 => R::Malformed,
            9 => R::NotAccepted,
            10 => R::RestoreFailed,
            11 => R::Timeout,
            12 => R::Aborted,
            13 => R::CaptureFailed,
            14 => R::TooLarge,
            15 => R::Expired,
            other => R::Unknown(other),
        }
    }
}

impl From<RefuseReason> for u8 {
    fn from(r: RefuseReason) -> u8 {
        use RefuseReason as R;
        match r {
            R::Capacity => 1,
            R::BufferMismatch => 2,
            R::WindowScaleMismatch => 3,
            R::UnknownApp => 4,
            R::AppVersion => 5,
            R::Shutdown => 6,
            R::Duplicate => 7,
            R::Malformed => 8,
            R::NotAccepted => 9,
            R::RestoreFailed => 10,
            R::Timeout => 11,
            R::Aborted => 12,
            R::CaptureFailed => 13,
            R::TooLarge => 14,
            R::Expired => 15,
            R::Unknown(other) => other,
        }
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RefuseReason as R;
        f.write_str(match self {
            R::Aborted => "migration aborted",
            R::AppVersion => "app version not supported",
            R::BufferMismatch => "buffer capacity mismatch",
            R::Capacity => "no capacity",
            R::CaptureFailed => "capture failed",
            R::Duplicate => "duplicate flow",
            R::Expired => "reservation expired",
            R::Malformed => "malformed offer or snapshot",
            R::NotAccepted => "not accepted",
            R::RestoreFailed => "restore failed",
            R::Shutdown => "shutting down",
            R::Timeout => "timeout",
            R::TooLarge => "snapshot too large",
            R::Unknown(code) => return write!(f, "unknown reason {code}"),
            R::UnknownApp => "unknown app",
            R::WindowScaleMismatch => "window scale mismatch",
        })
    }
}

/// Why a migration as a whole was abandoned.
///
/// Encoded as the one-byte code given on each variant; unknown codes decode as
/// [`Unknown`](Self::Unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
#[non_exhaustive]
pub enum AbortReason {
    /// The operator or the driver cancelled it (3).
    Cancelled,
    /// The peer restarted and lost the migration (4).
    PeerRestarted,
    /// A message contradicted the migration (for example a different Offer under the same
    /// id) (6).
    Protocol,
    /// The target refuses the whole migration (too many from this peer) (2).
    Refused,
    /// The node is shutting down (8).
    Shutdown,
    /// A message for a migration that already finished (7).
    Stale,
    /// The peer did not answer in time (1).
    Timeout,
    /// A code this version does not know.
    Unknown(u8),
    /// The receiver does not know the migration (5).
    UnknownMigration,
}

impl From<u8> for AbortReason {
    fn from(code: u8) -> AbortReason {
        use AbortReason as A;
        match code {
            1 => A::Timeout,
            2 => A::Refused,
            3 => A::Cancelled,
            4 => A::PeerRestarted,
            5 => A::UnknownMigration,
            6 => A::Protocol,
            7 => A::Stale,
            8 => A::Shutdown,
            other => A::Unknown(other),
        }
    }
}

impl From<AbortReason> for u8 {
    fn from(r: AbortReason) -> u8 {
        use AbortReason as A;
        match r {
            A::Timeout => 1,
            A::Refused => 2,
            A::Cancelled => 3,
            A::PeerRestarted => 4,
            A::UnknownMigration => 5,
            A::Protocol => 6,
            A::Stale => 7,
            A::Shutdown => 8,
            A::Unknown(other) => other,
        }
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use AbortReason as A;
        f.write_str(match self {
            A::Cancelled => "cancelled",
            A::PeerRestarted => "peer restarted",
            A::Protocol => "protocol violation",
            A::Refused => "refused by the target",
            A::Shutdown => "shutting down",
            A::Stale => "migration already finished",
            A::Timeout => "timeout",
            A::Unknown(code) => return write!(f, "unknown reason {code}"),
            A::UnknownMigration => "unknown migration",
        })
    }
}

/// What the source tells the target about one flow before moving it: enough to decide
/// whether to take it and to reserve room, without its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnOffer {
    /// The source's flow id (names the flow in every later message).
    pub flow: u64,
    /// The client's address.
    pub client: SocketAddrV4,
    /// The service address.
    pub service: SocketAddrV4,
    /// Which app serves the flow.
    pub app_kind: u8,
    /// The app's snapshot format version.
    pub app_version: u8,
    /// The TCP state at offer time (it may progress before capture).
    pub state: TcpState,
    /// Receive buffer capacity the flow needs, 1 ..= [`MAX_BUFFER`].
    pub rx_capacity: u32,
    /// Send buffer capacity the flow needs, 1 ..= [`MAX_BUFFER`].
    pub tx_capacity: u32,
    /// The window scale the source advertised, at most 14.
    pub our_wscale: u8,
}

impl ConnOffer {
    /// The offer describing `snap`'s flow `flow`.
    pub fn from_snapshot(flow: u64, snap: &ConnSnapshot) -> ConnOffer {
        ConnOffer {
            flow,
            client: snap.client,
            service: snap.service,
            app_kind: snap.app.kind,
            app_version: snap.app.version,
            state: snap.state,
            rx_capacity: snap.rx_capacity,
            tx_capacity: snap.tx_capacity,
            our_wscale: snap.our_wscale,
        }
    }

    /// Whether the capacities and window scale are in range.
    pub fn is_valid(&self) -> bool {
        (1..=MAX_BUFFER).contains(&self.rx_capacity)
            && (1..=MAX_BUFFER).contains(&self.tx_capacity)
            && self.our_wscale <= MAX_WINDOW_SCALE
    }

    /// Checks that `snap` is the flow this offer described, with the capacities, window
    /// scale and app the target reserved for (the TCP state may have progressed).
    pub fn check_snapshot(&self, snap: &ConnSnapshot) -> Result<(), RefuseReason> {
        if snap.client != self.client || snap.service != self.service {
            Err(RefuseReason::Malformed)
        } else if snap.rx_capacity != self.rx_capacity || snap.tx_capacity != self.tx_capacity {
            Err(RefuseReason::BufferMismatch)
        } else if snap.our_wscale != self.our_wscale {
            Err(RefuseReason::WindowScaleMismatch)
        } else if snap.app.kind != self.app_kind {
            Err(RefuseReason::UnknownApp)
        } else if snap.app.version != self.app_version {
            Err(RefuseReason::AppVersion)
        } else {
            Ok(())
        }
    }
}

/// The target's answer for one offered flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// Room is reserved; send the snapshot (wire value 0).
    Accepted,
    /// Not taken (wire value 1, then the reason).
    Refused(RefuseReason),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accepted => f.write_str("accepted"),
            Verdict::Refused(r) => write!(f, "refused: {r}"),
        }
    }
}

/// Source → target: abandon the migration (also target → source, see [`Abort::from`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// The migration.
    pub migration: MigrationId,
    /// Who gives up: the receiver is the other side.
    pub from: Side,
    /// Why.
    pub reason: AbortReason,
    /// From the source: every offered flow that stays on the source (the target MUST
    /// discard its copies of these, and release their reservations); flows not listed
    /// whose Commit said `Ok` have moved. From the target: empty (a target only aborts
    /// migrations of which it holds nothing, and the source then keeps every flow that
    /// has not moved yet).
    #[serde(deserialize_with = "codec::batch")]
    pub flows: Vec<u64>,
}

/// Target → source: one verdict per offered flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    /// The migration.
    pub migration: MigrationId,
    /// `(source flow, verdict)`, in offer order.
    #[serde(deserialize_with = "codec::batch")]
    pub verdicts: Vec<(u64, Verdict)>,
}

/// Target → source: restore results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The migration.
    pub migration: MigrationId,
    /// `(source flow, Ok(target flow) | Err(reason))`.
    #[serde(deserialize_with = "codec::batch")]
    pub results: Vec<(u64, Result<u64, RefuseReason>)>,
}

/// Source → target: flows the source would like to move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The migration (chosen by the source).
    pub migration: MigrationId,
    /// The flows, at most [`MAX_BATCH`], each flow id once.
    #[serde(deserialize_with = "codec::batch")]
    pub conns: Vec<ConnOffer>,
}

/// Source → target: captured state of accepted flows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The migration.
    pub migration: MigrationId,
    /// `(source flow, snapshot)`.
    #[serde(deserialize_with = "codec::batch")]
    pub snapshots: Vec<(u64, ConnSnapshot)>,
    /// Accepted flows that will not come (their capture failed): release them.
    #[serde(deserialize_with = "codec::batch")]
    pub withdrawn: Vec<(u64, RefuseReason)>,
}

/// Source → the node where the moved flows' packets enter, when that node is neither the
/// source nor the target: the flows live on the node with `owner_key` now. Sent when the
/// source moved them (after their `Commit`); the receiver checks that the sender is the
/// flows' current owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rehome {
    /// The migration that moved them.
    pub migration: MigrationId,
    /// The tunnel public key of the node the flows live on now.
    pub owner_key: [u8; 32],
    /// `(flow id at the receiving node, flow id at the new owner)`.
    #[serde(deserialize_with = "codec::batch")]
    pub flows: Vec<(u64, u64)>,
}

/// Which part of a node handles a [`Message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipient {
    /// The [`Source`] machine.
    Source,
    /// The [`Target`] machine.
    Target,
    /// The node where the flows' packets enter (a [`Rehome`]).
    Ingress,
}

/// A migration protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// See [`Abort`] (variant 0).
    Abort(Abort),
    /// See [`Accept`] (variant 1).
    Accept(Accept),
    /// See [`Commit`] (variant 2).
    Commit(Commit),
    /// See [`Offer`] (variant 3).
    Offer(Offer),
    /// See [`Transfer`] (variant 4).
    Transfer(Transfer),
    /// See [`Rehome`] (variant 5).
    Rehome(Rehome),
}

/// Why bytes did not decode as a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// No bytes at all.
    #[error("empty message")]
    Empty,
    /// Not a valid encoding: truncated, an unknown message or enum variant, a list of more
    /// than [`MAX_BATCH`] entries, an invalid snapshot, …
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    /// Bytes follow the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A version this crate does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
}

impl Message {
    /// The migration the message belongs to.
    pub fn migration(&self) -> MigrationId {
        match self {
            Message::Abort(m) => m.migration,
            Message::Accept(m) => m.migration,
            Message::Commit(m) => m.migration,
            Message::Offer(m) => m.migration,
            Message::Transfer(m) => m.migration,
            Message::Rehome(m) => m.migration,
        }
    }

    /// Who handles it: the [`Target`] machine for Offer, Transfer and the source's Abort;
    /// the [`Source`] machine for Accept, Commit and the target's Abort; the node's flows
    /// for a Rehome.
    pub fn recipient(&self) -> Recipient {
        match self {
            Message::Offer(_) | Message::Transfer(_) => Recipient::Target,
            Message::Accept(_) | Message::Commit(_) => Recipient::Source,
            Message::Abort(a) => match a.from {
                Side::Source => Recipient::Target,
                Side::Target => Recipient::Source,
            },
            Message::Rehome(_) => Recipient::Ingress,
        }
    }

    /// Longest list in the message (at most [`MAX_BATCH`] for a valid message).
    pub fn batch_len(&self) -> usize {
        match self {
            Message::Abort(m) => m.flows.len(),
            Message::Accept(m) => m.verdicts.len(),
            Message::Commit(m) => m.results.len(),
            Message::Offer(m) => m.conns.len(),
            Message::Transfer(m) => m.snapshots.len().max(m.withdrawn.len()),
            Message::Rehome(m) => m.flows.len(),
        }
    }

    /// Appends `[PROTOCOL_VERSION][postcard message]` to `out`.
    ///
    /// Lists SHOULD hold at most [`MAX_BATCH`] entries and snapshots SHOULD be valid
    /// (debug builds assert both): receivers refuse such a message whole.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.batch_len() <= MAX_BATCH, "oversize batch");
        debug_assert!(
            match self {
                Message::Transfer(t) => t.snapshots.iter().all(|(_, s)| s.validate().is_ok()),
                _ => true,
            },
            "invalid snapshot in a Transfer"
        );
        out.push(PROTOCOL_VERSION);
        codec::append(self, out);
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Exact length of the encoding (computed without encoding).
    pub fn encoded_len(&self) -> usize {
        1 + codec::encoded_size(self)
    }

    /// Decodes one message that fills `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Message, MessageError> {
        let (&version, body) = bytes.split_first().ok_or(MessageError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(MessageError::Version(version));
        }
        let (msg, rest) =
            postcard::take_from_bytes::<Message>(body).map_err(MessageError::Malformed)?;
        if !rest.is_empty() {
            return Err(MessageError::TrailingBytes(rest.len()));
        }
        Ok(msg)
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Abort(m) => write!(
                f,
                "Abort(migration {}, from {}, {}, {} flows kept)",
                m.migration,
                m.from,
                m.reason,
                m.flows.len()
            ),
            Message::Accept(m) => {
                let accepted = m
                    .verdicts
                    .iter()
                    .filter(|(_, v)| *v == Verdict::Accepted)
                    .count();
                write!(
                    f,
                    "Accept(migration {}, {accepted} of {} accepted)",
                    m.migration,
                    m.verdicts.len()
                )
            }
            Message::Commit(m) => {
                let ok = m.results.iter().filter(|(_, r)| r.is_ok()).count();
                write!(
                    f,
                    "Commit(migration {}, {ok} of {} restored)",
                    m.migration,
                    m.results.len()
                )
            }
            Message::Offer(m) => {
                write!(
                    f,
                    "Offer(migration {}, {} flows)",
                    m.migration,
                    m.conns.len()
                )
            }
            Message::Transfer(m) => write!(
                f,
                "Transfer(migration {}, {} snapshots, {} withdrawn)",
                m.migration,
                m.snapshots.len(),
                m.withdrawn.len()
            ),
            Message::Rehome(m) => write!(
                f,
                "Rehome(migration {}, {} flows)",
                m.migration,
                m.flows.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
