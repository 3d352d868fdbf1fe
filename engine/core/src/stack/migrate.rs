//! Moving a flow between stacks: capture on the source, restore on the target, and the
//! packet paths of a moved flow. smoltcp is not modified: see docs/migration.md.
//!
//! # Capture
//! A flow is captured while frozen (its socket out of the socket set: it neither sends nor
//! times out). Everything is derived from smoltcp's public API and what the flow's hook saw,
//! in the client's (wire) sequence space:
//! - `snd_una = send_base + written - send_queue()`, where `send_base` is the wire number of
//!   the first byte the app ever wrote here (our ISN + 1, or a restored flow's `snd_una`);
//!   the bytes from `snd_una` on are the mirror's last `send_queue()` bytes;
//! - `rcv_nxt = recv_base + consumed + recv_queue()` (data only: a received FIN is reported
//!   as `client_fin`, not counted), the unread bytes read with `peek_slice`;
//! - `snd_nxt` from the highest sequence number the hook saw go out.
//!
//! A FIN we sent that is not yet acknowledged (FIN-WAIT-1, CLOSING, LAST-ACK) moves as
//! `our_fin`: the target queues the same FIN after the same bytes. States past that (our FIN
//! acknowledged: FIN-WAIT-2, TIME-WAIT) and before it (the handshake) do not move.
//!
//! # Restore
//! In a scratch interface (so no listener of the live set can take the SYN): a socket with
//! the source's buffer capacities (smoltcp derives its window scale from the receive buffer),
//! a crafted SYN with `seq = rcv_nxt - unread - 1` and the client's options (MSS clamped to
//! what fits the tunnel), its SYN-ACK captured for the new ISN and dropped, the ACK, the
//! unread bytes as data segments and the client's FIN if it had sent one. The socket then
//! joins the live set, the unacknowledged and unsent bytes are written to it, and a
//! [`Translation`] maps its sequence numbers and timestamps onto the client's.

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr,
};

use flowshift_statesync::protocol::ConnOffer;
use flowshift_statesync::snapshot::{
    AppState, ConnSnapshot, Ingress, MAX_SRTT_US, TcpState, Timestamps,
};

use super::{Stack, TurnDevice, TxQueue, tsval_now};
use crate::app::{self, AppConfig, AppError, AppKind};
use crate::flow::{Flow, FlowMode, HandshakeRecord, Remote, Restored, ReturnPath};
use crate::mirror::SendMirror;
use crate::packet::{self, FlowKey, SynOptions};
use crate::stack::forward::ForwardKind;
use crate::translate::Translation;

/// Largest data segment injected into the scratch interface (IPv4 total length is 16 bits).
const RESTORE_CHUNK: usize = 60_000;

/// Why a flow could not be captured. The flow is untouched (still frozen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// No flow has this id here.
    #[error("no connection with id {0:#x}")]
    NoSuchFlow(u64),
    /// Only frozen flows are captured.
    #[error("connection {0:#x} is not frozen")]
    NotFrozen(u64),
    /// Only local flows are offered.
    #[error("connection {0:#x} is frozen or lives on another node")]
    NotLocal(u64),
    /// Its TCP state does not move.
    #[error("connection {id:#x} is in state {state}, which does not move")]
    State {
        /// The flow.
        id: u64,
        /// Its state.
        state: &'static str,
    },
    /// The handshake options were not recorded (never happens for a flow past its handshake).
    #[error("connection {0:#x} has no recorded handshake")]
    Handshake(u64),
    /// The send mirror does not hold the unacknowledged bytes (a bug).
    #[error("connection {0:#x}: unacknowledged bytes not mirrored")]
    Unmirrored(u64),
}

/// Why a snapshot could not be restored. Nothing of it is left behind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// A connection with this 4-tuple exists here already.
    #[error("a connection {0} -> {1} exists already")]
    Duplicate(std::net::SocketAddrV4, std::net::SocketAddrV4),
    /// The service address is not one of this node's.
    #[error("{0} is not a service address of this node")]
    NotOurAddress(std::net::Ipv4Addr),
    /// This node stopped accepting connections.
    #[error("the node is shutting down")]
    Shutdown,
    /// `max_connections` reached.
    #[error("no connection slot left (max_connections)")]
    Capacity,
    /// A buffer capacity above what this node accepts.
    #[error("buffer of {got} bytes above this node's limit of {max}")]
    BufferTooLarge {
        /// The snapshot's capacity.
        got: u32,
        /// The limit.
        max: usize,
    },
    /// The receive buffer would give another window scale than the client was told.
    #[error("window scale {want} advertised, a {rx_capacity}-byte buffer gives {got}")]
    WindowScaleMismatch {
        /// What the client was told.
        want: u8,
        /// What this capacity gives.
        got: u8,
        /// The capacity.
        rx_capacity: u32,
    },
    /// An app this build does not know.
    #[error("unknown app kind {0}")]
    UnknownApp(u8),
    /// An app snapshot version this build does not read.
    #[error("app snapshot version {0} not supported")]
    AppVersion(u8),
    /// The app snapshot did not restore.
    #[error(transparent)]
    App(#[from] AppError),
    /// The synthetic handshake did not bring the socket where it had to be (a bug, or a
    /// snapshot whose numbers contradict each other).
    #[error("synthetic handshake failed: {0}")]
    Handshake(&'static str),
}

/// How a snapshot is restored here.
#[derive(Debug, Clone, Copy)]
pub struct RestoreParams {
    /// Largest MSS the restored socket may use: what fits one tunnel datagram when its
    /// packets cross the tunnel.
    pub mss_clamp: u16,
    /// Where the client's packets enter, when not at this node: replies go back there.
    pub ingress: Option<Remote>,
    /// With `ingress`: send replies straight out of this node's TUN device (direct server
    /// return) once the first forwarded client packet arrives, instead of back through the
    /// ingress node.
    pub direct_return: bool,
    /// Largest socket buffer accepted.
    pub max_buffer: usize,
    /// The node the flow comes from (it forwards the flow's queued packets after the move).
    pub source: Option<crate::flow::PeerRef>,
    /// The tunnel's round-trip time to the ingress node, when there is one: the client's
    /// path here is the snapshot's round trip plus (at most) this, and the restored flow's
    /// loss probes are timed from that sum until they measure their own.
    pub path_rtt: Option<smoltcp::time::Duration>,
}

/// A flow captured for a move.
#[derive(Debug)]
pub struct Captured {
    /// Its state. `ingress.node_key` is left zero: the driver knows node keys.
    pub snapshot: ConnSnapshot,
    /// Where its packets enter, when not here.
    pub ingress: Option<Remote>,
}

/// The interface synthetic handshakes run in.
pub(crate) struct ScratchIface {
    iface: Interface,
    sockets: SocketSet<'static>,
    tx: TxQueue,
    caps: DeviceCapabilities,
}

impl ScratchIface {
    fn new(addresses: &[std::net::Ipv4Addr], seed: u64, now: Instant) -> Self {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 65_535;
        let mut tx = TxQueue::default();
        let mut cfg = IfaceConfig::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let mut dev = TurnDevice {
            rx: None,
            tx: &mut tx,
            caps: &caps,
        };
        let mut iface = Interface::new(cfg, &mut dev, now);
        iface.update_ip_addrs(|a| {
            for addr in addresses.iter().take(super::MAX_SERVICE_ADDRESSES) {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(*addr), 32));
            }
        });
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            tx,
            caps,
        }
    }

    /// Hands `packet` to the interface, then lets it transmit; returns what it sent.
    fn exchange(&mut self, now: Instant, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut dev = TurnDevice {
            rx: Some(packet),
            tx: &mut self.tx,
            caps: &self.caps,
        };
        self.iface
            .poll_ingress_single(now, &mut dev, &mut self.sockets);
        self.iface.poll_egress(now, &mut dev, &mut self.sockets);
        let out = self.tx.bufs[..self.tx.len].to_vec();
        self.tx.clear();
        out
    }
}

fn tcp_state(s: tcp::State) -> Option<TcpState> {
    Some(match s {
        tcp::State::Established => TcpState::Established,
        tcp::State::CloseWait => TcpState::CloseWait,
        tcp::State::FinWait1 => TcpState::FinWait1,
        tcp::State::Closing => TcpState::Closing,
        tcp::State::LastAck => TcpState::LastAck,
        _ => return None,
    })
}

fn state_name(s: tcp::State) -> &'static str {
    match s {
        tcp::State::Closed => "CLOSED",
        tcp::State::Listen => "LISTEN",
        tcp::State::SynSent => "SYN-SENT",
        tcp::State::SynReceived => "SYN-RECEIVED",
        tcp::State::Established => "ESTABLISHED",
        tcp::State::FinWait1 => "FIN-WAIT-1",
        tcp::State::FinWait2 => "FIN-WAIT-2",
        tcp::State::CloseWait => "CLOSE-WAIT",
        tcp::State::Closing => "CLOSING",
        tcp::State::LastAck => "LAST-ACK",
        tcp::State::TimeWait => "TIME-WAIT",
    }
}

/// The window scale smoltcp derives from a receive buffer of `capacity` bytes.
pub fn window_shift(capacity: usize) -> u8 {
    let bits = usize::BITS - capacity.leading_zeros();
    bits.saturating_sub(16).min(14) as u8
}

impl Stack {
    /// What a migration offer says of flow `id` (see [`ConnOffer`]), and where its packets
    /// enter when not here. Only a local flow in a state that moves is offered.
    pub fn offer(&self, id: u64) -> Result<(ConnOffer, Option<Remote>), CaptureError> {
        let flow = self
            .flows
            .get(self.flows.find_id(id).ok_or(CaptureError::NoSuchFlow(id))?)
            .ok_or(CaptureError::NoSuchFlow(id))?;
        if !matches!(flow.mode, FlowMode::Local) {
            return Err(CaptureError::NotLocal(id));
        }
        let socket = flow.socket.get(&self.sockets);
        let state = tcp_state(socket.state()).ok_or(CaptureError::State {
            id,
            state: state_name(socket.state()),
        })?;
        let syn_ack = flow.record.our_syn_ack.ok_or(CaptureError::Handshake(id))?;
        Ok((
            ConnOffer {
                flow: id,
                client: flow.key.client,
                service: flow.key.service,
                app_kind: flow.app_kind.code(),
                app_version: app::SNAPSHOT_VERSION,
                state,
                rx_capacity: flow.buffers.0 as u32,
                tx_capacity: flow.buffers.1 as u32,
                our_wscale: syn_ack.window_scale.unwrap_or(0),
            },
            flow.ingress,
        ))
    }

    /// Freezes flow `id` for a move to `to` (see [`Stack::freeze`]): packets `to` sends for
    /// the client before the move commits here are held, not dropped
    /// ([`Stack::handle_from_owner`]).
    pub fn freeze_for_move(
        &mut self,
        now: Instant,
        id: u64,
        to: crate::flow::PeerRef,
    ) -> Result<(), super::FlowError> {
        self.freeze(now, id)?;
        if let Some(flow) = self.flows.find_id(id).and_then(|s| self.flows.get_mut(s))
            && let FlowMode::Frozen { moving_to, .. } = &mut flow.mode
        {
            *moving_to = Some(to);
        }
        Ok(())
    }

    /// Captures the frozen flow `id` for a move. The flow stays frozen; see the module docs.
    pub fn capture(&mut self, id: u64) -> Result<Captured, CaptureError> {
        let slot = self.flows.find_id(id).ok_or(CaptureError::NoSuchFlow(id))?;
        let flow = self
            .flows
            .get_mut(slot)
            .ok_or(CaptureError::NoSuchFlow(id))?;
        let mut mode = std::mem::replace(&mut flow.mode, FlowMode::Local);
        let result = match &mut mode {
            FlowMode::Frozen { socket, .. } => snapshot_of(flow, socket).map(|snapshot| Captured {
                snapshot,
                ingress: flow.ingress,
            }),
            _ => Err(CaptureError::NotFrozen(id)),
        };
        flow.mode = mode;
        result
    }

    /// Restores `snap` here and returns the new flow's id. See the module docs. A flow of the
    /// same 4-tuple that was moved away from this node (its packets enter here) is replaced,
    /// keeping its id: the connection came home.
    pub fn restore(
        &mut self,
        now: Instant,
        snap: &ConnSnapshot,
        params: RestoreParams,
    ) -> Result<u64, RestoreError> {
        Self::set_clock(now);
        if !self.accepting {
            return Err(RestoreError::Shutdown);
        }
        let key = FlowKey {
            client: snap.client,
            service: snap.service,
        };
        if !self.addresses.contains(snap.service.ip()) {
            return Err(RestoreError::NotOurAddress(*snap.service.ip()));
        }
        let home = match self.flows.lookup(&key) {
            None => None,
            Some(slot) => match self.flows.get(slot).map(|f| (&f.mode, f.id)) {
                Some((FlowMode::Moved { to, .. }, id)) => Some((slot, id, *to)),
                _ => return Err(RestoreError::Duplicate(snap.client, snap.service)),
            },
        };
        let kind =
            AppKind::from_code(snap.app.kind).ok_or(RestoreError::UnknownApp(snap.app.kind))?;
        if snap.app.version != app::SNAPSHOT_VERSION {
            return Err(RestoreError::AppVersion(snap.app.version));
        }
        let (rx, tx) = (snap.rx_capacity as usize, snap.tx_capacity as usize);
        for cap in [snap.rx_capacity, snap.tx_capacity] {
            if cap as usize > params.max_buffer || cap == 0 {
                return Err(RestoreError::BufferTooLarge {
                    got: cap,
                    max: params.max_buffer,
                });
            }
        }
        if snap.client_wscale.is_some() && window_shift(rx) != snap.our_wscale {
            return Err(RestoreError::WindowScaleMismatch {
                want: snap.our_wscale,
                got: window_shift(rx),
                rx_capacity: snap.rx_capacity,
            });
        }
        if snap.send_bytes.len() > tx || snap.unread.len() > rx {
            return Err(RestoreError::Handshake("more bytes than the buffers hold"));
        }
        let app = app::restore(kind, &snap.app.bytes)?;
        if !self.budget.try_acquire_existing(*snap.client.ip()) {
            return Err(RestoreError::Capacity);
        }
        let flow = match self.install(now, snap, key, (app, kind), params.mss_clamp) {
            Ok(flow) => flow,
            Err(e) => {
                self.budget.release(*snap.client.ip());
                return Err(e);
            }
        };
        let id = match home {
            Some((_, id, _)) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                id
            }
        };
        let flow = Flow {
            id,
            restored: Some(Restored {
                claimed: snap.snd_nxt.wrapping_sub(flow.xlate.seq_off),
                home_from: home.map(|(_, _, to)| to),
                source: params.source,
            }),
            probe: {
                let mut probe = flow.probe;
                if let Some(srtt) = probe.srtt()
                    && params.ingress.is_some()
                {
                    probe.seed_srtt(srtt + params.path_rtt.unwrap_or_default());
                }
                probe
            },
            ingress: params.ingress,
            return_path: if params.direct_return && params.ingress.is_some() {
                ReturnPath::DirectPending
            } else {
                ReturnPath::Relay
            },
            ..flow
        };
        let (seq_off, ts_off) = (flow.xlate.seq_off, flow.xlate.ts_off);
        let slot = match home {
            Some((slot, _, _)) => {
                if let Some(f) = self.flows.get_mut(slot) {
                    *f = flow;
                }
                slot
            }
            None => self.flows.insert(flow),
        };
        self.dirty.push(slot);
        self.stats.conns_restored += 1;
        tracing::debug!(
            id,
            client = %snap.client,
            state = ?snap.state,
            send = snap.send_bytes.len(),
            unread = snap.unread.len(),
            seq_off,
            ts_off,
            home = home.is_some(),
            "restored"
        );
        Ok(id)
    }

    /// Builds the connection `snap` describes: a socket brought to its state by the
    /// synthetic handshake, holding its unread and unsent bytes (and our FIN), in the live
    /// socket set, and a flow (id 0, not in the table) whose translation maps the socket's
    /// numbers onto the client's. The caller holds a connection slot for it.
    pub(super) fn install(
        &mut self,
        now: Instant,
        snap: &ConnSnapshot,
        key: FlowKey,
        app: (Box<dyn crate::app::App>, AppKind),
        mss_clamp: u16,
    ) -> Result<Flow, RestoreError> {
        let (rx, tx) = (snap.rx_capacity as usize, snap.tx_capacity as usize);
        let (mut socket, isn) = self.handshake(now, snap, &key, mss_clamp, rx, tx)?;
        let mut mirror = SendMirror::new(tx);
        if !snap.send_bytes.is_empty() {
            let n = socket.send_slice(&snap.send_bytes).unwrap_or(0);
            if n != snap.send_bytes.len() {
                return Err(RestoreError::Handshake("send buffer refused the bytes"));
            }
            mirror.push(&snap.send_bytes);
        }
        if snap.our_fin {
            socket.close();
        }
        let local_una = isn.wrapping_add(1);
        let seq_off = snap.snd_una.wrapping_sub(local_una);
        let ts_off = snap.timestamps.map_or(0, |t| {
            // Ours must never go below the last TSval the client saw (PAWS).
            t.our_tsval.wrapping_sub(tsval_now()).wrapping_add(1)
        });
        let data_start = snap.rcv_nxt.wrapping_sub(snap.unread.len() as u32);
        let handle = self.sockets.add(socket);
        Ok(Flow {
            record: HandshakeRecord {
                client_syn: Some(SynOptions {
                    isn: data_start.wrapping_sub(1),
                    mss: Some(snap.client_mss),
                    window_scale: snap.client_wscale,
                    sack_permitted: snap.sack_permitted,
                    timestamp: snap.timestamps.map(|t| (t.ts_recent, 0)),
                    window: snap.client_window,
                }),
                our_syn_ack: Some(SynOptions {
                    isn: snap.snd_una.wrapping_sub(1),
                    mss: Some(mss_clamp),
                    window_scale: Some(snap.our_wscale),
                    sack_permitted: snap.sack_permitted,
                    timestamp: snap.timestamps.map(|t| (t.our_tsval, t.ts_recent)),
                    window: 0,
                }),
                client_window: snap.client_window,
                client_tsval: snap.timestamps.map(|t| t.ts_recent),
                our_tsval: snap.timestamps.map(|t| t.our_tsval),
            },
            mirror,
            send_base: snap.snd_una,
            recv_base: data_start,
            snd_nxt: local_una,
            xlate: Translation {
                seq_off,
                ts_off,
                rcv_off: 0,
            },
            fin_delivered: snap.app.fin_delivered,
            close_sent: snap.our_fin,
            dirty: true,
            probe: {
                let mut probe = crate::probe::LossProbe::default();
                if let Some(us) = snap.srtt_us {
                    probe.seed_srtt(smoltcp::time::Duration::from_micros(u64::from(us)));
                }
                probe
            },
            ..Flow::new(0, key, handle, app, (rx, tx), now)
        })
    }

    /// The synthetic handshake: returns the socket, established (or CLOSE-WAIT) with the
    /// unread bytes in its receive buffer, and its ISN.
    fn handshake(
        &mut self,
        now: Instant,
        snap: &ConnSnapshot,
        key: &FlowKey,
        mss_clamp: u16,
        rx: usize,
        tx: usize,
    ) -> Result<(tcp::Socket<'static>, u32), RestoreError> {
        let mut socket = self.new_socket(key.service.port(), rx, tx);
        let seed = self.config.seed ^ 0x5eed_0f2e_570e;
        let addresses = &self.addresses;
        let scratch = self
            .restore_iface
            .get_or_insert_with(|| ScratchIface::new(addresses, seed, now));
        let local = (IpAddress::Ipv4(*key.service.ip()), key.service.port());
        socket
            .listen(local)
            .map_err(|_| RestoreError::Handshake("listen"))?;
        let handle: SocketHandle = scratch.sockets.add(socket);
        let result = run_handshake(scratch, handle, now, snap, key, mss_clamp);
        let smoltcp::socket::Socket::Tcp(socket) = scratch.sockets.remove(handle);
        result.map(|isn| (socket, isn))
    }

    /// Moves the frozen flow `id` to `to` after the target committed: where the client's
    /// packets enter here, the flow becomes [`FlowMode::Moved`] and forwards them; otherwise
    /// (the flow goes back to where its packets enter) it is removed. Either way its queued
    /// packets go to the new owner, and its socket is dropped without a RST. Returns the
    /// packets for the client the target sent before the commit reached this node: the
    /// driver writes them to the TUN device.
    pub fn complete_move(
        &mut self,
        now: Instant,
        id: u64,
        to: Remote,
    ) -> Result<Vec<Vec<u8>>, super::FlowError> {
        let slot = self
            .flows
            .find_id(id)
            .ok_or(super::FlowError::NoSuchFlow(id))?;
        let flow = self
            .flows
            .get_mut(slot)
            .ok_or(super::FlowError::NoSuchFlow(id))?;
        let FlowMode::Frozen {
            socket,
            queue,
            queued_bytes,
            early_replies,
            ..
        } = &mut flow.mode
        else {
            return Err(super::FlowError::WrongMode {
                id,
                mode: flow.mode.as_str(),
            });
        };
        let state = socket.state();
        let queue = std::mem::take(queue);
        self.frozen_bytes = self
            .frozen_bytes
            .saturating_sub(std::mem::take(queued_bytes));
        let early = std::mem::take(early_replies);
        self.stats.relayed_from_owner += early.len() as u64;
        for p in &queue {
            self.forward.push(ForwardKind::ToOwner, to, p, 0);
        }
        self.stats.forwarded_to_owner += queue.len() as u64;
        self.stats.conns_moved_out += 1;
        // Its allocation is the new owner's to give; here it only forwards.
        if flow.pacer.take().is_some() {
            self.allocated = self.allocated.saturating_sub(1);
        }
        if flow.counted {
            self.budget.release(*flow.key.client.ip());
        }
        match flow.ingress {
            // Where its packets enter, or on to a third node: what enters here (or what the
            // ingress node sends here until told of the move) is forwarded to the new owner.
            ingress if ingress.is_none_or(|i| i.peer != to.peer) => {
                let client_fin = matches!(
                    state,
                    tcp::State::CloseWait | tcp::State::Closing | tcp::State::LastAck
                );
                let owner_fin = matches!(
                    state,
                    tcp::State::FinWait1 | tcp::State::Closing | tcp::State::LastAck
                );
                become_moved(flow, to, now, client_fin, owner_fin);
                tracing::debug!(
                    id,
                    peer = to.peer.0,
                    remote = to.flow,
                    ingress = ingress.map(|i| i.peer.0),
                    forwarded = queue.len(),
                    "moved; forwarding"
                );
            }
            // Back to where its packets enter: that node serves it now.
            _ => {
                self.flows.remove(slot);
                tracing::debug!(
                    id,
                    peer = to.peer.0,
                    remote = to.flow,
                    forwarded = queue.len(),
                    "moved back; removed"
                );
            }
        }
        Ok(early)
    }

    /// Drops a flow restored here whose move was called off by its source after the
    /// restore: silently (no RST: the source still serves the client). A flow that had come
    /// home becomes moved again, to where it was.
    pub fn discard(&mut self, now: Instant, id: u64) -> Result<(), super::FlowError> {
        let slot = self
            .flows
            .find_id(id)
            .ok_or(super::FlowError::NoSuchFlow(id))?;
        let flow = self
            .flows
            .get_mut(slot)
            .ok_or(super::FlowError::NoSuchFlow(id))?;
        let Some(restored) = flow.restored else {
            return Err(super::FlowError::WrongMode {
                id,
                mode: "not restored",
            });
        };
        match std::mem::replace(&mut flow.mode, FlowMode::Local) {
            FlowMode::Local => {
                flow.socket.take(&mut self.sockets);
            }
            FlowMode::Frozen { queued_bytes, .. } => {
                self.frozen_bytes = self.frozen_bytes.saturating_sub(queued_bytes);
            }
            m @ FlowMode::Moved { .. } => {
                flow.mode = m;
                return Err(super::FlowError::WrongMode { id, mode: "moved" });
            }
        }
        if flow.counted {
            self.budget.release(*flow.key.client.ip());
        }
        self.half_open -= usize::from(flow.half_open);
        if flow.pacer.take().is_some() {
            self.allocated = self.allocated.saturating_sub(1);
        }
        match restored.home_from {
            Some(to) => become_moved(flow, to, now, false, false),
            None => {
                self.flows.remove(slot);
            }
        }
        self.stats.conns_discarded += 1;
        tracing::debug!(id, "restored connection discarded: its move was called off");
        Ok(())
    }

    /// Peer `peer` restarted and lost its flows: the entries of connections moved to it are
    /// removed (the client's next packet meets no connection and gets a RST, instead of
    /// being forwarded into the void), and connections restored here whose packets entered
    /// there are reset (nothing reaches them any more). Returns how many of each.
    pub fn peer_lost(&mut self, now: Instant, peer: crate::flow::PeerRef) -> (usize, usize) {
        Self::set_clock(now);
        let slots: Vec<usize> = self.flows.slots().collect();
        let (mut moved, mut restored) = (0, 0);
        for slot in slots {
            let Some(flow) = self.flows.get_mut(slot) else {
                continue;
            };
            match &flow.mode {
                FlowMode::Moved { to, .. } if to.peer == peer => {
                    if let Some(f) = self.flows.remove(slot) {
                        self.stats.moved_closed += 1;
                        moved += 1;
                        tracing::debug!(id = f.id, client = %f.key.client, "moved connection lost: its owner restarted");
                    }
                }
                FlowMode::Local if flow.ingress.is_some_and(|r| r.peer == peer) => {
                    flow.socket.get_mut(&mut self.sockets).abort();
                    restored += 1;
                    if !flow.dirty {
                        flow.dirty = true;
                        self.dirty.push(slot);
                    }
                    tracing::debug!(id = flow.id, client = %flow.key.client, "connection reset: the node its packets entered at restarted");
                }
                _ => {}
            }
        }
        (moved, restored)
    }

    /// A client packet for flow `id`, forwarded by `from` where it entered. Refused (and
    /// counted) unless the flow lives here, its packets enter at `from`, and the packet
    /// carries its 4-tuple.
    pub fn handle_forwarded(
        &mut self,
        now: Instant,
        from: crate::flow::PeerRef,
        id: u64,
        packet: &mut [u8],
    ) {
        Self::set_clock(now);
        self.stats.packets_in += 1;
        self.stats.bytes_in += packet.len() as u64;
        let Some(slot) = self.flows.find_id(id) else {
            // The connection ended here (a RST, or both FINs) while its ingress node still
            // forwards: the client's RSTs answering our last segments are expected.
            if packet::classify_with(packet, |_| true, false).is_ok_and(|i| i.flags.rst) {
                self.stats.tunnel_late_resets += 1;
            } else {
                self.refuse_from_tunnel(id, "forwarded packet for no connection here");
            }
            return;
        };
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        let service = *flow.key.service.ip();
        // From where its packets enter; or from the node it was moved from, forwarding what
        // it queued while frozen (and what the ingress node still sends it).
        let ok_peer = flow.ingress.is_some_and(|r| r.peer == from)
            || flow.restored.is_some_and(|r| {
                r.source == Some(from) || r.home_from.is_some_and(|h| h.peer == from)
            });
        let inbound = packet::classify_with(packet, |a| a == service, false);
        match inbound {
            Ok(inbound) if ok_peer && inbound.key == flow.key => {
                if flow.return_path == ReturnPath::DirectPending {
                    // The source forwards: it moved the flow. Replies may go straight out.
                    flow.return_path = ReturnPath::Direct;
                    tracing::debug!(id, "direct return from now on");
                }
                let packet = &mut packet[..inbound.ip_len];
                self.deliver(now, slot, &inbound, packet);
            }
            Ok(_) if !ok_peer => {
                self.refuse_from_tunnel(id, "forwarded packet from a node that is not its ingress")
            }
            Ok(_) => self.refuse_from_tunnel(id, "forwarded packet of another 4-tuple"),
            Err(_) => self.refuse_from_tunnel(id, "forwarded packet malformed"),
        }
    }

    /// Counts and logs a packet from the tunnel refused: at INFO for the 1st, 2nd, 4th, 8th…
    /// refusal (a flood does not flood the log), at DEBUG for every one.
    fn refuse_from_tunnel(&mut self, id: u64, why: &'static str) {
        self.stats.tunnel_packets_refused += 1;
        let refused = self.stats.tunnel_packets_refused;
        if refused.is_power_of_two() {
            tracing::info!(id, why, refused, "packet from the tunnel refused");
        } else {
            tracing::debug!(id, why, refused, "packet from the tunnel refused");
        }
    }

    /// The owner of moved flow `id` (at `from`) moved it on to `to`, a third node: packets
    /// entering here go straight there from now on. Returns the packets for the client `to`
    /// sent before this node knew: the driver writes them to the TUN device. Only the
    /// current owner may say so; held packets from other nodes are dropped.
    pub fn rehome(
        &mut self,
        now: Instant,
        id: u64,
        from: crate::flow::PeerRef,
        to: Remote,
    ) -> Result<Vec<Vec<u8>>, super::FlowError> {
        let flow = self
            .flows
            .find_id(id)
            .and_then(|slot| self.flows.get_mut(slot))
            .ok_or(super::FlowError::NoSuchFlow(id))?;
        let FlowMode::Moved {
            to: owner,
            last_packet,
            successor_replies,
            ..
        } = &mut flow.mode
        else {
            return Err(super::FlowError::WrongMode {
                id,
                mode: flow.mode.as_str(),
            });
        };
        if owner.peer != from || flow.ingress.is_some() {
            return Err(super::FlowError::WrongMode {
                id,
                mode: "moved, to another node than the sender",
            });
        }
        let previous = *owner;
        *owner = to;
        *last_packet = now;
        let held = std::mem::take(successor_replies);
        let dropped = held.iter().filter(|(p, _)| *p != to.peer).count();
        let replies: Vec<Vec<u8>> = held
            .into_iter()
            .filter(|(p, _)| *p == to.peer)
            .map(|(_, packet)| packet)
            .collect();
        self.stats.relayed_from_owner += replies.len() as u64;
        self.stats.packets_out += replies.len() as u64;
        self.stats.bytes_out += replies.iter().map(|p| p.len() as u64).sum::<u64>();
        self.stats.tunnel_packets_refused += dropped as u64;
        tracing::debug!(
            id,
            from = previous.peer.0,
            peer = to.peer.0,
            remote = to.flow,
            held = replies.len(),
            dropped,
            "moved on: forwarding to the new owner"
        );
        Ok(replies)
    }

    /// A packet the owner of moved flow `id` (at `from`) sends to the client; true if the
    /// driver should write it to the TUN device. It must belong to the flow and come from
    /// its owner. FIN and RST are noted, so the entry goes once the connection ended.
    pub fn handle_from_owner(
        &mut self,
        now: Instant,
        from: crate::flow::PeerRef,
        id: u64,
        packet: &[u8],
    ) -> bool {
        let Some(slot) = self.flows.find_id(id) else {
            // The entry ended here (RST, or both FINs and the linger) while the owner sends:
            // its RSTs are expected, as above.
            if packet::outbound(packet).is_some_and(|o| o.flags.rst) {
                self.stats.tunnel_late_resets += 1;
            } else {
                self.refuse_from_tunnel(id, "reply for no connection here");
            }
            return false;
        };
        let Some(flow) = self.flows.get_mut(slot) else {
            return false;
        };
        if let FlowMode::Frozen {
            moving_to: Some(target),
            early_replies,
            ..
        } = &mut flow.mode
        {
            // The target restored the flow and sends; this node has not seen the commit yet.
            let ok = *target == from
                && packet::outbound(packet).is_some_and(|o| o.key == flow.key)
                && early_replies.len() < crate::flow::EARLY_REPLIES;
            if ok {
                early_replies.push(packet.to_vec());
            } else {
                self.refuse_from_tunnel(id, "early reply: wrong node, 4-tuple, or too many");
            }
            return false;
        }
        let FlowMode::Moved {
            to,
            client_fin,
            owner_fin,
            ended,
            last_packet,
            successor_replies,
        } = &mut flow.mode
        else {
            self.refuse_from_tunnel(id, "reply for a connection served here");
            return false;
        };
        match packet::outbound(packet) {
            // Another node sends for the flow: the owner may have moved it on there without
            // this node knowing yet. Held until the owner says so (bounded), dropped if not.
            Some(out)
                if to.peer != from
                    && out.key == flow.key
                    && flow.ingress.is_none()
                    && successor_replies.len() < crate::flow::EARLY_REPLIES =>
            {
                successor_replies.push((from, packet.to_vec()));
                false
            }
            Some(out) if to.peer == from && out.key == flow.key => {
                *last_packet = now;
                *owner_fin |= out.flags.fin;
                if ended.is_none() && (out.flags.rst || *client_fin && *owner_fin) {
                    *ended = Some(now);
                }
                self.stats.relayed_from_owner += 1;
                self.stats.packets_out += 1;
                self.stats.bytes_out += packet.len() as u64;
                true
            }
            _ => {
                self.refuse_from_tunnel(
                    id,
                    "reply from a node that is not the owner, or malformed",
                );
                false
            }
        }
    }
}

/// Turns `flow` into an entry that forwards to `to`: no socket, no slot, no app state.
fn become_moved(flow: &mut Flow, to: Remote, now: Instant, client_fin: bool, owner_fin: bool) {
    flow.mode = FlowMode::Moved {
        to,
        client_fin,
        owner_fin,
        ended: None,
        last_packet: now,
        successor_replies: Vec::new(),
    };
    flow.counted = false;
    flow.restored = None;
    flow.app = app::new_app(flow.app_kind, &AppConfig::default());
    flow.mirror = SendMirror::new(0);
}

/// SYN, SYN-ACK, ACK, unread data and FIN, in `scratch`. Returns the socket's ISN.
/// The snapshot of `flow` served by `socket` (out of the socket set), in wire numbers: see the
/// module docs. Nothing is changed.
pub(super) fn snapshot_of(
    flow: &Flow,
    socket: &mut tcp::Socket<'static>,
) -> Result<ConnSnapshot, CaptureError> {
    let state = tcp_state(socket.state()).ok_or(CaptureError::State {
        id: flow.id,
        state: state_name(socket.state()),
    })?;
    let (Some(syn), Some(syn_ack)) = (flow.record.client_syn, flow.record.our_syn_ack) else {
        return Err(CaptureError::Handshake(flow.id));
    };
    let queued = socket.send_queue();
    let mut send_bytes = Vec::with_capacity(queued);
    flow.mirror
        .copy_last(queued, &mut send_bytes)
        .ok_or(CaptureError::Unmirrored(flow.id))?;
    let acked = flow.mirror.total() - queued as u64;
    let snd_una = flow.send_base.wrapping_add(acked as u32);
    let our_fin = matches!(
        state,
        TcpState::FinWait1 | TcpState::Closing | TcpState::LastAck
    );
    let client_fin = matches!(
        state,
        TcpState::CloseWait | TcpState::Closing | TcpState::LastAck
    );
    // What the client may have been sent: the highest number seen going out, or what a
    // previous owner had sent, whichever is further, within what the bytes allow.
    let seq_off = flow.xlate.seq_off;
    let mut snd_nxt = flow.snd_nxt.wrapping_add(seq_off);
    if let Some(r) = flow.restored {
        let claimed = r.claimed.wrapping_add(seq_off);
        if crate::translate::seq_gt(claimed, snd_nxt) {
            snd_nxt = claimed;
        }
    }
    let max = snd_una
        .wrapping_add(send_bytes.len() as u32)
        .wrapping_add(u32::from(our_fin));
    if crate::translate::seq_gt(snd_una, snd_nxt) {
        snd_nxt = snd_una;
    } else if crate::translate::seq_gt(snd_nxt, max) {
        snd_nxt = max;
    }
    let mut unread = vec![0u8; socket.recv_queue()];
    let n = socket.peek_slice(&mut unread).unwrap_or(0);
    if n != unread.len() {
        // `peek_slice` reads the whole ring; a short read would be a smoltcp change.
        return Err(CaptureError::Handshake(flow.id));
    }
    let rcv_nxt = flow
        .recv_base
        .wrapping_add(flow.bytes_in as u32)
        .wrapping_add(unread.len() as u32);
    let timestamps = match (syn.timestamp, syn_ack.timestamp) {
        (Some((client_ts, _)), Some((our_ts, _))) => Some(Timestamps {
            ts_recent: flow.record.client_tsval.unwrap_or(client_ts),
            our_tsval: flow.record.our_tsval.unwrap_or(our_ts),
        }),
        _ => None,
    };
    let snapshot = ConnSnapshot {
        client: flow.key.client,
        service: flow.key.service,
        state,
        snd_una,
        snd_nxt,
        rcv_nxt,
        client_fin,
        our_fin,
        client_window: flow.record.client_window,
        client_wscale: syn.window_scale,
        our_wscale: syn_ack.window_scale.unwrap_or(0),
        rx_capacity: flow.buffers.0 as u32,
        tx_capacity: flow.buffers.1 as u32,
        client_mss: syn.mss.unwrap_or(536),
        sack_permitted: syn.sack_permitted,
        timestamps,
        send_bytes,
        unread,
        app: AppState {
            kind: flow.app_kind.code(),
            version: app::SNAPSHOT_VERSION,
            bytes: flow.app.snapshot(),
            fin_delivered: flow.fin_delivered,
        },
        ingress: Ingress {
            node_key: [0; 32],
            flow_id: flow.ingress.map_or(flow.id, |r| r.flow),
        },
        srtt_us: flow
            .probe
            .srtt()
            .map(|d| u32::try_from(d.total_micros()).map_or(MAX_SRTT_US, |us| us.min(MAX_SRTT_US))),
    };
    Ok(snapshot)
}

fn run_handshake(
    scratch: &mut ScratchIface,
    handle: SocketHandle,
    now: Instant,
    snap: &ConnSnapshot,
    key: &FlowKey,
    mss_clamp: u16,
) -> Result<u32, RestoreError> {
    let data_start = snap.rcv_nxt.wrapping_sub(snap.unread.len() as u32);
    let (client, service) = (*key.client.ip(), *key.service.ip());
    let seg = |control, seq: u32, ack: Option<u32>, tsecr: u32, payload: &[u8]| {
        let repr = TcpRepr {
            src_port: key.client.port(),
            dst_port: key.service.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: snap.client_window,
            window_scale: if control == TcpControl::Syn {
                snap.client_wscale
            } else {
                None
            },
            max_seg_size: (control == TcpControl::Syn).then_some(snap.client_mss.min(mss_clamp)),
            sack_permitted: control == TcpControl::Syn && snap.sack_permitted,
            sack_ranges: [None; 3],
            timestamp: snap.timestamps.map(|t| TcpTimestampRepr {
                tsval: t.ts_recent,
                tsecr,
            }),
            payload,
        };
        packet::emit_ipv4_tcp(client, service, &repr)
    };
    let out = scratch.exchange(
        now,
        &seg(TcpControl::Syn, data_start.wrapping_sub(1), None, 0, &[]),
    );
    let syn_ack = out
        .iter()
        .filter_map(|p| packet::outbound(p))
        .find(|o| o.flags.syn && o.flags.ack && o.key == *key)
        .ok_or(RestoreError::Handshake("no SYN-ACK"))?;
    let isn = syn_ack.seq;
    let ack = Some(isn.wrapping_add(1));
    let tsecr = syn_ack.tsval.unwrap_or(0);
    scratch.exchange(now, &seg(TcpControl::None, data_start, ack, tsecr, &[]));
    let state = |s: &SocketSet<'static>| s.get::<tcp::Socket>(handle).state();
    if state(&scratch.sockets) != tcp::State::Established {
        return Err(RestoreError::Handshake("not established after the ACK"));
    }
    let mut seq = data_start;
    for chunk in snap.unread.chunks(RESTORE_CHUNK) {
        scratch.exchange(now, &seg(TcpControl::Psh, seq, ack, tsecr, chunk));
        seq = seq.wrapping_add(chunk.len() as u32);
    }
    if scratch.sockets.get::<tcp::Socket>(handle).recv_queue() != snap.unread.len() {
        return Err(RestoreError::Handshake("unread bytes not taken"));
    }
    if snap.client_fin {
        scratch.exchange(now, &seg(TcpControl::Fin, seq, ack, tsecr, &[]));
        if state(&scratch.sockets) != tcp::State::CloseWait {
            return Err(RestoreError::Handshake("client FIN not taken"));
        }
    }
    Ok(isn)
}
