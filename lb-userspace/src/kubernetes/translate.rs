//! Services of type LoadBalancer + their EndpointSlices → [`DesiredState`]. Pure: no I/O,
//! so every rule is tested on the host and every agent computes the same result from the
//! same objects (which is what lets non-leaders program their node before status is written).
//!
//! * **Which Services.** `spec.type: LoadBalancer` and the class is ours:
//!   `spec.loadBalancerClass`, or — because `loadBalancerClass` is Kubernetes 1.21+ and older
//!   API servers drop it silently — the annotation [`CLASS_ANNOTATION`]. A Service with
//!   neither is ignored unless [`TranslateOptions::claim_classless`] is set.
//! * **VIP addresses.** Requested ones first (`spec.loadBalancerIP`, or the annotation
//!   [`IPS_ANNOTATION`], comma-separated, for dual stack), else `status.loadBalancer.ingress`
//!   (what the leader wrote earlier: this is how allocations survive restarts), else
//!   allocated from [`TranslateOptions::pools`], one per `spec.ipFamilies` entry.
//! * **Backends.** EndpointSlices labelled `kubernetes.io/service-name`, same namespace and
//!   address family as the VIP, matched to the Service port by name and protocol. Ready
//!   endpoints are active (weight 1); serving and terminating ones are draining (weight 0,
//!   established flows stay); others are absent. The endpoint's port number is not used:
//!   in encap mode the backend receives the packet addressed to VIP:port.
//! * **Bad objects** are skipped with a [`Skipped`] naming the object and the reason; the
//!   rest translates normally.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use super::objects::{EndpointSlice, Service};

use crate::model::{
    BackendSpec, BackendState, DesiredState, ForwardingMode, Protocol, ServiceKey, VipSpec,
    unusable_address_reason,
};

/// The class xlb serves by default.
pub const DEFAULT_CLASS: &str = "xlb.dev/xlb";
/// Annotation naming the load-balancer class, read when `spec.loadBalancerClass` is unset
/// (API servers before 1.21 drop that field).
pub const CLASS_ANNOTATION: &str = "xlb.dev/load-balancer-class";
/// Annotation requesting VIP addresses, comma-separated (one per family for dual stack).
/// Preferred over the deprecated single-address `spec.loadBalancerIP`.
pub const IPS_ANNOTATION: &str = "xlb.dev/load-balancer-ips";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An address pool for VIP allocation: a CIDR (`192.0.2.0/24`) or an inclusive range
/// (`192.0.2.10-192.0.2.20`), one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    first: IpAddr,
    last: IpAddr,
}

/// Why a pool string is not a pool.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pool {text:?}: {reason}")]
pub struct PoolError {
    text: String,
    reason: &'static str,
}

impl std::str::FromStr for Pool {
    type Err = PoolError;

    fn from_str(text: &str) -> Result<Self, PoolError> {
        let err = |reason| PoolError {
            text: text.into(),
            reason,
        };
        let (first, last) = if let Some((a, b)) = text.split_once('-') {
            let a: IpAddr = a.trim().parse().map_err(|_| err("bad first address"))?;
            let b: IpAddr = b.trim().parse().map_err(|_| err("bad last address"))?;
            (a, b)
        } else if let Some((a, len)) = text.split_once('/') {
            let a: IpAddr = a.trim().parse().map_err(|_| err("bad address"))?;
            let len: u32 = len.trim().parse().map_err(|_| err("bad prefix length"))?;
            let bits = if a.is_ipv4() { 32 } else { 128 };
            if len > bits {
                return Err(err("prefix length too long"));
            }
            let host_mask = if len == 0 {
                u128::MAX >> (128 - bits)
            } else {
                (1u128 << (bits - len)) - 1
            };
            let network = to_u128(a) & !host_mask;
            let (mut lo, mut hi) = (network, network | host_mask);
            // IPv4 networks larger than /31 keep their network and broadcast addresses out.
            if a.is_ipv4() && len < 31 {
                lo += 1;
                hi -= 1;
            }
            (from_u128(lo, a.is_ipv6()), from_u128(hi, a.is_ipv6()))
        } else {
            let a: IpAddr = text
                .trim()
                .parse()
                .map_err(|_| err("not a CIDR or range"))?;
            (a, a)
        };
        if first.is_ipv4() != last.is_ipv4() {
            return Err(err("mixes address families"));
        }
        if to_u128(first) > to_u128(last) {
            return Err(err("first address after last"));
        }
        Ok(Pool { first, last })
    }
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(v.into())
    } else {
        IpAddr::V4((v as u32).into())
    }
}

/// What the translation is configured with.
#[derive(Clone, Debug)]
pub struct TranslateOptions {
    /// The load-balancer class xlb serves.
    pub class: String,
    /// Also serve LoadBalancer Services that name no class.
    pub claim_classless: bool,
    /// VIP pools, tried in order.
    pub pools: Vec<Pool>,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        TranslateOptions {
            class: DEFAULT_CLASS.into(),
            claim_classless: false,
            pools: Vec::new(),
        }
    }
}

/// An object left out of the desired state, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Why, for people.
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// The result: the desired state, what was skipped, and each served Service's VIPs (what
/// the leader writes to `status.loadBalancer.ingress`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Ready for the manager (it passes [`DesiredState::validate`]).
    pub desired: DesiredState,
    /// Bad objects, each with its reason.
    pub skipped: Vec<Skipped>,
    /// `(namespace, name)` → the Service's VIP addresses. Shared: EndpointSlice changes
    /// never change it, so a patched translation keeps the previous one's.
    pub addresses: std::sync::Arc<BTreeMap<(String, String), Vec<IpAddr>>>,
}

/// True if the Service is a LoadBalancer of our class (or class-less and claimed).
pub fn is_ours(service: &Service, opts: &TranslateOptions) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    let class = spec
        .load_balancer_class
        .as_deref()
        .or_else(|| service.annotation(CLASS_ANNOTATION));
    match class {
        Some(class) => class == opts.class,
        None => opts.claim_classless,
    }
}

/// A Service we serve, with its addresses decided.
struct Candidate<'a> {
    service: &'a Service,
    namespace: String,
    name: String,
    addresses: Vec<IpAddr>,
    /// Families still needing an allocated address.
    allocate: Vec<bool>,
}

fn ns_name(meta: &super::objects::Meta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Parses a list of address strings; the first unparseable or unusable one is the error.
fn parse_addresses<'s>(
    texts: impl Iterator<Item = &'s str>,
    what: &str,
) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for text in texts.map(str::trim).filter(|t| !t.is_empty()) {
        let address: IpAddr = text
            .parse()
            .map_err(|_| format!("{what} {text:?} is not an IP address"))?;
        if let Some(reason) = unusable_address_reason(address) {
            return Err(format!("{what} {address} {reason}"));
        }
        if !out.contains(&address) {
            out.push(address);
        }
    }
    Ok(out)
}

/// Decides a Service's addresses without allocation: requested, else status.
fn decide(service: &Service) -> Result<(Vec<IpAddr>, Vec<bool>), String> {
    let spec = service.spec.as_ref();
    let annotation = service.annotation(IPS_ANNOTATION);
    let requested = match (annotation, spec.and_then(|s| s.load_balancer_ip.as_deref())) {
        (Some(list), _) => {
            parse_addresses(list.split(','), &format!("annotation {IPS_ANNOTATION}"))?
        }
        (None, Some(ip)) => parse_addresses(std::iter::once(ip), "spec.loadBalancerIP")?,
        (None, None) => Vec::new(),
    };
    if !requested.is_empty() {
        return Ok((requested, Vec::new()));
    }
    let from_status = parse_addresses(service.ingress_ips(), "status.loadBalancer.ingress ip")?;
    // Families the Service asks for; single-stack IPv4 unless it says otherwise.
    let families: Vec<bool> = match spec.and_then(|s| s.ip_families.as_ref()) {
        Some(f) if !f.is_empty() => f.iter().map(|f| f == "IPv6").collect(),
        _ => vec![false],
    };
    let missing = families
        .into_iter()
        .filter(|v6| !from_status.iter().any(|a| a.is_ipv6() == *v6))
        .collect();
    Ok((from_status, missing))
}

/// `(namespace, service)` of the Service an EndpointSlice belongs to (its
/// `kubernetes.io/service-name` label), if any.
fn owning_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let service = slice.label(SERVICE_NAME_LABEL)?;
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some((ns, service))
}

/// Lowest address of the pools, of the family, not in `used`.
fn allocate(pools: &[Pool], v6: bool, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    for pool in pools.iter().filter(|p| p.first.is_ipv6() == v6) {
        let (lo, hi) = (to_u128(pool.first), to_u128(pool.last));
        // At most |used| + 1 candidates need looking at, whatever the pool's size.
        let span = (hi - lo).min(used.len() as u128);
        let free = (lo..=lo + span)
            .map(|candidate| from_u128(candidate, v6))
            .find(|address| !used.contains(address));
        if free.is_some() {
            return free;
        }
    }
    None
}

fn protocol(text: Option<&str>) -> Option<Protocol> {
    match text.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// Translates the cluster's objects into the desired state.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    opts: &TranslateOptions,
) -> Translation {
    translate_indexed(services, slices, opts).0
}

/// [`translate`], plus the [`Index`] that lets [`patch_slices`] redo only the Services
/// whose EndpointSlices changed.
pub fn translate_indexed<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    opts: &TranslateOptions,
) -> (Translation, Index) {
    let mut out = Translation::default();
    let mut index = Index::default();
    let skip =
        |out: &mut Translation, kind, (namespace, name): (String, String), reason: String| {
            out.skipped.push(Skipped {
                kind,
                namespace,
                name,
                reason,
            })
        };

    // Oldest first (then by name), so that every agent resolves conflicts and allocations
    // the same way and a new Service never displaces an older one.
    let mut ours: Vec<&Service> = services.into_iter().filter(|s| is_ours(s, opts)).collect();
    // Borrowed keys: this runs on every batch over every Service (no allocation per
    // comparison).
    ours.sort_by(|a, b| {
        let key = |s: &'a Service| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.metadata.namespace.as_deref().unwrap_or("default"),
                s.metadata.name.as_deref().unwrap_or_default(),
            )
        };
        key(a).cmp(&key(b))
    });

    let mut candidates = Vec::new();
    for service in ours {
        let id = ns_name(&service.metadata);
        match decide(service) {
            Ok((addresses, allocate)) => candidates.push(Candidate {
                service,
                namespace: id.0,
                name: id.1,
                addresses,
                allocate,
            }),
            Err(reason) => skip(&mut out, "Service", id, reason),
        }
    }
    // Addresses already held (requested or in status) are never handed out again.
    let mut used: BTreeSet<IpAddr> = candidates
        .iter()
        .flat_map(|c| c.addresses.iter().copied())
        .collect();
    let mut ready = Vec::new();
    for mut c in candidates {
        let mut failed = None;
        for v6 in std::mem::take(&mut c.allocate) {
            match allocate(&opts.pools, v6, &used) {
                Some(address) => {
                    used.insert(address);
                    c.addresses.push(address);
                }
                None => {
                    failed = Some(format!(
                        "no free IPv{} address in the configured pools",
                        if v6 { 6 } else { 4 }
                    ))
                }
            }
        }
        match failed {
            // Partly allocated dual-stack Services still serve the families they got.
            Some(reason) if c.addresses.is_empty() => {
                skip(&mut out, "Service", (c.namespace, c.name), reason)
            }
            _ => ready.push(c),
        }
    }

    // Slices by (namespace, service name).
    // Hashed and borrowed: this and the lookups below run on every batch over every object.
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some((ns, service)) = owning_service(slice) else {
            continue;
        };
        by_service.entry((ns, service)).or_default().push(slice);
    }
    let vip_addresses: HashSet<IpAddr> = ready
        .iter()
        .flat_map(|c| c.addresses.iter().copied())
        .collect();
    let mut bad_slices: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut taken: BTreeMap<ServiceKey, String> = BTreeMap::new();

    for c in ready {
        let spec = c.service.spec.as_ref();
        let ports: &[_] = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let affinity = spec.and_then(|s| s.session_affinity.as_deref()) == Some("ClientIP");
        let label = format!("{}/{}", c.namespace, c.name);
        let mut vips = Vec::new();
        let mut port_names = Vec::new();
        let mut problem = None;
        // This Service's slices only ever meet its own VIPs: their problems are its own.
        let mut bad = BTreeMap::new();
        'ports: for port in ports {
            let Some(proto) = protocol(port.protocol.as_deref()) else {
                problem = Some(format!(
                    "port {} protocol {} is not supported (TCP and UDP are)",
                    port.port,
                    port.protocol.as_deref().unwrap_or("")
                ));
                break;
            };
            let Ok(number) = u16::try_from(port.port) else {
                problem = Some(format!("port {} is out of range", port.port));
                break;
            };
            for &address in &c.addresses {
                let key = ServiceKey {
                    address,
                    protocol: proto,
                    port: number,
                };
                if let Some(owner) = taken.get(&key) {
                    problem = Some(format!("{key} is already served for Service {owner}"));
                    break 'ports;
                }
                let port_label = port
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{number}/{proto}"));
                let name = if c.addresses.len() > 1 {
                    format!("{label}:{port_label}@{address}")
                } else {
                    format!("{label}:{port_label}")
                };
                let backends = backends(
                    by_service.get(&(c.namespace.as_str(), c.name.as_str())),
                    port.name.as_deref().unwrap_or(""),
                    proto,
                    address.is_ipv6(),
                    &vip_addresses,
                    &mut bad,
                );
                port_names.push(port.name.clone().unwrap_or_default());
                vips.push(VipSpec {
                    name,
                    key,
                    source_affinity: affinity,
                    forwarding: ForwardingMode::Encap,
                    backends,
                });
            }
        }
        let id = (c.namespace, c.name);
        let served = match problem {
            Some(reason) => {
                skip(&mut out, "Service", id.clone(), reason);
                None
            }
            None => {
                for vip in &vips {
                    taken.insert(vip.key, label.clone());
                }
                let first = out.desired.vips.len();
                out.desired
                    .vips
                    .extend(vips.into_iter().map(std::sync::Arc::new));
                std::sync::Arc::make_mut(&mut out.addresses).insert(id.clone(), c.addresses);
                Some((first..out.desired.vips.len()).zip(port_names).collect())
            }
        };
        let slices: Vec<String> = by_service
            .get(&(id.0.as_str(), id.1.as_str()))
            .into_iter()
            .flatten()
            .map(|s| ns_name(&s.metadata).1)
            .collect();
        for slice in &slices {
            index
                .slice_owner
                .insert((id.0.clone(), slice.clone()), id.clone());
        }
        index.services.insert(
            id,
            IndexedService {
                vips: served,
                slices,
                bad: bad.keys().map(|(_, name)| name.clone()).collect(),
            },
        );
        bad_slices.append(&mut bad);
    }
    for (id, reason) in bad_slices {
        skip(&mut out, "EndpointSlice", id, reason);
    }
    index.vip_addresses = vip_addresses;
    index.patchable = true;
    // Safety net: whatever the rules above missed must not block every other Service.
    while let Err(e) = out.desired.validate() {
        index.patchable = false;
        let position = e
            .path
            .strip_prefix("vips[")
            .and_then(|r| r.split(']').next())
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < out.desired.vips.len());
        let Some(position) = position else {
            // Not attributable to one VIP: serve nothing rather than something invalid.
            out.desired.vips.clear();
            break;
        };
        let vip = out.desired.vips.remove(position);
        let (ns, rest) = vip.name.split_once('/').unwrap_or(("", &vip.name));
        let name = rest.split(':').next().unwrap_or(rest);
        skip(
            &mut out,
            "Service",
            (ns.into(), name.into()),
            format!("{}: {}", vip.label(), e.reason),
        );
    }
    (out, index)
}

/// True if a Service changing from `before` to `after` leaves `previous` (and its
/// `index`) exactly what translating everything again would return: only its status
/// changed, and to the addresses `previous` decided for it. That is the Lease holder's own
/// status write coming back as a watch event, once per Service after a first sync.
///
/// Why it is the same: the Service's addresses come from its status now instead of from the
/// pools, and they are the ones it was given. Allocation hands out the first free pool
/// address in a fixed order of Services, so an address that was free when a Service before
/// this one allocated came before this one's; holding this one's up front changes no
/// other allocation. Requested addresses, which win over status, are unchanged. The
/// property test `status_echo_translates_the_same` checks it on random clusters.
pub fn is_status_echo(
    previous: &Translation,
    index: &Index,
    before: &Service,
    after: &Service,
) -> bool {
    if !index.patchable || !before.same_but_status(after) {
        return false;
    }
    let id = ns_name(&after.metadata);
    let Some(decided) = previous.addresses.get(&id) else {
        return false;
    };
    let mut status = after.ingress_ips();
    decided
        .iter()
        .all(|address| status.next() == Some(address.to_string().as_str()))
        && status.next().is_none()
}

/// Where each Service's VIPs and slices are in a [`Translation`] (see [`patch_slices`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Index {
    /// Services that got as far as their backends, by (namespace, name).
    services: HashMap<(String, String), IndexedService>,
    /// (namespace, slice) → the Service it was read for.
    slice_owner: HashMap<(String, String), (String, String)>,
    /// Endpoints at these addresses are left out.
    vip_addresses: HashSet<IpAddr>,
    /// False if the safety net removed VIPs: positions and skips are not the rules' own.
    patchable: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct IndexedService {
    /// Served: its VIPs' positions in `desired.vips`, with the port names their backends
    /// are matched by. `None`: skipped after its backends were read (its slices' problems
    /// depend on where it stopped).
    vips: Option<Vec<(usize, String)>>,
    /// Its slices' names (same namespace).
    slices: Vec<String>,
    /// Its slices reported as skipped.
    bad: Vec<String>,
}

/// An EndpointSlice that was created, changed or deleted: namespace, name, and the
/// Service it names now (`None` if deleted or unlabelled).
pub type SliceChange = (String, String, Option<String>);

/// The result of [`patch_slices`].
#[derive(Debug)]
pub enum Patch {
    /// The translation is the previous one (no served Service affected, or the same
    /// backends and problems as before).
    Unchanged,
    /// The new translation (different from the previous one).
    Changed(Translation),
    /// Not patchable: translate everything.
    Full,
}

/// The translation after EndpointSlice changes only (no Service changed), computed from
/// the previous translation and its `index` by redoing only the affected Services'
/// backends: exactly what [`translate_indexed`] returns for the same objects. `slice`
/// looks an EndpointSlice up by namespace and name in the cache as it is now. The index
/// is updated; after [`Patch::Full`] it is stale.
///
/// The work is proportional to the affected Services' slices, not to the cluster: a
/// Service's slices now are the ones it had (the index) and the ones that changed (every
/// change is in `changes`), each kept if its label still names the Service.
pub fn patch_slices<S: std::ops::Deref<Target = EndpointSlice>>(
    previous: &Translation,
    index: &mut Index,
    changes: impl IntoIterator<Item = SliceChange>,
    slice: impl Fn(&str, &str) -> Option<S>,
) -> Patch {
    if !index.patchable {
        return Patch::Full;
    }
    let mut affected: HashSet<(String, String)> = HashSet::new();
    let mut candidates: BTreeSet<(String, String)> = BTreeSet::new();
    for (namespace, name, service) in changes {
        let id = (namespace, name);
        if let Some(owner) = index.slice_owner.get(&id) {
            affected.insert(owner.clone());
        }
        if let Some(service) = service {
            affected.insert((id.0.clone(), service));
        }
        candidates.insert(id);
    }
    // Slices of Services that are not served, or never got to their backends, count
    // for nothing.
    affected.retain(|id| index.services.contains_key(id));
    if affected.is_empty() {
        return Patch::Unchanged;
    }
    if affected
        .iter()
        .any(|id| index.services.get(id).is_some_and(|s| s.vips.is_none()))
    {
        return Patch::Full;
    }
    for id in &affected {
        if let Some(service) = index.services.get(id) {
            candidates.extend(service.slices.iter().map(|s| (id.0.clone(), s.clone())));
        }
    }
    let held: Vec<S> = candidates
        .iter()
        .filter_map(|(namespace, name)| slice(namespace, name))
        .collect();
    let wanted: HashSet<(&str, &str)> = affected
        .iter()
        .map(|(ns, name)| (ns.as_str(), name.as_str()))
        .collect();
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in &held {
        let Some((ns, service)) = owning_service(slice) else {
            continue;
        };
        if let Some(&id) = wanted.get(&(ns, service)) {
            by_service.entry(id).or_default().push(slice);
        }
    }
    let mut bad_slices: BTreeMap<(String, String), String> = previous
        .skipped
        .iter()
        .filter(|s| s.kind == "EndpointSlice")
        .map(|s| ((s.namespace.clone(), s.name.clone()), s.reason.clone()))
        .collect();
    let bad_before = bad_slices.clone();
    // Forget every affected Service's slices first: a slice moving between two of them
    // must end up owned by its new Service whatever the order.
    for id in &affected {
        let Some(service) = index.services.get_mut(id) else {
            continue;
        };
        for slice in service.bad.drain(..) {
            bad_slices.remove(&(id.0.clone(), slice));
        }
        for slice in service.slices.drain(..) {
            index.slice_owner.remove(&(id.0.clone(), slice));
        }
    }
    let mut updates: Vec<(usize, Vec<BackendSpec>)> = Vec::new();
    for id in &affected {
        let Some(service) = index.services.get_mut(id) else {
            continue;
        };
        let slices = by_service.get(&(id.0.as_str(), id.1.as_str()));
        let mut bad = BTreeMap::new();
        for (position, port_name) in service.vips.iter().flatten() {
            let Some(vip) = previous.desired.vips.get(*position) else {
                return Patch::Full;
            };
            let backends = backends(
                slices,
                port_name,
                vip.key.protocol,
                vip.key.address.is_ipv6(),
                &index.vip_addresses,
                &mut bad,
            );
            if backends != vip.backends {
                updates.push((*position, backends));
            }
        }
        service.slices = slices
            .into_iter()
            .flatten()
            .map(|s| ns_name(&s.metadata).1)
            .collect();
        for slice in &service.slices {
            index
                .slice_owner
                .insert((id.0.clone(), slice.clone()), id.clone());
        }
        service.bad = bad.keys().map(|(_, name)| name.clone()).collect();
        bad_slices.append(&mut bad);
    }
    if updates.is_empty() && bad_slices == bad_before {
        return Patch::Unchanged;
    }
    let mut out = previous.clone();
    for (position, backends) in updates {
        // Copies this VIP's spec only; the others stay shared with `previous`.
        std::sync::Arc::make_mut(&mut out.desired.vips[position]).backends = backends;
    }
    // Backends passed the same filters as in a full translation (family, usable, not a
    // VIP, one entry per address), so the state validates as the previous one did.
    out.skipped.retain(|s| s.kind != "EndpointSlice");
    for ((namespace, name), reason) in bad_slices {
        out.skipped.push(Skipped {
            kind: "EndpointSlice",
            namespace,
            name,
            reason,
        });
    }
    Patch::Changed(out)
}

/// The backends of one VIP from its Service's slices.
fn backends(
    slices: Option<&Vec<&EndpointSlice>>,
    port_name: &str,
    proto: Protocol,
    v6: bool,
    vip_addresses: &HashSet<IpAddr>,
    bad: &mut BTreeMap<(String, String), String>,
) -> Vec<BackendSpec> {
    let mut found: BTreeMap<IpAddr, BackendState> = BTreeMap::new();
    for slice in slices.into_iter().flatten() {
        let family = if v6 { "IPv6" } else { "IPv4" };
        if slice.address_type != family {
            continue;
        }
        let has_port = slice.ports.as_ref().is_some_and(|ports| {
            ports.iter().any(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && protocol(p.protocol.as_deref()) == Some(proto)
            })
        });
        if !has_port {
            continue;
        }
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            // The API says an unknown (nil) ready or serving must be read as true.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let state = if ready && !terminating {
                BackendState::Active
            } else if serving && terminating {
                BackendState::Draining
            } else {
                continue;
            };
            for text in &endpoint.addresses {
                let address = match text.parse::<IpAddr>() {
                    Ok(a) if a.is_ipv6() == v6 => a,
                    _ => {
                        bad.entry(ns_name(&slice.metadata)).or_insert_with(|| {
                            format!("endpoint address {text:?} is not an {family} address; endpoint left out")
                        });
                        continue;
                    }
                };
                if let Some(reason) = unusable_address_reason(address) {
                    bad.entry(ns_name(&slice.metadata)).or_insert_with(|| {
                        format!("endpoint address {address} {reason}; endpoint left out")
                    });
                    continue;
                }
                if vip_addresses.contains(&address) {
                    bad.entry(ns_name(&slice.metadata)).or_insert_with(|| {
                        format!("endpoint address {address} is a VIP; endpoint left out")
                    });
                    continue;
                }
                // The same endpoint in two slices (slices being rebalanced): active wins.
                let entry = found.entry(address).or_insert(state);
                if state == BackendState::Active {
                    *entry = BackendState::Active;
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(address, state)| BackendSpec {
            address,
            weight: match state {
                BackendState::Active => 1,
                BackendState::Draining => 0,
            },
            state,
        })
        .collect()
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
