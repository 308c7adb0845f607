//! The slot table: one fixed 64-byte slot per source in the NVLOG user area.
//!
//! ```text
//! user area (NVLOG superblock bytes 4096..65536) = slot 0 | slot 1 | ... (960 slots)
//! slot
//!   0   48  source name, UTF-8, NUL padded (all zero = free slot)
//!   48  8   applied_seq  highest sequence number applied to the image (LE)
//!   56  8   generation   the source's generation (fencing epoch) (LE)
//! ```
//! The slot index is the `origin` field of the destination's nested frames. Slots are written
//! through the NVRAM storage directly (each 8-byte field by one writer: the CP task writes
//! `applied_seq`, the handshake writes `generation`), so updating one never takes the NVLOG
//! append lock.

use std::sync::Arc;

use proto::nvlog::{USER_AREA_LEN, USER_AREA_OFFSET};
use proto::storage::Storage;

use crate::error::SlotError;

/// Bytes per slot.
pub const SLOT_LEN: usize = 64;
/// Bytes of the name field.
pub const NAME_LEN: usize = 48;
/// Number of slots in the user area.
pub const MAX_SLOTS: usize = USER_AREA_LEN / SLOT_LEN;

/// One source's persistent cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The source's name.
    pub name: String,
    /// Highest sequence number applied to its image.
    pub applied_seq: u64,
    /// Its generation (fencing epoch).
    pub generation: u64,
}

impl Slot {
    /// Encode into the 64-byte layout.
    pub fn encode(&self) -> Result<[u8; SLOT_LEN], SlotError> {
        check_name(&self.name)?;
        let mut b = [0u8; SLOT_LEN];
        b[..self.name.len()].copy_from_slice(self.name.as_bytes());
        b[48..56].copy_from_slice(&self.applied_seq.to_le_bytes());
        b[56..64].copy_from_slice(&self.generation.to_le_bytes());
        Ok(b)
    }

    /// Decode a slot; `None` for a free slot (or an unreadable name, logged).
    pub fn decode(b: &[u8; SLOT_LEN]) -> Option<Slot> {
        let end = b[..NAME_LEN]
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(NAME_LEN);
        if end == 0 {
            return None;
        }
        let name = match std::str::from_utf8(&b[..end]) {
            Ok(s) => s.to_string(),
            Err(_) => {
                tracing::error!("NVRAM slot table: a slot name is not UTF-8; ignoring the slot");
                return None;
            }
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[48..56]);
        let applied_seq = u64::from_le_bytes(a);
        a.copy_from_slice(&b[56..64]);
        Some(Slot {
            name,
            applied_seq,
            generation: u64::from_le_bytes(a),
        })
    }
}

/// Check a name fits a slot.
pub fn check_name(name: &str) -> Result<(), SlotError> {
    let bad = |reason: &str| SlotError::BadName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > NAME_LEN {
        return Err(bad("longer than 48 bytes"));
    }
    if name.as_bytes().contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    Ok(())
}

/// The slot table inside an NVRAM region.
pub struct SlotTable<S: Storage> {
    storage: Arc<S>,
}

impl<S: Storage> std::fmt::Debug for SlotTable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotTable")
            .field("nvram", &self.storage.describe())
            .finish()
    }
}

impl<S: Storage> SlotTable<S> {
    /// The table in `storage` (an NVLOG region already opened with `NvLog::open`).
    pub fn new(storage: Arc<S>) -> Self {
        SlotTable { storage }
    }

    fn offset(index: usize) -> usize {
        USER_AREA_OFFSET + index * SLOT_LEN
    }

    /// Read slot `index`.
    pub fn get(&self, index: usize) -> Option<Slot> {
        let mut b = [0u8; SLOT_LEN];
        self.storage.read_at(Self::offset(index), &mut b);
        Slot::decode(&b)
    }

    /// Every used slot with its index.
    pub fn load_all(&self) -> Vec<(usize, Slot)> {
        (0..MAX_SLOTS)
            .filter_map(|i| self.get(i).map(|s| (i, s)))
            .collect()
    }

    /// The slot of `name`, allocating (and flushing) a fresh one on first sight.
    pub fn find_or_allocate(&self, name: &str) -> Result<(usize, Slot), SlotError> {
        check_name(name)?;
        let mut free = None;
        for i in 0..MAX_SLOTS {
            match self.get(i) {
                Some(s) if s.name == name => return Ok((i, s)),
                Some(_) => {}
                None => {
                    free.get_or_insert(i);
                }
            }
        }
        let i = free.ok_or_else(|| SlotError::Full(MAX_SLOTS, name.to_string()))?;
        let slot = Slot {
            name: name.to_string(),
            applied_seq: 0,
            generation: 0,
        };
        self.storage.write_at(Self::offset(i), &slot.encode()?);
        self.storage.flush(Self::offset(i), SLOT_LEN)?;
        Ok((i, slot))
    }

    /// Record the applied sequence number of slot `index` (durable against a process crash;
    /// call [`SlotTable::flush`] for power loss).
    pub fn set_applied(&self, index: usize, seq: u64) {
        self.storage
            .write_at(Self::offset(index) + 48, &seq.to_le_bytes());
    }

    /// Record the generation of slot `index`, flushed.
    pub fn set_generation(&self, index: usize, generation: u64) -> Result<(), SlotError> {
        self.storage
            .write_at(Self::offset(index) + 56, &generation.to_le_bytes());
        self.flush(index)
    }

    /// Make slot `index` durable against power loss.
    pub fn flush(&self, index: usize) -> Result<(), SlotError> {
        Ok(self.storage.flush(Self::offset(index), SLOT_LEN)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::nvlog::{Geometry, NvLog, Role, MIN_PARTITION_SIZE};
    use proto::storage::MemStorage;

    #[test]
    fn slots_round_trip_and_survive_reopen() {
        let geo = Geometry {
            partitions: 2,
            partition_size: MIN_PARTITION_SIZE,
        };
        let mem = Arc::new(MemStorage::new(geo.region_len()));
        let (_log, _) = NvLog::open(mem.clone(), geo, Role::Destination).unwrap();
        let table = SlotTable::new(mem.clone());
        let (a, _) = table.find_or_allocate("alpha").unwrap();
        let (b, _) = table.find_or_allocate("beta").unwrap();
        assert_ne!(a, b);
        assert_eq!(table.find_or_allocate("alpha").unwrap().0, a);
        table.set_applied(b, 42);
        table.set_generation(b, 3).unwrap();
        table.flush(b).unwrap();

        let image = mem.power_cut_image();
        let mem2 = Arc::new(MemStorage::from_bytes(image));
        let (_log2, _) = NvLog::open(mem2.clone(), geo, Role::Destination).unwrap();
        let all = SlotTable::new(mem2).load_all();
        assert_eq!(
            all,
            vec![
                (
                    a,
                    Slot {
                        name: "alpha".into(),
                        applied_seq: 0,
                        generation: 0
                    }
                ),
                (
                    b,
                    Slot {
                        name: "beta".into(),
                        applied_seq: 42,
                        generation: 3
                    }
                ),
            ]
        );
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(49)).is_err());
        check_name(&"x".repeat(48)).unwrap();
    }
}
