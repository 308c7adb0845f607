//! The QUIC client endpoint with mutual TLS, used to reach `fs-dest`.
//!
//! Loads `DIR/ca.pem` (the CA that signed the destination's certificate), `DIR/NAME.pem` and
//! `DIR/NAME.key` (this source's client certificate, made with `fs-dest certs issue`). The
//! destination is verified under the name it is reached by (`--dest`'s host or `--dest-name`), with ALPN `nvmirror/1`, TLS 1.3 and
//! the ring provider. The UDP socket gets 4 MiB buffers (quinn does not enlarge them).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

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

/// Why the client endpoint could not be built.
#[derive(Debug, Error)]
pub enum ClientTlsError {
    /// A certificate or key file is missing or bad.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS client configuration from {dir}: {source}")]
    Rustls {
        /// The TLS directory.
        dir: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The rustls configuration is not usable for QUIC.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    /// The UDP socket could not be made.
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The local address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Transport settings: those both ends share ([`proto::transport::shared`]: the idle timeout
/// and keep-alive of [`set_timing`], default 2 s and 0.5 s, so a dead link or peer is noticed
/// within 3 s), plus a connection window large enough for bulk writes on one stream.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = proto::transport::shared(timing());
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t
}

fn file_err(path: &Path, reason: impl Into<String>) -> ClientTlsError {
    ClientTlsError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    if !path.exists() {
        return Err(file_err(path, "file not found"));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClientTlsError> {
    if !path.exists() {
        return Err(file_err(path, "file not found"));
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("bad PEM private key: {e}")))
}

/// The quinn client configuration for source `name` from the files in `tls_dir`.
pub fn client_config(tls_dir: &Path, name: &str) -> Result<quinn::ClientConfig, ClientTlsError> {
    let ca_path = tls_dir.join("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&ca_path)? {
        roots
            .add(c)
            .map_err(|e| file_err(&ca_path, format!("not a usable CA certificate: {e}")))?;
    }
    let cert_path = tls_dir.join(format!("{name}.pem"));
    let chain = load_certs(&cert_path)?;
    if let Some(leaf) = chain.first() {
        check_validity(&cert_path, leaf, name)?;
    }
    let key = load_key(&tls_dir.join(format!("{name}.key")))?;
    let rustls_err = |source| ClientTlsError::Rustls {
        dir: tls_dir.to_path_buf(),
        source,
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(rustls_err)?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(rustls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientTlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Refuse our own certificate when it has expired or is not valid yet, saying so (the
/// destination would only answer with a TLS alert).
fn check_validity(path: &Path, der: &[u8], name: &str) -> Result<(), ClientTlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| file_err(path, format!("unparsable certificate: {e}")))?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > v.not_after {
        return Err(file_err(
            path,
            format!(
                "this certificate expired on {} (renew it on the destination with `fs-dest certs \
                 renew --name {name}` and copy the new {name}.pem and {name}.key here)",
                v.not_after
            ),
        ));
    }
    if now < v.not_before {
        return Err(file_err(
            path,
            format!(
                "this certificate is not valid before {} (is this machine's clock right?)",
                v.not_before
            ),
        ));
    }
    Ok(())
}

/// A UDP socket bound to `addr` with enlarged buffers.
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, ClientTlsError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| ClientTlsError::Socket { addr, source };
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

/// A client endpoint for source `name`, bound to an ephemeral port of the same address family
/// as `dest`, with its default client configuration set. Connect with
/// `endpoint.connect(dest, server_name)`. Must be called inside a tokio runtime.
pub fn client_endpoint(
    tls_dir: &Path,
    name: &str,
    dest: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), ClientTlsError> {
    let cfg = client_config(tls_dir, name)?;
    let local: SocketAddr = match dest {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = udp_socket(local)?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| ClientTlsError::Socket {
        addr: local,
        source,
    })?;
    endpoint.set_default_client_config(cfg.clone());
    Ok((endpoint, cfg))
}
