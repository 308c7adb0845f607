//! Consistency points: apply a source's journaled records to its image.
//!
//! Each source has its own CP worker task, so a CP of one source never stalls another's
//! acknowledgements. For `CpRequest{last_seq}` the worker makes sure the destager has
//! journaled every record up to `last_seq`, then (on a blocking thread) applies the journal
//! records with `applied_seq < seq <= last_seq` in sequence order through
//! `proto::apply::Tree` (setting the image's replay marker before each namespace record, so a
//! CP a crash interrupts resumes exactly: see `proto::replay`), `syncfs`es the image, records
//! `applied_seq` in the NVRAM slot and flushes it, drops the applied records from the journals
//! and answers `CpDone`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::replay::How;
use proto::wire::Control;
use proto::Op;
use rustix::io::Errno;
use tokio::sync::mpsc;

use crate::engine::{lock, CpJob, Engine, Out, Source, MAX_QUEUED_CPS};
use crate::error::{CpError, CpSubmitError};
use crate::window::{DataRef, WindowRecord};

/// How long a CP waits for the destager before giving up.
pub const DESTAGE_WAIT: Duration = Duration::from_secs(120);

/// Directories of the image a CP keeps open by path while it applies its window.
const CP_DIR_CACHE: usize = 256;

/// Queue `job` for `source`'s CP worker, starting the worker with the first request. Must run
/// inside a tokio runtime.
pub fn submit(engine: &Arc<Engine>, source: &Arc<Source>, job: CpJob) -> Result<(), CpSubmitError> {
    let q = &source.cp;
    if q.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_CPS {
        q.queued.fetch_sub(1, Ordering::AcqRel);
        return Err(CpSubmitError::TooMany {
            limit: MAX_QUEUED_CPS,
        });
    }
    if let Some(rx) = lock(&q.rx).take() {
        tokio::spawn(worker(engine.clone(), source.clone(), rx));
    }
    if q.tx.send(job).is_err() {
        q.queued.fetch_sub(1, Ordering::AcqRel);
        return Err(CpSubmitError::Stopped);
    }
    Ok(())
}

/// The CP worker of one source.
async fn worker(engine: Arc<Engine>, source: Arc<Source>, mut rx: mpsc::UnboundedReceiver<CpJob>) {
    while let Some(job) = rx.recv().await {
        source.cp.queued.fetch_sub(1, Ordering::AcqRel);
        let started = std::time::Instant::now();
        let out = match run_cp(&engine, &source, job.last_seq).await {
            Ok(outcome) => {
                let took = started.elapsed();
                crate::cp_durations::observe(&source.name, took);
                *lock(&source.stats.last_cp) = Some((std::time::Instant::now(), took));
                let (out_of_sync, out_of_sync_total) = {
                    let d = lock(&source.divergences);
                    (d.listed(), d.len() as u64)
                };
                if outcome.failed > 0 || out_of_sync_total > 0 {
                    tracing::warn!(source = %source.name, id = job.id, applied_seq = outcome.applied_seq,
                        failed = outcome.failed, out_of_sync = out_of_sync_total,
                        "CP done, but the image is out of sync with the source at {out_of_sync_total} path(s); the source resends them");
                } else {
                    tracing::info!(source = %source.name, id = job.id, partition = job.partition,
                        applied_seq = outcome.applied_seq, seconds = format!("{:.3}", took.as_secs_f64()),
                        "CP done");
                }
                Out::Control(Control::CpDone {
                    id: job.id,
                    applied_seq: outcome.applied_seq,
                    failed: outcome.failed,
                    out_of_sync,
                    out_of_sync_total,
                })
            }
            Err(e) => {
                tracing::error!(source = %source.name, id = job.id, error = %e, "CP failed");
                Out::Fatal(Control::Error {
                    seq: Some(job.last_seq),
                    reason: format!("CP {} failed: {e}", job.id),
                })
            }
        };
        // The connection may be gone; the source asks again after reconnecting.
        let _ = job.reply.send(out);
    }
}

/// What a CP did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpOutcome {
    /// Highest sequence number now applied to the image.
    pub applied_seq: u64,
    /// Records of this CP that could not be applied (their paths are now out of sync).
    pub failed: u64,
}

/// Run one CP up to `last_seq`.
pub async fn run_cp(
    engine: &Arc<Engine>,
    source: &Arc<Source>,
    last_seq: u64,
) -> Result<CpOutcome, CpError> {
    let accepted = source.accepted_seq.load(Ordering::Acquire);
    if last_seq > accepted {
        return Err(CpError::Ahead {
            source_name: source.name.clone(),
            last_seq,
            accepted,
        });
    }
    if !source.wait_journaled(engine, last_seq, DESTAGE_WAIT).await {
        return Err(CpError::DestageTimeout {
            source_name: source.name.clone(),
            last_seq,
            seconds: DESTAGE_WAIT.as_secs(),
        });
    }
    // Wait for a CP slot (memory bound, see `Engine::cp_slots`); the permit is held until the
    // blocking apply is done.
    let permit = engine
        .cp_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| CpError::Task {
            source_name: source.name.clone(),
            reason: "the server is stopping".into(),
        })?;
    let (e, s) = (engine.clone(), source.clone());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        apply_through(&e, &s, last_seq)
    })
    .await
    .map_err(|err| CpError::Task {
        source_name: source.name.clone(),
        reason: err.to_string(),
    })?
}

/// Apply the journaled records of `source` up to `last_seq` to its image (blocking).
///
/// A record that fails to apply is never counted as mirrored silently: its paths join the
/// image's out-of-sync set (persisted beside the image before the CP is answered), which the
/// source reads from `CpDone` and heals by resending those paths; a `Replace` that applies
/// removes its path (and what lies beneath) from the set.
pub fn apply_through(
    engine: &Engine,
    source: &Source,
    last_seq: u64,
) -> Result<CpOutcome, CpError> {
    // Browse readers never see half a CP, and a CP and a promote never apply at once.
    let source_dir = source.image_dir.parent().unwrap_or(&source.image_dir);
    let _cp_lock = crate::cp_lock::CpLock::exclusive(source_dir).map_err(|e| CpError::Image {
        source_name: source.name.clone(),
        reason: format!("CP lock in {}: {e}", source_dir.display()),
    })?;
    let floor = source.applied_seq.load(Ordering::Acquire);
    if last_seq <= floor {
        return Ok(CpOutcome {
            applied_seq: floor,
            failed: 0,
        });
    }
    let records = crate::window::read(source, floor, last_seq)?;
    let mut expected = floor + 1;
    for r in &records {
        if r.seq != expected {
            break;
        }
        expected += 1;
    }
    if expected != last_seq + 1 {
        return Err(CpError::Gap {
            source_name: source.name.clone(),
            last_seq,
            missing: expected,
        });
    }
    let tree = source.image_tree()?;
    tree.set_generation(source.generation.load(Ordering::Acquire));
    // Under the CP lock this CP is the image's only writer: its directories stay open by path
    // while it applies the window (one `*at` call per record instead of a path walk).
    let _dirs = tree.dir_cache_scope(CP_DIR_CACHE);
    let image_err = |what: &str, e: Errno| CpError::Image {
        source_name: source.name.clone(),
        reason: format!("{what} of {}: {e}", source.image_dir.display()),
    };
    // A CP interrupted by a crash left the image holding an unknown part of this window:
    // the replay marker says which namespace records are in (see `proto::replay`). Without a
    // marker (an image from before markers), only the first record may be.
    let marker = tree
        .marker()
        .map_err(|e| image_err("reading the replay marker", e))?
        .unwrap_or(floor + 1);
    // Content records before the marker were applied by the interrupted CP. If the image is on
    // the same mount of the same boot as then, the page cache kept them; otherwise (a power cut,
    // a remount) some may be lost, and their paths are resent by the source.
    let instance = tree
        .mount_instance()
        .map_err(|e| image_err("identifying the mount", e))?;
    let instance_file = source_dir.join("cp-mount");
    let same_mount = std::fs::read_to_string(&instance_file).is_ok_and(|s| s == instance);
    if !same_mount {
        crate::image_state::write_private(&instance_file, instance.as_bytes()).map_err(|e| {
            CpError::Image {
                source_name: source.name.clone(),
                reason: format!("{}: {e}", instance_file.display()),
            }
        })?;
    }
    let mut window: Vec<(u64, Op)> = Vec::with_capacity(records.len());
    // A write's bytes stay in the journal; applying it copies them in the kernel (see
    // `crate::window::DataRef::apply_to`).
    let mut payloads: Vec<Option<DataRef>> = Vec::with_capacity(records.len());
    let mut failed = 0u64;
    let mut changed = false;
    // Where syncfs is not durable (FUSE: GlusterFS...), every path the records touch is
    // fsynced one by one before the CP completes (see docs/image-filesystems.md).
    let mut touched =
        (!proto::fscheck::syncfs_durable(tree.root_fd())).then(proto::fscheck::Touched::default);
    for WindowRecord { seq, op, data } in records {
        match op {
            Ok(op) => {
                window.push((seq, op));
                payloads.push(data);
            }
            Err(e) => {
                // Checked at intake, so this is damage after the fact: nothing says which
                // path it touched, so the whole image is out of sync.
                tracing::error!(source = %source.name, seq, error = %e, "CP: undecodable journal record");
                source.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
                failed += 1;
                changed = true;
                lock(&source.divergences).add(&[b""], seq, &format!("undecodable record: {e}"));
            }
        }
    }
    let marker_done = tree
        .marker_done()
        .map_err(|e| image_err("reading the replay marker", e))?;
    // A file created and removed within the window never reaches the image.
    let left_out = proto::replay::drop_transient(&mut window, marker);
    let transient = left_out.iter().filter(|d| **d).count();
    if transient > 0 {
        // `payloads` runs parallel to `window`: both lose the same records.
        fn keep<T>(v: &mut Vec<T>, left_out: &[bool]) {
            let mut flags = left_out.iter();
            v.retain(|_| !flags.next().is_some_and(|d| *d));
        }
        keep(&mut window, &left_out);
        keep(&mut payloads, &left_out);
        source
            .stats
            .transient_records
            .fetch_add(transient as u64, Ordering::Relaxed);
    }
    // Each write logs its file's times; only the last of a namespace-quiet stretch matters.
    let superseded = proto::replay::drop_superseded_times(&mut window);
    tracing::debug!(source = %source.name, superseded, transient,
        "CP: times entries overridden later in the window, records of files created and removed in it");
    let steps = proto::replay::plan(&window, Some(marker));
    // The namespace records up to the marker: the image holds them.
    let upto = window.partition_point(|(s, _)| *s <= marker);
    if marker > floor + 1 {
        tracing::info!(source = %source.name, floor, marker, same_mount,
            "CP: resuming a CP a crash interrupted; records the image already holds are skipped");
    }
    for step in steps {
        let (seq, op) = &window[step.index];
        let mode = match step.how {
            How::Path(mode) => mode,
            How::Handle => {
                if !same_mount {
                    // Where the file is now, after the namespace records up to the marker.
                    for path in op.paths() {
                        if let Some(now) = proto::replay::track(path, &window[step.index + 1..upto])
                        {
                            changed = true;
                            lock(&source.divergences).add(
                                &[now.as_slice()],
                                *seq,
                                "content possibly lost in a power cut during a CP",
                            );
                        }
                    }
                }
                continue;
            }
        };
        let kept_dir = matches!(op, Op::Replace { path, entry: proto::Entry::Dir { .. } }
            if tree.stat(path).is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory));
        let exchange = matches!(op, Op::Rename { flags, .. } if flags & libc::RENAME_EXCHANGE != 0);
        if exchange && *seq == marker && mode == proto::apply::ApplyMode::Replay {
            // Applied twice an exchange undoes itself: only the marker can say whether the
            // interrupted CP got through it.
            if marker_done {
                continue;
            }
            if !same_mount {
                changed = true;
                lock(&source.divergences).add(
                    &op.paths(),
                    *seq,
                    "an exchange a power cut may have interrupted",
                );
            }
        }
        if op.is_namespace() {
            tree.set_marker(*seq)
                .map_err(|e| image_err("setting the replay marker", e))?;
        }
        let applied = match (op, &payloads[step.index]) {
            // A write's bytes go from the journal to the image in the kernel.
            (Op::Write { path, offset, .. }, Some(data)) => data.apply_to(&tree, path, *offset),
            _ => tree.apply(op, mode),
        };
        if let Some(t) = touched.as_mut() {
            t.note(op);
        }
        if exchange && applied.is_ok() {
            tree.set_marker_done(*seq)
                .map_err(|e| image_err("setting the replay marker", e))?;
        }
        match applied {
            Ok(()) => {
                let mut d = lock(&source.divergences);
                if !d.is_empty() {
                    changed = true;
                    match op {
                        Op::Replace { path, entry } => {
                            let cleared = matches!(entry, proto::Entry::Dir { clear: true, .. });
                            d.heal(path, kept_dir, cleared);
                        }
                        Op::Rename {
                            from, to, flags, ..
                        } => d.renamed(from, to, flags & libc::RENAME_EXCHANGE != 0),
                        Op::Link { existing, new_path } => d.linked(existing, new_path),
                        _ => {}
                    }
                }
            }
            Err(e) => {
                // During a baseline, records on paths not yet transferred fail by
                // design (the transfer heals them): not worth an error line each.
                let refused = matches!(
                    e,
                    proto::apply::ApplyError::NotRegular { .. } | proto::apply::ApplyError::Path(_)
                );
                if refused {
                    tracing::warn!(source = %source.name, seq, op = op.kind(), error = %e,
                        "CP: refused a record that reaches beyond a regular file; its paths are out of sync");
                } else if source.baseline_needed.load(Ordering::Relaxed) {
                    tracing::debug!(source = %source.name, seq, op = op.kind(), error = %e,
                        "CP: a record on a path the baseline has not reached yet; out of sync until it does");
                } else {
                    tracing::error!(source = %source.name, seq, op = op.kind(), error = %e,
                        "CP: a record could not be applied to the image; its paths are out of sync");
                }
                source.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
                failed += 1;
                changed = true;
                lock(&source.divergences).add(&op.paths(), *seq, &e.to_string());
            }
        }
    }
    source.applied_seq.store(last_seq, Ordering::Release);
    let sync_err = |e: std::io::Error| CpError::Sync {
        source_name: source.name.clone(),
        source: e,
    };
    // The tree's root is an O_PATH descriptor, which syncfs refuses (EBADF): open the image
    // directory for reading instead.
    let image = rustix::fs::open(
        &source.image_dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| sync_err(e.into()))?;
    if let Some(t) = &touched {
        let started = std::time::Instant::now();
        let n = t.fsync_all(&tree).map_err(|(path, e)| {
            sync_err(std::io::Error::other(format!(
                "fsync of {:?}: {e}",
                String::from_utf8_lossy(&path)
            )))
        })?;
        tracing::debug!(source = %source.name, paths = n, seconds = started.elapsed().as_secs_f64(),
            "CP: fsynced each touched path (the image's syncfs is not durable)");
    }
    rustix::fs::syncfs(&image).map_err(|e| sync_err(e.into()))?;
    // The out-of-sync set is durable before the applied cursor moves past the failures.
    if changed {
        let d = lock(&source.divergences);
        {
            d.save(source_dir)
                .map_err(|e| sync_err(std::io::Error::other(e.to_string())))?;
        }
    }
    // The applied cursor moves in NVRAM only now that the image is durable: written earlier,
    // the kernel could write the mapped page back before the syncfs.
    engine.slots.set_applied(source.slot, last_seq);
    engine.slots.flush(source.slot).map_err(|e| match e {
        crate::error::SlotError::Flush(io) => sync_err(io),
        other => sync_err(std::io::Error::other(other.to_string())),
    })?;
    {
        let mut journals = lock(&source.journals);
        for j in journals.values_mut() {
            j.discard_through(last_seq)?;
        }
    }
    source.stats.cp_count.fetch_add(1, Ordering::Relaxed);
    Ok(CpOutcome {
        applied_seq: last_seq,
        failed,
    })
}
