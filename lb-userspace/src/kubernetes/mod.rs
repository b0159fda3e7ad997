//! Kubernetes as a source of the desired state: Services of type LoadBalancer and their
//! EndpointSlices ([`translate`]), watched live by `xlb agent --kubernetes` ([`source`]).
//! See `docs/kubernetes.md`.

pub mod source;
pub mod translate;

use std::time::Duration;

use translate::{DEFAULT_CLASS, Pool, TranslateOptions};

/// The `xlb agent` flags of the Kubernetes source. The API server is found the usual way
/// (`KUBECONFIG`, `~/.kube/config`, or the in-cluster service account).
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// Take VIPs from Kubernetes Services of type LoadBalancer and their EndpointSlices
    /// instead of the config file's `vips` (the file still supplies the node settings).
    #[arg(long)]
    pub kubernetes: bool,
    /// Load-balancer class served (`spec.loadBalancerClass` or the
    /// `xlb.dev/load-balancer-class` annotation).
    #[arg(long, default_value = DEFAULT_CLASS)]
    pub kube_class: String,
    /// Also serve LoadBalancer Services that name no class.
    #[arg(long)]
    pub kube_claim_classless: bool,
    /// VIP pool for Services without a requested address: CIDR or FIRST-LAST (repeatable).
    #[arg(long = "kube-pool")]
    pub kube_pools: Vec<Pool>,
    /// This agent's identity in the status-writer Lease (default: $NODE_NAME, else the
    /// hostname).
    #[arg(long)]
    pub kube_identity: Option<String>,
    /// Namespace of the status-writer Lease.
    #[arg(long, default_value = "kube-system")]
    pub kube_lease_namespace: String,
    /// Seconds a Lease holder stays the status writer without renewing.
    #[arg(long, default_value_t = 15)]
    pub kube_lease_seconds: u64,
    /// Kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl KubeArgs {
    /// The source options, if `--kubernetes` was given.
    pub fn options(&self) -> Option<source::SourceOptions> {
        if !self.kubernetes {
            return None;
        }
        let identity = self
            .kube_identity
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "xlb".into());
        let mut opts = source::SourceOptions::new(
            TranslateOptions {
                class: self.kube_class.clone(),
                claim_classless: self.kube_claim_classless,
                pools: self.kube_pools.clone(),
            },
            identity,
        );
        opts.lease_namespace = self.kube_lease_namespace.clone();
        opts.lease_duration = Duration::from_secs(self.kube_lease_seconds.max(1));
        opts.kubeconfig = self.kubeconfig.clone();
        Some(opts)
    }
}
