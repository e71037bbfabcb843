//! `ferryctl key rotate|list|retire`: the at-rest key ring in a node's key file.
//! Rotation appends a new current key; retirement removes an older key only when
//! no journal or undo segment of the node is sealed under it (read from their
//! headers, which a running ferryd does not lock).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_api::config::Config;
use ferry_api::keyfile;
use ferry_gm::atrest::{KeyId, KEY_ID_LEN};
use ferry_journal::format::decode_segment_header_any;
use ferry_journal::parse_segment_name;
use ferry_journal::undo::undo_segment_key_ids;

/// Bytes of a journal segment header read to find its key id.
const JOURNAL_HEADER_READ: usize = 128;

pub fn rotate(key_file: &Path) -> anyhow::Result<()> {
    let ring = keyfile::rotate_key_file(key_file)?;
    println!(
        "{}: new current key {} (older keys kept: {})",
        key_file.display(),
        ring.id(),
        ids(&ring.older_ids())
    );
    println!(
        "restart ferryd to seal new journal and undo segments and archive objects under it; \
         segments sealed under the older keys stay readable until retention releases them"
    );
    Ok(())
}

pub fn list(key_file: &Path) -> anyhow::Result<()> {
    let ring = keyfile::read_key_file(key_file)?;
    println!("current {}", ring.id());
    for id in ring.older_ids() {
        println!("older   {id}");
    }
    Ok(())
}

/// Retires key `id` after checking the node's journal and undo log (`cfg`).
pub fn retire(key_file: &Path, id: &str, cfg: &Config) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let ring = keyfile::read_key_file(key_file)?;
    if ring.for_id(id).is_none() {
        bail!("{}: no key {id} in it", key_file.display());
    }
    let mut users = journal_users(&cfg.journal.dir, id)?;
    users.extend(
        undo_segment_key_ids(&cfg.undo_dir())
            .with_context(|| format!("reading the undo log {}", cfg.undo_dir().display()))?
            .into_iter()
            .filter(|(_, k)| *k == id)
            .map(|(p, _)| p),
    );
    if let Some(first) = users.first() {
        bail!(
            "key {id} still unwraps {} segment(s) of this node (first: {}): keep it until \
             retention or a journal release removes them (or, on a standby, until the undo \
             log's history before the rotation is no longer needed and released), then retire it",
            users.len(),
            first.display()
        );
    }
    let after = keyfile::retire_key(key_file, id)?;
    println!(
        "{}: key {id} retired (current {}, older: {}). An archive begun under it still needs it: \
         keep a copy of the old key file while such an archive is kept",
        key_file.display(),
        after.id(),
        ids(&after.older_ids())
    );
    Ok(())
}

/// Journal segments whose header names key `id`. Spare (never activated)
/// segments have no header and name no key; an unreadable header is an error (it
/// might name the key).
fn journal_users(dir: &Path, id: KeyId) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut segs: Vec<(u64, PathBuf)> = Vec::new();
    for ent in rd {
        let ent = ent.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(no) = ent.file_name().to_str().and_then(parse_segment_name) {
            segs.push((no, ent.path()));
        }
    }
    segs.sort();
    for (no, path) in segs {
        let mut b = vec![0u8; JOURNAL_HEADER_READ];
        let n = read_prefix(&path, &mut b)?;
        match decode_segment_header_any(&b[..n], no) {
            Ok((_, Some(k))) if k.key_id == id => out.push(path),
            Ok(_) | Err(ferry_journal::format::FormatError::Zero) => {}
            Err(e) => bail!(
                "cannot tell which key {} needs ({e}): not retiring",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// Reads up to `buf.len()` bytes from the start of `path`.
fn read_prefix(path: &Path, buf: &mut [u8]) -> anyhow::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut n = 0;
    while n < buf.len() {
        let k = f
            .read(&mut buf[n..])
            .with_context(|| format!("read {}", path.display()))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn parse_id(s: &str) -> anyhow::Result<KeyId> {
    let mut id = [0u8; KEY_ID_LEN];
    if s.len() != 2 * KEY_ID_LEN || !s.is_ascii() {
        bail!("key id {s:?}: expected {} hex digits", 2 * KEY_ID_LEN);
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .with_context(|| format!("key id {s:?}: not hex"))?;
    }
    Ok(KeyId(id))
}

fn ids(v: &[KeyId]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
