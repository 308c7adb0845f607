//! Addresses and names (issue 12, point 3): the destination listens on an IPv6 address and the
//! source reaches it by `[IPv6]:PORT`; a source reaches a destination by host name; the
//! destination's certificate must carry the name the source reaches it by, and a mismatch is a
//! clear error until `certs renew --name dest --san` adds the name.

use std::fs;

use nvmirror_e2e::{
    assert_trees_equal, require_mount, run_ok, Harness, HarnessOptions, SourceOptions,
};

/// This machine has IPv6 on its loopback (a kernel booted with `ipv6.disable=1` has not: the
/// tests then say so and pass, like the mount tests without root).
fn have_ipv6(test: &str) -> bool {
    match std::net::UdpSocket::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: no IPv6 loopback on this machine ({e})");
            false
        }
    }
}

#[test]
fn a_destination_on_ipv6_is_mirrored_to() {
    const TEST: &str = "ipv6";
    require_mount!(TEST);
    if !have_ipv6(TEST) {
        return;
    }
    let h = Harness::start(HarnessOptions::new(TEST).listen("[::1]:0"));
    assert!(
        h.dest_addr.starts_with("[::1]:"),
        "fs-dest listens on {}",
        h.dest_addr
    );
    fs::write(h.mnt().join("over-ipv6"), b"six").expect("write");
    h.cp();
    assert_eq!(
        fs::read(h.image().join("over-ipv6")).expect("mirrored"),
        b"six"
    );
    assert_trees_equal(h.backing(), &h.image());
}

#[test]
fn a_destination_is_reached_by_host_name() {
    const TEST: &str = "hostname";
    require_mount!(TEST);
    if !have_ipv6(TEST) {
        return;
    }
    // Listening on both families, so whichever address `localhost` resolves to first works.
    let mut h = Harness::start(HarnessOptions::new(TEST).listen("[::]:0"));
    h.detach_source();
    let port = h.dest_addr.rsplit(':').next().expect("port").to_string();
    h.dest_addr = format!("localhost:{port}");
    h.restart_source(&SourceOptions::new("alpha"))
        .unwrap_or_else(|e| panic!("mount with --dest localhost:{port}: {e}"));
    fs::write(h.mnt().join("by-name"), b"n").expect("write");
    h.cp();
    assert_eq!(fs::read(h.image().join("by-name")).expect("mirrored"), b"n");
}

#[test]
fn a_certificate_without_the_destinations_name_is_refused_by_name() {
    const TEST: &str = "san";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    h.detach_source();
    let mut opts = SourceOptions::new("alpha");
    opts.extra_args = vec!["--dest-name".into(), "mirror.example".into()];
    let err = match h.restart_source(&opts) {
        Ok(()) => panic!("a destination whose certificate lacks mirror.example was accepted"),
        Err(e) => e,
    };
    let out = &err.daemon_output;
    assert!(
        out.contains("refused the certificate of the destination")
            && out.contains("mirror.example")
            && out.contains("certs renew --name dest --san mirror.example"),
        "the mismatch names the name and the fix: {out}"
    );
    assert!(
        !err.left_mounted,
        "a refused destination leaves nothing mounted"
    );

    // The operator adds the name; the destination serves the new certificate after a restart.
    let said = run_ok(
        h.fs_dest()
            .args([
                "certs",
                "renew",
                "--name",
                "dest",
                "--san",
                "mirror.example",
                "--dir",
            ])
            .arg(&h.tls_dir),
    );
    assert!(
        said.contains("mirror.example"),
        "renew lists the names: {said}"
    );
    h.kill_dest();
    h.restart_dest()
        .unwrap_or_else(|e| panic!("fs-dest with the renewed certificate: {e}"));
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("mount with a certificate that names mirror.example: {e}"));
    fs::write(h.mnt().join("named"), b"ok").expect("write");
    h.cp();
    assert_eq!(fs::read(h.image().join("named")).expect("mirrored"), b"ok");
}

#[test]
fn a_source_mirrors_across_an_ipv6_link_between_hosts() {
    const TEST: &str = "ipv6_netns";
    require_mount!(TEST);
    if !nvmirror_e2e::netns::can_use_netns(TEST) {
        return;
    }
    let mut c = nvmirror_e2e::netns::Cluster::start_ipv6("ipv6ns", "alpha");
    assert!(
        c.dest_addr.starts_with("[fd77::1]:"),
        "fs-dest listens on {}",
        c.dest_addr
    );
    let backing = c.dir.join("backing");
    let src = c
        .mount_source("alpha", &backing, &c.dir.join("source.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount over IPv6: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    fs::write(mnt.join("big"), &big).expect("write over IPv6");
    fs::create_dir(mnt.join("d")).expect("mkdir");
    fs::rename(mnt.join("big"), mnt.join("d/big")).expect("rename");
    c.cp(&mnt);
    assert_eq!(
        fs::read(c.image("alpha").join("d/big")).expect("mirrored"),
        big
    );
    assert_trees_equal(&backing, &c.image("alpha"));
    let out = c
        .fs_dest()
        .args(["status", "--json", "--root"])
        .arg(&c.dest_root)
        .output()
        .expect("fs-dest status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let peer = v["sources"][0]["peer_address"].as_str().unwrap_or_default();
    assert!(
        peer.starts_with("[fd77::2]:"),
        "the destination sees the source at its IPv6 address: {v}"
    );
    // Across the link too, a name the certificate does not carry is refused before mounting.
    match c.mount_source(
        "alpha",
        &c.dir.join("backing-b"),
        &c.dir.join("source-b.nvram"),
        &["--dest-name", "mirror.example"],
        "b",
    ) {
        Ok(_) => panic!("a certificate without mirror.example was accepted"),
        Err(e) => assert!(
            e.to_string()
                .contains("certs renew --name dest --san mirror.example"),
            "the refusal names the fix: {e}"
        ),
    }
}
