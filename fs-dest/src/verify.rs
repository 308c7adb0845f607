//! The destination's half of `fs-source verify`: summaries of an image directory's entries
//! (metadata and content hashes, see `proto::summary`), as of the last CP. Only summaries go
//! back; the source compares them with its own.
//!
//! Each listing holds the image's CP lock shared (it never sees half a CP) and runs on a
//! blocking thread; a source may have [`VERIFY_LISTINGS_PER_SOURCE`] at once, more are answered
//! "busy", so a flood of requests costs bounded work.

use std::sync::Arc;

use proto::summary::EntrySummary;
use proto::wire::{Control, VERIFY_PAGE};

use crate::cp_lock::CpLock;
use crate::engine::{lock, Source, VERIFY_LISTINGS_PER_SOURCE};

/// Answer `VerifyRequest { id, path, after, single }` for `source`.
pub async fn listing(
    source: Arc<Source>,
    id: u64,
    path: Vec<u8>,
    after: Option<Vec<u8>>,
    single: bool,
) -> Control {
    let refuse = |error: String| Control::VerifyListing {
        id,
        dir: None,
        entries: Vec::new(),
        more: false,
        error: Some(error),
    };
    if let Err(e) = proto::path::validate(&path) {
        return refuse(format!("refused path: {e}"));
    }
    if let Some(a) = &after {
        if a.is_empty() || a.contains(&b'/') || a.contains(&0) {
            return refuse("refused resume name".into());
        }
    }
    let Ok(permit) = source.verify_slots.clone().try_acquire_owned() else {
        return refuse(format!(
            "busy: {VERIFY_LISTINGS_PER_SOURCE} verify listings of this source are in progress"
        ));
    };
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let tree = source.image_tree().map_err(|e| e.to_string())?;
        let shown = |e: rustix::io::Errno| {
            format!(
                "listing {:?} in the image: {}",
                String::from_utf8_lossy(&path),
                std::io::Error::from(e)
            )
        };
        // The CP lock is held per entry, not for the whole page: a CP waits at most for one
        // file's hash (each summary shows one CP; the source re-checks what differs).
        let locked = || {
            CpLock::shared(source.dir())
                .map_err(|e| format!("CP lock in {}: {e}", source.dir().display()))
        };
        let summarize = |p: &[u8]| -> Result<Option<EntrySummary>, String> {
            let _lock = locked()?;
            match proto::summary::summarize(&tree, p, &mut |_| {}) {
                Ok(s) => Ok(Some(s)),
                Err(rustix::io::Errno::NOENT)
                | Err(rustix::io::Errno::NOTDIR)
                | Err(rustix::io::Errno::AGAIN) => Ok(None),
                Err(e) => Err(shown(e)),
            }
        };
        let dir = match after {
            None => summarize(&path)?.map(Box::new),
            Some(_) => None,
        };
        if single {
            return Ok((dir, Vec::new(), false));
        }
        if dir.is_none() && after.is_none() {
            return Err(shown(rustix::io::Errno::NOENT));
        }
        let cached = match &after {
            Some(_) => lock(&source.verify_names)
                .as_ref()
                .filter(|(p, _)| *p == path)
                .map(|(_, n)| n.clone()),
            None => None,
        };
        let names = match cached {
            Some(n) => n,
            None => {
                let _lock = locked()?;
                let n = Arc::new(proto::summary::names(&tree, &path).map_err(shown)?);
                *lock(&source.verify_names) = Some((path.clone(), n.clone()));
                n
            }
        };
        let start = match &after {
            Some(a) => names.partition_point(|n| n.as_slice() <= a.as_slice()),
            None => 0,
        };
        let mut entries = Vec::new();
        for name in &names[start..] {
            if entries.len() == VERIFY_PAGE {
                return Ok((dir, entries, true));
            }
            if let Some(s) = summarize(&proto::path::join(&path, name))? {
                entries.push(s);
            }
        }
        Ok((dir, entries, false))
    });
    match task.await {
        Ok(Ok((dir, entries, more))) => Control::VerifyListing {
            id,
            dir,
            entries,
            more,
            error: None,
        },
        Ok(Err(e)) => refuse(e),
        Err(e) => refuse(format!("listing task failed: {e}")),
    }
}
