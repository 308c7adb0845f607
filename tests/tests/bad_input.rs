//! Bad input at the destination's door: a source whose certificate was not signed by the
//! destination's CA is refused, and the destination keeps serving everyone else.

use nvmirror_e2e::{
    assert_trees_equal_named, require_mount, Harness, HarnessOptions, SourceOptions,
};
use std::fs;

#[test]
fn source_with_foreign_certificate_is_refused() {
    const TEST: &str = "source_with_foreign_certificate_is_refused";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    fs::write(h.mnt().join("good-before.txt"), b"from the good source\n").expect("write");

    // A second CA the destination has never seen, and a certificate from it that claims the
    // good source's name. The source trusts the real destination (its ca.pem is the real one),
    // so only the client certificate is wrong.
    let rogue_ca = h.dir.join("rogue-ca");
    fs::create_dir(&rogue_ca).expect("mkdir rogue-ca");
    h.certs_init(&rogue_ca);
    h.certs_issue(&rogue_ca, "alpha");
    let rogue_tls = h.dir.join("rogue-tls");
    fs::create_dir(&rogue_tls).expect("mkdir rogue-tls");
    fs::copy(h.tls_dir.join("ca.pem"), rogue_tls.join("ca.pem")).expect("copy ca.pem");
    for file in ["alpha.pem", "alpha.key"] {
        fs::copy(rogue_ca.join(file), rogue_tls.join(file)).expect("copy rogue cert");
    }
    assert_ne!(
        fs::read(rogue_tls.join("alpha.pem")).unwrap(),
        fs::read(h.tls_dir.join("alpha.pem")).unwrap(),
        "the rogue certificate must differ from the real one"
    );

    let mut rogue = SourceOptions::new("alpha");
    rogue.tls_dir = Some(rogue_tls);
    // Its own backing dir, mount point and NVRAM, so it cannot touch the good source's.
    let rogue_dir = h.dir.join("rogue");
    fs::create_dir(&rogue_dir).expect("mkdir rogue");
    let result = h.mount_source_in(&rogue, &rogue_dir);
    match result {
        Ok(mut mount) => {
            let status = mount.stop();
            panic!(
                "a source with a certificate from a foreign CA was accepted and mounted \
                 (exit after SIGTERM: {status:?})"
            );
        }
        Err(failure) => {
            assert!(
                !failure.left_mounted,
                "the refused source mounted anyway: {failure}"
            );
            match failure.spawn.exit {
                Some(status) => {
                    assert!(!status.success(), "the refused source exited 0: {failure}")
                }
                None => panic!("the refused source must exit (non-zero), not hang: {failure}"),
            }
            let said = failure.daemon_output.to_lowercase();
            assert!(
                [
                    "certificate",
                    "handshake",
                    "unknown ca",
                    "unknownca",
                    "refused",
                    "not trusted",
                    "untrusted",
                    "badcert",
                    "bad cert",
                ]
                .iter()
                .any(|w| said.contains(w)),
                "the refusal must say why (certificate/handshake): {failure}"
            );
        }
    }

    // The destination is still up and still mirrors the good source.
    assert!(
        h.dest().try_wait().is_none(),
        "fs-dest died after a bad connection"
    );
    fs::write(h.mnt().join("good-after.txt"), b"still mirrored\n").expect("write after");
    h.cp();
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    assert_eq!(
        fs::read(h.image().join("good-after.txt")).expect("good-after.txt in the image"),
        b"still mirrored\n"
    );
}
