//! Live handoffs of one kernel TCP connection between node-a and node-b with Linux
//! `TCP_REPAIR` (what CRIU and Prism do): the kernel baseline of flowshift's migration.
//!
//! Both node namespaces own the service address on their loopback; the router's route for it
//! points to the node that owns the connection. A client in the client namespace downloads the
//! counting stream from a server socket on node-a; [`run`] moves that socket back and forth
//! while the download runs and records, per handoff, when the stream froze and when it ran
//! again, and on the client every read (time and bytes), so the caller can compute stalls and
//! throughput around each handoff. Everything the client receives is checked against the
//! counting stream (the oracle) and its CRC-32 against the sender's.
//!
//! One handoff, from node S to node T (timed, in this order):
//! 1. **pause**: the sending thread on S stops writing (the application is frozen);
//! 2. **lock**: the router's route for the service address becomes a blackhole, so no packet
//!    of the client reaches S (or T) while the state is read and rebuilt — CRIU's network lock;
//! 3. **capture**: the socket on S enters repair mode, its send window is closed so that no
//!    new data leaves it, and its state is read ([`tcp_repair::capture`]); it stays in repair
//!    mode, silent;
//! 4. **restore**: a fresh socket in T's namespace is rebuilt from it, still in repair mode
//!    ([`tcp_repair::restore`]);
//! 5. **route**: the router's route points to T;
//! 6. **resume**: T's socket leaves repair mode (its window probe asks the client for an ACK)
//!    and a sending thread on T writes the never-sent bytes, then the stream from where S
//!    stopped. S's socket is then closed while still in repair mode: nothing is sent. (Closing
//!    it only now, with the route already on T, means no late packet of the client can find
//!    S without a socket and draw a reset.)
//!
//! What `TCP_REPAIR` does not carry: the congestion window (the target starts at 10
//! segments), the RTT estimate (the target's RTO is the 3 s fallback until its first ACK),
//! out-of-order state, and socket options not restored here (congestion control comes from
//! the target's default, the send buffer is fixed to the source's).

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::oracle::CountingVerifier;
use crate::service::ServiceRoute;
use crate::tcp_repair::{self, TcpState};
use crate::testbed::{Node, SERVICE_ADDR, Testbed, TestbedError};

/// Bytes per read of the client.
const CHUNK: usize = 256 * 1024;
/// Bytes per write of the sending thread: small enough that pausing it (it stops between two
/// writes) does not wait for a long copy.
const SEND_CHUNK: usize = 64 * 1024;

/// How to run the handoffs.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// Port of the service on the service address.
    pub port: u16,
    /// Handoffs to do (A→B, B→A, …).
    pub handoffs: usize,
    /// Time from the start of one handoff to the start of the next. Below 500 ms some
    /// handoffs stall until the next one: the client answers the window probe of each
    /// restored socket, an out-of-window pure ACK, at most once per `tcp_invalid_ratelimit`
    /// (500 ms by default), and a restored socket with more bytes in flight than its initial
    /// congestion window (10 segments) sends nothing until it hears from the client.
    pub interval: Duration,
    /// Download time before the first handoff.
    pub warmup: Duration,
    /// Download time after the last handoff before the stream ends.
    pub settle: Duration,
    /// No handoff starts after this much time from the connection's start.
    pub max_duration: Duration,
    /// End the stream after this many bytes (the handoffs then continue on an idle
    /// connection if the stream is done before them); `None`: the stream runs until the last
    /// handoff has settled.
    pub total_bytes: Option<u64>,
    /// Bytes per second the client reads at (`None`: as fast as it can).
    pub client_rate: Option<u64>,
    /// Break the restores on purpose, to show that the checks catch it (tests only).
    pub fault: Option<Fault>,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        Self {
            port: 7019,
            handoffs: 100,
            interval: Duration::from_millis(600),
            warmup: Duration::from_secs(1),
            settle: Duration::from_millis(300),
            max_duration: Duration::from_secs(90),
            total_bytes: None,
            client_rate: None,
            fault: None,
        }
    }
}

/// A deliberate mistake in the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip the last byte of every restored send queue (the newest byte written, which the
    /// client has not received yet when the queue is not empty).
    CorruptSendQueueTail,
}

/// One handoff. Times are from the run's start (just before the client connects).
#[derive(Debug, Clone)]
pub struct HandoffRecord {
    /// Source node.
    pub from: Node,
    /// Target node.
    pub to: Node,
    /// Bytes of the stream the application had written when it was paused.
    pub stream_offset: u64,
    /// Send-queue bytes captured (written, not acknowledged).
    pub send_queue: usize,
    /// Of those, bytes never sent.
    pub unsent: usize,
    /// Receive-queue bytes captured.
    pub recv_queue: usize,
    /// Segment size the source socket sent with.
    pub source_mss: u32,
    /// Segment size the restored socket sends with.
    pub target_mss: u32,
    /// When the handoff began (the application was told to pause).
    pub freeze: Duration,
    /// When the target's socket left repair mode and the application ran again there.
    pub restored: Duration,
    /// Pausing the sending thread.
    pub pause: Duration,
    /// Blackholing the route.
    pub lock: Duration,
    /// Reading the state on the source.
    pub capture: Duration,
    /// Rebuilding the socket on the target.
    pub restore: Duration,
    /// Pointing the route to the target.
    pub route: Duration,
    /// Leaving repair mode on the target.
    pub unrepair: Duration,
}

impl HandoffRecord {
    /// Time the connection was owned by no running application: `restored - freeze`.
    pub fn downtime(&self) -> Duration {
        self.restored.saturating_sub(self.freeze)
    }
}

/// What [`run`] measured. A run that returns is byte-exact: every byte the client received
/// matched the counting stream, the client saw the end of the stream after exactly the bytes
/// the server wrote, and both CRC-32s agree; the connection was never reset.
#[derive(Debug, Clone)]
pub struct HandoffRun {
    /// Handoffs asked for.
    pub requested: usize,
    /// The handoffs done, in order.
    pub handoffs: Vec<HandoffRecord>,
    /// Every read of the client: (nanoseconds from the run's start, bytes received so far).
    pub reads: Vec<(u64, u64)>,
    /// When the warm-up ended (first handoff could start), from the run's start.
    pub warmup_end: Duration,
    /// Bytes the client received (= bytes the server wrote).
    pub received: u64,
    /// CRC-32 of them (= the server's).
    pub crc32: u32,
    /// From the run's start to the client's end of stream.
    pub duration: Duration,
}

/// Runs the handoffs on `tb` (see the module docs). Gives node-a and node-b the service
/// address on their loopback for the run, and routes the service address to node-a again
/// afterwards; do not run it while flowshift nodes serve the service address on node-a or
/// node-b.
pub fn run(tb: &Testbed, o: &HandoffOptions) -> Result<HandoffRun, TestbedError> {
    let _cleanup = Cleanup::setup(tb)?;
    let mut route = tb.service_route()?;
    route.to_node(Node::A)?;
    let addr = SocketAddr::from((SERVICE_ADDR, o.port));
    let listener = tb
        .node_a()
        .run(|| -> io::Result<TcpListener> {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(io_err("listening on node-a"))?;
    let epoch = Instant::now();
    let abort = AtomicBool::new(false);
    let client_done = AtomicBool::new(false);
    let client_ns = tb.client().clone();
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            let r = client_ns.run(|| client(addr, o.client_rate, epoch, &abort));
            client_done.store(true, Ordering::Release);
            r
        });
        let mut ctl = Controller {
            tb,
            o,
            route: &mut route,
            epoch,
            client_done: &client_done,
            handoffs: Vec::new(),
            writer: None,
            warmup_end: Duration::ZERO,
        };
        let served = ctl.serve(listener);
        let handoffs = std::mem::take(&mut ctl.handoffs);
        let warmup_end = ctl.warmup_end;
        if served.is_err() {
            abort.store(true, Ordering::Release);
            // Stop sending; closing the socket (unless in repair mode) ends the client's read.
            if let Some(w) = ctl.writer.take() {
                drop(w.stop());
            }
        }
        let report = client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // The client's failure explains the controller's (a reset socket cannot be captured),
        // unless the controller stopped the client.
        if let Some(e) = report.error.as_ref().filter(|_| !report.aborted) {
            return Err(other(format!(
                "client: {e} (after {} bytes, {} handoffs)",
                report.received,
                handoffs.len()
            )));
        }
        let (sent, sent_crc) = served?;
        if report.reset {
            return Err(other("client: connection reset".into()));
        }
        if !report.eof {
            return Err(other("client: no end of stream".into()));
        }
        if report.received != sent || report.crc32 != sent_crc {
            return Err(other(format!(
                "client received {} bytes with CRC-32 {:08x}, server wrote {sent} with {sent_crc:08x}",
                report.received, report.crc32
            )));
        }
        Ok(HandoffRun {
            requested: o.handoffs,
            handoffs,
            reads: report.reads,
            warmup_end,
            received: report.received,
            crc32: report.crc32,
            duration: report.end,
        })
    })
}

fn other(msg: String) -> TestbedError {
    TestbedError::Io {
        what: "kernel handoff".into(),
        source: io::Error::other(msg),
    }
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> TestbedError {
    move |source| TestbedError::Io {
        what: what.into(),
        source,
    }
}

/// Adds the service address to both nodes' loopback; on drop removes it again and routes
/// the service address to node-a (as the testbed sets it up).
struct Cleanup<'a> {
    tb: &'a Testbed,
    added: Vec<Node>,
}

impl<'a> Cleanup<'a> {
    fn setup(tb: &'a Testbed) -> Result<Self, TestbedError> {
        let mut c = Cleanup {
            tb,
            added: Vec::new(),
        };
        for n in [Node::A, Node::B] {
            match tb.add_service_address_to_lo(n) {
                Ok(()) => c.added.push(n),
                Err(TestbedError::Command { stderr, .. }) if stderr.contains("File exists") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(c)
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for &n in &self.added {
            let _ =
                self.tb
                    .node(n)
                    .ip(&["addr", "del", &format!("{SERVICE_ADDR}/32"), "dev", "lo"]);
        }
        let _ = self.tb.route_service_to(Node::A);
    }
}

struct Controller<'a> {
    tb: &'a Testbed,
    o: &'a HandoffOptions,
    route: &'a mut ServiceRoute,
    epoch: Instant,
    client_done: &'a AtomicBool,
    handoffs: Vec<HandoffRecord>,
    writer: Option<Writer>,
    warmup_end: Duration,
}

impl Controller<'_> {
    /// Accepts the client, runs the handoffs, ends the stream. Returns the bytes written and
    /// their CRC-32.
    fn serve(&mut self, listener: TcpListener) -> Result<(u64, u32), TestbedError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline || self.client_done.load(Ordering::Acquire) {
                        return Err(other("the client did not connect".into()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(io_err("accept")(e)),
            }
        };
        // No more connections: and a listener on the service port would keep the restored
        // socket from binding it when the connection comes back to node-a.
        drop(listener);
        conn.set_nonblocking(false).map_err(io_err("accept"))?;
        self.writer = Some(Writer::start(Sender {
            fd: OwnedFd::from(conn),
            offset: 0,
            crc: crc32fast::Hasher::new(),
            pending: Vec::new(),
            limit: self.o.total_bytes,
        })?);
        self.sleep_until(self.epoch + self.o.warmup)?;
        self.warmup_end = self.epoch.elapsed();
        let mut owner = Node::A;
        let mut next = Instant::now();
        for _ in 0..self.o.handoffs {
            if self.epoch.elapsed() >= self.o.max_duration {
                break;
            }
            self.sleep_until(next)?;
            next = Instant::now() + self.o.interval;
            let to = if owner == Node::A { Node::B } else { Node::A };
            self.handoff(owner, to)?;
            owner = to;
        }
        let settle = Instant::now() + self.o.settle;
        self.sleep_until(settle)?;
        if let Some(limit) = self.o.total_bytes {
            // Let the sender finish the stream.
            let w = self.writer.as_ref().expect("writer runs");
            while w.progress.load(Ordering::Acquire) < limit {
                if w.handle.is_finished() || self.client_done.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let s = self.writer.take().expect("writer runs").stop()?;
        if !s.pending.is_empty() {
            return Err(other(format!(
                "{} restored bytes still unsent at the end",
                s.pending.len()
            )));
        }
        // End of stream: FIN, then wait for the client to read it (it closes the connection).
        // SAFETY: shutdown(2) on our open socket.
        if unsafe { libc::shutdown(s.fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(io_err("shutdown")(io::Error::last_os_error()));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.client_done.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((s.offset, s.crc.clone().finalize()))
    }

    fn sleep_until(&self, t: Instant) -> Result<(), TestbedError> {
        loop {
            if self.client_done.load(Ordering::Acquire) {
                return Err(other("the client stopped early".into()));
            }
            if let Some(w) = &self.writer
                && w.handle.is_finished()
            {
                return Err(other("the sender stopped early".into()));
            }
            let now = Instant::now();
            if now >= t {
                return Ok(());
            }
            std::thread::sleep((t - now).min(Duration::from_millis(5)));
        }
    }

    fn handoff(&mut self, from: Node, to: Node) -> Result<(), TestbedError> {
        // Before the freeze: a socket in the target's namespace (creation needs a thread there).
        let new_fd = self
            .tb
            .node(to)
            .run(new_tcp_socket)
            .map_err(io_err("socket on the target"))?;
        let t0 = Instant::now();
        let mut s = self.writer.take().expect("writer runs").stop()?;
        let t1 = Instant::now();
        self.route.blackhole()?;
        let t2 = Instant::now();
        let st = tcp_repair::capture(s.fd.as_fd()).map_err(io_err("capture"))?;
        let t3 = Instant::now();
        let faulty;
        let restored_state = match self.o.fault {
            None => &st,
            Some(Fault::CorruptSendQueueTail) => {
                let mut f = st.clone();
                if let Some(b) = f.send_queue.last_mut() {
                    *b ^= 0xff;
                }
                faulty = f;
                &faulty
            }
        };
        tcp_repair::restore(new_fd.as_fd(), restored_state).map_err(io_err("restore"))?;
        let t4 = Instant::now();
        self.route.to_node(to)?;
        let t5 = Instant::now();
        tcp_repair::repair_off(new_fd.as_fd()).map_err(io_err("leaving repair mode"))?;
        let t6 = Instant::now();
        let target_mss = tcp_repair::send_mss(new_fd.as_fd()).map_err(io_err("target MSS"))?;
        // The application resumes on the target: first the bytes the source never sent (and
        // any restored bytes the previous sender had not handed to its kernel yet).
        let queue_start = s.offset - (s.pending.len() + st.send_queue.len()) as u64;
        let mut pending = restored_state.unsent_bytes().to_vec();
        pending.extend_from_slice(&s.pending);
        let stream_offset = s.offset;
        let old_fd = std::mem::replace(&mut s.fd, new_fd);
        s.pending = pending;
        self.writer = Some(Writer::start(s)?);
        let source_mss = tcp_repair::send_mss(old_fd.as_fd()).map_err(io_err("source MSS"))?;
        // Still in repair mode: closing it sends neither FIN nor RST.
        drop(old_fd);
        check_captured(&st, queue_start)?;
        let since = |t: Instant| t.duration_since(self.epoch);
        self.handoffs.push(HandoffRecord {
            from,
            to,
            stream_offset,
            send_queue: st.send_queue.len(),
            unsent: st.unsent,
            recv_queue: st.recv_queue.len(),
            source_mss,
            target_mss,
            freeze: since(t0),
            restored: since(t6),
            pause: t1 - t0,
            lock: t2 - t1,
            capture: t3 - t2,
            restore: t4 - t3,
            route: t5 - t4,
            unrepair: t6 - t5,
        });
        Ok(())
    }
}

/// The captured send queue must be the counting stream from `start` (what the application
/// wrote and the kernel had not seen acknowledged): checks the capture itself.
fn check_captured(st: &TcpState, start: u64) -> Result<(), TestbedError> {
    let mut expected = vec![0u8; st.send_queue.len()];
    fill(start, &mut expected);
    if expected != st.send_queue {
        let at = expected
            .iter()
            .zip(&st.send_queue)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(other(format!(
            "captured send queue ({} bytes from stream offset {start}) differs at offset {}",
            st.send_queue.len(),
            start + at as u64
        )));
    }
    if !st.recv_queue.is_empty() {
        return Err(other(format!(
            "{} bytes in the receive queue: the client sends nothing",
            st.recv_queue.len()
        )));
    }
    Ok(())
}

fn new_tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The counting stream (byte `i` is byte `i % 8` of the little-endian `i / 8`), a word at a
/// time: the oracle's byte-wise generator would limit the sender.
fn fill(offset: u64, buf: &mut [u8]) {
    let mut i = 0;
    let mut at = offset;
    while i < buf.len() && !at.is_multiple_of(8) {
        buf[i] = (at / 8).to_le_bytes()[(at % 8) as usize];
        i += 1;
        at += 1;
    }
    let mut words = buf[i..].chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&(at / 8).to_le_bytes());
        at += 8;
    }
    for b in words.into_remainder() {
        *b = (at / 8).to_le_bytes()[(at % 8) as usize];
        at += 1;
    }
}

/// The server application's state: it moves with the connection.
struct Sender {
    fd: OwnedFd,
    /// Stream bytes generated and accepted by a kernel socket (or pending below).
    offset: u64,
    /// CRC-32 of the stream's first `offset` bytes.
    crc: crc32fast::Hasher,
    /// Bytes before `offset` to hand to the kernel first: a restored never-sent queue.
    pending: Vec<u8>,
    limit: Option<u64>,
}

/// A thread writing the stream to a [`Sender`]'s socket until stopped.
struct Writer {
    handle: JoinHandle<(Sender, io::Result<()>)>,
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    progress: Arc<AtomicU64>,
}

impl Writer {
    fn start(sender: Sender) -> Result<Writer, TestbedError> {
        // SAFETY: plain eventfd(2); the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io_err("eventfd")(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(sender.offset));
        let (st, wk, pr) = (stop.clone(), wake.clone(), progress.clone());
        let handle = std::thread::Builder::new()
            .name("handoff-sender".into())
            .spawn(move || {
                let mut s = sender;
                let r = write_loop(&mut s, &st, wk.as_raw_fd(), &pr);
                (s, r)
            })
            .map_err(io_err("spawning the sender"))?;
        Ok(Writer {
            handle,
            stop,
            wake,
            progress,
        })
    }

    /// Stops the thread between two writes and returns the application state.
    fn stop(self) -> Result<Sender, TestbedError> {
        self.stop.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let (s, r) = self
            .handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        r.map_err(io_err("sending the stream"))?;
        Ok(s)
    }
}

fn write_loop(
    s: &mut Sender,
    stop: &AtomicBool,
    wake: RawFd,
    progress: &AtomicU64,
) -> io::Result<()> {
    let fd = s.fd.as_raw_fd();
    let mut chunk = vec![0u8; SEND_CHUNK];
    let (mut len, mut pos) = (0usize, 0usize);
    let mut sent_pending = 0usize;
    let r = loop {
        if stop.load(Ordering::Acquire) {
            break Ok(());
        }
        let from_pending = sent_pending < s.pending.len();
        let data = if from_pending {
            &s.pending[sent_pending..]
        } else {
            if pos == len {
                let left = s.limit.map_or(SEND_CHUNK as u64, |l| l - s.offset);
                let k = left.min(SEND_CHUNK as u64) as usize;
                if k == 0 {
                    // The whole stream is written: wait to be stopped.
                    wait(&[(wake, libc::POLLIN)]);
                    continue;
                }
                fill(s.offset, &mut chunk[..k]);
                (len, pos) = (k, 0);
            }
            &chunk[pos..len]
        };
        // SAFETY: `data` is readable for its length; `fd` is open.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            let n = n as usize;
            if from_pending {
                sent_pending += n;
            } else {
                s.crc.update(&chunk[pos..pos + n]);
                pos += n;
                s.offset += n as u64;
                progress.store(s.offset, Ordering::Release);
            }
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                wait(&[(fd, libc::POLLOUT), (wake, libc::POLLIN)]);
            }
            io::ErrorKind::Interrupted => {}
            _ => break Err(e),
        }
    };
    s.pending.drain(..sent_pending);
    r
}

/// poll(2) on `fds` for up to a second.
fn wait(fds: &[(RawFd, libc::c_short)]) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of pollfd of the length given.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 1000) };
}

/// What the client saw.
#[derive(Debug, Default)]
struct ClientReport {
    reads: Vec<(u64, u64)>,
    received: u64,
    crc32: u32,
    eof: bool,
    reset: bool,
    /// Stopped because the controller failed.
    aborted: bool,
    error: Option<String>,
    end: Duration,
}

/// Downloads from `addr` until the end of stream, checking every byte against the counting
/// stream; runs on a thread in the client namespace.
fn client(addr: SocketAddr, rate: Option<u64>, epoch: Instant, abort: &AtomicBool) -> ClientReport {
    let mut r = ClientReport::default();
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("connect to {addr}: {e}"));
            return r;
        }
    };
    if let Err(e) = s.set_read_timeout(Some(Duration::from_millis(100))) {
        r.error = Some(format!("read timeout: {e}"));
        return r;
    }
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut verifier = CountingVerifier::new();
    let mut crc = crc32fast::Hasher::new();
    let mut last_data = Instant::now();
    r.reads.reserve(1 << 16);
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                r.eof = true;
                break;
            }
            Ok(n) => {
                let now = Instant::now();
                last_data = now;
                r.received += n as u64;
                r.reads
                    .push((now.duration_since(epoch).as_nanos() as u64, r.received));
                if let Err(m) = verifier.feed(&buf[..n]) {
                    r.error = Some(m.to_string());
                    break;
                }
                crc.update(&buf[..n]);
                if let Some(rate) = rate.filter(|&bps| bps > 0) {
                    let due = start + Duration::from_secs_f64(r.received as f64 / rate as f64);
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if abort.load(Ordering::Acquire) {
                    r.aborted = true;
                    r.error = Some("aborted by the controller".into());
                    break;
                }
                if last_data.elapsed() > Duration::from_secs(20) {
                    r.error = Some("no data for 20 s".into());
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                r.reset = e.kind() == io::ErrorKind::ConnectionReset;
                r.error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    r.crc32 = crc.finalize();
    r.end = epoch.elapsed();
    r
}
