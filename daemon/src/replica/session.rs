//! Standby side of replication.
//!
//! The standby listens for its primary (QUIC, mutual TLS: only a certificate of this
//! cluster naming the configured primary gets in; the Hello must carry this cluster's
//! id and an epoch not older than ours). For each write-set it receives:
//! 1. the sans-IO `session::Receiver` checks order (duplicates are re-acked, gaps and
//!    stale epochs end the session);
//! 2. every record is appended to the standby's own journal **under the primary's
//!    sequence number** (the standby journal mirrors the primary's), so the standby's
//!    durable position is its resume position after any crash;
//! 3. once durable, the record goes (in order) to the applier thread, which writes the
//!    replica volume; the ack frame carries both positions (received-durable, applied).
//!
//! A crash loses nothing acknowledged: restart replays the journal after the
//! checkpoint onto the replica (the same code as the primary's recovery), then the
//! primary resumes shipping after our durable position.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferry_transport::quic::{self, FramedRecv, QuicError, TlsMaterial, TransportOptions};
use ferry_transport::session::{LocalIdentity, Received, Receiver};
use ferry_transport::wire::{Frame, Heartbeat};
use tokio::sync::watch;

use crate::replica::standby::Standby;
use ferry_journal::now_ns;

/// Accepts primary connections until shutdown, one session at a time.
pub async fn serve(
    standby: Arc<Standby>,
    local: LocalIdentity,
    tls: TlsMaterial,
    opts: TransportOptions,
    listen: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let server = quic::server_config(&tls, &standby.state.primary, &opts)?;
    let endpoint = quic::listen(listen, server)
        .with_context(|| format!("listening for the primary on {listen}"))?;
    tracing::info!(%listen, primary = %standby.state.primary, "standby waiting for its primary");
    // One session at a time. A new connection from the primary replaces the current
    // session at once: after a primary crash the old connection would otherwise linger
    // until QUIC's idle timeout while the restarted primary waits.
    let mut current: Option<(
        std::net::SocketAddr,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )> = None;
    let mut pause_rx = standby.state.pause_tx.subscribe();
    loop {
        tokio::select! {
            // Mapped to (): a held `watch::Ref` would make this future !Send.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            _ = pause_rx.changed() => {
                if let Some(why) = standby.paused() {
                    if let Some((peer, h)) = current.take() {
                        h.abort();
                        let _ = h.await;
                        *standby.state.connected.lock() = None;
                        tracing::info!(%peer, "replication session ended: {why}");
                    }
                }
            }
            accepted = quic::accept(&endpoint) => {
                let conn = match accepted {
                    None => break,
                    Some(Err(e)) => {
                        // Wrong cluster, wrong node name, no certificate: refused by TLS.
                        tracing::warn!("refused a replication connection: {e}");
                        *standby.state.last_error.lock() = Some(e.to_string());
                        continue;
                    }
                    Some(Ok(c)) => c,
                };
                if let Some(why) = standby.paused() {
                    tracing::info!(peer = %conn.remote_address(), "refused the primary: {why}");
                    conn.close(quinn::VarInt::from_u32(1), why.as_bytes());
                    continue;
                }
                if let Some((old_peer, old)) = current.take() {
                    tracing::info!(%old_peer, new_peer = %conn.remote_address(),
                        "the primary connected again: replacing the previous session");
                    old.abort();
                    let _ = old.await;
                }
                let (sb, local, opts) = (standby.clone(), local.clone(), opts.clone());
                let peer = conn.remote_address();
                current = Some((peer, tokio::spawn(async move { session(&sb, &local, &opts, conn).await })));
            }
            done = async { match current.as_mut() { Some((_, h)) => h.await, None => std::future::pending().await } } => {
                let peer = current.take().map(|(p, _)| p);
                *standby.state.connected.lock() = None;
                let err = match done {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(crate::error_chain(&e)),
                    Err(e) => Some(format!("session task: {e}")),
                };
                if let Some(msg) = err {
                    tracing::warn!(?peer, "replication session with the primary ended: {msg}");
                    *standby.state.last_error.lock() = Some(msg);
                }
            }
        }
    }
    if let Some((_, h)) = current.take() {
        h.abort();
        let _ = h.await;
    }
    *standby.state.connected.lock() = None;
    endpoint.close(0u32.into(), b"standby shutting down");
    Ok(())
}

async fn session(
    sb: &Standby,
    local: &LocalIdentity,
    opts: &TransportOptions,
    conn: quinn::Connection,
) -> anyhow::Result<()> {
    let peer = conn.remote_address();
    // A previous session's records may still be queued in the journal: wait until
    // they are durable, so the resume position covers them (else the primary would
    // resend them and the sequence check would end this session).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sb.journal.durable_seq() < sb.journal.last_seq() {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the standby journal did not make sequences {}..={} durable within 10 s",
                sb.journal.durable_seq() + 1,
                sb.journal.last_seq()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let durable = sb.resume_position();
    let mut s = quic::standby_handshake(conn, local, durable, opts).await?;
    tracing::info!(%peer, primary = %s.peer_hello.node_name, resume = durable, "primary connected");
    *sb.state.connected.lock() = Some(peer.to_string());
    *sb.state.last_error.lock() = None;
    let mut rx = Receiver::new(local.epoch, durable, sb.applied_seq().min(durable));
    // A bitmap resync copy in progress in this session (see resync.rs).
    let mut copy: Option<crate::replica::resync::Copy> = None;
    // QUIC announces the primary's data stream only with its first bytes, so accept it
    // inside the loop: heartbeats and acks must flow while no write has happened yet.
    let conn = s.conn.clone();
    let mut data: Option<FramedRecv> = None;
    let mut durable_rx = sb.durable_tx.subscribe();
    let mut applied_rx = sb.applied_rx.clone();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    // One session at a time: a replaced session's task is aborted first, releasing it.
    let mut outbox = sb.outbox.rx.lock().await;
    loop {
        tokio::select! {
            Some(o) = outbox.recv() => {
                let (ok, body) = match o.result {
                    Ok(b) => (true, bytes::Bytes::from(b)),
                    Err(e) => (false, bytes::Bytes::from(e.into_bytes())),
                };
                s.control_send.send_frame(&Frame::VerifyResult(ferry_transport::wire::VerifyResult {
                    epoch: local.epoch,
                    id: o.id,
                    volume: o.volume,
                    ok,
                    body,
                })).await?;
            }
            d = conn.accept_uni(), if data.is_none() => {
                data = Some(FramedRecv::new(d?, opts.max_frame_len));
            }
            f = next_frame(&mut data), if data.is_some() => match f? {
                Some(Frame::WriteSet(_)) if copy.is_some() || sb.applier.resync.copy_incomplete() => {
                    bail!(
                        "write-set refused: this standby is in the middle of a resync copy and \
                         needs the primary to resync it (ResyncBegin) before streaming"
                    )
                }
                Some(Frame::ResyncBegin(b)) => {
                    sb.state.last_heard_ns.store(now_ns(), Ordering::Relaxed);
                    rx.check_epoch(b.epoch).map_err(|e| anyhow!("resync refused: {e}"))?;
                    if copy.is_some() || rx.received_seq() != durable {
                        bail!("ResyncBegin in the middle of a session");
                    }
                    copy = Some(tokio::task::block_in_place(|| crate::replica::resync::begin(sb, &b, durable))?);
                }
                Some(Frame::ResyncData(d)) => {
                    sb.state.last_heard_ns.store(now_ns(), Ordering::Relaxed);
                    rx.check_epoch(d.epoch).map_err(|e| anyhow!("resync refused: {e}"))?;
                    let c = copy.as_mut().ok_or_else(|| anyhow!("ResyncData without ResyncBegin"))?;
                    tokio::task::block_in_place(|| crate::replica::resync::data(sb, c, d))?;
                }
                Some(Frame::ResyncEnd(e)) => {
                    sb.state.last_heard_ns.store(now_ns(), Ordering::Relaxed);
                    rx.check_epoch(e.epoch).map_err(|e| anyhow!("resync refused: {e}"))?;
                    let c = copy.take().ok_or_else(|| anyhow!("ResyncEnd without ResyncBegin"))?;
                    tokio::task::block_in_place(|| crate::replica::resync::end(sb, &c, &e))?;
                    let ack = rx.resynced(c.snapshot).map_err(|e| anyhow!("{e}"))?;
                    s.control_send.send_frame(&Frame::Ack(ack)).await?;
                }
                Some(Frame::WriteSet(ws)) => {
                    sb.state.last_heard_ns.store(now_ns(), Ordering::Relaxed);
                    sb.state.last_primary_seq.fetch_max(ws.last_seq, Ordering::Relaxed);
                    match rx.on_write_set(ws).map_err(|e| anyhow!("write-set refused: {e}"))? {
                        Received::Accept(ws) => sb.journal_write_set(ws)?,
                        Received::Duplicate(ack) => s.control_send.send_frame(&Frame::Ack(ack)).await?,
                    }
                }
                Some(other) => bail!("unexpected {:?} frame on the data stream", other.frame_type()),
                None => bail!("primary closed the data stream"),
            },
            f = s.control_recv.recv_frame() => match f? {
                Some(Frame::Heartbeat(hb)) => {
                    sb.state.last_heard_ns.store(now_ns(), Ordering::Relaxed);
                    sb.state.last_primary_seq.fetch_max(hb.last_seq, Ordering::Relaxed);
                    s.control_send.send_frame(&Frame::Heartbeat(Heartbeat {
                        epoch: local.epoch,
                        sent_at_ns: now_ns(),
                        echo_ns: hb.sent_at_ns,
                        last_seq: sb.journal.durable_seq(),
                    })).await?;
                }
                Some(Frame::DigestRequest(d)) => {
                    // A resync asks what the replica holds before copying: hash it as
                    // it is (nothing is written to it before the copy's first data).
                    let params = crate::verify::chunks::HashParams {
                        algo: u8::try_from(d.algo)
                            .ok()
                            .and_then(crate::verify::chunks::ChunkHash::from_id)
                            .ok_or_else(|| anyhow!("digest request with unknown algorithm {}", d.algo))?,
                        chunk_size: d.chunk_size,
                        seed: d.seed,
                    };
                    let bases = sb.applier.bases.clone();
                    let lists = tokio::task::spawn_blocking(move || {
                        bases
                            .iter()
                            .map(|b| (b.id, crate::verify::chunks::hash_range(&b.file, 0, b.size, params)))
                            .collect::<Vec<_>>()
                    })
                    .await?;
                    for (volume, list) in lists {
                        let (ok, body) = match list {
                            Ok(l) => (true, bytes::Bytes::from(l.encode())),
                            Err(e) => (false, bytes::Bytes::from(e.to_string().into_bytes())),
                        };
                        s.control_send.send_frame(&Frame::VerifyResult(ferry_transport::wire::VerifyResult {
                            epoch: local.epoch,
                            id: d.id,
                            volume,
                            ok,
                            body,
                        })).await?;
                    }
                }
                Some(Frame::Handover(h)) => {
                    // The primary stopped writing and saw every record up to h.seq acked
                    // durable here; anything else means the histories do not match.
                    let durable = sb.journal.durable_seq();
                    if durable != h.seq || sb.journal.last_seq() != h.seq {
                        bail!("handover at {} refused: this standby holds {durable}", h.seq);
                    }
                    let take_over = sb.handover.lock().clone()
                        .ok_or_else(|| anyhow!("handover refused: this standby cannot take over"))?;
                    tracing::warn!(seq = h.seq, "the primary hands over: taking over");
                    let (new_epoch, restart) = tokio::task::spawn_blocking(move || take_over(h.seq)).await??;
                    s.control_send.send_frame(&Frame::HandoverAck(ferry_transport::wire::HandoverAck {
                        epoch: local.epoch,
                        seq: h.seq,
                        new_epoch,
                    })).await?;
                    // Let the ack reach the old primary before the restart closes us.
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.control_recv.recv_frame()).await;
                    restart();
                    return Ok(());
                }
                Some(Frame::Error(e)) => bail!("primary sent an error: {:?}: {}", e.code, e.reason),
                Some(other) => bail!("unexpected {:?} frame on the control stream", other.frame_type()),
                None => bail!("primary closed the control stream"),
            },
            r = durable_rx.changed() => {
                r.map_err(|_| anyhow!("journal completion channel closed"))?;
                let d = *durable_rx.borrow_and_update();
                if d > rx.durable_seq() && d <= rx.received_seq() {
                    let ack = rx.mark_durable(d).map_err(|e| anyhow!("{e}"))?;
                    s.control_send.send_frame(&Frame::Ack(ack)).await?;
                }
            }
            r = applied_rx.changed() => {
                r.map_err(|_| anyhow!("replica applier stopped"))?;
                let a = *applied_rx.borrow_and_update();
                if a > rx.applied_seq() && a <= rx.durable_seq() {
                    let ack = rx.mark_applied(a).map_err(|e| anyhow!("{e}"))?;
                    s.control_send.send_frame(&Frame::Ack(ack)).await?;
                }
            }
            _ = heartbeat.tick() => {
                s.control_send.send_frame(&Frame::Heartbeat(Heartbeat {
                    epoch: local.epoch,
                    sent_at_ns: now_ns(),
                    // Not a reply: echoing the last primary timestamp here would make the
                    // primary measure its age (up to a heartbeat interval) as the RTT.
                    echo_ns: 0,
                    last_seq: sb.journal.durable_seq(),
                })).await?;
            }
        }
    }
}

/// The next frame on the data stream once it has been accepted.
async fn next_frame(data: &mut Option<FramedRecv>) -> Result<Option<Frame>, QuicError> {
    match data {
        Some(d) => d.recv_frame().await,
        None => std::future::pending().await,
    }
}
