//! Address selection from cluster state: the `vpcnet.io/subnet` and `vpcnet.io/ip` annotations.
//!
//! Reads the same watched state the policy layer uses (one parser, one watcher), never the files
//! themselves: an ADD must not re-parse every manifest.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use vpcnet_policy::ClusterState;
use vpcnet_policy::model::{Namespace, ObjRef, Pod, PodRef};

pub const ANNOTATION_SUBNET: &str = "vpcnet.io/subnet";
pub const ANNOTATION_IP: &str = "vpcnet.io/ip";

/// What the cluster state says about one pod's addressing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodAddressing {
    pub subnet: Option<String>,
    pub ip: Option<String>,
}

/// From the pod and its namespace as the source has them (see
/// [`crate::state::source::StateSource::pod`]). The pod's own annotation wins over its
/// namespace's.
pub fn pod_addressing(pod: Option<&Pod>, ns: Option<&Namespace>) -> PodAddressing {
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

/// This node's allocations as pods: one address per pod (the first interface's). An allocation
/// without a Kubernetes pod name (no K8S_POD_NAME) gets a name no policy can select.
pub fn local_endpoints(records: &[vpcnet_ipam::Record]) -> BTreeMap<PodRef, Ipv4Addr> {
    let mut out = BTreeMap::new();
    for r in records {
        let name = if r.pod.name.is_empty() {
            format!("container-{}", r.key.container_id)
        } else {
            r.pod.name.clone()
        };
        // The policy model is IPv4 today; an endpoint without an IPv4 address has none there.
        if let Some(ip) = r.ipv4() {
            out.entry(ObjRef::new(&r.pod.namespace, name)).or_insert(ip);
        }
    }
    out
}

/// The cluster state as this node's policy sync sees it (see
/// [`vpcnet_policy::incremental::overlay_local`]): a copy, for one-off questions such as
/// `vpcnetctl policy`. The sync itself keeps an incremental compiler instead.
pub fn with_local_allocations(
    state: &ClusterState,
    records: &[vpcnet_ipam::Record],
    node: &str,
) -> ClusterState {
    vpcnet_policy::incremental::overlay_local(state, &local_endpoints(records), node)
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
        let at = |ns: &str, name: &str| {
            pod_addressing(
                source.pod(ns, name).unwrap().as_deref(),
                source.namespace(ns).unwrap().as_deref(),
            )
        };
        let a = at("x", "a");
        assert_eq!(a.subnet.as_deref(), Some("pod-subnet"));
        assert_eq!(a.ip, None);
        let b = at("x", "b");
        assert_eq!(b.subnet.as_deref(), Some("ns-subnet"));
        assert_eq!(at("y", "a"), PodAddressing::default());
    }
}
