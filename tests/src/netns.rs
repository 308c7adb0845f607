//! Two test hosts in network namespaces: `fs-dest` on one, `fs-source` on the other, joined by
//! a veth pair, so that tests can take the link down and up.
//!
//! [`NetPair::create`] makes namespaces `nvmD<tag>` (destination, 10.77.0.1/24) and `nvmS<tag>`
//! (source, 10.77.0.2/24) with a veth pair between them; the addresses exist only inside these
//! namespaces. Dropping it deletes both namespaces (which deletes the veth pair), also when the
//! test panics.
//!
//! Commands run in a namespace with `nsenter --net=/run/netns/NS`, not `ip netns exec`: the
//! latter also enters a new mount namespace, so a FUSE mount made by `fs-source` there would be
//! invisible to the test.
//!
//! [`Cluster`] is the harness built on it: certificates, `fs-dest serve` in the destination
//! namespace, and helpers to mount sources in the source namespace and to browse; its `Drop`
//! stops everything (sources, browse mounts, destination) before the namespaces go away, and
//! prints every log when the test failed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{
    bin, daemon_output, is_mounted, lazy_unmount, run_ok, run_with_timeout, Daemon, SourceMount,
    SpawnFailure, COMMAND_TIMEOUT, SHUTDOWN_TIMEOUT, STARTUP_TIMEOUT,
};

/// The destination host's address (inside its namespace only).
pub const DEST_IP: &str = "10.77.0.1";
/// The source host's address (inside its namespace only).
pub const SOURCE_IP: &str = "10.77.0.2";
/// The destination's IPv6 address (after [`NetPair::add_ipv6`]).
pub const DEST_IP6: &str = "fd77::1";
/// The source's IPv6 address (after [`NetPair::add_ipv6`]).
pub const SOURCE_IP6: &str = "fd77::2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True when network namespaces can be made here (root and `ip`, `nsenter`); prints why not.
pub fn can_use_netns(test: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root (network namespaces)");
        return false;
    }
    for tool in ["ip", "nsenter"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{test}: running as root but `{tool}` is missing (apt-get install iproute2 util-linux)"
        );
    }
    true
}

/// Two namespaces joined by a veth pair.
#[derive(Debug)]
pub struct NetPair {
    /// The destination's namespace.
    pub dest_ns: String,
    /// The source's namespace.
    pub source_ns: String,
    /// The veth end inside the destination namespace.
    pub dest_if: String,
    /// The veth end inside the source namespace.
    pub source_if: String,
}

#[track_caller]
fn ip(args: &[&str]) {
    let out = run_with_timeout(Command::new("ip").args(args), COMMAND_TIMEOUT);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    /// Create the namespaces, the veth pair, addresses and routes; loopback up in both.
    pub fn create() -> NetPair {
        let tag = format!(
            "{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = NetPair {
            dest_ns: format!("nvmD{tag}"),
            source_ns: format!("nvmS{tag}"),
            dest_if: format!("nvd{tag}"),
            source_if: format!("nvs{tag}"),
        };
        // From here on Drop deletes whatever was made.
        ip(&["netns", "add", &pair.dest_ns]);
        ip(&["netns", "add", &pair.source_ns]);
        ip(&[
            "link",
            "add",
            &pair.dest_if,
            "netns",
            &pair.dest_ns,
            "type",
            "veth",
            "peer",
            "name",
            &pair.source_if,
            "netns",
            &pair.source_ns,
        ]);
        for (ns, dev, addr) in [
            (&pair.dest_ns, &pair.dest_if, DEST_IP),
            (&pair.source_ns, &pair.source_if, SOURCE_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// A command running `program` inside namespace `ns` (network only; same mounts).
    pub fn command_in(ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Drop `percent` % of the packets arriving at each end, at random (nftables `numgen`;
    /// there is no netem here); 0 removes the rule.
    pub fn set_loss(&self, percent: u32) {
        for ns in [&self.dest_ns, &self.source_ns] {
            let _ = run_with_timeout(
                Command::new("ip").args([
                    "netns", "exec", ns, "nft", "delete", "table", "inet", "nvmloss",
                ]),
                COMMAND_TIMEOUT,
            );
            if percent == 0 {
                continue;
            }
            let pct = percent.to_string();
            let steps: [Vec<&str>; 3] = [
                vec!["add", "table", "inet", "nvmloss"],
                vec![
                    "add",
                    "chain",
                    "inet",
                    "nvmloss",
                    "input",
                    "{ type filter hook input priority 0 ; }",
                ],
                vec![
                    "add", "rule", "inet", "nvmloss", "input", "iifname", "!=", "lo", "numgen",
                    "random", "mod", "100", "<", &pct, "drop",
                ],
            ];
            for step in steps {
                let out = run_with_timeout(
                    Command::new("ip")
                        .args(["netns", "exec", ns, "nft"])
                        .args(&step),
                    COMMAND_TIMEOUT,
                );
                assert!(
                    out.status.success(),
                    "nft {} in {ns}: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// Give the source end a new address, then remove the old one `from` (what a DHCP
    /// renumbering or a failover of a virtual IP does).
    pub fn move_source_address(&self, from: &str, to: &str) {
        // Without promote_secondaries, deleting the primary address of a subnet deletes the
        // new (secondary) one with it.
        for conf in ["all", self.source_if.as_str()] {
            let out = run_with_timeout(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &self.source_ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.promote_secondaries=1"),
                ]),
                COMMAND_TIMEOUT,
            );
            assert!(
                out.status.success(),
                "sysctl promote_secondaries: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ip(&[
            "-n",
            &self.source_ns,
            "addr",
            "add",
            &format!("{to}/24"),
            "dev",
            &self.source_if,
        ]);
        ip(&[
            "-n",
            &self.source_ns,
            "addr",
            "del",
            &format!("{from}/24"),
            "dev",
            &self.source_if,
        ]);
    }

    /// A NAT rebinding as the destination sees it: from now on the source's UDP packets to
    /// `dest_port` leave from a new port (the same address), and replies to that port reach the
    /// source's socket as before. Stateless nftables port rewriting in the source namespace,
    /// before conntrack: the source's socket never changes, exactly as behind a NAT whose
    /// mapping expired. Returns (the socket's real port, the port the destination now sees).
    pub fn rebind_source_port(&self, dest_port: u16) -> (u16, u16) {
        let out = run_with_timeout(
            Command::new("ip").args(["netns", "exec", &self.source_ns, "ss", "-Hunap"]),
            COMMAND_TIMEOUT,
        );
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let ports: Vec<u16> = listing
            .lines()
            .filter(|l| l.contains("\"fs-source\""))
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|local| local.rsplit(':').next()?.parse().ok())
            .collect();
        assert_eq!(
            ports.len(),
            1,
            "one fs-source UDP socket in the source namespace:\n{listing}"
        );
        let real = ports[0];
        let seen = if real == 40_000 { 40_001 } else { 40_000 };
        let (real_s, seen_s, dport) = (real.to_string(), seen.to_string(), dest_port.to_string());
        let steps: [Vec<&str>; 5] = [
            vec!["add", "table", "inet", "nvmnat"],
            vec![
                "add",
                "chain",
                "inet",
                "nvmnat",
                "out",
                "{ type filter hook output priority -300 ; }",
            ],
            vec![
                "add",
                "chain",
                "inet",
                "nvmnat",
                "in",
                "{ type filter hook prerouting priority -300 ; }",
            ],
            vec![
                "add", "rule", "inet", "nvmnat", "out", "udp", "sport", &real_s, "udp", "dport",
                &dport, "udp", "sport", "set", &seen_s,
            ],
            vec![
                "add", "rule", "inet", "nvmnat", "in", "udp", "dport", &seen_s, "udp", "sport",
                &dport, "udp", "dport", "set", &real_s,
            ],
        ];
        for step in steps {
            let out = run_with_timeout(
                Command::new("ip")
                    .args(["netns", "exec", &self.source_ns, "nft"])
                    .args(&step),
                COMMAND_TIMEOUT,
            );
            assert!(
                out.status.success(),
                "nft {}: {}",
                step.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (real, seen)
    }

    /// Give both ends an IPv6 address ([`DEST_IP6`], [`SOURCE_IP6`], /64) usable at once
    /// (`nodad`: no duplicate address detection delay).
    pub fn add_ipv6(&self) {
        for (ns, dev, addr) in [
            (&self.dest_ns, &self.dest_if, DEST_IP6),
            (&self.source_ns, &self.source_if, SOURCE_IP6),
        ] {
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
    }

    /// Set the MTU of both ends of the link (a path with a smaller MTU than Ethernet's).
    pub fn set_mtu(&self, mtu: u32) {
        for (ns, dev) in [
            (&self.dest_ns, &self.dest_if),
            (&self.source_ns, &self.source_if),
        ] {
            ip(&["-n", ns, "link", "set", dev, "mtu", &mtu.to_string()]);
        }
    }

    /// Take the source's end of the link down (the source sees ENETUNREACH, the destination
    /// silence) or up again.
    pub fn set_link(&self, up: bool) {
        ip(&[
            "-n",
            &self.source_ns,
            "link",
            "set",
            &self.source_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.source_ns, &self.dest_ns] {
            let out = run_with_timeout(
                Command::new("ip").args(["netns", "del", ns]),
                COMMAND_TIMEOUT,
            );
            if !out.status.success() {
                eprintln!(
                    "ip netns del {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Distance: delay, reordering and a bandwidth limit (issue 11, issue 12)

/// The NFQUEUE queue number the delay rules use (queues are per network namespace).
const DELAY_QUEUE: &str = "7447";

/// Reordering on top of a delay: `percent` % of the packets, chosen at random, are held `extra`
/// longer than the others, so that packets sent after them overtake them.
#[derive(Clone, Copy, Debug)]
pub struct Reorder {
    /// Share of the packets held longer, 0–100.
    pub percent: f64,
    /// How much longer.
    pub extra: std::time::Duration,
}

/// A delay installed by [`NetPair::set_delay`]. Dropping it (also when the test panics) removes
/// the iptables rules and stops the `nvm-netdelay` processes, which release every packet they
/// still hold. Keep it in a named variable: `let _ = net.set_delay(..)` drops it at once.
#[must_use = "the delay is removed when this guard is dropped"]
pub struct NetDelay {
    /// `(namespace, interface)` of each rule installed.
    rules: Vec<(String, String)>,
    /// One tool per namespace (each delays the packets arriving in its namespace).
    tools: Vec<Daemon>,
    /// The tools' logs.
    logs: Option<tempfile::TempDir>,
}

/// The iptables arguments (after `-I`/`-D`) of the delay rule for `dev`.
fn delay_rule(dev: &str) -> [&str; 9] {
    [
        "INPUT",
        "-i",
        dev,
        "-j",
        "NFQUEUE",
        "--queue-num",
        DELAY_QUEUE,
        // Fail-open: if nvm-netdelay dies, packets pass (undelayed) instead of being dropped.
        "--queue-bypass",
        "-w",
    ]
}

impl NetDelay {
    /// SIGKILLs the `nvm-netdelay` processes and waits until they are reaped (their queues are
    /// unbound then), leaving the rules in place: a test of fail-open. Packets they held at that
    /// moment are lost, as when a real delay box crashes.
    pub fn kill_tools(&mut self) {
        for tool in &mut self.tools {
            tool.kill_and_reap();
        }
    }

    /// Removes the delay now; returns each tool's exit summary line
    /// (`nvm-netdelay: exit: packets N reordered R ...`, "" if it printed none).
    pub fn stop(mut self) -> Vec<String> {
        self.remove()
    }

    fn remove(&mut self) -> Vec<String> {
        // Rules first (new packets are no longer queued), then the tools (which accept what
        // they hold on SIGTERM).
        for (ns, dev) in self.rules.drain(..) {
            let out = run_with_timeout(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", "iptables", "-D"])
                    .args(delay_rule(&dev)),
                COMMAND_TIMEOUT,
            );
            if !out.status.success() && Path::new(&format!("/run/netns/{ns}")).exists() {
                eprintln!(
                    "removing the delay rule in {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut summaries = Vec::new();
        for mut tool in self.tools.drain(..) {
            match tool.terminate(SHUTDOWN_TIMEOUT) {
                Some(s) if s.success() => {}
                other => eprintln!("{} did not exit cleanly: {other:?}", tool.name),
            }
            let log = fs::read_to_string(&tool.log).unwrap_or_default();
            summaries.push(
                log.lines()
                    .find(|l| l.starts_with("nvm-netdelay: exit:"))
                    .unwrap_or_default()
                    .to_string(),
            );
            if std::thread::panicking() {
                eprintln!("==== {} ====\n{log}", tool.name);
            }
        }
        self.logs.take();
        summaries
    }
}

impl Drop for NetDelay {
    fn drop(&mut self) {
        self.remove();
    }
}

impl NetPair {
    /// Delays every packet crossing the link by `one_way` in each direction (a round trip of
    /// 2 × `one_way`), optionally reordering some (see [`Reorder`]), until the returned guard is
    /// dropped. There is no netem here: an iptables rule in each namespace sends the packets
    /// arriving on the veth to NFQUEUE, and an `nvm-netdelay` process started in that namespace
    /// (a child of this test) holds them. The tools are ready (queue bound) before the rules go
    /// in, so no packet slips through undelayed.
    ///
    /// The rules are on INPUT, the receiving side, not on OUTPUT: a packet held on OUTPUT stays
    /// charged to the sending socket's send buffer, so a bulk sender would be throttled by its
    /// own socket (its sends block or fail) instead of seeing a long wire; on INPUT the sender's
    /// socket is done with the packet, as with a real link, and the loss rule is there too.
    /// Everything arriving on the veth is delayed (QUIC's UDP and ICMP alike, so `ping` sees
    /// it; use `ping -U`, since ping's kernel receive timestamp is taken before INPUT).
    #[track_caller]
    pub fn set_delay(&self, one_way: std::time::Duration, reorder: Option<Reorder>) -> NetDelay {
        let logs = tempfile::Builder::new()
            .prefix("nvm-netdelay-")
            .tempdir()
            .expect("temp dir for nvm-netdelay logs");
        let mut delay = NetDelay {
            rules: Vec::new(),
            tools: Vec::new(),
            logs: None,
        };
        let ms = format!("{}", one_way.as_secs_f64() * 1000.0);
        for (i, (ns, dev)) in [
            (&self.dest_ns, &self.dest_if),
            (&self.source_ns, &self.source_if),
        ]
        .into_iter()
        .enumerate()
        {
            let mut cmd = NetPair::command_in(ns, &bin("nvm-netdelay"));
            cmd.args(["--queue", DELAY_QUEUE, "--delay-ms", &ms]);
            if let Some(r) = reorder {
                cmd.args(["--reorder-percent", &r.percent.to_string()])
                    .args([
                        "--reorder-extra-ms",
                        &(r.extra.as_secs_f64() * 1000.0).to_string(),
                    ])
                    .args([
                        "--seed",
                        &(std::process::id() as u64 * 2 + i as u64).to_string(),
                    ]);
            }
            let (tool, _) = Daemon::spawn(
                &format!("nvm-netdelay {ns}"),
                &mut cmd,
                &logs.path().join(format!("{ns}.log")),
                "nvm-netdelay: ready",
                STARTUP_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("nvm-netdelay did not start in {ns}: {e}"));
            delay.tools.push(tool);
            let out = run_with_timeout(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["--", "iptables", "-I"])
                    .args(delay_rule(dev)),
                COMMAND_TIMEOUT,
            );
            assert!(
                out.status.success(),
                "iptables NFQUEUE rule in {ns} (apt-get install iptables): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            delay.rules.push((ns.clone(), dev.clone()));
        }
        delay.logs = Some(logs);
        delay
    }

    /// Limits each direction of the link to `mbit` Mbit/s (`tc qdisc ... tbf` on the egress of
    /// both veth ends); 0 removes the limit. The namespaces' deletion removes it too.
    #[track_caller]
    pub fn set_rate(&self, mbit: u32) {
        for (ns, dev) in [
            (&self.dest_ns, &self.dest_if),
            (&self.source_ns, &self.source_if),
        ] {
            if mbit == 0 {
                let _ = run_with_timeout(
                    Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", dev, "root"]),
                    COMMAND_TIMEOUT,
                );
                continue;
            }
            // The bucket holds 4 ms of traffic, and at least one 64 KiB GSO packet (tbf
            // segments packets larger than its bucket, but a bucket below one MTU drops them).
            let burst = (u64::from(mbit) * 1_000_000 / 8 / 250).max(64 * 1024);
            let out = run_with_timeout(
                Command::new("tc").args([
                    "-n",
                    ns,
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{mbit}mbit"),
                    "burst",
                    &burst.to_string(),
                    "latency",
                    "50ms",
                ]),
                COMMAND_TIMEOUT,
            );
            assert!(
                out.status.success(),
                "tc tbf in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A running `fs-dest browse`.
pub struct BrowseMount {
    /// The daemon.
    pub daemon: Daemon,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

impl Drop for BrowseMount {
    fn drop(&mut self) {
        if self.daemon.terminate(SHUTDOWN_TIMEOUT).is_none() || is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
    }
}

/// A destination in one namespace and room for sources in the other. See the module docs.
pub struct Cluster {
    /// Sources mounted by the test (stopped first on drop).
    pub sources: Vec<SourceMount>,
    /// Browse mounts.
    pub browses: Vec<BrowseMount>,
    /// `fs-dest serve`, in the destination namespace.
    pub dest: Option<Daemon>,
    /// The namespaces (deleted last).
    pub net: NetPair,
    /// `10.77.0.1:PORT` (`[fd77::1]:PORT` for [`Cluster::start_ipv6`]).
    pub dest_addr: String,
    /// The address `fs-dest serve` listens on, without the port.
    listen_host: String,
    /// The test's name.
    pub test: String,
    /// The temp dir.
    pub dir: PathBuf,
    /// fs-dest --root.
    pub dest_root: PathBuf,
    /// Certificates.
    pub tls_dir: PathBuf,
    /// NVMIRROR_RUN_DIR.
    pub run_dir: PathBuf,
    /// Daemon logs.
    pub log_dir: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Namespaces, certificates for source `name`, and `fs-dest serve` on 10.77.0.1.
    pub fn start(test: &str, name: &str) -> Cluster {
        Cluster::start_on(test, name, false)
    }

    /// The same over IPv6: `fs-dest serve` on `[fd77::1]`, its certificate naming fd77::1.
    pub fn start_ipv6(test: &str, name: &str) -> Cluster {
        Cluster::start_on(test, name, true)
    }

    fn start_on(test: &str, name: &str, ipv6: bool) -> Cluster {
        let base = std::env::var_os("NVMIRROR_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let temp = tempfile::Builder::new()
            .prefix(&format!("nvmirror-e2e-{test}-"))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()));
        let dir = temp.path().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let net = NetPair::create();
        if ipv6 {
            net.add_ipv6();
        }
        let mut c = Cluster {
            sources: Vec::new(),
            browses: Vec::new(),
            dest: None,
            net,
            dest_addr: String::new(),
            listen_host: if ipv6 {
                format!("[{DEST_IP6}]")
            } else {
                DEST_IP.to_string()
            },
            test: test.to_string(),
            dest_root: dir.join("dest-root"),
            tls_dir: dir.join("tls"),
            run_dir: dir.join("run"),
            log_dir: dir.join("logs"),
            dir,
            temp: Some(temp),
        };
        for d in [&c.dest_root, &c.tls_dir, &c.run_dir, &c.log_dir] {
            fs::create_dir_all(d).expect("create cluster dir");
        }
        run_ok(
            c.fs_dest()
                .args([
                    "certs", "init", "--san", DEST_IP, "--san", DEST_IP6, "--dir",
                ])
                .arg(&c.tls_dir),
        );
        run_ok(
            c.fs_dest()
                .args(["certs", "issue", "--name", name, "--dir"])
                .arg(&c.tls_dir),
        );
        c.start_dest();
        c
    }

    /// (Re)start `fs-dest serve` in the destination namespace.
    pub fn start_dest(&mut self) {
        let mut cmd = NetPair::command_in(&self.net.dest_ns, &bin("fs-dest"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir)
            .arg("serve")
            .arg("--root")
            .arg(&self.dest_root)
            .args(["--listen", &format!("{}:0", self.listen_host), "--nvram"])
            .arg(self.dir.join("dest.nvram"))
            .arg("--tls")
            .arg(&self.tls_dir);
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

    /// An `fs-dest` command (outside the namespaces: it only uses files and the Unix socket).
    pub fn fs_dest(&self) -> Command {
        let mut cmd = Command::new(bin("fs-dest"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir);
        cmd
    }

    /// An `fs-source` command for `cp`/`status` (Unix socket, no namespace needed).
    pub fn fs_source(&self) -> Command {
        let mut cmd = Command::new(bin("fs-source"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir);
        cmd
    }

    /// `fs-source mount` of `backing` at `DIR/mnt-<log>` in the source namespace with NVRAM
    /// file `nvram` and `extra` arguments; waits for the mount. On failure returns the exit
    /// status and the daemon's log.
    pub fn mount_source(
        &self,
        name: &str,
        backing: &Path,
        nvram: &Path,
        extra: &[&str],
        log: &str,
    ) -> Result<SourceMount, SpawnFailure> {
        let mountpoint = self.dir.join(format!("mnt-{log}"));
        fs::create_dir_all(backing).expect("create backing dir");
        fs::create_dir_all(&mountpoint).expect("create mount point");
        let mut cmd = NetPair::command_in(&self.net.source_ns, &bin("fs-source"));
        cmd.env("NVMIRROR_RUN_DIR", &self.run_dir)
            .arg("mount")
            .arg("--backing")
            .arg(backing)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .args(["--dest", &self.dest_addr, "--name", name])
            .arg("--nvram")
            .arg(nvram)
            .arg("--tls")
            .arg(&self.tls_dir)
            .args(extra);
        let log_path = self.log_dir.join(format!("fs-source-{log}.log"));
        let (daemon, _) = Daemon::spawn(
            &format!("fs-source {log}"),
            &mut cmd,
            &log_path,
            "fs-source: mounted",
            STARTUP_TIMEOUT,
        )
        .inspect_err(|_| {
            if is_mounted(&mountpoint) {
                lazy_unmount(&mountpoint);
            }
        })?;
        assert!(
            is_mounted(&mountpoint),
            "fs-source said mounted but {} is not in /proc/mounts\n{}",
            mountpoint.display(),
            daemon_output(&log_path)
        );
        Ok(SourceMount {
            daemon,
            mountpoint,
            backing: backing.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// `fs-dest browse` of `name` at `DIR/browse-NAME`.
    pub fn browse(&mut self, name: &str) -> PathBuf {
        let mountpoint = self.dir.join(format!("browse-{name}"));
        fs::create_dir_all(&mountpoint).expect("create browse mount point");
        let mut cmd = self.fs_dest();
        cmd.arg("browse")
            .arg("--root")
            .arg(&self.dest_root)
            .args(["--source", name, "--mountpoint"])
            .arg(&mountpoint);
        let (daemon, rest) = Daemon::spawn(
            &format!("fs-dest browse {name}"),
            &mut cmd,
            &self.log_dir.join(format!("browse-{name}.log")),
            "fs-dest: browsing ",
            STARTUP_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("fs-dest browse did not start: {e}"));
        assert!(
            rest.starts_with(name),
            "ready line names the source: {rest}"
        );
        assert!(is_mounted(&mountpoint), "browse mount not in /proc/mounts");
        self.browses.push(BrowseMount {
            daemon,
            mountpoint: mountpoint.clone(),
        });
        mountpoint
    }

    /// `fs-source cp` on `mountpoint`.
    #[track_caller]
    pub fn cp(&self, mountpoint: &Path) {
        run_ok(
            self.fs_source()
                .args(["cp", "--mountpoint"])
                .arg(mountpoint),
        );
    }

    /// `fs-source status --json` on `mountpoint`.
    #[track_caller]
    pub fn status(&self, mountpoint: &Path) -> serde_json::Value {
        let out = run_ok(
            self.fs_source()
                .args(["status", "--json", "--mountpoint"])
                .arg(mountpoint),
        );
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("fs-source status --json is not JSON ({e}): {out}"))
    }

    /// `ROOT/NAME/image`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.dest_root.join(name).join("image")
    }

    /// Every log of this test, to stderr.
    pub fn print_logs(&self) {
        eprintln!("==== {}: temp dir {}", self.test, self.dir.display());
        let Ok(entries) = fs::read_dir(&self.log_dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        logs.sort();
        for log in logs {
            eprintln!("==== {} ====\n{}", log.display(), daemon_output(&log));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Some(d) = self.dest.as_mut() {
            d.signal(libc::SIGCONT);
        }
        self.sources.clear();
        self.browses.clear();
        if let Some(mut d) = self.dest.take() {
            d.terminate(SHUTDOWN_TIMEOUT);
        }
        if failed {
            self.print_logs();
        }
        let mounted = fs::read_to_string("/proc/mounts")
            .map(|m| m.contains(&*self.dir.to_string_lossy()))
            .unwrap_or(false);
        if mounted || (failed && std::env::var_os("NVMIRROR_KEEP_TMP").is_some()) {
            if let Some(t) = self.temp.take() {
                let kept = t.keep();
                eprintln!("{}: temp dir kept at {}", self.test, kept.display());
            }
        }
    }
}
