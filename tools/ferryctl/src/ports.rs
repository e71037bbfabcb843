//! Which addresses `ferryctl init` gives each node's NBD export and metrics endpoint,
//! so that nodes sharing a host never collide: a promoted standby serves NBD while the
//! old primary restarts on the same machine, and every node runs a metrics endpoint.
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use ferry_api::config::parse_addr;

/// The default first metrics port (ferry's, as in the README's examples).
pub const DEFAULT_METRICS_PORT: u16 = 9640;

/// What `init` was told: the primary's NBD address, the nodes' replication addresses
/// (primary first) and the metrics options.
pub struct Request<'a> {
    pub nbd: &'a str,
    pub replication: Vec<&'a str>,
    pub metrics_port: Option<u16>,
    pub same_host: bool,
}

/// One node's addresses, in the order of [`Request::replication`].
#[derive(Debug, PartialEq, Eq)]
pub struct NodeAddrs {
    pub nbd: String,
    pub metrics: String,
}

pub fn assign(req: &Request) -> anyhow::Result<Vec<NodeAddrs>> {
    let nbd = parse_addr(req.nbd).map_err(|e| anyhow::anyhow!("--nbd: {e}"))?;
    let hosts: Vec<IpAddr> = req
        .replication
        .iter()
        .map(|a| parse_addr(a).map(|s| s.ip()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("replication address: {e}"))?;
    let nodes = hosts.len().max(1);
    // Port 0 (tests, demos) stays 0: the OS picks a free port per node.
    let metrics_base = req.metrics_port.unwrap_or(if nbd.port() == 0 {
        0
    } else {
        DEFAULT_METRICS_PORT
    });
    let mut out = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let nbd_addr = if i == 0 {
            nbd
        } else {
            standby_nbd(nbd, hosts[0], hosts[i], i, req.same_host)?
        };
        let metrics_port = offset(metrics_base, i).context("--metrics-port")?;
        out.push(NodeAddrs {
            nbd: nbd_addr.to_string(),
            metrics: SocketAddr::new(loopback(nbd.ip()), metrics_port).to_string(),
        });
    }
    if metrics_base != 0 {
        for n in &out {
            let port = |a: &str| a.rsplit(':').next().map(str::to_string);
            if out.iter().any(|m| port(&m.metrics) == port(&n.nbd)) {
                bail!("--metrics-port {metrics_base}: a metrics port would equal the NBD port of {}; choose another", n.nbd);
            }
        }
    }
    Ok(out)
}

/// A standby's NBD address: on the primary's host the next free port (`i` after the
/// primary's); elsewhere loopback or the wildcard as given, and a specific address of
/// the primary (which cannot be bound there) becomes the standby's own address.
fn standby_nbd(
    nbd: SocketAddr,
    primary_host: IpAddr,
    host: IpAddr,
    i: usize,
    same_host: bool,
) -> anyhow::Result<SocketAddr> {
    let shared =
        same_host || host == primary_host || (host.is_loopback() && primary_host.is_loopback());
    if shared {
        let port = offset(nbd.port(), i).context("--nbd")?;
        return Ok(SocketAddr::new(nbd.ip(), port));
    }
    if nbd.ip().is_unspecified() || nbd.ip().is_loopback() {
        return Ok(nbd);
    }
    Ok(SocketAddr::new(host, nbd.port()))
}

/// `base + i`, keeping 0 as "any free port".
fn offset(base: u16, i: usize) -> anyhow::Result<u16> {
    if base == 0 {
        return Ok(0);
    }
    u16::try_from(i)
        .ok()
        .and_then(|i| base.checked_add(i))
        .with_context(|| format!("port {base} + {i} is past 65535"))
}

/// The loopback address of the NBD address's family: metrics stay local by default.
fn loopback(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(nbd: &str, repl: &[&str], metrics: Option<u16>, same: bool) -> Vec<(String, String)> {
        assign(&Request {
            nbd,
            replication: repl.to_vec(),
            metrics_port: metrics,
            same_host: same,
        })
        .unwrap()
        .into_iter()
        .map(|a| (a.nbd, a.metrics))
        .collect()
    }

    #[test]
    fn nodes_on_one_host_get_their_own_ports() {
        let got = addrs(
            "127.0.0.1:10809",
            &["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"],
            None,
            false,
        );
        let want = [
            ("127.0.0.1:10809", "127.0.0.1:9640"),
            ("127.0.0.1:10810", "127.0.0.1:9641"),
            ("127.0.0.1:10811", "127.0.0.1:9642"),
        ];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
        // Same numeric host, not loopback.
        let got = addrs(
            "10.0.0.5:10809",
            &["10.0.0.5:7001", "10.0.0.5:7002"],
            Some(9700),
            false,
        );
        assert_eq!(got[1].0, "10.0.0.5:10810");
        assert_eq!(got[1].1, "127.0.0.1:9701");
    }

    #[test]
    fn nodes_on_other_hosts_keep_the_port_on_their_own_address() {
        let got = addrs(
            "10.0.0.1:10809",
            &["10.0.0.1:7001", "10.0.0.2:7001"],
            None,
            false,
        );
        assert_eq!(got[1].0, "10.0.0.2:10809");
        let got = addrs(
            "0.0.0.0:10809",
            &["10.0.0.1:7001", "10.0.0.2:7001"],
            None,
            false,
        );
        assert_eq!(got[1].0, "0.0.0.0:10809");
        // Unless the operator says they share a host (e.g. addresses of one machine).
        let got = addrs(
            "0.0.0.0:10809",
            &["10.0.0.1:7001", "10.0.0.2:7001"],
            None,
            true,
        );
        assert_eq!(got[1].0, "0.0.0.0:10810");
    }

    #[test]
    fn port_zero_stays_any_free_port() {
        let got = addrs(
            "127.0.0.1:0",
            &["127.0.0.1:7001", "127.0.0.1:7002"],
            None,
            false,
        );
        assert!(
            got.iter()
                .all(|(n, m)| n == "127.0.0.1:0" && m == "127.0.0.1:0"),
            "{got:?}"
        );
        assert_eq!(addrs("127.0.0.1:10809", &[], None, false).len(), 1);
    }

    #[test]
    fn colliding_or_overflowing_ports_are_refused() {
        let req = |nbd, m| Request {
            nbd,
            replication: vec!["127.0.0.1:7001", "127.0.0.1:7002"],
            metrics_port: Some(m),
            same_host: false,
        };
        assert!(assign(&req("127.0.0.1:9640", 9639)).is_err());
        assert!(assign(&req("127.0.0.1:65535", 9640)).is_err());
        assert!(assign(&req("127.0.0.1:10809", 65535)).is_err());
    }
}
