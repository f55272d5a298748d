//! Runs the `vpcnet` plugin exactly as a container runtime does: environment variables, network
//! configuration on stdin, result or error JSON on stdout.

use crate::cluster::{Cluster, Node, bin_dir};
use crate::netns::Netns;
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Debian's reference plugins (containernetworking-plugins).
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

#[derive(Debug, Clone)]
pub struct CniOutput {
    pub success: bool,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CniOutput {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {self:?}"))
    }

    /// The CNI error code, when the plugin failed.
    pub fn error_code(&self) -> Option<u64> {
        if self.success {
            return None;
        }
        self.json().ok()?.get("code")?.as_u64()
    }
}

/// What a runtime puts in the environment for one invocation.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl CniEnv {
    pub fn new(command: &str, container_id: &str, netns: &str, ifname: &str) -> CniEnv {
        CniEnv {
            command: command.into(),
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: ifname.into(),
            args: String::new(),
            path: format!("{}:{REFERENCE_PLUGIN_DIR}", bin_dir().display()),
        }
    }

    pub fn k8s(mut self, namespace: &str, pod: &str) -> CniEnv {
        self.args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-{pod}",
            self.container_id
        );
        self
    }
}

/// Executes plugin `plugin` (a file in the CNI path) inside `node_ns`.
pub fn exec_plugin(node_ns: &Netns, plugin: &str, env: &CniEnv, stdin: &str) -> Result<CniOutput> {
    let program = env
        .path
        .split(':')
        .map(|d| std::path::Path::new(d).join(plugin))
        .find(|p| p.exists())
        .with_context(|| format!("plugin {plugin} not found in {}", env.path))?;
    let start = Instant::now();
    let mut child = node_ns
        .command(&program)?
        .env_clear()
        .env("CNI_COMMAND", &env.command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_ARGS", &env.args)
        .env("CNI_PATH", &env.path)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", program.display()))?;
    if let Some(mut stdin_pipe) = child.stdin.take() {
        // A plugin may exit before reading stdin (e.g. VERSION): a broken pipe is not our failure.
        let _ = stdin_pipe.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output()?;
    Ok(CniOutput {
        success: out.status.success(),
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// The network configuration a node's runtime would hand to `vpcnet`.
pub fn net_config(node: &Node, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "vpcnet",
        "type": "vpcnet",
        "socket": node.socket,
        "releaseQueue": node.release_queue,
    })
}

/// A pod: its own namespace, wired by `vpcnet` ADD.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub ns: Netns,
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub result: Value,
    pub config: Value,
}

impl Pod {
    pub fn env(&self, command: &str) -> CniEnv {
        CniEnv::new(
            command,
            &self.container_id,
            &self.ns.path().to_string_lossy(),
            &self.ifname,
        )
        .k8s(&self.namespace, &self.name)
    }

    /// The runtime's stdin for DEL/CHECK: the config with the ADD result as prevResult.
    pub fn config_with_prev(&self) -> Value {
        let mut c = self.config.clone();
        c["prevResult"] = self.result.clone();
        c
    }
}

impl Cluster {
    /// Creates a pod namespace on `node` and runs `vpcnet` ADD for it.
    pub fn add_pod(&self, node: usize, namespace: &str, name: &str) -> Result<Pod> {
        self.add_pod_with(node, namespace, name, |_| {})
    }

    /// Like `add_pod`, with a hook to change the network configuration (e.g. set `network`).
    pub fn add_pod_with(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Pod> {
        // Pods of different namespaces may share a name (x/a, y/a).
        let ns = Netns::create(&format!("{}-{namespace}-{name}", self.prefix))?;
        let container_id = format!(
            "{:x}{}",
            md5ish(&format!("{}{namespace}/{name}", self.prefix)),
            name
        );
        let mut config = net_config(self.node(node), "1.1.0");
        edit(&mut config);
        let env = CniEnv::new("ADD", &container_id, &ns.path().to_string_lossy(), "eth0")
            .k8s(namespace, name);
        let out = exec_plugin(&self.node(node).ns, "vpcnet", &env, &config.to_string())?;
        if !out.success {
            bail!(
                "ADD of {namespace}/{name} failed: {} {}",
                out.stdout,
                out.stderr
            );
        }
        let result = out.json()?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in ADD result {result}"))?;
        Ok(Pod {
            name: name.into(),
            namespace: namespace.into(),
            node,
            ns,
            container_id,
            ifname: "eth0".into(),
            ip,
            result,
            config,
        })
    }

    /// Runs DEL for a pod as the kubelet would (StopPodSandbox), then drops its namespace.
    pub fn del_pod(&self, pod: Pod) -> Result<CniOutput> {
        let out = exec_plugin(
            &self.node(pod.node).ns,
            "vpcnet",
            &pod.env("DEL"),
            &pod.config_with_prev().to_string(),
        )?;
        Ok(out)
    }
}

/// A stable, short hex digest for synthetic container IDs (not cryptographic).
fn md5ish(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
