use anyhow::Context as _;
use std::path::PathBuf;

/// Builds the eBPF programs crate for bpfel-unknown-none (nightly, build-std) so the daemon embeds the
/// exact object it was built with: a daemon and its programs can never drift apart on a node.
fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../ebpf/programs");
    let root = root
        .canonicalize()
        .with_context(|| format!("{}", root.display()))?;
    let root = root.to_str().context("non-UTF-8 path to ebpf/programs")?;
    // aya-build watches only the programs crate; the shared map layouts must trigger a rebuild too,
    // or the daemon could embed programs built against stale struct definitions.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../ebpf/common").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "vpcnet-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
