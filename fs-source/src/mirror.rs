//! The mirror core: sequence numbers, the write-ahead NVLOG, group commit, and the bookkeeping
//! that decides when a FUSE reply may go out.
//!
//! A mutating operation runs as a [`Txn`]: under the sequencer lock it gets the next sequence
//! number, its frame is appended to the NVLOG, the operation is applied to the backing
//! directory, and the frame is queued for the sender. Then, without any lock, the caller waits in
//! [`Mirror::wait_durable`] until the NVLOG range is msync'ed (one msync for every frame appended
//! meanwhile) and the destination has acknowledged the sequence number, or hands the rest of
//! its work to [`Mirror::when_durable`]: the FUSE reply then leaves from the thread that
//! receives the acknowledgement, without waking the FUSE thread again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::frame;
use proto::nvlog::{Placement, Role};
use proto::record::Timestamp;
use proto::storage::{MmapStorage, Storage};
use proto::{NvLog, Op};
use tokio::sync::{mpsc, watch, Notify};

use crate::backlog::Backlog;
use crate::error::{FsError, MirrorError};

/// What to do when the destination does not acknowledge in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// No reply without the mirror: after the timeout, writes fail with EIO.
    Strict,
    /// After the timeout the source goes on alone and catches up on reconnect.
    Sync,
}

/// Offsets of the source's cursors in the NVLOG user area (also read by `fs-source check`).
pub(crate) mod cursor {
    /// Highest sequence number logged *and* applied to the backing directory.
    pub const APPLIED_SEQ: usize = 0;
    /// Generation of the volume (raised by a promotion).
    pub const GENERATION: usize = 8;
    /// Length-prefixed source name the NVRAM belongs to.
    pub const NAME: usize = 16;
    /// Bytes reserved for the name (1 length byte + up to 63 bytes).
    pub const NAME_LEN: usize = 64;
    /// Highest sequence number known durable on the backing volume: every record up to it was
    /// applied before a `syncfs` that completed. Start-up recovery replays from here.
    pub const DURABLE_SEQ: usize = 80;
    /// The backing root's replay marker (generation, sequence number) when the `syncfs` that
    /// moved the durable cursor began: a backing directory whose marker is behind it lacks
    /// records a CP made durable (a copy or a restore older than this NVRAM).
    pub const DURABLE_MARKER: usize = 88;
}

/// Requests to the CP driver.
#[derive(Debug)]
pub enum CpCommand {
    /// A partition filled up and appends moved on: commit it.
    Full(usize),
    /// Commit whatever the current partition holds, then answer.
    Demand(tokio::sync::oneshot::Sender<Result<u64, String>>),
}

/// The sequencer's state, behind the one lock that orders operations.
pub struct Sequencer {
    nvlog: NvLog<MmapStorage>,
    next_seq: u64,
    /// Records were committed to the outbox since the link task was last woken: it is woken
    /// once per transaction (and per seal), so the records of one operation (a write and its
    /// times) leave in one message and the destination flushes them with one msync.
    unsent: bool,
}

impl Sequencer {
    /// Wake the link task if records were committed since the last wake-up.
    fn wake_link(&mut self, outbox_ready: &Notify) {
        if std::mem::take(&mut self.unsent) {
            outbox_ready.notify_one();
        }
    }
}

/// Progress counters shared by FUSE threads, the flusher and the network tasks.
/// Seconds since this process started, for [`proto::rate::RecentRate`].
pub fn now_secs() -> u64 {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    START.elapsed().as_secs()
}

/// What runs once a record is settled: `Ok` when it is durable on both sides (or the policy
/// lets the source go on alone), the reason otherwise. A deferred FUSE reply, mostly.
pub type Settle = Box<dyn FnOnce(Result<(), FsError>) + Send>;

/// Operations flushed locally and waiting for the destination, by the sequence number of
/// their last record (see [`Mirror::when_durable`]).
#[derive(Default)]
struct Waiters(BTreeMap<u64, Vec<(Instant, Settle)>>);

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} waiting",
            self.0.values().map(Vec::len).sum::<usize>()
        )
    }
}

/// A settled operation and whether settling it started policy sync's run alone.
type Verdict = (Result<(), FsError>, bool);

#[derive(Debug, Default)]
pub struct Progress {
    /// Operations whose reply waits for an acknowledgement (their records are flushed).
    waiters: Waiters,
    /// Highest sequence number committed (logged and applied locally).
    pub logged: u64,
    /// Highest sequence number whose NVLOG bytes are flushed.
    pub flushed: u64,
    /// Highest sequence number the destination acknowledged.
    pub acked: u64,
    /// Highest sequence number the destination applied to the image (last CP).
    pub applied_remote: u64,
    /// Whether a thread is flushing right now.
    flushing: bool,
    /// NVLOG byte ranges appended since the last flush, and the highest seq they hold.
    dirty: Vec<(usize, usize)>,
    dirty_seq: u64,
    /// Whether a connection to the destination is established.
    pub link_up: bool,
    /// Since when the link is down (for the policy timeout).
    pub link_down_since: Option<Instant>,
    /// Policy sync: the source runs alone until it has caught up.
    pub degraded: bool,
    /// Completed consistency points.
    pub cp_count: u64,
    /// Records and bytes acknowledged by the destination.
    pub records_mirrored: u64,
    /// Bytes acknowledged by the destination.
    pub bytes_mirrored: u64,
    /// Since when records wait for an acknowledgement (for lag in seconds).
    pub lagging_since: Option<Instant>,
    /// When the destination last acknowledged a record (for the status's "last ack ... ago").
    pub last_ack_at: Option<Instant>,
    /// Records and bytes acknowledged in the last seconds (status: recent throughput).
    pub recent: proto::rate::RecentRate,
    /// When the last CP completed, and how long it took.
    pub last_cp: Option<(Instant, Duration)>,
    /// Set when the destination refused us for good (fenced...).
    pub stopped: Option<String>,
    /// Paths of the image that differ from this volume (records that failed to apply), as
    /// the destination last reported them; the resync task resends them.
    pub out_of_sync: Vec<proto::wire::Divergence>,
    /// How many paths differ in all.
    pub out_of_sync_total: u64,
    /// The initial transfer of the volume's tree.
    pub baseline: BaselineProgress,
    /// Paths being resent or queued for a resend (renames during a baseline, heals): the
    /// image is not known to be in sync until they are applied.
    pub resync_pending: u64,
}

/// Where the baseline (initial transfer of the whole tree) stands, for status and `cp`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BaselineProgress {
    /// "none" (not needed), "pending" (needed, not started), "running", "committing" (every
    /// entry sent, waiting for the CP that applies them) or "done".
    pub state: &'static str,
    /// Entries (files, directories, links...) sent.
    pub files_done: u64,
    /// Entries in the tree when the baseline started.
    pub files_total: u64,
    /// Bytes of file content sent.
    pub bytes_done: u64,
    /// Bytes of file content in the tree when the baseline started.
    pub bytes_total: u64,
    /// Content bytes per second since this run of the baseline started.
    pub rate_bytes_per_sec: f64,
    /// Seconds left at that rate (0 when unknown).
    pub eta_seconds: f64,
    /// The last record of the baseline (when every entry is sent).
    #[serde(skip)]
    pub last_seq: u64,
    /// The destination says the image holds a complete baseline.
    #[serde(skip)]
    pub confirmed: bool,
}

impl Default for BaselineProgress {
    fn default() -> Self {
        BaselineProgress {
            state: "none",
            files_done: 0,
            files_total: 0,
            bytes_done: 0,
            bytes_total: 0,
            rate_bytes_per_sec: 0.0,
            eta_seconds: 0.0,
            last_seq: 0,
            confirmed: false,
        }
    }
}

impl BaselineProgress {
    /// True while the image does not yet hold the whole volume.
    pub fn incomplete(&self) -> bool {
        matches!(self.state, "pending" | "running" | "committing")
    }
}

/// The destination's answer to a CP request.
#[derive(Debug, Clone, Default)]
pub struct CpAnswer {
    /// Highest sequence number applied to the image.
    pub applied_seq: u64,
    /// Records of this CP that could not be applied (their paths are out of sync; the
    /// destination's list is in [`Progress::out_of_sync`]).
    pub failed: u64,
}

/// Frames waiting for the sender, in sequence order.
#[derive(Debug, Default)]
pub struct Outbox {
    /// (seq, frame bytes).
    pub frames: VecDeque<(u64, Bytes)>,
}

/// Settings of the mirror core.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// No destination: replies wait for the local NVRAM only and CPs are local.
    pub standalone: bool,
    /// What to do when the destination does not answer.
    pub policy: Policy,
    /// How long a write waits for the destination before the policy applies.
    pub timeout: Duration,
}

/// Where the times of changed files come from when a partition is sealed.
///
/// Replaying records sets modification times to the time of the replay, not of the original
/// operation. So before a partition is sealed for a CP, the source logs one `SetAttr` with the
/// current atime and mtime of every inode changed since the last seal (a no-op on the backing
/// volume); the destination applies them last, and the image's times equal the backing's.
pub trait SealTimes: Send + Sync {
    /// Take the inodes changed since the last seal: (inode, current path, atime, mtime).
    fn take(&self) -> Vec<(u64, Vec<u8>, Timestamp, Timestamp)>;
    /// Give back inodes whose records did not fit; they go into the next partition.
    fn give_back(&self, inodes: Vec<u64>);
}

/// What [`Mirror::open`] returns: the core, the CP command receiver, and what start-up
/// recovery needs.
pub type Opened = (Arc<Mirror>, mpsc::UnboundedReceiver<CpCommand>, Recovery);

/// The NVRAM's side of start-up recovery.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Every record frame in NVRAM after the lower of the two cursors, in sequence order.
    pub frames: Vec<Vec<u8>>,
    /// Highest record applied to the backing volume (its page cache) before the stop.
    pub applied: u64,
    /// Highest record durable on the backing volume (covered by a completed `syncfs`).
    pub durable: u64,
}

/// Spare record buffers kept for reuse (see `proto::pool`): enough for the frames of a few
/// 1 MiB writes in flight.
const POOL_SPARE_BYTES: usize = 32 << 20;
/// Room above the largest write payload for the rest of a record (path, handle, header).
const POOL_SLACK: usize = 64 << 10;

/// The mirror core shared by every FUSE thread and the network tasks.
pub struct Mirror {
    seq: Mutex<Sequencer>,
    partition_freed: Condvar,
    progress: Mutex<Progress>,
    progress_changed: Condvar,
    /// Notified when the link, the baseline, the sync state or a CP changes, not on every
    /// acknowledgement: the baseline/resync supervisor waits on it without waking per ack.
    state_changed: Condvar,
    storage: Arc<MmapStorage>,
    /// Frames for the sender.
    pub outbox: Mutex<Outbox>,
    /// Wakes the sender.
    pub outbox_ready: Notify,
    /// Highest acked seq, for async waiters (the CP driver).
    pub acked_watch: watch::Sender<u64>,
    cp_tx: mpsc::UnboundedSender<CpCommand>,
    /// Unacknowledged records moved out of NVRAM while running alone.
    backlog: Mutex<Backlog>,
    /// The asynchronous second leg, when there is one (`--async-dest`).
    async_leg: std::sync::OnceLock<Arc<crate::async_leg::AsyncLeg>>,
    /// True while policy `sync` runs without the destination (for the CP driver).
    pub degraded_watch: watch::Sender<bool>,
    settings: MirrorSettings,
    /// Largest record payload that always fits in a partition, with room for paths.
    max_record: usize,
    /// Bytes of every partition kept for the times records logged when it is sealed.
    times_reserve: usize,
    seal_times: std::sync::OnceLock<Box<dyn SealTimes>>,
    /// Odd while a transaction holds the sequencer, bumped at its start and end: lets readers
    /// (lookup) check that no change ran while they looked, without taking the lock.
    txn_gen: std::sync::atomic::AtomicU64,
    /// Buffers records are built in; they come back once QUIC no longer holds the frame.
    pool: Arc<proto::pool::BufPool>,
    /// Bumped after anything changed extended attributes on the backing volume (a setxattr
    /// or removexattr through the mount, records taken back from the destination): what
    /// the volume remembers about absent attributes is valid only within one epoch.
    xattr_epoch: std::sync::atomic::AtomicU64,
    /// Called when the backing volume changed in a way the kernel's caches do not know of
    /// (it drops what the kernel caches): records taken back from the destination were
    /// applied, or an operation applied here was answered with an error because it could not
    /// be confirmed as mirrored. At most once a second for the latter.
    cache_stale: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// When `cache_stale` last ran for an unconfirmed operation.
    last_unconfirmed: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Room a record needs beyond its data: frame header, encoding, two paths of PATH_MAX.
pub const RECORD_OVERHEAD: usize = 2 * 4096 + 256;

impl Mirror {
    /// Open the NVLOG and check it belongs to `name`. Returns the core, the CP command receiver
    /// and the records that must be replayed on the backing directory (logged but maybe not
    /// applied when the previous process stopped).
    pub fn open(
        storage: Arc<MmapStorage>,
        geometry: proto::nvlog::Geometry,
        name: &str,
        settings: MirrorSettings,
        backlog_path: &std::path::Path,
    ) -> anyhow::Result<Opened> {
        let (nvlog, recovery) = NvLog::open(storage.clone(), geometry, Role::Source)?;
        if recovery.formatted {
            let mut n = [0u8; cursor::NAME_LEN];
            n[0] = name.len() as u8;
            n[1..1 + name.len()].copy_from_slice(name.as_bytes());
            nvlog.write_user(cursor::NAME, &n);
            nvlog.flush_user(0, cursor::NAME + cursor::NAME_LEN)?;
        } else {
            let mut n = [0u8; cursor::NAME_LEN];
            nvlog.read_user(cursor::NAME, &mut n);
            let len = (n[0] as usize).min(cursor::NAME_LEN - 1);
            let stored = String::from_utf8_lossy(&n[1..1 + len]);
            if stored != name {
                anyhow::bail!(
                    "NVRAM file {} belongs to source {stored:?}, not {name:?}; use its own NVRAM file",
                    storage.describe()
                );
            }
        }
        let read_cursor = |at: usize| {
            let mut v = [0u8; 8];
            nvlog.read_user(at, &mut v);
            u64::from_le_bytes(v)
        };
        let applied = read_cursor(cursor::APPLIED_SEQ);
        let durable = read_cursor(cursor::DURABLE_SEQ);
        let from = applied.min(durable);
        let mut frames = Vec::new();
        for p in nvlog.partitions_in_order() {
            for f in nvlog.frames(p) {
                if frame::decode(&f)
                    .map(|d| d.header.seq > from)
                    .unwrap_or(false)
                {
                    frames.push(f);
                }
            }
        }
        let replay = Recovery {
            frames,
            applied,
            durable,
        };
        let last = nvlog.last_seq().unwrap_or(0).max(applied);
        let capacity = geometry.capacity();
        let max_record = (capacity / 2)
            .saturating_sub(RECORD_OVERHEAD)
            .clamp(4096, 1 << 20);
        let (cp_tx, cp_rx) = mpsc::unbounded_channel();
        // Partitions left full by the previous run are committed first.
        for p in nvlog.partitions_in_order() {
            if p != nvlog.current() {
                let _ = cp_tx.send(CpCommand::Full(p));
            }
        }
        let backlog = Backlog::open(backlog_path)?;
        if backlog.records > 0 {
            tracing::info!(
                records = backlog.records,
                "backlog holds records not yet mirrored; they are sent on connect"
            );
        }
        let mirror = Arc::new(Mirror {
            seq: Mutex::new(Sequencer {
                nvlog,
                next_seq: last + 1,
                unsent: false,
            }),
            partition_freed: Condvar::new(),
            progress: Mutex::new(Progress {
                logged: last,
                flushed: last,
                link_down_since: Some(Instant::now()),
                ..Default::default()
            }),
            progress_changed: Condvar::new(),
            state_changed: Condvar::new(),
            storage,
            outbox: Mutex::new(Outbox::default()),
            async_leg: std::sync::OnceLock::new(),
            outbox_ready: Notify::new(),
            acked_watch: watch::channel(0).0,
            cp_tx,
            backlog: Mutex::new(backlog),
            degraded_watch: watch::channel(false).0,
            settings,
            max_record,
            times_reserve: capacity / 8,
            seal_times: std::sync::OnceLock::new(),
            txn_gen: std::sync::atomic::AtomicU64::new(0),
            pool: proto::pool::BufPool::new(POOL_SPARE_BYTES, max_record + POOL_SLACK),
            xattr_epoch: std::sync::atomic::AtomicU64::new(0),
            cache_stale: std::sync::OnceLock::new(),
            last_unconfirmed: Mutex::new(None),
        });
        Ok((mirror, cp_rx, replay))
    }

    /// Largest write payload carried by one record; bigger writes are split.
    pub fn max_record_data(&self) -> usize {
        self.max_record
    }

    /// Policy `strict` with the link known down: wait up to the timeout for it to come back,
    /// then refuse the operation before anything of it is logged or applied (a write that
    /// cannot be mirrored must not happen).
    fn wait_link_for_strict(&self) -> Result<(), FsError> {
        if self.settings.policy != Policy::Strict || self.settings.standalone {
            return Ok(());
        }
        let started = Instant::now();
        let mut p = lock(&self.progress);
        while !p.link_up {
            let waited = started.elapsed();
            if waited >= self.settings.timeout {
                return Err(MirrorError::LinkDown(self.settings.timeout).into());
            }
            p = self
                .progress_changed
                .wait_timeout(p, self.settings.timeout - waited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Start a transaction that can log records needing up to `size_hint` bytes in total.
    /// Waits (back-pressure) while every partition is full.
    pub fn begin(&self, size_hint: usize) -> Result<Txn<'_>, FsError> {
        self.wait_link_for_strict()?;
        let mut seq = lock(&self.seq);
        let need = frame::padded_len(size_hint + frame::HEADER_LEN);
        let capacity = seq.nvlog.geometry().capacity() - self.times_reserve;
        if need > capacity {
            return Err(FsError::TooLarge(size_hint));
        }
        let started = Instant::now();
        loop {
            let cur = seq.nvlog.current();
            if seq.nvlog.partition(cur).used + need <= capacity {
                break;
            }
            self.log_times(&mut seq);
            match seq.nvlog.rotate() {
                Some(_) => {
                    let _ = self.cp_tx.send(CpCommand::Full(cur));
                }
                None => {
                    tracing::debug!(
                        "every NVLOG partition is full; waiting for a consistency point"
                    );
                    // Policy strict: the partitions drain only through the destination, so a
                    // writer gives up after the timeout like one waiting for an ack.
                    let waited = started.elapsed();
                    if self.settings.policy == Policy::Strict && waited >= self.settings.timeout {
                        return Err(MirrorError::NotMirrored(self.settings.timeout).into());
                    }
                    let left = self
                        .settings
                        .timeout
                        .saturating_sub(waited)
                        .max(Duration::from_millis(50));
                    seq = self
                        .partition_freed
                        .wait_timeout(seq, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        self.txn_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Txn {
            mirror: self,
            seq,
            last_seq: None,
            size_hint,
        })
    }

    /// Wait until `seq` is flushed in the local NVRAM and acknowledged by the destination (or
    /// the policy says to go on without it). Leads the flush when no one else does (group commit).
    pub fn wait_durable(&self, seq: u64) -> Result<(), FsError> {
        let r = self.wait_durable_inner(seq);
        if r.is_err() {
            self.unconfirmed();
        }
        r
    }

    fn wait_durable_inner(&self, seq: u64) -> Result<(), FsError> {
        let started = Instant::now();
        let (mut p, flushed) = self.flush_through_locked(lock(&self.progress), seq);
        flushed?;
        loop {
            if let Some((r, degraded_now)) = self.verdict(&mut p, seq, started.elapsed()) {
                drop(p);
                if degraded_now {
                    self.degraded_watch.send_replace(true);
                }
                return r;
            }
            let left = self
                .settings
                .timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(50));
            p = self
                .progress_changed
                .wait_timeout(p, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// [`Mirror::flush_locked`] for an operation's reply: a stopped source refuses a record
    /// not yet flushed (see [`Mirror::refusal`]). The guard comes back with why not, if not.
    fn flush_through_locked<'g>(
        &'g self,
        p: MutexGuard<'g, Progress>,
        seq: u64,
    ) -> (MutexGuard<'g, Progress>, Result<(), FsError>) {
        if let Some(e) = self.refusal(&p, seq) {
            return (p, Err(e));
        }
        let (p, res) = self.flush_locked(p, seq);
        (p, res.map_err(|e| MirrorError::Flush(e).into()))
    }

    /// Why `seq` will never be confirmed, when the source was stopped for good (policy strict,
    /// or the record not even flushed locally).
    fn refusal(&self, p: &Progress, seq: u64) -> Option<FsError> {
        let why = p.stopped.as_ref()?;
        (self.settings.policy == Policy::Strict || p.flushed < seq)
            .then(|| MirrorError::Stopped(why.clone()).into())
    }

    /// Whether a record flushed in the local NVRAM, waited for since `waited`, is settled:
    /// acknowledged (or no destination), or the policy's answer once the destination has been
    /// silent for the whole timeout (strict: an error; sync: run alone, which this call may
    /// start: the flag says so, for [`Mirror::degraded_watch`]). `None`: wait on.
    fn verdict(&self, p: &mut Progress, seq: u64, waited: Duration) -> Option<Verdict> {
        if let Some(e) = self.refusal(p, seq) {
            return Some((Err(e), false));
        }
        if p.acked >= seq || self.settings.standalone {
            return Some((Ok(()), false));
        }
        if p.degraded && self.settings.policy == Policy::Sync {
            return Some((Ok(()), false));
        }
        if waited < self.settings.timeout {
            return None;
        }
        Some(match self.settings.policy {
            Policy::Strict => (
                Err(MirrorError::NotMirrored(self.settings.timeout).into()),
                false,
            ),
            Policy::Sync => {
                tracing::warn!(
                    "destination did not acknowledge for {:?}: continuing alone (policy sync); \
                     unmirrored records are kept and sent on reconnect",
                    self.settings.timeout
                );
                p.degraded = true;
                (Ok(()), true)
            }
        })
    }

    /// [`Mirror::wait_durable`] without waiting for the destination on this thread: the local
    /// flush is done (or joined) here, then `settle` runs as soon as `seq` is settled, here if
    /// it already is, else on the thread that receives the acknowledgement (or applies the
    /// policy's timeout). It must not block: it runs on the network thread.
    pub fn when_durable(&self, seq: u64, settle: Settle) {
        let started = Instant::now();
        let (mut p, flushed) = self.flush_through_locked(lock(&self.progress), seq);
        let verdict = match flushed {
            Ok(()) => self.verdict(&mut p, seq, started.elapsed()),
            Err(e) => Some((Err(e), false)),
        };
        match verdict {
            Some((r, degraded_now)) => {
                drop(p);
                if degraded_now {
                    self.degraded_watch.send_replace(true);
                }
                self.settle(vec![(r, settle)]);
            }
            None => p.waiters.0.entry(seq).or_default().push((started, settle)),
        }
    }

    /// Run settled operations' continuations (no lock held), noting unconfirmed ones.
    fn settle(&self, done: Vec<(Result<(), FsError>, Settle)>) {
        for (r, settle) in done {
            if r.is_err() {
                self.unconfirmed();
            }
            settle(r);
        }
    }

    /// Settle the waiters the acknowledgements so far cover (cheap: the oldest first).
    fn settle_acked(&self, p: &mut Progress) -> Vec<(Result<(), FsError>, Settle)> {
        let mut done = Vec::new();
        while let Some(e) = p.waiters.0.first_entry() {
            if *e.key() > p.acked {
                break;
            }
            done.extend(e.remove().into_iter().map(|(_, s)| (Ok(()), s)));
        }
        done
    }

    /// Settle every waiter the state now decides (timeouts, a stop, running alone): called
    /// periodically by the network runtime and after such changes.
    pub fn settle_waiters(&self) {
        let mut p = lock(&self.progress);
        if p.waiters.0.is_empty() {
            return;
        }
        let mut done = Vec::new();
        let mut degraded = false;
        let waiting = std::mem::take(&mut p.waiters.0);
        for (seq, list) in waiting {
            for (since, settle) in list {
                match self.verdict(&mut p, seq, since.elapsed()) {
                    Some((r, d)) => {
                        degraded |= d;
                        done.push((r, settle));
                    }
                    None => p.waiters.0.entry(seq).or_default().push((since, settle)),
                }
            }
        }
        drop(p);
        if degraded {
            self.degraded_watch.send_replace(true);
        }
        self.settle(done);
    }

    fn flush(&self, ranges: &[(usize, usize)]) -> std::io::Result<()> {
        // The records and the applied-sequence cursor (in the superblock's user area) with one
        // flush: on a disk file every msync pays for a device cache flush.
        let mut all = Vec::with_capacity(ranges.len() + 1);
        all.extend_from_slice(ranges);
        all.push((proto::nvlog::USER_AREA_OFFSET + cursor::APPLIED_SEQ, 8));
        self.storage.flush_ranges(&all)
    }

    /// Flush every range appended so far, as the one thread doing it (the caller saw no flush
    /// running): the progress lock is released during the flush and held again after it.
    fn lead_flush<'g>(
        &'g self,
        mut p: MutexGuard<'g, Progress>,
    ) -> (MutexGuard<'g, Progress>, std::io::Result<()>) {
        p.flushing = true;
        let ranges = std::mem::take(&mut p.dirty);
        let upto = p.dirty_seq;
        drop(p);
        let res = self.flush(&ranges);
        let mut p = lock(&self.progress);
        p.flushing = false;
        match &res {
            Ok(()) => p.flushed = p.flushed.max(upto),
            Err(_) => p.dirty.extend(ranges),
        }
        self.progress_changed.notify_all();
        (p, res)
    }

    /// Make every record up to `seq` durable in the local NVRAM (leading the flush if no one
    /// does), without waiting for the destination. A CP asks the destination to apply only
    /// records the source itself holds durably, so the destination never applies (and then
    /// discards) a record a power cut could take from the source's NVRAM.
    pub fn flush_through(&self, seq: u64) -> Result<(), MirrorError> {
        self.flush_locked(lock(&self.progress), seq)
            .1
            .map_err(MirrorError::Flush)
    }

    /// Flush on this thread until every logged record up to `seq` is durable in the local
    /// NVRAM: lead the flush when none runs (group commit), else wait for the one that does.
    fn flush_locked<'g>(
        &'g self,
        mut p: MutexGuard<'g, Progress>,
        seq: u64,
    ) -> (MutexGuard<'g, Progress>, std::io::Result<()>) {
        while p.flushed < seq && p.logged >= seq {
            if p.flushing {
                // Another thread's flush is running; it notifies when done.
                p = self
                    .progress_changed
                    .wait_timeout(p, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let (guard, res) = self.lead_flush(p);
            p = guard;
            if res.is_err() {
                return (p, res);
            }
        }
        (p, Ok(()))
    }

    /// Record an acknowledgement from the destination.
    pub fn on_ack(&self, durable_seq: u64, records: u64, bytes: u64) {
        let mut p = lock(&self.progress);
        if durable_seq > p.acked {
            p.last_ack_at = Some(Instant::now());
            p.acked = durable_seq;
            p.records_mirrored += records;
            p.bytes_mirrored += bytes;
            p.recent.add(now_secs(), records, bytes);
            if p.degraded && p.acked >= p.logged {
                tracing::info!("destination caught up: synchronous mirroring again");
                p.degraded = false;
                self.state_changed.notify_all();
                self.degraded_watch.send_replace(false);
            }
            p.lagging_since = (p.acked < p.logged).then(Instant::now);
        }
        let acked = p.acked;
        let done = self.settle_acked(&mut p);
        drop(p);
        // Deferred replies leave from here, before anything else is woken.
        self.settle(done);
        // Notified after the lock is released: a waiter woken under it would only block again
        // on the mutex (two more futex calls and a context switch per acknowledgement).
        self.progress_changed.notify_all();
        self.acked_watch.send_if_modified(|a| {
            let changed = *a != acked;
            *a = acked;
            changed
        });
    }

    /// Policy `sync`: once the link has been down for the whole timeout, run alone (so CPs spill
    /// unacknowledged records to the backlog instead of waiting).
    pub fn check_link_timeout(&self) {
        let mut p = lock(&self.progress);
        let down_for = p.link_down_since.map(|t| t.elapsed()).unwrap_or_default();
        if self.settings.policy == Policy::Sync
            && !p.link_up
            && !p.degraded
            && down_for >= self.settings.timeout
        {
            tracing::warn!(
                "destination unreachable for {down_for:?}: continuing alone (policy sync); \
                 unmirrored records are kept and sent on reconnect"
            );
            p.degraded = true;
            drop(p);
            self.degraded_watch.send_replace(true);
            self.settle_waiters();
        }
    }

    /// True when the volume has no destination.
    pub fn standalone(&self) -> bool {
        self.settings.standalone
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.settings.policy
    }

    /// Move the unacknowledged records of partition `p` to the backlog file (durably), then free
    /// the partition. The caller made the backing directory durable first.
    pub fn spill_and_free(&self, p: usize) -> Result<u64, MirrorError> {
        let mut seq = lock(&self.seq);
        let acked = lock(&self.progress).acked;
        let frames: Vec<Vec<u8>> = seq
            .nvlog
            .frames(p)
            .into_iter()
            .filter(|f| {
                frame::decode(f)
                    .map(|d| d.header.seq > acked)
                    .unwrap_or(false)
            })
            .collect();
        let n = frames.len() as u64;
        lock(&self.backlog)
            .append(&frames)
            .map_err(|e| MirrorError::Flush(std::io::Error::other(e.to_string())))?;
        self.keep_for_async_leg(&seq, p)?;
        seq.nvlog.free(p)?;
        self.partition_freed.notify_all();
        Ok(n)
    }

    /// Empty the backlog once the destination has acknowledged everything in it.
    pub fn trim_backlog(&self) {
        let acked = lock(&self.progress).acked;
        let mut b = lock(&self.backlog);
        if b.last_seq.is_some_and(|last| last <= acked) {
            if let Err(e) = b.reset() {
                tracing::warn!("{e}");
            }
        }
    }

    /// (records, bytes) in the backlog.
    pub fn backlog_size(&self) -> (u64, u64) {
        let b = lock(&self.backlog);
        (b.records, b.bytes)
    }

    /// Record that the link went up or down.
    pub fn set_link(&self, up: bool) {
        let mut p = lock(&self.progress);
        p.link_up = up;
        p.link_down_since = if up {
            None
        } else {
            p.link_down_since.or(Some(Instant::now()))
        };
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
    }

    /// Wait up to `timeout` for the first connection to the destination. Returns `Ok(true)` when
    /// connected, `Ok(false)` on timeout, and the reason when the destination refused us.
    pub fn wait_first_link(&self, timeout: Duration) -> Result<bool, String> {
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.progress);
        loop {
            if let Some(why) = &p.stopped {
                return Err(why.clone());
            }
            if p.link_up {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            p = self
                .progress_changed
                .wait_timeout(p, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stop mirroring for good (the destination refused us).
    pub fn stop(&self, why: String) {
        let mut p = lock(&self.progress);
        p.stopped = Some(why);
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
        drop(p);
        self.settle_waiters();
    }

    /// The destination told us (in its welcome) how far its image is applied.
    pub fn note_applied(&self, applied_seq: u64) {
        let mut p = lock(&self.progress);
        p.applied_remote = p.applied_remote.max(applied_seq);
    }

    /// A CP that took `took` completed (for status).
    pub fn note_cp_time(&self, took: Duration) {
        crate::cp_durations::observe(took);
        lock(&self.progress).last_cp = Some((Instant::now(), took));
    }

    /// Record a completed CP.
    pub fn on_cp_done(&self, applied_seq: u64) {
        let mut p = lock(&self.progress);
        p.applied_remote = p.applied_remote.max(applied_seq);
        p.cp_count += 1;
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
    }

    /// Record what the destination says of the image's divergences (at a handshake or a CP).
    pub fn note_out_of_sync(&self, listed: Vec<proto::wire::Divergence>, total: u64) {
        let mut p = lock(&self.progress);
        if total > 0 && p.out_of_sync_total == 0 {
            tracing::warn!(
                paths = total,
                "the image is out of sync with this volume at {total} path(s) (records failed to apply); resending them"
            );
        } else if total == 0 && p.out_of_sync_total > 0 {
            tracing::info!("the image is in sync with this volume again");
        }
        p.out_of_sync = listed;
        p.out_of_sync_total = total;
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
    }

    /// Change the baseline's progress.
    pub fn update_baseline(&self, f: impl FnOnce(&mut BaselineProgress)) {
        let mut p = lock(&self.progress);
        f(&mut p.baseline);
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
    }

    /// How many paths are being resent or wait for a resend.
    pub fn set_resync_pending(&self, n: u64) {
        let mut p = lock(&self.progress);
        p.resync_pending = n;
        self.progress_changed.notify_all();
        self.state_changed.notify_all();
    }

    /// Wait up to `timeout` for any change of progress (for the resync task).
    pub fn wait_progress(&self, timeout: Duration) {
        let p = lock(&self.progress);
        let _ = self.state_changed.wait_timeout(p, timeout);
    }

    /// A snapshot of the counters.
    pub fn progress<R>(&self, f: impl FnOnce(&Progress) -> R) -> R {
        f(&lock(&self.progress))
    }

    /// Free partition `p` after its CP and wake writers waiting for room.
    pub fn free_partition(&self, p: usize) -> Result<(), MirrorError> {
        let mut seq = lock(&self.seq);
        self.keep_for_async_leg(&seq, p)?;
        seq.nvlog.free(p)?;
        self.partition_freed.notify_all();
        Ok(())
    }

    /// Rotate away from the current partition if it holds records (timer or demand CP).
    /// Returns the partition to commit, if any; `Err(())` when no partition is free to rotate
    /// into (a CP in progress will free one).
    pub fn seal_current(&self) -> Result<Option<usize>, ()> {
        let mut seq = lock(&self.seq);
        let cur = seq.nvlog.current();
        if seq.nvlog.partition(cur).is_empty() {
            return Ok(None);
        }
        self.log_times(&mut seq);
        match seq.nvlog.rotate() {
            Some(_) => Ok(Some(cur)),
            None => Err(()),
        }
    }

    /// The transaction generation: even when no transaction runs. A reader that sees the same
    /// even value before and after its work saw no change of the namespace.
    pub fn txn_generation(&self) -> u64 {
        self.txn_gen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hold the sequencer without logging anything (a reader that must not race changes).
    pub fn quiesce(&self) -> MutexGuard<'_, Sequencer> {
        lock(&self.seq)
    }

    /// Install the source of times logged at each seal (see [`SealTimes`]).
    pub fn set_seal_times(&self, source: Box<dyn SealTimes>) {
        let _ = self.seal_times.set(source);
    }

    /// Log the times of every inode changed since the last seal into the current partition
    /// (into its reserve); what does not fit waits for the next seal.
    fn log_times(&self, seq: &mut Sequencer) {
        let Some(source) = self.seal_times.get() else {
            return;
        };
        let mut left = Vec::new();
        for (ino, path, atime, mtime) in source.take() {
            if !left.is_empty() {
                left.push(ino);
                continue;
            }
            let op = Op::times(path, atime, mtime);
            let mut buf = Vec::new();
            frame::begin(&mut buf);
            op.encode_into(&mut buf);
            let seq_no = seq.next_seq;
            if frame::seal(&mut buf, seq_no, 0, 0, frame::KIND_RECORD, 0).is_err() {
                continue;
            }
            match seq.nvlog.append(&mut buf) {
                // Already true of the backing volume: nothing to apply here.
                Ok(Ok(placement)) => self.committed(seq, seq_no, buf, placement),
                Ok(Err(_)) => left.push(ino),
                Err(e) => {
                    tracing::warn!("logging times at a seal: {e}");
                    left.push(ino);
                }
            }
        }
        if !left.is_empty() {
            source.give_back(left);
        }
        seq.wake_link(&self.outbox_ready);
    }

    /// Bookkeeping of a record logged (and applied): cursor, progress, flush range, outbox.
    fn committed(&self, seq: &mut Sequencer, seq_no: u64, buf: Vec<u8>, placement: Placement) {
        seq.next_seq += 1;
        seq.nvlog
            .write_user(cursor::APPLIED_SEQ, &seq_no.to_le_bytes());
        {
            let mut p = lock(&self.progress);
            p.logged = seq_no;
            p.dirty_seq = seq_no;
            if p.lagging_since.is_none() && p.acked < seq_no {
                p.lagging_since = Some(Instant::now());
            }
            match p.dirty.last_mut() {
                Some((off, l)) if *off + frame::padded_len(*l) == placement.offset => {
                    *l = placement.offset + placement.len - *off;
                }
                _ => p.dirty.push((placement.offset, placement.len)),
            }
        }
        lock(&self.outbox)
            .frames
            .push_back((seq_no, self.pool.freeze(buf)));
        seq.unsent = true;
        if let Some(leg) = self.async_leg.get() {
            leg.note_logged();
        }
    }

    /// Serve an asynchronous second leg from now on (before the first record is logged).
    pub fn set_async_leg(&self, leg: Arc<crate::async_leg::AsyncLeg>) {
        let _ = self.async_leg.set(leg);
    }

    /// The asynchronous leg, if there is one.
    pub fn async_leg(&self) -> Option<&Arc<crate::async_leg::AsyncLeg>> {
        self.async_leg.get()
    }

    /// Before partition `p` is freed: its records the asynchronous leg has not acknowledged go
    /// to the leg's spill file (durably).
    fn keep_for_async_leg(&self, seq: &Sequencer, p: usize) -> Result<(), MirrorError> {
        let Some(leg) = self.async_leg.get() else {
            return Ok(());
        };
        // Only what the leg lacks is copied: nothing at all while it keeps up.
        let frames: Vec<Vec<u8>> = seq
            .nvlog
            .frames_after(p, leg.floor(), usize::MAX)
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        if frames.is_empty() {
            return Ok(());
        }
        leg.keep(&frames)
            .map_err(|e| MirrorError::Flush(std::io::Error::other(e)))
    }

    /// The oldest record the asynchronous leg could still be sent (spill file, then NVRAM).
    pub fn async_first_held(&self, leg: &crate::async_leg::AsyncLeg) -> Option<u64> {
        let seq = lock(&self.seq);
        let from_spill = lock(&leg.spill).first_seq;
        let from_nvram = seq
            .nvlog
            .partitions_in_order()
            .first()
            .and_then(|&p| seq.nvlog.partition(p).first_seq);
        from_spill.or(from_nvram)
    }

    /// Up to about `max_bytes` of frames above `after` for the asynchronous leg: from its spill
    /// file first, then from NVRAM; never a gap.
    pub fn async_frames_after(
        &self,
        leg: &crate::async_leg::AsyncLeg,
        after: u64,
        max_bytes: usize,
    ) -> Vec<(u64, Bytes)> {
        let seq = lock(&self.seq);
        let mut out = Vec::new();
        let mut taken = 0;
        {
            let mut spill = lock(&leg.spill);
            if spill.last_seq.is_some_and(|last| last > after) {
                match spill.frames_after(after) {
                    Ok(frames) => {
                        for (s, b) in frames {
                            if taken >= max_bytes {
                                return out;
                            }
                            taken += b.len();
                            out.push((s, b));
                        }
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        return out;
                    }
                }
            }
        }
        let after = out.last().map_or(after, |(s, _)| *s);
        for p in seq.nvlog.partitions_in_order() {
            if taken >= max_bytes {
                break;
            }
            for (s, b) in seq.nvlog.frames_after(p, after, max_bytes - taken) {
                taken += b.len();
                out.push((s, Bytes::from(b)));
            }
        }
        out
    }

    /// Take every frame with a sequence number above `after` from the NVLOG (for resending
    /// after a reconnect) and empty the outbox, atomically with respect to new appends.
    pub fn frames_after(&self, after: u64) -> Vec<(u64, Bytes)> {
        let seq = lock(&self.seq);
        let mut out = match lock(&self.backlog).frames_after(after) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("{e}");
                Vec::new()
            }
        };
        let from_backlog = out.last().map(|(s, _)| *s).unwrap_or(0);
        for p in seq.nvlog.partitions_in_order() {
            for f in seq.nvlog.frames(p) {
                if let Ok(d) = frame::decode(&f) {
                    if d.header.seq > after.max(from_backlog) {
                        out.push((d.header.seq, Bytes::from(f)));
                    }
                }
            }
        }
        lock(&self.outbox).frames.clear();
        out
    }

    /// The last sequence number of partition `p` (None when empty).
    pub fn partition_last_seq(&self, p: usize) -> Option<u64> {
        lock(&self.seq).nvlog.partition(p).last_seq
    }

    /// Per-partition fill, for status.
    pub fn partitions(&self) -> Vec<(usize, usize, usize, u64)> {
        let seq = lock(&self.seq);
        let g = seq.nvlog.geometry();
        (0..g.partitions)
            .map(|p| {
                let i = seq.nvlog.partition(p);
                (p, i.used, g.capacity(), i.records)
            })
            .collect()
    }

    /// The generation stored in NVRAM.
    pub fn generation(&self) -> u64 {
        let mut g = [0u8; 8];
        lock(&self.seq).nvlog.read_user(cursor::GENERATION, &mut g);
        u64::from_le_bytes(g)
    }

    /// Move to `generation`, kept in NVRAM. A higher one starts a new history: the records
    /// of the old one belong to a fenced past (the destination was promoted meanwhile), so they
    /// are dropped, never replayed or sent, and sequence numbers start again at 1 — the
    /// destination's demotion reset its side too. A lower one is refused.
    pub fn set_generation(&self, generation: u64) -> Result<bool, String> {
        let mut s = lock(&self.seq);
        let mut g = [0u8; 8];
        s.nvlog.read_user(cursor::GENERATION, &mut g);
        let current = u64::from_le_bytes(g);
        if generation < current {
            return Err(format!(
                "--generation {generation} is older than the generation {current} this NVRAM already holds"
            ));
        }
        if generation == current {
            return Ok(false);
        }
        let io = |e: &dyn std::fmt::Display| format!("starting generation {generation}: {e}");
        for p in 0..s.nvlog.geometry().partitions {
            if !s.nvlog.partition(p).is_empty() {
                s.nvlog.free(p).map_err(|e| io(&e))?;
            }
        }
        lock(&self.backlog).reset().map_err(|e| io(&e))?;
        s.nvlog.write_user(cursor::APPLIED_SEQ, &0u64.to_le_bytes());
        s.nvlog
            .write_user(cursor::GENERATION, &generation.to_le_bytes());
        s.nvlog.flush_user(0, cursor::NAME).map_err(|e| io(&e))?;
        s.next_seq = 1;
        let mut p = lock(&self.progress);
        p.logged = 0;
        p.flushed = 0;
        p.acked = 0;
        p.applied_remote = 0;
        p.dirty.clear();
        lock(&self.outbox).frames.clear();
        if let Some(leg) = self.async_leg.get() {
            leg.reset().map_err(|e| e.to_string())?;
        }
        Ok(true)
    }

    /// The current extended-attribute epoch (see `xattr_epoch`).
    pub fn xattr_epoch(&self) -> u64 {
        self.xattr_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// End an extended-attribute epoch: call after changing attributes on the backing volume.
    pub fn xattrs_changed(&self) {
        self.xattr_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Send a command to the CP driver.
    pub fn cp_command(&self, c: CpCommand) {
        let _ = self.cp_tx.send(c);
    }

    /// Take back records this source had sent but lost (a power cut before its own flush),
    /// as the destination returned them: each must be the next sequence number; it is logged
    /// again and applied to the backing volume in replay mode. Returns the last one.
    pub fn adopt(&self, frames: &[u8], tree: &proto::apply::Tree) -> Result<u64, String> {
        let _epoch = XattrChange(self);
        let mut last = lock(&self.progress).logged;
        for f in frame::split(frames) {
            let f = f.map_err(|e| format!("a record sent back by the destination: {e}"))?;
            let op = Op::decode(f.payload)
                .map_err(|e| format!("record {} sent back does not decode: {e}", f.header.seq))?;
            let mut txn = self
                .begin(f.payload.len() + RECORD_OVERHEAD)
                .map_err(|e| format!("logging record {} again: {e}", f.header.seq))?;
            if txn.next_seq() != f.header.seq {
                return Err(format!(
                    "the destination sent back record {} but this source expects {}",
                    f.header.seq,
                    txn.next_seq()
                ));
            }
            txn.record(
                |b| b.extend_from_slice(f.payload),
                || {
                    if !matches!(op, Op::Replace { .. }) {
                        if op.is_namespace() {
                            tree.set_marker(f.header.seq).map_err(|e| {
                                FsError::Backing(rustix::io::Errno::from_raw_os_error(
                                    e.raw_os_error(),
                                ))
                            })?;
                        }
                        if let Err(e) = tree.apply(&op, proto::apply::ApplyMode::Replay) {
                            tracing::warn!(
                                seq = f.header.seq,
                                "re-applying a record sent back: {e}"
                            );
                        }
                        if matches!(op, Op::SetXattr { .. } | Op::RemoveXattr { .. }) {
                            // At once, not only when adopting ends: a write meanwhile must not
                            // trust a "no capabilities" seen before this record.
                            self.xattrs_changed();
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|e| format!("logging record {} again: {e}", f.header.seq))?;
            last = f.header.seq;
        }
        self.flush_through(last).map_err(|e| e.to_string())?;
        if let Some(hook) = self.cache_stale.get() {
            hook();
        }
        Ok(last)
    }

    /// Install what runs when the kernel's caches may be stale (see `cache_stale`).
    pub fn on_cache_stale(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.cache_stale.set(hook);
    }

    /// An operation was applied to the backing volume but its caller gets an error (not
    /// mirrored in time, the mirror stopped, the NVRAM flush failed): the kernel keeps what it
    /// cached of before, which it would otherwise keep for a minute.
    fn unconfirmed(&self) {
        let Some(hook) = self.cache_stale.get() else {
            return;
        };
        {
            let mut last = lock(&self.last_unconfirmed);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        hook();
    }

    /// Mark every replayed record as applied (after start-up recovery).
    pub fn set_applied(&self, seq: u64) -> std::io::Result<()> {
        let s = lock(&self.seq);
        s.nvlog.write_user(cursor::APPLIED_SEQ, &seq.to_le_bytes());
        s.nvlog.flush_user(cursor::APPLIED_SEQ, 8)
    }

    /// The highest record applied to the backing volume so far: what a `syncfs` starting now
    /// makes durable.
    pub fn durable_point(&self) -> u64 {
        lock(&self.progress).logged
    }

    /// A `syncfs` of the backing volume that started at `point` (see
    /// [`Mirror::durable_point`]) completed: recovery need not replay records up to it. Flushed
    /// before any partition holding them is freed.
    pub fn set_durable(
        &self,
        point: u64,
        marker: Option<proto::replay::Marker>,
    ) -> std::io::Result<()> {
        let s = lock(&self.seq);
        let mut v = [0u8; 8];
        s.nvlog.read_user(cursor::DURABLE_SEQ, &mut v);
        let durable = u64::from_le_bytes(v);
        if durable >= point && marker.is_none() {
            return Ok(());
        }
        s.nvlog
            .write_user(cursor::DURABLE_SEQ, &point.max(durable).to_le_bytes());
        if let Some(m) = marker {
            s.nvlog.write_user(cursor::DURABLE_MARKER, &m.encode());
        }
        s.nvlog.flush_user(cursor::DURABLE_SEQ, 24)
    }

    /// The backing root's marker recorded with the durable cursor (see `DURABLE_MARKER`).
    pub fn durable_marker(&self) -> Option<proto::replay::Marker> {
        let s = lock(&self.seq);
        let mut v = [0u8; 16];
        s.nvlog.read_user(cursor::DURABLE_MARKER, &mut v);
        proto::replay::Marker::decode(&v).filter(|m| m.seq > 0)
    }
}

/// One or more records logged and applied under the sequencer lock.
pub struct Txn<'a> {
    mirror: &'a Mirror,
    seq: MutexGuard<'a, Sequencer>,
    last_seq: Option<u64>,
    /// What `begin` was told the records need: the first buffer is taken this big.
    size_hint: usize,
}

/// Ends the extended-attribute epoch when dropped, whichever way the change went.
struct XattrChange<'a>(&'a Mirror);

impl Drop for XattrChange<'_> {
    fn drop(&mut self) {
        self.0.xattrs_changed();
    }
}

impl Txn<'_> {
    /// Log the record `encode` writes (the payload), run `apply` on the backing directory, and
    /// keep the record only if `apply` succeeds (write-ahead: logged before the backing changes;
    /// a failed operation is retracted and never mirrored).
    pub fn record<T>(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>),
        apply: impl FnOnce() -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let seq_no = self.seq.next_seq;
        let mut buf = self
            .mirror
            .pool
            .take(std::mem::take(&mut self.size_hint) + frame::HEADER_LEN);
        frame::begin(&mut buf);
        encode(&mut buf);
        let len = buf.len();
        frame::seal(&mut buf, seq_no, 0, 0, frame::KIND_RECORD, 0)
            .map_err(|e| MirrorError::Nvram(e.into()))?;
        let placement: Placement = match self
            .seq
            .nvlog
            .append(&mut buf)
            .map_err(MirrorError::Nvram)?
        {
            Ok(p) => p,
            // `begin` reserved room; a bigger record than announced is refused.
            Err(_) => return Err(FsError::TooLarge(len)),
        };
        match apply() {
            Ok(v) => {
                self.mirror.committed(&mut self.seq, seq_no, buf, placement);
                self.last_seq = Some(seq_no);
                Ok(v)
            }
            Err(e) => {
                self.seq.nvlog.retract(placement);
                Err(e)
            }
        }
    }

    /// Log `op` and apply it to the backing tree as a new operation (setting the replay marker
    /// first when it changes the namespace, see `proto::replay`).
    pub fn apply(&mut self, tree: &proto::apply::Tree, op: &Op) -> Result<(), FsError> {
        let seq = self.seq.next_seq;
        self.record(
            |b| op.encode_into(b),
            || {
                tree.apply_logged(seq, op)
                    .map_err(|e| FsError::Backing(rustix::io::Errno::from_raw_os_error(e.errno())))
            },
        )
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.seq.next_seq
    }

    /// Release the lock without waiting; returns the last sequence number logged, for a later
    /// [`Mirror::wait_durable`].
    pub fn release(self) -> Option<u64> {
        self.last_seq
    }

    /// Release the lock and wait until every record of this transaction is durable on both
    /// sides (per policy). A transaction that logged nothing returns at once.
    pub fn finish(self) -> Result<(), FsError> {
        let (mirror, last_seq) = (self.mirror, self.last_seq);
        drop(self);
        match last_seq {
            Some(s) => mirror.wait_durable(s),
            None => Ok(()),
        }
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        // Still under the sequencer lock (the guard field drops after this).
        self.seq.wake_link(&self.mirror.outbox_ready);
        self.mirror
            .txn_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A mirror over a fresh NVRAM file in a temporary directory (removed on drop).
    struct Fixture {
        mirror: Arc<Mirror>,
        dir: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(test: &str, policy: Policy, timeout: Duration) -> Fixture {
        let dir = std::env::temp_dir().join(format!("nvm-mirror-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let geometry = proto::nvlog::Geometry {
            partitions: 2,
            partition_size: 1 << 20,
        };
        let (storage, _) =
            MmapStorage::open(&dir.join("nv"), geometry.region_len()).expect("NVRAM file");
        let settings = MirrorSettings {
            standalone: false,
            policy,
            timeout,
        };
        let (mirror, _cp, _recovery) = Mirror::open(
            Arc::new(storage),
            geometry,
            "t",
            settings,
            &dir.join("nv.backlog"),
        )
        .expect("open the mirror");
        // As once connected (policy strict refuses to log anything with the link down).
        mirror.set_link(true);
        Fixture { mirror, dir }
    }

    /// Log one record (no backing change) and return its sequence number.
    fn log_one(m: &Mirror) -> u64 {
        let mut txn = m.begin(64).expect("begin");
        let seq = txn.next_seq();
        txn.record(|b| b.extend_from_slice(b"payload"), || Ok(()))
            .expect("record");
        assert_eq!(txn.release(), Some(seq));
        seq
    }

    /// Log a record and file a reporting continuation for it: (its sequence number, reports).
    fn waiting(m: &Mirror) -> (u64, mpsc::Receiver<(bool, std::thread::ThreadId)>) {
        let seq = log_one(m);
        let (settle, rx) = reporter();
        m.when_durable(seq, settle);
        (seq, rx)
    }

    /// A continuation that reports its outcome and the thread it ran on.
    fn reporter() -> (Settle, mpsc::Receiver<(bool, std::thread::ThreadId)>) {
        let (tx, rx) = mpsc::channel();
        let settle: Settle = Box::new(move |r| {
            let _ = tx.send((r.is_ok(), std::thread::current().id()));
        });
        (settle, rx)
    }

    #[test]
    fn a_deferred_reply_runs_on_the_thread_that_delivers_the_ack() {
        let f = fixture("ack", Policy::Strict, Duration::from_secs(60));
        let (seq, rx) = waiting(&f.mirror);
        assert!(
            rx.try_recv().is_err(),
            "settled before the destination acknowledged"
        );
        // An ack below the record settles nothing.
        f.mirror.on_ack(seq - 1, 0, 0);
        assert!(
            rx.try_recv().is_err(),
            "settled by an ack of an earlier record"
        );
        let m = f.mirror.clone();
        let acker = std::thread::spawn(move || {
            m.on_ack(seq, 1, 7);
            std::thread::current().id()
        })
        .join()
        .expect("ack thread");
        let (ok, on) = rx.recv_timeout(Duration::from_secs(5)).expect("settled");
        assert!(ok, "an acknowledged record settles with success");
        assert_eq!(
            on, acker,
            "the reply must leave from the acknowledging thread"
        );
        // Already acknowledged: settled at once, on the caller's thread.
        let (settle, rx) = reporter();
        f.mirror.when_durable(seq, settle);
        let (ok, on) = rx.try_recv().expect("settled at once");
        assert!(ok);
        assert_eq!(on, std::thread::current().id());
    }

    #[test]
    fn strict_policy_fails_a_waiting_reply_after_the_timeout() {
        let timeout = Duration::from_millis(200);
        let f = fixture("strict", Policy::Strict, timeout);
        let (seq, rx) = waiting(&f.mirror);
        f.mirror.settle_waiters();
        assert!(rx.try_recv().is_err(), "failed before the timeout");
        std::thread::sleep(timeout + Duration::from_millis(50));
        f.mirror.settle_waiters();
        let (ok, _) = rx.try_recv().expect("settled after the timeout");
        assert!(
            !ok,
            "strict: no acknowledgement within the timeout is an error"
        );
        // A late ack finds nothing left to settle (each continuation runs once).
        f.mirror.on_ack(seq, 1, 7);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn sync_policy_lets_waiting_replies_go_on_alone_after_the_timeout() {
        let timeout = Duration::from_millis(200);
        let f = fixture("sync", Policy::Sync, timeout);
        let (_, rx) = waiting(&f.mirror);
        std::thread::sleep(timeout + Duration::from_millis(50));
        f.mirror.settle_waiters();
        let (ok, _) = rx.try_recv().expect("settled after the timeout");
        assert!(ok, "sync: the source goes on alone");
        assert!(
            f.mirror.progress(|p| p.degraded),
            "running alone is recorded"
        );
        // While alone, a new record settles as soon as it is flushed locally.
        let (_, rx) = waiting(&f.mirror);
        assert!(rx.try_recv().expect("settled at once").0);
    }

    #[test]
    fn a_stop_fails_waiting_replies_under_strict() {
        let f = fixture("stop", Policy::Strict, Duration::from_secs(60));
        let (_, rx) = waiting(&f.mirror);
        f.mirror.stop("fenced".into());
        let (ok, _) = rx.try_recv().expect("settled by the stop");
        assert!(!ok);
    }
}
