//! One shipper's connection to its standby: the reconnect loop ([`run_target`]) and a
//! session on one QUIC connection (resume handshake, resync when the target is in
//! bitmap mode, streaming with the in-flight window, acks, heartbeats, handover).
//! Write-sets go out packed and under the target's bandwidth cap (`ship::wan`): a
//! write-set the cap holds back waits in the session loop, never blocking it.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_journal::{now_ns, Journal, Seq};
use ferry_proto::session::{self, LocalIdentity, Sender, SenderConfig};
use ferry_proto::target::{
    ForkView, FullReason, HelloInput, HelloPlan, JournalView, PlanStart, SessionStart,
};
use ferry_proto::wan::Class;
use ferry_proto::wire::{ErrorCode, Frame, Heartbeat, WriteSet};
use ferry_transport::quic::{self, Backoff, TlsMaterial, TransportOptions};
use parking_lot::Mutex;

use crate::ship::feed::Tail;
use crate::ship::reader::{ShipReader, ShipSource};
use crate::ship::target::{SyncGate, TargetState};
use crate::ship::wan::{sleep_until, Outgoing};
use ferry_api::config::ReplicationMode;

/// Write-sets formed ahead of the network per target (bounded memory).
const READ_AHEAD_WRITE_SETS: usize = 16;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A streaming session whose standby sent nothing (no ack, no heartbeat: it answers
/// every heartbeat) for this long is ended: a SIGKILLed standby shows as
/// `disconnected` in seconds, not after QUIC's idle timeout.
const PEER_SILENT: Duration = Duration::from_secs(5);

/// Everything a shipper needs, shared by all of them.
/// See [`ShipContext::outdated`].
pub type OutdatedHook = Arc<dyn Fn(u64, &str) + Send + Sync>;

pub struct ShipContext {
    pub journal: Arc<Journal>,
    pub tail: Arc<Tail>,
    pub local: LocalIdentity,
    pub tls: TlsMaterial,
    pub opts: TransportOptions,
    pub durable: Arc<crate::ship::feed::DurableSeq>,
    /// The feed's ready position: records sequenced but maybe not durable yet, which
    /// a primary ships in parallel with its own journal write (`ship::feed`).
    pub ready: Arc<crate::ship::feed::DurableSeq>,
    /// Targets that relay to other members (`[[cluster.node]] via`): shipped only
    /// durable records, since a relay forwards what it holds and its members would
    /// not learn of this primary's crash horizon.
    pub relays: Vec<String>,
    /// `replication.async_linger_us`: an async shipper's coalescing wait.
    pub async_linger: Duration,
    pub sync: Arc<SyncGate>,
    /// Called when a target proves a newer epoch exists (it was promoted): this
    /// primary is outdated and must stop taking writes. Arguments: the newer epoch
    /// and the node that showed it.
    pub outdated: OutdatedHook,
    /// On a primary by promotion: the fork point, and the targets known to have
    /// rejoined after it (a node whose journal goes past the fork without having
    /// rejoined holds writes of the old epoch the new history does not have).
    pub fork: Option<(Seq, Arc<crate::store::meta::Meta>)>,
    /// On a primary: where the targets' crash horizons are kept (`store::meta`,
    /// `horizon/<target>`); `None` on a relay, which ships only durable records.
    pub horizons: Option<Arc<crate::store::meta::Meta>>,
    /// Some volume may run writeback (`volume.cache` other than writethrough): sync
    /// targets are asked for received acks (protocol V4), which writeback replies
    /// wait for. Async targets and writethrough-only nodes never ask, so their
    /// standbys send durable acks only, as before.
    pub received_acks: bool,
    /// Why no session may start now, if one may not (a relay whose own replica is
    /// inconsistent or rolled back: a resync copy would read that replica); checked
    /// before each dial. `None` on a primary.
    pub hold: Option<HoldFn>,
}

/// See [`ShipContext::hold`].
pub type HoldFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

pub(crate) async fn run_target(ctx: Arc<ShipContext>, t: Arc<TargetState>) {
    let mut backoff = Backoff::default();
    let addr: SocketAddr = match t.address.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(target = %t.name, "bad target address {}: {e}", t.address);
            return;
        }
    };
    // `connecting` until the first session; after one ended the target stays
    // `disconnected` while it is redialled (status must say the standby is gone, not
    // that a connection is on its way).
    t.update(|lc| lc.connecting());
    loop {
        let started = Instant::now();
        // Ends the session in the lifecycle however `session` ends (also when the
        // shipper is cancelled at shutdown).
        let mut ended = SessionGuard { t: &t, error: None };
        let dialed = match crate::store::failpoint::check("ferryd::ship_connect") {
            Ok(()) => session(&ctx, &t, addr).await,
            Err(e) => Err(anyhow!(
                "dialing {addr}: failpoint ferryd::ship_connect: {e}"
            )),
        };
        let mut diverged = None;
        if let Err(e) = dialed {
            diverged = fork_diverged(&e);
            let newer = e
                .chain()
                .find_map(|c| match c.downcast_ref::<quic::QuicError>() {
                    Some(quic::QuicError::Handshake(
                        session::HandshakeError::LocalEpochStale { peer, .. },
                    )) => Some(*peer),
                    _ => None,
                });
            if let Some(epoch) = newer {
                (ctx.outdated)(epoch, &t.name);
            }
            let msg = crate::error_chain(&e);
            if t.snapshot().last_error.as_deref() != Some(msg.as_str()) {
                tracing::warn!(target = %t.name, address = %t.address, "replication session ended: {msg}");
            }
            ended.error = Some(msg);
        }
        drop(ended);
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        match diverged {
            Some(resume) => redial_once_past(&ctx.durable, resume).await,
            None => tokio::time::sleep(backoff.next_delay()).await,
        }
    }
}

/// The standby's resume position, if the handshake refused it as holding writes past
/// this primary's fork (`ForkDiverged`).
fn fork_diverged(e: &anyhow::Error) -> Option<Seq> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<quic::QuicError>() {
            Some(quic::QuicError::Handshake(session::HandshakeError::ForkDiverged {
                peer_resume,
                ..
            })) => Some(*peer_resume),
            _ => None,
        })
}

/// How long a diverged target waits at most before it is dialled again anyway (its
/// position may have changed: it may have been resynced from elsewhere).
const DIVERGED_REDIAL_MAX: Duration = Duration::from_secs(10);

/// A target refused as diverged is resynced once this history passes its position:
/// redial as soon as it does, not after the growing backoff (which could leave a
/// far site unprotected for seconds after the first writes of a new primary), and
/// at most every [`DIVERGED_REDIAL_MAX`] while the history stays behind; never more
/// often than every 100 ms.
async fn redial_once_past(durable: &crate::ship::feed::DurableSeq, resume: Seq) {
    let until = Instant::now() + DIVERGED_REDIAL_MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if durable.get() > resume || Instant::now() >= until {
            return;
        }
    }
}

/// Tells the lifecycle that a session ended (with `error`, for status), when dropped.
struct SessionGuard<'a> {
    t: &'a TargetState,
    error: Option<String>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.t.session_ended(self.error.take());
    }
}

/// MTU of the route to `peer` as the kernel knows it (`IP_MTU` of a UDP socket
/// connected to it; nothing is sent), or `None` if it cannot be read. Bounds QUIC's
/// path MTU discovery (`TransportOptions::toward`). Here, not in `ferry-transport`:
/// that crate forbids unsafe code, and neither std nor socket2 reads `IP_MTU`.
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(peer).ok()?;
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, a c_int we own, on a
    // socket we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && mtu > 0).then_some(mtu as u32)
}

/// One connection's life: handshake, then ship until an error.
async fn session(ctx: &ShipContext, t: &Arc<TargetState>, addr: SocketAddr) -> anyhow::Result<()> {
    if let Some(why) = ctx.hold.as_ref().and_then(|h| h()) {
        bail!("not shipping to {addr}: {why}");
    }
    let epoch = ctx.local.epoch;
    let (mut s, plan) = handshake(ctx, t, addr).await?;
    t.wan.session_started(&t.name, s.negotiated);
    tokio::task::block_in_place(|| crate::ship::catchup::switch_full(t, &plan))?;
    // After `switch_full`: a full resync is durably planned before the rejoin is
    // recorded (which a restart would otherwise see as nothing to resync).
    if let (true, Some((fork, meta))) = (plan.record_rejoined, &ctx.fork) {
        meta.set_rejoined(&t.name, *fork)?;
    }
    // Likewise: the target resumes at or below its crash horizon, or its full
    // resync is durably planned; and the next start must know it was shipped to.
    if let Some(meta) = &ctx.horizons {
        meta.shipping_to(&t.name)?;
    }
    let peer_resume = s.peer_hello.resume_position;
    tracing::info!(
        target = %t.name,
        address = %t.address,
        resume = plan.ack.resume_seq,
        version = s.negotiated.version,
        received_acks = s.hello_ack.received_acks,
        "replication session established"
    );
    let start = t.update(|lc| lc.session_started(&plan, peer_resume, ctx.journal.durable_seq()));
    if plan.start
        == (PlanStart::Resync {
            full: Some(FullReason::StandbyRequired),
        })
    {
        // The full switch above is durable: the dirty maps carry the request now.
        persist_resync_required(ctx, t, false);
    }
    let resume = match start {
        SessionStart::Stream { after } => after,
        SessionStart::Resync { from } => {
            crate::ship::catchup::resync_copy(t, &mut s, from, epoch).await?
        }
    };
    check_not_across_cut(ctx, resume)?;
    ctx.sync.recompute();
    let src = ShipSource {
        journal: ctx.journal.clone(),
        tail: ctx.tail.clone(),
        upto: if ctx.relays.contains(&t.name) {
            ctx.durable.clone()
        } else {
            ctx.ready.clone()
        },
        durable: ctx.durable.clone(),
        linger: match t.mode {
            ReplicationMode::Async => ctx.async_linger,
            ReplicationMode::Sync => Duration::ZERO,
        },
    };
    // Its reader thread, if any, is joined when this session ends, however it ends.
    let reader = ShipReader::new(&t.name, src, (resume + 1, epoch, READ_AHEAD_WRITE_SETS));
    stream(ctx, t, s, reader, resume).await
}

/// Dials the target and runs the resume handshake. Returns the session and the
/// lifecycle's plan for it ([`plan_hello`]).
async fn handshake(
    ctx: &ShipContext,
    t: &Arc<TargetState>,
    addr: SocketAddr,
) -> anyhow::Result<(quic::PrimarySession, HelloPlan)> {
    let endpoint = quic::client_endpoint("0.0.0.0:0".parse()?)?;
    let opts = ctx.opts.clone().toward(addr, route_mtu(addr));
    let client = quic::client_config(&ctx.tls, &t.name, &opts)?;
    let conn = quic::connect(&endpoint, client, addr, &t.name).await?;
    let mut local = ctx.local.clone();
    local.expected_peer_name = t.name.clone();
    let planned: Mutex<Option<HelloPlan>> = Mutex::new(None);
    let s = quic::primary_handshake(
        conn,
        &local,
        ctx.journal.durable_seq(),
        &ctx.opts,
        |neg, hello| plan_hello(ctx, t, neg, hello, &planned),
    )
    .await?;
    let plan = planned
        .lock()
        .take()
        .ok_or_else(|| anyhow!("the handshake completed without a plan"))?;
    Ok((s, plan))
}

/// Where a session resumes, from the standby's Hello: the lifecycle decides
/// (`TargetLifecycle::plan_hello`) from the journal and, on a primary by promotion,
/// the fork; the plan is kept in `planned` for the session.
fn plan_hello(
    ctx: &ShipContext,
    t: &TargetState,
    negotiated: session::Negotiated,
    hello: &ferry_proto::wire::Hello,
    planned: &Mutex<Option<HelloPlan>>,
) -> Result<ferry_proto::wire::HelloAck, session::HandshakeError> {
    let journal = &ctx.journal;
    let fork = ctx.fork.as_ref().map(|(fork, meta)| ForkView {
        seq: *fork,
        rejoined: meta.rejoined(&t.name, *fork).unwrap_or(false),
        cut: fork_cut(ctx, *fork, meta),
    });
    let fork = past_crash_horizon(ctx, t, hello.resume_position).or(fork);
    let input = HelloInput {
        negotiated,
        epoch: ctx.local.epoch,
        peer_resume: hello.resume_position,
        journal: JournalView {
            first_available: journal.first_available_seq(),
            durable: journal.durable_seq(),
        },
        fork,
    };
    let plan = t.read(|lc| lc.plan_hello(&input))?;
    match plan.start {
        PlanStart::Resync {
            full: Some(FullReason::Failback { fork }),
        } => tracing::warn!(
            target = %t.name,
            fork,
            resume = input.peer_resume,
            "the rejoining node wrote after the fork: delta resync"
        ),
        PlanStart::Resync {
            full: Some(FullReason::ForkCut { fork, cut }),
        } => tracing::warn!(
            target = %t.name,
            fork,
            cut,
            resume = input.peer_resume,
            "the records after the fork up to the cut were discarded at the promotion: full resync by digest instead of streaming them"
        ),
        PlanStart::Resync {
            full: Some(FullReason::StandbyRequired),
        } => tracing::warn!(
            target = %t.name,
            resume = input.peer_resume,
            "the standby required a resync: full resync by digest"
        ),
        _ => {}
    }
    let mut ack = plan.ack.clone();
    ack.received_acks = wants_received_acks(ctx.received_acks, t.mode, negotiated);
    *planned.lock() = Some(plan);
    Ok(ack)
}

/// The target's crash horizon as a fork it has not rejoined, if it resumes past it
/// (`store::meta`, `horizon/<target>`): the records it holds past the horizon may be
/// ones this primary shipped before its journal held them and lost in a crash, with
/// the sequences since reused. The lifecycle then refuses it until this history
/// passes its position and resyncs it by digest, as a node that wrote past a fork.
/// Taking precedence over a promotion's fork is safe: the horizon is at or past that
/// fork (set at a later start), and both lead to the same full resync. Unreadable: the
/// horizon is taken as this journal's first sequence (a resync, never a divergence).
fn past_crash_horizon(ctx: &ShipContext, t: &TargetState, resume: Seq) -> Option<ForkView> {
    let meta = ctx.horizons.as_ref()?;
    let horizon = match meta.crash_horizon(&t.name) {
        Ok(h) => h?,
        Err(e) => {
            tracing::error!(target = %t.name, "reading the crash horizon: {e}");
            0
        }
    };
    (resume > horizon).then(|| {
        tracing::warn!(
            target = %t.name,
            horizon,
            resume,
            "the standby holds records past this primary's journal at its start (shipped              before a crash lost them here): full resync by digest"
        );
        ForkView {
            seq: horizon,
            rejoined: false,
            cut: horizon,
        }
    })
}

/// Whether to ask the standby for received acks: only a sync target (writes wait for
/// it) of a node with a writeback-capable volume (only writeback replies wait for
/// received), and only if it speaks V4.
fn wants_received_acks(
    writeback: bool,
    mode: ReplicationMode,
    negotiated: session::Negotiated,
) -> bool {
    writeback && mode == ReplicationMode::Sync && negotiated.has_received_acks()
}

/// This epoch's cut (`Meta::fork_cut`): records `fork + 1 ..= cut` were discarded by
/// the promotion's rollback. Unreadable: the journal's end, so that no target below it
/// is streamed (it resyncs by digest instead).
fn fork_cut(ctx: &ShipContext, fork: Seq, meta: &crate::store::meta::Meta) -> Seq {
    match meta.fork_cut() {
        Ok(cut) => cut.unwrap_or(fork).max(fork),
        Err(e) => {
            tracing::error!(
                "reading the fork's cut: {e}; every target below the journal's end resyncs"
            );
            ctx.journal.durable_seq().max(fork)
        }
    }
}

/// Refuses to stream after `resume` across this epoch's cut: the last guard before
/// the journal is read, whatever the plan said.
fn check_not_across_cut(ctx: &ShipContext, resume: Seq) -> anyhow::Result<()> {
    let Some((fork, meta)) = &ctx.fork else {
        return Ok(());
    };
    let cut = fork_cut(ctx, *fork, meta);
    if cut > *fork && resume < cut {
        bail!(
            "refusing to stream after {resume}: records {}..={cut} were discarded at the promotion (fork {fork})",
            fork + 1
        );
    }
    Ok(())
}

/// What the streaming loop does after a control frame.
enum Next {
    Continue,
    /// The session ends without an error (the standby took over).
    End,
}

/// Streams write-sets after `resume` until an error (or a completed handover):
/// feeds the in-flight window from the reader thread, applies acks, answers the
/// control stream, sends heartbeats and a requested Handover.
async fn stream(
    ctx: &ShipContext,
    t: &Arc<TargetState>,
    mut s: quic::PrimarySession,
    mut reader: ShipReader,
    resume: Seq,
) -> anyhow::Result<()> {
    let epoch = ctx.local.epoch;
    let mut sender = Sender::new(epoch, SenderConfig::default(), resume);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut pending: Option<WriteSet> = None;
    // A write-set the bandwidth cap holds back until its release time.
    let mut held: Option<Outgoing> = None;
    let mut last_heard = Instant::now();
    loop {
        // Feed the window from the read-ahead, then transmit what it allows.
        fill_queue(&mut sender, &mut pending, || reader.try_recv())?;
        transmit(t, &mut s, &mut sender, &mut held, &reader).await?;
        let release = held
            .as_ref()
            .map(|o| tokio::time::Instant::from_std(o.release_at));
        tokio::select! {
            _ = sleep_until(release), if release.is_some() => {}
            frame = s.control_recv.recv_frame() => {
                let Some(frame) = frame? else { bail!("standby closed the control stream") };
                last_heard = Instant::now();
                if let Next::End = on_control(ctx, t, &mut sender, frame)? {
                    return Ok(());
                }
            }
            _ = t.handover_kick.notified() => {
                if let Some(seq) = t.handover_to_send() {
                    // Everything up to `seq` went out before (the data stream is
                    // ordered and the primary stopped writing): the standby checks it.
                    s.control_send.send_frame(&Frame::Handover(ferry_proto::wire::Handover { epoch, seq })).await?;
                    tracing::warn!(target = %t.name, seq, "handover sent: the standby is to take over");
                }
            }
            ws = reader.recv(), if pending.is_none() => {
                match ws {
                    Some(ws) => pending = Some(ws?),
                    None => bail!("journal reader stopped"),
                }
            }
            _ = t.track.kicked() => {
                bail!("switched to bitmap mode: the journal no longer keeps this target's records");
            }
            _ = heartbeat.tick() => {
                // A switch to bitmap mode (or an abandoned resync) whose wake-up this
                // loop missed.
                if t.read(|lc| lc.must_end_session()).is_some() {
                    bail!("switched to bitmap mode: the journal no longer keeps this target's records");
                }
                // A standby taking over answers no heartbeat until its HandoverAck (the
                // take-over checkpoints and records the new epoch first): ending the
                // session then would lose the ack. The handover has its own timeout.
                let handing_over =
                    t.read(|lc| matches!(lc.phase(), ferry_proto::target::TargetPhase::HandingOver { .. }));
                if last_heard.elapsed() > PEER_SILENT && !handing_over {
                    bail!("the standby sent nothing for {PEER_SILENT:?} (not even a heartbeat)");
                }
                s.control_send
                    .send_frame(&Frame::Heartbeat(Heartbeat {
                        epoch,
                        sent_at_ns: now_ns(),
                        echo_ns: 0,
                        last_seq: ctx.journal.durable_seq(),
                        sync_loss: t.heartbeat_sync_loss(s.negotiated),
                    }))
                    .await?;
            }
        }
    }
}

/// Moves write-sets from `next` (the reader's read-ahead) into the sender's queue
/// while it has room. A full queue is backpressure: the write-set that does not fit
/// stays in `pending` (and the reader behind it) until acks free room, so memory
/// stays bounded however far the target lags, and no write-set is dropped (a dropped
/// one would end the session at the next push: "not contiguous").
fn fill_queue(
    sender: &mut Sender,
    pending: &mut Option<WriteSet>,
    mut next: impl FnMut() -> Option<anyhow::Result<WriteSet>>,
) -> anyhow::Result<()> {
    loop {
        let ws = match pending.take() {
            Some(ws) => ws,
            None => match next() {
                Some(ws) => ws?,
                None => return Ok(()),
            },
        };
        if sender.has_room(&ws).is_err() {
            *pending = Some(ws);
            return Ok(());
        }
        sender.push(ws).map_err(|e| anyhow!("shipping: {e}"))?;
    }
}

/// Sends the write-sets the in-flight window releases, each packed for the wire and
/// once the bandwidth cap lets it go. The first one the cap holds back stays in `held`
/// (the session loop waits for its release time while it serves the control stream).
async fn transmit(
    t: &TargetState,
    s: &mut quic::PrimarySession,
    sender: &mut Sender,
    held: &mut Option<Outgoing>,
    reader: &ShipReader,
) -> anyhow::Result<()> {
    loop {
        if held.is_none() {
            let Some(ws) = sender.poll_transmit() else {
                return Ok(());
            };
            // Write-sets read back from journal segments are a catch-up: they yield
            // to live traffic in the bucket.
            let class = if reader.catching_up() {
                Class::Bulk
            } else {
                Class::Live
            };
            let frame = Frame::WriteSet(ws);
            let o = if t.wan.packs_inline(&frame) {
                t.wan.prepare(frame, class)?
            } else {
                tokio::task::block_in_place(|| t.wan.prepare(frame, class))?
            };
            *held = Some(o);
        }
        let Some(o) = held.take_if(|o| o.release_at <= Instant::now()) else {
            return Ok(());
        };
        s.data.send_frame(&o.frame).await?;
        t.wan.sent(&o);
    }
}

/// One frame from the standby's control stream while streaming.
fn on_control(
    ctx: &ShipContext,
    t: &TargetState,
    sender: &mut Sender,
    frame: Frame,
) -> anyhow::Result<Next> {
    match frame {
        Frame::Ack(ack) => {
            let out = sender
                .on_ack(&ack)
                .map_err(|e| anyhow!("standby ack: {e}"))?;
            on_ack(ctx, t, (out.durable_seq, out.applied_seq), out.received_seq);
        }
        Frame::Heartbeat(hb) => {
            if hb.echo_ns != 0 {
                let rtt = now_ns().saturating_sub(hb.echo_ns) / 1000;
                t.rtt_us.store(rtt, Ordering::Relaxed);
            }
        }
        Frame::VerifyResult(v) => {
            let waiter = t.verify_waiters.lock().remove(&(v.id, v.volume));
            if let Some(w) = waiter {
                let _ = w.send(if v.ok {
                    Ok(v.body)
                } else {
                    Err(String::from_utf8_lossy(&v.body).into_owned())
                });
            }
        }
        Frame::HandoverAck(a) => {
            t.on_handover_ack(a.seq, a.new_epoch)?;
            // The standby restarts as the primary: this session ends.
            return Ok(Next::End);
        }
        Frame::Error(e) => {
            let why = || anyhow!("standby refused the handover: {:?}: {}", e.code, e.reason);
            if t.on_peer_error(e.code, why) {
                tracing::error!(
                    target = %t.name,
                    reason = %e.reason,
                    "the standby refused a write-set and requires a resync: the next session \
                     copies every region that differs (compared by digest) instead of streaming"
                );
                persist_resync_required(ctx, t, true);
            }
            if e.code == ErrorCode::ResyncRequired {
                bail!(
                    "standby requires a full resync (it refused a write-set: {}); the next \
                     session resyncs every region by digest",
                    e.reason
                )
            }
            bail!("standby refused: {:?}: {}", e.code, e.reason)
        }
        other => bail!(
            "unexpected {:?} frame on the control stream",
            other.frame_type()
        ),
    }
    Ok(Next::Continue)
}

/// Records (or clears) the standby's request for a full resync in the metadata, so
/// a restart before the resync still does it. A failure is logged: the request is
/// then held in memory only (and a standby refuses the same records again anyway).
fn persist_resync_required(ctx: &ShipContext, t: &TargetState, required: bool) {
    let Some(meta) = ctx.sync.meta() else {
        return;
    };
    if let Err(e) = tokio::task::block_in_place(|| meta.set_resync_required(&t.name, required)) {
        tracing::error!(target = %t.name, "cannot record the standby's resync request: {e}");
    }
}

/// The standby holds `durable`, applied `applied` and received `received` (= durable
/// unless it sends received acks): the lifecycle decides whether a resync completed
/// (its maps go) and whether a degraded target caught up; the sync gate moves.
fn on_ack(ctx: &ShipContext, t: &TargetState, (durable, applied): (Seq, Seq), received: Seq) {
    let journal_durable = ctx.journal.durable_seq();
    let out = t.update(|lc| {
        let out = lc.on_ack(durable, applied, journal_durable);
        lc.on_received(received);
        out
    });
    if out.resync_complete {
        tokio::task::block_in_place(|| crate::ship::catchup::complete_resync(t));
    }
    if out.caught_up {
        tracing::info!(target = %t.name, "sync target caught up: synchronous again");
    }
    ctx.sync.recompute();
    let mut cleared = out.sync_loss_cleared;
    if out.caught_up {
        // Read after the recompute: every write acknowledged without the target is
        // at or below it (later ones wait for it now).
        let durable = ctx.journal.durable_seq();
        cleared |= t.update(|lc| lc.sync_resumed(durable));
    }
    if cleared {
        t.clear_sync_loss(ctx.sync.meta());
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a test runtime")
    }

    /// Well under [`DIVERGED_REDIAL_MAX`]: a redial held until then would miss it.
    const EARLY: Duration = Duration::from_secs(5);

    #[test]
    fn a_diverged_target_is_redialled_once_the_history_passes_its_position() {
        let durable = Arc::new(crate::ship::feed::DurableSeq::new(60));
        let writer = Arc::clone(&durable);
        let publish = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            writer.publish(61); // not past the target's 61 yet
            std::thread::sleep(Duration::from_millis(300));
            writer.publish(62);
        });
        let waited = runtime()
            .block_on(async { tokio::time::timeout(EARLY, redial_once_past(&durable, 61)).await });
        publish.join().expect("the publishing thread");
        assert!(
            waited.is_ok(),
            "still waiting {EARLY:?} after the history passed 61"
        );
        assert_eq!(durable.get(), 62, "returned before the history passed 61");
    }

    #[test]
    fn a_diverged_target_behind_this_history_is_redialled_after_a_short_pause() {
        let durable = crate::ship::feed::DurableSeq::new(70);
        let waited = runtime()
            .block_on(async { tokio::time::timeout(EARLY, redial_once_past(&durable, 61)).await });
        assert!(
            waited.is_ok(),
            "a target this history already passed waited {EARLY:?}"
        );
    }

    #[test]
    fn only_sync_targets_of_a_writeback_node_speaking_v4_are_asked_for_received_acks() {
        use session::Negotiated;
        let v = |version| Negotiated { version };
        assert!(wants_received_acks(true, ReplicationMode::Sync, v(4)));
        assert!(!wants_received_acks(true, ReplicationMode::Sync, v(3)));
        assert!(!wants_received_acks(true, ReplicationMode::Async, v(4)));
        assert!(!wants_received_acks(false, ReplicationMode::Sync, v(4)));
    }

    #[test]
    fn the_route_mtu_is_the_interface_mtu() {
        // Loopback's MTU as the kernel reports it for the interface.
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("reading /sys/class/net/lo/mtu")
            .trim()
            .parse()
            .expect("lo mtu");
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // An IPv4 packet holds at most 65535 bytes: the route reports lo's MTU capped there.
        assert_eq!(route_mtu(peer), Some(lo.min(65535)));
        let opts = TransportOptions::default().toward(peer, route_mtu(peer));
        assert_eq!(
            opts.mtu_upper_bound,
            quic::udp_payload_bound(lo.min(65535), false),
            "discovery bound from the loopback MTU {lo}"
        );
    }
}

#[cfg(test)]
mod fill_tests {
    use super::*;
    use bytes::Bytes;
    use ferry_proto::wire::{Ack, RecordOp, WireRecord};

    fn ws(first: Seq) -> WriteSet {
        WriteSet {
            epoch: 1,
            first_seq: first,
            last_seq: first,
            timestamp_ns: 0,
            records: vec![WireRecord {
                seq: first,
                volume: 0,
                op: RecordOp::Write,
                offset: 0,
                length: 4096,
                data: Bytes::from(vec![1u8; 4096]),
            }],
        }
    }

    /// The regression of issue 18: on a full queue the session keeps the write-set it
    /// took from the reader (and reads no further) instead of dropping it; once acks
    /// free room it goes next, in order, and the session goes on without a gap.
    #[test]
    fn a_full_queue_keeps_the_write_set_and_takes_it_once_acked() {
        let one = ws(1).encoded_len() as u64;
        let mut sender = Sender::new(
            1,
            SenderConfig {
                max_queued_bytes: 3 * one,
                ..SenderConfig::default()
            },
            0,
        );
        let mut source: std::collections::VecDeque<WriteSet> = (1..=10).map(ws).collect();
        let mut pending = None;
        let next = |src: &mut std::collections::VecDeque<WriteSet>| src.pop_front().map(Ok);

        fill_queue(&mut sender, &mut pending, || next(&mut source)).unwrap();
        assert_eq!(
            sender.last_queued_seq(),
            3,
            "the queue holds three write-sets"
        );
        assert_eq!(
            pending.as_ref().map(|w| w.first_seq),
            Some(4),
            "the fourth waits"
        );
        assert_eq!(source.len(), 6, "nothing more is read while it waits");
        // Still full: the same write-set keeps waiting, nothing is read or lost.
        fill_queue(&mut sender, &mut pending, || next(&mut source)).unwrap();
        assert_eq!(pending.as_ref().map(|w| w.first_seq), Some(4));
        assert_eq!(source.len(), 6);

        while sender.poll_transmit().is_some() {}
        let ack = Ack {
            epoch: 1,
            received_durable_seq: 2,
            applied_seq: 2,
            received_seq: 2,
        };
        sender.on_ack(&ack).unwrap();
        fill_queue(&mut sender, &mut pending, || next(&mut source)).unwrap();
        assert_eq!(sender.last_queued_seq(), 5, "4 and 5 follow 3 in order");
        assert_eq!(pending.as_ref().map(|w| w.first_seq), Some(6));

        // An error from the reader ends the fill (and the session) as it was.
        let mut empty = Sender::new(1, SenderConfig::default(), 0);
        let mut none = None;
        let e = fill_queue(&mut empty, &mut none, || Some(Err(anyhow!("segment gone"))));
        assert!(e.unwrap_err().to_string().contains("segment gone"));
    }
}
