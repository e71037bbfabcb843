//! What both roles share while running: the node's exit and restart request
//! ([`Exit`], [`Lifecycle`]), readiness and stopping announcements with the systemd
//! watchdog ([`Observe`]), the control socket, and the shutdown steps both roles take.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_journal::{Journal, Seq};

use crate::ops::control;
use crate::ops::metrics::{EndpointSlot, Metrics};
use crate::ops::sdnotify::{self, State};
use ferry_api::config::Config;

use crate::node::checkpoint::Checkpointer;
use crate::node::recovery::Recovered;

/// The control socket, bound early (so a second ferryd on the same config is refused
/// before it touches anything) and served once the role's status handler exists.
pub(crate) struct ControlSocket {
    pub(crate) listener: tokio::net::UnixListener,
    /// The policy in force: a reload replaces it.
    pub(crate) access: control::SharedAccess,
    pub(crate) audit: Arc<crate::ops::audit::AuditLog>,
}

impl ControlSocket {
    pub(crate) async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let access = control::Access::from_config(cfg.access.as_ref());
        let audit = Arc::new(crate::ops::audit::AuditLog::open_with(
            &cfg.audit_log_path(),
            crate::ops::audit::AuditOptions::for_node(cfg)?,
        )?);
        let listener = control::bind(&cfg.control.socket, &access).await?;
        Ok(ControlSocket {
            listener,
            access: access.into(),
            audit,
        })
    }

    pub(crate) fn serve(
        self,
        cfg: &Config,
        handler: control::Handler,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(control::serve(
            self.listener,
            cfg.control.socket.clone(),
            handler,
            self.access,
            Some(self.audit),
            stop,
        ))
    }
}

/// Waits (bounded, 10 s) for a shutdown step; says so if it gives up, since the
/// final checkpoint then covers less (nothing is lost: restart replays the journal).
pub(crate) fn wait_until(what: &str, done: impl Fn() -> bool) {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                tracing::warn!(
                    "gave up waiting for {what} after 10 s; restart will replay the rest"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// How a node's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down (signal): exit.
    Stopped,
    /// A role change was recorded: start again (the binary re-executes itself, so the
    /// new role starts from a clean recovery, like after a crash).
    Restart,
}

/// Lets a control request end the run for a role change.
#[derive(Default)]
pub struct Lifecycle {
    pub(crate) restart: AtomicBool,
    pub(crate) notify: tokio::sync::Notify,
}

impl Lifecycle {
    pub fn request_restart(&self) {
        self.restart.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub(crate) async fn until(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            _ = self.notify.notified() => tracing::info!("role change recorded: restarting in the new role"),
        }
    }
}

/// The node's metrics and their endpoint (serving when `[metrics]` is configured; a
/// reload may move it).
pub(crate) struct Observe {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) endpoint: Arc<EndpointSlot>,
}

impl Observe {
    /// Marks the node ready everywhere at once: `/readyz`, the one stable stdout line
    /// scripts and tests wait for, and systemd (READY=1, then watchdog pings).
    pub(crate) fn announce_ready(
        &self,
        line: &str,
        status: &str,
        journal: Arc<Journal>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.metrics.set_ready(true);
        println!("ferryd ready: {line}{}", self.ready_suffix());
        sd_notify(&[State::Ready, State::Status(status)]);
        spawn_watchdog(journal)
    }

    /// The start of an orderly stop, told to systemd and `/readyz`.
    pub(crate) fn announce_stopping(&self, watchdog: Option<tokio::task::JoinHandle<()>>) {
        sd_notify(&[State::Stopping, State::Status("draining")]);
        if let Some(w) = watchdog {
            w.abort();
        }
        self.metrics.set_ready(false);
    }

    /// The first half of the shutdown both roles share: waits for the signal, tells
    /// systemd and `/readyz`, stops the listeners, and waits for the role's server
    /// (`server`, named `what` in logs) and the control socket to finish.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn stop_serving<E: std::fmt::Display>(
        &self,
        shutdown: impl std::future::Future<Output = ()>,
        watchdog: Option<tokio::task::JoinHandle<()>>,
        stopping: &str,
        stop_tx: &tokio::sync::watch::Sender<bool>,
        what: &str,
        server: tokio::task::JoinHandle<Result<(), E>>,
        control_task: tokio::task::JoinHandle<()>,
    ) {
        shutdown.await;
        self.announce_stopping(watchdog);
        tracing::info!("{stopping}");
        let _ = stop_tx.send(true);
        match server.await {
            Ok(Err(e)) => tracing::warn!("{what} stopped with an error: {e:#}"),
            Err(e) => tracing::warn!("{what} task: {e}"),
            Ok(Ok(())) => {}
        }
        let _ = control_task.await;
    }

    /// ` metrics=ADDR` for the ready line (empty without a metrics endpoint).
    pub(crate) fn ready_suffix(&self) -> String {
        self.endpoint
            .addr()
            .map(|a| format!(" metrics={a}"))
            .unwrap_or_default()
    }
}

/// Testing hook: QUIC idle timeout in milliseconds (a test that SIGKILLs a standby
/// need not wait 10 s for the primary to notice). Never set in production.
pub const IDLE_TIMEOUT_ENV: &str = "FERRYD_TEST_IDLE_TIMEOUT_MS";

pub(crate) fn transport_options() -> ferry_transport::quic::TransportOptions {
    let mut o = ferry_transport::quic::TransportOptions::default();
    if let Some(ms) = std::env::var(IDLE_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        o.idle_timeout = Duration::from_millis(ms);
    }
    o
}

/// What differs between the shippers of a primary and those of a relay.
pub(crate) struct SenderRole {
    /// Called when a target shows a newer epoch.
    pub outdated: crate::ship::session::OutdatedHook,
    /// A promoted primary's fork point (`None` on a relay).
    pub fork: Option<(Seq, Arc<crate::store::meta::Meta>)>,
    /// Where the crash horizons are kept (a primary; `None` on a relay).
    pub horizons: Option<Arc<crate::store::meta::Meta>>,
    /// Whether sync targets are asked for received acks.
    pub received_acks: bool,
    /// Why no session may start now (a relay's own replica being resynced).
    pub hold: Option<crate::ship::session::HoldFn>,
}

/// The shippers' context of a node that sends, a primary or a relay: it presents
/// itself in the primary role of the handshake, in its own epoch, and ships from
/// its journal through `feed`.
pub(crate) fn sender_context(
    cfg: &Config,
    rec: &Recovered,
    feed: &crate::ship::ShipFeed,
    sync: &Arc<crate::ship::SyncGate>,
    role: SenderRole,
) -> anyhow::Result<Arc<crate::ship::ShipContext>> {
    use crate::ship as replication;
    Ok(Arc::new(crate::ship::ShipContext {
        journal: rec.journal.clone(),
        tail: feed.tail.clone(),
        local: replication::local_identity(
            cfg,
            rec.meta.node_id,
            rec.meta.epoch()?,
            ferry_proto::wire::Role::Primary,
            &rec.bases,
            "",
        ),
        tls: replication::load_tls(cfg)?,
        opts: transport_options(),
        durable: feed.durable(),
        ready: feed.ready(),
        relays: cfg
            .cluster
            .iter()
            .flat_map(|c| c.nodes.iter().filter_map(|n| n.via.clone()))
            .collect(),
        async_linger: Duration::from_micros(
            cfg.replication.as_ref().map_or(0, |r| r.async_linger_us),
        ),
        sync: sync.clone(),
        outdated: role.outdated,
        fork: role.fork,
        horizons: role.horizons,
        received_acks: role.received_acks,
        hold: role.hold,
    }))
}

/// What the overflow monitor and the shippers share, on a primary or a relay; only
/// where the applied position comes from differs.
pub(crate) fn ship_shared(
    cfg: &Config,
    rec: &Recovered,
    applied: Arc<dyn Fn() -> Seq + Send + Sync>,
    sync: &Arc<crate::ship::SyncGate>,
) -> crate::ship::target::Shared {
    crate::ship::target::Shared {
        journal: rec.journal.clone(),
        bases: rec.bases.clone(),
        applied,
        checkpoint: {
            let m = rec.meta.clone();
            Arc::new(move || m.checkpoint().unwrap_or(0))
        },
        sync: Some(sync.clone()),
        dir: crate::ship::catchup::dirty_dir(cfg),
        region_size: crate::ship::dirty::DEFAULT_REGION_SIZE,
    }
}

/// The last step of both roles' shutdown: the checkpointer's final round fsyncs the
/// bases and records what they hold.
pub(crate) async fn finish_shutdown(ckpt: Checkpointer, rec: &Recovered) -> anyhow::Result<()> {
    ckpt.finish().await;
    tracing::info!(
        checkpoint = rec.meta.checkpoint().unwrap_or(0),
        "shutdown complete"
    );
    Ok(())
}

/// Tells systemd (Type=notify); failures are logged, never fatal.
pub(crate) fn sd_notify(states: &[State]) {
    if let Err(e) = sdnotify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Pings systemd's watchdog from the runtime (a stalled runtime misses it) while the
/// journal is alive. `None` when `WatchdogSec=` is off.
pub(crate) fn spawn_watchdog(journal: Arc<Journal>) -> Option<tokio::task::JoinHandle<()>> {
    let every = sdnotify::watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // A stall must not be followed by a burst of pings.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = JournalProbe::default();
        loop {
            tick.tick().await;
            if probe.alive(&journal) {
                sd_notify(&[State::Watchdog]);
            } else {
                tracing::error!(
                    durable_seq = journal.durable_seq(),
                    last_seq = journal.last_seq(),
                    "journal made no progress with writes pending for two watchdog periods: \
                     withholding the watchdog ping"
                );
            }
        }
    }))
}

/// Journal liveness for the watchdog: idle is alive, progress is alive, and a journal
/// that is nearly full is waiting for a checkpoint or a standby (normal, not a hang).
/// Only "records pending, nothing made durable, room to write" for two ticks is a hang.
#[derive(Default)]
pub(crate) struct JournalProbe {
    pub(crate) last_durable: Seq,
    pub(crate) stuck_ticks: u32,
}

impl JournalProbe {
    pub(crate) fn alive(&mut self, j: &Journal) -> bool {
        let durable = j.durable_seq();
        let idle = j.last_seq() == durable;
        let nearly_full = j.used_bytes() * 10 >= j.capacity_bytes() * 9;
        if idle || nearly_full || durable != self.last_durable {
            self.stuck_ticks = 0;
        } else {
            self.stuck_ticks += 1;
        }
        self.last_durable = durable;
        self.stuck_ticks < 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_names_the_metrics_address_when_there_is_one() {
        let metrics = Metrics::new("n", ferry_api::config::Role::Primary);
        let none = Observe {
            metrics: metrics.clone(),
            endpoint: EndpointSlot::new(metrics.clone(), None),
        };
        assert_eq!(none.ready_suffix(), "");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_rt = rt.enter();
        let listener = rt
            .block_on(crate::ops::metrics::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = crate::ops::metrics::Endpoint::serve(listener, metrics.clone()).unwrap();
        let some = Observe {
            metrics: metrics.clone(),
            endpoint: EndpointSlot::new(metrics, Some(endpoint)),
        };
        assert_eq!(some.ready_suffix(), format!(" metrics={addr}"));
    }
}
