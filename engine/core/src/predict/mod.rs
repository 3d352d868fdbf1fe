//! Predictive offload: forecast load per connection and per node, and plan which connections
//! to move to which peer before the node overloads.
//!
//! Everything here is sans-IO and takes time as an argument, like the rest of the crate: the
//! node feeds counters in and acts on what comes out. The pieces, in the order a node uses them:
//!
//! 1. [`profile::Sampler`] turns cumulative per-connection counters and the node's own figures,
//!    fed every [`PredictConfig::interval`] (100 ms), into per-interval rates.
//! 2. A [`forecast::Forecaster`] per series (node utilisation, each connection's load) runs EWMA,
//!    Holt and additive Holt-Winters side by side, scores each on its recent one-step errors and
//!    forecasts with the most accurate one, or with the last value when none can be trusted; it
//!    says which ([`forecast::ModelChoice`]).
//! 3. [`detect::Detector`] compares the peak utilisation predicted over the horizon (5 s) with a
//!    threshold learned from the node's history; [`detect::imbalance`] reads the group's load
//!    reports.
//! 4. [`plan::Planner`] picks the connections to offload and their targets, with hysteresis,
//!    a minimum interval between plans, a cap on moves and a cost per move.
//! 5. [`shadow::ShadowTrial`] tries a peer out on a small fraction of new connections and ramps
//!    the fraction up only while the peer's latency is not significantly worse (Mann–Whitney U).
//! 6. [`lease::Leases`] holds the lease of every connection offloaded to this node.
//! 7. [`class`] sorts connections into size classes with a resource allocation each, and keeps
//!    per-connection segment statistics.
//!
//! [`node::NodePredictor`] ties 1–4 together as a node runs them, and keeps its decisions.
//!
//! [`sim`] is a deterministic trace-driven simulator of a group of nodes that runs these pieces
//! against synthetic workloads; `flowshift-bench sim` prints and plots its results.

pub mod class;
pub mod config;
pub mod detect;
pub mod forecast;
pub mod lease;
pub mod node;
pub mod plan;
pub mod profile;
pub mod shadow;
pub mod sim;

pub use config::{ConfigError, PredictConfig};

use smoltcp::time::Duration;

/// A connection, as the caller names it (the flow table's id).
pub type ConnId = u64;

/// A node of the lease group (the nodes that share a service address and a tunnel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// The app's priority class of a connection: how much a move's freeze would hurt it.
///
/// The planner moves `Background` connections first and `Interactive` ones last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Bulk transfers, batch clients: a 40 ms freeze goes unnoticed.
    Background,
    /// Latency-sensitive request/response traffic.
    Interactive,
    /// Everything else.
    #[default]
    Normal,
}

impl Priority {
    /// Order in which the planner considers classes: lower moves first.
    pub(crate) fn move_rank(self) -> u8 {
        match self {
            Priority::Background => 0,
            Priority::Normal => 1,
            Priority::Interactive => 2,
        }
    }
}

/// A duration in seconds, as `f64`.
pub(crate) fn secs(d: Duration) -> f64 {
    d.total_micros() as f64 / 1e6
}
