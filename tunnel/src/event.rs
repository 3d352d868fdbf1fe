//! What the endpoint reports to the application.

use std::net::SocketAddr;

use crate::key::PublicKey;
use crate::load::LoadReport;

/// Identifies a configured peer of an [`Endpoint`](crate::Endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub(crate) u32);

impl PeerId {
    /// The raw number (for logs and metrics labels).
    pub fn as_u32(self) -> u32 {
        self.0
    }
}

/// Why a handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The initiation did not decrypt, although its `mac1` was right (corrupted in
    /// transit, or a broken peer).
    #[error("handshake initiation failed to decrypt")]
    InitiationAuthentication,
    /// An initiation's timestamp was not newer than the last accepted one from this peer
    /// (a replay, or the peer's clock went backwards).
    #[error("replayed handshake initiation")]
    Replayed,
    /// An initiation's timestamp was further ahead of our clock than
    /// [`Config::max_clock_ahead`](crate::Config): one of the two clocks is wrong. Refused
    /// and not remembered.
    #[error("handshake initiation from {ahead_s} s in the future: check both nodes' clocks")]
    ClockAhead {
        /// How far ahead of our clock, seconds.
        ahead_s: u64,
    },
    /// The response did not authenticate: the peer uses a different pre-shared key, or is
    /// not the holder of the static key we have configured for it.
    #[error("handshake response failed authentication (wrong pre-shared key or peer key?)")]
    ResponseAuthentication,
    /// No handshake completed within [`Config::handshake_timeout`](crate::Config): the peer
    /// is unreachable, or it does not know our key, or we have the wrong key for it (the
    /// responder drops such initiations silently).
    #[error("no handshake response (peer unreachable, or a key is wrong)")]
    Timeout,
    /// A valid initiation from a static key that is not configured as a peer.
    #[error("handshake from unknown static key {0}")]
    UnknownPeer(PublicKey),
}

/// Something the application should know about.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A handshake completed and its session is in use (also after every rekey).
    HandshakeCompleted {
        /// The peer.
        peer: PeerId,
    },
    /// A handshake failed.
    HandshakeFailed {
        /// The configured peer, when known.
        peer: Option<PeerId>,
        /// The address involved.
        remote: Option<SocketAddr>,
        /// Why.
        error: HandshakeError,
    },
    /// A heartbeat brought the peer's load report.
    LoadReport {
        /// The peer.
        peer: PeerId,
        /// Its report.
        report: LoadReport,
    },
    /// A reliable message arrived (exactly once, in order).
    Message {
        /// The peer.
        peer: PeerId,
        /// The message.
        data: Vec<u8>,
    },
    /// A heartbeat arrived from a peer not known to be alive (first contact, or return
    /// after [`PeerDead`](Event::PeerDead)).
    PeerAlive {
        /// The peer.
        peer: PeerId,
    },
    /// No heartbeat for [`Config::dead_after_missed_heartbeats`](crate::Config) intervals.
    PeerDead {
        /// The peer.
        peer: PeerId,
    },
    /// The peer restarted (a new instance completed a handshake): reliable messages not
    /// yet acknowledged by the old instance were discarded, and both directions start over.
    PeerRestarted {
        /// The peer.
        peer: PeerId,
    },
}
