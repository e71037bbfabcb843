//! Standby side of replication.
//!
//! The standby listens for its primary (QUIC, mutual TLS: only a certificate of this
//! cluster naming the configured primary gets in; the Hello must carry this cluster's
//! id and an epoch not older than ours). For each write-set it receives:
//! 1. the sans-IO `session::Receiver` checks order and range (duplicates are re-acked;
//!    gaps, stale epochs and records outside the replica's volumes are refused with an
//!    Error frame, the last with a resync request, and end the session: nothing of a
//!    refused write-set is journaled or written);
//! 2. every record is appended to the standby's own journal **under the primary's
//!    sequence number** (the standby journal mirrors the primary's), so the standby's
//!    durable position is its resume position after any crash; a primary that asked
//!    for received acks (V4 HelloAck: it has writeback replies waiting for them) gets
//!    one right here, before the append is durable (DRBD's protocol B: the write is in
//!    this node's memory and its journal's queue, so a primary crash alone loses
//!    nothing acknowledged — this node drains its journal before anything else);
//! 3. once durable, the record goes (in order) to the applier thread, which writes the
//!    replica volume; the ack frame carries both positions (received-durable, applied).
//!    A durable ack goes as soon as the journal says so; the applied position rides on
//!    the next one, or goes alone after [`APPLIED_ACK_DELAY`].
//!
//! A crash loses nothing acknowledged: restart replays the journal after the
//! checkpoint onto the replica (the same code as the primary's recovery), then the
//! primary resumes shipping after our durable position.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferry_journal::{now_ns, Seq};
use ferry_proto::session::{LocalIdentity, Received, Receiver};
use ferry_proto::wire::{
    Ack, DigestRequest, Epoch, ErrorCode, ErrorFrame, Frame, HandoverAck, Heartbeat, ResyncBegin,
    ResyncData, ResyncEnd, SyncLoss, VerifyResult, WriteSet,
};
use ferry_transport::quic::{
    self, FramedRecv, FramedSend, QuicError, StandbySession, TlsMaterial, TransportOptions,
};
use tokio::sync::watch;

use crate::replica::resync::{self, Copy};
use crate::replica::standby::Standby;
use crate::verify::chunks::{hash_range, ChunkHash, HashParams};

/// How long the applier's position may wait for an ack this session sends anyway
/// before it goes in one of its own. Every ack carries all three positions, and a
/// durable ack follows each write-set, so while writes flow the applied position
/// rides on it: one ack packet per write-set fewer on both nodes (each costs a
/// `sendmsg` here and a wake-up and `recvmmsg` on the primary). The primary uses
/// the applied position only for status and views, never for a reply, a flush or
/// the lag (those follow the received and durable positions).
const APPLIED_ACK_DELAY: Duration = Duration::from_millis(2);

/// Who may dial this standby, and what a refused Hello from one of them means.
pub struct Peers {
    /// The TLS names admitted: the primary, and with a `[cluster]` every member.
    pub names: Vec<String>,
    /// Given a Hello the handshake refused, the names of the certificate that sent it
    /// and the refusal: `true` when the node dealt with it (a newer epoch's primary
    /// to follow, a standby's position probe), so the session ends quietly.
    pub refused: Option<RefusedHook>,
}

/// See [`Peers::refused`].
pub type RefusedHook =
    Arc<dyn Fn(&ferry_proto::wire::Hello, &[String], &QuicError) -> bool + Send + Sync>;

/// Accepts primary connections until shutdown, one session at a time.
pub async fn serve(
    standby: Arc<Standby>,
    (local, peers): (LocalIdentity, Arc<Peers>),
    tls: TlsMaterial,
    opts: TransportOptions,
    listen: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let server = quic::server_config_for(&tls, &peers.names, &opts)?;
    let endpoint = quic::listen(listen, server)
        .with_context(|| format!("listening for the primary on {listen}"))?;
    tracing::info!(%listen, primary = %standby.state.primary, "standby waiting for its primary");
    // One session at a time. A new connection from the primary replaces the current
    // session at once: after a primary crash the old connection would otherwise linger
    // until QUIC's idle timeout while the restarted primary waits.
    let mut current: Current = None;
    let mut pause_rx = standby.state.pause_tx.subscribe();
    // Each handshake runs on its own, bounded: a peer that stalls its handshake
    // never holds up the primary.
    let mut acceptor = quic::Acceptor::new(&endpoint, quic::HANDSHAKE_TIMEOUT);
    loop {
        tokio::select! {
            // Mapped to (): a held `watch::Ref` would make this future !Send.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            _ = pause_rx.changed() => {
                if let Some(why) = standby.paused() {
                    if let Some(peer) = stop_session(&standby, &mut current).await {
                        tracing::info!(%peer, "replication session ended: {why}");
                    }
                }
            }
            accepted = acceptor.next() => {
                let Some(accepted) = accepted else { break };
                let Some(conn) = admit(&standby, accepted) else { continue };
                if current.is_some() && source_name(&standby, &quic::peer_node_names(&conn)).is_none() {
                    // Another member (a newer epoch's primary, a position probe): its
                    // handshake can never become this node's session in this epoch, so it
                    // runs beside the current one instead of replacing it. The primary
                    // and the relay (`via`) replace it: one live source at a time.
                    let (sb, local, opts, peers) = (standby.clone(), local.clone(), opts.clone(), peers.clone());
                    tokio::spawn(async move {
                        if let Err(e) = session(&sb, (&local, &peers), &opts, conn).await {
                            tracing::warn!("refused a member that is not this node's primary: {}", crate::error_chain(&e));
                        }
                    });
                    continue;
                }
                if let Some((old_peer, old)) = current.take() {
                    tracing::info!(%old_peer, new_peer = %conn.remote_address(),
                        "the primary connected again: replacing the previous session");
                    old.abort();
                    let _ = old.await;
                }
                let (sb, local, opts, peers) = (standby.clone(), local.clone(), opts.clone(), peers.clone());
                let peer = conn.remote_address();
                current = Some((peer, tokio::spawn(async move { session(&sb, (&local, &peers), &opts, conn).await })));
            }
            done = async { match current.as_mut() { Some((_, h)) => h.await, None => std::future::pending().await } } => {
                let peer = current.take().map(|(p, _)| p);
                session_over(&standby, peer, done);
            }
        }
    }
    stop_session(&standby, &mut current).await;
    *standby.state.connected.lock() = None;
    *standby.state.source.lock() = None;
    endpoint.close(0u32.into(), b"standby shutting down");
    Ok(())
}

/// Which of this node's sources a connection's certificate names: its primary, else
/// the member that relays to it (`via`, cascading); `None` for any other member.
fn source_name<'a>(standby: &'a Standby, cert_names: &[String]) -> Option<&'a str> {
    let st = &standby.state;
    std::iter::once(st.primary.as_str())
        .chain(st.via.as_deref())
        .find(|n| cert_names.iter().any(|c| c == n))
}

/// The running session: its peer and task.
type Current = Option<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)>;

/// Ends the running session, if any, and says whose it was.
async fn stop_session(standby: &Standby, current: &mut Current) -> Option<std::net::SocketAddr> {
    let (peer, h) = current.take()?;
    h.abort();
    let _ = h.await;
    *standby.state.connected.lock() = None;
    *standby.state.source.lock() = None;
    Some(peer)
}

/// The connection if it may start a session: TLS accepted it (wrong cluster, wrong
/// node name, no certificate are refused there) and replication is not paused.
fn admit<E: std::fmt::Display>(
    standby: &Standby,
    accepted: Result<quinn::Connection, E>,
) -> Option<quinn::Connection> {
    let conn = match accepted {
        Err(e) => {
            tracing::warn!("refused a replication connection: {e}");
            *standby.state.last_error.lock() = Some(e.to_string());
            return None;
        }
        Ok(c) => c,
    };
    if let Some(why) = standby.paused() {
        tracing::info!(peer = %conn.remote_address(), "refused the primary: {why}");
        conn.close(quinn::VarInt::from_u32(1), why.as_bytes());
        return None;
    }
    Some(conn)
}

/// A session task finished: its error, if any, goes to the log and status.
fn session_over(
    standby: &Standby,
    peer: Option<std::net::SocketAddr>,
    done: Result<anyhow::Result<()>, tokio::task::JoinError>,
) {
    *standby.state.connected.lock() = None;
    *standby.state.source.lock() = None;
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

/// A handshake that failed on the point or the epoch, for a standby still at the
/// point `ferryctl archive seed` restored: said plainly, since the operator's fix is
/// a new seed (the archive is not the primary's history), not a retry.
fn seeded_refusal(sb: &Standby, at: Seq, e: QuicError) -> anyhow::Error {
    use ferry_proto::session::HandshakeError as H;
    let history = match &e {
        QuicError::PeerRefused { code, .. } => {
            matches!(code, ErrorCode::Diverged | ErrorCode::StaleEpoch)
        }
        QuicError::Handshake(h) => matches!(
            h,
            H::StaleEpoch { .. } | H::LocalEpochStale { .. } | H::Diverged { .. }
        ),
        _ => false,
    };
    match sb.applier.meta.seeded() {
        Ok(Some((seq, epoch))) if history && seq == at => anyhow::Error::new(e).context(format!(
            "this standby was seeded from an archive at sequence {seq} in epoch {epoch}, and that point is not of the primary's history (another epoch, or past its newest sequence): seed it again from the primary's own archive"
        )),
        _ => e.into(),
    }
}

/// The ack once the journal is durable through `d`, carrying the applier's position
/// `applied` too when it is already past the acked one. The applier runs right
/// behind the journal, so `select!` can see its change first, while the session's
/// durable position still lags, and set it aside; without this the primary would
/// see the standby's applied position stale until the next write (seen in a test:
/// applied 408 of 410 for a minute after a primary restart).
fn ack_durable(rx: &mut Receiver, d: Seq, applied: Seq) -> anyhow::Result<Ack> {
    let ack = rx.mark_durable(d).map_err(|e| anyhow!("{e}"))?;
    if applied > rx.applied_seq() && applied <= rx.durable_seq() {
        return rx.mark_applied(applied).map_err(|e| anyhow!("{e}"));
    }
    Ok(ack)
}

async fn session(
    sb: &Standby,
    (local, peers): (&LocalIdentity, &Peers),
    opts: &TransportOptions,
    conn: quinn::Connection,
) -> anyhow::Result<()> {
    let peer = conn.remote_address();
    wait_journal_durable(sb).await?;
    let durable = sb.resume_position();
    let names = quic::peer_node_names(&conn);
    let relayed = relay_identity(sb, &names, local);
    let local = relayed.as_ref().unwrap_or(local);
    let mut seen = None;
    let handshake = quic::standby_handshake_observed(conn, local, durable, opts, |h| {
        seen = Some(h.clone());
    })
    .await;
    let s = match (handshake, seen, &peers.refused) {
        (Ok(s), _, _) => s,
        (Err(e), Some(hello), Some(refused)) if refused(&hello, &names, &e) => return Ok(()),
        (Err(e), _, _) => return Err(seeded_refusal(sb, durable, e)),
    };
    check_hello_name(&names, &s)?;
    tracing::info!(%peer, primary = %s.peer_hello.node_name, resume = durable, "primary connected");
    *sb.state.connected.lock() = Some(peer.to_string());
    *sb.state.source.lock() = Some(s.peer_hello.node_name.clone());
    *sb.state.last_error.lock() = None;
    stream(sb, local, opts, s, durable).await
}

/// The identity this session's Hello is checked against when the certificate names
/// the relay rather than the primary; `None` keeps the configured one.
fn relay_identity(sb: &Standby, names: &[String], local: &LocalIdentity) -> Option<LocalIdentity> {
    // The relay (cascading) is accepted as the primary is, in the same epoch: its
    // Hello must name it (and the certificate, below).
    match source_name(sb, names) {
        Some(src) if src != local.expected_peer_name => Some(LocalIdentity {
            expected_peer_name: src.to_string(),
            ..local.clone()
        }),
        _ => None,
    }
}

/// TLS admits every member: the Hello's name must be the certificate's, or a
/// member could pass for the primary.
fn check_hello_name(names: &[String], s: &StandbySession) -> anyhow::Result<()> {
    if !names.contains(&s.peer_hello.node_name) {
        bail!(
            "the peer's certificate names {:?} but its Hello claims to be '{}': refused",
            names,
            s.peer_hello.node_name
        );
    }
    Ok(())
}

/// A handshaken session's loop: frames from both streams, acks as the journal and
/// the applier advance, verify results, heartbeats; until an error or a handover.
async fn stream(
    sb: &Standby,
    local: &LocalIdentity,
    opts: &TransportOptions,
    mut s: StandbySession,
    durable: Seq,
) -> anyhow::Result<()> {
    let mut rx = Receiver::new(local.epoch, durable, sb.applied_seq().min(durable))
        .with_volumes(local.volumes.clone())
        .with_received_acks(s.hello_ack.received_acks);
    // A bitmap resync copy in progress in this session (see resync.rs).
    let mut copy: Option<Copy> = None;
    // QUIC announces the primary's data stream only with its first bytes, so accept it
    // inside the loop: heartbeats and acks must flow while no write has happened yet.
    let conn = s.conn.clone();
    let mut data: Option<FramedRecv> = None;
    let mut durable_rx = sb.durable_tx.subscribe();
    let mut applied_rx = sb.applied_rx.clone();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    // Armed when the applier moves and no ack has carried its position yet.
    let applied_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(applied_timer);
    let mut applied_due = false;
    // One session at a time: a replaced session's task is aborted first, releasing it.
    let mut outbox = sb.outbox.rx.lock().await;
    loop {
        tokio::select! {
            Some(o) = outbox.recv() => send_verify_result(&mut s.control_send, local, o).await?,
            d = conn.accept_uni(), if data.is_none() => {
                data = Some(FramedRecv::new(d?, opts.max_frame_len));
            }
            f = next_frame(&mut data), if data.is_some() => {
                let mut frames = DataFrames { sb, conn: &conn, rx: &mut rx, copy: &mut copy, durable };
                frames.on(&mut s.control_send, f?).await?;
            }
            f = s.control_recv.recv_frame() => {
                if on_control_frame(sb, local, &mut s, f?).await? == Flow::HandedOver {
                    return Ok(());
                }
            }
            r = durable_rx.changed() => {
                r.map_err(|_| anyhow!("journal completion channel closed"))?;
                let d = *durable_rx.borrow_and_update();
                if d > rx.durable_seq() && d <= rx.received_seq() {
                    let ack = ack_durable(&mut rx, d, *applied_rx.borrow())?;
                    s.control_send.send_frame(&Frame::Ack(ack)).await?;
                    applied_due &= rx.applied_seq() < *applied_rx.borrow();
                }
            }
            r = applied_rx.changed() => {
                r.map_err(|_| anyhow!("replica applier stopped"))?;
                if !applied_due {
                    applied_due = true;
                    applied_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + APPLIED_ACK_DELAY);
                }
            }
            () = &mut applied_timer, if applied_due => {
                applied_due = false;
                let a = *applied_rx.borrow_and_update();
                if a > rx.applied_seq() && a <= rx.durable_seq() {
                    let ack = rx.mark_applied(a).map_err(|e| anyhow!("{e}"))?;
                    s.control_send.send_frame(&Frame::Ack(ack)).await?;
                }
            }
            _ = heartbeat.tick() => send_heartbeat(sb, local, &mut s.control_send).await?,
        }
    }
}

/// A verify job's answer (from the node's outbox) to the primary that asked.
async fn send_verify_result(
    control: &mut FramedSend,
    local: &LocalIdentity,
    o: crate::verify::Outcome,
) -> anyhow::Result<()> {
    let (ok, body) = match o.result {
        Ok(b) => (true, bytes::Bytes::from(b)),
        Err(e) => (false, bytes::Bytes::from(e.into_bytes())),
    };
    control
        .send_frame(&Frame::VerifyResult(VerifyResult {
            epoch: local.epoch,
            id: o.id,
            volume: o.volume,
            ok,
            body,
        }))
        .await?;
    Ok(())
}

/// This standby's own heartbeat, sent every second.
async fn send_heartbeat(
    sb: &Standby,
    local: &LocalIdentity,
    control: &mut FramedSend,
) -> anyhow::Result<()> {
    control
        .send_frame(&Frame::Heartbeat(Heartbeat {
            epoch: local.epoch,
            sent_at_ns: now_ns(),
            // Not a reply: echoing the last primary timestamp here would make the
            // primary measure its age (up to a heartbeat interval) as the RTT.
            echo_ns: 0,
            last_seq: sb.journal.durable_seq(),
            sync_loss: None,
        }))
        .await?;
    Ok(())
}

/// A previous session's records may still be queued in the journal: wait until
/// they are durable, so the resume position covers them (else the primary would
/// resend them and the sequence check would end this session).
async fn wait_journal_durable(sb: &Standby) -> anyhow::Result<()> {
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
    Ok(())
}

/// What a session's data stream changes: the receiver's order and a resync copy.
struct DataFrames<'a> {
    sb: &'a Standby,
    /// The session's connection (a refusal closes it after its Error frame).
    conn: &'a quinn::Connection,
    rx: &'a mut Receiver,
    copy: &'a mut Option<Copy>,
    /// The resume position this session's Hello advertised.
    durable: Seq,
}

impl DataFrames<'_> {
    /// One frame from the data stream: a write-set to journal, or a step of a resync.
    async fn on(&mut self, control: &mut FramedSend, f: Option<Frame>) -> anyhow::Result<()> {
        let sb = self.sb;
        let Some(f) = f else {
            bail!("primary closed the data stream")
        };
        // A packed frame (V3: zstd, zero-filled writes) was checked and expanded by the
        // decoder: what follows sees exactly the frame the primary packed.
        let f = match f {
            Frame::Packed(p) => p.into_inner(),
            f => f,
        };
        match f {
            Frame::WriteSet(_) if self.copy.is_some() || sb.applier.resync.copy_incomplete() => {
                bail!(
                    "write-set refused: this standby is in the middle of a resync copy and \
                     needs the primary to resync it (ResyncBegin) before streaming"
                )
            }
            Frame::ResyncBegin(b) => self.resync_begin(&b)?,
            Frame::ResyncData(d) => self.resync_data(d)?,
            Frame::ResyncEnd(e) => self.resync_end(control, &e).await?,
            Frame::WriteSet(ws) => self.write_set(control, ws).await?,
            other => bail!(
                "unexpected {:?} frame on the data stream",
                other.frame_type()
            ),
        }
        Ok(())
    }

    /// Every resync frame is word from the primary, and of this session's epoch.
    fn resync_frame(&self, epoch: Epoch) -> anyhow::Result<()> {
        self.sb.state.heard_from_primary();
        self.rx
            .check_epoch(epoch)
            .map_err(|e| anyhow!("resync refused: {e}"))?;
        Ok(())
    }

    /// The copy starts: only at the position this session's Hello advertised.
    fn resync_begin(&mut self, b: &ResyncBegin) -> anyhow::Result<()> {
        self.resync_frame(b.epoch)?;
        if self.copy.is_some() || self.rx.received_seq() != self.durable {
            bail!("ResyncBegin in the middle of a session");
        }
        let (sb, durable) = (self.sb, self.durable);
        *self.copy = Some(tokio::task::block_in_place(|| {
            resync::begin(sb, b, durable)
        })?);
        Ok(())
    }

    /// One batch of the copy, written to the replica.
    fn resync_data(&mut self, d: ResyncData) -> anyhow::Result<()> {
        self.resync_frame(d.epoch)?;
        let sb = self.sb;
        let c = self
            .copy
            .as_mut()
            .ok_or_else(|| anyhow!("ResyncData without ResyncBegin"))?;
        tokio::task::block_in_place(|| resync::data(sb, c, d))?;
        Ok(())
    }

    /// The copy is durable: acked as the snapshot it brought the replica to.
    async fn resync_end(&mut self, control: &mut FramedSend, e: &ResyncEnd) -> anyhow::Result<()> {
        self.resync_frame(e.epoch)?;
        let sb = self.sb;
        let c = self
            .copy
            .take()
            .ok_or_else(|| anyhow!("ResyncEnd without ResyncBegin"))?;
        tokio::task::block_in_place(|| resync::end(sb, &c, e))?;
        let ack = self.rx.resynced(c.snapshot).map_err(|e| anyhow!("{e}"))?;
        control.send_frame(&Frame::Ack(ack)).await?;
        Ok(())
    }

    /// A write-set: journaled under the primary's sequence numbers, or refused.
    async fn write_set(&mut self, control: &mut FramedSend, ws: WriteSet) -> anyhow::Result<()> {
        let sb = self.sb;
        sb.state.heard_from_primary();
        sb.state
            .last_primary_seq
            .fetch_max(ws.last_seq, Ordering::Relaxed);
        self.refuse_while_held(control).await?;
        match self.rx.on_write_set(ws) {
            Ok(Received::Accept(ws)) => {
                // Backpressure: a write-set waits for its share of the bytes
                // received and not yet applied, so the standby's memory is bounded
                // whatever the primary's write sizes.
                let room = sb.journal_room(&ws).await?;
                sb.journal_write_set(ws, room)?;
                // After the append is queued: a journal that refused it ended
                // the session above, so no refused write-set is acknowledged.
                if let Some(ack) = self.rx.received_ack() {
                    control.send_frame(&Frame::Ack(ack)).await?;
                }
            }
            Ok(Received::Duplicate(ack)) => control.send_frame(&Frame::Ack(ack)).await?,
            Err(e) => {
                // Told before the session ends, so the primary logs why (and,
                // for a record outside the replica, that a resync is needed).
                let frame = e.to_error_frame(self.rx.epoch());
                quic::refuse(self.conn, control, frame).await;
                bail!("write-set refused: {e}");
            }
        }
        Ok(())
    }

    /// Refuses every write-set (and ends the session) while this standby must not
    /// journal the primary's records whatever their order.
    async fn refuse_while_held(&self, control: &mut FramedSend) -> anyhow::Result<()> {
        if self.sb.state.relay_resync.load(Ordering::Acquire) {
            let frame = ErrorFrame {
                epoch: self.rx.epoch(),
                code: ErrorCode::ResyncRequired,
                reason: "this standby followed a newer epoch through its relay and may \
                         hold records of the old epoch past the new primary's fork: a \
                         full resync by digest is needed"
                    .into(),
            };
            quic::refuse(self.conn, control, frame).await;
            bail!("write-set refused: a resync is needed after following a newer epoch through the relay");
        }
        if crate::store::failpoint::check("ferryd::standby_refuse_write_set").is_err() {
            // As for a record outside the replica (`ResyncRequired`).
            let frame = ErrorFrame {
                epoch: self.rx.epoch(),
                code: ErrorCode::ResyncRequired,
                reason: "failpoint ferryd::standby_refuse_write_set".into(),
            };
            quic::refuse(self.conn, control, frame).await;
            bail!("write-set refused by a failpoint");
        }
        Ok(())
    }
}

/// Whether a session goes on after a control frame.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// This standby took over: the session (and the node's role) ends.
    HandedOver,
}

/// One frame from the control stream.
async fn on_control_frame(
    sb: &Standby,
    local: &LocalIdentity,
    s: &mut StandbySession,
    f: Option<Frame>,
) -> anyhow::Result<Flow> {
    match f {
        Some(Frame::Heartbeat(hb)) => {
            sb.state.heard_from_primary();
            if let Some(loss) = hb.sync_loss {
                let at = match loss {
                    SyncLoss::DegradedAt(at) => Some(at),
                    SyncLoss::None => None,
                };
                tokio::task::block_in_place(|| sb.heard_sync_loss(at))?;
            }
            sb.state
                .last_primary_seq
                .fetch_max(hb.last_seq, Ordering::Relaxed);
            s.control_send
                .send_frame(&Frame::Heartbeat(Heartbeat {
                    epoch: local.epoch,
                    sent_at_ns: now_ns(),
                    echo_ns: hb.sent_at_ns,
                    last_seq: sb.journal.durable_seq(),
                    sync_loss: None,
                }))
                .await?;
        }
        Some(Frame::DigestRequest(d)) => send_digests(sb, local, &mut s.control_send, &d).await?,
        Some(Frame::Handover(h)) => {
            hand_over(sb, local, s, h.seq).await?;
            return Ok(Flow::HandedOver);
        }
        Some(Frame::Error(e)) => bail!("primary sent an error: {:?}: {}", e.code, e.reason),
        Some(other) => bail!(
            "unexpected {:?} frame on the control stream",
            other.frame_type()
        ),
        None => bail!("primary closed the control stream"),
    }
    Ok(Flow::Continue)
}

/// The hash parameters a digest request asks for.
fn digest_params(d: &DigestRequest) -> anyhow::Result<HashParams> {
    Ok(HashParams {
        algo: u8::try_from(d.algo)
            .ok()
            .and_then(ChunkHash::from_id)
            .ok_or_else(|| anyhow!("digest request with unknown algorithm {}", d.algo))?,
        chunk_size: d.chunk_size,
        seed: d.seed,
    })
}

/// A resync asks what the replica holds before copying: hash it as it is (nothing is
/// written to it before the copy's first data), one answer per volume.
async fn send_digests(
    sb: &Standby,
    local: &LocalIdentity,
    control: &mut FramedSend,
    d: &DigestRequest,
) -> anyhow::Result<()> {
    let params = digest_params(d)?;
    if let Err(e) = crate::verify::check_digest(params.algo) {
        tracing::warn!(id = d.id, "digest request refused: {e}");
        for b in sb.applier.bases.iter() {
            control
                .send_frame(&Frame::VerifyResult(VerifyResult {
                    epoch: local.epoch,
                    id: d.id,
                    volume: b.id,
                    ok: false,
                    body: bytes::Bytes::from(e.clone().into_bytes()),
                }))
                .await?;
        }
        return Ok(());
    }
    let bases = sb.applier.bases.clone();
    let lists = tokio::task::spawn_blocking(move || {
        bases
            .iter()
            .map(|b| (b.id, hash_range(&b.file, 0, b.size, params)))
            .collect::<Vec<_>>()
    })
    .await?;
    for (volume, list) in lists {
        let (ok, body) = match list {
            Ok(l) => (true, bytes::Bytes::from(l.encode())),
            Err(e) => (false, bytes::Bytes::from(e.to_string().into_bytes())),
        };
        control
            .send_frame(&Frame::VerifyResult(VerifyResult {
                epoch: local.epoch,
                id: d.id,
                volume,
                ok,
                body,
            }))
            .await?;
    }
    Ok(())
}

/// The primary stopped writing and saw every record up to `seq` acked durable
/// here; anything else means the histories do not match.
fn check_handover(durable: Seq, last: Seq, seq: Seq) -> anyhow::Result<()> {
    if durable != seq || last != seq {
        bail!("handover at {seq} refused: this standby holds {durable}");
    }
    Ok(())
}

/// Takes over at `seq`: the node becomes the primary in a new epoch, acks, and
/// restarts in its new role.
async fn hand_over(
    sb: &Standby,
    local: &LocalIdentity,
    s: &mut StandbySession,
    seq: Seq,
) -> anyhow::Result<()> {
    check_handover(sb.journal.durable_seq(), sb.journal.last_seq(), seq)?;
    let take_over = sb
        .handover
        .lock()
        .clone()
        .ok_or_else(|| anyhow!("handover refused: this standby cannot take over"))?;
    tracing::warn!(seq, "the primary hands over: taking over");
    let (new_epoch, restart) = tokio::task::spawn_blocking(move || take_over(seq)).await??;
    if crate::store::failpoint::check("ferryd::handover_ack_send").is_err() {
        // Test hook (daemon/FAILPOINTS.md): the ack is lost on its way; the standby
        // has taken over all the same.
        tracing::warn!("failpoint ferryd::handover_ack_send: the HandoverAck is not sent");
        restart();
        return Ok(());
    }
    s.control_send
        .send_frame(&Frame::HandoverAck(HandoverAck {
            epoch: local.epoch,
            seq,
            new_epoch,
        }))
        .await?;
    // Let the ack reach the old primary before the restart closes us.
    let _ = tokio::time::timeout(Duration::from_secs(2), s.control_recv.recv_frame()).await;
    restart();
    Ok(())
}

/// The next frame on the data stream once it has been accepted.
async fn next_frame(data: &mut Option<FramedRecv>) -> Result<Option<Frame>, QuicError> {
    match data {
        Some(d) => d.recv_frame().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handover_needs_every_record_durable_and_nothing_more() {
        assert!(check_handover(10, 10, 10).is_ok());
        // Records the primary never saw acked, or not yet durable here.
        let e = check_handover(10, 11, 10).unwrap_err().to_string();
        assert!(e.contains("handover at 10 refused"), "{e}");
        let e = check_handover(9, 10, 10).unwrap_err().to_string();
        assert!(e.contains("this standby holds 9"), "{e}");
        assert!(check_handover(11, 11, 10).is_err());
    }

    #[test]
    fn digest_requests_name_a_known_algorithm() {
        let req = |algo| DigestRequest {
            epoch: 1,
            id: 3,
            chunk_size: 1 << 20,
            seed: 99,
            algo,
        };
        let p = digest_params(&req(u32::from(ChunkHash::Sm3.id()))).unwrap();
        assert_eq!(
            p,
            HashParams {
                algo: ChunkHash::Sm3,
                chunk_size: 1 << 20,
                seed: 99
            }
        );
        assert_eq!(digest_params(&req(1)).unwrap().algo, ChunkHash::Xxh3);
        for bad in [0, 3, 257, u32::MAX] {
            let e = digest_params(&req(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown algorithm {bad}")), "{e}");
        }
    }

    #[tokio::test]
    async fn no_data_frame_before_the_data_stream_is_accepted() {
        let mut none = None;
        let r = tokio::time::timeout(Duration::from_millis(50), next_frame(&mut none)).await;
        assert!(r.is_err(), "a frame without a data stream");
    }
}
