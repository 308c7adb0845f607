//! Packaging (issue 10, point 9): the systemd units are hardened (`systemd-analyze security`
//! rates fs-dest.service at most 5), their example config files hold only options the daemons
//! take and name every one of them, and both daemons tell systemd when they are ready
//! (`Type=notify`: READY=1 on `$NOTIFY_SOCKET`, after listening or mounting).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::{bin, run_with_timeout, Daemon};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// `systemd-analyze security --offline` of a unit file: its overall exposure (0-10).
fn exposure(unit: &Path) -> Option<f64> {
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(unit),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_destination_unit_is_hardened() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP the_destination_unit_is_hardened: no systemd-analyze (apt-get install systemd)"
        );
        return;
    }
    let dest = exposure(&repo().join("deploy/fs-dest.service")).expect("fs-dest.service rated");
    assert!(dest <= 5.0, "fs-dest.service exposure {dest} > 5");
    let source =
        exposure(&repo().join("deploy/fs-source@.service")).expect("fs-source@.service rated");
    eprintln!("systemd-analyze security: fs-dest.service {dest}, fs-source@.service {source}");
    for unit in ["fs-dest.service", "fs-source@.service"] {
        let text = std::fs::read_to_string(repo().join("deploy").join(unit)).expect("unit");
        assert!(text.contains("\nType=notify\n"), "{unit} is Type=notify");
        assert!(
            text.contains("--config /etc/nvmirror/"),
            "{unit} reads a config file"
        );
    }
}

/// The long options of `DAEMON SUBCOMMAND --help`.
fn long_options(daemon: &str, sub: &str) -> Vec<String> {
    let out = run_with_timeout(
        Command::new(bin(daemon)).args([sub, "--help"]),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<']).next())
        .map(|o| o.replace('-', "_"))
        .filter(|o| !["help", "config", "name"].contains(&o.as_str()))
        .collect()
}

#[test]
fn the_example_config_files_name_every_option_and_only_real_ones() {
    for (daemon, sub, example) in [
        ("fs-dest", "serve", "deploy/fs-dest.toml.example"),
        ("fs-source", "mount", "deploy/fs-source-alpha.toml.example"),
    ] {
        let path = repo().join(example);
        let text = std::fs::read_to_string(&path).expect("example config");
        let options = long_options(daemon, sub);
        assert!(
            options.len() > 5,
            "{daemon} {sub} --help lists options: {options:?}"
        );
        for o in &options {
            assert!(
                text.contains(&format!("\n{o} = ")) || text.contains(&format!("\n# {o} = ")),
                "{example} does not mention option {o}"
            );
        }
        // Uncommented, the whole file is a valid configuration: every key is an option.
        let dir = tempfile::tempdir().expect("temp dir");
        let all: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = "))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let config = dir.path().join("all.toml");
        std::fs::write(&config, all).expect("write config");
        let out = run_with_timeout(
            Command::new(bin(daemon))
                .args([sub, "--config"])
                .arg(&config)
                .args(if daemon == "fs-source" {
                    &["--name", "alpha"][..]
                } else {
                    &[]
                }),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the example's paths do not exist here"
        );
        assert!(
            !err.contains("unexpected argument")
                && !err.contains("invalid value")
                && !err.contains("config file"),
            "{example}: every key is an option with a valid value: {err}"
        );
    }
}

/// Start `cmd` with `NOTIFY_SOCKET` set and return what it sent there until `ready_line`.
fn notifications(cmd: &mut Command, what: &str, ready_line: &str, log: &Path) -> (Daemon, String) {
    let dir = log.parent().expect("log dir");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let (daemon, _) = Daemon::spawn(what, cmd, log, ready_line, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what} did not start: {e}"));
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{what} sent nothing to NOTIFY_SOCKET within 30 s: {e}"));
    (daemon, String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn both_daemons_tell_systemd_when_they_are_ready() {
    const TEST: &str = "notify";
    nvmirror_e2e::require_mount!(TEST);
    use nvmirror_e2e::{Harness, HarnessOptions};
    // A destination started by hand, with NOTIFY_SOCKET.
    let h = Harness::start(HarnessOptions::new(TEST));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = h.fs_dest();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path().join("root"))
        .arg("--nvram")
        .arg(dir.path().join("dest.nvram"))
        .arg("--tls")
        .arg(&h.tls_dir);
    let (mut dest, said) = notifications(
        &mut cmd,
        "fs-dest (notify)",
        "fs-dest: listening on ",
        &dir.path().join("fs-dest.log"),
    );
    assert!(said.contains("READY=1"), "fs-dest told systemd: {said:?}");
    assert!(said.contains("STATUS=listening on 127.0.0.1:"), "{said:?}");
    dest.terminate(Duration::from_secs(30));
    // The harness's source, remounted with NOTIFY_SOCKET: ready after its first handshake.
    let mut h = h;
    h.detach_source();
    // Under the harness's directory, so the test runner's sweep finds it after a crash.
    let mnt = h.dir.join("mnt-notify");
    std::fs::create_dir(&mnt).expect("mount point");
    let mut cmd = h.fs_source();
    cmd.args([
        "mount",
        "--name",
        "alpha",
        "--dest",
        &h.dest_addr,
        "--backing",
    ])
    .arg(h.backing_of("alpha"))
    .arg("--mountpoint")
    .arg(&mnt)
    .arg("--nvram")
    .arg(h.source_nvram("alpha"))
    .arg("--tls")
    .arg(&h.tls_dir);
    let (mut source, said) = notifications(
        &mut cmd,
        "fs-source (notify)",
        "fs-source: mounted",
        &h.dir.join("fs-source-notify.log"),
    );
    assert!(said.contains("READY=1"), "fs-source told systemd: {said:?}");
    assert!(
        said.contains("STATUS=mounted") && said.contains("mirroring to"),
        "ready after the handshake: {said:?}"
    );
    source.terminate(Duration::from_secs(30));
    nvmirror_e2e::lazy_unmount(&mnt);
}
