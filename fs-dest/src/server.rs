//! `fs-dest serve`: start the engine, its flusher and destager threads, the status socket and
//! the QUIC endpoint; accept connections until SIGTERM/SIGINT; then stop accepting, flush
//! NVRAM and exit.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::nvlog::Geometry;
use proto::storage::Storage;
use tokio::signal::unix::{signal, SignalKind};

use crate::engine::{Engine, EngineError};
use crate::error::TlsError;
use crate::{destage, session, status};

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `--root`.
    pub root: PathBuf,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--nvram`.
    pub nvram: PathBuf,
    /// `--tls`.
    pub tls_dir: PathBuf,
    /// `--partitions` and `--partition-size`.
    pub geometry: Geometry,
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening NVRAM, slots or journals failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The TLS/QUIC endpoint could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Another server runs on this root.
    #[error("another fs-dest already serves {0} (its lock file {1} is held)")]
    AlreadyRunning(PathBuf, PathBuf),
    /// The root's filesystem cannot hold a correct image (see docs/image-filesystems.md).
    #[error("{root}: its filesystem ({fs_type}) cannot hold an image: it lacks {missing}")]
    ImageFs {
        /// The root directory.
        root: PathBuf,
        /// The filesystem's type.
        fs_type: String,
        /// What it lacks, and what that costs.
        missing: String,
    },
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Check what the root's filesystem offers (`proto::fscheck::probe`, in a scratch directory):
/// refuse to serve when it cannot hold a correct image, and log what is missing and what that
/// costs otherwise. Without root, `trusted.*` xattrs and device nodes are out of reach whatever
/// the filesystem, so their absence is not held against it.
fn check_image_fs(root: &Path) -> Result<(), ServeError> {
    let caps = proto::fscheck::probe(root).map_err(|e| ServeError::Io {
        what: "cannot check the filesystem of",
        path: root.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let is_root = rustix::process::geteuid().is_root();
    let missing: Vec<_> = caps
        .missing_for_image()
        .into_iter()
        .filter(|m| is_root || !(m.what.starts_with("trusted") || m.what.starts_with("mknod")))
        .collect();
    let fatal: Vec<String> = missing
        .iter()
        .filter(|m| m.fatal)
        .map(|m| format!("{} ({})", m.what, m.consequence))
        .collect();
    if !fatal.is_empty() {
        return Err(ServeError::ImageFs {
            root: root.to_path_buf(),
            fs_type: caps.fs_type,
            missing: fatal.join("; "),
        });
    }
    if missing.is_empty() {
        tracing::info!(root = %root.display(), fs = %caps.fs_type,
            "image filesystem offers everything an image needs");
    }
    for m in &missing {
        tracing::warn!(root = %root.display(), fs = %caps.fs_type, missing = m.what,
            "image filesystem lacks {}: {}", m.what, m.consequence);
    }
    Ok(())
}

/// Hold `ROOT/fs-dest.lock` so two servers never share a root (and its NVRAM cursors).
fn lock_root(root: &Path) -> Result<OwnedFd, ServeError> {
    let path = root.join("fs-dest.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ServeError::Io {
            what: "cannot open",
            path: path.clone(),
            source,
        })?;
    let fd = OwnedFd::from(file);
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            Err(ServeError::AlreadyRunning(root.to_path_buf(), path))
        }
        Err(e) => Err(ServeError::Io {
            what: "cannot lock",
            path,
            source: e.into(),
        }),
    }
}

/// The control socket `ROOT/fs-dest.sock`: 0600 in ROOT made root-only (0700, owned by us;
/// the images under it are other users' files too), each connection checked with SO_PEERCRED
/// by [`status::serve_socket`]. A ROOT owned by another user gets no socket.
fn bind_status_socket(root: &Path) -> Option<tokio::net::UnixListener> {
    let path = status::socket_path(root);
    let unreachable = "`fs-dest status`, `promote` and `demote` will not reach this server";
    if let Err(e) = proto::peer::private_dir(root) {
        tracing::warn!(socket = %path.display(), error = %e, "not creating the status socket; {unreachable}");
        return None;
    }
    // We hold the root lock, so a socket file left here belongs to a dead server.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "cannot create the status socket; {unreachable}");
            return None;
        }
    };
    if let Err(e) = proto::peer::restrict_socket(&path) {
        tracing::warn!(socket = %path.display(), error = %e, "not serving the status socket; {unreachable}");
        let _ = std::fs::remove_file(&path);
        return None;
    }
    Some(listener)
}

/// File in ROOT recording the NVRAM file and geometry of the last `serve`, so that commands
/// working without a server (`promote`, `demote`) can open the same NVRAM.
pub const NVRAM_CONFIG: &str = "fs-dest.nvram.json";

/// The NVRAM file and geometry a server used.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NvramConfig {
    /// The NVRAM file.
    pub nvram: PathBuf,
    /// Number of partitions.
    pub partitions: usize,
    /// Bytes per partition.
    pub partition_size: usize,
}

fn write_nvram_config(root: &Path, nvram: &Path, g: Geometry) {
    let path = root.join(NVRAM_CONFIG);
    let nvram = std::fs::canonicalize(nvram).unwrap_or_else(|_| nvram.to_path_buf());
    let c = NvramConfig {
        nvram,
        partitions: g.partitions,
        partition_size: g.partition_size,
    };
    let written = serde_json::to_string_pretty(&c)
        .map_err(std::io::Error::other)
        .and_then(|t| std::fs::write(&path, t + "\n"));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot record the NVRAM settings; promote without a server will need --nvram");
    }
}

/// Read `ROOT/fs-dest.nvram.json`.
pub fn read_nvram_config(root: &Path) -> Result<NvramConfig, ServeError> {
    let path = root.join(NVRAM_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| ServeError::Io {
        what: "cannot read (give --nvram, --partitions and --partition-size instead)",
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ServeError::Io {
        what: "cannot parse",
        path,
        source: std::io::Error::other(e),
    })
}

/// The engine opened by a command while no server runs (promote, demote): NVRAM, journals,
/// flusher and destager, under the root lock, without a network endpoint.
pub struct LocalEngine {
    /// The shared state.
    pub engine: Arc<Engine>,
    flusher: std::thread::JoinHandle<()>,
    destager: std::thread::JoinHandle<()>,
    _root_lock: OwnedFd,
}

/// Start the engine's flusher and destager threads.
fn spawn_workers(
    engine: &Arc<Engine>,
    nvram: &Path,
) -> Result<(std::thread::JoinHandle<()>, std::thread::JoinHandle<()>), ServeError> {
    let spawn_err = |source| ServeError::Io {
        what: "cannot start a worker thread for",
        path: nvram.to_path_buf(),
        source,
    };
    let e = engine.clone();
    let flusher = std::thread::Builder::new()
        .name("nvlog-flusher".into())
        .spawn(move || e.run_flusher())
        .map_err(spawn_err)?;
    let e = engine.clone();
    let destager = std::thread::Builder::new()
        .name("destager".into())
        .spawn(move || destage::run(e))
        .map_err(spawn_err)?;
    Ok((flusher, destager))
}

impl LocalEngine {
    /// Open (inside a tokio runtime). Fails with [`ServeError::AlreadyRunning`] when a server
    /// holds the root.
    pub fn open(root: &Path, nvram: &Path, geometry: Geometry) -> Result<LocalEngine, ServeError> {
        let root_lock = lock_root(root)?;
        let engine = Engine::open(root, nvram, geometry)?;
        let (flusher, destager) = spawn_workers(&engine, nvram)?;
        Ok(LocalEngine {
            engine,
            flusher,
            destager,
            _root_lock: root_lock,
        })
    }

    /// Stop the workers and flush NVRAM.
    pub async fn close(self) {
        let engine = self.engine;
        engine.shutdown.store(true, Ordering::Relaxed);
        engine.flush_signal.notify();
        engine.destage_signal.notify();
        let (flusher, destager) = (self.flusher, self.destager);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = flusher.join();
            let _ = destager.join();
        })
        .await;
        if let Err(e) = engine.storage().flush(0, engine.storage().len()) {
            tracing::error!(error = %e, "final NVRAM flush failed");
        }
    }
}

/// A started server: engine, worker threads, status socket and QUIC endpoint.
pub struct Server {
    /// The shared state.
    pub engine: Arc<Engine>,
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    root: PathBuf,
    flusher: std::thread::JoinHandle<()>,
    destager: std::thread::JoinHandle<()>,
    status_task: Option<tokio::task::JoinHandle<()>>,
    tls_dir: PathBuf,
    _root_lock: OwnedFd,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local", &self.local)
            .finish()
    }
}

impl Server {
    /// Open everything and start listening (connections are accepted by
    /// [`Server::accept_until`]).
    pub async fn start(opts: ServeOptions) -> Result<Server, ServeError> {
        std::fs::create_dir_all(&opts.root).map_err(|source| ServeError::Io {
            what: "cannot create the root directory",
            path: opts.root.clone(),
            source,
        })?;
        let root_lock = lock_root(&opts.root)?;
        check_image_fs(&opts.root)?;
        let engine = Engine::open(&opts.root, &opts.nvram, opts.geometry)?;
        write_nvram_config(&opts.root, &opts.nvram, opts.geometry);
        let (flusher, destager) = spawn_workers(&engine, &opts.nvram)?;
        let endpoint = crate::tls::server_endpoint(&opts.tls_dir, opts.listen)?;
        let local = endpoint.local_addr().map_err(|source| ServeError::Io {
            what: "cannot read the local address of the endpoint configured from",
            path: opts.tls_dir.clone(),
            source,
        })?;
        *crate::engine::lock(&engine.listen) = local.to_string();
        let status_task = bind_status_socket(&opts.root)
            .map(|l| tokio::spawn(status::serve_socket(engine.clone(), l)));
        Ok(Server {
            engine,
            endpoint,
            local,
            root: opts.root,
            flusher,
            destager,
            status_task,
            tls_dir: opts.tls_dir,
            _root_lock: root_lock,
        })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Accept connections (one task each) until `stop` completes.
    pub async fn accept_until(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        // Revocations (`certs revoke`) take effect while we serve.
        let watcher = tokio::spawn(crate::revocation::watch(
            self.engine.clone(),
            self.endpoint.clone(),
            self.tls_dir.clone(),
        ));
        let _stop_watcher = AbortOnDrop(watcher);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(i) => { tokio::spawn(session::handle(self.engine.clone(), i)); }
                    None => break,
                },
                _ = &mut stop => break,
            }
        }
    }

    /// Stop accepting, close connections, stop the workers, flush NVRAM.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.endpoint.set_server_config(None);
        self.endpoint
            .close(crate::close_code::SHUTDOWN.into(), b"fs-dest shutting down");
        let engine = self.engine;
        engine.shutdown.store(true, Ordering::Relaxed);
        engine.flush_signal.notify();
        engine.destage_signal.notify();
        let (flusher, destager) = (self.flusher, self.destager);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = flusher.join();
            let _ = destager.join();
        })
        .await;
        if let Err(e) = engine.storage().flush(0, engine.storage().len()) {
            tracing::error!(error = %e, "final NVRAM flush failed");
        }
        if let Some(t) = self.status_task {
            t.abort();
        }
        let _ = std::fs::remove_file(status::socket_path(&self.root));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Run the server until SIGTERM or SIGINT, printing `fs-dest: listening on IP:PORT` once it
/// accepts connections; with `metrics_listen`, serve Prometheus metrics there too.
pub async fn serve(
    opts: ServeOptions,
    metrics_listen: Option<SocketAddr>,
) -> Result<(), ServeError> {
    let sig_err = |source| ServeError::Io {
        what: "cannot install a signal handler",
        path: PathBuf::from("SIGTERM/SIGINT"),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
    // Bound before anything is opened, so a taken port stops the server at once.
    let metrics = match metrics_listen {
        Some(addr) => Some(
            crate::metrics::bind(addr)
                .await
                .map_err(|source| ServeError::Io {
                    what: "cannot listen for metrics (--metrics-listen) on",
                    path: PathBuf::from(addr.to_string()),
                    source,
                })?,
        ),
        None => None,
    };
    let server = Server::start(opts).await?;
    let _metrics_task = metrics.map(|listener| {
        if let Ok(local) = listener.local_addr() {
            tracing::info!("serving metrics on http://{local}/metrics");
        }
        let registry = Arc::new(crate::metrics::registry(server.engine.clone()));
        AbortOnDrop(tokio::spawn(crate::metrics::serve(listener, registry)))
    });
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fs-dest: listening on {}", server.local_addr());
        let _ = out.flush();
    }
    // systemd (Type=notify): ready once sources can connect. Without NOTIFY_SOCKET this does
    // nothing; a failure to tell systemd is logged, not fatal.
    let ready = format!("listening on {}", server.local_addr());
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&ready),
        ],
    ) {
        tracing::warn!("cannot tell systemd that fs-dest is ready: {e}");
    }
    server
        .accept_until(async {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
        .await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    server.shutdown().await;
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
