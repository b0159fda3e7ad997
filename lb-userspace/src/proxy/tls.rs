//! TLS termination: certificates chosen by SNI from the Ingress `tls` sections, a default
//! certificate, ALPN h2/http1.1, TLS 1.2 and 1.3.
//!
//! The rustls `ServerConfig` is built once per listener; [`SniResolver`] looks certificates up
//! in the configuration state current at handshake time, so a reload swaps certificates
//! atomically with routes while handshakes in progress keep the ones they started with.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{ProxyConfig, TlsSecret};
use super::routing::normalise_host;

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM could not be read or parsed.
    #[error("secret {secret}: cannot load {what}: {message}")]
    Pem {
        /// `namespace/name`.
        secret: String,
        /// "tls.crt" or "tls.key".
        what: &'static str,
        /// Reader or parser message.
        message: String,
    },
    /// A Service's upstream TLS settings (its CA) do not load.
    #[error("service {service}: tls: {message}")]
    UpstreamCa {
        /// `namespace/name:port`.
        service: String,
        /// What failed.
        message: String,
    },
    /// rustls refused the key or the pair.
    #[error("secret {secret}: {message}")]
    Key {
        /// `namespace/name`.
        secret: String,
        /// rustls's message.
        message: String,
    },
}

/// Certificates by SNI host.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads every secret referenced by served Ingresses and the default secret.
    pub fn from_config(cfg: &ProxyConfig) -> Result<Self, TlsError> {
        let mut loaded: HashMap<(&str, &str), Arc<CertifiedKey>> = HashMap::new();
        let mut get = |ns: &str, name: &str| -> Result<Option<Arc<CertifiedKey>>, TlsError> {
            let Some(s) = cfg
                .secrets
                .iter()
                .find(|s| s.namespace == ns && s.name == name)
            else {
                return Ok(None); // validate() has already rejected dangling references
            };
            if let Some(k) = loaded.get(&(s.namespace.as_str(), s.name.as_str())) {
                return Ok(Some(k.clone()));
            }
            let key = Arc::new(load_secret(s)?);
            loaded.insert((s.namespace.as_str(), s.name.as_str()), key.clone());
            Ok(Some(key))
        };
        let mut store = Self::default();
        if let Some((ns, name)) = cfg
            .tls
            .default_secret
            .as_deref()
            .and_then(|d| d.split_once('/'))
        {
            store.default = get(ns, name)?;
        }
        for ing in cfg.ingresses.iter().filter(|i| cfg.serves(i)) {
            for t in &ing.tls {
                let Some(key) = get(&ing.namespace, &t.secret_name)? else {
                    continue;
                };
                for h in &t.hosts {
                    let map = match h.strip_prefix("*.") {
                        Some(suffix) => (&mut store.wildcard, suffix),
                        None => (&mut store.exact, h.as_str()),
                    };
                    // First Ingress wins, as for routes.
                    map.0.entry(map.1.to_owned()).or_insert_with(|| key.clone());
                }
            }
        }
        Ok(store)
    }

    /// The certificate for an SNI name (exact, then one-label wildcard, then default).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = sni.map(normalise_host).and_then(|h| {
            self.exact.get(&*h).cloned().or_else(|| {
                let (label, suffix) = h.split_once('.')?;
                (!label.is_empty()).then(|| self.wildcard.get(suffix).cloned())?
            })
        });
        found.or_else(|| self.default.clone())
    }
}

/// A Secret's certificate chain and key, checked to match.
pub(crate) fn load_secret(s: &TlsSecret) -> Result<CertifiedKey, TlsError> {
    let id = format!("{}/{}", s.namespace, s.name);
    let pem_err = |what, e: &dyn std::fmt::Display| TlsError::Pem {
        secret: id.clone(),
        what,
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = match (&s.cert_file, &s.cert_pem) {
        (Some(path), _) => CertificateDer::pem_file_iter(path)
            .map_err(|e| pem_err("tls.crt", &format!("{}: {e}", path.display())))?
            .collect::<Result<_, _>>(),
        (None, Some(text)) => CertificateDer::pem_slice_iter(text.as_bytes()).collect(),
        (None, None) => Ok(Vec::new()),
    }
    .map_err(|e| pem_err("tls.crt", &e))?;
    if certs.is_empty() {
        return Err(pem_err("tls.crt", &"no certificate in PEM"));
    }
    let key = match (&s.key_file, &s.key_pem) {
        (Some(path), _) => PrivateKeyDer::from_pem_file(path)
            .map_err(|e| pem_err("tls.key", &format!("{}: {e}", path.display())))?,
        (None, Some(text)) => {
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| pem_err("tls.key", &e))?
        }
        (None, None) => return Err(pem_err("tls.key", &"no key")),
    };
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(certs, key, &provider).map_err(|e| TlsError::Key {
        secret: id.clone(),
        message: e.to_string(),
    })?;
    Ok(ck)
}

/// Finds the certificate for an SNI name in the current configuration.
pub type CertLookup = Arc<dyn Fn(Option<&str>) -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// rustls certificate resolver over the current (swappable) configuration.
pub struct SniResolver {
    lookup: CertLookup,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.lookup)(hello.server_name())
    }
}

/// The listener's rustls configuration (ALPN h2 then http/1.1).
pub fn server_config(
    lookup: CertLookup,
    tls13_only: bool,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { lookup }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
