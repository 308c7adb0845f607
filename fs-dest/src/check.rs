//! `fs-dest check`: verify the destination's NVRAM file and the journals of its sources
//! offline, with no server running. Files are only read (opened read-only, never created);
//! the verification is `proto::inspect`'s, the slot table is decoded by `slots.rs`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::inspect::{self, DestSlot, FileReport, Header, Issue, Options, Report, UserArea};
use proto::nvlog::{Role, USER_AREA_OFFSET};

use crate::journal;
use crate::server;
use crate::slots::{self, Slot, MAX_SLOTS, SLOT_LEN};

/// Read a whole file without opening it for writing (see [`proto::storage::read_regular`]).
fn read_only(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(proto::storage::read_regular(path)?)
}

/// The used slots of the slot table in an NVRAM image (as many as the file holds).
fn slot_table(bytes: &[u8]) -> Vec<DestSlot> {
    (0..MAX_SLOTS)
        .filter_map(|i| {
            let at = USER_AREA_OFFSET + i * SLOT_LEN;
            let raw: &[u8; SLOT_LEN] = bytes.get(at..at + SLOT_LEN)?.try_into().ok()?;
            let s = Slot::decode(raw)?;
            Some(DestSlot {
                index: i,
                name: s.name,
                applied_seq: s.applied_seq,
                generation: s.generation,
            })
        })
        .collect()
}

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The destination root.
    pub root: PathBuf,
    /// Only this source's journals (the NVRAM is checked whole).
    pub source: Option<String>,
    /// The NVRAM file (default: the one in `ROOT/fs-dest.nvram.json`).
    pub nvram: Option<PathBuf>,
    /// List every record.
    pub records: bool,
}

/// The sources under ROOT that have a journal directory, sorted.
fn sources(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().join("journal").is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The journal files of one source, by partition.
fn journals(root: &Path, source: &str) -> anyhow::Result<Vec<(u16, PathBuf)>> {
    let dir = root.join(source).join("journal");
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(p) = journal::partition_of_file_name(&name) {
            out.push((p, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Check the NVRAM file and the journals; the report lists every file.
pub fn check(o: &CheckOptions) -> anyhow::Result<Report> {
    let opts = Options { records: o.records };
    let mut report = Report::default();
    if let Some(s) = &o.source {
        slots::check_name(s)?;
        if !o.root.join(s).is_dir() {
            anyhow::bail!("no source {s:?} under {}", o.root.display());
        }
    }
    let (nvram, recorded) = match &o.nvram {
        Some(n) => (Some(n.clone()), None),
        None => match server::read_nvram_config(&o.root) {
            Ok(c) => (Some(c.nvram.clone()), Some(c)),
            Err(e) => {
                report.issues.push(Issue {
                    severity: inspect::Severity::Warning,
                    offset: None,
                    partition: None,
                    after_seq: None,
                    message: format!("NVRAM not checked: {e}"),
                });
                (None, None)
            }
        },
    };
    let mut nv: Option<FileReport> = None;
    if let Some(path) = &nvram {
        let bytes = read_only(path)?;
        let mut r = inspect::check_nvram(
            &path.display().to_string(),
            &bytes,
            Some(Role::Destination),
            opts,
        );
        if let Header::Nvlog {
            role: 2,
            partitions,
            partition_size,
            ..
        } = r.header
        {
            r.user_area = Some(UserArea::Destination {
                slots: slot_table(&bytes),
            });
            if let Some(c) = &recorded {
                if (c.partitions, c.partition_size) != (partitions, partition_size) {
                    r.issues.push(Issue {
                        severity: inspect::Severity::Error,
                        offset: Some(12),
                        partition: None,
                        after_seq: None,
                        message: format!(
                            "the superblock says {partitions} partitions of {partition_size} bytes, {} says {} of {}",
                            o.root.join(server::NVRAM_CONFIG).display(),
                            c.partitions,
                            c.partition_size
                        ),
                    });
                }
            }
        }
        nv = Some(r);
    }
    let names = match &o.source {
        Some(s) => vec![s.clone()],
        None => sources(&o.root)?,
    };
    let slots_found: Vec<DestSlot> = match nv.as_ref().and_then(|r| r.user_area.as_ref()) {
        Some(UserArea::Destination { slots }) => slots.clone(),
        _ => Vec::new(),
    };
    let mut journal_reports = Vec::new();
    for name in &names {
        let mut held: Vec<u64> = Vec::new();
        for (p, path) in journals(&o.root, name)? {
            let bytes = read_only(&path)?;
            let r =
                inspect::check_journal(&path.display().to_string(), &bytes, Some((name, p)), opts);
            held.extend(
                r.segments
                    .iter()
                    .flat_map(|s| s.seqs.iter().map(|&(_, q)| q)),
            );
            journal_reports.push(r);
        }
        // With the records still in NVRAM, the journals must hold every record after the
        // applied one: a CP refuses a gap.
        let slot = slots_found.iter().find(|s| &s.name == name);
        if let (Some(slot), Some(r)) = (slot, &nv) {
            held.extend(r.segments.iter().flat_map(|s| {
                s.seqs
                    .iter()
                    .filter(|&&(origin, _)| origin as usize == slot.index)
                    .map(|&(_, q)| q)
            }));
        }
        report.issues.extend(inspect::coverage_gaps(
            &format!("source {name:?}"),
            "its journals and the NVRAM",
            held,
            slot.map(|s| s.applied_seq).unwrap_or(0),
        ));
    }
    report.files.extend(nv);
    report.files.extend(journal_reports);
    report.finish();
    Ok(report)
}

/// `fs-dest check`: print the report (text or JSON); an error when anything failed.
pub fn run(o: &CheckOptions, json: bool) -> anyhow::Result<()> {
    let report = check(o)?;
    let out = if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        inspect::render_text(&report, o.records)
    };
    use std::io::Write as _;
    // A closed pipe (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    if !report.ok {
        anyhow::bail!(
            "check failed: {} error(s) under {}",
            report.errors,
            o.root.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::frame::{self, KIND_RECORD};

    fn rec(seq: u64) -> Vec<u8> {
        let op = proto::Op::Unlink {
            path: format!("f{seq}").into_bytes(),
        };
        frame::encode(seq, 1, 2, KIND_RECORD, 0, &op.encode()).expect("frame")
    }

    /// The journal header `proto::inspect` reads is the one `journal.rs` writes, and a journal
    /// written by `Journal` checks out, unchanged by the check.
    #[test]
    fn journals_written_by_the_daemon_check_out() {
        assert_eq!(
            journal::encode_header("alpha", 2),
            inspect::journal_header("alpha", 2)
        );
        assert_eq!(journal::HEADER_LEN, inspect::JOURNAL_HEADER_LEN);
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("alpha").join("journal");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut j = journal::Journal::open(&dir, "alpha", 2).expect("open");
        let frames: Vec<Vec<u8>> = (1..=4).map(rec).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        j.append(&refs).expect("append");
        drop(j);
        let path = journal::journal_path(&dir, 2);
        let before = std::fs::read(&path).expect("read");
        let o = CheckOptions {
            root: root.path().to_path_buf(),
            source: None,
            nvram: None,
            records: true,
        };
        let r = check(&o).expect("check");
        assert!(r.ok, "{}", inspect::render_text(&r, true));
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.files[0].seq_range(), Some((1, 4)));
        // No NVRAM configured: a warning, not a failure.
        assert_eq!(r.warnings, 1);
        assert_eq!(std::fs::read(&path).expect("read"), before);

        // A flipped byte in the second record: corruption naming the file's offset.
        let mut bad = before.clone();
        let second = journal::HEADER_LEN + frames[0].len();
        bad[second + 40] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        let r = check(&o).expect("check");
        assert!(!r.ok);
        let text = inspect::render_text(&r, false);
        assert!(
            text.contains(&format!("corrupt record at offset {second}")),
            "{text}"
        );
    }
}
