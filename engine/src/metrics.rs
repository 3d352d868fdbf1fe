//! Prometheus text exposition of a node's counters, and a tiny HTTP server for `/metrics`.
//!
//! Workers keep plain integer counters ([`StackStats`]); a scrape asks every worker for its copy
//! and renders the sum, so the data path never touches a shared atomic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::tunnel::migrate::{FREEZE_BUCKETS_MS, MigrationStats};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use flowshift_core::packet::DropReason;
use flowshift_core::stack::StackStats;

/// Node-level values beside the stack counters.
#[derive(Debug, Clone, Default)]
pub struct NodeGauges {
    /// Connections open now.
    pub connections: u64,
    /// The connection limit.
    pub max_connections: u64,
    /// Worker threads.
    pub workers: u64,
    /// Packets the driver failed to write to the TUN device.
    pub tun_write_errors: u64,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
}

/// The predictor's figures (`docs/prediction.md`).
#[derive(Debug, Clone, Default)]
pub struct PredictMetrics {
    /// Plans made, moves planned, executed and failed.
    pub counts: flowshift_core::predict::node::Counts,
    /// The node's utilisation over the last interval.
    pub utilisation: f64,
    /// The predicted peak utilisation over the horizon.
    pub predicted: f64,
    /// The learned threshold.
    pub threshold: f64,
    /// Lease counts (held here on connections offloaded to this node).
    pub leases: flowshift_core::predict::lease::LeaseCounters,
    /// Leases held here now.
    pub leases_held: u64,
    /// Connections this node offloaded by plan that are still away.
    pub offloads: u64,
    /// Connections served here per class, micro to large.
    pub classes: [u64; 4],
    /// KPI samples the shadow trials took: (served here, reported by peers).
    pub kpis_taken: (u64, u64),
    /// KPIs of connections restored here queued for their primaries, and dropped unsent.
    pub kpis_reported: (u64, u64),
    /// Connections served here with segment statistics (those that sent bytes here).
    pub segment_conns: u64,
    /// Their segments in all.
    pub segments: u64,
}

fn gauge_f64(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(if value.is_finite() { value } else { 0.0 });
    registry.register(name, help, g);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// Renders `stats`, `gauges` and the tunnel's counters (if the node has a tunnel) as
/// Prometheus text.
pub fn render(
    stats: &StackStats,
    gauges: &NodeGauges,
    tunnel: Option<&flowshift_tunnel::Stats>,
    migration: Option<&MigrationStats>,
    predict: Option<&PredictMetrics>,
) -> String {
    let mut r = Registry::with_prefix("flowshift");
    if let Some(p) = predict {
        counter(
            &mut r,
            "predict_plans",
            "Plans the predictor made",
            p.counts.plans,
        );
        counter(
            &mut r,
            "predict_moves_planned",
            "Moves the predictor planned (also under the manual policy, which executes none)",
            p.counts.planned,
        );
        counter(
            &mut r,
            "predict_moves_executed",
            "Planned moves executed: the connection moved",
            p.counts.executed,
        );
        counter(
            &mut r,
            "predict_moves_failed",
            "Planned moves that did not happen: the connection stayed or the move failed",
            p.counts.failed,
        );
        counter(
            &mut r,
            "predict_shadow_moves",
            "New connections moved to a peer under a shadow trial",
            p.counts.shadowed,
        );
        counter(
            &mut r,
            "predict_shadow_moves_failed",
            "Shadow moves that did not happen: the connection stays here",
            p.counts.shadow_failed,
        );
        counter(
            &mut r,
            "predict_shadow_kpis_local",
            "KPI samples of connections served here taken by shadow trials (local baseline)",
            p.kpis_taken.0,
        );
        counter(
            &mut r,
            "predict_shadow_kpis_from_peers",
            "KPI samples of shadowed connections reported by the peers that served them",
            p.kpis_taken.1,
        );
        counter(
            &mut r,
            "predict_kpis_reported",
            "KPIs of connections restored here queued for their primaries' load reports",
            p.kpis_reported.0,
        );
        counter(
            &mut r,
            "predict_kpis_report_dropped",
            "KPIs of connections restored here dropped unsent (more waited than reports carry)",
            p.kpis_reported.1,
        );
        counter(
            &mut r,
            "predict_leases_granted",
            "Leases granted on connections offloaded to this node",
            p.leases.granted,
        );
        counter(
            &mut r,
            "predict_leases_renewed",
            "Lease renewals taken from the primaries' load reports",
            p.leases.renewed,
        );
        counter(
            &mut r,
            "predict_leases_expired",
            "Leases that expired (their primary stopped renewing them)",
            p.leases.expired,
        );
        counter(
            &mut r,
            "predict_leases_returned",
            "Connections of expired leases handed back to their primary",
            p.leases.returned,
        );
        counter(
            &mut r,
            "predict_leases_kept",
            "Connections of expired leases that could not go back and stay here",
            p.leases.kept,
        );
        for (name, n) in ["micro", "small", "medium", "large"].iter().zip(p.classes) {
            gauge(
                &mut r,
                &format!("predict_class_{name}_connections"),
                "Connections served here in this size class (allocations enforced with [predict.class] enforce)",
                n,
            );
        }
        gauge(
            &mut r,
            "predict_segment_connections",
            "Connections served here with segment statistics (those that sent bytes here)",
            p.segment_conns,
        );
        gauge(
            &mut r,
            "predict_segments",
            "Segments of the connections served here, in all (byte ranges of what they sent)",
            p.segments,
        );
        gauge(
            &mut r,
            "predict_leases_held",
            "Leases held here now",
            p.leases_held,
        );
        gauge(
            &mut r,
            "predict_offloads",
            "Connections this node offloaded by plan that are still away (their leases renewed or running out)",
            p.offloads,
        );
        gauge_f64(
            &mut r,
            "predict_utilisation",
            "The node's utilisation over the last interval (load / capacity)",
            p.utilisation,
        );
        gauge_f64(
            &mut r,
            "predict_predicted_utilisation",
            "The predicted peak utilisation over the horizon",
            p.predicted,
        );
        gauge_f64(
            &mut r,
            "predict_threshold",
            "The learned utilisation threshold",
            p.threshold,
        );
    }
    counter(
        &mut r,
        "tun_packets_in",
        "Packets read from the TUN device",
        stats.packets_in,
    );
    counter(
        &mut r,
        "tun_bytes_in",
        "Bytes read from the TUN device",
        stats.bytes_in,
    );
    counter(
        &mut r,
        "tun_packets_out",
        "Packets written to the TUN device",
        stats.packets_out,
    );
    counter(
        &mut r,
        "tun_bytes_out",
        "Bytes written to the TUN device",
        stats.bytes_out,
    );
    counter(
        &mut r,
        "tun_write_errors",
        "Packets the TUN device refused",
        gauges.tun_write_errors,
    );
    let dropped = Family::<ReasonLabel, Counter>::default();
    for reason in DropReason::ALL {
        dropped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().to_owned(),
            })
            .inc_by(stats.dropped[reason.index()]);
    }
    r.register(
        "packets_dropped",
        "Inbound packets dropped, by reason",
        dropped,
    );
    counter(
        &mut r,
        "connections_accepted",
        "Connections accepted",
        stats.conns_accepted,
    );
    counter(
        &mut r,
        "connections_closed",
        "Connections closed and reclaimed",
        stats.conns_closed,
    );
    let refused = Family::<ReasonLabel, Counter>::default();
    for (reason, v) in [
        ("max_connections", stats.refused_limit),
        ("no_service", stats.refused_no_service),
        ("shutting_down", stats.refused_shutdown),
        ("max_half_open", stats.refused_half_open),
        ("max_per_source", stats.refused_per_source),
    ] {
        refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(v);
    }
    r.register(
        "connections_refused",
        "SYNs refused with RST, by reason",
        refused,
    );
    let cookies = Family::<ReasonLabel, Counter>::default();
    for (what, v) in [
        ("sent", stats.syn_cookies_sent),
        ("accepted", stats.syn_cookies_accepted),
        ("invalid", stats.syn_cookies_invalid),
    ] {
        cookies
            .get_or_create(&ReasonLabel {
                reason: what.to_owned(),
            })
            .inc_by(v);
    }
    r.register(
        "syn_cookies",
        "SYN cookies: SYNs answered with one (sent), connections opened by one (accepted), ACKs of unknown connections whose cookie failed (invalid)",
        cookies,
    );
    gauge(
        &mut r,
        "time_wait_connections",
        "Connections in TIME-WAIT (records without a socket)",
        stats.time_wait,
    );
    counter(
        &mut r,
        "time_wait_reused",
        "SYNs accepted on the 4-tuple of a connection in TIME-WAIT (port reuse)",
        stats.time_wait_reused,
    );
    counter(
        &mut r,
        "time_wait_acks",
        "ACKs sent again from TIME-WAIT (retransmitted FIN, or a SYN that may be old)",
        stats.time_wait_acks,
    );
    counter(
        &mut r,
        "time_wait_overflow",
        "TIME-WAIT records dropped early because the table was full",
        stats.time_wait_overflow,
    );
    counter(
        &mut r,
        "freeze_timeouts",
        "Frozen connections thawed because nothing ended their freeze in time (limits.freeze_timeout_ms)",
        stats.freeze_timeouts,
    );
    counter(
        &mut r,
        "idle_closed",
        "Connections closed for idling between requests (service idle_timeout_s)",
        stats.idle_closed,
    );
    counter(
        &mut r,
        "head_timeouts",
        "Connections closed because a request head did not complete in time (head_timeout_s)",
        stats.head_timeouts,
    );
    counter(
        &mut r,
        "loss_probes",
        "Loss probes: earliest unacknowledged segments resent after about two round trips without an ACK (tcp.loss_probes)",
        stats.loss_probes,
    );
    counter(
        &mut r,
        "kpis_dropped",
        "Ended connections' KPIs dropped before the predictor took them",
        stats.kpis_dropped,
    );
    counter(
        &mut r,
        "unknown_flow_packets",
        "Packets for no known connection (answered with RST)",
        stats.unknown_flow_packets,
    );
    counter(
        &mut r,
        "app_bytes_in",
        "Application bytes received from clients",
        stats.app_bytes_in,
    );
    counter(
        &mut r,
        "rx_direct_bytes",
        "Of the application bytes received, those the app took straight from the packet, without smoltcp's copy (tcp.direct_receive)",
        stats.rx_direct_bytes,
    );
    counter(
        &mut r,
        "rx_beyond_window",
        "Client segments that reached beyond the receive window the node advertised, cut to it",
        stats.rx_beyond_window,
    );
    counter(
        &mut r,
        "app_bytes_out",
        "Application bytes sent to clients",
        stats.app_bytes_out,
    );
    counter(
        &mut r,
        "work_bytes",
        "Application bytes emulated work was done on (service work_passes)",
        stats.work_bytes,
    );
    gauge(
        &mut r,
        "connections",
        "Connections open now",
        gauges.connections,
    );
    gauge(
        &mut r,
        "max_connections",
        "Connection limit",
        gauges.max_connections,
    );
    gauge(&mut r, "workers", "Worker threads", gauges.workers);
    gauge(
        &mut r,
        "uptime_seconds",
        "Seconds since the node started",
        gauges.uptime_seconds,
    );
    counter(
        &mut r,
        "handshake_timeouts",
        "Half-open TCP connections reset after the handshake deadline",
        stats.handshake_timeouts,
    );
    counter(
        &mut r,
        "connections_compacted",
        "Idle connections re-homed into fresh sockets to give their memory back",
        stats.compacted,
    );
    counter(
        &mut r,
        "tx_buffers_grown",
        "Send buffers grown: downloads limited by their send buffer, re-homed into a larger one (tcp.tx_buffer_max)",
        stats.tx_grown,
    );
    counter(
        &mut r,
        "tx_buffer_growths_abandoned",
        "Send-buffer growths given up (the drain before the re-home took too long, the connection left ESTABLISHED during it, or the re-home failed)",
        stats.tx_grow_abandoned,
    );
    counter(
        &mut r,
        "tx_buffer_growths_over_budget",
        "Connections whose send buffer limited them but tcp.tx_grow_budget had no room (each counted once)",
        stats.tx_grow_over_budget,
    );
    gauge(
        &mut r,
        "tx_buffer_grown_bytes",
        "Send-buffer growth held by connections, or reserved by drains in progress (at each worker's last sweep), bytes",
        stats.tx_grown_bytes,
    );
    let (map_failures, unmap_failures) = crate::alloc::failures();
    counter(
        &mut r,
        "allocator_map_failures",
        "Large blocks the kernel refused to map (vm.max_map_count too low?)",
        map_failures,
    );
    counter(
        &mut r,
        "allocator_unmap_failures",
        "Large blocks the kernel refused to unmap (vm.max_map_count too low?)",
        unmap_failures,
    );
    counter(
        &mut r,
        "allocator_blocks_recycled",
        "Socket buffers (and other large blocks) reused from closed connections instead of mapped anew",
        crate::alloc::recycled(),
    );
    if let Some(n) = crate::alloc::mappings() {
        gauge(
            &mut r,
            "process_mappings",
            "Memory mappings of the node (the kernel's limit is vm.max_map_count)",
            n,
        );
    }
    counter(
        &mut r,
        "connections_parked",
        "Times an idle connection's socket was parked out of the interface's polls",
        stats.parked,
    );
    counter(
        &mut r,
        "keepalive_timeouts",
        "Connections reset because the client answered no keepalive probe (service keepalive_s)",
        stats.keepalive_timeouts,
    );
    counter(
        &mut r,
        "close_timeouts",
        "Closing TCP connections (FIN sent) reset after two minutes of silence from the client",
        stats.close_timeouts,
    );
    if let Some(t) = tunnel {
        counter(
            &mut r,
            "tunnel_rx_packets",
            "UDP datagrams received by the tunnel",
            t.rx_packets,
        );
        counter(
            &mut r,
            "tunnel_rx_bytes",
            "UDP payload bytes received by the tunnel",
            t.rx_bytes,
        );
        counter(
            &mut r,
            "tunnel_tx_packets",
            "UDP datagrams sent by the tunnel",
            t.tx_packets,
        );
        counter(
            &mut r,
            "tunnel_tx_bytes",
            "UDP payload bytes sent by the tunnel",
            t.tx_bytes,
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        for (reason, v) in [
            ("bad_version", t.rx_bad_version),
            ("malformed", t.rx_malformed),
            ("unknown_session", t.rx_unknown_session),
            ("replayed", t.rx_replayed),
            ("too_old", t.rx_too_old),
            ("auth_failed", t.rx_auth_failed),
            ("bad_frames", t.rx_bad_frames),
            ("handshake_bad_mac", t.handshake_bad_mac),
            ("handshake_rate_limited", t.handshake_rate_limited),
            ("handshake_mac2", t.handshake_mac2_rejected),
            ("handshake_unknown_peer", t.handshake_unknown_peer),
            ("handshake_replayed", t.handshake_replayed),
            ("handshake_clock_ahead", t.handshake_clock_ahead),
        ] {
            rejected
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(v);
        }
        r.register(
            "tunnel_rejected",
            "Tunnel packets rejected, by reason",
            rejected,
        );
        counter(
            &mut r,
            "tunnel_handshakes_completed",
            "Tunnel handshakes completed",
            t.handshake_completed,
        );
        counter(
            &mut r,
            "tunnel_handshakes_failed",
            "Tunnel handshakes failed",
            t.handshake_failed,
        );
        counter(
            &mut r,
            "tunnel_datagrams_dropped",
            "Tunnel datagrams dropped (queue full)",
            t.datagrams_dropped,
        );
        for (name, help, v) in [
            (
                "tunnel_handshake_timeouts",
                "Tunnel handshake attempt series without a response (retrying continues)",
                t.handshake_timeouts,
            ),
            (
                "tunnel_messages_received",
                "Reliable tunnel messages delivered",
                t.messages_received,
            ),
            (
                "tunnel_messages_sent",
                "Reliable tunnel messages queued",
                t.messages_sent,
            ),
            (
                "tunnel_datagrams_sent",
                "Tunnel datagrams sent",
                t.datagrams_sent,
            ),
            (
                "tunnel_datagrams_received",
                "Tunnel datagrams delivered",
                t.datagrams_received,
            ),
            (
                "tunnel_heartbeats_received",
                "Tunnel heartbeats received",
                t.heartbeats_received,
            ),
            (
                "tunnel_cookie_replies_sent",
                "Cookie replies sent: handshake initiations refused under load for want of a valid mac2",
                t.cookie_replies_sent,
            ),
            (
                "tunnel_cookie_replies_received",
                "Cookie replies received: a peer was under load and asked for mac2",
                t.cookie_replies_received,
            ),
        ] {
            counter(&mut r, name, help, v);
        }
    }
    counter(
        &mut r,
        "moved_packets_forwarded",
        "Client packets of connections moved away, forwarded to their owner",
        stats.forwarded_to_owner,
    );
    counter(
        &mut r,
        "moved_packets_relayed",
        "Packets of connections moved away, from their owner to the TUN device",
        stats.relayed_from_owner,
    );
    counter(
        &mut r,
        "restored_packets_returned",
        "Packets of connections restored here, sent back to where they entered",
        stats.forwarded_to_ingress,
    );
    counter(
        &mut r,
        "moved_entries_expired",
        "Entries of connections moved away removed after a silence past twice the keepalive limit",
        stats.moved_expired,
    );
    counter(
        &mut r,
        "tunnel_packets_refused",
        "Forwarded packets refused (unknown connection, wrong peer or 4-tuple)",
        stats.tunnel_packets_refused,
    );
    counter(
        &mut r,
        "tunnel_late_resets",
        "RSTs from the tunnel for a connection that already ended here, discarded",
        stats.tunnel_late_resets,
    );
    let mut freeze = String::new();
    if let Some(m) = migration {
        counter(
            &mut r,
            "migrations_moved_out",
            "Connections moved from this node to another",
            m.moved_out,
        );
        counter(
            &mut r,
            "migrations_moved_in",
            "Connections restored on this node from another",
            m.moved_in,
        );
        counter(
            &mut r,
            "migration_messages_refused",
            "Migration protocol messages refused (malformed, unknown version)",
            m.messages_refused,
        );
        for (name, help, list) in [
            (
                "migration_stayed",
                "Connections offered for a move that stayed, by reason",
                &m.stayed,
            ),
            (
                "migration_aborts",
                "Migrations given up, by reason",
                &m.aborts,
            ),
        ] {
            let family = Family::<ReasonLabel, Counter>::default();
            for (reason, n) in list {
                family
                    .get_or_create(&ReasonLabel {
                        reason: reason.clone(),
                    })
                    .inc_by(*n);
            }
            r.register(name, help, family);
        }
        freeze = freeze_histogram(m);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    if !freeze.is_empty()
        && let Some(body) = out.strip_suffix("# EOF\n")
    {
        out = format!("{body}{freeze}# EOF\n");
    }
    out
}

/// The freeze-time histogram, in OpenMetrics text (its buckets are counted by the
/// coordinator, not observed here).
fn freeze_histogram(m: &MigrationStats) -> String {
    use std::fmt::Write;
    let name = "flowshift_migration_freeze_seconds";
    let mut s = format!(
        "# HELP {name} Time moved connections were frozen (nothing delivered or sent).\n# TYPE {name} histogram\n"
    );
    let mut cumulative = 0;
    for (i, le) in FREEZE_BUCKETS_MS.iter().enumerate() {
        cumulative += m.freeze_buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(s, "{name}_bucket{{le=\"{}\"}} {cumulative}", le / 1e3);
    }
    cumulative += m.freeze_buckets.last().copied().unwrap_or(0);
    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(s, "{name}_sum {}", m.freeze_sum_s);
    let _ = writeln!(s, "{name}_count {cumulative}");
    s
}

/// What [`render`]'s text is: OpenMetrics (it ends with `# EOF`).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; a client beyond that gets `503` at once.
pub const MAX_SCRAPERS: usize = 16;
/// How long one scrape connection may take in all (reading the request, writing the reply).
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `GET /metrics` on `addr` with what `scrape` renders: an accepting thread, and a
/// short-lived thread per connection (at most [`MAX_SCRAPERS`]), each with
/// [`SCRAPE_DEADLINE`], so a slow or silent client cannot hold up the others.
/// Returns the address it listens on.
pub fn serve_http(
    addr: SocketAddr,
    scrape: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics");
    std::thread::Builder::new().name("fs-metrics".into()).spawn(move || {
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut backoff = Duration::from_millis(10);
        let mut errors = 0u64;
        for stream in listener.incoming() {
            let mut stream = match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(10);
                    s
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    errors += 1;
                    if errors.is_power_of_two() {
                        tracing::warn!(error = %e, errors, "metrics accept failed; backing off");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_write_timeout(Some(SCRAPE_DEADLINE));
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_SCRAPERS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = write!(
                    stream,
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                continue;
            }
            let scrape = scrape.clone();
            let done = active.clone();
            let spawned = std::thread::Builder::new()
                .name("fs-metrics-conn".into())
                .spawn(move || {
                    let mut stream = stream;
                    serve_scrape(&mut stream, &*scrape);
                    // The slot is free before the client sees the connection close.
                    done.fetch_sub(1, Ordering::AcqRel);
                    drop(stream);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("cannot spawn a metrics connection thread");
            }
        }
    })?;
    Ok(addr)
}

/// One request on `stream`, within [`SCRAPE_DEADLINE`].
fn serve_scrape(stream: &mut std::net::TcpStream, scrape: &(dyn Fn() -> String + Send + Sync)) {
    let deadline = std::time::Instant::now() + SCRAPE_DEADLINE;
    let mut head = [0u8; 4096];
    let mut len = 0;
    while len < head.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut head[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        if head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let (status, body) = if head[..len].starts_with(b"GET /metrics ") {
        ("200 OK", scrape())
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
        return;
    }
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let mut s = StackStats {
            packets_in: 5,
            conns_accepted: 2,
            ..Default::default()
        };
        s.dropped[DropReason::BadChecksum.index()] = 3;
        let mut tunnel = flowshift_tunnel::Stats::default();
        tunnel.rx_replayed = 4;
        tunnel.handshake_unknown_peer = 2;
        tunnel.handshake_mac2_rejected = 7;
        tunnel.cookie_replies_sent = 5;
        let text = render(
            &s,
            &NodeGauges {
                connections: 1,
                ..Default::default()
            },
            Some(&tunnel),
            Some(&MigrationStats {
                moved_out: 3,
                stayed: vec![("capacity".into(), 2)],
                freeze_buckets: vec![1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1],
                freeze_sum_s: 3.5,
                ..Default::default()
            }),
            Some(&PredictMetrics {
                counts: flowshift_core::predict::node::Counts {
                    planned: 6,
                    executed: 4,
                    failed: 2,
                    ..Default::default()
                },
                utilisation: 0.5,
                predicted: f64::NAN,
                threshold: 0.85,
                leases: flowshift_core::predict::lease::LeaseCounters {
                    expired: 3,
                    returned: 2,
                    kept: 1,
                    ..Default::default()
                },
                leases_held: 4,
                offloads: 0,
                classes: [0, 1, 2, 0],
                kpis_taken: (7, 5),
                kpis_reported: (9, 1),
                segment_conns: 2,
                segments: 5,
            }),
        );
        assert!(
            text.contains("flowshift_predict_shadow_kpis_from_peers_total 5"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_kpis_report_dropped_total 1"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_leases_expired_total 3"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_leases_kept_total 1"),
            "{text}"
        );
        assert!(text.contains("flowshift_predict_leases_held 4"), "{text}");
        assert!(text.contains("flowshift_predict_segments 5"), "{text}");
        assert!(
            text.contains("flowshift_predict_segment_connections 2"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_class_medium_connections 2"),
            "{text}"
        );
        assert!(text.contains("flowshift_tun_packets_in_total 5"), "{text}");
        assert!(
            text.contains("flowshift_predict_moves_planned_total 6"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_moves_executed_total 4"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_predict_moves_failed_total 2"),
            "{text}"
        );
        assert!(text.contains("flowshift_predict_utilisation 0.5"), "{text}");
        assert!(
            text.contains("flowshift_predict_predicted_utilisation 0.0"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_migrations_moved_out_total 3"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_migration_stayed_total{reason=\"capacity\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_migration_freeze_seconds_bucket{le=\"0.002\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_migration_freeze_seconds_bucket{le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_migration_freeze_seconds_count 4\n"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_tunnel_rejected_total{reason=\"replayed\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_tunnel_rejected_total{reason=\"handshake_unknown_peer\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_tunnel_rejected_total{reason=\"handshake_mac2\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_tunnel_cookie_replies_sent_total 5"),
            "{text}"
        );
        assert!(
            text.contains("flowshift_packets_dropped_total{reason=\"bad_checksum\"} 3"),
            "{text}"
        );
        assert!(text.contains("flowshift_connections 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn silent_clients_do_not_hold_up_a_scrape() {
        let addr = serve_http(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| "metrics body\n# EOF\n".to_owned()),
        )
        .unwrap();
        // Ten clients that connect and say nothing: served one at a time, they would hold a
        // scrape up for 10 x SCRAPE_DEADLINE.
        let silent: Vec<std::net::TcpStream> = (0..10)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(SCRAPE_DEADLINE * 5)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .expect("scrape answered while silent clients wait");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with("metrics body\n# EOF\n"), "{reply}");
        // The silent ones are cut off at their deadline.
        for mut c in silent {
            c.set_read_timeout(Some(SCRAPE_DEADLINE * 5)).unwrap();
            let mut buf = [0u8; 16];
            assert!(
                matches!(c.read(&mut buf), Ok(0)),
                "silent client not closed"
            );
        }
        // Past MAX_SCRAPERS at once: 503, not a queue.
        let held: Vec<std::net::TcpStream> = (0..MAX_SCRAPERS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut extra = std::net::TcpStream::connect(addr).unwrap();
        extra.set_read_timeout(Some(SCRAPE_DEADLINE * 5)).unwrap();
        let mut reply = String::new();
        let _ = extra.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        drop(held);
    }
}
