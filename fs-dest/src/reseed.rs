//! `fs-dest reseed`: failback's reverse resync. Makes a directory tree (the old source's
//! backing directory) equal to another (the promoted volume), copying only what differs.
//!
//! Both trees are walked together, without following symlinks. Per name:
//!
//! * same type, and for regular files the same size, mtime, link count and content (compared
//!   byte for byte: locally that costs what hashing both sides would, and it is exact) → only
//!   the metadata that differs is set (mode, owner, `user.*` xattrs, times), nothing copied;
//! * a regular file that differs is copied into a temporary file beside it and renamed over the
//!   old one (a new inode: a hard link the target had to another name is not written through);
//! * a type mismatch replaces the target entry (a directory recursively);
//! * names only in the target are deleted;
//! * hard links: the second and later names of an inode of the source tree become hard links to
//!   the target's first name of that group; symlinks get the same target; FIFOs, sockets and
//!   device nodes are made with mknod and the same device number.
//!
//! Directory metadata (mtime last) is set after the directory's content. With `dry_run` nothing
//! is changed and every action is only reported.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, CWD};

/// What to reseed.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tree to copy from (the promoted volume).
    pub from: PathBuf,
    /// The tree to make equal to it (the old source's backing directory).
    pub to: PathBuf,
    /// Report only.
    pub dry_run: bool,
    /// Report every action.
    pub verbose: bool,
}

/// What a reseed did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Regular files copied.
    pub files_copied: u64,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Directories, symlinks, hard links and special files created.
    pub created: u64,
    /// Entries whose metadata only was updated.
    pub metadata_updated: u64,
    /// Entries deleted from the target (a directory counts once).
    pub deleted: u64,
    /// Entries already equal.
    pub skipped: u64,
    /// Bytes of regular files compared and found equal.
    pub bytes_skipped: u64,
}

/// Why a reseed stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The two trees overlap.
    #[error("{from} and {to} overlap: the target must be outside the source tree and vice versa")]
    Overlap {
        /// --from.
        from: PathBuf,
        /// --to.
        to: PathBuf,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReseedError + 'a {
    move |source| ReseedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn rio<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> ReseedError + 'a {
    move |e| ReseedError::Io {
        what,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Total bytes of regular files under `root` (for the progress bar).
pub fn total_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// An xattr to set (`Some(value)`) or remove (`None`).
type XattrChange = (OsString, Option<Vec<u8>>);

struct Walk<'a> {
    opts: &'a Options,
    summary: Summary,
    /// (dev, ino) in the source tree → the target path of the group's first name.
    /// First name (target path, path relative to the tree) of each multiply linked inode.
    links: HashMap<(u64, u64), (PathBuf, PathBuf)>,
    progress: &'a mut dyn FnMut(u64),
    out: &'a mut dyn Write,
}

impl Walk<'_> {
    fn report(&mut self, action: &str, rel: &Path, extra: &str) {
        if self.opts.dry_run || self.opts.verbose {
            let _ = writeln!(self.out, "{action} {}{extra}", rel.display());
        }
    }

    fn remove(&mut self, path: &Path, rel: &Path) -> Result<(), ReseedError> {
        self.report("delete", rel, "");
        self.summary.deleted += 1;
        if self.opts.dry_run {
            return Ok(());
        }
        let m = path.symlink_metadata().map_err(io("cannot stat", path))?;
        if m.is_dir() {
            fs::remove_dir_all(path).map_err(io("cannot remove directory", path))
        } else {
            fs::remove_file(path).map_err(io("cannot remove", path))
        }
    }

    fn dir(&mut self, from: &Path, to: &Path, rel: &Path) -> Result<(), ReseedError> {
        let mut names = BTreeSet::new();
        for e in fs::read_dir(from).map_err(io("cannot list", from))? {
            let e = e.map_err(io("cannot list", from))?;
            names.insert(e.file_name());
        }
        // Extras first: a name freed here may be needed below (e.g. a directory became a file).
        if let Ok(rd) = fs::read_dir(to) {
            let extras: Vec<OsString> = rd
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| !names.contains(n))
                .collect();
            for n in extras {
                self.remove(&to.join(&n), &rel.join(&n))?;
            }
        }
        for name in names {
            self.entry(&from.join(&name), &to.join(&name), &rel.join(&name))?;
        }
        Ok(())
    }

    fn entry(&mut self, fp: &Path, tp: &Path, rel: &Path) -> Result<(), ReseedError> {
        let fm = fp.symlink_metadata().map_err(io("cannot stat", fp))?;
        let mut tm = tp.symlink_metadata().ok();
        let ft = fm.file_type();
        let same_type = tm.as_ref().is_some_and(|t| {
            let tt = t.file_type();
            (ft.is_dir() && tt.is_dir())
                || (ft.is_file() && tt.is_file())
                || (ft.is_symlink() && tt.is_symlink())
                || (ft.is_fifo() && tt.is_fifo())
                || (ft.is_socket() && tt.is_socket())
                || ((ft.is_char_device() && tt.is_char_device())
                    || (ft.is_block_device() && tt.is_block_device()))
                    && t.rdev() == fm.rdev()
        });
        if tm.is_some() && !same_type {
            self.remove(tp, rel)?;
            tm = None;
        }
        if ft.is_dir() {
            if tm.is_none() {
                self.report("mkdir", rel, "");
                self.summary.created += 1;
                if !self.opts.dry_run {
                    fs::create_dir(tp).map_err(io("cannot create directory", tp))?;
                }
            }
            if !self.opts.dry_run || tm.is_some() {
                self.dir(fp, tp, rel)?;
            } else {
                // Dry run of a directory missing in the target: everything below is new.
                self.dir(fp, Path::new("/nonexistent/nvmirror-reseed-dry-run"), rel)?;
            }
            return self.metadata(&fm, tp, rel, tm.is_none());
        }
        if ft.is_file() {
            return self.file(fp, &fm, tp, tm, rel);
        }
        if ft.is_symlink() {
            let target = fs::read_link(fp).map_err(io("cannot read link", fp))?;
            let equal = tm.is_some() && fs::read_link(tp).ok().as_ref() == Some(&target);
            if !equal {
                if tm.is_some() {
                    self.remove(tp, rel)?;
                }
                self.report("symlink", rel, &format!(" -> {}", target.display()));
                self.summary.created += 1;
                if !self.opts.dry_run {
                    std::os::unix::fs::symlink(&target, tp)
                        .map_err(io("cannot create symlink", tp))?;
                }
            }
            return self.metadata(&fm, tp, rel, !equal);
        }
        // FIFO, socket, device node.
        if tm.is_none() {
            self.report("mknod", rel, "");
            self.summary.created += 1;
            if !self.opts.dry_run {
                let kind = rustix::fs::FileType::from_raw_mode(fm.mode());
                rustix::fs::mknodat(
                    CWD,
                    tp,
                    kind,
                    Mode::from_raw_mode(fm.mode() & 0o7777),
                    fm.rdev(),
                )
                .map_err(rio("cannot mknod", tp))?;
            }
        }
        self.metadata(&fm, tp, rel, tm.is_none())
    }

    fn file(
        &mut self,
        fp: &Path,
        fm: &Metadata,
        tp: &Path,
        tm: Option<Metadata>,
        rel: &Path,
    ) -> Result<(), ReseedError> {
        let key = (fm.dev(), fm.ino());
        if fm.nlink() > 1 {
            if let Some((first, first_rel)) = self.links.get(&key).cloned() {
                let first_ino = first.symlink_metadata().ok().map(|m| m.ino());
                if tm.as_ref().is_some_and(|t| Some(t.ino()) == first_ino) {
                    self.summary.skipped += 1;
                    return Ok(());
                }
                if tm.is_some() {
                    self.remove(tp, rel)?;
                }
                self.report("link", rel, &format!(" => {}", first_rel.display()));
                self.summary.created += 1;
                if !self.opts.dry_run {
                    fs::hard_link(&first, tp).map_err(io("cannot create hard link", tp))?;
                }
                return Ok(());
            }
            self.links
                .insert(key, (tp.to_path_buf(), rel.to_path_buf()));
        }
        let data_equal = match &tm {
            Some(t) if t.len() == fm.len() && t.nlink() == fm.nlink() => same_content(fp, tp)?,
            _ => false,
        };
        (self.progress)(fm.len());
        if data_equal {
            self.summary.bytes_skipped += fm.len();
            return self.metadata(fm, tp, rel, false);
        }
        self.report("copy", rel, &format!(" ({} bytes)", fm.len()));
        self.summary.files_copied += 1;
        self.summary.bytes_copied += fm.len();
        if self.opts.dry_run {
            return Ok(());
        }
        let parent = tp.parent().unwrap_or(Path::new("."));
        let tmp = parent.join(format!(".nvmirror-reseed.{}.tmp", std::process::id()));
        {
            let mut src = File::open(fp).map_err(io("cannot open", fp))?;
            let mut dst = File::create(&tmp).map_err(io("cannot create", &tmp))?;
            std::io::copy(&mut src, &mut dst).map_err(io("cannot copy into", &tmp))?;
            dst.sync_all().map_err(io("cannot fsync", &tmp))?;
        }
        fs::rename(&tmp, tp).map_err(io("cannot rename into place", tp))?;
        self.metadata(fm, tp, rel, true)
    }

    /// Make owner, mode, `user.*` xattrs and times of `tp` those of `fm` (the source's).
    fn metadata(
        &mut self,
        fm: &Metadata,
        tp: &Path,
        rel: &Path,
        fresh: bool,
    ) -> Result<(), ReseedError> {
        let tm = if self.opts.dry_run {
            tp.symlink_metadata().ok()
        } else {
            Some(tp.symlink_metadata().map_err(io("cannot stat", tp))?)
        };
        let Some(tm) = tm else {
            return Ok(()); // dry run of a new entry: already counted
        };
        let symlink = fm.file_type().is_symlink();
        let owner = tm.uid() != fm.uid() || tm.gid() != fm.gid();
        let mode = !symlink && (tm.mode() & 0o7777) != (fm.mode() & 0o7777);
        let mtime = tm.mtime() != fm.mtime() || tm.mtime_nsec() != fm.mtime_nsec();
        let xattrs = self.xattr_diff(rel, tp)?;
        let changed = owner || mode || mtime || !xattrs.is_empty();
        if !changed {
            if !fresh {
                self.summary.skipped += 1;
            }
            return Ok(());
        }
        if !fresh {
            self.report("meta", rel, "");
            self.summary.metadata_updated += 1;
        }
        if self.opts.dry_run {
            return Ok(());
        }
        if owner {
            std::os::unix::fs::lchown(tp, Some(fm.uid()), Some(fm.gid()))
                .map_err(io("cannot chown", tp))?;
        }
        // After chown, which clears setuid/setgid.
        if !symlink && (owner || mode) {
            fs::set_permissions(tp, fs::Permissions::from_mode(fm.mode() & 0o7777))
                .map_err(io("cannot chmod", tp))?;
        }
        for (name, value) in xattrs {
            match value {
                Some(v) => rustix::fs::lsetxattr(tp, &name, &v, rustix::fs::XattrFlags::empty())
                    .map_err(rio("cannot set xattr on", tp))?,
                None => rustix::fs::lremovexattr(tp, &name)
                    .map_err(rio("cannot remove xattr of", tp))?,
            }
        }
        let ts = Timestamps {
            last_access: Timespec {
                tv_sec: fm.atime(),
                tv_nsec: fm.atime_nsec() as _,
            },
            last_modification: Timespec {
                tv_sec: fm.mtime(),
                tv_nsec: fm.mtime_nsec() as _,
            },
        };
        rustix::fs::utimensat(CWD, tp, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(rio("cannot set times of", tp))?;
        Ok(())
    }

    /// The `user.*` xattrs to set (`Some`) or remove (`None`) on `tp` to match the source entry
    /// at `rel`.
    fn xattr_diff(&self, rel: &Path, tp: &Path) -> Result<Vec<XattrChange>, ReseedError> {
        let fp = self.opts.from.join(rel);
        let want = user_xattrs(&fp)?;
        let have = user_xattrs(tp).unwrap_or_default();
        let mut out = Vec::new();
        for (n, v) in &want {
            if have.get(n) != Some(v) {
                out.push((n.clone(), Some(v.clone())));
            }
        }
        for n in have.keys() {
            if !want.contains_key(n) {
                out.push((n.clone(), None));
            }
        }
        Ok(out)
    }
}

fn user_xattrs(p: &Path) -> Result<HashMap<OsString, Vec<u8>>, ReseedError> {
    let mut out = HashMap::new();
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(p, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(rio("cannot list xattrs of", p)(e)),
    };
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let name = std::ffi::OsStr::from_bytes(name).to_os_string();
        let mut v = vec![0u8; 65536];
        let len =
            rustix::fs::lgetxattr(p, &name, &mut v[..]).map_err(rio("cannot read xattr of", p))?;
        v.truncate(len);
        out.insert(name, v);
    }
    Ok(out)
}

fn same_content(a: &Path, b: &Path) -> Result<bool, ReseedError> {
    let mut fa = File::open(a).map_err(io("cannot open", a))?;
    let mut fb = File::open(b).map_err(io("cannot open", b))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(io("cannot read", a))?;
        let nb = read_full(&mut fb, &mut bb).map_err(io("cannot read", b))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Make `opts.to` equal to `opts.from`. `progress` gets the bytes of each regular file handled;
/// actions are reported on `out` (with `dry_run` or `verbose`).
pub fn reseed(
    opts: &Options,
    progress: &mut dyn FnMut(u64),
    out: &mut dyn Write,
) -> Result<Summary, ReseedError> {
    let from = fs::canonicalize(&opts.from).map_err(io("cannot open", &opts.from))?;
    if !opts.to.exists() && !opts.dry_run {
        fs::create_dir_all(&opts.to).map_err(io("cannot create", &opts.to))?;
    }
    let to = fs::canonicalize(&opts.to).unwrap_or_else(|_| opts.to.clone());
    if from.starts_with(&to) || to.starts_with(&from) {
        return Err(ReseedError::Overlap { from, to });
    }
    let fm = from.symlink_metadata().map_err(io("cannot stat", &from))?;
    let mut walk = Walk {
        opts,
        summary: Summary::default(),
        links: HashMap::new(),
        progress,
        out,
    };
    let rel = Path::new("");
    if to.is_dir() {
        walk.dir(&from, &to, rel)?;
        walk.metadata(&fm, &to, Path::new("."), false)?;
    } else {
        walk.dir(
            &from,
            Path::new("/nonexistent/nvmirror-reseed-dry-run"),
            rel,
        )?;
    }
    Ok(walk.summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(from: &Path, to: &Path, dry_run: bool) -> Summary {
        let opts = Options {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            dry_run,
            verbose: false,
        };
        reseed(&opts, &mut |_| {}, &mut std::io::sink()).unwrap()
    }

    #[test]
    fn copies_only_what_differs_and_keeps_structure() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (a, b) = (a.path(), b.path());
        fs::create_dir(a.join("d")).unwrap();
        fs::write(a.join("d/same"), b"same").unwrap();
        fs::write(a.join("changed"), b"new content").unwrap();
        fs::write(a.join("big"), vec![7u8; 100_000]).unwrap();
        fs::hard_link(a.join("big"), a.join("d/big.link")).unwrap();
        std::os::unix::fs::symlink("d/same", a.join("sym")).unwrap();
        rustix::fs::mknodat(
            CWD,
            a.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        // The target: one file equal, one different, one extra, a dir where a file should be.
        let first = run(a, b, false);
        assert_eq!(first.files_copied, 3, "{first:?}");
        fs::write(b.join("extra"), b"x").unwrap();
        fs::write(a.join("changed"), b"newer content!").unwrap();
        let second = run(a, b, false);
        assert_eq!(second.files_copied, 1, "{second:?}");
        assert_eq!(second.deleted, 1, "{second:?}");
        assert!(!b.join("extra").exists());
        assert_eq!(fs::read(b.join("changed")).unwrap(), b"newer content!");
        let big = b.join("big").metadata().unwrap();
        let link = b.join("d/big.link").metadata().unwrap();
        assert_eq!(big.ino(), link.ino(), "hard link kept");
        assert_eq!(fs::read_link(b.join("sym")).unwrap(), Path::new("d/same"));
        assert!(b
            .join("fifo")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_fifo());
        let third = run(a, b, true);
        assert_eq!(
            (
                third.files_copied,
                third.deleted,
                third.created,
                third.metadata_updated
            ),
            (0, 0, 0, 0),
            "{third:?}"
        );
    }

    #[test]
    fn dry_run_changes_nothing() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::write(a.path().join("f"), b"1").unwrap();
        fs::write(b.path().join("g"), b"2").unwrap();
        let s = run(a.path(), b.path(), true);
        assert_eq!((s.files_copied, s.deleted), (1, 1));
        assert!(b.path().join("g").exists());
        assert!(!b.path().join("f").exists());
    }
}
