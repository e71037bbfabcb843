//! Frontend (NBD export) counters and latency histograms of the primary write path,
//! updated on the request path by `primary::volume` and encoded by the
//! metrics collector at scrape time, together with the NBD server's own counters
//! (ferry-nbd's [`ServerStats`]: connections, limits, refused requests, TLS).
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ferry_nbd::stats::StatsSnapshot;
use ferry_nbd::ServerStats;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Frontend latency buckets (seconds): fsync-scale, 50 µs to 1 s.
pub const LATENCY_BUCKETS: [f64; 13] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
];

/// Frontend operations, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl FrontendOp {
    const ALL: [FrontendOp; 5] = [
        FrontendOp::Read,
        FrontendOp::Write,
        FrontendOp::Flush,
        FrontendOp::Trim,
        FrontendOp::WriteZeroes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FrontendOp::Read => "read",
            FrontendOp::Write => "write",
            FrontendOp::Flush => "flush",
            FrontendOp::Trim => "trim",
            FrontendOp::WriteZeroes => "write_zeroes",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// Frontend (NBD export) counters and latency histograms, shared by every volume of
/// the group. Updated on the request path: lock-free atomics only.
#[derive(Debug)]
pub struct Frontend {
    ops: Family<OpLabel, Counter>,
    bytes: Family<OpLabel, Counter>,
    errors: Family<OpLabel, Counter>,
    write_seconds: Histogram,
    flush_seconds: Histogram,
    /// Append to durable and released by the apply gate: the journal's share of a
    /// mutation's latency (the rest is apply, sync targets and the NBD path). Small
    /// writes are applied before their task is released, so for them it includes
    /// the base write.
    journal_wait_seconds: Histogram,
    /// The families' counters by [`FrontendOp`] index (clones share the atomic), so
    /// the request path does not take the family's lock.
    by_op: [[Counter; 3]; FrontendOp::ALL.len()],
    /// The NBD server's counters, once it runs.
    nbd: OnceLock<Arc<ServerStats>>,
}

impl Default for Frontend {
    fn default() -> Self {
        let ops = Family::<OpLabel, Counter>::default();
        let bytes = Family::<OpLabel, Counter>::default();
        let errors = Family::<OpLabel, Counter>::default();
        // Every op's series exists from the start (at 0), so rate() has a baseline.
        let by_op = FrontendOp::ALL.map(|op| {
            let l = OpLabel { op: op.as_str() };
            [&ops, &bytes, &errors].map(|f| f.get_or_create(&l).clone())
        });
        Frontend {
            ops,
            bytes,
            errors,
            write_seconds: Histogram::new(LATENCY_BUCKETS),
            flush_seconds: Histogram::new(LATENCY_BUCKETS),
            journal_wait_seconds: Histogram::new(LATENCY_BUCKETS),
            by_op,
            nbd: OnceLock::new(),
        }
    }
}

impl Frontend {
    /// Records one finished frontend request. `bytes` is the range it covered.
    pub fn observe(&self, op: FrontendOp, bytes: u64, started: Instant, ok: bool) {
        let [ops, byte_count, errors] = &self.by_op[op as usize];
        ops.inc();
        byte_count.inc_by(bytes);
        if !ok {
            errors.inc();
        }
        let secs = started.elapsed().as_secs_f64();
        match op {
            FrontendOp::Flush => self.flush_seconds.observe(secs),
            // Trim and write-zeroes take the same journal-first path as writes but
            // carry no payload; they are counted, not mixed into the write latency.
            FrontendOp::Write => self.write_seconds.observe(secs),
            FrontendOp::Read | FrontendOp::Trim | FrontendOp::WriteZeroes => {}
        }
    }

    /// Records how long a mutation waited for the journal (see `journal_wait_seconds`).
    pub fn observe_journal_wait(&self, started: Instant) {
        self.journal_wait_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// The NBD server whose counters are exported with these (one per process: a
    /// role change re-executes the daemon).
    pub fn attach_nbd_server(&self, stats: Arc<ServerStats>) {
        let _ = self.nbd.set(stats);
    }

    /// Encodes the counters and histograms (called by the metrics collector).
    pub fn encode(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(s) = self.nbd.get() {
            encode_nbd_server(e, &s.snapshot())?;
        }
        self.encode_requests(e)
    }

    fn encode_requests(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        self.ops.encode(e.encode_descriptor(
            "ferry_frontend_ops",
            "NBD requests served, by op.",
            None,
            MetricType::Counter,
        )?)?;
        self.bytes.encode(e.encode_descriptor(
            "ferry_frontend",
            "Bytes covered by NBD requests, by op.",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?)?;
        self.errors.encode(e.encode_descriptor(
            "ferry_frontend_errors",
            "NBD requests that failed, by op.",
            None,
            MetricType::Counter,
        )?)?;
        self.write_seconds.encode(e.encode_descriptor(
            "ferry_frontend_write",
            "NBD write latency: request to reply (journal durable, applied, sync targets confirmed).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        self.flush_seconds.encode(e.encode_descriptor(
            "ferry_frontend_flush",
            "NBD flush latency.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        self.journal_wait_seconds.encode(e.encode_descriptor(
            "ferry_frontend_journal_wait",
            "Journal share of a mutation's latency: append to durable and released for apply (small writes: applied).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)
    }
}

/// ferry-nbd's server counters: (name, help, value), all counters.
fn nbd_counters(s: &StatsSnapshot) -> [(&'static str, &'static str, u64); 9] {
    [
        ("ferry_nbd_connections_accepted", "NBD connections admitted.", s.connections_accepted_total),
        (
            "ferry_nbd_connections_refused",
            "NBD connections closed at once at the connection cap (nbd.max_connections): every connection was in a session.",
            s.refused_connections_total,
        ),
        (
            "ferry_nbd_connections_evicted",
            "NBD connections closed in their handshake to make room for a new one at the connection cap.",
            s.evicted_connections_total,
        ),
        (
            "ferry_nbd_handshake_timeouts",
            "NBD connections dropped for not finishing the handshake in nbd.handshake_timeout_secs.",
            s.handshake_timeouts_total,
        ),
        (
            "ferry_nbd_idle_timeouts",
            "NBD sessions closed after nbd.idle_timeout_secs without a request.",
            s.idle_timeouts_total,
        ),
        (
            "ferry_nbd_requests_refused",
            "NBD requests refused by validation before reaching a volume (bad range, flags or command).",
            s.refused_requests_total,
        ),
        ("ferry_nbd_tls_sessions", "NBD sessions that entered transmission inside TLS.", s.tls_sessions_total),
        (
            "ferry_nbd_structured_sessions",
            "NBD sessions that entered transmission with structured replies.",
            s.structured_sessions_total,
        ),
        (
            "ferry_nbd_extended_sessions",
            "NBD sessions that entered transmission with extended headers.",
            s.extended_sessions_total,
        ),
    ]
}

/// The NBD server's counters and its active connections.
fn encode_nbd_server(e: &mut DescriptorEncoder, s: &StatsSnapshot) -> std::fmt::Result {
    ConstGauge::new(s.connections_active as i64).encode(e.encode_descriptor(
        "ferry_nbd_connections_active",
        "NBD connections open now (in the handshake or in a session).",
        None,
        MetricType::Gauge,
    )?)?;
    for (name, help, v) in nbd_counters(s) {
        ConstCounter::new(v).encode(e.encode_descriptor(
            name,
            help,
            None,
            MetricType::Counter,
        )?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn frontend_histogram_and_counters() {
        let f = Frontend::default();
        f.observe(FrontendOp::Write, 4096, Instant::now(), true);
        f.observe(FrontendOp::Flush, 0, Instant::now(), false);
        let mut out = String::new();
        let mut reg = Registry::default();
        #[derive(Debug)]
        struct C(Frontend);
        impl Collector for C {
            fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
                self.0.encode(&mut e)
            }
        }
        reg.register_collector(Box::new(C(f)));
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("ferry_frontend_ops_total{op=\"write\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("ferry_frontend_bytes_total{op=\"write\"} 4096"),
            "{out}"
        );
        assert!(
            out.contains("ferry_frontend_errors_total{op=\"flush\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("ferry_frontend_write_seconds_count 1"),
            "{out}"
        );
        assert!(
            !out.contains("ferry_nbd_"),
            "no NBD server series before one runs: {out}"
        );
        assert!(
            out.contains("ferry_frontend_write_seconds_bucket{le=\"5.0e-5\"}")
                || out.contains("ferry_frontend_write_seconds_bucket{le=\"0.00005\"}"),
            "{out}"
        );
    }
}
