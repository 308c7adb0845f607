//! NVLOG: the write-ahead record log inside an NVRAM region, split into partitions.
//!
//! ```text
//! region = superblock (64 KiB) | partition 0 | partition 1 | ... | partition N-1
//!
//! superblock
//!   0   8  magic "NVMLOG\0\x01"
//!   8   4  format version (1)
//!   12  4  partition count N
//!   16  8  partition size in bytes (header + entries)
//!   24  4  role (1 = source, 2 = destination): a source file is never opened as a destination's
//!   28  4  CRC32C of bytes 0..28
//!   4096..65536  user area: cursors the daemon keeps in NVRAM (see `USER_AREA_*`)
//!
//! partition (at 64 KiB + i * partition size)
//!   0   8  magic "NVPART\0\x01"
//!   8   4  epoch: bumped each time the partition is freed; frames carry it, so bytes left
//!            from an earlier use are never taken for records
//!   12  4  CRC32C of bytes 0..12
//!   4096..  frames (see `frame`), each padded to 8 bytes, sequence numbers consecutive
//! ```
//!
//! Appends fill the current partition; when a frame does not fit, the caller rotates to the
//! next free partition (and starts a consistency point for the full one) and frees it when the
//! CP is done. The recovery scan ([`NvLog::open`]) stops each partition at the first frame that
//! is torn, of another epoch, or out of sequence; if a valid frame of the current epoch lies
//! beyond that point the log is corrupt (a hard error naming file and offset), otherwise it is
//! a torn tail, dropped with a warning.

use std::sync::Arc;

use thiserror::Error;

use crate::frame::{self, FrameError, HEADER_LEN};
use crate::storage::Storage;

/// Bytes reserved for the superblock and user area.
pub const SUPERBLOCK_LEN: usize = 64 << 10;
/// Bytes of each partition's header.
pub const PARTITION_HEADER_LEN: usize = 4096;
/// Start of the daemon-defined user area in the superblock.
pub const USER_AREA_OFFSET: usize = 4096;
/// Size of the user area.
pub const USER_AREA_LEN: usize = SUPERBLOCK_LEN - USER_AREA_OFFSET;
/// Smallest partition accepted.
pub const MIN_PARTITION_SIZE: usize = 64 << 10;
/// Default partition size (64 MiB).
pub const DEFAULT_PARTITION_SIZE: usize = 64 << 20;
/// Default number of partitions.
pub const DEFAULT_PARTITIONS: usize = 2;
/// Most partitions one log may have.
pub const MAX_PARTITIONS: usize = 64;

/// The magic number at offset 0 of the superblock.
pub const MAGIC: &[u8; 8] = b"NVMLOG\0\x01";
/// The magic number at the start of each partition header.
pub const PART_MAGIC: &[u8; 8] = b"NVPART\0\x01";
/// The superblock format version written and read.
pub const VERSION: u32 = 1;

/// Which daemon a log belongs to; stored so that one is never opened as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Role {
    /// `fs-source`'s NVLOG.
    Source = 1,
    /// `fs-dest`'s shared NVLOG.
    Destination = 2,
}

/// The shape of a log: how many partitions of what size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Number of partitions (2..=64).
    pub partitions: usize,
    /// Bytes per partition including its 4 KiB header (multiple of 4096, at least 64 KiB).
    pub partition_size: usize,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            partitions: DEFAULT_PARTITIONS,
            partition_size: DEFAULT_PARTITION_SIZE,
        }
    }
}

impl Geometry {
    /// Total bytes of the NVRAM region.
    pub fn region_len(&self) -> usize {
        SUPERBLOCK_LEN + self.partitions * self.partition_size
    }

    /// Bytes available for frames in one partition.
    pub fn capacity(&self) -> usize {
        self.partition_size - PARTITION_HEADER_LEN
    }

    /// Check the limits.
    pub fn validate(&self) -> Result<(), NvLogError> {
        if !(2..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(NvLogError::BadGeometry(format!(
                "{} partitions; between 2 and {MAX_PARTITIONS} are supported",
                self.partitions
            )));
        }
        if self.partition_size < MIN_PARTITION_SIZE || !self.partition_size.is_multiple_of(4096) {
            return Err(NvLogError::BadGeometry(format!(
                "partition size {} bytes; it must be a multiple of 4096 and at least {MIN_PARTITION_SIZE}",
                self.partition_size
            )));
        }
        Ok(())
    }
}

/// Why a log cannot be opened or appended to.
#[derive(Debug, Error)]
pub enum NvLogError {
    /// The configured geometry is outside the limits.
    #[error("invalid NVLOG geometry: {0}")]
    BadGeometry(String),
    /// The region is not an NVLOG of this version, or its header is damaged.
    #[error("NVRAM {file}: {reason}")]
    BadFormat {
        /// File name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The log was made with another geometry or for another role.
    #[error("NVRAM {file} was formatted as {found}, but {wanted} was asked for; move it away or use the matching options")]
    Mismatch {
        /// File name.
        file: String,
        /// What the file says.
        found: String,
        /// What the caller asked for.
        wanted: String,
    },
    /// A damaged frame with valid frames after it: not a torn tail, refuse to guess.
    #[error("NVRAM {file}: corrupt record at offset {offset} (partition {partition}): {reason}; valid records follow it, so this is not a torn write and nothing past it will be applied")]
    Corrupt {
        /// File name.
        file: String,
        /// Absolute byte offset of the bad frame.
        offset: usize,
        /// Partition index.
        partition: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The frame is larger than a whole partition.
    #[error("record of {len} bytes cannot fit in a partition of {capacity} bytes")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// Partition capacity.
        capacity: usize,
    },
    /// A frame given to append is malformed.
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    /// Flushing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The result of an append that did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionFull {
    /// The partition that is full.
    pub partition: usize,
}

/// Where an appended frame landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Partition index.
    pub partition: usize,
    /// Absolute byte offset in the region.
    pub offset: usize,
    /// Bytes written (the frame, without padding).
    pub len: usize,
}

/// In-memory view of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Current epoch.
    pub epoch: u32,
    /// Bytes of frames written (offset of the next frame, relative to the first frame).
    pub used: usize,
    /// Number of frames.
    pub records: u64,
    /// Sequence number of the first frame.
    pub first_seq: Option<u64>,
    /// Sequence number of the last frame.
    pub last_seq: Option<u64>,
}

impl PartitionInfo {
    fn empty(epoch: u32) -> Self {
        PartitionInfo {
            epoch,
            used: 0,
            records: 0,
            first_seq: None,
            last_seq: None,
        }
    }

    /// True when no frame is in the partition.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// A torn tail dropped by the recovery scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Partition index.
    pub partition: usize,
    /// Absolute offset where the valid frames end.
    pub offset: usize,
    /// Why the next bytes were not a valid frame.
    pub reason: String,
}

/// What [`NvLog::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// True when the region was blank and has just been formatted.
    pub formatted: bool,
    /// Torn tails dropped (at most one per partition).
    pub torn_tails: Vec<TornTail>,
}

/// The partitioned record log.
pub struct NvLog<S: Storage> {
    storage: Arc<S>,
    role: Role,
    geometry: Geometry,
    parts: Vec<PartitionInfo>,
    current: usize,
}

impl<S: Storage> std::fmt::Debug for NvLog<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvLog")
            .field("file", &self.storage.describe())
            .field("geometry", &self.geometry)
            .field("current", &self.current)
            .field("parts", &self.parts)
            .finish()
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The little-endian `u32` at `at` (also read by `inspect`).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The little-endian `u64` at `at` (also read by `inspect`).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Bytes of a partition read at a time when its unwritten rest is probed for later frames at
/// start-up (a multiple of the 8-byte frame alignment).
const SCAN_PIECE: usize = 1 << 20;

impl<S: Storage> NvLog<S> {
    /// Open the log in `storage`: format it if blank, otherwise check its superblock against
    /// `geometry` and `role` and scan every partition (see the module doc for the policy).
    pub fn open(
        storage: Arc<S>,
        geometry: Geometry,
        role: Role,
    ) -> Result<(Self, Recovery), NvLogError> {
        geometry.validate()?;
        let file = storage.describe();
        if storage.len() != geometry.region_len() {
            return Err(NvLogError::Mismatch {
                file,
                found: format!("{} bytes", storage.len()),
                wanted: format!("{} bytes", geometry.region_len()),
            });
        }
        let mut sb = vec![0u8; 32];
        storage.read_at(0, &mut sb);
        let mut recovery = Recovery::default();
        if sb.iter().all(|&b| b == 0) {
            Self::format(&*storage, geometry, role)?;
            recovery.formatted = true;
        } else {
            Self::check_superblock(&sb, &file, geometry, role)?;
        }
        let mut log = NvLog {
            storage,
            role,
            geometry,
            parts: Vec::with_capacity(geometry.partitions),
            current: 0,
        };
        for p in 0..geometry.partitions {
            let epoch = log.read_partition_header(p)?;
            let (info, torn) = log.scan_partition(p, epoch)?;
            if let Some(t) = torn {
                tracing::warn!(file = %file, partition = p, offset = t.offset, reason = %t.reason,
                    "NVLOG: dropped a torn tail (a record that was being written when the process stopped)");
                recovery.torn_tails.push(t);
            }
            log.parts.push(info);
        }
        // Continue in the partition holding the newest records, or the first one.
        log.current = (0..geometry.partitions)
            .filter(|&p| !log.parts[p].is_empty())
            .max_by_key(|&p| log.parts[p].last_seq)
            .unwrap_or(0);
        Ok((log, recovery))
    }

    fn format(storage: &S, geometry: Geometry, role: Role) -> Result<(), NvLogError> {
        let mut sb = [0u8; 32];
        sb[0..8].copy_from_slice(MAGIC);
        sb[8..12].copy_from_slice(&VERSION.to_le_bytes());
        sb[12..16].copy_from_slice(&(geometry.partitions as u32).to_le_bytes());
        sb[16..24].copy_from_slice(&(geometry.partition_size as u64).to_le_bytes());
        sb[24..28].copy_from_slice(&(role as u32).to_le_bytes());
        let c = crc(&sb[..28]);
        sb[28..32].copy_from_slice(&c.to_le_bytes());
        for p in 0..geometry.partitions {
            Self::write_partition_header(storage, geometry, p, 1);
            storage.flush(Self::partition_base_of(geometry, p), 16)?;
        }
        // The superblock last: a crash during formatting leaves a blank (re-formattable) region.
        storage.write_at(0, &sb);
        storage.flush(0, 32)?;
        Ok(())
    }

    fn check_superblock(
        sb: &[u8],
        file: &str,
        geometry: Geometry,
        role: Role,
    ) -> Result<(), NvLogError> {
        let bad = |reason: String| NvLogError::BadFormat {
            file: file.to_string(),
            reason,
        };
        if &sb[0..8] != MAGIC {
            return Err(bad(
                "not an nvmirror NVRAM file (bad magic at offset 0)".into()
            ));
        }
        if u32_at(sb, 28) != crc(&sb[..28]) {
            return Err(bad(
                "superblock CRC mismatch at offset 28: the header is damaged".into(),
            ));
        }
        let version = u32_at(sb, 8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads {VERSION}"
            )));
        }
        let parts = u32_at(sb, 12) as usize;
        let size = u64_at(sb, 16) as usize;
        let found_role = u32_at(sb, 24);
        if parts != geometry.partitions || size != geometry.partition_size {
            return Err(NvLogError::Mismatch {
                file: file.to_string(),
                found: format!("{parts} partitions of {size} bytes"),
                wanted: format!(
                    "{} partitions of {} bytes",
                    geometry.partitions, geometry.partition_size
                ),
            });
        }
        if found_role != role as u32 {
            return Err(NvLogError::Mismatch {
                file: file.to_string(),
                found: format!("role {found_role}"),
                wanted: format!("role {} ({role:?})", role as u32),
            });
        }
        Ok(())
    }

    fn partition_base_of(geometry: Geometry, p: usize) -> usize {
        SUPERBLOCK_LEN + p * geometry.partition_size
    }

    fn partition_base(&self, p: usize) -> usize {
        Self::partition_base_of(self.geometry, p)
    }

    fn write_partition_header(storage: &S, geometry: Geometry, p: usize, epoch: u32) {
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(PART_MAGIC);
        h[8..12].copy_from_slice(&epoch.to_le_bytes());
        let c = crc(&h[..12]);
        h[12..16].copy_from_slice(&c.to_le_bytes());
        storage.write_at(Self::partition_base_of(geometry, p), &h);
    }

    fn read_partition_header(&self, p: usize) -> Result<u32, NvLogError> {
        let base = self.partition_base(p);
        let mut h = [0u8; 16];
        self.storage.read_at(base, &mut h);
        if &h[0..8] != PART_MAGIC || u32_at(&h, 12) != crc(&h[..12]) {
            return Err(NvLogError::BadFormat {
                file: self.storage.describe(),
                reason: format!("partition {p} header at offset {base} is damaged"),
            });
        }
        Ok(u32_at(&h, 8))
    }

    /// Check the frame at absolute `offset` belongs to partition `p` in `epoch`. Returns its
    /// length and sequence number.
    fn frame_at(
        &self,
        p: usize,
        epoch: u32,
        offset: usize,
        end: usize,
    ) -> Result<(usize, u64), String> {
        if offset + HEADER_LEN > end {
            return Err("no room for a frame header".into());
        }
        let mut head = [0u8; HEADER_LEN];
        self.storage.read_at(offset, &mut head);
        let h = frame::parse_header(&head).map_err(|e| e.to_string())?;
        if h.epoch != epoch || h.partition as usize != p {
            return Err(format!(
                "frame of partition {} epoch {} (left from an earlier use)",
                h.partition, h.epoch
            ));
        }
        // A destination log holds only nested frames, whose payload is a source's frame: that
        // inner frame (its own magic, CRC, and the *source's* partition and epoch) must never be
        // taken for one of this log's frames when stale bytes are probed.
        let kind = match self.role {
            Role::Source => frame::KIND_RECORD,
            Role::Destination => frame::KIND_NESTED,
        };
        if h.kind != kind {
            return Err(format!(
                "frame of kind {} (left from an earlier use, or the inner frame of one)",
                h.kind
            ));
        }
        let len = h.frame_len();
        if offset + len > end {
            return Err(format!("frame of {len} bytes runs past the partition end"));
        }
        let mut bytes = vec![0u8; len];
        self.storage.read_at(offset, &mut bytes);
        frame::decode(&bytes).map_err(|e| e.to_string())?;
        Ok((len, h.seq))
    }

    fn scan_partition(
        &self,
        p: usize,
        epoch: u32,
    ) -> Result<(PartitionInfo, Option<TornTail>), NvLogError> {
        let base = self.partition_base(p);
        let start = base + PARTITION_HEADER_LEN;
        let end = base + self.geometry.partition_size;
        let mut info = PartitionInfo::empty(epoch);
        let mut off = start;
        loop {
            if off + HEADER_LEN > end {
                return Ok((info, None));
            }
            let failure = match self.frame_at(p, epoch, off, end) {
                Ok((len, seq)) => match info.last_seq {
                    Some(last) if seq != last + 1 => {
                        format!("sequence {seq} does not follow {last}")
                    }
                    _ => {
                        info.first_seq.get_or_insert(seq);
                        info.last_seq = Some(seq);
                        info.records += 1;
                        off += frame::padded_len(len);
                        info.used = off - start;
                        continue;
                    }
                },
                Err(reason) => reason,
            };
            // Bytes that were never written in this epoch end the partition cleanly.
            let mut probe = [0u8; HEADER_LEN];
            self.storage.read_at(off, &mut probe);
            let blank = probe.iter().all(|&b| b == 0);
            // Is there a valid frame of this epoch further on? Then this is corruption.
            // (The rest of the partition is read once, a bounded piece at a time so that
            // opening a big NVRAM does not hold a partition's worth of memory, and only
            // offsets holding the frame magic are checked in full: a 64 MiB partition is
            // scanned in milliseconds.)
            let magic = frame::MAGIC.to_le_bytes();
            let mut piece: Vec<u8> = Vec::new();
            let mut piece_at = off;
            let mut at = off + 8;
            while at + HEADER_LEN <= end {
                // Frames are 8-byte aligned and pieces a multiple of 8 long (but the last):
                // a magic number never straddles two pieces.
                if at + 4 > piece_at + piece.len() {
                    piece_at = at;
                    piece.resize(SCAN_PIECE.min(end - at), 0);
                    self.storage.read_at(piece_at, &mut piece);
                }
                let i = at - piece_at;
                if piece[i..i + 4] != magic {
                    at += 8;
                    continue;
                }
                if let Ok((_, seq)) = self.frame_at(p, epoch, at, end) {
                    if info.last_seq.is_none_or(|last| seq > last) {
                        return Err(NvLogError::Corrupt {
                            file: self.storage.describe(),
                            offset: off,
                            partition: p,
                            reason: failure,
                        });
                    }
                }
                at += 8;
            }
            // A torn write of this epoch left (at least) its header: the frame claims this
            // partition and epoch but does not check out. Anything else is the end of this
            // epoch's records followed by bytes of an earlier use (a stale frame's payload),
            // which is normal and not worth a warning.
            let ours = frame::parse_header(&probe)
                .is_ok_and(|h| h.epoch == epoch && h.partition as usize == p);
            if !blank && !ours {
                tracing::debug!(partition = p, offset = off, reason = %failure,
                    "NVLOG: records end here; the bytes after them are from an earlier use");
            }
            let torn = (!blank && ours).then_some(TornTail {
                partition: p,
                offset: off,
                reason: failure,
            });
            return Ok((info, torn));
        }
    }

    /// The region's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The partition new frames go to.
    pub fn current(&self) -> usize {
        self.current
    }

    /// What is in partition `p`.
    pub fn partition(&self, p: usize) -> &PartitionInfo {
        &self.parts[p]
    }

    /// The underlying storage (for flushing from another thread).
    pub fn storage(&self) -> &Arc<S> {
        &self.storage
    }

    /// Append a sealed frame to the current partition, re-stamping its partition and epoch.
    /// Returns where it went, or [`PartitionFull`] when it does not fit (nothing written).
    /// The frame's sequence number must follow the partition's last one.
    pub fn append(
        &mut self,
        frame: &mut [u8],
    ) -> Result<Result<Placement, PartitionFull>, NvLogError> {
        let h = frame::parse_header(frame)?;
        let len = h.frame_len();
        if len > frame.len() {
            return Err(FrameError::Truncated {
                needed: len,
                available: frame.len(),
            }
            .into());
        }
        let (p, epoch, offset) = match self.room_for(len)? {
            Ok(at) => at,
            Err(full) => return Ok(Err(full)),
        };
        frame::restamp(&mut frame[..len], epoch, p as u16)?;
        self.storage.write_at(offset, &frame[..len]);
        Ok(Ok(self.appended(p, offset, len, h.seq)))
    }

    /// Where a frame of `len` bytes goes in the current partition: (partition, its epoch,
    /// offset), or [`PartitionFull`]; an error when it could never fit.
    fn room_for(
        &self,
        len: usize,
    ) -> Result<Result<(usize, u32, usize), PartitionFull>, NvLogError> {
        if frame::padded_len(len) > self.geometry.capacity() {
            return Err(NvLogError::TooLarge {
                len,
                capacity: self.geometry.capacity(),
            });
        }
        let p = self.current;
        let info = &self.parts[p];
        if info.used + frame::padded_len(len) > self.geometry.capacity() {
            return Ok(Err(PartitionFull { partition: p }));
        }
        let offset = self.partition_base(p) + PARTITION_HEADER_LEN + info.used;
        Ok(Ok((p, info.epoch, offset)))
    }

    /// Account for a frame of `len` bytes with sequence number `seq` just written at `offset`
    /// of partition `p` (what [`NvLog::room_for`] gave).
    fn appended(&mut self, p: usize, offset: usize, len: usize, seq: u64) -> Placement {
        let info = &mut self.parts[p];
        info.used += frame::padded_len(len);
        info.records += 1;
        info.first_seq.get_or_insert(seq);
        info.last_seq = Some(seq);
        Placement {
            partition: p,
            offset,
            len,
        }
    }

    /// Append `inner`, a whole frame whose CRC was checked, wrapped in a frame of kind
    /// [`frame::KIND_NESTED`] with sequence number `seq` and `origin` (how a destination logs
    /// a source's record). The wrapper is written straight into the log after its header: no
    /// wrapped copy is built in memory, and its CRC is derived from `inner`'s
    /// ([`frame::nested_header`]) rather than computed over the payload again.
    pub fn append_nested(
        &mut self,
        inner: &[u8],
        seq: u64,
        origin: u32,
    ) -> Result<Result<Placement, PartitionFull>, NvLogError> {
        let len = frame::HEADER_LEN + inner.len();
        let (p, epoch, offset) = match self.room_for(len)? {
            Ok(at) => at,
            Err(full) => return Ok(Err(full)),
        };
        let head = frame::nested_header(inner, seq, epoch, p as u16, origin)?;
        self.storage.write_at(offset, &head);
        self.storage.write_at(offset + frame::HEADER_LEN, inner);
        Ok(Ok(self.appended(p, offset, len, seq)))
    }

    /// Undo the last append (its operation failed, so it must never be applied or mirrored).
    /// `placement` must be what the latest [`NvLog::append`] returned. The frame's header is
    /// zeroed, so a recovery scan ends the partition there.
    pub fn retract(&mut self, placement: Placement) {
        let p = placement.partition;
        let base = self.partition_base(p) + PARTITION_HEADER_LEN;
        let info = &mut self.parts[p];
        debug_assert_eq!(
            base + info.used,
            placement.offset + frame::padded_len(placement.len)
        );
        self.storage.write_at(placement.offset, &[0u8; HEADER_LEN]);
        info.used = placement.offset - base;
        info.records -= 1;
        if info.records == 0 {
            info.first_seq = None;
            info.last_seq = None;
        } else {
            info.last_seq = info.last_seq.map(|s| s - 1);
        }
    }

    /// Move appends to the next partition, which must be empty; returns its index, or `None`
    /// when every other partition still holds records (the caller waits for a CP to free one).
    pub fn rotate(&mut self) -> Option<usize> {
        let n = self.geometry.partitions;
        (1..n)
            .map(|i| (self.current + i) % n)
            .find(|&p| self.parts[p].is_empty())
            .inspect(|&p| self.current = p)
    }

    /// Free partition `p` after its CP: bump its epoch (so its old frames no longer count) and
    /// make that durable.
    pub fn free(&mut self, p: usize) -> Result<(), NvLogError> {
        let epoch = self.parts[p].epoch.wrapping_add(1).max(1);
        Self::write_partition_header(&self.storage, self.geometry, p, epoch);
        self.storage.flush(self.partition_base(p), 16)?;
        self.parts[p] = PartitionInfo::empty(epoch);
        Ok(())
    }

    /// Copy out every frame of partition `p`, in order.
    pub fn frames(&self, p: usize) -> Vec<Vec<u8>> {
        let start = self.partition_base(p) + PARTITION_HEADER_LEN;
        let used = self.parts[p].used;
        let mut bytes = vec![0u8; used];
        self.storage.read_at(start, &mut bytes);
        let mut out = Vec::with_capacity(self.parts[p].records as usize);
        let mut off = 0;
        while off < used {
            match frame::decode(&bytes[off..]) {
                Ok(f) => {
                    out.push(f.bytes.to_vec());
                    off += frame::padded_len(f.bytes.len());
                }
                Err(_) => break, // cannot happen for frames this log wrote or scanned
            }
        }
        out
    }

    /// Copy out the frames of partition `p` with a sequence number above `after`, in order,
    /// stopping once `max_bytes` are taken: frames before are skipped by their headers, without
    /// copying them (a reader following the log reads only what is new).
    pub fn frames_after(&self, p: usize, after: u64, max_bytes: usize) -> Vec<(u64, Vec<u8>)> {
        let info = &self.parts[p];
        if info.last_seq.is_none_or(|last| last <= after) {
            return Vec::new();
        }
        let start = self.partition_base(p) + PARTITION_HEADER_LEN;
        let (mut off, mut taken, mut out) = (0, 0, Vec::new());
        while off + frame::HEADER_LEN <= info.used {
            let mut h = [0u8; frame::HEADER_LEN];
            self.storage.read_at(start + off, &mut h);
            let Ok(header) = frame::parse_header(&h) else {
                break; // cannot happen for frames this log wrote or scanned
            };
            let len = header.frame_len();
            if off + len > info.used {
                break;
            }
            if header.seq > after {
                let mut bytes = vec![0u8; len];
                self.storage.read_at(start + off, &mut bytes);
                taken += len;
                out.push((header.seq, bytes));
                if taken >= max_bytes {
                    break;
                }
            }
            off += frame::padded_len(len);
        }
        out
    }

    /// Partitions holding records, oldest records first.
    pub fn partitions_in_order(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.geometry.partitions)
            .filter(|&p| !self.parts[p].is_empty())
            .collect();
        v.sort_by_key(|&p| self.parts[p].first_seq);
        v
    }

    /// The highest sequence number in the log.
    pub fn last_seq(&self) -> Option<u64> {
        self.parts.iter().filter_map(|p| p.last_seq).max()
    }

    /// Read `buf.len()` bytes of the user area at `offset`.
    pub fn read_user(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= USER_AREA_LEN);
        self.storage.read_at(USER_AREA_OFFSET + offset, buf);
    }

    /// Write bytes of the user area (durable against a process crash; call
    /// [`NvLog::flush_user`] for power loss).
    pub fn write_user(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= USER_AREA_LEN);
        self.storage.write_at(USER_AREA_OFFSET + offset, data);
    }

    /// Flush a range of the user area.
    pub fn flush_user(&self, offset: usize, len: usize) -> std::io::Result<()> {
        self.storage.flush(USER_AREA_OFFSET + offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::KIND_RECORD;
    use crate::storage::MemStorage;
    use proptest::prelude::*;

    fn geo() -> Geometry {
        Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        }
    }

    fn fresh() -> (NvLog<MemStorage>, Arc<MemStorage>) {
        let s = Arc::new(MemStorage::new(geo().region_len()));
        let (log, rec) = NvLog::open(s.clone(), geo(), Role::Source).unwrap();
        assert!(rec.formatted);
        (log, s)
    }

    fn append(
        log: &mut NvLog<MemStorage>,
        seq: u64,
        payload: &[u8],
    ) -> Result<Placement, PartitionFull> {
        let mut f = frame::encode(seq, 0, 0, KIND_RECORD, 0, payload).unwrap();
        log.append(&mut f).unwrap()
    }

    fn reopen(bytes: Vec<u8>) -> Result<(NvLog<MemStorage>, Recovery), NvLogError> {
        NvLog::open(Arc::new(MemStorage::from_bytes(bytes)), geo(), Role::Source)
    }

    #[test]
    fn append_reopen_sees_every_record() {
        let (mut log, s) = fresh();
        for seq in 1..=10 {
            append(&mut log, seq, &[seq as u8; 100]).unwrap();
        }
        let (log2, rec) = reopen(s.crash_image()).unwrap();
        assert!(rec.torn_tails.is_empty());
        assert_eq!(log2.partition(0).records, 10);
        assert_eq!(log2.last_seq(), Some(10));
        assert_eq!(log2.frames(0).len(), 10);
    }

    #[test]
    fn frames_after_skips_what_the_reader_has_and_stops_at_the_limit() {
        let (mut log, _s) = fresh();
        for seq in 1..=10 {
            append(&mut log, seq, &[seq as u8; 100]).unwrap();
        }
        let all = log.frames(0);
        let after = log.frames_after(0, 4, usize::MAX);
        assert_eq!(
            after.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (5..=10).collect::<Vec<_>>()
        );
        assert_eq!(after[0].1, all[4], "the frame bytes, exactly as logged");
        let limited = log.frames_after(0, 0, 1);
        assert_eq!(limited.len(), 1, "stops once the limit is reached");
        assert!(log.frames_after(0, 10, usize::MAX).is_empty());
        assert!(
            log.frames_after(1, 0, usize::MAX).is_empty(),
            "an empty partition"
        );
    }

    #[test]
    fn full_partition_rotates_and_free_forgets_old_frames() {
        let (mut log, s) = fresh();
        let mut seq = 0;
        loop {
            seq += 1;
            if let Err(full) = append(&mut log, seq, &[0xAB; 1000]) {
                assert_eq!(full.partition, 0);
                break;
            }
        }
        assert_eq!(log.rotate(), Some(1));
        append(&mut log, seq, b"x").unwrap();
        assert_eq!(log.rotate(), None, "partition 0 still holds records");
        log.free(0).unwrap();
        let (log2, _) = reopen(s.crash_image()).unwrap();
        assert!(log2.partition(0).is_empty());
        assert_eq!(log2.partition(1).records, 1);
        assert_eq!(log2.current(), 1);
    }

    #[test]
    fn retracted_record_is_gone_after_reopen() {
        let (mut log, s) = fresh();
        append(&mut log, 1, b"kept").unwrap();
        let p = append(&mut log, 2, b"failed").unwrap();
        log.retract(p);
        assert_eq!(log.last_seq(), Some(1));
        append(&mut log, 2, b"again").unwrap();
        let (log2, rec) = reopen(s.crash_image()).unwrap();
        assert!(rec.torn_tails.is_empty());
        let frames = log2.frames(0);
        assert_eq!(frames.len(), 2);
        assert_eq!(frame::decode(&frames[1]).unwrap().payload, b"again");
    }

    #[test]
    fn wrong_geometry_and_role_are_refused() {
        let (_log, s) = fresh();
        let other = Geometry {
            partitions: 3,
            partition_size: MIN_PARTITION_SIZE,
        };
        let bytes = s.crash_image();
        let mut big = bytes.clone();
        big.resize(other.region_len(), 0);
        assert!(matches!(
            NvLog::open(Arc::new(MemStorage::from_bytes(big)), other, Role::Source),
            Err(NvLogError::Mismatch { .. })
        ));
        assert!(matches!(
            NvLog::open(
                Arc::new(MemStorage::from_bytes(bytes)),
                geo(),
                Role::Destination
            ),
            Err(NvLogError::Mismatch { .. })
        ));
        let mut garbage = vec![0u8; geo().region_len()];
        garbage[0] = 1;
        let err = reopen(garbage).unwrap_err().to_string();
        assert!(err.contains("not an nvmirror NVRAM file"), "{err}");
    }

    #[test]
    fn power_cut_keeps_only_flushed_records() {
        let (mut log, s) = fresh();
        let a = append(&mut log, 1, b"flushed").unwrap();
        s.flush(a.offset, a.len).unwrap();
        append(&mut log, 2, b"not flushed").unwrap();
        let (log2, _) = reopen(s.power_cut_image()).unwrap();
        assert_eq!(log2.last_seq(), Some(1));
    }

    #[test]
    fn flipped_bit_in_middle_record_is_corruption_naming_the_offset() {
        let (mut log, s) = fresh();
        let mut places = vec![];
        for seq in 1..=5 {
            places.push(append(&mut log, seq, &[7; 64]).unwrap());
        }
        let mut img = s.crash_image();
        img[places[2].offset + 40] ^= 0x10;
        match reopen(img) {
            Err(NvLogError::Corrupt { offset, .. }) => assert_eq!(offset, places[2].offset),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    /// The probe for later frames reads the rest of a partition a piece at a time: a valid
    /// frame several pieces past a damaged one is still found (and the damage reported).
    #[test]
    fn damage_is_found_when_the_next_good_frame_is_pieces_away() {
        let geo = Geometry {
            partitions: 2,
            partition_size: 8 << 20,
        };
        let s = Arc::new(MemStorage::new(geo.region_len()));
        let (mut log, _) = NvLog::open(s.clone(), geo, Role::Source).unwrap();
        let mut places = vec![];
        for seq in 1..=4 {
            let payload = vec![seq as u8; 3 * SCAN_PIECE / 2 + 8 * seq as usize + 3];
            let mut f = frame::encode(seq, 0, 0, KIND_RECORD, 0, &payload).unwrap();
            places.push(log.append(&mut f).unwrap().unwrap());
        }
        let mut img = s.crash_image();
        img[places[1].offset + 40] ^= 0x10;
        match NvLog::open(Arc::new(MemStorage::from_bytes(img)), geo, Role::Source) {
            Err(NvLogError::Corrupt { offset, .. }) => assert_eq!(offset, places[1].offset),
            other => panic!("expected corruption, got {:?}", other.map(|(_, r)| r)),
        }
        // Only the last frame torn: a torn tail, not corruption.
        let mut img = s.crash_image();
        img[places[3].offset + 40] ^= 0x10;
        let (log, _) = NvLog::open(Arc::new(MemStorage::from_bytes(img)), geo, Role::Source)
            .expect("a torn last frame is not corruption");
        assert_eq!(log.last_seq(), Some(3));
    }

    /// After a partition is reused, the bytes after its newest records are an earlier use's:
    /// the scan ends there quietly (no torn tail reported); a real torn frame is reported.
    #[test]
    fn stale_bytes_after_the_records_are_not_a_torn_tail() {
        let (mut log, s) = fresh();
        for seq in 1..=5 {
            append(&mut log, seq, &[0xAB; 300]).unwrap();
        }
        assert_eq!(log.rotate(), Some(1));
        log.free(0).unwrap();
        assert_eq!(log.rotate(), Some(0));
        let last = append(&mut log, 6, b"short").unwrap();
        let (log2, rec) = reopen(s.crash_image()).unwrap();
        assert_eq!(log2.partition(0).records, 1);
        assert!(rec.torn_tails.is_empty(), "{:?}", rec.torn_tails);

        let mut img = s.crash_image();
        img[last.offset + last.len - 1] ^= 1;
        let (log3, rec) = reopen(img).unwrap();
        assert_eq!(log3.partition(0).records, 0);
        assert_eq!(rec.torn_tails.len(), 1);
        assert_eq!(rec.torn_tails[0].offset, last.offset);
    }

    /// A destination log wraps source frames; the inner frame of a stale nested frame may carry
    /// the same partition and epoch numbers (the source's) as the log's partition. Found beyond
    /// the end of the records, it is not a sign of corruption.
    #[test]
    fn inner_frame_of_a_stale_nested_frame_is_not_taken_for_a_record() {
        let s = Arc::new(MemStorage::new(geo().region_len()));
        let (mut log, _) = NvLog::open(s.clone(), geo(), Role::Destination).unwrap();
        let epoch = log.partition(0).epoch;
        let mut places = vec![];
        for seq in 1..=2u64 {
            // The inner frame: source seq 100+, source partition 0, source epoch = ours.
            let inner = frame::encode(100 + seq, epoch, 0, KIND_RECORD, 0, b"op").unwrap();
            let mut f = frame::encode(seq, 0, 0, frame::KIND_NESTED, 1, &inner).unwrap();
            places.push(log.append(&mut f).unwrap().unwrap());
        }
        // The second outer header is gone (stale bytes after a free, or a torn write).
        let mut img = s.crash_image();
        for b in &mut img[places[1].offset..places[1].offset + HEADER_LEN] {
            *b = 0;
        }
        let (log2, _) = NvLog::open(
            Arc::new(MemStorage::from_bytes(img)),
            geo(),
            Role::Destination,
        )
        .unwrap();
        assert_eq!(log2.partition(0).records, 1);
    }

    /// A destination logs source frames with `append_nested`: what it wrote reads back (after
    /// a reopen) as the wrapper `encode` would have made, until the partition is full.
    #[test]
    fn append_nested_logs_the_wrapper_encode_would_make() {
        let s = Arc::new(MemStorage::new(geo().region_len()));
        let (mut log, _) = NvLog::open(s.clone(), geo(), Role::Destination).unwrap();
        let epoch = log.partition(0).epoch;
        let inner = frame::encode(7, 3, 1, KIND_RECORD, 0, &[9u8; 1000]).unwrap();
        let mut seq = 0;
        let full = loop {
            match log.append_nested(&inner, seq + 1, 4).unwrap() {
                Ok(_) => seq += 1,
                Err(full) => break full,
            }
        };
        assert_eq!(full.partition, 0);
        assert!(seq > 10, "only {seq} frames fitted");
        let (log2, _) = NvLog::open(
            Arc::new(MemStorage::from_bytes(s.crash_image())),
            geo(),
            Role::Destination,
        )
        .unwrap();
        let frames = log2.frames(0);
        assert_eq!(frames.len() as u64, seq);
        for (i, f) in frames.iter().enumerate() {
            let want =
                frame::encode(i as u64 + 1, epoch, 0, frame::KIND_NESTED, 4, &inner).unwrap();
            assert_eq!(f, &want, "frame {}", i + 1);
        }
        let huge = frame::encode(1, 0, 0, KIND_RECORD, 0, &vec![0u8; geo().capacity()]).unwrap();
        assert!(matches!(
            log.append_nested(&huge, seq + 1, 4),
            Err(NvLogError::TooLarge { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Cutting the log anywhere inside the last record (a torn write) keeps exactly the
        /// records before it and never fails to open.
        #[test]
        fn torn_tail_at_any_byte_is_dropped(n in 1u64..8, cut_frac in 0.0f64..1.0) {
            let (mut log, s) = fresh();
            let mut last = None;
            for seq in 1..=n {
                last = Some(append(&mut log, seq, &vec![seq as u8; 300]).unwrap());
            }
            let last = last.unwrap();
            let mut img = s.crash_image();
            let keep = (last.len as f64 * cut_frac) as usize;
            for b in &mut img[last.offset + keep..last.offset + last.len] {
                *b = 0;
            }
            let (log2, _) = reopen(img).unwrap();
            let expect = if keep == last.len { n } else { n - 1 };
            prop_assert_eq!(log2.partition(0).records, expect);
        }

        /// Any single bit flip anywhere in the written records is never applied: the scan either
        /// refuses the log or stops before the damaged record.
        #[test]
        fn bit_flip_is_never_accepted(n in 2u64..8, which in 0usize..8, bit in 0usize..(8 * 340)) {
            let (mut log, s) = fresh();
            let mut places = vec![];
            for seq in 1..=n {
                places.push(append(&mut log, seq, &vec![seq as u8; 300]).unwrap());
            }
            let victim = places[which % places.len()];
            let bit = bit % (victim.len * 8);
            let mut img = s.crash_image();
            img[victim.offset + bit / 8] ^= 1 << (bit % 8);
            match reopen(img) {
                Err(NvLogError::Corrupt { offset, .. }) => prop_assert_eq!(offset, victim.offset),
                Ok((log2, _)) => {
                    let idx = places.iter().position(|p| p == &victim).unwrap() as u64;
                    prop_assert_eq!(log2.partition(0).records, idx);
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
