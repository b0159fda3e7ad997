//! `cargo xtask kube-apiserver`: a real Kubernetes API server for the Kubernetes tests.
//!
//! No registry ships a kube-apiserver binary and envtest/k3s/kind need downloads or a
//! container engine, so this builds kube-apiserver 1.20.2 offline from Debian's source
//! package (its orig tarball is the full Kubernetes tree with `vendor/`):
//!
//! 1. apt-get installs Go, etcd (the tests run it too), make, rsync, jq, openssl;
//! 2. `apt-get source --download-only` with a *private* apt configuration holding a
//!    `deb-src` line (the system's sources are never edited);
//! 3. the vendored `modern-go/reflect2` 1.0.1 segfaults under Go 1.19 on the first list
//!    request, so its sources are replaced by Debian's 1.0.2;
//! 4. `make WHAT=cmd/kube-apiserver` with the vendor tree and no module proxy.
//!
//! The binary is cached under `$CARGO_HOME/xlb-setup/kube-apiserver-1.20.2/`, keyed by
//! version, so only the first run on a machine pays the ~5 minute build; the ~2 GB build
//! tree is removed afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::apt_install;
use crate::util::run_checked;

pub const VERSION: &str = "1.20.2";
/// Debian bookworm's source package of Kubernetes 1.20.2.
const DEBIAN_SOURCE: &str = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1";
const REFLECT2_PACKAGE: &str = "golang-github-modern-go-reflect2-dev";
/// Needed both to build (Go, make, rsync, jq) and to run (etcd, openssl) the server.
const APT_PACKAGES: &[&str] = &[
    "golang-go",
    "etcd-server",
    "etcd-client",
    "rsync",
    "jq",
    "make",
    "openssl",
    "curl",
    "ca-certificates",
];
/// The environment variable through which `cargo xtask test` hands the binary to the tests.
pub const ENV_VAR: &str = "XLB_KUBE_APISERVER";

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cargo")
        })
}

pub fn cache_dir() -> PathBuf {
    cargo_home()
        .join("xlb-setup")
        .join(format!("kube-apiserver-{VERSION}"))
}

/// Builds (once) and returns the path of the cached kube-apiserver binary.
pub fn ensure() -> Result<PathBuf> {
    apt_install("kube-apiserver", APT_PACKAGES)?;
    let dir = cache_dir();
    let binary = dir.join("kube-apiserver");
    if is_working_binary(&binary) {
        return Ok(binary);
    }
    let started = std::time::Instant::now();
    eprintln!("kube-apiserver: building {VERSION} from Debian's source package (about 5 min)");
    let build = dir.join("build");
    // A previous interrupted build leaves a partial tree; start clean so every step is simple.
    if build.exists() {
        fs::remove_dir_all(&build).with_context(|| format!("removing {}", build.display()))?;
    }
    fs::create_dir_all(&build)?;
    let tree = fetch_source(&build)?;
    replace_reflect2(&build, &tree)?;
    compile(&build, &tree)?;
    let built = tree.join("_output/bin/kube-apiserver");
    let tmp = dir.join("kube-apiserver.tmp");
    fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    // Rename is atomic: a concurrent or interrupted run never sees a half-written binary.
    fs::rename(&tmp, &binary)?;
    fs::remove_dir_all(&build).ok();
    if !is_working_binary(&binary) {
        bail!("the built {} does not run", binary.display());
    }
    eprintln!(
        "kube-apiserver: built in {:.0?}, cached at {}",
        started.elapsed(),
        binary.display()
    );
    Ok(binary)
}

fn is_working_binary(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Downloads and unpacks the orig tarball; returns the Kubernetes source tree.
fn fetch_source(build: &Path) -> Result<PathBuf> {
    // A private apt configuration: its own sources list (one deb-src line), its own lists
    // and cache directories, so the system's apt state is untouched.
    let apt = build.join("apt");
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("archives/partial"))?;
    fs::create_dir_all(apt.join("sources.list.d"))?;
    let list = apt.join("sources.list");
    fs::write(
        &list,
        "deb-src http://deb.debian.org/debian bookworm main\n\
         deb-src http://deb.debian.org/debian-security bookworm-security main\n",
    )?;
    let opts = [
        format!("-oDir::Etc::SourceList={}", list.display()),
        format!(
            "-oDir::Etc::SourceParts={}",
            apt.join("sources.list.d").display()
        ),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache::Archives={}", apt.join("archives").display()),
        format!("-oDir::Cache={}", apt.display()),
        // The private directories are root's; apt's `_apt` sandbox user could not write them.
        "-oAPT::Sandbox::User=root".to_owned(),
    ];
    run_checked(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    let download = build.join("download");
    fs::create_dir_all(&download)?;
    run_checked(
        Command::new("apt-get")
            .args(&opts)
            .args(["source", "--download-only", "-qq", DEBIAN_SOURCE])
            .current_dir(&download),
    )?;
    let orig = fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".orig.tar"))
        })
        .context("apt-get source left no .orig.tar.* file")?;
    let tree = build.join("src");
    fs::create_dir_all(&tree)?;
    run_checked(
        Command::new("tar")
            .arg("-xf")
            .arg(&orig)
            .arg("-C")
            .arg(&tree),
    )?;
    // The tarball has one top-level directory; find the tree by its Makefile.
    if tree.join("Makefile").exists() {
        return Ok(tree);
    }
    fs::read_dir(&tree)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("Makefile").exists() && p.join("vendor").exists())
        .context("no Kubernetes tree (Makefile + vendor/) in the orig tarball")
}

fn replace_reflect2(build: &Path, tree: &Path) -> Result<()> {
    let deb_dir = build.join("reflect2");
    fs::create_dir_all(&deb_dir)?;
    run_checked(
        Command::new("apt-get")
            .args([
                "-oAPT::Sandbox::User=root",
                "download",
                "-qq",
                REFLECT2_PACKAGE,
            ])
            .current_dir(&deb_dir),
    )?;
    let deb = fs::read_dir(&deb_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = deb_dir.join("root");
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let from = root.join("usr/share/gocode/src/github.com/modern-go/reflect2");
    let to = tree.join("vendor/github.com/modern-go/reflect2");
    let is_source = |p: &Path| p.extension().is_some_and(|e| e == "go" || e == "s");
    for entry in fs::read_dir(&to)? {
        let path = entry?.path();
        if is_source(&path) {
            fs::remove_file(&path)?;
        }
    }
    let mut copied = 0;
    for entry in fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // Test files would pull in packages the vendor tree does not have.
        if is_source(&path) && !name.ends_with("_test.go") {
            fs::copy(&path, to.join(path.file_name().unwrap_or_default()))?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("no reflect2 sources in {}", from.display());
    }
    Ok(())
}

fn compile(build: &Path, tree: &Path) -> Result<()> {
    let gocache = build.join("gocache");
    run_checked(
        Command::new("make")
            .arg("WHAT=cmd/kube-apiserver")
            .current_dir(tree)
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=vendor")
            .env("GOCACHE", &gocache)
            .env("GOPATH", build.join("gopath"))
            // No .git in the tarball: give the version stamp explicitly.
            .env("KUBE_GIT_VERSION", format!("v{VERSION}"))
            .env("KUBE_GIT_TREE_STATE", "clean")
            .env(
                "KUBE_GIT_COMMIT",
                "0000000000000000000000000000000000000000",
            )
            .env("KUBE_VERBOSE", "1"),
    )
}

/// Prints the binary path (for scripts) after making sure it is built.
pub fn run() -> Result<()> {
    let binary = ensure()?;
    println!("{}", binary.display());
    Ok(())
}
