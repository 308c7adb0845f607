//! A volume mounted without `--dest` (a promoted image with no new destination yet) works as a
//! plain logged volume: writes are answered from the local NVRAM alone, CPs make the backing
//! directory durable, and status says it is not mirrored.

use std::time::Duration;

use nvmirror_e2e::{require_mount, Daemon, Harness, HarnessOptions, SourceMount};

#[test]
fn unmirrored_volume_serves_and_commits_locally() {
    require_mount!("unmirrored_volume_serves_and_commits_locally");
    let h = Harness::start(HarnessOptions::new("standalone"));
    let dir = h.dir.join("alone");
    let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir_all(&backing).expect("backing dir");
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let mut cmd = h.fs_source();
    cmd.arg("mount")
        .arg("--backing")
        .arg(&backing)
        .arg("--mountpoint")
        .arg(&mnt)
        .args(["--name", "alone", "--partition-size", "65536", "--nvram"])
        .arg(dir.join("alone.nvram"));
    let (daemon, _) = Daemon::spawn(
        "fs-source(alone)",
        &mut cmd,
        &h.log_dir.join("alone.log"),
        "fs-source: mounted",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("unmirrored mount failed: {e}"));
    let mut source = SourceMount {
        daemon,
        mountpoint: mnt.clone(),
        backing: backing.clone(),
        name: "alone".into(),
    };

    // More than two partitions' worth, so CPs must free partitions with no destination.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("f"), &data).expect("write through the unmirrored mount");
    std::fs::create_dir(mnt.join("d")).expect("mkdir");
    h.cp_of(&mnt);
    let status = h
        .fs_source()
        .args(["status", "--json", "--mountpoint"])
        .arg(&mnt)
        .output()
        .expect("status");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(json["link"], "none", "{json}");
    assert!(json["cp_count"].as_u64().unwrap_or(0) > 1, "{json}");
    assert_eq!(json["lag_records"], 0, "{json}");
    assert_eq!(
        std::fs::read(backing.join("f")).expect("backing file"),
        data
    );
    assert!(backing.join("d").is_dir());
    assert_eq!(
        source.stop().map(|s| s.success()),
        Some(true),
        "clean exit on SIGTERM"
    );
}
