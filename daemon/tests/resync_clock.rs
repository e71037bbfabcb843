//! Liveness and time (issue 16, path 8, the rest): a bitmap resync's recovery point
//! carries the primary's clock, as every write-set's does, not the standby's. A test
//! "primary" (ferry-proto frames over QUIC, test_primary.rs) fakes that clock: it
//! stamps its ResyncBegin and ResyncEnd years away from this machine's.
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::wire::{Frame, ResyncBegin, ResyncData, ResyncEnd, ResyncExtent};
use ferryd::testkit::Node;

#[path = "common/test_primary.rs"]
mod test_primary;
use test_primary::{connect, standby_config};

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// 2001-09-09T01:46:40Z and 40 s later: nowhere near this machine's clock.
const PRIMARY_BEGIN_NS: u64 = 1_000_000_000_000_000_000;
const PRIMARY_END_NS: u64 = PRIMARY_BEGIN_NS + 40_000_000_000;

/// A resync from nothing to the primary's snapshot at 3, nothing written during the
/// copy: the copy alone is the primary's image at 3, a recovery point stamped with
/// the primary's time at the copy's end (it used to get the standby's clock).
#[test]
fn path8_a_resync_point_carries_the_primary_clock() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), true);
    let node = Node::start(ferryd(), &cfg);
    let epoch = node.status()["epoch"].as_u64().expect("epoch");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = connect(addr, &tls, epoch).await;
        assert!(s.negotiated.has_v2_tails(), "{:?}", s.negotiated);
        let frames = [
            Frame::ResyncBegin(ResyncBegin {
                epoch,
                from_seq: 0,
                snapshot_seq: 3,
                total_bytes: 4096,
                region_size: 65536,
                primary_time_ns: Some(PRIMARY_BEGIN_NS),
            }),
            Frame::ResyncData(ResyncData {
                epoch,
                extents: vec![ResyncExtent {
                    volume: 0,
                    offset: 8192,
                    length: 4096,
                    data: Some(Bytes::from(vec![0xcd; 4096])),
                }],
            }),
            Frame::ResyncEnd(ResyncEnd {
                epoch,
                through_seq: 3,
                bytes: 4096,
                data_bytes: 4096,
                primary_time_ns: Some(PRIMARY_END_NS),
            }),
        ];
        for f in &frames {
            s.data.send_frame(f).await.expect("send");
        }
        let acked = async {
            loop {
                match s.control_recv.recv_frame().await {
                    Ok(Some(Frame::Ack(a))) if a.received_durable_seq >= 3 => return Ok(()),
                    Ok(Some(Frame::Error(e))) => return Err(format!("{:?}: {}", e.code, e.reason)),
                    Ok(Some(_)) => continue,
                    other => return Err(format!("{other:?}")),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), acked)
            .await
            .expect("no ack of the resync within 30 s")
            .expect("the standby refused the resync");
    });
    let st = node.wait_status("the resync's point", Duration::from_secs(20), |st| {
        st["pit"]["newest"]["seq"].as_u64() == Some(3)
    });
    assert_eq!(st["replica"], "consistent", "{st:#}");
    assert_eq!(
        st["pit"]["newest"]["timestamp_ns"].as_u64(),
        Some(PRIMARY_END_NS),
        "the point is stamped with the standby's clock, not the primary's: {st:#}"
    );
    let img = std::fs::read(dir.path().join("primary/vol0.img")).unwrap();
    assert!(
        img[8192..12288].iter().all(|&b| b == 0xcd),
        "the copy landed"
    );
}
