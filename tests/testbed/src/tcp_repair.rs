//! Linux `TCP_REPAIR`: capture an established kernel TCP socket on one node and rebuild it on
//! another, the way CRIU's libsoccr does it (criu `soccr/soccr.c`: `libsoccr_save`,
//! `libsoccr_restore`) against the kernel's `do_tcp_setsockopt` / `do_tcp_getsockopt`
//! (net/ipv4/tcp.c). Needs CAP_NET_ADMIN. This is the kernel baseline flowshift's own
//! migration is measured against.
//!
//! What the kernel allows, and in which order:
//! - `TCP_REPAIR=1` first. In repair mode `close()` disconnects silently (no FIN, no RST:
//!   `__tcp_close` → `tcp_disconnect`, which skips the reset for a socket under repair), and
//!   `connect()` sends no SYN (`tcp_connect` → `tcp_finish_connect`): the socket is simply
//!   established.
//! - `TCP_QUEUE_SEQ` reads/writes `write_seq` or `rcv_nxt` of the queue chosen with
//!   `TCP_REPAIR_QUEUE`; writing is allowed only before `connect()` (state CLOSE).
//!   `connect()` then sets `snd_una = snd_nxt = write_seq`.
//! - In repair mode `recv(MSG_PEEK)` on the send queue returns its bytes (from the first
//!   not-fully-acknowledged skb); `send()` on the send queue appends bytes marked as already
//!   sent (they go out again only as retransmissions); `send()` on the receive queue appends
//!   received-but-unread bytes and advances `rcv_nxt`. Bytes that had never been sent
//!   (`SIOCOUTQNSD`) are written after repair mode ends, as ordinary data, as CRIU does.
//! - A socket in repair mode still transmits (pacing, TSQ, ACKs), and with the send queue
//!   selected it marks its whole write queue sent without transmitting it: see [`capture`]
//!   for how the sent/never-sent split is read exactly.
//! - `connect()` sizes segments from the MSS clamp it finds, so the clamp goes in with
//!   `TCP_MAXSEG` before `connect()` too (else 536-byte segments; libsoccr does not).
//! - `TCP_REPAIR_OPTIONS` (MSS clamp, window scales, SACK, timestamps) only once established;
//!   `TCP_TIMESTAMP` (an opaque clock value, read on the source, written on the target) only in
//!   repair mode; `TCP_REPAIR_WINDOW` only after the receive queue has been refilled: the kernel
//!   checks `rcv_wup` against the current `rcv_nxt` (else EINVAL).
//! - `TCP_REPAIR=0` sends a window probe (a pure ACK with `snd_una - 1`) whose answer tells
//!   the new socket what the peer has received.
//!
//! Only ESTABLISHED sockets are handled (no half-closed ones, no SYN_SENT), IPv4 only.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use libc::c_int;

// From include/uapi/linux/tcp.h (the libc crate has the option names, not these values).
/// `TCP_REPAIR_ON`.
const TCP_REPAIR_ON: c_int = 1;
/// `TCP_REPAIR_OFF` (sends a window probe).
const TCP_REPAIR_OFF: c_int = 0;
/// `TCP_NO_QUEUE`.
const TCP_NO_QUEUE: c_int = 0;
/// `TCP_RECV_QUEUE`.
const TCP_RECV_QUEUE: c_int = 1;
/// `TCP_SEND_QUEUE`.
const TCP_SEND_QUEUE: c_int = 2;
/// `TCPI_OPT_TIMESTAMPS` (`tcpi_options` of `struct tcp_info`).
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `TCPI_OPT_SACK`.
pub const TCPI_OPT_SACK: u8 = 2;
/// `TCPI_OPT_WSCALE`.
pub const TCPI_OPT_WSCALE: u8 = 4;
// From include/net/tcp.h (kernel-internal, used by TCP_REPAIR_OPTIONS):
/// `TCPOPT_MSS`.
const TCPOPT_MSS: u32 = 2;
/// `TCPOPT_WINDOW`.
const TCPOPT_WINDOW: u32 = 3;
/// `TCPOPT_SACK_PERM`.
const TCPOPT_SACK_PERM: u32 = 4;
/// `TCPOPT_TIMESTAMP`.
const TCPOPT_TIMESTAMP: u32 = 8;
// From include/uapi/linux/sockios.h: SIOCINQ = FIONREAD, SIOCOUTQ = TIOCOUTQ.
/// `SIOCINQ`: bytes received and not read.
const SIOCINQ: libc::Ioctl = libc::FIONREAD;
/// `SIOCOUTQ`: bytes written and not acknowledged (sent or not).
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
/// `SIOCOUTQNSD`: bytes written and never sent.
const SIOCOUTQNSD: libc::Ioctl = 0x894B;
/// `TCP_ESTABLISHED` (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
/// Extra room for a peek of the send queue: its first skb can start before `snd_una` when
/// it was acknowledged only in part (tcp_peek_sndq copies whole skbs).
const PEEK_SLACK: usize = 1 << 20;

/// `struct tcp_repair_opt` (include/uapi/linux/tcp.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TcpRepairOpt {
    opt_code: u32,
    opt_val: u32,
}

/// `struct tcp_repair_window` (include/uapi/linux/tcp.h), as `TCP_REPAIR_WINDOW` reads and
/// writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's window.
    pub snd_wnd: u32,
    /// The largest window the peer ever offered.
    pub max_window: u32,
    /// Our advertised window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: u32,
}

/// Everything needed to rebuild an established connection elsewhere.
#[derive(Debug, Clone)]
pub struct TcpState {
    /// Our address and port.
    pub local: SocketAddrV4,
    /// The peer's address and port.
    pub peer: SocketAddrV4,
    /// `write_seq`: the sequence number after the last byte written.
    pub send_seq: u32,
    /// `rcv_nxt`: the next sequence number expected from the peer.
    pub recv_seq: u32,
    /// Bytes written and not yet acknowledged, oldest first (sent ones, then unsent ones).
    pub send_queue: Vec<u8>,
    /// How many of the last `send_queue` bytes were never sent.
    pub unsent: usize,
    /// Bytes received and not yet read by the application.
    pub recv_queue: Vec<u8>,
    /// `tcpi_options`: `TCPI_OPT_*` bits negotiated at the handshake.
    pub options: u8,
    /// Our send window scale (the peer's shift).
    pub snd_wscale: u8,
    /// Our receive window scale.
    pub rcv_wscale: u8,
    /// MSS clamp (what the peer announced), `TCP_MAXSEG` in repair mode.
    pub mss_clamp: u32,
    /// `TCP_TIMESTAMP`, when timestamps are on: the socket's timestamp clock now.
    pub timestamp: Option<u32>,
    /// Window state.
    pub window: RepairWindow,
    /// `SO_SNDBUF` (the kernel's doubled value).
    pub sndbuf: c_int,
    /// `SO_RCVBUF` (the kernel's doubled value).
    pub rcvbuf: c_int,
}

impl TcpState {
    /// Bytes of the send queue that had been sent (restored as sent, in repair mode).
    pub fn sent(&self) -> &[u8] {
        &self.send_queue[..self.send_queue.len() - self.unsent]
    }

    /// Bytes of the send queue that had never been sent (written again after repair).
    pub fn unsent_bytes(&self) -> &[u8] {
        &self.send_queue[self.send_queue.len() - self.unsent..]
    }
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn setopt<T>(fd: RawFd, level: c_int, name: c_int, val: &T, what: &str) -> io::Result<()> {
    // SAFETY: `val` points to a live `T` of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(os_err(what)) }
}

fn set_int(fd: RawFd, level: c_int, name: c_int, val: c_int, what: &str) -> io::Result<()> {
    setopt(fd, level, name, &val, what)
}

/// getsockopt into a `T` that any bit pattern is valid for (plain C structs and integers).
fn getopt<T: Copy>(fd: RawFd, level: c_int, name: c_int, what: &str) -> io::Result<T> {
    let mut val = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is writable for `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, name, val.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(os_err(what));
    }
    // SAFETY: zero-initialised, then (partly) written by the kernel; every T used here is a
    // C integer or struct of integers, valid for any bytes.
    Ok(unsafe { val.assume_init() })
}

fn ioctl_int(fd: RawFd, req: libc::Ioctl, what: &str) -> io::Result<usize> {
    let mut v: c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd, req, &mut v) } != 0 {
        return Err(os_err(what));
    }
    usize::try_from(v).map_err(|_| io::Error::other(format!("{what}: negative {v}")))
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn addr_of(fd: RawFd, peer: bool) -> io::Result<SocketAddrV4> {
    let mut sa = std::mem::MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` is writable for `len` bytes.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, sa.as_mut_ptr().cast(), &mut len)
        } else {
            libc::getsockname(fd, sa.as_mut_ptr().cast(), &mut len)
        }
    };
    if rc != 0 {
        return Err(os_err(if peer { "getpeername" } else { "getsockname" }));
    }
    // SAFETY: zeroed and filled by the kernel.
    let sa = unsafe { sa.assume_init() };
    if sa.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::other("not an IPv4 socket"));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(sa.sin_port),
    ))
}

/// The segment size the socket sends with now (`tcpi_snd_mss`).
pub fn send_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let info: libc::tcp_info = getopt(fd.as_raw_fd(), libc::SOL_TCP, libc::TCP_INFO, "TCP_INFO")?;
    Ok(info.tcpi_snd_mss)
}

/// Turns repair mode on.
pub fn repair_on(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(
        fd.as_raw_fd(),
        libc::SOL_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )
}

/// Turns repair mode off; the kernel sends a window probe, and the socket runs normally.
pub fn repair_off(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(
        fd.as_raw_fd(),
        libc::SOL_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_OFF,
        "TCP_REPAIR off",
    )
}

fn select_queue(fd: RawFd, q: c_int) -> io::Result<()> {
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_QUEUE,
        q,
        "TCP_REPAIR_QUEUE",
    )
}

/// Puts `fd` in repair mode and reads its state; the socket stays in repair mode, silent
/// (see below), to be closed once the target runs: closing it in repair mode sends nothing.
/// The caller should have stopped writing to it, and should keep the peer's packets away
/// from it (data from the peer arriving after the capture would be lost).
///
/// The split of the send queue into sent and never-sent bytes must match the wire exactly.
/// Sent bytes are restored as in flight, so if the source transmits more after the capture,
/// the peer acknowledges bytes the target never "sent", and the target drops every such ACK
/// (`tcp_ack`: ack of unsent data): the connection hangs. If instead bytes the source never
/// sent are restored as sent, only a retransmission timeout brings them out. Two kernel
/// behaviours matter (net/ipv4/tcp_output.c, `tcp_write_xmit`):
/// - a socket keeps transmitting in repair mode (pacing timers, TSQ work run by
///   `release_sock()` after any socket option, a late ACK), unless
/// - the send queue is selected: then it marks its *whole* write queue sent without
///   transmitting, ahead of the congestion-window and receive-window checks.
///
/// So the capture first stops new data with a zero send window (`TCP_REPAIR_WINDOW` with the
/// queue unselected: window-limited, nothing is marked), reads the never-sent count, and only
/// then selects the send queue to read `write_seq` and the bytes; the real window is what is
/// restored. Selecting the send queue keeps the source silent afterwards (retransmissions of
/// bytes already sent can still leave; they are harmless).
pub fn capture(fd: BorrowedFd<'_>) -> io::Result<TcpState> {
    let fd = fd.as_raw_fd();
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )?;
    let info: libc::tcp_info = getopt(fd, libc::SOL_TCP, libc::TCP_INFO, "TCP_INFO")?;
    if info.tcpi_state != TCP_ESTABLISHED {
        return Err(io::Error::other(format!(
            "socket in TCP state {}, only ESTABLISHED (1) can be moved",
            info.tcpi_state
        )));
    }
    // The receive queue (soccr get_queue).
    select_queue(fd, TCP_RECV_QUEUE)?;
    let inq = ioctl_int(fd, SIOCINQ, "SIOCINQ")?;
    let recv_seq: u32 = getopt(
        fd,
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        "TCP_QUEUE_SEQ (receive)",
    )?;
    let recv_queue = peek(fd, inq, 1, "receive")?;
    select_queue(fd, TCP_NO_QUEUE)?;
    // The window to restore, then a zero send window: no new data leaves from here on.
    let get_window = || -> io::Result<RepairWindow> {
        getopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_REPAIR_WINDOW,
            "TCP_REPAIR_WINDOW (get)",
        )
    };
    let mut tries = 0;
    let (unsent, window) = loop {
        let window = get_window()?;
        let closed = RepairWindow {
            snd_wnd: 0,
            ..window
        };
        setopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_REPAIR_WINDOW,
            &closed,
            "TCP_REPAIR_WINDOW (zero)",
        )?;
        let unsent = ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")?;
        // An ACK that arrived meanwhile reopens the window (and may have let data out).
        if get_window()?.snd_wnd == 0 && ioctl_int(fd, SIOCOUTQNSD, "SIOCOUTQNSD")? == unsent {
            break (unsent, window);
        }
        tries += 1;
        if tries == 10 {
            return Err(io::Error::other(
                "the send window kept reopening during the capture",
            ));
        }
    };
    // Now the send queue: from here on the socket marks data sent instead of sending it, and
    // write_seq and the bytes no longer change (the application is stopped).
    select_queue(fd, TCP_SEND_QUEUE)?;
    let (send_seq, send_queue) = loop {
        let outq = ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")?;
        let seq: u32 = getopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_QUEUE_SEQ,
            "TCP_QUEUE_SEQ (send)",
        )?;
        let queue = peek(fd, outq, PEEK_SLACK, "send");
        // A late ACK can shrink the queue while it is read.
        if ioctl_int(fd, SIOCOUTQ, "SIOCOUTQ")? == outq {
            break (seq, queue?);
        }
        tries += 1;
        if tries == 20 {
            return Err(io::Error::other(
                "the send queue kept changing during the capture",
            ));
        }
    };
    if unsent > send_queue.len() {
        return Err(io::Error::other(format!(
            "never-sent bytes {unsent} > send queue {}",
            send_queue.len()
        )));
    }
    // Options (soccr get_stream_options): in repair mode TCP_MAXSEG reads the MSS clamp.
    let mss_clamp: c_int = getopt(fd, libc::SOL_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let options = info.tcpi_options;
    // tcpi_snd_wscale:4 then tcpi_rcv_wscale:4, low bits first.
    let (snd_wscale, rcv_wscale) = if options & TCPI_OPT_WSCALE != 0 {
        (
            info.tcpi_snd_rcv_wscale & 0x0f,
            info.tcpi_snd_rcv_wscale >> 4,
        )
    } else {
        (0, 0)
    };
    let timestamp = if options & TCPI_OPT_TIMESTAMPS != 0 {
        let t: u32 = getopt(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
        Some(t)
    } else {
        None
    };
    let sndbuf: c_int = getopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")?;
    let rcvbuf: c_int = getopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")?;
    Ok(TcpState {
        local: addr_of(fd, false)?,
        peer: addr_of(fd, true)?,
        send_seq,
        recv_seq,
        send_queue,
        unsent,
        recv_queue,
        options,
        snd_wscale,
        rcv_wscale,
        mss_clamp: mss_clamp as u32,
        timestamp,
        window,
        sndbuf,
        rcvbuf,
    })
}

/// Peeks `len` bytes of the selected queue. The send queue can return more (its head skb
/// partly acknowledged): the queue is its last `len` bytes.
fn peek(fd: RawFd, len: usize, slack: usize, which: &str) -> io::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len + slack];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(os_err(&format!("peeking the {which} queue")));
    }
    let n = n as usize;
    if n < len || n == buf.len() {
        return Err(io::Error::other(format!(
            "peeking the {which} queue returned {n} bytes, expected {len}"
        )));
    }
    buf.truncate(n);
    buf.drain(..n - len);
    Ok(buf)
}

/// Rebuilds `st` on `fd`, a fresh TCP socket created in the target's network namespace that
/// owns `st.local`'s address. Leaves the socket established and in repair mode, with no
/// queue selected: turn it on with [`repair_off`] once the peer's packets reach this node, then
/// write [`TcpState::unsent_bytes`] as ordinary data before anything new.
pub fn restore(fd: BorrowedFd<'_>, st: &TcpState) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    // The restored sent bytes must fit the send buffer at once (nothing is acknowledged in
    // repair mode; a fresh socket's buffer is sized for 10 segments): take the source's size,
    // or twice the sent bytes (skb overhead) if that is more. The never-sent bytes are written
    // later like any data. The kernel doubles the value given; FORCE lifts the wmem_max cap
    // (CAP_NET_ADMIN). Like any SO_SNDBUF, it ends send-buffer autotuning on this socket.
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        st.sndbuf.max(2 * st.sent().len() as c_int + 65536) / 2,
        "SO_SNDBUFFORCE",
    )?;
    // The MSS clamp before connect(): connect() computes the segment size from the clamp it
    // finds (536 on a fresh socket), and TCP_REPAIR_OPTIONS' MSS, which can only come after
    // connect(), changes the clamp without recomputing it. Without this the restored socket
    // sends 536-byte segments (measured on 6.18; libsoccr sets only TCP_REPAIR_OPTIONS).
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_MAXSEG,
        st.mss_clamp as c_int,
        "TCP_MAXSEG",
    )?;
    if !st.recv_queue.is_empty() {
        set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            st.rcvbuf / 2,
            "SO_RCVBUFFORCE",
        )?;
    }
    let local = sockaddr(st.local);
    // SAFETY: `local` is a valid sockaddr_in of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err(&format!("bind {}", st.local)));
    }
    // Sequence numbers of the queues' starts (soccr libsoccr_set_sk_data_noq): refilling the
    // queues below advances them to the captured values.
    select_queue(fd, TCP_RECV_QUEUE)?;
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        st.recv_seq.wrapping_sub(st.recv_queue.len() as u32) as c_int,
        "TCP_QUEUE_SEQ (receive)",
    )?;
    select_queue(fd, TCP_SEND_QUEUE)?;
    set_int(
        fd,
        libc::SOL_TCP,
        libc::TCP_QUEUE_SEQ,
        st.send_seq.wrapping_sub(st.send_queue.len() as u32) as c_int,
        "TCP_QUEUE_SEQ (send)",
    )?;
    let peer = sockaddr(st.peer);
    // SAFETY: as for bind. In repair mode connect() sends no SYN and returns established.
    let rc = unsafe {
        libc::connect(
            fd,
            (&peer as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err(&format!("connect (repair) to {}", st.peer)));
    }
    let mut opts = Vec::with_capacity(4);
    if st.options & TCPI_OPT_SACK != 0 {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if st.options & TCPI_OPT_WSCALE != 0 {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_WINDOW,
            opt_val: u32::from(st.snd_wscale) | (u32::from(st.rcv_wscale) << 16),
        });
    }
    if st.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push(TcpRepairOpt {
            opt_code: TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    opts.push(TcpRepairOpt {
        opt_code: TCPOPT_MSS,
        opt_val: st.mss_clamp,
    });
    // SAFETY: `opts` holds `opts.len()` packed tcp_repair_opt structs.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            (opts.len() * std::mem::size_of::<TcpRepairOpt>()) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("TCP_REPAIR_OPTIONS"));
    }
    if let Some(ts) = st.timestamp {
        set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_TIMESTAMP,
            ts as c_int,
            "TCP_TIMESTAMP",
        )?;
    }
    if !st.recv_queue.is_empty() {
        select_queue(fd, TCP_RECV_QUEUE)?;
        send_all(fd, &st.recv_queue, "receive")?;
    }
    if !st.sent().is_empty() {
        select_queue(fd, TCP_SEND_QUEUE)?;
        send_all(fd, st.sent(), "send")?;
    }
    // Only now: the kernel checks rcv_wup against the refilled rcv_nxt.
    setopt(
        fd,
        libc::SOL_TCP,
        libc::TCP_REPAIR_WINDOW,
        &st.window,
        "TCP_REPAIR_WINDOW (set)",
    )?;
    select_queue(fd, TCP_NO_QUEUE)
}

/// Writes `data` into the selected repair queue. Never blocks: nothing frees buffer space in
/// repair mode, so a full buffer is an error.
fn send_all(fd: RawFd, data: &[u8], which: &str) -> io::Result<()> {
    let mut at = 0;
    // Bounded chunks: the receive queue is refilled with one linear-ish skb per call.
    const CHUNK: usize = 256 * 1024;
    while at < data.len() {
        let k = (data.len() - at).min(CHUNK);
        // SAFETY: `data[at..at + k]` is readable.
        let n = unsafe {
            libc::send(
                fd,
                data[at..].as_ptr().cast(),
                k,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return Err(os_err(&format!(
                "restoring the {which} queue ({at} of {} bytes written)",
                data.len()
            )));
        }
        at += n as usize;
    }
    Ok(())
}
