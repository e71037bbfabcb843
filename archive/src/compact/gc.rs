//! Garbage collection: deletes what no manifest a reader may still use names.
//!
//! Kept: the newest manifest and every manifest younger than the grace period (a
//! restore or view that opened one keeps reading its objects), and every object they
//! name (packs, bases, and the chunks of those bases). Deleted: older manifests, and
//! unreferenced objects older than the grace period; a younger one may be an upload
//! whose manifest is about to land (a writer's pack, a compactor's merged pack). An
//! object under object lock is never deleted (counted instead). Any doubt — a kept
//! manifest or base that cannot be read — stops the collection before it deletes.
use std::collections::HashSet;
use std::time::Duration;

use crate::format::base::{chunk_object, Base};
use crate::format::manifest::{Kind, Manifest};
use crate::restore::get_checked;
use crate::store::{ArchiveStore, Listed, StoreError};

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub manifests_kept: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Unreferenced, old enough, but under object lock: left for a later pass.
    pub locked: u64,
}

/// Collects the archive's garbage as of `now_ns` (see the module doc).
pub async fn collect(
    store: &ArchiveStore,
    grace: Duration,
    now_ns: u64,
) -> Result<GcReport, StoreError> {
    let grace_ns = grace.as_nanos() as u64;
    let old = |l: &Listed| l.modified_ns.saturating_add(grace_ns) <= now_ns;
    let mut manifests = store.list_meta("manifest").await?;
    manifests.sort_by(|a, b| a.name.cmp(&b.name));
    let Some(newest) = manifests.pop() else {
        return Ok(GcReport::default());
    };
    let (stale, mut kept): (Vec<Listed>, Vec<Listed>) = manifests.into_iter().partition(old);
    kept.push(newest);
    let mut report = GcReport {
        manifests_kept: kept.len() as u64,
        ..GcReport::default()
    };
    let named = referenced(store, &kept).await?;
    for l in stale {
        remove(store, &l, now_ns, &mut report).await?;
    }
    for dir in ["packs", "bases", "chunks"] {
        for l in store.list_meta(dir).await? {
            if !named.contains(&l.name) && old(&l) {
                remove(store, &l, now_ns, &mut report).await?;
            }
        }
    }
    Ok(report)
}

async fn remove(
    store: &ArchiveStore,
    l: &Listed,
    now_ns: u64,
    report: &mut GcReport,
) -> Result<(), StoreError> {
    if store.locked(l.modified_ns, now_ns) {
        report.locked += 1;
        return Ok(());
    }
    store.delete(l, now_ns).await?;
    report.deleted += 1;
    report.deleted_bytes += l.bytes;
    Ok(())
}

/// Every object the `kept` manifests name, with the chunks of their bases.
async fn referenced(store: &ArchiveStore, kept: &[Listed]) -> Result<HashSet<String>, StoreError> {
    let mut named = HashSet::new();
    let mut bases = Vec::new();
    for l in kept {
        let bytes = store.get(&l.name).await?;
        let m = Manifest::from_json(&bytes).map_err(|source| StoreError::Format {
            name: l.name.clone(),
            source,
        })?;
        for e in m.entries {
            if named.insert(e.name.clone()) && e.kind == Kind::Base {
                bases.push(e);
            }
        }
    }
    for e in bases {
        let json = get_checked(store, &e).await?;
        let base = Base::from_json(&json).map_err(|source| StoreError::Format {
            name: e.name.clone(),
            source,
        })?;
        named.extend(base.chunks.iter().flatten().map(|id| chunk_object(id)));
    }
    Ok(named)
}
