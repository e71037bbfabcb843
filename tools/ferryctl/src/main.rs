//! `ferryctl`: the operator CLI for ferry.
//!
//! `ferryctl init` lays out a node directory; every other command talks to a running
//! ferryd through the control socket named in its config (`--config FILE`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ferryd::config::{
    format_id, valid_name, Config, ControlConfig, JournalConfig, NbdConfig, NodeConfig, Role,
    VolumeConfig, VOLUME_ALIGN,
};
use ferryd::control::{self, Request};
use ferryd::size::{parse_size, ByteSize};

#[derive(Parser)]
#[command(name = "ferryctl", version, about = "ferry operator CLI")]
struct Cli {
    /// The node's config file (for commands that talk to a running ferryd).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a node directory: DIR/primary.toml and DIR/primary/ with sparse volume files.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// NAME:SIZE, e.g. vol0:1GiB; repeatable.
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// NBD listen address HOST:PORT (numeric host).
        #[arg(long)]
        nbd: String,
        /// Journal size.
        #[arg(long, default_value = "1GiB")]
        journal_size: String,
        /// Journal segment size.
        #[arg(long, default_value = "64MiB")]
        segment_size: String,
    },
    /// Show the node's role, journal and replication state.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
        } => init(&dir, &volumes, &nbd, &journal_size, &segment_size),
        Cmd::Status { json } => status(&need_config(cli.config.as_deref())?, json),
    }
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

fn init(
    dir: &Path,
    volumes: &[String],
    nbd: &str,
    journal_size: &str,
    segment_size: &str,
) -> anyhow::Result<()> {
    let node = "primary";
    let cfg_path = dir.join(format!("{node}.toml"));
    if cfg_path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a node's configuration (remove the directory to start over)",
            cfg_path.display()
        );
    }
    let vols = volumes
        .iter()
        .map(|s| parse_volume(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cluster = [0u8; 16];
    getrandom::getrandom(&mut cluster).context("random cluster id")?;
    let data = PathBuf::from(node);
    let cfg = Config {
        node: NodeConfig {
            name: node.into(),
            role: Role::Primary,
            cluster_id: format_id(&cluster),
            metadata_dir: data.clone(),
        },
        journal: JournalConfig {
            dir: data.join("journal"),
            size: ByteSize(parse_size(journal_size).context("--journal-size")?),
            segment_size: ByteSize(parse_size(segment_size).context("--segment-size")?),
            engine: Default::default(),
            recovery: Default::default(),
            checkpoint_interval_ms: 30_000,
        },
        nbd: NbdConfig { listen: nbd.into() },
        control: ControlConfig {
            socket: data.join("ferryd.sock"),
        },
        volumes: vols
            .iter()
            .map(|(name, size)| VolumeConfig {
                name: name.clone(),
                path: data.join(format!("{name}.img")),
                size: ByteSize(*size),
            })
            .collect(),
    };
    cfg.validate()
        .map_err(|(key, msg)| anyhow::anyhow!("{key}: {msg}"))?;
    let node_dir = dir.join(node);
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
    std::fs::write(&cfg_path, cfg.to_toml())
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    println!("created {}", cfg_path.display());
    println!("start it:  ferryd --config {}", cfg_path.display());
    for v in &cfg.volumes {
        println!("export:    nbd://{nbd}/{} ({})", v.name, v.size);
    }
    Ok(())
}

fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let resp = control::call(&cfg.control.socket, &Request::Status)?;
    if !resp.ok {
        bail!("ferryd: {}", resp.error.unwrap_or_default());
    }
    let v = resp.result.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let g = |p: &str| v.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "node       {} ({}), epoch {}",
        g("/node"),
        g("/role"),
        g("/epoch")
    );
    println!(
        "sequence   last {}  durable {}  applied {}  checkpoint {}",
        g("/last_seq"),
        g("/durable_seq"),
        g("/applied_seq"),
        g("/checkpoint_seq")
    );
    let used = g("/journal/used_bytes").as_u64().unwrap_or(0);
    let cap = g("/journal/capacity_bytes").as_u64().unwrap_or(0);
    println!(
        "journal    {} of {} used ({:.1}%), engine {}",
        used,
        cap,
        if cap > 0 {
            used as f64 * 100.0 / cap as f64
        } else {
            0.0
        },
        g("/journal/engine")
    );
    if let Some(vols) = v.get("volumes").and_then(|v| v.as_array()) {
        for vol in vols {
            println!(
                "volume     {}  {} bytes  {}",
                vol["name"], vol["size_bytes"], vol["export"]
            );
        }
    }
    Ok(())
}
