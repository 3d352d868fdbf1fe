//! The settings a [`Stack`](crate::stack::Stack) is built from that also appear in the node's
//! config file: service addresses, services and socket buffer sizes.

use std::net::Ipv4Addr;

use crate::app::{AppConfig, AppKind};

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

impl Ipv4Cidr {
    /// The network address: `addr` with its host bits cleared (what the route points at).
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) & mask)
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
    /// A connection that moved no byte either way for this long, between requests (the
    /// app quiescent, nothing unsent), is closed gracefully: as nginx's `keepalive_timeout`.
    /// `None`: never (long-lived connections are what flowshift is for).
    pub idle_timeout: Option<smoltcp::time::Duration>,
    /// A request head must be complete this long after its first byte arrived, or the
    /// connection is closed: as nginx's `client_header_timeout` (apps with request heads).
    pub head_timeout: Option<smoltcp::time::Duration>,
    /// TCP keepalive: after this long without a packet from the client, a probe goes out, and
    /// again every as long; a client silent for [`KEEPALIVE_PROBES`] + 1 intervals is dead and
    /// its connection reset. `None`: off.
    pub keepalive: Option<smoltcp::time::Duration>,
    /// Emulated application work: the node makes this many CRC-32 passes over every byte the
    /// app takes from the client or gives it, as an app that computes on its data would (TLS,
    /// compression, a real server's logic). The built-in apps cost next to nothing per byte,
    /// less than forwarding it, so under the `cpu` load metric moving one of their
    /// connections relieves no node: this makes connections whose serving costs CPU, for
    /// tests and benchmarks of the predictor. 0 (the default): none. Each node applies its
    /// own service's setting, also to connections moved to it.
    pub work_passes: u32,
}

/// Most [`ServiceConfig::work_passes`]: a pass costs about 0.04 CPU s per GB on the
/// project's machines (crc32fast with PCLMULQDQ, docs/architecture.md).
pub const MAX_WORK_PASSES: u32 = 1000;

/// Keepalive probes a client may leave unanswered before its connection is reset.
pub const KEEPALIVE_PROBES: u32 = 3;

impl ServiceConfig {
    /// `app` on `port` with `app_config` and the app's default timeouts: for `http` 75 s
    /// idle between requests and 60 s for a request head (nginx's defaults); none for the
    /// others. Keepalive every 60 s for all: a dead client's connection goes after 4 minutes.
    pub fn new(port: u16, app: AppKind, app_config: AppConfig) -> Self {
        let http = app == AppKind::Http;
        Self {
            port,
            app,
            app_config,
            idle_timeout: http.then(|| smoltcp::time::Duration::from_secs(75)),
            head_timeout: http.then(|| smoltcp::time::Duration::from_secs(60)),
            keepalive: Some(smoltcp::time::Duration::from_secs(60)),
            work_passes: 0,
        }
    }
}

/// `passes` CRC-32 passes over `data` ([`ServiceConfig::work_passes`], at most
/// [`MAX_WORK_PASSES`]): work whose result is kept from the optimiser, and otherwise unused.
pub fn emulate_work(passes: u32, data: &[u8]) {
    let mut crc = 0;
    for _ in 0..passes.min(MAX_WORK_PASSES) {
        let mut h = crc32fast::Hasher::new_with_initial(crc);
        h.update(data);
        crc = std::hint::black_box(h.finalize());
    }
}

/// `[tcp]`: per-connection buffer sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Receive buffer per connection, bytes. It sets the advertised window and the window scale.
    pub rx_buffer: usize,
    /// Send buffer per connection, bytes (the send mirror has the same size).
    pub tx_buffer: usize,
    /// Probe a lost tail within about two round trips instead of after smoltcp's 1 s
    /// minimum timeout ([`crate::probe`]). Default on.
    pub loss_probes: bool,
    /// Let the app take an in-order payload straight from the packet instead of through
    /// smoltcp's receive ring (one copy of the client's bytes less; `stack/direct.rs`).
    /// Default on.
    pub direct_receive: bool,
    /// Send buffer a download limited by its send buffer grows to, bytes (`stack/grow.rs`);
    /// `tx_buffer` or less: never grown.
    pub tx_buffer_max: usize,
    /// Bytes of growth (beyond `tx_buffer`) this stack's connections may hold at once.
    pub tx_grow_budget: usize,
}

/// Default socket buffer, each way: 256 KiB. One send buffer per round trip is the most a
/// download can have in flight (smoltcp sends no more than its buffer holds); at the ~85 µs
/// round trip of a TUN path on one machine, 64 KiB caps a flow at 6.2 Gbit/s, 256 KiB lets it
/// reach the kernel's pace (docs/benchmarks.md). Only the pages written are resident, and an
/// idle connection's buffers are given back (parking), so the size costs idle connections
/// nothing.
pub const DEFAULT_SOCKET_BUFFER: usize = 256 * 1024;

/// Default size a send-buffer-limited download's send buffer grows to: 1 MiB.
pub const DEFAULT_TX_BUFFER_MAX: usize = 1 << 20;

/// Default growth budget of a stack: 64 MiB (85 grown connections at the default sizes).
pub const DEFAULT_TX_GROW_BUDGET: usize = 64 << 20;

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            rx_buffer: DEFAULT_SOCKET_BUFFER,
            tx_buffer: DEFAULT_SOCKET_BUFFER,
            loss_probes: true,
            direct_receive: true,
            tx_buffer_max: DEFAULT_TX_BUFFER_MAX,
            tx_grow_budget: DEFAULT_TX_GROW_BUDGET,
        }
    }
}
