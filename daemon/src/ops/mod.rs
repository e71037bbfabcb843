//! Operating the node: control socket, audit log, metrics endpoint, systemd notifications.
pub mod audit;
pub mod control;
pub mod metrics;
pub mod sdnotify;
