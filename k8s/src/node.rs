//! The node's side of readiness on Kubernetes: the CNI conflist that tells kubelet the network
//! is up, and the Node's `NetworkUnavailable` condition.
//!
//! kubelet keeps a node NotReady while its CNI config directory holds no conflist, so the daemon
//! writes it only once it can serve pods (dataplane loaded, cluster state synced, a block in
//! hand), and removes it on uninstall.

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The conflist's `cniVersion`: 1.0.0 is accepted by containerd 1.6 and 2.x and podman 4, and
/// supported by the reference plugins Debian ships (portmap 1.1.1); at 1.1.0 containerd 1.6
/// refuses the result, and containerd 2.x's STATUS calls fail on portmap.
pub const CNI_VERSION: &str = "1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("writing the CNI config {path}: {source}")]
    Conflist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the Node's NetworkUnavailable condition: {0}")]
    Condition(#[source] kube::Error),
}

/// The conflist vpcnet installs: vpcnet, then portmap for `hostPort`s.
pub fn conflist(network_name: &str, portmap: bool) -> String {
    let mut plugins = vec![serde_json::json!({
        "type": "vpcnet",
        "capabilities": {"ips": true, "mac": true}
    })];
    if portmap {
        plugins.push(serde_json::json!({
            "type": "portmap",
            "capabilities": {"portMappings": true}
        }));
    }
    let doc = serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": network_name,
        "plugins": plugins,
    });
    serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n"
}

/// Installs `text` as `path`, atomically (a runtime never reads half a file) and noticed: the
/// runtimes' config watchers were seen to miss a file renamed into the directory, so after the
/// rename the same bytes are written once more in place (a write event, never a partial file:
/// every byte is already what it is rewritten to). Unchanged content is left alone.
pub fn install_conflist(path: &Path, text: &str) -> Result<(), NodeError> {
    let err = |source| NodeError::Conflist {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("vpcnet")
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    // Runtimes load every file of the directory with a config suffix: the temporary's name
    // starts with a dot and ends in .tmp, which none of them load.
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(dirf) = std::fs::File::open(dir) {
        let _ = dirf.sync_all();
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    Ok(())
}

/// Removes the conflist (uninstall): kubelet then reports the node's network as not ready.
pub fn remove_conflist(path: &Path) -> Result<(), NodeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NodeError::Conflist {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sets the Node's `NetworkUnavailable` condition (False when vpcnet is ready), as cloud
/// providers expect the network plugin to.
pub async fn set_network_available(
    nodes: &Api<Node>,
    node: &str,
    available: bool,
    message: &str,
) -> Result<(), NodeError> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let patch = serde_json::json!({
        "status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": if available { "False" } else { "True" },
            "reason": if available { "VpcnetReady" } else { "VpcnetNotReady" },
            "message": message,
            "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "lastHeartbeatTime": now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        }]}
    });
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
        .map_err(NodeError::Condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_is_a_1_0_0_chain_runtimes_accept() {
        let v: serde_json::Value = serde_json::from_str(&conflist("vpcnet", true)).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["plugins"][0]["type"], "vpcnet");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        let v: serde_json::Value = serde_json::from_str(&conflist("vpcnet", false)).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn install_is_whole_idempotent_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.d/10-vpcnet.conflist");
        install_conflist(&path, "one\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
        install_conflist(&path, "a longer second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a longer second\n");
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        install_conflist(&path, "a longer second\n").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["10-vpcnet.conflist"]);
        remove_conflist(&path).unwrap();
        remove_conflist(&path).unwrap();
        assert!(!path.exists());
    }
}
