//! Connection admission for a listener under hostile load: at most `max`
//! connections at once, and when the cap is reached a new connection takes
//! the place of the one that has been *idle* longest (still in its
//! handshake, or waiting for its next request) instead of being refused.
//! Only when every admitted connection is busy is the newcomer refused.
//!
//! Why evict rather than refuse: a flood of connections that never send
//! anything would otherwise hold every slot until their timeouts, and a real
//! client (a hypervisor attaching its disk, `ferryctl status`, a Prometheus
//! scrape) would be locked out for that long. With eviction the flood only
//! displaces itself. Established NBD sessions are never idle in this sense
//! (the server marks them busy for good), so a flood cannot disconnect a
//! disk that is in use.
//!
//! Memory stays bounded: a connection evicted but not yet gone still counts,
//! and no more than `max` evictions may be outstanding, so at most `2 * max`
//! connections exist at any time. Used by ferry-nbd's server and by ferryd's
//! control socket and metrics endpoint.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why [`Admission::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every admitted connection is busy: refuse the newcomer.
    AllBusy,
    /// As many evictions as the cap are still under way: wait for them
    /// ([`Admission::evictions_settled`]) and try again.
    Evicting,
}

/// Admission state of one listener.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    /// A plain mutex: the critical sections are a few map operations and never
    /// await.
    state: Mutex<State>,
    /// Signalled whenever an evicted connection is gone.
    gone: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Admitted connections not yet dropped (evicted ones included).
    admitted: usize,
    /// Evicted connections not yet dropped.
    evicting: usize,
    /// Idle connections by the ticket they got when they became idle (the
    /// smallest is the longest idle), with their eviction signal.
    idle: BTreeMap<u64, Arc<Notify>>,
    next_ticket: u64,
}

impl Admission {
    /// At most `max` connections (at least 1).
    pub fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max: max.max(1),
            state: Default::default(),
            gone: Notify::new(),
        })
    }

    /// The configured cap.
    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No update spans an unwind point, so a poisoned state is consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a new connection, evicting the longest-idle one if the cap is
    /// reached. The returned slot starts idle. Returns whether a connection
    /// was evicted to make room.
    pub fn admit(self: &Arc<Self>) -> Result<(Slot, bool), Full> {
        let mut st = self.lock();
        let mut evicted = false;
        if st.admitted - st.evicting >= self.max {
            if st.idle.is_empty() {
                return Err(Full::AllBusy);
            }
            if st.evicting >= self.max {
                return Err(Full::Evicting);
            }
            if let Some((_, victim)) = st.idle.pop_first() {
                victim.notify_one();
                st.evicting += 1;
                evicted = true;
            }
        }
        st.admitted += 1;
        let evict = Arc::new(Notify::new());
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.idle.insert(ticket, evict.clone());
        drop(st);
        let slot = Slot {
            admission: self.clone(),
            evict,
            mark: Mutex::new(Mark {
                ticket: Some(ticket),
                evicted: false,
            }),
        };
        Ok((slot, evicted))
    }

    /// [`admit`](Admission::admit), but while as many evictions as the cap are
    /// under way, wait (up to `wait`) for them to finish instead of refusing: a
    /// burst of connections then waits in the listener's backlog, which costs
    /// the server nothing, until the connections it displaced are gone.
    pub async fn admit_waiting(
        self: &Arc<Self>,
        wait: std::time::Duration,
    ) -> Result<(Slot, bool), Full> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.admit() {
                Err(Full::Evicting) if tokio::time::Instant::now() < deadline => {
                    let settled = self.evictions_settled();
                    let _ = tokio::time::timeout_at(deadline, settled).await;
                }
                r => return r,
            }
        }
    }

    /// Resolves once fewer evictions than the cap are under way.
    pub async fn evictions_settled(&self) {
        loop {
            let gone = self.gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if self.lock().evicting < self.max {
                return;
            }
            gone.await;
        }
    }

    /// Connections admitted and not yet dropped.
    pub fn admitted(&self) -> usize {
        self.lock().admitted
    }
}

/// One admitted connection; dropping it frees its place. Shared by
/// reference between the connection's handshake (which marks it busy and
/// idle) and whoever waits for [`Slot::evicted`].
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    evict: Arc<Notify>,
    mark: Mutex<Mark>,
}

#[derive(Debug)]
struct Mark {
    /// Its idle ticket while idle.
    ticket: Option<u64>,
    /// Chosen for eviction (seen through the signal, or by finding its
    /// ticket gone from the idle set).
    evicted: bool,
}

impl Slot {
    fn mark(&self) -> MutexGuard<'_, Mark> {
        self.mark.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection is working (an option or request is being served): it
    /// cannot be evicted until it is [`idle`](Slot::idle) again. Returns
    /// `false` if it was chosen for eviction just before: the caller closes
    /// it then.
    #[must_use]
    pub fn busy(&self) -> bool {
        let mut m = self.mark();
        if let Some(t) = m.ticket.take() {
            if self.admission.lock().idle.remove(&t).is_none() {
                m.evicted = true;
            }
        }
        !m.evicted
    }

    /// The connection waits for its peer again: it may be evicted, after every
    /// connection that has been idle longer.
    pub fn idle(&self) {
        let mut m = self.mark();
        if m.ticket.is_some() || m.evicted {
            return;
        }
        let mut st = self.admission.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.idle.insert(ticket, self.evict.clone());
        m.ticket = Some(ticket);
    }

    /// Resolves once this connection was chosen to make room for a newer one
    /// (at once if it already was). Cancel-safe.
    pub async fn evicted(&self) {
        if self.mark().evicted {
            return;
        }
        self.evict.notified().await;
        self.mark().evicted = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let m = self.mark();
        let mut st = self.admission.lock();
        st.admitted -= 1;
        let still_idle = m.ticket.is_some_and(|t| st.idle.remove(&t).is_some());
        if m.evicted || (m.ticket.is_some() && !still_idle) {
            st.evicting -= 1;
            drop(st);
            self.admission.gone.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_full_cap_of_idle_connections_gives_way_to_a_new_one_oldest_first() {
        rt().block_on(async {
            let a = Admission::new(2);
            let (first, e1) = a.admit().unwrap();
            let (second, e2) = a.admit().unwrap();
            assert!(!e1 && !e2);
            let (_third, e3) = a.admit().unwrap();
            assert!(e3, "the cap is reached: the oldest idle one makes room");
            tokio::time::timeout(Duration::from_secs(1), first.evicted())
                .await
                .expect("the first connection is told to go");
            let quiet = tokio::time::timeout(Duration::from_millis(20), second.evicted()).await;
            assert!(quiet.is_err(), "the second one stays");
            assert_eq!(a.admitted(), 3, "the evicted one counts until it is gone");
            drop(first);
            assert_eq!(a.admitted(), 2);
        });
    }

    #[test]
    fn busy_connections_are_never_evicted_and_a_newcomer_is_refused() {
        let a = Admission::new(2);
        let (s1, _) = a.admit().unwrap();
        let (s2, _) = a.admit().unwrap();
        assert!(s1.busy() && s2.busy());
        assert_eq!(a.admit().unwrap_err(), Full::AllBusy);
        // Idle again: the next newcomer displaces it.
        s2.idle();
        let (s3, evicted) = a.admit().unwrap();
        assert!(evicted);
        drop((s1, s2, s3));
        assert_eq!(a.admitted(), 0);
        let st = a.lock();
        assert_eq!((st.evicting, st.idle.len()), (0, 0));
    }

    #[test]
    fn outstanding_evictions_are_bounded_by_the_cap() {
        let a = Admission::new(3);
        let mut held = Vec::new();
        // Evicted slots that never go away (a task that does not run).
        for _ in 0..100 {
            match a.admit() {
                Ok((s, _)) => held.push(s),
                Err(e) => {
                    assert_eq!(e, Full::Evicting);
                    break;
                }
            }
        }
        assert_eq!(held.len(), 6, "cap plus at most cap evictions outstanding");
        // Once one evicted connection is gone, a newcomer gets in again.
        let settled = a.clone();
        let rt = rt();
        let waiter = rt.spawn(async move { settled.evictions_settled().await });
        held.remove(0);
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .expect("settled")
                .unwrap();
        });
        held.push(a.admit().expect("room again").0);
        held.clear();
        assert_eq!(a.admitted(), 0);
        let st = a.lock();
        assert_eq!((st.evicting, st.idle.len()), (0, 0));
    }

    #[test]
    fn a_slot_chosen_while_turning_busy_stays_evicted() {
        rt().block_on(async {
            let a = Admission::new(1);
            let (s1, _) = a.admit().unwrap();
            let (s2, _) = a.admit().unwrap();
            // s1 was chosen; turning busy now does not save it.
            assert!(!s1.busy());
            tokio::time::timeout(Duration::from_secs(1), s1.evicted())
                .await
                .expect("still evicted");
            drop(s1);
            drop(s2);
            let st = a.lock();
            assert_eq!((st.admitted, st.evicting, st.idle.len()), (0, 0, 0));
        });
    }
}
