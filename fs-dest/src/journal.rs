//! Journal files: one per source per source-NVLOG partition, `ROOT/NAME/journal/part-P.jnl`.
//!
//! ```text
//! journal = header (64 bytes) | frame | frame | ...    (frames back to back, no padding)
//! header
//!   0   8   magic "NVJRNL01"
//!   8   2   format version (1), LE
//!   10  2   source partition P, LE
//!   12  48  source name, NUL padded
//!   60  4   CRC32C of bytes 0..60, LE
//! frame = exactly the bytes the source sent (see `proto::frame`: length, seq, CRC32C)
//! ```
//! Sequence numbers increase strictly through a file. Appends are followed by `fdatasync`.
//! Recovery policy when reading: a frame that does not check out is a *torn tail* (truncated
//! with a warning) unless a valid frame with a higher sequence number follows it somewhere in
//! the file, which is *corruption*: a hard error naming the file and offset.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proto::frame::{self, KIND_RECORD};

use crate::error::JournalError;

/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// The header's magic number.
pub const MAGIC: &[u8; 8] = b"NVJRNL01";
/// Format version written and read.
pub const VERSION: u16 = 1;
const NAME_LEN: usize = 48;

/// The path of source partition `partition`'s journal in `dir`.
pub fn journal_path(dir: &Path, partition: u16) -> PathBuf {
    dir.join(format!("part-{partition}.jnl"))
}

/// Parse `part-P.jnl` into P.
pub fn partition_of_file_name(name: &str) -> Option<u16> {
    name.strip_prefix("part-")?
        .strip_suffix(".jnl")?
        .parse()
        .ok()
}

/// Encode a header.
pub fn encode_header(source: &str, partition: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&partition.to_le_bytes());
    let n = source.len().min(NAME_LEN);
    h[12..12 + n].copy_from_slice(&source.as_bytes()[..n]);
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check a header read from `path`.
fn check_header(path: &Path, h: &[u8], source: &str, partition: u16) -> Result<(), JournalError> {
    let bad = |reason: String| JournalError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if h.len() < HEADER_LEN {
        return Err(bad(format!("file is only {} bytes", h.len())));
    }
    if &h[0..8] != MAGIC {
        return Err(bad("not an nvmirror journal (bad magic)".into()));
    }
    let stored = u32::from_le_bytes([h[60], h[61], h[62], h[63]]);
    if stored != crc32c::crc32c(&h[..60]) {
        return Err(bad("header CRC mismatch".into()));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let part = u16::from_le_bytes([h[10], h[11]]);
    let expect = encode_header(source, partition);
    if part != partition || h[12..60] != expect[12..60] {
        return Err(bad(format!(
            "header names partition {part} of source {:?}, expected partition {partition} of {source:?}",
            String::from_utf8_lossy(&h[12..60]).trim_end_matches('\0')
        )));
    }
    Ok(())
}

/// One record found in a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset in the file.
    pub offset: u64,
    /// Frame length.
    pub len: u64,
    /// Sequence number.
    pub seq: u64,
}

/// What [`scan`] found after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Valid records, in order.
    pub entries: Vec<Entry>,
    /// Offset where valid records end.
    pub end: u64,
    /// Offset and reason of a torn tail, if any.
    pub torn: Option<(u64, String)>,
}

fn valid_record_at(bytes: &[u8], at: usize) -> Option<u64> {
    let f = frame::decode(&bytes[at..]).ok()?;
    (f.header.kind == KIND_RECORD).then_some(f.header.seq)
}

/// Scan the frames of a journal body (`bytes` = whole file, header included).
pub fn scan(path: &Path, bytes: &[u8]) -> Result<Scan, JournalError> {
    let mut entries = Vec::new();
    let mut off = HEADER_LEN;
    let mut last: Option<u64> = None;
    while off < bytes.len() {
        let failure = match frame::decode(&bytes[off..]) {
            Ok(f) if f.header.kind != KIND_RECORD => format!("frame kind {}", f.header.kind),
            Ok(f) if last.is_some_and(|l| f.header.seq <= l) => format!(
                "sequence {} does not follow {}",
                f.header.seq,
                last.unwrap_or(0)
            ),
            Ok(f) => {
                entries.push(Entry {
                    offset: off as u64,
                    len: f.bytes.len() as u64,
                    seq: f.header.seq,
                });
                last = Some(f.header.seq);
                off += f.bytes.len();
                continue;
            }
            Err(e) => e.to_string(),
        };
        // A valid later record means damage in the middle, not a torn write.
        let magic = frame::MAGIC.to_le_bytes();
        let mut at = off + 1;
        while at + frame::HEADER_LEN <= bytes.len() {
            if bytes[at..at + 4] == magic {
                if let Some(seq) = valid_record_at(bytes, at) {
                    if last.is_none_or(|l| seq > l) {
                        return Err(JournalError::Corrupt {
                            path: path.to_path_buf(),
                            offset: off as u64,
                            reason: failure,
                        });
                    }
                }
            }
            at += 1;
        }
        return Ok(Scan {
            entries,
            end: off as u64,
            torn: Some((off as u64, failure)),
        });
    }
    Ok(Scan {
        entries,
        end: off as u64,
        torn: None,
    })
}

/// An open journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    source: String,
    partition: u16,
    len: u64,
    last_seq: Option<u64>,
    records: u64,
}

impl Journal {
    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Open (creating with a header if missing) the journal of `source`'s partition
    /// `partition` in `dir`. A torn tail is truncated away with a warning; corruption is an
    /// error.
    pub fn open(dir: &Path, source: &str, partition: u16) -> Result<Journal, JournalError> {
        let path = journal_path(dir, partition);
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| JournalError::Io { path, what, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("cannot read"))?;
        if bytes.is_empty() {
            file.write_all_at(&encode_header(source, partition), 0)
                .map_err(io("cannot write the header"))?;
            file.sync_all().map_err(io("cannot sync"))?;
            if let Ok(d) = File::open(dir) {
                d.sync_all()
                    .map_err(io("cannot sync the journal directory"))?;
            }
            return Ok(Journal {
                path,
                file,
                source: source.to_string(),
                partition,
                len: HEADER_LEN as u64,
                last_seq: None,
                records: 0,
            });
        }
        check_header(&path, &bytes, source, partition)?;
        let s = scan(&path, &bytes)?;
        if let Some((offset, reason)) = &s.torn {
            tracing::warn!(journal = %path.display(), offset, reason = %reason,
                "journal: dropped a torn tail (a record that was being written when the process stopped)");
            file.set_len(s.end)
                .map_err(io("cannot truncate the torn tail"))?;
            file.sync_data().map_err(io("cannot sync"))?;
        }
        Ok(Journal {
            path,
            file,
            source: source.to_string(),
            partition,
            len: s.end,
            last_seq: s.entries.last().map(|e| e.seq),
            records: s.entries.len() as u64,
        })
    }

    /// Highest sequence number in the file.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// File size in bytes (header included).
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// Number of records.
    #[cfg(test)]
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Append source frames (each checked: CRC, kind, increasing sequence) and fdatasync.
    pub fn append(&mut self, frames: &[&[u8]]) -> Result<(), JournalError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut last = self.last_seq;
        let mut buf = Vec::with_capacity(frames.iter().map(|f| f.len()).sum());
        for f in frames {
            let d = frame::decode(f).map_err(|e| JournalError::BadAppend {
                path: self.path.clone(),
                seq: frame::parse_header(f).map(|h| h.seq).unwrap_or(0),
                reason: e.to_string(),
            })?;
            let seq = d.header.seq;
            if d.header.kind != KIND_RECORD || last.is_some_and(|l| seq <= l) {
                return Err(JournalError::BadAppend {
                    path: self.path.clone(),
                    seq,
                    reason: format!(
                        "kind {} after sequence {:?}: records must increase",
                        d.header.kind, last
                    ),
                });
            }
            last = Some(seq);
            buf.extend_from_slice(d.bytes);
        }
        let at = self.len;
        self.file
            .write_all_at(&buf, at)
            .map_err(self.io("cannot append"))?;
        self.file.sync_data().map_err(self.io("cannot fdatasync"))?;
        self.len += buf.len() as u64;
        self.records += frames.len() as u64;
        self.last_seq = last;
        Ok(())
    }

    /// Read back every record (frame bytes), checking each again (see [`Journal::visit_frames`]).
    pub fn read_frames(&self) -> Result<Vec<Vec<u8>>, JournalError> {
        let mut frames = Vec::new();
        self.visit_frames(|_, f| {
            frames.push(f.bytes.to_vec());
            Ok(())
        })?;
        Ok(frames)
    }

    /// Visit every record in file order through one frame-sized buffer, each checked again
    /// (CRC, kind, increasing sequence): a CP reads its window without holding it in memory.
    /// Damage anywhere is an error (these bytes were written and synced by this daemon).
    pub fn visit_frames(
        &self,
        mut visit: impl FnMut(Entry, &frame::Frame<'_>) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        use std::io::{BufReader, Seek, SeekFrom};
        let mut file = &self.file;
        file.seek(SeekFrom::Start(0))
            .map_err(self.io("cannot seek"))?;
        let mut r = BufReader::with_capacity(1 << 20, file).take(self.len);
        let mut head = [0u8; HEADER_LEN];
        r.read_exact(&mut head).map_err(self.io("cannot read"))?;
        check_header(&self.path, &head, &self.source, self.partition)?;
        let mut off = HEADER_LEN as u64;
        let mut last: Option<u64> = None;
        let mut buf = Vec::new();
        while off < self.len {
            let corrupt = |reason: String| JournalError::Corrupt {
                path: self.path.clone(),
                offset: off,
                reason,
            };
            let left = self.len - off;
            if left < frame::HEADER_LEN as u64 {
                return Err(corrupt(format!(
                    "{left} bytes left, less than a frame header"
                )));
            }
            buf.resize(frame::HEADER_LEN, 0);
            r.read_exact(&mut buf).map_err(self.io("cannot read"))?;
            let h = frame::parse_header(&buf).map_err(|e| corrupt(e.to_string()))?;
            let len = h.frame_len() as u64;
            if len > left {
                return Err(corrupt(format!(
                    "a frame of {len} bytes where {left} are left"
                )));
            }
            buf.resize(len as usize, 0);
            r.read_exact(&mut buf[frame::HEADER_LEN..])
                .map_err(self.io("cannot read"))?;
            let f = frame::decode(&buf).map_err(|e| corrupt(e.to_string()))?;
            if f.header.kind != KIND_RECORD || last.is_some_and(|l| f.header.seq <= l) {
                return Err(corrupt(format!(
                    "kind {} with sequence {} after {:?}",
                    f.header.kind, f.header.seq, last
                )));
            }
            last = Some(f.header.seq);
            let len = f.bytes.len() as u64;
            visit(
                Entry {
                    offset: off,
                    len,
                    seq: f.header.seq,
                },
                &f,
            )?;
            off += len;
        }
        Ok(())
    }

    /// A second descriptor of the file, to read records back (positioned reads) after the
    /// journals' lock is released.
    pub fn reader(&self) -> Result<File, JournalError> {
        self.file
            .try_clone()
            .map_err(self.io("cannot duplicate the descriptor"))
    }

    /// Drop every record with sequence number `<= seq` (after a CP applied them): truncate to
    /// the header when nothing newer is in the file, otherwise rewrite the newer records into
    /// a fresh file and rename it over this one.
    pub fn discard_through(&mut self, seq: u64) -> Result<(), JournalError> {
        match self.last_seq {
            None => return Ok(()),
            Some(last) if last <= seq => {
                self.file
                    .set_len(HEADER_LEN as u64)
                    .map_err(self.io("cannot truncate"))?;
                self.file.sync_data().map_err(self.io("cannot fdatasync"))?;
                self.len = HEADER_LEN as u64;
                self.records = 0;
                self.last_seq = None;
                return Ok(());
            }
            Some(_) => {}
        }
        // Sequence numbers increase through a file: when the first record is newer, so is
        // every other (the other partition's journal, filling while this CP ran) and nothing
        // is read or rewritten.
        let mut first = [0u8; frame::HEADER_LEN];
        if self.len >= (HEADER_LEN + frame::HEADER_LEN) as u64 {
            self.file
                .read_exact_at(&mut first, HEADER_LEN as u64)
                .map_err(self.io("cannot read"))?;
            if frame::parse_header(&first).is_ok_and(|h| h.seq > seq) {
                return Ok(());
            }
        }
        let keep: Vec<Vec<u8>> = self
            .read_frames()?
            .into_iter()
            .filter(|f| frame::parse_header(f).is_ok_and(|h| h.seq > seq))
            .collect();
        let tmp = self.path.with_extension("jnl.tmp");
        let io = |what: &'static str| {
            let path = tmp.clone();
            move |source| JournalError::Io { path, what, source }
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("cannot create"))?;
        f.write_all(&encode_header(&self.source, self.partition))
            .map_err(io("cannot write"))?;
        let mut len = HEADER_LEN as u64;
        for k in &keep {
            f.write_all(k).map_err(io("cannot write"))?;
            len += k.len() as u64;
        }
        f.sync_all().map_err(io("cannot sync"))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(self.io("cannot rename the rewritten journal"))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                d.sync_all()
                    .map_err(self.io("cannot sync the journal directory"))?;
            }
        }
        self.file = f;
        self.len = len;
        self.records = keep.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Op;

    fn rec(seq: u64) -> Vec<u8> {
        let op = Op::Unlink {
            path: format!("f{seq}").into_bytes(),
        };
        frame::encode(seq, 1, 3, KIND_RECORD, 0, &op.encode()).unwrap()
    }

    #[test]
    fn write_read_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "alpha", 3).unwrap();
        let frames: Vec<Vec<u8>> = (1..=5).map(rec).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        j.append(&refs).unwrap();
        assert_eq!((j.last_seq(), j.records()), (Some(5), 5));
        assert_eq!(j.read_frames().unwrap(), frames);
        let full_len = j.len_bytes();
        drop(j);

        // Cut the last record at every byte: always reopens with 4 records.
        let last_len = frames[4].len() as u64;
        for cut in 1..last_len {
            let path = journal_path(dir.path(), 3);
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(full_len - cut).unwrap();
            drop(f);
            let j = Journal::open(dir.path(), "alpha", 3).unwrap();
            assert_eq!(j.last_seq(), Some(4), "cut {cut}");
            assert_eq!(j.len_bytes(), full_len - last_len);
            drop(j);
            // restore
            let mut j = Journal::open(dir.path(), "alpha", 3).unwrap();
            j.append(&[&frames[4]]).unwrap();
        }
    }

    #[test]
    fn damage_in_the_middle_is_corruption_naming_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "alpha", 0).unwrap();
        let frames: Vec<Vec<u8>> = (1..=3).map(rec).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        j.append(&refs).unwrap();
        drop(j);
        let path = journal_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER_LEN + frames[0].len();
        bytes[second + 40] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match Journal::open(dir.path(), "alpha", 0) {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn wrong_header_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "alpha", 1).unwrap();
        let frames: Vec<Vec<u8>> = (10..=14).map(rec).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        j.append(&refs).unwrap();
        assert!(j.append(&[&rec(12)]).is_err(), "repeat refused");
        let ino = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(journal_path(dir.path(), 1))
                .unwrap()
                .ino()
        };
        let before = ino();
        j.discard_through(9).unwrap();
        assert_eq!(j.read_frames().unwrap(), frames, "nothing older: all kept");
        assert_eq!(ino(), before, "nothing older: the file is not rewritten");
        j.discard_through(12).unwrap();
        assert_ne!(ino(), before, "rewritten without 10..=12");
        assert_eq!(j.read_frames().unwrap(), frames[3..].to_vec());
        j.discard_through(14).unwrap();
        assert_eq!(j.len_bytes(), HEADER_LEN as u64);
        drop(j);
        let j = Journal::open(dir.path(), "alpha", 1).unwrap();
        assert_eq!(j.last_seq(), None);
        assert!(Journal::open(dir.path(), "beta", 1).is_err());
    }
}
