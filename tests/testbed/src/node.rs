//! Running flowshift nodes in the testbed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::testbed::{Node, Testbed, TestbedError, wait_timeout};

/// A node config for tests, rendered to the TOML the node reads.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    name: String,
    mtu: u16,
    offload: bool,
    workers: Option<usize>,
    pin_workers: Option<bool>,
    max_connections: usize,
    tcp_buffers: Option<usize>,
    loss_probes: Option<bool>,
    direct_receive: Option<bool>,
    tx_buffer_max: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    metrics_listen: Option<String>,
    services: Vec<(u16, &'static str, Option<u64>)>,
    extra: String,
}

impl NodeConfig {
    /// Node `name` with the standard services: http on 80, echo on 7, sink on 9, source on 19
    /// (forever), service address 198.19.255.1/32, TUN `fs0`, MTU 1500, offload on (the node's
    /// defaults).
    pub fn standard(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            mtu: 1500,
            offload: true,
            workers: None,
            pin_workers: None,
            max_connections: 100_000,
            tcp_buffers: None,
            loss_probes: None,
            direct_receive: None,
            tx_buffer_max: None,
            shutdown_timeout_ms: None,
            metrics_listen: None,
            services: vec![
                (80, "http", None),
                (7, "echo", None),
                (9, "sink", None),
                (19, "source", None),
            ],
            extra: String::new(),
        }
    }

    /// TUN MTU.
    pub fn mtu(mut self, mtu: u16) -> Self {
        self.mtu = mtu;
        self
    }

    /// TUN offload.
    pub fn offload(mut self, on: bool) -> Self {
        self.offload = on;
        self
    }

    /// Worker threads.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// `node.pin_workers`.
    pub fn pin_workers(mut self, on: bool) -> Self {
        self.pin_workers = Some(on);
        self
    }

    /// `limits.max_connections`.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Both socket buffers, bytes.
    pub fn tcp_buffers(mut self, bytes: usize) -> Self {
        self.tcp_buffers = Some(bytes);
        self
    }

    /// `tcp.loss_probes`.
    pub fn loss_probes(mut self, on: bool) -> Self {
        self.loss_probes = Some(on);
        self
    }

    /// `tcp.direct_receive`.
    pub fn direct_receive(mut self, on: bool) -> Self {
        self.direct_receive = Some(on);
        self
    }

    /// `tcp.tx_buffer_max` (the send buffer a download it limits grows to; the send
    /// buffer's size: never grown).
    pub fn tx_buffer_max(mut self, bytes: usize) -> Self {
        self.tx_buffer_max = Some(bytes);
        self
    }

    /// `node.shutdown_timeout_ms`.
    pub fn shutdown_timeout_ms(mut self, ms: u64) -> Self {
        self.shutdown_timeout_ms = Some(ms);
        self
    }

    /// Serve `/metrics` over HTTP on `addr` (inside the node namespace).
    pub fn metrics_listen(mut self, addr: &str) -> Self {
        self.metrics_listen = Some(addr.to_owned());
        self
    }

    /// Adds a `source` service on `port` that sends `bytes` then FIN.
    pub fn source_bytes(mut self, port: u16, bytes: u64) -> Self {
        self.services.push((port, "source", Some(bytes)));
        self
    }

    /// Appends raw TOML (for sections this builder does not know).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders the TOML, with the control socket at `control_socket`.
    pub fn to_toml(&self, control_socket: &Path) -> String {
        let mut s = format!(
            "[node]\nname = \"{}\"\ncontrol_socket = \"{}\"\n",
            self.name,
            control_socket.display()
        );
        if let Some(w) = self.workers {
            s += &format!("workers = {w}\n");
        }
        if let Some(p) = self.pin_workers {
            s += &format!("pin_workers = {p}\n");
        }
        if let Some(ms) = self.shutdown_timeout_ms {
            s += &format!("shutdown_timeout_ms = {ms}\n");
        }
        s += &format!(
            "[tun]\nname = \"fs0\"\nmtu = {}\nservice_addresses = [\"198.19.255.1/32\"]\noffload = {}\n",
            self.mtu, self.offload
        );
        for (port, app, bytes) in &self.services {
            s += &format!("[[service]]\nport = {port}\napp = \"{app}\"\n");
            if let Some(b) = bytes {
                s += &format!("bytes = {b}\n");
            }
        }
        s += &format!("[limits]\nmax_connections = {}\n", self.max_connections);
        if self.tcp_buffers.is_some()
            || self.loss_probes.is_some()
            || self.direct_receive.is_some()
            || self.tx_buffer_max.is_some()
        {
            s += "[tcp]\n";
        }
        if let Some(b) = self.tcp_buffers {
            s += &format!("rx_buffer = {b}\ntx_buffer = {b}\n");
        }
        if let Some(on) = self.loss_probes {
            s += &format!("loss_probes = {on}\n");
        }
        if let Some(on) = self.direct_receive {
            s += &format!("direct_receive = {on}\n");
        }
        if let Some(b) = self.tx_buffer_max {
            s += &format!("tx_buffer_max = {b}\n");
        }
        if let Some(m) = &self.metrics_listen {
            s += &format!("[metrics]\nlisten = \"{m}\"\n");
        }
        s += &self.extra;
        s
    }
}

/// The flowshift binary: `FLOWSHIFT_BIN`, else the workspace's release build, else its debug build.
pub fn flowshift_bin() -> Result<PathBuf, TestbedError> {
    if let Some(p) = std::env::var_os("FLOWSHIFT_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(TestbedError::Tool(format!(
            "FLOWSHIFT_BIN={} does not exist",
            p.display()
        )));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")).to_path_buf()
        });
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("flowshift");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(TestbedError::Tool(
        "no flowshift binary: build it first (cargo build --release -p flowshift) or set FLOWSHIFT_BIN".into(),
    ))
}

/// A running node. Dropping it kills the node if it still runs.
#[derive(Debug)]
pub struct NodeHandle {
    name: String,
    child: Option<Child>,
    bin: PathBuf,
    control_socket: PathBuf,
    log: PathBuf,
    config_path: PathBuf,
}

impl NodeHandle {
    pub(crate) fn start(
        tb: &Testbed,
        node: Node,
        config: &NodeConfig,
    ) -> Result<NodeHandle, TestbedError> {
        let bin = flowshift_bin()?;
        let name = config.name().to_owned();
        let control_socket = tb.dir().join(format!("{name}.sock"));
        let config_path = tb.dir().join(format!("{name}.toml"));
        let log = tb.dir().join(format!("{name}.log"));
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| TestbedError::Io { what, source }
        };
        std::fs::write(&config_path, config.to_toml(&control_socket))
            .map_err(io("writing node config"))?;
        let log_file = File::create(&log).map_err(io("creating node log"))?;
        let mut cmd = tb.node(node).command(bin.to_str().unwrap_or("flowshift"));
        cmd.args(["node", "--config"])
            .arg(&config_path)
            .env(
                "FLOWSHIFT_LOG",
                std::env::var("FLOWSHIFT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io("node log"))?)
            .stderr(log_file);
        let child = tb.spawn(cmd)?;
        let mut h = NodeHandle {
            name,
            child: Some(child),
            bin,
            control_socket,
            log,
            config_path,
        };
        h.wait_ready(Duration::from_secs(15))?;
        Ok(h)
    }

    fn fail(&self, reason: impl Into<String>) -> TestbedError {
        TestbedError::Node {
            node: self.name.clone(),
            reason: reason.into(),
            log: self.log(),
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.fail(format!("exited during startup with {status}")));
            }
            if self.control_socket.exists() && self.ctl(&["status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.fail("control socket did not answer within the startup timeout"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's name (`[node] name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its control socket.
    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `flowshift ctl --socket … args…` and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, TestbedError> {
        let out = Command::new(&self.bin)
            .arg("ctl")
            .arg("--socket")
            .arg(&self.control_socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| TestbedError::Io {
                what: "running flowshift ctl".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(TestbedError::Command {
                command: format!("flowshift ctl {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `flowshift ctl --json args…` and parses the reply.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value, TestbedError> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ctl(&all)?;
        serde_json::from_str(&text)
            .map_err(|e| self.fail(format!("ctl {args:?} printed non-JSON: {e}: {text}")))
    }

    /// Sends one control request (a JSON object such as `{"cmd":"status"}`) on the node's
    /// control socket from this process, as an orchestrator would, and returns the reply's
    /// `result`. Unlike [`ctl`](Self::ctl) it starts no process: what it costs the machine is
    /// the request alone.
    pub fn request(&self, request: &serde_json::Value) -> Result<serde_json::Value, TestbedError> {
        use std::io::{BufRead, BufReader, Write};
        let io = |what: &str, source| TestbedError::Io {
            what: format!("control request {request} to node {}: {what}", self.name),
            source,
        };
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control_socket)
            .map_err(|e| io("connect", e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| io("timeout", e))?;
        let mut line = request.to_string();
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| io("write", e))?;
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .map_err(|e| io("read", e))?;
        let mut reply: serde_json::Value = serde_json::from_str(&reply).map_err(|e| {
            self.fail(format!(
                "control reply to {request} is not JSON: {e}: {reply}"
            ))
        })?;
        if reply["ok"].as_bool() != Some(true) {
            return Err(TestbedError::Command {
                command: format!("control request {request}"),
                stderr: reply["error"]
                    .as_str()
                    .unwrap_or("no error given")
                    .to_owned(),
            });
        }
        Ok(reply["result"].take())
    }

    /// Sends SIGTERM and waits (up to 20 s) for the node to exit.
    pub fn terminate(mut self) -> Result<ExitStatus, TestbedError> {
        let Some(mut child) = self.child.take() else {
            return Err(self.fail("already stopped"));
        };
        // SAFETY: kill(2) on the node this handle started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        match wait_timeout(&mut child, Duration::from_secs(20)) {
            Ok(Some(status)) => Ok(status),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(self.fail("did not exit within 20 s of SIGTERM"))
            }
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
