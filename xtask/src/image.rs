//! `cargo xtask image`: the node image, built offline from what this machine has.
//!
//! No container engine and no base image: the layer is assembled here from
//! - static (musl) builds of `vpcnetd`, `vpcnetctl` and the `vpcnet` plugin; the daemon embeds
//!   its eBPF object, so nothing else of the project is needed at run time;
//! - what the daemon executes, `nft` (nftables rules) and `tc` (removing clsact qdiscs on
//!   uninstall), taken from this machine's Debian packages with the shared libraries `ldd` names
//!   and the dynamic loader, each at its own path, plus the packages' copyright files;
//! - the reference `portmap` plugin (Debian's containernetworking-plugins) for the init container
//!   to install where the node has none. It runs on the node, not in the image: it needs the
//!   node's glibc (2.34 or later) and `iptables`.
//!
//! The archive is an OCI image layout (`oci-layout`, `index.json`, `blobs/`) that also carries a
//! docker-archive `manifest.json` naming both tags: `ctr images import` and `podman load` read
//! the latter, which is where they take the image names from. Timestamps are the HEAD commit's,
//! so the same tree gives the same image digest.

use crate::{cargo, sh};
use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository the image is tagged in (`vpcnet:<version>` and `vpcnet:latest`); the
/// DaemonSet names it (daemon/tests/manifests.rs checks they agree).
pub const IMAGE_NAME: &str = "vpcnet";
const TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the image keeps the plugins `vpcnetd install-plugin` copies to the node.
const PLUGIN_DIR: &str = "usr/lib/vpcnet/cni";
/// The Debian package the reference plugins come from, and where it puts them.
const PORTMAP: &str = "/usr/lib/cni/portmap";
const PATH_ENV: &str = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn output() -> PathBuf {
    Path::new("target").join("image").join("vpcnet-image.tar")
}

fn tags() -> Vec<String> {
    vec![env!("CARGO_PKG_VERSION").to_string(), "latest".to_string()]
}

pub fn run(verify: bool) -> Result<()> {
    ensure_musl_target()?;
    sh(cargo().args([
        "build",
        "--release",
        "--target",
        TARGET,
        "-p",
        "vpcnet-daemon",
        "-p",
        "vpcnet-cni",
        "--bins",
    ]))?;
    let bin_dir = Path::new("target").join(TARGET).join("release");
    let mut layer = Layer::default();
    let plugin_dest = format!("{PLUGIN_DIR}/vpcnet");
    for (name, dest) in [
        ("vpcnetd", "usr/local/bin/vpcnetd"),
        ("vpcnetctl", "usr/local/bin/vpcnetctl"),
        ("vpcnet", plugin_dest.as_str()),
    ] {
        let path = bin_dir.join(name);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(
            !has_interpreter(&data)?,
            "{} is dynamically linked: the image has no libc for it",
            path.display()
        );
        if name == "vpcnetd" {
            let n = embedded_bpf_objects(&data);
            ensure!(
                n > 0,
                "{} embeds no eBPF object (was the programs crate built?)",
                path.display()
            );
            println!("{name}: static, embeds {n} eBPF object(s)");
        } else {
            println!("{name}: static");
        }
        layer.file(dest, data, 0o755);
    }
    smoke_test_binaries(&bin_dir)?;

    let mut packages = BTreeSet::new();
    for tool in ["nft", "tc"] {
        add_host_tool(&mut layer, &mut packages, tool)?;
    }
    ensure!(
        Path::new(PORTMAP).exists(),
        "{PORTMAP} is missing: `cargo xtask setup` installs containernetworking-plugins"
    );
    layer.file(
        &format!("{PLUGIN_DIR}/portmap"),
        std::fs::read(PORTMAP)?,
        0o755,
    );
    packages.insert(debian_package(Path::new(PORTMAP))?);
    // The host's merged-/usr links: the tools' loader path (/lib64/...) and library paths
    // (/lib/...) resolve in the image as they do here.
    for top in ["bin", "sbin", "lib", "lib64"] {
        if let Ok(target) = std::fs::read_link(Path::new("/").join(top)) {
            layer.symlink(top, &target.to_string_lossy());
        }
    }
    let mut manifest_text = String::from(
        "Debian packages whose files this image ships (binaries and libraries for nft and tc, the\n\
         portmap plugin); their copyright files are beside this one.\n\n",
    );
    for pkg in &packages {
        let version =
            run_capture(Command::new("dpkg-query").args(["-W", "-f=${Version}", pkg.as_str()]))?;
        manifest_text.push_str(&format!("{pkg} {version}\n"));
        let copyright = PathBuf::from(format!("/usr/share/doc/{pkg}/copyright"));
        if let Ok(text) = std::fs::read(&copyright) {
            layer.file(
                &format!("usr/share/doc/vpcnet-image/{pkg}.copyright"),
                text,
                0o644,
            );
        }
    }
    layer.file(
        "usr/share/doc/vpcnet-image/packages.txt",
        manifest_text.into_bytes(),
        0o644,
    );
    layer.dir("tmp", 0o1777);
    layer.dir("etc", 0o755);

    let (epoch, created) = commit_time()?;
    let layer_tar = layer.tar(epoch)?;
    let out = output();
    let archive = build_archive(&layer_tar, epoch, &created, &revision()?)?;
    std::fs::create_dir_all(out.parent().expect("under target/"))?;
    let tmp = out.with_extension("tar.tmp");
    std::fs::write(&tmp, &archive).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &out)?;
    let names: Vec<String> = tags().iter().map(|t| format!("{IMAGE_NAME}:{t}")).collect();
    println!(
        "\nimage {names} written to {path}\n  archive {archive_mib:.1} MiB, unpacked {unpacked_mib:.1} MiB\n  load: podman load -i {path}\n        ctr -n k8s.io images import {path}",
        names = names.join(", "),
        path = out.display(),
        archive_mib = archive.len() as f64 / (1024.0 * 1024.0),
        unpacked_mib = layer_tar.len() as f64 / (1024.0 * 1024.0),
    );
    if verify {
        verify_with_podman(&out)?;
    }
    Ok(())
}

fn ensure_musl_target() -> Result<()> {
    let installed = run_capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        sh(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    // ring and other C parts are compiled with musl-gcc when it exists (Debian's musl-tools).
    Ok(())
}

/// Runs the static binaries here, outside any image: they start, and the plugin speaks CNI.
fn smoke_test_binaries(bin_dir: &Path) -> Result<()> {
    run_capture(Command::new(bin_dir.join("vpcnetd")).arg("--help"))?;
    run_capture(Command::new(bin_dir.join("vpcnetctl")).arg("--help"))?;
    let out = run_capture(Command::new(bin_dir.join("vpcnet")).env("CNI_COMMAND", "VERSION"))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("the plugin's VERSION answer is not JSON: {out}"))?;
    ensure!(
        v["supportedVersions"].is_array(),
        "the plugin's VERSION answer lists no versions: {out}"
    );
    Ok(())
}

/// Adds `tool` (found in /usr/sbin or /sbin), every library `ldd` resolves for it and the dynamic
/// loader, recording which Debian package each came from.
fn add_host_tool(layer: &mut Layer, packages: &mut BTreeSet<String>, tool: &str) -> Result<()> {
    let path = ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .with_context(|| format!("{tool} is not installed: `cargo xtask setup` installs it"))?;
    layer.file(&format!("usr/sbin/{tool}"), std::fs::read(&path)?, 0o755);
    packages.insert(debian_package(&path)?);
    let ldd = run_capture(Command::new("ldd").arg(&path))?;
    for lib in ldd_paths(&ldd)? {
        // The path as the loader asks for it, with the directory resolved (/lib → /usr/lib on a
        // merged-/usr system, where the image gets the same links), the content that of the
        // final file.
        let dir = lib.parent().context("library without a directory")?;
        let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
        let name = lib.file_name().context("library without a name")?;
        let dest = dir.join(name);
        let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        layer.file(&dest.to_string_lossy(), data, 0o755);
        packages.insert(debian_package(&lib)?);
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libx.so => /path (0x..)` and the loader's `/path (0x..)`.
fn ldd_paths(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in ldd.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        if let Some(p) = candidate.split_whitespace().next()
            && p.starts_with('/')
        {
            out.push(PathBuf::from(p));
        }
    }
    ensure!(!out.is_empty(), "ldd named no libraries:\n{ldd}");
    Ok(out)
}

/// The Debian package that owns `path`, under its own name or its merged-/usr alias.
fn debian_package(path: &Path) -> Result<String> {
    let p = path.to_string_lossy();
    let mut candidates = vec![p.to_string()];
    if let Ok(real) = std::fs::canonicalize(path) {
        candidates.push(real.to_string_lossy().into_owned());
    }
    for c in candidates.clone() {
        match c.strip_prefix("/usr") {
            Some(rest) => candidates.push(rest.to_string()),
            None => candidates.push(format!("/usr{c}")),
        }
    }
    for c in &candidates {
        if let Ok(out) = run_capture(Command::new("dpkg-query").args(["-S", c]))
            && let Some((pkg, _)) = out.lines().next().and_then(|l| l.split_once(':'))
        {
            return Ok(pkg.trim().to_string());
        }
    }
    bail!("no Debian package owns {p}")
}

/// True when the ELF file asks for a dynamic loader (has a PT_INTERP segment).
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    ensure!(
        elf.len() >= 64 && elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        ensure!(at + 4 <= elf.len(), "truncated program headers");
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How many little-endian eBPF ELF objects (e_machine 247) are embedded in `bin`.
fn embedded_bpf_objects(bin: &[u8]) -> usize {
    const EM_BPF: u16 = 247;
    bin.windows(20)
        .filter(|w| {
            w.starts_with(b"\x7fELF\x02\x01") && u16::from_le_bytes([w[18], w[19]]) == EM_BPF
        })
        .count()
}

enum Node {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(String),
}

/// The image's one filesystem layer; paths are relative to its root.
#[derive(Default)]
struct Layer {
    entries: BTreeMap<String, Node>,
}

impl Layer {
    /// Directory entries for every ancestor of `path` not yet in the layer.
    fn parents(&mut self, path: &str) {
        for (i, _) in path.match_indices('/') {
            self.entries
                .entry(path[..i].to_string())
                .or_insert(Node::Dir(0o755));
        }
    }
    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let path = path.trim_start_matches('/').to_string();
        self.parents(&path);
        self.entries.insert(path, Node::File(data, mode));
    }
    fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        self.entries.insert(path.to_string(), Node::Dir(mode));
    }
    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entries
            .insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    /// The layer as an uncompressed tar: sorted (parents first), owned by root, every
    /// timestamp `mtime`, so the same content gives the same bytes.
    fn tar(&self, mtime: u64) -> Result<Vec<u8>> {
        // A file placed under a path the host links (usr/lib64 vs lib64) must not also become a
        // directory entry shadowing the link.
        for (path, node) in &self.entries {
            if let Node::Symlink(_) = node {
                let prefix = format!("{path}/");
                if let Some(inner) = self.entries.keys().find(|k| k.starts_with(&prefix)) {
                    bail!("{inner} lies under the symlink {path}");
                }
            }
        }
        let mut b = tar::Builder::new(Vec::new());
        for (path, node) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            match node {
                Node::Dir(mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Node::File(data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())?;
                }
                Node::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)?;
                }
            }
        }
        Ok(b.into_inner()?)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The whole archive: OCI layout plus docker-archive manifest, over the same blobs.
fn build_archive(layer_tar: &[u8], epoch: u64, created: &str, revision: &str) -> Result<Vec<u8>> {
    let diff_id = sha256_hex(layer_tar);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(layer_tar)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha256_hex(&layer_gz);
    let version = env!("CARGO_PKG_VERSION");
    let labels = json!({
        "org.opencontainers.image.title": IMAGE_NAME,
        "org.opencontainers.image.description": "vpcnet node agent (vpcnetd, vpcnetctl) and CNI plugins",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
        "org.opencontainers.image.created": created,
    });
    let config = serde_json::to_vec(&json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": ["/usr/local/bin/vpcnetd"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    }))?;
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_gz.len(),
        }],
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": tags().iter().map(|tag| json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": format!("docker.io/library/{IMAGE_NAME}:{tag}"),
                "org.opencontainers.image.ref.name": tag,
            },
        })).collect::<Vec<_>>(),
    }))?;
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": format!("blobs/sha256/{config_digest}"),
        "RepoTags": tags().iter().map(|t| format!("{IMAGE_NAME}:{t}")).collect::<Vec<_>>(),
        "Layers": [format!("blobs/sha256/{layer_digest}")],
    }]))?;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], dir: bool| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        if dir {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
        }
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, false)?;
    add("index.json", &index, false)?;
    add("manifest.json", &docker_manifest, false)?;
    add("blobs/", &[], true)?;
    add("blobs/sha256/", &[], true)?;
    for (digest, data) in [
        (&config_digest, &config[..]),
        (&manifest_digest, &manifest[..]),
        (&layer_digest, &layer_gz[..]),
    ] {
        add(&format!("blobs/sha256/{digest}"), data, false)?;
    }
    Ok(b.into_inner()?)
}

/// The HEAD commit's time: seconds for the tar entries, RFC 3339 for the image config.
fn commit_time() -> Result<(u64, String)> {
    let out = run_capture(Command::new("git").args(["log", "-1", "--format=%ct %cI"]))?;
    let (secs, iso) = out.trim().split_once(' ').context("git log output")?;
    Ok((secs.parse()?, iso.to_string()))
}

fn revision() -> Result<String> {
    let head = run_capture(Command::new("git").args(["rev-parse", "HEAD"]))?;
    let dirty =
        !run_capture(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]))?
            .trim()
            .is_empty();
    Ok(format!(
        "{}{}",
        head.trim(),
        if dirty { "-dirty" } else { "" }
    ))
}

fn run_capture(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads the archive into podman and runs what the daemon needs inside it, without a network
/// (`--network none`: a namespace of its own with only loopback).
fn verify_with_podman(archive: &Path) -> Result<()> {
    sh(Command::new("podman").args(["load", "-i"]).arg(archive))?;
    let version_tag = format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"));
    let latest = format!("{IMAGE_NAME}:latest");
    let run = |image: &str, extra: &[&str], cmd: &[&str]| {
        let mut c = Command::new("podman");
        // cgroupfs and runc, and limits no higher than the caller's: podman's defaults (systemd,
        // crun, nofile and nproc raised) fail on hosts with hybrid cgroups or capped limits, and
        // these work everywhere.
        c.args([
            "--cgroup-manager=cgroupfs",
            "run",
            "--rm",
            "--network",
            "none",
        ]);
        if which("runc") {
            c.args(["--runtime", "runc"]);
        }
        c.args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
        c.args(extra).arg(image).args(cmd);
        sh(&mut c)
    };
    run(&latest, &[], &["vpcnetd", "--help"])?;
    run(&version_tag, &[], &["vpcnetctl", "--help"])?;
    run(&latest, &[], &["nft", "--version"])?;
    run(&latest, &[], &["tc", "-V"])?;
    // The libraries really work: a table and a qdisc in the container's own netns.
    let admin = ["--cap-add", "NET_ADMIN"];
    run(
        &latest,
        &admin,
        &["nft", "add table inet vpcnet_image_check"],
    )?;
    run(
        &latest,
        &admin,
        &["tc", "qdisc", "add", "dev", "lo", "clsact"],
    )?;
    run(&latest, &[], &["vpcnetd", "install-plugin", "--help"])?;
    Ok(())
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            ldd_paths(ldd).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libmnl.so.0"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(ldd_paths("\tlibx.so.1 => not found\n").is_err());
    }

    #[test]
    fn a_dynamic_binary_has_an_interpreter_and_embeds_no_bpf() {
        // This test binary is linked for the host (glibc): it asks for a loader.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me).unwrap());
        assert_eq!(embedded_bpf_objects(&me), 0);
        let mut fake = vec![0u8; 64];
        fake[..6].copy_from_slice(b"\x7fELF\x02\x01");
        fake[18..20].copy_from_slice(&247u16.to_le_bytes());
        let mut blob = b"padding".to_vec();
        blob.extend_from_slice(&fake);
        assert_eq!(embedded_bpf_objects(&blob), 1);
    }

    #[test]
    fn layer_has_parents_first_and_refuses_files_under_links() {
        let mut l = Layer::default();
        l.file("/usr/sbin/nft", b"x".to_vec(), 0o755);
        l.symlink("sbin", "usr/sbin");
        let tar = l.tar(1).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["sbin", "usr/", "usr/sbin/", "usr/sbin/nft"]);
        assert_eq!(
            tar,
            l.tar(1).unwrap(),
            "the same content gives the same bytes"
        );
        l.file("sbin/tc", b"y".to_vec(), 0o755);
        assert!(l.tar(1).is_err());
    }
}
