//! Every key of the configuration file and whether `ferryctl reload` (or SIGHUP) can
//! change it while ferryd runs. One table, [`KEYS`]: the daemon's reload classifies
//! each changed key with it, and `ferry-docgen` writes the `ferry.toml(5)` reload
//! section from it (and checks the page's per-key markers against it), so the
//! reference and the reload cannot disagree.
//!
//! Keys are TOML paths without array indices: `volume.size` is every `[[volume]]`'s
//! `size`, `replication.target.mode` every `[[replication.target]]`'s `mode`.

/// Whether a key can change while ferryd runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A reload applies it.
    Live,
    /// A reload refuses it, naming the key and this reason; a restart applies it.
    Restart(&'static str),
}

impl Change {
    pub fn is_live(self) -> bool {
        self == Change::Live
    }
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// TOML path without indices (`pit.max_bytes`, `volume.size`).
    pub key: &'static str,
    pub change: Change,
}

const fn live(key: &'static str) -> Key {
    Key {
        key,
        change: Change::Live,
    }
}

const fn restart(key: &'static str, why: &'static str) -> Key {
    Key {
        key,
        change: Change::Restart(why),
    }
}

const IDENTITY: &str = "the node's identity, checked against its metadata at start";
const JOURNAL: &str = "the journal is opened and sized at start";
const NBD: &str = "read when the NBD listener and its TLS policy start";
const TLS: &str = "the replication TLS identity is loaded at start";
const REPLICATION: &str = "the replication listener and shippers are set up at start";
const ARCHIVE: &str = "archive targets start with ferryd only";
const WAN: &str =
    "a target's compression and bandwidth cap are set when its shipper starts with ferryd";
const SOCKET: &str = "the control socket file is bound with it at start";
const AUDIT: &str = "the audit log is opened with it at start";
const VOLUME: &str = "volumes are opened and exported at start";
const UNDO: &str = "the undo log is opened with it at start";
const VERIFY: &str = "the node's digest is set at start (every node must agree)";
const ENCRYPTION: &str = "the journal is opened with its key at start";
const MEMBERSHIP: &str =
    "the membership is read at start (whom a standby accepts, whom a promoted node ships to)";

/// Every key, in the order of `ferry.toml(5)`.
pub const KEYS: &[Key] = &[
    restart("node.name", IDENTITY),
    restart("node.role", IDENTITY),
    restart("node.cluster_id", IDENTITY),
    restart("node.metadata_dir", IDENTITY),
    restart("journal.dir", JOURNAL),
    restart("journal.size", JOURNAL),
    restart("journal.segment_size", JOURNAL),
    restart("journal.engine", JOURNAL),
    restart("journal.recovery", JOURNAL),
    restart("journal.checkpoint_interval_ms", JOURNAL),
    restart("journal.inflight_batches", JOURNAL),
    restart("journal.writer_nice", JOURNAL),
    restart("nbd.listen", NBD),
    restart("nbd.tls", NBD),
    restart("nbd.tls_cert", NBD),
    restart("nbd.tls_key", NBD),
    restart("nbd.tls_suite", NBD),
    restart("nbd.tls_gm_cert", NBD),
    restart("nbd.tls_gm_key", NBD),
    restart("nbd.tls_ca", NBD),
    restart("nbd.max_connections", NBD),
    restart("nbd.handshake_timeout_secs", NBD),
    restart("nbd.idle_timeout_secs", NBD),
    restart("control.socket", SOCKET),
    restart("access.audit_log", AUDIT),
    restart("access.socket_mode", SOCKET),
    restart("access.socket_group", SOCKET),
    live("access.admins.uids"),
    live("access.admins.gids"),
    live("access.operators.uids"),
    live("access.operators.gids"),
    live("access.viewers.uids"),
    live("access.viewers.gids"),
    restart("audit.max_file_size", AUDIT),
    restart("audit.keep_files", AUDIT),
    restart("audit.sync_interval_ms", AUDIT),
    restart("audit.sync_lines", AUDIT),
    restart("audit.checkpoint_every", AUDIT),
    restart("verify.digest", VERIFY),
    restart("tls.ca", TLS),
    restart("tls.cert", TLS),
    restart("tls.key", TLS),
    restart("tls.suite", TLS),
    restart("replication.listen", REPLICATION),
    restart("replication.primary", REPLICATION),
    restart("replication.sync_timeout_ms", REPLICATION),
    restart("replication.tail_bytes", REPLICATION),
    restart("replication.async_linger_us", REPLICATION),
    restart(
        "replication.sync",
        "the sync policy is set when the sync gate starts with ferryd",
    ),
    live("replication.target.name"),
    live("replication.target.address"),
    live("replication.target.mode"),
    restart(
        "replication.target.on_sync_loss",
        "a target's sync-loss policy is set when its shipper starts with ferryd",
    ),
    restart("replication.target.compress", WAN),
    restart("replication.target.max_bandwidth", WAN),
    restart(
        "replication.target.max_lag_seconds",
        "a target's pacing is set when its shipper starts with ferryd",
    ),
    restart("replication.target.kind", ARCHIVE),
    restart("replication.target.url", ARCHIVE),
    restart("replication.target.flush_interval", ARCHIVE),
    restart("replication.target.retention", ARCHIVE),
    restart("replication.target.base_interval", ARCHIVE),
    restart("replication.target.object_lock_days", ARCHIVE),
    live("metrics.listen"),
    restart("pit.enabled", UNDO),
    restart("pit.dir", UNDO),
    live("pit.max_bytes"),
    live("pit.max_age_secs"),
    restart("pit.segment_size", UNDO),
    restart("encryption.key_file", ENCRYPTION),
    restart("cluster.node.name", MEMBERSHIP),
    restart("cluster.node.address", MEMBERSHIP),
    restart("cluster.node.mode", MEMBERSHIP),
    restart("cluster.node.via", MEMBERSHIP),
    restart("cluster.node.via_fallback", MEMBERSHIP),
    restart("volume.name", VOLUME),
    restart("volume.path", VOLUME),
    restart("volume.size", VOLUME),
    restart("volume.cache", VOLUME),
];

/// A path as a reload finds it (`volume[1].size`) without its indices (`volume.size`).
pub fn without_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// How a changed path (`pit.max_bytes`, `volume[0].size`, or a whole section that
/// appeared or went, `metrics`, or a list that changed length, `access.admins.uids`)
/// can change: the key's own entry, or, for a section, live only when every key in
/// it is. `None`: no such key.
pub fn change_of(path: &str) -> Option<Change> {
    let p = without_indices(path);
    if let Some(k) = KEYS.iter().find(|k| k.key == p) {
        return Some(k.change);
    }
    let prefix = format!("{p}.");
    let mut inside = KEYS
        .iter()
        .filter(|k| k.key.starts_with(&prefix))
        .peekable();
    inside.peek()?;
    Some(
        inside
            .map(|k| k.change)
            .find(|c| !c.is_live())
            .unwrap_or(Change::Live),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::Value;

    /// A config with every section and every key set to a non-default value.
    const EVERY_KEY: &str = r#"
[node]
name = "p"
role = "primary"
cluster_id = "00112233445566778899aabbccddeeff"
metadata_dir = "/m"
[journal]
dir = "/j"
size = "64MiB"
segment_size = "8MiB"
engine = "std"
recovery = "absolute-consistency"
checkpoint_interval_ms = 1000
inflight_batches = 2
writer_nice = 0
[nbd]
listen = "127.0.0.1:10809"
tls = "require"
tls_cert = "/c.pem"
tls_key = "/c.key"
tls_suite = "both"
tls_gm_cert = "/gm.pem"
tls_gm_key = "/gm.key"
tls_ca = "/ca.pem"
max_connections = 8
handshake_timeout_secs = 5
idle_timeout_secs = 60
[control]
socket = "/c.sock"
[access]
audit_log = "/a.log"
socket_mode = 0o600
socket_group = 5
admins = { uids = [1], gids = [2] }
operators = { uids = [3], gids = [4] }
viewers = { uids = [5], gids = [6] }
[audit]
max_file_size = "1MiB"
keep_files = 2
sync_interval_ms = 5
sync_lines = 2
checkpoint_every = 10
[verify]
digest = "sm3"
[tls]
ca = "/ca.pem"
cert = "/p.pem"
key = "/p.key"
suite = "gm"
[replication]
listen = "127.0.0.1:7000"
primary = "p"
sync_timeout_ms = 100
tail_bytes = "1MiB"
async_linger_us = 5
sync = "ANY 1 (dr1)"
[[replication.target]]
name = "dr1"
address = "127.0.0.1:7001"
mode = "sync"
on_sync_loss = "block"
compress = "zstd"
max_bandwidth = "200Mbit"
max_lag_seconds = 2.5
[[replication.target]]
name = "cold"
kind = "archive"
url = "file:///a"
flush_interval = 3
retention = "every write-set for 1h, 1 per hour for 30d"
base_interval = 86400
object_lock_days = 30
[metrics]
listen = "127.0.0.1:9640"
[pit]
enabled = false
dir = "/u"
max_bytes = "16MiB"
max_age_secs = 60
segment_size = "1MiB"
[encryption]
key_file = "/etc/ferry/atrest.key"
[[cluster.node]]
name = "p"
address = "127.0.0.1:7000"
mode = "sync"
[[cluster.node]]
name = "dr1"
address = "127.0.0.1:7001"
[[cluster.node]]
name = "far"
address = "127.0.0.1:7002"
via = "dr1"
via_fallback = "stay"
[[volume]]
name = "vol0"
path = "/v.img"
size = "64MiB"
cache = "writeback"
"#;

    fn leaves(path: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    leaves(&p, v, out);
                }
            }
            Value::Array(a) if a.iter().any(Value::is_object) => {
                for v in a {
                    leaves(path, v, out);
                }
            }
            _ => out.push(path.to_string()),
        }
    }

    /// The table names every key the config has, and no key it does not have: a key
    /// added to the config without deciding whether it can change live fails here.
    #[test]
    fn the_table_has_exactly_the_config_keys() {
        let cfg = Config::parse(EVERY_KEY).unwrap();
        let toml: toml::Value = toml::from_str(&cfg.to_toml()).unwrap();
        let mut found = Vec::new();
        leaves("", &serde_json::to_value(toml).unwrap(), &mut found);
        found.sort();
        found.dedup();
        let mut table: Vec<String> = KEYS.iter().map(|k| k.key.to_string()).collect();
        table.sort();
        assert_eq!(found, table);
    }

    #[test]
    fn a_changed_path_finds_its_key_or_its_section() {
        assert_eq!(change_of("pit.max_bytes"), Some(Change::Live));
        assert_eq!(change_of("volume[3].size"), Some(Change::Restart(VOLUME)));
        assert_eq!(change_of("access.admins.uids[0]"), Some(Change::Live));
        assert_eq!(change_of("metrics"), Some(Change::Live));
        assert_eq!(change_of("access.admins"), Some(Change::Live));
        assert_eq!(change_of("pit"), Some(Change::Restart(UNDO)));
        assert_eq!(change_of("nbd"), Some(Change::Restart(NBD)));
        assert_eq!(change_of("no.such"), None);
        assert_eq!(without_indices("a[1].b[22].c"), "a.b.c");
    }
}
