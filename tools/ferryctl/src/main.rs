//! `ferryctl`: the operator CLI for ferry.
//!
//! `ferryctl init` lays out a node directory; every other command talks to a running
//! ferryd through the control socket named in its config (`--config FILE`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_api::config::{
    format_id, parse_addr, valid_name, valid_node_name, Config, ControlConfig, EncryptionConfig,
    JournalConfig, MetricsConfig, NbdConfig, NodeConfig, ReplicationConfig, ReplicationMode, Role,
    TargetConfig, TlsConfig, TlsSuiteConfig, VolumeConfig, VOLUME_ALIGN,
};
use ferry_api::control::{self, Request};
use ferry_api::size::{parse_size, ByteSize};
use ferry_api::status::{
    ArchiveStatus, NodeStatus, PitPoint, PrimaryStatus, RoleStatus, StandbyStatus, TargetStatus,
};
use ferry_transport::pki::{AnyClusterCa, TlsSuite};
mod archive;
mod archive_export;
mod drill;
mod key;
mod node_add;
mod ports;
mod table;

use ferryctl::cli::{
    ArchiveCmd, AuditCmd, BookmarkCmd, Cli, Cmd, CryptoArg, DrillPointArgs, KeyCmd, ModeArg,
    NodeCmd, PitCmd,
};
use table::Align;

fn main() -> std::process::ExitCode {
    // `ferryctl status | head -1`: when the reader goes away, end quietly like any
    // Unix filter (Rust ignores SIGPIPE, and then println! panics on EPIPE).
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = ferryctl::cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init {
            dir,
            volumes,
            nbd,
            journal_size,
            segment_size,
            primary,
            standbys,
            mode,
            metrics_port,
            same_host,
            crypto,
            encrypt,
        } => {
            let sites = Sites::parse(primary.as_deref(), &standbys, mode)?;
            let addrs = init_addrs(sites.as_ref(), &nbd, metrics_port, same_host)?;
            let crypto = InitCrypto {
                suite: match crypto {
                    CryptoArg::Standard => TlsSuite::Standard,
                    CryptoArg::Gm => TlsSuite::Gm,
                },
                encrypt,
            };
            init(
                &dir,
                &volumes,
                &addrs,
                &journal_size,
                &segment_size,
                sites.as_ref(),
                crypto,
            )
        }
        Cmd::Keygen { out } => {
            let id = ferry_api::keyfile::create_key_file(&out)?;
            println!("created {} (key id {id})", out.display());
            Ok(())
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { file, dir, cert },
        } => {
            let dir = dir.map(|d| if d.is_dir() { d.join("audit.log") } else { d });
            audit_verify(cli.config.as_deref(), file.or(dir).as_deref(), &cert)
        }
        Cmd::Archive { cmd } => run_archive(cmd, cli.config.as_deref()),
        Cmd::Key { cmd } => match cmd {
            KeyCmd::Rotate { key_file } => key::rotate(&key_file),
            KeyCmd::List { key_file } => key::list(&key_file),
            KeyCmd::Retire { key_file, id } => {
                let cfg = need_config(cli.config.as_deref())?;
                key::retire(&key_file, &id, &cfg)
            }
        },
        Cmd::Node {
            cmd:
                NodeCmd::Add {
                    node,
                    dir,
                    mode,
                    same_host,
                },
        } => node_add::node_add(&node_add::Add {
            dir: &dir,
            spec: &node,
            mode: mode.map(|m| match m {
                ModeArg::Sync => ReplicationMode::Sync,
                ModeArg::Async => ReplicationMode::Async,
            }),
            same_host,
        }),
        cmd => node_command(&need_config(cli.config.as_deref())?, cmd),
    }
}

/// `ferryctl archive …`: the cold tier's restore, export and list.
fn run_archive(cmd: ArchiveCmd, config: Option<&Path>) -> anyhow::Result<()> {
    match cmd {
        ArchiveCmd::Seed {
            url,
            key_file,
            point,
            json,
        } => archive::seed(
            &need_config(config)?,
            &url,
            key_file.as_deref(),
            &point,
            json,
        ),
        ArchiveCmd::Restore {
            url,
            key_file,
            volume,
            point,
            to,
            json,
        } => archive::restore(&url, key_file.as_deref(), &volume, &point, &to, json),
        ArchiveCmd::Export {
            url,
            key_file,
            volume,
            point,
            listen,
            cache_dir,
            cache_bytes,
            json,
        } => archive_export::export(
            &url,
            key_file.as_deref(),
            volume.as_deref(),
            &point,
            archive_export::Serve {
                listen,
                cache_dir,
                cache_bytes: parse_size(&cache_bytes)
                    .map_err(|e| anyhow::anyhow!("--cache-bytes: {e}"))?,
                json,
            },
        ),
        ArchiveCmd::List {
            url,
            key_file,
            json,
        } => archive::list(&url, key_file.as_deref(), json),
    }
}

/// The commands that talk to the running ferryd named by `--config`.
fn node_command(cfg: &Config, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Status { json } => status(cfg, json),
        Cmd::Bookmark { cmd } => bookmark(cfg, cmd),
        Cmd::Pit { cmd } => pit(cfg, cmd),
        Cmd::Promote {
            at,
            bookmark,
            force,
            json,
        } => {
            let target = match (at, bookmark) {
                (Some(t), _) => Some(control::PointSpec::At(t)),
                (_, Some(b)) => Some(control::PointSpec::Bookmark(b)),
                _ => None,
            };
            role_change(cfg, Request::Promote { target, force }, json)
        }
        Cmd::Verify { volume, json } => verify(cfg, volume, json),
        Cmd::Demote { json } => role_change(cfg, Request::Demote, json),
        Cmd::Switchover { to, json } => role_change(cfg, Request::Switchover { to }, json),
        Cmd::Reload { json } => reload(cfg, json),
        Cmd::Pause => {
            let v = call(cfg, &Request::Pause)?;
            println!("paused: {}", v["paused"].as_str().unwrap_or("yes"));
            Ok(())
        }
        Cmd::Resume => {
            call(cfg, &Request::Resume)?;
            println!("resumed: following the primary");
            Ok(())
        }
        Cmd::Drill {
            volume,
            point,
            check,
            check_timeout,
            report,
            json,
        } => {
            let opts = drill::Options {
                volume,
                point: drill_point(point),
                check,
                check_timeout: std::time::Duration::from_secs(check_timeout),
            };
            run_drill(cfg, &opts, report.as_deref(), json)
        }
        Cmd::Rollback {
            volume,
            point,
            group,
            json,
        } => {
            let req = Request::Rollback {
                volume,
                target: point.spec(),
                group,
            };
            rollback(cfg, &req, json)
        }
        Cmd::Init { .. }
        | Cmd::Keygen { .. }
        | Cmd::Key { .. }
        | Cmd::Audit { .. }
        | Cmd::Node { .. }
        | Cmd::Archive { .. } => {
            bail!("this command works on files, not on a running ferryd")
        }
    }
}

fn drill_point(p: DrillPointArgs) -> drill::Point {
    match (p.bookmark, p.at) {
        (Some(b), _) => drill::Point::Bookmark(b),
        (_, Some(t)) => drill::Point::At(t),
        _ => drill::Point::Latest,
    }
}

/// Runs the drill, writes/prints its report; a failed drill is an error (exit 1).
fn run_drill(
    cfg: &Config,
    opts: &drill::Options,
    report_path: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let node = cfg.node.name.clone();
    let report = drill::run(&|req| call(cfg, req), &node, opts);
    if let Some(path) = report_path {
        let page = drill::write(&report, path)?;
        eprintln!("report: {} and {}", path.display(), page.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", drill_text(&report));
    }
    if !report.passed {
        bail!("drill {}", report.summary());
    }
    Ok(())
}

fn drill_text(r: &drill::report::Report) -> String {
    let secs = |s: Option<f64>| s.map_or("not reached".to_string(), |s| format!("{s:.2} s"));
    let mut out = format!("drill {}\n", r.summary());
    out += &format!("  RTO (start to usable view)  {}\n", secs(r.rto_seconds));
    out += &format!("  RPO (age of the point)      {}\n", secs(r.rpo_seconds));
    out += &format!(
        "  audit log                   {}\n",
        if r.audited {
            "recorded"
        } else {
            "NOT recorded"
        }
    );
    for s in &r.timeline {
        out += &format!(
            "  {:>7.2} s  {:<32} {:>6.2} s  {}{}\n",
            s.start_seconds,
            s.name,
            s.seconds,
            if s.ok { "" } else { "FAILED: " },
            s.detail
        );
    }
    out
}

/// `init`'s NBD and metrics addresses for every node (primary first).
fn init_addrs(
    sites: Option<&Sites>,
    nbd: &str,
    metrics_port: Option<u16>,
    same_host: bool,
) -> anyhow::Result<Vec<ports::NodeAddrs>> {
    let mut replication: Vec<&str> = Vec::new();
    if let Some(s) = sites {
        replication.push(&s.primary);
        replication.extend(s.standbys.iter().map(|(_, a, _)| a.as_str()));
    }
    ports::assign(&ports::Request {
        nbd,
        replication,
        metrics_port,
        same_host,
    })
}

fn bookmark(cfg: &Config, cmd: BookmarkCmd) -> anyhow::Result<()> {
    match cmd {
        BookmarkCmd::Create { name, json } => {
            let v = call(cfg, &Request::BookmarkCreate { name })?;
            print_or(json, &v, || {
                println!(
                    "bookmark {} at sequence {} ({})",
                    v["name"], v["seq"], v["time"]
                )
            })
        }
        BookmarkCmd::List { json } => {
            let v = call(cfg, &Request::ListBookmarks)?;
            print_or(json, &v, || print_bookmarks(&v["bookmarks"]))
        }
    }
}

fn pit(cfg: &Config, cmd: PitCmd) -> anyhow::Result<()> {
    match cmd {
        PitCmd::List { limit, json } => {
            let v = call(cfg, &Request::ListPits { limit: Some(limit) })?;
            print_or(json, &v, || print_pits(&v))
        }
        PitCmd::Export {
            volume,
            point,
            listen,
            writable,
            json,
        } => {
            let v = call(
                cfg,
                &Request::PitExport {
                    volume,
                    target: point.spec(),
                    listen,
                    writable,
                },
            )?;
            print_or(json, &v, || print_pit_export(&v))
        }
        PitCmd::Unexport { id, all } => {
            let v = call(cfg, &Request::PitUnexport { id, all })?;
            println!("unexported {}", v["unexported"]);
            Ok(())
        }
    }
}

fn print_pit_export(v: &serde_json::Value) {
    println!(
        "view {} of {} at sequence {} ({}){}: {}",
        v["id"],
        v["volume"].as_str().unwrap_or("?"),
        v["seq"],
        v["time"].as_str().unwrap_or("?"),
        if v["writable"] == true {
            ", writable (scratch overlay)"
        } else {
            ", read-only"
        },
        v["uri"].as_str().unwrap_or("?")
    );
    println!(
        "opened in {:.3} s from {} undo entries",
        v["open_seconds"].as_f64().unwrap_or(0.0),
        v["undo_entries_read"]
    );
}

fn verify(cfg: &Config, volume: Option<String>, json: bool) -> anyhow::Result<()> {
    let v = call(cfg, &Request::Verify { volume })?;
    print_or(json, &v, || print_verify(&v))?;
    if v["identical"] != true {
        bail!("the standby differs from the primary");
    }
    Ok(())
}

fn print_verify(v: &serde_json::Value) {
    println!(
        "verify at sequence {} ({} KiB chunks, {:.3} s):",
        v["seq"],
        v["chunk_size"].as_u64().unwrap_or(0) / 1024,
        v["seconds"].as_f64().unwrap_or(0.0)
    );
    for r in v["results"].as_array().cloned().unwrap_or_default() {
        let ranges = r["differing"].as_array().cloned().unwrap_or_default();
        println!(
            "  {} {}: {}",
            r["target"].as_str().unwrap_or("?"),
            r["volume"].as_str().unwrap_or("?"),
            if ranges.is_empty() {
                "identical".to_string()
            } else {
                format!("{} bytes differ", r["differing_bytes"])
            }
        );
        for d in ranges {
            println!("    offset {} length {}", d["offset"], d["len"]);
        }
    }
}

fn rollback(cfg: &Config, req: &Request, json: bool) -> anyhow::Result<()> {
    let v = call(cfg, req)?;
    print_or(json, &v, || {
        println!(
            "rolled back {} from sequence {} to {} ({}): {} undo entries, {} bytes restored in {:.3} s",
            v["volumes"],
            v["from_seq"],
            v["seq"],
            v["time"].as_str().unwrap_or("?"),
            v["undo_entries"],
            v["bytes_restored"],
            v["seconds"].as_f64().unwrap_or(0.0)
        );
        println!(
            "replication stays paused on this node: promote it, or re-seed it from the primary"
        );
    })
}

fn role_change(cfg: &Config, req: Request, json: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let v = call(cfg, &req)?;
    print_or(json, &v, || {
        match &req {
            Request::Promote { .. } => {
                if let Some(at) = v["forced_past_sync_loss"].as_u64() {
                    println!(
                        "warning: promoted past a sync loss at sequence {at}: writes the old \
                         primary acknowledged after it may be missing"
                    );
                }
                if let Some(why) = v["forced_behind"].as_str() {
                    println!("warning: promoted with --force although {why}");
                }
                println!(
                    "promoted: primary of epoch {} from sequence {}; restarting as the primary",
                    v["epoch"], v["fork_seq"]
                )
            }
            Request::Demote => println!(
                "demoted: rejoining as a standby of '{}' (epoch {}) from sequence {}",
                v["primary"].as_str().unwrap_or("?"),
                v["epoch"],
                v["last_seq"]
            ),
            _ => println!(
                "switched over to '{}' at sequence {} (epoch {}); writes were stopped for {:.3} s here; this node restarts as its standby",
                v["to"].as_str().unwrap_or("?"),
                v["seq"],
                v["epoch"],
                v["writes_stopped_seconds"].as_f64().unwrap_or(0.0)
            ),
        }
        eprintln!("({:.3} s)", started.elapsed().as_secs_f64());
    })
}

/// One control request; the daemon's error becomes ours.
fn call(cfg: &Config, req: &Request) -> anyhow::Result<serde_json::Value> {
    let resp = control::call(&cfg.control.socket, req)?;
    if !resp.ok {
        bail!("ferryd: {}", resp.error.unwrap_or_default());
    }
    Ok(resp.result.unwrap_or_default())
}

fn print_or(json: bool, v: &serde_json::Value, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human();
    }
    Ok(())
}

/// A recovery point from status JSON: `seq N (time)`, or `none`.
fn pt(p: &serde_json::Value) -> String {
    if p.is_null() {
        "none".to_string()
    } else {
        format!("seq {} ({})", p["seq"], p["time"].as_str().unwrap_or("?"))
    }
}

fn print_bookmarks(list: &serde_json::Value) {
    print!("{}", bookmarks_table(list));
}

/// The bookmark list as a table, or `no bookmarks`.
fn bookmarks_table(list: &serde_json::Value) -> String {
    let list = list.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no bookmarks\n".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b["name"].as_str().unwrap_or("?").to_string(),
                b["seq"].to_string(),
                b["time"].as_str().unwrap_or("?").to_string(),
                match b["reachable"].as_bool() {
                    Some(true) => "yes",
                    Some(false) => "no (outside the window)",
                    None => "-",
                }
                .to_string(),
            ]
        })
        .collect();
    table::render(
        &[
            ("NAME", Align::Left),
            ("SEQ", Align::Right),
            ("TIME", Align::Left),
            ("REACHABLE", Align::Left),
        ],
        &rows,
    )
}

fn print_pits(v: &serde_json::Value) {
    print!("{}", pits_text(v));
}

/// `pit list` as text: the window and undo usage, then tables of recent points,
/// bookmarks and open views.
fn pits_text(v: &serde_json::Value) -> String {
    let mut out = format!(
        "window     oldest {}  newest {}\n",
        pt(&v["oldest"]),
        pt(&v["newest"])
    );
    out += &format!(
        "undo       {} points, {} of {} bytes, max age {} s\n",
        v["points"], v["used_bytes"], v["max_bytes"], v["max_age_secs"]
    );
    if let Some(e) = v["error"].as_str() {
        out += &format!("           error: {e}\n");
    }
    if let Some(pts) = v["recent_points"].as_array().filter(|p| !p.is_empty()) {
        let rows: Vec<Vec<String>> = pts
            .iter()
            .map(|p| {
                vec![
                    p["seq"].to_string(),
                    p["time"].as_str().unwrap_or("?").to_string(),
                ]
            })
            .collect();
        out += "\nrecent points\n";
        out += &table::render(&[("SEQ", Align::Right), ("TIME", Align::Left)], &rows);
    }
    out += "\n";
    out += &bookmarks_table(&v["bookmarks"]);
    let exports = v["exports"].as_array().cloned().unwrap_or_default();
    if !exports.is_empty() {
        let rows: Vec<Vec<String>> = exports
            .iter()
            .map(|x| {
                vec![
                    x["id"].to_string(),
                    x["volume"].as_str().unwrap_or("?").to_string(),
                    x["seq"].to_string(),
                    x["listen"].as_str().unwrap_or("?").to_string(),
                    if x["writable"] == true {
                        "writable"
                    } else {
                        "read-only"
                    }
                    .to_string(),
                ]
            })
            .collect();
        out += "\nexports\n";
        out += &table::render(
            &[
                ("ID", Align::Right),
                ("VOLUME", Align::Left),
                ("SEQ", Align::Right),
                ("LISTEN", Align::Left),
                ("MODE", Align::Left),
            ],
            &rows,
        );
    }
    out
}

fn need_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let Some(path) = path else {
        bail!("this command needs --config FILE (the node's config, e.g. DIR/primary.toml)");
    };
    Ok(Config::load(path)?)
}

fn parse_volume(spec: &str) -> anyhow::Result<(String, u64)> {
    let Some((name, size)) = spec.split_once(':') else {
        bail!("--volume '{spec}': expected NAME:SIZE, e.g. vol0:1GiB");
    };
    if !valid_name(name) {
        bail!("--volume '{spec}': '{name}' is not a valid name (1-64 of A-Z a-z 0-9 . _ -)");
    }
    let size = parse_size(size).with_context(|| format!("--volume '{spec}'"))?;
    if size == 0 || !size.is_multiple_of(VOLUME_ALIGN) {
        bail!("--volume '{spec}': size must be a positive multiple of {VOLUME_ALIGN} bytes");
    }
    Ok((name.to_string(), size))
}

/// Replication layout from `--primary`, `--standby` and `--mode`.
struct Sites {
    primary: String,
    /// Name, replication address and mode of each standby.
    standbys: Vec<(String, String, ReplicationMode)>,
    mode: ReplicationMode,
    /// Cascading: (standby, the standby that relays to it), from `@via=RELAY`.
    vias: Vec<(String, String)>,
}

impl Sites {
    fn parse(
        primary: Option<&str>,
        standbys: &[String],
        mode: ModeArg,
    ) -> anyhow::Result<Option<Sites>> {
        if standbys.is_empty() {
            if primary.is_some() {
                bail!("--primary needs at least one --standby NAME=HOST:PORT");
            }
            return Ok(None);
        }
        let Some(primary) = primary else {
            bail!("--standby needs --primary HOST:PORT (the primary's replication address)");
        };
        parse_addr(primary).map_err(|e| anyhow::anyhow!("--primary: {e}"))?;
        let default_mode = match mode {
            ModeArg::Sync => ReplicationMode::Sync,
            ModeArg::Async => ReplicationMode::Async,
        };
        let mut out: Vec<(String, String, ReplicationMode)> = Vec::new();
        let mut vias = Vec::new();
        for spec in standbys {
            // `@via=RELAY` (cascading) ends the spec: `far=HOST:PORT@via=dr1`.
            let (spec_core, via) = match spec.split_once("@via=") {
                Some((core, relay)) => (core, Some(relay)),
                None => (spec.as_str(), None),
            };
            let Some((name, rest)) = spec_core.split_once('=') else {
                bail!("--standby '{spec}': expected NAME=HOST:PORT, e.g. dr1=127.0.0.1:7002");
            };
            if !valid_node_name(name) || name == PRIMARY {
                bail!("--standby '{spec}': '{name}' is not a usable node name (a DNS label: a-z 0-9 -, not 'primary')");
            }
            if out.iter().any(|(n, _, _)| n == name) {
                bail!("--standby '{spec}': '{name}' is given twice");
            }
            let (addr, mode) = match rest.rsplit_once('/') {
                Some((a, "sync")) => (a, ReplicationMode::Sync),
                Some((a, "async")) => (a, ReplicationMode::Async),
                Some((_, m)) => {
                    bail!("--standby '{spec}': mode '{m}' is neither sync nor async")
                }
                None => (rest, default_mode),
            };
            parse_addr(addr).map_err(|e| anyhow::anyhow!("--standby '{spec}': {e}"))?;
            let mode = match via {
                Some(relay) => {
                    vias.push((name.to_string(), relay.to_string()));
                    // A relayed standby is async whatever --mode says; asking for sync
                    // by name is a contradiction.
                    if rest.ends_with("/sync") {
                        bail!("--standby '{spec}': a standby with @via is async (its relay acknowledges, not it)");
                    }
                    ReplicationMode::Async
                }
                None => mode,
            };
            out.push((name.to_string(), addr.to_string(), mode));
        }
        for (name, relay) in &vias {
            if relay == name || !out.iter().any(|(n, _, _)| n == relay) {
                bail!("--standby {name}: @via={relay} must name another --standby (the node that relays to {name})");
            }
        }
        Ok(Some(Sites {
            primary: primary.to_string(),
            standbys: out,
            mode: default_mode,
            vias,
        }))
    }
}

const PRIMARY: &str = "primary";

#[allow(clippy::too_many_arguments)]
fn node_config(
    node: &str,
    role: Role,
    cluster: &[u8; 16],
    vols: &[(String, u64)],
    addrs: &ports::NodeAddrs,
    journal_size: u64,
    segment_size: u64,
    replication: Option<ReplicationConfig>,
) -> Config {
    let data = PathBuf::from(node);
    let tls = replication.as_ref().map(|_| TlsConfig {
        ca: data.join("tls/ca.pem"),
        cert: data.join(format!("tls/{node}.pem")),
        key: data.join(format!("tls/{node}.key")),
        // `init` sets the cluster's choice on every node.
        suite: TlsSuiteConfig::Standard,
    });
    Config {
        node: NodeConfig {
            name: node.into(),
            role,
            cluster_id: format_id(cluster),
            metadata_dir: data.clone(),
        },
        journal: JournalConfig {
            dir: data.join("journal"),
            size: ByteSize(journal_size),
            segment_size: ByteSize(segment_size),
            engine: Default::default(),
            recovery: Default::default(),
            checkpoint_interval_ms: 30_000,
            inflight_batches: 1,
            writer_nice: ferry_api::config::DEFAULT_WRITER_NICE,
        },
        nbd: Some(NbdConfig::plain(addrs.nbd.clone())),
        control: ControlConfig {
            socket: data.join("ferryd.sock"),
        },
        tls,
        replication,
        metrics: Some(MetricsConfig {
            listen: addrs.metrics.clone(),
        }),
        pit: None,
        access: None,
        audit: None,
        verify: None,
        encryption: None,
        cluster: None,
        volumes: vols
            .iter()
            .map(|(name, size)| VolumeConfig {
                name: name.clone(),
                path: data.join(format!("{name}.img")),
                size: ByteSize(*size),
                cache: Default::default(),
            })
            .collect(),
    }
}

/// `init`'s cryptography choices: the cluster CA's suites, and encryption at rest.
struct InitCrypto {
    suite: TlsSuite,
    encrypt: bool,
}

/// Key file of a node made by `init --encrypt`, relative to the config directory.
fn init_key_file(node: &str) -> PathBuf {
    PathBuf::from(node).join("atrest.key")
}

fn init(
    dir: &Path,
    volumes: &[String],
    addrs: &[ports::NodeAddrs],
    journal_size: &str,
    segment_size: &str,
    sites: Option<&Sites>,
    crypto: InitCrypto,
) -> anyhow::Result<()> {
    let suite = crypto.suite;
    let vols = volumes
        .iter()
        .map(|s| parse_volume(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let journal_size = parse_size(journal_size).context("--journal-size")?;
    let segment_size = parse_size(segment_size).context("--segment-size")?;
    let mut cluster = [0u8; 16];
    getrandom::getrandom(&mut cluster).context("random cluster id")?;
    let mut nodes = node_configs(&cluster, &vols, addrs, journal_size, segment_size, sites);
    for tls in nodes.iter_mut().filter_map(|cfg| cfg.tls.as_mut()) {
        tls.suite = match suite {
            TlsSuite::Standard => TlsSuiteConfig::Standard,
            TlsSuite::Gm => TlsSuiteConfig::Gm,
        };
    }
    if crypto.encrypt {
        for cfg in nodes.iter_mut() {
            cfg.encryption = Some(EncryptionConfig {
                key_file: init_key_file(&cfg.node.name),
            });
        }
    }
    // Check everything before touching the disk.
    check_nodes(dir, &nodes)?;
    let ca = match sites {
        Some(_) => Some(write_ca(dir, cluster, suite)?),
        None => None,
    };
    for cfg in &nodes {
        write_node(dir, cfg, ca.as_ref())?;
    }
    for cfg in &nodes {
        println!(
            "start:     ferryd --config {}",
            dir.join(format!("{}.toml", cfg.node.name)).display()
        );
    }
    for v in &vols {
        println!(
            "export:    nbd://{}/{} ({})",
            addrs[0].nbd,
            v.0,
            ByteSize(v.1)
        );
    }
    Ok(())
}

/// Every node's configuration, the primary first.
fn node_configs(
    cluster: &[u8; 16],
    vols: &[(String, u64)],
    addrs: &[ports::NodeAddrs],
    journal_size: u64,
    segment_size: u64,
    sites: Option<&Sites>,
) -> Vec<Config> {
    let mut nodes: Vec<Config> = Vec::new();
    let primary_repl = sites.map(|s| ReplicationConfig {
        listen: s.primary.clone(),
        primary: PRIMARY.into(),
        sync_timeout_ms: 5000,
        tail_bytes: ByteSize(64 << 20),
        async_linger_us: ferry_api::config::DEFAULT_ASYNC_LINGER_US,
        archives: Vec::new(),
        sync: None,
        targets: s
            .standbys
            .iter()
            .map(|(name, addr, mode)| TargetConfig {
                name: name.clone(),
                address: addr.clone(),
                mode: *mode,
                on_sync_loss: Default::default(),
                wan: Default::default(),
                max_lag_seconds: None,
            })
            .collect(),
    });
    nodes.push(node_config(
        PRIMARY,
        Role::Primary,
        cluster,
        vols,
        &addrs[0],
        journal_size,
        segment_size,
        primary_repl,
    ));
    let standbys = sites.map(|s| s.standbys.as_slice()).unwrap_or_default();
    for ((name, addr, _), node_addrs) in standbys.iter().zip(&addrs[1..]) {
        // Once promoted, a standby serves NBD (on its own port when it shares the
        // primary's host) and ships to the old primary (which rejoins as its standby
        // after a demote or switchover).
        nodes.push(node_config(
            name,
            Role::Standby,
            cluster,
            vols,
            node_addrs,
            journal_size,
            segment_size,
            Some(ReplicationConfig {
                listen: addr.clone(),
                primary: PRIMARY.into(),
                sync_timeout_ms: 5000,
                tail_bytes: ByteSize(64 << 20),
                async_linger_us: ferry_api::config::DEFAULT_ASYNC_LINGER_US,
                archives: Vec::new(),
                sync: None,
                targets: sites
                    .map(|s| {
                        vec![TargetConfig {
                            name: PRIMARY.into(),
                            address: s.primary.clone(),
                            mode: s.mode,
                            on_sync_loss: Default::default(),
                            wan: Default::default(),
                            max_lag_seconds: None,
                        }]
                    })
                    .unwrap_or_default(),
            }),
        ));
    }
    if let Some(s) = sites {
        let members = membership(s);
        for n in &mut nodes {
            n.cluster = Some(members.clone());
        }
    }
    nodes
}

/// `[cluster]`, the same in every node's config: the primary (shipped to with
/// `--mode` once another node is the primary, as the standbys' targets say) and each
/// standby with its mode.
fn membership(s: &Sites) -> ferry_api::config::ClusterConfig {
    let primary = ferry_api::config::ClusterNode {
        name: PRIMARY.into(),
        address: s.primary.clone(),
        mode: s.mode,
        via: None,
        via_fallback: None,
    };
    let standbys = s
        .standbys
        .iter()
        .map(|(name, addr, mode)| ferry_api::config::ClusterNode {
            name: name.clone(),
            address: addr.clone(),
            mode: *mode,
            via: s
                .vias
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, relay)| relay.clone()),
            via_fallback: None,
        });
    ferry_api::config::ClusterConfig {
        nodes: std::iter::once(primary).chain(standbys).collect(),
    }
}

/// Refuses to overwrite a node's configuration, and validates each one.
fn check_nodes(dir: &Path, nodes: &[Config]) -> anyhow::Result<()> {
    for cfg in nodes {
        let cfg_path = dir.join(format!("{}.toml", cfg.node.name));
        if cfg_path.exists() {
            bail!(
                "{} already exists; refusing to overwrite a node's configuration (remove the directory to start over)",
                cfg_path.display()
            );
        }
        cfg.validate()
            .map_err(|(key, msg)| anyhow::anyhow!("{}: {key}: {msg}", cfg.node.name))?;
    }
    Ok(())
}

/// The cluster CA (ECDSA or SM2 as `suite` asks), written under `dir/ca`.
fn write_ca(dir: &Path, cluster: [u8; 16], suite: TlsSuite) -> anyhow::Result<AnyClusterCa> {
    let ca = AnyClusterCa::generate(cluster, suite).context("creating the cluster CA")?;
    std::fs::create_dir_all(dir.join("ca"))
        .with_context(|| format!("creating {}", dir.join("ca").display()))?;
    ca.write_pem_files(&dir.join("ca"))
        .context("writing the cluster CA")?;
    Ok(ca)
}

/// One node's directory, volume files, TLS identity (when replicating) and config file.
fn write_node(dir: &Path, cfg: &Config, ca: Option<&AnyClusterCa>) -> anyhow::Result<()> {
    let name = &cfg.node.name;
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    for v in &cfg.volumes {
        let path = dir.join(&v.path);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating volume file {}", path.display()))?;
        f.set_len(v.size.0)
            .with_context(|| format!("sizing {}", path.display()))?;
    }
    if let Some(ca) = ca {
        let tls = node_dir.join("tls");
        std::fs::create_dir_all(&tls).with_context(|| format!("creating {}", tls.display()))?;
        let id = ca
            .issue_node(name)
            .with_context(|| format!("issuing the certificate of {name}"))?;
        id.write_pem_files(&tls)
            .with_context(|| format!("writing {}", tls.display()))?;
        std::fs::write(tls.join("ca.pem"), ca.cert_pem())
            .with_context(|| format!("writing {}", tls.join("ca.pem").display()))?;
    }
    if let Some(enc) = &cfg.encryption {
        let path = dir.join(&enc.key_file);
        let id = ferry_api::keyfile::create_key_file(&path)?;
        println!(
            "created {} (key id {id}; keep a copy apart from the node)",
            path.display()
        );
    }
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, cfg.to_toml())
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    println!("created {} ({})", cfg_path.display(), cfg.node.role);
    Ok(())
}

fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let v = call(cfg, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let st: NodeStatus = serde_json::from_value(v)
        .context("ferryd answered status in a form this ferryctl does not know")?;
    print!("{}", status_text(&st));
    Ok(())
}

/// A string as JSON writes it (quoted): how the status names the node and its role.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `\n           LABEL: TEXT` when there is a text.
fn detail(label: &str, text: Option<&str>) -> String {
    text.map(|e| format!("\n           {label}: {e}"))
        .unwrap_or_default()
}

/// The human-readable status: positions and journal, then the role's parts.
fn status_text(st: &NodeStatus) -> String {
    let mut out = String::new();
    let j = &st.journal;
    let (used, cap) = (j.used_bytes, j.capacity_bytes);
    out += &format!(
        "node       {} ({}), epoch {}\n",
        quoted(&st.node),
        quoted(st.role.name()),
        st.epoch
    );
    out += &format!(
        "sequence   last {}  durable {}  applied {}  checkpoint {}\n",
        st.last_seq, st.durable_seq, st.applied_seq, st.checkpoint_seq
    );
    out += &format!(
        "journal    {used} of {cap} used ({:.1}%), engine {}\n",
        if cap > 0 {
            used as f64 * 100.0 / cap as f64
        } else {
            0.0
        },
        quoted(&j.engine)
    );
    for t in &st.targets {
        out += &target_text(t);
    }
    if let RoleStatus::Primary(p) = &st.role {
        for a in &p.archives {
            out += &archive_text(a);
        }
    }
    match &st.role {
        RoleStatus::Primary(p) => out += &primary_text(p),
        RoleStatus::Standby(s) => out += &standby_text(s),
    }
    for m in &st.cluster {
        out += &format!(
            "member     {}  {}  {}  epoch {}  {}\n",
            quoted(&m.name),
            m.address,
            m.role,
            m.epoch.map_or_else(|| "?".to_string(), |e| e.to_string()),
            if m.connected {
                m.state.clone()
            } else {
                format!("{} (not connected)", m.state)
            }
        );
    }
    for vol in &st.volumes {
        out += &format!(
            "volume     {}  {} bytes  {}{}\n",
            vol.name,
            vol.size_bytes,
            vol.export.as_deref().unwrap_or(""),
            cache_text(vol)
        );
    }
    out
}

/// A volume's cache mode: `  cache MODE`, with the effective one when it differs
/// (`  cache writethrough-until-flush (now writeback)`).
fn cache_text(vol: &ferry_api::status::VolumeStatus) -> String {
    match (&vol.cache, &vol.cache_effective) {
        (Some(c), Some(now)) if c != now => format!("  cache {c} (now {now})"),
        (Some(c), _) => format!("  cache {c}"),
        (None, _) => String::new(),
    }
}

/// A replication target's line, and its tracking line when it is not streaming or
/// lost recovery points.
fn target_text(t: &TargetStatus) -> String {
    let mut out = format!(
        "target     {} {} ({})  {}  acked {}  applied {}  lag {} bytes / {:.3} s{}\n",
        t.name,
        t.address,
        t.effective_mode.status_str(),
        t.state,
        t.acked_seq,
        t.applied_seq,
        t.lag_bytes,
        t.lag_seconds,
        detail("last error", t.last_error.as_deref())
    );
    out += &wire_text(&t.wire);
    let tr = &t.track;
    if tr.tracking != "streaming" || tr.points_lost.is_some() {
        out += &format!(
            "           tracking {}: {} bytes dirty, {} bytes resynced{}\n",
            tr.tracking,
            tr.dirty_bytes,
            tr.resync_bytes,
            tr.points_lost
                .map(|lost| format!(
                    ", recovery points after {} up to {} lost",
                    lost.after_seq,
                    lost.through_seq
                        .map_or("the end of the resync".to_string(), |s| s.to_string())
                ))
                .unwrap_or_default()
        );
    }
    out
}

/// A target's wire line once it shipped data or has compression or a cap set: bytes
/// written against bytes on the wire and their ratio.
fn wire_text(w: &ferry_api::status::WireStatus) -> String {
    let configured = w.compress != "off" || w.max_bandwidth.is_some();
    if w.payload_bytes == 0 && !configured {
        return String::new();
    }
    let level = if w.level > 0 {
        format!(" level {}", w.level)
    } else {
        String::new()
    };
    let cap = w
        .max_bandwidth
        .map(|b| {
            format!(
                ", cap {} (throttled {:.1} s)",
                ferry_api::size::format_bandwidth(b),
                w.throttled_seconds
            )
        })
        .unwrap_or_default();
    format!(
        "           wire compress {}{level}: {} bytes written, {} on the wire, ratio {}, {} zero bytes as lengths{cap}\n",
        w.compress,
        w.payload_bytes,
        w.wire_bytes,
        w.ratio.map_or("-".to_string(), |r| format!("{r:.2}")),
        w.zero_bytes,
    )
}

/// An archive target's line (what it holds, how far behind) and what it stores.
fn archive_text(a: &ArchiveStatus) -> String {
    let mut out = format!(
        "archive    {} {}  {}  archived seq {}  lag {:.3} s  uploaded {} bytes, last {}{}\n",
        a.name,
        a.url,
        a.state,
        a.archived_seq,
        a.lag_seconds,
        a.bytes_uploaded,
        a.last_upload.as_deref().unwrap_or("never"),
        detail("last error", a.last_error.as_deref())
    );
    out += &format!(
        "           stored {} bytes{}, oldest point {}\n",
        a.stored_bytes,
        a.compression_ratio
            .map(|r| format!(" (compression {r:.2}x)"))
            .unwrap_or_default(),
        a.oldest_point
            .as_ref()
            .map_or("none".to_string(), |p| format!(
                "seq {} ({})",
                p.seq, p.time
            ))
    );
    out
}

fn primary_text(p: &PrimaryStatus) -> String {
    let mut out = String::new();
    if let Some(why) = &p.writes_refused {
        out += &format!("WRITES     refused: {why}\n");
    }
    if let Some(f) = p.fork_seq {
        let by = p.fork_by.as_deref().unwrap_or("promotion");
        out += &format!("fork       primary by {by} from sequence {f}\n");
    }
    if let Some(s) = &p.sync_policy {
        out += &format!("sync       {s} (replication.sync)\n");
    }
    out
}

fn standby_text(s: &StandbyStatus) -> String {
    let mut out = String::new();
    if let Some(r) = &s.resync {
        out += &format!(
            "replica    inconsistent: resyncing from seq {} (snapshot {}, copied {} of {} bytes{})\n",
            r.from_seq,
            r.snapshot_seq,
            r.copied_bytes,
            r.total_bytes,
            r.through_seq
                .map(|t| format!(", consistent again at {t}"))
                .unwrap_or_default()
        );
    }
    let p = &s.primary;
    // Cascading: the relay that ships to this standby, and whose session is live.
    let via = match (&p.via, &p.source) {
        (Some(v), Some(src)) => format!(", via {v} (session from {src})"),
        (Some(v), None) => format!(", via {v}"),
        (None, _) => String::new(),
    };
    out += &format!(
        "primary    {} {}{via}  (listening on {}){}\n",
        p.name,
        p.connected
            .as_deref()
            .map(|a| format!("connected from {a}"))
            .unwrap_or_else(|| "not connected".into()),
        p.listen,
        detail("last error", p.last_error.as_deref())
    );
    if let Some(why) = &s.paused {
        out += &format!("paused     {why}\n");
    }
    if let (true, Some(w)) = (s.pit.enabled, &s.pit.window) {
        out += &format!(
            "pit        window {} .. {}, {} points, undo {} of {} bytes{}\n",
            point_text(w.oldest.as_ref()),
            point_text(w.newest.as_ref()),
            w.points,
            w.used_bytes,
            w.max_bytes,
            detail("error", w.error.as_deref())
        );
    }
    out
}

/// A recovery point: `seq N (time)`, or `none`.
fn point_text(p: Option<&PitPoint>) -> String {
    p.map_or("none".to_string(), |p| {
        format!("seq {} ({})", p.seq, p.time)
    })
}

fn audit_verify(
    config: Option<&Path>,
    file: Option<&Path>,
    certs: &[PathBuf],
) -> anyhow::Result<()> {
    let (path, cfg_cert) = match (config, file) {
        (Some(_), Some(_)) => bail!("audit verify: give --config FILE or --file PATH, not both"),
        (None, Some(f)) => (f.to_path_buf(), None),
        (Some(_), None) => {
            let cfg = need_config(config)?;
            (cfg.audit_log_path(), cfg.tls.map(|t| t.cert))
        }
        (None, None) => {
            bail!("audit verify needs --config FILE (the node's config), --file PATH (the log) or DIR")
        }
    };
    let certs: Vec<PathBuf> = if certs.is_empty() {
        cfg_cert.into_iter().collect()
    } else {
        certs.to_vec()
    };
    if certs.is_empty() {
        eprintln!("note: checkpoint signatures not checked: give --cert PEM (the node's certificate) or --config of a node with [tls]");
        return match ferry_api::audit::files::verify_chain(&path) {
            Ok(r) => {
                audit_ok(&r);
                Ok(())
            }
            Err(e) => bail!("audit log {} FAILED: {e}", path.display()),
        };
    }
    let verifier = audit_certs(&certs)?;
    match ferry_api::audit::checkpoint::verify_signed(&path, &verifier) {
        Ok(r) => {
            audit_ok(&r.chain);
            print!("{}", signed_details(&r, &certs));
            Ok(())
        }
        Err(e) => bail!("audit log {} FAILED: {e}", path.display()),
    }
}

fn audit_ok(r: &ferry_api::audit::files::ChainReport) {
    println!(
        "audit log OK: {} entries, last hash {}",
        r.entries, r.last_hash
    );
    print!("{}", audit_details(r));
}

/// The node certificates that checkpoint signatures are checked against.
struct AuditCerts(ferry_transport::nodesig::CertSet);

impl ferry_api::audit::checkpoint::CheckpointVerifier for AuditCerts {
    fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        self.0
            .verify(alg, cert, msg, sig)
            .map_err(|e| e.to_string())
    }
}

fn audit_certs(paths: &[PathBuf]) -> anyhow::Result<AuditCerts> {
    let mut set = ferry_transport::nodesig::CertSet::default();
    for p in paths {
        let pem = std::fs::read_to_string(p)
            .with_context(|| format!("reading certificate {}", p.display()))?;
        set.add_pem(&pem)
            .with_context(|| format!("certificate {}", p.display()))?;
    }
    Ok(AuditCerts(set))
}

/// The checkpoint lines of `audit verify`: how many signatures held, against what,
/// and how many lines no signature covers.
fn signed_details(r: &ferry_api::audit::checkpoint::SignedReport, certs: &[PathBuf]) -> String {
    let names: Vec<String> = certs.iter().map(|p| p.display().to_string()).collect();
    let mut out = match &r.last {
        Some(at) => format!(
            "signatures OK: {} checkpoint(s) verified against {}; newest: {at}\n",
            r.checkpoints,
            names.join(", ")
        ),
        None => "signatures: no checkpoint in the log (written before format 3, or by a node without [tls])\n".to_string(),
    };
    if r.unsigned_tail > 0 {
        out.push_str(&format!(
            "unsigned tail: {} line(s) after the newest checkpoint: no signature covers them (lines since the last checkpoint of a running node, a crash, or a tail edited or cut)\n",
            r.unsigned_tail
        ));
    } else {
        out.push_str("unsigned tail: none\n");
    }
    out
}

/// What `audit verify` adds to its OK line when there is more than one file, when the
/// oldest files were removed, or when intents have no outcome.
fn audit_details(r: &ferry_api::audit::files::ChainReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if r.files.len() > 1 {
        let files: Vec<String> = r
            .files
            .iter()
            .map(|f| match f.seqs {
                Some((a, b)) => format!("{} (seq {a}-{b})", f.name),
                None => format!("{} (empty)", f.name),
            })
            .collect();
        let _ = writeln!(out, "files: {}", files.join(", "));
    }
    if let Some(c) = &r.continues_from {
        let _ = writeln!(
            out,
            "chain checked from seq {}: it continues {} (up to seq {}), which is no longer present (removed by [audit] keep_files, or by hand)",
            c.seq, c.prev_file, c.prev_seq
        );
    }
    if !r.open_intents.is_empty() {
        let _ = writeln!(
            out,
            "{} intent(s) without an outcome (interrupted by a crash, or still running):",
            r.open_intents.len()
        );
        for o in &r.open_intents {
            let _ = writeln!(
                out,
                "  seq {} {} at {} ({})",
                o.seq, o.request, o.time, o.file
            );
        }
    }
    out
}

/// `ferryctl reload`: what the node applied (each change on a line), or why it
/// refused (then nothing changed).
fn reload(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let v = call(cfg, &Request::Reload)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let applied = v["applied"].as_array().cloned().unwrap_or_default();
    if applied.is_empty() {
        println!("reloaded: nothing changed");
    }
    for a in applied {
        println!("reloaded: {}", a.as_str().unwrap_or_default());
    }
    for a in v["unaudited"].as_array().into_iter().flatten() {
        eprintln!(
            "warning: applied but not audited (see ferryd's log): {}",
            a.as_str().unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot from ferry-api's golden status files.
    fn golden(name: &str) -> NodeStatus {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../api/tests/golden")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    // The expected texts are what ferryctl printed for the same JSON when it read the
    // status by string keys.
    #[test]
    fn a_primary_status_reads_as_before() {
        assert_eq!(
            status_text(&golden("status-primary.json")),
            r#"node       "site-a" ("primary"), epoch 2
sequence   last 130  durable 128  applied 127  checkpoint 100
journal    1048576 of 67108864 used (1.6%), engine "io_uring"
target     dr1 10.0.0.2:7000 (async (degraded))  resyncing  acked 90  applied 88  lag 4096 bytes / 1.500 s
           last error: timed out
           wire compress zstd level 3: 1048576 bytes written, 262144 on the wire, ratio 4.00, 65536 zero bytes as lengths, cap 200Mbit (throttled 0.5 s)
           tracking resyncing: 65536 bytes dirty, 32768 bytes resynced, recovery points after 80 up to the end of the resync lost
WRITES     refused: outdated
fork       primary by promotion from sequence 77
volume     vol0  67108864 bytes  nbd://127.0.0.1:10809/vol0  cache writethrough-until-flush (now writeback)
"#
        );
    }

    #[test]
    fn a_primary_status_shows_its_sync_policy() {
        let mut st = golden("status-primary.json");
        let RoleStatus::Primary(p) = &mut st.role else {
            panic!("the primary golden file holds a standby");
        };
        p.sync_policy = Some("ANY 1 (dr1, dr2)".into());
        let text = status_text(&st);
        assert!(
            text.contains("fork       primary by promotion from sequence 77\nsync       ANY 1 (dr1, dr2) (replication.sync)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_primary_status_shows_its_archives() {
        let mut st = golden("status-primary.json");
        let RoleStatus::Primary(p) = &mut st.role else {
            panic!("the primary golden file holds a standby");
        };
        p.archives = vec![ArchiveStatus {
            name: "cold".into(),
            kind: "archive".into(),
            url: "s3://b/c1".into(),
            state: "retrying".into(),
            archived_seq: 120,
            lag_seconds: 2.5,
            bytes_uploaded: 4096,
            last_error: Some("timed out".into()),
            last_upload: Some("2023-11-14T22:13:20.000Z".into()),
            stored_bytes: 2048,
            compression_ratio: Some(3.0),
            oldest_point: Some(PitPoint {
                seq: 7,
                time: "2023-11-14T21:56:40.000Z".into(),
                timestamp_ns: 1_700_000_000_000_000_000,
            }),
        }];
        let text = status_text(&st);
        assert!(
            text.contains(
                "archive    cold s3://b/c1  retrying  archived seq 120  lag 2.500 s  uploaded 4096 bytes, last 2023-11-14T22:13:20.000Z\n           last error: timed out\n           stored 2048 bytes (compression 3.00x), oldest point seq 7 (2023-11-14T21:56:40.000Z)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_standby_status_reads_as_before() {
        let mut st = golden("status-standby.json");
        assert_eq!(
            status_text(&st),
            r#"node       "site-a" ("standby"), epoch 2
sequence   last 130  durable 128  applied 127  checkpoint 100
journal    1048576 of 67108864 used (1.6%), engine "io_uring"
replica    inconsistent: resyncing from seq 10 (snapshot 50, copied 8192 of 16384 bytes, consistent again at 60)
primary    primary connected from 10.0.0.1:40000  (listening on 10.0.0.2:7000)
paused     paused by an operator (ferryctl resume)
pit        window seq 12 (2023-11-14T21:56:40.000Z) .. none, 30 points, undo 1048576 of 4294967296 bytes
volume     vol0  67108864 bytes    cache writethrough-until-flush
"#
        );
        let RoleStatus::Standby(sb) = &mut st.role else {
            panic!("the standby golden file holds a primary");
        };
        sb.pit = ferry_api::status::PitStatus::disabled();
        sb.resync = None;
        sb.paused = None;
        sb.primary.connected = None;
        sb.primary.last_error = Some("refused".into());
        assert_eq!(
            status_text(&st),
            r#"node       "site-a" ("standby"), epoch 2
sequence   last 130  durable 128  applied 127  checkpoint 100
journal    1048576 of 67108864 used (1.6%), engine "io_uring"
primary    primary not connected  (listening on 10.0.0.2:7000)
           last error: refused
volume     vol0  67108864 bytes    cache writethrough-until-flush
"#
        );
        let RoleStatus::Standby(sb) = &mut st.role else {
            panic!("the standby golden file holds a primary");
        };
        sb.primary.connected = Some("10.0.0.3:40000".into());
        sb.primary.last_error = None;
        sb.primary.via = Some("dr1".into());
        sb.primary.source = Some("dr1".into());
        assert!(
            status_text(&st).contains(
                "primary    primary connected from 10.0.0.3:40000, via dr1 (session from dr1)  (listening on 10.0.0.2:7000)\n"
            ),
            "{}",
            status_text(&st)
        );
    }
}
