//! Node configuration: a TOML file, parsed strictly.
//!
//! Unknown keys are rejected, and every error names the file, the key and what is wrong, so an
//! operator never has to guess which line of a config the node disliked.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::app::{AppConfig, AppKind};

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
}

/// `[node]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name, shown in logs and status.
    pub name: String,
    /// Path of the control socket (a Unix socket).
    pub control_socket: PathBuf,
    /// Worker threads, each with its own TUN queue and stack. Default: number of cores.
    pub workers: usize,
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

/// An IPv4 prefix, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, `0..=32`.
    pub prefix_len: u8,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("`{len}` is not a prefix length 0..=32"))?;
        Ok(Self { addr, prefix_len })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One `[[service]]`: a port and the app behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// TCP port on every service address.
    pub port: u16,
    /// The app serving it.
    pub app: AppKind,
    /// App settings.
    pub app_config: AppConfig,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Connections open at once, over all workers; further SYNs are refused with RST.
    pub max_connections: usize,
    /// Packets held per frozen flow before further ones are dropped (and counted).
    pub frozen_queue_packets: usize,
}

/// `[tcp]`: per-connection buffer sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Receive buffer per connection, bytes. It sets the advertised window and the window scale.
    pub rx_buffer: usize,
    /// Send buffer per connection, bytes (the send mirror has the same size).
    pub tx_buffer: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            rx_buffer: 64 * 1024,
            tx_buffer: 64 * 1024,
        }
    }
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control_socket: PathBuf,
    workers: Option<usize>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    frozen_queue_packets: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    rx_buffer: Option<usize>,
    tx_buffer: Option<usize>,
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
        if raw.tun.service_addresses.len() > crate::stack::MAX_SERVICE_ADDRESSES {
            return Err(invalid(
                "tun.service_addresses",
                format!("at most {} addresses", crate::stack::MAX_SERVICE_ADDRESSES),
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
            services.push(ServiceConfig {
                port,
                app,
                app_config: AppConfig { bytes: s.bytes },
            });
        }

        let limits = LimitsConfig {
            max_connections: raw.limits.max_connections.unwrap_or(100_000),
            frozen_queue_packets: raw.limits.frozen_queue_packets.unwrap_or(1024),
        };
        if limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1".into(),
            ));
        }

        let defaults = TcpConfig::default();
        let tcp = TcpConfig {
            rx_buffer: raw.tcp.rx_buffer.unwrap_or(defaults.rx_buffer),
            tx_buffer: raw.tcp.tx_buffer.unwrap_or(defaults.tx_buffer),
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

        let metrics_listen = match raw.metrics {
            None => None,
            Some(m) => Some(m.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!("`{}` is not an address:port", m.listen),
                )
            })?),
        };

        Ok(Config {
            node: NodeConfig {
                name: raw.node.name,
                control_socket: raw.node.control_socket,
                workers,
                shutdown_timeout_ms: raw.node.shutdown_timeout_ms.unwrap_or(5_000),
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

    /// The service on `port`, if one is configured.
    pub fn service(&self, port: u16) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.port == port)
    }
}

#[cfg(test)]
mod tests {
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
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.node.name, "a");
        assert_eq!(c.tun.mtu, 1500);
        assert_eq!(c.tun.service_addresses[0].to_string(), "198.19.255.1/32");
        assert_eq!(c.services.len(), 4);
        assert_eq!(c.service(19).unwrap().app, AppKind::Source);
        assert_eq!(c.limits.max_connections, 100_000);
        assert!(c.node.workers >= 1);
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
        ];
        for (text, key) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("node.toml: key `"), "{e}");
            assert!(e.contains(&format!("`{key}`")), "expected {key}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_a_parse_error() {
        let e = parse(&EXAMPLE.replace("mtu = 1500", "mtu = \"big\"")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(e.to_string().contains("mtu"), "{e}");
    }

    #[test]
    fn missing_file_names_it() {
        let e = Config::load(Path::new("/nonexistent/flowshift.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/flowshift.toml"), "{e}");
    }
}
