//! `ferryctl archive`: restore a volume from the cold tier, seed a new standby from it,
//! and list what an archive holds. Talks to the object store directly (ferry-archive),
//! not to a ferryd: the archive outlives every node.
use std::path::Path;

use anyhow::Context;
use ferry_api::config::{Config, Role};
use ferry_api::timefmt::{format_rfc3339, parse_rfc3339};
use ferry_archive::format::manifest::{Kind, Manifest};
use ferry_archive::restore::{self, Target};
use ferry_archive::seed::{SeedMarker, SeedVolume, SEED_FILE};
use ferry_archive::ArchiveStore;
use ferryctl::cli::ArchivePointArgs;
use serde_json::json;

/// The store calls are async (object_store); one small runtime per command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the IO runtime")
}

pub(crate) fn target(p: &ArchivePointArgs) -> anyhow::Result<Target> {
    Ok(match (p.latest, p.seq, &p.at, &p.bookmark) {
        (_, Some(s), _, _) => Target::Seq(s),
        (_, _, Some(t), _) => Target::Time(parse_rfc3339(t).map_err(anyhow::Error::msg)?),
        (_, _, _, Some(b)) => Target::Bookmark(b.clone()),
        // clap's group makes exactly one required; --latest is the rest.
        _ => Target::Latest,
    })
}

/// The archive at `url`, with the key in `key_file` when given (an encrypted
/// archive's key; the store refuses a missing or wrong one naming the key ids).
pub(crate) fn open_store(url: &str, key_file: Option<&Path>) -> anyhow::Result<ArchiveStore> {
    let kek = key_file
        .map(ferry_api::keyfile::read_key_file)
        .transpose()
        .context("--key-file")?;
    Ok(ArchiveStore::open(url)?.with_kek(kek))
}

pub fn restore(
    url: &str,
    key_file: Option<&Path>,
    volume: &str,
    point: &ArchivePointArgs,
    to: &Path,
    json_out: bool,
) -> anyhow::Result<()> {
    let target = target(point)?;
    let store = open_store(url, key_file)?;
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
        .with_context(|| format!("opening {}", to.display()))?;
    let r = runtime()?
        .block_on(restore::restore(&store, volume, &target, &out))
        .with_context(|| format!("restoring '{volume}' from {url}"))?;
    if json_out {
        println!(
            "{}",
            json!({
                "volume": volume,
                "to": to.display().to_string(),
                "seq": r.seq,
                "time": format_rfc3339(r.timestamp_ns),
                "base_seq": r.base_seq,
                "packs_read": r.packs_read,
                "packs_skipped": r.packs_skipped,
                "indexes_read": r.indexes_read,
                "write_sets_applied": r.write_sets_applied,
                "bytes_downloaded": r.bytes_downloaded,
            })
        );
    } else {
        println!(
            "restored '{volume}' at seq {} ({}) to {}: base at seq {}, {} packs read ({} not needed), {} write-sets, {} bytes downloaded",
            r.seq,
            format_rfc3339(r.timestamp_ns),
            to.display(),
            r.base_seq,
            r.packs_read,
            r.packs_skipped,
            r.write_sets_applied,
            r.bytes_downloaded
        );
    }
    Ok(())
}

/// `ferryctl archive seed`: the node's volumes at one archived point, and the marker
/// its ferryd starts from (ferry-archive's `seed` module says what is checked where).
pub fn seed(
    cfg: &Config,
    url: &str,
    key_file: Option<&Path>,
    point: &ArchivePointArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    check_new_standby(cfg)?;
    let target = target(point)?;
    let key_file = key_file.or(cfg.encryption.as_ref().map(|e| e.key_file.as_path()));
    let store = open_store(url, key_file)?;
    let volumes: Vec<SeedVolume> = cfg
        .volumes
        .iter()
        .map(|v| SeedVolume {
            name: &v.name,
            size: v.size.0,
            path: &v.path,
        })
        .collect();
    let cluster: String = cfg
        .cluster_id()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (marker, reports) = runtime()?
        .block_on(ferry_archive::seed::seed(
            &store, &cluster, &volumes, &target,
        ))
        .with_context(|| format!("seeding node '{}' from {url}", cfg.node.name))?;
    write_marker(&cfg.node.metadata_dir, &marker)?;
    let downloaded: u64 = reports.iter().map(|r| r.bytes_downloaded).sum();
    if json_out {
        println!(
            "{}",
            json!({
                "node": cfg.node.name,
                "url": url,
                "seq": marker.seq,
                "time": format_rfc3339(marker.timestamp_ns),
                "epoch": marker.epoch,
                "point_epoch": marker.point_epoch,
                "volumes": cfg.volumes.iter().zip(&reports).map(|(v, r)| json!({
                    "name": v.name,
                    "path": v.path.display().to_string(),
                    "base_seq": r.base_seq,
                    "packs_read": r.packs_read,
                    "bytes_downloaded": r.bytes_downloaded,
                })).collect::<Vec<_>>(),
                "bytes_downloaded": downloaded,
            })
        );
    } else {
        println!(
            "seeded standby '{}' from {url} at seq {} ({}, epoch {}): {} volumes, {downloaded} bytes downloaded.
             Start its ferryd: it joins by streaming after seq {} (or by a resync that copies only differing chunks if its primary's journal no longer holds it).",
            cfg.node.name,
            marker.seq,
            format_rfc3339(marker.timestamp_ns),
            marker.epoch,
            reports.len(),
            marker.seq
        );
    }
    Ok(())
}

/// Only a standby that never ran: its metadata and journal must not exist yet (a node
/// with a position of its own would mix two histories).
fn check_new_standby(cfg: &Config) -> anyhow::Result<()> {
    if cfg.node.role != Role::Standby {
        anyhow::bail!(
            "node '{}' is not a standby (node.role): archive seed initialises a new standby",
            cfg.node.name
        );
    }
    let meta = cfg.node.metadata_dir.join("meta.redb");
    let marker = cfg.node.metadata_dir.join(SEED_FILE);
    for p in [&meta, &marker] {
        if p.exists() {
            anyhow::bail!(
                "{} exists: node '{}' has run or was seeded already; seed only a new standby",
                p.display(),
                cfg.node.name
            );
        }
    }
    if std::fs::read_dir(&cfg.journal.dir).is_ok_and(|mut d| d.next().is_some()) {
        anyhow::bail!(
            "the journal directory {} is not empty: seed only a new standby",
            cfg.journal.dir.display()
        );
    }
    Ok(())
}

/// The marker, durably (written aside, synced, renamed, directory synced): ferryd
/// must never see half of one.
fn write_marker(dir: &Path, marker: &SeedMarker) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!("{SEED_FILE}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&marker.to_json())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(SEED_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

pub fn list(url: &str, key_file: Option<&Path>, json_out: bool) -> anyhow::Result<()> {
    let store = open_store(url, key_file)?;
    let m = runtime()?
        .block_on(store.latest_manifest())?
        .with_context(|| format!("{url} holds no archive"))?;
    let v = summary(&m);
    if json_out {
        println!("{v}");
        return Ok(());
    }
    println!("archive {url}");
    println!(
        "  generation {}  epoch {}  cluster {}",
        m.generation, m.epoch, m.cluster
    );
    if let Some(e) = &m.encryption {
        println!("  encrypted: {} under key {}", e.scheme, e.key_id);
    }
    for vol in &m.volumes {
        println!("  volume {} (id {}, {} bytes)", vol.name, vol.id, vol.size);
    }
    println!(
        "  {} packs ({} bytes), {} bases",
        v["packs"], v["pack_bytes"], v["bases"]
    );
    for b in m.entries.iter().filter(|e| e.kind == Kind::Base) {
        println!(
            "  base {} at seq {} ({})",
            b.name,
            b.last_seq,
            format_rfc3339(b.last_ts)
        );
    }
    match (v["newest_seq"].as_u64(), v["newest_time"].as_str()) {
        (Some(s), Some(t)) => println!("  newest point: seq {s} ({t})"),
        _ => println!("  newest point: none"),
    }
    Ok(())
}

/// What `list --json` prints.
fn summary(m: &Manifest) -> serde_json::Value {
    let packs: Vec<_> = m.entries.iter().filter(|e| e.kind == Kind::Pack).collect();
    let bases: Vec<_> = m.entries.iter().filter(|e| e.kind == Kind::Base).collect();
    let newest = m.entries.iter().max_by_key(|e| e.last_seq);
    json!({
        "generation": m.generation,
        "epoch": m.epoch,
        "cluster": m.cluster,
        "volumes": m.volumes.iter().map(|v| json!({"id": v.id, "name": v.name, "size": v.size})).collect::<Vec<_>>(),
        "packs": packs.len(),
        "pack_bytes": packs.iter().map(|e| e.bytes).sum::<u64>(),
        "bases": bases.len(),
        "base_points": bases.iter().map(|b| json!({"name": b.name, "seq": b.last_seq, "time": format_rfc3339(b.last_ts)})).collect::<Vec<_>>(),
        "newest_seq": newest.map(|e| e.last_seq),
        "newest_time": newest.map(|e| format_rfc3339(e.last_ts)),
        "encryption_key_id": m.encryption.as_ref().map(|e| e.key_id.clone()),
    })
}
