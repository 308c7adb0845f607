//! Distance between the source and the destination (issue 11, issue 12): a round-trip time
//! of several milliseconds and packet reordering, made with `nvm-netdelay` (NFQUEUE; there is no
//! netem on these kernels) between the two namespaces of `tests/src/netns.rs`.
//!
//! The assertions are about correctness only: the delay is really there (a lower bound on the
//! measured round trip), reordering really happens, and through both the mirror stays exact.
//! How fast the mirror is at a distance is measured by `tests/bench/distance.sh`, not asserted.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nvmirror_e2e::netns::{can_use_netns, Cluster, NetPair, Reorder, DEST_IP};
use nvmirror_e2e::{
    assert_trees_equal, require_mount, run_ok, run_with_timeout, show_output, Rng, COMMAND_TIMEOUT,
};

const NAME: &str = "alpha";

/// Half of the 5 ms round trip.
const ONE_WAY: Duration = Duration::from_micros(2500);

/// True when `iptables` is installed (tests/run installs it); prints why not otherwise.
fn have_iptables(test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v iptables && command -v ping"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{test}: running as root but `iptables` or `ping` is missing \
         (apt-get install iptables iputils-ping; tests/run installs them)"
    );
    found
}

/// One echo reply: its sequence number and round-trip time.
#[derive(Debug)]
struct Echo {
    seq: u32,
    rtt_ms: f64,
}

/// `ping -U` (user-to-user time: ping's default takes the kernel's receive timestamp, which is
/// set before the INPUT hook where the delay is) from the source namespace to the destination.
fn ping(net: &NetPair, count: u32, interval: &str) -> Vec<Echo> {
    let out = run_with_timeout(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", net.source_ns))
            .args(["--", "ping", "-U", "-n", "-W", "2", "-i", interval, "-c"])
            .arg(count.to_string())
            .arg(DEST_IP),
        COMMAND_TIMEOUT,
    );
    assert!(out.status.success(), "{}", show_output("ping", &out));
    let text = String::from_utf8_lossy(&out.stdout);
    let echoes: Vec<Echo> = text
        .lines()
        .filter_map(|l| {
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            let rtt_ms = l.split("time=").nth(1)?.split(' ').next()?.parse().ok()?;
            Some(Echo { seq, rtt_ms })
        })
        .collect();
    assert_eq!(
        echoes.len(),
        count as usize,
        "every echo answered exactly once:\n{text}"
    );
    echoes
}

/// The iptables rules of namespace `ns`.
fn rules(ns: &str) -> String {
    run_ok(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "iptables", "-S", "INPUT"]),
    )
}

/// A summary line's `packets N` / `reordered N` counter.
fn counter(summary: &str, name: &str) -> u64 {
    summary
        .split(&format!(" {name} "))
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} in nvm-netdelay's summary {summary:?}"))
}

#[test]
fn the_delay_tool_delays_reorders_fails_open_and_cleans_up() {
    let test = "the_delay_tool_delays_reorders_fails_open_and_cleans_up";
    if !can_use_netns(test) || !have_iptables(test) {
        return;
    }
    let net = NetPair::create();
    ping(&net, 3, "0.2");

    // A round trip of at least 2 × one way.
    let delay = net.set_delay(ONE_WAY, None);
    for ns in [&net.dest_ns, &net.source_ns] {
        assert!(rules(ns).contains("NFQUEUE"), "rule in {ns}: {}", rules(ns));
    }
    let echoes = ping(&net, 10, "0.05");
    let min = echoes.iter().map(|e| e.rtt_ms).fold(f64::MAX, f64::min);
    eprintln!("delay: 5 ms configured, ping -U {echoes:?}");
    assert!(
        min >= 5.0,
        "a round trip took {min} ms, less than the configured 5 ms: {echoes:?}"
    );
    let summaries = delay.stop();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    for s in &summaries {
        assert!(
            counter(s, "packets") >= 10,
            "each tool held the echoes: {s}"
        );
    }
    for ns in [&net.dest_ns, &net.source_ns] {
        assert!(!rules(ns).contains("NFQUEUE"), "rule left in {ns}");
    }

    // Reordering: echo requests 5 ms apart, half of them held 20 ms longer; replies overtake.
    let delay = net.set_delay(
        ONE_WAY,
        Some(Reorder {
            percent: 50.0,
            extra: Duration::from_millis(20),
        }),
    );
    let echoes = ping(&net, 40, "0.005");
    let min = echoes.iter().map(|e| e.rtt_ms).fold(f64::MAX, f64::min);
    assert!(min >= 5.0, "a round trip below 5 ms: {echoes:?}");
    let overtaken = echoes.windows(2).filter(|w| w[1].seq < w[0].seq).count();
    eprintln!("reorder: {overtaken} of 40 replies arrived after a later one: {echoes:?}");
    assert!(overtaken > 0, "no reply was overtaken: {echoes:?}");
    let summaries = delay.stop();
    assert!(
        summaries.iter().all(|s| counter(s, "reordered") > 0),
        "{summaries:?}"
    );

    // Fail-open: with the rule in place and the tool killed, packets still pass.
    let mut delay = net.set_delay(ONE_WAY, None);
    delay.kill_tools();
    for ns in [&net.dest_ns, &net.source_ns] {
        assert!(rules(ns).contains("NFQUEUE"), "the rule stays in {ns}");
    }
    ping(&net, 3, "0.05");
    drop(delay);
    for ns in [&net.dest_ns, &net.source_ns] {
        assert!(!rules(ns).contains("NFQUEUE"), "rule left in {ns}");
    }
}

/// `len` deterministic pseudo-random bytes.
fn data(rng: &mut Rng, len: usize) -> Vec<u8> {
    rng.bytes(len)
}

fn assert_clean_status(c: &Cluster, mnt: &Path, when: &str) {
    let s = c.status(mnt);
    assert_eq!(
        s["degraded"], false,
        "{when}: the source went on alone: {s}"
    );
    assert_eq!(s["link"], "up", "{when}: {s}");
    assert_eq!(s["sync"], "in-sync", "{when}: {s}");
    assert_eq!(
        s["last_acked_seq"], s["last_logged_seq"],
        "{when}: everything logged is acknowledged: {s}"
    );
}

#[test]
fn a_workload_mirrors_exactly_across_5ms_with_reordering() {
    let test = "a_workload_mirrors_exactly_across_5ms_with_reordering";
    require_mount!(test);
    if !can_use_netns(test) || !have_iptables(test) {
        return;
    }
    let mut rng = Rng::from_env(test);
    let mut c = Cluster::start("distance", NAME);
    let backing = c.dir.join("backing");
    // 5 ms round trip, 5 % of packets 2 ms late (more than the spacing of a bulk stream's
    // packets, so later ones overtake them; less than QUIC's time threshold for loss).
    let delay = c.net.set_delay(
        ONE_WAY,
        Some(Reorder {
            percent: 5.0,
            extra: Duration::from_millis(2),
        }),
    );
    let src = c
        .mount_source(NAME, &backing, &c.dir.join("source.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount across 5 ms: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);

    // A large sequential write, 1 MiB at a time, then fsync.
    let big = data(&mut rng, 32 << 20);
    {
        let mut f = fs::File::create(mnt.join("big")).expect("create big");
        for chunk in big.chunks(1 << 20) {
            f.write_all(chunk).expect("write big");
        }
        f.sync_all().expect("fsync big");
    }
    assert_clean_status(&c, &mnt, "after the sequential write");

    // Many small write+fsync pairs, appended and overwritten in place.
    {
        let mut f = fs::File::create(mnt.join("small")).expect("create small");
        for i in 0..200u64 {
            let block = data(&mut rng, 4096);
            if i % 4 == 3 {
                f.write_all_at(&block, (i / 2) * 4096).expect("overwrite");
            } else {
                f.seek(SeekFrom::End(0)).expect("seek");
                f.write_all(&block).expect("append");
            }
            f.sync_all().expect("fsync small");
        }
    }

    // Metadata: creates in nested directories, from two threads at once, then renames,
    // unlinks, a directory rename and rmdirs.
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let root = mnt.join(format!("meta{t}"));
            let seed = rng.next_u64();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed);
                for d in 0..5 {
                    let dir = root.join(format!("d{d}"));
                    fs::create_dir_all(&dir).expect("mkdir");
                    for f in 0..40 {
                        let len = rng.below(8192) as usize;
                        fs::write(dir.join(format!("f{f}")), rng.bytes(len)).expect("create");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("metadata writer");
    }
    for t in 0..2 {
        let root = mnt.join(format!("meta{t}"));
        for d in 0..5 {
            let dir = root.join(format!("d{d}"));
            for f in (0..40).step_by(2) {
                fs::rename(dir.join(format!("f{f}")), dir.join(format!("r{f}"))).expect("rename");
            }
            for f in (1..40).step_by(4) {
                fs::remove_file(dir.join(format!("f{f}"))).expect("unlink");
            }
        }
        fs::rename(root.join("d0"), root.join("moved")).expect("rename a directory");
        for f in fs::read_dir(root.join("d4")).expect("readdir") {
            fs::remove_file(f.expect("dirent").path()).expect("unlink");
        }
        fs::remove_dir(root.join("d4")).expect("rmdir");
    }

    c.cp(&mnt);
    assert_clean_status(&c, &mnt, "after the CP");
    assert_eq!(
        fs::read(c.image(NAME).join("big")).expect("big in the image"),
        big,
        "the sequential write arrived intact"
    );
    assert_trees_equal(&backing, &c.image(NAME));

    let summaries = delay.stop();
    eprintln!("distance: {summaries:?}");
    for s in &summaries {
        assert!(
            counter(s, "packets") > 100,
            "the traffic went through the delay: {s}"
        );
        assert!(
            counter(s, "reordered") > 0,
            "some packets were reordered: {s}"
        );
    }
    // The mirror keeps working after the delay goes away.
    fs::write(mnt.join("after"), b"after").expect("write after the delay");
    c.cp(&mnt);
    assert_trees_equal(&backing, &c.image(NAME));
}

// ---------------------------------------------------------------------------------------------
// Figures (not a test: `tests/bench/distance.sh` runs it with --ignored on a release build)

/// One row of the table: what the link was like.
struct Link {
    label: &'static str,
    one_way: Duration,
    reorder: Option<Reorder>,
    mbit: u32,
    /// Percent of packets dropped at random at each end (nftables).
    loss: u32,
}

/// Sequential write of `mib` MiB (1 MiB writes, fsync at the end): MiB/s.
fn sequential_mib_s(path: &Path, mib: usize) -> f64 {
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 + i / 4096) as u8).collect();
    let started = std::time::Instant::now();
    let mut f = fs::File::create(path).expect("create");
    for _ in 0..mib {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    let secs = started.elapsed().as_secs_f64();
    drop(f);
    fs::remove_file(path).expect("remove");
    mib as f64 / secs
}

/// `writers` threads at once, each writing `mib / writers` MiB to its own file as
/// [`sequential_mib_s`] does: aggregate MiB/s. If one writer is bound by its round trip per
/// FUSE request (1 MiB each, each acknowledged before the next is sent), more writers add up;
/// if the connection's windows or congestion control were the bound, they would not.
fn parallel_mib_s(dir: &Path, mib: usize, writers: usize) -> f64 {
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let path = dir.join(format!("par{w}"));
            std::thread::spawn(move || sequential_mib_s(&path, mib / writers))
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    (mib / writers * writers) as f64 / started.elapsed().as_secs_f64()
}

/// `n` 4 KiB write+fsync pairs (appends): (p50, p99).
fn fsync_latency(path: &Path, n: usize) -> (Duration, Duration) {
    let mut f = fs::File::create(path).expect("create");
    let block = vec![7u8; 4096];
    let mut lat: Vec<Duration> = (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            f.write_all(&block).expect("write");
            f.sync_all().expect("fsync");
            t.elapsed()
        })
        .collect();
    drop(f);
    fs::remove_file(path).expect("remove");
    lat.sort();
    (lat[n / 2], lat[(n * 99 / 100).min(n - 1)])
}

/// Creates of 4 KiB files (create, write, close) in one directory for up to `max` files or
/// `budget`: creates/s.
fn creates_per_s(dir: &Path, max: usize, budget: Duration) -> f64 {
    fs::create_dir_all(dir).expect("mkdir");
    let block = vec![3u8; 4096];
    let started = std::time::Instant::now();
    let mut n = 0;
    while n < max && started.elapsed() < budget {
        fs::write(dir.join(format!("f{n}")), &block).expect("create");
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    fs::remove_dir_all(dir).expect("remove");
    rate
}

/// Prints the distance table: for each link, sequential write MiB/s, 4 KiB write+fsync p50
/// and p99, creates/s. `NVMIRROR_BENCH_MIB` (default 128) sets the sequential write's size,
/// `NVMIRROR_BENCH_ROUNDS` (default 1) repeats the table (rows interleaved per round).
#[test]
#[ignore = "figures, not a test: run by tests/bench/distance.sh"]
fn distance_figures() {
    let test = "distance_figures";
    require_mount!(test);
    if !can_use_netns(test) || !have_iptables(test) {
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("NVMIRROR_BENCH_MIB", 128);
    let rounds = env("NVMIRROR_BENCH_ROUNDS", 1);
    let ms = |m: u64| Duration::from_micros(m * 500); // one way of an m ms round trip
    let links = [
        Link {
            label: "0 ms (no delay)",
            one_way: Duration::ZERO,
            reorder: None,
            mbit: 0,
            loss: 0,
        },
        Link {
            label: "1 ms",
            one_way: ms(1),
            reorder: None,
            mbit: 0,
            loss: 0,
        },
        Link {
            label: "5 ms",
            one_way: ms(5),
            reorder: None,
            mbit: 0,
            loss: 0,
        },
        Link {
            label: "10 ms",
            one_way: ms(10),
            reorder: None,
            mbit: 0,
            loss: 0,
        },
        Link {
            label: "5 ms, 5% reordered +2 ms",
            one_way: ms(5),
            reorder: Some(Reorder {
                percent: 5.0,
                extra: Duration::from_millis(2),
            }),
            mbit: 0,
            loss: 0,
        },
        Link {
            label: "0 ms, 1% loss",
            one_way: Duration::ZERO,
            reorder: None,
            mbit: 0,
            loss: 1,
        },
        Link {
            label: "0 ms, 5% loss",
            one_way: Duration::ZERO,
            reorder: None,
            mbit: 0,
            loss: 5,
        },
        Link {
            label: "0 ms, 100 mbit",
            one_way: Duration::ZERO,
            reorder: None,
            mbit: 100,
            loss: 0,
        },
        Link {
            label: "10 ms, 100 mbit",
            one_way: ms(10),
            reorder: None,
            mbit: 100,
            loss: 0,
        },
    ];
    let mut c = Cluster::start("distfig", NAME);
    let backing = c.dir.join("backing");
    let src = c
        .mount_source(NAME, &backing, &c.dir.join("source.nvram"), &[], "a")
        .unwrap_or_else(|e| panic!("mount: {e}"));
    let mnt = src.mountpoint.clone();
    c.sources.push(src);
    let mut rows = Vec::new();
    for round in 0..rounds {
        for link in &links {
            c.net.set_rate(link.mbit);
            c.net.set_loss(link.loss);
            let delay =
                (!link.one_way.is_zero()).then(|| c.net.set_delay(link.one_way, link.reorder));
            let seq = sequential_mib_s(&mnt.join("seq"), mib);
            let par = parallel_mib_s(&mnt, mib, 4);
            let (p50, p99) = fsync_latency(&mnt.join("small"), 200);
            let creates = creates_per_s(&mnt.join("meta"), 2000, Duration::from_secs(8));
            let summary = delay.map(|d| d.stop().join(" | ")).unwrap_or_default();
            c.net.set_rate(0);
            c.net.set_loss(0);
            assert_clean_status(&c, &mnt, link.label);
            c.cp(&mnt);
            let row = format!(
                "| {:<26} | {:>8.1} | {:>10.1} | {:>9.2} | {:>9.2} | {:>9.0} |",
                link.label,
                seq,
                par,
                p50.as_secs_f64() * 1000.0,
                p99.as_secs_f64() * 1000.0,
                creates
            );
            eprintln!("round {round}: {row}\n    delay tools: {summary}");
            rows.push(row);
        }
    }
    assert_trees_equal(&backing, &c.image(NAME));
    println!(
        "\nsequential write {mib} MiB (1 MiB writes + fsync; one writer, and 4 writers \
         together); 200 x 4 KiB write+fsync (ms); creates of 4 KiB files"
    );
    println!(
        "| link (RTT)                 |    MiB/s | 4 wr MiB/s | fsync p50 | fsync p99 | creates/s |"
    );
    println!(
        "| -------------------------- | -------- | ---------- | --------- | --------- | --------- |"
    );
    for r in rows {
        println!("{r}");
    }
}
