//! Userspace WireGuard (wireguard-go, boringtun) between node-a and node-b: the anchors the
//! tunnel and migration benchmarks compare flowshift's tunnel with.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use flowshift_testbed::testbed::{NODE_A, NODE_B};
use flowshift_testbed::{Netns, Testbed};

/// `<tool> genkey | <tool> pubkey` (flowshift and wg print the same key format).
pub(crate) fn keypair_with(bin: &std::path::Path) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(bin).arg("genkey").output()?;
    ensure!(out.status.success(), "{} genkey failed", bin.display());
    let private = String::from_utf8(out.stdout)?.trim().to_owned();
    let mut child = std::process::Command::new(bin)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("stdin")?,
        format!("{private}\n").as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "{} pubkey failed", bin.display());
    Ok((private, String::from_utf8(out.stdout)?.trim().to_owned()))
}

/// A wireguard-go process: stopped with SIGTERM (so it removes its interface and UAPI socket),
/// killed if it lingers; the socket file is removed either way.
struct Wg {
    child: Child,
    uapi: String,
}

impl Drop for Wg {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process this benchmark started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.uapi);
    }
}

/// One end of the wireguard-go tunnel.
struct WgSide<'a> {
    ns: &'a Netns,
    ifname: String,
    key_path: String,
    public: String,
    /// Outer address (its node's).
    outer: std::net::Ipv4Addr,
    /// Address inside the tunnel.
    inner: &'static str,
    /// UDP port both ends listen on.
    port: u16,
    /// More networks the peer may send from, routed into the tunnel here.
    extra: &'a [&'a str],
}

/// A userspace WireGuard implementation driven through the UAPI socket with `wg`.
#[derive(Debug, Clone)]
pub(crate) enum Userspace {
    /// Debian's `wireguard-go`.
    WireguardGo,
    /// Cloudflare's boringtun (`boringtun-cli`, Rust), at this path.
    Boringtun(std::path::PathBuf),
}

/// Starts wireguard-go for `me`, configured with `wg` to talk to `peer`.
fn wireguard(
    tb: &Testbed,
    imp: &Userspace,
    me: &WgSide<'_>,
    peer: &WgSide<'_>,
) -> anyhow::Result<Wg> {
    let mut cmd = match imp {
        Userspace::WireguardGo => {
            let mut c = me.ns.command("wireguard-go");
            c.args(["-f", &me.ifname]);
            c
        }
        Userspace::Boringtun(bin) => {
            let mut c = me.ns.command(bin.to_str().context("boringtun path")?);
            // As root it would drop to `nobody`, and then `wg` could not reach its socket.
            c.args(["--foreground", "--disable-drop-privileges", &me.ifname]);
            c
        }
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let child = tb.spawn(cmd)?;
    let sock = format!("/var/run/wireguard/{}.sock", me.ifname);
    let wg = Wg {
        child,
        uapi: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&sock).exists() {
        ensure!(
            Instant::now() < deadline,
            "wireguard-go did not create {sock}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    me.ns.exec(
        "wg",
        &[
            "set",
            &me.ifname,
            "private-key",
            &me.key_path,
            "listen-port",
            &me.port.to_string(),
            "peer",
            &peer.public,
            "endpoint",
            &format!("{}:{}", peer.outer, peer.port),
            "allowed-ips",
            &std::iter::once(format!("{}/32", peer.inner))
                .chain(me.extra.iter().map(|n| (*n).to_owned()))
                .collect::<Vec<_>>()
                .join(","),
        ],
    )?;
    me.ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", me.inner),
        "dev",
        &me.ifname,
    ])?;
    me.ns.ip(&["link", "set", &me.ifname, "up"])?;
    for net in me.extra {
        me.ns.ip(&["route", "add", net, "dev", &me.ifname])?;
    }
    Ok(wg)
}

/// Node B's address inside the wireguard-go tunnel.
pub(crate) const WG_INNER_B: &str = "198.19.1.2";
/// Node B's address inside the boringtun tunnel.
pub(crate) const BT_INNER_B: &str = "198.19.2.2";

/// A userspace WireGuard running in both node namespaces, joined.
pub(crate) struct WireguardPair {
    a: Wg,
    b: Wg,
}

impl WireguardPair {
    pub(crate) fn start(tb: &Testbed, imp: &Userspace) -> anyhow::Result<Self> {
        Self::start_routing(tb, imp, [&[], &[]])
    }

    /// As [`Self::start`], each side also accepting (and routing into the tunnel) the
    /// networks in `extra[side]` (side 0 is node-a): what the other side may send from.
    pub(crate) fn start_routing(
        tb: &Testbed,
        imp: &Userspace,
        extra: [&[&str]; 2],
    ) -> anyhow::Result<Self> {
        // UAPI sockets live in the shared /var/run/wireguard: names unique per run.
        let tag = std::process::id() % 100_000;
        let (prefix, inner_a, inner_b, port) = match imp {
            Userspace::WireguardGo => ("wgfs", "198.19.1.1", WG_INNER_B, 51820),
            Userspace::Boringtun(_) => ("btfs", "198.19.2.1", BT_INNER_B, 51821),
        };
        let mut sides = Vec::new();
        for (ns, end, outer, inner) in [
            (tb.node_a(), "a", NODE_A, inner_a),
            (tb.node_b(), "b", NODE_B, inner_b),
        ] {
            let (private, public) = keypair_with(std::path::Path::new("wg"))?;
            let key = tb.dir().join(format!("{prefix}{end}.key"));
            std::fs::write(&key, format!("{private}\n"))?;
            sides.push(WgSide {
                ns,
                ifname: format!("{prefix}{tag}{end}"),
                key_path: key.display().to_string(),
                public,
                outer,
                inner,
                port,
                extra: extra[sides.len()],
            });
        }
        let a = wireguard(tb, imp, &sides[0], &sides[1])?;
        let b = wireguard(tb, imp, &sides[1], &sides[0])?;
        Ok(Self { a, b })
    }

    pub(crate) fn pids(&self) -> [u32; 2] {
        [self.a.child.id(), self.b.child.id()]
    }
}

/// `boringtun-cli`: on PATH, or in ~/.cargo/bin, or installed there now with `cargo install`
/// (crates.io; a few minutes on 2 cores).
pub(crate) fn boringtun_bin() -> anyhow::Result<std::path::PathBuf> {
    const BIN: &str = "boringtun-cli";
    if let Some(p) = flowshift_testbed::testbed::which(BIN) {
        return Ok(p);
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cargo_bin = std::path::Path::new(&home).join(".cargo/bin").join(BIN);
    if cargo_bin.is_file() {
        return Ok(cargo_bin);
    }
    eprintln!("installing boringtun-cli with `cargo install --locked boringtun-cli`");
    let status = std::process::Command::new("cargo")
        .args(["install", "--locked", BIN])
        .status()
        .context("running cargo install boringtun-cli")?;
    ensure!(
        status.success(),
        "cargo install boringtun-cli failed: {status}"
    );
    ensure!(
        cargo_bin.is_file(),
        "cargo install did not leave {}",
        cargo_bin.display()
    );
    Ok(cargo_bin)
}
