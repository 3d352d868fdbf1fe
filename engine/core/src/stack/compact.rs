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

use super::Stack;
use super::migrate::snapshot_of;
use crate::app::{self, AppConfig};
use crate::flow::FlowMode;
use crate::translate::seq_gt;

/// Idle time (nothing moved, nothing received) after which a connection is compacted.
pub const COMPACT_AFTER: Duration = Duration::from_secs(2);

impl Stack {
    /// True when the local flow in `slot` should be compacted now.
    pub(super) fn compaction_due(&self, now: Instant, slot: usize) -> bool {
        let Some(flow) = self.flows.get(slot) else {
            return false;
        };
        if !matches!(flow.mode, FlowMode::Local)
            || flow.compacted_at == Some(flow.bytes_in + flow.bytes_out())
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
        let socket = self.sockets.get::<tcp::Socket>(flow.handle);
        socket.state() == tcp::State::Established
            && socket.send_queue() == 0
            && socket.recv_queue() == 0
    }

    /// Re-homes the idle flow in `slot` into a fresh socket (see the module docs). On any
    /// failure the flow keeps its socket, untouched. True if compacted.
    pub(super) fn compact(&mut self, now: Instant, slot: usize) -> bool {
        Self::set_clock(now);
        let Some(flow) = self.flows.get(slot) else {
            return false;
        };
        let snap = {
            let socket = self.sockets.get_mut::<tcp::Socket>(flow.handle);
            match snapshot_of(flow, socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(id = flow.id, error = %e, "not compacted");
                    return false;
                }
            }
        };
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
                tracing::debug!(id, error = %e, "not compacted");
                return false;
            }
        };
        let Some(flow) = self.flows.get_mut(slot) else {
            self.sockets.remove(fresh.handle);
            return false;
        };
        let old = std::mem::replace(&mut flow.handle, fresh.handle);
        self.sockets.remove(old);
        // The capture formulas hold with the counters kept: the bases move instead.
        flow.mirror = flow.mirror.emptied();
        flow.send_base = snap.snd_una.wrapping_sub(flow.mirror.total() as u32);
        flow.recv_base = snap.rcv_nxt.wrapping_sub(flow.bytes_in as u32);
        flow.snd_nxt = fresh.snd_nxt;
        flow.xlate = fresh.xlate;
        flow.wire_isn = None;
        if let Some(r) = &mut flow.restored {
            r.claimed = snap.snd_nxt.wrapping_sub(fresh.xlate.seq_off);
        }
        flow.app.shrink();
        flow.compacted_at = Some(flow.bytes_in + flow.bytes_out());
        self.stats.compacted += 1;
        tracing::trace!(id = flow.id, "idle connection compacted");
        true
    }
}
