//! The command-line surfaces generated from the clap definitions: man pages, shell
//! completions, and JSON log lines.

use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::{bin, run_with_timeout};

fn out(cmd: &mut Command) -> (bool, String, String) {
    let o = run_with_timeout(cmd, Duration::from_secs(30));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn man_pages_and_completions_come_from_the_command_definitions() {
    for daemon in ["fs-source", "fs-dest"] {
        let (ok, man, err) = out(Command::new(bin(daemon)).arg("man"));
        assert!(ok, "{daemon} man: {err}");
        assert!(
            man.contains(&format!(".TH {daemon} 1")),
            "{daemon} man page: {man}"
        );
        assert!(man.contains("SUBCOMMANDS") || man.contains("mount") || man.contains("serve"));
        for shell in ["bash", "zsh", "fish"] {
            let (ok, script, err) =
                out(Command::new(bin(daemon)).args(["completions", "--shell", shell]));
            assert!(ok, "{daemon} completions {shell}: {err}");
            assert!(
                script.contains(daemon),
                "{daemon} {shell} completion names the command"
            );
        }
    }
}

#[test]
fn log_lines_can_be_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, _, err) = out(Command::new(bin("fs-dest"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--root",
        ])
        .arg(dir.path().join("root"))
        .arg("--nvram")
        .arg(dir.path().join("nvram"))
        .arg("--tls")
        .arg(dir.path().join("no-tls")));
    assert!(!ok, "serve without certificates fails");
    let json_lines: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!json_lines.is_empty(), "some log lines are JSON: {err}");
    for l in json_lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

#[test]
fn a_config_file_sets_options_and_the_command_line_overrides_it() {
    const TEST: &str = "config_file";
    nvmirror_e2e::require_mount!(TEST);
    use nvmirror_e2e::{Harness, HarnessOptions, SourceOptions};
    let mut h = Harness::start(HarnessOptions::new(TEST));
    h.detach_source();
    let config = h.dir.join("fs-source.toml");
    std::fs::write(&config, "policy = \"strict\"\ntimeout_ms = 4321\n").expect("config");
    let mut opts = SourceOptions::new("alpha");
    opts.extra_args = vec!["--config".into(), config.display().to_string()];
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("mount with a config file: {e}"));
    assert_eq!(
        h.status().raw["policy"],
        "strict",
        "the file's policy applies"
    );
    h.detach_source();
    opts.extra_args
        .extend(["--policy".to_string(), "sync".to_string()]);
    h.restart_source(&opts)
        .unwrap_or_else(|e| panic!("mount with a config file and --policy: {e}"));
    assert_eq!(h.status().raw["policy"], "sync", "the command line wins");
    h.detach_source();
    std::fs::write(&config, "bogus_option = 1\n").expect("config");
    let err = match h.restart_source(&opts) {
        Ok(()) => panic!("an unknown key must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--bogus-option"),
        "the refusal names the key: {err}"
    );
}

#[test]
fn status_tells_version_uptime_and_the_last_cp_and_can_watch() {
    const TEST: &str = "status_watch";
    nvmirror_e2e::require_mount!(TEST);
    use nvmirror_e2e::{Harness, HarnessOptions};
    let h = Harness::start(HarnessOptions::new(TEST));
    std::fs::write(h.mnt().join("f"), b"x").expect("write");
    h.cp();
    let s = h.status().raw;
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"), "{s}");
    assert!(s["uptime_seconds"].as_f64().is_some_and(|u| u > 0.0), "{s}");
    assert!(s["last_cp_seconds"].as_f64().is_some(), "a CP ran: {s}");
    assert!(s["last_cp_age_seconds"].as_f64().is_some(), "{s}");
    // --watch prints again and again until stopped.
    let out_path = h.dir.join("watch.out");
    let out = std::fs::File::create(&out_path).expect("watch output");
    let mut child = h
        .fs_source()
        .args(["status", "--watch", "0.2", "--mountpoint"])
        .arg(h.mnt())
        .stdout(out)
        .spawn()
        .expect("fs-source status --watch");
    let printed = |n: usize| {
        std::fs::read_to_string(&out_path)
            .is_ok_and(|t| t.matches("consistency points").count() >= n)
    };
    let ok = nvmirror_e2e::poll_until(Duration::from_secs(10), || printed(3));
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "status --watch printed fewer than 3 reports in 10 s");
}

#[test]
fn an_nvram_file_on_tmpfs_is_warned_about() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("SKIP an_nvram_file_on_tmpfs_is_warned_about: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let nvram = format!("/dev/shm/nvmirror-cli-{}.nvram", std::process::id());
    let (ok, _, err) = out(Command::new(bin("fs-dest"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--nvram",
            &nvram,
            "--root",
        ])
        .arg(dir.path().join("root"))
        .arg("--tls")
        .arg(dir.path().join("no-tls")));
    let _ = std::fs::remove_file(&nvram);
    assert!(!ok, "serve without certificates fails");
    assert!(
        err.contains("is on tmpfs") && err.contains("power cut"),
        "a tmpfs NVRAM is warned about: {err}"
    );
}

#[test]
fn a_permission_error_without_root_hints_at_root() {
    const TEST: &str = "non_root_hint";
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP {TEST}: needs root to run a command as another user");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    // A backing directory and mount point `nobody` may see but not write, as on a real source.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root dir");
    std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
    let (ok2, _, err2) = out(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("fs-source"))
        .args(["mount", "--name", "alpha", "--backing"])
        .arg(&root)
        .arg("--mountpoint")
        .arg(dir.path().join("mnt"))
        .arg("--nvram")
        .arg(root.join("alpha.nvram")));
    assert!(!ok2, "a mount by nobody fails: {err2}");
    assert!(
        err2.contains("hint: fs-source runs as root"),
        "the failure says to run as root: {err2}"
    );
}
