//! The plugin's test fixture, on the `vpcnet-tests` harness: a node and a pod namespace, a scratch
//! directory and the harness's fake vpcnetd, and the plugin binary run the way a runtime does
//! (environment + config on stdin, inside the node namespace).
//!
//! Everything a test creates lives in namespaces named with a per-run prefix and is torn down by
//! Drop guards, also when the test panics. Nothing touches the root namespace.

#![allow(dead_code)] // each test binary uses a different part of the fixture

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use vpcnet_tests::Netns;
pub use vpcnet_tests::cni::{CniOutput, REFERENCE_PLUGIN_DIR};
pub use vpcnet_tests::fake_daemon::{Behavior, FakeDaemon};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_vpcnet");

/// A namespace of its own for `role`; panics if it cannot be made.
pub fn netns(role: &str) -> Netns {
    Netns::fresh(role).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A scratch directory named with the project prefix (so `cargo xtask clean` knows a leftover),
/// removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(vpcnet_tests::netns::run_prefix());
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a CNI plugin like a runtime: a clean environment with `CNI_PATH` (the reference plugins)
/// and `vars`, config on stdin, started inside `node`.
pub fn run_plugin(program: &str, node: &Netns, vars: &[(&str, &str)], stdin: &str) -> CniOutput {
    let mut all = vec![("CNI_PATH", REFERENCE_PLUGIN_DIR)];
    all.extend_from_slice(vars);
    vpcnet_tests::cni::run_plugin(node, Path::new(program), &all, stdin.as_bytes(), None)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A node namespace, a pod namespace, a temp dir and a fake daemon: one pod's worth of world.
pub struct Fixture {
    // Field order is drop order: stop the daemon, then remove the namespaces and files.
    pub daemon: FakeDaemon,
    pub pod: Netns,
    pub node: Netns,
    pub dir: TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with(Behavior::default())
    }

    pub fn with(behavior: Behavior) -> Fixture {
        let dir = TempDir::new();
        let node = netns("n");
        let pod = netns("p");
        let daemon = FakeDaemon::with(&dir.0, behavior).unwrap_or_else(|e| panic!("{e:#}"));
        Fixture {
            daemon,
            pod,
            node,
            dir,
        }
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.dir.0.join("release-queue")
    }

    /// A vpcnet network config for `version`, pointing at the fake daemon; `extra` is merged in.
    pub fn conf(&self, version: &str, extra: Value) -> String {
        let mut v = serde_json::json!({
            "cniVersion": version,
            "name": "vpcnet-test",
            "type": "vpcnet",
            "socket": self.daemon.socket,
            "releaseQueue": self.queue_dir(),
        });
        if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        v.to_string()
    }

    pub fn env<'a>(&'a self, command: &'a str, container_id: &'a str) -> Vec<(&'a str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", container_id.to_string()),
            ("CNI_NETNS", self.pod.path_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                 K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"
                    .to_string(),
            ),
        ]
    }

    pub fn run(&self, vars: &[(&str, String)], stdin: &str) -> CniOutput {
        run_plugin(PLUGIN, &self.node, &borrowed(vars), stdin)
    }

    pub fn add(&self, container_id: &str, version: &str) -> CniOutput {
        self.run(
            &self.env("ADD", container_id),
            &self.conf(version, Value::Null),
        )
    }
}

fn borrowed<'a>(vars: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Sets a variable in an env list (replacing it if present).
pub fn set_var<'a>(vars: &mut Vec<(&'a str, String)>, key: &'a str, value: &str) {
    vars.retain(|(k, _)| *k != key);
    vars.push((key, value.to_string()));
}

pub fn remove_var(vars: &mut Vec<(&str, String)>, key: &str) {
    vars.retain(|(k, _)| *k != key);
}

/// Runs the plugin with exactly `vars` (no `CNI_PATH` unless given), killed and failing the test
/// after `limit`; returns how long it took.
pub fn run_timed(
    f: &Fixture,
    vars: &[(&str, String)],
    stdin: impl AsRef<[u8]>,
    limit: Duration,
) -> (CniOutput, Duration) {
    let out = vpcnet_tests::cni::run_plugin(
        &f.node,
        Path::new(PLUGIN),
        &borrowed(vars),
        stdin.as_ref(),
        Some(limit),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let took = out.elapsed;
    (out, took)
}

/// A FIFO at `path`: what a hostile or mistaken CNI_NETNS can point at (opening it blocks).
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}
