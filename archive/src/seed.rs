//! Seeding a new standby from the archive (`ferryctl archive seed`): every volume
//! restored at one point into the standby's volume files, and a marker
//! ([`SeedMarker`], the file [`SEED_FILE`] in its metadata directory) that ferryd reads
//! at its first start to begin its journal and checkpoint at that point. The standby
//! then joins by streaming from there (or, when its primary's journal no longer
//! reaches back to the point, by a resync that compares digests and copies only what
//! differs) instead of a full initial sync over the WAN.
//!
//! What can be checked without the primary is checked here: the archive is this
//! cluster's, holds exactly the node's volumes (names, sizes and the ids the node's
//! metadata gives them), and the point is a write-set boundary it holds. The point's
//! place in the primary's history (its epoch, its sequence) is checked by the primary
//! at the standby's first connection.
use std::fs::OpenOptions;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::format::manifest::{Kind, Manifest, Volume};
use crate::restore::{restore, RestoreReport, Target};
use crate::store::{ArchiveStore, StoreError};

/// The marker's name in the node's metadata directory.
pub const SEED_FILE: &str = "archive-seed.json";
/// What the marker is renamed to once ferryd applied it (kept: it says where the
/// replica came from).
pub const SEED_APPLIED_FILE: &str = "archive-seed.applied.json";
pub const SEED_FORMAT: u32 = 1;

/// What ferryd needs to start a seeded standby (and what the operator sees).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedMarker {
    pub format: u32,
    /// Where the point came from (information only).
    pub url: String,
    /// The cluster (hex id), checked again by ferryd against its config.
    pub cluster: String,
    /// The epoch of the archive's newest manifest: the primary's epoch it was written
    /// in. The standby starts in it (a handshake needs both sides in the same epoch).
    pub epoch: u64,
    /// The epoch of the pack or base that holds the point.
    pub point_epoch: u64,
    /// The write-set boundary every volume was restored at.
    pub seq: u64,
    pub timestamp_ns: u64,
    /// Ids as the archive (the primary) numbers them: ferryd refuses a node whose
    /// metadata numbers its volumes otherwise.
    pub volumes: Vec<Volume>,
}

impl SeedMarker {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of strings and integers: serialisation cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(b: &[u8]) -> Result<SeedMarker, String> {
        let m: SeedMarker = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        if m.format != SEED_FORMAT {
            return Err(format!(
                "seed marker format {} (this ferry reads {SEED_FORMAT})",
                m.format
            ));
        }
        Ok(m)
    }
}

/// One volume of the node to seed, in its config's order.
#[derive(Debug, Clone)]
pub struct SeedVolume<'a> {
    pub name: &'a str,
    pub size: u64,
    pub path: &'a Path,
}

/// Refuses an archive that is not this cluster's or does not hold exactly `volumes`
/// (a node numbers its volumes in config order, from 0, on its first start).
pub fn check_archive(
    m: &Manifest,
    url: &str,
    cluster: &str,
    volumes: &[SeedVolume],
) -> Result<(), StoreError> {
    if m.cluster != cluster {
        return Err(StoreError::Refused(format!(
            "the archive at {url} belongs to cluster {}, this node's config to cluster {cluster}: a foreign archive cannot seed it",
            m.cluster
        )));
    }
    let want: Vec<Volume> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| Volume {
            id: i as u32,
            name: v.name.to_string(),
            size: v.size,
        })
        .collect();
    if m.volumes != want {
        let show = |vs: &[Volume]| {
            vs.iter()
                .map(|v| format!("{} (id {}, {} bytes)", v.name, v.id, v.size))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(StoreError::Refused(format!(
            "the archive at {url} holds volumes {}, this node's config {}: they must be the same, in the same order",
            show(&m.volumes),
            show(&want)
        )));
    }
    Ok(())
}

/// The epoch of the archive entry (pack or base) that holds boundary `seq`.
pub fn point_epoch(m: &Manifest, seq: u64) -> Option<u64> {
    m.entries
        .iter()
        .filter(|e| match e.kind {
            Kind::Pack => e.first_seq <= seq && seq <= e.last_seq,
            Kind::Base => e.last_seq == seq,
        })
        .map(|e| e.epoch)
        .max()
}

/// Restores every volume at `target` (the first fixes the point, the others follow it
/// exactly) and returns the marker to write, with each volume's restore report.
pub async fn seed(
    store: &ArchiveStore,
    cluster: &str,
    volumes: &[SeedVolume<'_>],
    target: &Target,
) -> Result<(SeedMarker, Vec<RestoreReport>), StoreError> {
    let m = store
        .latest_manifest()
        .await?
        .ok_or_else(|| StoreError::Refused(format!("{} holds no archive", store.url())))?;
    check_archive(&m, store.url(), cluster, volumes)?;
    let mut reports: Vec<RestoreReport> = Vec::new();
    for v in volumes {
        let point = reports
            .first()
            .map_or(target.clone(), |r| Target::Seq(r.seq));
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(v.path)?;
        let r = restore(store, v.name, &point, &out).await?;
        reports.push(r);
    }
    let first = reports
        .first()
        .ok_or_else(|| StoreError::Refused("the node has no volumes to seed".into()))?;
    let marker = SeedMarker {
        format: SEED_FORMAT,
        url: store.url().to_string(),
        cluster: m.cluster.clone(),
        epoch: m.epoch,
        point_epoch: point_epoch(&m, first.seq).unwrap_or(m.epoch),
        seq: first.seq,
        timestamp_ns: reports.iter().map(|r| r.timestamp_ns).max().unwrap_or(0),
        volumes: m.volumes.clone(),
    };
    Ok((marker, reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::Entry;

    fn manifest() -> Manifest {
        let mut m = Manifest::new(
            "c0ffee",
            vec![Volume {
                id: 0,
                name: "vol0".into(),
                size: 1 << 20,
            }],
            2,
        );
        let entry = |kind, name: &str, epoch, first, last| Entry {
            kind,
            name: name.into(),
            epoch,
            first_seq: first,
            last_seq: last,
            first_ts: 0,
            last_ts: 0,
            bytes: 1,
            sm3: String::new(),
            chain: String::new(),
        };
        m.push(entry(Kind::Base, "b", 1, 0, 0)).unwrap();
        m.push(entry(Kind::Pack, "p1", 1, 1, 10)).unwrap();
        m.push(entry(Kind::Pack, "p2", 2, 11, 20)).unwrap();
        m
    }

    #[test]
    fn a_foreign_archive_or_other_volumes_are_refused() {
        let m = manifest();
        let path = Path::new("/dev/null");
        let vol = |name, size| SeedVolume { name, size, path };
        assert!(check_archive(&m, "file:///a", "c0ffee", &[vol("vol0", 1 << 20)]).is_ok());
        let e = check_archive(&m, "file:///a", "beef", &[vol("vol0", 1 << 20)]).unwrap_err();
        assert!(e.to_string().contains("foreign archive"), "{e}");
        let e = check_archive(&m, "file:///a", "c0ffee", &[vol("vol0", 2 << 20)]).unwrap_err();
        assert!(e.to_string().contains("holds volumes vol0"), "{e}");
        let two = [vol("vol0", 1 << 20), vol("vol1", 1 << 20)];
        assert!(check_archive(&m, "file:///a", "c0ffee", &two).is_err());
    }

    #[test]
    fn the_point_epoch_is_the_entry_holding_it_and_markers_round_trip() {
        let m = manifest();
        assert_eq!(point_epoch(&m, 0), Some(1));
        assert_eq!(point_epoch(&m, 10), Some(1));
        assert_eq!(point_epoch(&m, 15), Some(2));
        assert_eq!(point_epoch(&m, 21), None);
        let marker = SeedMarker {
            format: SEED_FORMAT,
            url: "file:///a".into(),
            cluster: "c0ffee".into(),
            epoch: 2,
            point_epoch: 2,
            seq: 20,
            timestamp_ns: 5,
            volumes: m.volumes.clone(),
        };
        assert_eq!(SeedMarker::from_json(&marker.to_json()), Ok(marker.clone()));
        let newer = SeedMarker {
            format: 9,
            ..marker
        };
        assert!(SeedMarker::from_json(&newer.to_json()).is_err());
    }
}
