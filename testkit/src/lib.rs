//! Test-only helpers shared by every ferry crate (a dev-dependency, never in a build).
//!
//! **Skips are visible and accounted.** A test that cannot run here (a tool is missing,
//! the kernel refuses io_uring, no root) calls [`skip`]. The line goes straight to the
//! process's stderr, not through `eprintln!`, which the test harness captures and
//! throws away for passing tests: so a skipped test never reads as a silent `ok`, and
//! `.ci/run` counts the `SKIP ` lines in its closing summary. Under CI (`CI` set and not
//! `false`/`0`) every tool is installed by `.ci/run`, so a skip there is a failure: the
//! test panics with the reason instead.
//!
//! [`udp_proxy`] is the lossy, pausable UDP link put between replication peers by
//! ferryctl's tests and the `ferry-torture` harness.
#![forbid(unsafe_code)]

pub mod udp_proxy;

use std::io::Write;
use std::process::{Command, Stdio};

/// Is this run under CI (`CI=true`, as `.ci/run` is started)?
pub fn in_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty() && v != "false" && v != "0")
}

/// Reports that `test` is skipped for `why`: a loud line on the real stderr, or a panic
/// under CI. Returns `true` so callers can write `if …{ return skip(…) }`-style code.
pub fn skip(test: &str, why: &str) -> bool {
    match verdict(in_ci(), test, why) {
        Ok(line) => {
            // Straight to fd 2: the harness captures only the print macros.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            true
        }
        Err(failure) => panic!("{failure}"),
    }
}

/// The skip line to print, or under CI the failure to raise instead.
fn verdict(ci: bool, test: &str, why: &str) -> Result<String, String> {
    if ci {
        Err(format!(
            "{test} would be skipped under CI, where .ci/run installs everything: {why}"
        ))
    } else {
        Ok(format!("\nSKIP {test}: {why}\n"))
    }
}

/// Is `tool` on PATH?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Skips `test` (see [`skip`]) when `tool` is missing; returns true when it skipped.
pub fn skip_without(tool: &str, test: &str) -> bool {
    !have(tool)
        && skip(
            test,
            &format!("`{tool}` is not installed (.ci/run installs it)"),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_tools_do_not_skip() {
        assert!(have("sh"));
        assert!(!skip_without("sh", "present_tools_do_not_skip"));
    }

    #[test]
    fn a_skip_is_a_loud_line_or_a_failure_under_ci() {
        assert!(!have("ferry-no-such-tool-anywhere"));
        assert_eq!(
            verdict(false, "t", "`x` is missing"),
            Ok("\nSKIP t: `x` is missing\n".to_string())
        );
        let e = verdict(true, "t", "`x` is missing").unwrap_err();
        assert!(e.contains("t would be skipped under CI") && e.contains("`x` is missing"));
    }
}
