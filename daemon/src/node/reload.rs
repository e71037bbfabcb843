//! `ferryctl reload` and SIGHUP, on a primary or a standby: re-reads the node's config
//! file and applies what can change while ferryd runs ([`ferry_api::keys::KEYS`] says
//! which keys: the same table `ferry.toml(5)` is written from) — replication targets
//! added, removed, or with a new mode or address (a standby records them for its
//! promotion); the access grants (`[access]` admins, operators, viewers); the
//! point-in-time retention limits (`pit.max_bytes`, `pit.max_age_secs`); the metrics
//! endpoint (`[metrics]`). A change to any other key is refused, naming each key and
//! why it needs a restart, and then nothing changes.
//!
//! Everything is checked before anything is applied: the plan, the targets a change
//! replaces, and the new metrics address, which is bound first (a bind failure
//! refuses the reload with the old endpoint still serving). Then the steps are applied
//! in order — targets, metrics, access, retention — each audit-logged as it is done
//! (a `reload-applied` line); should a step still fail, the answer names the steps
//! applied before it and the config the node runs with records exactly those.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use ferry_api::audit::{AuditEntry, Outcome};
use ferry_api::config::{AccessConfig, Config, PitConfig, Role, TargetConfig};
use ferry_api::keys::{change_of, Change};
use ferry_journal::Seq;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::ops::audit::AuditLog;
use crate::ops::control::{Access, SharedAccess};
use crate::ops::metrics;
use crate::pit::{Limits, Pit};
use crate::ship::Replication;

/// What a reload changes.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub added: Vec<TargetConfig>,
    /// Same name, new mode or address: the shipper restarts with it.
    pub changed: Vec<TargetConfig>,
    pub removed: Vec<String>,
    /// New access grants (the whole `[access]` section; only its grants differ).
    pub access: Option<AccessConfig>,
    /// New `[pit]` retention limits.
    pub retention: Option<PitConfig>,
    /// New `[metrics] listen` (`Some(None)`: the endpoint goes).
    pub metrics: Option<Option<String>>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.access.is_none()
            && self.retention.is_none()
            && self.metrics.is_none()
    }

    fn targets_change(&self) -> bool {
        !(self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty())
    }
}

/// A config as compared: sections left out take their defaults (writing `[pit]` with
/// the default limits changes nothing), targets are compared by name ([`plan`]).
fn comparable(c: &Config) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(c)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("pit".into(), serde_json::to_value(c.pit())?);
        o.insert(
            "access".into(),
            serde_json::to_value(c.access.clone().unwrap_or_default())?,
        );
        o.insert(
            "audit".into(),
            serde_json::to_value(c.audit.clone().unwrap_or_default())?,
        );
    }
    if let Some(r) = v.get_mut("replication").and_then(Value::as_object_mut) {
        r.remove("target");
    }
    Ok(v)
}

/// Compares the config the node runs with (`old`, as read from the file) with the
/// file now (`new`). Refuses, naming every key and why, any change a restart needs.
pub(crate) fn plan(old: &Config, new: &Config) -> anyhow::Result<Plan> {
    let mut keys = Vec::new();
    differing_keys("", &comparable(old)?, &comparable(new)?, &mut keys);
    let restart: Vec<String> = keys
        .iter()
        .filter_map(|k| match change_of(k) {
            Some(Change::Live) => None,
            Some(Change::Restart(why)) => Some(format!("{k} ({why})")),
            None => Some(format!("{k} (not a key this ferryd knows)")),
        })
        .collect();
    if !restart.is_empty() {
        bail!(
            "reload refused, nothing was changed: {} cannot change while ferryd runs \
             (restart it to apply {})",
            restart.join(", "),
            if restart.len() == 1 { "it" } else { "them" }
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
    let mut p = plan_targets(old, new);
    let grants = |c: &Config| {
        let a = c.access.clone().unwrap_or_default();
        (a.admins, a.operators, a.viewers)
    };
    if grants(old) != grants(new) {
        p.access = Some(new.access.clone().unwrap_or_default());
    }
    if Limits::of(&old.pit()) != Limits::of(&new.pit()) {
        p.retention = Some(new.pit());
    }
    let listen = |c: &Config| c.metrics.as_ref().map(|m| m.listen.clone());
    if listen(old) != listen(new) {
        p.metrics = Some(listen(new));
    }
    Ok(p)
}

/// The standby targets added, changed (mode or address) and removed, by name.
fn plan_targets(old: &Config, new: &Config) -> Plan {
    // With membership, the members a primary ships to besides its listed targets.
    let targets = |c: &Config| c.ship_targets();
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
    p
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

/// A primary's replication, which a reload's target changes go to.
pub(crate) struct Targets {
    pub repl: Arc<Replication>,
    /// Where a new target is assumed to be until its Hello says (the checkpoint).
    pub start_acked: Arc<dyn Fn() -> Seq + Send + Sync>,
}

/// What a reload changes in the running node.
pub(crate) struct Live {
    pub role: Role,
    /// A primary's replication (`None`: a standby, or a primary without targets).
    pub targets: Option<Targets>,
    /// A standby's undo log (`None`: a primary, or `[pit] enabled = false`).
    pub pit: Option<Arc<Pit>>,
    pub metrics: Arc<metrics::EndpointSlot>,
    pub access: SharedAccess,
    /// Where each applied change is recorded.
    pub audit: Arc<AuditLog>,
}

/// A running node's reload: its config file, the config last applied from it, and
/// what a reload changes.
pub(crate) struct Reloader {
    pub path: PathBuf,
    pub applied: tokio::sync::Mutex<Config>,
    pub live: Live,
}

/// Who asked for a reload, for the audit lines.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    Control,
    Sighup,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Control => "ferryctl reload",
            Via::Sighup => "SIGHUP",
        }
    }
}

/// The steps of a reload applied so far, and the config that matches them.
struct Applied {
    done: Vec<String>,
    now: Config,
    unaudited: Vec<String>,
}

impl Reloader {
    /// Re-reads the file, checks the whole change, then applies it; the answer lists
    /// what was applied.
    pub async fn reload(&self, via: Via) -> anyhow::Result<Value> {
        let mut applied = self.applied.lock().await;
        let new = Config::load(&self.path)?;
        let p = plan(&applied, &new)?;
        if p.is_empty() {
            return Ok(json!({ "applied": [], "message": "nothing changed" }));
        }
        self.check(&p)?;
        let listener = self.bind_metrics(&p).await?;
        let mut a = Applied {
            done: Vec::new(),
            now: applied.clone(),
            unaudited: Vec::new(),
        };
        let result = self.apply(&p, listener, &mut a, via).await;
        *applied = if result.is_ok() { new } else { a.now };
        match result {
            Ok(()) => Ok(json!({ "applied": a.done, "unaudited": a.unaudited })),
            Err(e) => bail!(
                "reload stopped: {e:#}; applied before it: {}; the rest was not applied",
                if a.done.is_empty() {
                    "nothing".to_string()
                } else {
                    a.done.join("; ")
                }
            ),
        }
    }

    /// What must hold before anything is applied.
    fn check(&self, p: &Plan) -> anyhow::Result<()> {
        if p.targets_change() && self.live.role == Role::Primary {
            let Some(t) = &self.live.targets else {
                bail!(
                    "reload refused, nothing was changed: replication.target cannot change on \
                     a primary that started without targets (restart it to apply them)"
                );
            };
            for c in &p.changed {
                t.repl.check_replaceable(&c.name)?;
            }
        }
        Ok(())
    }

    /// The new metrics listener, bound before anything changes: a taken or bad
    /// address refuses the reload and the old endpoint keeps serving.
    async fn bind_metrics(&self, p: &Plan) -> anyhow::Result<Option<TcpListener>> {
        let Some(Some(listen)) = &p.metrics else {
            return Ok(None);
        };
        match metrics::bind(listen).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => bail!(
                "reload refused, nothing was changed: metrics.listen: {e:#}; the metrics \
                 endpoint stays {}",
                self.live
                    .metrics
                    .addr()
                    .map_or("off".to_string(), |a| format!("on {a}"))
            ),
        }
    }

    /// The steps, in order; each one done is recorded in `a` (and audited).
    async fn apply(
        &self,
        p: &Plan,
        listener: Option<TcpListener>,
        a: &mut Applied,
        via: Via,
    ) -> anyhow::Result<()> {
        self.apply_targets(p, a, via).await?;
        if let Some(listen) = &p.metrics {
            let before = self.live.metrics.addr();
            let after = self.live.metrics.switch(listener)?;
            a.now.metrics = listen
                .clone()
                .map(|listen| ferry_api::config::MetricsConfig { listen });
            let show =
                |x: Option<std::net::SocketAddr>| x.map_or("off".to_string(), |x| x.to_string());
            self.done(
                a,
                via,
                format!("metrics endpoint {} -> {}", show(before), show(after)),
            );
        }
        if let Some(access) = &p.access {
            self.live.access.set(Access::from_config(Some(access)));
            a.now.access = Some(access.clone());
            self.done(a, via, format!("access grants: {}", grants(access)));
        }
        if let Some(pit) = &p.retention {
            let limits = Limits::of(pit);
            let what = format!(
                "pit retention: max_bytes {}, max_age_secs {}",
                limits.max_bytes, limits.max_age_secs
            );
            match &self.live.pit {
                Some(undo) => undo.set_retention(limits),
                None => tracing::info!("{what}: no undo log runs on this node; recorded"),
            }
            a.now.pit = Some(pit.clone());
            let note = if self.live.pit.is_some() {
                ""
            } else {
                " (no undo log runs here: recorded)"
            };
            self.done(a, via, format!("{what}{note}"));
        }
        Ok(())
    }

    /// Target changes: on a primary its shippers follow; a standby records them (they
    /// are its targets once it is promoted, which starts it again from the file).
    async fn apply_targets(&self, p: &Plan, a: &mut Applied, via: Via) -> anyhow::Result<()> {
        if !p.targets_change() {
            return Ok(());
        }
        let Some(t) = self
            .live
            .targets
            .as_ref()
            .filter(|_| self.live.role == Role::Primary)
        else {
            if let Some(r) = a.now.replication.as_mut() {
                for name in &p.removed {
                    r.targets.retain(|t| &t.name != name);
                }
                for c in p.added.iter().chain(&p.changed) {
                    r.targets.retain(|t| t.name != c.name);
                    r.targets.push(c.clone());
                }
            }
            self.done(
                a,
                via,
                "targets recorded (a standby ships to them once promoted)".into(),
            );
            return Ok(());
        };
        for name in &p.removed {
            t.repl.remove_target(name).await?;
            if let Some(r) = a.now.replication.as_mut() {
                r.targets.retain(|t| &t.name != name);
            }
            self.done(a, via, format!("target {name} removed"));
        }
        let added = p.added.iter().map(|t| (t, "added"));
        for (c, what) in added.chain(p.changed.iter().map(|t| (t, "changed"))) {
            t.repl.add_target(c, (t.start_acked)()).await?;
            if let Some(r) = a.now.replication.as_mut() {
                r.targets.retain(|t| t.name != c.name);
                r.targets.push(c.clone());
            }
            self.done(
                a,
                via,
                format!("target {} {what} ({}, {})", c.name, c.mode, c.address),
            );
        }
        Ok(())
    }

    /// Records one applied step: the answer, the log and the audit log (durably; a
    /// failure to audit is logged and named in the answer — the step is done).
    fn done(&self, a: &mut Applied, via: Via, what: String) {
        tracing::info!(via = via.as_str(), "reload: {what}");
        let entry = AuditEntry {
            uid: None,
            gid: None,
            pid: Some(std::process::id() as i32),
            role: None,
            request: "reload-applied".into(),
            args: json!({ "via": via.as_str(), "applied": what }),
            result: Outcome::Ok,
            message: None,
        };
        let audit = self.live.audit.clone();
        if let Err(e) = tokio::task::block_in_place(|| audit.append(entry)) {
            tracing::error!("reload: auditing '{what}': {}", crate::error_chain(&e));
            a.unaudited.push(what.clone());
        }
        a.done.push(what);
    }
}

/// `admins uids [..] gids [..], operators ..., viewers ...`.
fn grants(a: &AccessConfig) -> String {
    [
        ("admins", &a.admins),
        ("operators", &a.operators),
        ("viewers", &a.viewers),
    ]
    .iter()
    .map(|(n, p)| format!("{n} uids {:?} gids {:?}", p.uids, p.gids))
    .collect::<Vec<_>>()
    .join(", ")
}

/// The reload of a node started from a config file (`from`: its path and the config
/// as read): applied by `ferryctl reload` ([`answer`]) and SIGHUP (the returned task,
/// to abort at shutdown). Nothing for a node not started from a file.
pub(crate) fn start(
    from: Option<(PathBuf, Config)>,
    live: impl FnOnce() -> Live,
) -> (Option<Arc<Reloader>>, Option<tokio::task::JoinHandle<()>>) {
    let Some((path, applied)) = from else {
        return (None, None);
    };
    let r = Arc::new(Reloader {
        path,
        applied: tokio::sync::Mutex::new(applied),
        live: live(),
    });
    (Some(r.clone()), Some(on_sighup(r)))
}

/// The control socket's answer to `reload`.
pub(crate) fn answer(reloader: Option<&Reloader>) -> ferry_api::control::Response {
    match reloader {
        Some(r) => crate::node::requests::respond(tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(r.reload(Via::Control))
        })),
        None => ferry_api::control::Response::err(
            "this ferryd was not started from a config file: nothing to reload",
        ),
    }
}

/// SIGHUP (`systemctl reload`) does what `ferryctl reload` does; the result is logged.
fn on_sighup(reloader: Arc<Reloader>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler: reload with ferryctl reload");
            return;
        };
        while hup.recv().await.is_some() {
            match reloader.reload(Via::Sighup).await {
                Ok(v) => tracing::info!("SIGHUP: config reloaded: {v}"),
                Err(e) => tracing::error!("SIGHUP: {}", crate::error_chain(&e)),
            }
        }
    })
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
        // The sync policy is the gate's, set at start: a restart applies it.
        let e = plan(&old, &config(&format!("sync = \"dr1\"\n{DR1}"), "64MiB"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("replication.sync (the sync policy is set"),
            "{e}"
        );
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

    /// Retention, metrics and access grants are planned as live changes; a section
    /// written with its defaults is no change; a restart key is named with its reason.
    #[test]
    fn a_reload_plans_live_sections_and_gives_the_reason_for_the_rest() {
        let old = config(DR1, "64MiB");
        let with = |extra: &str| {
            let mut c = config(DR1, "64MiB").to_toml();
            c.push_str(extra);
            Config::parse(&c).unwrap()
        };
        assert!(plan(&old, &with("[pit]\nmax_bytes = \"4GiB\"\n"))
            .unwrap()
            .is_empty());
        let p = plan(
            &old,
            &with("[pit]\nmax_bytes = \"1GiB\"\nmax_age_secs = 60\n"),
        )
        .unwrap();
        let r = p.retention.unwrap();
        assert_eq!((r.max_bytes.0, r.max_age_secs), (1 << 30, 60));
        let p = plan(&old, &with("[metrics]\nlisten = \"127.0.0.1:9\"\n")).unwrap();
        assert_eq!(p.metrics, Some(Some("127.0.0.1:9".to_string())));
        let m = with("[metrics]\nlisten = \"127.0.0.1:9\"\n");
        assert_eq!(plan(&m, &old).unwrap().metrics, Some(None));
        let p = plan(&old, &with("[access]\noperators = { uids = [7] }\n")).unwrap();
        assert_eq!(p.access.unwrap().operators.uids, [7]);
        let e = plan(
            &old,
            &with("[access]\nsocket_mode = 0o600\n[pit]\nsegment_size = \"2MiB\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("access.socket_mode (the control socket file"),
            "{e}"
        );
        assert!(e.contains("pit.segment_size (the undo log"), "{e}");
        assert!(e.contains("nothing was changed"), "{e}");
    }
}
