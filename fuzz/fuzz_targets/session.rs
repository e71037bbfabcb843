//! The replication session state machines fed arbitrary events: a primary
//! `Sender` and a standby `Receiver` (write-sets built from the input or decoded
//! from fuzzed wire frames, acks, resumes, resyncs, Hellos), and one
//! `TargetLifecycle` driven through arbitrary event sequences. After every event
//! the documented position invariants must hold:
//! sender `applied ≤ durable ≤ sent ≤ last_queued`, receiver
//! `applied ≤ durable ≤ received`, a handover once done stays done, `Stopped` is final.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use ferry_fuzz::fix_frame_crcs;
use ferry_proto::session::{
    plan_resume, plan_resync, validate_hello, LocalIdentity, Negotiated, Receiver, Sender,
    SenderConfig,
};
use ferry_proto::target::{
    ForkView, HelloInput, JournalFill, JournalView, SyncMode, TargetLifecycle, TargetPhase,
    PHASE_NAMES, TRACKING_NAMES,
};
use ferry_proto::wire::{
    self, Ack, Frame, Hello, RecordOp, Role, VolumeGeometry, WireRecord, WriteSet,
};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

const EPOCH: u64 = 5;

/// A sequence number: absolute, or near one of the machine's current positions
/// (so the interesting boundaries are hit without guessing 64-bit values).
#[derive(Debug, Clone, Copy, Arbitrary)]
enum S {
    Abs(u64),
    Near(u8, i8),
}

#[derive(Debug, Arbitrary)]
struct WsSpec {
    epoch_delta: i8,
    first: S,
    /// Records beyond the first (last = first + extra); `None`: a random last.
    extra: Option<u8>,
    last: S,
    data: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum SessionOp {
    Push(WsSpec),
    Poll,
    Ack {
        epoch_delta: i8,
        durable: S,
        applied: S,
        received: S,
    },
    ResetForResume(S),
    RecvWriteSet(WsSpec),
    /// A fuzzed frame, CRC-fixed, decoded and routed to the side that takes it.
    RecvFrame(Vec<u8>),
    MarkDurable(S),
    MarkApplied(S),
    Resynced(S),
    Hello {
        epoch_delta: i8,
        min: u16,
        max: u16,
        standby: bool,
        name: bool,
        vol: Option<(u32, u64, u32)>,
        resume: S,
    },
    PlanResume {
        resume: S,
        oldest: S,
        last: S,
    },
}

#[derive(Debug, Arbitrary)]
enum TargetOp {
    Connecting,
    Stopped,
    Hello {
        peer_resume: S,
        first_available: S,
        durable: S,
        fork: Option<(S, bool, u8)>,
    },
    SessionEnded(bool),
    MustEnd,
    OnAck {
        durable: S,
        applied: S,
        journal: S,
    },
    SyncTimeout(S),
    OnReceived(S),
    SyncReceivedTimeout(S),
    MarksFlushed(S),
    AbandonResync(S),
    SwitchCandidate(S, u16),
    BeginOverflowSwitch,
    BitmapEntered(S),
    SwitchFailed(u16),
    ReopenedInBitmap(S, S),
    ResyncBegin(S, S),
    ResyncCopied(S, S),
    RequestHandover(S),
    HandoverAck(S, u64),
    AbandonHandover,
    PeerError,
    Fill(u64, u64),
}

#[derive(Debug, Arbitrary)]
struct Input {
    start_after: S,
    config: (u16, u8, u8),
    receiver_start: (S, S),
    ops: Vec<SessionOp>,
    target: (bool, S, bool),
    target_ops: Vec<TargetOp>,
}

fuzz_target!(|input: Input| {
    sessions(&input);
    lifecycle(&input);
});

/// Resolves `s` against the positions the machines are at now.
fn seq(s: S, bases: &[u64]) -> u64 {
    match s {
        S::Abs(v) => v,
        S::Near(b, d) => {
            let base = bases
                .get(usize::from(b) % bases.len().max(1))
                .copied()
                .unwrap_or(0);
            base.saturating_add_signed(i64::from(d))
        }
    }
}

fn write_set(spec: &WsSpec, bases: &[u64]) -> WriteSet {
    let first = seq(spec.first, bases);
    let last = match spec.extra {
        Some(n) => first.saturating_add(u64::from(n % 16)),
        None => seq(spec.last, bases),
    };
    // Records only for a sane range (the state machines must cope with any
    // first/last, the records are just payload).
    let records = if last >= first && last - first < 16 {
        (first..=last)
            .map(|s| WireRecord {
                seq: s,
                volume: 1,
                op: RecordOp::Write,
                offset: s.wrapping_mul(4096),
                length: spec.data.len() as u32,
                data: Bytes::copy_from_slice(&spec.data),
            })
            .collect()
    } else {
        Vec::new()
    };
    WriteSet {
        epoch: EPOCH.saturating_add_signed(i64::from(spec.epoch_delta)),
        first_seq: first,
        last_seq: last,
        timestamp_ns: 1,
        records,
    }
}

fn local(role: Role) -> LocalIdentity {
    LocalIdentity {
        cluster_id: [7; 16],
        node_id: [1; 16],
        node_name: "a".into(),
        role,
        epoch: EPOCH,
        min_version: 1,
        max_version: 1,
        volumes: vec![VolumeGeometry {
            id: 1,
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
        }],
        expected_peer_name: "b".into(),
    }
}

fn sessions(input: &Input) {
    let (bytes, sets, queue) = input.config;
    let cfg = SenderConfig {
        max_inflight_bytes: u64::from(bytes) * 64,
        max_inflight_write_sets: usize::from(sets % 16) + 1,
        max_queued_write_sets: usize::from(queue % 32) + 1,
        max_queued_bytes: u64::from(bytes) * 128,
    };
    let start = seq(input.start_after, &[0, u64::MAX]);
    let mut tx = Sender::new(EPOCH, cfg, start);
    let (d, a) = input.receiver_start;
    let mut rx = Receiver::new(EPOCH, seq(d, &[0, start]), seq(a, &[0, start]));
    for op in input.ops.iter().take(256) {
        let bases = [
            tx.durable_seq(),
            tx.applied_seq(),
            tx.sent_seq(),
            tx.last_queued_seq(),
            rx.received_seq(),
            rx.durable_seq(),
            rx.applied_seq(),
            0,
            u64::MAX,
        ];
        session_op(op, &bases, &mut tx, &mut rx);
        check_sender(&tx);
        assert!(rx.applied_seq() <= rx.durable_seq() && rx.durable_seq() <= rx.received_seq());
        if let Some(p) = rx.resume_position() {
            assert_eq!(p, rx.durable_seq());
        }
    }
}

fn session_op(op: &SessionOp, bases: &[u64], tx: &mut Sender, rx: &mut Receiver) {
    match op {
        SessionOp::Push(spec) => {
            let ws = write_set(spec, bases);
            let before = tx.queued_write_sets();
            if tx.push(ws.clone()).is_ok() {
                assert_eq!(tx.queued_write_sets(), before + 1);
                assert_eq!(tx.last_queued_seq(), ws.last_seq);
            }
        }
        SessionOp::Poll => {
            let sent = tx.sent_seq();
            if let Some(ws) = tx.poll_transmit() {
                assert!(ws.last_seq > sent || ws.last_seq == ws.first_seq.wrapping_sub(1));
                assert_eq!(tx.sent_seq(), ws.last_seq);
            }
        }
        SessionOp::Ack {
            epoch_delta,
            durable,
            applied,
            received,
        } => ack_op(*epoch_delta, (*durable, *applied, *received), bases, tx),
        SessionOp::ResetForResume(s) => {
            let s = seq(*s, bases);
            if let Ok(next) = tx.reset_for_resume(s) {
                assert_eq!(next, s.wrapping_add(1));
                assert_eq!(tx.inflight_write_sets(), 0);
            }
        }
        SessionOp::RecvWriteSet(spec) => {
            let _ = rx.on_write_set(write_set(spec, bases));
        }
        SessionOp::RecvFrame(bytes) => recv_frame(bytes, tx, rx),
        SessionOp::MarkDurable(s) => {
            let _ = rx.mark_durable(seq(*s, bases));
        }
        SessionOp::MarkApplied(s) => {
            let _ = rx.mark_applied(seq(*s, bases));
        }
        SessionOp::Resynced(s) => {
            let _ = rx.resynced(seq(*s, bases));
        }
        SessionOp::Hello {
            epoch_delta,
            min,
            max,
            standby,
            name,
            vol,
            resume,
        } => {
            let peer = Hello {
                epoch: EPOCH.saturating_add_signed(i64::from(*epoch_delta)),
                min_version: *min,
                max_version: *max,
                cluster_id: [7; 16],
                node_id: [2; 16],
                node_name: if *name { "b".into() } else { "x".into() },
                role: if *standby {
                    Role::Standby
                } else {
                    Role::Primary
                },
                volumes: vol
                    .map(|(id, size, bs)| VolumeGeometry {
                        id,
                        name: "w".into(),
                        size_bytes: size,
                        block_size: bs,
                    })
                    .into_iter()
                    .collect(),
                resume_position: seq(*resume, bases),
            };
            hello_op(&peer, *min, *max);
        }
        SessionOp::PlanResume {
            resume,
            oldest,
            last,
        } => plan_resume_op(*resume, *oldest, *last, bases),
    }
}

fn ack_op(
    epoch_delta: i8,
    (durable, applied, received): (S, S, S),
    bases: &[u64],
    tx: &mut Sender,
) {
    let ack = Ack {
        epoch: EPOCH.saturating_add_signed(i64::from(epoch_delta)),
        received_durable_seq: seq(durable, bases),
        applied_seq: seq(applied, bases),
        received_seq: seq(received, bases),
    };
    if let Ok(out) = tx.on_ack(&ack) {
        assert_eq!(out.durable_seq, tx.durable_seq());
        assert_eq!(out.received_seq, tx.received_seq());
        // applied ≤ durable ≤ received ≤ sent, whatever the peer claimed.
        assert!(out.applied_seq <= out.durable_seq && out.durable_seq <= out.received_seq);
        assert!(out.received_seq <= tx.sent_seq());
    }
    let _ = tx.lag_seconds(u64::MAX);
}

/// Whichever role validates the peer's hello, the agreed version lies in the peer's
/// range and in ours (version 1 only).
fn hello_op(peer: &Hello, min: u16, max: u16) {
    for role in [Role::Primary, Role::Standby] {
        if let Ok(n) = validate_hello(&local(role), peer) {
            assert!(n.version >= min.max(1) && n.version <= max.min(1));
        }
    }
}

fn plan_resume_op(resume: S, oldest: S, last: S, bases: &[u64]) {
    let n = Negotiated { version: 1 };
    let (r, o, l) = (seq(resume, bases), seq(oldest, bases), seq(last, bases));
    if let Ok(ack) = plan_resume(n, EPOCH, r, o, l) {
        assert!(ack.resume_seq <= l);
    }
    if let Ok(ack) = plan_resync(n, EPOCH, r, l) {
        assert!(ack.resume_seq <= l);
    }
}

fn recv_frame(bytes: &[u8], tx: &mut Sender, rx: &mut Receiver) {
    let mut buf = bytes.to_vec();
    fix_frame_crcs(&mut buf);
    // A packed data frame reaches the receiver as the frame it carries.
    let decoded = wire::decode(Bytes::from(buf)).map(|f| match f {
        Frame::Packed(p) => p.into_inner(),
        f => f,
    });
    match decoded {
        Ok(Frame::WriteSet(ws)) => {
            let _ = rx.on_write_set(ws);
        }
        Ok(Frame::Ack(ack)) => {
            let _ = tx.on_ack(&ack);
        }
        Ok(Frame::Hello(h)) => {
            let _ = validate_hello(&local(Role::Primary), &h);
            let _ = validate_hello(&local(Role::Standby), &h);
        }
        Ok(f) => {
            let _ = rx.check_epoch(f.epoch());
        }
        Err(_) => {}
    }
}

fn check_sender(tx: &Sender) {
    assert!(
        tx.applied_seq() <= tx.durable_seq(),
        "sender applied > durable"
    );
    assert!(tx.durable_seq() <= tx.sent_seq(), "sender durable > sent");
    assert!(
        tx.sent_seq() <= tx.last_queued_seq(),
        "sender sent > last queued"
    );
    assert!(tx.inflight_write_sets() <= tx.queued_write_sets());
    assert!(tx.inflight_bytes() <= tx.lag_bytes());
}

fn lifecycle(input: &Input) {
    let (sync, acked, away) = input.target;
    let mode = if sync {
        SyncMode::Sync
    } else {
        SyncMode::Async
    };
    let mut t = TargetLifecycle::new("t", mode, seq(acked, &[0, u64::MAX]), away);
    let mut handed = None;
    for op in input.target_ops.iter().take(256) {
        let was_stopped = t.phase() == TargetPhase::Stopped;
        let bases = [t.acked(), t.applied(), t.floor(), 0, u64::MAX];
        target_op(&mut t, op, &bases);
        let st = t.snapshot();
        assert!(PHASE_NAMES.contains(&st.phase.as_str()));
        assert!(TRACKING_NAMES.contains(&st.tracking.as_str()));
        assert_eq!(st.acked_seq, t.acked());
        assert_eq!(st.floor, t.floor());
        if was_stopped {
            assert_eq!(t.phase(), TargetPhase::Stopped, "left Stopped via {op:?}");
        }
        if let Some(h) = handed {
            assert_eq!(t.handed_over(), Some(h), "a handover was undone by {op:?}");
        }
        handed = t.handed_over();
        let _ = t.must_end_session();
        // The two gate positions: offered together, received never behind durable.
        match (t.sync_position(), t.sync_received_position()) {
            (Some(d), Some(r)) => assert!(r >= d && r == t.received()),
            (None, None) => {}
            other => panic!("gate positions {other:?} after {op:?}"),
        }
        assert!(t.received() >= t.acked());
        let _ = t.handover_precheck();
    }
}

fn target_op(t: &mut TargetLifecycle, op: &TargetOp, b: &[u64]) {
    match *op {
        TargetOp::Connecting => t.connecting(),
        TargetOp::Stopped => t.stopped(),
        TargetOp::Hello {
            peer_resume,
            first_available,
            durable,
            fork,
        } => {
            let h = HelloInput {
                negotiated: Negotiated { version: 1 },
                epoch: EPOCH,
                peer_resume: seq(peer_resume, b),
                journal: JournalView {
                    first_available: seq(first_available, b),
                    durable: seq(durable, b),
                },
                fork: fork.map(|(s, rejoined, discarded)| {
                    let fork = seq(s, b);
                    ForkView {
                        seq: fork,
                        rejoined,
                        // A rollback promotion's cut: `discarded` records after the fork.
                        cut: fork.saturating_add(u64::from(discarded)),
                    }
                }),
            };
            if let Ok(plan) = t.plan_hello(&h) {
                if t.begin_full_switch(&plan).is_ok() {
                    t.session_started(&plan, h.peer_resume, h.journal.durable);
                }
            }
        }
        TargetOp::SessionEnded(e) => {
            t.session_ended(e.then(|| "gone".to_string()));
        }
        TargetOp::MustEnd => {
            let _ = t.must_end_session();
        }
        TargetOp::OnAck {
            durable,
            applied,
            journal,
        } => {
            t.on_ack(seq(durable, b), seq(applied, b), seq(journal, b));
        }
        TargetOp::SyncTimeout(s) => {
            t.sync_timeout(seq(s, b));
        }
        TargetOp::OnReceived(s) => t.on_received(seq(s, b)),
        TargetOp::SyncReceivedTimeout(s) => {
            t.sync_received_timeout(seq(s, b));
        }
        TargetOp::MarksFlushed(s) => t.marks_flushed(seq(s, b)),
        TargetOp::AbandonResync(s) => {
            t.abandon_resync(seq(s, b));
        }
        TargetOp::SwitchCandidate(s, now) => {
            let _ = t.switch_candidate(seq(s, b), Duration::from_millis(u64::from(now) * 100));
        }
        TargetOp::BeginOverflowSwitch => {
            t.begin_overflow_switch();
        }
        TargetOp::BitmapEntered(s) => {
            t.bitmap_entered(seq(s, b));
        }
        TargetOp::SwitchFailed(now) => t.switch_failed(Duration::from_millis(u64::from(now) * 100)),
        TargetOp::ReopenedInBitmap(base, f) => t.reopened_in_bitmap(seq(base, b), seq(f, b)),
        TargetOp::ResyncBegin(from, applied) => {
            let _ = t.resync_begin(seq(from, b), seq(applied, b));
        }
        TargetOp::ResyncCopied(through, d) => {
            t.resync_copied(seq(through, b), seq(d, b));
        }
        TargetOp::RequestHandover(s) => {
            let _ = t.request_handover(seq(s, b));
        }
        TargetOp::HandoverAck(s, e) => {
            let _ = t.on_handover_ack(seq(s, b), e);
        }
        TargetOp::AbandonHandover => {
            t.abandon_handover();
        }
        TargetOp::PeerError => {
            t.on_peer_error();
        }
        TargetOp::Fill(used, cap) => {
            let f = JournalFill {
                used_bytes: used,
                capacity_bytes: cap,
            };
            let _ = (f.flush_pressure(), f.overflowing());
        }
    }
}
