//! One source connection: handshake, record intake and acknowledgements.
//!
//! The source opens one long-lived bidirectional stream. It sends `Hello`; we check the
//! protocol version, that the name matches its certificate, and its generation against the
//! slot's (fencing), then answer `Welcome` with the highest durable sequence number. After
//! that a reader loop checks and appends frame batches and forwards CP requests to the
//! source's CP worker, and a writer task sends cumulative `Ack`s once the group-commit flush
//! covers them, plus `CpDone` and `Error`. A second connection of the same source replaces
//! the first.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::wire::{self, Control, Message, PROTOCOL_VERSION};
use quinn::{ReadExactError, RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::close_code;
use crate::engine::{check_batch, lock, CpJob, Engine, Out, Source};

/// How long a new connection may take to open its stream and say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a last message (Refused, Error) may take to reach the peer before closing.
const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("no stream or Hello within {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading: {0}")]
    Read(#[from] ReadExactError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Wire(#[from] wire::WireError),
}

/// Serve one incoming connection until it ends.
pub async fn handle(engine: Arc<Engine>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let Ok(permit) = engine.pre_auth.clone().try_acquire_owned() else {
        let n = engine.pre_auth_refused.fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(%remote, refused = n + 1,
                "too many connections still in their handshake; refusing new ones");
        }
        incoming.refuse();
        return;
    };
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            let text = e.to_string();
            let why = if text.contains("Revoked") || text.contains("revoked") {
                "a revoked client certificate (fs-dest certs revoke)"
            } else if text.contains("xpired") {
                "an expired client certificate (renew it: fs-dest certs renew)"
            } else if text.contains("NotValidYet") || text.contains("not valid yet") {
                "a client certificate not valid yet (check the clocks)"
            } else {
                "the TLS handshake failed"
            };
            tracing::warn!(%remote, error = %e, "connection refused: {why}");
            return;
        }
    };
    let name = match crate::tls::peer_name(&conn) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "connection without a usable identity");
            conn.close(close_code::ERROR.into(), b"no usable client identity");
            return;
        }
    };
    tracing::debug!(%remote, source = %name, "connection");
    if let Err(e) = serve(&engine, &conn, &name, permit).await {
        tracing::info!(%remote, source = %name, error = %e, "connection ended");
    }
}

/// Largest message buffer a session keeps for the next message (the source sends `Frames`
/// of at most 4 MiB; a rare bigger one is not kept).
const SPARE_BUFFER_MAX: usize = 8 << 20;

async fn read_message(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<Option<Message>, SessionError> {
    read_message_into(recv, limit, &mut Vec::new()).await
}

/// [`read_message`] into `spare`'s allocation: a reused buffer is not faulted in and zeroed
/// page by page again for every message of a bulk write.
async fn read_message_into(
    recv: &mut RecvStream,
    limit: usize,
    spare: &mut Vec<u8>,
) -> Result<Option<Message>, SessionError> {
    let mut h = [0u8; wire::HEADER_LEN];
    match recv.read_exact(&mut h).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = wire::parse_header(&h)?;
    if len > limit {
        return Err(wire::WireError::OverLimit { len, limit }.into());
    }
    let mut body = std::mem::take(spare);
    // `read_exact` overwrites every byte of `..len`: only growth needs zeroing.
    if body.len() < len {
        body.resize(len, 0);
    } else {
        body.truncate(len);
    }
    recv.read_exact(&mut body).await?;
    Ok(Some(wire::decode_body(kind, body)?))
}

/// Send a last control message, finish the stream, wait briefly for delivery, close.
async fn last_word(conn: &quinn::Connection, send: &mut SendStream, c: &Control, code: u32) {
    let _ = send.write_all(&wire::encode_control(c)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, send.stopped()).await;
    let reason = match c {
        Control::Refused { .. } => &b"refused"[..],
        _ => &b"error"[..],
    };
    conn.close(code.into(), reason);
}

async fn serve(
    engine: &Arc<Engine>,
    conn: &quinn::Connection,
    name: &str,
    pre_auth: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| SessionError::Timeout(HELLO_TIMEOUT))??;
    let refuse = |reason: String| Control::Refused { reason };
    let first =
        match tokio::time::timeout(HELLO_TIMEOUT, read_message(&mut recv, wire::MAX_HELLO_LEN))
            .await
            .map_err(|_| SessionError::Timeout(HELLO_TIMEOUT))?
        {
            Ok(m) => m,
            Err(SessionError::Wire(e)) => {
                let reason = format!("bad first message: {e}");
                tracing::warn!(source = %name, reason = %reason, "refused a connection");
                last_word(conn, &mut send, &refuse(reason), close_code::ERROR).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
    let Some(Message::Control(Control::Hello {
        protocol,
        source: claimed,
        generation,
        last_logged_seq,
        volume,
        take_over,
    })) = first
    else {
        let r = refuse("the first message must be Hello".into());
        last_word(conn, &mut send, &r, close_code::ERROR).await;
        return Ok(());
    };
    let refusal = if protocol != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {protocol} is not supported (this destination speaks {PROTOCOL_VERSION})"
        ))
    } else if claimed != name {
        Some(format!(
            "Hello names source {claimed:?} but the client certificate is for {name:?}"
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        tracing::warn!(source = %name, reason = %reason, "refused a source");
        last_word(conn, &mut send, &refuse(reason), close_code::ERROR).await;
        return Ok(());
    }
    let source = match engine.source(name) {
        Ok(s) => s,
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(source = %name, reason = %reason, "refused a source");
            last_word(conn, &mut send, &refuse(reason), close_code::ERROR).await;
            return Ok(());
        }
    };
    // Fencing: a promoted image belongs to whoever serves it now; an older generation is a
    // source that missed a promotion.
    let stored = source.generation.load(Ordering::Acquire);
    let fenced = match crate::promote::read_marker(&engine.root, name) {
        Ok(Some(m)) => Some(crate::promote::fenced_message(&engine.root, &m, generation)),
        Ok(None) if generation < stored => {
            Some(crate::promote::stale_message(name, stored, generation))
        }
        Ok(None) => None,
        Err(e) => Some(format!(
            "this destination cannot tell whether source {name} is fenced ({e}); refusing it"
        )),
    };
    if let Some(reason) = fenced {
        tracing::warn!(source = %name, generation, stored, reason = %reason, "refused a fenced source");
        last_word(conn, &mut send, &refuse(reason), close_code::FENCED).await;
        return Ok(());
    }
    if generation > stored {
        if let Err(e) = engine.slots.set_generation(source.slot, generation) {
            let reason = format!("cannot record generation {generation}: {e}");
            last_word(conn, &mut send, &refuse(reason), close_code::ERROR).await;
            return Ok(());
        }
        source.generation.store(generation, Ordering::Release);
    }

    // The volume: an image that holds data mirrors only the volume it was built from.
    let baseline_needed = match check_volume(&source, name, &volume, take_over) {
        Ok(needed) => needed,
        Err(reason) => {
            tracing::warn!(source = %name, volume = %volume, reason = %reason, "refused a source");
            last_word(conn, &mut send, &refuse(reason), close_code::ERROR).await;
            return Ok(());
        }
    };

    // Take the source over from an older connection.
    let conn_id = engine.next_conn_id();
    if let Some((_, old)) = lock(&source.connection).replace((conn_id, conn.clone())) {
        tracing::info!(source = %name, "a newer connection replaces the current one");
        old.close(
            close_code::REPLACED.into(),
            b"replaced by a newer connection from the same source",
        );
    }
    let next_seq = {
        let mut ingest = source.ingest.lock().await;
        // A promotion that raced this handshake fenced the source after the check above.
        if matches!(
            crate::promote::read_marker(&engine.root, name),
            Ok(Some(_)) | Err(_)
        ) {
            drop(ingest);
            let reason =
                format!("source {name} was promoted while connecting; this source is fenced");
            last_word(conn, &mut send, &refuse(reason), close_code::FENCED).await;
            return Ok(());
        }
        ingest.conn_id = conn_id;
        ingest.next_seq
    };
    // Past its Hello: no longer counted among the connections still to prove themselves, and
    // given the full receive window.
    drop(pre_auth);
    conn.set_receive_window(quinn::VarInt::from_u32(crate::tls::RECEIVE_WINDOW));
    engine.wait_flushed().await;
    let (out_of_sync, out_of_sync_total) = {
        let d = lock(&source.divergences);
        (d.listed(), d.len() as u64)
    };
    let welcome = Control::Welcome {
        durable_seq: next_seq - 1,
        applied_seq: source.applied_seq.load(Ordering::Acquire),
        generation: source.generation.load(Ordering::Acquire),
        baseline_needed,
        out_of_sync,
        out_of_sync_total,
    };
    if last_logged_seq < next_seq - 1 {
        tracing::warn!(source = %name, last_logged_seq, durable_seq = next_seq - 1,
            "the source has logged fewer records than this destination holds for it");
    }
    tracing::info!(source = %name, durable_seq = next_seq - 1, last_logged_seq, baseline_needed,
        out_of_sync = out_of_sync_total, "source connected");
    let result = match send.write_all(&wire::encode_control(&welcome)).await {
        Ok(()) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = tokio::spawn(writer(engine.clone(), conn.clone(), send, rx));
            let r = reader(engine, &source, conn_id, &mut recv, &tx).await;
            drop(tx);
            let _ = writer.await;
            r
        }
        Err(e) => Err(e.into()),
    };
    {
        let mut c = lock(&source.connection);
        if c.as_ref().is_some_and(|(id, _)| *id == conn_id) {
            *c = None;
        }
    }
    result
}

async fn reader(
    engine: &Arc<Engine>,
    source: &Arc<Source>,
    conn_id: u64,
    recv: &mut RecvStream,
    tx: &mpsc::UnboundedSender<Out>,
) -> Result<(), SessionError> {
    let capacity = engine.geometry.capacity();
    let mut spare = Vec::new();
    loop {
        let msg = match read_message_into(recv, wire::MAX_MESSAGE_LEN, &mut spare).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(SessionError::Wire(e)) => {
                tracing::warn!(source = %source.name, error = %e, "bad message; closing the connection");
                let _ = tx.send(Out::Fatal(Control::Error {
                    seq: None,
                    reason: format!("bad message: {e}"),
                }));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match msg {
            Message::Frames(body) => {
                let mut ingest = source.ingest.lock().await;
                if ingest.conn_id != conn_id {
                    return Ok(()); // replaced by a newer connection
                }
                let (ok, rejection) = check_batch(&body, ingest.next_seq, capacity);
                let mut failure = rejection.map(|r| (r.seq, r.reason));
                if !ok.is_empty() {
                    let outcome = engine.append_batch(source.slot, &ok).await;
                    if outcome.appended > 0 {
                        let done = &ok[..outcome.appended];
                        let last = done[done.len() - 1].seq;
                        ingest.next_seq = last + 1;
                        source.accepted_seq.store(last, Ordering::Release);
                        source
                            .stats
                            .records_received
                            .fetch_add(done.len() as u64, Ordering::Relaxed);
                        let bytes: usize = done.iter().map(|c| c.bytes.len()).sum();
                        source
                            .stats
                            .bytes_received
                            .fetch_add(bytes as u64, Ordering::Relaxed);
                        lock(&source.stats.recent).add(
                            crate::engine::now_secs(),
                            done.len() as u64,
                            bytes as u64,
                        );
                        *lock(&source.stats.last_record_at) = Some(std::time::Instant::now());
                        let _ = tx.send(Out::Appended {
                            dest_seq: outcome.last_dest_seq,
                            src_seq: last,
                        });
                    }
                    if let Some(e) = outcome.error {
                        let seq = ok[outcome.appended].seq;
                        failure = Some((seq, e.to_string()));
                    }
                }
                drop(ingest);
                drop(ok);
                if body.capacity() <= SPARE_BUFFER_MAX {
                    spare = body;
                }
                // Flush here rather than waking the flusher thread: one msync covers every
                // session's frames appended so far (group commit), and the acknowledgement
                // does not wait for a thread hop.
                engine.flush_once();
                if let Some((seq, reason)) = failure {
                    tracing::warn!(source = %source.name, seq, reason = %reason,
                        "refused a record; closing the connection (nothing of it was logged)");
                    let _ = tx.send(Out::Fatal(Control::Error {
                        seq: Some(seq),
                        reason,
                    }));
                    return Ok(());
                }
            }
            Message::Control(Control::CpRequest {
                id,
                partition,
                last_seq,
            }) => {
                let job = CpJob {
                    id,
                    partition,
                    last_seq,
                    reply: tx.clone(),
                };
                if let Err(e) = crate::cp::submit(engine, source, job) {
                    let reason = e.to_string();
                    tracing::warn!(source = %source.name, "{reason}");
                    let _ = tx.send(Out::Fatal(Control::Error { seq: None, reason }));
                    return Ok(());
                }
            }
            Message::Control(Control::VerifyRequest {
                id,
                path,
                after,
                single,
            }) => {
                let (source, tx) = (source.clone(), tx.clone());
                tokio::spawn(async move {
                    let after = after.map(|a| a.into_vec());
                    let answer = crate::verify::listing(source, id, path, after, single).await;
                    let _ = tx.send(Out::Control(answer));
                });
            }
            Message::Control(Control::FetchRecords { after }) => {
                let (engine, source, tx) = (engine.clone(), source.clone(), tx.clone());
                tokio::spawn(async move {
                    let answer = crate::fetch::fetch(engine, source, after).await;
                    let _ = tx.send(Out::Control(answer));
                });
            }
            Message::Control(Control::BaselineDone { last_seq }) => {
                let applied = source.applied_seq.load(Ordering::Acquire);
                if last_seq > applied {
                    let reason = format!(
                        "BaselineDone up to record {last_seq}, but the image is applied only up to {applied}"
                    );
                    tracing::warn!(source = %source.name, reason = %reason, "closing the connection");
                    let _ = tx.send(Out::Fatal(Control::Error { seq: None, reason }));
                    return Ok(());
                }
                if let Err(e) = mark_baseline_complete(source) {
                    tracing::error!(source = %source.name, error = %e, "cannot record the completed baseline");
                } else {
                    tracing::info!(source = %source.name, last_seq, "baseline complete: the image mirrors the whole volume");
                    let _ = tx.send(Out::Control(Control::BaselineRecorded { last_seq }));
                }
            }
            Message::Control(other) => {
                let reason = format!("unexpected message from a source: {other:?}");
                tracing::warn!(source = %source.name, reason = %reason, "closing the connection");
                let _ = tx.send(Out::Fatal(Control::Error { seq: None, reason }));
                return Ok(());
            }
        }
    }
}

/// Check the volume a source presents against its image's record (see
/// [`crate::image_state::decide`]); returns whether the source must run a baseline.
fn check_volume(
    source: &Source,
    name: &str,
    volume: &str,
    take_over: bool,
) -> Result<bool, String> {
    use crate::image_state::{self, VolumeDecision};
    let dir = source.image_dir.parent().unwrap_or(&source.image_dir);
    let record = image_state::read_volume(dir).map_err(|e| e.to_string())?;
    let empty = image_state::image_is_empty(&source.image_dir).map_err(|e| e.to_string())?;
    match image_state::decide(
        name,
        &source.image_dir,
        record.as_ref(),
        volume,
        take_over,
        empty,
    ) {
        VolumeDecision::Refuse(why) => Err(why),
        VolumeDecision::Accept {
            baseline_needed,
            write,
        } => {
            if let Some(r) = write {
                if record.is_some() {
                    tracing::warn!(source = %name, old = ?record.as_ref().map(|r| &r.volume), new = %volume,
                        "the image is taken over by another volume (--force-baseline): it will be replaced");
                }
                image_state::write_volume(dir, &r).map_err(|e| e.to_string())?;
            }
            source
                .baseline_needed
                .store(baseline_needed, Ordering::Release);
            Ok(baseline_needed)
        }
    }
}

/// Record that the image holds a complete baseline of the volume it mirrors.
fn mark_baseline_complete(source: &Source) -> Result<(), crate::image_state::StateError> {
    use crate::image_state;
    let dir = source.image_dir.parent().unwrap_or(&source.image_dir);
    if let Some(mut r) = image_state::read_volume(dir)? {
        if !r.baseline_complete {
            r.baseline_complete = true;
            image_state::write_volume(dir, &r)?;
        }
    }
    source.baseline_needed.store(false, Ordering::Release);
    Ok(())
}

async fn writer(
    engine: Arc<Engine>,
    conn: quinn::Connection,
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    let mut flushed = engine.flushed.subscribe();
    let mut pending: VecDeque<(u64, u64)> = VecDeque::new();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                None => break,
                Some(Out::Appended { dest_seq, src_seq }) => pending.push_back((dest_seq, src_seq)),
                Some(Out::Control(c)) => {
                    if send.write_all(&wire::encode_control(&c)).await.is_err() {
                        return;
                    }
                }
                Some(Out::Fatal(c)) => {
                    let f = *flushed.borrow_and_update();
                    send_acks(&mut send, &mut pending, f).await;
                    last_word(&conn, &mut send, &c, close_code::ERROR).await;
                    return;
                }
            },
            r = flushed.changed(), if !pending.is_empty() => {
                if r.is_err() {
                    break;
                }
            }
        }
        let f = *flushed.borrow_and_update();
        if !send_acks(&mut send, &mut pending, f).await {
            return;
        }
    }
    // The reader is done (stream finished): deliver the acks still owed, then finish.
    if let Some(&(last_dest, _)) = pending.back() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            flushed.wait_for(|&f| f >= last_dest),
        )
        .await;
        let f = *flushed.borrow();
        send_acks(&mut send, &mut pending, f).await;
    }
    let _ = send.finish();
}

/// Send one cumulative Ack for every pending append covered by `flushed`.
async fn send_acks(
    send: &mut SendStream,
    pending: &mut VecDeque<(u64, u64)>,
    flushed: u64,
) -> bool {
    let mut ack = None;
    while let Some(&(d, s)) = pending.front() {
        if d > flushed {
            break;
        }
        ack = Some(s);
        pending.pop_front();
    }
    match ack {
        Some(durable_seq) => send
            .write_all(&wire::encode_control(&Control::Ack { durable_seq }))
            .await
            .is_ok(),
        None => true,
    }
}
