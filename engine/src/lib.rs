//! flowshift: the node daemon of the userspace TCP migration engine.
//!
//! The logic lives in the sans-IO [`flowshift_core`] (TCP, flows, apps) and
//! [`flowshift_tunnel`] (the encrypted tunnel) crates; this crate is their driver: [`node`] runs
//! the TUN device and worker threads, [`tunnel`] the tunnel's UDP socket, [`control`] the control
//! socket, [`metrics`] the Prometheus listener, `predict` renders the
//! predictor (`ctl plan`), [`netlink`] the routes, and [`config`] parses the
//! node's config file.

// `ctl plan`'s reply is one `serde_json::json!` object, deeper than the default limit.
#![recursion_limit = "256"]

pub mod alloc;
pub mod config;
pub mod control;
pub mod cputime;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod offload;
pub(crate) mod predict;
pub mod tunnel;
