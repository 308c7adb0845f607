//! No silent divergence: a record that cannot be applied to the image is never counted as
//! mirrored. `fs-source cp` fails naming the path and the error, both statuses show the source
//! out of sync, and once the image can take it again the source heals it by itself.
//!
//! Also here: an open file that is unlinked reports `st_nlink` 0, as on a local filesystem.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::{
    assert_trees_equal, require_mount, run_ok, run_with_timeout, show_output, wait_until, Harness,
    HarnessOptions,
};

fn chattr(flag: &str, path: &std::path::Path) {
    run_ok(Command::new("chattr").arg(flag).arg(path));
}

#[test]
fn a_record_that_cannot_apply_is_reported_and_healed() {
    const TEST: &str = "divergence_heals";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let mnt = h.mnt().to_path_buf();
    fs::create_dir(mnt.join("docs")).expect("mkdir");
    fs::write(mnt.join("docs/report.txt"), b"first version\n").expect("write");
    fs::write(mnt.join("other.txt"), b"unaffected\n").expect("write");
    h.cp();
    let image_file = h.image().join("docs/report.txt");
    assert_eq!(
        fs::read(&image_file).expect("image file"),
        b"first version\n"
    );

    // The image file cannot change any more: the next CP cannot apply the write.
    chattr("+i", &image_file);
    struct Unfreeze(std::path::PathBuf);
    impl Drop for Unfreeze {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let unfreeze = Unfreeze(image_file.clone());
    fs::write(mnt.join("docs/report.txt"), b"second version, longer\n").expect("write");
    let out = run_with_timeout(
        h.fs_source().args(["cp", "--mountpoint"]).arg(&mnt),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "cp must fail while a record could not be applied: {}",
        show_output("fs-source cp", &out)
    );
    assert!(
        text.contains("docs/report.txt") && text.contains("out of sync"),
        "cp names the path and says why: {text}"
    );
    assert!(
        text.contains("Operation not permitted") || text.contains("EPERM"),
        "cp says what failed: {text}"
    );
    let s = h.status();
    assert_eq!(s.raw["sync"], "out-of-sync", "fs-source status: {}", s.raw);
    assert!(s.raw["out_of_sync"].as_u64().unwrap_or(0) >= 1, "{}", s.raw);
    let human = run_ok(h.fs_source().args(["status", "--mountpoint"]).arg(&mnt));
    assert!(
        human.contains("out-of-sync") && human.contains("docs/report.txt"),
        "human status: {human}"
    );
    let d = h.dest_source_status("alpha");
    assert_eq!(d["sync"], "out-of-sync", "fs-dest status: {d}");
    let dest_human = run_ok(h.fs_dest().args(["status", "--root"]).arg(&h.dest_root));
    assert!(
        dest_human.contains("OUT OF SYNC docs/report.txt"),
        "fs-dest human status: {dest_human}"
    );
    // While it cannot apply, the source keeps trying; nothing else is held up.
    fs::write(mnt.join("other.txt"), b"still mirrored\n").expect("write");

    // The image can take it again: the mirror heals by itself.
    drop(unfreeze);
    wait_until(
        "the source to heal the image (resync with backoff)",
        Duration::from_secs(90),
        || h.status().raw["sync"] == "in-sync",
    );
    h.cp();
    assert_eq!(
        fs::read(&image_file).expect("image file"),
        b"second version, longer\n"
    );
    assert_trees_equal(h.backing(), &h.image());
    assert_eq!(h.dest_source_status("alpha")["sync"], "in-sync");
}

#[test]
fn an_open_unlinked_file_has_no_links() {
    const TEST: &str = "open_unlinked_nlink";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let p = h.mnt().join("tmpfile");
    let f = fs::File::create(&p).expect("create");
    assert_eq!(f.metadata().expect("fstat").nlink(), 1);
    fs::remove_file(&p).expect("unlink");
    assert_eq!(
        f.metadata().expect("fstat").nlink(),
        0,
        "fstat of an open, unlinked file (ext4 says 0)"
    );
    let g = fs::File::create(h.mnt().join("linked")).expect("create");
    fs::hard_link(h.mnt().join("linked"), h.mnt().join("linked2")).expect("link");
    fs::remove_file(h.mnt().join("linked")).expect("unlink one name");
    assert_eq!(g.metadata().expect("fstat").nlink(), 1, "one name left");
}
