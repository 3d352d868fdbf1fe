//! Load generators on kernel sockets: they run on threads that joined the client namespace.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowshift_core::app::counting::fill as counting_fill;
use flowshift_testbed::oracle::CountingVerifier;

/// Bytes moved and the time it took.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Transfer {
    /// Application bytes.
    pub(crate) bytes: u64,
    /// Wall time, seconds.
    pub(crate) seconds: f64,
}

impl Transfer {
    /// Gigabits per second.
    pub(crate) fn gbit_s(&self) -> f64 {
        if self.seconds <= 0.0 {
            0.0
        } else {
            self.bytes as f64 * 8.0 / self.seconds / 1e9
        }
    }
}

/// Reads from a `source` service at `addr` for `duration`, every byte checked against the
/// counting stream (an error names the first wrong byte).
pub(crate) fn download(addr: SocketAddr, duration: Duration) -> io::Result<Transfer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut verifier = CountingVerifier::new();
    while start.elapsed() < duration {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source closed early",
            ));
        }
        verifier
            .feed(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    let bytes = verifier.offset();
    let seconds = start.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Both);
    Ok(Transfer { bytes, seconds })
}

/// Writes the counting stream to a `sink` service at `addr` for `duration`, half-closes and
/// waits for its `<bytes> <crc>` line, so the time covers delivery. Checks the byte count and
/// the CRC-32 it reports against what was sent.
pub(crate) fn upload(addr: SocketAddr, duration: Duration) -> io::Result<Transfer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // 256 KiB of the counting stream at a time; the CRC of what was sent, as sent.
    let mut buf = vec![0u8; 256 * 1024];
    let mut crc = crc32fast::Hasher::new();
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        counting_fill(bytes, &mut buf);
        crc.update(&buf);
        s.write_all(&buf)?;
        bytes += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    let seconds = start.elapsed().as_secs_f64();
    let reported: u64 = line
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    if reported != bytes {
        return Err(io::Error::other(format!(
            "sink reported {reported} bytes, sent {bytes}"
        )));
    }
    let sent_crc = format!("{:08x}", crc.finalize());
    if line.split_whitespace().nth(1) != Some(sent_crc.as_str()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sink reported `{}`, sent CRC {sent_crc}", line.trim()),
        ));
    }
    Ok(Transfer { bytes, seconds })
}

/// `flows` parallel downloads; the sum.
pub(crate) fn parallel_download(
    addr: SocketAddr,
    flows: usize,
    duration: Duration,
) -> io::Result<Transfer> {
    let handles: Vec<_> = (0..flows)
        .map(|_| std::thread::spawn(move || download(addr, duration)))
        .collect();
    let mut total = Transfer::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| io::Error::other("download thread panicked"))??;
        total.bytes += t.bytes;
        total.seconds = total.seconds.max(t.seconds);
    }
    Ok(total)
}

/// New connections per second: `threads` loops of connect, one byte through `echo`, close.
pub(crate) fn connection_rate(
    addr: SocketAddr,
    threads: usize,
    duration: Duration,
) -> io::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    let r = (|| -> io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        reset_on_close(&s); // no TIME-WAIT pile-up in the client's port range
                        s.write_all(b"x")?;
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > done.load(Ordering::Relaxed) / 100 + 10 {
        return Err(io::Error::other(format!(
            "{failed} connection attempts failed"
        )));
    }
    Ok(done.load(Ordering::Relaxed) as f64 / secs)
}

/// SO_LINGER with a zero timeout: `close` sends RST instead of FIN.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` is a valid linger struct of the size given; `s` is an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// Opens `n` connections to `echo` at `addr`, each sending `payload` bytes of the counting
/// stream (at least one) and reading them back checked, so it is fully established and has
/// moved data both ways, and returns them, idle.
pub(crate) fn open_idle(addr: SocketAddr, n: usize, payload: usize) -> io::Result<Vec<TcpStream>> {
    open_idle_from(addr, n, payload, None)
}

/// As [`open_idle`], from `source` if given (a connection at a time: the throughput
/// benchmark runs several `idle-client` processes, a source address each, for more).
pub(crate) fn open_idle_from(
    addr: SocketAddr,
    n: usize,
    payload: usize,
    source: Option<Ipv4Addr>,
) -> io::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    let mut data = vec![0u8; payload.max(1)];
    counting_fill(0, &mut data);
    let mut back = vec![0u8; data.len()];
    for i in 0..n {
        let fail = |e: io::Error| io::Error::new(e.kind(), format!("connection {i}: {e}"));
        let mut s = match source {
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(fail)?,
            Some(src) => {
                let sock = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .map_err(fail)?;
                sock.bind(&SocketAddr::new(src.into(), 0).into())
                    .map_err(fail)?;
                sock.connect_timeout(&addr.into(), Duration::from_secs(10))
                    .map_err(fail)?;
                sock.into()
            }
        };
        // Generous: on a loaded 2-core machine a lost segment costs RTO backoffs (1 s, 2 s, …)
        // and a memory benchmark should not fail on a slow echo.
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&data).map_err(fail)?;
        s.read_exact(&mut back).map_err(fail)?;
        if back != data {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("connection {i}: echo returned other bytes"),
            ));
        }
        conns.push(s);
    }
    Ok(conns)
}
