//! What the destination knows about an image beyond its records: which volume it mirrors and
//! whether its baseline is complete (`ROOT/NAME/volume`), and which of its paths are known to
//! differ from the source because a record failed to apply (`ROOT/NAME/out-of-sync`).
//!
//! Both are small JSON files written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new version, never half of one. Both are read
//! as hostile input: a file that does not parse is an error naming it, never a silent reset.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use proto::wire::{Divergence, MAX_DIVERGENCES_LISTED};
use serde::{Deserialize, Serialize};

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold what this program writes.
    #[error("{path}: not a valid state file ({reason}); move it away to start over")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read a JSON state file; `None` when it does not exist.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Write a small state file atomically (no sync: what it says only matters while the page
/// cache that holds it survives), readable by root only.
pub fn write_private(path: &Path, body: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(body).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Write a JSON state file atomically and durably, readable by root only.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(value).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&body).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Which volume an image mirrors (`ROOT/NAME/volume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The identity the source's backing volume carries on its root.
    pub volume: String,
    /// Every record of the baseline is applied: the image is a whole mirror of the volume.
    pub baseline_complete: bool,
}

/// `ROOT/NAME/volume`.
pub fn volume_path(source_dir: &Path) -> PathBuf {
    source_dir.join("volume")
}

/// Read the volume record of an image.
pub fn read_volume(source_dir: &Path) -> Result<Option<VolumeRecord>, StateError> {
    read_json(&volume_path(source_dir))
}

/// Write the volume record of an image.
pub fn write_volume(source_dir: &Path, record: &VolumeRecord) -> Result<(), StateError> {
    write_json(&volume_path(source_dir), record)
}

/// Whether the image directory holds anything.
pub fn image_is_empty(image: &Path) -> Result<bool, StateError> {
    let mut entries = std::fs::read_dir(image).map_err(io(image))?;
    Ok(entries.next().is_none())
}

/// What the handshake decided about a source's volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeDecision {
    /// The image mirrors this volume; `baseline_needed` when its baseline is not complete.
    Accept {
        /// The source must (re)start or resume its baseline.
        baseline_needed: bool,
        /// A record to write before welcoming the source (a new or taken-over image).
        write: Option<VolumeRecord>,
    },
    /// Refused: a message for the operator.
    Refuse(String),
}

/// Decide whether the volume a source presents may mirror into its image: an empty image
/// takes any volume; an image that holds data takes only the volume it mirrors, unless the
/// operator asked to replace it (`take_over`).
pub fn decide(
    name: &str,
    image: &Path,
    record: Option<&VolumeRecord>,
    presented: &str,
    take_over: bool,
    image_empty: bool,
) -> VolumeDecision {
    let fresh = || VolumeDecision::Accept {
        baseline_needed: true,
        write: Some(VolumeRecord {
            volume: presented.to_string(),
            baseline_complete: false,
        }),
    };
    match record {
        Some(r) if r.volume == presented => VolumeDecision::Accept {
            baseline_needed: !r.baseline_complete,
            write: None,
        },
        _ if image_empty || take_over => fresh(),
        Some(r) => VolumeDecision::Refuse(format!(
            "the image {} of source {name} mirrors volume {} but this source presents volume {presented} \
             (a different backing directory, or a new empty one): refusing, so that a wrong --backing \
             never replaces the image. Check --backing; to replace the image with this backing \
             directory's content, mount with --force-baseline",
            image.display(),
            r.volume
        )),
        None => VolumeDecision::Refuse(format!(
            "the image {} of source {name} holds data but no record of the volume it mirrors: \
             refusing to mirror volume {presented} over it. To replace the image with this \
             backing directory's content, mount with --force-baseline",
            image.display()
        )),
    }
}

/// The paths of an image known to differ from the source (`ROOT/NAME/out-of-sync`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Divergences {
    by_path: BTreeMap<Vec<u8>, Divergence>,
}

#[derive(Serialize, Deserialize)]
struct DivergenceFile {
    paths: Vec<Divergence>,
}

/// `ROOT/NAME/out-of-sync`.
pub fn divergence_path(source_dir: &Path) -> PathBuf {
    source_dir.join("out-of-sync")
}

impl Divergences {
    /// Load the set of an image (empty when the file does not exist).
    pub fn load(source_dir: &Path) -> Result<Divergences, StateError> {
        let file: Option<DivergenceFile> = read_json(&divergence_path(source_dir))?;
        let mut d = Divergences::default();
        for v in file.map(|f| f.paths).unwrap_or_default() {
            d.by_path.insert(v.path.clone(), v);
        }
        Ok(d)
    }

    /// Save the set (removing the file when it is empty).
    pub fn save(&self, source_dir: &Path) -> Result<(), StateError> {
        let path = divergence_path(source_dir);
        if self.by_path.is_empty() {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(&path)(e)),
            };
        }
        write_json(
            &path,
            &DivergenceFile {
                paths: self.by_path.values().cloned().collect(),
            },
        )
    }

    /// A record naming `paths` failed to apply: each of them now differs from the source
    /// (the first failure of a path is kept: it says when the divergence began).
    pub fn add(&mut self, paths: &[&[u8]], seq: u64, error: &str) {
        for p in paths {
            self.by_path
                .entry(p.to_vec())
                .or_insert_with(|| Divergence {
                    path: p.to_vec(),
                    seq,
                    error: error.to_string(),
                });
        }
    }

    /// Paths at or beneath `path`, in the set.
    fn under(&self, path: &[u8]) -> Vec<Vec<u8>> {
        if path.is_empty() {
            return self.by_path.keys().cloned().collect();
        }
        // Byte order puts "p/..." between "p/" and "p0" ('/' + 1 = '0').
        let mut lo = path.to_vec();
        lo.push(b'/');
        let mut hi = path.to_vec();
        hi.push(b'0');
        let mut out: Vec<Vec<u8>> = self.by_path.range(lo..hi).map(|(k, _)| k.clone()).collect();
        if self.by_path.contains_key(path) {
            out.push(path.to_vec());
        }
        out
    }

    /// A `Replace` of `path` applied. For a new entry (the old one and everything beneath it
    /// are gone) `path` and what was beneath it no longer differ; for a directory kept in
    /// place only the directory itself is resent, so its children keep their state (a child
    /// that failed stays listed until its own resend applies); a directory emptied (`clear`)
    /// drops everything beneath it.
    pub fn heal(&mut self, path: &[u8], kept_dir: bool, cleared: bool) {
        if kept_dir && !cleared {
            self.by_path.remove(path);
            return;
        }
        for p in self.under(path) {
            self.by_path.remove(&p);
        }
    }

    /// Heal `path` and everything beneath it.
    #[cfg(test)]
    pub fn heal_under(&mut self, path: &[u8]) {
        self.heal(path, false, true);
    }

    /// A rename applied: what differed under `from` now differs under `to` (and with
    /// `exchange`, the other way round too).
    pub fn renamed(&mut self, from: &[u8], to: &[u8], exchange: bool) {
        let take = |d: &mut Self, p: &[u8]| -> Vec<(Vec<u8>, Divergence)> {
            d.under(p)
                .into_iter()
                .filter_map(|k| d.by_path.remove(&k).map(|v| (k, v)))
                .collect()
        };
        let moving = take(self, from);
        let back = if exchange { take(self, to) } else { Vec::new() };
        let mut put = |old_root: &[u8], new_root: &[u8], items: Vec<(Vec<u8>, Divergence)>| {
            for (k, mut v) in items {
                let mut p = new_root.to_vec();
                p.extend_from_slice(&k[old_root.len()..]);
                v.path = p.clone();
                self.by_path.insert(p, v);
            }
        };
        put(from, to, moving);
        put(to, from, back);
    }

    /// A link applied: if the file differed under `existing`, it differs under `new` too.
    pub fn linked(&mut self, existing: &[u8], new: &[u8]) {
        if let Some(v) = self.by_path.get(existing).cloned() {
            self.by_path.insert(
                new.to_vec(),
                Divergence {
                    path: new.to_vec(),
                    ..v
                },
            );
        }
    }

    /// How many paths differ.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// True when the image is known to equal the source (as far as records go).
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// The first [`MAX_DIVERGENCES_LISTED`] paths, for messages.
    pub fn listed(&self) -> Vec<Divergence> {
        self.by_path
            .values()
            .take(MAX_DIVERGENCES_LISTED)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_decisions() {
        let img = Path::new("/r/a/image");
        let rec = VolumeRecord {
            volume: "v1".into(),
            baseline_complete: true,
        };
        assert_eq!(
            decide("a", img, Some(&rec), "v1", false, false),
            VolumeDecision::Accept {
                baseline_needed: false,
                write: None
            }
        );
        // A different volume over an image with data: refused, unless taken over.
        assert!(matches!(
            decide("a", img, Some(&rec), "v2", false, false),
            VolumeDecision::Refuse(m) if m.contains("--force-baseline") && m.contains("v1")
        ));
        assert!(matches!(
            decide("a", img, Some(&rec), "v2", true, false),
            VolumeDecision::Accept {
                baseline_needed: true,
                write: Some(_)
            }
        ));
        // An empty image takes any volume; data without a record is refused.
        assert!(matches!(
            decide("a", img, None, "v2", false, true),
            VolumeDecision::Accept {
                baseline_needed: true,
                write: Some(_)
            }
        ));
        assert!(matches!(
            decide("a", img, None, "v2", false, false),
            VolumeDecision::Refuse(_)
        ));
        let incomplete = VolumeRecord {
            baseline_complete: false,
            ..rec
        };
        assert_eq!(
            decide("a", img, Some(&incomplete), "v1", false, false),
            VolumeDecision::Accept {
                baseline_needed: true,
                write: None
            }
        );
    }

    #[test]
    fn divergences_heal_beneath_a_replaced_path_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Divergences::default();
        d.add(&[b"a/b", b"ab"], 5, "write: EPERM");
        d.add(&[b"a/b"], 7, "later");
        d.add(&[b"c"], 8, "x");
        assert_eq!(d.len(), 3);
        assert_eq!(d.listed()[0].seq, 5, "the first failure is kept");
        d.save(dir.path()).unwrap();
        assert_eq!(Divergences::load(dir.path()).unwrap(), d);
        d.renamed(b"ab", b"x/ab", false);
        d.renamed(b"x", b"ab", false);
        d.heal_under(b"a");
        assert_eq!(
            d.listed()
                .iter()
                .map(|v| v.path.clone())
                .collect::<Vec<_>>(),
            vec![b"ab/ab".to_vec(), b"c".to_vec()],
            "a rename carries the divergence along; a prefix that is not a parent heals nothing"
        );
        d.add(&[b"c/x"], 9, "y");
        d.heal(b"c", true, false);
        assert_eq!(
            d.listed()
                .iter()
                .map(|v| v.path.clone())
                .collect::<Vec<_>>(),
            vec![b"ab/ab".to_vec(), b"c/x".to_vec()],
            "a directory kept in place heals only itself"
        );
        d.linked(b"c/x", b"c/y");
        assert_eq!(d.len(), 3);
        d.heal_under(b"");
        assert!(d.is_empty());
        d.save(dir.path()).unwrap();
        assert!(!divergence_path(dir.path()).exists());
        std::fs::write(divergence_path(dir.path()), b"{garbage").unwrap();
        assert!(matches!(
            Divergences::load(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }
}
