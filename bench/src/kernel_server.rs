//! Plain kernel-socket servers (source, sink, echo): the baseline flowshift is measured against.
//! They run on threads that joined the node namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

/// Serves `source` (counting stream forever) on `addr`.
/// Starts this binary's hidden `kernel-server` command in `ns` (source, sink and echo on
/// `addr`, plain kernel sockets), tracked by `tb` for teardown, and waits until it serves.
/// The caller stops it (kill) when done with it.
pub(crate) fn spawn(
    tb: &flowshift_testbed::Testbed,
    ns: &flowshift_testbed::Netns,
    addr: std::net::Ipv4Addr,
) -> anyhow::Result<std::process::Child> {
    use anyhow::Context;
    let mut server = ns.command(
        std::env::current_exe()?
            .to_str()
            .context("non-UTF-8 path of this binary")?,
    );
    server
        .args(["kernel-server", "--addr", &addr.to_string()])
        .stdout(std::process::Stdio::piped());
    let mut server = tb.spawn(server).context("starting the kernel servers")?;
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().context("kernel server stdout")?),
        &mut ready,
    )?;
    anyhow::ensure!(
        ready.trim() == "ready",
        "kernel server did not start: {ready:?}"
    );
    Ok(server)
}

pub(crate) fn source(addr: SocketAddr) -> std::io::Result<()> {
    serve(addr, |mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        loop {
            flowshift_core::app::counting::fill(offset, &mut buf);
            if s.write_all(&buf).is_err() {
                return;
            }
            offset += buf.len() as u64;
        }
    })
}

/// Serves `sink` (discard, then `<bytes> <crc32>\n` after the client's FIN) on `addr`.
pub(crate) fn sink(addr: SocketAddr) -> std::io::Result<()> {
    serve(addr, |mut s| {
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        let mut crc = crc32fast::Hasher::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    bytes += n as u64;
                    crc.update(&buf[..n]);
                }
                Err(_) => return,
            }
        }
        let _ = writeln!(s, "{} {:08x}", bytes, crc.finalize());
    })
}

/// Serves `echo` on `addr` from one epoll loop (mio), as an event-driven server holds idle
/// connections: a socket each, no thread — so the idle-memory baseline is the kernel's
/// sockets, not thread stacks.
pub(crate) fn echo(addr: SocketAddr) -> std::io::Result<()> {
    use mio::net::TcpListener as MioListener;
    use mio::{Events, Interest, Poll, Token};
    let mut listener = MioListener::bind(addr)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, Token(0), Interest::READABLE)?;
    thread::spawn(move || {
        let mut conns: std::collections::HashMap<usize, mio::net::TcpStream> = Default::default();
        let mut next = 1usize;
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if poll.poll(&mut events, None).is_err() {
                continue;
            }
            for ev in &events {
                if ev.token() == Token(0) {
                    while let Ok((mut s, _)) = listener.accept() {
                        let _ = s.set_nodelay(true);
                        let t = Token(next);
                        next += 1;
                        if poll
                            .registry()
                            .register(&mut s, t, Interest::READABLE)
                            .is_ok()
                        {
                            conns.insert(t.0, s);
                        }
                    }
                    continue;
                }
                let key = ev.token().0;
                let Some(s) = conns.get_mut(&key) else {
                    continue;
                };
                // Read what is there and write it back (blocking briefly on a full send
                // buffer is fine for a benchmark baseline).
                let mut close = false;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            close = true;
                            break;
                        }
                        Ok(n) => {
                            let mut out = &buf[..n];
                            while !out.is_empty() {
                                match s.write(out) {
                                    Ok(k) => out = &out[k..],
                                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                        thread::yield_now()
                                    }
                                    Err(_) => {
                                        close = true;
                                        break;
                                    }
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            close = true;
                            break;
                        }
                    }
                    if close {
                        break;
                    }
                }
                if close && let Some(mut s) = conns.remove(&key) {
                    let _ = poll.registry().deregister(&mut s);
                }
            }
        }
    });
    Ok(())
}

fn serve(addr: SocketAddr, handle: fn(TcpStream)) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let _ = s.set_nodelay(true);
            // Small stacks: the idle-connection benchmark opens thousands.
            let _ = thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || handle(s));
        }
    });
    Ok(())
}
