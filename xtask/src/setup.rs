//! `cargo xtask setup`: installs what a fresh machine of this kind needs, idempotently.
//!
//! * the pinned toolchains (userspace stable from `rust-toolchain.toml`, the eBPF nightly
//!   from `lb-ebpf/rust-toolchain.toml`), each with `rust-src`;
//! * bpf-linker, linked against the pinned nightly's own libLLVM (Debian 12 has no LLVM 23);
//!   a stamp file keyed on the nightly, the LLVM major and the linker version caches it;
//! * the Debian packages the tests and the demo use;
//! * a bpffs at /sys/fs/bpf.
//!
//! Every step checks first and does nothing when already done, so all other xtask
//! commands can call it at no cost.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{project_root, run_checked};

/// bpf-linker release, pinned so the cache key is stable.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, demo and benchmarks need on every run (`gcc` and `make`
/// build jemalloc, the binary's allocator). Benchmarks that use heavier peers (nginx,
/// haproxy, wrk) install those themselves.
const APT_PACKAGES: &[&str] = &[
    "iproute2", "ethtool", "bpftool", "iptables", "procps", "gcc", "make",
];

pub fn run() -> Result<()> {
    if std::env::var_os("XLB_SKIP_SETUP").is_some() {
        return Ok(());
    }
    let stable = toolchain_channel(&project_root().join("rust-toolchain.toml"))?;
    let nightly = toolchain_channel(&project_root().join("lb-ebpf/rust-toolchain.toml"))?;
    ensure_toolchain(&stable, &["rust-src", "clippy", "rustfmt"])?;
    ensure_toolchain(&nightly, &["rust-src", "clippy", "rustfmt"])?;
    ensure_bpf_linker(&stable, &nightly)?;
    ensure_apt_packages()?;
    ensure_bpffs();
    Ok(())
}

/// Reads `channel = "…"` from a rust-toolchain.toml.
pub fn toolchain_channel(path: &Path) -> Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

/// A `rustup` command with the outer toolchain's environment removed, so that a
/// `cargo xtask` started under one toolchain does not leak it into another.
pub fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result<()> {
    let listed = clean_command("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is required (https://rustup.rs); it ships on this machine kind")?;
    let list = String::from_utf8_lossy(&listed.stdout);
    let installed = list.lines().any(|l| l.starts_with(&format!("{name}-")));
    let have_components = installed && {
        let out = clean_command("rustup")
            .args(["component", "list", "--installed", "--toolchain", name])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        components
            .iter()
            .all(|c| text.lines().any(|l| l.starts_with(c)))
    };
    if have_components {
        return Ok(());
    }
    eprintln!("setup: installing toolchain {name} with {components:?}");
    let mut cmd = clean_command("rustup");
    cmd.args([
        "toolchain",
        "install",
        name,
        "--profile",
        "minimal",
        "--no-self-update",
    ]);
    for c in components {
        cmd.args(["-c", c]);
    }
    run_checked(&mut cmd)
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cargo")
        })
}

fn ensure_bpf_linker(stable: &str, nightly: &str) -> Result<()> {
    let verbose = clean_command("rustc")
        .args([&format!("+{nightly}"), "--version", "--verbose"])
        .output()?;
    let verbose = String::from_utf8_lossy(&verbose.stdout).to_string();
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read the nightly's LLVM version")?
        .to_owned();
    let stamp_dir = cargo_home().join("xlb-setup");
    let stamp = stamp_dir.join("bpf-linker.stamp");
    let want = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{llvm_major} {nightly}\n");
    let binary = cargo_home().join("bin/bpf-linker");
    if binary.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM {llvm_major}"
    );

    // Point llvm-sys at the nightly's own libLLVM through a persistent prefix holding two
    // symlinks: `libLLVM.so` (what the linker asks for) and the soname (what the loader
    // asks for). The prefix lives beside the stamp so the installed linker keeps working.
    let sysroot = clean_command("rustc")
        .args([&format!("+{nightly}"), "--print", "sysroot"])
        .output()?;
    let sysroot_lib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let lib_file = fs::read_dir(&sysroot_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    let prefix = stamp_dir.join(format!("rustc-llvm-{nightly}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", lib_file.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(sysroot_lib.join(&lib_file), &path)?;
    }
    let mut cmd = clean_command("cargo");
    cmd.args([
        &format!("+{stable}"),
        "install",
        "--locked",
        "--force",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{llvm_major}"),
    ])
    .env("LLVM_PREFIX", &prefix)
    .env(
        "RUSTFLAGS",
        format!("-C link-arg=-Wl,-rpath,{}", prefix_lib.display()),
    );
    run_checked(&mut cmd)?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn ensure_apt_packages() -> Result<()> {
    apt_install("setup", APT_PACKAGES)
}

/// Installs the Debian `packages` that are missing (nothing when all are installed).
/// `who` names the caller in the log line.
pub fn apt_install(who: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("{who} needs {missing:?} and there is no apt-get to install them");
    }
    eprintln!("{who}: apt-get install {missing:?}");
    run_checked(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// True if the Debian package is installed.
pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn ensure_bpffs() {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return;
    }
    // Not fatal here: unprivileged commands (lint, host tests) do not need it, and the
    // privileged ones report a clear error of their own.
    let _ = fs::create_dir_all("/sys/fs/bpf");
    let _ = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status();
}
