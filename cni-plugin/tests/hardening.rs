//! Field hardening (issue 9): what real runtimes, faults and hostile input did to the plugin.
//! Every run here has a time limit, so a regression that hangs fails the test instead of hanging
//! it. Needs root (network namespaces).

mod common;

use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vpcnet_api::{RequestBody, code};

fn host_veth(result: &Value) -> String {
    result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

fn no_vpcnet_links(ns: &Netns) {
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("vpc"), "{links}");
}

/// A stand-in for a vpcnetd that is stuck: it accepts connections and then either never answers,
/// or trickles bytes that never make a line (so no socket read ever times out).
struct StuckDaemon {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StuckDaemon {
    fn start(dir: &Path, trickle: bool) -> StuckDaemon {
        let socket = dir.join("stuck.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            while !s.load(Ordering::SeqCst) {
                if let Ok((conn, _)) = listener.accept() {
                    held.push(conn);
                }
                if trickle {
                    for c in &mut held {
                        let _ = c.write_all(b" ");
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        StuckDaemon {
            socket,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StuckDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A daemon that answers every request with the same raw line (what an older or broken daemon
/// might send, not limited by this release's `ApiError` bounds).
fn raw_daemon(dir: &Path, line: String) -> (PathBuf, Arc<AtomicBool>) {
    let socket = dir.join("raw.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            if let Ok((mut conn, _)) = listener.accept() {
                conn.set_nonblocking(false).unwrap();
                let mut req = Vec::new();
                let _ = std::io::BufReader::new(&conn).read_until(b'\n', &mut req);
                let _ = conn.write_all(line.as_bytes());
                let _ = conn.write_all(b"\n");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (socket, stop)
}

const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Item 3: a repeated ADD must not destroy the live attachment.

#[test]
fn repeated_add_is_refused_and_leaves_the_live_attachment_intact() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", Value::Null);
    let (out, _) = run_timed(&f, &f.env("ADD", "c0ffee40"), &conf, LIMIT);
    let r = out.expect_ok().json().unwrap();
    let veth = host_veth(&r);
    // What a chained plugin (tuning, bandwidth…) may have added: it must survive too.
    f.pod
        .ip(&["addr", "add", "192.0.2.99/32", "dev", "eth0"])
        .unwrap();
    let snapshot = || {
        (
            f.pod.ip(&["-o", "link", "show", "dev", "eth0"]).unwrap(),
            f.pod
                .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
                .unwrap(),
            f.pod.ip(&["-4", "route", "show"]).unwrap(),
            f.pod.ip(&["-4", "neigh", "show", "dev", "eth0"]).unwrap(),
            f.node.ip(&["-o", "link", "show", "dev", &veth]).unwrap(),
            f.node.ip(&["-4", "route", "show"]).unwrap(),
        )
    };
    let before = snapshot();
    f.daemon.clear_requests();

    let (out, _) = run_timed(&f, &f.env("ADD", "c0ffee40"), &conf, LIMIT);
    let msg = out.expect_error(code::ATTACHMENT_EXISTS as u64);
    assert!(
        msg.contains("already attached") && msg.contains("10.77.0.10"),
        "{msg}"
    );
    assert_eq!(snapshot(), before, "the live attachment was changed");
    let reqs = f.daemon.requests();
    assert!(
        !reqs
            .iter()
            .any(|r| matches!(r, RequestBody::Release { .. })),
        "the live attachment's address was released: {reqs:?}"
    );
    assert_eq!(f.daemon.allocations(), 1);

    // The first result still describes the pod: CHECK passes.
    let with_prev = f.conf("1.0.0", json!({ "prevResult": r }));
    run_timed(&f, &f.env("CHECK", "c0ffee40"), &with_prev, LIMIT)
        .0
        .expect_ok();
}

#[test]
fn add_replaces_a_pod_interface_left_without_its_address() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", Value::Null);
    let r = run_timed(&f, &f.env("ADD", "c0ffee41"), &conf, LIMIT)
        .0
        .expect_ok()
        .json()
        .unwrap();
    // An ADD that died after creating the pair but before addressing the pod end.
    f.pod.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    let r2 = run_timed(&f, &f.env("ADD", "c0ffee41"), &conf, LIMIT)
        .0
        .expect_ok()
        .json()
        .unwrap();
    assert_eq!(host_veth(&r2), host_veth(&r));
    assert_eq!(r2["ips"][0]["address"], "10.77.0.10/32");
    let addr = f.pod.ip(&["-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains("inet 10.77.0.10/32"), "{addr}");
    assert_eq!(f.daemon.allocations(), 1);
}

// ---------------------------------------------------------------------------------------------
// Item 7: ADD into the plugin's own namespace.

#[test]
fn add_and_check_into_the_plugins_own_namespace_are_refused() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", Value::Null);
    let node_state = || {
        (
            f.node.ip(&["-o", "link", "show"]).unwrap(),
            f.node.ip(&["-o", "-4", "addr", "show"]).unwrap(),
            f.node.ip(&["-4", "route", "show"]).unwrap(),
        )
    };
    let before = node_state();
    // The node's namespace by its bind mount, and by the path that always names one's own.
    for netns in [f.node.path_string(), "/proc/self/ns/net".to_string()] {
        let mut vars = f.env("ADD", "c0ffee42");
        set_var(&mut vars, "CNI_NETNS", &netns);
        let (out, _) = run_timed(&f, &vars, &conf, LIMIT);
        let msg = out.expect_error(code::INVALID_ENV as u64);
        assert!(msg.contains("CNI_NETNS") && msg.contains(&netns), "{msg}");
        set_var(&mut vars, "CNI_COMMAND", "CHECK");
        let prev = json!({"prevResult": {"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns}],
            "ips": [{"address": "10.77.0.10/32", "interface": 0}]}});
        let (out, _) = run_timed(&f, &vars, f.conf("1.0.0", prev), LIMIT);
        out.expect_error(code::INVALID_ENV as u64);
    }
    assert_eq!(node_state(), before, "the node namespace was changed");
    assert!(f.daemon.requests().is_empty(), "{:?}", f.daemon.requests());
}

// ---------------------------------------------------------------------------------------------
// Item 12: CNI_NETNS that is not a network namespace, and the watchdog.

#[test]
fn netns_that_is_no_network_namespace_fails_at_once() {
    let f = Fixture::new();
    let fifo = f.dir.0.join("fifo");
    common::mkfifo(&fifo);
    let plain = f.dir.0.join("plain");
    std::fs::write(&plain, "x").unwrap();
    let paths = [
        fifo.display().to_string(),
        plain.display().to_string(),
        f.dir.0.display().to_string(),
        "/dev/null".to_string(),
        "/proc/self/ns/uts".to_string(),
    ];
    let prev = json!({"prevResult": {"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.77.0.10/32", "interface": 0}]}});
    for path in &paths {
        for (command, conf) in [
            ("ADD", f.conf("1.0.0", Value::Null)),
            ("CHECK", f.conf("1.0.0", prev.clone())),
        ] {
            let mut vars = f.env(command, "c0ffee43");
            set_var(&mut vars, "CNI_NETNS", path);
            let (out, took) = run_timed(&f, &vars, &conf, Duration::from_secs(5));
            let msg = out.expect_error(code::INVALID_ENV as u64);
            assert!(msg.contains("CNI_NETNS"), "{command} {path}: {msg}");
            assert!(
                took < Duration::from_secs(2),
                "{command} {path} took {took:?}"
            );
        }
    }
    assert!(f.daemon.requests().is_empty());
    no_vpcnet_links(&f.node);
}

#[test]
fn a_daemon_that_trickles_bytes_is_cut_off_by_the_watchdog() {
    let f = Fixture::new();
    let stuck = StuckDaemon::start(&f.dir.0, true);
    let conf = f.conf("1.0.0", json!({ "socket": stuck.socket }));
    let (out, took) = run_timed(
        &f,
        &f.env("ADD", "c0ffee44"),
        &conf,
        Duration::from_secs(40),
    );
    let msg = out.expect_error(code::TRY_AGAIN_LATER as u64);
    eprintln!("trickling daemon: ADD failed after {took:?}: {msg}");
    assert!(msg.contains("allocate"), "names what it waited for: {msg}");
    assert_eq!(out.json().unwrap()["cniVersion"], "1.0.0");
    assert!(
        took >= Duration::from_secs(19) && took < Duration::from_secs(25),
        "{took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 15: a stuck daemon makes ADD fail in seconds, leaving nothing behind.

#[test]
fn add_against_a_stuck_daemon_fails_in_seconds_and_leaves_no_veth() {
    let f = Fixture::new();
    let stuck = StuckDaemon::start(&f.dir.0, false);
    let conf = f.conf("1.0.0", json!({ "socket": stuck.socket }));
    let (out, took) = run_timed(&f, &f.env("ADD", "c0ffee45"), &conf, LIMIT);
    let msg = out.expect_error(code::TRY_AGAIN_LATER as u64);
    eprintln!("stuck daemon: ADD failed after {took:?}: {msg}");
    assert!(msg.contains("allocate"), "{msg}");
    // 10 s for allocate, 2 s for rollback's release, and the process around them.
    assert!(took < Duration::from_secs(14), "{took:?}");
    no_vpcnet_links(&f.node);
    assert!(!f.pod.has_link("eth0"));
}

// ---------------------------------------------------------------------------------------------
// Item 16: errors stay small whatever the input.

fn assert_small_spec_error(out: &CniOutput, what: &str) {
    assert_ne!(out.exit_code, Some(0), "{what}: expected failure");
    // msg and details are bounded to MAX_MESSAGE each; the rest is the JSON around them.
    assert!(
        out.stdout.len() < 2 * vpcnet_api::MAX_MESSAGE + 256,
        "{what}: {} bytes of error",
        out.stdout.len()
    );
    let v = out.json().unwrap();
    assert!(v["cniVersion"].is_string(), "{what}: {v}");
    assert!(v["code"].is_u64(), "{what}: {v}");
    assert!(v["msg"].is_string(), "{what}: {v}");
}

#[test]
fn huge_inputs_give_small_spec_errors() {
    let f = Fixture::new();
    let big_env = "a".repeat(100_000); // one variable may hold at most 128 KiB
    let huge = "n".repeat(10 << 20);
    let conf = f.conf("1.0.0", Value::Null);

    let mut vars = f.env("ADD", "x");
    set_var(&mut vars, "CNI_CONTAINERID", &format!("{big_env}!"));
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "container id");
    let mut vars = f.env("ADD", "c0ffee46");
    set_var(&mut vars, "CNI_ARGS", &format!("IP={big_env}"));
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "CNI_ARGS IP");
    set_var(&mut vars, "CNI_ARGS", &format!("{big_env}=1"));
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "CNI_ARGS key");
    set_var(&mut vars, "CNI_ARGS", &format!("MAC=02:{big_env}"));
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "CNI_ARGS MAC");
    set_var(&mut vars, "CNI_ARGS", &big_env);
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "CNI_ARGS entry");
    let mut vars = f.env("ADD", "c0ffee46");
    set_var(&mut vars, "CNI_IFNAME", &big_env);
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "ifname");
    set_var(&mut vars, "CNI_COMMAND", &big_env);
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "command");

    let vars = f.env("ADD", "c0ffee46");
    for (what, extra) in [
        ("cniVersion", json!({ "cniVersion": huge })),
        ("mtu", json!({ "mtu": huge })),
        ("socket", json!({ "socket": format!("/tmp/{huge}") })),
        (
            "runtimeConfig.ips",
            json!({ "runtimeConfig": { "ips": [huge] } }),
        ),
        (
            "runtimeConfig.mac",
            json!({ "runtimeConfig": { "mac": huge } }),
        ),
    ] {
        let stdin = f.conf("1.0.0", extra);
        assert_small_spec_error(&run_timed(&f, &vars, &stdin, LIMIT).0, what);
    }
    let mut vars = f.env("ADD", "c0ffee46");
    set_var(&mut vars, "CNI_NETNS", &format!("/tmp/{big_env}"));
    assert_small_spec_error(&run_timed(&f, &vars, &conf, LIMIT).0, "netns");

    // A 10 MB network name echoed back by a daemon (of another release) in its error.
    let answer = json!({"version": vpcnet_api::PROTOCOL_VERSION, "result": "error",
        "code": code::UNKNOWN_NETWORK, "msg": format!("unknown network {huge}"), "details": huge});
    let (socket, stop) = raw_daemon(&f.dir.0, answer.to_string());
    let stdin = f.conf("1.0.0", json!({ "socket": socket, "network": huge }));
    let (out, _) = run_timed(&f, &f.env("ADD", "c0ffee46"), &stdin, LIMIT);
    assert_small_spec_error(&out, "network");
    assert_eq!(out.json().unwrap()["code"], code::UNKNOWN_NETWORK);
    stop.store(true, Ordering::SeqCst);
    no_vpcnet_links(&f.node);
}

// ---------------------------------------------------------------------------------------------
// Item 8 (plugin side): the log file.

#[test]
fn log_file_is_private_and_a_planted_symlink_is_not_followed() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let log = f.dir.0.join("vpcnet.log");
    let mut vars = f.env("VERSION", "c0ffee47");
    set_var(&mut vars, "CNI_COMMAND", "DEL");
    set_var(&mut vars, "VPCNET_LOG_FILE", &log.display().to_string());
    let conf = f.conf("1.0.0", Value::Null);
    run_timed(&f, &vars, &conf, LIMIT).0.expect_ok();
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "log mode {mode:o}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("DEL"));

    // One left by an older release with the umask's mode is tightened.
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    run_timed(&f, &vars, &conf, LIMIT).0.expect_ok();
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "log mode {mode:o}");

    let target = f.dir.0.join("elsewhere");
    std::fs::write(&target, "").unwrap();
    let link = f.dir.0.join("planted.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    set_var(&mut vars, "VPCNET_LOG_FILE", &link.display().to_string());
    run_timed(&f, &vars, &conf, LIMIT).0.expect_ok();
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "",
        "followed the symlink"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 17: the conflists the repository ships.

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every ```json block of the README that is a conflist (has "plugins").
fn readme_conflists(md: &str) -> Vec<String> {
    md.split("```json")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.contains("\"plugins\""))
        .map(str::to_string)
        .collect()
}

fn version_tuple(v: &str) -> (u32, u32, u32) {
    let p: Vec<u32> = v.split('.').map(|x| x.parse().unwrap()).collect();
    (p[0], p[1], p[2])
}

#[test]
fn shipped_conflists_use_a_version_todays_runtimes_accept() {
    // What the daemon writes on a Kubernetes node, with and without portmap.
    let mut lists = vec![
        vpcnet_k8s::node::conflist("vpcnet", true),
        vpcnet_k8s::node::conflist("vpcnet", false),
    ];
    let readme = readme_conflists(&repo_file("README.md"));
    assert!(!readme.is_empty(), "the README's conflist was not found");
    lists.extend(readme);

    let f = Fixture::new();
    for (n, text) in lists.iter().enumerate() {
        let list: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let version = list["cniVersion"].as_str().expect("cniVersion").to_string();
        // libcni 1.1 (containerd 1.6/1.7, podman 4) rejects results above 1.0.0.
        assert!(
            version_tuple(&version) <= (1, 0, 0),
            "shipped conflist {n} says cniVersion {version}: containerd 1.6/1.7 and podman 4 \
             reject its result"
        );
        let plugin = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "vpcnet")
            .expect("vpcnet in the list")
            .clone();
        // What libcni hands the plugin: its entry with the list's name and version, pointed at
        // the test daemon.
        let mut conf: Value = serde_json::from_str(&f.conf(&version, Value::Null)).unwrap();
        for (k, v) in plugin.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = json!(version);
        let id = format!("c0ffee5{n}");

        let v = run_timed(&f, &f.env("VERSION", &id), conf.to_string(), LIMIT)
            .0
            .expect_ok()
            .json()
            .unwrap();
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(version)),
            "{v}"
        );
        let r = run_timed(&f, &f.env("ADD", &id), conf.to_string(), LIMIT)
            .0
            .expect_ok()
            .json()
            .unwrap();
        // The 1.0.0 result format: no per-address "version", no interface MTU (1.1.0 only).
        assert_eq!(r["cniVersion"], json!(version));
        assert!(r["ips"][0].get("version").is_none(), "{r}");
        assert!(r["interfaces"][1].get("mtu").is_none(), "{r}");
        assert_eq!(r["interfaces"][1]["sandbox"], f.pod.path_string());
        assert_eq!(r["ips"][0]["interface"], 1);
        conf["prevResult"] = r;
        run_timed(&f, &f.env("CHECK", &id), conf.to_string(), LIMIT)
            .0
            .expect_ok();
        run_timed(&f, &f.env("DEL", &id), conf.to_string(), LIMIT)
            .0
            .expect_ok();
        assert!(!f.pod.has_link("eth0"));
    }
    assert_eq!(f.daemon.allocations(), 0);
}
