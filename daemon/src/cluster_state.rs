//! Address selection from cluster state: the `vpcnet.io/subnet` and `vpcnet.io/ip` annotations.
//!
//! Reads the same watched state the policy layer uses (one parser, one watcher), never the files
//! themselves: an ADD must not re-parse every manifest.

use crate::policy::ClusterState;
use crate::policy::model::ObjRef;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ManifestDir, StateSource as _};

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
