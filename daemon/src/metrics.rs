//! Prometheus metrics and the /healthz endpoint.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Metrics {
    pub allocations: Counter,
    pub alloc_failures: Counter,
    pub releases: Counter,
    pub gc_released: Counter,
    pub reconcile_released: Counter,
    pub queued_releases: Counter,
    pub requests: Counter,
    pub live_allocations: Gauge,
    pub policy_syncs: Counter,
    pub policy_sync_failures: Counter,
    pub policy_ops: Counter,
    pub policy_sync_seconds: Histogram,
    pub conntrack_live: Gauge,
    /// Generation of the topology (networks, subnets, blocks) applied.
    pub topology_generation: Gauge,
    pub conntrack_created: Gauge,
    pub conntrack_insert_failed: Gauge,
    /// Brings the dataplane gauges up to date; run on each scrape, not on a timer: the conntrack
    /// walk costs ~0.1 s at a full map, which a tick would spend every interval on an idle node.
    on_scrape: std::sync::OnceLock<ScrapeHook>,
    /// The Kubernetes mode's address supply, read on each scrape; unset standalone, where its
    /// metrics are not exported at all.
    supply: std::sync::OnceLock<SupplyHook>,
}

/// See [`Metrics::refresh_on_scrape`].
pub type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// See [`Metrics::report_supply`].
pub type SupplyHook = Box<dyn Fn() -> SupplyReport + Send + Sync>;

/// The address supply's figures at one scrape (Kubernetes mode).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SupplyReport {
    pub blocks_claimed: u64,
    pub blocks_released: u64,
    /// `(reason, count)`, every reason listed even at 0 so rates start from the first scrape.
    pub claim_failures: Vec<(&'static str, u64)>,
    pub fixed_refused: u64,
    /// The last block claim's duration (API round trips and the store taking the block).
    pub last_claim_seconds: f64,
    pub subnets: Vec<vpcnet_k8s::supply::SubnetSupply>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            allocations: Counter::default(),
            alloc_failures: Counter::default(),
            releases: Counter::default(),
            gc_released: Counter::default(),
            reconcile_released: Counter::default(),
            queued_releases: Counter::default(),
            requests: Counter::default(),
            live_allocations: Gauge::default(),
            policy_syncs: Counter::default(),
            policy_sync_failures: Counter::default(),
            policy_ops: Counter::default(),
            // 0.1 ms .. ~3 s
            policy_sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            conntrack_live: Gauge::default(),
            topology_generation: Gauge::default(),
            conntrack_created: Gauge::default(),
            conntrack_insert_failed: Gauge::default(),
            on_scrape: std::sync::OnceLock::new(),
            supply: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The gauges read from the dataplane: refreshed, then encoded, on every scrape.
#[derive(Debug)]
struct DataplaneGauges(Arc<Metrics>);

impl Collector for DataplaneGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        if let Some(refresh) = m.on_scrape.get() {
            refresh();
        }
        for (name, help, gauge) in [
            (
                "conntrack_entries",
                "Live connection-tracking entries of policy-selected pods",
                &m.conntrack_live,
            ),
            (
                "conntrack_created",
                "Connection-tracking entries created (dataplane counter)",
                &m.conntrack_created,
            ),
            (
                "conntrack_insert_failures",
                "Connection-tracking inserts the kernel refused (dataplane counter)",
                &m.conntrack_insert_failed,
            ),
        ] {
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The address supply's metrics, read from it on every scrape.
#[derive(Debug)]
struct SupplyMetrics(Arc<Metrics>);

impl Collector for SupplyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(report) = self.0.supply.get() else {
            return Ok(());
        };
        let r = report();
        for (name, help, value) in [
            (
                "ipam_blocks_claimed",
                "IPAM blocks this node claimed through the API server",
                r.blocks_claimed,
            ),
            (
                "ipam_blocks_released",
                "IPAM blocks this node gave back after they stayed empty",
                r.blocks_released,
            ),
            (
                "ipam_fixed_address_refused",
                "Fixed-address claims refused because another pod holds the address",
                r.fixed_refused,
            ),
        ] {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ipam_claim_failures",
            "Block and fixed-address claims that failed, by reason (conflict, exhausted, api-error, timeout, not-ready)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &r.claim_failures {
            ConstCounter::new(*n).encode(family.encode_family(&[("reason", *reason)])?)?;
        }
        ConstGauge::new(r.last_claim_seconds).encode(encoder.encode_descriptor(
            "ipam_last_block_claim_seconds",
            "Duration of the last block claim, API round trips and the store taking the block",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "ipam_node_free_addresses",
            "Addresses free for allocation in this node's blocks, per subnet",
            None,
            MetricType::Gauge,
        )?;
        for s in &r.subnets {
            let labels = [
                ("network", s.network.as_str()),
                ("subnet", s.subnet.as_str()),
            ];
            ConstGauge::new(i64::try_from(s.free_here).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ipam_subnet_exhausted",
            "1 when the subnet has no block left to claim, cluster-wide",
            None,
            MetricType::Gauge,
        )?;
        for s in &r.subnets {
            let labels = [
                ("network", s.network.as_str()),
                ("subnet", s.subnet.as_str()),
            ];
            ConstGauge::new(i64::from(s.exhausted)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("vpcnet");
        r.register(
            "ipam_allocations",
            "Addresses allocated",
            self.allocations.clone(),
        );
        r.register(
            "ipam_allocation_failures",
            "Allocations refused (exhausted, taken, ...)",
            self.alloc_failures.clone(),
        );
        r.register("ipam_releases", "Addresses released", self.releases.clone());
        r.register(
            "gc_released",
            "Addresses released by CNI GC",
            self.gc_released.clone(),
        );
        r.register(
            "reconcile_released",
            "Leaked addresses released by reconcile",
            self.reconcile_released.clone(),
        );
        r.register(
            "queued_releases_replayed",
            "Releases replayed from the plugin's on-disk queue",
            self.queued_releases.clone(),
        );
        r.register(
            "api_requests",
            "Requests served on the daemon socket",
            self.requests.clone(),
        );
        r.register(
            "ipam_live_allocations",
            "Allocations currently held on this node",
            self.live_allocations.clone(),
        );
        r.register(
            "policy_syncs",
            "NetworkPolicy syncs applied to the dataplane",
            self.policy_syncs.clone(),
        );
        r.register(
            "policy_sync_failures",
            "NetworkPolicy syncs that failed (the previous policy stays enforced)",
            self.policy_sync_failures.clone(),
        );
        r.register(
            "policy_map_ops",
            "Policy map operations applied",
            self.policy_ops.clone(),
        );
        r.register(
            "policy_sync_seconds",
            "Time from reading the cluster state to the dataplane enforcing it",
            self.policy_sync_seconds.clone(),
        );
        r.register(
            "topology_generation",
            "Generation of the topology (networks, subnets, this node's blocks) in force",
            self.topology_generation.clone(),
        );
        r.register_collector(Box::new(DataplaneGauges(self.clone())));
        r.register_collector(Box::new(SupplyMetrics(self.clone())));
        r
    }

    /// Exports the address supply's metrics, reading `hook` on each scrape (once; a second
    /// hook is ignored).
    pub fn report_supply(&self, hook: SupplyHook) {
        let _ = self.supply.set(hook);
    }

    /// Sets what brings the dataplane gauges up to date before each scrape encodes them (once;
    /// a second hook is ignored). It may block: scrapes are encoded on the blocking pool.
    pub fn refresh_on_scrape(&self, hook: ScrapeHook) {
        let _ = self.on_scrape.set(hook);
    }
}

/// What /healthz reports: the daemon's one readiness verdict (the same one STATUS gives).
pub type Health = Arc<dyn Fn() -> crate::agent::Readiness + Send + Sync>;

/// Scrapes and probes are occasional; beyond this many at once, connections are closed unanswered
/// so a flood cannot take the file descriptors ADD needs.
const MAX_CONNECTIONS: usize = 32;

/// A deliberately tiny HTTP/1.0 responder for `/metrics` and `/healthz`: two fixed routes do not
/// justify an HTTP framework in a node agent. Runs until the process ends: a failed accept (out
/// of file descriptors, a connection reset while queued) is logged and retried, never fatal.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, health: Health) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut errors = AcceptErrors::default();
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                errors.failed("/metrics", &e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let registry = registry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                // The dataplane gauges are read from the kernel while encoding.
                "/metrics" => match tokio::task::spawn_blocking(move || {
                    let mut text = String::new();
                    encode(&mut text, &registry).map(|()| text)
                })
                .await
                {
                    Ok(Ok(text)) => ("200 OK", text),
                    Ok(Err(e)) => ("500 Internal Server Error", e.to_string()),
                    Err(e) => (
                        "500 Internal Server Error",
                        format!("encoding the metrics failed: {e}\n"),
                    ),
                },
                // Store and dataplane checks block; they run on the blocking pool.
                "/healthz" => match tokio::task::spawn_blocking(move || health()).await {
                    Ok(r) if r.ready => ("200 OK", format!("ok\n{}", r.text())),
                    Ok(r) => (
                        "503 Service Unavailable",
                        format!("not ready\n{}", r.text()),
                    ),
                    Err(e) => (
                        "500 Internal Server Error",
                        format!("health check failed: {e}\n"),
                    ),
                },
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

/// Pause after a failed accept: long enough not to spin while file descriptors are exhausted
/// (the pending connection stays queued and would fail again at once), short enough to serve
/// again promptly when they come back.
pub(crate) const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Logs failed accepts at most once per interval, with how many were not logged.
#[derive(Default)]
pub(crate) struct AcceptErrors {
    last_logged: Option<std::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    pub(crate) fn failed(&mut self, what: &str, e: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(listener = what, error = %e, suppressed = self.suppressed, "accept failed; retrying");
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }

    fn render(m: &Arc<Metrics>) -> String {
        let mut text = String::new();
        encode(&mut text, &m.registry()).unwrap();
        text
    }

    #[test]
    fn supply_metrics_only_in_kubernetes_mode_and_read_at_each_scrape() {
        let m = Arc::new(Metrics::default());
        assert!(
            !render(&m).contains("vpcnet_ipam_blocks_claimed"),
            "standalone has no supply"
        );
        let scrapes = Arc::new(AtomicI64::new(0));
        let n = scrapes.clone();
        m.report_supply(Box::new(move || {
            let k = n.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            SupplyReport {
                blocks_claimed: 3 * k,
                blocks_released: 1,
                claim_failures: vec![("conflict", 0), ("exhausted", 2), ("timeout", 1)],
                fixed_refused: 4,
                last_claim_seconds: 0.25,
                subnets: vec![
                    vpcnet_k8s::supply::SubnetSupply {
                        network: "vpc".into(),
                        subnet: "s1".into(),
                        free_here: 61,
                        exhausted: false,
                    },
                    vpcnet_k8s::supply::SubnetSupply {
                        network: "vpc".into(),
                        subnet: "s2".into(),
                        free_here: 0,
                        exhausted: true,
                    },
                ],
            }
        }));
        let text = render(&m);
        for line in [
            "# TYPE vpcnet_ipam_blocks_claimed counter",
            "vpcnet_ipam_blocks_claimed_total 3",
            "vpcnet_ipam_blocks_released_total 1",
            "vpcnet_ipam_fixed_address_refused_total 4",
            "vpcnet_ipam_claim_failures_total{reason=\"conflict\"} 0",
            "vpcnet_ipam_claim_failures_total{reason=\"exhausted\"} 2",
            "vpcnet_ipam_claim_failures_total{reason=\"timeout\"} 1",
            "# TYPE vpcnet_ipam_last_block_claim_seconds gauge",
            "vpcnet_ipam_last_block_claim_seconds 0.25",
            "vpcnet_ipam_node_free_addresses{network=\"vpc\",subnet=\"s1\"} 61",
            "vpcnet_ipam_node_free_addresses{network=\"vpc\",subnet=\"s2\"} 0",
            "vpcnet_ipam_subnet_exhausted{network=\"vpc\",subnet=\"s1\"} 0",
            "vpcnet_ipam_subnet_exhausted{network=\"vpc\",subnet=\"s2\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        // Read afresh at each scrape, not once at registration.
        assert!(render(&m).contains("vpcnet_ipam_blocks_claimed_total 6"));
        assert_eq!(scrapes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn each_scrape_refreshes_the_dataplane_gauges_first() {
        let metrics = Arc::new(Metrics::default());
        let reads = Arc::new(AtomicI64::new(0));
        {
            let (m, reads) = (Arc::downgrade(&metrics), reads.clone());
            metrics.refresh_on_scrape(Box::new(move || {
                let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(m) = m.upgrade() {
                    m.conntrack_live.set(100 * n);
                }
            }));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health: Health = Arc::new(|| -> crate::agent::Readiness {
            unreachable!("/healthz is not asked for here")
        });
        tokio::spawn(serve(listener, Arc::new(metrics.registry()), health));
        // Nothing reads the dataplane until someone asks.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(reads.load(Ordering::SeqCst), 0);
        for n in 1..=2 {
            let text = get(addr, "/metrics").await;
            assert!(text.starts_with("HTTP/1.0 200"), "{text}");
            assert!(
                text.contains(&format!("vpcnet_conntrack_entries {}", 100 * n)),
                "{text}"
            );
            assert!(text.contains("vpcnet_ipam_allocations_total 0"), "{text}");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }
}
