//! The tested runbook (issue 10, point 10): `deploy/two-hosts.sh` stands up two hosts in network
//! namespaces and walks docs/operations.md — certificates, mount, workload, link cut under both
//! policies, source loss, promote, fencing, failback — with the commands the runbook shows,
//! checking at each step what it promises. This test runs the script with the daemons built for
//! the tests and asserts that it exits 0 after printing every step's heading.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::netns::can_use_netns;
use nvmirror_e2e::{bin_dir, require_mount, run_with_timeout};

/// The script's numbered headings, in order (`== N. title ==`).
const STEPS: &[&str] = &[
    "1. two hosts: network namespaces and a veth link",
    "2. certificates",
    "3. the destination: fs-dest serve",
    "4. the source: fs-source mount, policy strict",
    "5. workload, consistency point, statuses",
    "6. link cut, policy strict",
    "7. the source remounted with policy sync",
    "8. link cut, policy sync",
    "9. source loss: fs-source killed (SIGKILL)",
    "10. promote",
    "11. the promoted image served as a primary (unmirrored)",
    "12. the old source comes back: fenced",
    "13. failback: stop the promoted volume, reseed, demote, mount at generation 1",
    "14. stop",
];

#[test]
fn the_runbook_holds_on_two_hosts() {
    const TEST: &str = "the_runbook_holds_on_two_hosts";
    require_mount!(TEST);
    if !can_use_netns(TEST) {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let script = repo.join("deploy/two-hosts.sh");
    for bin in ["fs-source", "fs-dest"] {
        assert!(
            bin_dir().join(bin).is_file(),
            "{} not found: build the daemons first (`cargo build --workspace --bins`)",
            bin_dir().join(bin).display()
        );
    }
    // `timeout` sends SIGTERM first, so that the script's trap cleans up (daemons, mounts,
    // namespaces) even when it hangs; run_with_timeout is only the backstop.
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "20", "240", "bash"])
        .arg(&script)
        .current_dir(&repo)
        .env("BIN_DIR", bin_dir())
        .env_remove("KEEP");
    if let Some(dir) = std::env::var_os("NVMIRROR_TEST_TMPDIR") {
        cmd.env("TMPDIR", dir);
    }
    let started = std::time::Instant::now();
    let out = run_with_timeout(&mut cmd, Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = || format!("--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
    assert!(
        out.status.success(),
        "deploy/two-hosts.sh failed ({}) after {:?}\n{}",
        out.status,
        started.elapsed(),
        shown()
    );
    let mut from = 0;
    for step in STEPS {
        let heading = format!("\n== {step} ==\n");
        match stdout[from..].find(&heading) {
            Some(at) => from += at + heading.len(),
            None => panic!(
                "deploy/two-hosts.sh exited 0 but did not print {:?} (after the steps before it)\n{}",
                heading.trim(),
                shown()
            ),
        }
    }
    assert!(
        stdout.contains("two-hosts.sh: the runbook holds: every step passed"),
        "no final line\n{}",
        shown()
    );
    eprintln!("{TEST}: the runbook walked in {:?}", started.elapsed());
}
