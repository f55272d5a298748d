use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vpcnet_api::{RequestBody, ResponseBody};

#[derive(Parser)]
#[command(about = "Inspect vpcnetd on this node")]
struct Cli {
    #[arg(long, default_value = vpcnet_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print raw JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Exit status of `vpcnetctl status` when the daemon answers but is not ready (1 is any error).
const NOT_READY: i32 = 2;

#[derive(Subcommand)]
enum Cmd {
    /// Readiness, allocation count, free addresses per subnet, dataplane. Exits 2 when vpcnetd
    /// is not ready.
    Status,
    /// Every allocation on this node.
    List,
    /// Dataplane counters: per endpoint, and drops per reason.
    Counters,
    /// Which NetworkPolicies select a pod and what they allow: `vpcnetctl policy <namespace>/<pod>`.
    Policy { pod: String },
}

fn main() {
    // `vpcnetctl list | head`: end quietly when the reader goes away, as other command-line tools
    // do, instead of panicking in println!. Rust ignores SIGPIPE by default.
    // SAFETY: restoring a default disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Err(e) = real_main() {
        eprintln!("vpcnetctl: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let body = match cli.cmd {
        Cmd::Status => RequestBody::Status,
        Cmd::List => RequestBody::List,
        Cmd::Counters => RequestBody::Counters,
        Cmd::Policy { pod } => {
            let Some((namespace, name)) = pod.split_once('/') else {
                bail!("expected <namespace>/<pod>, got {pod:?}");
            };
            RequestBody::Policy {
                namespace: namespace.into(),
                name: name.into(),
            }
        }
    };
    let resp = vpcnet_api::call(&cli.socket, body, Duration::from_secs(10))?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        if matches!(&resp, ResponseBody::Status(s) if !s.ready) {
            std::process::exit(NOT_READY);
        }
        return Ok(());
    }
    match resp {
        ResponseBody::Status(s) => {
            println!("node:        {}", s.node);
            println!("ready:       {}", s.ready);
            println!("dataplane:   {}", s.dataplane);
            println!("allocations: {}", s.allocations);
            for (subnet, free) in s.free {
                println!("free:        {subnet}: {free}");
            }
            if !s.message.is_empty() {
                println!("message:     {}", s.message);
            }
            // So `vpcnetctl status` works as a readiness probe.
            if !s.ready {
                std::process::exit(NOT_READY);
            }
        }
        ResponseBody::List { allocations } => {
            println!(
                "{:<16} {:<12} {:<10} {:<8} CONTAINER",
                "IP", "NETWORK", "SUBNET", "IFNAME"
            );
            for a in allocations {
                let ips: Vec<String> = a.ips.iter().map(|i| i.address.to_string()).collect();
                println!(
                    "{:<16} {:<12} {:<10} {:<8} {}",
                    ips.join(","),
                    a.network,
                    a.subnet,
                    a.key.ifname,
                    a.key.container_id
                );
            }
        }
        ResponseBody::Counters(c) => {
            println!(
                "{:<16} {:>10} {:>12} {:>10} {:>12}",
                "ENDPOINT", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES"
            );
            for e in c.endpoints {
                println!(
                    "{:<16} {:>10} {:>12} {:>10} {:>12}",
                    e.ip, e.rx_packets, e.rx_bytes, e.tx_packets, e.tx_bytes
                );
            }
            println!("\n{:<24} {:>10}", "DROP REASON", "PACKETS");
            for (reason, n) in c.drops {
                println!("{reason:<24} {n:>10}");
            }
            println!("\n{:<26} {:>10}", "NODE EVENT", "COUNT");
            for (name, n) in c.node {
                println!("{name:<26} {n:>10}");
            }
            if let Some((live, expired)) = c.conntrack {
                println!("\nconntrack entries: {live} live, {expired} expired (evicted as needed)");
            }
        }
        ResponseBody::Text { text } => print!("{text}"),
        ResponseBody::Error(e) => bail!("vpcnetd: {} (code {})", e.msg, e.code),
        other => bail!("unexpected answer: {other:?}"),
    }
    Ok(())
}
