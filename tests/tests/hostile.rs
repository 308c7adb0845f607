//! A hostile client: it holds a certificate signed by the destination's CA and speaks the
//! protocol, then sends what a compromised or malicious source would. Each case asserts a
//! clear error to the sender, a line in the destination's log, nothing changed outside the
//! image (files outside keep their content and mode), and a legitimate source mirroring
//! correctly meanwhile.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmirror_e2e::{assert_trees_equal, require_mount, run_as, run_ok, Harness, HarnessOptions};
use proto::frame::{self, KIND_RECORD};
use proto::wire::{self, Control, Message, PROTOCOL_VERSION};
use proto::{Handle, Op};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const ALPN: &[u8] = b"nvmirror/1";
const SERVER_NAME: &str = "nvmirror-dest";
/// Bound on every wait for the destination.
const WAIT: Duration = Duration::from_secs(20);

/// A QUIC client endpoint presenting `cert_pem`/`key_pem`, trusting the CA of `tls`.
fn endpoint(tls: &Path, cert_pem: &str, key_pem: &str) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls.join("ca.pem")).expect("ca.pem") {
        roots.add(c.expect("CA certificate")).expect("usable CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("client certificate");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("client key");
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    tls_cfg.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).expect("QUIC config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

/// A protocol client with one bidirectional stream.
struct Client {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Client {
    async fn connect(ep: quinn::Endpoint, addr: SocketAddr) -> Result<Client, String> {
        let conn = tokio::time::timeout(
            WAIT,
            ep.connect(addr, SERVER_NAME).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Client {
            _ep: ep,
            conn,
            send,
            recv,
        })
    }

    async fn control(&mut self, c: &Control) {
        let _ = self.send.write_all(&wire::encode_control(c)).await;
    }

    async fn hello(&mut self, name: &str, last_logged_seq: u64) -> Option<Control> {
        self.control(&Control::Hello {
            protocol: PROTOCOL_VERSION,
            source: name.into(),
            generation: 0,
            last_logged_seq,
            volume: format!("v-{name}"),
            take_over: false,
        })
        .await;
        self.next().await
    }

    async fn raw(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }

    async fn frames(&mut self, batch: &[u8]) {
        let mut m = wire::header(wire::KIND_FRAMES, batch.len()).to_vec();
        m.extend_from_slice(batch);
        self.raw(&m).await;
    }

    /// The next control message; `None` when the stream or connection ends (bounded).
    async fn next(&mut self) -> Option<Control> {
        tokio::time::timeout(WAIT, async {
            let mut h = [0u8; wire::HEADER_LEN];
            self.recv.read_exact(&mut h).await.ok()?;
            let (kind, len) = wire::parse_header(&h).ok()?;
            let mut body = vec![0u8; len];
            self.recv.read_exact(&mut body).await.ok()?;
            match wire::decode_body(kind, body).ok()? {
                Message::Control(c) => Some(c),
                Message::Frames(_) => None,
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer from the destination within {WAIT:?}"))
    }

    /// Read until the answer that is not an Ack.
    async fn answer(&mut self) -> Option<Control> {
        loop {
            match self.next().await {
                Some(Control::Ack { .. }) => continue,
                other => return other,
            }
        }
    }
}

fn rec(seq: u64, op: &Op) -> Vec<u8> {
    frame::encode(seq, 1, 0, KIND_RECORD, 0, &op.encode()).expect("frame")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn addr(h: &Harness) -> SocketAddr {
    h.dest_addr.parse().expect("destination address")
}

fn issued(h: &Harness, name: &str) -> (String, String) {
    h.certs_issue(&h.tls_dir.clone(), name);
    (
        fs::read_to_string(h.tls_dir.join(format!("{name}.pem"))).expect("cert"),
        fs::read_to_string(h.tls_dir.join(format!("{name}.key"))).expect("key"),
    )
}

/// A certificate for `common_name` signed by the harness CA, valid as given (what `certs
/// issue` would refuse to make).
fn forged(
    h: &Harness,
    common_name: &str,
    valid: (time::OffsetDateTime, time::OffsetDateTime),
) -> (String, String) {
    let ca_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(h.tls_dir.join("ca.key")).expect("ca.key"))
            .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &fs::read_to_string(h.tls_dir.join("ca.pem")).expect("ca.pem"),
        ca_key,
    )
    .expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    p.not_before = valid.0;
    p.not_after = valid.1;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn dest_log(h: &Harness) -> String {
    fs::read_to_string(h.log_dir.join("fs-dest.log")).unwrap_or_default()
}

/// The destination's log once it contains `needle` (it may write the line just after the
/// client saw the outcome), or as it is after 10 s.
fn log_with(h: &Harness, needle: &str) -> String {
    nvmirror_e2e::poll_until(Duration::from_secs(10), || dest_log(h).contains(needle));
    dest_log(h)
}

/// A root-owned 0600 file outside every image, with its content and mode.
struct Victim {
    path: PathBuf,
}

impl Victim {
    fn new(dir: &Path) -> Victim {
        let path = dir.join("victim");
        fs::write(&path, b"secret").expect("victim");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod victim");
        Victim { path }
    }

    #[track_caller]
    fn unchanged(&self, case: &str) {
        let md = fs::symlink_metadata(&self.path).expect("victim still there");
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o600,
            "{case}: the victim's mode changed"
        );
        assert_eq!(
            fs::read(&self.path).expect("read victim"),
            b"secret",
            "{case}: the victim's content changed"
        );
    }
}

/// The legitimate source goes on mirroring: a file written now is in the image after a CP.
#[track_caller]
fn legit_mirrors(h: &Harness, tag: &str) {
    fs::write(h.mnt().join(format!("legit-{tag}")), tag.as_bytes()).expect("legit write");
    h.cp();
    assert_eq!(
        fs::read(h.image().join(format!("legit-{tag}"))).expect("legit file in the image"),
        tag.as_bytes()
    );
}

fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn hostile_records_never_reach_outside_the_image() {
    const TEST: &str = "hostile_records";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let victim = Victim::new(&h.dir);
    let (cert, key) = issued(&h, "evil");
    // A block device to aim at: a loop device over a file of known content.
    let disk = h.dir.join("disk.img");
    fs::write(&disk, vec![0x5a; 1 << 20]).expect("disk image");
    let loopdev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&disk))
        .trim()
        .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let rdev = fs::metadata(&loopdev)
        .map(|m| std::os::unix::fs::MetadataExt::rdev(&m))
        .expect("loop rdev");
    let rt = runtime();
    let _in_runtime = rt.enter();
    let a = addr(&h);
    let ep = endpoint(&h.tls_dir, &cert, &key);
    rt.block_on(async {
        let mut c = Client::connect(ep.clone(), a).await.expect("evil connects");
        assert!(matches!(
            c.hello("evil", 0).await,
            Some(Control::Welcome { .. })
        ));
        let me = (0u32, 0u32);
        let target = victim.path.as_os_str().as_encoded_bytes().to_vec();
        let ops = vec![
            // 1-2: a symlink to the victim, then every operation aimed through it.
            Op::Symlink {
                path: b"s".to_vec(),
                target,
                uid: me.0,
                gid: me.1,
            },
            Op::Mknod {
                path: b"s".to_vec(),
                mode: libc::S_IFIFO | 0o4777,
                rdev: 0,
                uid: me.0,
                gid: me.1,
            },
            Op::SetAttr {
                path: b"s".to_vec(),
                mode: Some(0o4777),
                uid: Some(65534),
                gid: None,
                size: None,
                atime: None,
                mtime: None,
                handle: Handle::none(),
            },
            Op::SetAttr {
                path: b"s".to_vec(),
                mode: None,
                uid: None,
                gid: None,
                size: Some(0),
                atime: None,
                mtime: None,
                handle: Handle::none(),
            },
            Op::Write {
                path: b"s".to_vec(),
                offset: 0,
                data: b"owned".to_vec(),
                handle: Handle::none(),
            },
            Op::SetXattr {
                path: b"s".to_vec(),
                name: b"user.x".to_vec(),
                value: b"v".to_vec(),
                flags: 0,
            },
            Op::Mkdir {
                path: b"s".to_vec(),
                mode: 0o777,
                uid: me.0,
                gid: me.1,
            },
            // A block device of this host, then a write to it.
            Op::Mknod {
                path: b"blk".to_vec(),
                mode: libc::S_IFBLK | 0o666,
                rdev,
                uid: me.0,
                gid: me.1,
            },
            Op::Write {
                path: b"blk".to_vec(),
                offset: 0,
                data: b"EVIL".to_vec(),
                handle: Handle::none(),
            },
            Op::Fallocate {
                path: b"blk".to_vec(),
                mode: 0,
                offset: 0,
                length: 4096,
                handle: Handle::none(),
            },
            // A FIFO, then a write to it (which would block a CP forever).
            Op::Mknod {
                path: b"fifo".to_vec(),
                mode: libc::S_IFIFO | 0o666,
                rdev: 0,
                uid: me.0,
                gid: me.1,
            },
            Op::Write {
                path: b"fifo".to_vec(),
                offset: 0,
                data: b"x".to_vec(),
                handle: Handle::none(),
            },
            // A setuid-root binary, and the image root opened to everyone.
            Op::Create {
                path: b"suid".to_vec(),
                mode: 0o4755,
                uid: 0,
                gid: 0,
            },
            Op::chmod(Vec::new(), 0o777),
        ];
        let mut batch = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            batch.extend_from_slice(&rec(i as u64 + 1, op));
        }
        c.frames(&batch).await;
        let last = ops.len() as u64;
        c.control(&Control::CpRequest {
            id: 1,
            partition: 0,
            last_seq: last,
        })
        .await;
        let started = Instant::now();
        match c.answer().await {
            Some(Control::CpDone {
                failed,
                out_of_sync,
                ..
            }) => {
                assert!(failed >= 7, "the refused records are counted: {failed}");
                let paths: Vec<String> = out_of_sync
                    .iter()
                    .map(|d| String::from_utf8_lossy(&d.path).into_owned())
                    .collect();
                for p in ["s", "blk", "fifo"] {
                    assert!(
                        paths.iter().any(|x| x == p),
                        "{p} reported out of sync: {paths:?}"
                    );
                }
                assert!(
                    out_of_sync
                        .iter()
                        .any(|d| d.error.contains("not a regular file")),
                    "the sender is told why: {out_of_sync:?}"
                );
            }
            other => panic!("expected CpDone, got {other:?}"),
        }
        assert!(started.elapsed() < WAIT, "the CP did not block on the FIFO");
    });
    victim.unchanged("records through a symlink");
    let on_disk = fs::read(&disk).expect("disk image");
    assert!(
        on_disk.iter().all(|b| *b == 0x5a),
        "bytes reached the block device"
    );
    let log = log_with(&h, "not a regular file");
    assert!(
        log.contains("not a regular file"),
        "the destination logs the refusal:\n{log}"
    );
    // The image holds a setuid-root file and a 0777 root, but local users cannot reach them.
    let evil_dir = h.dest_root.join("evil");
    for d in [&h.dest_root, &evil_dir, &evil_dir.join("journal")] {
        let mode = fs::metadata(d).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} must be root-only", d.display());
    }
    let out = run_as(
        65534,
        &format!("stat {}", evil_dir.join("image/suid").display()),
        &h.dir,
    );
    assert!(
        !out.status.success(),
        "uid 65534 reached the image's setuid file"
    );
    legit_mirrors(&h, "after-records");

    // The checks that held before, still: each closes the connection with an Error, logs,
    // and logs nothing of the record.
    let mut bad_crc = rec(
        last_seq(&h),
        &Op::Unlink {
            path: b"x".to_vec(),
        },
    );
    let n = bad_crc.len() - 1;
    bad_crc[n] ^= 0xff;
    let next = last_seq(&h) + 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "escaping path",
            rec(
                next,
                &Op::Create {
                    path: b"../escaped".to_vec(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            ),
        ),
        (
            "absolute path",
            rec(
                next,
                &Op::Create {
                    path: b"/etc/evil".to_vec(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            ),
        ),
        (
            "NUL in a path",
            rec(
                next,
                &Op::Create {
                    path: b"a\0b".to_vec(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            ),
        ),
        (
            "long name",
            rec(
                next,
                &Op::Create {
                    path: vec![b'n'; 300],
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            ),
        ),
        ("bad CRC", bad_crc),
        (
            "gap",
            rec(
                next + 5,
                &Op::Unlink {
                    path: b"x".to_vec(),
                },
            ),
        ),
        (
            "repeat",
            rec(
                next - 1,
                &Op::Unlink {
                    path: b"x".to_vec(),
                },
            ),
        ),
        ("garbage", vec![0xab; 200]),
    ];
    for (what, bytes) in cases {
        rt.block_on(async {
            let mut c = Client::connect(ep.clone(), a).await.expect("evil connects");
            assert!(
                matches!(
                    c.hello("evil", next - 1).await,
                    Some(Control::Welcome { .. })
                ),
                "{what}"
            );
            c.frames(&bytes).await;
            match c.answer().await {
                Some(Control::Error { reason, .. }) => assert!(!reason.is_empty(), "{what}"),
                other => panic!("{what}: expected an Error, got {other:?}"),
            }
            assert!(c.next().await.is_none(), "{what}: the connection is closed");
        });
    }
    assert!(!h.dest_root.join("escaped").exists() && !h.dir.join("escaped").exists());
    assert!(
        log_with(&h, "refused a record").contains("refused a record"),
        "the destination logs refused records"
    );
    victim.unchanged("refused frames");
    legit_mirrors(&h, "after-frames");
    assert_trees_equal(h.backing(), &h.image());
}

/// The next sequence number the destination expects from `evil`, minus one.
fn last_seq(h: &Harness) -> u64 {
    let s = h.dest_source_status("evil");
    s["accepted_seq"]
        .as_u64()
        .or_else(|| s["durable_seq"].as_u64())
        .unwrap_or(0)
}

#[test]
fn certificates_are_checked_revoked_and_dated() {
    const TEST: &str = "hostile_certs";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let rt = runtime();
    let _in_runtime = rt.enter();
    let a = addr(&h);
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    // A CA-signed certificate whose name would build a path outside ROOT.
    let (cert, key) = forged(&h, "../escaped", (now - day, now + day));
    rt.block_on(async {
        if let Ok(mut c) = Client::connect(endpoint(&h.tls_dir, &cert, &key), a).await {
            assert!(
                c.hello("../escaped", 0).await.is_none(),
                "no Welcome for ../escaped"
            );
        }
    });
    assert!(!h.dir.join("escaped").exists() && !h.dest_root.join("..").join("escaped").exists());
    assert!(
        log_with(&h, "invalid source name").contains("invalid source name"),
        "the destination names the bad name:\n{}",
        dest_log(&h)
    );

    // Expired and not yet valid: refused in the handshake, with a line saying why.
    for (what, valid) in [
        ("expired", (now - day * 3, now - day)),
        ("not yet valid", (now + day, now + day * 3)),
    ] {
        let (cert, key) = forged(&h, "dated", valid);
        let r = rt.block_on(async {
            match Client::connect(endpoint(&h.tls_dir, &cert, &key), a).await {
                Ok(mut c) => c.hello("dated", 0).await.map(|m| format!("{m:?}")),
                Err(e) => Some(e),
            }
        });
        assert!(
            !r.is_some_and(|m| m.contains("Welcome")),
            "{what}: a Welcome"
        );
        let want = if what == "expired" {
            "expired client certificate"
        } else {
            "not valid yet"
        };
        let log = log_with(&h, want);
        assert!(
            log.contains(want),
            "{what}: the destination says why:\n{log}"
        );
    }

    // Revocation: an open connection is closed within seconds, a new one refused.
    let (cert, key) = issued(&h, "revokee");
    let ep = endpoint(&h.tls_dir, &cert, &key);
    rt.block_on(async {
        let mut c = Client::connect(ep.clone(), a)
            .await
            .expect("revokee connects");
        assert!(matches!(
            c.hello("revokee", 0).await,
            Some(Control::Welcome { .. })
        ));
        let out = run_ok(
            h.fs_dest()
                .args(["certs", "revoke", "--name", "revokee", "--dir"])
                .arg(&h.tls_dir),
        );
        assert!(out.contains("revoked"), "{out}");
        let started = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(10), c.conn.closed()).await;
        assert!(closed.is_ok(), "the revoked source's connection stays open");
        eprintln!(
            "{TEST}: revoked connection closed {:?} after `certs revoke`",
            started.elapsed()
        );
        let again = Client::connect(ep.clone(), a).await;
        let refused = match again {
            Err(_) => true,
            Ok(mut c) => c.hello("revokee", 0).await.is_none(),
        };
        assert!(refused, "a revoked certificate connects again");
    });
    assert!(
        log_with(&h, "revoked").contains("revoked"),
        "the destination logs the revocation"
    );
    legit_mirrors(&h, "after-certs");
}

#[test]
fn floods_of_connections_keep_the_destination_bounded() {
    const TEST: &str = "hostile_flood";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let pid = h.dest.as_ref().expect("fs-dest").pid();
    let (cert, key) = issued(&h, "flood");
    let rt = runtime();
    let _in_runtime = rt.enter();
    let a = addr(&h);
    legit_mirrors(&h, "before");
    let before = rss_kib(pid);
    // 12 connections each announcing a 64 MiB Hello (and sending 1 MiB of it).
    let ep = endpoint(&h.tls_dir, &cert, &key);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut c) = Client::connect(ep, a).await else { return false };
                let mut m = wire::header(wire::KIND_CONTROL, 64 << 20).to_vec();
                m.extend_from_slice(&vec![0u8; 1 << 20]);
                c.raw(&m).await;
                matches!(c.next().await, Some(Control::Refused { reason }) if reason.contains("over the limit"))
            }));
        }
        for t in tasks {
            assert!(
                t.await.unwrap_or(false),
                "an oversized Hello is refused with a reason"
            );
        }
    });
    let after_hello = rss_kib(pid);
    // 1,000 connections at once that never say Hello.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (peak, watching) = (peak.clone(), watching.clone());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let (accepted, refused) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move {
                match ep.connect(a, SERVER_NAME) {
                    Ok(connecting) => match tokio::time::timeout(WAIT, connecting).await {
                        Ok(Ok(c)) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            drop(c);
                            true
                        }
                        _ => false,
                    },
                    Err(_) => false,
                }
            }));
        }
        let mut n = (0, 0);
        for t in tasks {
            if t.await.unwrap_or(false) {
                n.0 += 1
            } else {
                n.1 += 1
            }
        }
        n
    });
    // Meanwhile, and after, the legitimate source mirrors.
    legit_mirrors(&h, "during");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{TEST}: fs-dest RSS {} MiB before, {} MiB after 12 oversized Hellos, peak {} MiB \
         during 1,000 connections ({accepted} handshakes completed, {refused} refused)",
        before / 1024,
        after_hello / 1024,
        peak / 1024
    );
    assert!(
        after_hello < before + 64 * 1024,
        "12 announced 64 MiB Hellos grew fs-dest from {before} KiB to {after_hello} KiB"
    );
    assert!(
        peak < before + 256 * 1024,
        "1,000 connections grew fs-dest from {before} KiB to a peak of {peak} KiB"
    );
    assert!(
        log_with(&h, "over the limit").contains("over the limit"),
        "the oversized Hellos are logged"
    );
    legit_mirrors(&h, "after");
    assert_trees_equal(h.backing(), &h.image());
}
