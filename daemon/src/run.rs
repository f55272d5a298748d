//! vpcnetd's life: open state, program the dataplane, serve, reconcile, and leave the dataplane
//! forwarding when it stops.

use crate::agent::{Agent, Forwarding, KernelRoutes};
use crate::config::{ClusterMode, DaemonConfig, DataplaneMode};
use crate::links::NodeNetlink;
use crate::metrics::Metrics;
use anyhow::{Context as _, Result};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use vpcnet_ipam::Ipam;

/// Runs the node agent until SIGTERM. `config_path` is followed for topology changes.
pub async fn run(config: DaemonConfig, config_path: std::path::PathBuf) -> Result<()> {
    let _span = tracing::info_span!("vpcnetd", node = %config.node).entered();
    private_dir(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    // The plugin writes here while the daemon is down; the entries name pods.
    private_dir(&config.release_queue)
        .with_context(|| format!("creating release queue {}", config.release_queue.display()))?;
    let db = config.ipam_db();
    // A store written by an older release under a permissive umask.
    restrict_file(&db).with_context(|| format!("restricting {}", db.display()))?;
    // A Kubernetes node starts from the topology it applied last (its blocks stay routed while
    // the watches sync); the API's topology replaces it once built.
    let start = match config.cluster {
        ClusterMode::Kubernetes => {
            let mut c = config.clone();
            if let Some(t) = crate::topology::load_last_applied(&config) {
                c.ipam = t;
            }
            c
        }
        ClusterMode::Standalone => config.clone(),
    };
    let ipam = {
        let (db, ipam_config, node) = (db.clone(), start.ipam.clone(), config.node.clone());
        tokio::task::spawn_blocking(move || Ipam::open(&db, ipam_config, &node)).await?
    }
    .with_context(|| format!("opening IPAM state {}", db.display()))?;
    restrict_file(&db).with_context(|| format!("restricting {}", db.display()))?;
    let ipam = Arc::new(ipam);

    let netlink = NodeNetlink::new().context("opening netlink in the node namespace")?;
    // Forwarding is needed for masqueraded egress and for the kernel-route mode.
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        warn!(error = %e, "cannot enable net.ipv4.ip_forward");
    }
    let mtu = match config.mtu {
        Some(m) => m,
        None => netlink
            .link_mtu(&config.uplink)
            .await
            .with_context(|| format!("reading the MTU of uplink {}", config.uplink))?
            .with_context(|| {
                format!(
                    "uplink {} does not exist in this network namespace",
                    config.uplink
                )
            })?,
    };

    let orphans = find_orphans(&config, &ipam, &netlink).await;
    let fwd: Box<dyn Forwarding> = match config.dataplane {
        DataplaneMode::Kernel => {
            // Without the eBPF ARP responder the fabric must still find pods on this node: proxy
            // ARP answers for every address routed through another interface (the pods' /32s).
            let knob = format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", config.uplink);
            std::fs::write(&knob, "1").with_context(|| format!("enabling {knob}"))?;
            Box::new(KernelRoutes)
        }
        DataplaneMode::Ebpf => crate::ebpf_glue::forwarding(&start, &ipam, &orphans)
            .context("starting the eBPF dataplane (set `dataplane: kernel` to run without it)")?,
    };
    info!(dataplane = %fwd.describe(), mtu, "dataplane ready");

    let kube = match config.cluster {
        ClusterMode::Kubernetes => Some(
            crate::kubernetes::start(&config, ipam.clone())
                .await
                .context("starting the Kubernetes mode")?,
        ),
        ClusterMode::Standalone => None,
    };
    let policy = match (&kube, &config.manifests_dir) {
        (Some(k), _) => Some(k.state.clone() as Arc<dyn crate::state::source::StateSource>),
        (None, Some(dir)) => {
            let source = Arc::new(crate::state::source::ManifestDir::new(dir.clone()));
            if let Err(e) = source.poll() {
                warn!(error = %e, dir = %dir.display(), "cluster manifests rejected; keeping none until they are fixed");
            }
            source.spawn_watcher(Duration::from_secs(1));
            Some(source as Arc<dyn crate::state::source::StateSource>)
        }
        (None, None) => None,
    };
    let metrics = Arc::new(Metrics::default());
    if let Some(k) = &kube {
        crate::kubernetes::report_supply_metrics(&metrics, k.supply.clone());
    }
    let mut agent = Agent::new(config.clone(), ipam, fwd, mtu).with_metrics(metrics.clone());
    agent = agent.with_orphans(orphans);
    if let Some(source) = policy {
        agent = agent.with_state_source(source);
    }
    if let Some(k) = &kube {
        agent =
            agent.with_address_supply(Arc::new(crate::kubernetes::KubeSupply(k.supply.clone())));
    }
    let agent = Arc::new(agent);
    agent.refresh_metrics_on_scrape();

    // Before serving: queued releases first (their addresses were freed by pods that are gone), then
    // the leak check, so the first ADD sees the true state.
    let a = agent.clone();
    tokio::task::spawn_blocking(move || a.replay_release_queue()).await?;
    // With the topology of the config file (standalone) the orphans are placed now; a
    // Kubernetes node places them when the first topology from the API arrives.
    let a = agent.clone();
    tokio::task::spawn_blocking(move || a.adopt_orphans()).await?;
    reconcile_once(&agent, &netlink).await;
    // The pinned maps kept enforcing the previous policy; bring them to the current state before
    // the first ADD, then follow every change.
    sync_policy_once(&agent).await;
    if let Some(source) = agent.state_source().cloned() {
        let s = agent.clone();
        tokio::spawn(async move {
            let mut states = source.subscribe();
            loop {
                tokio::select! {
                    changed = states.changed() => if changed.is_err() { return },
                    () = s.policy_dirty() => {}
                }
                sync_policy_once(&s).await;
            }
        });
    }

    // The topology follows the config file (or the API objects) live: it may have changed since
    // it was read.
    let topology: Arc<dyn crate::topology::TopologySource> = match &kube {
        Some(k) => k.topology.clone(),
        None => {
            let file = crate::topology::ConfigFile::new(config_path, config.clone());
            file.spawn_watcher(Duration::from_secs(1));
            file
        }
    };
    agent
        .metrics()
        .topology_generation
        .set(topology.current().generation as i64);
    tokio::spawn(crate::topology::follow(agent.clone(), topology));
    if let Some(k) = &kube {
        tokio::spawn(crate::kubernetes::node_life(
            agent.clone(),
            k.client.clone(),
        ));
    }

    let listener = crate::server::bind(&config.socket)
        .with_context(|| format!("binding {}", config.socket.display()))?;
    info!(socket = %config.socket.display(), "serving");
    let server = crate::server::Server::start(listener, config.socket.clone(), agent.clone());

    if let Some(addr) = config.metrics_addr.clone() {
        let registry = Arc::new(metrics.registry());
        let a = agent.clone();
        let health: crate::metrics::Health = Arc::new(move || a.readiness());
        // Not fatal: pods need the socket, not the metrics (readiness comes from STATUS too).
        match tokio::net::TcpListener::bind(&addr).await {
            Ok(listener) => {
                info!(%addr, "serving /metrics and /healthz");
                tokio::spawn(crate::metrics::serve(listener, registry, health));
            }
            Err(e) => tracing::error!(%addr, error = %e, "cannot serve /metrics and /healthz"),
        }
    }

    let interval = Duration::from_secs(config.reconcile_interval_secs.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.replay_release_queue()).await;
                reconcile_once(&agent, &netlink).await;
                // Also retries a sync that failed, and catches anything a notification missed.
                sync_policy_once(&agent).await;
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // The dataplane stays: pinned programs and maps keep forwarding until the next vpcnetd adopts them.
    info!("stopping; the dataplane keeps forwarding");
    let unfinished = server.shutdown(DRAIN_TIMEOUT).await;
    if unfinished > 0 {
        warn!(
            unfinished,
            "requests still running after {DRAIN_TIMEOUT:?}; their clients see the connection close"
        );
    }
    Ok(())
}

/// How long SIGTERM waits for accepted requests to be answered. Below the DaemonSet's
/// termination grace period (30 s), so the kubelet's SIGKILL never cuts a drain short.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates `dir` (and missing parents) accessible to the owner only, and takes an existing one
/// there if this process owns it: it holds pod names and addresses.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let md = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    if md.uid() == unsafe { libc::geteuid() } && md.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Owner-only mode for a file that may already exist with a wider one.
fn restrict_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Ok(md) if md.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Raises the open-file soft limit to the hard limit: every plugin call is a connection, and
/// the 1,024 default leaves too little room next to the dataplane's map and link fds.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Colour only for a person at a terminal: `kubectl logs`, files and pipes get plain text, and
/// NO_COLOR (https://no-color.org) turns it off everywhere.
pub fn log_colours() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn sync_policy_once(agent: &Arc<Agent>) {
    if agent.state_source().is_none() {
        return;
    }
    let s = agent.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = s.sync_policy_work();
        // Only after work: a trim walks the whole heap, which at a large state is not free.
        if matches!(r, Ok((_, false))) {
            return r;
        }
        trim_heap();
        r
    })
    .await;
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "NetworkPolicy sync failed; the dataplane keeps the previous policy")
        }
        Err(e) => warn!(error = %e, "NetworkPolicy sync task failed"),
    }
}

/// Live pods' addresses the store has no record of (see `crate::agent::Orphan`). Best effort:
/// without the node's routes nothing can be adopted, and the daemon starts as before.
async fn find_orphans(
    config: &DaemonConfig,
    ipam: &Ipam,
    netlink: &NodeNetlink,
) -> Vec<crate::agent::Orphan> {
    let routes = match netlink.host_routes_v4().await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "listing the node's routes failed; live pods the store lost are not re-adopted");
            return Vec::new();
        }
    };
    let held = match ipam.list() {
        Ok(l) => l.iter().flat_map(|e| e.ips().collect::<Vec<_>>()).collect(),
        Err(e) => {
            warn!(error = %e, "listing allocations failed; live pods the store lost are not re-adopted");
            return Vec::new();
        }
    };
    let pinned = match config.dataplane {
        DataplaneMode::Ebpf => crate::ebpf_glue::pinned_wiring(config),
        DataplaneMode::Kernel => Default::default(),
    };
    crate::agent::orphans(&routes, &held, &pinned, crate::ebpf_glue::ifindex)
}

async fn reconcile_once(agent: &Arc<Agent>, netlink: &NodeNetlink) {
    let links = match netlink.link_names().await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "listing links for reconcile failed");
            return;
        }
    };
    let a = agent.clone();
    match tokio::task::spawn_blocking(move || {
        let r = a.reconcile(&links);
        if let Ok(list) = a.ipam().list() {
            a.metrics().live_allocations.set(list.len() as i64);
        }
        r
    })
    .await
    {
        Ok(Ok(n)) if n > 0 => info!(released = n, "reconcile released leaked addresses"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "reconcile failed"),
        Err(e) => warn!(error = %e, "reconcile task failed"),
    }
}

/// Hands memory freed after a cluster state was parsed and compiled back to the kernel: the
/// daemon idles between changes, and a large state's transient peak would otherwise stay resident.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: plain libc call without arguments that reference memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
