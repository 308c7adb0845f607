//! End-to-end tests of the destination over real QUIC on loopback: mutual TLS, the
//! handshake, record checks, acknowledgements, CPs applied to the image, restart recovery.
//! The client side is the source's own `tls.rs`, compiled here as a module.

#[path = "../../fs-source/src/tls.rs"]
#[allow(dead_code)]
mod source_tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::frame::{self, KIND_RECORD};
use proto::nvlog::{Geometry, MIN_PARTITION_SIZE};
use proto::wire::{self, Control, Message, PROTOCOL_VERSION};
use proto::Op;
use tokio::sync::oneshot;

use crate::engine::Engine;
use crate::server::{ServeOptions, Server};

const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Poll a condition until it holds (with a deadline): waiting for a state, not sleeping.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

struct Harness {
    _dir: tempfile::TempDir,
    tls: PathBuf,
    root: PathBuf,
    nvram: PathBuf,
    geometry: Geometry,
    running: Option<Running>,
}

struct Running {
    engine: Arc<Engine>,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn new(sources: &[&str]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        crate::certs::init(&tls, &[]).unwrap();
        for s in sources {
            crate::certs::issue(&tls, s, 30).unwrap();
        }
        let mut h = Harness {
            root: dir.path().join("root"),
            nvram: dir.path().join("nvram"),
            tls,
            _dir: dir,
            geometry: Geometry {
                partitions: 2,
                partition_size: MIN_PARTITION_SIZE,
            },
            running: None,
        };
        h.start().await;
        h
    }

    async fn start(&mut self) {
        let server = Server::start(ServeOptions {
            root: self.root.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            nvram: self.nvram.clone(),
            tls_dir: self.tls.clone(),
            geometry: self.geometry,
        })
        .await
        .unwrap();
        let (stop, rx) = oneshot::channel();
        let engine = server.engine.clone();
        let addr = server.local_addr();
        let task = tokio::spawn(async move {
            server
                .accept_until(async {
                    let _ = rx.await;
                })
                .await;
            server.shutdown().await;
        });
        self.running = Some(Running {
            engine,
            addr,
            stop,
            task,
        });
    }

    async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            within("server shutdown", r.task).await.unwrap();
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.running.as_ref().unwrap().engine
    }

    fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().addr
    }

    async fn connect(&self, name: &str) -> Client {
        Client::connect(&self.tls, name, self.addr()).await
    }
}

struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Client {
    async fn connect(tls: &Path, name: &str, addr: SocketAddr) -> Client {
        let (endpoint, _) = source_tls::client_endpoint(tls, name, addr).unwrap();
        let conn = within(
            "handshake",
            endpoint
                .connect(addr, crate::certs::DEST_SERVER_NAME)
                .unwrap(),
        )
        .await
        .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Client {
            _endpoint: endpoint,
            conn,
            send,
            recv,
        }
    }

    async fn control(&mut self, c: &Control) {
        self.send.write_all(&wire::encode_control(c)).await.unwrap();
    }

    async fn hello(&mut self, name: &str, generation: u64) -> Control {
        self.hello_volume(name, generation, "v-test").await
    }

    async fn hello_volume(&mut self, name: &str, generation: u64, volume: &str) -> Control {
        self.control(&Control::Hello {
            protocol: PROTOCOL_VERSION,
            source: name.into(),
            generation,
            last_logged_seq: 0,
            volume: volume.into(),
            take_over: false,
        })
        .await;
        self.next().await.expect("an answer to Hello")
    }

    async fn frames(&mut self, batch: &[u8]) {
        let mut m = wire::header(wire::KIND_FRAMES, batch.len()).to_vec();
        m.extend_from_slice(batch);
        self.send.write_all(&m).await.unwrap();
    }

    /// The next control message, or `None` when the stream ends or the connection closes.
    async fn next(&mut self) -> Option<Control> {
        within("a message", async {
            let mut h = [0u8; wire::HEADER_LEN];
            self.recv.read_exact(&mut h).await.ok()?;
            let (kind, len) = wire::parse_header(&h).unwrap();
            let mut body = vec![0u8; len];
            self.recv.read_exact(&mut body).await.ok()?;
            match wire::decode_body(kind, body).unwrap() {
                Message::Control(c) => Some(c),
                Message::Frames(_) => panic!("the destination never sends frames"),
            }
        })
        .await
    }

    /// Read until an Ack covering `seq` arrives.
    async fn wait_ack(&mut self, seq: u64) {
        loop {
            match self.next().await {
                Some(Control::Ack { durable_seq }) if durable_seq >= seq => return,
                Some(Control::Ack { .. }) => {}
                other => panic!("expected Ack {seq}, got {other:?}"),
            }
        }
    }
}

fn record(seq: u64, op: &Op) -> Vec<u8> {
    frame::encode(seq, 1, 0, KIND_RECORD, 0, &op.encode()).unwrap()
}

fn create(path: &str) -> Op {
    Op::Create {
        path: path.into(),
        mode: 0o644,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    }
}

fn write(path: &str, offset: u64, data: &[u8]) -> Op {
    Op::Write {
        handle: proto::Handle::none(),
        path: path.into(),
        offset,
        data: data.to_vec(),
    }
}

fn mkdir(path: &str) -> Op {
    Op::Mkdir {
        path: path.into(),
        mode: 0o755,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    }
}

fn nvlog_records(engine: &Engine) -> u64 {
    engine.partition_fill().iter().map(|p| p.records).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_issued_certificates_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    crate::certs::init(&ours, &[]).unwrap();
    crate::certs::issue(&ours, "alpha", 30).unwrap();
    crate::certs::init(&theirs, &[]).unwrap();
    crate::certs::issue(&theirs, "alpha", 30).unwrap();
    // A client trusting our CA but holding a certificate from another CA.
    let rogue = dir.path().join("rogue");
    std::fs::create_dir(&rogue).unwrap();
    std::fs::copy(ours.join("ca.pem"), rogue.join("ca.pem")).unwrap();
    std::fs::copy(theirs.join("alpha.pem"), rogue.join("alpha.pem")).unwrap();
    std::fs::copy(theirs.join("alpha.key"), rogue.join("alpha.key")).unwrap();

    let endpoint = crate::tls::server_endpoint(&ours, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let r = match incoming.await {
                Ok(conn) => crate::tls::peer_name(&conn).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(r);
        }
    });

    let (client, _) = source_tls::client_endpoint(&ours, "alpha", addr).unwrap();
    let conn = within("handshake", client.connect(addr, "nvmirror-dest").unwrap())
        .await
        .unwrap();
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    assert_eq!(alpn.as_deref(), Some(&b"nvmirror/1"[..]));
    assert_eq!(
        within("server side", rx.recv()).await.unwrap(),
        Ok("alpha".into())
    );

    let (client, _) = source_tls::client_endpoint(&rogue, "alpha", addr).unwrap();
    let attempt: Result<(), String> = within("rogue handshake", async {
        match client.connect(addr, "nvmirror-dest").unwrap().await {
            // TLS 1.3 clients may finish before the server has checked their certificate;
            // the server then closes the connection.
            Ok(c) => Err(c.closed().await.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let server_side = within("server side", rx.recv()).await.unwrap();
    assert!(
        server_side.is_err(),
        "server accepted a rogue cert: {server_side:?}"
    );
    assert!(attempt.is_err());

    let missing = source_tls::client_endpoint(&ours, "nobody", addr).unwrap_err();
    assert!(missing.to_string().contains("nobody.pem"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_acked_destaged_and_applied_at_a_cp() {
    let mut h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    assert_eq!(
        c.hello("alpha", 0).await,
        Control::Welcome {
            durable_seq: 0,
            applied_seq: 0,
            generation: 0,
            baseline_needed: true,
            out_of_sync: vec![],
            out_of_sync_total: 0,
        }
    );
    let mut batch = record(1, &mkdir("d"));
    batch.extend(record(2, &create("d/f")));
    batch.extend(record(3, &write("d/f", 0, b"hello")));
    c.frames(&batch).await;
    c.wait_ack(3).await;
    c.frames(&record(4, &write("d/f", 5, b", world"))).await;
    c.wait_ack(4).await;

    c.control(&Control::CpRequest {
        id: 7,
        partition: 0,
        last_seq: 4,
    })
    .await;
    assert_eq!(
        c.next().await,
        Some(Control::CpDone {
            id: 7,
            applied_seq: 4,
            failed: 0,
            out_of_sync: vec![],
            out_of_sync_total: 0,
        })
    );
    let image = h.root.join("alpha/image");
    assert_eq!(std::fs::read(image.join("d/f")).unwrap(), b"hello, world");
    let engine = h.engine().clone();
    let alpha = engine.source("alpha").unwrap();
    assert_eq!(alpha.applied_seq.load(Ordering::Relaxed), 4);
    assert_eq!(engine.slots.get(alpha.slot).unwrap().applied_seq, 4);
    assert_eq!(
        alpha.journal_bytes(),
        crate::journal::HEADER_LEN as u64,
        "journal truncated after the CP"
    );
    let root = h.root.clone();
    let report = tokio::task::spawn_blocking(move || crate::status::query(&root))
        .await
        .unwrap()
        .unwrap()
        .expect("the running server answers on its status socket");
    assert!(report.running);
    assert_eq!(report.listen, h.addr().to_string());
    assert_eq!(report.nvlog.partitions.len(), 2);
    let s = &report.sources[0];
    assert_eq!(s.name, "alpha");
    assert_eq!((s.durable_seq, s.applied_seq), (Some(4), Some(4)));
    assert_eq!((s.cp_count, s.records_received, s.apply_errors), (1, 4, 0));
    assert!(s.connected);

    // Restart: the durable and applied sequence numbers survive.
    drop(c);
    h.stop().await;
    h.start().await;
    let mut c = h.connect("alpha").await;
    assert_eq!(
        c.hello("alpha", 0).await,
        Control::Welcome {
            durable_seq: 4,
            applied_seq: 4,
            generation: 0,
            baseline_needed: true,
            out_of_sync: vec![],
            out_of_sync_total: 0,
        }
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cp_waits_for_a_free_cp_slot() {
    let mut h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    assert!(matches!(c.hello("alpha", 0).await, Control::Welcome { .. }));
    let mut batch = record(1, &mkdir("d"));
    batch.extend(record(2, &create("d/f")));
    c.frames(&batch).await;
    c.wait_ack(2).await;
    // Every CP slot taken (as by other sources' CPs): this source's CP must not apply.
    let engine = h.engine().clone();
    let held = engine
        .cp_slots
        .clone()
        .acquire_many_owned(crate::engine::CONCURRENT_CPS as u32)
        .await
        .unwrap();
    c.control(&Control::CpRequest {
        id: 1,
        partition: 0,
        last_seq: 2,
    })
    .await;
    let early = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    assert!(
        early.is_err(),
        "a CP ran with every CP slot taken: {early:?}"
    );
    let alpha = engine.source("alpha").unwrap();
    assert_eq!(alpha.applied_seq.load(Ordering::Acquire), 0);
    assert!(!h.root.join("alpha/image/d").exists());
    drop(held);
    assert!(matches!(
        c.next().await,
        Some(Control::CpDone {
            id: 1,
            applied_seq: 2,
            ..
        })
    ));
    assert!(h.root.join("alpha/image/d/f").exists());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_refused_and_nothing_of_them_is_logged() {
    let h = Harness::new(&["alpha", "beta"]).await;
    let engine = h.engine().clone();
    let mut bad_crc = record(2, &create("x"));
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad CRC", bad_crc),
        ("gap", record(3, &create("x"))),
        ("repeat", record(1, &create("x"))),
        ("escaping path", record(2, &create("../etc/passwd"))),
        ("absolute path", record(2, &create("/etc/passwd"))),
    ];
    // One good record first.
    let mut c = h.connect("alpha").await;
    c.hello("alpha", 0).await;
    c.frames(&record(1, &create("ok"))).await;
    c.wait_ack(1).await;
    drop(c);
    // Let the destager move it to the journal, so the counts below only change if a refused
    // record were logged.
    let alpha = engine.source("alpha").unwrap();
    wait_until("record 1 destaged", || {
        nvlog_records(&engine) == 0 && *alpha.journaled.borrow() == 1
    })
    .await;
    for (what, bad) in cases {
        let mut c = h.connect("alpha").await;
        match c.hello("alpha", 0).await {
            Control::Welcome { durable_seq: 1, .. } => {}
            other => panic!("{what}: expected Welcome at 1, got {other:?}"),
        }
        let before = nvlog_records(&engine) + engine.source("alpha").unwrap().journal_bytes();
        c.frames(&bad).await;
        match c.next().await {
            Some(Control::Error { seq, reason }) => {
                assert!(seq.is_some(), "{what}: {reason}");
            }
            other => panic!("{what}: expected Error, got {other:?}"),
        }
        assert!(c.next().await.is_none(), "{what}: connection closed");
        let after = nvlog_records(&engine) + engine.source("alpha").unwrap().journal_bytes();
        assert_eq!(before, after, "{what}: something was logged");
        assert_eq!(
            engine
                .source("alpha")
                .unwrap()
                .accepted_seq
                .load(Ordering::Relaxed),
            1
        );
    }
    // Everyone else is still served.
    let mut b = h.connect("beta").await;
    assert!(matches!(b.hello("beta", 0).await, Control::Welcome { .. }));
    b.frames(&record(1, &mkdir("dir"))).await;
    b.wait_ack(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_builds_no_path_from_a_bad_name() {
    // Beneath the certificate check in the session: the engine itself refuses names that are
    // not source names before making ROOT/NAME.
    let h = Harness::new(&["alpha"]).await;
    for bad in ["../escaped", "..", "a/b", "", ".hidden"] {
        assert!(h.engine().source(bad).is_err(), "{bad:?}");
    }
    assert!(!h.root.join("..").join("escaped").exists());
    assert!(h.engine().source("alpha").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_name_and_stale_generation_are_refused() {
    let h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    match c.hello("beta", 0).await {
        Control::Refused { reason } => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let mut c = h.connect("alpha").await;
    assert!(matches!(
        c.hello("alpha", 5).await,
        Control::Welcome { generation: 5, .. }
    ));
    drop(c);
    let mut c = h.connect("alpha").await;
    match c.hello("alpha", 3).await {
        Control::Refused { reason } => assert!(
            reason.contains("promoted at generation 5") && reason.contains("fenced"),
            "{reason}"
        ),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_replaces_the_first_and_resumes() {
    let h = Harness::new(&["alpha"]).await;
    let mut first = h.connect("alpha").await;
    first.hello("alpha", 0).await;
    first.frames(&record(1, &create("a"))).await;
    first.wait_ack(1).await;
    let mut second = h.connect("alpha").await;
    assert!(matches!(
        second.hello("alpha", 0).await,
        Control::Welcome { durable_seq: 1, .. }
    ));
    within("old connection closed", first.conn.closed()).await;
    second.frames(&record(2, &create("b"))).await;
    second.wait_ack(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_nvlog_applies_back_pressure_and_loses_nothing() {
    let mut h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    c.hello("alpha", 0).await;
    c.frames(&record(1, &create("big"))).await;
    // ~4x the whole NVLOG (2 x 60 KiB of frame space) in 8 KiB writes.
    let n = 60u64;
    let chunk = vec![0x5a; 8192];
    for i in 0..n {
        c.frames(&record(2 + i, &write("big", i * 8192, &chunk)))
            .await;
    }
    c.wait_ack(n + 1).await;
    c.control(&Control::CpRequest {
        id: 1,
        partition: 0,
        last_seq: n + 1,
    })
    .await;
    assert_eq!(
        c.next().await,
        Some(Control::CpDone {
            id: 1,
            applied_seq: n + 1,
            failed: 0,
            out_of_sync: vec![],
            out_of_sync_total: 0,
        })
    );
    let data = std::fs::read(h.root.join("alpha/image/big")).unwrap();
    assert_eq!(data.len() as u64, n * 8192);
    assert!(data.iter().all(|&b| b == 0x5a));
    let engine = h.engine().clone();
    wait_until("NVLOG drained", || nvlog_records(&engine) == 0).await;
    h.stop().await;
}

/// Not a timed assertion: prints the ingest rate of 1 MiB writes over loopback
/// (`cargo test -p fs-dest --release -- --ignored --nocapture ingest_rate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn ingest_rate() {
    let mut h = Harness::new(&["alpha"]).await;
    h.stop().await;
    h.geometry = Geometry {
        partitions: 2,
        partition_size: 64 << 20,
    };
    std::fs::remove_file(&h.nvram).unwrap();
    h.start().await;
    let mut c = h.connect("alpha").await;
    c.hello("alpha", 0).await;
    c.frames(&record(1, &create("big"))).await;
    let chunk = vec![0xa5; 1 << 20];
    let n = 512u64;
    let t = std::time::Instant::now();
    let mut batch = Vec::new();
    for i in 0..n {
        batch.clear();
        batch.extend(record(2 + i, &write("big", i << 20, &chunk)));
        c.frames(&batch).await;
    }
    c.wait_ack(n + 1).await;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ingest: {n} MiB in {secs:.2} s = {:.0} MiB/s",
        n as f64 / secs
    );
    h.stop().await;
}

/// A record that fails to apply is reported in `CpDone` (and persisted) as an out-of-sync
/// path; a later `Replace` of that path heals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_record_is_reported_out_of_sync_until_a_replace_heals_it() {
    let mut h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    assert!(matches!(c.hello("alpha", 0).await, Control::Welcome { .. }));
    // A write to a file the image does not have.
    let mut batch = record(1, &mkdir("d"));
    batch.extend(record(2, &write("d/missing", 0, b"lost")));
    c.frames(&batch).await;
    c.wait_ack(2).await;
    c.control(&Control::CpRequest {
        id: 1,
        partition: 0,
        last_seq: 2,
    })
    .await;
    match c.next().await {
        Some(Control::CpDone {
            applied_seq: 2,
            failed: 1,
            out_of_sync,
            out_of_sync_total: 1,
            ..
        }) => {
            assert_eq!(out_of_sync[0].path, b"d/missing");
            assert_eq!(out_of_sync[0].seq, 2);
            assert!(out_of_sync[0].error.contains("write"), "{out_of_sync:?}");
        }
        other => panic!("expected a CpDone reporting one failure, got {other:?}"),
    }
    assert!(h.root.join("alpha/out-of-sync").exists(), "persisted");
    let replace = Op::Replace {
        path: b"d/missing".to_vec(),
        entry: proto::Entry::File {
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
    };
    let mut batch = record(3, &replace);
    batch.extend(record(4, &write("d/missing", 0, b"found")));
    c.frames(&batch).await;
    c.wait_ack(4).await;
    c.control(&Control::CpRequest {
        id: 2,
        partition: 0,
        last_seq: 4,
    })
    .await;
    assert_eq!(
        c.next().await,
        Some(Control::CpDone {
            id: 2,
            applied_seq: 4,
            failed: 0,
            out_of_sync: vec![],
            out_of_sync_total: 0,
        })
    );
    assert_eq!(
        std::fs::read(h.root.join("alpha/image/d/missing")).unwrap(),
        b"found"
    );
    assert!(!h.root.join("alpha/out-of-sync").exists());
    h.stop().await;
}

/// An image that holds data mirrors only its own volume: another one is refused, naming the
/// way out, and nothing is changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_data_refuses_another_volume() {
    let mut h = Harness::new(&["alpha"]).await;
    let mut c = h.connect("alpha").await;
    assert!(matches!(c.hello("alpha", 0).await, Control::Welcome { .. }));
    c.frames(&record(1, &mkdir("d"))).await;
    c.wait_ack(1).await;
    c.control(&Control::CpRequest {
        id: 1,
        partition: 0,
        last_seq: 1,
    })
    .await;
    assert!(matches!(c.next().await, Some(Control::CpDone { .. })));
    drop(c);
    let mut c = h.connect("alpha").await;
    match c.hello_volume("alpha", 0, "v-other").await {
        Control::Refused { reason } => {
            assert!(
                reason.contains("--force-baseline") && reason.contains("v-test"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(h.root.join("alpha/image/d").is_dir());
    h.stop().await;
}
