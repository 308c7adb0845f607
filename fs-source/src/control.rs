//! The control socket of a mounted source: `fs-source cp` and `fs-source status` talk to the
//! running daemon through a Unix socket named after the mountpoint, one JSON line each way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::mirror::{CpCommand, Mirror, Policy};

/// Where control sockets live: `$NVMIRROR_RUN_DIR`, else `/run/nvmirror`.
pub fn run_dir() -> PathBuf {
    std::env::var_os("NVMIRROR_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/nvmirror"))
}

/// The socket path for a mountpoint (named by a hash of its canonical path, to stay within the
/// 108-byte limit of Unix socket paths).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    run_dir().join(format!("source-{h:016x}.sock"))
}

/// One partition's fill, as status reports it.
#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    /// Index.
    pub index: usize,
    /// Bytes of records.
    pub used_bytes: usize,
    /// Capacity in bytes.
    pub capacity_bytes: usize,
    /// Number of records.
    pub records: u64,
}

/// What `fs-source status --json` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Source name.
    pub name: String,
    /// Mountpoint.
    pub mountpoint: String,
    /// Destination address.
    pub dest: String,
    /// Mirror policy.
    pub policy: Policy,
    /// Generation of the volume (raised by promotions and failbacks).
    pub generation: u64,
    /// Highest sequence number logged (and applied locally).
    pub last_logged_seq: u64,
    /// Highest sequence number flushed in local NVRAM.
    pub last_flushed_seq: u64,
    /// Highest sequence number acknowledged by the destination.
    pub last_acked_seq: u64,
    /// Highest sequence number applied to the destination's image.
    pub last_applied_seq: u64,
    /// Records logged but not yet acknowledged.
    pub lag_records: u64,
    /// Seconds the oldest unacknowledged record has waited (0 when in sync).
    pub lag_seconds: f64,
    /// Seconds since the destination last acknowledged a record (none yet: null).
    pub last_ack_age_seconds: Option<f64>,
    /// Seconds since the last CP completed (none yet: null).
    pub last_cp_age_seconds: Option<f64>,
    /// How long the last CP took, in seconds.
    pub last_cp_seconds: Option<f64>,
    /// This daemon's version.
    pub version: &'static str,
    /// Seconds since this daemon started.
    pub uptime_seconds: f64,
    /// Records moved to the backlog file while the destination was away.
    pub backlog_records: u64,
    /// Bytes in the backlog file.
    pub backlog_bytes: u64,
    /// Completed consistency points.
    pub cp_count: u64,
    /// "up", "down", or "none" (unmirrored).
    pub link: &'static str,
    /// Policy sync: running alone until the destination catches up.
    pub degraded: bool,
    /// Set when the destination refused this source.
    pub stopped: Option<String>,
    /// Records acknowledged since start.
    pub records_mirrored: u64,
    /// Bytes acknowledged since start.
    pub bytes_mirrored: u64,
    /// Records and bytes acknowledged per second over the last 10 s.
    pub recent: proto::rate::Rates,
    /// The asynchronous second leg (`--async-dest`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_leg: Option<AsyncLegStatus>,
    /// While records wait for the destination (catching up after a link loss): seconds until
    /// they are all acknowledged at the recent rate; absent when nothing waits or nothing moves.
    pub catch_up_eta_seconds: Option<f64>,
    /// NVLOG partitions.
    pub partitions: Vec<PartitionStatus>,
    /// "in-sync", "out-of-sync" (paths of the image differ: records failed to apply; they are
    /// being resent), "resyncing" (paths are being resent), "baseline" (the image does not
    /// hold the whole volume yet) or "none" (unmirrored).
    pub sync: &'static str,
    /// How many paths of the image are known to differ from this volume.
    pub out_of_sync: u64,
    /// Paths being resent (or queued) to the image.
    pub resync_pending: u64,
    /// The first of them, with the error that made them differ.
    pub out_of_sync_paths: Vec<OutOfSyncPath>,
    /// The initial transfer of the volume.
    pub baseline: crate::mirror::BaselineProgress,
    /// Inodes the daemon tracks: those the kernel still references (dropped on FORGET) and
    /// open files; absent until the volume serves.
    pub inodes: Option<u64>,
    /// The daemon's resident memory (now, at its peak, and the heap alone), when /proc tells;
    /// the first two include the NVRAM pages this process touched.
    pub memory: Option<proto::memory::Resident>,
}

/// One path of the image that differs from the volume.
#[derive(Debug, Serialize)]
pub struct OutOfSyncPath {
    /// The path (lossy UTF-8).
    pub path: String,
    /// The first record that failed for it.
    pub seq: u64,
    /// What failed.
    pub error: String,
}

/// Identity facts for status.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Source name.
    pub name: String,
    /// Mountpoint.
    pub mountpoint: String,
    /// Destination.
    pub dest: String,
    /// Policy.
    pub policy: Policy,
    /// When the daemon started.
    pub started: std::time::Instant,
}

/// Build the status report.
pub fn status(mirror: &Mirror, id: &Identity) -> Status {
    let partitions = mirror
        .partitions()
        .into_iter()
        .map(
            |(index, used_bytes, capacity_bytes, records)| PartitionStatus {
                index,
                used_bytes,
                capacity_bytes,
                records,
            },
        )
        .collect();
    let (backlog_records, backlog_bytes) = mirror.backlog_size();
    // Taken before the progress lock: the sequencer lock is always taken first.
    let generation = mirror.generation();
    let standalone = mirror.standalone();
    let async_leg = async_leg_status(mirror, mirror.progress(|p| p.logged));
    mirror.progress(|p| {
        let lag_records = if standalone {
            0
        } else {
            p.logged.saturating_sub(p.acked)
        };
        let recent = p.recent.rates(crate::mirror::now_secs());
        Status {
            name: id.name.clone(),
            mountpoint: id.mountpoint.clone(),
            dest: id.dest.clone(),
            policy: id.policy,
            generation,
            last_logged_seq: p.logged,
            last_flushed_seq: p.flushed,
            last_acked_seq: p.acked,
            last_applied_seq: p.applied_remote,
            lag_records,
            lag_seconds: if p.acked < p.logged && !standalone {
                p.lagging_since
                    .map(|t| t.elapsed().as_secs_f64())
                    .unwrap_or(0.0)
            } else {
                0.0
            },
            last_ack_age_seconds: p.last_ack_at.map(|t| t.elapsed().as_secs_f64()),
            last_cp_age_seconds: p.last_cp.map(|(t, _)| t.elapsed().as_secs_f64()),
            last_cp_seconds: p.last_cp.map(|(_, d)| d.as_secs_f64()),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: id.started.elapsed().as_secs_f64(),
            backlog_records,
            backlog_bytes,
            cp_count: p.cp_count,
            link: if standalone {
                "none"
            } else if p.link_up {
                "up"
            } else {
                "down"
            },
            degraded: p.degraded,
            stopped: p.stopped.clone(),
            records_mirrored: p.records_mirrored,
            bytes_mirrored: p.bytes_mirrored,
            recent,
            async_leg,
            catch_up_eta_seconds: (lag_records > 0 && recent.records_per_second > 0.0)
                .then(|| lag_records as f64 / recent.records_per_second),
            partitions,
            sync: if standalone {
                "none"
            } else if p.baseline.incomplete() {
                "baseline"
            } else if p.out_of_sync_total > 0 {
                "out-of-sync"
            } else if p.resync_pending > 0 {
                "resyncing"
            } else {
                "in-sync"
            },
            resync_pending: p.resync_pending,
            out_of_sync: p.out_of_sync_total,
            out_of_sync_paths: p
                .out_of_sync
                .iter()
                .take(20)
                .map(|d| OutOfSyncPath {
                    path: String::from_utf8_lossy(&d.path).into_owned(),
                    seq: d.seq,
                    error: d.error.clone(),
                })
                .collect(),
            baseline: p.baseline.clone(),
            inodes: None,
            memory: proto::memory::resident(),
        }
    })
}

/// The asynchronous leg in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct AsyncLegStatus {
    /// The second destination.
    pub dest: String,
    /// "up", "down" or "stopped".
    pub link: &'static str,
    /// Highest record it acknowledged.
    pub acked_seq: u64,
    /// Highest record applied to its image.
    pub applied_seq: u64,
    /// Records logged that it has not acknowledged.
    pub lag_records: u64,
    /// Since when the oldest of them waits, seconds.
    pub lag_seconds: f64,
    /// Seconds since it last acknowledged something.
    pub last_ack_age_seconds: Option<f64>,
    /// Records kept for it in the spill file (freed from NVRAM, not acknowledged).
    pub spill_records: u64,
    /// Their bytes.
    pub spill_bytes: u64,
    /// Why it stopped for good, if it did.
    pub stopped: Option<String>,
}

fn async_leg_status(mirror: &Mirror, logged: u64) -> Option<AsyncLegStatus> {
    let leg = mirror.async_leg()?;
    let (lag_records, lag_seconds) = leg.lag(logged);
    let (spill_records, spill_bytes) = {
        let s = leg.spill.lock().unwrap_or_else(|p| p.into_inner());
        (s.records, s.bytes)
    };
    let p = leg
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Some(AsyncLegStatus {
        dest: p.dest,
        link: if p.stopped.is_some() {
            "stopped"
        } else if p.link_up {
            "up"
        } else {
            "down"
        },
        acked_seq: p.acked,
        applied_seq: p.applied,
        lag_records,
        lag_seconds,
        last_ack_age_seconds: p.last_ack_at.map(|t| t.elapsed().as_secs_f64()),
        spill_records,
        spill_bytes,
        stopped: p.stopped,
    })
}

/// What `verify` needs, set once the volume serves.
pub struct VerifyContext {
    /// The volume.
    pub volume: Arc<crate::volume::Volume>,
    /// The link to the destination.
    pub link: Arc<crate::link::LinkShared>,
    /// The network runtime (listings are awaited on it).
    pub rt: tokio::runtime::Handle,
    /// A verify is running (one at a time).
    pub running: std::sync::atomic::AtomicBool,
}

/// Set once the volume serves.
pub type VerifySlot = Arc<std::sync::OnceLock<Arc<VerifyContext>>>;

/// The volume, set once it serves (status reports how many inodes it tracks).
pub type VolumeSlot = Arc<std::sync::OnceLock<Arc<crate::volume::Volume>>>;

/// Serve the control socket until the task is dropped. Only root and the daemon's own user
/// are served; anyone else gets one JSON line saying why (see [`refuse`]).
pub async fn serve(
    listener: UnixListener,
    mirror: Arc<Mirror>,
    id: Identity,
    verify: VerifySlot,
    volume: VolumeSlot,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if let Err(why) = proto::peer::admit(&stream) {
            match &why {
                proto::peer::Refusal::Stranger { peer, .. } => tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control socket: refused a connection from uid {} (pid {}): only root and \
                     the daemon's own user may drive fs-source",
                    peer.uid,
                    peer.pid
                ),
                proto::peer::Refusal::Unknown(e) => {
                    tracing::warn!("control socket: refused a connection: {e}")
                }
            }
            tokio::spawn(refuse(stream, why.to_string()));
            continue;
        }
        let mirror = mirror.clone();
        let id = id.clone();
        let (verify, volume) = (verify.clone(), volume.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &mirror, &id, &verify, &volume).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

/// Run a verify for a control client: progress lines, then the report.
async fn verify(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    slot: &VerifySlot,
    req: &serde_json::Value,
) -> std::io::Result<serde_json::Value> {
    let Some(ctx) = slot.get().cloned() else {
        return Ok(serde_json::json!({"ok": false, "error": "the volume is not serving yet"}));
    };
    if ctx.running.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return Ok(
            serde_json::json!({"ok": false, "error": "a verify of this volume is already running"}),
        );
    }
    let options = crate::verify::VerifyOptions {
        repair: req.get("repair").and_then(|v| v.as_bool()).unwrap_or(false),
        rate_bytes_per_sec: req
            .get("rate_mib")
            .and_then(|v| v.as_f64())
            .map(|m| m * (1 << 20) as f64),
    };
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
    let (dtx, mut drx) = tokio::sync::oneshot::channel();
    let worker = ctx.clone();
    std::thread::Builder::new()
        .name("nvmirror-verify".into())
        .spawn(move || {
            let r = crate::verify::run(
                &worker.volume,
                &worker.link,
                &worker.rt,
                options,
                &mut |p| {
                    let _ = ptx.send(p.clone());
                },
            );
            worker
                .running
                .store(false, std::sync::atomic::Ordering::Release);
            let _ = dtx.send(r);
        })?;
    loop {
        tokio::select! {
            Some(p) = prx.recv() => {
                let line = serde_json::json!({ "progress": p });
                // A client that went away does not stop the verify.
                let _ = w.write_all(format!("{line}\n").as_bytes()).await;
            }
            r = &mut drx => {
                return Ok(match r {
                    Ok(Ok(report)) => serde_json::json!({"ok": true, "report": report}),
                    Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
                    Err(_) => serde_json::json!({"ok": false, "error": "the verify thread stopped"}),
                });
            }
        }
    }
}

/// Answer a client that may not use the socket: its request line is read first (at most
/// 4 KiB, for at most 5 s) so that closing does not reset the connection before the client
/// reads the answer, then one line `{"ok":false,"refused":true,"error":...}`.
async fn refuse(stream: UnixStream, why: String) {
    use tokio::io::AsyncReadExt as _;
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        BufReader::new(r.take(4096)).read_line(&mut line),
    )
    .await;
    let reply = serde_json::json!({"ok": false, "refused": true, "error": why});
    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
}

async fn handle(
    stream: UnixStream,
    mirror: &Arc<Mirror>,
    id: &Identity,
    verify_slot: &VerifySlot,
    volume: &VolumeSlot,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let req: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    let reply = match req.get("cmd").and_then(|c| c.as_str()) {
        Some("verify") => verify(&mut w, verify_slot, &req).await?,
        Some("status") => {
            let mut st = status(mirror, id);
            st.inodes = volume.get().map(|v| v.inodes_tracked() as u64);
            serde_json::to_value(st).unwrap_or_default()
        }
        Some("cp") => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            mirror.cp_command(CpCommand::Demand(tx));
            match rx.await {
                Ok(Ok(applied)) => serde_json::json!({
                    "ok": true,
                    "applied_seq": applied,
                    "standalone": mirror.standalone(),
                }),
                Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
                Err(_) => serde_json::json!({"ok": false, "error": "the CP driver stopped"}),
            }
        }
        _ => {
            serde_json::json!({"ok": false, "error": format!("unknown request {:?}", line.trim())})
        }
    };
    w.write_all(format!("{reply}\n").as_bytes()).await?;
    Ok(())
}

/// Client side: send one request to the daemon mounted at `mountpoint`, return its reply.
pub async fn request(mountpoint: &Path, cmd: &str) -> anyhow::Result<serde_json::Value> {
    request_with(mountpoint, serde_json::json!({ "cmd": cmd }), &mut |_| {}).await
}

/// Client side: send `req`, pass every progress line to `progress`, return the final reply.
pub async fn request_with(
    mountpoint: &Path,
    req: serde_json::Value,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(mountpoint);
    let not_serving = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "no fs-source is serving {} (control socket {}: {e})",
            mountpoint.display(),
            path.display()
        )
    };
    // Only a socket that root or we own, in a directory root or we own, served by root or by
    // us: another user's socket could answer anything (see peer.rs).
    match proto::peer::check_socket(&path) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Err(not_serving(&e)),
        Err(e) if e.is_permission_denied() => anyhow::bail!(
            "cannot reach the control socket of {}: {e} (control sockets are reachable by \
             root and the daemon's user only)",
            mountpoint.display()
        ),
        Err(e) => anyhow::bail!(
            "not using the control socket of {}: {e}",
            mountpoint.display()
        ),
    }
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|e| not_serving(&e))?;
    proto::peer::check_server(&stream, &path).map_err(|e| {
        anyhow::anyhow!(
            "not talking to the fs-source of {}: {e}",
            mountpoint.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let ctx = || format!("control socket {}", path.display());
    w.write_all(format!("{req}\n").as_bytes())
        .await
        .with_context(ctx)?;
    let mut lines = BufReader::new(r);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).await.with_context(ctx)? == 0 {
            anyhow::bail!(
                "fs-source closed the control socket {} without an answer",
                path.display()
            );
        }
        let v: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| {
            format!("unreadable answer on {}: {:?}", path.display(), line.trim())
        })?;
        if v.get("refused").and_then(|r| r.as_bool()) == Some(true) {
            anyhow::bail!(
                "the fs-source serving {} refused the request: {}",
                mountpoint.display(),
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given")
            );
        }
        match v.get("progress") {
            Some(p) => progress(p),
            None => return Ok(v),
        }
    }
}
