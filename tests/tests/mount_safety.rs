//! Mount safety (issue 10, point 1, in part): a mount point that is already a mount is
//! refused, and the mount already there keeps serving; the dead mount a killed `fs-source`
//! leaves is detached by the next mount; missing certificates stop the mount at once.

use std::fs;
use std::time::Duration;

use nvmirror_e2e::{require_mount, run_with_timeout, Harness, HarnessOptions, SourceOptions};

#[test]
fn a_second_mount_on_a_live_mount_point_is_refused_and_the_first_goes_on() {
    const TEST: &str = "mount_twice";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    h.certs_issue(&h.tls_dir.clone(), "beta");
    fs::write(h.mnt().join("before"), b"1").expect("write");
    let other = h.dir.join("backing-beta");
    fs::create_dir_all(&other).expect("backing");
    let out = run_with_timeout(
        h.fs_source()
            .arg("mount")
            .arg("--backing")
            .arg(&other)
            .arg("--mountpoint")
            .arg(h.mnt())
            .args(["--dest", &h.dest_addr, "--name", "beta", "--nvram"])
            .arg(h.dir.join("beta.nvram"))
            .arg("--tls")
            .arg(&h.tls_dir),
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the second mount must fail: {text}");
    assert!(
        text.contains("already a mount point"),
        "the refusal says why: {text}"
    );
    // The first mount, its control socket and its mirroring are untouched.
    fs::write(h.mnt().join("after"), b"2").expect("the first mount still serves");
    h.cp();
    assert_eq!(fs::read(h.image().join("after")).expect("mirrored"), b"2");
    assert!(
        h.status().last_acked_seq > 0,
        "its control socket still answers"
    );
}

#[test]
fn the_dead_mount_of_a_killed_source_is_detached_by_the_next_mount() {
    const TEST: &str = "mount_stale";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    fs::write(h.mnt().join("a"), b"a").expect("write");
    h.kill_source();
    assert!(
        fs::metadata(h.dir.join("mnt-alpha")).is_err(),
        "the killed source's mount is dead (ENOTCONN)"
    );
    // No `umount -l` by the operator: the next mount cleans up.
    let dead = h.source.take().expect("source");
    std::mem::forget(dead);
    h.restart_source(&SourceOptions::new("alpha"))
        .unwrap_or_else(|e| panic!("the next mount must detach the dead one: {e}"));
    assert_eq!(fs::read(h.mnt().join("a")).expect("a is back"), b"a");
    let log = fs::read_to_string(h.log_dir.join("fs-source-alpha.log")).unwrap_or_default();
    assert!(log.contains("stale mount"), "it says what it did:\n{log}");
}

#[test]
fn missing_certificates_stop_the_mount() {
    const TEST: &str = "mount_nocert";
    require_mount!(TEST);
    let mut h = Harness::start(HarnessOptions::new(TEST));
    h.detach_source();
    let tls = h.dir.join("tls-partial");
    fs::create_dir_all(&tls).expect("tls dir");
    fs::copy(h.tls_dir.join("ca.pem"), tls.join("ca.pem")).expect("ca");
    fs::copy(h.tls_dir.join("alpha.pem"), tls.join("alpha.pem")).expect("cert");
    let mut opts = SourceOptions::new("alpha");
    opts.tls_dir = Some(tls.clone());
    let err = match h.restart_source(&opts) {
        Ok(()) => panic!("a mount without its key must fail"),
        Err(e) => e,
    };
    assert!(!err.left_mounted, "nothing stays mounted");
    let text = format!("{err}");
    assert!(
        text.contains("alpha.key") && text.contains("not found"),
        "the failure names the missing file: {text}"
    );
}

#[test]
fn strict_refuses_to_mount_without_its_destination() {
    const TEST: &str = "mount_unreach";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    h.certs_issue(&h.tls_dir.clone(), "gamma");
    let backing = h.dir.join("backing-gamma");
    let mnt = h.dir.join("mnt-gamma");
    fs::create_dir_all(&backing).expect("backing");
    fs::create_dir_all(&mnt).expect("mount point");
    // A UDP port nobody answers on.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
    let addr = dead.local_addr().expect("addr").to_string();
    drop(dead);
    let out = run_with_timeout(
        h.fs_source()
            .arg("mount")
            .arg("--backing")
            .arg(&backing)
            .arg("--mountpoint")
            .arg(&mnt)
            .args(["--dest", &addr, "--name", "gamma", "--policy", "strict"])
            .args(["--connect-wait-ms", "1000", "--nvram"])
            .arg(h.dir.join("gamma.nvram"))
            .arg("--tls")
            .arg(&h.tls_dir),
        Duration::from_secs(30),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "strict must not mount without its destination: {text}"
    );
    assert!(
        text.contains("not reachable"),
        "the refusal says why: {text}"
    );
    assert!(!nvmirror_e2e::is_mounted(&mnt), "nothing stays mounted");
}
