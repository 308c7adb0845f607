//! Open directories of a tree, kept by path so that an operation on `a/b/name` costs one
//! `*at` call on a descriptor of `a/b` instead of an `openat2` that walks `a/b` again, a call
//! and a `close`.
//!
//! A cached descriptor names the directory that was at its path when it was opened; it stays
//! right only while nothing moves or removes that directory or one above it. The tree that
//! owns the cache is the only thing changing its directories, and it forgets every entry at
//! or beneath a path it renames or removes ([`DirCache::forget_beneath`]), *after* the change.
//! A reader that missed and opened the directory itself inserts its descriptor only if no
//! change was forgotten since it looked ([`Miss::generation`]): a descriptor opened before a
//! rename finished never lands in the cache after the rename forgot that path.
//!
//! Bounded: when full, the cache is emptied (a workload's directories refill it in a few
//! calls; no LRU bookkeeping on the hit path). Off unless enabled, because a second writer of
//! the same directory tree (another process, another `Tree`) would make it stale.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::path;

/// A directory descriptor shared by the cache and its users.
pub type DirFd = Arc<OwnedFd>;

/// Directory descriptors by relative path, with the generation of the last forgetting.
#[derive(Debug, Default)]
pub struct DirCache {
    /// Entries kept at most; 0: the cache is off.
    capacity: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped by every forgetting.
    generation: u64,
    dirs: HashMap<Vec<u8>, DirFd>,
}

/// A lookup that found nothing: what the caller needs to insert what it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    /// The cache's generation when it missed.
    pub generation: u64,
}

impl DirCache {
    /// A cache that keeps nothing until [`DirCache::enable`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep up to `capacity` directories from now on (0 turns the cache off and empties it).
    pub fn enable(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Release);
        if capacity == 0 {
            self.clear();
        }
    }

    /// Whether the cache keeps anything.
    pub fn enabled(&self) -> bool {
        self.capacity.load(Ordering::Acquire) > 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The descriptor cached for `dir`, or what a later [`DirCache::insert`] needs.
    pub fn get(&self, dir: &[u8]) -> Result<DirFd, Miss> {
        let inner = self.lock();
        match inner.dirs.get(dir) {
            Some(fd) => Ok(fd.clone()),
            None => Err(Miss {
                generation: inner.generation,
            }),
        }
    }

    /// Keep `fd`, opened for `dir` after `miss`, unless something was forgotten since (it
    /// may then name a directory that moved) or the cache is off.
    pub fn insert(&self, dir: &[u8], fd: &DirFd, miss: Miss) {
        let capacity = self.capacity.load(Ordering::Acquire);
        if capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.generation != miss.generation {
            return;
        }
        if inner.dirs.len() >= capacity {
            inner.dirs.clear();
        }
        inner.dirs.insert(dir.to_vec(), fd.clone());
    }

    /// Forget `p` and every directory beneath it (call after renaming or removing `p`).
    pub fn forget_beneath(&self, p: &[u8]) {
        let mut inner = self.lock();
        inner.generation += 1;
        if p.is_empty() {
            inner.dirs.clear();
        } else {
            inner
                .dirs
                .retain(|d, _| d.as_slice() != p && !path::is_beneath(d, p));
        }
    }

    /// Forget everything.
    pub fn clear(&self) {
        self.forget_beneath(b"");
    }

    /// How many directories are cached (tests, status).
    pub fn len(&self) -> usize {
        self.lock().dirs.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> DirFd {
        Arc::new(
            rustix::fs::open(
                ".",
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .expect("open ."),
        )
    }

    #[test]
    fn off_until_enabled() {
        let c = DirCache::new();
        let miss = c.get(b"a").expect_err("empty");
        c.insert(b"a", &fd(), miss);
        assert!(c.get(b"a").is_err(), "a disabled cache keeps nothing");
        c.enable(4);
        let miss = c.get(b"a").expect_err("empty");
        c.insert(b"a", &fd(), miss);
        assert!(c.get(b"a").is_ok());
        c.enable(0);
        assert!(c.is_empty(), "turning it off empties it");
    }

    #[test]
    fn forgetting_a_path_forgets_what_is_beneath_it_only() {
        let c = DirCache::new();
        c.enable(16);
        for d in [&b"a"[..], b"a/b", b"a/b/c", b"ab", b"x"] {
            let miss = c.get(d).expect_err("new");
            c.insert(d, &fd(), miss);
        }
        c.forget_beneath(b"a");
        assert!(c.get(b"a").is_err());
        assert!(c.get(b"a/b").is_err());
        assert!(c.get(b"a/b/c").is_err());
        assert!(c.get(b"ab").is_ok(), "a sibling sharing a prefix stays");
        assert!(c.get(b"x").is_ok());
        c.forget_beneath(b"");
        assert!(c.is_empty(), "the root holds everything");
    }

    #[test]
    fn a_descriptor_opened_before_a_forgetting_is_not_kept() {
        let c = DirCache::new();
        c.enable(16);
        // A reader misses, opens `a`; meanwhile `a` is renamed and forgotten.
        let miss = c.get(b"a").expect_err("new");
        c.forget_beneath(b"a");
        c.insert(b"a", &fd(), miss);
        assert!(
            c.get(b"a").is_err(),
            "a descriptor that may name the moved directory must not be cached"
        );
        // Forgetting an unrelated path also counts (the generation is global): safe, not
        // precise.
        let miss = c.get(b"a").expect_err("new");
        c.insert(b"a", &fd(), miss);
        assert!(c.get(b"a").is_ok());
    }

    #[test]
    fn a_full_cache_starts_over() {
        let c = DirCache::new();
        c.enable(2);
        for d in [&b"a"[..], b"b", b"c"] {
            let miss = c.get(d).expect_err("new");
            c.insert(d, &fd(), miss);
        }
        assert_eq!(c.len(), 1, "emptied when full, then the new entry");
        assert!(c.get(b"c").is_ok());
    }
}
