//! The FUSE adapter: unpacks fuser's arguments, calls [`Volume`], and replies. No filesystem
//! logic lives here; errno mapping happens in one place ([`crate::error::FsError::errno`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::Stat;

use crate::error::{FsError, FsResult};
use crate::volume::{AttrChange, Caller, Durable, SetTime, Unprivileged, Volume};

/// Attributes are cached by the kernel for a minute: every change passes through this daemon,
/// and the kernel updates or drops its cached attributes for the operations it sends (a
/// setattr's reply, a write, a link or unlink of the inode, a change in a directory). What the
/// daemon changes on its own, it invalidates explicitly ([`Volume::attrs_changed`]): set-ID
/// bits cleared at a write, a file's mode after a setxattr (an ACL rewrites it), the root
/// directory when a file unlinked while open moves to its hidden name there or leaves it, and
/// everything the kernel holds when records taken back from the destination were applied
/// behind it or an operation applied here was answered with an error, not confirmed as
/// mirrored ([`Volume::forget_cached`]). FUSE inode numbers
/// are the backing inode numbers, which the backing filesystem reuses: every entry carries the
/// inode table's generation, bumped when a number is reused by a create, so the kernel never
/// applies a removed inode's cached attributes to a new file of the same number. (With a
/// second, a delete of many files that were looked up more than a second before paid a LOOKUP
/// and a GETATTR per file again.)
const ATTR_TTL: Duration = Duration::from_secs(60);
/// Names are cached as long, for the same reasons.
const ENTRY_TTL: Duration = Duration::from_secs(60);

/// The fuser `Filesystem` over a [`Volume`].
pub struct FuseAdapter {
    volume: Arc<Volume>,
    /// Ask the kernel for its writeback cache (`--writeback-cache`).
    writeback_cache: bool,
    /// The kernel leaves dropping privileges at a content change to this daemon (FUSE
    /// `HANDLE_KILLPRIV_V2`, negotiated at init): it then stops asking for
    /// `security.capability` before every write, one round trip less per write.
    killpriv: bool,
}

impl FuseAdapter {
    fn generation(&self, st: &Stat) -> Generation {
        Generation(self.volume.generation(st.st_ino))
    }

    /// Wrap a volume; with `writeback_cache`, writes return once in the kernel's page cache
    /// and are mirrored when the kernel writes them back, at the latest at fsync or close.
    pub fn new(volume: Arc<Volume>, writeback_cache: bool) -> Self {
        volume.set_writeback_cache(writeback_cache);
        FuseAdapter {
            volume,
            writeback_cache,
            killpriv: false,
        }
    }

    /// The caller of a content change, when it must clear set-ID bits where the kernel does
    /// not say (truncate, fallocate, copy_file_range): the kernel's rule is "the caller lacks
    /// CAP_FSETID", which a FUSE request does not carry; a caller other than root is taken to
    /// lack it.
    fn unprivileged(&self, req: &Request) -> Option<Unprivileged> {
        (self.killpriv && req.uid() != 0).then(|| unprivileged_caller(req))
    }

    /// Reply to a mutating operation once its records are settled (mirrored, or the policy's
    /// answer): `reply` gets the value or the errno, on this thread when nothing is left to
    /// wait for, else on the thread that receives the acknowledgement (this FUSE thread goes
    /// back to the kernel at once, and is not woken again for this request).
    fn answer<T: Send + 'static>(
        &self,
        what: &'static str,
        r: FsResult<Durable<T>>,
        reply: impl FnOnce(Result<T, Errno>) + Send + 'static,
    ) {
        match r {
            Err(e) => reply(Err(errno(&e, what))),
            Ok(Durable { value, seq: None }) => reply(Ok(value)),
            Ok(Durable {
                value,
                seq: Some(seq),
            }) => self.volume.mirror().when_durable(
                seq,
                Box::new(move |r| reply(r.map(|()| value).map_err(|e| errno(&e, what)))),
            ),
        }
    }

    /// [`FuseAdapter::answer`] for operations that answer with a directory entry.
    fn answer_entry(&self, what: &'static str, r: FsResult<Durable<Stat>>, reply: ReplyEntry) {
        let r = r.map(|d| d.map(|st| (attr(&st), self.generation(&st))));
        self.answer(what, r, move |r| match r {
            Ok((a, g)) => reply.entry_with_ttls(&ENTRY_TTL, &ATTR_TTL, &a, g),
            Err(e) => reply.error(e),
        });
    }

    /// FLUSH (a close) and FSYNC. Without the writeback cache every write was durable on
    /// both sides before it was answered: nothing is left to do, and ENOSYS tells the kernel
    /// so once (it then answers them itself, with success: no round trip through this daemon
    /// per close or fsync; files are also opened with `FOPEN_NOFLUSH`). Under
    /// `--writeback-cache` the kernel has just written the file's dirty pages and times back,
    /// and each write-back was answered once logged here: the answer waits until everything
    /// logged so far is mirrored (one wait for all of them).
    fn close_or_fsync(&self, what: &'static str, reply: ReplyEmpty) {
        if self.writeback_cache {
            self.answer_empty(what, Ok(self.volume.everything_logged()), reply);
        } else {
            reply.error(Errno::ENOSYS);
        }
    }

    /// [`FuseAdapter::answer`] for operations that answer with nothing.
    fn answer_empty(&self, what: &'static str, r: FsResult<Durable<()>>, reply: ReplyEmpty) {
        self.answer(what, r, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn errno(e: &FsError, what: &str) -> Errno {
    if e.is_expected() {
        tracing::debug!("{what}: {e}");
    } else {
        tracing::warn!("{what}: {e}");
    }
    Errno::from_i32(e.errno())
}

/// The caller of `req` as one without CAP_FSETID (for the set-ID rule at a content change).
fn unprivileged_caller(req: &Request) -> Unprivileged {
    Unprivileged {
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// `trusted.*` xattrs are for root only, as on ext4 (which lists them, and lets them be read or
/// written, only with CAP_SYS_ADMIN): another caller does not see them in a listing, reads
/// ENODATA and gets EPERM when it writes or removes one. The kernel already refuses get, set
/// and remove of `trusted.*` to an unprivileged caller before asking us; a listing is ours to
/// filter. `security.*`, `system.*` and `user.*` names are listed to everyone, as on ext4.
fn hidden_xattr(req: &Request, name: &[u8]) -> bool {
    req.uid() != 0 && name.starts_with(b"trusted.")
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    }
}

fn dir_kind(k: rustix::fs::FileType) -> FileType {
    use rustix::fs::FileType as R;
    match k {
        R::Directory => FileType::Directory,
        R::Symlink => FileType::Symlink,
        R::Fifo => FileType::NamedPipe,
        R::CharacterDevice => FileType::CharDevice,
        R::BlockDevice => FileType::BlockDevice,
        R::Socket => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large writes: 1 MiB per FUSE request (4 KiB requests cost 5x on sequential writes).
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        self.killpriv = config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok();
        if !self.killpriv {
            tracing::info!(
                "the kernel does not offer FUSE_HANDLE_KILLPRIV_V2: it asks for file \
                 capabilities before every write"
            );
        }
        // readdirplus: a listing brings the attributes along (ls -l, find) when the kernel
        // thinks it helps.
        if self.writeback_cache {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                tracing::warn!(
                    "the kernel does not offer the FUSE writeback cache ({missing:?}): every \
                     write is mirrored before it returns, as without --writeback-cache"
                );
            }
        }
        if std::env::var_os("NVMIRROR_NO_READDIRPLUS").is_none() {
            let _ = config.add_capabilities(
                InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.volume.lookup(parent.0, name.as_bytes()) {
            Ok(st) => {
                reply.entry_with_ttls(&ENTRY_TTL, &ATTR_TTL, &attr(&st), self.generation(&st))
            }
            Err(e) => reply.error(errno(&e, "lookup")),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.volume.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.volume.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(st) => reply.attr(&ATTR_TTL, &attr(&st)),
            Err(e) => reply.error(errno(&e, "getattr")),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            unprivileged: self.unprivileged(req),
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        let r = self
            .volume
            .setattr(ino.0, change)
            .map(|d| d.map(|st| attr(&st)));
        self.answer("setattr", r, move |r| match r {
            Ok(a) => reply.attr(&ATTR_TTL, &a),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e, "readlink")),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.volume.mknod(
            caller(req),
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            rdev as u64,
        );
        self.answer_entry("mknod", r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .volume
            .mkdir(caller(req), parent.0, name.as_bytes(), mode, umask);
        self.answer_entry("mkdir", r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.volume.unlink(parent.0, name.as_bytes());
        self.answer_empty("unlink", r, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.volume.rmdir(parent.0, name.as_bytes());
        self.answer_empty("rmdir", r, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.volume.symlink(
            caller(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.answer_entry("symlink", r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.volume.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        self.answer_empty("rename", r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.volume.link(ino.0, newparent.0, newname.as_bytes());
        self.answer_entry("link", r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH),
            Err(e) => reply.error(errno(&e, "open")),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e, "read")),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let who = (self.killpriv && write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID))
            .then(|| unprivileged_caller(req));
        let mut r = self.volume.write(ino.0, fh.0, offset, data, who);
        if self.writeback_cache {
            // A write-back of the kernel's page cache: answered once logged here (the page is
            // then clean); the close or fsync that makes it count waits for the mirror.
            r = r.map(|d| Durable {
                value: d.value,
                seq: None,
            });
        }
        self.answer("write", r, move |r| match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.close_or_fsync("flush", reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.volume.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "release")),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.close_or_fsync("fsync", reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e, "opendir")),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.volume.dir_entries(fh.0) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(
                        INodeNo(e.ino),
                        (i + 1) as u64,
                        dir_kind(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e, "readdir")),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.volume.dir_entries(fh.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e, "readdirplus")),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let dot = e.name == b"." || e.name == b"..";
            // The kernel counts a lookup for every entry but "." and "..", so those are looked
            // up (counted) here, and the count is given back if the entry does not fit.
            let st = if dot {
                self.volume.getattr(e.ino, None)
            } else {
                self.volume.lookup(ino.0, &e.name)
            };
            // An entry removed since the listing was read is skipped.
            let Ok(st) = st else { continue };
            if reply.add(
                INodeNo(st.st_ino),
                (i + 1) as u64,
                OsStr::from_bytes(&e.name),
                &ENTRY_TTL,
                &attr(&st),
                self.generation(&st),
            ) {
                if !dot {
                    self.volume.forget(st.st_ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.volume.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // As for fsync: directory changes are durable on both sides when answered.
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.volume.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e, "statfs")),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if hidden_xattr(req, name.as_bytes()) {
            return reply.error(Errno::EPERM);
        }
        match self.volume.setxattr(ino.0, name.as_bytes(), value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "setxattr")),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if hidden_xattr(req, name.as_bytes()) {
            return reply.error(Errno::NO_XATTR);
        }
        if size == 0 {
            return match self.volume.getxattr_len(ino.0, name.as_bytes()) {
                Ok(n) => reply.size(n as u32),
                Err(e) => reply.error(errno(&e, "getxattr")),
            };
        }
        match self.volume.getxattr(ino.0, name.as_bytes(), size) {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e, "getxattr")),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        // The whole list (size 0: no ERANGE from the volume), then what this caller may see,
        // then the caller's size check on what is left.
        let list = match self.volume.listxattr(ino.0, 0) {
            Ok(list) => list,
            Err(e) => return reply.error(errno(&e, "listxattr")),
        };
        let mut visible = Vec::with_capacity(list.len());
        for name in list.split(|c| *c == 0).filter(|n| !n.is_empty()) {
            if !hidden_xattr(req, name) {
                visible.extend_from_slice(name);
                visible.push(0);
            }
        }
        if size == 0 {
            reply.size(visible.len() as u32)
        } else if visible.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&visible)
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if hidden_xattr(req, name.as_bytes()) {
            return reply.error(Errno::EPERM);
        }
        match self.volume.removexattr(ino.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "removexattr")),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .volume
            .create(caller(req), parent.0, name.as_bytes(), mode, umask, flags)
            .map(|d| d.map(|(st, fh)| (attr(&st), self.generation(&st), fh)));
        let handle = r.as_ref().ok().map(|d| d.value.2);
        let volume = self.volume.clone();
        self.answer("create", r, move |r| match r {
            Ok((a, g, fh)) => {
                reply.created(&ATTR_TTL, &a, g, FileHandle(fh), FopenFlags::FOPEN_NOFLUSH)
            }
            Err(e) => {
                // The client never gets the handle, so never releases it.
                if let Some(fh) = handle {
                    volume.drop_handle(fh);
                }
                reply.error(e)
            }
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self
            .volume
            .fallocate(ino.0, fh.0, offset, length, mode, self.unprivileged(req))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e, "fallocate")),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.volume.copy_file_range(
            ino_in.0,
            fh_in.0,
            offset_in,
            ino_out.0,
            fh_out.0,
            offset_out,
            len,
            self.unprivileged(req),
        ) {
            Ok(n) => reply.written(n.min(u32::MAX as u64) as u32),
            Err(e) => reply.error(errno(&e, "copy_file_range")),
        }
    }
}
