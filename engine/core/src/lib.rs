//! The sans-IO core of flowshift.
//!
//! A node terminates client TCP connections that arrive on a TUN device in a smoltcp stack,
//! serves them with built-in apps, and keeps, per connection, what it takes to move the
//! connection — sequence state, app state and the bytes in flight — to another node while the
//! client keeps one unbroken connection. This crate is that logic, and only that: it opens no
//! device or socket, starts no thread and reads no clock. Every call that depends on time takes
//! `now`; the driver (the `flowshift` daemon crate) does the I/O.
//!
//! Layout: [`packet`] classifies what the TUN device hands over (verifying [`checksum`]s); [`flow`] is the flow table,
//! [`mirror`] the bytes each flow's app wrote; [`stack`] is the per-worker core (smoltcp + flows + apps); [`app`] holds the built-in apps;
//! [`config`] the settings a stack is built from.

#![forbid(unsafe_code)]

pub mod app;
pub mod checksum;
pub mod coalesce;
pub mod config;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod mirror;
pub mod pace;
pub mod packet;
pub mod predict;
pub mod probe;
pub mod secure;
pub mod segment;
pub mod stack;
pub mod timewait;
pub mod translate;
