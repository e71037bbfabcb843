//! The node's status snapshot ([`NodeStatus`]): what it is read from
//! ([`StatusSource`]) and [`StatusSource::snapshot`], the one function that builds it,
//! for the control socket's `status` request and the metrics endpoint alike.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_api::status::{
    JournalStatus, NbdStatus, NodeStatus, OutdatedStatus, PitStatus, PrimaryStatus, ReplicaState,
    RoleStatus, StandbyStatus, UpstreamStatus, VolumeStatus,
};
use ferry_journal::Journal;

use crate::ops::metrics::NodeSource;
use crate::pit::PitExports;
use crate::primary::volume::Group;
use crate::replica::applier::Applier;
use crate::replica::standby::Standby;
use crate::ship::Replication;
use crate::store::base::{storage_fault, Base};
use crate::store::meta::Meta;
use ferry_api::config::Config;

/// What a running node's status is read from.
pub(crate) struct StatusSource {
    pub(crate) node: String,
    pub(crate) meta: Arc<Meta>,
    pub(crate) journal: Arc<Journal>,
    /// The configured volumes (they do not change while the node runs).
    pub(crate) volumes: Vec<VolumeStatus>,
    /// Their stores: a failed fsync of one stops the volume group (shown as failed).
    pub(crate) bases: Vec<Arc<Base>>,
    /// Every `[cluster]` member, this node included (empty without membership).
    pub(crate) members: Vec<ferry_api::config::ClusterNode>,
    pub(crate) role: RoleSource,
}

/// The role's live state.
pub(crate) enum RoleSource {
    Primary {
        group: Arc<Group>,
        replication: Option<Arc<Replication>>,
        archives: Arc<crate::archive::Archives>,
        /// The bound NBD address.
        nbd: SocketAddr,
    },
    Standby {
        standby: Arc<Standby>,
        /// Its point-in-time store and resync transition.
        applier: Arc<Applier>,
        exports: Option<Arc<PitExports>>,
        /// The shippers to the members it relays to (cascading), if any.
        relay: Option<Arc<Replication>>,
    },
}

impl StatusSource {
    /// The node's status now.
    pub(crate) fn snapshot(&self) -> NodeStatus {
        let (j, meta) = (&self.journal, &self.meta);
        let (last_seq, applied_seq, targets, role) = match &self.role {
            RoleSource::Primary {
                group,
                replication,
                archives,
                nbd,
            } => (
                j.last_seq(),
                group.applied_seq(),
                replication.as_ref().map_or_else(Vec::new, |r| r.status()),
                RoleStatus::Primary(PrimaryStatus {
                    archives: archives.status(j.durable_seq()),
                    ..primary_status(meta, group, &self.bases, *nbd)
                }),
            ),
            // A standby's journal holds what it received: its end is what is durable.
            RoleSource::Standby {
                standby,
                applier,
                exports,
                relay,
            } => (
                j.durable_seq(),
                standby.applied_seq(),
                relay.as_ref().map_or_else(Vec::new, |r| r.status()),
                RoleStatus::Standby(Box::new(standby_status(
                    standby,
                    applier,
                    exports.as_deref(),
                ))),
            ),
        };
        let epoch = meta.epoch().unwrap_or(0);
        let cluster = crate::node::members::cluster_view(
            &self.members,
            &self.node,
            (role.name(), epoch),
            |name| self.seen(name, &targets),
        );
        NodeStatus {
            node: self.node.clone(),
            epoch,
            cluster,
            last_seq,
            durable_seq: j.durable_seq(),
            applied_seq,
            checkpoint_seq: meta.checkpoint().unwrap_or(0),
            journal: journal_status(j),
            volumes: self.volumes_now(),
            targets,
            role,
        }
    }

    /// What this node knows of member `name`: a target it ships to (primary), or the
    /// primary it follows (standby).
    fn seen(
        &self,
        name: &str,
        targets: &[ferry_api::status::TargetStatus],
    ) -> Option<crate::node::members::Seen> {
        use crate::node::members::Seen;
        let relayed_by = || {
            let via = self.members.iter().find(|m| m.name == name)?.via.clone()?;
            Some(Seen {
                role: "standby",
                connected: false,
                state: format!("relayed by {via}"),
            })
        };
        match &self.role {
            RoleSource::Primary { .. } => targets
                .iter()
                .find(|t| t.name == name)
                .map(|t| Seen {
                    role: "standby",
                    connected: matches!(t.state.as_str(), "streaming" | "resyncing"),
                    state: t.state.clone(),
                })
                // A member another relays to (cascading): not this primary's session.
                .or_else(relayed_by),
            RoleSource::Standby { standby, .. } if standby.state.primary == name => Some(Seen {
                role: "primary",
                connected: standby.state.connected.lock().is_some(),
                state: "following".into(),
            }),
            // A member this standby relays to (cascading).
            RoleSource::Standby { .. } => targets.iter().find(|t| t.name == name).map(|t| Seen {
                role: "standby",
                connected: matches!(t.state.as_str(), "streaming" | "resyncing"),
                state: format!("relayed ({})", t.state),
            }),
        }
    }

    /// The configured volumes, with a primary's effective cache modes.
    fn volumes_now(&self) -> Vec<VolumeStatus> {
        let RoleSource::Primary { group, .. } = &self.role else {
            return self.volumes.clone();
        };
        let modes = group.cache_modes();
        let mut volumes = self.volumes.clone();
        for v in &mut volumes {
            if let Some((_, _, now)) = modes.iter().find(|(n, _, _)| *n == v.name) {
                v.cache_effective = Some(now.name().into());
            }
        }
        volumes
    }

    /// The `status` request's answer.
    pub(crate) fn respond(&self) -> ferry_api::control::Response {
        match serde_json::to_value(self.snapshot()) {
            Ok(v) => ferry_api::control::Response::ok(v),
            // Only a path that is not UTF-8 can fail to serialise.
            Err(e) => ferry_api::control::Response::err(format!("status: {e}")),
        }
    }

    /// What the metrics endpoint reads: this snapshot, and a primary's write path.
    pub(crate) fn metrics_source(self: &Arc<Self>) -> NodeSource {
        let src = self.clone();
        NodeSource {
            status: Arc::new(move || src.snapshot()),
            frontend: match &self.role {
                RoleSource::Primary { group, .. } => Some(group.frontend.clone()),
                RoleSource::Standby { .. } => None,
            },
        }
    }
}

/// The members `status` lists: `[cluster]` as configured.
pub(crate) fn members(cfg: &Config) -> Vec<ferry_api::config::ClusterNode> {
    cfg.cluster
        .as_ref()
        .map(|c| c.nodes.clone())
        .unwrap_or_default()
}

/// The configured volumes; `nbd`: a primary's bound NBD address, which exports them.
pub(crate) fn volumes(cfg: &Config, nbd: Option<SocketAddr>) -> Vec<VolumeStatus> {
    cfg.volumes
        .iter()
        .map(|v| VolumeStatus {
            name: v.name.clone(),
            size_bytes: v.size.0,
            path: v.path.clone(),
            export: nbd.map(|a| format!("nbd://{a}/{}", v.name)),
            cache: Some(v.cache.name().into()),
            cache_effective: None,
        })
        .collect()
}

pub(crate) fn journal_status(j: &Journal) -> JournalStatus {
    let st = j.stats();
    JournalStatus {
        used_bytes: j.used_bytes(),
        capacity_bytes: j.capacity_bytes(),
        engine: j.engine_name().to_string(),
        fallback_reason: j.fallback_reason(),
        first_seq: j.first_available_seq(),
        batches: st.batches,
        records: st.records,
        bytes_written: st.bytes_written,
        write_seconds: st.write_ns as f64 / 1e9,
    }
}

fn primary_status(
    meta: &Meta,
    group: &Group,
    bases: &[Arc<Base>],
    nbd: SocketAddr,
) -> PrimaryStatus {
    let fault = storage_fault(bases);
    PrimaryStatus {
        failed: group.gate.failed() || fault.is_some(),
        outdated: meta.outdated().ok().flatten().map(|o| OutdatedStatus {
            epoch: o.epoch,
            by: o.by,
        }),
        writes_refused: group.fenced().or(fault),
        fork_seq: meta.fork_seq().ok().flatten(),
        fork_by: meta.fork_by().ok().flatten().map(str::to_string),
        sync_policy: group
            .sync
            .read()
            .as_ref()
            .and_then(|g| g.policy().map(|p| p.to_string())),
        nbd: NbdStatus {
            listen: nbd.to_string(),
        },
        archives: Vec::new(),
    }
}

fn standby_status(sb: &Standby, applier: &Applier, exports: Option<&PitExports>) -> StandbyStatus {
    let st = &sb.state;
    let mut pit = applier
        .pit
        .as_ref()
        .map_or_else(PitStatus::disabled, |p| p.status());
    pit.exports = exports.map(|x| x.status());
    StandbyStatus {
        paused: sb.paused(),
        // A failed fsync of the replica stops its apply even before the next write-set.
        apply_error: st
            .apply_error
            .lock()
            .clone()
            .or_else(|| storage_fault(&applier.bases)),
        replica: consistency(applier.resync.get().is_some()),
        resync: applier.resync.status(),
        primary: UpstreamStatus {
            name: st.primary.clone(),
            listen: st.listen.clone(),
            connected: st.connected.lock().clone(),
            last_seq: st.last_primary_seq.load(Ordering::Relaxed),
            last_error: st.last_error.lock().clone(),
            via: st.via.clone(),
            // Only a relayed standby has two sources to tell apart.
            source: st.via.as_ref().and(st.source.lock().clone()),
        },
        applied_primary_time_ns: st.applied_ts_ns.load(Ordering::Relaxed),
        pit,
        sync_loss_at: *st.sync_loss.lock(),
    }
}

/// A bitmap resync in progress: no consistent image until it ends.
fn consistency(resyncing: bool) -> ReplicaState {
    if resyncing {
        ReplicaState::Inconsistent
    } else {
        ReplicaState::Consistent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
            [node]
            name = "a"
            role = "primary"
            cluster_id = "00112233445566778899aabbccddeeff"
            metadata_dir = "a"
            [journal]
            dir = "a/journal"
            size = "64MiB"
            [control]
            socket = "a/ferryd.sock"
            [[volume]]
            name = "vol0"
            path = "/tmp/vol0.img"
            size = "1MiB"
            [[volume]]
            name = "vol1"
            path = "/tmp/vol1.img"
            size = "2MiB"
        "#;
        Config::parse(text).expect("test config")
    }

    #[test]
    fn a_primary_lists_its_volumes_with_exports_and_a_standby_without() {
        let cfg = config();
        let addr: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        let p = volumes(&cfg, Some(addr));
        assert_eq!(
            p.iter()
                .map(|v| (v.name.as_str(), v.size_bytes, v.export.as_deref()))
                .collect::<Vec<_>>(),
            [
                ("vol0", 1 << 20, Some("nbd://127.0.0.1:10809/vol0")),
                ("vol1", 2 << 20, Some("nbd://127.0.0.1:10809/vol1")),
            ]
        );
        let s = serde_json::to_value(volumes(&cfg, None)).unwrap();
        assert_eq!(
            s[1],
            serde_json::json!({
                "name": "vol1",
                "size_bytes": 2 << 20,
                "path": "/tmp/vol1.img",
                "cache": "writethrough-until-flush"
            }),
            "a standby's volumes have no export key (and no effective cache mode)"
        );
    }

    #[test]
    fn a_resync_in_progress_makes_the_replica_inconsistent() {
        assert_eq!(consistency(false), ReplicaState::Consistent);
        assert_eq!(consistency(true), ReplicaState::Inconsistent);
        assert_eq!(
            serde_json::to_value(consistency(true)).unwrap(),
            "inconsistent"
        );
    }
}
