//! Mount safety: what is at the mount point before `fs-source mount` puts a filesystem there.
//!
//! A mount point that is already a mount is refused: stacking a second `fs-source` on a live
//! one would hide it and take its control socket, and stopping the second would take the first
//! down. A mount point whose FUSE daemon is gone ("Transport endpoint is not connected", what a
//! killed `fs-source` leaves) is detached with a message, so the next mount just works.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One line of `/proc/self/mountinfo` that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Where.
    pub mount_point: PathBuf,
    /// Filesystem type (`fuse.nvmirror`, `ext4`...).
    pub fstype: String,
    /// What is mounted (the FUSE fsname, a device...).
    pub source: String,
}

/// Parse `/proc/self/mountinfo` text (octal escapes in paths decoded).
pub fn parse_mountinfo(text: &str) -> Vec<Mounted> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(Mounted {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// Make `mountpoint` ready for a new mount, or say why it is not.
pub fn prepare(mountpoint: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH).with_context(
                || format!("detaching the stale mount on {}", mountpoint.display()),
            )?;
            tracing::warn!(
                mountpoint = %mountpoint.display(),
                "found a stale mount whose fs-source is gone (killed?) and detached it"
            );
        }
        Err(e) => {
            return Err(e).with_context(|| format!("mount point {}", mountpoint.display()));
        }
        Ok(md) if !md.is_dir() => bail!("mount point {} is not a directory", mountpoint.display()),
        Ok(_) => {}
    }
    let canonical = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(m) = parse_mountinfo(&info)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == canonical)
    {
        bail!(
            "{} is already a mount point ({} {}); refusing to mount over it (a second fs-source \
             there would hide the first and take over its control socket). Unmount it first",
            mountpoint.display(),
            m.fstype,
            m.source
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_point_type_and_source() {
        let text =
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.nvmirror nvmirror:alpha rw\n\
                    37 35 98:1 / /srv ro shared:2 - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, "fuse.nvmirror");
        assert_eq!(m[0].source, "nvmirror:alpha");
        assert_eq!(m[1].mount_point, PathBuf::from("/srv"));
    }
}
