//! Primary side of replication: one shipper per target.
//!
//! Each shipper owns a QUIC connection to its standby (the primary dials; see
//! proto/PROTOCOL.md). Per session:
//! * the **session task** cuts write-sets (at every seal, or at
//!   [`MAX_WRITE_SET_BYTES`](reader::MAX_WRITE_SET_BYTES)) from the in-memory tail of recent records
//!   (`reader::ShipReader`) while the target is current; a target behind the tail
//!   gets a **reader thread** that reads journal segments with a `JournalReader` and
//!   hands write-sets over a bounded channel until it is caught up;
//! * the session task feeds them through the sans-IO `session::Sender` (in-flight
//!   window; a queue bounded in write-sets and in bytes, whose backpressure stops the
//!   reader, so memory stays bounded however far the target lags), sends them on the
//!   data stream, and applies the standby's acks.
//!
//! After any error the session is dropped and rebuilt from the standby's durable
//! position (reconnect with backoff): nothing is resent from memory that the standby
//! does not ask for, and nothing is skipped.
//!
//! Each target's WAN settings (`compress`, `max_bandwidth`) and counters live in its
//! [`wan::Wan`]: data frames go packed to a V3 standby and under the target's cap.
//!
//! [`SeqIndex`] records (sequence, cumulative bytes, primary timestamp) for recent
//! journal records so each target's lag can be given in bytes and seconds; the
//! [`SyncGate`] makes client writes wait for sync targets; `pace` makes their replies
//! wait while a target with `max_lag_seconds` lags more than that.
//!
//! The targets can change while the primary runs (`ferryctl reload`):
//! [`Replication::add_target`] and [`Replication::remove_target`] start and stop one
//! shipper, and every list of targets (the sync gate, the journal's release floor,
//! the overflow monitor and marking hook, status) follows.
pub mod catchup;
pub mod dirty;
pub mod feed;
pub mod pace;
pub mod reader;
pub mod records;
pub mod session;
pub mod target;
pub mod wan;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context};
use ferry_api::status::TargetStatus;
use ferry_journal::{now_ns, Seq};
use ferry_proto::session::LocalIdentity;
use ferry_proto::wire::{self, VolumeGeometry};
use ferry_transport::quic::TlsMaterial;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::base::Base;
use ferry_api::config::{Config, TargetConfig};

pub use self::feed::{SeqIndex, ShipFeed, Tail};
pub use self::records::journal_record;
pub use self::session::{OutdatedHook, ShipContext};
pub use self::target::{SyncGate, TargetState};

/// The targets of a primary, shared by everything that follows them; a reload
/// replaces the list (never a target in place).
pub type TargetList = Arc<parking_lot::RwLock<Vec<Arc<TargetState>>>>;

/// Replication on a primary: target states, the sync gate, the shippers.
pub struct Replication {
    pub targets: TargetList,
    pub sync: Arc<SyncGate>,
    pub index: Arc<SeqIndex>,
    /// What starting and stopping one shipper needs, once the shippers run.
    running: OnceLock<Running>,
}

/// The shippers' shared context and one stop switch per running shipper.
struct Running {
    ctx: Arc<ShipContext>,
    shared: Arc<target::Shared>,
    feed: Arc<ShipFeed>,
    shutdown: watch::Receiver<bool>,
    shippers: parking_lot::Mutex<HashMap<String, Shipper>>,
}

struct Shipper {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Replication {
    pub fn new(targets: Vec<Arc<TargetState>>, sync: Arc<SyncGate>, index: Arc<SeqIndex>) -> Self {
        Replication {
            targets: Arc::new(parking_lot::RwLock::new(targets)),
            sync,
            index,
            running: OnceLock::new(),
        }
    }

    /// The targets now configured.
    pub fn targets(&self) -> Vec<Arc<TargetState>> {
        self.targets.read().clone()
    }

    /// The journal may release only what every target holds durably (or, for a
    /// target in bitmap mode, what its dirty map covers durably).
    pub fn release_floor(&self) -> Seq {
        ferry_proto::target::release_floor(self.targets.read().iter().map(|t| t.floor()))
    }

    /// Starts one shipper per target (each stops with `shutdown` or its removal).
    pub fn start(
        &self,
        ctx: Arc<ShipContext>,
        shared: Arc<target::Shared>,
        feed: Arc<ShipFeed>,
        shutdown: watch::Receiver<bool>,
    ) {
        let running = Running {
            ctx,
            shared,
            feed,
            shutdown,
            shippers: Default::default(),
        };
        for t in self.targets() {
            running.spawn(t);
        }
        let _ = self.running.set(running);
    }

    /// A reload's new target (or a target in a new mode, replacing the old one, whose
    /// persisted maps it takes over): assumed at `acked` until its Hello says — a
    /// standby that holds nothing yet is resynced like any new target — it holds the
    /// journal from there on and starts shipping.
    pub async fn add_target(&self, t: &TargetConfig, acked: Seq) -> anyhow::Result<()> {
        let running = self.running()?;
        if let Some(old) = self.find(&t.name) {
            self.check_replaceable(&t.name)?;
            running.stop(&old.name).await;
        }
        let state = Arc::new(TargetState::new(t, acked, false));
        let shared = running.shared.clone();
        let load = state.clone();
        tokio::task::spawn_blocking(move || catchup::add_target(&shared, &load)).await??;
        self.replace(&t.name, Some(state.clone()), running);
        running.spawn(state);
        Ok(())
    }

    /// A reload's removed target: its shipper stops, it no longer holds the journal
    /// or client writes, its dirty maps are deleted.
    pub async fn remove_target(&self, name: &str) -> anyhow::Result<()> {
        let running = self.running()?;
        self.replace(name, None, running);
        running.stop(name).await;
        let shared = running.shared.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || catchup::forget_target(&shared, &name)).await?
    }

    /// Whether target `name` can be replaced live (a new mode or address): its live
    /// marks would be lost in the swap, so only a streaming target can.
    pub fn check_replaceable(&self, name: &str) -> anyhow::Result<()> {
        if let Some(old) = self.find(name) {
            let tracking = old.track_status(&old.snapshot()).tracking;
            if tracking != "streaming" {
                bail!(
                    "reload refused, nothing was changed: target '{name}' is in {tracking} \
                     mode; its mode or address can change once it streams again"
                );
            }
        }
        Ok(())
    }

    fn running(&self) -> anyhow::Result<&Running> {
        self.running
            .get()
            .ok_or_else(|| anyhow!("replication has not started yet"))
    }

    fn find(&self, name: &str) -> Option<Arc<TargetState>> {
        self.targets.read().iter().find(|t| t.name == name).cloned()
    }

    /// Puts `with` in the place of target `name` (appended if new; dropped if
    /// `None`) in every list that follows the targets.
    fn replace(&self, name: &str, with: Option<Arc<TargetState>>, running: &Running) {
        let list = {
            let mut list = self.targets.write();
            match (list.iter().position(|t| t.name == name), with) {
                (Some(i), Some(t)) => list[i] = t,
                (Some(i), None) => {
                    list.remove(i);
                }
                (None, Some(t)) => list.push(t),
                (None, None) => {}
            }
            list.clone()
        };
        running.feed.track(list.clone());
        self.sync.set_targets(list);
    }

    /// One status row per target (the `targets` of the node status), each from one
    /// snapshot of the target's lifecycle.
    pub fn status(&self) -> Vec<TargetStatus> {
        let now = now_ns();
        self.targets()
            .iter()
            .map(|t| {
                let snap = t.snapshot();
                let (lag_bytes, lag_seconds) = self.index.lag_after(snap.acked_seq, now);
                TargetStatus {
                    name: t.name.clone(),
                    address: t.address.clone(),
                    mode: t.mode.to_string(),
                    effective_mode: snap.effective_mode,
                    state: snap.phase.as_str().to_string(),
                    acked_seq: snap.acked_seq,
                    applied_seq: snap.applied_seq,
                    lag_bytes,
                    lag_seconds,
                    rtt_us: t.rtt_us.load(Ordering::Relaxed),
                    last_error: snap.last_error.clone(),
                    sync_loss_at: snap.sync_loss_at,
                    writes_blocked: snap.writes_blocked,
                    track: t.track_status(&snap),
                    wire: t.wan.status(),
                }
            })
            .collect()
    }
}

pub fn geometry(bases: &[Arc<Base>]) -> Vec<VolumeGeometry> {
    bases
        .iter()
        .map(|b| VolumeGeometry {
            id: b.id,
            name: b.name.clone(),
            size_bytes: b.size,
            block_size: 4096,
        })
        .collect()
}

pub fn load_tls(cfg: &Config) -> anyhow::Result<TlsMaterial> {
    let tls = cfg
        .tls
        .as_ref()
        .ok_or_else(|| anyhow!("replication needs a [tls] section"))?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let node = ferry_transport::pki::NodeIdentity {
        name: cfg.node.name.clone(),
        cert_pem: read(&tls.cert)?,
        key_pem: read(&tls.key)?,
    };
    let material = TlsMaterial::from_pem(&read(&tls.ca)?, &node)
        .with_context(|| format!("loading TLS material of node '{}'", cfg.node.name))?;
    check_suite(tls, material.suite()?)?;
    Ok(material)
}

/// `[tls] suite` must say what the cluster CA's key makes the node speak: a
/// mismatch is a node set up for the other kind of cluster.
fn check_suite(
    tls: &ferry_api::config::TlsConfig,
    ca: ferry_transport::pki::TlsSuite,
) -> anyhow::Result<()> {
    use ferry_api::config::TlsSuiteConfig;
    use ferry_transport::pki::TlsSuite;
    let (kind, init) = match ca {
        TlsSuite::Standard => (TlsSuiteConfig::Standard, "ECDSA (ferryctl init)"),
        TlsSuite::Gm => (TlsSuiteConfig::Gm, "SM2 (ferryctl init --crypto gm)"),
    };
    if tls.suite != kind {
        bail!(
            "[tls] suite = \"{}\" but the cluster CA {} is {init}: its nodes speak suite \"{}\"",
            tls.suite.name(),
            tls.ca.display(),
            kind.name()
        );
    }
    Ok(())
}

impl Running {
    /// Starts the shipper of `t`; it stops when the node shuts down or the target is
    /// removed.
    fn spawn(&self, t: Arc<TargetState>) {
        let (stop_tx, mut stop) = watch::channel(false);
        let mut shutdown = self.shutdown.clone();
        let ctx = self.ctx.clone();
        let name = t.name.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = session::run_target(ctx, t.clone()) => {}
                _ = shutdown.wait_for(|s| *s) => t.update(|lc| lc.stopped()),
                _ = stop.wait_for(|s| *s) => t.update(|lc| lc.stopped()),
            }
        });
        self.shippers.lock().insert(
            name,
            Shipper {
                stop: stop_tx,
                task,
            },
        );
    }

    /// Stops the shipper of target `name` and waits until it has (its session and
    /// its connection are dropped).
    async fn stop(&self, name: &str) {
        let shipper = self.shippers.lock().remove(name);
        if let Some(s) = shipper {
            let _ = s.stop.send(true);
            let _ = s.task.await;
        }
    }
}

/// The configured targets, assumed at `start_acked` until their Hellos say.
/// `away_since_fork(name)`: on a primary by promotion, the target has not rejoined
/// since the fork; it starts degraded (see `TargetLifecycle::new`).
pub fn target_states(
    cfg: &Config,
    start_acked: Seq,
    away_since_fork: impl Fn(&str) -> bool,
) -> Vec<Arc<TargetState>> {
    // With a `[cluster]`, every other member too (`Config::ship_targets`).
    cfg.ship_targets()
        .iter()
        .map(|t| {
            let away = away_since_fork(&t.name);
            Arc::new(TargetState::new(t, start_acked, away))
        })
        .collect()
}

pub fn local_identity(
    cfg: &Config,
    node_id: [u8; 16],
    epoch: u64,
    role: wire::Role,
    bases: &[Arc<Base>],
    expected_peer: &str,
) -> LocalIdentity {
    let (min_version, max_version) = LocalIdentity::supported_versions();
    LocalIdentity {
        cluster_id: cfg.cluster_id(),
        node_id,
        node_name: cfg.node.name.clone(),
        role,
        epoch,
        min_version,
        max_version,
        volumes: geometry(bases),
        expected_peer_name: expected_peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::target::tests::target;
    use ferry_api::config::ReplicationMode;

    /// The journal keeps what the furthest-behind target needs, a bitmap-mode target
    /// only what its maps do not cover durably yet; status shows each target's modes.
    #[test]
    fn the_release_floor_and_status_follow_every_target() {
        let a = target("a", ReplicationMode::Sync, 10);
        let b = target("b", ReplicationMode::Async, 20);
        let r = Replication::new(
            vec![a.clone(), b.clone()],
            SyncGate::new(
                vec![a.clone(), b.clone()],
                std::time::Duration::from_secs(1),
                None,
            ),
            Arc::new(SeqIndex::default()),
        );
        assert_eq!(r.release_floor(), 10);
        // a is switched to bitmap mode, its marks durable up to 30 (which degrades it).
        a.update(|lc| {
            lc.begin_overflow_switch();
            lc.bitmap_entered(30);
        });
        assert_eq!(r.release_floor(), 20, "a's marks cover up to 30");
        let st = serde_json::to_value(r.status()).unwrap();
        assert_eq!(st[0]["name"], "a");
        assert_eq!(st[0]["state"], "connecting");
        assert_eq!(st[0]["effective_mode"], "async (degraded)");
        assert_eq!(st[0]["tracking"], "bitmap");
        assert_eq!(st[0]["acked_seq"], 10);
        assert_eq!(st[1]["effective_mode"], "async");
        assert_eq!(st[1]["tracking"], "streaming");
        let none = Replication::new(
            vec![],
            SyncGate::new(vec![], std::time::Duration::from_secs(1), None),
            Arc::new(SeqIndex::default()),
        );
        assert_eq!(none.release_floor(), Seq::MAX);
    }
}
