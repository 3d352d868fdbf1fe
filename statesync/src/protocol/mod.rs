//! The migration protocol (in progress).

/// Most entries in one message's list.
pub const MAX_BATCH: usize = 4096;
