//! The L7 proxy (`xlb proxy`): HTTP host/path routing with Ingress semantics, TLS termination,
//! HTTP/1.1 and HTTP/2 downstream, pooled HTTP/1.1 upstream, WebSocket/Upgrade tunnelling,
//! load balancing with passive and active health, and live reconfiguration. See
//! docs/proxy.md.
//!
//! Layout: [`config`] (model + validation), [`path`] (request path normalisation),
//! [`routing`], [`tls`], [`upstream`] (balancing, passive health, pools), [`health`] (active
//! health checks), [`client`] (inline upstream HTTP/1.1), [`server`] (workers, the forwarding
//! path and its HTTP/1.1 fast path), [`proxy_protocol`] (PROXY headers on downstream
//! connections), [`head`] (upstream request heads), [`timer`], [`h1guard`]
//! (request smuggling guard), [`body`], [`metrics`], [`access_log`] and [`watch`] (config file
//! watcher).

pub mod access_log;
pub mod body;
pub mod client;
pub mod config;
pub mod h1guard;
pub mod h2_upstream;
pub mod head;
pub mod health;
pub mod metrics;
pub mod path;
pub mod proxy_protocol;
pub mod routing;
pub mod server;
pub mod timer;
pub mod tls;
pub mod upstream;
pub mod upstream_tls;
pub mod watch;

use anyhow::Context as _;

pub use config::{ConfigError, ProxyConfig};
pub use server::{ProxyError, ProxyHandle, Reloader, start};

/// Command-line options of `xlb proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Proxy configuration file (TOML or YAML); the embedded default when absent.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Validate the configuration (and load its certificates' files) and exit.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub kube: crate::kubernetes::ProxyKubeArgs,
}

/// Runs the proxy until SIGTERM/SIGINT, then drains connections (see [`ProxyHandle::drain`]). The configuration file is watched and re-applied on
/// change (and on SIGHUP); an invalid configuration is logged and ignored.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    if args.kube.kubernetes {
        return run_kubernetes(args).await;
    }
    let cfg = match &args.config {
        Some(p) => ProxyConfig::load(p)?,
        None => ProxyConfig::embedded_default()?,
    };
    if args.check {
        tls::CertStore::from_config(&cfg)?;
        println!("configuration is valid");
        return Ok(());
    }
    let handle = start(cfg).context("starting the proxy")?;
    tracing::info!(
        http = ?handle.http_addr,
        https = ?handle.https_addr,
        metrics = ?handle.metrics_addr,
        "xlb proxy running"
    );
    let _watcher = match &args.config {
        Some(p) => {
            Some(watch::watch(p.clone(), handle.reloader()).context("watching the config file")?)
        }
        None => None,
    };
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                if let Some(p) = &args.config {
                    watch::reload_from(p, &handle.reloader());
                }
            }
        }
    }
    tracing::info!("draining connections, then shutting down");
    tokio::task::spawn_blocking(move || handle.drain()).await?;
    Ok(())
}

/// `xlb proxy --kubernetes`: node settings from the file (or the embedded default), objects
/// from the API (see [`crate::kubernetes::ingress_source`]).
async fn run_kubernetes(args: ProxyArgs) -> anyhow::Result<()> {
    let node = crate::kubernetes::ingress::load_node_settings(args.config.as_deref())?;
    if args.check {
        println!("node settings are valid");
        return Ok(());
    }
    let Some(opts) = args.kube.options(node).map_err(anyhow::Error::msg)? else {
        unreachable!("run_kubernetes is only called with --kubernetes");
    };
    crate::kubernetes::ingress_source::serve(opts, args.config).await
}
