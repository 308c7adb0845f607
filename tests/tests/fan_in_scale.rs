//! Fan-in at scale (issue 11): 64 sources mirror at once into one `fs-dest`, each into its own
//! image; and the figures of docs/scale.md (`fan_in_figures`, `#[ignore]`d: run it with
//! `tests/bench/fan_in.sh`): per-source throughput and write+fsync latency with 1, 4, 16 and
//! 64 sources, the destination's memory, and the latency of one source while others fill and
//! commit a large partition, flood bad records, or stall. Timing never fails a test; only
//! correctness does (every image equals its backing volume at the end).

use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nvmirror_e2e::fleet::{open_fds, par_map, Fleet, FleetOptions, Memory};
use nvmirror_e2e::{require_mount, Rng};

const MIB: f64 = 1048576.0;

/// A light workload: a few files, a directory, a rename, an unlink, a symlink, a chmod, an
/// append; a few KiB in all.
fn light_workload(root: &Path, rng: &mut Rng) {
    let p = |rel: &str| root.join(rel);
    fs::create_dir(p("d")).expect("mkdir d");
    for (name, len) in [("d/a", 3000), ("d/b", 2048), ("c", 1024), ("e", 700)] {
        let len = len + rng.below(512) as usize;
        fs::write(p(name), rng.bytes(len)).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
    fs::rename(p("d/a"), p("d/a.renamed")).expect("rename");
    fs::remove_file(p("d/b")).expect("unlink");
    let f = OpenOptions::new()
        .append(true)
        .open(p("c"))
        .expect("open c");
    f.write_all_at(&rng.bytes(300), 1024 + 512).expect("append");
    f.sync_all().expect("fsync c");
    symlink("c", p("l")).expect("symlink");
    fs::set_permissions(p("e"), fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[track_caller]
fn assert_dest_lists(fleet: &Fleet, names: &[String]) {
    let status = fleet.harness.dest_status();
    let sources = status["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("fs-dest status has no sources: {status}"));
    for name in names {
        let s = sources
            .iter()
            .find(|s| s["name"] == name.as_str())
            .unwrap_or_else(|| panic!("fs-dest status does not list {name}: {status}"));
        assert_eq!(s["connected"], true, "{name} connected: {s}");
        assert_eq!(s["apply_errors"], 0, "{name} has no apply errors: {s}");
        assert_eq!(s["out_of_sync"], 0, "{name} has nothing out of sync: {s}");
        assert_eq!(s["sync"], "in-sync", "{name} in sync: {s}");
        assert_eq!(
            s["applied_seq"], s["durable_seq"],
            "{name}: every durable record applied: {s}"
        );
    }
    let connected = sources.iter().filter(|s| s["connected"] == true).count();
    assert_eq!(connected, names.len(), "connected sources: {status}");
}

#[test]
fn sixty_four_sources_mirror_into_their_own_images() {
    const TEST: &str = "fan64";
    require_mount!(TEST);
    let seed = Rng::from_env(TEST).next_u64();
    // NVMIRROR_FAN_SOURCES: another fleet size (to probe the limits).
    let n: usize = env_or("NVMIRROR_FAN_SOURCES", 64);
    let started = Instant::now();
    let mut fleet = Fleet::start(FleetOptions::new(TEST, n));
    let mounted = started.elapsed();
    let mnts = fleet.mountpoints();
    par_map(&mnts, 16, |i, m| {
        light_workload(m, &mut Rng::new(seed ^ (i as u64 + 1)))
    });
    fleet.cp_all();
    fleet.assert_images_equal();
    let names: Vec<String> = (0..n).map(Fleet::name).collect();
    assert_dest_lists(&fleet, &names);
    let mem = fleet.dest_memory();
    let log = fleet.harness.log_dir.join("fs-dest.log");
    let refused = fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("too many connections still in their handshake"))
        .count();
    let t = Instant::now();
    let stopped = fleet.stop_all();
    let unclean: Vec<_> = stopped
        .iter()
        .filter(|(_, st)| !st.is_some_and(|s| s.success()))
        .collect();
    assert!(
        unclean.is_empty(),
        "every source exits 0 on SIGTERM: {unclean:?}"
    );
    eprintln!(
        "{TEST}: {n} sources mounted in {:.1} s ({} at once; {refused} pre-authentication \
         refusal log lines), stopped in {:.1} s; fs-dest VmRSS {} MiB, VmHWM {} MiB; {:.1} s \
         in all",
        mounted.as_secs_f64(),
        fleet.options.parallel,
        t.elapsed().as_secs_f64(),
        mem.rss_kib / 1024,
        mem.hwm_kib / 1024,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Figures

/// What one writer measured.
#[derive(Default, Clone)]
struct Run {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Run {
    fn ops_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The `q` quantile of `lat` (sorted in place), in ms.
fn quantile_ms(lat: &mut [Duration], q: f64) -> f64 {
    if lat.is_empty() {
        return f64::NAN;
    }
    lat.sort_unstable();
    let i = ((lat.len() - 1) as f64 * q).round() as usize;
    lat[i].as_secs_f64() * 1000.0
}

/// 4 KiB pwrite + fsync pairs on `path` (overwriting the first 1 MiB in turn) until `until`.
fn fsync_loop(path: &Path, until: Instant) -> Run {
    fsync_loop_while(path, until, &|| true)
}

/// [`fsync_loop`], going on past `until` until `done()` (at most two minutes more).
fn fsync_loop_while(path: &Path, until: Instant, done: &dyn Fn() -> bool) -> Run {
    let cap = until + Duration::from_secs(120);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let block = vec![0x5au8; 4096];
    let start = Instant::now();
    let mut run = Run::default();
    loop {
        let now = Instant::now();
        if now >= cap || (now >= until && done()) {
            break;
        }
        let t = Instant::now();
        f.write_all_at(&block, (run.ops % 256) * 4096)
            .expect("write");
        f.sync_data().expect("fsync");
        run.lat.push(t.elapsed());
        run.ops += 1;
        run.bytes += 4096;
    }
    run.elapsed = start.elapsed();
    run
}

/// Every mount point runs [`fsync_loop`] for `secs`, all starting together.
fn fsync_all(mnts: &[PathBuf], secs: f64) -> Vec<Run> {
    let barrier = Barrier::new(mnts.len());
    par_map(mnts, mnts.len(), |_, m| {
        barrier.wait();
        fsync_loop(
            &m.join("fsync"),
            Instant::now() + Duration::from_secs_f64(secs),
        )
    })
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct ScaleRow {
    n: usize,
    mount_s: f64,
    idle: Memory,
    after: Memory,
    dest_fds: usize,
    source_rss_kib: u64,
    runs: Vec<Run>,
}

fn scale_row(n: usize, secs: f64) -> ScaleRow {
    let fleet = Fleet::start(FleetOptions::new("fanb", n).partition_size_bytes(1 << 20));
    let idle = fleet.dest_memory();
    let runs = fsync_all(&fleet.mountpoints(), secs);
    let after = fleet.dest_memory();
    let dest_fds = open_fds(fleet.dest_pid());
    let source_rss_kib = fleet.mean_source_rss_kib();
    fleet.cp_all();
    fleet.assert_images_equal();
    let names: Vec<String> = (0..n).map(Fleet::name).collect();
    assert_dest_lists(&fleet, &names);
    ScaleRow {
        n,
        mount_s: fleet.mount_time.as_secs_f64(),
        idle,
        after,
        dest_fds,
        source_rss_kib,
        runs,
    }
}

// The hostile client (as in tests/hostile.rs): a certificate signed by the destination's CA,
// a valid Hello, then frames that are not frames; the destination answers Error and closes.

mod hostile {
    use super::*;
    use proto::wire::{self, Control, Message, PROTOCOL_VERSION};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    const ALPN: &[u8] = b"nvmirror/1";
    const SERVER_NAME: &str = "nvmirror-dest";
    const WAIT: Duration = Duration::from_secs(10);

    fn endpoint(tls: &Path, name: &str) -> quinn::Endpoint {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(tls.join("ca.pem")).expect("ca.pem") {
            roots.add(c.expect("CA certificate")).expect("usable CA");
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(tls.join(format!("{name}.pem")))
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("client certificate");
        let key = PrivateKeyDer::from_pem_file(tls.join(format!("{name}.key"))).expect("key");
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).expect("QUIC config");
        let mut ep =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        ep
    }

    async fn next(recv: &mut quinn::RecvStream) -> Option<Control> {
        tokio::time::timeout(WAIT, async {
            let mut h = [0u8; wire::HEADER_LEN];
            recv.read_exact(&mut h).await.ok()?;
            let (kind, len) = wire::parse_header(&h).ok()?;
            let mut body = vec![0u8; len];
            recv.read_exact(&mut body).await.ok()?;
            match wire::decode_body(kind, body).ok()? {
                Message::Control(c) => Some(c),
                Message::Frames(_) => None,
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// One round: connect, Hello, 16 KiB of garbage frames; true if the destination answered
    /// with an Error.
    async fn round(ep: &quinn::Endpoint, addr: SocketAddr, name: &str) -> bool {
        let Ok(connecting) = ep.connect(addr, SERVER_NAME) else {
            return false;
        };
        let Ok(Ok(conn)) = tokio::time::timeout(WAIT, connecting).await else {
            return false;
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return false;
        };
        let hello = Control::Hello {
            protocol: PROTOCOL_VERSION,
            source: name.into(),
            generation: 0,
            last_logged_seq: 0,
            volume: format!("v-{name}"),
            take_over: false,
        };
        let _ = send.write_all(&wire::encode_control(&hello)).await;
        if !matches!(next(&mut recv).await, Some(Control::Welcome { .. })) {
            return false;
        }
        let garbage = vec![0xabu8; 16 << 10];
        let mut m = wire::header(wire::KIND_FRAMES, garbage.len()).to_vec();
        m.extend_from_slice(&garbage);
        let _ = send.write_all(&m).await;
        loop {
            match next(&mut recv).await {
                Some(Control::Ack { .. }) => continue,
                Some(Control::Error { .. }) => return true,
                _ => return false,
            }
        }
    }

    /// Floods the destination from `names.len()` clients at once until `stop`; returns
    /// (rounds, rounds answered with an Error).
    pub fn flood(
        tls: &Path,
        addr: SocketAddr,
        names: &[String],
        stop: Arc<AtomicBool>,
    ) -> (u64, u64) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let rounds = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        rt.block_on(async {
            let mut tasks = Vec::new();
            for name in names {
                let ep = endpoint(tls, name);
                let (name, rounds, errors, stop) =
                    (name.clone(), rounds.clone(), errors.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        rounds.fetch_add(1, Ordering::Relaxed);
                        if round(&ep, addr, &name).await {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        (
            rounds.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
        )
    }
}

/// A background load on the fleet while source A measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    /// Nothing else.
    Alone,
    /// B (64 MiB partitions) rewrites a 64 MiB file in 1 MiB writes, fsync, `fs-source cp`.
    FullPartitionCp,
    /// C: 4 hostile clients loop connect, Hello, garbage frames.
    HostileFlood,
    /// D streams 1 MiB writes, then its fs-source is SIGSTOPped for A's whole run.
    Stall,
}

struct IsoRow {
    case: String,
    a: Run,
    note: String,
}

/// Stops the background load and sends SIGCONT to a stopped source when dropped, also on
/// panic (a scope would otherwise wait forever for a writer blocked on the stopped mount, or
/// one that never sees its stop flag).
struct Release<'a> {
    stop: &'a AtomicBool,
    stopped: Option<&'a nvmirror_e2e::Daemon>,
    /// D's writer: a separate process, so that no thread of this (measuring, forking) process
    /// is ever blocked on the stopped mount. Killed after the SIGCONT.
    writer: Option<std::process::Child>,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.stopped.take() {
            d.signal(libc::SIGCONT);
        }
        if let Some(mut w) = self.writer.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// D's writer: `dd` streaming 1 MiB writes into `big` on D's mount (at most 256 MiB).
fn spawn_stream_writer(mountpoint: &Path) -> std::process::Child {
    std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mountpoint.join("big").display()))
        .args(["bs=1M", "count=256", "status=none"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start dd on D's mount")
}

/// Whether `fs-dest status --json` answers within `timeout`, and whether it then lists
/// source `name` as connected: `None` if it did not answer (it is killed).
fn status_probe(fleet: &Fleet, name: &str, timeout: Duration) -> Option<bool> {
    let mut child = fleet
        .harness
        .fs_dest()
        .args(["status", "--json", "--root"])
        .arg(&fleet.harness.dest_root)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fs-dest status");
    let done = nvmirror_e2e::poll_until(timeout, || child.try_wait().expect("try_wait").is_some());
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let s = v["sources"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)?;
    Some(s["connected"] == true)
}

/// Source A (the fleet's first source) runs 4 KiB write+fsync for `secs` while `load` runs.
fn isolation_case(fleet: &mut Fleet, load: Load, secs: f64, case: &str) -> IsoRow {
    let a_mnt = fleet.sources()[0].mountpoint.clone();
    let other = match load {
        Load::FullPartitionCp => {
            let mut o = fleet.options.source_options("b");
            o.partition_size_bytes = Some(64 << 20);
            Some(fleet.add_source(&o))
        }
        Load::Stall => {
            let n = format!("d{}", fleet.sources().len());
            Some(fleet.add_source(&fleet.options.source_options(&n)))
        }
        Load::Alone | Load::HostileFlood => None,
    };
    let c_names: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    if load == Load::HostileFlood {
        fleet.issue(&c_names);
    }
    let fleet = &*fleet;
    let stop = Arc::new(AtomicBool::new(false));
    let written = AtomicU64::new(0);
    let cps_done = AtomicU64::new(0);
    thread::scope(|s| {
        let mut release = Release {
            stop: &stop,
            stopped: None,
            writer: None,
        };
        let (stop, written, cps_done) = (&stop, &written, &cps_done);
        let bg = match load {
            Load::Alone => None,
            Load::Stall => None,
            Load::FullPartitionCp => {
                let o = &fleet.sources()[other.expect("B")];
                let h = &fleet.harness;
                Some(s.spawn(move || {
                    let f = File::create(o.mountpoint.join("big")).expect("create big");
                    let chunk = vec![0xb5u8; 1 << 20];
                    let mut cps = 0u32;
                    'outer: while !stop.load(Ordering::Relaxed) {
                        for i in 0..64u64 {
                            f.write_all_at(&chunk, i << 20).expect("write big");
                            written.fetch_add(1 << 20, Ordering::Relaxed);
                            if stop.load(Ordering::Relaxed) {
                                break 'outer;
                            }
                        }
                        f.sync_data().expect("fsync big");
                        h.cp_of(&o.mountpoint);
                        cps += 1;
                        cps_done.fetch_add(1, Ordering::Relaxed);
                    }
                    let mib = written.load(Ordering::Relaxed) as f64 / MIB;
                    format!(
                        "B wrote {mib:.0} MiB ({:.1} MiB/s), {cps} CPs on demand",
                        mib / secs
                    )
                }))
            }
            Load::HostileFlood => {
                let tls = fleet.harness.tls_dir.clone();
                let addr: SocketAddr = fleet.harness.dest_addr.parse().expect("dest address");
                let (names, stop) = (&c_names, stop.clone());
                Some(s.spawn(move || {
                    let (rounds, errors) = hostile::flood(&tls, addr, names, stop);
                    format!(
                        "C: {rounds} connections with a bad batch ({:.0}/s), {errors} answered Error",
                        rounds as f64 / secs
                    )
                }))
            }
        };
        if load == Load::Stall {
            let d = &fleet.sources()[other.expect("D")];
            release.writer = Some(spawn_stream_writer(&d.mountpoint));
            // Progress is read from the backing volume, never through D's mount.
            let backing = d.backing.join("big");
            let size = || std::fs::metadata(&backing).map(|m| m.len()).unwrap_or(0);
            nvmirror_e2e::wait_until("D to have streamed 4 MiB", Duration::from_secs(60), || {
                size() >= 4 << 20
            });
            d.daemon.signal(libc::SIGSTOP);
            written.store(size(), Ordering::Relaxed);
            release.stopped = Some(&d.daemon);
        }
        // With B, A measures at least until B's first full partition was committed.
        let a = fsync_loop_while(
            &a_mnt.join("fsync"),
            Instant::now() + Duration::from_secs_f64(secs),
            &|| load != Load::FullPartitionCp || cps_done.load(Ordering::Relaxed) > 0,
        );
        // fs-dest status while D is still stopped (it must answer; timing is reported only).
        let probe_started = Instant::now();
        let d_connected = (load == Load::Stall).then(|| {
            let d = &fleet.sources()[other.expect("D")];
            status_probe(fleet, &d.name, Duration::from_secs(10))
        });
        let probe_s = probe_started.elapsed().as_secs_f64();
        let stalled_at = written.load(Ordering::Relaxed);
        drop(release);
        let mut note = bg
            .map(|t| t.join().expect("background load"))
            .unwrap_or_default();
        if load == Load::Stall {
            let d = &fleet.sources()[other.expect("D")];
            let total = std::fs::metadata(d.backing.join("big")).map_or(0, |m| m.len());
            note = format!(
                "D stopped after {} MiB, for {secs:.0} s; fs-dest status then: {} ({probe_s:.1} \
                 s); D's file {} MiB after SIGCONT{note}",
                stalled_at >> 20,
                match d_connected.flatten() {
                    Some(true) => "D connected",
                    Some(false) => "D disconnected",
                    None => "NO ANSWER within 10 s",
                },
                total >> 20
            );
        }
        IsoRow {
            case: case.to_string(),
            a,
            note,
        }
    })
}

fn print_scale(rows: &mut [ScaleRow], secs: f64) {
    println!(
        "\n4 KiB write+fsync, one writer per source, {secs:.0} s, all sources at once \
         (per source: mean, and min..max over sources; p50/p99 over every operation of every \
         source; worst: the highest p99 of one source)"
    );
    println!(
        "| sources | ops/s per source (min..max) | MiB/s per source | p50 ms | p99 ms | worst p99 ms | total ops/s | total MiB/s |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows.iter_mut() {
        let n = r.runs.len() as f64;
        let ops: Vec<f64> = r.runs.iter().map(Run::ops_s).collect();
        let total: f64 = ops.iter().sum();
        let total_mib: f64 = r.runs.iter().map(Run::mib_s).sum();
        let min = ops.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ops.iter().cloned().fold(0.0, f64::max);
        let worst = r
            .runs
            .iter_mut()
            .map(|x| quantile_ms(&mut x.lat, 0.99))
            .fold(0.0, f64::max);
        let mut all: Vec<Duration> = r.runs.iter().flat_map(|x| x.lat.iter().cloned()).collect();
        println!(
            "| {} | {:.0} ({:.0}..{:.0}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} |",
            r.n,
            total / n,
            min,
            max,
            total_mib / n,
            quantile_ms(&mut all, 0.5),
            quantile_ms(&mut all, 0.99),
            worst,
            total,
            total_mib,
        );
    }
    println!(
        "\nresources (fs-dest: its NVRAM, 2 x 64 MiB, is mapped and counts in its RSS; \
         idle = all mounted, before the run; after = at the end of the run)"
    );
    println!(
        "| sources | mount all (s) | fs-dest VmRSS idle (MiB) | VmRSS after (MiB) | VmHWM (MiB) | fs-dest open fds | fs-source VmRSS, mean (MiB) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows.iter() {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
            r.n,
            r.mount_s,
            r.idle.rss_kib as f64 / 1024.0,
            r.after.rss_kib as f64 / 1024.0,
            r.after.hwm_kib as f64 / 1024.0,
            r.dest_fds,
            r.source_rss_kib as f64 / 1024.0
        );
    }
}

fn iso_line(r: &mut IsoRow) -> String {
    let ops = r.a.ops_s();
    let max =
        r.a.lat
            .iter()
            .max()
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    format!(
        "| {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {} |",
        r.case,
        r.a.elapsed.as_secs_f64(),
        ops,
        quantile_ms(&mut r.a.lat, 0.5),
        quantile_ms(&mut r.a.lat, 0.99),
        max,
        r.note
    )
}

fn print_isolation(rows: &mut [IsoRow], secs: f64) {
    println!("\nsource A: 4 KiB write+fsync for {secs:.0} s while another load runs");
    println!("| case | A ran (s) | A ops/s | A p50 ms | A p99 ms | A max ms | the other load |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in rows.iter_mut() {
        println!("{}", iso_line(r));
    }
}

/// The figures of docs/scale.md; `tests/bench/fan_in.sh` runs it with release binaries.
/// `NVMIRROR_BENCH_SECS` (default 10) is each measurement's length, `NVMIRROR_BENCH_SOURCES`
/// (default `1,4,16,64`) the fleet sizes.
#[test]
#[ignore = "figures, not a check: run tests/bench/fan_in.sh"]
fn fan_in_figures() {
    const TEST: &str = "fan_in_figures";
    require_mount!(TEST);
    let secs: f64 = env_or("NVMIRROR_BENCH_SECS", 10.0);
    let counts: Vec<usize> = std::env::var("NVMIRROR_BENCH_SOURCES")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .filter(|n| !n.trim().is_empty())
        .map(|n| n.trim().parse().expect("NVMIRROR_BENCH_SOURCES: numbers"))
        .collect();
    let mut scale: Vec<ScaleRow> = Vec::new();
    for &n in counts.iter().filter(|&&n| n > 0) {
        eprintln!("{TEST}: {n} sources");
        scale.push(scale_row(n, secs));
    }
    if !scale.is_empty() {
        print_scale(&mut scale, secs);
    }

    let mut iso = Vec::new();
    {
        let mut fleet = Fleet::start(FleetOptions::new("fani", 1).partition_size_bytes(1 << 20));
        for (load, case) in [
            (Load::Alone, "(i) A alone"),
            (
                Load::FullPartitionCp,
                "(ii) B fills a 64 MiB partition + cp",
            ),
            (Load::HostileFlood, "(iii) C floods bad records"),
            (
                Load::Stall,
                "(iv) D stalls (SIGSTOP), default 2 s idle timeout",
            ),
        ] {
            eprintln!("{TEST}: {case}");
            let mut row = isolation_case(&mut fleet, load, secs, case);
            // Printed at once too: a case that hangs must not lose the ones before it.
            eprintln!("{TEST}: {}", iso_line(&mut row));
            iso.push(row);
        }
        fleet.cp_all();
        fleet.assert_images_equal();
        eprintln!(
            "{TEST}: fs-dest after the isolation cases: {:?}",
            fleet.dest_memory()
        );
    }
    {
        // The same stall with a destination that keeps a silent connection open for 60 s:
        // D's connection sits open, with its last records unacknowledged, through A's run.
        let mut fleet = Fleet::start(
            FleetOptions::new("fanj", 1)
                .partition_size_bytes(1 << 20)
                .dest_args(["--idle-timeout-ms", "60000", "--keep-alive-ms", "1000"])
                .source_args(["--idle-timeout-ms", "60000", "--keep-alive-ms", "1000"]),
        );
        for (load, case) in [
            (Load::Alone, "(i') A alone, 60 s idle timeout"),
            (
                Load::Stall,
                "(iv') D stalls (SIGSTOP), connection held open (60 s idle timeout)",
            ),
        ] {
            eprintln!("{TEST}: {case}");
            let mut row = isolation_case(&mut fleet, load, secs, case);
            // Printed at once too: a case that hangs must not lose the ones before it.
            eprintln!("{TEST}: {}", iso_line(&mut row));
            iso.push(row);
        }
        fleet.cp_all();
        fleet.assert_images_equal();
    }
    print_isolation(&mut iso, secs);
}
