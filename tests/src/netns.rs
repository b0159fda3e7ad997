//! Network namespaces and bpffs pin directories owned by one test, removed on drop (also
//! when the test panics).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<prefix>-<pid>-<n>`, short enough for
/// interface names when `prefix` is short.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Interface index of `iface` inside the namespace.
    pub fn ifindex(&self, iface: &str) -> u32 {
        self.exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")])
            .trim()
            .parse()
            .expect("ifindex is a number")
    }

    /// Moves the calling thread into the namespace (for the rest of the thread's life).
    pub fn enter_current_thread(&self) {
        let file = File::open(format!("/run/netns/{}", self.name)).expect("netns file exists");
        // SAFETY: setns on a valid namespace fd affects only the calling thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A private pin directory on the bpffs, removed (with its pins) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(prefix: &str) -> Self {
        let root = Path::new("/sys/fs/bpf");
        if !lb_userspace::datapath::is_bpffs(root) {
            sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
        }
        let path = root.join(unique_name(&format!("xlb-test-{prefix}-")));
        std::fs::create_dir_all(&path).expect("create pin dir");
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
