//! Growing the send buffer of a download it limits.
//!
//! smoltcp sends no more than its send buffer holds, so one buffer per round trip is the most
//! a download can have in flight; every buffer's worth the client acknowledges costs the
//! worker a turn (the app refills the ring, smoltcp builds the next segments). A larger
//! buffer for every connection would cost memory for every slow one; the kernel grows a
//! socket's send buffer with its congestion window instead. smoltcp cannot resize a live
//! socket's buffers, so a flow the buffer limits is re-homed into a socket with
//! `tcp.tx_buffer_max` bytes, as compaction re-homes an idle one (`stack/compact.rs`).
//!
//! **When.** At each service of its app, a flow is *limited by its send buffer* when the app
//! left the ring full at its previous service (the app had more to send than the ring took)
//! and smoltcp has since sent every byte written (neither the client's window nor the
//! congestion window held any back: the ring was all in flight). A flow whose app writes
//! [`GROW_AFTER_BUFFERS`] buffers' worth at such services — with no whole buffer's worth
//! between them written while not so limited (a client that read late for a moment does not
//! start the count again; one whose window holds the flow does) — grows, if the stack's growth budget
//! (`tcp.tx_grow_budget`, shared by its connections) has room for it. An app slower than the
//! network, a client's small window, a rate-limited class (its pacer) or a closing
//! connection never lets it grow.
//!
//! **How.** The capture needs nothing unacknowledged (the restore path would send those bytes
//! again), so the app is held, as for a move's quiesce, until the client has acknowledged
//! every byte — about one round trip — and the flow is re-homed then. Two things more must
//! be gone first: client data smoltcp holds out of order (the capture takes in-order data
//! only, and the client saw it acknowledged selectively), and a reply the old socket queued
//! in this turn (it must leave in the old socket's numbers; the re-home waits a turn). A
//! drain that takes longer than [`DRAIN_RTTS`] smoothed round trips (within
//! [`DRAIN_MIN`]..[`DRAIN_MAX`]; a timer, so a silent client cannot hold it), or whose
//! connection leaves ESTABLISHED, is abandoned: the app is served again and the flow does
//! not grow until it has been compacted. A flow frozen for a move ends its drain; a frozen
//! flow's growth still counts in the budget (a move given up thaws it as it was). A grown
//! flow that moves keeps its buffer: the target counts it, past its own budget if need be
//! (a move is never refused for it). The new socket starts its congestion window afresh
//! (slow start, a few round trips). A grown flow that goes idle is compacted back to
//! `tcp.tx_buffer`, which returns its growth to the budget; it may grow again.

use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};

use super::Stack;
use crate::config::TcpConfig;
use crate::flow::{Flow, Growth};
use crate::translate::seq_gt;

/// Buffers' worth of bytes a flow sends while its send buffer limits it before it grows.
pub const GROW_AFTER_BUFFERS: u64 = 4;
/// A drain before growing may take this many smoothed round trips.
pub const DRAIN_RTTS: u32 = 4;
/// The least a drain may take before it is abandoned: room for a lost tail's loss probe
/// ([`crate::probe::MIN_PTO`] at the least) and the round trip after it.
pub const DRAIN_MIN: Duration = Duration::from_millis(30);
/// The most a drain may take (and what it may take before a round trip was measured).
pub const DRAIN_MAX: Duration = Duration::from_millis(200);

/// Bytes a flow's growth takes from its stack's budget.
fn extra(tcp: &TcpConfig, flow: &Flow) -> usize {
    let held = flow.buffers.1.saturating_sub(tcp.tx_buffer);
    let reserved = if flow.growth.draining.is_some() {
        tcp.tx_buffer_max.saturating_sub(flow.buffers.1)
    } else {
        0
    };
    held + reserved
}

/// Observes the local flow before its app is served: true when it has been limited by its
/// send buffer for long enough to grow (see the module docs).
fn limited_long_enough(tcp: &TcpConfig, flow: &mut Flow, state: tcp::State) -> bool {
    if flow.buffers.1 >= tcp.tx_buffer_max
        || flow.growth.gave_up
        || flow.pacer.is_some()
        || flow.close_sent
        || state != tcp::State::Established
        || flow
            .restored
            .is_some_and(|r| seq_gt(r.claimed, flow.snd_nxt))
    {
        flow.growth.unwatch();
        return false;
    }
    // The local number after the last byte the app wrote.
    let written_end = flow
        .send_base
        .wrapping_sub(flow.xlate.seq_off)
        .wrapping_add(flow.mirror.total() as u32);
    let all_sent = !seq_gt(written_end, flow.snd_nxt);
    let total = flow.mirror.total();
    let g = &mut flow.growth;
    let wrote = total - g.seen.unwrap_or(total);
    g.seen = Some(total);
    let buffer = flow.buffers.1 as u64;
    if g.ring_full && all_sent {
        g.limited += wrote;
        g.unlimited = 0;
    } else {
        // A moment held back (the client read late, a window update was lost) is not the
        // end of a limited stretch; a whole buffer's worth so is.
        g.unlimited += wrote;
        if g.unlimited >= buffer {
            g.limited = 0;
        }
    }
    g.limited >= GROW_AFTER_BUFFERS * buffer
}

/// True when the transmit queue holds a packet of the flow `key` (made by its socket in this
/// turn, not yet translated).
pub(super) fn tx_holds(tx: &super::TxQueue, key: crate::packet::FlowKey) -> bool {
    tx.bufs[..tx.len]
        .iter()
        .any(|b| crate::packet::outbound(&b[tx.headroom..]).is_some_and(|o| o.key == key))
}

/// How long the drain of `flow` may take.
fn drain_limit(flow: &Flow) -> Duration {
    flow.probe.srtt().map_or(DRAIN_MAX, |rtt| {
        (rtt * DRAIN_RTTS).clamp(DRAIN_MIN, DRAIN_MAX)
    })
}

impl Stack {
    /// Growth bookkeeping at the start of the service of the local flow in `slot`: starts a
    /// drain when the flow has earned its growth, re-homes it when its drain is over, gives
    /// up on a drain that takes too long. False when its app must stay held this turn.
    pub(super) fn growth_turn(&mut self, now: Instant, slot: usize) -> bool {
        let tcp = &self.config.tcp;
        let Some(flow) = self.flows.get_mut(slot) else {
            return false;
        };
        let (state, queued, rcv_nxt) = {
            let socket = flow.socket.get(&self.sockets);
            let rcv_nxt = flow
                .recv_base
                .wrapping_add(flow.bytes_in as u32)
                .wrapping_add(socket.recv_queue() as u32);
            (socket.state(), socket.send_queue(), rcv_nxt)
        };
        let since = match flow.growth.draining {
            Some(since) => since,
            None => {
                if !limited_long_enough(tcp, flow, state) {
                    return true;
                }
                let want = tcp.tx_buffer_max - flow.buffers.1;
                if self.grown + want > tcp.tx_grow_budget {
                    flow.growth.unwatch();
                    // Counted once per connection; it may grow later, when there is room.
                    if !flow.growth.refused {
                        flow.growth.refused = true;
                        self.stats.tx_grow_over_budget += 1;
                        tracing::debug!(
                            id = flow.id,
                            grown = self.grown,
                            budget = tcp.tx_grow_budget,
                            "send buffer limits the connection; growth budget spent, not grown"
                        );
                    }
                    return true;
                }
                self.grown += want;
                flow.growth.draining = Some(now);
                // Served again when the drain's time is up, whatever the client does.
                self.paced.push((now + drain_limit(flow), slot));
                tracing::debug!(
                    id = flow.id,
                    from = flow.buffers.1,
                    to = tcp.tx_buffer_max,
                    "send buffer limits the connection: draining it to grow the buffer"
                );
                now
            }
        };
        let elapsed = now - since;
        let established = state == tcp::State::Established;
        if queued == 0 && established && elapsed < drain_limit(flow) {
            // The capture takes only in-order received data: client data smoltcp may hold
            // out of order waits for the client to fill the hole (it would be lost, and the
            // client, which saw it acknowledged selectively, would wait for its timeout).
            if flow.rx_pending.is_some_and(|end| seq_gt(end, rcv_nxt)) {
                return false;
            }
            // A reply the old socket queued in this turn goes out in its numbers first.
            if tx_holds(&self.tx, flow.key) {
                self.paced.push((now, slot));
                return false;
            }
            return self.grow(now, slot);
        }
        if established && elapsed < drain_limit(flow) {
            return false;
        }
        let want = tcp.tx_buffer_max.saturating_sub(flow.buffers.1);
        self.grown = self.grown.saturating_sub(want);
        flow.growth = Growth {
            gave_up: true,
            ..Growth::default()
        };
        self.stats.tx_grow_abandoned += 1;
        tracing::info!(
            id = flow.id,
            queued,
            waited_ms = elapsed.total_millis(),
            state = %state,
            "send buffer not grown: {}; not tried again",
            if established {
                "the drain before it took too long"
            } else {
                "the connection left ESTABLISHED during the drain"
            }
        );
        true
    }

    /// Ends the drain of the flow in `slot` without growing it (it is frozen for a move):
    /// its reservation returns to the budget; it may earn its growth again.
    pub(super) fn cancel_drain(&mut self, slot: usize) {
        let max = self.config.tcp.tx_buffer_max;
        if let Some(flow) = self.flows.get_mut(slot)
            && flow.growth.draining.take().is_some()
        {
            self.grown = self
                .grown
                .saturating_sub(max.saturating_sub(flow.buffers.1));
            flow.growth.unwatch();
        }
    }

    /// Re-homes the drained flow in `slot` into a socket with the grown send buffer. True
    /// (its app is served again either way).
    fn grow(&mut self, now: Instant, slot: usize) -> bool {
        let to = self.config.tcp.tx_buffer_max;
        let (from, id) = match self.flows.get_mut(slot) {
            Some(flow) => {
                flow.growth.draining = None;
                (flow.buffers.1, flow.id)
            }
            None => return true,
        };
        if self.resocket(now, slot, to) {
            self.stats.tx_grown += 1;
            tracing::debug!(id, from, to, "send buffer grown");
        } else {
            self.grown = self.grown.saturating_sub(to.saturating_sub(from));
            if let Some(flow) = self.flows.get_mut(slot) {
                flow.growth.gave_up = true;
            }
            self.stats.tx_grow_abandoned += 1;
            tracing::info!(
                id,
                "send buffer not grown: the re-home failed; not tried again"
            );
        }
        true
    }

    /// The growth the stack's local flows hold or have reserved (for the sweep, which
    /// recounts it: flows that ended, moved or shrank give theirs back).
    pub(super) fn growth_held(&self, flow: &Flow) -> usize {
        extra(&self.config.tcp, flow)
    }
}
