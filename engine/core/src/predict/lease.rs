//! Leases of offloaded connections.
//!
//! The nodes that share a service address and a tunnel form a lease group. The node that
//! accepted a connection is its *primary*; when the connection is offloaded, its new holder keeps
//! a lease on it. The length comes from the connection's forecast:
//! `predicted_volume / utilisation_threshold`, bounded to `[min_lease, max_lease]`, where
//! `predicted_volume` is the work the connection is expected to bring, in seconds of the
//! holder's capacity (predicted load × expected remaining life): the lease lasts as long as that
//! work takes when the holder runs at `utilisation_threshold`. Without a usable forecast (none,
//! negative or not finite) the lease is [`LeaseConfig::default_lease`].
//!
//! The primary renews its leases through heartbeats ([`Leases::renew`]). A lease not renewed
//! expires: [`Leases::poll_event`] returns [`LeaseEvent::Expired`] and counts it. The holder
//! MUST then either hand the connection back to its primary (the normal case: the primary's
//! overload has passed, or the primary is gone and will not renew), or, if the primary asked it to
//! keep the connection in the meantime, renew it; it SHOULD log the expiry. A node never drops
//! a connection because its lease expired: if the way back fails, the connection stays where
//! it is ([`Leases::record_return`] counts both).
//!
//! The primary's side is an [`Offload`] per connection it moved by plan: it renews the lease
//! while taking the connection back would push it above its shedding level, and stops
//! renewing once it has room (see [`super::node::NodePredictor`]).

use std::collections::HashMap;

use smoltcp::time::{Duration, Instant};

use super::config::{ConfigError, duration_in, in_range};
use super::{ConnId, NodeId, secs};

/// Settings of leases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseConfig {
    /// Utilisation the holder is assumed to run at. Default 0.8.
    pub utilisation_threshold: f64,
    /// Shortest lease. Default 5 s.
    pub min_lease: Duration,
    /// Longest lease. Default 300 s.
    pub max_lease: Duration,
    /// Lease without a usable forecast. Default 30 s.
    pub default_lease: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            utilisation_threshold: 0.8,
            min_lease: Duration::from_secs(5),
            max_lease: Duration::from_secs(300),
            default_lease: Duration::from_secs(30),
        }
    }
}

impl LeaseConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "lease.utilisation_threshold",
            self.utilisation_threshold,
            0.01,
            1.0,
        )?;
        let day = Duration::from_secs(86_400);
        duration_in(
            "lease.min_lease",
            self.min_lease,
            Duration::from_millis(1),
            day,
        )?;
        duration_in(
            "lease.max_lease",
            self.max_lease,
            Duration::from_millis(1),
            day,
        )?;
        duration_in(
            "lease.default_lease",
            self.default_lease,
            Duration::from_millis(1),
            day,
        )?;
        if self.min_lease > self.max_lease {
            return Err(ConfigError::Order {
                low: "lease.min_lease",
                high: "lease.max_lease",
            });
        }
        Ok(())
    }
}

/// Where a lease's length came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseBasis {
    /// No usable forecast: [`LeaseConfig::default_lease`].
    Default,
    /// The forecast, bounded.
    Forecast,
}

/// A lease held on an offloaded connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lease {
    /// The connection.
    pub conn: ConnId,
    /// The node that accepted it.
    pub primary: NodeId,
    /// When it was granted or last renewed.
    pub renewed: Instant,
    /// When it expires.
    pub expires: Instant,
    /// Where its length came from.
    pub basis: LeaseBasis,
}

/// What the holder must act on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeaseEvent {
    /// A lease was not renewed in time; see the module doc for what the node does.
    Expired {
        /// The connection.
        conn: ConnId,
        /// Its primary, to hand it back to.
        primary: NodeId,
        /// When it expired.
        at: Instant,
    },
}

/// Counts since the table was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCounters {
    /// Leases granted.
    pub granted: u64,
    /// Renewals.
    pub renewed: u64,
    /// Leases that expired.
    pub expired: u64,
    /// Expired leases whose connection went back to its primary.
    pub returned: u64,
    /// Expired leases whose connection could not go back and stays here.
    pub kept: u64,
}

/// A connection this node (its primary) offloaded by plan, and whether it renews its lease.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offload {
    /// The connection, by its id here.
    pub conn: ConnId,
    /// The node holding it.
    pub holder: NodeId,
    /// Its id at the holder.
    pub remote: ConnId,
    /// When it moved.
    pub since: Instant,
    /// Its load when it moved, in the node's load unit: what taking it back would add.
    pub load: f64,
    /// Its predicted load over the node's capacity when it moved; `None` without a usable
    /// forecast (the holder then grants the default lease).
    pub rate: Option<f64>,
    /// The connection's age at the last sample.
    pub age: Duration,
    /// The lease is renewed in the next reports; `false`: this node has room for the
    /// connection again and lets its lease run out, so that the holder hands it back.
    pub renew: bool,
}

impl Offload {
    /// Its predicted volume in seconds of capacity: its rate × its expected remaining life,
    /// for which its age stands in (as in the planner).
    pub fn volume(&self) -> Option<f64> {
        self.rate
            .map(|r| r * secs(self.age))
            .filter(|v| v.is_finite() && *v >= 0.0)
    }
}

/// The leases this node holds.
#[derive(Debug, Clone)]
pub struct Leases {
    config: LeaseConfig,
    leases: HashMap<ConnId, Lease>,
    counters: LeaseCounters,
}

impl Leases {
    /// An empty table.
    pub fn new(config: LeaseConfig) -> Self {
        Self {
            config,
            leases: HashMap::new(),
            counters: LeaseCounters::default(),
        }
    }

    /// The length of a lease for `predicted_volume` (see the module doc).
    pub fn length(&self, predicted_volume: Option<f64>) -> (Duration, LeaseBasis) {
        let c = &self.config;
        match predicted_volume.filter(|v| v.is_finite() && *v >= 0.0) {
            None => (c.default_lease, LeaseBasis::Default),
            Some(v) => {
                let want = v / c.utilisation_threshold.max(1e-6);
                let s = want.clamp(secs(c.min_lease), secs(c.max_lease));
                (
                    Duration::from_micros((s * 1e6).round() as u64),
                    LeaseBasis::Forecast,
                )
            }
        }
    }

    /// Grants (or replaces) the lease on `conn`, offloaded from `primary`.
    pub fn grant(
        &mut self,
        now: Instant,
        conn: ConnId,
        primary: NodeId,
        predicted_volume: Option<f64>,
    ) -> Lease {
        let (length, basis) = self.length(predicted_volume);
        let lease = Lease {
            conn,
            primary,
            renewed: now,
            expires: now + length,
            basis,
        };
        self.leases.insert(conn, lease);
        self.counters.granted += 1;
        lease
    }

    /// Renews the lease on `conn` from `now` (a heartbeat from its primary); `None` if there is
    /// none. A renewal not later than the last one (the same report seen again) changes
    /// nothing.
    pub fn renew(
        &mut self,
        now: Instant,
        conn: ConnId,
        predicted_volume: Option<f64>,
    ) -> Option<Lease> {
        let (length, basis) = self.length(predicted_volume);
        let lease = self.leases.get_mut(&conn)?;
        if now <= lease.renewed {
            return Some(*lease);
        }
        lease.renewed = now;
        lease.expires = now + length;
        lease.basis = basis;
        self.counters.renewed += 1;
        Some(*lease)
    }

    /// Drops the lease on `conn` (the connection closed or went back).
    pub fn release(&mut self, conn: ConnId) -> Option<Lease> {
        self.leases.remove(&conn)
    }

    /// The lease on `conn`.
    pub fn lease(&self, conn: ConnId) -> Option<&Lease> {
        self.leases.get(&conn)
    }

    /// When the next lease expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }

    /// The next expired lease (earliest first, then lowest id), removed and counted.
    pub fn poll_event(&mut self, now: Instant) -> Option<LeaseEvent> {
        let lease = *self
            .leases
            .values()
            .filter(|l| l.expires <= now)
            .min_by_key(|l| (l.expires, l.conn))?;
        self.leases.remove(&lease.conn);
        self.counters.expired += 1;
        Some(LeaseEvent::Expired {
            conn: lease.conn,
            primary: lease.primary,
            at: lease.expires,
        })
    }

    /// Counts what became of an expired lease's connection: `returned` to its primary, or
    /// kept here.
    pub fn record_return(&mut self, returned: bool) {
        if returned {
            self.counters.returned += 1;
        } else {
            self.counters.kept += 1;
        }
    }

    /// Drops the leases of connections for which `keep` is false (closed, or gone back).
    pub fn retain(&mut self, mut keep: impl FnMut(ConnId) -> bool) {
        self.leases.retain(|id, _| keep(*id));
    }

    /// Every lease, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Leases held.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// No lease is held.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Counts since the table was made.
    pub fn counters(&self) -> LeaseCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_from_forecast_bounded_default_without() {
        let leases = Leases::new(LeaseConfig::default());
        let s = |v| leases.length(v);
        // 16 load-seconds at 0.8 utilisation: 20 s.
        assert_eq!(
            s(Some(16.0)),
            (Duration::from_secs(20), LeaseBasis::Forecast)
        );
        assert_eq!(s(Some(0.1)), (Duration::from_secs(5), LeaseBasis::Forecast));
        assert_eq!(
            s(Some(1e9)),
            (Duration::from_secs(300), LeaseBasis::Forecast)
        );
        assert_eq!(s(None), (Duration::from_secs(30), LeaseBasis::Default));
        assert_eq!(
            s(Some(f64::NAN)),
            (Duration::from_secs(30), LeaseBasis::Default)
        );
        assert_eq!(
            s(Some(-1.0)),
            (Duration::from_secs(30), LeaseBasis::Default)
        );
    }

    #[test]
    fn renewed_leases_live_on_others_expire_in_order() {
        let mut leases = Leases::new(LeaseConfig::default());
        let t0 = Instant::from_secs(100);
        leases.grant(t0, 1, NodeId(1), Some(16.0)); // 20 s
        leases.grant(t0, 2, NodeId(1), None); // 30 s
        leases.grant(t0, 3, NodeId(3), Some(8.0)); // 10 s
        assert_eq!(leases.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(leases.poll_event(t0 + Duration::from_secs(9)), None);
        // A heartbeat renews 1 at t0 + 15 s for 20 s more.
        let renewed = leases
            .renew(t0 + Duration::from_secs(15), 1, Some(16.0))
            .unwrap();
        assert_eq!(renewed.expires, t0 + Duration::from_secs(35));
        assert_eq!(leases.renew(t0, 9, None), None);
        // The same report seen again renews nothing.
        let again = leases.renew(t0 + Duration::from_secs(15), 1, None).unwrap();
        assert_eq!(again, renewed);

        let late = t0 + Duration::from_secs(31);
        assert_eq!(
            leases.poll_event(late),
            Some(LeaseEvent::Expired {
                conn: 3,
                primary: NodeId(3),
                at: t0 + Duration::from_secs(10)
            })
        );
        assert_eq!(
            leases.poll_event(late),
            Some(LeaseEvent::Expired {
                conn: 2,
                primary: NodeId(1),
                at: t0 + Duration::from_secs(30)
            })
        );
        assert_eq!(leases.poll_event(late), None);
        assert!(leases.lease(1).is_some());
        assert_eq!(
            leases.counters(),
            LeaseCounters {
                granted: 3,
                renewed: 1,
                expired: 2,
                ..LeaseCounters::default()
            }
        );
    }
}
