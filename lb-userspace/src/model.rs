//! The desired state of the balancer: which VIPs exist and where their traffic goes.
//!
//! This model does not know where it came from — the config file today, Kubernetes
//! Services/EndpointSlices later. Sources translate into [`DesiredState`], call
//! [`DesiredState::validate`], and hand it to [`crate::plan`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_HASH_SRC_ONLY};
use serde::{Deserialize, Serialize};

/// Largest accepted backend weight. Bounds the arithmetic of the weighted Maglev schedule
/// and keeps configs human-scaled (weights are relative: 1 vs 3 means 25 % vs 75 %).
pub const MAX_WEIGHT: u32 = 65_535;

/// Transport protocol of a VIP.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number as the datapath stores it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How packets reach the backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// IP-in-IP (or IP-in-IPv6) encapsulation toward the backend, which decapsulates and
    /// answers the client directly. The only mode so far.
    #[default]
    Encap,
}

/// Whether a backend takes new connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Gets Maglev slots in proportion to its weight.
    #[default]
    Active,
    /// Gets no new connections; established ones keep flowing to it.
    Draining,
}

/// What identifies a VIP in the datapath: address, protocol and port (0 = any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// VIP address.
    pub address: IpAddr,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port; 0 matches any port.
    pub port: u16,
}

impl ServiceKey {
    /// The key as the kernel's VIP table stores it.
    pub fn to_map_key(&self) -> lb_common::VipKey {
        let (addr_be, family) = address_words(self.address);
        lb_common::VipKey {
            addr_be,
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            family,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port: &dyn fmt::Display = if self.port == 0 { &"*" } else { &self.port };
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{port}/{}", self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{port}/{}", self.protocol),
        }
    }
}

/// An address as the datapath stores it: wire bytes in four native-endian words (IPv4 in
/// word 0, the rest zero) and the family tag.
pub fn address_words(address: IpAddr) -> ([u32; 4], u8) {
    let mut words = [0u32; 4];
    match address {
        IpAddr::V4(a) => {
            words[0] = u32::from_ne_bytes(a.octets());
            (words, FAMILY_V4)
        }
        IpAddr::V6(a) => {
            let octets = a.octets();
            let (chunks, _) = octets.as_chunks::<4>();
            for (word, chunk) in words.iter_mut().zip(chunks) {
                *word = u32::from_ne_bytes(*chunk);
            }
            (words, FAMILY_V6)
        }
    }
}

/// One backend of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    /// Tunnel destination; also the backend's identity.
    pub address: IpAddr,
    /// Relative share of new connections (0..=[`MAX_WEIGHT`]); 0 behaves like draining.
    pub weight: u32,
    /// Active or draining.
    pub state: BackendState,
}

impl BackendSpec {
    /// The weight Maglev uses: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        match self.state {
            BackendState::Active => self.weight,
            BackendState::Draining => 0,
        }
    }
}

/// One VIP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VipSpec {
    /// Human name used in logs and warnings (e.g. `web` or `default/nginx:http`).
    pub name: String,
    /// Address, protocol, port.
    pub key: ServiceKey,
    /// Session affinity: hash on the client address only, so all of a client's
    /// connections land on one backend.
    pub source_affinity: bool,
    /// How packets reach the backends.
    pub forwarding: ForwardingMode,
    /// The backends; order is irrelevant.
    pub backends: Vec<BackendSpec>,
}

impl VipSpec {
    /// `VipInfo::flags` for this VIP.
    pub fn flags(&self) -> u32 {
        if self.source_affinity {
            VIP_F_HASH_SRC_ONLY
        } else {
            0
        }
    }

    /// `name (key)` for messages; just the key if the name is the key.
    pub fn label(&self) -> String {
        let key = self.key.to_string();
        if self.name.is_empty() || self.name == key {
            key
        } else {
            format!("{} ({key})", self.name)
        }
    }
}

/// Everything the balancer should be doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// The VIPs, in source order (used only to name them in errors). Shared: the
    /// Kubernetes source, the planner's baseline and the state file hold the same specs,
    /// so a change to one VIP of 10,000 copies one spec, not all of them (and equal `Arc`s
    /// compare by pointer first).
    pub vips: Vec<Arc<VipSpec>>,
}

/// A rule of the model that the desired state breaks. `path` locates the offending field
/// as `vips[i].backends[j].address`, so a config error points at the config line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ModelError {
    /// Where: `vips[1].backends[0].address`.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl ModelError {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ModelError {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Why an address cannot be a VIP or backend, if it cannot.
pub fn unusable_address_reason(address: IpAddr) -> Option<&'static str> {
    if address.is_unspecified() {
        Some("is the unspecified address")
    } else if address.is_loopback() {
        Some("is a loopback address")
    } else if address.is_multicast() {
        Some("is a multicast address")
    } else if address == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("is the broadcast address")
    } else {
        None
    }
}

impl DesiredState {
    /// Checks the cross-field rules; the first violation is returned.
    ///
    /// * VIP and backend addresses must be unicast, non-loopback, specified.
    /// * An IPv6 VIP cannot have an IPv4 backend (IPv6-in-IPv4 is not implemented); an IPv4
    ///   VIP may have IPv6 backends (IPv4-in-IPv6).
    /// * No two VIPs share (address, protocol, port); no two VIPs share a non-empty name.
    /// * A backend address appears at most once per VIP, and is never a VIP address
    ///   (packets would loop through the balancer).
    /// * Weights are at most [`MAX_WEIGHT`].
    pub fn validate(&self) -> Result<(), ModelError> {
        self.validate_reusing(|_| false)
    }

    /// [`validate`](Self::validate) that skips the backend checks of the VIPs for which
    /// `checked(i)` is true: the caller vouches that `vips[i]` passed them before against
    /// the same or fewer VIP addresses (the planner, for VIPs unchanged since its last
    /// apply). VIP addresses, keys and names are always checked; with 10,000 VIPs and
    /// 100,000 backends the backend checks are most of the cost of a plan that changes one.
    pub fn validate_reusing(&self, checked: impl Fn(usize) -> bool) -> Result<(), ModelError> {
        // Hashed, and one `seen` map reused: this runs on every plan over every VIP
        // (10,000 VIPs and 100,000 backends with Kubernetes).
        let vip_addresses: HashSet<IpAddr> = self.vips.iter().map(|v| v.key.address).collect();
        let mut keys: HashMap<ServiceKey, usize> = HashMap::with_capacity(self.vips.len());
        let mut names: HashMap<&str, usize> = HashMap::with_capacity(self.vips.len());
        let mut seen: HashMap<IpAddr, usize> = HashMap::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = |field: &str| format!("vips[{i}].{field}");
            if let Some(reason) = unusable_address_reason(vip.key.address) {
                return Err(ModelError::new(
                    at("address"),
                    format!("{} {reason}", vip.key.address),
                ));
            }
            if let Some(first) = keys.insert(vip.key, i) {
                return Err(ModelError::new(
                    format!("vips[{i}]"),
                    format!("duplicates vips[{first}]: both are {}", vip.key),
                ));
            }
            if !vip.name.is_empty()
                && let Some(first) = names.insert(vip.name.as_str(), i)
            {
                return Err(ModelError::new(
                    at("name"),
                    format!("\"{}\" is already the name of vips[{first}]", vip.name),
                ));
            }
            if checked(i) {
                continue;
            }
            seen.clear();
            for (j, backend) in vip.backends.iter().enumerate() {
                let at = |field: &str| format!("vips[{i}].backends[{j}].{field}");
                let address = backend.address;
                if let Some(reason) = unusable_address_reason(address) {
                    return Err(ModelError::new(
                        at("address"),
                        format!("{address} {reason}"),
                    ));
                }
                if vip.key.address.is_ipv6() && address.is_ipv4() {
                    return Err(ModelError::new(
                        at("address"),
                        format!(
                            "IPv4 backend {address} behind IPv6 VIP {} is not supported \
                             (IPv6-in-IPv4 encapsulation is not implemented)",
                            vip.key.address
                        ),
                    ));
                }
                if vip_addresses.contains(&address) {
                    return Err(ModelError::new(
                        at("address"),
                        format!("{address} is a VIP address; packets would loop"),
                    ));
                }
                if let Some(first) = seen.insert(address, j) {
                    return Err(ModelError::new(
                        at("address"),
                        format!("{address} is already vips[{i}].backends[{first}]"),
                    ));
                }
                if backend.weight > MAX_WEIGHT {
                    return Err(ModelError::new(
                        at("weight"),
                        format!("{} is above the maximum {MAX_WEIGHT}", backend.weight),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Distinct backend addresses over all VIPs (each needs one backend id).
    pub fn backend_addresses(&self) -> BTreeSet<IpAddr> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vec![…]` of shared specs.
    macro_rules! specs {
        ($($spec:expr),* $(,)?) => {
            vec![$(Arc::new($spec)),*]
        };
    }
    use std::net::Ipv6Addr;

    fn backend(address: &str) -> BackendSpec {
        BackendSpec {
            address: address.parse().unwrap(),
            weight: 1,
            state: BackendState::Active,
        }
    }

    fn vip(address: &str, port: u16, backends: &[&str]) -> VipSpec {
        VipSpec {
            name: String::new(),
            key: ServiceKey {
                address: address.parse().unwrap(),
                protocol: Protocol::Tcp,
                port,
            },
            source_affinity: false,
            forwarding: ForwardingMode::Encap,
            backends: backends.iter().map(|b| backend(b)).collect(),
        }
    }

    fn error(state: &DesiredState) -> String {
        state.validate().unwrap_err().to_string()
    }

    #[test]
    fn a_sane_state_validates() {
        let state = DesiredState {
            vips: specs![
                vip("192.0.2.10", 80, &["198.51.100.11", "2001:db8::11"]),
                vip("192.0.2.10", 0, &["198.51.100.11"]),
                vip("2001:db8::10", 443, &["2001:db8::12"]),
            ],
        };
        state.validate().unwrap();
        assert_eq!(state.backend_addresses().len(), 3);
    }

    #[test]
    fn ipv6_vip_with_ipv4_backend_is_rejected() {
        let state = DesiredState {
            vips: specs![vip("2001:db8::10", 80, &["2001:db8::1", "198.51.100.1"])],
        };
        assert!(
            error(&state).starts_with(
                "vips[0].backends[1].address: IPv4 backend 198.51.100.1 behind IPv6 VIP"
            ),
            "{}",
            error(&state)
        );
    }

    #[test]
    fn duplicates_are_rejected() {
        let state = DesiredState {
            vips: specs![
                vip("192.0.2.10", 80, &[]),
                vip("192.0.2.10", 443, &[]),
                vip("192.0.2.10", 80, &[]),
            ],
        };
        assert_eq!(
            error(&state),
            "vips[2]: duplicates vips[0]: both are 192.0.2.10:80/tcp"
        );
        let state = DesiredState {
            vips: specs![vip("192.0.2.10", 80, &["198.51.100.1", "198.51.100.1"])],
        };
        assert_eq!(
            error(&state),
            "vips[0].backends[1].address: 198.51.100.1 is already vips[0].backends[0]"
        );
        let mut a = vip("192.0.2.10", 80, &[]);
        let mut b = vip("192.0.2.11", 80, &[]);
        a.name = "web".into();
        b.name = "web".into();
        assert_eq!(
            error(&DesiredState { vips: specs![a, b] }),
            "vips[1].name: \"web\" is already the name of vips[0]"
        );
    }

    #[test]
    fn unusable_addresses_and_loops_are_rejected() {
        let state = DesiredState {
            vips: specs![vip("0.0.0.0", 80, &[])],
        };
        assert_eq!(
            error(&state),
            "vips[0].address: 0.0.0.0 is the unspecified address"
        );
        let state = DesiredState {
            vips: specs![vip("192.0.2.10", 80, &["127.0.0.1"])],
        };
        assert_eq!(
            error(&state),
            "vips[0].backends[0].address: 127.0.0.1 is a loopback address"
        );
        let state = DesiredState {
            vips: specs![
                vip("192.0.2.10", 80, &["192.0.2.11"]),
                vip("192.0.2.11", 80, &[]),
            ],
        };
        assert_eq!(
            error(&state),
            "vips[0].backends[0].address: 192.0.2.11 is a VIP address; packets would loop"
        );
    }

    #[test]
    fn weight_is_capped() {
        let mut v = vip("192.0.2.10", 80, &["198.51.100.1"]);
        v.backends[0].weight = MAX_WEIGHT + 1;
        assert_eq!(
            error(&DesiredState { vips: specs![v] }),
            "vips[0].backends[0].weight: 65536 is above the maximum 65535"
        );
    }

    #[test]
    fn map_key_uses_wire_words() {
        let key = ServiceKey {
            address: "192.0.2.10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        let map = key.to_map_key();
        assert_eq!(map.addr_be, [u32::from_ne_bytes([192, 0, 2, 10]), 0, 0, 0]);
        assert_eq!(map.port_be, 53u16.to_be());
        assert_eq!((map.proto, map.family), (PROTO_UDP, FAMILY_V4));
        let (words, family) =
            address_words(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)));
        assert_eq!(family, FAMILY_V6);
        assert_eq!(words[0], u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]));
        assert_eq!(words[3], u32::from_ne_bytes([0, 0, 0, 1]));
        assert_eq!(key.to_string(), "192.0.2.10:53/udp");
    }

    #[test]
    fn draining_has_no_effective_weight() {
        let mut b = backend("198.51.100.1");
        b.weight = 5;
        assert_eq!(b.effective_weight(), 5);
        b.state = BackendState::Draining;
        assert_eq!(b.effective_weight(), 0);
    }
}
