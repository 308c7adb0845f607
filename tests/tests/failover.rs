//! Failover across two network namespaces (`tests/src/netns.rs`): browse, source lost →
//! promote (recovery point zero) → old source fenced → failback (reseed, demote), and link
//! down/up under each mirror policy.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::netns::{can_use_netns, Cluster};
use nvmirror_e2e::{
    assert_trees_equal, lazy_unmount, require_mount, run_ok, run_with_timeout, wait_until, Rng,
};

const NAME: &str = "alpha";

macro_rules! require_netns {
    ($test:expr) => {
        require_mount!($test);
        if !can_use_netns($test) {
            return;
        }
    };
}

/// Write `data` to `rel` under both the mount and the reference tree. When `fs::write`
/// returns through the mount, the write is acknowledged by the destination.
fn write_both(mnt: &Path, reference: &Path, rel: &str, data: &[u8]) {
    for root in [mnt, reference] {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }
}

fn cp_a(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn browse_shows_completed_cps_and_refuses_writes() {
    require_netns!("browse_shows_completed_cps_and_refuses_writes");
    let (mut c, _backing, mnt) = mounted("browse");
    fs::write(mnt.join("f"), b"first").expect("write f");
    c.cp(&mnt);
    let view = c.browse(NAME);
    assert_eq!(
        fs::read(view.join("f")).expect("read f in browse"),
        b"first"
    );
    // A newer CP shows up by itself.
    fs::write(mnt.join("f"), b"second version").expect("overwrite f");
    fs::create_dir(mnt.join("d")).expect("mkdir d");
    c.cp(&mnt);
    wait_until(
        "browse shows the second CP",
        Duration::from_secs(30),
        || {
            fs::read(view.join("f")).ok().as_deref() == Some(&b"second version"[..])
                && view.join("d").is_dir()
        },
    );
    // Read-only.
    let err = fs::write(view.join("g"), b"x").expect_err("create through browse");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = fs::OpenOptions::new()
        .write(true)
        .open(view.join("f"))
        .expect_err("open for writing through browse");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(
        fs::read(c.image(NAME).join("f")).unwrap(),
        b"second version"
    );
    // SIGTERM unmounts and exits 0.
    let mut b = c.browses.pop().expect("browse mount");
    let status = b.daemon.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "browse exit after SIGTERM: {status:?}"
    );
    assert!(!nvmirror_e2e::is_mounted(&view), "browse left its mount");
}

#[test]
fn source_lost_promote_fence_failback() {
    require_netns!("source_lost_promote_fence_failback");
    let mut rng = Rng::from_env("source_lost_promote_fence_failback");
    let c = Cluster::start("failover", NAME);
    let backing = c.dir.join("backing");
    let nvram = c.dir.join("source.nvram");
    let reference = c.dir.join("reference");
    fs::create_dir_all(&reference).unwrap();
    let mut src = c
        .mount_source(NAME, &backing, &nvram, &["--partition-size", "65536"], "a")
        .unwrap_or_else(|e| panic!("mount: {e}"));
    let mnt = src.mountpoint.clone();

    // Phase 1: writes, several CPs (small partitions) and an explicit one.
    for i in 0..40 {
        let len = rng.below(20_000) as usize + 1;
        write_both(
            &mnt,
            &reference,
            &format!("d{}/f{i}", i % 4),
            &rng.bytes(len),
        );
    }
    c.cp(&mnt);
    // The old host's state as of now (backing directory and NVRAM together), for its return
    // later.
    let old_backing = c.dir.join("old-backing");
    cp_a(&backing, &old_backing);
    let old_nvram = c.dir.join("old.nvram");
    fs::copy(&nvram, &old_nvram).expect("copy the NVRAM");

    // Phase 2: acknowledged writes after the last CP, only in NVRAM/journals on the destination.
    for i in 0..25 {
        let len = rng.below(5_000) as usize + 1;
        write_both(&mnt, &reference, &format!("late/g{i}"), &rng.bytes(len));
    }
    write_both(&mnt, &reference, "d0/f0", b"overwritten after the last CP");
    for root in [&mnt, &reference] {
        fs::rename(root.join("d1"), root.join("d1-renamed")).expect("rename d1");
        fs::remove_file(root.join("d2/f2")).expect("unlink d2/f2");
    }

    // A live source is not promoted by mistake.
    let out = c
        .fs_dest()
        .args(["promote", "--source", NAME, "--root"])
        .arg(&c.dest_root)
        .output()
        .expect("run fs-dest promote");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && text.contains("connected and mirroring")
            && text.contains("--force"),
        "promote of a connected source must be refused: {text}"
    );
    assert!(!c.dest_root.join(NAME).join("PROMOTED").exists());

    // The source host is lost: process killed, backing directory gone.
    src.daemon.signal(libc::SIGKILL);
    src.daemon
        .wait_timeout(Duration::from_secs(15))
        .expect("fs-source dies on SIGKILL");
    lazy_unmount(&mnt);
    drop(src);
    fs::remove_dir_all(&backing).expect("delete the lost backing dir");
    wait_disconnected(&c);

    // Promote, while the server runs.
    let out = run_ok(
        c.fs_dest()
            .args(["promote", "--source", NAME, "--root"])
            .arg(&c.dest_root),
    );
    assert!(
        out.contains(&format!("promoted {NAME} at generation 1")),
        "promote output: {out}"
    );
    let marker = fs::read_to_string(c.dest_root.join(NAME).join("PROMOTED")).expect("marker");
    assert!(marker.contains("\"complete\": true"), "{marker}");
    // Recovery point zero: every acknowledged write is in the image.
    assert_trees_equal(&reference, &c.image(NAME));
    let status = run_ok(
        c.fs_dest()
            .args(["status", "--json", "--root"])
            .arg(&c.dest_root),
    );
    assert!(status.contains("\"generation\":1"), "{status}");

    // The old source comes back with its old NVRAM and an old copy of its backing dir: fenced.
    let refused = c
        .mount_source(
            NAME,
            &old_backing,
            &old_nvram,
            &["--partition-size", "65536", "--connect-wait-ms", "20000"],
            "old",
        )
        .err()
        .expect("a fenced source must not mount");
    let text = format!("{refused}");
    assert!(
        text.contains("promoted at generation 1") && text.contains("fenced"),
        "the refusal names the promotion: {text}"
    );
    assert!(
        text.contains("reseed"),
        "the refusal says how to fail back: {text}"
    );
    assert_trees_equal(&reference, &c.image(NAME));

    // Failback: reseed the old backing dir from the promoted image, copying only the delta.
    let dry = run_ok(
        c.fs_dest()
            .args(["reseed", "--dry-run", "--from"])
            .arg(c.image(NAME))
            .arg("--to")
            .arg(&old_backing),
    );
    assert!(dry.contains("dry run"), "{dry}");
    let out = run_ok(
        c.fs_dest()
            .args(["reseed", "--json", "--from"])
            .arg(c.image(NAME))
            .arg("--to")
            .arg(&old_backing),
    );
    let summary: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap_or("")).expect("reseed --json");
    assert_trees_equal(&reference, &old_backing);
    // Only the delta is copied: 25 new files, 1 overwritten, and the 10 files of the renamed
    // directory (renames are not detected: a path-based delta). The 28 phase-1 files that did
    // not change are compared, not copied (their mtimes differ: the image got them at replay).
    assert_eq!(summary["files_copied"], 36, "{summary}\n{dry}");
    let unchanged =
        summary["metadata_updated"].as_u64().unwrap() + summary["skipped"].as_u64().unwrap();
    assert!(unchanged >= 28, "{summary}\n{dry}");
    let again = run_ok(
        c.fs_dest()
            .args(["reseed", "--json", "--from"])
            .arg(c.image(NAME))
            .arg("--to")
            .arg(&old_backing),
    );
    let again: serde_json::Value = serde_json::from_str(again.trim()).expect("json");
    assert_eq!(again["files_copied"], 0, "second reseed: {again}");
    assert_eq!(again["deleted"], 0, "second reseed: {again}");

    // Hand the role back.
    let out = run_ok(
        c.fs_dest()
            .args(["demote", "--source", NAME, "--root"])
            .arg(&c.dest_root),
    );
    assert!(out.contains("--generation 1"), "{out}");
    assert!(!c.dest_root.join(NAME).join("PROMOTED").exists());
    // The stale NVRAM is still fenced after the demote (generation 0 < 1).
    let refused = c
        .mount_source(
            NAME,
            &c.dir.join("scratch"),
            &nvram,
            &["--partition-size", "65536"],
            "stale",
        )
        .err()
        .expect("a stale generation must stay fenced");
    assert!(format!("{refused}").contains("fenced"), "{refused}");
}

/// After failback the old source mounts again at the promoted generation and mirrors as before.
#[test]
fn failback_source_mirrors_again_at_the_new_generation() {
    require_netns!("failback_source_mirrors_again_at_the_new_generation");
    let c = Cluster::start("failback", NAME);
    let backing = c.dir.join("backing");
    let mut src = c
        .mount_source(NAME, &backing, &c.dir.join("a.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount: {e}"));
    fs::write(src.mountpoint.join("x"), b"x").unwrap();
    src.stop();
    drop(src);
    wait_disconnected(&c);
    run_ok(
        c.fs_dest()
            .args(["promote", "--source", NAME, "--root"])
            .arg(&c.dest_root),
    );
    fs::write(c.image(NAME).join("written-while-promoted"), b"p").unwrap();
    run_ok(
        c.fs_dest()
            .args(["reseed", "--from"])
            .arg(c.image(NAME))
            .arg("--to")
            .arg(&backing),
    );
    run_ok(
        c.fs_dest()
            .args(["demote", "--source", NAME, "--root"])
            .arg(&c.dest_root),
    );
    let src = c
        .mount_source(
            NAME,
            &backing,
            &c.dir.join("fresh.nvram"),
            &["--generation", "1"],
            "b",
        )
        .unwrap_or_else(|e| panic!("the failed-back source must mount: {e}"));
    fs::write(src.mountpoint.join("after-failback"), b"y").unwrap();
    c.cp(&src.mountpoint);
    assert_trees_equal(&backing, &c.image(NAME));
}

/// Wait until the destination no longer counts the source as connected (a lost source is
/// noticed at the QUIC idle timeout; `promote` refuses a connected one).
fn wait_disconnected(c: &Cluster) {
    wait_until(
        "the destination to notice the source is gone",
        Duration::from_secs(15),
        || {
            let out = c
                .fs_dest()
                .args(["status", "--json", "--root"])
                .arg(&c.dest_root)
                .output()
                .expect("run fs-dest status");
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            v["sources"]
                .as_array()
                .is_some_and(|a| a.iter().all(|s| s["connected"] == false))
        },
    );
}

/// A cluster with source NAME mounted (default options): the cluster, backing dir, mount point.
fn mounted(test: &str) -> (Cluster, std::path::PathBuf, std::path::PathBuf) {
    let mut c = Cluster::start(test, NAME);
    let backing = c.dir.join("backing");
    let src = c
        .mount_source(NAME, &backing, &c.dir.join("source.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);
    (c, backing, mnt)
}

/// Mount with `policy`, take the link down, and return the cluster, mount point and source.
fn link_down_setup(test: &str, policy: &str) -> (Cluster, std::path::PathBuf) {
    let mut c = Cluster::start(test, NAME);
    let backing = c.dir.join("backing");
    let src = c
        .mount_source(
            NAME,
            &backing,
            &c.dir.join("source.nvram"),
            &["--policy", policy, "--timeout-ms", "2000"],
            "a",
        )
        .unwrap_or_else(|e| panic!("mount: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);
    fs::write(mnt.join("before"), b"before").expect("write before the link goes down");
    c.net.set_link(false);
    (c, mnt)
}

fn writer(path: std::path::PathBuf) -> std::sync::mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fs::File::create(&path).and_then(|mut f| {
            f.write_all(b"during")?;
            f.sync_all()
        });
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn strict_policy_fails_writes_while_the_link_is_down() {
    require_netns!("strict_policy_fails_writes_while_the_link_is_down");
    let (c, mnt) = link_down_setup("strict", "strict");
    // In flight when the link dies: logged and applied, then EIO after the timeout (it reaches
    // the destination when the link returns).
    let done = writer(mnt.join("in-flight"));
    let r = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the write ends after the timeout");
    let err = r.expect_err("strict: a write without the mirror fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    wait_until(
        "status shows the link down",
        Duration::from_secs(30),
        || c.status(&mnt)["link"] == "down",
    );
    // With the link known down, an operation is refused before anything of it is logged or
    // applied: the file is never created.
    let done = writer(mnt.join("during"));
    let r = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the write ends after the timeout");
    let err = r.expect_err("strict: a write with the link down fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        !c.dir.join("backing").join("during").exists(),
        "a create refused under strict left the file behind"
    );
    // Reads keep working.
    assert_eq!(fs::read(mnt.join("before")).unwrap(), b"before");
    c.net.set_link(true);
    wait_until("status shows the link up", Duration::from_secs(60), || {
        c.status(&mnt)["link"] == "up"
    });
    fs::write(mnt.join("after"), b"after").expect("writes work again");
    c.cp(&mnt);
    assert_trees_equal(&c.dir.join("backing"), &c.image(NAME));
    assert!(!c.image(NAME).join("during").exists());
}

#[test]
fn sync_policy_goes_on_alone_and_drains_the_backlog() {
    require_netns!("sync_policy_goes_on_alone_and_drains_the_backlog");
    let (c, mnt) = link_down_setup("sync", "sync");
    let done = writer(mnt.join("during"));
    done.recv_timeout(Duration::from_secs(60))
        .expect("the write ends after the timeout")
        .expect("sync: the write succeeds without the mirror");
    for i in 0..20 {
        fs::write(mnt.join(format!("alone-{i}")), vec![i as u8; 10_000]).expect("write alone");
    }
    // `link` may still say "up" here: the QUIC connection only dies at its idle timeout.
    let s = c.status(&mnt);
    assert_eq!(s["degraded"], true, "{s}");
    assert!(s["lag_records"].as_u64().unwrap_or(0) > 0, "{s}");
    // `fs-source wait` does not claim a catch-up that has not happened.
    let wait = |timeout: &str| {
        run_with_timeout(
            c.fs_source()
                .args(["wait", "--timeout", timeout, "--mountpoint"])
                .arg(&mnt),
            Duration::from_secs(150),
        )
    };
    let early = wait("1");
    assert!(
        !early.status.success()
            && String::from_utf8_lossy(&early.stderr).contains("timed out after 1 s"),
        "wait with the link down: {early:?}"
    );
    c.net.set_link(true);
    let caught_up = wait("120");
    assert!(
        caught_up.status.success()
            && String::from_utf8_lossy(&caught_up.stdout)
                .contains("the destination holds every record"),
        "wait after the link returned: {caught_up:?}"
    );
    assert!(
        c.status(&mnt)["last_acked_seq"].as_u64() >= s["last_logged_seq"].as_u64(),
        "wait returned before the destination held what was logged when it started"
    );
    wait_until("the backlog drains", Duration::from_secs(120), || {
        let s = c.status(&mnt);
        s["link"] == "up"
            && s["degraded"] == false
            && s["lag_records"] == 0
            && s["last_acked_seq"] == s["last_logged_seq"]
    });
    c.cp(&mnt);
    assert_trees_equal(&c.dir.join("backing"), &c.image(NAME));
}

#[test]
fn a_dead_link_is_noticed_within_seconds_and_a_returning_one_is_used_at_once() {
    require_netns!("a_dead_link_is_noticed_within_seconds_and_a_returning_one_is_used_at_once");
    let (c, backing, mnt) = mounted("detect");
    fs::write(mnt.join("before"), b"before").expect("write");
    assert_eq!(c.status(&mnt)["link"], "up");
    // Keep-alives every half second, 2 s idle timeout: the dead link shows within 3 s (the
    // bound below leaves room for a loaded machine).
    let cut = std::time::Instant::now();
    c.net.set_link(false);
    wait_until("status shows the link down", Duration::from_secs(6), || {
        c.status(&mnt)["link"] == "down"
    });
    let noticed = cut.elapsed();
    // The status says how long the destination has been silent.
    let age = c.status(&mnt)["last_ack_age_seconds"]
        .as_f64()
        .expect("status gives the age of the last acknowledgement");
    assert!(
        age >= 1.5,
        "last ack {age} s ago, while the link has been down {noticed:?}"
    );
    let back = std::time::Instant::now();
    c.net.set_link(true);
    wait_until(
        "status shows the link up again",
        Duration::from_secs(6),
        || c.status(&mnt)["link"] == "up",
    );
    eprintln!(
        "detect: link loss noticed after {noticed:?}, link up again {:?} after it returned",
        back.elapsed()
    );
    fs::write(mnt.join("after"), b"after").expect("writes work again");
    c.cp(&mnt);
    assert_trees_equal(&backing, &c.image(NAME));
}

#[test]
fn large_writes_cross_a_path_with_a_small_mtu() {
    require_netns!("large_writes_cross_a_path_with_a_small_mtu");
    let mut c = Cluster::start("mtu", NAME);
    // IPv6's minimum MTU, smaller than what QUIC's path MTU discovery would otherwise try.
    c.net.set_mtu(1280);
    let backing = c.dir.join("backing");
    let src = c
        .mount_source(NAME, &backing, &c.dir.join("source.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount over a 1280-byte MTU: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    fs::write(mnt.join("big"), &big).expect("an 8 MiB write over a small MTU");
    for i in 0..4 {
        fs::write(mnt.join(format!("m{i}")), vec![i as u8; 1 << 20]).expect("1 MiB write");
    }
    c.cp(&mnt);
    assert_eq!(
        fs::read(c.image(NAME).join("big")).expect("big in the image"),
        big
    );
    assert_trees_equal(&backing, &c.image(NAME));
}

#[test]
fn the_mirror_keeps_going_through_packet_loss() {
    require_netns!("the_mirror_keeps_going_through_packet_loss");
    let (c, backing, mnt) = mounted("loss");
    let mut figures = Vec::new();
    for loss in [0u32, 1, 5] {
        c.net.set_loss(loss);
        // Throughput of one 8 MiB write, and the latency of small write+fsync pairs (printed;
        // the test asserts only that everything arrives, exactly once).
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i ^ loss) as u8).collect();
        let started = std::time::Instant::now();
        fs::write(mnt.join(format!("big-{loss}")), &data).expect("8 MiB write under loss");
        let mib_s = 8.0 / started.elapsed().as_secs_f64();
        let mut lat = Vec::new();
        let mut f = fs::File::create(mnt.join(format!("small-{loss}"))).expect("create");
        for i in 0..100u32 {
            let t = std::time::Instant::now();
            f.write_all(&i.to_le_bytes()).expect("small write");
            f.sync_all().expect("fsync");
            lat.push(t.elapsed());
        }
        lat.sort();
        figures.push(format!(
            "loss {loss}%: 8 MiB write {mib_s:.1} MiB/s, write+fsync p50 {:?} p99 {:?}",
            lat[50], lat[98]
        ));
        c.cp(&mnt);
        assert_eq!(
            fs::read(c.image(NAME).join(format!("big-{loss}"))).expect("big in the image"),
            data,
            "loss {loss}%"
        );
    }
    c.net.set_loss(0);
    for l in &figures {
        eprintln!("loss: {l}");
    }
    assert_trees_equal(&backing, &c.image(NAME));
}

/// Writes go on (one small file each, one at a time) while `change` alters the network path;
/// returns the number of writes and the slowest one. The change happens after 50 writes and
/// the writer stops after 300 more, so the change is surrounded by traffic on both sides.
fn writes_across(mnt: &Path, change: impl FnOnce()) -> (u32, Duration) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let done = std::sync::Arc::new(AtomicU32::new(0));
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), mnt.to_path_buf());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                let t = std::time::Instant::now();
                fs::write(mnt.join(format!("w{i}")), i.to_le_bytes()).expect("write");
                worst = worst.max(t.elapsed());
                i += 1;
                done.store(i, Relaxed);
            }
            (i, worst)
        })
    };
    let progress = |n: u32, what: &str| {
        wait_until(what, Duration::from_secs(30), || {
            done.load(Relaxed) >= n || writer.is_finished()
        })
    };
    progress(50, "50 writes before the change");
    change();
    let after = done.load(Relaxed) + 300;
    progress(after, "300 writes after the change");
    stop.store(true, Relaxed);
    writer.join().expect("writer")
}

/// After a path change: not degraded, link up, followed without a second handshake (a
/// reconnection would take the 2 s idle timeout at least), no write stalled a second.
fn assert_followed(c: &Cluster, mnt: &Path, what: &str, writes: u32, worst: Duration) {
    let s = c.status(mnt);
    eprintln!(
        "{what}: {writes} writes, the slowest took {worst:?}; status link {} degraded {}",
        s["link"], s["degraded"]
    );
    assert_eq!(
        s["degraded"], false,
        "{what}: the source went on alone: {s}"
    );
    assert_eq!(s["link"], "up", "{what}: {s}");
    let log = fs::read_to_string(c.log_dir.join("fs-source-a.log")).expect("the source's log");
    assert_eq!(
        log.matches("connected to destination").count(),
        1,
        "{what}: the link was re-established instead of following the new path:\n{log}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "{what}: a write stalled {worst:?}"
    );
}

/// The destination's view of where source NAME is now.
fn peer_address(c: &Cluster) -> String {
    let out = c
        .fs_dest()
        .args(["status", "--json", "--root"])
        .arg(&c.dest_root)
        .output()
        .expect("run fs-dest status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["sources"][0]["peer_address"]
        .as_str()
        .unwrap_or_else(|| panic!("no peer address in {v}"))
        .to_string()
}

#[test]
fn the_link_follows_a_change_of_the_source_address() {
    require_netns!("the_link_follows_a_change_of_the_source_address");
    let (c, backing, mnt) = mounted("migrate");
    let before = peer_address(&c);
    assert!(
        before.starts_with(nvmirror_e2e::netns::SOURCE_IP),
        "{before}"
    );
    let (writes, worst) = writes_across(&mnt, || {
        c.net
            .move_source_address(nvmirror_e2e::netns::SOURCE_IP, "10.77.0.3")
    });
    assert_followed(&c, &mnt, "address change", writes, worst);
    let now = peer_address(&c);
    assert!(now.starts_with("10.77.0.3:"), "the destination sees {now}");
    c.cp(&mnt);
    assert_trees_equal(&backing, &c.image(NAME));
}

#[test]
fn the_link_follows_a_nat_rebinding() {
    require_netns!("the_link_follows_a_nat_rebinding");
    let (c, backing, mnt) = mounted("rebind");
    let dest_port: u16 = c
        .dest_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("destination port");
    let mut ports = None;
    let (writes, worst) = writes_across(&mnt, || ports = Some(c.net.rebind_source_port(dest_port)));
    let (real, seen) = ports.expect("rebound");
    assert_followed(&c, &mnt, "NAT rebinding", writes, worst);
    let now = peer_address(&c);
    assert_eq!(
        now,
        format!("{}:{seen}", nvmirror_e2e::netns::SOURCE_IP),
        "the destination follows the new port (the socket's own is {real})"
    );
    c.cp(&mnt);
    assert_trees_equal(&backing, &c.image(NAME));
}
