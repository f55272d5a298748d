//! vpcnet in Kubernetes mode against a real API server (envtest convention: `KUBEBUILDER_ASSETS`
//! names a directory with `kube-apiserver` and `etcd`; without it this says so in one loud line
//! and passes).
//!
//! Two node daemons run in network namespaces and reach the API server (on the root loopback)
//! through a relay on their own loopback. The test plays kubelet's part: it creates Pod objects,
//! runs the plugin for them and writes their status back.

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vpcnet_tests::apiserver::ControlPlane;
use vpcnet_tests::cluster::{
    Cluster, PHYS_CIDR, PHYS_HOST_IP, ROUTER_VPC_IP, VPC_CIDR, VPC_HOST_IP,
};
use vpcnet_tests::cni::Pod;
use vpcnet_tests::kube::{Api, PingStream, conflist, kube_cluster, wait_for};
use vpcnet_tests::probe::{self, WhoAmI};

/// One control plane and its node daemons at a time: each test times its dataplane (0 lost
/// packets, enforcement bounds) on 2 shared cores.
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

fn tcp_ok(from: &Pod, to: SocketAddrV4) -> bool {
    probe::tcp(&from.ns, to).is_ok()
}

#[test]
fn nodes_claim_blocks_place_pods_enforce_policy_and_move_fixed_addresses() {
    let _one = serial();
    let Some(cp) = ControlPlane::start_or_skip("kubernetes_e2e") else {
        return;
    };
    run(&cp).unwrap();
}

fn run(cp: &ControlPlane) -> Result<()> {
    let api = Api(cp);
    api.install_crds()?;
    for ns in ["a", "b"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"team": ns}}}))?;
    }
    let (mut c, relays) = kube_cluster(cp, 2)?;

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

/// Whether `from` cannot open a TCP connection to `to` within a short probe (a dropped SYN
/// shows as a timeout), tried `tries` times: one answer is enough to say "not refused".
fn refused(from: &vpcnet_tests::Netns, to: SocketAddrV4, tries: usize) -> bool {
    let ns = from.handle();
    ns.run(move || {
        (0..tries).all(|_| {
            let p = probe::Probe {
                proto: probe::Proto::Tcp,
                to,
            };
            probe::probe_once(p, Duration::from_millis(200)).is_err()
        })
    })
    .unwrap_or(false)
}

/// The CRDs, namespace `a` (label team=a), one network with `subnet` as its default subnet, and
/// two node daemons started and ready.
fn two_ready_nodes(
    cp: &ControlPlane,
    subnet: Value,
) -> Result<(Cluster, Vec<vpcnet_tests::relay::Relay>)> {
    let api = Api(cp);
    api.install_crds()?;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "a", "labels": {"team": "a"}}}))?;
    api.apply(
        json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "VirtualNetwork",
        "metadata": {"name": "vpc-a"},
        "spec": {"id": 1, "default": true, "routableCidrs": [VPC_CIDR, PHYS_CIDR]}}),
    )?;
    let mut spec = json!({"network": "vpc-a", "default": true});
    spec.as_object_mut()
        .context("subnet spec")?
        .extend(subnet.as_object().cloned().unwrap_or_default());
    api.apply(json!({"apiVersion": "vpcnet.io/v1alpha1", "kind": "Subnet",
        "metadata": {"name": "main"}, "spec": spec}))?;
    let (mut c, relays) = kube_cluster(cp, 2)?;
    // One after the other: the block each claims is then predictable (the first free one).
    for i in 0..2 {
        c.node_mut(i).start_daemon()?;
        let node = c.node(i);
        wait_for(
            "conflist written once ready",
            Duration::from_secs(30),
            || conflist(node).exists().then_some(()),
        )?;
    }
    Ok((c, relays))
}

fn main_subnet_large() -> Value {
    json!({"cidr": "10.20.0.0/17", "gateway": ROUTER_VPC_IP.to_string(),
        "reserved": [{"start": "10.20.0.1", "end": "10.20.0.255"}], "blockSize": 26})
}

fn policy(name: &str, selects: &str, admits: &[&str]) -> Value {
    let from: Vec<Value> = admits
        .iter()
        .map(|app| json!({"podSelector": {"matchLabels": {"app": app}}}))
        .collect();
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "a", "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": selects}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": from}]}})
}

const PORT: u16 = 8080;

#[test]
fn an_api_server_outage_opens_nothing_and_the_daemons_resync_after_it() {
    let _one = serial();
    let Some(mut cp) = ControlPlane::start_or_skip("kubernetes_e2e") else {
        return;
    };
    let t = Instant::now();
    api_server_restart(&mut cp).unwrap();
    eprintln!(
        "kubernetes_e2e: API server restart test took {:?}",
        t.elapsed()
    );
}

fn api_server_restart(cp: &mut ControlPlane) -> Result<()> {
    let (c, relays) = two_ready_nodes(cp, main_subnet_large())?;
    let api = Api(cp);
    let wait = Duration::from_secs(20);
    api.pod("a", "client", "node1", json!({"app": "client"}), json!({}))?;
    api.pod("a", "other", "node1", json!({"app": "other"}), json!({}))?;
    api.pod("a", "server", "node2", json!({"app": "server"}), json!({}))?;
    let client = api.add_pod(&c, 0, "a", "client", wait)?;
    let other = api.add_pod(&c, 0, "a", "other", wait)?;
    let server = api.add_pod(&c, 1, "a", "server", wait)?;
    let _w1 = WhoAmI::start(&server.ns, SocketAddrV4::new(server.ip, PORT))?;
    let _w2 = WhoAmI::start(&client.ns, SocketAddrV4::new(client.ip, PORT))?;
    let to_server = SocketAddrV4::new(server.ip, PORT);
    let to_client = SocketAddrV4::new(client.ip, PORT);

    api.apply(policy("server-from-client", "server", &["client"]))?;
    wait_for(
        "the policy enforced before the outage",
        Duration::from_secs(10),
        || refused(&other.ns, to_server, 1).then_some(()),
    )
    .with_context(|| c.node(1).log_tail())?;
    assert_eq!(probe::tcp(&client.ns, to_server)?, client.ip);
    // A pod the scheduler bound before the outage; its sandbox is made during it.
    api.pod("a", "late", "node1", json!({"app": "late"}), json!({}))?;
    std::thread::sleep(Duration::from_millis(1500));

    let stream = PingStream::start(&client.ns, server.ip);
    std::thread::sleep(Duration::from_millis(500));
    // The whole control plane goes (etcd too): the daemons see connections refused.
    cp.stop();
    assert!(!cp.running());
    let outage = Instant::now();
    // Long enough for every watch to notice and start retrying.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        probe::tcp(&client.ns, to_server)?,
        client.ip,
        "the admitted client still reaches the server during the outage"
    );
    assert!(
        refused(&other.ns, to_server, 3),
        "the policy still denies a/other during the outage"
    );
    assert!(
        refused(&c.vpc_host, to_server, 3),
        "the policy still denies the VPC host during the outage"
    );
    // ADD on a node with room in its block: no API call, so it works without the API server.
    let t = Instant::now();
    let late = c
        .add_pod(0, "a", "late")
        .with_context(|| format!("ADD during the outage\n{}", c.node(0).log_tail()))?;
    let add_during_outage = t.elapsed();
    assert_eq!(
        probe::tcp(&late.ns, to_client)?,
        late.ip,
        "the pod added during the outage is wired (client is not isolated)"
    );
    assert!(
        refused(&late.ns, to_server, 3),
        "the pod added during the outage is not admitted by the policy"
    );
    probe::ping(&c.vpc_host, late.ip)?;
    let status = c.node(0).ctl(&["status"]).unwrap_or_default();
    eprintln!("kubernetes_e2e: node1 during the outage:\n{status}");

    cp.start_again()?;
    let outage = outage.elapsed();
    let api = Api(cp);
    let (sent, received) = stream.finish()?;
    assert_eq!(
        sent, received,
        "client -> server lost pings across the API server outage ({sent} sent)"
    );
    assert!(sent >= 500, "the stream ran through the outage: {sent}");

    // After the restart: changes on both nodes are enforced within a bound, measured from the
    // write. node2 opens server to a/other; node1 isolates client to a/server only.
    let t = Instant::now();
    api.apply(policy("server-from-client", "server", &["client", "other"]))?;
    api.apply(policy("client-from-server", "client", &["server"]))?;
    // The watches retry with kube-runtime's default backoff (growing to 30 s): the bound covers
    // its cap; the time it took is printed.
    let bound = Duration::from_secs(35);
    wait_for(
        "node2 admits a/other after the API server restart",
        bound,
        || tcp_ok(&other, to_server).then_some(()),
    )
    .with_context(|| c.node(1).log_tail())?;
    let opened = t.elapsed();
    wait_for(
        "node1 isolates client after the API server restart",
        bound,
        || refused(&late.ns, to_client, 1).then_some(()),
    )
    .with_context(|| c.node(0).log_tail())?;
    let closed = t.elapsed();
    assert_eq!(probe::tcp(&server.ns, to_client)?, server.ip);

    // A pod created after the restart is seen by its node's watch: labels and all (the policy
    // on app=server selects it).
    let t = Instant::now();
    api.pod("a", "fresh", "node2", json!({"app": "server"}), json!({}))?;
    let fresh = api.add_pod(&c, 1, "a", "fresh", Duration::from_secs(20))?;
    let seen = t.elapsed();
    let _w3 = WhoAmI::start(&fresh.ns, SocketAddrV4::new(fresh.ip, PORT))?;
    let to_fresh = SocketAddrV4::new(fresh.ip, PORT);
    assert_eq!(probe::tcp(&client.ns, to_fresh)?, client.ip);
    assert!(
        refused(&late.ns, to_fresh, 3),
        "the pod made after the restart is isolated by the policy selecting its labels"
    );
    eprintln!(
        "kubernetes_e2e: API server down {outage:?}; ADD during it {add_during_outage:?}; after the restart: opened on node2 in {opened:?}, closed on node1 in {closed:?}, new pod added {seen:?} after its object; {sent} pings, none lost"
    );
    drop(relays);
    Ok(())
}

#[test]
fn a_deleted_node_s_blocks_are_freed_for_the_surviving_node() {
    let _one = serial();
    let Some(cp) = ControlPlane::start_or_skip("kubernetes_e2e") else {
        return;
    };
    let t = Instant::now();
    node_deletion(&cp).unwrap();
    eprintln!("kubernetes_e2e: node deletion test took {:?}", t.elapsed());
}

fn node_deletion(cp: &ControlPlane) -> Result<()> {
    // Two blocks of 8 in all: one per node, none left to claim while both nodes live.
    let subnet: ipnetwork::Ipv4Network = "10.20.64.0/28".parse()?;
    let (mut c, relays) =
        two_ready_nodes(cp, json!({"cidr": subnet.to_string(), "blockSize": 29}))?;
    let api = Api(cp);
    let wait = Duration::from_secs(20);

    // Every IPBlock is owned by its node's Node object, by uid: what the GC acts on.
    let uid = |n: &str| api.uid(&["node", n]);
    let (uid1, uid2) = (uid("node1")?, uid("node2")?);
    let blocks_of = |who: &str| -> Result<Vec<(String, ipnetwork::Ipv4Network)>> {
        let all = api.get(&["ipblocks"])?;
        let mut out = Vec::new();
        for b in all["items"].as_array().context("items")? {
            if b["spec"]["node"] == who {
                let name = b["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                out.push((
                    name,
                    b["spec"]["cidr"].as_str().unwrap_or_default().parse()?,
                ));
            }
        }
        Ok(out)
    };
    let all = api.get(&["ipblocks"])?;
    let items = all["items"].as_array().context("items")?;
    assert_eq!(items.len(), 2, "one block per node: {all}");
    for b in items {
        let node = b["spec"]["node"].as_str().unwrap_or_default();
        let owners = b["metadata"]["ownerReferences"]
            .as_array()
            .with_context(|| format!("no ownerReferences: {b}"))?;
        let want = if node == "node1" { &uid1 } else { &uid2 };
        assert!(
            owners.iter().any(|o| o["kind"] == "Node"
                && o["apiVersion"] == "v1"
                && o["name"] == node
                && o["uid"] == want.as_str()),
            "the block is owned by Node {node} (uid {want}): {b}"
        );
    }
    let node1_blocks = blocks_of("node1")?;
    let node2_blocks = blocks_of("node2")?;
    assert_eq!((node1_blocks.len(), node2_blocks.len()), (1, 1));
    let dead_block = node2_blocks[0].1;

    api.pod("a", "p0", "node1", json!({"app": "p"}), json!({}))?;
    api.pod("a", "q", "node2", json!({"app": "q"}), json!({}))?;
    let p0 = api.add_pod(&c, 0, "a", "p0", wait)?;
    let q = api.add_pod(&c, 1, "a", "q", wait)?;
    probe::ping(&q.ns, p0.ip)?;
    probe::ping(&p0.ns, q.ip)?;

    // node1 fills its block; with node2 holding the other one, the subnet is exhausted.
    let mut pods = vec![p0];
    let exhausted = loop {
        let name = format!("fill{}", pods.len());
        api.pod("a", &name, "node1", json!({"app": "p"}), json!({}))?;
        // The object must be in node1's watch first (a "try again" is not exhaustion).
        std::thread::sleep(Duration::from_millis(300));
        match c.add_pod(0, "a", &name) {
            Ok(p) => {
                assert!(
                    node1_blocks[0].1.contains(p.ip),
                    "{} outside node1's block {:?}",
                    p.ip,
                    node1_blocks
                );
                api.pod_running(&p)?;
                pods.push(p);
                assert!(pods.len() <= 8, "more pods than a /29 holds");
            }
            Err(e) => {
                api.force_delete_pod("a", &name)?;
                break e.to_string();
            }
        }
    };
    assert!(
        exhausted.contains("no unclaimed block") || exhausted.to_lowercase().contains("exhaust"),
        "ADD past node1's block fails for want of a block: {exhausted}"
    );
    eprintln!(
        "kubernetes_e2e: node1 held {} pods in its block, then: {exhausted}",
        pods.len()
    );

    // node2 dies: its Node object is deleted, its daemon stops, its machine leaves the fabric.
    cp.kubectl(&["delete", "node", "node2", "--wait=true"], None)?;
    c.node_mut(1).stop_daemon();
    c.node(1).ns.ip(&["link", "set", "eth0", "down"])?;
    // What the garbage collector does (no kube-controller-manager here): every object whose
    // owner is the deleted Node's uid goes; and the pod GC deletes pods bound to a gone node.
    let mut collected = Vec::new();
    for kind in ["ipblocks", "ipclaims"] {
        let list = api.get(&[kind])?;
        for o in list["items"].as_array().into_iter().flatten() {
            let owned = o["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|os| os.iter().any(|r| r["uid"] == uid2.as_str()));
            if owned {
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                cp.kubectl(&["delete", kind, name, "--wait=true"], None)?;
                collected.push(format!("{kind}/{name}"));
            }
        }
    }
    assert!(
        collected.iter().any(|n| n.contains(&node2_blocks[0].0)),
        "the GC's rule finds node2's block: {collected:?}"
    );
    api.force_delete_pod("a", "q")?;
    drop(q);
    let gc_done = Instant::now();

    // node1 drops the dead node's block from its view and claims it when it needs room.
    api.pod("a", "after", "node1", json!({"app": "p"}), json!({}))?;
    let after = api
        .add_pod(&c, 0, "a", "after", Duration::from_secs(15))
        .with_context(|| c.node(0).log_tail())?;
    let reclaimed = gc_done.elapsed();
    assert!(
        dead_block.contains(after.ip),
        "the new pod's {} comes from the freed block {dead_block}",
        after.ip
    );
    let now1 = blocks_of("node1")?;
    assert!(
        now1.iter().any(|(_, b)| *b == dead_block),
        "node1 claimed the freed block: {now1:?}"
    );
    let block = api.get(&[
        "ipblock",
        &now1
            .iter()
            .find(|(_, b)| *b == dead_block)
            .context("block")?
            .0,
    ])?;
    assert_eq!(
        block["metadata"]["ownerReferences"][0]["uid"],
        uid1.as_str(),
        "the reclaimed block is owned by node1 now: {block}"
    );
    // Its pods keep working, old and new, from the VPC and between each other.
    probe::ping(&c.vpc_host, after.ip)?;
    probe::ping(&after.ns, pods[0].ip)?;
    for p in &pods {
        probe::ping(&c.vpc_host, p.ip)?;
    }
    eprintln!(
        "kubernetes_e2e: node2's block {dead_block} reclaimed by node1 {reclaimed:?} after the GC deleted it"
    );
    drop(relays);
    Ok(())
}

#[test]
fn a_daemon_restart_in_kubernetes_mode_loses_no_packet() {
    let _one = serial();
    let Some(cp) = ControlPlane::start_or_skip("kubernetes_e2e") else {
        return;
    };
    let t = Instant::now();
    daemon_restart(&cp).unwrap();
    eprintln!("kubernetes_e2e: daemon restart test took {:?}", t.elapsed());
}

fn daemon_restart(cp: &ControlPlane) -> Result<()> {
    let (mut c, relays) = two_ready_nodes(cp, main_subnet_large())?;
    let api = Api(cp);
    let wait = Duration::from_secs(20);
    api.pod("a", "a", "node1", json!({"app": "client"}), json!({}))?;
    api.pod("a", "other", "node1", json!({"app": "other"}), json!({}))?;
    api.pod("a", "r", "node2", json!({"app": "server"}), json!({}))?;
    let a = api.add_pod(&c, 0, "a", "a", wait)?;
    let other = api.add_pod(&c, 0, "a", "other", wait)?;
    let r = api.add_pod(&c, 1, "a", "r", wait)?;
    let _w = WhoAmI::start(&r.ns, SocketAddrV4::new(r.ip, PORT))?;
    let to_r = SocketAddrV4::new(r.ip, PORT);
    api.apply(policy("server-from-client", "server", &["client"]))?;
    wait_for("the policy enforced", Duration::from_secs(10), || {
        refused(&other.ns, to_r, 1).then_some(())
    })
    .with_context(|| c.node(1).log_tail())?;

    // 100 packets/s each way across the nodes, through a SIGTERM restart and a SIGKILL
    // restart of node2's daemon (the one whose pod the policy isolates); counted per restart.
    let mut results = Vec::new();
    for (how, kill) in [("SIGTERM", false), ("SIGKILL", true)] {
        let there = PingStream::start(&a.ns, r.ip);
        let back = PingStream::start(&r.ns, a.ip);
        std::thread::sleep(Duration::from_millis(500));
        let pid = c.node(1).daemon_pid().context("node2's daemon runs")?;
        let t = Instant::now();
        if kill {
            c.node_mut(1).kill_daemon();
        } else {
            c.node_mut(1).stop_daemon();
        }
        std::thread::sleep(Duration::from_millis(300));
        // Still enforcing while no daemon runs: the pinned maps hold the policy.
        assert!(
            refused(&other.ns, to_r, 2),
            "a/other refused while node2's daemon is down ({how} of {pid})"
        );
        c.node_mut(1).start_daemon()?;
        let gap = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        results.push((how, gap, there.finish()?, back.finish()?));
    }
    eprintln!(
        "kubernetes_e2e: node2's daemon restarts (stop to ready; (sent, received) a -> r, r -> a): {results:?}"
    );
    for (how, _, there, back) in &results {
        assert!(
            there.0 >= 100 && there.0 == there.1 && back.0 == back.1,
            "pings lost across node2's daemon {how} restart: a -> r {there:?}, r -> a {back:?}\n{}",
            c.node(1).log_tail()
        );
    }
    // The restarted daemon is whole: policy still in force, a new pod works.
    assert!(refused(&other.ns, to_r, 3));
    assert_eq!(probe::tcp(&a.ns, to_r)?, a.ip);
    api.pod("a", "n", "node2", json!({"app": "n"}), json!({}))?;
    let n = api.add_pod(&c, 1, "a", "n", wait)?;
    probe::ping(&a.ns, n.ip)?;
    drop(relays);
    Ok(())
}
