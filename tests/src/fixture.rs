//! The packet-fixture environment: a private network namespace with two interfaces, static
//! routes and neighbours (so `bpf_fib_lookup` gives known answers), the real compiled eBPF
//! object loaded through `lb-userspace`'s map API, and helpers to run packets through
//! BPF_PROG_TEST_RUN and compare whole outputs and counter deltas.

use std::collections::BTreeMap;
use std::net::IpAddr;

use lb_common::{
    Backend, DatapathConfig, FAMILY_V4, FAMILY_V6, VipAddrKey, VipInfo, VipKey, flow_hash,
    maglev_slot,
};
use lb_userspace::datapath::{Datapath, LoadOptions, TestRunOutput};

use crate::netns::{NetNs, PinDir};
use crate::packets::{addr_words, v4, v6};

/// MAC of the LB node's first interface (`lb0`).
pub const LB0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// MAC of the LB node's second interface (`lb1`).
pub const LB1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// MAC of the router behind `lb0` toward the backend networks.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// MAC of a backend directly attached to `lb1`.
pub const DIRECT_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x20];
/// Gateway MAC configured for the fallback path (no route).
pub const FALLBACK_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xee];

/// Tunnel source addresses of the LB node.
pub fn tunnel_src_v4() -> IpAddr {
    v4("192.0.2.1")
}
pub fn tunnel_src_v6() -> IpAddr {
    v6("2001:db8:1::1")
}

/// The environment; build it with [`FixtureEnv::run`].
pub struct FixtureEnv {
    pub ns: NetNs,
    pub pins: PinDir,
    pub dp: Datapath,
    pub lb0: u32,
    pub lb1: u32,
    pub table_size: u32,
    next_vip: u32,
    /// VIP id → ring contents pattern (backend ids repeated over the ring).
    patterns: BTreeMap<u32, Vec<u32>>,
    vip_flags: BTreeMap<u32, u32>,
}

impl FixtureEnv {
    /// Builds the environment in a dedicated thread that enters the namespace (BPF test runs
    /// and route lookups happen in the calling thread's namespace) and is pinned to one CPU
    /// (per-CPU counters and rate-guard state stay deterministic), then runs `body` there.
    pub fn run<F: FnOnce(&mut FixtureEnv) + Send + 'static>(load: LoadOptions, body: F) {
        crate::require_root();
        let ns = NetNs::new("xfx");
        setup_topology(&ns);
        let handle = std::thread::spawn(move || {
            pin_to_cpu(0);
            ns.enter_current_thread();
            let pins = PinDir::new("fx");
            let mut opts = load;
            opts.pin_dir = pins.path.clone();
            let dp = Datapath::load(&opts).expect("load the datapath");
            let lb0 = ns.ifindex("lb0");
            let lb1 = ns.ifindex("lb1");
            let mut env = FixtureEnv {
                ns,
                pins,
                dp,
                lb0,
                lb1,
                table_size: opts.maglev_table_size,
                next_vip: 0,
                patterns: BTreeMap::new(),
                vip_flags: BTreeMap::new(),
            };
            env.set_config(|_| {});
            body(&mut env);
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Default fixture load options: small maps, M = 65537.
    pub fn small() -> LoadOptions {
        LoadOptions {
            pin_dir: Default::default(),
            maglev_table_size: 65_537,
            max_vips: 16,
            max_backends: 64,
            conntrack_entries: 16_384,
        }
    }

    /// Writes the datapath config: defaults for this topology, adjusted by `edit`.
    pub fn set_config(&mut self, edit: impl FnOnce(&mut DatapathConfig)) {
        let mut cfg = DatapathConfig {
            maglev_table_size: self.table_size,
            new_conn_rate_limit: 0,
            udp_idle_timeout_ns: 30_000_000_000,
            tunnel_src_v4_be: addr_words(tunnel_src_v4())[0],
            fallback_mtu: 1500,
            tunnel_src_v6_be: addr_words(tunnel_src_v6()),
            gateway_mac: FALLBACK_GW_MAC,
            _pad: [0; 2],
        };
        edit(&mut cfg);
        self.dp.maps.set_config(&cfg).expect("write config");
    }

    /// Registers backend `id` at `addr`.
    pub fn add_backend(&mut self, id: u32, addr: IpAddr) {
        let backend = Backend {
            addr_be: addr_words(addr),
            family: family(addr),
            _pad: [0; 3],
        };
        self.dp
            .maps
            .backends
            .set(id, &backend, 0)
            .expect("write backend");
    }

    /// Removes backend `id` (its slot becomes unused).
    pub fn remove_backend(&mut self, id: u32) {
        self.dp
            .maps
            .backends
            .set(id, &Backend::default(), 0)
            .expect("clear backend");
    }

    /// Adds a VIP whose ring repeats `backends` over its slots; returns the VIP id.
    pub fn add_vip(
        &mut self,
        addr: IpAddr,
        port: u16,
        proto: u8,
        flags: u32,
        backends: &[u32],
    ) -> u32 {
        let vip_id = self.next_vip;
        self.next_vip += 1;
        let ring = 2 * vip_id;
        let table: Vec<u32> = (0..self.table_size as usize)
            .map(|i| {
                if backends.is_empty() {
                    0
                } else {
                    backends[i % backends.len()]
                }
            })
            .collect();
        self.dp
            .maps
            .maglev
            .write_ring(ring, &table)
            .expect("write ring");
        let key = vip_key(addr, port, proto);
        let info = VipInfo {
            vip_id,
            ring,
            flags,
            _pad: 0,
        };
        self.dp
            .maps
            .vips
            .insert(&key, &info, 0)
            .expect("insert vip");
        let akey = addr_key(addr);
        let count = self.dp.maps.vip_addrs.get(&akey, 0).unwrap_or(0);
        self.dp
            .maps
            .vip_addrs
            .insert(&akey, &(count + 1), 0)
            .expect("insert vip addr");
        self.patterns.insert(vip_id, backends.to_vec());
        self.vip_flags.insert(vip_id, flags);
        vip_id
    }

    /// The backend the ring of `vip_id` holds for this flow, computed with lb-common.
    pub fn predict(
        &self,
        vip_id: u32,
        src: IpAddr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> (u32, u32) {
        let hash = self.hash(vip_id, src, sport, dport, proto);
        let pattern = &self.patterns[&vip_id];
        let slot = maglev_slot(hash, self.table_size) as usize;
        (pattern[slot % pattern.len()], hash)
    }

    /// The flow hash the kernel computes for this flow.
    pub fn hash(&self, vip_id: u32, src: IpAddr, sport: u16, dport: u16, proto: u8) -> u32 {
        let src_only = self.vip_flags[&vip_id] & lb_common::VIP_F_HASH_SRC_ONLY != 0;
        flow_hash(
            &addr_words(src),
            sport.to_be(),
            dport.to_be(),
            proto,
            src_only,
        )
    }

    /// Runs `program` on `packet` arriving on `ingress`.
    pub fn run_packet(&self, program: &'static str, packet: &[u8], ingress: u32) -> TestRunOutput {
        self.dp
            .test_run(program, packet, Some(ingress))
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Every counter by name: balancer (`name`), decapsulator (`decap_name`), per VIP
    /// (`vipN_field`) and per backend (`backendN_field`).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (name, value) in self.dp.maps.stats().expect("stats").fields() {
            out.insert(name.to_owned(), value);
        }
        for (name, value) in self.dp.maps.decap_stats().expect("decap stats").fields() {
            out.insert(format!("decap_{name}"), value);
        }
        for vip in 0..self.next_vip {
            let s = self.dp.maps.vip_stats(vip).expect("vip stats");
            out.insert(format!("vip{vip}_packets"), s.packets);
            out.insert(format!("vip{vip}_bytes"), s.bytes);
            out.insert(format!("vip{vip}_new_conns"), s.new_conns);
        }
        for backend in 1..64 {
            let s = self.dp.maps.backend_stats(backend).expect("backend stats");
            out.insert(format!("backend{backend}_packets"), s.packets);
            out.insert(format!("backend{backend}_bytes"), s.bytes);
        }
        out
    }
}

/// Non-zero differences between two counter snapshots.
pub fn counter_deltas(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d != 0).then(|| (k.clone(), d))
        })
        .collect()
}

pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn vip_key(addr: IpAddr, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr_be: addr_words(addr),
        port_be: port.to_be(),
        proto,
        family: family(addr),
    }
}

pub fn addr_key(addr: IpAddr) -> VipAddrKey {
    VipAddrKey {
        addr_be: addr_words(addr),
        family: family(addr),
        _pad: [0; 3],
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// lb0 (192.0.2.1/24, 2001:db8:1::1/64) reaches the backend networks 198.51.100.0/24 and
/// 2001:db8:b::/64 through a router at .254 / ::fe; lb1 (203.0.113.1/24, 2001:db8:3::1/64)
/// has a backend directly attached at .20 / ::20. 198.18.0.0/15 has no route.
fn setup_topology(ns: &NetNs) {
    for (a, b, m) in [("lb0", "lb0p", LB0_MAC), ("lb1", "lb1p", LB1_MAC)] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ns.ip(&["link", "set", a, "address", &mac(m)]);
        ns.ip(&["link", "set", a, "up"]);
        ns.ip(&["link", "set", b, "up"]);
    }
    ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "lb0"]);
    ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "lb0", "nodad"]);
    ns.ip(&["addr", "add", "203.0.113.1/24", "dev", "lb1"]);
    ns.ip(&["addr", "add", "2001:db8:3::1/64", "dev", "lb1", "nodad"]);
    let router = mac(ROUTER_MAC);
    let direct = mac(DIRECT_BACKEND_MAC);
    ns.ip(&[
        "neigh",
        "add",
        "192.0.2.254",
        "lladdr",
        &router,
        "dev",
        "lb0",
        "nud",
        "permanent",
    ]);
    ns.ip(&[
        "-6",
        "neigh",
        "add",
        "2001:db8:1::fe",
        "lladdr",
        &router,
        "dev",
        "lb0",
        "nud",
        "permanent",
    ]);
    ns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "192.0.2.254",
        "dev",
        "lb0",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:b::/64",
        "via",
        "2001:db8:1::fe",
        "dev",
        "lb0",
    ]);
    ns.ip(&[
        "neigh",
        "add",
        "203.0.113.20",
        "lladdr",
        &direct,
        "dev",
        "lb1",
        "nud",
        "permanent",
    ]);
    ns.ip(&[
        "-6",
        "neigh",
        "add",
        "2001:db8:3::20",
        "lladdr",
        &direct,
        "dev",
        "lb1",
        "nud",
        "permanent",
    ]);
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) targets the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
