//! Fencing by epoch across role changes, with real ferryd processes and a userspace
//! UDP proxy in front of each node's replication address (a partition drops every
//! datagram between the nodes): a primary replaced while it was partitioned away
//! must refuse writes once the link heals, whichever node was promoted and however
//! often roles changed before (ferry-torture seed 101).
#[path = "common/pair.rs"]
mod pair;
use pair::*;

use ferry_api::control::Request;
use ferryd::testkit::Node;
use std::time::Duration;

/// Failover both ways, each while the old primary is partitioned away: after the
/// link heals, the old primary learns the newer epoch and refuses writes, and the new
/// primary holds every acknowledged write. The second failover is ferry-torture seed
/// 101: the promoted node used to expect its own name from the primary it replaced
/// (so that one's dial failed in TLS), and the old primary, dialled by the new one,
/// heard the newer epoch and did not fence itself: two nodes accepted writes.
#[test]
fn a_primary_replaced_while_partitioned_refuses_writes_once_it_hears_the_newer_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], links) = cluster(dir.path());
    let dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa1), 0, "a write on the first primary");

    // Failover 1: primary -> dr1 (epoch 2), the old primary partitioned away.
    partition(&links, true);
    control(
        &dr1,
        &Request::Promote {
            target: None,
            force: true,
        },
    );
    let d_addr = primary_of(&dr1, 2);
    assert_eq!(write(d_addr, 4096, 0xb2), 0, "a write on dr1, epoch 2");
    partition(&links, false);
    let st = wait(
        &primary,
        "the old primary to learn epoch 2",
        Duration::from_secs(60),
        |st| st["outdated"].is_object(),
    );
    assert_eq!(
        (
            st["outdated"]["epoch"].as_u64(),
            st["outdated"]["by"].as_str()
        ),
        (Some(2), Some("dr1")),
        "{st:#}"
    );
    assert_ne!(
        write(p_addr, 8192, 0xee),
        0,
        "the outdated primary accepted a write"
    );
    control(&primary, &Request::Demote);
    wait(
        &dr1,
        "dr1 to stream to the demoted primary",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["acked_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );

    // Failover 2: dr1 -> primary (epoch 3), dr1 partitioned away.
    partition(&links, true);
    control(
        &primary,
        &Request::Promote {
            target: None,
            force: true,
        },
    );
    let p_addr = primary_of(&primary, 3);
    assert_eq!(write(p_addr, 12288, 0xc3), 0, "a write on primary, epoch 3");
    partition(&links, false);
    let st = wait(
        &dr1,
        "dr1 to learn epoch 3",
        Duration::from_secs(60),
        |st| st["outdated"].is_object(),
    );
    assert_eq!(
        (
            st["outdated"]["epoch"].as_u64(),
            st["outdated"]["by"].as_str()
        ),
        (Some(3), Some("primary")),
        "{st:#}"
    );
    assert!(st["writes_refused"].is_string(), "{st:#}");
    assert_ne!(
        write(d_addr, 16384, 0xee),
        0,
        "the outdated dr1 accepted a write"
    );

    // Every acknowledged write is on the primary of epoch 3; the refused one nowhere.
    for (offset, tag) in [(0, 0xa1), (4096, 0xb2), (12288, 0xc3)] {
        assert!(
            read(p_addr, offset) == block(tag),
            "the write at {offset} is lost"
        );
    }
    assert!(
        read(p_addr, 16384) == block(0),
        "a refused write reached the primary"
    );
}
