//! The drill's report: what an auditor asks for when the standard says users evaluate
//! their DR capability periodically. JSON (for tools and archives) and a
//! self-contained HTML page (no scripts, no external files: it opens years later from
//! an archive). Pure: no IO, no clock.
use serde::Serialize;

/// Version of the JSON layout below; bumped on any incompatible change.
pub const REPORT_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format: u32,
    /// The standby the drill ran on.
    pub node: String,
    pub volume: String,
    /// RFC 3339 times of the drill's start and end.
    pub started: String,
    pub finished: String,
    /// How the point was chosen: `latest`, `bookmark NAME`, `at TIME`.
    pub chosen: String,
    /// The exported point, once known.
    pub point: Option<PointInfo>,
    /// From the start of the drill to a usable view (seconds); none if never usable.
    pub rto_seconds: Option<f64>,
    /// The point's age when the drill started (seconds): the data loss this point
    /// would mean if the primary were lost now.
    pub rpo_seconds: Option<f64>,
    pub check: Check,
    pub passed: bool,
    /// Whether the result reached the node's audit log.
    pub audited: bool,
    /// Why the drill failed, when it did for a reason other than the check's verdict.
    pub error: Option<String>,
    pub timeline: Vec<Step>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointInfo {
    pub seq: u64,
    pub time: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    /// `filesystem` (ferryctl's own) or `command` (the operator's).
    pub kind: String,
    /// What ran: the operator's command, or the fsck command line.
    pub command: String,
    pub filesystem: Option<String>,
    pub passed: bool,
    /// The end of its output (bounded).
    pub output: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    /// Seconds from the drill's start.
    pub start_seconds: f64,
    pub seconds: f64,
    pub ok: bool,
    pub detail: String,
}

impl Report {
    /// One line for the audit log and the terminal.
    pub fn summary(&self) -> String {
        let at = match &self.point {
            Some(p) => format!("{} at seq {} ({})", self.volume, p.seq, p.time),
            None => self.volume.clone(),
        };
        let line = if let Some(e) = &self.error {
            format!("FAILED on {at}: {e}")
        } else if self.check.passed {
            format!("passed on {at}: {}", self.check_verdict())
        } else {
            format!("FAILED on {at}: {}", self.check_verdict())
        };
        one_line(&line, ferry_api::control::MAX_DRILL_SUMMARY)
    }

    fn check_verdict(&self) -> String {
        let last = self
            .check
            .output
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty());
        match (self.check.kind.as_str(), &self.check.filesystem) {
            ("filesystem", Some(fs)) if self.check.passed => {
                format!("{fs} mounted read-only, fsck clean")
            }
            ("filesystem", Some(fs)) => format!("{fs}: fsck found problems"),
            _ if self.check.passed => "the check command succeeded".to_string(),
            _ => format!(
                "the check command failed{}",
                last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            ),
        }
    }
}

/// `s` on one line, cut to at most `max` bytes at a character boundary.
fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s.replace(['\n', '\r'], " ");
    if out.len() > max {
        let mut end = max.saturating_sub(3);
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn secs(s: Option<f64>) -> String {
    match s {
        Some(s) if s < 120.0 => format!("{s:.2} s"),
        Some(s) => format!("{:.1} min", s / 60.0),
        None => "not reached".to_string(),
    }
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d2430}\
h1{font-size:1.6rem;margin-bottom:.2rem}.badge{display:inline-block;padding:.15rem .6rem;border-radius:.3rem;color:#fff;font-weight:600}\
.pass{background:#1f8a4c}.fail{background:#c0392b}.sub{color:#5a6472;margin-top:0}\
.kpi{display:flex;gap:1rem;margin:1.2rem 0}.kpi div{flex:1;border:1px solid #d8dde4;border-radius:.4rem;padding:.7rem 1rem}\
.kpi b{display:block;font-size:1.5rem}.kpi span{color:#5a6472;font-size:.85rem}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e6e9ee;vertical-align:top}\
th{width:11rem;color:#5a6472;font-weight:500}.tl td{font-size:.9rem}.bar{position:relative;height:.9rem;background:#f1f3f6;border-radius:.2rem}\
.bar i{position:absolute;top:0;bottom:0;background:#3b7dd8;border-radius:.2rem;min-width:2px}.bar i.bad{background:#c0392b}\
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8rem;overflow-x:auto;font-size:.82rem;white-space:pre-wrap}\
footer{margin-top:2rem;color:#8a93a0;font-size:.8rem}";

/// The report as one HTML page with inline CSS.
pub fn html(r: &Report) -> String {
    let (badge, class) = if r.passed {
        ("PASSED", "pass")
    } else {
        ("FAILED", "fail")
    };
    let mut out = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>ferry DR drill: {vol} {badge}</title><style>{STYLE}</style></head><body>\n\
         <h1>DR drill on {node} <span class=\"badge {class}\">{badge}</span></h1>\n\
         <p class=\"sub\">{summary}</p>\n",
        vol = esc(&r.volume),
        node = esc(&r.node),
        summary = esc(&r.summary()),
    );
    out += &format!(
        "<div class=\"kpi\"><div><span>Recovery time (RTO): start to usable view</span><b>{}</b></div>\
         <div><span>Recovery point (RPO): age of the point</span><b>{}</b></div>\
         <div><span>Check</span><b>{}</b></div></div>\n",
        secs(r.rto_seconds),
        secs(r.rpo_seconds),
        if r.check.passed { "passed" } else { "failed" }
    );
    out += &facts(r);
    out += &timeline(r);
    out += &format!(
        "<h2>Check output</h2>\n<pre>{}</pre>\n",
        esc(if r.check.output.is_empty() {
            "(no output)"
        } else {
            &r.check.output
        })
    );
    out += &format!(
        "<footer>ferryctl drill, report format {}. The JSON report written next to this page holds the same data.</footer>\n</body></html>\n",
        r.format
    );
    out
}

fn facts(r: &Report) -> String {
    let point = match &r.point {
        Some(p) => format!("sequence {} at {}", p.seq, p.time),
        None => "none (no view was exported)".to_string(),
    };
    let mut rows = vec![
        ("Node", r.node.clone()),
        ("Volume", r.volume.clone()),
        ("Point chosen", r.chosen.clone()),
        ("Point", point),
        ("Started", r.started.clone()),
        ("Finished", r.finished.clone()),
        ("Check", format!("{}: {}", r.check.kind, r.check.command)),
    ];
    if let Some(fs) = &r.check.filesystem {
        rows.push(("Filesystem", fs.clone()));
    }
    rows.push((
        "Audit log",
        if r.audited {
            "recorded"
        } else {
            "NOT recorded"
        }
        .to_string(),
    ));
    if let Some(e) = &r.error {
        rows.push(("Error", e.clone()));
    }
    let mut out = String::from("<h2>Drill</h2>\n<table>\n");
    for (k, v) in rows {
        out += &format!("<tr><th>{}</th><td>{}</td></tr>\n", esc(k), esc(&v));
    }
    out + "</table>\n"
}

fn timeline(r: &Report) -> String {
    let total = r
        .timeline
        .iter()
        .map(|s| s.start_seconds + s.seconds)
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let mut out = String::from(
        "<h2>Timeline</h2>\n<table class=\"tl\"><tr><th>Step</th><th>Start</th><th>Took</th><th style=\"width:40%\"></th><th>Detail</th></tr>\n",
    );
    for s in &r.timeline {
        let left = 100.0 * s.start_seconds / total;
        let width = 100.0 * s.seconds / total;
        out += &format!(
            "<tr><td>{}</td><td>{:.2} s</td><td>{:.2} s</td><td><div class=\"bar\"><i class=\"{}\" style=\"left:{left:.2}%;width:{width:.2}%\"></i></div></td><td>{}</td></tr>\n",
            esc(&s.name),
            s.start_seconds,
            s.seconds,
            if s.ok { "" } else { "bad" },
            esc(&s.detail)
        );
    }
    out + "</table>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(passed: bool) -> Report {
        Report {
            format: REPORT_FORMAT,
            node: "dr1".into(),
            volume: "vol0".into(),
            started: "2026-12-07T00:00:00.000Z".into(),
            finished: "2026-12-07T00:00:04.000Z".into(),
            chosen: "bookmark <nightly>".into(),
            point: Some(PointInfo {
                seq: 42,
                time: "2026-12-06T23:59:00.000Z".into(),
            }),
            rto_seconds: Some(1.5),
            rpo_seconds: Some(60.0),
            check: Check {
                kind: "filesystem".into(),
                command: "e2fsck -f -n /dev/loop0".into(),
                filesystem: Some("ext4".into()),
                passed,
                output: "clean & <fine>\n".into(),
            },
            passed,
            audited: true,
            error: None,
            timeline: vec![
                Step {
                    name: "export view".into(),
                    start_seconds: 0.0,
                    seconds: 0.5,
                    ok: true,
                    detail: "nbd://127.0.0.1:1/vol0".into(),
                },
                Step {
                    name: "fsck -n".into(),
                    start_seconds: 1.0,
                    seconds: 1.0,
                    ok: passed,
                    detail: String::new(),
                },
            ],
        }
    }

    #[test]
    fn the_summary_names_point_and_verdict_on_one_bounded_line() {
        let r = report(true);
        assert_eq!(
            r.summary(),
            "passed on vol0 at seq 42 (2026-12-06T23:59:00.000Z): ext4 mounted read-only, fsck clean"
        );
        let mut bad = report(false);
        bad.error = Some("mount: wrong fs type\nsecond line".repeat(100));
        let s = bad.summary();
        assert!(s.starts_with("FAILED on vol0"), "{s}");
        assert!(!s.contains('\n') && s.len() <= ferry_api::control::MAX_DRILL_SUMMARY);
    }

    #[test]
    fn the_html_page_is_self_contained_and_escapes_what_it_shows() {
        let page = html(&report(true));
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("PASSED") && page.contains("1.50 s") && page.contains("60.00 s"));
        assert!(page.contains("clean &amp; &lt;fine&gt;"), "{page}");
        assert!(page.contains("bookmark &lt;nightly&gt;"), "{page}");
        // Nothing fetched from elsewhere: no scripts, links or remote images.
        for banned in ["<script", "<link", "src=", "http://", "https://"] {
            assert!(!page.contains(banned), "{banned} in the page");
        }
        // The second step starts halfway through the drill's two seconds.
        assert!(page.contains("left:50.00%;width:50.00%"), "{page}");
        let failed = html(&report(false));
        assert!(failed.contains("FAILED") && failed.contains("class=\"bad\""));
    }

    #[test]
    fn the_json_report_carries_its_format_version() {
        let v = serde_json::to_value(report(true)).unwrap();
        assert_eq!(v["format"], REPORT_FORMAT);
        assert_eq!(v["point"]["seq"], 42);
        assert_eq!(v["rto_seconds"], 1.5);
        assert_eq!(v["timeline"][1]["name"], "fsck -n");
    }
}
