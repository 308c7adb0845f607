//! The NVRAM region: a fixed-size byte range that survives a process crash once written, and
//! survives power loss once flushed.
//!
//! On a real deployment it is a DAX/pmem device or a file on `/dev/shm`; on a test machine a
//! disk file. [`MmapStorage`] maps a file with memmap2; [`MemStorage`] keeps bytes in memory
//! and remembers which were flushed, so unit tests can simulate a power cut.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A byte region with write-then-flush durability. Access is by copy, so implementations need
/// no shared references into memory that another thread may be writing.
///
/// Callers must not write one byte range from two threads at once; [`crate::NvLog`] guarantees
/// this by taking `&mut self` to append.
pub trait Storage: Send + Sync + 'static {
    /// Size in bytes.
    fn len(&self) -> usize;
    /// True for a zero-length region.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `buf.len()` bytes out, starting at `offset`. Panics when out of range, which
    /// [`crate::NvLog`] never asks for.
    fn read_at(&self, offset: usize, buf: &mut [u8]);
    /// Copy `data` in at `offset` (durable against a process crash from here on).
    fn write_at(&self, offset: usize, data: &[u8]);
    /// Make `offset..offset+len` durable against power loss (msync for a mapped file).
    fn flush(&self, offset: usize, len: usize) -> io::Result<()>;
    /// Make every `(offset, len)` range durable with one flush covering them all. On a disk
    /// file each msync ends with a device cache flush (100–300 µs here), so the pages of one
    /// group commit (records, a cursor in the superblock) are flushed together, not one flush
    /// each; clean pages in between cost nothing, and pages other writers dirtied meanwhile
    /// become durable early, which is harmless (a torn frame fails its CRC).
    fn flush_ranges(&self, ranges: &[(usize, usize)]) -> io::Result<()> {
        let Some(start) = ranges.iter().filter(|r| r.1 > 0).map(|r| r.0).min() else {
            return Ok(());
        };
        let end = ranges
            .iter()
            .filter(|r| r.1 > 0)
            .map(|r| r.0 + r.1)
            .max()
            .unwrap_or(start);
        self.flush(start, end - start)
    }
    /// A human-readable name (the file path) for error messages.
    fn describe(&self) -> String;
}

/// NVRAM as a memory-mapped file.
pub struct MmapStorage {
    map: memmap2::MmapRaw,
    path: PathBuf,
    /// On tmpfs or ramfs the mapped pages are the file: an msync has nothing to write and is
    /// skipped (the file outlives the process either way; nothing outlives a power cut).
    in_memory: bool,
    _file: File,
}

impl std::fmt::Debug for MmapStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapStorage")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

/// Whether [`MmapStorage::open`] found an existing file or made a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The file was created (all zeros).
    Created,
    /// The file existed with the expected size.
    Existing,
}

impl MmapStorage {
    /// Open (or create, allocated with fallocate) the file at `path` with exactly `len` bytes.
    /// An existing file of another size is an error: it was made for another geometry, and
    /// resizing it would lose or invent records.
    pub fn open(path: &Path, len: usize) -> io::Result<(Self, Opened)> {
        let ctx = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("NVRAM file {}: {what}: {e}", path.display()),
            )
        };
        // Records hold file names and contents: the file is its owner's only (0600 whatever
        // the umask), and a regular file left readable by others by an older version is
        // tightened. A device (pmem, dax) keeps the permissions its administrator gave it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| ctx(e, "cannot open"))?;
        let meta = file.metadata().map_err(|e| ctx(e, "cannot stat"))?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ctx(e, "cannot set mode 0600"))?;
        }
        let existing = meta.len();
        let in_memory = in_memory_fs(&file);
        let opened = if existing == 0 {
            if in_memory {
                // tmpfs: no blocks to prepare; fallocate reserves the pages (an ENOSPC now
                // rather than a SIGBUS at the first append).
                if let Err(e) =
                    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len as u64)
                {
                    if e != rustix::io::Errno::OPNOTSUPP {
                        return Err(ctx(e.into(), "cannot allocate"));
                    }
                    file.set_len(len as u64)
                        .map_err(|e| ctx(e, "cannot size"))?;
                }
            } else {
                zero_fill(&file, len).map_err(|e| ctx(e, "cannot write zeros"))?;
            }
            Opened::Created
        } else if existing != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "NVRAM file {} is {existing} bytes but the configured geometry needs {len} bytes; \
                     it belongs to another configuration (move it away to start afresh)",
                    path.display()
                ),
            ));
        } else {
            Opened::Existing
        };
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| ctx(e, "cannot map"))?;
        Ok((
            MmapStorage {
                map,
                path: path.to_path_buf(),
                in_memory,
                _file: file,
            },
            opened,
        ))
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.map.len()),
            "NVRAM access {offset}+{len} beyond {} bytes",
            self.map.len()
        );
    }
}

/// Whether `file` lives on tmpfs or ramfs (page cache only: nothing to write to a disk).
fn in_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::fstatfs(file).is_ok_and(|s| {
        let t = s.f_type as u64;
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// Write a new disk file's zeros for real, in 4 KiB writes, and make them durable. Blocks
/// merely fallocate'd are "unwritten" extents: the first msync of each page then converts its
/// extent in the filesystem's journal, a journal commit per flush (msync of a 4 KiB record,
/// ext4 here: 173–269 µs fallocate'd, 134–145 µs written). 4 KiB writes, not large ones: a
/// page cache filled with large folios made every later msync write ~1 MiB (machine-facts).
fn zero_fill(file: &File, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = [0u8; 4096];
    let mut off = 0usize;
    while off < len {
        let n = zeros.len().min(len - off);
        file.write_all_at(&zeros[..n], off as u64)?;
        off += n;
    }
    file.sync_all()
}

impl Storage for MmapStorage {
    fn len(&self) -> usize {
        self.map.len()
    }

    fn read_at(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self`; `buf` is a distinct Rust allocation, so the ranges do not overlap. No other
        // thread writes this range concurrently (the `Storage` contract, upheld by NvLog).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
    }

    fn write_at(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: as in `read_at`: in bounds, non-overlapping with `data`, and the `Storage`
        // contract guarantees a single writer and no concurrent reader for this range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                data.len(),
            );
        }
    }

    fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len);
        if len == 0 || self.in_memory {
            return Ok(());
        }
        self.map.flush_range(offset, len).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "msync of NVRAM file {} at {offset}+{len}: {e}",
                    self.path.display()
                ),
            )
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// NVRAM in memory, for tests: remembers what was flushed so a power cut can be simulated.
#[derive(Debug)]
pub struct MemStorage {
    inner: Mutex<MemInner>,
}

#[derive(Debug)]
struct MemInner {
    live: Vec<u8>,
    durable: Vec<u8>,
}

impl MemStorage {
    /// A zeroed region of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self::from_bytes(vec![0; len])
    }

    /// A region holding `bytes` (both live and durable), e.g. an image taken earlier.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStorage {
            inner: Mutex::new(MemInner {
                durable: bytes.clone(),
                live: bytes,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a process crash leaves: every byte written.
    pub fn crash_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// What a power cut leaves: only flushed bytes.
    pub fn power_cut_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
}

impl Storage for MemStorage {
    fn len(&self) -> usize {
        self.lock().live.len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.lock().live[offset..offset + buf.len()]);
    }
    fn write_at(&self, offset: usize, data: &[u8]) {
        self.lock().live[offset..offset + data.len()].copy_from_slice(data);
    }
    fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        let mut g = self.lock();
        let MemInner { live, durable } = &mut *g;
        durable[offset..offset + len].copy_from_slice(&live[offset..offset + len]);
        Ok(())
    }
    fn describe(&self) -> String {
        "<memory>".into()
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn read_at(&self, offset: usize, buf: &mut [u8]) {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: usize, data: &[u8]) {
        (**self).write_at(offset, data)
    }
    fn flush(&self, offset: usize, len: usize) -> io::Result<()> {
        (**self).flush(offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Read a whole file a daemon did not necessarily write (offline checks), never opening it for
/// writing: a FIFO (the open would block), a socket or a directory is refused as not a file.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::FileTypeExt;
    let ctx = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    let t = std::fs::metadata(path)
        .map_err(|e| ctx(e, "cannot stat"))?
        .file_type();
    if t.is_fifo() || t.is_socket() || t.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file", path.display()),
        ));
    }
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(|e| ctx(e, "cannot open"))?
        .read_to_end(&mut bytes)
        .map_err(|e| ctx(e, "cannot read"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_ranges_makes_every_range_durable_with_one_flush() {
        let s = MemStorage::new(64 << 10);
        s.write_at(100, b"cursor");
        s.write_at(40_000, b"record");
        s.write_at(60_000, b"not flushed");
        s.flush_ranges(&[(40_000, 6), (100, 6), (50_000, 0)])
            .expect("flush");
        let img = s.power_cut_image();
        assert_eq!(&img[100..106], b"cursor");
        assert_eq!(&img[40_000..40_006], b"record");
        assert_eq!(
            &img[60_000..60_011],
            &[0u8; 11],
            "beyond the last range stays volatile"
        );
        // Nothing to flush is not an error.
        s.flush_ranges(&[]).expect("empty");
    }

    #[test]
    fn a_new_nvram_file_is_allocated_zeroed_and_private() {
        let dir = std::env::temp_dir().join(format!("nvm-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("nv");
        let (s, opened) = MmapStorage::open(&path, 1 << 20).expect("open");
        assert_eq!(opened, Opened::Created);
        let mut buf = vec![1u8; 4096];
        s.read_at((1 << 20) - 4096, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.len(), 1 << 20);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Every block allocated (written zeros or fallocate'd), none left as a hole.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 20, "blocks {}", meta.blocks());
        drop(s);
        std::fs::remove_dir_all(&dir).ok();
    }
}
