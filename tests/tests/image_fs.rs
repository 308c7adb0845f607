//! The image on other filesystems than the one the other tests use (issue 11, point 4).
//!
//! For each of ext4, xfs and btrfs (a sparse 512 MiB loop file in the test's temp dir, made
//! with `mkfs.*` and mounted) and a GlusterFS replica 2 volume (two bricks on this machine,
//! mounted with the glusterfs FUSE client), `fs-dest serve --root` is put on that filesystem and:
//!
//! 1. the mixed workload (`tests/src/workload.rs`: creates, writes, a big file, renames over
//!    existing names, `RENAME_NOREPLACE`, `RENAME_EXCHANGE`, hard links, symlinks, `user.*`
//!    xattrs, chmod/chown, truncate, fallocate, unlink, rmdir...) runs through a source mount;
//! 2. `fs-source cp` (one CP covering the whole workload: the timer is off; its time is printed
//!    as `CP TIME fs=...`, quoted in docs/image-filesystems.md) → image = backing;
//! 3. `fs-dest browse` mounts the image: a file reads back, browse = image;
//! 4. more changes after the CP (only in the destination's NVRAM and journals), the source
//!    killed, `fs-dest promote` → the promoted image = the backing volume.
//!
//! A filesystem whose tools are missing is skipped with a `SKIP` line naming the package
//! (`tests/run` installs them as root). The tests run one at a time (a lock), so the CP times
//! are comparable. Every mount, loop device, volume, brick and daemon the test made is removed
//! on drop, also when it fails.

use nvmirror_e2e::{
    assert_trees_equal_named, is_mounted, lazy_unmount, poll_until, require_mount, run_ok,
    run_with_timeout, show_output, wait_until, workload, Daemon, Harness, HarnessOptions, Rng,
    SHUTDOWN_TIMEOUT, STARTUP_TIMEOUT,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One filesystem at a time: the CP times are then comparable, and two gluster setups never
/// race for glusterd.
static SERIAL: Mutex<()> = Mutex::new(());

/// Size of each loop file (sparse): xfs needs at least 300 MiB.
const LOOP_BYTES: u64 = 512 << 20;

/// How long a gluster command may take.
const GLUSTER_TIMEOUT: Duration = Duration::from_secs(120);

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A temp dir for the filesystem under test (the harness makes its own afterwards).
fn scratch(test: &str) -> tempfile::TempDir {
    let base = std::env::var_os("NVMIRROR_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(&format!("nvmirror-e2e-{test}-fs-"))
        .tempdir_in(&base)
        .expect("scratch temp dir")
}

// ---------------------------------------------------------------------------------------------
// Loop filesystems

/// A loop device with a fresh filesystem of type `kind` mounted on `mnt`; unmounted, detached
/// and removed on drop.
struct LoopFs {
    image: PathBuf,
    device: Option<String>,
    mnt: PathBuf,
}

impl LoopFs {
    fn create(kind: &str, dir: &Path) -> LoopFs {
        let image = dir.join(format!("{kind}.img"));
        let mnt = dir.join(format!("{kind}-mnt"));
        fs::File::create(&image)
            .and_then(|f| f.set_len(LOOP_BYTES))
            .expect("loop image");
        let mut fs = LoopFs {
            image,
            device: None,
            mnt: mnt.clone(),
        };
        let device = run_ok(
            Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&fs.image),
        )
        .trim()
        .to_string();
        fs.device = Some(device.clone());
        let mkfs = format!("mkfs.{kind}");
        let args: &[&str] = match kind {
            "ext4" => &["-q", "-F"],
            "xfs" => &["-q", "-f"],
            "btrfs" => &["-q", "-f"],
            other => panic!("unknown filesystem {other}"),
        };
        run_ok(Command::new(&mkfs).args(args).arg(&device));
        fs::create_dir_all(&mnt).expect("loop mount point");
        run_ok(Command::new("mount").arg(&device).arg(&mnt));
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                lazy_unmount(&self.mnt);
            }
        }
        if let Some(dev) = &self.device {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = fs::remove_file(&self.image);
    }
}

// ---------------------------------------------------------------------------------------------
// GlusterFS

/// `gluster --mode=script ARGS` with a timeout.
fn gluster(args: &[&str]) -> std::process::Output {
    run_with_timeout(
        Command::new("gluster").arg("--mode=script").args(args),
        GLUSTER_TIMEOUT,
    )
}

fn gluster_ok(args: &[&str]) {
    let out = gluster(args);
    assert!(out.status.success(), "{}", show_output(args, &out));
}

/// True when a glusterd answers on this machine.
fn glusterd_answers() -> bool {
    run_with_timeout(
        Command::new("gluster").args(["--mode=script", "peer", "status"]),
        Duration::from_secs(20),
    )
    .status
    .success()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn stop_pid(pid: i32) {
    if !pid_alive(pid) {
        return;
    }
    // SAFETY: kill(2) of a process this test started (or a brick of its own volume).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !poll_until(Duration::from_secs(10), || !pid_alive(pid)) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A GlusterFS replica 2 volume with two bricks in `dir`, mounted with the FUSE client. A
/// glusterd already running is used (only this volume is made and removed); otherwise one is
/// started with its own working directory in `dir` (as `../shared/bench/peers.sh` does) and
/// stopped on drop.
struct Gluster {
    dir: PathBuf,
    volume: String,
    mnt: PathBuf,
    glusterd: Option<std::process::Child>,
    client: Option<std::process::Child>,
    created: bool,
}

/// The gluster CLI refuses `localhost`/`127.0.0.1` as a brick host.
const BRICK_HOST: &str = "127.0.0.2";

impl Gluster {
    fn create(dir: &Path) -> Gluster {
        let mut g = Gluster {
            dir: dir.to_path_buf(),
            volume: format!("nvmimg{}", std::process::id()),
            mnt: dir.join("gluster-mnt"),
            glusterd: None,
            client: None,
            created: false,
        };
        let started = Instant::now();
        if !glusterd_answers() {
            let work = dir.join("glusterd");
            fs::create_dir_all(work.join("lib")).expect("glusterd dir");
            let vol = fs::read_to_string("/etc/glusterfs/glusterd.vol")
                .expect("/etc/glusterfs/glusterd.vol")
                .replace(
                    "option working-directory /var/lib/glusterd",
                    &format!("option working-directory {}", work.join("lib").display()),
                );
            fs::write(work.join("glusterd.vol"), vol).expect("glusterd.vol");
            for sub in ["groups", "hooks"] {
                let from = Path::new("/var/lib/glusterd").join(sub);
                if from.exists() {
                    run_ok(
                        Command::new("cp")
                            .arg("-r")
                            .arg(&from)
                            .arg(work.join("lib")),
                    );
                }
            }
            let log = fs::File::create(work.join("glusterd.stdout")).expect("glusterd log");
            let child = Command::new("glusterd")
                .arg("-N")
                .arg("-f")
                .arg(work.join("glusterd.vol"))
                .arg("-l")
                .arg(work.join("glusterd.log"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .expect("start glusterd");
            g.glusterd = Some(child);
            wait_until("glusterd to answer", Duration::from_secs(60), || {
                glusterd_answers()
            });
        }
        let bricks: Vec<String> = (1..=2)
            .map(|i| {
                let b = dir.join(format!("brick{i}"));
                fs::create_dir_all(&b).expect("brick dir");
                format!("{BRICK_HOST}:{}", b.display())
            })
            .collect();
        // `force`: the bricks are on the root filesystem, and replica 2 risks split-brain.
        gluster_ok(&[
            "volume", "create", &g.volume, "replica", "2", &bricks[0], &bricks[1], "force",
        ]);
        g.created = true;
        gluster_ok(&["volume", "start", &g.volume]);
        fs::create_dir_all(&g.mnt).expect("gluster mount point");
        let client = Command::new("glusterfs")
            .arg("-N")
            .arg(format!("--volfile-server={BRICK_HOST}"))
            .arg(format!("--volfile-id={}", g.volume))
            .arg("-l")
            .arg(dir.join("gluster-client.log"))
            .arg(&g.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the glusterfs client");
        g.client = Some(client);
        wait_until("the gluster volume to mount", STARTUP_TIMEOUT, || {
            is_mounted(&g.mnt)
        });
        eprintln!(
            "image_fs gluster: volume {} up in {:?}",
            g.volume,
            started.elapsed()
        );
        g
    }
}

impl Drop for Gluster {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                lazy_unmount(&self.mnt);
            }
        }
        if let Some(mut c) = self.client.take() {
            stop_pid(c.id() as i32);
            let _ = c.wait();
        }
        if self.created {
            let run = Path::new("/var/run/gluster");
            let mut pids = read_pids(&run.join("vols").join(&self.volume));
            let _ = gluster(&["volume", "stop", &self.volume, "force"]);
            let _ = gluster(&["volume", "delete", &self.volume]);
            if self.glusterd.is_some() {
                // The self-heal daemon of our own glusterd serves only our volume.
                pids.extend(read_pids(&run.join("shd").join(&self.volume)));
            }
            for pid in pids {
                stop_pid(pid);
            }
            let _ = fs::remove_dir_all(run.join("vols").join(&self.volume));
            let _ = fs::remove_dir_all(run.join("shd").join(&self.volume));
        }
        if let Some(mut d) = self.glusterd.take() {
            stop_pid(d.id() as i32);
            let _ = d.wait();
        }
        for i in 1..=2 {
            let _ = fs::remove_dir_all(self.dir.join(format!("brick{i}")));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test itself

/// `fs-dest browse` of one source; unmounted on drop.
struct Browse {
    daemon: Daemon,
    mountpoint: PathBuf,
}

impl Drop for Browse {
    fn drop(&mut self) {
        if self.daemon.terminate(SHUTDOWN_TIMEOUT).is_none() || is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
    }
}

/// Mirror, CP, browse and promote with the destination root at `root` (on filesystem
/// `fs_name`), whose lacks fs-dest must name at start (`expect_missing`; none: it must say the
/// filesystem offers everything).
fn mirror_on(test: &str, fs_name: &str, root: &Path, expect_missing: &[&str]) {
    let mut h = Harness::start(
        HarnessOptions::new(test)
            .dest_root(root)
            .source_args(["--cp-interval-ms", "3600000"]),
    );
    let seed = Rng::from_env(test).next_u64();

    // 1. The workload, then one CP covering all of it.
    let started = Instant::now();
    workload::mixed(h.mnt(), &mut Rng::new(seed));
    let workload_time = started.elapsed();
    let before = h.status();
    let started = Instant::now();
    h.cp();
    let cp_time = started.elapsed();
    eprintln!(
        "CP TIME fs={fs_name}: cp of {} records took {:.3} s (workload through the mount {:.3} s)",
        before.last_logged_seq - before.last_applied_seq,
        cp_time.as_secs_f64(),
        workload_time.as_secs_f64()
    );
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    let status = h.status();
    assert_eq!(
        status.last_applied_seq, status.last_logged_seq,
        "after cp every record is applied: {}",
        status.raw
    );
    let dest = h.dest_source_status("alpha");
    assert_eq!(
        dest["applied_seq"].as_u64(),
        Some(status.last_logged_seq),
        "fs-dest status: {dest}"
    );

    // 2. Browse the image.
    let view = h.dir.join("browse");
    fs::create_dir_all(&view).expect("browse mount point");
    let mut cmd = h.fs_dest();
    cmd.arg("browse")
        .arg("--root")
        .arg(&h.dest_root)
        .args(["--source", "alpha", "--mountpoint"])
        .arg(&view);
    let (daemon, _) = Daemon::spawn(
        "fs-dest browse",
        &mut cmd,
        &h.log_dir.join("browse.log"),
        "fs-dest: browsing ",
        STARTUP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("fs-dest browse did not start: {e}"));
    let browse = Browse {
        daemon,
        mountpoint: view.clone(),
    };
    assert!(is_mounted(&view), "browse mount not in /proc/mounts");
    assert_eq!(
        fs::read(view.join("a/b/renamed.txt")).expect("read a/b/renamed.txt through browse"),
        b"small file\n"
    );
    assert_trees_equal_named(&h.image(), &view, "image", "browse");
    drop(browse);

    // 3. Changes after the CP — a create, an overwrite, a rename over an existing name, an
    // exchange, a no-replace rename, a hard link, an xattr — then the source is lost.
    let m = h.mnt().to_path_buf();
    fs::write(m.join("late-new.txt"), b"written after the last CP").expect("late create");
    fs::write(m.join("a/b/renamed.txt"), b"overwritten after the last CP").expect("late overwrite");
    fs::write(m.join("late-x"), b"x").expect("late x");
    fs::write(m.join("late-y"), b"y").expect("late y");
    fs::rename(m.join("late-x"), m.join("late-y")).expect("late rename over");
    fs::write(m.join("late-x"), b"x2").expect("late x2");
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        m.join("late-x"),
        rustix::fs::CWD,
        m.join("late-y"),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .expect("late exchange");
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        m.join("late-new.txt"),
        rustix::fs::CWD,
        m.join("late-moved.txt"),
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .expect("late no-replace rename");
    fs::hard_link(m.join("late-y"), m.join("late-y.link")).expect("late link");
    rustix::fs::setxattr(
        m.join("late-moved.txt"),
        "user.late",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("late xattr");
    let s = h.status();
    assert!(
        s.last_applied_seq < s.last_logged_seq,
        "the late changes are after the last CP: {}",
        s.raw
    );
    h.kill_source();
    h.detach_source();
    h.wait_disconnected("alpha");

    // 4. Promote: every acknowledged record reaches the image.
    let started = Instant::now();
    let out = run_ok(
        h.fs_dest()
            .args(["promote", "--source", "alpha", "--root"])
            .arg(&h.dest_root),
    );
    eprintln!(
        "PROMOTE TIME fs={fs_name}: {:.3} s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.contains("promoted alpha"), "promote: {out}");
    let backing = h.dir.join("backing-alpha");
    assert_trees_equal_named(&backing, &h.image_of("alpha"), "backing", "promoted image");
    // What fs-dest found its root's filesystem to lack (docs/image-filesystems.md).
    let log = fs::read_to_string(h.log_dir.join("fs-dest.log")).unwrap_or_default();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("image filesystem"))
        .collect();
    for line in &said {
        eprintln!("image_fs {fs_name}: fs-dest said: {line}");
    }
    for what in expect_missing {
        assert!(
            said.iter().any(|l| l.contains(what)),
            "fs-dest must say at start that the image filesystem lacks {what}: {said:?}"
        );
    }
    if expect_missing.is_empty() {
        assert!(
            said.iter().any(|l| l.contains("offers everything")),
            "fs-dest must say the image filesystem offers everything: {said:?}"
        );
    }
}

/// One loop filesystem: skips (with the package to install) when its mkfs is missing.
fn loop_test(kind: &str, package: &str) {
    let test = format!("image_fs_{kind}");
    require_mount!(&test);
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for tool in ["losetup", &format!("mkfs.{kind}")] {
        if !have(tool) {
            eprintln!(
                "SKIP {test}: {tool} is missing (apt-get install {package}; tests/run installs \
                 it as root)"
            );
            return;
        }
    }
    let scratch = scratch(&test);
    let lfs = LoopFs::create(kind, scratch.path());
    mirror_on(&test, kind, &lfs.mnt.join("dest-root"), &[]);
    drop(lfs);
}

#[test]
fn image_on_ext4() {
    loop_test("ext4", "e2fsprogs");
}

#[test]
fn image_on_xfs() {
    loop_test("xfs", "xfsprogs");
}

#[test]
fn image_on_btrfs() {
    loop_test("btrfs", "btrfs-progs");
}

#[test]
fn image_on_glusterfs() {
    const TEST: &str = "image_fs_glusterfs";
    require_mount!(TEST);
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for tool in ["glusterd", "gluster", "glusterfs"] {
        if !have(tool) {
            eprintln!(
                "SKIP {TEST}: {tool} is missing (apt-get install glusterfs-server \
                 glusterfs-client; tests/run installs them as root)"
            );
            return;
        }
    }
    let scratch = scratch(TEST);
    let g = Gluster::create(scratch.path());
    // GlusterFS's FUSE client has no renameat2 flags (emulated) and its syncfs does not
    // reach the bricks' disks (each CP fsyncs what it touched instead).
    mirror_on(
        TEST,
        "glusterfs",
        &g.mnt.join("dest-root"),
        &["renameat2", "durable syncfs"],
    );
    drop(g);
}
