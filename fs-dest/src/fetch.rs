//! Records sent back to their source: after a power cut of the source, its NVRAM may lack the
//! last records it had sent (the destination acknowledged them before the source's own flush
//! completed; no client got a reply for them). The destination still holds them in its
//! journals, so the restarted source fetches them instead of being refused.
//!
//! Only records not yet applied can be sent (a CP discards what it applied); the source asks a
//! CP only for records it holds durably, so the records a source can lack are never applied.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::wire::Control;

use crate::engine::{Engine, Source};

/// Most bytes of frames in one answer.
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// How long to wait for the destager to journal what NVRAM holds.
const DESTAGE_WAIT: Duration = Duration::from_secs(60);

/// Answer `FetchRecords { after }` for `source`.
pub async fn fetch(engine: Arc<Engine>, source: Arc<Source>, after: u64) -> Control {
    let fail = |error: String| Control::FetchedRecords {
        frames: Default::default(),
        more: false,
        error: Some(error),
    };
    let accepted = source.accepted_seq.load(Ordering::Acquire);
    let applied = source.applied_seq.load(Ordering::Acquire);
    if after < applied {
        return fail(format!(
            "records {}..={applied} are applied to the image and no longer held; the source cannot \
             get them back (promote the image or reseed the source)",
            after + 1
        ));
    }
    if after >= accepted {
        return Control::FetchedRecords {
            frames: Default::default(),
            more: false,
            error: None,
        };
    }
    if !source.wait_journaled(&engine, accepted, DESTAGE_WAIT).await {
        return fail(format!(
            "records up to {accepted} were not journaled within {DESTAGE_WAIT:?}"
        ));
    }
    let s = source.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut records = s.journal_records(after, accepted)?;
        records.dedup_by_key(|(seq, _)| *seq);
        Ok::<_, crate::error::JournalError>(records)
    });
    let records = match read.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return fail(format!("reading the journals: {e}")),
        Err(e) => return fail(format!("journal task failed: {e}")),
    };
    let mut frames = Vec::new();
    let mut expected = after + 1;
    let mut more = false;
    for (seq, f) in records {
        if seq != expected {
            return fail(format!("record {expected} is in no journal"));
        }
        if !frames.is_empty() && frames.len() + f.len() > MAX_ANSWER_BYTES {
            more = true;
            break;
        }
        frames.extend_from_slice(&f);
        expected += 1;
    }
    tracing::warn!(source = %source.name, after, upto = expected - 1,
        "sending records back to a source that lost them (power cut before its flush)");
    Control::FetchedRecords {
        frames: frames.into(),
        more,
        error: None,
    }
}
