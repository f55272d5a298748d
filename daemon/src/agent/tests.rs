//! The agent's orchestration on a temporary store, with kernel routes or a recording fake
//! dataplane.

use super::*;
use crate::state::cluster_state;
use crate::state::source::{StateError, StateSource};
use crate::wire;
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use vpcnet_api::release_queue::{self, QueuedRelease};
use vpcnet_api::{AllocateRequest, CheckRequest, EndpointReadyRequest, GcRequest, code};
use vpcnet_dataplane::SyncStats;
use vpcnet_ipam::{Lifecycle, Wiring};
use vpcnet_policy::{ClusterState, Compiled};

/// A source whose first state comes when the test publishes it, as a watch's initial list
/// does.
struct Pending {
    tx: watch::Sender<Option<Arc<ClusterState>>>,
}

impl Pending {
    fn new() -> Arc<Pending> {
        Arc::new(Pending {
            tx: watch::channel(None).0,
        })
    }

    fn publish(&self, state: ClusterState) -> u64 {
        let generation = state.generation();
        self.tx.send_replace(Some(Arc::new(state)));
        generation
    }
}

impl StateSource for Pending {
    fn origin(&self) -> String {
        "the test's watch".into()
    }
    fn snapshot(&self) -> Result<Arc<ClusterState>, StateError> {
        self.tx
            .borrow()
            .clone()
            .ok_or_else(|| StateError::NotSynced {
                origin: self.origin(),
                cause: None,
            })
    }
    fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterState>>> {
        self.tx.subscribe()
    }
    fn last_error(&self) -> Option<StateError> {
        None
    }
}

/// A dataplane that records what it is told, and enforces policy if asked to.
#[derive(Default)]
struct Recorder {
    enforce: bool,
    /// How long each policy sync takes, so concurrent callers pile up behind one.
    sync_delay: Duration,
    added: Mutex<Vec<(Ipv4Addr, Wiring, u16)>>,
    removed: Mutex<Vec<Ipv4Addr>>,
    installed: Mutex<BTreeSet<Ipv4Addr>>,
    syncs: AtomicUsize,
    last_policy: Mutex<Option<Compiled>>,
}

impl Forwarding for Arc<Recorder> {
    fn add_endpoint(&self, ep: &DataplaneEndpoint<'_>) -> Result<(), ForwardingError> {
        self.added
            .lock()
            .unwrap()
            .push((ep.ip(), ep.wiring(), ep.network_id()));
        self.installed.lock().unwrap().insert(ep.ip());
        Ok(())
    }
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), ForwardingError> {
        self.removed.lock().unwrap().push(ip);
        self.installed.lock().unwrap().remove(&ip);
        Ok(())
    }
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, ForwardingError> {
        Ok(self.installed.lock().unwrap().iter().copied().collect())
    }
    fn counters(&self) -> Result<vpcnet_api::CountersInfo, ForwardingError> {
        KernelRoutes.counters()
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
    fn enforces_policy(&self) -> bool {
        self.enforce
    }
    fn sync_policy(&self, new: &Compiled) -> Result<SyncStats, ForwardingError> {
        std::thread::sleep(self.sync_delay);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        *self.last_policy.lock().unwrap() = Some(new.clone());
        Ok(SyncStats::default())
    }
}

fn config(dir: &std::path::Path, extra: &str) -> DaemonConfig {
    serde_yaml::from_str(&format!(
        r#"
node: n1
uplink: eth0
state_dir: {d}
socket: {d}/sock
release_queue: {d}/queue
{extra}
ipam:
  cooldown_secs: 0
  networks:
    - name: vpc
      id: 1
      subnets:
        - name: main
          cidr: 10.20.0.0/16
          blocks: {{ n1: [10.20.1.0/24] }}
        - name: other
          cidr: 10.30.0.0/16
          blocks: {{ n1: [10.30.1.0/24] }}
"#,
        d = dir.display()
    ))
    .unwrap()
}

fn agent_with(dir: &std::path::Path, extra: &str, fwd: Box<dyn Forwarding>) -> Agent {
    let config = config(dir, extra);
    std::fs::create_dir_all(&config.release_queue).unwrap();
    let ipam = Ipam::open(&config.ipam_db(), config.ipam.clone(), &config.node).unwrap();
    Agent::new(config, Arc::new(ipam), fwd, 1500)
}

fn agent(dir: &std::path::Path, source: Option<Arc<dyn StateSource>>) -> Agent {
    let a = agent_with(dir, "", Box::new(KernelRoutes));
    match source {
        Some(s) => a.with_state_source(s),
        None => a,
    }
}

fn recorded(dir: &std::path::Path, rec: &Arc<Recorder>) -> Agent {
    agent_with(dir, "", Box::new(rec.clone()))
}

fn add(container: &str, pod: &str) -> AllocateRequest {
    serde_json::from_value(serde_json::json!({
        "key": {"container_id": container, "ifname": "eth0"},
        "pod": {"namespace": "x", "name": pod},
        "host_veth": format!("veth{container}"),
    }))
    .unwrap()
}

fn ready(container: &str, ips: Vec<IpAddr>, ifindex: u32) -> EndpointReadyRequest {
    EndpointReadyRequest {
        key: api_key(container),
        ips,
        host_veth: format!("veth{container}"),
        host_ifindex: ifindex,
        pod_mac: [2, 0, 0, 0, 0, ifindex as u8],
    }
}

fn api_key(container: &str) -> vpcnet_api::AttachmentKey {
    vpcnet_api::AttachmentKey {
        container_id: container.into(),
        ifname: "eth0".into(),
    }
}

fn key(container: &str) -> vpcnet_ipam::AttachmentKey {
    wire::key(&api_key(container))
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> vpcnet_policy::model::Pod {
    vpcnet_policy::model::Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: Default::default(),
        ip: None,
        node: None,
        ports: Vec::new(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Allocates and readies `container`, returning its address.
fn wired(a: &Agent, container: &str, ifindex: u32) -> IpAddr {
    let ep = a.allocate(&add(container, container)).unwrap();
    a.endpoint_ready(&ready(container, vec![ep.ip()], ifindex))
        .unwrap();
    ep.ip()
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("{ip} is not IPv4"),
    }
}

#[test]
fn add_waits_for_the_cluster_state_and_then_follows_its_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let source = Pending::new();
    let a = agent(dir.path(), Some(source.clone()));

    let e = wire::agent_error(&a.allocate(&add("c1", "a")).unwrap_err());
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{}", e.msg);
    assert!(e.msg.contains("not synced yet"), "{}", e.msg);
    assert!(e.msg.contains("the test's watch"), "{}", e.msg);
    assert!(a.list().unwrap().is_empty(), "allocated while refusing");
    // A container without a pod name waits too: its namespace's policies are not known.
    let mut anonymous = add("c0", "");
    anonymous.pod.namespace.clear();
    let e = a.allocate(&anonymous).unwrap_err();
    assert_eq!(wire::agent_error(&e).code, code::TRY_AGAIN_LATER);

    // Synced: the pod's annotation places it (not the default subnet).
    let mut state = ClusterState::new();
    state.upsert_pod(pod("a", &[(cluster_state::ANNOTATION_SUBNET, "other")]));
    source.publish(state);
    let ep = a.allocate(&add("c1", "a")).unwrap();
    assert_eq!(ep.subnet(), "other");
    assert!(ep.ip().to_string().starts_with("10.30."), "{:?}", ep.ip());
    // A pod the state does not know gets the default.
    assert_eq!(a.allocate(&add("c2", "b")).unwrap().subnet(), "main");
}

#[test]
fn without_a_source_add_is_not_gated() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), None);
    assert_eq!(a.allocate(&add("c1", "a")).unwrap().subnet(), "main");
}

#[test]
fn a_bad_ip_annotation_or_two_static_addresses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = Pending::new();
    let a = agent(dir.path(), Some(source.clone()));
    let mut state = ClusterState::new();
    state.upsert_pod(pod("a", &[(cluster_state::ANNOTATION_IP, "ten")]));
    source.publish(state);
    let e = wire::agent_error(&a.allocate(&add("c1", "a")).unwrap_err());
    assert_eq!(e.code, code::INVALID_CONFIG);
    assert_eq!(
        e.msg,
        format!(
            "pod x/a has annotation {}=\"ten\", which is not an IP address",
            cluster_state::ANNOTATION_IP
        )
    );
    let mut two = add("c2", "b");
    two.static_ips = vec!["10.20.1.5".parse().unwrap(), "10.20.1.6".parse().unwrap()];
    let e = wire::agent_error(&a.allocate(&two).unwrap_err());
    assert_eq!(e.code, code::UNSUPPORTED_FIELD);
    assert_eq!(
        e.msg,
        "2 static addresses requested; vpcnet gives a pod one address"
    );
    assert!(a.list().unwrap().is_empty());
}

#[test]
fn endpoint_ready_records_the_wiring_and_is_ready_at_the_policy_generation() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder {
        enforce: true,
        ..Default::default()
    });
    let source = Pending::new();
    let a = recorded(dir.path(), &rec).with_state_source(source.clone());
    let mut state = ClusterState::new();
    state.upsert_pod(pod("c1", &[]));
    state.upsert_pod(pod("other", &[]));
    let generation = source.publish(state);
    assert!(generation > 0);

    let ip = wired(&a, "c1", 17);
    let wiring = Wiring {
        host_ifindex: 17,
        pod_mac: [2, 0, 0, 0, 0, 17],
    };
    assert_eq!(*rec.added.lock().unwrap(), vec![(v4(ip), wiring, 1)]);
    let ep = a.ipam().get(&key("c1")).unwrap().unwrap();
    assert_eq!(ep.wiring, Some(wiring));
    assert_eq!(
        ep.state,
        Lifecycle::Ready {
            policy_revision: generation
        }
    );
    // Its policy went in before its endpoint (isolated from the first packet).
    let policy = rec.last_policy.lock().unwrap().clone().unwrap();
    assert!(policy.endpoints.contains_key(&v4(ip)), "{policy:?}");
}

#[test]
fn endpoint_ready_refuses_other_addresses_and_a_released_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a = recorded(dir.path(), &rec);
    let ep = a.allocate(&add("c1", "p")).unwrap();
    let wrong: IpAddr = "10.20.1.200".parse().unwrap();
    let e = wire::agent_error(&a.endpoint_ready(&ready("c1", vec![wrong], 5)).unwrap_err());
    assert_eq!(e.code, code::INTERNAL);
    assert_eq!(
        e.msg,
        format!(
            "endpoint reports {wrong} but {} was allocated to it",
            ep.ip()
        )
    );
    assert!(rec.added.lock().unwrap().is_empty());
    let held = a.ipam().get(&key("c1")).unwrap().unwrap();
    assert_eq!(held.state, Lifecycle::Allocated);
    assert_eq!(held.wiring, None);

    let e = wire::agent_error(
        &a.endpoint_ready(&ready("gone", vec![ep.ip()], 5))
            .unwrap_err(),
    );
    assert_eq!(e.code, code::UNKNOWN_CONTAINER);
    assert_eq!(
        e.msg,
        "no allocation for container gone ifname eth0: it was released (DEL or GC) while ADD ran"
    );
}

#[test]
fn release_is_idempotent_and_returns_the_endpoint_once() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a = recorded(dir.path(), &rec);
    let ip = wired(&a, "c1", 3);
    let released = a.release(&key("c1")).unwrap().expect("released");
    assert_eq!(released.ip(), ip);
    assert_eq!(released.key, key("c1"));
    assert_eq!(*rec.removed.lock().unwrap(), vec![v4(ip)]);
    assert!(a.release(&key("c1")).unwrap().is_none());
    assert_eq!(rec.removed.lock().unwrap().len(), 1);
    assert!(a.list().unwrap().is_empty());
    assert_eq!(a.metrics().releases.get(), 1);
}

#[test]
fn check_compares_the_addresses_held() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), None);
    let ip = a.allocate(&add("c1", "p")).unwrap().ip();
    let check = |container: &str, ips: Vec<IpAddr>| {
        a.check(&CheckRequest {
            key: api_key(container),
            ips,
        })
    };
    check("c1", vec![ip]).unwrap();
    let e = wire::agent_error(&check("c1", vec![]).unwrap_err());
    assert_eq!(e.code, code::CHECK_FAILED);
    assert_eq!(
        e.msg,
        format!("container has {ip} in vpcnetd but no address in its result")
    );
    let e = wire::agent_error(&check("c9", vec![ip]).unwrap_err());
    assert_eq!(e.code, code::CHECK_FAILED);
    assert_eq!(
        e.msg,
        "vpcnetd has no allocation for container c9 ifname eth0"
    );
}

#[test]
fn gc_releases_only_what_is_not_valid() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a = recorded(dir.path(), &rec);
    let ip1 = wired(&a, "c1", 1);
    let ip2 = wired(&a, "c2", 2);
    let ip3 = a.allocate(&add("c3", "c3")).unwrap().ip();
    let released = a
        .gc(&GcRequest {
            valid: vec![api_key("c2")],
            network: None,
        })
        .unwrap();
    let mut got: Vec<IpAddr> = released.iter().map(|e| e.ip()).collect();
    got.sort();
    let mut want = vec![ip1, ip3];
    want.sort();
    assert_eq!(got, want);
    let left: Vec<_> = a.list().unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(left, vec![key("c2")]);
    assert_eq!(rec.endpoints().unwrap(), vec![v4(ip2)]);
    // Another network's GC touches nothing here.
    let none = a
        .gc(&GcRequest {
            valid: vec![],
            network: Some("elsewhere".into()),
        })
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(a.list().unwrap().len(), 1);
}

#[test]
fn reconcile_releases_gone_attachments_keeps_young_pending_ones_and_removes_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a = recorded(dir.path(), &rec);
    let gone = wired(&a, "c1", 1);
    let live = wired(&a, "c2", 2);
    // Its ADD is still running: no veth yet, well within the grace period.
    a.allocate(&add("c3", "c3")).unwrap();
    let orphan: Ipv4Addr = "10.20.1.250".parse().unwrap();
    rec.installed.lock().unwrap().insert(orphan);

    let links: HashSet<String> = ["vethc2".to_string(), "eth0".to_string()].into();
    assert_eq!(a.reconcile(&links).unwrap(), 1);
    let mut left: Vec<_> = a.list().unwrap().into_iter().map(|e| e.key).collect();
    left.sort();
    assert_eq!(left, vec![key("c2"), key("c3")]);
    let removed = rec.removed.lock().unwrap().clone();
    assert_eq!(removed, vec![v4(gone), orphan]);
    assert_eq!(rec.endpoints().unwrap(), vec![v4(live)]);
    assert_eq!(a.metrics().reconcile_released.get(), 1);
}

#[test]
fn reconcile_releases_a_pending_attachment_past_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent_with(dir.path(), "pending_grace_secs: 0", Box::new(KernelRoutes));
    a.allocate(&add("c1", "c1")).unwrap();
    assert_eq!(a.reconcile(&HashSet::new()).unwrap(), 1);
    assert!(a.list().unwrap().is_empty());
}

fn enqueue(a: &Agent, entry: &QueuedRelease) -> std::path::PathBuf {
    release_queue::enqueue(&a.config().release_queue, entry).unwrap()
}

#[test]
fn replay_releases_a_matching_entry_and_drops_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let a = recorded(dir.path(), &rec);
    // Queued before c1 was allocated: a DEL of an earlier attachment of the key.
    let stale = enqueue(
        &a,
        &QueuedRelease {
            key: api_key("c1"),
            queued_unix_ms: 1,
            ip: None,
        },
    );
    let ip1 = wired(&a, "c1", 1);
    let ip2 = wired(&a, "c2", 2);
    let ip3 = wired(&a, "c3", 3);
    std::thread::sleep(Duration::from_millis(5));
    let matching = enqueue(&a, &QueuedRelease::now(api_key("c2"), Some(ip2)));
    // Names another address than c3 holds: not the release of this allocation.
    let other_ip = enqueue(
        &a,
        &QueuedRelease::now(api_key("c3"), Some("10.20.1.77".parse().unwrap())),
    );
    // Nothing to release any more.
    let nothing = enqueue(&a, &QueuedRelease::now(api_key("c9"), None));

    assert_eq!(a.replay_release_queue(), 1);
    for path in [&stale, &matching, &other_ip, &nothing] {
        assert!(!path.exists(), "{} left in the queue", path.display());
    }
    let mut left: Vec<IpAddr> = a.list().unwrap().iter().map(|e| e.ip()).collect();
    left.sort();
    assert_eq!(left, vec![ip1, ip3]);
    assert_eq!(*rec.removed.lock().unwrap(), vec![v4(ip2)]);
    assert_eq!(a.metrics().queued_releases.get(), 1);
    assert_eq!(a.replay_release_queue(), 0);
}

#[test]
fn an_add_plays_its_attachments_queued_release_first() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), None);
    let first = a.allocate(&add("c1", "p")).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let path = enqueue(&a, &QueuedRelease::now(api_key("c1"), Some(first.ip())));
    // Without the queued DEL played first, this ADD would be answered with the old record.
    let second = a.allocate(&add("c1", "p")).unwrap();
    assert!(!path.exists());
    assert!(second.created_unix_ms >= first.created_unix_ms);
    assert_eq!(a.metrics().releases.get(), 1);
    assert_eq!(a.list().unwrap().len(), 1);
}

#[test]
fn concurrent_syncs_are_group_committed_and_each_caller_is_covered() {
    const CALLERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder {
        enforce: true,
        sync_delay: Duration::from_millis(50),
        ..Default::default()
    });
    let source = Pending::new();
    let a = Arc::new(recorded(dir.path(), &rec).with_state_source(source.clone()));
    let mut state = ClusterState::new();
    for i in 0..CALLERS {
        state.upsert_pod(pod(&format!("p{i}"), &[]));
    }
    source.publish(state);
    let barrier = Arc::new(std::sync::Barrier::new(CALLERS));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (a, rec, barrier) = (a.clone(), rec.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Together, so that some allocate while another's sync runs: those need a sync
                // of their own, started after their allocation.
                barrier.wait();
                let ip = a
                    .allocate(&add(&format!("c{i}"), &format!("p{i}")))
                    .unwrap();
                a.sync_policy().unwrap();
                // Whoever ran the sync that covered this call, it saw this allocation.
                let policy = rec.last_policy.lock().unwrap().clone().expect("a sync ran");
                assert!(
                    policy.endpoints.contains_key(&v4(ip.ip())),
                    "caller {i}'s endpoint {} not in the policy applied when it returned",
                    ip.ip()
                );
            })
        })
        .collect();
    for c in callers {
        c.join().unwrap();
    }
    let syncs = rec.syncs.load(Ordering::SeqCst);
    assert!(
        (1..CALLERS).contains(&syncs),
        "{syncs} dataplane syncs for {CALLERS} callers"
    );
    assert_eq!(a.metrics().policy_syncs.get(), syncs as u64);
}

#[test]
fn a_failed_sync_is_reported_by_readiness_and_cleared_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let source = Pending::new();
    let rec = Arc::new(Recorder {
        enforce: true,
        ..Default::default()
    });
    let a = recorded(dir.path(), &rec).with_state_source(source.clone());
    let e = wire::agent_error(&a.sync_policy().unwrap_err());
    assert_eq!(e.code, code::INVALID_CONFIG);
    assert!(
        e.msg.starts_with(
            "no cluster state to enforce NetworkPolicy from: cluster state not synced yet"
        ),
        "{}",
        e.msg
    );
    // The missing state is the one problem given (the failing sync is its consequence).
    let r = a.readiness();
    assert!(!r.ready);
    assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    assert!(r.problems[0].starts_with("no cluster state has been read yet"));
    source.publish(ClusterState::new());
    a.sync_policy().unwrap();
    assert_eq!(
        a.readiness(),
        Readiness {
            ready: true,
            ..Default::default()
        }
    );
    assert_eq!(rec.syncs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_recording_source_is_followed_through_its_change_log_and_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(
        manifests.join("a.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata: { name: x }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: x, labels: { app: a } }
spec: { containers: [{ name: c, image: i }] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: from-b, namespace: x }
spec:
  podSelector: { matchLabels: { app: a } }
  ingress: [{ from: [{ podSelector: { matchLabels: { app: b } } }] }]
"#,
    )
    .unwrap();
    let peer = |app: &str| {
        std::fs::write(
            manifests.join("b.yaml"),
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{ name: b, namespace: x, labels: {{ app: {app} }} }}\nspec: {{ nodeName: n2, containers: [{{ name: c, image: i }}] }}\nstatus: {{ podIP: 10.20.9.9 }}\n"
            ),
        )
        .unwrap()
    };
    peer("b");
    let src = Arc::new(crate::state::source::ManifestDir::new(&manifests));
    let rec = Arc::new(Recorder {
        enforce: true,
        ..Default::default()
    });
    let a = recorded(dir.path(), &rec).with_state_source(src.clone());
    let ip = v4(wired(&a, "c1", 17));
    a.sync_policy().unwrap();
    let peer_ip: Ipv4Addr = "10.20.9.9".parse().unwrap();
    let applied = || rec.last_policy.lock().unwrap().clone().unwrap();
    let identity = || applied().ip_identity.get(&peer_ip).copied();
    assert!(applied().endpoints.contains_key(&ip));
    let mut seen = vec![identity().expect("the peer has an identity")];
    let syncs = rec.syncs.load(Ordering::SeqCst);
    let at = Arc::as_ptr(&src.snapshot().unwrap());
    for app in ["z", "y", "x"] {
        peer(app);
        assert_eq!(src.poll(), Ok(true));
        // Nobody kept the state: the change was made in it, not in a copy.
        assert_eq!(Arc::as_ptr(&src.snapshot().unwrap()), at, "{app}");
        a.sync_policy().unwrap();
        // The sync took the relabelling from the state's log: a new label set, a new number.
        let now = identity().expect("the peer has an identity");
        assert!(
            !seen.contains(&now),
            "peer labelled {app}: {now} seen before {seen:?}"
        );
        seen.push(now);
    }
    assert_eq!(rec.syncs.load(Ordering::SeqCst), syncs + 3);
}

fn orphan(container: &str, ip: &str, ifindex: u32) -> Orphan {
    Orphan {
        ip: ip.parse().unwrap(),
        host_veth: vpcnet_api::host_veth_name(container, "eth0"),
        wiring: Some(Wiring {
            host_ifindex: ifindex,
            pod_mac: [2, 0, 0, 0, 0, ifindex as u8],
        }),
        network_id: Some(1),
    }
}

#[test]
fn a_live_pod_the_store_lost_is_re_adopted_before_any_add_and_taken_over_by_its_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    // A fresh store (the old one lost) on a node whose pod c1 still routes 10.20.1.7.
    let a = recorded(dir.path(), &rec).with_orphans(vec![orphan("c1", "10.20.1.7", 7)]);
    let e = wire::agent_error(&a.allocate(&add("c9", "c9")).unwrap_err());
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{}", e.msg);
    assert!(e.msg.contains("re-adopting 1 address"), "{}", e.msg);
    assert!(!a.readiness().ready);
    // Its dataplane entry is a live pod's: reconcile leaves it while it waits.
    rec.installed
        .lock()
        .unwrap()
        .insert("10.20.1.7".parse().unwrap());
    a.reconcile(&HashSet::new()).unwrap();
    assert!(rec.removed.lock().unwrap().is_empty());

    assert_eq!(a.adopt_orphans(), 1);
    assert_eq!(a.orphans_pending(), 0);
    assert!(a.readiness().ready, "{:?}", a.readiness());
    let held = a.list().unwrap();
    assert_eq!(held.len(), 1);
    assert!(held[0].key.is_adopted());
    assert_eq!((held[0].subnet(), held[0].is_ready()), ("main", true));
    let added = rec.added.lock().unwrap().clone();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].0, "10.20.1.7".parse::<Ipv4Addr>().unwrap());
    assert_eq!(added[0].1.host_ifindex, 7);

    // The next pod never gets the live pod's address, however many come.
    let mut seen = HashSet::new();
    for i in 0..20 {
        let c = format!("n{i}");
        let ip = a.allocate(&add(&c, &c)).unwrap().ip();
        assert_ne!(ip, "10.20.1.7".parse::<IpAddr>().unwrap());
        assert!(seen.insert(ip));
    }
    // Kept while its veth lives.
    let links: HashSet<String> = [held[0].host_veth.clone()]
        .into_iter()
        .chain((0..20).map(|i| format!("vethn{i}")))
        .collect();
    assert_eq!(a.reconcile(&links).unwrap(), 0);
    assert!(a.list().unwrap().iter().any(|e| e.key.is_adopted()));

    // The runtime's CHECK names the attachment: it takes the endpoint over; DEL then frees it.
    a.check(&CheckRequest {
        key: api_key("c1"),
        ips: vec!["10.20.1.7".parse().unwrap()],
    })
    .unwrap();
    assert!(a.ipam().get(&key("c1")).unwrap().is_some());
    assert!(!a.list().unwrap().iter().any(|e| e.key.is_adopted()));
    let gone = a.release(&key("c1")).unwrap().unwrap();
    assert_eq!(gone.ip(), "10.20.1.7".parse::<IpAddr>().unwrap());
    // Another attachment's DEL never frees it.
    assert!(a.ipam().get(&key("c1")).unwrap().is_none());
}

#[test]
fn gc_keeps_an_adopted_endpoint_its_runtime_lists_and_frees_one_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), None).with_orphans(vec![
        orphan("c1", "10.20.1.7", 7),
        orphan("c2", "10.20.1.8", 8),
    ]);
    assert_eq!(a.adopt_orphans(), 2);
    // A DEL of an unrelated attachment frees nothing.
    assert!(a.release(&key("c3")).unwrap().is_none());
    assert_eq!(a.list().unwrap().len(), 2);
    let released = a
        .gc(&GcRequest {
            valid: vec![api_key("c1")],
            network: None,
        })
        .unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].ip(), "10.20.1.8".parse::<IpAddr>().unwrap());
    let left = a.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, key("c1"));
}

#[test]
fn orphans_are_live_vpcnet_veth_routes_the_store_does_not_hold() {
    let veth = |c: &str| vpcnet_api::host_veth_name(c, "eth0");
    let routes = vec![
        ("10.20.1.7".parse().unwrap(), veth("c1")),
        ("10.20.1.7".parse().unwrap(), veth("c1")),
        ("10.20.1.8".parse().unwrap(), veth("c2")),
        ("10.20.1.9".parse().unwrap(), veth("c3")),
        ("10.20.1.10".parse().unwrap(), "eth0".to_string()),
    ];
    let held: HashSet<IpAddr> = ["10.20.1.9".parse().unwrap()].into();
    let pinned: std::collections::BTreeMap<Ipv4Addr, (u32, [u8; 6], u16)> = [
        ("10.20.1.7".parse().unwrap(), (7, [2, 0, 0, 0, 0, 7], 1)),
        // A reused ifindex: the pinned record is another interface's.
        ("10.20.1.8".parse().unwrap(), (99, [2, 0, 0, 0, 0, 8], 1)),
    ]
    .into();
    let index = |name: &str| {
        [(veth("c1"), 7), (veth("c2"), 8)]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
    };
    let found = orphans(&routes, &held, &pinned, index);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0], orphan("c1", "10.20.1.7", 7));
    assert_eq!(found[1].host_veth, veth("c2"));
    assert_eq!((found[1].wiring, found[1].network_id), (None, None));
}
