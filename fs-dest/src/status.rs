//! `fs-dest status`: the running server answers on the Unix socket `ROOT/fs-dest.sock`
//! (one JSON request line `{"cmd":"status"}`, one JSON reply line); without a server, what
//! can be read from `ROOT` (per-source directories and journals) is shown instead.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::engine::{Engine, PartitionFill};
use crate::journal;

/// File name of the status socket inside ROOT.
pub const SOCKET_NAME: &str = "fs-dest.sock";

/// The socket path for `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(SOCKET_NAME)
}

/// One source's state. Sequence numbers are `null` when the server is not running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    /// Source name.
    pub name: String,
    /// A connection currently serves it.
    pub connected: bool,
    /// The source's address as the destination sees it now (it follows a migration or a NAT
    /// rebinding); absent when not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Its generation (fencing epoch).
    pub generation: Option<u64>,
    /// Highest sequence number held durably (NVRAM or journals).
    pub durable_seq: Option<u64>,
    /// Highest sequence number applied to the image.
    pub applied_seq: Option<u64>,
    /// Records received since the server started.
    pub records_received: u64,
    /// Bytes received since the server started.
    pub bytes_received: u64,
    /// CPs completed since the server started.
    pub cp_count: u64,
    /// Records that failed to apply since the server started.
    pub apply_errors: u64,
    /// Records CPs left out since the server started: files created and removed within one
    /// CP's window, which the image never had to hold.
    #[serde(default)]
    pub transient_records: u64,
    /// Bytes in its journal files.
    pub journal_bytes: u64,
    /// "in-sync", "out-of-sync" (some paths of the image differ from the source: records
    /// failed to apply; the source resends them) or "baseline" (the image does not yet hold
    /// the whole volume).
    pub sync: String,
    /// How many paths of the image are known to differ from the source.
    pub out_of_sync: u64,
    /// The first of them, with the error that made them differ.
    pub out_of_sync_paths: Vec<OutOfSyncPath>,
    /// Seconds since its last CP completed (absent before the first since the server started).
    #[serde(default)]
    pub last_cp_age_seconds: Option<f64>,
    /// How long that CP took.
    #[serde(default)]
    pub last_cp_seconds: Option<f64>,
    /// Seconds since its last record arrived.
    #[serde(default)]
    pub last_record_age_seconds: Option<f64>,
    /// Records and bytes accepted per second over the last 10 s.
    #[serde(default)]
    pub recent: proto::rate::Rates,
    /// Its image was promoted to a primary volume (ROOT/NAME/PROMOTED): the source is fenced.
    #[serde(default)]
    pub promoted: bool,
}

/// One path of an image that differs from its source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutOfSyncPath {
    /// The path (lossy UTF-8).
    pub path: String,
    /// The first record that failed for it.
    pub seq: u64,
    /// What failed.
    pub error: String,
}

/// Most out-of-sync paths a status report lists.
const LISTED_PATHS: usize = 20;

/// The sync state of an image from its state files.
fn sync_state(
    divergences: &crate::image_state::Divergences,
    baseline_needed: bool,
) -> (String, u64, Vec<OutOfSyncPath>) {
    let state = if baseline_needed {
        "baseline"
    } else if divergences.is_empty() {
        "in-sync"
    } else {
        "out-of-sync"
    };
    let listed = divergences
        .listed()
        .into_iter()
        .take(LISTED_PATHS)
        .map(|d| OutOfSyncPath {
            path: String::from_utf8_lossy(&d.path).into_owned(),
            seq: d.seq,
            error: d.error,
        })
        .collect();
    (state.to_string(), divergences.len() as u64, listed)
}

/// NVLOG fill.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct NvlogStatus {
    /// One entry per partition.
    pub partitions: Vec<PartitionFill>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Whether a server answered.
    pub running: bool,
    /// The address it listens on ("" when not running).
    pub listen: String,
    /// Every known source.
    pub sources: Vec<SourceStatus>,
    /// The destination NVLOG (empty when not running).
    pub nvlog: NvlogStatus,
    /// The server's version ("" when not running).
    #[serde(default)]
    pub version: String,
    /// Seconds since the server started (absent when not running).
    #[serde(default)]
    pub uptime_seconds: Option<f64>,
    /// The server's resident memory (absent when not running or /proc does not tell).
    #[serde(default)]
    pub memory: Option<proto::memory::Resident>,
}

/// A report of the running engine.
pub fn snapshot(engine: &Engine) -> StatusReport {
    let sources = engine
        .sources()
        .iter()
        .map(|s| {
            let (sync, out_of_sync, out_of_sync_paths) = sync_state(
                &crate::engine::lock(&s.divergences),
                s.baseline_needed.load(Ordering::Relaxed),
            );
            // Each lock on its own statement: a guard lives to the end of its statement.
            let last_cp = *crate::engine::lock(&s.stats.last_cp);
            let last_record = *crate::engine::lock(&s.stats.last_record_at);
            let recent = crate::engine::lock(&s.stats.recent).rates(crate::engine::now_secs());
            SourceStatus {
                sync,
                out_of_sync,
                out_of_sync_paths,
                name: s.name.clone(),
                connected: s.connected(),
                peer_address: crate::engine::lock(&s.connection)
                    .as_ref()
                    .map(|(_, c)| c.remote_address().to_string()),
                generation: Some(s.generation.load(Ordering::Relaxed)),
                durable_seq: Some(s.accepted_seq.load(Ordering::Relaxed)),
                applied_seq: Some(s.applied_seq.load(Ordering::Relaxed)),
                records_received: s.stats.records_received.load(Ordering::Relaxed),
                bytes_received: s.stats.bytes_received.load(Ordering::Relaxed),
                cp_count: s.stats.cp_count.load(Ordering::Relaxed),
                apply_errors: s.stats.apply_errors.load(Ordering::Relaxed),
                transient_records: s.stats.transient_records.load(Ordering::Relaxed),
                journal_bytes: s.journal_bytes(),
                last_cp_age_seconds: last_cp.map(|(at, _)| at.elapsed().as_secs_f64()),
                last_cp_seconds: last_cp.map(|(_, took)| took.as_secs_f64()),
                last_record_age_seconds: last_record.map(|at| at.elapsed().as_secs_f64()),
                recent,
                promoted: crate::promote::marker_path(&engine.root, &s.name).exists(),
            }
        })
        .collect();
    StatusReport {
        running: true,
        listen: crate::engine::lock(&engine.listen).clone(),
        sources,
        nvlog: NvlogStatus {
            partitions: engine.partition_fill(),
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: Some(engine.started.elapsed().as_secs_f64()),
        memory: proto::memory::resident(),
    }
}

/// What can be learnt from ROOT alone: the sources' directories and journal sizes.
pub fn offline(root: &Path) -> StatusReport {
    let mut sources = Vec::new();
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let dir = e.path();
            if !dir.join("image").is_dir() && !dir.join("journal").is_dir() {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let mut journal_bytes = 0;
            if let Ok(js) = std::fs::read_dir(dir.join("journal")) {
                for j in js.flatten() {
                    let is_journal = j
                        .file_name()
                        .to_str()
                        .and_then(journal::partition_of_file_name)
                        .is_some();
                    if is_journal {
                        journal_bytes += j.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
            }
            let divergences = crate::image_state::Divergences::load(&dir).unwrap_or_default();
            let baseline_needed = crate::image_state::read_volume(&dir)
                .ok()
                .flatten()
                .is_some_and(|r| !r.baseline_complete);
            let (sync, out_of_sync, out_of_sync_paths) = sync_state(&divergences, baseline_needed);
            let promoted = crate::promote::marker_path(root, &name).exists();
            sources.push(SourceStatus {
                sync,
                out_of_sync,
                out_of_sync_paths,
                name,
                connected: false,
                peer_address: None,
                generation: None,
                durable_seq: None,
                applied_seq: None,
                records_received: 0,
                bytes_received: 0,
                cp_count: 0,
                apply_errors: 0,
                transient_records: 0,
                journal_bytes,
                last_cp_age_seconds: None,
                last_cp_seconds: None,
                last_record_age_seconds: None,
                recent: proto::rate::Rates::default(),
                promoted,
            });
        }
    }
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    StatusReport {
        running: false,
        listen: String::new(),
        sources,
        nvlog: NvlogStatus::default(),
        version: String::new(),
        uptime_seconds: None,
        memory: None,
    }
}

/// Why the running server could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Talking to the socket failed.
    #[error("status socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The reply was not a status report.
    #[error("status socket {path}: unreadable reply: {reason}")]
    Reply {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The socket, its directory or the process serving it is not root's or the caller's, so
    /// its answers cannot be trusted.
    #[error("not using the status socket: {0}")]
    Untrusted(proto::peer::AccessError),
    /// The caller may not reach the socket (another user than root or the server's).
    #[error(
        "cannot reach the status socket: {0} (it is reachable by root and the server's user only)"
    )]
    Denied(proto::peer::AccessError),
    /// The server refused this caller.
    #[error("status socket {path}: the server refused the request: {reason}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// What the server said.
        reason: String,
    },
}

/// Connect to the server's socket at `path` if one serves there and it, its directory and the
/// process behind it are root's or the caller's; `Ok(None)` when no server listens.
fn connect(path: &Path) -> Result<Option<UnixStream>, StatusError> {
    match proto::peer::check_socket(path) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) if e.is_permission_denied() => return Err(StatusError::Denied(e)),
        Err(e) => return Err(StatusError::Untrusted(e)),
    }
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(StatusError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    proto::peer::check_server(&stream, path).map_err(StatusError::Untrusted)?;
    Ok(Some(stream))
}

/// A refusal line from [`serve_socket`], as an error.
fn refusal(path: &Path, v: &serde_json::Value) -> Option<StatusError> {
    (v.get("refused").and_then(|r| r.as_bool()) == Some(true)).then(|| StatusError::Refused {
        path: path.to_path_buf(),
        reason: v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given")
            .to_string(),
    })
}

/// Ask the server running on `root`; `Ok(None)` when no server listens.
pub fn query(root: &Path) -> Result<Option<StatusReport>, StatusError> {
    let path = socket_path(root);
    let io = |source| StatusError::Io {
        path: path.clone(),
        source,
    };
    let Some(mut stream) = connect(&path)? else {
        return Ok(None);
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    stream.write_all(b"{\"cmd\":\"status\"}\n").map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    let reply = |e: serde_json::Error| StatusError::Reply {
        path: path.clone(),
        reason: e.to_string(),
    };
    let v: serde_json::Value = serde_json::from_str(&line).map_err(reply)?;
    if let Some(e) = refusal(&path, &v) {
        return Err(e);
    }
    serde_json::from_value(v).map(Some).map_err(reply)
}

/// What the server answered to a promote/demote request.
#[derive(Debug)]
pub enum RoleReply {
    /// No server listens on this root.
    NoServer,
    /// The command was carried out.
    Done(crate::promote::Outcome),
    /// The server refused or failed; its message.
    Failed(String),
}

/// Ask the server running on `root` to promote or demote `source` (`cmd` is `"promote"` or
/// `"demote"`), calling `progress` for each progress line.
pub fn role_request(
    root: &Path,
    cmd: &str,
    source: &str,
    force: bool,
    mut progress: impl FnMut(crate::promote::Progress),
) -> Result<RoleReply, StatusError> {
    let path = socket_path(root);
    let io = |source| StatusError::Io {
        path: path.clone(),
        source,
    };
    let Some(mut stream) = connect(&path)? else {
        return Ok(RoleReply::NoServer);
    };
    let mut req = serde_json::json!({ "cmd": cmd, "source": source, "force": force }).to_string();
    req.push('\n');
    stream.write_all(req.as_bytes()).map_err(io)?;
    // No read timeout: applying a large backlog takes as long as it takes; progress lines
    // show it is alive.
    let reader = BufReader::new(&stream);
    for line in reader.lines() {
        let line = line.map_err(io)?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| StatusError::Reply {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(e) = refusal(&path, &v) {
            return Err(e);
        }
        if let Some(p) = v.get("progress") {
            if let Ok(p) = serde_json::from_value(p.clone()) {
                progress(p);
            }
            continue;
        }
        if let Some(o) = v.get("ok") {
            return serde_json::from_value(o.clone())
                .map(RoleReply::Done)
                .map_err(|e| StatusError::Reply {
                    path: path.clone(),
                    reason: e.to_string(),
                });
        }
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("unreadable reply");
        return Ok(RoleReply::Failed(msg.to_string()));
    }
    Err(StatusError::Reply {
        path: path.clone(),
        reason: "the server closed the socket without an answer".into(),
    })
}

/// `3d 4h`, `2h 5m`, `7m 3s`, `12 s`.
fn uptime(secs: f64) -> String {
    let t = secs as u64;
    match t {
        0..=59 => format!("{t} s"),
        60..=3599 => format!("{}m {}s", t / 60, t % 60),
        3600..=86_399 => format!("{}h {}m", t / 3600, t % 3600 / 60),
        _ => format!("{}d {}h", t / 86_400, t % 86_400 / 3600),
    }
}

/// A readable table.
pub fn render(r: &StatusReport) -> String {
    let mut s = String::new();
    if r.running {
        s.push_str(&format!(
            "fs-dest {}: running for {}, listening on {}\n",
            r.version,
            uptime(r.uptime_seconds.unwrap_or(0.0)),
            r.listen
        ));
        if let Some(m) = &r.memory {
            s.push_str(&format!("memory: {m}; NVRAM and journal pages included\n"));
        }
    } else {
        s.push_str("fs-dest: the server is not running (showing what is on disk)\n");
    }
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    s.push_str(&format!(
        "{:<20} {:<9} {:<16} {:>5} {:>10} {:>10} {:>10} {:>12} {:>6} {:>6} {:>12}\n",
        "SOURCE",
        "LINK",
        "SYNC",
        "GEN",
        "DURABLE",
        "APPLIED",
        "RECORDS",
        "BYTES",
        "CPS",
        "ERRS",
        "JOURNAL"
    ));
    for x in &r.sources {
        let sync = if x.out_of_sync > 0 {
            format!("out-of-sync({})", x.out_of_sync)
        } else {
            x.sync.clone()
        };
        s.push_str(&format!(
            "{:<20} {:<9} {:<16} {:>5} {:>10} {:>10} {:>10} {:>12} {:>6} {:>6} {:>12}\n",
            x.name,
            if x.connected { "connected" } else { "-" },
            sync,
            opt(x.generation),
            opt(x.durable_seq),
            opt(x.applied_seq),
            x.records_received,
            x.bytes_received,
            x.cp_count,
            x.apply_errors,
            x.journal_bytes
        ));
    }
    for x in &r.sources {
        if let Some(a) = &x.peer_address {
            s.push_str(&format!("{}: connected from {a}\n", x.name));
        }
        if x.promoted {
            s.push_str(&format!(
                "{}: PROMOTED: the image is a primary volume; the old source is fenced\n",
                x.name
            ));
        }
        if r.running {
            let age = |v: Option<f64>| v.map_or("never".to_string(), |a| format!("{a:.1} s ago"));
            s.push_str(&format!(
                "{}: {:.1} records/s, {:.2} MiB/s (last 10 s); last record {}; last CP {}{}\n",
                x.name,
                x.recent.records_per_second,
                x.recent.bytes_per_second / (1024.0 * 1024.0),
                age(x.last_record_age_seconds),
                age(x.last_cp_age_seconds),
                x.last_cp_seconds
                    .map_or(String::new(), |t| format!(" (took {t:.2} s)"))
            ));
        }
        for p in &x.out_of_sync_paths {
            s.push_str(&format!(
                "{}: OUT OF SYNC {} (record {}: {})\n",
                x.name, p.path, p.seq, p.error
            ));
        }
        if x.out_of_sync > x.out_of_sync_paths.len() as u64 {
            s.push_str(&format!(
                "{}: ... and {} more path(s) out of sync\n",
                x.name,
                x.out_of_sync - x.out_of_sync_paths.len() as u64
            ));
        }
    }
    if !r.nvlog.partitions.is_empty() {
        s.push_str("NVLOG partitions:\n");
        for p in &r.nvlog.partitions {
            s.push_str(&format!(
                "  {:>2}: {:>12} / {:>12} bytes, {} records\n",
                p.index, p.used_bytes, p.capacity_bytes, p.records
            ));
        }
    }
    s
}

/// Serve status requests on `path` until the task is dropped. Only root and the server's own
/// user are served; anyone else gets one JSON line saying why (see [`refuse`]).
pub async fn serve_socket(engine: Arc<Engine>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if let Err(why) = proto::peer::admit(&stream) {
            match &why {
                proto::peer::Refusal::Stranger { peer, .. } => tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "status socket: refused a connection from uid {} (pid {}): only root and \
                     the server's own user may use it",
                    peer.uid,
                    peer.pid
                ),
                proto::peer::Refusal::Unknown(e) => {
                    tracing::warn!("status socket: refused a connection: {e}")
                }
            }
            tokio::spawn(refuse(stream, why.to_string()));
            continue;
        }
        let engine = engine.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let request = serde_json::from_str::<serde_json::Value>(&line).ok();
                let cmd = request
                    .as_ref()
                    .and_then(|v| v.get("cmd"))
                    .and_then(|c| c.as_str())
                    .unwrap_or("");
                let reply = match cmd {
                    "status" => serde_json::to_string(&snapshot(&engine)),
                    "promote" | "demote" => {
                        let name = request
                            .as_ref()
                            .and_then(|v| v.get("source"))
                            .and_then(|c| c.as_str())
                            .unwrap_or("")
                            .to_string();
                        let result = if cmd == "promote" {
                            // Progress lines go out while the records are applied.
                            let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
                            let force = request
                                .as_ref()
                                .and_then(|v| v.get("force"))
                                .and_then(|c| c.as_bool())
                                .unwrap_or(false);
                            let work = crate::promote::promote(&engine, &name, force, move |p| {
                                let _ = ptx.send(p);
                            });
                            tokio::pin!(work);
                            loop {
                                tokio::select! {
                                    r = &mut work => break r,
                                    Some(p) = prx.recv() => {
                                        let mut l = serde_json::json!({ "progress": p }).to_string();
                                        l.push('\n');
                                        // A client that went away does not stop the promotion.
                                        let _ = wr.write_all(l.as_bytes()).await;
                                    }
                                }
                            }
                        } else {
                            crate::promote::demote(&engine, &name).await
                        };
                        match result {
                            Ok(o) => serde_json::to_string(&serde_json::json!({ "ok": o })),
                            Err(e) => serde_json::to_string(
                                &serde_json::json!({ "error": e.to_string() }),
                            ),
                        }
                    }
                    _ => serde_json::to_string(&serde_json::json!({
                        "error": "unknown request; send {\"cmd\":\"status\"}, {\"cmd\":\"promote\",\"source\":NAME} or {\"cmd\":\"demote\",\"source\":NAME}"
                    })),
                };
                let Ok(mut reply) = reply else { return };
                reply.push('\n');
                if wr.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Answer a client that may not use the socket: its request line is read first (at most
/// 4 KiB, for at most 5 s) so that closing does not reset the connection before the client
/// reads the answer, then one line `{"refused":true,"error":...}`.
async fn refuse(stream: tokio::net::UnixStream, why: String) {
    use tokio::io::AsyncReadExt as _;
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::BufReader::new(rd.take(4096)).read_line(&mut line),
    )
    .await;
    let reply = serde_json::json!({ "refused": true, "error": why });
    let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
}
