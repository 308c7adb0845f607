//! The destager (claim 17): moves frames from the shared NVLOG to each source's journals and
//! then frees the NVLOG partition.
//!
//! A partition is destaged once it is no longer the current one: on every wake-up (a short
//! timer, a rotation, a full log or a CP request) the destager rotates away from a non-empty
//! current partition if another one is free, then, for each older partition, copies its frames
//! out (outside the NVLOG lock: nothing appends to a non-current partition), appends each
//! inner source frame to `ROOT/NAME/journal/part-P.jnl` (P = the source partition named in the
//! inner frame), fdatasyncs, and only then frees the partition. A frame whose sequence number
//! is already in the journal or already applied is skipped, so a crash between the journal
//! write and the free never duplicates a record.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::frame::{self, KIND_NESTED};
use proto::storage::Storage;

use crate::engine::{lock, Engine, Source};
use crate::journal::Journal;

/// How often the destager looks for work when nobody wakes it.
pub const DESTAGE_TICK: Duration = Duration::from_millis(50);

/// Why a partition could not be destaged (it is kept and retried).
#[derive(Debug, thiserror::Error)]
pub enum DestageError {
    /// A frame in NVRAM does not check out.
    #[error("destination NVLOG partition {partition}: frame at offset {offset}: {reason}")]
    BadFrame {
        /// Partition.
        partition: usize,
        /// Absolute offset.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A frame names a slot no source owns.
    #[error("destination NVLOG partition {partition}: frame of unknown slot {slot}")]
    UnknownSlot {
        /// Partition.
        partition: usize,
        /// Slot.
        slot: usize,
    },
    /// Writing a journal failed.
    #[error(transparent)]
    Journal(#[from] crate::error::JournalError),
    /// Freeing the partition failed.
    #[error(transparent)]
    NvLog(#[from] proto::NvLogError),
}

/// The destager thread's loop.
pub fn run(engine: Arc<Engine>) {
    let mut failing = false;
    loop {
        engine.destage_signal.wait_timeout(DESTAGE_TICK);
        if engine.shutdown.load(Ordering::Relaxed) {
            return;
        }
        match destage_once(&engine) {
            Ok(_) => failing = false,
            Err(e) => {
                // Log a persistent failure once, not every tick.
                if !failing {
                    tracing::error!(error = %e, "destager: cannot move records to journals; NVRAM space is not freed until this succeeds");
                }
                failing = true;
            }
        }
    }
}

/// One pass: destage and free every non-current partition holding frames. Returns the
/// number of partitions freed.
pub fn destage_once(engine: &Engine) -> Result<usize, DestageError> {
    let mut freed = 0;
    for (p, start, used) in engine.destage_candidates() {
        destage_partition(engine, p, start, used)?;
        engine.free_partition(p)?;
        freed += 1;
    }
    Ok(freed)
}

fn destage_partition(
    engine: &Engine,
    p: usize,
    start: usize,
    used: usize,
) -> Result<(), DestageError> {
    destage_partition_in(engine, p, start, used, DESTAGE_CHUNK)
}

/// How much of an NVRAM partition destaging copies out at a time (a larger frame is read
/// whole): the destager's memory is this, not the partition.
const DESTAGE_CHUNK: usize = 32 << 20;

/// Destage partition `p` in pieces of about `chunk` bytes, each cut at a frame boundary; each
/// piece's frames are journaled (in sequence order per source) before the next is read.
fn destage_partition_in(
    engine: &Engine,
    p: usize,
    start: usize,
    used: usize,
    chunk: usize,
) -> Result<(), DestageError> {
    let mut bytes = Vec::new();
    let mut off = 0;
    while off < used {
        let bad = |at: usize, reason: String| DestageError::BadFrame {
            partition: p,
            offset: start + at,
            reason,
        };
        let mut want = chunk.max(frame::HEADER_LEN).min(used - off);
        bytes.resize(want, 0);
        engine.storage().read_at(start + off, &mut bytes);
        // A first frame larger than the piece is read whole.
        if let Ok(h) = frame::parse_header(&bytes) {
            let need = h.frame_len().min(used - off);
            if need > want {
                want = need;
                bytes.resize(want, 0);
                engine.storage().read_at(start + off, &mut bytes);
            }
        }
        // slot -> (source partition, inner frame), in destination order (= source order).
        let mut by_source: BTreeMap<usize, Vec<(u16, &[u8])>> = BTreeMap::new();
        let mut at = 0;
        while at < want {
            let rest = &bytes[at..];
            // A frame cut by the end of this piece starts the next one.
            let cut = rest.len() < frame::HEADER_LEN
                || frame::parse_header(rest).is_ok_and(|h| h.frame_len() > rest.len());
            if cut && at > 0 && off + want < used {
                break;
            }
            let outer = frame::decode(rest).map_err(|e| bad(off + at, e.to_string()))?;
            if outer.header.kind != KIND_NESTED {
                return Err(bad(
                    off + at,
                    format!("kind {} is not a nested frame", outer.header.kind),
                ));
            }
            // The outer CRC covers the inner frame: no second pass over it.
            let inner = frame::decode_nested(&outer)
                .map_err(|e| bad(off + at, format!("inner frame: {e}")))?;
            by_source
                .entry(outer.header.origin as usize)
                .or_default()
                .push((inner.header.partition, inner.bytes));
            at += frame::padded_len(outer.bytes.len());
        }
        for (slot, frames) in by_source {
            let source = engine
                .source_by_slot(slot)
                .ok_or(DestageError::UnknownSlot { partition: p, slot })?;
            journal_frames(&source, frames)?;
        }
        off += at;
    }
    Ok(())
}

/// Append a source's inner frames (with their source partition) to its journals, in sequence
/// order, keeping the journals an unbroken run after the applied record: a frame already
/// journaled or applied is skipped (a crash between journal write and NVRAM free), and so is a
/// frame that would leave a hole (a record before it was lost, e.g. a torn journal tail dropped
/// at start-up: the source was told to resend from the hole, and the copy in NVRAM comes again
/// in order).
fn journal_frames(source: &Source, mut frames: Vec<(u16, &[u8])>) -> Result<(), DestageError> {
    let seq_of = |f: &[u8]| frame::parse_header(f).map(|h| h.seq).unwrap_or(0);
    frames.sort_by_key(|(_, f)| seq_of(f));
    let start = (*source.journaled.borrow()).max(source.applied_seq.load(Ordering::Acquire));
    let mut unbroken = start;
    let mut beyond_hole = None;
    {
        let mut journals = lock(&source.journals);
        let mut fresh: BTreeMap<u16, Vec<&[u8]>> = BTreeMap::new();
        for (part, f) in frames {
            let seq = seq_of(f);
            if seq <= unbroken {
                continue;
            }
            if seq > unbroken + 1 {
                beyond_hole.get_or_insert(seq);
                continue;
            }
            let journal = match journals.entry(part) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Journal::open(&source.journal_dir, &source.name, part)?)
                }
            };
            if journal.last_seq().is_none_or(|last| seq > last) {
                fresh.entry(part).or_default().push(f);
            }
            unbroken = seq;
        }
        for (part, fresh) in fresh {
            if let Some(journal) = journals.get_mut(&part) {
                journal.append(&fresh)?;
            }
        }
    }
    if let Some(seq) = beyond_hole {
        tracing::warn!(source = %source.name, missing = unbroken + 1, first_dropped = seq,
            "destager: record {} is missing, so the copies of later records in NVRAM are dropped; \
             the source resends them from {}", unbroken + 1, unbroken + 1);
    }
    source.journaled.send_if_modified(|v| {
        if unbroken > *v {
            *v = unbroken;
            true
        } else {
            false
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::check_batch;
    use proto::frame::KIND_RECORD;
    use proto::nvlog::{Geometry, MIN_PARTITION_SIZE};
    use proto::Op;

    /// The sequence numbers in a source's journal of partition 0.
    fn journal_seqs(source: &Source) -> Vec<u64> {
        lock(&source.journals)[&0]
            .read_frames()
            .unwrap()
            .iter()
            .map(|f| frame::parse_header(f).unwrap().seq)
            .collect()
    }

    fn rec(seq: u64) -> Vec<u8> {
        let op = Op::Unlink {
            path: format!("f{seq}").into_bytes(),
        };
        frame::encode(seq, 1, 0, KIND_RECORD, 0, &op.encode()).unwrap()
    }

    #[tokio::test]
    async fn a_partition_destaged_in_small_pieces_journals_every_record_in_order() {
        // Records of several sizes from two sources, destaged with pieces smaller than one
        // frame, than a few frames, and larger than the partition: the same journals.
        let write = |seq: u64, len: usize| {
            let op = Op::Write {
                path: format!("f{seq}").into_bytes(),
                offset: 0,
                data: vec![seq as u8; len],
                handle: Default::default(),
            };
            frame::encode(seq, 1, 0, KIND_RECORD, 0, &op.encode()).unwrap()
        };
        for chunk in [1usize, 100, 700, 5000, 1 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let geo = Geometry {
                partitions: 2,
                partition_size: MIN_PARTITION_SIZE,
            };
            let engine =
                Engine::open(&dir.path().join("root"), &dir.path().join("nv"), geo).unwrap();
            let (a, b) = (engine.source("a").unwrap(), engine.source("b").unwrap());
            for seq in 1..=12u64 {
                for (src, len) in [(&a, (seq as usize * 397) % 3000), (&b, 10)] {
                    let f = write(seq, len);
                    let (ok, rej) = check_batch(&f, seq, geo.capacity());
                    assert!(rej.is_none());
                    let out = engine.append_batch(src.slot, &ok).await;
                    assert!(out.error.is_none() && out.appended == 1);
                }
            }
            for (p, start, used) in engine.destage_candidates() {
                destage_partition_in(&engine, p, start, used, chunk).unwrap();
            }
            for src in [&a, &b] {
                let seqs = journal_seqs(src);
                assert_eq!(seqs, (1..=12).collect::<Vec<_>>(), "chunk {chunk}");
                assert_eq!(*src.journaled.borrow(), 12, "chunk {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn a_crash_between_journal_write_and_free_duplicates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let nvram = dir.path().join("nvram");
        let geo = Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        };
        let engine = Engine::open(&root, &nvram, geo).unwrap();
        let alpha = engine.source("alpha").unwrap();
        let batch: Vec<u8> = (1..=3).flat_map(rec).collect();
        let (ok, rej) = check_batch(&batch, 1, geo.capacity());
        assert!(rej.is_none());
        let out = engine.append_batch(alpha.slot, &ok).await;
        assert!(out.error.is_none() && out.appended == 3);
        // Journal the partition but "crash" before freeing it.
        for (p, start, used) in engine.destage_candidates() {
            destage_partition(&engine, p, start, used).unwrap();
        }

        let engine2 = Engine::open(&root, &nvram, geo).unwrap();
        let alpha2 = engine2.source("alpha").unwrap();
        assert_eq!(alpha2.accepted_seq.load(Ordering::Relaxed), 3);
        assert_eq!(destage_once(&engine2).unwrap(), 1);
        let seqs = journal_seqs(&alpha2);
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(*alpha2.journaled.borrow(), 3);
    }

    #[tokio::test]
    async fn a_lost_journal_record_is_resent_and_later_copies_never_leave_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let nvram = dir.path().join("nvram");
        let geo = Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        };
        let engine = Engine::open(&root, &nvram, geo).unwrap();
        let alpha = engine.source("alpha").unwrap();
        let append = |engine: Arc<Engine>, slot: usize, from: u64, to: u64| async move {
            let batch: Vec<u8> = (from..=to).flat_map(rec).collect();
            let (ok, rej) = check_batch(&batch, from, geo.capacity());
            assert!(rej.is_none());
            let out = engine.append_batch(slot, &ok).await;
            assert!(out.error.is_none() && out.appended as u64 == to - from + 1);
        };
        append(engine.clone(), alpha.slot, 1, 4).await;
        assert_eq!(destage_once(&engine).unwrap(), 1);
        // Records 5 and 6 stay in NVRAM; then the journal loses the tail of record 4.
        append(engine.clone(), alpha.slot, 5, 6).await;
        let path = crate::journal::journal_path(&alpha.journal_dir, 0);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let engine2 = Engine::open(&root, &nvram, geo).unwrap();
        let alpha2 = engine2.source("alpha").unwrap();
        // The source is asked to resend from 4, not from 7.
        assert_eq!(alpha2.accepted_seq.load(Ordering::Relaxed), 3);
        assert_eq!(alpha2.ingest.lock().await.next_seq, 4);
        // The NVRAM copies of 5 and 6 are not journaled past the hole...
        assert_eq!(destage_once(&engine2).unwrap(), 1);
        assert_eq!(*alpha2.journaled.borrow(), 3);
        // ...and the resent 4, 5, 6 are, in order.
        append(engine2.clone(), alpha2.slot, 4, 6).await;
        destage_once(&engine2).unwrap();
        let seqs = journal_seqs(&alpha2);
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(*alpha2.journaled.borrow(), 6);
    }
}
