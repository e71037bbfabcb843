//! `ferryctl node add NAME=HOST:PORT --dir DIR`: a cluster that grows. Issues the new
//! node's certificate from the cluster CA that `init` left in `DIR/ca`, writes its
//! directory and config (a standby of the cluster's primary, with the primary's
//! volumes and journal sizes), and adds it as a replication target to
//! `DIR/primary.toml` — appended as text, so the operator's comments and edits there
//! survive.
use std::path::Path;

use anyhow::{bail, Context};
use ferry_api::config::{
    format_id, parse_addr, valid_node_name, Config, ReplicationConfig, ReplicationMode, Role,
    TargetConfig, TlsSuiteConfig,
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
    let mode = a.mode.unwrap_or_else(|| {
        repl.targets
            .first()
            .map_or(ReplicationMode::Async, |t| t.mode)
    });
    let mut cfg = standby_config(&primary, repl, &cluster, &name, &addr, mode, a.same_host)?;
    // The new node speaks what the cluster CA's key makes the others speak.
    if let Some(tls) = cfg.tls.as_mut() {
        tls.suite = match ca.suite() {
            TlsSuite::Standard => TlsSuiteConfig::Standard,
            TlsSuite::Gm => TlsSuiteConfig::Gm,
        };
    }
    crate::check_nodes(a.dir, std::slice::from_ref(&cfg))?;
    crate::write_node(a.dir, &cfg, Some(&ca))?;
    add_target(&primary_path, &text, &name, &addr, mode)?;
    println!(
        "wrote:     {} (certificate from the cluster CA)",
        a.dir.join(format!("{name}.toml")).display()
    );
    println!(
        "target:    {name} {addr} ({}) added to {}",
        mode_str(mode),
        primary_path.display()
    );
    println!(
        "start:     ferryd --config {}",
        a.dir.join(format!("{name}.toml")).display()
    );
    println!(
        "then:      ferryctl --config {} reload (or systemctl reload ferryd@primary): the \
         primary starts shipping to {name} without a restart",
        primary_path.display()
    );
    Ok(())
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

/// Appends the target to the primary's config text, checks the result parses with
/// the target in it, and replaces the file atomically.
fn add_target(
    path: &Path,
    text: &str,
    name: &str,
    addr: &str,
    mode: ReplicationMode,
) -> anyhow::Result<()> {
    let mut new = text.to_string();
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new += &format!(
        "\n# added by `ferryctl node add`\n[[replication.target]]\nname = \"{name}\"\naddress = \"{addr}\"\nmode = \"{}\"\n",
        mode_str(mode)
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
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
