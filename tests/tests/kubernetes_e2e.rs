//! vpcnet in Kubernetes mode against a real API server (envtest convention: `KUBEBUILDER_ASSETS`
//! names a directory with `kube-apiserver` and `etcd`; without it this says so in one loud line
//! and passes).
//!
//! Two node daemons run in network namespaces and reach the API server (on the root loopback)
//! through a relay on their own loopback. The test plays kubelet's part: it creates Pod objects,
//! runs the plugin for them and writes their status back.

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vpcnet_tests::apiserver::ControlPlane;
use vpcnet_tests::cluster::{
    Cluster, ClusterSpec, Node, PHYS_CIDR, PHYS_HOST_IP, ROUTER_VPC_IP, VPC_CIDR, VPC_HOST_IP,
};
use vpcnet_tests::cni::Pod;
use vpcnet_tests::probe::{self, WhoAmI};
use vpcnet_tests::relay::Relay;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > limit {
            bail!("{what}: not after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The node's kubeconfig: the test's, with the server moved to the relay's port.
fn node_kubeconfig(cp: &ControlPlane, node: &Node, port: u16) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&cp.kubeconfig)?;
    let text = text.replace(&cp.url, &format!("https://127.0.0.1:{port}"));
    let path = node.dir.join("kubeconfig");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn k8s_config(node: &Node, kubeconfig: &Path) -> String {
    json!({
        "node": node.name,
        "uplink": "eth0",
        "state_dir": node.dir.join("state"),
        "socket": node.socket,
        "release_queue": node.release_queue,
        "bpf_dir": node.bpf_dir,
        "reconcile_interval_secs": 5,
        "metrics_addr": "127.0.0.1:9962",
        "cluster": "kubernetes",
        "kubernetes": {
            "kubeconfig": kubeconfig,
            "cni_conf_dir": node.dir.join("net.d"),
        },
        "ipam": {"cooldown_secs": 1},
    })
    .to_string()
}

fn conflist(node: &Node) -> PathBuf {
    node.dir.join("net.d").join("10-vpcnet.conflist")
}

struct Api<'a>(&'a ControlPlane);

impl Api<'_> {
    fn apply(&self, doc: Value) -> Result<String> {
        self.0
            .kubectl(&["apply", "-f", "-"], Some(&doc.to_string()))
    }
    fn get(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.0.kubectl(&a, None)?)?)
    }
    /// A Pod object as the scheduler leaves it: bound to `node`.
    fn pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        labels: Value,
        annotations: Value,
    ) -> Result<()> {
        self.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": labels, "annotations": annotations},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]},
        }))?;
        Ok(())
    }
    /// What kubelet reports once the sandbox has its address.
    fn pod_running(&self, pod: &Pod) -> Result<()> {
        let patch = json!({"status": {"phase": "Running", "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}]}});
        self.0.kubectl(
            &[
                "patch",
                "pod",
                "-n",
                &pod.namespace,
                &pod.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch.to_string(),
            ],
            None,
        )?;
        Ok(())
    }
}

fn tcp_ok(from: &Pod, to: SocketAddrV4) -> bool {
    probe::tcp(&from.ns, to).is_ok()
}

#[test]
fn nodes_claim_blocks_place_pods_enforce_policy_and_move_fixed_addresses() {
    let Some(cp) = ControlPlane::start_or_skip("kubernetes_e2e") else {
        return;
    };
    run(&cp).unwrap();
}

fn run(cp: &ControlPlane) -> Result<()> {
    let api = Api(cp);
    let crds = manifests().join("crds.yaml");
    cp.kubectl(&["apply", "-f", &crds.to_string_lossy()], None)?;
    cp.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        None,
    )?;
    for n in ["node1", "node2"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}))?;
    }
    for ns in ["a", "b"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"team": ns}}}))?;
    }

    let mut c = Cluster::build(ClusterSpec {
        nodes: 2,
        cooldown_secs: 1,
        dataplane: true,
    })?;
    let target: SocketAddr = cp
        .url
        .trim_start_matches("https://")
        .parse()
        .context("API server URL")?;
    let mut relays = Vec::new();
    for i in 0..2 {
        let relay = Relay::start(&c.node(i).ns, target)?;
        let kc = node_kubeconfig(cp, c.node(i), relay.port)?;
        std::fs::write(&c.node(i).config_path, k8s_config(c.node(i), &kc))?;
        relays.push(relay);
    }

    // Readiness gating: no network defined yet, so the daemon answers but is not ready and the
    // node gets no conflist (kubelet keeps it NotReady).
    c.node_mut(0).spawn_daemon()?;
    let status = c.node_mut(0).wait_answering(Duration::from_secs(30))?;
    assert!(
        !status.ready,
        "ready without any VirtualNetwork: {status:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = c.node_mut(0).wait_answering(Duration::from_secs(5))?;
    assert!(!st.ready);
    assert!(
        st.message.contains("VirtualNetwork"),
        "STATUS names what is missing: {st:?}"
    );
    assert!(!conflist(c.node(0)).exists(), "conflist before ready");

    // The network and its subnet, as an operator applies them.
    api.apply(
        json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "VirtualNetwork",
        "metadata": {"name": "vpc-a"},
        "spec": {"id": 1, "default": true, "routableCidrs": [VPC_CIDR, PHYS_CIDR]}}),
    )?;
    api.apply(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "main"},
        "spec": {"network": "vpc-a", "cidr": "10.20.0.0/17", "gateway": ROUTER_VPC_IP.to_string(),
            "reserved": [{"start": "10.20.0.1", "end": "10.20.0.255"}],
            "blockSize": 26, "default": true}}))?;
    // A second subnet of the same VPC that serves namespace b by selector.
    api.apply(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "team-b"},
        "spec": {"network": "vpc-a", "cidr": "10.20.128.0/20", "blockSize": 27,
            "namespaceSelector": {"matchLabels": {"team": "b"}}}}))?;
    // Overlaps `main`: refused, the rest stays in force.
    api.apply(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "overlap"},
        "spec": {"network": "vpc-a", "cidr": "10.20.0.0/24"}}))?;

    let t0 = Instant::now();
    c.node_mut(1).spawn_daemon()?;
    for i in 0..2 {
        let node = c.node(i);
        wait_for(
            "conflist written once ready",
            Duration::from_secs(60),
            || conflist(node).exists().then_some(()),
        )
        .with_context(|| c.node(i).log_tail())?;
    }
    let ready_after = t0.elapsed();
    let text = std::fs::read_to_string(conflist(c.node(0)))?;
    let doc: Value = serde_json::from_str(&text)?;
    assert_eq!(doc["cniVersion"], "1.0.0");
    assert_eq!(doc["plugins"][0]["type"], "vpcnet");

    for n in ["node1", "node2"] {
        let node = api.get(&["node", n])?;
        let cond = node["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable"))
            .cloned();
        assert_eq!(
            cond.as_ref().map(|c| c["status"].clone()),
            Some(json!("False")),
            "{n}: {cond:?}"
        );
    }

    // Blocks: each node claimed at least one of `main`, disjoint, owned by its Node.
    let blocks = api.get(&["ipblocks"])?;
    let items = blocks["items"].as_array().context("items")?;
    let mut cidrs: Vec<(String, String)> = Vec::new();
    for b in items {
        let node = b["spec"]["node"].as_str().unwrap_or_default().to_string();
        let cidr = b["spec"]["cidr"].as_str().unwrap_or_default().to_string();
        let owner = &b["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Node", "{b}");
        assert_eq!(owner["name"], node.as_str(), "{b}");
        cidrs.push((node, cidr));
    }
    let nets: Vec<ipnetwork::Ipv4Network> = cidrs.iter().map(|(_, c)| c.parse().unwrap()).collect();
    for (i, a) in nets.iter().enumerate() {
        for b in &nets[i + 1..] {
            assert!(!a.overlaps(*b), "blocks overlap: {cidrs:?}");
        }
    }
    for n in ["node1", "node2"] {
        assert!(
            cidrs.iter().any(|(node, _)| node == n),
            "{n} has no block: {cidrs:?}"
        );
    }
    eprintln!(
        "kubernetes_e2e: both nodes ready {ready_after:?} after the network was defined; blocks {cidrs:?}"
    );

    // Pods: a/client on node1, a/server on node2, b/web on node2 (subnet team-b by selector).
    api.pod("a", "client", "node1", json!({"app": "client"}), json!({}))?;
    api.pod("a", "server", "node2", json!({"app": "server"}), json!({}))?;
    api.pod("b", "web", "node2", json!({"app": "web"}), json!({}))?;
    let mut add_ms = Vec::new();
    let mut add = |c: &Cluster, node: usize, ns: &str, name: &str| -> Result<Pod> {
        // The pod's object must have reached the node's watch before its ADD.
        let t = Instant::now();
        let mut last = String::new();
        let pod = wait_for(&format!("ADD {ns}/{name}"), Duration::from_secs(20), || {
            c.add_pod(node, ns, name)
                .map_err(|e| last = e.to_string())
                .ok()
        })
        .with_context(|| format!("last error: {last}"))?;
        add_ms.push(t.elapsed().as_secs_f64() * 1e3);
        api.pod_running(&pod)?;
        Ok(pod)
    };
    let client = add(&c, 0, "a", "client")?;
    let server = add(&c, 1, "a", "server")?;
    let web = add(&c, 1, "b", "web")?;
    let team_b: ipnetwork::Ipv4Network = "10.20.128.0/20".parse().unwrap();
    assert!(
        team_b.contains(web.ip),
        "b/web placed by the namespace selector: {}; subnets: {}",
        web.ip,
        cp.kubectl(&["get", "subnets", "-o", "yaml"], None)
            .unwrap_or_default()
    );
    assert!(!team_b.contains(client.ip), "{}", client.ip);

    let port = 8080;
    let _s1 = WhoAmI::start(&server.ns, SocketAddrV4::new(server.ip, port))?;
    let _s2 = WhoAmI::start(&web.ns, SocketAddrV4::new(web.ip, port))?;
    // Across nodes, the VPC host and the physical host, no NAT.
    assert_eq!(
        probe::tcp(&client.ns, SocketAddrV4::new(server.ip, port))?,
        client.ip
    );
    assert_eq!(
        probe::tcp(&client.ns, SocketAddrV4::new(web.ip, port))?,
        client.ip
    );
    assert_eq!(
        probe::tcp(&c.vpc_host, SocketAddrV4::new(server.ip, port))?,
        VPC_HOST_IP
    );
    assert_eq!(
        probe::tcp(&c.phys_host, SocketAddrV4::new(web.ip, port))?,
        PHYS_HOST_IP
    );

    // NetworkPolicy from the API: b/web admits only namespace a's app=client.
    let t = Instant::now();
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "b", "name": "web-from-client"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                    "podSelector": {"matchLabels": {"app": "client"}}}]}]}}),
    )?;
    let web_addr = SocketAddrV4::new(web.ip, port);
    let vpc_host = c.vpc_host.handle();
    wait_for(
        "policy enforced (VPC host refused)",
        Duration::from_secs(10),
        || {
            // A short probe: a dropped SYN shows as a timeout, so its length is the resolution.
            let p = probe::Probe {
                proto: probe::Proto::Tcp,
                to: web_addr,
            };
            let refused = vpc_host
                .run(move || probe::probe_once(p, Duration::from_millis(50)).is_err())
                .unwrap_or(false);
            refused.then_some(())
        },
    )
    .with_context(|| c.node(1).log_tail())?;
    let enforced = t.elapsed();
    assert!(
        tcp_ok(&client, web_addr),
        "the admitted client still reaches web"
    );
    assert!(!tcp_ok(&server, web_addr), "a/server is not admitted");
    eprintln!("kubernetes_e2e: NetworkPolicy API write -> enforced on node2 in {enforced:?}");

    // A fixed address: claimed cluster-wide, refused to a second pod, follows its pod.
    let fixed = Ipv4Addr::new(10, 20, 100, 7);
    let ann = json!({"vpcnet.io/ip": fixed.to_string()});
    api.pod("a", "db", "node1", json!({"app": "db"}), ann.clone())?;
    api.pod("a", "thief", "node2", json!({"app": "thief"}), ann.clone())?;
    let db = add(&c, 0, "a", "db")?;
    assert_eq!(db.ip, fixed);
    let claim = api.get(&["ipclaims"])?;
    assert_eq!(claim["items"][0]["spec"]["pod"], "db", "{claim}");
    assert_eq!(claim["items"][0]["spec"]["node"], "node1", "{claim}");
    let thief = c.add_pod(1, "a", "thief");
    let e = match thief {
        Ok(_) => bail!("a second pod got the fixed address {fixed}"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("claimed by pod a/db") || e.contains("in use by pod a/db"),
        "{e}"
    );
    // db is rescheduled to node2 (a StatefulSet pod recreated with the same name).
    let out = c.del_pod(db)?;
    assert!(out.success, "DEL: {}", out.stderr);
    // No kubelet confirms the deletion here: force it, as a kubelet's final delete would.
    for p in ["db", "thief"] {
        cp.kubectl(
            &[
                "delete",
                "pod",
                "-n",
                "a",
                p,
                "--grace-period=0",
                "--force",
                "--wait=true",
            ],
            None,
        )?;
    }
    api.pod("a", "db", "node2", json!({"app": "db"}), ann)?;
    let db2 = add(&c, 1, "a", "db")?;
    assert_eq!(db2.ip, fixed, "the fixed address follows its pod to node2");
    let _s3 = WhoAmI::start(&db2.ns, SocketAddrV4::new(db2.ip, port))?;
    assert_eq!(
        probe::tcp(&client.ns, SocketAddrV4::new(fixed, port))?,
        client.ip
    );

    // The bad subnet says what is wrong in its status.
    wait_for(
        "Subnet overlap reports its problem",
        Duration::from_secs(15),
        || {
            let s = api.get(&["subnet", "overlap"]).ok()?;
            let text = s["status"].to_string();
            (text.contains("overlaps") && text.contains("\"False\"")).then_some(())
        },
    )?;
    let main = api.get(&["subnet", "main"])?;
    assert!(
        main["status"]["used"].as_u64() >= Some(3),
        "{}",
        main["status"]
    );

    add_ms.sort_by(f64::total_cmp);
    eprintln!(
        "kubernetes_e2e: ADD (incl. the watch seeing the pod) p50 {:.1} ms, max {:.1} ms over {}",
        add_ms[add_ms.len() / 2],
        add_ms[add_ms.len() - 1],
        add_ms.len()
    );
    drop(relays);
    Ok(())
}
