//! A userspace UDP proxy between two replication peers that drops, duplicates,
//! reorders, delays and pauses datagrams, as a bad WAN link (or a partition) would.
//! Used by ferryctl's lossy-link test and by the `ferry-torture` harness: the
//! primary's target address points at [`LossyLink::port`], the proxy forwards to the
//! standby's real listen address and relays the answers back.
//!
//! The fault knobs are atomics, so a test flips them while traffic flows. Threads
//! stop when the link is dropped.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The proxy's fault knobs, shared with its forwarding threads.
#[derive(Default)]
pub struct Faults {
    /// Per-mille chances: drop, duplicate, hold back (reorder).
    pub chances: [AtomicU32; 3],
    /// Every datagram waits this long before it goes on (0: none).
    pub delay_ms: AtomicU32,
}

/// A running proxy: `127.0.0.1:port` (or the address given to [`LossyLink::on`])
/// forwards to the upstream it was made with.
pub struct LossyLink {
    pub port: u16,
    pub faults: Arc<Faults>,
    /// Nothing passes while set (a partition).
    pub paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Datagrams received from either side (passed or not).
    pub seen: Arc<AtomicU64>,
}

/// What one forwarding direction shares with the other.
struct Shared {
    front: UdpSocket,
    back: UdpSocket,
    /// The last address the front side heard from (where answers go).
    client: Mutex<Option<SocketAddr>>,
    faults: Arc<Faults>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
}

impl LossyLink {
    /// Binds the proxy on an OS port of 127.0.0.1 in front of `upstream`.
    pub fn new(upstream: SocketAddr) -> io::Result<LossyLink> {
        LossyLink::on(std::net::Ipv4Addr::LOCALHOST.into(), upstream)
    }

    /// Binds the proxy on an OS port of `ip` (an address of this host, e.g. a bridge
    /// to network namespaces) in front of `upstream`, which it reaches from `ip` too.
    pub fn on(ip: std::net::IpAddr, upstream: SocketAddr) -> io::Result<LossyLink> {
        let front = UdpSocket::bind((ip, 0))?;
        let back = UdpSocket::bind((ip, 0))?;
        back.connect(upstream)?;
        // Short timeouts: the threads check `stop` and release delayed datagrams.
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(5)))?;
        }
        let port = front.local_addr()?.port();
        let faults = Arc::new(Faults::default());
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            front,
            back,
            client: Mutex::new(None),
            faults: faults.clone(),
            paused: paused.clone(),
            stop: stop.clone(),
            seen: seen.clone(),
        });
        let threads = (0..2u64)
            .map(|dir| {
                let sh = shared.clone();
                std::thread::spawn(move || forward(&sh, dir))
            })
            .collect();
        Ok(LossyLink {
            port,
            faults,
            paused,
            stop,
            threads,
            seen,
        })
    }

    /// Sets the per-mille drop, duplicate and reorder chances.
    pub fn set(&self, drop_pm: u32, dup_pm: u32, reorder_pm: u32) {
        for (i, v) in [drop_pm, dup_pm, reorder_pm].into_iter().enumerate() {
            self.faults.chances[i].store(v, Ordering::Relaxed);
        }
    }

    /// Delays every datagram by `ms` (0: none).
    pub fn set_delay(&self, ms: u32) {
        self.faults.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Partitions (`true`) or heals the link.
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    /// Back to a perfect link: no loss, no delay, not paused.
    pub fn heal(&self) {
        self.set(0, 0, 0);
        self.set_delay(0);
        self.pause(false);
    }
}

/// One direction's loop: 0 = front (client) to upstream, 1 = the answers.
fn forward(sh: &Shared, dir: u64) {
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ dir;
    let mut held: Option<Vec<u8>> = None;
    let mut delayed: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    let send = |p: &[u8]| {
        if dir == 0 {
            let _ = sh.back.send(p);
        } else if let Some(c) = *sh.client.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = sh.front.send_to(p, c);
        }
    };
    while !sh.stop.load(Ordering::Relaxed) {
        while delayed
            .front()
            .is_some_and(|(due, _)| *due <= Instant::now())
        {
            if let Some((_, p)) = delayed.pop_front() {
                send(&p);
            }
        }
        let got = if dir == 0 {
            sh.front.recv_from(&mut buf).map(|(n, from)| {
                *sh.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                n
            })
        } else {
            sh.back.recv(&mut buf)
        };
        let Ok(n) = got else { continue };
        sh.seen.fetch_add(1, Ordering::Relaxed);
        if sh.paused.load(Ordering::Relaxed) {
            continue;
        }
        let mut roll = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 1000) as u32
        };
        let [drop_pm, dup_pm, hold_pm] =
            [0, 1, 2].map(|i| sh.faults.chances[i].load(Ordering::Relaxed));
        if roll() < drop_pm {
            continue;
        }
        let pkt = buf[..n].to_vec();
        if held.is_none() && roll() < hold_pm {
            held = Some(pkt); // goes out after the next datagram: reordered
            continue;
        }
        let mut out = vec![pkt.clone()];
        if roll() < dup_pm {
            out.push(pkt);
        }
        out.extend(held.take());
        let delay = sh.faults.delay_ms.load(Ordering::Relaxed);
        for p in out {
            if delay == 0 && delayed.is_empty() {
                send(&p);
            } else {
                // Behind earlier delayed datagrams: a delay alone never reorders.
                let due = Instant::now() + Duration::from_millis(u64::from(delay));
                delayed.push_back((due, p));
            }
        }
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    #[test]
    fn forwards_both_ways_and_pauses() {
        let (up, up_addr) = echo();
        let link = LossyLink::new(up_addr).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        client.connect(("127.0.0.1", link.port)).unwrap();
        client.send(b"ping").unwrap();
        let mut b = [0u8; 16];
        let (n, from) = up.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], b"ping");
        up.send_to(b"pong", from).unwrap();
        let n = client.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"pong");
        link.pause(true);
        client.send(b"lost").unwrap();
        up.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(
            up.recv_from(&mut b).is_err(),
            "a paused link passed a datagram"
        );
        link.heal();
        link.set_delay(100);
        let t0 = Instant::now();
        client.send(b"late").unwrap();
        up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (n, _) = up.recv_from(&mut b).unwrap();
        assert_eq!(&b[..n], b"late");
        assert!(
            t0.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t0.elapsed()
        );
        assert!(link.seen.load(Ordering::Relaxed) >= 4);
    }
}
