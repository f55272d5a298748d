use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vpcnet_daemon::config::DaemonConfig;

#[derive(Parser)]
#[command(about = "vpcnet node daemon: IPAM, the eBPF dataplane and the plugin socket")]
struct Cli {
    /// Global, so `vpcnetd uninstall --config …` works as well as `vpcnetd --config … uninstall`.
    #[arg(long, global = true, default_value = "/etc/vpcnet/vpcnetd.yaml")]
    config: PathBuf,
    /// Overrides `node` from the config: a DaemonSet passes `spec.nodeName` through the downward API,
    /// so one ConfigMap serves every node.
    #[arg(long, global = true, env = "VPCNET_NODE")]
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
    // Before anything is created: the socket, the store (pod names, addresses) and the release
    // queue must never exist, even for an instant, with modes others can use, whatever umask the
    // daemon was started with. Explicit modes are set as well; this closes the window before them.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    vpcnet_daemon::run::raise_nofile_limit();
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
        .with_ansi(vpcnet_daemon::run::log_colours())
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
            .block_on(vpcnet_daemon::run::run(config, cli.config)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_node_are_accepted_before_and_after_the_subcommand() {
        for args in [
            &[
                "vpcnetd",
                "uninstall",
                "--config",
                "/x.yaml",
                "--node",
                "n1",
            ][..],
            &[
                "vpcnetd",
                "--config",
                "/x.yaml",
                "--node",
                "n1",
                "uninstall",
            ][..],
            &[
                "vpcnetd",
                "--config",
                "/x.yaml",
                "uninstall",
                "--node",
                "n1",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.config, PathBuf::from("/x.yaml"), "{args:?}");
            assert_eq!(cli.node.as_deref(), Some("n1"), "{args:?}");
            assert!(matches!(cli.cmd, Some(Cmd::Uninstall)), "{args:?}");
        }
        let cli = Cli::try_parse_from(["vpcnetd", "--config", "/y.yaml"]).unwrap();
        assert_eq!(cli.config, PathBuf::from("/y.yaml"));
        assert!(cli.cmd.is_none());
    }
}
