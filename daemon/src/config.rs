//! `vpcnetd --config /etc/vpcnet/vpcnetd.yaml`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vpcnet_ipam::IpamConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneMode {
    /// eBPF programs forward pod traffic (the product).
    #[default]
    Ebpf,
    /// Plain kernel routes only; for debugging and for nodes whose kernel lacks what eBPF needs.
    Kernel,
}

/// How the endpoint program is attached to each host veth. The uplink always uses TCX (classic only
/// where the kernel lacks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAttach {
    /// A clsact filter: attaches in ~0.4 ms. The default, because a TCX attach waits for an RCU
    /// grace period while holding RTNL (measured 8–24 ms per veth on 6.18), which would dominate
    /// CNI ADD latency and stall every other netlink user on the node meanwhile.
    #[default]
    Classic,
    /// A pinned TCX link per veth: owned links, no qdisc left behind, but slow to attach.
    Tcx,
}

/// Where the cluster state (pods, namespaces, policies) and, in Kubernetes mode, the topology come
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClusterMode {
    /// The topology is this file's `ipam:` section and the cluster state a directory of
    /// manifests (`manifests_dir`): the embedded default the demo and the tests run on.
    #[default]
    Standalone,
    /// Everything from the API server: Pods, Namespaces, NetworkPolicies, Nodes and the
    /// vpcnet.io VirtualNetwork, Subnet, IPBlock and IPClaim objects. `ipam:` holds only
    /// node-agnostic settings (`cooldown_secs`).
    Kubernetes,
}

/// Settings of the Kubernetes mode; all have defaults that fit a DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; `null` uses the pod's service account (in-cluster), or
    /// `$KUBECONFIG` outside a pod.
    pub kubeconfig: Option<PathBuf>,
    /// Where the daemon writes its CNI conflist once it is ready (kubelet's `--cni-conf-dir`).
    pub cni_conf_dir: PathBuf,
    /// File name of the conflist: sorts first among the directory's files, so it is the one the
    /// runtime uses.
    pub conflist_name: String,
    /// Chain the `portmap` plugin for `hostPort`s.
    pub portmap: bool,
    /// A block that has held no address this long is given back to the cluster (the node keeps
    /// at least one block per subnet it uses).
    pub block_release_grace_secs: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            conflist_name: "10-vpcnet.conflist".into(),
            portmap: true,
            block_release_grace_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// This node's name: selects its blocks in every subnet.
    pub node: String,
    /// The node's interface on the VPC subnet.
    pub uplink: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Releases queued by the plugin while the daemon was unreachable.
    #[serde(default = "default_release_queue")]
    pub release_queue: PathBuf,
    /// Where this node's maps and links are pinned (per node, so several daemons can share a machine).
    #[serde(default = "default_bpf_dir")]
    pub bpf_dir: PathBuf,
    #[serde(default)]
    pub dataplane: DataplaneMode,
    #[serde(default)]
    pub endpoint_attach: EndpointAttach,
    /// MTU for pod interfaces; default: the uplink's MTU.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// How often leaked allocations are looked for (also done at start).
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval_secs: u64,
    /// An allocation whose endpoint never became ready is kept this long before reconcile may release
    /// it: ADD may still be wiring the interface.
    #[serde(default = "default_pending_grace")]
    pub pending_grace_secs: u64,
    /// Standalone cluster state: a directory of Kubernetes YAML manifests (Namespace, Pod, ...). Pod and
    /// namespace annotations `vpcnet.io/subnet` and `vpcnet.io/ip` are read from here.
    #[serde(default)]
    pub manifests_dir: Option<PathBuf>,
    /// `host:port` for /metrics and /healthz (Prometheus); `null` turns them off. Loopback by
    /// default: the DaemonSet runs in the host network, and the endpoint has no authentication.
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub cluster: ClusterMode,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Standalone: the whole topology. Kubernetes: only `cooldown_secs`.
    #[serde(default)]
    pub ipam: IpamConfig,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/vpcnet")
}
fn default_socket() -> PathBuf {
    PathBuf::from(vpcnet_api::DEFAULT_SOCKET)
}
fn default_release_queue() -> PathBuf {
    PathBuf::from(vpcnet_api::DEFAULT_RELEASE_QUEUE)
}
fn default_bpf_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/vpcnet/node")
}
/// The loopback address the metrics listen on unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9962";

fn default_metrics_addr() -> Option<String> {
    Some(DEFAULT_METRICS_ADDR.into())
}
fn default_reconcile_interval() -> u64 {
    60
}
fn default_pending_grace() -> u64 {
    300
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid vpcnetd configuration: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
}

impl DaemonConfig {
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses a config file's text (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<DaemonConfig, ConfigError> {
        let p = path.display().to_string();
        let config: DaemonConfig =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: p.clone(),
                source,
            })?;
        let invalid = |msg: &str| ConfigError::Invalid {
            path: p.clone(),
            msg: msg.into(),
        };
        if config.uplink.is_empty() {
            return Err(invalid("`uplink` must not be empty"));
        }
        match config.cluster {
            ClusterMode::Standalone if config.ipam.networks.is_empty() => Err(invalid(
                "no networks are configured: add at least one under `ipam.networks` (or set `cluster: kubernetes` to take them from VirtualNetwork and Subnet objects)",
            )),
            ClusterMode::Kubernetes if !config.ipam.networks.is_empty() => Err(invalid(
                "`cluster: kubernetes` takes networks from VirtualNetwork and Subnet objects: remove `ipam.networks` (keep only `ipam.cooldown_secs`)",
            )),
            ClusterMode::Kubernetes if config.manifests_dir.is_some() => Err(invalid(
                "`cluster: kubernetes` takes the cluster state from the API server: remove `manifests_dir`",
            )),
            _ => Ok(config),
        }
    }

    /// Whether a cluster state (and with it NetworkPolicy) is configured: the API server, or a
    /// manifest directory.
    pub fn has_cluster_state(&self) -> bool {
        self.cluster == ClusterMode::Kubernetes || self.manifests_dir.is_some()
    }

    pub fn ipam_db(&self) -> PathBuf {
        self.state_dir.join("ipam.redb")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_yaml_with_defaults() {
        let yaml = r#"
node: n1
uplink: eth0
ipam:
  networks:
    - name: vpc-a
      id: 1
      subnets:
        - name: main
          cidr: 10.20.0.0/16
          blocks: { n1: [10.20.1.0/24] }
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let c = DaemonConfig::load(&path).unwrap();
        assert_eq!(c.socket, PathBuf::from(vpcnet_api::DEFAULT_SOCKET));
        assert_eq!(c.dataplane, DataplaneMode::Ebpf);
        assert_eq!(c.ipam.cooldown_secs, 30);
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9962"));
    }

    #[test]
    fn metrics_can_be_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "node: n1\nuplink: eth0\nmetrics_addr: null\ncluster: kubernetes\n",
        )
        .unwrap();
        assert_eq!(DaemonConfig::load(&path).unwrap().metrics_addr, None);
    }

    /// The shipped manifests run in the host network: an unauthenticated endpoint on every node
    /// address would be open to the whole VPC.
    #[test]
    fn shipped_configmap_keeps_metrics_on_loopback() {
        let manifest =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/configmap.yaml");
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        let text = doc["data"]["vpcnetd.yaml"]
            .as_str()
            .expect("data.vpcnetd.yaml");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vpcnetd.yaml");
        std::fs::write(&path, text).unwrap();
        let c = DaemonConfig::load(&path).unwrap();
        let addr: std::net::SocketAddr = c
            .metrics_addr
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_ADDR)
            .parse()
            .unwrap();
        assert!(addr.ip().is_loopback(), "shipped metrics_addr {addr}");
    }

    #[test]
    fn kubernetes_mode_needs_no_topology_and_refuses_one() {
        let parse = |text: &str| DaemonConfig::parse(Path::new("c.yaml"), text);
        let c = parse("node: n1\nuplink: eth0\ncluster: kubernetes\n").unwrap();
        assert_eq!(c.cluster, ClusterMode::Kubernetes);
        assert_eq!(c.kubernetes, KubernetesConfig::default());
        assert_eq!(c.ipam.cooldown_secs, 30);
        let e = parse("node: n1\nuplink: eth0\ncluster: kubernetes\nipam: {networks: [{name: v, id: 1, subnets: []}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("remove `ipam.networks`"), "{e}");
        let e = parse("node: n1\nuplink: eth0\n").unwrap_err().to_string();
        assert!(e.contains("cluster: kubernetes"), "{e}");
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "node: n1\nuplink: eth0\nsokcet: /x\nipam: {networks: []}\n",
        )
        .unwrap();
        let err = DaemonConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("sokcet"), "{err}");
    }
}
