use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use vpcnet_daemon::config::{ClusterMode, DaemonConfig};

/// Where the image keeps the CNI plugin binaries that `install-plugin` copies to the node
/// (`cargo xtask image` puts them there).
const IMAGE_PLUGIN_DIR: &str = "/usr/lib/vpcnet/cni";

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
    /// Remove vpcnet from this node: the CNI conflist (Kubernetes mode), then programs, links,
    /// pins, qdiscs and nftables rules.
    Uninstall,
    /// Copy the CNI plugin binaries into the node's CNI bin dir (the DaemonSet's init container;
    /// the image has no shell). Needs no config.
    InstallPlugin {
        /// The node's CNI bin dir (kubelet's / the runtime's `bin_dir`).
        #[arg(long, default_value = "/opt/cni/bin")]
        to: PathBuf,
        /// Where the binaries to install are.
        #[arg(long, default_value = IMAGE_PLUGIN_DIR)]
        from: PathBuf,
        /// Whether to install the `portmap` plugin the conflist chains for hostPorts.
        #[arg(long, value_enum, default_value_t = Portmap::IfMissing)]
        portmap: Portmap,
    },
    /// Do nothing until terminated: the main container of manifests/uninstall/, whose work its
    /// init container does (a DaemonSet's pods must keep running; the image has no shell or
    /// sleep). Needs no config.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Portmap {
    /// Keep the node's own portmap (its package manager owns it, and it may be newer); install
    /// the image's only where the node has none, since a conflist chaining a missing plugin
    /// fails every ADD.
    IfMissing,
    Always,
    /// For `kubernetes.portmap: false`.
    Never,
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
    if let Some(Cmd::InstallPlugin { to, from, portmap }) = &cli.cmd {
        for line in install_plugins(from, to, *portmap)? {
            println!("{line}");
        }
        return Ok(());
    }
    if let Some(Cmd::Pause) = cli.cmd {
        pause();
        return Ok(());
    }
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
        Some(Cmd::Uninstall) => uninstall(&config),
        Some(Cmd::InstallPlugin { .. } | Cmd::Pause) => {
            unreachable!("handled before the config is read")
        }
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(vpcnet_daemon::run::run(config, cli.config)),
    }
}

/// The conflist goes first: kubelet then stops starting pods here, and a runtime finds no
/// network to call a plugin for while the dataplane is taken apart.
fn uninstall(config: &DaemonConfig) -> anyhow::Result<()> {
    let conflist = conflist_to_remove(config).map(|path| {
        let r = vpcnet_k8s::node::remove_conflist(&path);
        if r.is_ok() {
            println!("removed {}", path.display());
        }
        r
    });
    let dataplane = vpcnet_daemon::ebpf_glue::uninstall_node(config);
    // The dataplane is removed even when the conflist could not be: report both.
    match (conflist, dataplane) {
        (Some(Err(c)), Err(d)) => Err(d.context(c.to_string())),
        (Some(Err(c)), Ok(())) => Err(c.into()),
        (_, r) => r,
    }
}

/// The conflist the daemon wrote, in Kubernetes mode only: a standalone node's conflist is its
/// operator's file.
fn conflist_to_remove(config: &DaemonConfig) -> Option<PathBuf> {
    (config.cluster == ClusterMode::Kubernetes).then(|| {
        config
            .kubernetes
            .cni_conf_dir
            .join(&config.kubernetes.conflist_name)
    })
}

/// Waits for SIGTERM or SIGINT. As a container's PID 1 the process gets no default action for
/// them, so without waiting for them explicitly a pod deletion would wait out its grace period.
fn pause() {
    // SAFETY: signal-set calls on locals; this is the process's only thread, so blocking the
    // signals here makes sigwait the only receiver.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

/// Installs `vpcnet` (and `portmap` as `mode` says) from `from` into `to`; returns what it did,
/// one line per binary.
fn install_plugins(from: &Path, to: &Path, mode: Portmap) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let mut install = |name: &str| -> anyhow::Result<()> {
        let (src, dest) = (from.join(name), to.join(name));
        install_binary(&src, to, name)
            .with_context(|| format!("installing {} as {}", src.display(), dest.display()))?;
        done.push(format!("installed {}", dest.display()));
        Ok(())
    };
    install("vpcnet")?;
    let node_has_portmap = to.join("portmap").exists();
    match mode {
        Portmap::Never => {}
        Portmap::IfMissing if node_has_portmap => {
            done.push(format!("kept the node's {}", to.join("portmap").display()))
        }
        Portmap::IfMissing | Portmap::Always if !from.join("portmap").exists() => {
            anyhow::bail!(
                "{} has no portmap to install{}: set `kubernetes.portmap: false` in the config and pass --portmap never",
                from.display(),
                if node_has_portmap {
                    ""
                } else {
                    ", and the node has none"
                }
            )
        }
        Portmap::IfMissing | Portmap::Always => install("portmap")?,
    }
    Ok(done)
}

/// Writes `src` as `dir/name` the way a binary that may be executing must be replaced: a
/// temporary in the same directory (same filesystem, so the rename is atomic), synced, made
/// executable, then renamed over the old one. A runtime that execs the plugin at that instant
/// runs the old file or the new one, never a partial one, and never fails with "text file busy"
/// (which writing into the old file in place would cause).
fn install_binary(src: &Path, dir: &Path, name: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.vpcnet-install"));
    // A crash of an earlier install (the init container runs again) left its temporary.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut input = File::open(src)?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&tmp)?;
        io::copy(&mut input, &mut out)?;
        // Explicit: the process umask (077) would otherwise leave it unreadable to others.
        out.set_permissions(Permissions::from_mode(0o755))?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, dir.join(name))?;
        // The rename itself is durable only once the directory is.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

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

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn install_plugin_parses_without_a_config() {
        let cli = Cli::try_parse_from(["vpcnetd", "install-plugin", "--to", "/host/opt/cni/bin"])
            .unwrap();
        match cli.cmd {
            Some(Cmd::InstallPlugin { to, from, portmap }) => {
                assert_eq!(to, PathBuf::from("/host/opt/cni/bin"));
                assert_eq!(from, PathBuf::from(IMAGE_PLUGIN_DIR));
                assert_eq!(portmap, Portmap::IfMissing);
            }
            _ => panic!("not install-plugin"),
        }
    }

    #[test]
    fn install_replaces_by_rename_with_mode_0755_and_leaves_no_temporary() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        write(&from.path().join("vpcnet"), "new plugin");
        write(&from.path().join("portmap"), "image portmap");
        let old = to.path().join("vpcnet");
        write(&old, "old plugin");
        // A runtime executing the old binary holds it open: it must keep reading the old bytes.
        let mut running = File::open(&old).unwrap();
        // And a temporary left by a crashed earlier install must not get in the way.
        write(&to.path().join(".vpcnet.vpcnet-install"), "half");
        let done = install_plugins(from.path(), to.path(), Portmap::IfMissing).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        let mut seen = String::new();
        running.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "old plugin");
        for (name, text) in [("vpcnet", "new plugin"), ("portmap", "image portmap")] {
            let p = to.path().join(name);
            assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{name}: {mode:o}");
        }
        assert_eq!(names(to.path()), ["portmap", "vpcnet"]);
    }

    #[test]
    fn the_nodes_own_portmap_is_kept_unless_told() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        write(&from.path().join("vpcnet"), "plugin");
        write(&from.path().join("portmap"), "image portmap");
        write(&to.path().join("portmap"), "node portmap");
        let portmap = || std::fs::read_to_string(to.path().join("portmap")).unwrap();
        install_plugins(from.path(), to.path(), Portmap::IfMissing).unwrap();
        assert_eq!(portmap(), "node portmap");
        install_plugins(from.path(), to.path(), Portmap::Never).unwrap();
        assert_eq!(portmap(), "node portmap");
        install_plugins(from.path(), to.path(), Portmap::Always).unwrap();
        assert_eq!(portmap(), "image portmap");
        let bare = tempfile::tempdir().unwrap();
        install_plugins(from.path(), bare.path(), Portmap::Never).unwrap();
        assert_eq!(names(bare.path()), ["vpcnet"]);
    }

    #[test]
    fn a_missing_source_fails_naming_it_and_changes_nothing() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        write(&to.path().join("vpcnet"), "old plugin");
        let e = install_plugins(from.path(), to.path(), Portmap::Never)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&from.path().join("vpcnet").display().to_string()),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(to.path().join("vpcnet")).unwrap(),
            "old plugin"
        );
        assert_eq!(names(to.path()), ["vpcnet"]);
        // A node without portmap, and an image without one: refused rather than a conflist
        // whose chain fails every ADD.
        write(&from.path().join("vpcnet"), "plugin");
        let bare = tempfile::tempdir().unwrap();
        let e = install_plugins(from.path(), bare.path(), Portmap::IfMissing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("portmap"), "{e}");
    }

    #[test]
    fn uninstall_removes_the_conflist_in_kubernetes_mode_only() {
        let parse = |text: &str| DaemonConfig::parse(Path::new("c.yaml"), text).unwrap();
        let k8s = parse(
            "node: n1\nuplink: eth0\ncluster: kubernetes\nkubernetes: {cni_conf_dir: /x/net.d, conflist_name: 05-v.conflist}\n",
        );
        assert_eq!(
            conflist_to_remove(&k8s),
            Some(PathBuf::from("/x/net.d/05-v.conflist"))
        );
        let k8s = parse("node: n1\nuplink: eth0\ncluster: kubernetes\n");
        assert_eq!(
            conflist_to_remove(&k8s),
            Some(PathBuf::from("/etc/cni/net.d/10-vpcnet.conflist"))
        );
        let standalone =
            parse("node: n1\nuplink: eth0\nipam: {networks: [{name: v, id: 1, subnets: []}]}\n");
        assert_eq!(conflist_to_remove(&standalone), None);
    }
}
