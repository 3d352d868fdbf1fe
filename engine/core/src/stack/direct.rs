//! Direct receive: the app takes an in-order payload straight from the packet.
//!
//! smoltcp copies every payload it accepts into the socket's receive ring, and the app then
//! reads it from there: two passes over every received byte, where the kernel makes one. For
//! a segment that is exactly the next one the socket expects, arriving while its ring is
//! empty, the worker instead offers the payload to the app where it lies in the TUN read
//! buffer, and hands smoltcp only what the app left plus the last `mss + 1` bytes (always
//! kept back: see below), with the packet's headers moved forward over the bytes taken. The
//! client's sequence numbers then run ahead of the socket's by those bytes: the flow's
//! [`Translation::rcv_off`](crate::translate::Translation) grows by them, and the translation
//! layer subtracts it from inbound sequence numbers and adds it to outbound acknowledgement
//! numbers and SACK blocks. `recv_base + bytes_in + recv_queue()` stays the client's
//! `rcv_nxt` in wire numbers (the bytes taken count in `bytes_in`), so capture, compaction,
//! TIME-WAIT records and loss probes read the same formula as before.
//!
//! Why `mss + 1` bytes stay with smoltcp: it acknowledges what it receives, and acknowledges
//! at once when more than one of the client's MSS arrived since its last ACK (else after its
//! ACK delay). Fed only the bytes it keeps, it keeps the ACK clock it has for whole segments:
//! every second merged segment is acknowledged at once. Those bytes go through the ring as
//! before — about 2 % of a 64 KB merged segment.
//!
//! Only when nothing can go wrong: the flow is served here (not quiescing, not paced, its
//! accept seen by serving: it may be held there for a shadow trial); the
//! socket is ESTABLISHED, its ring empty once the app has taken what it holds (the bytes kept
//! back from the packet before, when a read brings several of the flow's packets at once),
//! and it holds no data beyond `rcv_nxt` (data that arrived out of order sits in smoltcp's
//! ring at offsets from its own `rcv_nxt`, which the offset would shift: [`Flow::rx_pending`]
//! records how far the client's data may reach there); the segment is no SYN or RST, ends
//! within the window we advertised ([`Flow::rx_edge`]; see [`cut_to_window`]) and
//! acknowledges nothing we have not sent. Anything else goes to smoltcp whole.

use smoltcp::iface::SocketSet;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use super::StackStats;
use crate::flow::Flow;
use crate::packet::{Inbound, Outbound};
use crate::translate::seq_gt;

/// The client's MSS when its SYN named none (smoltcp then assumes 536: more is safe).
const DEFAULT_MSS: usize = 1460;

/// Offers the payload of `packet` (an inbound segment of `flow`, already translated to the
/// socket's numbers, `inbound` its classification in wire numbers) to the app. Returns how
/// many bytes at the front of `packet` to skip: 0 when nothing was taken, else the bytes the
/// app took, over which the headers were moved (the rest is the segment smoltcp is to get).
pub(super) fn take(
    flow: &mut Flow,
    sockets: &mut SocketSet<'static>,
    stats: &mut StackStats,
    inbound: &Inbound,
    packet: &mut [u8],
    work_passes: u32,
    now: Instant,
) -> usize {
    let keep = flow
        .record
        .client_syn
        .and_then(|s| s.mss)
        .map_or(DEFAULT_MSS, usize::from)
        .max(DEFAULT_MSS)
        + 1;
    if inbound.payload_len < 4 * keep
        || packet.len() < inbound.ip_len
        || inbound.flags.syn
        || inbound.flags.rst
        || !inbound.flags.ack
        || flow.app_held()
        // Not accepted yet as serving sees it: its app may be held at the accept.
        || flow.half_open
        || flow.pacer.is_some()
    {
        return 0;
    }
    let socket = flow.socket.get_mut(sockets);
    if socket.state() != tcp::State::Established {
        return 0;
    }
    // What smoltcp holds goes to the app first (as serving the flow would, a little later):
    // the bytes kept back from an earlier packet of the same read batch, usually.
    while socket.recv_queue() > 0 {
        let app = &mut flow.app;
        let n = socket.recv(|data| {
            let n = app.handle_recv(data).min(data.len());
            if work_passes > 0 {
                crate::config::emulate_work(work_passes, &data[..n]);
            }
            (n, n)
        });
        match n {
            Ok(n) if n > 0 => super::took(
                (&mut flow.kpi, &mut flow.bytes_in, &mut flow.active_at),
                stats,
                n,
                work_passes,
                now,
            ),
            _ => return 0,
        }
    }
    let rcv_nxt = flow.recv_base.wrapping_add(flow.bytes_in as u32);
    if inbound.seq != rcv_nxt || flow.rx_pending.is_some_and(|end| seq_gt(end, rcv_nxt)) {
        return 0;
    }
    flow.rx_pending = None;
    // Only within the window we advertised: bytes taken move smoltcp's window edge in wire
    // numbers by as many, so what smoltcp would cut must be cut before (`cut_to_window`).
    let end = inbound.seq.wrapping_add(inbound.payload_len as u32);
    if flow.rx_edge.is_none_or(|edge| seq_gt(end, edge)) {
        return 0;
    }
    let header = inbound.ip_len - inbound.payload_len;
    // The acknowledgement number, translated: smoltcp drops a segment (payload and all) that
    // acknowledges data it never sent.
    let Some(ack) = packet.get(ack_at(packet)..ack_at(packet) + 4) else {
        return 0;
    };
    let ack = u32::from_be_bytes([ack[0], ack[1], ack[2], ack[3]]);
    if seq_gt(ack, flow.snd_nxt) {
        return 0;
    }
    let offered = (inbound.payload_len - keep).min(socket.recv_capacity().saturating_sub(keep));
    let payload = &packet[header..header + offered];
    let n = flow.app.handle_recv(payload).min(offered);
    if n == 0 {
        return 0;
    }
    if work_passes > 0 {
        crate::config::emulate_work(work_passes, &payload[..n]);
    }
    super::took(
        (&mut flow.kpi, &mut flow.bytes_in, &mut flow.active_at),
        stats,
        n,
        work_passes,
        now,
    );
    stats.rx_direct_bytes += n as u64;
    flow.xlate.rcv_off = flow.xlate.rcv_off.wrapping_add(n as u32);
    // The segment smoltcp gets: the same headers (its sequence number, in the socket's
    // numbers, is unchanged: the bytes taken moved the offset by as much), then the rest.
    // Its IPv4 checksum is left stale, as the translation leaves the TCP checksum: the
    // stack does not verify checksums on receive (they were verified when classified).
    packet.copy_within(..header, n);
    let total = (inbound.ip_len - n) as u16;
    packet[n + 2..n + 4].copy_from_slice(&total.to_be_bytes());
    n
}

/// After smoltcp took a data segment of `flow` ending at wire sequence number `end`: if its
/// contiguous data stops short of `end`, it may hold the rest out of order (or have dropped
/// it), and direct receive waits until `rcv_nxt` has passed `end`.
pub(super) fn note_segment(flow: &mut Flow, sockets: &SocketSet<'static>, end: u32) {
    let Some(socket) = flow.socket.get_opt(sockets) else {
        return;
    };
    let rcv_nxt = flow
        .recv_base
        .wrapping_add(flow.bytes_in as u32)
        .wrapping_add(socket.recv_queue() as u32);
    if flow.rx_pending.is_some_and(|p| !seq_gt(p, rcv_nxt)) {
        flow.rx_pending = None;
    }
    if !seq_gt(end, rcv_nxt) {
        return;
    }
    // smoltcp keeps what fits its buffer of a segment that reaches beyond it (it trims the
    // segment to its window), and holds nothing further than a buffer beyond `rcv_nxt`.
    let capacity = u32::try_from(socket.recv_capacity()).unwrap_or(u32::MAX);
    let end = if end.wrapping_sub(rcv_nxt) > capacity {
        rcv_nxt.wrapping_add(capacity)
    } else {
        end
    };
    if flow.rx_pending.is_none_or(|p| seq_gt(end, p)) {
        flow.rx_pending = Some(end);
    }
}

/// The right edge (wire numbers) of the receive window an outbound packet of `flow` with local
/// acknowledgement number `ack` advertises: its acknowledgement as the client reads it, plus
/// its window, scaled unless it is a SYN or the handshake agreed no scaling.
pub(super) fn advertised_edge(flow: &Flow, out: &Outbound, ack: u32) -> u32 {
    let shift = match (flow.record.client_syn, flow.record.our_syn_ack) {
        (Some(c), Some(o)) if !out.flags.syn && c.window_scale.is_some() => {
            o.window_scale.unwrap_or(0).min(14)
        }
        _ => 0,
    };
    ack.wrapping_add(flow.xlate.rcv_off)
        .wrapping_add(u32::from(out.window) << shift)
}

/// Cuts the client's segment in `packet` (classified as `inbound`, wire numbers) that reaches
/// beyond the furthest receive window we advertised to the window: its data beyond the edge,
/// and a FIN after such data, are not accepted (RFC 9293, 3.10.7.4), and
/// smoltcp must not see them — it would take them up to its own window, which runs ahead of
/// the advertised one, in wire numbers, by the bytes a direct receive took, and which until
/// its first ACK after the handshake is twice its buffer (its SYN-ACK advertises an unscaled
/// window that its acceptance test scales). Returns the segment's classification after the
/// cut, and whether it was cut.
pub(super) fn cut_to_window(flow: &Flow, inbound: &Inbound, packet: &mut [u8]) -> (Inbound, bool) {
    let Some(edge) = flow.rx_edge else {
        return (*inbound, false);
    };
    let end = inbound.seq.wrapping_add(inbound.payload_len as u32);
    if !seq_gt(end, edge) || packet.len() < inbound.ip_len {
        return (*inbound, false);
    }
    // A segment that starts at the edge goes to smoltcp as it is: it may probe a closed
    // window, which smoltcp answers (with its window) only if it sees the data. One that
    // starts beyond it is never in any window: smoltcp gets its header alone.
    if inbound.seq == edge {
        return (*inbound, false);
    }
    let keep = if seq_gt(edge, inbound.seq) {
        edge.wrapping_sub(inbound.seq) as usize
    } else {
        0
    };
    let header = inbound.ip_len - inbound.payload_len;
    let ip_len = header + keep;
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    packet[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    if let Some(flags) = packet.get_mut(ihl + 13) {
        *flags &= !0x01; // FIN
    }
    let mut cut = *inbound;
    cut.ip_len = ip_len;
    cut.payload_len = keep;
    cut.flags.fin = false;
    (cut, true)
}

/// Offset of the TCP acknowledgement number in an IPv4 packet (its IHL read, not trusted:
/// the caller bounds-checks the read).
fn ack_at(packet: &[u8]) -> usize {
    usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4 + 8
}
