//! The HTTP side of both daemons' opt-in Prometheus endpoints (`--metrics-listen ADDR`):
//! plain HTTP `GET /metrics` answered with a registry in the OpenMetrics text format.
//!
//! Deliberately tiny: one task per connection, a bounded request head, a deadline per
//! connection and a cap on connections served at once, so a slow or hostile client cannot hold
//! the endpoint (or the runtime it shares with the link) for long. The request parsing is
//! sans-IO ([`head_end`], [`parse`]); [`serve`] is the tokio loop around it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head read (request line and headers).
const MAX_REQUEST: usize = 8 << 10;
/// How long one connection may take, from accept to the last byte of the answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 32;

/// Listen on `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: do not spin.
                tracing::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint: too many connections; closing one");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_DEADLINE, handle(stream, &registry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "metrics connection: {e}"),
                Err(_) => tracing::debug!(%peer, "metrics connection: timed out"),
            }
            drop(permit);
        });
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (`head`: `HEAD /metrics`).
    Metrics {
        /// No body wanted.
        head: bool,
    },
    /// An answer without metrics: status line and a short text.
    Error(&'static str, &'static str),
}

/// Read a request head: `None` when the client sent nothing at all.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok((!buf.is_empty()).then_some(Err(())));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(Ok(buf)));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(Some(Err(())));
        }
    }
}

/// Where the head ends (after its blank line), if it does in `buf`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Decide what a request head asks for.
pub fn parse(head: &[u8]) -> Request {
    const BAD: Request = Request::Error("400 Bad Request", "bad request\n");
    let Ok(text) = std::str::from_utf8(head) else {
        return BAD;
    };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return BAD;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return BAD;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Request::Metrics { head: false },
        ("HEAD", "/metrics") => Request::Metrics { head: true },
        (_, "/metrics") => Request::Error(
            "405 Method Not Allowed",
            "only GET and HEAD are served here\n",
        ),
        _ => Request::Error("404 Not Found", "not found: metrics are at /metrics\n"),
    }
}

/// Answer one connection.
async fn handle(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let request = match read_head(&mut stream).await? {
        None => return Ok(()),
        Some(Ok(head)) => parse(&head),
        Some(Err(())) => Request::Error("400 Bad Request", "bad request\n"),
    };
    let (status, content_type, body, head) = match request {
        Request::Metrics { head } => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, body, head),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain; charset=utf-8",
                    "cannot encode the metrics\n".to_string(),
                    head,
                ),
            }
        }
        Request::Error(status, text) => {
            (status, "text/plain; charset=utf-8", text.to_string(), false)
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { head: true }
        );
        assert!(
            matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Request::Error(s, _) if s.starts_with("404"))
        );
        assert!(
            matches!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Request::Error(s, _) if s.starts_with("405"))
        );
        for bad in [
            &b"\x00\xff garbage\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"",
        ] {
            assert!(
                matches!(parse(bad), Request::Error(s, _) if s.starts_with("400")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
