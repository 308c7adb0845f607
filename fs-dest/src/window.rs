//! A CP's window: the journaled records it applies, decoded once, with each write's bytes left
//! in the journal file until the CP applies that write (read back then into one reused buffer).
//! A CP's memory is therefore the window's metadata (paths, offsets, handles), not its payload:
//! a 256 MiB partition of 4 KiB writes costs a few MiB, not the partition again.

use std::fs::File;
use std::sync::Arc;

use proto::frame;
use proto::Op;

use crate::engine::{lock, Source};
use crate::error::JournalError;
use crate::journal::Journal;

/// Where a write record's bytes are in a journal file.
#[derive(Debug, Clone)]
pub struct DataRef {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

impl DataRef {
    /// Read the bytes into `buf` (replacing its content; its allocation is reused).
    #[cfg(test)]
    pub fn read_into(&self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        buf.resize(self.len, 0);
        std::os::unix::fs::FileExt::read_exact_at(&*self.file, buf, self.offset)
    }

    /// Apply the write of these bytes at `offset` of `path` in `tree`, copied from the journal
    /// by the kernel ([`proto::apply::Tree::write_from`]): a CP's writes never pass through
    /// user space.
    pub fn apply_to(
        &self,
        tree: &proto::apply::Tree,
        path: &[u8],
        offset: u64,
    ) -> Result<(), proto::apply::ApplyError> {
        use std::os::fd::AsFd;
        tree.write_from(
            path,
            offset,
            self.file.as_fd(),
            self.offset,
            self.len as u64,
        )
    }
}

/// One record of a window.
#[derive(Debug)]
pub struct WindowRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The operation (a write's `data` empty: see `data`), or why it does not decode.
    pub op: Result<Op, String>,
    /// A write's bytes.
    pub data: Option<DataRef>,
}

/// The journaled records of `source` with `after < seq <= upto`, in sequence order (blocking
/// I/O). Each frame is checked again as it is read (see `Journal::visit_frames`); a record
/// whose operation does not decode is kept with the reason, for the CP to report.
pub fn read(source: &Source, after: u64, upto: u64) -> Result<Vec<WindowRecord>, JournalError> {
    read_journals(lock(&source.journals).values(), after, upto)
}

fn read_journals<'a>(
    journals: impl Iterator<Item = &'a Journal>,
    after: u64,
    upto: u64,
) -> Result<Vec<WindowRecord>, JournalError> {
    let mut records = Vec::new();
    for j in journals {
        let file = Arc::new(j.reader()?);
        j.visit_frames(|entry, f| {
            if entry.seq <= after || entry.seq > upto {
                return Ok(());
            }
            let (op, data) = match Op::decode_lean(f.payload) {
                Err(e) => (Err(e.to_string()), None),
                Ok((op, range)) => {
                    // The payload follows the frame header: its range, moved to the file.
                    let data = range.map(|r| DataRef {
                        file: file.clone(),
                        offset: entry.offset + (frame::HEADER_LEN + r.start) as u64,
                        len: r.len(),
                    });
                    (Ok(op), data)
                }
            };
            records.push(WindowRecord {
                seq: entry.seq,
                op,
                data,
            });
            Ok(())
        })?;
    }
    records.sort_by_key(|r| r.seq);
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::frame::KIND_RECORD;
    use proto::Handle;
    use std::os::unix::fs::FileExt;

    fn write(seq: u64, len: usize) -> (Op, Vec<u8>) {
        let op = Op::Write {
            path: format!("f{seq}").into_bytes(),
            offset: seq * 10,
            data: (0..len).map(|i| (i as u64 * 7 + seq) as u8).collect(),
            handle: Handle(vec![seq as u8; 8]),
        };
        let f = frame::encode(seq, 1, 0, KIND_RECORD, 0, &op.encode()).unwrap();
        (op, f)
    }

    #[test]
    fn a_window_keeps_metadata_and_reads_each_writes_bytes_back_from_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Journal::open(dir.path(), "alpha", 0).unwrap();
        let mut b = Journal::open(dir.path(), "alpha", 1).unwrap();
        let (ops, frames): (Vec<Op>, Vec<Vec<u8>>) = (1..=8)
            .map(|s| write(s, [0, 5, 300, 70_000][s as usize % 4]))
            .unzip();
        let unlink = Op::Unlink {
            path: b"gone".to_vec(),
        };
        let nine = frame::encode(9, 1, 1, KIND_RECORD, 0, &unlink.encode()).unwrap();
        // Odd records in one partition's journal, even ones and the unlink in the other.
        let odd: Vec<&[u8]> = frames.iter().step_by(2).map(|f| &f[..]).collect();
        let mut even: Vec<&[u8]> = frames.iter().skip(1).step_by(2).map(|f| &f[..]).collect();
        a.append(&odd).unwrap();
        even.push(&nine);
        b.append(&even).unwrap();

        let window = read_journals([&a, &b].into_iter(), 2, 9).unwrap();
        assert_eq!(
            window.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (3..=9).collect::<Vec<_>>()
        );
        let mut buf = Vec::new();
        for r in &window[..6] {
            let Op::Write { data, .. } = &ops[r.seq as usize - 1] else {
                unreachable!()
            };
            match r.op.as_ref().unwrap() {
                Op::Write { data: lean, .. } => assert!(lean.is_empty(), "no payload held"),
                other => panic!("{other:?}"),
            }
            r.data
                .as_ref()
                .expect("a write has its bytes in the journal")
                .read_into(&mut buf)
                .unwrap();
            assert_eq!(&buf, data, "record {}", r.seq);
        }
        assert_eq!(window[6].op.as_ref().unwrap(), &unlink);
        assert!(window[6].data.is_none());
    }

    #[test]
    fn damage_found_while_reading_a_window_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), "alpha", 0).unwrap();
        let frames: Vec<Vec<u8>> = (1..=3).map(|s| write(s, 100).1).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        j.append(&refs).unwrap();
        // Flip a payload byte of the second record behind the journal's back.
        let at = crate::journal::HEADER_LEN as u64 + frames[0].len() as u64;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(crate::journal::journal_path(dir.path(), 0))
            .unwrap();
        f.write_all_at(&[0xff], at + 60).unwrap();
        match read_journals([&j].into_iter(), 0, 3) {
            Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, at),
            other => panic!("expected corruption, got {other:?}"),
        }
    }
}
