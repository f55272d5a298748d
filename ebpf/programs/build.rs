use which::which;

/// Rebuild when bpf-linker changes: it is the linker of this crate, and cargo does not track it.
fn main() {
    let bpf_linker = which("bpf-linker").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}
