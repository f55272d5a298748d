//! Chaos: pod lifecycles at concurrency while vpcnetd is killed -9 every few seconds, with
//! DELs queued while it is down (or still starting) and containers re-added with the same
//! container ID and ifname. Invariants are checked continuously while it runs:
//! - a live pod's allocation is the one its ADD returned (it never loses its address);
//! - no two live pods, and no two allocations, share an address;
//! - at the end, after DEL, reconcile and the queue replay, no allocation is left.
//!
//! `VPCNET_CHAOS_LIFECYCLES` (default 600) and `VPCNET_CHAOS_WORKERS` (default 6) scale it.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vpcnet_tests::cni::{CniEnv, CniOutput, exec_plugin, net_config};
use vpcnet_tests::{Cluster, ClusterSpec, Netns};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Figures {
    lifecycles: AtomicU64,
    readds: AtomicU64,
    kills: AtomicU64,
    checks: AtomicU64,
    queued_dels: AtomicU64,
    add_retries: AtomicU64,
}

/// Live pods: key → (address its ADD returned, generation). The generation changes whenever
/// the pod is (re)added or leaves, so a check only judges pods live across its whole snapshot.
type Live = Mutex<HashMap<String, (Ipv4Addr, u64)>>;

fn address(out: &CniOutput) -> Option<Ipv4Addr> {
    let v = out.json().ok()?;
    v["ips"][0]["address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}

fn list(socket: &std::path::Path) -> Option<Vec<(String, Ipv4Addr)>> {
    match vpcnet_api::call(
        socket,
        vpcnet_api::RequestBody::List,
        Duration::from_secs(2),
    ) {
        Ok(vpcnet_api::ResponseBody::List { allocations }) => Some(
            allocations
                .into_iter()
                .map(|a| {
                    let ip = a
                        .ips
                        .iter()
                        .find_map(|i| match i.address {
                            std::net::IpAddr::V4(v4) => Some(v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .expect("an IPv4 address");
                    (a.key.container_id, ip)
                })
                .collect(),
        ),
        _ => None,
    }
}

/// One check of the invariants against the daemon's allocations; `Ok(false)` when the daemon
/// did not answer (down or starting).
fn check(socket: &std::path::Path, live: &Live) -> Result<bool, String> {
    let before = live.lock().unwrap().clone();
    let Some(held) = list(socket) else {
        return Ok(false);
    };
    let after = live.lock().unwrap().clone();
    let mut by_ip: HashMap<Ipv4Addr, &str> = HashMap::new();
    for (cid, ip) in &held {
        if let Some(other) = by_ip.insert(*ip, cid) {
            return Err(format!("{ip} is allocated to both {other} and {cid}"));
        }
    }
    let held: HashMap<&str, Ipv4Addr> = held.iter().map(|(c, ip)| (c.as_str(), *ip)).collect();
    let mut live_ips = HashSet::new();
    for (cid, (ip, generation)) in &before {
        if !live_ips.insert(*ip) {
            return Err(format!("two live pods were given {ip}"));
        }
        if after.get(cid) != Some(&(*ip, *generation)) {
            continue;
        }
        match held.get(cid.as_str()) {
            Some(h) if h == ip => {}
            Some(h) => return Err(format!("live pod {cid} was given {ip} but holds {h}")),
            None => return Err(format!("live pod {cid} ({ip}) lost its allocation")),
        }
    }
    Ok(true)
}

struct Ctx {
    config: String,
    socket: std::path::PathBuf,
    queue: std::path::PathBuf,
    prefix: String,
    live: Live,
    gens: AtomicU64,
    figures: Figures,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Ctx {
    fn fail(&self, msg: String) {
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            eprintln!("INVARIANT VIOLATED: {msg}");
            *f = Some(msg);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn plugin(node: &Netns, env: &CniEnv, stdin: &str) -> CniOutput {
    exec_plugin(node, "vpcnet", env, stdin).expect("running the plugin")
}

/// ADD until it succeeds (the daemon may be down or starting: code 11); `None` when stopping.
fn add(ctx: &Ctx, node: &Netns, env: &CniEnv) -> Option<Ipv4Addr> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return None;
        }
        let out = plugin(node, env, &ctx.config);
        if out.success {
            return address(&out);
        }
        ctx.figures.add_retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() > deadline {
            ctx.fail(format!("ADD kept failing for 60 s: {out:?}"));
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// DEL must always exit 0 (the release is queued when the daemon cannot take it).
fn del(ctx: &Ctx, node: &Netns, env: &CniEnv, prev: &serde_json::Value) -> bool {
    let mut stdin: serde_json::Value = serde_json::from_str(&ctx.config).unwrap();
    stdin["prevResult"] = prev.clone();
    let queued_before = queue_len(&ctx.queue);
    let out = plugin(node, env, &stdin.to_string());
    if !out.success {
        ctx.fail(format!("DEL failed: {out:?}"));
        return false;
    }
    queue_len(&ctx.queue) > queued_before
}

fn queue_len(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn set_live(ctx: &Ctx, cid: &str, ip: Option<Ipv4Addr>) {
    let generation = ctx.gens.fetch_add(1, Ordering::Relaxed);
    let mut live = ctx.live.lock().unwrap();
    match ip {
        Some(ip) => {
            if let Some((other, _)) = live.iter().find(|(_, (i, _))| *i == ip) {
                let other = other.clone();
                drop(live);
                ctx.fail(format!("ADD gave {cid} {ip}, which live pod {other} holds"));
                return;
            }
            live.insert(cid.to_string(), (ip, generation));
        }
        None => {
            live.remove(cid);
        }
    }
}

fn worker(ctx: &Ctx, node: &Netns, id: usize, count: u64) {
    for n in 0..count {
        if ctx.stop.load(Ordering::SeqCst) {
            return;
        }
        let ns = Netns::create(&format!("{}-w{id}-{n}", ctx.prefix)).expect("pod namespace");
        let cid = format!("chaos{id}x{n}");
        let env = |cmd: &str| {
            CniEnv::new(cmd, &cid, &ns.path().to_string_lossy(), "eth0")
                .k8s("chaos", &format!("p{id}-{n}"))
        };
        let Some(ip) = add(ctx, node, &env("ADD")) else {
            return;
        };
        set_live(ctx, &cid, Some(ip));
        std::thread::sleep(Duration::from_millis(50 + (n % 7) * 30));
        let prev = serde_json::json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": ns.path()}], "ips": [{"address": format!("{ip}/32"), "interface": 0}]});
        set_live(ctx, &cid, None);
        let queued = del(ctx, node, &env("DEL"), &prev);
        if queued {
            ctx.figures.queued_dels.fetch_add(1, Ordering::Relaxed);
        }
        // Half the pods (every one whose DEL was queued) come back under the same container ID
        // and ifname: the order in which a queued release used to free a live pod.
        if queued || n % 2 == 0 {
            let Some(ip2) = add(ctx, node, &env("ADD")) else {
                return;
            };
            ctx.figures.readds.fetch_add(1, Ordering::Relaxed);
            set_live(ctx, &cid, Some(ip2));
            std::thread::sleep(Duration::from_millis(100 + (n % 5) * 40));
            let prev2 = serde_json::json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": ns.path()}], "ips": [{"address": format!("{ip2}/32"), "interface": 0}]});
            set_live(ctx, &cid, None);
            if del(ctx, node, &env("DEL"), &prev2) {
                ctx.figures.queued_dels.fetch_add(1, Ordering::Relaxed);
            }
        }
        ctx.figures.lifecycles.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn kill_storm_never_loses_or_shares_an_address() {
    let lifecycles = env_num("VPCNET_CHAOS_LIFECYCLES", 600);
    let workers = env_num("VPCNET_CHAOS_WORKERS", 6) as usize;
    let cluster = Cluster::build(ClusterSpec {
        nodes: 1,
        // Short, so addresses are reused within the run and a wrongly freed one is handed out.
        cooldown_secs: 1,
        dataplane: false,
    })
    .expect("cluster");
    let cluster = Arc::new(Mutex::new(cluster));
    let started = Instant::now();
    let ctx = {
        let mut c = cluster.lock().unwrap();
        c.node_mut(0).start_daemon().expect("daemon");
        Arc::new(Ctx {
            config: net_config(c.node(0), "1.1.0").to_string(),
            socket: c.node(0).socket.clone(),
            queue: c.node(0).release_queue.clone(),
            prefix: c.prefix.clone(),
            live: Mutex::new(HashMap::new()),
            gens: AtomicU64::new(0),
            figures: Figures::default(),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        })
    };
    let done = Arc::new(AtomicBool::new(false));

    let checker = {
        let (ctx, done) = (ctx.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) && !ctx.stop.load(Ordering::SeqCst) {
                match check(&ctx.socket, &ctx.live) {
                    Ok(true) => {
                        ctx.figures.checks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => ctx.fail(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let killer = {
        let (ctx, done, cluster) = (ctx.clone(), done.clone(), cluster.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !done.load(Ordering::SeqCst) && !ctx.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2500 + (round % 4) * 500));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                cluster.lock().unwrap().node_mut(0).kill_daemon();
                ctx.figures.kills.fetch_add(1, Ordering::Relaxed);
                // Down for a while: DELs queue, ADDs fail with code 11 and roll back.
                std::thread::sleep(Duration::from_millis(300 + (round % 3) * 300));
                // Not waited for: plugins keep running while it replays the queue and binds.
                cluster
                    .lock()
                    .unwrap()
                    .node_mut(0)
                    .spawn_daemon()
                    .expect("restarting vpcnetd");
                round += 1;
            }
        })
    };

    let per_worker = lifecycles.div_ceil(workers as u64);
    let node = cluster.lock().unwrap().node(0).ns.handle();
    let handles: Vec<_> = (0..workers)
        .map(|id| {
            let (ctx, node) = (ctx.clone(), node.handle());
            std::thread::spawn(move || worker(&ctx, &node, id, per_worker))
        })
        .collect();
    for h in handles {
        h.join().expect("worker panicked");
    }
    done.store(true, Ordering::SeqCst);
    killer.join().expect("killer panicked");
    checker.join().expect("checker panicked");

    // Settle: a running daemon, queue replayed and reconciled (ticks every 5 s).
    {
        let mut c = cluster.lock().unwrap();
        if !c.node_mut(0).daemon_running() {
            c.node_mut(0).kill_daemon();
            c.node_mut(0).spawn_daemon().unwrap();
        }
    }
    let mut leftover = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(held) = list(&ctx.socket) {
            leftover = held;
            if leftover.is_empty() && queue_len(&ctx.queue) == 0 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let f = &ctx.figures;
    eprintln!(
        "chaos: {} lifecycles ({} re-ADDs with the same key), {} kills, {} invariant checks, {} DELs queued, {} ADD retries, {} s",
        f.lifecycles.load(Ordering::Relaxed),
        f.readds.load(Ordering::Relaxed),
        f.kills.load(Ordering::Relaxed),
        f.checks.load(Ordering::Relaxed),
        f.queued_dels.load(Ordering::Relaxed),
        f.add_retries.load(Ordering::Relaxed),
        started.elapsed().as_secs(),
    );
    let log = cluster.lock().unwrap().node(0).log_tail();
    if let Some(e) = ctx.failure.lock().unwrap().clone() {
        panic!("{e}\n{log}");
    }
    assert!(
        leftover.is_empty(),
        "allocations outlived their pods: {leftover:?}\n{log}"
    );
    assert_eq!(queue_len(&ctx.queue), 0, "queued releases never replayed");
    assert!(f.kills.load(Ordering::Relaxed) > 0);
    assert!(f.checks.load(Ordering::Relaxed) > 0);
}
