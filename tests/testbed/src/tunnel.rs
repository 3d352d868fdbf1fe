//! Tunnel configuration for testbed nodes: keys from the flowshift binary, `[tunnel]` and
//! `[[peer]]` sections, and a ready pair of nodes joined by the tunnel.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::node::{NodeConfig, NodeHandle, flowshift_bin};
use crate::testbed::{Node, Testbed, TestbedError};

/// UDP port the testbed's tunnels listen on.
pub const TUNNEL_PORT: u16 = 51871;

/// A tunnel key pair, base64 (`flowshift genkey | flowshift pubkey`).
#[derive(Debug, Clone)]
pub struct TunnelKeys {
    /// Private key.
    pub private: String,
    /// Public key.
    pub public: String,
}

impl TunnelKeys {
    /// A fresh pair made by the flowshift binary under test.
    pub fn generate() -> Result<Self, TestbedError> {
        let bin = flowshift_bin()?;
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| TestbedError::Io { what, source }
        };
        let out = Command::new(&bin)
            .arg("genkey")
            .output()
            .map_err(io("flowshift genkey"))?;
        let private = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || private.is_empty() {
            return Err(TestbedError::Command {
                command: "flowshift genkey".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut child = Command::new(&bin)
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("flowshift pubkey"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(format!("{private}\n").as_bytes())
                .map_err(io("flowshift pubkey stdin"))?;
        }
        let out = child.wait_with_output().map_err(io("flowshift pubkey"))?;
        let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || public.is_empty() {
            return Err(TestbedError::Command {
                command: "flowshift pubkey".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(Self { private, public })
    }
}

/// Config sections for node `me` (key `keys`) with one peer `peer`, known by `peer_public`:
/// the private key is written, mode 0600, into the testbed's directory.
pub fn tunnel_toml(
    tb: &Testbed,
    me: Node,
    keys: &TunnelKeys,
    peer: Node,
    peer_public: &str,
) -> Result<String, TestbedError> {
    tunnel_toml_peers(tb, me, keys, &[(peer, peer_public)])
}

/// Like [`tunnel_toml`], with several peers.
pub fn tunnel_toml_peers(
    tb: &Testbed,
    me: Node,
    keys: &TunnelKeys,
    peers: &[(Node, &str)],
) -> Result<String, TestbedError> {
    let path = tb.dir().join(format!("{}.key", me.short()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{}\n", keys.private).as_bytes()))
        .map_err(|source| TestbedError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    let mut toml = format!(
        "[tunnel]\nlisten = \"{}:{TUNNEL_PORT}\"\nprivate_key_file = \"{}\"\n",
        me.addr(),
        path.display(),
    );
    for (peer, public) in peers {
        toml += &format!(
            "[[peer]]\nname = \"{}\"\nendpoint = \"{}:{TUNNEL_PORT}\"\npublic_key = \"{public}\"\n",
            peer.short(),
            peer.addr(),
        );
    }
    Ok(toml)
}

/// Starts nodes A, B and C (standard services), each joined by the tunnel to the other two.
/// The testbed needs [`TestbedOptions::node_c`](crate::TestbedOptions::node_c). Does not
/// wait for the handshakes: see [`wait_alive`].
pub fn start_tunnel_trio(tb: &Testbed) -> Result<[NodeHandle; 3], TestbedError> {
    let nodes = [Node::A, Node::B, Node::C];
    let keys = [
        TunnelKeys::generate()?,
        TunnelKeys::generate()?,
        TunnelKeys::generate()?,
    ];
    let mut handles = Vec::new();
    for (i, me) in nodes.iter().enumerate() {
        let peers: Vec<(Node, &str)> = nodes
            .iter()
            .zip(&keys)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (n, k))| (*n, k.public.as_str()))
            .collect();
        let config =
            NodeConfig::standard(me.short()).extra(&tunnel_toml_peers(tb, *me, &keys[i], &peers)?);
        handles.push(tb.start_node(*me, &config)?);
    }
    let [a, b, c]: [NodeHandle; 3] = handles
        .try_into()
        .map_err(|_| TestbedError::Tool("three nodes".into()))?;
    Ok([a, b, c])
}

/// Starts node A and node B (standard services) joined by the tunnel. `b_knows_a_as`
/// overrides the public key B is configured with for A (to test a wrong key). Does not wait
/// for the handshake: see [`wait_alive`].
pub fn start_tunnel_pair(
    tb: &Testbed,
    b_knows_a_as: Option<&str>,
) -> Result<(NodeHandle, NodeHandle), TestbedError> {
    let ka = TunnelKeys::generate()?;
    let kb = TunnelKeys::generate()?;
    let a_at_b = b_knows_a_as.unwrap_or(&ka.public);
    let a = NodeConfig::standard("a").extra(&tunnel_toml(tb, Node::A, &ka, Node::B, &kb.public)?);
    let b = NodeConfig::standard("b").extra(&tunnel_toml(tb, Node::B, &kb, Node::A, a_at_b)?);
    let a = tb.start_node(Node::A, &a)?;
    let b = tb.start_node(Node::B, &b)?;
    Ok((a, b))
}

/// Starts node A and node B from `a` and `b` joined by the tunnel; with `b_direct_return`,
/// B replies to the clients of connections moved to it straight out of its own TUN device
/// (`direct_return` on its peer entry for A). Does not wait for the handshake.
pub fn start_tunnel_pair_with(
    tb: &Testbed,
    a: NodeConfig,
    b: NodeConfig,
    b_direct_return: bool,
) -> Result<(NodeHandle, NodeHandle), TestbedError> {
    start_tunnel_pair_returning(tb, a, b, false, b_direct_return)
}

/// [`start_tunnel_pair_with`], with `direct_return` also on A's peer entry for B when
/// `a_direct_return`: what A's planner reads to know that B returns the replies of
/// connections A moves there directly (the two entries agree, as docs/prediction.md asks).
pub fn start_tunnel_pair_returning(
    tb: &Testbed,
    a: NodeConfig,
    b: NodeConfig,
    a_direct_return: bool,
    b_direct_return: bool,
) -> Result<(NodeHandle, NodeHandle), TestbedError> {
    let ka = TunnelKeys::generate()?;
    let kb = TunnelKeys::generate()?;
    // The peer table is the last one written: a flag appended lands in it.
    let with_flag = |mut toml: String, on: bool| {
        if on {
            toml += "direct_return = true\n";
        }
        toml
    };
    let a = a.extra(&with_flag(
        tunnel_toml(tb, Node::A, &ka, Node::B, &kb.public)?,
        a_direct_return,
    ));
    let b = b.extra(&with_flag(
        tunnel_toml(tb, Node::B, &kb, Node::A, &ka.public)?,
        b_direct_return,
    ));
    let a = tb.start_node(Node::A, &a)?;
    let b = tb.start_node(Node::B, &b)?;
    Ok((a, b))
}

/// `ctl peers --json` row for `name` on `node`.
pub fn peer(node: &NodeHandle, name: &str) -> Result<serde_json::Value, TestbedError> {
    let peers = node.ctl_json(&["peers"])?;
    peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
        .ok_or_else(|| TestbedError::Node {
            node: node.name().to_owned(),
            reason: format!("no peer {name} in {peers}"),
            log: node.log(),
        })
}

/// Waits until `a` and `b` each report the other alive.
pub fn wait_alive(a: &NodeHandle, b: &NodeHandle, timeout: Duration) -> Result<(), TestbedError> {
    let deadline = Instant::now() + timeout;
    loop {
        if peer(a, b.name())?["liveness"] == "alive" && peer(b, a.name())?["liveness"] == "alive" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestbedError::Node {
                node: a.name().to_owned(),
                reason: format!(
                    "the tunnel to {} did not come up within {timeout:?}; {}'s log:\n{}",
                    b.name(),
                    b.name(),
                    b.log()
                ),
                log: a.log(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
