//! Standalone cluster state: annotations choose addresses, and `vpcnetctl policy` explains policies.

use std::time::{Duration, Instant};
use vpcnet_tests::{Cluster, ClusterSpec};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { team: shop } }
---
apiVersion: v1
kind: Pod
metadata:
  name: pinned
  namespace: shop
  labels: { app: db }
  annotations: { vpcnet.io/ip: 10.20.1.77 }
spec:
  containers: [{ name: db, image: db, ports: [{ name: sql, containerPort: 5432 }] }]
"#;

#[test]
fn annotated_address_is_honoured_and_policy_is_explained() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: true,
    })
    .unwrap();
    c.apply_manifest("shop.yaml", MANIFESTS).unwrap();
    c.node_mut(0).start_daemon().unwrap();
    let pod = c.add_pod(0, "shop", "pinned").unwrap();
    assert_eq!(pod.ip.to_string(), "10.20.1.77", "vpcnet.io/ip annotation");

    let before = c.node(0).ctl(&["policy", "shop/pinned"]).unwrap();
    assert!(before.contains("shop/pinned"), "{before}");
    c.apply_manifest(
        "policy.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: db-from-web, namespace: shop }
spec:
  podSelector: { matchLabels: { app: db } }
  ingress:
    - from: [{ podSelector: { matchLabels: { app: web } } }]
      ports: [{ port: sql }]
"#,
    )
    .unwrap();
    // The watcher picks the change up quickly; poll for it with a deadline.
    let deadline = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let text = c.node(0).ctl(&["policy", "shop/pinned"]).unwrap();
        if text.contains("db-from-web") {
            break text;
        }
        assert!(Instant::now() < deadline, "policy change not seen: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{after}");
    assert!(after.contains("5432") || after.contains("sql"), "{after}");
    assert!(
        after.contains("Enforced by this node's eBPF dataplane"),
        "the operator is told the policy is enforced: {after}"
    );
    assert!(c.node(0).ctl(&["policy", "shop/nope"]).is_err());
}
