//! The QUIC server endpoint with mutual TLS, and the identity of a connected source.
//!
//! rustls 0.23 with the ring provider, TLS 1.3 only (QUIC needs it), ALPN `nvmirror/1`.
//! Clients must present a certificate signed by `DIR/ca.pem`; the source's name is that
//! certificate's common name (or its first DNS name). The UDP socket is made with socket2 and
//! 4 MiB buffers (quinn does not enlarge them, and loopback drops packets without it).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::TlsError;

/// ALPN protocol identifier of this protocol version.
pub const ALPN: &[u8] = b"nvmirror/1";
/// Socket buffer size asked for (send and receive).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// The link's keep-alive and idle timeout, set once at start from the command line.
static TIMING: std::sync::OnceLock<proto::timing::LinkTiming> = std::sync::OnceLock::new();

/// Use `timing` for every connection from now on (called once, before the first one).
pub fn set_timing(timing: proto::timing::LinkTiming) {
    let _ = TIMING.set(timing);
}

fn timing() -> proto::timing::LinkTiming {
    TIMING.get().copied().unwrap_or_default()
}

/// The ring crypto provider, used explicitly so no process-wide default is needed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings: those both ends share ([`proto::transport::shared`]), plus the
/// destination's own: a small window until the Hello, and few streams.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = proto::transport::shared(timing());
    // Until its Hello is accepted a connection may send only this much (a flood of
    // handshakes must not make the destination buffer megabytes each); the session then
    // opens the window to [`RECEIVE_WINDOW`].
    t.receive_window(quinn::VarInt::from_u32(PRE_AUTH_RECEIVE_WINDOW));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// Receive window of a connection that has not said a valid Hello yet.
pub const PRE_AUTH_RECEIVE_WINDOW: u32 = 128 << 10;
/// Receive window of an accepted source's connection (bulk writes on one stream).
pub const RECEIVE_WINDOW: u32 = 32 << 20;

/// A UDP socket bound to `addr` with enlarged buffers.
pub fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, TlsError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TlsError::Socket { addr, source };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if let Err(e) = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = s.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    s.bind(&addr.into()).map_err(err)?;
    Ok(s.into())
}

/// Read every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    if !path.exists() {
        return Err(file_err("file not found".into()));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Read a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    if !path.exists() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            reason: "file not found".into(),
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: format!("bad PEM private key: {e}"),
    })
}

/// The rustls + quinn server configuration from `tls_dir` (ca.pem, dest.pem, dest.key).
pub fn server_config(tls_dir: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let ca_path = tls_dir.join("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&ca_path)? {
        roots.add(c).map_err(|e| TlsError::File {
            path: ca_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let provider = provider();
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    // Revoked source certificates (`certs revoke`): refused in the handshake.
    let crl_path = crate::certs::crl_path(tls_dir);
    if crl_path.exists() {
        let crls = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(&crl_path)
            .map_err(|e| TlsError::File {
                path: crl_path.clone(),
                reason: format!("cannot read the revocation list: {e}"),
            })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::File {
                path: crl_path.clone(),
                reason: format!("not a revocation list: {e}"),
            })?;
        builder = builder.with_crls(crls);
    }
    let verifier = builder.build().map_err(|e| TlsError::Verifier {
        path: ca_path.clone(),
        reason: e.to_string(),
    })?;
    let chain = load_certs(&tls_dir.join("dest.pem"))?;
    let key = load_key(&tls_dir.join("dest.key"))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Endpoint settings with a stateless-reset key derived from the destination's private key, so
/// it is the same after a restart: a source still talking to the previous process gets a
/// stateless reset at its next packet and reconnects at once, instead of waiting for the idle
/// timeout while its writes wait for acknowledgements.
fn endpoint_config(tls_dir: &Path) -> Result<quinn::EndpointConfig, TlsError> {
    let path = tls_dir.join("dest.key");
    let key = std::fs::read(&path).map_err(|e| TlsError::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"nvmirror stateless reset key v1\0");
    ctx.update(&key);
    let secret = ctx.finish();
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    let mut cfg = quinn::EndpointConfig::new(Arc::new(hmac));
    // Connection IDs are checked against a keyed hash before a reset is sent; the key must
    // survive restarts too.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&secret.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(cfg)
}

/// The server endpoint listening on `listen`. Must be called inside a tokio runtime.
pub fn server_endpoint(tls_dir: &Path, listen: SocketAddr) -> Result<quinn::Endpoint, TlsError> {
    let cfg = server_config(tls_dir)?;
    let socket = udp_socket(listen)?;
    quinn::Endpoint::new(
        endpoint_config(tls_dir)?,
        Some(cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TlsError::Socket {
        addr: listen,
        source,
    })
}

/// The source name a connection's client certificate proves: its common name, or its first
/// DNS subject alternative name when it has no common name.
pub fn peer_name(conn: &quinn::Connection) -> Result<String, TlsError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TlsError::Identity("no client certificate".into()))?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::Identity("unexpected identity type".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::Identity("empty certificate chain".into()))?;
    let name = name_of_cert(leaf)?;
    // Paths are built from this name (ROOT/NAME): the same rules as `certs issue`, whoever
    // signed the certificate.
    crate::certs::validate_name(&name).map_err(|e| TlsError::Identity(e.to_string()))?;
    Ok(name)
}

/// The serial number (hex) of a connection's client certificate, for revocation.
pub fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    crate::certs::serial_of_der(certs.first()?).ok()
}

/// The common name (or first DNS name) of a DER certificate.
pub fn name_of_cert(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Identity(format!("unparsable client certificate: {e}")))?;
    if let Some(cn) = cert.subject().iter_common_name().next() {
        return cn
            .as_str()
            .map(str::to_string)
            .map_err(|e| TlsError::Identity(format!("common name is not a string: {e}")));
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                return Ok(d.to_string());
            }
        }
    }
    Err(TlsError::Identity(
        "client certificate has neither a common name nor a DNS name".into(),
    ))
}
