//! Cluster state in standalone mode: a directory of ordinary Kubernetes YAML manifests.
//!
//! Only what address selection needs is read here (annotations of pods and namespaces); the policy
//! engine will grow this into a watched model fed by either this directory or the API server.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

pub const ANNOTATION_SUBNET: &str = "vpcnet.io/subnet";
pub const ANNOTATION_IP: &str = "vpcnet.io/ip";

#[derive(Debug, Deserialize)]
struct Object {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// What the manifests say about one pod's addressing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodAddressing {
    pub subnet: Option<String>,
    pub ip: Option<String>,
}

/// Looks up `namespace/name` in the manifests under `dir`. The pod's own annotation wins over its
/// namespace's. Unreadable files are skipped with a warning: one bad manifest must not stop ADDs.
pub fn pod_addressing(dir: &Path, namespace: &str, name: &str) -> PodAddressing {
    let mut pod = None;
    let mut ns = None;
    for obj in objects(dir) {
        match obj.kind.as_str() {
            "Pod"
                if obj.metadata.name == name
                    && obj.metadata.namespace.as_deref().unwrap_or("default") == namespace =>
            {
                pod = Some(obj.metadata.annotations)
            }
            "Namespace" if obj.metadata.name == namespace => ns = Some(obj.metadata.annotations),
            _ => {}
        }
    }
    let get = |key: &str| {
        pod.as_ref()
            .and_then(|a| a.get(key).cloned())
            .or_else(|| ns.as_ref().and_then(|a| a.get(key).cloned()))
    };
    PodAddressing {
        subnet: get(ANNOTATION_SUBNET),
        // A fixed address is a property of one pod, never inherited from its namespace.
        ip: pod.as_ref().and_then(|a| a.get(ANNOTATION_IP).cloned()),
    }
}

fn objects(dir: &Path) -> Vec<Object> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if !matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            match Object::deserialize(doc) {
                Ok(o) => out.push(o),
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "skipping manifest"),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = pod_addressing(dir.path(), "x", "a");
        assert_eq!(a.subnet.as_deref(), Some("pod-subnet"));
        assert_eq!(a.ip, None);
        let b = pod_addressing(dir.path(), "x", "b");
        assert_eq!(b.subnet.as_deref(), Some("ns-subnet"));
        assert_eq!(
            pod_addressing(dir.path(), "y", "a"),
            PodAddressing::default()
        );
    }
}
