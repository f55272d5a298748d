//! The watches: one kube-runtime watcher per kind, folded by one task that publishes the
//! cluster state and the topology.
//!
//! The fold is driven by a stream of [`Update`]s, so the same loop runs on the API server's
//! watchers and, in the unit tests, on event streams made by hand. A watcher that fails (the API
//! server is down, the watch expired, RBAC forbids it) keeps retrying with backoff; meanwhile the
//! last published state stays in force — nothing is opened because the API is away — and the
//! failure is kept per kind for STATUS, logs and metrics.

use crate::crd::{IPBlock, IPClaim, Subnet, VirtualNetwork};
use crate::fold::{Changed, Fold, Watched, WatchedKind};
use crate::topology::{self, Built};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use vpcnet_policy::ClusterState;

/// One watcher's output, tagged with its kind.
// Moved once, from its watcher into the fold: boxing would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Namespace(watcher::Result<Event<Namespace>>),
    Pod(watcher::Result<Event<Pod>>),
    NetworkPolicy(watcher::Result<Event<NetworkPolicy>>),
    Node(watcher::Result<Event<Node>>),
    VirtualNetwork(watcher::Result<Event<VirtualNetwork>>),
    Subnet(watcher::Result<Event<Subnet>>),
    IPBlock(watcher::Result<Event<IPBlock>>),
    IPClaim(watcher::Result<Event<IPClaim>>),
}

impl Update {
    /// The events of a completed list of `kind` that found nothing.
    pub fn empty_list(kind: WatchedKind) -> [Update; 2] {
        macro_rules! both {
            ($v:ident) => {
                [Update::$v(Ok(Event::Init)), Update::$v(Ok(Event::InitDone))]
            };
        }
        match kind {
            WatchedKind::Namespace => both!(Namespace),
            WatchedKind::Pod => both!(Pod),
            WatchedKind::NetworkPolicy => both!(NetworkPolicy),
            WatchedKind::Node => both!(Node),
            WatchedKind::VirtualNetwork => both!(VirtualNetwork),
            WatchedKind::Subnet => both!(Subnet),
            WatchedKind::IPBlock => both!(IPBlock),
            WatchedKind::IPClaim => both!(IPClaim),
        }
    }
}

/// Why a kind's watch is not working.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error(
        "the API server forbids watching {resource}: {message} (the vpcnet ServiceAccount needs list and watch on it; apply manifests/rbac.yaml)"
    )]
    Forbidden {
        resource: &'static str,
        message: String,
    },
    #[error(
        "{resource} is not served by the API server: {message} (are the vpcnet CRDs installed? kubectl apply -f manifests/crds.yaml)"
    )]
    NotFound {
        resource: &'static str,
        message: String,
    },
    #[error("watching {resource}: {message}")]
    Failed {
        resource: &'static str,
        message: String,
    },
}

impl WatchError {
    fn of(kind: WatchedKind, e: &watcher::Error) -> Self {
        let resource = kind.resource();
        let status = match e {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
            watcher::Error::WatchError(s) => Some(s.as_ref()),
            _ => None,
        };
        let message = e.to_string();
        match status.map(|s| s.code) {
            Some(403) => WatchError::Forbidden { resource, message },
            Some(404) => WatchError::NotFound { resource, message },
            _ => WatchError::Failed { resource, message },
        }
    }
}

/// How each kind's watch is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchHealth {
    /// The kind's first list completed at some point.
    pub listed: BTreeMap<WatchedKind, bool>,
    /// The last failure of each kind, cleared by its next event.
    pub errors: BTreeMap<WatchedKind, WatchError>,
    /// Objects taken in a restricted form, with why (e.g. a policy enforced as deny-all).
    pub rejected: Vec<String>,
}

impl WatchHealth {
    pub fn synced(&self) -> bool {
        WatchedKind::ALL
            .iter()
            .all(|k| self.listed.get(k).copied().unwrap_or(false))
    }

    /// Sentences for STATUS: what keeps the agent from being synced, or what is failing now.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.errors.values().map(|e| e.to_string()).collect();
        let waiting: Vec<&str> = WatchedKind::ALL
            .iter()
            .filter(|k| {
                !self.listed.get(k).copied().unwrap_or(false) && !self.errors.contains_key(k)
            })
            .map(|k| k.resource())
            .collect();
        if !waiting.is_empty() {
            out.push(format!(
                "waiting for the first list of {}",
                waiting.join(", ")
            ));
        }
        out
    }
}

/// What the fold publishes; readers take cheap `Arc` clones.
#[derive(Clone)]
pub struct Published {
    pub state: watch::Receiver<Option<Arc<ClusterState>>>,
    pub topology: watch::Receiver<Option<Arc<Built>>>,
    pub health: Arc<Mutex<WatchHealth>>,
    /// The fold itself (claims, nodes, blocks), for the claimers; locked briefly.
    pub fold: Arc<Mutex<Fold>>,
}

/// Largest number of updates folded before publishing: a relist of 50,000 pods publishes once,
/// and a burst of changes costs one state copy, while a steady trickle is published at once.
const BATCH: usize = 4096;

/// Folds `updates` until the stream ends, publishing after each batch that changed something
/// once every kind is listed. Returns when the stream ends (the daemon is shutting down).
pub async fn run_fold(
    mut updates: impl Stream<Item = Update> + Unpin,
    cooldown_secs: u64,
    state_tx: watch::Sender<Option<Arc<ClusterState>>>,
    topology_tx: watch::Sender<Option<Arc<Built>>>,
    health: Arc<Mutex<WatchHealth>>,
    fold: Arc<Mutex<Fold>>,
) {
    while let Some(first) = updates.next().await {
        let mut changed = Changed::default();
        let mut batch = vec![first];
        // Whatever is ready now joins this batch.
        while batch.len() < BATCH {
            match futures::FutureExt::now_or_never(updates.next()) {
                Some(Some(u)) => batch.push(u),
                _ => break,
            }
        }
        let mut f = fold.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        for u in batch {
            changed.merge(apply(&mut f, &mut h, u));
        }
        h.rejected = f
            .rejected()
            .map(|((kind, key), why)| format!("{kind:?} {key}: {why}"))
            .collect();
        if !f.synced() {
            continue;
        }
        if changed.policy || changed.listed || state_tx.borrow().is_none() {
            let state = f.cluster_state();
            state_tx.send_replace(Some(state));
        }
        if changed.topology || changed.listed || topology_tx.borrow().is_none() {
            let nets: Vec<_> = f.networks.values().cloned().collect();
            let subnets: Vec<_> = f.subnets.values().cloned().collect();
            let blocks: Vec<_> = f.blocks.values().cloned().collect();
            let built = topology::build(&nets, &subnets, &blocks, cooldown_secs);
            let same = topology_tx.borrow().as_deref() == Some(&built);
            if !same {
                topology_tx.send_replace(Some(Arc::new(built)));
            }
        }
    }
}

fn apply(f: &mut Fold, h: &mut WatchHealth, u: Update) -> Changed {
    fn one<K: Watched>(f: &mut Fold, h: &mut WatchHealth, r: watcher::Result<Event<K>>) -> Changed {
        match r {
            Ok(ev) => {
                if h.errors.remove(&K::KIND).is_some() {
                    tracing::info!(resource = K::KIND.resource(), "watch recovered");
                }
                let c = f.apply(ev);
                if c.listed {
                    h.listed.insert(K::KIND, true);
                }
                c
            }
            Err(e) => {
                let err = WatchError::of(K::KIND, &e);
                if h.errors.get(&K::KIND) != Some(&err) {
                    tracing::warn!(error = %err, "watch failing; the last state stays in force");
                }
                h.errors.insert(K::KIND, err);
                Changed::default()
            }
        }
    }
    match u {
        Update::Namespace(r) => one(f, h, r),
        Update::Pod(r) => one(f, h, r),
        Update::NetworkPolicy(r) => one(f, h, r),
        Update::Node(r) => one(f, h, r),
        Update::VirtualNetwork(r) => one(f, h, r),
        Update::Subnet(r) => one(f, h, r),
        Update::IPBlock(r) => one(f, h, r),
        Update::IPClaim(r) => one(f, h, r),
    }
}

/// Every kind's watcher on the API server, merged into one stream of updates.
pub fn watch_all(client: kube::Client) -> impl Stream<Item = Update> + Send + Unpin {
    fn w<K>(client: &kube::Client) -> impl Stream<Item = watcher::Result<Event<K>>> + Send + use<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
    {
        let api: kube::Api<K> = kube::Api::all(client.clone());
        // Bookmarks keep a quiet watch's resourceVersion fresh, so a reconnect resumes instead
        // of relisting; default_backoff retries forever with growing delays.
        watcher(api, watcher::Config::default().any_semantic()).default_backoff()
    }
    use kube::runtime::watcher::watcher;
    futures::stream::select_all([
        w::<Namespace>(&client).map(Update::Namespace).boxed(),
        w::<Pod>(&client).map(Update::Pod).boxed(),
        w::<NetworkPolicy>(&client)
            .map(Update::NetworkPolicy)
            .boxed(),
        w::<Node>(&client).map(Update::Node).boxed(),
        w::<VirtualNetwork>(&client)
            .map(Update::VirtualNetwork)
            .boxed(),
        w::<Subnet>(&client).map(Update::Subnet).boxed(),
        w::<IPBlock>(&client).map(Update::IPBlock).boxed(),
        w::<IPClaim>(&client).map(Update::IPClaim).boxed(),
    ])
}

/// Starts the fold on `updates` and returns what it publishes.
pub fn spawn(
    updates: impl Stream<Item = Update> + Send + Unpin + 'static,
    cooldown_secs: u64,
) -> Published {
    let (state_tx, state) = watch::channel(None);
    let (topology_tx, topology) = watch::channel(None);
    let health = Arc::new(Mutex::new(WatchHealth::default()));
    let fold = Arc::new(Mutex::new(Fold::default()));
    tokio::spawn(run_fold(
        updates,
        cooldown_secs,
        state_tx,
        topology_tx,
        health.clone(),
        fold.clone(),
    ));
    Published {
        state,
        topology,
        health,
        fold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use serde_json::json;

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            serde_json::from_value(json!({"code": code, "message": "pods is forbidden: User \"system:serviceaccount:kube-system:vpcnet\" cannot list resource \"pods\"", "reason": "Forbidden"}))
                .unwrap(),
        ))
    }

    fn pod(name: &str, app: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": "10.0.0.5", "phase": "Running"},
        }))
        .unwrap()
    }

    /// Sends the empty first list of every kind but `except`.
    fn list_all_but(tx: &mpsc::UnboundedSender<Update>, except: &[WatchedKind]) {
        for kind in WatchedKind::ALL.into_iter().filter(|k| !except.contains(k)) {
            for u in Update::empty_list(kind) {
                tx.unbounded_send(u).unwrap();
            }
        }
    }

    fn list_all(tx: &mpsc::UnboundedSender<Update>) {
        list_all_but(tx, &[]);
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn publishes_after_every_first_list_and_then_per_change() {
        let (tx, rx) = mpsc::unbounded();
        let p = spawn(rx, 30);
        tx.unbounded_send(Update::Pod(Ok(Event::Init))).unwrap();
        tx.unbounded_send(Update::Pod(Ok(Event::InitApply(pod("p1", "x")))))
            .unwrap();
        settle().await;
        assert!(p.state.borrow().is_none(), "published before synced");
        assert!(!p.health.lock().unwrap().synced());
        list_all(&tx);
        let mut state = p.state.clone();
        let s = state
            .wait_for(|s| s.is_some())
            .await
            .unwrap()
            .clone()
            .unwrap();
        // The relist that list_all sent for pods dropped p1: what was listed last is in force.
        assert_eq!(s.pods().count(), 0);
        assert!(
            p.topology.borrow().is_some(),
            "topology published with the state"
        );
        let g = s.generation();

        tx.unbounded_send(Update::Pod(Ok(Event::Apply(pod("p2", "y")))))
            .unwrap();
        let s = state
            .wait_for(|s| s.as_ref().is_some_and(|s| s.generation() > g))
            .await
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(s.pods().next().unwrap().labels["app"], "y");
    }

    #[tokio::test]
    async fn a_forbidden_watch_is_reported_as_such_and_the_last_state_stays() {
        let (tx, rx) = mpsc::unbounded();
        let p = spawn(rx, 30);
        list_all(&tx);
        tx.unbounded_send(Update::Pod(Ok(Event::Apply(pod("p1", "x")))))
            .unwrap();
        let mut state = p.state.clone();
        state
            .wait_for(|s| s.as_ref().is_some_and(|s| s.pods().count() == 1))
            .await
            .unwrap();
        // The watch breaks: RBAC was changed under the daemon, and the watcher's relist fails.
        tx.unbounded_send(Update::Pod(Err(watcher::Error::InitialListFailed(status(
            403,
        )))))
        .unwrap();
        settle().await;
        let h = p.health.lock().unwrap().clone();
        let problems = h.problems().join("; ");
        assert!(problems.contains("forbids watching pods"), "{problems}");
        assert!(problems.contains("manifests/rbac.yaml"), "{problems}");
        assert_eq!(
            p.state.borrow().as_ref().unwrap().pods().count(),
            1,
            "the last good state stays in force"
        );
        // It recovers with the next event of that kind.
        tx.unbounded_send(Update::Pod(Ok(Event::Apply(pod("p1", "z")))))
            .unwrap();
        settle().await;
        assert!(p.health.lock().unwrap().errors.is_empty());
    }

    #[tokio::test]
    async fn a_missing_crd_keeps_the_agent_unsynced_and_says_why() {
        let (tx, rx) = mpsc::unbounded();
        let p = spawn(rx, 30);
        list_all_but(&tx, &[WatchedKind::Subnet]);
        tx.unbounded_send(Update::Subnet(Err(watcher::Error::InitialListFailed(
            status(404),
        ))))
        .unwrap();
        settle().await;
        assert!(p.state.borrow().is_none());
        let problems = p.health.lock().unwrap().problems().join("; ");
        assert!(
            problems.contains("subnets.vpcnet.io is not served"),
            "{problems}"
        );
    }

    #[tokio::test]
    async fn topology_follows_the_network_objects() {
        let (tx, rx) = mpsc::unbounded();
        let p = spawn(rx, 30);
        list_all(&tx);
        tx.unbounded_send(Update::VirtualNetwork(Ok(Event::Apply(
            VirtualNetwork::new(
                "vpc",
                crate::crd::VirtualNetworkSpec {
                    id: 1,
                    default: true,
                    routable_cidrs: vec![],
                    masquerade_exclude: vec![],
                    peers: vec![],
                },
            ),
        ))))
        .unwrap();
        tx.unbounded_send(Update::Subnet(Ok(Event::Apply(Subnet::new(
            "pods",
            crate::crd::SubnetSpec {
                network: "vpc".into(),
                cidr: crate::crd::Cidr("10.20.0.0/16".into()),
                gateway: None,
                reserved: vec![],
                block_size: 26,
                default: true,
                namespace_selector: None,
            },
        )))))
        .unwrap();
        let mut topo = p.topology.clone();
        let t = topo
            .wait_for(|t| t.as_ref().is_some_and(|t| !t.ipam.networks.is_empty()))
            .await
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(t.ipam.default_network.as_deref(), Some("vpc"));
        assert_eq!(t.ipam.networks[0].default_subnet.as_deref(), Some("pods"));
    }
}
