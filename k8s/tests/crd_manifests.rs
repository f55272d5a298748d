//! The CRDs in `manifests/` are the ones the Rust types generate. When the types change, rerun
//! with `VPCNET_BLESS=1` to rewrite the file, and review the diff.

use std::path::PathBuf;

#[test]
fn manifests_crds_yaml_matches_the_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds.yaml");
    let want = vpcnet_k8s::crd::crds_yaml().expect("CRDs serialise");
    if std::env::var_os("VPCNET_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write manifests/crds.yaml");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} drifted from the types in k8s/src/crd.rs; regenerate it with \
         `VPCNET_BLESS=1 cargo test -p vpcnet-k8s --test crd_manifests` and review the diff",
        path.display()
    );
}

#[test]
fn every_crd_document_parses_back_as_a_crd() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use serde::Deserialize as _;
    let text = vpcnet_k8s::crd::crds_yaml().unwrap();
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            CustomResourceDefinition::deserialize(d)
                .unwrap()
                .spec
                .names
                .kind
        })
        .collect();
    assert_eq!(kinds, ["VirtualNetwork", "Subnet", "IPBlock", "IPClaim"]);
}

#[test]
fn the_example_network_is_a_valid_topology() {
    use serde::Deserialize as _;
    use vpcnet_k8s::crd::{Subnet, VirtualNetwork};
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/network.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let (mut nets, mut subnets) = (Vec::new(), Vec::new());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("VirtualNetwork") => {
                nets.push(serde_yaml::from_value::<VirtualNetwork>(v).unwrap())
            }
            Some("Subnet") => subnets.push(serde_yaml::from_value::<Subnet>(v).unwrap()),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    let built = vpcnet_k8s::topology::build(&nets, &subnets, &[], 30);
    assert!(built.problems.is_empty(), "{:?}", built.problems);
    built.ipam.validate().unwrap();
    assert_eq!(built.ipam.networks[0].subnets.len(), 2);
}
