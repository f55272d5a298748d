//! The synced gate: while the cluster state needed to place or isolate a pod is not there, ADD
//! answers "try again" (CNI code 11) — no pod starts unisolated or in a wrong subnet.

use std::time::{Duration, Instant};
use vpcnet_tests::{Cluster, ClusterSpec};

#[test]
fn add_is_refused_with_try_again_until_the_cluster_state_is_synced() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: true,
    })
    .unwrap();
    // The state cannot be read at start: a manifest that names a file that is not there (a
    // ConfigMap mount half-written, a volume not attached yet).
    let dir = c.manifests_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(dir.join("missing.yaml"), dir.join("ns.yaml")).unwrap();
    c.node_mut(0).spawn_daemon().unwrap();
    let status = c
        .node_mut(0)
        .wait_answering(Duration::from_secs(20))
        .unwrap();
    assert!(
        !status.ready,
        "not ready before the state is synced: {status:?}"
    );

    let Err(err) = c.add_pod(0, "x", "a") else {
        panic!("ADD succeeded before the cluster state was synced");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("\"code\":11") || text.contains("\"code\": 11"),
        "{text}"
    );
    assert!(
        text.to_lowercase().contains("sync"),
        "the message says what is missing: {text}"
    );
    assert!(
        !c.node(0)
            .ctl(&["list"])
            .unwrap_or_default()
            .contains("10.20."),
        "nothing was allocated"
    );

    // The state arrives: the next ADD is placed by it.
    std::fs::remove_file(dir.join("ns.yaml")).unwrap();
    c.apply_manifest(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: x }\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let pod = loop {
        match c.add_pod(0, "x", "a") {
            Ok(p) => break p,
            Err(e) => assert!(Instant::now() < deadline, "{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        c.node_mut(0)
            .wait_answering(Duration::from_secs(5))
            .unwrap()
            .ready
    );
    assert!(c.del_pod(pod).unwrap().success);
}
