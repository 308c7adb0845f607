//! The baseline: the initial transfer of a whole backing volume to an image that does not yet
//! mirror it (an empty image, or one taken over with `--force-baseline`), and the task that
//! heals paths the destination reports out of sync.
//!
//! The walk visits the tree depth first, each directory before its children, children by name
//! ([`resync::dfs_cmp`]), and sends each entry with [`resync::Sender`] while the mount serves.
//! The *cursor* is the last entry sent; everything at or before it in walk order is in the
//! image's record stream, everything after it is not yet. Client operations go on meanwhile:
//!
//! * an operation on a path already sent applies to the image like any other record;
//! * an operation on a path not yet sent may fail at the destination (its file is not there
//!   yet); the destination reports the path out of sync, and the walk's `Replace` of it (or of
//!   a directory above it) heals it, since it is sent later with its current state;
//! * a rename (or link) whose source holds entries not yet sent (`from` after the cursor, or
//!   the walk inside `from`) would carry unsent content to a place the walk may already have
//!   passed: the new name is queued and sent whole after the walk.
//!
//! Progress (cursor, queue, counts) is kept in `NVRAM.baseline` (a JSON file, 0600, written
//! atomically), so an interrupted baseline resumes after its cursor instead of starting over.
//! The destination decides whether a baseline is needed (its `volume` record) and learns it is
//! complete from `BaselineDone`, sent once a CP has applied the baseline's last record.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::apply::Tree;
use proto::wire::Control;
use serde::{Deserialize, Serialize};

use crate::error::FsResult;
use crate::link::LinkShared;
use crate::mirror::{CpCommand, Mirror};
use crate::resync::{dfs_cmp, is_under, Sender, Sent};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `NVRAM.baseline`, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Saved {
    /// The volume this progress belongs to.
    volume: String,
    /// Last entry sent (hex of the path), absent before the first.
    cursor: Option<String>,
    /// Every entry of the walk is sent.
    walk_done: bool,
    /// New names of renames that carried unsent entries (hex).
    queue: Vec<String>,
    /// Counters.
    files_done: u64,
    bytes_done: u64,
    files_total: u64,
    bytes_total: u64,
}

/// Where the walk stands; shared by the walk, by every [`Sender`] and by the operations that
/// must tell it about renames and links (under the sequencer lock).
#[derive(Debug, Default)]
struct Walk {
    /// A baseline of this volume is under way, from its start (or from the mount, when a saved
    /// one exists) until the destination confirms it complete.
    active: bool,
    cursor: Option<Vec<u8>>,
    queue: BTreeSet<Vec<u8>>,
    walk_done: bool,
    /// Paths a `Sender` is sending right now (their whole subtree), outside the walk's order.
    inflight: Vec<Vec<u8>>,
    /// Backing inode → a path sent with its content, for the other names of hard links.
    links: HashMap<u64, Vec<u8>>,
    /// The counts last saved (entries, bytes sent; entries, bytes in all).
    counts: (u64, u64, u64, u64),
}

/// The baseline of one mount.
pub struct Baseline {
    file: PathBuf,
    volume: String,
    walk: Mutex<Walk>,
    rate_bytes_per_sec: Option<f64>,
    mirror: Arc<Mirror>,
}

impl Baseline {
    /// The baseline state of `volume`, kept in `file` (`NVRAM.baseline`); content is sent at
    /// most at `rate_bytes_per_sec`. A saved baseline makes the rename hook active at once,
    /// before the mount serves.
    pub fn new(
        file: PathBuf,
        volume: String,
        rate_bytes_per_sec: Option<f64>,
        mirror: Arc<Mirror>,
    ) -> Baseline {
        let b = Baseline {
            file,
            volume,
            walk: Mutex::new(Walk::default()),
            rate_bytes_per_sec,
            mirror,
        };
        if let Some(saved) = b.load() {
            let mut w = lock(&b.walk);
            w.counts = (
                saved.files_done,
                saved.bytes_done,
                saved.files_total,
                saved.bytes_total,
            );
            w.active = true;
            w.cursor = saved.cursor.as_deref().and_then(unhex);
            w.queue = saved.queue.iter().filter_map(|q| unhex(q)).collect();
            w.walk_done = saved.walk_done;
        }
        b
    }

    fn load(&self) -> Option<Saved> {
        let bytes = std::fs::read(&self.file).ok()?;
        match serde_json::from_slice::<Saved>(&bytes) {
            Ok(s) if s.volume == self.volume => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %self.file.display(), "ignoring an unreadable baseline state ({e}); the baseline starts over");
                None
            }
        }
    }

    fn save(&self, w: &mut Walk, counts: (u64, u64, u64, u64)) {
        w.counts = counts;
        let saved = Saved {
            volume: self.volume.clone(),
            cursor: w.cursor.as_deref().map(hex),
            walk_done: w.walk_done,
            queue: w.queue.iter().map(|p| hex(p)).collect(),
            files_done: counts.0,
            bytes_done: counts.1,
            files_total: counts.2,
            bytes_total: counts.3,
        };
        if let Err(e) = write_private(&self.file, &saved) {
            tracing::warn!(file = %self.file.display(), "cannot save the baseline's progress: {e}");
        }
    }

    /// The destination recorded the baseline as complete: forget the saved progress and stop
    /// watching renames.
    pub fn finish(&self) {
        let mut w = lock(&self.walk);
        if w.active {
            w.active = false;
            w.cursor = None;
            w.links.clear();
            let _ = std::fs::remove_file(&self.file);
        }
    }

    fn is_active(&self) -> bool {
        lock(&self.walk).active
    }

    /// Queue `to` for a resend (saved at once: the queue must survive a crash).
    fn enqueue(&self, w: &mut Walk, to: &[u8]) {
        if w.queue.insert(to.to_vec()) {
            let counts = w.counts;
            self.save(w, counts);
            self.publish(w);
        }
    }

    /// Tell status how many resends are pending (queued or in flight).
    fn publish(&self, w: &Walk) {
        self.mirror
            .set_resync_pending((w.queue.len() + w.inflight.len()) as u64);
    }

    /// A rename or link moved `from` to `to` (called under the sequencer lock, after the
    /// record is logged): if `from` still held entries not yet sent — the walk has not reached
    /// them, or a `Sender` is sending them right now — queue `to`.
    pub fn moved(&self, from: &[u8], to: &[u8]) {
        // Before the walk's lock: sequencer, then progress, then walk is never reversed.
        let asked = self.mirror.progress(|p| p.baseline.incomplete());
        let mut w = lock(&self.walk);
        let walking = w.active || asked;
        // Once the walk has sent every entry, nothing a rename carries is unsent (the baseline
        // only waits for its CP then; an empty volume's walk ends with no cursor at all).
        let unsent = walking
            && !w.walk_done
            && match &w.cursor {
                None => true,
                Some(c) => dfs_cmp(from, c) == std::cmp::Ordering::Greater || is_under(c, from),
            };
        let inflight = w
            .inflight
            .iter()
            .any(|p| is_under(p, from) || is_under(from, p));
        if walking {
            // Names of hard links already sent follow the rename.
            for path in w.links.values_mut() {
                if is_under(path, from) {
                    let mut moved = to.to_vec();
                    moved.extend_from_slice(&path[from.len()..]);
                    *path = moved;
                }
            }
        }
        if unsent || inflight {
            tracing::debug!(from = %String::from_utf8_lossy(from), to = %String::from_utf8_lossy(to),
                "a rename carried entries not yet sent; its new name is queued");
            self.enqueue(&mut w, to);
        }
    }

    /// A link named backing inode `ino` also `new` (under the sequencer lock): if `existing`
    /// was sent, the walk links `new` to it when it gets there; if not, `new` is queued.
    pub fn linked(&self, existing: &[u8], new: &[u8], ino: u64) {
        self.moved(existing, new);
        let mut w = lock(&self.walk);
        let sent = match &w.cursor {
            None => false,
            // Sent: at or before the cursor, and not a directory the walk is inside of.
            Some(c) => {
                dfs_cmp(existing, c) != std::cmp::Ordering::Greater
                    && (c.as_slice() == existing || !is_under(c, existing))
            }
        };
        if w.active && sent && !w.inflight.iter().any(|p| is_under(existing, p)) {
            w.links.entry(ino).or_insert_with(|| existing.to_vec());
        }
    }

    /// A path sent with its content, for later names of the same inode.
    pub(crate) fn link_target(&self, ino: u64) -> Option<Vec<u8>> {
        lock(&self.walk).links.get(&ino).cloned()
    }

    pub(crate) fn note_link(&self, ino: u64, path: &[u8]) {
        let mut w = lock(&self.walk);
        if w.active {
            w.links.insert(ino, path.to_vec());
        }
    }

    /// A `Sender` starts (`Some`) or ends sending `path` and its subtree.
    pub(crate) fn inflight(&self, path: &[u8], sending: bool) {
        let mut w = lock(&self.walk);
        if sending {
            w.inflight.push(path.to_vec());
        } else if let Some(i) = w.inflight.iter().position(|p| p == path) {
            w.inflight.remove(i);
        }
        self.publish(&w);
    }

    /// Take the next queued path (it counts as pending until its resend ends).
    fn next_queued(&self) -> Option<Vec<u8>> {
        let mut w = lock(&self.walk);
        let next = w.queue.pop_first();
        if let Some(p) = &next {
            w.inflight.push(p.clone());
        }
        self.publish(&w);
        next
    }

    /// The resend of a queued path ended.
    fn queued_done(&self, path: &[u8]) {
        self.inflight(path, false);
    }
}

/// Write `value` as JSON to `path` atomically, readable by its owner only.
fn write_private<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // `mode` only applies when the file is new: a temp file left behind keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// Entries (the root excluded) and content bytes of the tree (for progress).
pub fn count_tree(tree: &Tree) -> (u64, u64) {
    fn count(tree: &Tree, path: &[u8], out: &mut (u64, u64)) {
        let Ok(names) = proto::summary::names(tree, path) else {
            return;
        };
        for name in names {
            let child = proto::path::join(path, &name);
            let Ok(st) = tree.stat(&child) else { continue };
            out.0 += 1;
            match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::Directory => count(tree, &child, out),
                rustix::fs::FileType::RegularFile => out.1 += st.st_size as u64,
                _ => {}
            }
        }
    }
    let mut out = (0, 0);
    count(tree, b"", &mut out);
    out
}

/// Note the hard-linked files at or before `cursor` in walk order (sent by an earlier run).
fn scan_links(baseline: &Baseline, tree: &Tree, dir: &[u8], cursor: &[u8]) {
    let Ok(names) = proto::summary::names(tree, dir) else {
        return;
    };
    for name in names {
        let child = proto::path::join(dir, &name);
        if dfs_cmp(&child, cursor) == std::cmp::Ordering::Greater && !is_under(cursor, &child) {
            return;
        }
        let Ok(st) = tree.stat(&child) else { continue };
        match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::Directory => scan_links(baseline, tree, &child, cursor),
            rustix::fs::FileType::RegularFile
                if st.st_nlink > 1 && baseline.link_target(st.st_ino).is_none() =>
            {
                baseline.note_link(st.st_ino, &child);
            }
            _ => {}
        }
    }
}

/// One run of the walk.
struct Run<'a> {
    baseline: &'a Baseline,
    mirror: &'a Mirror,
    sender: Sender<'a>,
    resume: Option<Vec<u8>>,
    files_total: u64,
    bytes_total: u64,
    files_before: u64,
    bytes_before: u64,
    started: Instant,
    last_save: Instant,
    last_log: Instant,
    bar: indicatif::ProgressBar,
}

impl Run<'_> {
    fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.files_before + self.sender.entries,
            self.bytes_before + self.sender.bytes,
            self.files_total,
            self.bytes_total,
        )
    }

    /// The walk passed `path`: move the cursor, report progress, save now and then.
    fn advance(&mut self, path: &[u8]) -> FsResult<()> {
        lock(&self.baseline.walk).cursor = Some(path.to_vec());
        let (files, bytes, ftotal, btotal) = self.counts();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.sender.bytes as f64 / secs;
        let eta = if rate > 0.0 {
            btotal.saturating_sub(bytes) as f64 / rate
        } else {
            0.0
        };
        self.mirror.update_baseline(|b| {
            b.files_done = files;
            b.bytes_done = bytes;
            b.rate_bytes_per_sec = rate;
            b.eta_seconds = eta;
        });
        self.bar.set_position(bytes);
        self.bar.set_message(format!("{files}/{ftotal} entries"));
        if self.last_save.elapsed() >= Duration::from_millis(200) {
            // The cursor may only be saved once the records up to it are durable.
            if let Some(seq) = self.sender.last_seq {
                self.mirror.wait_durable(seq)?;
            }
            let counts = self.counts();
            let mut w = lock(&self.baseline.walk);
            self.baseline.save(&mut w, counts);
            self.last_save = Instant::now();
        }
        if self.last_log.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                "baseline: {files}/{ftotal} entries, {} of {} MiB, {:.1} MiB/s, ETA {:.0} s",
                bytes >> 20,
                btotal >> 20,
                rate / (1 << 20) as f64,
                eta
            );
            self.last_log = Instant::now();
        }
        Ok(())
    }

    /// Walk directory `path` (already sent); children at or before the resume cursor were
    /// sent by an earlier run.
    fn walk_dir(&mut self, path: &[u8]) -> FsResult<()> {
        let names = match self.sender.children(path) {
            Ok(n) => n,
            // Removed or renamed meanwhile: mirrored; a rename of unsent entries was queued.
            Err(crate::error::FsError::Backing(rustix::io::Errno::NOENT))
            | Err(crate::error::FsError::Backing(rustix::io::Errno::NOTDIR)) => return Ok(()),
            Err(e) => return Err(e),
        };
        for name in names {
            let child = proto::path::join(path, &name);
            if let Some(cursor) = self.resume.clone() {
                if is_under(&cursor, &child) {
                    // An ancestor of the cursor (sent), or the cursor itself.
                    if self.sender.children(&child).is_ok() {
                        if child == cursor {
                            self.resume = None;
                        }
                        self.walk_dir(&child)?;
                        self.sender.dir_times(&child)?;
                    } else if child == cursor {
                        self.resume = None;
                    }
                    continue;
                }
                if dfs_cmp(&child, &cursor) == std::cmp::Ordering::Less {
                    continue;
                }
                self.resume = None;
            }
            match self.sender.entry(&child, false)? {
                Sent::Dir => {
                    self.advance(&child)?;
                    self.walk_dir(&child)?;
                    self.sender.dir_times(&child)?;
                }
                _ => self.advance(&child)?,
            }
        }
        Ok(())
    }
}

/// Run the baseline until every entry is sent (resuming a saved run), then the queue.
/// Returns the last record of the baseline.
pub fn run(baseline: &Baseline, tree: &Tree, mirror: &Mirror) -> FsResult<u64> {
    let saved = baseline.load();
    let sender = Sender::new(tree, mirror)
        .with_rate(baseline.rate_bytes_per_sec)
        .with_baseline(baseline)
        .walking();
    let (resume, walk_done, queue, files_before, bytes_before, mut totals) = match &saved {
        Some(s) => (
            s.cursor.as_deref().and_then(unhex),
            s.walk_done,
            s.queue.iter().filter_map(|q| unhex(q)).collect(),
            s.files_done,
            s.bytes_done,
            (s.files_total, s.bytes_total),
        ),
        None => (None, false, BTreeSet::new(), 0, 0, (0, 0)),
    };
    if totals == (0, 0) || resume.is_none() {
        totals = count_tree(tree);
    }
    {
        let mut w = lock(&baseline.walk);
        w.active = true;
        // Back to the saved cursor: what was sent after it is sent again.
        w.cursor = resume.clone();
        w.queue.extend(queue);
        w.walk_done = walk_done;
    }
    if let Some(cursor) = &resume {
        // Hard links whose first name was sent before the interruption.
        scan_links(baseline, tree, b"", cursor);
    }
    match &resume {
        Some(c) => tracing::info!(
            entries = totals.0,
            bytes = totals.1,
            "baseline: resuming after {:?} ({files_before} entries sent before)",
            String::from_utf8_lossy(c)
        ),
        None if !walk_done => tracing::info!(
            entries = totals.0,
            bytes = totals.1,
            "baseline: transferring the whole volume to the image"
        ),
        None => {}
    }
    mirror.update_baseline(|b| {
        b.state = "running";
        b.files_total = totals.0;
        b.bytes_total = totals.1;
        b.files_done = files_before;
        b.bytes_done = bytes_before;
    });
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(totals.1),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "baseline {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    let mut run = Run {
        baseline,
        mirror,
        sender,
        resume: resume.clone(),
        files_total: totals.0,
        bytes_total: totals.1,
        files_before,
        bytes_before,
        started: Instant::now(),
        last_save: Instant::now(),
        last_log: Instant::now(),
        bar,
    };
    let result: FsResult<()> = (|| {
        if !walk_done {
            if resume.is_none() {
                // A fresh start owns the image: whatever it held goes.
                run.sender.entry(b"", true)?;
                run.advance(b"")?;
            }
            run.walk_dir(b"")?;
            run.sender.dir_times(b"")?;
            let counts = run.counts();
            let mut w = lock(&baseline.walk);
            w.walk_done = true;
            baseline.save(&mut w, counts);
        }
        run.sender.walk_over();
        while let Some(path) = baseline.next_queued() {
            let sent = run.sender.path(&path);
            baseline.queued_done(&path);
            sent?;
            let counts = run.counts();
            let mut w = lock(&baseline.walk);
            baseline.save(&mut w, counts);
        }
        Ok(())
    })();
    run.bar.finish_and_clear();
    result?;
    let last = match run.sender.last_seq {
        Some(s) => s,
        None => mirror.progress(|p| p.logged),
    };
    mirror.wait_durable(last)?;
    let (files, bytes, _, _) = run.counts();
    let secs = run.started.elapsed().as_secs_f64();
    tracing::info!(
        entries = files,
        bytes,
        seconds = format!("{secs:.1}"),
        "baseline: every entry is sent; committing"
    );
    mirror.update_baseline(|b| {
        b.state = "committing";
        b.last_seq = last;
        b.files_done = files;
        b.bytes_done = bytes;
        b.eta_seconds = 0.0;
    });
    Ok(last)
}

/// The resync task: runs the baseline when the destination asks for one, and resends the
/// paths it reports out of sync, with backoff, until the image is in sync again.
pub fn resync_task(
    baseline: Arc<Baseline>,
    volume: Arc<crate::volume::Volume>,
    link: Arc<LinkShared>,
) {
    let mirror = volume.mirror().clone();
    let mut backoff = Duration::from_secs(1);
    let mut next_heal = Instant::now();
    let mut attempts: std::collections::HashMap<Vec<u8>, u32> = Default::default();
    let mut first = true;
    // Once every entry is sent and a CP applied them: tell the destination (again after a
    // reconnect, until it confirms: `BaselineRecorded`, or a `Welcome` that needs none).
    let done = |last: u64| {
        link.send_control(Control::BaselineDone { last_seq: last });
        mirror.update_baseline(|b| b.state = "done");
        tracing::info!(
            last_seq = last,
            "baseline complete: the image mirrors the whole volume"
        );
    };
    loop {
        // The first look needs no wait: the handshake may have asked for a baseline already.
        if !first {
            mirror.wait_progress(Duration::from_millis(500));
        }
        first = false;
        let (up, stopped, state, confirmed, out_of_sync) = mirror.progress(|p| {
            (
                p.link_up,
                p.stopped.is_some(),
                p.baseline.state,
                p.baseline.confirmed,
                p.out_of_sync.clone(),
            )
        });
        if stopped {
            return;
        }
        if confirmed && baseline.is_active() {
            baseline.finish();
        }
        if !up {
            continue;
        }
        if state == "pending" {
            match run(&baseline, volume.tree(), &mirror) {
                Ok(last) => {
                    if commit(&mirror, last) {
                        done(last);
                    } else {
                        mirror.update_baseline(|b| b.state = "pending");
                    }
                }
                Err(e) => {
                    tracing::warn!("baseline interrupted: {e}; it resumes where it stopped");
                    mirror.update_baseline(|b| b.state = "pending");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            continue;
        }
        if state == "committing" {
            let last = mirror.progress(|p| p.baseline.last_seq);
            if commit(&mirror, last) {
                done(last);
            }
            continue;
        }
        // Renames of entries a resend was carrying: resend their new names.
        if let Some(path) = baseline.next_queued() {
            let mut sender = Sender::new(volume.tree(), &mirror).with_baseline(&baseline);
            let mut next = Some(path);
            let mut failed = false;
            while let Some(p) = next {
                let sent = sender.path(&p);
                baseline.queued_done(&p);
                if let Err(e) = sent {
                    tracing::warn!(path = %String::from_utf8_lossy(&p), "resync of a renamed path: {e}");
                    failed = true;
                    break;
                }
                next = baseline.next_queued();
            }
            if let (false, Some(last)) = (failed, sender.last_seq) {
                let _ = commit(&mirror, last);
            }
            continue;
        }
        if out_of_sync.is_empty() || Instant::now() < next_heal {
            if out_of_sync.is_empty() {
                backoff = Duration::from_secs(1);
                attempts.clear();
            }
            continue;
        }
        // Heal: resend each path (sorted, so a directory covers what lies beneath it). A path
        // that stays out of sync after two tries is resent from its parent once (its parent
        // may be what is missing in the image), then again by itself.
        let mut paths: Vec<Vec<u8>> = out_of_sync.iter().map(|d| d.path.clone()).collect();
        paths.sort_by(|a, b| dfs_cmp(a, b));
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut sender = Sender::new(volume.tree(), &mirror).with_baseline(&baseline);
        let mut failed = None;
        for p in paths {
            let n = attempts.entry(p.clone()).or_insert(0);
            *n += 1;
            let target = if *n == 3 {
                proto::path::split_last(&p)
                    .map(|(parent, _)| parent.to_vec())
                    .unwrap_or_default()
            } else {
                p.clone()
            };
            if sent.iter().any(|d| is_under(&target, d)) {
                continue;
            }
            tracing::info!(path = %String::from_utf8_lossy(&target), "resync: resending a path that is out of sync");
            if let Err(e) = sender.path(&target) {
                failed = Some(e);
                break;
            }
            sent.push(target);
        }
        if let Some(e) = failed {
            tracing::warn!("resync interrupted: {e}");
        } else if let Some(last) = sender.last_seq {
            let _ = commit(&mirror, last);
        }
        let still = mirror.progress(|p| p.out_of_sync_total);
        if still > 0 {
            tracing::warn!(
                paths = still,
                "resync: the image is still out of sync; retrying in {backoff:?}"
            );
            next_heal = Instant::now() + backoff;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Run a CP and wait for it; true when the destination applied `last`.
pub fn commit(mirror: &Mirror, last: u64) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    mirror.cp_command(CpCommand::Demand(tx));
    let _ = rx.blocking_recv();
    mirror.progress(|p| p.applied_remote >= last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        for p in [&b""[..], b"a/b", &[0xff, 0x00, 0x10]] {
            assert_eq!(unhex(&hex(p)).unwrap(), p);
        }
        assert!(unhex("abc").is_none() && unhex("zz").is_none());
    }
}
