//! Helpers for the forwarding benchmark: running borrowed work inside a namespace, finding
//! and pinning threaded-NAPI kernel threads, reading their CPU time, interface counters,
//! per-CPU busy time and the load average.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;

use crate::netns::NetNs;

/// Runs `f` on a scoped thread inside `ns` (unlike `testbed::in_ns`, `f` may borrow).
pub fn in_ns_scoped<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(move || {
            enter_ns_path(&path);
            f()
        })
        .join()
        .expect("thread in namespace")
    })
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_ns_path(path: &str) {
    let file = std::fs::File::open(path).expect("netns file");
    // SAFETY: setns on a valid fd affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Pins a task (thread id, 0 = the calling thread) to one CPU.
pub fn pin_to_cpu(tid: i32, cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity({tid}, cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Every threaded-NAPI kernel thread (`napi/<dev>-<id>`) on the host: pid → name.
pub fn napi_threads() -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            let comm = comm.trim();
            if comm.starts_with("napi/") {
                out.insert(pid, comm.to_string());
            }
        }
    }
    out
}

/// NAPI threads that appeared since `before`, excluding `known`.
pub fn new_napi_threads(before: &BTreeMap<i32, String>, known: &BTreeSet<i32>) -> Vec<i32> {
    napi_threads()
        .into_keys()
        .filter(|p| !before.contains_key(p) && !known.contains(p))
        .collect()
}

/// Turns on threaded NAPI for `iface` inside `ns`.
pub fn set_threaded(ns: &NetNs, iface: &str) {
    ns.exec(&[
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{iface}/threaded"),
    ]);
}

/// CPU time a task has run, in nanoseconds (`/proc/PID/schedstat`, first field).
pub fn task_runtime_ns(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `ethtool -S` counters of `iface` inside `ns`.
pub fn ethtool_stats(ns: &NetNs, iface: &str) -> BTreeMap<String, u64> {
    ns.exec(&["ethtool", "-S", iface])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Per-CPU (busy, total) jiffies from `/proc/stat` (busy excludes idle and iowait).
pub fn cpu_times() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Median of a non-empty sample (mean of the middle two for even sizes).
pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ethernet + IPv4 + UDP frame of `frame_len` bytes (no FCS), UDP checksum 0.
pub fn udp4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    frame_len: usize,
) -> Vec<u8> {
    let frame_len = frame_len.max(42);
    let mut f = Vec::with_capacity(frame_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (frame_len - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(frame_len, 0x5a);
    f
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("hex MAC byte"))
        .collect();
    v.try_into().expect("six MAC bytes")
}

/// The MAC address of `iface` inside `ns`.
pub fn mac_of(ns: &NetNs, iface: &str) -> [u8; 6] {
    parse_mac(&ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")]))
}

/// Gives a task (0 = the calling thread) the SCHED_FIFO policy at `prio`, or back to
/// SCHED_OTHER with `prio` 0.
pub fn set_fifo(tid: i32, prio: i32) {
    let policy = if prio > 0 {
        libc::SCHED_FIFO
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: plain syscall on a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler({tid}, {prio}): {}",
        std::io::Error::last_os_error()
    );
}
