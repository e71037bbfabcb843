//! `ferryctl drill`: an automated disaster-recovery drill on a standby. It exports a
//! writable point-in-time view (replication goes on; writes land in a scratch overlay),
//! checks it — by default: attach it, find the filesystem, mount it read-only, fsck it
//! without changes; or the operator's command, e.g. an application's own consistency
//! check, with the view's NBD URI in its environment — measures the recovery time
//! (start to usable view) and the point's age (the RPO the drill proves), tears it
//! all down, records the result in the node's audit log and writes a report.
//!
//! The daemon is reached through a `call` function, so the orchestration here is the
//! same whatever carries the requests.
mod attach;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_api::control::{DrillReport, PointSpec, Request};
use ferry_api::timefmt::{format_rfc3339, parse_rfc3339};

use attach::Attachment;
use report::{Check, PointInfo, Report, Step, REPORT_FORMAT};

/// Which recovery point to drill.
pub enum Point {
    /// The newest point the standby holds: the RPO it proves is the current one.
    Latest,
    Bookmark(String),
    At(String),
}

pub struct Options {
    pub volume: String,
    pub point: Point,
    /// The operator's check (`sh -c`); `None`: the filesystem check.
    pub check: Option<String>,
    pub check_timeout: Duration,
}

/// Sends one control request to the node, returns its result.
pub type Call<'a> = &'a dyn Fn(&Request) -> anyhow::Result<serde_json::Value>;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The steps as they happen, timed from the drill's start.
struct Timeline {
    t0: Instant,
    steps: Vec<Step>,
}

impl Timeline {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Runs one step; `f` returns its value and a detail line for the report.
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<(T, String)>,
    ) -> anyhow::Result<T> {
        let start = self.now();
        let r = f();
        let (ok, detail) = match &r {
            Ok((_, d)) => (true, d.clone()),
            Err(e) => (false, format!("{e:#}")),
        };
        self.steps.push(Step {
            name: name.to_string(),
            start_seconds: start,
            seconds: self.now() - start,
            ok,
            detail,
        });
        r.map(|(v, _)| v)
    }
}

/// An exported view.
struct View {
    id: u64,
    uri: String,
    point: PointInfo,
    time_ns: u64,
}

/// What the drill learnt while it ran; the report is made from it at the end.
struct Drill {
    tl: Timeline,
    view: Option<View>,
    usable_at: Option<f64>,
    check: Check,
}

/// Runs the drill on the node behind `call` (named `node` in the report), always
/// tearing down what it set up. The report says whether it passed and why not.
pub fn run(call: Call, node: &str, opts: &Options) -> Report {
    let started_ns = now_ns();
    let mut d = Drill {
        tl: Timeline {
            t0: Instant::now(),
            steps: Vec::new(),
        },
        view: None,
        usable_at: None,
        check: Check::default(),
    };
    let work = work_dir();
    let result = match &work {
        Ok(dir) => drive(&mut d, call, opts, dir),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    if let Some(v) = &d.view {
        let id = v.id;
        let _ = d.tl.step("unexport view", || {
            call(&Request::PitUnexport {
                id: Some(id),
                all: false,
            })?;
            Ok(((), format!("view {id} closed, overlay dropped")))
        });
    }
    if let Ok(dir) = &work {
        remove_work_dir(dir);
    }
    let mut report = make_report(&d, node, opts, started_ns, result.err());
    let record = DrillReport {
        volume: report.volume.clone(),
        seq: report.point.as_ref().map_or(0, |p| p.seq),
        point_time: report
            .point
            .as_ref()
            .map_or_else(String::new, |p| p.time.clone()),
        passed: report.passed,
        rto_ms: report.rto_seconds.map_or(0, |s| (s * 1000.0) as u64),
        rpo_ms: report.rpo_seconds.map_or(0, |s| (s * 1000.0) as u64),
        check: report.check.kind.clone(),
        summary: report.summary(),
    };
    match call(&Request::DrillReport(record)) {
        Ok(_) => report.audited = true,
        Err(e) => {
            // A drill nobody can later prove happened has not done its job.
            report.passed = false;
            report.error = Some(format!("recording the drill in the audit log: {e:#}"));
        }
    }
    report.finished = format_rfc3339(now_ns());
    report
}

/// The drill's steps up to a verdict; an error ends it (teardown is the caller's).
fn drive(d: &mut Drill, call: Call, opts: &Options, work: &Path) -> anyhow::Result<()> {
    if opts.check.is_none() {
        need_root_for_filesystem_check()?;
    }
    let spec =
        d.tl.step("choose the point", || choose(call, &opts.point))?;
    let view = d.tl.step("export a writable view", || {
        let v = export(call, &opts.volume, spec)?;
        let detail = format!("view {} at seq {}: {}", v.id, v.point.seq, v.uri);
        Ok((v, detail))
    })?;
    let uri = view.uri.clone();
    let point = view.point.clone();
    d.view = Some(view);
    match &opts.check {
        None => filesystem_check(d, &uri, work),
        Some(cmd) => command_check(d, cmd, &uri, &opts.volume, &point, opts.check_timeout, work),
    }
}

fn need_root_for_filesystem_check() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the filesystem check attaches a loop device and mounts it: run as root, or give --check CMD");
    }
    Ok(())
}

/// The request's point: `latest` is the standby's newest retained point.
fn choose(call: Call, point: &Point) -> anyhow::Result<(PointSpec, String)> {
    Ok(match point {
        Point::Bookmark(b) => (PointSpec::Bookmark(b.clone()), format!("bookmark {b}")),
        Point::At(t) => (
            PointSpec::At(t.clone()),
            format!("newest point at or before {t}"),
        ),
        Point::Latest => {
            let pits = call(&Request::ListPits { limit: Some(1) })?;
            let seq = pits["newest"]["seq"]
                .as_u64()
                .context("the standby holds no recovery point yet")?;
            (PointSpec::Seq(seq), format!("newest point, seq {seq}"))
        }
    })
}

fn export(call: Call, volume: &str, target: PointSpec) -> anyhow::Result<View> {
    let v = call(&Request::PitExport {
        volume: volume.to_string(),
        target,
        listen: "127.0.0.1:0".to_string(),
        writable: true,
    })?;
    let field = |k: &str| v[k].clone();
    let id = field("id")
        .as_u64()
        .context("pit_export answered without an id")?;
    let uri = field("uri")
        .as_str()
        .context("pit_export answered without a uri")?
        .to_string();
    let seq = field("seq")
        .as_u64()
        .context("pit_export answered without a seq")?;
    let time = field("time").as_str().unwrap_or("").to_string();
    let time_ns =
        parse_rfc3339(&time).map_err(|e| anyhow::anyhow!("the view's point time '{time}': {e}"))?;
    Ok(View {
        id,
        uri,
        point: PointInfo { seq, time },
        time_ns,
    })
}

fn filesystem_check(d: &mut Drill, uri: &str, work: &Path) -> anyhow::Result<()> {
    d.check.kind = "filesystem".into();
    let mut att = d.tl.step("attach (nbdfuse + loop device)", || {
        let a = Attachment::new(uri, work)?;
        let dev = a.dev().to_string();
        Ok((a, dev))
    })?;
    let fs = d.tl.step("detect the filesystem", || {
        let fs = att.detect()?;
        Ok((fs.clone(), fs))
    })?;
    d.check.filesystem = Some(fs.clone());
    let mnt = work.join("mnt");
    d.tl.step("mount read-only", || {
        let n = att.mount_ro(&fs, &mnt)?;
        Ok(((), format!("{n} entries at the root")))
    })?;
    d.usable_at = Some(d.tl.now());
    d.tl.step("unmount", || att.unmount().map(|()| ((), String::new())))?;
    let (passed, command, output) = d.tl.step("fsck, changing nothing", || {
        let r = att.fsck(&fs)?;
        let detail = if r.0 { "clean" } else { "problems found" }.to_string();
        Ok((r, detail))
    })?;
    d.check.command = command;
    d.check.passed = passed;
    d.check.output = output;
    d.tl.step("detach", || {
        drop(att);
        Ok(((), String::new()))
    })
}

fn command_check(
    d: &mut Drill,
    cmd: &str,
    uri: &str,
    volume: &str,
    point: &PointInfo,
    timeout: Duration,
    work: &Path,
) -> anyhow::Result<()> {
    d.check.kind = "command".into();
    d.check.command = cmd.to_string();
    // The view answers NBD as soon as it is exported: usable for the operator's check.
    d.usable_at = Some(d.tl.now());
    let env = [
        ("FERRY_DRILL_URI", uri.to_string()),
        ("FERRY_DRILL_VOLUME", volume.to_string()),
        ("FERRY_DRILL_SEQ", point.seq.to_string()),
        ("FERRY_DRILL_POINT_TIME", point.time.clone()),
    ];
    let (passed, output) = d.tl.step("run the check command", || {
        let r = attach::run_command(cmd, &env, work, timeout)?;
        let detail = if r.0 { "succeeded" } else { "failed" }.to_string();
        Ok((r, detail))
    })?;
    d.check.passed = passed;
    d.check.output = output;
    Ok(())
}

fn make_report(
    d: &Drill,
    node: &str,
    opts: &Options,
    started_ns: u64,
    error: Option<anyhow::Error>,
) -> Report {
    let chosen = match &opts.point {
        Point::Latest => "latest".to_string(),
        Point::Bookmark(b) => format!("bookmark {b}"),
        Point::At(t) => format!("at {t}"),
    };
    let error = error.map(|e| format!("{e:#}"));
    Report {
        format: REPORT_FORMAT,
        node: node.to_string(),
        volume: opts.volume.clone(),
        started: format_rfc3339(started_ns),
        finished: String::new(),
        chosen,
        point: d.view.as_ref().map(|v| v.point.clone()),
        rto_seconds: d.usable_at,
        rpo_seconds: d
            .view
            .as_ref()
            .map(|v| started_ns.saturating_sub(v.time_ns) as f64 / 1e9),
        check: d.check.clone(),
        passed: error.is_none() && d.check.passed,
        audited: false,
        error,
        timeline: d.tl.steps.clone(),
    }
}

fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferry-drill-{}-{}", std::process::id(), now_ns()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes only what the drill made: never a recursive delete through a mount point
/// a failed unmount may have left behind.
fn remove_work_dir(dir: &Path) {
    for f in ["nbdfuse.log", "check.out"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    for d in ["mnt", "fuse"] {
        let _ = std::fs::remove_dir(dir.join(d));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Writes the JSON report to `path` and the HTML page next to it; returns the page's path.
pub fn write(report: &Report, path: &Path) -> anyhow::Result<PathBuf> {
    let html_path = path.with_extension("html");
    if html_path == path {
        bail!(
            "--report {}: give the JSON file's name (the HTML page goes next to it as .html)",
            path.display()
        );
    }
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(&html_path, report::html(report))
        .with_context(|| format!("writing {}", html_path.display()))?;
    Ok(html_path)
}
