//! Benchmarks: programs that print figures, each against a reference measured in the same run.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// CNI ADD/DEL latency of vpcnet vs Debian's bridge+host-local, and a 1,000-pod churn.
    Cni,
}

pub fn run(what: Bench) -> Result<()> {
    match what {
        Bench::Cni => anyhow::bail!("bench cni: not built yet"),
    }
}
