//! `fs-source mount --writeback-cache` (issue 9): the kernel caches writes and writes them back
//! later; partial writes into a file opened write-only work (the kernel reads the page to
//! merge them), appends land at the end, and a close returns only once every write before it
//! is mirrored, so the image equals the backing volume after a CP.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use nvmirror_e2e::{assert_trees_equal, require_mount, Harness, HarnessOptions, SourceOptions};

#[test]
fn writeback_cache_mirrors_by_close() {
    const TEST: &str = "writeback";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    h.detach_source();
    let mut opts = SourceOptions::new("alpha");
    opts.extra_args = vec!["--writeback-cache".into()];
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("mount with --writeback-cache: {e}"));

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
