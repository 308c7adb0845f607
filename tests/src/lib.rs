//! The end-to-end harness: real `fs-dest` and `fs-source` processes, a real FUSE mount.
//!
//! Every test builds a [`Harness`]: a temp dir with certificates (`fs-dest certs init` +
//! `certs issue`), a running `fs-dest serve` on 127.0.0.1 (port chosen by the kernel) and a
//! running `fs-source mount`. Dropping the harness stops everything, also when the test panics:
//! the source gets SIGTERM, a bounded wait, then a lazy unmount and SIGKILL; the destination
//! gets SIGCONT (in case a test stopped it), SIGTERM and SIGKILL. Each daemon's stderr (and its
//! stdout after the ready line) goes to a log file in the temp dir; when the test fails, the
//! logs are printed, and on success nothing is.
//!
//! The daemon binaries are not built by the tests: build them first
//! (`cargo build --workspace --bins`, which `tests/run` does). They are looked up in
//! `$NVMIRROR_BIN_DIR`, else next to the test binary (`<target>/<profile>/`, whatever
//! `CARGO_TARGET_DIR` and profile are in use).
//!
//! Waiting is done with [`wait_until`], which polls a condition with a deadline: no test
//! sleeps in place of synchronisation.

pub mod fleet;
pub mod netns;
pub mod tree;
pub mod workload;

pub use tree::{
    assert_trees_equal, assert_trees_equal_named, diff_trees, mtime_differences, mtimes,
};

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a daemon may take to print its ready line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `fs-source cp` / `status` and the certificate commands may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon gets to exit after SIGTERM before it is killed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Preconditions

/// True when this process can mount FUSE filesystems (root, with `/dev/fuse`). When it cannot,
/// prints why; the caller then skips the test. Running as root without `/dev/fuse` is a broken
/// machine, not a reason to skip: that panics.
pub fn can_mount(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root (FUSE mounts, chown, other uids); run as root");
        return false;
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "{test}: running as root but /dev/fuse is missing (modprobe fuse?)"
    );
    true
}

/// Returns from the calling test (skipping it, with the reason printed) unless FUSE mounts are
/// possible here.
#[macro_export]
macro_rules! require_mount {
    ($test:expr) => {
        if !$crate::can_mount($test) {
            return;
        }
    };
}

/// The directory holding `fs-source` and `fs-dest`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NVMIRROR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // <target>/<profile>/deps/<test binary>  →  <target>/<profile>/
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent dir");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    profile_dir.to_path_buf()
}

/// Path of one of the daemon binaries; panics with a hint if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build the daemons first (`cargo build --workspace --bins`, or `tests/run`), \
         or set NVMIRROR_BIN_DIR",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------------
// Waiting and running commands

/// Polls `condition` every few milliseconds until it is true; panics naming `what` if it is not
/// true within `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    if !poll_until(timeout, &mut condition) {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// Polls `condition` until it is true (returns true) or `timeout` passes (returns false).
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs `cmd` to completion with piped stdout/stderr, killing it if it takes longer than
/// `timeout` (then panics, with what it printed).
#[track_caller]
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{shown} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
            String::from_utf8_lossy(&stderr.join().unwrap_or_default())
        );
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` and panics (with its output) unless it exits 0; returns its stdout.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "{shown} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Randomness with a printed seed

/// A small deterministic generator (splitmix64). Every test that makes random choices creates
/// one with [`Rng::from_env`], which prints the seed so that a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seed from `NVMIRROR_TEST_SEED` if set, else from the clock; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = match std::env::var("NVMIRROR_TEST_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("NVMIRROR_TEST_SEED={s:?} is not a u64")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64,
        };
        eprintln!("{test}: random seed {seed} (replay with NVMIRROR_TEST_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Daemons

/// A running daemon whose output goes to a log file.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stderr to `log`, waits until it prints a stdout line starting with
    /// `ready_prefix`, and returns the daemon and the rest of that line. Later stdout lines are
    /// appended to the log. If the daemon exits or stays silent past `timeout`, returns an error
    /// message that includes its log.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        log: &Path,
        ready_prefix: &str,
        timeout: Duration,
    ) -> Result<(Daemon, String), SpawnFailure> {
        let fail = |message: String| SpawnFailure {
            exit: None,
            message,
        };
        let log_file = File::create(log).map_err(|e| fail(format!("{}: {e}", log.display())))?;
        let shown = format!("{cmd:?}");
        writeln!(&log_file, "$ {shown}").ok();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone().map_err(|e| fail(e.to_string()))?)
            .spawn()
            .map_err(|e| fail(format!("cannot start {shown}: {e}")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let prefix = ready_prefix.to_string();
        let mut log_out = log_file;
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                writeln!(log_out, "[stdout] {line}").ok();
                if line.starts_with(&prefix) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line[prefix.len()..].trim().to_string());
                    }
                }
            }
        });
        let mut daemon = Daemon {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(rest) => return Ok((daemon, rest)),
                Err(e) => {
                    if e == mpsc::RecvTimeoutError::Disconnected {
                        // stdout closed without the ready line: the daemon is exiting.
                        daemon.wait_timeout(deadline.saturating_duration_since(Instant::now()));
                    }
                    if let Some(status) = daemon.try_wait() {
                        // Give the reader a moment to copy the last stdout lines.
                        let late = rx.recv_timeout(Duration::from_millis(200)).ok();
                        if let Some(rest) = late {
                            return Ok((daemon, rest));
                        }
                        return Err(SpawnFailure {
                            exit: Some(status),
                            message: format!(
                                "{name} exited with {status} before printing {ready_prefix:?}\n{}",
                                read_log(log)
                            ),
                        });
                    }
                    if Instant::now() >= deadline {
                        let log_text = read_log(log);
                        daemon.kill_now();
                        return Err(fail(format!(
                            "{name} did not print {ready_prefix:?} within {timeout:?}\n{log_text}"
                        )));
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned (and have not reaped) and a valid signal number.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// SIGTERM, then SIGKILL if it does not exit within `timeout`. Returns the exit status
    /// after SIGTERM, or `None` if it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let status = self.wait_timeout(timeout);
        if status.is_none() {
            self.kill_now();
        }
        status
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.signal(libc::SIGCONT);
            self.terminate(SHUTDOWN_TIMEOUT);
        }
    }
}

/// A daemon that did not get ready.
#[derive(Debug)]
pub struct SpawnFailure {
    /// Its exit status if it exited by itself (`None`: it could not start, or hung and was
    /// killed).
    pub exit: Option<ExitStatus>,
    /// What happened, with the daemon's log.
    pub message: String,
}

impl std::fmt::Display for SpawnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A `fs-source mount` that did not mount.
#[derive(Debug)]
pub struct MountFailure {
    pub spawn: SpawnFailure,
    /// The mount point was mounted after the failure (the harness then unmounted it).
    pub left_mounted: bool,
    /// What the daemon itself wrote (its log without the harness's command line).
    pub daemon_output: String,
}

impl std::fmt::Display for MountFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.spawn)?;
        if self.left_mounted {
            write!(f, "\n(and it left its mount point mounted)")?;
        }
        Ok(())
    }
}

/// The text of a daemon's log without the `$ command` line the harness writes first.
pub fn daemon_output(log: &Path) -> String {
    read_log(log)
        .lines()
        .filter(|l| !l.starts_with("$ "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// True if `path` is a mount point listed in /proc/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let target = path.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(target.as_str()))
}

/// Detaches a mount (like `umount -l`), ignoring "not mounted".
pub fn lazy_unmount(path: &Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
}

/// A running `fs-source mount`.
pub struct SourceMount {
    pub daemon: Daemon,
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub name: String,
}

impl SourceMount {
    /// Stops the source the way an operator does: SIGTERM, which must unmount and exit 0.
    /// Returns the exit status (`None` if it had to be killed).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let status = self.daemon.terminate(SHUTDOWN_TIMEOUT);
        self.cleanup_mount();
        status
    }

    fn cleanup_mount(&mut self) {
        if is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
    }
}

impl Drop for SourceMount {
    fn drop(&mut self) {
        if self.daemon.try_wait().is_none() {
            self.daemon.signal(libc::SIGTERM);
            if self.daemon.wait_timeout(SHUTDOWN_TIMEOUT).is_none() {
                eprintln!(
                    "{}: did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; unmounting and killing",
                    self.daemon.name
                );
                lazy_unmount(&self.mountpoint);
                self.daemon.kill_now();
            }
        }
        self.cleanup_mount();
    }
}

/// Options of one `fs-source mount`.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub name: String,
    pub partitions: Option<u32>,
    pub partition_size_bytes: Option<u64>,
    pub policy: Option<String>,
    /// TLS dir to use instead of the harness's (for bad-certificate tests).
    pub tls_dir: Option<PathBuf>,
    /// Backing dir to use instead of `backing-NAME` (a wrong `--backing`).
    pub backing: Option<PathBuf>,
    /// More arguments for `fs-source mount`.
    pub extra_args: Vec<String>,
}

impl SourceOptions {
    pub fn new(name: &str) -> SourceOptions {
        SourceOptions {
            name: name.to_string(),
            partitions: None,
            partition_size_bytes: None,
            policy: None,
            tls_dir: None,
            backing: None,
            extra_args: Vec::new(),
        }
    }
}

/// What a test asks of the harness.
#[derive(Clone, Debug)]
pub struct HarnessOptions {
    pub test: String,
    pub source: SourceOptions,
    /// `fs-dest serve --listen` (default `127.0.0.1:0`).
    pub listen: String,
    /// More arguments for `fs-dest serve` (also when it is restarted).
    pub dest_args: Vec<String>,
    /// `fs-dest serve --root` to use instead of `<temp>/dest-root` (an image on another
    /// filesystem); created if missing, never removed by the harness.
    pub dest_root: Option<PathBuf>,
}

impl HarnessOptions {
    pub fn new(test: &str) -> HarnessOptions {
        HarnessOptions {
            test: test.to_string(),
            source: SourceOptions::new("alpha"),
            listen: "127.0.0.1:0".into(),
            dest_args: Vec::new(),
            dest_root: None,
        }
    }

    /// Puts the destination's `--root` at `path` (see the field of that name).
    pub fn dest_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.dest_root = Some(path.into());
        self
    }

    /// Adds arguments to `fs-dest serve`.
    pub fn dest_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.dest_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds arguments to the source's `fs-source mount`.
    pub fn source_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.source
            .extra_args
            .extend(args.into_iter().map(Into::into));
        self
    }

    pub fn listen(mut self, addr: &str) -> HarnessOptions {
        self.listen = addr.to_string();
        self
    }

    pub fn partition_size_bytes(mut self, bytes: u64) -> HarnessOptions {
        self.source.partition_size_bytes = Some(bytes);
        self
    }

    pub fn partitions(mut self, n: u32) -> HarnessOptions {
        self.source.partitions = Some(n);
        self
    }

    pub fn policy(mut self, policy: &str) -> HarnessOptions {
        self.source.policy = Some(policy.to_string());
        self
    }
}

/// One destination with one mounted source, in a temp dir. See the module docs.
pub struct Harness {
    /// Declared first so it is dropped first: the source unmounts before the destination stops.
    pub source: Option<SourceMount>,
    pub dest: Option<Daemon>,
    /// The address `fs-dest` listens on.
    pub dest_addr: String,
    /// What `fs-dest serve --listen` is given.
    pub listen: String,
    pub test: String,
    /// The temp dir holding everything below.
    pub dir: PathBuf,
    /// fs-dest --root
    pub dest_root: PathBuf,
    /// fs-dest certs dir (CA, destination and every issued source certificate).
    pub tls_dir: PathBuf,
    /// NVMIRROR_RUN_DIR for every command of this test.
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    /// More arguments for `fs-dest serve` ([`HarnessOptions::dest_args`]).
    pub dest_args: Vec<String>,
    temp: Option<tempfile::TempDir>,
}

impl Harness {
    /// Certificates, `fs-dest serve`, and `fs-source mount` with `options.source`.
    pub fn start(options: HarnessOptions) -> Harness {
        let mut h = Harness::start_dest_only(&options);
        let source = h
            .mount_source(&options.source)
            .unwrap_or_else(|e| panic!("fs-source did not mount: {e}"));
        h.source = Some(source);
        h
    }

    /// The backing dir `mount_source` uses for source `name` (to fill it before mounting).
    pub fn backing_of(&self, name: &str) -> PathBuf {
        let b = self.dir.join(format!("backing-{name}"));
        fs::create_dir_all(&b).expect("create backing dir");
        b
    }

    /// Certificates and `fs-dest serve`, no source yet (`mount_source` it, then set
    /// `source`).
    pub fn start_dest_only(options: &HarnessOptions) -> Harness {
        let base = std::env::var_os("NVMIRROR_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let temp = tempfile::Builder::new()
            .prefix(&format!("nvmirror-e2e-{}-", options.test))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()));
        let dir = temp.path().to_path_buf();
        // Other uids must be able to reach the mount point inside.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let mut h = Harness {
            source: None,
            dest: None,
            dest_addr: String::new(),
            listen: options.listen.clone(),
            test: options.test.clone(),
            dest_root: options
                .dest_root
                .clone()
                .unwrap_or_else(|| dir.join("dest-root")),
            tls_dir: dir.join("tls"),
            run_dir: dir.join("run"),
            log_dir: dir.join("logs"),
            dest_args: options.dest_args.clone(),
            dir,
            temp: Some(temp),
        };
        for d in [&h.dest_root, &h.tls_dir, &h.run_dir, &h.log_dir] {
            fs::create_dir_all(d).expect("create harness dir");
        }
        h.certs_init(&h.tls_dir.clone());
        h.certs_issue(&h.tls_dir.clone(), &options.source.name);
        h.start_dest();
        h
    }

    /// `fs-dest certs init --dir DIR`.
    pub fn certs_init(&self, dir: &Path) {
        run_ok(self.fs_dest().args(["certs", "init", "--dir"]).arg(dir));
    }

    /// `fs-dest certs issue --dir DIR --name NAME`.
    pub fn certs_issue(&self, dir: &Path, name: &str) {
        run_ok(
            self.fs_dest()
                .args(["certs", "issue", "--dir"])
                .arg(dir)
                .args(["--name", name]),
        );
    }

    /// A `fs-dest` command with this test's environment.
    pub fn fs_dest(&self) -> Command {
        let mut cmd = Command::new(bin("fs-dest"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir);
        cmd
    }

    /// A `fs-source` command with this test's environment.
    pub fn fs_source(&self) -> Command {
        let mut cmd = Command::new(bin("fs-source"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir);
        cmd
    }

    fn start_dest(&mut self) {
        let mut cmd = self.fs_dest();
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.dest_root)
            .arg("--listen")
            .arg(&self.listen)
            .arg("--nvram")
            .arg(self.dir.join("dest.nvram"))
            .arg("--tls")
            .arg(&self.tls_dir)
            .args(&self.dest_args);
        let (daemon, addr) = Daemon::spawn(
            "fs-dest",
            &mut cmd,
            &self.log_dir.join("fs-dest.log"),
            "fs-dest: listening on ",
            STARTUP_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("fs-dest did not start: {e}"));
        self.dest_addr = addr;
        self.dest = Some(daemon);
    }

    /// Starts `fs-source mount` for `opts` against this destination, with backing dir, mount
    /// point and NVRAM file named after the source, and waits until it reports the mount live.
    /// Returns the daemon's log and exit status as an error if it does not mount.
    pub fn mount_source(&self, opts: &SourceOptions) -> Result<SourceMount, MountFailure> {
        self.mount_source_in(opts, &self.dir)
    }

    /// [`Harness::mount_source`] with the source's backing dir, mount point, NVRAM file and log
    /// inside `dir`.
    pub fn mount_source_in(
        &self,
        opts: &SourceOptions,
        dir: &Path,
    ) -> Result<SourceMount, MountFailure> {
        let backing = opts
            .backing
            .clone()
            .unwrap_or_else(|| dir.join(format!("backing-{}", opts.name)));
        let mountpoint = dir.join(format!("mnt-{}", opts.name));
        fs::create_dir_all(&backing).expect("create backing dir");
        // A dead mount left there (ENOTCONN) is the daemon's to clean up.
        if let Err(e) = fs::create_dir_all(&mountpoint) {
            assert!(
                e.kind() == std::io::ErrorKind::AlreadyExists,
                "create mount point: {e}"
            );
        }
        let mut cmd = self.fs_source();
        cmd.arg("mount")
            .arg("--backing")
            .arg(&backing)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .args(["--dest", &self.dest_addr, "--name", &opts.name])
            .arg("--nvram")
            .arg(dir.join(format!("source-{}.nvram", opts.name)))
            .arg("--tls")
            .arg(opts.tls_dir.as_ref().unwrap_or(&self.tls_dir));
        if let Some(n) = opts.partitions {
            cmd.args(["--partitions", &n.to_string()]);
        }
        if let Some(bytes) = opts.partition_size_bytes {
            cmd.args(["--partition-size", &bytes.to_string()]);
        }
        if let Some(policy) = &opts.policy {
            cmd.args(["--policy", policy]);
        }
        cmd.args(&opts.extra_args);
        let log = self.log_dir.join(format!(
            "fs-source-{}{}.log",
            opts.name,
            if dir == self.dir { "" } else { "-2" }
        ));
        let (daemon, _rest) = Daemon::spawn(
            &format!("fs-source {}", opts.name),
            &mut cmd,
            &log,
            "fs-source: mounted",
            STARTUP_TIMEOUT,
        )
        .map_err(|spawn| {
            let left_mounted = is_mounted(&mountpoint);
            if left_mounted {
                lazy_unmount(&mountpoint);
            }
            MountFailure {
                spawn,
                left_mounted,
                daemon_output: daemon_output(&log),
            }
        })?;
        let mut mount = SourceMount {
            daemon,
            mountpoint: mountpoint.clone(),
            backing,
            name: opts.name.clone(),
        };
        if !is_mounted(&mountpoint) {
            let status = mount.stop();
            return Err(MountFailure {
                spawn: SpawnFailure {
                    exit: status,
                    message: format!(
                        "fs-source printed its mounted line but {} is not in /proc/mounts \
                         (exit after SIGTERM: {status:?})\n{}",
                        mountpoint.display(),
                        read_log(&log)
                    ),
                },
                left_mounted: false,
                daemon_output: daemon_output(&log),
            });
        }
        Ok(mount)
    }

    fn main_source(&self) -> &SourceMount {
        self.source
            .as_ref()
            .expect("the harness's source is running")
    }

    /// The mount point of the main source.
    pub fn mnt(&self) -> &Path {
        &self.main_source().mountpoint
    }

    /// The backing dir of the main source.
    pub fn backing(&self) -> &Path {
        &self.main_source().backing
    }

    /// `ROOT/NAME/image` of the main source.
    pub fn image(&self) -> PathBuf {
        self.image_of(&self.main_source().name)
    }

    pub fn image_of(&self, name: &str) -> PathBuf {
        self.dest_root.join(name).join("image")
    }

    /// `fs-source cp` on the main source; panics unless it exits 0.
    #[track_caller]
    pub fn cp(&self) {
        self.cp_of(self.mnt());
    }

    #[track_caller]
    pub fn cp_of(&self, mountpoint: &Path) {
        run_ok(
            self.fs_source()
                .args(["cp", "--mountpoint"])
                .arg(mountpoint),
        );
    }

    /// `fs-source cp` until it succeeds (after a destination power cut the CP that resumes
    /// may find paths out of sync, which the source heals by itself): panics with the last
    /// answer after `timeout`. Returns how many attempts failed first.
    #[track_caller]
    pub fn cp_until_in_sync(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut failed = 0;
        loop {
            let out = run_with_timeout(
                self.fs_source()
                    .args(["cp", "--mountpoint"])
                    .arg(self.mnt()),
                COMMAND_TIMEOUT,
            );
            if out.status.success() {
                return failed;
            }
            failed += 1;
            if std::time::Instant::now() >= deadline {
                panic!(
                    "fs-source cp did not succeed within {timeout:?}: {}",
                    show_output("fs-source cp", &out)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `fs-source status --json` of the main source.
    #[track_caller]
    pub fn status(&self) -> SourceStatus {
        self.status_of(self.mnt())
    }

    #[track_caller]
    pub fn status_of(&self, mountpoint: &Path) -> SourceStatus {
        let out = run_ok(
            self.fs_source()
                .args(["status", "--json", "--mountpoint"])
                .arg(mountpoint),
        );
        SourceStatus::parse(&out)
    }

    /// Check that every record logged so far is acknowledged, then stop the destination
    /// (SIGSTOP); returns the status from before the stop.
    #[track_caller]
    pub fn stop_dest_when_mirrored(&mut self) -> SourceStatus {
        let before = self.status();
        assert_eq!(
            before.last_acked_seq, before.last_logged_seq,
            "every completed operation must be acknowledged before the stop: {}",
            before.raw
        );
        self.dest().signal(libc::SIGSTOP);
        before
    }

    /// With the destination stopped (SIGSTOP) and `done` set by a thread once its operation
    /// returned: check that it has not (`what` says which operation, for the message), resume
    /// the destination and wait (60 s at most) for the operation to return.
    #[track_caller]
    pub fn held_until_dest_resumes(&mut self, what: &str, done: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        assert!(
            !done.load(Ordering::SeqCst),
            "{what} returned while the destination was stopped: it did not wait for the mirror"
        );
        self.dest().signal(libc::SIGCONT);
        wait_until(
            &format!("{what} to return once the destination resumed"),
            Duration::from_secs(60),
            || done.load(Ordering::SeqCst),
        );
    }

    /// The main source's status read from its control socket by this process, without
    /// starting `fs-source status`: a child process would get a copy of every descriptor the
    /// test holds open on the mount, and its `exec` would close them, which is a FUSE FLUSH
    /// (a close) of those files.
    #[track_caller]
    pub fn status_in_process(&self) -> SourceStatus {
        // As fs-source's `control::socket_path`: FNV-1a of the canonical mount point.
        let canonical = fs::canonicalize(self.mnt()).unwrap_or_else(|_| self.mnt().to_path_buf());
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canonical.as_os_str().as_encoded_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        let path = self.run_dir.join(format!("source-{h:016x}.sock"));
        let mut stream = std::os::unix::net::UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("control socket {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .expect("socket timeout");
        stream
            .write_all(b"{\"cmd\":\"status\"}\n")
            .expect("status request");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("status answer on {}: {e}", path.display()));
        SourceStatus::parse(&line)
    }

    /// `fs-dest status --root ROOT --json`.
    #[track_caller]
    pub fn dest_status(&self) -> serde_json::Value {
        let out = run_ok(
            self.fs_dest()
                .args(["status", "--json", "--root"])
                .arg(&self.dest_root),
        );
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("fs-dest status --json is not JSON ({e}): {out}"))
    }

    /// The destination's status entry for source `name`.
    #[track_caller]
    pub fn dest_source_status(&self, name: &str) -> serde_json::Value {
        let status = self.dest_status();
        status["sources"]
            .as_array()
            .unwrap_or_else(|| panic!("fs-dest status has no \"sources\" array: {status}"))
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("fs-dest status does not list source {name:?}: {status}"))
    }

    /// Wait (bounded) until the destination no longer counts source `name` as connected: a
    /// killed source is noticed at the QUIC idle timeout, and `promote` refuses a connected one.
    #[track_caller]
    pub fn wait_disconnected(&self, name: &str) {
        wait_until(
            &format!("the destination to notice {name} is gone"),
            Duration::from_secs(15),
            || self.dest_source_status(name)["connected"] == false,
        );
    }

    pub fn dest(&mut self) -> &mut Daemon {
        self.dest.as_mut().expect("fs-dest is running")
    }

    /// Prints every log of this test to stderr (the test harness shows it on failure).
    pub fn print_logs(&self) {
        eprintln!("==== {}: temp dir {}", self.test, self.dir.display());
        let Ok(entries) = fs::read_dir(&self.log_dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        logs.sort();
        for log in logs {
            eprintln!("==== {} ====", log.display());
            eprintln!("{}", read_log(&log));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let failed = thread::panicking();
        // A stopped destination would stall the source's unmount: wake it first.
        if let Some(dest) = &self.dest {
            dest.signal(libc::SIGCONT);
        }
        self.source.take();
        self.dest.take();
        if failed {
            self.print_logs();
        }
        let leftover: Vec<String> = fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&*self.dir.to_string_lossy()))
            .map(str::to_string)
            .collect();
        let keep = failed && std::env::var_os("NVMIRROR_KEEP_TMP").is_some();
        if let Some(temp) = self.temp.take() {
            if !leftover.is_empty() {
                // Never recurse into a mount that is still there: leave the dir behind.
                eprintln!(
                    "{}: mounts still present, keeping {}: {leftover:?}",
                    self.test,
                    self.dir.display()
                );
                let _ = temp.keep();
            } else if keep {
                eprintln!(
                    "{}: keeping {} (NVMIRROR_KEEP_TMP)",
                    self.test,
                    self.dir.display()
                );
                let _ = temp.keep();
            }
        }
    }
}

/// `fs-source status --json`, the fields the tests use.
#[derive(Clone, Debug)]
pub struct SourceStatus {
    pub last_logged_seq: u64,
    pub last_acked_seq: u64,
    pub last_applied_seq: u64,
    pub cp_count: u64,
    pub link: String,
    pub records_mirrored: u64,
    pub bytes_mirrored: u64,
    pub raw: serde_json::Value,
}

impl SourceStatus {
    #[track_caller]
    pub fn parse(text: &str) -> SourceStatus {
        let raw: serde_json::Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("fs-source status --json is not JSON ({e}): {text}"));
        let num = |key: &str| {
            raw[key].as_u64().unwrap_or_else(|| {
                panic!("fs-source status: {key:?} missing or not a number: {raw}")
            })
        };
        SourceStatus {
            last_logged_seq: num("last_logged_seq"),
            last_acked_seq: num("last_acked_seq"),
            last_applied_seq: num("last_applied_seq"),
            cp_count: num("cp_count"),
            link: raw["link"].as_str().unwrap_or_default().to_string(),
            records_mirrored: num("records_mirrored"),
            bytes_mirrored: num("bytes_mirrored"),
            raw,
        }
    }
}

/// Runs a shell command as another user (uid = gid = `uid`, no supplementary groups), with a
/// timeout; returns its output.
pub fn run_as(uid: u32, script: &str, cwd: &Path) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/bin/sh");
    // std drops supplementary groups (setgroups(0)) when root changes uid.
    cmd.arg("-c").arg(script).current_dir(cwd).uid(uid).gid(uid);
    run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
}

/// Formats a command's output for an assertion message.
pub fn show_output<T: Debug>(what: T, out: &Output) -> String {
    format!(
        "{what:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// Crash and restart (issue 3: torture, damage and power-cut tests)

/// Renames `log` to the first free `log.N`, so a restarted daemon's log does not overwrite the
/// previous incarnation's. Returns the new name (`None` when there was no log).
pub fn rotate_log(log: &Path) -> Option<PathBuf> {
    if !log.exists() {
        return None;
    }
    let mut n = 1;
    loop {
        let old = PathBuf::from(format!("{}.{n}", log.display()));
        if !old.exists() {
            fs::rename(log, &old).unwrap_or_else(|e| panic!("rotating {}: {e}", log.display()));
            return Some(old);
        }
        n += 1;
    }
}

impl Daemon {
    /// SIGKILL, then wait (bounded) until the process is reaped. A daemon that already exited is
    /// not signalled again (its pid may belong to someone else by now).
    #[track_caller]
    pub fn kill_and_reap(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal(libc::SIGKILL);
        self.wait_timeout(SHUTDOWN_TIMEOUT)
            .unwrap_or_else(|| panic!("{} did not die of SIGKILL", self.name))
    }
}

impl Harness {
    /// SIGKILLs the main source and reaps it. Its FUSE mount is left in place, dead (every
    /// operation on it fails with ENOTCONN) until [`Harness::detach_source`].
    #[track_caller]
    pub fn kill_source(&mut self) -> ExitStatus {
        self.source
            .as_mut()
            .expect("the harness's source is running")
            .daemon
            .kill_and_reap()
    }

    /// Detaches the dead mount of a killed source (`umount -l`), as an operator does before
    /// restarting it, and forgets the source.
    #[track_caller]
    pub fn detach_source(&mut self) {
        let mut source = self.source.take().expect("the harness has a source");
        source.daemon.kill_and_reap();
        lazy_unmount(&source.mountpoint);
        wait_until(
            "the dead source mount to be detached",
            COMMAND_TIMEOUT,
            || !is_mounted(&source.mountpoint),
        );
    }

    /// Starts the main source again with `opts` (same backing dir, mount point and NVRAM file);
    /// the previous log is kept as `fs-source-NAME.log.N`.
    pub fn restart_source(&mut self, opts: &SourceOptions) -> Result<(), MountFailure> {
        assert!(
            self.source.is_none(),
            "restart_source: the source is still running"
        );
        rotate_log(&self.log_dir.join(format!("fs-source-{}.log", opts.name)));
        self.source = Some(self.mount_source(opts)?);
        Ok(())
    }

    /// SIGKILLs the destination.
    #[track_caller]
    pub fn kill_dest(&mut self) {
        let mut dest = self.dest.take().expect("fs-dest is running");
        dest.kill_and_reap();
    }

    /// Starts `fs-dest serve` again on the address it had (same root, NVRAM file and
    /// certificates), so running sources reconnect to it by themselves; the previous log is kept
    /// as `fs-dest.log.N`. Returns the daemon's failure (with its log) if it does not start.
    pub fn restart_dest(&mut self) -> Result<(), SpawnFailure> {
        assert!(
            self.dest.is_none(),
            "restart_dest: fs-dest is still running"
        );
        let log = self.log_dir.join("fs-dest.log");
        rotate_log(&log);
        let mut cmd = self.fs_dest();
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.dest_root)
            .args(["--listen", &self.dest_addr, "--nvram"])
            .arg(self.dir.join("dest.nvram"))
            .arg("--tls")
            .arg(&self.tls_dir)
            .args(&self.dest_args);
        let (daemon, _addr) = Daemon::spawn(
            "fs-dest",
            &mut cmd,
            &log,
            "fs-dest: listening on ",
            STARTUP_TIMEOUT,
        )?;
        self.dest = Some(daemon);
        Ok(())
    }

    /// The destination's NVRAM file.
    pub fn dest_nvram(&self) -> PathBuf {
        self.dir.join("dest.nvram")
    }

    /// The NVRAM file of source `name`.
    pub fn source_nvram(&self, name: &str) -> PathBuf {
        self.dir.join(format!("source-{name}.nvram"))
    }
}
