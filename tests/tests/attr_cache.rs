//! The kernel caches attributes and names for a minute (fs-source's TTLs): what a client sees
//! must still follow every change at once, through the name it changed and through every other
//! name of the same inode: link counts after link and unlink, mode and owner set through
//! another hard link, size after a write through another descriptor, names after a rename, a
//! file unlinked while open. The same checks pass on a local filesystem; a cache that missed an
//! invalidation fails them with the value from before the change.

use nvmirror_e2e::{require_mount, Harness, HarnessOptions};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

#[test]
fn cached_attrs_follow_changes() {
    const TEST: &str = "cached_attrs_follow_changes";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt();
    fs::create_dir(m.join("d1")).expect("mkdir d1");
    fs::create_dir(m.join("d2")).expect("mkdir d2");
    let a = m.join("d1/a");
    let b = m.join("d2/b");
    fs::write(&a, b"one\n").expect("write a");
    let meta = |p: &std::path::Path| {
        fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
    };
    assert_eq!(meta(&a).nlink(), 1, "a before the link (now cached)");

    fs::hard_link(&a, &b).expect("link a -> b");
    assert_eq!(
        meta(&a).nlink(),
        2,
        "a's link count right after a link made as b"
    );

    fs::set_permissions(&b, fs::Permissions::from_mode(0o600)).expect("chmod b");
    assert_eq!(
        meta(&a).mode() & 0o7777,
        0o600,
        "a's mode after a chmod through b"
    );
    std::os::unix::fs::lchown(&b, Some(65534), Some(65534)).expect("chown b");
    assert_eq!(
        (meta(&a).uid(), meta(&a).gid()),
        (65534, 65534),
        "a's owner after a chown through b"
    );

    {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&b)
            .expect("open b");
        f.write_all(b"two, through b\n").expect("append through b");
    }
    assert_eq!(
        meta(&a).len(),
        b"one\ntwo, through b\n".len() as u64,
        "a's size after a write through b"
    );
    assert_eq!(
        fs::read(&a).expect("read a"),
        b"one\ntwo, through b\n",
        "a's content after a write through b"
    );

    fs::remove_file(&b).expect("unlink b");
    assert_eq!(meta(&a).nlink(), 1, "a's link count after b was unlinked");
    assert!(
        fs::symlink_metadata(&b).is_err(),
        "b still found after its unlink"
    );

    let c = m.join("d2/c");
    fs::rename(&a, &c).expect("rename a -> d2/c");
    assert!(
        fs::symlink_metadata(&a).is_err(),
        "a still found after the rename"
    );
    assert_eq!(meta(&c).nlink(), 1, "c after the rename");

    // A directory's link count follows its subdirectories.
    let before = meta(&m.join("d1")).nlink();
    fs::create_dir(m.join("d1/sub")).expect("mkdir d1/sub");
    assert_eq!(
        meta(&m.join("d1")).nlink(),
        before + 1,
        "d1 after a mkdir in it"
    );
    fs::remove_dir(m.join("d1/sub")).expect("rmdir d1/sub");
    assert_eq!(meta(&m.join("d1")).nlink(), before, "d1 after the rmdir");

    // Unlinked while open: the open file has no name left; the root shows no hidden name.
    let f = fs::File::open(&c).expect("open c");
    fs::remove_file(&c).expect("unlink c while open");
    assert_eq!(
        f.metadata().expect("fstat c").nlink(),
        0,
        "an unlinked open file"
    );
    assert!(
        fs::symlink_metadata(&c).is_err(),
        "c still found after its unlink"
    );
    let names: Vec<String> = fs::read_dir(m)
        .expect("list the root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "the root lists d1 and d2 only: {names:?}");
    drop(f);
    h.cp();
    nvmirror_e2e::assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
}

/// Policy strict with the destination stopped: a chmod is applied to the backing volume but
/// answered with an error (not mirrored within the timeout). The kernel must not keep the mode
/// it cached before for the rest of its minute: fs-source drops its caches, and a stat
/// through the mount soon shows the mode the file really has.
#[test]
fn failed_confirmation_drops_the_cache() {
    const TEST: &str = "failed_confirmation_drops_cache";
    require_mount!(TEST);
    let mut h = Harness::start(
        HarnessOptions::new(TEST)
            .policy("strict")
            .source_args(["--timeout-ms", "1500"]),
    );
    let f = h.mnt().join("f");
    fs::write(&f, b"x\n").expect("write f");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod 644");
    assert_eq!(
        fs::metadata(&f).expect("stat f").mode() & 0o7777,
        0o644,
        "now cached"
    );
    h.dest().signal(libc::SIGSTOP);
    let refused = fs::set_permissions(&f, fs::Permissions::from_mode(0o600));
    h.dest().signal(libc::SIGCONT);
    assert!(
        refused.is_err(),
        "a chmod the stopped destination could not confirm must fail under policy strict"
    );
    let backing = fs::metadata(h.backing().join("f"))
        .expect("stat backing f")
        .mode()
        & 0o7777;
    assert_eq!(
        backing, 0o600,
        "the chmod was applied to the backing volume"
    );
    nvmirror_e2e::wait_until(
        "the mount to show the backing volume's mode",
        std::time::Duration::from_secs(10),
        || fs::metadata(&f).is_ok_and(|m| m.mode() & 0o7777 == backing),
    );
}
