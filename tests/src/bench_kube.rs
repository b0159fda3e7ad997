//! Helpers for `cargo xtask bench kubernetes` (`tests/examples/bench_kubernetes.rs`): the
//! Services and EndpointSlices it creates, bounded-concurrency creation, a reader of the
//! pinned maps that checks what the agent programmed, and process memory figures.
//!
//! Addresses: VIPs come from 198.18.0.0/15 (RFC 2544, benchmarking), backends from
//! 10.0.0.0/8. No packet is sent to any of them; they only exist in the maps of the bench's
//! own network namespace.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use lb_common::VipKey;
use lb_userspace::datapath::Maps;
use lb_userspace::kubernetes::translate::{CLASS_ANNOTATION, IPS_ANNOTATION};
use lb_userspace::model::{Protocol, ServiceKey};
use serde_json::{Value, json};

/// The Service port every bench Service has (one VIP per Service).
pub const PORT: u16 = 80;
/// Most Services the address plan holds (198.18.0.0/15 minus the first address).
pub const MAX_SERVICES: usize = 131_000;

/// The VIP of Service `i`.
pub fn vip(i: usize) -> Ipv4Addr {
    assert!(i < MAX_SERVICES, "service {i} outside 198.18.0.0/15");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + i as u32)
}

/// The address of endpoint `j` of Service `i` (`per_service` endpoints each).
pub fn endpoint(i: usize, j: usize, per_service: usize) -> Ipv4Addr {
    let n = (i * per_service + j) as u32;
    assert!(n < (1 << 24) - 2, "backend {n} outside 10.0.0.0/8");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + 1 + n)
}

/// Name of Service `i` (and of its EndpointSlice, with `-1`).
pub fn service_name(i: usize) -> String {
    format!("svc-{i:06}")
}

/// A LoadBalancer Service of `class` requesting its VIP through the annotation (1.20 has no
/// `spec.loadBalancerClass`, so the class is the annotation too).
pub fn service(namespace: &str, i: usize, class: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": service_name(i),
                     "annotations": {CLASS_ANNOTATION: class,
                                     IPS_ANNOTATION: vip(i).to_string()}},
        "spec": {"type": "LoadBalancer",
                 // See [`GatedApiserver`]: 10,000 NodePorts do not exist.
                 "allocateLoadBalancerNodePorts": false,
                 "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}]},
    }))
    .expect("service json")
}

/// The `endpoints` array of Service `i`; `draining[j]` makes endpoint `j` serving and
/// terminating (a draining backend: it keeps its id but leaves the ring).
pub fn endpoints(i: usize, draining: &[bool]) -> Value {
    let per = draining.len();
    Value::Array(
        draining
            .iter()
            .enumerate()
            .map(|(j, &d)| {
                let conditions = if d {
                    json!({"ready": false, "serving": true, "terminating": true})
                } else {
                    json!({"ready": true})
                };
                json!({"addresses": [endpoint(i, j, per).to_string()], "conditions": conditions})
            })
            .collect(),
    )
}

/// The EndpointSlice of Service `i`, all endpoints ready.
pub fn slice(namespace: &str, i: usize, per_service: usize) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": format!("{}-1", service_name(i)),
                     "labels": {"kubernetes.io/service-name": service_name(i)}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(i, &vec![false; per_service]),
    }))
    .expect("slice json")
}

/// Creates `count` objects made by `make(i)` with at most `concurrency` requests in
/// flight; fails on the first error (with the object's index).
pub async fn create_all<K>(
    api: &Api<K>,
    count: usize,
    concurrency: usize,
    make: impl Fn(usize) -> K,
) -> anyhow::Result<()>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    let params = PostParams::default();
    let mut results = futures_util::stream::iter((0..count).map(|i| {
        let object = make(i);
        let params = &params;
        async move {
            // Bounded retries: a loaded 2-core machine may time a request out.
            let mut attempt = 0;
            loop {
                match api.create(params, &object).await {
                    Ok(_) => return Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
                    Err(e) if attempt < 3 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        let _ = e;
                    }
                    Err(e) => return Err(anyhow::anyhow!("creating object {i}: {e}")),
                }
            }
        }
    }))
    .buffer_unordered(concurrency);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

/// Replaces the endpoints of Service `i`'s slice (a JSON merge patch replaces the array).
pub async fn set_endpoints(
    api: &Api<EndpointSlice>,
    i: usize,
    draining: &[bool],
) -> anyhow::Result<()> {
    let patch = json!({"endpoints": endpoints(i, draining)});
    api.patch(
        &format!("{}-1", service_name(i)),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Reads what the agent programmed from the pinned maps.
pub struct MapsProbe {
    maps: Maps,
}

impl MapsProbe {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            maps: Maps::open_pinned(pin_dir)?,
        })
    }

    /// Entries in the VIP table (one syscall per key).
    pub fn vip_count(&self) -> usize {
        self.maps.vips.keys().filter(|k| k.is_ok()).count()
    }

    /// The map key of Service `i`'s VIP.
    pub fn key(i: usize) -> VipKey {
        ServiceKey {
            address: IpAddr::V4(vip(i)),
            protocol: Protocol::Tcp,
            port: PORT,
        }
        .to_map_key()
    }

    /// The ring Service `i`'s VIP currently points at, read whole.
    pub fn active_ring(&self, i: usize) -> Option<Vec<u32>> {
        let info = self.maps.vips.get(&Self::key(i), 0).ok()?;
        self.maps.maglev.read_ring(info.ring).ok()
    }

    /// Whether backend `id` has slots in Service `i`'s active ring.
    pub fn in_ring(&self, i: usize, id: u32) -> Option<bool> {
        // The whole ring is M memory reads through the mapping: cheap enough to poll.
        Some(self.active_ring(i)?.contains(&id))
    }

    /// Address → backend id of every used backend entry.
    pub fn backend_ids(&self) -> anyhow::Result<BTreeMap<Ipv4Addr, u32>> {
        let mut out = BTreeMap::new();
        for (id, backend) in self.maps.backend_entries()? {
            if backend.family == lb_common::FAMILY_V4 {
                let bytes = backend.addr_be[0].to_ne_bytes();
                out.insert(Ipv4Addr::from(bytes), id);
            }
        }
        Ok(out)
    }

    /// Checks that the maps hold exactly `services` VIPs, each a TCP VIP on [`PORT`] whose
    /// active ring spreads over exactly its `per_service` backends (each with at least one
    /// slot and none with more than twice its fair share). Returns the backend ids.
    pub fn verify(
        &self,
        services: usize,
        per_service: usize,
    ) -> anyhow::Result<BTreeMap<Ipv4Addr, u32>> {
        let count = self.vip_count();
        anyhow::ensure!(
            count == services,
            "{count} VIPs in the map, {services} expected"
        );
        let ids = self.backend_ids()?;
        anyhow::ensure!(
            ids.len() == services * per_service,
            "{} backends in the map, {} expected",
            ids.len(),
            services * per_service
        );
        let m = self.maps.maglev.table_size() as usize;
        for i in 0..services {
            let info = self
                .maps
                .vips
                .get(&Self::key(i), 0)
                .map_err(|e| anyhow::anyhow!("VIP {} missing: {e}", vip(i)))?;
            let ring = self.maps.maglev.read_ring(info.ring)?;
            let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
            for id in ring {
                *slots.entry(id).or_default() += 1;
            }
            let want: Vec<u32> = (0..per_service)
                .map(|j| {
                    ids.get(&endpoint(i, j, per_service))
                        .copied()
                        .ok_or_else(|| {
                            anyhow::anyhow!("backend {} has no id", endpoint(i, j, per_service))
                        })
                })
                .collect::<anyhow::Result<_>>()?;
            let mut got: Vec<u32> = slots.keys().copied().collect();
            got.sort_unstable();
            let mut want_sorted = want.clone();
            want_sorted.sort_unstable();
            anyhow::ensure!(
                got == want_sorted,
                "VIP {}: ring holds ids {got:?}, expected {want_sorted:?}",
                vip(i)
            );
            let fair = m / per_service;
            if let Some((id, n)) = slots.iter().find(|(_, n)| **n > 2 * fair + 2) {
                anyhow::bail!(
                    "VIP {}: backend id {id} has {n} of {m} slots (fair share {fair})",
                    vip(i)
                );
            }
        }
        Ok(ids)
    }
}

/// kube-apiserver restarted by the bench with `ServiceLBNodePortControl` on (killed on drop).
///
/// 1.20 allocates a NodePort to every LoadBalancer Service unless that alpha gate is on and
/// the Service sets `allocateLoadBalancerNodePorts: false` — and the default range holds only
/// 2,768 ports. [`KubeServer`] takes no extra flags, so the bench stops its API server and
/// starts the same binary on the same port, etcd, certificates and token file (the flags
/// below mirror `tests/src/kube.rs`) plus the gate. The EndpointSlice CRD is in etcd already.
pub struct GatedApiserver {
    child: std::process::Child,
}

impl GatedApiserver {
    pub fn replace(server: &crate::kube::KubeServer) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        server.stop_apiserver();
        let port = server
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| anyhow::anyhow!("no port in {}", server.url))?;
        let p = |name: &str| server.dir.join(name).display().to_string();
        let log = std::fs::File::create(server.dir.join("kube-apiserver.gated.log"))?;
        let mut cmd = std::process::Command::new(crate::kube::apiserver_binary());
        cmd.args([
            format!("--etcd-servers={}", server.etcd_endpoint),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("serving.pem")),
            format!("--tls-private-key-file={}", p("serving-key.pem")),
            format!("--client-ca-file={}", p("ca.pem")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", p("sa-pub.pem")),
            format!("--service-account-signing-key-file={}", p("sa-key.pem")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--runtime-config=discovery.k8s.io/v1beta1=false".into(),
            "--watch-cache=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--feature-gates=ServiceLBNodePortControl=true".into(),
            // The bench's bursts of creates and the agent's status writes are not abuse.
            "--max-requests-inflight=1000".into(),
            "--max-mutating-requests-inflight=500".into(),
            "--v=1".into(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut gated = GatedApiserver {
            child: cmd.spawn()?,
        };
        let gated_ref = &mut gated;
        poll(
            "the restarted kube-apiserver's /readyz",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                if let Ok(Some(status)) = gated_ref.child.try_wait() {
                    panic!(
                        "kube-apiserver exited with {status}; see {}",
                        server.dir.join("kube-apiserver.gated.log").display()
                    );
                }
                (server.get("/readyz").as_deref() == Some("ok")).then_some(())
            },
        )?;
        // The CRD-served group is back once discovery has it.
        poll(
            "EndpointSlice v1 to be served again",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                server
                    .get("/apis/discovery.k8s.io/v1/endpointslices")
                    .map(|_| ())
            },
        )?;
        Ok(gated)
    }
}

impl Drop for GatedApiserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every `every` until it returns `Some` or `timeout` passes.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// Memory figures of a process from `/proc/PID/status`, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Peak resident set (`VmHWM`).
    pub hwm_kib: u64,
    /// Resident now (`VmRSS`).
    pub rss_kib: u64,
    /// Anonymous (heap, stacks) part of the resident set.
    pub anon_kib: u64,
    /// File-backed part: the binary and mapped BPF maps.
    pub file_kib: u64,
    /// Shared-memory part.
    pub shmem_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Option<Memory> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Some(Memory {
            hwm_kib: field("VmHWM:"),
            rss_kib: field("VmRSS:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
            shmem_kib: field("RssShmem:"),
        })
    }
}

/// The `p`-th percentile (0–100) of a sample, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan_is_disjoint_and_in_range() {
        assert_eq!(vip(0), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(vip(9_999), Ipv4Addr::new(198, 18, 39, 16));
        assert_eq!(endpoint(0, 0, 10), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(endpoint(9_999, 9, 10), Ipv4Addr::new(10, 1, 134, 160));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
