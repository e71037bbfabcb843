//! `ferryctl status --json` keeps its shape: the key paths and value types of a live
//! primary's and a live async standby's status equal those of the captures in
//! `tests/fixtures/` (taken from the hand-built JSON the daemon served before its
//! status became typed). Values (ports, paths, positions) are not compared.
//!
//! `FERRY_CAPTURE_STATUS_FIXTURES=1` rewrites the captures from the live nodes (after
//! an intended change of the status JSON), then compares as usual.
mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

/// Every key path of `v` (arrays as `[]`, their elements merged) with the JSON type
/// of its value (`int` and `float` apart, `null` a type of its own).
fn shape(v: &serde_json::Value) -> BTreeMap<String, &'static str> {
    fn walk(v: &serde_json::Value, path: String, out: &mut BTreeMap<String, &'static str>) {
        use serde_json::Value as V;
        let kind = match v {
            V::Null => "null",
            V::Bool(_) => "bool",
            V::Number(n) if n.is_f64() => "float",
            V::Number(_) => "int",
            V::String(_) => "string",
            V::Array(_) => "array",
            V::Object(_) => "object",
        };
        match v {
            V::Object(m) => m
                .iter()
                .for_each(|(k, x)| walk(x, format!("{path}/{k}"), out)),
            V::Array(a) => a.iter().for_each(|x| walk(x, format!("{path}/[]"), out)),
            _ => {}
        }
        out.insert(if path.is_empty() { "/".into() } else { path }, kind);
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out);
    out
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Compares the shape of `live` with the fixture `name` (rewriting it first when
/// capturing), naming every path that differs.
fn same_shape(name: &str, live: &serde_json::Value) {
    let path = fixture(name);
    if std::env::var_os("FERRY_CAPTURE_STATUS_FIXTURES").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(live).unwrap() + "\n").unwrap();
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (want, got) = (shape(&want), shape(live));
    let diff: Vec<String> = want
        .iter()
        .filter(|(k, t)| got.get(*k) != Some(t))
        .map(|(k, t)| format!("{k}: fixture {t}, live {:?}", got.get(k)))
        .chain(
            got.iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .map(|(k, t)| format!("{k}: not in the fixture, live {t}")),
        )
        .collect();
    assert!(
        diff.is_empty(),
        "status shape differs from {}:\n{}\nlive: {live:#}",
        path.display(),
        diff.join("\n")
    );
}

#[test]
fn status_json_of_a_primary_and_an_async_standby_keeps_its_shape() {
    let name = "status_json_of_a_primary_and_an_async_standby_keeps_its_shape";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(dir.path(), &Init::default());
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    // Writes make recovery points on the standby (its window is not empty).
    let cmds: Vec<String> = (0..4)
        .map(|i| format!("write -P {} {} 65536", i + 1, i << 20))
        .collect();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &cmds));
    wait_caught_up(&primary, &standby);
    primary.wait_status("a heartbeat round trip", Duration::from_secs(15), |st| {
        st["targets"][0]["rtt_us"].as_u64().unwrap_or(0) > 0
    });
    standby.wait_status(
        "the standby to be connected and hold recovery points",
        Duration::from_secs(15),
        |st| st["primary"]["connected"].is_string() && st["pit"]["newest"].is_object(),
    );
    same_shape("status-primary.json", &ctl_json(&pcfg, &["status"]));
    same_shape("status-standby.json", &ctl_json(&scfg, &["status"]));
}
