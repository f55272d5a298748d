//! Node daemons in Kubernetes mode against a [`ControlPlane`]: the cluster of network
//! namespaces with each node's daemon pointed at the API server through a [`Relay`], and the
//! parts of kubelet, the scheduler and the garbage collector the tests play themselves.

use crate::apiserver::ControlPlane;
use crate::cluster::{Cluster, ClusterSpec, Node};
use crate::cni::Pod;
use crate::relay::Relay;
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Polls `f` every 20 ms until it gives a value, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
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
pub fn node_kubeconfig(cp: &ControlPlane, node: &Node, port: u16) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&cp.kubeconfig)?;
    let text = text.replace(&cp.url, &format!("https://127.0.0.1:{port}"));
    let path = node.dir.join("kubeconfig");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// vpcnetd's configuration in Kubernetes mode (JSON is YAML).
pub fn k8s_config(node: &Node, kubeconfig: &Path) -> String {
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

pub fn conflist(node: &Node) -> PathBuf {
    node.dir.join("net.d").join("10-vpcnet.conflist")
}

/// kubectl, as the tests use it.
pub struct Api<'a>(pub &'a ControlPlane);

impl Api<'_> {
    pub fn apply(&self, doc: Value) -> Result<String> {
        self.0
            .kubectl(&["apply", "-f", "-"], Some(&doc.to_string()))
    }

    pub fn get(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.0.kubectl(&a, None)?)?)
    }

    /// The CRDs of `manifests/`, established.
    pub fn install_crds(&self) -> Result<()> {
        let crds = manifests().join("crds.yaml");
        self.0
            .kubectl(&["apply", "-f", &crds.to_string_lossy()], None)?;
        self.0.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
            None,
        )?;
        Ok(())
    }

    /// A Pod object as the scheduler leaves it: bound to `node`.
    pub fn pod(
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
    pub fn pod_running(&self, pod: &Pod) -> Result<()> {
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

    /// A pod's object gone at once, as kubelet's final delete (or the pod GC) leaves it.
    pub fn force_delete_pod(&self, ns: &str, name: &str) -> Result<()> {
        self.0.kubectl(
            &[
                "delete",
                "pod",
                "-n",
                ns,
                name,
                "--grace-period=0",
                "--force",
                "--wait=true",
            ],
            None,
        )?;
        Ok(())
    }

    pub fn uid(&self, args: &[&str]) -> Result<String> {
        let v = self.get(args)?;
        v["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no uid in {v}"))
    }

    /// Runs the ADD of a pod whose object exists, retrying while the node's watch has not seen
    /// it yet, then reports it running. Fails after `limit`.
    pub fn add_pod(
        &self,
        c: &Cluster,
        node: usize,
        ns: &str,
        name: &str,
        limit: Duration,
    ) -> Result<Pod> {
        let mut last = String::new();
        let pod = wait_for(&format!("ADD {ns}/{name}"), limit, || {
            c.add_pod(node, ns, name)
                .map_err(|e| last = e.to_string())
                .ok()
        })
        .with_context(|| format!("last error: {last}"))?;
        self.pod_running(&pod)?;
        Ok(pod)
    }
}

/// The network namespaces of a cluster whose node daemons are configured for Kubernetes mode
/// (not started), with a Node object for each node. Keep the relays as long as the daemons run.
pub fn kube_cluster(cp: &ControlPlane, nodes: usize) -> Result<(Cluster, Vec<Relay>)> {
    let api = Api(cp);
    let c = Cluster::build(ClusterSpec {
        nodes,
        cooldown_secs: 1,
        dataplane: true,
    })?;
    let target: SocketAddr = cp
        .url
        .trim_start_matches("https://")
        .parse()
        .context("API server URL")?;
    let mut relays = Vec::new();
    for i in 0..nodes {
        let node = c.node(i);
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}))?;
        let relay = Relay::start(&node.ns, target)?;
        let kc = node_kubeconfig(cp, node, relay.port)?;
        std::fs::write(&node.config_path, k8s_config(node, &kc))?;
        relays.push(relay);
    }
    Ok((c, relays))
}

/// An ICMP echo stream at 100 packets/s from a pod (or host) namespace, counted until
/// [`PingStream::finish`]. It runs as back-to-back `ping` runs of one second each, so every
/// packet sent has had its full reply deadline when the totals are read: a stream stopped at
/// any moment counts no packet as lost that was merely still in flight.
pub struct PingStream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(u32, u32)>>>,
}

impl PingStream {
    pub fn start(from: &crate::Netns, to: Ipv4Addr) -> PingStream {
        let ns = from.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || -> Result<(u32, u32)> {
            let (mut sent, mut received) = (0, 0);
            while !s.load(Ordering::Relaxed) {
                let child = ns
                    .command("ping")?
                    .args(["-c", "100", "-i", "0.010", "-W1", "-q", &to.to_string()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?;
                let out = child.wait_with_output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let (t, r) = crate::probe::ping_summary(&text)
                    .with_context(|| format!("no ping summary in {text:?}"))?;
                sent += t;
                received += r;
            }
            Ok((sent, received))
        });
        PingStream {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops after the current second and returns (sent, received).
    pub fn finish(mut self) -> Result<(u32, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .map_err(|_| anyhow::anyhow!("ping stream thread panicked"))?
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
