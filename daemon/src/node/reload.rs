//! `ferryctl reload` and SIGHUP on a primary: re-reads the node's config file and
//! applies what can change while it runs — replication targets added, removed, or
//! with a new mode or address — all or nothing: a change to any other key is refused,
//! naming each key (it needs a restart), and then nothing changes.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use ferry_api::config::{Config, TargetConfig};
use ferry_journal::Seq;
use serde_json::{json, Value};

use crate::ship::Replication;

/// What a reload does to the targets.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub added: Vec<TargetConfig>,
    /// Same name, new mode or address: the shipper restarts with it.
    pub changed: Vec<TargetConfig>,
    pub removed: Vec<String>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Compares the config the node runs with (`old`, as read from the file) with the
/// file now (`new`). Refuses, naming every key, any change outside the targets.
pub(crate) fn plan(old: &Config, new: &Config) -> anyhow::Result<Plan> {
    let (mut a, mut b) = (serde_json::to_value(old)?, serde_json::to_value(new)?);
    for v in [&mut a, &mut b] {
        if let Some(r) = v.get_mut("replication").and_then(Value::as_object_mut) {
            // `[[replication.target]]`: compared by name below.
            r.remove("target");
        }
    }
    let mut keys = Vec::new();
    differing_keys("", &a, &b, &mut keys);
    if !keys.is_empty() {
        bail!(
            "reload refused, nothing was changed: {} cannot change while ferryd runs \
             (restart it to apply {})",
            keys.join(", "),
            if keys.len() == 1 { "it" } else { "them" }
        );
    }
    // Archive targets share `[[replication.target]]` but are not reloaded.
    let archives = |c: &Config| {
        c.replication.as_ref().map_or_else(Vec::new, |r| {
            r.archives
                .iter()
                .map(|a| (a.name.clone(), a.url.clone(), a.flush_interval_s))
                .collect()
        })
    };
    if archives(old) != archives(new) {
        bail!(
            "reload refused, nothing was changed: archive targets (kind = \"archive\") cannot \
             change while ferryd runs (restart it to apply them)"
        );
    }
    let targets = |c: &Config| {
        c.replication
            .as_ref()
            .map(|r| r.targets.clone())
            .unwrap_or_default()
    };
    let (old_t, new_t) = (targets(old), targets(new));
    let mut p = Plan::default();
    for t in &new_t {
        match old_t.iter().find(|o| o.name == t.name) {
            None => p.added.push(t.clone()),
            Some(o) if o.mode != t.mode || o.address != t.address => p.changed.push(t.clone()),
            Some(_) => {}
        }
    }
    p.removed = old_t
        .iter()
        .filter(|o| !new_t.iter().any(|t| t.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    Ok(p)
}

/// The dotted paths of the TOML keys (`volume[0].size`) where `a` and `b` differ.
fn differing_keys(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut names: Vec<&String> = x.keys().chain(y.keys()).collect();
            names.sort();
            names.dedup();
            for k in names {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                differing_keys(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differing_keys(&format!("{path}[{i}]"), u, v, out);
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

/// A running primary's reload: its config file, the config last applied from it, and
/// the replication it changes.
pub(crate) struct Reloader {
    pub path: PathBuf,
    pub applied: tokio::sync::Mutex<Config>,
    pub repl: Option<Arc<Replication>>,
    /// Where a new target is assumed to be until its Hello says (the checkpoint).
    pub start_acked: Arc<dyn Fn() -> Seq + Send + Sync>,
}

impl Reloader {
    /// Re-reads the file, checks the whole change, then applies it; the answer lists
    /// what was applied.
    pub async fn reload(&self) -> anyhow::Result<Value> {
        let mut applied = self.applied.lock().await;
        let new = Config::load(&self.path)?;
        let p = plan(&applied, &new)?;
        if p.is_empty() {
            return Ok(json!({ "applied": [], "message": "nothing changed" }));
        }
        let Some(repl) = &self.repl else {
            bail!(
                "reload refused, nothing was changed: replication.targets cannot change on a \
                 primary that started without targets (restart it to apply them)"
            );
        };
        for t in &p.changed {
            repl.check_replaceable(&t.name)?;
        }
        let mut done = Vec::new();
        for name in &p.removed {
            repl.remove_target(name).await?;
            tracing::info!(target = %name, "reload: target removed");
            done.push(format!("target {name} removed"));
        }
        let added = p.added.iter().map(|t| (t, "added"));
        for (t, what) in added.chain(p.changed.iter().map(|t| (t, "changed"))) {
            repl.add_target(t, (self.start_acked)()).await?;
            tracing::info!(target = %t.name, mode = %t.mode, address = %t.address, "reload: target {what}");
            done.push(format!(
                "target {} {what} ({}, {})",
                t.name, t.mode, t.address
            ));
        }
        *applied = new;
        Ok(json!({ "applied": done }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::config::ReplicationMode;

    fn config(targets: &str, size: &str) -> Config {
        Config::parse(&format!(
            r#"
[node]
name = "p"
role = "primary"
cluster_id = "00112233445566778899aabbccddeeff"
metadata_dir = "/tmp/m"
[journal]
dir = "/tmp/j"
size = "64MiB"
[nbd]
listen = "127.0.0.1:10809"
[control]
socket = "/tmp/c.sock"
[tls]
ca = "/tmp/ca.pem"
cert = "/tmp/p.pem"
key = "/tmp/p.key"
[[volume]]
name = "vol0"
path = "/tmp/vol0.img"
size = "{size}"
[replication]
listen = "127.0.0.1:7000"
primary = "p"
{targets}
"#
        ))
        .unwrap()
    }

    const DR1: &str = "[[replication.target]]\nname = \"dr1\"\naddress = \"127.0.0.1:7001\"\n";

    /// Targets added, removed and changed are planned; anything else is refused,
    /// naming the key, and the targets are then not planned at all.
    #[test]
    fn a_reload_plans_target_changes_and_names_every_other_key() {
        let old = config(DR1, "64MiB");
        let two = format!("{DR1}[[replication.target]]\nname = \"dr2\"\naddress = \"127.0.0.1:7002\"\nmode = \"sync\"\n");
        let p = plan(&old, &config(&two, "64MiB")).unwrap();
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.added[0].name, "dr2");
        assert_eq!(p.added[0].mode, ReplicationMode::Sync);
        assert!(p.changed.is_empty() && p.removed.is_empty());
        let p = plan(&config(&two, "64MiB"), &old).unwrap();
        assert_eq!(p.removed, ["dr2"]);
        let p = plan(&old, &config(&DR1.replace("7001", "7003"), "64MiB")).unwrap();
        assert_eq!(p.changed[0].address, "127.0.0.1:7003");
        assert!(plan(&old, &old).unwrap().is_empty());
        let e = plan(&old, &config(&two, "128MiB")).unwrap_err().to_string();
        assert!(e.contains("volume[0].size"), "{e}");
        assert!(e.contains("nothing was changed"), "{e}");
    }

    /// An archive target is not reloaded: adding, removing or changing one is refused;
    /// a standby added before it (its position moves) is planned as usual.
    #[test]
    fn a_reload_refuses_archive_target_changes() {
        let cold =
            "[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"file:///a\"\n";
        let old = config(&format!("{DR1}{cold}"), "64MiB");
        for new in [
            DR1.to_string(),
            format!("{DR1}{}", cold.replace("/a", "/b")),
        ] {
            let e = plan(&old, &config(&new, "64MiB")).unwrap_err().to_string();
            assert!(e.contains("archive targets"), "{e}");
        }
        let dr2 = "[[replication.target]]\nname = \"dr2\"\naddress = \"127.0.0.1:7002\"\n";
        let p = plan(&old, &config(&format!("{dr2}{DR1}{cold}"), "64MiB")).unwrap();
        assert_eq!(p.added[0].name, "dr2");
    }
}
