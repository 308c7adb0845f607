//! Online verify: `fs-source verify` finds every way an image changed behind the mirror's back
//! (content, mode, owner, mtime, xattrs, symlink target, hard links, missing and extra
//! entries), says nothing of files that are merely being written while it runs, and
//! `--repair` resends exactly what differs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_e2e::{
    assert_trees_equal, require_mount, run_with_timeout, show_output, workload, Harness,
    HarnessOptions, Rng,
};

fn verify(h: &Harness, args: &[&str]) -> (Output, String) {
    let out = run_with_timeout(
        h.fs_source()
            .args(["verify", "--mountpoint"])
            .arg(h.mnt())
            .args(args),
        Duration::from_secs(300),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn verify_finds_what_changed_behind_the_mirror_and_repairs_it() {
    const TEST: &str = "verify_repairs";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST).partition_size_bytes(1 << 20));
    let mnt = h.mnt().to_path_buf();
    let seed = Rng::from_env(TEST).next_u64();
    fs::create_dir(mnt.join("w")).expect("mkdir");
    workload::mixed(&mnt.join("w"), &mut Rng::new(seed));
    fs::create_dir(mnt.join("v")).expect("mkdir");
    for i in 0..20 {
        fs::write(
            mnt.join(format!("v/f{i}")),
            vec![i as u8; 10_000 + i * 1000],
        )
        .expect("write");
    }
    fs::hard_link(mnt.join("v/f1"), mnt.join("v/f1.link")).expect("link");
    std::os::unix::fs::symlink("f2", mnt.join("v/sym")).expect("symlink");
    rustix::fs::setxattr(
        mnt.join("v/f3"),
        "user.k",
        b"value",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");
    // More entries than one listing page (4,096) holds.
    fs::create_dir(mnt.join("many")).expect("mkdir");
    for i in 0..4200 {
        fs::write(mnt.join(format!("many/e{i:05}")), b"").expect("create");
    }
    h.cp();

    // Writes go on while verify runs: they are not differences.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), mnt.join("busy.log"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                fs::write(&path, format!("line {n}\n").repeat(100)).expect("busy write");
                n += 1;
            }
            n
        })
    };
    let (out, text) = verify(&h, &[]);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer");
    assert!(
        out.status.success(),
        "a mirrored volume verifies clean while written ({writes} writes meanwhile): {}",
        show_output("verify", &out)
    );
    assert!(text.contains("0 difference(s)"), "{text}");

    // Behind the mirror's back.
    let img = h.image();
    let mut f0 = fs::read(img.join("v/f0")).expect("read");
    f0[100] ^= 0xff;
    fs::write(img.join("v/f0"), &f0).expect("same size, other content");
    fs::set_permissions(img.join("v/f4"), fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(img.join("v/f5"), Some(65534), None).expect("chown");
    fs::remove_file(img.join("v/f6")).expect("remove");
    fs::write(img.join("v/extra"), b"only in the image").expect("extra");
    fs::remove_file(img.join("v/f1.link")).expect("break the link");
    fs::write(img.join("v/f1.link"), vec![1u8; 11_000]).expect("copy instead of link");
    fs::remove_file(img.join("v/sym")).expect("rm symlink");
    std::os::unix::fs::symlink("elsewhere", img.join("v/sym")).expect("other target");
    rustix::fs::setxattr(
        img.join("v/f3"),
        "user.k",
        b"changed",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");
    let t = fs::File::options()
        .write(true)
        .open(img.join("v/f7"))
        .expect("open");
    t.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .expect("set mtime");
    drop(t);

    fs::write(img.join("many/e04199"), b"on the second page").expect("change");
    fs::remove_file(img.join("many/e04100")).expect("remove on the second page");

    let (out, text) = verify(&h, &[]);
    assert!(
        !out.status.success(),
        "differences make verify fail: {text}"
    );
    for (path, what) in [
        ("v/f0", "content"),
        ("v/f4", "mode"),
        ("v/f5", "owner"),
        ("v/f6", "only in backing"),
        ("v/extra", "only in image"),
        ("v/f1.link", "link"),
        ("v/sym", "symlink target"),
        ("v/f3", "xattrs"),
        ("v/f7", "mtime"),
        ("many/e04199", "size"),
        ("many/e04100", "only in backing"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("DIFFERS {path}:")) && l.contains(what)),
            "verify reports {path} ({what}):\n{text}"
        );
    }
    let (out, json) = verify(&h, &["--json"]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_str(
        json.lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON report: {json}")),
    )
    .expect("JSON report");
    assert!(
        report["differences"].as_array().map_or(0, |d| d.len()) >= 11,
        "{report}"
    );

    let (out, text) = verify(&h, &["--repair"]);
    assert!(
        out.status.success(),
        "repair fixes every difference: {}",
        show_output("verify --repair", &out)
    );
    assert!(text.contains("repaired"), "{text}");
    let (out, text) = verify(&h, &[]);
    assert!(out.status.success(), "clean after the repair: {text}");
    h.cp();
    assert_trees_equal(h.backing(), &h.image());
}
