//! The tunnel's diagnostic test stream (`ctl tunnel-send`, `flowshift-bench tunnel`).
//!
//! Not part of the data path: a diagnostic that measures and verifies the tunnel alone.
//! Each message (or datagram) is a [`EnvelopeKind::Diagnostic`] envelope whose payload is an
//! 8-byte little-endian offset and the counting stream from there. The receiver verifies every
//! byte, so loss, duplication or reordering of reliable messages shows up as an error.

use flowshift_core::app::counting;
use flowshift_statesync::envelope::{EnvelopeRepr, HEADER_LEN};
use flowshift_tunnel::{Endpoint, PeerId, SendError};

/// Payload of one diagnostic reliable message.
const MESSAGE: usize = 60 * 1024;
/// Offset field of every diagnostic payload.
const OFFSET_LEN: usize = 8;

/// What was received and verified from one peer.
#[derive(Debug, Default)]
pub(crate) struct Rx {
    next_offset: u64,
    /// Reliable-stream bytes verified.
    pub(crate) verified: u64,
    /// Reliable messages that did not match.
    pub(crate) errors: u64,
    /// Datagram bytes verified.
    pub(crate) dgram_verified: u64,
    /// Datagrams that did not match.
    pub(crate) dgram_errors: u64,
}

#[derive(Debug)]
struct Job {
    offset: u64,
    end: u64,
    datagram: bool,
}

/// The diagnostic stream with one peer, both ways.
#[derive(Debug, Default)]
pub(crate) struct Diagnostic {
    pub(crate) rx: Rx,
    job: Option<Job>,
    /// Offset the next reliable job starts at (the stream continues across jobs).
    next: u64,
}

/// A buffer large enough for one diagnostic message.
pub(crate) fn scratch() -> Vec<u8> {
    vec![0u8; HEADER_LEN + OFFSET_LEN + MESSAGE]
}

impl Diagnostic {
    /// Starts a job of `bytes` (control input: checked, never overflows). The reliable stream
    /// continues where the last job ended; datagrams start at offset 0.
    pub(crate) fn start(&mut self, peer: &str, bytes: u64, datagram: bool) -> Result<(), String> {
        if self.job.is_some() {
            return Err(format!("a transfer to {peer} is under way"));
        }
        let start = if datagram { 0 } else { self.next };
        let end = start.checked_add(bytes).ok_or_else(|| {
            format!(
                "{bytes} bytes from test-stream offset {start} would overflow the 64-bit offset"
            )
        })?;
        self.job = Some(Job {
            offset: start,
            end,
            datagram,
        });
        if !datagram {
            self.next = end;
        }
        tracing::info!(peer, bytes, datagram, "test transfer started");
        Ok(())
    }

    /// Bytes still to queue.
    pub(crate) fn pending(&self) -> u64 {
        self.job
            .as_ref()
            .map_or(0, |j| j.end.saturating_sub(j.offset))
    }

    /// The peer restarted: both directions start over.
    pub(crate) fn reset(&mut self) {
        self.rx.next_offset = 0;
        self.next = 0;
    }

    /// Queues data into `ep` until it pushes back; true if it queued some and could take more.
    pub(crate) fn feed(
        &mut self,
        ep: &mut Endpoint,
        peer: PeerId,
        name: &str,
        scratch: &mut [u8],
    ) -> bool {
        let Some(job) = self.job.as_mut() else {
            return false;
        };
        let mut more = false;
        let max_dgram = ep.max_datagram_payload();
        // A bounded amount per turn keeps the loop responsive.
        for _ in 0..64 {
            if job.offset >= job.end {
                break;
            }
            let room = if job.datagram {
                max_dgram.saturating_sub(HEADER_LEN + OFFSET_LEN)
            } else {
                MESSAGE
            };
            let n = (job.end.saturating_sub(job.offset)).min(room as u64) as usize;
            let msg = &mut scratch[..HEADER_LEN + OFFSET_LEN + n];
            EnvelopeRepr::DIAGNOSTIC.emit(msg);
            msg[HEADER_LEN..HEADER_LEN + OFFSET_LEN].copy_from_slice(&job.offset.to_le_bytes());
            counting::fill(job.offset, &mut msg[HEADER_LEN + OFFSET_LEN..]);
            let r = if job.datagram {
                ep.send_datagram(peer, msg)
            } else {
                ep.send_message(peer, msg)
            };
            match r {
                Ok(()) => {
                    job.offset += n as u64;
                    more = true;
                }
                Err(SendError::BufferFull | SendError::QueueFull) => {
                    more = false;
                    break;
                }
                Err(e) => {
                    tracing::warn!(peer = name, error = %e, "test transfer stopped");
                    job.offset = job.end;
                }
            }
        }
        if job.offset >= job.end {
            tracing::info!(peer = name, "test transfer queued completely");
            self.job = None;
        }
        more
    }

    /// Checks the payload of a diagnostic message or datagram against the counting stream.
    pub(crate) fn verify(&mut self, payload: &[u8], datagram: bool) {
        let rx = &mut self.rx;
        let (offset, bytes) = match payload.split_first_chunk::<OFFSET_LEN>() {
            Some((o, b)) => (u64::from_le_bytes(*o), Some(b)),
            None => (0, None),
        };
        let bytes_ok = bytes.is_some_and(|b| counting::verify(offset, b).is_none());
        let len = bytes.map_or(0, <[u8]>::len) as u64;
        if datagram {
            if bytes_ok {
                rx.dgram_verified += len;
            } else {
                rx.dgram_errors += 1;
            }
        } else if bytes_ok && offset == rx.next_offset {
            rx.next_offset += len;
            rx.verified += len;
        } else {
            rx.errors += 1;
            tracing::warn!(
                offset,
                expected = rx.next_offset,
                "test stream mismatch on the reliable channel"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_reject_offsets_that_overflow() {
        let mut d = Diagnostic::default();
        assert_eq!(d.start("b", u64::MAX, false), Ok(()));
        d.job = None;
        assert_eq!(d.next, u64::MAX);
        // The reliable stream would continue past 2^64: refused, state unchanged.
        let e = d.start("b", 1, false).unwrap_err();
        assert!(e.contains("overflow"), "{e}");
        assert!(d.job.is_none());
        assert_eq!(d.next, u64::MAX);
        // Datagrams start at 0, so any size is fine.
        assert_eq!(d.start("b", u64::MAX, true), Ok(()));
        assert!(d.start("b", 1, true).unwrap_err().contains("under way"));
    }

    #[test]
    fn verifies_offsets_and_bytes() {
        let mut d = Diagnostic::default();
        let mut msg = 0u64.to_le_bytes().to_vec();
        let mut bytes = vec![0u8; 100];
        counting::fill(0, &mut bytes);
        msg.extend(bytes);
        d.verify(&msg, false);
        assert_eq!((d.rx.verified, d.rx.errors), (100, 0));
        // The same again: out of order on the reliable channel.
        d.verify(&msg, false);
        assert_eq!(d.rx.errors, 1);
        d.verify(&msg[..5], true);
        assert_eq!(d.rx.dgram_errors, 1);
    }
}
