//! `fs-source mount --writeback-cache` (issue 9): the kernel caches writes and writes them back
//! later; partial writes into a file opened write-only work (the kernel reads the page to
//! merge them), appends land at the end, a write-back is answered once logged on the source,
//! and a close or fsync returns only once every write before it is mirrored, so the image
//! equals the backing volume after a CP.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nvmirror_e2e::{
    assert_trees_equal, require_mount, wait_until, Harness, HarnessOptions, SourceOptions,
};

fn writeback_harness(test: &str) -> Harness {
    let mut h = Harness::start(HarnessOptions::new(test));
    h.detach_source();
    let mut opts = SourceOptions::new("alpha");
    opts.extra_args = vec!["--writeback-cache".into()];
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("mount with --writeback-cache: {e}"));
    h
}

#[test]
fn writeback_cache_mirrors_by_close() {
    const TEST: &str = "writeback";
    require_mount!(TEST);
    let h = writeback_harness(TEST);

    // A file with content, then small unaligned writes through a write-only descriptor.
    let path = h.mnt().join("patched");
    let mut expected: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    fs::write(&path, &expected).expect("write the file");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open write-only");
    for i in 0..200u64 {
        let off = (i * 977) % (expected.len() as u64 - 16);
        let piece = [i as u8; 13];
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&piece).expect("small write");
        expected[off as usize..off as usize + 13].copy_from_slice(&piece);
    }
    drop(f);
    // Appends.
    let log = h.mnt().join("appended");
    for i in 0..50u32 {
        let mut a = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&log)
            .expect("open for append");
        a.write_all(format!("line {i}\n").as_bytes())
            .expect("append");
    }
    let s = h.status().raw;
    assert_eq!(
        s["last_acked_seq"], s["last_logged_seq"],
        "after the closes, every write is mirrored: {s}"
    );
    assert_eq!(fs::read(&path).expect("read back"), expected);
    let lines: String = (0..50).map(|i| format!("line {i}\n")).collect();
    assert_eq!(fs::read_to_string(&log).expect("read log"), lines);
    h.cp();
    assert_eq!(
        fs::read(h.image().join("patched")).expect("in the image"),
        expected
    );
    assert_trees_equal(h.backing(), &h.image());
}

#[test]
fn a_write_back_waits_for_the_local_log_only_and_the_close_for_the_mirror() {
    const TEST: &str = "writeback-wait";
    require_mount!(TEST);
    let mut h = writeback_harness(TEST);
    let path = h.mnt().join("f");
    fs::write(&path, vec![1u8; 16 * 1024]).expect("first version");
    h.stop_dest_when_mirrored();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all(&[2u8; 4096])
        .expect("write into the page cache");
    // Make the kernel write the page back now (no fsync): one FUSE write, answered once logged
    // on the source, well within the 15 s the policy would wait for the stopped destination.
    let fd = f.as_raw_fd();
    let written_back = Arc::new(AtomicBool::new(false));
    let flusher = {
        let written_back = written_back.clone();
        thread::spawn(move || {
            // SAFETY: `fd` stays open (the file is dropped only after this thread is joined).
            let r = unsafe {
                libc::sync_file_range(
                    fd,
                    0,
                    4096,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                )
            };
            written_back.store(true, Ordering::SeqCst);
            r
        })
    };
    wait_until(
        "the write-back to complete while the destination is stopped",
        Duration::from_secs(10),
        || written_back.load(Ordering::SeqCst),
    );
    assert_eq!(flusher.join().expect("flusher"), 0, "sync_file_range");
    // (No `fs-source status` process while `f` is open: its exec would close a copy of it.)
    let stalled = h.status_in_process();
    assert!(
        stalled.last_logged_seq > stalled.last_acked_seq,
        "the write-back is logged and not mirrored yet: {}",
        stalled.raw
    );
    assert_eq!(
        stalled.raw["degraded"], false,
        "it returned without giving up on the mirror: {}",
        stalled.raw
    );

    // The close must not return before the destination has it all.
    let closed = Arc::new(AtomicBool::new(false));
    let closer = {
        let closed = closed.clone();
        thread::spawn(move || {
            drop(f);
            closed.store(true, Ordering::SeqCst);
        })
    };
    wait_until(
        "the close to log the file's times",
        Duration::from_secs(10),
        || h.status_in_process().last_logged_seq > stalled.last_logged_seq,
    );
    h.held_until_dest_resumes("the close", &closed);
    closer.join().expect("closer");
    let s = h.status();
    assert_eq!(
        s.last_acked_seq, s.last_logged_seq,
        "after the close: {}",
        s.raw
    );
    let mut expected = vec![1u8; 16 * 1024];
    expected[..4096].fill(2);
    assert_eq!(fs::read(&path).expect("read back"), expected);
    h.cp();
    assert_eq!(fs::read(h.image().join("f")).expect("image"), expected);
}
