//! `cargo xtask bench kubernetes`: the real `xlb agent --kubernetes` against the real
//! kube-apiserver with many Services (`tests/examples/bench_kubernetes.rs`): initial sync,
//! change → maps latency, peak RSS. Needs root (XDP, pinned maps, a network namespace).

use anyhow::Result;

use crate::{ebpf, kube, util};

/// What to create and change.
pub struct Options {
    pub json: bool,
    pub services: u32,
    pub endpoints: u32,
    pub changes: u32,
}

pub fn run(opts: &Options) -> Result<()> {
    ebpf::build(true)?;
    util::require_root("the benchmark attaches XDP, pins maps and creates a network namespace")?;
    let apiserver = kube::ensure()?;
    // The agent under test is the release binary the bench finds next to its examples.
    util::cargo(&["build", "--release", "-p", "lb-userspace", "--bin", "xlb"])?;
    util::cargo(&[
        "build",
        "--release",
        "-p",
        "xlb-tests",
        "--example",
        "bench_kubernetes",
    ])?;
    let mut cmd = std::process::Command::new(
        util::project_root().join("target/release/examples/bench_kubernetes"),
    );
    cmd.env(kube::ENV_VAR, &apiserver).args([
        "--services",
        &opts.services.to_string(),
        "--endpoints",
        &opts.endpoints.to_string(),
        "--changes",
        &opts.changes.to_string(),
    ]);
    if opts.json {
        cmd.arg("--json");
    }
    util::run_checked(&mut cmd)
}
