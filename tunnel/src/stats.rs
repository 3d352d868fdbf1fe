//! Counters for the metrics layer.

use std::time::Duration;

/// Endpoint-wide counters; they only increase.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams handed to [`Endpoint::handle_datagram`](crate::Endpoint::handle_datagram).
    pub rx_packets: u64,
    /// Bytes of those.
    pub rx_bytes: u64,
    /// Datagrams produced by `poll_transmit`.
    pub tx_packets: u64,
    /// Bytes of those.
    pub tx_bytes: u64,
    /// Records that decrypted and were accepted.
    pub rx_records: u64,

    /// Dropped: version byte not ours.
    pub rx_bad_version: u64,
    /// Dropped: too short, wrong length or unknown message type.
    pub rx_malformed: u64,
    /// Dropped: no session with that receiver index (unknown, expired or forged).
    pub rx_unknown_session: u64,
    /// Dropped: counter already seen (replay or duplicate).
    pub rx_replayed: u64,
    /// Dropped: counter too far behind the anti-replay window, or beyond the key's limit.
    pub rx_too_old: u64,
    /// Dropped: failed authentication (forged or tampered).
    pub rx_auth_failed: u64,
    /// Authenticated records whose frames did not decode (a broken peer).
    pub rx_bad_frames: u64,

    /// Initiations sent.
    pub handshake_initiated: u64,
    /// Handshakes completed (both roles; includes rekeys).
    pub handshake_completed: u64,
    /// Handshake messages dropped for a wrong `mac1`, before any DH.
    pub handshake_bad_mac: u64,
    /// Initiations with a valid `mac2` dropped because their source used up its allowance
    /// (under load), before any DH.
    pub handshake_rate_limited: u64,
    /// Initiations refused under load for want of a valid `mac2`, before any DH (each is
    /// answered with a cookie reply while `cookie_reply_rate` allows).
    pub handshake_mac2_rejected: u64,
    /// Cookie replies sent (we were under load).
    pub cookie_replies_sent: u64,
    /// Cookie replies received that authenticated (a peer was under load).
    pub cookie_replies_received: u64,
    /// Initiations from static keys that are not configured peers.
    pub handshake_unknown_peer: u64,
    /// Initiations with a stale timestamp, or repeated verbatim under load.
    pub handshake_replayed: u64,
    /// Initiations whose timestamp was too far ahead of our clock (refused, not remembered).
    pub handshake_clock_ahead: u64,
    /// Handshake messages that failed cryptographically.
    pub handshake_failed: u64,
    /// Attempt series that timed out.
    pub handshake_timeouts: u64,

    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Datagrams delivered.
    pub datagrams_received: u64,
    /// Datagrams dropped before sending (queue full, too large, peer removed).
    pub datagrams_dropped: u64,
    /// Reliable messages queued.
    pub messages_sent: u64,
    /// Reliable messages delivered.
    pub messages_received: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
}

/// Per-peer state for diagnostics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// A session is established and usable for sending.
    pub has_session: bool,
    /// Smoothed RTT of the reliable channel, once measured.
    pub srtt: Option<Duration>,
    /// Current retransmission timeout (with backoff).
    pub rto: Duration,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Bytes in ack-eliciting packets not yet acknowledged or lost.
    pub bytes_in_flight: u64,
    /// Bytes of reliable messages not yet acknowledged.
    pub send_buffered: u64,
    /// Ack-eliciting packets sent: the packets tracked for loss (records carrying only
    /// ACKs, heartbeats or datagrams are not; a retransmission is a new packet).
    pub packets_sent: u64,
    /// Tracked packets declared lost (out of `packets_sent`).
    pub packets_lost: u64,
    /// UDP payload bytes of authenticated records from this peer (nothing unauthenticated
    /// is attributed to a peer).
    pub rx_bytes: u64,
    /// Authenticated records from this peer.
    pub rx_records: u64,
    /// UDP payload bytes sent to this peer (records and handshake messages).
    pub tx_bytes: u64,
    /// Datagrams sent to this peer.
    pub tx_packets: u64,
    /// Retransmission timeouts.
    pub rto_expirations: u64,
    /// Stream bytes sent again after a loss.
    pub stream_bytes_retransmitted: u64,
    /// STREAM frames refused (flow control or buffer), packets left unacknowledged.
    pub stream_frames_refused: u64,
    /// Received messages skipped for exceeding the size limit.
    pub messages_skipped: u64,
    /// Sessions established with this peer (initial and rekeys).
    pub sessions_established: u64,
    /// The peer's heartbeats say it accepts records of several datagrams, and datagrams
    /// queued together share records.
    pub packs_datagrams: bool,
}
