//! Reused byte buffers for records and messages.
//!
//! Every logged write builds its frame in a buffer that lives until the frame has crossed the
//! network (a source's outbox, QUIC's send queue), and every message a destination receives is
//! read into one. A fresh megabyte-sized allocation per record costs more than the copy into
//! it: the allocator hands freed memory back to the kernel, so each new buffer is faulted in
//! and zeroed page by page again (a third of fs-source's CPU time under a sequential write
//! before this pool). [`BufPool`] keeps a bounded number of returned buffers for the next
//! taker; [`BufPool::freeze`] turns a filled buffer into [`Bytes`] that come back to the pool
//! when the last clone is dropped.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

/// A bounded set of spare buffers, shared by the threads that fill and drop them.
#[derive(Debug)]
pub struct BufPool {
    spare: Mutex<Spare>,
    /// At most this many bytes of capacity are kept spare.
    limit: usize,
    /// Buffers bigger than this are not kept (one huge write must not pin its buffer).
    largest: usize,
}

/// Needs below this are left to the allocator, which serves small sizes from memory it keeps
/// (no page faults): a pool of small buffers would only hold memory.
pub const SMALLEST_POOLED: usize = 64 << 10;

#[derive(Debug, Default)]
struct Spare {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// A pool keeping up to `limit` bytes of spare capacity, in buffers of at most `largest`.
    pub fn new(limit: usize, largest: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            spare: Mutex::new(Spare::default()),
            limit,
            largest,
        })
    }

    /// An empty buffer with room for at least `capacity` bytes: a spare one when there is one
    /// big enough and at most twice the size (the smallest such), else a new one. Below
    /// [`SMALLEST_POOLED`], a new empty buffer that grows as it is filled.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity < SMALLEST_POOLED {
            return Vec::new();
        }
        let reused = {
            let mut s = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            let best = s
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= capacity && b.capacity() / 2 <= capacity)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| {
                let b = s.bufs.swap_remove(i);
                s.bytes -= b.capacity();
                b
            })
        };
        match reused {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// Hand a buffer back for reuse (dropped instead when the pool is full or it is too big).
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < SMALLEST_POOLED || cap > self.largest {
            return;
        }
        let mut s = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if s.bytes + cap > self.limit {
            return;
        }
        s.bytes += cap;
        s.bufs.push(buf);
    }

    /// Bytes of spare capacity held now.
    pub fn spare_bytes(&self) -> usize {
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// `buf` as shared, immutable [`Bytes`] (no copy) that return it to this pool when the
    /// last clone is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: Arc::clone(self),
        })
    }
}

/// A buffer on loan from a [`BufPool`], given back on drop.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frozen_buffer_comes_back_when_its_last_clone_drops() {
        let pool = BufPool::new(4 << 20, 1 << 20);
        let mut b = pool.take(100_000);
        b.extend_from_slice(b"record");
        let ptr = b.as_ptr();
        let bytes = pool.freeze(b);
        let clone = bytes.slice(1..3);
        drop(bytes);
        assert_eq!(pool.spare_bytes(), 0, "a clone still holds the buffer");
        assert_eq!(&clone[..], b"ec");
        drop(clone);
        assert!(pool.spare_bytes() >= 100_000);
        let again = pool.take(80_000);
        assert_eq!(again.as_ptr(), ptr, "the returned buffer is reused");
        assert!(again.is_empty(), "a reused buffer starts empty");
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit_and_no_buffer_above_its_largest() {
        let pool = BufPool::new(300_000, 200_000);
        pool.give(Vec::with_capacity(400_000));
        assert_eq!(pool.spare_bytes(), 0, "too big to keep");
        pool.give(Vec::with_capacity(1_000));
        assert_eq!(pool.spare_bytes(), 0, "too small to keep");
        pool.give(Vec::with_capacity(150_000));
        pool.give(Vec::with_capacity(150_000));
        assert!(pool.spare_bytes() <= 300_000, "{} kept", pool.spare_bytes());
        assert!(pool.spare_bytes() >= 150_000);
        assert_eq!(
            pool.take(1_000).capacity(),
            0,
            "small needs bypass the pool"
        );
    }

    #[test]
    fn take_picks_the_smallest_spare_that_fits() {
        let pool = BufPool::new(4 << 20, 4 << 20);
        pool.give(Vec::with_capacity(1_000_000));
        pool.give(Vec::with_capacity(100_000));
        let small = pool.take(70_000);
        assert!(
            small.capacity() < 1_000_000,
            "the 100 kB spare fits a 70 kB need"
        );
        assert!(
            pool.take(100_000).capacity() < 1_000_000,
            "a spare over twice the need is not handed out"
        );
        let big = pool.take(600_000);
        assert!(big.capacity() >= 1_000_000);
        assert_eq!(pool.spare_bytes(), 0);
        let fresh = pool.take(2_000_000);
        assert!(fresh.capacity() >= 2_000_000);
    }
}
