//! Load reports carried by heartbeats.
//!
//! ```text
//! version (u8) = 1
//! cpu busy (u16 LE, basis points 0..=10000)
//! connections, bytes/s in, bytes/s out (varints)
//! extensions: (type varint, length varint, value)*   — unknown types are skipped
//!   type 1 = forecast: horizon ms (varint), cpu busy (u16 LE bp), connections (varint)
//!   type 2 = lease renewals: (connection id at the sender (varint), volume (varint))*
//!            volume = 0: no forecast; otherwise 1 + predicted volume in milliseconds of
//!            the holder's capacity; at most MAX_LEASE_RENEWALS entries
//!   type 3 = ended connections' KPIs, for the shadow trials of their primaries:
//!            (connection id at the sender (varint), latency (varint), flags (varint))*
//!            latency = 0: none measured; otherwise 1 + mean response time in µs;
//!            flags bit 0 = ended in an error or reset (other bits: ignored);
//!            at most MAX_KPI_REPORTS entries
//!   type 4 = segment statistics of the sender's hottest connections:
//!            (connection id at the sender (varint), segment count (varint),
//!             (gap (varint), length (varint), bytes (varint), packets (varint),
//!              idle ms (varint))*)*
//!            a segment starts `gap` bytes after the end of the one before it (the first:
//!            after offset 0); length = 0: open-ended (the stream's tail), otherwise
//!            1 + its length; idle = since its last activity, at the sender's report;
//!            at most MAX_SEGMENT_CONNS entries of at most MAX_SEGMENTS_PER_CONN
//!            segments, at most MAX_SEGMENT_STATS_LEN bytes of value (whole entries)
//!   type 5 = tunnel features of the sending endpoint (varint bit set), appended by the
//!            endpoint itself, not part of [`LoadReport`]: bit 0 = it accepts records
//!            that carry several DATAGRAM frames (other bits: ignored); the last type-5
//!            extension counts, and a report or value that does not decode announces none
//! ```
//!
//! New optional fields are added as new extension types without a version change; a
//! change of the fixed part bumps the version, and a receiver rejects versions it does not
//! know.

use std::time::Duration;

use crate::wire::WireError;
use crate::wire::coding::{Reader, VARINT_MAX, Writer, varint_len};

/// Version of the load report encoding.
pub const LOAD_REPORT_VERSION: u8 = 1;
const EXT_FORECAST: u64 = 1;
const EXT_LEASES: u64 = 2;
const EXT_KPIS: u64 = 3;
const EXT_SEGMENTS: u64 = 4;
const EXT_TUNNEL_FEATURES: u64 = 5;
/// Tunnel feature bit: the endpoint accepts records that carry several DATAGRAM frames.
pub(crate) const FEATURE_PACKED_DATAGRAMS: u64 = 1;
/// Ended connections' KPIs one report carries at most (under 230 bytes: with the most lease
/// renewals, a report stays under about 1,150 bytes and still fits one heartbeat record).
pub const MAX_KPI_REPORTS: usize = 12;
/// Lease renewals one report carries at most (a sender with more rotates through them);
/// they keep a report under about 900 bytes, so that it fits a heartbeat record.
pub const MAX_LEASE_RENEWALS: usize = 48;
/// Connections whose segment statistics one report carries at most.
pub const MAX_SEGMENT_CONNS: usize = 4;
/// Segments per connection one report carries at most (a sender with more sends a summary:
/// see `Segments::summary` in the engine).
pub const MAX_SEGMENTS_PER_CONN: usize = 4;
/// The most bytes the segment statistics take in a report (the extension's value): a sender
/// sends the first entries that fit whole. The largest entry (every figure at 2^62) takes
/// 169 bytes, so the first always fits; typical entries take 30–60 bytes.
pub const MAX_SEGMENT_STATS_LEN: usize = 256;
/// The longest report that fits one heartbeat record with the default
/// [`crate::Config::max_udp_payload`] of 1452 bytes: 1420 bytes of record body (after the
/// 16-byte header and the 16-byte tag), less an 8-byte packet number, a WINDOW frame
/// (9 bytes) and the HEARTBEAT frame's own type and length (3 bytes). With every extension
/// at its cap a report stays under 1,300 bytes.
pub const MAX_LOAD_REPORT_LEN: usize = 1400;
const BP_MAX: u16 = 10_000;

/// A node's load, as its heartbeats announce it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Fraction of CPU time busy, 0.0 to 1.0 (sent with 10^-4 resolution, clamped).
    pub cpu_busy: f32,
    /// Connections the node terminates.
    pub connections: u64,
    /// Bytes per second received.
    pub bytes_in_per_sec: u64,
    /// Bytes per second sent.
    pub bytes_out_per_sec: u64,
    /// The node's own forecast, if it makes one.
    pub forecast: Option<LoadForecast>,
    /// Leases this node (a primary) renews on connections it offloaded: every receiver
    /// picks out the connections restored on it from the sender. Only the first
    /// [`MAX_LEASE_RENEWALS`] are sent.
    pub leases: Vec<LeaseRenewal>,
    /// KPIs of connections that ended at this node after their primary (another node)
    /// moved them here: each primary picks out the connections it shadowed here, by their
    /// id at this node. Only the first [`MAX_KPI_REPORTS`] are sent.
    pub kpis: Vec<KpiReport>,
    /// Segment statistics of this node's hottest connections, hottest first. Only the first
    /// [`MAX_SEGMENT_CONNS`] are sent, each with its first [`MAX_SEGMENTS_PER_CONN`]
    /// segments, and of those only the entries that fit [`MAX_SEGMENT_STATS_LEN`].
    pub segments: Vec<SegmentReport>,
}

/// What one of the sender's connections sent to its client, by byte range of the stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentReport {
    /// The connection's id at the sender.
    pub conn: u64,
    /// Its segments, in stream order without overlap (a segment that starts before the end
    /// of the one before it is sent as starting there; none is sent after an open-ended
    /// one).
    pub segments: Vec<SegmentStat>,
}

/// One byte range of a connection's stream and what it carried.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegmentStat {
    /// Its first stream offset (offsets count from the connection's accept at the sender,
    /// or from its restore there).
    pub start: u64,
    /// Its length; `None` for the open-ended tail of the stream.
    pub len: Option<u64>,
    /// Bytes seen in it (retransmissions count again).
    pub bytes: u64,
    /// Packets that carried them.
    pub packets: u64,
    /// Time since its last activity, at the sender (millisecond resolution on the wire).
    pub idle: Duration,
}

impl SegmentStat {
    fn idle_ms(&self) -> u64 {
        clamp62(u64::try_from(self.idle.as_millis()).unwrap_or(u64::MAX))
    }

    fn len_code(&self) -> u64 {
        optional_code(self.len.map(u128::from))
    }
}

impl SegmentReport {
    /// The segments sent with their gaps: up to [`MAX_SEGMENTS_PER_CONN`], none after an
    /// open-ended one or from one that would end past 2^64 on.
    fn sent(&self) -> impl Iterator<Item = (u64, &SegmentStat)> {
        let mut end = Some(0u64);
        self.segments
            .iter()
            .take(MAX_SEGMENTS_PER_CONN)
            .map_while(move |s| {
                // Where the receiver will see it end (the length as the wire carries it),
                // so that nothing is sent that it would find past 2^64.
                let prev = end?;
                let gap = clamp62(s.start.saturating_sub(prev));
                let start = prev.checked_add(gap)?;
                end = match s.len {
                    Some(l) => Some(start.checked_add(l.min(VARINT_MAX - 1))?),
                    None => None,
                };
                Some((gap, s))
            })
    }

    fn count(&self) -> usize {
        self.sent().count()
    }

    fn encoded_len(&self) -> usize {
        varint_len(clamp62(self.conn))
            + varint_len(self.count() as u64)
            + self
                .sent()
                .map(|(gap, s)| {
                    varint_len(gap)
                        + varint_len(s.len_code())
                        + varint_len(clamp62(s.bytes))
                        + varint_len(clamp62(s.packets))
                        + varint_len(s.idle_ms())
                })
                .sum::<usize>()
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.varint(clamp62(self.conn))?;
        w.varint(self.count() as u64)?;
        for (gap, s) in self.sent() {
            w.varint(gap)?;
            w.varint(s.len_code())?;
            w.varint(clamp62(s.bytes))?;
            w.varint(clamp62(s.packets))?;
            w.varint(s.idle_ms())?;
        }
        Ok(())
    }

    /// Reads one entry; segments over the cap or after an open-ended one are read and
    /// dropped. A segment that would end past 2^64 is malformed.
    fn decode(v: &mut Reader<'_>) -> Result<SegmentReport, WireError> {
        let conn = v.varint()?;
        let count = v.varint()?;
        let mut segments = Vec::new();
        let mut end = Some(0u64);
        // Every segment takes at least five bytes: a hostile count ends at the end of the
        // value (truncated), it allocates nothing.
        for _ in 0..count {
            let gap = v.varint()?;
            let len = from_optional_code(v.varint()?);
            let bytes = v.varint()?;
            let packets = v.varint()?;
            let idle = Duration::from_millis(v.varint()?);
            let Some(prev) = end else { continue };
            let start = prev.checked_add(gap).ok_or(WireError::Malformed)?;
            end = match len {
                Some(l) => Some(start.checked_add(l).ok_or(WireError::Malformed)?),
                None => None,
            };
            if segments.len() < MAX_SEGMENTS_PER_CONN {
                segments.push(SegmentStat {
                    start,
                    len,
                    bytes,
                    packets,
                    idle,
                });
            }
        }
        Ok(SegmentReport { conn, segments })
    }
}

/// How a connection fared at the node that served it until it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KpiReport {
    /// The connection's id at the sender (the node that served it).
    pub conn: u64,
    /// Its mean response time there (microsecond resolution on the wire), if any was
    /// measured.
    pub latency: Option<Duration>,
    /// It ended in an error or a reset.
    pub error: bool,
}

impl KpiReport {
    fn latency_code(&self) -> u64 {
        optional_code(self.latency.map(|v| v.as_micros()))
    }

    fn encoded_len(&self) -> usize {
        varint_len(clamp62(self.conn)) + varint_len(self.latency_code()) + 1
    }
}

/// One lease renewal: "keep my connection `conn`".
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LeaseRenewal {
    /// The connection's id at the sender (its primary).
    pub conn: u64,
    /// Its predicted volume, in seconds of the holder's capacity (millisecond resolution
    /// on the wire); `None` when the sender has no usable forecast.
    pub volume: Option<Duration>,
}

impl LeaseRenewal {
    fn volume_code(&self) -> u64 {
        optional_code(self.volume.map(|v| v.as_millis()))
    }

    fn encoded_len(&self) -> usize {
        varint_len(clamp62(self.conn)) + varint_len(self.volume_code())
    }
}

/// A forecast of load some time ahead.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadForecast {
    /// How far ahead (millisecond resolution on the wire).
    pub horizon: Duration,
    /// Predicted CPU busy fraction.
    pub cpu_busy: f32,
    /// Predicted connections.
    pub connections: u64,
}

fn to_bp(f: f32) -> u16 {
    if f.is_nan() {
        0
    } else {
        // Clamped to 0..=10000 first, so the cast is exact.
        (f.clamp(0.0, 1.0) * f32::from(BP_MAX)).round() as u16
    }
}

fn from_bp(bp: u16) -> Result<f32, WireError> {
    if bp > BP_MAX {
        Err(WireError::Malformed)
    } else {
        Ok(f32::from(bp) / f32::from(BP_MAX))
    }
}

fn clamp62(v: u64) -> u64 {
    v.min(VARINT_MAX)
}

/// An optional count on the wire: 0 for none, else the count plus one (clamped).
fn optional_code(v: Option<u128>) -> u64 {
    v.map_or(0, |v| {
        clamp62(u64::try_from(v).unwrap_or(u64::MAX))
            .saturating_add(1)
            .min(VARINT_MAX)
    })
}

/// The count an [`optional_code`] carries.
fn from_optional_code(code: u64) -> Option<u64> {
    code.checked_sub(1)
}

impl LoadForecast {
    fn horizon_ms(&self) -> u64 {
        clamp62(u64::try_from(self.horizon.as_millis()).unwrap_or(u64::MAX))
    }

    fn encoded_len(&self) -> usize {
        varint_len(self.horizon_ms()) + 2 + varint_len(clamp62(self.connections))
    }
}

impl LoadReport {
    fn sent_leases(&self) -> &[LeaseRenewal] {
        &self.leases[..self.leases.len().min(MAX_LEASE_RENEWALS)]
    }

    fn leases_len(&self) -> usize {
        self.sent_leases()
            .iter()
            .map(LeaseRenewal::encoded_len)
            .sum()
    }

    fn sent_kpis(&self) -> &[KpiReport] {
        &self.kpis[..self.kpis.len().min(MAX_KPI_REPORTS)]
    }

    fn kpis_len(&self) -> usize {
        self.sent_kpis().iter().map(KpiReport::encoded_len).sum()
    }

    /// The segment entries sent (the first that fit whole) and their length.
    fn sent_segments(&self) -> (&[SegmentReport], usize) {
        let mut len = 0;
        let mut n = 0;
        for r in self.segments.iter().take(MAX_SEGMENT_CONNS) {
            let l = r.encoded_len();
            if len + l > MAX_SEGMENT_STATS_LEN {
                break;
            }
            len += l;
            n += 1;
        }
        (&self.segments[..n], len)
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        let mut n = 1
            + 2
            + varint_len(clamp62(self.connections))
            + varint_len(clamp62(self.bytes_in_per_sec))
            + varint_len(clamp62(self.bytes_out_per_sec));
        if let Some(f) = &self.forecast {
            let l = f.encoded_len();
            n += varint_len(EXT_FORECAST) + varint_len(l as u64) + l;
        }
        if !self.leases.is_empty() {
            let l = self.leases_len();
            n += varint_len(EXT_LEASES) + varint_len(l as u64) + l;
        }
        if !self.kpis.is_empty() {
            let l = self.kpis_len();
            n += varint_len(EXT_KPIS) + varint_len(l as u64) + l;
        }
        if !self.segments.is_empty() {
            let (_, l) = self.sent_segments();
            n += varint_len(EXT_SEGMENTS) + varint_len(l as u64) + l;
        }
        n
    }

    /// Encodes the report (integers above 2^62 - 1 are clamped).
    pub fn encode(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.u8(LOAD_REPORT_VERSION)?;
        w.u16_le(to_bp(self.cpu_busy))?;
        w.varint(clamp62(self.connections))?;
        w.varint(clamp62(self.bytes_in_per_sec))?;
        w.varint(clamp62(self.bytes_out_per_sec))?;
        if let Some(f) = &self.forecast {
            w.varint(EXT_FORECAST)?;
            w.varint(f.encoded_len() as u64)?;
            w.varint(f.horizon_ms())?;
            w.u16_le(to_bp(f.cpu_busy))?;
            w.varint(clamp62(f.connections))?;
        }
        if !self.leases.is_empty() {
            w.varint(EXT_LEASES)?;
            w.varint(self.leases_len() as u64)?;
            for l in self.sent_leases() {
                w.varint(clamp62(l.conn))?;
                w.varint(l.volume_code())?;
            }
        }
        if !self.kpis.is_empty() {
            w.varint(EXT_KPIS)?;
            w.varint(self.kpis_len() as u64)?;
            for k in self.sent_kpis() {
                w.varint(clamp62(k.conn))?;
                w.varint(k.latency_code())?;
                w.varint(u64::from(k.error))?;
            }
        }
        if !self.segments.is_empty() {
            let (sent, len) = self.sent_segments();
            w.varint(EXT_SEGMENTS)?;
            w.varint(len as u64)?;
            for r in sent {
                r.encode(w)?;
            }
        }
        Ok(())
    }

    /// The encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        let mut w = Writer::new(&mut out);
        // The buffer has exactly `encoded_len` bytes and every value is clamped.
        self.encode(&mut w).expect("sized by encoded_len");
        out
    }

    /// Decodes a report; unknown extensions are skipped.
    pub fn decode(bytes: &[u8]) -> Result<LoadReport, WireError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != LOAD_REPORT_VERSION {
            return Err(WireError::Version(version));
        }
        let mut report = LoadReport {
            cpu_busy: from_bp(r.u16_le()?)?,
            connections: r.varint()?,
            bytes_in_per_sec: r.varint()?,
            bytes_out_per_sec: r.varint()?,
            forecast: None,
            leases: Vec::new(),
            kpis: Vec::new(),
            segments: Vec::new(),
        };
        while !r.is_empty() {
            let ty = r.varint()?;
            let value = r.length_prefixed()?;
            if ty == EXT_FORECAST {
                let mut v = Reader::new(value);
                let forecast = LoadForecast {
                    horizon: Duration::from_millis(v.varint()?),
                    cpu_busy: from_bp(v.u16_le()?)?,
                    connections: v.varint()?,
                };
                if !v.is_empty() {
                    return Err(WireError::Malformed);
                }
                report.forecast = Some(forecast);
            } else if ty == EXT_LEASES {
                let mut v = Reader::new(value);
                report.leases.clear();
                while !v.is_empty() {
                    let conn = v.varint()?;
                    let volume = from_optional_code(v.varint()?).map(Duration::from_millis);
                    if report.leases.len() < MAX_LEASE_RENEWALS {
                        report.leases.push(LeaseRenewal { conn, volume });
                    }
                }
            } else if ty == EXT_KPIS {
                let mut v = Reader::new(value);
                report.kpis.clear();
                while !v.is_empty() {
                    let conn = v.varint()?;
                    let latency = from_optional_code(v.varint()?).map(Duration::from_micros);
                    let flags = v.varint()?;
                    if report.kpis.len() < MAX_KPI_REPORTS {
                        report.kpis.push(KpiReport {
                            conn,
                            latency,
                            error: flags & 1 != 0,
                        });
                    }
                }
            } else if ty == EXT_SEGMENTS {
                let mut v = Reader::new(value);
                report.segments.clear();
                while !v.is_empty() {
                    let entry = SegmentReport::decode(&mut v)?;
                    if report.segments.len() < MAX_SEGMENT_CONNS {
                        report.segments.push(entry);
                    }
                }
            }
        }
        Ok(report)
    }
}

/// An encoded report with the endpoint's tunnel-features extension (type 5) appended:
/// what the sending endpoint accepts, whatever the report's owner put in it.
pub(crate) fn with_features(mut report: Vec<u8>, features: u64) -> Vec<u8> {
    let mut ext = [0u8; 1 + 1 + 8];
    let len = {
        let mut w = Writer::new(&mut ext);
        // Fits: the type and the length take a byte each, the value at most 8.
        let ok = w.varint(EXT_TUNNEL_FEATURES).is_ok()
            && w.varint(varint_len(features) as u64).is_ok()
            && w.varint(features).is_ok();
        if ok { w.position() } else { 0 }
    };
    report.extend_from_slice(&ext[..len]);
    report
}

/// The tunnel features an encoded report announces (its last type-5 extension); none from
/// a report that does not decode or has no such extension (an older endpoint).
pub(crate) fn features(report: &[u8]) -> u64 {
    fn walk(report: &[u8]) -> Result<u64, WireError> {
        let mut r = Reader::new(report);
        if r.u8()? != LOAD_REPORT_VERSION {
            return Err(WireError::Malformed);
        }
        r.u16_le()?;
        for _ in 0..3 {
            r.varint()?;
        }
        let mut features = 0;
        while !r.is_empty() {
            let ty = r.varint()?;
            let value = r.length_prefixed()?;
            if ty == EXT_TUNNEL_FEATURES {
                features = Reader::new(value).varint()?;
            }
        }
        Ok(features)
    }
    walk(report).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_and_without_forecast() {
        let mut r = LoadReport {
            cpu_busy: 0.25,
            connections: 1234,
            bytes_in_per_sec: 10_000_000,
            bytes_out_per_sec: 1,
            forecast: None,
            leases: Vec::new(),
            kpis: Vec::new(),
            segments: Vec::new(),
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(&bytes[..3], &[1, 0xc4, 0x09]); // version, 2500 bp
        assert_eq!(LoadReport::decode(&bytes), Ok(r.clone()));
        r.forecast = Some(LoadForecast {
            horizon: Duration::from_secs(30),
            cpu_busy: 0.9,
            connections: 2000,
        });
        assert_eq!(LoadReport::decode(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn lease_renewals_round_trip_capped() {
        let mut r = LoadReport {
            connections: 3,
            leases: vec![
                LeaseRenewal {
                    conn: 0x1_0000_0005,
                    volume: Some(Duration::from_millis(12_345)),
                },
                LeaseRenewal {
                    conn: 7,
                    volume: None,
                },
                LeaseRenewal {
                    conn: 8,
                    volume: Some(Duration::ZERO),
                },
            ],
            ..Default::default()
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        // Extension 2, 14 bytes: an 8-byte id and a 2-byte volume, then 7 without a
        // forecast and 8 with a volume of 0 ms.
        assert_eq!(&bytes[6..8], &[2, 14]);
        assert_eq!(&bytes[bytes.len() - 4..], &[7, 0, 8, 1]);
        assert_eq!(LoadReport::decode(&bytes), Ok(r.clone()));
        // Only the first MAX_LEASE_RENEWALS are sent, and the report stays small.
        r.leases = (0..200)
            .map(|i| LeaseRenewal {
                conn: u64::MAX - i,
                volume: Some(Duration::from_secs(86_400 * 365)),
            })
            .collect();
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        assert!(bytes.len() < 900, "{}", bytes.len());
        let d = LoadReport::decode(&bytes).unwrap();
        assert_eq!(d.leases.len(), MAX_LEASE_RENEWALS);
        assert_eq!(d.leases[0].conn, VARINT_MAX);
        // A truncated entry is malformed, not a panic.
        assert_eq!(
            LoadReport::decode(&[1, 0, 0, 0, 0, 0, 2, 1, 5]),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn kpi_reports_round_trip_capped_and_the_largest_report_fits_a_heartbeat() {
        let mut r = LoadReport {
            connections: 3,
            kpis: vec![
                KpiReport {
                    conn: 0x1_0000_0005,
                    latency: Some(Duration::from_micros(1_234)),
                    error: false,
                },
                KpiReport {
                    conn: 7,
                    latency: None,
                    error: true,
                },
            ],
            ..Default::default()
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        // Extension 3, 14 bytes: an 8-byte id, a 2-byte latency (1 + 1,234 µs) and the
        // flags; then 7, no latency, error.
        assert_eq!(&bytes[6..8], &[3, 14]);
        assert_eq!(&bytes[bytes.len() - 3..], &[7, 0, 1]);
        assert_eq!(LoadReport::decode(&bytes), Ok(r.clone()));
        // Unknown flag bits are ignored.
        let mut odd = bytes.clone();
        *odd.last_mut().unwrap() = 3;
        assert!(LoadReport::decode(&odd).unwrap().kpis[1].error);
        // Only the first MAX_KPI_REPORTS are sent; with the most lease renewals too, the
        // largest report fits a heartbeat record.
        r.kpis = (0..100)
            .map(|i| KpiReport {
                conn: u64::MAX - i,
                latency: Some(Duration::from_secs(86_400 * 365)),
                error: true,
            })
            .collect();
        r.leases = (0..200)
            .map(|i| LeaseRenewal {
                conn: u64::MAX - i,
                volume: Some(Duration::from_secs(86_400 * 365)),
            })
            .collect();
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        assert!(bytes.len() < 1150, "{}", bytes.len());
        let d = LoadReport::decode(&bytes).unwrap();
        assert_eq!(
            (d.kpis.len(), d.leases.len()),
            (MAX_KPI_REPORTS, MAX_LEASE_RENEWALS)
        );
        // A truncated entry is malformed, not a panic.
        assert_eq!(
            LoadReport::decode(&[1, 0, 0, 0, 0, 0, 3, 2, 5, 0]),
            Err(WireError::Truncated)
        );
    }

    fn seg(start: u64, len: Option<u64>, bytes: u64, packets: u64, idle_ms: u64) -> SegmentStat {
        SegmentStat {
            start,
            len,
            bytes,
            packets,
            idle: Duration::from_millis(idle_ms),
        }
    }

    #[test]
    fn segment_statistics_round_trip_with_gaps_and_caps() {
        let mut r = LoadReport {
            connections: 2,
            segments: vec![
                SegmentReport {
                    conn: 9,
                    segments: vec![
                        seg(0, Some(1 << 20), 1 << 20, 700, 5_000),
                        seg(1 << 20, None, 300, 1, 40),
                    ],
                },
                SegmentReport {
                    conn: 0x1_0000_0005,
                    segments: Vec::new(),
                },
            ],
            ..Default::default()
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        // Extension 4, 30 bytes: 9 with 2 segments — no gap, a 4-byte length (1 + 2^20),
        // 2^20 bytes, 700 packets, 5,000 ms; then no gap, open-ended, 300 bytes, one packet,
        // 40 ms — and an 8-byte id with none.
        assert_eq!(&bytes[6..10], &[4, 30, 9, 2]);
        assert_eq!(&bytes[10..12], &[0, 0x80]);
        assert_eq!(
            &bytes[bytes.len() - 15..bytes.len() - 8],
            &[0, 0, 0x41, 0x2c, 1, 40, 0xc0]
        );
        assert_eq!(LoadReport::decode(&bytes), Ok(r.clone()));
        // A gap between segments is carried; one starting before the end of the one
        // before it is sent as starting there; nothing after an open-ended one.
        r.segments = vec![SegmentReport {
            conn: 1,
            segments: vec![
                seg(100, Some(50), 50, 1, 0),
                seg(1_000, Some(10), 10, 1, 0),
                seg(1_005, None, 7, 1, 0),
                seg(5_000, Some(1), 1, 1, 0),
            ],
        }];
        let d = LoadReport::decode(&r.to_bytes()).unwrap();
        assert_eq!(
            d.segments[0].segments,
            [
                seg(100, Some(50), 50, 1, 0),
                seg(1_000, Some(10), 10, 1, 0),
                seg(1_010, None, 7, 1, 0),
            ]
        );
        // At most MAX_SEGMENT_CONNS entries of MAX_SEGMENTS_PER_CONN segments, and only
        // whole entries within MAX_SEGMENT_STATS_LEN: with every figure at its largest,
        // one entry.
        let huge = SegmentReport {
            conn: u64::MAX,
            segments: (0..10)
                .map(|i| {
                    seg(
                        u64::MAX / 16 * i,
                        Some(u64::MAX / 16),
                        u64::MAX,
                        u64::MAX,
                        u64::MAX,
                    )
                })
                .collect(),
        };
        r.segments = vec![huge.clone(); 10];
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        let d = LoadReport::decode(&bytes).unwrap();
        assert_eq!(d.segments.len(), 1);
        assert_eq!(d.segments[0].segments.len(), MAX_SEGMENTS_PER_CONN);
        assert_eq!(d.segments[0].conn, VARINT_MAX);
        let small = SegmentReport {
            conn: 3,
            segments: vec![seg(0, Some(1 << 20), 1 << 20, 1000, 100); 9],
        };
        r.segments = vec![small; 9];
        let d = LoadReport::decode(&r.to_bytes()).unwrap();
        assert_eq!(d.segments.len(), MAX_SEGMENT_CONNS);
        assert!(
            d.segments
                .iter()
                .all(|s| s.segments.len() == MAX_SEGMENTS_PER_CONN)
        );
        // A receiver ignores entries and segments over the caps that a sender put in.
        let mut w_buf = vec![0u8; 4096];
        let mut w = Writer::new(&mut w_buf);
        for _ in 0..6 {
            w.varint(7).unwrap();
            w.varint(6).unwrap();
            for _ in 0..6 {
                for v in [0, 11, 10, 1, 0] {
                    w.varint(v).unwrap();
                }
            }
        }
        let value_len = 4096 - w.remaining();
        let mut odd = vec![1, 0, 0, 0, 0, 0, 4];
        odd.extend_from_slice(&[0x40 | (value_len >> 8) as u8, value_len as u8]);
        odd.extend_from_slice(&w_buf[..value_len]);
        let d = LoadReport::decode(&odd).unwrap();
        assert_eq!(d.segments.len(), MAX_SEGMENT_CONNS);
        assert_eq!(d.segments[3].segments.len(), MAX_SEGMENTS_PER_CONN);
        assert_eq!(d.segments[3].segments[3], seg(30, Some(10), 10, 1, 0));
    }

    #[test]
    fn hostile_segment_statistics_do_not_panic() {
        // A huge count with nothing behind it; a truncated segment; a truncated value.
        let cases: [&[u8]; 3] = [
            &[
                1, 0, 0, 0, 0, 0, 4, 9, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            &[1, 0, 0, 0, 0, 0, 4, 4, 1, 1, 0, 0],
            &[1, 0, 0, 0, 0, 0, 4, 2, 1],
        ];
        for c in cases {
            assert_eq!(LoadReport::decode(c), Err(WireError::Truncated));
        }
        // Three segments of the largest gap and length: the third starts past 2^64.
        let mut value = [0u8; 64];
        let mut w = Writer::new(&mut value);
        w.varint(1).unwrap();
        w.varint(3).unwrap();
        for _ in 0..3 {
            for v in [VARINT_MAX, VARINT_MAX, 0, 0, 0] {
                w.varint(v).unwrap();
            }
        }
        let n = 64 - w.remaining();
        let mut past = vec![1, 0, 0, 0, 0, 0, 4, n as u8];
        past.extend_from_slice(&value[..n]);
        assert_eq!(LoadReport::decode(&past), Err(WireError::Malformed));
        // Every prefix and every single-byte change of a valid report decodes or fails,
        // never panics.
        let r = LoadReport {
            segments: vec![SegmentReport {
                conn: 5,
                segments: vec![seg(0, Some(3000), 3000, 4, 1), seg(3000, None, 10, 1, 2)],
            }],
            ..Default::default()
        };
        let bytes = r.to_bytes();
        for n in 0..bytes.len() {
            let _ = LoadReport::decode(&bytes[..n]);
            for b in [0u8, 0x3f, 0x40, 0x80, 0xc0, 0xff] {
                let mut m = bytes.clone();
                m[n] = b;
                let _ = LoadReport::decode(&m);
            }
        }
    }

    #[test]
    fn the_largest_report_fits_a_heartbeat_record() {
        let huge = SegmentReport {
            conn: u64::MAX,
            segments: vec![seg(0, Some(u64::MAX / 8), u64::MAX, u64::MAX, u64::MAX); 8],
        };
        let r = LoadReport {
            cpu_busy: 1.0,
            connections: u64::MAX,
            bytes_in_per_sec: u64::MAX,
            bytes_out_per_sec: u64::MAX,
            forecast: Some(LoadForecast {
                horizon: Duration::MAX,
                cpu_busy: 1.0,
                connections: u64::MAX,
            }),
            leases: vec![
                LeaseRenewal {
                    conn: u64::MAX,
                    volume: Some(Duration::MAX),
                };
                100
            ],
            kpis: vec![
                KpiReport {
                    conn: u64::MAX,
                    latency: Some(Duration::MAX),
                    error: true,
                };
                100
            ],
            segments: vec![huge; 10],
        };
        let bytes = r.to_bytes();
        assert_eq!(bytes.len(), r.encoded_len());
        assert!(bytes.len() <= MAX_LOAD_REPORT_LEN, "{}", bytes.len());
        // The segment statistics take at most their budget (and its header).
        let without = LoadReport {
            segments: Vec::new(),
            ..r.clone()
        };
        assert!(bytes.len() - without.encoded_len() <= MAX_SEGMENT_STATS_LEN + 3);
        // So with segment statistics at their budget and the endpoint's 3 bytes of
        // features, under 1,300 bytes.
        assert!(without.encoded_len() + MAX_SEGMENT_STATS_LEN + 3 + 3 < 1300);
        let d = LoadReport::decode(&bytes).unwrap();
        assert_eq!(d.segments.len(), 1);
        // The endpoint's features extension takes 3 bytes more, and the whole still fits.
        let sent = with_features(bytes.clone(), FEATURE_PACKED_DATAGRAMS);
        assert_eq!(sent.len(), bytes.len() + 3);
        assert!(sent.len() <= MAX_LOAD_REPORT_LEN);
    }

    #[test]
    fn the_tunnel_features_ride_the_report_and_its_owner_does_not_see_them() {
        let r = LoadReport {
            cpu_busy: 0.25,
            connections: 3,
            leases: vec![LeaseRenewal {
                conn: 9,
                volume: None,
            }],
            ..Default::default()
        };
        let plain = r.to_bytes();
        assert_eq!(
            features(&plain),
            0,
            "a report from an older endpoint: no features"
        );
        let sent = with_features(plain.clone(), FEATURE_PACKED_DATAGRAMS);
        assert_eq!(features(&sent), FEATURE_PACKED_DATAGRAMS);
        assert_eq!(LoadReport::decode(&sent).unwrap(), r);
        // Unknown bits pass through; the last extension of the type counts.
        let twice = with_features(with_features(plain.clone(), 0b110), 0b1);
        assert_eq!(features(&twice), 0b1);
        assert_eq!(features(&with_features(plain.clone(), 1 << 40)), 1 << 40);
        // Anything that does not decode announces nothing.
        for bad in [&sent[..sent.len() - 1], &[][..], &[1, 0, 0][..]] {
            assert_eq!(features(bad), 0);
        }
        // A report of another version is not read with this one's layout.
        let mut other = sent.clone();
        other[0] = LOAD_REPORT_VERSION + 1;
        assert_eq!(features(&other), 0);
        let mut bad_value = plain;
        bad_value.extend_from_slice(&[5, 0]); // type 5 with an empty value
        assert_eq!(features(&bad_value), 0);
    }

    #[test]
    fn clamps_and_skips_unknown_extensions() {
        let r = LoadReport {
            cpu_busy: f32::NAN,
            connections: u64::MAX,
            ..Default::default()
        };
        let d = LoadReport::decode(&r.to_bytes()).unwrap();
        assert_eq!(d.cpu_busy, 0.0);
        assert_eq!(d.connections, VARINT_MAX);
        let r = LoadReport {
            cpu_busy: 7.0,
            ..Default::default()
        };
        let mut bytes = r.to_bytes();
        bytes.extend_from_slice(&[9, 2, 0xaa, 0xbb]); // extension 9, two bytes
        assert_eq!(LoadReport::decode(&bytes).unwrap().cpu_busy, 1.0);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(LoadReport::decode(&[]), Err(WireError::Truncated));
        assert_eq!(
            LoadReport::decode(&[2, 0, 0, 0, 0, 0]),
            Err(WireError::Version(2))
        );
        assert_eq!(
            LoadReport::decode(&[1, 0x11, 0x27, 0, 0, 0]),
            Err(WireError::Malformed)
        );
        assert_eq!(
            LoadReport::decode(&[1, 0, 0, 0, 0, 0, 9, 5]),
            Err(WireError::Truncated)
        );
    }
}
