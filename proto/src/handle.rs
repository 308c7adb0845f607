//! File handles (`name_to_handle_at(2)`): the identity of an inode that survives a remount and
//! outlives its names.
//!
//! The source stamps every record that changes a file's content with the handle of the inode
//! it wrote. After a power cut, start-up recovery re-applies those records through
//! `open_by_handle_at(2)`: to the very inode they wrote, wherever renames have since moved it,
//! and not at all when it no longer exists (`ESTALE`). A handle holds the inode's generation,
//! so a new file that reuses the inode number is never mistaken for the old one. See
//! [`crate::replay`].

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use rustix::fs::OFlags;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// Largest handle the kernel hands out (`MAX_HANDLE_SZ`).
const MAX_HANDLE_BYTES: usize = 128;

/// An opaque file handle: the handle type (4 bytes, little endian) then the handle bytes. Empty
/// when unknown (a filesystem without handles, or a record that needs none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Handle(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Handle {
    /// No handle.
    pub fn none() -> Handle {
        Handle(Vec::new())
    }

    /// True when there is no handle.
    pub fn is_none(&self) -> bool {
        self.0.len() < 4
    }

    /// The handle of the inode `fd` refers to. `Handle::none()` when the filesystem has none
    /// (the records then fall back to their paths at recovery).
    pub fn of(fd: impl AsFd) -> Handle {
        #[repr(C)]
        struct Buf {
            handle_bytes: libc::c_uint,
            handle_type: libc::c_int,
            f_handle: [u8; MAX_HANDLE_BYTES],
        }
        let mut buf = Buf {
            handle_bytes: MAX_HANDLE_BYTES as libc::c_uint,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_BYTES],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `buf` is a `struct file_handle` with room for MAX_HANDLE_BYTES bytes, as
        // `handle_bytes` tells the kernel; the path is a NUL-terminated empty string and
        // AT_EMPTY_PATH makes the call act on `fd` itself; `mount_id` is a valid out pointer.
        let rc = unsafe {
            libc::name_to_handle_at(
                fd.as_fd().as_raw_fd(),
                c"".as_ptr(),
                (&mut buf as *mut Buf).cast::<libc::file_handle>(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        };
        let len = buf.handle_bytes as usize;
        if rc != 0 || len > MAX_HANDLE_BYTES {
            return Handle::none();
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&buf.handle_type.to_le_bytes());
        out.extend_from_slice(&buf.f_handle[..len]);
        Handle(out)
    }

    /// Open the inode this handle names, on the filesystem of `mount_fd`, with `flags`
    /// (`O_NOFOLLOW | O_CLOEXEC` added). `ESTALE` when it no longer exists. Needs
    /// CAP_DAC_READ_SEARCH, which the daemons have as root.
    pub fn open(&self, mount_fd: impl AsFd, flags: OFlags) -> Result<OwnedFd, Errno> {
        if self.is_none() || self.0.len() - 4 > MAX_HANDLE_BYTES {
            return Err(Errno::STALE);
        }
        #[repr(C)]
        struct Buf {
            handle_bytes: libc::c_uint,
            handle_type: libc::c_int,
            f_handle: [u8; MAX_HANDLE_BYTES],
        }
        let bytes = &self.0[4..];
        let mut buf = Buf {
            handle_bytes: bytes.len() as libc::c_uint,
            handle_type: i32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]),
            f_handle: [0; MAX_HANDLE_BYTES],
        };
        buf.f_handle[..bytes.len()].copy_from_slice(bytes);
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // SAFETY: `buf` is a `struct file_handle` whose `handle_bytes` matches the bytes
        // copied into it; the kernel only reads it.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd.as_fd().as_raw_fd(),
                (&mut buf as *mut Buf).cast::<libc::file_handle>(),
                flags.bits() as libc::c_int,
            )
        };
        if fd < 0 {
            return Err(Errno::from_raw_os_error(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ));
        }
        // SAFETY: `fd` was just returned by open_by_handle_at and is owned by no one else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_reopens_its_inode_after_a_rename_and_goes_stale_when_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"one").unwrap();
        let f = std::fs::File::open(&a).unwrap();
        let h = Handle::of(&f);
        drop(f);
        if h.is_none() {
            eprintln!("no file handles on this filesystem; skipped");
            return;
        }
        let path_fd = rustix::fs::open(&a, OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        assert_eq!(
            Handle::of(&path_fd),
            h,
            "an O_PATH descriptor gives the same handle"
        );
        drop(path_fd);
        let root = std::fs::File::open(dir.path()).unwrap();
        std::fs::rename(&a, dir.path().join("b")).unwrap();
        let fd = h.open(&root, OFlags::RDONLY).unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        assert_eq!(st.st_size, 3);
        drop(fd);
        std::fs::remove_file(dir.path().join("b")).unwrap();
        assert_eq!(h.open(&root, OFlags::RDONLY).unwrap_err(), Errno::STALE);
        assert_eq!(
            Handle::none().open(&root, OFlags::RDONLY).unwrap_err(),
            Errno::STALE
        );
    }
}
