//! `fs-dest browse`: a read-only FUSE mount of a source's image that shows the last completed
//! CP, never a half-applied one, and follows new CPs as they complete.
//!
//! # Consistency
//!
//! Every FUSE operation holds the image's CP lock shared (see `cp_lock.rs`), so it sees the
//! image wholly before or wholly after a CP.
//!
//! What is guaranteed is per operation: one `read`, one `stat`, one directory listing (read whole
//! at `opendir`) shows one CP. A program reading a file in several `read` calls while a CP
//! completes can see the file before the CP in its first calls and after it in later ones, as
//! with any file changing under a reader. The kernel caches nothing that could outlive a CP:
//! attributes and names have a zero TTL and files are opened with direct I/O.
//!
//! Writes never reach the image: the mount is read-only (`ro`), so the kernel answers EROFS,
//! and every mutating operation answers EROFS here too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use proto::apply::Tree;
use rustix::fs::{OFlags, Stat};

use crate::cp_lock::CpLock;

const TTL: Duration = Duration::ZERO;
/// FUSE's root inode number.
const ROOT: u64 = 1;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Node {
    parent: u64,
    name: Vec<u8>,
    lookups: u64,
}

struct Entry {
    ino: u64,
    kind: FileType,
    name: Vec<u8>,
}

/// The read-only filesystem over one image.
pub struct BrowseFs {
    tree: Tree,
    dir: PathBuf,
    root_backing_ino: u64,
    nodes: Mutex<HashMap<u64, Node>>,
    files: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<Entry>>>>,
    next_fh: AtomicU64,
}

type Res<T> = Result<T, Errno>;

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
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

impl BrowseFs {
    /// A browser of `image` (`ROOT/NAME/image`); the CP lock lives in its parent directory.
    pub fn open(image: &Path) -> std::io::Result<BrowseFs> {
        let tree = Tree::open(image).map_err(|e| std::io::Error::other(e.to_string()))?;
        let root = rustix::fs::fstat(tree.root_fd())?;
        let dir = image
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| image.to_path_buf());
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                lookups: 1,
                ..Node::default()
            },
        );
        Ok(BrowseFs {
            tree,
            dir,
            root_backing_ino: root.st_ino,
            nodes: Mutex::new(nodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    fn guard(&self) -> Res<CpLock> {
        CpLock::shared(&self.dir).map_err(|e| {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot take the CP lock");
            Errno::EIO
        })
    }

    fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_backing_ino {
            ROOT
        } else if backing == ROOT {
            self.root_backing_ino
        } else {
            backing
        }
    }

    fn path(&self, ino: u64) -> Res<Vec<u8>> {
        let nodes = lock(&self.nodes);
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = nodes.get(&cur).ok_or(Errno::ENOENT)?;
            parts.push(&n.name);
            cur = n.parent;
            if parts.len() > 4096 {
                return Err(Errno::ENAMETOOLONG);
            }
        }
        let mut out = Vec::new();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    fn child(&self, parent: u64, name: &[u8]) -> Res<Vec<u8>> {
        let mut p = self.path(parent)?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        Ok(p)
    }

    fn attr(&self, st: &Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.fuse_ino(st.st_ino)),
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

    fn do_lookup(&self, parent: u64, name: &[u8]) -> Res<FileAttr> {
        let _g = self.guard()?;
        let path = self.child(parent, name)?;
        let st = self.tree.stat(&path).map_err(errno)?;
        let ino = self.fuse_ino(st.st_ino);
        if ino != ROOT {
            let mut nodes = lock(&self.nodes);
            let n = nodes.entry(ino).or_default();
            n.parent = parent;
            n.name = name.to_vec();
            n.lookups += 1;
        }
        Ok(self.attr(&st))
    }

    fn do_getattr(&self, ino: u64, fh: Option<u64>) -> Res<FileAttr> {
        let _g = self.guard()?;
        if let Some(fd) = fh.and_then(|fh| lock(&self.files).get(&fh).cloned()) {
            return Ok(self.attr(&rustix::fs::fstat(&*fd).map_err(errno)?));
        }
        let path = self.path(ino)?;
        Ok(self.attr(&self.tree.stat(&path).map_err(errno)?))
    }

    fn do_readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let _g = self.guard()?;
        let path = self.path(ino)?;
        let (dir, name) = self.tree.parent(&path).map_err(errno)?;
        let t = rustix::fs::readlinkat(&dir, OsStr::from_bytes(name), Vec::new()).map_err(errno)?;
        Ok(t.into_bytes())
    }

    fn do_open(&self, ino: u64, flags: i32) -> Res<u64> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(Errno::EROFS);
        }
        let _g = self.guard()?;
        let path = self.path(ino)?;
        let fd = self.tree.open_at(&path, OFlags::RDONLY).map_err(errno)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(fd));
        Ok(fh)
    }

    fn do_read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let fd = lock(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)?;
        let _g = self.guard()?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match rustix::io::pread(&*fd, &mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn do_opendir(&self, ino: u64) -> Res<u64> {
        let _g = self.guard()?;
        let path = self.path(ino)?;
        let fd = self
            .tree
            .open_at(&path, OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(errno)?;
        let parent = lock(&self.nodes).get(&ino).map_or(ROOT, |n| n.parent);
        let mut entries = vec![
            Entry {
                ino,
                kind: FileType::Directory,
                name: b".".to_vec(),
            },
            Entry {
                ino: parent,
                kind: FileType::Directory,
                name: b"..".to_vec(),
            },
        ];
        let mut dir = rustix::fs::Dir::read_from(&fd).map_err(errno)?;
        while let Some(e) = dir.read() {
            let e = e.map_err(errno)?;
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push(Entry {
                ino: self.fuse_ino(e.ino()),
                kind: dir_kind(e.file_type()),
                name: name.to_vec(),
            });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    fn do_xattr(&self, ino: u64, name: Option<&[u8]>, size: u32) -> Res<Vec<u8>> {
        let _g = self.guard()?;
        let path = self.path(ino)?;
        let (_keep, p) = self.tree.proc_path(&path).map_err(errno)?;
        let mut buf = vec![0u8; if size == 0 { 65536 } else { size as usize }];
        let n = match name {
            Some(name) => rustix::fs::lgetxattr(&p, OsStr::from_bytes(name), &mut buf[..]),
            None => rustix::fs::llistxattr(&p, &mut buf[..]),
        }
        .map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }
}

impl Filesystem for BrowseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry_with_ttls(&TTL, &TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut nodes = lock(&self.nodes);
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 && ino.0 != ROOT {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.do_readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
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
        match self.do_read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
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
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
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
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
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
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::fstatvfs(self.tree.root_fd()) {
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
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.do_xattr(ino.0, Some(name.as_bytes()), size) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.do_xattr(ino.0, None, size) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// Why browse could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    /// No image for that source.
    #[error("no image of source {name} under {root} ({image} is not a directory)")]
    NoImage {
        /// Source.
        name: String,
        /// ROOT.
        root: PathBuf,
        /// The image path.
        image: PathBuf,
    },
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Mount the image of `name` read-only at `mountpoint`, print the ready line, and serve until
/// SIGTERM/SIGINT (then unmount) or until someone unmounts it.
pub fn run(root: &Path, name: &str, mountpoint: &Path, threads: usize) -> Result<(), BrowseError> {
    let image = root.join(name).join("image");
    if !image.is_dir() {
        return Err(BrowseError::NoImage {
            name: name.to_string(),
            root: root.to_path_buf(),
            image,
        });
    }
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| BrowseError::Io { what, path, source }
    };
    let fs = BrowseFs::open(&image).map_err(io("cannot open", &image))?;
    // Check the lock works before mounting (a read-only ROOT would fail every operation).
    drop(CpLock::shared(&fs.dir).map_err(io("cannot take the CP lock in", &fs.dir))?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("cannot start a runtime for", mountpoint))?;
    let (mut term, mut int) = rt
        .block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .map_err(io("cannot install signal handlers for", mountpoint))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("nvmirror-browse:{name}")),
        fuser::MountOption::Subtype("nvmirror".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let session =
        fuser::Session::new(fs, mountpoint, &config).map_err(io("cannot mount", mountpoint))?;
    let bg = session
        .spawn()
        .map_err(io("cannot start the FUSE session on", mountpoint))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fs-dest: browsing {name} at {}", mountpoint.display());
        let _ = out.flush();
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = bg.join();
        let _ = done_tx.send(r);
    });
    rt.block_on(async move {
        tokio::pin!(done_rx);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            r = &mut done_rx => {
                if let Ok(Err(e)) = r {
                    tracing::warn!("FUSE session ended: {e}");
                }
                return;
            }
        }
        tracing::info!("signal received: unmounting {}", mountpoint.display());
        if let Err(e) = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()) {
            tracing::warn!(
                "unmount of {} failed ({e}); detaching it",
                mountpoint.display()
            );
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
    });
    Ok(())
}
