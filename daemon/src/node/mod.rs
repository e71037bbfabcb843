//! A ferryd node: [`run`] opens the metadata, recovers and runs the configured role
//! until shutdown. Start-up and replay are in [`recovery`], checkpoints in
//! [`checkpoint`], the roles in [`primary`] and [`standby`] (each with its control
//! handler), role changes in [`roles`], what both roles share in [`lifecycle`] and
//! [`requests`], the status snapshot in [`status`], cluster membership (following a
//! newer primary, position probes) in [`members`], a standby's relaying to the
//! members whose `via` names it (cascading) in [`relay`].
//!
//! Start-up order matters for safety:
//! 1. metadata (refuses a config naming another cluster),
//! 2. base volumes (refuses a store smaller than configured),
//! 3. journal recovery (truncates a torn tail, refuses corruption before it),
//! 4. replay of every journaled record after the checkpoint onto the bases, fsync,
//!    new checkpoint — only then do the listeners open, so no client ever reads a base
//!    that lags an acknowledged write.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::ops::metrics::{self, Metrics};
use ferry_api::config::{Config, Role};

pub mod checkpoint;
pub mod lifecycle;
pub mod members;
pub mod primary;
pub mod recovery;
pub mod relay;
pub mod reload;
pub mod requests;
pub mod roles;
pub mod standby;
pub mod status;

use self::lifecycle::Observe;
pub use self::lifecycle::{Exit, Lifecycle, IDLE_TIMEOUT_ENV};
use self::primary::run_primary;
use self::standby::run_standby;

use self::recovery::{open_meta, recover};

/// Runs a node until `shutdown` resolves; then drains, checkpoints and returns.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    run_from(cfg, None, shutdown).await
}

/// [`run`] for a config read from `path`: `ferryctl reload` and SIGHUP re-read it
/// ([`reload`]).
pub async fn run_from(
    mut cfg: Config,
    path: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    crate::verify::set_digest(cfg.verify_digest().into());
    // As read from the file, before the metadata's overrides: what a reload compares.
    let file_cfg = cfg.clone();
    let meta = tokio::task::block_in_place(|| open_meta(&mut cfg))?;
    let life = Arc::new(Lifecycle::default());
    // The metrics endpoint comes up before recovery: a long replay is then visible as
    // alive (/healthz 200) but not ready (/readyz 503). Dropping it stops it.
    let metrics = Metrics::new(&cfg.node.name, cfg.node.role);
    let endpoint = metrics::EndpointSlot::new(
        metrics.clone(),
        metrics::start(&cfg, metrics.clone()).await?,
    );
    let obs = Observe {
        metrics,
        endpoint: endpoint.clone(),
    };
    let rec = Arc::new(tokio::task::block_in_place(|| recover(&cfg, meta))?);
    let shutdown = life.until(shutdown);
    let reload = path.map(|p| (p, file_cfg));
    let result = match cfg.node.role {
        Role::Primary => run_primary(cfg, rec, obs, life.clone(), reload, shutdown).await,
        Role::Standby => run_standby(cfg, rec, obs, life.clone(), reload, shutdown).await,
    };
    // Stops the metrics endpoint.
    let _ = endpoint.switch(None);
    result.map(|()| {
        if life.restart.load(Ordering::SeqCst) {
            Exit::Restart
        } else {
            Exit::Stopped
        }
    })
}
