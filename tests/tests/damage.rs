//! Damaged state on disk is detected, reported with the file and offset, and never applied:
//! a torn last record and a flipped bit in NVRAM (source), a truncated and a corrupt journal
//! (destination), NVRAM files of the wrong size or format (both daemons).
//!
//! Each test makes real state with real daemons, kills the daemon with SIGKILL, damages a file
//! the way a crash, a power cut or a bad disk would, starts the daemon on it and checks its exit
//! status, its words, and that nothing was applied. The byte layouts used here are the ones
//! drawn in `proto/src/frame.rs`, `proto/src/nvlog.rs` and `fs-dest/src/journal.rs`.

use nvmirror_e2e::{
    assert_trees_equal_named, daemon_output, require_mount, wait_until, Harness, HarnessOptions,
    SourceOptions,
};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

const PARTITION_BYTES: u64 = 65536;
const PARTITIONS: u64 = 2;
/// `proto::nvlog`: superblock size, partition header size, user area offset.
const SUPERBLOCK_LEN: u64 = 64 << 10;
const PARTITION_HEADER_LEN: u64 = 4096;
const USER_AREA_OFFSET: u64 = 4096;
/// `proto::frame`: header length and magic.
const FRAME_HEADER_LEN: u64 = 32;
const FRAME_MAGIC: &[u8; 4] = b"NVF1";
/// `fs-dest` journal header length.
const JOURNAL_HEADER_LEN: u64 = 64;

/// A daemon's log without terminal colour codes (tracing colours field names).
fn log_text(path: &Path) -> String {
    let raw = daemon_output(path);
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn small_source(name: &str) -> SourceOptions {
    let mut o = SourceOptions::new(name);
    o.partition_size_bytes = Some(PARTITION_BYTES);
    o
}

fn start(test: &str) -> Harness {
    Harness::start(HarnessOptions::new(test).partition_size_bytes(PARTITION_BYTES))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A record found in a file: absolute offset, frame length (unpadded), sequence number.
#[derive(Clone, Copy, Debug)]
struct Found {
    offset: u64,
    len: u64,
    seq: u64,
}

/// The live records of a source NVRAM file (every partition, frames of the partition's current
/// epoch), in sequence order.
fn nvram_records(nvram: &Path) -> Vec<Found> {
    let bytes = fs::read(nvram).expect("read NVRAM");
    assert_eq!(
        bytes.len() as u64,
        SUPERBLOCK_LEN + PARTITIONS * PARTITION_BYTES,
        "NVRAM size"
    );
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let base = (SUPERBLOCK_LEN + p * PARTITION_BYTES) as usize;
        let epoch = u32_at(&bytes, base + 8);
        let mut off = base + PARTITION_HEADER_LEN as usize;
        let end = base + PARTITION_BYTES as usize;
        while off + FRAME_HEADER_LEN as usize <= end
            && &bytes[off..off + 4] == FRAME_MAGIC
            && u32_at(&bytes, off + 16) == epoch
        {
            let len = FRAME_HEADER_LEN + u32_at(&bytes, off + 4) as u64;
            out.push(Found {
                offset: off as u64,
                len,
                seq: u64_at(&bytes, off + 8),
            });
            off += ((len + 7) & !7) as usize;
        }
    }
    out.sort_by_key(|f| f.seq);
    out
}

/// The records of a journal file, in file order.
fn journal_records(path: &Path) -> Vec<Found> {
    let bytes = fs::read(path).expect("read journal");
    let mut out = Vec::new();
    let mut off = JOURNAL_HEADER_LEN as usize;
    while off + FRAME_HEADER_LEN as usize <= bytes.len() && &bytes[off..off + 4] == FRAME_MAGIC {
        let len = FRAME_HEADER_LEN + u32_at(&bytes, off + 4) as u64;
        out.push(Found {
            offset: off as u64,
            len,
            seq: u64_at(&bytes, off + 8),
        });
        off += len as usize;
    }
    out
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn flip_bit(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for a bit flip");
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).expect("write byte");
}

/// Set the source's applied-record cursor (NVRAM user area, offset 0).
fn set_applied_cursor(nvram: &Path, seq: u64) {
    write_at(nvram, USER_AREA_OFFSET, &seq.to_le_bytes());
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn empty_dir(dir: &Path) {
    for name in names_in(dir) {
        let p = dir.join(name);
        if p.is_dir() {
            fs::remove_dir_all(&p).expect("remove dir");
        } else {
            fs::remove_file(&p).expect("remove file");
        }
    }
}

/// The journal files of source `name` that hold records.
fn journals_with_records(h: &Harness, name: &str) -> Vec<PathBuf> {
    let dir = h.dest_root.join(name).join("journal");
    let Ok(entries) = fs::read_dir(&dir) else {
        return vec![];
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > JOURNAL_HEADER_LEN))
        .collect()
}

/// Writes files through the mount and waits until a journal holds at least `records` records
/// (the destager moves them out of NVRAM within milliseconds; no CP runs meanwhile: the timer
/// is 10 s and the partition is far from full). Returns that journal.
fn journal_with_records(h: &Harness, records: usize) -> PathBuf {
    for i in 0..records {
        fs::write(
            h.mnt().join(format!("j{i}")),
            format!("journal record {i}\n"),
        )
        .expect("write through the mount");
    }
    let mut found = None;
    wait_until(
        "the destager to journal the records",
        Duration::from_secs(30),
        || {
            found = journals_with_records(h, "alpha")
                .into_iter()
                .find(|j| journal_records(j).len() >= records);
            found.is_some()
        },
    );
    found.expect("journal")
}

#[test]
fn torn_last_record_in_source_nvram_is_dropped_and_never_applied() {
    const TEST: &str = "damage_torn_source_record";
    require_mount!(TEST);
    let mut h = start(TEST);
    fs::write(h.mnt().join("a"), "alpha\n").expect("write a");
    let backing = h.backing().to_path_buf();
    let mnt = h.mnt().to_path_buf();
    let nvram = h.source_nvram("alpha");

    // The last record is logged but never acknowledged: the destination is stopped.
    h.dest().signal(libc::SIGSTOP);
    let before = h.status().last_logged_seq;
    let z = mnt.join("z");
    let writer = thread::spawn(move || fs::write(z, "zulu\n"));
    wait_until(
        "the create of z to be logged",
        Duration::from_secs(30),
        || h.status().last_logged_seq > before,
    );
    h.kill_source();
    h.detach_source();
    assert!(
        writer.join().expect("writer thread").is_err(),
        "the create of z cannot have been acknowledged"
    );
    // Frames the stopped destination may still have queued die with it: it never had z.
    h.kill_dest();

    let records = nvram_records(&nvram);
    // The create of z, then the times records of its transaction.
    let last = *records
        .iter()
        .find(|r| r.seq == before + 1)
        .unwrap_or_else(|| panic!("the create of z is record {}: {records:?}", before + 1));
    // A torn write: the second half of the create never reached NVRAM (nor anything after it),
    // and it was never applied (the cursor says so, and the backing volume does not have it).
    let keep = last.len / 2;
    for r in records.iter().filter(|r| r.seq > last.seq) {
        write_at(&nvram, r.offset, &vec![0u8; r.len as usize]);
    }
    write_at(
        &nvram,
        last.offset + keep,
        &vec![0u8; (last.len - keep) as usize],
    );
    set_applied_cursor(&nvram, last.seq - 1);
    fs::remove_file(backing.join("z")).expect("z was applied before the kill");

    h.restart_dest().expect("fs-dest restarts");
    h.restart_source(&small_source("alpha"))
        .unwrap_or_else(|e| panic!("the source must start despite a torn tail: {e}"));
    let log = log_text(&h.log_dir.join("fs-source-alpha.log"));
    assert!(
        log.contains("torn tail")
            && log.contains(&nvram.display().to_string())
            && log.contains(&format!("offset={}", last.offset)),
        "the source must report the torn record with file and offset {}:\n{log}",
        last.offset
    );
    assert!(!backing.join("z").exists(), "the torn record was applied");
    assert!(!mnt.join("z").exists(), "the torn record is visible");
    assert_eq!(fs::read_to_string(mnt.join("a")).expect("a"), "alpha\n");
    let status = h.status();
    assert_eq!(status.last_logged_seq, last.seq - 1, "{}", status.raw);
    // The mirror goes on from there.
    fs::write(mnt.join("b"), "bravo\n").expect("write b after recovery");
    h.cp();
    assert_trees_equal_named(&backing, &h.image(), "backing", "image");
    assert!(!h.image().join("z").exists());
}

#[test]
fn flipped_bit_in_source_nvram_is_refused_naming_file_and_offset() {
    const TEST: &str = "damage_flipped_source_bit";
    require_mount!(TEST);
    let mut h = start(TEST);
    for i in 0..6 {
        fs::write(h.mnt().join(format!("f{i}")), format!("file {i}\n")).expect("write");
    }
    let backing = h.backing().to_path_buf();
    let nvram = h.source_nvram("alpha");
    h.kill_source();
    h.detach_source();

    let records = nvram_records(&nvram);
    assert!(records.len() >= 6, "records in NVRAM: {records:?}");
    let victim = records[records.len() / 2];
    flip_bit(&nvram, victim.offset + FRAME_HEADER_LEN + 1);
    // If the source trusted the log it would replay everything onto the (now empty) backing.
    set_applied_cursor(&nvram, 0);
    empty_dir(&backing);

    let err = match h.restart_source(&small_source("alpha")) {
        Ok(()) => panic!("the source mounted on an NVRAM file with a flipped bit"),
        Err(e) => e,
    };
    assert!(
        err.spawn.exit.is_some_and(|s| !s.success()),
        "the source must exit with a failure status: {err}"
    );
    assert!(!err.left_mounted, "it must not mount");
    let out = err.daemon_output;
    assert!(
        out.contains(&nvram.display().to_string())
            && out.contains(&format!("corrupt record at offset {}", victim.offset)),
        "the message must name the file and the offset {}:\n{out}",
        victim.offset
    );
    assert!(
        names_in(&backing).is_empty(),
        "nothing may be applied from a corrupt NVRAM file: {:?}",
        names_in(&backing)
    );
}

#[test]
fn truncated_journal_is_reported_and_the_source_resends_what_it_lost() {
    const TEST: &str = "damage_truncated_journal";
    require_mount!(TEST);
    let mut h = start(TEST);
    let journal = journal_with_records(&h, 4);
    h.kill_dest();

    let records = journal_records(&journal);
    let last = *records.last().expect("journal records");
    // Cut the last record in the middle (a torn append).
    let f = OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("open journal");
    f.set_len(last.offset + last.len / 2)
        .expect("truncate journal");
    drop(f);

    h.restart_dest()
        .unwrap_or_else(|e| panic!("fs-dest must start despite a torn journal tail: {e}"));
    let log = log_text(&h.log_dir.join("fs-dest.log"));
    assert!(
        log.contains("torn tail")
            && log.contains(&journal.display().to_string())
            && log.contains(&format!("offset={}", last.offset)),
        "fs-dest must report the torn journal record with file and offset {}:\n{log}",
        last.offset
    );
    // The destination now holds less than it acknowledged; the source still has the record in
    // its NVLOG (no CP yet) and resends it on reconnect. After a CP the image is whole.
    h.cp();
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    let dest = h.dest_source_status("alpha");
    assert_eq!(
        dest["applied_seq"].as_u64(),
        Some(h.status().last_logged_seq),
        "{dest}"
    );
}

#[test]
fn corrupt_journal_record_is_refused_naming_file_and_offset() {
    const TEST: &str = "damage_corrupt_journal";
    require_mount!(TEST);
    let mut h = start(TEST);
    let journal = journal_with_records(&h, 4);
    h.kill_dest();
    let image = h.image();
    let image_before = names_in(&image);

    let records = journal_records(&journal);
    let victim = records[1];
    flip_bit(&journal, victim.offset + FRAME_HEADER_LEN + 2);
    let err = match h.restart_dest() {
        Ok(()) => panic!("fs-dest started on a journal with a corrupt record"),
        Err(e) => e,
    };
    assert!(
        err.exit.is_some_and(|s| !s.success()),
        "fs-dest must exit with a failure status: {err}"
    );
    let msg = err.message;
    assert!(
        msg.contains(&journal.display().to_string())
            && msg.contains(&format!("corrupt record at offset {}", victim.offset)),
        "the message must name the journal and the offset {}:\n{msg}",
        victim.offset
    );
    assert_eq!(names_in(&image), image_before, "nothing may be applied");
}

/// One way to damage an NVRAM file: (what, the damage, words the refusal must contain).
type Damage = (&'static str, Box<dyn Fn()>, String);

/// The damaged NVRAM files both daemons must refuse.
fn bad_nvram_cases(nvram: &Path) -> Vec<Damage> {
    let len = fs::metadata(nvram).expect("NVRAM file").len();
    let short = len - 4096;
    let p1 = nvram.to_path_buf();
    let p2 = nvram.to_path_buf();
    let p3 = nvram.to_path_buf();
    vec![
        (
            "wrong size",
            Box::new(move || {
                OpenOptions::new()
                    .write(true)
                    .open(&p1)
                    .expect("open")
                    .set_len(short)
                    .expect("truncate NVRAM");
            }),
            format!("is {short} bytes"),
        ),
        (
            "not an NVRAM file",
            Box::new(move || {
                OpenOptions::new()
                    .write(true)
                    .open(&p2)
                    .expect("open")
                    .set_len(len)
                    .expect("resize NVRAM");
                write_at(&p2, 0, b"#!/bin/sh\necho this is not NVRAM\n");
            }),
            "bad magic at offset 0".to_string(),
        ),
        (
            "damaged superblock",
            Box::new(move || {
                write_at(&p3, 0, b"NVMLOG\0\x01");
                write_at(&p3, 16, &[0x55]);
            }),
            "superblock CRC mismatch at offset 28".to_string(),
        ),
    ]
}

#[test]
fn source_nvram_of_wrong_size_or_format_is_refused() {
    const TEST: &str = "damage_source_nvram_format";
    require_mount!(TEST);
    let mut h = start(TEST);
    fs::write(h.mnt().join("a"), "alpha\n").expect("write");
    h.cp();
    let nvram = h.source_nvram("alpha");
    let backing = h.backing().to_path_buf();
    h.kill_source();
    h.detach_source();
    let backing_before = names_in(&backing);
    for (what, damage, words) in bad_nvram_cases(&nvram) {
        damage();
        let err = match h.restart_source(&small_source("alpha")) {
            Ok(()) => panic!("{what}: the source mounted"),
            Err(e) => e,
        };
        assert!(
            err.spawn.exit.is_some_and(|s| !s.success()) && !err.left_mounted,
            "{what}: must exit with a failure status, unmounted: {err}"
        );
        assert!(
            err.daemon_output.contains(&nvram.display().to_string())
                && err.daemon_output.contains(&words),
            "{what}: the message must name {} and say {words:?}:\n{}",
            nvram.display(),
            err.daemon_output
        );
        assert_eq!(
            names_in(&backing),
            backing_before,
            "{what}: backing changed"
        );
    }
}

#[test]
fn dest_nvram_of_wrong_size_or_format_is_refused() {
    const TEST: &str = "damage_dest_nvram_format";
    require_mount!(TEST);
    let mut h = start(TEST);
    fs::write(h.mnt().join("a"), "alpha\n").expect("write");
    h.cp();
    h.source.take();
    let nvram = h.dest_nvram();
    h.kill_dest();
    let image = h.image_of("alpha");
    let image_before = names_in(&image);
    for (what, damage, words) in bad_nvram_cases(&nvram) {
        damage();
        let err = match h.restart_dest() {
            Ok(()) => panic!("{what}: fs-dest started"),
            Err(e) => e,
        };
        assert!(
            err.exit.is_some_and(|s| !s.success()),
            "{what}: must exit with a failure status: {err}"
        );
        assert!(
            err.message.contains(&nvram.display().to_string()) && err.message.contains(&words),
            "{what}: the message must name {} and say {words:?}:\n{}",
            nvram.display(),
            err.message
        );
        assert_eq!(names_in(&image), image_before, "{what}: image changed");
    }
}

/// A power cut of the source can take records from its NVRAM that the destination already
/// holds (it acknowledged them before the source's own flush completed, so no client got a
/// reply). The restarted source fetches them back from the destination and goes on instead of
/// being refused.
#[test]
fn records_lost_from_source_nvram_are_fetched_back_from_the_destination() {
    const TEST: &str = "damage_source_behind";
    require_mount!(TEST);
    let mut h = start(TEST);
    fs::write(h.mnt().join("a"), "alpha\n").expect("write a");
    let before = h.status().last_logged_seq;
    fs::write(h.mnt().join("z"), "zulu\n").expect("write z");
    let status = h.status();
    assert_eq!(
        status.last_acked_seq, status.last_logged_seq,
        "z is mirrored"
    );
    let (backing, mnt, nvram) = (
        h.backing().to_path_buf(),
        h.mnt().to_path_buf(),
        h.source_nvram("alpha"),
    );
    h.kill_source();
    h.detach_source();
    // The records of z never reached the source's NVRAM, nor its backing volume.
    let lost: Vec<Found> = nvram_records(&nvram)
        .into_iter()
        .filter(|r| r.seq > before)
        .collect();
    assert!(!lost.is_empty(), "z was logged after record {before}");
    for r in &lost {
        write_at(&nvram, r.offset, &vec![0u8; r.len as usize]);
    }
    set_applied_cursor(&nvram, before);
    fs::remove_file(backing.join("z")).expect("z was in the backing volume");

    h.restart_source(&small_source("alpha"))
        .unwrap_or_else(|e| panic!("the source must start and recover from the destination: {e}"));
    let log = log_text(&h.log_dir.join("fs-source-alpha.log"));
    assert!(
        log.contains("recovered") && log.contains("from the destination"),
        "the source says it recovered records:\n{log}"
    );
    assert_eq!(
        fs::read_to_string(mnt.join("z")).expect("z is back"),
        "zulu\n"
    );
    let status = h.status();
    assert!(
        status.last_logged_seq >= before + lost.len() as u64,
        "the recovered records are logged again: {:?}",
        status.raw
    );
    fs::write(mnt.join("after"), "mirrored after the recovery\n").expect("write after");
    h.cp();
    nvmirror_e2e::assert_trees_equal(h.backing(), &h.image());
}

#[test]
fn a_backing_directory_older_than_its_nvram_is_refused() {
    const TEST: &str = "damage_old_backing";
    require_mount!(TEST);
    let mut h = start(TEST);
    fs::write(h.mnt().join("a"), "alpha\n").expect("write a");
    h.cp();
    let backing = h.backing().to_path_buf();
    let old = h.dir.join("old-backing");
    nvmirror_e2e::run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&backing)
            .arg(&old),
    );
    // Changes a CP makes durable after the copy was taken.
    fs::create_dir(h.mnt().join("d")).expect("mkdir d");
    fs::write(h.mnt().join("d/b"), "bravo\n").expect("write d/b");
    h.cp();
    h.kill_source();
    h.detach_source();
    // The backing directory is replaced by the older copy (a restore): replaying this NVRAM's
    // records onto it would build a tree that is neither.
    fs::remove_dir_all(&backing).expect("remove backing");
    fs::rename(&old, &backing).expect("restore the old copy");
    let Err(err) = h.restart_source(&small_source("alpha")) else {
        panic!("a backing directory older than the NVRAM must be refused");
    };
    let text = format!("{err}");
    assert!(
        text.contains("older than the NVRAM") && text.contains("fresh NVRAM"),
        "the refusal says what is wrong and what to do: {text}"
    );
    assert!(
        !backing.join("d").exists(),
        "nothing was replayed onto the refused directory"
    );
}
