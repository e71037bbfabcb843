//! Control requests both roles answer alike: bookmarks, point targets, volume lookup,
//! and the response wrapper.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_journal::Seq;
use serde_json::json;

use crate::ops::control;
use crate::pit::{Pit, Target};
use crate::primary::volume::Group;
use crate::store::base::Base;

use crate::node::recovery::Recovered;

pub(crate) fn respond(r: anyhow::Result<serde_json::Value>) -> control::Response {
    match r {
        Ok(v) => control::Response::ok(v),
        Err(e) => control::Response::err(crate::error_chain(&e)),
    }
}

/// Longest bookmark name: it travels in a seal record's label.
pub(crate) const MAX_BOOKMARK_NAME: usize = 64;

/// Seals the current write-set with `name` and records the bookmark once the seal
/// is durable (so it names a point every standby will receive).
pub(crate) fn create_bookmark(
    rec: &Recovered,
    group: &Group,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    if name.is_empty()
        || name.len() > MAX_BOOKMARK_NAME
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:@".contains(&c))
    {
        bail!(
            "bookmark name '{name}': use 1..={MAX_BOOKMARK_NAME} characters from A-Z a-z 0-9 - _ . : @"
        );
    }
    if let Some(b) = rec.meta.bookmarks()?.into_iter().find(|b| b.name == name) {
        bail!("bookmark '{name}' already exists (sequence {})", b.seq);
    }
    let seq = group
        .seal(bytes::Bytes::copy_from_slice(name.as_bytes()))
        .map_err(|e| anyhow::anyhow!("sealing the write-set: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("sealing the write-set: no seal was journaled"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rec.journal.durable_seq() < seq {
        if Instant::now() > deadline {
            bail!("the bookmark's seal (sequence {seq}) did not become durable within 30 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = crate::store::meta::Bookmark {
        name: name.to_string(),
        seq,
        timestamp_ns: ferry_journal::now_ns(),
    };
    rec.meta.add_bookmark(&b)?;
    tracing::info!(name, seq, "bookmark created");
    Ok(bookmark_json(&b, None))
}

pub(crate) fn bookmark_json(
    b: &crate::store::meta::Bookmark,
    reachable: Option<bool>,
) -> serde_json::Value {
    let mut v = json!({
        "name": b.name,
        "seq": b.seq,
        "time": crate::timefmt::format_rfc3339(b.timestamp_ns),
        "timestamp_ns": b.timestamp_ns,
    });
    if let Some(r) = reachable {
        v["reachable"] = json!(r);
    }
    v
}

pub(crate) fn list_bookmarks(
    rec: &Recovered,
    pit: Option<&Pit>,
) -> anyhow::Result<serde_json::Value> {
    let list: Vec<_> = rec
        .meta
        .bookmarks()?
        .iter()
        .map(|b| bookmark_json(b, pit.map(|p| p.reachable(b.seq))))
        .collect();
    Ok(json!({ "bookmarks": list }))
}

/// Status `paused` of a standby an operator paused.
pub(crate) const OPERATOR_PAUSE: &str = "paused by an operator (ferryctl resume)";

pub(crate) fn rolled_back_reason(target: Seq) -> String {
    format!(
        "this standby was rolled back to sequence {target} and no longer follows the primary \
         (promote it, or re-seed it from the primary)"
    )
}

pub(crate) fn parse_target(t: &control::PointSpec) -> anyhow::Result<Target> {
    Ok(match t {
        control::PointSpec::Seq(s) => Target::Seq(*s),
        control::PointSpec::Bookmark(b) => Target::Bookmark(b.clone()),
        control::PointSpec::At(s) => {
            Target::Time(crate::timefmt::parse_rfc3339(s).map_err(anyhow::Error::msg)?)
        }
    })
}

pub(crate) fn find_volume(rec: &Recovered, name: &str) -> anyhow::Result<Arc<Base>> {
    rec.bases
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<_> = rec.bases.iter().map(|b| b.name.as_str()).collect();
            anyhow::anyhow!("no volume named '{name}' (volumes: {})", names.join(", "))
        })
}
