//! The flowshift testbed: network namespaces standing in for VMs, real clients, and the
//! end-to-end tests that use them (in `tests/`).
//!
//! Everything here needs root (CAP_NET_ADMIN): without it, [`Testbed::new`] fails with a message
//! saying so, and so do the tests — they never skip silently. The demo and the benchmarks use the
//! same library.

pub mod node;
pub mod oracle;
pub mod testbed;
pub mod tunnel;

pub use node::{NodeConfig, NodeHandle, flowshift_bin};
pub use testbed::{Netns, Node, Testbed, TestbedError, TestbedOptions, ensure_tools, require_root};
