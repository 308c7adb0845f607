//! Addresses (issue 12, point 3, in part): the destination listens on an IPv6 address and the
//! source reaches it by `[IPv6]:PORT`; a source reaches a destination by host name.

use std::fs;

use nvmirror_e2e::{assert_trees_equal, require_mount, Harness, HarnessOptions, SourceOptions};

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
