//! `ferryctl node add NAME=HOST:PORT --dir DIR`: a cluster that grows. Issues the new
//! node's certificate from the cluster CA that `init` left in `DIR/ca`, writes its
//! directory and config (a standby of the cluster's primary, with the primary's
//! volumes and journal sizes), and adds it as a replication target to
//! `DIR/primary.toml` — appended as text, so the operator's comments and edits there
//! survive. On a cluster with a sync policy (`replication.sync`), the policy decides
//! which targets are sync: the new node is async unless `--mode sync` appends it to
//! the policy's list (the `sync = "…"` line of `primary.toml` rewritten), and the new
//! node's config carries the policy, so that it enforces the same one once promoted.
use std::path::Path;

use anyhow::{bail, Context};
use ferry_api::config::{
    format_id, parse_addr, valid_node_name, Config, ReplicationConfig, ReplicationMode, Role,
    SyncPolicy, TargetConfig, TlsSuiteConfig,
};
use ferry_transport::pki::{AnyClusterCa, TlsSuite};

use crate::ports;

pub struct Add<'a> {
    pub dir: &'a Path,
    pub spec: &'a str,
    pub mode: Option<ReplicationMode>,
    pub same_host: bool,
}

pub fn node_add(a: &Add) -> anyhow::Result<()> {
    let (name, addr) = parse_spec(a.spec)?;
    let primary_path = a.dir.join("primary.toml");
    let text = std::fs::read_to_string(&primary_path).with_context(|| {
        format!(
            "reading {} (the cluster's primary, written by `ferryctl init`)",
            primary_path.display()
        )
    })?;
    // Parsed without resolving paths: the new config keeps them relative to DIR.
    let primary =
        Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", primary_path.display()))?;
    let Some(repl) = primary.replication.as_ref() else {
        bail!(
            "{}: no [replication] section: this cluster was made without standbys",
            primary_path.display()
        );
    };
    check_new(&primary, repl, &name, &addr)?;
    let ca = AnyClusterCa::load(&a.dir.join("ca")).with_context(|| {
        format!(
            "loading the cluster CA from {} (ferryctl init keeps it there)",
            a.dir.join("ca").display()
        )
    })?;
    let cluster = ca.cluster_id();
    if format_id(&cluster) != primary.node.cluster_id {
        bail!(
            "{}: the CA belongs to cluster {}, the primary to {}",
            a.dir.join("ca").display(),
            format_id(&cluster),
            primary.node.cluster_id
        );
    }
    let plan = Plan::new(repl, &name, a.mode);
    let mut cfg = standby_config(
        &primary,
        repl,
        &cluster,
        &name,
        &addr,
        plan.mode,
        a.same_host,
    )?;
    let carried = carry_policy(&mut cfg, plan.policy.as_ref());
    // The new node speaks what the cluster CA's key makes the others speak.
    if let Some(tls) = cfg.tls.as_mut() {
        tls.suite = match ca.suite() {
            TlsSuite::Standard => TlsSuiteConfig::Standard,
            TlsSuite::Gm => TlsSuiteConfig::Gm,
        };
    }
    // Every check before anything is written: the primary's new text too.
    let new_text = primary_text(&primary_path, &text, &name, &addr, &plan)?;
    crate::check_nodes(a.dir, std::slice::from_ref(&cfg))?;
    crate::write_node(a.dir, &cfg, Some(&ca))?;
    replace_file(&primary_path, &new_text)?;
    report(a.dir, &name, &addr, &plan, &carried);
    Ok(())
}

/// What the cluster's sync policy (if any) makes of the new node.
struct Plan {
    /// The new target's mode in `primary.toml`.
    mode: ReplicationMode,
    /// The cluster's policy as it is once the node is added.
    policy: Option<SyncPolicy>,
    /// The policy before, when `--mode sync` appended the node to it.
    was: Option<SyncPolicy>,
}

impl Plan {
    /// Without a policy the mode is `--mode`, or the first target's. With one, the
    /// policy decides: the node is sync only if listed, so `--mode sync` appends it
    /// to the list (keeping k and the order: last in FIRST's priority), and otherwise
    /// it is async.
    fn new(repl: &ReplicationConfig, name: &str, mode: Option<ReplicationMode>) -> Plan {
        let Some(policy) = repl.sync.clone() else {
            let mode = mode.unwrap_or_else(|| {
                repl.targets
                    .first()
                    .map_or(ReplicationMode::Async, |t| t.mode)
            });
            return Plan {
                mode,
                policy: None,
                was: None,
            };
        };
        if mode == Some(ReplicationMode::Sync) {
            Plan {
                mode: ReplicationMode::Sync,
                policy: Some(with_name(&policy, name)),
                was: Some(policy),
            }
        } else {
            Plan {
                mode: ReplicationMode::Async,
                policy: Some(policy),
                was: None,
            }
        }
    }
}

/// `policy` with `name` appended to its list (same quorum).
fn with_name(policy: &SyncPolicy, name: &str) -> SyncPolicy {
    let mut p = policy.clone();
    // A single name ("dr1") is FIRST 1 (dr1): it stays so with the list longer.
    p.names.push(name.to_string());
    p
}

/// Whether the new node's config carries the policy, or why not.
enum Carried {
    None,
    Yes,
    /// It names nodes the new node's config does not know.
    Unknown(Vec<String>),
}

/// Gives the new node's config the cluster's policy when it knows every node the
/// policy names (its target, the primary, and the `[cluster]` members); each of its
/// targets and members is then sync if and only if the policy lists it (their
/// `mode` must agree with the policy for the config to load).
fn carry_policy(cfg: &mut Config, policy: Option<&SyncPolicy>) -> Carried {
    let Some(policy) = policy else {
        return Carried::None;
    };
    let own = cfg.node.name.clone();
    let known: Vec<String> = cfg
        .ship_targets()
        .into_iter()
        .map(|t| t.name)
        .chain([own.clone()])
        .collect();
    let unknown: Vec<String> = policy
        .names
        .iter()
        .filter(|n| !known.contains(n))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Carried::Unknown(unknown);
    }
    let mode = |n: &str| {
        if policy.lists(n) {
            ReplicationMode::Sync
        } else {
            ReplicationMode::Async
        }
    };
    if let Some(r) = cfg.replication.as_mut() {
        for t in &mut r.targets {
            t.mode = mode(&t.name);
        }
        r.sync = Some(policy.clone());
    }
    if let Some(c) = cfg.cluster.as_mut() {
        for n in c.nodes.iter_mut().filter(|n| n.name != own) {
            n.mode = mode(&n.name);
        }
    }
    Carried::Yes
}

/// What `node add` did and what the operator does next.
fn report(dir: &Path, name: &str, addr: &str, plan: &Plan, carried: &Carried) {
    let primary_path = dir.join("primary.toml");
    println!(
        "wrote:     {} (certificate from the cluster CA)",
        dir.join(format!("{name}.toml")).display()
    );
    println!(
        "target:    {name} {addr} ({}) added to {}",
        mode_str(plan.mode),
        primary_path.display()
    );
    if let (Some(p), Some(was)) = (&plan.policy, &plan.was) {
        println!(
            "policy:    replication.sync in {} is now \"{p}\" (was \"{was}\"): {name} counts \
             toward it; give the other nodes' configs that carry a policy the same line",
            primary_path.display()
        );
    } else if let Some(p) = &plan.policy {
        println!(
            "note:      replication.sync = \"{p}\" does not list {name}, so it is async; to \
             make it sync, change that line in {} to: sync = \"{}\" (then restart the \
             primary: the policy changes only with a restart)",
            primary_path.display(),
            with_name(p, name)
        );
    }
    match carried {
        Carried::None => {}
        Carried::Yes => println!(
            "sync:      {name}.toml carries replication.sync = \"{}\" (enforced once {name} \
             is promoted)",
            plan.policy
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default()
        ),
        Carried::Unknown(names) => println!(
            "note:      {name}.toml has no replication.sync: the policy names {}, which its \
             config does not list (no [cluster] member or target of that name); once promoted \
             {name} ships to the nodes it lists, under their own modes",
            names.join(", ")
        ),
    }
    println!(
        "start:     ferryd --config {}",
        dir.join(format!("{name}.toml")).display()
    );
    if plan.was.is_some() {
        println!(
            "then:      restart the primary with the updated {} (systemctl restart \
             ferryd@primary): replication.sync changes only with a restart, and `ferryctl \
             reload` refuses it",
            primary_path.display()
        );
    } else {
        println!(
            "then:      ferryctl --config {} reload (or systemctl reload ferryd@primary): the \
             primary starts shipping to {name} without a restart",
            primary_path.display()
        );
    }
}

fn parse_spec(spec: &str) -> anyhow::Result<(String, String)> {
    let Some((name, addr)) = spec.split_once('=') else {
        bail!("node add '{spec}': expected NAME=HOST:PORT, e.g. dr2=10.0.2.1:7001");
    };
    if !valid_node_name(name) || name == crate::PRIMARY {
        bail!("node add '{spec}': '{name}' is not a usable node name (a DNS label: a-z 0-9 -, not 'primary')");
    }
    parse_addr(addr).map_err(|e| anyhow::anyhow!("node add '{spec}': {e}"))?;
    Ok((name.to_string(), addr.to_string()))
}

/// The name and address must be new to the cluster.
fn check_new(
    primary: &Config,
    repl: &ReplicationConfig,
    name: &str,
    addr: &str,
) -> anyhow::Result<()> {
    if primary.node.name == name || repl.targets.iter().any(|t| t.name == name) {
        bail!("node '{name}' is already in the cluster");
    }
    if repl.listen == addr || repl.targets.iter().any(|t| t.address == addr) {
        bail!("{addr} is already a node's replication address");
    }
    Ok(())
}

/// The new standby: the primary's volumes and journal, its own addresses (NBD for
/// when it is promoted, metrics), shipping to the primary once promoted.
fn standby_config(
    primary: &Config,
    repl: &ReplicationConfig,
    cluster: &[u8; 16],
    name: &str,
    addr: &str,
    mode: ReplicationMode,
    same_host: bool,
) -> anyhow::Result<Config> {
    let nbd =
        primary.nbd.as_ref().map(|n| n.listen.clone()).context(
            "the primary has no [nbd] section to derive the new node's NBD address from",
        )?;
    let mut replication: Vec<&str> = vec![repl.listen.as_str()];
    replication.extend(repl.targets.iter().map(|t| t.address.as_str()));
    replication.push(addr);
    let metrics_port = primary
        .metrics
        .as_ref()
        .and_then(|m| parse_addr(&m.listen).ok())
        .map(|a| a.port());
    let addrs = ports::assign(&ports::Request {
        nbd: &nbd,
        replication,
        metrics_port,
        same_host,
    })?;
    let Some(mine) = addrs.last() else {
        bail!("no addresses assigned for {name}");
    };
    let vols: Vec<(String, u64)> = primary
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.size.0))
        .collect();
    let mut cfg = crate::node_config(
        name,
        Role::Standby,
        cluster,
        &vols,
        mine,
        primary.journal.size.0,
        primary.journal.segment_size.0,
        Some(ReplicationConfig {
            listen: addr.to_string(),
            primary: primary.node.name.clone(),
            sync_timeout_ms: repl.sync_timeout_ms,
            tail_bytes: repl.tail_bytes,
            async_linger_us: repl.async_linger_us,
            archives: Vec::new(),
            sync: None,
            targets: vec![TargetConfig {
                name: primary.node.name.clone(),
                address: repl.listen.clone(),
                mode,
                on_sync_loss: Default::default(),
                wan: Default::default(),
                max_lag_seconds: None,
            }],
        }),
    );
    // The new node knows the members the primary knows, and itself. The others learn
    // of it only when their configs list it (`[cluster]` changes need a restart).
    cfg.cluster = primary.cluster.clone().map(|mut c| {
        c.nodes.push(ferry_api::config::ClusterNode {
            name: name.to_string(),
            address: addr.to_string(),
            mode,
            via: None,
            via_fallback: None,
        });
        c
    });
    Ok(cfg)
}

fn mode_str(mode: ReplicationMode) -> &'static str {
    match mode {
        ReplicationMode::Sync => "sync",
        ReplicationMode::Async => "async",
    }
}

/// The primary's config text with the target appended (and, when `--mode sync`
/// appended the node to the policy, its `sync = "…"` line rewritten), checked to
/// parse with the target and the policy in it.
fn primary_text(
    path: &Path,
    text: &str,
    name: &str,
    addr: &str,
    plan: &Plan,
) -> anyhow::Result<String> {
    let mut new = match (&plan.policy, &plan.was) {
        (Some(p), Some(was)) => set_policy_line(path, text, was, p)?,
        _ => text.to_string(),
    };
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new += &format!(
        "\n# added by `ferryctl node add`\n[[replication.target]]\nname = \"{name}\"\naddress = \"{addr}\"\nmode = \"{}\"\n",
        mode_str(plan.mode)
    );
    let parsed = Config::parse(&new)
        .map_err(|e| anyhow::anyhow!("{} with the new target: {e}", path.display()))?;
    let added = parsed.replication.as_ref().is_some_and(|r| {
        r.targets
            .iter()
            .any(|t| t.name == name && t.address == addr)
    });
    if !added {
        bail!(
            "{}: appending the target did not add it (is [[replication.target]] redefined later?)",
            path.display()
        );
    }
    if parsed.sync_policy() != plan.policy.as_ref() {
        bail!(
            "{}: rewriting replication.sync did not give \"{}\"",
            path.display(),
            plan.policy
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default()
        );
    }
    Ok(new)
}

/// `text` with the `sync = …` line of its `[replication]` table set to `new`; refuses
/// (naming the line to write) when there is not exactly one such line.
fn set_policy_line(
    path: &Path,
    text: &str,
    was: &SyncPolicy,
    new: &SyncPolicy,
) -> anyhow::Result<String> {
    let mut table = "";
    let mut at = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            table = t;
        } else if table == "[replication]"
            && t.strip_prefix("sync")
                .is_some_and(|r| r.trim_start().starts_with('='))
        {
            at.push(i);
        }
    }
    let [i] = at[..] else {
        bail!(
            "{}: found no single `sync = \"{was}\"` line under [replication] to append the \
             node to; set it to sync = \"{new}\" yourself, then run node add with --mode async",
            path.display()
        );
    };
    let mut out: Vec<String> = text.lines().map(str::to_string).collect();
    // The operator's comment after the value stays.
    let comment = out[i]
        .rfind('"')
        .and_then(|q| out[i][q..].find('#').map(|c| out[i][q + c..].to_string()));
    out[i] = match comment {
        Some(c) => format!("sync = \"{new}\" {c}"),
        None => format!("sync = \"{new}\""),
    };
    let mut joined = out.join("\n");
    if text.ends_with('\n') {
        joined.push('\n');
    }
    Ok(joined)
}

/// Replaces the file atomically.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(t: &str) -> SyncPolicy {
        SyncPolicy::parse(t).unwrap()
    }

    #[test]
    fn the_policy_line_under_replication_is_rewritten_and_nothing_else() {
        let text = "# sync = \"x\" in a comment\n[replication]\nsync_timeout_ms = 5000\n  sync   = \"dr1\" # mine\n\n[[replication.target]]\nname = \"dr1\"\n";
        let (was, new) = (policy("dr1"), with_name(&policy("dr1"), "dr3"));
        assert_eq!(new.to_string(), "FIRST 1 (dr1, dr3)");
        let out = set_policy_line(Path::new("p.toml"), text, &was, &new).unwrap();
        assert_eq!(
            out,
            text.replace(
                "  sync   = \"dr1\" # mine",
                "sync = \"FIRST 1 (dr1, dr3)\" # mine"
            )
        );
    }

    #[test]
    fn no_single_policy_line_is_refused_naming_the_line_to_write() {
        let (was, new) = (policy("ANY 1 (a, b)"), policy("ANY 1 (a, b, c)"));
        for text in [
            "[replication]\nlisten = \"x\"\n",
            "[replication]\nsync = \"ANY 1 (a, b)\"\nsync = \"ANY 1 (a, b)\"\n",
            "[node]\nsync = \"ANY 1 (a, b)\"\n",
        ] {
            let e = set_policy_line(Path::new("p.toml"), text, &was, &new)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("set it to sync = \"ANY 1 (a, b, c)\" yourself"),
                "{e}"
            );
        }
    }
}
