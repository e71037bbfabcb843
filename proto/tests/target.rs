//! One test per row of the decision tables in `ferry_proto::target` (module docs):
//! where a session resumes, tracking and the journal floor, degraded, handover.

use std::time::Duration;

use ferry_proto::session::{HandshakeError, Negotiated};
use ferry_proto::target::*;
use ferry_proto::wire::Seq;

const EPOCH: u64 = 9;

fn target(mode: SyncMode) -> TargetLifecycle {
    TargetLifecycle::new("dr1", mode, 0, false)
}

fn hello(peer_resume: Seq, first_available: Seq, durable: Seq) -> HelloInput {
    HelloInput {
        negotiated: Negotiated { version: 1 },
        epoch: EPOCH,
        peer_resume,
        journal: JournalView {
            first_available,
            durable,
        },
        fork: None,
    }
}

fn with_fork(mut h: HelloInput, seq: Seq, rejoined: bool) -> HelloInput {
    h.fork = Some(ForkView {
        seq,
        rejoined,
        cut: seq,
    });
    h
}

/// Connects `t` with a standby at `resume`, primary journal `first..=durable`.
fn connect(t: &mut TargetLifecycle, resume: Seq, first: Seq, durable: Seq) -> SessionStart {
    t.connecting();
    let plan = t.plan_hello(&hello(resume, first, durable)).expect("plan");
    match t.begin_full_switch(&plan).expect("no switch in progress") {
        Some(FullSwitch::Create(sw)) => {
            assert_eq!(sw.base, resume);
            t.bitmap_entered(durable);
        }
        Some(FullSwitch::MarkAll) | None => {}
    }
    t.session_started(&plan, resume, durable)
}

/// A target tracked in a bitmap after `base`, durably marked through `flushed`.
fn in_bitmap(base: Seq, flushed: Seq) -> TargetLifecycle {
    let mut t = target(SyncMode::Sync);
    t.reopened_in_bitmap(base, flushed);
    t
}

// ---------------------------------------------------------------------------
// plan_hello: rows 1–7

#[test]
fn row1_failback_past_the_fork_beyond_this_history_is_refused() {
    let t = target(SyncMode::Sync);
    let err = t
        .plan_hello(&with_fork(hello(120, 1, 110), 100, false))
        .unwrap_err();
    match err {
        HandshakeError::ForkDiverged {
            detail: msg,
            peer_resume,
        } => {
            assert_eq!(peer_resume, 120);
            assert!(
                msg.contains("node 'dr1' holds sequences up to 120"),
                "{msg}"
            );
            assert!(msg.contains("fork at 100"), "{msg}");
            assert!(msg.contains("this primary is at 110"), "{msg}");
        }
        other => panic!("expected ForkDiverged, got {other:?}"),
    }
}

#[test]
fn row2_failback_past_the_fork_is_a_full_resync() {
    let t = target(SyncMode::Sync);
    let plan = t
        .plan_hello(&with_fork(hello(105, 50, 110), 100, false))
        .expect("plan");
    assert_eq!(
        plan.start,
        PlanStart::Resync {
            full: Some(FullReason::Failback { fork: 100 })
        }
    );
    assert_eq!(plan.ack.resume_seq, 105);
    assert_eq!(plan.ack.epoch, EPOCH);
    assert!(plan.record_rejoined);
}

#[test]
fn failback_rule_ignores_a_rejoined_target_or_one_at_the_fork() {
    let t = target(SyncMode::Sync);
    // Rejoined since the fork: its journal past the fork is this history's.
    let plan = t
        .plan_hello(&with_fork(hello(105, 50, 110), 100, true))
        .expect("plan");
    assert_eq!(plan.start, PlanStart::Stream);
    assert!(plan.record_rejoined);
    // Not rejoined, but it holds nothing past the fork.
    let plan = t
        .plan_hello(&with_fork(hello(100, 50, 110), 100, false))
        .expect("plan");
    assert_eq!(plan.start, PlanStart::Stream);
    assert!(plan.record_rejoined);
}

/// A primary promoted with rollback to 100 whose journal kept 101..=140 (undone): no
/// target is streamed across the cut. At or below the fork, or rejoined inside the
/// discarded range: a full resync (issue 16 path 4). Not rejoined past the fork: the
/// failback rule, as before. At or past the cut once rejoined: this history streams.
#[test]
fn a_target_below_the_cut_of_a_rollback_promotion_resyncs_in_full() {
    let t = target(SyncMode::Async);
    let cut = |resume, rejoined| {
        let mut h = with_fork(hello(resume, 1, 150), 100, rejoined);
        if let Some(f) = h.fork.as_mut() {
            f.cut = 140;
        }
        t.plan_hello(&h).expect("plan").start
    };
    let across = PlanStart::Resync {
        full: Some(FullReason::ForkCut {
            fork: 100,
            cut: 140,
        }),
    };
    for (resume, rejoined) in [
        (100, false),
        (100, true),
        (60, false),
        (0, true),
        (120, true),
    ] {
        assert_eq!(
            cut(resume, rejoined),
            across,
            "resume {resume} rejoined {rejoined}"
        );
    }
    let failback = PlanStart::Resync {
        full: Some(FullReason::Failback { fork: 100 }),
    };
    assert_eq!(cut(120, false), failback);
    assert_eq!(cut(140, false), failback);
    assert_eq!(cut(140, true), PlanStart::Stream);
    assert_eq!(cut(145, true), PlanStart::Stream);
    // Without a cut (nothing discarded) a target at the fork streams, as before.
    let plain = t
        .plan_hello(&with_fork(hello(100, 1, 150), 100, true))
        .expect("plan");
    assert_eq!(plain.start, PlanStart::Stream);
    assert_eq!(plain.ack.resume_seq, 100);
}

#[test]
fn row3_bitmap_target_beyond_the_primary_is_refused() {
    let t = in_bitmap(10, 20);
    let err = t.plan_hello(&hello(31, 25, 30)).unwrap_err();
    assert_eq!(
        err,
        HandshakeError::Diverged {
            resume: 31,
            last: 30
        }
    );
}

#[test]
fn row4_bitmap_target_resyncs_from_anywhere() {
    // Its next record was released long ago: the copy replaces it.
    let t = in_bitmap(10, 20);
    let plan = t.plan_hello(&hello(5, 25, 30)).expect("plan");
    assert_eq!(plan.start, PlanStart::Resync { full: None });
    assert_eq!(plan.ack.resume_seq, 5);
    assert!(!plan.record_rejoined);
}

#[test]
fn row5_streaming_target_beyond_the_primary_is_refused() {
    let t = target(SyncMode::Sync);
    let err = t.plan_hello(&hello(31, 1, 30)).unwrap_err();
    assert_eq!(
        err,
        HandshakeError::Diverged {
            resume: 31,
            last: 30
        }
    );
}

#[test]
fn row6_released_resume_point_is_a_full_resync() {
    let t = target(SyncMode::Sync);
    let plan = t.plan_hello(&hello(10, 12, 30)).expect("plan");
    assert_eq!(
        plan.start,
        PlanStart::Resync {
            full: Some(FullReason::JournalReleased)
        }
    );
    assert_eq!(plan.ack.resume_seq, 10);
}

#[test]
fn row7_streaming_target_resumes_after_its_position() {
    let t = target(SyncMode::Sync);
    // The next record (11) is the oldest held.
    let plan = t.plan_hello(&hello(10, 11, 30)).expect("plan");
    assert_eq!(plan.start, PlanStart::Stream);
    // Caught up: nothing to read, even if everything it holds was released.
    let plan = t.plan_hello(&hello(30, 31, 30)).expect("plan");
    assert_eq!(plan.start, PlanStart::Stream);
}

#[test]
fn row7_a_switching_target_still_streams() {
    let mut t = target(SyncMode::Sync);
    t.begin_overflow_switch().expect("switch");
    let plan = t.plan_hello(&hello(10, 11, 30)).expect("plan");
    assert_eq!(plan.start, PlanStart::Stream);
}

// ---------------------------------------------------------------------------
// Session start and end

#[test]
fn stream_plan_streams_after_the_standby_position() {
    let mut t = target(SyncMode::Sync);
    assert_eq!(t.phase(), TargetPhase::Connecting);
    assert_eq!(
        connect(&mut t, 10, 1, 30),
        SessionStart::Stream { after: 10 }
    );
    assert_eq!(t.phase(), TargetPhase::Streaming);
    assert_eq!(t.phase().as_str(), "streaming");
    assert_eq!((t.acked(), t.applied()), (10, 10));
}

#[test]
fn full_resync_switches_a_streaming_target_with_every_region_dirty() {
    let mut t = target(SyncMode::Async);
    let plan = t.plan_hello(&hello(10, 12, 30)).expect("plan");
    let Ok(Some(FullSwitch::Create(sw))) = t.begin_full_switch(&plan) else {
        panic!("expected a switch")
    };
    assert_eq!(
        sw,
        SwitchToBitmap {
            base: 10,
            kind: SwitchKind::Full
        }
    );
    assert!(sw.all_dirty());
    // The session that asked for it goes on to resync: not ended.
    assert_eq!(t.bitmap_entered(30), BitmapEntered { end_session: false });
    assert_eq!(
        t.session_started(&plan, 10, 30),
        SessionStart::Resync { from: 10 }
    );
    assert_eq!(t.phase(), TargetPhase::Resyncing);
    assert_eq!(t.effective_mode(), EffectiveMode::Degraded);
}

#[test]
fn failback_onto_a_target_in_bitmap_mode_marks_every_region() {
    // Its maps start at its old ack (50) and hold only this history's writes; the
    // old primary's own writes past the fork (101..=105) are in none of them.
    let mut t = in_bitmap(50, 60);
    let plan = t
        .plan_hello(&with_fork(hello(105, 50, 110), 100, false))
        .expect("plan");
    assert_eq!(t.begin_full_switch(&plan), Ok(Some(FullSwitch::MarkAll)));
    assert_eq!(
        t.tracking(),
        Tracking::Bitmap {
            base: 50,
            flushed_through: 60
        }
    );
    assert_eq!(
        t.session_started(&plan, 105, 110),
        SessionStart::Resync { from: 105 }
    );
}

#[test]
fn full_resync_while_an_overflow_switch_creates_the_maps_retries() {
    let mut t = target(SyncMode::Sync);
    let plan = t.plan_hello(&hello(10, 12, 30)).expect("plan");
    t.begin_overflow_switch().expect("switch");
    assert_eq!(t.begin_full_switch(&plan), Err(SwitchInProgress));
}

#[test]
fn no_full_switch_without_a_full_resync() {
    let mut t = in_bitmap(10, 20);
    let plan = t.plan_hello(&hello(15, 25, 30)).expect("plan");
    assert_eq!(t.begin_full_switch(&plan), Ok(None));
    let mut t = target(SyncMode::Sync);
    let plan = t.plan_hello(&hello(15, 1, 30)).expect("plan");
    assert_eq!(t.begin_full_switch(&plan), Ok(None));
}

#[test]
fn a_failed_full_switch_leaves_the_target_streaming_without_retry_pause() {
    let mut t = target(SyncMode::Sync);
    let plan = t.plan_hello(&hello(10, 12, 30)).expect("plan");
    assert!(matches!(
        t.begin_full_switch(&plan),
        Ok(Some(FullSwitch::Create(_)))
    ));
    t.switch_failed(Duration::from_secs(1));
    assert_eq!(t.tracking(), Tracking::Streaming);
    assert_eq!(t.switch_candidate(100, Duration::from_secs(1)), Some(0));
}

#[test]
fn session_end_reverts_an_unfinished_resync_to_bitmap() {
    let mut t = in_bitmap(10, 20);
    assert_eq!(
        connect(&mut t, 10, 25, 30),
        SessionStart::Resync { from: 10 }
    );
    t.resync_begin(10, 28).expect("begin");
    let end = t.session_ended(Some("link lost".into()));
    assert_eq!(
        end,
        SessionEnd {
            resync_interrupted: true,
            handover_failed: false
        }
    );
    assert_eq!(
        t.tracking(),
        Tracking::Bitmap {
            base: 10,
            flushed_through: 20
        }
    );
    assert_eq!(t.phase(), TargetPhase::Disconnected);
    assert_eq!(t.snapshot().last_error.as_deref(), Some("link lost"));
    // The next session clears the error.
    connect(&mut t, 10, 25, 30);
    assert_eq!(t.snapshot().last_error, None);
}

#[test]
fn stopped_stays_stopped() {
    let mut t = target(SyncMode::Sync);
    t.stopped();
    t.connecting();
    t.session_ended(None);
    assert_eq!(t.phase().as_str(), "stopped");
}

/// ferryd ends a shipper's session when its task is cancelled at shutdown, after
/// `stopped`: the unfinished resync still goes back to bitmap mode (the floor stops
/// being held at its snapshot) and the target stays stopped.
#[test]
fn a_session_ended_after_stop_reverts_its_resync_and_stays_stopped() {
    let mut t = in_bitmap(10, 20);
    connect(&mut t, 15, 1, 30);
    t.resync_begin(15, 25).expect("resync starts");
    assert_eq!(t.floor(), 20);
    t.stopped();
    let end = t.session_ended(None);
    assert!(end.resync_interrupted);
    assert_eq!(t.phase(), TargetPhase::Stopped);
    assert_eq!(
        t.tracking(),
        Tracking::Bitmap {
            base: 10,
            flushed_through: 20
        }
    );
}

// ---------------------------------------------------------------------------
// Resync

#[test]
fn resync_waits_until_the_primary_applied_the_standby_position() {
    let mut t = in_bitmap(10, 20);
    connect(&mut t, 15, 25, 30);
    assert_eq!(
        t.resync_begin(15, 14),
        Err(ResyncRefused::NotApplied {
            from: 15,
            applied: 14
        })
    );
    let start = t.resync_begin(15, 29).expect("begin");
    assert_eq!(
        start,
        ResyncStart {
            from: 15,
            snapshot: 29,
            mark_all: false
        }
    );
}

#[test]
fn resync_refused_when_not_in_bitmap_mode() {
    let mut t = target(SyncMode::Sync);
    assert_eq!(t.resync_begin(5, 10), Err(ResyncRefused::NotInBitmap));
}

#[test]
fn standby_behind_the_maps_start_gets_every_region() {
    let mut t = in_bitmap(10, 20);
    connect(&mut t, 7, 25, 30);
    let start = t.resync_begin(7, 29).expect("begin");
    assert!(start.mark_all);
    match t.tracking() {
        Tracking::Resyncing { base, .. } => assert_eq!(base, 7),
        other => panic!("{other:?}"),
    }
}

#[test]
fn resync_completes_only_once_an_ack_covers_its_end_point() {
    let mut t = in_bitmap(10, 20);
    connect(&mut t, 10, 25, 30);
    let start = t.resync_begin(10, 28).expect("begin");
    // Acks during the copy are ignored.
    assert_eq!(t.on_ack(12, 12, 31), AckOutcome::default());
    assert_eq!(t.acked(), 10);
    assert_eq!(
        t.resync_copied(33, 33),
        SessionStart::Stream {
            after: start.snapshot
        }
    );
    assert_eq!(t.phase(), TargetPhase::Streaming);
    assert_eq!(t.tracking().as_str(), "resyncing");
    assert!(!t.on_ack(32, 30, 40).resync_complete);
    assert!(t.on_ack(33, 33, 40).resync_complete);
    assert_eq!(t.tracking(), Tracking::Streaming);
    assert_eq!(
        t.snapshot().points_lost,
        Some(LostPoints {
            after: 10,
            through: Some(33)
        })
    );
}

// ---------------------------------------------------------------------------
// Journal floor and overflow

#[test]
fn floor_streaming_and_switching_is_the_ack() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert_eq!(t.floor(), 10);
    t.begin_overflow_switch().expect("switch");
    assert_eq!(t.floor(), 10);
}

#[test]
fn floor_in_bitmap_mode_is_the_durably_marked_position() {
    let mut t = in_bitmap(10, 20);
    assert_eq!(t.floor(), 20);
    t.marks_flushed(27);
    assert_eq!(t.floor(), 27);
}

#[test]
fn floor_while_resyncing_is_held_at_the_snapshot_or_the_ack() {
    let mut t = in_bitmap(10, 40);
    connect(&mut t, 10, 25, 30);
    t.resync_begin(10, 28).expect("begin");
    assert_eq!(t.floor(), 28); // min(40, max(28, 10))
    t.resync_copied(35, 35);
    t.on_ack(33, 33, 36);
    assert_eq!(t.floor(), 33); // min(40, max(28, 33))
    t.marks_flushed(31);
    assert_eq!(t.floor(), 31); // a mark not yet durable holds the journal
    t.on_ack(35, 35, 36); // complete: back to the ack
    assert_eq!(t.floor(), 35);
}

#[test]
fn marks_flushed_is_ignored_while_streaming() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    t.marks_flushed(99);
    assert_eq!(t.floor(), 10);
}

#[test]
fn journal_thresholds() {
    let fill = |used| JournalFill {
        used_bytes: used,
        capacity_bytes: 1000,
    };
    assert!(!fill(499).flush_pressure());
    assert!(fill(500).flush_pressure());
    assert!(!fill(749).overflowing());
    assert!(fill(750).overflowing());
    let empty = JournalFill {
        used_bytes: 0,
        capacity_bytes: 0,
    };
    assert!(!empty.overflowing());
}

#[test]
fn overflow_switch_candidate_is_a_streaming_target_below_the_checkpoint() {
    let now = Duration::from_secs(100);
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert_eq!(
        t.switch_candidate(10, now),
        None,
        "not below the checkpoint"
    );
    assert_eq!(t.switch_candidate(11, now), Some(10));
    let b = in_bitmap(1, 2);
    assert_eq!(b.switch_candidate(11, now), None, "already in bitmap mode");
}

#[test]
fn the_candidate_furthest_behind_is_switched() {
    assert_eq!(choose_switch([("a", 7), ("b", 3), ("c", 9)]), Some("b"));
    assert_eq!(choose_switch(Vec::<(&str, Seq)>::new()), None);
}

#[test]
fn overflow_switch_ends_the_streaming_session_and_degrades() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    let sw = t.begin_overflow_switch().expect("switch");
    assert_eq!(
        sw,
        SwitchToBitmap {
            base: 10,
            kind: SwitchKind::Overflow
        }
    );
    assert!(!sw.all_dirty());
    assert_eq!(t.begin_overflow_switch(), None, "exactly one switcher");
    assert_eq!(t.must_end_session(), None, "switching still streams");
    assert_eq!(t.bitmap_entered(31), BitmapEntered { end_session: true });
    assert_eq!(t.must_end_session(), Some(EndReason::SwitchedToBitmap));
    assert_eq!(t.effective_mode(), EffectiveMode::Degraded);
    // A sync target's loss is recorded durably before writes go on without it.
    assert_eq!(t.sync_position(), Some(10));
    t.sync_loss_recorded(10);
    assert_eq!(t.sync_position(), None);
    assert_eq!(
        t.snapshot().points_lost,
        Some(LostPoints {
            after: 10,
            through: None
        })
    );
}

#[test]
fn overflow_switch_of_a_disconnected_target_ends_no_session() {
    let mut t = target(SyncMode::Sync);
    t.begin_overflow_switch().expect("switch");
    assert_eq!(t.bitmap_entered(31), BitmapEntered { end_session: false });
}

#[test]
fn a_failed_overflow_switch_pauses_retries() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    t.begin_overflow_switch().expect("switch");
    t.switch_failed(Duration::from_secs(100));
    assert_eq!(t.tracking(), Tracking::Streaming);
    assert_eq!(t.switch_candidate(20, Duration::from_secs(104)), None);
    assert_eq!(t.switch_candidate(20, Duration::from_secs(105)), Some(10));
}

#[test]
fn a_resync_holding_the_journal_is_abandoned_once() {
    let mut t = in_bitmap(10, 40);
    connect(&mut t, 10, 25, 30);
    t.resync_begin(10, 28).expect("begin");
    assert!(
        !t.abandon_resync(28),
        "floor 28 does not hold checkpoint 28"
    );
    assert!(t.abandon_resync(29));
    assert!(!t.abandon_resync(29), "once");
    assert_eq!(t.must_end_session(), Some(EndReason::ResyncAbandoned));
    assert!(t.session_ended(None).resync_interrupted);
    assert_eq!(t.must_end_session(), None, "no session");
    // The next resync starts afresh; in bitmap mode until it begins, as it should.
    connect(&mut t, 10, 25, 30);
    assert_eq!(t.must_end_session(), None);
    t.resync_begin(10, 30).expect("begin");
    assert_eq!(t.must_end_session(), None);
}

#[test]
fn abandon_only_applies_to_a_resync() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert!(!t.abandon_resync(1000));
}

#[test]
fn folds_over_targets() {
    assert_eq!(sync_gate_position([Some(5), None, Some(3)]), 3);
    assert_eq!(sync_gate_position([None, None]), Seq::MAX);
    assert_eq!(release_floor([8, 4]), 4);
    assert_eq!(release_floor([]), Seq::MAX);
}

// ---------------------------------------------------------------------------
// Degraded

#[test]
fn sync_timeout_degrades_a_live_sync_target_that_lacks_the_write() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert_eq!(t.sync_position(), Some(10));
    assert!(!t.sync_timeout(10), "it holds the write");
    assert!(t.sync_timeout(11));
    assert!(!t.sync_timeout(12), "already degraded");
    assert_eq!(t.effective_mode().status_str(), "async (degraded)");
    assert_eq!(t.effective_mode().metric_str(), "degraded");
    // Writes go on without it once its loss is recorded (see the sync-loss tests).
    t.sync_loss_recorded(10);
    assert_eq!(t.sync_position(), None);
}

#[test]
fn sync_timeout_never_degrades_an_async_target() {
    let mut t = target(SyncMode::Async);
    connect(&mut t, 10, 1, 30);
    assert!(!t.sync_timeout(11));
    assert_eq!(t.effective_mode().status_str(), "async");
    assert_eq!(t.sync_position(), None);
}

#[test]
fn a_target_away_since_the_fork_starts_degraded() {
    let t = TargetLifecycle::new("old-primary", SyncMode::Sync, 5, true);
    assert_eq!(t.effective_mode(), EffectiveMode::Degraded);
    let t = TargetLifecycle::new("dr1", SyncMode::Sync, 5, false);
    assert_eq!(t.effective_mode().status_str(), "sync");
}

#[test]
fn degraded_target_is_sync_again_once_an_ack_covers_the_previous_durable_position() {
    let mut t = target(SyncMode::Sync);
    // Streaming starts with the primary durable at 30.
    connect(&mut t, 10, 1, 30);
    assert!(t.sync_timeout(25));
    // Not yet: 29 < 30. The primary is at 40 now.
    assert!(!t.on_ack(29, 29, 40).caught_up);
    // 35 < 40 (durable at the previous ack).
    assert!(!t.on_ack(35, 35, 45).caught_up);
    assert!(t.is_degraded());
    // 45 covers it: sync again, though the primary moved on to 50.
    assert!(t.on_ack(45, 40, 50).caught_up);
    assert_eq!(t.sync_position(), Some(45));
    // A live target reports no catching up.
    assert!(!t.on_ack(50, 50, 50).caught_up);
}

#[test]
fn bitmap_target_is_sync_again_only_after_its_resync() {
    let mut t = in_bitmap(10, 20);
    assert!(t.is_degraded());
    connect(&mut t, 10, 25, 30);
    t.resync_begin(10, 28).expect("begin");
    t.resync_copied(33, 34);
    let out = t.on_ack(33, 30, 40);
    assert_eq!(
        out,
        AckOutcome {
            resync_complete: true,
            caught_up: false,
            sync_loss_cleared: false,
        }
    );
    let out = t.on_ack(40, 40, 41);
    assert!(out.caught_up);
    assert_eq!(t.effective_mode(), EffectiveMode::Sync);
}

// ---------------------------------------------------------------------------
// Sync loss (`on_sync_loss`, issue 16 path 11)

/// The loss is durable before any write past it goes on without the target: until
/// the daemon says it recorded it, the target still holds the sync gate at its ack.
#[test]
fn path11_a_degraded_sync_target_holds_writes_until_its_loss_is_recorded() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert_eq!(t.sync_loss_to_record(), None);
    // Recording a loss of a live target changes nothing.
    t.sync_loss_recorded(10);
    assert_eq!(t.sync_loss(), None);
    assert!(t.sync_timeout(11));
    assert_eq!(
        t.sync_loss_to_record(),
        Some(10),
        "writes after 10 would go on without it"
    );
    assert_eq!(
        t.sync_position(),
        Some(10),
        "not before the record is durable"
    );
    assert_eq!(
        t.sync_loss(),
        None,
        "nothing durable to tell the standby yet"
    );
    t.sync_loss_recorded(10);
    assert_eq!(t.sync_loss_to_record(), None);
    assert_eq!(t.sync_position(), None);
    assert_eq!(t.sync_loss(), Some(10));
    assert_eq!(t.snapshot().sync_loss_at, Some(10));
    assert_eq!(t.effective_mode(), EffectiveMode::Degraded);
}

/// Caught up is not enough: the record clears only once the target holds the
/// primary's durable position read after writes began waiting for it again (every
/// write acknowledged without it is at or below it).
#[test]
fn path11_the_sync_loss_clears_once_the_target_holds_every_write_acknowledged_without_it() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert!(t.sync_timeout(11));
    t.sync_loss_recorded(10);
    assert!(!t.on_ack(29, 29, 40).caught_up);
    let out = t.on_ack(40, 40, 50);
    assert!(out.caught_up && !out.sync_loss_cleared, "{out:?}");
    assert_eq!(t.sync_position(), Some(40), "writes wait for it again");
    assert_eq!(
        t.sync_loss(),
        Some(10),
        "writes up to 50 may still be missing"
    );
    assert!(!t.sync_resumed(52));
    assert!(!t.on_ack(51, 51, 55).sync_loss_cleared);
    assert_eq!(t.sync_loss(), Some(10));
    let out = t.on_ack(52, 52, 55);
    assert!(out.sync_loss_cleared && !out.caught_up, "{out:?}");
    assert_eq!(t.sync_loss(), None);
    assert_eq!(t.snapshot().sync_loss_at, None);
    assert!(!t.on_ack(60, 60, 60).sync_loss_cleared, "cleared once");
}

/// Degraded again before the record cleared: the older record stands (the writes
/// after it are still the ones the target may lack) and must wait for a new catch-up.
#[test]
fn path11_a_second_loss_before_the_first_cleared_keeps_the_older_record() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert!(t.sync_timeout(11));
    t.sync_loss_recorded(10);
    assert!(t.on_ack(40, 40, 50).caught_up);
    assert!(!t.sync_resumed(50));
    assert!(t.sync_timeout(45));
    assert_eq!(
        t.sync_loss_to_record(),
        None,
        "the standing record covers it"
    );
    assert_eq!(t.sync_position(), None);
    assert_eq!(t.sync_loss(), Some(10));
    assert!(
        !t.on_ack(50, 50, 60).sync_loss_cleared,
        "the catch-up mark of the first loss no longer counts"
    );
    assert_eq!(t.sync_loss(), Some(10));
}

/// Degraded by the switch to bitmap mode (not a timeout): the record is still due
/// before writes go on without it.
#[test]
fn path11_a_sync_target_degraded_by_bitmap_mode_holds_writes_until_recorded() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    t.begin_overflow_switch().expect("switch");
    t.bitmap_entered(30);
    assert!(t.is_degraded());
    assert_eq!(t.sync_loss_to_record(), Some(10));
    assert_eq!(t.sync_position(), Some(10));
    t.sync_loss_recorded(10);
    assert_eq!(t.sync_position(), None);
    let away = TargetLifecycle::new("old-primary", SyncMode::Sync, 5, true);
    assert_eq!(away.sync_loss_to_record(), Some(5), "away since the fork");
}

/// Caught up before the record was durable: nothing was acknowledged without it.
#[test]
fn path11_caught_up_before_recording_drops_the_pending_loss() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert!(t.sync_timeout(11));
    assert!(t.on_ack(30, 30, 31).caught_up);
    assert_eq!(t.sync_loss_to_record(), None);
    assert_eq!(t.sync_loss(), None);
    assert_eq!(t.sync_position(), Some(30));
}

/// A restart finds the record: the target starts degraded with it, the standby is
/// told it again, and it clears as above.
#[test]
fn path11_a_restored_sync_loss_starts_degraded_and_clears_after_catching_up() {
    let mut t = target(SyncMode::Sync);
    t.restore_sync_loss(7);
    assert_eq!(t.sync_loss(), Some(7));
    assert_eq!(t.effective_mode(), EffectiveMode::Degraded);
    assert_eq!(t.sync_position(), None, "recorded: writes go on without it");
    connect(&mut t, 20, 1, 30);
    assert!(t.on_ack(30, 30, 35).caught_up);
    assert!(!t.sync_resumed(35));
    assert!(t.on_ack(35, 35, 35).sync_loss_cleared);
    assert_eq!(t.sync_loss(), None);
}

/// Writes stopped: the catching-up ack already holds everything, and no later ack
/// would come to clear the record — it clears at once.
#[test]
fn path11_the_sync_loss_clears_at_once_when_the_caught_up_ack_holds_everything() {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, 10, 1, 30);
    assert!(t.sync_timeout(11));
    t.sync_loss_recorded(10);
    assert!(t.on_ack(30, 30, 30).caught_up);
    assert!(t.sync_resumed(30), "cleared: delete the record");
    assert_eq!(t.sync_loss(), None);
    assert!(!t.sync_resumed(30), "once");
}

/// `on_sync_loss = "block"`: the timeout never degrades; writes keep waiting and
/// status says so until an ack covers the blocked write.
#[test]
fn path11_block_policy_keeps_writes_waiting_for_the_target() {
    let mut t = target(SyncMode::Sync).with_sync_loss_policy(SyncLossPolicy::Block);
    connect(&mut t, 10, 1, 30);
    assert!(!t.sync_timeout(11), "never degraded");
    assert!(!t.sync_timeout(14));
    assert_eq!(t.effective_mode(), EffectiveMode::Sync);
    assert_eq!(t.sync_position(), Some(10), "writes still wait");
    assert_eq!(t.sync_loss_to_record(), None);
    assert!(t.snapshot().writes_blocked);
    t.on_ack(12, 12, 30);
    assert!(t.snapshot().writes_blocked, "14 still waits");
    t.on_ack(14, 14, 30);
    assert!(!t.snapshot().writes_blocked);
    assert_eq!(t.sync_loss(), None);
}

/// An async target never holds writes and records no loss.
#[test]
fn path11_an_async_target_records_no_sync_loss() {
    let mut t = target(SyncMode::Async);
    connect(&mut t, 10, 1, 30);
    assert!(!t.sync_timeout(11));
    assert_eq!(t.sync_loss_to_record(), None);
    assert!(!t.snapshot().writes_blocked);
}

// ---------------------------------------------------------------------------
// Sync policy (`replication.sync`: ALL, ANY k, FIRST k)

#[test]
fn quorum_all_is_the_minimum_over_targets_holding_writes() {
    let all = |p: &[Option<Seq>]| quorum_gate_position(SyncQuorum::All, p.iter().copied());
    assert_eq!(all(&[Some(5), None, Some(3)]), 3);
    assert_eq!(
        all(&[Some(5), None, Some(3)]),
        sync_gate_position([Some(5), None, Some(3)])
    );
    assert_eq!(all(&[None, None]), Seq::MAX);
}

#[test]
fn quorum_any_k_is_the_kth_highest_of_the_targets_holding_writes() {
    let any = |k, p: &[Option<Seq>]| quorum_gate_position(SyncQuorum::Any(k), p.iter().copied());
    assert_eq!(any(1, &[Some(5), Some(9)]), 9, "the fastest one suffices");
    assert_eq!(any(1, &[Some(9), Some(5)]), 9, "order does not matter");
    assert_eq!(any(2, &[Some(5), Some(9), Some(7)]), 7);
    assert_eq!(any(3, &[Some(5), Some(9), Some(7)]), 5);
    // A degraded (recorded) target is out of the count: the rest must all hold it.
    assert_eq!(any(2, &[None, Some(9)]), 9);
    assert_eq!(any(2, &[Some(4), None, Some(9)]), 4);
    assert_eq!(
        any(1, &[None, None]),
        Seq::MAX,
        "every one degraded: recorded"
    );
}

#[test]
fn quorum_first_k_is_the_minimum_over_the_first_k_holding_writes_in_order() {
    let first =
        |k, p: &[Option<Seq>]| quorum_gate_position(SyncQuorum::First(k), p.iter().copied());
    assert_eq!(
        first(1, &[Some(5), Some(9)]),
        5,
        "the first listed, slower or not"
    );
    assert_eq!(
        first(1, &[None, Some(9)]),
        9,
        "the first degraded: the next one"
    );
    assert_eq!(first(2, &[Some(5), Some(9), Some(2)]), 5);
    assert_eq!(first(2, &[Some(5), None, Some(2)]), 2);
    assert_eq!(
        first(3, &[Some(5), None, Some(7)]),
        5,
        "fewer than k: all of them"
    );
    assert_eq!(first(1, &[None, None]), Seq::MAX);
}

fn streaming_sync(name: &str, acked: Seq, policy: SyncLossPolicy) -> TargetLifecycle {
    let mut t = TargetLifecycle::new(name, SyncMode::Sync, 0, false).with_sync_loss_policy(policy);
    connect(&mut t, acked, 1, acked);
    t
}

fn positions(ts: &[&TargetLifecycle]) -> Vec<Option<Seq>> {
    ts.iter().map(|t| t.sync_position()).collect()
}

/// `ANY 1 (a, b)`, `a` gone (its ack stale, not degraded): writes go on at `b`'s pace
/// and `a` is never timed out. Both gone: a write times out, each is degraded but
/// still counts until its loss is recorded; once both are recorded writes go on.
#[test]
fn quorum_any_one_goes_at_the_live_targets_pace_and_degrades_only_when_none_holds() {
    let (mut a, mut b) = (
        streaming_sync("a", 10, SyncLossPolicy::Degrade),
        streaming_sync("b", 10, SyncLossPolicy::Degrade),
    );
    b.on_ack(20, 20, 20);
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        20
    );
    // Both stop acking; the write at 21 times out.
    assert!(a.sync_timeout(21) && b.sync_timeout(21));
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        20,
        "not before the losses are durable"
    );
    a.sync_loss_recorded(a.sync_loss_to_record().expect("due"));
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        20
    );
    b.sync_loss_recorded(b.sync_loss_to_record().expect("due"));
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        Seq::MAX,
        "both losses recorded: writes go on without them"
    );
}

/// `ANY 1 (a, b)` with `block`: a timeout degrades neither, writes wait at the higher
/// stale ack, and go on as soon as either acks.
#[test]
fn quorum_any_one_with_block_waits_until_one_returns() {
    let (mut a, mut b) = (
        streaming_sync("a", 10, SyncLossPolicy::Block),
        streaming_sync("b", 12, SyncLossPolicy::Block),
    );
    assert!(!a.sync_timeout(15) && !b.sync_timeout(15));
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        12
    );
    assert!(a.writes_blocked() && b.writes_blocked());
    a.on_ack(15, 15, 15);
    assert_eq!(
        quorum_gate_position(SyncQuorum::Any(1), positions(&[&a, &b])),
        15
    );
    assert_eq!((a.sync_loss(), b.sync_loss()), (None, None));
}

/// `FIRST 1 (a, b)`: `a` is waited for while live; degraded with its loss recorded,
/// `b` takes its place.
#[test]
fn quorum_first_one_falls_to_the_next_once_the_first_is_recorded_degraded() {
    let (mut a, mut b) = (
        streaming_sync("a", 10, SyncLossPolicy::Degrade),
        streaming_sync("b", 10, SyncLossPolicy::Degrade),
    );
    b.on_ack(30, 30, 30);
    assert_eq!(
        quorum_gate_position(SyncQuorum::First(1), positions(&[&a, &b])),
        10
    );
    assert!(a.sync_timeout(25) && !b.sync_timeout(25));
    assert_eq!(
        quorum_gate_position(SyncQuorum::First(1), positions(&[&a, &b])),
        10
    );
    a.sync_loss_recorded(10);
    assert_eq!(
        quorum_gate_position(SyncQuorum::First(1), positions(&[&a, &b])),
        30
    );
    assert_eq!(b.sync_loss(), None, "b held every write: no loss");
}

proptest::proptest! {
    /// The invariant of `quorum_gate_position`'s docs: every write at or below the
    /// position is held by `min(k, m)` of the `m` targets holding writes back (the
    /// first of them in order, for FIRST), and the position is one of their acks.
    #[test]
    fn quorum_position_is_held_by_enough_targets(
        ps in proptest::collection::vec(proptest::option::of(0u64..100), 0..6),
        k in 1usize..6,
        first in proptest::bool::ANY,
    ) {
        let q = if first { SyncQuorum::First(k) } else { SyncQuorum::Any(k) };
        let pos = quorum_gate_position(q, ps.iter().copied());
        let held: Vec<Seq> = ps.iter().flatten().copied().collect();
        if held.is_empty() {
            proptest::prop_assert_eq!(pos, Seq::MAX);
        } else {
            proptest::prop_assert!(held.contains(&pos));
            let need = k.min(held.len());
            if first {
                proptest::prop_assert!(held[..need].iter().all(|&p| p >= pos));
            } else {
                proptest::prop_assert!(held.iter().filter(|&&p| p >= pos).count() >= need);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Handover

fn streaming_at(acked: Seq) -> TargetLifecycle {
    let mut t = target(SyncMode::Sync);
    connect(&mut t, acked, 1, acked);
    t
}

#[test]
fn handover_needs_a_streaming_target() {
    let mut t = target(SyncMode::Sync);
    let err = t.request_handover(0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "standby 'dr1' is connecting, not streaming: it cannot take over losslessly"
    );
    let mut t = in_bitmap(1, 2);
    connect(&mut t, 2, 1, 5);
    assert!(matches!(
        t.handover_precheck(),
        Err(HandoverRefused::NotStreaming {
            state: "resyncing",
            ..
        })
    ));
}

#[test]
fn handover_needs_every_record_acked() {
    let mut t = streaming_at(10);
    assert!(t.handover_precheck().is_ok());
    assert_eq!(
        t.request_handover(11),
        Err(HandoverRefused::NotCaughtUp {
            name: "dr1".into(),
            seq: 11,
            acked: 10
        })
    );
    assert_eq!(t.phase(), TargetPhase::Streaming);
}

#[test]
fn handover_acked_at_its_seq_completes_once() {
    let mut t = streaming_at(10);
    assert_eq!(t.request_handover(10), Ok(SendHandover { seq: 10 }));
    assert_eq!(t.phase().as_str(), "streaming");
    assert!(matches!(
        t.request_handover(10),
        Err(HandoverRefused::InProgress { seq: 10, .. })
    ));
    let done = t.on_handover_ack(10, EPOCH + 1).expect("ack");
    assert_eq!(
        done,
        HandedOver {
            seq: 10,
            new_epoch: EPOCH + 1
        }
    );
    assert!(!t.session_ended(None).handover_failed);
    connect(&mut t, 10, 1, 10);
    assert!(matches!(
        t.request_handover(10),
        Err(HandoverRefused::AlreadyHandedOver { .. })
    ));
    assert_eq!(t.snapshot().handed_over, Some(done));
}

#[test]
fn handover_ack_at_another_seq_fails_the_handover() {
    let mut t = streaming_at(10);
    t.request_handover(10).expect("request");
    let err = t.on_handover_ack(9, EPOCH + 1).unwrap_err();
    assert!(err.handover_failed);
    assert_eq!(err.to_string(), "unexpected HandoverAck at 9 (epoch 10)");
    assert_eq!(t.handed_over(), None);
    // Unsolicited.
    let err = t.on_handover_ack(10, EPOCH + 1).unwrap_err();
    assert!(!err.handover_failed);
}

#[test]
fn handover_refused_by_the_standby_fails() {
    let mut t = streaming_at(10);
    assert!(!t.on_peer_error());
    t.request_handover(10).expect("request");
    assert!(t.on_peer_error());
    assert_eq!(t.handed_over(), None);
}

#[test]
fn session_end_during_a_handover_fails_it() {
    let mut t = streaming_at(10);
    t.request_handover(10).expect("request");
    let end = t.session_ended(Some("closed".into()));
    assert!(end.handover_failed);
    assert_eq!(t.phase(), TargetPhase::Disconnected);
    assert_eq!(t.handed_over(), None);
}

#[test]
fn status_names_match_the_metrics_label_sets() {
    for p in [
        TargetPhase::Connecting,
        TargetPhase::Resyncing,
        TargetPhase::Streaming,
        TargetPhase::HandingOver { seq: 1 },
        TargetPhase::Disconnected,
        TargetPhase::Stopped,
    ] {
        assert!(PHASE_NAMES.contains(&p.as_str()), "{p:?}");
    }
    for tr in [
        Tracking::Streaming,
        Tracking::Switching {
            base: 0,
            kind: SwitchKind::Full,
        },
        Tracking::Bitmap {
            base: 0,
            flushed_through: 0,
        },
        Tracking::Resyncing {
            base: 0,
            flushed_through: 0,
            snapshot: 0,
            through: None,
            abandoned: false,
        },
    ] {
        assert!(TRACKING_NAMES.contains(&tr.as_str()), "{tr:?}");
    }
    let s = streaming_at(4).snapshot();
    assert_eq!(
        (s.phase, s.tracking, s.effective_mode, s.acked_seq, s.floor),
        (
            TargetPhase::Streaming,
            Tracking::Streaming,
            EffectiveMode::Sync,
            4,
            4
        )
    );
}

/// Found by the `session` fuzz target (fuzz/): a resync copy or a handshake that
/// completes after the daemon stopped the target (other tasks call these during
/// shutdown) moved it out of `Stopped` into a session phase, so status reported a
/// streaming target on a stopped daemon. `Stopped` is final, as for `connecting`
/// and `session_ended`.
#[test]
fn stopped_is_final_for_a_late_resync_copy_or_handshake() {
    let mut t = in_bitmap(10, 10);
    connect(&mut t, 10, 1, 20);
    assert_eq!(t.phase(), TargetPhase::Resyncing);
    t.resync_begin(10, 20).expect("resync starts");
    t.stopped();
    assert_eq!(t.resync_copied(20, 20), SessionStart::Stream { after: 20 });
    assert_eq!(t.phase(), TargetPhase::Stopped);

    let mut t = target(SyncMode::Async);
    t.connecting();
    let plan = t.plan_hello(&hello(5, 1, 5)).expect("plan");
    t.stopped();
    assert_eq!(
        t.session_started(&plan, 5, 5),
        SessionStart::Stream { after: 5 }
    );
    assert_eq!(t.phase(), TargetPhase::Stopped);
    assert_eq!(t.snapshot().phase.as_str(), "stopped");
}

// ---------------------------------------------------------------------------
// The standby requires a resync (issue 16)

/// A standby that refuses a write-set with `ResyncRequired` (a record outside its
/// volumes) is not streamed the same records again: its next session resyncs in
/// full, by digest, whatever the journal holds; once that session started (its full
/// switch durable) the request is forgotten and the maps carry the resync.
#[test]
fn a_resync_required_refusal_plans_a_full_resync() {
    use ferry_proto::wire::ErrorCode;
    let mut t = target(SyncMode::Sync);
    assert_eq!(
        connect(&mut t, 10, 1, 30),
        SessionStart::Stream { after: 10 }
    );
    // Another refusal is only the session's end.
    let out = t.on_peer_error_code(ErrorCode::Protocol);
    assert_eq!(out, PeerError::default());
    assert!(!t.peer_requires_resync());
    let out = t.on_peer_error_code(ErrorCode::ResyncRequired);
    assert!(out.full_resync_planned && !out.handover_failed);
    assert!(
        !t.on_peer_error_code(ErrorCode::ResyncRequired)
            .full_resync_planned,
        "a repeat is not planned again (logged once)"
    );
    t.session_ended(Some("standby requires a full resync".into()));
    // The journal holds everything after 10, yet the plan is a full resync.
    t.connecting();
    let plan = t.plan_hello(&hello(10, 1, 30)).expect("plan");
    assert_eq!(
        plan.start,
        PlanStart::Resync {
            full: Some(FullReason::StandbyRequired)
        }
    );
    // Past the primary it is still refused.
    assert_eq!(
        t.plan_hello(&hello(31, 1, 30)).unwrap_err(),
        HandshakeError::Diverged {
            resume: 31,
            last: 30
        }
    );
    // A streaming target is switched to bitmap mode with every region dirty.
    match t.begin_full_switch(&plan).expect("no switch in progress") {
        Some(FullSwitch::Create(sw)) => {
            assert_eq!((sw.base, sw.kind), (10, SwitchKind::Full));
            assert!(sw.all_dirty());
            t.bitmap_entered(30);
        }
        other => panic!("expected a full switch, got {other:?}"),
    }
    assert_eq!(
        t.session_started(&plan, 10, 30),
        SessionStart::Resync { from: 10 }
    );
    assert!(!t.peer_requires_resync(), "the maps carry it now");
    // A failed copy goes back to bitmap mode: the next session resyncs from the maps.
    t.session_ended(Some("connection lost".into()));
    let plan = t.plan_hello(&hello(10, 1, 30)).expect("plan");
    assert_eq!(plan.start, PlanStart::Resync { full: None });
}

/// A target already tracked in maps gets every region marked in them.
#[test]
fn a_resync_required_refusal_in_bitmap_mode_marks_every_region() {
    use ferry_proto::wire::ErrorCode;
    let mut t = in_bitmap(10, 20);
    assert!(
        t.on_peer_error_code(ErrorCode::ResyncRequired)
            .full_resync_planned
    );
    let plan = t.plan_hello(&hello(15, 25, 30)).expect("plan");
    assert_eq!(
        plan.start,
        PlanStart::Resync {
            full: Some(FullReason::StandbyRequired)
        }
    );
    assert_eq!(t.begin_full_switch(&plan), Ok(Some(FullSwitch::MarkAll)));
}

/// Issue 16 path 7: a restart finds the standby's request recorded: the lifecycle
/// plans the full resync as if it had just heard it.
#[test]
fn path7_a_restored_resync_request_plans_a_full_resync() {
    let mut t = target(SyncMode::Sync);
    assert!(!t.peer_requires_resync());
    t.restore_peer_requires_resync();
    assert!(t.peer_requires_resync());
    t.connecting();
    let plan = t.plan_hello(&hello(10, 1, 30)).expect("plan");
    assert_eq!(
        plan.start,
        PlanStart::Resync {
            full: Some(FullReason::StandbyRequired)
        }
    );
}

// ---------------------------------------------------------------------------
// Two gate positions: received (writeback replies) and durable (FLUSH, FUA,
// writethrough)

fn received_positions(ts: &[&TargetLifecycle]) -> Vec<Option<Seq>> {
    ts.iter().map(|t| t.sync_received_position()).collect()
}

/// A received ack moves only the received position; a durable ack moves both (received
/// never below durable); a new session starts both at the standby's resume position;
/// an async target offers neither.
#[test]
fn a_target_offers_a_received_and_a_durable_gate_position() {
    let mut t = streaming_sync("a", 10, SyncLossPolicy::Degrade);
    assert_eq!(
        (t.sync_position(), t.sync_received_position()),
        (Some(10), Some(10))
    );
    t.on_received(15);
    assert_eq!(
        (t.sync_position(), t.sync_received_position()),
        (Some(10), Some(15))
    );
    assert_eq!(t.acked(), 10, "received is not durable");
    assert_eq!(t.floor(), 10, "the journal keeps what is not durable there");
    t.on_received(12);
    assert_eq!(t.received(), 15, "never backwards");
    t.on_ack(20, 18, 20);
    assert_eq!(
        (t.sync_position(), t.sync_received_position()),
        (Some(20), Some(20))
    );
    t.on_received(25);
    t.session_ended(Some("gone".into()));
    t.on_received(30);
    assert_eq!(t.received(), 25, "ignored between sessions");
    connect(&mut t, 22, 1, 30);
    assert_eq!(
        t.sync_received_position(),
        Some(22),
        "the standby drained to 22"
    );

    let mut a = TargetLifecycle::new("b", SyncMode::Async, 0, false);
    connect(&mut a, 5, 1, 5);
    a.on_received(9);
    assert_eq!(
        (a.sync_position(), a.sync_received_position()),
        (None, None)
    );
}

/// A writeback write that times out waiting for the received position degrades only
/// the targets that have not received it, and the loss is recorded at the durable ack
/// (a standby crash would lose what it only received).
#[test]
fn a_received_timeout_blames_only_targets_without_the_write_and_records_the_durable_ack() {
    let (mut a, mut b) = (
        streaming_sync("a", 10, SyncLossPolicy::Degrade),
        streaming_sync("b", 10, SyncLossPolicy::Degrade),
    );
    a.on_received(30);
    b.on_received(20);
    assert_eq!(
        quorum_gate_position(SyncQuorum::All, received_positions(&[&a, &b])),
        20
    );
    assert!(!a.sync_received_timeout(25), "a received 25");
    assert!(!a.is_degraded());
    assert!(b.sync_received_timeout(25));
    assert_eq!(b.sync_loss_to_record(), Some(10), "at its durable ack");
    assert_eq!(
        b.sync_received_position(),
        Some(20),
        "still holds writes back until the loss is durable"
    );
    b.sync_loss_recorded(10);
    assert_eq!(
        (b.sync_position(), b.sync_received_position()),
        (None, None)
    );
    assert_eq!(
        quorum_gate_position(SyncQuorum::All, received_positions(&[&a, &b])),
        30
    );
    // A durable wait's timeout still blames a target that only received the write.
    assert!(a.sync_timeout(25));
}

mod gate_positions {
    use super::*;
    use proptest::prelude::*;

    /// One target's events: received acks and durable acks (each cumulative, so
    /// folded with max as a standby sends them: received ≥ durable).
    fn arb_events() -> impl Strategy<Value = Vec<(bool, Seq)>> {
        proptest::collection::vec((any::<bool>(), 0..100u64), 0..12)
    }

    fn arb_quorum() -> impl Strategy<Value = SyncQuorum> {
        prop_oneof![
            Just(SyncQuorum::All),
            (1..4usize).prop_map(SyncQuorum::Any),
            (1..4usize).prop_map(SyncQuorum::First),
        ]
    }

    proptest! {
        /// Whatever the acks and the policy: each target's received position is at
        /// least its durable one, so the gate's received position is at least its
        /// durable one; and a write at the received position is received by as many
        /// targets as the policy asks (all that hold writes back, at most k).
        #[test]
        fn the_received_position_is_never_behind_the_durable_one_and_meets_the_policy(
            targets in proptest::collection::vec(arb_events(), 1..4),
            q in arb_quorum(),
        ) {
            let mut ts = Vec::new();
            for (i, events) in targets.iter().enumerate() {
                let mut t = streaming_sync(&format!("t{i}"), 0, SyncLossPolicy::Degrade);
                let (mut durable, mut received) = (0, 0);
                for &(is_durable, s) in events {
                    if is_durable {
                        durable = durable.max(s);
                        received = received.max(durable);
                        t.on_ack(durable, durable, 100);
                    } else {
                        received = received.max(s);
                        t.on_received(received);
                    }
                }
                prop_assert_eq!(t.acked(), durable);
                prop_assert_eq!(t.received(), received);
                prop_assert!(t.sync_received_position() >= t.sync_position());
                ts.push(t);
            }
            let refs: Vec<&TargetLifecycle> = ts.iter().collect();
            let durable = quorum_gate_position(q, positions(&refs));
            let received = quorum_gate_position(q, received_positions(&refs));
            prop_assert!(received >= durable, "{received} < {durable}");
            let k = match q {
                SyncQuorum::All => ts.len(),
                SyncQuorum::Any(k) | SyncQuorum::First(k) => k.min(ts.len()),
            };
            let holding = ts.iter().filter(|t| t.received() >= received).count();
            prop_assert!(holding >= k, "{holding} targets received {received}, policy needs {k}");
        }
    }
}
