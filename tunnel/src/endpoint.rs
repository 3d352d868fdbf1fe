//! The endpoint: one local identity, many peers, one UDP socket's worth of datagrams.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::aead::TAG_LEN;
use crate::config::{Config, PeerConfig};
use crate::cookie::CookieMaker;
use crate::event::{Event, HandshakeError, PeerId};
use crate::key::{Keypair, PublicKey};
use crate::load::{FEATURE_PACKED_DATAGRAMS, LoadReport, with_features};
use crate::noise;
use crate::peer::{Ctx, InitiationClock, InitiationInfo, Peer};
use crate::ratelimit::{RecentSet, SourceLimiter, TokenBucket};
use crate::stats::{PeerStats, Stats};
use crate::time::Instant;
use crate::wire::frame::{Frame, Frames, max_prefixed_payload};
use crate::wire::handshake::INIT_PAYLOAD_LEN;
use crate::wire::{
    COOKIE_REPLY_LEN, CookieReply, CookieReplyRepr, DATA_HEADER_LEN, DataPacket, DataRepr,
    HandshakeInit, HandshakeInitRepr, HandshakeResponse, HandshakeResponseRepr, Header, MAC_LEN,
    MessageType, WireError,
};

/// Cookie replies waiting for `poll_transmit` at most (more are not made).
const MAX_QUEUED_COOKIE_REPLIES: usize = 1024;
/// `mac1`s of the admitted initiations with a valid `mac2` remembered, to drop verbatim
/// repeats of them under load.
const RECENT_MAC2_INITIATIONS: usize = 4096;

/// What [`Endpoint::admit_initiation`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// Under load without a valid `mac2`: answer with a cookie reply; `known` if the source
    /// is a configured peer's current address.
    Cookie {
        /// From a configured peer's current address.
        known: bool,
    },
    /// Go on to the Diffie-Hellman.
    Handshake,
    /// Under load, with a valid `mac2`, but its source used up its allowance.
    RateLimited,
    /// Under load, a verbatim repeat of an initiation with a valid `mac2` already admitted.
    Replayed,
}

/// A datagram to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Its length: the first `size` bytes of the buffer given to
    /// [`Endpoint::poll_transmit`].
    pub size: usize,
}

/// The datagrams of one record delivered by [`Endpoint::handle_datagram`], decrypted in
/// place in the buffer it was given (a record carries one or, from a peer that packs them,
/// several).
#[derive(Clone, Debug)]
pub struct Received<'a> {
    /// The sending peer.
    pub peer: PeerId,
    /// The record's frames, checked whole before they were delivered.
    frames: &'a [u8],
    count: usize,
}

impl<'a> Received<'a> {
    /// How many datagrams the record carried (at least one).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a record without datagrams is not delivered.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The datagrams, in the order the peer queued them.
    pub fn datagrams(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        Frames::new(self.frames).filter_map(|f| match f {
            Ok(Frame::Datagram(d)) => Some(d),
            _ => None,
        })
    }
}

/// Why [`Endpoint::add_peer`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddPeerError {
    /// A peer with this public key exists.
    #[error("a peer with this public key is already configured")]
    Duplicate,
    /// The key is this endpoint's own.
    #[error("cannot add the endpoint's own key as a peer")]
    OwnKey,
}

/// Why a message or datagram was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The peer's send buffer for reliable messages is full; try again once the peer
    /// acknowledged some.
    #[error("reliable send buffer full")]
    BufferFull,
    /// The datagram exceeds [`Endpoint::max_datagram_payload`].
    #[error("datagram larger than the maximum payload")]
    DatagramTooLarge,
    /// The message exceeds [`Config::max_message_size`].
    #[error("message larger than the maximum message size")]
    MessageTooLarge,
    /// The peer's datagram queue is full (the datagram was dropped and counted).
    #[error("datagram queue full")]
    QueueFull,
    /// No such peer.
    #[error("unknown peer")]
    UnknownPeer,
}

/// A tunnel endpoint: the sans-IO state machine for one local static key and its peers.
///
/// Feed it with [`handle_datagram`](Self::handle_datagram) (every UDP datagram received),
/// [`handle_timeout`](Self::handle_timeout) (when [`poll_timeout`](Self::poll_timeout)'s
/// instant is reached) and the `send_*` methods; after any of them, call
/// [`poll_transmit`](Self::poll_transmit) until it returns `None`, drain
/// [`poll_event`](Self::poll_event), and re-arm the timer from `poll_timeout`.
pub struct Endpoint {
    config: Config,
    keypair: Keypair,
    /// `mac1` key for messages sent to us.
    mac1_key: [u8; 32],
    rng: ChaCha20Rng,
    /// Random per endpoint: tells peers we restarted.
    instance: u64,
    peers: BTreeMap<PeerId, Peer>,
    by_key: HashMap<PublicKey, PeerId>,
    /// Newest initiation timestamps of removed peers, restored if they are added again.
    removed_timestamps: HashMap<PublicKey, u64>,
    /// Timestamps of our own initiations.
    clock: InitiationClock,
    /// Local session index → peer (initiations in flight and sessions).
    indices: HashMap<u32, PeerId>,
    next_peer_id: u32,
    /// Round-robin position for `poll_transmit`.
    cursor: u32,
    /// Initiations from sources other than configured peers' addresses.
    limiter: TokenBucket,
    /// Initiations per source IP (while not under load).
    source_limiter: SourceLimiter,
    /// Cookies and `mac2` checks.
    cookies: CookieMaker,
    /// Initiations with a valid `mac2` per source IP, under load.
    mac2_limiter: SourceLimiter,
    /// `mac1`s of initiations admitted on their `mac2`.
    recent_mac2: RecentSet<[u8; MAC_LEN]>,
    /// Cookie replies sent to sources that are no configured peer's address.
    cookie_limiter: TokenBucket,
    /// Cookie replies sent to configured peers' current addresses: a flood from elsewhere
    /// cannot spend these, so a peer under such a flood still gets its cookie.
    known_cookie_limiter: TokenBucket,
    /// Cookie replies to send (the only datagrams that belong to no peer).
    tx: VecDeque<(SocketAddr, [u8; COOKIE_REPLY_LEN])>,
    events: VecDeque<Event>,
    stats: Stats,
    load: LoadReport,
    heartbeat: Vec<u8>,
}

impl core::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("public_key", self.keypair.public())
            .field("peers", &self.peers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

macro_rules! split {
    ($self:ident) => {{
        let Endpoint {
            config,
            keypair,
            rng,
            instance,
            peers,
            indices,
            events,
            stats,
            heartbeat,
            clock,
            ..
        } = $self;
        (
            Ctx {
                config,
                stats,
                events,
                indices,
                rng,
                local: keypair,
                instance: *instance,
                heartbeat: heartbeat.as_slice(),
                clock,
            },
            peers,
        )
    }};
}

impl Endpoint {
    /// A new endpoint. `rng_seed` seeds every random choice the endpoint makes (ephemeral
    /// keys, session indices); the driver MUST draw it from the OS CSPRNG, tests may fix it.
    pub fn new(config: Config, keypair: Keypair, rng_seed: [u8; 32], now: Instant) -> Endpoint {
        let mut rng = ChaCha20Rng::from_seed(rng_seed);
        let instance = rng.next_u64();
        let load = LoadReport::default();
        let heartbeat = with_features(load.to_bytes(), features(&config));
        let source_limiter = SourceLimiter::new(
            config.handshake_rate_per_source,
            config.handshake_burst_per_source,
            config.handshake_sources,
        );
        Endpoint {
            mac1_key: noise::mac1_key(keypair.public()),
            limiter: TokenBucket::new(config.handshake_rate, config.handshake_burst, now),
            mac2_limiter: source_limiter.clone(),
            source_limiter,
            cookies: CookieMaker::new(keypair.public(), &mut rng, now),
            recent_mac2: RecentSet::new(RECENT_MAC2_INITIATIONS),
            cookie_limiter: TokenBucket::new(
                config.cookie_reply_rate,
                config.cookie_reply_burst,
                now,
            ),
            known_cookie_limiter: TokenBucket::new(
                config.cookie_reply_rate,
                config.cookie_reply_burst,
                now,
            ),
            tx: VecDeque::new(),
            config,
            keypair,
            rng,
            instance,
            peers: BTreeMap::new(),
            by_key: HashMap::new(),
            removed_timestamps: HashMap::new(),
            clock: InitiationClock::default(),
            indices: HashMap::new(),
            next_peer_id: 0,
            cursor: 0,
            events: VecDeque::new(),
            stats: Stats::default(),
            heartbeat,
            load,
        }
    }

    // ------------------------------------------------------------------ getters

    /// The endpoint's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This endpoint's static public key.
    pub fn public_key(&self) -> &PublicKey {
        self.keypair.public()
    }

    /// Counters for the metrics layer.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Per-peer diagnostics.
    pub fn peer_stats(&self, peer: PeerId) -> Option<PeerStats> {
        self.peers.get(&peer).map(|p| {
            let mut s = p.stats();
            s.packs_datagrams &= self.config.pack_datagrams;
            s
        })
    }

    /// The peer with this static key.
    pub fn peer_by_key(&self, key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    /// A peer's static key.
    pub fn peer_public_key(&self, peer: PeerId) -> Option<&PublicKey> {
        self.peers.get(&peer).map(|p| &p.public_key)
    }

    /// The address a peer was last seen at (or configured with).
    pub fn peer_address(&self, peer: PeerId) -> Option<SocketAddr> {
        self.peers.get(&peer).and_then(|p| p.addr)
    }

    /// The configured peers.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// The load report our heartbeats carry.
    pub fn load_report(&self) -> &LoadReport {
        &self.load
    }

    /// Largest datagram [`send_datagram`](Self::send_datagram) accepts: whatever fits in
    /// one record of [`Config::max_udp_payload`] bytes.
    pub fn max_datagram_payload(&self) -> usize {
        // Worst-case packet number (8 bytes) so that any queued datagram fits a record.
        max_prefixed_payload(
            self.config
                .max_udp_payload
                .saturating_sub(DATA_HEADER_LEN + TAG_LEN + 8),
        )
    }

    // ------------------------------------------------------------------ configuration

    /// Adds a peer. A peer with an endpoint address starts a handshake on the next
    /// `poll_transmit` or `handle_timeout`.
    pub fn add_peer(&mut self, config: PeerConfig, now: Instant) -> Result<PeerId, AddPeerError> {
        if config.public_key == *self.keypair.public() {
            return Err(AddPeerError::OwnKey);
        }
        if self.by_key.contains_key(&config.public_key) {
            return Err(AddPeerError::Duplicate);
        }
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        self.by_key.insert(config.public_key, id);
        let mut peer = Peer::new(id, &config, &self.config, now);
        peer.last_init_timestamp = self.removed_timestamps.remove(&config.public_key);
        self.peers.insert(id, peer);
        Ok(id)
    }

    /// Removes a peer and forgets its sessions; returns whether it existed. The newest
    /// initiation timestamp accepted from it is kept: added again, the peer still cannot
    /// have its old initiations replayed.
    pub fn remove_peer(&mut self, peer: PeerId) -> bool {
        let (mut ctx, peers) = split!(self);
        let Some(mut p) = peers.remove(&peer) else {
            return false;
        };
        p.release(&mut ctx);
        self.by_key.remove(&p.public_key);
        if let Some(ts) = p.last_init_timestamp {
            self.removed_timestamps.insert(p.public_key, ts);
        }
        true
    }

    /// Sets the load report that the following heartbeats carry.
    pub fn set_load_report(&mut self, report: LoadReport) {
        self.heartbeat = with_features(report.to_bytes(), features(&self.config));
        self.load = report;
    }

    // ------------------------------------------------------------------ application input

    /// Queues a reliable message: delivered exactly once and in order (per peer), unless
    /// the peer restarts first (see [`Event::PeerRestarted`]).
    pub fn send_message(&mut self, peer: PeerId, msg: &[u8]) -> Result<(), SendError> {
        if msg.len() > self.config.max_message_size {
            return Err(SendError::MessageTooLarge);
        }
        let p = self.peers.get_mut(&peer).ok_or(SendError::UnknownPeer)?;
        if !p.send_message(msg) {
            return Err(SendError::BufferFull);
        }
        self.stats.messages_sent += 1;
        Ok(())
    }

    /// Queues an unreliable datagram: delivered at most once, possibly out of order.
    pub fn send_datagram(&mut self, peer: PeerId, data: &[u8]) -> Result<(), SendError> {
        if data.len() > self.max_datagram_payload() {
            self.stats.datagrams_dropped += 1;
            return Err(SendError::DatagramTooLarge);
        }
        let limit = self.config.datagram_queue_len;
        let p = self.peers.get_mut(&peer).ok_or(SendError::UnknownPeer)?;
        if !p.queue_datagram(data, limit) {
            self.stats.datagrams_dropped += 1;
            return Err(SendError::QueueFull);
        }
        Ok(())
    }

    /// The newest timestamp of our own initiations that a peer answered: peers refuse ours
    /// at or below it for as long as they run. A driver keeps it across restarts (see
    /// [`set_initiation_floor`](Self::set_initiation_floor)), so that a clock stepped back
    /// cannot make this node's initiations look replayed.
    pub fn accepted_initiation_timestamp(&self) -> u64 {
        self.clock.accepted
    }

    /// Our initiations carry timestamps above `floor` from now on, whatever the clock says
    /// (a value [`accepted_initiation_timestamp`](Self::accepted_initiation_timestamp)
    /// returned before a restart).
    pub fn set_initiation_floor(&mut self, floor: u64) {
        self.clock.last_used = self.clock.last_used.max(floor);
        self.clock.accepted = self.clock.accepted.max(floor);
    }

    /// Seals `plaintext` as the next data record to `peer` with the current session, exactly
    /// as a broken or malicious peer could: no frame is checked. For fuzzing the receiving
    /// side's handling of *authenticated* records (`tunnel/fuzz`, `tests/corpus.rs`); the
    /// reliable channel's state is not touched. `None` without a session or if `buf` is too
    /// small.
    #[doc(hidden)]
    pub fn seal_raw_record(
        &mut self,
        peer: PeerId,
        plaintext: &[u8],
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let p = self.peers.get_mut(&peer)?;
        let destination = p.addr?;
        let size = p.seal_raw(plaintext, buf)?;
        Some(Transmit { destination, size })
    }

    // ------------------------------------------------------------------ network input

    /// Handles one received UDP datagram. `buf` is decrypted in place; if the record
    /// carried datagrams, they are returned (as slices of `buf`). Anything invalid is
    /// dropped and counted in [`stats`](Self::stats); this never panics.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &'a mut [u8],
    ) -> Option<Received<'a>> {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += buf.len() as u64;
        let ty = match Header::new_checked(&buf[..]).and_then(|h| h.check()) {
            Ok(ty) => ty,
            Err(WireError::Version(_)) => {
                self.stats.rx_bad_version += 1;
                return None;
            }
            Err(_) => {
                self.stats.rx_malformed += 1;
                return None;
            }
        };
        match ty {
            MessageType::HandshakeInit => {
                self.on_initiation(now, from, buf);
                None
            }
            MessageType::HandshakeResponse => {
                self.on_response(now, from, buf);
                None
            }
            MessageType::CookieReply => {
                self.on_cookie_reply(now, buf);
                None
            }
            MessageType::Data => self.on_data(now, from, buf),
            MessageType::Unknown(_) => {
                self.stats.rx_malformed += 1;
                None
            }
        }
    }

    /// Whether an initiation from `from` (with a valid `mac1`) may cost a DH.
    ///
    /// Normally its source's bucket must have a token, and, unless it comes from a configured
    /// peer's current address, the shared bucket too. When either would refuse, the endpoint
    /// is *under load* for this initiation: it must carry a valid `mac2` (proof that the
    /// sender receives at its source address), else it gets a cookie reply; with one, it
    /// draws on a second per-source bucket, which spoofed packets cannot reach, and verbatim
    /// repeats are dropped.
    fn admit_initiation(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: &HandshakeInit<&[u8]>,
    ) -> Admission {
        let source = from.ip().to_canonical();
        let known = self
            .peers
            .values()
            .any(|p| p.addr.is_some_and(|a| a.ip().to_canonical() == source));
        if (known || self.limiter.has_token(now)) && self.source_limiter.try_take(from.ip(), now) {
            if !known {
                self.limiter.try_take(now);
            }
            return Admission::Handshake;
        }
        if !self
            .cookies
            .check_mac2(&mut self.rng, now, from, packet.mac2_input(), packet.mac2())
        {
            return Admission::Cookie { known };
        }
        let mut mac1 = [0u8; MAC_LEN];
        mac1.copy_from_slice(packet.mac1());
        if self.recent_mac2.contains(&mac1) {
            return Admission::Replayed;
        }
        if !self.mac2_limiter.try_take(from.ip(), now) {
            return Admission::RateLimited;
        }
        self.recent_mac2.insert(mac1);
        Admission::Handshake
    }

    fn on_initiation(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) {
        let Ok(packet) = HandshakeInit::new_checked(buf) else {
            self.stats.rx_malformed += 1;
            return;
        };
        let Ok(repr) = HandshakeInitRepr::parse(&packet) else {
            self.stats.rx_malformed += 1;
            return;
        };
        // Cheap checks first: a keyed hash, then the rate limit; only then any DH.
        if !noise::verify_mac1(&self.mac1_key, packet.mac_input(), packet.mac1()) {
            self.stats.handshake_bad_mac += 1;
            return;
        }
        match self.admit_initiation(now, from, &packet) {
            Admission::Handshake => {}
            Admission::Cookie { known } => {
                self.stats.handshake_mac2_rejected += 1;
                let bucket = if known {
                    &mut self.known_cookie_limiter
                } else {
                    &mut self.cookie_limiter
                };
                if self.tx.len() < MAX_QUEUED_COOKIE_REPLIES && bucket.try_take(now) {
                    let reply = self.cookies.reply(
                        &mut self.rng,
                        now,
                        from,
                        repr.sender_index,
                        packet.mac1(),
                    );
                    self.tx.push_back((from, reply));
                    self.stats.cookie_replies_sent += 1;
                }
                return;
            }
            Admission::RateLimited => {
                self.stats.handshake_rate_limited += 1;
                return;
            }
            Admission::Replayed => {
                self.stats.handshake_replayed += 1;
                return;
            }
        }
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let Ok(mut hs) = noise::responder(self.keypair.private(), seed) else {
            self.stats.handshake_failed += 1;
            return;
        };
        let mut payload = [0u8; 64];
        let remote_key = match hs.read_message(packet.noise(), &mut payload) {
            Ok(INIT_PAYLOAD_LEN) => hs
                .get_remote_static()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(PublicKey::from_bytes),
            _ => None,
        };
        let Some(remote_key) = remote_key else {
            self.stats.handshake_failed += 1;
            self.events.push_back(Event::HandshakeFailed {
                peer: None,
                remote: Some(from),
                error: HandshakeError::InitiationAuthentication,
            });
            return;
        };
        let Some(&id) = self.by_key.get(&remote_key) else {
            self.stats.handshake_unknown_peer += 1;
            self.events.push_back(Event::HandshakeFailed {
                peer: None,
                remote: Some(from),
                error: HandshakeError::UnknownPeer(remote_key),
            });
            return;
        };
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&payload[..8]);
        let mut inst = [0u8; 8];
        inst.copy_from_slice(&payload[8..16]);
        let (mut ctx, peers) = split!(self);
        if let Some(peer) = peers.get_mut(&id) {
            let info = InitiationInfo {
                sender_index: repr.sender_index,
                timestamp: u64::from_le_bytes(ts),
                remote_instance: u64::from_le_bytes(inst),
            };
            peer.on_initiation(&mut ctx, now, from, hs, info);
        }
    }

    fn on_response(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) {
        let Ok(packet) = HandshakeResponse::new_checked(buf) else {
            self.stats.rx_malformed += 1;
            return;
        };
        let Ok(repr) = HandshakeResponseRepr::parse(&packet) else {
            self.stats.rx_malformed += 1;
            return;
        };
        let Some(&id) = self.indices.get(&repr.receiver_index) else {
            self.stats.rx_unknown_session += 1;
            return;
        };
        if !noise::verify_mac1(&self.mac1_key, packet.mac_input(), packet.mac1()) {
            self.stats.handshake_bad_mac += 1;
            return;
        }
        let (mut ctx, peers) = split!(self);
        if let Some(peer) = peers.get_mut(&id) {
            peer.on_response(&mut ctx, now, from, repr, packet.noise());
        }
    }

    fn on_cookie_reply(&mut self, now: Instant, buf: &[u8]) {
        let Ok(packet) = CookieReply::new_checked(buf) else {
            self.stats.rx_malformed += 1;
            return;
        };
        let Ok(repr) = CookieReplyRepr::parse(&packet) else {
            self.stats.rx_malformed += 1;
            return;
        };
        let Some(&id) = self.indices.get(&repr.receiver_index) else {
            self.stats.rx_unknown_session += 1;
            return;
        };
        let (mut ctx, peers) = split!(self);
        if let Some(peer) = peers.get_mut(&id) {
            peer.on_cookie_reply(&mut ctx, now, repr, &packet);
        }
    }

    fn on_data<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &'a mut [u8],
    ) -> Option<Received<'a>> {
        let repr = match DataPacket::new_checked(&buf[..]).and_then(|p| DataRepr::parse(&p)) {
            Ok(r) => r,
            Err(_) => {
                self.stats.rx_malformed += 1;
                return None;
            }
        };
        let Some(&id) = self.indices.get(&repr.receiver_index) else {
            self.stats.rx_unknown_session += 1;
            return None;
        };
        let (mut ctx, peers) = split!(self);
        let peer = peers.get_mut(&id)?;
        let (frames, count) = peer.on_data(&mut ctx, now, from, buf, repr)?;
        let buf: &'a [u8] = buf;
        Some(Received {
            peer: id,
            frames: buf.get(frames)?,
            count,
        })
    }

    /// Runs the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (mut ctx, peers) = split!(self);
        for peer in peers.values_mut() {
            peer.handle_timeout(&mut ctx, now);
        }
    }

    // ------------------------------------------------------------------ output

    /// Writes the next datagram to send into `buf` (which should hold
    /// [`Config::max_udp_payload`] bytes; smaller buffers get smaller records, and below
    /// about 100 bytes nothing is sent). Peers take turns.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        while let Some((destination, reply)) = self.tx.pop_front() {
            if let Some(dst) = buf.get_mut(..reply.len()) {
                dst.copy_from_slice(&reply);
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += reply.len() as u64;
                return Some(Transmit {
                    destination,
                    size: reply.len(),
                });
            }
        }
        let cursor = PeerId(self.cursor);
        let (mut ctx, peers) = split!(self);
        let mut sent = None;
        for (&id, peer) in peers.range_mut(cursor..) {
            if let Some(t) = peer.poll_transmit(&mut ctx, now, buf) {
                sent = Some((id, t));
                break;
            }
        }
        if sent.is_none() {
            for (&id, peer) in peers.range_mut(..cursor) {
                if let Some(t) = peer.poll_transmit(&mut ctx, now, buf) {
                    sent = Some((id, t));
                    break;
                }
            }
        }
        let (id, (destination, size)) = sent?;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += size as u64;
        self.cursor = id.0.wrapping_add(1);
        Some(Transmit { destination, size })
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next. An instant in
    /// the past means "now".
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.poll_timeout(&self.config))
            .min()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
/// The tunnel features an endpoint with `config` announces in its heartbeats.
fn features(config: &Config) -> u64 {
    if config.pack_datagrams {
        FEATURE_PACKED_DATAGRAMS
    } else {
        0
    }
}
