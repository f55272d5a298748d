//! Test harness: namespaces owned by the test, a fake vpcnetd, and running the plugin binary the
//! way a runtime does (environment + config on stdin, inside the "node" namespace).
//!
//! Everything a test creates lives in namespaces named with a per-run prefix and is torn down by
//! Drop guards, also when the test panics. Nothing touches the root namespace.

#![allow(dead_code)] // each test binary uses a different part of the harness

use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vpcnet_api::{
    Allocation, ApiError, AttachmentKey, IpConfig, Request, RequestBody, Response, ResponseBody,
    StatusInfo,
};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_vpcnet");

/// "vpcn" is the project-wide prefix `cargo xtask clean` knows; "t" + pid + counter makes it ours.
pub fn unique(role: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("vpcnt{:x}x{n}{role}", std::process::id())
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop (which also removes every link inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = unique(role);
        assert!(name.starts_with("vpcnt"));
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> ...`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n <ns> ...` returning (success, stdout+stderr).
    pub fn try_ip(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawning ip");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.try_ip(&["link", "show", "dev", name]).0
    }

    /// A command that starts inside this namespace (setns before exec, as a runtime's plugin exec
    /// would inherit its namespace).
    pub fn command(&self, program: &str) -> Command {
        let file = File::open(self.path()).expect("opening netns");
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; `file` is moved into the closure and stays open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("d"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the fake daemon answers.
#[derive(Clone)]
pub struct Behavior {
    pub next_ip: Ipv4Addr,
    pub mtu: Option<u32>,
    pub ready: bool,
    pub endpoint_ready_error: Option<ApiError>,
    pub release_error: Option<ApiError>,
    pub check_error: Option<ApiError>,
    /// An IPv6 address allocated with every IPv4 one (a dual-stack subnet set-up).
    pub also_v6: Option<std::net::Ipv6Addr>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            next_ip: Ipv4Addr::new(10, 77, 0, 10),
            mtu: Some(1450),
            ready: true,
            endpoint_ready_error: None,
            release_error: None,
            check_error: None,
            also_v6: None,
        }
    }
}

#[derive(Default)]
struct State {
    behavior: Behavior,
    requests: Vec<RequestBody>,
    allocations: HashMap<AttachmentKey, Allocation>,
}

/// A vpcnetd stand-in on a Unix socket, served from a thread of the test.
pub struct FakeDaemon {
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    pub fn start(dir: &Path) -> FakeDaemon {
        Self::with(dir, Behavior::default())
    }

    pub fn with(dir: &Path, behavior: Behavior) -> FakeDaemon {
        let socket = dir.join("vpcnetd.sock");
        let listener = UnixListener::bind(&socket).expect("binding fake daemon socket");
        let state = Arc::new(Mutex::new(State {
            behavior,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &st);
                }
            }
        });
        FakeDaemon {
            socket,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<RequestBody> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    pub fn allocations(&self) -> usize {
        self.state.lock().unwrap().allocations.len()
    }

    pub fn set(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.state.lock().unwrap().behavior);
    }

    /// Stops serving and removes the socket: from now on the daemon is "not running".
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = UnixStream::connect(&self.socket);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(conn: UnixStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        let body = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req.body, state),
            Err(e) => ResponseBody::Error(ApiError::new(6, format!("fake: bad request: {e}"))),
        };
        let mut out = serde_json::to_vec(&Response::new(body)).unwrap();
        out.push(b'\n');
        if (&conn).write_all(&out).is_err() {
            return;
        }
        line.clear();
    }
}

fn answer(body: RequestBody, state: &Mutex<State>) -> ResponseBody {
    let mut st = state.lock().unwrap();
    st.requests.push(body.clone());
    let b = st.behavior.clone();
    match body {
        RequestBody::Allocate(req) => {
            if let Some(a) = st.allocations.get(&req.key) {
                return ResponseBody::Allocated(a.clone());
            }
            let ip = match req.static_ips.first() {
                Some(std::net::IpAddr::V4(ip)) => *ip,
                Some(std::net::IpAddr::V6(ip)) => panic!("the plugin asked for IPv6 {ip}"),
                None => {
                    let ip = b.next_ip;
                    st.behavior.next_ip = Ipv4Addr::from(u32::from(ip) + 1);
                    ip
                }
            };
            let mut ips = vec![IpConfig {
                address: ip.into(),
                prefix_len: 24,
                gateway: None,
            }];
            if let Some(v6) = b.also_v6 {
                ips.push(IpConfig {
                    address: v6.into(),
                    prefix_len: 64,
                    gateway: None,
                });
            }
            let a = Allocation {
                key: req.key.clone(),
                ips,
                network: req.network.unwrap_or_else(|| "default".into()),
                subnet: "subnet-test".into(),
                mtu: b.mtu,
            };
            st.allocations.insert(req.key, a.clone());
            ResponseBody::Allocated(a)
        }
        RequestBody::EndpointReady(_) => match b.endpoint_ready_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Ok,
        },
        RequestBody::Release { key } => match b.release_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Released {
                allocation: st.allocations.remove(&key),
            },
        },
        RequestBody::Check(_) => match b.check_error {
            Some(e) => ResponseBody::Error(e),
            None => ResponseBody::Ok,
        },
        RequestBody::Gc(req) => {
            let stale: Vec<AttachmentKey> = st
                .allocations
                .keys()
                .filter(|k| !req.valid.contains(k))
                .cloned()
                .collect();
            let released = stale
                .iter()
                .filter_map(|k| st.allocations.remove(k))
                .collect();
            ResponseBody::GcDone { released }
        }
        RequestBody::Status => ResponseBody::Status(StatusInfo {
            ready: b.ready,
            node: "test-node".into(),
            allocations: st.allocations.len() as u64,
            free: vec![],
            dataplane: "none".into(),
            message: if b.ready {
                String::new()
            } else {
                "ENI not attached yet".into()
            },
        }),
        RequestBody::List => ResponseBody::List {
            allocations: st.allocations.values().cloned().collect(),
        },
        RequestBody::Counters => ResponseBody::Error(ApiError::new(199, "fake: no counters")),
        RequestBody::Policy { .. } => ResponseBody::Error(ApiError::new(199, "fake: no policy")),
    }
}

/// What one plugin run printed.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {:?}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts a spec error with the given code and returns its message.
    pub fn expect_error(&self, code: u64) -> String {
        assert_ne!(self.code, Some(0), "expected failure, got {self:?}");
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(code), "{self:?}");
        assert!(v["cniVersion"].is_string(), "{self:?}");
        v["msg"].as_str().unwrap_or_default().to_string()
    }

    pub fn expect_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "plugin failed: {self:?}");
        self
    }
}

/// Runs a CNI plugin like a runtime: a clean environment with the CNI variables, config on stdin,
/// started inside `node`.
pub fn run_plugin(program: &str, node: &Netns, vars: &[(&str, &str)], stdin: &str) -> Out {
    let mut cmd = node.command(program);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_PATH", "/usr/lib/cni")
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.as_bytes().to_vec();
    // The plugin may exit before reading stdin (VERSION, env errors): ignore EPIPE.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("waiting for plugin");
    let _ = writer.join();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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
        let node = Netns::new("n");
        let pod = Netns::new("p");
        let daemon = FakeDaemon::with(&dir.0, behavior);
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
            ("CNI_NETNS", self.pod.path()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                 K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=uid-1"
                    .to_string(),
            ),
        ]
    }

    pub fn run(&self, vars: &[(&str, String)], stdin: &str) -> Out {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_plugin(PLUGIN, &self.node, &vars, stdin)
    }

    pub fn add(&self, container_id: &str, version: &str) -> Out {
        self.run(
            &self.env("ADD", container_id),
            &self.conf(version, Value::Null),
        )
    }
}

/// Sets a variable in an env list (replacing it if present).
pub fn set_var<'a>(vars: &mut Vec<(&'a str, String)>, key: &'a str, value: &str) {
    vars.retain(|(k, _)| *k != key);
    vars.push((key, value.to_string()));
}

pub fn remove_var(vars: &mut Vec<(&str, String)>, key: &str) {
    vars.retain(|(k, _)| *k != key);
}

/// Runs the plugin like `Fixture::run`, but kills it after `limit`; returns how long it took.
pub fn run_timed(
    f: &Fixture,
    vars: &[(&str, String)],
    stdin: impl AsRef<[u8]>,
    limit: Duration,
) -> (Out, Duration) {
    let mut cmd = f.node.command(PLUGIN);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawning the plugin");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.as_ref().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the plugin") {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let _ = writer.join();
    let stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let out = Out {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(
        status.is_some(),
        "the plugin was still running after {limit:?} (killed): {out:?}"
    );
    (out, took)
}

/// A FIFO at `path`: what a hostile or mistaken CNI_NETNS can point at (opening it blocks).
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}
