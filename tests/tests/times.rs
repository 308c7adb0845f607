//! Modification times are mirrored: replaying a record stamps the image with the time of the
//! replay, so the source logs the times of changed files when it seals a partition, and after a
//! CP every file and directory of the image has the backing volume's mtime.

use nvmirror_e2e::{
    mtime_differences, mtimes, require_mount, workload, Harness, HarnessOptions, Rng,
};

#[test]
fn image_mtimes_equal_backing_mtimes_after_a_cp() {
    const TEST: &str = "image_mtimes_equal_backing_mtimes_after_a_cp";
    require_mount!(TEST);
    // Small partitions: the workload spans many seals, so times logged at one seal are
    // overtaken by later changes and logged again.
    let h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(65536));
    let seed = Rng::from_env(TEST).next_u64();
    workload::mixed(h.mnt(), &mut Rng::new(seed));
    h.cp();
    let (backing, image) = (mtimes(h.backing()), mtimes(&h.image()));
    assert_eq!(
        backing.keys().collect::<Vec<_>>(),
        image.keys().collect::<Vec<_>>(),
        "same entries (seed {seed})"
    );
    let differing = mtime_differences(&backing, &image);
    assert!(
        differing.is_empty(),
        "mtimes differ (seed {seed}):\n{}",
        differing.join("\n")
    );
}

/// A promotion applies every acknowledged record, also those after the last seal: the times
/// travel with each operation, so the promoted image has the lost source's mtimes too.
#[test]
fn promoted_image_has_the_source_mtimes() {
    const TEST: &str = "promoted_mtimes";
    require_mount!(TEST);
    // Default (large) partitions and timer: no seal happens during the workload.
    let mut h = Harness::start(HarnessOptions::new(TEST));
    let seed = Rng::from_env(TEST).next_u64();
    workload::mixed(h.mnt(), &mut Rng::new(seed));
    std::os::unix::fs::symlink("target-of-a-late-link", h.mnt().join("late.link"))
        .expect("symlink");
    let s = h.status();
    assert!(
        s.last_applied_seq + 100 < s.last_logged_seq,
        "the workload's records are after the last CP: {:?}",
        s.raw
    );
    h.kill_source();
    h.detach_source();
    h.wait_disconnected("alpha");
    let out = nvmirror_e2e::run_ok(
        h.fs_dest()
            .args(["promote", "--source", "alpha", "--root"])
            .arg(&h.dest_root),
    );
    assert!(out.contains("promoted alpha"), "promote: {out}");
    let backing = h.dir.join("backing-alpha");
    let (b, i) = (mtimes(&backing), mtimes(&h.image_of("alpha")));
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        i.keys().collect::<Vec<_>>(),
        "same entries (seed {seed})"
    );
    let differing = mtime_differences(&b, &i);
    assert!(
        differing.is_empty(),
        "mtimes differ after promote (seed {seed}):\n{}",
        differing.join("\n")
    );
}
