//! The topology — virtual networks, their subnets and this node's blocks — as a value that changes
//! at runtime, published by a source and applied live by IPAM and the dataplane.
//!
//! Standalone mode publishes the `ipam:` section of the daemon's own config file ([`ConfigFile`]),
//! re-read whenever the file (or, for a mounted ConfigMap, its directory's `..data` symlink)
//! changes; the Kubernetes mode publishes the VirtualNetwork and Subnet objects through the same
//! [`TopologySource`]. A topology that fails validation is reported and never published: the one
//! in force stays, because half a topology would strand pods or open routes.

use crate::agent::Agent;
use crate::config::{ClusterMode, DaemonConfig};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use vpcnet_ipam::IpamConfig;

/// Networks, subnets and blocks as one consistent value. `generation` grows by one with every
/// published change, so logs, metrics and STATUS can say which topology is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub generation: u64,
    pub ipam: IpamConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("{path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: {reason} (the topology in force stays until this is fixed)")]
    Invalid { path: PathBuf, reason: String },
}

/// A feed of whole, validated topologies. There is always one in force: the one the daemon
/// started with until a newer one is published.
pub trait TopologySource: Send + Sync {
    fn current(&self) -> Arc<Topology>;
    /// Fires on every newly published topology.
    fn subscribe(&self) -> watch::Receiver<Arc<Topology>>;
    /// Why the newest input was rejected, if it was.
    fn last_error(&self) -> Option<TopologyError>;
}

/// Largest config file read: a topology of thousands of nodes' blocks is well below this.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

struct Inner {
    /// Hash of the last text looked at, valid or not: an unchanged file is neither re-parsed
    /// nor re-reported.
    seen: Option<u64>,
    error: Option<TopologyError>,
}

/// The `ipam:` section of the daemon's config file, followed live. Only the topology is taken
/// from a changed file; any other setting needs a restart, and a change to one is logged once.
pub struct ConfigFile {
    path: PathBuf,
    /// The config as the daemon started with it (after command-line overrides).
    running: DaemonConfig,
    tx: watch::Sender<Arc<Topology>>,
    inner: Mutex<Inner>,
}

impl ConfigFile {
    pub fn new(path: impl Into<PathBuf>, running: DaemonConfig) -> Arc<ConfigFile> {
        let topology = Arc::new(Topology {
            generation: 1,
            ipam: running.ipam.clone(),
        });
        Arc::new(ConfigFile {
            path: path.into(),
            running,
            tx: watch::Sender::new(topology),
            inner: Mutex::new(Inner {
                seen: None,
                error: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the file once; publishes its topology if it is valid and differs from the one in
    /// force. `Ok(true)` when a new topology was published.
    pub fn poll(&self) -> Result<bool, TopologyError> {
        let text = match read_bounded(&self.path) {
            Ok(t) => t,
            Err(e) => {
                // A ConfigMap update swaps a symlink: the file can be missing for an instant.
                // Keep what is in force and say so once.
                return Err(self.reject(None, e));
            }
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if self.lock().seen == Some(hash) {
            return match self.lock().error.clone() {
                Some(e) => Err(e),
                None => Ok(false),
            };
        }
        let invalid = |reason: String| TopologyError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let parsed = DaemonConfig::parse(&self.path, &text).map_err(|e| invalid(e.to_string()));
        let parsed = parsed.and_then(|c| {
            c.ipam
                .validate()
                .map_err(|e| invalid(e.to_string()))
                .map(|()| c)
        });
        let new = match parsed {
            Ok(c) => c,
            Err(e) => return Err(self.reject(Some(hash), e)),
        };
        self.warn_restart_only_changes(&new);
        {
            let mut inner = self.lock();
            inner.seen = Some(hash);
            inner.error = None;
        }
        let current = self.tx.borrow().clone();
        if current.ipam == new.ipam {
            return Ok(false);
        }
        let next = Arc::new(Topology {
            generation: current.generation + 1,
            ipam: new.ipam,
        });
        tracing::info!(generation = next.generation, path = %self.path.display(), "new topology");
        self.tx.send_replace(next);
        Ok(true)
    }

    fn reject(&self, hash: Option<u64>, e: TopologyError) -> TopologyError {
        let mut inner = self.lock();
        if inner.error.as_ref() != Some(&e) {
            tracing::warn!(error = %e, "topology change rejected");
        }
        inner.error = Some(e.clone());
        inner.seen = hash;
        e
    }

    fn warn_restart_only_changes(&self, new: &DaemonConfig) {
        let running = &self.running;
        let mut candidate = new.clone();
        // Neither the topology (applied live) nor the node name (the command line may override
        // it) is a restart-only setting.
        candidate.ipam = running.ipam.clone();
        candidate.node = running.node.clone();
        let (a, b) = (
            serde_json::to_string(running).unwrap_or_default(),
            serde_json::to_string(&candidate).unwrap_or_default(),
        );
        if a != b {
            tracing::warn!(path = %self.path.display(),
                "settings other than the topology changed; they take effect when vpcnetd restarts");
        }
    }

    /// Follows the file until this `ConfigFile` is dropped. Watches the directory, not the file:
    /// a mounted ConfigMap replaces the file by renaming a symlink.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        // The file itself, or a ConfigMap's `..data` swap; not the log or store beside it.
        let name = self.path.file_name().map(|n| n.to_os_string());
        crate::watch::spawn_dir_watcher(
            self,
            &dir,
            interval,
            "config file",
            move |p: &Path| {
                p.file_name() == name.as_deref() || crate::watch::is_projection_entry(p)
            },
            |me: &Self, _: crate::watch::Changed| {
                let _ = me.poll();
            },
        )
    }
}

impl TopologySource for ConfigFile {
    fn current(&self) -> Arc<Topology> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Topology>> {
        self.tx.subscribe()
    }

    fn last_error(&self) -> Option<TopologyError> {
        self.lock().error.clone()
    }
}

/// What the dataplane routes as this node's pods: its blocks in `ipam`, and a host prefix for
/// every live endpoint outside them (its block was removed from the topology; the pod keeps
/// working until it goes, also across a daemon restart).
pub fn local_pod_cidrs(
    ipam: &IpamConfig,
    node: &str,
    live: impl IntoIterator<Item = std::net::IpAddr>,
) -> Vec<ipnetwork::IpNetwork> {
    let mut out: Vec<ipnetwork::IpNetwork> = ipam
        .networks
        .iter()
        .flat_map(|n| &n.subnets)
        .flat_map(|s| s.node_blocks(node).iter().copied())
        .collect();
    let stragglers: Vec<ipnetwork::IpNetwork> = live
        .into_iter()
        .filter(|ip| !out.iter().any(|b| b.contains(*ip)))
        .map(ipnetwork::IpNetwork::from)
        .collect();
    out.extend(stragglers);
    out.sort();
    out.dedup();
    out
}

fn live_ips(agent: &Agent) -> Result<Vec<std::net::IpAddr>, String> {
    Ok(agent
        .ipam()
        .list()
        .map_err(|e| format!("IPAM: {e}"))?
        .iter()
        .flat_map(|ep| ep.ips().collect::<Vec<_>>())
        .chain(
            agent
                .pending_orphan_ips()
                .into_iter()
                .map(std::net::IpAddr::V4),
        )
        .collect())
}

/// Applies a published topology to IPAM and the dataplane, in the order that never strands a
/// packet: the dataplane first routes the union of the old and the new blocks (so a new block
/// is routed before IPAM hands out its first address), then IPAM switches (a removed block is
/// never handed out again), then the dataplane drops the routes of removed blocks — keeping a
/// host route for each live endpoint outside the new blocks, which works until its pod goes.
pub fn apply(agent: &Agent, topology: &Topology) -> Result<(), String> {
    let node = &agent.config().node;
    let networks = &topology.ipam.networks;
    let live = live_ips(agent)?;
    let mut union = local_pod_cidrs(&agent.ipam().config(), node, live.iter().copied());
    union.extend(local_pod_cidrs(&topology.ipam, node, live));
    union.sort();
    union.dedup();
    agent
        .forwarding()
        .apply_topology(networks, &union)
        .map_err(|e| format!("dataplane: {e}"))?;
    let change = agent
        .ipam()
        .apply_topology(topology.ipam.clone())
        .map_err(|e| format!("IPAM: {e}"))?;
    // Live pods' addresses the store lost wait for a topology that places them.
    agent.adopt_orphans();
    // Read again: an ADD may have allocated from a removed block just before the switch.
    let keep = local_pod_cidrs(&topology.ipam, node, live_ips(agent)?);
    agent
        .forwarding()
        .apply_topology(networks, &keep)
        .map_err(|e| format!("dataplane: {e}"))?;
    tracing::info!(generation = topology.generation, change = ?change, "topology applied");
    Ok(())
}

/// Where a Kubernetes node keeps the last topology it applied. The API objects are the truth;
/// this copy only lets a restarted daemon start its store and dataplane where it left them
/// instead of from an empty topology (which would unroute the node's blocks until the watches
/// sync).
fn last_applied_path(config: &DaemonConfig) -> std::path::PathBuf {
    config.state_dir.join("topology.json")
}

/// The last topology applied, if this node kept one and it is readable and valid; the
/// configured cooldown wins over the copy's.
pub fn load_last_applied(config: &DaemonConfig) -> Option<IpamConfig> {
    let path = last_applied_path(config);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "last applied topology unreadable; starting from none");
            return None;
        }
    };
    match serde_json::from_slice::<IpamConfig>(&bytes) {
        Ok(mut t) if t.validate().is_ok() => {
            t.cooldown_secs = config.ipam.cooldown_secs;
            Some(t)
        }
        _ => {
            tracing::warn!(path = %path.display(), "last applied topology invalid; starting from none");
            None
        }
    }
}

/// Writes the copy atomically (a crash leaves the old one or the new one), readable by root
/// only like everything in the state directory.
fn save_last_applied(config: &DaemonConfig, topology: &IpamConfig) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = last_applied_path(config);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(topology).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Applies every topology `source` publishes until the daemon stops. A topology that cannot be
/// applied is reported and retried with the next change; what was applied stays in force.
pub async fn follow(agent: Arc<Agent>, source: Arc<dyn TopologySource>) {
    let mut rx = source.subscribe();
    // Published before this subscription (a watch that synced quickly): not news to `rx`.
    let mut pending = {
        let first = rx.borrow_and_update().clone();
        (agent.ipam().config() != first.ipam).then_some(first)
    };
    loop {
        let topology = match pending.take() {
            Some(t) => t,
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
                rx.borrow_and_update().clone()
            }
        };
        let s = agent.clone();
        let applied =
            tokio::task::spawn_blocking(move || apply(&s, &topology).map(|()| topology)).await;
        match applied {
            Ok(Ok(t)) => {
                agent.metrics().topology_generation.set(t.generation as i64);
                if agent.config().cluster == ClusterMode::Kubernetes
                    && let Err(e) = save_last_applied(agent.config(), &t.ipam)
                {
                    tracing::warn!(error = %e, "keeping a copy of the applied topology failed; a restart starts from none");
                }
                // The block keeper waits for the store to hold what it published.
                if let Some(supply) = agent.address_supply() {
                    supply.changed();
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "topology not applied; the previous one stays in force")
            }
            Err(e) => tracing::error!(error = %e, "topology apply panicked"),
        }
    }
}

fn read_bounded(path: &Path) -> Result<String, TopologyError> {
    let unreadable = |reason: String| TopologyError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| unreadable(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(unreadable(format!(
            "larger than {} MiB",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "node: n1\nuplink: eth0\nmetrics_addr: null\n";

    fn ipam(blocks: &str) -> String {
        format!(
            "ipam:\n  networks:\n  - name: vpc\n    id: 1\n    subnets:\n    - name: s1\n      cidr: 10.1.0.0/16\n      blocks: {{ n1: [{blocks}] }}\n"
        )
    }

    fn source(text: &str) -> (tempfile::TempDir, PathBuf, Arc<ConfigFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vpcnetd.yaml");
        std::fs::write(&path, text).unwrap();
        let running = DaemonConfig::load(&path).unwrap();
        let src = ConfigFile::new(&path, running);
        (dir, path, src)
    }

    #[test]
    fn the_last_applied_topology_round_trips_privately_and_a_bad_copy_is_ignored() {
        let (dir, path, _src) = source(&format!("{BASE}{}", ipam("10.1.0.0/26")));
        let mut config = DaemonConfig::load(&path).unwrap();
        config.state_dir = dir.path().to_path_buf();
        assert_eq!(load_last_applied(&config), None, "a new node has none");
        let mut applied = config.ipam.clone();
        applied.cooldown_secs = 7;
        save_last_applied(&config, &applied).unwrap();
        let file = dir.path().join("topology.json");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let back = load_last_applied(&config).unwrap();
        assert_eq!(back.networks, applied.networks);
        assert_eq!(
            back.cooldown_secs, config.ipam.cooldown_secs,
            "the config's cooldown wins"
        );
        std::fs::write(&file, b"{not json").unwrap();
        assert_eq!(load_last_applied(&config), None);
    }

    #[test]
    fn a_changed_topology_is_published_with_the_next_generation() {
        let (_d, path, src) = source(&format!("{BASE}{}", ipam("10.1.0.0/26")));
        assert_eq!(src.poll(), Ok(false), "the running topology is not news");
        let rx = src.subscribe();
        std::fs::write(
            &path,
            format!("{BASE}{}", ipam("10.1.0.0/26, 10.1.0.64/26")),
        )
        .unwrap();
        assert_eq!(src.poll(), Ok(true));
        assert!(rx.has_changed().unwrap());
        let t = src.current();
        assert_eq!(t.generation, 2);
        assert_eq!(t.ipam.networks[0].subnets[0].node_blocks("n1").len(), 2);
        assert_eq!(src.poll(), Ok(false), "an unchanged file publishes nothing");
    }

    #[test]
    fn an_invalid_or_missing_file_keeps_the_topology_in_force() {
        let (_d, path, src) = source(&format!("{BASE}{}", ipam("10.1.0.0/26")));
        let before = src.current();
        std::fs::write(&path, format!("{BASE}{}", ipam("10.9.0.0/26"))).unwrap();
        let e = src.poll().unwrap_err();
        assert!(matches!(e, TopologyError::Invalid { .. }), "{e}");
        assert_eq!(src.current(), before);
        assert_eq!(src.last_error(), Some(e));
        std::fs::write(&path, "node: [").unwrap();
        assert!(matches!(src.poll(), Err(TopologyError::Invalid { .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(src.poll(), Err(TopologyError::Unreadable { .. })));
        assert_eq!(src.current(), before);
        std::fs::write(&path, format!("{BASE}{}", ipam("10.1.0.64/26"))).unwrap();
        assert_eq!(src.poll(), Ok(true), "fixed input is applied");
        assert_eq!(src.last_error(), None);
    }

    #[tokio::test]
    async fn the_watcher_sees_a_configmap_style_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let data1 = dir.path().join("..data1");
        std::fs::create_dir(&data1).unwrap();
        std::fs::write(
            data1.join("vpcnetd.yaml"),
            format!("{BASE}{}", ipam("10.1.0.0/26")),
        )
        .unwrap();
        std::os::unix::fs::symlink("..data1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/vpcnetd.yaml", dir.path().join("vpcnetd.yaml")).unwrap();
        let path = dir.path().join("vpcnetd.yaml");
        let src = ConfigFile::new(&path, DaemonConfig::load(&path).unwrap());
        let _w = src.spawn_watcher(Duration::from_secs(60));
        let mut rx = src.subscribe();
        // The watcher's first look happens at once; the swap must be seen by a later one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(src.current().generation, 1);
        // What kubelet does: new data dir, then an atomic rename of the `..data` symlink.
        let data2 = dir.path().join("..data2");
        std::fs::create_dir(&data2).unwrap();
        std::fs::write(
            data2.join("vpcnetd.yaml"),
            format!("{BASE}{}", ipam("10.1.0.0/26, 10.1.1.0/26")),
        )
        .unwrap();
        std::os::unix::fs::symlink("..data2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("the swap is seen well before the fallback poll")
            .unwrap();
        assert_eq!(src.current().generation, 2);
    }
}
