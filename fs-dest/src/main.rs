//! `fs-dest`: the nvmirror destination server.
//!
//! It keeps a mirror image of one or more sources: every record a source sends is checked,
//! logged in the shared NVRAM log and acknowledged; a destager moves records to per-source
//! journals; consistency points apply journals to the images. See `docs/architecture.md`.
//!
//! This file only parses the command line and calls [`run`].

#![deny(clippy::undocumented_unsafe_blocks)]

mod browse;
mod certs;
mod check;
mod close_code;
mod cp;
mod cp_durations;
mod cp_lock;
mod destage;
mod engine;
mod error;
mod fetch;
mod image_state;
mod journal;
mod metrics;
mod promote;
mod reseed;
mod revocation;
mod server;
mod session;
mod slots;
mod status;
mod tls;
mod verify;
mod window;

#[cfg(test)]
mod tests;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use proto::nvlog::{Geometry, DEFAULT_PARTITIONS, DEFAULT_PARTITION_SIZE};

/// The nvmirror destination server.
#[derive(Debug, Parser)]
#[command(name = "fs-dest", version, about)]
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Create certificates (CA, destination, sources).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print the man page (roff) of fs-dest and its subcommands.
    Man,
    /// Print a shell completion script.
    Completions {
        /// For which shell.
        #[arg(long)]
        shell: clap_complete::Shell,
    },
    /// Run the destination server.
    Serve(ServeArgs),
    /// Mount a source's image read-only, showing the last completed CP (prints
    /// `fs-dest: browsing NAME at MNT` once mounted; SIGTERM unmounts).
    Browse(BrowseArgs),
    /// Turn a source's image into a primary volume after the source is lost: apply every
    /// record held for it, fence the old source (raise its generation), disconnect it.
    Promote(RoleArgs),
    /// After a failback (reseed), hand the role back: forget the old sequence stream and
    /// remove the promotion marker so the reseeded source can mirror again.
    Demote(RoleArgs),
    /// Failback: make DIR (the old source's backing directory) equal to the promoted volume,
    /// copying only what differs.
    Reseed {
        /// The promoted volume (e.g. ROOT/NAME/image), with every writer stopped.
        #[arg(long)]
        from: PathBuf,
        /// The old source's backing directory (created if missing).
        #[arg(long)]
        to: PathBuf,
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Print every action (the default with --dry-run).
        #[arg(long, short)]
        verbose: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the server's state.
    Status {
        /// The destination root directory.
        #[arg(long)]
        root: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds, until interrupted.
        #[arg(long)]
        watch: Option<f64>,
    },
    /// Verify the NVRAM file and the journals offline (no server running; read-only):
    /// headers, records, CRCs, sequence ranges. Exits non-zero when anything fails.
    Check {
        /// The destination root directory.
        #[arg(long)]
        root: PathBuf,
        /// Only this source's journals (the NVRAM is checked whole).
        #[arg(long)]
        source: Option<String>,
        /// The NVRAM file (default: the one the last `serve` on ROOT used, recorded in
        /// ROOT/fs-dest.nvram.json); its geometry is read from its superblock.
        #[arg(long)]
        nvram: Option<PathBuf>,
        /// List every record (sequence numbers, offset, length, operation, paths).
        #[arg(long)]
        records: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create the CA and the destination certificate in DIR.
    Init {
        /// Directory for ca.pem, ca.key, dest.pem, dest.key.
        #[arg(long)]
        dir: PathBuf,
        /// Extra name or IP address for the destination certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Issue a source's client certificate (DIR/NAME.pem, DIR/NAME.key).
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The source's name.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = certs::DEFAULT_SOURCE_DAYS)]
        days: u32,
    },
    /// Renew a source's certificate: a new key and certificate replace DIR/NAME.pem and
    /// DIR/NAME.key (the source uses them from its next connection). `--name dest` renews the
    /// destination's own certificate (same names and addresses; read at the next `serve`).
    Renew {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The source's name, or `dest` for the destination's certificate.
        #[arg(long)]
        name: String,
        /// Days the new certificate is valid.
        #[arg(long, default_value_t = certs::DEFAULT_SOURCE_DAYS)]
        days: u32,
        /// With `--name dest`: a name or IP address to add to the destination certificate's
        /// (repeatable), e.g. a new address sources reach it by.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Revoke a source's certificate (DIR/NAME.pem): a running `fs-dest serve --tls DIR`
    /// refuses it from then on and closes its connection within seconds.
    Revoke {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The source's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML file of options for this command (keys: the long option names); default
    /// /etc/nvmirror/fs-dest.toml when it exists. Options on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Root directory: ROOT/NAME/image and ROOT/NAME/journal per source.
    #[arg(long)]
    root: PathBuf,
    /// UDP address to listen on (port 0 picks one).
    #[arg(long)]
    listen: String,
    /// The NVRAM file (put it on /dev/shm or a DAX device).
    #[arg(long)]
    nvram: PathBuf,
    /// Directory with ca.pem, dest.pem, dest.key.
    #[arg(long)]
    tls: PathBuf,
    /// Number of NVLOG partitions.
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    partitions: usize,
    /// Bytes per NVLOG partition (suffixes K, M, G accepted).
    #[arg(long, default_value_t = DEFAULT_PARTITION_SIZE, value_parser = proto::config::parse_size)]
    partition_size: usize,
    /// Threads serving the sources' connections (QUIC, TLS, record intake). One keeps every
    /// acknowledgement on the thread that received its record (the lowest latency); more
    /// spread the encryption of many busy sources over cores. CPs and destaging have their
    /// own threads either way.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// A link silent this long is dead (QUIC idle timeout; the smaller of the two ends' counts).
    #[arg(long, default_value_t = proto::timing::DEFAULT_IDLE_TIMEOUT_MS)]
    idle_timeout_ms: u64,
    /// A quiet link sends a keep-alive this often (less than half of --idle-timeout-ms).
    #[arg(long, default_value_t = proto::timing::DEFAULT_KEEP_ALIVE_MS)]
    keep_alive_ms: u64,
    /// Serve Prometheus metrics (the figures of `status`, per source) over plain HTTP at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9448 (port 0 picks one; the address is logged).
    /// Off by default. See "Metrics" in docs/operations.md.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct RoleArgs {
    /// The destination root directory.
    #[arg(long)]
    root: PathBuf,
    /// With `promote`: promote even though the source is connected and mirroring (it is
    /// fenced at once). `demote` ignores it.
    #[arg(long)]
    force: bool,
    /// The source's name.
    #[arg(long)]
    source: String,
    /// The NVRAM file, when no server runs (default: the one the last `serve` on ROOT used,
    /// recorded in ROOT/fs-dest.nvram.json).
    #[arg(long)]
    nvram: Option<PathBuf>,
    /// NVLOG partitions of that NVRAM file (with --nvram).
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    partitions: usize,
    /// Bytes per NVLOG partition of that NVRAM file (with --nvram).
    #[arg(long, default_value_t = DEFAULT_PARTITION_SIZE, value_parser = proto::config::parse_size)]
    partition_size: usize,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BrowseArgs {
    /// The destination root directory.
    #[arg(long)]
    root: PathBuf,
    /// The source's name.
    #[arg(long)]
    source: String,
    /// Where to mount.
    #[arg(long)]
    mountpoint: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

/// Parse a byte count with an optional K/M/G (binary) suffix.
fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("--listen {addr}: not IP:PORT, [IPv6]:PORT or HOST:PORT"))?
        .next()
        .with_context(|| format!("--listen {addr}: resolves to no address"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=warn"));
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

/// Carry out a parsed command line.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Man => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?;
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "fs-dest", &mut std::io::stdout());
        }
        Command::Certs { command } => match command {
            CertsCommand::Init { dir, san } => {
                certs::init(&dir, &san)
                    .with_context(|| format!("certs init in {}", dir.display()))?;
                println!(
                    "fs-dest: wrote {}/{{ca.pem,ca.key,dest.pem,dest.key}}",
                    dir.display()
                );
            }
            CertsCommand::Issue { dir, name, days } => {
                certs::issue(&dir, &name, days)
                    .with_context(|| format!("certs issue {name} in {}", dir.display()))?;
                println!(
                    "fs-dest: wrote {}/{{{name}.pem,{name}.key}} (valid for {days} days)",
                    dir.display()
                );
            }
            CertsCommand::Renew { dir, name, san, .. } if name == "dest" => {
                let names = certs::renew_dest(&dir, &san)
                    .with_context(|| format!("certs renew dest in {}", dir.display()))?;
                println!(
                    "fs-dest: renewed {}/{{dest.pem,dest.key}} (valid for {} days, for {}); \
                     restart fs-dest serve to use them",
                    dir.display(),
                    certs::DEST_DAYS,
                    names.join(", ")
                );
            }
            CertsCommand::Renew { san, name, .. } if !san.is_empty() => {
                anyhow::bail!(
                    "certs renew --name {name}: --san applies to the destination's certificate \
                     only (--name dest); a source's certificate names the source"
                );
            }
            CertsCommand::Renew {
                dir, name, days, ..
            } => {
                certs::renew(&dir, &name, days)
                    .with_context(|| format!("certs renew {name} in {}", dir.display()))?;
                println!(
                    "fs-dest: renewed {}/{{{name}.pem,{name}.key}} (valid for {days} days)",
                    dir.display()
                );
            }
            CertsCommand::Revoke { dir, name } => {
                let r = certs::revoke(&dir, &name)
                    .with_context(|| format!("certs revoke {name} in {}", dir.display()))?;
                println!(
                    "fs-dest: revoked the certificate of {name} (serial {}); {} lists it; the old \
                     certificate is now {}",
                    r.serial,
                    certs::crl_path(&dir).display(),
                    r.moved_to.display()
                );
            }
        },
        Command::Serve(a) => {
            // Journals, connections and a CP's open image directories are descriptors.
            proto::fd_limit::raise();
            let geometry = Geometry {
                partitions: a.partitions,
                partition_size: a.partition_size,
            };
            geometry.validate()?;
            tls::set_timing(proto::timing::LinkTiming::from_millis(
                a.idle_timeout_ms,
                a.keep_alive_ms,
            )?);
            if let Some(medium) = proto::peer::volatile_medium(&a.nvram) {
                tracing::warn!(
                    nvram = %a.nvram.display(),
                    "the NVRAM file is on {medium}: records acknowledged to the sources survive \
                     a crash of fs-dest, not a reboot or power cut of this machine before the \
                     next CP (put it on a DAX/pmem device or a disk file for that)"
                );
            }
            let opts = server::ServeOptions {
                listen: resolve(&a.listen)?,
                root: a.root,
                nvram: a.nvram,
                tls_dir: a.tls,
                geometry,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(a.io_threads.max(1))
                .thread_name("fs-dest-io")
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(server::serve(opts, a.metrics_listen))
                .context("fs-dest serve")?;
        }
        Command::Promote(a) => return role("promote", a),
        Command::Demote(a) => return role("demote", a),
        Command::Reseed {
            from,
            to,
            dry_run,
            verbose,
            json,
        } => {
            let opts = reseed::Options {
                from,
                to,
                dry_run,
                verbose,
            };
            let total = reseed::total_bytes(&opts.from);
            let mut bar = LazyBar::new();
            let mut done = 0u64;
            let what = format!("reseeding {}", opts.to.display());
            let mut stdout = std::io::stdout().lock();
            let s = reseed::reseed(
                &opts,
                &mut |n| {
                    done += n;
                    bar.update(done.min(total), total, &what);
                },
                &mut stdout,
            )
            .with_context(|| {
                format!("reseed {} from {}", opts.to.display(), opts.from.display())
            })?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "fs-dest: reseed{}: copied {} files ({} bytes), created {}, updated metadata of {}, deleted {}, skipped {} unchanged ({} bytes compared equal)",
                    if dry_run { " (dry run, nothing changed)" } else { "" },
                    s.files_copied,
                    s.bytes_copied,
                    s.created,
                    s.metadata_updated,
                    s.deleted,
                    s.skipped,
                    s.bytes_skipped
                );
            }
        }
        Command::Browse(a) => {
            slots::check_name(&a.source)?;
            browse::run(&a.root, &a.source, &a.mountpoint, a.threads)
                .with_context(|| format!("browse {}", a.source))?;
        }
        Command::Status { root, json, watch } => {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            loop {
                let report = match status::query(&root)? {
                    Some(r) => r,
                    None => status::offline(&root),
                };
                let mut text = String::new();
                if watch.is_some() && tty && !json {
                    text.push_str("\x1b[2J\x1b[H");
                }
                if json {
                    text.push_str(&serde_json::to_string(&report)?);
                    text.push('\n');
                } else {
                    text.push_str(&status::render(&report));
                }
                use std::io::Write as _;
                // A closed pipe (`| head`) ends the watch.
                let mut out = std::io::stdout().lock();
                if out
                    .write_all(text.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    break;
                }
                drop(out);
                match watch {
                    Some(every) => {
                        std::thread::sleep(std::time::Duration::from_secs_f64(every.max(0.1)))
                    }
                    None => break,
                }
            }
        }
        Command::Check {
            root,
            source,
            nvram,
            records,
            json,
        } => {
            let o = check::CheckOptions {
                root,
                source,
                nvram,
                records,
            };
            check::run(&o, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr that appears only when the work lasts more than a moment and
/// stderr is a terminal.
struct LazyBar {
    start: std::time::Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl LazyBar {
    fn new() -> Self {
        LazyBar {
            start: std::time::Instant::now(),
            bar: None,
        }
    }

    fn update(&mut self, done: u64, total: u64, what: &str) {
        use std::io::IsTerminal;
        if self.bar.is_none()
            && done < total
            && self.start.elapsed() > std::time::Duration::from_millis(300)
            && std::io::stderr().is_terminal()
        {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            self.bar = Some(bar);
        }
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// `fs-dest promote` / `fs-dest demote`: through the running server, or directly.
fn role(cmd: &str, a: RoleArgs) -> anyhow::Result<ExitCode> {
    slots::check_name(&a.source)?;
    let bar = std::cell::RefCell::new(LazyBar::new());
    let what = format!("applying the records held for {}", a.source);
    let reply = status::role_request(&a.root, cmd, &a.source, a.force, |p| {
        bar.borrow_mut().update(p.done, p.total, &what)
    })
    .with_context(|| format!("asking the server on {} to {cmd}", a.root.display()))?;
    let outcome = match reply {
        status::RoleReply::Done(o) => o,
        status::RoleReply::Failed(msg) => anyhow::bail!("{cmd} {}: {msg}", a.source),
        status::RoleReply::NoServer => {
            let (nvram, geometry) = match a.nvram {
                Some(n) => (
                    n,
                    Geometry {
                        partitions: a.partitions,
                        partition_size: a.partition_size,
                    },
                ),
                None => {
                    let c = server::read_nvram_config(&a.root)?;
                    (
                        c.nvram,
                        Geometry {
                            partitions: c.partitions,
                            partition_size: c.partition_size,
                        },
                    )
                }
            };
            geometry.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(async {
                let local =
                    server::LocalEngine::open(&a.root, &nvram, geometry).with_context(|| {
                        format!("opening {} and {}", a.root.display(), nvram.display())
                    })?;
                let r = if cmd == "promote" {
                    promote::promote(&local.engine, &a.source, a.force, |p| {
                        bar.borrow_mut().update(p.done, p.total, &what)
                    })
                    .await
                } else {
                    promote::demote(&local.engine, &a.source).await
                };
                local.close().await;
                r.with_context(|| format!("{cmd} {}", a.source))
            })?
        }
    };
    bar.into_inner().finish();
    if a.json {
        println!("{}", serde_json::to_string(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    let m = &outcome.marker;
    if cmd == "promote" {
        if outcome.already {
            println!(
                "fs-dest: {} was already promoted at generation {} on {} (image up to record {})",
                m.source, m.generation, m.promoted_at_utc, m.applied_seq
            );
        } else {
            println!(
                "fs-dest: promoted {} at generation {}: applied {} records, image up to record {}",
                m.source, m.generation, outcome.records_applied, m.applied_seq
            );
        }
        for w in &outcome.warnings {
            println!("fs-dest: WARNING: {w}");
        }
        println!(
            "fs-dest: {} is now a primary volume; the old source is fenced. Serve it with:\n  \
             fs-source mount --backing {} --generation {} --nvram NEW_NVRAM_FILE --mountpoint MNT --dest ADDR --name NAME --tls DIR",
            outcome.image.display(),
            outcome.image.display(),
            m.generation
        );
    } else {
        println!(
            "fs-dest: demoted {}: the source may mirror again from a fresh NVRAM file with --generation {} (or higher)",
            m.source, m.generation
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The error and its causes, leaving out a cause whose text the message already contains
/// (wrappers that repeat their source).
fn describe(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Where `fs-dest serve` reads its options when no `--config` is given (if it exists).
const DEFAULT_CONFIG: &str = "/etc/nvmirror/fs-dest.toml";

fn main() -> ExitCode {
    let argv = match proto::config::with_config_file(
        std::env::args_os().collect(),
        "serve",
        std::path::Path::new(DEFAULT_CONFIG),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fs-dest: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Options repeated (the file's, then the command line's): the last one counts.
    let matches = <Cli as clap::CommandFactory>::command()
        .args_override_self(true)
        .mut_subcommand("serve", |c| c.args_override_self(true))
        .get_matches_from(argv);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = describe(&e);
            eprintln!("fs-dest: error: {msg}");
            if let Some(hint) = proto::peer::permission_hint("fs-dest", &msg) {
                eprintln!("fs-dest: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
