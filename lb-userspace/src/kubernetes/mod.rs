//! Kubernetes as a source of the desired state: Services of type LoadBalancer and their
//! EndpointSlices ([`translate`]), watched live by `xlb agent --kubernetes` ([`source`])
//! and cached as slim views ([`objects`]);
//! Ingresses, their TLS Secrets and backends ([`ingress`]), watched live by
//! `xlb proxy --kubernetes` ([`ingress_source`]). See `docs/kubernetes.md`.

pub mod ingress;
pub mod ingress_source;
pub mod objects;
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
        let identity = identity(self.kube_identity.clone());
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

/// `explicit`, else `$NODE_NAME`, else the hostname.
fn identity(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "xlb".into())
}

/// The `xlb proxy` flags of the Kubernetes source.
#[derive(Clone, Debug, clap::Args)]
pub struct ProxyKubeArgs {
    /// Take IngressClasses, Ingresses, TLS Secrets, Services and EndpointSlices from the
    /// Kubernetes API instead of the config file's objects (the file, if given, still
    /// supplies listeners, timeouts, limits and TLS settings).
    #[arg(long)]
    pub kubernetes: bool,
    /// `spec.controller` of the IngressClasses served.
    #[arg(long, default_value = ingress::CONTROLLER_NAME)]
    pub kube_controller: String,
    /// Address written to `status.loadBalancer.ingress` of served Ingresses: an IP or a
    /// hostname (repeatable). Give every replica the same (the address clients use, e.g.
    /// the VIP in front of the proxies). Default: status is not written.
    #[arg(long = "kube-publish-address", conflicts_with = "kube_publish_service")]
    pub kube_publish: Vec<String>,
    /// Publish the addresses of this Service (`namespace/name`) instead: its
    /// `status.loadBalancer.ingress`, followed live. Typically the LoadBalancer Service in
    /// front of the proxies, whose VIP the xlb agent serves.
    #[arg(long)]
    pub kube_publish_service: Option<String>,
    /// Watch Ingresses, Secrets, Services and EndpointSlices of this namespace only
    /// (default: all namespaces).
    #[arg(long)]
    pub kube_namespace: Option<String>,
    /// This proxy's identity in Events (default: $NODE_NAME, else the hostname).
    #[arg(long)]
    pub kube_identity: Option<String>,
    /// Kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl ProxyKubeArgs {
    /// The source options, if `--kubernetes` was given; `node` holds the node settings.
    pub fn options(
        &self,
        node: crate::proxy::ProxyConfig,
    ) -> Result<Option<ingress_source::IngressSourceOptions>, String> {
        use ingress_source::Publish;
        if !self.kubernetes {
            return Ok(None);
        }
        let publish = match &self.kube_publish_service {
            Some(id) => {
                let Some((namespace, name)) = id
                    .split_once('/')
                    .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
                else {
                    return Err(format!(
                        "--kube-publish-service {id:?}: expected namespace/name"
                    ));
                };
                if self
                    .kube_namespace
                    .as_deref()
                    .is_some_and(|ns| ns != namespace)
                {
                    return Err(format!(
                        "--kube-publish-service {id:?} is outside --kube-namespace (only that \
                         namespace's Services are watched)"
                    ));
                }
                Publish::Service {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }
            }
            None if self.kube_publish.is_empty() => Publish::Off,
            None => Publish::Addresses(self.kube_publish.clone()),
        };
        let mut opts =
            ingress_source::IngressSourceOptions::new(node, identity(self.kube_identity.clone()));
        opts.ingress.controller = self.kube_controller.clone();
        opts.publish = publish;
        opts.namespace = self.kube_namespace.clone();
        opts.kubeconfig = self.kubeconfig.clone();
        Ok(Some(opts))
    }
}

#[cfg(test)]
mod tests {
    use super::ingress_source::Publish;
    use super::*;

    fn args(publish_service: Option<&str>, namespace: Option<&str>) -> ProxyKubeArgs {
        ProxyKubeArgs {
            kubernetes: true,
            kube_controller: ingress::CONTROLLER_NAME.into(),
            kube_publish: Vec::new(),
            kube_publish_service: publish_service.map(Into::into),
            kube_namespace: namespace.map(Into::into),
            kube_identity: Some("t".into()),
            kubeconfig: None,
        }
    }

    fn publish(a: &ProxyKubeArgs) -> Result<Publish, String> {
        a.options(crate::proxy::ProxyConfig::default())
            .map(|o| o.expect("--kubernetes").publish)
    }

    #[test]
    fn publish_service_names_a_watched_service() {
        assert_eq!(
            publish(&args(Some("ingress/xlb-proxy"), None)),
            Ok(Publish::Service {
                namespace: "ingress".into(),
                name: "xlb-proxy".into()
            })
        );
        assert!(publish(&args(Some("ingress/xlb-proxy"), Some("ingress"))).is_ok());
        let e = publish(&args(Some("ingress/xlb-proxy"), Some("apps"))).unwrap_err();
        assert!(e.contains("outside --kube-namespace"), "{e}");
        for bad in ["xlb-proxy", "/x", "a/", "a/b/c"] {
            let e = publish(&args(Some(bad), None)).unwrap_err();
            assert!(e.contains("namespace/name"), "{bad}: {e}");
        }
        assert_eq!(publish(&args(None, None)), Ok(Publish::Off));
        let mut a = args(None, None);
        a.kube_publish = vec!["192.0.2.1".into()];
        assert_eq!(
            publish(&a),
            Ok(Publish::Addresses(vec!["192.0.2.1".into()]))
        );
    }
}
