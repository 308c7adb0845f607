//! What a filesystem must offer to hold an nvmirror tree (an image, a backing volume), checked
//! by trying each thing in a scratch directory; and, for filesystems whose `syncfs` does not
//! make data durable (FUSE), the paths a CP must `fsync` one by one instead.
//!
//! docs/image-filesystems.md lists the requirements, what each filesystem tested offers, and
//! what happens where one is missing.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, RenameFlags, ResolveFlags, XattrFlags};
use rustix::io::Errno;
use thiserror::Error;

use crate::apply::Tree;
use crate::record::Op;

/// `statfs` magic of FUSE filesystems (GlusterFS's client among them).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Name of the scratch directory [`probe`] makes (and removes) in the directory it checks.
pub const PROBE_DIR: &str = ".nvmirror-probe";

/// What a filesystem offers; `true` when it works.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The filesystem's name (from `statfs`'s magic number).
    pub fs_type: String,
    /// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`.
    pub openat2: bool,
    /// `renameat2(RENAME_NOREPLACE)`.
    pub rename_noreplace: bool,
    /// `renameat2(RENAME_EXCHANGE)`.
    pub rename_exchange: bool,
    /// `user.*` xattrs on regular files.
    pub user_xattrs: bool,
    /// `trusted.*` xattrs on directories (the replay marker, the volume identity).
    pub trusted_xattrs: bool,
    /// Hard links (`linkat`) that share one inode.
    pub hard_links: bool,
    /// `mknodat` of a FIFO and of a character device.
    pub mknod: bool,
    /// `O_TMPFILE` (not used by nvmirror; reported for completeness).
    pub o_tmpfile: bool,
    /// `name_to_handle_at` (used on the source's backing volume only).
    pub file_handles: bool,
    /// `syncfs` succeeds.
    pub syncfs: bool,
    /// `syncfs` makes the data durable (false on FUSE, whose `syncfs` only writes the kernel's
    /// dirty pages to the server without asking it to flush).
    pub syncfs_durable: bool,
}

/// Something a filesystem lacks, and what that costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What is missing.
    pub what: &'static str,
    /// What happens without it.
    pub consequence: &'static str,
    /// True when no correct image can be kept without it.
    pub fatal: bool,
}

impl Capabilities {
    /// Everything missing for holding an image (the destination's view: file handles are not
    /// needed there).
    pub fn missing_for_image(&self) -> Vec<Missing> {
        let mut out = Vec::new();
        let mut add = |ok: bool, what, consequence, fatal| {
            if !ok {
                out.push(Missing {
                    what,
                    consequence,
                    fatal,
                });
            }
        };
        add(
            self.openat2,
            "openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS",
            "no record can be confined beneath the image",
            true,
        );
        add(
            self.trusted_xattrs,
            "trusted.* xattrs",
            "the replay marker cannot be kept, so no CP can complete",
            true,
        );
        add(
            self.hard_links,
            "hard links",
            "hard-linked files cannot be mirrored",
            true,
        );
        add(
            self.syncfs,
            "syncfs",
            "no CP can make the image durable",
            true,
        );
        add(
            self.rename_noreplace && self.rename_exchange,
            "renameat2 RENAME_NOREPLACE/RENAME_EXCHANGE",
            "emulated with plain renames (the CP is the image's only writer); an exchange is \
             not atomic: browse may see one name missing for a moment, and a crash between its \
             renames is finished by the next CP",
            false,
        );
        add(
            self.syncfs_durable,
            "a durable syncfs (FUSE)",
            "each CP fsyncs every file and directory its records touched instead: slower CPs",
            false,
        );
        add(
            self.user_xattrs,
            "user.* xattrs",
            "files with xattrs stay out of sync",
            false,
        );
        add(
            self.mknod,
            "mknod (FIFOs, device nodes)",
            "FIFOs and device nodes stay out of sync",
            false,
        );
        out
    }
}

/// Why [`probe`] could not check.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// The scratch directory could not be made, used or removed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The name of a filesystem type from its `statfs` magic.
fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x794C_7630 => "overlayfs".into(),
        FUSE_SUPER_MAGIC => "fuse".into(),
        m => format!("0x{m:x}"),
    }
}

fn magic_of(fd: impl AsFd) -> Result<i64, Errno> {
    // `f_type`'s type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(fd).map(|s| s.f_type as i64)
}

/// True unless `fd` is on a filesystem whose `syncfs` does not reach stable storage (FUSE).
/// Where it cannot tell, says durable.
pub fn syncfs_durable(fd: impl AsFd) -> bool {
    !magic_of(fd).is_ok_and(|m| m == FUSE_SUPER_MAGIC)
}

/// Try, in a scratch directory [`PROBE_DIR`] inside `dir` (removed before and after), each
/// thing a tree needs. Needs root for `trusted.*` xattrs and device nodes.
pub fn probe(dir: &Path) -> Result<Capabilities, ProbeError> {
    let scratch = dir.join(PROBE_DIR);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| ProbeError::Io { what, path, source }
    };
    match std::fs::remove_dir_all(&scratch) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("cannot remove", &scratch)(e))
        }
        _ => {}
    }
    std::fs::create_dir(&scratch).map_err(io("cannot create", &scratch))?;
    let caps = probe_in(&scratch);
    std::fs::remove_dir_all(&scratch).map_err(io("cannot remove", &scratch))?;
    caps.map_err(io("cannot probe in", &scratch))
}

fn probe_in(scratch: &Path) -> Result<Capabilities, std::io::Error> {
    let d = rustix::fs::open(
        scratch,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let name = |s: &str| OsStr::from_bytes(s.as_bytes()).to_owned();
    let mut c = Capabilities {
        fs_type: fs_name(magic_of(&d)?),
        syncfs_durable: syncfs_durable(&d),
        ..Capabilities::default()
    };
    for f in ["a", "b"] {
        std::fs::write(scratch.join(f), f)?;
    }
    c.openat2 = rustix::fs::openat2(
        &d,
        name("a"),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .is_ok();
    c.rename_noreplace =
        rustix::fs::renameat_with(&d, name("a"), &d, name("c"), RenameFlags::NOREPLACE).is_ok();
    let a = if c.rename_noreplace { "c" } else { "a" };
    c.rename_exchange =
        rustix::fs::renameat_with(&d, name(a), &d, name("b"), RenameFlags::EXCHANGE).is_ok()
            && std::fs::read(scratch.join("b"))? == b"a";
    let file = scratch.join("b");
    c.user_xattrs = rustix::fs::setxattr(&file, "user.nvmirror-probe", b"1", XattrFlags::empty())
        .is_ok()
        && rustix::fs::getxattr(&file, "user.nvmirror-probe", &mut [0u8; 4][..]) == Ok(1);
    c.trusted_xattrs =
        rustix::fs::fsetxattr(&d, "trusted.nvmirror.probe", b"1", XattrFlags::empty()).is_ok()
            && rustix::fs::fgetxattr(&d, "trusted.nvmirror.probe", &mut [0u8; 4][..]) == Ok(1);
    c.hard_links = std::fs::hard_link(&file, scratch.join("link")).is_ok()
        && rustix::fs::stat(&file).is_ok_and(|st| st.st_nlink == 2);
    c.mknod = rustix::fs::mknodat(
        &d,
        name("fifo"),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .is_ok()
        && rustix::fs::mknodat(
            &d,
            name("null"),
            rustix::fs::FileType::CharacterDevice,
            Mode::from_raw_mode(0o600),
            rustix::fs::makedev(1, 3),
        )
        .is_ok();
    c.o_tmpfile = rustix::fs::openat(
        &d,
        ".",
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .is_ok();
    let fd = rustix::fs::open(&file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    c.file_handles = !crate::handle::Handle::of(&fd).is_none();
    c.syncfs = rustix::fs::syncfs(&d).is_ok();
    Ok(c)
}

/// The paths a CP's records touched, followed through later renames, so that on a filesystem
/// without a durable `syncfs` each can be `fsync`ed at the end of the CP (see
/// [`Touched::fsync_all`]).
#[derive(Debug, Default)]
pub struct Touched {
    paths: BTreeSet<Vec<u8>>,
}

fn parent_of(p: &[u8]) -> &[u8] {
    crate::path::split_last(p).map_or(&b""[..], |(parent, _)| parent)
}

/// `p` with its prefix `from` replaced by `to`, when `p` is `from` or beneath it.
fn moved(p: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    if p == from {
        return Some(to.to_vec());
    }
    let rest = p.strip_prefix(from)?;
    (!from.is_empty() && rest.first() == Some(&b'/')).then(|| [to, rest].concat())
}

impl Touched {
    /// Note the paths `op` changes (and their parent directories). A rename moves the paths
    /// noted beneath its source (and, for an exchange, beneath its target) along.
    pub fn note(&mut self, op: &Op) {
        if let Op::Rename {
            from, to, flags, ..
        } = op
        {
            let exchange = flags & libc::RENAME_EXCHANGE != 0;
            let old = std::mem::take(&mut self.paths);
            for p in old {
                let now = moved(&p, from, to)
                    .or_else(|| exchange.then(|| moved(&p, to, from)).flatten())
                    .unwrap_or(p);
                self.paths.insert(now);
            }
        }
        for p in op.paths() {
            self.paths.insert(p.to_vec());
            self.paths.insert(parent_of(p).to_vec());
        }
    }

    /// How many paths are noted.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// True when nothing is noted.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// `fsync` every noted path that is now a regular file or a directory of `tree`
    /// (symlinks, FIFOs and devices are covered by their directory's `fsync`); paths gone
    /// since are passed over. Returns how many were synced.
    pub fn fsync_all(&self, tree: &Tree) -> Result<usize, (Vec<u8>, Errno)> {
        let mut n = 0;
        for p in &self.paths {
            let fd = match tree.open_at(p, OFlags::PATH) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => continue,
                Err(e) => return Err((p.clone(), e)),
            };
            let st = rustix::fs::fstat(&fd).map_err(|e| (p.clone(), e))?;
            let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
            let flags = match kind {
                rustix::fs::FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
                rustix::fs::FileType::RegularFile => OFlags::RDONLY,
                _ => continue,
            };
            let real = match tree.open_at(p, flags) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err((p.clone(), e)),
            };
            rustix::fs::fsync(&real).map_err(|e| (p.clone(), e))?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_paths_follow_renames() {
        let mut t = Touched::default();
        t.note(&Op::Unlink {
            path: b"a/f".to_vec(),
        });
        t.note(&Op::Rename {
            from: b"a".to_vec(),
            to: b"b".to_vec(),
            flags: 0,
            handle: crate::handle::Handle::none(),
        });
        let paths: Vec<_> = t.paths.iter().cloned().collect();
        assert!(paths.contains(&b"b/f".to_vec()), "{paths:?}");
        assert!(!paths.contains(&b"a/f".to_vec()));
        assert_eq!(moved(b"ab", b"a", b"x"), None);
        assert_eq!(moved(b"a/b", b"a", b"x"), Some(b"x/b".to_vec()));
    }

    #[test]
    fn probe_finds_what_a_local_filesystem_offers() {
        let d = tempfile::tempdir().unwrap();
        let c = probe(d.path()).unwrap();
        assert!(c.openat2 && c.hard_links && c.syncfs, "{c:?}");
        assert!(!d.path().join(PROBE_DIR).exists());
    }
}
