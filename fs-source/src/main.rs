//! `fs-source`: mounts a mirrored filesystem over a backing directory. Every mutating
//! operation is logged write-ahead in NVRAM, applied to the backing directory and acknowledged
//! by `fs-dest` before the client gets its reply. See docs/architecture.md.

#![deny(clippy::undocumented_unsafe_blocks)]

mod async_leg;
mod backlog;
mod baseline;
mod check;
mod control;
mod cp;
mod cp_durations;
mod error;
mod fuse;
mod identity;
mod inodes;
mod link;
mod metrics;
mod mirror;
mod mountpoint;
mod recovery;
mod resync;
mod tls;
mod verify;
mod volume;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use proto::apply::Tree;
use proto::nvlog::Geometry;
use proto::storage::MmapStorage;

use crate::mirror::{Mirror, MirrorSettings, Policy};

#[derive(Parser)]
#[command(
    name = "fs-source",
    version,
    about = "Mount a filesystem mirrored synchronously to fs-dest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (the default) or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// See `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Mount the mirrored filesystem (runs in the foreground until unmounted or signalled).
    Mount(Box<MountArgs>),
    /// Print the man page (roff) of fs-source and its subcommands.
    Man,
    /// Print a shell completion script.
    Completions {
        /// For which shell.
        #[arg(long)]
        shell: clap_complete::Shell,
    },
    /// Run a consistency point now; returns when the destination has applied it.
    Cp {
        /// The mountpoint of a running fs-source.
        #[arg(long)]
        mountpoint: PathBuf,
    },
    /// Compare the backing volume with the image (metadata and content hashes; only hashes
    /// cross the network) while writes go on; exits non-zero when they differ.
    Verify {
        /// The mountpoint of a running fs-source.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Resend every path that differs from the backing volume, then check it again.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Hash at most this many MiB/s on the source (0: no limit), for production hours.
        #[arg(long, default_value_t = 0.0)]
        rate_mib: f64,
    },
    /// Wait until the destination has acknowledged every record logged so far (after a link
    /// loss: until the catch-up is over and mirroring is synchronous again), showing progress.
    /// Fails when --timeout passes first, or when the mirror stops.
    Wait {
        /// The mountpoint of a running fs-source.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Give up after this many seconds (0: wait as long as it takes).
        #[arg(long, default_value_t = 0.0)]
        timeout: f64,
    },
    /// Show the mirror's state.
    Status {
        /// The mountpoint of a running fs-source.
        #[arg(long)]
        mountpoint: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds, until interrupted.
        #[arg(long)]
        watch: Option<f64>,
    },
    /// Verify the NVRAM and backlog files offline (no daemon running; read-only): headers,
    /// records, CRCs, sequence ranges. Exits non-zero when anything fails verification.
    Check {
        /// The NVRAM file (`mount --nvram`); its geometry is read from its superblock.
        #[arg(long)]
        nvram: PathBuf,
        /// The backlog file (default: NVRAM.backlog, when it exists).
        #[arg(long)]
        backlog: Option<PathBuf>,
        /// List every record (sequence number, offset, length, operation, paths).
        #[arg(long)]
        records: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct MountArgs {
    /// The directory holding the real files.
    #[arg(long)]
    backing: PathBuf,
    /// A TOML file of options for this command (keys: the long option names); default
    /// /etc/nvmirror/fs-source.toml when it exists. Options on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to mount.
    #[arg(long)]
    mountpoint: PathBuf,
    /// fs-dest's address: IP:PORT (`[::1]:7443` for IPv6) or HOST:PORT (resolved when the
    /// mount starts). Without it the volume runs unmirrored (e.g. a promoted image with no
    /// other destination yet): records are still logged in NVRAM and CPs make the volume
    /// durable, but nothing is sent.
    #[arg(long, value_parser = parse_dest)]
    dest: Option<Dest>,
    /// The name or address the destination's certificate must carry (default: the host of
    /// --dest, as written there). Its certificate names what `fs-dest certs init --san` gave.
    #[arg(long)]
    dest_name: Option<String>,
    /// A second destination, mirrored asynchronously (allowed to lag; nothing waits for it):
    /// its own journals, CPs and image, promotable like the first. Needs --dest and --tls.
    /// Records it has not acknowledged are kept in NVRAM, then in NVRAM.async.
    #[arg(long, value_parser = parse_dest, requires = "dest")]
    async_dest: Option<Dest>,
    /// The name or address the second destination's certificate must carry (default: the
    /// host of --async-dest).
    #[arg(long)]
    async_dest_name: Option<String>,
    /// This source's name (its certificate's name).
    #[arg(long)]
    name: String,
    /// The NVRAM file (put it on /dev/shm or a DAX device). Records that must leave NVRAM
    /// while the destination is away go to FILE.backlog.
    #[arg(long)]
    nvram: PathBuf,
    /// Directory with ca.pem, NAME.pem and NAME.key (needed with --dest).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Number of NVLOG partitions.
    #[arg(long, default_value_t = proto::nvlog::DEFAULT_PARTITIONS)]
    partitions: usize,
    /// Bytes per NVLOG partition (multiple of 4096, at least 65536; suffixes K, M, G accepted).
    #[arg(long, default_value_t = proto::nvlog::DEFAULT_PARTITION_SIZE, value_parser = proto::config::parse_size)]
    partition_size: usize,
    /// What to do when the destination does not acknowledge in time.
    #[arg(long, value_enum, default_value_t = Policy::Sync)]
    policy: Policy,
    /// How long a write waits for the destination before the policy applies, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    timeout_ms: u64,
    /// Consistency point interval in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    cp_interval_ms: u64,
    /// The volume's generation, kept in NVRAM: raise it when this source serves a promoted
    /// image or fails back after a promotion (`fs-dest` refuses older generations). Raising it
    /// drops the NVRAM's records of the old generation and restarts sequence numbers; a value
    /// lower than the stored one is refused.
    #[arg(long)]
    generation: Option<u64>,
    /// How long to wait for the destination before mounting, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    connect_wait_ms: u64,
    /// What to do when the destination is not reachable within --connect-wait-ms: `refuse`
    /// to mount, or `mount` anyway (records wait in NVRAM). Default: refuse under policy
    /// strict (where no write could succeed), mount under sync.
    #[arg(long, value_enum)]
    on_unreachable: Option<OnUnreachable>,
    /// FUSE worker threads: requests taken from the kernel at once (an operation waiting for
    /// the destination does not hold one; its reply leaves when the acknowledgement arrives).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Replace the destination's image with this backing directory's content even if the
    /// image mirrors another volume (or holds data of unknown origin). Without it, such a
    /// mount is refused, so that a wrong --backing never wipes an image.
    #[arg(long)]
    force_baseline: bool,
    /// Limit the baseline (and resyncs) to this many MiB/s of file content, so that clients'
    /// writes keep most of the link (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    baseline_rate_mib: f64,
    /// Use the kernel's writeback cache: a write() returns once it is in the page cache, and
    /// is logged and mirrored when the kernel writes it back; fsync, fdatasync and close
    /// return only once every write before them is mirrored. Faster for streams of small
    /// writes; without fsync a crash of this machine can lose recent writes, as on a local
    /// filesystem. Off by default: every write is mirrored before it returns.
    #[arg(long)]
    writeback_cache: bool,
    /// A link silent this long is dead (QUIC idle timeout; the smaller of the two ends' counts).
    #[arg(long, default_value_t = proto::timing::DEFAULT_IDLE_TIMEOUT_MS)]
    idle_timeout_ms: u64,
    /// A quiet link sends a keep-alive this often (less than half of --idle-timeout-ms).
    #[arg(long, default_value_t = proto::timing::DEFAULT_KEEP_ALIVE_MS)]
    keep_alive_ms: u64,
    /// Serve Prometheus metrics (the figures of `status`) over plain HTTP at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9447 (port 0 picks one; the address is logged).
    /// Off by default. See "Metrics" in docs/operations.md.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=warn,fuser::mnt=error"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// Directories of the backing volume kept open by path (`proto::dir_cache`): an operation in a
/// cached directory costs one `*at` call instead of a path walk, a call and a `close`.
const DIR_CACHE: usize = 256;

/// Where `fs-source mount` reads its options when no `--config` is given (if it exists).
const DEFAULT_CONFIG: &str = "/etc/nvmirror/fs-source.toml";

fn main() -> ExitCode {
    let argv = match proto::config::with_config_file(
        std::env::args_os().collect(),
        "mount",
        Path::new(DEFAULT_CONFIG),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fs-source: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Options repeated (the file's, then the command line's): the last one counts.
    let matches = <Cli as clap::CommandFactory>::command()
        .args_override_self(true)
        .mut_subcommand("mount", |c| c.args_override_self(true))
        .get_matches_from(argv);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Mount(args) => mount(*args),
        Command::Man => {
            let mut out = std::io::stdout();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut out)
                .map_err(anyhow::Error::from)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "fs-source", &mut std::io::stdout());
            Ok(())
        }
        Command::Cp { mountpoint } => client(&mountpoint, "cp", false),
        Command::Wait {
            mountpoint,
            timeout,
        } => wait_caught_up(&mountpoint, timeout),
        Command::Status {
            mountpoint,
            json,
            watch: None,
        } => client(&mountpoint, "status", json),
        Command::Status {
            mountpoint,
            json,
            watch: Some(every),
        } => watch_status(&mountpoint, json, every),
        Command::Verify {
            mountpoint,
            repair,
            json,
            rate_mib,
        } => verify_client(&mountpoint, repair, json, rate_mib),
        Command::Check {
            nvram,
            backlog,
            records,
            json,
        } => check::run(&nvram, backlog.as_deref(), records, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("fs-source: {msg}");
            if let Some(hint) = proto::peer::permission_hint("fs-source", &msg) {
                eprintln!("fs-source: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn client(mountpoint: &Path, cmd: &str, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(control::request(mountpoint, cmd))?;
    if cmd == "cp" {
        if reply.get("ok").and_then(|v| v.as_bool()) != Some(true) {
            bail!(
                "consistency point failed: {}",
                reply
                    .get("error")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown error")
            );
        }
        if reply.get("standalone").and_then(|v| v.as_bool()) == Some(true) {
            println!("consistency point done; the volume is durable (unmirrored: no destination)");
        } else {
            println!(
                "consistency point done; destination applied up to record {}",
                reply
                    .get("applied_seq")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
            );
        }
    } else if json {
        println!("{reply}");
    } else {
        print_status(&reply);
    }
    Ok(())
}

/// `fs-source verify`: ask the daemon, show progress, print the report; an error when the
/// image differs from the backing volume (after `--repair`: when a difference remains).
fn verify_client(mountpoint: &Path, repair: bool, json: bool, rate_mib: f64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "verify {msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style);
    }
    let req = serde_json::json!({"cmd": "verify", "repair": repair, "rate_mib": rate_mib});
    let reply = rt.block_on(control::request_with(mountpoint, req, &mut |p| {
        bar.set_length(p["bytes_total"].as_u64().unwrap_or(0));
        bar.set_position(p["bytes_done"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{} {}/{} entries",
            p["phase"].as_str().unwrap_or_default(),
            p["entries_done"],
            p["entries_total"]
        ));
    }))?;
    bar.finish_and_clear();
    if reply.get("ok").and_then(|v| v.as_bool()) != Some(true) {
        bail!(
            "verify failed: {}",
            reply
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown error")
        );
    }
    let r = &reply["report"];
    let list = |k: &str| r[k].as_array().cloned().unwrap_or_default();
    let (differences, unrepaired, changing) =
        (list("differences"), list("unrepaired"), list("changing"));
    if json {
        println!("{r}");
    } else {
        use std::fmt::Write as _;
        let mut out = String::new();
        for d in &differences {
            let what: Vec<&str> = d["what"]
                .as_array()
                .map(|w| w.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "DIFFERS {}: {}",
                d["path"].as_str().unwrap_or_default(),
                what.join(", ")
            );
        }
        for c in &changing {
            let _ = writeln!(
                out,
                "CHANGING {} (written during the whole verify; not compared)",
                c.as_str().unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "verified {} entries, {:.1} MiB in {:.1} s ({:.1} MiB/s) against the image as of record {}: {} difference(s)",
            r["entries"],
            r["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["seconds"].as_f64().unwrap_or(0.0),
            r["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            r["applied_seq"],
            differences.len()
        );
        if repair && !differences.is_empty() {
            let _ = writeln!(
                out,
                "repaired {} path(s); {} still differ",
                r["repaired"],
                unrepaired.len()
            );
        }
        use std::io::Write as _;
        let _ = std::io::stdout().write_all(out.as_bytes());
    }
    let remaining = if repair {
        unrepaired.len()
    } else {
        differences.len()
    };
    if remaining > 0 {
        bail!("the image differs from the backing volume at {remaining} path(s)");
    }
    Ok(())
}

/// `status --watch`: the status again every `every` seconds (the screen cleared first on a
/// terminal), until interrupted or the daemon goes away.
/// `fs-source wait`: poll status until nothing waits for the destination.
fn wait_caught_up(mountpoint: &Path, timeout: f64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let target = rt.block_on(control::request(mountpoint, "status"))?["last_logged_seq"]
        .as_u64()
        .unwrap_or(0);
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "catching up {bar:30} {pos}/{len} records ({per_sec}, ETA {eta}) {msg}",
    ) {
        bar.set_style(style);
    }
    let mut first_acked = None;
    loop {
        let s = rt.block_on(control::request(mountpoint, "status"))?;
        if let Some(why) = s["stopped"].as_str() {
            bar.abandon();
            bail!("the mirror stopped: {why}");
        }
        if s["link"] == "none" {
            bar.finish_and_clear();
            println!(
                "fs-source: {} is unmirrored: nothing to wait for",
                mountpoint.display()
            );
            return Ok(());
        }
        let acked = s["last_acked_seq"].as_u64().unwrap_or(0);
        let base = *first_acked.get_or_insert(acked);
        bar.set_length(target.saturating_sub(base));
        bar.set_position(acked.min(target).saturating_sub(base));
        bar.set_message(format!("link {}", s["link"].as_str().unwrap_or("?")));
        if acked >= target {
            bar.finish_and_clear();
            println!(
                "fs-source: the destination holds every record up to {target} (waited {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if timeout > 0.0 && started.elapsed().as_secs_f64() >= timeout {
            bar.abandon();
            bail!(
                "timed out after {timeout} s: the destination holds records up to {acked} of {target} \
                 (link {})",
                s["link"].as_str().unwrap_or("?")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn watch_status(mountpoint: &Path, json: bool, every: f64) -> anyhow::Result<()> {
    let every = Duration::from_secs_f64(every.max(0.1));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        if tty && !json {
            print!("\x1b[2J\x1b[H");
        }
        client(mountpoint, "status", json)?;
        std::thread::sleep(every);
    }
}

fn print_status(s: &serde_json::Value) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let g = |k: &str| {
        s.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let _ = writeln!(
        out,
        "source      {} on {} → {} (fs-source {}, up {:.0} s)",
        g("name"),
        g("mountpoint"),
        g("dest"),
        g("version"),
        s["uptime_seconds"].as_f64().unwrap_or(0.0)
    );
    let last_ack = match s["last_ack_age_seconds"].as_f64() {
        Some(a) => format!(", last ack {a:.1} s ago"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "policy      {} (link {}{}{last_ack})",
        g("policy"),
        g("link"),
        if g("degraded") == "true" {
            ", running alone"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "records     logged {}  acked {}  applied at destination {}  (lag {})",
        g("last_logged_seq"),
        g("last_acked_seq"),
        g("last_applied_seq"),
        g("lag_records")
    );
    let last_cp = match (
        s["last_cp_age_seconds"].as_f64(),
        s["last_cp_seconds"].as_f64(),
    ) {
        (Some(age), Some(took)) => format!(" (last {age:.1} s ago, took {took:.2} s)"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "mirrored    {} records, {} bytes; {} consistency points{last_cp}",
        g("records_mirrored"),
        g("bytes_mirrored"),
        g("cp_count")
    );
    if let Some(a) = s.get("async_leg").filter(|a| a.is_object()) {
        let _ = writeln!(
            out,
            "async leg   {}: link {}, acked {} applied {} (lag {} records, {:.1} s){}{}",
            a["dest"].as_str().unwrap_or("?"),
            a["link"].as_str().unwrap_or("?"),
            a["acked_seq"],
            a["applied_seq"],
            a["lag_records"],
            a["lag_seconds"].as_f64().unwrap_or(0.0),
            match a["spill_records"].as_u64() {
                Some(n) if n > 0 => format!("; {n} records kept for it in NVRAM.async"),
                _ => String::new(),
            },
            a["stopped"]
                .as_str()
                .map(|w| format!("; STOPPED: {w}"))
                .unwrap_or_default()
        );
    }
    let rate = |k: &str| s["recent"][k].as_f64().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "throughput  {:.1} records/s, {:.2} MiB/s (last 10 s){}",
        rate("records_per_second"),
        rate("bytes_per_second") / (1024.0 * 1024.0),
        match s["catch_up_eta_seconds"].as_f64() {
            Some(eta) => format!(
                "; catching up: {} records left, about {eta:.0} s",
                g("lag_records")
            ),
            None => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "sync        {}{}",
        g("sync"),
        match s.get("out_of_sync").and_then(|v| v.as_u64()) {
            Some(n) if n > 0 => format!(" ({n} path(s) differ; being resent)"),
            _ => String::new(),
        }
    );
    if let Some(paths) = s.get("out_of_sync_paths").and_then(|p| p.as_array()) {
        for p in paths {
            let _ = writeln!(
                out,
                "  OUT OF SYNC {} (record {}: {})",
                p["path"].as_str().unwrap_or_default(),
                p["seq"],
                p["error"].as_str().unwrap_or_default()
            );
        }
    }
    if let Some(b) = s.get("baseline") {
        let state = b["state"].as_str().unwrap_or_default();
        if !matches!(state, "none" | "done" | "") {
            let mib = |k: &str| b[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
            let _ = writeln!(
                out,
                "baseline    {state}: {} / {} entries, {:.1} / {:.1} MiB, {:.1} MiB/s, ETA {:.0} s",
                b["files_done"],
                b["files_total"],
                mib("bytes_done"),
                mib("bytes_total"),
                b["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                b["eta_seconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(m) = s
        .get("memory")
        .and_then(|m| serde_json::from_value::<proto::memory::Resident>(m.clone()).ok())
    {
        let _ = writeln!(
            out,
            "memory      {m}, NVRAM pages included{}",
            match s["inodes"].as_u64() {
                Some(n) => format!("; {n} inodes tracked"),
                None => String::new(),
            }
        );
    }
    if let Some(parts) = s.get("partitions").and_then(|p| p.as_array()) {
        for p in parts {
            let _ = writeln!(
                out,
                "partition   {}: {} / {} bytes, {} records",
                p["index"], p["used_bytes"], p["capacity_bytes"], p["records"]
            );
        }
    }
    if let Some(why) = s.get("stopped").and_then(|v| v.as_str()) {
        let _ = writeln!(out, "STOPPED     {why}");
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(out.as_bytes());
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 47
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// `--dest`: where fs-dest is, and the host as written (the name its certificate must carry).
#[derive(Debug, Clone)]
struct Dest {
    /// The address (a host name is resolved when the mount starts; the first address).
    addr: SocketAddr,
    /// The host part: a DNS name, an IPv4 address or an IPv6 address without brackets.
    host: String,
}

/// `--dest`: IP:PORT, [IPv6]:PORT or HOST:PORT.
fn parse_dest(s: &str) -> Result<Dest, String> {
    use std::net::ToSocketAddrs;
    let bad = |why: String| format!("{s:?} is not IP:PORT, [IPv6]:PORT or HOST:PORT ({why})");
    let host = match s.strip_prefix('[') {
        Some(rest) => rest
            .split_once("]:")
            .map(|(h, _)| h)
            .ok_or_else(|| bad("no ']:PORT' after the IPv6 address".into()))?,
        None => s
            .rsplit_once(':')
            .map(|(h, _)| h)
            .ok_or_else(|| bad("no ':PORT'".into()))?,
    };
    if host.contains(':') && !s.starts_with('[') {
        return Err(bad("write an IPv6 address in brackets".into()));
    }
    let addr = s
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))?;
    Ok(Dest {
        addr,
        host: host.to_string(),
    })
}

/// See `--on-unreachable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnUnreachable {
    /// Do not mount.
    Refuse,
    /// Mount; records wait in NVRAM.
    Mount,
}

fn mount(args: MountArgs) -> anyhow::Result<()> {
    // Every file a client keeps open is a descriptor here, and the directory cache holds up to
    // DIR_CACHE more.
    proto::fd_limit::raise();
    tls::set_timing(proto::timing::LinkTiming::from_millis(
        args.idle_timeout_ms,
        args.keep_alive_ms,
    )?);
    if !valid_name(&args.name) {
        bail!("invalid source name {:?}: use 1-47 letters, digits, '.', '_' or '-', starting with a letter or digit", args.name);
    }
    let geometry = Geometry {
        partitions: args.partitions,
        partition_size: args.partition_size,
    };
    geometry.validate()?;
    if !args.backing.is_dir() {
        bail!(
            "backing directory {} does not exist or is not a directory",
            args.backing.display()
        );
    }
    mountpoint::prepare(&args.mountpoint)?;
    // The daemon's own files (NVRAM, backlog, baseline progress, control socket) are private
    // to its user. Files made through the mount still get their exact modes: proto::apply::Tree
    // sets every new entry's mode with an explicit chmod, whatever the umask masked.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));

    let (storage, _) = MmapStorage::open(&args.nvram, geometry.region_len())?;
    if let Some(medium) = proto::peer::volatile_medium(&args.nvram) {
        tracing::warn!(
            nvram = %args.nvram.display(),
            "the NVRAM file is on {medium}: acknowledged writes survive a crash of fs-source, \
             not a reboot or power cut of this machine before the next CP (put it on a DAX/pmem \
             device or a disk file for that)"
        );
    }
    let tls = match (&args.dest, &args.tls) {
        (Some(_), None) => bail!(
            "--dest needs --tls DIR (ca.pem, {0}.pem, {0}.key)",
            args.name
        ),
        (_, tls) => tls.clone(),
    };
    if let (Some(_), Some(dir)) = (&args.dest, &tls) {
        // Missing or unreadable certificates stop the mount now, not a connection later.
        tls::client_config(dir, &args.name)
            .with_context(|| format!("TLS files of source {} in {}", args.name, dir.display()))?;
    }
    let settings = MirrorSettings {
        standalone: args.dest.is_none(),
        policy: args.policy,
        timeout: Duration::from_millis(args.timeout_ms),
    };
    let backlog_path = {
        let mut p = args.nvram.clone().into_os_string();
        p.push(".backlog");
        PathBuf::from(p)
    };
    let (mirror, cp_rx, replay) = Mirror::open(
        Arc::new(storage),
        geometry,
        &args.name,
        settings,
        &backlog_path,
    )
    .with_context(|| format!("opening NVRAM {}", args.nvram.display()))?;
    // Before a new generation is set (which empties the leg's spill file with the NVRAM).
    let async_leg = match &args.async_dest {
        Some(dest) => {
            let spill = PathBuf::from(format!("{}.async", args.nvram.display()));
            let leg = Arc::new(
                async_leg::AsyncLeg::open(&spill, &dest.addr.to_string())
                    .map_err(|e| anyhow::anyhow!("the asynchronous leg's spill file: {e}"))?,
            );
            mirror.set_async_leg(leg.clone());
            Some(leg)
        }
        None => None,
    };
    let mut replay = replay;
    if let Some(g) = args.generation {
        if mirror.set_generation(g).map_err(anyhow::Error::msg)? {
            tracing::warn!(
                generation = g,
                "new generation: records of the previous generation in NVRAM were dropped"
            );
            replay.frames.clear();
        }
    }
    let tree = Arc::new(Tree::open(&args.backing)?);
    tree.set_generation(mirror.generation());
    tree.set_own_handles(true);
    recovery::recover(&mirror, &tree, replay)?;
    // This process is the backing volume's only writer from here on (see `Tree::cache_dirs`).
    tree.cache_dirs(DIR_CACHE);
    let (volume_id, created) = identity::volume_id(&args.backing)?;
    if created {
        tracing::info!(volume = %volume_id, "{} is a new volume", args.backing.display());
    }
    let baseline_file = {
        let mut p = args.nvram.clone().into_os_string();
        p.push(".baseline");
        PathBuf::from(p)
    };
    let baseline = Arc::new(baseline::Baseline::new(
        baseline_file,
        volume_id.clone(),
        Some(args.baseline_rate_mib * (1 << 20) as f64),
        mirror.clone(),
    ));

    // The network, CP and control tasks share one single-threaded runtime on its own thread:
    // a request/ack round trip then crosses no scheduler between tokio workers (measured
    // 50-100 us p50 against 145-175 us on a 2-worker runtime, see machine-facts).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rt = runtime.handle().clone();
    let (stop_net, net_stopped) = tokio::sync::oneshot::channel::<()>();
    let net_thread = std::thread::Builder::new()
        .name("nvmirror-net".into())
        .spawn(move || {
            runtime.block_on(async {
                let _ = net_stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .context("starting the network thread")?;
    let _guard = rt.enter();
    let backing_fd: Arc<OwnedFd> = Arc::new(
        rustix::fs::open(
            &args.backing,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .with_context(|| format!("opening {}", args.backing.display()))?,
    );
    let (link_shared, control_rx) = link::shared();
    if let (Some(dest), Some(tls_dir), Some(leg)) =
        (args.async_dest.clone(), tls.clone(), async_leg.clone())
    {
        rt.spawn(async_leg::run(
            mirror.clone(),
            leg,
            async_leg::LegSettings {
                dest: dest.addr,
                server_name: args.async_dest_name.clone().unwrap_or(dest.host),
                tls_dir,
                name: args.name.clone(),
                volume: volume_id.clone(),
            },
        ));
    }
    if let (Some(dest), Some(tls_dir)) = (args.dest.clone(), tls) {
        rt.spawn(link::settle_overdue(mirror.clone()));
        rt.spawn(link::run(
            mirror.clone(),
            link::LinkSettings {
                dest: dest.addr,
                server_name: args.dest_name.clone().unwrap_or(dest.host),
                tls_dir,
                name: args.name.clone(),
                volume: volume_id.clone(),
                take_over: args.force_baseline,
                tree: tree.clone(),
            },
            link_shared.clone(),
            control_rx,
        ));
    }
    rt.spawn(cp::run(
        mirror.clone(),
        link_shared.clone(),
        cp_rx,
        backing_fd,
        Duration::from_millis(args.cp_interval_ms.max(100)),
    ));

    // The control socket: 0600 in a 0700 directory of ours, and each connection is checked
    // (SO_PEERCRED) to come from root or our own user (see peer.rs).
    let sock = control::socket_path(&args.mountpoint);
    if let Some(dir) = sock.parent() {
        proto::peer::private_dir(dir).context("preparing the control socket directory")?;
    }
    let _ = std::fs::remove_file(&sock);
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&sock) })
        .with_context(|| format!("binding control socket {}", sock.display()))?;
    proto::peer::restrict_socket(&sock)?;
    let identity = control::Identity {
        name: args.name.clone(),
        mountpoint: args.mountpoint.display().to_string(),
        dest: args
            .dest
            .as_ref()
            .map(|d| d.addr.to_string())
            .unwrap_or_else(|| "none (unmirrored)".into()),
        policy: args.policy,
        started: std::time::Instant::now(),
    };
    if let Some(addr) = args.metrics_listen {
        let metrics = rt
            .block_on(metrics::bind(addr))
            .with_context(|| format!("--metrics-listen {addr}: cannot listen"))?;
        let local = metrics.local_addr().unwrap_or(addr);
        tracing::info!("serving metrics on http://{local}/metrics");
        let registry = Arc::new(metrics::registry(mirror.clone(), identity.clone()));
        rt.spawn(metrics::serve(metrics, registry));
    }
    let verify_slot: control::VerifySlot = Arc::default();
    let volume_slot: control::VolumeSlot = Arc::default();
    rt.spawn(control::serve(
        listener,
        mirror.clone(),
        identity,
        verify_slot.clone(),
        volume_slot.clone(),
    ));

    // Signals are handled from here on, so a SIGTERM right after the ready line unmounts cleanly.
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    // Meet the destination before serving clients: a refusal (foreign certificate, fenced
    // source) is reported now instead of after the first write. An unreachable destination
    // does not stop the mount: the policy decides what writes do meanwhile.
    if let Some(dest) = args.dest.as_ref().map(|d| d.addr) {
        match mirror.wait_first_link(Duration::from_millis(args.connect_wait_ms)) {
            Ok(true) => {}
            Ok(false) => {
                let refuse = match args.on_unreachable {
                    Some(o) => o == OnUnreachable::Refuse,
                    None => args.policy == Policy::Strict,
                };
                if refuse {
                    bail!(
                        "destination {dest} not reachable within {} ms; not mounting (policy {:?}; \
                         --on-unreachable mount mounts anyway)",
                        args.connect_wait_ms,
                        args.policy
                    );
                }
                tracing::warn!(
                    "destination {dest} not reachable yet; mounting anyway (policy {:?}), records wait in NVRAM",
                    args.policy
                )
            }
            Err(why) => bail!("the destination refused this source: {why}"),
        }
    } else {
        tracing::warn!("no --dest: {} is not mirrored", args.mountpoint.display());
    }

    let volume = Arc::new(volume::Volume::new(tree, mirror.clone())?);
    let _ = volume_slot.set(volume.clone());
    volume.set_baseline(baseline.clone());
    mirror.set_seal_times(Box::new(volume::ChangedTimes(Arc::downgrade(&volume))));
    if args.dest.is_some() {
        // An empty volume's baseline is two records: done before serving, so the first `cp`
        // already finds a complete mirror. A volume with data is transferred while it serves.
        let empty = std::fs::read_dir(&args.backing)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if empty && mirror.progress(|p| p.baseline.state == "pending") {
            let last = baseline::run(&baseline, volume.tree(), &mirror)
                .map_err(|e| anyhow::anyhow!("baseline of the empty volume: {e}"))?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            mirror.cp_command(mirror::CpCommand::Demand(tx));
            let _ = rx.blocking_recv();
            if mirror.progress(|p| p.applied_remote >= last) {
                link_shared.send_control(proto::wire::Control::BaselineDone { last_seq: last });
                mirror.update_baseline(|b| b.state = "done");
            }
        }
        let _ = verify_slot.set(Arc::new(control::VerifyContext {
            volume: volume.clone(),
            link: link_shared.clone(),
            rt: rt.clone(),
            running: std::sync::atomic::AtomicBool::new(false),
        }));
        let (b, v, l) = (baseline.clone(), volume.clone(), link_shared.clone());
        std::thread::Builder::new()
            .name("nvmirror-resync".into())
            .spawn(move || baseline::resync_task(b, v, l))
            .context("starting the resync thread")?;
    }
    match volume.remove_leftover_orphans() {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} orphaned file(s) left by the previous run"),
        Err(e) => tracing::warn!("removing orphaned files left by the previous run: {e}"),
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("nvmirror:{}", args.name)),
        fuser::MountOption::Subtype("nvmirror".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(args.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(
        fuse::FuseAdapter::new(volume.clone(), args.writeback_cache),
        &args.mountpoint,
        &config,
    )
    .with_context(|| format!("mounting {}", args.mountpoint.display()))?;
    volume.set_notifier(session.notifier());
    {
        let volume = volume.clone();
        mirror.on_cache_stale(Box::new(move || volume.forget_cached()));
    }
    let bg = session.spawn().context("starting the FUSE session")?;
    println!("fs-source: mounted {}", args.mountpoint.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // systemd (Type=notify): ready once mounted, which is after the first handshake with the
    // destination (or after --connect-wait-ms with --on-unreachable mount).
    let ready = match &args.dest {
        Some(d) if mirror.progress(|p| p.link_up) => {
            format!(
                "mounted {}, mirroring to {}",
                args.mountpoint.display(),
                d.addr
            )
        }
        Some(d) => format!(
            "mounted {}, destination {} not reachable yet",
            args.mountpoint.display(),
            d.addr
        ),
        None => format!("mounted {}, unmirrored", args.mountpoint.display()),
    };
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&ready),
        ],
    ) {
        tracing::warn!("cannot tell systemd that fs-source is ready: {e}");
    }

    // Run until a signal arrives or someone unmounts us.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = bg.join();
        let _ = done_tx.send(r);
    });
    let mountpoint = args.mountpoint.clone();
    rt.block_on(async move {
        tokio::pin!(done_rx);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            r = &mut done_rx => {
                if let Ok(Err(e)) = r {
                    tracing::warn!("FUSE session ended: {e}");
                }
                return Ok::<_, anyhow::Error>(());
            }
        }
        tracing::info!("signal received: unmounting {}", mountpoint.display());
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if let Err(e) = rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::empty()) {
            tracing::warn!(
                "unmount of {} failed ({e}); detaching it",
                mountpoint.display()
            );
            let _ = rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
        Ok(())
    })?;
    let _ = std::fs::remove_file(&sock);
    let _ = stop_net.send(());
    let _ = net_thread.join();
    Ok(())
}
