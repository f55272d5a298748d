//! Developer tasks: `cargo xtask setup|test|demo|clean|bench|image`.

mod bench;
mod bench_dp;
mod bench_idle;
mod bench_kubernetes;
mod bench_policy;
mod bench_scale;
mod bpfmap;
mod demo;
mod image;
mod setup;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "vpcnet developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent) and check kernel features.
    Setup,
    /// Set up, lint, build once in release mode and run the whole test suite.
    Test {
        /// Skip the set-up step (when you know the machine is ready).
        #[arg(long)]
        no_setup: bool,
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build and run the demo cluster in network namespaces.
    Demo {
        /// Leave the cluster up and print how to enter it.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        no_setup: bool,
    },
    /// Remove leftovers of crashed runs (namespaces, pins and temp dirs with the project prefix).
    Clean,
    /// Benchmarks that print figures.
    Bench {
        /// Skip set-up and build (use the binaries already in target/release).
        #[arg(long)]
        no_setup: bool,
        #[command(subcommand)]
        what: bench::Bench,
    },
    /// Build the node image offline (static binaries, nft and tc, portmap) as an archive for
    /// `podman load` and `ctr images import` (target/image/vpcnet-image.tar).
    Image {
        /// Then load it into podman and run vpcnetd, nft and tc in it (network none).
        #[arg(long)]
        verify: bool,
    },
}

fn main() {
    // Errors are for people: one line per cause, no backtrace.
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { no_setup, args } => {
            if !no_setup {
                setup::run()?;
            }
            test(&args)
        }
        Cmd::Demo { keep, no_setup } => {
            if !no_setup {
                setup::run()?;
            }
            build_release()?;
            let r = demo::run(keep);
            if !keep {
                remove_empty_pin_root();
            }
            r
        }
        Cmd::Clean => {
            let removed = vpcnet_tests::cluster::clean_leftovers();
            if removed.is_empty() {
                println!("nothing to clean");
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(())
        }
        Cmd::Bench { no_setup, what } => {
            if !no_setup {
                setup::run()?;
                build_release()?;
            }
            let r = bench::run(what);
            remove_empty_pin_root();
            r
        }
        Cmd::Image { verify } => image::run(verify),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent dir")?
        .to_path_buf())
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("\n$ {shown}");
    let start = Instant::now();
    let status = cmd.status().with_context(|| format!("spawning {shown}"))?;
    println!("  ({:.1} s)", start.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn build_release() -> Result<()> {
    sh(cargo().args(["build", "--release", "--bins"]))
}

fn pin_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(vpcnet_tests::cluster::BPF_ROOT)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn test(extra: &[String]) -> Result<()> {
    let start = Instant::now();
    // What exists before the run (a kept demo cluster, say) is not the tests' leftovers.
    let namespaces_before = vpcnet_tests::netns::project_namespaces();
    let pins_before = pin_dirs();
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // Default members only (no --workspace): the eBPF crate cannot build for the host.
    // Clippy in release mode shares the build-script run (and so the nested eBPF build) with the
    // release build below: the eBPF crate is compiled once per profile, so use only one profile.
    sh(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "vpcnet-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        // Its own target dir: host and BPF artefacts of the same crates must not mix.
        .env("CARGO_TARGET_DIR", Path::new("target").join("ebpf-clippy")))?;
    // `cargo test` builds every default member's binaries too (the e2e tests run them); a separate
    // `cargo build` would compile the dependency graph a second time with other features.
    let mut cmd = cargo();
    cmd.args(["test", "--release"]);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    sh(&mut cmd)?;
    let leftovers: Vec<_> = vpcnet_tests::netns::project_namespaces()
        .into_iter()
        .filter(|n| !namespaces_before.contains(n))
        .collect();
    if !leftovers.is_empty() {
        bail!("tests left namespaces behind: {leftovers:?}");
    }
    let pins: Vec<_> = pin_dirs()
        .into_iter()
        .filter(|p| !pins_before.contains(p))
        .collect();
    if !pins.is_empty() {
        bail!("tests left pinned BPF objects behind: {pins:?}");
    }
    remove_empty_pin_root();
    println!(
        "\nall checks passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Removes the shared pin root once every cluster of this run is gone (clusters running in
/// parallel share it, so only the end of a whole run may); fails harmlessly when something else
/// still lives there.
fn remove_empty_pin_root() {
    let _ = std::fs::remove_dir(vpcnet_tests::cluster::BPF_ROOT);
}
