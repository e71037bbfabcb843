//! One seed's run: build the cluster, start the workload, then `steps` times: let the
//! workload run, inject the next fault of the schedule, heal, and check — the primary
//! holds every promised generation, and once lag is 0 the replica equals the primary
//! byte for byte. Role changes are checked on the promoted node before it takes a
//! single new write. The first violation ends the seed (later ones would only echo it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::checker;
use crate::cluster::{Cluster, NAMES, SYNC_TIMEOUT_MS, VOLUME, VOLUME_BYTES};
use crate::daemon::{self, log_tail, seq, Bins};
use crate::faults::{Fault, Rng};
use crate::model::Model;
use crate::workload::Writer;

const BLOCKS: usize = (VOLUME_BYTES / crate::block::BLOCK as u64) as usize;
/// Bounded waits for the cluster to converge after a fault is healed.
const CONVERGE: Duration = Duration::from_secs(90);

pub struct Opts {
    pub steps: usize,
    pub writeback: bool,
    pub disk_faults: bool,
    pub keep: bool,
    /// Tolerate the known bugs (noted, not violations): restart a node that has not
    /// recovered by itself within [`SELF_HEAL`] after a disk-full fault; accept a
    /// role-change command whose answer was lost when the role did change.
    pub tolerate_known: bool,
}

/// What [`Run::diagnose_stuck`] says when a restart of the standby cured the cluster.
const RESTART_HELPS: &str = "restarting the standby makes replication resume";

/// How long a node gets to recover from ENOSPC by itself once space is back.
const SELF_HEAL: Duration = Duration::from_secs(20);

/// Everything counted over a run (all seeds).
#[derive(Default)]
pub struct Tally {
    pub faults: BTreeMap<&'static str, u64>,
    pub kills: u64,
    pub restarts: u64,
    pub role_changes: u64,
    pub writes: u64,
    pub acked: u64,
    pub refused: u64,
    pub broken: u64,
    pub flushes: u64,
    pub flushes_ok: u64,
    pub checks: u64,
    /// Sum over checks of the blocks holding a promised generation.
    pub promised_checked: u64,
    pub replica_compares: u64,
    /// Notable but allowed behaviour (a daemon exiting on ENOSPC, a refused command).
    pub notes: Vec<String>,
}

/// Why a seed stopped early.
pub enum Fail {
    /// ferry broke a promise (or could not recover): a finding.
    Violation(String),
    /// The harness itself failed.
    Harness(anyhow::Error),
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Fail {
        Fail::Harness(e)
    }
}

type Step<T = ()> = Result<T, Fail>;

fn violation<T>(what: impl Into<String>) -> Step<T> {
    Err(Fail::Violation(what.into()))
}

struct Run<'a> {
    c: Cluster,
    w: Writer,
    rng: Rng,
    tally: &'a mut Tally,
    opts: &'a Opts,
    seed: u64,
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Runs one seed. `Ok(None)`: clean; `Ok(Some(v))`: a violation (the directory with
/// the logs is kept and named in `v`).
pub fn run_seed(
    bins: &Bins,
    seed: u64,
    opts: &Opts,
    tally: &mut Tally,
) -> anyhow::Result<Option<String>> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ferry-torture-{seed}-"))
        .tempdir()?;
    let c = Cluster::create(bins, dir.path(), opts.disk_faults).context("create the cluster")?;
    let w = Writer::start(Model::new(seed, BLOCKS, !opts.writeback), VOLUME, seed);
    let mut r = Run {
        c,
        w,
        rng: Rng::new(seed),
        tally,
        opts,
        seed,
    };
    let res = r.all();
    r.count_writes();
    let keep = |d: tempfile::TempDir| -> PathBuf { d.keep() };
    match res {
        Ok(()) if opts.keep => {
            println!("  kept {}", keep(dir).display());
            Ok(None)
        }
        Ok(()) => Ok(None),
        Err(Fail::Violation(v)) => {
            // The volumes may live on loop filesystems that go with the cluster.
            for n in &r.c.nodes {
                let to = dir.path().join(format!("evidence-{}-{VOLUME}.img", n.name));
                let _ = std::fs::copy(&n.volume, to);
            }
            drop(r);
            let d = keep(dir);
            Ok(Some(format!(
                "{v}\n  logs and volumes kept in {}",
                d.display()
            )))
        }
        Err(Fail::Harness(e)) => {
            drop(r);
            let d = keep(dir);
            Err(e.context(format!("seed {seed} (directory kept: {})", d.display())))
        }
    }
}

impl Run<'_> {
    fn all(&mut self) -> Step {
        self.start_node(1)?;
        self.start_node(0)?;
        self.c.wait(0, "the target to stream", CONVERGE, |st| {
            st["targets"][0]["state"] == "streaming"
        })?;
        self.w.target(Some(self.c.primary_nbd(CONVERGE)?));
        for step in 0..self.opts.steps {
            sleep_ms(self.rng.range(300, 1500));
            let f = self.rng.fault(self.opts.disk_faults);
            println!(
                "  [seed {} step {step}] {}",
                self.seed,
                describe(f, &self.c)
            );
            *self.tally.faults.entry(f.kind()).or_default() += 1;
            self.inject(f)
                .map_err(|e| tag(e, &format!("seed {} step {step} ({})", self.seed, f.kind())))?;
            self.settle().map_err(|e| {
                tag(
                    e,
                    &format!(
                        "seed {} step {step}, checking after {}",
                        self.seed,
                        f.kind()
                    ),
                )
            })?;
        }
        Ok(())
    }

    fn count_writes(&mut self) {
        let c = &self.w.shared.counters;
        let t = &mut self.tally;
        t.writes += c.writes.load(Ordering::Relaxed);
        t.acked += c.acked.load(Ordering::Relaxed);
        t.refused += c.refused.load(Ordering::Relaxed);
        t.broken += c.broken.load(Ordering::Relaxed);
        t.flushes += c.flushes.load(Ordering::Relaxed);
        t.flushes_ok += c.flushes_ok.load(Ordering::Relaxed);
    }

    /// Starts node `i`; one that cannot start is a finding.
    fn start_node(&mut self, i: usize) -> Step {
        match self.c.start(i) {
            Ok(()) => Ok(()),
            Err(e) => violation(format!("{} cannot (re)start: {e:#}", NAMES[i])),
        }
    }

    fn kill(&mut self, i: usize) {
        self.c.kill(i);
        self.tally.kills += 1;
    }

    fn restart(&mut self, i: usize) -> Step {
        self.start_node(i)?;
        self.tally.restarts += 1;
        if i == self.c.primary {
            self.w.target(Some(self.c.primary_nbd(CONVERGE)?));
        }
        Ok(())
    }

    fn inject(&mut self, f: Fault) -> Step {
        let (p, s) = (self.c.primary, self.c.standby());
        match f {
            Fault::KillPrimary | Fault::KillStandby => {
                let i = if f == Fault::KillPrimary { p } else { s };
                self.kill(i);
                sleep_ms(self.rng.range(100, 2000));
                self.restart(i)?;
            }
            Fault::Partition => {
                self.c.links(|l| l.pause(true));
                sleep_ms(self.rng.range(500, 4000));
            }
            Fault::Flap => {
                for k in 0..self.rng.range(4, 12) {
                    self.c.links(|l| l.pause(k % 2 == 0));
                    sleep_ms(self.rng.range(50, 400));
                }
            }
            Fault::Lossy => {
                let (d, u, r) = (
                    self.rng.range(20, 300),
                    self.rng.range(0, 100),
                    self.rng.range(0, 200),
                );
                self.c.links(|l| l.set(d as u32, u as u32, r as u32));
                sleep_ms(self.rng.range(1000, 3000));
            }
            Fault::Delay => {
                let ms = self.rng.range(5, 150) as u32;
                self.c.links(|l| l.set_delay(ms));
                sleep_ms(self.rng.range(1000, 3000));
            }
            Fault::DiskFull(on_primary, area) => {
                self.disk_full(if on_primary { p } else { s }, area)?
            }
            Fault::Switchover => self.switchover()?,
            Fault::Failover => self.failover()?,
        }
        self.c.heal();
        Ok(())
    }

    fn disk_full(&mut self, i: usize, area: crate::cluster::Area) -> Step {
        let fs = self
            .c
            .fs(i, area)
            .ok_or_else(|| anyhow!("no {area:?} filesystem on {}", NAMES[i]))?;
        let taken = fs.fill()?;
        sleep_ms(self.rng.range(1000, 3000));
        fs.free()?;
        println!(
            "    filled {taken} bytes of {}'s {area:?} filesystem, then freed them",
            NAMES[i]
        );
        // A failed base write or replica apply is a documented fail-stop that `settle`
        // restarts; only a node stuck some other way is the known bug.
        let st = daemon::status(&self.c.nodes[i].config).unwrap_or_default();
        let documented = st["failed"] == true || st["apply_error"].is_string();
        if self.opts.tolerate_known && !documented && !self.replicating_within(SELF_HEAL) {
            self.tally.notes.push(format!(
                "seed {}: no recovery within {SELF_HEAL:?} after ENOSPC on {}'s {area:?}: restarted it (--tolerate-known)",
                self.seed, NAMES[i]
            ));
            self.kill(i);
            self.restart(i)?;
        }
        Ok(())
    }

    /// Does replication stream again (both nodes up) within `t`?
    fn replicating_within(&self, t: Duration) -> bool {
        let down = |i: usize| daemon::status(&self.c.nodes[i].config).is_none();
        self.c
            .wait(self.c.primary, "replication to stream", t, |st| {
                st["targets"][0]["state"] == "streaming"
                    && st["targets"][0]["tracking"] == "streaming"
            })
            .is_ok()
            && !down(0)
            && !down(1)
    }

    /// After replication failed to resume: does restarting the standby help? (Said
    /// in the violation, to tell a stuck daemon from a lost cluster.)
    fn diagnose_stuck(&mut self) -> String {
        let s = self.c.standby();
        self.c.kill(s);
        if let Err(e) = self.c.start(s) {
            return format!("a restart of {} fails too: {e:#}", NAMES[s]);
        }
        if self.w.pause().is_ok() && self.caught_up().is_ok() {
            format!(
                "diagnosis: {RESTART_HELPS} (standby {}: a stuck daemon)",
                NAMES[s]
            )
        } else {
            format!(
                "diagnosis: even after restarting the standby {} replication does not resume",
                NAMES[s]
            )
        }
    }

    /// Planned: `switchover` on the primary; the standby takes over, the old primary
    /// follows it.
    fn switchover(&mut self) -> Step {
        let (p, s) = (self.c.primary, self.c.standby());
        if !self.role_command(p, &["switchover"], s, "primary")? {
            return Ok(());
        }
        self.c.primary = s;
        self.tally.role_changes += 1;
        self.w.pause()?;
        let addr = self.c.primary_nbd(CONVERGE)?;
        self.check_primary(addr, "the new primary right after the switchover")?;
        self.w.target(Some(addr));
        self.w.resume();
        self.converge(p, "the old primary to follow as a standby", |st| {
            st["role"] == "standby"
        })?;
        Ok(())
    }

    /// Unplanned: SIGKILL the primary while writes flow and the standby is in sync,
    /// `promote --force` the standby, check it, then the old primary comes back
    /// (outdated) and is demoted to follow the new one.
    fn failover(&mut self) -> Step {
        let (p, s) = (self.c.primary, self.c.standby());
        // Every write acknowledged from here on is on the standby: it is in sync now,
        // and none of them can wait out the sync timeout before the kill.
        self.in_sync(p)?;
        self.w.resume();
        sleep_ms(self.rng.range(100, SYNC_TIMEOUT_MS / 2));
        self.kill(p);
        self.w.target(None);
        if !self.role_command(s, &["promote", "--force"], s, "primary")? {
            return violation(format!(
                "promote --force on {} refused with its primary dead",
                NAMES[s]
            ));
        }
        self.c.primary = s;
        self.tally.role_changes += 1;
        self.w.pause()?;
        let addr = self.c.primary_nbd(CONVERGE)?;
        self.check_primary(addr, "the promoted standby after the primary was killed")?;
        self.w.target(Some(addr));
        self.w.resume();
        sleep_ms(self.rng.range(300, 1500));
        self.restart(p)?;
        // Never tolerated: two primaries accepting writes (seed 101, fixed).
        if let Err(Fail::Violation(v)) =
            self.converge(p, "the old primary to learn it is outdated", |st| {
                st["outdated"].is_object()
            })
        {
            return violation(format!("{v}\n  {}", self.probe_split_brain(p)));
        }
        if !self.role_command(p, &["demote"], p, "standby")? {
            return violation(format!("demote of the outdated {} refused", NAMES[p]));
        }
        self.tally.role_changes += 1;
        self.converge(p, "the demoted old primary to run as a standby", |st| {
            st["role"] == "standby"
        })?;
        Ok(())
    }

    /// An old primary that never learned it is outdated: does it still take writes
    /// (two primaries)? One write of a marker block through its own NBD export.
    fn probe_split_brain(&self, p: usize) -> String {
        let Some(addr) = self.c.status(p).as_ref().and_then(daemon::nbd_addr) else {
            return "split-brain probe: the old primary serves no NBD".into();
        };
        let marker = crate::block::encode(self.seed, 0, u64::MAX);
        let r = ferry_nbd::testclient::TestClient::open(addr, VOLUME)
            .and_then(|(mut c, _)| c.write(0, &marker, 0));
        match r {
            Ok(0) => format!(
                "SPLIT BRAIN: the old primary {} (still unfenced) acknowledged a write at {addr} while {} is primary",
                NAMES[p],
                NAMES[1 - p]
            ),
            Ok(errno) => format!("split-brain probe: the old primary refused the write (NBD error {errno})"),
            Err(e) => format!("split-brain probe: no write possible on the old primary: {e}"),
        }
    }

    /// Runs a role-change command on node `on`; true if node `check` then takes `role`.
    /// A refusal that changed nothing is `false` (noted). A command that reports a
    /// failure although the role did change (its answer lost in the restart into the
    /// new role) is a finding — a known one, tolerated with `--tolerate-known`.
    fn role_command(&mut self, on: usize, args: &[&str], check: usize, role: &str) -> Step<bool> {
        let err = match self.c.ctl(on, args) {
            Ok(_) => return Ok(true),
            Err(e) => e,
        };
        let became = self
            .c
            .wait(check, "the role change", Duration::from_secs(20), |st| {
                st["role"] == role
            })
            .is_ok();
        let what = format!("ferryctl {} on {}", args.join(" "), NAMES[on]);
        if !became {
            self.tally
                .notes
                .push(format!("seed {}: {what} refused: {err}", self.seed));
            return Ok(false);
        }
        let finding = format!(
            "{what} reported failure ({err}) but {} did become {role}: the answer was lost",
            NAMES[check]
        );
        if self.opts.tolerate_known {
            self.tally
                .notes
                .push(format!("seed {}: {finding} (--tolerate-known)", self.seed));
            Ok(true)
        } else {
            violation(finding)
        }
    }

    /// Waits for node `i` to reach a state; not getting there is a finding.
    fn converge(
        &self,
        i: usize,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Step<serde_json::Value> {
        self.c
            .wait(i, what, CONVERGE, ok)
            .map_err(|e| Fail::Violation(format!("{e:#}")))
    }

    /// Reads the whole volume through the primary and holds it to the model.
    fn check_primary(&mut self, addr: std::net::SocketAddr, what: &str) -> Step {
        let m = self.w.model();
        let out = checker::via_nbd(addr, VOLUME, &m, false)?;
        let lost_acked = if self.opts.writeback {
            checker::via_nbd(addr, VOLUME, &m, true)?.bad.len()
        } else {
            0
        };
        drop(m);
        self.tally.checks += 1;
        self.tally.promised_checked += out.promised as u64;
        if lost_acked > 0 {
            self.tally.notes.push(format!(
                "seed {}: {lost_acked} acknowledged but unflushed writes not on {what} (allowed with --cache writeback)",
                self.seed
            ));
        }
        if let Some(b) = out.bad.first() {
            return violation(format!(
                "{what}: {} of {} blocks break the rule; first: block {} holds {} but promised {}, acknowledged {}, attempted {}",
                out.bad.len(),
                BLOCKS,
                b.block,
                b.found,
                b.state.promised,
                b.state.acked,
                b.state.attempted
            ));
        }
        Ok(())
    }

    /// Leaves the writer paused with the standby caught up and synchronous. A
    /// degraded target turns sync again only as acknowledgements flow, so the writer
    /// runs while waiting for that.
    fn in_sync(&mut self, p: usize) -> Step {
        for _ in 0..5 {
            self.converge(p, "the target to be synchronous", |st| {
                let t = &st["targets"][0];
                t["state"] == "streaming" && t["effective_mode"] == "sync"
            })?;
            self.w.pause()?;
            self.caught_up()?;
            if self
                .c
                .status(p)
                .is_some_and(|st| st["targets"][0]["effective_mode"] == "sync")
            {
                return Ok(());
            }
            self.w.resume();
        }
        violation("the target never stayed synchronous long enough to fail over")
    }

    /// Writer paused: the standby streams, holds and has applied everything the
    /// primary made durable, and is consistent.
    fn caught_up(&mut self) -> Step {
        let (p, s) = (self.c.primary, self.c.standby());
        let st = self.converge(p, "the target to stream", |st| {
            let t = &st["targets"][0];
            t["state"] == "streaming" && t["tracking"] == "streaming"
        })?;
        let last = seq(&st, "/durable_seq");
        self.converge(
            p,
            "the target to hold everything (lag 0), the primary to apply it",
            |st| {
                seq(st, "/targets/0/acked_seq") >= last
                    && seq(st, "/targets/0/lag_bytes") == 0
                    && seq(st, "/applied_seq") >= last
            },
        )?;
        self.converge(
            s,
            "the standby to apply everything and be consistent",
            |st| seq(st, "/applied_seq") >= last && st["replica"] == "consistent",
        )?;
        Ok(())
    }

    /// Replication resumes under the workload; then, writer paused, the primary obeys
    /// the rule and the standby catches up completely.
    fn converge_and_check(&mut self, p: usize) -> Step {
        self.converge(p, "replication to resume after the fault", |st| {
            let t = &st["targets"][0];
            t["state"] == "streaming" && t["tracking"] == "streaming"
        })?;
        self.w.pause()?;
        let addr = self.c.primary_nbd(CONVERGE)?;
        self.check_primary(addr, &format!("the primary ({})", NAMES[p]))?;
        self.caught_up()
    }

    /// After a fault: restart what died by itself, let replication resume under the
    /// workload, then with the writer paused check the primary and compare replicas.
    fn settle(&mut self) -> Step {
        self.c.heal();
        for (i, st) in self.c.exited() {
            self.tally.notes.push(format!(
                "seed {}: {} exited by itself ({st}); log tail:\n{}",
                self.seed,
                NAMES[i],
                log_tail(&self.c.nodes[i].log, 5)
            ));
            self.restart(i)?;
        }
        for (i, name) in NAMES.iter().enumerate() {
            // A base write (primary: `failed`) or a replica apply (standby:
            // `apply_error`) that hit ENOSPC stops there until a restart replays the
            // journal, as the daemon logs and reports: the operator's move.
            let st = daemon::status(&self.c.nodes[i].config).unwrap_or_default();
            if st["failed"] == true || st["apply_error"].is_string() {
                self.tally.notes.push(format!(
                    "seed {}: {} stopped on a failed write ({}); restarted to replay its journal",
                    self.seed,
                    name,
                    st["apply_error"].as_str().unwrap_or("base write failed")
                ));
                self.kill(i);
                self.restart(i)?;
            }
        }
        let p = self.c.primary;
        match self.converge_and_check(p) {
            Err(Fail::Violation(v)) if v.contains("timed out") => {
                // A standby journal failed by ENOSPC (seed 2) is fixed (the journal
                // waits for space): never tolerated again, but named if seen.
                let journal = if daemon::current_log(&self.c.nodes[1 - p].log)
                    .contains("journal is now failed")
                {
                    format!(
                        "\n  {}'s journal failed (\"journal is now failed\" in its log)",
                        NAMES[1 - p]
                    )
                } else {
                    String::new()
                };
                // Tell a stuck daemon from a lost cluster before the seed ends.
                let d = self.diagnose_stuck();
                return violation(format!("{v}\n  {d}{journal}"));
            }
            r => r?,
        }
        let (a, b) = (&self.c.nodes[p].volume, &self.c.nodes[1 - p].volume);
        if let Some(block) = checker::first_difference(a, b)? {
            return violation(format!(
                "after lag 0 the replica {} differs from the primary {} first at block {block}",
                b.display(),
                a.display()
            ));
        }
        self.tally.replica_compares += 1;
        // The replica as a file, held to the same rule (it equals the primary, which
        // was read through NBD: this checks the backing file is what NBD served).
        let out = checker::via_file(b, &self.w.model(), false)?;
        if let Some(x) = out.bad.first() {
            return violation(format!(
                "the replica {} breaks the rule at block {}: {}",
                b.display(),
                x.block,
                x.found
            ));
        }
        self.w.resume();
        Ok(())
    }
}

fn tag(e: Fail, ctx: &str) -> Fail {
    match e {
        Fail::Violation(v) => Fail::Violation(format!("{ctx}: {v}")),
        Fail::Harness(h) => Fail::Harness(h.context(ctx.to_string())),
    }
}

fn describe(f: Fault, c: &Cluster) -> String {
    let (p, s) = (NAMES[c.primary], NAMES[c.standby()]);
    match f {
        Fault::KillPrimary => format!("SIGKILL the primary ({p}), restart it"),
        Fault::KillStandby => format!("SIGKILL the standby ({s}), restart it"),
        Fault::DiskFull(on_p, area) => {
            format!("disk full: {area:?} of {}", if on_p { p } else { s })
        }
        Fault::Switchover => format!("switchover {p} -> {s}"),
        Fault::Failover => format!("failover: SIGKILL {p}, promote --force {s}, demote {p}"),
        f => f.kind().to_string(),
    }
}
