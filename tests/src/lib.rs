//! End-to-end tests of flowshift with real clients (curl, socat, wrk, kernel sockets) in
//! network namespaces; the tests are in `tests/`. They need root and fail, never skip, without
//! it. The testbed they use is the `flowshift-testbed` crate, re-exported here.

pub use flowshift_testbed::*;
