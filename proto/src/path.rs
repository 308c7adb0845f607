//! The rules for the relative paths records carry, checked before anything is logged or
//! applied: relative, no `.` or `..` component, no empty component, no NUL, bounded length.
//! The empty path names the volume root. Confinement against symlinks is enforced when the
//! path is resolved (see [`crate::apply`]); this module only checks the spelling.

use thiserror::Error;

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// Why a path is refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Starts with `/`.
    #[error("path {0:?} is absolute")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} climbs out with '..'")]
    DotDot(String),
    /// Has a `.` or empty component (`a//b`, `a/./b`, trailing `/`).
    #[error("path {0:?} has an empty or '.' component")]
    NotCanonical(String),
    /// Contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Too long overall or in one component.
    #[error("path {0:?} is too long")]
    TooLong(String),
}

fn show(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.len() > 120 {
        format!("{}...", &s[..s.floor_char_boundary(120)])
    } else {
        s.into_owned()
    }
}

/// Check a record path. The empty path (the root) is valid.
pub fn validate(path: &[u8]) -> Result<(), PathError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(show(path)));
    }
    if path.contains(&0) {
        return Err(PathError::Nul(show(path)));
    }
    if path[0] == b'/' {
        return Err(PathError::Absolute(show(path)));
    }
    for c in path.split(|&b| b == b'/') {
        match c {
            b".." => return Err(PathError::DotDot(show(path))),
            b"" | b"." => return Err(PathError::NotCanonical(show(path))),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::TooLong(show(path))),
            _ => {}
        }
    }
    Ok(())
}

/// Join a parent path and a name (`""` + `a` = `a`, `a` + `b` = `a/b`).
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    if !parent.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Whether `p` lies strictly beneath directory `dir` (the root, `""`, holds everything).
pub fn is_beneath(p: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/')
}

/// Split into (parent, last component); the root has no parent.
pub fn split_last(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.is_empty() {
        return None;
    }
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => Some((&path[..i], &path[i + 1..])),
        None => Some((&[], path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        for p in [
            &b""[..],
            b"a",
            b"a/b/c",
            b".hidden/x",
            b"a..b",
            b"...",
            b"\xff\xfe",
        ] {
            validate(p).unwrap();
        }
    }

    #[test]
    fn refuses_escapes_and_odd_spellings() {
        for p in [
            &b"/etc/passwd"[..],
            b"..",
            b"a/../../b",
            b"a//b",
            b"./a",
            b"a/",
            b"a\0b",
            b"a/./b",
        ] {
            assert!(validate(p).is_err(), "{:?}", String::from_utf8_lossy(p));
        }
        assert!(validate(&vec![b'a'; 256]).is_err());
        assert!(validate(&vec![b'a'; 5000]).is_err());
    }

    #[test]
    fn join_and_split_are_inverse() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        assert_eq!(split_last(b"a/b/c"), Some((&b"a/b"[..], &b"c"[..])));
        assert_eq!(split_last(b"c"), Some((&b""[..], &b"c"[..])));
        assert_eq!(split_last(b""), None);
    }
}
