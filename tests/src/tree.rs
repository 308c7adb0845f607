//! Comparing two directory trees the way the mirror promises they are equal.
//!
//! Compared: the set of paths, file type, size of regular files, content, permission bits
//! (including setuid, setgid and sticky), uid and gid, symlink targets, hard-link structure
//! (paths grouped by inode within each tree; the groups must be equal) and `user.*` xattrs.
//! Not compared: atime, mtime and ctime (see docs/testing.md), directory sizes (they are a
//! property of the underlying filesystem, not of the tree) and inode numbers themselves.
//! Symlinks are never followed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The kind of a directory entry, as `lstat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// What is compared about one path.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of regular files; `None` for everything else.
    pub size: Option<u64>,
    /// Link count of non-directories; `None` for directories.
    pub nlink: Option<u64>,
    /// Target of symlinks.
    pub target: Option<PathBuf>,
    /// `user.*` extended attributes, name → value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Device numbers of device nodes.
    pub rdev: Option<u64>,
    /// (st_dev, st_ino), used only to derive the hard-link groups.
    inode: (u64, u64),
}

/// Every path beneath a root (relative to it, the root itself excluded) and what is compared
/// about it.
#[derive(Debug)]
pub struct Snapshot {
    pub root: PathBuf,
    pub nodes: BTreeMap<PathBuf, Node>,
}

impl Snapshot {
    /// Walks `root` without following symlinks.
    pub fn take(root: &Path) -> io::Result<Snapshot> {
        let mut nodes = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let mut entries = fs::read_dir(&dir)
                .map_err(|e| with_path(e, &dir))?
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| with_path(e, &dir))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let rel_child = rel.join(entry.file_name());
                let full = root.join(&rel_child);
                let node = read_node(&full).map_err(|e| with_path(e, &full))?;
                if node.kind == Kind::Dir {
                    stack.push(rel_child.clone());
                }
                nodes.insert(rel_child, node);
            }
        }
        Ok(Snapshot {
            root: root.to_path_buf(),
            nodes,
        })
    }

    /// The hard-link groups: sets of two or more paths naming the same inode.
    pub fn link_groups(&self) -> BTreeSet<Vec<PathBuf>> {
        let mut by_inode: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
        for (path, node) in &self.nodes {
            if node.kind != Kind::Dir {
                by_inode.entry(node.inode).or_default().push(path.clone());
            }
        }
        by_inode
            .into_values()
            .filter(|paths| paths.len() > 1)
            .map(|mut paths| {
                paths.sort();
                paths
            })
            .collect()
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn read_node(path: &Path) -> io::Result<Node> {
    let meta = fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    let kind = if file_type.is_file() {
        Kind::File
    } else if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_symlink() {
        Kind::Symlink
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else if file_type.is_socket() {
        Kind::Socket
    } else if file_type.is_char_device() {
        Kind::CharDevice
    } else {
        Kind::BlockDevice
    };
    Ok(Node {
        kind,
        perm: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: (kind == Kind::File).then_some(meta.size()),
        nlink: (kind != Kind::Dir).then_some(meta.nlink()),
        target: if kind == Kind::Symlink {
            Some(fs::read_link(path)?)
        } else {
            None
        },
        xattrs: user_xattrs(path)?,
        rdev: matches!(kind, Kind::CharDevice | Kind::BlockDevice).then_some(meta.rdev()),
        inode: (meta.dev(), meta.ino()),
    })
}

/// The `user.*` xattrs of `path` (not following a symlink). A filesystem that does not support
/// xattrs at all has none.
pub fn user_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = match list_xattrs(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let value = get_xattr(path, name)?;
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

fn list_xattrs(path: &Path) -> io::Result<Vec<u8>> {
    loop {
        let len = rustix::fs::llistxattr_query(path)?;
        let mut buf = vec![0u8; len];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // The list grew between the two calls: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = std::ffi::OsStr::from_bytes(name);
    loop {
        let len = rustix::fs::lgetxattr_query(path, name)?;
        let mut buf = vec![0u8; len];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Every difference between two trees, one human-readable line each; empty when they are
/// equal. `a_name` and `b_name` label the two sides in the lines.
pub fn diff_trees(a: &Path, b: &Path, a_name: &str, b_name: &str) -> io::Result<Vec<String>> {
    let sa = Snapshot::take(a)?;
    let sb = Snapshot::take(b)?;
    let mut diffs = Vec::new();
    for (path, na) in &sa.nodes {
        let Some(nb) = sb.nodes.get(path) else {
            diffs.push(format!(
                "only in {a_name}: {} ({:?})",
                path.display(),
                na.kind
            ));
            continue;
        };
        let p = path.display();
        if na.kind != nb.kind {
            diffs.push(format!(
                "{p}: type {a_name}={:?} {b_name}={:?}",
                na.kind, nb.kind
            ));
            continue;
        }
        if na.perm != nb.perm {
            diffs.push(format!(
                "{p}: mode {a_name}={:04o} {b_name}={:04o}",
                na.perm, nb.perm
            ));
        }
        if (na.uid, na.gid) != (nb.uid, nb.gid) {
            diffs.push(format!(
                "{p}: owner {a_name}={}:{} {b_name}={}:{}",
                na.uid, na.gid, nb.uid, nb.gid
            ));
        }
        if na.nlink != nb.nlink {
            diffs.push(format!(
                "{p}: link count {a_name}={:?} {b_name}={:?}",
                na.nlink, nb.nlink
            ));
        }
        if na.target != nb.target {
            diffs.push(format!(
                "{p}: symlink target {a_name}={:?} {b_name}={:?}",
                na.target, nb.target
            ));
        }
        if na.rdev != nb.rdev {
            diffs.push(format!(
                "{p}: device {a_name}={:?} {b_name}={:?}",
                na.rdev, nb.rdev
            ));
        }
        if na.xattrs != nb.xattrs {
            diffs.push(format!(
                "{p}: user xattrs {a_name}={} {b_name}={}",
                show_xattrs(&na.xattrs),
                show_xattrs(&nb.xattrs)
            ));
        }
        if na.size != nb.size {
            diffs.push(format!(
                "{p}: size {a_name}={:?} {b_name}={:?}",
                na.size, nb.size
            ));
        } else if na.kind == Kind::File {
            if let Some(offset) = first_content_difference(&a.join(path), &b.join(path))? {
                diffs.push(format!("{p}: content differs from byte {offset} on"));
            }
        }
    }
    for (path, nb) in &sb.nodes {
        if !sa.nodes.contains_key(path) {
            diffs.push(format!(
                "only in {b_name}: {} ({:?})",
                path.display(),
                nb.kind
            ));
        }
    }
    let ga = sa.link_groups();
    let gb = sb.link_groups();
    for group in ga.difference(&gb) {
        diffs.push(format!(
            "hard-link group only in {a_name}: {}",
            show_group(group)
        ));
    }
    for group in gb.difference(&ga) {
        diffs.push(format!(
            "hard-link group only in {b_name}: {}",
            show_group(group)
        ));
    }
    Ok(diffs)
}

fn show_group(group: &[PathBuf]) -> String {
    group
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" = ")
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let items: Vec<String> = x
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={:?}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            )
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// The offset of the first byte at which two files differ, or `None` if they are equal.
pub fn first_content_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let mut fa = File::open(a).map_err(|e| with_path(e, a))?;
    let mut fb = File::open(b).map_err(|e| with_path(e, b))?;
    let mut ba = vec![0u8; 1 << 16];
    let mut bb = vec![0u8; 1 << 16];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let common = na.min(nb);
        if let Some(i) = (0..common).find(|&i| ba[i] != bb[i]) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + common as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Panics with a readable diff unless the trees at `a` and `b` are equal (see the module docs
/// for what "equal" covers).
#[track_caller]
pub fn assert_trees_equal(a: &Path, b: &Path) {
    assert_trees_equal_named(a, b, "a", "b")
}

/// [`assert_trees_equal`] with labels for the two sides in the diff.
#[track_caller]
pub fn assert_trees_equal_named(a: &Path, b: &Path, a_name: &str, b_name: &str) {
    let diffs = diff_trees(a, b, a_name, b_name)
        .unwrap_or_else(|e| panic!("cannot compare {} and {}: {e}", a.display(), b.display()));
    if !diffs.is_empty() {
        const SHOWN: usize = 200;
        let mut msg = format!(
            "trees differ ({a_name} = {}, {b_name} = {}), {} difference(s):\n",
            a.display(),
            b.display(),
            diffs.len()
        );
        for line in diffs.iter().take(SHOWN) {
            msg.push_str("  ");
            msg.push_str(line);
            msg.push('\n');
        }
        if diffs.len() > SHOWN {
            msg.push_str(&format!("  ... and {} more\n", diffs.len() - SHOWN));
        }
        panic!("{msg}");
    }
}

/// Relative path → (mtime seconds, nanoseconds) of everything under `root`, directories and
/// symlinks included (not `root` itself). Times are compared on their own, see the module docs.
pub fn mtimes(root: &Path) -> BTreeMap<PathBuf, (i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let e = e.expect("dir entry");
            let m = fs::symlink_metadata(e.path()).expect("lstat");
            if m.is_dir() {
                stack.push(e.path());
            }
            let rel = e
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_path_buf();
            out.insert(rel, (m.mtime(), m.mtime_nsec()));
        }
    }
    out
}

/// One line per entry of `a` whose mtime differs in `b` (or that `b` lacks).
pub fn mtime_differences(
    a: &BTreeMap<PathBuf, (i64, i64)>,
    b: &BTreeMap<PathBuf, (i64, i64)>,
) -> Vec<String> {
    a.iter()
        .filter(|(p, t)| b.get(*p) != Some(t))
        .map(|(p, t)| format!("{}: backing {t:?} image {:?}", p.display(), b.get(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn make(root: &Path) {
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::write(root.join("d/f"), b"hello").unwrap();
        fs::hard_link(root.join("d/f"), root.join("g")).unwrap();
        symlink("d/f", root.join("s")).unwrap();
        fs::set_permissions(root.join("d/e"), fs::Permissions::from_mode(0o2775)).unwrap();
    }

    #[test]
    fn equal_trees_have_no_difference() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        make(a.path());
        make(b.path());
        assert_eq!(
            diff_trees(a.path(), b.path(), "a", "b").unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_kind_of_difference_is_reported() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        make(a.path());
        make(b.path());
        // content (same size), mode, symlink target, hard-link structure, an extra path
        fs::write(b.path().join("d/f"), b"jello").unwrap();
        fs::set_permissions(b.path().join("d/e"), fs::Permissions::from_mode(0o0775)).unwrap();
        fs::remove_file(b.path().join("s")).unwrap();
        symlink("elsewhere", b.path().join("s")).unwrap();
        fs::remove_file(b.path().join("g")).unwrap();
        fs::copy(b.path().join("d/f"), b.path().join("g")).unwrap();
        fs::write(b.path().join("extra"), b"").unwrap();
        let diffs = diff_trees(a.path(), b.path(), "a", "b").unwrap();
        let joined = diffs.join("\n");
        for expected in [
            "d/f: content differs from byte 0 on",
            "d/e: mode a=2775 b=0775",
            "s: symlink target",
            "hard-link group only in a: d/f = g",
            "only in b: extra",
            "d/f: link count a=Some(2) b=Some(1)",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
    }
}
