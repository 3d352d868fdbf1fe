//! Receiving half of the reliable stream: reassembly of out-of-order STREAM frames, flow
//! control, and splitting the in-order bytes back into messages.

use std::collections::BTreeMap;

/// Why a STREAM frame was refused (the packet carrying it is then not acknowledged, so
/// the sender repeats it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamRefused {
    /// The frame goes beyond the window we advertised.
    FlowControl,
    /// Too much out-of-order data is already buffered.
    BufferFull,
}

/// Splits the in-order byte stream into `varint length || bytes` messages.
#[derive(Debug, Default)]
struct MessageAssembler {
    /// Bytes of a length prefix received so far.
    len_buf: [u8; 8],
    len_have: usize,
    /// Bytes still expected for the current message, once its length is known.
    remaining: Option<usize>,
    data: Vec<u8>,
    /// Whether the current message is over the size limit and is being skipped.
    skipping: bool,
}

impl MessageAssembler {
    /// Feeds in-order bytes; complete messages go to `out`; returns how many messages were
    /// skipped for being larger than `max_message`.
    fn feed(&mut self, mut bytes: &[u8], max_message: usize, out: &mut Vec<Vec<u8>>) -> u64 {
        let mut skipped = 0;
        while !bytes.is_empty() {
            match self.remaining {
                None => {
                    self.len_buf[self.len_have] = bytes[0];
                    self.len_have += 1;
                    bytes = &bytes[1..];
                    let need = 1usize << (self.len_buf[0] >> 6);
                    if self.len_have == need {
                        let mut v = u64::from(self.len_buf[0] & 0x3f);
                        for &b in &self.len_buf[1..need] {
                            v = (v << 8) | u64::from(b);
                        }
                        self.len_have = 0;
                        let len = usize::try_from(v).unwrap_or(usize::MAX);
                        self.skipping = len > max_message;
                        if self.skipping {
                            skipped += 1;
                        } else {
                            self.data = Vec::with_capacity(len.min(1 << 20));
                        }
                        self.remaining = Some(len);
                        if len == 0 {
                            self.finish(out);
                        }
                    }
                }
                Some(rem) => {
                    let take = rem.min(bytes.len());
                    if !self.skipping {
                        self.data.extend_from_slice(&bytes[..take]);
                    }
                    bytes = &bytes[take..];
                    self.remaining = Some(rem - take);
                    if rem == take {
                        self.finish(out);
                    }
                }
            }
        }
        skipped
    }

    fn finish(&mut self, out: &mut Vec<Vec<u8>>) {
        if !self.skipping {
            out.push(std::mem::take(&mut self.data));
        }
        self.skipping = false;
        self.remaining = None;
    }
}

/// The receiving stream.
#[derive(Debug)]
pub(crate) struct RecvStream {
    /// Every byte below this offset was passed to the assembler.
    consumed: u64,
    /// Out-of-order chunks above `consumed`, by start offset.
    pending: BTreeMap<u64, Vec<u8>>,
    /// Bytes held in `pending`; never above `pending_limit`.
    pending_bytes: usize,
    /// Bound on `pending_bytes`: twice the larger of the two windows. Chunks may overlap,
    /// so without it a peer could resend one window's range at many start offsets.
    pending_limit: usize,
    /// Configured window: how far beyond `consumed` the peer may send.
    window: u64,
    /// The limit we last told the peer (or the protocol's initial one).
    advertised: u64,
    max_message: usize,
    assembler: MessageAssembler,
    /// Messages skipped for exceeding `max_message`.
    pub(crate) skipped: u64,
}

impl RecvStream {
    pub(crate) fn new(initial_window: u64, window: u64, max_message: usize) -> Self {
        RecvStream {
            consumed: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_limit: usize::try_from(window.max(initial_window).saturating_mul(2))
                .unwrap_or(usize::MAX),
            window,
            advertised: initial_window,
            max_message,
            assembler: MessageAssembler::default(),
            skipped: 0,
        }
    }

    /// Handles one STREAM frame; complete messages are appended to `out`.
    pub(crate) fn on_stream(
        &mut self,
        offset: u64,
        data: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), StreamRefused> {
        let end = offset + data.len() as u64;
        if end > self.advertised {
            return Err(StreamRefused::FlowControl);
        }
        if end <= self.consumed {
            return Ok(());
        }
        if offset > self.consumed {
            if data.is_empty() {
                // Carries nothing; storing it would cost a map entry for no byte.
                return Ok(());
            }
            if self
                .pending
                .get(&offset)
                .is_some_and(|d| d.len() >= data.len())
            {
                return Ok(());
            }
            if self.pending_bytes + data.len() > self.pending_limit {
                return Err(StreamRefused::BufferFull);
            }
            self.pending_bytes += data.len();
            if let Some(old) = self.pending.insert(offset, data.to_vec()) {
                self.pending_bytes -= old.len();
            }
            return Ok(());
        }
        self.consume(offset, data, out);
        while let Some((&start, _)) = self.pending.first_key_value() {
            if start > self.consumed {
                break;
            }
            let Some((start, chunk)) = self.pending.pop_first() else {
                break;
            };
            self.pending_bytes -= chunk.len();
            if start + chunk.len() as u64 > self.consumed {
                self.consume(start, &chunk, out);
            }
        }
        Ok(())
    }

    fn consume(&mut self, offset: u64, data: &[u8], out: &mut Vec<Vec<u8>>) {
        let skip = (self.consumed - offset) as usize;
        self.skipped += self.assembler.feed(&data[skip..], self.max_message, out);
        self.consumed = offset + data.len() as u64;
    }

    /// A new limit to advertise, if the window moved by at least half since the last one.
    pub(crate) fn window_update(&self) -> Option<u64> {
        let limit = self.consumed + self.window;
        (limit >= self.advertised + self.window / 2).then_some(limit)
    }

    /// The limit to put in a WINDOW frame now.
    pub(crate) fn current_limit(&self) -> u64 {
        (self.consumed + self.window).max(self.advertised)
    }

    /// Records that `limit` was sent.
    pub(crate) fn on_window_sent(&mut self, limit: u64) {
        self.advertised = self.advertised.max(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msgs: &[&[u8]]) -> Vec<u8> {
        let mut s = super::super::send::SendStream::new(u64::MAX, usize::MAX);
        for m in msgs {
            assert!(s.write_message(m));
        }
        let (r, _) = s.next_chunk(usize::MAX).unwrap();
        let mut v = vec![0; (r.end - r.start) as usize];
        s.copy(r, &mut v);
        v
    }

    #[test]
    fn reassembles_out_of_order_with_duplicates() {
        let big = vec![9u8; 300];
        let bytes = framed(&[b"a", b"", &big, b"tail"]);
        let mut r = RecvStream::new(1 << 20, 1 << 20, 1 << 20);
        let mut out = Vec::new();
        // Deliver in 7-byte chunks, reversed, with each chunk twice.
        let chunks: Vec<(u64, &[u8])> = bytes
            .chunks(7)
            .enumerate()
            .map(|(i, c)| ((i * 7) as u64, c))
            .collect();
        for &(off, c) in chunks.iter().rev() {
            r.on_stream(off, c, &mut out).unwrap();
            r.on_stream(off, c, &mut out).unwrap();
        }
        assert_eq!(out, vec![b"a".to_vec(), Vec::new(), big, b"tail".to_vec()]);
        assert_eq!(r.pending_bytes, 0);
        // Overlapping retransmission is fine too.
        r.on_stream(0, &bytes, &mut out).unwrap();
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn flow_control_and_oversize() {
        let mut r = RecvStream::new(100, 100, 10);
        let mut out = Vec::new();
        assert_eq!(
            r.on_stream(90, &[0; 11], &mut out),
            Err(StreamRefused::FlowControl)
        );
        let bytes = framed(&[&[1; 20], b"ok"]);
        r.on_stream(0, &bytes, &mut out).unwrap();
        assert_eq!(out, vec![b"ok".to_vec()]);
        assert_eq!(r.skipped, 1);
        assert_eq!(r.window_update(), None); // consumed 24: 124 < 100 + 50
        let mut r = RecvStream::new(100, 100, 1000);
        r.on_stream(0, &framed(&[&[1; 60]]), &mut out).unwrap();
        assert_eq!(r.window_update(), Some(161));
        r.on_window_sent(161);
        assert_eq!(r.window_update(), None);
    }

    #[test]
    fn overlapping_chunks_cannot_pin_more_than_twice_the_window() {
        let window = 1000u64;
        let mut r = RecvStream::new(window, window, 1 << 20);
        let mut out = Vec::new();
        // Move the stream far along first: a bound taken from an offset would grow with it.
        let mut consumed = 0u64;
        while consumed < 100_000 {
            let bytes = framed(&[&[7; 400]]);
            r.on_stream(consumed, &bytes, &mut out).unwrap();
            consumed += bytes.len() as u64;
            if let Some(w) = r.window_update() {
                r.on_window_sent(w);
            }
        }
        assert_eq!(r.consumed, consumed);
        // Now one out-of-order range, resent from every start offset in it (it ends within
        // the half window that is always advertised).
        let mut held = 0usize;
        let end = window / 2;
        for start in 1..end {
            let len = (end - start) as usize;
            match r.on_stream(consumed + start, &vec![0; len], &mut out) {
                Ok(()) => held += len,
                Err(e) => assert_eq!(e, StreamRefused::BufferFull),
            }
            // Zero-length frames carry nothing and are not stored.
            r.on_stream(consumed + start, &[], &mut out).unwrap();
        }
        assert!(held > 0);
        assert!(
            r.pending_bytes <= 2 * window as usize,
            "{}",
            r.pending_bytes
        );
        assert!(r.pending.len() < window as usize);
    }
}
