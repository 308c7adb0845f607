//! Start-up recovery of the backing volume from the NVRAM.
//!
//! The process may have stopped anywhere: a SIGKILL leaves the backing volume's page cache
//! intact, a power cut takes whatever the last `syncfs` did not cover. Either way the records
//! after the durable cursor (moved only after a CP's `syncfs`, see `cp.rs`) are still in NVRAM,
//! and [`proto::apply::Tree::replay`] applies them exactly once, guided by the replay marker and
//! the file handles the records carry (see `proto::replay`). A backing volume without a marker
//! (written by an older version) is replayed as before: from the applied cursor, in tolerant
//! mode.

use anyhow::Context;
use proto::apply::Tree;
use proto::Op;

use crate::mirror::{Mirror, Recovery};

/// Replay what the backing volume may lack, make it durable, and move both cursors to the last
/// record in NVRAM.
pub fn recover(mirror: &Mirror, tree: &Tree, nvram: Recovery) -> anyhow::Result<()> {
    let marker = tree.marker().with_context(|| {
        format!(
            "reading the replay marker of {}",
            tree.root_path().display()
        )
    })?;
    if let (Some(m), Some(d)) = (marker, mirror.durable_marker()) {
        if d.generation == mirror.generation() && m < d.seq {
            anyhow::bail!(
                "the backing directory {} is older than the NVRAM: it lacks record {} and \
                 maybe others a consistency point had made durable (its replay marker says {m}); \
                 is it a copy or a restore? Mount it with the NVRAM file it was written with, \
                 or with a fresh NVRAM file (the destination then decides what it lacks)",
                tree.root_path().display(),
                d.seq
            );
        }
    }
    let from = if marker.is_some() {
        nvram.durable
    } else {
        nvram.applied
    };
    let mut window = Vec::new();
    let mut last = None;
    for f in &nvram.frames {
        let frame = proto::frame::decode(f).context("a frame changed after the recovery scan")?;
        let seq = frame.header.seq;
        last = Some(seq);
        if seq <= from {
            continue;
        }
        let op = Op::decode(frame.payload)
            .with_context(|| format!("record {seq} in NVRAM does not decode"))?;
        // A resync's `Replace` describes what the backing volume already was; it never ran here.
        if !matches!(op, Op::Replace { .. }) {
            window.push((seq, op));
        }
    }
    // Whatever the marker said (another generation's, or a promoted image's), from now on it
    // counts this NVRAM's records: every one up to the last logged is in the tree.
    let position = mirror.durable_point();
    if window.is_empty() {
        tree.set_marker(position)
            .context("setting the replay marker")?;
        return Ok(());
    }
    let last = last.unwrap_or(position);
    let report = tree
        .replay(&window)
        .with_context(|| format!("replaying NVRAM onto {}", tree.root_path().display()))?;
    for (seq, e) in &report.failed {
        tracing::warn!(seq, "replaying record {seq}: {e}");
    }
    tracing::info!(
        records = window.len(),
        first = window[0].0,
        last,
        marker = ?report.marker,
        by_path = report.by_path,
        by_handle = report.by_handle,
        gone = report.gone,
        already_there = report.skipped,
        failed = report.failed.len(),
        "replayed NVRAM records onto the backing directory"
    );
    tree.set_marker(position.max(last))
        .context("setting the replay marker")?;
    let root = tree
        .open_at(
            b"",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        )
        .context("opening the backing directory")?;
    rustix::fs::syncfs(&root).context("syncfs of the backing directory after recovery")?;
    mirror.set_applied(last)?;
    mirror.set_durable(last, proto::apply::marker_of(&root)?)?;
    Ok(())
}
