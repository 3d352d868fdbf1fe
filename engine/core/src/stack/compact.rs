//! Giving an idle connection's memory back.
//!
//! smoltcp cannot shrink a live socket's buffers, and the pages a connection touched while it
//! was busy (its send buffer, the send mirror) stay resident while it idles. So a connection
//! that has been idle for [`COMPACT_AFTER`] with nothing in flight either way is re-homed into
//! a fresh socket with the restore path of live migration: captured in place, restored by the
//! synthetic handshake into new buffers (their pages untouched until used: the daemon has the
//! allocator map buffers this large on their own), its send mirror emptied. The client sees
//! nothing: the translation maps the new socket's numbers onto the ones it knows, as after a
//! move. The app, the handshake record and the counters stay as they are.

use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};

use super::migrate::snapshot_of;
use super::{ServiceConfig, Stack};
use crate::app::{self, AppConfig};
use crate::flow::FlowMode;
use crate::translate::seq_gt;

/// Idle time (nothing moved, nothing received) after which a connection is compacted.
pub const COMPACT_AFTER: Duration = Duration::from_secs(2);

/// A parked socket rejoins the set this long before its keepalive probe is due (the sweep
/// that wakes it runs every second; smoltcp sends the probe from the set).
const WAKE_BEFORE_KEEPALIVE: Duration = Duration::from_secs(2);
/// A socket is parked only if none of our deadlines comes within this.
const PARK_MARGIN: Duration = Duration::from_secs(3);

impl Stack {
    /// True when the local flow in `slot` should be compacted now.
    pub(super) fn compaction_due(&self, now: Instant, slot: usize) -> bool {
        let Some(flow) = self.flows.get(slot) else {
            return false;
        };
        flow.compacted_at != Some(flow.bytes_in + flow.bytes_out())
            && self.compaction_due_but_for_compacted(now, flow)
    }

    /// [`compaction_due`](Self::compaction_due)'s conditions but the first: local, idle for
    /// [`COMPACT_AFTER`] both ways, no close sent, the app quiescent, the socket established
    /// with nothing queued either way.
    fn compaction_due_but_for_compacted(&self, now: Instant, flow: &crate::flow::Flow) -> bool {
        if !matches!(flow.mode, FlowMode::Local)
            || now - flow.active_at < COMPACT_AFTER
            || now - flow.last_rx < COMPACT_AFTER
            || flow.close_sent
            || !flow.app.is_quiescent()
            || flow
                .restored
                .is_some_and(|r| seq_gt(r.claimed, flow.snd_nxt))
        {
            return false;
        }
        let socket = flow.socket.get(&self.sockets);
        socket.state() == tcp::State::Established
            && socket.send_queue() == 0
            && socket.recv_queue() == 0
    }

    /// When the parked (or parkable) `flow` must be back in the socket set: before its
    /// keepalive probe is due, and when its idle timeout runs out. `None`: never by itself.
    pub(super) fn wake_at(
        services: &[Option<ServiceConfig>],
        flow: &crate::flow::Flow,
    ) -> Option<Instant> {
        let service = services
            .get(usize::from(flow.key.service.port()))?
            .as_ref()?;
        let keepalive = service
            .keepalive
            .map(|ka| flow.last_rx + ka - WAKE_BEFORE_KEEPALIVE.min(ka));
        let idle = service.idle_timeout.map(|t| flow.active_at + t);
        match (keepalive, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when the local flow in `slot` should be parked now: compacted, still idle with
    /// nothing in flight either way, and none of our deadlines near. Its socket has no timer
    /// running then (no data in flight, no ACK owed, no keepalive due within
    /// [`PARK_MARGIN`]), so leaving it out of the interface's polls changes nothing.
    pub(super) fn park_due(&self, now: Instant, slot: usize) -> bool {
        let Some(flow) = self.flows.get(slot) else {
            return false;
        };
        if flow.socket.is_parked()
            || flow.dirty
            || flow.compacted_at != Some(flow.bytes_in + flow.bytes_out())
            || !self.compaction_due_but_for_compacted(now, flow)
            || Self::wake_at(&self.services, flow).is_some_and(|at| at < now + PARK_MARGIN)
        {
            return false;
        }
        true
    }

    /// Re-homes the idle flow in `slot` into a fresh socket (see the module docs), with the
    /// configured send buffer (a grown one shrinks back). On any failure the flow keeps its
    /// socket, untouched. True if compacted.
    pub(super) fn compact(&mut self, now: Instant, slot: usize) -> bool {
        if !self.resocket(now, slot, self.config.tcp.tx_buffer) {
            return false;
        }
        let Some(flow) = self.flows.get_mut(slot) else {
            return false;
        };
        flow.app.shrink();
        flow.compacted_at = Some(flow.bytes_in + flow.bytes_out());
        self.stats.compacted += 1;
        tracing::trace!(id = flow.id, "idle connection compacted");
        true
    }

    /// Re-homes the local flow in `slot`, which has nothing unacknowledged, into a fresh
    /// socket with a send buffer of `tx` bytes (its receive buffer's size, which sets the
    /// window scale, is kept): captured in place, restored by the synthetic handshake, the
    /// old socket dropped without a packet. The client sees nothing: the translation maps the
    /// new socket's numbers onto the ones it knows. The app, the handshake record and the
    /// counters stay as they are. On any failure the flow keeps its socket, untouched.
    pub(super) fn resocket(&mut self, now: Instant, slot: usize, tx: usize) -> bool {
        Self::set_clock(now);
        let Some(flow) = self.flows.get_mut(slot) else {
            return false;
        };
        // A packet its socket queued in this turn goes out first, in the old numbers.
        if super::grow::tx_holds(&self.tx, flow.key) {
            tracing::debug!(id = flow.id, "not re-homed: a packet of it is queued");
            return false;
        }
        let h = flow.socket.unpark(&mut self.sockets);
        let mut snap = {
            match snapshot_of(flow, self.sockets.get_mut(h)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(id = flow.id, error = %e, "not re-homed");
                    return false;
                }
            }
        };
        if !snap.send_bytes.is_empty() {
            tracing::debug!(id = flow.id, "not re-homed: bytes unacknowledged");
            return false;
        }
        snap.tx_capacity = tx as u32;
        let (key, kind, mss) = (
            flow.key,
            flow.app_kind,
            flow.record.our_syn_ack.and_then(|s| s.mss).unwrap_or(536),
        );
        // The app stays with the flow; the installed flow only lends its new socket.
        let placeholder = (app::new_app(kind, &AppConfig::default()), kind);
        let id = flow.id;
        let fresh = match self.install(now, &snap, key, placeholder, mss) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(id, error = %e, "not re-homed");
                return false;
            }
        };
        let mut fresh_socket = fresh.socket;
        let Some(flow) = self.flows.get_mut(slot) else {
            fresh_socket.take(&mut self.sockets);
            return false;
        };
        let mut old = std::mem::replace(&mut flow.socket, fresh_socket);
        old.take(&mut self.sockets);
        // The capture formulas hold with the counters kept: the bases move instead.
        flow.mirror = flow.mirror.emptied_to(tx);
        flow.buffers.1 = tx;
        flow.send_base = snap.snd_una.wrapping_sub(flow.mirror.total() as u32);
        flow.recv_base = snap
            .rcv_nxt
            .wrapping_sub(snap.unread.len() as u32)
            .wrapping_sub(flow.bytes_in as u32);
        flow.snd_nxt = fresh.snd_nxt;
        // A fresh start: a grown flow shrunk back when idle may earn its growth again.
        flow.growth = crate::flow::Growth::default();
        flow.xlate = fresh.xlate;
        flow.wire_isn = None;
        if let Some(r) = &mut flow.restored {
            r.claimed = snap.snd_nxt.wrapping_sub(fresh.xlate.seq_off);
        }
        true
    }
}
