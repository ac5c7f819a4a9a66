//! The control plane's trust, bootstrapped from the cluster secret alone.
//!
//! Every party that holds the secret (coordinator, workers, clients) derives the same cluster
//! CA key from it (HKDF-SHA256, then an Ed25519 key), so there is nothing to copy around but
//! the secret itself. Each gRPC server presents a certificate of its own, issued by that CA
//! for the name [`SERVER_NAME`]; each client trusts that CA and nothing else, over TLS 1.3
//! only. A man in the middle, or a server that does not hold the secret, cannot present such
//! a certificate, so a client refuses it before sending a byte of its request.
//!
//! Calls are authorized by a bearer value derived from the secret (another HKDF output), sent
//! only inside that TLS session: neither the secret nor anything an eavesdropper could replay
//! crosses the network. The QUIC mesh between workers uses the same CA ([`ClusterKeys::ca_key`]).
//!
//! Rotating the secret means a new CA: every process must restart with the new secret.

use hyper_util::rt::TokioIo;
use ring::hkdf;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

/// The name every Tessera gRPC server's certificate carries, whatever its address.
pub const SERVER_NAME: &str = "control.tessera.cluster";

/// How long a TLS handshake may take before the connection is dropped (a client that opens a
/// connection and says nothing holds no more than this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const KDF_SALT: &[u8] = b"tessera cluster secret v1";

/// 32 bytes derived from the secret for one purpose.
fn derive(secret: &str, purpose: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(secret.as_bytes());
    let info = [purpose];
    let okm = prk
        .expand(&info, hkdf::HKDF_SHA256)
        .expect("32 bytes is within HKDF-SHA256's limit");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("32 bytes");
    out
}

/// An Ed25519 key (PKCS#8 v1) from a 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a process derives from the cluster secret: the CA, its own server certificate, the
/// TLS configurations, and the bearer value of its calls.
pub struct ClusterKeys {
    ca_key: Vec<u8>,
    bearer: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKeys { .. }")
    }
}

impl ClusterKeys {
    pub fn from_secret(secret: &str) -> Result<ClusterKeys, String> {
        if secret.is_empty() {
            return Err(
                "the cluster secret is empty (set TESSERA_TOKEN; `tessera token` makes one)".into(),
            );
        }
        let err = |e: &dyn std::fmt::Display| format!("deriving the cluster keys: {e}");
        let ca_key = ed25519_pkcs8(&derive(secret, b"ca"));
        let ca_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(ca_key.clone()),
            &rcgen::PKCS_ED25519,
        )
        .map_err(|e| err(&e))?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tessera cluster CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, ca_pair).map_err(|e| err(&e))?;
        let ca_der = issuer.der().to_vec();
        // This process's own server certificate, for a fresh key.
        let leaf_key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(|e| err(&e))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tessera control plane");
        let leaf = params.signed_by(&leaf_key, &issuer).map_err(|e| err(&e))?;
        let chain = vec![
            CertificateDer::from(leaf.der().to_vec()),
            CertificateDer::from(ca_der.clone()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| err(&e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der))
            .map_err(|e| err(&e))?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let bearer = derive(secret, b"bearer")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(ClusterKeys {
            ca_key,
            bearer,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The cluster CA's private key (PKCS#8), for issuing the workers' QUIC certificates.
    pub fn ca_key(&self) -> &[u8] {
        &self.ca_key
    }

    /// `msg` as a request carrying this cluster's bearer value.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.bearer)
                .parse()
                .expect("hex is ASCII"),
        );
        r
    }

    /// Whether a request carries this cluster's bearer value (compared in constant time).
    pub fn check(&self, meta: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let want = format!("Bearer {}", self.bearer);
        match meta.get("authorization").map(|v| v.as_bytes()) {
            Some(got)
                if got.len() == want.len()
                    && got
                        .iter()
                        .zip(want.bytes())
                        .fold(0u8, |a, (x, y)| a | (x ^ y))
                        == 0 =>
            {
                Ok(())
            }
            _ => Err(Status::unauthenticated("missing or wrong cluster token")),
        }
    }

    /// A channel to the gRPC server at `addr` (`host:port`, or a URL with `http://` or
    /// `https://`), over TLS 1.3 with this cluster's CA as the only root. `tune` sets the
    /// endpoint's options (windows, timeouts). Connects at once.
    pub async fn channel(
        &self,
        addr: &str,
        tune: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = tune(Endpoint::from_shared(plain_url(addr))?);
        endpoint.connect_with_connector(self.connector()).await
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Send
    + Clone
    + 'static {
        let tls = tokio_rustls::TlsConnector::from(self.client.clone());
        tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move {
                let authority = uri
                    .authority()
                    .ok_or_else(|| std::io::Error::other(format!("no address in {uri}")))?
                    .to_string();
                let tcp = TcpStream::connect(&authority).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
                let s = tls.connect(name, tcp).await.map_err(|e| {
                    // rustls's refusals (a certificate not from this cluster's CA) are
                    // InvalidData; anything else is the network's.
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        std::io::Error::new(
                            e.kind(),
                            Untrusted(format!(
                                "TLS with {authority}: its certificate is not this cluster's \
                                 (a server without this cluster's token, or something in \
                                 between): {e}"
                            )),
                        )
                    } else {
                        e
                    }
                })?;
                Ok(TokioIo::new(s))
            }
        })
    }

    /// TLS connections accepted on `listener`, each handshake in its own task (bounded by
    /// [`HANDSHAKE_TIMEOUT`]), so a slow or hostile client holds up no one: the incoming
    /// stream for `tonic`'s `serve_with_incoming`.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsIo, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: try again shortly.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let info = TcpConnectInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: Some(peer),
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send(Ok(TlsIo { s, info })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A server refused because its certificate is not from this cluster's CA.
#[derive(Debug)]
struct Untrusted(String);

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untrusted {}

fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Whether connecting failed because the server is not this cluster's (its certificate is
/// not from the CA of this process's secret): retrying will not help.
pub fn is_untrusted(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<Untrusted>())
    })
}

/// The error and its causes on one line (tonic's own message is a bare "transport error").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for (i, e) in chain(e).enumerate() {
        let msg = e.to_string();
        if i > 0 {
            if out.contains(&msg) {
                continue;
            }
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// `addr` as an `http://` URL: the TLS is the connector's, not tonic's.
fn plain_url(addr: &str) -> String {
    let bare = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr);
    format!("http://{bare}")
}

/// A fresh cluster secret: 32 random bytes, URL-safe.
pub fn fresh_secret() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness from the system".to_string())?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("tsr1-{hex}"))
}

/// An accepted TLS connection, as tonic's server takes it (with the TCP addresses, so that
/// `Request::remote_addr` works as over plain TCP).
pub struct TlsIo {
    s: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.s).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.s).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.s).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.s).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.s.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_secret_gives_the_same_ca_and_bearer_and_another_does_not() {
        let a = ClusterKeys::from_secret("s3cret").unwrap();
        let b = ClusterKeys::from_secret("s3cret").unwrap();
        let c = ClusterKeys::from_secret("s3cret!").unwrap();
        assert_eq!(a.ca_key(), b.ca_key());
        assert_eq!(a.bearer, b.bearer);
        assert_ne!(a.ca_key(), c.ca_key());
        assert_ne!(a.bearer, c.bearer);
        // The bearer value is no form of the secret.
        assert!(!a.bearer.contains("s3cret"));
        assert!(ClusterKeys::from_secret("").is_err());
        assert!(a.check(&tonic::metadata::MetadataMap::new()).is_err());
        let r = a.request(());
        assert!(b.check(r.metadata()).is_ok());
        assert!(c.check(r.metadata()).is_err());
    }
}
