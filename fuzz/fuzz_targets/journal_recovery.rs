//! Journal recovery on mutated directories. A real journal (std engine, several
//! segments of real batches) is built once per process into a template; each input
//! is a list of mutations (byte flips and writes, zeroed ranges, truncations,
//! growth, deleted segments) applied to a fresh copy, which is then opened. Open
//! must return a recovery report or an error, never panic; after a successful
//! recovery every record must read back, in sequence, with exactly the bytes that
//! were written (the reader re-checks every CRC on the way).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_fuzz::{
    apply, build_journal, copy_dir, journal_options, journal_record, Mutation, Scratch,
    JOURNAL_RECORDS,
};
use ferry_journal::Journal;
use libfuzzer_sys::fuzz_target;

fn template() -> &'static PathBuf {
    static T: OnceLock<(Scratch, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        ferry_fuzz::remove_stale_scratch();
        let s = Scratch::new("journal-template");
        let dir = s.0.join("j");
        build_journal(&dir).expect("build the template journal");
        (s, dir)
    })
    .1
}

fuzz_target!(|muts: Vec<Mutation>| {
    let scratch = Scratch::new("journal");
    let dir = scratch.0.join("j");
    copy_dir(template(), &dir).expect("copy the template");
    for m in muts.iter().take(16) {
        apply(&dir, m);
    }
    let Ok((j, report)) = Journal::open(journal_options(&dir)) else {
        return;
    };
    assert!(report.first_seq <= report.last_seq.max(report.first_seq));
    assert!(
        report.last_seq <= JOURNAL_RECORDS + 1,
        "recovered records never written: {report:?}"
    );
    let mut expect = report.first_seq.max(1);
    if report.last_seq > 0 {
        let reader = j.reader(0).expect("reader from the first record");
        for entry in reader {
            let e =
                entry.unwrap_or_else(|err| panic!("recovered journal does not read back: {err}"));
            assert_eq!(e.seq, expect, "sequence gap in a recovered journal");
            assert_eq!(
                e.record,
                journal_record(e.seq),
                "record {} differs from what was written",
                e.seq
            );
            expect += 1;
        }
        assert_eq!(
            expect,
            report.last_seq + 1,
            "reader stopped before the recovered end: {report:?}"
        );
    }
    j.close().expect("close");
});
