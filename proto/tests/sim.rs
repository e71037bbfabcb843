//! Deterministic simulation: a primary `Sender` and a standby `Receiver`
//! exchange encoded frames through a link that drops, delays (reorders),
//! corrupts and splits them, with disconnects, standby crashes (losing
//! journal appends in flight) and primary restarts (losing sender state).
//!
//! The link is harsher than a QUIC stream (which never reorders): every
//! anomaly must end in a protocol error and a reconnect that resumes from the
//! standby's durable position. The invariant checked throughout: the standby
//! journals and applies every sequence exactly once, in order, with the
//! primary's data.
//!
//! A second simulation (`mod lifecycle`, at the end) drives one replication target's
//! `TargetLifecycle` through reconnects, journal overflow, resyncs, failback and
//! handover.
//!
//! Every seed is printed; replay one with `FERRY_SIM_SEED=<seed>`.
//! `FERRY_SIM_SEEDS=<n>` runs more seeds.

use bytes::{Bytes, BytesMut};
use ferry_proto::session::*;
use ferry_proto::wire::*;

const EPOCH: Epoch = 3;
const WRITE_SETS: u64 = 200;
const MAX_TICKS: u64 = 200_000;

/// xorshift64*: tiny, seedable, good enough to drive a simulation.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// Record payload derived from the sequence, so the applier can check it.
fn data_for(seq: Seq) -> Bytes {
    Bytes::from(format!("seq-{seq}").into_bytes())
}

/// The primary journal: write-sets of 1..=4 records, contiguous from seq 1.
fn make_journal(rng: &mut Rng) -> Vec<WriteSet> {
    let mut next = 1;
    (0..WRITE_SETS)
        .map(|i| {
            let n = 1 + rng.below(4);
            let records = (next..next + n)
                .map(|seq| {
                    let data = data_for(seq);
                    WireRecord {
                        seq,
                        volume: (seq % 3) as u32,
                        op: RecordOp::Write,
                        offset: seq * 4096,
                        length: data.len() as u32,
                        data,
                    }
                })
                .collect();
            let ws = WriteSet {
                epoch: EPOCH,
                first_seq: next,
                last_seq: next + n - 1,
                timestamp_ns: i * 1_000_000,
                records,
            };
            next += n;
            ws
        })
        .collect()
}

/// One direction of the link: messages with a delivery tick.
#[derive(Default)]
struct Wire {
    in_flight: Vec<(u64, Bytes)>,
}

impl Wire {
    fn send(&mut self, rng: &mut Rng, now: u64, mut msg: Vec<u8>) {
        if rng.chance(10) {
            return; // lost
        }
        if rng.chance(5) && !msg.is_empty() {
            let bit = rng.below(msg.len() as u64 * 8) as usize;
            msg[bit / 8] ^= 1 << (bit % 8); // corrupted
        }
        // Usually in order; sometimes delayed past later messages.
        let delay = if rng.chance(20) { 2 + rng.below(6) } else { 1 };
        self.in_flight.push((now + delay, Bytes::from(msg)));
    }

    /// Messages due at `now`, in send order among equal ticks. Delivered as
    /// random chunks to exercise the streaming decoder.
    fn deliver(&mut self, rng: &mut Rng, now: u64, dec: &mut FrameDecoder) {
        let mut due = Vec::new();
        self.in_flight.retain(|(at, m)| {
            if *at <= now {
                due.push(m.clone());
                false
            } else {
                true
            }
        });
        for m in due {
            let mut rest = &m[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len() as u64) as usize;
                dec.feed(&rest[..n]);
                rest = &rest[n..];
            }
        }
    }
}

struct Standby {
    rx: Receiver,
    /// Accepted, being journaled (lost on a standby crash).
    pending: Vec<WriteSet>,
    /// Durable journal: every record exactly once, in order.
    journal: Vec<WireRecord>,
    applied_through: Seq,
}

impl Standby {
    fn append_durable(&mut self) -> Option<Ack> {
        let last = self.pending.last()?.last_seq;
        for ws in self.pending.drain(..) {
            for r in ws.records {
                let expected = self.journal.last().map_or(1, |p| p.seq + 1);
                assert_eq!(r.seq, expected, "standby journal out of order / duplicated");
                self.journal.push(r);
            }
        }
        Some(self.rx.mark_durable(last).expect("durable within received"))
    }

    fn apply_some(&mut self, rng: &mut Rng) -> Option<Ack> {
        let durable = self.rx.durable_seq();
        if self.applied_through >= durable {
            return None;
        }
        let upto = self.applied_through + 1 + rng.below(durable - self.applied_through);
        for seq in self.applied_through + 1..=upto {
            let r = &self.journal[(seq - 1) as usize];
            assert_eq!(r.seq, seq, "applied out of order");
            assert_eq!(r.data, data_for(seq), "applied wrong data");
        }
        self.applied_through = upto;
        Some(self.rx.mark_applied(upto).expect("applied within durable"))
    }
}

fn identities() -> (LocalIdentity, LocalIdentity) {
    let volumes = vec![VolumeGeometry {
        id: 0,
        name: "v0".into(),
        size_bytes: 1 << 30,
        block_size: 4096,
    }];
    let (min_version, max_version) = LocalIdentity::supported_versions();
    let base = LocalIdentity {
        cluster_id: [7; 16],
        node_id: [1; 16],
        node_name: "primary".into(),
        role: Role::Primary,
        epoch: EPOCH,
        min_version,
        max_version,
        volumes,
        expected_peer_name: "standby".into(),
    };
    let standby = LocalIdentity {
        node_id: [2; 16],
        node_name: "standby".into(),
        role: Role::Standby,
        expected_peer_name: "primary".into(),
        ..base.clone()
    };
    (base, standby)
}

/// Round-trips a frame through the codec (the handshake runs on a fresh,
/// reliable connection in this model).
fn via_wire(f: Frame) -> Frame {
    decode(encode(&f).expect("encode").freeze()).expect("decode")
}

/// Handshake on a new connection; returns the resume sequence.
fn handshake(primary: &LocalIdentity, standby: &LocalIdentity, sb: &Standby, last: Seq) -> Seq {
    let resume = sb
        .rx
        .resume_position()
        .expect("standby drained before hello");
    let Frame::Hello(sb_hello) = via_wire(Frame::Hello(standby.hello(resume))) else {
        panic!("hello")
    };
    let Frame::Hello(pri_hello) = via_wire(Frame::Hello(primary.hello(last))) else {
        panic!("hello")
    };
    let negotiated = validate_hello(primary, &sb_hello).expect("primary accepts standby");
    validate_hello(standby, &pri_hello).expect("standby accepts primary");
    let ack = plan_resume(negotiated, EPOCH, sb_hello.resume_position, 1, last).expect("resume");
    let Frame::HelloAck(ack) = via_wire(Frame::HelloAck(ack)) else {
        panic!("hello ack")
    };
    ack.resume_seq
}

/// Pushes journal write-sets after the sender's last queued seq, as the
/// primary's replication loop would (trimming one the standby holds in part).
fn refill(tx: &mut Sender, journal: &[WriteSet]) {
    let start = journal.partition_point(|ws| ws.last_seq <= tx.last_queued_seq());
    for ws in &journal[start..] {
        let Some(part) = ws.after(tx.last_queued_seq()) else {
            continue;
        };
        if tx.push(part).is_err() {
            break; // queue full: backpressure, retry next tick
        }
    }
}

#[derive(Default, Debug)]
struct Stats {
    reconnects: u64,
    standby_crashes: u64,
    primary_restarts: u64,
    errors: u64,
}

fn run(seed: u64) -> Stats {
    let mut rng = Rng::new(seed);
    let journal = make_journal(&mut rng);
    let last = journal.last().map_or(0, |w| w.last_seq);
    let config = SenderConfig {
        max_inflight_bytes: 2_000 + rng.below(8_000),
        max_inflight_write_sets: 1 + rng.below(16) as usize,
        max_queued_write_sets: 8 + rng.below(64) as usize,
        max_queued_bytes: 4_000 + rng.below(16_000),
    };
    let (primary_id, standby_id) = identities();
    let mut sb = Standby {
        rx: Receiver::new(EPOCH, 0, 0),
        pending: Vec::new(),
        journal: Vec::new(),
        applied_through: 0,
    };
    let mut tx = Sender::new(EPOCH, config, 0);
    let (mut to_sb, mut to_pri) = (Wire::default(), Wire::default());
    let (mut sb_dec, mut pri_dec) = (FrameDecoder::default(), FrameDecoder::default());
    let mut stats = Stats::default();
    let mut connected = false;

    for now in 0..MAX_TICKS {
        if sb.applied_through == last && tx.durable_seq() == last {
            assert_eq!(tx.lag_bytes(), 0);
            assert_eq!(tx.lag_seconds(u64::MAX), 0.0);
            return stats;
        }
        if !connected {
            // The standby drains in-flight appends before it says hello.
            if let Some(ack) = sb.append_durable() {
                let _ = ack; // nobody to send it to
            }
            let resume = handshake(&primary_id, &standby_id, &sb, last);
            tx.reset_for_resume(resume).expect("resume within history");
            to_sb = Wire::default();
            to_pri = Wire::default();
            sb_dec = FrameDecoder::default();
            pri_dec = FrameDecoder::default();
            connected = true;
        }

        // Primary: queue from the journal, transmit what the window allows.
        refill(&mut tx, &journal);
        while let Some(ws) = tx.poll_transmit() {
            let parts = encode_write_set_vectored(&ws).expect("encode");
            let mut msg = BytesMut::new();
            for p in parts {
                msg.extend_from_slice(&p);
            }
            to_sb.send(&mut rng, now, msg.to_vec());
        }
        if now % 50 == 0 {
            let hb = Heartbeat {
                epoch: EPOCH,
                sent_at_ns: now,
                echo_ns: 0,
                last_seq: last,
                sync_loss: None,
            };
            to_sb.send(
                &mut rng,
                now,
                encode(&Frame::Heartbeat(hb)).expect("hb").to_vec(),
            );
        }

        // Standby: receive, journal, apply, ack.
        to_sb.deliver(&mut rng, now, &mut sb_dec);
        let mut failed = false;
        loop {
            match sb_dec.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::WriteSet(ws))) => match sb.rx.on_write_set(ws) {
                    Ok(Received::Accept(ws)) => sb.pending.push(ws),
                    Ok(Received::Duplicate(ack)) => to_pri.send(
                        &mut rng,
                        now,
                        encode(&Frame::Ack(ack)).expect("ack").to_vec(),
                    ),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                },
                Ok(Some(Frame::Heartbeat(hb))) => assert!(sb.rx.check_epoch(hb.epoch).is_ok()),
                Ok(Some(other)) => panic!("unexpected frame at standby: {other:?}"),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if rng.chance(300) {
            if let Some(ack) = sb.append_durable() {
                to_pri.send(
                    &mut rng,
                    now,
                    encode(&Frame::Ack(ack)).expect("ack").to_vec(),
                );
            }
        }
        if rng.chance(300) {
            if let Some(ack) = sb.apply_some(&mut rng) {
                to_pri.send(
                    &mut rng,
                    now,
                    encode(&Frame::Ack(ack)).expect("ack").to_vec(),
                );
            }
        }

        // Primary: process acks.
        to_pri.deliver(&mut rng, now, &mut pri_dec);
        loop {
            match pri_dec.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Ack(ack))) => {
                    if tx.on_ack(&ack).is_err() {
                        failed = true;
                        break;
                    }
                }
                Ok(Some(other)) => panic!("unexpected frame at primary: {other:?}"),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }

        // Faults.
        if failed {
            stats.errors += 1;
        }
        if failed || rng.chance(2) {
            stats.reconnects += 1;
            connected = false;
        }
        if rng.chance(1) {
            // Standby crash: appends in flight are lost; durable state survives.
            stats.standby_crashes += 1;
            sb.pending.clear();
            sb.rx = Receiver::new(EPOCH, sb.rx.durable_seq(), sb.applied_through);
            connected = false;
        }
        if rng.chance(1) {
            // Primary restart: the sender starts again from the standby's
            // durable position and refills from the journal.
            stats.primary_restarts += 1;
            sb.append_durable();
            let start = sb.rx.resume_position().expect("drained");
            tx = Sender::new(EPOCH, config, start);
            connected = false;
        }
    }
    panic!(
        "seed {seed}: no convergence in {MAX_TICKS} ticks (applied {} of {last}, durable ack {})",
        sb.applied_through,
        tx.durable_seq()
    );
}

/// `FERRY_SIM_SEED`, or `FERRY_SIM_SEEDS` (default 64) seeds from a fixed base.
fn seeds() -> Vec<u64> {
    match std::env::var("FERRY_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("FERRY_SIM_SEED must be a u64")],
        Err(_) => {
            let n = std::env::var("FERRY_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(64u64);
            // Fixed base so CI is reproducible; vary with FERRY_SIM_SEED.
            (0..n).map(|i| 0x5eed_0000 + i).collect()
        }
    }
}

#[test]
fn simulated_lossy_link_applies_every_seq_exactly_once_in_order() {
    let seeds = seeds();
    let many = seeds.len() >= 32;
    let mut total = Stats::default();
    for seed in seeds {
        eprintln!("sim seed {seed} (replay: FERRY_SIM_SEED={seed})");
        let stats = run(seed);
        eprintln!("  ok: {stats:?}");
        total.reconnects += stats.reconnects;
        total.standby_crashes += stats.standby_crashes;
        total.primary_restarts += stats.primary_restarts;
        total.errors += stats.errors;
    }
    if many {
        // Guard against a simulation that silently stopped injecting faults.
        assert!(
            total.errors > 0 && total.standby_crashes > 0 && total.primary_restarts > 0,
            "{total:?}"
        );
    }
}

// ===========================================================================
// Target lifecycle simulation.

/// One replication target's [`TargetLifecycle`] driven by a primary (journal with a
/// bounded capacity, volume, dirty-region map) and a standby (volume, journal
/// position, resync transition) over an ordered link (QUIC streams never reorder),
/// with disconnects, primary restarts (acks are not persisted, dirty maps are),
/// journal overflow to bitmap mode, failed switches, resyncs (full or from the maps,
/// with the digest filter), failback of an old primary that wrote past the fork, and
/// planned handovers that succeed, are refused or die with their session.
///
/// Invariants, checked as it goes:
/// * a session streams only from the standby's own position, and never to a standby
///   holding writes of another history (failback);
/// * the journal still holds every record a streaming session reads, and the standby
///   receives every sequence once, in order (no record skipped);
/// * a client write acknowledged while the sync gate waited for the target is durable
///   on the standby (RPO zero); the lifecycle never believes the standby holds more
///   than it does;
/// * a degraded target turns sync again only once it has caught up: streaming, no
///   resync pending, its ack covering the primary's durable position at the previous
///   ack of the session;
/// * a handover happens at most once, only while writes are stopped, and only when
///   the standby holds every record (same position, same volume);
/// * once writes stop, the standby converges to the primary's volume.
mod lifecycle {
    use std::collections::VecDeque;
    use std::fmt::Display;
    use std::time::Duration;

    use ferry_proto::session::{HandshakeError, Negotiated};
    use ferry_proto::target::*;
    use ferry_proto::wire::Seq;

    use super::Rng;

    const BLOCKS: usize = 24;
    /// Journal capacity, in records.
    const JOURNAL_CAP: u64 = 64;
    /// Ticks with client writes; then writes stop and the target must converge.
    const WRITE_TICKS: u64 = 3_000;
    const MAX_TICKS: u64 = 60_000;
    const SYNC_TIMEOUT_TICKS: u64 = 30;
    /// Records per write-set, dirty blocks per resync batch (one of each per tick).
    const SEND_PER_TICK: u64 = 4;
    const COPY_PER_TICK: usize = 3;
    /// Writes the converged target may need to show it caught up (acks only follow
    /// new records).
    const SETTLE_WRITES: u32 = 20;
    const NAME: &str = "dr1";
    const EPOCH: u64 = 5;

    #[derive(Debug, Clone, Copy)]
    struct Rec {
        seq: Seq,
        block: usize,
        value: u64,
    }

    /// This history's value for a record: odd, unique per sequence.
    fn value_of(seq: Seq) -> u64 {
        seq * 2 + 1
    }

    enum Down {
        WriteSet(Vec<Rec>),
        ResyncBegin { from: Seq, snapshot: Seq },
        ResyncData(Vec<(usize, u64)>),
        ResyncEnd { through: Seq },
        Handover { seq: Seq },
    }

    enum Up {
        Ack { durable: Seq },
        HandoverAck { seq: Seq, new_epoch: u64 },
        Refused,
    }

    /// One direction of a session: ordered, each message 1–3 ticks late.
    struct Link<T> {
        q: VecDeque<(u64, T)>,
    }

    impl<T> Default for Link<T> {
        fn default() -> Self {
            Self { q: VecDeque::new() }
        }
    }

    impl<T> Link<T> {
        fn send(&mut self, rng: &mut Rng, now: u64, msg: T) {
            let at = (now + 1 + rng.below(3)).max(self.q.back().map_or(0, |m| m.0));
            self.q.push_back((at, msg));
        }

        fn due(&mut self, now: u64) -> Vec<T> {
            let mut out = Vec::new();
            while self.q.front().is_some_and(|m| m.0 <= now) {
                if let Some((_, m)) = self.q.pop_front() {
                    out.push(m);
                }
            }
            out
        }
    }

    /// The standby's resync transition (ferryd `resync.rs`): it advertises `from`
    /// until the copy is complete (`through` known).
    #[derive(Debug, Clone, Copy)]
    struct SbResync {
        from: Seq,
        snapshot: Seq,
        through: Option<Seq>,
    }

    struct Standby {
        blocks: Vec<u64>,
        /// Journal position (jumps to the snapshot at ResyncBegin).
        durable: Seq,
        resync: Option<SbResync>,
        /// Holds writes past the fork that this history does not have.
        diverged: bool,
        acked_sent: Seq,
    }

    impl Standby {
        fn resume(&self) -> Seq {
            match self.resync {
                Some(r) if r.through.is_none() => r.from,
                _ => self.durable,
            }
        }

        fn copy_incomplete(&self) -> bool {
            self.resync.is_some_and(|r| r.through.is_none())
        }
    }

    /// The primary's side of the current session.
    #[derive(Debug, Clone, Copy)]
    enum Session {
        /// Resync planned from `from`: waits until the primary applied it.
        Begin {
            from: Seq,
        },
        Copy {
            cursor: usize,
        },
        Stream {
            next: Seq,
        },
    }

    struct Switchover {
        seq: Seq,
        requested: bool,
        deadline: u64,
    }

    #[derive(Default, Debug)]
    pub struct Stats {
        pub sessions: u64,
        pub refused: u64,
        pub full_switches: u64,
        pub overflow_switches: u64,
        pub switch_failures: u64,
        pub resyncs_done: u64,
        pub resyncs_interrupted: u64,
        pub resyncs_abandoned: u64,
        pub degraded: u64,
        pub caught_up: u64,
        pub handovers: u64,
        pub handover_failures: u64,
        pub primary_restarts: u64,
        pub disconnects: u64,
        pub failbacks: u64,
    }

    impl Stats {
        pub fn add(&mut self, o: &Stats) {
            self.sessions += o.sessions;
            self.refused += o.refused;
            self.full_switches += o.full_switches;
            self.overflow_switches += o.overflow_switches;
            self.switch_failures += o.switch_failures;
            self.resyncs_done += o.resyncs_done;
            self.resyncs_interrupted += o.resyncs_interrupted;
            self.resyncs_abandoned += o.resyncs_abandoned;
            self.degraded += o.degraded;
            self.caught_up += o.caught_up;
            self.handovers += o.handovers;
            self.handover_failures += o.handover_failures;
            self.primary_restarts += o.primary_restarts;
            self.disconnects += o.disconnects;
            self.failbacks += o.failbacks;
        }
    }

    /// Per-seed rates (per mille per tick), so seeds cover calm and rough runs.
    struct Rates {
        write: u64,
        connect: u64,
        disconnect: u64,
        restart: u64,
        switchover: u64,
        /// A resync batch goes out this tick (a slow link makes copies long).
        copy: u64,
    }

    struct Sim {
        seed: u64,
        rng: Rng,
        now: u64,
        rates: Rates,
        mode: SyncMode,
        /// Every record of this history (seq = index + 1); the journal holds
        /// `first_available..=durable` of it.
        history: Vec<Rec>,
        first_available: Seq,
        blocks: Vec<u64>,
        applied: Seq,
        /// The target's persisted dirty map, while it is not streaming.
        dirty: Option<Vec<bool>>,
        fork: Option<ForkView>,
        lc: TargetLifecycle,
        session: Option<Session>,
        /// The primary's durable position at the previous ack of the session (or at
        /// its streaming start): the sim's own "caught up" bar.
        durable_at_prev_ack: Seq,
        down: Link<Down>,
        up: Link<Up>,
        sb: Standby,
        /// Client writes waiting for the sync gate: (seq, since tick).
        pending_sync: VecDeque<(Seq, u64)>,
        switchover: Option<Switchover>,
        writes_on: bool,
        handed_over: bool,
        stats: Stats,
        /// `FERRY_SIM_TRACE=1`: print every lifecycle event of a replayed seed.
        trace: bool,
    }

    impl Sim {
        fn new(seed: u64) -> Sim {
            let mut rng = Rng::new(seed);
            let mode = if rng.chance(500) {
                SyncMode::Sync
            } else {
                SyncMode::Async
            };
            let rates = Rates {
                write: 200 + rng.below(500),
                connect: 5 + rng.below(60),
                disconnect: rng.below(8),
                restart: rng.below(2),
                // Most runs go the whole way; a handover ends a run.
                switchover: if rng.chance(300) { 1 + rng.below(3) } else { 0 },
                copy: 30 + rng.below(970),
            };
            let failback = rng.chance(350);
            let mut sim = Sim {
                seed,
                rng,
                now: 0,
                rates,
                mode,
                history: Vec::new(),
                first_available: 1,
                blocks: vec![0; BLOCKS],
                applied: 0,
                dirty: None,
                fork: None,
                lc: TargetLifecycle::new(NAME, mode, 0, false),
                session: None,
                durable_at_prev_ack: 0,
                down: Link::default(),
                up: Link::default(),
                sb: Standby {
                    blocks: vec![0; BLOCKS],
                    durable: 0,
                    resync: None,
                    diverged: false,
                    acked_sent: 0,
                },
                pending_sync: VecDeque::new(),
                switchover: None,
                writes_on: true,
                handed_over: false,
                stats: Stats::default(),
                trace: std::env::var_os("FERRY_SIM_TRACE").is_some(),
            };
            if failback {
                sim.setup_failback();
            }
            sim
        }

        /// A primary by promotion at `fork`; the target is the old primary, which
        /// wrote records after the fork that this history never got.
        fn setup_failback(&mut self) {
            self.stats.failbacks += 1;
            let fork = 10 + self.rng.below(20);
            for _ in 0..fork {
                let block = self.rng.below(BLOCKS as u64) as usize;
                let seq = self.append(block);
                self.sb.blocks[block] = value_of(seq);
            }
            let k = 1 + self.rng.below(40);
            for i in 1..=k {
                let block = self.rng.below(BLOCKS as u64) as usize;
                // Even: no value of this history.
                self.sb.blocks[block] = (fork + i) * 2;
            }
            self.sb.durable = fork + k;
            self.sb.diverged = true;
            for _ in 0..self.rng.below(15) {
                let block = self.rng.below(BLOCKS as u64) as usize;
                self.append(block);
            }
            self.applied = self.durable();
            self.fork = Some(ForkView {
                seq: fork,
                rejoined: false,
                cut: fork,
            });
            // ferryd starts targets at the checkpoint, degraded if away since the fork.
            self.lc = TargetLifecycle::new(NAME, self.mode, fork, true);
        }

        fn trace(&self, what: impl FnOnce() -> String) {
            if self.trace {
                eprintln!(
                    "  [{}] {} | {:?} {:?} acked {} | durable {} first {} | standby {} ({})",
                    self.now,
                    what(),
                    self.lc.phase(),
                    self.lc.tracking(),
                    self.lc.acked(),
                    self.durable(),
                    self.first_available,
                    self.sb.durable,
                    self.sb.resume()
                );
            }
        }

        fn fail(&self, msg: impl Display) -> ! {
            panic!(
                "lifecycle sim seed {} (replay: FERRY_SIM_SEED={}), tick {}: {msg}\n  target: {:?}",
                self.seed,
                self.seed,
                self.now,
                self.lc.snapshot()
            )
        }

        fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
            if !ok {
                self.fail(msg())
            }
        }

        fn time(&self) -> Duration {
            Duration::from_millis(self.now)
        }

        fn durable(&self) -> Seq {
            self.history.len() as Seq
        }

        fn append(&mut self, block: usize) -> Seq {
            let seq = self.durable() + 1;
            let value = value_of(seq);
            self.history.push(Rec { seq, block, value });
            self.blocks[block] = value;
            // Live marking while the target is tracked in a bitmap.
            if let Some(d) = &mut self.dirty {
                d[block] = true;
            }
            seq
        }

        fn run(mut self) -> Stats {
            let mut settle = 0;
            for now in 0..MAX_TICKS {
                self.now = now;
                if now == WRITE_TICKS {
                    self.writes_on = false;
                }
                if self.handed_over {
                    return self.stats;
                }
                if !self.writes_on && self.converged() {
                    if !self.lc.is_degraded() {
                        return self.stats;
                    }
                    // Acks only follow new records: a client write shows it caught up.
                    settle += 1;
                    self.check(settle <= SETTLE_WRITES, || {
                        "converged but never turned sync again".into()
                    });
                    self.client_write();
                }
                self.tick();
            }
            self.fail(format!(
                "no convergence in {MAX_TICKS} ticks (durable {}, standby {}, session {:?})",
                self.durable(),
                self.sb.durable,
                self.session
            ))
        }

        fn converged(&self) -> bool {
            matches!(self.session, Some(Session::Stream { .. }))
                && self.lc.tracking() == Tracking::Streaming
                && self.lc.acked() == self.durable()
                && self.sb.durable == self.durable()
                && self.sb.blocks == self.blocks
                && self.switchover.is_none()
                && self.pending_sync.is_empty()
        }

        fn tick(&mut self) {
            if self.writes_on && self.rng.chance(self.rates.write) {
                self.client_write();
            }
            self.applied = (self.applied + self.rng.below(3)).min(self.durable());
            self.monitor();
            self.sync_gate();
            self.drive_session();
            self.standby_receive();
            self.primary_receive();
            if !self.handed_over {
                self.switchover_step();
                self.faults();
                self.check_invariants();
            }
        }

        // -------------------------------------------------------------------
        // Primary: writes, the sync gate, the overflow monitor

        fn client_write(&mut self) {
            if self.switchover.is_some() {
                return; // quiesced
            }
            let used = self.durable() + 1 - self.first_available;
            if used >= JOURNAL_CAP {
                return; // waits for journal space
            }
            let block = self.rng.below(BLOCKS as u64) as usize;
            let seq = self.append(block);
            if self.mode == SyncMode::Sync {
                self.pending_sync.push_back((seq, self.now));
            }
        }

        fn sync_gate(&mut self) {
            while let Some(&(seq, since)) = self.pending_sync.front() {
                let pos = sync_gate_position([self.lc.sync_position()]);
                if pos >= seq {
                    if pos != Seq::MAX {
                        self.check(self.sb.durable >= seq, || {
                            format!(
                                "RPO: write {seq} acknowledged while the gate waited for the \
                                 target, which holds only {}",
                                self.sb.durable
                            )
                        });
                    } else if self.sb.durable < seq {
                        // Acknowledged without the target: a durable record must say so.
                        let loss = self.lc.sync_loss();
                        self.check(loss.is_some_and(|at| at < seq), || {
                            format!(
                                "write {seq} acknowledged without the target (it holds {}) \
                                 but the recorded sync loss is {loss:?}",
                                self.sb.durable
                            )
                        });
                    }
                    self.pending_sync.pop_front();
                } else if self.now - since >= SYNC_TIMEOUT_TICKS {
                    // Degraded now, or earlier (bitmap mode) with its loss not yet
                    // recorded: the daemon records it durably before writes go on.
                    let degraded = self.lc.sync_timeout(seq);
                    let to_record = self.lc.sync_loss_to_record();
                    self.check(degraded || to_record.is_some(), || {
                        "a write timed out but the target was not degraded".into()
                    });
                    self.stats.degraded += u64::from(degraded);
                    if let Some(at) = to_record {
                        self.lc.sync_loss_recorded(at);
                    }
                } else {
                    break;
                }
            }
        }

        fn monitor(&mut self) {
            let fill = JournalFill {
                used_bytes: self.durable() + 1 - self.first_available,
                capacity_bytes: JOURNAL_CAP,
            };
            if self.dirty.is_some() && (fill.flush_pressure() || self.rng.chance(100)) {
                self.lc.marks_flushed(self.durable());
            }
            let checkpoint = self.applied;
            if fill.overflowing() {
                if self.lc.abandon_resync(checkpoint) {
                    self.stats.resyncs_abandoned += 1;
                    if self.session.is_some() {
                        self.end_session("resync abandoned: the journal filled up");
                    }
                }
                let candidate = self.lc.switch_candidate(checkpoint, self.time());
                if choose_switch(candidate.map(|acked| ((), acked))).is_some() {
                    if let Some(sw) = self.lc.begin_overflow_switch() {
                        self.switch_to_bitmap(sw);
                    }
                }
            }
            let upto = release_floor([self.lc.floor()]).min(checkpoint);
            self.first_available = self.first_available.max(upto + 1);
        }

        /// Creates the dirty map (ferryd `enter_bitmap`); false if that failed.
        fn switch_to_bitmap(&mut self, sw: SwitchToBitmap) -> bool {
            self.check(self.dirty.is_none(), || "switch with a map in place".into());
            if self.rng.chance(100) {
                self.lc.switch_failed(self.time());
                self.stats.switch_failures += 1;
                return false;
            }
            self.trace(|| format!("switch {sw:?}"));
            let mut dirty = vec![sw.all_dirty(); BLOCKS];
            if !sw.all_dirty() {
                if self.first_available > sw.base + 1 {
                    // The journal no longer holds them: a full copy is always safe.
                    dirty = vec![true; BLOCKS];
                } else {
                    for r in &self.history[sw.base as usize..] {
                        dirty[r.block] = true;
                    }
                }
            }
            self.dirty = Some(dirty);
            match sw.kind {
                SwitchKind::Overflow => self.stats.overflow_switches += 1,
                SwitchKind::Full => self.stats.full_switches += 1,
            }
            if self.lc.bitmap_entered(self.durable()).end_session {
                self.end_session("switched to bitmap mode");
            }
            true
        }

        /// Marks every region in the existing map and flushes it; false if the
        /// flush failed.
        fn mark_all(&mut self) -> bool {
            self.trace(|| "mark every region".into());
            if self.rng.chance(100) {
                self.stats.switch_failures += 1;
                return false;
            }
            let Some(dirty) = self.dirty.as_mut() else {
                self.fail("mark all without a map")
            };
            dirty.iter_mut().for_each(|d| *d = true);
            self.stats.full_switches += 1;
            true
        }

        // -------------------------------------------------------------------
        // Sessions

        fn drive_session(&mut self) {
            match self.session {
                None => {
                    if self.rng.chance(self.rates.connect) {
                        self.connect();
                    }
                }
                Some(Session::Begin { from }) => self.begin_copy(from),
                Some(Session::Copy { cursor }) => self.copy(cursor),
                Some(Session::Stream { next }) => self.stream(next),
            }
        }

        fn connect(&mut self) {
            self.stats.sessions += 1;
            self.lc.connecting();
            self.down = Link::default();
            self.up = Link::default();
            self.sb.acked_sent = 0;
            let peer_resume = self.sb.resume();
            let hello = HelloInput {
                negotiated: Negotiated { version: 1 },
                epoch: EPOCH,
                peer_resume,
                journal: JournalView {
                    first_available: self.first_available,
                    durable: self.durable(),
                },
                fork: self.fork,
            };
            let planned = self.lc.plan_hello(&hello);
            self.trace(|| format!("hello at {peer_resume}, fork {:?}: {planned:?}", self.fork));
            let plan = match planned {
                Ok(plan) => plan,
                Err(e) => {
                    self.check(
                        matches!(
                            e,
                            HandshakeError::Diverged { .. } | HandshakeError::ForkDiverged { .. }
                        ) && peer_resume > self.durable(),
                        || format!("refused a standby at {peer_resume}: {e}"),
                    );
                    self.stats.refused += 1;
                    self.lc.session_ended(Some(e.to_string()));
                    return;
                }
            };
            self.check(plan.ack.resume_seq == peer_resume, || {
                format!(
                    "resume {} for a standby at {peer_resume}",
                    plan.ack.resume_seq
                )
            });
            // Done before the rejoin is recorded; a failure ends the session first.
            let prepared = match self.lc.begin_full_switch(&plan) {
                Ok(None) => true,
                Ok(Some(FullSwitch::Create(sw))) => self.switch_to_bitmap(sw),
                Ok(Some(FullSwitch::MarkAll)) => self.mark_all(),
                Err(SwitchInProgress) => self.fail("a switch in progress (they are atomic here)"),
            };
            if !prepared {
                self.lc
                    .session_ended(Some("preparing the full resync failed".into()));
                return;
            }
            if plan.record_rejoined {
                if let Some(f) = &mut self.fork {
                    f.rejoined = true;
                }
            }
            let start = self.lc.session_started(&plan, peer_resume, self.durable());
            self.durable_at_prev_ack = self.durable();
            match start {
                SessionStart::Stream { after } => {
                    self.check(!self.sb.diverged, || {
                        "streams to a standby holding writes of another history".into()
                    });
                    self.check(after == peer_resume && !self.sb.copy_incomplete(), || {
                        format!("streams after {after}; the standby holds {peer_resume}")
                    });
                    self.session = Some(Session::Stream { next: after + 1 });
                }
                SessionStart::Resync { from } => {
                    self.check(from == peer_resume, || format!("resync from {from}"));
                    self.session = Some(Session::Begin { from });
                }
            }
        }

        fn begin_copy(&mut self, from: Seq) {
            let start = match self.lc.resync_begin(from, self.applied) {
                Ok(start) => start,
                // ferryd waits (bounded) for the primary to apply the standby position.
                Err(ResyncRefused::NotApplied { .. }) => return,
                Err(e) => return self.end_session(&e.to_string()),
            };
            let Some(dirty) = self.dirty.as_mut() else {
                self.fail("a resync without a dirty map")
            };
            if start.mark_all {
                dirty.iter_mut().for_each(|d| *d = true);
            }
            let marked = dirty.iter().filter(|d| **d).count();
            // The digest comparison (the standby is untouched until the first data):
            // regions it already holds are not copied; sometimes it fails (copy all).
            if self.rng.chance(800) {
                for (b, d) in dirty.iter_mut().enumerate() {
                    if self.sb.blocks[b] == self.blocks[b] {
                        *d = false;
                    }
                }
            }
            self.trace(|| format!("{start:?}, {marked} dirty"));
            let msg = Down::ResyncBegin {
                from,
                snapshot: start.snapshot,
            };
            self.down.send(&mut self.rng, self.now, msg);
            self.session = Some(Session::Copy { cursor: 0 });
        }

        fn copy(&mut self, mut cursor: usize) {
            if let Some(why) = self.lc.must_end_session() {
                return self.end_session(&format!("{why:?}"));
            }
            if !self.rng.chance(self.rates.copy) {
                return;
            }
            let Some(dirty) = self.dirty.as_ref() else {
                self.fail("copying without a dirty map")
            };
            let mut batch = Vec::new();
            while cursor < BLOCKS && batch.len() < COPY_PER_TICK {
                if dirty[cursor] {
                    batch.push((cursor, self.blocks[cursor]));
                }
                cursor += 1;
            }
            if !batch.is_empty() {
                self.down
                    .send(&mut self.rng, self.now, Down::ResyncData(batch));
            }
            if cursor < BLOCKS {
                self.session = Some(Session::Copy { cursor });
                return;
            }
            let through = self.durable();
            let SessionStart::Stream { after } = self.lc.resync_copied(through, through) else {
                self.fail("a completed copy does not stream")
            };
            let Tracking::Resyncing { snapshot, .. } = self.lc.tracking() else {
                self.fail("copied without resyncing")
            };
            self.check(after == snapshot, || {
                format!("streams after {after}, snapshot {snapshot}")
            });
            self.durable_at_prev_ack = through;
            self.down
                .send(&mut self.rng, self.now, Down::ResyncEnd { through });
            self.session = Some(Session::Stream { next: after + 1 });
        }

        fn stream(&mut self, next: Seq) {
            // The heartbeat check (and the kick) of ferryd's session loop.
            if let Some(why) = self.lc.must_end_session() {
                return self.end_session(&format!("{why:?}"));
            }
            let upto = self.durable().min(next + SEND_PER_TICK - 1);
            if next <= upto {
                self.check(next >= self.first_available, || {
                    format!(
                        "the journal released record {next} a streaming session needs (it \
                         starts at {})",
                        self.first_available
                    )
                });
                let recs = self.history[(next - 1) as usize..upto as usize].to_vec();
                self.down
                    .send(&mut self.rng, self.now, Down::WriteSet(recs));
                self.session = Some(Session::Stream { next: upto + 1 });
            }
        }

        fn end_session(&mut self, why: &str) {
            let end = self.lc.session_ended(Some(why.into()));
            self.trace(|| format!("session ended ({why}): {end:?}"));
            if end.resync_interrupted {
                self.stats.resyncs_interrupted += 1;
            }
            if end.handover_failed {
                self.stats.handover_failures += 1;
                self.switchover = None;
            }
            self.session = None;
            self.down = Link::default();
            self.up = Link::default();
        }

        // -------------------------------------------------------------------
        // Standby

        fn standby_receive(&mut self) {
            for msg in self.down.due(self.now) {
                match msg {
                    Down::WriteSet(recs) => self.standby_write_set(recs),
                    Down::ResyncBegin { from, snapshot } => {
                        self.check(from == self.sb.resume(), || {
                            format!("ResyncBegin from {from}, standby at {}", self.sb.resume())
                        });
                        self.sb.resync = Some(SbResync {
                            from,
                            snapshot,
                            through: None,
                        });
                        self.sb.durable = snapshot;
                    }
                    Down::ResyncData(batch) => {
                        for (b, v) in batch {
                            self.sb.blocks[b] = v;
                        }
                    }
                    Down::ResyncEnd { through } => self.standby_resync_end(through),
                    Down::Handover { seq } => {
                        // ferryd standby: takes over only holding exactly `seq`.
                        let ok = self.sb.durable == seq
                            && !self.sb.copy_incomplete()
                            && !self.rng.chance(150);
                        let answer = if ok {
                            Up::HandoverAck {
                                seq,
                                new_epoch: EPOCH + 1,
                            }
                        } else {
                            Up::Refused
                        };
                        self.up.send(&mut self.rng, self.now, answer);
                    }
                }
            }
            if !self.sb.copy_incomplete()
                && self.sb.durable > self.sb.acked_sent
                && self.rng.chance(500)
            {
                self.sb.acked_sent = self.sb.durable;
                let ack = Up::Ack {
                    durable: self.sb.durable,
                };
                self.up.send(&mut self.rng, self.now, ack);
            }
        }

        fn standby_write_set(&mut self, recs: Vec<Rec>) {
            self.check(!self.sb.copy_incomplete(), || {
                "a write-set reached a standby in the middle of a copy".into()
            });
            for r in recs {
                self.check(r.seq == self.sb.durable + 1, || {
                    format!(
                        "the standby got record {} after {}: skipped or duplicated",
                        r.seq, self.sb.durable
                    )
                });
                self.check(r.value == value_of(r.seq), || "wrong data".into());
                self.sb.blocks[r.block] = r.value;
                self.sb.durable = r.seq;
            }
            if let Some(rs) = self.sb.resync {
                if rs.through.is_some_and(|t| self.sb.durable >= t) {
                    self.sb.resync = None;
                }
            }
        }

        fn standby_resync_end(&mut self, through: Seq) {
            let Some(rs) = self.sb.resync.as_mut() else {
                self.fail("ResyncEnd without ResyncBegin")
            };
            rs.through = Some(through);
            self.sb.durable = rs.snapshot;
            // Its journal now continues this history from the snapshot.
            self.sb.diverged = false;
            if self.sb.durable >= through {
                self.sb.resync = None;
            }
        }

        // -------------------------------------------------------------------
        // Primary: answers from the standby

        fn primary_receive(&mut self) {
            for msg in self.up.due(self.now) {
                if self.session.is_none() || self.handed_over {
                    return;
                }
                match msg {
                    Up::Ack { durable } => self.on_ack(durable),
                    Up::HandoverAck { seq, new_epoch } => {
                        match self.lc.on_handover_ack(seq, new_epoch) {
                            Ok(done) => self.on_handed_over(done),
                            Err(e) => {
                                if e.handover_failed {
                                    self.stats.handover_failures += 1;
                                    self.switchover = None;
                                }
                                self.end_session(&e.to_string());
                            }
                        }
                    }
                    Up::Refused => {
                        if self.lc.on_peer_error() {
                            self.stats.handover_failures += 1;
                            self.switchover = None;
                        }
                        self.end_session("the standby refused");
                    }
                }
            }
        }

        fn on_ack(&mut self, durable: Seq) {
            if self.lc.phase() == TargetPhase::Resyncing {
                // Sent before the standby saw ResyncBegin: ignored during a copy.
                let acked = self.lc.acked();
                let out = self.lc.on_ack(durable, durable, self.durable());
                self.check(
                    out == AckOutcome::default() && self.lc.acked() == acked,
                    || "an ack moved a target in the middle of a copy".into(),
                );
                return;
            }
            let bar = self.durable_at_prev_ack;
            let was_degraded = self.lc.is_degraded();
            let out = self.lc.on_ack(durable, durable, self.durable());
            self.durable_at_prev_ack = self.durable();
            if out.resync_complete {
                self.dirty = None;
                self.stats.resyncs_done += 1;
            }
            if out.caught_up {
                // As the daemon: after the gate's recompute, at the durable position.
                let _ = self.lc.sync_resumed(self.durable());
                self.stats.caught_up += 1;
                self.check(
                    was_degraded
                        && durable >= bar
                        && self.lc.tracking() == Tracking::Streaming
                        && !self.sb.copy_incomplete()
                        && self.sb.durable >= durable,
                    || format!("sync again at ack {durable} (bar {bar})"),
                );
            } else {
                self.check(
                    !was_degraded || durable < bar || !self.lc.is_degraded(),
                    || format!("caught up at {durable} (bar {bar}) but still degraded"),
                );
            }
        }

        fn on_handed_over(&mut self, done: HandedOver) {
            let Some(so) = self.switchover.as_ref() else {
                self.fail("a handover without a switchover")
            };
            self.check(so.requested && so.seq == done.seq, || {
                format!("handed over at {}, switchover at {}", done.seq, so.seq)
            });
            self.check(self.durable() == done.seq, || {
                format!("writes after the handover point {}", done.seq)
            });
            self.check(
                self.sb.durable == done.seq
                    && self.sb.blocks == self.blocks
                    && !self.sb.copy_incomplete()
                    && !self.sb.diverged,
                || {
                    format!(
                        "handed over at {} to a standby at {} (diverged {}, copy incomplete {}, \
                         volumes differ at {:?})",
                        done.seq,
                        self.sb.durable,
                        self.sb.diverged,
                        self.sb.copy_incomplete(),
                        (0..BLOCKS)
                            .filter(|&b| self.sb.blocks[b] != self.blocks[b])
                            .map(|b| (b, self.sb.blocks[b], self.blocks[b]))
                            .collect::<Vec<_>>()
                    )
                },
            );
            let again = self.lc.request_handover(done.seq);
            self.check(
                matches!(again, Err(HandoverRefused::AlreadyHandedOver { .. })),
                || "a second handover was accepted".into(),
            );
            self.stats.handovers += 1;
            self.handed_over = true;
            self.end_session("handed over");
        }

        // -------------------------------------------------------------------
        // Switchover, faults, invariants

        fn switchover_step(&mut self) {
            let Some(mut so) = self.switchover.take() else {
                if self.writes_on
                    && self.lc.handover_precheck().is_ok()
                    && self.rng.chance(self.rates.switchover)
                {
                    // Writes stop; the standby must confirm everything up to here.
                    self.switchover = Some(Switchover {
                        seq: self.durable(),
                        requested: false,
                        deadline: self.now + 300,
                    });
                }
                return;
            };
            if so.requested {
                self.switchover = Some(so); // waiting for the answer
                return;
            }
            // Asked every tick: the lifecycle refuses until the target holds `seq`.
            match self.lc.request_handover(so.seq) {
                Ok(SendHandover { seq }) => {
                    self.check(seq == so.seq && self.sb.durable >= seq, || {
                        format!("handover at {seq} sent to a standby at {}", self.sb.durable)
                    });
                    self.down
                        .send(&mut self.rng, self.now, Down::Handover { seq });
                    so.requested = true;
                    self.switchover = Some(so);
                }
                Err(HandoverRefused::NotCaughtUp { .. }) if self.now <= so.deadline => {
                    self.switchover = Some(so);
                }
                Err(_) => self.stats.handover_failures += 1,
            }
        }

        fn faults(&mut self) {
            if self.session.is_some() && self.rng.chance(self.rates.disconnect) {
                self.stats.disconnects += 1;
                self.end_session("link lost");
            }
            if self.switchover.is_none() && self.rng.chance(self.rates.restart) {
                self.restart_primary();
            }
        }

        /// The primary process dies and starts again: sessions, acks and waiting
        /// client writes are gone; the journal, the checkpoint, the dirty maps and
        /// the fork record survive.
        fn restart_primary(&mut self) {
            self.trace(|| "primary restart".into());
            self.stats.primary_restarts += 1;
            self.session = None;
            self.down = Link::default();
            self.up = Link::default();
            self.pending_sync.clear();
            let checkpoint = self.applied;
            self.applied = self.durable(); // recovery replays the journal
            let away = self.fork.is_some_and(|f| !f.rejoined);
            let old = self.lc.tracking();
            self.lc = TargetLifecycle::new(NAME, self.mode, checkpoint, away);
            match old {
                Tracking::Bitmap {
                    base,
                    flushed_through,
                }
                | Tracking::Resyncing {
                    base,
                    flushed_through,
                    ..
                } => self.lc.reopened_in_bitmap(base, flushed_through),
                Tracking::Streaming => {}
                Tracking::Switching { .. } => self.fail("restart during an atomic switch"),
            }
        }

        fn check_invariants(&self) {
            let phase = self.lc.phase();
            let consistent = match self.session {
                None => matches!(phase, TargetPhase::Connecting | TargetPhase::Disconnected),
                Some(Session::Begin { .. } | Session::Copy { .. }) => {
                    phase == TargetPhase::Resyncing
                }
                Some(Session::Stream { .. }) => matches!(
                    phase,
                    TargetPhase::Streaming | TargetPhase::HandingOver { .. }
                ),
            };
            self.check(consistent, || {
                format!("phase {phase:?} with session {:?}", self.session)
            });
            if self.session.is_some() {
                self.check(self.lc.acked() <= self.sb.durable, || {
                    format!(
                        "believes the standby holds {}, it holds {}",
                        self.lc.acked(),
                        self.sb.durable
                    )
                });
            }
            self.check(
                self.dirty.is_some() == (self.lc.tracking() != Tracking::Streaming),
                || format!("dirty map {:?}", self.dirty.is_some()),
            );
            let resyncing = matches!(self.lc.tracking(), Tracking::Resyncing { .. });
            self.check(!resyncing || self.session.is_some(), || {
                "a resync outlived its session".into()
            });
            self.check(self.first_available <= self.durable() + 1, || {
                "released past the durable position".into()
            });
        }
    }

    pub fn run(seed: u64) -> Stats {
        Sim::new(seed).run()
    }
}

#[test]
fn simulated_target_lifecycle_resyncs_fails_back_and_hands_over_safely() {
    let seeds = seeds();
    let many = seeds.len() >= 32;
    let mut total = lifecycle::Stats::default();
    for seed in seeds {
        eprintln!("lifecycle sim seed {seed} (replay: FERRY_SIM_SEED={seed})");
        let stats = lifecycle::run(seed);
        eprintln!("  ok: {stats:?}");
        total.add(&stats);
    }
    eprintln!("total: {total:?}");
    if many {
        // Guard against a simulation that silently stopped reaching the paths it is for.
        let t = &total;
        assert!(
            t.refused > 0
                && t.full_switches > 0
                && t.overflow_switches > 0
                && t.switch_failures > 0
                && t.resyncs_done > 0
                && t.resyncs_interrupted > 0
                && t.resyncs_abandoned > 0
                && t.degraded > 0
                && t.caught_up > 0
                && t.handovers > 0
                && t.handover_failures > 0
                && t.primary_restarts > 0
                && t.disconnects > 0
                && t.failbacks > 0,
            "{total:?}"
        );
    }
}
