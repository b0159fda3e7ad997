//! Slim, read-only views of the Kubernetes objects `xlb agent --kubernetes` caches: Services
//! and EndpointSlices holding only what [`translate`](super::translate) and the status writer
//! read. The proxy's Kubernetes side keeps k8s-openapi's full types.
//!
//! **Why.** The agent's reflectors keep every Service and EndpointSlice of the cluster. With
//! 10,000 Services × 10 endpoints (`./x bench kubernetes`, heaptrack, at the heap peak) the
//! caches of k8s-openapi structs took 53.0 MB (EndpointSlices) and 19.5 MB (Services): a
//! k8s-openapi `Endpoint` costs ~390 bytes in the cache even with its optional fields unset
//! (targetRef, hints, hostname, zone, deprecatedTopology…), and the `.modify()` that
//! stripped fields only ran once the whole object had been built. These types skip what
//! xlb does not read while parsing (serde ignores unknown fields without allocating); the
//! same run takes 14.7 MB and 10.1 MB (~67 bytes per endpoint). See `docs/kubernetes.md`.
//!
//! **Metadata.** [`kube::Resource`] hands the watcher a k8s-openapi `ObjectMeta` by
//! reference, so the watched objects ([`ServiceObject`], [`EndpointSliceObject`]) carry one
//! (360 bytes even when nearly empty) with name, namespace, resourceVersion (the watcher
//! resumes from it) and creationTimestamp set. The cached [`Service`] and [`EndpointSlice`]
//! keep a [`Meta`] instead (name, namespace, creationTimestamp: 72 bytes) and implement the
//! reflector's [`Lookup`] themselves, without a resourceVersion: with 10,000 Services and
//! 10,000 EndpointSlices that is ~6 MB less (the cache keys carried the version too). The
//! two annotations and the one label xlb reads are kept beside it
//! ([`Service::annotation`], [`EndpointSlice::label`]): in the metadata's `BTreeMap`s, which
//! allocate a ~550-byte node for even one entry, they took 12.1 MB of the same run.
//!
//! **Read-only.** They are views: they cannot be serialised, and writing one back (PUT)
//! would drop every field they leave out. Status is written with a merge patch of
//! `status.loadBalancer` only.
//!
//! Otherwise field names and shapes (`Option`, `Vec`) are k8s-openapi's, so translation
//! reads them the same way, and the small leaf types (ports, conditions, load-balancer
//! status) are k8s-openapi's own.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use kube::runtime::reflector::Lookup;

use super::translate::{CLASS_ANNOTATION, IPS_ANNOTATION, SERVICE_NAME_LABEL};

/// What xlb keeps of a cached object's metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// `metadata.creationTimestamp` (VIP allocation goes oldest first).
    pub creation_timestamp: Option<Time>,
}

impl From<ObjectMeta> for Meta {
    fn from(meta: ObjectMeta) -> Self {
        Meta {
            name: meta.name,
            namespace: meta.namespace,
            creation_timestamp: meta.creation_timestamp,
        }
    }
}

/// The metadata map a kept entry is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Map {
    Annotations,
    Labels,
}

/// The annotations of a Service that xlb reads; every other annotation and label is skipped.
const SERVICE_KEPT: [(Map, &str); 2] = [
    (Map::Annotations, CLASS_ANNOTATION),
    (Map::Annotations, IPS_ANNOTATION),
];
/// The labels of an EndpointSlice that xlb reads.
const SLICE_KEPT: [(Map, &str); 1] = [(Map::Labels, SERVICE_NAME_LABEL)];

/// The values of the kept annotations and labels, in the order of their list.
type Kept<const N: usize> = [Option<Box<str>>; N];

/// A Service (`v1`): metadata, the spec fields translation reads, and the load-balancer
/// status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "ServiceObject")]
pub struct Service {
    /// Name, namespace and creationTimestamp (annotations: see [`Service::annotation`]).
    pub metadata: Meta,
    /// The values of the annotations in [`SERVICE_KEPT`].
    kept: Kept<2>,
    /// What translation reads of the spec.
    pub spec: Option<ServiceSpec>,
    /// The load-balancer status (what the status writer compares with).
    pub status: Option<ServiceStatus>,
}

impl Service {
    /// The value of annotation `key`, which must be [`CLASS_ANNOTATION`] or
    /// [`IPS_ANNOTATION`]: no other annotation is kept.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        kept_value(&SERVICE_KEPT, &self.kept, Map::Annotations, key)
    }

    /// The `ip`s of `status.loadBalancer.ingress`, in order (entries without one left out).
    pub fn ingress_ips(&self) -> impl Iterator<Item = &str> {
        self.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i.ip.as_deref())
    }

    /// True if `other` is this Service with at most its status changed: the same object
    /// for everything translation reads but the status.
    pub fn same_but_status(&self, other: &Service) -> bool {
        self.spec == other.spec && self.kept == other.kept && self.metadata == other.metadata
    }
}

/// The part of a Service's spec translation reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalName`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// The load-balancer class (Kubernetes 1.21+).
    pub load_balancer_class: Option<String>,
    /// The requested VIP address (deprecated single-address field).
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    /// `IPv4` and/or `IPv6`, in order.
    pub ip_families: Option<Vec<String>>,
    /// The ports.
    pub ports: Option<Vec<ServicePort>>,
    /// `None` or `ClientIP`.
    pub session_affinity: Option<String>,
}

/// The part of a Service's status xlb reads and writes.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// The load balancer's ingress points (the VIPs the leader wrote).
    pub load_balancer: Option<LoadBalancerStatus>,
}

/// An EndpointSlice (`discovery.k8s.io/v1`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "EndpointSliceObject")]
pub struct EndpointSlice {
    /// Name, namespace and creationTimestamp (labels: see [`EndpointSlice::label`]).
    pub metadata: Meta,
    /// The values of the labels in [`SLICE_KEPT`].
    kept: Kept<1>,
    /// `IPv4`, `IPv6` or `FQDN` (required by the API; empty if absent, which matches no
    /// VIP family).
    pub address_type: String,
    /// The endpoints.
    pub endpoints: Option<Vec<Endpoint>>,
    /// The ports, matched to the Service's by name and protocol.
    pub ports: Option<Vec<EndpointPort>>,
}

impl EndpointSlice {
    /// The value of label `key`, which must be [`SERVICE_NAME_LABEL`]: no other label is
    /// kept.
    pub fn label(&self, key: &str) -> Option<&str> {
        kept_value(&SLICE_KEPT, &self.kept, Map::Labels, key)
    }
}

/// One endpoint of a slice: its addresses and conditions (no targetRef, hostname, node,
/// zone or hints).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Endpoint {
    /// The endpoint's addresses (one in practice).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Ready, serving, terminating.
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
}

fn kept_value<'a, const N: usize>(
    keys: &[(Map, &str); N],
    values: &'a Kept<N>,
    map: Map,
    key: &str,
) -> Option<&'a str> {
    let position = keys.iter().position(|k| *k == (map, key));
    debug_assert!(position.is_some(), "{map:?} {key:?} is not kept");
    values[position?].as_deref()
}

/// The API coordinates of k8s-openapi type `$full`, as the functions `kind`, `group`,
/// `version`, `api_version` and `plural` of [`kube::Resource`] and [`Lookup`].
macro_rules! coordinates {
    ($full:ty) => {
        fn kind(_: &()) -> Cow<'_, str> {
            Cow::Borrowed(<$full as k8s_openapi::Resource>::KIND)
        }
        fn group(_: &()) -> Cow<'_, str> {
            Cow::Borrowed(<$full as k8s_openapi::Resource>::GROUP)
        }
        fn version(_: &()) -> Cow<'_, str> {
            Cow::Borrowed(<$full as k8s_openapi::Resource>::VERSION)
        }
        fn api_version(_: &()) -> Cow<'_, str> {
            Cow::Borrowed(<$full as k8s_openapi::Resource>::API_VERSION)
        }
        fn plural(_: &()) -> Cow<'_, str> {
            Cow::Borrowed(<$full as k8s_openapi::Resource>::URL_PATH_SEGMENT)
        }
    };
}

/// Implements [`kube::Resource`] for a watched slim type and the reflector's [`Lookup`] for
/// its cached form, with the API coordinates of the k8s-openapi type they view (so
/// `Api::all`, `watcher` and the cache address the same resource).
macro_rules! resource {
    ($watched:ty, $cached:ty, $full:ty) => {
        impl Lookup for $cached {
            type DynamicType = ();

            coordinates!($full);

            fn name(&self) -> Option<Cow<'_, str>> {
                self.metadata.name.as_deref().map(Cow::Borrowed)
            }
            fn namespace(&self) -> Option<Cow<'_, str>> {
                self.metadata.namespace.as_deref().map(Cow::Borrowed)
            }
            // Not kept: the watcher tracks versions itself, and a cache key ignores them.
            fn resource_version(&self) -> Option<Cow<'_, str>> {
                None
            }
            fn uid(&self) -> Option<Cow<'_, str>> {
                None
            }
        }

        impl kube::Resource for $watched {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            coordinates!($full);

            fn meta(&self) -> &ObjectMeta {
                &self.metadata.0
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata.0
            }
        }
    };
}

resource!(ServiceObject, Service, k8s_openapi::api::core::v1::Service);
resource!(
    EndpointSliceObject,
    EndpointSlice,
    k8s_openapi::api::discovery::v1::EndpointSlice
);

/// A Service as watched: the parts of [`Service`], with an `ObjectMeta` for the watcher
/// (name, namespace, resourceVersion, creationTimestamp). Cached as a [`Service`].
#[derive(Clone, Debug, Deserialize)]
pub struct ServiceObject {
    #[serde(default, deserialize_with = "service_meta")]
    metadata: (ObjectMeta, Kept<2>),
    #[serde(default)]
    spec: Option<ServiceSpec>,
    #[serde(default)]
    status: Option<ServiceStatus>,
}

impl From<ServiceObject> for Service {
    fn from(wire: ServiceObject) -> Self {
        let (metadata, kept) = wire.metadata;
        Service {
            metadata: metadata.into(),
            kept,
            spec: wire.spec,
            status: wire.status,
        }
    }
}

fn service_meta<'de, D: Deserializer<'de>>(d: D) -> Result<(ObjectMeta, Kept<2>), D::Error> {
    MetaSeed(&SERVICE_KEPT).deserialize(d)
}

/// An EndpointSlice as watched: the parts of [`EndpointSlice`], with an `ObjectMeta` for
/// the watcher. Cached as an [`EndpointSlice`].
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceObject {
    #[serde(default, deserialize_with = "slice_meta")]
    metadata: (ObjectMeta, Kept<1>),
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
}

impl From<EndpointSliceObject> for EndpointSlice {
    fn from(wire: EndpointSliceObject) -> Self {
        let (metadata, kept) = wire.metadata;
        EndpointSlice {
            metadata: metadata.into(),
            kept,
            address_type: wire.address_type,
            endpoints: wire.endpoints,
            ports: wire.ports,
        }
    }
}

fn slice_meta<'de, D: Deserializer<'de>>(d: D) -> Result<(ObjectMeta, Kept<1>), D::Error> {
    MetaSeed(&SLICE_KEPT).deserialize(d)
}

/// The fields of `metadata` read.
const META_FIELDS: [&str; 6] = [
    "name",
    "namespace",
    "resourceVersion",
    "creationTimestamp",
    "annotations",
    "labels",
];

/// Parses `metadata`: name, namespace, resourceVersion and creationTimestamp into an
/// `ObjectMeta`, the kept annotations and labels into their slots, everything else skipped
/// without allocating.
struct MetaSeed<const N: usize>(&'static [(Map, &'static str); N]);

impl<'de, const N: usize> DeserializeSeed<'de> for MetaSeed<N> {
    type Value = (ObjectMeta, Kept<N>);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for MetaSeed<N> {
    type Value = (ObjectMeta, Kept<N>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("object metadata")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok((ObjectMeta::default(), std::array::from_fn(|_| None)))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok((ObjectMeta::default(), std::array::from_fn(|_| None)))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut meta = ObjectMeta::default();
        let mut kept: Kept<N> = std::array::from_fn(|_| None);
        while let Some(field) = map.next_key_seed(KeySeed(&META_FIELDS))? {
            match field {
                Some("name") => meta.name = map.next_value()?,
                Some("namespace") => meta.namespace = map.next_value()?,
                Some("resourceVersion") => meta.resource_version = map.next_value()?,
                Some("creationTimestamp") => {
                    meta.creation_timestamp = map.next_value::<Option<Time>>()?
                }
                Some("annotations") => map.next_value_seed(PickSeed {
                    keys: self.0,
                    map: Map::Annotations,
                    kept: &mut kept,
                })?,
                Some("labels") => map.next_value_seed(PickSeed {
                    keys: self.0,
                    map: Map::Labels,
                    kept: &mut kept,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((meta, kept))
    }
}

/// Parses one string map of the metadata (`annotations` or `labels`) into the slots of the
/// kept keys it holds; null or absent leaves them empty.
struct PickSeed<'k, const N: usize> {
    keys: &'static [(Map, &'static str); N],
    map: Map,
    kept: &'k mut Kept<N>,
}

impl<'de, const N: usize> DeserializeSeed<'de> for PickSeed<'_, N> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for PickSeed<'_, N> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        while let Some(position) = entries.next_key_seed(PositionSeed {
            keys: self.keys,
            map: self.map,
        })? {
            match position {
                Some(i) => self.kept[i] = Some(entries.next_value::<String>()?.into_boxed_str()),
                None => {
                    entries.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}
/// Reads a map key without allocating it: which of `keys` it is, if any.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<&'static str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<&'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().copied().find(|k| *k == key))
    }
}

/// Reads an annotation or label key without allocating it: its slot among the kept keys, if
/// it is one.
struct PositionSeed<const N: usize> {
    keys: &'static [(Map, &'static str); N],
    map: Map,
}

impl<'de, const N: usize> DeserializeSeed<'de> for PositionSeed<N> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for PositionSeed<N> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.keys.iter().position(|k| *k == (self.map, key)))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use serde_json::{Value, json};

    use super::*;

    /// A Service as a 1.29 API server returns it: applied with `kubectl apply` (the
    /// last-applied annotation), managed fields of two managers, labels, finalizers, owner
    /// references, the full spec and a status with conditions.
    fn full_service() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "0f2b8a47-4c0e-4d6e-9d7e-3b1b2f7c9a10",
                "resourceVersion": "184467",
                "generation": 3,
                "creationTimestamp": "2025-11-02T09:15:27Z",
                "labels": {"app": "web", "app.kubernetes.io/part-of": "shop"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"annotations\":{\"xlb.dev/load-balancer-class\":\"xlb.dev/xlb\"},\"name\":\"web\",\"namespace\":\"shop\"},\"spec\":{\"ports\":[{\"name\":\"http\",\"port\":80,\"targetPort\":\"http\"}],\"selector\":{\"app\":\"web\"},\"type\":\"LoadBalancer\"}}\n",
                    CLASS_ANNOTATION: "xlb.dev/xlb",
                    IPS_ANNOTATION: "198.51.100.7,2001:db8::7",
                    "prometheus.io/scrape": "true"
                },
                "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                                     "uid": "8c3f4e12-0a5b-4c2d-9e8f-1a2b3c4d5e6f", "controller": true}],
                "managedFields": [
                    {"manager": "kubectl-client-side-apply", "operation": "Update",
                     "apiVersion": "v1", "time": "2025-11-02T09:15:27Z", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:metadata": {"f:annotations": {".": {},
                        "f:kubectl.kubernetes.io/last-applied-configuration": {},
                        "f:xlb.dev/load-balancer-class": {}}},
                        "f:spec": {"f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
                            ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                            "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}},
                    {"manager": "xlb/node-a", "operation": "Update", "apiVersion": "v1",
                     "time": "2025-11-02T09:15:28Z", "fieldsType": "FieldsV1", "subresource": "status",
                     "fieldsV1": {"f:status": {"f:loadBalancer": {"f:ingress": {}}}}}
                ]
            },
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": "xlb.dev/xlb",
                "loadBalancerIP": "198.51.100.7",
                "selector": {"app": "web"},
                "clusterIP": "10.96.12.34",
                "clusterIPs": ["10.96.12.34", "fd00:10:96::1234"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [
                    {"name": "http", "protocol": "TCP", "appProtocol": "http", "port": 80,
                     "targetPort": "http", "nodePort": 31380},
                    {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353, "nodePort": 31053}
                ],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32001,
                "internalTrafficPolicy": "Cluster",
                "allocateLoadBalancerNodePorts": true,
                "loadBalancerSourceRanges": ["0.0.0.0/0"],
                "externalIPs": ["203.0.113.9"],
                "trafficDistribution": "PreferClose"
            },
            "status": {
                "loadBalancer": {"ingress": [
                    {"ip": "198.51.100.7", "ipMode": "VIP",
                     "ports": [{"port": 80, "protocol": "TCP"}]},
                    {"ip": "2001:db8::7", "ipMode": "VIP"}
                ]},
                "conditions": [{"type": "LoadBalancerReady", "status": "True",
                                "lastTransitionTime": "2025-11-02T09:15:28Z",
                                "reason": "Ready", "message": "", "observedGeneration": 3}]
            }
        })
    }

    /// An EndpointSlice as the endpointslice controller writes it: generateName, owner
    /// reference, the controller's labels and annotation, managed fields, and endpoints with
    /// targetRef, nodeName, zone, hostname, hints and deprecatedTopology.
    fn full_slice() -> Value {
        let endpoint = |ip: &str, pod: &str, ready: bool| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                "hostname": pod,
                "nodeName": "node-a",
                "zone": "eu-west-1a",
                "hints": {"forZones": [{"name": "eu-west-1a"}], "forNodes": [{"name": "node-a"}]},
                "deprecatedTopology": {"kubernetes.io/hostname": "node-a",
                                       "topology.kubernetes.io/zone": "eu-west-1a"},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod,
                              "uid": "5d1c2b3a-4e5f-6a7b-8c9d-0e1f2a3b4c5d"}
            })
        };
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-7xk2q",
                "generateName": "web-",
                "namespace": "shop",
                "uid": "a3e4f5d6-7b8c-4d9e-0f1a-2b3c4d5e6f70",
                "resourceVersion": "184470",
                "generation": 12,
                "creationTimestamp": "2025-11-02T09:15:27Z",
                "labels": {
                    "app": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    SERVICE_NAME_LABEL: "web"
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-11-02T09:20:01Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                                     "uid": "0f2b8a47-4c0e-4d6e-9d7e-3b1b2f7c9a10",
                                     "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                    "apiVersion": "discovery.k8s.io/v1", "time": "2025-11-02T09:20:01Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:ports": {},
                        "f:metadata": {"f:labels": {".": {}, "f:app": {}}, "f:ownerReferences": {}}}}]
            },
            "addressType": "IPv4",
            "endpoints": [
                endpoint("10.244.1.17", "web-6d4cf56db6-abcde", true),
                endpoint("10.244.2.9", "web-6d4cf56db6-fghij", false),
                {"addresses": ["10.244.3.4"]}
            ],
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"},
                {"name": "dns", "protocol": "UDP", "port": 5353}
            ]
        })
    }

    /// Nothing of the metadata but name, namespace, resourceVersion and creationTimestamp
    /// is allocated.
    fn assert_only_read_fields(m: &ObjectMeta) {
        let bare = ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            resource_version: m.resource_version.clone(),
            creation_timestamp: m.creation_timestamp.clone(),
            ..ObjectMeta::default()
        };
        assert_eq!(*m, bare);
    }

    #[test]
    fn full_service_keeps_what_translation_reads() {
        let watched: ServiceObject = serde_json::from_value(full_service()).unwrap();
        let m = &watched.metadata.0;
        assert_eq!(m.name.as_deref(), Some("web"));
        assert_eq!(m.namespace.as_deref(), Some("shop"));
        assert_eq!(m.resource_version.as_deref(), Some("184467"));
        assert_eq!(
            m.creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .as_deref(),
            Some("2025-11-02T09:15:27Z")
        );
        assert_only_read_fields(m);
        let created = m.creation_timestamp.clone();
        // Cached without the resourceVersion.
        let svc = Service::from(watched);
        assert_eq!(
            svc.metadata,
            Meta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                creation_timestamp: created,
            }
        );
        assert_eq!(svc.annotation(CLASS_ANNOTATION), Some("xlb.dev/xlb"));
        assert_eq!(
            svc.annotation(IPS_ANNOTATION),
            Some("198.51.100.7,2001:db8::7")
        );

        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.load_balancer_class.as_deref(), Some("xlb.dev/xlb"));
        assert_eq!(spec.load_balancer_ip.as_deref(), Some("198.51.100.7"));
        assert_eq!(
            spec.ip_families.as_deref(),
            Some(&["IPv4".into(), "IPv6".into()][..])
        );
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let ports = spec.ports.as_deref().unwrap();
        let summary: Vec<_> = ports
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (Some("http"), 80, Some("TCP")),
                (Some("dns"), 53, Some("UDP"))
            ]
        );
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );

        let ingress: Vec<_> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .unwrap()
            .iter()
            .map(|i| i.ip.as_deref())
            .collect();
        assert_eq!(ingress, [Some("198.51.100.7"), Some("2001:db8::7")]);
    }

    #[test]
    fn full_slice_keeps_what_translation_reads() {
        let watched: EndpointSliceObject = serde_json::from_value(full_slice()).unwrap();
        let m = &watched.metadata.0;
        assert_eq!(m.name.as_deref(), Some("web-7xk2q"));
        assert_eq!(m.namespace.as_deref(), Some("shop"));
        assert_eq!(m.resource_version.as_deref(), Some("184470"));
        assert_only_read_fields(m);
        let slice = EndpointSlice::from(watched);
        assert_eq!(slice.metadata.name.as_deref(), Some("web-7xk2q"));
        assert_eq!(slice.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(slice.label(SERVICE_NAME_LABEL), Some("web"));

        assert_eq!(slice.address_type, "IPv4");
        let ports: Vec<_> = slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [(Some("http"), Some("TCP")), (Some("dns"), Some("UDP"))]
        );
        let endpoints: Vec<_> = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                (e.addresses.clone(), c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            endpoints,
            [
                (
                    vec!["10.244.1.17".to_string()],
                    Some(true),
                    Some(true),
                    Some(false)
                ),
                (
                    vec!["10.244.2.9".to_string()],
                    Some(false),
                    Some(true),
                    Some(true)
                ),
                (vec!["10.244.3.4".to_string()], None, None, None),
            ]
        );
    }

    /// The slim types parse what the full ones parse, to the same values (translation would
    /// read the same from either).
    #[test]
    fn agrees_with_k8s_openapi() {
        let full: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(full_service()).unwrap();
        let slim: Service = serde_json::from_value(full_service()).unwrap();
        let spec = full.spec.unwrap();
        let slim_spec = slim.spec.unwrap();
        assert_eq!(slim_spec.type_, spec.type_);
        assert_eq!(slim_spec.load_balancer_class, spec.load_balancer_class);
        assert_eq!(slim_spec.load_balancer_ip, spec.load_balancer_ip);
        assert_eq!(slim_spec.ip_families, spec.ip_families);
        assert_eq!(slim_spec.ports, spec.ports);
        assert_eq!(slim_spec.session_affinity, spec.session_affinity);
        assert_eq!(
            slim.status.unwrap().load_balancer,
            full.status.unwrap().load_balancer
        );
        assert_eq!(
            slim.metadata.creation_timestamp,
            full.metadata.creation_timestamp
        );

        let full: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(full_slice()).unwrap();
        let slim: EndpointSlice = serde_json::from_value(full_slice()).unwrap();
        assert_eq!(slim.address_type, full.address_type);
        assert_eq!(slim.ports, full.ports);
        let endpoints: Vec<_> = full
            .endpoints
            .unwrap()
            .into_iter()
            .map(|e| Endpoint {
                addresses: e.addresses,
                conditions: e.conditions,
            })
            .collect();
        assert_eq!(slim.endpoints, Some(endpoints));
    }

    /// Sparse objects (what tests and odd clients write): absent or null maps and fields.
    #[test]
    fn sparse_and_null_fields() {
        let watched: ServiceObject = serde_json::from_value(json!({
            "metadata": {"name": "a", "annotations": null, "labels": {"x": "y"}},
            "spec": null,
        }))
        .unwrap();
        assert_eq!(watched.metadata.0.labels, None);
        let svc = Service::from(watched);
        assert_eq!(svc.metadata.name.as_deref(), Some("a"));
        assert_eq!(svc.annotation(CLASS_ANNOTATION), None);
        assert_eq!(svc.spec, None);
        let watched: ServiceObject = serde_json::from_value(json!({
            "metadata": {"name": "b", "annotations": {"other": "1", IPS_ANNOTATION: "192.0.2.1"}},
        }))
        .unwrap();
        assert_eq!(watched.metadata.0.annotations, None);
        let svc = Service::from(watched);
        assert_eq!(svc.annotation(IPS_ANNOTATION), Some("192.0.2.1"));
        assert_eq!(svc.annotation(CLASS_ANNOTATION), None);
        // Labels are not annotations: a Service's label of the same key is not kept.
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"labels": {CLASS_ANNOTATION: "xlb.dev/xlb"}},
        }))
        .unwrap();
        assert_eq!(svc.annotation(CLASS_ANNOTATION), None);
        let svc: Service = serde_json::from_value(json!({"metadata": null})).unwrap();
        assert_eq!(svc, Service::default());

        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s", "labels": {"app": "web"},
                         "annotations": {SERVICE_NAME_LABEL: "web"}},
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {}}],
        }))
        .unwrap();
        assert_eq!(slice.label(SERVICE_NAME_LABEL), None);
        assert_eq!(slice.address_type, "");
        assert_eq!(slice.ports, None);
        assert_eq!(
            slice.endpoints,
            Some(vec![Endpoint {
                addresses: vec!["10.0.0.1".into()],
                conditions: Some(EndpointConditions::default()),
            }])
        );
        // A kept value of the wrong type is still an error, as with k8s-openapi; the
        // skipped ones are not read at all.
        let bad = serde_json::from_value::<Service>(json!({
            "metadata": {"name": "c", "annotations": {CLASS_ANNOTATION: 7}},
        }));
        assert!(bad.is_err());
        let bad = serde_json::from_value::<EndpointSlice>(json!({
            "metadata": {"name": 7},
        }));
        assert!(bad.is_err());
        let ignored: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "d", "labels": {"other": 7}, "generation": "x"},
        }))
        .unwrap();
        assert_eq!(ignored.metadata.name.as_deref(), Some("d"));
    }

    /// The JSON of a real list page and watch event goes through `serde_json::from_slice`
    /// (borrowed strings), with escapes in keys and values (owned strings): both parse.
    #[test]
    fn parses_from_bytes_with_escapes() {
        let text = br#"{"metadata": {"name": "web", "annotations": {
            "xlb.dev/load-balancer-cl\u0061ss": "xlb.dev/\u0078lb",
            "xlb.dev/load-balancer-ips": "198.51.100.1"}},
            "spec": {"type": "LoadBalancer"}}"#;
        let svc: Service = serde_json::from_slice(text).unwrap();
        assert_eq!(svc.annotation(CLASS_ANNOTATION), Some("xlb.dev/xlb"));
        assert_eq!(svc.annotation(IPS_ANNOTATION), Some("198.51.100.1"));
        let list: Vec<EndpointSlice> = serde_json::from_slice(
            br#"[{"metadata": {"name": "a", "labels": {"kubernetes.io/service-name": "web"}},
                  "addressType": "IPv4"}]"#,
        )
        .unwrap();
        assert_eq!(list[0].label(SERVICE_NAME_LABEL), Some("web"));
    }

    /// `Api::<T>` addresses the same resource as k8s-openapi's type, and the cache names
    /// it the same way.
    #[test]
    fn same_api_coordinates_as_k8s_openapi() {
        use kube::Resource;
        fn cached<K: Lookup<DynamicType = ()>>() -> [String; 5] {
            [
                K::kind(&()).into(),
                K::group(&()).into(),
                K::version(&()).into(),
                K::api_version(&()).into(),
                K::plural(&()).into(),
            ]
        }
        assert_eq!(
            cached::<Service>(),
            cached::<k8s_openapi::api::core::v1::Service>()
        );
        assert_eq!(
            cached::<EndpointSlice>(),
            cached::<k8s_openapi::api::discovery::v1::EndpointSlice>()
        );
        // Every `Resource` is a `Lookup` too.
        fn coordinates<K: Resource<DynamicType = ()>>() -> ([String; 5], String) {
            (cached::<K>(), K::url_path(&(), Some("shop")))
        }
        assert_eq!(
            coordinates::<ServiceObject>(),
            coordinates::<k8s_openapi::api::core::v1::Service>()
        );
        assert_eq!(
            coordinates::<EndpointSliceObject>(),
            coordinates::<k8s_openapi::api::discovery::v1::EndpointSlice>()
        );
        assert_eq!(
            EndpointSliceObject::url_path(&(), None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
        assert_eq!(
            ServiceObject::url_path(&(), Some("shop")),
            "/api/v1/namespaces/shop/services"
        );
    }
}
