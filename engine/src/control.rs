//! The control socket: JSON lines over a Unix socket.
//!
//! One request per line, one reply per line:
//! `{"cmd":"status"}`, `{"cmd":"conns"}`, `{"cmd":"metrics"}`, `{"cmd":"freeze","id":N}`,
//! `{"cmd":"thaw","id":N}`, `{"cmd":"migrate","to":"b","conns":[N…]}` (or `"port":P`,
//! `"count":N`, `"all":true`), `{"cmd":"drain","to":"b"}`. A reply is `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
//! Garbage gets an error reply; a line longer than [`MAX_LINE`] closes the connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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
/// How long a reply may wait for a client that does not read it before the connection goes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The predictor: its estimate, the current plan with the reason of each move, and the
    /// last decisions.
    Plan,
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
    /// Something that is not a socket sits at the path: it is left alone.
    #[error(
        "{path} exists and is {kind}, not a socket: refusing to replace it (remove it, or set node.control_socket elsewhere)"
    )]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// The socket's permissions do not let this user in.
    #[error(
        "permission denied on control socket {0}: run as root, as the node's user, or as a member of its node.control_group"
    )]
    PermissionDenied(PathBuf),
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

/// Who may use the control socket: root, the node's own user, and the members of `group`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// A group whose members may connect (the socket is 0660 and group-owned); without it
    /// the socket is 0600.
    pub group: Option<u32>,
}

impl Access {
    /// The socket file's mode.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() { 0o660 } else { 0o600 }
    }

    /// Whether a peer with `uid` may send requests. The file mode already keeps out who may
    /// not connect; this also refuses a peer that connected before the mode was set, or
    /// through a mode someone loosened by hand.
    pub fn allows(&self, peer: Peer) -> bool {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        peer.uid == 0
            || peer.uid == me
            || self
                .group
                .is_some_and(|g| peer.gid == g || supplementary_groups(peer.pid).contains(&g))
    }
}

/// Binds the control socket at `path` with `access`'s mode, replacing the socket file of a
/// node that is gone. Anything else at the path (a file, a directory, a live node's socket) is
/// an error that names it; it is never removed.
pub fn bind(path: &Path, access: Access) -> Result<UnixListener, ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            tracing::info!(path = %path.display(), "removing the stale control socket of a node that is gone");
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(m) => {
            let t = m.file_type();
            let kind = if t.is_dir() {
                "a directory"
            } else if t.is_symlink() {
                "a symbolic link"
            } else if t.is_file() {
                "a regular file"
            } else {
                "a special file"
            };
            return Err(ControlError::NotASocket {
                path: path.to_owned(),
                kind,
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Until the mode is set the umask's applies; `Access::allows` covers that window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode()))
        .map_err(bind_err)?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_err)?;
    }
    Ok(listener)
}

/// The process at the other end of a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its pid (when it connected).
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// The supplementary groups of process `pid` (`Groups:` in `/proc/<pid>/status`); empty if
/// it cannot be read.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// The process at the other end of `stream` (`SO_PEERCRED`).
fn peer_credentials(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is `cred`'s size, as
    // getsockopt(SO_PEERCRED) requires; the fd is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Accepts control connections until the listener fails; each permitted one is served on its
/// own thread.
pub fn serve(listener: UnixListener, handler: Arc<dyn Handler>, access: Access) {
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
        // A client that never reads its replies must not hold a slot for good.
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        match peer_credentials(&stream) {
            Ok(peer) if access.allows(peer) => {}
            Ok(Peer { pid, uid, gid }) => {
                tracing::warn!(
                    pid,
                    uid,
                    gid,
                    "control connection refused: not root, the node's user or its control group"
                );
                let _ = write_reply(
                    &mut stream,
                    &Reply::error(format!(
                        "permission denied: uid {uid} may not use this node's control socket (root, the node's user{})",
                        access
                            .group
                            .map_or(String::new(), |g| format!(" or group {g}"))
                    )),
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control connection refused: no peer credentials");
                continue;
            }
        }
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

fn write_reply(stream: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve_one(stream: UnixStream, handler: &dyn Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let writer = stream.try_clone()?;
    serve_lines(BufReader::new(stream), writer, handler)
}

/// Answers the requests read from `reader`, one per line, with one reply line each on
/// `writer`, until the end of the input or a line longer than [`MAX_LINE`] (answered with an
/// error). Blank lines are skipped; a line that is not a [`Request`] gets an error reply.
pub(crate) fn serve_lines(
    mut reader: impl BufRead,
    mut writer: impl Write,
    handler: &dyn Handler,
) -> io::Result<()> {
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
    let mut stream = UnixStream::connect(path).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            ControlError::PermissionDenied(path.to_owned())
        } else {
            io_err(e)
        }
    })?;
    // A drain moves every connection, round after round; the rest answer at once.
    let wait = match request {
        Request::Drain { .. } | Request::Migrate { .. } => Duration::from_secs(600),
        _ => Duration::from_secs(30),
    };
    stream.set_read_timeout(Some(wait)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    // The node may answer and close before reading the request (a refused peer): its
    // reply is still there to read when the write fails.
    let written = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    let read = reader.read_line(&mut reply);
    if reply.is_empty() {
        written.map_err(io_err)?;
        read.map_err(io_err)?;
    }
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
        let listener = bind(&path, Access::default()).unwrap();
        std::thread::spawn(move || serve(listener, Arc::new(Echo), Access::default()));
        assert!(matches!(
            bind(&path, Access::default()),
            Err(ControlError::InUse(_))
        ));

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

    #[test]
    fn bind_sets_the_mode_replaces_only_stale_sockets_and_never_other_files() {
        let dir = std::env::temp_dir().join(format!("fs-ctl-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        // A regular file at the path is left alone, and the error names it.
        std::fs::write(&path, b"precious").unwrap();
        let e = bind(&path, Access::default()).unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::NotASocket {
                    kind: "a regular file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&path.display().to_string()));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A directory too.
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(
            bind(&path, Access::default()),
            Err(ControlError::NotASocket {
                kind: "a directory",
                ..
            })
        ));
        std::fs::remove_dir(&path).unwrap();
        // 0600 without a group; a socket nobody listens on is replaced.
        let l = bind(&path, Access::default()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        let l = bind(&path, Access { group: Some(0) }).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 0);
        drop(l);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn access_admits_root_the_node_s_user_and_the_group_only() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let own = std::process::id() as i32;
        let no_group = Access::default();
        let peer = |uid, gid| Peer { pid: own, uid, gid };
        assert!(no_group.allows(peer(0, 0)));
        assert!(no_group.allows(peer(me, 12345)));
        assert!(!no_group.allows(peer(65534, 65534)) || me == 65534);
        let group = Access { group: Some(4242) };
        assert!(group.allows(peer(65534, 4242)));
        assert!(!group.allows(peer(65534, 65534)) || me == 65534);
    }
}
