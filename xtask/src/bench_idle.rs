//! `cargo xtask bench idle`: what an idle vpcnetd costs — CPU seconds per idle minute (user +
//! system, from /proc/<pid>/stat) and context switches per second — without `manifests_dir`,
//! with it, and with it holding one rejected file (invalid UTF-8). One node in namespaces, no
//! traffic, no pods.

use anyhow::{Context as _, Result, bail};
use std::path::Path;
use std::time::{Duration, Instant};
use vpcnet_tests::{Cluster, ClusterSpec};

#[derive(clap::Args, Clone, Copy)]
pub struct Options {
    /// Seconds measured per variant (after a settling period).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
}

const SETTLE: Duration = Duration::from_secs(3);

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: { name: idle }
---
apiVersion: v1
kind: Pod
metadata: { name: a, namespace: idle, labels: { app: a } }
spec: { containers: [{ name: c, image: c }] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: deny, namespace: idle }
spec: { podSelector: {} }
"#;

/// utime + stime in seconds, and voluntary + involuntary context switches, of one process.
pub(crate) fn cpu_of(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')').context("odd /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let switches = status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Ok((ticks as f64 / hz, switches))
}

/// The vpcnetd started with `config` (found by its command line: the harness owns the child).
fn daemon_pid(config: &Path) -> Result<u32> {
    let want = config.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"vpcnetd")) && args.contains(&want) {
            return Ok(pid);
        }
    }
    bail!("no vpcnetd running with {}", config.display())
}

pub fn run(o: Options) -> Result<()> {
    let mut c = Cluster::build(ClusterSpec {
        nodes: 1,
        cooldown_secs: 1,
        dataplane: true,
    })?;
    c.apply_manifest("cluster.yaml", MANIFESTS)?;
    let config_path = c.node(0).config_path.clone();
    let with_dir = std::fs::read_to_string(&config_path)?;
    let mut without: serde_json::Value = serde_json::from_str(&with_dir)?;
    without
        .as_object_mut()
        .context("daemon config is not an object")?
        .remove("manifests_dir");
    let without = serde_json::to_string_pretty(&without)?;
    let bad = c.manifests_dir().join("bad.yaml");

    println!(
        "\n== idle vpcnetd, one node, no pods, {} s per variant (after {} s settling) ==",
        o.seconds,
        SETTLE.as_secs()
    );
    println!(
        "{:<44} {:>18} {:>16}",
        "variant", "CPU s / idle min", "ctx switches/s"
    );
    let variants: [(&str, &str, bool); 3] = [
        ("no manifests_dir", &without, false),
        ("manifests_dir (3 valid documents)", &with_dir, false),
        ("manifests_dir + one invalid-UTF-8 file", &with_dir, true),
    ];
    for (name, config, bad_file) in variants {
        std::fs::write(&config_path, config)?;
        let log = c.node(0).dir.join("vpcnetd.log");
        if bad.exists() {
            std::fs::remove_file(&bad)?;
        }
        c.node_mut(0).start_daemon()?;
        // Added while the daemon runs: a good state is in force, the new input is rejected.
        let log_before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        if bad_file {
            std::fs::write(&bad, b"kind: \xff\xfe\n")?;
        }
        std::thread::sleep(SETTLE);
        let pid = daemon_pid(&config_path)?;
        let (cpu0, sw0) = cpu_of(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(o.seconds));
        let (cpu1, sw1) = cpu_of(pid)?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{:<44} {:>18.3} {:>16.1}",
            name,
            (cpu1 - cpu0) / secs * 60.0,
            (sw1 - sw0) as f64 / secs
        );
        let text = std::fs::read(&log).unwrap_or_default();
        let warnings = String::from_utf8_lossy(&text[log_before.min(text.len())..])
            .lines()
            .filter(|l| l.contains("manifests rejected"))
            .count();
        if bad_file {
            println!(
                "  'manifests rejected' warnings logged since the bad file was written: {warnings}"
            );
        }
        c.node_mut(0).stop_daemon();
    }
    Ok(())
}
