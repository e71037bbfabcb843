//! A ferryd node: [`run`] opens the metadata, recovers and runs the configured role
//! until shutdown. Start-up and replay are in [`recovery`], checkpoints in
//! [`checkpoint`], the roles in [`primary`] and [`standby`] (each with its control
//! handler), role changes in [`roles`], what both roles share in [`lifecycle`] and
//! [`requests`].
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

use crate::config::{Config, Role};
use crate::ops::metrics::{self, Metrics};

pub mod checkpoint;
pub mod lifecycle;
pub mod primary;
pub mod recovery;
pub mod requests;
pub mod roles;
pub mod standby;

use self::lifecycle::Observe;
pub use self::lifecycle::{Exit, Lifecycle, IDLE_TIMEOUT_ENV};
use self::primary::run_primary;
use self::standby::run_standby;

use self::recovery::{open_meta, recover};

/// Runs a node until `shutdown` resolves; then drains, checkpoints and returns.
pub async fn run(
    mut cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    let meta = tokio::task::block_in_place(|| open_meta(&mut cfg))?;
    let life = Arc::new(Lifecycle::default());
    // The metrics endpoint comes up before recovery: a long replay is then visible as
    // alive (/healthz 200) but not ready (/readyz 503). Dropping it stops it.
    let metrics = Metrics::new(&cfg.node.name, cfg.node.role);
    let endpoint = metrics::start(&cfg, metrics.clone()).await?;
    let obs = Observe {
        metrics,
        addr: endpoint.as_ref().map(|e| e.addr),
    };
    let rec = Arc::new(tokio::task::block_in_place(|| recover(&cfg, meta))?);
    let shutdown = life.until(shutdown);
    let result = match cfg.node.role {
        Role::Primary => run_primary(cfg, rec, obs, life.clone(), shutdown).await,
        Role::Standby => run_standby(cfg, rec, obs, life.clone(), shutdown).await,
    };
    drop(endpoint);
    result.map(|()| {
        if life.restart.load(Ordering::SeqCst) {
            Exit::Restart
        } else {
            Exit::Stopped
        }
    })
}
