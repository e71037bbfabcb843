//! Network namespaces for end-to-end tests: one per node, joined by veth pairs to a
//! bridge in the test's own namespace (which the test's NBD client uses), wrapper
//! scripts that run ferryd inside them, and partitions made with nft inside a node's
//! namespace only (the host's own ruleset is never touched). Removed on drop.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Each `Netns` of this process gets its own names and subnet.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The nft table a partition adds inside a node's namespace.
const PARTITION_TABLE: &str = "ferrytest_partition";

pub struct Netns {
    names: Vec<String>,
    /// The node end of each veth pair (inside its namespace).
    inner: Vec<String>,
    bridge: String,
    /// The bridge's address (this namespace's end of the links).
    pub bridge_ip: std::net::Ipv4Addr,
}

impl Netns {
    /// `n` namespaces `fm<id>-<i>`, node `i` at 10.77.<net>.<i + 1>/24, the bridge at
    /// .254. Returns the namespaces and the nodes' addresses.
    pub fn make(n: usize) -> Result<(Netns, Vec<String>), String> {
        let seq = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() % 10_000) * 10 + seq % 10;
        let net = (std::process::id() + seq) % 200;
        let mut ns = Netns {
            names: Vec::new(),
            inner: Vec::new(),
            bridge: format!("fmbr{id}"),
            bridge_ip: std::net::Ipv4Addr::new(10, 77, net as u8, 254),
        };
        ip(&["link", "add", &ns.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", ns.bridge_ip),
            "dev",
            &ns.bridge,
        ])?;
        ip(&["link", "set", &ns.bridge, "up"])?;
        let mut addrs = Vec::new();
        for i in 0..n {
            let name = format!("fm{id}-{i}");
            ip(&["netns", "add", &name])?;
            ns.names.push(name.clone());
            let (outer, inner) = (format!("fm{id}h{i}"), format!("fm{id}n{i}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &name])?;
            ip(&["link", "set", &outer, "master", &ns.bridge])?;
            ip(&["link", "set", &outer, "up"])?;
            let addr = format!("10.77.{net}.{}", i + 1);
            let exec = |args: &[&str]| {
                let mut a = vec!["netns", "exec", name.as_str(), "ip"];
                a.extend_from_slice(args);
                ip(&a)
            };
            exec(&["addr", "add", &format!("{addr}/24"), "dev", &inner])?;
            exec(&["link", "set", &inner, "up"])?;
            exec(&["link", "set", "lo", "up"])?;
            ns.inner.push(inner);
            addrs.push(addr);
        }
        Ok((ns, addrs))
    }

    /// A script that runs ferryd inside namespace `i` (`ip netns exec` keeps the pid).
    pub fn ferryd_in(&self, i: usize, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("ferryd-{}", self.names[i]));
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
                self.names[i],
                super::ferryd().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Cuts node `i` off: nft inside its namespace drops every packet in and out of
    /// its link (loopback and the control socket are untouched).
    pub fn partition(&self, i: usize) -> Result<(), String> {
        let link = &self.inner[i];
        self.nft(
            i,
            &format!(
                "table inet {PARTITION_TABLE} {{\n\
                 chain in {{ type filter hook input priority 0; policy accept; iifname \"{link}\" drop; }}\n\
                 chain out {{ type filter hook output priority 0; policy accept; oifname \"{link}\" drop; }}\n\
                 }}\n"
            ),
        )
    }

    /// Lifts node `i`'s partition.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        self.nft(i, &format!("delete table inet {PARTITION_TABLE}\n"))
    }

    /// `nft -f -` with `rules` inside namespace `i`.
    fn nft(&self, i: usize, rules: &str) -> Result<(), String> {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.names[i], "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec … nft: {e}"))?;
        child
            .stdin
            .take()
            .ok_or("nft: no stdin")?
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft in {}: {}\n{rules}",
                self.names[i],
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends and nft tables with it.
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `ip ARGS…`, its stderr as the error.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
