//! Local access to a daemon's control socket. The daemons run as root on machines with other
//! users, so a control socket lives in a directory only its owner can enter (0700), is itself
//! 0600, and answers only root and the daemon's own user (SO_PEERCRED); a client uses a socket
//! only when the socket and its directory belong to root or to the caller, and trusts its
//! answers only when the process serving it runs as root or as the caller.
//!
//! Shared by both daemons: `fs-source`'s control socket and `fs-dest`'s `fs-dest.sock` follow
//! the same rules.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// The process on the other end of a Unix socket, as the kernel recorded it when the
/// connection was made: what the trust decisions below are taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id (0 when the peer lives in another pid namespace).
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// Why a control socket, its directory or the process behind it is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A system call on the path failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path belongs to another user, who could replace the socket or answer for us.
    #[error("{path} belongs to uid {owner}, not to {}: refusing to use it", trusted_users(*.euid))]
    Owner {
        /// The directory or socket.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        euid: u32,
    },
    /// The path is not what it must be (a symlink where a directory belongs, a file where a
    /// socket belongs).
    #[error("{path} is not a {expected}: refusing to use it")]
    Kind {
        /// The path.
        path: PathBuf,
        /// What it must be.
        expected: &'static str,
    },
    /// The process listening on the socket runs as another user.
    #[error(
        "the process serving {path} runs as uid {uid} (pid {pid}), not as {}: refusing to \
         trust its answers",
        trusted_users(*.euid)
    )]
    Server {
        /// The socket.
        path: PathBuf,
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
        /// Our effective uid.
        euid: u32,
    },
}

impl AccessError {
    /// True when the socket (or its directory) does not exist: nothing serves there, which
    /// callers report differently from a socket they refuse.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AccessError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// True when the caller may not even look at the socket (a non-root user and a root-only
    /// directory): callers add a hint to run as root.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, AccessError::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// Why a connection to a control socket is not served.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The client runs as a user that may not drive this daemon.
    #[error(
        "uid {} (pid {}) may not use this control socket: only {} may",
        .peer.uid,
        .peer.pid,
        trusted_users(*.euid)
    )]
    Stranger {
        /// Who connected.
        peer: Peer,
        /// Our effective uid.
        euid: u32,
    },
    /// The kernel did not say who connected.
    #[error("cannot tell who connected (SO_PEERCRED: {0})")]
    Unknown(io::Error),
}

/// "root", or "root or uid N" for a daemon running as uid N: for messages.
fn trusted_users(euid: u32) -> String {
    if euid == 0 {
        "root".to_string()
    } else {
        format!("root or uid {euid}")
    }
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Root and this process's effective user are the only users a control socket serves and the
/// only owners a client trusts.
pub fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// SO_PEERCRED of a connected Unix socket: who is on the other end.
pub fn peer_of(socket: impl AsFd) -> io::Result<Peer> {
    let fd = socket.as_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor borrowed for the duration of the call; `cred` and
    // `len` are live, writable and `len` holds the size of `cred`, the most SO_PEERCRED writes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::other(format!(
            "SO_PEERCRED returned {len} bytes, not a struct ucred"
        )));
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Server side: the client of an accepted connection, if it may drive this daemon (root or
/// our effective user).
pub fn admit(socket: impl AsFd) -> Result<Peer, Refusal> {
    let peer = peer_of(socket).map_err(Refusal::Unknown)?;
    if trusted_uid(peer.uid) {
        Ok(peer)
    } else {
        Err(Refusal::Stranger { peer, euid: euid() })
    }
}

/// Server side: make `dir` a directory only this user can enter, for control sockets:
/// created 0700 (with its missing parents), or, if it exists, owned by this user and set to
/// 0700 when its mode is another.
pub fn private_dir(dir: &Path) -> Result<(), AccessError> {
    let io = |what, source| AccessError::Io {
        what,
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create", e))?;
    // Through a descriptor of the directory itself (never a symlink), so that what is checked
    // is what gets the mode.
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => AccessError::Kind {
            path: dir.to_path_buf(),
            expected: "directory (a symlink or another file is not accepted)",
        },
        e => io("cannot open", e.into()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io("cannot stat", e.into()))?;
    if st.st_uid != euid() {
        return Err(AccessError::Owner {
            path: dir.to_path_buf(),
            owner: st.st_uid,
            euid: euid(),
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode != 0o700 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(|e| io("cannot set mode 0700 on", e.into()))?;
        tracing::info!(
            "{} was mode {mode:04o}; set to 0700 (only its owner may reach the control socket)",
            dir.display()
        );
    }
    Ok(())
}

/// Server side: a freshly bound socket file gets mode 0600 (whatever the umask made of it), so
/// that only its owner may connect.
pub fn restrict_socket(path: &Path) -> Result<(), AccessError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        AccessError::Io {
            what: "cannot set mode 0600 on",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Client side, before connecting: the socket at `path` is a socket and it and its directory
/// belong to root or to the caller (another user could otherwise put a socket of theirs there).
pub fn check_socket(path: &Path) -> Result<(), AccessError> {
    let owner_ok = |p: &Path, owner: u32| {
        if trusted_uid(owner) {
            Ok(())
        } else {
            Err(AccessError::Owner {
                path: p.to_path_buf(),
                owner,
                euid: euid(),
            })
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The directory the name resolves in: followed if it is a symlink.
        let meta = std::fs::metadata(dir).map_err(|source| AccessError::Io {
            what: "cannot stat",
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(AccessError::Kind {
                path: dir.to_path_buf(),
                expected: "directory",
            });
        }
        owner_ok(dir, meta.uid())?;
    }
    let meta = std::fs::symlink_metadata(path).map_err(|source| AccessError::Io {
        what: "cannot stat",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(AccessError::Kind {
            path: path.to_path_buf(),
            expected: "Unix socket",
        });
    }
    owner_ok(path, meta.uid())
}

/// Client side, after connecting: the process serving `path` runs as root or as the caller.
pub fn check_server(socket: impl AsFd, path: &Path) -> Result<Peer, AccessError> {
    let peer = peer_of(socket).map_err(|source| AccessError::Io {
        what: "cannot tell who serves (SO_PEERCRED)",
        path: path.to_path_buf(),
        source,
    })?;
    if trusted_uid(peer.uid) {
        Ok(peer)
    } else {
        Err(AccessError::Server {
            path: path.to_path_buf(),
            uid: peer.uid,
            pid: peer.pid,
            euid: euid(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_dir_is_made_0700_and_a_socket_pair_trusts_itself() {
        let t = tempfile::tempdir().expect("temp dir");
        let dir = t.path().join("run/nested");
        private_dir(&dir).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&dir).expect("tighten");
        assert_eq!(mode(&dir), 0o700);

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        assert!(matches!(private_dir(&link), Err(AccessError::Kind { .. })));

        let sock = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        restrict_socket(&sock).expect("chmod socket");
        assert_eq!(mode(&sock), 0o600);
        check_socket(&sock).expect("our own socket is trusted");
        let client = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let me = admit(&server).expect("we may drive ourselves");
        assert_eq!(me.uid, euid());
        assert_eq!(me.pid as u32, std::process::id());
        check_server(&client, &sock).expect("we trust ourselves");

        let file = dir.join("plain");
        std::fs::write(&file, b"").expect("write");
        assert!(matches!(check_socket(&file), Err(AccessError::Kind { .. })));
        assert!(check_socket(&dir.join("missing")).is_err_and(|e| e.is_not_found()));
    }
}

/// A hint for an operator who ran a daemon command without root and got a permission error:
/// the daemons mount FUSE, keep every file's owner and mode, use `trusted.*` attributes and
/// root's control sockets, so the bare "Permission denied" of one system call would not say
/// what to do. `None` when running as root or when `message` is not a permission error.
pub fn permission_hint(program: &str, message: &str) -> Option<String> {
    let denied = message.contains("Permission denied")
        || message.contains("Operation not permitted")
        || message.contains("os error 13")
        || message.contains("os error 1)");
    (denied && !rustix::process::geteuid().is_root()).then(|| {
        format!(
            "hint: {program} runs as root (FUSE mounts, file owners and modes, trusted.* \
             attributes, root's control sockets under /run/nvmirror); run it as root, e.g. \
             with sudo"
        )
    })
}

/// What medium holds `path` when it does not survive a reboot or a power cut (tmpfs, ramfs):
/// an NVRAM file there protects acknowledged records against a crash of the daemon only.
pub fn volatile_medium(path: &Path) -> Option<&'static str> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    let st = match rustix::fs::statfs(path) {
        Ok(st) => st,
        // Not made yet: where it will be made.
        Err(_) => rustix::fs::statfs(path.parent()?).ok()?,
    };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 or u32 depending on the target
    match (st.f_type as u64) & 0xffff_ffff {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn volatile_media_are_named() {
        // /dev/shm is tmpfs on Linux; a temp dir under the target dir usually is not.
        if Path::new("/dev/shm").is_dir() {
            assert_eq!(volatile_medium(Path::new("/dev/shm")), Some("tmpfs"));
        }
        assert_eq!(volatile_medium(Path::new("/proc")), None);
    }

    #[test]
    fn only_permission_errors_get_the_root_hint() {
        assert!(permission_hint("fs-source mount", "mounting /m: No such file").is_none());
        let h = permission_hint(
            "fs-source mount",
            "mounting /m: Permission denied (os error 13)",
        );
        assert_eq!(h.is_some(), !rustix::process::geteuid().is_root());
    }
}
