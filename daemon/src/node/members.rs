//! Cluster membership at run time (`[cluster]`): whom a standby accepts, which newer
//! primary it follows ([`refused_hook`]: a member that dials as the primary of a
//! newer epoch is recorded as this node's primary, then the node restarts in that
//! epoch; never an older one), the position probe `promote` uses to refuse a standby
//! that holds less than another reachable one ([`Prober`]), and the cluster as this
//! node sees it for `status` ([`cluster_view`]).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use ferry_api::config::{ClusterNode, Config};
use ferry_api::status::MemberStatus;
use ferry_journal::Seq;
use ferry_proto::session::{HandshakeError, LocalIdentity};
use ferry_proto::wire::{Frame, Hello, Role};
use ferry_transport::quic::{self, QuicError, TlsMaterial, TransportOptions};

use crate::node::lifecycle::Lifecycle;
use crate::node::recovery::Recovered;
use crate::replica::session::RefusedHook;

/// How long a position probe waits for one member (unreachable ones are skipped).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The TLS names a standby admits: its primary, and every other member.
pub(crate) fn accepted_names(cfg: &Config, primary: &str) -> Vec<String> {
    let mut names = vec![primary.to_string()];
    for n in cfg.peers() {
        if !names.contains(&n.name) {
            names.push(n.name.clone());
        }
    }
    names
}

/// What a Hello the handshake refused means to a standby.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A member is the primary of a newer epoch: follow it.
    Follow { epoch: u64, primary: String },
    /// A standby asked for this node's position (`promote` on it).
    Probe { from: String },
    /// Anything else: the session ends with the refusal, as without membership.
    Other,
}

/// Decides what a refused Hello means. The sender must be who its certificate says
/// (`cert_names`, verified against the cluster CA) and a member; only a newer epoch
/// is followed (an older or equal one is refused by the handshake as before).
pub(crate) fn classify(
    hello: &Hello,
    cert_names: &[String],
    err: &QuicError,
    members: &[String],
) -> Refused {
    let name = &hello.node_name;
    if !cert_names.contains(name) || !members.contains(name) {
        return Refused::Other;
    }
    match (hello.role, err) {
        (Role::Standby, _) => Refused::Probe { from: name.clone() },
        (Role::Primary, QuicError::Handshake(HandshakeError::LocalEpochStale { local, peer }))
            if peer > local =>
        {
            Refused::Follow {
                epoch: *peer,
                primary: name.clone(),
            }
        }
        _ => Refused::Other,
    }
}

/// The standby's answer to a refused Hello ([`classify`]): following records the new
/// primary and its epoch in one metadata transaction (as a demote does), then
/// restarts the node, which accepts that primary in that epoch; the primary's
/// resume plan (fork, cut) then decides between streaming and a resync.
/// `relay_probe` asks this node's relay (its `via`) for its role when the relay shows
/// a newer epoch ([`relay_is_primary`]).
pub(crate) fn refused_hook(
    rec: Arc<Recovered>,
    life: Arc<Lifecycle>,
    (members, via): (Vec<String>, Option<String>),
    relay_probe: Option<Arc<Prober>>,
) -> RefusedHook {
    let following = Arc::new(AtomicBool::new(false));
    Arc::new(
        move |hello, cert_names, err| match classify(hello, cert_names, err, &members) {
            Refused::Other => false,
            Refused::Probe { from } => {
                tracing::info!(peer = %from, "answered a position probe from standby '{from}'");
                true
            }
            Refused::Follow { epoch, primary } => {
                if following.swap(true, Ordering::SeqCst) {
                    return true;
                }
                let through_relay = via.as_deref() == Some(primary.as_str());
                let followed = tokio::task::block_in_place(|| {
                    let relayed =
                        through_relay && !relay_is_primary(relay_probe.as_deref(), epoch, &primary);
                    follow(&rec, epoch, &primary, relayed)
                });
                match followed {
                    Ok(()) => life.request_restart(),
                    Err(e) => {
                        following.store(false, Ordering::SeqCst);
                        tracing::error!("following '{primary}' (epoch {epoch}) failed: {e:#}");
                    }
                }
                true
            }
        },
    )
}

/// Whether this node's relay, which showed `epoch` in the primary role of the
/// handshake, is that epoch's primary itself (it was promoted) rather than relaying
/// it: both Hellos look alike, but on its listener a primary answers a position
/// probe in the primary role and a standby in the standby role. A promoted relay
/// knows its fork, so the normal resume plan applies; a relay that only relays, or
/// one that does not answer (`false`), costs a resync by digest instead. Blocks for
/// at most [`PROBE_TIMEOUT`]: call it inside `block_in_place`.
fn relay_is_primary(probe: Option<&Prober>, epoch: u64, relay: &str) -> bool {
    let Some(probe) = probe else {
        return false;
    };
    let answers = tokio::runtime::Handle::current().block_on(probe.positions(0));
    let primary = answers
        .iter()
        .any(|p| p.name == relay && p.role == Role::Primary && p.epoch == epoch);
    tracing::info!(
        relay,
        epoch,
        "relay '{relay}' is {} of epoch {epoch}",
        if primary {
            "the primary"
        } else {
            "not the primary (or did not answer)"
        }
    );
    primary
}

/// Records `primary` as the primary of `epoch` for this standby, if `epoch` is newer
/// than the one it is in (read again: two dialers may race). `relayed`: the newer
/// epoch came through this node's relay (cascading), which does not know the new
/// primary's fork: this node asks it for a full resync by digest first (recorded
/// before the role change, so a crash between the two only costs a resync).
fn follow(rec: &Recovered, epoch: u64, primary: &str, relayed: bool) -> anyhow::Result<()> {
    let current = rec.meta.epoch()?;
    if epoch <= current {
        bail!("epoch {epoch} is not newer than this node's {current}");
    }
    if relayed {
        rec.meta.set_relay_resync(true)?;
    }
    let before = rec.meta.primary_name()?.unwrap_or_default();
    rec.meta
        .change_role(epoch, "standby", Some(primary), None)?;
    tracing::warn!(
        primary,
        epoch,
        previous_epoch = current,
        previous_primary = %before,
        "'{primary}' is the primary of epoch {epoch}: following it (restarting in the new epoch)"
    );
    Ok(())
}

/// A member's answer to a position probe.
#[derive(Debug, Clone)]
pub(crate) struct Position {
    pub(crate) name: String,
    pub(crate) epoch: u64,
    /// What it holds durably (its Hello's resume position).
    pub(crate) durable: Seq,
    /// The role it answered in: a primary's listener answers in the primary role.
    pub(crate) role: Role,
}

/// Asks the other standbys where they are: a Hello in the standby role (which they
/// refuse after sending their own Hello, with their epoch and durable position).
pub(crate) struct Prober {
    pub(crate) tls: Arc<TlsMaterial>,
    pub(crate) local: LocalIdentity,
    pub(crate) opts: TransportOptions,
    /// The members to ask (not this node, not the primary it follows).
    pub(crate) peers: Vec<ClusterNode>,
}

impl Prober {
    /// Every reachable member's position; unreachable ones are left out (logged).
    pub(crate) async fn positions(&self, durable: Seq) -> Vec<Position> {
        let mut tasks = tokio::task::JoinSet::new();
        for n in self.peers.clone() {
            let (tls, mut local, opts) = (self.tls.clone(), self.local.clone(), self.opts.clone());
            local.expected_peer_name = n.name.clone();
            tasks.spawn(async move {
                let r = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    probe_one(&tls, &local, &opts, &n, durable),
                )
                .await
                .map_err(|_| anyhow!("no answer within {PROBE_TIMEOUT:?}"))
                .and_then(|r| r);
                (n.name, r)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((_, Ok(p))) => out.push(p),
                Ok((name, Err(e))) => {
                    tracing::info!("position probe: '{name}' not reachable: {e:#}")
                }
                Err(e) => tracing::warn!("position probe task: {e}"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// One probe: dial `n` (TLS checks its name), send a standby's Hello, read its Hello.
async fn probe_one(
    tls: &TlsMaterial,
    local: &LocalIdentity,
    opts: &TransportOptions,
    n: &ClusterNode,
    durable: Seq,
) -> anyhow::Result<Position> {
    let addr = ferry_api::config::parse_addr(&n.address).map_err(anyhow::Error::msg)?;
    let bind: std::net::SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let endpoint = quic::client_endpoint(bind)?;
    let client = quic::client_config(tls, &n.name, opts)?;
    let conn = quic::connect(&endpoint, client, addr, &n.name).await?;
    let (send, recv) = conn.open_bi().await?;
    let mut tx = quic::FramedSend::new(send);
    let mut rx = quic::FramedRecv::new(recv, opts.max_frame_len);
    tx.send_frame(&Frame::Hello(local.hello(durable))).await?;
    let answer = rx.recv_frame().await;
    conn.close(0u32.into(), b"position probe");
    endpoint.close(0u32.into(), b"position probe");
    match answer? {
        Some(Frame::Hello(h)) if h.node_name == n.name && h.cluster_id == local.cluster_id => {
            Ok(Position {
                name: n.name.clone(),
                epoch: h.epoch,
                durable: h.resume_position,
                role: h.role,
            })
        }
        Some(other) => bail!("answered {:?} instead of a Hello", other.frame_type()),
        None => bail!("closed the stream without a Hello"),
    }
}

/// Why `promote` must not go ahead given the other standbys' positions (`None`: it
/// may): one holds more than this node (`durable`), or one is in a newer epoch
/// already (another node was promoted).
pub(crate) fn behind_another(epoch: u64, durable: Seq, others: &[Position]) -> Option<String> {
    if let Some(p) = others.iter().find(|p| p.epoch > epoch) {
        return Some(format!(
            "standby '{}' is in epoch {} already (this node is in {epoch}): another node was \
             promoted; promoting this one too would make two primaries",
            p.name, p.epoch
        ));
    }
    let ahead = others
        .iter()
        .filter(|p| p.epoch == epoch && p.durable > durable)
        .max_by_key(|p| p.durable)?;
    Some(format!(
        "standby '{}' holds more: sequence {} (this node holds {durable}); promote '{}' \
         instead, or add --force to promote this one (the writes after {durable} are lost)",
        ahead.name, ahead.durable, ahead.name
    ))
}

/// What one member looks like from here (for [`cluster_view`]).
pub(crate) struct Seen {
    pub(crate) role: &'static str,
    pub(crate) connected: bool,
    pub(crate) state: String,
}

/// Every member as this node sees it: itself, and for the others what `seen` knows
/// (a target's state on a primary, the followed primary on a standby).
pub(crate) fn cluster_view(
    members: &[ClusterNode],
    me: &str,
    (my_role, epoch): (&str, u64),
    seen: impl Fn(&str) -> Option<Seen>,
) -> Vec<MemberStatus> {
    members
        .iter()
        .map(|m| {
            let s = if m.name == me {
                Some(Seen {
                    role: if my_role == "primary" {
                        "primary"
                    } else {
                        "standby"
                    },
                    connected: true,
                    state: "self".into(),
                })
            } else {
                seen(&m.name)
            };
            let (role, connected, state) = s
                .map_or(("unknown", false, "not in session".into()), |s| {
                    (s.role, s.connected, s.state)
                });
            MemberStatus {
                name: m.name.clone(),
                address: m.address.clone(),
                role: role.into(),
                // A peer in session is in this node's epoch (the handshake checks it).
                epoch: connected.then_some(epoch),
                connected,
                state,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str, role: Role, epoch: u64) -> Hello {
        Hello {
            epoch,
            min_version: 1,
            max_version: 1,
            cluster_id: [1; 16],
            node_id: [2; 16],
            node_name: name.into(),
            role,
            volumes: Vec::new(),
            resume_position: 9,
        }
    }

    fn stale(local: u64, peer: u64) -> QuicError {
        QuicError::Handshake(HandshakeError::LocalEpochStale { local, peer })
    }

    #[test]
    fn a_member_primary_of_a_newer_epoch_is_followed_and_nothing_else() {
        let members = vec!["primary".to_string(), "dr1".into(), "dr2".into()];
        let certs = |n: &str| vec![n.to_string()];
        let h = hello("dr1", Role::Primary, 2);
        assert_eq!(
            classify(&h, &certs("dr1"), &stale(1, 2), &members),
            Refused::Follow {
                epoch: 2,
                primary: "dr1".into()
            }
        );
        // The Hello names another node than the certificate: never followed.
        assert_eq!(
            classify(&h, &certs("dr2"), &stale(1, 2), &members),
            Refused::Other
        );
        // Not a member.
        let x = hello("dr9", Role::Primary, 5);
        assert_eq!(
            classify(&x, &certs("dr9"), &stale(1, 5), &members),
            Refused::Other
        );
        // An older epoch's primary (the old primary restarted without demote).
        let old = QuicError::Handshake(HandshakeError::StaleEpoch { local: 2, peer: 1 });
        let p = hello("primary", Role::Primary, 1);
        assert_eq!(
            classify(&p, &certs("primary"), &old, &members),
            Refused::Other
        );
        // Another refusal from a primary of the same epoch.
        let wrong = QuicError::Handshake(HandshakeError::WrongNode {
            expected: "primary".into(),
            got: "dr1".into(),
        });
        let same = hello("dr1", Role::Primary, 1);
        assert_eq!(
            classify(&same, &certs("dr1"), &wrong, &members),
            Refused::Other
        );
        // A standby's Hello is a position probe, whatever the refusal.
        let probe = hello("dr2", Role::Standby, 1);
        assert_eq!(
            classify(&probe, &certs("dr2"), &wrong, &members),
            Refused::Probe { from: "dr2".into() }
        );
    }

    #[test]
    fn promote_is_refused_behind_a_standby_that_holds_more_or_is_newer() {
        let p = |name: &str, epoch, durable| Position {
            name: name.into(),
            epoch,
            durable,
            role: Role::Standby,
        };
        assert_eq!(behind_another(1, 100, &[]), None);
        assert_eq!(behind_another(1, 100, &[p("dr2", 1, 100)]), None);
        assert_eq!(behind_another(1, 100, &[p("dr2", 1, 90)]), None);
        let why = behind_another(1, 90, &[p("dr2", 1, 95), p("dr3", 1, 120)]).unwrap();
        assert!(
            why.contains("'dr3' holds more: sequence 120") && why.contains("--force"),
            "{why}"
        );
        let why = behind_another(1, 100, &[p("dr2", 2, 10)]).unwrap();
        assert!(why.contains("epoch 2 already"), "{why}");
    }

    #[test]
    fn the_view_lists_every_member_with_what_is_known() {
        let m = |n: &str| ClusterNode {
            name: n.into(),
            address: format!("{n}:7000"),
            mode: Default::default(),
            via: None,
            via_fallback: None,
        };
        let v = cluster_view(
            &[m("primary"), m("dr1"), m("dr2")],
            "dr1",
            ("standby", 3),
            |n| {
                (n == "primary").then(|| Seen {
                    role: "primary",
                    connected: true,
                    state: "following".into(),
                })
            },
        );
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[0].role.as_str(), v[0].epoch, v[0].connected),
            ("primary", Some(3), true)
        );
        assert_eq!(
            (v[1].state.as_str(), v[1].role.as_str()),
            ("self", "standby")
        );
        assert_eq!(
            (v[2].role.as_str(), v[2].epoch, v[2].connected),
            ("unknown", None, false)
        );
    }
}
