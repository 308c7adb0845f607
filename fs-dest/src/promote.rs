//! Promote, demote and fencing: turning a source's image into a primary volume after the source
//! is lost, refusing the old source when it comes back, and handing the role back after a
//! failback.
//!
//! ```text
//! promote NAME                                   demote NAME
//!  1. generation G = slot generation + 1,         1. requires ROOT/NAME/PROMOTED (complete)
//!     flushed to the NVRAM slot; PROMOTED            and no connection of NAME
//!     written with complete=false                 2. journals deleted (they only hold applied
//!  2. the connection of NAME (if any) is closed      records), applied/accepted cursors set to 0
//!     and its sequence stream taken from it:         so the source starts a new sequence stream
//!     nothing more is accepted for NAME           3. PROMOTED removed; the generation stays G:
//!  3. every record accepted into NVRAM is            the source must present generation >= G
//!     flushed, destaged to the journals and
//!     applied to the image (recovery point 0)
//!  4. syncfs of the image; PROMOTED rewritten
//!     with complete=true and the applied seq
//! ```
//!
//! Fencing (in `session.rs`): while `ROOT/NAME/PROMOTED` exists every connection of NAME is
//! refused (the image belongs to whoever serves it now), and at any time a source whose
//! generation is below the slot's is refused; the refusal names the promotion. The marker is a
//! small JSON file so an operator can read it; it is written atomically (temp file, fsync,
//! rename, fsync of the directory).
//!
//! Both commands run inside `fs-dest serve` when it runs (the control socket's `promote` /
//! `demote` commands, so other sources keep being served), and otherwise in the command's own
//! process, which opens the NVRAM file under the root lock exactly as the server would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::engine::{lock, Engine, Source};

/// File name of the promotion marker in `ROOT/NAME/`.
pub const MARKER_NAME: &str = "PROMOTED";

/// How long promote waits for the destager to journal the records it must apply.
pub const DESTAGE_WAIT: Duration = Duration::from_secs(120);

/// The promotion marker `ROOT/NAME/PROMOTED`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// The source's name.
    pub source: String,
    /// The generation the promotion raised the source to.
    pub generation: u64,
    /// When the promotion started, seconds since the Unix epoch.
    pub promoted_at: u64,
    /// The same time, readable (UTC).
    pub promoted_at_utc: String,
    /// Highest sequence number applied to the image by the promotion.
    pub applied_seq: u64,
    /// False while the promotion is still applying records (a crash then leaves the source
    /// fenced; running promote again finishes it).
    pub complete: bool,
}

/// What promote or demote reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The marker after the command (for demote: the marker that was removed).
    pub marker: Marker,
    /// Records applied by this command.
    pub records_applied: u64,
    /// The image directory.
    pub image: PathBuf,
    /// The promotion had already completed before this command (nothing was done).
    pub already: bool,
    /// What the operator must know about the promoted image (an incomplete baseline, paths
    /// out of sync).
    pub warnings: Vec<String>,
}

/// What is known to be missing from an image: its baseline did not complete, or paths are
/// out of sync with the lost source.
fn image_warnings(source: &Source) -> Vec<String> {
    let mut w = Vec::new();
    match crate::image_state::read_volume(source.dir()) {
        Ok(Some(r)) if !r.baseline_complete => w.push(format!(
            "the baseline of {} never completed: the image lacks part of the source's volume",
            source.name
        )),
        Ok(_) => {}
        Err(e) => w.push(format!("cannot tell whether the baseline completed: {e}")),
    }
    let d = lock(&source.divergences);
    if !d.is_empty() {
        let shown: Vec<String> = d
            .listed()
            .iter()
            .take(10)
            .map(|v| String::from_utf8_lossy(&v.path).into_owned())
            .collect();
        w.push(format!(
            "{} path(s) of the image differ from the lost source (records that failed to apply): {}{}",
            d.len(),
            shown.join(", "),
            if d.len() > 10 { ", ..." } else { "" }
        ));
    }
    w
}

/// Progress of the apply step: `done` of `total` records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    /// Records applied so far.
    pub done: u64,
    /// Records to apply.
    pub total: u64,
}

/// Why promote or demote failed.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// The destination has never heard of this source.
    #[error("no source named {name:?} on this destination (known: {known})")]
    UnknownSource {
        /// The name asked for.
        name: String,
        /// The names known.
        known: String,
    },
    /// Reading or writing the marker failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The marker does not parse.
    #[error("{path}: not a promotion marker: {reason}")]
    BadMarker {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The NVRAM slot could not be updated.
    #[error(transparent)]
    Slot(#[from] crate::error::SlotError),
    /// The destager did not journal the records in time.
    #[error("source {name}: the destager did not journal records up to {seq} within {seconds} s; nothing was applied, run promote again")]
    DestageTimeout {
        /// Source.
        name: String,
        /// The sequence number waited for.
        seq: u64,
        /// How long.
        seconds: u64,
    },
    /// Applying the journals to the image failed.
    #[error("source {name}: applying the journals to the image failed: {reason}")]
    Apply {
        /// Source.
        name: String,
        /// Why.
        reason: String,
    },
    /// Demote of a source that is not promoted.
    #[error("source {0} is not promoted (no {1}): nothing to demote")]
    NotPromoted(String, PathBuf),
    /// Demote while the promotion is unfinished.
    #[error("source {0}: the promotion did not complete; run `fs-dest promote` again first")]
    Incomplete(String),
    /// Demote while the source is connected (cannot be, while promoted, unless racing).
    #[error("source {0} is connected; demote needs it disconnected")]
    Connected(String),
    /// Promote while the source is connected and mirroring: it is not lost.
    #[error(
        "source {0} is connected and mirroring: promoting now would fence a live source. Stop it \
         (or cut it off) first; a lost source shows as disconnected within 3 s. Pass --force to \
         promote anyway"
    )]
    Live(String),
}

/// `ROOT/NAME/PROMOTED`.
pub fn marker_path(root: &Path, name: &str) -> PathBuf {
    root.join(name).join(MARKER_NAME)
}

/// Read the marker of `name`; `None` when the source is not promoted.
pub fn read_marker(root: &Path, name: &str) -> Result<Option<Marker>, PromoteError> {
    let path = marker_path(root, name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PromoteError::Io {
                what: "cannot read",
                path,
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| PromoteError::BadMarker {
            path,
            reason: e.to_string(),
        })
}

/// Write the marker atomically and durably.
fn write_marker(root: &Path, m: &Marker) -> Result<(), PromoteError> {
    let path = marker_path(root, &m.source);
    let dir = root.join(&m.source);
    let tmp = dir.join(format!(".{MARKER_NAME}.tmp"));
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| PromoteError::Io {
            what,
            path: p,
            source,
        }
    };
    let mut text = serde_json::to_string_pretty(m).map_err(|e| PromoteError::BadMarker {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(text.as_bytes())
        .map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot rename into place", &path))?;
    sync_dir(&dir)
}

fn sync_dir(dir: &Path) -> Result<(), PromoteError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PromoteError::Io {
            what: "cannot fsync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The refusal a fenced source gets.
pub fn fenced_message(root: &Path, m: &Marker, presented: u64) -> String {
    format!(
        "source {name} was promoted at generation {g} on {date}; this source (generation {presented}) \
         is fenced and may not write into the promoted image. Fail back with: \
         `fs-dest reseed --from {image} --to YOUR_BACKING_DIR` (with every writer of the promoted \
         volume stopped), then `fs-dest demote --root {root} --source {name}`, then mount again with \
         `fs-source mount ... --generation {g}` and a fresh NVRAM file",
        name = m.source,
        g = m.generation,
        date = m.promoted_at_utc,
        image = root.join(&m.source).join("image").display(),
        root = root.display(),
    )
}

/// The refusal of a source whose generation is older than the slot's, when no marker explains
/// it (the source was promoted and demoted since: it must come back with the new generation).
pub fn stale_message(name: &str, stored: u64, presented: u64) -> String {
    format!(
        "source {name} was promoted at generation {stored} (and failed back since); this source \
         presents generation {presented} and is fenced. Reseed it from the current primary and \
         mount with `--generation {stored}` and a fresh NVRAM file"
    )
}

fn find(engine: &Engine, name: &str) -> Result<Arc<Source>, PromoteError> {
    let all = engine.sources();
    if let Some(s) = all.iter().find(|s| s.name == name) {
        return Ok(s.clone());
    }
    let known: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    Err(PromoteError::UnknownSource {
        name: name.to_string(),
        known: if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        },
    })
}

/// Stop accepting anything for `source`: close its connection and take its sequence stream.
async fn disconnect(source: &Source, why: &'static [u8]) {
    if let Some((_, conn)) = lock(&source.connection).take() {
        tracing::info!(source = %source.name, "closing the source's connection");
        conn.close(crate::close_code::FENCED.into(), why);
    }
    // A reader still running appends only while it owns the stream; this waits for a batch in
    // progress and makes every later one stop.
    source.ingest.lock().await.conn_id = 0;
}

/// Promote `name`: fence it, apply every record held for it, mark the image primary.
/// `progress` is called while records are applied.
pub async fn promote(
    engine: &Arc<Engine>,
    name: &str,
    force: bool,
    progress: impl Fn(Progress),
) -> Result<Outcome, PromoteError> {
    let source = find(engine, name)?;
    let root = engine.root.clone();
    let previous = read_marker(&root, name)?;
    if previous.is_none() && source.connected() {
        if !force {
            return Err(PromoteError::Live(name.to_string()));
        }
        tracing::warn!(source = %name, "promoting a connected source (--force): it is fenced now");
    }
    if let Some(m) = previous.as_ref().filter(|m| m.complete) {
        disconnect(&source, b"promoted").await;
        return Ok(Outcome {
            marker: m.clone(),
            records_applied: 0,
            image: source.image_dir.clone(),
            already: true,
            warnings: image_warnings(&source),
        });
    }
    // 1. Fence: the new generation is durable in the slot, then the marker says why.
    let stored = source.generation.load(Ordering::Acquire);
    let generation = match &previous {
        Some(m) => m.generation.max(stored),
        None => stored + 1,
    };
    engine.slots.set_generation(source.slot, generation)?;
    source.generation.store(generation, Ordering::Release);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut marker = previous.unwrap_or(Marker {
        source: name.to_string(),
        generation,
        promoted_at: now,
        promoted_at_utc: utc(now),
        applied_seq: source.applied_seq.load(Ordering::Acquire),
        complete: false,
    });
    marker.generation = generation;
    write_marker(&root, &marker)?;
    tracing::warn!(source = %name, generation, "promoting: the source is fenced from now on");

    // 2. Nothing more comes in.
    disconnect(&source, b"promoted").await;

    // 3. Everything accepted is flushed, journaled and applied.
    let target = source.accepted_seq.load(Ordering::Acquire);
    engine.wait_flushed().await;
    let mut journaled = source.journaled.subscribe();
    if *journaled.borrow() < target {
        engine.destage_signal.notify();
        let waited = tokio::time::timeout(DESTAGE_WAIT, journaled.wait_for(|&j| j >= target)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err(PromoteError::DestageTimeout {
                name: name.to_string(),
                seq: target,
                seconds: DESTAGE_WAIT.as_secs(),
            });
        }
    }
    let floor = source.applied_seq.load(Ordering::Acquire);
    let total = target.saturating_sub(floor);
    progress(Progress { done: 0, total });
    let (e, s) = (engine.clone(), source.clone());
    let mut task = tokio::task::spawn_blocking(move || {
        crate::cp::apply_through(&e, &s, target).map(|o| o.applied_seq)
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let applied = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tick.tick() => {
                let done = source.applied_seq.load(Ordering::Acquire).saturating_sub(floor);
                progress(Progress { done: done.min(total), total });
            }
        }
    };
    let applied = applied
        .map_err(|e| PromoteError::Apply {
            name: name.to_string(),
            reason: e.to_string(),
        })?
        .map_err(|e| PromoteError::Apply {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    progress(Progress { done: total, total });

    // 4. The image is durable (apply_through syncfs'ed it): the promotion is complete.
    marker.applied_seq = applied;
    marker.complete = true;
    write_marker(&root, &marker)?;
    tracing::warn!(source = %name, generation, applied_seq = applied, "promoted");
    let warnings = image_warnings(&source);
    for w in &warnings {
        tracing::warn!(source = %name, "promoted image: {w}");
    }
    Ok(Outcome {
        marker,
        records_applied: total,
        image: source.image_dir.clone(),
        already: false,
        warnings,
    })
}

/// Demote `name` after a failback: forget its old sequence stream and remove the marker, so
/// the source (reseeded from the image, generation >= the promoted one, fresh NVRAM) mirrors
/// again from sequence number 1 onto an image equal to its backing directory.
pub async fn demote(engine: &Arc<Engine>, name: &str) -> Result<Outcome, PromoteError> {
    let source = find(engine, name)?;
    let root = engine.root.clone();
    let path = marker_path(&root, name);
    let marker = read_marker(&root, name)?
        .ok_or_else(|| PromoteError::NotPromoted(name.to_string(), path.clone()))?;
    if !marker.complete {
        return Err(PromoteError::Incomplete(name.to_string()));
    }
    if source.connected() {
        return Err(PromoteError::Connected(name.to_string()));
    }
    {
        let mut ingest = source.ingest.lock().await;
        {
            let mut journals = lock(&source.journals);
            for (p, _) in std::mem::take(&mut *journals) {
                let f = crate::journal::journal_path(&source.journal_dir, p);
                if let Err(e) = std::fs::remove_file(&f) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(PromoteError::Io {
                            what: "cannot remove journal",
                            path: f,
                            source: e,
                        });
                    }
                }
            }
        }
        sync_dir(&source.journal_dir)?;
        // The image's replay marker counts the old stream's records.
        let tree = source.image_tree().map_err(|e| PromoteError::Apply {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        tree.clear_marker().map_err(|e| PromoteError::Io {
            what: "cannot remove the replay marker of",
            path: source.image_dir.clone(),
            source: e.into(),
        })?;
        engine.slots.set_applied(source.slot, 0);
        engine.slots.flush(source.slot)?;
        source.applied_seq.store(0, Ordering::Release);
        source.accepted_seq.store(0, Ordering::Release);
        source.journaled.send_replace(0);
        ingest.next_seq = 1;
        ingest.conn_id = 0;
    }
    std::fs::remove_file(&path).map_err(|e| PromoteError::Io {
        what: "cannot remove",
        path: path.clone(),
        source: e,
    })?;
    sync_dir(&root.join(name))?;
    tracing::warn!(source = %name, generation = marker.generation, "demoted: the source may mirror again");
    Ok(Outcome {
        marker,
        records_applied: 0,
        image: source.image_dir.clone(),
        already: false,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn marker_round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path(), "a").unwrap(), None);
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let m = Marker {
            source: "a".into(),
            generation: 3,
            promoted_at: 1,
            promoted_at_utc: utc(1),
            applied_seq: 9,
            complete: true,
        };
        write_marker(dir.path(), &m).unwrap();
        assert_eq!(read_marker(dir.path(), "a").unwrap(), Some(m.clone()));
        let msg = fenced_message(dir.path(), &m, 0);
        assert!(
            msg.contains("promoted at generation 3 on 1970-01-01"),
            "{msg}"
        );
        assert!(msg.contains("fenced"), "{msg}");
        std::fs::write(marker_path(dir.path(), "a"), "junk").unwrap();
        assert!(matches!(
            read_marker(dir.path(), "a"),
            Err(PromoteError::BadMarker { .. })
        ));
    }
}
