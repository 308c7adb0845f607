//! Frames: the self-checking byte layout of one record, the same in NVRAM, on the wire and in
//! journal files.
//!
//! ```text
//!  offset size field
//!  0      4    magic        "NVF1" (0x3146_564E little-endian)
//!  4      4    payload_len  bytes of payload after the header
//!  8      8    seq          record sequence number (per source, from 1, never reused)
//!  16     4    epoch        use count of the partition holding the frame (stale-data filter)
//!  20     2    partition    NVLOG partition of the *source* that logged the record
//!  22     2    kind         0 = record payload (MessagePack `Op`), 1 = opaque/nested frame
//!  24     4    origin       source slot on a destination's shared NVLOG; 0 elsewhere
//!  28     4    crc          CRC32C over bytes 0..28 followed by the payload
//!  32     ..   payload
//! ```
//! All integers little-endian. Frames are padded to 8 bytes inside an NVLOG; the padding is
//! not covered by the CRC. The CRC is computed when a frame is sealed and checked whenever one
//! is read back, so a torn or flipped frame is never mistaken for a record.

use thiserror::Error;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 32;
/// The magic number that starts every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"NVF1");
/// Largest payload a frame may carry (a 1 MiB write plus its path and encoding, with room).
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// Frame kind: the payload is a MessagePack [`crate::Op`].
pub const KIND_RECORD: u16 = 0;
/// Frame kind: the payload is another complete frame (a destination wraps a source's frame).
pub const KIND_NESTED: u16 = 1;

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Record sequence number.
    pub seq: u64,
    /// Use count of the partition the frame was written into.
    pub epoch: u32,
    /// Source NVLOG partition.
    pub partition: u16,
    /// What the payload is ([`KIND_RECORD`] or [`KIND_NESTED`]).
    pub kind: u16,
    /// Destination-side source slot, 0 elsewhere.
    pub origin: u32,
}

impl FrameHeader {
    /// Total frame length (header + payload), without padding.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header or the announced payload needs (a torn tail, typically).
    #[error("frame truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The first four bytes are not the frame magic.
    #[error("bad frame magic {found:#010x}")]
    BadMagic {
        /// What was found.
        found: u32,
    },
    /// The announced payload is larger than any frame may be.
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    TooLarge {
        /// Announced length.
        len: usize,
    },
    /// A frame taken for a destination's wrapper is of another kind.
    #[error("frame kind {kind} is not a nested frame")]
    NotNested {
        /// Its kind.
        kind: u16,
    },
    /// The CRC does not match the contents.
    #[error("frame CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// CRC in the frame.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
}

/// A checked frame borrowed from a buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Its header.
    pub header: FrameHeader,
    /// Its payload.
    pub payload: &'a [u8],
    /// The whole frame (header + payload), as stored.
    pub bytes: &'a [u8],
}

fn crc_of(header_prefix: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_prefix), payload)
}

fn write_header(out: &mut [u8], h: &FrameHeader) {
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&h.payload_len.to_le_bytes());
    out[8..16].copy_from_slice(&h.seq.to_le_bytes());
    out[16..20].copy_from_slice(&h.epoch.to_le_bytes());
    out[20..22].copy_from_slice(&h.partition.to_le_bytes());
    out[22..24].copy_from_slice(&h.kind.to_le_bytes());
    out[24..28].copy_from_slice(&h.origin.to_le_bytes());
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Start a frame in `out` (cleared first): a zeroed header to be filled by [`seal`], after
/// which the caller appends the payload. Lets the payload be encoded in place, without a copy.
pub fn begin(out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
}

/// Fill in the header of a frame built with [`begin`] + payload, and compute its CRC.
/// The payload length is taken from the buffer.
pub fn seal(
    frame: &mut [u8],
    seq: u64,
    epoch: u32,
    partition: u16,
    kind: u16,
    origin: u32,
) -> Result<(), FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            available: frame.len(),
        });
    }
    let payload_len = frame.len() - HEADER_LEN;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge { len: payload_len });
    }
    let header = FrameHeader {
        payload_len: payload_len as u32,
        seq,
        epoch,
        partition,
        kind,
        origin,
    };
    write_header(frame, &header);
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    let crc = crc_of(&head[..28], payload);
    head[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Re-stamp the placement fields (epoch, partition) of a sealed frame and update its CRC.
/// Used when a frame built before its partition was known is placed into a log.
///
/// The CRC is updated from the stored one and the changed header bytes, without reading the
/// payload again (CRC32C is linear; see [`header_term`]): placing a frame costs no second
/// pass over a megabyte of data. So a frame whose stored CRC was wrong stays wrong after a
/// restamp: it is never laundered into one that checks.
pub fn restamp(frame: &mut [u8], epoch: u32, partition: u16) -> Result<(), FrameError> {
    let mut h = parse_header(frame)?;
    let len = h.frame_len();
    if frame.len() < len {
        return Err(FrameError::Truncated {
            needed: len,
            available: frame.len(),
        });
    }
    // The stored CRC moves by the difference the header change makes, so a wrong one stays
    // wrong.
    let stored = le_u32(frame, 28);
    let before = header_term(&frame[..len]);
    h.epoch = epoch;
    h.partition = partition;
    write_header(frame, &h);
    let after = header_term(&frame[..len]);
    frame[28..32].copy_from_slice(&(stored ^ before ^ after).to_le_bytes());
    Ok(())
}

/// Payload size from which deriving a CRC by combination ([`crc_with_payload`], well under a
/// microsecond) beats passes over the payload (CRC32C runs at several GB/s).
const COMBINE_FROM: usize = 16 << 10;

/// What header bytes 0..28 of the whole frame `frame` contribute to its CRC, up to a term that
/// depends on the payload only: CRC32C(A ‖ P) = shift(CRC32C(A), |P|) ⊕ CRC32C(P), so two
/// headers' CRCs over the same payload differ by the difference of their shifts. Below
/// [`COMBINE_FROM`] the full CRC (one direct pass) stands in for the shift: the payload term
/// cancels out of the difference all the same.
fn header_term(frame: &[u8]) -> u32 {
    let n = frame.len() - HEADER_LEN;
    if n < COMBINE_FROM {
        crc_of(&frame[..28], &frame[HEADER_LEN..])
    } else {
        crc_with_payload(crc32c::crc32c(&frame[..28]), 0, n)
    }
}

/// The CRC32C of a frame's payload alone, derived from its stored CRC and header (no pass
/// over the payload). `frame` must hold at least the whole frame. Meaningful for a frame
/// whose CRC checks; for one whose CRC does not, it is as wrong as that CRC.
///
/// CRC32C(A ‖ P) = shift(CRC32C(A), |P|) ⊕ CRC32C(P), where shift appends |P| zero bytes to
/// a CRC register: so CRC32C(P) = stored ⊕ shift(CRC32C(header bytes 0..28), |P|).
fn payload_crc(frame: &[u8]) -> u32 {
    let n = le_u32(frame, 4) as usize;
    let stored = le_u32(frame, 28);
    stored ^ crc_with_payload(crc32c::crc32c(&frame[..28]), 0, n)
}

/// CRC32C(A ‖ P) from CRC32C(A), CRC32C(P) and |P|.
fn crc_with_payload(head_crc: u32, payload_crc: u32, payload_len: usize) -> u32 {
    crate::crc_shift::combine(head_crc, payload_crc, payload_len)
}

/// The header of a frame whose payload is `inner`, a whole frame whose CRC was checked (a
/// destination wraps each source frame this way): its CRC is derived from `inner`'s own, so
/// wrapping a checked frame costs no pass over its payload. Write the header, then `inner`.
pub fn nested_header(
    inner: &[u8],
    seq: u64,
    epoch: u32,
    partition: u16,
    origin: u32,
) -> Result<[u8; HEADER_LEN], FrameError> {
    let ih = parse_whole(inner)?;
    let inner_len = ih.frame_len();
    if inner_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge { len: inner_len });
    }
    let mut head = [0u8; HEADER_LEN];
    write_header(
        &mut head,
        &FrameHeader {
            payload_len: inner_len as u32,
            seq,
            epoch,
            partition,
            kind: KIND_NESTED,
            origin,
        },
    );
    // CRC32C(outer 0..28 ‖ inner header ‖ inner payload).
    if (ih.payload_len as usize) < COMBINE_FROM {
        // Small: one direct pass is cheaper than combining. (`inner` keeps its own CRC
        // inside either way, so a wrong one is still found when the inner frame is read.)
        let crc = crc_of(&head[..28], inner);
        head[28..32].copy_from_slice(&crc.to_le_bytes());
        return Ok(head);
    }
    let through_inner_header =
        crc32c::crc32c_append(crc32c::crc32c(&head[..28]), &inner[..HEADER_LEN]);
    let crc = crc_with_payload(
        through_inner_header,
        payload_crc(inner),
        ih.payload_len as usize,
    );
    head[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(head)
}

/// Build a complete frame around `payload`.
pub fn encode(
    seq: u64,
    epoch: u32,
    partition: u16,
    kind: u16,
    origin: u32,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    begin(&mut out);
    out.extend_from_slice(payload);
    seal(&mut out, seq, epoch, partition, kind, origin)?;
    Ok(out)
}

/// Parse the header only, checking magic and size limits but not the CRC.
pub fn parse_header(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        });
    }
    let magic = le_u32(bytes, 0);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let payload_len = le_u32(bytes, 4);
    if payload_len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge {
            len: payload_len as usize,
        });
    }
    Ok(FrameHeader {
        payload_len,
        seq: le_u64(bytes, 8),
        epoch: le_u32(bytes, 16),
        partition: le_u16(bytes, 20),
        kind: le_u16(bytes, 22),
        origin: le_u32(bytes, 24),
    })
}

/// The frame a checked [`KIND_NESTED`] frame carries, parsed without a second CRC pass: the
/// outer CRC covers the inner frame whole, and the inner frame's own CRC was checked before it
/// was wrapped ([`nested_header`] is only given checked frames), so a damaged inner frame fails
/// the outer check. Magic, length and kind are still checked.
pub fn decode_nested<'a>(outer: &Frame<'a>) -> Result<Frame<'a>, FrameError> {
    if outer.header.kind != KIND_NESTED {
        return Err(FrameError::NotNested {
            kind: outer.header.kind,
        });
    }
    let bytes = outer.payload;
    let header = parse_whole(bytes)?;
    Ok(Frame {
        header,
        payload: &bytes[HEADER_LEN..],
        bytes,
    })
}

/// [`parse_header`] of bytes that must be exactly one frame (a nested frame's payload).
fn parse_whole(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    let header = parse_header(bytes)?;
    let len = header.frame_len();
    if bytes.len() != len {
        return Err(FrameError::Truncated {
            needed: len,
            available: bytes.len(),
        });
    }
    Ok(header)
}

/// Parse and fully check (magic, length, CRC) the frame at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    let header = parse_header(bytes)?;
    let len = header.frame_len();
    if bytes.len() < len {
        return Err(FrameError::Truncated {
            needed: len,
            available: bytes.len(),
        });
    }
    let stored = le_u32(bytes, 28);
    let payload = &bytes[HEADER_LEN..len];
    let computed = crc_of(&bytes[..28], payload);
    if stored != computed {
        return Err(FrameError::BadCrc { stored, computed });
    }
    Ok(Frame {
        header,
        payload,
        bytes: &bytes[..len],
    })
}

/// Round a frame length up to the 8-byte slot it occupies in an NVLOG.
pub fn padded_len(frame_len: usize) -> usize {
    (frame_len + 7) & !7
}

/// Iterate over back-to-back frames (no padding), as carried in a wire batch.
pub fn split(mut bytes: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, FrameError>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || bytes.is_empty() {
            return None;
        }
        match decode(bytes) {
            Ok(f) => {
                bytes = &bytes[f.bytes.len()..];
                Some(Ok(f))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(seq: u64, epoch: u32, part: u16, origin: u32, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = encode(seq, epoch, part, KIND_RECORD, origin, &payload).unwrap();
            let d = decode(&f).unwrap();
            prop_assert_eq!(d.header.seq, seq);
            prop_assert_eq!(d.header.epoch, epoch);
            prop_assert_eq!(d.header.partition, part);
            prop_assert_eq!(d.header.origin, origin);
            prop_assert_eq!(d.payload, &payload[..]);
        }

        #[test]
        fn any_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..512), bit in 0usize..(8 * 600)) {
            let mut f = encode(7, 1, 0, KIND_RECORD, 0, &payload).unwrap();
            let bit = bit % (f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&f).is_err());
        }

        #[test]
        fn restamp_gives_the_crc_a_full_seal_would(seq: u64, epoch: u32, part: u16, new_epoch: u32, new_part: u16, origin: u32, payload in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            let mut f = encode(seq, epoch, part, KIND_RECORD, origin, &payload).unwrap();
            restamp(&mut f, new_epoch, new_part).unwrap();
            prop_assert_eq!(&f, &encode(seq, new_epoch, new_part, KIND_RECORD, origin, &payload).unwrap());
        }

        #[test]
        fn restamp_never_makes_a_corrupt_frame_check(payload in proptest::collection::vec(any::<u8>(), 1..40_000), bit in 0usize..(8 * 40_000), new_epoch: u32) {
            let mut f = encode(7, 1, 0, KIND_RECORD, 0, &payload).unwrap();
            let bit = bit % (payload.len() * 8);
            f[HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
            restamp(&mut f, new_epoch, 3).unwrap();
            let corrupt = matches!(decode(&f), Err(FrameError::BadCrc { .. }));
            prop_assert!(corrupt, "a restamped corrupt frame checked");
        }

        #[test]
        fn a_nested_header_gives_the_frame_encode_would(seq: u64, epoch: u32, part: u16, origin: u32, inner_seq: u64, payload in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            let inner = encode(inner_seq, 5, 1, KIND_RECORD, 0, &payload).unwrap();
            let head = nested_header(&inner, seq, epoch, part, origin).unwrap();
            let mut built = head.to_vec();
            built.extend_from_slice(&inner);
            prop_assert_eq!(&built, &encode(seq, epoch, part, KIND_NESTED, origin, &inner).unwrap());
        }

        #[test]
        fn decode_nested_gives_the_inner_frame_and_damage_fails_the_outer_check(inner_seq: u64, payload in proptest::collection::vec(any::<u8>(), 0..40_000), bit: usize) {
            let inner = encode(inner_seq, 5, 1, KIND_RECORD, 0, &payload).unwrap();
            let mut built = nested_header(&inner, 9, 2, 0, 3).unwrap().to_vec();
            built.extend_from_slice(&inner);
            let outer = decode(&built).unwrap();
            let got = decode_nested(&outer).unwrap();
            prop_assert_eq!(got.bytes, &inner[..]);
            prop_assert_eq!(got.header.seq, inner_seq);
            prop_assert_eq!(got.payload, &payload[..]);
            let bit = bit % (inner.len() * 8);
            built[HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&built).is_err(), "damage inside the inner frame passed the outer check");
        }

        #[test]
        fn any_truncation_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..600) {
            let f = encode(7, 1, 0, KIND_RECORD, 0, &payload).unwrap();
            let cut = cut % f.len();
            prop_assert!(decode(&f[..cut]).is_err());
        }
    }

    #[test]
    fn restamp_changes_placement_and_stays_valid() {
        let mut f = encode(9, 0, 0, KIND_RECORD, 0, b"hello").unwrap();
        restamp(&mut f, 5, 1).unwrap();
        let d = decode(&f).unwrap();
        assert_eq!(
            (d.header.epoch, d.header.partition, d.header.seq),
            (5, 1, 9)
        );
    }

    #[test]
    fn split_walks_a_batch_and_stops_at_damage() {
        let mut batch = encode(1, 0, 0, KIND_RECORD, 0, b"a").unwrap();
        batch.extend(encode(2, 0, 0, KIND_RECORD, 0, b"bb").unwrap());
        let seqs: Vec<u64> = split(&batch).map(|f| f.unwrap().header.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        let last = batch.len() - 1;
        batch[last] ^= 0xff;
        let results: Vec<_> = split(&batch).collect();
        assert!(results[0].is_ok() && results[1].is_err());
    }
}
