//! `echo`: returns every byte the client sends.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{App, AppError, AppKind, MAX_APP_BUFFER, decode_snapshot, encode_snapshot, malformed};

/// Returns every byte, in order.
///
/// Holds at most [`MAX_APP_BUFFER`] bytes that were received but not yet sent back, and consumes
/// only what fits: a client that sends without reading closes its own window, not the node's
/// memory. After the client's FIN it closes once everything was echoed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoApp {
    /// Received bytes not yet sent back; never longer than [`MAX_APP_BUFFER`].
    pending: VecDeque<u8>,
    /// The client half-closed; no more input will come.
    fin_received: bool,
}

impl EchoApp {
    /// A fresh echo app.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the app from [`App::snapshot`] bytes.
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, AppError> {
        let app: Self = decode_snapshot(AppKind::Echo, snapshot)?;
        if app.pending.len() > MAX_APP_BUFFER {
            return Err(malformed(
                AppKind::Echo,
                format!(
                    "{} buffered bytes exceed {MAX_APP_BUFFER}",
                    app.pending.len()
                ),
            ));
        }
        Ok(app)
    }
}

impl App for EchoApp {
    fn kind(&self) -> AppKind {
        AppKind::Echo
    }

    fn handle_recv(&mut self, data: &[u8]) -> usize {
        if self.fin_received {
            // No data follows a FIN; refuse it rather than echo past the close.
            return 0;
        }
        let n = data
            .len()
            .min(MAX_APP_BUFFER.saturating_sub(self.pending.len()));
        self.pending.extend(&data[..n]);
        n
    }

    fn handle_recv_fin(&mut self) {
        self.fin_received = true;
    }

    fn poll_send(&mut self, buf: &mut [u8]) -> usize {
        let (front, back) = self.pending.as_slices();
        let a = front.len().min(buf.len());
        buf[..a].copy_from_slice(&front[..a]);
        let b = back.len().min(buf.len() - a);
        buf[a..a + b].copy_from_slice(&back[..b]);
        self.pending.drain(..a + b);
        a + b
    }

    fn wants_close(&self) -> bool {
        self.fin_received && self.pending.is_empty()
    }

    fn shrink(&mut self) {
        self.pending.shrink_to_fit();
    }

    /// A byte stream has no exchanges to split, and the snapshot holds every pending byte: always
    /// true.
    fn is_quiescent(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_snapshot(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Peer, check_continuation, pseudo_random_bytes};
    use super::*;

    #[test]
    fn echoes_byte_exact_through_small_buffers() {
        let input = pseudo_random_bytes(50_000, 7);
        for (recv_chunk, send_chunk) in [(1, 1), (7, 3), (1000, 1), (1, 1000), (65_536, 1460)] {
            let mut peer = Peer::new(input.clone(), true, recv_chunk, send_chunk);
            let mut app = EchoApp::new();
            peer.run(&mut app);
            assert_eq!(peer.output, input, "chunks {recv_chunk}/{send_chunk}");
            assert!(peer.closed);
        }
    }

    #[test]
    fn backpressure_bounds_the_buffer() {
        let mut app = EchoApp::new();
        let data = vec![0x5au8; 3 * MAX_APP_BUFFER];
        let mut consumed = 0;
        for _ in 0..10 {
            consumed += app.handle_recv(&data[consumed..]);
        }
        assert_eq!(consumed, MAX_APP_BUFFER);
        assert_eq!(app.handle_recv(&data), 0);
        let mut out = [0u8; 100];
        assert_eq!(app.poll_send(&mut out), 100);
        assert_eq!(app.handle_recv(&data), 100);
        assert_eq!(app.pending.len(), MAX_APP_BUFFER);
    }

    #[test]
    fn closes_only_after_fin_and_drain() {
        let mut app = EchoApp::new();
        assert_eq!(app.handle_recv(b"hello"), 5);
        assert!(!app.wants_close());
        app.handle_recv_fin();
        assert!(!app.wants_close());
        let mut out = [0u8; 3];
        assert_eq!(app.poll_send(&mut out), 3);
        assert!(!app.wants_close());
        assert_eq!(app.poll_send(&mut out), 2);
        assert_eq!(&out[..2], b"lo");
        assert!(app.wants_close());
        assert_eq!(app.poll_send(&mut out), 0);
    }

    #[test]
    fn snapshot_restore_continues_byte_exactly() {
        let input = pseudo_random_bytes(30_000, 11);
        let peer = Peer::new(input, true, 3000, 1000);
        check_continuation(AppKind::Echo, &|| Box::new(EchoApp::new()), &peer);
        // With a full buffer (the client does not read for a while).
        let input = pseudo_random_bytes(3 * MAX_APP_BUFFER, 12);
        let peer = Peer::new(input, true, 16_384, 4096);
        check_continuation(AppKind::Echo, &|| Box::new(EchoApp::new()), &peer);
    }

    #[test]
    fn restore_rejects_oversized_buffer() {
        let app = EchoApp {
            pending: vec![0u8; MAX_APP_BUFFER + 1].into(),
            fin_received: false,
        };
        assert!(EchoApp::from_snapshot(&encode_snapshot(&app)).is_err());
        let app = EchoApp {
            pending: vec![0u8; MAX_APP_BUFFER].into(),
            fin_received: true,
        };
        assert_eq!(EchoApp::from_snapshot(&app.snapshot()), Ok(app));
    }
}
