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
    /// A human-readable name (the file path) for error messages.
    fn describe(&self) -> String;
}

/// NVRAM as a memory-mapped file.
pub struct MmapStorage {
    map: memmap2::MmapRaw,
    path: PathBuf,
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
        let opened = if existing == 0 {
            // Allocate the blocks now (not by writing zeros: pre-zeroing with large writes
            // makes every later msync write ~1 MiB, see machine-facts).
            if let Err(e) =
                rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len as u64)
            {
                if e != rustix::io::Errno::OPNOTSUPP {
                    return Err(ctx(e.into(), "cannot allocate"));
                }
                file.set_len(len as u64)
                    .map_err(|e| ctx(e, "cannot size"))?;
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
        if len == 0 {
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
