//! SYN cookies: under a SYN flood, a SYN is answered without keeping anything, and the
//! connection is created from the client's ACK through the restore path (the synthetic
//! handshake and the per-flow translation). The encoding is in [`crate::secure`].
//!
//! Cookies are sent once `syn_cookies_after` handshakes are in progress on this stack, and
//! an ACK of an unknown connection is checked for one only while cookies were sent in the
//! last [`COOKIE_MAX_AGE_MIN`] minutes. A cookie-born connection is an ordinary local flow
//! afterwards: it can be moved, and it keeps its numbers.

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr};

use flowshift_statesync::snapshot::{AppState, ConnSnapshot, Ingress, TcpState, Timestamps};

use super::migrate::window_shift;
use super::{Stack, tsval_now};
use crate::app;
use crate::config::ServiceConfig;
use crate::packet::{self, FlowKey};
use crate::secure::{COOKIE_MAX_AGE_MIN, CookieOptions, ts_encode};

/// IPv4 and TCP headers without options: our MSS is the MTU less these.
const HEADERS: usize = 40;

impl Stack {
    /// True when a SYN for `key` should get a cookie instead of a socket.
    pub(super) fn cookie_due(&self, key: &FlowKey) -> bool {
        self.accepting
            && self
                .config
                .syn_cookies_after
                .is_some_and(|n| self.half_open >= n)
            && self.services[usize::from(key.service.port())].is_some()
    }

    /// Answers the SYN `syn` (already classified as `inbound`) with a cookie SYN-ACK.
    pub(super) fn send_cookie(&mut self, now: Instant, inbound: &packet::Inbound, syn: &[u8]) {
        let Some(opts) = packet::syn_options(syn) else {
            return;
        };
        let key = inbound.key;
        let client_mss = opts.mss.unwrap_or(536);
        let cookie = self
            .secrets
            .cookie(key.client, key.service, opts.isn, client_mss, now);
        let rx = self.config.tcp.rx_buffer;
        // Without timestamps nothing carries the window scale and SACK back: offer neither
        // (as Linux).
        let ts = opts.timestamp;
        let window_scale = ts.and(opts.window_scale);
        let sack = ts.is_some() && opts.sack_permitted;
        let tsval = tsval_now().wrapping_add(self.secrets.ts_offset(key.client, key.service));
        let repr = TcpRepr {
            src_port: key.service.port(),
            dst_port: key.client.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(cookie as i32),
            ack_number: Some(TcpSeqNumber(opts.isn.wrapping_add(1) as i32)),
            window_len: rx.min(usize::from(u16::MAX)) as u16,
            window_scale: window_scale.map(|_| window_shift(rx)),
            max_seg_size: Some(self.config.mtu.saturating_sub(HEADERS).min(65_535) as u16),
            sack_permitted: sack,
            sack_ranges: [None; 3],
            timestamp: ts.map(|(client_tsval, _)| TcpTimestampRepr {
                tsval: ts_encode(tsval, window_scale, sack),
                tsecr: client_tsval,
            }),
            payload: &[],
        };
        let packet = packet::emit_ipv4_tcp(*key.service.ip(), *key.client.ip(), &repr);
        self.tx.push(packet.len(), 0).copy_from_slice(&packet);
        self.last_cookie = Some(now);
        self.stats.syn_cookies_sent += 1;
        if self.stats.syn_cookies_sent.is_power_of_two() {
            tracing::warn!(
                half_open = self.half_open,
                sent = self.stats.syn_cookies_sent,
                "many handshakes in progress (SYN flood?): answering SYNs with cookies"
            );
        }
    }

    /// An ACK (`packet`, classified as `inbound`) for no known connection: if it carries a
    /// valid cookie, the connection is created and its slot returned; the caller delivers
    /// the ACK to it (it may carry data).
    pub(super) fn accept_cookie(
        &mut self,
        now: Instant,
        inbound: &packet::Inbound,
        packet: &[u8],
    ) -> Option<usize> {
        let recent = Duration::from_secs(u64::from(COOKIE_MAX_AGE_MIN) * 60);
        let flags = inbound.flags;
        if !flags.ack || flags.syn || flags.rst || self.last_cookie.is_none_or(|t| now - t > recent)
        {
            return None;
        }
        let key = inbound.key;
        let ServiceConfig {
            app: kind,
            app_config,
            ..
        } = self.services[usize::from(key.service.port())].clone()?;
        let (ack, tsopt) = {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            let ts = tcp.options_summary().ok().and_then(|o| o.timestamp);
            (tcp.ack_number().0 as u32, ts)
        };
        let client_isn = inbound.seq.wrapping_sub(1);
        let Some(mss) = self.secrets.check_cookie(
            key.client,
            key.service,
            client_isn,
            ack.wrapping_sub(1),
            now,
        ) else {
            self.stats.syn_cookies_invalid += 1;
            tracing::trace!(client = %key.client, "ACK with an invalid cookie");
            return None;
        };
        if !self.accepting {
            self.stats.refused_shutdown += 1;
            return None;
        }
        if let Err(why) = self.budget.try_acquire(*key.client.ip()) {
            self.count_budget_refusal(why, &key);
            return None;
        }
        let opts = CookieOptions::decode(mss, tsopt.map(|(_, tsecr)| tsecr));
        let (rx, tx) = (self.config.tcp.rx_buffer, self.config.tcp.tx_buffer);
        let snap = ConnSnapshot {
            client: key.client,
            service: key.service,
            state: TcpState::Established,
            snd_una: ack,
            snd_nxt: ack,
            rcv_nxt: inbound.seq,
            client_fin: false,
            our_fin: false,
            client_window: inbound.window,
            client_wscale: opts.window_scale,
            our_wscale: window_shift(rx),
            rx_capacity: rx as u32,
            tx_capacity: tx as u32,
            client_mss: opts.mss,
            sack_permitted: opts.sack_permitted,
            timestamps: tsopt.map(|(tsval, tsecr)| Timestamps {
                ts_recent: tsval,
                our_tsval: tsecr,
            }),
            send_bytes: Vec::new(),
            unread: Vec::new(),
            app: AppState {
                kind: kind.code(),
                version: app::SNAPSHOT_VERSION,
                bytes: Vec::new(),
                fin_delivered: false,
            },
            ingress: Ingress {
                node_key: [0; 32],
                flow_id: 0,
            },
            srtt_us: None,
        };
        let app = (app::new_app(kind, &app_config), kind);
        let mss_clamp = self.config.mtu.saturating_sub(HEADERS).min(65_535) as u16;
        let flow = match self.install(now, &snap, key, app, mss_clamp) {
            Ok(flow) => flow,
            Err(e) => {
                self.budget.release(*key.client.ip());
                tracing::debug!(client = %key.client, error = %e, "cookie connection not created");
                return None;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let slot = self.flows.insert(super::Flow { id, ..flow });
        self.dirty.push(slot);
        self.stats.conns_accepted += 1;
        self.stats.syn_cookies_accepted += 1;
        tracing::debug!(id, client = %key.client, service = %key.service, mss, "accepted by SYN cookie");
        Some(slot)
    }
}
