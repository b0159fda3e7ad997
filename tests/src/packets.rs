//! Packet builders (etherparse) and independent expectations of what the datapath writes.
//! The expected encapsulations are built here from the RFC layouts, not from xlb's code.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder};

/// MAC of a client-side router that hands packets to the LB node.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];

/// TCP flags for [`tcp`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    pub const SYN: Self = Self {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    pub const ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    pub const SYN_ACK: Self = Self {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
    };
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Ethernet (client router → `lb_mac`) and IP (`src` → `dst`, TTL 63) layers of a packet.
fn client_ip_layer(
    lb_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, lb_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 63),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 63),
        _ => panic!("mixed address families"),
    }
}

/// An Ethernet frame carrying TCP from `src` to `dst`, addressed to `lb_mac`.
pub fn tcp(
    lb_mac: [u8; 6],
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: TcpFlags,
    payload_len: usize,
) -> Vec<u8> {
    let ip = client_ip_layer(lb_mac, src, dst);
    let mut b = ip.tcp(sport, dport, 1000, 64240);
    if flags.syn {
        b = b.syn();
    }
    if flags.ack {
        b = b.ack(1);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, &payload(payload_len)).expect("build tcp");
    out
}

/// An Ethernet frame carrying UDP from `src` to `dst`.
pub fn udp(
    lb_mac: [u8; 6],
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload_len: usize,
) -> Vec<u8> {
    let ip = client_ip_layer(lb_mac, src, dst);
    let mut out = Vec::new();
    ip.udp(sport, dport)
        .write(&mut out, &payload(payload_len))
        .expect("build udp");
    out
}

/// An ICMPv4 echo request.
pub fn icmp4_echo(lb_mac: [u8; 6], src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("ICMPv4 needs IPv4 addresses")
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, lb_mac)
        .ipv4(src.octets(), dst.octets(), 63)
        .icmpv4_echo_request(7, 1)
        .write(&mut out, &payload(16))
        .expect("build icmp");
    out
}

/// An ICMP error from `router` to `vip` quoting the start of `quoted_frame` (an Ethernet
/// frame the VIP sent): "fragmentation needed" (IPv4) or "packet too big" (IPv6), with `mtu`.
pub fn icmp_too_big_to_vip(
    lb_mac: [u8; 6],
    router: IpAddr,
    vip: IpAddr,
    quoted_frame: &[u8],
    mtu: u16,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, lb_mac);
    let mut out = Vec::new();
    match (router, vip) {
        (IpAddr::V4(r), IpAddr::V4(v)) => {
            let quote = &quoted_frame[14..14 + 28];
            eth.ipv4(r.octets(), v.octets(), 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: mtu,
                    },
                ))
                .write(&mut out, quote)
                .expect("build icmp");
        }
        (IpAddr::V6(r), IpAddr::V6(v)) => {
            let quote = &quoted_frame[14..];
            eth.ipv6(r.octets(), v.octets(), 64)
                .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: mtu as u32 })
                .write(&mut out, quote)
                .expect("build icmpv6");
        }
        _ => panic!("mixed address families"),
    }
    out
}

/// Inserts an 802.1Q tag with `vid` after the MAC addresses.
pub fn with_vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Recomputes the IPv4 header checksum of the header at `l3` in place.
pub fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = ((frame[l3] & 0x0f) as usize) * 4;
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let sum = internet_checksum(&frame[l3..l3 + ihl]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

/// RFC 1071 checksum of `data` (the value to store, big-endian).
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Adds IPv4 options (NOPs + end) to a plain IPv4 frame, keeping it valid.
pub fn with_ipv4_options(frame: &[u8], option_words: usize) -> Vec<u8> {
    let l3 = 14;
    let mut out = frame[..l3 + 20].to_vec();
    out.extend(std::iter::repeat_n(1u8, option_words * 4 - 1)); // NOP…
    out.push(0); // …End of options list
    out.extend_from_slice(&frame[l3 + 20..]);
    out[l3] = 0x40 | (5 + option_words as u8);
    let tot = u16::from_be_bytes([out[l3 + 2], out[l3 + 3]]) + (option_words * 4) as u16;
    out[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut out, l3);
    out
}

/// The frame xlb should emit for `inner_frame` (an Ethernet frame, `l2_len` bytes of L2)
/// encapsulated toward `outer_dst`, per RFC 2003 (IPv4) / RFC 2473 (IPv6).
#[allow(clippy::too_many_arguments)]
pub fn expected_encap(
    inner_frame: &[u8],
    l2_len: usize,
    smac: [u8; 6],
    dmac: [u8; 6],
    outer_src: IpAddr,
    outer_dst: IpAddr,
    flow_hash: u32,
) -> Vec<u8> {
    let inner = &inner_frame[l2_len..];
    let inner_is_v4 = inner[0] >> 4 == 4;
    let inner_tos = if inner_is_v4 {
        inner[1]
    } else {
        ((u16::from_be_bytes([inner[0], inner[1]]) >> 4) & 0xff) as u8
    };
    let inner_len = if inner_is_v4 {
        u16::from_be_bytes([inner[2], inner[3]]) as usize
    } else {
        40 + u16::from_be_bytes([inner[4], inner[5]]) as usize
    };
    let inner_df = !inner_is_v4 || inner[6] & 0x40 != 0;
    let proto = if inner_is_v4 {
        IpNumber::IPV4
    } else {
        IpNumber::IPV6
    };

    let mut out = Vec::new();
    out.extend_from_slice(&dmac);
    out.extend_from_slice(&smac);
    let outer_ethertype: [u8; 2] = match outer_dst {
        IpAddr::V4(_) => [0x08, 0x00],
        IpAddr::V6(_) => [0x86, 0xdd],
    };
    if l2_len == 18 {
        out.extend_from_slice(&inner_frame[12..16]);
    }
    out.extend_from_slice(&outer_ethertype);
    match (outer_src, outer_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(
                inner_len as u16, // etherparse takes the payload length
                64,
                proto,
                s.octets(),
                d.octets(),
            )
            .expect("ipv4 header");
            h.dont_fragment = inner_df;
            h.identification = 0;
            h.dscp = etherparse::IpDscp::try_new(inner_tos >> 2).unwrap();
            h.ecn = etherparse::IpEcn::try_new(inner_tos & 3).unwrap();
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out).expect("write ipv4");
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                traffic_class: inner_tos,
                flow_label: Ipv6FlowLabel::try_new(flow_hash & 0x000f_ffff).unwrap(),
                payload_length: inner_len as u16,
                next_header: proto,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            h.write(&mut out).expect("write ipv6");
        }
        _ => panic!("mixed outer families"),
    }
    out.extend_from_slice(inner);
    out
}

/// Words of an address as the datapath stores them (wire bytes, IPv4 in word 0).
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

/// Convenience constructors for the documentation ranges.
pub fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().expect("ipv4 literal"))
}
pub fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("ipv6 literal"))
}
