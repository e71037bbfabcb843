//! One shipper's connection to its standby: the reconnect loop ([`run_target`]) and a
//! session on one QUIC connection (resume handshake, resync when the target is in
//! bitmap mode, streaming with the in-flight window, acks, heartbeats, handover).
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_journal::{now_ns, Journal, Seq};
use ferry_transport::quic::{self, Backoff, TlsMaterial, TransportOptions};
use ferry_transport::session::{self, LocalIdentity, Sender, SenderConfig};
use ferry_transport::wire::{Frame, Heartbeat, WriteSet};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::config::ReplicationMode;
use crate::ship::feed::Tail;
use crate::ship::reader::{read_write_sets, ShipSource};
use crate::ship::target::{SyncGate, TargetState};

/// Write-sets formed ahead of the network per target (bounded memory).
const READ_AHEAD_WRITE_SETS: usize = 16;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Everything a shipper needs, shared by all of them.
/// See [`ShipContext::outdated`].
pub type OutdatedHook = Arc<dyn Fn(u64, &str) + Send + Sync>;

pub struct ShipContext {
    pub journal: Arc<Journal>,
    pub tail: Arc<Tail>,
    pub local: LocalIdentity,
    pub tls: TlsMaterial,
    pub opts: TransportOptions,
    pub durable: watch::Receiver<Seq>,
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
}

pub(crate) async fn run_target(ctx: Arc<ShipContext>, t: Arc<TargetState>) {
    let mut backoff = Backoff::default();
    let addr: SocketAddr = match t.address.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(target = %t.name, "bad target address {}: {e}", t.address);
            return;
        }
    };
    loop {
        t.set_state("connecting");
        let started = Instant::now();
        match session(&ctx, &t, addr).await {
            Ok(()) => {}
            Err(e) => {
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
                if t.last_error.lock().as_deref() != Some(msg.as_str()) {
                    tracing::warn!(target = %t.name, address = %t.address, "replication session ended: {msg}");
                }
                *t.last_error.lock() = Some(msg);
            }
        }
        t.set_state("disconnected");
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
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
    let endpoint = quic::client_endpoint("0.0.0.0:0".parse()?)?;
    let opts = ctx.opts.clone().toward(addr, route_mtu(addr));
    let client = quic::client_config(&ctx.tls, &t.name, &opts)?;
    let conn = quic::connect(&endpoint, client, addr, &t.name).await?;
    let journal = ctx.journal.clone();
    let epoch = ctx.local.epoch;
    let mut local = ctx.local.clone();
    local.expected_peer_name = t.name.clone();
    // A target tracked in a dirty map resumes anywhere: the copy replaces what the
    // journal no longer holds.
    let resync = t.track.needs_resync();
    let full_resync: Mutex<Option<Seq>> = Mutex::new(None);
    let mut s = quic::primary_handshake(
        conn,
        &local,
        journal.durable_seq(),
        &ctx.opts,
        |neg, hello| {
            if let Some((fork, meta)) = &ctx.fork {
                let rejoined = meta.rejoined(&t.name, *fork).unwrap_or(false);
                if hello.resume_position > *fork && !rejoined {
                    // It holds writes of the old epoch this history does not have (the
                    // previous primary's unreplicated writes). Failback: resync it. The
                    // digest comparison at the start of the copy limits the copy to the
                    // regions either side changed since the fork.
                    if hello.resume_position > journal.durable_seq() {
                        return Err(session::HandshakeError::ForkDiverged(format!(
                            "node '{}' holds sequences up to {} (written after the fork at {fork}); \
                             this primary is at {}: it resyncs once this history passes that point",
                            t.name,
                            hello.resume_position,
                            journal.durable_seq()
                        )));
                    }
                    tracing::warn!(
                        target = %t.name,
                        fork,
                        resume = hello.resume_position,
                        "the rejoining node wrote after the fork: delta resync"
                    );
                    *full_resync.lock() = Some(hello.resume_position);
                    return session::plan_resync(
                        neg,
                        epoch,
                        hello.resume_position,
                        journal.durable_seq(),
                    );
                }
            }
            if resync {
                return session::plan_resync(
                    neg,
                    epoch,
                    hello.resume_position,
                    journal.durable_seq(),
                );
            }
            let oldest = journal.first_available_seq();
            match session::plan_resume(
                neg,
                epoch,
                hello.resume_position,
                oldest,
                journal.durable_seq(),
            ) {
                // The journal lost what it needs (released while it was away): a full
                // resync from the volumes instead of refusing it for good.
                Err(session::HandshakeError::ResyncRequired { resume, .. }) => {
                    *full_resync.lock() = Some(resume);
                    session::plan_resync(neg, epoch, hello.resume_position, journal.durable_seq())
                }
                r => r,
            }
        },
    )
    .await?;
    let full = full_resync.lock().take();
    if let Some(from) = full {
        tokio::task::block_in_place(|| crate::ship::catchup::switch_full(t, from))?;
    }
    let resync = resync || full.is_some();
    let resume = s.hello_ack.resume_seq;
    if let Some((fork, meta)) = &ctx.fork {
        meta.set_rejoined(&t.name, *fork)?;
    }
    tracing::info!(target = %t.name, address = %t.address, resume, "replication session established");
    *t.last_error.lock() = None;
    t.acked_seq.store(resume, Ordering::Release);
    t.applied_seq
        .store(s.peer_hello.resume_position.min(resume), Ordering::Release);
    // Reverts an unfinished resync to bitmap mode when this session ends.
    let _resync_guard = crate::ship::catchup::ResyncGuard(t);
    let resume = if resync {
        t.set_state("resyncing");
        crate::ship::catchup::resync_copy(t, &mut s, resume, epoch).await?
    } else {
        resume
    };
    t.set_state("streaming");
    ctx.sync.recompute();

    let (ws_tx, mut ws_rx) = mpsc::channel::<anyhow::Result<WriteSet>>(READ_AHEAD_WRITE_SETS);
    // Detached: the reader exits by itself once this session drops the receiver.
    {
        let src = ShipSource {
            journal: ctx.journal.clone(),
            tail: ctx.tail.clone(),
            durable: ctx.durable.clone(),
            rt: tokio::runtime::Handle::current(),
            linger: match t.mode {
                ReplicationMode::Async => ctx.async_linger,
                ReplicationMode::Sync => Duration::ZERO,
            },
        };
        std::thread::Builder::new()
            .name(format!("ferry-ship-{}", t.name))
            .spawn(move || read_write_sets(src, resume + 1, epoch, ws_tx))
            .context("spawning the journal reader thread")?;
    }

    let mut sender = Sender::new(epoch, SenderConfig::default(), resume);
    let mut durable_at_last_ack = ctx.journal.durable_seq();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut pending: Option<WriteSet> = None;
    loop {
        // Feed the window from the read-ahead, then transmit what it allows.
        loop {
            if pending.is_none() {
                match ws_rx.try_recv() {
                    Ok(ws) => pending = Some(ws?),
                    Err(_) => break,
                }
            }
            let Some(ws) = pending.take() else { break };
            match sender.push(ws) {
                Ok(()) => {}
                Err(session::SenderError::QueueFull { .. }) => break,
                Err(e) => bail!("shipping: {e}"),
            }
        }
        while let Some(ws) = sender.poll_transmit() {
            s.data.send_write_set(&ws).await?;
        }
        tokio::select! {
            frame = s.control_recv.recv_frame() => {
                match frame? {
                    Some(Frame::Ack(ack)) => {
                        let out = sender.on_ack(&ack).map_err(|e| anyhow!("standby ack: {e}"))?;
                        t.acked_seq.store(out.durable_seq, Ordering::Release);
                        t.applied_seq.store(out.applied_seq, Ordering::Release);
                        if crate::ship::catchup::resync_done(t, out.durable_seq) {
                            tokio::task::block_in_place(|| crate::ship::catchup::complete_resync(t));
                        }
                        // Caught up = this ack covers everything that was durable when
                        // the previous ack arrived (reachable under continuous writes,
                        // unlike "equals the head").
                        let caught_up = out.durable_seq >= durable_at_last_ack;
                        durable_at_last_ack = ctx.journal.durable_seq();
                        if t.degraded.load(Ordering::Acquire) && caught_up {
                            t.degraded.store(false, Ordering::Release);
                            tracing::info!(target = %t.name, "sync target caught up: synchronous again");
                        }
                        ctx.sync.recompute();
                    }
                    Some(Frame::Heartbeat(hb)) => {
                        if hb.echo_ns != 0 {
                            let rtt = now_ns().saturating_sub(hb.echo_ns) / 1000;
                            t.rtt_us.store(rtt, Ordering::Relaxed);
                        }
                    }
                    Some(Frame::VerifyResult(v)) => {
                        let waiter = t.verify_waiters.lock().remove(&(v.id, v.volume));
                        if let Some(w) = waiter {
                            let _ = w.send(if v.ok {
                                Ok(v.body)
                            } else {
                                Err(String::from_utf8_lossy(&v.body).into_owned())
                            });
                        }
                    }
                    Some(Frame::HandoverAck(a)) => {
                        let waiting = t.handover.lock().take();
                        match waiting {
                            Some((seq, tx)) if seq == a.seq => {
                                let _ = tx.send(Ok(a.new_epoch));
                                // The standby restarts as the primary: this session ends.
                                return Ok(());
                            }
                            _ => bail!("unexpected HandoverAck at {} (epoch {})", a.seq, a.new_epoch),
                        }
                    }
                    Some(Frame::Error(e)) => {
                        if let Some((_, tx)) = t.handover.lock().take() {
                            let _ = tx.send(Err(anyhow!("standby refused the handover: {:?}: {}", e.code, e.reason)));
                        }
                        bail!("standby refused: {:?}: {}", e.code, e.reason)
                    }
                    Some(other) => bail!("unexpected {:?} frame on the control stream", other.frame_type()),
                    None => bail!("standby closed the control stream"),
                }
            }
            _ = t.handover_kick.notified() => {
                let seq = t.handover.lock().as_ref().map(|(seq, _)| *seq);
                if let Some(seq) = seq {
                    // Everything up to `seq` went out before (the data stream is
                    // ordered and the primary stopped writing): the standby checks it.
                    s.control_send.send_frame(&Frame::Handover(ferry_transport::wire::Handover { epoch, seq })).await?;
                    tracing::warn!(target = %t.name, seq, "handover sent: the standby is to take over");
                }
            }
            ws = ws_rx.recv(), if pending.is_none() => {
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
                if t.track.mode() == crate::ship::target::Mode::Bitmap || t.track.resync_abandoned() {
                    bail!("switched to bitmap mode: the journal no longer keeps this target's records");
                }
                s.control_send
                    .send_frame(&Frame::Heartbeat(Heartbeat {
                        epoch,
                        sent_at_ns: now_ns(),
                        echo_ns: 0,
                        last_seq: ctx.journal.durable_seq(),
                    }))
                    .await?;
            }
        }
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

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
