//! Frames: the plaintext of a record.
//!
//! ```text
//! record plaintext = packet number (varint) , frame*
//! frame            = type (u8) , fields
//! ```
//!
//! | type | frame | fields | ack-eliciting |
//! |---|---|---|---|
//! | 0x00 | PADDING | none (one byte) | no |
//! | 0x01 | PING | none | yes |
//! | 0x02 | ACK | largest, ack delay (µs), range count, first range, (gap, range)* | no |
//! | 0x03 | STREAM | offset, length, bytes | yes |
//! | 0x04 | WINDOW | maximum stream offset the sender may send up to | yes |
//! | 0x05 | DATAGRAM | length, bytes | no |
//! | 0x06 | HEARTBEAT | length, encoded [`LoadReport`](crate::LoadReport) | no |
//!
//! All integers are varints. ACK ranges use QUIC's encoding (RFC 9000 section 19.3.1):
//! ranges are listed from the highest packet number down, `first range` packets below
//! `largest` are acknowledged, then each `gap` skips `gap + 1` unacknowledged packet
//! numbers and the next `range + 1` are acknowledged. An unknown frame type makes the
//! whole record malformed (frames carry no generic length).

use core::ops::RangeInclusive;

use super::WireError;
use super::coding::{Reader, Writer, varint_len};

/// Most ACK ranges one ACK frame carries (and that a receiver accepts).
pub const MAX_ACK_RANGES: usize = 32;

/// Frame type bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// ACK.
    Ack,
    /// DATAGRAM.
    Datagram,
    /// HEARTBEAT.
    Heartbeat,
    /// PADDING.
    Padding,
    /// PING.
    Ping,
    /// STREAM.
    Stream,
    /// Any other value.
    Unknown(u8),
    /// WINDOW.
    Window,
}

impl From<u8> for FrameType {
    fn from(v: u8) -> Self {
        match v {
            0x00 => FrameType::Padding,
            0x01 => FrameType::Ping,
            0x02 => FrameType::Ack,
            0x03 => FrameType::Stream,
            0x04 => FrameType::Window,
            0x05 => FrameType::Datagram,
            0x06 => FrameType::Heartbeat,
            other => FrameType::Unknown(other),
        }
    }
}

impl From<FrameType> for u8 {
    fn from(t: FrameType) -> u8 {
        match t {
            FrameType::Padding => 0x00,
            FrameType::Ping => 0x01,
            FrameType::Ack => 0x02,
            FrameType::Stream => 0x03,
            FrameType::Window => 0x04,
            FrameType::Datagram => 0x05,
            FrameType::Heartbeat => 0x06,
            FrameType::Unknown(other) => other,
        }
    }
}

/// An ACK frame: up to [`MAX_ACK_RANGES`] inclusive ranges of packet numbers, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckFrame {
    delay_micros: u64,
    /// `(low, high)` pairs, descending and separated by at least one missing number.
    ranges: [(u64, u64); MAX_ACK_RANGES],
    len: usize,
}

impl AckFrame {
    /// Builds a frame from inclusive ranges given highest first; ranges that overlap,
    /// touch or are out of order end the list, as do ranges beyond [`MAX_ACK_RANGES`].
    /// Returns `None` if there is no range.
    pub fn new(
        delay_micros: u64,
        ranges_desc: impl IntoIterator<Item = RangeInclusive<u64>>,
    ) -> Option<Self> {
        let mut f = AckFrame {
            delay_micros,
            ranges: [(0, 0); MAX_ACK_RANGES],
            len: 0,
        };
        for r in ranges_desc {
            if f.len == MAX_ACK_RANGES || r.start() > r.end() {
                break;
            }
            if f.len > 0 {
                let prev_low = f.ranges[f.len - 1].0;
                if prev_low < 2 || *r.end() > prev_low - 2 {
                    break;
                }
            }
            f.ranges[f.len] = (*r.start(), *r.end());
            f.len += 1;
        }
        (f.len > 0).then_some(f)
    }

    /// The highest acknowledged packet number.
    pub fn largest(&self) -> u64 {
        self.ranges[0].1
    }

    /// How long the receiver held the ACK after receiving `largest`, in microseconds.
    pub fn delay_micros(&self) -> u64 {
        self.delay_micros
    }

    /// The acknowledged ranges, highest first.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<u64>> + '_ {
        self.ranges[..self.len].iter().map(|&(lo, hi)| lo..=hi)
    }

    /// Encoded length including the type byte.
    pub fn encoded_len(&self) -> usize {
        let (lo0, hi0) = self.ranges[0];
        let mut n =
            1 + varint_len(hi0) + varint_len(self.delay_micros) + varint_len(self.len as u64 - 1);
        n += varint_len(hi0 - lo0);
        let mut prev_low = lo0;
        for &(lo, hi) in &self.ranges[1..self.len] {
            n += varint_len(prev_low - hi - 2) + varint_len(hi - lo);
            prev_low = lo;
        }
        n
    }

    fn emit(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        let (lo0, hi0) = self.ranges[0];
        w.u8(FrameType::Ack.into())?;
        w.varint(hi0)?;
        w.varint(self.delay_micros)?;
        w.varint(self.len as u64 - 1)?;
        w.varint(hi0 - lo0)?;
        let mut prev_low = lo0;
        for &(lo, hi) in &self.ranges[1..self.len] {
            w.varint(prev_low - hi - 2)?;
            w.varint(hi - lo)?;
            prev_low = lo;
        }
        Ok(())
    }

    fn parse(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let largest = r.varint()?;
        let delay_micros = r.varint()?;
        let extra = r.varint()?;
        if extra >= MAX_ACK_RANGES as u64 {
            return Err(WireError::Malformed);
        }
        let mut f = AckFrame {
            delay_micros,
            ranges: [(0, 0); MAX_ACK_RANGES],
            len: 0,
        };
        let first = r.varint()?;
        let mut low = largest.checked_sub(first).ok_or(WireError::Malformed)?;
        f.ranges[0] = (low, largest);
        f.len = 1;
        for _ in 0..extra {
            let gap = r.varint()?;
            let len = r.varint()?;
            let high = low
                .checked_sub(gap)
                .and_then(|v| v.checked_sub(2))
                .ok_or(WireError::Malformed)?;
            low = high.checked_sub(len).ok_or(WireError::Malformed)?;
            f.ranges[f.len] = (low, high);
            f.len += 1;
        }
        Ok(f)
    }
}

/// A decoded frame borrowing from the record plaintext.
// Frames are short-lived stack values; boxing the ACK ranges would allocate per ACK.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Acknowledges packet numbers.
    Ack(AckFrame),
    /// An unreliable datagram (a forwarded IP packet).
    Datagram(&'a [u8]),
    /// A heartbeat carrying an encoded [`LoadReport`](crate::LoadReport).
    Heartbeat(&'a [u8]),
    /// One byte of padding.
    Padding,
    /// Asks for an acknowledgement.
    Ping,
    /// Bytes of the reliable stream at `offset`.
    Stream {
        /// Stream offset of the first byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// The highest stream offset (exclusive) the peer may send up to.
    Window(u64),
}

impl Frame<'_> {
    /// Whether receiving this frame obliges the receiver to acknowledge the packet.
    pub fn is_ack_eliciting(&self) -> bool {
        matches!(self, Frame::Ping | Frame::Stream { .. } | Frame::Window(_))
    }

    /// Encoded length including the type byte.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Ack(a) => a.encoded_len(),
            Frame::Datagram(d) | Frame::Heartbeat(d) => 1 + varint_len(d.len() as u64) + d.len(),
            Frame::Padding | Frame::Ping => 1,
            Frame::Stream { offset, data } => stream_header_len(*offset, data.len()) + data.len(),
            Frame::Window(v) => 1 + varint_len(*v),
        }
    }

    /// Encodes the frame.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        match self {
            Frame::Ack(a) => a.emit(w),
            Frame::Datagram(d) => {
                w.u8(FrameType::Datagram.into())?;
                w.length_prefixed(d)
            }
            Frame::Heartbeat(d) => {
                w.u8(FrameType::Heartbeat.into())?;
                w.length_prefixed(d)
            }
            Frame::Padding => w.u8(FrameType::Padding.into()),
            Frame::Ping => w.u8(FrameType::Ping.into()),
            Frame::Stream { offset, data } => {
                w.u8(FrameType::Stream.into())?;
                w.varint(*offset)?;
                w.length_prefixed(data)
            }
            Frame::Window(v) => {
                w.u8(FrameType::Window.into())?;
                w.varint(*v)
            }
        }
    }
}

/// Length of a STREAM frame's type and fields, without the data.
pub const fn stream_header_len(offset: u64, len: usize) -> usize {
    1 + varint_len(offset) + varint_len(len as u64)
}

/// Largest DATAGRAM (or HEARTBEAT) payload that fits in `space` bytes of frame space.
pub fn max_prefixed_payload(space: usize) -> usize {
    let mut n = space.saturating_sub(2);
    while n > 0 && 1 + varint_len(n as u64) + n > space {
        n -= 1;
    }
    n
}

/// Iterator over the frames of a record; yields one error, then stops.
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    reader: Reader<'a>,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Frames in `buf` (which holds frames only, no packet number).
    pub fn new(buf: &'a [u8]) -> Self {
        Frames {
            reader: Reader::new(buf),
            failed: false,
        }
    }

    /// Offset in the buffer just after the last frame yielded.
    pub fn position(&self) -> usize {
        self.reader.position()
    }

    fn next_frame(&mut self) -> Result<Frame<'a>, WireError> {
        let r = &mut self.reader;
        Ok(match FrameType::from(r.u8()?) {
            FrameType::Padding => Frame::Padding,
            FrameType::Ping => Frame::Ping,
            FrameType::Ack => Frame::Ack(AckFrame::parse(r)?),
            FrameType::Stream => {
                let offset = r.varint()?;
                let data = r.length_prefixed()?;
                if offset
                    .checked_add(data.len() as u64)
                    .is_none_or(|end| end > super::coding::VARINT_MAX)
                {
                    return Err(WireError::Malformed);
                }
                Frame::Stream { offset, data }
            }
            FrameType::Window => Frame::Window(r.varint()?),
            FrameType::Datagram => Frame::Datagram(r.length_prefixed()?),
            FrameType::Heartbeat => Frame::Heartbeat(r.length_prefixed()?),
            FrameType::Unknown(t) => return Err(WireError::UnknownFrame(t)),
        })
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.reader.is_empty() {
            return None;
        }
        let f = self.next_frame();
        self.failed = f.is_err();
        Some(f)
    }
}

/// Splits a record plaintext into its packet number and frames.
pub fn parse_record(plain: &[u8]) -> Result<(u64, Frames<'_>), WireError> {
    let (pn, start) = parse_record_header(plain)?;
    Ok((pn, Frames::new(&plain[start..])))
}

/// The packet number of a record plaintext and the offset where its frames start.
pub fn parse_record_header(plain: &[u8]) -> Result<(u64, usize), WireError> {
    let mut r = Reader::new(plain);
    let pn = r.varint()?;
    Ok((pn, r.position()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame<'_>) {
        let mut buf = [0u8; 256];
        let mut w = Writer::new(&mut buf);
        f.emit(&mut w).unwrap();
        assert_eq!(w.position(), f.encoded_len(), "{f:?}");
        let n = w.position();
        let mut it = Frames::new(&buf[..n]);
        assert_eq!(it.next(), Some(Ok(f)));
        assert_eq!(it.next(), None);
        // Every truncation fails cleanly (except where a prefix is itself valid).
        for cut in 0..n {
            let _ = Frames::new(&buf[..cut]).count();
        }
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Padding);
        round_trip(Frame::Ping);
        round_trip(Frame::Window(1 << 40));
        round_trip(Frame::Stream {
            offset: 70_000,
            data: b"hello",
        });
        round_trip(Frame::Datagram(&[1, 2, 3]));
        round_trip(Frame::Heartbeat(&[]));
        round_trip(Frame::Ack(
            AckFrame::new(25, [100..=120, 90..=97, 0..=5]).unwrap(),
        ));
        round_trip(Frame::Ack(AckFrame::new(0, [7..=7]).unwrap()));
    }

    #[test]
    fn ack_fixture() {
        // largest 120, delay 25, 2 extra ranges, first 20 (100..=120),
        // gap 100-97-2=1 range 7 (90..=97), gap 90-5-2=83 range 5 (0..=5).
        let f = AckFrame::new(25, [100..=120, 90..=97, 0..=5]).unwrap();
        let mut buf = [0u8; 32];
        let mut w = Writer::new(&mut buf);
        Frame::Ack(f).emit(&mut w).unwrap();
        let n = w.position();
        assert_eq!(&buf[..n], &[0x02, 0x40, 120, 25, 2, 20, 1, 7, 0x40, 83, 5]);
        assert_eq!(
            f.ranges().collect::<Vec<_>>(),
            vec![100..=120, 90..=97, 0..=5]
        );
    }

    #[test]
    fn ack_rejects_bad_ranges() {
        assert!(AckFrame::new(0, []).is_none());
        // Touching or overlapping ranges end the list.
        let f = AckFrame::new(0, [10..=20, 9..=9]).unwrap();
        assert_eq!(f.ranges().count(), 1);
        // Underflow on decode.
        let mut it = Frames::new(&[0x02, 5, 0, 0, 6]);
        assert_eq!(it.next(), Some(Err(WireError::Malformed)));
        assert_eq!(it.next(), None);
        let mut it = Frames::new(&[0x02, 5, 0, 1, 0, 4, 0]);
        assert_eq!(it.next(), Some(Err(WireError::Malformed)));
        // Too many ranges.
        assert_eq!(
            Frames::new(&[0x02, 5, 0, 40, 0]).next(),
            Some(Err(WireError::Malformed))
        );
        // Unknown frame.
        assert_eq!(
            Frames::new(&[0x7f]).next(),
            Some(Err(WireError::UnknownFrame(0x7f)))
        );
    }

    #[test]
    fn record_and_capacity_helpers() {
        let (pn, mut frames) = parse_record(&[0x41, 0x00, 0x01]).unwrap();
        assert_eq!(pn, 256);
        assert_eq!(frames.next(), Some(Ok(Frame::Ping)));
        assert!(parse_record(&[]).is_err());
        for space in 0..300 {
            let n = max_prefixed_payload(space);
            if n > 0 {
                assert!(1 + varint_len(n as u64) + n <= space);
                assert!(2 + varint_len(n as u64 + 1) + n > space);
            }
        }
    }
}
