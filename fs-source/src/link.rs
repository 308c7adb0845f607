//! The link to the destination: one QUIC connection with one long-lived bidirectional stream,
//! re-established whenever it breaks. On every (re)connect the handshake tells us the highest
//! sequence number the destination holds durably, and everything after it is resent from the
//! NVLOG, so nothing is skipped and nothing is applied twice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::wire::{self, Control, Message};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::mirror::{CpAnswer, Mirror};

/// Where and how to reach the destination.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// Destination address.
    pub dest: SocketAddr,
    /// The name (DNS name or IP address) the destination's certificate must carry.
    pub server_name: String,
    /// Directory with ca.pem, NAME.pem, NAME.key.
    pub tls_dir: PathBuf,
    /// This source's name.
    pub name: String,
    /// The backing volume's identity (see `identity.rs`).
    pub volume: String,
    /// `--force-baseline`: replace an image that mirrors another volume.
    pub take_over: bool,
    /// The backing volume's tree, the volume's own: records fetched back from the destination
    /// are applied through it, so its directory cache forgets what they rename or remove.
    pub tree: Arc<proto::apply::Tree>,
}

/// What the CP driver and the control socket share with the link task.
pub struct LinkShared {
    control_tx: mpsc::UnboundedSender<Control>,
    pending_cps: Mutex<HashMap<u64, oneshot::Sender<CpAnswer>>>,
    pending_listings: Mutex<HashMap<u64, oneshot::Sender<Listing>>>,
    next_listing: std::sync::atomic::AtomicU64,
    /// Bumped on every successful (re)connect, so waiters can resend requests.
    pub epoch: watch::Sender<u64>,
}

impl LinkShared {
    /// Queue a control message for the current (or next) connection.
    pub fn send_control(&self, c: Control) {
        let _ = self.control_tx.send(c);
    }

    /// Queue a CP request and get a receiver for its answer.
    pub fn request_cp(
        &self,
        id: u64,
        partition: u16,
        last_seq: u64,
    ) -> oneshot::Receiver<CpAnswer> {
        let (tx, rx) = oneshot::channel();
        self.pending_cps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let _ = self.control_tx.send(Control::CpRequest {
            id,
            partition,
            last_seq,
        });
        rx
    }
}

/// The destination's summaries of an image directory (or of one entry), for `verify`.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The directory's (or the entry's) own summary; `None` when it is not in the image.
    pub dir: Option<Box<proto::summary::EntrySummary>>,
    /// Entries, by name.
    pub entries: Vec<proto::summary::EntrySummary>,
    /// More entries follow.
    pub more: bool,
    /// Why the destination could not list it.
    pub error: Option<String>,
}

impl LinkShared {
    /// Ask the destination to summarize the image's directory `path` (entries after `after`),
    /// or with `single` the entry `path` itself.
    pub fn request_listing(
        &self,
        path: &[u8],
        after: Option<Vec<u8>>,
        single: bool,
    ) -> oneshot::Receiver<Listing> {
        let id = self
            .next_listing
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending_listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let _ = self.control_tx.send(Control::VerifyRequest {
            id,
            path: path.to_vec(),
            after: after.map(serde_bytes::ByteBuf::from),
            single,
        });
        rx
    }
}

/// Create the shared part and the receiver the link task consumes.
pub fn shared() -> (Arc<LinkShared>, mpsc::UnboundedReceiver<Control>) {
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    (
        Arc::new(LinkShared {
            control_tx,
            pending_cps: Mutex::new(HashMap::new()),
            pending_listings: Mutex::new(HashMap::new()),
            next_listing: std::sync::atomic::AtomicU64::new(1),
            epoch: watch::channel(0).0,
        }),
        control_rx,
    )
}

/// Why a connection ended (of the link, or of the asynchronous leg).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("{0}")]
    Tls(#[from] crate::tls::ClientTlsError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("send: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("receive: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("protocol: {0}")]
    Wire(#[from] wire::WireError),
    #[error("destination refused this source: {0}")]
    Refused(String),
    #[error("destination reported an error: {0}")]
    Remote(String),
    #[error("unexpected message from the destination: {0}")]
    Unexpected(String),
}

/// How a TLS handshake failed, when one did.
enum TlsFailure {
    /// The destination refused ours, with this alert.
    Remote(u64),
    /// We refused the destination's certificate: rustls's reason.
    Local(String),
}

/// The TLS failure that ended a connection, if the peer (or we) refused the TLS handshake.
fn tls_failure(e: &LinkError) -> Option<TlsFailure> {
    let conn = match e {
        LinkError::Connection(c) => c,
        LinkError::Write(quinn::WriteError::ConnectionLost(c)) => c,
        LinkError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c))) => c,
        _ => return None,
    };
    // QUIC carries TLS alerts as CRYPTO_ERROR codes 0x100 + alert.
    let is_alert = |code: u64| (0x100..=0x1ff).contains(&code);
    match conn {
        quinn::ConnectionError::ConnectionClosed(close)
            if is_alert(u64::from(close.error_code)) =>
        {
            Some(TlsFailure::Remote(u64::from(close.error_code) - 0x100))
        }
        // A transport error is one this end detected: our verification of the destination.
        quinn::ConnectionError::TransportError(t) if is_alert(u64::from(t.code)) => {
            Some(TlsFailure::Local(t.reason.clone()))
        }
        _ => None,
    }
}

/// Run the link forever: connect, stream records, reconnect with backoff.
pub async fn run(
    mirror: Arc<Mirror>,
    settings: LinkSettings,
    shared: Arc<LinkShared>,
    mut control_rx: mpsc::UnboundedReceiver<Control>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = session(&mirror, &settings, &shared, &mut control_rx).await;
        let result = match result {
            Err(e) => match tls_failure(&e) {
                Some(TlsFailure::Local(reason)) => Err(LinkError::Refused(format!(
                    "this source refused the certificate of the destination {}: {reason}. It must \
                     carry the name this source reaches it by, {:?} (--dest, or --dest-name): \
                     add it on the destination with `fs-dest certs renew --name dest --san {}` \
                     and restart `fs-dest serve`, or give --dest-name a name the certificate \
                     carries; {}/ca.pem must be the CA that signed it",
                    settings.dest,
                    settings.server_name,
                    settings.server_name,
                    settings.tls_dir.display()
                ))),
                Some(TlsFailure::Remote(44)) => Err(LinkError::Refused(format!(
                    "the destination {} refused this source's certificate {}/{}.pem: it has been \
                     revoked (have the destination's operator issue a new one with `fs-dest certs \
                     issue --name {}`)",
                    settings.dest,
                    settings.tls_dir.display(),
                    settings.name,
                    settings.name
                ))),
                Some(TlsFailure::Remote(45)) => Err(LinkError::Refused(format!(
                    "the destination {} refused this source's certificate {}/{}.pem: it has \
                     expired, or is not valid yet (check this machine's clock; renew it with \
                     `fs-dest certs renew --name {}`)",
                    settings.dest,
                    settings.tls_dir.display(),
                    settings.name,
                    settings.name
                ))),
                Some(TlsFailure::Remote(alert)) => Err(LinkError::Refused(format!(
                    "the destination {} rejected the TLS handshake (alert {alert}{}): check that {}/{}.pem is \
                     signed by the destination's CA and that {}/ca.pem is the destination's CA",
                    settings.dest,
                    match alert {
                        42 => ", bad certificate",
                        46 => ", certificate unknown",
                        48 => ", unknown CA",
                        116 => ", certificate required",
                        _ => "",
                    },
                    settings.tls_dir.display(),
                    settings.name,
                    settings.tls_dir.display()
                ))),
                None => Err(e),
            },
            ok => ok,
        };
        match result {
            Ok(()) => {}
            Err(LinkError::Refused(why)) => {
                tracing::error!(dest = %settings.dest, "{why}");
                mirror.stop(why);
                backoff = Duration::from_secs(5);
            }
            Err(e) => {
                tracing::warn!(dest = %settings.dest, "link to destination lost: {e}");
            }
        }
        mirror.set_link(false);
        mirror.check_link_timeout();
        tokio::time::sleep(backoff).await;
        mirror.check_link_timeout();
        // At most a second between attempts: a link that comes back is used within a second.
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// How often operations waiting for an acknowledgement are checked against the policy's
/// timeout (their replies leave at most this late after it).
const SETTLE_TICK: Duration = Duration::from_millis(200);

/// Apply the policy to operations whose acknowledgement is overdue (see
/// [`Mirror::when_durable`]): acknowledgements settle them as they come, this settles the rest.
pub async fn settle_overdue(mirror: Arc<Mirror>) {
    let mut tick = tokio::time::interval(SETTLE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        mirror.settle_waiters();
    }
}

/// Read one message (also used by the asynchronous leg).
pub(crate) async fn read_message(recv: &mut RecvStream) -> Result<Message, LinkError> {
    let mut h = [0u8; wire::HEADER_LEN];
    recv.read_exact(&mut h).await?;
    let (kind, len) = wire::parse_header(&h)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(wire::decode_body(kind, body)?)
}

/// Largest `Frames` message this source sends (the protocol accepts up to
/// [`wire::MAX_MESSAGE_LEN`]): the destination holds a message whole while it checks and logs
/// it, so under a bulk write smaller messages keep its memory per connection small.
pub(crate) const BATCH_LEN: usize = 4 << 20;

/// Send `frames` as `Frames` messages of at most [`BATCH_LEN`] bytes (one larger frame goes
/// alone; shared with the asynchronous leg).
pub(crate) async fn send_frames(
    send: &mut SendStream,
    frames: &mut Vec<Bytes>,
) -> Result<(), LinkError> {
    while !frames.is_empty() {
        // Keep each message under the protocol limit.
        let mut total = 0;
        let mut n = 0;
        while n < frames.len() && (n == 0 || total + frames[n].len() <= BATCH_LEN) {
            total += frames[n].len();
            n += 1;
        }
        let mut chunks: Vec<Bytes> = Vec::with_capacity(n + 1);
        chunks.push(Bytes::copy_from_slice(&wire::header(
            wire::KIND_FRAMES,
            total,
        )));
        chunks.extend(frames.drain(..n));
        send.write_all_chunks(&mut chunks).await?;
    }
    Ok(())
}

/// The destination holds records after the last one this source logged: a power cut took
/// them from the NVRAM before its flush (no client got a reply for them). Fetch them back, log
/// and apply them again, so both sides hold the same history.
async fn recover_lost_records(
    mirror: &Arc<Mirror>,
    settings: &LinkSettings,
    send: &mut SendStream,
    recv: &mut RecvStream,
    logged: u64,
    durable: u64,
) -> Result<(), LinkError> {
    let refused = |why: String| {
        LinkError::Refused(format!(
            "the destination holds records up to {durable} but this source logged only up to {logged}, \
             and they cannot be recovered: {why}"
        ))
    };
    tracing::warn!(
        logged,
        durable,
        "the destination holds records this source lost from its NVRAM; fetching them back"
    );
    let tree = settings.tree.clone();
    let mut after = logged;
    while after < durable {
        send.write_all(&wire::encode_control(&Control::FetchRecords { after }))
            .await?;
        let (frames, more) = match read_message(recv).await? {
            Message::Control(Control::FetchedRecords {
                frames,
                more,
                error,
            }) => match error {
                Some(e) => return Err(refused(e)),
                None => (frames.into_vec(), more),
            },
            other => return Err(LinkError::Unexpected(format!("{other:?}"))),
        };
        let (m, t) = (mirror.clone(), tree.clone());
        let last = tokio::task::spawn_blocking(move || m.adopt(&frames, &t))
            .await
            .map_err(|e| refused(e.to_string()))?
            .map_err(refused)?;
        if last <= after || (!more && last < durable) {
            return Err(refused(format!(
                "the destination sent records only up to {last}"
            )));
        }
        after = last;
    }
    tracing::warn!(
        records = durable - logged,
        "recovered {} record(s) from the destination; mirroring resumes",
        durable - logged
    );
    Ok(())
}

async fn session(
    mirror: &Arc<Mirror>,
    settings: &LinkSettings,
    shared: &Arc<LinkShared>,
    control_rx: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<(), LinkError> {
    let (endpoint, _cfg) =
        crate::tls::client_endpoint(&settings.tls_dir, &settings.name, settings.dest)?;
    let conn = endpoint
        .connect(settings.dest, &settings.server_name)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let logged = mirror.progress(|p| p.logged);
    send.write_all(&wire::encode_control(&Control::Hello {
        protocol: wire::PROTOCOL_VERSION,
        source: settings.name.clone(),
        generation: mirror.generation(),
        last_logged_seq: logged,
        volume: settings.volume.clone(),
        take_over: settings.take_over,
    }))
    .await?;
    let durable = match read_message(&mut recv).await? {
        Message::Control(Control::Welcome {
            durable_seq,
            applied_seq,
            baseline_needed,
            out_of_sync,
            out_of_sync_total,
            ..
        }) => {
            mirror.note_applied(applied_seq);
            mirror.note_out_of_sync(out_of_sync, out_of_sync_total);
            mirror.update_baseline(|b| {
                if baseline_needed && !b.incomplete() {
                    b.state = "pending";
                    b.confirmed = false;
                } else if !baseline_needed {
                    if b.state != "done" {
                        b.state = if b.incomplete() { "done" } else { "none" };
                    }
                    b.confirmed = true;
                }
            });
            durable_seq
        }
        Message::Control(Control::Refused { reason }) => return Err(LinkError::Refused(reason)),
        other => return Err(LinkError::Unexpected(format!("{other:?}"))),
    };
    if durable > logged {
        recover_lost_records(mirror, settings, &mut send, &mut recv, logged, durable).await?;
    }
    tracing::info!(dest = %settings.dest, durable, logged, "connected to destination");
    mirror.on_ack(durable, 0, 0);
    let backlog = mirror.frames_after(durable);
    mirror.set_link(true);
    shared.epoch.send_modify(|e| *e += 1);

    // Sent but not yet acknowledged: (seq, bytes), to count what was mirrored.
    let inflight: Arc<Mutex<VecDeque<(u64, usize)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let receiver = {
        let mirror = mirror.clone();
        let shared = shared.clone();
        let inflight = inflight.clone();
        async move {
            loop {
                match read_message(&mut recv).await? {
                    Message::Control(Control::Ack { durable_seq }) => {
                        let (mut records, mut bytes) = (0, 0);
                        {
                            let mut q = inflight.lock().unwrap_or_else(|p| p.into_inner());
                            while q.front().is_some_and(|(s, _)| *s <= durable_seq) {
                                if let Some((_, b)) = q.pop_front() {
                                    records += 1;
                                    bytes += b as u64;
                                }
                            }
                        }
                        mirror.on_ack(durable_seq, records, bytes);
                        mirror.trim_backlog();
                    }
                    Message::Control(Control::CpDone {
                        id,
                        applied_seq,
                        failed,
                        out_of_sync,
                        out_of_sync_total,
                    }) => {
                        mirror.note_out_of_sync(out_of_sync, out_of_sync_total);
                        if let Some(tx) = shared
                            .pending_cps
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id)
                        {
                            let _ = tx.send(CpAnswer {
                                applied_seq,
                                failed,
                            });
                        }
                    }
                    Message::Control(Control::BaselineRecorded { last_seq }) => {
                        mirror.update_baseline(|b| {
                            if b.state == "done" && b.last_seq == last_seq {
                                b.confirmed = true;
                            }
                        });
                    }
                    Message::Control(Control::VerifyListing {
                        id,
                        dir,
                        entries,
                        more,
                        error,
                    }) => {
                        if let Some(tx) = shared
                            .pending_listings
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id)
                        {
                            let _ = tx.send(Listing {
                                dir,
                                entries,
                                more,
                                error,
                            });
                        }
                    }
                    Message::Control(Control::Error { seq, reason }) => {
                        return Err::<(), _>(LinkError::Remote(match seq {
                            Some(s) => format!("record {s}: {reason}"),
                            None => reason,
                        }));
                    }
                    Message::Control(Control::Refused { reason }) => {
                        return Err(LinkError::Refused(reason))
                    }
                    other => return Err(LinkError::Unexpected(format!("{other:?}"))),
                }
            }
        }
    };
    tokio::pin!(receiver);

    let note = |frames: &[(u64, Bytes)]| {
        let mut q = inflight.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(frames.iter().map(|(s, b)| (*s, b.len())));
    };
    note(&backlog);
    let mut batch: Vec<Bytes> = backlog.into_iter().map(|(_, b)| b).collect();
    tokio::select! {
        r = send_frames(&mut send, &mut batch) => r?,
        r = &mut receiver => return r,
    }
    loop {
        tokio::select! {
            _ = mirror.outbox_ready.notified() => {
                let frames: Vec<(u64, Bytes)> = mirror.outbox.lock().unwrap_or_else(|p| p.into_inner()).frames.drain(..).collect();
                if frames.is_empty() {
                    continue;
                }
                note(&frames);
                let mut batch: Vec<Bytes> = frames.into_iter().map(|(_, b)| b).collect();
                tokio::select! {
                    r = send_frames(&mut send, &mut batch) => r?,
                    r = &mut receiver => return r,
                }
            }
            Some(c) = control_rx.recv() => {
                send.write_all(&wire::encode_control(&c)).await?;
            }
            r = &mut receiver => return r,
        }
    }
}
