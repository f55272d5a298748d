//! vpcnetd under hostile conditions (issue 9): permissive umask, descriptor exhaustion, idle and
//! huge connections, SIGTERM with requests in flight, broken dataplane or cluster state, and a
//! fuzzed protocol. Every cluster uses only namespaces of its own run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vpcnet_tests::cluster::bin_path;
use vpcnet_tests::cni::{CniEnv, exec_plugin, net_config};
use vpcnet_tests::{Cluster, ClusterSpec};

fn kernel_cluster() -> Cluster {
    Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: false,
    })
    .unwrap()
}

/// Rewrites one key of node 0's daemon config.
fn set_config(c: &mut Cluster, key: &str, value: serde_json::Value) {
    let node = c.node(0);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&node.config_path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(&node.config_path, config.to_string()).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One request line on a fresh connection; the parsed answer.
fn raw(socket: &Path, line: &[u8]) -> serde_json::Value {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(line).unwrap();
    read_answer(&s)
}

fn read_answer(s: &UnixStream) -> serde_json::Value {
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

const STATUS: &[u8] = b"{\"version\":1,\"op\":\"status\"}\n";

/// `GET <path>` against the node's loopback metrics: (status line, body).
fn http_get(c: &Cluster, path: &str) -> Option<(String, String)> {
    let path = path.to_string();
    c.node(0)
        .ns
        .run(move || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9962").ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let (head, body) = text.split_once("\r\n\r\n")?;
            Some((head.lines().next()?.to_string(), body.to_string()))
        })
        .unwrap()
}

/// Item 8: under umask 000 nothing the daemon creates is open to others, and an unprivileged
/// user cannot connect (also tried throughout the start).
#[test]
fn nothing_the_daemon_creates_is_open_to_others() {
    let mut c = kernel_cluster();
    let run_dir = c.node(0).dir.join("run");
    let socket = run_dir.join("vpcnetd.sock");
    set_config(&mut c, "socket", serde_json::json!(socket));
    c.node_mut(0).socket = socket.clone();
    // An unprivileged client hammering the path from before the daemon starts until it serves.
    let prober = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(format!(
            "import socket,time,sys\n\
             end=time.time()+6\n\
             while time.time()<end:\n\
             \x20 s=socket.socket(socket.AF_UNIX)\n\
             \x20 try:\n\
             \x20   s.connect({:?}); print('CONNECTED'); sys.exit(0)\n\
             \x20 except PermissionError: print('EACCES', flush=True)\n\
             \x20 except OSError: pass\n\
             \x20 s.close()\n",
            socket.display().to_string()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.node_mut(0)
        .start_daemon_with(
            |cmd| {
                // SAFETY: umask is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::umask(0);
                        Ok(())
                    });
                }
            },
            true,
        )
        .unwrap();
    let node = c.node(0);
    let state = node.dir.join("state");
    for (path, want) in [
        (socket.clone(), 0o600),
        (run_dir.clone(), 0o700),
        (state.clone(), 0o700),
        (state.join("ipam.redb"), 0o600),
        (node.release_queue.clone(), 0o700),
    ] {
        assert_eq!(mode(&path), want, "{} is {:o}", path.display(), mode(&path));
    }
    let out = prober.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("CONNECTED"), "nobody connected: {stdout}");
    assert!(
        stdout.contains("EACCES"),
        "nobody got EACCES once the socket existed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Item 20: a log written to a file (as `kubectl logs` reads it) carries no colour codes.
#[test]
fn log_in_a_file_has_no_colour_codes() {
    let mut c = kernel_cluster();
    c.node_mut(0).start_daemon().unwrap();
    c.add_pod(0, "default", "p").unwrap();
    let log = std::fs::read_to_string(c.node(0).dir.join("vpcnetd.log")).unwrap();
    assert!(
        log.contains("serving") && log.contains("allocated"),
        "{log}"
    );
    assert!(!log.contains("\x1b["), "ANSI escapes in a log file:\n{log}");
}

/// Item 13: with every descriptor taken, /healthz, /metrics and the socket come back once they
/// are free again.
#[test]
fn healthz_and_socket_survive_descriptor_exhaustion() {
    let mut c = kernel_cluster();
    c.node_mut(0)
        .start_daemon_with(
            |cmd| {
                // SAFETY: setrlimit is async-signal-safe; a local struct is passed.
                unsafe {
                    cmd.pre_exec(|| {
                        let lim = libc::rlimit {
                            rlim_cur: 48,
                            rlim_max: 48,
                        };
                        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                        Ok(())
                    });
                }
            },
            true,
        )
        .unwrap();
    assert_eq!(http_get(&c, "/healthz").unwrap().0, "HTTP/1.0 200 OK");
    let socket = c.node(0).socket.clone();
    let idle: Vec<UnixStream> = (0..80)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    let tcp = c
        .node(0)
        .ns
        .run(|| {
            (0..80)
                .filter_map(|_| std::net::TcpStream::connect("127.0.0.1:9962").ok())
                .collect::<Vec<_>>()
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(idle);
    drop(tcp);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = http_get(&c, "/healthz");
        let status = vpcnet_api::call(
            &socket,
            vpcnet_api::RequestBody::Status,
            Duration::from_secs(1),
        );
        if health.as_ref().is_some_and(|h| h.0 == "HTTP/1.0 200 OK")
            && matches!(status, Ok(vpcnet_api::ResponseBody::Status(_)))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz {health:?}, STATUS {status:?}; log:\n{}",
            c.node(0).log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(c.node(0).dir.join("vpcnetd.log")).unwrap();
    assert!(
        log.contains("accept failed"),
        "descriptors were exhausted:\n{log}"
    );
    assert!(c.node_mut(0).daemon_running());
}

/// Item 14: connections that sent huge requests cost nothing once answered, an 11 MB GC leaves
/// RSS near where it was, idle connections are closed, and ADD is prompt meanwhile.
#[test]
fn connections_are_bounded_in_memory_time_and_number() {
    let mut c = kernel_cluster();
    c.node_mut(0).start_daemon().unwrap();
    let pid = c.node(0).daemon_pid().unwrap();
    let socket = c.node(0).socket.clone();
    let baseline = rss_kib(pid);

    // 20 connections, each answered a 15 MiB line, then left open and idle.
    let mut big = vec![b'x'; 15 << 20];
    big.push(b'\n');
    let held: Vec<UnixStream> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    let conn = UnixStream::connect(&socket).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    (&conn).write_all(&big).unwrap();
                    let answer = read_answer(&conn);
                    assert_eq!(answer["code"], 6, "{answer}");
                    conn
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::thread::sleep(Duration::from_millis(300));
    let after_big = rss_kib(pid);
    eprintln!(
        "RSS: baseline {baseline} KiB, 20 idle connections after 15 MiB requests {after_big} KiB"
    );
    assert!(
        after_big < baseline + 40 * 1024,
        "RSS grew from {baseline} to {after_big} KiB"
    );

    // An 11 MB GC (every key valid: nothing to release).
    let keys: Vec<serde_json::Value> = (0..120_000)
        .map(|i| serde_json::json!({"container_id": format!("{i:064x}"), "ifname": "eth0"}))
        .collect();
    let mut gc =
        serde_json::to_vec(&serde_json::json!({"version": 1, "op": "gc", "valid": keys})).unwrap();
    gc.push(b'\n');
    assert!(gc.len() > 11 << 20, "{}", gc.len());
    assert_eq!(raw(&socket, &gc)["result"], "gc_done");
    std::thread::sleep(Duration::from_millis(300));
    let after_gc = rss_kib(pid);
    eprintln!("RSS after an {} MB GC: {after_gc} KiB", gc.len() >> 20);
    assert!(
        after_gc < baseline + 40 * 1024,
        "RSS after GC {after_gc} KiB, baseline {baseline}"
    );

    // With 200 idle connections open, ADD and STATUS are still prompt.
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let t = Instant::now();
    c.add_pod(0, "default", "busy").unwrap();
    let add = t.elapsed();
    eprintln!("ADD with 220 idle connections: {add:?}");
    assert!(add < Duration::from_secs(3), "ADD took {add:?}");
    assert_eq!(raw(&socket, STATUS)["result"], "status");

    // Beyond the connection limit: refused at once with "try again", not left hanging.
    let extra: Vec<UnixStream> = (0..60)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let t = Instant::now();
    let refused = raw(&socket, STATUS);
    assert_eq!(refused["code"], 11, "{refused}");
    assert!(t.elapsed() < Duration::from_secs(1));
    drop(extra);

    // Idle connections are closed by the daemon after its idle timeout (10 s).
    let t = Instant::now();
    let mut probe = &idle[0];
    probe
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 1];
    let n = probe.read(&mut buf).unwrap_or(0);
    let waited = t.elapsed();
    eprintln!("idle connection closed after {waited:?}");
    assert_eq!(n, 0, "closed without data");
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    for conn in &held {
        let mut r = conn;
        r.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(r.read(&mut buf).unwrap_or(1), 0, "closed too");
    }
    assert!(c.node_mut(0).daemon_running());
}

/// Item 15: SIGTERM lets every accepted request be answered, then the daemon exits.
#[test]
fn sigterm_answers_accepted_requests_then_exits() {
    let mut c = kernel_cluster();
    c.node_mut(0).start_daemon().unwrap();
    let pid = c.node(0).daemon_pid().unwrap() as i32;
    let socket = c.node(0).socket.clone();
    // Requests half sent when SIGTERM arrives.
    let (head, tail) = STATUS.split_at(12);
    let partial: Vec<UnixStream> = (0..20)
        .map(|_| {
            let s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            (&s).write_all(head).unwrap();
            s
        })
        .collect();
    // And a storm of complete ones around it.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let (answered, refused) = std::thread::scope(|s| {
        let storm: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let (mut answered, mut refused) = (0, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Not connecting once the socket is gone is fine: not accepted.
                        let Ok(conn) = UnixStream::connect(&socket) else {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        };
                        conn.set_read_timeout(Some(Duration::from_secs(15)))
                            .unwrap();
                        (&conn).write_all(STATUS).unwrap();
                        let answer = read_answer(&conn);
                        assert_eq!(answer["result"], "status", "{answer}");
                        answered += 1;
                    }
                    (answered, refused)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(500));
        for conn in &partial {
            (&*conn).write_all(tail).unwrap();
        }
        for conn in &partial {
            let answer = read_answer(conn);
            assert_eq!(answer["result"], "status", "{answer}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        storm
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    let deadline = Instant::now() + Duration::from_secs(12);
    while c.node_mut(0).daemon_running() {
        assert!(
            Instant::now() < deadline,
            "vpcnetd still runs after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "drained: {answered} storm requests answered, {refused} connects refused after the socket went, exit {:?} after start of test",
        t0.elapsed()
    );
    assert!(answered > 0 && refused > 0, "{answered} {refused}");
    assert!(!socket.exists(), "the socket goes at SIGTERM");
}

/// What STATUS (vpcnetctl and the plugin's STATUS) and /healthz say.
fn verdicts(c: &Cluster) -> (bool, i32, bool, bool, String) {
    let node = c.node(0);
    let ctl = Command::new(bin_path("vpcnetctl"))
        .arg("--socket")
        .arg(&node.socket)
        .arg("status")
        .output()
        .unwrap();
    let status = vpcnet_api::call(
        &node.socket,
        vpcnet_api::RequestBody::Status,
        Duration::from_secs(5),
    )
    .unwrap();
    let vpcnet_api::ResponseBody::Status(info) = status else {
        panic!("{status:?}")
    };
    let plugin = exec_plugin(
        &node.ns,
        "vpcnet",
        &CniEnv::new("STATUS", "", "", ""),
        &net_config(node, "1.1.0").to_string(),
    )
    .unwrap();
    let plugin_ok = plugin.success;
    if !plugin_ok {
        assert_eq!(plugin.error_code(), Some(50), "{plugin:?}");
    }
    let health = http_get(c, "/healthz").unwrap();
    let healthy = match health.0.as_str() {
        "HTTP/1.0 200 OK" => true,
        "HTTP/1.0 503 Service Unavailable" => false,
        other => panic!("{other}"),
    };
    (
        info.ready,
        ctl.status.code().unwrap_or(-1),
        plugin_ok,
        healthy,
        format!("{} | {}", info.message, health.1),
    )
}

fn wait_verdict(c: &Cluster, ready: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (r, ctl, plugin, healthy, message) = verdicts(c);
        // The four answers are taken one after another; a verdict that changed in between
        // (the daemon just became ready) is sampled again, and only a lasting disagreement fails.
        let agree = ctl == if ready { 0 } else { 2 } && plugin == ready && healthy == ready;
        if r == ready && !agree && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if r == ready {
            assert_eq!(
                ctl,
                if ready { 0 } else { 2 },
                "vpcnetctl status: {message}"
            );
            assert_eq!(plugin, ready, "plugin STATUS: {message}");
            assert_eq!(healthy, ready, "/healthz: {message}");
            return message;
        }
        assert!(
            Instant::now() < deadline,
            "still ready={r}: {message}; log:\n{}",
            c.node(0).log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Item 21: STATUS and /healthz say the same truth about the cluster state and the dataplane,
/// and go back to ready once it is fixed.
#[test]
fn status_and_healthz_tell_the_same_truth() {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: true,
    })
    .unwrap();
    // A manifests_dir that has never been readable: no cluster state, not ready.
    let missing: PathBuf = c.dir.join("manifests-later");
    set_config(&mut c, "manifests_dir", serde_json::json!(missing));
    c.node_mut(0).start_daemon_with(|_| {}, false).unwrap();
    c.node_mut(0)
        .wait_answering(Duration::from_secs(20))
        .unwrap();
    let why = wait_verdict(&c, false);
    assert!(why.contains("cluster state"), "{why}");
    std::fs::create_dir_all(&missing).unwrap();
    wait_verdict(&c, true);

    // A rejected newest input keeps the last good state: ready, and it says so.
    std::fs::write(missing.join("bad.yaml"), "kind: Pod\nmetadata: [unclosed\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, _, _, healthy, message) = verdicts(&c);
        assert!(ready && healthy, "{message}");
        if message.contains("rejected") {
            break;
        }
        assert!(Instant::now() < deadline, "no warning: {message}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(missing.join("bad.yaml")).unwrap();

    // The dataplane's pins removed under the daemon: not ready.
    let pin = c.node(0).bpf_dir.join("ENDPOINTS");
    assert!(pin.exists());
    std::fs::remove_file(&pin).unwrap();
    let why = wait_verdict(&c, false);
    assert!(why.contains("dataplane"), "{why}");
    // A restart reinstalls them.
    c.node_mut(0).stop_daemon();
    c.node_mut(0).start_daemon().unwrap();
    wait_verdict(&c, true);
}

/// Item 19: `vpcnetctl … | head` with the reader gone ends quietly.
#[test]
fn vpcnetctl_into_a_closed_pipe_ends_quietly() {
    let mut c = kernel_cluster();
    c.node_mut(0).start_daemon().unwrap();
    c.add_pod(0, "default", "p").unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: pipe fills the two descriptors; the read end is closed at once.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    // SAFETY: the write end is ours and handed over to the child.
    let stdout = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let out = Command::new(bin_path("vpcnetctl"))
        .arg("--socket")
        .arg(&c.node(0).socket)
        .arg("list")
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}",
        out.status
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn field() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<bool>().prop_map(serde_json::Value::from),
            "[a-z0-9-]{0,12}".prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            (1usize..200_000).prop_map(|n| serde_json::Value::from("a".repeat(n))),
            Just(serde_json::json!({"container_id": "fz", "ifname": "eth0"})),
            Just(serde_json::json!([1, 2, 3])),
            Just(serde_json::json!("10.20.1.77")),
        ]
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        let op = prop_oneof![
            4 => proptest::sample::select(vec![
                "allocate",
                "endpoint_ready",
                "release",
                "check",
                "gc",
                "status",
                "list",
                "counters",
                "policy",
            ])
            .prop_map(String::from),
            1 => "[a-z_]{0,10}",
        ];
        let key = ("fz-[a-f0-9]{1,8}", "eth[0-9]");
        let fields = proptest::collection::btree_map(
            prop_oneof![
                Just("key"),
                Just("pod"),
                Just("network"),
                Just("static_ips"),
                Just("host_veth"),
                Just("ip"),
                Just("valid"),
                Just("namespace"),
                Just("name"),
                Just("host_ifindex"),
                Just("pod_mac"),
            ],
            field(),
            0..6,
        );
        prop_oneof![
            // JSON shapes of real requests with random fields.
            (op, key, fields, prop_oneof![Just(1u32), any::<u32>()]).prop_map(
                |(op, (cid, ifname), fields, version)| {
                    let mut v = serde_json::json!({"version": version, "op": op});
                    for (k, f) in fields {
                        v[k] = f;
                    }
                    if op == "allocate" && v.get("key").is_none() {
                        v["key"] = serde_json::json!({"container_id": cid, "ifname": ifname});
                        v["pod"] = serde_json::json!({});
                        v["host_veth"] = serde_json::json!(format!("vf{}", &cid[3..]));
                    }
                    let mut line = serde_json::to_vec(&v).unwrap();
                    line.push(b'\n');
                    line
                }
            ),
            // Random bytes (newlines inside make several lines).
            proptest::collection::vec(any::<u8>(), 0..4096).prop_map(|mut b| {
                b.push(b'\n');
                b
            }),
            // Many lines at once.
            (1usize..50).prop_map(|n| STATUS.repeat(n)),
        ]
    }

    /// Every complete line gets one well-formed answer in bounded time; the daemon survives,
    /// stays small, and nothing allocated by fuzz keys outlives their release.
    #[test]
    fn daemon_protocol_fuzz() {
        let mut c = kernel_cluster();
        c.node_mut(0).start_daemon().unwrap();
        let pid = c.node(0).daemon_pid().unwrap();
        let socket = c.node(0).socket.clone();
        let baseline = rss_kib(pid);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 3000,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let started = Instant::now();
        runner
            .run(&(request(), any::<bool>()), |(line, partial)| {
                let lines = line.iter().filter(|&&b| b == b'\n').count();
                let conn = UnixStream::connect(&socket).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(15)))
                    .unwrap();
                let t = Instant::now();
                (&conn).write_all(&line).unwrap();
                if partial {
                    // A trailing partial line, then the client goes away: no answer owed.
                    (&conn).write_all(b"{\"version\":1,").unwrap();
                }
                let mut reader = BufReader::new(&conn);
                for _ in 0..lines {
                    let mut answer = String::new();
                    reader.read_line(&mut answer).unwrap();
                    let v: serde_json::Value = serde_json::from_str(&answer)
                        .map_err(|e| TestCaseError::fail(format!("{answer:?}: {e}")))?;
                    // A client is answered in the version it declared when the daemon serves
                    // that version (1 or 2), else in the daemon's own.
                    let declared = serde_json::from_slice::<serde_json::Value>(
                        line.split(|&b| b == b'\n').next().unwrap_or_default(),
                    )
                    .ok()
                    .and_then(|v| v["version"].as_u64());
                    let expected = match declared {
                        Some(1) => 1,
                        _ => vpcnet_api::PROTOCOL_VERSION as u64,
                    };
                    if lines == 1 {
                        prop_assert_eq!(&v["version"], &serde_json::json!(expected), "{}", answer);
                    } else {
                        prop_assert!(v["version"].as_u64().is_some(), "{}", answer);
                    }
                    prop_assert!(v["result"].is_string(), "{}", answer);
                    if v["result"] == "error" {
                        prop_assert!(v["msg"].as_str().is_some_and(|m| m.len() <= 4096));
                    }
                }
                prop_assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
                Ok(())
            })
            .unwrap();
        eprintln!("fuzz: 3000 cases in {:?}", started.elapsed());
        assert!(c.node_mut(0).daemon_running());
        assert_eq!(raw(&socket, STATUS)["result"], "status");
        // Whatever the fuzz allocated goes with a GC that keeps nothing: no allocation is left.
        let gc = raw(&socket, b"{\"version\":1,\"op\":\"gc\",\"valid\":[]}\n");
        assert_eq!(gc["result"], "gc_done", "{gc}");
        let list = raw(&socket, b"{\"version\":1,\"op\":\"list\"}\n");
        assert_eq!(list["allocations"], serde_json::json!([]), "{list}");
        let rss = rss_kib(pid);
        eprintln!("fuzz: RSS {baseline} KiB before, {rss} KiB after");
        assert!(rss < baseline + 40 * 1024, "{baseline} → {rss} KiB");
    }
}
