//! Errors of the source daemon, and the one place that decides which errno a FUSE client sees.

use rustix::io::Errno;
use thiserror::Error;

/// Why a filesystem operation failed.
#[derive(Debug, Error)]
pub enum FsError {
    /// The backing directory refused (ENOENT, EEXIST, EACCES, ENOSPC...): passed through.
    #[error("backing directory: {0}")]
    Backing(Errno),
    /// The kernel asked about an inode or handle this daemon does not know.
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    /// Unknown file handle.
    #[error("unknown file handle {0}")]
    UnknownHandle(u64),
    /// The record is larger than a whole NVLOG partition.
    #[error("operation of {0} bytes does not fit in an NVLOG partition")]
    TooLarge(usize),
    /// The mirror could not make the operation durable on both sides.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
}

/// Why the mirror pipeline failed an operation.
#[derive(Debug, Error)]
pub enum MirrorError {
    /// Writing or flushing the local NVRAM failed.
    #[error("NVRAM: {0}")]
    Nvram(#[from] proto::NvLogError),
    /// msync failed.
    #[error("NVRAM flush: {0}")]
    Flush(#[from] std::io::Error),
    /// Policy `strict` and the destination did not acknowledge within the timeout.
    #[error("destination did not acknowledge within {0:?} (policy strict)")]
    NotMirrored(std::time::Duration),
    /// Policy `strict` and the link stayed down for the timeout: the operation was refused
    /// before it was logged or applied.
    #[error("the link to the destination is down and did not come back within {0:?} (policy strict); nothing was done")]
    LinkDown(std::time::Duration),
    /// The mirror was refused by the destination (fenced, bad certificate...).
    #[error("mirror stopped: {0}")]
    Stopped(String),
}

impl From<Errno> for FsError {
    fn from(e: Errno) -> Self {
        FsError::Backing(e)
    }
}

impl FsError {
    /// The errno for the FUSE reply. Exhaustive on purpose: a new failure must be mapped here.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Backing(e) => e.raw_os_error(),
            FsError::UnknownInode(_) => libc::ENOENT,
            FsError::UnknownHandle(_) => libc::EBADF,
            FsError::TooLarge(_) => libc::E2BIG,
            FsError::Mirror(m) => match m {
                MirrorError::Nvram(_) | MirrorError::Flush(_) => libc::EIO,
                MirrorError::NotMirrored(_) | MirrorError::LinkDown(_) => libc::EIO,
                MirrorError::Stopped(_) => libc::EIO,
            },
        }
    }

    /// Whether the failure is an expected answer (ENOENT on lookup...) rather than a fault, so
    /// it is logged at debug level only.
    pub fn is_expected(&self) -> bool {
        matches!(self, FsError::Backing(_) | FsError::UnknownInode(_))
    }
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, FsError>;
