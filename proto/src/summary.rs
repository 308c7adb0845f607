//! Entry summaries: what `fs-source verify` compares of each entry of the backing volume and
//! the image — type, permission bits, owner, size, mtime, link count, device number, symlink
//! target, xattrs and a BLAKE3 hash of the content — computed by the same code on both sides,
//! so that only summaries (never content) cross the network.
//!
//! The inode number and ctime travel too but are not compared: each side uses its own inode
//! numbers to find its hard-link groups, and the source uses ctime to tell an entry that
//! changed while it was being verified from one that differs.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{FileType, OFlags, Stat};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::apply::Tree;
use crate::record::Timestamp;

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A FIFO.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
}

impl Kind {
    fn of(mode: u32) -> Kind {
        match FileType::from_raw_mode(mode) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            _ => Kind::File,
        }
    }
}

/// One xattr: its name and the hash of its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XattrSummary {
    /// Name with its namespace.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// BLAKE3 of the value.
    pub hash: [u8; 32],
}

/// What is compared of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntrySummary {
    /// The entry's name in its directory.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Its type.
    pub kind: Kind,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a regular file (0 otherwise).
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Link count (0 for directories, whose count depends on the filesystem).
    pub nlink: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// Target of a symlink.
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
    /// Every xattr, by name.
    pub xattrs: Vec<XattrSummary>,
    /// BLAKE3 of a regular file's content.
    pub content: Option<[u8; 32]>,
    /// Inode number on its own side (hard-link groups; not compared).
    pub ino: u64,
    /// Status change time on its own side (not compared).
    pub ctime: Timestamp,
}

fn ts(secs: i64, nanos: i64) -> Timestamp {
    Timestamp {
        secs,
        nanos: nanos as u32,
    }
}

/// Bytes read per `pread` while hashing.
const HASH_CHUNK: usize = 1 << 20;

/// Summarize the entry `path` of `tree`. `hashed` is told how many content bytes were read
/// (for progress and rate limits).
pub fn summarize(
    tree: &Tree,
    path: &[u8],
    hashed: &mut dyn FnMut(u64),
) -> Result<EntrySummary, Errno> {
    let st = tree.stat(path)?;
    let name = crate::path::split_last(path)
        .map(|(_, n)| n.to_vec())
        .unwrap_or_default();
    let kind = Kind::of(st.st_mode);
    let target = if kind == Kind::Symlink {
        let (dir, n) = tree.parent(path)?;
        rustix::fs::readlinkat(&dir, OsStr::from_bytes(n), Vec::new())?.into_bytes()
    } else {
        Vec::new()
    };
    let content = if kind == Kind::File {
        Some(hash_file(tree, path, &st, hashed)?)
    } else {
        None
    };
    Ok(EntrySummary {
        name,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: if kind == Kind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime: ts(st.st_mtime, st.st_mtime_nsec as i64),
        nlink: if kind == Kind::Dir { 0 } else { st.st_nlink },
        rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
            st.st_rdev
        } else {
            0
        },
        target,
        xattrs: if kind == Kind::Symlink {
            Vec::new()
        } else {
            xattrs(tree, path)?
        },
        content,
        ino: st.st_ino,
        ctime: ts(st.st_ctime, st.st_ctime_nsec as i64),
    })
}

fn hash_file(
    tree: &Tree,
    path: &[u8],
    st: &Stat,
    hashed: &mut dyn FnMut(u64),
) -> Result<[u8; 32], Errno> {
    // Opens only a regular file (a FIFO or device swapped in is never opened) and never
    // follows a link.
    let regular = |flags| {
        tree.open_regular(path, flags).map_err(|e| match e {
            crate::apply::NotRegular::Io(e) => e,
            crate::apply::NotRegular::Kind(_) => Errno::AGAIN,
        })
    };
    let fd = regular(OFlags::RDONLY | OFlags::NOATIME).or_else(|_| regular(OFlags::RDONLY))?;
    let opened = rustix::fs::fstat(&fd)?;
    if opened.st_ino != st.st_ino
        || FileType::from_raw_mode(opened.st_mode) != FileType::RegularFile
    {
        return Err(Errno::AGAIN);
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = rustix::io::pread(&fd, &mut buf, offset)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
        hashed(n as u64);
    }
    Ok(*hasher.finalize().as_bytes())
}

fn xattrs(tree: &Tree, path: &[u8]) -> Result<Vec<XattrSummary>, Errno> {
    let names = tree.xattr_names(path)?;
    let (_keep, p) = tree.proc_path(path)?;
    let mut out = Vec::new();
    let mut value = vec![0u8; 65536];
    for name in names {
        match rustix::fs::lgetxattr(&p, OsStr::from_bytes(&name), &mut value[..]) {
            Ok(len) => out.push(XattrSummary {
                name,
                hash: *blake3::hash(&value[..len]).as_bytes(),
            }),
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The names in directory `dir` of `tree`, sorted.
pub fn names(tree: &Tree, dir: &[u8]) -> Result<Vec<Vec<u8>>, Errno> {
    let fd = tree.open_at(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut out = crate::apply::dir_names(&fd)?;
    out.sort();
    Ok(out)
}

/// What differs between the backing volume's summary `a` and the image's `b` of one entry
/// (empty when they are equal), in words for the operator.
pub fn differences(a: &EntrySummary, b: &EntrySummary) -> Vec<String> {
    let mut d = Vec::new();
    if a.kind != b.kind {
        d.push(format!("type backing={:?} image={:?}", a.kind, b.kind));
        return d;
    }
    if a.mode != b.mode {
        d.push(format!("mode backing={:04o} image={:04o}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        d.push(format!(
            "owner backing={}:{} image={}:{}",
            a.uid, a.gid, b.uid, b.gid
        ));
    }
    if a.size != b.size {
        d.push(format!("size backing={} image={}", a.size, b.size));
    } else if a.content != b.content {
        d.push("content".into());
    }
    if a.mtime != b.mtime {
        d.push(format!(
            "mtime backing={}.{:09} image={}.{:09}",
            a.mtime.secs, a.mtime.nanos, b.mtime.secs, b.mtime.nanos
        ));
    }
    if a.nlink != b.nlink {
        d.push(format!("link count backing={} image={}", a.nlink, b.nlink));
    }
    if a.rdev != b.rdev {
        d.push(format!("device backing={} image={}", a.rdev, b.rdev));
    }
    if a.target != b.target {
        d.push(format!(
            "symlink target backing={:?} image={:?}",
            String::from_utf8_lossy(&a.target),
            String::from_utf8_lossy(&b.target)
        ));
    }
    if a.xattrs != b.xattrs {
        d.push("xattrs".into());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_trees_have_equal_summaries_and_a_change_shows() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/f"), b"same content").unwrap();
            std::os::unix::fs::symlink("sub/f", d.join("l")).unwrap();
        }
        let (ta, tb) = (Tree::open(a.path()).unwrap(), Tree::open(b.path()).unwrap());
        let mut n = 0;
        let mut count = |b: u64| n += b;
        let sa = summarize(&ta, b"sub/f", &mut count).unwrap();
        let mut sb = summarize(&tb, b"sub/f", &mut |_| {}).unwrap();
        sb.mtime = sa.mtime;
        assert!(
            differences(&sa, &sb).is_empty(),
            "{:?}",
            differences(&sa, &sb)
        );
        assert_eq!(n, 12);
        std::fs::write(b.path().join("sub/f"), b"other content").unwrap();
        let mut sb = summarize(&tb, b"sub/f", &mut |_| {}).unwrap();
        sb.mtime = sa.mtime;
        assert_eq!(differences(&sa, &sb), vec!["size backing=12 image=13"]);
        std::fs::write(b.path().join("sub/f"), b"SAME content").unwrap();
        let mut sb = summarize(&tb, b"sub/f", &mut |_| {}).unwrap();
        sb.mtime = sa.mtime;
        assert_eq!(differences(&sa, &sb), vec!["content"]);
        assert_eq!(
            names(&ta, b"").unwrap(),
            vec![b"l".to_vec(), b"sub".to_vec()]
        );
        assert_eq!(summarize(&ta, b"sub", &mut |_| {}).unwrap().kind, Kind::Dir);
        assert_eq!(summarize(&ta, b"l", &mut |_| {}).unwrap().target, b"sub/f");
    }
}
