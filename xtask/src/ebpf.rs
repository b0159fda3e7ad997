//! Building and linting `lb-ebpf` with its pinned nightly (`lb-ebpf/rust-toolchain.toml`).

use std::path::PathBuf;

use anyhow::Result;

use crate::setup::clean_command;
use crate::util::{project_root, run_checked};

/// Where the eBPF build puts its artifacts (the userspace build.rs reads the object here).
pub fn target_dir() -> PathBuf {
    project_root().join("target/ebpf")
}

fn ebpf_cargo(args: &[&str], release: bool) -> std::process::Command {
    let mut cmd = clean_command("cargo");
    cmd.current_dir(project_root().join("lb-ebpf"))
        .args(args)
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env("CARGO_TARGET_DIR", target_dir())
        // BTF for every map and struct (bpftool pretty-prints maps; `prog dump ... linum`).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        );
    if release {
        cmd.arg("--release");
    }
    cmd
}

/// Builds the eBPF object and returns its path.
pub fn build(release: bool) -> Result<PathBuf> {
    run_checked(&mut ebpf_cargo(&["build"], release))?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(format!("bpfel-unknown-none/{profile}/lb-ebpf")))
}

/// Clippy over the eBPF crate with warnings denied.
pub fn clippy() -> Result<()> {
    let mut cmd = ebpf_cargo(&["clippy"], true);
    cmd.args(["--", "-D", "warnings"]);
    run_checked(&mut cmd)?;
    run_checked(
        clean_command("cargo")
            .current_dir(project_root().join("lb-ebpf"))
            .args(["fmt", "--", "--check"]),
    )
}
