//! Kernel and userspace agree bit for bit: on the backend picked for a flow (hash, slot,
//! ring layout) and on the layout of every shared map type (read back from the BTF of the
//! embedded object).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    Backend, BackendStats, ClockCache, DatapathConfig, DatapathStats, DecapStats, FAMILY_V4,
    FAMILY_V6, FlowKey, FlowKeyV4, FlowState, NextHop, PROTO_TCP, PROTO_UDP, RateGuard,
    VIP_F_HASH_SRC_ONLY, VipAddrKey, VipInfo, VipKey, VipStats, program_names,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xlb_tests::fixture::FixtureEnv;
use xlb_tests::packets::{TcpFlags, addr_words, tcp, udp, v4, v6};

const BACKENDS: u32 = 7;

fn backend_addr(id: u32, v6_family: bool) -> IpAddr {
    if v6_family {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xb,
            0,
            0,
            0,
            0,
            0x100 + id as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100 + id as u8))
    }
}

/// 10,000 random flows (TCP/UDP × IPv4/IPv6, 5-tuple and source-only hashing) through the
/// XDP program: the backend in each encapsulated output equals lb-common's prediction.
#[test]
fn kernel_picks_the_backend_lb_common_predicts_for_10000_flows() {
    FixtureEnv::run(FixtureEnv::small(), |env| {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        // v4 backends 1..=7, v6 backends 11..=17.
        for id in 1..=BACKENDS {
            env.add_backend(id, backend_addr(id, false));
            env.add_backend(10 + id, backend_addr(id, true));
        }
        // Random tables, not patterns: every slot position matters.
        let m = env.table_size as usize;
        let table4: Vec<u32> = (0..m).map(|_| rng.random_range(1..=BACKENDS)).collect();
        let table6: Vec<u32> = table4.iter().map(|id| id + 10).collect();
        let vips = [
            (v4("192.0.2.10"), PROTO_TCP, 0, &table4),
            (v4("192.0.2.10"), PROTO_UDP, 0, &table4),
            (v4("192.0.2.11"), PROTO_TCP, VIP_F_HASH_SRC_ONLY, &table4),
            (v6("2001:db8:1::10"), PROTO_TCP, 0, &table6),
            (v6("2001:db8:1::10"), PROTO_UDP, 0, &table6),
            (
                v6("2001:db8:1::11"),
                PROTO_UDP,
                VIP_F_HASH_SRC_ONLY,
                &table6,
            ),
        ];
        let ids: Vec<u32> = vips
            .iter()
            .map(|(addr, proto, flags, table)| env.add_vip(*addr, 0, *proto, *flags, table))
            .collect();

        let mut mismatches = Vec::new();
        let mut per_backend = BTreeMap::<u32, u32>::new();
        let mut tracked = Vec::new();
        let flows = 10_000;
        for n in 0..flows {
            let which = n % vips.len();
            let (vip, proto, _, _) = vips[which];
            let src = if vip.is_ipv4() {
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.random()))
            } else {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0xc,
                    rng.random(),
                    rng.random(),
                    rng.random(),
                    rng.random(),
                    rng.random(),
                ))
            };
            let sport: u16 = rng.random_range(1024..=65535);
            let dport: u16 = rng.random_range(1..=65535);
            let packet = if proto == PROTO_TCP {
                tcp(
                    xlb_tests::fixture::LB0_MAC,
                    src,
                    sport,
                    vip,
                    dport,
                    TcpFlags::SYN,
                    0,
                )
            } else {
                udp(xlb_tests::fixture::LB0_MAC, src, sport, vip, dport, 8)
            };
            let (want, _) = env.predict(ids[which], src, sport, dport, proto);
            let out = env.run_packet(program_names::BALANCER, &packet, env.lb0);
            let got = outer_backend(&out.packet).and_then(|addr| {
                (1..=BACKENDS).find_map(|id| {
                    if backend_addr(id, false) == addr {
                        Some(id)
                    } else if backend_addr(id, true) == addr {
                        Some(10 + id)
                    } else {
                        None
                    }
                })
            });
            *per_backend.entry(want).or_default() += 1;
            let key = FlowKey {
                src_be: addr_words(src),
                dst_be: addr_words(vip),
                sport_be: sport.to_be(),
                dport_be: dport.to_be(),
                proto,
                family: if vip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
                _pad: [0; 2],
            };
            tracked.push((key, ids[which], want));
            if got != Some(want) {
                mismatches.push(format!(
                    "{src}:{sport} -> {vip}:{dport}/{proto}: kernel {got:?}, lb-common {want}"
                ));
            }
        }
        println!(
            "kernel/userspace agreement: {} of {flows} flows agree; spread {per_backend:?}",
            flows - mismatches.len()
        );
        assert!(
            mismatches.is_empty(),
            "{} mismatches, first: {:?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(5)]
        );
        // Every backend was exercised, so a constant answer could not pass.
        assert_eq!(per_backend.len(), 2 * BACKENDS as usize);

        // The connection entries the kernel wrote (IPv4 flows under 16-byte keys built as
        // words, IPv6 flows under 40-byte keys) are found under the keys userspace builds,
        // holding the same VIP and backend. The newest flows only: the fixture's 16,384-entry
        // table holds half of that per CPU, and older entries were evicted.
        let recent = &tracked[tracked.len() - 4_000..];
        let wrong: Vec<String> = recent
            .iter()
            .filter_map(|(key, vip_id, want)| {
                let got = env.dp.maps.conntrack.get(key, 0).ok();
                (got.map(|s| (s.vip_id, s.backend_id)) != Some((*vip_id, *want)))
                    .then(|| format!("{key:?}: entry {got:?}, want vip {vip_id} backend {want}"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {} entries disagree, first: {:?}",
            wrong.len(),
            recent.len(),
            &wrong[..wrong.len().min(3)]
        );
        assert!(recent.iter().any(|(k, _, _)| k.family == FAMILY_V4));
        assert!(recent.iter().any(|(k, _, _)| k.family == FAMILY_V6));
    });
}

fn outer_backend(frame: &[u8]) -> Option<IpAddr> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => Some(IpAddr::V4(Ipv4Addr::new(
            frame[30], frame[31], frame[32], frame[33],
        ))),
        0x86dd => {
            let o: [u8; 16] = frame[14 + 24..14 + 40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// Reads `STRUCT` records from `bpftool btf dump file OBJ format raw`:
/// name → (size, [(member, bit offset)]).
/// A BTF struct: size in bytes and (member name, bit offset) in order.
type BtfStruct = (usize, Vec<(String, usize)>);

fn btf_structs(object: &[u8]) -> BTreeMap<String, BtfStruct> {
    let dir = std::env::temp_dir().join(format!("xlb-btf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb-ebpf.o");
    std::fs::write(&path, object).unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .args(["format", "raw"])
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut structs = BTreeMap::new();
    let mut current: Option<(String, BtfStruct)> = None;
    for line in text.lines() {
        if line.starts_with('[') {
            if let Some((name, record)) = current.take() {
                structs.insert(name, record);
            }
            if let Some(rest) = line.split("] STRUCT '").nth(1) {
                let name = rest.split('\'').next().unwrap().to_owned();
                let size = rest
                    .split("size=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                current = Some((name, (size, Vec::new())));
            }
        } else if let Some((_, (_, members))) = current.as_mut() {
            let name = line
                .trim()
                .split('\'')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let bits = line
                .split("bits_offset=")
                .nth(1)
                .and_then(|b| b.trim().parse().ok())
                .unwrap_or(0);
            members.push((name, bits));
        }
    }
    if let Some((name, record)) = current {
        structs.insert(name, record);
    }
    structs
}

macro_rules! layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        (
            stringify!($ty),
            std::mem::size_of::<$ty>(),
            vec![$((stringify!($field), std::mem::offset_of!($ty, $field) * 8)),*],
        )
    };
}

#[test]
fn map_type_layouts_in_the_object_match_userspace() {
    let btf = btf_structs(lb_userspace::datapath::EBPF_OBJECT);
    let expected = [
        layout!(VipKey {
            addr_be,
            port_be,
            proto,
            family
        }),
        layout!(VipInfo {
            vip_id,
            ring,
            flags,
            _pad
        }),
        layout!(VipAddrKey {
            addr_be,
            family,
            _pad
        }),
        layout!(Backend {
            addr_be,
            family,
            _pad
        }),
        layout!(FlowKey {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            family,
            _pad
        }),
        layout!(FlowKeyV4 {
            src_be,
            dst_be,
            sport_be,
            dport_be,
            proto,
            _pad
        }),
        layout!(FlowState {
            backend_id,
            vip_id,
            last_seen_ns
        }),
        layout!(ClockCache { jiffies, coarse_ns }),
        layout!(DatapathConfig {
            maglev_table_size,
            new_conn_rate_limit,
            udp_idle_timeout_ns,
            tunnel_src_v4_be,
            fallback_mtu,
            tunnel_src_v6_be,
            gateway_mac,
            _pad
        }),
        layout!(VipStats {
            packets,
            bytes,
            new_conns
        }),
        layout!(BackendStats { packets, bytes }),
        layout!(RateGuard {
            window_start_ns,
            inserts
        }),
        layout!(NextHop {
            backend_addr_be,
            ifindex,
            mtu,
            smac,
            dmac,
            _pad,
            expires_ns
        }),
        layout!(DecapStats {
            rx_packets,
            decapsulated,
            pass_not_tunnel,
            pass_not_local,
            drop_malformed
        }),
    ];
    for (name, size, fields) in expected {
        let (btf_size, btf_fields) = btf
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the object's BTF"));
        assert_eq!(
            *btf_size, size,
            "{name}: size in the kernel object vs userspace"
        );
        let fields: Vec<(String, usize)> =
            fields.into_iter().map(|(n, o)| (n.to_owned(), o)).collect();
        assert_eq!(
            btf_fields, &fields,
            "{name}: members and bit offsets in the kernel object vs userspace"
        );
    }
    // DatapathStats: every named counter at the same offset on both sides.
    let (size, members) = &btf["DatapathStats"];
    assert_eq!(*size, std::mem::size_of::<DatapathStats>());
    let names: Vec<&str> = DatapathStats::default()
        .fields()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let btf_names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(btf_names, names, "DatapathStats counters in field order");
    for (i, (_, bits)) in members.iter().enumerate() {
        assert_eq!(*bits, i * 64, "DatapathStats member {i} offset");
    }
}
