//! The inode table: which names each inode the kernel knows has, so that every record can
//! name its files by path as they are at the moment the operation runs.
//!
//! FUSE inode numbers are the backing files' own inode numbers (the backing root's swapped
//! with 1, FUSE's root), so hard links share one inode as on a local filesystem.

use std::collections::HashMap;

use crate::error::{FsError, FsResult};

/// FUSE's root inode number.
pub const ROOT: u64 = 1;

/// The names of one inode: (parent inode, name).
pub type Names = Vec<(u64, Vec<u8>)>;

/// What the table knows about one inode.
#[derive(Debug, Default)]
pub struct Node {
    /// Known names: (parent inode, name). The first is used to build paths.
    pub names: Names,
    /// Kernel lookup count (dropped by `forget`).
    pub lookups: u64,
    /// Open file handles.
    pub opens: u32,
    /// FUSE generation: the backing filesystem reuses inode numbers, and the kernel may still
    /// hold the old inode when a new file gets its number; a new generation makes the kernel
    /// treat it as a different inode instead of aliasing the two.
    pub generation: u64,
    /// The backing inode's file handle, once a record needed it (stamped on content records
    /// for exact recovery, see `proto::replay`).
    pub handle: Option<proto::Handle>,
}

/// inode → names, and (parent, name) → inode.
#[derive(Debug)]
pub struct InodeTable {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
    root_backing_ino: u64,
    /// Nodes removed since the allocator was last asked to give free pages back.
    freed_since_trim: usize,
}

impl InodeTable {
    /// Every inode the kernel may hold, with its known names (for dropping what the kernel
    /// caches of them all).
    pub fn known(&self) -> Vec<(u64, Names)> {
        self.nodes
            .iter()
            .map(|(ino, n)| (*ino, n.names.clone()))
            .collect()
    }

    /// A table whose root is the backing directory with inode number `root_backing_ino`.
    pub fn new(root_backing_ino: u64) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                lookups: 1,
                ..Default::default()
            },
        );
        InodeTable {
            nodes,
            by_name: HashMap::new(),
            root_backing_ino,
            freed_since_trim: 0,
        }
    }

    /// How many inodes the table holds (the root included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The FUSE inode number of a backing inode number (a bijection).
    pub fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_backing_ino {
            ROOT
        } else if backing == ROOT {
            self.root_backing_ino
        } else {
            backing
        }
    }

    /// The path of `ino` relative to the root ("" for the root).
    pub fn path(&self, ino: u64) -> FsResult<Vec<u8>> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        let mut len = 0;
        while cur != ROOT {
            let node = self.nodes.get(&cur).ok_or(FsError::UnknownInode(ino))?;
            let (parent, name) = node.names.first().ok_or(FsError::UnknownInode(ino))?;
            len += name.len() + 1;
            if parts.len() > 4096 || len > proto::path::MAX_PATH_LEN + 256 {
                return Err(FsError::Backing(rustix::io::Errno::NAMETOOLONG));
            }
            parts.push(name);
            cur = *parent;
        }
        let mut out = Vec::with_capacity(len);
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(p);
        }
        Ok(out)
    }

    /// The path of `name` inside directory `parent`.
    pub fn child_path(&self, parent: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        Ok(proto::path::join(&self.path(parent)?, name))
    }

    /// The inode known under (parent, name), if any.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.by_name.get(&(parent, name.to_vec())).copied()
    }

    /// The node of `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The kernel learned (parent, name) → ino: count a lookup and remember the name.
    pub fn looked_up(&mut self, ino: u64, parent: u64, name: &[u8]) {
        self.add_name(ino, parent, name);
        self.nodes.entry(ino).or_default().lookups += 1;
    }

    /// Remember a name without counting a lookup.
    pub fn add_name(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if let Some(old) = self.by_name.insert(key.clone(), ino) {
            if old != ino {
                if let Some(n) = self.nodes.get_mut(&old) {
                    n.names.retain(|k| k != &key);
                }
            }
        }
        let node = self.nodes.entry(ino).or_default();
        if !node.names.contains(&key) {
            node.names.push(key);
        }
    }

    /// (parent, name) is gone.
    pub fn remove_name(&mut self, parent: u64, name: &[u8]) {
        let key = (parent, name.to_vec());
        if let Some(ino) = self.by_name.remove(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.names.retain(|k| k != &key);
            }
        }
    }

    /// A rename (not an exchange): the target name, if it was known, stops naming its inode.
    pub fn renamed(&mut self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        let Some(ino) = self.by_name.remove(&(parent, name.to_vec())) else {
            self.remove_name(new_parent, new_name);
            return;
        };
        self.remove_name(new_parent, new_name);
        if let Some(n) = self.nodes.get_mut(&ino) {
            let old = (parent, name.to_vec());
            n.names.retain(|k| k != &old);
            // The new name becomes the one paths are built from.
            n.names.insert(0, (new_parent, new_name.to_vec()));
        }
        self.by_name.insert((new_parent, new_name.to_vec()), ino);
    }

    /// RENAME_EXCHANGE: the two names swap inodes.
    pub fn exchanged(&mut self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8]) {
        let a = self.by_name.remove(&(parent, name.to_vec()));
        let b = self.by_name.remove(&(new_parent, new_name.to_vec()));
        let fix = |nodes: &mut HashMap<u64, Node>,
                   ino: Option<u64>,
                   from: (u64, Vec<u8>),
                   to: (u64, Vec<u8>)| {
            if let Some(n) = ino.and_then(|i| nodes.get_mut(&i)) {
                n.names.retain(|k| k != &from);
                n.names.insert(0, to);
            }
        };
        fix(
            &mut self.nodes,
            a,
            (parent, name.to_vec()),
            (new_parent, new_name.to_vec()),
        );
        fix(
            &mut self.nodes,
            b,
            (new_parent, new_name.to_vec()),
            (parent, name.to_vec()),
        );
        if let Some(a) = a {
            self.by_name.insert((new_parent, new_name.to_vec()), a);
        }
        if let Some(b) = b {
            self.by_name.insert((parent, name.to_vec()), b);
        }
    }

    /// A new file got inode number `ino` (create, mkdir, mknod, symlink): if the number is still
    /// known from an earlier file, start a new generation and forget the old file's names.
    /// Returns the generation to give the kernel.
    pub fn created(&mut self, ino: u64) -> u64 {
        match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.generation += 1;
                node.handle = None;
                for k in std::mem::take(&mut node.names) {
                    if self.by_name.get(&k) == Some(&ino) {
                        self.by_name.remove(&k);
                    }
                }
                node.generation
            }
            None => 0,
        }
    }

    /// The cached file handle of `ino`.
    pub fn handle(&self, ino: u64) -> Option<proto::Handle> {
        self.nodes.get(&ino).and_then(|n| n.handle.clone())
    }

    /// Cache the file handle of `ino` (if the table knows it).
    pub fn set_handle(&mut self, ino: u64, handle: proto::Handle) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.handle = Some(handle);
        }
    }

    /// The generation of `ino` (0 when unknown).
    pub fn generation(&self, ino: u64) -> u64 {
        self.nodes.get(&ino).map(|n| n.generation).unwrap_or(0)
    }

    /// The kernel dropped `n` lookups of `ino`; forget it when nothing refers to it any more.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0 && node.opens == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = self.nodes.remove(&ino) {
                for k in node.names {
                    if self.by_name.get(&k) == Some(&ino) {
                        self.by_name.remove(&k);
                    }
                }
            }
            self.shrink();
        }
    }

    /// Give memory back once the kernel has forgotten most of what it once looked up: the
    /// table then holds only inodes the kernel still references, and its size follows theirs
    /// (a hash table never shrinks by itself).
    fn shrink(&mut self) {
        self.freed_since_trim += 1;
        let cap = self.nodes.capacity();
        let resize = cap > 4096 && self.nodes.len() < cap / 4;
        if resize {
            self.nodes.shrink_to(self.nodes.len() * 2);
            self.by_name.shrink_to(self.by_name.len() * 2);
        }
        // The nodes' own small allocations went back to the allocator, spread over the arenas
        // of the FUSE threads that made them; hand whole free pages to the system too, after a
        // resize, every TRIM_EVERY removals, and once the table has drained (a walk of 300,000
        // files kept 57 MiB of free heap when only the resizes trimmed). malloc_trim costs a
        // few milliseconds.
        const TRIM_EVERY: usize = 32 * 1024;
        let drained =
            self.freed_since_trim >= 4096 && self.nodes.len() * 16 < self.freed_since_trim;
        if resize || drained || self.freed_since_trim >= TRIM_EVERY {
            self.freed_since_trim = 0;
            // SAFETY: malloc_trim only releases free heap memory; it is safe to call anytime.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// An open handle of `ino` was created (+1) or released (-1).
    pub fn opened(&mut self, ino: u64, delta: i32) -> u32 {
        let node = self.nodes.entry(ino).or_default();
        node.opens = node.opens.saturating_add_signed(delta);
        node.opens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_inodes_leave_the_table_and_it_shrinks() {
        let mut t = InodeTable::new(2);
        for ino in 10..100_010u64 {
            t.looked_up(ino, ROOT, format!("f{ino}").as_bytes());
        }
        let full = t.nodes.capacity();
        for ino in 10..100_000u64 {
            t.forget(ino, 1);
        }
        assert_eq!(t.nodes.len(), 11, "the root and the ten still referenced");
        assert!(t.by_name.len() <= 10);
        assert!(
            t.nodes.capacity() < full / 8,
            "capacity {} after forgetting, {full} before",
            t.nodes.capacity()
        );
        assert_eq!(t.path(100_005).unwrap(), b"f100005".to_vec());
    }

    #[test]
    fn paths_follow_renames_of_directories() {
        let mut t = InodeTable::new(100);
        t.looked_up(10, ROOT, b"a");
        t.looked_up(11, 10, b"f");
        assert_eq!(t.path(11).unwrap(), b"a/f");
        t.renamed(ROOT, b"a", ROOT, b"b");
        assert_eq!(t.path(11).unwrap(), b"b/f");
        t.exchanged(10, b"f", ROOT, b"x");
        assert_eq!(t.path(11).unwrap(), b"x");
    }

    #[test]
    fn hard_links_survive_losing_one_name() {
        let mut t = InodeTable::new(100);
        t.looked_up(10, ROOT, b"a");
        t.looked_up(10, ROOT, b"b");
        t.remove_name(ROOT, b"a");
        assert_eq!(t.path(10).unwrap(), b"b");
        t.remove_name(ROOT, b"b");
        assert!(t.path(10).is_err());
    }

    #[test]
    fn rename_over_a_known_name_unlinks_it() {
        let mut t = InodeTable::new(100);
        t.looked_up(10, ROOT, b"a");
        t.looked_up(11, ROOT, b"b");
        t.renamed(ROOT, b"a", ROOT, b"b");
        assert_eq!(t.child(ROOT, b"b"), Some(10));
        assert!(t.path(11).is_err());
    }

    #[test]
    fn a_reused_inode_number_gets_a_new_generation_and_loses_old_names() {
        let mut t = InodeTable::new(100);
        t.looked_up(10, ROOT, b"old");
        t.remove_name(ROOT, b"old");
        assert_eq!(t.created(10), 1);
        t.looked_up(10, ROOT, b"new");
        assert_eq!(t.path(10).unwrap(), b"new");
        assert_eq!(t.generation(10), 1);
        assert_eq!(t.created(11), 0, "an unknown number starts at generation 0");
    }

    #[test]
    fn root_inode_numbers_are_swapped() {
        let t = InodeTable::new(100);
        assert_eq!(t.fuse_ino(100), ROOT);
        assert_eq!(t.fuse_ino(ROOT), 100);
        assert_eq!(t.fuse_ino(7), 7);
    }
}
