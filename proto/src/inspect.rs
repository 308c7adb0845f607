//! Offline inspection of nvmirror's files: the NVRAM regions of both daemons, the source's
//! backlog and the destination's journals (`fs-source check`, `fs-dest check`).
//!
//! Sans-IO: every function takes the bytes of one file and returns a [`FileReport`] (header
//! fields, per partition or file the records held, their sequence range, CRC failures, torn
//! tails, corruption), never panicking and never needing the daemon. The scans follow the
//! daemons' own recovery policies (see [`crate::nvlog`] and the journal layout in
//! `fs-dest/src/journal.rs`): a frame that does not check out is a *torn tail* when nothing
//! valid follows it, and *corruption* when a valid frame with a higher sequence number does.
//! Unlike the daemons, a check goes on past corruption, so one report lists every damage.
//!
//! What fails verification ([`Severity::Error`]): a damaged or foreign header, a file of the
//! wrong size, a frame that does not check out (bad CRC, torn, corrupt), a frame whose payload
//! is not a record. What is only worth a look ([`Severity::Warning`]): a blank file, gaps
//! between the sequence ranges of partitions or files (a normal state while records are moved
//! between NVRAM, backlog and journals).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::frame::{self, Frame, FrameError, HEADER_LEN, KIND_NESTED, KIND_RECORD};
use crate::nvlog::{self, u32_at, u64_at, Geometry, Role, PARTITION_HEADER_LEN, SUPERBLOCK_LEN};
use crate::record::Op;

/// Magic number of the source's backlog file (`fs-source/src/backlog.rs`).
pub const BACKLOG_MAGIC: &[u8; 8] = b"NVBKLG01";
/// Bytes of the backlog header (magic, 8 reserved bytes).
pub const BACKLOG_HEADER_LEN: usize = 16;
/// Magic number of a destination journal file (`fs-dest/src/journal.rs`).
pub const JOURNAL_MAGIC: &[u8; 8] = b"NVJRNL01";
/// Bytes of a journal header.
pub const JOURNAL_HEADER_LEN: usize = 64;
/// Journal format version this build reads.
pub const JOURNAL_VERSION: u16 = 1;
/// Bytes of the source name field of a journal header.
pub const JOURNAL_NAME_LEN: usize = 48;

/// Longest path summary shown for one record.
const SUMMARY_LEN: usize = 96;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file fails verification (the check exits non-zero).
    Error,
    /// Worth a look, but a state the daemons produce in normal operation.
    Warning,
}

/// One finding, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// Error or warning.
    pub severity: Severity,
    /// Absolute byte offset in the file, when the finding has one.
    pub offset: Option<u64>,
    /// NVLOG partition (or the journal's source partition).
    pub partition: Option<usize>,
    /// Sequence number of the last good record before the finding.
    pub after_seq: Option<u64>,
    /// What is wrong, in words that name the place.
    pub message: String,
}

impl Issue {
    fn error(message: String) -> Issue {
        Issue {
            severity: Severity::Error,
            offset: None,
            partition: None,
            after_seq: None,
            message,
        }
    }

    fn warning(message: String) -> Issue {
        Issue {
            severity: Severity::Warning,
            ..Issue::error(message)
        }
    }

    fn at(mut self, offset: usize, partition: Option<usize>, after_seq: Option<u64>) -> Issue {
        self.offset = Some(offset as u64);
        self.partition = partition;
        self.after_seq = after_seq;
        self
    }
}

/// Which kind of file a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// `fs-source mount --nvram`.
    SourceNvram,
    /// `fs-dest serve --nvram`.
    DestNvram,
    /// An NVRAM file whose role could not be read.
    Nvram,
    /// `NVRAM.backlog` of a source.
    Backlog,
    /// `ROOT/NAME/journal/part-P.jnl` of a destination.
    Journal,
}

impl FileKind {
    /// Words for the text report.
    pub fn describe(&self) -> &'static str {
        match self {
            FileKind::SourceNvram => "source NVRAM",
            FileKind::DestNvram => "destination NVRAM",
            FileKind::Nvram => "NVRAM",
            FileKind::Backlog => "backlog",
            FileKind::Journal => "journal",
        }
    }
}

/// The header fields of a file, as found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum Header {
    /// The header could not be read (see the issues).
    Unreadable,
    /// A blank region or an empty file: never written by a daemon.
    Blank,
    /// An NVLOG superblock.
    Nvlog {
        /// Format version.
        version: u32,
        /// 1 = source, 2 = destination.
        role: u32,
        /// Number of partitions.
        partitions: usize,
        /// Bytes per partition, header included.
        partition_size: usize,
        /// The file size this geometry needs.
        expected_size: u64,
    },
    /// A backlog header.
    Backlog,
    /// A journal header.
    Journal {
        /// Format version.
        version: u16,
        /// The source partition whose records the journal holds.
        partition: u16,
        /// The source's name.
        source: String,
    },
}

/// The user area of a source NVRAM: its cursors (decoded by `fs-source check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceCursors {
    /// The source the NVRAM belongs to.
    pub name: String,
    /// Volume generation.
    pub generation: u64,
    /// Highest sequence number logged and applied to the backing volume.
    pub applied_seq: u64,
    /// Highest sequence number known durable on the backing volume.
    pub durable_seq: u64,
    /// The backing root's replay marker (generation, sequence number) at the durable cursor.
    pub durable_marker: Option<(u64, u64)>,
}

/// One used slot of a destination NVRAM's slot table (decoded by `fs-dest check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestSlot {
    /// Slot index: the `origin` of the source's nested frames.
    pub index: usize,
    /// The source's name.
    pub name: String,
    /// Highest sequence number applied to its image.
    pub applied_seq: u64,
    /// Its generation (fencing epoch).
    pub generation: u64,
}

/// What a daemon keeps in its NVRAM's user area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum UserArea {
    /// A source's cursors.
    Source(SourceCursors),
    /// A destination's slot table.
    Destination {
        /// Used slots.
        slots: Vec<DestSlot>,
    },
}

/// The state of one NVLOG partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentState {
    /// No record of the partition's current epoch.
    Empty,
    /// Holds the newest records: appends go here.
    Current,
    /// Holds older records, waiting for a CP (source) or the destager (destination).
    Sealed,
    /// Its header is damaged, or the file ends before it.
    Damaged,
    /// The records of a backlog or journal file.
    Frames,
}

/// The source sequence numbers one origin (a source's slot) has in a destination partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OriginRange {
    /// Slot index (frame `origin`).
    pub origin: u32,
    /// Records of that source.
    pub records: u64,
    /// Its lowest source sequence number here.
    pub first_seq: u64,
    /// Its highest source sequence number here.
    pub last_seq: u64,
}

/// One record found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordInfo {
    /// Absolute byte offset of the frame in the file.
    pub offset: u64,
    /// Frame length (header and payload, no padding).
    pub len: u64,
    /// The frame's sequence number (on a destination NVRAM: the destination's).
    pub seq: u64,
    /// The record's operation (`write`, `rename`...), or `undecodable`.
    pub op: String,
    /// The paths it names, shortened.
    pub summary: String,
    /// For a destination's nested frame: the source slot and the source's sequence number.
    pub inner: Option<InnerRecord>,
}

/// The source frame inside a destination's nested frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InnerRecord {
    /// Slot index of the source.
    pub origin: u32,
    /// The source's sequence number.
    pub seq: u64,
    /// The source partition that logged it.
    pub partition: u16,
}

/// One NVLOG partition, or the frames of a backlog or journal file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// NVLOG partition index (journal: its source partition; backlog: none).
    pub partition: Option<usize>,
    /// Absolute offset of the first frame.
    pub offset: u64,
    /// State.
    pub state: SegmentState,
    /// The partition's epoch (NVLOG only).
    pub epoch: Option<u32>,
    /// Valid records found.
    pub records: u64,
    /// Bytes from the first frame to the end of the last valid one (padding included).
    pub used_bytes: u64,
    /// Bytes available for frames (NVLOG only).
    pub capacity_bytes: Option<u64>,
    /// Lowest sequence number.
    pub first_seq: Option<u64>,
    /// Highest sequence number.
    pub last_seq: Option<u64>,
    /// Frames of this segment whose CRC does not match.
    pub crc_bad: u64,
    /// Offset of a torn tail, if any.
    pub torn_tail: Option<u64>,
    /// Offsets of corrupt frames (damage with valid records after it).
    pub corrupt: Vec<u64>,
    /// On a destination NVRAM: the source records per origin.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<OriginRange>,
    /// Every record, when asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub record_list: Vec<RecordInfo>,
    /// The sequence numbers of the valid records (on a destination NVRAM: the inner, source
    /// ones, with their origin), for checks across files.
    #[serde(skip)]
    pub seqs: Vec<(u32, u64)>,
}

impl Segment {
    fn new(partition: Option<usize>, offset: usize, state: SegmentState) -> Segment {
        Segment {
            partition,
            offset: offset as u64,
            state,
            epoch: None,
            records: 0,
            used_bytes: 0,
            capacity_bytes: None,
            first_seq: None,
            last_seq: None,
            crc_bad: 0,
            torn_tail: None,
            corrupt: Vec::new(),
            origins: Vec::new(),
            record_list: Vec::new(),
            seqs: Vec::new(),
        }
    }
}

/// Everything found in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileReport {
    /// The file's path (as given).
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Its size in bytes.
    pub size: u64,
    /// Its header.
    pub header: Header,
    /// The NVRAM user area, decoded by the daemon's own code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_area: Option<UserArea>,
    /// Partitions (NVRAM) or the one run of frames (backlog, journal).
    pub segments: Vec<Segment>,
    /// Findings, in file order.
    pub issues: Vec<Issue>,
}

impl FileReport {
    fn new(path: &str, kind: FileKind, size: usize) -> FileReport {
        FileReport {
            path: path.to_string(),
            kind,
            size: size as u64,
            header: Header::Unreadable,
            user_area: None,
            segments: Vec::new(),
            issues: Vec::new(),
        }
    }

    /// Number of error findings.
    pub fn errors(&self) -> usize {
        count(&self.issues, Severity::Error)
    }

    /// Number of warnings.
    pub fn warnings(&self) -> usize {
        count(&self.issues, Severity::Warning)
    }

    /// Valid records in the whole file.
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }

    /// Lowest and highest sequence number in the file.
    pub fn seq_range(&self) -> Option<(u64, u64)> {
        let first = self.segments.iter().filter_map(|s| s.first_seq).min()?;
        let last = self.segments.iter().filter_map(|s| s.last_seq).max()?;
        Some((first, last))
    }
}

fn count(issues: &[Issue], s: Severity) -> usize {
    issues.iter().filter(|i| i.severity == s).count()
}

/// The outcome of a whole `check`: one report per file, and findings across files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// One per file checked.
    pub files: Vec<FileReport>,
    /// Findings that concern several files (sequence gaps between them).
    pub issues: Vec<Issue>,
    /// Errors in all files.
    pub errors: usize,
    /// Warnings in all files.
    pub warnings: usize,
    /// True when nothing failed verification.
    pub ok: bool,
}

impl Report {
    /// Count the findings and set `ok`; call once every file is added.
    pub fn finish(&mut self) {
        self.errors = self.files.iter().map(|f| f.errors()).sum::<usize>()
            + count(&self.issues, Severity::Error);
        self.warnings = self.files.iter().map(|f| f.warnings()).sum::<usize>()
            + count(&self.issues, Severity::Warning);
        self.ok = self.errors == 0;
    }
}

/// What to collect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// List every record ([`Segment::record_list`]).
    pub records: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

/// The superblock fields of an NVLOG region, checked (magic, CRC, version, geometry limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Format version.
    pub version: u32,
    /// Role number (1 = source, 2 = destination).
    pub role: u32,
    /// The geometry it describes.
    pub geometry: Geometry,
}

/// Parse the superblock at the start of `bytes`; `Ok(None)` for a blank (all-zero) one.
pub fn parse_superblock(bytes: &[u8]) -> Result<Option<Superblock>, String> {
    if bytes.len() < 32 {
        return Err(format!(
            "file is only {} bytes: too short for an NVLOG superblock (32 bytes at offset 0)",
            bytes.len()
        ));
    }
    let sb = &bytes[..32];
    if sb.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &sb[0..8] != nvlog::MAGIC {
        return Err("not an nvmirror NVRAM file (bad magic at offset 0)".into());
    }
    let stored = u32_at(sb, 28);
    let computed = crc32c::crc32c(&sb[..28]);
    if stored != computed {
        return Err(format!(
            "superblock CRC mismatch at offset 28 (stored {stored:#010x}, computed {computed:#010x}): the header is damaged"
        ));
    }
    let version = u32_at(sb, 8);
    if version != nvlog::VERSION {
        return Err(format!(
            "format version {version} at offset 8, this build reads {}",
            nvlog::VERSION
        ));
    }
    let geometry = Geometry {
        partitions: u32_at(sb, 12) as usize,
        partition_size: usize::try_from(u64_at(sb, 16)).unwrap_or(usize::MAX),
    };
    geometry
        .validate()
        .map_err(|e| format!("superblock: {e}"))?;
    if geometry
        .partitions
        .checked_mul(geometry.partition_size)
        .and_then(|n| n.checked_add(SUPERBLOCK_LEN))
        .is_none()
    {
        return Err(format!(
            "superblock: {} partitions of {} bytes do not fit in memory addresses",
            geometry.partitions, geometry.partition_size
        ));
    }
    Ok(Some(Superblock {
        version,
        role: u32_at(sb, 24),
        geometry,
    }))
}

fn role_of(n: u32) -> Option<Role> {
    match n {
        1 => Some(Role::Source),
        2 => Some(Role::Destination),
        _ => None,
    }
}

fn lossy_short(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > SUMMARY_LEN {
        let cut: String = s.chars().take(SUMMARY_LEN).collect();
        format!("{cut}...")
    } else {
        s.into_owned()
    }
}

/// The operation name and a short summary of the paths of a record payload.
fn describe_op(payload: &[u8]) -> Result<(String, String), String> {
    let op = Op::decode(payload).map_err(|e| format!("payload is not a record: {e}"))?;
    let paths: Vec<String> = op
        .paths()
        .iter()
        .map(|p| {
            if p.is_empty() {
                "/".to_string()
            } else {
                lossy_short(p)
            }
        })
        .collect();
    let mut summary = match &op {
        Op::Times { entries } => format!("{} entries: {}", entries.len(), paths.join(", ")),
        _ => paths.join(" -> "),
    };
    match &op {
        Op::Write { offset, data, .. } => {
            summary.push_str(&format!(" ({} bytes at {offset})", data.len()))
        }
        Op::Symlink { target, .. } => {
            summary.push_str(&format!(" (target {:?})", lossy_short(target)))
        }
        _ => {}
    }
    if summary.chars().count() > 2 * SUMMARY_LEN {
        summary = summary.chars().take(2 * SUMMARY_LEN).collect::<String>() + "...";
    }
    Ok((op.kind().to_string(), summary))
}

/// What one valid frame holds, for the record list and the per-origin ranges.
struct Decoded {
    op: String,
    summary: String,
    inner: Option<InnerRecord>,
}

/// Decode a valid frame's payload according to its kind; an error names what is wrong.
fn decode_payload(f: &Frame<'_>) -> Result<Decoded, String> {
    match f.header.kind {
        KIND_RECORD => {
            let (op, summary) = describe_op(f.payload)?;
            Ok(Decoded {
                op,
                summary,
                inner: None,
            })
        }
        KIND_NESTED => {
            let inner = frame::decode(f.payload).map_err(|e| format!("inner frame: {e}"))?;
            if inner.header.kind != KIND_RECORD {
                return Err(format!("inner frame of kind {}", inner.header.kind));
            }
            let (op, summary) = describe_op(inner.payload)?;
            Ok(Decoded {
                op,
                summary,
                inner: Some(InnerRecord {
                    origin: f.header.origin,
                    seq: inner.header.seq,
                    partition: inner.header.partition,
                }),
            })
        }
        k => Err(format!("frame of unknown kind {k}")),
    }
}

/// Account one valid frame at `offset` in `seg`.
fn note_frame(
    seg: &mut Segment,
    issues: &mut Vec<Issue>,
    f: &Frame<'_>,
    offset: usize,
    opts: Options,
) {
    let seq = f.header.seq;
    seg.records += 1;
    seg.first_seq.get_or_insert(seq);
    seg.last_seq = Some(seq);
    let decoded = match decode_payload(f) {
        Ok(d) => d,
        Err(why) => {
            issues.push(
                Issue::error(format!(
                    "{}record {seq} at offset {offset}: {why}",
                    match seg.state {
                        SegmentState::Frames => String::new(),
                        _ => partition_words(seg.partition),
                    }
                ))
                .at(offset, seg.partition, Some(seq)),
            );
            Decoded {
                op: "undecodable".into(),
                summary: String::new(),
                inner: None,
            }
        }
    };
    match decoded.inner {
        Some(inner) => {
            seg.seqs.push((inner.origin, inner.seq));
            match seg.origins.iter_mut().find(|o| o.origin == inner.origin) {
                Some(o) => {
                    o.records += 1;
                    o.first_seq = o.first_seq.min(inner.seq);
                    o.last_seq = o.last_seq.max(inner.seq);
                }
                None => seg.origins.push(OriginRange {
                    origin: inner.origin,
                    records: 1,
                    first_seq: inner.seq,
                    last_seq: inner.seq,
                }),
            }
        }
        None => seg.seqs.push((f.header.origin, seq)),
    }
    if opts.records {
        seg.record_list.push(RecordInfo {
            offset: offset as u64,
            len: f.bytes.len() as u64,
            seq,
            op: decoded.op,
            summary: decoded.summary,
            inner: decoded.inner,
        });
    }
}

fn partition_words(p: Option<usize>) -> String {
    match p {
        Some(p) => format!("partition {p}: "),
        None => String::new(),
    }
}

/// Check the frame at absolute `off` of NVLOG partition `p` (epoch, partition, kind, bounds,
/// CRC), as the daemon's recovery scan does.
fn nvlog_frame_at(
    bytes: &[u8],
    p: usize,
    epoch: u32,
    kind: u16,
    off: usize,
    end: usize,
) -> Result<Frame<'_>, (String, bool)> {
    if off + HEADER_LEN > end {
        return Err(("no room for a frame header".into(), false));
    }
    let h = frame::parse_header(&bytes[off..end]).map_err(|e| (e.to_string(), false))?;
    if h.epoch != epoch || h.partition as usize != p {
        return Err((
            format!(
                "frame of partition {} epoch {} (left from an earlier use)",
                h.partition, h.epoch
            ),
            false,
        ));
    }
    if h.kind != kind {
        return Err((
            format!(
                "frame of kind {} (left from an earlier use, or the inner frame of one)",
                h.kind
            ),
            false,
        ));
    }
    if off + h.frame_len() > end {
        return Err((
            format!(
                "frame of {} bytes runs past the partition end",
                h.frame_len()
            ),
            false,
        ));
    }
    frame::decode(&bytes[off..end]).map_err(|e| {
        let crc = matches!(e, FrameError::BadCrc { .. });
        (e.to_string(), crc)
    })
}

/// Scan NVLOG partition `p` (its header at `base`), whose bytes end at `end` (the partition
/// end, or the end of a truncated file).
fn scan_partition(
    bytes: &[u8],
    role: Role,
    geometry: Geometry,
    p: usize,
    issues: &mut Vec<Issue>,
    opts: Options,
) -> Segment {
    let base = SUPERBLOCK_LEN + p * geometry.partition_size;
    let start = base + PARTITION_HEADER_LEN;
    let full_end = base + geometry.partition_size;
    let end = full_end.min(bytes.len());
    let mut seg = Segment::new(Some(p), start, SegmentState::Empty);
    seg.capacity_bytes = Some(geometry.capacity() as u64);
    if base + 16 > bytes.len() {
        seg.state = SegmentState::Damaged;
        issues.push(
            Issue::error(format!(
                "partition {p}: the file ends at {} bytes, before the partition header at offset {base}",
                bytes.len()
            ))
            .at(base, Some(p), None),
        );
        return seg;
    }
    let h = &bytes[base..base + 16];
    if &h[0..8] != nvlog::PART_MAGIC || u32_at(h, 12) != crc32c::crc32c(&h[..12]) {
        seg.state = SegmentState::Damaged;
        issues.push(
            Issue::error(format!(
                "partition {p}: header at offset {base} is damaged (bad magic or CRC); its records cannot be trusted"
            ))
            .at(base, Some(p), None),
        );
        return seg;
    }
    let epoch = u32_at(h, 8);
    seg.epoch = Some(epoch);
    if end < full_end {
        issues.push(
            Issue::error(format!(
                "partition {p}: the file ends at {} bytes, inside the partition (it needs {full_end}): truncated",
                bytes.len()
            ))
            .at(end, Some(p), None),
        );
    }
    let kind = match role {
        Role::Source => KIND_RECORD,
        Role::Destination => KIND_NESTED,
    };
    let magic = frame::MAGIC.to_le_bytes();
    let mut off = start;
    let mut last: Option<u64> = None;
    loop {
        if off + HEADER_LEN > end {
            break;
        }
        let (failure, crc) = match nvlog_frame_at(bytes, p, epoch, kind, off, end) {
            Ok(f) if last.is_some_and(|l| f.header.seq != l.wrapping_add(1)) => (
                format!(
                    "sequence {} does not follow {}",
                    f.header.seq,
                    last.unwrap_or(0)
                ),
                false,
            ),
            Ok(f) => {
                note_frame(&mut seg, issues, &f, off, opts);
                last = Some(f.header.seq);
                off += frame::padded_len(f.bytes.len());
                seg.used_bytes = (off - start) as u64;
                continue;
            }
            Err(e) => e,
        };
        // A valid frame of this epoch further on makes this corruption (the daemon refuses
        // the log); otherwise it is a torn tail or the end of this epoch's records.
        let mut next = None;
        let mut at = off + 8;
        while at + HEADER_LEN <= end {
            if bytes[at..at + 4] == magic {
                if let Ok(f) = nvlog_frame_at(bytes, p, epoch, kind, at, end) {
                    if last.is_none_or(|l| f.header.seq > l) {
                        next = Some((at, f.header.seq));
                        break;
                    }
                }
            }
            at += 8;
        }
        if crc {
            seg.crc_bad += 1;
        }
        if let Some((at, seq)) = next {
            seg.corrupt.push(off as u64);
            issues.push(
                Issue::error(format!(
                    "partition {p}: corrupt record at offset {off}{}: {failure}; valid records follow \
                     (seq {seq} at offset {at}), so this is not a torn write: the daemon refuses this file",
                    after_words(last)
                ))
                .at(off, Some(p), last),
            );
            off = at;
            last = None;
            continue;
        }
        let ours = frame::parse_header(&bytes[off..end])
            .is_ok_and(|h| h.epoch == epoch && h.partition as usize == p);
        let blank = bytes[off..off + HEADER_LEN].iter().all(|&b| b == 0);
        if ours && !blank {
            seg.torn_tail = Some(off as u64);
            issues.push(
                Issue::error(format!(
                    "partition {p}: torn record at offset {off}{}: {failure}; nothing valid follows, \
                     so the daemon drops it at its next start (a write cut short by a crash)",
                    after_words(last)
                ))
                .at(off, Some(p), last),
            );
        }
        break;
    }
    if seg.records > 0 {
        seg.state = SegmentState::Sealed;
    }
    seg
}

fn after_words(last: Option<u64>) -> String {
    match last {
        Some(l) => format!(" (after record {l})"),
        None => " (the partition's first record)".into(),
    }
}

/// Check an NVRAM file (either daemon's). `expect` is the role the caller's daemon writes:
/// another role is an error, and the file is still scanned with the role it says it has.
pub fn check_nvram(path: &str, bytes: &[u8], expect: Option<Role>, opts: Options) -> FileReport {
    let kind = match expect {
        Some(Role::Source) => FileKind::SourceNvram,
        Some(Role::Destination) => FileKind::DestNvram,
        None => FileKind::Nvram,
    };
    let mut r = FileReport::new(path, kind, bytes.len());
    let sb = match parse_superblock(bytes) {
        Ok(Some(sb)) => sb,
        Ok(None) => {
            r.header = Header::Blank;
            r.issues.push(Issue::warning(
                "blank NVRAM (superblock all zero): never formatted; the daemon formats it at its first start".into(),
            ));
            return r;
        }
        Err(why) => {
            r.issues.push(Issue::error(why).at(0, None, None));
            return r;
        }
    };
    let g = sb.geometry;
    let expected = g.region_len() as u64;
    r.header = Header::Nvlog {
        version: sb.version,
        role: sb.role,
        partitions: g.partitions,
        partition_size: g.partition_size,
        expected_size: expected,
    };
    let role = match role_of(sb.role) {
        Some(role) => role,
        None => {
            r.issues.push(
                Issue::error(format!("unknown role {} at offset 24", sb.role)).at(24, None, None),
            );
            return r;
        }
    };
    r.kind = match role {
        Role::Source => FileKind::SourceNvram,
        Role::Destination => FileKind::DestNvram,
    };
    if let Some(want) = expect {
        if want != role {
            r.issues.push(
                Issue::error(format!(
                    "this is a {} NVRAM file (role {} at offset 24), not a {} one; check it with {}",
                    role_words(role),
                    sb.role,
                    role_words(want),
                    match role {
                        Role::Source => "fs-source check",
                        Role::Destination => "fs-dest check",
                    }
                ))
                .at(24, None, None),
            );
        }
    }
    if (bytes.len() as u64) < expected {
        r.issues.push(
            Issue::error(format!(
                "file is {} bytes but its geometry ({} partitions of {} bytes) needs {expected}: truncated",
                bytes.len(),
                g.partitions,
                g.partition_size
            ))
            .at(bytes.len(), None, None),
        );
    } else if (bytes.len() as u64) > expected {
        r.issues.push(Issue::error(format!(
            "file is {} bytes but its geometry ({} partitions of {} bytes) needs exactly {expected}; the daemon refuses it",
            bytes.len(),
            g.partitions,
            g.partition_size
        )));
    }
    let mut issues = Vec::new();
    for p in 0..g.partitions {
        let seg = scan_partition(bytes, role, g, p, &mut issues, opts);
        r.segments.push(seg);
    }
    r.issues.extend(issues);
    // The partition holding the newest records is the current one (as `NvLog::open` decides).
    if let Some(cur) = r
        .segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.records > 0)
        .max_by_key(|(_, s)| s.last_seq)
        .map(|(i, _)| i)
    {
        r.segments[cur].state = SegmentState::Current;
    }
    if role == Role::Destination {
        // Destination sequence numbers run on across partitions (oldest first).
        let mut ranges: Vec<(usize, u64, u64)> = r
            .segments
            .iter()
            .filter_map(|s| Some((s.partition?, s.first_seq?, s.last_seq?)))
            .collect();
        ranges.sort_by_key(|&(_, first, _)| first);
        r.issues.extend(range_gaps("destination records", &ranges));
    } else {
        let mut ranges: Vec<(usize, u64, u64)> = r
            .segments
            .iter()
            .filter_map(|s| Some((s.partition?, s.first_seq?, s.last_seq?)))
            .collect();
        ranges.sort_by_key(|&(_, first, _)| first);
        r.issues.extend(range_gaps("records", &ranges));
    }
    r
}

fn role_words(r: Role) -> &'static str {
    match r {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

/// Warnings for gaps and overlaps between partitions' sequence ranges (sorted by first).
fn range_gaps(what: &str, ranges: &[(usize, u64, u64)]) -> Vec<Issue> {
    let mut out = Vec::new();
    for w in ranges.windows(2) {
        let ((pa, _, la), (pb, fb, _)) = (w[0], w[1]);
        if fb > la.saturating_add(1) {
            out.push(Issue::warning(format!(
                "{what} {}..{} are in no partition (partition {pa} ends at {la}, partition {pb} starts at {fb})",
                la + 1,
                fb - 1
            )));
        } else if fb <= la {
            out.push(Issue::warning(format!(
                "{what} {fb}..{la} are in two partitions ({pa} and {pb})"
            )));
        }
    }
    out
}

/// Scan back-to-back frames (backlog, journal) from `start` to the end of `bytes`, with the
/// journal's policy: kinds must be records, sequence numbers strictly increasing.
fn scan_frames(
    bytes: &[u8],
    start: usize,
    partition: Option<usize>,
    issues: &mut Vec<Issue>,
    opts: Options,
) -> Segment {
    let mut seg = Segment::new(partition, start, SegmentState::Frames);
    let magic = frame::MAGIC.to_le_bytes();
    let valid_after = |at: usize, last: Option<u64>| {
        frame::decode(&bytes[at..])
            .ok()
            .filter(|f| f.header.kind == KIND_RECORD && last.is_none_or(|l| f.header.seq > l))
    };
    let mut off = start;
    let mut last: Option<u64> = None;
    while off < bytes.len() {
        let (failure, crc) = match frame::decode(&bytes[off..]) {
            Ok(f) if f.header.kind != KIND_RECORD => {
                (format!("frame kind {}", f.header.kind), false)
            }
            Ok(f) if last.is_some_and(|l| f.header.seq <= l) => (
                format!(
                    "sequence {} does not follow {}",
                    f.header.seq,
                    last.unwrap_or(0)
                ),
                false,
            ),
            Ok(f) => {
                note_frame(&mut seg, issues, &f, off, opts);
                last = Some(f.header.seq);
                off += f.bytes.len();
                seg.used_bytes = (off - start) as u64;
                continue;
            }
            Err(e) => {
                let crc = matches!(e, FrameError::BadCrc { .. });
                (e.to_string(), crc)
            }
        };
        if crc {
            seg.crc_bad += 1;
        }
        let mut next = None;
        let mut at = off + 1;
        while at + HEADER_LEN <= bytes.len() {
            if bytes[at..at + 4] == magic {
                if let Some(f) = valid_after(at, last) {
                    next = Some((at, f.header.seq));
                    break;
                }
            }
            at += 1;
        }
        let words = match last {
            Some(l) => format!(" (after record {l})"),
            None => " (the first record)".into(),
        };
        if let Some((at, seq)) = next {
            seg.corrupt.push(off as u64);
            issues.push(
                Issue::error(format!(
                    "corrupt record at offset {off}{words}: {failure}; valid records follow (seq {seq} \
                     at offset {at}), so this is not a torn write"
                ))
                .at(off, partition, last),
            );
            off = at;
            last = None;
            continue;
        }
        seg.torn_tail = Some(off as u64);
        issues.push(
            Issue::error(format!(
                "torn record at offset {off}{words}: {failure}; nothing valid follows, so the daemon \
                 drops the {} bytes from there at its next start",
                bytes.len() - off
            ))
            .at(off, partition, last),
        );
        break;
    }
    seg
}

/// Check a source's backlog file (`NVRAM.backlog`).
pub fn check_backlog(path: &str, bytes: &[u8], opts: Options) -> FileReport {
    let mut r = FileReport::new(path, FileKind::Backlog, bytes.len());
    if bytes.iter().take(BACKLOG_HEADER_LEN).all(|&b| b == 0) && bytes.len() <= BACKLOG_HEADER_LEN {
        r.header = Header::Blank;
        r.issues.push(Issue::warning(format!(
            "{} bytes, no header: the source writes one at its next start",
            bytes.len()
        )));
        return r;
    }
    if bytes.len() < BACKLOG_HEADER_LEN {
        r.issues.push(
            Issue::error(format!(
                "file is only {} bytes: too short for the {BACKLOG_HEADER_LEN}-byte backlog header",
                bytes.len()
            ))
            .at(0, None, None),
        );
        return r;
    }
    if &bytes[..8] != BACKLOG_MAGIC {
        r.issues.push(
            Issue::error("not an nvmirror backlog (bad magic at offset 0)".into())
                .at(0, None, None),
        );
        return r;
    }
    r.header = Header::Backlog;
    let mut issues = Vec::new();
    let seg = scan_frames(bytes, BACKLOG_HEADER_LEN, None, &mut issues, opts);
    r.segments.push(seg);
    r.issues.extend(issues);
    r
}

/// Build a journal header (the layout of `fs-dest/src/journal.rs`; used by tests).
pub fn journal_header(source: &str, partition: u16) -> [u8; JOURNAL_HEADER_LEN] {
    let mut h = [0u8; JOURNAL_HEADER_LEN];
    h[0..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..10].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&partition.to_le_bytes());
    let n = source.len().min(JOURNAL_NAME_LEN);
    h[12..12 + n].copy_from_slice(&source.as_bytes()[..n]);
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check a destination journal file. `expect` is the source and partition its place
/// (`ROOT/NAME/journal/part-P.jnl`) says it holds; a header naming others is an error.
pub fn check_journal(
    path: &str,
    bytes: &[u8],
    expect: Option<(&str, u16)>,
    opts: Options,
) -> FileReport {
    let mut r = FileReport::new(path, FileKind::Journal, bytes.len());
    if bytes.is_empty() {
        r.header = Header::Blank;
        r.issues.push(Issue::warning(
            "empty file: the destination writes its header when it next opens it".into(),
        ));
        return r;
    }
    let bad = |why: String| Issue::error(why).at(0, None, None);
    if bytes.len() < JOURNAL_HEADER_LEN {
        r.issues.push(bad(format!(
            "file is only {} bytes: too short for the {JOURNAL_HEADER_LEN}-byte journal header",
            bytes.len()
        )));
        return r;
    }
    let h = &bytes[..JOURNAL_HEADER_LEN];
    if &h[0..8] != JOURNAL_MAGIC {
        r.issues
            .push(bad("not an nvmirror journal (bad magic at offset 0)".into()));
        return r;
    }
    let stored = u32_at(h, 60);
    let computed = crc32c::crc32c(&h[..60]);
    if stored != computed {
        r.issues.push(
            Issue::error(format!(
                "journal header CRC mismatch at offset 60 (stored {stored:#010x}, computed {computed:#010x}): the header is damaged"
            ))
            .at(60, None, None),
        );
        return r;
    }
    let version = u16_at(h, 8);
    let partition = u16_at(h, 10);
    let name_end = h[12..60].iter().position(|&b| b == 0).unwrap_or(48);
    let source = String::from_utf8_lossy(&h[12..12 + name_end]).into_owned();
    r.header = Header::Journal {
        version,
        partition,
        source: source.clone(),
    };
    if version != JOURNAL_VERSION {
        r.issues.push(
            Issue::error(format!(
                "format version {version} at offset 8, this build reads {JOURNAL_VERSION}"
            ))
            .at(8, None, None),
        );
        return r;
    }
    if let Some((want_source, want_part)) = expect {
        if want_part != partition || journal_header(want_source, want_part)[12..60] != h[12..60] {
            r.issues.push(
                Issue::error(format!(
                    "header names partition {partition} of source {source:?}, but the file's place says partition {want_part} of {want_source:?}"
                ))
                .at(10, Some(partition as usize), None),
            );
        }
    }
    let mut issues = Vec::new();
    let seg = scan_frames(
        bytes,
        JOURNAL_HEADER_LEN,
        Some(partition as usize),
        &mut issues,
        opts,
    );
    r.segments.push(seg);
    r.issues.extend(issues);
    r
}

/// Warnings for the records after `after` that none of `held` (sequence numbers, any order,
/// repeats allowed) contains, between the lowest and highest held: `label` names the source
/// and `place` the files looked at.
pub fn coverage_gaps(label: &str, place: &str, mut held: Vec<u64>, after: u64) -> Vec<Issue> {
    held.retain(|&s| s > after);
    held.sort_unstable();
    held.dedup();
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    for s in held {
        if let Some(p) = prev {
            if s > p + 1 {
                let missing = if s - 1 == p + 1 {
                    format!("record {}", p + 1)
                } else {
                    format!("records {}..{}", p + 1, s - 1)
                };
                out.push(Issue::warning(format!(
                    "{label}: {missing} in none of {place} (held: up to {p}, then from {s})"
                )));
            }
        }
        prev = Some(s);
    }
    out
}

/// The slot indexes by origin, to name sources in a destination report.
fn slot_names(r: &FileReport) -> BTreeMap<u32, String> {
    match &r.user_area {
        Some(UserArea::Destination { slots }) => slots
            .iter()
            .map(|s| (s.index as u32, s.name.clone()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn opt_range(first: Option<u64>, last: Option<u64>) -> String {
    match (first, last) {
        (Some(f), Some(l)) => format!("seq {f}..{l}"),
        _ => "no records".into(),
    }
}

/// The report as text: per file a summary (kind, size, header, per partition: state, records,
/// sequence range, CRC failures), then its findings; with `records`, every record.
pub fn render_text(report: &Report, records: bool) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for f in &report.files {
        let _ = writeln!(o, "{}: {}, {} bytes", f.path, f.kind.describe(), f.size);
        match &f.header {
            Header::Unreadable => {
                let _ = writeln!(o, "  header     unreadable");
            }
            Header::Blank => {
                let _ = writeln!(o, "  header     blank");
            }
            Header::Nvlog {
                version,
                role,
                partitions,
                partition_size,
                expected_size,
            } => {
                let _ = writeln!(
                    o,
                    "  header     NVLOG v{version}, role {role} ({}), {partitions} partitions of {partition_size} bytes ({expected_size} bytes in all)",
                    role_of(*role).map(role_words).unwrap_or("unknown")
                );
            }
            Header::Backlog => {
                let _ = writeln!(o, "  header     backlog (NVBKLG01)");
            }
            Header::Journal {
                version,
                partition,
                source,
            } => {
                let _ = writeln!(
                    o,
                    "  header     journal v{version}, source {source:?}, source partition {partition}"
                );
            }
        }
        match &f.user_area {
            Some(UserArea::Source(c)) => {
                let marker = match c.durable_marker {
                    Some((g, s)) => format!(", backing marker gen {g} seq {s}"),
                    None => String::new(),
                };
                let _ = writeln!(
                    o,
                    "  cursors    source {:?}, generation {}, applied {}, durable {}{marker}",
                    c.name, c.generation, c.applied_seq, c.durable_seq
                );
            }
            Some(UserArea::Destination { slots }) => {
                if slots.is_empty() {
                    let _ = writeln!(o, "  slots      none used");
                }
                for s in slots {
                    let _ = writeln!(
                        o,
                        "  slot {:<6} source {:?}, applied {}, generation {}",
                        format!("{}:", s.index),
                        s.name,
                        s.applied_seq,
                        s.generation
                    );
                }
            }
            None => {}
        }
        let names = slot_names(f);
        for s in &f.segments {
            let mut parts: Vec<String> = Vec::new();
            let label = match (f.kind, s.partition) {
                (FileKind::Journal, _) | (_, None) => "frames:".to_string(),
                (_, Some(p)) => format!("partition {p}:"),
            };
            match s.state {
                SegmentState::Empty => parts.push("empty".into()),
                SegmentState::Current => parts.push("current".into()),
                SegmentState::Sealed => parts.push("sealed".into()),
                SegmentState::Damaged => parts.push("DAMAGED".into()),
                SegmentState::Frames => {}
            }
            if let Some(e) = s.epoch {
                parts.push(format!("epoch {e}"));
            }
            parts.push(match s.capacity_bytes {
                Some(cap) => format!("{} records ({} / {cap} bytes)", s.records, s.used_bytes),
                None => format!("{} records ({} bytes)", s.records, s.used_bytes),
            });
            if s.records > 0 {
                parts.push(opt_range(s.first_seq, s.last_seq));
            }
            if s.state != SegmentState::Damaged {
                if s.crc_bad == 0 && s.corrupt.is_empty() && s.torn_tail.is_none() {
                    parts.push("CRC ok".into());
                } else {
                    parts.push(format!(
                        "CRC BAD ({} bad CRC, {} corrupt, {} torn)",
                        s.crc_bad,
                        s.corrupt.len(),
                        usize::from(s.torn_tail.is_some())
                    ));
                }
            }
            let line = format!("  {label} {}", parts.join(", "));
            let _ = writeln!(o, "{line}");
            for origin in &s.origins {
                let who = names
                    .get(&origin.origin)
                    .map(|n| format!("{n:?}"))
                    .unwrap_or_else(|| "unknown slot".into());
                let _ = writeln!(
                    o,
                    "    origin {} ({who}): {} records, source seq {}..{}",
                    origin.origin, origin.records, origin.first_seq, origin.last_seq
                );
            }
            if records {
                for rec in &s.record_list {
                    let inner = match rec.inner {
                        Some(i) => format!(
                            " <- {} seq {} (source partition {})",
                            names
                                .get(&i.origin)
                                .cloned()
                                .unwrap_or_else(|| format!("slot {}", i.origin)),
                            i.seq,
                            i.partition
                        ),
                        None => String::new(),
                    };
                    let _ = writeln!(
                        o,
                        "    seq {:>8} @ {:<10} {:>8} bytes  {:<15} {}{inner}",
                        rec.seq, rec.offset, rec.len, rec.op, rec.summary
                    );
                }
            }
        }
        for i in &f.issues {
            let _ = writeln!(o, "  {}", issue_line(i));
        }
    }
    for i in &report.issues {
        let _ = writeln!(o, "{}", issue_line(i));
    }
    let _ = writeln!(
        o,
        "check: {} file(s), {} error(s), {} warning(s): {}",
        report.files.len(),
        report.errors,
        report.warnings,
        if report.ok { "OK" } else { "FAILED" }
    );
    o
}

fn issue_line(i: &Issue) -> String {
    match i.severity {
        Severity::Error => format!("ERROR: {}", i.message),
        Severity::Warning => format!("warning: {}", i.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvlog::{NvLog, Placement, MIN_PARTITION_SIZE};
    use crate::storage::MemStorage;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn geo() -> Geometry {
        Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        }
    }

    fn op(i: u64) -> Vec<u8> {
        Op::Write {
            path: format!("dir/f{i}").into_bytes(),
            offset: i * 10,
            data: vec![i as u8; 100],
            handle: Default::default(),
        }
        .encode()
    }

    /// A source log with `n` records in partition 0; its bytes and where each record went.
    fn source_log(n: u64) -> (Vec<u8>, Vec<Placement>) {
        let s = Arc::new(MemStorage::new(geo().region_len()));
        let (mut log, _) = NvLog::open(s.clone(), geo(), Role::Source).expect("open");
        let mut places = Vec::new();
        for seq in 1..=n {
            let mut f = frame::encode(seq, 0, 0, KIND_RECORD, 0, &op(seq)).expect("frame");
            places.push(log.append(&mut f).expect("append").expect("fits"));
        }
        (s.crash_image(), places)
    }

    fn all(r: &FileReport) -> String {
        r.issues
            .iter()
            .map(|i| i.message.clone())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn good_source_log_is_ok_and_agrees_with_the_daemon() {
        let (bytes, places) = source_log(7);
        let r = check_nvram("n", &bytes, Some(Role::Source), Options { records: true });
        assert_eq!(r.errors(), 0, "{}", all(&r));
        assert_eq!(r.kind, FileKind::SourceNvram);
        assert_eq!(r.records(), 7);
        assert_eq!(r.seq_range(), Some((1, 7)));
        assert_eq!(r.segments[0].state, SegmentState::Current);
        assert_eq!(r.segments[1].state, SegmentState::Empty);
        let list = &r.segments[0].record_list;
        assert_eq!(list.len(), 7);
        assert_eq!(list[2].offset, places[2].offset as u64);
        assert_eq!(list[2].op, "write");
        assert!(list[2].summary.starts_with("dir/f3"), "{}", list[2].summary);
        // The daemon's own scan sees the same.
        let (log, rec) = NvLog::open(Arc::new(MemStorage::from_bytes(bytes)), geo(), Role::Source)
            .expect("reopen");
        assert!(rec.torn_tails.is_empty());
        assert_eq!(log.partition(0).records, r.segments[0].records);
        let mut report = Report {
            files: vec![r],
            ..Default::default()
        };
        report.finish();
        assert!(report.ok);
        let text = render_text(&report, true);
        assert!(text.contains("partition 0: current"), "{text}");
        assert!(text.contains("7 records"), "{text}");
        assert!(text.contains("seq 1..7, CRC ok"), "{text}");
        assert!(text.ends_with("OK\n"), "{text}");
    }

    #[test]
    fn flipped_byte_in_a_middle_record_is_corruption_naming_offset_and_partition() {
        let (mut bytes, places) = source_log(5);
        let victim = places[2];
        bytes[victim.offset + 40] ^= 0x10;
        let r = check_nvram("n", &bytes, Some(Role::Source), Options::default());
        assert_eq!(r.errors(), 1, "{}", all(&r));
        let i = &r.issues[0];
        assert_eq!(i.offset, Some(victim.offset as u64));
        assert_eq!(i.partition, Some(0));
        assert_eq!(i.after_seq, Some(2));
        assert!(
            i.message
                .contains(&format!("corrupt record at offset {}", victim.offset))
                && i.message.contains("partition 0")
                && i.message.contains("CRC mismatch"),
            "{}",
            i.message
        );
        let s = &r.segments[0];
        assert_eq!((s.records, s.crc_bad, s.corrupt.len()), (4, 1, 1));
        // The daemon refuses it at the same offset.
        match NvLog::open(Arc::new(MemStorage::from_bytes(bytes)), geo(), Role::Source) {
            Err(crate::NvLogError::Corrupt { offset, .. }) => assert_eq!(offset, victim.offset),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn flipped_byte_in_the_last_record_is_a_torn_tail() {
        let (mut bytes, places) = source_log(3);
        let last = places[2];
        bytes[last.offset + last.len - 1] ^= 1;
        let r = check_nvram("n", &bytes, Some(Role::Source), Options::default());
        assert_eq!(r.errors(), 1, "{}", all(&r));
        assert!(r.issues[0].message.contains("torn record"), "{}", all(&r));
        assert_eq!(r.segments[0].torn_tail, Some(last.offset as u64));
        assert_eq!(r.segments[0].records, 2);
    }

    #[test]
    fn truncated_and_garbage_nvram_are_errors_not_panics() {
        let (bytes, _) = source_log(3);
        for cut in [0, 10, 31, 4096, SUPERBLOCK_LEN + 8, SUPERBLOCK_LEN + 5000] {
            let r = check_nvram("n", &bytes[..cut], Some(Role::Source), Options::default());
            assert!(r.errors() > 0, "cut at {cut}: {}", all(&r));
        }
        let r = check_nvram(
            "n",
            &bytes[..SUPERBLOCK_LEN + 5000],
            Some(Role::Source),
            Options::default(),
        );
        assert!(all(&r).contains("truncated"), "{}", all(&r));
        let mut garbage = bytes.clone();
        garbage[..32].copy_from_slice(&[0x5a; 32]);
        let r = check_nvram("n", &garbage, Some(Role::Source), Options::default());
        assert!(all(&r).contains("bad magic at offset 0"), "{}", all(&r));
        let mut crc = bytes.clone();
        crc[13] ^= 1;
        let r = check_nvram("n", &crc, Some(Role::Source), Options::default());
        assert!(all(&r).contains("superblock CRC mismatch"), "{}", all(&r));
        let r = check_nvram("n", &bytes, Some(Role::Destination), Options::default());
        assert!(all(&r).contains("fs-source check"), "{}", all(&r));
        let blank = vec![0u8; 100];
        let r = check_nvram("n", &blank, Some(Role::Source), Options::default());
        assert_eq!((r.errors(), r.warnings()), (0, 1));
    }

    #[test]
    fn destination_log_reports_origins_and_inner_sequences() {
        let s = Arc::new(MemStorage::new(geo().region_len()));
        let (mut log, _) = NvLog::open(s.clone(), geo(), Role::Destination).expect("open");
        for seq in 1..=4u64 {
            let inner = frame::encode(10 + seq, 1, 1, KIND_RECORD, 0, &op(seq)).expect("inner");
            let mut f = frame::encode(seq, 0, 0, KIND_NESTED, 3, &inner).expect("outer");
            log.append(&mut f).expect("append").expect("fits");
        }
        let bytes = s.crash_image();
        let r = check_nvram(
            "d",
            &bytes,
            Some(Role::Destination),
            Options { records: true },
        );
        assert_eq!(r.errors(), 0, "{}", all(&r));
        let seg = &r.segments[0];
        assert_eq!(
            seg.origins,
            vec![OriginRange {
                origin: 3,
                records: 4,
                first_seq: 11,
                last_seq: 14
            }]
        );
        assert_eq!(seg.seqs.last(), Some(&(3, 14)));
        assert_eq!(
            seg.record_list[0].inner,
            Some(InnerRecord {
                origin: 3,
                seq: 11,
                partition: 1
            })
        );
    }

    fn journal(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut b = journal_header("alpha", 1).to_vec();
        let mut offs = Vec::new();
        for seq in 1..=n {
            offs.push(b.len());
            b.extend(frame::encode(seq, 1, 1, KIND_RECORD, 0, &op(seq)).expect("frame"));
        }
        (b, offs)
    }

    #[test]
    fn journal_good_flipped_truncated_and_foreign() {
        let (good, offs) = journal(4);
        let r = check_journal("j", &good, Some(("alpha", 1)), Options::default());
        assert_eq!(r.errors(), 0, "{}", all(&r));
        assert_eq!((r.records(), r.seq_range()), (4, Some((1, 4))));
        assert_eq!(
            r.header,
            Header::Journal {
                version: 1,
                partition: 1,
                source: "alpha".into()
            }
        );

        let mut flipped = good.clone();
        flipped[offs[1] + 40] ^= 4;
        let r = check_journal("j", &flipped, Some(("alpha", 1)), Options::default());
        assert_eq!(r.errors(), 1, "{}", all(&r));
        assert_eq!(r.issues[0].offset, Some(offs[1] as u64));
        assert!(all(&r).contains("corrupt record at offset"), "{}", all(&r));
        assert_eq!(r.segments[0].records, 3);

        let r = check_journal("j", &good[..good.len() - 3], None, Options::default());
        assert!(all(&r).contains("torn record"), "{}", all(&r));
        assert_eq!(r.segments[0].records, 3);

        let r = check_journal("j", &good, Some(("beta", 1)), Options::default());
        assert!(all(&r).contains("the file's place says"), "{}", all(&r));
        let r = check_journal("j", &good[..20], None, Options::default());
        assert!(all(&r).contains("too short"), "{}", all(&r));
        let mut hdr = good.clone();
        hdr[30] ^= 1;
        let r = check_journal("j", &hdr, None, Options::default());
        assert!(all(&r).contains("header CRC mismatch"), "{}", all(&r));
    }

    #[test]
    fn backlog_good_and_damaged() {
        let mut b = BACKLOG_MAGIC.to_vec();
        b.resize(BACKLOG_HEADER_LEN, 0);
        for seq in 5..=7 {
            b.extend(frame::encode(seq, 1, 0, KIND_RECORD, 0, &op(seq)).expect("frame"));
        }
        let r = check_backlog("b", &b, Options::default());
        assert_eq!(r.errors(), 0, "{}", all(&r));
        assert_eq!(r.seq_range(), Some((5, 7)));
        let r = check_backlog("b", &b[..b.len() - 1], Options::default());
        assert!(all(&r).contains("torn record"), "{}", all(&r));
        let r = check_backlog("b", b"hello, world, this is not", Options::default());
        assert!(all(&r).contains("bad magic"), "{}", all(&r));
        let r = check_backlog("b", &[], Options::default());
        assert_eq!((r.errors(), r.warnings()), (0, 1));
    }

    #[test]
    fn coverage_gaps_name_the_missing_records() {
        let w = coverage_gaps("alpha", "the journals", vec![9, 3, 4, 5, 8, 2], 2);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].message.contains("records 6..7 in none"),
            "{}",
            w[0].message
        );
        let w = coverage_gaps("alpha", "the journals", vec![1, 3], 0);
        assert!(
            w[0].message.contains("record 2 in none"),
            "{}",
            w[0].message
        );
        assert!(coverage_gaps("a", "b", vec![1, 2, 3], 0).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any bit flip in a log, and any garbage, gives a report (never a panic); a flip inside a
        /// record is always an error.
        #[test]
        fn any_damage_is_reported_never_a_panic(bit in 0usize..(8 * 2000), cut in 0usize..200_000) {
            let (bytes, places) = source_log(6);
            let first = places[0].offset;
            let last = places[5];
            let span = last.offset + last.len - first;
            let bit = bit % (span * 8);
            let mut img = bytes.clone();
            img[first + bit / 8] ^= 1 << (bit % 8);
            let r = check_nvram("n", &img, Some(Role::Source), Options { records: true });
            // Flips in the padding between frames are not covered by any CRC.
            // The magic, length, epoch and partition of the last frame are also what stale
            // bytes after the records look like: the daemon (and the check) end there quietly.
            let at = first + bit / 8;
            let in_frame = places.iter().any(|p| (p.offset..p.offset + p.len).contains(&at));
            let last_head = (last.offset..last.offset + 24).contains(&at);
            if in_frame && !last_head {
                prop_assert!(r.errors() > 0);
            }
            let cut = cut % img.len();
            let _ = check_nvram("n", &img[..cut], None, Options { records: true });
            let _ = check_journal("j", &img[SUPERBLOCK_LEN..cut.max(SUPERBLOCK_LEN)], None, Options { records: true });
            let _ = check_backlog("b", &img[cut..], Options { records: true });
        }
    }
}
