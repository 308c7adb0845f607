//! The identity of a backing volume: a random id kept in the xattr `trusted.nvmirror.volume`
//! of its root directory, created at its first mount. The destination records which volume
//! its image mirrors and refuses another (a wrong `--backing`, a new empty directory) unless
//! the operator asks for a new baseline. The xattr travels with the volume: a baseline copies
//! it to the image, so a promoted image carries the same identity.
//!
//! The mount hides `trusted.nvmirror.*` from its clients: they can neither read nor change it.

use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// The xattr on the backing root that holds the volume's id.
pub const XATTR: &str = "trusted.nvmirror.volume";

/// Prefix of the xattr names reserved for nvmirror (hidden from the mount's clients).
pub const RESERVED_PREFIX: &[u8] = proto::apply::RESERVED_XATTR_PREFIX;

/// A new random id: 128 bits as hex.
fn new_id() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for a volume id")?;
    Ok(b.iter().map(|c| format!("{c:02x}")).collect())
}

/// The id of the volume rooted at `backing`, created if it has none. Returns (id, created).
pub fn volume_id(backing: &Path) -> anyhow::Result<(String, bool)> {
    let mut buf = [0u8; 128];
    match rustix::fs::getxattr(backing, XATTR, &mut buf[..]) {
        Ok(n) => {
            let id = std::str::from_utf8(&buf[..n])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_hexdigit()))
                .with_context(|| {
                    format!(
                        "{} carries a malformed volume id in {XATTR}",
                        backing.display()
                    )
                })?;
            Ok((id.to_string(), false))
        }
        Err(rustix::io::Errno::NODATA) => {
            let id = new_id()?;
            rustix::fs::setxattr(
                backing,
                XATTR,
                id.as_bytes(),
                rustix::fs::XattrFlags::CREATE,
            )
            .with_context(|| {
                format!(
                    "cannot store the volume id in {XATTR} of {} (the backing filesystem must \
                     support trusted.* extended attributes, and fs-source must run as root)",
                    backing.display()
                )
            })?;
            Ok((id, true))
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot read the volume id ({XATTR}) of {} (the backing filesystem must support \
                 trusted.* extended attributes, and fs-source must run as root)",
                backing.display()
            )
        }),
    }
}
