//! `fs-dest`: the nvmirror destination server.
//!
//! It keeps a mirror image of one or more sources: every record a source sends is checked,
//! logged in the shared NVRAM log and acknowledged; a destager moves records to per-source
//! journals; consistency points apply journals to the images. See `docs/architecture.md`.
//!
//! This file only parses the command line and calls [`run`].

#![deny(clippy::undocumented_unsafe_blocks)]

mod certs;
mod cp;
mod destage;
mod engine;
mod error;
mod journal;
mod server;
mod session;
mod slots;
mod status;
mod tls;

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
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create certificates (CA, destination, sources).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run the destination server.
    Serve(ServeArgs),
    /// Mount a source's image read-only (not implemented yet).
    Browse(ReservedArgs),
    /// Turn a source's image into a writable volume (not implemented yet).
    Promote(ReservedArgs),
    /// Show the server's state.
    Status {
        /// The destination root directory.
        #[arg(long)]
        root: PathBuf,
        /// Print JSON instead of a table.
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
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
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
    #[arg(long, default_value_t = DEFAULT_PARTITION_SIZE, value_parser = parse_size)]
    partition_size: usize,
}

#[derive(Debug, Args)]
struct ReservedArgs {
    /// The destination root directory.
    #[arg(long)]
    root: PathBuf,
    /// The source's name.
    #[arg(long)]
    source: String,
    /// Where to mount.
    #[arg(long)]
    mountpoint: Option<PathBuf>,
}

/// Parse a byte count with an optional K/M/G (binary) suffix.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1usize << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 67108864, 64M)"))
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("--listen {addr}: not an address (IP:PORT)"))?
        .next()
        .with_context(|| format!("--listen {addr}: resolves to no address"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Carry out a parsed command line.
fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Certs { command } => match command {
            CertsCommand::Init { dir, san } => {
                certs::init(&dir, &san)
                    .with_context(|| format!("certs init in {}", dir.display()))?;
                println!(
                    "fs-dest: wrote {}/{{ca.pem,ca.key,dest.pem,dest.key}}",
                    dir.display()
                );
            }
            CertsCommand::Issue { dir, name } => {
                certs::issue(&dir, &name)
                    .with_context(|| format!("certs issue {name} in {}", dir.display()))?;
                println!("fs-dest: wrote {}/{{{name}.pem,{name}.key}}", dir.display());
            }
        },
        Command::Serve(a) => {
            let geometry = Geometry {
                partitions: a.partitions,
                partition_size: a.partition_size,
            };
            geometry.validate()?;
            let opts = server::ServeOptions {
                listen: resolve(&a.listen)?,
                root: a.root,
                nvram: a.nvram,
                tls_dir: a.tls,
                geometry,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(server::serve(opts)).context("fs-dest serve")?;
        }
        Command::Browse(_) | Command::Promote(_) => {
            eprintln!("fs-dest: not implemented yet (issue 4)");
            return Ok(ExitCode::from(2));
        }
        Command::Status { root, json } => {
            let report = match status::query(&root)? {
                Some(r) => r,
                None => status::offline(&root),
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", status::render(&report));
            }
        }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fs-dest: error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}
