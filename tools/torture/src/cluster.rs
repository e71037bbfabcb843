//! A two-node ferry cluster on loopback for one seed: `ferryctl init` (ports from the
//! OS), each node's target address routed through a [`LossyLink`] in front of the
//! other node, optionally the journal, undo log and volume of each node on small
//! loop filesystems, and the daemons themselves. Which node is primary changes
//! with switchovers and failovers; [`Cluster::primary`] tracks it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_testkit::udp_proxy::LossyLink;

use crate::daemon::{self, log_tail, Bins, Daemon};
use crate::diskfull::LoopFs;

pub const VOLUME: &str = "vol0";
pub const VOLUME_BYTES: u64 = 8 << 20;
pub const NAMES: [&str; 2] = ["primary", "dr1"];
/// Sync targets degrade after this long without confirmation (5 s by default; shorter
/// so partitions exercise the degrade-and-recover path in a short run).
pub const SYNC_TIMEOUT_MS: u64 = 2000;

/// Where a disk-full fault can strike on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Journal,
    Undo,
    Replica,
}

pub const AREAS: [Area; 3] = [Area::Journal, Area::Undo, Area::Replica];

pub struct Node {
    pub name: &'static str,
    pub config: PathBuf,
    pub volume: PathBuf,
    pub log: PathBuf,
    pub daemon: Option<Daemon>,
    /// The proxy in front of this node's replication listener.
    pub link: LossyLink,
    /// Journal, undo, replica filesystems (empty without disk-full faults).
    pub fs: Vec<(Area, LoopFs)>,
}

pub struct Cluster {
    pub bins: Bins,
    pub nodes: [Node; 2],
    /// Index of the node that is primary now.
    pub primary: usize,
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `ferryctl init` for `primary` and a sync standby `dr1`; returns their listen
/// addresses.
fn init(bins: &Bins, dir: &Path) -> Result<[SocketAddr; 2]> {
    let addrs = [free_udp_port()?, free_udp_port()?].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let out = Command::new(&bins.ferryctl)
        .arg("init")
        .arg("--dir")
        .arg(dir)
        .args([
            "--volume",
            &format!("{VOLUME}:8MiB"),
            "--nbd",
            "127.0.0.1:0",
        ])
        .args([
            "--journal-size",
            "32MiB",
            "--segment-size",
            "4MiB",
            "--mode",
            "sync",
        ])
        .arg("--primary")
        .arg(addrs[0].to_string())
        .arg("--standby")
        .arg(format!("dr1={}", addrs[1]))
        .output()
        .context("run ferryctl init")?;
    if !out.status.success() {
        bail!("ferryctl init: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(addrs)
}

/// Replaces exactly one occurrence of `from` in a config text.
fn replace_once(text: &str, from: &str, to: &str) -> Result<String> {
    if text.matches(from).count() != 1 {
        bail!("config: expected `{from}` once");
    }
    Ok(text.replacen(from, to, 1))
}

/// Replaces exactly one occurrence of `from` in the text after the one `section`
/// header (the rest of the text, however it repeats `from`, is left alone).
fn replace_once_after(text: &str, section: &str, from: &str, to: &str) -> Result<String> {
    let (Some(at), 1) = (text.find(section), text.matches(section).count()) else {
        bail!("config: expected `{section}` once");
    };
    let (head, tail) = text.split_at(at + section.len());
    let Some(pos) = tail.find(from) else {
        bail!("config: expected `{from}` after `{section}`");
    };
    let mut out = String::with_capacity(text.len() + to.len());
    out.push_str(head);
    out.push_str(&tail[..pos]);
    out.push_str(to);
    out.push_str(&tail[pos + from.len()..]);
    Ok(out)
}

/// Small loop filesystems for a node's journal, undo log and volume.
fn make_fs(dir: &Path, name: &str) -> Result<Vec<(Area, LoopFs)>> {
    let sizes = [
        (Area::Journal, 48u64 << 20),
        (Area::Undo, 40 << 20),
        (Area::Replica, 16 << 20),
    ];
    sizes
        .into_iter()
        .map(|(a, size)| Ok((a, LoopFs::new(dir, &format!("{name}-{a:?}"), size)?)))
        .collect()
}

/// Rewrites node `name`'s config from `ferryctl init`: shorter sync timeout, its
/// target (the other node, listening on `other`) reached through the proxy on
/// `proxy_port`, a small undo log, and journal, undo and volume on the loop
/// filesystems `fs` if any. Returns the config's and the volume's paths.
fn configure(
    dir: &Path,
    name: &str,
    other: SocketAddr,
    proxy_port: u16,
    fs: &[(Area, LoopFs)],
) -> Result<(PathBuf, PathBuf)> {
    let config = dir.join(format!("{name}.toml"));
    let mut text = std::fs::read_to_string(&config)?;
    text = replace_once(
        &text,
        "sync_timeout_ms = 5000",
        &format!("sync_timeout_ms = {SYNC_TIMEOUT_MS}"),
    )?;
    // The target's address only: `[[cluster.node]]` names the same address, but a
    // `[[replication.target]]` of the same name overrides the member's.
    text = replace_once_after(
        &text,
        "[[replication.target]]",
        &format!("address = \"{other}\""),
        &format!("address = \"127.0.0.1:{proxy_port}\""),
    )?;
    let mut volume = dir.join(name).join(format!("{VOLUME}.img"));
    let mut pit_dir = dir.join(name).join("undo");
    for (area, f) in fs {
        match area {
            Area::Journal => {
                let j = f.mnt.join("journal");
                text = replace_once(
                    &text,
                    &format!("dir = \"{name}/journal\""),
                    &format!("dir = {:?}", j.display().to_string()),
                )?;
            }
            Area::Undo => pit_dir = f.mnt.join("undo"),
            Area::Replica => {
                // Sparse, as `ferryctl init` makes it: ENOSPC comes with new blocks.
                let v = f.mnt.join(format!("{VOLUME}.img"));
                std::fs::File::create(&v)?.set_len(VOLUME_BYTES)?;
                text = replace_once(
                    &text,
                    &format!("path = \"{name}/{VOLUME}.img\""),
                    &format!("path = {:?}", v.display().to_string()),
                )?;
                volume = v;
            }
        }
    }
    // A small undo log in small segments: retention works within the run.
    text.push_str(&format!(
        "\n[pit]\ndir = {:?}\nmax_bytes = \"24MiB\"\nsegment_size = \"4MiB\"\n",
        pit_dir.display().to_string()
    ));
    std::fs::write(&config, text)?;
    Ok((config, volume))
}

impl Cluster {
    /// Creates (but does not start) the cluster under `dir`.
    pub fn create(bins: &Bins, dir: &Path, disk_faults: bool) -> Result<Cluster> {
        let addrs = init(bins, dir)?;
        let links = [LossyLink::new(addrs[0])?, LossyLink::new(addrs[1])?];
        let ports = [links[0].port, links[1].port];
        let mut nodes = Vec::new();
        for (i, link) in links.into_iter().enumerate() {
            let name = NAMES[i];
            let fs = if disk_faults {
                make_fs(dir, name)?
            } else {
                Vec::new()
            };
            let (config, volume) = configure(dir, name, addrs[1 - i], ports[1 - i], &fs)?;
            nodes.push(Node {
                name,
                log: dir.join(format!("{name}.log")),
                config,
                volume,
                daemon: None,
                link,
                fs,
            });
        }
        let nodes: [Node; 2] = nodes.try_into().map_err(|_| anyhow!("two nodes"))?;
        Ok(Cluster {
            bins: bins.clone(),
            nodes,
            primary: 0,
        })
    }

    pub fn standby(&self) -> usize {
        1 - self.primary
    }

    /// Starts node `i` (a restart after a kill); a daemon that cannot start is an error.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        n.daemon = Some(Daemon::start(&self.bins, &n.config, &n.log)?);
        Ok(())
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.nodes[i].daemon.take() {
            d.kill();
        }
    }

    /// Nodes whose daemon exited by itself (not killed by us), with the exit status.
    pub fn exited(&mut self) -> Vec<(usize, String)> {
        let mut v = Vec::new();
        for (i, n) in self.nodes.iter_mut().enumerate() {
            if let Some(st) = n.daemon.as_mut().and_then(|d| d.exited()) {
                n.daemon = None;
                v.push((i, format!("{st}")));
            }
        }
        v
    }

    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        daemon::status(&self.nodes[i].config)
    }

    pub fn wait(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let n = &self.nodes[i];
        daemon::wait_status(&n.config, what, timeout, ok).map_err(|e| {
            anyhow!(
                "{}: {e:#}\n  {} log tail:\n{}",
                n.name,
                n.name,
                log_tail(&n.log, 8)
            )
        })
    }

    /// The NBD address of the current primary, once it serves.
    pub fn primary_nbd(&self, timeout: Duration) -> Result<SocketAddr> {
        let st = self.wait(self.primary, "the primary to serve NBD", timeout, |st| {
            st["role"] == "primary" && daemon::nbd_addr(st).is_some()
        })?;
        daemon::nbd_addr(&st).ok_or_else(|| anyhow!("no NBD address in status"))
    }

    /// Every link back to perfect.
    pub fn heal(&self) {
        for n in &self.nodes {
            n.link.heal();
        }
    }

    /// Applies `f` to both directions' proxies.
    pub fn links(&self, f: impl Fn(&LossyLink)) {
        for n in &self.nodes {
            f(&n.link);
        }
    }

    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<serde_json::Value, String> {
        self.bins.ctl(&self.nodes[i].config, args)
    }

    pub fn fs(&self, i: usize, area: Area) -> Option<&LoopFs> {
        self.nodes[i]
            .fs
            .iter()
            .find(|(a, _)| *a == area)
            .map(|(_, f)| f)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Daemons first (they hold files on the loop filesystems), then the mounts.
        for n in &mut self.nodes {
            n.daemon = None;
        }
    }
}
