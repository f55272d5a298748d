//! The shipped manifests, checked against the code they deploy: every document is a valid object
//! of its kind (no field the API server would drop), the ConfigMap is a Kubernetes-mode config
//! with nothing node-specific, the DaemonSets run the image `cargo xtask image` builds with
//! commands its binaries accept, the pod mounts every path the config names, and the ClusterRole
//! grants exactly what the code needs.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use vpcnet_daemon::config::{ClusterMode, DaemonConfig};
use vpcnet_k8s::crd::{IPBlock, IPClaim, Subnet, VirtualNetwork};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document of the files directly in `dir` (as `kubectl apply -f dir` reads them).
fn documents(dir: &Path) -> Vec<(String, serde_yaml::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, d) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let v = serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{} document {i}: {e}", f.display()));
            if v.is_null() {
                continue;
            }
            let name = f.strip_prefix(root()).unwrap_or(&f).display().to_string();
            docs.push((format!("{name} document {i}"), v));
        }
    }
    docs
}

/// Parses `v` as `K` and fails on anything the typed object does not carry back: k8s-openapi
/// skips unknown fields, and so would the API server (a misspelt `mountPropagation` would be
/// dropped without a word).
fn typed<K>(what: &str, v: &serde_yaml::Value) -> K
where
    K: kube::Resource<DynamicType = ()> + DeserializeOwned + Serialize,
{
    assert_eq!(
        v["apiVersion"].as_str(),
        Some(&*K::api_version(&())),
        "{what}"
    );
    assert_eq!(v["kind"].as_str(), Some(&*K::kind(&())), "{what}");
    let obj: K = serde_yaml::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let original = serde_json::to_value(v).unwrap();
    let back = serde_json::to_value(&obj).unwrap();
    if let Some(diff) = first_difference("", &original, &back) {
        panic!("{what}: {diff} (a field its type does not have, or a value of the wrong type)");
    }
    obj
}

fn first_difference(at: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    use serde_json::Value::*;
    match (a, b) {
        (Object(x), Object(y)) => {
            for (k, va) in x {
                let here = format!("{at}.{k}");
                match y.get(k) {
                    None => return Some(format!("{here} is dropped when parsed")),
                    Some(vb) => {
                        if let Some(d) = first_difference(&here, va, vb) {
                            return Some(d);
                        }
                    }
                }
            }
            None
        }
        (Array(x), Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(&format!("{at}[{i}]"), va, vb)),
        // Numbers written as 1 and read back as 1.0 and the like.
        (Number(x), Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(format!("{at} is {a} in the file, {b} once parsed")),
    }
}

/// Everything `kubectl apply -f manifests/` creates, by kind.
#[derive(Default)]
struct Install {
    daemonsets: Vec<DaemonSet>,
    configmaps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    crds: Vec<CustomResourceDefinition>,
}

fn load(dir: &Path) -> Install {
    let mut out = Install::default();
    for (what, v) in documents(dir) {
        match v["kind"].as_str() {
            Some("DaemonSet") => out.daemonsets.push(typed(&what, &v)),
            Some("ConfigMap") => out.configmaps.push(typed(&what, &v)),
            Some("ServiceAccount") => out.service_accounts.push(typed(&what, &v)),
            Some("ClusterRole") => out.cluster_roles.push(typed(&what, &v)),
            Some("ClusterRoleBinding") => out.bindings.push(typed(&what, &v)),
            Some("CustomResourceDefinition") => out.crds.push(typed(&what, &v)),
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }
    out
}

fn install() -> Install {
    load(&root().join("manifests"))
}

fn one<T>(v: Vec<T>, what: &str) -> T {
    assert_eq!(v.len(), 1, "expected one {what}");
    v.into_iter().next().unwrap()
}

fn shipped_config() -> DaemonConfig {
    let cm = one(install().configmaps, "ConfigMap");
    let data = cm.data.expect("ConfigMap data");
    // The daemon writes the conflist; a copy here would be a second, drifting source of truth.
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["vpcnetd.yaml"],
        "the ConfigMap holds only the daemon's config"
    );
    DaemonConfig::parse(Path::new("manifests/configmap.yaml"), &data["vpcnetd.yaml"])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_manifest_parses_into_its_type() {
    let i = install();
    assert_eq!(i.daemonsets.len(), 1);
    assert_eq!(i.configmaps.len(), 1);
    assert_eq!(i.service_accounts.len(), 1);
    assert_eq!(i.cluster_roles.len(), 1);
    assert_eq!(i.bindings.len(), 1);
    let crds: BTreeSet<String> = i.crds.iter().map(|c| c.spec.names.plural.clone()).collect();
    assert_eq!(crds, vpcnet_resources().into_iter().collect());
    let u = load(&root().join("manifests/uninstall"));
    assert_eq!(
        u.daemonsets.len(),
        1,
        "manifests/uninstall/ is one DaemonSet"
    );
    assert!(u.configmaps.is_empty() && u.cluster_roles.is_empty() && u.crds.is_empty());
    // The examples are the CRDs' own types.
    for (what, v) in documents(&root().join("manifests/examples")) {
        match v["kind"].as_str() {
            Some("VirtualNetwork") => {
                let _: VirtualNetwork = typed(&what, &v);
            }
            Some("Subnet") => {
                let _: Subnet = typed(&what, &v);
            }
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }
}

#[test]
fn configmap_is_a_node_agnostic_kubernetes_config() {
    let c = shipped_config();
    assert_eq!(c.cluster, ClusterMode::Kubernetes);
    assert_eq!(c.node, "", "the node's name comes from VPCNET_NODE");
    assert!(c.ipam.networks.is_empty() && c.ipam.default_network.is_none());
    assert!(c.manifests_dir.is_none());
    assert_eq!(c.ipam.cooldown_secs, 30);
}

/// What `cargo xtask image` tags: the repository named in xtask/src/image.rs, at this version
/// and `latest`.
fn image_tags() -> Vec<String> {
    let src = std::fs::read_to_string(root().join("xtask/src/image.rs")).unwrap();
    let line = src
        .lines()
        .find(|l| l.starts_with("pub const IMAGE_NAME: &str = "))
        .expect("xtask/src/image.rs names the image in IMAGE_NAME");
    let name = line.split('"').nth(1).expect("a string literal");
    // The xtask and the daemon share the workspace version.
    vec![
        format!("{name}:{}", env!("CARGO_PKG_VERSION")),
        format!("{name}:latest"),
    ]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().expect("a pod template")
}

fn all_containers(p: &PodSpec) -> Vec<&k8s_openapi::api::core::v1::Container> {
    p.init_containers
        .iter()
        .flatten()
        .chain(&p.containers)
        .collect()
}

/// Runs `args` (the manifest's command) with `--help` appended: clap rejects an unknown
/// subcommand or option before it prints help, so this passes only when the binary accepts the
/// command as written.
fn accepts(command: &[String]) {
    let bin = match command[0].as_str() {
        "vpcnetd" => env!("CARGO_BIN_EXE_vpcnetd"),
        "vpcnetctl" => env!("CARGO_BIN_EXE_vpcnetctl"),
        other => panic!("{command:?}: {other} is not in the image (it has no shell)"),
    };
    let out = std::process::Command::new(bin)
        .args(&command[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn daemonsets_run_the_built_image_with_commands_it_accepts() {
    let tags = image_tags();
    let ds = one(install().daemonsets, "DaemonSet");
    let un = one(
        load(&root().join("manifests/uninstall")).daemonsets,
        "DaemonSet",
    );
    for ds in [&ds, &un] {
        let p = pod_spec(ds);
        assert_eq!(p.host_network, Some(true));
        for c in all_containers(p) {
            let image = c.image.as_deref().unwrap_or_default();
            assert!(
                tags.iter().any(|t| t == image),
                "{}: {image} is not one of {tags:?}",
                c.name
            );
            // A locally loaded image: Always would send kubelet to a registry that has none.
            assert_eq!(
                c.image_pull_policy.as_deref(),
                Some("IfNotPresent"),
                "{}",
                c.name
            );
            let command = c.command.as_ref().expect("an explicit command");
            accepts(command);
            assert!(
                c.lifecycle.is_none(),
                "{}: no hooks (no shell to run them)",
                c.name
            );
        }
    }
    let p = pod_spec(&ds);
    let init = p.init_containers.as_ref().expect("an init container");
    assert!(
        init.iter()
            .any(|c| c.command.as_ref().unwrap()[..2] == ["vpcnetd", "install-plugin"]),
        "the init container installs the plugin"
    );
    let probe = p.containers[0]
        .readiness_probe
        .as_ref()
        .expect("a readiness probe");
    accepts(probe.exec.as_ref().unwrap().command.as_ref().unwrap());
}

/// The host path a container path is on, through the pod's hostPath volumes.
fn host_mount<'a>(
    p: &'a PodSpec,
    c: &'a k8s_openapi::api::core::v1::Container,
    path: &Path,
) -> Option<&'a k8s_openapi::api::core::v1::VolumeMount> {
    c.volume_mounts.iter().flatten().find(|m| {
        path.starts_with(&m.mount_path)
            && p.volumes
                .iter()
                .flatten()
                .any(|v| v.name == m.name && v.host_path.is_some())
    })
}

#[test]
fn the_daemon_pod_mounts_every_host_path_the_config_names() {
    let c = shipped_config();
    let ds = one(install().daemonsets, "DaemonSet");
    let p = pod_spec(&ds);
    let daemon = &p.containers[0];
    assert_eq!(daemon.command.as_ref().unwrap()[0], "vpcnetd");
    // The plugin runs on the host and finds the socket and the release queue there; the store
    // and the pins outlive the pod; kubelet reads the conflist on the host.
    for (what, path) in [
        ("socket", c.socket.clone()),
        ("release_queue", c.release_queue.clone()),
        ("state_dir", c.state_dir.clone()),
        ("bpf_dir", c.bpf_dir.clone()),
        ("kubernetes.cni_conf_dir", c.kubernetes.cni_conf_dir.clone()),
    ] {
        assert!(
            host_mount(p, daemon, &path).is_some(),
            "{what} {} is not on a hostPath",
            path.display()
        );
    }
    let bpf = host_mount(p, daemon, &c.bpf_dir).unwrap();
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    let config_arg = daemon
        .command
        .as_ref()
        .unwrap()
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config");
    assert!(
        daemon
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| Path::new(config_arg).starts_with(&m.mount_path)
                && p.volumes
                    .iter()
                    .flatten()
                    .any(|v| v.name == m.name && v.config_map.is_some())),
        "{config_arg} comes from the ConfigMap"
    );
    assert!(
        daemon.env.iter().flatten().any(|e| e.name == "VPCNET_NODE"
            && e.value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("spec.nodeName")),
        "VPCNET_NODE from the downward API"
    );
    // The init container writes into the host's CNI bin dir.
    let init = &p.init_containers.as_ref().unwrap()[0];
    let cmd = init.command.as_ref().unwrap();
    let to = cmd
        .iter()
        .skip_while(|a| *a != "--to")
        .nth(1)
        .expect("--to");
    let m = host_mount(p, init, Path::new(to)).expect("--to is on a hostPath");
    let v = p
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    assert_eq!(v.host_path.as_ref().unwrap().path, "/opt/cni/bin");
    // The uninstall pod reaches the same conflist and pins.
    let un = one(
        load(&root().join("manifests/uninstall")).daemonsets,
        "DaemonSet",
    );
    let up = pod_spec(&un);
    let undo = &up.init_containers.as_ref().unwrap()[0];
    assert!(
        undo.command
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a == "uninstall")
    );
    for path in [&c.bpf_dir, &c.kubernetes.cni_conf_dir] {
        assert!(
            host_mount(up, undo, path).is_some(),
            "uninstall: {} is not on a hostPath",
            path.display()
        );
    }
}

/// The plurals of the vpcnet.io kinds, from the Rust types the CRDs are generated from.
fn vpcnet_resources() -> Vec<String> {
    fn plural<K: kube::Resource<DynamicType = ()>>() -> String {
        K::plural(&()).into_owned()
    }
    vec![
        plural::<VirtualNetwork>(),
        plural::<Subnet>(),
        plural::<IPBlock>(),
        plural::<IPClaim>(),
    ]
}

/// One thing the daemon does on the API server, and where.
struct Need {
    group: &'static str,
    resource: String,
    verbs: &'static [&'static str],
    why: &'static str,
}

fn need(
    group: &'static str,
    resource: &str,
    verbs: &'static [&'static str],
    why: &'static str,
) -> Need {
    Need {
        group,
        resource: resource.into(),
        verbs,
        why,
    }
}

/// Everything the daemon does on the API server.
fn needs() -> Vec<Need> {
    const WATCH: &str = "k8s/src/watch.rs watch_all: a watcher (list, then watch) per kind";
    let mut n = vec![
        need("", "pods", &["list", "watch"], WATCH),
        need("", "namespaces", &["list", "watch"], WATCH),
        need("", "nodes", &["list", "watch"], WATCH),
        need(
            "networking.k8s.io",
            "networkpolicies",
            &["list", "watch"],
            WATCH,
        ),
    ];
    for r in vpcnet_resources() {
        n.push(need("vpcnet.io", &r, &["list", "watch"], WATCH));
    }
    n.extend([
        need(
            "vpcnet.io",
            &plural_of::<IPBlock>(),
            &["create", "delete"],
            "k8s/src/claims.rs claim_block (create), release_block (delete)",
        ),
        need(
            "vpcnet.io",
            &plural_of::<IPClaim>(),
            &["create", "delete"],
            "k8s/src/claims.rs claim_ip (create); a released fixed address (delete)",
        ),
        need(
            "",
            "nodes/status",
            &["patch"],
            "k8s/src/node.rs set_network_available (patch_status)",
        ),
        need(
            "apps",
            "statefulsets",
            &["get"],
            "k8s/src/claims.rs claim_ip: a kept address is owned by its StatefulSet",
        ),
        need(
            "vpcnet.io",
            &format!("{}/status", plural_of::<Subnet>()),
            &["patch"],
            "planned (issue 11): Subnet status, addresses used and free, conditions",
        ),
        need(
            "vpcnet.io",
            &format!("{}/status", plural_of::<VirtualNetwork>()),
            &["patch"],
            "planned (issue 11): VirtualNetwork status conditions",
        ),
        need(
            "",
            "events",
            &["create"],
            "planned (issue 11): events on claim failures and exhaustion",
        ),
        need(
            "events.k8s.io",
            "events",
            &["create"],
            "planned (issue 11): events on claim failures and exhaustion",
        ),
    ]);
    n
}

fn plural_of<K: kube::Resource<DynamicType = ()>>() -> String {
    K::plural(&()).into_owned()
}

/// Granted by design beyond the strict needs: `get` beside each watch (one object, for
/// `kubectl auth can-i` parity and diagnostics), `get`/`update` beside status patches (a
/// read-modify-write status writer), `patch` on events (an event recorder aggregates repeats).
fn also_granted() -> Vec<(String, String, &'static str)> {
    let mut a = Vec::new();
    for (g, r) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        a.push((g.to_string(), r.to_string(), "get"));
    }
    for r in vpcnet_resources() {
        a.push(("vpcnet.io".into(), r, "get"));
    }
    for r in [plural_of::<Subnet>(), plural_of::<VirtualNetwork>()] {
        for verb in ["get", "update"] {
            a.push(("vpcnet.io".into(), format!("{r}/status"), verb));
        }
    }
    for g in ["", "events.k8s.io"] {
        a.push((g.into(), "events".into(), "patch"));
    }
    a
}

#[test]
fn cluster_role_grants_what_the_code_needs_and_nothing_else() {
    let i = install();
    let role = one(i.cluster_roles, "ClusterRole");
    let rules = role.rules.expect("rules");
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for r in &rules {
        let groups = r.api_groups.clone().unwrap_or_default();
        let resources = r.resources.clone().unwrap_or_default();
        assert!(r.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(r.resource_names.is_none(), "rules name no single objects");
        for x in groups.iter().chain(&resources).chain(&r.verbs) {
            assert!(!x.contains('*'), "wildcard {x:?} in {r:?}");
        }
        for res in &resources {
            assert!(
                !res.starts_with("secrets"),
                "secrets are never granted: {r:?}"
            );
            for g in &groups {
                for verb in &r.verbs {
                    granted.insert((g.clone(), res.clone(), verb.clone()));
                }
            }
        }
    }
    let mut expected: BTreeSet<(String, String, String)> = BTreeSet::new();
    for n in needs() {
        for verb in n.verbs {
            let key = (n.group.to_string(), n.resource.clone(), verb.to_string());
            assert!(
                granted.contains(&key),
                "not granted: {verb} {} in group {:?}, needed by {}",
                n.resource,
                n.group,
                n.why
            );
            expected.insert(key);
        }
    }
    for (g, r, verb) in also_granted() {
        expected.insert((g, r, verb.to_string()));
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    assert!(
        extra.is_empty(),
        "granted beyond what the code needs: {extra:?}"
    );

    // Bound to the service account the DaemonSet runs as.
    let sa = one(i.service_accounts, "ServiceAccount");
    let b = one(i.bindings, "ClusterRoleBinding");
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let ds = one(i.daemonsets, "DaemonSet");
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    assert_eq!(pod_spec(&ds).service_account_name, sa.metadata.name);
}
