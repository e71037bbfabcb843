//! A standby seeded from the archive (`ferryctl archive seed`) at its first start: the
//! marker the command left in the metadata directory ([`ferry_archive::seed`]) is
//! checked against this node and applied to its fresh metadata (epoch, checkpoint,
//! the journal's jump to the point), then renamed so it is applied once. From there
//! the standby is an ordinary one whose journal begins at the seeded point: its first
//! Hello resumes there, and its primary decides (as for any standby) between streaming
//! after it, a digest-compared resync when its journal no longer reaches back, and a
//! refusal when the point is past its history or the epochs differ.
use std::path::Path;

use anyhow::Context;
use ferry_api::config::{Config, Role};
use ferry_archive::seed::{SeedMarker, SEED_APPLIED_FILE, SEED_FILE};

use crate::store::meta::Meta;

/// Applies the seed marker, if there is one; returns the seeded sequence.
pub fn apply(cfg: &Config, meta: &Meta) -> anyhow::Result<Option<u64>> {
    let dir = &cfg.node.metadata_dir;
    let path = dir.join(SEED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let m =
        SeedMarker::from_json(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let seeded = meta.seeded()?;
    if seeded != Some((m.seq, m.epoch)) {
        check(cfg, meta, &m, seeded)?;
        meta.apply_seed(m.epoch, m.seq)?;
    }
    // Applied (now, or before a crash that came before this rename).
    std::fs::rename(&path, dir.join(SEED_APPLIED_FILE))
        .with_context(|| format!("renaming {}", path.display()))?;
    tracing::info!(
        seq = m.seq,
        epoch = m.epoch,
        point_epoch = m.point_epoch,
        url = %m.url,
        "standby seeded from the archive: its journal begins at the seeded point"
    );
    Ok(Some(m.seq))
}

/// Only a new standby of this cluster, numbering its volumes as the archive does.
fn check(
    cfg: &Config,
    meta: &Meta,
    m: &SeedMarker,
    seeded: Option<(u64, u64)>,
) -> anyhow::Result<()> {
    let refuse = |why: String| {
        anyhow::anyhow!(
            "{}: refusing the archive seed: {why}",
            cfg.node.metadata_dir.join(SEED_FILE).display()
        )
    };
    if cfg.node.role != Role::Standby {
        return Err(refuse("this node is not a standby".into()));
    }
    let cluster: String = cfg
        .cluster_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if m.cluster != cluster {
        return Err(refuse(format!(
            "it was taken from an archive of cluster {}, this node is of cluster {cluster}",
            m.cluster
        )));
    }
    if seeded.is_some() || meta.checkpoint()? != 0 || meta.journal_skip()? != 0 {
        return Err(refuse(
            "this node has run before (its metadata holds a position): seed only a new standby"
                .into(),
        ));
    }
    if !dir_is_empty(&cfg.journal.dir)? {
        return Err(refuse(format!(
            "the journal directory {} is not empty: seed only a new standby",
            cfg.journal.dir.display()
        )));
    }
    if m.volumes.len() != cfg.volumes.len() {
        return Err(refuse(format!(
            "it holds {} volumes, this node's config {}",
            m.volumes.len(),
            cfg.volumes.len()
        )));
    }
    for v in &cfg.volumes {
        let id = meta.volume_id(&v.name)?;
        let want = m.volumes.iter().find(|a| a.name == v.name);
        if want.is_none_or(|a| a.id != id || a.size != v.size.0) {
            return Err(refuse(format!(
                "volume '{}' (id {id}, {} bytes here) differs from the seeded one ({want:?})",
                v.name, v.size.0
            )));
        }
    }
    Ok(())
}

fn dir_is_empty(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_missing_directory_is_empty_and_one_with_a_file_is_not() {
        let d = tempfile::tempdir().unwrap();
        assert!(dir_is_empty(&d.path().join("missing")).unwrap());
        assert!(dir_is_empty(d.path()).unwrap());
        std::fs::write(d.path().join("segment"), b"x").unwrap();
        assert!(!dir_is_empty(d.path()).unwrap());
    }
}
