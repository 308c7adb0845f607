//! Power cut of the source machine's disk: the backing directory and the source's NVRAM file
//! live on a loop-mounted ext4 filesystem, which is cut with `xfs_io -x -c shutdown` (unsynced
//! data is lost, later writes fail with EIO, as after a power loss) while a client writes and
//! consistency points run. Then the filesystem is remounted (journal replay), the source
//! restarted on it, and a CP run.
//!
//! What must hold, and is asserted, over ten cuts of a workload of creates, overwrites, renames
//! over existing names, unlink then create of the same name, hard links and renames of
//! directories with new children: every operation acknowledged before a cut is in the
//! destination's image (the destination had it in NVRAM before the acknowledgement) *and* in the
//! backing volume (start-up recovery replays, exactly once, every record after the last CP's
//! `syncfs`: see docs/recovery.md), and nothing else is.

use nvmirror_e2e::{require_mount, run_ok, Harness, HarnessOptions, Rng, SourceOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A loop device with an ext4 filesystem mounted on `mnt`; unmounted and detached on drop.
struct LoopFs {
    image: PathBuf,
    device: String,
    mnt: PathBuf,
}

impl LoopFs {
    fn create(image: &Path, mnt: &Path, bytes: u64) -> LoopFs {
        fs::File::create(image)
            .and_then(|f| f.set_len(bytes))
            .expect("loop image");
        let device = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(image))
            .trim()
            .to_string();
        let fs = LoopFs {
            image: image.to_path_buf(),
            device,
            mnt: mnt.to_path_buf(),
        };
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &fs.device]));
        fs::create_dir_all(mnt).expect("loop mount point");
        fs.mount();
        fs
    }

    fn mount(&self) {
        run_ok(Command::new("mount").arg(&self.device).arg(&self.mnt));
    }

    /// The power cut: everything not yet on the device is lost.
    fn shutdown(&self) {
        run_ok(
            Command::new("xfs_io")
                .args(["-x", "-c", "shutdown"])
                .arg(&self.mnt),
        );
    }

    fn unmount(&self) {
        run_ok(Command::new("umount").arg(&self.mnt));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        let _ = fs::remove_file(&self.image);
    }
}

/// A file the client wrote and got acknowledged: (name, content).
type Written = (String, Vec<u8>);

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What the client knows it was told: names → file, file → content. Hard links share a file.
#[derive(Debug, Clone, Default)]
struct Model {
    names: BTreeMap<String, u64>,
    files: BTreeMap<u64, Vec<u8>>,
    next: u64,
    /// Directories the workload moves files between (and renames, with their children).
    dirs: Vec<String>,
}

impl Model {
    fn drop_name(&mut self, name: &str) {
        if let Some(f) = self.names.remove(name) {
            if !self.names.values().any(|v| *v == f) {
                self.files.remove(&f);
            }
        }
    }
}

/// One client operation of the power-cut workload, applied to the mount and, once it returned,
/// to the model. Returns the names it touches (what is uncertain if the cut interrupts it).
fn client_op(rng: &mut Rng, mnt: &Path, m: &mut Model) -> Result<(), (Vec<String>, String)> {
    let names: Vec<String> = m.names.keys().cloned().collect();
    let pick = |rng: &mut Rng, v: &[String]| v[rng.below(v.len() as u64) as usize].clone();
    let dir = pick(rng, &m.dirs.clone());
    let fresh = |m: &mut Model, dir: &str| {
        m.next += 1;
        format!("{dir}/f{}", m.next)
    };
    let err = |touched: Vec<String>, e: std::io::Error| Err((touched, e.to_string()));
    match rng.below(10) {
        // create (most common)
        0..=3 => {
            let name = fresh(m, &dir);
            let len = 1 + rng.below(6000) as usize;
            let data = rng.bytes(len);
            if let Err(e) = fs::write(mnt.join(&name), &data) {
                return err(vec![name], e);
            }
            m.next += 1;
            m.names.insert(name, m.next);
            m.files.insert(m.next, data);
        }
        // overwrite an existing file in place (all its names see it)
        4 if !names.is_empty() => {
            let name = pick(rng, &names);
            let len = 1 + rng.below(6000) as usize;
            let data = rng.bytes(len);
            let f = m.names[&name];
            let touched: Vec<String> = m
                .names
                .iter()
                .filter(|(_, v)| **v == f)
                .map(|(k, _)| k.clone())
                .collect();
            if let Err(e) = fs::write(mnt.join(&name), &data) {
                return err(touched, e);
            }
            m.files.insert(f, data);
        }
        // rename over an existing name, or to a new one
        5 | 6 if !names.is_empty() => {
            let from = pick(rng, &names);
            let to = if rng.below(2) == 0 {
                pick(rng, &names)
            } else {
                fresh(m, &dir)
            };
            if from == to {
                return Ok(());
            }
            if let Err(e) = fs::rename(mnt.join(&from), mnt.join(&to)) {
                return err(vec![from, to], e);
            }
            let f = m.names[&from];
            if m.names.get(&to) != Some(&f) {
                m.drop_name(&to);
                m.names.remove(&from);
                m.names.insert(to, f);
            }
        }
        // unlink, then often a new file under the same name
        7 if !names.is_empty() => {
            let name = pick(rng, &names);
            if let Err(e) = fs::remove_file(mnt.join(&name)) {
                return err(vec![name], e);
            }
            m.drop_name(&name);
            if rng.below(2) == 0 {
                let len = 1 + rng.below(3000) as usize;
                let data = rng.bytes(len);
                if let Err(e) = fs::write(mnt.join(&name), &data) {
                    return err(vec![name], e);
                }
                m.next += 1;
                m.names.insert(name, m.next);
                m.files.insert(m.next, data);
            }
        }
        // a hard link
        8 if !names.is_empty() => {
            let existing = pick(rng, &names);
            let new = fresh(m, &dir);
            if let Err(e) = fs::hard_link(mnt.join(&existing), mnt.join(&new)) {
                return err(vec![new], e);
            }
            let f = m.names[&existing];
            m.names.insert(new, f);
        }
        // rename a directory with the files created in it since the last CP
        9 => {
            let i = rng.below(m.dirs.len() as u64) as usize;
            let from = m.dirs[i].clone();
            m.next += 1;
            let to = format!("d{}", m.next);
            let inside: Vec<String> = m
                .names
                .keys()
                .filter(|k| k.starts_with(&format!("{from}/")))
                .cloned()
                .collect();
            let mut touched = inside.clone();
            touched.extend(inside.iter().map(|k| format!("{to}{}", &k[from.len()..])));
            if let Err(e) = fs::rename(mnt.join(&from), mnt.join(&to)) {
                return err(touched, e);
            }
            for k in inside {
                let f = m.names.remove(&k).expect("name");
                m.names.insert(format!("{to}{}", &k[from.len()..]), f);
            }
            m.dirs[i] = to;
        }
        _ => {}
    }
    Ok(())
}

/// Every file of `root` (two levels: the workload's directories and their files): name →
/// content.
fn files_of(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for d in fs::read_dir(root).expect("list tree") {
        let d = d.expect("entry");
        if !d.file_type().expect("type").is_dir() {
            continue;
        }
        let dn = d.file_name().to_string_lossy().into_owned();
        for f in fs::read_dir(d.path()).expect("list dir") {
            let f = f.expect("entry");
            let name = format!("{dn}/{}", f.file_name().to_string_lossy());
            out.insert(name, fs::read(f.path()).unwrap_or_default());
        }
    }
    out
}

/// How `tree` differs from `model` (names `uncertain` excepted): missing or wrong files, and
/// files that should not be there.
fn differences(
    tree: &BTreeMap<String, Vec<u8>>,
    model: &Model,
    uncertain: &BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, f) in &model.names {
        if uncertain.contains(name) {
            continue;
        }
        match tree.get(name) {
            None => out.push(format!("{name}: missing")),
            Some(d) if Some(d) != model.files.get(f) => out.push(format!("{name}: wrong content")),
            Some(_) => {}
        }
    }
    for name in tree.keys() {
        if !model.names.contains_key(name) && !uncertain.contains(name) {
            out.push(format!("{name}: should not exist"));
        }
    }
    out
}

#[test]
fn power_cut_of_the_source_disk_loses_no_acknowledged_operation() {
    const TEST: &str = "powercut_source";
    require_mount!(TEST);
    for tool in ["losetup", "mkfs.ext4", "xfs_io"] {
        assert!(
            have(tool),
            "{TEST}: {tool} is missing (tests/run installs xfsprogs; e2fsprogs and mount are in Debian's base)"
        );
    }
    let cuts: usize = std::env::var("NVMIRROR_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut rng = Rng::from_env(TEST);
    let h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(65536));
    // The source under test is "beta", with everything on the loop filesystem.
    h.certs_issue(&h.tls_dir.clone(), "beta");
    let disk = LoopFs::create(&h.dir.join("beta.img"), &h.dir.join("beta-disk"), 256 << 20);
    let mut opts = SourceOptions::new("beta");
    opts.partition_size_bytes = Some(65536);
    let mut source = Some(
        h.mount_source_in(&opts, &disk.mnt)
            .unwrap_or_else(|e| panic!("beta did not mount: {e}")),
    );
    let mnt = disk.mnt.join("mnt-beta");
    let backing = disk.mnt.join("backing-beta");
    let mut model = Model::default();
    for i in 0..4 {
        let d = format!("d{i}");
        fs::create_dir(mnt.join(&d)).expect("workload directory");
        model.dirs.push(d);
    }
    h.cp_of(&mnt);
    let (mut acked_total, mut lost_backing, mut lost_image) = (0usize, 0usize, 0usize);
    for cut in 1..=cuts {
        // A client runs the workload; each operation is acknowledged when its call returns.
        // Consistency points run meanwhile (each syncs the backing volume), partitions being
        // small, plus one asked for midway.
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new((
            model.clone(),
            0usize,
            BTreeSet::<String>::new(),
        )));
        let writer = {
            let (shared, stop, mnt) = (shared.clone(), stop.clone(), mnt.clone());
            let seed = rng.next_u64();
            thread::spawn(move || {
                let mut rng = Rng::new(seed);
                while !stop.load(Ordering::Relaxed) {
                    let mut m = shared.lock().expect("model").0.clone();
                    match client_op(&mut rng, &mnt, &mut m) {
                        Ok(()) => {
                            let mut s = shared.lock().expect("model");
                            s.0 = m;
                            s.1 += 1;
                        }
                        Err((touched, _)) => {
                            // Cut under it: its outcome is unknown.
                            shared.lock().expect("model").2.extend(touched);
                            return;
                        }
                    }
                }
            })
        };
        let cut_after = Duration::from_millis(300 + rng.below(1200));
        thread::sleep(cut_after / 2);
        h.cp_of(&mnt);
        thread::sleep(cut_after / 2);
        disk.shutdown();
        // The machine is down: the process dies, its mount with it.
        let mut beta = source.take().expect("beta");
        beta.daemon.kill_and_reap();
        nvmirror_e2e::lazy_unmount(&beta.mountpoint);
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        drop(beta);
        let (acked_model, acked, uncertain) = shared.lock().expect("model").clone();
        acked_total += acked;

        // Power back: journal replay, then the source starts on what the disk kept.
        disk.unmount();
        disk.mount();
        source = Some(
            h.mount_source_in(&opts, &disk.mnt)
                .unwrap_or_else(|e| panic!("beta did not restart after cut {cut}: {e}")),
        );
        h.cp_of(&mnt);
        let in_backing = differences(&files_of(&backing), &acked_model, &uncertain);
        let in_image = differences(&files_of(&h.image_of("beta")), &acked_model, &uncertain);
        eprintln!(
            "{TEST}: cut {cut} after {cut_after:?}: {acked} operations acknowledged; \
             {} differ on the backing volume, {} in the image",
            in_backing.len(),
            in_image.len()
        );
        lost_backing += in_backing.len();
        lost_image += in_image.len();
        assert!(
            in_backing.is_empty(),
            "cut {cut}: acknowledged operations missing from the backing volume after a source power cut: {:?}",
            &in_backing[..in_backing.len().min(20)]
        );
        assert!(
            in_image.is_empty(),
            "cut {cut}: acknowledged operations missing from the destination's image after a source power cut: {:?}",
            &in_image[..in_image.len().min(20)]
        );
        // The next round starts from what the tree holds now (the uncertain names settled).
        model = acked_model;
        let now = files_of(&backing);
        for name in &uncertain {
            model.drop_name(name);
            if let Some(d) = now.get(name) {
                model.next += 1;
                model.names.insert(name.clone(), model.next);
                model.files.insert(model.next, d.clone());
            }
        }
        // Hard links the uncertain operation may have made or broken, and directories it may
        // have renamed: read them again.
        relink(&mut model, &backing);
        model.dirs = fs::read_dir(&backing)
            .expect("list backing")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        model.dirs.sort();
    }
    eprintln!(
        "{TEST}: {cuts} power cuts, {acked_total} operations acknowledged; missing on the \
         backing volume: {lost_backing}, missing in the image: {lost_image}"
    );
    drop(source);
}

/// Rebuild the model's hard-link groups from the inode numbers of `root`.
fn relink(m: &mut Model, root: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut by_ino: BTreeMap<u64, u64> = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut names = BTreeMap::new();
    for (name, f) in &m.names {
        let Ok(md) = fs::metadata(root.join(name)) else {
            continue;
        };
        let id = *by_ino.entry(md.ino()).or_insert(*f);
        names.insert(name.clone(), id);
        if let Some(d) = m.files.get(f) {
            files.entry(id).or_insert_with(|| d.clone());
        }
    }
    m.names = names;
    m.files = files;
}

fn bind(src: &Path, dst: &Path) {
    run_ok(Command::new("mount").arg("--bind").arg(src).arg(dst));
}

/// Keeps bind mounts over the harness's destination paths; removes them on drop (also on
/// panic, before the loop filesystem goes).
struct Binds(Vec<PathBuf>);

impl Drop for Binds {
    fn drop(&mut self) {
        for dst in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(dst).status();
        }
    }
}

#[test]
fn power_cut_of_the_destination_disk_keeps_acknowledged_operations() {
    const TEST: &str = "powercut_dest";
    require_mount!(TEST);
    for tool in ["losetup", "mkfs.ext4", "xfs_io"] {
        assert!(
            have(tool),
            "{TEST}: {tool} is missing (tests/run installs xfsprogs)"
        );
    }
    let mut rng = Rng::from_env(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(65536));
    // Move the destination's root and NVRAM file onto a loop filesystem, bound over the paths
    // the harness uses, so the destination restarts on them (the source is stopped meanwhile
    // and started again afterwards).
    h.source.take();
    h.kill_dest();
    let disk = LoopFs::create(&h.dir.join("dest.img"), &h.dir.join("dest-disk"), 512 << 20);
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&h.dest_root)
            .arg(disk.mnt.join("root")),
    );
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(h.dest_nvram())
            .arg(disk.mnt.join("nvram")),
    );
    let targets = [
        (disk.mnt.join("root"), h.dest_root.clone()),
        (disk.mnt.join("nvram"), h.dest_nvram()),
    ];
    let mut binds = Binds(vec![]);
    for (src, dst) in &targets {
        bind(src, dst);
        binds.0.push(dst.clone());
    }
    h.restart_dest()
        .unwrap_or_else(|e| panic!("fs-dest on the loop disk: {e}"));
    let mut opts = SourceOptions::new("alpha");
    opts.partition_size_bytes = Some(65536);
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("fs-source did not restart: {e}"));

    // A client writes files; a CP runs midway; the destination's disk is cut.
    let mnt = h.mnt().to_path_buf();
    let acked: Arc<Mutex<Vec<Written>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, mnt) = (acked.clone(), stop.clone(), mnt.clone());
        let seed = rng.next_u64();
        thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("f{i}");
                let len = 1 + rng.below(6000) as usize;
                let data = rng.bytes(len);
                match fs::write(mnt.join(&name), &data) {
                    Ok(()) => acked.lock().expect("acked").push((name, data)),
                    Err(e) => panic!("{name}: {e} (writes wait for the destination, never fail)"),
                }
                i += 1;
            }
        })
    };
    let cut_after = Duration::from_millis(500 + rng.below(1500));
    thread::sleep(cut_after / 2);
    h.cp();
    thread::sleep(cut_after / 2);
    disk.shutdown();
    eprintln!("{TEST}: power cut of the destination disk after {cut_after:?}");
    h.kill_dest();

    // Power back: remount (journal replay), bind again, restart. The source reconnects,
    // resends what the destination lacks, and the writer's waiting operations complete.
    drop(binds);
    disk.unmount();
    disk.mount();
    let mut binds = Binds(vec![]);
    for (src, dst) in &targets {
        bind(src, dst);
        binds.0.push(dst.clone());
    }
    h.restart_dest()
        .unwrap_or_else(|e| panic!("fs-dest did not restart after the power cut: {e}"));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer must not fail");
    // The source finds the restarted destination by itself and resends what it lacks.
    let started = std::time::Instant::now();
    nvmirror_e2e::wait_until(
        "the source to be acknowledged everything it logged",
        Duration::from_secs(120),
        || {
            let s = h.status();
            s.last_acked_seq == s.last_logged_seq
        },
    );
    eprintln!(
        "{TEST}: the source caught up {:?} after the destination restarted",
        started.elapsed()
    );
    // Records applied again from an older cursor may not apply as they first did: the
    // destination reports those paths out of sync and the source resends them.
    let retries = h.cp_until_in_sync(Duration::from_secs(120));
    eprintln!("{TEST}: cp succeeded after {retries} out-of-sync answer(s)");

    let acked = acked.lock().expect("acked").clone();
    assert!(
        acked.len() > 3,
        "too few writes before the cut: {}",
        acked.len()
    );
    let image = h.image();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|(name, data)| fs::read(image.join(name)).ok().as_ref() != Some(data))
        .map(|(name, _)| name)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged files missing from the image after a destination power cut: {missing:?}"
    );
    nvmirror_e2e::assert_trees_equal_named(h.backing(), &image, "backing", "image");
    // The harness stops the daemons before the binds and the loop disk go.
    h.source.take();
    h.dest.take();
    drop(binds);
}
