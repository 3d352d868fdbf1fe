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
/// Ended connections' KPIs one report carries at most (under 230 bytes: with the most lease
/// renewals, a report stays under about 1,150 bytes and still fits one heartbeat record).
pub const MAX_KPI_REPORTS: usize = 12;
/// Lease renewals one report carries at most (a sender with more rotates through them);
/// they keep a report under about 900 bytes, so that it fits a heartbeat record.
pub const MAX_LEASE_RENEWALS: usize = 48;
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
            }
        }
        Ok(report)
    }
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
