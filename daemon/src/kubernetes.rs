//! The Kubernetes mode: the cluster state, the topology and this node's blocks from the API
//! server (`vpcnet_k8s`), fitted to the agent's seams, and the node's life around them — the
//! CNI conflist and the Node's `NetworkUnavailable` condition follow the agent's readiness.

use crate::agent::{AddressSupply, Agent, SupplyError};
use crate::config::DaemonConfig;
use crate::state::kube::KubeSource;
use crate::topology::{Topology, TopologyError, TopologySource};
use k8s_openapi::api::core::v1::Node;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};
use vpcnet_ipam::{Ipam, IpamConfig};
use vpcnet_k8s::supply::Supply;
use vpcnet_policy::model::Labels;

/// What the Kubernetes mode gives the agent.
pub struct KubeMode {
    pub client: kube::Client,
    pub state: Arc<KubeSource>,
    pub topology: Arc<KubeTopology>,
    pub supply: Arc<Supply>,
}

/// Connects, starts the watches and the block keeper. Nothing here waits for the API server:
/// until it answers, the agent is simply not synced (ADD says "try again", STATUS says why).
pub async fn start(
    config: &DaemonConfig,
    ipam: Arc<Ipam>,
) -> Result<KubeMode, vpcnet_k8s::ClientError> {
    let client = vpcnet_k8s::client(config.kubernetes.kubeconfig.as_deref()).await?;
    let published = vpcnet_k8s::watch::spawn(
        vpcnet_k8s::watch::watch_all(client.clone()),
        config.ipam.cooldown_secs,
    );
    // The topology the store was opened with (the last one applied, see
    // `crate::topology::load_last_applied`) stays in force until the watches have built one.
    let initial = ipam.config();
    let url = api_url(config);
    let state = Arc::new(KubeSource::new(url, published.clone()));
    tokio::spawn(vpcnet_k8s::status::run(client.clone(), published.clone()));
    let supply = Supply::new(
        client.clone(),
        config.node.clone(),
        published,
        ipam,
        Duration::from_secs(config.kubernetes.block_release_grace_secs),
    );
    tokio::spawn(supply.clone().run());
    let topology = KubeTopology::spawn(supply.topology(), initial);
    Ok(KubeMode {
        client,
        state,
        topology,
        supply,
    })
}

/// Names the API server in messages.
fn api_url(config: &DaemonConfig) -> String {
    match &config.kubernetes.kubeconfig {
        Some(p) => format!("the API server of {}", p.display()),
        None => "the API server".into(),
    }
}

/// The block keeper's topology as the agent's [`TopologySource`].
pub struct KubeTopology {
    tx: watch::Sender<Arc<Topology>>,
}

impl KubeTopology {
    fn spawn(
        mut from: watch::Receiver<Option<Arc<vpcnet_k8s::topology::Built>>>,
        initial: IpamConfig,
    ) -> Arc<KubeTopology> {
        // Until the watches sync: what this node applied last (nothing on a new node; ADD is
        // refused as not synced anyway). Starting from nothing would unroute the node's blocks
        // for the moments until the watches sync, and drop its pods' packets.
        let first = Arc::new(Topology {
            generation: 0,
            ipam: initial,
        });
        let this = Arc::new(KubeTopology {
            tx: watch::Sender::new(first),
        });
        let t = this.clone();
        tokio::spawn(async move {
            loop {
                if let Some(built) = from.borrow_and_update().clone() {
                    t.tx.send_if_modified(|cur| {
                        if cur.ipam == built.ipam {
                            return false;
                        }
                        *cur = Arc::new(Topology {
                            generation: cur.generation + 1,
                            ipam: built.ipam.clone(),
                        });
                        true
                    });
                }
                if from.changed().await.is_err() {
                    return;
                }
            }
        });
        this
    }
}

impl TopologySource for KubeTopology {
    fn current(&self) -> Arc<Topology> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Topology>> {
        self.tx.subscribe()
    }

    /// Bad objects are left out one by one and reported on their own status; the topology in
    /// force is never rejected as a whole.
    fn last_error(&self) -> Option<TopologyError> {
        None
    }
}

/// The adapter: the agent knows claims only through [`AddressSupply`].
pub struct KubeSupply(pub Arc<Supply>);

impl AddressSupply for KubeSupply {
    fn subnet_for_namespace(&self, labels: &Labels) -> Option<(String, String)> {
        self.0.subnet_for_namespace(labels)
    }

    fn claim_block_now(&self, network: &str, subnet: &str) -> Result<(), SupplyError> {
        self.0.claim_block_now(network, subnet)
    }

    fn claim_address_now(
        &self,
        network: &str,
        subnet: &str,
        ip: std::net::IpAddr,
        namespace: &str,
        name: &str,
    ) -> Result<(), SupplyError> {
        self.0
            .claim_address_now(network, subnet, ip, namespace, name)
    }

    fn changed(&self) {
        self.0.wake();
    }

    fn problems(&self) -> Vec<String> {
        self.0.problems()
    }

    fn warnings(&self) -> Vec<String> {
        self.0.warnings()
    }
}

/// Exports `supply`'s counters and per-subnet figures through `metrics`.
pub fn report_supply_metrics(metrics: &crate::metrics::Metrics, supply: Arc<Supply>) {
    metrics.report_supply(Box::new(move || supply_report(&supply)));
}

fn supply_report(supply: &Supply) -> crate::metrics::SupplyReport {
    use std::sync::atomic::Ordering::Relaxed;
    use vpcnet_k8s::supply::ClaimFailure;
    let c = &supply.counters;
    crate::metrics::SupplyReport {
        blocks_claimed: c.blocks_claimed.load(Relaxed),
        blocks_released: c.blocks_released.load(Relaxed),
        claim_failures: ClaimFailure::ALL
            .iter()
            .map(|f| (f.label(), c.claim_failures(*f)))
            .collect(),
        fixed_refused: c.fixed_refused.load(Relaxed),
        last_claim_seconds: c.last_claim_micros.load(Relaxed) as f64 / 1e6,
        subnets: supply.subnet_supply(),
    }
}

/// How often the node's readiness is looked at to install the conflist and set the Node
/// condition: often while not ready (a node waits for this), rarely after.
const NOT_READY_CHECK: Duration = Duration::from_secs(1);
const READY_CHECK: Duration = Duration::from_secs(30);

/// Installs the CNI conflist and sets `NetworkUnavailable=False` once the agent is ready
/// (dataplane loaded, cluster state synced, a block in hand), and keeps them so: a conflist
/// deleted by hand is written again. The conflist stays when the daemon stops or turns
/// unready (an upgrade must not take the node NotReady; ADD answers "try again" meanwhile);
/// `vpcnetd uninstall` removes it.
pub async fn node_life(agent: Arc<Agent>, client: kube::Client) {
    let cfg = agent.config().clone();
    let path = cfg
        .kubernetes
        .cni_conf_dir
        .join(&cfg.kubernetes.conflist_name);
    let text = vpcnet_k8s::node::conflist("vpcnet", cfg.kubernetes.portmap);
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let mut condition_set = false;
    loop {
        let a = agent.clone();
        let readiness = tokio::task::spawn_blocking(move || a.readiness())
            .await
            .unwrap_or_default();
        if readiness.ready {
            let (p, t) = (path.clone(), text.clone());
            match tokio::task::spawn_blocking(move || vpcnet_k8s::node::install_conflist(&p, &t))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot install the CNI conflist"),
                Err(e) => warn!(error = %e, "conflist task failed"),
            }
            if !condition_set {
                match vpcnet_k8s::node::set_network_available(
                    &nodes,
                    &cfg.node,
                    true,
                    "vpcnet is ready on this node",
                )
                .await
                {
                    Ok(()) => {
                        info!(conflist = %path.display(), "ready: CNI conflist installed, NetworkUnavailable=False");
                        condition_set = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot set the Node's NetworkUnavailable condition")
                    }
                }
            }
        }
        let wait = if readiness.ready && condition_set {
            READY_CHECK
        } else {
            NOT_READY_CHECK
        };
        tokio::time::sleep(wait).await;
    }
}
