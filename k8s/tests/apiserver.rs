//! Against a real kube-apiserver (envtest convention: `KUBEBUILDER_ASSETS`): the CRDs install
//! and validate, nodes racing for blocks get disjoint ones, fixed addresses are claimed once, and
//! the watches sync and follow `kubectl` writes. Skips with one loud line without an API server.

use futures::StreamExt as _;
use kube::api::Api;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use vpcnet_k8s::claims::{self, ClaimError};
use vpcnet_k8s::crd::{IPBlock, IPClaim, IPClaimSpec};
use vpcnet_k8s::fold::NodeInfo;
use vpcnet_tests::apiserver::ControlPlane;

fn manifests() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

async fn client(cp: &ControlPlane) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn node_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata: {{ name: {name} }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_claims_and_watches_on_a_real_api_server() {
    let Some(cp) = ControlPlane::start_or_skip("k8s apiserver suite") else {
        return;
    };
    let crds = manifests().join("crds.yaml");
    cp.kubectl(&["apply", "-f", crds.to_str().unwrap()], None)
        .expect("CRDs accepted");
    for crd in ["virtualnetworks", "subnets", "ipblocks", "ipclaims"] {
        cp.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}.vpcnet.io"),
            ],
            None,
        )
        .unwrap();
    }

    // Schema validation: the API server refuses what the types forbid.
    let bad_id = "apiVersion: vpcnet.io/v1alpha1\nkind: VirtualNetwork\nmetadata: { name: bad }\nspec: { id: 0 }\n";
    let e = cp
        .kubectl(&["apply", "-f", "-"], Some(bad_id))
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.id"), "{e}");
    let bad_cidr = "apiVersion: vpcnet.io/v1alpha1\nkind: Subnet\nmetadata: { name: bad }\nspec: { network: vpc, cidr: ten-dot-twenty }\n";
    let e = cp
        .kubectl(&["apply", "-f", "-"], Some(bad_cidr))
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.cidr"), "{e}");

    let example = manifests().join("examples/network.yaml");
    cp.kubectl(&["apply", "-f", example.to_str().unwrap()], None)
        .expect("the example network applies");
    let mut nodes = Vec::new();
    for n in ["n1", "n2", "n3"] {
        cp.kubectl(&["apply", "-f", "-"], Some(&node_yaml(n)))
            .unwrap();
        let uid = cp
            .kubectl(&["get", "node", n, "-o", "jsonpath={.metadata.uid}"], None)
            .unwrap();
        nodes.push(NodeInfo {
            name: n.into(),
            uid,
        });
    }

    let client = client(&cp).await;
    // The watches sync against the real server and see the example's topology.
    let published = vpcnet_k8s::watch::spawn(vpcnet_k8s::watch::watch_all(client.clone()), 30);
    let mut topo = published.topology.clone();
    let built = tokio::time::timeout(
        Duration::from_secs(30),
        topo.wait_for(|t| t.as_ref().is_some_and(|t| !t.ipam.networks.is_empty())),
    )
    .await
    .expect("synced within 30 s")
    .unwrap()
    .clone()
    .unwrap();
    assert!(published.health.lock().unwrap().synced());
    let subnet = built.ipam.networks[0]
        .subnets
        .iter()
        .find(|s| s.name == "pods")
        .unwrap()
        .clone();

    // Three nodes start at once, none knowing what the others claim: every block is claimed
    // once, and each node gets the number it asked for.
    let blocks: Api<IPBlock> = Api::all(client.clone());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for node in nodes.clone() {
        let (blocks, subnet) = (blocks.clone(), subnet.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..4 {
                let known: BTreeSet<_> = mine.iter().copied().collect();
                let b = claims::claim_next_block(&blocks, &node, "vpc", &subnet, 26, &known)
                    .await
                    .unwrap();
                mine.push(b.spec.cidr.0.parse().unwrap());
            }
            mine
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for b in t.await.unwrap() {
            assert!(all.insert(b), "block {b} claimed twice");
        }
    }
    let per_claim = t0.elapsed() / 12;
    assert_eq!(all.len(), 12);
    let listed = blocks.list(&Default::default()).await.unwrap();
    assert_eq!(listed.items.len(), 12);
    for b in &listed.items {
        let owner = &b.metadata.owner_references.as_ref().unwrap()[0];
        let node = nodes.iter().find(|n| n.name == b.spec.node).unwrap();
        assert_eq!((owner.kind.as_str(), &owner.uid), ("Node", &node.uid));
    }
    // The watch sees the claims: n1's blocks are in the topology.
    let mut topo = published.topology.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        topo.wait_for(|t| {
            t.as_ref().is_some_and(|t| {
                t.ipam.networks[0]
                    .subnets
                    .iter()
                    .any(|s| s.blocks.get("n1").is_some_and(|b| b.len() == 4))
            })
        }),
    )
    .await
    .expect("claims seen by the watch")
    .unwrap();

    // A fixed address is claimed once cluster-wide.
    let ips: Api<IPClaim> = Api::all(client.clone());
    let spec = |pod: &str| IPClaimSpec {
        network: "vpc".into(),
        subnet: "pods".into(),
        ip: "10.20.3.7".into(),
        namespace: "default".into(),
        pod: pod.into(),
        node: "n1".into(),
    };
    let owner = |n: &NodeInfo| k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: n.name.clone(),
        uid: n.uid.clone(),
        ..Default::default()
    };
    claims::claim_ip(&ips, "vpc", spec("a"), owner(&nodes[0]))
        .await
        .unwrap();
    let e = claims::claim_ip(&ips, "vpc", spec("b"), owner(&nodes[1]))
        .await
        .unwrap_err();
    assert!(matches!(e, ClaimError::Taken { .. }), "{e}");

    // kubectl write → in the published state.
    let mut state = published.state.clone();
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: deny, namespace: default }\nspec: { podSelector: {} }\n";
    let t_write = Instant::now();
    cp.kubectl(&["apply", "-f", "-"], Some(np)).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| s.as_ref().is_some_and(|s| s.policies().count() == 1)),
    )
    .await
    .expect("policy seen by the watch")
    .unwrap();
    let write_to_state = t_write.elapsed();
    eprintln!(
        "figures: block claim {per_claim:?} per block (12 racing), kubectl write -> state {write_to_state:?} (kubectl itself included)"
    );
    // Quiet the watch stream before the server goes away.
    drop(published);
    let _ = futures::stream::empty::<()>().next().await;
}
