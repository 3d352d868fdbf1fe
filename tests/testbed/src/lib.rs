//! The flowshift testbed: network namespaces standing in for VMs, node processes, and the
//! oracles that verify what crossed them. The end-to-end tests (`flowshift-tests`), the demo
//! and the benchmarks use it.
//!
//! Everything here needs root (CAP_NET_ADMIN): without it, [`Testbed::new`] fails with a message
//! saying so, and so do the tests — they never skip silently.

pub mod kernel_handoff;
pub mod node;
pub mod oracle;
pub mod service;
pub mod tcp_repair;
pub mod testbed;
pub mod tunnel;

pub use node::{NodeConfig, NodeHandle, flowshift_bin};
pub use testbed::{
    Netns, Node, Testbed, TestbedError, TestbedOptions, ensure_tools, require_root, teardown_all,
    teardown_on_signals,
};
