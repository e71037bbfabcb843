//! A gm cluster end to end: `ferryctl init --crypto gm` issues an SM2 cluster CA and
//! SM2 node certificates, real ferryd processes replicate over QUIC with RFC 8998's
//! TLS_SM4_GCM_SM3, and the replica ends byte-identical; a standard node where a gm
//! one is expected is refused with an error that says the suites differ.
mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

use ferry_transport::pki::{self, TlsSuite};
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

const VOL: u64 = 64 << 20;

fn init(dir: &Path, crypto: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    init_pair(
        dir,
        &Init {
            crypto,
            ..Init::default()
        },
    )
}

/// The suite the node certificates in `dir/<node>/tls` speak.
fn suite_of(dir: &Path, node: &str) -> TlsSuite {
    let pem = std::fs::read_to_string(dir.join(node).join("tls/ca.pem")).unwrap();
    pki::ca_suite(&pki::parse_cert_pem(&pem).unwrap()[0]).unwrap()
}

#[test]
fn gm_replica_becomes_byte_identical() {
    if skip_without("qemu-io", "gm_replica_becomes_byte_identical") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "gm");
    assert_eq!(suite_of(dir.path(), "primary"), TlsSuite::Gm);
    assert_eq!(suite_of(dir.path(), "dr1"), TlsSuite::Gm);
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    for round in 0..2 {
        assert_qemu_io_ok(&qemu_io(
            &primary.url("vol0"),
            &mixed_workload(round, 300, VOL, None),
        ));
    }
    let last = wait_caught_up(&primary, &standby);
    assert!(
        last > 500,
        "expected the workload in the journal, last_seq {last}"
    );
    let st = primary.status();
    assert_eq!(st["targets"][0]["state"], "streaming", "{st:#}");
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

#[test]
fn standard_node_is_refused_by_a_gm_primary() {
    let gm = tempfile::tempdir().unwrap();
    let standard = tempfile::tempdir().unwrap();
    let (pcfg, _) = init(gm.path(), "gm");
    let (_, std_dr1) = init(standard.path(), "standard");
    assert_eq!(suite_of(standard.path(), "dr1"), TlsSuite::Standard);
    // A standard-suite dr1 listening where the gm cluster's dr1 is expected.
    let addr = repl_listen(&gm.path().join("dr1.toml"));
    let theirs = std::fs::read_to_string(&std_dr1).unwrap();
    std::fs::write(&std_dr1, theirs.replace(&repl_listen(&std_dr1), &addr)).unwrap();
    let impostor = Node::start(&ferryd(), &std_dr1);
    let primary = Node::start(&ferryd(), &pcfg);
    let st = primary.wait_status("a refusal", Duration::from_secs(30), |st| {
        st["targets"][0]["last_error"].is_string()
    });
    let err = st["targets"][0]["last_error"].as_str().unwrap();
    assert_ne!(st["targets"][0]["state"], "streaming");
    assert!(
        err.contains("TLS suites differ"),
        "refusal should say why: {err}"
    );
    let ist = impostor.wait_status(
        "the standard node to log the refusal",
        Duration::from_secs(30),
        |st| st["primary"]["last_error"].is_string(),
    );
    assert!(ist["primary"]["connected"].is_null());
    let theirs = ist["primary"]["last_error"].as_str().unwrap();
    assert!(
        theirs.contains("TLS suites differ"),
        "standby side: {theirs}"
    );
}
