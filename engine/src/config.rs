//! Node configuration: a TOML file, parsed strictly.
//!
//! Unknown keys are rejected, and every error names the file, the key and what is wrong, so an
//! operator never has to guess which line of a config the node disliked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flowshift_tunnel::{PresharedKey, PrivateKey, PublicKey};
use serde::Deserialize;

use flowshift_core::app::{AppConfig, AppKind};
pub use flowshift_core::config::{Ipv4Cidr, MAX_WORK_PASSES, ServiceConfig, TcpConfig};
use flowshift_core::predict::node::{LoadMetric, NodeSettings};
use flowshift_core::predict::plan::Policy;
use flowshift_core::predict::{ConfigError as CoreConfigError, PredictConfig};
use smoltcp::time::Duration;

/// Default `limits.max_half_open`: with the default 256 KiB buffers each way, a SYN flood can
/// reserve at most 1 GiB of address space, of which little is resident (a half-open
/// connection has written nothing into its buffers; the node's allocator maps them untouched,
/// or recycles a closed connection's with at most 32 KiB of zeroed pages present, from a
/// cache of 16 per worker); past `syn_cookie_threshold` handshakes hold no socket at all.
pub const DEFAULT_MAX_HALF_OPEN: usize = 2048;
/// Default `limits.syn_cookie_threshold`: 256 handshakes in flight at once is far beyond what
/// legitimate clients produce within one round trip here.
pub const DEFAULT_SYN_COOKIE_THRESHOLD: usize = 256;
/// Upper bound of `node.shutdown_timeout_ms`.
const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 3_600_000;
/// Largest `tcp.tx_buffer_max`: what a peer accepts in a moved connection's snapshot.
const MAX_GROWN_TX_BUFFER: usize = 16 << 20;

/// Errors from loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{file}: {message}")]
    Parse {
        /// The config file.
        file: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{file}: key `{key}`: {reason}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// Dotted path of the offending key, e.g. `service[1].port`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A whole node config, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[node]`.
    pub node: NodeConfig,
    /// `[tun]`.
    pub tun: TunConfig,
    /// `[[service]]`, at least one, ports unique.
    pub services: Vec<ServiceConfig>,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[tcp]`.
    pub tcp: TcpConfig,
    /// `[metrics]`: where to serve Prometheus text over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `[tunnel]` and its `[[peer]]`s, if this node talks to others.
    pub tunnel: Option<TunnelConfig>,
    /// `[predict]`: the predictor's policy and settings (default: manual, CPU).
    pub predict: PredictSection,
}

/// `[predict]`: how the node forecasts its load and offloads connections
/// (`docs/prediction.md`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PredictSection {
    /// Policy, load metric, capacity, report delay, decisions kept.
    pub node: NodeSettings,
    /// Forecasting, detection and planning settings (validated).
    pub config: PredictConfig,
    /// The `[[peer]]` names moves may go to (`peers`; default every peer).
    pub targets: Vec<String>,
    /// `[predict.class] enforce`: each connection's class allocation (rate limit, send
    /// budget, priority) is applied to it, not only shown. Default off.
    pub enforce_classes: bool,
}

/// `[tunnel]`: this node's end of the encrypted tunnel, and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// UDP address to listen on (and send from).
    pub listen: SocketAddr,
    /// This node's static private key (read from `private_key_file`).
    pub private_key: PrivateKey,
    /// `[[peer]]`s: names and keys unique.
    pub peers: Vec<PeerEntry>,
    /// Where the node keeps the newest handshake timestamp its peers accepted, across
    /// restarts (`state_file`; default: the private key file's path with `.state` added).
    pub state_file: PathBuf,
    /// Forwarded packets queued together for a peer share tunnel records, when the peer
    /// says it takes them (`pack_datagrams`, default on; off: one packet per record).
    pub pack_datagrams: bool,
}

/// One `[[peer]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// Its name, used by `ctl` and in logs.
    pub name: String,
    /// Where to reach it; without one this node only answers its handshakes.
    pub endpoint: Option<SocketAddr>,
    /// Its static public key.
    pub public_key: PublicKey,
    /// A pre-shared key for this peer (`preshared_key_file`, or the `[tunnel]` one).
    pub preshared_key: Option<PresharedKey>,
    /// Connections moved here whose packets enter at this peer send their replies straight
    /// out of this node's TUN device (direct server return) instead of back through the
    /// peer. Only where the network lets this node send from the service address.
    pub direct_return: bool,
}

/// `[node]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name, shown in logs and status.
    pub name: String,
    /// Path of the control socket (a Unix socket).
    pub control_socket: PathBuf,
    /// A group whose members may use the control socket too (mode 0660, group-owned);
    /// without it the socket is 0600 and only root and the node's own user may.
    pub control_group: Option<u32>,
    /// Worker threads, each with its own TUN queue and stack. Default: number of cores.
    pub workers: usize,
    /// Pin each worker to a core of its own (worker i on core i mod cores). Default true;
    /// off, the kernel's scheduler places them, which can do better when other busy
    /// processes share the node's few cores.
    pub pin_workers: bool,
    /// How long a graceful shutdown waits for connections to close before resetting them.
    pub shutdown_timeout_ms: u64,
}

/// `[tun]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// Interface MTU.
    pub mtu: u16,
    /// Addresses this node serves; each is routed into the TUN device.
    pub service_addresses: Vec<Ipv4Cidr>,
    /// Use TUN offload (`IFF_VNET_HDR`): smoltcp emits TCP segments of up to 64 KB that the
    /// kernel cuts at the MTU (TSO), and reads take the kernel's GSO packets apart. Default: on.
    pub offload: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Connections open at once, over all workers; further SYNs are refused with RST.
    pub max_connections: usize,
    /// Packets held per frozen flow before further ones are dropped (and counted).
    pub frozen_queue_packets: usize,
    /// Bytes held per frozen flow before further packets are dropped (and counted).
    pub frozen_queue_bytes: usize,
    /// Bytes held over all frozen flows of the node (split evenly over the workers).
    pub frozen_total_bytes: usize,
    /// A flow frozen this long is thawed (milliseconds).
    pub freeze_timeout_ms: u64,
    /// Connections still in their handshake (SYN received, not yet ACKed), over all
    /// workers; further SYNs are refused with RST. Each holds its socket buffers, so this
    /// bounds what a SYN flood can claim.
    pub max_half_open: usize,
    /// Answer SYNs with SYN cookies (no state) once `syn_cookie_threshold` handshakes are in
    /// progress.
    pub syn_cookies: bool,
    /// Handshakes in progress over all workers (split evenly) beyond which SYNs get cookies;
    /// 0: always. Below `max_half_open`.
    pub syn_cookie_threshold: usize,
    /// Connections one client address may hold at once, over all workers (`None`: no
    /// limit). Clients behind one NAT share an address: off by default.
    pub max_per_source: Option<u32>,
}

// ---- raw serde shapes --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    tun: RawTun,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    tcp: RawTcp,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    tunnel: Option<RawTunnel>,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    predict: Option<RawPredict>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPredict {
    policy: Option<String>,
    metric: Option<String>,
    capacity: Option<f64>,
    peers: Option<Vec<String>>,
    interval_ms: Option<u64>,
    report_delay_ms: Option<u64>,
    history: Option<usize>,
    max_tracked: Option<usize>,
    #[serde(default)]
    forecast: RawForecast,
    #[serde(default)]
    detect: RawDetect,
    #[serde(default)]
    plan: RawPlan,
    #[serde(default)]
    lease: RawLease,
    #[serde(default)]
    shadow: RawShadow,
    #[serde(default)]
    class: RawClass,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClass {
    enforce: Option<bool>,
    /// Bytes/s per class, micro to large; 0: no limit.
    rate_limits: Option<Vec<u64>>,
    /// Send-buffer budget per class, bytes.
    buffer_budgets: Option<Vec<u32>>,
    /// Class boundaries in bytes/s, three, increasing.
    bounds: Option<Vec<f64>>,
    /// Hysteresis margin, a fraction of the boundary.
    margin: Option<f64>,
    /// Most segments per connection.
    max_segments: Option<usize>,
    /// Bytes that make a segment hot enough to split.
    split_bytes: Option<u64>,
    /// Inactivity after which adjacent segments merge.
    idle_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    enabled: Option<bool>,
    steps: Option<Vec<f64>>,
    min_samples: Option<usize>,
    significance: Option<f64>,
    max_error_excess: Option<f64>,
    backoff_ms: Option<u64>,
    latency_margin_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLease {
    utilisation_threshold: Option<f64>,
    min_lease_ms: Option<u64>,
    max_lease_ms: Option<u64>,
    default_lease_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawForecast {
    alpha: Option<f64>,
    beta: Option<f64>,
    gamma: Option<f64>,
    season: Option<usize>,
    window: Option<usize>,
    min_history: Option<usize>,
    max_mape: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDetect {
    horizon_ms: Option<u64>,
    k: Option<f64>,
    floor: Option<f64>,
    ceiling: Option<f64>,
    history: Option<usize>,
    min_history: Option<usize>,
    imbalance_threshold: Option<f64>,
    confidence: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    hysteresis: Option<f64>,
    replan_interval_ms: Option<u64>,
    max_moves: Option<usize>,
    cooldown_ms: Option<u64>,
    reactive_threshold: Option<f64>,
    rtt_tolerance: Option<f64>,
    relay_cpu_s_per_gb: Option<f64>,
    direct_cpu_s_per_gb: Option<f64>,
    rebalance: Option<bool>,
    #[serde(default)]
    migration_cost: RawMigrationCost,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMigrationCost {
    freeze_ms: Option<f64>,
    per_mib_ms: Option<f64>,
    load: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: String,
    private_key_file: PathBuf,
    preshared_key_file: Option<PathBuf>,
    state_file: Option<PathBuf>,
    pack_datagrams: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    endpoint: Option<String>,
    public_key: String,
    preshared_key_file: Option<PathBuf>,
    #[serde(default)]
    direct_return: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control_socket: PathBuf,
    control_group: Option<String>,
    workers: Option<usize>,
    pin_workers: Option<bool>,
    shutdown_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTun {
    name: String,
    mtu: Option<u32>,
    service_addresses: Vec<String>,
    offload: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    port: u32,
    app: String,
    bytes: Option<u64>,
    idle_timeout_s: Option<u64>,
    keepalive_s: Option<u64>,
    head_timeout_s: Option<u64>,
    work_passes: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    frozen_queue_packets: Option<usize>,
    frozen_queue_bytes: Option<usize>,
    frozen_total_bytes: Option<usize>,
    freeze_timeout_ms: Option<u64>,
    max_half_open: Option<usize>,
    syn_cookies: Option<bool>,
    syn_cookie_threshold: Option<usize>,
    max_per_source: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    rx_buffer: Option<usize>,
    tx_buffer: Option<usize>,
    loss_probes: Option<bool>,
    direct_receive: Option<bool>,
    tx_buffer_max: Option<usize>,
    tx_grow_budget: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config `text`; `file` is only used in error messages.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };

        if raw.node.name.is_empty() || raw.node.name.len() > 64 {
            return Err(invalid("node.name", "must be 1 to 64 characters".into()));
        }
        if raw.node.control_socket.as_os_str().is_empty() {
            return Err(invalid("node.control_socket", "must not be empty".into()));
        }
        let control_group = match &raw.node.control_group {
            None => None,
            Some(g) => Some(group_id(g).ok_or_else(|| {
                invalid(
                    "node.control_group",
                    format!("no group named {g:?} (a name in /etc/group, or a number)"),
                )
            })?),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = raw.node.workers.unwrap_or(cores);
        if !(1..=64).contains(&workers) {
            return Err(invalid(
                "node.workers",
                format!("{workers} is not in 1..=64"),
            ));
        }

        if raw.tun.name.is_empty() || raw.tun.name.len() > 15 {
            return Err(invalid(
                "tun.name",
                "must be 1 to 15 bytes (an interface name)".into(),
            ));
        }
        let mtu = raw.tun.mtu.unwrap_or(1500);
        if !(576..=65535).contains(&mtu) {
            return Err(invalid("tun.mtu", format!("{mtu} is not in 576..=65535")));
        }
        if raw.tun.service_addresses.is_empty() {
            return Err(invalid(
                "tun.service_addresses",
                "needs at least one address".into(),
            ));
        }
        if raw.tun.service_addresses.len() > flowshift_core::stack::MAX_SERVICE_ADDRESSES {
            return Err(invalid(
                "tun.service_addresses",
                format!(
                    "at most {} addresses",
                    flowshift_core::stack::MAX_SERVICE_ADDRESSES
                ),
            ));
        }
        let mut service_addresses = Vec::new();
        for (i, s) in raw.tun.service_addresses.iter().enumerate() {
            let cidr: Ipv4Cidr = s
                .parse()
                .map_err(|e| invalid(&format!("tun.service_addresses[{i}]"), e))?;
            if cidr.addr.is_unspecified() || cidr.addr.is_multicast() || cidr.addr.is_broadcast() {
                return Err(invalid(
                    &format!("tun.service_addresses[{i}]"),
                    format!("{} cannot be a service address", cidr.addr),
                ));
            }
            if service_addresses
                .iter()
                .any(|o: &Ipv4Cidr| o.addr == cidr.addr)
            {
                return Err(invalid(
                    &format!("tun.service_addresses[{i}]"),
                    format!("{} is listed twice", cidr.addr),
                ));
            }
            service_addresses.push(cidr);
        }

        if raw.service.is_empty() {
            return Err(invalid(
                "service",
                "configure at least one [[service]]".into(),
            ));
        }
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.service.iter().enumerate() {
            let key = |k: &str| format!("service[{i}].{k}");
            let port = u16::try_from(s.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    invalid(&key("port"), format!("{} is not a port 1..=65535", s.port))
                })?;
            if services.iter().any(|o| o.port == port) {
                return Err(invalid(
                    &key("port"),
                    format!("port {port} is configured twice"),
                ));
            }
            let app = match s.app.as_str() {
                "echo" => AppKind::Echo,
                "http" => AppKind::Http,
                "sink" => AppKind::Sink,
                "source" => AppKind::Source,
                other => {
                    return Err(invalid(
                        &key("app"),
                        format!("unknown app `{other}` (expected echo, http, sink or source)"),
                    ));
                }
            };
            if s.bytes.is_some() && app != AppKind::Source {
                return Err(invalid(
                    &key("bytes"),
                    "only the `source` app takes `bytes`".into(),
                ));
            }
            let mut service = ServiceConfig::new(port, app, AppConfig { bytes: s.bytes });
            let secs = |v: u64| (v > 0).then(|| smoltcp::time::Duration::from_secs(v));
            if let Some(v) = s.idle_timeout_s {
                service.idle_timeout = secs(v);
            }
            if let Some(v) = s.keepalive_s {
                if v > 86_400 {
                    return Err(invalid(
                        &key("keepalive_s"),
                        format!("{v} is over 86400 (a day)"),
                    ));
                }
                service.keepalive = secs(v);
            }
            if let Some(v) = s.head_timeout_s {
                if app != AppKind::Http {
                    return Err(invalid(
                        &key("head_timeout_s"),
                        "only the `http` app reads request heads".into(),
                    ));
                }
                service.head_timeout = secs(v);
            }
            if let Some(v) = s.work_passes {
                if v > MAX_WORK_PASSES {
                    return Err(invalid(
                        &key("work_passes"),
                        format!("{v} is over {MAX_WORK_PASSES}"),
                    ));
                }
                service.work_passes = v;
            }
            services.push(service);
        }

        let limits = LimitsConfig {
            max_connections: raw.limits.max_connections.unwrap_or(100_000),
            frozen_queue_packets: raw.limits.frozen_queue_packets.unwrap_or(1024),
            frozen_queue_bytes: raw.limits.frozen_queue_bytes.unwrap_or(4 << 20),
            frozen_total_bytes: raw.limits.frozen_total_bytes.unwrap_or(256 << 20),
            freeze_timeout_ms: raw.limits.freeze_timeout_ms.unwrap_or(60_000),
            max_half_open: raw.limits.max_half_open.unwrap_or(DEFAULT_MAX_HALF_OPEN),
            syn_cookies: raw.limits.syn_cookies.unwrap_or(true),
            syn_cookie_threshold: raw
                .limits
                .syn_cookie_threshold
                .unwrap_or(DEFAULT_SYN_COOKIE_THRESHOLD),
            max_per_source: raw.limits.max_per_source.filter(|&n| n > 0),
        };
        if limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1".into(),
            ));
        }
        if limits.frozen_queue_bytes < 65_536 {
            return Err(invalid(
                "limits.frozen_queue_bytes",
                "must be at least 65536 (one full-size packet with TUN offload)".into(),
            ));
        }
        if limits.frozen_total_bytes < limits.frozen_queue_bytes {
            return Err(invalid(
                "limits.frozen_total_bytes",
                "must be at least limits.frozen_queue_bytes".into(),
            ));
        }
        if limits.freeze_timeout_ms < 30_000 {
            return Err(invalid(
                "limits.freeze_timeout_ms",
                "must be at least 30000: moves run their own deadlines (up to ~21 s) within it"
                    .into(),
            ));
        }
        if !(1..=65536).contains(&limits.frozen_queue_packets) {
            return Err(invalid(
                "limits.frozen_queue_packets",
                format!("{} is not in 1..=65536", limits.frozen_queue_packets),
            ));
        }
        if !(workers..=1_000_000).contains(&limits.max_half_open) {
            return Err(invalid(
                "limits.max_half_open",
                format!(
                    "{} is not in {workers}..=1000000 (at least one per worker)",
                    limits.max_half_open
                ),
            ));
        }
        if limits.syn_cookies && limits.syn_cookie_threshold >= limits.max_half_open {
            return Err(invalid(
                "limits.syn_cookie_threshold",
                format!(
                    "{} is not below limits.max_half_open ({}): cookies would never be sent",
                    limits.syn_cookie_threshold, limits.max_half_open
                ),
            ));
        }
        let shutdown_timeout_ms = raw.node.shutdown_timeout_ms.unwrap_or(5_000);
        if shutdown_timeout_ms > MAX_SHUTDOWN_TIMEOUT_MS {
            return Err(invalid(
                "node.shutdown_timeout_ms",
                format!("{shutdown_timeout_ms} is over {MAX_SHUTDOWN_TIMEOUT_MS} (one hour)"),
            ));
        }

        let defaults = TcpConfig::default();
        let tcp = TcpConfig {
            rx_buffer: raw.tcp.rx_buffer.unwrap_or(defaults.rx_buffer),
            tx_buffer: raw.tcp.tx_buffer.unwrap_or(defaults.tx_buffer),
            loss_probes: raw.tcp.loss_probes.unwrap_or(defaults.loss_probes),
            direct_receive: raw.tcp.direct_receive.unwrap_or(defaults.direct_receive),
            // Unset: the default, or no growth when the send buffer is set larger.
            tx_buffer_max: raw.tcp.tx_buffer_max.unwrap_or_else(|| {
                defaults
                    .tx_buffer_max
                    .max(raw.tcp.tx_buffer.unwrap_or(defaults.tx_buffer))
            }),
            tx_grow_budget: raw.tcp.tx_grow_budget.unwrap_or(defaults.tx_grow_budget),
        };
        for (key, v) in [
            ("tcp.rx_buffer", tcp.rx_buffer),
            ("tcp.tx_buffer", tcp.tx_buffer),
        ] {
            // smoltcp's window scale tops out at 14: 2^30 bytes.
            if !(1024..=(1 << 30)).contains(&v) {
                return Err(invalid(key, format!("{v} is not in 1024..=1073741824")));
            }
        }
        // A moved connection brings its buffers along: a peer refuses one over 16 MiB.
        if tcp.tx_buffer_max != tcp.tx_buffer
            && !(tcp.tx_buffer..=MAX_GROWN_TX_BUFFER).contains(&tcp.tx_buffer_max)
        {
            return Err(invalid(
                "tcp.tx_buffer_max",
                format!(
                    "{} is not in tcp.tx_buffer ({})..={MAX_GROWN_TX_BUFFER} (16 MiB)",
                    tcp.tx_buffer_max, tcp.tx_buffer
                ),
            ));
        }

        let metrics_listen = match raw.metrics {
            None => None,
            Some(m) => Some(m.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!("`{}` is not an address:port", m.listen),
                )
            })?),
        };

        let tunnel = Self::tunnel(file, raw.tunnel, raw.peer)?;
        let predict = Self::predict(file, raw.predict.unwrap_or_default(), tunnel.as_ref())?;

        Ok(Config {
            tunnel,
            predict,
            node: NodeConfig {
                name: raw.node.name,
                control_socket: raw.node.control_socket,
                control_group,
                workers,
                pin_workers: raw.node.pin_workers.unwrap_or(true),
                shutdown_timeout_ms,
            },
            tun: TunConfig {
                name: raw.tun.name,
                mtu: mtu as u16,
                service_addresses,
                offload: raw.tun.offload.unwrap_or(true),
            },
            services,
            limits,
            tcp,
            metrics_listen,
        })
    }

    fn predict(
        file: &Path,
        raw: RawPredict,
        tunnel: Option<&TunnelConfig>,
    ) -> Result<PredictSection, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: format!("predict.{key}"),
            reason,
        };
        // Durations in whole milliseconds, at most a day (so they never overflow).
        let millis = |key: &str, v: Option<u64>, default: Duration| match v {
            None => Ok(default),
            Some(ms) if ms <= 86_400_000 => Ok(Duration::from_millis(ms)),
            Some(ms) => Err(invalid(key, format!("{ms} is not in 0..=86400000"))),
        };
        let frac_millis = |key: &str, v: Option<f64>, default: Duration| match v {
            None => Ok(default),
            Some(ms) if ms.is_finite() && (0.0..=86_400_000.0).contains(&ms) => {
                Ok(Duration::from_micros((ms * 1000.0).round() as u64))
            }
            Some(ms) => Err(invalid(key, format!("{ms} is not in 0..=86400000"))),
        };

        let policy = match raw.policy.as_deref() {
            None | Some("manual") => Policy::Manual,
            Some("reactive") => Policy::Reactive,
            Some("predictive") => Policy::Predictive,
            Some(other) => {
                return Err(invalid(
                    "policy",
                    format!("`{other}` is not one of manual, reactive, predictive"),
                ));
            }
        };
        let metric = match raw.metric.as_deref() {
            None | Some("cpu") => LoadMetric::Cpu,
            Some("connections") => LoadMetric::Connections,
            Some("bandwidth") => LoadMetric::Bandwidth,
            Some(other) => {
                return Err(invalid(
                    "metric",
                    format!("`{other}` is not one of cpu, connections, bandwidth"),
                ));
            }
        };
        let capacity = raw.capacity.unwrap_or(1.0);
        if !capacity.is_finite() || capacity <= 0.0 || capacity > 1e15 {
            return Err(invalid(
                "capacity",
                format!("{capacity} is not a positive number up to 1e15"),
            ));
        }
        let history = raw.history.unwrap_or(64);
        if !(1..=10_000).contains(&history) {
            return Err(invalid("history", format!("{history} is not in 1..=10000")));
        }
        let defaults = NodeSettings::default();
        let max_tracked = raw.max_tracked.unwrap_or(defaults.max_tracked);
        if max_tracked > 1_000_000 {
            return Err(invalid(
                "max_tracked",
                format!("{max_tracked} is not in 0..=1000000"),
            ));
        }
        let node = NodeSettings {
            shadow: raw.shadow.enabled.unwrap_or(false),
            max_tracked,
            policy,
            metric,
            capacity,
            report_delay: millis(
                "report_delay_ms",
                raw.report_delay_ms,
                defaults.report_delay,
            )?,
            history,
            // The node sets its worker count when it starts the predictor.
            workers: defaults.workers,
        };

        let peer_names: Vec<&str> = tunnel
            .map(|t| t.peers.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default();
        let targets = raw.peers.unwrap_or_default();
        for (i, name) in targets.iter().enumerate() {
            if !peer_names.contains(&name.as_str()) {
                return Err(invalid(
                    &format!("peers[{i}]"),
                    format!("no [[peer]] named {name:?}"),
                ));
            }
        }
        if policy != Policy::Manual && peer_names.is_empty() {
            return Err(invalid(
                "policy",
                format!(
                    "`{policy}` moves connections to peers: it needs a [tunnel] with a [[peer]]"
                ),
            ));
        }

        let mut config = PredictConfig::default();
        config.interval = millis("interval_ms", raw.interval_ms, config.interval)?;
        let f = &mut config.forecast;
        let r = raw.forecast;
        f.alpha = r.alpha.unwrap_or(f.alpha);
        f.beta = r.beta.unwrap_or(f.beta);
        f.gamma = r.gamma.unwrap_or(f.gamma);
        f.season = r.season.unwrap_or(f.season);
        f.window = r.window.unwrap_or(f.window);
        f.min_history = r.min_history.unwrap_or(f.min_history);
        f.max_mape = r.max_mape.unwrap_or(f.max_mape);
        let r = raw.detect;
        config.detect.horizon = millis("detect.horizon_ms", r.horizon_ms, config.detect.horizon)?;
        let d = &mut config.detect;
        d.k = r.k.unwrap_or(d.k);
        d.floor = r.floor.unwrap_or(d.floor);
        d.ceiling = r.ceiling.unwrap_or(d.ceiling);
        d.history = r.history.unwrap_or(d.history);
        d.min_history = r.min_history.unwrap_or(d.min_history);
        d.imbalance_threshold = r.imbalance_threshold.unwrap_or(d.imbalance_threshold);
        d.confidence = r.confidence.unwrap_or(d.confidence);
        let r = raw.plan;
        let p = config.plan;
        config.plan.replan_interval = millis(
            "plan.replan_interval_ms",
            r.replan_interval_ms,
            p.replan_interval,
        )?;
        config.plan.cooldown = millis("plan.cooldown_ms", r.cooldown_ms, p.cooldown)?;
        config.plan.migration_cost.freeze = frac_millis(
            "plan.migration_cost.freeze_ms",
            r.migration_cost.freeze_ms,
            p.migration_cost.freeze,
        )?;
        config.plan.migration_cost.per_mib = frac_millis(
            "plan.migration_cost.per_mib_ms",
            r.migration_cost.per_mib_ms,
            p.migration_cost.per_mib,
        )?;
        let p = &mut config.plan;
        p.policy = policy;
        p.hysteresis = r.hysteresis.unwrap_or(p.hysteresis);
        p.max_moves = r.max_moves.unwrap_or(p.max_moves);
        p.reactive_threshold = r.reactive_threshold.unwrap_or(p.reactive_threshold);
        p.rtt_tolerance = r.rtt_tolerance.unwrap_or(p.rtt_tolerance);
        p.relay_cpu_s_per_gb = r.relay_cpu_s_per_gb.unwrap_or(p.relay_cpu_s_per_gb);
        p.direct_cpu_s_per_gb = r.direct_cpu_s_per_gb.unwrap_or(p.direct_cpu_s_per_gb);
        p.rebalance = r.rebalance.unwrap_or(p.rebalance);
        p.migration_cost.load = r.migration_cost.load.unwrap_or(p.migration_cost.load);
        let r = raw.shadow;
        let sh = &mut config.shadow;
        if let Some(steps) = r.steps {
            sh.steps = steps.try_into().map_err(|steps: Vec<f64>| {
                invalid(
                    "shadow.steps",
                    format!(
                        "{} fraction(s); give 4 (e.g. [0.05, 0.1, 0.25, 0.5])",
                        steps.len()
                    ),
                )
            })?;
        }
        sh.min_samples = r.min_samples.unwrap_or(sh.min_samples);
        sh.max_samples = sh.max_samples.max(sh.min_samples);
        sh.significance = r.significance.unwrap_or(sh.significance);
        sh.max_error_excess = r.max_error_excess.unwrap_or(sh.max_error_excess);
        sh.latency_margin = r.latency_margin_ms.unwrap_or(sh.latency_margin);
        config.shadow.backoff = millis("shadow.backoff_ms", r.backoff_ms, config.shadow.backoff)?;
        let r = raw.class;
        let enforce_classes = r.enforce.unwrap_or(false);
        if let Some(rates) = r.rate_limits {
            let rates: [u64; 4] = rates.try_into().map_err(|v: Vec<u64>| {
                invalid(
                    "class.rate_limits",
                    format!("{} value(s); give 4, micro to large (0: no limit)", v.len()),
                )
            })?;
            for (a, r) in config.class.allocations.iter_mut().zip(rates) {
                a.rate_limit = (r > 0).then_some(r);
            }
        }
        if let Some(budgets) = r.buffer_budgets {
            let budgets: [u32; 4] = budgets.try_into().map_err(|v: Vec<u32>| {
                invalid(
                    "class.buffer_budgets",
                    format!("{} value(s); give 4, micro to large", v.len()),
                )
            })?;
            for (i, b) in budgets.into_iter().enumerate() {
                if b < 1448 {
                    return Err(invalid(
                        "class.buffer_budgets",
                        format!("{b} is below one segment (1448 bytes)"),
                    ));
                }
                config.class.allocations[i].buffer_budget = b;
            }
        }
        if let Some(bounds) = r.bounds {
            config.class.bounds = bounds.try_into().map_err(|v: Vec<f64>| {
                invalid(
                    "class.bounds",
                    format!(
                        "{} value(s); give 3 increasing bytes/s (e.g. [1e3, 1e5, 1e7])",
                        v.len()
                    ),
                )
            })?;
        }
        let c = &mut config.class;
        c.margin = r.margin.unwrap_or(c.margin);
        c.max_segments = r.max_segments.unwrap_or(c.max_segments);
        c.split_bytes = r.split_bytes.unwrap_or(c.split_bytes);
        c.idle = millis("class.idle_ms", r.idle_ms, c.idle)?;
        let r = raw.lease;
        let l = config.lease;
        config.lease.min_lease = millis("lease.min_lease_ms", r.min_lease_ms, l.min_lease)?;
        config.lease.max_lease = millis("lease.max_lease_ms", r.max_lease_ms, l.max_lease)?;
        config.lease.default_lease = millis(
            "lease.default_lease_ms",
            r.default_lease_ms,
            l.default_lease,
        )?;
        config.lease.utilisation_threshold =
            r.utilisation_threshold.unwrap_or(l.utilisation_threshold);
        config.validate().map_err(|e| {
            // The core names settings as its fields; the file names durations `_ms`.
            let key = |field: &str| {
                let ms = [
                    "interval",
                    "detect.horizon",
                    "plan.replan_interval",
                    "plan.cooldown",
                    "plan.migration_cost.freeze",
                    "plan.migration_cost.per_mib",
                    "lease.min_lease",
                    "lease.max_lease",
                    "lease.default_lease",
                    "shadow.backoff",
                    "class.idle",
                ];
                // Already in milliseconds in the core (the node's latency unit).
                if field == "shadow.latency_margin" {
                    return "shadow.latency_margin_ms".to_owned();
                }
                if ms.contains(&field) {
                    format!("{field}_ms")
                } else {
                    field.to_owned()
                }
            };
            match e {
                CoreConfigError::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                } => {
                    let unit = if key(field).ends_with("_ms") {
                        " (seconds)"
                    } else {
                        ""
                    };
                    invalid(
                        &key(field),
                        format!("{value} is not in {min}..={max}{unit}"),
                    )
                }
                CoreConfigError::Order { low, high } => {
                    invalid(&key(low), format!("must not exceed predict.{}", key(high)))
                }
            }
        })?;
        Ok(PredictSection {
            node,
            config,
            targets,
            enforce_classes,
        })
    }

    fn tunnel(
        file: &Path,
        raw: Option<RawTunnel>,
        peers: Vec<RawPeer>,
    ) -> Result<Option<TunnelConfig>, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let Some(raw) = raw else {
            if !peers.is_empty() {
                return Err(invalid("peer", "[[peer]] needs a [tunnel] section".into()));
            }
            return Ok(None);
        };
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "tunnel.listen",
                format!("`{}` is not an address:port", raw.listen),
            )
        })?;
        let read_key = |key: &str, path: &Path| -> Result<String, ConfigError> {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(key, format!("cannot read key file {}: {e}", path.display()))
            })?;
            warn_if_readable_by_others(path);
            Ok(text.trim().to_owned())
        };
        let private_key =
            PrivateKey::from_base64(&read_key("tunnel.private_key_file", &raw.private_key_file)?)
                .map_err(|e| {
                invalid(
                    "tunnel.private_key_file",
                    format!(
                        "{}: not a base64 X25519 key ({e})",
                        raw.private_key_file.display()
                    ),
                )
            })?;
        let shared_psk = match &raw.preshared_key_file {
            None => None,
            Some(path) => Some(
                PresharedKey::from_base64(&read_key("tunnel.preshared_key_file", path)?).map_err(
                    |e| {
                        invalid(
                            "tunnel.preshared_key_file",
                            format!("{}: not a base64 key ({e})", path.display()),
                        )
                    },
                )?,
            ),
        };
        let own_public = private_key.public_key();
        let mut entries: Vec<PeerEntry> = Vec::new();
        for (i, p) in peers.into_iter().enumerate() {
            let key = |k: &str| format!("peer[{i}].{k}");
            if p.name.is_empty() || p.name.len() > 64 {
                return Err(invalid(&key("name"), "must be 1 to 64 characters".into()));
            }
            if entries.iter().any(|e| e.name == p.name) {
                return Err(invalid(
                    &key("name"),
                    format!("peer `{}` is configured twice", p.name),
                ));
            }
            let public_key = PublicKey::from_base64(p.public_key.trim()).map_err(|e| {
                invalid(&key("public_key"), format!("not a base64 X25519 key ({e})"))
            })?;
            if public_key == own_public {
                return Err(invalid(&key("public_key"), "is this node's own key".into()));
            }
            if entries.iter().any(|e| e.public_key == public_key) {
                return Err(invalid(
                    &key("public_key"),
                    "the same key is configured for two peers".into(),
                ));
            }
            let endpoint = match p.endpoint {
                None => None,
                Some(e) => Some(e.parse::<SocketAddr>().map_err(|_| {
                    invalid(&key("endpoint"), format!("`{e}` is not an address:port"))
                })?),
            };
            let preshared_key = match &p.preshared_key_file {
                None => shared_psk.clone(),
                Some(path) => Some(
                    PresharedKey::from_base64(&read_key(&key("preshared_key_file"), path)?)
                        .map_err(|e| {
                            invalid(
                                &key("preshared_key_file"),
                                format!("{}: not a base64 key ({e})", path.display()),
                            )
                        })?,
                ),
            };
            entries.push(PeerEntry {
                name: p.name,
                endpoint,
                public_key,
                preshared_key,
                direct_return: p.direct_return,
            });
        }
        let state_file = raw.state_file.unwrap_or_else(|| {
            let mut p = raw.private_key_file.clone().into_os_string();
            p.push(".state");
            PathBuf::from(p)
        });
        Ok(Some(TunnelConfig {
            listen,
            private_key,
            peers: entries,
            state_file,
            pack_datagrams: raw.pack_datagrams.unwrap_or(true),
        }))
    }

    /// The service on `port`, if one is configured.
    pub fn service(&self, port: u16) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.port == port)
    }
}

/// Secret key files should be readable by their owner only; say so when they are not (as
/// `wg` does), without refusing to start.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "key file is accessible by group or others; chmod 600 it"
        );
    }
}

/// The id of group `name` (or `name` itself, if it is a number).
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: all-zero is a valid `group` (null pointers, zero ids) for getgrnam_r to fill.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: a NUL-terminated name, a `group` to fill,
    // a buffer of the length given for its strings, and an out-pointer; getgrnam_r is the
    // thread-safe variant.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut group,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const EXAMPLE: &str = r#"
[node]
name = "a"
control_socket = "/run/flowshift/a.sock"
[tun]
name = "fs0"
mtu = 1500
service_addresses = ["198.19.255.1/32"]
[[service]]
port = 80
app = "http"
[[service]]
port = 7
app = "echo"
[[service]]
port = 9
app = "sink"
[[service]]
port = 19
app = "source"
[limits]
max_connections = 100000
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("node.toml"), text)
    }

    #[test]
    fn service_timeouts_default_per_app_and_can_be_set_or_turned_off() {
        let c = parse(EXAMPLE).unwrap();
        let http = c.service(80).unwrap();
        assert_eq!(
            http.idle_timeout,
            Some(smoltcp::time::Duration::from_secs(75))
        );
        assert_eq!(
            http.head_timeout,
            Some(smoltcp::time::Duration::from_secs(60))
        );
        assert_eq!(c.service(7).unwrap().idle_timeout, None);
        let text = EXAMPLE.replace(
            "port = 80\napp = \"http\"",
            "port = 80\napp = \"http\"\nidle_timeout_s = 0\nhead_timeout_s = 5",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.service(80).unwrap().idle_timeout, None);
        assert_eq!(
            c.service(80).unwrap().head_timeout,
            Some(smoltcp::time::Duration::from_secs(5))
        );
        let text = EXAMPLE.replace(
            "port = 7\napp = \"echo\"",
            "port = 7\napp = \"echo\"\nhead_timeout_s = 5",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("head_timeout_s"), "{e}");
    }

    #[test]
    fn emulated_work_is_off_by_default_and_bounded() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.service(80).unwrap().work_passes, 0);
        let with = |v: &str| {
            EXAMPLE.replace(
                "port = 80\napp = \"http\"",
                &format!("port = 80\napp = \"http\"\nwork_passes = {v}"),
            )
        };
        assert_eq!(
            parse(&with("40")).unwrap().service(80).unwrap().work_passes,
            40
        );
        for bad in ["1001", "-1"] {
            let e = parse(&with(bad)).unwrap_err().to_string();
            assert!(e.contains("work_passes"), "{bad}: {e}");
        }
    }

    #[test]
    fn control_group_is_a_name_or_a_number() {
        let with = |g: &str| {
            EXAMPLE.replace(
                "control_socket = \"/run/flowshift/a.sock\"",
                &format!("control_socket = \"/run/flowshift/a.sock\"\ncontrol_group = \"{g}\""),
            )
        };
        assert_eq!(parse(EXAMPLE).unwrap().node.control_group, None);
        assert_eq!(parse(&with("root")).unwrap().node.control_group, Some(0));
        assert_eq!(parse(&with("4242")).unwrap().node.control_group, Some(4242));
        let e = parse(&with("no-such-group-here")).unwrap_err().to_string();
        assert!(
            e.contains("node.control_group") && e.contains("no-such-group-here"),
            "{e}"
        );
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.node.name, "a");
        assert_eq!(c.tun.mtu, 1500);
        assert_eq!(c.tun.service_addresses[0].to_string(), "198.19.255.1/32");
        assert_eq!(c.services.len(), 4);
        assert_eq!(c.service(19).unwrap().app, AppKind::Source);
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.max_half_open, DEFAULT_MAX_HALF_OPEN);
        assert!(c.node.workers >= 1);
    }

    #[test]
    fn a_prefix_routes_its_network() {
        let c: Ipv4Cidr = "198.19.255.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(198, 19, 255, 0));
        let c: Ipv4Cidr = "198.19.255.1/32".parse().unwrap();
        assert_eq!(c.network(), c.addr);
        let c: Ipv4Cidr = "198.19.255.1/0".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = EXAMPLE.replace("mtu = 1500", "mtu = 1500\nmut = 3");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("node.toml"), "{e}");
        assert!(e.contains("mut"), "{e}");
    }

    #[test]
    fn bad_values_name_file_and_key() {
        let cases = [
            (
                EXAMPLE.replace("port = 80", "port = 70000"),
                "service[0].port",
            ),
            (
                EXAMPLE.replace("port = 7\n", "port = 80\n"),
                "service[1].port",
            ),
            (EXAMPLE.replace("\"echo\"", "\"ehco\""), "service[1].app"),
            (
                EXAMPLE.replace("198.19.255.1/32", "198.19.255.1/33"),
                "tun.service_addresses[0]",
            ),
            (
                EXAMPLE.replace("name = \"fs0\"", "name = \"a-very-long-ifname\""),
                "tun.name",
            ),
            (EXAMPLE.replace("mtu = 1500", "mtu = 100"), "tun.mtu"),
            (
                EXAMPLE.replace("max_connections = 100000", "max_connections = 0"),
                "limits.max_connections",
            ),
            (
                format!("{EXAMPLE}\n[metrics]\nlisten = \"nope\"\n"),
                "metrics.listen",
            ),
            (
                EXAMPLE.replace(
                    "[\"198.19.255.1/32\"]",
                    "[\"198.19.255.1/32\", \"198.19.255.1/24\"]",
                ),
                "tun.service_addresses[1]",
            ),
            (
                EXAMPLE.replace(
                    "max_connections = 100000",
                    "max_connections = 1\nfrozen_queue_packets = 0",
                ),
                "limits.frozen_queue_packets",
            ),
            (
                EXAMPLE.replace("max_connections = 100000", "max_half_open = 0"),
                "limits.max_half_open",
            ),
            (
                EXAMPLE.replace(
                    "name = \"a\"",
                    "name = \"a\"\nshutdown_timeout_ms = 18446744073709551615",
                ),
                "node.shutdown_timeout_ms",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("node.toml: key `"), "{e}");
            assert!(e.contains(&format!("`{key}`")), "expected {key}: {e}");
        }
    }

    #[test]
    fn send_buffer_growth_defaults_follow_the_buffer_and_is_bounded() {
        let tcp = |extra: &str| parse(&format!("{EXAMPLE}\n[tcp]\n{extra}\n")).map(|c| c.tcp);
        let d = tcp("").unwrap();
        assert_eq!((d.tx_buffer, d.tx_buffer_max), (256 << 10, 1 << 20));
        assert_eq!(d.tx_grow_budget, 64 << 20);
        // A send buffer set beyond the default growth: no growth.
        let big = tcp("tx_buffer = 4194304").unwrap();
        assert_eq!(big.tx_buffer_max, 4 << 20);
        // Off, explicitly.
        let off = tcp("tx_buffer_max = 262144").unwrap();
        assert_eq!(off.tx_buffer_max, off.tx_buffer);
        let set = tcp("tx_buffer_max = 8388608\ntx_grow_budget = 0").unwrap();
        assert_eq!((set.tx_buffer_max, set.tx_grow_budget), (8 << 20, 0));
        for bad in ["tx_buffer_max = 131072", "tx_buffer_max = 33554432"] {
            let e = tcp(bad).unwrap_err().to_string();
            assert!(e.contains("`tcp.tx_buffer_max`"), "{bad}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_a_parse_error() {
        let e = parse(&EXAMPLE.replace("mtu = 1500", "mtu = \"big\"")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(e.to_string().contains("mtu"), "{e}");
    }

    fn key_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fs-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn tunnel_config(extra: &str) -> (String, String) {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let a = PrivateKey::generate(&mut rng);
        let b = PrivateKey::generate(&mut rng);
        let dir = key_dir();
        let key_path = dir.join("a.key");
        // Tests run in parallel and share the file: write it whole, then rename it into
        // place, so that no test ever reads it half-written (empty).
        let tmp = dir.join(format!("a.key.{:?}", std::thread::current().id()));
        std::fs::write(&tmp, format!("{}\n", a.to_base64())).unwrap();
        std::fs::rename(&tmp, &key_path).unwrap();
        let text = format!(
            "{EXAMPLE}\n[tunnel]\nlisten = \"198.18.2.2:51871\"\nprivate_key_file = \"{}\"\n[[peer]]\nname = \"b\"\nendpoint = \"198.18.3.2:51871\"\npublic_key = \"{}\"\n{extra}",
            key_path.display(),
            b.public_key().to_base64()
        );
        (text, b.public_key().to_base64())
    }

    #[test]
    fn tunnel_and_peers_parse() {
        let (text, b_pub) = tunnel_config("");
        let c = parse(&text).unwrap();
        let t = c.tunnel.unwrap();
        assert_eq!(t.listen.to_string(), "198.18.2.2:51871");
        assert_eq!(t.peers.len(), 1);
        assert_eq!(t.peers[0].name, "b");
        assert_eq!(t.peers[0].public_key.to_base64(), b_pub);
        assert!(t.pack_datagrams, "packing is on by default");
        assert!(parse(EXAMPLE).unwrap().tunnel.is_none());
        let off = text.replacen("[tunnel]\n", "[tunnel]\npack_datagrams = false\n", 1);
        assert!(!parse(&off).unwrap().tunnel.unwrap().pack_datagrams);
        let wrong = text.replacen("[tunnel]\n", "[tunnel]\npack_datagrams = 1\n", 1);
        assert!(parse(&wrong).is_err());
    }

    #[test]
    fn bad_tunnel_settings_name_file_and_key() {
        let (text, b_pub) = tunnel_config("");
        let cases = [
            (text.replace("198.18.2.2:51871", "nowhere"), "tunnel.listen"),
            (
                text.replace("a.key", "missing.key"),
                "tunnel.private_key_file",
            ),
            (text.replace(&b_pub, "not-base64!"), "peer[0].public_key"),
            (
                text.replace("198.18.3.2:51871", "198.18.3.2"),
                "peer[0].endpoint",
            ),
            (
                tunnel_config(&format!(
                    "[[peer]]\nname = \"b\"\npublic_key = \"{b_pub}\"\n"
                ))
                .0,
                "peer[1].name",
            ),
            (
                tunnel_config(&format!(
                    "[[peer]]\nname = \"c\"\npublic_key = \"{b_pub}\"\n"
                ))
                .0,
                "peer[1].public_key",
            ),
            (
                format!("{EXAMPLE}\n[[peer]]\nname = \"b\"\npublic_key = \"{b_pub}\"\n"),
                "peer",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("node.toml: key `"), "{e}");
            assert!(e.contains(&format!("`{key}`")), "expected {key}: {e}");
        }
        // A key file with garbage names the file.
        let dir = key_dir();
        std::fs::write(dir.join("bad.key"), "garbage").unwrap();
        let e = parse(&text.replace("a.key", "bad.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.key"), "{e}");
    }

    #[test]
    fn predict_defaults_to_manual_and_reads_every_section() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.predict.node.policy, Policy::Manual);
        assert_eq!(c.predict.node.metric, LoadMetric::Cpu);
        let mut expected = PredictConfig::default();
        expected.plan.policy = Policy::Manual;
        assert_eq!(c.predict.config, expected);

        let (text, _) = tunnel_config(
            "[predict]\npolicy = \"predictive\"\nmetric = \"connections\"\ncapacity = 10\n\
             peers = [\"b\"]\ninterval_ms = 50\n[predict.forecast]\nbeta = 0.1\n\
             [predict.detect]\nhorizon_ms = 3000\nceiling = 0.8\nconfidence = 1.5\n[predict.plan]\n\
             replan_interval_ms = 500\nmax_moves = 2\nrelay_cpu_s_per_gb = 0.5\ndirect_cpu_s_per_gb = 0.25\nrebalance = true\n[predict.plan.migration_cost]\nfreeze_ms = 0.5\n\
             [predict.lease]\nmin_lease_ms = 2000\ndefault_lease_ms = 10000\n\
             [predict.shadow]\nenabled = true\nsteps = [0.2, 0.4, 0.6, 0.8]\n\
             [predict.class]\nbounds = [2e3, 2e5, 2e7]\nmargin = 0.1\nmax_segments = 8\n\
             split_bytes = 65536\nidle_ms = 2500\n",
        );
        let p = parse(&text).unwrap().predict;
        assert_eq!(p.node.policy, Policy::Predictive);
        assert_eq!(p.node.metric, LoadMetric::Connections);
        assert_eq!(p.node.capacity, 10.0);
        assert_eq!(p.targets, ["b"]);
        assert_eq!(p.config.interval, Duration::from_millis(50));
        assert_eq!(p.config.forecast.beta, 0.1);
        assert_eq!(p.config.detect.horizon, Duration::from_millis(3000));
        assert_eq!(p.config.detect.ceiling, 0.8);
        assert_eq!(p.config.detect.confidence, 1.5);
        assert_eq!(p.config.plan.policy, Policy::Predictive);
        assert_eq!(p.config.plan.replan_interval, Duration::from_millis(500));
        assert_eq!(p.config.plan.max_moves, 2);
        assert_eq!(p.config.plan.relay_cpu_s_per_gb, 0.5);
        assert_eq!(p.config.plan.direct_cpu_s_per_gb, 0.25);
        assert!(p.config.plan.rebalance);
        assert_eq!(
            p.config.plan.migration_cost.freeze,
            Duration::from_micros(500)
        );
        assert_eq!(p.config.lease.min_lease, Duration::from_secs(2));
        assert_eq!(p.config.lease.default_lease, Duration::from_secs(10));
        assert_eq!(p.config.lease.max_lease, Duration::from_secs(300));
        assert!(p.node.shadow);
        assert_eq!(p.config.shadow.steps, [0.2, 0.4, 0.6, 0.8]);
        assert_eq!(p.config.class.bounds, [2e3, 2e5, 2e7]);
        assert_eq!(p.config.class.margin, 0.1);
        assert_eq!(p.config.class.max_segments, 8);
        assert_eq!(p.config.class.split_bytes, 65536);
        assert_eq!(p.config.class.idle, Duration::from_millis(2500));
    }

    #[test]
    fn bad_predict_settings_name_the_key() {
        let cases = [
            ("policy = \"eager\"", "predict.policy"),
            ("metric = \"disk\"", "predict.metric"),
            ("capacity = 0", "predict.capacity"),
            ("capacity = nan", "predict.capacity"),
            ("capacity = -inf", "predict.capacity"),
            ("peers = [\"c\"]", "predict.peers[0]"),
            ("interval_ms = 0", "predict.interval_ms"),
            ("interval_ms = 18446744073709551615", "predict.interval_ms"),
            ("history = 0", "predict.history"),
            ("max_tracked = 1000001", "predict.max_tracked"),
            ("[predict.forecast]\nalpha = 2.0", "predict.forecast.alpha"),
            ("[predict.forecast]\nalpha = nan", "predict.forecast.alpha"),
            ("[predict.detect]\nhorizon_ms = 10", "predict.interval_ms"),
            ("[predict.detect]\nfloor = 0.9", "predict.detect.floor"),
            (
                "[predict.detect]\nconfidence = -1",
                "predict.detect.confidence",
            ),
            (
                "[predict.detect]\nconfidence = nan",
                "predict.detect.confidence",
            ),
            ("[predict.plan]\nmax_moves = 0", "predict.plan.max_moves"),
            (
                "[predict.lease]\nmin_lease_ms = 0",
                "predict.lease.min_lease_ms",
            ),
            (
                "[predict.lease]\nmin_lease_ms = 9000\nmax_lease_ms = 8000",
                "predict.lease.min_lease_ms",
            ),
            (
                "[predict.lease]\nutilisation_threshold = 0",
                "predict.lease.utilisation_threshold",
            ),
            (
                "[predict.plan]\nreplan_interval_ms = 0",
                "predict.plan.replan_interval_ms",
            ),
            (
                "[predict.plan.migration_cost]\nfreeze_ms = -1",
                "predict.plan.migration_cost.freeze_ms",
            ),
            (
                "[predict.plan.migration_cost]\nload = inf",
                "predict.plan.migration_cost.load",
            ),
            (
                "[predict.class]\nbounds = [1e3, 1e5]",
                "predict.class.bounds",
            ),
            (
                "[predict.class]\nbounds = [1e5, 1e3, 1e7]",
                "predict.class.bounds[i]",
            ),
            ("[predict.class]\nmargin = 1.5", "predict.class.margin"),
            (
                "[predict.plan]\nrelay_cpu_s_per_gb = -1",
                "predict.plan.relay_cpu_s_per_gb",
            ),
            (
                "[predict.plan]\ndirect_cpu_s_per_gb = nan",
                "predict.plan.direct_cpu_s_per_gb",
            ),
            (
                "[predict.class]\nmax_segments = 1",
                "predict.class.max_segments",
            ),
            (
                "[predict.class]\nsplit_bytes = 0",
                "predict.class.split_bytes",
            ),
            (
                "[predict.class]\nidle_ms = 86400001",
                "predict.class.idle_ms",
            ),
        ];
        for (extra, key) in cases {
            let (text, _) = tunnel_config(&format!("[predict]\n{extra}\n"));
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "expected {key}: {e}");
        }
        // A policy that moves needs somewhere to move to.
        let e = parse(&format!("{EXAMPLE}\n[predict]\npolicy = \"reactive\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`predict.policy`"), "{e}");
        // Unknown keys are named.
        let e = parse(&format!("{EXAMPLE}\n[predict]\npolcy = \"manual\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("polcy"), "{e}");
    }

    #[test]
    fn missing_file_names_it() {
        let e = Config::load(Path::new("/nonexistent/flowshift.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/flowshift.toml"), "{e}");
    }
}
