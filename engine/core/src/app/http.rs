//! `http`: a small HTTP/1.1 server with keep-alive and pipelining (see [`HttpApp`]).

use std::collections::VecDeque;
use std::io::Write as _;

use serde::{Deserialize, Serialize};

use super::{
    App, AppError, AppKind, counting, crc32_update, decode_snapshot, encode_snapshot, malformed,
};

/// Largest request head accepted, in bytes, including the empty line that ends it.
pub const MAX_HEAD_SIZE: usize = 8 * 1024;

/// Number of queued responses at which the app stops reading further requests.
pub const MAX_PENDING_RESPONSES: usize = 8;

/// Most header fields in a request head; more gets `431`.
const MAX_HEADERS: usize = 64;

/// Longest chunk-size line (size and extensions) in a chunked body.
const MAX_CHUNK_LINE: u16 = 4096;

/// Most bytes in the trailer section of a chunked body.
const MAX_TRAILER: u16 = 8192;

/// Longest status line, headers and fixed body of one response (checked on restore).
const MAX_RESPONSE_PREFIX: usize = 1024;

/// Body of `GET /health`.
const HEALTH_BODY: &[u8] = b"ok\n";

/// HTTP/1.1 server with keep-alive and pipelining, for one connection.
///
/// Routes:
/// - `GET /bytes/N` (and `HEAD`): `N` bytes of the [counting stream](super::counting) from offset
///   0, generated while sending, so `N` may be far larger than memory;
/// - `POST /upload`: reads the body (`Content-Length` or `Transfer-Encoding: chunked`) and answers
///   `{"bytes": N, "crc32": "xxxxxxxx"}`; a body without either gets `411`;
/// - `GET /health` (and `HEAD`): `200` with the body `ok\n`.
///
/// Other paths get `404`, other methods `405`. Malformed requests get `400`, request heads above
/// [`MAX_HEAD_SIZE`] get `431`, and the connection closes after either. `Expect: 100-continue` is
/// answered with an interim `100 Continue` before the body is read. The connection closes after
/// a response to `Connection: close` (or HTTP/1.0 without keep-alive), and after the client's FIN
/// once every complete request was answered.
///
/// Memory stays bounded whatever the client does: a partial request head is at most
/// [`MAX_HEAD_SIZE`] bytes, bodies are consumed as they arrive, response bodies are generated
/// while sending, and the app stops reading requests while [`MAX_PENDING_RESPONSES`] responses
/// wait to be sent, so a client that pipelines without reading stalls itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpApp {
    /// Start of a request head whose end has not arrived yet. Shorter than [`MAX_HEAD_SIZE`];
    /// empty unless `phase` is [`Phase::Head`]; never starts with CR or LF.
    head: Vec<u8>,
    /// Progress of the search for the end of the head over `head`; [`HeadScan::Text`] when
    /// `head` is empty.
    scan: HeadScan,
    /// What the next request bytes are.
    phase: Phase,
    /// Responses not completely sent, oldest first; at most [`MAX_PENDING_RESPONSES`] + 1.
    responses: VecDeque<Response>,
    /// No further request will be served: input is discarded and the connection closes once
    /// `responses` are sent. `phase` is then [`Phase::Head`] with `head` empty.
    closing: bool,
    /// The client half-closed.
    fin_received: bool,
}

/// What the server expects next from the client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    /// The body of `request`.
    Body {
        /// The request the body belongs to.
        request: Request,
        /// How the body's end is found.
        framing: Framing,
        /// Body bytes received so far (chunked framing excluded).
        bytes: u64,
        /// CRC-32 of those bytes.
        crc: u32,
    },
    /// A request head.
    #[default]
    Head,
}

/// A parsed request, waiting for its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Request {
    /// The request came as HTTP/1.0.
    http10: bool,
    /// The connection stays open after the response.
    keep_alive: bool,
    /// `HEAD`: the response has headers only.
    head_only: bool,
    /// What to answer.
    route: Route,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Route {
    /// `/bytes/N`: this many bytes of the counting stream.
    Bytes(u64),
    /// `/health`.
    Health,
    /// A known path with a method it does not allow.
    MethodNotAllowed(Allow),
    /// An unknown path.
    NotFound,
    /// `/upload`.
    Upload,
}

/// The methods a path allows, for `405` responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Allow {
    /// `GET` and `HEAD`.
    GetHead,
    /// `POST`.
    Post,
}

impl Allow {
    /// The `Allow` header value.
    fn header(self) -> &'static str {
        match self {
            Self::GetHead => "GET, HEAD",
            Self::Post => "POST",
        }
    }
}

/// How the end of a request body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked(ChunkState),
    /// `Content-Length`: this many bytes remain (more than zero).
    Length(u64),
}

/// Where a chunked-body decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum ChunkState {
    /// Inside chunk data: `remaining` more bytes, more than zero.
    Data {
        /// Bytes left in this chunk.
        remaining: u64,
    },
    /// After chunk data: expecting CR.
    DataCr,
    /// After chunk data and CR: expecting LF.
    DataLf,
    /// In a chunk-size line (`1a3f[;ext]`).
    Size {
        /// The size read so far.
        value: u64,
        /// Which part of the line.
        part: SizePart,
        /// Line bytes so far; at most [`MAX_CHUNK_LINE`].
        len: u16,
    },
    /// After a chunk-size line's CR: expecting LF.
    SizeLf {
        /// The chunk size.
        value: u64,
    },
    /// In the trailer section after the last chunk.
    Trailer {
        /// Trailer bytes so far; at most [`MAX_TRAILER`].
        total: u16,
        /// The current line has some bytes.
        line: bool,
    },
    /// In the trailer section after a CR: expecting LF.
    TrailerLf {
        /// Trailer bytes so far; at most [`MAX_TRAILER`].
        total: u16,
        /// The line the CR ends has some bytes (else it ends the body).
        line: bool,
    },
}

/// Part of a chunk-size line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum SizePart {
    /// In the hex digits (at least one read).
    Digits,
    /// In a chunk extension (after `;`).
    Extension,
    /// Before the first digit.
    Start,
    /// In whitespace after the digits.
    Whitespace,
}

/// What [`ChunkState::advance`] did.
struct ChunkStep {
    /// Input bytes used.
    consumed: usize,
    /// Of those, how many (from the start) are body data.
    data: usize,
    /// The body ended.
    done: bool,
}

/// A malformed chunked body.
struct ChunkError;

impl ChunkState {
    /// The state at the start of a chunked body.
    const START: Self = Self::Size {
        value: 0,
        part: SizePart::Start,
        len: 0,
    };

    /// Advances over the start of `data`: either one run of chunk data or framing bytes up to the
    /// next chunk data or the end of the body.
    fn advance(&mut self, data: &[u8]) -> Result<ChunkStep, ChunkError> {
        if let Self::Data { remaining } = self {
            let n = (*remaining).min(data.len() as u64);
            *remaining -= n;
            if *remaining == 0 {
                *self = Self::DataCr;
            }
            // `n` is at most `data.len()`.
            let n = n as usize;
            return Ok(ChunkStep {
                consumed: n,
                data: n,
                done: false,
            });
        }
        for (i, &b) in data.iter().enumerate() {
            let consumed = i + 1;
            match self.framing_byte(b)? {
                true => {
                    return Ok(ChunkStep {
                        consumed,
                        data: 0,
                        done: true,
                    });
                }
                false if matches!(self, Self::Data { .. }) => {
                    return Ok(ChunkStep {
                        consumed,
                        data: 0,
                        done: false,
                    });
                }
                false => {}
            }
        }
        Ok(ChunkStep {
            consumed: data.len(),
            data: 0,
            done: false,
        })
    }

    /// Takes one framing byte (not chunk data); returns whether the body ended.
    fn framing_byte(&mut self, b: u8) -> Result<bool, ChunkError> {
        *self = match *self {
            Self::Data { .. } => return Err(ChunkError),
            Self::DataCr if b == b'\r' => Self::DataLf,
            Self::DataLf if b == b'\n' => Self::START,
            Self::DataCr | Self::DataLf => return Err(ChunkError),
            Self::Size { value, part, len } => {
                if len >= MAX_CHUNK_LINE {
                    return Err(ChunkError);
                }
                let len = len + 1;
                match (part, b) {
                    (SizePart::Start | SizePart::Digits, _) if b.is_ascii_hexdigit() => {
                        let digit = u64::from(hex_value(b));
                        if value > u64::MAX >> 4 {
                            return Err(ChunkError);
                        }
                        Self::Size {
                            value: (value << 4) | digit,
                            part: SizePart::Digits,
                            len,
                        }
                    }
                    (SizePart::Start, _) => return Err(ChunkError),
                    (_, b'\r') => Self::SizeLf { value },
                    (SizePart::Extension, b'\n') => return Err(ChunkError),
                    (SizePart::Extension, _)
                        if b == b'\t' || (b' '..0x7f).contains(&b) || b >= 0x80 =>
                    {
                        Self::Size { value, part, len }
                    }
                    (SizePart::Digits | SizePart::Whitespace, b' ' | b'\t') => Self::Size {
                        value,
                        part: SizePart::Whitespace,
                        len,
                    },
                    (SizePart::Digits | SizePart::Whitespace, b';') => Self::Size {
                        value,
                        part: SizePart::Extension,
                        len,
                    },
                    _ => return Err(ChunkError),
                }
            }
            Self::SizeLf { value } if b == b'\n' => match value {
                0 => Self::Trailer {
                    total: 0,
                    line: false,
                },
                remaining => Self::Data { remaining },
            },
            Self::SizeLf { .. } => return Err(ChunkError),
            Self::Trailer { total, .. } if total >= MAX_TRAILER => return Err(ChunkError),
            Self::Trailer { total, line } => match b {
                b'\r' => Self::TrailerLf {
                    total: total + 1,
                    line,
                },
                b'\n' => return Err(ChunkError),
                _ => Self::Trailer {
                    total: total + 1,
                    line: true,
                },
            },
            Self::TrailerLf { line: false, .. } if b == b'\n' => return Ok(true),
            Self::TrailerLf { total, line: true } if b == b'\n' => {
                Self::Trailer { total, line: false }
            }
            Self::TrailerLf { .. } => return Err(ChunkError),
        };
        Ok(false)
    }

    /// Checks the invariants documented on the fields.
    fn is_valid(&self) -> bool {
        match *self {
            Self::Data { remaining } => remaining > 0,
            Self::Size { value, part, len } => {
                len <= MAX_CHUNK_LINE && (part != SizePart::Start || (value == 0 && len == 0))
            }
            Self::Trailer { total, .. } | Self::TrailerLf { total, .. } => total <= MAX_TRAILER,
            Self::DataCr | Self::DataLf | Self::SizeLf { .. } => true,
        }
    }
}

/// The value of an ASCII hex digit.
fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Search for the empty line that ends a request head, carried across calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum HeadScan {
    /// Just after a line feed: a line starts.
    LineStart,
    /// Just after a line feed and a carriage return.
    LineStartCr,
    /// Inside a line.
    #[default]
    Text,
}

impl HeadScan {
    /// Scans `data`; returns the index just past the empty line that ends the head, if any.
    ///
    /// Lines may end in CRLF or a bare LF, as `httparse` accepts both.
    fn find_end(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            *self = match (*self, b) {
                (Self::LineStart | Self::LineStartCr, b'\n') => {
                    *self = Self::Text;
                    return Some(i + 1);
                }
                (_, b'\n') => Self::LineStart,
                (Self::LineStart, b'\r') => Self::LineStartCr,
                _ => Self::Text,
            };
        }
        None
    }
}

/// A response being sent: a fixed prefix (status line, headers, any fixed body), then optionally
/// a counting-stream body generated while sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Response {
    /// Status line, headers and fixed body; at most [`MAX_RESPONSE_PREFIX`] bytes.
    prefix: Vec<u8>,
    /// Bytes of `prefix` sent.
    prefix_sent: usize,
    /// Length of the counting-stream body after `prefix` (0 for none).
    stream_len: u64,
    /// Bytes of the counting-stream body sent; 0 until `prefix` is all sent.
    stream_sent: u64,
}

impl Response {
    /// Writes the next bytes into `buf` from `at` on, marking the body's bytes in `runs`;
    /// returns how many.
    fn write(&mut self, buf: &mut [u8], at: usize, runs: &mut counting::Runs) -> usize {
        let buf = buf.get_mut(at..).unwrap_or_default();
        let rest = self.prefix.get(self.prefix_sent..).unwrap_or_default();
        let a = rest.len().min(buf.len());
        buf[..a].copy_from_slice(&rest[..a]);
        self.prefix_sent += a;
        let room = &mut buf[a..];
        // Compared in u64, so the cast back cannot truncate.
        let b = (self.stream_len - self.stream_sent).min(room.len() as u64) as usize;
        if b > 0 {
            counting::fill(self.stream_sent, &mut room[..b]);
            runs.mark(at + a, b, self.stream_sent);
            self.stream_sent += b as u64;
        }
        a + b
    }

    /// Everything was sent.
    fn is_done(&self) -> bool {
        self.prefix_sent == self.prefix.len() && self.stream_sent == self.stream_len
    }

    /// Checks the invariants documented on the fields.
    fn is_valid(&self) -> bool {
        self.prefix.len() <= MAX_RESPONSE_PREFIX
            && self.prefix_sent <= self.prefix.len()
            && self.stream_sent <= self.stream_len
            && (self.stream_sent == 0 || self.prefix_sent == self.prefix.len())
            && !self.is_done()
    }
}

/// Status codes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// 400.
    BadRequest,
    /// 100.
    Continue,
    /// 417.
    ExpectationFailed,
    /// 431.
    HeaderFieldsTooLarge,
    /// 411.
    LengthRequired,
    /// 405.
    MethodNotAllowed,
    /// 404.
    NotFound,
    /// 501.
    NotImplemented,
    /// 200.
    Ok,
}

impl Status {
    /// Code and reason phrase.
    fn line(self) -> (u16, &'static str) {
        match self {
            Self::BadRequest => (400, "Bad Request"),
            Self::Continue => (100, "Continue"),
            Self::ExpectationFailed => (417, "Expectation Failed"),
            Self::HeaderFieldsTooLarge => (431, "Request Header Fields Too Large"),
            Self::LengthRequired => (411, "Length Required"),
            Self::MethodNotAllowed => (405, "Method Not Allowed"),
            Self::NotFound => (404, "Not Found"),
            Self::NotImplemented => (501, "Not Implemented"),
            Self::Ok => (200, "OK"),
        }
    }
}

/// A response about to be queued.
struct Reply<'a> {
    /// Status code.
    status: Status,
    /// `Content-Type` value.
    content_type: &'static str,
    /// The body (or, for `HEAD`, what the body would be).
    body: Body<'a>,
    /// `Allow` value, for `405`.
    allow: Option<Allow>,
}

/// What the `Connection` header of a response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    /// `Connection: close`.
    Close,
    /// `Connection: keep-alive`, for HTTP/1.0 clients that asked for it.
    KeepAlive,
    /// No header: HTTP/1.1 keeps the connection.
    Omitted,
}

/// The body of a response about to be queued.
enum Body<'a> {
    /// Fixed bytes.
    Fixed(&'a [u8]),
    /// That many bytes of the counting stream.
    Stream(u64),
}

/// The framing-relevant header fields of a request head.
#[derive(Default)]
struct Fields {
    /// The `Connection` header has the `close` option.
    close: bool,
    /// The `Content-Length` value; all copies agreed.
    content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` (and nothing else).
    chunked: bool,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// The `Connection` header has the `keep-alive` option.
    keep_alive: bool,
}

/// A request head that cannot be served; the connection closes after the status.
struct Reject(Status);

impl Fields {
    /// Collects the fields from parsed headers.
    fn parse(headers: &[httparse::Header<'_>]) -> Result<Self, Reject> {
        let mut fields = Self::default();
        for header in headers {
            let name = header.name;
            let value = trim(header.value);
            if name.eq_ignore_ascii_case("content-length") {
                let length = parse_decimal(value).ok_or(Reject(Status::BadRequest))?;
                if fields.content_length.is_some_and(|l| l != length) {
                    return Err(Reject(Status::BadRequest));
                }
                fields.content_length = Some(length);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if fields.chunked || !value.eq_ignore_ascii_case(b"chunked") {
                    // Codings other than one `chunked` are not implemented.
                    return Err(Reject(Status::NotImplemented));
                }
                fields.chunked = true;
            } else if name.eq_ignore_ascii_case("connection") {
                for option in value.split(|&b| b == b',').map(trim) {
                    fields.close |= option.eq_ignore_ascii_case(b"close");
                    fields.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("expect") {
                if !value.eq_ignore_ascii_case(b"100-continue") {
                    return Err(Reject(Status::ExpectationFailed));
                }
                fields.expect_continue = true;
            }
        }
        if fields.chunked && fields.content_length.is_some() {
            // Conflicting framing: the classic request-smuggling shape.
            return Err(Reject(Status::BadRequest));
        }
        Ok(fields)
    }
}

/// `value` without leading and trailing spaces and tabs.
fn trim(value: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// A non-empty run of ASCII decimal digits that fits a `u64` (no sign, no spaces).
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
        acc.checked_mul(10)?.checked_add(digit)
    })
}

/// Maps method and path to a route.
fn route(method: &str, target: &str) -> Route {
    let path = target.split('?').next().unwrap_or_default();
    let get = method == "GET" || method == "HEAD";
    if path == "/health" {
        if get {
            Route::Health
        } else {
            Route::MethodNotAllowed(Allow::GetHead)
        }
    } else if path == "/upload" {
        if method == "POST" {
            Route::Upload
        } else {
            Route::MethodNotAllowed(Allow::Post)
        }
    } else if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| parse_decimal(n.as_bytes()))
    {
        if get {
            Route::Bytes(n)
        } else {
            Route::MethodNotAllowed(Allow::GetHead)
        }
    } else {
        Route::NotFound
    }
}

impl HttpApp {
    /// A fresh connection, waiting for the first request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the app from [`App::snapshot`] bytes.
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, AppError> {
        let app: Self = decode_snapshot(AppKind::Http, snapshot)?;
        app.check()
            .map_err(|reason| malformed(AppKind::Http, reason))?;
        Ok(app)
    }

    /// Checks the invariants documented on the fields.
    fn check(&self) -> Result<(), &'static str> {
        if self.head.len() >= MAX_HEAD_SIZE {
            return Err("partial request head too long");
        }
        if self.head.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
            return Err("partial request head starts with an empty line");
        }
        if self.head.is_empty() && self.scan != HeadScan::Text {
            return Err("head scan state without a head");
        }
        if !self.head.is_empty() && (self.phase != Phase::Head || self.closing) {
            return Err("partial request head outside the head phase");
        }
        if self.closing && self.phase != Phase::Head {
            return Err("closing connection reading a body");
        }
        if let Phase::Body { framing, .. } = &self.phase {
            let valid = match framing {
                Framing::Chunked(state) => state.is_valid(),
                Framing::Length(remaining) => *remaining > 0,
            };
            if !valid {
                return Err("invalid body framing state");
            }
        }
        if self.responses.len() > MAX_PENDING_RESPONSES + 1 {
            return Err("too many pending responses");
        }
        if !self.responses.iter().all(Response::is_valid) {
            return Err("invalid pending response");
        }
        Ok(())
    }

    /// Consumes request-head bytes from the start of `data`; returns how many.
    fn recv_head(&mut self, data: &[u8]) -> usize {
        let mut skipped = 0;
        if self.head.is_empty() {
            // Empty lines before a request line are ignored (RFC 9112, section 2.2).
            skipped = data
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
        }
        let data = &data[skipped..];
        let room = MAX_HEAD_SIZE - self.head.len();
        let window = &data[..data.len().min(room)];
        match self.scan.find_end(window) {
            Some(end) if self.head.is_empty() => {
                // The whole head is in `data`: parse it in place.
                self.handle_head(&window[..end]);
                skipped + end
            }
            Some(end) => {
                let mut head = std::mem::take(&mut self.head);
                head.extend_from_slice(&window[..end]);
                self.handle_head(&head);
                head.clear();
                self.head = head;
                skipped + end
            }
            None if data.len() >= room => {
                self.scan = HeadScan::Text;
                self.reject(Status::HeaderFieldsTooLarge);
                skipped + data.len()
            }
            None => {
                self.head.extend_from_slice(window);
                skipped + window.len()
            }
        }
    }

    /// Handles one complete request head (ending with its empty line).
    fn handle_head(&mut self, head: &[u8]) {
        self.head.clear();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return self.reject(Status::BadRequest),
            Err(httparse::Error::TooManyHeaders) => {
                return self.reject(Status::HeaderFieldsTooLarge);
            }
            Err(_) => return self.reject(Status::BadRequest),
        }
        let (Some(method), Some(target), Some(version)) =
            (parsed.method, parsed.path, parsed.version)
        else {
            return self.reject(Status::BadRequest);
        };
        let fields = match Fields::parse(parsed.headers) {
            Ok(fields) => fields,
            Err(Reject(status)) => return self.reject(status),
        };
        let http10 = version == 0;
        if http10 && fields.chunked {
            return self.reject(Status::BadRequest);
        }
        let keep_alive = !fields.close && (!http10 || fields.keep_alive);
        let request = Request {
            http10,
            keep_alive,
            head_only: method == "HEAD",
            route: route(method, target),
        };
        let framing = match (fields.chunked, fields.content_length) {
            (true, _) => Framing::Chunked(ChunkState::START),
            (false, Some(length)) if length > 0 => Framing::Length(length),
            (false, Some(_)) => return self.finish_request(request, 0, 0),
            (false, None) if request.route == Route::Upload => {
                // A body without framing cannot be told apart from the next request.
                return self.reject(Status::LengthRequired);
            }
            (false, None) => return self.finish_request(request, 0, 0),
        };
        if fields.expect_continue && !http10 {
            let reply = Reply {
                status: Status::Continue,
                content_type: "",
                body: Body::Fixed(b""),
                allow: None,
            };
            self.push(reply, Connection::Omitted, false);
        }
        self.phase = Phase::Body {
            request,
            framing,
            bytes: 0,
            crc: 0,
        };
    }

    /// Consumes body bytes from the start of `data`; returns how many.
    fn recv_body(&mut self, data: &[u8]) -> usize {
        let Phase::Body {
            request,
            framing,
            bytes,
            crc,
        } = &mut self.phase
        else {
            return 0;
        };
        let (consumed, payload, done) = match framing {
            Framing::Length(remaining) => {
                // Compared in u64, so the cast back cannot truncate.
                let n = (*remaining).min(data.len() as u64) as usize;
                *remaining -= n as u64;
                (n, n, *remaining == 0)
            }
            Framing::Chunked(state) => match state.advance(data) {
                Ok(step) => (step.consumed, step.data, step.done),
                Err(ChunkError) => {
                    self.reject(Status::BadRequest);
                    return data.len();
                }
            },
        };
        *bytes = bytes.saturating_add(payload as u64);
        *crc = crc32_update(*crc, &data[..payload]);
        if done {
            let (request, bytes, crc) = (*request, *bytes, *crc);
            self.finish_request(request, bytes, crc);
        }
        consumed
    }

    /// Queues the response to a request whose body (`bytes` long, CRC-32 `crc`) was read.
    fn finish_request(&mut self, request: Request, bytes: u64, crc: u32) {
        self.phase = Phase::Head;
        let Request {
            http10,
            keep_alive,
            head_only,
            route,
        } = request;
        let mut json = [0u8; 64];
        let (status, content_type, body, allow) = match route {
            Route::Bytes(n) => (
                Status::Ok,
                "application/octet-stream",
                Body::Stream(n),
                None,
            ),
            Route::Health => (Status::Ok, "text/plain", Body::Fixed(HEALTH_BODY), None),
            Route::MethodNotAllowed(allow) => (
                Status::MethodNotAllowed,
                "text/plain",
                Body::Fixed(b"method not allowed\n"),
                Some(allow),
            ),
            Route::NotFound => (
                Status::NotFound,
                "text/plain",
                Body::Fixed(b"not found\n"),
                None,
            ),
            Route::Upload => {
                let mut cursor = &mut json[..];
                let written = write!(cursor, r#"{{"bytes": {bytes}, "crc32": "{crc:08x}"}}"#);
                // At most 52 bytes: 20 digits, 8 hex digits and 24 fixed.
                debug_assert!(written.is_ok());
                let len = 64 - cursor.len();
                (
                    Status::Ok,
                    "application/json",
                    Body::Fixed(&json[..len]),
                    None,
                )
            }
        };
        let connection = match (keep_alive, http10) {
            (false, _) => Connection::Close,
            (true, true) => Connection::KeepAlive,
            (true, false) => Connection::Omitted,
        };
        self.push(
            Reply {
                status,
                content_type,
                body,
                allow,
            },
            connection,
            head_only,
        );
        if !keep_alive {
            self.closing = true;
        }
    }

    /// Answers a request that cannot be served with `status`, then closes.
    fn reject(&mut self, status: Status) {
        self.phase = Phase::Head;
        self.head.clear();
        self.scan = HeadScan::Text;
        let (_, reason) = status.line();
        const BODY: usize = 48;
        let mut body = [0u8; BODY];
        let mut cursor = &mut body[..];
        let written = writeln!(cursor, "{}", reason.to_ascii_lowercase());
        // The longest reason phrase has 31 bytes.
        debug_assert!(written.is_ok());
        let len = BODY - cursor.len();
        let reply = Reply {
            status,
            content_type: "text/plain",
            body: Body::Fixed(&body[..len]),
            allow: None,
        };
        self.push(reply, Connection::Close, false);
        self.closing = true;
    }

    /// Queues a response; `head_only` leaves the body out (for `HEAD`).
    fn push(&mut self, reply: Reply<'_>, connection: Connection, head_only: bool) {
        let Reply {
            status,
            content_type,
            body,
            allow,
        } = reply;
        let (code, reason) = status.line();
        let mut prefix = Vec::with_capacity(160);
        // Writing to a Vec cannot fail.
        let _ = write!(prefix, "HTTP/1.1 {code} {reason}\r\n");
        if status != Status::Continue {
            let length = match body {
                Body::Fixed(bytes) => bytes.len() as u64,
                Body::Stream(n) => n,
            };
            let _ = write!(
                prefix,
                "Server: flowshift\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
            );
            if let Some(allow) = allow {
                let _ = write!(prefix, "Allow: {}\r\n", allow.header());
            }
            match connection {
                Connection::Close => prefix.extend_from_slice(b"Connection: close\r\n"),
                Connection::KeepAlive => prefix.extend_from_slice(b"Connection: keep-alive\r\n"),
                Connection::Omitted => {}
            }
        }
        prefix.extend_from_slice(b"\r\n");
        let mut stream_len = 0;
        if !head_only {
            match body {
                Body::Fixed(bytes) => prefix.extend_from_slice(bytes),
                Body::Stream(n) => stream_len = n,
            }
        }
        self.responses.push_back(Response {
            prefix,
            prefix_sent: 0,
            stream_len,
            stream_sent: 0,
        });
    }
}

impl App for HttpApp {
    fn kind(&self) -> AppKind {
        AppKind::Http
    }

    fn handle_recv(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        while pos < data.len() {
            if self.closing {
                // Nothing after the last answered request is served: drop it.
                return data.len();
            }
            let rest = &data[pos..];
            pos += match self.phase {
                Phase::Head if self.responses.len() >= MAX_PENDING_RESPONSES => break,
                Phase::Head => self.recv_head(rest),
                Phase::Body { .. } => self.recv_body(rest),
            };
        }
        pos
    }

    fn handle_recv_fin(&mut self) {
        self.fin_received = true;
    }

    fn poll_send(&mut self, buf: &mut [u8]) -> usize {
        self.poll_send_marked(buf, &mut counting::Runs::default())
    }

    fn poll_send_marked(&mut self, buf: &mut [u8], runs: &mut counting::Runs) -> usize {
        let mut written = 0;
        while let Some(response) = self.responses.front_mut() {
            written += response.write(buf, written, runs);
            if !response.is_done() {
                break;
            }
            self.responses.pop_front();
        }
        written
    }

    /// After the client's FIN (a partial request is then dropped), after `Connection: close`, or
    /// after an error, once every queued response was sent.
    fn wants_close(&self) -> bool {
        (self.closing || self.fin_received) && self.responses.is_empty()
    }

    /// True between requests: no partial request buffered, no response pending.
    fn is_quiescent(&self) -> bool {
        self.phase == Phase::Head && self.head.is_empty() && self.responses.is_empty()
    }

    fn in_request_head(&self) -> bool {
        self.phase == Phase::Head && !self.head.is_empty()
    }

    fn shrink(&mut self) {
        self.head.shrink_to_fit();
        self.responses.shrink_to_fit();
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_snapshot(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Peer, check_continuation, pseudo_random_bytes};
    use super::*;

    /// One response as a client reads it.
    #[derive(Debug)]
    struct Parsed {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Parsed {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Splits `out` into responses (bodies per `Content-Length`; none for 1xx).
    fn parse_responses(mut out: &[u8]) -> Vec<Parsed> {
        let mut responses = Vec::new();
        while !out.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = response.parse(out).expect("valid response")
            else {
                panic!("partial response head: {:?}", String::from_utf8_lossy(out));
            };
            let status = response.code.unwrap();
            let headers: Vec<(String, String)> = response
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8(h.value.to_vec()).unwrap(),
                    )
                })
                .collect();
            out = &out[len..];
            let mut parsed = Parsed {
                status,
                headers,
                body: Vec::new(),
            };
            if status >= 200 {
                let length: usize = parsed
                    .header("content-length")
                    .expect("content-length")
                    .parse()
                    .unwrap();
                assert!(parsed.header("content-type").is_some(), "no content-type");
                parsed.body = out[..length].to_vec();
                out = &out[length..];
            }
            responses.push(parsed);
        }
        responses
    }

    /// Runs `input` through a fresh app; returns the output and whether the app closed.
    fn exchange(input: &[u8], fin: bool, recv_chunk: usize, send_chunk: usize) -> (Vec<u8>, bool) {
        let mut peer = Peer::new(input.to_vec(), fin, recv_chunk, send_chunk);
        let mut app = HttpApp::new();
        peer.run(&mut app);
        (peer.output, peer.closed)
    }

    fn upload_json(body: &[u8]) -> Vec<u8> {
        format!(
            r#"{{"bytes": {}, "crc32": "{:08x}"}}"#,
            body.len(),
            crc32fast::hash(body)
        )
        .into_bytes()
    }

    #[test]
    fn get_bytes_returns_exact_counting_body() {
        let (out, closed) = exchange(
            b"GET /bytes/100000 HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
            4096,
            1460,
        );
        let responses = parse_responses(&out);
        assert_eq!(responses.len(), 1);
        let r = &responses[0];
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.body.len(), 100_000);
        assert_eq!(counting::verify(0, &r.body), None);
        assert!(!closed, "keep-alive connection closed");
        let (out, _) = exchange(b"GET /bytes/0 HTTP/1.1\r\n\r\n", false, 4096, 1460);
        assert_eq!(parse_responses(&out)[0].body, b"");
    }

    #[test]
    fn huge_body_is_generated_lazily() {
        let mut app = HttpApp::new();
        let request = b"GET /bytes/300000000 HTTP/1.1\r\n\r\n";
        assert_eq!(app.handle_recv(request), request.len());
        let mut buf = vec![0u8; 65_536];
        let n = app.poll_send(&mut buf);
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(
            String::from_utf8_lossy(&buf[..head_end]).contains("Content-Length: 300000000\r\n")
        );
        let mut offset = (n - head_end) as u64;
        assert_eq!(counting::verify(0, &buf[head_end..n]), None);
        for _ in 0..100 {
            let n = app.poll_send(&mut buf);
            assert_eq!(n, buf.len());
            assert_eq!(counting::verify(offset, &buf[..n]), None);
            offset += n as u64;
            assert!(app.snapshot().len() < 256, "state grows with the body");
        }
        assert!(!app.is_quiescent());
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let input = b"GET /health HTTP/1.1\r\n\r\n\
            GET /bytes/10 HTTP/1.1\r\n\r\n\
            POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            GET /nope HTTP/1.1\r\n\r\n\
            DELETE /health HTTP/1.1\r\n\r\n\
            PUT /upload HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            GET /bytes/12x HTTP/1.1\r\n\r\n\
            HEAD /bytes/1000 HTTP/1.1\r\n\r\n\
            GET /health?probe=1 HTTP/1.1\r\n\r\n";
        let mut app = HttpApp::new();
        // One segment: offered whole; the app takes up to MAX_PENDING_RESPONSES requests at a
        // time, then the rest once those responses are sent.
        let mut consumed = app.handle_recv(input);
        assert!(consumed >= input.len() / 2);
        let mut out = vec![0u8; 1 << 16];
        let mut n = app.poll_send(&mut out);
        consumed += app.handle_recv(&input[consumed..]);
        assert_eq!(consumed, input.len());
        app.handle_recv_fin();
        n += app.poll_send(&mut out[n..]);
        assert!(app.wants_close());
        let out = &out[..n];
        // The HEAD response has a Content-Length but no body: split it off by hand.
        let text = String::from_utf8_lossy(out);
        let head_at = text.find("HTTP/1.1 200 OK\r\nServer: flowshift\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n").unwrap();
        let head_len = text[head_at..].find("\r\n\r\n").unwrap() + 4;
        let mut responses = parse_responses(&out[..head_at]);
        responses.extend(parse_responses(&out[head_at + head_len..]));
        let summary: Vec<(u16, &[u8])> =
            responses.iter().map(|r| (r.status, &r.body[..])).collect();
        assert_eq!(
            summary,
            [
                (200, &b"ok\n"[..]),
                (200, &counting_bytes(10)[..]),
                (200, &upload_json(b"hello")[..]),
                (404, b"not found\n"),
                (405, b"method not allowed\n"),
                (405, b"method not allowed\n"),
                (404, b"not found\n"),
                (200, b"ok\n"),
            ]
        );
        assert_eq!(responses[4].header("allow"), Some("GET, HEAD"));
        assert_eq!(responses[5].header("allow"), Some("POST"));
        assert_eq!(
            responses[2].header("content-type"),
            Some("application/json")
        );
    }

    fn counting_bytes(n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        counting::fill(0, &mut buf);
        buf
    }

    /// A script of requests covering every body framing, and the responses it must give.
    fn script() -> (Vec<u8>, Vec<(u16, Vec<u8>)>) {
        let upload = pseudo_random_bytes(3000, 9);
        let mut input = Vec::new();
        input.extend_from_slice(
            b"\r\nGET /bytes/5000 HTTP/1.1\r\nHost: example\r\nUser-Agent: test\r\n\r\n",
        );
        input.extend_from_slice(
            b"POST /upload HTTP/1.1\r\nContent-Length: 3000\r\nExpect: 100-continue\r\n\r\n",
        );
        input.extend_from_slice(&upload);
        input.extend_from_slice(b"POST /upload HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n");
        for (i, piece) in upload.chunks(700).enumerate() {
            if i % 2 == 0 {
                input.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            } else {
                input.extend_from_slice(format!("{:X} ; name=\"v\"\r\n", piece.len()).as_bytes());
            }
            input.extend_from_slice(piece);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"0\r\nX-Trailer: yes\r\n\r\n");
        input.extend_from_slice(b"GET /health HTTP/1.1\n\n");
        input.extend_from_slice(b"GET /bytes/20000 HTTP/1.1\r\nConnection: close\r\n\r\n");
        input.extend_from_slice(b"GET /health HTTP/1.1\r\n\r\n"); // after close: never answered
        let expected = vec![
            (200, counting_bytes(5000)),
            (100, Vec::new()),
            (200, upload_json(&upload)),
            (200, upload_json(&upload)),
            (200, b"ok\n".to_vec()),
            (200, counting_bytes(20_000)),
        ];
        (input, expected)
    }

    #[test]
    fn request_split_one_byte_at_a_time() {
        let (input, expected) = script();
        for (recv_chunk, send_chunk) in [(1, 1), (1, 4096), (2, 7), (100, 1000), (1 << 20, 1 << 20)]
        {
            let (out, closed) = exchange(&input, false, recv_chunk, send_chunk);
            let responses = parse_responses(&out);
            let summary: Vec<(u16, Vec<u8>)> = responses
                .iter()
                .map(|r| (r.status, r.body.clone()))
                .collect();
            assert!(summary == expected, "chunks {recv_chunk}/{send_chunk}");
            assert_eq!(
                responses.last().unwrap().header("connection"),
                Some("close")
            );
            assert!(closed);
        }
    }

    #[test]
    fn continue_is_sent_before_the_body_is_read() {
        let mut app = HttpApp::new();
        let head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-Continue\r\n\r\n";
        assert_eq!(app.handle_recv(head), head.len());
        let mut buf = [0u8; 512];
        let n = app.poll_send(&mut buf);
        assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(!app.is_quiescent());
        assert_eq!(app.handle_recv(b"0123"), 4);
        assert_eq!(app.poll_send(&mut buf), 0);
        assert_eq!(app.handle_recv(b"456789"), 6);
        let n = app.poll_send(&mut buf);
        let responses = parse_responses(&buf[..n]);
        assert_eq!(responses[0].body, upload_json(b"0123456789"));
        assert!(app.is_quiescent());
    }

    #[test]
    fn garbage_gets_400_and_close() {
        for garbage in [
            &b"\x00\x01\x02 garbage\r\n\r\nGET /health HTTP/1.1\r\n\r\n"[..],
            b"GET /health HTTP/9.9\r\n\r\n",
            b"GET  HTTP/1.1\r\n\r\n",
            b"GET /health HTTP/1.1\r\nbad header\r\n\r\n",
            b"POST /upload HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST /upload HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
            b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            b"POST /upload HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST /upload HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n",
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
            b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad\ntrailer\r\n\r\n",
        ] {
            for recv_chunk in [1, 1 << 16] {
                let (out, closed) = exchange(garbage, false, recv_chunk, 4096);
                let responses = parse_responses(&out);
                let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
                assert_eq!(statuses, [400], "{:?}", String::from_utf8_lossy(garbage));
                assert_eq!(responses[0].header("connection"), Some("close"));
                assert!(closed);
            }
        }
    }

    #[test]
    fn other_rejections_close() {
        for (request, status) in [
            (&b"POST /upload HTTP/1.1\r\n\r\nhello"[..], 411),
            (b"POST /upload HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"GET /health HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
        ] {
            let (out, closed) = exchange(request, false, 1 << 16, 4096);
            let responses = parse_responses(&out);
            assert_eq!(responses.len(), 1);
            assert_eq!(responses[0].status, status);
            assert!(closed);
        }
    }

    #[test]
    fn oversized_head_gets_431_and_close() {
        let mut big = b"GET /health HTTP/1.1\r\n".to_vec();
        while big.len() < 9 * 1024 {
            big.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        big.extend_from_slice(b"\r\n");
        for recv_chunk in [1, 1000, 1 << 16] {
            let mut peer = Peer::new(big.clone(), false, recv_chunk, 4096);
            let mut app = HttpApp::new();
            while peer.turn(&mut app) {
                assert!(app.head.len() < MAX_HEAD_SIZE);
            }
            let responses = parse_responses(&peer.output);
            assert_eq!(responses.len(), 1);
            assert_eq!(responses[0].status, 431);
            assert!(peer.closed);
        }
        // Exactly MAX_HEAD_SIZE is still accepted, one byte more is not.
        let mut exact = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
        exact.resize(MAX_HEAD_SIZE - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        let (out, _) = exchange(&exact, false, 1 << 16, 4096);
        assert_eq!(parse_responses(&out)[0].status, 200);
        exact.insert(30, b'a');
        let (out, _) = exchange(&exact, false, 1 << 16, 4096);
        assert_eq!(parse_responses(&out)[0].status, 431);
        // So are too many header fields.
        let mut many = b"GET /health HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (out, _) = exchange(&many, false, 1 << 16, 4096);
        assert_eq!(parse_responses(&out)[0].status, 431);
    }

    #[test]
    fn keep_alive_and_close() {
        let cases: [(&[u8], bool, Option<&str>); 5] = [
            (b"GET /health HTTP/1.1\r\n\r\n", false, None),
            (
                b"GET /health HTTP/1.1\r\nConnection: Close\r\n\r\n",
                true,
                Some("close"),
            ),
            (
                b"GET /health HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n",
                true,
                Some("close"),
            ),
            (b"GET /health HTTP/1.0\r\n\r\n", true, Some("close")),
            (
                b"GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
                false,
                Some("keep-alive"),
            ),
        ];
        for (request, closes, header) in cases {
            let mut input = request.to_vec();
            input.extend_from_slice(b"GET /bytes/3 HTTP/1.1\r\n\r\n");
            let (out, closed) = exchange(&input, false, 1 << 16, 4096);
            let responses = parse_responses(&out);
            assert_eq!(closed, closes, "{:?}", String::from_utf8_lossy(request));
            assert_eq!(responses.len(), if closes { 1 } else { 2 });
            assert_eq!(responses[0].header("connection"), header);
        }
        // A keep-alive connection closes after the client's FIN once everything was answered.
        let (out, closed) = exchange(b"GET /bytes/3 HTTP/1.1\r\n\r\n", true, 1 << 16, 2);
        assert_eq!(parse_responses(&out).len(), 1);
        assert!(closed);
        // A partial request before the FIN is dropped.
        let (out, closed) = exchange(b"GET /bytes/3 HTTP/1.1\r\n\r\nGET /he", true, 1 << 16, 4096);
        assert_eq!(parse_responses(&out).len(), 1);
        assert!(closed);
    }

    #[test]
    fn pipelining_without_reading_is_bounded() {
        let mut input = Vec::new();
        for i in 0..1000 {
            input.extend_from_slice(format!("GET /bytes/{} HTTP/1.1\r\n\r\n", 1000 + i).as_bytes());
        }
        let mut app = HttpApp::new();
        let mut consumed = 0;
        for _ in 0..100 {
            consumed += app.handle_recv(&input[consumed..]);
        }
        assert!(consumed < 400, "consumed {consumed} bytes without sending");
        assert!(app.responses.len() <= MAX_PENDING_RESPONSES);
        assert!(app.snapshot().len() < 4096);
        // Once the client reads, every request is answered, in order.
        let mut peer = Peer::new(input, true, 1 << 16, 1 << 16);
        let mut app = HttpApp::new();
        peer.run(&mut app);
        let responses = parse_responses(&peer.output);
        assert_eq!(responses.len(), 1000);
        for (i, response) in responses.iter().enumerate() {
            assert_eq!(response.body.len(), 1000 + i);
        }
        assert!(peer.closed);
    }

    #[test]
    fn quiescent_only_between_requests() {
        let mut app = HttpApp::new();
        assert!(app.is_quiescent());
        app.handle_recv(b"GET /bytes/100 HT");
        assert!(!app.is_quiescent());
        app.handle_recv(b"TP/1.1\r\n\r\n");
        assert!(!app.is_quiescent());
        let mut buf = [0u8; 50];
        app.poll_send(&mut buf);
        assert!(!app.is_quiescent());
        while app.poll_send(&mut buf) > 0 {}
        assert!(app.is_quiescent());
        app.handle_recv(b"POST /upload HTTP/1.1\r\nContent-Length: 2\r\n\r\nx");
        assert!(!app.is_quiescent());
        app.handle_recv(b"y");
        while app.poll_send(&mut buf) > 0 {}
        assert!(app.is_quiescent());
    }

    #[test]
    fn snapshot_restore_mid_response_and_mid_upload() {
        let make = || -> Box<dyn App> { Box::new(HttpApp::new()) };
        // Mid-response of /bytes/N.
        let peer = Peer::new(
            b"GET /bytes/200000 HTTP/1.1\r\n\r\n".to_vec(),
            true,
            1 << 16,
            1000,
        );
        check_continuation(AppKind::Http, &make, &peer);
        // Mid-upload, both framings, with a request head split across turns.
        let body = pseudo_random_bytes(40_000, 21);
        let mut input = b"POST /upload HTTP/1.1\r\nContent-Length: 40000\r\n\r\n".to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        for piece in body.chunks(333) {
            input.extend_from_slice(format!("{:x};e=1\r\n", piece.len()).as_bytes());
            input.extend_from_slice(piece);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"0\r\nT: 1\r\n\r\n");
        let peer = Peer::new(input, true, 997, 10);
        check_continuation(AppKind::Http, &make, &peer);
        // The whole script, byte by byte.
        let (input, _) = script();
        let peer = Peer::new(input, false, 3, 50);
        check_continuation(AppKind::Http, &make, &peer);
    }

    #[test]
    fn hostile_input_never_panics_and_stays_bounded() {
        use super::super::tests::XorShift;
        let (script, _) = script();
        let mut rng = XorShift::new(0x4854_5450);
        for round in 0..300 {
            let mut input = script.clone();
            for _ in 0..=rng.below(8) {
                let i = rng.below(input.len() as u64) as usize;
                match rng.below(3) {
                    0 => input[i] = rng.next() as u8,
                    1 => input.insert(i, b"\r\n:;0 f"[rng.below(7) as usize]),
                    _ => {
                        input.remove(i);
                    }
                }
            }
            let mut app = HttpApp::new();
            let mut pos = 0;
            let mut buf = vec![0u8; 1 + rng.below(3000) as usize];
            let mut idle = 0;
            while pos < input.len() && idle < 3 {
                let end = input
                    .len()
                    .min(pos + 1 + rng.below(if round % 2 == 0 { 5 } else { 2000 }) as usize);
                let n = app.handle_recv(&input[pos..end]);
                pos += n;
                assert!(app.head.len() < MAX_HEAD_SIZE);
                assert!(app.responses.len() <= MAX_PENDING_RESPONSES + 1);
                let sent = app.poll_send(&mut buf);
                idle = if n == 0 && sent == 0 { idle + 1 } else { 0 };
            }
            app.handle_recv_fin();
            let mut rounds = 0;
            while app.poll_send(&mut buf) > 0 && rounds < 100 {
                rounds += 1;
            }
            assert!(HttpApp::from_snapshot(&app.snapshot()).is_ok());
        }
    }

    #[test]
    fn restore_rejects_broken_invariants() {
        let valid = || {
            let mut app = HttpApp::new();
            app.handle_recv(b"GET /bytes/100 HTTP/1.1\r\n\r\nPOST /upload HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc");
            app
        };
        let app = valid();
        assert_eq!(HttpApp::from_snapshot(&app.snapshot()), Ok(app));
        let broken: [&dyn Fn(&mut HttpApp); 8] = [
            &|a| a.head = vec![b'G'; MAX_HEAD_SIZE],
            &|a| a.head = b"GET".to_vec(), // partial head while reading a body
            &|a| a.closing = true,         // closing while reading a body
            &|a| {
                a.phase = Phase::Body {
                    request: Request {
                        http10: false,
                        keep_alive: true,
                        head_only: false,
                        route: Route::Upload,
                    },
                    framing: Framing::Length(0),
                    bytes: 0,
                    crc: 0,
                }
            },
            &|a| a.responses[0].prefix_sent = a.responses[0].prefix.len() + 1,
            &|a| a.responses[0].stream_sent = 101,
            &|a| a.responses[0].prefix = vec![b'x'; MAX_RESPONSE_PREFIX + 1],
            &|a| {
                let r = a.responses[0].clone();
                a.responses
                    .extend(std::iter::repeat_n(r, MAX_PENDING_RESPONSES + 1));
            },
        ];
        for (i, breaker) in broken.iter().enumerate() {
            let mut app = valid();
            breaker(&mut app);
            assert!(
                HttpApp::from_snapshot(&encode_snapshot(&app)).is_err(),
                "case {i}"
            );
        }
        let mut app = HttpApp::new();
        app.scan = HeadScan::LineStart;
        assert!(HttpApp::from_snapshot(&encode_snapshot(&app)).is_err());
        app.phase = Phase::Body {
            request: Request {
                http10: false,
                keep_alive: true,
                head_only: false,
                route: Route::Upload,
            },
            framing: Framing::Chunked(ChunkState::Size {
                value: 0,
                part: SizePart::Start,
                len: 3,
            }),
            bytes: 0,
            crc: 0,
        };
        app.scan = HeadScan::Text;
        assert!(HttpApp::from_snapshot(&encode_snapshot(&app)).is_err());
    }
}
