//! `source`: sends the counting stream.

use serde::{Deserialize, Serialize};

use super::{App, AppError, AppKind, counting, decode_snapshot, encode_snapshot, malformed};

/// Sends the [counting stream](counting) from offset 0, forever or exactly `limit` bytes then FIN.
///
/// Input is consumed and discarded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceApp {
    /// Total bytes to send; `None` sends forever.
    limit: Option<u64>,
    /// Bytes sent so far, which is also the stream offset of the next byte; never above `limit`.
    sent: u64,
}

impl SourceApp {
    /// A source that sends `limit` bytes then closes, or sends forever when `limit` is `None`.
    pub fn new(limit: Option<u64>) -> Self {
        Self { limit, sent: 0 }
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Rebuilds the app from [`App::snapshot`] bytes.
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, AppError> {
        let app: Self = decode_snapshot(AppKind::Source, snapshot)?;
        if let Some(limit) = app.limit
            && app.sent > limit
        {
            return Err(malformed(
                AppKind::Source,
                format!("{} bytes sent exceed the limit of {limit}", app.sent),
            ));
        }
        Ok(app)
    }
}

impl App for SourceApp {
    fn kind(&self) -> AppKind {
        AppKind::Source
    }

    fn handle_recv(&mut self, data: &[u8]) -> usize {
        data.len()
    }

    fn handle_recv_fin(&mut self) {}

    fn poll_send(&mut self, buf: &mut [u8]) -> usize {
        let n = match self.limit {
            // The remainder is compared in u64, so the cast back cannot truncate.
            Some(limit) => (limit - self.sent).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        counting::fill(self.sent, &mut buf[..n]);
        self.sent = self.sent.wrapping_add(n as u64);
        n
    }

    fn poll_send_marked(&mut self, buf: &mut [u8], runs: &mut counting::Runs) -> usize {
        let offset = self.sent;
        let n = self.poll_send(buf);
        runs.mark(0, n, offset);
        n
    }

    fn wants_close(&self) -> bool {
        self.limit == Some(self.sent)
    }

    /// A byte stream has no exchanges to split: always true.
    fn is_quiescent(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<u8> {
        encode_snapshot(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Peer, check_continuation};
    use super::*;

    #[test]
    fn sends_exactly_n_bytes_then_closes() {
        for (n, send_chunk) in [
            (0u64, 100),
            (1, 100),
            (1000, 1),
            (100_000, 1460),
            (100_000, 100_000),
        ] {
            let mut peer = Peer::new(b"ignored input".to_vec(), false, 4, send_chunk);
            let mut app = SourceApp::new(Some(n));
            peer.run(&mut app);
            assert_eq!(peer.output.len() as u64, n);
            assert_eq!(counting::verify(0, &peer.output), None);
            assert!(peer.closed);
            assert_eq!(peer.consumed(), 13);
        }
    }

    #[test]
    fn sends_forever_without_limit() {
        let mut app = SourceApp::new(None);
        let mut buf = vec![0u8; 10_000];
        let mut offset = 0u64;
        for _ in 0..50 {
            assert_eq!(app.poll_send(&mut buf), buf.len());
            assert_eq!(counting::verify(offset, &buf), None);
            offset += buf.len() as u64;
            assert!(!app.wants_close());
        }
        assert_eq!(app.handle_recv(&buf), buf.len());
        assert_eq!(app.sent(), offset);
    }

    #[test]
    fn snapshot_restore_continues_byte_exactly() {
        let peer = Peer::new(Vec::new(), true, 1, 997);
        check_continuation(
            AppKind::Source,
            &|| Box::new(SourceApp::new(Some(50_000))),
            &peer,
        );
        let mut peer = Peer::new(Vec::new(), false, 1, 1000);
        peer.max_output = 40_000;
        check_continuation(AppKind::Source, &|| Box::new(SourceApp::new(None)), &peer);
    }

    #[test]
    fn restore_rejects_sent_beyond_limit() {
        let app = SourceApp {
            limit: Some(10),
            sent: 11,
        };
        assert!(SourceApp::from_snapshot(&encode_snapshot(&app)).is_err());
        let app = SourceApp {
            limit: Some(10),
            sent: 10,
        };
        assert_eq!(SourceApp::from_snapshot(&app.snapshot()), Ok(app));
    }
}
