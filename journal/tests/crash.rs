//! Crash test: a child process appends from several threads and prints every
//! acknowledged sequence; the parent SIGKILLs it at a random moment, reopens the
//! journal and checks that every acknowledged record is there, intact, with
//! contiguous sequences and nothing replayed past the tail. Repeated on the same
//! directory, so torn tails, segment preparation and recycling get killed too.
//! Run twice: plaintext, and encrypted at rest (the torn batches emulated below are
//! then found by the CRC over the ciphertext).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_journal::format::{self, BatchHeader};
use ferry_journal::*;
use parking_lot::Mutex;

const ENV_DIR: &str = "FERRY_JOURNAL_CRASH_DIR";
const ENV_ENGINE: &str = "FERRY_JOURNAL_CRASH_ENGINE";
/// Set (to anything) when the journal is encrypted at rest.
const ENV_ENCRYPTED: &str = "FERRY_JOURNAL_CRASH_ENCRYPTED";
const ITERATIONS: u64 = 20;
const TOTAL_BUDGET: Duration = Duration::from_secs(30);

fn crash_opts(dir: &std::path::Path, engine: EngineChoice, encrypted: bool) -> JournalOptions {
    let mut o = JournalOptions::new(dir, CLUSTER);
    o.encryption =
        encrypted.then(|| Arc::new(ferry_gm::atrest::Kek::from_bytes(b"crash-test-key!!")));
    o.segment_size = 2 * MIB;
    o.capacity = 24 * MIB;
    o.engine = engine;
    o.max_batch_bytes = 1 << 20;
    o.queue_records = 32;
    // io_uring iterations pipeline two batch writes; std runs at depth 1.
    o.max_inflight_batches = 2;
    o
}

/// `append_wait`, bounded: a record the journal cannot take fails the test with a
/// message instead of hanging it.
fn append_within(j: &Journal, rec: Record, within: Duration, iter: u64) -> u64 {
    let (tx, rx) = std::sync::mpsc::channel();
    j.append(
        rec,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )
    .unwrap_or_else(|e| panic!("iteration {iter}: append refused: {e}"));
    match rx.recv_timeout(within) {
        Ok(r) => r.unwrap_or_else(|e| panic!("iteration {iter}: append failed: {e}")),
        Err(_) => panic!("iteration {iter}: an append was not durable within {within:?}"),
    }
}

/// Record size for `seq`: 1 B ..= 256 KiB, derived from the seq so it can be checked.
fn len_of(seq: u64) -> usize {
    let mut r = Rng(seq.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    // Mostly small writes, some large ones, like a block device sees.
    if r.below(4) == 0 {
        r.below(256 << 10) as usize + 1
    } else {
        r.below(16 << 10) as usize + 1
    }
}

/// The child: runs only when the parent sets the env var.
#[test]
fn crash_child_process() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let engine = match std::env::var(ENV_ENGINE).as_deref() {
        Ok("std") => EngineChoice::Std,
        _ => EngineChoice::Auto,
    };
    let encrypted = std::env::var_os(ENV_ENCRYPTED).is_some();
    let (j, _) =
        Journal::open(crash_opts(dir.as_ref(), engine, encrypted)).expect("child: open journal");
    let j = Arc::new(j);
    // Seq assignment and payload generation under one lock, so the payload can be
    // derived from the seq; the writes still group-commit (append does not wait).
    let lock = Arc::new(Mutex::new(()));
    let deadline = Instant::now() + Duration::from_secs(15);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (j, lock) = (j.clone(), lock.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let g = lock.lock();
                    let seq = j.last_seq() + 1;
                    let rec = Record::write(1, seq * 512, payload(seq, len_of(seq)));
                    let done: Completion = Box::new(move |r| {
                        let s = r.expect("child: append failed");
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ack {s}");
                        let _ = out.flush();
                    });
                    let got = j.append(rec, done).expect("child: append");
                    assert_eq!(got, seq);
                    drop(g);
                }
            })
        })
        .collect();
    // A checkpointer releasing old data, so segments get recycled and deleted.
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let upto = j.durable_seq().saturating_sub(200);
        // Announce before releasing, so the parent knows which acks may be gone.
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "release {upto}");
            let _ = out.flush();
        }
        j.release_through(upto).expect("child: release");
    }
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn crash_kill_reopen_verify() {
    kill_reopen_verify(false);
}

#[test]
fn crash_kill_reopen_verify_encrypted() {
    kill_reopen_verify(true);
}

fn kill_reopen_verify(encrypted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut rng = Rng(0x5eed_0000_0000_0001 ^ std::process::id() as u64);
    eprintln!("crash test seed pid {}", std::process::id());
    let mut total_acked = 0usize;
    for iter in 0..ITERATIONS {
        if start.elapsed() > TOTAL_BUDGET - Duration::from_secs(3) {
            eprintln!("crash test: time budget reached after {iter} iterations");
            break;
        }
        let engine = if iter % 2 == 0 { "std" } else { "auto" };
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_DIR, dir.path())
            .env(ENV_ENGINE, engine)
            .envs(encrypted.then_some((ENV_ENCRYPTED, "1")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let acks = Arc::new(Mutex::new(Vec::<u64>::new()));
        let released = Arc::new(Mutex::new(0u64));
        let stdout = child.stdout.take().unwrap();
        let reader = {
            let (acks, released) = (acks.clone(), released.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(s) = line
                        .strip_prefix("ack ")
                        .and_then(|s| s.trim().parse().ok())
                    {
                        acks.lock().push(s);
                    } else if let Some(s) = line
                        .strip_prefix("release ")
                        .and_then(|s| s.trim().parse::<u64>().ok())
                    {
                        let mut r = released.lock();
                        *r = (*r).max(s);
                    }
                }
            })
        };
        let delay = Duration::from_millis(100 + rng.below(400));
        std::thread::sleep(delay);
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("child exited on its own ({status}) in iteration {iter}:\n{err}");
        }
        // Kill exactly our child, by its PID.
        child.kill().expect("SIGKILL child");
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => panic!(
                    "child {} did not die within 10 s after SIGKILL: {other:?}",
                    child.id()
                ),
            }
        }
        reader.join().unwrap();
        let acks = acks.lock().clone();
        total_acked += acks.len();

        let (j, rep) = Journal::open(crash_opts(dir.path(), EngineChoice::Std, encrypted))
            .unwrap_or_else(|e| panic!("iteration {iter}: reopen after SIGKILL failed: {e}"));
        // Acks were printed in order by the completion thread.
        assert!(
            acks.windows(2).all(|w| w[0] + 1 == w[1]),
            "iteration {iter}: acks out of order"
        );
        if let Some(&max_ack) = acks.last() {
            assert!(
                rep.last_seq >= max_ack,
                "iteration {iter}: acked seq {max_ack} lost (recovered up to {})",
                rep.last_seq
            );
        }
        let mut expect = rep.first_seq;
        for e in j.reader(rep.first_seq).unwrap() {
            let e = e.unwrap_or_else(|e| panic!("iteration {iter}: read failed: {e}"));
            assert_eq!(e.seq, expect, "iteration {iter}: sequence gap");
            assert_eq!(e.record.offset, e.seq * 512);
            assert!(
                e.record.data == payload(e.seq, len_of(e.seq)),
                "iteration {iter}: payload of seq {} differs",
                e.seq
            );
            expect += 1;
        }
        // Nothing beyond the recovered tail is replayed, nothing below it missing.
        assert_eq!(
            expect,
            rep.last_seq + 1,
            "iteration {iter}: reader ended at {expect}, report says {}",
            rep.last_seq
        );
        // Every acknowledged seq the child did not release must still be there.
        let released = *released.lock();
        if let Some(&oldest_kept_ack) = acks.iter().find(|&&s| s > released) {
            assert!(
                rep.first_seq != 0 && rep.first_seq <= oldest_kept_ack,
                "iteration {iter}: acked seq {oldest_kept_ack} (released only through {released}) missing; log starts at {}",
                rep.first_seq
            );
        }
        eprintln!(
            "iteration {iter} ({engine}{}): killed after {delay:?}, {} acked, recovered {}..={}, truncated {} batch(es), {} segments",
            if encrypted { ", encrypted" } else { "" },
            acks.len(), rep.first_seq, rep.last_seq, rep.truncated_batches, rep.segments
        );
        j.close().unwrap();

        // Power-loss emulation: SIGKILL cannot tear a write the kernel accepted,
        // so tear the last batch ourselves when nobody was told it was durable.
        let max_ack = acks.last().copied().unwrap_or(0);
        // With two writes in flight the older one can tear while the newer lands:
        // recovery must discard both (in a segment whose header records depth 2).
        // Emulated on two batches the parent appends itself (SIGKILL alone cannot
        // tear a write), treated as never acknowledged.
        let mut tail = last_batches(dir.path());
        if iter % 3 == 1 && tail.as_ref().is_some_and(|t| t.1 == 2) {
            let opts = crash_opts(dir.path(), EngineChoice::Auto, encrypted);
            let max_segments = (opts.capacity / opts.segment_size) as usize;
            let (j, rep3) = Journal::open(opts).unwrap();
            // A reopened journal appends in a new segment. When the child was killed
            // with every segment holding unreleased records and no spare, there is
            // none to take: the appends would wait for a release that never comes
            // (a hang seen in CI). The tear is skipped for this iteration then.
            if rep3.segments >= max_segments && rep3.spare_segments == 0 {
                eprintln!(
                    "iteration {iter}: journal full after the kill ({} segments, no spare): no pipelined tear",
                    rep3.segments
                );
            } else {
                for _ in 0..2 {
                    let seq = j.last_seq() + 1;
                    let rec = Record::write(1, seq * 512, payload(seq, len_of(seq)));
                    append_within(&j, rec, Duration::from_secs(30), iter);
                }
            }
            j.close().unwrap();
            tail = last_batches(dir.path());
        }
        if let Some((path, 2, batches)) = &tail {
            if let [.., (offset, h), (_, h2)] = batches[..] {
                if h.first_seq > max_ack && iter % 3 == 1 {
                    let mut bytes = std::fs::read(path).unwrap();
                    let at = offset as usize + format::BATCH_HEADER_LEN + h.body_len as usize / 2;
                    bytes[at] ^= 0x5a;
                    std::fs::write(path, bytes).unwrap();
                    let (j, rep2) =
                        Journal::open(crash_opts(dir.path(), EngineChoice::Std, encrypted))
                            .unwrap();
                    assert_eq!(
                        (rep2.truncated_batches, rep2.last_seq),
                        (2, h.first_seq - 1),
                        "iteration {iter}: pipelined torn tail not discarded"
                    );
                    let needle =
                        format!("discarded 2 batches, seqs {}..{}", h.first_seq, h2.last_seq);
                    assert!(
                        rep2.events.iter().any(|e| e.contains(&needle)),
                        "iteration {iter}: {:?}",
                        rep2.events
                    );
                    eprintln!(
                        "iteration {iter}: tore second-to-last unacknowledged batch {}..={} (last {}..={} valid), recovery discarded both",
                        h.first_seq, h.last_seq, h2.first_seq, h2.last_seq
                    );
                    j.close().unwrap();
                }
            }
        }
        let last = tail.and_then(|(p, _, b)| b.last().map(|&(o, h)| (p, o, h)));
        if let Some((path, offset, h)) = last.filter(|_| iter % 3 != 1) {
            if h.first_seq > max_ack && iter % 3 == 0 {
                let mut bytes = std::fs::read(&path).unwrap();
                let at = offset as usize + format::BATCH_HEADER_LEN + h.body_len as usize / 2;
                bytes[at] ^= 0x5a;
                std::fs::write(&path, bytes).unwrap();
                let (j, rep2) =
                    Journal::open(crash_opts(dir.path(), EngineChoice::Std, encrypted)).unwrap();
                assert_eq!(
                    rep2.truncated_batches, 1,
                    "iteration {iter}: torn batch not truncated"
                );
                assert_eq!(rep2.last_seq, h.first_seq - 1);
                let n = j
                    .reader(h.first_seq.saturating_sub(1).max(rep2.first_seq))
                    .unwrap()
                    .count();
                assert!(
                    n <= 1,
                    "iteration {iter}: records after the torn batch replayed"
                );
                eprintln!(
                    "iteration {iter}: tore unacknowledged batch {}..={}, recovery truncated it",
                    h.first_seq, h.last_seq
                );
                j.close().unwrap();
            }
        }
    }
    assert!(total_acked > 0, "no child ever acknowledged a record");
}

/// Locates the newest activated segment (a valid header), using only the pure
/// format functions: its path, recorded max_inflight and its last two batches;
/// None if the walk reads no batch in it.
#[allow(clippy::type_complexity)]
fn last_batches(
    dir: &std::path::Path,
) -> Option<(std::path::PathBuf, u32, Vec<(u64, BatchHeader)>)> {
    let mut segs: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some((parse_segment_name(e.file_name().to_str()?)?, e.path()))
        })
        .collect();
    segs.sort();
    for (no, path) in segs.into_iter().rev() {
        let bytes = std::fs::read(&path).unwrap();
        let Ok((sh, _)) = format::decode_segment_header_any(&bytes, no) else {
            continue;
        };
        let mut pos = format::BLOCK_SIZE;
        let mut last: Vec<(u64, BatchHeader)> = Vec::new();
        while pos + format::BATCH_HEADER_LEN <= bytes.len() {
            match format::decode_batch_header(&bytes[pos..], no) {
                Ok(h) => {
                    last.push((pos as u64, h));
                    if last.len() > 2 {
                        last.remove(0);
                    }
                    pos += h.disk_len() as usize;
                }
                Err(_) => break,
            }
        }
        // The newest activated segment is the log's tail even without a batch the
        // walk can read (a SIGKILL during its activation write can leave the header
        // without its batch): tearing a batch of an older segment would emulate a
        // tear of a write that completed before this segment's activation began,
        // which no crash can produce (recovery rightly refuses that as corruption).
        return (!last.is_empty()).then_some((path, sh.max_inflight, last));
    }
    None
}
