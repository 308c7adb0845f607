//! The baseline: a backing directory that holds data before its first mount is transferred
//! whole to the image while the mount serves (contents, modes, owners, times, hard links,
//! symlinks, xattrs, special files), resumes after a SIGKILL instead of starting over, and a
//! wrong (empty or unrelated) backing directory never replaces an image that holds data.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nvmirror_e2e::{
    assert_trees_equal, mtime_differences, mtimes, poll_until, require_mount, wait_until, Harness,
    HarnessOptions, Rng,
};

const BASELINE_TIMEOUT: Duration = Duration::from_secs(180);

/// A tree with every kind of entry and metadata, `files` regular files of up to `max_size`
/// bytes. Returns the number of regular files.
fn populate(root: &Path, rng: &mut Rng, files: usize, max_size: usize) -> usize {
    let dirs: Vec<PathBuf> = (0..8)
        .map(|i| {
            root.join(format!("d{i}"))
                .join(if i % 3 == 0 { "sub" } else { "" })
        })
        .collect();
    for d in &dirs {
        fs::create_dir_all(d).expect("mkdir");
    }
    for i in 0..files {
        let dir = &dirs[i % dirs.len()];
        let size = match i % 5 {
            0 => 0,
            1 => rng.below(4096) as usize,
            _ => rng.below(max_size as u64) as usize,
        };
        let p = dir.join(format!("f{i}"));
        fs::write(&p, rng.bytes(size)).expect("write file");
        if i % 7 == 0 {
            xattr(&p, "user.tag", format!("v{i}").as_bytes());
        }
        if i % 11 == 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o4750)).expect("chmod");
        }
        if i % 13 == 0 {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).expect("chown");
        }
    }
    // A sparse file: a hole, then data.
    let sparse = fs::File::create(root.join("d1/sparse")).expect("sparse");
    sparse.set_len(5 << 20).expect("truncate");
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", 5 << 20).expect("write tail");
    // Hard links, inside one directory and across two.
    fs::hard_link(root.join("d2/f2"), root.join("d2/f2.link")).expect("link");
    fs::hard_link(root.join("d2/f2"), root.join("d5/f2.other")).expect("link");
    // Symlinks, one dangling.
    std::os::unix::fs::symlink("../d2/f2", root.join("d1/to-f2")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    // A FIFO and a character device (the null device's number).
    mknod(&root.join("d4/fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(
        &root.join("d4/null"),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 3),
    );
    fs::set_permissions(root.join("d3"), fs::Permissions::from_mode(0o2775)).expect("chmod dir");
    xattr(&root.join("d6"), "user.dir", b"attr of a directory");
    // Old times on everything (directories last, as their mtime changes with their content).
    let mut all = Vec::new();
    walk(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (n, p) in all.iter().enumerate() {
        let t = libc::timespec {
            tv_sec: 1_500_000_000 + n as i64 * 1000,
            tv_nsec: (n as i64 * 7919) % 1_000_000_000,
        };
        set_times(p, t);
    }
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        let m = fs::symlink_metadata(&p).expect("lstat");
        if m.is_dir() {
            walk(&p, out);
        }
        out.push(p);
    }
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in path")
}

fn xattr(p: &Path, name: &str, value: &[u8]) {
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn mknod(p: &Path, mode: u32, dev: u64) {
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(cstr(p).as_ptr(), mode, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_times(p: &Path, t: libc::timespec) {
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cstr(p).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn assert_mtimes_equal(backing: &Path, image: &Path) {
    let differing = mtime_differences(&mtimes(backing), &mtimes(image));
    assert!(
        differing.is_empty(),
        "mtimes differ:\n{}",
        differing.join("\n")
    );
}

/// Waits until the source reports its baseline done and the image in sync.
#[track_caller]
fn wait_in_sync(h: &Harness) {
    let mut last = String::new();
    let ok = poll_until(BASELINE_TIMEOUT, || {
        let s = h.status();
        last = s.raw.to_string();
        s.raw["sync"] == "in-sync" && s.raw["baseline"]["state"] == "done"
    });
    if !ok {
        h.print_logs();
        panic!("the baseline did not finish within {BASELINE_TIMEOUT:?}; last status: {last}");
    }
}

#[test]
fn a_volume_with_data_is_baselined_while_the_mount_serves() {
    const TEST: &str = "baseline_serves";
    require_mount!(TEST);
    baseline_while_serving(TEST, None);
}

/// The same with the walk slowed down, so that the workload's changes meet it in the middle
/// of the tree instead of after it.
#[test]
fn a_slow_baseline_meets_the_workload_in_the_middle() {
    const TEST: &str = "baseline_slow";
    require_mount!(TEST);
    baseline_while_serving(TEST, Some("8"));
}

fn baseline_while_serving(test: &str, rate_mib: Option<&str>) {
    let mut options = HarnessOptions::new(test).partition_size_bytes(1 << 20);
    if let Some(r) = rate_mib {
        options.source.extra_args = vec!["--baseline-rate-mib".into(), r.into()];
    }
    let mut h = Harness::start_dest_only(&options);
    let mut rng = Rng::from_env(test);
    populate(&h.backing_of("alpha"), &mut rng, 400, 256 << 10);
    h.source = Some(
        h.mount_source(&options.source)
            .unwrap_or_else(|e| panic!("fs-source did not mount: {e}")),
    );
    // The mount serves at once; these race the baseline wherever it is: the seeded mixed
    // workload in a new directory, and changes to the tree being transferred.
    let mnt = h.mnt().to_path_buf();
    let seed = rng.next_u64();
    let workload = {
        let w = mnt.join("w");
        std::thread::spawn(move || {
            fs::create_dir(&w).expect("mkdir w");
            nvmirror_e2e::workload::mixed(&w, &mut Rng::new(seed));
        })
    };
    for i in (8..400).step_by(37) {
        let d = format!("d{}", i % 8);
        let sub = if i % 8 % 3 == 0 { "/sub" } else { "" };
        let from = mnt.join(format!("{d}{sub}/f{i}"));
        if from.exists() {
            fs::rename(&from, mnt.join(format!("d{}/moved-{i}", (i + 3) % 8)))
                .expect("rename across directories");
        }
    }
    fs::rename(mnt.join("d5"), mnt.join("d2/d5-inside")).expect("rename a directory into another");
    fs::write(mnt.join("d3/sub/f3"), b"rewritten during the baseline").expect("rewrite");
    fs::rename(mnt.join("d7"), mnt.join("zz-moved")).expect("rename a directory");
    fs::rename(mnt.join("d6/sub/f6"), mnt.join("d0/f6-moved")).expect("rename a file");
    fs::write(mnt.join("d2/d5-inside/new"), b"created during the baseline").expect("create");
    fs::remove_file(mnt.join("d4/f4")).expect("unlink");
    fs::hard_link(mnt.join("d1/f1"), mnt.join("d0/f1-link")).expect("link");
    workload
        .join()
        .expect("the mixed workload during the baseline");
    wait_in_sync(&h);
    h.cp();
    assert_trees_equal(h.backing(), &h.image());
    assert_mtimes_equal(h.backing(), &h.image());
    let s = h.status();
    assert!(
        s.raw["baseline"]["files_done"].as_u64().unwrap_or(0) >= 400,
        "status counts the entries sent: {}",
        s.raw
    );
    let d = h.dest_source_status("alpha");
    assert_eq!(d["sync"], "in-sync", "fs-dest status: {d}");
}

#[test]
fn an_interrupted_baseline_resumes_where_it_stopped() {
    const TEST: &str = "baseline_resumes";
    require_mount!(TEST);
    let mut options = HarnessOptions::new(TEST).partition_size_bytes(1 << 20);
    // Slow enough to be caught in the middle.
    options.source.extra_args = vec!["--baseline-rate-mib".into(), "16".into()];
    let mut h = Harness::start_dest_only(&options);
    let mut rng = Rng::from_env(TEST);
    populate(&h.backing_of("alpha"), &mut rng, 160, 1 << 20);
    h.source = Some(
        h.mount_source(&options.source)
            .unwrap_or_else(|e| panic!("fs-source did not mount: {e}")),
    );
    wait_until("the baseline to be under way", BASELINE_TIMEOUT, || {
        let s = h.status();
        s.raw["baseline"]["state"] == "running"
            && s.raw["baseline"]["files_done"].as_u64().unwrap_or(0) >= 20
    });
    let before = h.status().raw["baseline"]["files_done"]
        .as_u64()
        .unwrap_or(0);
    h.kill_source();
    h.detach_source();
    h.restart_source(&options.source)
        .unwrap_or_else(|e| panic!("fs-source did not mount again: {e}"));
    // The destination restarts too, in the middle of the resumed baseline.
    h.kill_dest();
    h.restart_dest()
        .unwrap_or_else(|e| panic!("fs-dest did not restart: {e}"));
    wait_in_sync(&h);
    let log = fs::read_to_string(h.log_dir.join("fs-source-alpha.log")).expect("source log");
    assert!(
        log.contains("baseline: resuming after"),
        "the restarted source resumes (it had sent {before} entries):\n{log}"
    );
    h.cp();
    assert_trees_equal(h.backing(), &h.image());
    assert_mtimes_equal(h.backing(), &h.image());
}

#[test]
fn a_wrong_backing_directory_never_replaces_an_image() {
    const TEST: &str = "baseline_wrong_backing";
    require_mount!(TEST);
    let options = HarnessOptions::new(TEST);
    let mut h = Harness::start_dest_only(&options);
    let mut rng = Rng::from_env(TEST);
    populate(&h.backing_of("alpha"), &mut rng, 40, 8192);
    h.source = Some(
        h.mount_source(&options.source)
            .unwrap_or_else(|e| panic!("fs-source did not mount: {e}")),
    );
    wait_in_sync(&h);
    h.cp();
    assert_trees_equal(h.backing(), &h.image());
    let mut s = h.source.take().expect("source");
    assert!(s.stop().is_some_and(|st| st.success()), "clean stop");

    // A new, empty directory as --backing: refused, the image untouched.
    let empty = h.dir.join("empty-backing");
    fs::create_dir_all(&empty).expect("mkdir");
    let mut wrong = options.source.clone();
    wrong.backing = Some(empty.clone());
    match h.mount_source(&wrong) {
        Ok(_) => panic!("a mount over an empty backing dir against an image with data succeeded"),
        Err(e) => {
            let text = format!("{e}");
            assert!(
                text.contains("--force-baseline") && text.contains("refus"),
                "the refusal names the way out: {text}"
            );
        }
    }
    assert!(
        h.image_of("alpha").join("d2/f2").exists(),
        "the image is untouched"
    );
    // Asked for explicitly, the image is replaced by the (empty) backing directory.
    wrong.extra_args = vec!["--force-baseline".into()];
    h.source = Some(
        h.mount_source(&wrong)
            .unwrap_or_else(|e| panic!("--force-baseline did not mount: {e}")),
    );
    wait_in_sync(&h);
    h.cp();
    assert_trees_equal(&empty, &h.image());
}
