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
