//! The destination engine: the shared NVLOG, the group-commit flusher, the registry of
//! sources, and the checks every record passes before it is logged.
//!
//! Locks: the NVLOG sits behind one `std::sync::Mutex` held only while frames are copied in
//! (or a partition is rotated/freed); flushing (msync), destaging (journal writes) and CPs run
//! outside it, on their own threads/tasks. Per source, `Source::ingest` (an async mutex)
//! serialises the connection that currently owns the source's sequence stream.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use proto::frame::{self, KIND_RECORD};
use proto::nvlog::{Geometry, NvLog, NvLogError, PARTITION_HEADER_LEN, SUPERBLOCK_LEN};
use proto::storage::{MmapStorage, Storage};
use proto::wire::Control;
use proto::Op;
use tokio::sync::{mpsc, watch};

use crate::journal::{self, Journal};
use crate::slots::{Slot, SlotTable};

/// Most source partitions a record may name (the NVLOG's partition limit).
pub const MAX_SOURCE_PARTITIONS: u16 = 64;

/// Lock a std mutex, recovering the data if a panicking thread poisoned it (every critical
/// section leaves the data consistent between statements that can panic).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A wake-up flag for a worker thread.
#[derive(Debug, Default)]
pub struct Signal {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    /// Wake the worker.
    pub fn notify(&self) {
        *lock(&self.flag) = true;
        self.cv.notify_one();
    }

    /// Wait until notified or `timeout` passes; returns whether it was notified.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let mut g = lock(&self.flag);
        if !*g {
            g = match self.cv.wait_timeout(g, timeout) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        std::mem::replace(&mut *g, false)
    }
}

/// What a connection's writer task sends back to the source.
#[derive(Debug)]
pub enum Out {
    /// Frames up to `src_seq` were appended as destination frame `dest_seq`: ack once flushed.
    Appended {
        /// Destination sequence number of the last appended frame.
        dest_seq: u64,
        /// Source sequence number of that frame.
        src_seq: u64,
    },
    /// A control message to send.
    Control(Control),
    /// A last message: send it, then close the connection.
    Fatal(Control),
}

/// Counters shown by `status`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records accepted.
    pub records_received: AtomicU64,
    /// Bytes of accepted frames.
    pub bytes_received: AtomicU64,
    /// CPs completed.
    pub cp_count: AtomicU64,
    /// Records that failed to apply at a CP.
    pub apply_errors: AtomicU64,
    /// Records a CP left out because they made and removed a file within its window
    /// (`proto::replay::drop_transient`): work the image never had to do.
    pub transient_records: AtomicU64,
    /// When the last CP completed and how long it took.
    pub last_cp: Mutex<Option<(std::time::Instant, std::time::Duration)>>,
    /// When the last record arrived.
    pub last_record_at: Mutex<Option<std::time::Instant>>,
    /// Records and bytes accepted in the last seconds.
    pub recent: Mutex<proto::rate::RecentRate>,
}

/// Seconds since this process started, for [`proto::rate::RecentRate`].
pub fn now_secs() -> u64 {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    START.elapsed().as_secs()
}

/// The sequence stream of a source, owned by its current connection.
#[derive(Debug)]
pub struct Ingest {
    /// Id of the connection allowed to append.
    pub conn_id: u64,
    /// The next sequence number expected.
    pub next_seq: u64,
}

/// Verify listings one source may have in progress at once (each hashes a directory's files).
pub const VERIFY_LISTINGS_PER_SOURCE: usize = 2;

/// A directory (path) and its sorted entry names.
pub type VerifyNames = (Vec<u8>, Arc<Vec<Vec<u8>>>);

/// One source known to this destination.
pub struct Source {
    /// Its name (certificate common name).
    pub name: String,
    /// Its slot index (the `origin` of its nested frames).
    pub slot: usize,
    /// `ROOT/NAME/image`.
    pub image_dir: PathBuf,
    /// `ROOT/NAME/journal`.
    pub journal_dir: PathBuf,
    /// The sequence stream.
    pub ingest: tokio::sync::Mutex<Ingest>,
    /// Highest sequence number accepted into NVRAM (durable once flushed).
    pub accepted_seq: AtomicU64,
    /// Highest sequence number applied to the image.
    pub applied_seq: AtomicU64,
    /// Its generation.
    pub generation: AtomicU64,
    /// End of the unbroken run of records, after the applied one, that are in journals: every
    /// record up to it can be applied by a CP.
    pub journaled: watch::Sender<u64>,
    /// Its journals by source partition.
    pub journals: Mutex<BTreeMap<u16, Journal>>,
    /// Counters.
    pub stats: Stats,
    /// The connection currently serving it.
    pub connection: Mutex<Option<(u64, quinn::Connection)>>,
    /// Its CP requests, for its CP worker (`cp::submit` starts it on the first one).
    pub cp: CpQueue,
    /// The image tree, opened at the first CP.
    pub tree: Mutex<Option<Arc<proto::apply::Tree>>>,
    /// Paths of the image known to differ from the source (`ROOT/NAME/out-of-sync`).
    pub divergences: Mutex<crate::image_state::Divergences>,
    /// What the source presented at its last handshake: its volume and whether it runs a
    /// baseline (for status).
    pub baseline_needed: std::sync::atomic::AtomicBool,
    /// Verify listings computed at once (each hashes a directory's files).
    pub verify_slots: Arc<tokio::sync::Semaphore>,
    /// The sorted names of the directory a verify is paging through (read once per listing).
    pub verify_names: Mutex<Option<VerifyNames>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("slot", &self.slot)
            .finish()
    }
}

impl Source {
    /// Total bytes of its journal files.
    pub fn journal_bytes(&self) -> u64 {
        lock(&self.journals).values().map(|j| j.len_bytes()).sum()
    }

    /// Whether a connection currently serves it.
    pub fn connected(&self) -> bool {
        lock(&self.connection).is_some()
    }

    /// Wait, at most `timeout`, until the destager has journaled every record up to `seq`
    /// (a CP and a fetch read records from the journals only). False on timeout.
    pub async fn wait_journaled(&self, engine: &Engine, seq: u64, timeout: Duration) -> bool {
        let mut journaled = self.journaled.subscribe();
        if *journaled.borrow() >= seq {
            return true;
        }
        engine.destage_signal.notify();
        let waited = tokio::time::timeout(timeout, journaled.wait_for(|&j| j >= seq)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// The journaled records with `after < seq <= upto`, in sequence order (blocking I/O).
    pub fn journal_records(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, crate::error::JournalError> {
        let mut records = Vec::new();
        for j in lock(&self.journals).values() {
            for f in j.read_frames()? {
                let seq = frame::parse_header(&f).map(|h| h.seq).unwrap_or(0);
                if seq > after && seq <= upto {
                    records.push((seq, f));
                }
            }
        }
        records.sort_by_key(|(seq, _)| *seq);
        Ok(records)
    }

    /// `ROOT/NAME`, where its image, journals and state files live.
    pub fn dir(&self) -> &std::path::Path {
        self.image_dir.parent().unwrap_or(&self.image_dir)
    }

    /// The image tree (opened once, at first use).
    pub fn image_tree(&self) -> Result<Arc<proto::apply::Tree>, crate::error::CpError> {
        let mut t = lock(&self.tree);
        if let Some(tree) = t.as_ref() {
            return Ok(tree.clone());
        }
        let tree = Arc::new(proto::apply::Tree::open(&self.image_dir).map_err(|e| {
            crate::error::CpError::Image {
                source_name: self.name.clone(),
                reason: format!("{}: {e}", self.image_dir.display()),
            }
        })?);
        *t = Some(tree.clone());
        Ok(tree)
    }
}

/// Why a startup step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The NVLOG refused.
    #[error(transparent)]
    NvLog(#[from] NvLogError),
    /// A directory could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A journal could not be opened.
    #[error(transparent)]
    Journal(#[from] crate::error::JournalError),
    /// The slot table refused.
    #[error(transparent)]
    Slot(#[from] crate::error::SlotError),
    /// A source name that may not name a directory.
    #[error(transparent)]
    Name(#[from] crate::error::CertError),
    /// A record was too large for a destination partition.
    #[error("record {seq} of {len} bytes does not fit in a destination NVLOG partition ({capacity} bytes)")]
    TooLarge {
        /// Source sequence number.
        seq: u64,
        /// Frame length.
        len: usize,
        /// Partition capacity.
        capacity: usize,
    },
    /// The server is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// An image's state file could not be read.
    #[error(transparent)]
    ImageState(#[from] crate::image_state::StateError),
}

/// The NVLOG and what the flusher needs to know about it.
struct LogState {
    log: NvLog<MmapStorage>,
    next_dest_seq: u64,
    appended_dest_seq: u64,
    dirty: Vec<Option<(usize, usize)>>,
}

impl LogState {
    /// Append a checked source frame, wrapped in a destination frame with the next
    /// destination sequence number and `origin` (the source's slot); rotates when the current
    /// partition is full. `Ok(None)`: no free partition (wait for the destager). The wrapper's
    /// CRC comes from the source frame's (checked in [`check_batch`]): no second pass.
    fn append(&mut self, inner: &[u8], origin: u32) -> Result<Option<(u64, bool)>, NvLogError> {
        let seq = self.next_dest_seq;
        let mut rotated = false;
        let placement = match self.log.append_nested(inner, seq, origin)? {
            Ok(p) => p,
            Err(_full) => {
                if self.log.rotate().is_none() {
                    return Ok(None);
                }
                rotated = true;
                match self.log.append_nested(inner, seq, origin)? {
                    Ok(p) => p,
                    Err(_) => return Ok(None),
                }
            }
        };
        let end = placement.offset + placement.len;
        let d = &mut self.dirty[placement.partition];
        *d = Some(match *d {
            Some((s, e)) => (s.min(placement.offset), e.max(end)),
            None => (placement.offset, end),
        });
        self.next_dest_seq += 1;
        self.appended_dest_seq = seq;
        Ok(Some((seq, rotated)))
    }
}

/// A record accepted by [`check_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// The source frame, as received.
    pub bytes: &'a [u8],
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The sequence number concerned (the expected one when the frame is unreadable).
    pub seq: u64,
    /// What was wrong.
    pub reason: String,
}

/// Check a batch of source frames: CRC, kind, exact sequence continuity from `next_seq`,
/// decodable `Op`, valid paths, partition < 64, size within `capacity`. Returns the valid
/// prefix and the first rejection, if any (nothing after a rejection is looked at).
pub fn check_batch(
    batch: &[u8],
    mut next_seq: u64,
    capacity: usize,
) -> (Vec<Checked<'_>>, Option<Rejection>) {
    let mut ok = Vec::new();
    for f in frame::split(batch) {
        let reject = |seq: u64, reason: String| Some(Rejection { seq, reason });
        let f = match f {
            Ok(f) => f,
            Err(e) => return (ok, reject(next_seq, format!("bad frame: {e}"))),
        };
        let h = f.header;
        if h.seq != next_seq {
            return (
                ok,
                reject(
                    h.seq,
                    format!("sequence {} received, {next_seq} expected", h.seq),
                ),
            );
        }
        if h.kind != KIND_RECORD {
            return (
                ok,
                reject(h.seq, format!("frame kind {} is not a record", h.kind)),
            );
        }
        if h.partition >= MAX_SOURCE_PARTITIONS {
            return (
                ok,
                reject(
                    h.seq,
                    format!(
                        "partition {} is out of range (max {})",
                        h.partition,
                        MAX_SOURCE_PARTITIONS - 1
                    ),
                ),
            );
        }
        let nested_len = frame::padded_len(frame::HEADER_LEN + f.bytes.len());
        if nested_len > capacity {
            return (
                ok,
                reject(
                    h.seq,
                    format!(
                        "record of {} bytes does not fit in a destination NVLOG partition ({capacity} bytes)",
                        f.bytes.len()
                    ),
                ),
            );
        }
        // Lean: a write's data is not copied out just to look at its path.
        let op = match Op::decode_lean(f.payload) {
            Ok((op, _)) => op,
            Err(e) => return (ok, reject(h.seq, format!("undecodable record: {e}"))),
        };
        for p in op.paths() {
            if let Err(e) = proto::path::validate(p) {
                return (ok, reject(h.seq, format!("{} refused: {e}", op.kind())));
            }
        }
        ok.push(Checked {
            seq: h.seq,
            bytes: f.bytes,
        });
        next_seq += 1;
    }
    (ok, None)
}

/// How far [`Engine::append_batch`] got.
#[derive(Debug, Default)]
pub struct AppendOutcome {
    /// Frames appended (a prefix of the batch).
    pub appended: usize,
    /// Destination sequence number of the last appended frame.
    pub last_dest_seq: u64,
    /// Why it stopped early.
    pub error: Option<EngineError>,
}

/// The state shared by every task of a running destination.
pub struct Engine {
    /// `--root`.
    pub root: PathBuf,
    /// The address actually listened on (for `status`).
    pub listen: Mutex<String>,
    /// NVLOG geometry.
    pub geometry: Geometry,
    storage: Arc<MmapStorage>,
    log: Mutex<LogState>,
    /// The slot table in the NVRAM user area.
    pub slots: SlotTable<MmapStorage>,
    sources: Mutex<HashMap<String, Arc<Source>>>,
    by_slot: Mutex<HashMap<usize, Arc<Source>>>,
    registering: Mutex<()>,
    /// Wakes the flusher.
    pub flush_signal: Signal,
    /// Serialises flushes: taking the dirty ranges, msync'ing them and publishing the flushed
    /// sequence number happen as one step, whoever flushes (a session inline, or the flusher).
    flush_lock: Mutex<()>,
    /// Highest destination sequence number flushed.
    pub flushed: watch::Sender<u64>,
    /// Wakes the destager.
    pub destage_signal: Signal,
    /// Bumped whenever a partition is freed (back-pressure waiters watch it).
    pub freed: watch::Sender<u64>,
    /// Set when the server stops.
    pub shutdown: AtomicBool,
    next_conn_id: AtomicU64,
    /// Connections not yet past their `Hello`: at most [`MAX_UNAUTHENTICATED`] at once, so a
    /// flood of handshakes cannot grow the destination's memory without bound.
    pub pre_auth: Arc<tokio::sync::Semaphore>,
    /// Connections turned away because [`Engine::pre_auth`] was exhausted (logged in bursts).
    pub pre_auth_refused: AtomicU64,
    /// When the server started (status: uptime).
    pub started: std::time::Instant,
    /// At most [`CONCURRENT_CPS`] sources apply a CP at once: a CP holds its window's records
    /// in memory, so the destination's memory stays the NVRAM plus a few partitions however
    /// many sources reach a CP together (acknowledgements never wait for this).
    pub cp_slots: Arc<tokio::sync::Semaphore>,
}

/// How many CPs of different sources may apply at once (a CP is CPU- and disk-bound: more
/// at once would not finish sooner on a small server, and each holds its window in memory).
pub const CONCURRENT_CPS: usize = 2;

/// Most connections at once between the start of their handshake and a valid `Hello`.
pub const MAX_UNAUTHENTICATED: usize = 64;

/// Most CP requests of one source queued at its CP worker.
pub const MAX_QUEUED_CPS: usize = 8;

/// One CP request from a source connection, queued for the source's CP worker.
#[derive(Debug)]
pub struct CpJob {
    /// Request id, echoed in `CpDone`.
    pub id: u64,
    /// Source partition (informational: every journal of the source is considered).
    pub partition: u16,
    /// Apply records up to this sequence number.
    pub last_seq: u64,
    /// Where to send the answer.
    pub reply: mpsc::UnboundedSender<Out>,
}

/// A source's queue of CP requests. The engine only holds it; `cp` takes the receiver
/// and starts the worker with the first request (so the engine does not depend on how a CP
/// is run, and a source that never asks for a CP has no worker).
#[derive(Debug)]
pub struct CpQueue {
    /// Where requests go.
    pub tx: mpsc::UnboundedSender<CpJob>,
    /// The worker's end, until the worker is started.
    pub rx: Mutex<Option<mpsc::UnboundedReceiver<CpJob>>>,
    /// Requests sent and not yet taken by the worker: a source may have only
    /// [`MAX_QUEUED_CPS`] waiting (a legitimate one has one or two).
    pub queued: std::sync::atomic::AtomicUsize,
}

impl CpQueue {
    fn new() -> CpQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        CpQueue {
            tx,
            rx: Mutex::new(Some(rx)),
            queued: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("root", &self.root).finish()
    }
}

/// One partition's fill, for `status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PartitionFill {
    /// Partition index.
    pub index: usize,
    /// Bytes of frames.
    pub used_bytes: usize,
    /// Bytes available for frames.
    pub capacity_bytes: usize,
    /// Number of frames.
    pub records: u64,
}

fn mkdir(path: &Path) -> Result<(), EngineError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Make `dir` (which exists) root-only, 0700: the destination's root, each source's directory
/// and its journals. An image holds whatever its source sent (setuid binaries, device nodes),
/// and local users of the destination must not reach it other than through `browse`.
fn private(dir: &Path) -> Result<(), EngineError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let md = std::fs::symlink_metadata(dir).map_err(io)?;
    if !md.is_dir() {
        return Err(io(std::io::Error::other("not a directory")));
    }
    if md.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        tracing::info!(dir = %dir.display(), "made root-only (0700)");
    }
    Ok(())
}

impl Engine {
    /// Open the NVRAM file and every source's journals, and work out where each source
    /// stands.
    pub fn open(root: &Path, nvram: &Path, geometry: Geometry) -> Result<Arc<Engine>, EngineError> {
        geometry.validate()?;
        mkdir(root)?;
        private(root)?;
        let (storage, _) =
            MmapStorage::open(nvram, geometry.region_len()).map_err(NvLogError::Io)?;
        let storage = Arc::new(storage);
        let (log, recovery) =
            NvLog::open(storage.clone(), geometry, proto::nvlog::Role::Destination)?;
        if recovery.formatted {
            tracing::info!(nvram = %nvram.display(), "formatted a new destination NVRAM file");
        }
        let next_dest_seq = log.last_seq().unwrap_or(0) + 1;
        let partitions = geometry.partitions;
        // Source sequence numbers per slot still in NVRAM.
        let mut in_nvram: HashMap<usize, BTreeSet<u64>> = HashMap::new();
        for p in 0..partitions {
            for outer in log.frames(p) {
                if let Ok(f) = frame::decode(&outer) {
                    if let Ok(inner) = frame::parse_header(f.payload) {
                        in_nvram
                            .entry(f.header.origin as usize)
                            .or_default()
                            .insert(inner.seq);
                    }
                }
            }
        }
        let (flushed, _) = watch::channel(next_dest_seq - 1);
        let (freed, _) = watch::channel(0);
        let engine = Arc::new(Engine {
            root: root.to_path_buf(),
            listen: Mutex::new(String::new()),
            geometry,
            slots: SlotTable::new(storage.clone()),
            storage,
            log: Mutex::new(LogState {
                log,
                next_dest_seq,
                appended_dest_seq: next_dest_seq - 1,
                dirty: vec![None; partitions],
            }),
            sources: Mutex::new(HashMap::new()),
            by_slot: Mutex::new(HashMap::new()),
            registering: Mutex::new(()),
            flush_signal: Signal::default(),
            flush_lock: Mutex::new(()),
            flushed,
            destage_signal: Signal::default(),
            freed,
            shutdown: AtomicBool::new(false),
            next_conn_id: AtomicU64::new(1),
            pre_auth: Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED)),
            pre_auth_refused: AtomicU64::new(0),
            cp_slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CPS)),
            started: std::time::Instant::now(),
        });
        for (index, slot) in engine.slots.load_all() {
            let none = BTreeSet::new();
            let nv = in_nvram.get(&index).unwrap_or(&none);
            engine.add_source(index, slot, nv)?;
        }
        for origin in in_nvram.keys() {
            if !lock(&engine.by_slot).contains_key(origin) {
                tracing::error!(
                    origin,
                    "NVRAM holds records of slot {origin}, which the slot table does not name; they cannot be destaged"
                );
            }
        }
        Ok(engine)
    }

    /// Register a source from its slot, opening its directories and journals. `in_nvram` are
    /// the source's sequence numbers still in the destination NVRAM.
    ///
    /// Where the source stands is the end of the *unbroken* run of records after the applied
    /// one, in journals and NVRAM together: a record lost in between (a torn journal tail
    /// dropped at open) makes the source resend from there, and the destager drops the copies
    /// of later records left in NVRAM (they come again, in order).
    fn add_source(
        self: &Arc<Self>,
        index: usize,
        slot: Slot,
        in_nvram: &BTreeSet<u64>,
    ) -> Result<Arc<Source>, EngineError> {
        let base = self.root.join(&slot.name);
        let image_dir = base.join("image");
        let journal_dir = base.join("journal");
        mkdir(&image_dir)?;
        mkdir(&journal_dir)?;
        private(&base)?;
        private(&journal_dir)?;
        let mut journals = BTreeMap::new();
        let mut in_journals: BTreeSet<u64> = BTreeSet::new();
        let entries = std::fs::read_dir(&journal_dir).map_err(|source| EngineError::Io {
            path: journal_dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(p) = name.to_str().and_then(journal::partition_of_file_name) else {
                continue;
            };
            let j = Journal::open(&journal_dir, &slot.name, p)?;
            j.visit_frames(|entry, _| {
                in_journals.insert(entry.seq);
                Ok(())
            })?;
            journals.insert(p, j);
        }
        let unbroken = |from: u64, held: &dyn Fn(u64) -> bool| {
            let mut last = from;
            while held(last + 1) {
                last += 1;
            }
            last
        };
        let journaled = unbroken(slot.applied_seq, &|s| in_journals.contains(&s));
        let accepted = unbroken(slot.applied_seq, &|s| {
            in_journals.contains(&s) || in_nvram.contains(&s)
        });
        let highest = [in_journals.last(), in_nvram.last()]
            .into_iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0);
        if highest > accepted {
            tracing::warn!(source = %slot.name, missing = accepted + 1, highest,
                "records after {accepted} are held but record {} is missing (a torn journal tail?); \
                 the source will be asked to resend from it", accepted + 1);
        }
        // A damaged state file of one image must not stop the others: the image is then
        // taken as wholly out of sync (the source resends it) and its volume as unknown (the
        // handshake refuses the source, naming the file).
        let divergences = crate::image_state::Divergences::load(&base).unwrap_or_else(|e| {
            tracing::error!(source = %slot.name, "{e}; the whole image is taken as out of sync");
            let mut d = crate::image_state::Divergences::default();
            d.add(&[b""], 0, &format!("state file unreadable: {e}"));
            d
        });
        let baseline_needed = match crate::image_state::read_volume(&base) {
            Ok(r) => r.map(|r| !r.baseline_complete).unwrap_or(false),
            Err(e) => {
                tracing::error!(source = %slot.name, "{e}");
                false
            }
        };
        let source = Arc::new(Source {
            name: slot.name.clone(),
            slot: index,
            image_dir,
            journal_dir,
            ingest: tokio::sync::Mutex::new(Ingest {
                conn_id: 0,
                next_seq: accepted + 1,
            }),
            accepted_seq: AtomicU64::new(accepted),
            applied_seq: AtomicU64::new(slot.applied_seq),
            generation: AtomicU64::new(slot.generation),
            journaled: watch::channel(journaled).0,
            journals: Mutex::new(journals),
            stats: Stats::default(),
            connection: Mutex::new(None),
            cp: CpQueue::new(),
            tree: Mutex::new(None),
            divergences: Mutex::new(divergences),
            baseline_needed: std::sync::atomic::AtomicBool::new(baseline_needed),
            verify_slots: Arc::new(tokio::sync::Semaphore::new(VERIFY_LISTINGS_PER_SOURCE)),
            verify_names: Mutex::new(None),
        });
        lock(&self.sources).insert(slot.name.clone(), source.clone());
        lock(&self.by_slot).insert(index, source.clone());
        tracing::debug!(source = %slot.name, slot = index, accepted, applied = slot.applied_seq, "source registered");
        Ok(source)
    }

    /// The source called `name`, registering it (slot, directories) on first sight.
    pub fn source(self: &Arc<Self>, name: &str) -> Result<Arc<Source>, EngineError> {
        if let Some(s) = lock(&self.sources).get(name) {
            return Ok(s.clone());
        }
        // Two first connections of one new source must not register it twice.
        let _registering = lock(&self.registering);
        if let Some(s) = lock(&self.sources).get(name) {
            return Ok(s.clone());
        }
        // ROOT/NAME is built from it: checked here too, not only where certificates are read.
        crate::certs::validate_name(name)?;
        let (index, slot) = self.slots.find_or_allocate(name)?;
        self.add_source(index, slot, &BTreeSet::new())
    }

    /// The source owning slot `index`.
    pub fn source_by_slot(&self, index: usize) -> Option<Arc<Source>> {
        lock(&self.by_slot).get(&index).cloned()
    }

    /// Every source, sorted by name.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        let mut v: Vec<_> = lock(&self.sources).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The NVRAM storage (for flushing outside the log lock).
    pub fn storage(&self) -> &Arc<MmapStorage> {
        &self.storage
    }

    /// Fill of each NVLOG partition.
    pub fn partition_fill(&self) -> Vec<PartitionFill> {
        let st = lock(&self.log);
        (0..self.geometry.partitions)
            .map(|p| {
                let info = st.log.partition(p);
                PartitionFill {
                    index: p,
                    used_bytes: info.used,
                    capacity_bytes: self.geometry.capacity(),
                    records: info.records,
                }
            })
            .collect()
    }

    /// Highest destination sequence number appended so far.
    pub fn appended_dest_seq(&self) -> u64 {
        lock(&self.log).appended_dest_seq
    }

    /// Wait until everything appended so far is flushed. The caller flushes itself (one msync
    /// covering every session's frames appended meanwhile: group commit without a thread hop
    /// on the acknowledgement path); a flush already running elsewhere is waited for.
    pub async fn wait_flushed(&self) {
        let target = self.appended_dest_seq();
        let mut rx = self.flushed.subscribe();
        if *rx.borrow() >= target {
            return;
        }
        self.flush_once();
        // The flusher holds the sender as long as the engine lives, so this ends.
        let _ = rx.wait_for(|&f| f >= target).await;
    }

    /// Wrap each checked source frame in a destination frame (origin = `slot`) and append it
    /// to the shared NVLOG, waiting for the destager when every partition is full
    /// (back-pressure). Stops at the first error; the outcome says how far it got.
    /// The caller must call [`Engine::flush_once`] afterwards: the frames are acknowledged
    /// only once flushed.
    pub async fn append_batch(&self, slot: usize, frames: &[Checked<'_>]) -> AppendOutcome {
        let mut out = AppendOutcome::default();
        while out.appended < frames.len() {
            let mut freed = self.freed.subscribe();
            let mut rotated = false;
            let before = out.appended;
            {
                let mut st = lock(&self.log);
                while out.appended < frames.len() {
                    let i = out.appended;
                    match st.append(frames[i].bytes, slot as u32) {
                        Ok(Some((seq, r))) => {
                            out.last_dest_seq = seq;
                            rotated |= r;
                            out.appended += 1;
                        }
                        Ok(None) => break,
                        Err(NvLogError::TooLarge { len, capacity }) => {
                            out.error = Some(EngineError::TooLarge {
                                seq: frames[i].seq,
                                len,
                                capacity,
                            });
                            break;
                        }
                        Err(e) => {
                            out.error = Some(e.into());
                            break;
                        }
                    }
                }
            }
            if out.error.is_some() {
                return out;
            }
            // The caller flushes what it appended (one msync for the batch, no thread hop);
            // only frames that will wait here for space go to the flusher thread meanwhile.
            if out.appended > before && out.appended < frames.len() {
                self.flush_signal.notify();
            }
            if rotated || out.appended < frames.len() {
                self.destage_signal.notify();
            }
            if out.appended < frames.len() {
                tracing::debug!("destination NVLOG full: waiting for the destager");
                if self.shutdown.load(Ordering::Relaxed) {
                    out.error = Some(EngineError::ShuttingDown);
                    return out;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), freed.changed()).await;
            }
        }
        out
    }

    /// Flush what was appended since the last call; publish the flushed destination sequence.
    pub fn flush_once(&self) {
        let _serial = lock(&self.flush_lock);
        let (ranges, upto) = {
            let mut st = lock(&self.log);
            let ranges: Vec<(usize, usize)> =
                st.dirty.iter_mut().filter_map(|d| d.take()).collect();
            (ranges, st.appended_dest_seq)
        };
        // One flush for every partition's dirty range (one device cache flush on a disk file).
        let spans: Vec<(usize, usize)> = ranges.iter().map(|&(s, e)| (s, e - s)).collect();
        if let Err(e) = self.storage.flush_ranges(&spans) {
            tracing::error!(error = %e, "NVRAM flush failed; acknowledgements are held back");
            // Put the range back so the next round retries it.
            let mut st = lock(&self.log);
            for (s, e) in &ranges {
                let p = (s - SUPERBLOCK_LEN) / self.geometry.partition_size;
                let d = &mut st.dirty[p];
                *d = Some(match *d {
                    Some((a, b)) => (a.min(*s), b.max(*e)),
                    None => (*s, *e),
                });
            }
            return;
        }
        self.flushed.send_if_modified(|v| {
            if upto > *v {
                *v = upto;
                true
            } else {
                false
            }
        });
    }

    /// The flusher thread: one msync per wake-up covers every frame appended meanwhile.
    pub fn run_flusher(&self) {
        while !self.shutdown.load(Ordering::Relaxed) {
            if self.flush_signal.wait_timeout(Duration::from_millis(200)) {
                self.flush_once();
            }
        }
        self.flush_once();
    }

    /// Choose work for the destager: rotate away from a non-empty current partition when
    /// another is free, and list every non-current partition holding frames as
    /// (index, absolute offset of its frames, bytes used).
    pub fn destage_candidates(&self) -> Vec<(usize, usize, usize)> {
        let mut st = lock(&self.log);
        let cur = st.log.current();
        if !st.log.partition(cur).is_empty() {
            st.log.rotate();
        }
        let cur = st.log.current();
        st.log
            .partitions_in_order()
            .into_iter()
            .filter(|&p| p != cur)
            .map(|p| {
                (
                    p,
                    SUPERBLOCK_LEN + p * self.geometry.partition_size + PARTITION_HEADER_LEN,
                    st.log.partition(p).used,
                )
            })
            .collect()
    }

    /// Free destination partition `p` (its frames are all in journals) and wake waiters.
    pub fn free_partition(&self, p: usize) -> Result<(), NvLogError> {
        lock(&self.log).log.free(p)?;
        self.freed.send_modify(|v| *v += 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, partition: u16, path: &str) -> Vec<u8> {
        let op = Op::Unlink {
            path: path.as_bytes().to_vec(),
        };
        frame::encode(seq, 1, partition, KIND_RECORD, 0, &op.encode()).unwrap()
    }

    #[test]
    fn a_good_batch_passes_whole() {
        let mut b = rec(5, 0, "a");
        b.extend(rec(6, 1, "b/c"));
        let (ok, rej) = check_batch(&b, 5, 1 << 20);
        assert_eq!(ok.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(rej, None);
    }

    #[test]
    fn each_defect_stops_the_batch_at_that_record() {
        let mut crc = rec(2, 0, "x");
        let n = crc.len();
        crc[n - 1] ^= 1;
        let nested = frame::encode(2, 1, 0, frame::KIND_NESTED, 0, b"zz").unwrap();
        let garbage = frame::encode(2, 1, 0, KIND_RECORD, 0, b"\xc1\xc1").unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bad crc", crc, "CRC"),
            ("gap", rec(3, 0, "x"), "3 received, 2 expected"),
            ("repeat", rec(1, 0, "x"), "1 received, 2 expected"),
            ("dotdot", rec(2, 0, "a/../../x"), "'..'"),
            ("absolute", rec(2, 0, "/x"), "absolute"),
            ("nul", rec(2, 0, "a\0b"), "NUL"),
            ("partition", rec(2, 64, "x"), "partition 64"),
            ("kind", nested, "not a record"),
            ("undecodable", garbage, "undecodable"),
        ];
        for (what, bad, needle) in cases {
            let mut b = rec(1, 0, "fine");
            b.extend(&bad);
            b.extend(rec(3, 0, "after"));
            let (ok, rej) = check_batch(&b, 1, 1 << 20);
            assert_eq!(ok.len(), 1, "{what}");
            let rej = rej.unwrap_or_else(|| panic!("{what} accepted"));
            assert!(rej.reason.contains(needle), "{what}: {}", rej.reason);
        }
    }

    #[test]
    fn a_record_larger_than_a_partition_is_refused() {
        let big = rec(1, 0, &"a".repeat(200));
        let (ok, rej) = check_batch(&big, 1, 64);
        assert!(ok.is_empty());
        assert!(rej.unwrap().reason.contains("does not fit"));
    }
}
