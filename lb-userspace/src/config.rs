//! The agent's config file: node settings plus the VIP list.
//!
//! TOML (`.toml`) or YAML (`.yaml`, `.yml`), chosen by extension; see `docs/config.md` for
//! the operator reference and `deploy/xlb.example.toml` for a commented example. Every
//! field has a default, so a file only lists what differs.
//!
//! Values that need parsing (addresses, durations, MACs) are kept as written and parsed by
//! [`Config::validate`] / [`Config::resolve`], so an error names the field path and the
//! offending value: `vips[1].backends[0].address: "10.0.0.999" is not an IP address`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::maglev;
use crate::model::{
    self, BackendSpec, BackendState, DesiredState, ForwardingMode, Protocol, ServiceKey, VipSpec,
};
use crate::plan::Limits;

/// The embedded default config: a one-machine demo (documentation address ranges only).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default_config.toml");

/// Smallest accepted `fallback_mtu` (IPv4's minimum reassembly size).
pub const MIN_FALLBACK_MTU: u32 = 576;
/// Smallest `fallback_mtu` when any backend is IPv6 (IPv6's minimum link MTU).
pub const MIN_FALLBACK_MTU_V6: u32 = 1280;
/// Largest accepted `fallback_mtu` (common jumbo-frame limit).
pub const MAX_FALLBACK_MTU: u32 = 9216;
/// Longest accepted UDP idle timeout; longer would keep dead flows pinned for days.
pub const MAX_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest VIP name (it becomes a metrics label).
pub const MAX_NAME_LEN: usize = 64;

/// Why a config could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The extension is not one we know.
    #[error("{0}: unknown config format (expected a .toml, .yaml or .yml file)")]
    UnknownFormat(PathBuf),
    /// TOML syntax or type error.
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// YAML syntax or type error.
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    /// A field breaks a rule; `path` is like `vips[1].backends[0].address`.
    #[error("{path}: {reason}")]
    Invalid {
        /// Where.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<model::ModelError> for ConfigError {
    fn from(e: model::ModelError) -> Self {
        ConfigError::Invalid {
            path: e.path,
            reason: e.reason,
        }
    }
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// File formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// TOML.
    Toml,
    /// YAML.
    Yaml,
}

impl Format {
    /// The format a path's extension names.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

/// The whole config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Settings of this balancer node.
    pub node: NodeConfig,
    /// The VIPs to serve.
    pub vips: Vec<VipConfig>,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver; fails if the driver has no XDP support.
    Native,
    /// In the generic (skb) path; works everywhere, much slower.
    Generic,
    /// Native if the driver supports it, else generic.
    #[default]
    Auto,
}

/// A duration written as whole seconds (`30`) or humantime-style text (`"30s"`, `"5m"`,
/// `"1h30m"`, `"500ms"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    /// Whole seconds.
    Seconds(u64),
    /// Text with units.
    Text(String),
}

impl DurationValue {
    /// The duration, or `None` if the text does not parse.
    pub fn parse(&self) -> Option<Duration> {
        match self {
            DurationValue::Seconds(s) => Some(Duration::from_secs(*s)),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

impl std::fmt::Display for DurationValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationValue::Seconds(s) => write!(f, "{s}"),
            DurationValue::Text(t) => write!(f, "\"{t}\""),
        }
    }
}

/// Parses `"90"`, `"30s"`, `"500ms"`, `"5m"`, `"1h30m"`, `"2d"` (units: ms, s, m, h, d).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Settings of this balancer node. See `docs/config.md` for each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Interfaces the balancer attaches to (at least one).
    pub interfaces: Vec<String>,
    /// `native`, `generic` or `auto` (default).
    pub xdp_mode: XdpMode,
    /// Outer source address of IPv4 tunnels; required when any backend is IPv4.
    pub tunnel_source_v4: Option<String>,
    /// Outer source address of IPv6 tunnels; required when any backend is IPv6.
    pub tunnel_source_v6: Option<String>,
    /// Maglev table size M per VIP; must be prime. Default 65537.
    pub maglev_table_size: u32,
    /// Capacity of the VIP table (VIP ids are `0..max_vips`). Default 64.
    pub max_vips: u32,
    /// Capacity of the backend table including the reserved id 0. Default 4096.
    pub max_backends: u32,
    /// Connection-table entries. Default 1048576.
    pub conntrack_entries: u32,
    /// UDP flows idle longer than this are re-balanced. Default `"30s"`.
    pub udp_idle_timeout: DurationValue,
    /// New connections each CPU may track per second; 0 (default) = no limit.
    pub new_conn_rate_limit: u32,
    /// Next-hop MAC used when the kernel's route lookup cannot resolve one.
    pub gateway_mac: Option<String>,
    /// MTU assumed toward backends when the route lookup cannot tell. Default 1500.
    pub fallback_mtu: u32,
    /// Where maps and programs are pinned (a bpffs directory). Default `/sys/fs/bpf/xlb`.
    pub pin_dir: PathBuf,
    /// Prometheus listen address. Default `127.0.0.1:9430`.
    pub metrics_listen: String,
    /// Allow `metrics_listen` on a non-loopback address. Default false.
    pub allow_public_metrics: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            tunnel_source_v4: None,
            tunnel_source_v6: None,
            maglev_table_size: lb_common::DEFAULT_MAGLEV_TABLE_SIZE,
            max_vips: lb_common::limits::MAX_VIPS,
            max_backends: lb_common::limits::MAX_BACKENDS,
            conntrack_entries: lb_common::limits::CONNTRACK_ENTRIES,
            udp_idle_timeout: DurationValue::Text("30s".into()),
            new_conn_rate_limit: 0,
            gateway_mac: None,
            fallback_mtu: 1500,
            pin_dir: PathBuf::from("/sys/fs/bpf/xlb"),
            metrics_listen: "127.0.0.1:9430".into(),
            allow_public_metrics: false,
        }
    }
}

/// One VIP as written in the file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VipConfig {
    /// Optional name for logs and metrics; defaults to `address:port/protocol`.
    pub name: Option<String>,
    /// VIP address (IPv4 or IPv6). Required.
    pub address: String,
    /// `tcp` (default) or `udp`.
    pub protocol: Protocol,
    /// Destination port, 0 = any port. Required.
    pub port: Option<u32>,
    /// Session affinity: hash on the client address only.
    pub source_affinity: bool,
    /// `encap` (IP-in-IP; the only mode so far).
    pub forwarding: ForwardingMode,
    /// The backends.
    pub backends: Vec<BackendConfig>,
}

/// One backend as written in the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend address (tunnel destination). Required.
    pub address: String,
    /// Relative weight, 0..=65535; default 1; 0 = no new connections.
    pub weight: u32,
    /// `active` (default) or `draining`.
    pub state: BackendState,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            address: String::new(),
            weight: 1,
            state: BackendState::Active,
        }
    }
}

/// Node settings, parsed and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Attach mode.
    pub xdp_mode: XdpMode,
    /// IPv4 tunnel source.
    pub tunnel_source_v4: Option<Ipv4Addr>,
    /// IPv6 tunnel source.
    pub tunnel_source_v6: Option<Ipv6Addr>,
    /// Map sizes and the Maglev table size.
    pub limits: Limits,
    /// Connection-table entries.
    pub conntrack_entries: u32,
    /// UDP idle timeout.
    pub udp_idle_timeout: Duration,
    /// New connections per CPU per second (0 = off).
    pub new_conn_rate_limit: u32,
    /// Gateway MAC, if configured.
    pub gateway_mac: Option<[u8; 6]>,
    /// Fallback MTU.
    pub fallback_mtu: u32,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// Metrics listen address.
    pub metrics_listen: SocketAddr,
}

impl NodeSettings {
    /// The `XLB_CONFIG` map entry for these settings.
    pub fn datapath_config(&self) -> lb_common::DatapathConfig {
        let tunnel_src_v6_be = self
            .tunnel_source_v6
            .map_or([0; 4], |a| model::address_words(IpAddr::V6(a)).0);
        lb_common::DatapathConfig {
            maglev_table_size: self.limits.table_size,
            new_conn_rate_limit: self.new_conn_rate_limit,
            udp_idle_timeout_ns: u64::try_from(self.udp_idle_timeout.as_nanos())
                .unwrap_or(u64::MAX),
            tunnel_src_v4_be: self
                .tunnel_source_v4
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            fallback_mtu: self.fallback_mtu,
            tunnel_src_v6_be,
            gateway_mac: self.gateway_mac.unwrap_or([0; 6]),
            _pad: [0; 2],
        }
    }
}

/// A config that passed validation, split into node settings and the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// Node settings.
    pub node: NodeSettings,
    /// VIPs and backends.
    pub desired: DesiredState,
}

impl Config {
    /// Reads a config file, TOML or YAML by extension. Does not validate.
    pub fn from_path(path: &Path) -> Result<Config, ConfigError> {
        let format =
            Format::from_path(path).ok_or_else(|| ConfigError::UnknownFormat(path.into()))?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, format)
    }

    /// Parses config text. Does not validate.
    pub fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
        Ok(match format {
            Format::Toml => toml::from_str(text)?,
            Format::Yaml => serde_norway::from_str(text)?,
        })
    }

    /// The embedded demo config ([`DEFAULT_CONFIG_TOML`]).
    pub fn embedded_default() -> Config {
        // The text is a constant checked by the tests below, not operator input.
        toml::from_str(DEFAULT_CONFIG_TOML).expect("embedded default_config.toml parses")
    }

    /// Checks every rule; the error names the first offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.resolve().map(|_| ())
    }

    /// The desired state described by the VIP list (validates the whole config).
    pub fn desired_state(&self) -> Result<DesiredState, ConfigError> {
        self.resolve().map(|r| r.desired)
    }

    /// Validates and converts: node settings plus [`DesiredState`].
    pub fn resolve(&self) -> Result<ResolvedConfig, ConfigError> {
        let node = self.node.resolve()?;
        let desired = self.resolve_vips()?;
        desired.validate()?;
        check_node_against_vips(&node, &desired)?;
        Ok(ResolvedConfig { node, desired })
    }

    fn resolve_vips(&self) -> Result<DesiredState, ConfigError> {
        let mut vips = Vec::with_capacity(self.vips.len());
        for (i, vip) in self.vips.iter().enumerate() {
            let at = |field: &str| format!("vips[{i}].{field}");
            let address = parse_ip(&at("address"), &vip.address)?;
            let port = match vip.port {
                None => return Err(invalid(at("port"), "is required (use 0 for any port)")),
                Some(p) => u16::try_from(p)
                    .map_err(|_| invalid(at("port"), format!("{p} is not a port (0..=65535)")))?,
            };
            let key = ServiceKey {
                address,
                protocol: vip.protocol,
                port,
            };
            let name = match &vip.name {
                Some(name) => {
                    check_name(&at("name"), name)?;
                    name.clone()
                }
                None => key.to_string(),
            };
            let mut backends = Vec::with_capacity(vip.backends.len());
            for (j, backend) in vip.backends.iter().enumerate() {
                let address = parse_ip(
                    &format!("vips[{i}].backends[{j}].address"),
                    &backend.address,
                )?;
                backends.push(BackendSpec {
                    address,
                    weight: backend.weight,
                    state: backend.state,
                });
            }
            vips.push(std::sync::Arc::new(VipSpec {
                name,
                key,
                source_affinity: vip.source_affinity,
                forwarding: vip.forwarding,
                backends,
            }));
        }
        Ok(DesiredState { vips })
    }
}

impl NodeConfig {
    /// Parses and checks the node settings on their own.
    pub fn resolve(&self) -> Result<NodeSettings, ConfigError> {
        if self.interfaces.is_empty() {
            return Err(invalid(
                "node.interfaces",
                "at least one interface is required",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            let path = format!("node.interfaces[{i}]");
            // IFNAMSIZ is 16 including the NUL; '/' and whitespace are rejected by the kernel,
            // ':' would be an alias label.
            let bad = name.is_empty()
                || name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace());
            if bad {
                return Err(invalid(
                    path,
                    format!(
                        "\"{name}\" is not a valid interface name (1-15 characters, no '/', ':' \
                         or whitespace)"
                    ),
                ));
            }
            if !seen.insert(name) {
                return Err(invalid(path, format!("\"{name}\" is listed twice")));
            }
        }
        let tunnel_source_v4 = match &self.tunnel_source_v4 {
            None => None,
            Some(text) => {
                let path = "node.tunnel_source_v4";
                let address: Ipv4Addr = text
                    .parse()
                    .map_err(|_| invalid(path, format!("\"{text}\" is not an IPv4 address")))?;
                if let Some(reason) = model::unusable_address_reason(IpAddr::V4(address)) {
                    return Err(invalid(path, format!("{address} {reason}")));
                }
                Some(address)
            }
        };
        let tunnel_source_v6 = match &self.tunnel_source_v6 {
            None => None,
            Some(text) => {
                let path = "node.tunnel_source_v6";
                let address: Ipv6Addr = text
                    .parse()
                    .map_err(|_| invalid(path, format!("\"{text}\" is not an IPv6 address")))?;
                if let Some(reason) = model::unusable_address_reason(IpAddr::V6(address)) {
                    return Err(invalid(path, format!("{address} {reason}")));
                }
                Some(address)
            }
        };
        let table_size = self.maglev_table_size;
        if let Err(e) = maglev::validate_table_size(table_size) {
            let hint = match e {
                maglev::MaglevError::NotPrime(_) => next_prime(table_size)
                    .map(|p| format!(" (the next prime is {p})"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            return Err(invalid("node.maglev_table_size", format!("{e}{hint}")));
        }
        if self.max_vips == 0 {
            return Err(invalid("node.max_vips", "must be at least 1"));
        }
        // Two rings per VIP in one array map indexed by a u32.
        let ring_entries = 2 * u64::from(self.max_vips) * u64::from(table_size);
        if ring_entries > u64::from(u32::MAX) {
            return Err(invalid(
                "node.max_vips",
                format!(
                    "{} VIPs × 2 rings × {table_size} slots = {ring_entries} Maglev entries, \
                     more than one map can index ({})",
                    self.max_vips,
                    u32::MAX
                ),
            ));
        }
        if self.max_backends < 2 {
            return Err(invalid(
                "node.max_backends",
                "must be at least 2 (backend id 0 is reserved)",
            ));
        }
        if self.conntrack_entries == 0 {
            return Err(invalid("node.conntrack_entries", "must be at least 1"));
        }
        let udp_idle_timeout = self.udp_idle_timeout.parse().ok_or_else(|| {
            invalid(
                "node.udp_idle_timeout",
                format!(
                    "{} is not a duration (examples: 30, \"30s\", \"5m\", \"1h30m\")",
                    self.udp_idle_timeout
                ),
            )
        })?;
        if udp_idle_timeout < Duration::from_secs(1) || udp_idle_timeout > MAX_UDP_IDLE_TIMEOUT {
            return Err(invalid(
                "node.udp_idle_timeout",
                format!("{} is out of range (1s..=24h)", self.udp_idle_timeout),
            ));
        }
        let gateway_mac = match &self.gateway_mac {
            None => None,
            Some(text) => Some(parse_mac(text)?),
        };
        if !(MIN_FALLBACK_MTU..=MAX_FALLBACK_MTU).contains(&self.fallback_mtu) {
            return Err(invalid(
                "node.fallback_mtu",
                format!(
                    "{} is out of range ({MIN_FALLBACK_MTU}..={MAX_FALLBACK_MTU})",
                    self.fallback_mtu
                ),
            ));
        }
        if !self.pin_dir.is_absolute() {
            return Err(invalid(
                "node.pin_dir",
                format!("\"{}\" is not an absolute path", self.pin_dir.display()),
            ));
        }
        let metrics_listen: SocketAddr = self.metrics_listen.parse().map_err(|_| {
            invalid(
                "node.metrics_listen",
                format!(
                    "\"{}\" is not an address:port (e.g. 127.0.0.1:9430 or [::1]:9430)",
                    self.metrics_listen
                ),
            )
        })?;
        if !metrics_listen.ip().is_loopback() && !self.allow_public_metrics {
            return Err(invalid(
                "node.metrics_listen",
                format!(
                    "{metrics_listen} is not a loopback address; metrics reveal VIP and backend \
                     addresses, so set node.allow_public_metrics = true to listen there"
                ),
            ));
        }
        Ok(NodeSettings {
            interfaces: self.interfaces.clone(),
            xdp_mode: self.xdp_mode,
            tunnel_source_v4,
            tunnel_source_v6,
            limits: Limits {
                table_size,
                max_vips: self.max_vips,
                max_backends: self.max_backends,
            },
            conntrack_entries: self.conntrack_entries,
            udp_idle_timeout,
            new_conn_rate_limit: self.new_conn_rate_limit,
            gateway_mac,
            fallback_mtu: self.fallback_mtu,
            pin_dir: self.pin_dir.clone(),
            metrics_listen,
        })
    }
}

/// Rules that tie node settings to the VIP list.
fn check_node_against_vips(node: &NodeSettings, desired: &DesiredState) -> Result<(), ConfigError> {
    if desired.vips.len() > node.limits.max_vips as usize {
        return Err(invalid(
            "vips",
            format!(
                "{} VIPs exceed node.max_vips = {}",
                desired.vips.len(),
                node.limits.max_vips
            ),
        ));
    }
    let distinct = desired.backend_addresses().len();
    let usable_ids = node.limits.max_backends as usize - 1;
    if distinct > usable_ids {
        return Err(invalid(
            "vips",
            format!(
                "{distinct} distinct backend addresses exceed node.max_backends = {} (id 0 is \
                 reserved, so at most {usable_ids})",
                node.limits.max_backends
            ),
        ));
    }
    for (i, vip) in desired.vips.iter().enumerate() {
        for (j, backend) in vip.backends.iter().enumerate() {
            let path = format!("vips[{i}].backends[{j}].address");
            match backend.address {
                IpAddr::V4(_) if node.tunnel_source_v4.is_none() => {
                    return Err(invalid(
                        path,
                        format!(
                            "IPv4 backend {} needs node.tunnel_source_v4 (the outer source of \
                             IPv4 tunnels)",
                            backend.address
                        ),
                    ));
                }
                IpAddr::V6(_) if node.tunnel_source_v6.is_none() => {
                    return Err(invalid(
                        path,
                        format!(
                            "IPv6 backend {} needs node.tunnel_source_v6 (the outer source of \
                             IPv6 tunnels)",
                            backend.address
                        ),
                    ));
                }
                IpAddr::V6(_) if node.fallback_mtu < MIN_FALLBACK_MTU_V6 => {
                    return Err(invalid(
                        "node.fallback_mtu",
                        format!(
                            "{} is below {MIN_FALLBACK_MTU_V6}, the IPv6 minimum, but \
                             vips[{i}].backends[{j}] is IPv6",
                            node.fallback_mtu
                        ),
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn parse_ip(path: &str, text: &str) -> Result<IpAddr, ConfigError> {
    if text.is_empty() {
        return Err(invalid(path, "is required"));
    }
    text.parse()
        .map_err(|_| invalid(path, format!("\"{text}\" is not an IP address")))
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_./:".contains(c);
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok_char) {
        return Err(invalid(
            path,
            format!(
                "\"{name}\" is not a valid name (1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ . / :)"
            ),
        ));
    }
    Ok(())
}

fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let path = "node.gateway_mac";
    let bad = || {
        invalid(
            path,
            format!("\"{text}\" is not a MAC address (six hex pairs like 02:00:5e:00:53:01)"),
        )
    };
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac == [0; 6] {
        return Err(invalid(
            path,
            "00:00:00:00:00:00 is not a usable MAC address",
        ));
    }
    if mac[0] & 1 == 1 {
        return Err(invalid(
            path,
            format!("{text} is a multicast MAC address; a gateway needs a unicast one"),
        ));
    }
    Ok(mac)
}

fn next_prime(from: u32) -> Option<u32> {
    (from..=maglev::MAX_TABLE_SIZE).find(|&n| maglev::is_prime(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative)
    }

    /// A small valid config in TOML; tests break one thing at a time.
    const BASE: &str = r#"
[node]
interfaces = ["eth0"]
tunnel_source_v4 = "192.0.2.1"

[[vips]]
address = "192.0.2.10"
port = 80

[[vips.backends]]
address = "198.51.100.11"

[[vips.backends]]
address = "198.51.100.12"
"#;

    fn base() -> Config {
        Config::parse(BASE, Format::Toml).unwrap()
    }

    fn error_of(config: &Config) -> String {
        config.validate().unwrap_err().to_string()
    }

    fn toml_error(text: &str) -> String {
        match Config::parse(text, Format::Toml) {
            Ok(c) => error_of(&c),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn base_is_valid_and_converts() {
        let resolved = base().resolve().unwrap();
        assert_eq!(resolved.desired.vips.len(), 1);
        let vip = &resolved.desired.vips[0];
        assert_eq!(vip.name, "192.0.2.10:80/tcp");
        assert_eq!(vip.key.protocol, Protocol::Tcp);
        assert_eq!(vip.backends.len(), 2);
        assert_eq!(vip.backends[0].weight, 1);
        let node = &resolved.node;
        assert_eq!(node.limits.table_size, 65_537);
        assert_eq!(node.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(node.metrics_listen, "127.0.0.1:9430".parse().unwrap());
        assert_eq!(node.pin_dir, PathBuf::from("/sys/fs/bpf/xlb"));
        let dp = node.datapath_config();
        assert_eq!(dp.maglev_table_size, 65_537);
        assert_eq!(dp.udp_idle_timeout_ns, 30_000_000_000);
        assert_eq!(dp.tunnel_src_v4_be, u32::from_ne_bytes([192, 0, 2, 1]));
    }

    #[test]
    fn embedded_default_is_the_documented_demo() {
        let resolved = Config::embedded_default().resolve().unwrap();
        let vips = &resolved.desired.vips;
        let keys: Vec<String> = vips.iter().map(|v| v.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "203.0.113.10:80/tcp",
                "203.0.113.10:53/udp",
                "[2001:db8:f::10]:80/tcp"
            ]
        );
        let backends: Vec<String> = vips[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(backends, ["198.51.100.6", "198.51.100.10", "198.51.100.14"]);
        assert_eq!(
            resolved.node.tunnel_source_v4,
            Some(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(resolved.node.interfaces, ["eth0"]);
    }

    #[test]
    fn shipped_examples_parse_and_validate() {
        let toml = Config::from_path(&repo_file("deploy/xlb.example.toml")).unwrap();
        let yaml = Config::from_path(&repo_file("deploy/xlb.example.yaml")).unwrap();
        let toml = toml.resolve().unwrap();
        let yaml = yaml.resolve().unwrap();
        assert_eq!(
            toml, yaml,
            "the TOML and YAML examples describe the same config"
        );
        assert!(toml.desired.vips.len() >= 2);
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("a/x.toml")), Some(Format::Toml));
        assert_eq!(Format::from_path(Path::new("x.yml")), Some(Format::Yaml));
        assert_eq!(Format::from_path(Path::new("x.yaml")), Some(Format::Yaml));
        assert_eq!(Format::from_path(Path::new("x.json")), None);
        assert_eq!(
            Config::from_path(Path::new("/etc/xlb.conf"))
                .unwrap_err()
                .to_string(),
            "/etc/xlb.conf: unknown config format (expected a .toml, .yaml or .yml file)"
        );
    }

    #[test]
    fn yaml_parses_like_toml() {
        let yaml = r#"
node:
  interfaces: [eth0]
  tunnel_source_v4: 192.0.2.1
  udp_idle_timeout: 45
vips:
  - address: 192.0.2.10
    port: 80
    backends:
      - address: 198.51.100.11
      - address: 198.51.100.12
"#;
        let mut expected = base();
        expected.node.udp_idle_timeout = DurationValue::Seconds(45);
        assert_eq!(Config::parse(yaml, Format::Yaml).unwrap(), expected);
    }

    #[test]
    fn durations() {
        let cases = [
            ("30", Some(30_000)),
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("5m", Some(300_000)),
            ("1h30m", Some(5_400_000)),
            ("1d", Some(86_400_000)),
            ("", None),
            ("s", None),
            ("30x", None),
            ("1.5s", None),
            ("-3s", None),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text).map(|d| d.as_millis() as u64),
                millis,
                "{text:?}"
            );
        }
    }

    // ---- invalid configs: each asserts the full message ----

    fn assert_invalid(edit: impl FnOnce(&mut Config), expected: &str) {
        let mut config = base();
        edit(&mut config);
        assert_eq!(error_of(&config), expected);
    }

    #[test]
    fn invalid_backend_address() {
        assert_invalid(
            |c| c.vips[0].backends[0].address = "10.0.0.999".into(),
            "vips[0].backends[0].address: \"10.0.0.999\" is not an IP address",
        );
    }

    #[test]
    fn invalid_backend_address_in_second_vip() {
        assert_invalid(
            |c| {
                let mut second = c.vips[0].clone();
                second.address = "192.0.2.20".into();
                second.backends[0].address = "10.0.0.999".into();
                c.vips.push(second);
            },
            "vips[1].backends[0].address: \"10.0.0.999\" is not an IP address",
        );
    }

    #[test]
    fn missing_vip_address() {
        assert_invalid(
            |c| c.vips[0].address.clear(),
            "vips[0].address: is required",
        );
    }

    #[test]
    fn missing_port() {
        assert_invalid(
            |c| c.vips[0].port = None,
            "vips[0].port: is required (use 0 for any port)",
        );
    }

    #[test]
    fn port_out_of_range() {
        assert_invalid(
            |c| c.vips[0].port = Some(70_000),
            "vips[0].port: 70000 is not a port (0..=65535)",
        );
    }

    #[test]
    fn no_interfaces() {
        assert_invalid(
            |c| c.node.interfaces.clear(),
            "node.interfaces: at least one interface is required",
        );
    }

    #[test]
    fn bad_interface_name() {
        assert_invalid(
            |c| c.node.interfaces.push("a-very-long-interface".into()),
            "node.interfaces[1]: \"a-very-long-interface\" is not a valid interface name \
             (1-15 characters, no '/', ':' or whitespace)",
        );
    }

    #[test]
    fn duplicate_interface() {
        assert_invalid(
            |c| c.node.interfaces.push("eth0".into()),
            "node.interfaces[1]: \"eth0\" is listed twice",
        );
    }

    #[test]
    fn table_size_not_prime() {
        assert_invalid(
            |c| c.node.maglev_table_size = 65_536,
            "node.maglev_table_size: Maglev table size 65536 is not a prime number (the next \
             prime is 65537)",
        );
    }

    #[test]
    fn table_size_too_large() {
        assert_invalid(
            |c| c.node.maglev_table_size = 20_000_003,
            "node.maglev_table_size: Maglev table size 20000003 is out of range (2..=16777216)",
        );
    }

    #[test]
    fn rings_do_not_fit_one_map() {
        assert_invalid(
            |c| {
                c.node.max_vips = 40_000;
                c.node.maglev_table_size = 65_537;
            },
            "node.max_vips: 40000 VIPs × 2 rings × 65537 slots = 5242960000 Maglev entries, \
             more than one map can index (4294967295)",
        );
    }

    #[test]
    fn zero_max_vips() {
        assert_invalid(|c| c.node.max_vips = 0, "node.max_vips: must be at least 1");
    }

    #[test]
    fn too_small_max_backends() {
        assert_invalid(
            |c| c.node.max_backends = 1,
            "node.max_backends: must be at least 2 (backend id 0 is reserved)",
        );
    }

    #[test]
    fn zero_conntrack_entries() {
        assert_invalid(
            |c| c.node.conntrack_entries = 0,
            "node.conntrack_entries: must be at least 1",
        );
    }

    #[test]
    fn bad_udp_idle_timeout() {
        assert_invalid(
            |c| c.node.udp_idle_timeout = DurationValue::Text("30x".into()),
            "node.udp_idle_timeout: \"30x\" is not a duration (examples: 30, \"30s\", \"5m\", \
             \"1h30m\")",
        );
        assert_invalid(
            |c| c.node.udp_idle_timeout = DurationValue::Seconds(0),
            "node.udp_idle_timeout: 0 is out of range (1s..=24h)",
        );
        assert_invalid(
            |c| c.node.udp_idle_timeout = DurationValue::Text("2d".into()),
            "node.udp_idle_timeout: \"2d\" is out of range (1s..=24h)",
        );
    }

    #[test]
    fn bad_tunnel_sources() {
        assert_invalid(
            |c| c.node.tunnel_source_v4 = Some("2001:db8::1".into()),
            "node.tunnel_source_v4: \"2001:db8::1\" is not an IPv4 address",
        );
        assert_invalid(
            |c| c.node.tunnel_source_v6 = Some("192.0.2.1".into()),
            "node.tunnel_source_v6: \"192.0.2.1\" is not an IPv6 address",
        );
        assert_invalid(
            |c| c.node.tunnel_source_v4 = Some("0.0.0.0".into()),
            "node.tunnel_source_v4: 0.0.0.0 is the unspecified address",
        );
    }

    #[test]
    fn ipv4_backend_without_ipv4_tunnel_source() {
        assert_invalid(
            |c| c.node.tunnel_source_v4 = None,
            "vips[0].backends[0].address: IPv4 backend 198.51.100.11 needs \
             node.tunnel_source_v4 (the outer source of IPv4 tunnels)",
        );
    }

    #[test]
    fn ipv6_backend_without_ipv6_tunnel_source() {
        assert_invalid(
            |c| c.vips[0].backends[1].address = "2001:db8::12".into(),
            "vips[0].backends[1].address: IPv6 backend 2001:db8::12 needs \
             node.tunnel_source_v6 (the outer source of IPv6 tunnels)",
        );
    }

    #[test]
    fn ipv6_backend_needs_ipv6_minimum_mtu() {
        assert_invalid(
            |c| {
                c.node.tunnel_source_v6 = Some("2001:db8::1".into());
                c.node.fallback_mtu = 1000;
                c.vips[0].backends[1].address = "2001:db8::12".into();
            },
            "node.fallback_mtu: 1000 is below 1280, the IPv6 minimum, but vips[0].backends[1] \
             is IPv6",
        );
    }

    #[test]
    fn ipv6_vip_with_ipv4_backend() {
        assert_invalid(
            |c| c.vips[0].address = "2001:db8::10".into(),
            "vips[0].backends[0].address: IPv4 backend 198.51.100.11 behind IPv6 VIP \
             2001:db8::10 is not supported (IPv6-in-IPv4 encapsulation is not implemented)",
        );
    }

    #[test]
    fn duplicate_vip_key() {
        assert_invalid(
            |c| {
                let copy = c.vips[0].clone();
                c.vips.push(copy);
            },
            "vips[1]: duplicates vips[0]: both are 192.0.2.10:80/tcp",
        );
    }

    #[test]
    fn duplicate_backend() {
        assert_invalid(
            |c| c.vips[0].backends[1].address = "198.51.100.11".into(),
            "vips[0].backends[1].address: 198.51.100.11 is already vips[0].backends[0]",
        );
    }

    #[test]
    fn backend_weight_too_high() {
        assert_invalid(
            |c| c.vips[0].backends[0].weight = 100_000,
            "vips[0].backends[0].weight: 100000 is above the maximum 65535",
        );
    }

    #[test]
    fn bad_gateway_mac() {
        assert_invalid(
            |c| c.node.gateway_mac = Some("02:00:5e:00:53".into()),
            "node.gateway_mac: \"02:00:5e:00:53\" is not a MAC address (six hex pairs like \
             02:00:5e:00:53:01)",
        );
        assert_invalid(
            |c| c.node.gateway_mac = Some("01:00:5e:00:00:01".into()),
            "node.gateway_mac: 01:00:5e:00:00:01 is a multicast MAC address; a gateway needs a \
             unicast one",
        );
        let mut ok = base();
        ok.node.gateway_mac = Some("02:00:5E:00:53:01".into());
        assert_eq!(
            ok.resolve().unwrap().node.gateway_mac,
            Some([2, 0, 0x5e, 0, 0x53, 1])
        );
    }

    #[test]
    fn fallback_mtu_out_of_range() {
        assert_invalid(
            |c| c.node.fallback_mtu = 100,
            "node.fallback_mtu: 100 is out of range (576..=9216)",
        );
    }

    #[test]
    fn relative_pin_dir() {
        assert_invalid(
            |c| c.node.pin_dir = "bpf/xlb".into(),
            "node.pin_dir: \"bpf/xlb\" is not an absolute path",
        );
    }

    #[test]
    fn public_metrics_need_opt_in() {
        assert_invalid(
            |c| c.node.metrics_listen = "0.0.0.0:9430".into(),
            "node.metrics_listen: 0.0.0.0:9430 is not a loopback address; metrics reveal VIP \
             and backend addresses, so set node.allow_public_metrics = true to listen there",
        );
        let mut ok = base();
        ok.node.metrics_listen = "0.0.0.0:9430".into();
        ok.node.allow_public_metrics = true;
        ok.validate().unwrap();
    }

    #[test]
    fn bad_metrics_address() {
        assert_invalid(
            |c| c.node.metrics_listen = "localhost".into(),
            "node.metrics_listen: \"localhost\" is not an address:port (e.g. 127.0.0.1:9430 or \
             [::1]:9430)",
        );
    }

    #[test]
    fn too_many_vips() {
        assert_invalid(
            |c| {
                c.node.max_vips = 1;
                let mut second = c.vips[0].clone();
                second.port = Some(443);
                c.vips.push(second);
            },
            "vips: 2 VIPs exceed node.max_vips = 1",
        );
    }

    #[test]
    fn too_many_backends() {
        assert_invalid(
            |c| c.node.max_backends = 2,
            "vips: 2 distinct backend addresses exceed node.max_backends = 2 (id 0 is \
             reserved, so at most 1)",
        );
    }

    #[test]
    fn bad_vip_name() {
        assert_invalid(
            |c| c.vips[0].name = Some("web server".into()),
            "vips[0].name: \"web server\" is not a valid name (1-64 characters of A-Z a-z 0-9 - \
             _ . / :)",
        );
    }

    #[test]
    fn loopback_vip() {
        assert_invalid(
            |c| c.vips[0].address = "127.0.0.1".into(),
            "vips[0].address: 127.0.0.1 is a loopback address",
        );
    }

    #[test]
    fn unknown_field_is_rejected() {
        let text = BASE.replace("port = 80", "port = 80\nprot = \"tcp\"");
        let message = toml_error(&text);
        assert!(
            message.starts_with("invalid TOML: ") && message.contains("unknown field `prot`"),
            "{message}"
        );
    }

    #[test]
    fn unknown_enum_values_are_rejected() {
        let message = toml_error(&BASE.replace("port = 80", "port = 80\nprotocol = \"sctp\""));
        assert!(
            message.contains("unknown variant `sctp`, expected `tcp` or `udp`"),
            "{message}"
        );
        let message = toml_error(&BASE.replace("port = 80", "port = 80\nforwarding = \"dsr\""));
        assert!(
            message.contains("unknown variant `dsr`, expected `encap`"),
            "{message}"
        );
        let message = toml_error(&BASE.replace(
            "interfaces = [\"eth0\"]",
            "interfaces = [\"eth0\"]\nxdp_mode = \"fast\"",
        ));
        assert!(
            message.contains("unknown variant `fast`, expected one of `native`, `generic`, `auto`"),
            "{message}"
        );
    }

    #[test]
    fn yaml_errors_are_reported_as_yaml() {
        let message = match Config::parse("node: [", Format::Yaml) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(message.starts_with("invalid YAML: "), "{message}");
    }
}
