//! The daemon's binaries at their edges: a missing config or socket is a clear error naming it.
//! (Also what makes `cargo test` build `vpcnetd` and `vpcnetctl`, which the e2e suite runs.)

use std::process::Command;

#[test]
fn vpcnetd_names_a_missing_config_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_vpcnetd"))
        .args(["--config", "/nonexistent/vpcnetd.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vpcnetd.yaml"), "{err}");
}

#[test]
fn vpcnetctl_names_an_unreachable_socket() {
    let out = Command::new(env!("CARGO_BIN_EXE_vpcnetctl"))
        .args(["--socket", "/nonexistent/vpcnetd.sock", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vpcnetd.sock"), "{err}");
}
