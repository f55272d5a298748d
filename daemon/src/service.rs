//! What vpcnetd does for each request, independent of the transport. Every method is blocking (IPAM
//! commits to disk, the dataplane talks to the kernel); the server calls them from `spawn_blocking`.

use crate::config::DaemonConfig;
use crate::metrics::Metrics;
use crate::state::cluster_state;
use crate::wire;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use vpcnet_api::release_queue::{self, EntryError};
use vpcnet_api::{
    AllocateRequest, Allocation, ApiError, AttachmentKey, CheckRequest, CountersInfo,
    EndpointReadyRequest, GcRequest, RequestBody, ResponseBody, StatusInfo, code,
};
use vpcnet_dataplane::SyncStats;
use vpcnet_ipam::{AllocRequest, Endpoint, Ipam, IpamError, Wiring};
use vpcnet_policy::Compiled;

/// A pod endpoint as the dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub network_id: u16,
}

/// The forwarding layer as the service sees it: the eBPF dataplane, or nothing (kernel routes).
pub trait Forwarding: Send {
    fn add_endpoint(&mut self, ep: &EndpointSpec) -> Result<(), String>;
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), String>;
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, String>;
    fn counters(&self) -> Result<CountersInfo, String>;
    fn describe(&self) -> String;
    /// What is wrong with the installed dataplane now (cheap: called by every STATUS and
    /// /healthz).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether NetworkPolicy is enforced (the eBPF dataplane with a cluster state source).
    fn enforces_policy(&self) -> bool {
        false
    }
    /// Where the conntrack map is pinned (read without holding the forwarding lock).
    fn conntrack_pin(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// What the policy maps hold now.
    fn applied_policy(&self) -> Option<&Compiled> {
        None
    }
    /// Takes the policy maps to `new` without a moment of wider access.
    fn sync_policy(&mut self, _new: &Compiled) -> Result<SyncStats, String> {
        Ok(SyncStats::default())
    }
    /// Takes routes, peers and masquerade exclusions to a new topology, live. Kernel routes
    /// have nothing to program: the plugin's per-pod host routes do not depend on it.
    fn apply_topology(
        &mut self,
        _networks: &[vpcnet_ipam::NetworkConfig],
        _local_pod_cidrs: &[ipnetwork::IpNetwork],
    ) -> Result<(), String> {
        Ok(())
    }
}

/// Plain kernel routing: the plugin's host routes do the forwarding; nothing to program.
pub struct KernelRoutes;

impl Forwarding for KernelRoutes {
    fn add_endpoint(&mut self, _: &EndpointSpec) -> Result<(), String> {
        Ok(())
    }
    fn remove_endpoint(&mut self, _: Ipv4Addr) -> Result<(), String> {
        Ok(())
    }
    fn endpoints(&self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(Vec::new())
    }
    fn counters(&self) -> Result<CountersInfo, String> {
        Ok(CountersInfo {
            endpoints: Vec::new(),
            drops: Vec::new(),
            node: Vec::new(),
            conntrack: None,
        })
    }
    fn describe(&self) -> String {
        "kernel routes (no eBPF)".into()
    }
}

pub struct Service {
    pub ipam: Arc<Ipam>,
    /// Cluster state for NetworkPolicy (standalone: the watched manifest directory).
    pub policy: Option<Arc<dyn crate::state::source::StateSource>>,
    pub fwd: Mutex<Box<dyn Forwarding>>,
    pub config: DaemonConfig,
    pub metrics: Arc<Metrics>,
    pub mtu: u32,
    /// Identity numbering across policy syncs (taken before `fwd`).
    pub policy_sync: Mutex<PolicySync>,
    /// Wakes the policy sync loop (a pod went away).
    pub policy_dirty: tokio::sync::Notify,
    /// Policy sync tickets handed out (see `Service::sync_policy`).
    pub policy_requests: std::sync::atomic::AtomicU64,
    /// Held while a queued release is played, so an ADD that finds its attachment's entry waits
    /// for a replay already playing it, and no replay plays it after that ADD allocated.
    pub release_queue_lock: Mutex<()>,
}

/// The daemon's one verdict on whether it can serve pods; STATUS and /healthz both report it, so
/// they can never disagree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub problems: Vec<String>,
    /// What an operator should know while it is still ready.
    pub warnings: Vec<String>,
}

impl Readiness {
    /// One line, for STATUS's message.
    pub fn message(&self) -> String {
        self.problems
            .iter()
            .chain(&self.warnings)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// One reason per line, for /healthz.
    pub fn text(&self) -> String {
        self.problems
            .iter()
            .chain(&self.warnings)
            .map(|p| format!("{p}\n"))
            .collect()
    }
}

/// State of the policy sync between runs.
#[derive(Default)]
pub struct PolicySync {
    /// This node's compilation, kept up to date per object change; `None` until seeded from
    /// what the pinned maps hold.
    regen: Option<vpcnet_policy::incremental::Regenerator>,
    /// The cluster state `regen` was last fed, to feed it only the next state's differences.
    fed: Option<Arc<vpcnet_policy::ClusterState>>,
    /// Generation of the cluster state last applied.
    pub generation: Option<u64>,
    pub last_error: Option<String>,
    /// Requests up to this ticket were covered by a successful sync that started after them.
    covered: u64,
}

fn ipam_err(e: IpamError) -> ApiError {
    wire::ipam_error(&e)
}

fn to_allocation(r: &Endpoint, mtu: u32) -> Allocation {
    wire::allocation(r, mtu)
}

/// The IPv4 address the dataplane forwards for an endpoint (it forwards only IPv4 today).
fn dataplane_ip(r: &Endpoint) -> Result<Ipv4Addr, ApiError> {
    r.ipv4().ok_or_else(|| {
        ApiError::new(
            code::UNSUPPORTED_FIELD,
            format!(
                "container {} ifname {} holds only IPv6 addresses ({}); this node's dataplane \
                 forwards IPv4 only: give the network an IPv4 subnet",
                r.key.container_id,
                r.key.ifname,
                r.ips()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

impl Service {
    pub fn handle(&self, body: RequestBody) -> ResponseBody {
        let result = match body {
            RequestBody::Allocate(req) => self.allocate(&req).map(ResponseBody::Allocated),
            RequestBody::EndpointReady(req) => self.endpoint_ready(&req).map(|_| ResponseBody::Ok),
            RequestBody::Release { key } => self
                .release(&wire::key(&key))
                .map(|allocation| ResponseBody::Released { allocation }),
            RequestBody::Check(req) => self.check(&req).map(|_| ResponseBody::Ok),
            RequestBody::Gc(req) => self
                .gc(&req)
                .map(|released| ResponseBody::GcDone { released }),
            RequestBody::Status => self.status().map(ResponseBody::Status),
            RequestBody::List => self
                .ipam
                .list()
                .map(|l| ResponseBody::List {
                    allocations: l.iter().map(|r| to_allocation(r, self.mtu)).collect(),
                })
                .map_err(ipam_err),
            RequestBody::Policy { namespace, name } => self
                .explain_policy(&namespace, &name)
                .map(|text| ResponseBody::Text { text }),
            RequestBody::Counters => self.counters().map(ResponseBody::Counters),
        };
        result.unwrap_or_else(ResponseBody::Error)
    }

    fn explain_policy(&self, namespace: &str, name: &str) -> Result<String, ApiError> {
        let source = self.policy.as_ref().ok_or_else(|| {
            ApiError::new(
                code::INVALID_CONFIG,
                "no cluster state: set `manifests_dir` in the vpcnetd config to read NetworkPolicies",
            )
        })?;
        let state = source
            .snapshot()
            .map_err(|e| ApiError::new(code::INVALID_CONFIG, format!("cluster state: {e}")))?;
        let pod = vpcnet_policy::model::ObjRef::new(namespace, name);
        // As the sync sees it: this node's pods with their allocated addresses.
        let records = self.ipam.list().map_err(ipam_err)?;
        let state = cluster_state::with_local_allocations(&state, &records, &self.config.node);
        let mut text = vpcnet_policy::explain(&state, &pod)
            .map_err(|e| ApiError::new(code::UNKNOWN_CONTAINER, e.to_string()))?;
        if let Some(e) = source.last_error() {
            text.push_str(&format!(
                "\nwarning: the newest manifests were rejected, the last good state is shown: {e}\n"
            ));
        }
        let enforced = self.lock_fwd().enforces_policy();
        if enforced {
            let sync = self.policy_sync.lock().unwrap_or_else(|p| p.into_inner());
            match (&sync.last_error, sync.generation) {
                (Some(e), _) => text.push_str(&format!(
                    "\nwarning: the last NetworkPolicy update failed; the dataplane enforces the one before: {e}\n"
                )),
                (None, Some(g)) => text.push_str(&format!(
                    "\nEnforced by this node's eBPF dataplane (cluster state generation {g}).\n"
                )),
                (None, None) => text.push_str(
                    "\nnote: no cluster state applied yet; new pods on this node are closed until one is.\n",
                ),
            }
        } else {
            // An operator must not assume isolation that is not there.
            text.push_str("\nnote: this node's dataplane (kernel routes) does not enforce NetworkPolicy; this is what the policies say.\n");
        }
        Ok(text)
    }

    /// Brings this node's compilation up to the current cluster state and local allocations
    /// (incrementally: see `vpcnet_policy::incremental`) and takes the dataplane's policy maps
    /// there. A no-op without a cluster state source.
    /// Without a readable state the maps keep what they enforce (new pods stay closed).
    pub fn sync_policy(&self) -> Result<SyncStats, ApiError> {
        let Some(source) = &self.policy else {
            return Ok(SyncStats::default());
        };
        use std::sync::atomic::Ordering::SeqCst;
        // Group commit: concurrent ADDs each need "a sync that saw my allocation", not a sync
        // each. A sync that started after this ticket was taken read IPAM and the cluster state
        // after this caller's allocation and state change, so it covers this request.
        let requests = &self.policy_requests;
        let ticket = requests.fetch_add(1, SeqCst) + 1;
        let started = std::time::Instant::now();
        let mut sync = self.policy_sync.lock().unwrap_or_else(|p| p.into_inner());
        if sync.covered >= ticket {
            return Ok(SyncStats::default());
        }
        let covers = requests.load(SeqCst);
        let result: Result<(SyncStats, u64), ApiError> = (|| {
            let state = source.snapshot().map_err(|e| {
                ApiError::new(
                    code::INVALID_CONFIG,
                    format!("no cluster state to enforce NetworkPolicy from: {e}"),
                )
            })?;
            let records = self.ipam.list().map_err(ipam_err)?;
            let sync = &mut *sync;
            let regen = match &mut sync.regen {
                Some(r) => r,
                slot @ None => {
                    let fwd = self.lock_fwd();
                    if !fwd.enforces_policy() {
                        return Ok((SyncStats::default(), state.generation()));
                    }
                    let mut r = vpcnet_policy::incremental::Regenerator::new(&self.config.node);
                    // Keep the numbers the pinned maps use, so a restart rewrites nothing that
                    // did not change.
                    if let Some(applied) = fwd.applied_policy() {
                        r.seed(applied.ip_identity.iter().map(|(ip, id)| (*ip, *id)));
                    }
                    sync.fed = None;
                    slot.insert(r)
                }
            };
            // Only what changed since the last sync is worked on: an ADD is its own endpoint,
            // a remote pod's label change the endpoints whose rules name it. Compiled without
            // the dataplane lock: ADDs keep installing endpoints meanwhile (the plan is computed
            // against the maps' mirror under the lock).
            let t_compile = std::time::Instant::now();
            let changes = match &sync.fed {
                Some(fed) if Arc::ptr_eq(fed, &state) => Vec::new(),
                Some(fed) => vpcnet_policy::incremental::diff_state(fed, &state),
                None => vpcnet_policy::incremental::diff_state(&Default::default(), &state),
            };
            let changed = changes.len();
            regen.apply_all(changes);
            sync.fed = Some(state.clone());
            regen.set_local(cluster_state::local_endpoints(&records));
            regen.set_generation(state.generation());
            regen.compile();
            let (compiled, regen_stats) = (regen.compiled(), regen.stats());
            let compile_ms = t_compile.elapsed().as_secs_f64() * 1e3;
            let stats = self.lock_fwd().sync_policy(compiled).map_err(|e| {
                ApiError::new(code::DATAPLANE, format!("programming NetworkPolicy: {e}"))
            })?;
            tracing::debug!(
                objects_changed = changed,
                endpoints_regenerated = regen_stats.endpoints,
                compile_ms,
                total_ms = started.elapsed().as_secs_f64() * 1e3,
                "policy sync stages"
            );
            Ok((stats, state.generation()))
        })();
        match result {
            Ok((stats, generation)) => {
                sync.covered = covers;
                sync.generation = Some(generation);
                sync.last_error = None;
                self.metrics.policy_syncs.inc();
                self.metrics.policy_ops.inc_by(stats.ops as u64);
                self.metrics
                    .policy_sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                if stats.ops > 0 {
                    info!(
                        ops = stats.ops,
                        narrowed = stats.narrowed,
                        generation,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "NetworkPolicy applied"
                    );
                }
                Ok(stats)
            }
            Err(e) => {
                self.metrics.policy_sync_failures.inc();
                sync.last_error = Some(e.msg.clone());
                Err(e)
            }
        }
    }

    /// Dataplane counters; the conntrack walk (~0.1 s for a full map) runs after the forwarding
    /// lock is released, so ADDs and policy syncs do not wait for it.
    fn counters(&self) -> Result<CountersInfo, ApiError> {
        let err =
            |e: String| ApiError::new(code::DATAPLANE, format!("reading dataplane counters: {e}"));
        let (mut c, pin) = {
            let fwd = self.lock_fwd();
            (fwd.counters().map_err(err)?, fwd.conntrack_pin())
        };
        if let Some(pin) = pin {
            c.conntrack =
                Some(vpcnet_dataplane::conntrack_entries(&pin).map_err(|e| err(e.to_string()))?);
        }
        Ok(c)
    }

    /// Copies the dataplane's conntrack figures into the Prometheus gauges.
    pub fn refresh_dataplane_metrics(&self) {
        let Ok(c) = self.counters() else {
            return;
        };
        if let Some((live, _)) = c.conntrack {
            self.metrics.conntrack_live.set(live as i64);
        }
        for (name, n) in &c.node {
            match name.as_str() {
                "ct-created" => {
                    self.metrics.conntrack_created.set(*n as i64);
                }
                "ct-insert-failed" => {
                    self.metrics.conntrack_insert_failed.set(*n as i64);
                }
                _ => {}
            }
        }
    }

    pub(crate) fn lock_fwd(&self) -> std::sync::MutexGuard<'_, Box<dyn Forwarding>> {
        // A panic while holding the lock cannot leave the kernel state half-written in a way the
        // mutex would protect; keep serving rather than wedge every later request.
        self.fwd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate(&self, req: &AllocateRequest) -> Result<Allocation, ApiError> {
        let _span = tracing::info_span!("allocate", container = %req.key.container_id, ifname = %req.key.ifname,
            pod = %format!("{}/{}", req.pod.namespace, req.pod.name)).entered();
        let addressing = match &self.policy {
            Some(source) => self.addressing_from(source.as_ref(), req)?,
            None => Default::default(),
        };
        let annotated_ip = match &addressing.ip {
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                ApiError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "pod {}/{} has annotation {}={text:?}, which is not an IP address",
                        req.pod.namespace,
                        req.pod.name,
                        cluster_state::ANNOTATION_IP
                    ),
                )
            })?),
            None => None,
        };
        if req.static_ips.len() > 1 {
            return Err(ApiError::new(
                code::UNSUPPORTED_FIELD,
                format!(
                    "{} static addresses requested; vpcnet gives a pod one address",
                    req.static_ips.len()
                ),
            ));
        }
        let static_ip = req.static_ips.first().copied().or(annotated_ip);
        self.consume_queued_release(&req.key)?;
        let (key, pod) = (wire::key(&req.key), wire::pod(&req.pod));
        let record = self
            .ipam
            .allocate(&AllocRequest {
                key: &key,
                pod: &pod,
                network: req.network.as_deref(),
                subnet: addressing.subnet.as_deref(),
                static_ip,
                host_veth: &req.host_veth,
            })
            .map_err(|e| {
                self.metrics.alloc_failures.inc();
                ipam_err(e)
            })?;
        self.metrics.allocations.inc();
        info!(ip = %record.ip(), subnet = %record.subnet(), "allocated");
        Ok(to_allocation(&record, self.mtu))
    }

    /// The pod's addressing from the watched state (a lookup, no file I/O and no copy of the
    /// state on the ADD path). Until the source has synced, the ADD is refused as "try again":
    /// placing the pod now would ignore its annotations (the default subnet instead of its own)
    /// and start it without knowing which policies isolate it.
    fn addressing_from(
        &self,
        source: &dyn crate::state::source::StateSource,
        req: &AllocateRequest,
    ) -> Result<cluster_state::PodAddressing, ApiError> {
        let not_synced = |e: crate::state::source::StateError| {
            ApiError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{e}; vpcnetd places pods only once it has the cluster state (pod annotations, NetworkPolicy) — the runtime retries the ADD; if this persists, check `vpcnetctl status` and the source"
                ),
            )
        };
        if !source.synced() {
            return Err(not_synced(source.snapshot().err().unwrap_or(
                crate::state::source::StateError::NotSynced {
                    origin: source.origin(),
                    cause: None,
                },
            )));
        }
        if req.pod.name.is_empty() {
            return Ok(Default::default());
        }
        let pod = source
            .pod(&req.pod.namespace, &req.pod.name)
            .map_err(not_synced)?;
        let ns = source.namespace(&req.pod.namespace).map_err(not_synced)?;
        Ok(cluster_state::pod_addressing(pod.as_deref(), ns.as_deref()))
    }

    fn endpoint_ready(&self, req: &EndpointReadyRequest) -> Result<(), ApiError> {
        let _span = tracing::info_span!("endpoint_ready", container = %req.key.container_id, ifname = %req.key.ifname).entered();
        let key = wire::key(&req.key);
        let record = self.ipam.get(&key).map_err(ipam_err)?.ok_or_else(|| {
            ApiError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "no allocation for container {} ifname {}: it was released (DEL or GC) while ADD ran",
                    req.key.container_id, req.key.ifname
                ),
            )
        })?;
        if !same_ips(&record, &req.ips) {
            return Err(ApiError::new(
                code::INTERNAL,
                format!(
                    "endpoint reports {} but {} was allocated to it",
                    show_ips(req.ips.iter().copied()),
                    show_ips(record.ips())
                ),
            ));
        }
        let ip = dataplane_ip(&record)?;
        let network_id = self
            .ipam
            .network(Some(record.network()))
            .map(|n| n.id)
            .map_err(ipam_err)?;
        // Durable before the dataplane entry exists: a restarted daemon rebuilds the entry from
        // the store.
        self.ipam
            .mark_wired(
                &key,
                Wiring {
                    host_ifindex: req.host_ifindex,
                    pod_mac: req.pod_mac,
                },
            )
            .map_err(ipam_err)?;
        // The pod's policy (and its address's identity for everyone else) goes in before its
        // endpoint: isolated from the first packet. If it cannot, the endpoint is installed
        // closed and the sync loop opens it when the cluster state is back.
        if let Err(e) = self.sync_policy() {
            warn!(error = %e, "NetworkPolicy not updated for the new pod; it stays closed until the next successful sync");
        }
        self.lock_fwd()
            .add_endpoint(&EndpointSpec {
                ip,
                host_ifindex: req.host_ifindex,
                pod_mac: req.pod_mac,
                network_id,
            })
            .map_err(|e| {
                ApiError::new(
                    code::DATAPLANE,
                    format!("programming the dataplane for {ip}: {e}"),
                )
            })?;
        // Revision 0: the policy sync does not number its revisions yet.
        // The policy revision the endpoint was installed under: the cluster state generation
        // the last sync applied (0 without a cluster state source).
        let revision = self
            .policy_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
            .unwrap_or(0);
        self.ipam.mark_ready(&key, revision).map_err(ipam_err)?;
        Ok(())
    }

    /// Removes the dataplane entry before the address is freed, so an address can never be handed to
    /// a new pod while the old pod's entry still points at a dead interface.
    pub fn release(
        &self,
        key: &vpcnet_ipam::AttachmentKey,
    ) -> Result<Option<Allocation>, ApiError> {
        let _span =
            tracing::info_span!("release", container = %key.container_id, ifname = %key.ifname)
                .entered();
        let Some(record) = self.ipam.get(key).map_err(ipam_err)? else {
            return Ok(None);
        };
        // Marked first, so a daemon restarted mid-release does not rebuild the entry.
        self.ipam.mark_releasing(key).map_err(ipam_err)?;
        if let Some(ip) = record.ipv4() {
            self.lock_fwd().remove_endpoint(ip).map_err(|e| {
                ApiError::new(
                    code::DATAPLANE,
                    format!("removing {ip} from the dataplane: {e}"),
                )
            })?;
        }
        let released = self.ipam.release(key).map_err(ipam_err)?;
        if let Some(r) = &released {
            self.metrics.releases.inc();
            info!(ip = %r.ip(), "released");
            // Its rules and identity go with the next sync; the endpoint entry is gone already.
            self.policy_dirty.notify_one();
        }
        Ok(released.map(|r| to_allocation(&r, self.mtu)))
    }

    fn check(&self, req: &CheckRequest) -> Result<(), ApiError> {
        match self.ipam.get(&wire::key(&req.key)).map_err(ipam_err)? {
            // The lifecycle is not checked: "ready" is not fsync'd (see `Ipam::mark_ready`), and
            // the plugin has already verified the interfaces themselves.
            Some(r) if same_ips(&r, &req.ips) => Ok(()),
            Some(r) => Err(ApiError::new(
                code::CHECK_FAILED,
                format!(
                    "container has {} in vpcnetd but {} in its result",
                    show_ips(r.ips()),
                    show_ips(req.ips.iter().copied())
                ),
            )),
            None => Err(ApiError::new(
                code::CHECK_FAILED,
                format!(
                    "vpcnetd has no allocation for container {} ifname {}",
                    req.key.container_id, req.key.ifname
                ),
            )),
        }
    }

    fn gc(&self, req: &GcRequest) -> Result<Vec<Allocation>, ApiError> {
        let valid: HashSet<vpcnet_ipam::AttachmentKey> = req.valid.iter().map(wire::key).collect();
        let doomed: Vec<Endpoint> = self
            .ipam
            .list()
            .map_err(ipam_err)?
            .into_iter()
            .filter(|r| !valid.contains(&r.key))
            .filter(|r| req.network.as_deref().is_none_or(|n| n == r.network()))
            .collect();
        let mut released = Vec::new();
        let mut errors = Vec::new();
        // Keep going past errors: GC must collect what it can.
        for r in doomed {
            match self.release(&r.key) {
                Ok(Some(a)) => released.push(a),
                Ok(None) => {}
                Err(e) => errors.push(e.msg),
            }
        }
        self.metrics.gc_released.inc_by(released.len() as u64);
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(ApiError::new(
                code::DATAPLANE,
                format!(
                    "GC released {} but failed for {}",
                    released.len(),
                    errors.len()
                ),
            )
            .with_details(errors.join("; ")))
        }
    }

    /// Whether an ADD would work now and pods would get what they are owed: the store accepts
    /// writes, the dataplane is installed, and (with a cluster state source) there is a state to
    /// take addressing and policy from and the dataplane enforces it.
    pub fn readiness(&self) -> Readiness {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        if let Some(e) = self.ipam.health() {
            problems.push(format!("IPAM store: {e}"));
        }
        if let Err(e) = self.lock_fwd().health() {
            problems.push(format!("dataplane: {e}"));
        }
        let mut have_state = true;
        if let Some(source) = &self.policy {
            match source.snapshot() {
                Err(e) => {
                    have_state = false;
                    problems.push(format!(
                        "no cluster state has been read yet (pod annotations and NetworkPolicy come from it): {e}"
                    ));
                }
                Ok(_) => {
                    if let Some(e) = source.last_error() {
                        warnings.push(format!(
                            "the newest cluster state was rejected; the last good one stays in force: {e}"
                        ));
                    }
                }
            }
        }
        // Without a state the sync fails for the reason already given. A sync holds this lock
        // for its whole run (a large policy takes a while); STATUS does not wait for it, that
        // sync's outcome is the next verdict.
        let sync = match self.policy_sync.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if have_state
            && let Some(sync) = sync
            && let Some(e) = &sync.last_error
        {
            problems.push(format!(
                "NetworkPolicy sync is failing (new pods stay closed, the rest keep the previous policy): {e}"
            ));
        }
        Readiness {
            ready: problems.is_empty(),
            problems,
            warnings,
        }
    }

    fn status(&self) -> Result<StatusInfo, ApiError> {
        let readiness = self.readiness();
        let allocations = self.ipam.list().map_err(ipam_err)?.len() as u64;
        Ok(StatusInfo {
            ready: readiness.ready,
            node: self.config.node.clone(),
            allocations,
            free: self.ipam.free_counts().map_err(ipam_err)?,
            dataplane: self.lock_fwd().describe(),
            message: readiness.message(),
        })
    }

    /// A release queued for this attachment is a DEL that came before this ADD (a runtime
    /// orders one container's operations), so it is played first: the ADD then gets a fresh
    /// allocation instead of the record the release was meant to free, and the entry is gone
    /// before it could free the new one. Costs one failed stat when nothing is queued.
    fn consume_queued_release(&self, key: &AttachmentKey) -> Result<(), ApiError> {
        let path = release_queue::path_for(&self.config.release_queue, key);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        let _queue = self.lock_release_queue();
        self.play_queued(&path, Some(key)).map(|_| ())
    }

    fn lock_release_queue(&self) -> std::sync::MutexGuard<'_, ()> {
        self.release_queue_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Plays one queue file (the caller holds the queue lock) and removes it once done. A queued
    /// release only ever releases the allocation it was queued for: one created after the entry
    /// was queued, or holding another address than the DEL's prevResult named, belongs to a
    /// later ADD and is kept. Dropping an entry wrongly (the wall clock went back) only leaks
    /// until reconcile sees the veth gone; releasing wrongly would take a live pod's address.
    fn play_queued(
        &self,
        path: &std::path::Path,
        expect: Option<&AttachmentKey>,
    ) -> Result<Played, ApiError> {
        let entry = match release_queue::read(path) {
            Ok(entry) => entry,
            // Played by someone else meanwhile.
            Err(EntryError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Played::Gone);
            }
            Err(err) => {
                warn!(file = %path.display(), %err, "unusable queued release; setting it aside");
                let _ = std::fs::rename(path, path.with_extension("bad"));
                return Ok(Played::Gone);
            }
        };
        if let Some(key) = expect
            && entry.key != *key
        {
            // A 128-bit name collision: not this attachment's release.
            return Ok(Played::Gone);
        }
        let key = wire::key(&entry.key);
        let played = match self.ipam.get(&key).map_err(ipam_err)? {
            Some(rec)
                if rec.created_unix_ms > entry.queued_unix_ms
                    || entry.ip.is_some_and(|ip| !rec.ips().any(|held| held == ip)) =>
            {
                info!(container = %entry.key.container_id, ifname = %entry.key.ifname, ip = %rec.ip(),
                    "queued release predates the attachment's allocation; dropped");
                Played::Stale
            }
            Some(_) => {
                self.release(&key)?;
                Played::Released
            }
            None => Played::Stale,
        };
        // Not made durable: if the removal is lost in a crash, the entry is older than any
        // later allocation of the key and is dropped as stale.
        let _ = std::fs::remove_file(path);
        Ok(played)
    }

    /// Replays releases the plugin queued while the daemon was unreachable or could not record
    /// them. Each file is removed only after its release committed; unusable files are set
    /// aside, not retried forever. Returns the releases done.
    pub fn replay_release_queue(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.config.release_queue) else {
            return 0;
        };
        let (mut done, mut stale) = (0, 0);
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Old-format files (`{container}-{ifname}.json`) are replayed too; `.` files are
            // the plugin's temporaries.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let _queue = self.lock_release_queue();
            match self.play_queued(&path, None) {
                Ok(Played::Released) => done += 1,
                Ok(Played::Stale) => stale += 1,
                Ok(Played::Gone) => {}
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "queued release failed; will retry")
                }
            }
        }
        if done + stale > 0 {
            info!(released = done, stale, "replayed queued releases");
            self.metrics.queued_releases.inc_by(done as u64);
        }
        done
    }

    /// Releases allocations whose attachment is gone: the host veth no longer exists (ready ones), or
    /// it never appeared within the grace period (an ADD that died half-way). Also removes dataplane
    /// entries that no allocation owns.
    pub fn reconcile(&self, live_links: &HashSet<String>) -> Result<usize, ApiError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let grace_ms = self.config.pending_grace_secs * 1000;
        let records = self.ipam.list().map_err(ipam_err)?;
        let mut released = 0;
        for r in &records {
            if live_links.contains(&r.host_veth) {
                continue;
            }
            if !r.is_ready() && now_ms.saturating_sub(r.created_unix_ms) < grace_ms {
                continue;
            }
            warn!(container = %r.key.container_id, ifname = %r.key.ifname, ip = %r.ip(), veth = %r.host_veth,
                "attachment is gone; releasing its address");
            if self.release(&r.key)?.is_some() {
                released += 1;
            }
        }
        let owned: HashSet<Ipv4Addr> = self
            .ipam
            .list()
            .map_err(ipam_err)?
            .iter()
            .filter_map(|r| r.ipv4())
            .collect();
        let endpoints = self.lock_fwd().endpoints().map_err(|e| {
            ApiError::new(code::DATAPLANE, format!("listing dataplane endpoints: {e}"))
        })?;
        for ip in endpoints.into_iter().filter(|ip| !owned.contains(ip)) {
            warn!(%ip, "dataplane endpoint without an allocation; removing it");
            if let Err(e) = self.lock_fwd().remove_endpoint(ip) {
                warn!(%ip, error = %e, "removing orphan endpoint failed");
            }
        }
        self.metrics.reconcile_released.inc_by(released as u64);
        Ok(released)
    }
}

/// Whether the endpoint holds exactly `ips` (in any order).
fn same_ips(r: &Endpoint, ips: &[IpAddr]) -> bool {
    let mut held: Vec<IpAddr> = r.ips().collect();
    let mut want = ips.to_vec();
    held.sort();
    want.sort();
    held == want
}

fn show_ips(ips: impl Iterator<Item = IpAddr>) -> String {
    let all: Vec<String> = ips.map(|ip| ip.to_string()).collect();
    if all.is_empty() {
        "no address".to_string()
    } else {
        all.join(", ")
    }
}

/// What playing one queued release did.
enum Played {
    Released,
    /// Its allocation was already gone, or the key now holds a later one.
    Stale,
    /// No entry (played meanwhile, or set aside).
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::source::{StateError, StateSource};
    use tokio::sync::watch;
    use vpcnet_policy::ClusterState;

    /// A source whose first state comes when the test publishes it, as a watch's initial list
    /// does.
    struct Pending {
        tx: watch::Sender<Option<Arc<ClusterState>>>,
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

    fn service(dir: &std::path::Path, policy: Option<Arc<dyn StateSource>>) -> Service {
        let config: DaemonConfig = serde_yaml::from_str(&format!(
            r#"
node: n1
uplink: eth0
state_dir: {d}
socket: {d}/sock
release_queue: {d}/queue
ipam:
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
        .unwrap();
        let ipam = Ipam::open(&config.ipam_db(), config.ipam.clone(), &config.node).unwrap();
        Service {
            ipam: Arc::new(ipam),
            policy,
            fwd: Mutex::new(Box::new(KernelRoutes)),
            config,
            metrics: Default::default(),
            mtu: 1500,
            policy_sync: Default::default(),
            policy_dirty: tokio::sync::Notify::new(),
            policy_requests: Default::default(),
            release_queue_lock: Default::default(),
        }
    }

    fn add(container: &str, pod: &str) -> AllocateRequest {
        serde_json::from_value(serde_json::json!({
            "key": {"container_id": container, "ifname": "eth0"},
            "pod": {"namespace": "x", "name": pod},
            "host_veth": format!("veth{container}"),
        }))
        .unwrap()
    }

    #[test]
    fn add_waits_for_the_cluster_state_and_then_follows_its_annotations() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _) = watch::channel(None);
        let source = Arc::new(Pending { tx });
        let svc = service(dir.path(), Some(source.clone()));

        let e = svc.allocate(&add("c1", "a")).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{}", e.msg);
        assert!(e.msg.contains("not synced yet"), "{}", e.msg);
        assert!(e.msg.contains("the test's watch"), "{}", e.msg);
        assert!(
            svc.ipam.list().unwrap().is_empty(),
            "allocated while refusing"
        );
        // A container without a pod name waits too: its namespace's policies are not known.
        let mut anonymous = add("c0", "");
        anonymous.pod.namespace.clear();
        assert_eq!(
            svc.allocate(&anonymous).unwrap_err().code,
            code::TRY_AGAIN_LATER
        );

        // Synced: the pod's annotation places it (not the default subnet).
        let mut state = ClusterState::new();
        state.upsert_pod(vpcnet_policy::model::Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: Default::default(),
            ip: None,
            node: None,
            ports: Vec::new(),
            annotations: [(
                cluster_state::ANNOTATION_SUBNET.to_string(),
                "other".to_string(),
            )]
            .into(),
        });
        source.tx.send_replace(Some(Arc::new(state)));
        let a = svc.allocate(&add("c1", "a")).unwrap();
        assert_eq!(a.subnet, "other");
        assert!(
            a.ips[0].address.to_string().starts_with("10.30."),
            "{:?}",
            a.ips
        );
        // A pod the state does not know gets the default.
        assert_eq!(svc.allocate(&add("c2", "b")).unwrap().subnet, "main");
    }

    #[test]
    fn without_a_source_add_is_not_gated() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(dir.path(), None);
        assert_eq!(svc.allocate(&add("c1", "a")).unwrap().subnet, "main");
    }
}
