//! fs-source keeps only the inodes the kernel still references: after the kernel forgets them
//! (here: `drop_caches` reclaims its dentries and inodes, which sends FORGET), the daemon's
//! table holds the root alone again, and `fs-source status` says so.

use std::fs;
use std::time::Duration;

use nvmirror_e2e::{require_mount, Harness, HarnessOptions};

fn inodes(h: &Harness) -> u64 {
    let st = h.status();
    st.raw["inodes"]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no inode count: {}", st.raw))
}

#[test]
fn forgotten_inodes_leave_the_table() {
    const TEST: &str = "inode_forget";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let mnt = h.mnt().to_path_buf();
    const FILES: usize = 1500;
    for d in 0..5 {
        let dir = mnt.join(format!("d{d}"));
        fs::create_dir(&dir).expect("mkdir");
        for i in 0..FILES / 5 {
            fs::write(dir.join(format!("f{i}")), b"x").expect("create");
        }
    }
    // Look every file up again (the kernel may have let some go already).
    for d in 0..5 {
        for i in 0..FILES / 5 {
            fs::metadata(mnt.join(format!("d{d}/f{i}"))).expect("stat");
        }
    }
    let before = inodes(&h);
    assert!(
        before > 100,
        "the daemon tracks the inodes the kernel looked up: {before}"
    );
    let memory = &h.status().raw["memory"];
    assert!(
        memory["rss_bytes"].as_u64().is_some_and(|r| r > 0),
        "status reports resident memory: {memory}"
    );
    // The kernel reclaims dentries and inodes it does not use (none is open) and sends FORGET.
    let mut after = before;
    let forgotten = nvmirror_e2e::poll_until(Duration::from_secs(20), || {
        fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
        after = inodes(&h);
        after <= 10
    });
    assert!(
        forgotten,
        "after the kernel dropped its inodes the table still holds {after} of {before}"
    );
    // Forgotten inodes are found again by name: nothing was lost with them.
    assert_eq!(
        fs::read(mnt.join("d4/f7")).expect("read after forget"),
        b"x"
    );
    assert!(inodes(&h) >= 3, "looked up again: root, d4, f7");
    h.cp();
    let image = h.image();
    assert_eq!(fs::read(image.join("d4/f7")).expect("image"), b"x");
}
