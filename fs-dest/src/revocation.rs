//! Certificate revocation while serving: `fs-dest certs revoke` rewrites the CA's revocation
//! list (`TLS/ca.crl`); this task notices within a second, gives the endpoint a TLS
//! configuration with the new list (new handshakes with a revoked certificate fail) and closes
//! the open connection of every source whose certificate it now lists.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::engine::{lock, Engine};

/// How often the revocation list is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watch `tls_dir`'s revocation list until aborted.
pub async fn watch(engine: Arc<Engine>, endpoint: quinn::Endpoint, tls_dir: PathBuf) {
    let crl = crate::certs::crl_path(&tls_dir);
    let stamp = |p: &std::path::Path| -> Option<(SystemTime, u64)> {
        let md = std::fs::metadata(p).ok()?;
        Some((md.modified().ok()?, md.len()))
    };
    let mut seen = stamp(&crl);
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let now = stamp(&crl);
        if now == seen {
            continue;
        }
        seen = now;
        match crate::tls::server_config(&tls_dir) {
            Ok(cfg) => {
                endpoint.set_server_config(Some(cfg));
                tracing::info!(crl = %crl.display(), "revocation list reloaded");
            }
            Err(e) => {
                tracing::error!(crl = %crl.display(), error = %e,
                    "revocation list changed but cannot be loaded; keeping the previous TLS configuration");
                continue;
            }
        }
        let revoked = match crate::certs::revoked_serials(&tls_dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the revoked serial numbers");
                continue;
            }
        };
        for source in engine.sources() {
            let conn = lock(&source.connection).as_ref().map(|(_, c)| c.clone());
            let Some(conn) = conn else { continue };
            let serial = crate::tls::peer_serial(&conn);
            if serial.as_ref().is_some_and(|s| revoked.contains(s)) {
                tracing::warn!(source = %source.name, serial = ?serial,
                    "closing the connection of a source whose certificate was revoked");
                conn.close(
                    crate::close_code::REVOKED.into(),
                    b"the certificate of this source was revoked",
                );
            }
        }
    }
}
