//! `fs-source check`: verify a source's NVRAM file and its backlog offline, with no daemon
//! running. The files are only read (opened read-only, never mapped writable, never created);
//! the verification itself is `proto::inspect`'s, the user area is decoded with the offsets
//! `mirror.rs` writes.

use std::path::{Path, PathBuf};

use proto::inspect::{self, FileReport, Header, Options, Report, SourceCursors, UserArea};
use proto::nvlog::{Role, SUPERBLOCK_LEN, USER_AREA_OFFSET};

use crate::mirror::cursor;

/// Read a whole file without opening it for writing (see [`proto::storage::read_regular`]).
fn read_only(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(proto::storage::read_regular(path)?)
}

/// The source's cursors in the user area of an NVRAM image (`None` if the file is too short).
fn cursors(bytes: &[u8]) -> Option<SourceCursors> {
    if bytes.len() < SUPERBLOCK_LEN {
        return None;
    }
    let user = &bytes[USER_AREA_OFFSET..SUPERBLOCK_LEN];
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&user[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let n = &user[cursor::NAME..cursor::NAME + cursor::NAME_LEN];
    let len = (n[0] as usize).min(cursor::NAME_LEN - 1);
    let marker =
        proto::replay::Marker::decode(&user[cursor::DURABLE_MARKER..cursor::DURABLE_MARKER + 16])
            .filter(|m| m.seq > 0)
            .map(|m| (m.generation, m.seq));
    Some(SourceCursors {
        name: String::from_utf8_lossy(&n[1..1 + len]).into_owned(),
        generation: u64_at(cursor::GENERATION),
        applied_seq: u64_at(cursor::APPLIED_SEQ),
        durable_seq: u64_at(cursor::DURABLE_SEQ),
        durable_marker: marker,
    })
}

/// The backlog next to `nvram` (`NVRAM.backlog`), as `mount` names it.
pub fn default_backlog(nvram: &Path) -> PathBuf {
    let mut p = nvram.as_os_str().to_owned();
    p.push(".backlog");
    PathBuf::from(p)
}

/// Check the NVRAM file and the backlog (the one given, or `NVRAM.backlog` when it exists).
pub fn check(nvram: &Path, backlog: Option<&Path>, records: bool) -> anyhow::Result<Report> {
    let opts = Options { records };
    let bytes = read_only(nvram)?;
    let mut nv = inspect::check_nvram(
        &nvram.display().to_string(),
        &bytes,
        Some(Role::Source),
        opts,
    );
    if matches!(nv.header, Header::Nvlog { role: 1, .. }) {
        nv.user_area = cursors(&bytes).map(UserArea::Source);
    }
    drop(bytes);
    let backlog_path = match backlog {
        Some(p) => Some(p.to_path_buf()),
        None => Some(default_backlog(nvram)).filter(|p| p.exists()),
    };
    let bl: Option<FileReport> = match backlog_path {
        Some(p) => {
            let bytes = read_only(&p)?;
            Some(inspect::check_backlog(
                &p.display().to_string(),
                &bytes,
                opts,
            ))
        }
        None => None,
    };
    let mut report = Report::default();
    // Records a restart would replay (after the lower cursor) should be an unbroken run
    // across the NVRAM partitions and the backlog.
    let after = match &nv.user_area {
        Some(UserArea::Source(c)) => c.applied_seq.min(c.durable_seq),
        _ => 0,
    };
    let mut held: Vec<u64> = nv
        .segments
        .iter()
        .flat_map(|s| s.seqs.iter().map(|&(_, q)| q))
        .collect();
    if let Some(b) = &bl {
        held.extend(
            b.segments
                .iter()
                .flat_map(|s| s.seqs.iter().map(|&(_, q)| q)),
        );
    }
    let name = match &nv.user_area {
        Some(UserArea::Source(c)) => format!("source {:?}", c.name),
        _ => "source".to_string(),
    };
    report.issues.extend(inspect::coverage_gaps(
        &name,
        "the NVRAM partitions and the backlog",
        held,
        after,
    ));
    report.files.push(nv);
    report.files.extend(bl);
    report.finish();
    Ok(report)
}

/// `fs-source check`: print the report (text or JSON); an error when anything failed.
pub fn run(nvram: &Path, backlog: Option<&Path>, records: bool, json: bool) -> anyhow::Result<()> {
    let report = check(nvram, backlog, records)?;
    let out = if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        inspect::render_text(&report, records)
    };
    use std::io::Write as _;
    // A closed pipe (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    if !report.ok {
        anyhow::bail!(
            "check failed: {} error(s) in {}",
            report.errors,
            nvram.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use proto::frame;
    use proto::nvlog::{Geometry, NvLog, MIN_PARTITION_SIZE};
    use proto::storage::MmapStorage;

    fn rec(seq: u64) -> Vec<u8> {
        let op = proto::Op::Unlink {
            path: format!("f{seq}").into_bytes(),
        };
        frame::encode(seq, 1, 0, frame::KIND_RECORD, 0, &op.encode()).expect("frame")
    }

    /// Files written by the daemon's own code (NvLog, the user-area cursors, Backlog) check out,
    /// and checking changes nothing.
    #[test]
    fn files_the_daemon_writes_check_out_and_are_not_modified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nvram = dir.path().join("a.nvram");
        let geo = Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        };
        let (storage, _) = MmapStorage::open(&nvram, geo.region_len()).expect("mmap");
        let (mut log, _) = NvLog::open(Arc::new(storage), geo, Role::Source).expect("log");
        let mut n = [0u8; cursor::NAME_LEN];
        n[0] = 5;
        n[1..6].copy_from_slice(b"alpha");
        log.write_user(cursor::NAME, &n);
        log.write_user(cursor::APPLIED_SEQ, &3u64.to_le_bytes());
        log.write_user(cursor::DURABLE_SEQ, &2u64.to_le_bytes());
        for seq in 4..=6 {
            log.append(&mut rec(seq)).expect("append").expect("fits");
        }
        log.flush_user(0, 128).expect("flush");
        drop(log);
        let mut b = crate::backlog::Backlog::open(&default_backlog(&nvram)).expect("backlog");
        b.append(&[rec(1), rec(2), rec(3)]).expect("append");
        drop(b);

        let before = (
            std::fs::read(&nvram).expect("read"),
            std::fs::read(default_backlog(&nvram)).expect("read"),
        );
        let r = check(&nvram, None, true).expect("check");
        assert!(r.ok, "{}", inspect::render_text(&r, true));
        assert_eq!(r.files.len(), 2);
        assert_eq!(r.files[0].seq_range(), Some((4, 6)));
        assert_eq!(r.files[1].seq_range(), Some((1, 3)));
        match &r.files[0].user_area {
            Some(UserArea::Source(c)) => {
                assert_eq!(
                    (c.name.as_str(), c.applied_seq, c.durable_seq),
                    ("alpha", 3, 2)
                )
            }
            other => panic!("cursors: {other:?}"),
        }
        assert!(r.issues.is_empty(), "{:?}", r.issues);
        let after = (
            std::fs::read(&nvram).expect("read"),
            std::fs::read(default_backlog(&nvram)).expect("read"),
        );
        assert!(before == after, "check modified a file");
        assert!(check(&dir.path().join("missing"), None, false).is_err());
    }
}
