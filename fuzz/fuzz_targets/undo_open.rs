//! Undo log recovery on mutated segments: a real undo log (several small segments,
//! write-set and resync entries) is built once per process into a template; each
//! input mutates a copy, which is then opened. Open must recover or refuse, never
//! panic; after a successful open every indexed entry is read back (its body may
//! be refused as corrupt, it must not be misread), and the time index lookups and
//! `entries_after` iteration work on whatever was recovered.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_fuzz::{
    apply, build_undo, copy_dir, undo_entries, Mutation, Scratch, CLUSTER, UNDO_SEGMENT,
};
use ferry_journal::undo::{UndoError, UndoLog};
use libfuzzer_sys::fuzz_target;

fn template() -> &'static PathBuf {
    static T: OnceLock<(Scratch, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        ferry_fuzz::remove_stale_scratch();
        let s = Scratch::new("undo-template");
        let dir = s.0.join("u");
        build_undo(&dir).expect("build the template undo log");
        (s, dir)
    })
    .1
}

fuzz_target!(|input: (Vec<Mutation>, u64)| {
    let (muts, probe) = input;
    let scratch = Scratch::new("undo");
    let dir = scratch.0.join("u");
    copy_dir(template(), &dir).expect("copy the template");
    for m in muts.iter().take(16) {
        apply(&dir, m);
    }
    let Ok((log, _rec)) = UndoLog::open(&dir, CLUSTER, UNDO_SEGMENT) else {
        return;
    };
    let written = undo_entries();
    for p in log.points() {
        match log.read_entry(&p.position) {
            Ok(e) => {
                assert_eq!(
                    (e.first_seq, e.last_seq),
                    (p.first_seq, p.seq),
                    "entry differs from its index point"
                );
                assert!(
                    written.contains(&e),
                    "entry {}..={} was never written",
                    e.first_seq,
                    e.last_seq
                );
            }
            Err(UndoError::Corruption { .. }) => {}
            Err(err) => panic!("indexed entry refused with {err}"),
        }
    }
    let _ = log.find_by_seq(probe);
    let _ = log.find_by_time(probe);
    let _ = log.points_after(probe);
    let from = log
        .points()
        .first()
        .map_or(0, |p| p.first_seq.saturating_sub(1));
    for seq in [from, probe] {
        for e in log.entries_after(seq).take(64) {
            let _ = e;
        }
    }
});
