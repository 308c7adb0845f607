//! Applying records to a directory tree: the one piece of I/O both daemons share.
//!
//! The source applies each record to its backing directory as it happens (and again at
//! recovery); the destination applies journals to the image at a CP. Using the same code on
//! both sides is what makes the two trees end up identical.
//!
//! Every path is resolved beneath the tree's root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: records name real directories (the source
//! builds them from its own tree), so no component may be a symlink, and nothing can escape the
//! root whatever a record says. The last component is always acted on with `*at` calls that do
//! not follow symlinks.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{
    AtFlags, Dev, FallocateFlags, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags, Stat,
    Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use thiserror::Error;

use crate::dir_cache::{DirCache, DirFd};
use crate::handle::Handle;
use crate::path::{self, PathError};
use crate::record::{Entry, Op, Timestamp};
use crate::replay::{self, How};

/// Prefix of the xattrs nvmirror keeps for itself (the volume identity, the replay marker):
/// never listed by [`Tree::xattr_names`], so never compared, copied or cleared, and hidden from
/// the mount's clients.
pub const RESERVED_XATTR_PREFIX: &[u8] = b"trusted.nvmirror.";

/// The xattr of a tree's root holding its replay marker (see [`crate::replay`]).
pub const MARKER_XATTR: &str = "trusted.nvmirror.replay";

/// The replay marker of the tree whose root `root` is (a readable descriptor), whatever its
/// generation: what a daemon records beside its durable cursor.
pub fn marker_of(root: impl AsFd) -> IoResult<Option<replay::Marker>> {
    let mut v = [0u8; 32];
    match rustix::fs::fgetxattr(root, MARKER_XATTR, &mut v[..]) {
        Ok(n) => Ok(replay::Marker::decode(&v[..n])),
        Err(Errno::NODATA | Errno::OPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How tolerant [`Tree::apply`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// A new operation: every error is reported as is (the caller turns it into an errno).
    Live,
    /// Replaying a log: the one record that straddled a crash may already be applied, so the
    /// errors re-applying it gives (EEXIST on create, ENOENT on unlink...) count as success.
    Replay,
}

/// Why a record could not be applied.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// A path in the record breaks the rules.
    #[error("refused path: {0}")]
    Path(#[from] PathError),
    /// A record that writes, truncates or allocates names something else than a regular file
    /// (a FIFO, socket, device node, directory or symlink): refused, never opened.
    #[error("refused record: {op} {path:?} names a {kind}, not a regular file")]
    NotRegular {
        /// The operation.
        op: &'static str,
        /// The path (lossy UTF-8).
        path: String,
        /// What it names.
        kind: &'static str,
    },
    /// The operating system refused.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path (lossy UTF-8).
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ApplyError {
    /// The errno to give a FUSE client, when it is an OS error.
    pub fn errno(&self) -> i32 {
        match self {
            ApplyError::Path(_) | ApplyError::NotRegular { .. } => libc::EINVAL,
            ApplyError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn ts(t: Timestamp) -> Timespec {
    Timespec {
        tv_sec: t.secs,
        tv_nsec: t.nanos as _,
    }
}

fn omit() -> Timespec {
    Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_OMIT,
    }
}

/// What [`Tree::replay`] did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// The marker the tree had.
    pub marker: Option<u64>,
    /// Records applied by path.
    pub by_path: usize,
    /// Records applied through their handles.
    pub by_handle: usize,
    /// Of those, records whose inodes were all gone.
    pub gone: usize,
    /// Records left out (already in the tree).
    pub skipped: usize,
    /// Records that could not be applied: sequence number and error.
    pub failed: Vec<(u64, String)>,
}

/// Why [`Tree::open_regular`] did not open a file.
#[derive(Debug)]
pub enum NotRegular {
    /// It is not a regular file: what it is.
    Kind(&'static str),
    /// The system refused.
    Io(Errno),
}

impl NotRegular {
    /// The error of applying `op` to `path`.
    fn into_apply(self, op: &'static str, path: &[u8]) -> ApplyError {
        match self {
            NotRegular::Kind(kind) => ApplyError::NotRegular {
                op,
                path: show(path),
                kind,
            },
            NotRegular::Io(e) => ApplyError::Io {
                op,
                path: show(path),
                source: e.into(),
            },
        }
    }
}

/// Open the inode an `O_PATH` descriptor holds with `flags`, through its `/proc` link, only
/// if it is a regular file (its type is read first; nothing else is ever opened).
fn reopen_regular(p: &OwnedFd, flags: OFlags) -> Result<OwnedFd, NotRegular> {
    let st = rustix::fs::fstat(p).map_err(NotRegular::Io)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        return Err(NotRegular::Kind(kind_name(kind)));
    }
    rustix::fs::open(
        format!("/proc/self/fd/{}", p.as_raw_fd()),
        flags | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(NotRegular::Io)
}

fn kind_name(k: FileType) -> &'static str {
    match k {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    }
}

/// A directory tree confined beneath its root.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    /// The root opened for reading: for the calls an `O_PATH` descriptor cannot serve (the
    /// replay marker's `fsetxattr`).
    root_dir: OwnedFd,
    /// See [`Tree::set_generation`].
    generation: std::sync::atomic::AtomicU64,
    /// See [`Tree::set_own_handles`].
    own_handles: std::sync::atomic::AtomicBool,
    root_path: PathBuf,
    /// The last file written, kept open across consecutive writes (replaying a journal is
    /// mostly runs of writes to one file). Cleared by every namespace change.
    write_cache: Mutex<Option<(Vec<u8>, OwnedFd)>>,
    /// Directories opened by path (off unless [`Tree::cache_dirs`]).
    dirs: DirCache,
}

type IoResult<T> = Result<T, Errno>;

/// See [`Tree::dir_cache_scope`]: turns the directory cache off when dropped.
#[must_use = "the cache is turned off again when the scope drops"]
pub struct DirCacheScope<'t>(&'t Tree);

impl Drop for DirCacheScope<'_> {
    fn drop(&mut self) {
        self.0.dirs.enable(0);
    }
}

impl Tree {
    /// Open the tree rooted at `root` (which must be a directory).
    pub fn open(root: &Path) -> Result<Tree, ApplyError> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ApplyError::Io {
            op: "open tree root",
            path: root.display().to_string(),
            source: e.into(),
        })?;
        let root_dir = rustix::fs::openat(
            &fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ApplyError::Io {
            op: "open tree root",
            path: root.display().to_string(),
            source: e.into(),
        })?;
        Ok(Tree {
            root: fd,
            root_dir,
            generation: std::sync::atomic::AtomicU64::new(0),
            own_handles: std::sync::atomic::AtomicBool::new(false),
            root_path: root.to_path_buf(),
            write_cache: Mutex::new(None),
            dirs: DirCache::new(),
        })
    }

    /// The root directory: an `O_PATH` descriptor, good for `*at` calls (not for `syncfs`,
    /// which needs a readable descriptor).
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The root's path, for messages.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    fn forget_cached(&self) {
        *self.write_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Open `path` beneath the root with `flags` (no symlink followed anywhere). The empty path
    /// opens the root itself.
    pub fn open_at(&self, path: &[u8], flags: OFlags) -> IoResult<OwnedFd> {
        let p: &[u8] = if path.is_empty() { b"." } else { path };
        rustix::fs::openat2(
            &self.root,
            os(p),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve_flags(),
        )
    }

    /// Open `path` with `flags` only if it is a regular file. Its type is checked on an
    /// `O_PATH` descriptor (which never follows a final symlink and opens nothing), and the file
    /// is then opened again through that very descriptor: a FIFO (which would block), a device
    /// node (which would reach a device of this host), a socket, a directory or a symlink named
    /// by a record is never opened.
    pub fn open_regular(&self, path: &[u8], flags: OFlags) -> Result<OwnedFd, NotRegular> {
        let p = self.open_at(path, OFlags::PATH).map_err(NotRegular::Io)?;
        reopen_regular(&p, flags)
    }

    /// Open the directory `path` as an `O_PATH` descriptor (from the directory cache when it
    /// is on and holds `path`).
    pub fn dir(&self, path: &[u8]) -> IoResult<DirFd> {
        let miss = match self.dirs.get(path) {
            Ok(fd) => return Ok(fd),
            Err(miss) => miss,
        };
        let fd = DirFd::new(self.open_at(path, OFlags::PATH | OFlags::DIRECTORY)?);
        // Only a canonical spelling is kept: `./a` or `a//b` would alias `a` and `a/b` under
        // keys that forgetting `a` does not reach.
        if path::validate(path).is_ok() {
            self.dirs.insert(path, &fd, miss);
        }
        Ok(fd)
    }

    /// Keep up to `capacity` directories open by path from now on (0: none). Only for a tree
    /// whose directories nothing but this `Tree` renames or removes while it runs: the cache
    /// forgets what this tree's own renames, rmdirs and replacements touch (see
    /// [`crate::dir_cache`]); anything else changing them calls [`Tree::forget_dirs`].
    pub fn cache_dirs(&self, capacity: usize) {
        self.dirs.enable(capacity);
    }

    /// Forget every cached directory (after a change made around this tree).
    pub fn forget_dirs(&self) {
        self.dirs.clear();
    }

    /// Cache up to `capacity` directories until the guard drops (then none): for a run of
    /// changes during which this tree is the only writer of its directories (a CP).
    pub fn dir_cache_scope(&self, capacity: usize) -> DirCacheScope<'_> {
        self.dirs.clear();
        self.dirs.enable(capacity);
        DirCacheScope(self)
    }

    /// How many directories are cached.
    pub fn cached_dirs(&self) -> usize {
        self.dirs.len()
    }

    /// Split `path` into its parent directory (opened) and last name. The root has no parent.
    pub fn parent<'p>(&self, path: &'p [u8]) -> IoResult<(DirFd, &'p [u8])> {
        let (parent, name) = path::split_last(path).ok_or(Errno::INVAL)?;
        Ok((self.dir(parent)?, name))
    }

    /// `lstat` of `path`.
    pub fn stat(&self, path: &[u8]) -> IoResult<Stat> {
        match path::split_last(path) {
            None => rustix::fs::fstat(&self.root),
            Some(_) => {
                let (dir, name) = self.parent(path)?;
                rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW)
            }
        }
    }

    /// A path through `/proc/self/fd` naming `path` without following a final symlink, for the
    /// calls that have only path-based forms (`l*xattr`). Keeps the directory fd alive.
    pub fn proc_path(&self, path: &[u8]) -> IoResult<(Option<DirFd>, PathBuf)> {
        match path::split_last(path) {
            None => Ok((
                None,
                PathBuf::from(format!("/proc/self/fd/{}", self.root.as_raw_fd())),
            )),
            Some(_) => {
                let (dir, name) = self.parent(path)?;
                let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
                p.push(os(name));
                Ok((Some(dir), p))
            }
        }
    }

    /// Create a regular file exclusively, owned by `uid:gid` with exactly `mode`, and return it
    /// opened with `flags` (plus `O_CREAT | O_EXCL`).
    pub fn create(
        &self,
        path: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        flags: OFlags,
    ) -> IoResult<OwnedFd> {
        let (dir, name) = self.parent(path)?;
        self.forget_cached();
        let fd = rustix::fs::openat(
            &dir,
            os(name),
            flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode & 0o7777),
        )?;
        finish_owner_mode(&fd, uid, gid, mode)?;
        Ok(fd)
    }

    /// Apply one record. In [`ApplyMode::Replay`] the errors that re-applying an already applied
    /// record gives are success.
    pub fn apply(&self, op: &Op, mode: ApplyMode) -> Result<(), ApplyError> {
        for p in op.paths() {
            path::validate(p)?;
        }
        let replay = mode == ApplyMode::Replay;
        let fail = |e: Errno, path: &[u8]| ApplyError::Io {
            op: op.kind(),
            path: show(path),
            source: e.into(),
        };
        match op {
            Op::Create {
                path,
                mode,
                uid,
                gid,
            } => match self.create(path, *mode, *uid, *gid, OFlags::WRONLY) {
                Ok(_) => Ok(()),
                Err(Errno::EXIST) if replay => {
                    // Finish what the interrupted apply may have left undone (on the regular
                    // file it made: a symlink or a FIFO there is another entry, left alone).
                    let fd = self
                        .open_regular(path, OFlags::RDONLY)
                        .map_err(|e| e.into_apply(op.kind(), path))?;
                    finish_owner_mode(&fd, *uid, *gid, *mode).map_err(|e| fail(e, path))
                }
                Err(e) => Err(fail(e, path)),
            },
            Op::Mknod {
                path,
                mode,
                rdev,
                uid,
                gid,
            } => self
                .mknod(path, *mode, *rdev, *uid, *gid, replay)
                .map_err(|e| fail(e, path)),
            Op::Mkdir {
                path,
                mode,
                uid,
                gid,
            } => self
                .mkdir(path, *mode, *uid, *gid, replay)
                .map_err(|e| fail(e, path)),
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => self
                .symlink(path, target, *uid, *gid, replay)
                .map_err(|e| fail(e, path)),
            Op::Link { existing, new_path } => {
                let (odir, oname) = self.parent(existing).map_err(|e| fail(e, existing))?;
                let (ndir, nname) = self.parent(new_path).map_err(|e| fail(e, new_path))?;
                self.forget_cached();
                match rustix::fs::linkat(&odir, os(oname), &ndir, os(nname), AtFlags::empty()) {
                    Ok(()) => Ok(()),
                    Err(Errno::EXIST) if replay => Ok(()),
                    Err(e) => Err(fail(e, new_path)),
                }
            }
            Op::Unlink { path } => self
                .remove(path, AtFlags::empty(), replay)
                .map_err(|e| fail(e, path)),
            Op::Rmdir { path } => self
                .remove(path, AtFlags::REMOVEDIR, replay)
                .map_err(|e| fail(e, path)),
            Op::Rename {
                from,
                to,
                flags,
                handle,
            } => {
                let (odir, oname) = self.parent(from).map_err(|e| fail(e, from))?;
                let (ndir, nname) = self.parent(to).map_err(|e| fail(e, to))?;
                self.forget_cached();
                let flags =
                    RenameFlags::from_bits(*flags).ok_or_else(|| fail(Errno::INVAL, from))?;
                if replay
                    && !handle.is_none()
                    && self.own_handles.load(std::sync::atomic::Ordering::Relaxed)
                {
                    // Applied already when `from` holds another entry than the one renamed (or
                    // none): an exchange applied twice would undo itself.
                    match self.open_at(from, OFlags::PATH) {
                        Ok(fd) if Handle::of(&fd) != *handle => return Ok(()),
                        Err(Errno::NOENT) => return Ok(()),
                        _ => {}
                    }
                }
                let renamed = rename_entries(&odir, oname, &ndir, nname, flags, from, to);
                // After the change: a descriptor opened before it is not cached after this.
                self.dirs.forget_beneath(from);
                self.dirs.forget_beneath(to);
                match renamed {
                    Ok(()) => Ok(()),
                    // Already renamed: the old name is gone and the new one exists.
                    Err(Errno::NOENT) if replay && !flags.contains(RenameFlags::EXCHANGE) => Ok(()),
                    Err(Errno::EXIST) if replay && flags.contains(RenameFlags::NOREPLACE) => Ok(()),
                    Err(e) => Err(fail(e, from)),
                }
            }
            Op::SetAttr {
                path,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                ..
            } => {
                if let Some(size) = size {
                    let fd = self
                        .open_regular(path, OFlags::WRONLY)
                        .map_err(|e| e.into_apply(op.kind(), path))?;
                    self.forget_cached();
                    rustix::fs::ftruncate(&fd, *size).map_err(|e| fail(e, path))?;
                }
                self.setattr(path, *mode, *uid, *gid, *atime, *mtime)
                    .map_err(|e| fail(e, path))
            }
            Op::Write {
                path, offset, data, ..
            } => self.write(path, *offset, data).map_err(|e| match e {
                NotRegular::Io(e) => fail(e, path),
                other => other.into_apply(op.kind(), path),
            }),
            Op::Fallocate {
                path,
                mode,
                offset,
                length,
                ..
            } => {
                let fd = self
                    .open_regular(path, OFlags::WRONLY)
                    .map_err(|e| e.into_apply(op.kind(), path))?;
                let flags = FallocateFlags::from_bits(*mode as u32)
                    .ok_or_else(|| fail(Errno::INVAL, path))?;
                rustix::fs::fallocate(&fd, flags, *offset, *length).map_err(|e| fail(e, path))
            }
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                let (_keep, p) = self.proc_path(path).map_err(|e| fail(e, path))?;
                let flags =
                    XattrFlags::from_bits(*flags as u32).ok_or_else(|| fail(Errno::INVAL, path))?;
                match rustix::fs::lsetxattr(&p, os(name), value, flags) {
                    Ok(()) => Ok(()),
                    Err(Errno::EXIST | Errno::NODATA) if replay => {
                        rustix::fs::lsetxattr(&p, os(name), value, XattrFlags::empty())
                            .map_err(|e| fail(e, path))
                    }
                    Err(e) => Err(fail(e, path)),
                }
            }
            Op::RemoveXattr { path, name } => {
                let (_keep, p) = self.proc_path(path).map_err(|e| fail(e, path))?;
                match rustix::fs::lremovexattr(&p, os(name)) {
                    Ok(()) => Ok(()),
                    Err(Errno::NODATA) if replay => Ok(()),
                    Err(e) => Err(fail(e, path)),
                }
            }
            Op::CopyFileRange {
                src_path,
                src_offset,
                dst_path,
                dst_offset,
                length,
            } => {
                let src = self
                    .open_regular(src_path, OFlags::RDONLY)
                    .map_err(|e| e.into_apply(op.kind(), src_path))?;
                let dst = self
                    .open_regular(dst_path, OFlags::WRONLY)
                    .map_err(|e| e.into_apply(op.kind(), dst_path))?;
                copy_range(&src, *src_offset, &dst, *dst_offset, *length)
                    .map(drop)
                    .map_err(|e| fail(e, dst_path))
            }
            Op::Replace { path, entry } => {
                let replaced = self.replace(path, entry);
                // It may have removed directories at or beneath `path`.
                self.dirs.forget_beneath(path);
                replaced.map_err(|e| fail(e, path))
            }
            Op::Times { entries } => {
                for e in entries {
                    self.setattr(&e.path, None, None, None, Some(e.atime), Some(e.mtime))
                        .map_err(|err| fail(err, &e.path))?;
                }
                Ok(())
            }
        }
    }

    /// Which mount of which boot the tree is on (`boot_id:mount id`). The same value before and
    /// after a restart means the page cache survived (a killed process, not a power cut or a
    /// remount): everything applied before the stop is still there.
    pub fn mount_instance(&self) -> IoResult<String> {
        let st = rustix::fs::statx(
            &self.root,
            "",
            AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::MNT_ID,
        )?;
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Ok(format!("{}:{}", boot.trim(), st.stx_mnt_id))
    }

    /// The file handles records carry were taken on this very tree (the source's backing
    /// volume): a replayed rename then checks that `from` still holds the entry it names.
    /// Elsewhere (an image) they name another filesystem's inodes and are ignored.
    pub fn set_own_handles(&self, own: bool) {
        self.own_handles
            .store(own, std::sync::atomic::Ordering::Relaxed);
    }

    /// The generation whose records are applied to this tree (its sequence space): stamped on
    /// the replay marker. Set by the daemon at start and when the generation changes.
    pub fn set_generation(&self, generation: u64) {
        self.generation
            .store(generation, std::sync::atomic::Ordering::Release);
    }

    /// The tree's replay marker: the sequence number of the last namespace record whose
    /// application began (see [`crate::replay`]); `None` when it never had one, or had one of
    /// another generation.
    pub fn marker(&self) -> IoResult<Option<u64>> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        Ok(marker_of(&self.root_dir)?
            .filter(|m| m.generation == generation)
            .map(|m| m.seq))
    }

    /// Store the replay marker. Metadata like the namespace change that follows it, so a
    /// journaling filesystem keeps the two in order across a power cut.
    pub fn set_marker(&self, seq: u64) -> IoResult<()> {
        self.write_marker(seq, false)
    }

    /// Record that namespace record `seq` (whose marker is set) is fully applied.
    pub fn set_marker_done(&self, seq: u64) -> IoResult<()> {
        self.write_marker(seq, true)
    }

    /// True when the marker (of this generation) says its record is fully applied.
    pub fn marker_done(&self) -> IoResult<bool> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        Ok(marker_of(&self.root_dir)?.is_some_and(|m| m.generation == generation && m.done))
    }

    fn write_marker(&self, seq: u64, done: bool) -> IoResult<()> {
        let marker = replay::Marker {
            generation: self.generation.load(std::sync::atomic::Ordering::Acquire),
            seq,
            done,
        };
        rustix::fs::fsetxattr(
            &self.root_dir,
            MARKER_XATTR,
            &marker.encode(),
            XattrFlags::empty(),
        )
    }

    /// Remove the replay marker: the sequence numbers that will be applied next start again
    /// (a demoted source mirrors anew from 1), so the old marker says nothing about them.
    pub fn clear_marker(&self) -> IoResult<()> {
        match rustix::fs::fremovexattr(&self.root_dir, MARKER_XATTR) {
            Ok(()) | Err(Errno::NODATA | Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Apply record `seq` as a new operation, setting the replay marker first when it changes
    /// the namespace: what both daemons do for every record they apply outside a replay.
    pub fn apply_logged(&self, seq: u64, op: &Op) -> Result<(), ApplyError> {
        if op.is_namespace() {
            self.set_marker(seq).map_err(|e| ApplyError::Io {
                op: "set the replay marker",
                path: self.root_path.display().to_string(),
                source: e.into(),
            })?;
        }
        self.apply(op, ApplyMode::Live)
    }

    /// Apply the content part of a record (write, truncate, fallocate; times of regular files)
    /// to the inodes its handles name, wherever they are now. Returns how many inodes it
    /// reached; a handle whose inode is gone (`ESTALE`) is passed over: nothing of that file is
    /// left to repair.
    pub fn apply_by_handle(&self, op: &Op) -> Result<usize, ApplyError> {
        let fail = |e: Errno| ApplyError::Io {
            op: op.kind(),
            path: "(by handle)".into(),
            source: e.into(),
        };
        // Regular files only, checked before anything is opened for real (as `open_regular`).
        let open = |h: &Handle, flags: OFlags| match h.open(&self.root_dir, OFlags::PATH) {
            Ok(p) => match reopen_regular(&p, flags) {
                Ok(fd) => Ok(Some(fd)),
                Err(NotRegular::Kind(_)) => Ok(None),
                Err(NotRegular::Io(e)) => Err(fail(e)),
            },
            Err(Errno::STALE | Errno::NOENT) => Ok(None),
            Err(e) => Err(fail(e)),
        };
        self.forget_cached();
        match op {
            Op::Write {
                offset,
                data,
                handle,
                ..
            } => match open(handle, OFlags::WRONLY)? {
                Some(fd) => write_all_at(&fd, data, *offset).map(|()| 1).map_err(fail),
                None => Ok(0),
            },
            Op::SetAttr {
                size: Some(size),
                handle,
                ..
            } => match open(handle, OFlags::WRONLY)? {
                Some(fd) => rustix::fs::ftruncate(&fd, *size).map(|()| 1).map_err(fail),
                None => Ok(0),
            },
            Op::Fallocate {
                mode,
                offset,
                length,
                handle,
                ..
            } => match open(handle, OFlags::WRONLY)? {
                Some(fd) => {
                    let flags = FallocateFlags::from_bits(*mode as u32)
                        .ok_or_else(|| fail(Errno::INVAL))?;
                    rustix::fs::fallocate(&fd, flags, *offset, *length)
                        .map(|()| 1)
                        .map_err(fail)
                }
                None => Ok(0),
            },
            Op::Times { entries } => {
                let mut n = 0;
                for e in entries.iter().filter(|e| !e.handle.is_none()) {
                    // `open` reaches regular files only: others have no content to repair.
                    let Some(fd) = open(&e.handle, OFlags::RDONLY)? else {
                        continue;
                    };
                    let times = Timestamps {
                        last_access: ts(e.atime),
                        last_modification: ts(e.mtime),
                    };
                    rustix::fs::futimens(&fd, &times).map_err(fail)?;
                    n += 1;
                }
                Ok(n)
            }
            _ => Ok(0),
        }
    }

    /// Start-up recovery after a power cut: bring the tree, which holds every record up to a
    /// durable cursor and an unknown part of `window` (the records after it, in order), to the
    /// state after the whole window, guided by the replay marker ([`crate::replay::plan`]).
    /// Leaves the marker at the window's last record. A record that cannot be applied is
    /// reported, and the others still are.
    pub fn replay(&self, window: &[(u64, Op)]) -> Result<ReplayReport, ApplyError> {
        let marker = self.marker().map_err(|e| ApplyError::Io {
            op: "read the replay marker",
            path: self.root_path.display().to_string(),
            source: e.into(),
        })?;
        let mut report = ReplayReport {
            marker,
            ..ReplayReport::default()
        };
        for step in replay::plan(window, marker) {
            let (seq, op) = &window[step.index];
            let res = match step.how {
                How::Handle => self.apply_by_handle(op).map(|n| {
                    report.by_handle += 1;
                    if n == 0 {
                        report.gone += 1;
                    }
                }),
                How::Path(mode) => {
                    report.by_path += 1;
                    if op.is_namespace() {
                        self.set_marker(*seq).map_err(|e| ApplyError::Io {
                            op: "set the replay marker",
                            path: self.root_path.display().to_string(),
                            source: e.into(),
                        })?;
                    }
                    self.apply(op, mode)
                }
            };
            if let Err(e) = res {
                report.failed.push((*seq, e.to_string()));
            }
        }
        report.skipped = window.len() - report.by_handle - report.by_path;
        Ok(report)
    }

    /// The names of the xattrs of `path` (none where the filesystem has no xattrs). Never
    /// follows a final symlink.
    pub fn xattr_names(&self, path: &[u8]) -> IoResult<Vec<Vec<u8>>> {
        let (_keep, p) = self.proc_path(path)?;
        let mut names = vec![0u8; 65536];
        match rustix::fs::llistxattr(&p, &mut names[..]) {
            Ok(n) => Ok(names[..n]
                .split(|c| *c == 0)
                .filter(|n| !n.is_empty() && !n.starts_with(RESERVED_XATTR_PREFIX))
                .map(<[u8]>::to_vec)
                .collect()),
            Err(Errno::OPNOTSUPP) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Remove the `user.*` and `trusted.*` xattrs of `path` (a directory kept by a `Replace`,
    /// whose xattrs are sent again after it).
    fn clear_xattrs(&self, path: &[u8]) -> IoResult<()> {
        let names = self.xattr_names(path)?;
        let (_keep, p) = self.proc_path(path)?;
        for name in names {
            if name.starts_with(b"user.") || name.starts_with(b"trusted.") {
                match rustix::fs::lremovexattr(&p, os(&name)) {
                    Ok(()) | Err(Errno::NODATA) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// A directory kept by a `Replace`: its xattrs follow the record, so none of the old ones
    /// may linger; with `clear`, its children go too.
    fn refresh_dir(&self, path: &[u8], clear: bool) -> IoResult<()> {
        self.clear_xattrs(path)?;
        if clear {
            clear_dir(&self.dir(path)?)?;
        }
        Ok(())
    }

    /// Make `path` exactly `entry` (see [`Op::Replace`]). Idempotent: applying it twice gives
    /// the same tree, so it replays safely.
    fn replace(&self, path: &[u8], entry: &Entry) -> IoResult<()> {
        self.forget_cached();
        let Some(_) = path::split_last(path) else {
            // The root: only a directory, never removed.
            return match entry {
                Entry::Dir {
                    mode,
                    uid,
                    gid,
                    clear,
                } => {
                    self.refresh_dir(path, *clear)?;
                    owner_mode_at(
                        &self.dir(b"")?,
                        b".",
                        FileType::Directory,
                        *uid,
                        *gid,
                        *mode,
                    )
                }
                _ => Err(Errno::INVAL),
            };
        };
        let (dir, name) = match self.parent(path) {
            Ok(d) => d,
            // No parent directory: nothing is there, which is all `Absent` asks.
            Err(Errno::NOENT) | Err(Errno::NOTDIR) if *entry == Entry::Absent => return Ok(()),
            Err(e) => return Err(e),
        };
        let existing = rustix::fs::statat(&dir, os(name), AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| FileType::from_raw_mode(st.st_mode));
        let existing = match existing {
            Ok(t) => Some(t),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        let keep_dir = matches!(entry, Entry::Dir { .. }) && existing == Some(FileType::Directory);
        if existing.is_some() && !keep_dir {
            remove_all(&dir, name)?;
        }
        match entry {
            Entry::Absent => Ok(()),
            Entry::Dir {
                mode,
                uid,
                gid,
                clear,
            } => {
                if keep_dir {
                    self.refresh_dir(path, *clear)?;
                } else {
                    rustix::fs::mkdirat(&dir, os(name), Mode::from_raw_mode(mode & 0o7777))?;
                }
                owner_mode_at(&dir, name, FileType::Directory, *uid, *gid, *mode)
            }
            Entry::File { mode, uid, gid } => {
                let fd = rustix::fs::openat(
                    &dir,
                    os(name),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(mode & 0o7777),
                )?;
                finish_owner_mode(&fd, *uid, *gid, *mode)
            }
            Entry::Symlink { target, uid, gid } => {
                rustix::fs::symlinkat(os(target), &dir, os(name))?;
                rustix::fs::chownat(
                    &dir,
                    os(name),
                    Some(uid_of(*uid)),
                    Some(gid_of(*gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
            }
            Entry::Special {
                mode,
                rdev,
                uid,
                gid,
            } => self.mknod(path, *mode, *rdev, *uid, *gid, false),
        }
    }

    fn mknod(
        &self,
        path: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        replay: bool,
    ) -> IoResult<()> {
        let (dir, name) = self.parent(path)?;
        self.forget_cached();
        let kind = FileType::from_raw_mode(mode);
        if matches!(
            kind,
            FileType::RegularFile | FileType::Directory | FileType::Symlink | FileType::Unknown
        ) {
            return Err(Errno::INVAL);
        }
        match rustix::fs::mknodat(
            &dir,
            os(name),
            kind,
            Mode::from_raw_mode(mode & 0o7777),
            rdev as Dev,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) if replay => {}
            Err(e) => return Err(e),
        }
        owner_mode_at(&dir, name, kind, uid, gid, mode)
    }

    fn mkdir(&self, path: &[u8], mode: u32, uid: u32, gid: u32, replay: bool) -> IoResult<()> {
        let (dir, name) = self.parent(path)?;
        self.forget_cached();
        match rustix::fs::mkdirat(&dir, os(name), Mode::from_raw_mode(mode & 0o7777)) {
            Ok(()) => {}
            Err(Errno::EXIST) if replay => {}
            Err(e) => return Err(e),
        }
        owner_mode_at(&dir, name, FileType::Directory, uid, gid, mode)
    }

    fn symlink(
        &self,
        path: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
        replay: bool,
    ) -> IoResult<()> {
        let (dir, name) = self.parent(path)?;
        self.forget_cached();
        match rustix::fs::symlinkat(os(target), &dir, os(name)) {
            Ok(()) => {}
            Err(Errno::EXIST) if replay => {}
            Err(e) => return Err(e),
        }
        rustix::fs::chownat(
            &dir,
            os(name),
            Some(uid_of(uid)),
            Some(gid_of(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    fn remove(&self, path: &[u8], flags: AtFlags, replay: bool) -> IoResult<()> {
        let (dir, name) = self.parent(path)?;
        self.forget_cached();
        let removed = rustix::fs::unlinkat(&dir, os(name), flags);
        if flags.contains(AtFlags::REMOVEDIR) {
            self.dirs.forget_beneath(path);
        }
        match removed {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) if replay => Ok(()),
            Err(e) => Err(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        path: &[u8],
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
    ) -> IoResult<()> {
        let (dir, name): (DirFd, &[u8]) = match path::split_last(path) {
            Some(_) => self.parent(path)?,
            None => (self.dir(b"")?, b"."),
        };
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                &dir,
                os(name),
                uid.map(uid_of),
                gid.map(gid_of),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if let Some(mode) = mode {
            // chmod has no "don't follow" form: change the inode an O_PATH descriptor (which
            // never follows a final symlink) holds, through its /proc link. Symlink permission
            // bits mean nothing on Linux and cannot be changed.
            let entry = rustix::fs::openat(
                &dir,
                os(name),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let st = rustix::fs::fstat(&entry)?;
            if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                rustix::fs::chmod(
                    format!("/proc/self/fd/{}", entry.as_raw_fd()),
                    Mode::from_raw_mode(mode & 0o7777),
                )?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: atime.map(ts).unwrap_or_else(omit),
                last_modification: mtime.map(ts).unwrap_or_else(omit),
            };
            rustix::fs::utimensat(&dir, os(name), &times, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        Ok(())
    }

    /// Apply a write record whose `len` bytes are at `src_offset` of the file `src` (a
    /// destination's journal) without bringing them to user space: `copy_file_range` from the
    /// journal into the image file, falling back to read + write where the kernel cannot copy
    /// between the two. Same checks and errors as applying the `Op::Write` itself; bytes
    /// missing from `src` (it ends early) are an I/O error, not a short write.
    pub fn write_from(
        &self,
        path: &[u8],
        offset: u64,
        src: BorrowedFd<'_>,
        src_offset: u64,
        len: u64,
    ) -> Result<(), ApplyError> {
        path::validate(path)?;
        let fail = |e: Errno| ApplyError::Io {
            op: "write",
            path: show(path),
            source: e.into(),
        };
        let mut cache = self.write_cache.lock().unwrap_or_else(|p| p.into_inner());
        let fd = match &*cache {
            Some((p, fd)) if p.as_slice() == path => fd,
            _ => match self.open_regular(path, OFlags::WRONLY) {
                Ok(fd) => &cache.insert((path.to_vec(), fd)).1,
                Err(NotRegular::Io(e)) => return Err(fail(e)),
                Err(other) => return Err(other.into_apply("write", path)),
            },
        };
        let copied = match copy_range(src, src_offset, fd, offset, len) {
            Ok(n) => n,
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                copy_through_memory(src, src_offset, fd, offset, len).map_err(fail)?
            }
            Err(e) => return Err(fail(e)),
        };
        if copied < len {
            return Err(fail(Errno::IO));
        }
        Ok(())
    }

    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> Result<(), NotRegular> {
        let mut cache = self.write_cache.lock().unwrap_or_else(|p| p.into_inner());
        let fd = match &*cache {
            Some((p, fd)) if p.as_slice() == path => fd,
            _ => {
                let fd = self.open_regular(path, OFlags::WRONLY)?;
                &cache.insert((path.to_vec(), fd)).1
            }
        };
        write_all_at(fd, data, offset).map_err(NotRegular::Io)
    }
}

/// Prefix of the name an emulated `RENAME_EXCHANGE` parks `from` under, in `from`'s directory,
/// between its renames; the name ends with a hash of the record's two paths (see
/// [`exchange_tmp_name`]), so finding it means an emulated exchange of those very paths that a
/// crash interrupted, which the next try of the record (a replay) finishes.
pub const EXCHANGE_TMP_PREFIX: &str = ".nvmirror-exchange.";

/// Set once a filesystem answered `renameat2` flags with `EINVAL` (see [`rename_entries`]).
static RENAME2_EMULATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when this process had to emulate `RENAME_NOREPLACE` or `RENAME_EXCHANGE` (a
/// filesystem without them, as GlusterFS's FUSE client).
pub fn rename2_emulated() -> bool {
    RENAME2_EMULATED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The temporary name of an emulated exchange of `from` and `to`: [`EXCHANGE_TMP_PREFIX`] and
/// the FNV-1a hash of both paths in hex.
pub fn exchange_tmp_name(from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in from.iter().chain(&[0u8]).chain(to) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{EXCHANGE_TMP_PREFIX}{h:016x}").into_bytes()
}

/// True when one path is the other or lies beneath it: renames the kernel refuses with
/// `EINVAL` by itself, whatever the filesystem. Lexical, which is exact here: no component of
/// a record's path is a symlink (`RESOLVE_NO_SYMLINKS`).
fn nested(a: &[u8], b: &[u8]) -> bool {
    let under = |x: &[u8], y: &[u8]| y.len() > x.len() && y.starts_with(x) && y[x.len()] == b'/';
    a == b || under(a, b) || under(b, a)
}

fn exists_at(dir: &OwnedFd, name: &[u8]) -> IoResult<bool> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `renameat2(odir/oname, ndir/nname, flags)` for the record renaming `from` to `to`, emulated
/// where the filesystem has no `RENAME_NOREPLACE` / `RENAME_EXCHANGE` (a FUSE server without
/// `FUSE_RENAME2`, such as GlusterFS's, makes the kernel answer `EINVAL`). The emulation relies
/// on the caller being the tree's only writer, which both daemons are (the source under its
/// sequencer lock, the destination under the CP lock):
///
/// * `NOREPLACE`: `EEXIST` if `nname` exists, else a plain rename;
/// * `EXCHANGE`: three plain renames through [`exchange_tmp_name`] in `odir`. Not atomic: a
///   reader (`browse`) may see one of the names missing for a moment, and a crash between the
///   renames leaves the temporary name, from which the next try of the record finishes.
pub fn rename_entries(
    odir: &OwnedFd,
    oname: &[u8],
    ndir: &OwnedFd,
    nname: &[u8],
    flags: RenameFlags,
    from: &[u8],
    to: &[u8],
) -> IoResult<()> {
    let emulable = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE;
    let exchange = flags.contains(RenameFlags::EXCHANGE);
    match rustix::fs::renameat_with(odir, os(oname), ndir, os(nname), flags) {
        Ok(()) => Ok(()),
        // One name is gone: an emulated exchange a crash interrupted, if it parked an entry.
        Err(Errno::NOENT) if exchange && !nested(from, to) => {
            let tmp = exchange_tmp_name(from, to);
            if exists_at(odir, &tmp)? {
                RENAME2_EMULATED.store(true, std::sync::atomic::Ordering::Relaxed);
                finish_exchange(odir, oname, ndir, nname, &tmp)
            } else {
                Err(Errno::NOENT)
            }
        }
        Err(Errno::INVAL)
            if !flags.is_empty() && (flags - emulable).is_empty() && !nested(from, to) =>
        {
            RENAME2_EMULATED.store(true, std::sync::atomic::Ordering::Relaxed);
            // renameat2 reports a missing source first.
            rustix::fs::statat(odir, os(oname), AtFlags::SYMLINK_NOFOLLOW)?;
            let target = exists_at(ndir, nname)?;
            if exchange {
                if !target {
                    return Err(Errno::NOENT);
                }
                let tmp = exchange_tmp_name(from, to);
                if exists_at(odir, &tmp)? {
                    return Err(Errno::EXIST);
                }
                rustix::fs::renameat(odir, os(oname), odir, os(&tmp))?;
                finish_exchange(odir, oname, ndir, nname, &tmp)
            } else if target {
                Err(Errno::EXIST)
            } else {
                rustix::fs::renameat(odir, os(oname), ndir, os(nname))
            }
        }
        Err(e) => Err(e),
    }
}

/// The rest of an emulated exchange once `odir/oname` is parked at `tmp` (in `odir`): `nname`
/// moves to `oname` (unless that is done already), then the parked entry to `nname`.
fn finish_exchange(
    odir: &OwnedFd,
    oname: &[u8],
    ndir: &OwnedFd,
    nname: &[u8],
    tmp: &[u8],
) -> IoResult<()> {
    if !exists_at(odir, oname)? {
        rustix::fs::renameat(ndir, os(nname), odir, os(oname))?;
    }
    rustix::fs::renameat(odir, os(tmp), ndir, os(nname))
}

fn uid_of(u: u32) -> Uid {
    Uid::from_raw(u)
}

fn gid_of(g: u32) -> Gid {
    Gid::from_raw(g)
}

/// [`finish_owner_mode`] for a new non-symlink entry `name` of `dir`.
/// Set owner, then mode (chown clears setuid/setgid), of the entry `name` in `dir`, which
/// must be of type `kind`: another entry there (a replay that found something else, a
/// symlink above all) is `EEXIST`, and nothing is changed through it. chmod has no "don't
/// follow" form, so it goes through the `/proc` link of an `O_PATH` descriptor, which never
/// follows a final symlink.
fn owner_mode_at(
    dir: &impl AsFd,
    name: &[u8],
    kind: FileType,
    uid: u32,
    gid: u32,
    mode: u32,
) -> IoResult<()> {
    let entry = rustix::fs::openat(
        dir,
        os(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&entry)?;
    if FileType::from_raw_mode(st.st_mode) != kind {
        return Err(Errno::EXIST);
    }
    rustix::fs::chownat(
        &entry,
        "",
        Some(uid_of(uid)),
        Some(gid_of(gid)),
        AtFlags::EMPTY_PATH,
    )?;
    rustix::fs::chmod(
        format!("/proc/self/fd/{}", entry.as_raw_fd()),
        Mode::from_raw_mode(mode & 0o7777),
    )
}

/// chown then chmod (chown clears setuid/setgid, so the mode goes last).
fn finish_owner_mode(fd: &OwnedFd, uid: u32, gid: u32, mode: u32) -> IoResult<()> {
    rustix::fs::fchown(fd, Some(uid_of(uid)), Some(gid_of(gid)))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))
}

/// Remove `name` in `dir` whatever it is, a directory with everything in it. Never follows a
/// symlink (a symlink is removed, not what it points to).
pub fn remove_all(dir: &OwnedFd, name: &[u8]) -> IoResult<()> {
    let st = match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let d = rustix::fs::openat(
            dir,
            os(name),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&d)?;
        rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR)
    } else {
        rustix::fs::unlinkat(dir, os(name), AtFlags::empty())
    }
}

/// Remove every entry of the directory `dir` (any descriptor of it, `O_PATH` included: it is
/// reopened for reading).
fn clear_dir(dir: &impl AsFd) -> IoResult<()> {
    let readable = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for n in dir_names(&readable)? {
        remove_all(&readable, &n)?;
    }
    Ok(())
}

/// The names in the directory open as `dir` (not `.` and `..`), in directory order.
pub fn dir_names(dir: impl AsFd) -> IoResult<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut entries = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = entries.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

/// `pwrite` until every byte is written.
pub fn write_all_at(fd: impl AsFd, mut data: &[u8], mut offset: u64) -> IoResult<()> {
    while !data.is_empty() {
        let n = rustix::io::pwrite(&fd, data, offset)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// [`copy_range`] by `pread` + `pwrite` through a buffer, for file pairs the kernel cannot
/// copy between.
fn copy_through_memory(
    src: BorrowedFd<'_>,
    src_offset: u64,
    dst: impl AsFd,
    dst_offset: u64,
    length: u64,
) -> IoResult<u64> {
    let mut buf = vec![0u8; length.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < length {
        let want = (length - done).min(buf.len() as u64) as usize;
        let n = rustix::io::pread(src, &mut buf[..want], src_offset + done)?;
        if n == 0 {
            break;
        }
        write_all_at(&dst, &buf[..n], dst_offset + done)?;
        done += n as u64;
    }
    Ok(done)
}

/// `copy_file_range` until `length` bytes are copied or the source ends.
pub fn copy_range(
    src: impl AsFd,
    src_offset: u64,
    dst: impl AsFd,
    dst_offset: u64,
    length: u64,
) -> IoResult<u64> {
    let (mut so, mut dof, mut left) = (src_offset, dst_offset, length);
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let n = rustix::fs::copy_file_range(&src, Some(&mut so), &dst, Some(&mut dof), chunk)?;
        if n == 0 {
            break;
        }
        left -= n as u64;
    }
    Ok(length - left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_from_copies_a_journal_range_into_the_file_and_checks_like_a_write() {
        let (d, t) = tree();
        let journal = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        write_all_at(&journal, &bytes, 0).unwrap();
        std::fs::write(d.path().join("f"), b"0123456789").unwrap();
        t.write_from(b"f", 4, journal.as_fd(), 1000, 150_000)
            .unwrap();
        let got = std::fs::read(d.path().join("f")).unwrap();
        assert_eq!(&got[..4], b"0123");
        assert_eq!(&got[4..], &bytes[1000..151_000]);
        // The journal ends before the range does: an error, not a short write.
        let err = t
            .write_from(b"f", 0, journal.as_fd(), 150_000, 60_000)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
        // Not a regular file, and a path out of the tree: refused as a write would be.
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("l")).unwrap();
        assert!(t.write_from(b"l", 0, journal.as_fd(), 0, 10).is_err());
        assert!(t.write_from(b"../x", 0, journal.as_fd(), 0, 10).is_err());
        assert!(t.write_from(b"missing", 0, journal.as_fd(), 0, 10).is_err());
    }

    fn tree() -> (tempfile::TempDir, Tree) {
        let d = tempfile::tempdir().unwrap();
        let t = Tree::open(d.path()).unwrap();
        (d, t)
    }

    fn me() -> (u32, u32) {
        (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        )
    }

    #[test]
    fn create_write_rename_unlink() {
        let (d, t) = tree();
        let (uid, gid) = me();
        t.apply(
            &Op::Mkdir {
                path: b"a".to_vec(),
                mode: 0o750,
                uid,
                gid,
            },
            ApplyMode::Live,
        )
        .unwrap();
        t.apply(
            &Op::Create {
                path: b"a/f".to_vec(),
                mode: 0o640,
                uid,
                gid,
            },
            ApplyMode::Live,
        )
        .unwrap();
        t.apply(
            &Op::Write {
                handle: crate::handle::Handle::none(),
                path: b"a/f".to_vec(),
                offset: 3,
                data: b"xyz".to_vec(),
            },
            ApplyMode::Live,
        )
        .unwrap();
        t.apply(
            &Op::Rename {
                handle: crate::handle::Handle::none(),
                from: b"a".to_vec(),
                to: b"b".to_vec(),
                flags: 0,
            },
            ApplyMode::Live,
        )
        .unwrap();
        assert_eq!(std::fs::read(d.path().join("b/f")).unwrap(), b"\0\0\0xyz");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.path().join("b"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o750
        );
        // Live mode reports EEXIST, replay mode tolerates it.
        let again = Op::Mkdir {
            path: b"b".to_vec(),
            mode: 0o750,
            uid,
            gid,
        };
        assert_eq!(
            t.apply(&again, ApplyMode::Live).unwrap_err().errno(),
            libc::EEXIST
        );
        t.apply(&again, ApplyMode::Replay).unwrap();
        t.apply(
            &Op::Unlink {
                path: b"b/f".to_vec(),
            },
            ApplyMode::Live,
        )
        .unwrap();
        t.apply(
            &Op::Unlink {
                path: b"b/f".to_vec(),
            },
            ApplyMode::Replay,
        )
        .unwrap();
    }

    #[test]
    fn symlinks_never_lead_outside() {
        let (d, t) = tree();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("escape")).unwrap();
        let (uid, gid) = me();
        let op = Op::Create {
            path: b"escape/pwned".to_vec(),
            mode: 0o644,
            uid,
            gid,
        };
        let err = t.apply(&op, ApplyMode::Live).unwrap_err();
        assert!([libc::ELOOP, libc::ENOTDIR].contains(&err.errno()), "{err}");
        assert!(!outside.path().join("pwned").exists());
        let op = Op::Write {
            handle: crate::handle::Handle::none(),
            path: b"escape".to_vec(),
            offset: 0,
            data: b"x".to_vec(),
        };
        assert!(t.apply(&op, ApplyMode::Live).is_err());
        let bad = Op::Unlink {
            path: b"../x".to_vec(),
        };
        assert!(matches!(
            t.apply(&bad, ApplyMode::Live),
            Err(ApplyError::Path(_))
        ));
    }

    #[test]
    fn setattr_omits_what_is_absent() {
        let (d, t) = tree();
        let (uid, gid) = me();
        t.apply(
            &Op::Create {
                path: b"f".to_vec(),
                mode: 0o600,
                uid,
                gid,
            },
            ApplyMode::Live,
        )
        .unwrap();
        let set = |atime, mtime| Op::SetAttr {
            handle: crate::handle::Handle::none(),
            path: b"f".to_vec(),
            mode: None,
            uid: None,
            gid: None,
            size: Some(10),
            atime,
            mtime,
        };
        t.apply(
            &set(
                Some(Timestamp {
                    secs: 1000,
                    nanos: 5,
                }),
                Some(Timestamp {
                    secs: 2000,
                    nanos: 0,
                }),
            ),
            ApplyMode::Live,
        )
        .unwrap();
        t.apply(
            &set(
                None,
                Some(Timestamp {
                    secs: 3000,
                    nanos: 0,
                }),
            ),
            ApplyMode::Live,
        )
        .unwrap();
        let st = rustix::fs::stat(d.path().join("f")).unwrap();
        assert_eq!((st.st_size, st.st_atime, st.st_mtime), (10, 1000, 3000));
    }

    #[test]
    fn replace_makes_a_path_exactly_the_entry_and_never_follows_a_symlink() {
        let (d, t) = tree();
        let (uid, gid) = me();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"outside").unwrap();
        std::fs::create_dir_all(d.path().join("dir/sub")).unwrap();
        std::fs::write(d.path().join("dir/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let replace = |path: &[u8], entry: Entry| Op::Replace {
            path: path.to_vec(),
            entry,
        };
        // A directory kept in place keeps its children.
        let dir = Entry::Dir {
            mode: 0o700,
            uid,
            gid,
            clear: false,
        };
        t.apply(&replace(b"dir", dir.clone()), ApplyMode::Live)
            .unwrap();
        assert!(d.path().join("dir/sub/f").exists());
        // A file over a directory removes the whole subtree; applying twice gives the same.
        let file = Entry::File {
            mode: 0o640,
            uid,
            gid,
        };
        for _ in 0..2 {
            t.apply(&replace(b"dir", file.clone()), ApplyMode::Live)
                .unwrap();
            assert!(d.path().join("dir").is_file());
        }
        // A symlink is replaced, not followed: what it pointed to is untouched.
        t.apply(&replace(b"link", Entry::Absent), ApplyMode::Live)
            .unwrap();
        assert!(std::fs::symlink_metadata(d.path().join("link")).is_err());
        assert_eq!(
            std::fs::read(outside.path().join("keep")).unwrap(),
            b"outside"
        );
        // Absent twice is fine; the root can only be a directory, and `clear` empties it.
        t.apply(&replace(b"gone", Entry::Absent), ApplyMode::Live)
            .unwrap();
        assert!(t.apply(&replace(b"", file), ApplyMode::Live).is_err());
        let root = Entry::Dir {
            mode: 0o755,
            uid,
            gid,
            clear: true,
        };
        t.apply(&replace(b"", root), ApplyMode::Live).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// The handle of what `path` names in `t`.
    fn handle_of(t: &Tree, path: &[u8]) -> Handle {
        Handle::of(t.open_at(path, OFlags::PATH).unwrap())
    }

    #[test]
    fn replay_after_lost_writes_reaches_each_file_by_handle_and_skips_what_is_there() {
        let (d, t) = tree();
        t.set_own_handles(true);
        if t.set_marker(0).is_err() {
            eprintln!("no trusted xattrs here (not root?); skipped");
            return;
        }
        let (uid, gid) = me();
        let create = |p: &[u8]| Op::Create {
            path: p.to_vec(),
            mode: 0o644,
            uid,
            gid,
        };
        let write = |t: &Tree, p: &[u8], offset: u64, data: &[u8]| Op::Write {
            path: p.to_vec(),
            offset,
            data: data.to_vec(),
            handle: handle_of(t, p),
        };
        // The source's run: each record applied as it is logged, handles taken from the tree.
        let mut window: Vec<(u64, Op)> = Vec::new();
        let mut log = |t: &Tree, op: Op| {
            let seq = window.len() as u64 + 1;
            t.apply_logged(seq, &op).unwrap();
            window.push((seq, op));
        };
        log(&t, create(b"a"));
        log(&t, write(&t, b"a", 0, b"hello"));
        let h = handle_of(&t, b"a");
        log(
            &t,
            Op::Rename {
                from: b"a".to_vec(),
                to: b"b".to_vec(),
                flags: 0,
                handle: h,
            },
        );
        log(&t, create(b"a"));
        log(&t, write(&t, b"a", 0, b"new"));
        log(
            &t,
            Op::Link {
                existing: b"b".to_vec(),
                new_path: b"c".to_vec(),
            },
        );
        log(&t, write(&t, b"c", 0, b"HE"));
        log(
            &t,
            Op::Unlink {
                path: b"b".to_vec(),
            },
        );
        log(
            &t,
            Op::Mkdir {
                path: b"d".to_vec(),
                mode: 0o755,
                uid,
                gid,
            },
        );
        let h = handle_of(&t, b"c");
        log(
            &t,
            Op::Rename {
                from: b"c".to_vec(),
                to: b"d/c".to_vec(),
                flags: 0,
                handle: h,
            },
        );
        log(&t, create(b"d/x"));
        log(&t, write(&t, b"d/x", 2, b"xy"));
        assert_eq!(t.marker().unwrap(), Some(11));
        // The power cut: the namespace survived, the contents did not.
        for f in ["a", "d/c", "d/x"] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.path().join(f))
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        let report = t.replay(&window).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(std::fs::read(d.path().join("a")).unwrap(), b"new");
        assert_eq!(std::fs::read(d.path().join("d/c")).unwrap(), b"HEllo");
        assert_eq!(std::fs::read(d.path().join("d/x")).unwrap(), b"\0\0xy");
        assert!(!d.path().join("b").exists() && !d.path().join("c").exists());
        // Replaying again changes nothing.
        let again = t.replay(&window).unwrap();
        assert!(again.failed.is_empty(), "{:?}", again.failed);
        assert_eq!(std::fs::read(d.path().join("d/c")).unwrap(), b"HEllo");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn an_exchange_replayed_after_it_applied_is_not_undone() {
        let (d, t) = tree();
        t.set_own_handles(true);
        if t.set_marker(0).is_err() {
            eprintln!("no trusted xattrs here (not root?); skipped");
            return;
        }
        std::fs::write(d.path().join("x"), b"x").unwrap();
        std::fs::write(d.path().join("y"), b"y").unwrap();
        let op = Op::Rename {
            from: b"x".to_vec(),
            to: b"y".to_vec(),
            flags: libc::RENAME_EXCHANGE,
            handle: handle_of(&t, b"x"),
        };
        t.apply_logged(1, &op).unwrap();
        // The cut came after the exchange, before anything else: the marker names it.
        let report = t.replay(&[(1, op)]).unwrap();
        assert!(report.failed.is_empty());
        assert_eq!(std::fs::read(d.path().join("x")).unwrap(), b"y");
        assert_eq!(std::fs::read(d.path().join("y")).unwrap(), b"x");
        // On another tree (an image) the source's handles name nothing: a replayed rename
        // applies on its paths alone.
        let (d2, other) = tree();
        std::fs::write(d2.path().join("a"), b"a").unwrap();
        let foreign = Op::Rename {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
            flags: 0,
            handle: handle_of(&t, b"x"),
        };
        other.apply(&foreign, ApplyMode::Replay).unwrap();
        assert_eq!(std::fs::read(d2.path().join("b")).unwrap(), b"a");
    }

    #[test]
    fn reserved_xattrs_are_never_listed() {
        let (d, t) = tree();
        if t.set_marker(7).is_err() {
            return;
        }
        std::fs::write(d.path().join("f"), b"").unwrap();
        assert!(t
            .xattr_names(b"f")
            .unwrap()
            .iter()
            .all(|n| !n.starts_with(RESERVED_XATTR_PREFIX)));
        assert_eq!(t.marker().unwrap(), Some(7));
    }

    /// Apply `op` on a thread, failing the test if it does not return within 5 s (a FIFO
    /// opened for writing would block forever).
    fn apply_bounded(t: Tree, op: Op) -> (Tree, Result<(), ApplyError>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = t.apply(&op, ApplyMode::Live);
            let _ = tx.send((t, r));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("applying a record blocked (did it open a FIFO?)")
    }

    #[test]
    fn writes_truncates_and_allocations_reach_only_regular_files() {
        let (d, t) = tree();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o666),
            0,
        )
        .unwrap();
        let device = rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("null"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .is_ok();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        let write = |p: &[u8]| Op::Write {
            path: p.to_vec(),
            offset: 0,
            data: b"x".to_vec(),
            handle: Handle::none(),
        };
        let truncate = |p: &[u8]| Op::SetAttr {
            path: p.to_vec(),
            mode: None,
            uid: None,
            gid: None,
            size: Some(0),
            atime: None,
            mtime: None,
            handle: Handle::none(),
        };
        let mut t = t;
        let mut targets: Vec<&[u8]> = vec![b"fifo", b"dir"];
        if device {
            targets.push(b"null");
        }
        for p in targets {
            for op in [write(p), truncate(p)] {
                let (back, r) = apply_bounded(t, op);
                t = back;
                let e = r.expect_err("a write or truncate of a special file is refused");
                assert!(matches!(e, ApplyError::NotRegular { .. }), "{e}");
                assert_eq!(e.errno(), libc::EINVAL);
            }
        }
    }

    #[test]
    fn no_record_changes_what_a_symlink_points_to() {
        let (d, t) = tree();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("s")).unwrap();
        let (uid, gid) = me();
        let ops = [
            Op::SetAttr {
                path: b"s".to_vec(),
                mode: Some(0o4777),
                uid: Some(uid),
                gid: Some(gid),
                size: None,
                atime: Some(Timestamp { secs: 1, nanos: 0 }),
                mtime: Some(Timestamp { secs: 1, nanos: 0 }),
                handle: Handle::none(),
            },
            Op::SetAttr {
                path: b"s".to_vec(),
                mode: None,
                uid: None,
                gid: None,
                size: Some(0),
                atime: None,
                mtime: None,
                handle: Handle::none(),
            },
            Op::Write {
                path: b"s".to_vec(),
                offset: 0,
                data: b"owned".to_vec(),
                handle: Handle::none(),
            },
            Op::SetXattr {
                path: b"s".to_vec(),
                name: b"user.x".to_vec(),
                value: b"v".to_vec(),
                flags: 0,
            },
            Op::Create {
                path: b"s".to_vec(),
                mode: 0o4777,
                uid,
                gid,
            },
            Op::Mknod {
                path: b"s".to_vec(),
                mode: libc::S_IFIFO | 0o4777,
                rdev: 0,
                uid,
                gid,
            },
            Op::Mkdir {
                path: b"s".to_vec(),
                mode: 0o4777,
                uid,
                gid,
            },
        ];
        for op in &ops {
            let _ = t.apply(op, ApplyMode::Live);
            let _ = t.apply(op, ApplyMode::Replay);
        }
        let md = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777,
            0o600
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        assert_ne!(
            std::os::unix::fs::MetadataExt::mtime(&md),
            1,
            "times of the target unchanged"
        );
    }

    #[test]
    fn resolution_stays_beneath_the_root_without_the_path_rules() {
        // The path rules (`path::validate`) refuse `..` before anything is resolved; this
        // checks the layer under them on its own: openat2's RESOLVE_BENEATH.
        let outer = tempfile::tempdir().unwrap();
        std::fs::create_dir(outer.path().join("tree")).unwrap();
        std::fs::write(outer.path().join("secret"), b"s").unwrap();
        let t = Tree::open(&outer.path().join("tree")).unwrap();
        for p in [&b"../secret"[..], b"./../secret", b"/etc/passwd"] {
            assert!(t.open_at(p, OFlags::RDONLY).is_err(), "{}", show(p));
            assert!(t.stat(p).is_err(), "{}", show(p));
        }
        std::fs::create_dir(outer.path().join("tree/d")).unwrap();
        assert!(t.open_at(b"d/../../secret", OFlags::RDONLY).is_err());
        assert!(t.parent(b"d/../../x").is_err());
    }

    #[test]
    fn nested_paths_are_recognised() {
        assert!(nested(b"a", b"a"));
        assert!(nested(b"a", b"a/b"));
        assert!(nested(b"a/b/c", b"a"));
        assert!(!nested(b"a", b"ab"));
        assert!(!nested(b"a/b", b"a/c"));
        assert_ne!(exchange_tmp_name(b"x", b"y"), exchange_tmp_name(b"y", b"x"));
        assert!(exchange_tmp_name(b"x", b"y").starts_with(EXCHANGE_TMP_PREFIX.as_bytes()));
    }

    /// An emulated exchange (a filesystem without `RENAME_EXCHANGE`) that a crash interrupted
    /// after either of its first two renames is finished by the next try of the record.
    #[test]
    fn an_interrupted_emulated_exchange_is_finished() {
        for after_second in [false, true] {
            let (d, t) = tree();
            std::fs::create_dir(d.path().join("d")).unwrap();
            std::fs::write(d.path().join("d/x"), b"x").unwrap();
            std::fs::write(d.path().join("y"), b"y").unwrap();
            let tmp = String::from_utf8(exchange_tmp_name(b"d/x", b"y")).unwrap();
            // First rename: d/x parked.
            std::fs::rename(d.path().join("d/x"), d.path().join("d").join(&tmp)).unwrap();
            if after_second {
                std::fs::rename(d.path().join("y"), d.path().join("d/x")).unwrap();
            }
            let op = Op::Rename {
                from: b"d/x".to_vec(),
                to: b"y".to_vec(),
                flags: libc::RENAME_EXCHANGE,
                handle: crate::handle::Handle::none(),
            };
            t.apply(&op, ApplyMode::Replay).unwrap();
            assert_eq!(std::fs::read(d.path().join("d/x")).unwrap(), b"y");
            assert_eq!(std::fs::read(d.path().join("y")).unwrap(), b"x");
            assert!(!d.path().join("d").join(&tmp).exists());
        }
    }

    /// The directory cache changes nothing a tree does: the same random operations (renames
    /// of directories above cached ones, rmdirs, exchanges, recreated names), with stats in
    /// between that fill the cache, give a cached tree and an uncached one the same answers
    /// and the same final contents.
    mod dir_cache {
        use super::*;
        use proptest::prelude::*;

        /// Few names, so that renames, removals and re-creations keep meeting cached paths.
        const NAMES: [&str; 7] = ["a", "b", "a/b", "b/a", "a/b/c", "b/a/b", "c"];

        #[derive(Debug, Clone)]
        enum Step {
            Mkdir(usize),
            Create(usize),
            Write(usize, u8),
            Rename(usize, usize, bool),
            Rmdir(usize),
            Unlink(usize),
            Stat(usize),
        }

        fn step() -> impl Strategy<Value = Step> {
            let n = 0..NAMES.len();
            prop_oneof![
                n.clone().prop_map(Step::Mkdir),
                n.clone().prop_map(Step::Create),
                (n.clone(), any::<u8>()).prop_map(|(i, b)| Step::Write(i, b)),
                (n.clone(), n.clone(), any::<bool>()).prop_map(|(a, b, x)| Step::Rename(a, b, x)),
                n.clone().prop_map(Step::Rmdir),
                n.clone().prop_map(Step::Unlink),
                n.prop_map(Step::Stat),
            ]
        }

        fn listing(root: &Path) -> Vec<(String, String)> {
            let mut out = Vec::new();
            let mut stack = vec![root.to_path_buf()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir).unwrap() {
                    let e = e.unwrap();
                    let p = e.path();
                    let rel = p.strip_prefix(root).unwrap().display().to_string();
                    let t = e.file_type().unwrap();
                    if t.is_dir() {
                        stack.push(p);
                        out.push((rel, "dir".into()));
                    } else {
                        out.push((rel, format!("{:?}", std::fs::read(&p).unwrap())));
                    }
                }
            }
            out.sort();
            out
        }

        #[test]
        fn only_canonical_spellings_are_cached() {
            let (_d, t) = tree();
            t.cache_dirs(8);
            let (uid, gid) = me();
            t.apply(
                &Op::Mkdir {
                    path: b"a".to_vec(),
                    mode: 0o755,
                    uid,
                    gid,
                },
                ApplyMode::Live,
            )
            .unwrap();
            let root_only = t.cached_dirs(); // the mkdir opened the root
            t.dir(b"./a").expect("openat2 resolves ./a");
            t.dir(b"a//").expect("and a//");
            assert_eq!(t.cached_dirs(), root_only, "aliases of a are not cached");
            t.dir(b"a").unwrap();
            assert_eq!(t.cached_dirs(), root_only + 1);
        }

        #[test]
        fn a_directory_removed_and_made_again_is_the_new_one() {
            let (d, t) = tree();
            t.cache_dirs(8);
            let (uid, gid) = me();
            let mkdir = |p: &str| Op::Mkdir {
                path: p.into(),
                mode: 0o755,
                uid,
                gid,
            };
            t.apply(&mkdir("a"), ApplyMode::Live).unwrap();
            t.apply(&mkdir("a/b"), ApplyMode::Live).unwrap();
            assert!(t.stat(b"a/b/f").is_err());
            assert!(t.cached_dirs() > 0, "the stat cached a/b");
            t.apply(
                &Op::Rmdir {
                    path: b"a/b".to_vec(),
                },
                ApplyMode::Live,
            )
            .unwrap();
            t.apply(&mkdir("a/b"), ApplyMode::Live).unwrap();
            let create = Op::Create {
                path: b"a/b/f".to_vec(),
                mode: 0o644,
                uid,
                gid,
            };
            t.apply(&create, ApplyMode::Live)
                .expect("created in the new a/b, not the removed one");
            assert!(d.path().join("a/b/f").exists());
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn a_cached_tree_does_what_an_uncached_one_does(
                steps in proptest::collection::vec(step(), 1..60)
            ) {
                let (plain_dir, plain) = tree();
                let (cached_dir, cached) = tree();
                cached.cache_dirs(4);
                let (uid, gid) = me();
                for s in &steps {
                    let p = |i: usize| NAMES[i].as_bytes().to_vec();
                    let op = match *s {
                        Step::Mkdir(i) => Op::Mkdir { path: p(i), mode: 0o755, uid, gid },
                        Step::Create(i) => Op::Create { path: p(i), mode: 0o644, uid, gid },
                        Step::Write(i, b) => Op::Write {
                            path: p(i),
                            offset: 0,
                            data: vec![b; 3],
                            handle: Handle::none(),
                        },
                        Step::Rename(a, b, exchange) => Op::Rename {
                            from: p(a),
                            to: p(b),
                            flags: if exchange { RenameFlags::EXCHANGE.bits() } else { 0 },
                            handle: Handle::none(),
                        },
                        Step::Rmdir(i) => Op::Rmdir { path: p(i) },
                        Step::Unlink(i) => Op::Unlink { path: p(i) },
                        Step::Stat(i) => {
                            let a = plain.stat(&p(i)).map(|st| st.st_mode);
                            let b = cached.stat(&p(i)).map(|st| st.st_mode);
                            prop_assert_eq!(a, b, "stat {}", NAMES[i]);
                            continue;
                        }
                    };
                    let a = plain.apply(&op, ApplyMode::Live).map_err(|e| e.errno());
                    let b = cached.apply(&op, ApplyMode::Live).map_err(|e| e.errno());
                    prop_assert_eq!(a, b, "{:?}", s);
                }
                prop_assert_eq!(listing(plain_dir.path()), listing(cached_dir.path()));
                prop_assert!(cached.cached_dirs() <= 4);
            }
        }
    }
}
