//! Address selection from cluster state: the `vpcnet.io/subnet` and `vpcnet.io/ip` annotations.
//!
//! Reads the same watched state the policy layer uses (one parser, one watcher), never the files
//! themselves: an ADD must not re-parse every manifest.

use vpcnet_policy::ClusterState;
use vpcnet_policy::model::{ObjRef, Pod};

pub const ANNOTATION_SUBNET: &str = "vpcnet.io/subnet";
pub const ANNOTATION_IP: &str = "vpcnet.io/ip";

/// What the cluster state says about one pod's addressing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodAddressing {
    pub subnet: Option<String>,
    pub ip: Option<String>,
}

/// The pod's own annotation wins over its namespace's.
pub fn pod_addressing(state: &ClusterState, namespace: &str, name: &str) -> PodAddressing {
    let pod = state.pod(&ObjRef::new(namespace, name));
    let ns = state.namespace(namespace);
    let subnet = pod
        .and_then(|p| p.annotations.get(ANNOTATION_SUBNET))
        .or_else(|| ns.and_then(|n| n.annotations.get(ANNOTATION_SUBNET)))
        .cloned();
    PodAddressing {
        subnet,
        // A fixed address is a property of one pod, never inherited from its namespace.
        ip: pod.and_then(|p| p.annotations.get(ANNOTATION_IP)).cloned(),
    }
}

/// The cluster state as this node's policy sync sees it:
/// - every local allocation is a pod on this node with the allocated address (IPAM knows it
///   before the API's `status.podIP` does);
/// - an allocation whose pod the state does not know yet stands for a pod without labels in its
///   namespace — so a namespace's default-deny covers it from its first packet;
/// - a pod the state places on this node without a local allocation has no endpoint here.
pub fn with_local_allocations(
    state: &ClusterState,
    records: &[vpcnet_ipam::Record],
    node: &str,
) -> ClusterState {
    let mut out = state.clone();
    let mut local = std::collections::BTreeSet::new();
    for r in records {
        let name = if r.pod.name.is_empty() {
            // Not a Kubernetes pod (no K8S_POD_NAME): a name no policy can select.
            format!("container-{}", r.key.container_id)
        } else {
            r.pod.name.clone()
        };
        let key = ObjRef::new(&r.pod.namespace, &name);
        if !local.insert(key.clone()) {
            continue; // One address per pod: the first interface's.
        }
        let mut pod = out.pod(&key).cloned().unwrap_or_else(|| Pod {
            namespace: r.pod.namespace.clone(),
            name,
            labels: Default::default(),
            ip: None,
            node: None,
            ports: Vec::new(),
            annotations: Default::default(),
        });
        // The policy model is IPv4 today; an endpoint without an IPv4 address has none there.
        let ip = r.ipv4();
        if pod.ip != ip || pod.node.as_deref() != Some(node) {
            pod.ip = ip;
            pod.node = Some(node.to_string());
            out.upsert_pod(pod);
        }
    }
    let strays: Vec<Pod> = out
        .pods()
        .filter(|p| p.node.as_deref() == Some(node) && !local.contains(&p.key()))
        .cloned()
        .collect();
    for mut p in strays {
        p.node = None;
        out.upsert_pod(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::source::{ManifestDir, StateSource as _};

    #[test]
    fn pod_annotation_wins_over_namespace_and_ip_is_not_inherited() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            r#"
apiVersion: v1
kind: Namespace
metadata:
  name: x
  annotations: { vpcnet.io/subnet: ns-subnet, vpcnet.io/ip: 10.0.0.9 }
---
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  annotations: { vpcnet.io/subnet: pod-subnet }
---
apiVersion: v1
kind: Pod
metadata: { name: b, namespace: x }
"#,
        )
        .unwrap();
        let source = ManifestDir::new(dir.path());
        source.poll().unwrap();
        let state = source.snapshot().unwrap();
        let a = pod_addressing(&state, "x", "a");
        assert_eq!(a.subnet.as_deref(), Some("pod-subnet"));
        assert_eq!(a.ip, None);
        let b = pod_addressing(&state, "x", "b");
        assert_eq!(b.subnet.as_deref(), Some("ns-subnet"));
        assert_eq!(pod_addressing(&state, "y", "a"), PodAddressing::default());
    }
}
