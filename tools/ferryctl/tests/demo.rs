//! The README's first command, `scripts/demo.sh`, as a new user runs it: twice in a row
//! on the same directory, then again after the switchover it suggests (the roles are
//! swapped: the script must find the new primary, not assume `primary.toml` is one).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use ferryd::testkit::{free_udp_port, skip_without, Node};

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("local addr").port()
}

struct Demo {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Demo {
    fn new(dir: &Path) -> Demo {
        let bin = ferryd().parent().expect("binary dir").to_path_buf();
        Demo {
            dir: dir.join("demo"),
            env: vec![
                ("FERRY_BIN", bin.display().to_string()),
                ("DEMO_ONESHOT", "1".into()),
                ("DEMO_DIR", dir.join("demo").display().to_string()),
                ("NBD", format!("127.0.0.1:{}", free_tcp_port())),
                ("PRIMARY_QUIC", format!("127.0.0.1:{}", free_udp_port())),
                ("STANDBY_QUIC", format!("127.0.0.1:{}", free_udp_port())),
                // Not the fixed default: other tests may run nodes at the same time.
                ("METRICS_PORT", "0".to_string()),
                ("VOLUME", "vol0:1GiB".into()),
            ],
        }
    }

    /// Runs the script to completion (bounded); returns its stdout and stderr together.
    fn run(&self) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo.sh");
        let out = Command::new("timeout")
            .arg("180")
            .arg("bash")
            .arg(&script)
            .envs(self.env.iter().map(|(k, v)| (k, v.as_str())))
            .output()
            .expect("run demo.sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "demo.sh failed ({}):\n{text}",
            out.status
        );
        assert!(
            text.contains("replica is byte-identical") && text.contains("ferryd stopped"),
            "{text}"
        );
        text
    }

    fn config(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.toml"))
    }
}

#[test]
fn the_demo_runs_twice_and_after_its_suggested_switchover() {
    let name = "the_demo_runs_twice_and_after_its_suggested_switchover";
    if skip_without("qemu-io", name) || skip_without("python3", name) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let demo = Demo::new(tmp.path());
    let first = demo.run();
    assert!(first.contains("primary (primary) serves"), "{first}");
    let second = demo.run();
    assert!(
        second.contains("reusing the cluster in"),
        "a rerun must say it reuses the directory:\n{second}"
    );

    // The switchover the demo suggests, then the daemons stop (by their own PIDs).
    {
        let mut standby = Node::start(&ferryd(), &demo.config("dr1"));
        let mut primary = Node::start(&ferryd(), &demo.config("primary"));
        primary.wait_status("target to stream", Duration::from_secs(60), |st| {
            st["targets"][0]["state"] == "streaming"
        });
        let sw = ctl_json(&demo.config("primary"), &["switchover"]);
        assert_eq!(sw["to"], "dr1", "{sw:#}");
        wait_for(
            &demo.config("primary"),
            "the old primary to run as dr1's standby",
            Duration::from_secs(60),
            |st| st["role"] == "standby",
        );
        wait_for(
            &demo.config("dr1"),
            "dr1 to run as the primary",
            Duration::from_secs(60),
            |st| st["role"] == "primary",
        );
        assert!(primary.terminate().success(), "{}", primary.log_text());
        assert!(standby.terminate().success(), "{}", standby.log_text());
    }

    let third = demo.run();
    assert!(
        third.contains("dr1 (primary) serves"),
        "after a switchover the demo writes through dr1:\n{third}"
    );
}
