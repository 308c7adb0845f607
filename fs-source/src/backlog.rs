//! The backlog: records the destination has not acknowledged, moved out of NVRAM so that its
//! partitions can be reused while the source runs alone (policy `sync`, destination away).
//!
//! ```text
//! file = header (16 bytes: magic "NVBKLG01", 8 reserved) | frames back to back
//! ```
//! Frames are stored exactly as logged (each with its own length and CRC32C), appended and
//! fdatasync'ed before the partition they came from is freed. On reconnect they are resent
//! before the NVLOG's frames; once the destination has acknowledged them all, the file is
//! truncated back to its header. A torn tail (crash while spilling) is dropped at start-up:
//! the partition it came from was not freed yet, so its frames are still in NVRAM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proto::frame;

const MAGIC: &[u8; 8] = b"NVBKLG01";
const HEADER_LEN: u64 = 16;

/// Why the backlog file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("backlog file {path}: {what}: {source}")]
pub struct BacklogError {
    path: PathBuf,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// The backlog file and what it holds.
#[derive(Debug)]
pub struct Backlog {
    file: File,
    path: PathBuf,
    /// Number of records in the file.
    pub records: u64,
    /// Bytes of records in the file.
    pub bytes: u64,
    /// Lowest and highest sequence number held.
    pub first_seq: Option<u64>,
    /// Highest sequence number held.
    pub last_seq: Option<u64>,
}

impl Backlog {
    /// Open (or create) the backlog at `path` and index what it holds.
    pub fn open(path: &Path) -> Result<Backlog, BacklogError> {
        let err = |what, source| BacklogError {
            path: path.to_path_buf(),
            what,
            source,
        };
        // Records hold file names and contents: owner-only whatever the umask, and a file an
        // older version left readable by others is tightened.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| err("cannot open", e))?;
        let mode = file
            .metadata()
            .map_err(|e| err("cannot stat", e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err("cannot set mode 0600", e))?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| err("cannot read", e))?;
        let mut b = Backlog {
            file,
            path: path.to_path_buf(),
            records: 0,
            bytes: 0,
            first_seq: None,
            last_seq: None,
        };
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            if bytes.len() >= 8 && &bytes[..8] != MAGIC && bytes.iter().any(|&x| x != 0) {
                return Err(err(
                    "not an nvmirror backlog (bad magic at offset 0)",
                    std::io::Error::from(std::io::ErrorKind::InvalidData),
                ));
            }
            b.reset()?;
            return Ok(b);
        }
        let mut off = HEADER_LEN as usize;
        for f in frame::split(&bytes[off..]) {
            match f {
                Ok(f) => {
                    b.note(f.header.seq, f.bytes.len());
                    off += f.bytes.len();
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), offset = off, "backlog: dropped a torn tail ({e})");
                    break;
                }
            }
        }
        b.file
            .set_len(off as u64)
            .map_err(|e| err("cannot truncate", e))?;
        b.file
            .seek(SeekFrom::End(0))
            .map_err(|e| err("cannot seek", e))?;
        Ok(b)
    }

    fn note(&mut self, seq: u64, len: usize) {
        self.records += 1;
        self.bytes += len as u64;
        self.first_seq.get_or_insert(seq);
        self.last_seq = Some(seq);
    }

    /// Append frames (in sequence order, following what is held) and make them durable.
    pub fn append(&mut self, frames: &[Vec<u8>]) -> Result<(), BacklogError> {
        let err = |what, source| BacklogError {
            path: self.path.clone(),
            what,
            source,
        };
        for f in frames {
            self.file.write_all(f).map_err(|e| err("cannot write", e))?;
        }
        self.file.sync_data().map_err(|e| err("cannot sync", e))?;
        for f in frames {
            if let Ok(d) = frame::decode(f) {
                self.note(d.header.seq, f.len());
            }
        }
        Ok(())
    }

    /// Every frame held with a sequence number above `after`.
    pub fn frames_after(&mut self, after: u64) -> Result<Vec<(u64, Bytes)>, BacklogError> {
        if self.records == 0 {
            return Ok(Vec::new());
        }
        let mut bytes = Vec::new();
        let mut f = self.file.try_clone().map_err(|e| BacklogError {
            path: self.path.clone(),
            what: "cannot reopen",
            source: e,
        })?;
        f.seek(SeekFrom::Start(HEADER_LEN))
            .and_then(|_| f.read_to_end(&mut bytes))
            .map_err(|e| BacklogError {
                path: self.path.clone(),
                what: "cannot read",
                source: e,
            })?;
        let mut out = Vec::new();
        for fr in frame::split(&bytes).flatten() {
            if fr.header.seq > after {
                out.push((fr.header.seq, Bytes::copy_from_slice(fr.bytes)));
            }
        }
        Ok(out)
    }

    /// Empty the file (everything in it is acknowledged).
    pub fn reset(&mut self) -> Result<(), BacklogError> {
        let err = |what, source| BacklogError {
            path: self.path.clone(),
            what,
            source,
        };
        self.file
            .set_len(0)
            .map_err(|e| err("cannot truncate", e))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| err("cannot seek", e))?;
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(MAGIC);
        self.file
            .write_all(&h)
            .map_err(|e| err("cannot write", e))?;
        self.file.sync_data().map_err(|e| err("cannot sync", e))?;
        self.records = 0;
        self.bytes = 0;
        self.first_seq = None;
        self.last_seq = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fr(seq: u64) -> Vec<u8> {
        frame::encode(seq, 1, 0, frame::KIND_RECORD, 0, &[seq as u8; 40]).expect("frame")
    }

    #[test]
    fn append_reopen_and_torn_tail() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("b");
        let mut b = Backlog::open(&p).expect("open");
        b.append(&[fr(5), fr(6), fr(7)]).expect("append");
        drop(b);
        // A torn last frame is dropped on reopen.
        let len = std::fs::metadata(&p).expect("stat").len();
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.set_len(len - 3).expect("truncate");
        let mut b = Backlog::open(&p).expect("reopen");
        assert_eq!((b.records, b.first_seq, b.last_seq), (2, Some(5), Some(6)));
        let after: Vec<u64> = b
            .frames_after(5)
            .expect("read")
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(after, vec![6]);
        b.reset().expect("reset");
        assert_eq!(Backlog::open(&p).expect("reopen").records, 0);
    }
}
