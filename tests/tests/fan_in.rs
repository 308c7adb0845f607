//! Many sources, one destination (claims 17, 21, 23): two sources mirror at the same time into
//! one `fs-dest`; each image equals its own backing volume and nothing of one source lands in
//! the other's image.

use std::thread;

use nvmirror_e2e::{
    assert_trees_equal_named, require_mount, workload, Harness, HarnessOptions, Rng, SourceOptions,
};

#[test]
fn two_sources_mirror_into_their_own_images() {
    const TEST: &str = "two_sources_mirror_into_their_own_images";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(65536));
    h.certs_issue(&h.tls_dir, "beta");
    let mut beta_opts = SourceOptions::new("beta");
    beta_opts.partition_size_bytes = Some(65536);
    let beta = h
        .mount_source(&beta_opts)
        .unwrap_or_else(|e| panic!("beta did not mount: {e}"));

    let seed = Rng::from_env(TEST).next_u64();
    let (alpha_mnt, beta_mnt) = (h.mnt().to_path_buf(), beta.mountpoint.clone());
    // Both workloads run at once, so both sources' records interleave in the shared NVRAM and
    // their CPs overlap.
    let a = thread::spawn(move || workload::mixed(&alpha_mnt, &mut Rng::new(seed)));
    let b = thread::spawn(move || workload::mixed(&beta_mnt, &mut Rng::new(seed ^ 0x5eed)));
    a.join().expect("alpha workload");
    b.join().expect("beta workload");
    h.cp();
    h.cp_of(&beta.mountpoint);

    assert_trees_equal_named(h.backing(), &h.image(), "alpha backing", "alpha image");
    assert_trees_equal_named(
        &beta.backing,
        &h.image_of("beta"),
        "beta backing",
        "beta image",
    );
    let dest = h.dest_status();
    let sources = dest["sources"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        sources.len(),
        2,
        "fs-dest status lists both sources: {dest}"
    );
    for s in &sources {
        assert_eq!(s["connected"], true, "{s}");
        assert_eq!(
            s["applied_seq"], s["durable_seq"],
            "every durable record applied: {s}"
        );
    }
}
