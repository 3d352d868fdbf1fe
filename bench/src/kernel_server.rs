//! Plain kernel-socket servers (source, sink, echo): the baseline flowshift is measured against.
//! They run on threads that joined the node namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

/// Serves `source` (counting stream forever) on `addr`.
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

/// Serves `echo` on `addr`.
pub(crate) fn echo(addr: SocketAddr) -> std::io::Result<()> {
    serve(addr, |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
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
