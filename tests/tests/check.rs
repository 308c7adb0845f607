//! `fs-source check` and `fs-dest check`: offline verification of the daemons' files.
//!
//! Real daemons make real files (a source NVRAM with records, its backlog, the destination's
//! NVRAM and journals); once both are stopped, each check must exit 0 and report sequence
//! ranges that match what the source logged, never modify a file, and exit non-zero naming the
//! partition and offset when a byte inside a record of a copy is flipped, or a copy is
//! truncated or garbage. Record offsets come from `check --json --records` and are confirmed
//! independently with the frame layout of `proto/src/frame.rs` (magic `NVF1`, 32-byte header).

use nvmirror_e2e::{
    require_mount, run_with_timeout, wait_until, Harness, HarnessOptions, COMMAND_TIMEOUT,
    SHUTDOWN_TIMEOUT,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const PARTITION_BYTES: u64 = 65536;
const FRAME_HEADER_LEN: u64 = 32;
const FRAME_MAGIC: &[u8; 4] = b"NVF1";
const JOURNAL_HEADER_LEN: u64 = 64;

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[track_caller]
fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("check --json is not JSON ({e}): {text}"))
}

/// A file's bytes and modification time: what must not change when it is checked.
fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (bytes, mtime)
}

/// The journal files of `name` holding at least one record.
fn journals_with_records(root: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root.join(name).join("journal")) else {
        return vec![];
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > JOURNAL_HEADER_LEN))
        .collect();
    v.sort();
    v
}

/// Every record listed in a `--json --records` report: (file index, partition, offset, len, seq).
fn listed_records(report: &serde_json::Value) -> Vec<(usize, Option<u64>, u64, u64, u64)> {
    let mut out = Vec::new();
    for (i, f) in report["files"]
        .as_array()
        .expect("files")
        .iter()
        .enumerate()
    {
        for s in f["segments"].as_array().expect("segments") {
            for r in s["record_list"].as_array().into_iter().flatten() {
                out.push((
                    i,
                    s["partition"].as_u64(),
                    r["offset"].as_u64().expect("offset"),
                    r["len"].as_u64().expect("len"),
                    r["seq"].as_u64().expect("seq"),
                ));
            }
        }
    }
    out
}

/// Flip one bit of the payload of the record at `offset` (checking the frame is there).
fn flip_in_record(path: &Path, offset: u64, len: u64) -> u64 {
    let mut bytes = fs::read(path).expect("read copy");
    let o = offset as usize;
    assert_eq!(&bytes[o..o + 4], FRAME_MAGIC, "no frame at offset {offset}");
    assert!(len > FRAME_HEADER_LEN + 8, "record of {len} bytes");
    let at = offset + FRAME_HEADER_LEN + 5;
    bytes[at as usize] ^= 0x10;
    fs::write(path, &bytes).expect("write copy");
    at
}

#[test]
fn check_reports_the_records_written_and_names_damage() {
    const TEST: &str = "check_reports_the_records_written";
    require_mount!(TEST);
    let mut o = HarnessOptions::new(TEST).partition_size_bytes(PARTITION_BYTES);
    // No timed CP while the test writes: the records stay in NVRAM and the journals.
    o.source
        .extra_args
        .extend(["--cp-interval-ms".to_string(), "3600000".to_string()]);
    let mut h = Harness::start(o);
    for i in 0..6 {
        fs::write(h.mnt().join(format!("f{i}")), format!("file {i}\n")).expect("write");
    }
    fs::create_dir(h.mnt().join("dir")).expect("mkdir");
    let logged = h.status().last_logged_seq;
    assert!(logged > 6, "records logged: {logged}");
    let root = h.dest_root.clone();
    wait_until(
        "the destager to journal every record",
        Duration::from_secs(30),
        || {
            let out = run_with_timeout(
                h.fs_dest().args(["check", "--json", "--root"]).arg(&root),
                COMMAND_TIMEOUT,
            );
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            r["files"].as_array().into_iter().flatten().any(|f| {
                f["kind"] == "journal" && f["segments"][0]["last_seq"].as_u64() == Some(logged)
            })
        },
    );
    let nvram = h.source_nvram("alpha");
    let backlog = PathBuf::from(format!("{}.backlog", nvram.display()));
    h.source.take().expect("source").stop();
    h.dest.take().expect("dest").terminate(SHUTDOWN_TIMEOUT);

    // --- fs-source check on the real files: OK, the records the source logged.
    let files_before = [snapshot(&nvram), snapshot(&backlog)];
    let (out, text, err) = run(h.fs_source().args(["check", "--nvram"]).arg(&nvram));
    assert!(
        out.status.success(),
        "fs-source check failed:\n{text}\n{err}"
    );
    eprintln!("fs-source check:\n{text}");
    assert!(
        text.contains("source NVRAM") && text.contains("backlog") && text.contains("CRC ok"),
        "{text}"
    );
    assert!(text.contains(&format!("..{logged}, CRC ok")), "{text}");
    assert!(text.contains("cursors    source \"alpha\""), "{text}");
    assert!(text.trim_end().ends_with("OK"), "{text}");

    let (out, json, err) = run(h
        .fs_source()
        .args(["check", "--json", "--records", "--nvram"])
        .arg(&nvram));
    assert!(out.status.success(), "{json}\n{err}");
    let r = json_of(&json);
    assert_eq!(r["ok"], true);
    assert_eq!(r["errors"], 0);
    let nv = &r["files"][0];
    assert_eq!(nv["kind"], "source_nvram");
    assert_eq!(nv["header"]["partitions"], 2);
    assert_eq!(nv["header"]["partition_size"], PARTITION_BYTES);
    assert_eq!(nv["user_area"]["name"], "alpha");
    assert_eq!(r["files"][1]["kind"], "backlog");
    let records = listed_records(&r);
    let seqs: Vec<u64> = records.iter().map(|r| r.4).collect();
    assert!(!seqs.is_empty(), "{json}");
    assert_eq!(seqs.iter().max(), Some(&logged), "{json}");
    let first = *seqs.iter().min().expect("a record");
    assert_eq!(
        seqs.len() as u64,
        logged - first + 1,
        "NVRAM records {first}..{logged} are consecutive: {seqs:?}"
    );
    let ops: Vec<&str> = nv["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .flat_map(|s| s["record_list"].as_array().into_iter().flatten())
        .filter_map(|r| r["op"].as_str())
        .collect();
    assert!(ops.contains(&"create") && ops.contains(&"mkdir"), "{ops:?}");
    let (out, listing, _) = run(h
        .fs_source()
        .args(["check", "--records", "--nvram"])
        .arg(&nvram));
    assert!(out.status.success());
    assert!(
        listing.contains("create") && listing.contains("f5") && listing.contains("mkdir"),
        "{listing}"
    );

    // --- fs-dest check on the real files: OK, the source's records in its journals.
    let dest_nvram = h.dest_nvram();
    let journals = journals_with_records(&root, "alpha");
    assert!(!journals.is_empty(), "no journal holds records");
    let dest_before = snapshot(&journals[0]);
    let dest_nvram_before = snapshot(&dest_nvram);
    let (out, text, err) = run(h.fs_dest().args(["check", "--root"]).arg(&root));
    assert!(out.status.success(), "fs-dest check failed:\n{text}\n{err}");
    eprintln!("fs-dest check:\n{text}");
    assert!(
        text.contains("destination NVRAM")
            && text.contains("journal")
            && text.contains("\"alpha\""),
        "{text}"
    );
    assert!(text.contains(&dest_nvram.display().to_string()), "{text}");
    let (out, json, err) = run(h
        .fs_dest()
        .args(["check", "--json", "--source", "alpha", "--root"])
        .arg(&root));
    assert!(out.status.success(), "{json}\n{err}");
    let r = json_of(&json);
    assert_eq!(r["ok"], true);
    let files = r["files"].as_array().expect("files");
    assert_eq!(files[0]["kind"], "dest_nvram");
    assert!(
        files[0]["user_area"]["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .any(|s| s["name"] == "alpha"),
        "{json}"
    );
    let journal_last = files
        .iter()
        .filter(|f| f["kind"] == "journal")
        .filter_map(|f| f["segments"][0]["last_seq"].as_u64())
        .max();
    assert_eq!(journal_last, Some(logged), "{json}");
    let journal_records: u64 = files
        .iter()
        .filter(|f| f["kind"] == "journal")
        .filter_map(|f| f["segments"][0]["records"].as_u64())
        .sum();
    assert!(journal_records > 6, "{json}");

    // Checking changed nothing.
    assert!(
        [snapshot(&nvram), snapshot(&backlog)] == files_before,
        "fs-source check modified a file"
    );
    assert!(
        snapshot(&journals[0]) == dest_before,
        "fs-dest check modified a journal"
    );
    assert!(
        snapshot(&dest_nvram) == dest_nvram_before,
        "fs-dest check modified the NVRAM"
    );

    // --- A flipped byte inside a record of a copy of the source NVRAM.
    let copy = h.dir.join("copy.nvram");
    fs::copy(&nvram, &copy).expect("copy NVRAM");
    let nv_records: Vec<_> = records.iter().filter(|r| r.0 == 0).collect();
    let victim = nv_records[nv_records.len() / 2];
    let partition = victim.1.expect("partition");
    flip_in_record(&copy, victim.2, victim.3);
    let copy_before = snapshot(&copy);
    let (out, text, err) = run(h
        .fs_source()
        .args(["check", "--nvram"])
        .arg(&copy)
        .args(["--backlog"])
        .arg(&backlog));
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(
        text.contains(&format!(
            "partition {partition}: corrupt record at offset {}",
            victim.2
        )) && text.contains("CRC mismatch"),
        "the report must name the partition and offset of record {}:\n{text}",
        victim.4
    );
    assert!(
        text.contains("FAILED") && err.contains("check failed"),
        "{text}\n{err}"
    );
    assert!(
        snapshot(&copy) == copy_before,
        "check modified the damaged copy"
    );
    let (out, json, _) = run(h
        .fs_source()
        .args(["check", "--json", "--nvram"])
        .arg(&copy));
    assert_eq!(out.status.code(), Some(1));
    let r = json_of(&json);
    assert_eq!(r["ok"], false);
    let issue = &r["files"][0]["issues"][0];
    assert_eq!(issue["severity"], "error");
    assert_eq!(issue["offset"], victim.2);
    assert_eq!(issue["partition"], partition);

    // A truncated copy and a garbage file: errors, no panic.
    let short = h.dir.join("short.nvram");
    let full = fs::read(&nvram).expect("read NVRAM");
    fs::write(&short, &full[..full.len() / 2 + 100]).expect("write short copy");
    let (out, text, err) = run(h.fs_source().args(["check", "--nvram"]).arg(&short));
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(text.contains("truncated"), "{text}");
    let garbage = h.dir.join("garbage.nvram");
    fs::write(
        &garbage,
        b"this is not an NVRAM file at all, just some bytes",
    )
    .expect("write");
    let (out, text, err) = run(h.fs_source().args(["check", "--nvram"]).arg(&garbage));
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(text.contains("bad magic at offset 0"), "{text}");
    // The destination's NVRAM is not a source's.
    let (out, text, _) = run(h.fs_source().args(["check", "--nvram"]).arg(&dest_nvram));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("fs-dest check"), "{text}");

    // --- A flipped byte inside a record of a copy of a journal, in a copy of the root.
    let copy_root = h.dir.join("copy-root");
    let jdir = copy_root.join("alpha").join("journal");
    fs::create_dir_all(&jdir).expect("mkdir copy root");
    let jname = journals[0].file_name().expect("journal name");
    let jcopy = jdir.join(jname);
    fs::copy(&journals[0], &jcopy).expect("copy journal");
    let (out, json, err) = run(h
        .fs_dest()
        .args(["check", "--json", "--records", "--nvram"])
        .arg(&dest_nvram)
        .arg("--root")
        .arg(&copy_root));
    assert!(out.status.success(), "{json}\n{err}");
    let r = json_of(&json);
    let jrecords: Vec<_> = listed_records(&r)
        .into_iter()
        .filter(|rec| r["files"][rec.0]["kind"] == "journal")
        .collect();
    assert!(jrecords.len() >= 3, "{json}");
    let victim = jrecords[jrecords.len() / 2];
    let before_victim = jrecords[jrecords.len() / 2 - 1].4;
    flip_in_record(&jcopy, victim.2, victim.3);
    let (out, text, err) = run(h
        .fs_dest()
        .args(["check", "--nvram"])
        .arg(&dest_nvram)
        .arg("--root")
        .arg(&copy_root));
    assert_eq!(out.status.code(), Some(1), "{text}\n{err}");
    assert!(
        text.contains(&jcopy.display().to_string())
            && text.contains(&format!("corrupt record at offset {}", victim.2))
            && text.contains(&format!("after record {before_victim}")),
        "the report must name the journal and the offset of record {}:\n{text}",
        victim.4
    );
    assert!(
        text.contains("FAILED") && err.contains("check failed"),
        "{text}\n{err}"
    );
    // A truncated journal: a torn tail.
    let jbytes = fs::read(&journals[0]).expect("read journal");
    fs::write(&jcopy, &jbytes[..jbytes.len() - 5]).expect("truncate copy");
    let (out, text, _) = run(h
        .fs_dest()
        .args(["check", "--source", "alpha", "--root"])
        .arg(&copy_root));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("torn record at offset"), "{text}");
}
