//! The policy maps hold exactly what the compile layer computed, and a restarted daemon reads the
//! same back from the pins (root only; everything lives in one namespace created here, pins under
//! `/sys/fs/bpf/vpcnet/<prefix>`).

mod common;
use common::in_ns;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vpcnet_dataplane::{
    AttachMode, Dataplane, DataplaneConfig, Endpoint, HOST_VETH_PREFIX, PolicyMode, StartOptions,
};
use vpcnet_ipam::{NetworkConfig, SubnetConfig};
use vpcnet_policy::compile::{Compiled, Compiler, plan};
use vpcnet_policy::manifest::parse_files;
use vpcnet_tests::Netns;

/// The run's pins, removed before its namespace goes (the field dropped after `drop`).
struct Guard {
    pins: PathBuf,
    ns: Netns,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Inside the run's namespace: its `eth0` is the one the programs were attached to.
        let _ = vpcnet_tests::netns::in_netns(self.ns.name(), || {
            vpcnet_dataplane::uninstall(&self.pins, "eth0")
        });
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

const LOCAL: [(&str, &str, Ipv4Addr); 3] = [
    ("x", "a", Ipv4Addr::new(10, 20, 1, 10)),
    ("x", "b", Ipv4Addr::new(10, 20, 1, 11)),
    ("y", "a", Ipv4Addr::new(10, 20, 1, 12)),
];
const REMOTE: [(&str, &str, Ipv4Addr); 2] = [
    ("y", "b", Ipv4Addr::new(10, 20, 2, 10)),
    ("z", "a", Ipv4Addr::new(10, 20, 2, 11)),
];

fn state(policies: &str) -> vpcnet_policy::ClusterState {
    let mut m = String::new();
    for ns in ["x", "y", "z"] {
        m += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{ name: {ns}, labels: {{ ns: {ns} }} }}\n"
        );
    }
    for (node, pods) in [("n1", &LOCAL[..]), ("n2", &REMOTE[..])] {
        for (ns, name, ip) in pods {
            // The named port differs per pod: egress rules resolve it on each peer.
            let web = if *name == "a" { 8080 } else { 8081 };
            m += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}, namespace: {ns}, labels: {{ pod: {name} }}, annotations: {{ vpcnet.io/ip: \"{ip}\" }} }}\nspec: {{ nodeName: {node}, containers: [{{ name: c, ports: [{{ name: web, containerPort: {web} }}] }}] }}\n"
            );
        }
    }
    m += policies;
    parse_files(&[(PathBuf::from("m.yaml"), m)]).unwrap()
}

const POLICIES: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: x-in, namespace: x }
spec:
  podSelector: {}
  ingress:
    - from: [{ namespaceSelector: { matchLabels: { ns: y } } }]
      ports: [{ port: 80, endPort: 90 }, { protocol: UDP, port: 53 }]
    - from: [{ ipBlock: { cidr: 10.0.0.0/8, except: [10.20.2.0/24, 10.20.1.12/32] } }]
      ports: [{ port: 443 }]
    - from: [{ ipBlock: { cidr: 10.20.0.0/16 } }]
      ports: [{ port: 8443 }]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: xb-out, namespace: x }
spec:
  podSelector: { matchLabels: { pod: b } }
  policyTypes: [Egress]
  egress:
    - to: [{ namespaceSelector: {} }]
      ports: [{ port: web }]
    - to: [{ ipBlock: { cidr: 0.0.0.0/0, except: [10.0.0.0/8] } }]
    - ports: [{ protocol: SCTP }]
"#;

fn start(ns: &str, pins: &Path) -> Dataplane {
    let net = |s: &str| s.parse().unwrap();
    let cfg = DataplaneConfig {
        pin_dir: pins.to_path_buf(),
        uplink: "eth0".into(),
        networks: vec![NetworkConfig {
            name: "vpc-a".into(),
            id: 1,
            routable_cidrs: vec![net("10.20.0.0/16")],
            masquerade_exclude: vec![],
            peers: vec![],
            default_subnet: None,
            subnets: vec![SubnetConfig {
                name: "main".into(),
                cidr: net("10.20.0.0/16"),
                gateway: None,
                reserved: vec![],
                blocks: [("n1".to_string(), vec![net("10.20.1.0/24")])].into(),
            }],
        }],
        local_pod_cidrs: vec![net("10.20.1.0/24")],
    };
    in_ns(ns, move || {
        Dataplane::start_with(
            cfg,
            StartOptions {
                endpoint_attach: AttachMode::Classic,
                policy: PolicyMode::Enforce,
            },
        )
        .unwrap()
    })
}

/// `EndpointInfo::policy` of every record in the pinned `ENDPOINTS` map.
fn policy_bits(pins: &Path) -> std::collections::BTreeMap<Ipv4Addr, u32> {
    let map =
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(pins.join("ENDPOINTS")).unwrap());
    let eps: aya::maps::HashMap<_, u32, vpcnet_common::EndpointInfo> =
        aya::maps::HashMap::try_from(&map).unwrap();
    eps.iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            (Ipv4Addr::from(k.to_ne_bytes()), v.policy)
        })
        .collect()
}

fn entries(c: &Compiled) -> usize {
    c.endpoints
        .values()
        .flat_map(|e| [&e.ingress, &e.egress])
        .map(|d| d.identities.len() + d.cidrs.len())
        .sum()
}

#[test]
fn policy_maps_hold_the_compiled_rules_across_restarts() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (network namespaces, BPF)"
    );
    let netns = Netns::fresh("n1").unwrap_or_else(|e| panic!("{e:#}"));
    let ns = netns.name().to_string();
    let g = Guard {
        pins: PathBuf::from(vpcnet_tests::cluster::BPF_ROOT).join(&ns),
        ns: netns,
    };
    let ip = |args: &str| {
        let args: Vec<&str> = args.split(' ').collect();
        g.ns.ip(&args).unwrap_or_else(|e| panic!("{e:#}"));
    };
    ip("link add eth0 type veth peer name eth1");
    ip("addr add 10.20.0.11/16 dev eth0");
    ip("link set eth0 up");
    ip("link set eth1 up");
    let dp = start(&ns, &g.pins);
    // Endpoints with real host veths, as after their ADDs.
    for (i, (_, _, addr)) in LOCAL.iter().enumerate() {
        let host = format!("{HOST_VETH_PREFIX}pm{i}");
        ip(&format!("link add {host} type veth peer name p{i}"));
        ip(&format!("link set {host} up"));
        let ifindex = g.ns.ifindex(&host).unwrap_or_else(|e| panic!("{e:#}"));
        let ep = Endpoint {
            ip: *addr,
            host_ifindex: ifindex,
            pod_mac: [2, 0, 0, 0, 0, i as u8],
            network_id: 1,
        };
        in_ns(&ns, || dp.add_endpoint(&ep)).unwrap();
    }

    let mut compiler = Compiler::new(Some("n1".into()));
    let want = compiler.compile(&state(POLICIES));
    assert!(entries(&want) > 10, "a rich rule set: {want:#?}");
    let stats = in_ns(&ns, || dp.sync_policy(&want)).unwrap();
    assert!(stats.ops > 0);
    assert!(
        plan(&dp.applied_policy(), &want).is_empty(),
        "the mirror is what was asked for"
    );
    drop(dp);

    // A restarted daemon reads the maps back: nothing left to do for the same state.
    let dp = start(&ns, &g.pins);
    let back = plan(&dp.applied_policy(), &want);
    assert!(back.is_empty(), "read back differs: {back:#?}");
    assert_eq!(dp.applied_policy().ip_identity, want.ip_identity);

    // Narrow (x-in loses its ipBlocks, xb-out goes), restart, read back again.
    let narrower = POLICIES.split("\n    - from: [{ ipBlock").next().unwrap();
    let want2 = compiler.compile(&state(narrower));
    assert!(entries(&want2) < entries(&want));
    let stats = in_ns(&ns, || dp.sync_policy(&want2)).unwrap();
    assert!(stats.narrowed, "{stats:?}");
    drop(dp);
    let dp = start(&ns, &g.pins);
    let back = plan(&dp.applied_policy(), &want2);
    assert!(
        back.is_empty(),
        "read back after narrowing differs: {back:#?}"
    );

    // An upgrade that changes a rule map's layout (IDENTITIES, value 4 → 8 bytes): the map is
    // recreated empty, and until the next sync every endpoint is closed (fail closed) rather
    // than judged against a partial rule set; that sync writes everything again.
    drop(dp);
    let identities = vpcnet_dataplane::MAP_LAYOUTS
        .iter()
        .find(|l| l.name == "IDENTITIES")
        .unwrap();
    common::replace_pin_with_hash_map(
        &g.pins.join("IDENTITIES"),
        identities.key_size,
        8,
        identities.max_entries,
        &[],
    );
    let dp = start(&ns, &g.pins);
    assert!(dp.applied_policy().ip_identity.is_empty());
    assert!(
        dp.applied_policy()
            .endpoints
            .values()
            .all(|e| e.ingress.isolated && e.egress.isolated),
        "the mirror says closed, as the maps enforce"
    );
    let bits = policy_bits(&g.pins);
    assert_eq!(bits.len(), LOCAL.len());
    assert!(
        bits.values().all(|b| *b == 0),
        "closed until synced: {bits:?}"
    );
    in_ns(&ns, || dp.sync_policy(&want2)).unwrap();
    assert!(plan(&dp.applied_policy(), &want2).is_empty());
    let bits = policy_bits(&g.pins);
    for (ip, e) in &want2.endpoints {
        let mut want_bits = 0;
        if !e.ingress.isolated {
            want_bits |= vpcnet_common::POLICY_INGRESS_OPEN;
        }
        if !e.egress.isolated {
            want_bits |= vpcnet_common::POLICY_EGRESS_OPEN;
        }
        assert_eq!(bits.get(ip), Some(&want_bits), "{ip} after the sync");
    }
    assert!(
        bits.values().any(|b| *b != 0),
        "some endpoint is open again: {bits:?}"
    );
    drop(dp);
    let dp = start(&ns, &g.pins);
    let back = plan(&dp.applied_policy(), &want2);
    assert!(back.is_empty(), "refilled maps read back: {back:#?}");

    // No policies at all: every entry goes, every endpoint opens.
    let open = compiler.compile(&state(""));
    in_ns(&ns, || dp.sync_policy(&open)).unwrap();
    drop(dp);
    let dp = start(&ns, &g.pins);
    assert_eq!(entries(&dp.applied_policy()), 0);
    assert!(
        dp.applied_policy()
            .endpoints
            .values()
            .all(|e| !e.ingress.isolated && !e.egress.isolated)
    );
    drop(dp);
    drop(g);
}
