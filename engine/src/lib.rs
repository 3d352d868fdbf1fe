//! flowshift: a userspace TCP migration engine.
//!
//! A node terminates client TCP connections that arrive on a TUN device in a smoltcp stack, serves
//! them with built-in apps, and keeps, per connection, what it takes to move the connection —
//! sequence state, app state and the bytes in flight — to another node while the client keeps one
//! unbroken connection.
//!
//! Layout: [`packet`] classifies what the TUN device hands over; [`flow`] is the flow table;
//! [`stack`] is the sans-IO per-worker core (smoltcp + flows + apps); [`app`] holds the built-in
//! apps; [`config`] parses the node config; [`node`] is the driver (TUN, threads, control socket).

pub mod app;
pub mod config;
pub mod control;
pub mod flow;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod offload;
pub mod packet;
pub mod stack;
pub mod tunnel;
