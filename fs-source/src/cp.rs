//! The consistency-point driver: commits full partitions (and, on the timer or on demand, the
//! current one) in sequence order, then frees them.
//!
//! A CP of partition P: wait until every record of P is acknowledged, `syncfs` the backing
//! directory, send `CpRequest`, wait for `CpDone` (resending after a reconnect), free P.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::link::LinkShared;
use crate::mirror::{CpCommand, Mirror, Policy};

/// Run the driver until the command channel closes.
pub async fn run(
    mirror: Arc<Mirror>,
    link: Arc<LinkShared>,
    mut rx: mpsc::UnboundedReceiver<CpCommand>,
    backing: Arc<OwnedFd>,
    interval: Duration,
) {
    let mut queue: VecDeque<usize> = VecDeque::new();
    // `fs-source cp` callers, with the last record logged when each asked.
    let mut waiters: Vec<(oneshot::Sender<Result<u64, String>>, u64)> = Vec::new();
    let mut seal_pending = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_id = 1u64;
    loop {
        if seal_pending {
            match mirror.seal_current() {
                Ok(Some(p)) => {
                    queue.push_back(p);
                    seal_pending = false;
                }
                Ok(None) => seal_pending = false,
                Err(()) => {}
            }
        }
        if let Some(p) = queue.pop_front() {
            match commit(&mirror, &link, p, &backing, &mut next_id).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(partition = p, "consistency point failed: {e}; will retry");
                    queue.push_front(p);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // Pick up commands that arrived meanwhile before the next CP.
            while let Ok(cmd) = rx.try_recv() {
                handle(&mirror, cmd, &mut queue, &mut waiters, &mut seal_pending);
            }
            continue;
        }
        if !seal_pending && !waiters.is_empty() {
            // Records mirrored from the backlog (or acknowledged after a reconnect) may be
            // ahead of the image with no partition left to commit: ask for them too.
            let (acked, applied, up) = mirror.progress(|p| (p.acked, p.applied_remote, p.link_up));
            if up && applied < acked && !mirror.standalone() {
                let flushed = flush_through(&mirror, acked).await;
                match async {
                    flushed?;
                    remote_cp(&mirror, &link, 0, acked, &backing, &mut next_id).await
                }
                .await
                {
                    Ok(a) => mirror.on_cp_done(a),
                    Err(e) => tracing::error!("catch-up consistency point failed: {e}"),
                }
            }
            let (applied, up, backlog) =
                mirror.progress(|p| (p.applied_remote, p.link_up, p.degraded));
            for (w, target) in waiters.drain(..) {
                let answer =
                    if mirror.standalone() {
                        Ok(applied)
                    } else if applied >= target {
                        not_in_sync(&mirror, applied).map_or(Ok(applied), Err)
                    } else {
                        // Committed locally only (policy sync, destination away): not a mirrored CP.
                        Err(format!(
                        "the destination has applied records up to {applied}, not {target}: {}; \
                         the records are kept (NVRAM{}) and mirrored when it returns",
                        if up { "it did not acknowledge them" } else { "it is unreachable" },
                        if backlog { " and backlog file" } else { "" }
                    ))
                    };
                let _ = w.send(answer);
            }
        }
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => handle(&mirror, cmd, &mut queue, &mut waiters, &mut seal_pending),
                None => return,
            },
            _ = ticker.tick() => {
                if let Ok(Some(p)) = mirror.seal_current() {
                    queue.push_back(p);
                }
            }
        }
    }
}

/// Why the image, although every record up to `applied` is applied, is not a mirror of the
/// volume: paths out of sync, or a baseline still running. `None` when it is.
fn not_in_sync(mirror: &Mirror, applied: u64) -> Option<String> {
    use std::fmt::Write as _;
    mirror.progress(|p| {
        if p.out_of_sync_total > 0 {
            let mut m = format!(
                "the destination applied records up to {applied}, but {} path(s) of the image are \
                 out of sync with this volume (records that failed to apply; they are being resent):",
                p.out_of_sync_total
            );
            for d in p.out_of_sync.iter().take(20) {
                let _ = write!(
                    m,
                    "\n  {} (record {}: {})",
                    String::from_utf8_lossy(&d.path),
                    d.seq,
                    d.error
                );
            }
            if p.out_of_sync_total > 20 {
                let _ = write!(m, "\n  ... and {} more", p.out_of_sync_total - 20);
            }
            return Some(m);
        }
        if p.resync_pending > 0 {
            return Some(format!(
                "the destination applied records up to {applied}, but {} path(s) are being resent \
                 to the image (renamed during the baseline, or out of sync); it is not yet a mirror",
                p.resync_pending
            ));
        }
        let b = &p.baseline;
        if b.incomplete() && !(b.state == "committing" && applied >= b.last_seq) {
            return Some(format!(
                "the destination applied records up to {applied}, but the baseline is still {}: \
                 {} of {} entries ({} of {} bytes) transferred; the image is not yet a mirror of this volume",
                b.state, b.files_done, b.files_total, b.bytes_done, b.bytes_total
            ));
        }
        None
    })
}

fn handle(
    mirror: &Mirror,
    cmd: CpCommand,
    queue: &mut VecDeque<usize>,
    waiters: &mut Vec<(oneshot::Sender<Result<u64, String>>, u64)>,
    seal_pending: &mut bool,
) {
    match cmd {
        CpCommand::Full(p) => {
            if !queue.contains(&p) {
                queue.push_back(p);
            }
        }
        CpCommand::Demand(tx) => {
            *seal_pending = true;
            waiters.push((tx, mirror.progress(|p| p.logged)));
        }
    }
}

async fn commit(
    mirror: &Arc<Mirror>,
    link: &Arc<LinkShared>,
    p: usize,
    backing: &Arc<OwnedFd>,
    next_id: &mut u64,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let r = commit_inner(mirror, link, p, backing, next_id).await;
    if r.is_ok() {
        let took = started.elapsed();
        mirror.note_cp_time(took);
        let (applied, standalone) = (mirror.progress(|p| p.applied_remote), mirror.standalone());
        tracing::info!(
            partition = p,
            applied_at_destination = (!standalone).then_some(applied),
            seconds = format!("{:.3}", took.as_secs_f64()),
            "CP done"
        );
    }
    r
}

async fn commit_inner(
    mirror: &Arc<Mirror>,
    link: &Arc<LinkShared>,
    p: usize,
    backing: &Arc<OwnedFd>,
    next_id: &mut u64,
) -> Result<(), String> {
    let Some(last) = mirror.partition_last_seq(p) else {
        return mirror.free_partition(p).map_err(|e| e.to_string());
    };
    if mirror.standalone() {
        // Unmirrored: the CP only makes the backing volume durable.
        sync_backing(mirror, backing).await?;
        mirror.free_partition(p).map_err(|e| e.to_string())?;
        mirror.on_cp_done(last);
        return Ok(());
    }
    // Every record of the partition must be at the destination — unless policy sync runs
    // alone, in which case the records move to the backlog and the partition is freed locally.
    let mut acked = mirror.acked_watch.subscribe();
    let mut degraded = mirror.degraded_watch.subscribe();
    loop {
        if *acked.borrow_and_update() >= last {
            break;
        }
        if *degraded.borrow_and_update() && mirror.policy() == Policy::Sync {
            sync_backing(mirror, backing).await?;
            let n = mirror.spill_and_free(p).map_err(|e| e.to_string())?;
            tracing::info!(
                partition = p,
                records = n,
                "destination away: moved unacknowledged records to the backlog"
            );
            return Ok(());
        }
        tokio::select! {
            r = acked.changed() => r.map_err(|e| format!("ack watch closed: {e}"))?,
            r = degraded.changed() => r.map_err(|e| format!("policy watch closed: {e}"))?,
        }
    }
    flush_through(mirror, last).await?;
    let applied = remote_cp(mirror, link, p, last, backing, next_id).await?;
    mirror.free_partition(p).map_err(|e| e.to_string())?;
    mirror.on_cp_done(applied);
    if let Some(why) = not_in_sync(mirror, applied) {
        tracing::debug!(partition = p, "{why}");
    }
    tracing::debug!(partition = p, last, applied, "consistency point done");
    Ok(())
}

/// [`Mirror::flush_through`] on a blocking thread.
async fn flush_through(mirror: &Arc<Mirror>, seq: u64) -> Result<(), String> {
    let m = mirror.clone();
    tokio::task::spawn_blocking(move || m.flush_through(seq))
        .await
        .map_err(|e| format!("flush task: {e}"))?
        .map_err(|e| format!("flushing NVRAM before the CP: {e}"))
}

/// `syncfs` of the backing volume, then move the durable cursor to what was applied before it
/// started.
async fn sync_backing(mirror: &Arc<Mirror>, backing: &Arc<OwnedFd>) -> Result<(), String> {
    let point = mirror.durable_point();
    let marker = proto::apply::marker_of(&**backing)
        .map_err(|e| format!("reading the replay marker of the backing directory: {e}"))?;
    syncfs(backing).await?;
    let m = mirror.clone();
    tokio::task::spawn_blocking(move || m.set_durable(point, marker))
        .await
        .map_err(|e| format!("durable cursor task: {e}"))?
        .map_err(|e| format!("flushing the durable cursor to NVRAM: {e}"))
}

async fn syncfs(backing: &Arc<OwnedFd>) -> Result<(), String> {
    let fd = backing.clone();
    tokio::task::spawn_blocking(move || rustix::fs::syncfs(&*fd))
        .await
        .map_err(|e| format!("syncfs task: {e}"))?
        .map_err(|e| format!("syncfs of the backing directory: {e}"))
}

/// Make the backing directory durable, then have the destination apply everything up to
/// `last` to the image; returns the destination's applied sequence number.
async fn remote_cp(
    mirror: &Arc<Mirror>,
    link: &Arc<LinkShared>,
    p: usize,
    last: u64,
    backing: &Arc<OwnedFd>,
    next_id: &mut u64,
) -> Result<u64, String> {
    sync_backing(mirror, backing).await?;
    let mut epoch = link.epoch.subscribe();
    loop {
        let id = *next_id;
        *next_id += 1;
        let done = link.request_cp(id, p as u16, last);
        epoch.borrow_and_update();
        tokio::select! {
            r = done => match r {
                Ok(answer) => {
                    if answer.failed > 0 {
                        tracing::warn!(
                            applied = answer.applied_seq,
                            failed = answer.failed,
                            "consistency point: {} record(s) could not be applied to the image",
                            answer.failed
                        );
                    }
                    return Ok(answer.applied_seq);
                }
                Err(_) => continue,
            },
            // Reconnected: the request may have been lost with the old connection.
            _ = epoch.changed() => continue,
        }
    }
}
