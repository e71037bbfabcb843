//! Storage faults injected at the journal's and the undo log's IO edges (feature
//! `failpoints`; names in journal/FAILPOINTS.md). Failpoints are process-global:
//! every test holds a `fail::FailScenario`, which also serialises them.
//!
//! The rule under test (FORMAT.md, "Storage faults"): ENOSPC waits and retries
//! (appends block, nothing acknowledged is lost, writing resumes by itself); EIO
//! and every other error fail the journal as before, and a reopen recovers every
//! acknowledged record.
#![cfg(feature = "failpoints")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferry_journal::undo::{EntryKind, UndoEntry, UndoExtent, UndoLog};
use ferry_journal::*;
use parking_lot::Mutex;

const REC_LEN: usize = 3000;

fn rec(seq: Seq) -> Record {
    Record::write(0, seq * 4096, payload(seq, REC_LEN))
}

/// Appends seqs `from..=to` from another thread, each waited for; returns the
/// results in order.
fn append_in_thread(
    j: &Arc<Journal>,
    from: Seq,
    to: Seq,
) -> std::thread::JoinHandle<Vec<Result<Seq, JournalError>>> {
    let j = j.clone();
    std::thread::spawn(move || (from..=to).map(|s| j.append_wait(rec(s))).collect())
}

/// Reopens `dir` and checks it holds exactly seqs 1..=last with their payloads.
fn reopen_holds(dir: &std::path::Path, engine: EngineChoice, last: Seq) {
    reopen_holds_between(dir, engine, last, last);
}

/// Reopens `dir`: it holds seqs 1..=n, `acked <= n <= written`, with their payloads
/// (records written but never acknowledged may survive).
fn reopen_holds_between(dir: &std::path::Path, engine: EngineChoice, acked: Seq, written: Seq) {
    let (j, rep) = Journal::open(opts(dir, engine)).unwrap();
    assert!((acked..=written).contains(&rep.last_seq), "{rep:?}");
    let last = rep.last_seq;
    let mut expect = 1;
    for e in j.reader(0).unwrap() {
        let e = e.unwrap();
        assert_eq!((e.seq, &e.record.data), (expect, &payload(expect, REC_LEN)));
        expect += 1;
    }
    assert_eq!(expect, last + 1);
}

/// Waits until `cond` holds (or panics after 10 s).
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn enospc_on_batch_writes_waits_then_every_append_completes_in_order() {
    for engine in engines() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(opts(dir.path(), engine)).unwrap();
        let j = Arc::new(j);
        for s in 1..=10 {
            assert_eq!(j.append_wait(rec(s)).unwrap(), s);
        }
        // Out of space until further notice: appends wait, none fails.
        fail::cfg("journal::batch_write", "return(ENOSPC)").unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        for s in 11..=60 {
            let order = order.clone();
            j.append(rec(s), Box::new(move |r| order.lock().push(r)))
                .unwrap();
        }
        wait_until("the journal waits for space", || {
            j.stats().waiting_for_space_since_ns != 0
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            order.lock().is_empty(),
            "nothing is acknowledged while out of space"
        );
        assert_eq!(j.durable_seq(), 10);
        let st = j.stats();
        assert_eq!(st.space_waits, 1, "{st:?}");
        // Space returns: writing resumes by itself.
        fail::remove("journal::batch_write");
        wait_until("all 50 appends complete", || order.lock().len() == 50);
        let got: Vec<Seq> = order.lock().iter().map(|r| *r.as_ref().unwrap()).collect();
        assert_eq!(got, (11..=60).collect::<Vec<_>>(), "in sequence order");
        let st = j.stats();
        assert_eq!(
            (st.space_waits, st.waiting_for_space_since_ns),
            (1, 0),
            "{st:?}"
        );
        assert!(st.space_retries >= 1, "{st:?}");
        // N failures then success, the form the issue names.
        fail::cfg("journal::batch_write", "3*return(ENOSPC)").unwrap();
        let t = append_in_thread(&j, 61, 80);
        assert!(t.join().unwrap().into_iter().all(|r| r.is_ok()));
        assert_eq!(j.stats().space_waits, 2);
        drop(j);
        reopen_holds(dir.path(), engine, 80);
        scenario.teardown();
    }
}

/// ENOSPC reported by the write's completion (io_uring CQE or fdatasync) with a
/// later write in flight: the failed write and every later one are written again,
/// in order, before anything after them is acknowledged.
#[test]
fn enospc_at_completion_with_writes_in_flight_rewrites_them_in_order() {
    for engine in engines() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path(), engine);
        o.max_inflight_batches = 2;
        o.max_batch_bytes = 8 << 10;
        let (j, _) = Journal::open(o).unwrap();
        let j = Arc::new(j);
        fail::cfg("journal::batch_complete", "2*return(ENOSPC)").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| append_in_thread(&j, 1 + 50 * t, 50 * (t + 1)))
            .collect();
        for t in threads {
            assert!(t.join().unwrap().into_iter().all(|r| r.is_ok()));
        }
        assert!(j.stats().space_waits >= 1);
        drop(j);
        reopen_holds_any_order(dir.path(), engine, 200);
        scenario.teardown();
    }
}

/// Reopens `dir`: seqs 1..=last present (appended from several threads, so the
/// payload of a seq is not tied to it: only the count and order are checked).
fn reopen_holds_any_order(dir: &std::path::Path, engine: EngineChoice, last: Seq) {
    let (j, rep) = Journal::open(opts(dir, engine)).unwrap();
    assert_eq!(rep.last_seq, last, "{rep:?}");
    assert_eq!(
        j.reader(0)
            .unwrap()
            .map(|e| e.unwrap().seq)
            .collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
}

/// ENOSPC (and EMFILE) while a new segment is created or opened: the segment
/// helper and the writer wait, appends block, then continue into new segments.
#[test]
fn enospc_creating_segments_and_emfile_opening_them_wait() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(opts(dir.path(), EngineChoice::Std)).unwrap();
    let j = Arc::new(j);
    fail::cfg("journal::segment_zero", "4*return(ENOSPC)").unwrap();
    fail::cfg("journal::segment_open", "2*return(EMFILE)").unwrap();
    // ~1200 records of 3 KB: several 1 MiB segments.
    let t = append_in_thread(&j, 1, 1200);
    assert!(t.join().unwrap().into_iter().all(|r| r.is_ok()));
    let st = j.stats();
    assert!(st.space_waits >= 1 && st.segments_zeroed >= 3, "{st:?}");
    assert_eq!(st.waiting_for_space_since_ns, 0);
    // No half-zeroed temporary file was left holding space.
    let tmp = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(tmp, 0);
    drop(j);
    reopen_holds(dir.path(), EngineChoice::Std, 1200);
    scenario.teardown();
}

/// EIO is not waited for: the journal fails as before (the batch, everything after
/// it), and a reopen recovers every record acknowledged before the error.
#[test]
fn eio_fails_the_journal_and_a_reopen_recovers_every_acknowledged_record() {
    for (fp, engine) in engines()
        .into_iter()
        .flat_map(|e| [("journal::batch_write", e), ("journal::batch_complete", e)])
    {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(opts(dir.path(), engine)).unwrap();
        for s in 1..=25 {
            assert_eq!(j.append_wait(rec(s)).unwrap(), s);
        }
        fail::cfg(fp, "return(EIO)").unwrap();
        let err = j.append_wait(rec(26)).unwrap_err();
        match &err {
            JournalError::Io { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EIO), "{fp}")
            }
            e => panic!("{fp}: expected an io error, got {e}"),
        }
        // Failed for good: later appends get the error too, nothing waits.
        assert!(matches!(
            j.append_wait(rec(26)),
            Err(JournalError::Io { .. })
        ));
        assert_eq!(j.stats().space_waits, 0);
        fail::remove(fp);
        assert!(j.close().is_err());
        // A write failed at completion may have landed (never acknowledged).
        reopen_holds_between(dir.path(), engine, 25, 26);
        scenario.teardown();
    }
}

fn undo_entry(n: u64, len: usize) -> UndoEntry {
    UndoEntry {
        first_seq: n,
        last_seq: n,
        timestamp_ns: n,
        extents: vec![UndoExtent::data(
            1,
            n * 4096,
            Bytes::from(vec![n as u8; len]),
        )],
        kind: EntryKind::WriteSet,
    }
}

/// The undo log's `append` (the standby applier) waits on ENOSPC, on an append
/// and on a segment creation, and the entries are all there after a reopen.
#[test]
fn undo_append_waits_for_space() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    // Two entries per segment: creations and appends alternate.
    let (mut log, _) = UndoLog::open(dir.path(), CLUSTER, 3 * 4096).unwrap();
    let mon = log.space_monitor();
    log.append(&undo_entry(1, 3000)).unwrap();
    // Entry 2 is appended to segment 1, entry 3 creates segment 2.
    fail::cfg("undo::append_write", "3*return(ENOSPC)").unwrap();
    log.append(&undo_entry(2, 3000)).unwrap();
    fail::cfg("undo::segment_write", "2*return(ENOSPC)").unwrap();
    log.append(&undo_entry(3, 3000)).unwrap();
    let st = mon.stats();
    assert_eq!(log.segment_count(), 2);
    assert_eq!((st.episodes, st.waiting_since_ns), (2, 0), "{st:?}");
    assert!(st.retries >= 3, "{st:?}");
    drop(log);
    let (log, rec) = UndoLog::open(dir.path(), CLUSTER, 3 * 4096).unwrap();
    assert_eq!((rec.entries, rec.truncated), (3, None));
    for (i, p) in log.points().iter().enumerate() {
        assert_eq!(
            log.read_entry(&p.position).unwrap(),
            undo_entry(i as u64 + 1, 3000)
        );
    }
    scenario.teardown();
}

/// EIO on an undo append fails it (the log is poisoned, as before); a reopen
/// has every entry appended before.
#[test]
fn undo_eio_fails_and_reopen_keeps_earlier_entries() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = UndoLog::open(dir.path(), CLUSTER, 1 << 20).unwrap();
    for n in 1..=4 {
        log.append(&undo_entry(n, 2000)).unwrap();
    }
    fail::cfg("undo::append_fdatasync", "return(EIO)").unwrap();
    assert!(log.append(&undo_entry(5, 2000)).is_err());
    assert_eq!(log.space_monitor().stats().episodes, 0);
    fail::remove("undo::append_fdatasync");
    drop(log);
    let (log, rec) = UndoLog::open(dir.path(), CLUSTER, 1 << 20).unwrap();
    // The failed append's bytes may or may not have landed; the earlier four did.
    assert!(rec.entries >= 4, "{rec:?}");
    for n in 1..=4u64 {
        let p = log.points()[n as usize - 1].position;
        assert_eq!(log.read_entry(&p).unwrap(), undo_entry(n, 2000));
    }
    scenario.teardown();
}

/// Recovery's reads fail with EIO: the open fails with that error and changes
/// nothing; without the fault the journal opens whole.
#[test]
fn eio_reading_during_recovery_refuses_to_open() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(opts(dir.path(), EngineChoice::Std)).unwrap();
    for s in 1..=5 {
        j.append_wait(rec(s)).unwrap();
    }
    drop(j);
    fail::cfg("journal::pread", "return(EIO)").unwrap();
    assert!(matches!(
        Journal::open(opts(dir.path(), EngineChoice::Std)),
        Err(JournalError::Io { .. })
    ));
    fail::remove("journal::pread");
    reopen_holds(dir.path(), EngineChoice::Std, 5);
    scenario.teardown();
}
