//! The asynchronous second leg (`--async-dest`): the same records, in the same order, sent to a
//! second destination that keeps its own journals, CPs and image, allowed to lag.
//!
//! Nothing waits for it: writers wait for the synchronous destination only, so a slow or lost
//! second leg never slows the first. Records it has not acknowledged stay available to it: in
//! NVRAM while their partition is in use, then in its own spill file `NVRAM.async` (appended
//! and fdatasync'ed before a partition is freed, like the backlog of the synchronous leg). The
//! leg reads from there, sends in bounded batches, asks its destination for a CP whenever the
//! acknowledged records have moved on by a partition's worth or it has caught up, and trims the
//! spill file once everything in it is acknowledged. Its lag is in `status` and the metrics.
//!
//! A second destination must start from the volume's first record (a fresh volume, or one
//! whose records are all still held): a baseline for a destination added later is not built
//! yet, and such a leg stops with a message saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::wire::{self, Control, Message};

use crate::backlog::Backlog;
use crate::link::LinkError;
use crate::mirror::Mirror;

/// How much one batch of the leg holds at most.
const BATCH_BYTES: usize = 8 << 20;
/// Ask the second destination for a CP at least this often while records are unapplied.
const CP_EVERY: Duration = Duration::from_secs(2);

/// Where the second leg goes and who it is.
#[derive(Debug, Clone)]
pub struct LegSettings {
    /// The second destination's address.
    pub dest: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: String,
    /// Directory with ca.pem, NAME.pem, NAME.key.
    pub tls_dir: PathBuf,
    /// This source's name.
    pub name: String,
    /// The backing volume's identity.
    pub volume: String,
}

/// What `status` shows of the leg.
#[derive(Debug, Clone, Default)]
pub struct LegProgress {
    /// The second destination's address, as given.
    pub dest: String,
    /// A connection is established.
    pub link_up: bool,
    /// Highest record it acknowledged (durable there).
    pub acked: u64,
    /// Highest record applied to its image (last CP).
    pub applied: u64,
    /// When it last acknowledged something.
    pub last_ack_at: Option<Instant>,
    /// Since when records wait for it.
    pub lagging_since: Option<Instant>,
    /// Why the leg stopped for good (refused, or it needs a baseline).
    pub stopped: Option<String>,
    /// Its acknowledged sequence number is known (a handshake happened since the start).
    pub known: bool,
}

/// The leg's state shared with the mirror (retention) and the status.
pub struct AsyncLeg {
    /// Records freed from NVRAM that the leg has not acknowledged.
    pub spill: Mutex<Backlog>,
    /// Progress, for status and retention.
    pub progress: Mutex<LegProgress>,
    /// Woken when records are logged.
    pub logged: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AsyncLeg {
    /// The leg's state, with its spill file at `spill_path`.
    pub fn open(spill_path: &std::path::Path, dest: &str) -> Result<Self, String> {
        let spill = Backlog::open(spill_path).map_err(|e| e.to_string())?;
        Ok(AsyncLeg {
            spill: Mutex::new(spill),
            progress: Mutex::new(LegProgress {
                dest: dest.to_string(),
                ..LegProgress::default()
            }),
            logged: tokio::sync::Notify::new(),
        })
    }

    /// The last record the leg has for sure, in its destination or in the spill file: a
    /// partition's frames above it must reach the spill file before the partition is freed.
    pub fn floor(&self) -> u64 {
        let acked = {
            let p = lock(&self.progress);
            if p.known {
                p.acked
            } else {
                0
            }
        };
        acked.max(lock(&self.spill).last_seq.unwrap_or(0))
    }

    /// Append `frames` (in order, all above [`AsyncLeg::floor`]) to the spill file, durably.
    pub fn keep(&self, frames: &[Vec<u8>]) -> Result<(), String> {
        lock(&self.spill).append(frames).map_err(|e| e.to_string())
    }

    /// A new generation restarts the sequence numbers: what the spill file holds belongs to
    /// the old one, and the leg's position is learnt again at its next handshake.
    pub fn reset(&self) -> Result<(), String> {
        lock(&self.spill).reset().map_err(|e| e.to_string())?;
        let mut p = lock(&self.progress);
        p.acked = 0;
        p.applied = 0;
        p.known = false;
        p.lagging_since = None;
        Ok(())
    }

    /// A record was logged: it waits for the leg from now on (if nothing waited already).
    pub fn note_logged(&self) {
        let mut p = lock(&self.progress);
        if p.lagging_since.is_none() {
            p.lagging_since = Some(Instant::now());
        }
        drop(p);
        self.logged.notify_one();
    }

    /// Records the leg has not acknowledged, and since when the oldest waits.
    pub fn lag(&self, logged: u64) -> (u64, f64) {
        let p = lock(&self.progress);
        let lag = logged.saturating_sub(p.acked);
        let secs = if lag > 0 {
            p.lagging_since.map_or(0.0, |t| t.elapsed().as_secs_f64())
        } else {
            0.0
        };
        (lag, secs)
    }

    fn on_ack(&self, acked: u64, logged: u64) {
        let mut p = lock(&self.progress);
        if acked > p.acked || !p.known {
            p.acked = p.acked.max(acked);
            p.known = true;
            p.last_ack_at = Some(Instant::now());
            // The oldest unacknowledged record is younger than this ack: restart the clock.
            p.lagging_since = (p.acked < logged).then(Instant::now);
        }
        drop(p);
        let mut spill = lock(&self.spill);
        if spill.last_seq.is_some_and(|last| last <= acked) {
            if let Err(e) = spill.reset() {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Run the leg until the process ends: connect, catch up, follow; reconnect when it breaks.
pub async fn run(mirror: Arc<Mirror>, leg: Arc<AsyncLeg>, settings: LegSettings) {
    loop {
        match session(&mirror, &leg, &settings).await {
            Ok(()) => {}
            Err(LinkError::Refused(why)) => {
                tracing::error!(dest = %settings.dest, "asynchronous leg stopped: {why}");
                let mut p = lock(&leg.progress);
                p.link_up = false;
                p.stopped = Some(why);
                return;
            }
            Err(e) => {
                let was_up = std::mem::replace(&mut lock(&leg.progress).link_up, false);
                if was_up {
                    tracing::warn!(dest = %settings.dest, "asynchronous leg lost: {e}");
                } else {
                    tracing::debug!(dest = %settings.dest, "asynchronous leg: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn session(
    mirror: &Arc<Mirror>,
    leg: &Arc<AsyncLeg>,
    settings: &LegSettings,
) -> Result<(), LinkError> {
    let (endpoint, _cfg) =
        crate::tls::client_endpoint(&settings.tls_dir, &settings.name, settings.dest)?;
    let conn = endpoint
        .connect(settings.dest, &settings.server_name)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let logged = mirror.progress(|p| p.logged);
    send.write_all(&wire::encode_control(&Control::Hello {
        protocol: wire::PROTOCOL_VERSION,
        source: settings.name.clone(),
        generation: mirror.generation(),
        last_logged_seq: logged,
        volume: settings.volume.clone(),
        take_over: false,
    }))
    .await?;
    let (durable, applied) = match crate::link::read_message(&mut recv).await? {
        Message::Control(Control::Welcome {
            durable_seq,
            applied_seq,
            ..
        }) => (durable_seq, applied_seq),
        Message::Control(Control::Refused { reason }) => return Err(LinkError::Refused(reason)),
        other => return Err(LinkError::Unexpected(format!("{other:?}"))),
    };
    if durable > logged {
        return Err(LinkError::Refused(format!(
            "the asynchronous destination holds records up to {durable}, after this source's \
             last ({logged}): it mirrors another history of this volume"
        )));
    }
    // Everything after `durable` must still be here (NVRAM or the spill file).
    if let Some(first) = mirror.async_first_held(leg) {
        if first > durable + 1 {
            return Err(LinkError::Refused(format!(
                "the asynchronous destination holds records up to {durable}, but this source \
                 holds them only from {first}: a destination added to a volume with history \
                 needs a baseline, which an asynchronous leg cannot make yet (start it with the \
                 volume, or seed its image with `fs-dest reseed` and a matching NVRAM)"
            )));
        }
    }
    leg.on_ack(durable, logged);
    {
        let mut p = lock(&leg.progress);
        p.applied = applied;
        p.link_up = true;
    }
    tracing::info!(dest = %settings.dest, durable, logged, "asynchronous leg connected");

    // The receiving side runs beside the sending one for the whole connection (a read is not
    // cancellable half way): acknowledgements and CP answers update the leg's progress.
    let receiver = {
        let (leg, mirror) = (leg.clone(), mirror.clone());
        async move {
            loop {
                match crate::link::read_message(&mut recv).await? {
                    Message::Control(Control::Ack { durable_seq }) => {
                        leg.on_ack(durable_seq, mirror.progress(|p| p.logged));
                    }
                    Message::Control(Control::CpDone { applied_seq, .. }) => {
                        let mut p = lock(&leg.progress);
                        p.applied = p.applied.max(applied_seq);
                    }
                    Message::Control(Control::BaselineRecorded { .. }) => {}
                    Message::Control(Control::Error { seq, reason }) => {
                        return Err::<(), _>(LinkError::Unexpected(format!(
                            "record {seq:?}: {reason}"
                        )));
                    }
                    Message::Control(Control::Refused { reason }) => {
                        return Err(LinkError::Refused(reason))
                    }
                    other => return Err(LinkError::Unexpected(format!("{other:?}"))),
                }
                leg.logged.notify_one();
            }
        }
    };
    tokio::pin!(receiver);

    let mut sent = durable;
    // The CP asked for (up to this record) and when.
    let mut cp_pending: Option<(u64, Instant)> = None;
    let mut next_cp_id = 1u64;
    let mut last_cp = Instant::now();
    let mut baseline_told = false;
    loop {
        // Send what is new, in bounded batches.
        let batch = mirror.async_frames_after(leg, sent, BATCH_BYTES);
        if let Some((last, _)) = batch.last() {
            sent = *last;
            let mut frames = batch.into_iter().map(|(_, b)| b).collect();
            tokio::select! {
                r = crate::link::send_frames(&mut send, &mut frames) => r?,
                r = &mut receiver => return r,
            }
        }
        let (acked, applied) = {
            let p = lock(&leg.progress);
            (p.acked, p.applied)
        };
        if cp_pending
            .is_some_and(|(upto, at)| applied >= upto || at.elapsed() > Duration::from_secs(60))
        {
            cp_pending = None;
        }
        // A CP when something acknowledged is unapplied, at most every CP_EVERY, one at a time,
        // and never past what this source holds durably.
        let mut control = Vec::new();
        if cp_pending.is_none() && applied < acked && last_cp.elapsed() >= CP_EVERY {
            let upto = acked.min(mirror.progress(|p| p.flushed));
            if upto > applied {
                control.push(Control::CpRequest {
                    id: next_cp_id,
                    partition: 0,
                    last_seq: upto,
                });
                next_cp_id += 1;
                cp_pending = Some((upto, Instant::now()));
                last_cp = Instant::now();
            }
        }
        // The image holds the baseline once a CP passed its last record.
        if !baseline_told {
            let baseline = mirror.progress(|p| {
                (p.baseline.state == "done" && !p.baseline.incomplete())
                    .then_some(p.baseline.last_seq)
            });
            if let Some(last) = baseline.filter(|&last| applied >= last) {
                control.push(Control::BaselineDone { last_seq: last });
                baseline_told = true;
            }
        }
        for c in control {
            let bytes = wire::encode_control(&c);
            tokio::select! {
                r = send.write_all(&bytes) => r?,
                r = &mut receiver => return r,
            }
        }
        let wait = if sent < mirror.progress(|p| p.logged) {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            r = &mut receiver => return r,
            _ = leg.logged.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
