//! `fs-source verify`: compare the backing volume with the image, while writes go on.
//!
//! 1. A CP of everything logged so far, so the image is as of that moment.
//! 2. The backing volume is walked depth first; for each directory the destination sends the
//!    summaries of its image entries (type, mode, owner, size, mtime, link count, device,
//!    symlink target, xattrs, BLAKE3 of the content: `proto::summary`), the source computes
//!    its own and compares. Only summaries cross the network. Hard-link groups are compared
//!    at the end (each side groups its own paths by inode).
//! 3. A difference may be a write still on its way: after another CP each suspect path is
//!    summarized again on both sides. Still different and unchanged on the backing volume
//!    (same ctime) means a real difference; changed on the backing volume means it is being
//!    written: it is checked again, up to three rounds, and reported as "changing" if it never
//!    holds still.
//! 4. With `--repair`, each difference is resent from the backing volume's current state
//!    (`resync::Sender`), a CP applies it, and the paths are checked once more.
//!
//! Hashing on the source side is paced to `--rate-mib`, so a verify can run in production.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proto::summary::{self, EntrySummary, Kind};
use rustix::io::Errno;
use serde::Serialize;

use crate::link::{LinkShared, Listing};
use crate::resync::{dfs_cmp, is_under, Sender};
use crate::volume::Volume;

/// How long one listing may take (the destination hashes a whole directory).
const LISTING_TIMEOUT: Duration = Duration::from_secs(600);
/// Rounds of re-checking suspects.
const ROUNDS: usize = 3;

/// What `verify` was asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Resend what differs.
    pub repair: bool,
    /// Hash at most this many bytes per second on the source.
    pub rate_bytes_per_sec: Option<f64>,
}

/// One path that differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// The path, relative to the volume root (lossy UTF-8).
    pub path: String,
    /// What differs.
    pub what: Vec<String>,
}

/// What a verify found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// Entries compared.
    pub entries: u64,
    /// Content bytes hashed on the source.
    pub bytes: u64,
    /// Seconds the whole verify took.
    pub seconds: f64,
    /// Bytes hashed per second.
    pub rate_bytes_per_sec: f64,
    /// The image was compared as of this record (and later, for re-checks).
    pub applied_seq: u64,
    /// Paths that differ (before any repair).
    pub differences: Vec<Difference>,
    /// Paths that kept changing on the backing volume and could not be compared.
    pub changing: Vec<String>,
    /// Differences resent and found equal afterwards.
    pub repaired: u64,
    /// Differences still there after the repair.
    pub unrepaired: Vec<Difference>,
}

/// Progress, for the progress bar and `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyProgress {
    /// "cp", "comparing", "rechecking", "repairing".
    pub phase: &'static str,
    /// Entries compared.
    pub entries_done: u64,
    /// Entries in the volume.
    pub entries_total: u64,
    /// Content bytes hashed.
    pub bytes_done: u64,
    /// Content bytes in the volume.
    pub bytes_total: u64,
}

/// How often a running verify logs its progress.
const LOG_EVERY: Duration = Duration::from_secs(10);

struct Verifier<'a> {
    volume: &'a Volume,
    link: &'a LinkShared,
    rt: &'a tokio::runtime::Handle,
    rate: Option<f64>,
    started: Instant,
    progress: VerifyProgress,
    report_progress: &'a mut dyn FnMut(&VerifyProgress),
    last_report: Instant,
    /// When progress was last logged (every [`LOG_EVERY`]).
    last_log: Instant,
    /// Path → why it is suspect, and the backing summary it was seen with.
    suspects: BTreeMap<Vec<u8>, (Vec<String>, Option<EntrySummary>)>,
    /// Hard-linked files: path → inode, on each side.
    local_links: BTreeMap<Vec<u8>, u64>,
    remote_links: BTreeMap<Vec<u8>, u64>,
    /// Paths found different, for the repair.
    confirmed_paths: Vec<Vec<u8>>,
    /// Confirmed paths that are directories on both sides.
    both_dirs: std::collections::BTreeSet<Vec<u8>>,
}

fn show(p: &[u8]) -> String {
    if p.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

impl Verifier<'_> {
    fn tick(&mut self, force: bool) {
        if force || self.last_report.elapsed() >= Duration::from_millis(200) {
            (self.report_progress)(&self.progress);
            self.last_report = Instant::now();
        }
        if self.last_log.elapsed() >= LOG_EVERY {
            let p = &self.progress;
            tracing::info!(
                phase = p.phase,
                entries = p.entries_done,
                bytes = p.bytes_done,
                seconds = format!("{:.0}", self.started.elapsed().as_secs_f64()),
                "verify: in progress"
            );
            self.last_log = Instant::now();
        }
    }

    fn hashed(&mut self, n: u64) {
        self.progress.bytes_done += n;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.progress.bytes_done as f64 / rate);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(Duration::from_secs(5)));
            }
        }
        self.tick(false);
    }

    fn ask(&self, path: &[u8], after: Option<Vec<u8>>, single: bool) -> Result<Listing, String> {
        let rx = self.link.request_listing(path, after, single);
        match self
            .rt
            .block_on(async { tokio::time::timeout(LISTING_TIMEOUT, rx).await })
        {
            Ok(Ok(l)) => match &l.error {
                Some(e) => Err(format!(
                    "the destination could not list {}: {e}",
                    show(path)
                )),
                None => Ok(l),
            },
            Ok(Err(_)) => Err(format!(
                "the link to the destination broke while listing {}",
                show(path)
            )),
            Err(_) => Err(format!(
                "the destination did not list {} within {LISTING_TIMEOUT:?}",
                show(path)
            )),
        }
    }

    /// The image's summary of `path` alone (`None`: not in the image).
    fn remote_entry(&self, path: &[u8]) -> Result<Option<EntrySummary>, String> {
        Ok(self.ask(path, None, true)?.dir.map(|d| *d))
    }

    fn local_entry(&mut self, path: &[u8]) -> Result<Option<EntrySummary>, String> {
        let tree = self.volume.tree();
        let mut n = 0;
        let r = summary::summarize(tree, path, &mut |b| n += b);
        self.hashed(n);
        match r {
            Ok(s) => Ok(Some(s)),
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => Ok(None),
            Err(Errno::AGAIN) => Ok(None),
            Err(e) => Err(format!(
                "summarizing {} on the backing volume: {}",
                show(path),
                std::io::Error::from(e)
            )),
        }
    }

    fn suspect(&mut self, path: Vec<u8>, why: Vec<String>, local: Option<EntrySummary>) {
        self.suspects.insert(path, (why, local));
    }

    fn note_links(
        &mut self,
        path: &[u8],
        local: Option<&EntrySummary>,
        remote: Option<&EntrySummary>,
    ) {
        if let Some(l) = local.filter(|l| l.kind == Kind::File && l.nlink > 1) {
            self.local_links.insert(path.to_vec(), l.ino);
        }
        if let Some(r) = remote.filter(|r| r.kind == Kind::File && r.nlink > 1) {
            self.remote_links.insert(path.to_vec(), r.ino);
        }
    }

    /// Compare directory `path` (which exists on both sides) and recurse.
    fn compare_dir(&mut self, path: &[u8]) -> Result<(), String> {
        // The image's entries come in pages sorted by name, merged with the backing
        // volume's sorted names: memory holds one page, whatever the directory's size.
        let first = match self.ask(path, None, false) {
            Ok(r) => r,
            Err(e) if e.contains("No such file") || e.contains("Not a directory") => {
                // Gone from the image meanwhile: a suspect, checked again.
                let local = self.local_entry(path)?;
                self.suspect(path.to_vec(), vec!["only in backing".into()], local);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if path.is_empty() {
            let local = self.local_entry(path)?;
            if let (Some(l), Some(r)) = (&local, first.dir.as_deref()) {
                let d = summary::differences(l, r);
                if !d.is_empty() {
                    self.suspect(Vec::new(), d, local.clone());
                }
            }
        }
        let names = match summary::names(self.volume.tree(), path) {
            Ok(n) => n,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "listing {}: {}",
                    show(path),
                    std::io::Error::from(e)
                ))
            }
        };
        let mut page = first.entries.into_iter();
        let mut more = first.more;
        let mut last_name: Option<Vec<u8>> = None;
        let mut next_remote = |v: &Self| -> Result<Option<EntrySummary>, String> {
            loop {
                if let Some(e) = page.next() {
                    last_name = Some(e.name.clone());
                    return Ok(Some(e));
                }
                if !more {
                    return Ok(None);
                }
                let next = v.ask(path, last_name.clone(), false)?;
                more = next.more;
                page = next.entries.into_iter();
            }
        };
        let mut remote = next_remote(self)?;
        let mut subdirs = Vec::new();
        let mut names = names.into_iter().peekable();
        loop {
            let order = match (names.peek(), &remote) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(n), Some(r)) => n.as_slice().cmp(r.name.as_slice()),
            };
            let (name, image) = match order {
                std::cmp::Ordering::Less => (names.next().unwrap_or_default(), None),
                std::cmp::Ordering::Greater => {
                    let r = remote.take();
                    remote = next_remote(self)?;
                    let name = r.as_ref().map(|r| r.name.clone()).unwrap_or_default();
                    self.suspect(
                        proto::path::join(path, &name),
                        vec!["only in image".into()],
                        None,
                    );
                    continue;
                }
                std::cmp::Ordering::Equal => {
                    let r = remote.take();
                    remote = next_remote(self)?;
                    (names.next().unwrap_or_default(), r)
                }
            };
            let child = proto::path::join(path, &name);
            let local = self.local_entry(&child)?;
            self.progress.entries_done += 1;
            self.note_links(&child, local.as_ref(), image.as_ref());
            match (local, image) {
                (None, None) => {}
                (Some(l), None) => self.suspect(child, vec!["only in backing".into()], Some(l)),
                (None, Some(_)) => self.suspect(child, vec!["only in image".into()], None),
                (Some(l), Some(r)) => {
                    let d = summary::differences(&l, &r);
                    let both_dirs = l.kind == Kind::Dir && r.kind == Kind::Dir;
                    if !d.is_empty() {
                        self.suspect(child.clone(), d, Some(l));
                    }
                    if both_dirs {
                        subdirs.push(child);
                    }
                }
            }
            self.tick(false);
        }
        for d in subdirs {
            self.compare_dir(&d)?;
        }
        Ok(())
    }

    /// Paths whose hard-link group differs between the two sides.
    fn link_suspects(&self) -> Vec<Vec<u8>> {
        let group_of = |links: &BTreeMap<Vec<u8>, u64>, p: &[u8]| -> Vec<Vec<u8>> {
            match links.get(p) {
                Some(ino) => links
                    .iter()
                    .filter(|(_, i)| *i == ino)
                    .map(|(q, _)| q.clone())
                    .collect(),
                None => vec![p.to_vec()],
            }
        };
        let mut out = Vec::new();
        let paths: std::collections::BTreeSet<&Vec<u8>> = self
            .local_links
            .keys()
            .chain(self.remote_links.keys())
            .collect();
        for p in paths {
            if group_of(&self.local_links, p) != group_of(&self.remote_links, p) {
                out.push(p.clone());
            }
        }
        out
    }

    fn commit(&self, what: &str) -> Result<u64, String> {
        let mirror = self.volume.mirror();
        let target = mirror.progress(|p| p.logged);
        if !crate::baseline::commit(mirror, target) {
            return Err(format!(
                "{what}: the destination has not applied the records up to {target} (is the link down?)"
            ));
        }
        Ok(target)
    }

    /// Check the suspects again after a CP; returns the confirmed differences and what kept
    /// changing.
    fn recheck(&mut self) -> Result<(Vec<Difference>, Vec<String>), String> {
        let mut confirmed = Vec::new();
        for _ in 0..ROUNDS {
            if self.suspects.is_empty() {
                break;
            }
            self.progress.phase = "rechecking";
            self.tick(true);
            self.commit("re-checking differences")?;
            let suspects = std::mem::take(&mut self.suspects);
            let same = |a: &Option<EntrySummary>, b: &Option<EntrySummary>| match (a, b) {
                (Some(a), Some(b)) => a.ctime == b.ctime && a.mtime == b.mtime && a.size == b.size,
                (None, None) => true,
                _ => false,
            };
            for (path, (why, before)) in suspects {
                // Backing, image, backing again: a change on the backing volume between the
                // two reads (a write the image may or may not hold yet) is not a difference.
                let local = self.local_entry(&path)?;
                let remote = self.remote_entry(&path)?;
                let again = self.local_entry(&path)?;
                let changed = !same(&before, &local) || !same(&local, &again);
                let links_differ = why.iter().any(|w| w == "hard links");
                let d = match (&local, &remote) {
                    (None, None) => Vec::new(),
                    (Some(_), None) => vec!["only in backing".to_string()],
                    (None, Some(_)) => vec!["only in image".to_string()],
                    (Some(l), Some(r)) => summary::differences(l, r),
                };
                let d = if d.is_empty() && links_differ {
                    why.clone()
                } else {
                    d
                };
                if d.is_empty() {
                    continue;
                }
                if changed {
                    // Written meanwhile: look again next round (or report it as changing).
                    self.suspects.insert(path, (d, local));
                } else {
                    let dirs =
                        |e: &Option<EntrySummary>| e.as_ref().is_some_and(|e| e.kind == Kind::Dir);
                    if dirs(&local) && dirs(&remote) {
                        self.both_dirs.insert(path.clone());
                    }
                    confirmed.push(Difference {
                        path: show(&path),
                        what: d,
                    });
                    self.confirmed_paths.push(path);
                }
            }
        }
        let changing = std::mem::take(&mut self.suspects)
            .into_keys()
            .map(|p| show(&p))
            .collect();
        Ok((confirmed, changing))
    }
}

/// Run a verify of `volume` against its image.
pub fn run(
    volume: &Volume,
    link: &LinkShared,
    rt: &tokio::runtime::Handle,
    options: VerifyOptions,
    report_progress: &mut dyn FnMut(&VerifyProgress),
) -> Result<VerifyReport, String> {
    let mirror = volume.mirror();
    if mirror.standalone() {
        return Err("this volume is not mirrored (no --dest): there is no image to verify".into());
    }
    if mirror.progress(|p| p.baseline.incomplete()) {
        return Err(
            "the baseline is still running: the image is not a whole mirror yet; verify after it"
                .into(),
        );
    }
    let started = Instant::now();
    let mut v = Verifier {
        volume,
        link,
        rt,
        rate: options.rate_bytes_per_sec.filter(|r| *r > 0.0),
        started,
        progress: VerifyProgress {
            phase: "cp",
            ..Default::default()
        },
        report_progress,
        last_report: Instant::now(),
        last_log: Instant::now(),
        suspects: BTreeMap::new(),
        local_links: BTreeMap::new(),
        remote_links: BTreeMap::new(),
        confirmed_paths: Vec::new(),
        both_dirs: Default::default(),
    };
    v.tick(true);
    let applied_seq = v.commit("verify")?;
    let (entries_total, bytes_total) = crate::baseline::count_tree(volume.tree());
    v.progress.entries_total = entries_total;
    v.progress.bytes_total = bytes_total;
    v.progress.phase = "comparing";
    v.compare_dir(b"")?;
    for p in v.link_suspects() {
        let local = v.local_entry(&p)?;
        v.suspect(p, vec!["hard links".into()], local);
    }
    let (entries, bytes) = (v.progress.entries_done, v.progress.bytes_done);
    let (differences, changing) = v.recheck()?;
    let mut report = VerifyReport {
        entries,
        bytes,
        applied_seq,
        differences: differences.clone(),
        changing,
        ..Default::default()
    };
    if options.repair && !differences.is_empty() {
        v.progress.phase = "repairing";
        v.tick(true);
        let mut paths = std::mem::take(&mut v.confirmed_paths);
        paths.sort_by(|a, b| dfs_cmp(a, b));
        let mut sender = Sender::new(volume.tree(), mirror);
        if let Some(b) = volume.baseline() {
            sender = sender.with_baseline(b);
        }
        let mut sent: Vec<Vec<u8>> = Vec::new();
        // Directories that exist on both sides get their own metadata only (their differing
        // children are listed on their own), deepest last so their mtime is set after the
        // children changed it.
        let mut dir_metadata = Vec::new();
        for p in &paths {
            if sent.iter().any(|s| is_under(p, s)) {
                continue;
            }
            let both_dirs = v.both_dirs.contains(p);
            tracing::info!(path = %show(p), "verify: repairing");
            if both_dirs {
                dir_metadata.push(p.clone());
                continue;
            }
            sender
                .path(p)
                .map_err(|e| format!("repairing {}: {e}", show(p)))?;
            sent.push(p.clone());
        }
        dir_metadata.sort_by(|a, b| dfs_cmp(b, a));
        for p in &dir_metadata {
            sender
                .entry(p, false)
                .and_then(|_| sender.dir_times(p))
                .map_err(|e| format!("repairing {}: {e}", show(p)))?;
        }
        v.commit("applying the repair")?;
        let mut unrepaired = Vec::new();
        for p in &paths {
            let local = v.local_entry(p)?;
            let remote = v.remote_entry(p)?;
            let d = match (&local, &remote) {
                (None, None) => Vec::new(),
                (Some(_), None) => vec!["only in backing".to_string()],
                (None, Some(_)) => vec!["only in image".to_string()],
                (Some(l), Some(r)) => summary::differences(l, r),
            };
            if !d.is_empty() {
                unrepaired.push(Difference {
                    path: show(p),
                    what: d,
                });
            }
        }
        report.repaired = (paths.len() - unrepaired.len()) as u64;
        report.unrepaired = unrepaired;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.rate_bytes_per_sec = report.bytes as f64 / report.seconds.max(0.001);
    tracing::info!(
        entries = report.entries,
        bytes = report.bytes,
        differences = report.differences.len(),
        changing = report.changing.len(),
        repaired = report.repaired,
        seconds = format!("{:.1}", report.seconds),
        "verify done"
    );
    Ok(report)
}
