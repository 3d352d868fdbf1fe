//! A network-namespace testbed: client, router and nodes, as DESIGN.md lays them out.
//!
//! ```text
//! client 198.18.1.2 ── 198.18.1.1 router 198.18.2.1 ── 198.18.2.2 node-a
//!                                        198.18.3.1 ── 198.18.3.2 node-b
//!                                        198.18.4.1 ── 198.18.4.2 node-c (optional)
//! ```
//! The router sends the service address 198.19.255.1 to node A. Everything is created inside
//! namespaces with a per-run unique prefix (nothing in the default namespace changes) and removed
//! on drop — also when a test panics — and namespaces left by a killed run are removed at the next
//! start.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::node::{NodeConfig, NodeHandle};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// Node A's own address.
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// Node B's own address.
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// Node C's own address.
pub const NODE_C: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 2);
/// The service address every node serves on its TUN device.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

/// Prefix of every namespace a testbed creates.
const PREFIX: &str = "fst";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What tearing down each live testbed of this process takes, for [`teardown_all`].
static LIVE: Mutex<Vec<Teardown>> = Mutex::new(Vec::new());

/// A testbed's processes, namespaces and directory.
#[derive(Debug, Clone)]
struct Teardown {
    prefix: String,
    namespaces: Vec<Netns>,
    tracked: Tracked,
    dir: PathBuf,
}

impl Teardown {
    /// Stops what the testbed started (and anything else in its namespaces), removes the
    /// namespaces and the directory. Safe to run twice.
    fn run(&self) {
        let pids: Vec<u32> =
            std::mem::take(&mut *self.tracked.0.lock().unwrap_or_else(|e| e.into_inner()));
        stop_pids(&pids);
        // Anything else still running inside our namespaces was started by this testbed.
        let inside: Vec<u32> = self.namespaces.iter().flat_map(|n| n.pids()).collect();
        stop_pids(&inside);
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns.name()]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, tears down every live testbed of this
/// process ([`teardown_all`]) and exits with 128 + the signal's number. For long-running
/// users (benchmarks, the demo): an operator who interrupts one gets the machine back as it
/// was.
pub fn teardown_on_signals() -> Result<(), TestbedError> {
    let io = |what: &str, source| TestbedError::Io {
        what: what.into(),
        source,
    };
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
            .map_err(|e| io("installing the signal handlers", e))?;
    std::thread::Builder::new()
        .name("fs-teardown".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!(
                    "signal {signal}: stopping the testbed's processes and removing its namespaces"
                );
                teardown_all();
                std::process::exit(128 + signal);
            }
        })
        .map_err(|e| io("starting the signal thread", e))?;
    Ok(())
}

/// Tears down every testbed this process still has: for a signal handler (SIGINT, SIGTERM)
/// of a long-running user such as a benchmark or the demo, which then exits — a killed
/// process runs no `Drop`, and its namespaces and node processes would outlive it.
pub fn teardown_all() {
    let all = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for t in &all {
        t.run();
    }
}

/// A veth's `gso_max_segs` as created.
const GSO_MAX_SEGS_DEFAULT: u32 = 65535;

/// Errors of the testbed. `Debug` shows the message (what `expect` prints in a test).
#[derive(thiserror::Error)]
pub enum TestbedError {
    /// Not root.
    #[error(
        "the flowshift testbed needs root (CAP_NET_ADMIN) to create network namespaces and TUN devices; run as root"
    )]
    NotRoot,
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Spawning or talking to a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: io::Error,
    },
    /// A node did not come up or go down as expected.
    #[error("node {node}: {reason}\n--- node log ---\n{log}")]
    Node {
        /// Node name.
        node: String,
        /// What went wrong.
        reason: String,
        /// The node's log.
        log: String,
    },
    /// A tool is missing and could not be installed.
    #[error("{0}")]
    Tool(String),
}

impl std::fmt::Debug for TestbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Fails with [`TestbedError::NotRoot`] unless running as root.
pub fn require_root() -> Result<(), TestbedError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(TestbedError::NotRoot);
    }
    Ok(())
}

/// Runs `program args…` and fails with its stderr unless it exits 0.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, TestbedError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Io {
            what: format!("running {program}"),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Its name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String, TestbedError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `program args…` in the namespace and returns its stdout; fails unless it exits 0.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, TestbedError> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has joined this namespace, so kernel sockets it creates live
    /// there. Threads `f` spawns inherit the namespace.
    ///
    /// # Panics
    /// If the namespace cannot be joined, or `f` panics.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
                // SAFETY: `file` is an open namespace file; setns only changes this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn pids(&self) -> Vec<u32> {
        run("ip", &["netns", "pids", &self.name])
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Which node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// node-a, 198.18.2.2.
    A,
    /// node-b, 198.18.3.2.
    B,
    /// node-c, 198.18.4.2 (only with [`TestbedOptions::node_c`]).
    C,
}

impl Node {
    /// The node's own address.
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Node::A => NODE_A,
            Node::B => NODE_B,
            Node::C => NODE_C,
        }
    }

    /// Its short name: `a`, `b` or `c`.
    pub fn short(self) -> &'static str {
        match self {
            Node::A => "a",
            Node::B => "b",
            Node::C => "c",
        }
    }
}

/// How to build a testbed.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// MTU of every veth link.
    pub mtu: u16,
    /// Also create node-c.
    pub node_c: bool,
    /// Stop every process of the testbed once it has existed this long, so that a test stuck
    /// on a peer that never answers fails (its reads end) instead of hanging the suite.
    /// `None` for long-running users (the demo, benchmarks).
    pub watchdog: Option<Duration>,
}

/// The default [`TestbedOptions::watchdog`]: far beyond any test's normal run time.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(600);

impl Default for TestbedOptions {
    fn default() -> Self {
        Self {
            mtu: 1500,
            node_c: false,
            watchdog: Some(DEFAULT_WATCHDOG),
        }
    }
}

/// Processes the testbed started, for teardown.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tracked(Arc<Mutex<Vec<u32>>>);

impl Tracked {
    pub(crate) fn add(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }
}

/// A running testbed. Dropping it stops what it started and removes its namespaces.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    client: Netns,
    router: Netns,
    nodes: Vec<(Node, Netns)>,
    dir: PathBuf,
    tracked: Tracked,
    watchdog: Option<Watchdog>,
}

/// Stops a testbed's processes when its deadline passes (see [`TestbedOptions::watchdog`]).
#[derive(Debug)]
struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(prefix: String, namespaces: Vec<Netns>, tracked: Tracked, after: Duration) -> Self {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = done.clone();
        let thread = std::thread::spawn(move || {
            let (lock, cv) = &*d;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (_guard, wait) = cv
                .wait_timeout_while(guard, after, |done| !*done)
                .unwrap_or_else(|e| e.into_inner());
            if !wait.timed_out() {
                return;
            }
            eprintln!(
                "testbed {prefix}: watchdog: still running after {} s; stopping its processes so the test fails instead of hanging",
                after.as_secs()
            );
            let pids = tracked.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
            stop_pids(&pids);
            let inside: Vec<u32> = namespaces.iter().flat_map(|n| n.pids()).collect();
            stop_pids(&inside);
        });
        Watchdog {
            done,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Testbed {
    /// Builds the namespaces, links, addresses and routes.
    pub fn new(options: TestbedOptions) -> Result<Testbed, TestbedError> {
        require_root()?;
        remove_stale();
        let prefix = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).map_err(|source| TestbedError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let ns = |role: &str| Netns {
            name: format!("{prefix}-{role}"),
        };
        let mut node_list = vec![(Node::A, ns("a")), (Node::B, ns("b"))];
        if options.node_c {
            node_list.push((Node::C, ns("c")));
        }
        // Build the value first so a failure half-way still tears down what exists.
        let mut tb = Testbed {
            prefix: prefix.clone(),
            client: ns("client"),
            router: ns("router"),
            nodes: node_list,
            dir,
            tracked: Tracked::default(),
            watchdog: None,
        };
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tb.teardown());
        if let Some(after) = options.watchdog {
            let namespaces = tb.all().cloned().collect();
            tb.watchdog = Some(Watchdog::start(
                prefix,
                namespaces,
                tb.tracked.clone(),
                after,
            ));
        }
        tb.build(&options)?;
        Ok(tb)
    }

    fn teardown(&self) -> Teardown {
        Teardown {
            prefix: self.prefix.clone(),
            namespaces: self.all().cloned().collect(),
            tracked: self.tracked.clone(),
            dir: self.dir.clone(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.router]
            .into_iter()
            .chain(self.nodes.iter().map(|(_, n)| n))
    }

    fn build(&self, o: &TestbedOptions) -> Result<(), TestbedError> {
        let mtu = o.mtu.to_string();
        for ns in self.all() {
            run("ip", &["netns", "add", ns.name()])?;
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        let router = self.router.name();
        // client eth0 <-> router c0
        self.client.ip(&[
            "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "c0", "mtu", &mtu,
            "netns", router,
        ])?;
        self.client
            .ip(&["addr", "add", "198.18.1.2/24", "dev", "eth0"])?;
        self.client.ip(&["link", "set", "eth0", "up"])?;
        self.router
            .ip(&["addr", "add", "198.18.1.1/24", "dev", "c0"])?;
        self.router.ip(&["link", "set", "c0", "up"])?;
        self.client
            .ip(&["route", "add", "default", "via", "198.18.1.1"])?;
        for (node, ns) in &self.nodes {
            let n = match node {
                Node::A => 2,
                Node::B => 3,
                Node::C => 4,
            };
            let port = format!("n{}", node.short());
            let (router_addr, node_addr, len) = if *node == Node::C {
                (format!("198.18.{n}.1"), format!("198.18.{n}.2"), 30)
            } else {
                (format!("198.18.{n}.1"), format!("198.18.{n}.2"), 24)
            };
            ns.ip(&[
                "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", &port, "mtu",
                &mtu, "netns", router,
            ])?;
            ns.ip(&["addr", "add", &format!("{node_addr}/{len}"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &router_addr])?;
            self.router
                .ip(&["addr", "add", &format!("{router_addr}/{len}"), "dev", &port])?;
            self.router.ip(&["link", "set", &port, "up"])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        }
        self.router.sysctl("net.ipv4.ip_forward", "1")?;
        self.router.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        self.route_service_to(Node::A)
    }

    /// The per-run prefix of this testbed's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A scratch directory removed with the testbed (configs, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The router namespace.
    pub fn router(&self) -> &Netns {
        &self.router
    }

    /// A node's namespace.
    ///
    /// # Panics
    /// If the testbed has no such node (node-c without [`TestbedOptions::node_c`]).
    pub fn node(&self, node: Node) -> &Netns {
        &self
            .nodes
            .iter()
            .find(|(n, _)| *n == node)
            .expect("node not in this testbed")
            .1
    }

    /// node-a's namespace.
    pub fn node_a(&self) -> &Netns {
        self.node(Node::A)
    }

    /// node-b's namespace.
    pub fn node_b(&self) -> &Netns {
        self.node(Node::B)
    }

    /// Every namespace name of this testbed.
    pub fn namespace_names(&self) -> Vec<String> {
        self.all().map(|n| n.name.clone()).collect()
    }

    /// Points the router's route for the service address at `node`.
    pub fn route_service_to(&self, node: Node) -> Result<(), TestbedError> {
        self.router
            .ip(&[
                "route",
                "replace",
                &format!("{SERVICE_ADDR}/32"),
                "via",
                &node.addr().to_string(),
            ])
            .map(|_| ())
    }

    /// Drops `percent` % of the packets the router forwards, at random (nftables).
    ///
    /// The loss is per packet on the wire: every namespace's link to the router is limited
    /// to one segment per GSO packet (`gso_max_segs 1`) while loss is on, so the kernel cuts
    /// TCP TSO and UDP GSO batches before they reach the router. Otherwise one drop there
    /// would take a whole batch (tens of packets) at once: bursts, not random loss.
    pub fn set_router_loss(&self, percent: u8) -> Result<(), TestbedError> {
        self.set_router_loss_matching(percent, &[])
    }

    /// Like [`set_router_loss`](Self::set_router_loss), for the forwarded packets that match
    /// the nft expression `matching` only (e.g. `["udp", "dport", "51871"]`: the tunnel).
    pub fn set_router_loss_matching(
        &self,
        percent: u8,
        matching: &[&str],
    ) -> Result<(), TestbedError> {
        self.clear_router_loss();
        self.set_gso_max_segs(1)?;
        let n = percent.to_string();
        self.router
            .exec("nft", &["add", "table", "inet", "fst_loss"])?;
        self.router.exec(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                "fst_loss",
                "forward",
                "{ type filter hook forward priority 0; policy accept; }",
            ],
        )?;
        let mut rule = vec!["add", "rule", "inet", "fst_loss", "forward"];
        rule.extend_from_slice(matching);
        rule.extend_from_slice(&["numgen", "random", "mod", "100", "<", &n, "counter", "drop"]);
        self.router.exec("nft", &rule).map(|_| ())
    }

    /// Removes the loss rule and restores the links' GSO batches.
    pub fn clear_router_loss(&self) {
        let _ = self
            .router
            .exec("nft", &["delete", "table", "inet", "fst_loss"]);
        let _ = self.set_gso_max_segs(GSO_MAX_SEGS_DEFAULT);
    }

    /// Sets `gso_max_segs` on the router-facing link of the client and of every node, and
    /// with one segment also `gso_max_size` to one packet: a GSO packet that a TUN device
    /// wrote (flowshift with offload on) does not say how many segments it holds when the
    /// kernel checks `gso_max_segs`, and would cross the router whole; its size is known.
    fn set_gso_max_segs(&self, segs: u32) -> Result<(), TestbedError> {
        let size = if segs == 1 { "1600" } else { "65536" };
        let segs = segs.to_string();
        for ns in std::iter::once(&self.client).chain(self.nodes.iter().map(|(_, n)| n)) {
            ns.ip(&[
                "link",
                "set",
                "eth0",
                "gso_max_segs",
                &segs,
                "gso_max_size",
                size,
            ])?;
        }
        Ok(())
    }

    /// Packets the loss rule has dropped so far.
    pub fn router_loss_drops(&self) -> Result<u64, TestbedError> {
        let text = self
            .router
            .exec("nft", &["list", "table", "inet", "fst_loss"])?;
        let mut it = text.split_whitespace();
        while let Some(w) = it.next() {
            if w == "packets" {
                return Ok(it.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            }
        }
        Ok(0)
    }

    /// Starts `command` (built with [`Netns::command`]) and tracks it for teardown.
    pub fn spawn(&self, mut command: Command) -> Result<Child, TestbedError> {
        let child = command.spawn().map_err(|source| TestbedError::Io {
            what: format!("spawning {command:?}"),
            source,
        })?;
        self.tracked.add(child.id());
        Ok(child)
    }

    /// Starts a flowshift node in `node`'s namespace with `config`, and waits until its control
    /// socket answers.
    pub fn start_node(&self, node: Node, config: &NodeConfig) -> Result<NodeHandle, TestbedError> {
        NodeHandle::start(self, node, config)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            w.stop();
        }
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| t.prefix != self.prefix);
        self.teardown().run();
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// SIGTERM, up to 3 s of grace, then SIGKILL.
pub(crate) fn stop_pids(pids: &[u32]) {
    let live: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &live {
        // SAFETY: plain kill(2) on a pid this testbed started.
        unsafe { libc::kill(p as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for &p in &live {
        while alive(p) && Instant::now() < deadline {
            reap(p);
            std::thread::sleep(Duration::from_millis(10));
        }
        if alive(p) {
            // SAFETY: as above.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        reap(p);
    }
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on our own child; harmless if it is not our child.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

/// Removes namespaces left by testbeds of processes that no longer run.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let ns = Netns { name: name.clone() };
        stop_pids(&ns.pids());
        let _ = run("ip", &["netns", "del", &name]);
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(
                rest.split('-')
                    .next()
                    .map(|p| format!("{PREFIX}{p}"))
                    .unwrap_or_default(),
            ),
        );
        eprintln!("testbed: removed stale namespace {name}");
    }
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks that every tool is on PATH, installing the Debian package of a missing one.
pub fn ensure_tools(tools: &[&str]) -> Result<(), TestbedError> {
    let package = |t: &str| {
        match t {
            "nft" => "nftables",
            "ip" => "iproute2",
            "wg" => "wireguard-tools",
            other => other,
        }
        .to_owned()
    };
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| package(t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Installing needs root as much as the tests do: say that, not apt-get's complaint.
    require_root()?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(missing.iter().map(String::as_str));
    if run("apt-get", &args).is_err() {
        let _ = run("apt-get", &["update", "-qq"]);
        run("apt-get", &args)
            .map_err(|e| TestbedError::Tool(format!("cannot install {missing:?}: {e}")))?;
    }
    Ok(())
}

/// The path of `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}
