//! The audit log chain verifier (`ferry_api::audit`). Raw bytes: `verify_bytes`
//! answers with a report or the first bad line, never panics, and a report counts
//! every line. Built logs: lines sealed with `seal` from fuzzed entries must verify,
//! with the last line's hash in the report, and any one-byte change to such a log
//! must not verify with the same report; text spliced into one must not panic it.
#![no_main]

use arbitrary::Arbitrary;
use ferry_api::audit::{self, AuditEntry, Outcome, GENESIS};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Input {
    Raw(Vec<u8>),
    Built {
        entries: Vec<(String, Option<String>, u8)>,
        start_ns: u64,
        flip: Option<(u16, u8)>,
        /// Text spliced into the sealed log (forged members, multi-byte text…).
        splice: Option<(u16, String)>,
    },
}

fuzz_target!(|input: Input| match input {
    Input::Raw(data) => raw(&data),
    Input::Built {
        entries,
        start_ns,
        flip,
        splice,
    } => built(&entries, start_ns, flip, splice),
});

fn raw(data: &[u8]) {
    for line in data.split(|&b| b == b'\n').take(4) {
        let _ = audit::parse_line(1, line);
    }
    if let Ok(report) = audit::verify_bytes(data) {
        let lines = data.iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(report.entries, lines, "report does not count every line");
    }
}

fn built(
    entries: &[(String, Option<String>, u8)],
    start_ns: u64,
    flip: Option<(u16, u8)>,
    splice: Option<(u16, String)>,
) {
    let mut log = Vec::new();
    let mut prev = GENESIS.to_string();
    let mut last_hash = GENESIS.to_string();
    for (i, (request, message, result)) in entries.iter().take(16).enumerate() {
        let entry = AuditEntry {
            uid: Some(1000),
            gid: None,
            pid: Some(i as i32),
            role: None,
            request: request.clone(),
            args: serde_json::Value::String(request.clone()),
            result: [Outcome::Ok, Outcome::Denied, Outcome::Error][usize::from(*result) % 3],
            message: message.clone(),
        };
        let ns = start_ns.saturating_add(i as u64);
        let sealed = audit::seal(i as u64 + 1, ns, &prev, &entry).expect("seal");
        let (chain, ok) =
            audit::parse_line(i as u64 + 1, sealed.line.as_bytes()).expect("sealed line parses");
        assert!(ok, "sealed line fails its own hash");
        last_hash = chain.hash;
        log.extend_from_slice(sealed.line.as_bytes());
        log.push(b'\n');
        prev = sealed.full_hash;
    }
    let report = audit::verify_bytes(&log).expect("a sealed log verifies");
    assert_eq!(report.entries, entries.len().min(16) as u64);
    assert_eq!(report.last_hash, last_hash);
    if let Some((at, xor)) = flip.filter(|&(_, x)| x != 0 && !log.is_empty()) {
        let at = usize::from(at) % log.len();
        log[at] ^= xor;
        if let Ok(r) = audit::verify_bytes(&log) {
            assert_ne!(r, report, "a changed log verified as the original");
        }
    }
    if let Some((at, text)) = splice.filter(|(_, t)| !t.is_empty()) {
        let mut forged = log.clone();
        let at = usize::from(at) % (forged.len() + 1);
        forged.splice(at..at, text.bytes());
        let _ = audit::verify_bytes(&forged);
    }
}
