//! Configuration files for the daemons: a TOML table whose keys are the long options of the
//! subcommand it configures (`partition_size` or `partition-size`, without the dashes), turned
//! into command-line arguments placed *before* the real ones, so that the command line
//! overrides the file (clap keeps the last value of an option).
//!
//! ```toml
//! dest = "10.0.0.1:7443"
//! name = "alpha"
//! policy = "strict"
//! force_baseline = false   # booleans are flags: true adds `--force-baseline`
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a configuration file could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML, or a value has a shape no option takes.
    #[error("config file {path}: {reason}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A byte count as an operator writes it on the command line or in a config file: `67108864`,
/// `64K`, `64M`, `1G` (binary multiples). For clap's `value_parser`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1usize << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 67108864, 64M)"))
}

/// The arguments the options in `path` stand for.
pub fn args_from_file(path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    args_from_str(&text).map_err(|reason| ConfigError::Bad {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`args_from_file`] on the text of a file.
pub fn args_from_str(text: &str) -> Result<Vec<OsString>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Vec::new();
    for (key, value) in table {
        if key == "config" {
            return Err("a config file cannot name another one".into());
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let mut push = |v: &toml::Value| -> Result<(), String> {
            match v {
                toml::Value::String(s) => {
                    out.push(flag.clone().into());
                    out.push(s.into());
                }
                toml::Value::Integer(i) => {
                    out.push(flag.clone().into());
                    out.push(i.to_string().into());
                }
                toml::Value::Float(f) => {
                    out.push(flag.clone().into());
                    out.push(f.to_string().into());
                }
                toml::Value::Boolean(true) => out.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                other => {
                    return Err(format!(
                        "{key}: a {} is not an option value",
                        other.type_str()
                    ))
                }
            }
            Ok(())
        };
        match &value {
            toml::Value::Array(items) => {
                for v in items {
                    push(v)?;
                }
            }
            v => push(v)?,
        }
    }
    Ok(out)
}

/// The command line with the options of a configuration file put in front of the
/// subcommand's own: `args` is the whole command line (program name first); when its first
/// argument is `subcommand`, the file named by `--config FILE` (or `default`, when it exists)
/// is read. Other command lines are returned as they are.
pub fn with_config_file(
    args: Vec<OsString>,
    subcommand: &str,
    default: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    if args.get(1).and_then(|a| a.to_str()) != Some(subcommand) {
        return Ok(args);
    }
    let mut file = None;
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => file = it.next().map(PathBuf::from),
            Some(s) if s.starts_with("--config=") => file = Some(PathBuf::from(&s[9..])),
            _ => {}
        }
    }
    let file = match file {
        Some(f) => f,
        None if default.exists() => default.to_path_buf(),
        None => return Ok(args),
    };
    let mut out: Vec<OsString> = args[..2].to_vec();
    out.extend(args_from_file(&file)?);
    out.extend(args[2..].iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("M").is_err() && parse_size("1T").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn keys_become_options_and_the_command_line_comes_last() {
        let a = args_from_str(
            "dest = \"10.0.0.1:7443\"\npartition_size = 65536\nforce_baseline = true\nquiet = false\nsan = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let a: Vec<String> = a.into_iter().map(|s| s.into_string().unwrap()).collect();
        assert!(
            a.windows(2).any(|w| w == ["--dest", "10.0.0.1:7443"]),
            "{a:?}"
        );
        assert!(
            a.windows(2).any(|w| w == ["--partition-size", "65536"]),
            "{a:?}"
        );
        assert!(a.contains(&"--force-baseline".to_string()) && !a.iter().any(|x| x == "--quiet"));
        assert_eq!(a.iter().filter(|x| *x == "--san").count(), 2);
        assert!(args_from_str("x = { y = 1 }").is_err());
        assert!(args_from_str("not toml").is_err());
        assert!(args_from_str("config = \"/etc/x\"").is_err());

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "name = \"alpha\"\n").unwrap();
        let argv: Vec<OsString> = [
            "fs-source",
            "mount",
            "--config",
            f.to_str().unwrap(),
            "--name",
            "beta",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let got = with_config_file(argv, "mount", Path::new("/nonexistent")).unwrap();
        let got: Vec<String> = got.into_iter().map(|s| s.into_string().unwrap()).collect();
        assert_eq!(&got[..4], ["fs-source", "mount", "--name", "alpha"]);
        assert_eq!(
            got.last().unwrap(),
            "beta",
            "the command line comes after the file"
        );
        let other: Vec<OsString> = ["fs-source", "status"].iter().map(OsString::from).collect();
        assert_eq!(with_config_file(other.clone(), "mount", &f).unwrap(), other);
    }
}
