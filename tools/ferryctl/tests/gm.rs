//! A gm cluster end to end: `ferryctl init --crypto gm` issues an SM2 cluster CA and
//! SM2 node certificates, real ferryd processes replicate over QUIC with RFC 8998's
//! TLS_SM4_GCM_SM3, and the replica ends byte-identical; a standard node where a gm
//! one is expected is refused with an error that says the suites differ; a node whose
//! `[tls] suite` disagrees with its CA does not start.
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

#[test]
fn tls_suite_must_match_the_cluster_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_, scfg) = init(dir.path(), "gm");
    let text = std::fs::read_to_string(&scfg).unwrap();
    assert!(text.contains("suite = \"gm\""), "{text}");
    // The same node told it is a standard one: ferryd refuses to start.
    std::fs::write(&scfg, text.replace("suite = \"gm\"\n", "")).unwrap();
    let out = std::process::Command::new(ferryd())
        .arg("--config")
        .arg(&scfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[tls] suite = \"standard\" but the cluster CA")
            && err.contains("is SM2 (ferryctl init --crypto gm)"),
        "unclear error: {err}"
    );
}

#[test]
fn node_add_issues_an_sm2_certificate_in_a_gm_cluster() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), "gm");
    let spec = format!("dr2=127.0.0.1:{}", ferryd::testkit::free_udp_port());
    let out = std::process::Command::new(ferryctl())
        .args(["node", "add", &spec, "--dir"])
        .arg(dir.path())
        .arg("--same-host")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(suite_of(dir.path(), "dr2"), TlsSuite::Gm);
    let text = std::fs::read_to_string(dir.path().join("dr2.toml")).unwrap();
    assert!(text.contains("suite = \"gm\""), "{text}");
    let pem = std::fs::read_to_string(dir.path().join("dr2/tls/dr2.pem")).unwrap();
    let names = pki::cert_names(&pki::parse_cert_pem(&pem).unwrap()[0]).unwrap();
    assert_eq!(names.node_names, vec!["dr2".to_string()]);
}
