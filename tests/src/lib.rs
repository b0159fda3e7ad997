//! Shared helpers for xlb's integration tests: network-namespace and bpffs guards that clean
//! up on failure, packet builders, and the packet-fixture environment.
//!
//! Traffic rule: tests only address hosts inside namespaces they created, using the
//! documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32).

pub mod bench_kube;
pub mod bench_support;
pub mod fixture;
pub mod kube;
pub mod netns;
pub mod packets;
pub mod scenario;
pub mod testbed;

/// Fails the test with a clear message unless running as root (CI is root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads XDP programs and creates network namespaces: run it as root \
         (`sudo cargo xtask test`)"
    );
}
pub mod agent_support;
