//! The encrypted UDP tunnel between flowshift nodes: a sans-IO core.
//!
//! This crate contains no sockets, threads or clock reads. An [`Endpoint`] is a
//! deterministic state machine: the driver hands it every received UDP datagram and the
//! current time, and takes out datagrams to send, the next timer deadline and events.
//!
//! ```text
//!           handle_datagram(now, from, &mut buf) ──► Option<Received>  (its datagrams, decrypted in buf)
//!   driver  handle_timeout(now)                       │
//!   (mio,   send_message / send_datagram       ┌──────┴───────┐
//!   UDP)    set_load_report                    │   Endpoint   │ peers, sessions, channels
//!           poll_transmit(now, &mut buf) ◄─────┤              │
//!           poll_timeout() / poll_event() ◄────┴──────────────┘
//! ```
//!
//! After any `handle_*` or `send_*` call the driver SHOULD call
//! [`Endpoint::poll_transmit`] until it returns `None`, drain [`Endpoint::poll_event`],
//! and arm its timer with [`Endpoint::poll_timeout`].
//!
//! # What the tunnel provides
//!
//! * **Identity**: static X25519 keys ([`Keypair`], base64 like `wg genkey`/`wg pubkey`);
//!   only configured peer keys are accepted.
//! * **Handshake**: Noise `IKpsk2` through `snow` ([`NOISE_PARAMS`]): mutual
//!   authentication, forward secrecy, optional pre-shared key (all zeros when none).
//!   Initiations carry a keyed BLAKE2s `mac1` that a responder checks before any
//!   Diffie-Hellman, and pass token buckets, so floods cost a hash each; beyond the
//!   buckets the responder is under load and answers initiations without a valid `mac2`
//!   with WireGuard's cookie reply, so that spoofed or replayed floods cannot lock a peer out.
//! * **Rekeying** on time and on message count; old keys keep decrypting for a grace
//!   period and every record names its session (WireGuard-style receiver index), so a
//!   rekey neither loses nor stalls traffic.
//! * **Record protection**: ChaCha20-Poly1305 with per-direction keys and the 64-bit
//!   record counter as nonce, in place in the caller's buffer ([`aead`]), and a 4032-packet
//!   sliding anti-replay window ([`replay`]).
//! * **Channels** per peer: unreliable datagrams (never delivered twice), a reliable
//!   ordered message stream (selective ACKs, RFC 6298 RTO, fast retransmit, flow control,
//!   NewReno), and heartbeats carrying a versioned [`LoadReport`], with dead/alive events.
//!
//! Wire formats are in [`wire`] and `docs/tunnel.md`. Every drop is counted in [`Stats`].
//!
//! # Hostile input
//! No input from the network panics: every decoder works on a checked view, the
//! `decode` fuzz target and the tests feed random and mutated datagrams.

#![forbid(unsafe_code)]

pub mod aead;
mod config;
mod cookie;
mod dgram_queue;
mod endpoint;
mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod key;
pub mod load;
mod noise;
mod peer;
mod ratelimit;
mod reliable;
pub mod replay;
mod stats;
pub mod time;
pub mod wire;

pub use aead::AeadBackend;
pub use config::{Config, PeerConfig};
pub use endpoint::{AddPeerError, Endpoint, Received, SendError, Transmit};
pub use event::{Event, HandshakeError, PeerId};
pub use key::{KeyParseError, Keypair, PresharedKey, PrivateKey, PublicKey};
pub use load::{
    KpiReport, LeaseRenewal, LoadForecast, LoadReport, MAX_KPI_REPORTS, MAX_LEASE_RENEWALS,
    MAX_LOAD_REPORT_LEN, MAX_SEGMENT_CONNS, MAX_SEGMENT_STATS_LEN, MAX_SEGMENTS_PER_CONN,
    SegmentReport, SegmentStat,
};
pub use noise::NOISE_PARAMS;
pub use stats::{PeerStats, Stats};
pub use time::Instant;
