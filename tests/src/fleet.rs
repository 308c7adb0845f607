//! Many sources against one destination (issue 11, fan-in at scale).
//!
//! A [`Fleet`] is a [`Harness`] without a main source plus N mounted sources named `s00`,
//! `s01`, ...: it issues N certificates and starts N `fs-source mount`s against one `fs-dest`,
//! a few at a time (each with small partitions and few FUSE threads, so 64 fit on a 2-core
//! machine), every wait bounded by the harness's timeouts. Dropping it stops every source at
//! once — SIGCONT (a test may have stopped one), SIGTERM, a bounded wait, then a lazy unmount
//! and SIGKILL for the ones still there — and then the destination, also when the test panics
//! (the harness then prints every log).
//!
//! Names stay short on purpose: the temp dir, mount points and control sockets
//! (`<temp>/run/source-<hash>.sock`) must keep below the 108-byte `sun_path` limit.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::{
    assert_trees_equal_named, is_mounted, lazy_unmount, poll_until, Harness, HarnessOptions,
    SourceMount, SourceOptions, SHUTDOWN_TIMEOUT,
};

/// What a [`Fleet`] is made of.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The test's name (short: it is part of every path).
    pub test: String,
    /// How many sources to mount at start.
    pub sources: usize,
    /// `--partition-size` of every source (at least 64 KiB).
    pub partition_size_bytes: u64,
    /// `--partitions` of every source.
    pub partitions: u32,
    /// `--threads` (FUSE worker threads) of every source.
    pub threads: usize,
    /// How many `fs-source mount`s (and `certs issue`, `cp`) run at once.
    pub parallel: usize,
    /// More arguments for every `fs-source mount`.
    pub source_args: Vec<String>,
    /// More arguments for `fs-dest serve`.
    pub dest_args: Vec<String>,
}

impl FleetOptions {
    /// `sources` sources with 2 partitions of 256 KiB each, 2 FUSE threads, 8 mounts at once
    /// (`NVMIRROR_FLEET_PARALLEL` overrides that).
    pub fn new(test: &str, sources: usize) -> FleetOptions {
        let parallel = std::env::var("NVMIRROR_FLEET_PARALLEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8);
        FleetOptions {
            test: test.to_string(),
            sources,
            partition_size_bytes: 256 << 10,
            partitions: 2,
            threads: 2,
            parallel,
            source_args: Vec::new(),
            dest_args: Vec::new(),
        }
    }

    /// Sets `--partition-size` of every source.
    pub fn partition_size_bytes(mut self, bytes: u64) -> Self {
        self.partition_size_bytes = bytes;
        self
    }

    /// Sets how many mounts run at once.
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = n.max(1);
        self
    }

    /// Adds arguments to `fs-dest serve`.
    pub fn dest_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.dest_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds arguments to every `fs-source mount`.
    pub fn source_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.source_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The mount options of source `name` in this fleet.
    pub fn source_options(&self, name: &str) -> SourceOptions {
        let mut o = SourceOptions::new(name);
        o.partitions = Some(self.partitions);
        o.partition_size_bytes = Some(self.partition_size_bytes);
        o.extra_args = vec!["--threads".into(), self.threads.to_string()];
        o.extra_args.extend(self.source_args.iter().cloned());
        o
    }
}

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmRSS: resident now, KiB.
    pub rss_kib: u64,
    /// VmHWM: the peak resident size so far, KiB.
    pub hwm_kib: u64,
}

/// Resident memory of process `pid` (zeros if it is gone), parsed as the daemons parse their
/// own (`proto::memory`).
pub fn memory_of(pid: i32) -> Memory {
    let r = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| proto::memory::parse_status(&t))
        .unwrap_or_default();
    Memory {
        rss_kib: r.rss_bytes / 1024,
        hwm_kib: r.peak_bytes / 1024,
    }
}

/// How many file descriptors process `pid` has open (0 if it is gone).
pub fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Runs `f(i, &items[i])` for every item on at most `parallel` threads; returns the results in
/// order. A panic in `f` is re-raised once every thread has finished.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    f: impl Fn(usize, &T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..parallel.clamp(1, items.len().max(1)) {
            let (tx, next, f) = (tx.clone(), &next, &f);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(i, &items[i]);
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        for (i, r) in rx {
            out[i] = Some(r);
        }
    });
    out.into_iter()
        .map(|r| r.expect("every item ran"))
        .collect()
}

/// One destination and many mounted sources. See the module docs.
pub struct Fleet {
    /// The mounted sources, in the order of their names (`s00`, `s01`, ... then any added).
    sources: Vec<SourceMount>,
    /// The destination (its `source` is `None`), certificates, temp dir and logs.
    pub harness: Harness,
    /// What the fleet was started with.
    pub options: FleetOptions,
    /// How long mounting the initial sources took.
    pub mount_time: Duration,
}

impl Fleet {
    /// The name of the `i`-th source.
    pub fn name(i: usize) -> String {
        format!("s{i:02}")
    }

    /// Certificates, `fs-dest serve`, then `options.sources` sources mounted, `parallel` at
    /// a time. Panics (after stopping whatever started) if one does not mount.
    pub fn start(options: FleetOptions) -> Fleet {
        let mut hopts = HarnessOptions::new(&options.test);
        hopts.dest_args = options.dest_args.clone();
        let harness = Harness::start_dest_only(&hopts);
        let probe = harness.run_dir.join("source-0123456789abcdef.sock");
        assert!(
            probe.as_os_str().len() < 100,
            "control socket paths would be too long ({} bytes: {}); shorten the test name or \
             NVMIRROR_TEST_TMPDIR",
            probe.as_os_str().len(),
            probe.display()
        );
        let mut fleet = Fleet {
            sources: Vec::new(),
            harness,
            options,
            mount_time: Duration::ZERO,
        };
        let names: Vec<String> = (0..fleet.options.sources).map(Fleet::name).collect();
        let started = Instant::now();
        fleet.issue(&names);
        let opts: Vec<SourceOptions> = names
            .iter()
            .map(|n| fleet.options.source_options(n))
            .collect();
        fleet.mount_all(&opts);
        fleet.mount_time = started.elapsed();
        fleet
    }

    /// `fs-dest certs issue` for every name, `parallel` at a time.
    pub fn issue(&self, names: &[String]) {
        let tls = self.harness.tls_dir.clone();
        par_map(names, self.options.parallel, |_, n| {
            self.harness.certs_issue(&tls, n)
        });
    }

    /// Mounts every source of `opts` (certificates already issued), `parallel` at a time, and
    /// adds them to the fleet as they come up. Panics, naming the first failure with its log,
    /// if one does not mount; the fleet's drop then stops the others.
    pub fn mount_all(&mut self, opts: &[SourceOptions]) {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let mut first_error = None;
        let harness = &self.harness;
        let sources = &mut self.sources;
        let mut mounted: Vec<(usize, SourceMount)> = Vec::new();
        thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            for _ in 0..self.options.parallel.clamp(1, opts.len().max(1)) {
                let (tx, next, failed) = (tx.clone(), &next, &failed);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= opts.len() || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = harness.mount_source(&opts[i]);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    let _ = tx.send((i, r));
                });
            }
            drop(tx);
            for (i, r) in rx {
                match r {
                    Ok(m) => mounted.push((i, m)),
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(format!("{} did not mount: {e}", opts[i].name));
                        }
                    }
                }
            }
        });
        mounted.sort_by_key(|(i, _)| *i);
        sources.extend(mounted.into_iter().map(|(_, m)| m));
        if let Some(e) = first_error {
            panic!("{e}");
        }
    }

    /// Issues a certificate for `opts.name` and mounts it; returns its index.
    pub fn add_source(&mut self, opts: &SourceOptions) -> usize {
        self.issue(std::slice::from_ref(&opts.name));
        self.mount_all(std::slice::from_ref(opts));
        self.sources.len() - 1
    }

    /// The mounted sources.
    pub fn sources(&self) -> &[SourceMount] {
        &self.sources
    }

    /// Source `i` (mutable: to signal or stop its daemon).
    pub fn source_mut(&mut self, i: usize) -> &mut SourceMount {
        &mut self.sources[i]
    }

    /// Every source's mount point, in order.
    pub fn mountpoints(&self) -> Vec<PathBuf> {
        self.sources.iter().map(|s| s.mountpoint.clone()).collect()
    }

    /// `fs-source cp` on every source, `parallel` at a time (each bounded by the harness's
    /// command timeout); panics unless each succeeds.
    pub fn cp_all(&self) {
        let mnts = self.mountpoints();
        par_map(&mnts, self.options.parallel, |_, m| self.harness.cp_of(m));
    }

    /// Asserts that every source's image equals its backing dir (after [`Fleet::cp_all`]).
    #[track_caller]
    pub fn assert_images_equal(&self) {
        for s in &self.sources {
            assert_trees_equal_named(
                &s.backing,
                &self.harness.image_of(&s.name),
                &format!("{} backing", s.name),
                &format!("{} image", s.name),
            );
        }
    }

    /// The destination's pid.
    pub fn dest_pid(&self) -> i32 {
        self.harness
            .dest
            .as_ref()
            .expect("fs-dest is running")
            .pid()
    }

    /// The destination's resident memory now and at its peak.
    pub fn dest_memory(&self) -> Memory {
        memory_of(self.dest_pid())
    }

    /// The mean resident memory (VmRSS) of the sources' `fs-source` processes, KiB.
    pub fn mean_source_rss_kib(&self) -> u64 {
        let n = self.sources.len().max(1) as u64;
        self.sources
            .iter()
            .map(|s| memory_of(s.daemon.pid()).rss_kib)
            .sum::<u64>()
            / n
    }

    /// Stops every source at once (SIGCONT, SIGTERM) and waits, bounded, for all of them;
    /// the ones still there are unmounted lazily and killed. Returns each source's name and
    /// exit status after SIGTERM (`None`: it had to be killed). The fleet is left without
    /// sources; its destination keeps running.
    pub fn stop_all(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        stop_sources(std::mem::take(&mut self.sources))
    }

    /// The temp dir holding everything.
    pub fn dir(&self) -> &Path {
        &self.harness.dir
    }
}

/// See [`Fleet::stop_all`].
fn stop_sources(mut sources: Vec<SourceMount>) -> Vec<(String, Option<ExitStatus>)> {
    let mut status: Vec<Option<ExitStatus>> = vec![None; sources.len()];
    for (s, st) in sources.iter_mut().zip(status.iter_mut()) {
        *st = s.daemon.try_wait();
        if st.is_none() {
            s.daemon.signal(libc::SIGCONT);
            s.daemon.signal(libc::SIGTERM);
        }
    }
    // They unmount and flush together; give a large fleet a little more than one source gets.
    let timeout = SHUTDOWN_TIMEOUT + Duration::from_millis(250) * sources.len() as u32;
    poll_until(timeout, || {
        let mut all = true;
        for (s, st) in sources.iter_mut().zip(status.iter_mut()) {
            if st.is_none() {
                *st = s.daemon.try_wait();
                all &= st.is_some();
            }
        }
        all
    });
    for (s, st) in sources.iter_mut().zip(status.iter()) {
        if st.is_none() {
            eprintln!(
                "{}: did not exit within {timeout:?} of SIGTERM; unmounting and killing",
                s.daemon.name
            );
            lazy_unmount(&s.mountpoint);
            s.daemon.kill_now();
        }
        if is_mounted(&s.mountpoint) {
            lazy_unmount(&s.mountpoint);
        }
    }
    sources
        .into_iter()
        .zip(status)
        .map(|(s, st)| (s.name.clone(), st))
        .collect()
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A stopped destination would stall every unmount: wake it first.
        if let Some(dest) = &self.harness.dest {
            dest.signal(libc::SIGCONT);
        }
        let stopped = stop_sources(std::mem::take(&mut self.sources));
        if !thread::panicking() {
            let unclean: Vec<_> = stopped
                .iter()
                .filter(|(_, st)| !st.is_some_and(|s| s.success()))
                .collect();
            if !unclean.is_empty() {
                eprintln!(
                    "{}: sources that did not exit 0: {unclean:?}",
                    self.options.test
                );
            }
        }
        // Then `harness` drops: the destination stops, logs are printed on failure.
    }
}
