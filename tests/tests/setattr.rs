//! A chmod or chown that leaves mode, owner and group as they are (tar, `cp -p` and rsync set
//! what a file they just created already has) logs no record and waits for no round trip, yet
//! still moves the status-change time on the mount; a chown that clears a set-user-ID bit is a
//! change and is mirrored.

use nvmirror_e2e::{require_mount, Harness, HarnessOptions};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

fn ctime_ns(p: &std::path::Path) -> i128 {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// Wait (bounded) until the clock the filesystem stamps ctime with has passed `t`.
fn clock_past(t: i128) {
    let start = Instant::now();
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as i128;
        // ext4 stamps with the coarse clock (one tick, up to 10 ms, behind).
        if now > t + 20_000_000 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the clock does not move"
        );
        std::thread::yield_now();
    }
}

#[test]
fn an_unchanging_chmod_or_chown_logs_nothing_and_moves_ctime() {
    const TEST: &str = "unchanging_chmod_chown";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let f = h.mnt().join("f");
    fs::write(&f, b"x").expect("write f");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).expect("chmod 640");
    let logged = h.status().last_logged_seq;

    let c0 = ctime_ns(&f);
    clock_past(c0);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).expect("chmod 640 again");
    let c1 = ctime_ns(&f);
    assert!(
        c1 > c0,
        "a chmod moves ctime even when the mode stays ({c0} -> {c1})"
    );
    clock_past(c1);
    let (uid, gid) = {
        let m = fs::metadata(&f).expect("stat f");
        (m.uid(), m.gid())
    };
    std::os::unix::fs::chown(&f, Some(uid), Some(gid)).expect("chown to the same owner");
    let c2 = ctime_ns(&f);
    assert!(
        c2 > c1,
        "a chown moves ctime even when the owner stays ({c1} -> {c2})"
    );
    assert_eq!(
        h.status().last_logged_seq,
        logged,
        "a chmod and a chown that change nothing the image holds log no record"
    );

    // Real changes are still logged and mirrored: a new mode, and a chown to the same owner
    // that clears the set-user-ID bit.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    let g = h.mnt().join("g");
    fs::write(&g, b"#!/bin/sh\n").expect("write g");
    fs::set_permissions(&g, fs::Permissions::from_mode(0o4755)).expect("chmod 4755");
    std::os::unix::fs::chown(&g, Some(uid), Some(gid)).expect("chown g to the same owner");
    let mode = |p: &std::path::Path| fs::symlink_metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(
        mode(&g),
        0o755,
        "the chown cleared set-user-ID on the mount"
    );
    assert!(
        h.status().last_logged_seq > logged,
        "the real changes are logged"
    );
    h.cp();
    let image = h.image();
    assert_eq!(
        mode(&image.join("f")),
        0o600,
        "the new mode reached the image"
    );
    assert_eq!(
        mode(&image.join("g")),
        0o755,
        "the cleared set-user-ID bit reached the image"
    );
}
