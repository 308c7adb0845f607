//! Messages between `fs-source` and `fs-dest` on their one long-lived QUIC stream.
//!
//! ```text
//! message = body_len: u32 LE | kind: u8 | body
//!   kind 1 FRAMES   body = back-to-back record frames (see `frame`), sent as stored in NVRAM
//!   kind 2 CONTROL  body = MessagePack `Control`
//! ```
//! Record frames travel as raw bytes so that the destination checks the very CRC the source
//! computed, and so that large writes are not re-encoded.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bytes of a message header.
pub const HEADER_LEN: usize = 5;
/// Largest message body accepted.
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
/// Largest first message (`Hello`) a destination reads from a connection that has not proved
/// who it is yet (a Hello is a few hundred bytes).
pub const MAX_HELLO_LEN: usize = 64 << 10;
/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 2;
/// Most entry summaries in one `VerifyListing`.
pub const VERIFY_PAGE: usize = 4096;
/// Most out-of-sync paths listed in one message (the total is always given).
pub const MAX_DIVERGENCES_LISTED: usize = 1000;
/// Kind byte of a batch of frames.
pub const KIND_FRAMES: u8 = 1;
/// Kind byte of a control message.
pub const KIND_CONTROL: u8 = 2;

/// Control messages (everything but records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Source → destination, first message on a connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the source.
        protocol: u32,
        /// The source's name (must match its certificate).
        source: String,
        /// The generation (epoch) of the volume the source serves; see fencing.
        generation: u64,
        /// Highest sequence number the source has logged.
        last_logged_seq: u64,
        /// Identity of the backing volume (kept on its root); the destination refuses a
        /// volume other than the one its image mirrors unless `take_over`.
        volume: String,
        /// The operator asked to replace the image with this volume (`--force-baseline`).
        take_over: bool,
    },
    /// Destination → source: accepted; resend everything after `durable_seq`.
    Welcome {
        /// Highest sequence number the destination holds durably for this source.
        durable_seq: u64,
        /// Highest sequence number applied to the image.
        applied_seq: u64,
        /// The destination's generation for this source.
        generation: u64,
        /// The image has no complete baseline of this volume: the source must transfer its
        /// tree (resuming where it stopped, if it knows).
        baseline_needed: bool,
        /// Paths of the image known to differ from the source (records that failed to apply),
        /// at most [`MAX_DIVERGENCES_LISTED`].
        out_of_sync: Vec<Divergence>,
        /// How many paths differ in all.
        out_of_sync_total: u64,
    },
    /// Destination → source: the connection is refused (bad name, fenced, bad version...).
    Refused {
        /// A message for the operator.
        reason: String,
    },
    /// Destination → source: every record up to `durable_seq` is in the destination's NVRAM.
    Ack {
        /// Highest durable sequence number.
        durable_seq: u64,
    },
    /// Source → destination: partition `partition` is full and durable on the source; apply
    /// this source's records up to `last_seq` to the image.
    CpRequest {
        /// Request id, echoed in the answer.
        id: u64,
        /// Source partition index.
        partition: u16,
        /// Last sequence number in that partition.
        last_seq: u64,
    },
    /// Destination → source: the CP is applied and durable in the image.
    CpDone {
        /// The request id.
        id: u64,
        /// Highest sequence number now applied to the image.
        applied_seq: u64,
        /// Records of this CP that could not be applied to the image.
        failed: u64,
        /// Paths of the image that differ from the source after this CP (see `Welcome`).
        out_of_sync: Vec<Divergence>,
        /// How many paths differ in all.
        out_of_sync_total: u64,
    },
    /// Source → destination: every record of the baseline, up to `last_seq`, is applied to the
    /// image (a CP said so): the image is a complete mirror of the volume from now on.
    BaselineDone {
        /// The last record of the baseline.
        last_seq: u64,
    },
    /// Destination → source: the baseline up to `last_seq` is recorded as complete.
    BaselineRecorded {
        /// The `last_seq` of the `BaselineDone` it answers.
        last_seq: u64,
    },
    /// Source → destination: summarize the image's entries of directory `path` (as of the
    /// last CP) whose names come after `after`, for `verify`.
    VerifyRequest {
        /// Request id, echoed in the answer.
        id: u64,
        /// The directory, relative to the image root.
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        /// Resume a listing after this name.
        after: Option<serde_bytes::ByteBuf>,
        /// Summarize `path` itself only (any type), not the directory's entries.
        single: bool,
    },
    /// Destination → source: the answer to `VerifyRequest`.
    VerifyListing {
        /// The request id.
        id: u64,
        /// The directory's own summary (in the first page).
        dir: Option<Box<crate::summary::EntrySummary>>,
        /// At most [`VERIFY_PAGE`] summaries, by name.
        entries: Vec<crate::summary::EntrySummary>,
        /// More entries follow (ask again after the last name).
        more: bool,
        /// The directory could not be listed (e.g. it is not in the image).
        error: Option<String>,
    },
    /// Source → destination: send back this source's records after `after` (a power cut took
    /// them from the source's NVRAM before its flush, but the destination holds them).
    FetchRecords {
        /// The last record the source still holds.
        after: u64,
    },
    /// Destination → source: records asked for by `FetchRecords`, as the source sent them.
    FetchedRecords {
        /// Back-to-back frames in sequence order, starting at `after + 1`.
        frames: serde_bytes::ByteBuf,
        /// More follow (ask again after the last one).
        more: bool,
        /// Why they cannot be sent (e.g. already applied and discarded).
        error: Option<String>,
    },
    /// Destination → source: a record or request was refused. Nothing was changed; the
    /// destination closes this connection after sending it.
    Error {
        /// Sequence number concerned, if any.
        seq: Option<u64>,
        /// What was wrong.
        reason: String,
    },
}

/// A path of the image that does not hold what the source has, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The path, relative to the volume root.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// The first record that failed for it.
    pub seq: u64,
    /// What failed (operation and OS error).
    pub error: String,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A batch of frames (raw bytes, to be split with [`crate::frame::split`]).
    Frames(Vec<u8>),
    /// A control message.
    Control(Control),
}

/// Why bytes are not a valid message.
#[derive(Debug, Error)]
pub enum WireError {
    /// The announced length is over [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE_LEN}")]
    TooLarge(usize),
    /// The announced length is over the limit of this point of the conversation (a `Hello`
    /// is small).
    #[error("message of {len} bytes is over the limit of {limit} bytes here")]
    OverLimit {
        /// Announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The control body does not decode.
    #[error("undecodable control message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Parse a message header into (kind, body length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), WireError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(WireError::TooLarge(len));
    }
    match h[4] {
        KIND_FRAMES | KIND_CONTROL => Ok((h[4], len)),
        k => Err(WireError::UnknownKind(k)),
    }
}

/// The header for a message of `kind` with `body_len` bytes.
pub fn header(kind: u8, body_len: usize) -> [u8; HEADER_LEN] {
    let l = (body_len as u32).to_le_bytes();
    [l[0], l[1], l[2], l[3], kind]
}

/// Decode a body once its header has been parsed.
pub fn decode_body(kind: u8, body: Vec<u8>) -> Result<Message, WireError> {
    match kind {
        KIND_FRAMES => Ok(Message::Frames(body)),
        KIND_CONTROL => Ok(Message::Control(rmp_serde::from_slice(&body)?)),
        k => Err(WireError::UnknownKind(k)),
    }
}

/// A whole control message (header + body), ready to send.
pub fn encode_control(c: &Control) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    // Encoding a plain enum into a Vec cannot fail.
    rmp_serde::encode::write(&mut out, c)
        .expect("encoding a control message into memory cannot fail");
    let h = header(KIND_CONTROL, out.len() - HEADER_LEN);
    out[..HEADER_LEN].copy_from_slice(&h);
    out
}

/// Decode one whole message from a buffer that holds exactly one (tests and tools).
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&bytes[..HEADER_LEN]);
    let (kind, len) = parse_header(&h)?;
    decode_body(kind, bytes[HEADER_LEN..HEADER_LEN + len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trip() {
        for c in [
            Control::Hello {
                protocol: PROTOCOL_VERSION,
                source: "alpha".into(),
                generation: 3,
                last_logged_seq: 99,
                volume: "v1".into(),
                take_over: false,
            },
            Control::CpDone {
                id: 2,
                applied_seq: 40,
                failed: 1,
                out_of_sync: vec![Divergence {
                    path: b"a/b".to_vec(),
                    seq: 39,
                    error: "write: EPERM".into(),
                }],
                out_of_sync_total: 1,
            },
            Control::Ack { durable_seq: 7 },
            Control::CpRequest {
                id: 1,
                partition: 1,
                last_seq: 40,
            },
            Control::Error {
                seq: Some(5),
                reason: "bad path".into(),
            },
        ] {
            assert_eq!(decode(&encode_control(&c)).unwrap(), Message::Control(c));
        }
    }

    #[test]
    fn oversized_and_unknown_headers_are_refused() {
        assert!(matches!(
            parse_header(&header(KIND_FRAMES, MAX_MESSAGE_LEN + 1)),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            parse_header(&header(9, 1)),
            Err(WireError::UnknownKind(9))
        ));
    }
}
