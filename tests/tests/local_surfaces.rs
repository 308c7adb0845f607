//! What other users of the machine can reach (issue 8, deliverable 5). Both daemons run as
//! root: their own files (NVRAM, backlog) are 0600, their control sockets 0600 in root-only
//! directories; a user who is neither root nor the daemon's user cannot drive either daemon,
//! not even when it can reach the socket (the daemon checks SO_PEERCRED); a client trusts only
//! a socket, directory and serving process of root or its own user; files made through the
//! mount keep exact modes although the daemon's umask is 077; `trusted.*` xattrs are listed
//! and readable for root only, as on ext4.
//!
//! Another uid's view is taken from child processes that changed uid before `exec`: the
//! `fs-source`/`fs-dest` clients themselves, and for xattrs a child that makes the system call
//! in a `pre_exec` hook (after std's setgid/setuid) and writes the answer to its stdout.

use nvmirror_e2e::{
    require_mount, run_with_timeout, show_output, wait_until, Harness, HarnessOptions,
    COMMAND_TIMEOUT,
};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// `st_mode & 0o7777` of `path` (not following a symlink).
#[track_caller]
fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[track_caller]
fn assert_mode(path: &Path, expected: u32, what: &str) {
    let mode = mode_of(path);
    assert_eq!(
        mode,
        expected,
        "{what} {} is mode {mode:04o}, expected {expected:04o}",
        path.display()
    );
}

/// The source's control socket in `run_dir` (one mount: one `source-*.sock`).
#[track_caller]
fn source_socket(run_dir: &Path) -> PathBuf {
    let socks: Vec<PathBuf> = fs::read_dir(run_dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", run_dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(
        socks.len(),
        1,
        "expected one control socket in {}: {socks:?}",
        run_dir.display()
    );
    socks[0].clone()
}

/// This process's umask (from /proc: reading it with umask(2) would change it for every
/// thread for a moment).
fn current_umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .expect("Umask: line in /proc/self/status")
}

/// A command run as `uid` (gid `uid`, no supplementary groups) with this test's environment.
fn as_user(mut cmd: Command, uid: u32) -> Command {
    cmd.uid(uid).gid(uid).current_dir("/");
    cmd
}

/// Runs a client command, returns its output (panics only if it hangs).
fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

#[track_caller]
fn assert_fails_saying(out: &Output, what: &str, needles: &[&str]) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        show_output(what, out)
    );
    eprintln!("{what}: {}", text.trim());
    for needle in needles {
        assert!(
            text.contains(needle),
            "{what}: expected {needle:?} in its output: {}",
            show_output(what, out)
        );
    }
}

/// Sets modes for the duration of a test step and puts the old ones back when dropped (also
/// when the test panics).
struct ModeGuard(Vec<(PathBuf, u32)>);

impl ModeGuard {
    fn set(&mut self, path: &Path, mode: u32) {
        let old = mode_of(path);
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
        self.0.push((path.to_path_buf(), old));
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        for (path, mode) in self.0.drain(..).rev() {
            if let Err(e) = fs::set_permissions(&path, fs::Permissions::from_mode(mode)) {
                eprintln!("restoring mode {mode:o} of {}: {e}", path.display());
            }
        }
    }
}

#[test]
fn private_daemon_files_and_exact_modes() {
    const TEST: &str = "private_daemon_files_and_exact_modes";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));

    // NVRAM, backlog and baseline progress: 0600 on both sides.
    let nvram = h.source_nvram("alpha");
    assert_mode(&nvram, 0o600, "source NVRAM");
    for suffix in [".backlog", ".baseline"] {
        let p = PathBuf::from(format!("{}{suffix}", nvram.display()));
        if p.exists() {
            assert_mode(&p, 0o600, suffix);
        }
    }
    assert_mode(&h.dest_nvram(), 0o600, "destination NVRAM");

    // Control sockets: 0600 in 0700 directories.
    assert_mode(&h.run_dir, 0o700, "run directory");
    let sock = source_socket(&h.run_dir);
    assert_mode(&sock, 0o600, "source control socket");
    assert_mode(&h.dest_root, 0o700, "destination root");
    let dest_sock = h.dest_root.join("fs-dest.sock");
    assert!(
        fs::symlink_metadata(&dest_sock).is_ok_and(|m| m.file_type().is_socket()),
        "{} is not a socket",
        dest_sock.display()
    );
    assert_mode(&dest_sock, 0o600, "destination status socket");

    // Files made through the mount get the mode asked for (the caller's umask applied), not
    // one the daemon's umask 077 narrowed.
    let umask = current_umask();
    eprintln!("{TEST}: test umask {umask:04o}");
    let m = h.mnt();
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o777)
        .open(m.join("file"))
        .expect("create file through the mount");
    fs::DirBuilder::new()
        .mode(0o777)
        .create(m.join("dir"))
        .expect("mkdir through the mount");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.join("fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .expect("mkfifo through the mount");
    fs::write(m.join("suid"), b"#!/bin/true\n").expect("write suid");
    fs::set_permissions(m.join("suid"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    let expected = [
        ("file", 0o777 & !umask),
        ("dir", 0o777 & !umask),
        ("fifo", 0o666 & !umask),
        ("suid", 0o4755),
    ];
    h.cp();
    for (name, mode) in expected {
        assert_mode(&m.join(name), mode, "through the mount:");
        assert_mode(&h.backing().join(name), mode, "backing volume:");
        assert_mode(&h.image().join(name), mode, "image:");
    }
}

#[test]
fn other_users_cannot_drive_either_daemon() {
    const TEST: &str = "other_users_cannot_drive_either_daemon";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt().to_path_buf();
    let sock = source_socket(&h.run_dir);
    let dest_sock = h.dest_root.join("fs-dest.sock");

    let source_cmd = |args: &[&str]| {
        let mut c = as_user(h.fs_source(), NOBODY);
        c.args(args).arg("--mountpoint").arg(&m);
        c
    };
    let dest_cmd = |args: &[&str]| {
        let mut c = as_user(h.fs_dest(), NOBODY);
        c.args(args).arg("--root").arg(&h.dest_root);
        c
    };

    // The sockets' directories are root-only: the clients cannot even reach them.
    let run_dir = h.run_dir.display().to_string();
    for args in [&["status"][..], &["cp"][..]] {
        let out = run(&mut source_cmd(args));
        assert_fails_saying(
            &out,
            &format!("fs-source {args:?} as uid {NOBODY}"),
            &[&run_dir, "Permission denied"],
        );
    }
    let out = run(&mut dest_cmd(&["status"]));
    assert_fails_saying(
        &out,
        "fs-dest status as uid 65534",
        &[&h.dest_root.display().to_string(), "Permission denied"],
    );

    // Opened up (as a careless administrator might), the daemons still refuse uid 65534:
    // they check who connected (SO_PEERCRED), say why, and log it.
    {
        let mut open = ModeGuard(Vec::new());
        open.set(&h.run_dir, 0o755);
        open.set(&sock, 0o666);
        open.set(&h.dest_root, 0o755);
        open.set(&dest_sock, 0o666);

        for args in [&["status"][..], &["cp"][..], &["verify"][..]] {
            let out = run(&mut source_cmd(args));
            assert_fails_saying(
                &out,
                &format!("fs-source {args:?} as uid {NOBODY} on an open socket"),
                &["refused", "uid 65534"],
            );
        }
        let source_log = h.log_dir.join("fs-source-alpha.log");
        wait_until(
            "the source logs the refused connection",
            Duration::from_secs(10),
            || {
                fs::read_to_string(&source_log)
                    .is_ok_and(|l| l.contains("refused a connection from uid 65534"))
            },
        );

        let out = run(&mut dest_cmd(&["status"]));
        assert_fails_saying(
            &out,
            "fs-dest status as uid 65534 on an open socket",
            &["refused", "uid 65534"],
        );
        let mut promote = dest_cmd(&["promote"]);
        promote.args(["--source", "alpha"]);
        let out = run(&mut promote);
        assert_fails_saying(
            &out,
            "fs-dest promote as uid 65534 on an open socket",
            &["refused", "uid 65534"],
        );
        let dest_log = h.log_dir.join("fs-dest.log");
        wait_until(
            "the destination logs the refused connection",
            Duration::from_secs(10),
            || {
                fs::read_to_string(&dest_log)
                    .is_ok_and(|l| l.contains("refused a connection from uid 65534"))
            },
        );
    }

    // Nothing happened on their behalf, and root is still served.
    assert!(
        !h.dest_root.join("alpha/PROMOTED").exists(),
        "uid {NOBODY} promoted the source"
    );
    assert_mode(&h.run_dir, 0o700, "run directory (restored)");
    h.cp();
    let _ = h.dest_status();
}

/// A process running as `uid` listening on a Unix socket at `path` (bound and listening in a
/// `pre_exec` hook, then `sleep`ing with the socket open). Killed when dropped.
struct ListenerAs(Child);

impl ListenerAs {
    fn start(uid: u32, path: &Path) -> ListenerAs {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain data; all zeros is a valid (empty) address.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let mut cmd = as_user(Command::new("sleep"), uid);
        cmd.arg("600").stdin(Stdio::null());
        // SAFETY: the hook runs in the forked child; it only makes system calls (socket, bind,
        // listen) on memory prepared before the fork, so it takes no lock another thread held.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0
                    || libc::bind(
                        fd,
                        (&addr as *const libc::sockaddr_un).cast(),
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    ) != 0
                    || libc::listen(fd, 16) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("listening on {} as uid {uid}: {e}", path.display()));
        ListenerAs(child)
    }
}

impl Drop for ListenerAs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn clients_trust_only_root_or_own_sockets() {
    const TEST: &str = "clients_trust_only_root_or_own_sockets";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt().to_path_buf();
    let name = source_socket(&h.run_dir)
        .file_name()
        .expect("socket name")
        .to_owned();

    // A run directory and a destination root (root's, 0755) where uid 65534 listens, under the
    // names the clients look for.
    let fake_run = h.dir.join("fake-run");
    let fake_root = h.dir.join("fake-root");
    for d in [&fake_run, &fake_root] {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(d)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    let fake_sock = fake_run.join(&name);
    let fake_dest_sock = fake_root.join("fs-dest.sock");
    let _listener = {
        let mut open = ModeGuard(Vec::new());
        open.set(&fake_run, 0o777);
        ListenerAs::start(NOBODY, &fake_sock)
    };
    fs::hard_link(&fake_sock, &fake_dest_sock).expect("second name of the socket");
    let source_status = || {
        let mut c = h.fs_source();
        c.env("NVMIRROR_RUN_DIR", &fake_run)
            .args(["status", "--mountpoint"])
            .arg(&m);
        run(&mut c)
    };
    let dest_status = || {
        let mut c = h.fs_dest();
        c.args(["status", "--root"]).arg(&fake_root);
        run(&mut c)
    };
    let sock_shown = fake_sock.display().to_string();
    let dest_sock_shown = fake_dest_sock.display().to_string();

    // The socket file belongs to uid 65534.
    assert_fails_saying(
        &source_status(),
        "fs-source status on a socket of uid 65534",
        &[&sock_shown, "belongs to uid 65534"],
    );
    assert_fails_saying(
        &dest_status(),
        "fs-dest status on a socket of uid 65534",
        &[&dest_sock_shown, "belongs to uid 65534"],
    );

    // The file is root's now, but the process behind it is still uid 65534's.
    rustix::fs::chownat(
        rustix::fs::CWD,
        fake_sock.as_path(),
        Some(rustix::process::Uid::ROOT),
        Some(rustix::process::Gid::ROOT),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("chown the socket to root");
    assert_fails_saying(
        &source_status(),
        "fs-source status on a socket served by uid 65534",
        &[&sock_shown, "runs as uid 65534"],
    );
    assert_fails_saying(
        &dest_status(),
        "fs-dest status on a socket served by uid 65534",
        &[&dest_sock_shown, "runs as uid 65534"],
    );

    // The directory belongs to uid 65534 (who could swap the socket at will).
    std::os::unix::fs::chown(&fake_run, Some(NOBODY), Some(NOBODY)).expect("chown fake-run");
    assert_fails_saying(
        &source_status(),
        "fs-source status in a directory of uid 65534",
        &[&fake_run.display().to_string(), "belongs to uid 65534"],
    );

    // The real socket still answers root.
    let _ = h.status();
}

/// One xattr system call made by a child running as `uid`.
enum XattrCall {
    /// llistxattr: stdout gets the size answered for a 0-byte buffer (8 bytes, native endian)
    /// followed by the list.
    List,
    /// lgetxattr: stdout gets the value.
    Get(&'static str),
    /// lsetxattr (value "v").
    Set(&'static str),
    /// lremovexattr.
    Remove(&'static str),
}

/// Makes `call` on `path` as `uid` in a child (the system call runs in a `pre_exec` hook, after
/// std switched to `uid`); returns what it wrote, or the errno it failed with.
fn xattr_as(uid: u32, call: XattrCall, path: &Path) -> Result<Vec<u8>, i32> {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let name = match &call {
        XattrCall::List => CString::default(),
        XattrCall::Get(n) | XattrCall::Set(n) | XattrCall::Remove(n) => {
            CString::new(*n).expect("name without NUL")
        }
    };
    let kind = match call {
        XattrCall::List => 0,
        XattrCall::Get(_) => 1,
        XattrCall::Set(_) => 2,
        XattrCall::Remove(_) => 3,
    };
    let mut cmd = as_user(Command::new("true"), uid);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the hook runs in the forked child; it only makes system calls (xattr calls,
    // write) on memory prepared before the fork or on its own stack, so it takes no lock
    // another thread held.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 8192];
            let (p, n) = (c_path.as_ptr(), name.as_ptr());
            let mut out: &[u8] = &[];
            let mut probe = [0u8; 8];
            let r = match kind {
                0 => {
                    let size = libc::llistxattr(p, std::ptr::null_mut(), 0);
                    if size < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    probe = (size as u64).to_ne_bytes();
                    libc::llistxattr(p, buf.as_mut_ptr().cast(), buf.len())
                }
                1 => libc::lgetxattr(p, n, buf.as_mut_ptr().cast(), buf.len()),
                2 => libc::lsetxattr(p, n, b"v".as_ptr().cast(), 1, 0) as isize,
                _ => libc::lremovexattr(p, n) as isize,
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            if kind == 0 {
                libc::write(1, probe.as_ptr().cast(), probe.len());
            }
            if kind <= 1 {
                out = &buf[..r as usize];
            }
            libc::write(1, out.as_ptr().cast(), out.len());
            Ok(())
        });
    }
    // `output` waits for the hook: bounded, in case the mount hangs.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(out)) => Ok(out.stdout),
        Ok(Err(e)) => Err(e
            .raw_os_error()
            .unwrap_or_else(|| panic!("xattr child as uid {uid}: {e}"))),
        Err(_) => panic!(
            "xattr call on {} as uid {uid} did not finish within {COMMAND_TIMEOUT:?}",
            path.display()
        ),
    }
}

fn names(list: &[u8]) -> Vec<String> {
    list.split(|c| *c == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn trusted_xattrs_are_for_root_only() {
    const TEST: &str = "trusted_xattrs_are_for_root_only";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let f = h.mnt().join("f");
    fs::write(&f, b"x").expect("write f");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod f");
    for (name, value) in [("trusted.x", b"secret"), ("user.y", b"public")] {
        rustix::fs::lsetxattr(&f, name, value, rustix::fs::XattrFlags::empty())
            .unwrap_or_else(|e| panic!("root setxattr {name} through the mount: {e}"));
    }

    // Root sees and reads both.
    let mut buf = vec![0u8; 8192];
    let n = rustix::fs::llistxattr(&f, &mut buf[..]).expect("root listxattr");
    let root_names = names(&buf[..n]);
    for name in ["trusted.x", "user.y"] {
        assert!(
            root_names.iter().any(|x| x == name),
            "root's listxattr lacks {name}: {root_names:?}"
        );
    }
    let n = rustix::fs::lgetxattr(&f, "trusted.x", &mut buf[..]).expect("root getxattr");
    assert_eq!(&buf[..n], b"secret");

    // uid 65534 sees user.y only (and the size answered for an empty buffer fits that list).
    let out = xattr_as(NOBODY, XattrCall::List, &f)
        .unwrap_or_else(|e| panic!("listxattr as uid {NOBODY}: errno {e}"));
    assert!(out.len() >= 8, "listxattr child wrote {out:?}");
    let (probe, list) = out.split_at(8);
    let probe = u64::from_ne_bytes(probe.try_into().expect("8 bytes"));
    let nobody_names = names(list);
    assert!(
        nobody_names.iter().any(|x| x == "user.y"),
        "uid {NOBODY}'s listxattr lacks user.y: {nobody_names:?}"
    );
    assert!(
        !nobody_names.iter().any(|x| x.starts_with("trusted.")),
        "uid {NOBODY}'s listxattr shows trusted names: {nobody_names:?}"
    );
    assert_eq!(
        probe,
        list.len() as u64,
        "listxattr size for uid {NOBODY} does not match its list {nobody_names:?}"
    );
    assert_eq!(
        xattr_as(NOBODY, XattrCall::Get("user.y"), &f),
        Ok(b"public".to_vec())
    );

    // Reading trusted.x: ENODATA; writing or removing trusted.*: EPERM (as on ext4).
    assert_eq!(
        xattr_as(NOBODY, XattrCall::Get("trusted.x"), &f),
        Err(libc::ENODATA),
        "getxattr trusted.x as uid {NOBODY}"
    );
    assert_eq!(
        xattr_as(NOBODY, XattrCall::Set("trusted.z"), &f),
        Err(libc::EPERM),
        "setxattr trusted.z as uid {NOBODY}"
    );
    assert_eq!(
        xattr_as(NOBODY, XattrCall::Remove("trusted.x"), &f),
        Err(libc::EPERM),
        "removexattr trusted.x as uid {NOBODY}"
    );

    // Nothing changed: root still reads trusted.x, on the mount and on the backing volume.
    let n = rustix::fs::lgetxattr(&f, "trusted.x", &mut buf[..]).expect("root getxattr");
    assert_eq!(&buf[..n], b"secret");
    let n = rustix::fs::lgetxattr(h.backing().join("f"), "trusted.x", &mut buf[..])
        .expect("getxattr on the backing volume");
    assert_eq!(&buf[..n], b"secret");
    assert!(rustix::fs::lgetxattr(&f, "trusted.z", &mut buf[..]).is_err());
    h.cp();
}
