//! TLS from the proxy to upstream endpoints (a Service's `tls`).
//!
//! [`UpstreamIo`] is what an upstream connection reads and writes: a plain socket or a
//! rustls client session over one. The client configuration is built once per Service and
//! kept across reloads that leave its settings alone, so its session cache keeps resuming
//! sessions (a resumed TLS 1.3 handshake skips the certificate exchange and its checks).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::SingleCertAndKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::config::{TlsSecret, UpstreamProtocol, UpstreamTls};
use super::tls::TlsError;

/// How to open TLS sessions to one Service's endpoints.
pub struct TlsOrigination {
    connector: TlsConnector,
    /// SNI and the name to verify; None: the endpoint's IP address (and no SNI).
    server_name: Option<ServerName<'static>>,
    /// The settings this was built from (reused while a reload leaves them alone).
    settings: UpstreamTls,
    /// The client certificate's Secret as it was loaded (its contents count too).
    client: Option<TlsSecret>,
    /// The HTTP version offered by ALPN (and required of the endpoint for HTTP/2).
    protocol: UpstreamProtocol,
}

impl std::fmt::Debug for TlsOrigination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOrigination")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsOrigination {
    /// The client side of `settings` (None when TLS is off), loading the CA and `client`,
    /// the Secret `settings.client_secret` names. `service` (`namespace/name:port`) names the
    /// Service in errors.
    pub fn from_config(
        settings: &UpstreamTls,
        client: Option<&TlsSecret>,
        service: &str,
    ) -> Result<Option<Arc<Self>>, TlsError> {
        Self::for_protocol(settings, client, service, UpstreamProtocol::Http1)
    }

    /// [`TlsOrigination::from_config`] for endpoints spoken to in `protocol`: ALPN offers
    /// only that protocol, and an HTTP/2 endpoint that does not pick `h2` is refused.
    pub fn for_protocol(
        settings: &UpstreamTls,
        client: Option<&TlsSecret>,
        service: &str,
        protocol: UpstreamProtocol,
    ) -> Result<Option<Arc<Self>>, TlsError> {
        if !settings.enabled {
            return Ok(None);
        }
        let err = |message: String| TlsError::UpstreamCa {
            service: service.to_owned(),
            message,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err(e.to_string()))?;
        let cfg = if settings.verify {
            let certs: Vec<CertificateDer<'static>> = match (&settings.ca_file, &settings.ca_pem) {
                (Some(path), _) => CertificateDer::pem_file_iter(path)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?
                    .collect::<Result<_, _>>(),
                (None, Some(text)) => CertificateDer::pem_slice_iter(text.as_bytes()).collect(),
                (None, None) => Ok(Vec::new()),
            }
            .map_err(|e| err(e.to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err(if ignored == 0 {
                    "no certificate in the PEM".to_owned()
                } else {
                    format!("none of the {ignored} certificates parses")
                }));
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        };
        // Offered only when the endpoint asks for a client certificate.
        let mut cfg = match client {
            Some(secret) => {
                let key = super::tls::load_secret(secret)?;
                cfg.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)))
            }
            None => cfg.with_no_client_auth(),
        };
        // Offering only the protocol the exchange speaks lets a server that speaks both pick
        // right; one that picks nothing is still fine for HTTP/1.1 (the default then).
        cfg.alpn_protocols = vec![match protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::H2 => b"h2".to_vec(),
        }];
        let server_name = match &settings.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| err(format!("server_name {n:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Some(Arc::new(Self {
            connector: TlsConnector::from(Arc::new(cfg)),
            server_name,
            settings: settings.clone(),
            client: client.cloned(),
            protocol,
        })))
    }

    /// Whether this was built from `settings`, `client` and `protocol` (then it can be kept).
    pub fn built_from(
        &self,
        settings: &UpstreamTls,
        client: Option<&TlsSecret>,
        protocol: UpstreamProtocol,
    ) -> bool {
        self.settings == *settings && self.client.as_ref() == client && self.protocol == protocol
    }

    fn name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }
}

/// Accepts any certificate but still checks the handshake signatures (so the session is
/// at least with the holder of the certificate's key): `verify = false`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An upstream connection's transport.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the session state is large and TLS upstreams are the rarer case).
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// Connects to `addr` (with `TCP_NODELAY`) and, with `tls`, completes the handshake, all
    /// within `timeout`. A failed handshake is an `io::Error` like a refused connect: the
    /// endpoint is as unusable.
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&TlsOrigination>,
    ) -> io::Result<Self> {
        let open = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Ok(Self::Plain(tcp)),
                Some(t) => {
                    let s = t
                        .connector
                        .connect(t.name_for(addr), tcp)
                        .await
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("TLS handshake with {addr}: {e}"))
                        })?;
                    if t.protocol == UpstreamProtocol::H2
                        && s.get_ref().1.alpn_protocol() != Some(b"h2")
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{addr} did not pick HTTP/2 (ALPN h2) in the TLS handshake"),
                        ));
                    }
                    Ok(Self::Tls(Box::new(s)))
                }
            }
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> UpstreamTls {
        UpstreamTls {
            enabled: true,
            ..UpstreamTls::default()
        }
    }

    #[test]
    fn off_builds_nothing() {
        assert!(
            TlsOrigination::from_config(&UpstreamTls::default(), None, "s")
                .expect("off")
                .is_none()
        );
    }

    #[test]
    fn a_ca_that_does_not_load_names_the_service() {
        let cases = [
            (Some("not pem at all"), None, "no certificate"),
            (
                Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                None,
                "parses",
            ),
            (None, Some("/nonexistent/ca.pem"), "/nonexistent/ca.pem"),
        ];
        for (pem, file, want) in cases {
            let s = UpstreamTls {
                ca_pem: pem.map(str::to_owned),
                ca_file: file.map(Into::into),
                ..settings()
            };
            let e = TlsOrigination::from_config(&s, None, "default/api:443")
                .expect_err("bad CA")
                .to_string();
            assert!(
                e.contains("default/api:443") && e.contains(want),
                "{e:?} should name the service and say {want:?}"
            );
        }
    }

    #[test]
    fn without_verification_no_ca_is_needed_and_the_name_defaults_to_the_address() {
        let t = TlsOrigination::from_config(
            &UpstreamTls {
                verify: false,
                ..settings()
            },
            None,
            "s",
        )
        .expect("builds")
        .expect("on");
        let addr: SocketAddr = "192.0.2.7:8443".parse().expect("addr");
        assert_eq!(
            t.name_for(addr),
            ServerName::IpAddress(addr.ip().into()),
            "no server_name: the endpoint's address"
        );
        let named = TlsOrigination::from_config(
            &UpstreamTls {
                verify: false,
                server_name: Some("api.internal".into()),
                ..settings()
            },
            None,
            "s",
        )
        .expect("builds")
        .expect("on");
        assert_eq!(
            named.name_for(addr),
            ServerName::try_from("api.internal").expect("name")
        );
    }
}
