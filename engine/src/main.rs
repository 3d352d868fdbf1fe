//! The `flowshift` command: run a node, talk to one, or run the demo.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use flowshift::config::Config;
use flowshift::control::{self, Request};
use flowshift::tunnel::migrate::{ConnOutcome, MigrateReport};
use flowshift_core::stack::ConnInfo;

mod demo;

/// Large blocks (socket buffers, send mirrors) in mappings of their own, not resident until
/// written: see [`flowshift::alloc`].
#[global_allocator]
static ALLOC: flowshift::alloc::NodeAlloc = flowshift::alloc::NodeAlloc;

/// Userspace TCP migration engine.
#[derive(Parser)]
#[command(name = "flowshift", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: terminate TCP on a TUN device and serve the configured apps.
    Node {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Ask a running node something through its control socket.
    Ctl {
        /// The node's control socket.
        #[arg(long, short)]
        socket: PathBuf,
        /// Print the raw JSON reply instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        what: CtlCommand,
    },
    /// Print a new private key for the tunnel (base64, like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Print a new pre-shared key for the tunnel (32 random bytes, base64, like `wg genpsk`).
    Genpsk,
    /// Build a namespace testbed with two nodes, move a running download from one to the
    /// other and back while the client reads, verify every byte, tear it all down.
    Demo {
        /// Bytes to download.
        #[arg(long, default_value_t = 1_500_000_000)]
        bytes: u64,
    },
}

/// A connection id: hexadecimal with `0x` (as `ctl conns` prints it) or decimal.
fn parse_id(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not a connection id (0x… or decimal)"))
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Node summary.
    Status,
    /// Every live connection (TIME-WAIT ones are counted in `status`).
    Conns {
        /// Also list connections in TIME-WAIT.
        #[arg(long)]
        all: bool,
    },
    /// Prometheus text exposition.
    Metrics,
    /// Freeze a connection (its packets are queued).
    Freeze {
        /// Connection id, as `conns` shows it (`0x…`) or in decimal.
        #[arg(value_parser = parse_id)]
        id: u64,
    },
    /// Thaw a frozen connection.
    Thaw {
        /// Connection id, as `conns` shows it (`0x…`) or in decimal.
        #[arg(value_parser = parse_id)]
        id: u64,
    },
    /// Tunnel peers: handshake age, RTT, loss, bytes, liveness, last load report.
    Peers,
    /// The predictor: utilisation now and predicted, threshold, the current plan with the
    /// reason of each move, the policy, and the last decisions.
    Plan,
    /// Move live connections to a peer node; the clients keep their connections.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["conn", "port", "count", "all"])))]
    Migrate {
        /// The target peer (its name in `[[peer]]`).
        #[arg(long)]
        to: String,
        /// Connection ids, as `conns` shows them (`0x…`) or in decimal.
        #[arg(long, value_parser = parse_id, num_args = 1..)]
        conn: Vec<u64>,
        /// Every connection to this service port.
        #[arg(long)]
        port: Option<u16>,
        /// The first N connections that can move.
        #[arg(long)]
        count: Option<usize>,
        /// Every connection that can move.
        #[arg(long)]
        all: bool,
    },
    /// Refuse new connections and move every connection to a peer; says when the node is
    /// empty.
    Drain {
        /// The target peer.
        #[arg(long)]
        to: String,
    },
    /// Send N bytes of the counting stream to a peer over the tunnel (for tests and benchmarks).
    TunnelSend {
        /// Peer name.
        peer: String,
        /// Bytes to send.
        bytes: u64,
        /// As datagrams instead of reliable messages.
        #[arg(long)]
        datagram: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWSHIFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Node { config, check } => {
            let config = Config::load(&config)?;
            if check {
                println!("config ok: node {}", config.node.name);
                return Ok(());
            }
            flowshift::node::run(config)?;
            Ok(())
        }
        Command::Ctl { socket, json, what } => ctl(&socket, json, what),
        Command::Demo { bytes } => demo::run(bytes),
        Command::Genkey => {
            use rand_core::SeedableRng;
            let mut rng = rand_chacha::ChaCha20Rng::from_seed(flowshift::node::os_random_seed()?);
            println!(
                "{}",
                flowshift_tunnel::PrivateKey::generate(&mut rng).to_base64()
            );
            Ok(())
        }
        Command::Genpsk => {
            use rand_core::SeedableRng;
            let mut rng = rand_chacha::ChaCha20Rng::from_seed(flowshift::node::os_random_seed()?);
            println!(
                "{}",
                flowshift_tunnel::PresharedKey::generate(&mut rng).to_base64()
            );
            Ok(())
        }
        Command::Pubkey => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let key = flowshift_tunnel::PrivateKey::from_base64(line.trim())
                .map_err(|e| anyhow::anyhow!("stdin is not a base64 private key: {e}"))?;
            println!("{}", key.public_key().to_base64());
            Ok(())
        }
    }
}

fn ctl(socket: &std::path::Path, json: bool, what: CtlCommand) -> anyhow::Result<()> {
    let request = match what {
        CtlCommand::Status => Request::Status,
        CtlCommand::Conns { all } => Request::Conns { all },
        CtlCommand::Metrics => Request::Metrics,
        CtlCommand::Freeze { id } => Request::Freeze { id },
        CtlCommand::Thaw { id } => Request::Thaw { id },
        CtlCommand::Peers => Request::Peers,
        CtlCommand::Plan => Request::Plan,
        CtlCommand::Migrate {
            to,
            conn,
            port,
            count,
            all,
        } => Request::Migrate {
            to,
            conns: conn,
            port,
            count,
            all,
        },
        CtlCommand::Drain { to } => Request::Drain { to },
        CtlCommand::TunnelSend {
            peer,
            bytes,
            datagram,
        } => Request::TunnelSend {
            peer,
            bytes,
            channel: Some(if datagram { "datagram" } else { "reliable" }.to_owned()),
        },
    };
    let reply = control::call(socket, &request).with_context(|| {
        format!(
            "is a node running with control socket {}?",
            socket.display()
        )
    })?;
    if !reply.ok {
        bail!("node answered: {}", reply.error.unwrap_or_default());
    }
    let result = reply.result.unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&result)?)?;
        return Ok(());
    }
    match request {
        Request::Metrics => write!(out, "{}", result.as_str().unwrap_or_default())?,
        Request::Conns { .. } => {
            let rows = result.as_array().cloned().unwrap_or_default();
            let places: Vec<(String, String, String, String)> = rows
                .iter()
                .map(|r| {
                    (
                        plain(&r["lives_on"]),
                        plain(&r["enters_at"]),
                        r["predict"].as_str().unwrap_or("-").to_owned(),
                        lease_text(&r["lease"]),
                    )
                })
                .collect();
            let conns: Vec<ConnInfo> = serde_json::from_value(result)?;
            write!(out, "{}", conns_table(&conns, &places))?;
        }
        Request::Peers => {
            let peers = result.as_array().cloned().unwrap_or_default();
            writeln!(
                out,
                "{:<12} {:<21} {:<6} {:>9} {:>8} {:>6} {:>10} {:>10} {:>5} {:>6} {:>10}",
                "PEER",
                "ENDPOINT",
                "LIVE",
                "HANDSHAKE",
                "RTT",
                "LOSS",
                "TX",
                "RX",
                "CPU",
                "CONNS",
                "VERIFIED"
            )?;
            for p in &peers {
                let f = |k: &str| p[k].as_f64();
                writeln!(
                    out,
                    "{:<12} {:<21} {:<6} {:>9} {:>8} {:>5.1}% {:>10} {:>10} {:>5} {:>6} {:>10}",
                    plain(&p["name"]),
                    plain(&p["endpoint"]),
                    plain(&p["liveness"]),
                    f("handshake_age_s").map_or("-".into(), |s| format!("{s:.0}s ago")),
                    f("rtt_ms").map_or("-".into(), |ms| format!("{ms:.2}ms")),
                    f("loss").unwrap_or(0.0) * 100.0,
                    human_bytes(f("tx_bytes").unwrap_or(0.0)),
                    human_bytes(f("rx_bytes").unwrap_or(0.0)),
                    p["load"]["cpu_busy"]
                        .as_f64()
                        .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
                    p["load"]["connections"]
                        .as_u64()
                        .map_or("-".into(), |c| c.to_string()),
                    human_bytes(f("rx_verified_bytes").unwrap_or(0.0)),
                )?;
            }
            write!(out, "{}", hottest_text(&peers))?;
        }
        Request::Plan => write!(out, "{}", plan_text(&result))?,
        Request::Migrate { .. } => {
            let report: MigrateReport = serde_json::from_value(result)?;
            write!(out, "{}", migrate_table(&report))?;
        }
        Request::Drain { .. } => {
            let conns: Vec<ConnOutcome> =
                serde_json::from_value(result["conns"].clone()).unwrap_or_default();
            let report = MigrateReport {
                peer: plain(&result["peer"]),
                migration: None,
                moved: conns.iter().filter(|c| c.moved).count(),
                stayed: conns.iter().filter(|c| !c.moved).count(),
                elapsed_ms: result["elapsed_ms"].as_f64().unwrap_or(0.0),
                abort: None,
                conns,
            };
            write!(out, "{}", migrate_table(&report))?;
            if result["empty"].as_bool() == Some(true) {
                writeln!(out, "node empty: every connection moved to {}", report.peer)?;
            } else {
                writeln!(
                    out,
                    "node not empty: {} connection(s) left (see --json)",
                    plain(&result["left"])
                )?;
            }
        }
        Request::Status => {
            if let Some(map) = result.as_object() {
                for (k, v) in map {
                    if k == "stats" {
                        continue;
                    }
                    writeln!(out, "{k:<18} {}", plain(v))?;
                }
            }
        }
        _ => writeln!(out, "{}", plain(&result))?,
    }
    Ok(())
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Each peer's hottest connections with their segments, as its last load report gives
/// them: `range bytes/packets idle`, in stream order.
fn hottest_text(peers: &[serde_json::Value]) -> String {
    let mut s = String::new();
    for p in peers {
        let conns = p["load"]["segments"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if conns.is_empty() {
            continue;
        }
        s += &format!(
            "{}'s hottest connections (id there: segments sent)\n",
            plain(&p["name"])
        );
        for c in conns {
            let segments: Vec<String> = c["segments"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    let at = |k: &str| g[k].as_f64().map_or("?".into(), human_bytes);
                    let end = if g["end"].is_null() {
                        String::new()
                    } else {
                        at("end")
                    };
                    format!(
                        "{}-{end} {}/{}p idle {:.1}s",
                        at("start"),
                        at("bytes"),
                        g["packets"].as_u64().unwrap_or(0),
                        g["idle_ms"].as_f64().unwrap_or(0.0) / 1e3
                    )
                })
                .collect();
            s += &format!(
                "  {:#x}: {}\n",
                c["conn"].as_u64().unwrap_or(0),
                segments.join(" | ")
            );
        }
    }
    s
}

fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// Renders a migration report: one line per connection, then a summary.
fn migrate_table(r: &MigrateReport) -> String {
    let mut s = format!(
        "{:<16} {:<21} {:<34} {:>10}\n",
        "ID", "CLIENT", "OUTCOME", "FREEZE"
    );
    for c in &r.conns {
        let outcome = match (c.moved, c.remote_id) {
            (true, Some(remote)) => format!("moved to {} as {remote:#x}", r.peer),
            (true, None) => format!("moved to {}", r.peer),
            (false, _) => format!("stayed: {}", c.reason.as_deref().unwrap_or("unknown")),
        };
        s += &format!(
            "{:<16} {:<21} {:<34} {:>10}\n",
            format!("{:#x}", c.id),
            c.client.map_or("-".into(), |a| a.to_string()),
            outcome,
            c.freeze_ms.map_or("-".into(), |ms| format!("{ms:.2}ms")),
        );
    }
    let mut freezes: Vec<f64> = r
        .conns
        .iter()
        .filter(|c| c.moved)
        .filter_map(|c| c.freeze_ms)
        .collect();
    freezes.sort_by(f64::total_cmp);
    let median = freezes.get(freezes.len() / 2).copied();
    s += &format!(
        "{} moved, {} stayed in {:.1} ms{}{}\n",
        r.moved,
        r.stayed,
        r.elapsed_ms,
        median.map_or(String::new(), |m| format!("; median freeze {m:.2} ms")),
        r.abort
            .as_ref()
            .map_or(String::new(), |a| format!("; aborted: {a}")),
    );
    s
}

/// Renders `ctl plan`'s reply for people.
fn plan_text(v: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    let mut s = format!(
        "policy {}{} · load metric {} · capacity {} · sample every {} ms, horizon {} ms\n",
        plain(&v["policy"]),
        if v["executes"] == true {
            " (executes its plans)"
        } else {
            " (plans shown, nothing moves by itself)"
        },
        plain(&v["metric"]),
        plain(&v["capacity"]),
        plain(&v["interval_ms"]),
        plain(&v["horizon_ms"]),
    );
    s += &format!(
        "utilisation {} now, {} predicted peak ({}{}) · threshold {} · peak so far {} · cpu busy {} · {} connection(s), {} candidate(s)\n",
        f(&v["utilisation"]),
        f(&v["predicted_utilisation"]),
        v["model"].as_str().unwrap_or("no forecast"),
        v["mape"]
            .as_f64()
            .map_or(String::new(), |m| format!(", MAPE {:.1} %", m * 100.0)),
        f(&v["threshold"]),
        f(&v["peak_utilisation"]),
        f(&v["cpu_busy"]),
        plain(&v["connections"]),
        plain(&v["candidates"]),
    );
    for p in v["peers"].as_array().into_iter().flatten() {
        s += &format!(
            "peer {:<12} utilisation {} (load {}), {}, rtt {} ms, moves {}\n",
            plain(&p["name"]),
            f(&p["utilisation"]),
            f(&p["load"]),
            if p["alive"] == true {
                "alive"
            } else {
                "not alive"
            },
            f(&p["rtt_ms"]),
            plain(&p["return_path"]),
        );
    }
    if let Some(i) = v["imbalance"].as_object() {
        s += &format!(
            "imbalance: {} at {} against {} at {}\n",
            plain(&i["busiest"]),
            f(&i["busiest_utilisation"]),
            plain(&i["idlest"]),
            f(&i["idlest_utilisation"]),
        );
    }
    match v["plan"].as_object() {
        None => s += "no plan yet\n",
        Some(plan) => {
            s += &format!(
                "plan at {:.1} s: {}\n",
                plan["at_ms"].as_f64().unwrap_or(0.0) / 1e3,
                plain(&plan["status_text"])
            );
            for m in plan["moves"].as_array().into_iter().flatten() {
                s += &format!(
                    "  move {:#x} to {}: {}\n",
                    m["conn"].as_u64().unwrap_or(0),
                    plain(&m["target"]),
                    plain(&m["reason"]),
                );
            }
        }
    }
    let c = &v["counts"];
    s += &format!(
        "moves planned {}, executed {}, failed {} ({} plans)\n",
        plain(&c["planned"]),
        plain(&c["executed"]),
        plain(&c["failed"]),
        plain(&c["plans"]),
    );
    let classes: Vec<String> = v["classes"]["counts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| format!("{} {}", plain(&k["class"]), plain(&k["connections"])))
        .collect();
    if !classes.is_empty() {
        s += &format!(
            "classes (allocations {}): {}\n",
            if v["classes"]["enforced"] == true {
                "enforced"
            } else {
                "not enforced"
            },
            classes.join(", ")
        );
    }
    let sh = &v["shadow"];
    if sh["enabled"].as_bool() == Some(true) {
        s += &format!(
            "shadow trials: {} new connection(s) moved, {} failed{}",
            plain(&sh["shadowed"]),
            plain(&sh["failed"]),
            if sh["at_accept"].as_bool() == Some(true) {
                "; diverting at the accept"
            } else {
                ""
            },
        );
        for t in sh["trials"].as_array().into_iter().flatten() {
            s += &format!(
                "; {} {} at {} (samples local {}, peer {})",
                plain(&t["peer"]),
                plain(&t["state"]),
                f(&t["fraction"]),
                plain(&t["samples"]["local"]),
                plain(&t["samples"]["peer"]),
            );
        }
        s += &format!(
            "; KPIs taken: local {}, from peers {}\n",
            plain(&sh["kpis_taken"]["local"]),
            plain(&sh["kpis_taken"]["from_peers"]),
        );
    }
    let l = &v["leases"];
    let lc = &l["counts"];
    s += &format!(
        "leases held here {}, offloaded from here {}; granted {}, renewed {}, expired {} (returned {}, kept {})\n",
        l["held"].as_array().map_or(0, Vec::len),
        l["offloaded"].as_array().map_or(0, Vec::len),
        plain(&lc["granted"]),
        plain(&lc["renewed"]),
        plain(&lc["expired"]),
        plain(&lc["returned"]),
        plain(&lc["kept"]),
    );
    for h in l["held"].as_array().into_iter().flatten() {
        s += &format!(
            "  lease {:#x}: {} ({} length {:.1} s)\n",
            h["conn"].as_u64().unwrap_or(0),
            lease_text(h),
            plain(&h["basis"]),
            h["length_ms"].as_f64().unwrap_or(0.0) / 1e3,
        );
    }
    for o in l["offloaded"].as_array().into_iter().flatten() {
        s += &format!(
            "  offload {:#x}: {} as {:#x}\n",
            o["conn"].as_u64().unwrap_or(0),
            lease_text(o),
            o["remote_id"].as_u64().unwrap_or(0),
        );
    }
    for e in l["expired"].as_array().into_iter().flatten() {
        s += &format!(
            "  expired {:#x} at {:.1} s (primary {}): {}{}\n",
            e["conn"].as_u64().unwrap_or(0),
            e["at_ms"].as_f64().unwrap_or(0.0) / 1e3,
            plain(&e["primary"]),
            plain(&e["outcome"]),
            e["detail"]
                .as_str()
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
        );
    }
    let decisions = v["decisions"].as_array().cloned().unwrap_or_default();
    if !decisions.is_empty() {
        s += &format!(
            "{:>9} {:<16} {:<8} {:<13} {:>6} {:>6} REASON\n",
            "AT", "CONN", "TARGET", "OUTCOME", "NOW", "TRIG"
        );
        for d in &decisions {
            let outcome = match d["detail"].as_str() {
                Some(why) => format!("{}: {why}", plain(&d["outcome"])),
                None => plain(&d["outcome"]),
            };
            s += &format!(
                "{:>8.1}s {:<16} {:<8} {:<13} {:>6} {:>6} {}\n",
                d["at_ms"].as_f64().unwrap_or(0.0) / 1e3,
                format!("{:#x}", d["conn"].as_u64().unwrap_or(0)),
                plain(&d["target"]),
                outcome,
                f(&d["current_utilisation"]),
                f(&d["utilisation"]),
                plain(&d["reason"]),
            );
        }
    }
    s
}

/// A connection's lease in words, for `ctl conns`: held here (its primary and the time
/// left), or offloaded from here (its holder, and whether this node renews it); `-`.
fn lease_text(v: &serde_json::Value) -> String {
    match v["held"].as_bool() {
        Some(true) => format!(
            "from {} {:.1}s",
            plain(&v["primary"]),
            v["expires_in_ms"].as_f64().unwrap_or(0.0) / 1e3
        ),
        Some(false) => format!(
            "at {} {}",
            plain(&v["holder"]),
            if v["renewing"].as_bool() == Some(true) {
                "renewing"
            } else {
                "ending"
            }
        ),
        None => "-".into(),
    }
}

/// Renders `conns` as the `ctl conns` table.
///
/// `places` gives, per row, the node the connection lives on, the node where its packets
/// enter, its predictor state and its lease (empty when unknown).
pub(crate) fn conns_table(
    conns: &[ConnInfo],
    places: &[(String, String, String, String)],
) -> String {
    let mut s = format!(
        "{:<16} {:<21} {:<19} {:<12} {:<6} {:<6} {:<8} {:<8} {:<8} {:>8} {:>10} {:>10} {:>11} {:>11} {:>8} {:>8} {:>8} {:>10} {}\n",
        "ID",
        "CLIENT",
        "SERVICE",
        "STATE",
        "APP",
        "MODE",
        "PREDICT",
        "LIVES-ON",
        "ENTERS",
        "AGE",
        "IN",
        "OUT",
        "RATE-IN/s",
        "RATE-OUT/s",
        "RTT",
        "SENDQ",
        "RECVQ",
        "SENDBUF",
        "LEASE"
    );
    for (i, c) in conns.iter().enumerate() {
        let (lives, enters, predict, lease) = places.get(i).cloned().unwrap_or_default();
        s += &format!(
            "{:<16} {:<21} {:<19} {:<12} {:<6} {:<6} {:<8} {:<8} {:<8} {:>7.1}s {:>10} {:>10} {:>11} {:>11} {:>8} {:>8} {:>8} {:>10} {}\n",
            format!("{:#x}", c.id),
            c.client.to_string(),
            c.service.to_string(),
            c.state,
            format!("{:?}", c.app).to_lowercase(),
            c.mode,
            predict,
            lives,
            enters,
            c.age_ms as f64 / 1000.0,
            human_bytes(c.bytes_in as f64),
            human_bytes(c.bytes_out as f64),
            human_bytes(c.rate_in),
            human_bytes(c.rate_out),
            c.srtt_us
                .map_or_else(|| "-".to_owned(), |us| format!("{:.2}ms", us as f64 / 1e3)),
            c.send_queue,
            c.recv_queue,
            // `+`: growing (its app held while the buffer drains, `stack/grow.rs`).
            format!(
                "{}{}",
                human_bytes(c.send_buffer as f64),
                if c.growing { "+" } else { "" }
            ),
            lease,
        );
    }
    s += &format!("{} connection(s)\n", conns.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conns_table_shows_each_send_buffer_and_a_growing_one() {
        let row = |id, send_buffer, growing| ConnInfo {
            id,
            client: "198.18.1.2:40000".parse().unwrap(),
            service: "198.19.255.1:19".parse().unwrap(),
            state: "ESTABLISHED".into(),
            app: flowshift_core::app::AppKind::Source,
            mode: "local".into(),
            owner: None,
            ingress: None,
            return_path: None,
            age_ms: 1500,
            bytes_in: 0,
            bytes_out: 10 << 20,
            rate_in: 0.0,
            rate_out: 0.0,
            send_queue: 4096,
            recv_queue: 0,
            handshake: Default::default(),
            parked: false,
            srtt_us: Some(120),
            send_buffer,
            growing,
        };
        let table = conns_table(&[row(1, 262_144, false), row(2, 1 << 20, true)], &[]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains(" SENDBUF "), "{table}");
        let column = |line: &str| line.split_whitespace().nth(14).unwrap().to_owned();
        assert_eq!(column(lines[1]), "256.0KiB", "{table}");
        assert_eq!(column(lines[2]), "1.0MiB+", "{table}");
        assert_eq!(lines[3], "2 connection(s)");
    }

    #[test]
    fn peers_show_their_hottest_connections_segments() {
        let peers = [
            serde_json::json!({"name": "a", "load": {"segments": [{"conn": 31, "segments": [
                {"start": 0, "end": 1048576, "bytes": 1048576, "packets": 700, "idle_ms": 5000},
                {"start": 1048576, "end": null, "bytes": 300, "packets": 1, "idle_ms": 40}
            ]}]}}),
            serde_json::json!({"name": "c", "load": null}),
        ];
        assert_eq!(
            hottest_text(&peers),
            "a's hottest connections (id there: segments sent)\n  \
             0x1f: 0B-1.0MiB 1.0MiB/700p idle 5.0s | 1.0MiB- 300B/1p idle 0.0s\n"
        );
    }
}
