//! Session state machine cases: one test per behaviour.

use bytes::Bytes;
use ferry_proto::session::*;
use ferry_proto::wire::*;

const EPOCH: Epoch = 5;

/// A write-set of `n` 4-byte writes starting at `first`.
fn ws(first: Seq, n: u64, ts: u64) -> WriteSet {
    let records = (0..n)
        .map(|i| WireRecord {
            seq: first + i,
            volume: 0,
            op: RecordOp::Write,
            offset: (first + i) * 4096,
            length: 4,
            data: Bytes::from((first + i).to_le_bytes()[..4].to_vec()),
        })
        .collect();
    WriteSet {
        epoch: EPOCH,
        first_seq: first,
        last_seq: first + n - 1,
        timestamp_ns: ts,
        records,
    }
}

fn ack(durable: Seq, applied: Seq) -> Ack {
    Ack {
        epoch: EPOCH,
        received_durable_seq: durable,
        applied_seq: applied,
        received_seq: durable,
    }
}

fn sender(max_count: usize, max_bytes: u64) -> Sender {
    Sender::new(
        EPOCH,
        SenderConfig {
            max_inflight_bytes: max_bytes,
            max_inflight_write_sets: max_count,
            max_queued_write_sets: 16,
            max_queued_bytes: u64::MAX,
        },
        0,
    )
}

#[test]
fn in_order_delivery_and_acks() {
    let mut tx = sender(8, 1 << 20);
    let mut rx = Receiver::new(EPOCH, 0, 0);
    tx.push(ws(1, 3, 100)).unwrap();
    tx.push(ws(4, 2, 200)).unwrap();
    let a = tx.poll_transmit().unwrap();
    let b = tx.poll_transmit().unwrap();
    assert!(tx.poll_transmit().is_none());
    assert_eq!(rx.on_write_set(a.clone()).unwrap(), Received::Accept(a));
    assert_eq!(rx.on_write_set(b.clone()).unwrap(), Received::Accept(b));
    let ack1 = rx.mark_durable(3).unwrap();
    assert_eq!(ack1, ack(3, 0));
    let out = tx.on_ack(&ack1).unwrap();
    assert_eq!(out.released_write_sets, 1);
    assert_eq!(tx.oldest_unacked_timestamp_ns(), Some(200));
    assert!((tx.lag_seconds(1_200) - 1e-6).abs() < 1e-12);
    rx.mark_durable(5).unwrap();
    let ack2 = rx.mark_applied(5).unwrap();
    tx.on_ack(&ack2).unwrap();
    assert_eq!((tx.durable_seq(), tx.applied_seq()), (5, 5));
    assert_eq!(tx.lag_bytes(), 0);
    assert_eq!(tx.lag_seconds(10_000), 0.0);
    assert_eq!(tx.inflight_write_sets(), 0);
}

#[test]
fn duplicate_resend_after_reconnect_is_skipped_and_reacked() {
    let mut tx = sender(8, 1 << 20);
    let mut rx = Receiver::new(EPOCH, 0, 0);
    tx.push(ws(1, 2, 1)).unwrap();
    tx.push(ws(3, 2, 2)).unwrap();
    for _ in 0..2 {
        let w = tx.poll_transmit().unwrap();
        assert!(matches!(rx.on_write_set(w).unwrap(), Received::Accept(_)));
    }
    let lost_ack = rx.mark_durable(4).unwrap(); // never reaches the primary
    let _ = lost_ack;
    // Reconnect: standby advertises durable 4; the primary had no ack at all.
    assert_eq!(
        tx.reset_for_resume(rx.resume_position().unwrap()).unwrap(),
        5
    );
    assert_eq!(tx.lag_bytes(), 0);
    assert!(tx.poll_transmit().is_none());

    // Resume position 2 (say a restart lost in-flight journal writes of 3..4
    // on a *fresh* receiver): the primary resends 3..4 only.
    let mut tx = sender(8, 1 << 20);
    tx.push(ws(1, 2, 1)).unwrap();
    tx.push(ws(3, 2, 2)).unwrap();
    while tx.poll_transmit().is_some() {}
    assert_eq!(tx.reset_for_resume(2).unwrap(), 3);
    assert_eq!(tx.poll_transmit().unwrap().first_seq, 3);

    // A receiver that survived the reconnect sees resends of what it already
    // has as duplicates and answers with its current position.
    let mut rx = Receiver::new(EPOCH, 0, 0);
    rx.on_write_set(ws(1, 4, 1)).unwrap();
    rx.mark_durable(2).unwrap();
    assert_eq!(rx.resume_position(), None, "appends 3..4 still in flight");
    assert_eq!(
        rx.on_write_set(ws(1, 2, 1)).unwrap(),
        Received::Duplicate(ack(2, 0))
    );
    assert_eq!(
        rx.on_write_set(ws(3, 2, 1)).unwrap(),
        Received::Duplicate(ack(2, 0))
    );
}

#[test]
fn partially_overlapping_resend_is_trimmed() {
    let mut rx = Receiver::new(EPOCH, 0, 0);
    rx.on_write_set(ws(1, 3, 1)).unwrap();
    let Received::Accept(rest) = rx.on_write_set(ws(2, 4, 1)).unwrap() else {
        panic!("expected accept");
    };
    assert_eq!((rest.first_seq, rest.last_seq), (4, 5));
    assert_eq!(rest.records.len(), 2);
    assert_eq!(rest.records[0].seq, 4);
    assert_eq!(rx.received_seq(), 5);
    // The trimmed write-set is still a valid frame.
    assert!(encode(&Frame::WriteSet(rest)).is_ok());
}

#[test]
fn gap_is_detected() {
    let mut rx = Receiver::new(EPOCH, 10, 10);
    assert_eq!(
        rx.on_write_set(ws(12, 1, 1)),
        Err(ReceiveError::Gap {
            expected: 11,
            got: 12
        })
    );
    assert_eq!(
        rx.on_write_set(ws(12, 1, 1)).unwrap_err().code(),
        ErrorCode::Gap
    );
}

#[test]
fn window_limits_count_and_bytes() {
    let mut tx = sender(2, 1 << 20);
    for i in 0..4 {
        tx.push(ws(1 + i, 1, i)).unwrap();
    }
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_none(), "count window");
    tx.on_ack(&ack(1, 0)).unwrap();
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_none());

    // Byte window: each write-set is 32 + 32 + 36 = 100 wire bytes.
    let one = ws(1, 1, 0).encoded_len() as u64;
    let mut tx = sender(100, one * 2 + one / 2);
    for i in 0..4 {
        tx.push(ws(1 + i, 1, i)).unwrap();
    }
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_none(), "byte window");
    assert_eq!(tx.inflight_bytes(), one * 2);

    // A write-set larger than the byte window still goes out alone.
    let mut tx = sender(100, 1);
    tx.push(ws(1, 3, 0)).unwrap();
    tx.push(ws(4, 1, 0)).unwrap();
    assert!(tx.poll_transmit().is_some());
    assert!(tx.poll_transmit().is_none());
}

#[test]
fn queue_is_bounded_and_contiguous() {
    let mut tx = sender(1, 1);
    assert_eq!(
        tx.push(ws(2, 1, 0)),
        Err(SenderError::NotContiguous {
            expected: 1,
            got: 2
        })
    );
    for i in 0..16 {
        tx.push(ws(1 + i, 1, 0)).unwrap();
    }
    assert_eq!(
        tx.push(ws(17, 1, 0)),
        Err(SenderError::QueueFull { limit: 16 })
    );
}

/// A lagging target's queue is bounded in bytes as well as in write-sets: 4096
/// write-sets of up to 4 MiB let a primary shipping 1 MiB writes to a slow standby
/// grow past 2 GB of resident memory (`e2e --jobs write-1m-qd8 --targets ferry-async`).
#[test]
fn queue_is_bounded_in_bytes() {
    let one = ws(1, 4, 0).encoded_len() as u64;
    let mut tx = Sender::new(
        EPOCH,
        SenderConfig {
            max_inflight_bytes: u64::MAX,
            max_inflight_write_sets: 64,
            max_queued_write_sets: 4096,
            max_queued_bytes: 3 * one,
        },
        0,
    );
    for i in 0..3 {
        tx.push(ws(1 + 4 * i, 4, 0)).unwrap();
    }
    assert_eq!(
        tx.push(ws(13, 4, 0)),
        Err(SenderError::QueueBytesFull { limit: 3 * one })
    );
    assert_eq!(tx.lag_bytes(), 3 * one);
    // Acknowledged write-sets free their bytes: the refused one fits again.
    for _ in 0..3 {
        tx.poll_transmit().unwrap();
    }
    tx.on_ack(&ack(4, 0)).unwrap();
    tx.push(ws(13, 4, 0)).unwrap();
}

/// However small the byte bound, an empty queue takes one write-set: a write-set
/// larger than the bound must not wedge the session.
#[test]
fn an_empty_queue_takes_one_write_set_larger_than_its_byte_bound() {
    let mut tx = Sender::new(
        EPOCH,
        SenderConfig {
            max_queued_bytes: 1,
            ..SenderConfig::default()
        },
        0,
    );
    tx.push(ws(1, 4, 0)).unwrap();
    assert_eq!(
        tx.push(ws(5, 1, 0)),
        Err(SenderError::QueueBytesFull { limit: 1 })
    );
}

#[test]
fn stale_epoch_is_refused() {
    let mut rx = Receiver::new(EPOCH, 0, 0);
    let mut old = ws(1, 1, 0);
    old.epoch = EPOCH - 1;
    assert_eq!(
        rx.on_write_set(old),
        Err(ReceiveError::StaleEpoch {
            session: EPOCH,
            got: EPOCH - 1
        })
    );
    let mut newer = ws(1, 1, 0);
    newer.epoch = EPOCH + 1;
    assert!(matches!(
        rx.on_write_set(newer),
        Err(ReceiveError::EpochChanged { .. })
    ));

    let mut tx = sender(8, 1 << 20);
    tx.push(ws(1, 1, 0)).unwrap();
    tx.poll_transmit().unwrap();
    let mut stale = ack(1, 0);
    stale.epoch = EPOCH - 1;
    assert!(matches!(
        tx.on_ack(&stale),
        Err(SenderError::StaleEpoch { .. })
    ));
    stale.epoch = EPOCH + 1;
    assert!(matches!(
        tx.on_ack(&stale),
        Err(SenderError::PeerEpochNewer { .. })
    ));
}

#[test]
fn acks_going_backwards_or_beyond_sent_are_rejected() {
    let mut tx = sender(8, 1 << 20);
    tx.push(ws(1, 2, 0)).unwrap();
    tx.push(ws(3, 2, 0)).unwrap();
    tx.poll_transmit().unwrap();
    assert_eq!(
        tx.on_ack(&ack(3, 0)),
        Err(SenderError::AckBeyondSent { acked: 3, sent: 2 })
    );
    tx.poll_transmit().unwrap();
    tx.on_ack(&ack(3, 2)).unwrap();
    assert_eq!(
        tx.lag_bytes(),
        ws(4, 1, 0).encoded_len() as u64,
        "partial ack trims"
    );
    assert_eq!(
        tx.on_ack(&ack(2, 2)),
        Err(SenderError::AckWentBackwards {
            which: "received_durable_seq",
            previous: 3,
            got: 2
        })
    );
    assert_eq!(
        tx.on_ack(&ack(3, 1)),
        Err(SenderError::AckWentBackwards {
            which: "applied_seq",
            previous: 2,
            got: 1
        })
    );
    assert!(matches!(
        tx.on_ack(&ack(3, 4)),
        Err(SenderError::AppliedBeyondDurable { .. })
    ));
}

#[test]
fn resume_positions_that_contradict_history_are_errors() {
    let mut tx = sender(8, 1 << 20);
    tx.push(ws(1, 4, 0)).unwrap();
    tx.poll_transmit().unwrap();
    tx.on_ack(&ack(2, 0)).unwrap();
    assert!(matches!(
        tx.reset_for_resume(1),
        Err(SenderError::ResumeBehindDurable {
            resume: 1,
            durable: 2
        })
    ));
    assert!(matches!(
        tx.reset_for_resume(9),
        Err(SenderError::PeerAhead { .. })
    ));
}

#[test]
fn receiver_positions_are_monotonic_and_bounded() {
    let mut rx = Receiver::new(EPOCH, 0, 0);
    rx.on_write_set(ws(1, 3, 0)).unwrap();
    assert!(matches!(
        rx.mark_durable(4),
        Err(ReceiveError::Beyond { .. })
    ));
    rx.mark_durable(3).unwrap();
    assert!(matches!(
        rx.mark_durable(2),
        Err(ReceiveError::WentBackwards { .. })
    ));
    assert!(matches!(
        rx.mark_applied(4),
        Err(ReceiveError::Beyond { .. })
    ));
    rx.mark_applied(2).unwrap();
    assert!(matches!(
        rx.mark_applied(1),
        Err(ReceiveError::WentBackwards { .. })
    ));
}

// ---------------------------------------------------------------------------
// Handshake

fn identity(role: Role, name: &str, peer: &str) -> LocalIdentity {
    LocalIdentity {
        cluster_id: [1; 16],
        node_id: [name.len() as u8; 16],
        node_name: name.into(),
        role,
        epoch: EPOCH,
        min_version: 1,
        max_version: 1,
        volumes: vec![VolumeGeometry {
            id: 1,
            name: "db".into(),
            size_bytes: 1 << 30,
            block_size: 4096,
        }],
        expected_peer_name: peer.into(),
    }
}

#[test]
fn handshake_accepts_matching_peer_and_picks_highest_common_version() {
    let primary = identity(Role::Primary, "pri", "stby");
    let mut standby = identity(Role::Standby, "stby", "pri");
    standby.max_version = 3;
    let mut primary_v2 = primary.clone();
    primary_v2.max_version = 2;
    assert_eq!(
        validate_hello(&standby, &primary_v2.hello(100)),
        Ok(Negotiated { version: 2 })
    );
    assert_eq!(
        validate_hello(&primary, &standby.hello(7)),
        Ok(Negotiated { version: 1 })
    );
}

/// A V3 primary and a V2 standby agree on V2: no Packed frames on that session (the
/// primary sends the plain frames), V3 on both sides allows them.
#[test]
fn packed_frames_need_a_v3_peer() {
    let mut primary = identity(Role::Primary, "pri", "stby");
    primary.max_version = 3;
    let mut standby = identity(Role::Standby, "stby", "pri");
    standby.max_version = 2;
    let n = validate_hello(&primary, &standby.hello(0)).unwrap();
    assert_eq!(n, Negotiated { version: 2 });
    assert!(n.has_v2_tails() && !n.has_packed());
    standby.max_version = 3;
    let n = validate_hello(&primary, &standby.hello(0)).unwrap();
    assert!(n.has_packed() && !n.has_received_acks());
    assert_eq!(LocalIdentity::supported_versions(), (1, 4));
}

/// A V4 primary may ask a V4 standby for received acks, never a V3 one.
#[test]
fn received_acks_need_a_v4_peer() {
    let mut primary = identity(Role::Primary, "pri", "stby");
    primary.max_version = 4;
    let mut standby = identity(Role::Standby, "stby", "pri");
    standby.max_version = 3;
    let n = validate_hello(&primary, &standby.hello(0)).unwrap();
    assert!(!n.has_received_acks());
    standby.max_version = 4;
    let n = validate_hello(&primary, &standby.hello(0)).unwrap();
    assert_eq!(n, Negotiated { version: 4 });
    assert!(n.has_received_acks());
}

/// Asked for received acks, the standby acks each accepted write-set at once with its
/// received position (durable unchanged), and every later ack carries it too; the
/// primary's sender takes received ≥ durable and moves nothing else on it. Not asked,
/// the standby sends no received ack and its acks say received == durable (V1 frames).
#[test]
fn received_acks_run_ahead_of_durable_ones() {
    let mut tx = sender(8, 1 << 20);
    let mut rx = Receiver::new(EPOCH, 0, 0).with_received_acks(true);
    tx.push(ws(1, 3, 100)).unwrap();
    tx.push(ws(4, 2, 200)).unwrap();
    let a = tx.poll_transmit().unwrap();
    let b = tx.poll_transmit().unwrap();
    assert_eq!(rx.received_ack(), None, "nothing received yet");
    assert!(matches!(rx.on_write_set(a), Ok(Received::Accept(_))));
    let got = rx.received_ack().expect("a received ack");
    assert_eq!(
        (got.received_seq, got.received_durable_seq, got.applied_seq),
        (3, 0, 0)
    );
    assert_eq!(frame_version(&Frame::Ack(got)), ProtocolVersion::V4);
    let out = tx.on_ack(&got).unwrap();
    assert_eq!((out.received_seq, out.durable_seq), (3, 0));
    assert_eq!(out.released_write_sets, 0, "received is not durable");
    assert_eq!(tx.queued_write_sets(), 2);
    assert!(matches!(rx.on_write_set(b), Ok(Received::Accept(_))));
    let got = rx.received_ack().unwrap();
    tx.on_ack(&got).unwrap();
    assert_eq!(tx.received_seq(), 5);
    // Durable through 3: the ack still says received 5.
    let d = rx.mark_durable(3).unwrap();
    assert_eq!((d.received_durable_seq, d.received_seq), (3, 5));
    let out = tx.on_ack(&d).unwrap();
    assert_eq!((out.durable_seq, out.received_seq), (3, 5));
    assert_eq!(out.released_write_sets, 1);
    // Everything durable: received == durable, a V1 ack again.
    let d = rx.mark_durable(5).unwrap();
    assert_eq!(frame_version(&Frame::Ack(d)), ProtocolVersion::V1);
    assert_eq!(rx.received_ack(), None);
    tx.on_ack(&d).unwrap();
    assert_eq!((tx.durable_seq(), tx.received_seq()), (5, 5));

    let mut plain = Receiver::new(EPOCH, 0, 0);
    assert!(matches!(
        plain.on_write_set(ws(1, 3, 1)),
        Ok(Received::Accept(_))
    ));
    assert_eq!(plain.received_ack(), None, "not asked");
    assert_eq!(plain.ack().received_seq, 0, "a durable ack only");
}

#[test]
fn received_acks_that_break_the_order_are_rejected() {
    let mut tx = sender(8, 1 << 20);
    tx.push(ws(1, 4, 1)).unwrap();
    tx.poll_transmit().unwrap();
    let with = |durable, applied, received| Ack {
        received_seq: received,
        ..ack(durable, applied)
    };
    assert_eq!(
        tx.on_ack(&with(2, 0, 1)),
        Err(SenderError::ReceivedBelowDurable {
            received: 1,
            durable: 2
        })
    );
    assert_eq!(
        tx.on_ack(&with(2, 0, 5)),
        Err(SenderError::AckBeyondSent { acked: 5, sent: 4 })
    );
    tx.on_ack(&with(1, 0, 3)).unwrap();
    assert_eq!(
        tx.on_ack(&with(2, 0, 2)),
        Err(SenderError::AckWentBackwards {
            which: "received_seq",
            previous: 3,
            got: 2
        })
    );
    assert_eq!(
        SenderError::ReceivedBelowDurable {
            received: 1,
            durable: 2
        }
        .code(),
        ErrorCode::Protocol
    );
    // A new session resumes at the standby's durable position: received with it.
    assert_eq!(tx.reset_for_resume(1), Ok(2));
    assert_eq!(tx.received_seq(), 1);
}

#[test]
fn handshake_rejections() {
    let primary = identity(Role::Primary, "pri", "stby");
    let standby = identity(Role::Standby, "stby", "pri");
    let ok = standby.hello(0);

    let mut h = ok.clone();
    h.cluster_id = [2; 16];
    assert_eq!(
        validate_hello(&primary, &h).unwrap_err().code(),
        ErrorCode::WrongCluster
    );

    let mut h = ok.clone();
    h.node_name = "other".into();
    assert_eq!(
        validate_hello(&primary, &h).unwrap_err().code(),
        ErrorCode::WrongNode
    );

    let mut h = ok.clone();
    h.role = Role::Primary;
    assert_eq!(
        validate_hello(&primary, &h).unwrap_err().code(),
        ErrorCode::RoleMismatch
    );

    let mut h = ok.clone();
    h.epoch = EPOCH - 1;
    assert!(matches!(
        validate_hello(&primary, &h),
        Err(HandshakeError::StaleEpoch { .. })
    ));
    h.epoch = EPOCH + 1;
    assert!(matches!(
        validate_hello(&primary, &h),
        Err(HandshakeError::LocalEpochStale { .. })
    ));

    let mut h = ok.clone();
    h.min_version = 2;
    h.max_version = 4;
    assert_eq!(
        validate_hello(&primary, &h).unwrap_err().code(),
        ErrorCode::VersionMismatch
    );

    let mut h = ok.clone();
    h.volumes[0].size_bytes *= 2;
    assert_eq!(
        validate_hello(&primary, &h).unwrap_err().code(),
        ErrorCode::GeometryMismatch
    );
    let mut h = ok.clone();
    h.volumes[0].name = "renamed".into();
    assert!(validate_hello(&primary, &h).is_ok(), "names are labels");
    let mut h = ok.clone();
    h.volumes.push(VolumeGeometry {
        id: 2,
        name: String::new(),
        size_bytes: 4096,
        block_size: 4096,
    });
    assert!(validate_hello(&primary, &h).is_err());

    // Error frames built from handshake errors always encode.
    let err = validate_hello(&primary, &h).unwrap_err();
    assert!(encode(&Frame::Error(err.to_error_frame(EPOCH))).is_ok());
}

#[test]
fn plan_resume_cases() {
    let n = Negotiated { version: 1 };
    assert_eq!(plan_resume(n, EPOCH, 50, 10, 100).unwrap().resume_seq, 50);
    assert_eq!(
        plan_resume(n, EPOCH, 100, 200, 100).unwrap().resume_seq,
        100
    );
    assert!(matches!(
        plan_resume(n, EPOCH, 101, 10, 100),
        Err(HandshakeError::Diverged { .. })
    ));
    assert!(matches!(
        plan_resume(n, EPOCH, 5, 10, 100),
        Err(HandshakeError::ResyncRequired { .. })
    ));
    assert!(plan_resume(n, EPOCH, 9, 10, 100).is_ok());
}

/// A target resynced from the primary's bitmap may resume anywhere the primary has
/// been (the copy replaces what the journal lost), never beyond.
#[test]
fn plan_resync_cases() {
    let n = Negotiated { version: 1 };
    assert_eq!(plan_resync(n, EPOCH, 5, 100).unwrap().resume_seq, 5);
    assert_eq!(plan_resync(n, EPOCH, 0, 100).unwrap().resume_seq, 0);
    assert!(matches!(
        plan_resync(n, EPOCH, 101, 100),
        Err(HandshakeError::Diverged { .. })
    ));
}

/// After a resync copy the receiver jumps to the snapshot and accepts the stream
/// from there; a jump backwards or with write-sets still being journaled is refused.
#[test]
fn receiver_jumps_to_the_resync_snapshot() {
    let mut rx = Receiver::new(EPOCH, 10, 10);
    let a = rx.resynced(40).unwrap();
    assert_eq!((a.received_durable_seq, a.applied_seq), (40, 40));
    assert!(matches!(
        rx.on_write_set(ws(45, 1, 0)),
        Err(ReceiveError::Gap { .. })
    ));
    assert!(matches!(
        rx.on_write_set(ws(41, 2, 0)),
        Ok(Received::Accept(_))
    ));
    assert!(matches!(rx.resynced(50), Err(ReceiveError::Beyond { .. })));
    rx.mark_durable(42).unwrap();
    assert!(matches!(
        rx.resynced(30),
        Err(ReceiveError::WentBackwards { .. })
    ));
    rx.resynced(42).unwrap();
}

/// Found by the `session` fuzz target (fuzz/): a sender whose position is
/// `Seq::MAX` (a corrupt cursor, or a peer resuming there) overflowed computing the
/// next sequence in `push` and `reset_for_resume`. It must refuse instead.
#[test]
fn sender_at_the_end_of_the_sequence_space_refuses_instead_of_overflowing() {
    let cfg = SenderConfig::default();
    let mut s = Sender::new(EPOCH, cfg, Seq::MAX);
    let mut w = ws(1, 1, 0);
    w.first_seq = Seq::MAX;
    w.last_seq = Seq::MAX;
    w.records[0].seq = Seq::MAX;
    assert_eq!(
        s.push(w.clone()),
        Err(SenderError::SeqExhausted { last: Seq::MAX })
    );
    assert_eq!(s.last_queued_seq(), Seq::MAX);

    // Queue up to the last sequence, then a peer resuming at it.
    let mut s = Sender::new(EPOCH, cfg, Seq::MAX - 1);
    s.push(w).expect("the last sequence can be queued");
    assert_eq!(
        s.reset_for_resume(Seq::MAX),
        Err(SenderError::SeqExhausted { last: Seq::MAX })
    );
    assert_eq!(
        s.durable_seq(),
        Seq::MAX - 1,
        "a refused resume changes nothing"
    );
    assert_eq!(
        SenderError::SeqExhausted { last: Seq::MAX }.code(),
        ErrorCode::Internal
    );
}

/// Found by the `session` fuzz target (fuzz/): `push` took a write-set ending
/// before it starts, which moved `last_queued_seq` behind `sent_seq` (the queue's
/// order invariant) without any error.
#[test]
fn sender_refuses_an_empty_or_backwards_write_set() {
    let mut s = sender(4, 1 << 20);
    s.push(ws(1, 2, 0)).expect("contiguous");
    assert_eq!(s.poll_transmit().map(|w| w.last_seq), Some(2));
    let mut w = ws(3, 1, 0);
    w.last_seq = 0;
    assert_eq!(
        s.push(w),
        Err(SenderError::EmptyWriteSet { first: 3, last: 0 })
    );
    assert_eq!(s.last_queued_seq(), 2);
    assert!(s.sent_seq() <= s.last_queued_seq());
}
