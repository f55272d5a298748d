//! Runs the `vpcnet` plugin exactly as a container runtime does: environment variables, network
//! configuration on stdin, result or error JSON on stdout.

use crate::cluster::{Cluster, Node, bin_dir};
use crate::netns::Netns;
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::io::{Read, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
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
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("plugin stdout is not JSON: {self:?}"))
    }

    /// Asserts the plugin failed with a spec error of `code` (a JSON error naming its CNI version)
    /// and returns its message.
    pub fn expect_error(&self, code: u64) -> String {
        assert!(!self.success, "expected failure, got {self:?}");
        let v = self
            .json()
            .unwrap_or_else(|e| panic!("error output is not JSON: {e:#}"));
        assert_eq!(v["code"].as_u64(), Some(code), "{self:?}");
        assert!(v["cniVersion"].is_string(), "{self:?}");
        v["msg"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts the plugin succeeded.
    pub fn expect_ok(&self) -> &Self {
        assert!(self.success, "plugin failed: {self:?}");
        self
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
    let vars = [
        ("CNI_COMMAND", env.command.as_str()),
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
        ("CNI_ARGS", &env.args),
        ("CNI_PATH", &env.path),
    ];
    run_plugin(node_ns, &program, &vars, stdin.as_bytes(), None)
}

/// Runs a CNI plugin as a runtime does, inside `node_ns`: an environment holding only `PATH` and
/// `vars` (so a test can leave a variable out, or give it any value), `stdin` written from a
/// thread of its own (a plugin may exit before reading it, or read it only after writing).
/// With a `limit`, a plugin still running after it is killed (with every process it started)
/// and the run is an error that carries what it printed: a hang must fail a test, not stall it.
pub fn run_plugin(
    node_ns: &Netns,
    program: &Path,
    vars: &[(&str, &str)],
    stdin: &[u8],
    limit: Option<Duration>,
) -> Result<CniOutput> {
    let start = Instant::now();
    let mut cmd = node_ns.command(program)?;
    if limit.is_some() {
        // A group of its own, so the kill at the limit reaches whatever the plugin started too
        // (a delegated plugin holding the output pipes open would stall the run).
        cmd.process_group(0);
    }
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", program.display()))?;
    let writer = child.stdin.take().map(|mut pipe| {
        let data = stdin.to_vec();
        // A broken pipe (VERSION, an environment error) is the plugin's choice, not a failure.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_reader = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err_reader = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match limit {
        // A plain wait: a polling loop would add its period to the latency tests' figures.
        None => Some(child.wait()?),
        Some(limit) => loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if start.elapsed() > limit {
                // SAFETY: signals the process group of our own child, which it leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        },
    };
    let elapsed = start.elapsed();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let join = |h: std::thread::JoinHandle<String>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("plugin output reader panicked"))
    };
    let out = CniOutput {
        success: status.is_some_and(|s| s.success()),
        exit_code: status.and_then(|s| s.code()),
        stdout: join(out_reader)?,
        stderr: join(err_reader)?,
        elapsed,
    };
    match (status, limit) {
        (None, Some(limit)) => bail!(
            "{} was still running after {limit:?} (killed): {out:?}",
            program.display()
        ),
        _ => Ok(out),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    // `sh` reads its script from stdin: a stand-in plugin that shows what the runner gave it.
    const SH: &str = "/bin/sh";

    #[test]
    fn runs_with_only_the_given_environment_and_reports_what_it_printed() {
        let ns = Netns::fresh("r").unwrap();
        let script = b"echo \"$CNI_COMMAND ${HOME:-nohome}\"; echo oops >&2; exit 3";
        let out = run_plugin(&ns, Path::new(SH), &[("CNI_COMMAND", "ADD")], script, None).unwrap();
        assert!(!out.success);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout, "ADD nohome\n");
        assert_eq!(out.stderr, "oops\n");
    }

    #[test]
    fn a_plugin_past_its_limit_is_killed_and_the_run_fails() {
        let ns = Netns::fresh("r").unwrap();
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        let err = run_plugin(&ns, Path::new(SH), &[], b"sleep 5", Some(limit)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "not killed");
        assert!(err.to_string().contains("still running"), "{err:#}");
        let out = run_plugin(&ns, Path::new(SH), &[], b"echo ok", Some(limit)).unwrap();
        assert!(out.success && out.stdout == "ok\n", "{out:?}");
    }
}
