//! The verifying workload: one thread writing self-describing blocks (see
//! [`crate::block`]) at random through its own NBD connection to whichever node is
//! primary, with a FLUSH every few writes, recording every attempt, acknowledgement
//! and promise in the shared [`Model`]. The controller pauses it around checks (so a
//! check sees a still volume) and points it at a new primary after role changes;
//! it reconnects by itself after errors (a killed primary, EPERM after a switchover).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_nbd::testclient::TestClient;

use crate::block::{encode, splitmix, BLOCK};
use crate::model::Model;

/// A FLUSH after this many writes.
const FLUSH_EVERY: u64 = 16;

#[derive(Default)]
pub struct Counters {
    pub writes: AtomicU64,
    pub acked: AtomicU64,
    /// Answered with an NBD error (EPERM on an outdated or handing-over primary, EIO).
    pub refused: AtomicU64,
    /// No answer: the connection broke (a killed node).
    pub broken: AtomicU64,
    pub flushes: AtomicU64,
    pub flushes_ok: AtomicU64,
}

#[derive(Default)]
struct Gate {
    target: Option<SocketAddr>,
    /// Bumped with every new target: the writer drops its old connection.
    target_gen: u64,
    pause: bool,
    /// The writer is parked at the gate (no request in flight).
    idle: bool,
    stop: bool,
}

pub struct Shared {
    pub model: Mutex<Model>,
    pub counters: Counters,
    gate: Mutex<Gate>,
    cv: Condvar,
    volume: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer thread; stopped and joined when dropped.
pub struct Writer {
    pub shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(model: Model, volume: &str, seed: u64) -> Writer {
        let shared = Arc::new(Shared {
            model: Mutex::new(model),
            counters: Counters::default(),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            volume: volume.to_string(),
        });
        let sh = shared.clone();
        let thread = std::thread::spawn(move || run(&sh, seed));
        Writer {
            shared,
            thread: Some(thread),
        }
    }

    /// Points the writer at a (new) primary's NBD address; `None`: nowhere for now.
    pub fn target(&self, addr: Option<SocketAddr>) {
        let mut g = lock(&self.shared.gate);
        g.target = addr;
        g.target_gen += 1;
        self.shared.cv.notify_all();
    }

    /// Stops the writer at its next request boundary and waits (bounded) until it
    /// is there.
    pub fn pause(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut g = lock(&self.shared.gate);
        g.pause = true;
        while !g.idle {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the writer did not reach a request boundary within 30 s");
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        lock(&self.shared.gate).pause = false;
        self.shared.cv.notify_all();
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.shared.model)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.shared.gate).stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits at the gate; returns the target and its generation, or `None` to stop.
fn gate(sh: &Shared) -> Option<(SocketAddr, u64)> {
    let mut g = lock(&sh.gate);
    loop {
        if g.stop {
            return None;
        }
        if !g.pause {
            if let Some(t) = g.target {
                g.idle = false;
                return Some((t, g.target_gen));
            }
        }
        g.idle = true;
        sh.cv.notify_all();
        g = sh
            .cv
            .wait_timeout(g, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn run(sh: &Shared, seed: u64) {
    let mut rng = seed ^ 0x5752_4954_4552_0001; // the writer's own stream
    let mut conn: Option<(TestClient, u64)> = None;
    let mut since_flush = 0u64;
    while let Some((addr, gen)) = gate(sh) {
        if conn.as_ref().is_none_or(|(_, g)| *g != gen) {
            conn = TestClient::open(addr, &sh.volume)
                .ok()
                .map(|(c, _)| (c, gen));
            if conn.is_none() {
                // Not serving (yet): a restarting or handing-over node.
                lock(&sh.gate).idle = true;
                sh.cv.notify_all();
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        let Some((c, _)) = conn.as_mut() else {
            continue;
        };
        let ok = if since_flush >= FLUSH_EVERY {
            since_flush = 0;
            flush(sh, c)
        } else {
            since_flush += 1;
            write(sh, c, &mut rng)
        };
        if !ok {
            conn = None;
            // Not a hot loop of refused writes while a role change settles.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One write of the next generation of a random block; false if the connection is
/// no longer usable.
fn write(sh: &Shared, c: &mut TestClient, rng: &mut u64) -> bool {
    let (block, gen, data) = {
        let mut m = lock(&sh.model);
        let block = (splitmix(rng) % m.blocks.len() as u64) as usize;
        let gen = m.attempt(block);
        (block, gen, encode(m.seed, block as u64, gen))
    };
    sh.counters.writes.fetch_add(1, Ordering::Relaxed);
    match c.write((block * BLOCK) as u64, &data, 0) {
        Ok(0) => {
            lock(&sh.model).acked(block, gen);
            sh.counters.acked.fetch_add(1, Ordering::Relaxed);
            true
        }
        Ok(_) => {
            sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            // An error answer: the node may be outdated; reconnect to the target.
            false
        }
        Err(_) => {
            sh.counters.broken.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

fn flush(sh: &Shared, c: &mut TestClient) -> bool {
    let covered = lock(&sh.model).flush_issued();
    sh.counters.flushes.fetch_add(1, Ordering::Relaxed);
    match c.flush() {
        Ok(0) => {
            lock(&sh.model).flushed(&covered);
            sh.counters.flushes_ok.fetch_add(1, Ordering::Relaxed);
            true
        }
        _ => false,
    }
}
