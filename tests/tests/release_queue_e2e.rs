//! The release queue against a live daemon: a queued release frees only the allocation it was
//! queued for (issue 9 item 1), and DEL exits 0 while the store's disk is full (item 4).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vpcnet_tests::cni::{CniOutput, exec_plugin};
use vpcnet_tests::{Cluster, ClusterSpec};

fn cluster() -> Cluster {
    Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 30,
        dataplane: false,
    })
    .expect("cluster")
}

fn address(out: &CniOutput) -> Ipv4Addr {
    let v = out.json().unwrap();
    v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {v}"))
}

/// Allocations as (ip, container id) from the daemon.
fn allocations(c: &Cluster) -> Vec<(Ipv4Addr, String)> {
    match vpcnet_api::call(
        &c.node(0).socket,
        vpcnet_api::RequestBody::List,
        Duration::from_secs(5),
    ) {
        Ok(vpcnet_api::ResponseBody::List { allocations }) => allocations
            .into_iter()
            .map(|a| {
                (
                    a.ips
                        .iter()
                        .find_map(|i| match i.address {
                            std::net::IpAddr::V4(v4) => Some(v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .expect("an IPv4 address"),
                    a.key.container_id,
                )
            })
            .collect(),
        other => panic!("list: {other:?}"),
    }
}

fn move_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::rename(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The storm's 42-in-1,500 failure, made deterministic: DEL of K lands while vpcnetd restarts,
/// after its start-up replay (the entry is held aside while it starts), then K is added again
/// with the same container ID and ifname. The replay on the next reconcile tick must not free
/// K's live attachment.
#[test]
fn a_queued_release_never_frees_the_attachment_added_after_it() {
    let mut c = cluster();
    c.node_mut(0).start_daemon().unwrap();
    let k = c.add_pod(0, "default", "k").unwrap();
    let node_ns = c.node(0).ns.name().to_string();

    c.node_mut(0).kill_daemon();
    let del = exec_plugin(
        &c.node(0).ns,
        "vpcnet",
        &k.env("DEL"),
        &k.config_with_prev().to_string(),
    )
    .unwrap();
    assert!(del.success, "DEL with the daemon down queues: {del:?}");
    let queue = c.node(0).release_queue.clone();
    assert_eq!(std::fs::read_dir(&queue).unwrap().count(), 1);
    let aside = c.dir.join("queue-aside");
    move_all(&queue, &aside);
    c.node_mut(0).start_daemon().unwrap();
    move_all(&aside, &queue);

    let add = exec_plugin(
        &c.node(0).ns,
        "vpcnet",
        &k.env("ADD"),
        &k.config.to_string(),
    )
    .unwrap();
    assert!(add.success, "re-ADD: {add:?}");
    let ip = address(&add);

    // Two reconcile ticks (5 s each): any replay of the old entry has run by then.
    let deadline = Instant::now() + Duration::from_secs(11);
    while Instant::now() < deadline {
        let held = allocations(&c);
        assert!(
            held.contains(&(ip, k.container_id.clone())),
            "the re-added pod lost {ip}: {held:?}\n{}",
            c.node(0).log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let addrs =
        k.ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
    assert!(addrs.contains(&format!("{ip}/32")), "{addrs} ({node_ns})");
    assert_eq!(
        std::fs::read_dir(&queue).unwrap().count(),
        0,
        "the entry was consumed"
    );
    // The next pod does not get K's address.
    let other = c.add_pod(0, "default", "other").unwrap();
    assert_ne!(other.ip, ip);
}

/// A tmpfs over the node's state directory, lazily unmounted on drop (the daemon may still
/// hold the file open when a failing test unwinds).
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn del_exits_zero_while_the_state_disk_is_full_and_the_release_lands_later() {
    let mut c = cluster();
    let state = c.node(0).dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=3m,mode=0700",
            "vpcnet-test-state",
        ])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting the tmpfs");
    let _tmpfs = Tmpfs(state.clone());
    c.node_mut(0).start_daemon().unwrap();
    let a = c.add_pod(0, "default", "a").unwrap();

    // Fill the disk, then allocate until the store feels it.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    let mut fill_pods = Vec::new();
    let refused = loop {
        let ns =
            vpcnet_tests::Netns::create(&format!("{}-f{}", c.prefix, fill_pods.len())).unwrap();
        let cid = format!("fill{}{}", fill_pods.len(), "f".repeat(200));
        let env = vpcnet_tests::cni::CniEnv::new("ADD", &cid, &ns.path().to_string_lossy(), "eth0")
            .k8s("default", &format!("fill{}", fill_pods.len()));
        let out = exec_plugin(&c.node(0).ns, "vpcnet", &env, &a.config.to_string()).unwrap();
        if !out.success {
            break out;
        }
        fill_pods.push((ns, env));
        assert!(fill_pods.len() < 2000, "the disk never filled");
    };
    assert_eq!(refused.error_code(), Some(11), "{refused:?}");
    let msg = refused.json().unwrap()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("disk is full") && msg.contains(&state.display().to_string()),
        "{msg}"
    );

    let del = exec_plugin(
        &c.node(0).ns,
        "vpcnet",
        &a.env("DEL"),
        &a.config_with_prev().to_string(),
    )
    .unwrap();
    assert!(del.success, "DEL must exit 0 on a full state disk: {del:?}");

    // Space returns: without a restart the release lands (directly, or replayed from the queue
    // on a reconcile tick) and ADDs work again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(12);
    while allocations(&c).iter().any(|(ip, _)| *ip == a.ip) {
        assert!(
            Instant::now() < deadline,
            "{} still allocated after space returned\n{}",
            a.ip,
            c.node(0).log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let b = c.add_pod(0, "default", "b").unwrap();
    let held = allocations(&c);
    let mut ips: Vec<_> = held.iter().map(|(ip, _)| *ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), held.len(), "an address is held twice: {held:?}");
    assert!(held.iter().any(|(ip, _)| *ip == b.ip));
    assert_eq!(held.len(), fill_pods.len() + 1, "{held:?}");
    c.node_mut(0).stop_daemon();
}
