//! Per-peer state: handshakes, sessions (keys), the channels and liveness.
//!
//! Keys rotate as in WireGuard. Every session has its own random local index, which the
//! sender puts in the header of every record, so each record finds its keys:
//!
//! * `current` is used for sending (and receiving);
//! * `others` are kept for receiving only: sessions `current` replaced, until
//!   [`Config::previous_session_grace`] has passed (records sent before a rekey that are
//!   still in flight or reordered still decrypt, so a rekey loses nothing), and sessions
//!   this side completed as *responder*. A responder cannot know whether its response
//!   arrived, so it keeps sending with `current` and promotes the new session when the
//!   first record under it arrives (the initiator sends one right away, possibly empty).
//!
//! A session is promoted to `current` only if it was created after `current`. When both
//! sides initiate at the same moment, each may keep sending on the session it initiated
//! while receiving on the other one; the next rekey brings them back together. At most
//! [`MAX_OTHER_SESSIONS`] are kept; the oldest goes first.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use snow::HandshakeState;

use crate::aead::{Aead, TAG_LEN};
use crate::config::{Config, PeerConfig};
use crate::cookie::{self, COOKIE_LEN, COOKIE_LIFETIME};
use crate::dgram_queue::DatagramQueue;
use crate::event::{Event, HandshakeError, PeerId};
use crate::key::{KEY_LEN, Keypair, PublicKey};
use crate::load::{self, LoadReport};
use crate::noise;
use crate::reliable::{Reliable, ReliableParams};
use crate::replay::{ReplayError, ReplayWindow};
use crate::stats::{PeerStats, Stats};
use crate::time::Instant;
use crate::wire::coding::{Writer, varint_len};
use crate::wire::frame::{Frame, FrameType, Frames, parse_record_header};
use crate::wire::handshake::{INIT_PAYLOAD_LEN, RESPONSE_PAYLOAD_LEN};
use crate::wire::{
    CookieReply, CookieReplyRepr, DATA_HEADER_LEN, DataPacket, DataRepr, HANDSHAKE_INIT_LEN,
    HANDSHAKE_RESPONSE_LEN, HandshakeInit, HandshakeInitRepr, HandshakeResponse,
    HandshakeResponseRepr,
};

/// Endpoint state a peer needs while handling an input.
pub(crate) struct Ctx<'a> {
    pub(crate) config: &'a Config,
    pub(crate) stats: &'a mut Stats,
    pub(crate) events: &'a mut VecDeque<Event>,
    pub(crate) indices: &'a mut HashMap<u32, PeerId>,
    pub(crate) rng: &'a mut ChaCha20Rng,
    pub(crate) local: &'a Keypair,
    pub(crate) instance: u64,
    pub(crate) heartbeat: &'a [u8],
    pub(crate) clock: &'a mut InitiationClock,
}

/// The timestamps this endpoint puts in its initiations, and the newest a peer accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InitiationClock {
    /// The last timestamp used: the next is above it, whatever the clock says.
    pub(crate) last_used: u64,
    /// The newest timestamp of ours a peer answered (what peers remember of us).
    pub(crate) accepted: u64,
}

impl InitiationClock {
    /// The timestamp for a new initiation at `now`: the clock, but always above the last.
    pub(crate) fn next(&mut self, now: Instant) -> u64 {
        let ts = now.as_micros().max(self.last_used.saturating_add(1));
        self.last_used = ts;
        ts
    }
}

impl Ctx<'_> {
    fn alloc_index(&mut self, peer: PeerId) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if let std::collections::hash_map::Entry::Vacant(e) = self.indices.entry(i) {
                e.insert(peer);
                return i;
            }
        }
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        self.rng.fill_bytes(&mut s);
        s
    }
}

pub(crate) fn reliable_params(config: &Config) -> ReliableParams {
    let mss = config
        .max_udp_payload
        .saturating_sub(DATA_HEADER_LEN + TAG_LEN)
        .max(64) as u64;
    ReliableParams {
        initial_rto: config.initial_rto,
        min_rto: config.min_rto,
        max_rto: config.max_rto,
        max_ack_delay: config.max_ack_delay,
        mss,
        initial_window_packets: u64::from(config.initial_window_packets),
        stream_window: config.stream_window,
        send_buffer_limit: config.send_buffer_limit,
        max_message_size: config.max_message_size,
    }
}

/// Transport keys and counters of one handshake.
struct Session {
    local_index: u32,
    remote_index: u32,
    send: Box<dyn Aead>,
    recv: Box<dyn Aead>,
    /// Next counter to send.
    send_counter: u64,
    replay: ReplayWindow,
    created: Instant,
    /// Whether this side initiated the handshake.
    initiator: bool,
    /// Instance id the peer sent in the handshake.
    remote_instance: u64,
    /// When it stopped being `current`.
    retired: Option<Instant>,
    /// Whether the initiator is known to have it (always for our own initiations; for a
    /// responder session, once a record arrived under it).
    confirmed: bool,
}

impl Session {
    fn usable(&self, now: Instant, config: &Config) -> bool {
        now - self.created < config.reject_after_time
            && self.send_counter < config.reject_after_messages
    }
}

/// What a received initiation told us.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InitiationInfo {
    /// The initiator's session index.
    pub(crate) sender_index: u32,
    /// The initiator's clock when it sent it (replay protection).
    pub(crate) timestamp: u64,
    /// The initiator's instance id.
    pub(crate) remote_instance: u64,
}

/// An initiation waiting for its response.
struct Initiation {
    hs: HandshakeState,
    local_index: u32,
    /// The initiation as sent (its `mac1` authenticates cookie replies to it).
    packet: Vec<u8>,
    /// It was sent again with `mac2` after a cookie reply (at most once).
    resent_with_cookie: bool,
    /// Responses to it that failed to authenticate. Each costs a DH to find out, so after
    /// [`MAX_FAILED_RESPONSES`] the rest are dropped unread until the next attempt.
    failed_responses: u8,
    /// Its timestamp.
    timestamp: u64,
}

/// Responses per initiation that may fail authentication (and cost a DH each) before the
/// others for it are dropped unread: a forger who knows our public key and sees the
/// initiation would otherwise make us do a DH per packet.
const MAX_FAILED_RESPONSES: u8 = 2;

/// The pending initiation, if a handshake message addressed to `index` answers it.
fn pending_initiation(pending: &mut Option<Initiation>, index: u32) -> Option<&mut Initiation> {
    pending.as_mut().filter(|i| i.local_index == index)
}

/// A cookie from the peer, which was under load.
#[derive(Clone, Copy)]
struct Cookie {
    value: [u8; COOKIE_LEN],
    received: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Liveness {
    Unknown,
    Alive,
    Dead,
}

/// Most receive-only sessions kept per peer.
pub(crate) const MAX_OTHER_SESSIONS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Current,
    Other(usize),
}

pub(crate) struct Peer {
    pub(crate) id: PeerId,
    pub(crate) public_key: PublicKey,
    psk: [u8; KEY_LEN],
    /// `mac1` key for messages sent to this peer.
    mac1_key: [u8; 32],
    /// Key of the cookie replies this peer sends.
    cookie_key: [u8; 32],
    /// The latest cookie from this peer; `mac2` goes on initiations for
    /// [`COOKIE_LIFETIME`] after it arrived.
    cookie: Option<Cookie>,
    pub(crate) addr: Option<SocketAddr>,
    initiation: Option<Initiation>,
    /// Start of the current series of initiation attempts.
    series_start: Option<Instant>,
    next_attempt: Option<Instant>,
    /// Handshake messages to send, with their destinations (a response goes to where its
    /// initiation came from, which need not be `addr`).
    tx_handshake: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Newest initiation timestamp accepted. Never forgotten: not when the peer is declared
    /// dead, and the endpoint carries it over when the peer is removed and added again, so a
    /// captured initiation can never be replayed to this endpoint.
    pub(crate) last_init_timestamp: Option<u64>,
    remote_instance: Option<u64>,
    current: Option<Session>,
    others: Vec<Session>,
    /// Send a record soon, so that the responder promotes our new session.
    confirm_pending: bool,
    /// Handshake even though `current` looks fine (the peer went silent: it may have
    /// restarted and lost the session).
    handshake_requested: bool,
    reliable: Reliable,
    datagrams: DatagramQueue,
    /// Alternates STREAM and DATAGRAM priority when both are waiting.
    prefer_stream: bool,
    /// The peer's heartbeats say it accepts several DATAGRAM frames in one record: queued
    /// datagrams then share records (one seal and one UDP segment for a run of forwarded
    /// ACKs). Until its first heartbeat, and after it restarts, one per record.
    packs_datagrams: bool,
    heartbeat_due: bool,
    next_heartbeat: Instant,
    last_heartbeat_rx: Instant,
    liveness: Liveness,
    sessions_established: u64,
    /// Authenticated records from the peer, and their bytes.
    rx_records: u64,
    rx_bytes: u64,
    /// Datagrams sent to the peer, and their bytes.
    tx_packets: u64,
    tx_bytes: u64,
}

impl Peer {
    pub(crate) fn new(id: PeerId, cfg: &PeerConfig, config: &Config, now: Instant) -> Peer {
        Peer {
            id,
            public_key: cfg.public_key,
            psk: cfg
                .preshared_key
                .as_ref()
                .map_or([0; KEY_LEN], |k| *k.dangerous_as_bytes()),
            mac1_key: noise::mac1_key(&cfg.public_key),
            cookie_key: cookie::cookie_key(&cfg.public_key),
            cookie: None,
            addr: cfg.endpoint,
            initiation: None,
            series_start: None,
            next_attempt: None,
            tx_handshake: VecDeque::new(),
            last_init_timestamp: None,
            remote_instance: None,
            current: None,
            others: Vec::new(),
            confirm_pending: false,
            handshake_requested: false,
            reliable: Reliable::new(&reliable_params(config)),
            datagrams: DatagramQueue::default(),
            prefer_stream: false,
            packs_datagrams: false,
            heartbeat_due: true,
            next_heartbeat: now + config.heartbeat_interval,
            last_heartbeat_rx: now,
            liveness: Liveness::Unknown,
            sessions_established: 0,
            rx_records: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
        }
    }

    /// Releases the session indices (the peer is being removed).
    pub(crate) fn release(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(i) = self.initiation.take() {
            ctx.indices.remove(&i.local_index);
        }
        for s in self.current.take().into_iter().chain(self.others.drain(..)) {
            ctx.indices.remove(&s.local_index);
        }
        ctx.stats.datagrams_dropped += self.datagrams.len() as u64;
    }

    fn drop_session(ctx: &mut Ctx<'_>, s: Option<Session>) {
        if let Some(s) = s {
            ctx.indices.remove(&s.local_index);
        }
    }

    // ---------------------------------------------------------------- getters

    pub(crate) fn stats(&self) -> PeerStats {
        let c = self.reliable.counters;
        PeerStats {
            has_session: self.current.is_some(),
            srtt: self.reliable.srtt(),
            rto: self.reliable.rto(),
            cwnd: self.reliable.cwnd(),
            bytes_in_flight: self.reliable.bytes_in_flight(),
            send_buffered: self.reliable.send.buffered() as u64,
            packets_sent: c.packets_sent,
            packets_lost: c.packets_lost,
            rx_bytes: self.rx_bytes,
            rx_records: self.rx_records,
            tx_bytes: self.tx_bytes,
            tx_packets: self.tx_packets,
            rto_expirations: c.rto_expirations,
            stream_bytes_retransmitted: c.stream_bytes_retransmitted,
            stream_frames_refused: c.stream_frames_refused,
            messages_skipped: self.reliable.skipped_messages(),
            sessions_established: self.sessions_established,
            packs_datagrams: self.packs_datagrams,
        }
    }

    fn has_usable_session(&self, now: Instant, config: &Config) -> bool {
        self.current.as_ref().is_some_and(|s| s.usable(now, config))
    }

    fn rekey_deadline(&self, config: &Config) -> Option<Instant> {
        let c = self.current.as_ref()?;
        let after = if c.initiator {
            config.rekey_after_time
        } else {
            config.rekey_after_time
                + config
                    .reject_after_time
                    .saturating_sub(config.rekey_after_time)
                    / 2
        };
        Some(c.created + after)
    }

    fn needs_rekey(&self, now: Instant, config: &Config) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.send_counter >= config.rekey_after_messages)
            || self.rekey_deadline(config).is_some_and(|d| now >= d)
    }

    fn wants_handshake(&self, now: Instant, config: &Config) -> bool {
        self.handshake_requested
            || !self.has_usable_session(now, config)
            || self.needs_rekey(now, config)
    }

    pub(crate) fn poll_timeout(&self, config: &Config) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut add = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        add(self.reliable.poll_timeout());
        add(Some(self.next_heartbeat));
        if self.liveness != Liveness::Dead {
            add(Some(
                self.last_heartbeat_rx
                    + config.heartbeat_interval * config.dead_after_missed_heartbeats,
            ));
        }
        if self.addr.is_some() {
            if self.series_start.is_some() {
                add(self.next_attempt);
            } else if self.current.is_none() {
                // Nothing started yet: be called back at once.
                add(Some(Instant::ZERO));
            } else {
                add(self.rekey_deadline(config));
            }
        }
        if let Some(c) = &self.current {
            add(Some(c.created + config.reject_after_time));
        }
        for o in &self.others {
            add(Some(o.created + config.reject_after_time));
            add(o.retired.map(|r| r + config.previous_session_grace));
        }
        t
    }

    // ---------------------------------------------------------------- timers

    pub(crate) fn handle_timeout(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let config = ctx.config;
        self.expire_sessions(ctx, now);
        self.reliable.on_timeout(now);
        if now >= self.next_heartbeat {
            self.heartbeat_due = true;
            self.next_heartbeat = now + config.heartbeat_interval;
        }
        if self.liveness != Liveness::Dead
            && now
                >= self.last_heartbeat_rx
                    + config.heartbeat_interval * config.dead_after_missed_heartbeats
        {
            self.liveness = Liveness::Dead;
            // If it restarted, our session is gone on its side: make a new one.
            self.handshake_requested = true;
            ctx.events.push_back(Event::PeerDead { peer: self.id });
        }
        self.drive_handshake(ctx, now);
    }

    fn expire_sessions(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let config = ctx.config;
        let reject = config.reject_after_time;
        if self
            .current
            .as_ref()
            .is_some_and(|s| now - s.created >= reject)
        {
            Self::drop_session(ctx, self.current.take());
        }
        let expired = |s: &Session| {
            now - s.created >= reject
                || s.retired
                    .is_some_and(|r| now - r >= config.previous_session_grace)
        };
        while let Some(i) = self.others.iter().position(expired) {
            let s = self.others.swap_remove(i);
            ctx.indices.remove(&s.local_index);
        }
    }

    /// Starts, retries or ends the series of initiations as needed.
    fn drive_handshake(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let config = ctx.config;
        if self.addr.is_none() {
            return;
        }
        if !self.wants_handshake(now, config) {
            if self.series_start.take().is_some() {
                self.next_attempt = None;
                if let Some(i) = self.initiation.take() {
                    ctx.indices.remove(&i.local_index);
                }
            }
            return;
        }
        match self.series_start {
            None => {
                self.series_start = Some(now);
                self.start_initiation(ctx, now);
            }
            Some(start) => {
                if self.next_attempt.is_none_or(|t| now >= t) {
                    if now - start >= config.handshake_timeout {
                        ctx.stats.handshake_timeouts += 1;
                        ctx.events.push_back(Event::HandshakeFailed {
                            peer: Some(self.id),
                            remote: self.addr,
                            error: HandshakeError::Timeout,
                        });
                        self.series_start = Some(now);
                    }
                    self.start_initiation(ctx, now);
                }
            }
        }
    }

    fn start_initiation(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let config = ctx.config;
        let Some(dest) = self.addr else {
            return;
        };
        if let Some(old) = self.initiation.take() {
            ctx.indices.remove(&old.local_index);
        }
        // Retry with up to 1/8 jitter so that peers do not stay in lockstep.
        let jitter_us = crate::time::duration_micros(config.handshake_retry_interval) / 8;
        let jitter = if jitter_us > 0 {
            ctx.rng.next_u64() % jitter_us
        } else {
            0
        };
        self.next_attempt =
            Some(now + config.handshake_retry_interval + std::time::Duration::from_micros(jitter));
        let seed = ctx.seed();
        let Ok(mut hs) = noise::initiator(ctx.local.private(), &self.public_key, &self.psk, seed)
        else {
            ctx.stats.handshake_failed += 1;
            return;
        };
        let local_index = ctx.alloc_index(self.id);
        let mut pkt = vec![0u8; HANDSHAKE_INIT_LEN];
        let mut view = HandshakeInit::new_unchecked(&mut pkt[..]);
        HandshakeInitRepr {
            sender_index: local_index,
        }
        .emit(&mut view);
        let mut payload = [0u8; INIT_PAYLOAD_LEN];
        let timestamp = ctx.clock.next(now);
        payload[..8].copy_from_slice(&timestamp.to_le_bytes());
        payload[8..].copy_from_slice(&ctx.instance.to_le_bytes());
        if hs.write_message(&payload, view.noise_mut()).is_err() {
            ctx.indices.remove(&local_index);
            ctx.stats.handshake_failed += 1;
            return;
        }
        let mac = noise::mac1(&self.mac1_key, view.mac_input());
        view.mac1_mut().copy_from_slice(&mac);
        if let Some(c) = self.cookie
            && now - c.received < COOKIE_LIFETIME
        {
            let mac2 = cookie::mac2(&c.value, view.mac2_input());
            view.mac2_mut().copy_from_slice(&mac2);
        }
        self.tx_handshake.push_back((dest, pkt.clone()));
        self.initiation = Some(Initiation {
            hs,
            local_index,
            packet: pkt,
            resent_with_cookie: false,
            failed_responses: 0,
            timestamp,
        });
        ctx.stats.handshake_initiated += 1;
    }

    /// A cookie reply addressed to one of our indices of this peer: the peer is under load
    /// and wants `mac2` on our initiations. The pending one is sent again with it at once.
    pub(crate) fn on_cookie_reply(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        repr: CookieReplyRepr,
        reply: &CookieReply<&[u8]>,
    ) {
        let Some(init) = pending_initiation(&mut self.initiation, repr.receiver_index) else {
            ctx.stats.rx_unknown_session += 1;
            return;
        };
        let mut view = HandshakeInit::new_unchecked(&mut init.packet[..]);
        let Some(value) = cookie::open_reply(&self.cookie_key, view.mac1(), reply) else {
            ctx.stats.rx_auth_failed += 1;
            return;
        };
        ctx.stats.cookie_replies_received += 1;
        self.cookie = Some(Cookie {
            value,
            received: now,
        });
        if let Some(dest) = self.addr
            && !init.resent_with_cookie
        {
            init.resent_with_cookie = true;
            let mac2 = cookie::mac2(&value, view.mac2_input());
            view.mac2_mut().copy_from_slice(&mac2);
            self.tx_handshake.push_back((dest, init.packet.clone()));
        }
    }

    // ---------------------------------------------------------------- handshake input

    /// A verified initiation from this peer (`hs` has read message 1).
    pub(crate) fn on_initiation(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        from: SocketAddr,
        mut hs: HandshakeState,
        init: InitiationInfo,
    ) {
        let InitiationInfo {
            sender_index,
            timestamp,
            remote_instance,
        } = init;
        // A timestamp far ahead of our clock is refused, and not remembered: a peer whose
        // clock ran ahead must not lock itself out once its clock is corrected.
        let limit = now
            .as_micros()
            .saturating_add(crate::time::duration_micros(ctx.config.max_clock_ahead));
        if timestamp > limit {
            ctx.stats.handshake_clock_ahead += 1;
            ctx.events.push_back(Event::HandshakeFailed {
                peer: Some(self.id),
                remote: Some(from),
                error: HandshakeError::ClockAhead {
                    ahead_s: (timestamp - now.as_micros()) / 1_000_000,
                },
            });
            return;
        }
        if self
            .last_init_timestamp
            .is_some_and(|last| timestamp <= last)
        {
            ctx.stats.handshake_replayed += 1;
            ctx.events.push_back(Event::HandshakeFailed {
                peer: Some(self.id),
                remote: Some(from),
                error: HandshakeError::Replayed,
            });
            return;
        }
        if hs.set_psk(noise::PSK_POSITION.into(), &self.psk).is_err() {
            ctx.stats.handshake_failed += 1;
            return;
        }
        let local_index = ctx.alloc_index(self.id);
        let mut pkt = vec![0u8; HANDSHAKE_RESPONSE_LEN];
        let mut view = HandshakeResponse::new_unchecked(&mut pkt[..]);
        HandshakeResponseRepr {
            sender_index: local_index,
            receiver_index: sender_index,
        }
        .emit(&mut view);
        if hs
            .write_message(&ctx.instance.to_le_bytes(), view.noise_mut())
            .is_err()
            || !hs.is_handshake_finished()
        {
            ctx.indices.remove(&local_index);
            ctx.stats.handshake_failed += 1;
            return;
        }
        let mac = noise::mac1(&self.mac1_key, view.mac_input());
        view.mac1_mut().copy_from_slice(&mac);
        let (i2r, r2i) = hs.dangerously_get_raw_split();
        let session = Session {
            local_index,
            remote_index: sender_index,
            send: ctx.config.aead.key(&r2i),
            recv: ctx.config.aead.key(&i2r),
            send_counter: 0,
            replay: ReplayWindow::new(),
            created: now,
            initiator: false,
            remote_instance,
            retired: None,
            confirmed: false,
        };
        self.push_other(ctx, session);
        self.last_init_timestamp = Some(timestamp);
        // Answer where the initiation came from, but do not move `addr` there: the
        // initiation may be a replay of one never delivered, sent from elsewhere. The address
        // moves when an authenticated record arrives from there (`on_data`).
        self.tx_handshake.push_back((from, pkt));
    }

    /// A response with a valid `mac1` addressed to one of our indices of this peer.
    pub(crate) fn on_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        from: SocketAddr,
        repr: HandshakeResponseRepr,
        noise_msg: &[u8],
    ) {
        let Some(pending) = pending_initiation(&mut self.initiation, repr.receiver_index) else {
            ctx.stats.rx_unknown_session += 1;
            return;
        };
        if pending.failed_responses >= MAX_FAILED_RESPONSES {
            ctx.stats.handshake_failed += 1;
            return;
        }
        let mut payload = [0u8; 64];
        let read = pending.hs.read_message(noise_msg, &mut payload);
        if read.is_err() {
            // A forged or corrupted response (or a PSK mismatch). snow restores its
            // symmetric state when a read fails, so the initiation stays pending for the
            // genuine response: an injector cannot abort our handshakes this way (and,
            // past `MAX_FAILED_RESPONSES`, cannot make us do a DH per packet either).
            pending.failed_responses += 1;
            ctx.stats.handshake_failed += 1;
            if pending.failed_responses == 1 {
                ctx.events.push_back(Event::HandshakeFailed {
                    peer: Some(self.id),
                    remote: Some(from),
                    error: HandshakeError::ResponseAuthentication,
                });
            }
            return;
        }
        let Some(mut init) = self.initiation.take() else {
            return;
        };
        if !(matches!(read, Ok(RESPONSE_PAYLOAD_LEN)) && init.hs.is_handshake_finished()) {
            // It authenticated but is not what we sent for (cannot happen with the fixed
            // message length); the state has moved on, so this initiation is spent.
            ctx.indices.remove(&init.local_index);
            ctx.stats.handshake_failed += 1;
            return;
        }
        let mut inst = [0u8; 8];
        inst.copy_from_slice(&payload[..8]);
        let (i2r, r2i) = init.hs.dangerously_get_raw_split();
        let session = Session {
            local_index: init.local_index,
            remote_index: repr.sender_index,
            send: ctx.config.aead.key(&i2r),
            recv: ctx.config.aead.key(&r2i),
            send_counter: 0,
            replay: ReplayWindow::new(),
            created: now,
            initiator: true,
            remote_instance: u64::from_le_bytes(inst),
            retired: None,
            confirmed: true,
        };
        self.addr = Some(from);
        ctx.clock.accepted = ctx.clock.accepted.max(init.timestamp);
        self.establish(ctx, now, session);
        self.confirm_pending = true;
        self.series_start = None;
        self.next_attempt = None;
    }

    /// Keeps `s` for receiving, evicting the oldest beyond [`MAX_OTHER_SESSIONS`].
    fn push_other(&mut self, ctx: &mut Ctx<'_>, s: Session) {
        self.others.push(s);
        while self.others.len() > MAX_OTHER_SESSIONS {
            let Some((i, _)) = self
                .others
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.created)
            else {
                break;
            };
            let old = self.others.swap_remove(i);
            ctx.indices.remove(&old.local_index);
        }
    }

    /// A handshake completed and both sides have `s` (confirmed): use it if it is newer.
    fn establish(&mut self, ctx: &mut Ctx<'_>, now: Instant, s: Session) {
        if self
            .remote_instance
            .is_some_and(|old| old != s.remote_instance)
        {
            // The peer restarted: its old sessions and channel state are gone.
            Self::drop_session(ctx, self.current.take());
            for o in std::mem::take(&mut self.others) {
                ctx.indices.remove(&o.local_index);
            }
            self.reliable = Reliable::new(&reliable_params(ctx.config));
            // It may be another version now: one datagram per record until it says.
            self.packs_datagrams = false;
            self.heartbeat_due = true;
            ctx.events.push_back(Event::PeerRestarted { peer: self.id });
        }
        self.remote_instance = Some(s.remote_instance);
        self.handshake_requested = false;
        self.sessions_established += 1;
        ctx.stats.handshake_completed += 1;
        ctx.events
            .push_back(Event::HandshakeCompleted { peer: self.id });
        if self.current.as_ref().is_none_or(|c| s.created > c.created) {
            if let Some(mut old) = self.current.replace(s) {
                old.retired = Some(now);
                self.push_other(ctx, old);
            }
        } else {
            self.push_other(ctx, s);
        }
    }

    // ---------------------------------------------------------------- records in

    fn slot_of(&self, index: u32) -> Option<Slot> {
        if self
            .current
            .as_ref()
            .is_some_and(|s| s.local_index == index)
        {
            return Some(Slot::Current);
        }
        self.others
            .iter()
            .position(|s| s.local_index == index)
            .map(Slot::Other)
    }

    /// A record addressed to one of this peer's indices. Returns where the record's frames
    /// are inside `buf` and how many DATAGRAM frames they hold, if any.
    pub(crate) fn on_data(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
        repr: DataRepr,
    ) -> Option<(Range<usize>, usize)> {
        let config = ctx.config;
        let Some(slot) = self.slot_of(repr.receiver_index) else {
            ctx.stats.rx_unknown_session += 1;
            return None;
        };
        let session = match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Other(i) => self.others.get_mut(i),
        }?;
        if now - session.created >= config.reject_after_time {
            ctx.stats.rx_unknown_session += 1;
            return None;
        }
        if repr.counter >= config.reject_after_messages {
            ctx.stats.rx_too_old += 1;
            return None;
        }
        match session.replay.check(repr.counter) {
            Ok(()) => {}
            Err(ReplayError::Replayed) => {
                ctx.stats.rx_replayed += 1;
                return None;
            }
            Err(ReplayError::TooOld) => {
                ctx.stats.rx_too_old += 1;
                return None;
            }
        }
        let mut packet = DataPacket::new_unchecked(&mut *buf);
        let (aad, body) = packet.split_mut();
        let Ok(n) = session.recv.open_in_place(repr.counter, aad, body) else {
            ctx.stats.rx_auth_failed += 1;
            return None;
        };
        // Cannot fail: checked above and nothing ran in between.
        let _ = session.replay.update(repr.counter);
        ctx.stats.rx_records += 1;
        self.rx_records += 1;
        self.rx_bytes += buf.len() as u64;
        self.addr = Some(from);
        if let Slot::Other(i) = slot
            && !self.others[i].confirmed
        {
            let mut s = self.others.swap_remove(i);
            s.confirmed = true;
            self.establish(ctx, now, s);
        }
        let plain = &buf[DATA_HEADER_LEN..DATA_HEADER_LEN + n];
        self.process_record(ctx, now, plain)
            .map(|(r, n)| (r.start + DATA_HEADER_LEN..r.end + DATA_HEADER_LEN, n))
    }

    /// The frames of a decrypted record: where they are in `plain` and how many DATAGRAM
    /// frames they hold, if they hold any.
    fn process_record(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        plain: &[u8],
    ) -> Option<(Range<usize>, usize)> {
        let Ok((pn, start)) = parse_record_header(plain) else {
            ctx.stats.rx_bad_frames += 1;
            return None;
        };
        let frames = Frames::new(&plain[start..]);
        let mut eliciting = false;
        let mut immediate = false;
        let mut refused = false;
        let mut bad = false;
        let mut datagrams = 0;
        let mut messages = Vec::new();
        for frame in frames {
            let Ok(frame) = frame else {
                bad = true;
                break;
            };
            eliciting |= frame.is_ack_eliciting();
            immediate |= frame == Frame::Ping;
            match frame {
                Frame::Ack(ack) => self.reliable.on_ack(&ack, now),
                Frame::Stream { offset, data } => {
                    refused |= self
                        .reliable
                        .on_stream(offset, data, &mut messages)
                        .is_err();
                }
                Frame::Window(limit) => self.reliable.send.on_window(limit),
                Frame::Datagram(_) => {
                    datagrams += 1;
                    // We did not say we take several: the peer is broken.
                    bad |= datagrams > 1 && !ctx.config.pack_datagrams;
                }
                Frame::Heartbeat(report) => self.on_heartbeat(ctx, now, report),
                Frame::Padding | Frame::Ping => {}
            }
        }
        if bad {
            ctx.stats.rx_bad_frames += 1;
        } else if !refused {
            self.reliable
                .on_packet_received(pn, eliciting, immediate, now);
        }
        for data in messages {
            ctx.stats.messages_received += 1;
            ctx.events.push_back(Event::Message {
                peer: self.id,
                data,
            });
        }
        if bad || datagrams == 0 {
            return None;
        }
        ctx.stats.datagrams_received += datagrams as u64;
        Some((start..plain.len(), datagrams))
    }

    fn on_heartbeat(&mut self, ctx: &mut Ctx<'_>, now: Instant, report: &[u8]) {
        ctx.stats.heartbeats_received += 1;
        self.last_heartbeat_rx = now;
        if self.liveness != Liveness::Alive {
            self.liveness = Liveness::Alive;
            ctx.events.push_back(Event::PeerAlive { peer: self.id });
        }
        self.packs_datagrams = load::features(report) & load::FEATURE_PACKED_DATAGRAMS != 0;
        match LoadReport::decode(report) {
            Ok(report) => ctx.events.push_back(Event::LoadReport {
                peer: self.id,
                report,
            }),
            Err(_) => ctx.stats.rx_bad_frames += 1,
        }
    }

    // ---------------------------------------------------------------- application input

    pub(crate) fn send_message(&mut self, msg: &[u8]) -> bool {
        self.reliable.send.write_message(msg)
    }

    pub(crate) fn queue_datagram(&mut self, data: &[u8], limit: usize) -> bool {
        if self.datagrams.len() >= limit {
            return false;
        }
        self.datagrams.push_back(data);
        true
    }

    // ---------------------------------------------------------------- output

    fn wants_to_send(&self, now: Instant) -> bool {
        self.confirm_pending
            || self.heartbeat_due
            || !self.datagrams.is_empty()
            || self.reliable.ack_due(now)
            || self.reliable.window_due()
            || self.reliable.can_send_stream()
            || self.reliable.probe_due()
    }

    /// The next datagram for this peer, written into `buf`.
    pub(crate) fn poll_transmit(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        buf: &mut [u8],
    ) -> Option<(SocketAddr, usize)> {
        let sent = self.next_transmit(ctx, now, buf)?;
        self.tx_packets += 1;
        self.tx_bytes += sent.1 as u64;
        Some(sent)
    }

    fn next_transmit(
        &mut self,
        ctx: &mut Ctx<'_>,
        now: Instant,
        buf: &mut [u8],
    ) -> Option<(SocketAddr, usize)> {
        self.drive_handshake(ctx, now);
        while let Some((dest, pkt)) = self.tx_handshake.pop_front() {
            if let Some(dst) = buf.get_mut(..pkt.len()) {
                dst.copy_from_slice(&pkt);
                return Some((dest, pkt.len()));
            }
        }
        let addr = self.addr?;
        if !self.has_usable_session(now, ctx.config) || !self.wants_to_send(now) {
            return None;
        }
        self.build_record(ctx, now, buf).map(|n| (addr, n))
    }

    /// Writes up to `most` queued datagrams, in order, while they fit; returns the bytes
    /// their frames took.
    fn write_datagrams(&mut self, ctx: &mut Ctx<'_>, w: &mut Writer<'_>, most: usize) -> usize {
        let (mut wrote, start) = (0, w.position());
        while wrote < most {
            let Some(d) = self.datagrams.front() else {
                break;
            };
            let frame = Frame::Datagram(d);
            if frame.encoded_len() > w.remaining() || frame.emit(w).is_err() {
                break;
            }
            self.datagrams.pop_front();
            wrote += 1;
        }
        ctx.stats.datagrams_sent += wrote as u64;
        w.position() - start
    }

    /// Seals `plain` as a record with the current session (see `Endpoint::seal_raw_record`).
    pub(crate) fn seal_raw(&mut self, plain: &[u8], buf: &mut [u8]) -> Option<usize> {
        let total = DataRepr::buffer_len(plain.len());
        let out = buf.get_mut(..total)?;
        let session = self.current.as_mut()?;
        let counter = session.send_counter;
        session.send_counter += 1;
        out[DATA_HEADER_LEN..DATA_HEADER_LEN + plain.len()].copy_from_slice(plain);
        let mut packet = DataPacket::new_unchecked(out);
        DataRepr {
            receiver_index: session.remote_index,
            counter,
        }
        .emit(&mut packet);
        let (aad, body) = packet.split_mut();
        session.send.seal_in_place(counter, aad, body).ok()?;
        Some(total)
    }

    fn build_record(&mut self, ctx: &mut Ctx<'_>, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let max = buf.len().min(ctx.config.max_udp_payload);
        if max < DATA_HEADER_LEN + TAG_LEN + 32 {
            return None;
        }
        let body_end = max - TAG_LEN;
        let stream_ready = self.reliable.can_send_stream();
        let datagram_first = !(self.datagrams.is_empty() || self.prefer_stream && stream_ready);
        if stream_ready && !self.datagrams.is_empty() {
            self.prefer_stream = !self.prefer_stream;
        }
        let mut eliciting = false;
        let mut stream = Vec::new();
        let mut window = None;
        let mut wrote_anything = false;
        let mut datagram_bytes = 0;
        let plain_len = {
            let mut w = Writer::new(&mut buf[DATA_HEADER_LEN..body_end]);
            w.varint(self.reliable.next_pn()).ok()?;
            if datagram_first {
                datagram_bytes += self.write_datagrams(ctx, &mut w, 1);
            }
            if self.reliable.window_due() {
                let limit = self.reliable.window_limit();
                let f = Frame::Window(limit);
                if f.encoded_len() <= w.remaining() && f.emit(&mut w).is_ok() {
                    window = Some(limit);
                    eliciting = true;
                }
            }
            if self.heartbeat_due {
                let f = Frame::Heartbeat(ctx.heartbeat);
                if f.encoded_len() <= w.remaining() && f.emit(&mut w).is_ok() {
                    self.heartbeat_due = false;
                    wrote_anything = true;
                    ctx.stats.heartbeats_sent += 1;
                }
            }
            if let Some(ack) = self.reliable.ack_frame(now)
                && ack.encoded_len() <= w.remaining()
                && Frame::Ack(ack).emit(&mut w).is_ok()
            {
                self.reliable.on_ack_sent();
                wrote_anything = true;
            }
            if stream_ready {
                loop {
                    // One byte stays free for a PING.
                    let rem = w.remaining().saturating_sub(1);
                    let header = 1 + 8 + varint_len(rem as u64);
                    if rem <= header + 16 {
                        break;
                    }
                    let Some((r, _)) = self.reliable.next_chunk(rem - header) else {
                        break;
                    };
                    let len = (r.end - r.start) as usize;
                    let ok = w.u8(FrameType::Stream.into()).is_ok()
                        && w.varint(r.start).is_ok()
                        && w.varint(len as u64).is_ok();
                    match w.take(len) {
                        Ok(dst) if ok => self.reliable.send.copy(r.clone(), dst),
                        // Sized above, so unreachable; give the range back if it happens.
                        _ => {
                            self.reliable.send.on_lost(r);
                            break;
                        }
                    }
                    stream.push(r);
                    eliciting = true;
                }
            }
            // Ask for an ACK at once when this packet is a probe or the last one the
            // window allows, so that no delayed ACK holds the transfer up.
            let ping = if eliciting {
                self.reliable.wants_immediate_ack(max as u64)
            } else {
                self.reliable.probe_due()
            };
            if ping && Frame::Ping.emit(&mut w).is_ok() {
                eliciting = true;
            }
            // Beyond the first, datagrams come after the control frames and the stream, so
            // that a run of them never crowds those out; they take the rest of the record.
            let packs = self.packs_datagrams && ctx.config.pack_datagrams;
            let more = match (packs, datagram_first) {
                (true, _) => usize::MAX,
                (false, true) => 0,
                (false, false) => 1,
            };
            datagram_bytes += self.write_datagrams(ctx, &mut w, more);
            wrote_anything |= datagram_bytes > 0;
            w.position()
        };
        if !(wrote_anything || eliciting || self.confirm_pending) {
            return None;
        }
        let session = self.current.as_mut()?;
        let counter = session.send_counter;
        session.send_counter += 1;
        let total = DataRepr::buffer_len(plain_len);
        let mut packet = DataPacket::new_unchecked(&mut buf[..total]);
        DataRepr {
            receiver_index: session.remote_index,
            counter,
        }
        .emit(&mut packet);
        let (aad, body) = packet.split_mut();
        session.send.seal_in_place(counter, aad, body).ok()?;
        self.confirm_pending = false;
        self.reliable
            // Datagrams are not congestion-controlled: an ack-eliciting record counts in
            // flight without the datagrams it carries along.
            .on_packet_sent(
                now,
                (total - datagram_bytes) as u64,
                stream,
                window,
                eliciting,
            );
        Some(total)
    }
}
