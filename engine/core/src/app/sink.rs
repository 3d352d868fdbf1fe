//! `sink`: discards input, then reports how much arrived and its CRC-32.

use std::io::Write as _;

use serde::{Deserialize, Serialize};

use super::{App, AppError, AppKind, crc32_update, decode_snapshot, encode_snapshot, malformed};

/// Longest report line: 20 decimal digits, a space, 8 hex digits and a newline.
const MAX_REPORT: usize = 30;

/// Discards input, counting the bytes and their CRC-32 (IEEE, as zlib).
///
/// When the client half-closes it replies with one line, `<bytes> <crc32>\n` (decimal count, 8
/// lowercase hex digits), then closes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkApp {
    /// Bytes received.
    bytes: u64,
    /// CRC-32 of the bytes received.
    crc: u32,
    /// `None` until the client's FIN; then how many bytes of the report line were sent.
    report_sent: Option<usize>,
}

impl SinkApp {
    /// A fresh sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// CRC-32 of the bytes received so far.
    pub fn crc32(&self) -> u32 {
        self.crc
    }

    /// Rebuilds the app from [`App::snapshot`] bytes.
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, AppError> {
        let app: Self = decode_snapshot(AppKind::Sink, snapshot)?;
        if let Some(sent) = app.report_sent {
            let (_, len) = app.report();
            if sent > len {
                return Err(malformed(
                    AppKind::Sink,
                    format!("{sent} report bytes sent, but the report has {len}"),
                ));
            }
        }
        Ok(app)
    }

    /// The report line, in a stack buffer, and its length.
    fn report(&self) -> ([u8; MAX_REPORT], usize) {
        let mut line = [0u8; MAX_REPORT];
        let mut cursor = &mut line[..];
        let written = writeln!(cursor, "{} {:08x}", self.bytes, self.crc);
        // The longest line fits MAX_REPORT by construction.
        debug_assert!(written.is_ok());
        let len = MAX_REPORT - cursor.len();
        (line, len)
    }
}

impl App for SinkApp {
    fn kind(&self) -> AppKind {
        AppKind::Sink
    }

    fn handle_recv(&mut self, data: &[u8]) -> usize {
        if self.report_sent.is_some() {
            // Nothing follows a FIN; the report is final.
            return 0;
        }
        self.bytes = self.bytes.wrapping_add(data.len() as u64);
        self.crc = crc32_update(self.crc, data);
        data.len()
    }

    fn handle_recv_fin(&mut self) {
        self.report_sent.get_or_insert(0);
    }

    fn poll_send(&mut self, buf: &mut [u8]) -> usize {
        let Some(sent) = self.report_sent else {
            return 0;
        };
        let (line, len) = self.report();
        let rest = line.get(sent..len).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.report_sent = Some(sent + n);
        n
    }

    fn wants_close(&self) -> bool {
        self.report_sent.is_some_and(|sent| sent >= self.report().1)
    }

    /// A byte stream has no exchanges to split, and the report is rebuilt from the counters:
    /// always true.
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
    fn reports_known_crc() {
        let mut peer = Peer::new(b"123456789".to_vec(), true, 2, 1);
        let mut app = SinkApp::new();
        peer.run(&mut app);
        assert_eq!(peer.output, b"9 cbf43926\n");
        assert!(peer.closed);
    }

    #[test]
    fn reports_empty_input() {
        let mut peer = Peer::new(Vec::new(), true, 2, 100);
        let mut app = SinkApp::new();
        peer.run(&mut app);
        assert_eq!(peer.output, b"0 00000000\n");
        assert!(peer.closed);
    }

    #[test]
    fn report_matches_crc32fast() {
        let input = pseudo_random_bytes(123_457, 3);
        let mut peer = Peer::new(input.clone(), true, 1000, 7);
        let mut app = SinkApp::new();
        peer.run(&mut app);
        let expected = format!("{} {:08x}\n", input.len(), crc32fast::hash(&input));
        assert_eq!(String::from_utf8(peer.output).unwrap(), expected);
        assert!(peer.closed);
    }

    #[test]
    fn sends_nothing_before_fin() {
        let mut app = SinkApp::new();
        assert_eq!(app.handle_recv(b"abc"), 3);
        assert_eq!(app.poll_send(&mut [0u8; 64]), 0);
        assert!(!app.wants_close());
        assert_eq!((app.bytes(), app.crc32()), (3, crc32fast::hash(b"abc")));
    }

    #[test]
    fn longest_report_fits() {
        let app = SinkApp {
            bytes: u64::MAX,
            crc: u32::MAX,
            report_sent: Some(0),
        };
        let (line, len) = app.report();
        assert_eq!(&line[..len], b"18446744073709551615 ffffffff\n");
    }

    #[test]
    fn snapshot_restore_continues_byte_exactly() {
        let input = pseudo_random_bytes(20_000, 5);
        // Small send chunks so that some snapshots fall in the middle of the report line.
        let peer = Peer::new(input, true, 500, 2);
        check_continuation(AppKind::Sink, &|| Box::new(SinkApp::new()), &peer);
    }

    #[test]
    fn restore_rejects_report_overrun() {
        let app = SinkApp {
            bytes: 9,
            crc: 0xcbf4_3926,
            report_sent: Some(12),
        };
        assert!(SinkApp::from_snapshot(&encode_snapshot(&app)).is_err());
        let app = SinkApp {
            bytes: 9,
            crc: 0xcbf4_3926,
            report_sent: Some(11),
        };
        assert_eq!(SinkApp::from_snapshot(&app.snapshot()), Ok(app));
    }
}
