use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vpcnet_daemon::config::DaemonConfig;

#[derive(Parser)]
#[command(about = "vpcnet node daemon: IPAM, the eBPF dataplane and the plugin socket")]
struct Cli {
    #[arg(long, default_value = "/etc/vpcnet/vpcnetd.yaml")]
    config: PathBuf,
    /// Overrides `node` from the config: a DaemonSet passes `spec.nodeName` through the downward API,
    /// so one ConfigMap serves every node.
    #[arg(long, env = "VPCNET_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Remove the dataplane from this node: programs, links, pins, qdiscs and nftables rules.
    Uninstall,
}

fn main() {
    // Parsing a large cluster state on the blocking pool's threads would otherwise leave each
    // thread's malloc arena at its peak: measured +50 MB per change of a 10,000-rule policy.
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // A fixed threshold (glibc raises it after every large free otherwise): the file texts
        // and parse buffers of a big state are mmapped and go back to the kernel when freed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("vpcnetd: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = DaemonConfig::load(&cli.config)?;
    if let Some(node) = cli.node {
        config.node = node;
    }
    if config.node.is_empty() {
        anyhow::bail!(
            "no node name: set `node` in {} or VPCNET_NODE / --node",
            cli.config.display()
        );
    }
    match cli.cmd {
        Some(Cmd::Uninstall) => vpcnet_daemon::ebpf_glue::uninstall_node(&config),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(vpcnet_daemon::run::run(config)),
    }
}
