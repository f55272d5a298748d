//! The `vpcnet.io` custom resources. The CRD manifests in `manifests/` are generated from these
//! types (`VPCNET_BLESS=1 cargo test -p vpcnet-k8s --test crd_manifests`), and that test
//! fails when the two drift apart.
//!
//! All four are cluster-scoped: networks and subnets are cluster infrastructure, and the claim
//! objects must be unique cluster-wide, which only a cluster-scoped name gives (a create of an
//! existing name is refused atomically by the API server).

// Every `printcolumn(...)` repeats `type_ = ...`, which the lint takes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::core::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const GROUP: &str = "vpcnet.io";
pub const VERSION: &str = "v1alpha1";

/// A CIDR in canonical form, either family (validated again when the topology is built; the
/// pattern only catches typos at `kubectl apply`).
const CIDR_PATTERN: &str = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:]+/[0-9]{1,3})$";
const IP_PATTERN: &str = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:]+)$";

/// A virtual network (a VPC): its pods reach `routableCidrs` directly, everything else through
/// the node's masquerade.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "vpcnet.io",
    version = "v1alpha1",
    kind = "VirtualNetwork",
    shortname = "vnet",
    category = "vpcnet",
    status = "VirtualNetworkStatus",
    derive = "PartialEq",
    doc = "A virtual network (VPC) whose subnets give pods their addresses.",
    printcolumn(name = "ID", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNetworkSpec {
    /// Numeric identity carried in the dataplane's maps; unique per network.
    #[schemars(range(min = 1, max = 65535))]
    pub id: u16,
    /// Pods of the network without a subnet choice get addresses here (at most one default).
    #[serde(default)]
    pub default: bool,
    /// Destinations reached without SNAT: the VPC's own ranges and physical-cloud ranges behind
    /// the VPC router.
    #[serde(default)]
    pub routable_cidrs: Vec<Cidr>,
    /// Destinations never masqueraded although not routable.
    #[serde(default)]
    pub masquerade_exclude: Vec<Cidr>,
    /// Other VirtualNetworks whose pods may talk to this one's.
    #[serde(default)]
    pub peers: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNetworkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Subnets of this network in force.
    #[serde(default)]
    pub subnets: u32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A CIDR as text; kept as a string in the API so a typo is reported on the object's status
/// instead of making the whole list unreadable.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Cidr(#[schemars(regex(pattern = CIDR_PATTERN))] pub String);

/// An inclusive range of addresses never handed out.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct AddressRange {
    #[schemars(regex(pattern = IP_PATTERN))]
    pub start: String,
    #[schemars(regex(pattern = IP_PATTERN))]
    pub end: String,
}

/// A subnet of a VirtualNetwork. Nodes claim blocks of it (`IPBlock`) as they need addresses.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "vpcnet.io",
    version = "v1alpha1",
    kind = "Subnet",
    shortname = "vsubnet",
    category = "vpcnet",
    status = "SubnetStatus",
    derive = "PartialEq",
    doc = "A subnet of a VirtualNetwork; nodes claim blocks of it for their pods.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Block", type_ = "integer", json_path = ".spec.blockSize"),
    printcolumn(name = "Used", type_ = "integer", json_path = ".status.used"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.free"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SubnetSpec {
    /// The VirtualNetwork this subnet belongs to.
    #[schemars(length(min = 1))]
    pub network: String,
    pub cidr: Cidr,
    /// The subnet's router, never allocated; defaults to the first host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = IP_PATTERN))]
    pub gateway: Option<String>,
    #[serde(default)]
    pub reserved: Vec<AddressRange>,
    /// Prefix length of the blocks nodes claim (e.g. 26: 64 addresses per block).
    #[serde(default = "default_block_size")]
    #[schemars(range(min = 1, max = 128))]
    pub block_size: u8,
    /// The default subnet of its network (at most one per network).
    #[serde(default)]
    pub default: bool,
    /// Pods of the namespaces this selects get addresses here (unless a `vpcnet.io/subnet`
    /// annotation on the pod or its namespace says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

pub fn default_block_size() -> u8 {
    26
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubnetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Addresses held by pods, over every node's blocks.
    #[serde(default)]
    pub used: u64,
    /// Addresses still free: in claimed blocks and in blocks not claimed yet.
    #[serde(default)]
    pub free: u64,
    /// Blocks claimed by nodes.
    #[serde(default)]
    pub blocks: u32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One block of a Subnet, claimed by one node. The name is derived from the network and the
/// block's CIDR, so two nodes claiming the same block collide on create and only one wins. Owned
/// by the Node: the garbage collector frees a deleted node's blocks.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "vpcnet.io",
    version = "v1alpha1",
    kind = "IPBlock",
    plural = "ipblocks",
    shortname = "vblock",
    category = "vpcnet",
    derive = "PartialEq",
    doc = "A block of a Subnet claimed by one node.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Subnet", type_ = "string", json_path = ".spec.subnet"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPBlockSpec {
    pub network: String,
    pub subnet: String,
    pub cidr: Cidr,
    pub node: String,
}

/// A fixed address held cluster-wide by one pod (`vpcnet.io/ip`), so no other pod on any node
/// gets it. Owned by the pod, or by its StatefulSet when the pod keeps its address across
/// deletion and rescheduling (`vpcnet.io/keep-ip: "true"` on the pod template).
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "vpcnet.io",
    version = "v1alpha1",
    kind = "IPClaim",
    plural = "ipclaims",
    shortname = "vip",
    category = "vpcnet",
    derive = "PartialEq",
    doc = "A fixed pod address claimed cluster-wide.",
    printcolumn(name = "IP", type_ = "string", json_path = ".spec.ip"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.pod"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IPClaimSpec {
    pub network: String,
    pub subnet: String,
    #[schemars(regex(pattern = IP_PATTERN))]
    pub ip: String,
    pub namespace: String,
    pub pod: String,
    /// The node whose pod holds the address now (empty while no pod does).
    #[serde(default)]
    pub node: String,
}

/// The CRDs, in the order `kubectl apply` should create them.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        VirtualNetwork::crd(),
        Subnet::crd(),
        IPBlock::crd(),
        IPClaim::crd(),
    ]
}

/// `manifests/crds.yaml`: every CRD as one multi-document YAML file.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated from k8s/src/crd.rs by `VPCNET_BLESS=1 cargo test -p vpcnet-k8s --test crd_manifests`; do not edit.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Address text for object names: DNS-1123 allows lowercase alphanumerics and '-', so dots and
/// colons become dashes (IPv6 is expanded first so two addresses never share a name).
fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(a) => a.segments().map(|s| format!("{s:04x}")).join("-"),
    }
}

/// The IPBlock name of a block of `network`: unique per (network, block), which is exactly what
/// must be claimed once (subnets of one network never overlap; networks may reuse ranges).
pub fn block_name(network: &str, block: ipnetwork::IpNetwork) -> String {
    format!("{network}-{}-{}", dashed(block.network()), block.prefix())
}

/// The IPClaim name of an address of `network`.
pub fn claim_name(network: &str, ip: IpAddr) -> String {
    format!("{network}-{}", dashed(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_are_dns_subdomains_and_distinct() {
        let b = |s: &str| block_name("vpc-a", s.parse().unwrap());
        assert_eq!(b("10.20.1.0/26"), "vpc-a-10-20-1-0-26");
        assert_ne!(b("10.20.1.0/26"), b("10.20.1.0/27"));
        let v6 = b("fd00::40/122");
        assert_eq!(v6, "vpc-a-fd00-0000-0000-0000-0000-0000-0000-0040-122");
        assert!(
            v6.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_eq!(
            claim_name("vpc", "10.0.0.5".parse().unwrap()),
            "vpc-10-0-0-5"
        );
    }

    #[test]
    fn crds_are_cluster_scoped_structural_and_have_a_status_subresource() {
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap();
            assert!(name.ends_with(".vpcnet.io"), "{name}");
            assert_eq!(crd.spec.scope, "Cluster", "{name}");
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            let schema = serde_json::to_value(&v.schema).unwrap();
            // Structural: every property has a type (the API server refuses the CRD otherwise).
            fn typed(v: &serde_json::Value, path: &str) {
                if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                    for (k, p) in props {
                        let here = format!("{path}.{k}");
                        assert!(
                            p.get("type").is_some()
                                || p.get("x-kubernetes-int-or-string").is_some()
                                || p.get("x-kubernetes-preserve-unknown-fields").is_some(),
                            "{here} has no type: {p}"
                        );
                        typed(p, &here);
                    }
                }
                if let Some(items) = v.get("items") {
                    typed(items, &format!("{path}[]"));
                }
            }
            typed(&schema["openAPIV3Schema"], &name);
        }
        let with_status: Vec<_> = crds()
            .into_iter()
            .filter(|c| {
                c.spec.versions[0]
                    .subresources
                    .as_ref()
                    .is_some_and(|s| s.status.is_some())
            })
            .map(|c| c.spec.names.kind)
            .collect();
        assert_eq!(with_status, ["VirtualNetwork", "Subnet"]);
    }
}
