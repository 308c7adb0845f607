//! The workload itself, on plain local directories: it must run cleanly on a local filesystem
//! (its own checks pass) and be deterministic for a seed, or comparing the mount with a
//! reference run would prove nothing.

use nvmirror_e2e::{assert_trees_equal_named, diff_trees, workload, Rng};

#[test]
fn workload_is_deterministic_on_a_local_filesystem() {
    const TEST: &str = "workload_is_deterministic_on_a_local_filesystem";
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP {TEST}: needs root (the workload chowns files)");
        return;
    }
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    let c = tempfile::tempdir().expect("temp dir");
    let seed = Rng::from_env(TEST).next_u64();
    workload::mixed(a.path(), &mut Rng::new(seed));
    workload::mixed(b.path(), &mut Rng::new(seed));
    assert_trees_equal_named(a.path(), b.path(), "run 1", "run 2");
    // A different seed gives a different tree: the comparison is not vacuous.
    workload::mixed(c.path(), &mut Rng::new(seed ^ 1));
    let diffs = diff_trees(a.path(), c.path(), "seed", "other seed").expect("compare");
    assert!(
        !diffs.is_empty(),
        "two seeds gave identical trees: the workload ignores its random choices"
    );
}
