//! `cargo xtask setup`: brings a fresh machine of this kind to a state where the project builds and its
//! tests run. Every step checks before it acts, so re-running it is cheap and safe.

use crate::sh;
use anyhow::{Result, bail};
use std::path::Path;
use std::process::Command;

/// Debian packages the build, tests, demo and benchmarks use.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",                 // bpf-linker links against LLVM 22 (rustc's LLVM major)
    "iproute2",                    // ip netns / link / route in the harness
    "iputils-ping",                // ICMP probes
    "iperf3",                      // throughput benchmarks
    "iptables",                    // portmap, chained after vpcnet in the tests, programs it
    "containernetworking-plugins", // reference plugins (bridge, host-local, portmap, ...)
    "nftables",                    // masquerade of internet egress
    "procps",                      // sysctl
    "hyperfine",                   // plugin latency comparisons
    "bpftool",                     // the upgrade test pins a map of another layout
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_components()?;
    bpf_linker()?;
    bpffs()?;
    kernel_checks()
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_components() -> Result<()> {
    // The eBPF crate builds with the toolchain literally named `nightly` (see ebpf-toolchain notes);
    // install it only when a machine lacks it.
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nightly {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output();
    let has_src = out
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    if !has_src {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    for c in ["rustfmt", "clippy"] {
        let out = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output();
        if !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(c)) {
            sh(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    // bpf-linker must match the LLVM major of the nightly that builds the eBPF crate.
    let v = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()?;
    let text = String::from_utf8_lossy(&v.stdout);
    if !text.lines().any(|l| l.starts_with("LLVM version: 22.")) {
        bail!(
            "nightly rustc is not on LLVM 22 ({}); move llvm-22-dev and bpf-linker's llvm-22 feature to the new major",
            text.lines()
                .find(|l| l.starts_with("LLVM"))
                .unwrap_or("no LLVM line")
        );
    }
    println!("setup: nightly with rust-src (LLVM 22) present");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if ok {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    sh(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // /usr/bin/llvm-config on Debian 12 is LLVM 14: point the build at 22 explicitly.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

fn bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    });
    if !mounted {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    println!("setup: bpffs mounted at /sys/fs/bpf");
    Ok(())
}

/// Checks the kernel features vpcnet relies on and says, one line each, what is missing and how to fix
/// it. tcx needs Linux ≥ 6.6, bpf_redirect_peer ≥ 5.10, bpf_redirect_neigh ≥ 5.10.
fn kernel_checks() -> Result<()> {
    let mut missing = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (6, 6) {
        missing.push(format!(
            "kernel {} lacks tcx (needs ≥ 6.6): vpcnetd falls back to clsact; upgrade the kernel for tcx",
            release.trim()
        ));
    }
    if (major, minor) < (5, 10) {
        missing
            .push("kernel lacks bpf_redirect_peer/neigh (needs ≥ 5.10): upgrade the kernel".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push(
            "no BTF at /sys/kernel/btf/vmlinux: build the kernel with CONFIG_DEBUG_INFO_BTF=y"
                .into(),
        );
    }
    match std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
        Ok(v) if v.trim() != "0" => {}
        _ => missing.push("BPF JIT is off: sysctl -w net.core.bpf_jit_enable=1".into()),
    }
    // Probe veth inside a throw-away namespace: nothing is created in the root namespace.
    let ns = format!("vpcn-setup-{}", std::process::id());
    let veth = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .and_then(|_| {
            Command::new("ip")
                .args([
                    "-n", &ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
                ])
                .output()
        });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if !veth.is_ok_and(|o| o.status.success()) {
        missing.push("cannot create veth pairs: load the veth module (modprobe veth)".into());
    }
    if missing.is_empty() {
        println!(
            "setup: kernel {} has tcx, redirect_peer/neigh, BTF, JIT, veth",
            release.trim()
        );
        Ok(())
    } else {
        for m in &missing {
            println!("setup: MISSING: {m}");
        }
        bail!("{} kernel feature(s) missing", missing.len())
    }
}
