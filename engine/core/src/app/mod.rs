//! Built-in applications, sans-IO.
//!
//! An [`App`] serves one TCP connection. It never touches a socket: the engine offers it the bytes
//! the client sent ([`App::handle_recv`]) and asks it for bytes to send ([`App::poll_send`]), reading
//! and writing smoltcp's socket buffers in place. Because an app may consume fewer bytes than
//! offered, and only produces output when the socket has room, a client that never reads cannot make
//! the node buffer without bound: every app keeps its own buffers bounded (see [`MAX_APP_BUFFER`]).
//!
//! Apps move with their connections: [`App::snapshot`] serialises the whole state to bytes and
//! [`restore`] rebuilds it on another node.
//!
//! The apps:
//! - [`EchoApp`] returns every byte;
//! - [`SourceApp`] sends the [counting stream](counting), forever or a fixed number of bytes;
//! - [`SinkApp`] discards input and reports its length and CRC-32 when the client half-closes;
//! - [`HttpApp`] is an HTTP/1.1 server (`GET /bytes/N`, `POST /upload`, `GET /health`).
//!
//! # Snapshot format
//!
//! A snapshot is one version byte ([`SNAPSHOT_VERSION`]) followed by the app's state encoded with
//! postcard. [`restore`] checks the version, rejects trailing bytes, and checks the state's
//! invariants (e.g. no buffer above [`MAX_APP_BUFFER`]), so hostile bytes give an
//! [`AppError`], never a panic or an unbounded allocation.

pub mod counting;
mod echo;
mod http;
mod sink;
mod source;

pub use echo::EchoApp;
pub use http::{HttpApp, MAX_HEAD_SIZE, MAX_PENDING_RESPONSES};
pub use sink::SinkApp;
pub use source::SourceApp;

/// Upper bound, in bytes, on what any built-in app holds in its own buffers.
pub const MAX_APP_BUFFER: usize = 64 * 1024;

/// Version byte that starts every app snapshot.
pub const SNAPSHOT_VERSION: u8 = 1;

/// Which built-in application serves a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// Returns every byte.
    Echo,
    /// HTTP/1.1 server (`/bytes/N`, `/upload`, `/health`).
    Http,
    /// Discards, then reports `<bytes> <crc32>` when the client half-closes.
    Sink,
    /// Sends the counting stream.
    Source,
}

impl AppKind {
    /// Every kind.
    pub const ALL: [AppKind; 4] = [AppKind::Echo, AppKind::Http, AppKind::Sink, AppKind::Source];

    /// The kind's number in snapshots and migration offers (stable across versions).
    pub fn code(self) -> u8 {
        match self {
            AppKind::Echo => 1,
            AppKind::Http => 2,
            AppKind::Sink => 3,
            AppKind::Source => 4,
        }
    }

    /// The kind numbered `code`, if this build knows it.
    pub fn from_code(code: u8) -> Option<AppKind> {
        AppKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// Per-service app settings from the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppConfig {
    /// For `source`: send this many bytes then FIN; `None` sends forever.
    pub bytes: Option<u64>,
}

/// Errors from restoring an app from a snapshot.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AppError {
    /// The snapshot bytes do not decode as this app's state.
    #[error("malformed {kind:?} app snapshot: {reason}")]
    MalformedSnapshot {
        /// The app the snapshot was for.
        kind: AppKind,
        /// What was wrong.
        reason: String,
    },
}

/// One connection's application, driven by the engine.
///
/// Call order per engine turn: [`handle_recv`](App::handle_recv) while the socket has data and the
/// app consumes some, [`handle_recv_fin`](App::handle_recv_fin) once after the client's FIN when
/// all its data was consumed, then [`poll_send`](App::poll_send) while the socket has room and the
/// app produces bytes; when `poll_send` returns 0 and [`wants_close`](App::wants_close) is true, the
/// engine closes the sending half.
pub trait App: Send {
    /// Which app this is.
    fn kind(&self) -> AppKind;

    /// Offers bytes the client sent. Returns how many were consumed (`0..=data.len()`); the rest
    /// stays in the socket's receive buffer and is offered again later, which closes the client's
    /// window when the app does not keep up.
    fn handle_recv(&mut self, data: &[u8]) -> usize;

    /// The client closed its sending half and every byte before the FIN was consumed.
    fn handle_recv_fin(&mut self);

    /// Writes bytes to send to the client into `buf`; returns how many (`0..=buf.len()`).
    fn poll_send(&mut self, buf: &mut [u8]) -> usize;

    /// [`poll_send`](App::poll_send), also marking in `runs` which of the bytes written are the
    /// [counting stream](counting): the engine's send mirror then keeps their offset instead of
    /// a copy, and regenerates them if the connection moves. A marked run MUST be exactly the
    /// counting stream from its offset; unmarked bytes are copied. The default marks nothing,
    /// which is right for any app.
    fn poll_send_marked(&mut self, buf: &mut [u8], _runs: &mut counting::Runs) -> usize {
        self.poll_send(buf)
    }

    /// True once the app has nothing more to send, ever: the engine sends FIN.
    fn wants_close(&self) -> bool;

    /// True when the connection can be moved without splitting an application exchange
    /// (no partial request parsed, no response half sent).
    fn is_quiescent(&self) -> bool;

    /// True while part of a request head has arrived and its end has not (the engine gives
    /// heads a deadline: [`crate::config::ServiceConfig::head_timeout`]).
    fn in_request_head(&self) -> bool {
        false
    }

    /// Serialises the app's whole state (see [`restore`]).
    fn snapshot(&self) -> Vec<u8>;

    /// Gives back memory kept from busier times (buffer capacity beyond what is held): the
    /// connection is idle. State is unchanged.
    fn shrink(&mut self) {}
}

/// Creates a fresh app of `kind`.
pub fn new_app(kind: AppKind, config: &AppConfig) -> Box<dyn App> {
    match kind {
        AppKind::Echo => Box::new(EchoApp::new()),
        AppKind::Http => Box::new(HttpApp::new()),
        AppKind::Sink => Box::new(SinkApp::new()),
        AppKind::Source => Box::new(SourceApp::new(config.bytes)),
    }
}

/// Rebuilds an app of `kind` from [`App::snapshot`] bytes. Hostile bytes give an error, never a panic.
pub fn restore(kind: AppKind, snapshot: &[u8]) -> Result<Box<dyn App>, AppError> {
    Ok(match kind {
        AppKind::Echo => Box::new(EchoApp::from_snapshot(snapshot)?),
        AppKind::Http => Box::new(HttpApp::from_snapshot(snapshot)?),
        AppKind::Sink => Box::new(SinkApp::from_snapshot(snapshot)?),
        AppKind::Source => Box::new(SourceApp::from_snapshot(snapshot)?),
    })
}

/// Encodes `state` as a snapshot: [`SNAPSHOT_VERSION`], then postcard.
fn encode_snapshot<T: serde::Serialize>(state: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(SNAPSHOT_VERSION);
    // Postcard only fails on sequences of unknown length or a full fixed buffer; app states have
    // neither and a `Vec` grows.
    postcard::to_extend(state, out).expect("app state serialises to a Vec")
}

/// Decodes a snapshot made by [`encode_snapshot`], rejecting other versions and trailing bytes.
///
/// The caller still has to check the state's invariants.
fn decode_snapshot<T: serde::de::DeserializeOwned>(
    kind: AppKind,
    snapshot: &[u8],
) -> Result<T, AppError> {
    let Some((&version, body)) = snapshot.split_first() else {
        return Err(malformed(kind, "empty snapshot"));
    };
    if version != SNAPSHOT_VERSION {
        return Err(malformed(
            kind,
            format!("unsupported snapshot version {version}"),
        ));
    }
    let (state, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| malformed(kind, e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(kind, format!("{} trailing bytes", rest.len())));
    }
    Ok(state)
}

/// Builds [`AppError::MalformedSnapshot`].
fn malformed(kind: AppKind, reason: impl Into<String>) -> AppError {
    AppError::MalformedSnapshot {
        kind,
        reason: reason.into(),
    }
}

/// Continues the CRC-32 (IEEE, as zlib) `crc` of some bytes over `data`.
fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(crc);
    hasher.update(data);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
    pub(super) struct XorShift(u64);

    impl XorShift {
        /// A generator from `seed` (any value).
        pub(super) fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }

        /// The next number.
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A number below `n` (`n > 0`).
        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// `len` pseudo-random bytes from `seed`.
    pub(super) fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = XorShift::new(seed);
        (0..len).map(|_| rng.next() as u8).collect()
    }

    /// A scripted client driving an app the way the engine does, one engine turn at a time.
    #[derive(Debug, Clone)]
    pub(super) struct Peer {
        /// Everything the client sends.
        pub(super) input: Vec<u8>,
        /// How much of `input` the app consumed.
        pos: usize,
        /// The client half-closes after `input`.
        pub(super) fin: bool,
        /// `handle_recv_fin` was called.
        fin_delivered: bool,
        /// Most bytes offered per turn (the socket's receive queue).
        pub(super) recv_chunk: usize,
        /// Room per turn in the socket's send buffer.
        pub(super) send_chunk: usize,
        /// Stop once this much output arrived (for apps that send forever).
        pub(super) max_output: usize,
        /// Everything the app sent.
        pub(super) output: Vec<u8>,
        /// The app asked to close and the engine sent FIN.
        pub(super) closed: bool,
        /// Turns run.
        pub(super) turns: usize,
    }

    impl Peer {
        /// A client that sends `input` (then FIN if `fin`).
        pub(super) fn new(input: Vec<u8>, fin: bool, recv_chunk: usize, send_chunk: usize) -> Self {
            Self {
                input,
                pos: 0,
                fin,
                fin_delivered: false,
                recv_chunk,
                send_chunk,
                max_output: usize::MAX,
                output: Vec::new(),
                closed: false,
                turns: 0,
            }
        }

        /// Input bytes the app consumed.
        pub(super) fn consumed(&self) -> usize {
            self.pos
        }

        /// One engine turn; returns whether anything happened.
        pub(super) fn turn(&mut self, app: &mut dyn App) -> bool {
            self.turns += 1;
            let mut progress = false;
            // The socket offers at most `recv_chunk` bytes per turn, in up to two calls (as a
            // ring buffer would), until the app stops consuming.
            let mut offered = 0;
            while self.pos < self.input.len() && offered < self.recv_chunk {
                let end = self
                    .input
                    .len()
                    .min(self.pos + (self.recv_chunk - offered).div_ceil(2));
                let n = app.handle_recv(&self.input[self.pos..end]);
                assert!(n <= end - self.pos, "consumed more than offered");
                if n == 0 {
                    break;
                }
                self.pos += n;
                offered += n;
                progress = true;
            }
            if self.fin && !self.fin_delivered && self.pos == self.input.len() {
                app.handle_recv_fin();
                self.fin_delivered = true;
                progress = true;
            }
            let mut buf = vec![0u8; self.send_chunk];
            let mut filled = 0;
            while filled < buf.len() {
                let mut runs = counting::Runs::default();
                let n = app.poll_send_marked(&mut buf[filled..], &mut runs);
                assert!(n <= buf.len() - filled, "wrote more than the room");
                assert_eq!(runs.check(&buf[filled..filled + n]), Ok(()));
                assert!(!self.closed || n == 0, "sent after close");
                if n == 0 {
                    break;
                }
                filled += n;
            }
            self.output.extend_from_slice(&buf[..filled]);
            progress |= filled > 0;
            if filled < buf.len() && app.wants_close() && !self.closed {
                self.closed = true;
                progress = true;
            }
            progress
        }

        /// Runs turns until nothing happens or `max_output` is reached.
        pub(super) fn run(&mut self, app: &mut dyn App) {
            while self.output.len() < self.max_output && self.turn(app) {}
        }
    }

    /// Runs `peer` against a fresh app without interruption, then again with the app snapshotted
    /// and restored after each of many turn counts; every run must give the same output and end.
    pub(super) fn check_continuation(kind: AppKind, make: &dyn Fn() -> Box<dyn App>, peer: &Peer) {
        let mut reference = peer.clone();
        let mut app = make();
        reference.run(app.as_mut());
        let step = (reference.turns / 150).max(1);
        let mut stop = 0;
        while stop <= reference.turns {
            let mut app = make();
            let mut client = peer.clone();
            for _ in 0..stop {
                client.turn(app.as_mut());
            }
            let snapshot = app.snapshot();
            let mut restored = restore(kind, &snapshot)
                .unwrap_or_else(|e| panic!("restore after {stop} turns: {e}"));
            assert_eq!(restored.kind(), kind);
            assert_eq!(
                restored.snapshot(),
                snapshot,
                "snapshot round trip after {stop} turns"
            );
            assert_eq!(restored.is_quiescent(), app.is_quiescent());
            assert_eq!(restored.wants_close(), app.wants_close());
            drop(app);
            client.run(restored.as_mut());
            assert!(
                client.output == reference.output,
                "output differs after restore at turn {stop}"
            );
            assert_eq!(
                client.closed, reference.closed,
                "close differs after restore at turn {stop}"
            );
            stop += step;
        }
    }

    const KINDS: [AppKind; 4] = [AppKind::Echo, AppKind::Http, AppKind::Sink, AppKind::Source];

    /// Feeds a restored app a little traffic: whatever it restored to must not panic.
    fn exercise(app: &mut dyn App) {
        let mut peer = Peer::new(b"GET /bytes/100 HTTP/1.1\r\n\r\nxyz".to_vec(), true, 7, 64);
        peer.max_output = 4096;
        peer.run(app);
    }

    #[test]
    fn new_apps_report_their_kind() {
        for kind in KINDS {
            let app = new_app(kind, &AppConfig::default());
            assert_eq!(app.kind(), kind);
            assert!(app.is_quiescent());
            assert!(!app.wants_close());
            let restored = restore(kind, &app.snapshot()).unwrap();
            assert_eq!(restored.kind(), kind);
        }
        let mut source = new_app(AppKind::Source, &AppConfig { bytes: Some(3) });
        let mut buf = [0u8; 8];
        assert_eq!(source.poll_send(&mut buf), 3);
        assert!(source.wants_close());
    }

    #[test]
    fn restore_rejects_bad_framing() {
        for kind in KINDS {
            let good = new_app(kind, &AppConfig::default()).snapshot();
            assert!(restore(kind, &[]).is_err());
            let mut wrong_version = good.clone();
            wrong_version[0] = 2;
            assert!(restore(kind, &wrong_version).is_err());
            let mut trailing = good.clone();
            trailing.push(0);
            assert!(restore(kind, &trailing).is_err());
            let err = restore(kind, &[0]).err().unwrap();
            assert!(matches!(err, AppError::MalformedSnapshot { kind: k, .. } if k == kind));
        }
    }

    #[test]
    fn restore_survives_hostile_bytes() {
        let mut rng = XorShift::new(0xf10f);
        // Real snapshots of apps in assorted states, to mutate.
        let mut seeds: Vec<(AppKind, Vec<u8>)> = Vec::new();
        for kind in KINDS {
            let mut app = new_app(kind, &AppConfig { bytes: Some(1000) });
            let mut peer = Peer::new(
                b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3"
                    .to_vec(),
                false,
                40,
                30,
            );
            peer.max_output = 200;
            for _ in 0..3 {
                peer.turn(app.as_mut());
                seeds.push((kind, app.snapshot()));
            }
        }
        for round in 0..20_000u32 {
            let kind = KINDS[rng.below(4) as usize];
            let bytes = match round % 4 {
                0 => {
                    // Pure garbage, sometimes with the right version byte.
                    let len = rng.below(64) as usize;
                    let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if rng.below(2) == 0 && !bytes.is_empty() {
                        bytes[0] = SNAPSHOT_VERSION;
                    }
                    bytes
                }
                1 => {
                    // A truncated real snapshot.
                    let (_, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
                    seed[..rng.below(seed.len() as u64) as usize].to_vec()
                }
                _ => {
                    // A real snapshot with a few bytes changed.
                    let (_, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
                    let mut bytes = seed.clone();
                    for _ in 0..=rng.below(3) {
                        let i = rng.below(bytes.len() as u64) as usize;
                        bytes[i] = rng.next() as u8;
                    }
                    bytes
                }
            };
            if let Ok(mut app) = restore(kind, &bytes) {
                assert_eq!(app.kind(), kind);
                // A state that decodes and passes the checks must behave.
                if round % 16 == 0 {
                    exercise(app.as_mut());
                }
            }
        }
        for (kind, seed) in &seeds {
            for len in 0..seed.len() {
                assert!(
                    restore(*kind, &seed[..len]).is_err(),
                    "{kind:?} truncated to {len}"
                );
            }
        }
    }
}
