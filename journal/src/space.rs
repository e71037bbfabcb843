//! Waiting out a full file system: which errors are worth waiting for (ENOSPC and
//! EDQUOT; EMFILE and ENFILE too where a segment is opened), the backoff between
//! attempts, one loud WARN per episode (then one every [`LOG_EVERY`]) and the
//! counters the daemon exports. Shared by the redo journal's writer and segment
//! helper and by the undo log. Why wait instead of failing: space is usually
//! freed by an operator or by retention within minutes, and failing turns that
//! transient condition into a stopped group that only a restart clears.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::clock::now_ns;
use crate::error::JournalError;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// While an episode lasts, the WARN is repeated this often.
pub const LOG_EVERY: Duration = Duration::from_secs(30);
/// Slice of a backoff sleep between checks of the stop condition.
const SLICE: Duration = Duration::from_millis(50);

/// Out of space (or quota): waiting may help.
pub(crate) fn is_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Out of space or out of file descriptors (opening or creating a segment).
pub(crate) fn is_space_or_fds(e: &io::Error) -> bool {
    is_space(e) || matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The io error inside a journal error, if it is one.
pub(crate) fn io_source(e: &JournalError) -> Option<&io::Error> {
    match e {
        JournalError::Io { source, .. } => Some(source),
        _ => None,
    }
}

/// A snapshot of the waits for space of a journal or an undo log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceWaitStats {
    /// Episodes: times the log started waiting for space (or file descriptors).
    pub episodes: u64,
    /// Failed attempts retried after a backoff, over all episodes.
    pub retries: u64,
    /// When the current episode started (ns since the Unix epoch, [`now_ns`]);
    /// 0 while not waiting.
    pub waiting_since_ns: u64,
}

#[derive(Default)]
struct Episode {
    /// Waiters currently waiting (the writer and the segment helper may both).
    waiters: u32,
    started: Option<Instant>,
    last_log: Option<Instant>,
}

/// Shared tracker of one log's waits for space. Cheap to clone (`Arc` inside).
#[derive(Clone, Default)]
pub struct SpaceMonitor {
    inner: Arc<MonitorInner>,
}

#[derive(Default)]
struct MonitorInner {
    episodes: AtomicU64,
    retries: AtomicU64,
    since_ns: AtomicU64,
    episode: Mutex<Episode>,
    stop: AtomicBool,
}

impl std::fmt::Debug for SpaceMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpaceMonitor")
            .field("stats", &self.stats())
            .finish()
    }
}

impl SpaceMonitor {
    pub fn stats(&self) -> SpaceWaitStats {
        let i = &self.inner;
        SpaceWaitStats {
            episodes: i.episodes.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
            waiting_since_ns: i.since_ns.load(Ordering::Relaxed),
        }
    }

    /// Makes every current and later wait give up with its error (shutdown: a
    /// thread waiting for space must not hold the process up forever).
    pub fn stop_waiting(&self) {
        self.inner.stop.store(true, Ordering::Release);
    }

    fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::Acquire)
    }

    /// A waiter for one operation (`what`, for the log) in log `log`.
    pub(crate) fn waiter<'a>(&'a self, log: &'a str, what: &'a str) -> Waiter<'a> {
        Waiter {
            monitor: self,
            log,
            what,
            backoff: FIRST_BACKOFF,
            joined: false,
        }
    }
}

/// One operation waiting for space: call [`Waiter::wait`] after each failed
/// attempt; dropping it (after the attempt succeeded or failed for good) ends its
/// part of the episode.
pub(crate) struct Waiter<'a> {
    monitor: &'a SpaceMonitor,
    log: &'a str,
    what: &'a str,
    backoff: Duration,
    joined: bool,
}

impl Waiter<'_> {
    /// Records the failed attempt (`err`), logs, and sleeps the backoff. Returns
    /// false without sleeping (give up) once `stop()` or the monitor says so.
    pub(crate) fn wait(&mut self, err: &io::Error, stop: impl Fn() -> bool) -> bool {
        if stop() || self.monitor.stopped() {
            return false;
        }
        self.note(err);
        let until = Instant::now() + self.backoff;
        // Bounded by the backoff: at most MAX_BACKOFF / SLICE rounds.
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            std::thread::sleep((until - now).min(SLICE));
            if stop() || self.monitor.stopped() {
                return false;
            }
        }
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        true
    }

    fn note(&mut self, err: &io::Error) {
        let i = &self.monitor.inner;
        let mut ep = i.episode.lock();
        if !self.joined {
            self.joined = true;
            ep.waiters += 1;
            if ep.waiters == 1 {
                ep.started = Some(Instant::now());
                ep.last_log = Some(Instant::now());
                i.episodes.fetch_add(1, Ordering::Relaxed);
                i.since_ns.store(now_ns().max(1), Ordering::Relaxed);
                tracing::warn!(log = self.log, op = self.what, error = %err,
                    "out of space: writes wait (nothing acknowledged is lost) and resume by themselves once space is freed");
                return;
            }
        }
        i.retries.fetch_add(1, Ordering::Relaxed);
        if ep.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            ep.last_log = Some(Instant::now());
            let waited = ep.started.map_or(Duration::ZERO, |t| t.elapsed());
            tracing::warn!(log = self.log, op = self.what, error = %err, waited_s = waited.as_secs(),
                "still out of space: writes keep waiting");
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.joined {
            return;
        }
        let i = &self.monitor.inner;
        let mut ep = i.episode.lock();
        ep.waiters = ep.waiters.saturating_sub(1);
        if ep.waiters == 0 {
            let waited = ep.started.take().map_or(Duration::ZERO, |t| t.elapsed());
            i.since_ns.store(0, Ordering::Relaxed);
            tracing::warn!(
                log = self.log,
                op = self.what,
                "space wait over after {waited:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_waiters_make_one_episode_and_stop_ends_waits() {
        let m = SpaceMonitor::default();
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        let mut a = m.waiter("test", "a");
        assert!(a.wait(&e, || false));
        let mut b = m.waiter("test", "b");
        assert!(b.wait(&e, || false));
        assert_eq!(m.stats().episodes, 1);
        assert_ne!(m.stats().waiting_since_ns, 0);
        drop(a);
        assert_ne!(m.stats().waiting_since_ns, 0, "b still waits");
        drop(b);
        assert_eq!(m.stats().waiting_since_ns, 0);
        // A stop condition or stop_waiting ends a wait at once, uncounted.
        assert!(!m.waiter("test", "c").wait(&e, || true));
        m.stop_waiting();
        assert!(!m.waiter("test", "d").wait(&e, || false));
        assert_eq!(m.stats().episodes, 1);
    }

    #[test]
    fn only_space_and_descriptor_errors_are_waited_for() {
        let err = io::Error::from_raw_os_error;
        assert!(is_space(&err(libc::ENOSPC)) && is_space(&err(libc::EDQUOT)));
        assert!(!is_space(&err(libc::EMFILE)) && !is_space(&err(libc::EIO)));
        assert!(is_space_or_fds(&err(libc::EMFILE)) && is_space_or_fds(&err(libc::ENFILE)));
        assert!(!is_space_or_fds(&err(libc::EIO)) && !is_space_or_fds(&io::Error::other("x")));
    }
}
