//! The asynchronous second leg (issue 11, point 3): a source mirrors synchronously to one
//! destination and asynchronously to a second one (`--async-dest`), which keeps its own
//! journals, CPs and image and may lag; losing it does not stop or fail the first; it catches
//! up from NVRAM and its spill file when it returns; either destination can be promoted.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::{
    assert_trees_equal, require_mount, run_ok, wait_until, Daemon, Harness, HarnessOptions,
    SourceOptions,
};

const NAME: &str = "alpha";

/// `fs-dest serve` for the second destination (same CA and certificate as the first).
fn start_second(h: &Harness, root: &Path, listen: &str) -> (Daemon, String) {
    let mut cmd = h.fs_dest();
    cmd.args(["serve", "--listen", listen, "--root"])
        .arg(root)
        .arg("--nvram")
        .arg(h.dir.join("dest2.nvram"))
        .arg("--tls")
        .arg(&h.tls_dir);
    Daemon::spawn(
        "fs-dest (second)",
        &mut cmd,
        &h.log_dir.join("fs-dest-2.log"),
        "fs-dest: listening on ",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("the second fs-dest did not start: {e}"))
}

fn leg(h: &Harness) -> serde_json::Value {
    h.status().raw["async_leg"].clone()
}

/// Until the second leg holds and has applied everything logged.
fn wait_caught_up(h: &Harness, what: &str) {
    wait_until(what, Duration::from_secs(90), || {
        let s = h.status().raw;
        let a = &s["async_leg"];
        a["link"] == "up"
            && a["lag_records"] == 0
            && a["applied_seq"] == s["last_logged_seq"]
            && a["acked_seq"] == s["last_logged_seq"]
    });
}

fn workload(mnt: &Path, tag: &str, files: usize) {
    let dir = mnt.join(tag);
    fs::create_dir_all(&dir).expect("mkdir");
    for i in 0..files {
        let data: Vec<u8> = (0..8192u32).map(|b| (b as usize * 7 + i) as u8).collect();
        fs::write(dir.join(format!("f{i}")), &data).expect("write");
    }
    fs::rename(dir.join("f0"), dir.join("renamed")).expect("rename");
    fs::remove_file(dir.join("f1")).expect("unlink");
    let big: Vec<u8> = (0..(1u32 << 20)).map(|b| (b % 249) as u8).collect();
    fs::write(dir.join("big"), big).expect("big write");
}

fn promote(h: &Harness, root: &Path) {
    let out = run_ok(
        h.fs_dest()
            .args(["promote", "--source", NAME, "--root"])
            .arg(root),
    );
    assert!(out.contains("promoted"), "promote said: {out}");
}

fn image(root: &Path) -> PathBuf {
    root.join(NAME).join("image")
}

#[test]
fn a_second_destination_mirrors_asynchronously_and_either_can_be_promoted() {
    const TEST: &str = "leg2";
    require_mount!(TEST);
    let options = HarnessOptions::new(TEST);
    let mut h = Harness::start_dest_only(&options);
    let root2 = h.dir.join("dest2-root");
    let (dest2, addr2) = start_second(&h, &root2, "127.0.0.1:0");
    let mut dest2 = Some(dest2);
    let mut opts = SourceOptions::new(NAME);
    // Small partitions: CPs free them while the second leg is away, so its records go to
    // the spill file.
    opts.partition_size_bytes = Some(256 << 10);
    opts.extra_args = vec!["--async-dest".into(), addr2.clone()];
    h.source = Some(
        h.mount_source(&opts)
            .unwrap_or_else(|e| panic!("mount with --async-dest: {e}")),
    );
    let mnt = h.mnt().to_path_buf();
    let backing = h.backing().to_path_buf();

    workload(&mnt, "one", 40);
    h.cp();
    wait_caught_up(&h, "the second leg to catch up");
    assert_trees_equal(&backing, &h.image());
    assert_trees_equal(&backing, &image(&root2));

    // The second destination dies: the first goes on as before.
    if let Some(mut d) = dest2.take() {
        d.kill_and_reap();
    }
    workload(&mnt, "two", 60);
    h.cp();
    assert_trees_equal(&backing, &h.image());
    let s = h.status().raw;
    assert_eq!(
        s["degraded"], false,
        "the synchronous leg is not slowed: {s}"
    );
    assert_eq!(s["link"], "up", "{s}");
    wait_until(
        "the source to notice the second leg is gone",
        Duration::from_secs(15),
        || leg(&h)["link"] == "down",
    );
    let a = leg(&h);
    assert!(a["lag_records"].as_u64().unwrap_or(0) > 0, "{a}");
    assert!(
        a["spill_records"].as_u64().unwrap_or(0) > 0,
        "partitions freed while the second leg was away kept its records: {a}"
    );
    let text = run_ok(h.fs_source().args(["status", "--mountpoint"]).arg(&mnt));
    assert!(
        text.contains("async leg") && text.contains("link down"),
        "the text status shows the second leg: {text}"
    );
    eprintln!("{text}");

    // It comes back (same root and NVRAM) and catches up from NVRAM and the spill file.
    let listen = addr2.clone();
    let (d, _) = start_second(&h, &root2, &listen);
    dest2 = Some(d);
    wait_caught_up(&h, "the second leg to catch up after its return");
    assert_eq!(leg(&h)["spill_records"], 0, "the spill file is trimmed");
    assert_trees_equal(&backing, &image(&root2));

    // The source is lost: both destinations can be promoted, each to an image of everything.
    h.detach_source();
    h.wait_disconnected(NAME);
    wait_until(
        "the second destination to notice the source is gone",
        Duration::from_secs(15),
        || {
            let out = Command::new(nvmirror_e2e::bin("fs-dest"))
                .env("NVMIRROR_RUN_DIR", &h.run_dir)
                .args(["status", "--json", "--root"])
                .arg(&root2)
                .output()
                .expect("fs-dest status");
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            v["sources"][0]["connected"] == false
        },
    );
    promote(&h, &root2);
    assert_trees_equal(&backing, &image(&root2));
    let dest_root = h.dest_root.clone();
    promote(&h, &dest_root);
    assert_trees_equal(&backing, &image(&dest_root));
    drop(dest2);
}
