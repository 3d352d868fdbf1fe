//! The control socket: JSON lines over a Unix socket.
//!
//! One request per line, one reply per line:
//! `{"cmd":"status"}`, `{"cmd":"conns"}`, `{"cmd":"metrics"}`, `{"cmd":"freeze","id":N}`,
//! `{"cmd":"thaw","id":N}`, `{"cmd":"migrate","to":"b","conns":[N…]}` (or `"port":P`,
//! `"count":N`, `"all":true`), `{"cmd":"drain","to":"b"}`. A reply is `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
//! Garbage gets an error reply; a line longer than [`MAX_LINE`] closes the connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Control connections served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 32;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Every live connection; with `all`, those in TIME-WAIT too.
    Conns {
        /// Include connections in TIME-WAIT.
        #[serde(default)]
        all: bool,
    },
    /// Move everything to a peer, refusing new connections: the node empties.
    Drain {
        /// The target peer's name.
        to: String,
    },
    /// Freeze a connection: queue its packets.
    Freeze {
        /// Connection id from `conns`.
        id: u64,
    },
    /// Prometheus text exposition.
    Metrics,
    /// Move connections to a peer: those listed, or those on a port, or the first `count`,
    /// or all.
    Migrate {
        /// The target peer's name.
        to: String,
        /// Connection ids.
        #[serde(default)]
        conns: Vec<u64>,
        /// Every connection to this service port.
        #[serde(default)]
        port: Option<u16>,
        /// The first N connections that can move.
        #[serde(default)]
        count: Option<usize>,
        /// Every connection that can move.
        #[serde(default)]
        all: bool,
    },
    /// Every tunnel peer.
    Peers,
    /// Node summary.
    Status,
    /// Thaw a frozen connection.
    Thaw {
        /// Connection id from `conns`.
        id: u64,
    },
    /// Send bytes of the test stream to a peer over the tunnel.
    #[serde(rename = "tunnel_send")]
    TunnelSend {
        /// Peer name.
        peer: String,
        /// How many bytes.
        bytes: u64,
        /// `reliable` (default) or `datagram`.
        #[serde(default)]
        channel: Option<String>,
    },
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success reply.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// An error reply.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// Serves requests on the control socket.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> Reply;
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error("cannot bind control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another node is serving this socket.
    #[error("control socket {0} is in use by a running node")]
    InUse(PathBuf),
    /// Talking to the node failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The node answered something that is not a reply.
    #[error("malformed reply from node: {0}")]
    MalformedReply(String),
}

/// Binds the control socket at `path`, replacing a stale socket file of a node that is gone.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Accepts control connections until the listener fails; each is served on its own thread.
pub fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = write_reply(&mut stream, &Reply::error("too many control connections"));
            continue;
        }
        let handler = handler.clone();
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name("fs-ctl-conn".into())
            .spawn(move || {
                if let Err(e) = serve_one(stream, &*handler) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("cannot spawn control connection thread");
        }
    }
}

fn write_reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_one(stream: UnixStream, handler: &dyn Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            tracing::warn!("control request longer than {MAX_LINE} bytes: closing");
            write_reply(
                &mut writer,
                &Reply::error(format!("request longer than {MAX_LINE} bytes")),
            )?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(text) {
            Ok(request) => handler.handle(request),
            Err(e) => {
                tracing::debug!(error = %e, "malformed control request");
                Reply::error(format!("malformed request: {e}"))
            }
        };
        write_reply(&mut writer, &reply)?;
    }
}

/// Sends one request to the node at `path` and returns its reply.
pub fn call(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    // A drain moves every connection, round after round; the rest answer at once.
    let wait = match request {
        Request::Drain { .. } | Request::Migrate { .. } => Duration::from_secs(600),
        _ => Duration::from_secs(30),
    };
    stream.set_read_timeout(Some(wait)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply).map_err(io_err)?;
    serde_json::from_str(&reply).map_err(|e| ControlError::MalformedReply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, request: Request) -> Reply {
            Reply::ok(serde_json::to_value(request).unwrap())
        }
    }

    #[test]
    fn request_shapes() {
        let r: Request = serde_json::from_str(r#"{"cmd":"freeze","id":5}"#).unwrap();
        assert_eq!(r, Request::Freeze { id: 5 });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"freeze","id":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"freeze","id":-1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn serves_and_survives_garbage() {
        let dir = std::env::temp_dir().join(format!("fs-ctl-test-{}", std::process::id()));
        let path = dir.join("c.sock");
        let listener = bind(&path).unwrap();
        std::thread::spawn(move || serve(listener, Arc::new(Echo)));
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));

        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"garbage\n\xff\xfe\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for expect_ok in [false, false, true] {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let reply: Reply = serde_json::from_str(&line).unwrap();
            assert_eq!(reply.ok, expect_ok, "{line}");
        }
        // An endless line is cut off with an error.
        let mut s = UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&vec![b'x'; MAX_LINE + 10]);
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("longer than"), "{line}");
        // Still serving.
        let reply = call(&path, &Request::Conns { all: false }).unwrap();
        assert!(reply.ok);
        let _ = std::fs::remove_dir_all(dir);
    }
}
