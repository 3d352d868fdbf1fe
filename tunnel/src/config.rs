//! Endpoint and peer configuration.

use std::net::SocketAddr;
use std::time::Duration;

use crate::aead::AeadBackend;
use crate::key::{PresharedKey, PublicKey};

/// Endpoint-wide parameters. `Default` gives values for a LAN/datacenter cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Record cipher implementation.
    pub aead: AeadBackend,
    /// Largest UDP payload sent (default 1452: IPv6 and IPv4 over a 1500-byte MTU).
    pub max_udp_payload: usize,
    /// The initiator of a session starts a new handshake when the session is this old
    /// (the responder waits half the rekey-to-reject interval longer, to avoid both sides
    /// rekeying at once).
    pub rekey_after_time: Duration,
    /// A session is no longer used, for sending or receiving, once this old.
    pub reject_after_time: Duration,
    /// A new handshake starts when this many records were sent with one session.
    pub rekey_after_messages: u64,
    /// A session sends and accepts no record with a counter this large or larger.
    pub reject_after_messages: u64,
    /// How long the previous session still decrypts records after being replaced.
    pub previous_session_grace: Duration,
    /// Interval between handshake initiations while no response arrives.
    pub handshake_retry_interval: Duration,
    /// An attempt series without success for this long is reported as
    /// [`HandshakeError::Timeout`](crate::HandshakeError::Timeout); trying continues.
    pub handshake_timeout: Duration,
    /// Initiations processed per second (token bucket refill rate), across all sources other
    /// than the current addresses of configured peers (bounded by `handshake_rate_per_source`
    /// alone). Beyond this or the per-source allowance the endpoint is *under load*: an
    /// initiation then needs a valid `mac2`, else it is answered with a cookie reply.
    pub handshake_rate: u32,
    /// Token bucket size for initiations.
    pub handshake_burst: u32,
    /// An initiation whose timestamp is further ahead of this endpoint's clock is refused
    /// and its timestamp not remembered, so a peer whose clock ran ahead can connect again
    /// once its clock is right (default 10 minutes: clocks of a cluster agree far better).
    pub max_clock_ahead: Duration,
    /// Initiations processed per second from one source IP address; under load, the same
    /// allowance again from a separate bucket per source for initiations with a valid `mac2`
    /// (which only the owner of the address can send).
    pub handshake_rate_per_source: u32,
    /// Token bucket size per source IP address (each of the two buckets).
    pub handshake_burst_per_source: u32,
    /// Source addresses whose buckets are remembered at once (in each of the two tables).
    pub handshake_sources: usize,
    /// Cookie replies sent per second at most to sources that are no configured peer's
    /// address, and as many again, from a bucket of their own, to configured peers' current
    /// addresses (so a flood from elsewhere cannot take the replies a peer needs). They are
    /// smaller than the initiations that trigger them, so they cannot amplify a reflection.
    pub cookie_reply_rate: u32,
    /// Token bucket size for cookie replies (each of the two buckets).
    pub cookie_reply_burst: u32,
    /// Interval between heartbeats.
    pub heartbeat_interval: Duration,
    /// A peer is reported dead after this many heartbeat intervals without one.
    pub dead_after_missed_heartbeats: u32,
    /// Retransmission timeout before any RTT sample (RFC 6298: 1 s).
    pub initial_rto: Duration,
    /// Lower bound of the RTO (RFC 6298 says 1 s; a LAN does better with less).
    pub min_rto: Duration,
    /// Upper bound of the RTO.
    pub max_rto: Duration,
    /// Longest an ACK for an ack-eliciting packet is delayed (both peers must agree).
    pub max_ack_delay: Duration,
    /// Initial congestion window, in full-size packets.
    pub initial_window_packets: u32,
    /// Receive window of the reliable stream, in bytes.
    pub stream_window: u64,
    /// Most bytes of reliable messages buffered for sending per peer (unacknowledged
    /// included); [`SendError::BufferFull`](crate::SendError::BufferFull) beyond.
    pub send_buffer_limit: usize,
    /// Largest reliable message; larger received messages are skipped and counted.
    pub max_message_size: usize,
    /// Datagrams queued per peer before [`SendError::QueueFull`](crate::SendError::QueueFull).
    pub datagram_queue_len: usize,
    /// Announce (in heartbeats) that this endpoint takes records of several datagrams, and
    /// pack queued datagrams into shared records for peers that announce it. Off: one
    /// datagram per record each way, as endpoints before it did.
    pub pack_datagrams: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            aead: AeadBackend::default(),
            max_udp_payload: 1452,
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
            previous_session_grace: Duration::from_secs(30),
            handshake_retry_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            handshake_rate: 50,
            handshake_burst: 20,
            max_clock_ahead: Duration::from_secs(600),
            handshake_rate_per_source: 5,
            handshake_burst_per_source: 10,
            handshake_sources: 4096,
            cookie_reply_rate: 10_000,
            cookie_reply_burst: 1_000,
            heartbeat_interval: Duration::from_secs(1),
            dead_after_missed_heartbeats: 3,
            initial_rto: Duration::from_secs(1),
            min_rto: Duration::from_millis(2),
            max_rto: Duration::from_secs(60),
            max_ack_delay: Duration::from_millis(2),
            initial_window_packets: 10,
            stream_window: 4 << 20,
            send_buffer_limit: 64 << 20,
            max_message_size: 16 << 20,
            datagram_queue_len: 1024,
            pack_datagrams: true,
        }
    }
}

/// One remote node.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's static public key: only handshakes from configured keys are accepted.
    pub public_key: PublicKey,
    /// Optional pre-shared key (both sides must agree; none means 32 zero bytes).
    pub preshared_key: Option<PresharedKey>,
    /// Where to send handshakes. Without one, this side only responds, and learns the
    /// address from the peer's authenticated records and handshake responses (it is updated
    /// on every one, so peers may roam; an initiation alone does not move it).
    pub endpoint: Option<SocketAddr>,
}

impl PeerConfig {
    /// A peer with a key and an address, no PSK.
    pub fn new(public_key: PublicKey, endpoint: Option<SocketAddr>) -> PeerConfig {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint,
        }
    }
}
