//! The mirrored volume: every filesystem operation on the backing directory, with the mutating
//! ones logged, applied and mirrored through [`Mirror`]. The FUSE adapter (`fuse.rs`) only
//! unpacks arguments, calls these methods and replies; everything here can be tested without a
//! mount.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use proto::apply::Tree;
use proto::record::Timestamp;
use proto::Handle;
use proto::Op;
use rustix::fs::{FileType, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{FsError, FsResult};
use crate::inodes::{InodeTable, ROOT};
use crate::mirror::{Mirror, RECORD_OVERHEAD};

/// Names under the root that hold files unlinked while open (as NFS's `.nfsXXXX`): hidden from
/// the mount, removed at the last close.
pub const ORPHAN_PREFIX: &[u8] = b".nvmirror-orphan.";

/// Who asks (from the FUSE request).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// uid of the calling process.
    pub uid: u32,
    /// gid of the calling process.
    pub gid: u32,
}

/// A time to set: a concrete time or "now" (resolved once, so the record carries a concrete
/// time and both trees get the same value).
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    /// Now.
    Now,
    /// This time.
    At(SystemTime),
}

/// What a mutating operation answers, valid for the client once the records it logged are
/// settled (mirrored, or the policy's answer): the FUSE layer replies with `value` from
/// [`Mirror::when_durable`]; other callers [`Durable::wait`].
#[must_use]
#[derive(Debug)]
pub struct Durable<T> {
    /// The answer (attributes, a file handle, a byte count...).
    pub value: T,
    /// The operation's last record; `None` when it logged nothing (nothing to wait for).
    pub seq: Option<u64>,
}

impl<T> Durable<T> {
    fn new(value: T, seq: Option<u64>) -> Self {
        Durable { value, seq }
    }

    /// The same records' wait with the answer turned into another (what the reply carries).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Durable<U> {
        Durable {
            value: f(self.value),
            seq: self.seq,
        }
    }

    /// Wait on this thread until the records are settled; the value, or why they are not.
    pub fn wait(self, mirror: &Mirror) -> FsResult<T> {
        if let Some(seq) = self.seq {
            mirror.wait_durable(seq)?;
        }
        Ok(self.value)
    }
}

/// Attribute changes of a setattr.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrChange {
    /// New mode bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New atime.
    pub atime: Option<SetTime>,
    /// New mtime.
    pub mtime: Option<SetTime>,
    /// A truncation by this caller (without CAP_FSETID) clears set-ID bits.
    pub unprivileged: Option<Unprivileged>,
}

/// One directory entry of a directory handle.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// FUSE inode number.
    pub ino: u64,
    /// Type.
    pub kind: FileType,
    /// Name.
    pub name: Vec<u8>,
}

fn timestamp(t: SetTime) -> Timestamp {
    let t = match t {
        SetTime::Now => SystemTime::now(),
        SetTime::At(t) => t,
    };
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mirrored volume.
pub struct Volume {
    tree: Arc<Tree>,
    mirror: Arc<Mirror>,
    table: Mutex<InodeTable>,
    files: Mutex<HashMap<u64, (u64, Arc<OwnedFd>)>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    next_orphan: AtomicU64,
    /// Inodes whose times changed since the last seal.
    changed: Mutex<std::collections::HashSet<u64>>,
    /// The baseline, told about renames that move entries it has not sent yet.
    baseline: std::sync::OnceLock<Arc<crate::baseline::Baseline>>,
    /// `--writeback-cache`: the kernel may read a page of a file opened write-only (to merge
    /// a partial write), so such files are opened read-write on the backing side.
    writeback_cache: std::sync::atomic::AtomicBool,
    /// Inodes known to have no `security.capability`, and the extended-attribute epoch of
    /// the mirror in which that was seen (see [`Volume::getxattr_len`]).
    no_caps: Mutex<(u64, std::collections::HashSet<u64>)>,
    /// For dropping what the kernel caches (attributes, names, pages) when this daemon changes
    /// the volume on its own; set once the FUSE session exists.
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

/// File capabilities: dropped at every write (by this daemon: see [`Volume::write`]), and
/// asked for by the kernel before a write whenever it has refreshed a file's attributes.
const CAPS_XATTR: &[u8] = b"security.capability";

/// Who changes a file's content without CAP_FSETID (the kernel's `FUSE_WRITE_KILL_SUIDGID`
/// for a write; for a truncation, fallocate or copy_file_range a caller other than root):
/// what the set-ID rule needs to know of them.
#[derive(Debug, Clone, Copy)]
pub struct Unprivileged {
    /// The caller's group.
    pub gid: u32,
    /// The calling process, whose supplementary groups count too.
    pub pid: u32,
}

impl Unprivileged {
    /// Whether the caller is in group `gid` (its own group or a supplementary one, read from
    /// `/proc/PID/status`; a process that is gone counts as not in the group, which clears the
    /// bit: the safe side).
    fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
    }
}

/// The set-ID bits of a regular file (`st`) a content change by `who` (without CAP_FSETID)
/// clears, as the kernel's `setattr_should_drop_suidgid` since Linux 6.2: set-user-ID always;
/// set-group-ID when the group may execute, or when `who` is not in the file's group.
pub fn privileged_bits(st: &Stat, who: &Unprivileged) -> u32 {
    let mode = st.st_mode;
    if mode & libc::S_IFMT != libc::S_IFREG {
        return 0;
    }
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !who.in_group(st.st_gid)) {
        kill |= libc::S_ISGID;
    }
    kill
}

/// Whether a chmod/chown of the file `st` to `mode` (already adjusted as the kernel sends it),
/// `uid` and `gid` would leave mode, owner and group as they are: what tar, `cp -p` and rsync
/// do to files they just created. A chown of a non-directory clears the set-user-ID bit, and
/// the set-group-ID bit of a group-executable file, even when the owner stays (the kernel's
/// `notify_change` under `ATTR_KILL_SUID`/`ATTR_KILL_SGID`); those are changes. Only the
/// status-change time moves, which the image does not mirror. (File capabilities, which a
/// chown removes, are the caller's to check.)
pub fn attrs_unchanged(st: &Stat, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>) -> bool {
    if mode.is_some_and(|m| m & 0o7777 != st.st_mode & 0o7777)
        || uid.is_some_and(|u| u != st.st_uid)
        || gid.is_some_and(|g| g != st.st_gid)
    {
        return false;
    }
    let kills = st.st_mode & libc::S_ISUID != 0
        || (st.st_mode & libc::S_ISGID != 0 && st.st_mode & libc::S_IXGRP != 0);
    !(chowns_a_file(st, uid, gid) && kills)
}

/// Whether a setattr with these `uid`/`gid` is a chown of a non-directory: what clears
/// set-ID bits and removes file capabilities.
fn chowns_a_file(st: &Stat, uid: Option<u32>, gid: Option<u32>) -> bool {
    (uid.is_some() || gid.is_some()) && st.st_mode & libc::S_IFMT != libc::S_IFDIR
}

/// The length of the extended attribute `name`, asked by `get` (an `lgetxattr` or
/// `fgetxattr` given a null buffer of size 0: nothing is read). rustix reports how much of a
/// buffer was filled, not the value's length, hence libc.
fn xattr_len(name: &[u8], get: impl FnOnce(*const libc::c_char) -> isize) -> FsResult<usize> {
    let c_name = std::ffi::CString::new(name).map_err(|_| Errno::INVAL)?;
    let n = get(c_name.as_ptr());
    if n < 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err(Errno::from_raw_os_error(e).into());
    }
    Ok(n as usize)
}
/// At most this many inodes are remembered without capabilities (then it starts afresh).
const NO_CAPS_MAX: usize = 1 << 16;

impl Volume {
    /// A volume over `tree` mirrored by `mirror`.
    pub fn new(tree: Arc<Tree>, mirror: Arc<Mirror>) -> FsResult<Self> {
        let root = rustix::fs::fstat(tree.root_fd())?;
        Ok(Volume {
            tree,
            mirror,
            table: Mutex::new(InodeTable::new(root.st_ino)),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            next_orphan: AtomicU64::new(1),
            changed: Mutex::new(std::collections::HashSet::new()),
            baseline: std::sync::OnceLock::new(),
            writeback_cache: std::sync::atomic::AtomicBool::new(false),
            no_caps: Mutex::new((0, std::collections::HashSet::new())),
            notifier: std::sync::OnceLock::new(),
        })
    }

    /// Install the FUSE session's notifier (see [`Volume::attrs_changed`]).
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// The daemon changed `ino`'s attributes on its own (not as the reply to the request the
    /// kernel sent): drop the kernel's cached attributes, so that nothing (a permission check,
    /// an exec, a stat) uses the old ones. Takes no lock the kernel could hold: safe from a
    /// request handler.
    pub fn attrs_changed(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            match n.inval_inode(fuser::INodeNo(ino), -1, 0) {
                Ok(()) => {}
                // The kernel no longer holds the inode: nothing cached.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => tracing::warn!("invalidating the attributes of inode {ino}: {e}"),
            }
        }
    }

    /// The backing volume changed behind the kernel's back (records taken back from the
    /// destination at a reconnection were applied, or an operation was applied but answered
    /// with an error because it could not be confirmed as mirrored): drop every name,
    /// attribute and page the kernel caches of the inodes it holds. Runs on a thread of its
    /// own: an invalidation of a name waits for the directory's lock, which a request waiting
    /// for the link may hold.
    pub fn forget_cached(self: &Arc<Self>) {
        if self.notifier.get().is_none() {
            return;
        }
        let volume = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nvmirror-inval".into())
            .spawn(move || {
                let Some(n) = volume.notifier.get() else {
                    return;
                };
                let known = volume.table().known();
                // ENOENT: the kernel holds no such name or inode any more (nothing cached).
                let failed_one = |r: std::io::Result<()>| {
                    matches!(r, Err(e) if e.raw_os_error() != Some(libc::ENOENT))
                };
                let mut failed = 0usize;
                for (ino, names) in &known {
                    for (parent, name) in names {
                        let r = n.inval_entry(fuser::INodeNo(*parent), OsStr::from_bytes(name));
                        failed += usize::from(failed_one(r));
                    }
                    failed += usize::from(failed_one(n.inval_inode(fuser::INodeNo(*ino), 0, 0)));
                }
                tracing::debug!(
                    inodes = known.len(),
                    failed,
                    "dropped the kernel's cached names, attributes and pages"
                );
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the cache invalidation thread: {e}");
        }
    }

    /// Every record logged so far, to wait for (a close or an fsync under `--writeback-cache`,
    /// whose write-backs were answered once logged here).
    pub fn everything_logged(&self) -> Durable<()> {
        let last = self.mirror.progress(|p| p.logged);
        Durable::new((), (last > 0).then_some(last))
    }

    /// Serve with the kernel's writeback cache (see `--writeback-cache`).
    pub fn set_writeback_cache(&self, on: bool) {
        self.writeback_cache.store(on, Ordering::Relaxed);
    }

    /// How to open the backing file for a FUSE open with `flags`.
    fn access(&self, flags: i32) -> OFlags {
        match open_access(flags) {
            OFlags::WRONLY if self.writeback_cache.load(Ordering::Relaxed) => OFlags::RDWR,
            a => a,
        }
    }

    /// Install the baseline (see [`crate::baseline`]).
    pub fn set_baseline(&self, b: Arc<crate::baseline::Baseline>) {
        let _ = self.baseline.set(b);
    }

    /// The baseline, once installed.
    pub fn baseline(&self) -> Option<&crate::baseline::Baseline> {
        self.baseline.get().map(|b| b.as_ref())
    }

    /// The backing volume.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The mirror core.
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// A rename or link moved `from` to `to` (under the sequencer lock).
    fn moved(&self, from: &[u8], to: &[u8]) {
        if let Some(b) = self.baseline.get() {
            b.moved(from, to);
        }
    }

    fn reserved_xattr(name: &[u8]) -> bool {
        name.starts_with(crate::identity::RESERVED_PREFIX)
    }

    /// These inodes' times changed: log their times now, in the same transaction (a no-op on
    /// the backing volume), so that the image gets the source's times with the operation —
    /// also when a promotion applies records no seal covered. What does not fit in the
    /// partition waits for the next seal (see `SealTimes`).
    fn touched(&self, txn: &mut crate::mirror::Txn<'_>, inodes: &[u64]) {
        let mut entries = Vec::with_capacity(inodes.len());
        for &ino in inodes {
            let Ok(path) = self.table().path(ino) else {
                continue;
            };
            if let Ok(st) = self.tree.stat(&path) {
                let handle = if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile {
                    self.handle(Some(ino), &path, None)
                } else {
                    Handle::none()
                };
                entries.push(times_entry(path, &st, handle));
            }
        }
        self.log_times(txn, inodes, entries);
    }

    /// [`Volume::touched`] for one open file whose path and handle the caller holds (the
    /// write path): `fstat` of its descriptor, no path resolution, no table lookup.
    fn touched_open(
        &self,
        txn: &mut crate::mirror::Txn<'_>,
        ino: u64,
        path: Vec<u8>,
        fd: &OwnedFd,
        handle: Handle,
    ) {
        let entries = match rustix::fs::fstat(fd) {
            Ok(st) => vec![times_entry(path, &st, handle)],
            Err(_) => Vec::new(),
        };
        self.log_times(txn, &[ino], entries);
    }

    /// Log one `Times` record; what does not fit waits for the next seal.
    fn log_times(
        &self,
        txn: &mut crate::mirror::Txn<'_>,
        inodes: &[u64],
        entries: Vec<proto::TimesEntry>,
    ) {
        if entries.is_empty() {
            return;
        }
        let op = Op::Times { entries };
        if txn.record(|b| op.encode_into(b), || Ok(())).is_err() {
            lock(&self.changed).extend(inodes.iter().copied());
        }
    }

    /// How many inodes the table holds (status: memory follows the kernel's references).
    pub fn inodes_tracked(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> MutexGuard<'_, InodeTable> {
        lock(&self.table)
    }

    /// The file handle of the backing inode `ino` (FUSE number) at `path`, or of `fd` when the
    /// caller has it open: stamped on content records and renames for exact recovery after a
    /// power cut (see `proto::replay`). Cached in the inode table.
    fn handle(&self, ino: Option<u64>, path: &[u8], fd: Option<&OwnedFd>) -> Handle {
        if let Some(h) = ino.and_then(|i| self.table().handle(i)) {
            return h;
        }
        let h = match fd {
            Some(fd) => Handle::of(fd),
            None => match self.tree.open_at(path, OFlags::PATH) {
                Ok(fd) => Handle::of(&fd),
                Err(_) => Handle::none(),
            },
        };
        if let Some(i) = ino {
            self.table().set_handle(i, h.clone());
        }
        h
    }

    fn with_ino(&self, mut st: Stat) -> Stat {
        st.st_ino = self.table().fuse_ino(st.st_ino);
        st
    }

    fn stat_path(&self, path: &[u8]) -> FsResult<Stat> {
        Ok(self.with_ino(self.tree.stat(path)?))
    }

    fn file(&self, fh: u64) -> FsResult<Arc<OwnedFd>> {
        lock(&self.files)
            .get(&fh)
            .map(|(_, fd)| fd.clone())
            .ok_or(FsError::UnknownHandle(fh))
    }

    fn is_orphan(parent: u64, name: &[u8]) -> bool {
        parent == ROOT && name.starts_with(ORPHAN_PREFIX)
    }

    /// Owner and group of a new file in `parent_path` (the setgid-directory rule), and whether
    /// the parent is setgid.
    fn new_owner(&self, caller: Caller, parent_path: &[u8]) -> FsResult<(u32, u32, bool)> {
        let p = self.tree.stat(parent_path)?;
        let setgid = p.st_mode & libc::S_ISGID != 0;
        Ok((
            caller.uid,
            if setgid { p.st_gid } else { caller.gid },
            setgid,
        ))
    }

    /// Remove orphans left by a previous run (files unlinked while open, whose last close never
    /// came because the process stopped): after a restart nobody holds them open. The removals
    /// are mirrored like any unlink. Returns how many were removed.
    pub fn remove_leftover_orphans(&self) -> FsResult<usize> {
        let fd = self.tree.open_at(b"", OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut names = Vec::new();
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        while let Some(e) = dir.read() {
            let name = e?.file_name().to_bytes().to_vec();
            if name.starts_with(ORPHAN_PREFIX) {
                names.push(name);
            }
        }
        for name in &names {
            let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
            let op = Op::Unlink { path: name.clone() };
            txn.apply(&self.tree, &op)?;
            self.touched(&mut txn, &[ROOT]);
            txn.finish()?;
        }
        Ok(names.len())
    }

    /// The FUSE generation to report with `ino` (see `inodes::Node::generation`).
    pub fn generation(&self, ino: u64) -> u64 {
        self.table().generation(ino)
    }

    /// Look a name up and count the kernel's reference.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Stat> {
        if Self::is_orphan(parent, name) {
            return Err(Errno::NOENT.into());
        }
        // Optimistic: look without the sequencer lock, and register the name only if no
        // transaction ran meanwhile (a rename or unlink + create between our stat and our
        // registration would otherwise bind the name to the wrong inode).
        for _ in 0..3 {
            let before = self.mirror.txn_generation();
            if before % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let path = self.table().child_path(parent, name)?;
            let st = self.tree.stat(&path);
            let mut t = self.table();
            if self.mirror.txn_generation() != before {
                continue;
            }
            return Ok(Self::register(&mut t, st?, parent, name));
        }
        // Busy namespace: look under the sequencer lock, where nothing can change.
        let _quiet = self.mirror.quiesce();
        let path = self.table().child_path(parent, name)?;
        let st = self.tree.stat(&path)?;
        Ok(Self::register(&mut self.table(), st, parent, name))
    }

    fn register(t: &mut InodeTable, mut st: Stat, parent: u64, name: &[u8]) -> Stat {
        let ino = t.fuse_ino(st.st_ino);
        t.looked_up(ino, parent, name);
        st.st_ino = ino;
        st
    }

    /// The kernel forgets `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        self.table().forget(ino, n);
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Stat> {
        let mut st = match fh.map(|fh| self.file(fh)) {
            Some(Ok(fd)) => self.with_ino(rustix::fs::fstat(&*fd)?),
            _ => {
                let path = self.table().path(ino)?;
                self.stat_path(&path)?
            }
        };
        // Unlinked while open: only a hidden orphan name is left, which is no name.
        if st.st_nlink == 1 && self.has_only_orphan_names_open(ino) {
            st.st_nlink = 0;
        }
        Ok(st)
    }

    /// Change attributes (chmod, chown, truncate, utimens).
    pub fn setattr(&self, ino: u64, change: AttrChange) -> FsResult<Durable<Stat>> {
        let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
        let path = self.table().path(ino)?;
        // A truncation by an unprivileged caller clears set-ID bits (the kernel leaves it to
        // us under HANDLE_KILLPRIV_V2), decided under the sequencer lock so that no chmod
        // runs between reading the mode and writing it back; a mode given with it is the
        // caller's own choice.
        let mut mode = change.mode;
        if let (Some(_), None, Some(who)) = (change.size, mode, change.unprivileged) {
            let st = self.tree.stat(&path)?;
            let kill = privileged_bits(&st, &who);
            if kill != 0 {
                mode = Some(st.st_mode & 0o7777 & !kill);
            }
        }
        let op = Op::SetAttr {
            path: path.clone(),
            mode: mode.map(|m| m & 0o7777),
            uid: change.uid,
            gid: change.gid,
            size: change.size,
            atime: change.atime.map(timestamp),
            mtime: change.mtime.map(timestamp),
            handle: match change.size {
                Some(_) => self.handle(Some(ino), &path, None),
                None => Handle::none(),
            },
        };
        if let Some(answer) = self.setattr_unchanged(&txn, ino, &path, &op)? {
            return Ok(answer);
        }
        txn.apply(&self.tree, &op)?;
        // A truncation stamps the file with this machine's clock, which the image's replay
        // cannot know; mode, owner and the times a setattr carries come out the same on both
        // sides (the record holds them as values), so those need no times record.
        if change.size.is_some() {
            self.touched(&mut txn, &[ino]);
        }
        let seq = txn.release();
        Ok(Durable::new(self.stat_path(&path)?, seq))
    }

    /// A chmod or chown that leaves mode, owner and group as they are (see
    /// [`attrs_unchanged`]) changes nothing the image holds: it is applied to the backing
    /// volume for its status-change time, logs no record, and its reply waits only for the
    /// records logged before it (the state it found). `None`: it changes something, log it.
    fn setattr_unchanged(
        &self,
        txn: &crate::mirror::Txn<'_>,
        ino: u64,
        path: &[u8],
        op: &Op,
    ) -> FsResult<Option<Durable<Stat>>> {
        let Op::SetAttr {
            mode,
            uid,
            gid,
            size: None,
            atime: None,
            mtime: None,
            ..
        } = op
        else {
            return Ok(None);
        };
        let before = self.tree.stat(path)?;
        if !attrs_unchanged(&before, *mode, *uid, *gid) {
            return Ok(None);
        }
        // A chown removes file capabilities: a file with any is changed by it.
        if chowns_a_file(&before, *uid, *gid) {
            match self.getxattr_len(ino, CAPS_XATTR) {
                Err(FsError::Backing(Errno::NODATA)) => {}
                _ => return Ok(None),
            }
        }
        self.tree
            .apply(op, proto::apply::ApplyMode::Live)
            .map_err(|e| FsError::Backing(Errno::from_raw_os_error(e.errno())))?;
        let after = self.stat_path(path)?;
        if (after.st_mode, after.st_uid, after.st_gid)
            != (before.st_mode, before.st_uid, before.st_gid)
        {
            // Not what the kernel's rules predicted: log what the file now is, so that the
            // image follows (a crash before this record is a difference `verify` reports).
            tracing::warn!(path = %String::from_utf8_lossy(path), before = before.st_mode,
                after = after.st_mode, "a chmod/chown expected to change nothing did; mirroring the result");
            return Ok(None);
        }
        let logged = txn.next_seq().saturating_sub(1);
        Ok(Some(Durable::new(after, (logged > 0).then_some(logged))))
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let path = self.table().path(ino)?;
        let (dir, name) = self.tree.parent(&path)?;
        Ok(rustix::fs::readlinkat(&dir, OsStr::from_bytes(name), Vec::new())?.into_bytes())
    }

    fn create_common(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        make: impl FnOnce(Vec<u8>, u32, u32, bool) -> Op,
    ) -> FsResult<Durable<Stat>> {
        if Self::is_orphan(parent, name) {
            return Err(Errno::PERM.into());
        }
        let mut txn = self.mirror.begin(RECORD_OVERHEAD + name.len())?;
        let ppath = self.table().path(parent)?;
        let (uid, gid, setgid) = self.new_owner(caller, &ppath)?;
        let path = proto::path::join(&ppath, name);
        let op = make(path.clone(), uid, gid, setgid);
        if let Err(e) = txn.apply(&self.tree, &op) {
            if matches!(e, FsError::Backing(Errno::EXIST)) {
                let t = self.table();
                tracing::debug!(
                    parent,
                    path = %String::from_utf8_lossy(&path),
                    names = ?t.node(parent).map(|n| n.names.iter().map(|(p, n)| (*p, String::from_utf8_lossy(n).into_owned())).collect::<Vec<_>>()),
                    "create: name exists"
                );
            }
            return Err(e);
        }
        let st = self.stat_path(&path)?;
        {
            let mut t = self.table();
            t.created(st.st_ino);
            t.looked_up(st.st_ino, parent, name);
        }
        self.touched(&mut txn, &[st.st_ino, parent]);
        Ok(Durable::new(st, txn.release()))
    }

    /// mknod: regular files, FIFOs, sockets, device nodes.
    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u64,
    ) -> FsResult<Durable<Stat>> {
        let perm = mode & 0o7777 & !umask;
        let kind = mode & libc::S_IFMT;
        self.create_common(caller, parent, name, |path, uid, gid, _| {
            if kind == libc::S_IFREG || kind == 0 {
                Op::Create {
                    path,
                    mode: perm,
                    uid,
                    gid,
                }
            } else {
                Op::Mknod {
                    path,
                    mode: kind | perm,
                    rdev,
                    uid,
                    gid,
                }
            }
        })
    }

    /// mkdir (a directory in a setgid directory is setgid too).
    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Durable<Stat>> {
        let perm = mode & 0o7777 & !umask;
        self.create_common(caller, parent, name, |path, uid, gid, setgid| Op::Mkdir {
            path,
            mode: if setgid { perm | libc::S_ISGID } else { perm },
            uid,
            gid,
        })
    }

    /// symlink.
    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Durable<Stat>> {
        self.create_common(caller, parent, name, |path, uid, gid, _| Op::Symlink {
            path,
            target: target.to_vec(),
            uid,
            gid,
        })
    }

    /// Create and open a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<Durable<(Stat, u64)>> {
        if Self::is_orphan(parent, name) {
            return Err(Errno::PERM.into());
        }
        let perm = mode & 0o7777 & !umask;
        let mut txn = self.mirror.begin(RECORD_OVERHEAD + name.len())?;
        let ppath = self.table().path(parent)?;
        let (uid, gid, _) = self.new_owner(caller, &ppath)?;
        let path = proto::path::join(&ppath, name);
        let op = Op::Create {
            path: path.clone(),
            mode: perm,
            uid,
            gid,
        };
        let access = self.access(flags);
        let seq = txn.next_seq();
        let caps_epoch = self.mirror.xattr_epoch();
        let fd = txn.record(
            |b| op.encode_into(b),
            || {
                self.tree.set_marker(seq)?;
                Ok(self.tree.create(&path, perm, uid, gid, access)?)
            },
        )?;
        let st = self.with_ino(rustix::fs::fstat(&fd)?);
        {
            let mut t = self.table();
            t.created(st.st_ino);
            t.looked_up(st.st_ino, parent, name);
            t.opened(st.st_ino, 1);
            drop(t);
            self.touched(&mut txn, &[st.st_ino, parent]);
        }
        // A new file has no capabilities: the kernel's question before its first write is
        // answered from memory.
        self.note_without_caps(st.st_ino, caps_epoch);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, (st.st_ino, Arc::new(fd)));
        Ok(Durable::new((st, fh), txn.release()))
    }

    /// Open a file.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let path = self.table().path(ino)?;
        let fd = self.tree.open_at(&path, self.access(flags))?;
        self.table().opened(ino, 1);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, (ino, Arc::new(fd)));
        Ok(fh)
    }

    /// Read from an open file.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let fd = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(&*fd, &mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Write to an open file. Large writes are split into records that fit a partition; the
    /// reply waits for the last one (all earlier ones are then durable too).
    ///
    /// The kernel leaves dropping privileges on a write to this daemon (FUSE
    /// `HANDLE_KILLPRIV_V2`, which spares a `security.capability` lookup before every write):
    /// the first piece's transaction first removes the file's capabilities, if it has any,
    /// and for an `unprivileged` writer clears the set-ID bits the kernel's own
    /// `file_remove_privs` would, each as a mirrored record (see [`Volume::remove_privs`]).
    pub fn write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        unprivileged: Option<Unprivileged>,
    ) -> FsResult<Durable<u32>> {
        let fd = self.file(fh)?;
        let chunk = self.mirror.max_record_data();
        let mut last = None;
        for (i, piece) in data.chunks(chunk.max(1)).enumerate() {
            let off = offset + (i * chunk) as u64;
            let mut txn = self.mirror.begin(RECORD_OVERHEAD + piece.len())?;
            let path = self.table().path(ino)?;
            if i == 0 {
                self.remove_privs(&mut txn, ino, &path, &fd, unprivileged)?;
            }
            let handle = self.handle(Some(ino), &path, Some(&fd));
            txn.record(
                |b| Op::encode_write_into(b, &path, off, piece, &handle),
                || Ok(proto::apply::write_all_at(&*fd, piece, off)?),
            )?;
            self.touched_open(&mut txn, ino, path, &fd, handle);
            last = txn.release();
        }
        Ok(Durable::new(data.len() as u32, last))
    }

    /// What the kernel's `file_remove_privs` does before a write, as records of `txn`: drop
    /// `security.capability` if the file has it, and for an `unprivileged` writer clear the
    /// set-ID bits [`privileged_bits`] names. A cleared bit is invalidated in the kernel's
    /// cache at once, before anything else of the operation can fail: the kernel must never
    /// exec the file with the old mode.
    fn remove_privs(
        &self,
        txn: &mut crate::mirror::Txn<'_>,
        ino: u64,
        path: &[u8],
        fd: &OwnedFd,
        unprivileged: Option<Unprivileged>,
    ) -> FsResult<()> {
        let caps = self.probe_xattr_len(ino, CAPS_XATTR, || {
            use std::os::fd::AsRawFd;
            xattr_len(CAPS_XATTR, |name| {
                // SAFETY: the descriptor is open for the call; the name is NUL-terminated; a
                // null buffer of size 0 asks for the length only.
                unsafe { libc::fgetxattr(fd.as_raw_fd(), name, std::ptr::null_mut(), 0) }
            })
        });
        match caps {
            Ok(_) => {
                let op = Op::RemoveXattr {
                    path: path.to_vec(),
                    name: CAPS_XATTR.to_vec(),
                };
                self.apply_xattr_change(txn, ino, &op)?;
            }
            Err(FsError::Backing(Errno::NODATA | Errno::NOTSUP)) => {}
            Err(e) => return Err(e),
        }
        let Some(who) = unprivileged else {
            return Ok(());
        };
        let st = rustix::fs::fstat(fd)?;
        let kill = privileged_bits(&st, &who);
        if kill == 0 {
            return Ok(());
        }
        let op = Op::chmod(path.to_vec(), st.st_mode & 0o7777 & !kill);
        txn.apply(&self.tree, &op)?;
        self.attrs_changed(ino);
        Ok(())
    }

    /// Forget a handle the client never got (its create was answered with an error): no
    /// record, no lock beyond the tables', so that it can run on the network thread.
    pub fn drop_handle(&self, fh: u64) {
        if let Some((ino, _fd)) = lock(&self.files).remove(&fh) {
            self.table().opened(ino, -1);
        }
    }

    /// Close a file handle; the last close of an unlinked-while-open file removes its orphan.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some((ino, _fd)) = lock(&self.files).remove(&fh) else {
            return Err(FsError::UnknownHandle(fh));
        };
        // The open count drops under the sequencer lock: an unlink deciding, under that lock,
        // whether to orphan this file must see either the count before this close (and then
        // the orphan is removed below) or after it (and then it unlinks plainly).
        let mut txn = match self.mirror.begin(RECORD_OVERHEAD) {
            Ok(t) => t,
            Err(e) => {
                self.table().opened(ino, -1);
                return Err(e);
            }
        };
        self.table().opened(ino, -1);
        if self.has_only_orphan_names(ino) {
            let names: Vec<Vec<u8>> = self
                .table()
                .node(ino)
                .map(|n| n.names.iter().map(|(_, name)| name.clone()).collect())
                .unwrap_or_default();
            for name in names {
                let op = Op::Unlink { path: name.clone() };
                txn.apply(&self.tree, &op)?;
                self.table().remove_name(ROOT, &name);
                self.touched(&mut txn, &[ROOT]);
                self.attrs_changed(ROOT);
            }
        }
        txn.finish()
    }

    /// Every name left of `ino` is an orphan name (open or not).
    fn has_only_orphan_names_open(&self, ino: u64) -> bool {
        let t = self.table();
        t.node(ino).is_some_and(|n| {
            !n.names.is_empty() && n.names.iter().all(|(p, name)| Self::is_orphan(*p, name))
        })
    }

    fn has_only_orphan_names(&self, ino: u64) -> bool {
        let t = self.table();
        t.node(ino).is_some_and(|n| {
            n.opens == 0
                && !n.names.is_empty()
                && n.names.iter().all(|(p, name)| Self::is_orphan(*p, name))
        })
    }

    /// If (parent, name) is the last known name of an open file, move it to an orphan name
    /// instead of removing it, so the holder can keep using it. Returns true when it did.
    fn orphan_if_open(
        &self,
        txn: &mut crate::mirror::Txn<'_>,
        parent: u64,
        name: &[u8],
    ) -> FsResult<Option<Vec<u8>>> {
        let (ino, path) = {
            let t = self.table();
            let Some(ino) = t.child(parent, name) else {
                return Ok(None);
            };
            match t.node(ino) {
                Some(n) if n.opens > 0 && n.names.len() == 1 => (ino, t.child_path(parent, name)?),
                _ => return Ok(None),
            }
        };
        let st = self.tree.stat(&path)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Ok(None);
        }
        let orphan = [
            ORPHAN_PREFIX,
            format!("{ino}.{}", self.next_orphan.fetch_add(1, Ordering::Relaxed)).as_bytes(),
        ]
        .concat();
        let op = Op::Rename {
            handle: self.handle(Some(ino), &path, None),
            from: path,
            to: orphan.clone(),
            flags: 0,
        };
        txn.apply(&self.tree, &op)?;
        self.table().renamed(parent, name, ROOT, &orphan);
        self.touched(txn, &[ROOT, parent]);
        // The kernel saw an unlink in `parent`; the root changed too (a hidden name came).
        self.attrs_changed(ROOT);
        Ok(Some(orphan))
    }

    /// unlink.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<Durable<()>> {
        let mut txn = self.mirror.begin(2 * RECORD_OVERHEAD)?;
        if self.orphan_if_open(&mut txn, parent, name)?.is_none() {
            let path = self.table().child_path(parent, name)?;
            let op = Op::Unlink { path };
            txn.apply(&self.tree, &op)?;
            self.table().remove_name(parent, name);
            self.touched(&mut txn, &[parent]);
        }
        Ok(Durable::new((), txn.release()))
    }

    /// rmdir.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<Durable<()>> {
        let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
        let path = self.table().child_path(parent, name)?;
        let op = Op::Rmdir { path };
        txn.apply(&self.tree, &op)?;
        self.table().remove_name(parent, name);
        self.touched(&mut txn, &[parent]);
        Ok(Durable::new((), txn.release()))
    }

    /// rename, with RENAME_NOREPLACE / RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<Durable<()>> {
        if Self::is_orphan(new_parent, new_name) || Self::is_orphan(parent, name) {
            return Err(Errno::PERM.into());
        }
        let mut txn = self.mirror.begin(3 * RECORD_OVERHEAD)?;
        let (from, to) = {
            let t = self.table();
            (
                t.child_path(parent, name)?,
                t.child_path(new_parent, new_name)?,
            )
        };
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if !exchange {
            // The source must exist before we touch the target.
            self.tree.stat(&from)?;
            let target = self.tree.stat(&to);
            if noreplace && target.is_ok() {
                return Err(Errno::EXIST.into());
            }
        }
        let orphaned = if !exchange && from != to && self.tree.stat(&to).is_ok() {
            self.orphan_if_open(&mut txn, new_parent, new_name)?
        } else {
            None
        };
        let moving = self.table().child(parent, name);
        let op = Op::Rename {
            handle: self.handle(moving, &from, None),
            from: from.clone(),
            to: to.clone(),
            flags,
        };
        if let Err(e) = txn.apply(&self.tree, &op) {
            // The rename failed (EISDIR, ENOTEMPTY...): give the open target its name back.
            if let Some(orphan) = orphaned {
                let back = Op::Rename {
                    handle: self.handle(None, &orphan, None),
                    from: orphan.clone(),
                    to,
                    flags: 0,
                };
                txn.apply(&self.tree, &back)?;
                self.table().renamed(ROOT, &orphan, new_parent, new_name);
            }
            txn.finish()?;
            return Err(e);
        }
        self.moved(&from, &to);
        if exchange {
            self.moved(&to, &from);
        }
        {
            let mut t = self.table();
            if exchange {
                t.exchanged(parent, name, new_parent, new_name);
            } else {
                t.renamed(parent, name, new_parent, new_name);
            }
        }
        let moved = self.table().child(new_parent, new_name);
        self.touched(&mut txn, &[parent, new_parent]);
        if let Some(m) = moved {
            self.touched(&mut txn, &[m]);
        }
        Ok(Durable::new((), txn.release()))
    }

    /// link.
    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Durable<Stat>> {
        if Self::is_orphan(new_parent, new_name) {
            return Err(Errno::PERM.into());
        }
        let mut txn = self.mirror.begin(2 * RECORD_OVERHEAD)?;
        let (existing, new_path) = {
            let t = self.table();
            (t.path(ino)?, t.child_path(new_parent, new_name)?)
        };
        let op = Op::Link {
            existing: existing.clone(),
            new_path: new_path.clone(),
        };
        txn.apply(&self.tree, &op)?;
        if let (Some(b), Ok(st)) = (self.baseline.get(), self.tree.stat(&new_path)) {
            b.linked(&existing, &new_path, st.st_ino);
        }
        let st = self.stat_path(&new_path)?;
        self.table().looked_up(st.st_ino, new_parent, new_name);
        self.touched(&mut txn, &[new_parent]);
        Ok(Durable::new(st, txn.release()))
    }

    /// Read a whole directory for a directory handle.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let path = self.table().path(ino)?;
        let fd = self
            .tree
            .open_at(&path, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let parent_ino = {
            let t = self.table();
            t.node(ino)
                .and_then(|n| n.names.first().map(|(p, _)| *p))
                .unwrap_or(ROOT)
        };
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: parent_ino,
                kind: FileType::Directory,
                name: b"..".to_vec(),
            },
        ];
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        let t = self.table();
        while let Some(e) = dir.read() {
            let e = e?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." || Self::is_orphan(ino, name) {
                continue;
            }
            entries.push(DirEntry {
                ino: t.fuse_ino(e.ino()),
                kind: e.file_type(),
                name: name.to_vec(),
            });
        }
        drop(t);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// The entries of a directory handle.
    pub fn dir_entries(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or(FsError::UnknownHandle(fh))
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// statfs of the backing volume.
    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        Ok(rustix::fs::fstatvfs(self.tree.root_fd())?)
    }

    /// setxattr.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if Self::reserved_xattr(name) {
            return Err(Errno::PERM.into());
        }
        let mut txn = self
            .mirror
            .begin(RECORD_OVERHEAD + name.len() + value.len())?;
        let path = self.table().path(ino)?;
        let op = Op::SetXattr {
            path,
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        };
        self.apply_xattr_change(&mut txn, ino, &op)?;
        txn.finish()
    }

    /// removexattr.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        if Self::reserved_xattr(name) {
            return Err(Errno::PERM.into());
        }
        let mut txn = self.mirror.begin(RECORD_OVERHEAD + name.len())?;
        let path = self.table().path(ino)?;
        let op = Op::RemoveXattr {
            path,
            name: name.to_vec(),
        };
        self.apply_xattr_change(&mut txn, ino, &op)?;
        txn.finish()
    }

    /// Apply a setxattr or removexattr of `ino`: the extended-attribute epoch ends whatever
    /// the outcome (the cache of absent capabilities may be wrong now), and on success the
    /// kernel's attributes of `ino` are dropped, since an access ACL
    /// (`system.posix_acl_access`) rewrites the mode's group bits, which the kernel's
    /// permission checks read from its cache.
    fn apply_xattr_change(
        &self,
        txn: &mut crate::mirror::Txn<'_>,
        ino: u64,
        op: &Op,
    ) -> FsResult<()> {
        let applied = txn.apply(&self.tree, op);
        self.mirror.xattrs_changed();
        applied?;
        self.attrs_changed(ino);
        Ok(())
    }

    /// getxattr: the value, at most `size` bytes of it (ERANGE when it is longer).
    pub fn getxattr(&self, ino: u64, name: &[u8], size: u32) -> FsResult<Vec<u8>> {
        if Self::reserved_xattr(name) || self.known_without(ino, name) {
            return Err(Errno::NODATA.into());
        }
        let path = self.table().path(ino)?;
        let (_keep, p) = self.tree.proc_path(&path)?;
        let name = OsStr::from_bytes(name);
        let mut buf = vec![0u8; size as usize];
        let n = rustix::fs::lgetxattr(&p, name, &mut buf[..])?;
        buf.truncate(n);
        Ok(buf)
    }

    /// getxattr with size 0: how long the value is, without reading it. The kernel asks this
    /// of `security.capability` before the first write to an inode after each refresh of its
    /// attributes (before every write without HANDLE_KILLPRIV_V2), so it must be cheap: it
    /// allocates no value buffer, and an inode seen without capabilities is answered from
    /// memory until attributes change (every change passes through this daemon: see
    /// `Mirror::xattrs_changed`).
    pub fn getxattr_len(&self, ino: u64, name: &[u8]) -> FsResult<usize> {
        if Self::reserved_xattr(name) {
            return Err(Errno::NODATA.into());
        }
        self.probe_xattr_len(ino, name, || {
            let path = self.table().path(ino)?;
            let (_keep, p) = self.tree.proc_path(&path)?;
            let c_path =
                std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::INVAL)?;
            xattr_len(name, |name| {
                // SAFETY: both strings are NUL-terminated and outlive the call; a null value
                // buffer with size 0 asks for the length only.
                unsafe { libc::lgetxattr(c_path.as_ptr(), name, std::ptr::null_mut(), 0) }
            })
        })
    }

    /// The length of `ino`'s attribute `name` as `probe` finds it, unless the inode is known
    /// to have none (ENODATA from memory); a `security.capability` found absent is remembered
    /// for the epoch the probe began in (see [`Volume::note_without_caps`]).
    fn probe_xattr_len(
        &self,
        ino: u64,
        name: &[u8],
        probe: impl FnOnce() -> FsResult<usize>,
    ) -> FsResult<usize> {
        if self.known_without(ino, name) {
            return Err(Errno::NODATA.into());
        }
        let epoch = self.mirror.xattr_epoch();
        let r = probe();
        if matches!(r, Err(FsError::Backing(Errno::NODATA))) && name == CAPS_XATTR {
            self.note_without_caps(ino, epoch);
        }
        r
    }

    /// True when `ino` is known to have no `name` (only tracked for `security.capability`).
    fn known_without(&self, ino: u64, name: &[u8]) -> bool {
        if name != CAPS_XATTR {
            return false;
        }
        let cache = lock(&self.no_caps);
        cache.0 == self.mirror.xattr_epoch() && cache.1.contains(&ino)
    }

    /// Remember that `ino` had no capabilities, as seen by a look that began in `epoch`: not
    /// if attributes changed since (the look may have raced the change).
    fn note_without_caps(&self, ino: u64, epoch: u64) {
        let mut cache = lock(&self.no_caps);
        if self.mirror.xattr_epoch() != epoch {
            return;
        }
        if cache.0 != epoch || cache.1.len() >= NO_CAPS_MAX {
            cache.0 = epoch;
            cache.1.clear();
        }
        cache.1.insert(ino);
    }

    /// listxattr.
    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<Vec<u8>> {
        let path = self.table().path(ino)?;
        let (_keep, p) = self.tree.proc_path(&path)?;
        let mut buf = vec![0u8; 65536];
        let n = rustix::fs::llistxattr(&p, &mut buf[..])?;
        let mut out = Vec::with_capacity(n);
        for name in buf[..n].split(|c| *c == 0).filter(|n| !n.is_empty()) {
            if !Self::reserved_xattr(name) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        if size != 0 && out.len() > size as usize {
            return Err(Errno::RANGE.into());
        }
        Ok(out)
    }

    /// fallocate (allocate, keep size, punch hole, zero range); privileges dropped first as
    /// for a write.
    #[allow(clippy::too_many_arguments)]
    pub fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
        unprivileged: Option<Unprivileged>,
    ) -> FsResult<()> {
        let fd = self.file(fh)?;
        let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
        let path = self.table().path(ino)?;
        self.remove_privs(&mut txn, ino, &path, &fd, unprivileged)?;
        let handle = self.handle(Some(ino), &path, Some(&fd));
        let op = Op::Fallocate {
            path,
            mode,
            offset,
            length,
            handle,
        };
        let flags = rustix::fs::FallocateFlags::from_bits(mode as u32).ok_or(Errno::OPNOTSUPP)?;
        txn.record(
            |b| op.encode_into(b),
            || Ok(rustix::fs::fallocate(&*fd, flags, offset, length)?),
        )?;
        self.touched(&mut txn, &[ino]);
        txn.finish()
    }

    /// copy_file_range between two open files of this volume: logged as the writes it makes
    /// (a copy re-applied after a power cut would read a source that later writes may already
    /// have changed; a write carries its bytes), privileges dropped as for a write.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        _ino_in: u64,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        unprivileged: Option<Unprivileged>,
    ) -> FsResult<u64> {
        let src = self.file(fh_in)?;
        let chunk = self.mirror.max_record_data().max(1) as u64;
        let mut done = 0u64;
        let mut buf = Vec::new();
        while done < len {
            let want = (len - done).min(chunk) as usize;
            buf.resize(want, 0);
            let mut got = 0;
            while got < want {
                let n = rustix::io::pread(&*src, &mut buf[got..], off_in + done + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                break;
            }
            let who = if done == 0 { unprivileged } else { None };
            self.write(ino_out, fh_out, off_out + done, &buf[..got], who)?
                .wait(&self.mirror)?;
            done += got as u64;
            if got < want {
                break;
            }
        }
        Ok(done)
    }
}

/// The access mode (and nothing else) of an open: O_APPEND, O_TRUNC, O_CREAT... are the
/// kernel's business (it sends explicit offsets and a setattr for truncation).
fn open_access(flags: i32) -> OFlags {
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => OFlags::WRONLY,
        libc::O_RDWR => OFlags::RDWR,
        _ => OFlags::RDONLY,
    }
}

/// The volume's answer to [`crate::mirror::SealTimes`]: the changed inodes, their current paths
/// and times. Holds the volume weakly (the volume holds the mirror that holds this).
pub struct ChangedTimes(pub std::sync::Weak<Volume>);

fn times_entry(path: Vec<u8>, st: &Stat, handle: Handle) -> proto::TimesEntry {
    proto::TimesEntry {
        path,
        atime: ts_of(st.st_atime, st.st_atime_nsec as i64),
        mtime: ts_of(st.st_mtime, st.st_mtime_nsec as i64),
        handle,
    }
}

fn ts_of(secs: i64, nanos: i64) -> Timestamp {
    Timestamp {
        secs,
        nanos: nanos as u32,
    }
}

impl crate::mirror::SealTimes for ChangedTimes {
    fn take(&self) -> Vec<(u64, Vec<u8>, Timestamp, Timestamp)> {
        let Some(v) = self.0.upgrade() else {
            return Vec::new();
        };
        let inodes: Vec<u64> = lock(&v.changed).drain().collect();
        let mut out = Vec::with_capacity(inodes.len());
        for ino in inodes {
            // Gone since (unlinked): nothing to set.
            let Ok(path) = v.table().path(ino) else {
                continue;
            };
            let Ok(st) = v.tree.stat(&path) else { continue };
            out.push((
                ino,
                path,
                ts_of(st.st_atime, st.st_atime_nsec as i64),
                ts_of(st.st_mtime, st.st_mtime_nsec as i64),
            ));
        }
        // Parents before children is not needed (setting times changes no parent's mtime),
        // but a stable order keeps logs readable.
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    fn give_back(&self, inodes: Vec<u64>) {
        if let Some(v) = self.0.upgrade() {
            lock(&v.changed).extend(inodes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(mode: u32, gid: u32) -> Stat {
        // SAFETY: `Stat` is a plain C struct; all zeros is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_mode = mode;
        st.st_gid = gid;
        st
    }

    #[test]
    fn a_chmod_or_chown_to_the_same_values_changes_nothing_unless_it_clears_set_id_bits() {
        let f = stat_of(libc::S_IFREG | 0o644, 7);
        assert!(attrs_unchanged(&f, Some(0o644), None, None));
        assert!(attrs_unchanged(&f, None, Some(0), Some(7)));
        assert!(attrs_unchanged(&f, None, None, None));
        assert!(!attrs_unchanged(&f, Some(0o640), None, None), "a new mode");
        assert!(!attrs_unchanged(&f, None, Some(1), None), "a new owner");
        assert!(!attrs_unchanged(&f, None, None, Some(8)), "a new group");
        let suid = stat_of(libc::S_IFREG | 0o4755, 7);
        assert!(
            attrs_unchanged(&suid, Some(0o4755), None, None),
            "chmod keeps set-ID bits"
        );
        assert!(
            !attrs_unchanged(&suid, None, Some(0), None),
            "chown clears set-user-ID"
        );
        let sgid_x = stat_of(libc::S_IFREG | 0o2755, 7);
        assert!(
            !attrs_unchanged(&sgid_x, None, None, Some(7)),
            "and set-group-ID if group-executable"
        );
        let sgid_lock = stat_of(libc::S_IFREG | 0o2644, 7);
        assert!(
            attrs_unchanged(&sgid_lock, None, None, Some(7)),
            "not a mandatory-locking mark"
        );
        let dir = stat_of(libc::S_IFDIR | 0o2775, 7);
        assert!(
            attrs_unchanged(&dir, None, Some(0), Some(7)),
            "a directory keeps its bits"
        );
    }

    #[test]
    fn set_id_bits_cleared_as_linux_does() {
        // This process: its own group and its supplementary groups count as membership.
        let me = Unprivileged {
            gid: 4242,
            pid: std::process::id(),
        };
        let reg = libc::S_IFREG;
        assert_eq!(
            privileged_bits(&stat_of(reg | 0o4755, 4242), &me),
            libc::S_ISUID
        );
        assert_eq!(
            privileged_bits(&stat_of(reg | 0o6775, 4242), &me),
            libc::S_ISUID | libc::S_ISGID,
            "set-group-ID with group execute: cleared for a member too"
        );
        assert_eq!(
            privileged_bits(&stat_of(reg | 0o2664, 4242), &me),
            0,
            "set-group-ID without group execute, writer in the group: kept"
        );
        assert_eq!(
            privileged_bits(&stat_of(reg | 0o2664, 4243), &me),
            libc::S_ISGID,
            "set-group-ID without group execute, writer not in the group: cleared"
        );
        assert_eq!(privileged_bits(&stat_of(reg | 0o0777, 4243), &me), 0);
        assert_eq!(
            privileged_bits(&stat_of(libc::S_IFDIR | 0o2775, 4243), &me),
            0,
            "directories keep their set-group-ID"
        );
        let gone = Unprivileged {
            gid: 1,
            pid: u32::MAX,
        };
        assert_eq!(
            privileged_bits(&stat_of(reg | 0o2664, 4242), &gone),
            libc::S_ISGID,
            "a caller whose groups cannot be read is taken as not in the group"
        );
    }
}
