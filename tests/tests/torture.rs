//! Crash torture: SIGKILL `fs-source` and `fs-dest` at random moments while clients write
//! through the mount; nothing acknowledged may be lost, on either side.
//!
//! Client threads each own a subtree `w<i>` of the mount and run a random mix of mutating
//! operations (create, write at an offset, append, truncate, chmod, symlink, mkdir, rmdir,
//! unlink, rename of files and directories, replacing renames). Each keeps a model of its
//! subtree, updated only when the syscall returned success (and then the operation is written
//! to its acknowledged log). An operation that fails with EIO/ENOTCONN/ECONNABORTED was in
//! flight at a kill: it is not acknowledged, and may or may not have happened. As soon as the
//! mount is back the client reads its whole subtree, which must equal the model either before
//! or after that operation — so every source crash also checks every acknowledged operation so
//! far. Any other error is a failure: the model says the operation must succeed.
//!
//! Meanwhile the killer sends SIGKILL to the source, the destination, or both, after a random
//! delay, and restarts them (the source with the same NVRAM file, at the same mount point, after
//! `umount -l` of its dead mount; the destination on the same address, so the source reconnects
//! by itself). 64 KiB source partitions make consistency points frequent, so many kills land
//! during one. At the end, after `fs-source cp`: every client's subtree on the mount equals its
//! model, and the image equals the backing directory.
//!
//! A gate (read-write lock) keeps clients off the mount point only while a dead mount is being
//! detached and the new one mounted: in that gap the path is the bare directory underneath, and
//! an operation there would look like a success. Kills themselves happen without the gate, at
//! any moment, operations in flight included.
//!
//! `NVMIRROR_TORTURE_KILLS=N` sets the number of kills (default 24, for CI).
//! The seed (`NVMIRROR_SEED` or `NVMIRROR_TEST_SEED`) fixes the clients' operations and the
//! kill schedule (delays, victims); thread timing still varies from run to run.

use nvmirror_e2e::{
    assert_trees_equal_named, poll_until, require_mount, Harness, HarnessOptions, Rng,
    SourceOptions,
};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

const TEST: &str = "torture";
const CLIENTS: usize = 2;

/// Client threads of the torture run: `NVMIRROR_TORTURE_CLIENTS`, default [`CLIENTS`]. Two
/// concurrent clients found the inode-number reuse bug (a fresh mkdir failing with EEXIST,
/// fixed by FUSE generations), so the default keeps them concurrent.
fn torture_clients() -> usize {
    std::env::var("NVMIRROR_TORTURE_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CLIENTS)
}
const DEFAULT_KILLS: u64 = 24;
const SMALL_PARTITION_BYTES: u64 = 65536;
/// Largest file a client makes (each write is at most one page: one record, one FUSE request).
const MAX_FILE: u64 = 48 << 10;
const MAX_WRITE: u64 = 4096;
/// Entries per client subtree before removals are preferred.
const MAX_ENTRIES: usize = 80;
/// How long a client waits for the mount to come back after a kill.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// A client subtree: path relative to its root ("a/b") → entry. The root itself is implicit.
type Model = BTreeMap<String, Entry>;

#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
        mode: u32,
    },
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    Append {
        path: String,
        data: Vec<u8>,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
}

impl Op {
    /// One line for the acknowledged log (data summarised).
    fn summary(&self) -> String {
        match self {
            Op::Write { path, offset, data } => {
                format!(
                    "write {path} @{offset} len {} crc {:08x}",
                    data.len(),
                    crc(data)
                )
            }
            Op::Append { path, data } => {
                format!("append {path} len {} crc {:08x}", data.len(), crc(data))
            }
            other => format!("{other:?}"),
        }
    }
}

fn crc(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn is_within(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

fn file_mut<'a>(m: &'a mut Model, path: &str) -> (&'a mut Vec<u8>, &'a mut u32) {
    match m.get_mut(path) {
        Some(Entry::File { data, mode }) => (data, mode),
        other => panic!("model: {path} is not a file: {other:?}"),
    }
}

/// The model after `op` (which must be valid for it).
fn apply(model: &Model, op: &Op) -> Model {
    let mut m = model.clone();
    match op {
        Op::Create { path, mode } => {
            m.insert(
                path.clone(),
                Entry::File {
                    data: vec![],
                    mode: *mode,
                },
            );
        }
        Op::Write { path, offset, data } => {
            let (d, _) = file_mut(&mut m, path);
            let end = *offset as usize + data.len();
            if data.is_empty() {
                return m;
            }
            if d.len() < end {
                d.resize(end, 0);
            }
            d[*offset as usize..end].copy_from_slice(data);
        }
        Op::Append { path, data } => file_mut(&mut m, path).0.extend_from_slice(data),
        Op::Truncate { path, len } => file_mut(&mut m, path).0.resize(*len as usize, 0),
        Op::Chmod { path, mode } => *file_mut(&mut m, path).1 = *mode,
        Op::Symlink { path, target } => {
            m.insert(path.clone(), Entry::Symlink(target.clone()));
        }
        Op::Mkdir { path } => {
            m.insert(path.clone(), Entry::Dir);
        }
        Op::Rmdir { path } | Op::Unlink { path } => {
            m.remove(path);
        }
        Op::Rename { from, to } => {
            let moved: Vec<String> = m
                .keys()
                .filter(|k| *k == from || is_within(k, from))
                .cloned()
                .collect();
            let mut entries = Vec::new();
            for k in moved {
                let e = m.remove(&k).expect("listed key");
                entries.push((format!("{to}{}", &k[from.len()..]), e));
            }
            m.remove(to);
            m.extend(entries);
        }
    }
    m
}

/// Choose an operation valid for `model`.
fn choose(model: &Model, rng: &mut Rng, counter: &mut u64) -> Op {
    let mut fresh = |prefix: &str| {
        *counter += 1;
        format!("{prefix}{counter}")
    };
    let dirs: Vec<String> = std::iter::once(String::new())
        .chain(
            model
                .iter()
                .filter(|(_, e)| **e == Entry::Dir)
                .map(|(k, _)| k.clone()),
        )
        .collect();
    let files: Vec<(&String, u64)> = model
        .iter()
        .filter_map(|(k, e)| match e {
            Entry::File { data, .. } => Some((k, data.len() as u64)),
            _ => None,
        })
        .collect();
    let leaves: Vec<&String> = model
        .iter()
        .filter(|(_, e)| **e != Entry::Dir)
        .map(|(k, _)| k)
        .collect();
    let empty_dirs: Vec<&String> = dirs
        .iter()
        .skip(1)
        .filter(|d| !model.keys().any(|k| is_within(k, d)))
        .collect();
    let crowded = model.len() >= MAX_ENTRIES;
    loop {
        let parent = &dirs[rng.below(dirs.len() as u64) as usize];
        let pick = |rng: &mut Rng, n: usize| rng.below(n as u64) as usize;
        let op = match rng.below(100) {
            0..=11 if !crowded => Op::Create {
                path: join(parent, &fresh("f")),
                mode: [0o644, 0o600, 0o755][pick(rng, 3)],
            },
            12..=41 if !files.is_empty() => {
                let (path, len) = files[pick(rng, files.len())];
                let n = 1 + rng.below(MAX_WRITE);
                let offset = rng.below((len + 2048).min(MAX_FILE - n));
                Op::Write {
                    path: path.clone(),
                    offset,
                    data: rng.bytes(n as usize),
                }
            }
            42..=51 if !files.is_empty() => {
                let (path, len) = files[pick(rng, files.len())];
                if len + MAX_WRITE > MAX_FILE {
                    continue;
                }
                let n = 1 + rng.below(MAX_WRITE);
                Op::Append {
                    path: path.clone(),
                    data: rng.bytes(n as usize),
                }
            }
            52..=57 if !files.is_empty() => {
                let (path, len) = files[pick(rng, files.len())];
                Op::Truncate {
                    path: path.clone(),
                    len: rng.below((len + 4096).min(MAX_FILE)),
                }
            }
            58..=61 if !files.is_empty() => {
                let (path, _) = files[pick(rng, files.len())];
                Op::Chmod {
                    path: path.clone(),
                    mode: [0o600, 0o640, 0o644, 0o700, 0o755][pick(rng, 5)],
                }
            }
            62..=65 if !crowded => Op::Symlink {
                path: join(parent, &fresh("l")),
                target: format!("target-{}", rng.below(1000)),
            },
            66..=71 if !crowded && dirs.len() < 12 => Op::Mkdir {
                path: join(parent, &fresh("d")),
            },
            72..=75 if !empty_dirs.is_empty() => Op::Rmdir {
                path: empty_dirs[pick(rng, empty_dirs.len())].clone(),
            },
            76..=85 if !leaves.is_empty() => Op::Unlink {
                path: leaves[pick(rng, leaves.len())].clone(),
            },
            86..=93 if !leaves.is_empty() => {
                let from = leaves[pick(rng, leaves.len())].clone();
                // Half of the time onto another existing leaf (replacing it).
                let to = if rng.below(2) == 0 && leaves.len() > 1 {
                    leaves[pick(rng, leaves.len())].clone()
                } else {
                    join(parent, &fresh("r"))
                };
                if to == from {
                    continue;
                }
                Op::Rename { from, to }
            }
            94..=99 if dirs.len() > 1 => {
                let from = dirs[1 + pick(rng, dirs.len() - 1)].clone();
                if parent == &from || is_within(parent, &from) {
                    continue;
                }
                Op::Rename {
                    from,
                    to: join(parent, &fresh("D")),
                }
            }
            _ if crowded && !leaves.is_empty() => Op::Unlink {
                path: leaves[pick(rng, leaves.len())].clone(),
            },
            _ => continue,
        };
        return op;
    }
}

/// The same write, cut to its first `n` bytes (what a short write did for sure).
fn cut(op: &Op, n: usize) -> Op {
    match op {
        Op::Write { path, offset, data } => Op::Write {
            path: path.clone(),
            offset: *offset,
            data: data[..n].to_vec(),
        },
        Op::Append { path, data } => Op::Append {
            path: path.clone(),
            data: data[..n].to_vec(),
        },
        other => panic!("cut: {other:?} is not a write"),
    }
}

/// Every state `op` may leave when it was in flight at a kill, from "not at all" to "whole" (the
/// last); `acked` bytes of a write are certain. Writes may stop at any page boundary.
fn outcomes(model: &Model, op: &Op, acked: usize) -> Vec<Model> {
    let (start, len) = match (op, model.get(op_path(op))) {
        (Op::Write { offset, data, .. }, _) => (*offset as usize, data.len()),
        (Op::Append { data, .. }, Some(Entry::File { data: old, .. })) => (old.len(), data.len()),
        _ => return vec![model.clone(), apply(model, op)],
    };
    let mut cuts = vec![acked];
    cuts.extend((acked + 1..len).filter(|k| (start + k) % 4096 == 0));
    cuts.push(len);
    cuts.dedup();
    cuts.into_iter()
        .map(|k| apply(model, &cut(op, k)))
        .collect()
}

fn op_path(op: &Op) -> &str {
    match op {
        Op::Create { path, .. }
        | Op::Write { path, .. }
        | Op::Append { path, .. }
        | Op::Truncate { path, .. }
        | Op::Chmod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Mkdir { path }
        | Op::Rmdir { path }
        | Op::Unlink { path } => path,
        Op::Rename { from, .. } => from,
    }
}

/// Carry `op` out under `root` with one mutating syscall (plus non-mutating opens/closes).
/// `Ok(Some(n))`: a short write of `n` bytes (the kernel split the write into two FUSE requests
/// at a page boundary and the second failed: the rest was in flight at a kill).
fn run(root: &Path, op: &Op) -> io::Result<Option<usize>> {
    let p = |s: &str| root.join(s);
    let short = |n: usize, want: usize| Ok((n != want).then_some(n));
    match op {
        Op::Create { path, mode } => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .open(p(path))?;
            Ok(None)
        }
        Op::Write { path, offset, data } => {
            let f = OpenOptions::new().write(true).open(p(path))?;
            short(f.write_at(data, *offset)?, data.len())
        }
        Op::Append { path, data } => {
            let mut f = OpenOptions::new().append(true).open(p(path))?;
            short(f.write(data)?, data.len())
        }
        Op::Truncate { path, len } => OpenOptions::new()
            .write(true)
            .open(p(path))?
            .set_len(*len)
            .map(|()| None),
        Op::Chmod { path, mode } => {
            fs::set_permissions(p(path), fs::Permissions::from_mode(*mode)).map(|()| None)
        }
        Op::Symlink { path, target } => std::os::unix::fs::symlink(target, p(path)).map(|()| None),
        Op::Mkdir { path } => fs::create_dir(p(path)).map(|()| None),
        Op::Rmdir { path } => fs::remove_dir(p(path)).map(|()| None),
        Op::Unlink { path } => fs::remove_file(p(path)).map(|()| None),
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map(|()| None),
    }
}

/// Read a client subtree from the mount.
fn read_tree(root: &Path) -> io::Result<Model> {
    fn walk(root: &Path, rel: &str, out: &mut Model) -> io::Result<()> {
        for entry in fs::read_dir(root.join(rel))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = join(rel, &name);
            let full = root.join(&path);
            let meta = fs::symlink_metadata(&full)?;
            let t = meta.file_type();
            if t.is_dir() {
                out.insert(path.clone(), Entry::Dir);
                walk(root, &path, out)?;
            } else if t.is_symlink() {
                let target = fs::read_link(&full)?;
                out.insert(path, Entry::Symlink(target.to_string_lossy().into_owned()));
            } else {
                out.insert(
                    path,
                    Entry::File {
                        data: fs::read(&full)?,
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            }
        }
        Ok(())
    }
    let mut out = Model::new();
    walk(root, "", &mut out)?;
    Ok(out)
}

/// Differences between two models, one line each (at most 20).
fn diff(a: &Model, b: &Model, a_name: &str, b_name: &str) -> String {
    let mut lines = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => lines.push(format!("only in {a_name}: {k}")),
            Some(vb) if vb != va => {
                lines.push(format!("{k}: {a_name}={} {b_name}={}", show(va), show(vb)))
            }
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        lines.push(format!("only in {b_name}: {k}"));
    }
    let n = lines.len();
    lines.truncate(20);
    format!("{n} differences:\n  {}", lines.join("\n  "))
}

fn show(e: &Entry) -> String {
    match e {
        Entry::Dir => "dir".into(),
        Entry::Symlink(t) => format!("symlink->{t}"),
        Entry::File { data, mode } => {
            format!(
                "file(mode {mode:o}, {} bytes, crc {:08x})",
                data.len(),
                crc(data)
            )
        }
    }
}

/// Errors an operation in flight at a kill may get: the source died (the kernel aborts its
/// requests), or it restarted and its mount was detached.
fn in_flight_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

#[derive(Debug, Default)]
struct ClientStats {
    acknowledged: u64,
    uncertain: u64,
    uncertain_applied: u64,
}

struct Client {
    index: usize,
    root: PathBuf,
    gate: Arc<RwLock<()>>,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    acked_log: File,
    seed: u64,
}

impl Client {
    /// The client's loop; returns its final model.
    fn run(self) -> (Model, ClientStats) {
        let mut rng = Rng::new(self.seed);
        let mut model = Model::new();
        let mut stats = ClientStats::default();
        let mut counter = 0;
        let mut log = io::BufWriter::new(&self.acked_log);
        while !self.stop.load(Ordering::Relaxed) && !self.failed.load(Ordering::Relaxed) {
            let op = choose(&model, &mut rng, &mut counter);
            let after = apply(&model, &op);
            let result = {
                let _open = self.gate.read().unwrap_or_else(|p| p.into_inner());
                run(&self.root, &op)
            };
            // What may be found once the mount is back: the operation's effect up to some
            // point. The kernel sends a write as several FUSE requests when it starts or ends
            // inside a page (a partly written page that is not cached ends a request), each a
            // record of its own, so a write in flight at a kill may be there up to a page
            // boundary. A short write acknowledged its first `n` bytes.
            let (acked, why) = match &result {
                Ok(None) => {
                    model = after;
                    stats.acknowledged += 1;
                    writeln!(log, "{}", op.summary()).expect("acknowledged log");
                    continue;
                }
                Ok(Some(n)) => {
                    stats.acknowledged += 1;
                    writeln!(log, "{}", cut(&op, *n).summary()).expect("acknowledged log");
                    (*n, format!("short write of {n} bytes"))
                }
                Err(e) if in_flight_error(e) => (0, e.to_string()),
                Err(e) => self.fail(format!(
                    "client w{}: {} failed with {e}, but the model says it must succeed \
                     (an acknowledged operation was lost?)",
                    self.index,
                    op.summary()
                )),
            };
            stats.uncertain += 1;
            writeln!(log, "# in flight at a kill ({why}): {}", op.summary())
                .expect("acknowledged log");
            let candidates = outcomes(&model, &op, acked);
            let found = self.wait_for_tree();
            match candidates.iter().position(|c| *c == found) {
                Some(i) if i == candidates.len() - 1 => stats.uncertain_applied += 1,
                Some(_) => {}
                None => self.fail(format!(
                    "client w{}: after a kill during {} ({why}), the mount shows none of the \
                     states the operation may have left.\nagainst the state before it: {}\n\
                     against the state after it: {}",
                    self.index,
                    op.summary(),
                    diff(&candidates[0], &found, "model", "mount"),
                    diff(&after, &found, "model", "mount"),
                )),
            }
            model = found;
        }
        drop(log);
        (model, stats)
    }

    /// Read the subtree once the mount answers again.
    fn wait_for_tree(&self) -> Model {
        let mut found = None;
        let mut last_error = None;
        let ok = poll_until(RECOVERY_TIMEOUT, || {
            let _open = self.gate.read().unwrap_or_else(|p| p.into_inner());
            match read_tree(&self.root) {
                Ok(t) => {
                    found = Some(t);
                    true
                }
                Err(e) if in_flight_error(&e) => {
                    last_error = Some(e);
                    false
                }
                Err(e) => self.fail(format!("client w{}: reading the subtree: {e}", self.index)),
            }
        });
        if !ok {
            self.fail(format!(
                "client w{}: the mount did not come back within {RECOVERY_TIMEOUT:?} (last error {last_error:?})",
                self.index
            ));
        }
        found.expect("read")
    }

    fn fail(&self, message: String) -> ! {
        self.failed.store(true, Ordering::Relaxed);
        panic!("{message}");
    }
}

/// Sets the shared failure flag when a client thread panics, so the killer stops at once.
struct FailOnPanic(Arc<AtomicBool>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Victim {
    Source,
    Dest,
    Both,
}

fn seed_from_env() -> u64 {
    for var in ["NVMIRROR_SEED", "NVMIRROR_TEST_SEED"] {
        if let Ok(s) = std::env::var(var) {
            let seed = s
                .parse()
                .unwrap_or_else(|_| panic!("{var}={s:?} is not a u64"));
            eprintln!("{TEST}: random seed {seed} (from {var})");
            return seed;
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    eprintln!("{TEST}: random seed {seed} (replay with NVMIRROR_SEED={seed})");
    seed
}

#[test]
fn sigkill_of_either_daemon_loses_nothing_acknowledged() {
    require_mount!(TEST);
    let kills: u64 = std::env::var("NVMIRROR_TORTURE_KILLS")
        .map(|s| s.parse().expect("NVMIRROR_TORTURE_KILLS is a number"))
        .unwrap_or(DEFAULT_KILLS);
    let seed = seed_from_env();
    let mut rng = Rng::new(seed);
    let opts = {
        let mut o = SourceOptions::new("alpha");
        o.partition_size_bytes = Some(SMALL_PARTITION_BYTES);
        o
    };
    let mut h =
        Harness::start(HarnessOptions::new(TEST).partition_size_bytes(SMALL_PARTITION_BYTES));
    let mnt = h.mnt().to_path_buf();

    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..torture_clients() {
        let root = mnt.join(format!("w{i}"));
        fs::create_dir(&root).expect("create client dir");
        let client = Client {
            index: i,
            root,
            gate: gate.clone(),
            stop: stop.clone(),
            failed: failed.clone(),
            acked_log: File::create(h.dir.join(format!("acknowledged-w{i}.log")))
                .expect("acknowledged log"),
            seed: rng.next_u64(),
        };
        clients.push(thread::spawn(move || {
            let _flag = FailOnPanic(client.failed.clone());
            client.run()
        }));
    }

    let started = Instant::now();
    let done_kills = AtomicU64::new(0);
    let mut counts = (0, 0, 0);
    for k in 0..kills {
        if failed.load(Ordering::Relaxed) {
            break;
        }
        // The fault injection: a random moment.
        let delay = Duration::from_millis(50 + rng.below(1500));
        let victim = match rng.below(100) {
            0..=44 => Victim::Source,
            45..=89 => Victim::Dest,
            _ => Victim::Both,
        };
        thread::sleep(delay);
        eprintln!(
            "{TEST}: kill {}/{kills}: {victim:?} after {delay:?} ({:?} in)",
            k + 1,
            started.elapsed()
        );
        match victim {
            Victim::Source => {
                counts.0 += 1;
                h.kill_source();
                let _closed = gate.write().unwrap_or_else(|p| p.into_inner());
                h.detach_source();
                h.restart_source(&opts)
                    .unwrap_or_else(|e| panic!("fs-source did not restart after SIGKILL: {e}"));
            }
            Victim::Dest => {
                counts.1 += 1;
                h.kill_dest();
                h.restart_dest()
                    .unwrap_or_else(|e| panic!("fs-dest did not restart after SIGKILL: {e}"));
            }
            Victim::Both => {
                counts.2 += 1;
                h.kill_dest();
                h.kill_source();
                let _closed = gate.write().unwrap_or_else(|p| p.into_inner());
                h.detach_source();
                h.restart_dest()
                    .unwrap_or_else(|e| panic!("fs-dest did not restart after SIGKILL: {e}"));
                h.restart_source(&opts)
                    .unwrap_or_else(|e| panic!("fs-source did not restart after SIGKILL: {e}"));
            }
        }
        done_kills.fetch_add(1, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    let mut models = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.join() {
            Ok(r) => models.push(r),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("client w{i} failed (seed {seed}): {msg}");
            }
        }
    }
    let kills_done = done_kills.load(Ordering::Relaxed);
    eprintln!(
        "{TEST}: {kills_done} kills (source {}, destination {}, both {}) in {:?}",
        counts.0,
        counts.1,
        counts.2,
        started.elapsed()
    );
    for (i, (_, stats)) in models.iter().enumerate() {
        eprintln!("{TEST}: client w{i}: {stats:?}");
    }
    assert_eq!(kills_done, kills);

    // A source whose destination restarted carries on by itself: it reconnects and resends
    // what the destination lacks (with policy sync it may have gone on alone meanwhile, if
    // the reconnection took longer than its timeout). `cp` is run once it has caught up.
    let started = Instant::now();
    nvmirror_e2e::wait_until(
        "the source to be connected and acknowledged everything it logged",
        Duration::from_secs(120),
        || {
            let s = h.status();
            s.link == "up" && s.last_acked_seq == s.last_logged_seq
        },
    );
    eprintln!(
        "{TEST}: the source had caught up after {:?}",
        started.elapsed()
    );
    h.cp();
    for (i, (model, _)) in models.iter().enumerate() {
        let found = read_tree(&mnt.join(format!("w{i}"))).expect("read the final tree");
        assert!(
            &found == model,
            "client w{i} (seed {seed}): the mount differs from the acknowledged operations: {}",
            diff(model, &found, "acknowledged", "mount")
        );
    }
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    assert_trees_equal_named(h.backing(), &mnt, "backing", "mount");
    let total: u64 = models.iter().map(|(_, s)| s.acknowledged).sum();
    assert!(
        total > kills,
        "the clients got few operations through: {total}"
    );
    let status = h.status();
    assert_eq!(
        status.last_applied_seq, status.last_logged_seq,
        "after cp the destination applied everything: {}",
        status.raw
    );
}

/// The torture's model checked against a plain local directory, no mount, no kills: two clients
/// for a few seconds. A failure here is a bug of the model (the test), not of nvmirror; it
/// separates the two when the torture reports "an acknowledged operation was lost".
#[test]
fn torture_model_matches_a_local_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = seed_from_env();
    let mut rng = Rng::new(seed);
    eprintln!("torture_model_matches_a_local_directory: seed {seed}");
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let root = dir.path().join(format!("w{i}"));
        fs::create_dir(&root).expect("create client dir");
        let client = Client {
            index: i,
            root,
            gate: gate.clone(),
            stop: stop.clone(),
            failed: failed.clone(),
            acked_log: File::create(dir.path().join(format!("acknowledged-w{i}.log")))
                .expect("acknowledged log"),
            seed: rng.next_u64(),
        };
        clients.push(thread::spawn(move || client.run()));
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for (i, c) in clients.into_iter().enumerate() {
        let (model, _) = c
            .join()
            .unwrap_or_else(|_| panic!("client w{i} failed (seed {seed})"));
        let found = read_tree(&dir.path().join(format!("w{i}"))).expect("read tree");
        assert!(
            found == model,
            "client w{i} (seed {seed}): model and directory differ"
        );
    }
}
