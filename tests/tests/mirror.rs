//! The mirror's core promises: every change made through the mount reaches the image exactly,
//! and a change is not acknowledged to the client before the destination has it.

use nvmirror_e2e::{
    assert_trees_equal_named, require_mount, wait_until, workload, Harness, HarnessOptions, Rng,
};
use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The smallest partition the source accepts: a few records fill it, so the workload forces
/// many consistency points.
const SMALL_PARTITION_BYTES: u64 = 65536;

#[test]
fn mixed_workload_mirrors_exactly() {
    const TEST: &str = "mixed_workload_mirrors_exactly";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(SMALL_PARTITION_BYTES));

    let seed = Rng::from_env(TEST).next_u64();
    // The same workload, with the same random choices, on a plain local directory...
    let reference = h.dir.join("reference");
    fs::create_dir(&reference).expect("create reference dir");
    workload::mixed(&reference, &mut Rng::new(seed));
    // ...and through the mount.
    let started = Instant::now();
    workload::mixed(h.mnt(), &mut Rng::new(seed));
    eprintln!(
        "{TEST}: workload through the mount took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    h.cp();
    eprintln!("{TEST}: cp took {:?}", started.elapsed());

    // The mirror: the image equals the backing volume.
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    // The mount shows the backing volume as it is...
    assert_trees_equal_named(h.backing(), h.mnt(), "backing", "mount");
    // ...and behaves like a local filesystem.
    assert_trees_equal_named(&reference, h.mnt(), "reference", "mount");

    let status = h.status();
    assert!(
        status.cp_count > 1,
        "64 KiB partitions and a multi-MiB workload must have forced many CPs: {}",
        status.raw
    );
    assert!(
        status.last_logged_seq > 0,
        "nothing logged?: {}",
        status.raw
    );
    assert_eq!(
        status.last_acked_seq, status.last_logged_seq,
        "after cp every logged record is acknowledged: {}",
        status.raw
    );
    assert_eq!(
        status.last_applied_seq, status.last_logged_seq,
        "after cp every logged record is applied to the image: {}",
        status.raw
    );
    assert_eq!(status.link, "up", "link state: {}", status.raw);
    assert!(
        status.bytes_mirrored > 3 << 20,
        "a workload writing several MiB mirrored only {} bytes: {}",
        status.bytes_mirrored,
        status.raw
    );
    let dest = h.dest_source_status("alpha");
    assert_eq!(dest["connected"], true, "fs-dest status: {dest}");
    assert_eq!(
        dest["applied_seq"].as_u64(),
        Some(status.last_logged_seq),
        "destination's applied sequence number after cp: {dest}"
    );
}

#[test]
fn write_waits_for_destination() {
    const TEST: &str = "write_waits_for_destination";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));

    // Something mirrored already, so the link is known to work before the stop. The stalled
    // write goes to another directory: the kernel itself holds a directory's lock during a
    // create in it, so only reads elsewhere can be expected to go on.
    fs::create_dir(h.mnt().join("quiet")).expect("mkdir quiet");
    fs::create_dir(h.mnt().join("busy")).expect("mkdir busy");
    fs::write(
        h.mnt().join("quiet/before.txt"),
        b"written before the stop\n",
    )
    .expect("write before");
    let before = h.stop_dest_when_mirrored();

    let done = Arc::new(AtomicBool::new(false));
    let path = h.mnt().join("busy/during.txt");
    let payload = b"written while the destination was stopped\n".repeat(100);
    let writer = {
        let done = done.clone();
        let payload = payload.clone();
        thread::spawn(move || {
            let result = fs::File::create(&path)
                .and_then(|mut f| f.write_all(&payload).and_then(|()| f.sync_all()));
            done.store(true, Ordering::SeqCst);
            result
        })
    };

    // The writer's first operation is logged but cannot be acknowledged...
    wait_until(
        "the source to log a record the stopped destination has not acknowledged",
        Duration::from_secs(30),
        || {
            let s = h.status();
            s.last_logged_seq > s.last_acked_seq
        },
    );
    // ...so the client has not had its reply.
    assert!(
        !done.load(Ordering::SeqCst),
        "the write completed while the destination was stopped: the reply did not wait for the mirror"
    );
    let stalled = h.status();
    assert_eq!(
        stalled.last_acked_seq, before.last_acked_seq,
        "nothing can be acknowledged by a stopped destination: {}",
        stalled.raw
    );

    // Reads do not wait for the mirror: they work while a write is stalled.
    let read_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let read_done = read_done.clone();
        let mnt = h.mnt().to_path_buf();
        thread::spawn(move || {
            let content = fs::read(mnt.join("quiet/before.txt"));
            let listing = fs::read_dir(mnt.join("quiet")).map(|d| d.count());
            read_done.store(true, Ordering::SeqCst);
            (content, listing)
        })
    };
    wait_until(
        "a read and a readdir through the mount while a write waits for the stopped destination",
        Duration::from_secs(20),
        || read_done.load(Ordering::SeqCst),
    );
    let (content, listing) = reader.join().expect("reader thread");
    assert_eq!(
        content.expect("read during the stall"),
        b"written before the stop\n"
    );
    listing.expect("readdir during the stall");
    h.held_until_dest_resumes("the write", &done);
    writer
        .join()
        .expect("writer thread")
        .expect("the write must succeed once the destination is back");

    h.cp();
    assert_eq!(
        fs::read(h.image().join("busy/during.txt")).expect("during.txt in the image"),
        payload
    );
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
}

/// An operation waiting for its acknowledgement does not hold a FUSE thread: its reply leaves
/// from the thread that receives the acknowledgement. With one FUSE thread and three writes
/// stalled by a stopped destination, a read is still answered; the writes complete once the
/// destination resumes. (With the reply sent by the waiting FUSE thread, the first stalled
/// write would hold the only thread and the read would wait for the whole policy timeout.)
#[test]
fn stalled_writes_do_not_hold_fuse_threads() {
    const TEST: &str = "stalled_writes_do_not_hold_fuse_threads";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST).source_args([
        "--threads",
        "1",
        "--timeout-ms",
        "60000",
    ]));
    fs::create_dir(h.mnt().join("quiet")).expect("mkdir quiet");
    fs::write(h.mnt().join("quiet/before.txt"), b"before the stop\n").expect("write before");
    let files: Vec<_> = (0..3)
        .map(|i| {
            let dir = h.mnt().join(format!("busy{i}"));
            fs::create_dir(&dir).expect("mkdir busy");
            let f = dir.join("f");
            fs::write(&f, b"").expect("create f");
            f
        })
        .collect();
    let before = h.stop_dest_when_mirrored();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (f, done) = (f.clone(), done.clone());
            thread::spawn(move || {
                let r = fs::OpenOptions::new()
                    .write(true)
                    .open(&f)
                    .and_then(|mut file| file.write_all(format!("stalled {i}\n").as_bytes()));
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    // All three writes logged (a write and a times record each), none acknowledged: each is
    // waiting for its reply, and the one FUSE thread took every one of them.
    wait_until(
        "three writes logged and waiting for the stopped destination",
        Duration::from_secs(20),
        || h.status().last_logged_seq >= before.last_logged_seq + 6,
    );
    let read_done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (read_done, mnt) = (read_done.clone(), h.mnt().to_path_buf());
        thread::spawn(move || {
            // Names never looked up before: the kernel must ask the daemon.
            let missing = fs::metadata(mnt.join("quiet/never-there"));
            let content = fs::read(mnt.join("quiet/before.txt"));
            read_done.store(true, Ordering::SeqCst);
            (missing, content)
        })
    };
    let answered =
        nvmirror_e2e::poll_until(Duration::from_secs(10), || read_done.load(Ordering::SeqCst));
    h.dest().signal(libc::SIGCONT);
    assert!(
        answered,
        "a lookup and a read through the mount were not answered while three writes waited for \
         the stopped destination (one FUSE thread): a waiting operation holds the thread"
    );
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "a write completed while the destination was stopped"
    );
    let (missing, content) = reader.join().expect("reader thread");
    assert_eq!(
        missing
            .expect_err("quiet/never-there must not exist")
            .kind(),
        std::io::ErrorKind::NotFound
    );
    assert_eq!(
        content.expect("read during the stall"),
        b"before the stop\n"
    );
    wait_until(
        "the three writes to complete after the destination resumed",
        Duration::from_secs(60),
        || done.load(Ordering::SeqCst) == 3,
    );
    for (i, w) in writers.into_iter().enumerate() {
        w.join()
            .expect("writer thread")
            .unwrap_or_else(|e| panic!("write {i} must succeed once the destination is back: {e}"));
    }
    h.cp();
    for (i, f) in files.iter().enumerate() {
        let rel = f.strip_prefix(h.mnt()).expect("under the mount");
        assert_eq!(
            fs::read(h.image().join(rel)).expect("file in the image"),
            format!("stalled {i}\n").as_bytes()
        );
    }
}

#[test]
fn clean_unmount_on_sigterm() {
    const TEST: &str = "clean_unmount_on_sigterm";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    fs::write(h.mnt().join("f"), b"x").expect("write");
    let mut source = h.source.take().expect("source");
    let status = source.daemon.terminate(nvmirror_e2e::SHUTDOWN_TIMEOUT);
    let still_mounted = nvmirror_e2e::is_mounted(&source.mountpoint);
    drop(source);
    assert!(
        matches!(status, Some(s) if s.success()),
        "fs-source must exit 0 on SIGTERM, got {status:?}"
    );
    assert!(!still_mounted, "fs-source exited but left its mount behind");
}
