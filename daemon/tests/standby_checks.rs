//! A real standby fed hand-crafted frame streams by a test "primary" (ferry-proto
//! frames over ferry-transport's QUIC with the cluster's TLS): order and range
//! checks happen before anything is journaled or written (issue 16, path 7).
use std::path::Path;
use std::time::Duration;

use ferry_proto::wire::ErrorCode;
use ferryd::testkit::Node;

#[path = "common/test_primary.rs"]
mod test_primary;
use test_primary::{answer, connect, standby_config, write_set, Answer, MIB};

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// With point-in-time recovery on, undo capture used to catch the range only after
/// the record was journaled and acked: apply stopped and the restart's replay
/// refused the record.
#[test]
fn standby_refuses_out_of_range_and_out_of_order_write_sets_before_writing() {
    refuses_before_writing(true);
}

/// Without it, nothing caught the range: the replica file grew.
#[test]
fn standby_without_pit_refuses_out_of_range_write_sets_before_writing() {
    refuses_before_writing(false);
}

/// Out of range, then out of order, then a valid write-set: the first two are
/// refused with Error frames and leave nothing behind; the standby applies the third
/// and restarts cleanly.
fn refuses_before_writing(pit: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), pit);
    let img = dir.path().join("primary/vol0.img");
    let mut node = Node::start(ferryd(), &cfg);
    let epoch = node.status()["epoch"].as_u64().expect("epoch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A record that ends past the 1 MiB replica.
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 1, MIB - 512, 0xee)).await {
            Answer::Error(ErrorCode::ResyncRequired, why) => {
                assert!(why.contains("beyond"), "{why}")
            }
            other => {
                panic!("an out-of-range record was not refused with a resync request: {other:?}")
            }
        }
        // A write-set after a gap (the standby holds nothing yet: 1 comes next).
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 3, 0, 0xdd)).await {
            Answer::Error(ErrorCode::Gap, why) => assert!(why.contains("expected"), "{why}"),
            other => {
                panic!("an out-of-order write-set was not refused with an Error frame: {other:?}")
            }
        }
        // Nothing moved: the next valid write-set is sequence 1.
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 1, 0, 0xab)).await {
            Answer::Durable(1) => {}
            other => panic!("a valid write-set after the refusals: {other:?}"),
        }
    });
    let st = node.wait_status("the valid write applied", Duration::from_secs(20), |st| {
        st["applied_seq"].as_u64() == Some(1)
    });
    assert_eq!(st["apply_error"], serde_json::Value::Null, "{st:#}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        MIB,
        "the replica grew"
    );
    let code = node.terminate();
    assert!(code.success(), "{code}\n{}", node.log_text());

    let node = Node::start(ferryd(), &cfg);
    let st = node.status();
    assert_eq!(st["durable_seq"], 1, "{st:#}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        MIB,
        "the replica grew"
    );
    let data = std::fs::read(&img).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0xab));
    assert!(
        data[4096..].iter().all(|&b| b == 0),
        "only the valid write landed"
    );
}
