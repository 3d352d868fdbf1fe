//! The state of one TCP connection, as moved between nodes.
//!
//! A [`ConnSnapshot`] is everything a target node needs to rebuild a connection that a
//! source node has frozen: the two addresses, the TCP state and sequence numbers, the
//! options negotiated in the handshake, the bytes still in flight either way, the app's
//! own snapshot, and where the client's packets enter the cluster. How the engine derives
//! these from smoltcp (which has no export API) and rebuilds a socket from them is in
//! `DESIGN.md` ("Moving an established connection"); this module only defines the model,
//! its invariants and its encoding.
//!
//! # Security
//! A snapshot holds the connection's unacknowledged payload, its unread received bytes and
//! its sequence numbers: whoever holds one can read the stream and inject into it. It MUST
//! only travel over the authenticated, encrypted tunnel. Its `Debug` output shows lengths,
//! never the bytes.
//!
//! # Encoding
//! `[SNAPSHOT_VERSION][postcard body]`, with the body's fields in this order (postcard:
//! integers of 16 bits and wider are LEB128 varints, `u8` and `bool` are one byte, an
//! `Option` is a 0/1 byte then the value, a byte string is a varint length then the bytes,
//! no field names, no padding):
//!
//! | # | field | encoding | invariant checked by [`ConnSnapshot::validate`] |
//! |---|---|---|---|
//! | — | version | `u8` = [`SNAPSHOT_VERSION`] (2); version 1 (fields 1–20) is still read | other versions: [`SnapshotError::Version`] |
//! | 1 | `client` | 4 address bytes, port varint | |
//! | 2 | `service` | 4 address bytes, port varint | |
//! | 3 | `state` | `u8`: [`TcpState`] code (1 Established, 2 CloseWait, 3 FinWait1, 4 Closing, 5 LastAck) | FIN flags agree with the state (table below) |
//! | 4 | `snd_una` | varint `u32` | |
//! | 5 | `snd_nxt` | varint `u32` | `snd_nxt - snd_una` (mod 2^32) ≤ `send_bytes.len() + our_fin` |
//! | 6 | `rcv_nxt` | varint `u32` | |
//! | 7 | `client_fin` | `bool` | |
//! | 8 | `our_fin` | `bool` | |
//! | 9 | `client_window` | varint `u16` | |
//! | 10 | `client_wscale` | `Option<u8>` | ≤ 14 |
//! | 11 | `our_wscale` | `u8` | ≤ 14 |
//! | 12 | `rx_capacity` | varint `u32` | 1 ..= [`MAX_BUFFER`] |
//! | 13 | `tx_capacity` | varint `u32` | 1 ..= [`MAX_BUFFER`] |
//! | 14 | `client_mss` | varint `u16` | ≥ 64 |
//! | 15 | `sack_permitted` | `bool` | |
//! | 16 | `timestamps` | `Option<(ts_recent varint u32, our_tsval varint u32)>` | |
//! | 17 | `send_bytes` | byte string | length ≤ `tx_capacity` |
//! | 18 | `unread` | byte string | length ≤ `rx_capacity` |
//! | 19 | `app` | `kind u8, version u8`, byte string, `fin_delivered` bool | bytes ≤ [`MAX_APP_STATE`]; `fin_delivered` needs `client_fin` |
//! | 20 | `ingress` | 32 key bytes, `flow_id` varint `u64` | |
//! | 21 | `srtt_us` | `Option<varint u32>`: the source's smoothed round-trip time to the client, µs (version 2; `None` in version 1) | ≤ [`MAX_SRTT_US`] |
//!
//! | state | `client_fin` | `our_fin` |
//! |---|---|---|
//! | Established | no | no |
//! | CloseWait | yes | no |
//! | FinWait1 | no | yes |
//! | Closing | yes | yes |
//! | LastAck | yes | yes |
//!
//! [`ConnSnapshot::decode`] rejects other versions, malformed bodies, trailing bytes and
//! invariant violations, each with its own [`SnapshotError`]; byte strings longer than
//! their bound are refused from their length prefix, before anything is copied. A new
//! field or a change of meaning bumps [`SNAPSHOT_VERSION`]. A node reads its own version and
//! the one before (a version-1 snapshot has no round-trip time), and writes its own: in a
//! rolling upgrade, upgrade the targets of moves first (an older target refuses the move
//! with [`SnapshotError::Version`] and the connection stays where it is).
//!
//! # Fuzzing
//! `fuzz/fuzz_targets/snapshot.rs` feeds arbitrary bytes to [`ConnSnapshot::decode`] and
//! checks that whatever decodes re-encodes to an equal snapshot; the unit tests run the same
//! harness over 100,000 seeded random and mutated encodings.

use core::fmt;
use std::net::SocketAddrV4;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

use crate::codec::{self, BoundedBytes, Bytes};

/// Version of the snapshot encoding (its first byte).
pub const SNAPSHOT_VERSION: u8 = 2;
/// The previous version, still read: fields 1–20, no `srtt_us`.
pub const SNAPSHOT_VERSION_1: u8 = 1;
/// Largest round-trip time a snapshot may carry (60 s, in µs).
pub const MAX_SRTT_US: u32 = 60_000_000;
/// Largest socket buffer capacity a snapshot may carry (16 MiB).
pub const MAX_BUFFER: u32 = 16 << 20;
/// Largest opaque app snapshot (4 MiB).
pub const MAX_APP_STATE: usize = 4 << 20;
/// Largest TCP window scale shift (RFC 7323).
pub const MAX_WINDOW_SCALE: u8 = 14;
/// Smallest plausible MSS.
pub const MIN_MSS: u16 = 64;
/// The MSS a client without the MSS option gets (RFC 9293).
pub const DEFAULT_MSS: u16 = 536;

/// Fields of the body after the version byte.
const BODY_FIELDS: usize = 21;
const MAX_BUFFER_LEN: usize = MAX_BUFFER as usize;

/// The TCP states in which a connection can move.
///
/// Each state fixes the two FIN flags of a [`ConnSnapshot`] (see the module table).
/// Encoded as the `u8` code given on each variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum TcpState {
    /// The client closed its half; we may still send (code 2).
    CloseWait,
    /// Both sides closed at once; our FIN is not yet acknowledged (code 4).
    Closing,
    /// Both halves open (code 1).
    Established,
    /// We closed our half; our FIN is not yet acknowledged (code 3).
    FinWait1,
    /// The client closed, then we did; our FIN is not yet acknowledged (code 5).
    LastAck,
}

impl TcpState {
    /// The wire code.
    pub const fn code(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::CloseWait => 2,
            TcpState::FinWait1 => 3,
            TcpState::Closing => 4,
            TcpState::LastAck => 5,
        }
    }

    /// The state with wire code `code`, if any.
    pub const fn from_code(code: u8) -> Option<TcpState> {
        Some(match code {
            1 => TcpState::Established,
            2 => TcpState::CloseWait,
            3 => TcpState::FinWait1,
            4 => TcpState::Closing,
            5 => TcpState::LastAck,
            _ => return None,
        })
    }

    /// The FIN flags this state implies: (`client_fin`, `our_fin`).
    pub const fn fin_flags(self) -> (bool, bool) {
        match self {
            TcpState::Established => (false, false),
            TcpState::CloseWait => (true, false),
            TcpState::FinWait1 => (false, true),
            TcpState::Closing | TcpState::LastAck => (true, true),
        }
    }
}

impl From<TcpState> for u8 {
    fn from(s: TcpState) -> u8 {
        s.code()
    }
}

impl TryFrom<u8> for TcpState {
    type Error = UnknownTcpState;

    fn try_from(code: u8) -> Result<TcpState, UnknownTcpState> {
        TcpState::from_code(code).ok_or(UnknownTcpState(code))
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcpState::CloseWait => "CLOSE-WAIT",
            TcpState::Closing => "CLOSING",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait1 => "FIN-WAIT-1",
            TcpState::LastAck => "LAST-ACK",
        })
    }
}

/// A [`TcpState`] code this version does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown TCP state code {0}")]
pub struct UnknownTcpState(pub u8);

/// TCP timestamp option state (RFC 7323), present when the client's SYN carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timestamps {
    /// The client's last TSval (what our next TSecr echoes).
    pub ts_recent: u32,
    /// Our last TSval sent: the restored side never goes below it (the client's PAWS check
    /// drops segments with older ones).
    pub our_tsval: u32,
}

/// The app's own snapshot, opaque to this crate.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppState {
    /// Which app (the engine's app registry assigns kinds).
    pub kind: u8,
    /// Version of that app's snapshot format.
    pub version: u8,
    /// The app's snapshot, at most [`MAX_APP_STATE`] bytes.
    #[serde(with = "codec::app_bytes")]
    pub bytes: Vec<u8>,
    /// The app was told of the client's FIN (it must not be told twice); requires the
    /// snapshot's `client_fin`.
    pub fin_delivered: bool,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("bytes", &format_args!("{} bytes", self.bytes.len()))
            .field("fin_delivered", &self.fin_delivered)
            .finish()
    }
}

/// Where the client's packets enter the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ingress {
    /// Tunnel public key of the node where the client's packets enter.
    pub node_key: [u8; 32],
    /// The flow's id on that node.
    pub flow_id: u64,
}

/// The state of one TCP connection, as moved from a source node to a target node.
///
/// Fields are public so that the engine can build and read snapshots; a snapshot is only
/// meaningful when [`validate`](Self::validate) passes, which [`decode`](Self::decode)
/// guarantees for received ones.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnSnapshot {
    /// The client's address.
    pub client: SocketAddrV4,
    /// The service address the client connected to.
    pub service: SocketAddrV4,
    /// The TCP state; it fixes `client_fin` and `our_fin` (module table).
    pub state: TcpState,
    /// Wire sequence number of `send_bytes[0]`, the oldest unacknowledged byte.
    pub snd_una: u32,
    /// What the source had sent up to: `snd_una ≤ snd_nxt ≤ snd_una + send_bytes.len() +
    /// our_fin` in sequence space (mod 2^32).
    pub snd_nxt: u32,
    /// Next data byte expected from the client; a received client FIN is not counted here.
    pub rcv_nxt: u32,
    /// The client's FIN was received (it occupies sequence number `rcv_nxt`).
    pub client_fin: bool,
    /// We closed our sending half: our FIN follows `send_bytes` and is not yet acknowledged.
    pub our_fin: bool,
    /// Raw window field of the client's last segment (unscaled).
    pub client_window: u16,
    /// The client's window scale from its SYN (`None`: no scaling); at most 14.
    pub client_wscale: Option<u8>,
    /// The window scale we advertised in our SYN-ACK; at most 14.
    pub our_wscale: u8,
    /// Receive buffer capacity at the source, 1 ..= [`MAX_BUFFER`].
    pub rx_capacity: u32,
    /// Send buffer capacity at the source, 1 ..= [`MAX_BUFFER`].
    pub tx_capacity: u32,
    /// MSS option of the client's SYN ([`DEFAULT_MSS`] if absent); at least [`MIN_MSS`].
    pub client_mss: u16,
    /// The client's SYN offered SACK.
    pub sack_permitted: bool,
    /// Timestamp state, if the connection uses timestamps.
    pub timestamps: Option<Timestamps>,
    /// Unacknowledged and unsent bytes, starting at `snd_una`; at most `tx_capacity`.
    pub send_bytes: Vec<u8>,
    /// Received bytes the app has not consumed; they end at `rcv_nxt`. At most
    /// `rx_capacity`.
    pub unread: Vec<u8>,
    /// The app's own snapshot.
    pub app: AppState,
    /// Where the client's packets enter.
    pub ingress: Ingress,
    /// The source's smoothed round-trip time to the client, in µs, if it measured one: the
    /// target starts its loss-probe timing from it instead of from nothing.
    pub srtt_us: Option<u32>,
}

/// An invariant a [`ConnSnapshot`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidSnapshot {
    /// The app snapshot is longer than [`MAX_APP_STATE`].
    #[error("app snapshot of {len} bytes exceeds {MAX_APP_STATE}")]
    AppStateTooLarge {
        /// Its length.
        len: usize,
    },
    /// `client_mss` is below [`MIN_MSS`].
    #[error("client MSS {0} below {MIN_MSS}")]
    ClientMss(u16),
    /// `client_wscale` is above [`MAX_WINDOW_SCALE`].
    #[error("client window scale {0} above {MAX_WINDOW_SCALE}")]
    ClientWindowScale(u8),
    /// `app.fin_delivered` without `client_fin`.
    #[error("the app was told of a client FIN that was not received")]
    FinDelivered,
    /// The FIN flags contradict the state.
    #[error("state {state} contradicts client_fin={client_fin} our_fin={our_fin}")]
    FinFlags {
        /// The state.
        state: TcpState,
        /// The `client_fin` flag.
        client_fin: bool,
        /// The `our_fin` flag.
        our_fin: bool,
    },
    /// `our_wscale` is above [`MAX_WINDOW_SCALE`].
    #[error("our window scale {0} above {MAX_WINDOW_SCALE}")]
    OurWindowScale(u8),
    /// `srtt_us` is above [`MAX_SRTT_US`].
    #[error("round-trip time {0} µs above {MAX_SRTT_US}")]
    Srtt(u32),
    /// `rx_capacity` is 0 or above [`MAX_BUFFER`].
    #[error("receive capacity {0} outside 1..={MAX_BUFFER}")]
    RxCapacity(u32),
    /// More send bytes than the send buffer holds.
    #[error("{len} send bytes exceed the send capacity {tx_capacity}")]
    SendBytes {
        /// `send_bytes.len()`.
        len: usize,
        /// `tx_capacity`.
        tx_capacity: u32,
    },
    /// `snd_nxt` lies outside `[snd_una, snd_una + send_bytes.len() + our_fin]`.
    #[error("snd_nxt {snd_nxt} outside snd_una {snd_una} + 0..={max_ahead}")]
    SndNxt {
        /// `snd_una`.
        snd_una: u32,
        /// `snd_nxt`.
        snd_nxt: u32,
        /// `send_bytes.len() + our_fin`.
        max_ahead: u64,
    },
    /// `tx_capacity` is 0 or above [`MAX_BUFFER`].
    #[error("send capacity {0} outside 1..={MAX_BUFFER}")]
    TxCapacity(u32),
    /// More unread bytes than the receive buffer holds.
    #[error("{len} unread bytes exceed the receive capacity {rx_capacity}")]
    Unread {
        /// `unread.len()`.
        len: usize,
        /// `rx_capacity`.
        rx_capacity: u32,
    },
}

/// Why bytes did not decode as a [`ConnSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No bytes at all.
    #[error("empty snapshot")]
    Empty,
    /// The body decoded but breaks an invariant.
    #[error("invalid snapshot: {0}")]
    Invalid(#[from] InvalidSnapshot),
    /// The body is not a valid postcard encoding of the fields (truncated, an unknown
    /// state code, a bad `bool` or `Option` byte, an over-long byte string, …).
    #[error("malformed snapshot body: {0}")]
    Malformed(postcard::Error),
    /// Bytes follow the body.
    #[error("{0} trailing bytes after the snapshot")]
    TrailingBytes(usize),
    /// A version this crate does not read.
    #[error("unsupported snapshot version {0}")]
    Version(u8),
}

impl ConnSnapshot {
    /// Checks every invariant of the module table.
    pub fn validate(&self) -> Result<(), InvalidSnapshot> {
        if self.rx_capacity == 0 || self.rx_capacity > MAX_BUFFER {
            return Err(InvalidSnapshot::RxCapacity(self.rx_capacity));
        }
        if self.tx_capacity == 0 || self.tx_capacity > MAX_BUFFER {
            return Err(InvalidSnapshot::TxCapacity(self.tx_capacity));
        }
        if self.send_bytes.len() > self.tx_capacity as usize {
            return Err(InvalidSnapshot::SendBytes {
                len: self.send_bytes.len(),
                tx_capacity: self.tx_capacity,
            });
        }
        if self.unread.len() > self.rx_capacity as usize {
            return Err(InvalidSnapshot::Unread {
                len: self.unread.len(),
                rx_capacity: self.rx_capacity,
            });
        }
        if let Some(ws) = self.client_wscale
            && ws > MAX_WINDOW_SCALE
        {
            return Err(InvalidSnapshot::ClientWindowScale(ws));
        }
        if self.our_wscale > MAX_WINDOW_SCALE {
            return Err(InvalidSnapshot::OurWindowScale(self.our_wscale));
        }
        // send_bytes.len() <= MAX_BUFFER < 2^31, so the distance in sequence space is
        // unambiguous.
        let max_ahead = self.send_bytes.len() as u64 + u64::from(self.our_fin);
        if u64::from(self.snd_nxt.wrapping_sub(self.snd_una)) > max_ahead {
            return Err(InvalidSnapshot::SndNxt {
                snd_una: self.snd_una,
                snd_nxt: self.snd_nxt,
                max_ahead,
            });
        }
        if self.client_mss < MIN_MSS {
            return Err(InvalidSnapshot::ClientMss(self.client_mss));
        }
        if self.state.fin_flags() != (self.client_fin, self.our_fin) {
            return Err(InvalidSnapshot::FinFlags {
                state: self.state,
                client_fin: self.client_fin,
                our_fin: self.our_fin,
            });
        }
        if self.app.fin_delivered && !self.client_fin {
            return Err(InvalidSnapshot::FinDelivered);
        }
        if self.app.bytes.len() > MAX_APP_STATE {
            return Err(InvalidSnapshot::AppStateTooLarge {
                len: self.app.bytes.len(),
            });
        }
        if let Some(us) = self.srtt_us
            && us > MAX_SRTT_US
        {
            return Err(InvalidSnapshot::Srtt(us));
        }
        Ok(())
    }

    /// Appends `[SNAPSHOT_VERSION][postcard body]` to `out`.
    ///
    /// The snapshot SHOULD be valid (debug builds assert it): an invalid one encodes, but
    /// no receiver decodes it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert_eq!(self.validate(), Ok(()), "encoding an invalid snapshot");
        codec::append(self, out);
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Exact length of the encoding, computed without encoding (a pass over the fixed
    /// fields; byte strings count by length), so that callers can batch snapshots by size.
    pub fn encoded_len(&self) -> usize {
        codec::encoded_size(self)
    }

    /// Decodes and validates one snapshot that fills `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<ConnSnapshot, SnapshotError> {
        match bytes.first() {
            None => return Err(SnapshotError::Empty),
            Some(&SNAPSHOT_VERSION | &SNAPSHOT_VERSION_1) => {}
            Some(&v) => return Err(SnapshotError::Version(v)),
        }
        let (Unchecked(snap), rest) =
            postcard::take_from_bytes::<Unchecked>(bytes).map_err(SnapshotError::Malformed)?;
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes(rest.len()));
        }
        snap.validate()?;
        Ok(snap)
    }
}

impl fmt::Debug for ConnSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnSnapshot")
            .field("client", &self.client)
            .field("service", &self.service)
            .field("state", &self.state)
            .field("snd_una", &self.snd_una)
            .field("snd_nxt", &self.snd_nxt)
            .field("rcv_nxt", &self.rcv_nxt)
            .field("client_fin", &self.client_fin)
            .field("our_fin", &self.our_fin)
            .field("client_window", &self.client_window)
            .field("client_wscale", &self.client_wscale)
            .field("our_wscale", &self.our_wscale)
            .field("rx_capacity", &self.rx_capacity)
            .field("tx_capacity", &self.tx_capacity)
            .field("client_mss", &self.client_mss)
            .field("sack_permitted", &self.sack_permitted)
            .field("timestamps", &self.timestamps)
            .field(
                "send_bytes",
                &format_args!("{} bytes", self.send_bytes.len()),
            )
            .field("unread", &format_args!("{} bytes", self.unread.len()))
            .field("app", &self.app)
            .field("ingress", &self.ingress)
            .field("srtt_us", &self.srtt_us)
            .finish()
    }
}

/// The versioned encoding of the module table: a tuple of the version byte and the
/// fields, so that a snapshot nested in a protocol message carries its own version.
impl Serialize for ConnSnapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(1 + BODY_FIELDS)?;
        t.serialize_element(&SNAPSHOT_VERSION)?;
        t.serialize_element(&self.client)?;
        t.serialize_element(&self.service)?;
        t.serialize_element(&self.state)?;
        t.serialize_element(&self.snd_una)?;
        t.serialize_element(&self.snd_nxt)?;
        t.serialize_element(&self.rcv_nxt)?;
        t.serialize_element(&self.client_fin)?;
        t.serialize_element(&self.our_fin)?;
        t.serialize_element(&self.client_window)?;
        t.serialize_element(&self.client_wscale)?;
        t.serialize_element(&self.our_wscale)?;
        t.serialize_element(&self.rx_capacity)?;
        t.serialize_element(&self.tx_capacity)?;
        t.serialize_element(&self.client_mss)?;
        t.serialize_element(&self.sack_permitted)?;
        t.serialize_element(&self.timestamps)?;
        t.serialize_element(&Bytes(&self.send_bytes))?;
        t.serialize_element(&Bytes(&self.unread))?;
        t.serialize_element(&self.app)?;
        t.serialize_element(&self.ingress)?;
        t.serialize_element(&self.srtt_us)?;
        t.end()
    }
}

/// Decodes the versioned encoding and validates the result: a `ConnSnapshot` obtained
/// through serde (for example inside a protocol message) always satisfies
/// [`ConnSnapshot::validate`].
impl<'de> Deserialize<'de> for ConnSnapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let snap = d.deserialize_tuple(1 + BODY_FIELDS, SnapshotVisitor)?;
        snap.validate().map_err(de::Error::custom)?;
        Ok(snap)
    }
}

/// A snapshot decoded without validation (so that `decode` can report the invariant).
struct Unchecked(ConnSnapshot);

impl<'de> Deserialize<'de> for Unchecked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_tuple(1 + BODY_FIELDS, SnapshotVisitor)
            .map(Unchecked)
    }
}

struct SnapshotVisitor;

impl<'de> Visitor<'de> for SnapshotVisitor {
    type Value = ConnSnapshot;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a version {SNAPSHOT_VERSION} connection snapshot")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ConnSnapshot, A::Error> {
        // Spelled out field by field, in the order of the module table.
        let mut index = 0usize;
        macro_rules! field {
            ($t:ty) => {{
                let v = seq
                    .next_element::<$t>()?
                    .ok_or_else(|| de::Error::invalid_length(index, &self))?;
                index += 1;
                v
            }};
        }
        let version: u8 = field!(u8);
        if version != SNAPSHOT_VERSION && version != SNAPSHOT_VERSION_1 {
            return Err(de::Error::custom(format_args!(
                "unsupported snapshot version {version}"
            )));
        }
        let snap = ConnSnapshot {
            client: field!(SocketAddrV4),
            service: field!(SocketAddrV4),
            state: field!(TcpState),
            snd_una: field!(u32),
            snd_nxt: field!(u32),
            rcv_nxt: field!(u32),
            client_fin: field!(bool),
            our_fin: field!(bool),
            client_window: field!(u16),
            client_wscale: field!(Option<u8>),
            our_wscale: field!(u8),
            rx_capacity: field!(u32),
            tx_capacity: field!(u32),
            client_mss: field!(u16),
            sack_permitted: field!(bool),
            timestamps: field!(Option<Timestamps>),
            send_bytes: field!(BoundedBytes<MAX_BUFFER_LEN>).0,
            unread: field!(BoundedBytes<MAX_BUFFER_LEN>).0,
            app: field!(AppState),
            ingress: field!(Ingress),
            srtt_us: None,
        };
        let snap = if version == SNAPSHOT_VERSION_1 {
            snap
        } else {
            ConnSnapshot {
                srtt_us: field!(Option<u32>),
                ..snap
            }
        };
        debug_assert_eq!(
            index,
            1 + BODY_FIELDS - usize::from(version == SNAPSHOT_VERSION_1)
        );
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    fn sample() -> ConnSnapshot {
        ConnSnapshot {
            client: "198.18.1.2:40000".parse().unwrap(),
            service: "198.19.255.1:80".parse().unwrap(),
            state: TcpState::Established,
            snd_una: 1000,
            snd_nxt: 1002,
            rcv_nxt: 0xffff_fff0,
            client_fin: false,
            our_fin: false,
            client_window: 512,
            client_wscale: Some(7),
            our_wscale: 2,
            rx_capacity: 65536,
            tx_capacity: 65536,
            client_mss: 1460,
            sack_permitted: true,
            timestamps: Some(Timestamps {
                ts_recent: 5,
                our_tsval: 6,
            }),
            send_bytes: b"hey".to_vec(),
            unread: b"yo".to_vec(),
            app: AppState {
                kind: 1,
                version: 2,
                bytes: vec![0xaa],
                fin_delivered: false,
            },
            ingress: Ingress {
                node_key: [0x11; 32],
                flow_id: 300,
            },
            srtt_us: Some(250),
        }
    }

    /// The encoding of `sample()`, byte by byte (the module table).
    static SNAPSHOT_BYTES: &[u8] = &[
        0x02, // version
        198, 18, 1, 2, 0xc0, 0xb8, 0x02, // client 198.18.1.2:40000
        198, 19, 255, 1, 0x50, // service 198.19.255.1:80
        0x01, // Established
        0xe8, 0x07, // snd_una 1000
        0xea, 0x07, // snd_nxt 1002
        0xf0, 0xff, 0xff, 0xff, 0x0f, // rcv_nxt 0xfffffff0
        0x00, 0x00, // client_fin, our_fin
        0x80, 0x04, // client_window 512
        0x01, 0x07, // client_wscale Some(7)
        0x02, // our_wscale
        0x80, 0x80, 0x04, // rx_capacity 65536
        0x80, 0x80, 0x04, // tx_capacity 65536
        0xb4, 0x0b, // client_mss 1460
        0x01, // sack_permitted
        0x01, 0x05, 0x06, // timestamps Some(5, 6)
        0x03, b'h', b'e', b'y', // send_bytes
        0x02, b'y', b'o', // unread
        0x01, 0x02, 0x01, 0xaa, // app kind 1 version 2, one byte
        0x00, // app fin_delivered
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, // node key
        0xac, 0x02, // flow_id 300
        0x01, 0xfa, 0x01, // srtt_us Some(250)
    ];

    /// `sample()` in version 1: the same fields 1–20, no round-trip time.
    fn version_1_bytes() -> Vec<u8> {
        let mut b = SNAPSHOT_BYTES[..SNAPSHOT_BYTES.len() - 3].to_vec();
        b[0] = SNAPSHOT_VERSION_1;
        b
    }

    #[test]
    fn reads_version_1_without_a_round_trip_time() {
        let v1 = version_1_bytes();
        let snap = ConnSnapshot::decode(&v1).expect("version 1 is read");
        assert_eq!(
            snap,
            ConnSnapshot {
                srtt_us: None,
                ..sample()
            }
        );
        // And written as the current version, with the field.
        assert_eq!(snap.to_bytes()[0], SNAPSHOT_VERSION);
        // A version-1 body followed by a version-2 field is trailing garbage there.
        let mut b = v1;
        b.extend_from_slice(&[0x01, 0xfa, 0x01]);
        assert_eq!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::TrailingBytes(3))
        );
    }

    #[test]
    fn refuses_an_absurd_round_trip_time() {
        let snap = ConnSnapshot {
            srtt_us: Some(MAX_SRTT_US + 1),
            ..sample()
        };
        assert_eq!(snap.validate(), Err(InvalidSnapshot::Srtt(MAX_SRTT_US + 1)));
        let mut bytes = Vec::new();
        crate::codec::append(&snap, &mut bytes);
        assert_eq!(
            ConnSnapshot::decode(&bytes),
            Err(SnapshotError::Invalid(InvalidSnapshot::Srtt(
                MAX_SRTT_US + 1
            )))
        );
    }

    #[test]
    fn emit_matches_fixture() {
        let s = sample();
        assert_eq!(s.to_bytes(), SNAPSHOT_BYTES);
        assert_eq!(s.encoded_len(), SNAPSHOT_BYTES.len());
        let mut out = vec![0xee];
        s.encode(&mut out);
        assert_eq!(&out[1..], SNAPSHOT_BYTES);
    }

    #[test]
    fn parse_fixture() {
        assert_eq!(ConnSnapshot::decode(SNAPSHOT_BYTES), Ok(sample()));
    }

    #[test]
    fn rejects_framing() {
        assert_eq!(ConnSnapshot::decode(&[]), Err(SnapshotError::Empty));
        let mut b = SNAPSHOT_BYTES.to_vec();
        b[0] = 3;
        assert_eq!(ConnSnapshot::decode(&b), Err(SnapshotError::Version(3)));
        let mut b = SNAPSHOT_BYTES.to_vec();
        b.extend_from_slice(&[0, 0]);
        assert_eq!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::TrailingBytes(2))
        );
        for cut in 1..SNAPSHOT_BYTES.len() {
            assert!(
                matches!(
                    ConnSnapshot::decode(&SNAPSHOT_BYTES[..cut]),
                    Err(SnapshotError::Malformed(_))
                ),
                "prefix of {cut} bytes"
            );
        }
        // State code 6, a bool byte of 2, an Option byte of 2.
        for (at, v) in [(13, 6u8), (13, 0), (24, 2), (27, 2)] {
            let mut b = SNAPSHOT_BYTES.to_vec();
            b[at] = v;
            assert!(
                matches!(ConnSnapshot::decode(&b), Err(SnapshotError::Malformed(_))),
                "byte {at} = {v}"
            );
        }
    }

    #[test]
    fn over_long_byte_strings_are_refused_before_copying() {
        // The send_bytes length prefix claims MAX_BUFFER + 1 bytes.
        let mut b = SNAPSHOT_BYTES[..39].to_vec();
        assert_eq!(b[38], 0x01); // sack_permitted; timestamps follow
        b.extend_from_slice(&[0x00]); // timestamps None
        b.extend_from_slice(&[0x81, 0x80, 0x80, 0x08]); // 2^24 + 1
        b.extend(std::iter::repeat_n(0u8, MAX_BUFFER as usize + 1));
        assert!(matches!(
            ConnSnapshot::decode(&b),
            Err(SnapshotError::Malformed(_))
        ));
    }

    fn invalid(f: impl FnOnce(&mut ConnSnapshot)) -> SnapshotError {
        let mut s = sample();
        f(&mut s);
        let mut b = Vec::new();
        codec::append(&s, &mut b); // no debug assertion
        ConnSnapshot::decode(&b).unwrap_err()
    }

    #[test]
    fn rejects_each_invariant() {
        use InvalidSnapshot as I;
        let cases: Vec<(SnapshotError, InvalidSnapshot)> = vec![
            (invalid(|s| s.rx_capacity = 0), I::RxCapacity(0)),
            (
                invalid(|s| s.rx_capacity = MAX_BUFFER + 1),
                I::RxCapacity(MAX_BUFFER + 1),
            ),
            (invalid(|s| s.tx_capacity = 0), I::TxCapacity(0)),
            (
                invalid(|s| s.tx_capacity = MAX_BUFFER + 1),
                I::TxCapacity(MAX_BUFFER + 1),
            ),
            (
                invalid(|s| s.tx_capacity = 2),
                I::SendBytes {
                    len: 3,
                    tx_capacity: 2,
                },
            ),
            (
                invalid(|s| s.rx_capacity = 1),
                I::Unread {
                    len: 2,
                    rx_capacity: 1,
                },
            ),
            (
                invalid(|s| s.client_wscale = Some(15)),
                I::ClientWindowScale(15),
            ),
            (invalid(|s| s.our_wscale = 15), I::OurWindowScale(15)),
            (
                invalid(|s| s.snd_nxt = 1004),
                I::SndNxt {
                    snd_una: 1000,
                    snd_nxt: 1004,
                    max_ahead: 3,
                },
            ),
            (
                invalid(|s| s.snd_nxt = 999),
                I::SndNxt {
                    snd_una: 1000,
                    snd_nxt: 999,
                    max_ahead: 3,
                },
            ),
            (invalid(|s| s.client_mss = 63), I::ClientMss(63)),
            (invalid(|s| s.app.fin_delivered = true), I::FinDelivered),
            (
                invalid(|s| s.client_fin = true),
                I::FinFlags {
                    state: TcpState::Established,
                    client_fin: true,
                    our_fin: false,
                },
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, SnapshotError::Invalid(want));
        }
    }

    #[test]
    fn state_and_fin_flags() {
        for code in 0..=255u8 {
            let Some(state) = TcpState::from_code(code) else {
                assert!(TcpState::try_from(code).is_err());
                continue;
            };
            assert_eq!(state.code(), code);
            for cf in [false, true] {
                for of in [false, true] {
                    let mut s = sample();
                    s.state = state;
                    s.client_fin = cf;
                    s.our_fin = of;
                    let ok = match state {
                        TcpState::Established => !cf && !of,
                        TcpState::CloseWait => cf && !of,
                        TcpState::FinWait1 => !cf && of,
                        TcpState::Closing | TcpState::LastAck => cf && of,
                    };
                    assert_eq!(s.validate().is_ok(), ok, "{state} {cf} {of}");
                }
            }
        }
    }

    #[test]
    fn sequence_space_wraps() {
        let mut s = sample();
        s.state = TcpState::FinWait1;
        s.our_fin = true;
        s.snd_una = u32::MAX - 1;
        s.snd_nxt = 2; // 3 bytes and the FIN: una + 4 wraps to 2
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(ConnSnapshot::decode(&s.to_bytes()), Ok(s.clone()));
        s.snd_nxt = 3;
        assert!(s.validate().is_err());
    }

    #[test]
    fn debug_hides_bytes() {
        let d = format!("{:?}", sample());
        assert!(d.contains("send_bytes: 3 bytes"), "{d}");
        assert!(!d.contains("104")); // b'h'
    }

    /// 100,000 random and mutated encodings: decode never panics, and whatever decodes
    /// re-encodes to an equal snapshot (the fuzz target's harness).
    #[test]
    fn random_and_mutated_encodings() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
        let base = sample().to_bytes();
        let mut oks = 0;
        for i in 0..100_000u32 {
            let bytes = match i % 4 {
                // Pure noise after a correct version byte.
                0 => {
                    let len = (rng.next_u32() % 160) as usize;
                    let mut b = vec![0u8; len];
                    rng.fill_bytes(&mut b);
                    if let Some(first) = b.first_mut() {
                        *first = SNAPSHOT_VERSION;
                    }
                    b
                }
                // A few bytes of a valid encoding flipped.
                1 | 2 => {
                    let mut b = base.clone();
                    for _ in 0..=(rng.next_u32() % 3) {
                        let at = (rng.next_u32() as usize) % b.len();
                        b[at] = rng.next_u32() as u8;
                    }
                    b
                }
                // Truncated, extended or spliced.
                _ => {
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
            };
            if crate::fuzzing::snapshot(&bytes) {
                oks += 1;
            }
        }
        // Enough mutations land in payload bytes to keep the round-trip check honest.
        assert!(oks > 1_000, "only {oks} inputs decoded");
    }
}
