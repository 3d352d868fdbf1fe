//! Connection snapshots and the migration protocol between flowshift nodes: a sans-IO core.
//!
//! (Crate documentation is completed with the protocol module.)

#![forbid(unsafe_code)]

mod codec;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod snapshot;
pub mod time;

pub use envelope::{Envelope, EnvelopeError, EnvelopeKind, EnvelopeRepr};
pub use snapshot::{
    AppState, ConnSnapshot, Ingress, InvalidSnapshot, SNAPSHOT_VERSION, SnapshotError, TcpState,
    Timestamps,
};
pub use time::Instant;
