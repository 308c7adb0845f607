//! Resync: sending the *current state* of a path of the backing volume to the image, as
//! ordinary records in sequence with every other operation.
//!
//! One entry is sent as an `Op::Replace` (the entry's type, owner and mode; whatever the image
//! has there is replaced), then its xattrs (`SetXattr`), its content in chunks (`Write`, all-
//! zero chunks skipped) and finally its size and times (`SetAttr`). Each record is built under
//! the sequencer lock from what the backing volume holds at that moment, so a client's
//! operation on the same file is ordered before or after it like any other record, and the
//! image ends up equal to the backing volume. None of these records changes the backing volume
//! (its apply is a no-op; start-up recovery skips `Replace`).
//!
//! The baseline (`baseline.rs`), the healing of paths whose records failed to apply, and
//! `verify --repair` all go through [`Sender`].

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use proto::apply::Tree;
use proto::record::{Entry, Timestamp};
use proto::Op;
use rustix::fs::{FileType, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{FsError, FsResult};
use crate::mirror::{Mirror, RECORD_OVERHEAD};

/// Largest xattr value Linux allows.
const XATTR_MAX: usize = 65536;

/// Order of a depth-first walk that visits each directory before its children and children
/// in byte order of their names: component-wise comparison of the paths.
pub fn dfs_cmp(a: &[u8], b: &[u8]) -> Ordering {
    if a.is_empty() || b.is_empty() {
        return a.len().cmp(&b.len());
    }
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

/// True when `path` is `ancestor` or lies beneath it (the empty path is the root).
pub fn is_under(path: &[u8], ancestor: &[u8]) -> bool {
    ancestor.is_empty()
        || path == ancestor
        || (path.len() > ancestor.len()
            && path.starts_with(ancestor)
            && path[ancestor.len()] == b'/')
}

/// What [`Sender::entry`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A directory: its children are the caller's to send (then [`Sender::dir_times`]).
    Dir,
    /// Anything else, sent whole.
    Other,
    /// Nothing there (an `Absent` was sent).
    Gone,
    /// The file was renamed or replaced while its content was being sent; the rest was not
    /// sent (the rename is mirrored, and whoever renamed it queued the new name).
    Moved,
}

fn ts(secs: i64, nanos: i64) -> Timestamp {
    Timestamp {
        secs,
        nanos: nanos as u32,
    }
}

fn times_of(path: &[u8], st: &Stat) -> Op {
    Op::times(
        path.to_vec(),
        ts(st.st_atime, st.st_atime_nsec as i64),
        ts(st.st_mtime, st.st_mtime_nsec as i64),
    )
}

/// Sends entries of the backing volume as records.
pub struct Sender<'a> {
    tree: &'a Tree,
    mirror: &'a Mirror,
    /// Backing inode → a path already sent with its content, for hard links.
    links: HashMap<u64, Vec<u8>>,
    buf: Vec<u8>,
    /// Entries sent.
    pub entries: u64,
    /// Content bytes sent (including skipped zero chunks, which the image gets as holes).
    pub bytes: u64,
    /// The last record logged.
    pub last_seq: Option<u64>,
    /// Content bytes per second not to exceed (production traffic goes first).
    rate_bytes_per_sec: Option<f64>,
    started: std::time::Instant,
    /// Told what is being sent (renames meanwhile) and which names carry a hard link's content.
    baseline: Option<&'a crate::baseline::Baseline>,
    /// Sending the baseline's walk: later names of a hard link are reached by the walk itself.
    walking: bool,
}

impl<'a> Sender<'a> {
    /// A sender over `tree` (the backing volume) logging through `mirror`.
    pub fn new(tree: &'a Tree, mirror: &'a Mirror) -> Sender<'a> {
        Sender {
            tree,
            mirror,
            links: HashMap::new(),
            buf: Vec::new(),
            entries: 0,
            bytes: 0,
            last_seq: None,
            rate_bytes_per_sec: None,
            started: std::time::Instant::now(),
            baseline: None,
            walking: false,
        }
    }

    /// This sender carries the baseline's walk (see [`Sender::entry`] on hard links).
    pub fn walking(mut self) -> Self {
        self.walking = true;
        self
    }

    /// The walk is over: what is sent now (queued renames) is not reached by it.
    pub fn walk_over(&mut self) {
        self.walking = false;
    }

    /// Share hard-link knowledge with the baseline and tell it what is being sent, so that a
    /// rename of something half sent is resent under its new name.
    pub fn with_baseline(mut self, baseline: &'a crate::baseline::Baseline) -> Self {
        self.baseline = Some(baseline);
        self
    }

    fn link_target(&self, ino: u64) -> Option<Vec<u8>> {
        self.links
            .get(&ino)
            .cloned()
            .or_else(|| self.baseline.and_then(|b| b.link_target(ino)))
    }

    fn note_link(&mut self, ino: u64, path: &[u8]) {
        self.links.insert(ino, path.to_vec());
        if let Some(b) = self.baseline {
            b.note_link(ino, path);
        }
    }

    /// The other names of backing inode `ino` (a hard-linked file with `nlink` names), found
    /// by walking the volume; stops once every name is found.
    fn other_names(&self, ino: u64, nlink: u64, except: &[u8]) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(dir) = stack.pop() {
            let Ok(names) = self.children(&dir) else {
                continue;
            };
            for name in names {
                let p = proto::path::join(&dir, &name);
                let Ok(st) = self.tree.stat(&p) else { continue };
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => stack.push(p),
                    FileType::RegularFile if st.st_ino == ino && p != except => {
                        found.push(p);
                        if found.len() as u64 + 1 >= nlink {
                            return found;
                        }
                    }
                    _ => {}
                }
            }
        }
        found
    }

    /// Send content at most at `bytes_per_sec` (None: as fast as the mirror takes it).
    pub fn with_rate(mut self, bytes_per_sec: Option<f64>) -> Self {
        self.rate_bytes_per_sec = bytes_per_sec.filter(|r| *r > 0.0);
        self
    }

    /// Pace content to the rate limit (outside any transaction).
    fn pace(&self) {
        if let Some(rate) = self.rate_bytes_per_sec {
            let due = std::time::Duration::from_secs_f64(self.bytes as f64 / rate);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(std::time::Duration::from_secs(5)));
            }
        }
    }

    /// Log `ops` in one transaction (the caller read what they say under the same lock).
    fn log_in(&mut self, txn: &mut crate::mirror::Txn<'_>, op: &Op) -> FsResult<()> {
        txn.record(|b| op.encode_into(b), || Ok(()))
    }

    fn finish(&mut self, txn: crate::mirror::Txn<'_>) {
        if let Some(s) = txn.release() {
            self.last_seq = Some(s);
        }
    }

    /// Send one entry: `Replace` and, for anything but a directory, everything it holds. A
    /// directory's children are not sent (see [`Sent::Dir`]); `clear` removes the image
    /// directory's children first (a baseline that starts over).
    pub fn entry(&mut self, path: &[u8], clear: bool) -> FsResult<Sent> {
        let mut txn = self.mirror.begin(2 * RECORD_OVERHEAD + 4096)?;
        tracing::debug!(path = %String::from_utf8_lossy(path), "resync: entry");
        let st = match self.tree.stat(path) {
            Ok(st) => st,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => {
                let op = Op::Replace {
                    path: path.to_vec(),
                    entry: Entry::Absent,
                };
                self.log_in(&mut txn, &op)?;
                self.finish(txn);
                return Ok(Sent::Gone);
            }
            Err(e) => return Err(e.into()),
        };
        self.entries += 1;
        let (mode, uid, gid) = (st.st_mode & 0o7777, st.st_uid, st.st_gid);
        let replace = |entry| Op::Replace {
            path: path.to_vec(),
            entry,
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                self.log_in(
                    &mut txn,
                    &replace(Entry::Dir {
                        mode,
                        uid,
                        gid,
                        clear,
                    }),
                )?;
                self.finish(txn);
                self.xattrs(path)?;
                Ok(Sent::Dir)
            }
            FileType::Symlink => {
                let (dir, name) = self.tree.parent(path)?;
                let target =
                    rustix::fs::readlinkat(&dir, OsStr::from_bytes(name), Vec::new())?.into_bytes();
                self.log_in(&mut txn, &replace(Entry::Symlink { target, uid, gid }))?;
                self.log_in(&mut txn, &times_of(path, &st))?;
                self.finish(txn);
                Ok(Sent::Other)
            }
            FileType::RegularFile => {
                // Hard links: a later name of an inode whose content was sent becomes a link;
                // sending the content again (a resend, a heal, or a first name found outside
                // the walk) makes a new inode in the image, so every other name is linked to
                // it again.
                let holder = if st.st_nlink > 1 {
                    self.link_target(st.st_ino)
                } else {
                    None
                };
                if let Some(first) = &holder {
                    let same = first.as_slice() != path
                        && self.tree.stat(first).is_ok_and(|f| f.st_ino == st.st_ino);
                    if same {
                        self.log_in(&mut txn, &replace(Entry::Absent))?;
                        let link = Op::Link {
                            existing: first.clone(),
                            new_path: path.to_vec(),
                        };
                        self.log_in(&mut txn, &link)?;
                        self.finish(txn);
                        return Ok(Sent::Other);
                    }
                }
                let regroup = st.st_nlink > 1
                    && match &holder {
                        Some(first) => first.as_slice() == path,
                        None => !self.walking,
                    };
                if st.st_nlink > 1 {
                    self.note_link(st.st_ino, path);
                }
                let fd = self
                    .tree
                    .open_at(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOATIME)
                    .or_else(|_| self.tree.open_at(path, OFlags::RDONLY | OFlags::NONBLOCK))?;
                let opened = rustix::fs::fstat(&fd)?;
                if opened.st_ino != st.st_ino {
                    return Err(FsError::Backing(Errno::AGAIN));
                }
                self.log_in(&mut txn, &replace(Entry::File { mode, uid, gid }))?;
                self.finish(txn);
                self.xattrs(path)?;
                let sent = self.content(path, &fd, st.st_ino)?;
                if regroup && sent == Sent::Other {
                    let others = self.other_names(st.st_ino, st.st_nlink, path);
                    let mut parents = Vec::new();
                    for q in &others {
                        self.entry(q, false)?;
                        if let Some((parent, _)) = proto::path::split_last(q) {
                            parents.push(parent.to_vec());
                        }
                    }
                    parents.sort();
                    parents.dedup();
                    for p in parents {
                        self.dir_times(&p)?;
                    }
                }
                Ok(sent)
            }
            _ => {
                let entry = Entry::Special {
                    mode: st.st_mode,
                    rdev: st.st_rdev,
                    uid,
                    gid,
                };
                self.log_in(&mut txn, &replace(entry))?;
                self.finish(txn);
                self.xattrs(path)?;
                let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
                if let Ok(st) = self.tree.stat(path) {
                    self.log_in(&mut txn, &times_of(path, &st))?;
                }
                self.finish(txn);
                Ok(Sent::Other)
            }
        }
    }

    /// The content of a regular file, chunk by chunk, then its size and times.
    fn content(&mut self, path: &[u8], fd: &OwnedFd, ino: u64) -> FsResult<Sent> {
        let chunk = self.mirror.max_record_data().max(4096);
        self.buf.resize(chunk, 0);
        let mut offset = 0u64;
        loop {
            // Warm the page cache first, without the sequencer lock: the read under the lock
            // then costs a copy, never a disk access that would stall every client.
            let _ = rustix::fs::fadvise(
                fd,
                offset,
                std::num::NonZeroU64::new(chunk as u64),
                rustix::fs::Advice::WillNeed,
            );
            let _ = rustix::io::pread(fd, &mut self.buf[..], offset);
            let mut txn = self.mirror.begin(RECORD_OVERHEAD + chunk)?;
            if !self.tree.stat(path).is_ok_and(|s| s.st_ino == ino) {
                return Ok(Sent::Moved);
            }
            let mut n = 0;
            while n < chunk {
                let got = rustix::io::pread(fd, &mut self.buf[n..], offset + n as u64)?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            let data = &self.buf[..n];
            if n > 0 && data.iter().any(|b| *b != 0) {
                txn.record(
                    |b| Op::encode_write_into(b, path, offset, data, &proto::Handle::none()),
                    || Ok(()),
                )?;
            }
            self.bytes += n as u64;
            offset += n as u64;
            if n < chunk {
                let st = rustix::fs::fstat(fd)?;
                let mut op = times_of(path, &st);
                if let Op::SetAttr { size, .. } = &mut op {
                    *size = Some(st.st_size as u64);
                }
                self.log_in(&mut txn, &op)?;
                self.finish(txn);
                self.pace();
                return Ok(Sent::Other);
            }
            self.finish(txn);
            self.pace();
        }
    }

    /// Every xattr of `path`, each read and logged under the sequencer lock.
    fn xattrs(&mut self, path: &[u8]) -> FsResult<()> {
        let names = self.tree.xattr_names(path)?;
        let mut buf = vec![0u8; XATTR_MAX];
        'names: for name in names {
            // The size first, without the lock (rustix answers 0 for an empty buffer, so a
            // full-size buffer is used), then the value again under the lock, in a record
            // with room for it; a value that grew meanwhile is read again.
            let (_keep, p) = self.tree.proc_path(path)?;
            let mut size = match rustix::fs::lgetxattr(&p, OsStr::from_bytes(&name), &mut buf[..]) {
                Ok(n) => n,
                Err(Errno::NODATA) => continue,
                Err(e) => return Err(e.into()),
            };
            drop(_keep);
            let (mut txn, value) = loop {
                let txn = self.mirror.begin(RECORD_OVERHEAD + name.len() + size)?;
                let (_keep, p) = self.tree.proc_path(path)?;
                match rustix::fs::lgetxattr(&p, OsStr::from_bytes(&name), &mut buf[..]) {
                    Ok(n) if n <= size => break (txn, buf[..n].to_vec()),
                    Ok(n) => {
                        drop(txn);
                        size = n;
                    }
                    // Removed meanwhile: its removal is mirrored.
                    Err(Errno::NODATA) => continue 'names,
                    Err(e) => return Err(e.into()),
                }
            };
            tracing::debug!(path = %String::from_utf8_lossy(path), name = %String::from_utf8_lossy(&name),
                len = value.len(), "resync: xattr");
            let op = Op::SetXattr {
                path: path.to_vec(),
                name,
                value,
                flags: 0,
            };
            self.log_in(&mut txn, &op)?;
            self.finish(txn);
        }
        Ok(())
    }

    /// The times of a directory, sent after its children (adding them changed its mtime).
    pub fn dir_times(&mut self, path: &[u8]) -> FsResult<()> {
        let mut txn = self.mirror.begin(RECORD_OVERHEAD)?;
        match self.tree.stat(path) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                self.log_in(&mut txn, &times_of(path, &st))?;
            }
            _ => {}
        }
        self.finish(txn);
        Ok(())
    }

    /// The names in directory `path`, sorted (the walk's order).
    pub fn children(&self, path: &[u8]) -> FsResult<Vec<Vec<u8>>> {
        Ok(proto::summary::names(self.tree, path)?)
    }

    /// Send `path` (and everything beneath it), then the times of its parent, whose mtime
    /// the image changed by replacing the entry. A hard-linked file is sent with every other
    /// name of its inode (the image must not get a second inode), and a rename of what is
    /// being sent meanwhile queues its new name (see `baseline::Baseline::moved`).
    pub fn path(&mut self, path: &[u8]) -> FsResult<()> {
        if let Some(b) = self.baseline {
            b.inflight(path, true);
        }
        let result = self.path_inner(path);
        if let Some(b) = self.baseline {
            b.inflight(path, false);
        }
        result
    }

    fn path_inner(&mut self, path: &[u8]) -> FsResult<()> {
        self.tree(path)?;
        if let Some((parent, _)) = proto::path::split_last(path) {
            let parent = parent.to_vec();
            self.dir_times(&parent)?;
        }
        Ok(())
    }

    /// Send `path` and, for a directory, everything beneath it.
    pub fn tree(&mut self, path: &[u8]) -> FsResult<()> {
        if self.entry(path, false)? == Sent::Dir {
            let names = match self.children(path) {
                Ok(n) => n,
                Err(FsError::Backing(Errno::NOENT)) | Err(FsError::Backing(Errno::NOTDIR)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            for name in names {
                self.tree(&proto::path::join(path, &name))?;
            }
            self.dir_times(path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_order_is_depth_first_by_name() {
        let mut paths: Vec<&[u8]> = vec![b"b", b"a/c", b"a", b"", b"a/b/z", b"a-b", b"a/b"];
        paths.sort_by(|a, b| dfs_cmp(a, b));
        assert_eq!(
            paths,
            vec![&b""[..], b"a", b"a/b", b"a/b/z", b"a/c", b"a-b", b"b"]
        );
        assert!(is_under(b"a/b", b"a") && is_under(b"a", b"a") && is_under(b"x", b""));
        assert!(!is_under(b"ab", b"a") && !is_under(b"a", b"a/b"));
    }
}
