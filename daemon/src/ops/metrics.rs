//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Enabled by an optional `[metrics]` section (`listen = "HOST:PORT"`; port 0 lets the
//! OS choose, and the bound address is printed on ferryd's ready line). The endpoint
//! is a deliberately small HTTP/1.1 server (GET only, `Connection: close`, bounded
//! request head, a read timeout, a connection cap at which the connection waiting
//! longest for its request head makes room, so idle connections never lock a scrape
//! out) with three paths:
//! * `/metrics` — OpenMetrics text exposition (`prometheus-client`), which Prometheus
//!   negotiates and parses;
//! * `/healthz` — `200 ok` while the process serves HTTP at all;
//! * `/readyz`  — `200 ready` once recovery has finished and the listeners are up,
//!   `503` before that and again while shutting down.
//!
//! The server starts *before* journal recovery so a long replay is observable as
//! "alive, not ready". At scrape time a collector renders the node's status snapshot
//! ([`ferry_api::status::NodeStatus`], built by the same function that answers the
//! control socket's `status`) rather than duplicating what lives elsewhere, plus the
//! frontend latency histograms and op counters ([`crate::primary::frontend::Frontend`])
//! kept by the write path.
//!
//! A reload may move the endpoint or add or remove it ([`EndpointSlot`]): the new address is
//! bound before the old listener closes, and a bind failure leaves the old one serving.
//!
//! Not exported yet because the features do not exist: the point-in-time recovery
//! window and resync progress.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_journal::Seq;
use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::primary::frontend::Frontend;
use ferry_api::config::{Config, Role};
use ferry_api::status::{
    ArchiveStatus, EffectiveMode, NodeStatus, RoleStatus, StandbyStatus, TargetStatus,
};
use ferry_api::timefmt::parse_rfc3339;
use ferry_nbd::admission::{Admission, Slot};

/// Largest request head (request line + headers) the endpoint reads.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// A client must send its request head within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections at once. At the cap a new one displaces the connection that has
/// waited longest for its request head; only when every connection is being
/// answered is a newcomer closed without a response.
const MAX_CONNECTIONS: usize = 32;
/// Longest the accept loop waits for displaced connections to close before refusing.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// The OpenMetrics content type (what `prometheus-client` encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Target states a shipper reports (`ship::session`); each is exported as a series so
/// a state change is a value change, not a series appearing.
const TARGET_STATES: [&str; 5] = [
    "connecting",
    "streaming",
    "resyncing",
    "disconnected",
    "stopped",
];
/// Every `mode` label of the effective-mode gauge, from the one definition of the
/// mode (the target lifecycle's).
const TARGET_MODES: [&str; 3] = [
    EffectiveMode::Sync.metric_str(),
    EffectiveMode::Async.metric_str(),
    EffectiveMode::Degraded.metric_str(),
];

/// What the collector reads at scrape time; set once recovery has finished.
pub struct NodeSource {
    /// Builds the node's status snapshot (what the control socket's `status`
    /// answers): every series but the write path's is rendered from it.
    pub status: Arc<dyn Fn() -> NodeStatus + Send + Sync>,
    /// A primary's write path: latency histograms and op counters.
    pub frontend: Option<Arc<Frontend>>,
}

struct Inner {
    node: String,
    role: Role,
    ready: AtomicBool,
    source: RwLock<Option<NodeSource>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("metrics::Inner")
            .field("node", &self.node)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// The node's metrics: one registry whose single collector reads live state.
pub struct Metrics {
    registry: Registry,
    inner: Arc<Inner>,
}

impl Metrics {
    pub fn new(node: &str, role: Role) -> Arc<Metrics> {
        let inner = Arc::new(Inner {
            node: node.to_string(),
            role,
            ready: AtomicBool::new(false),
            source: RwLock::new(None),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(inner.clone()));
        Arc::new(Metrics { registry, inner })
    }

    /// Connects the collector to the recovered node.
    pub fn set_source(&self, source: NodeSource) {
        *self.inner.source.write() = Some(source);
    }

    /// `/readyz` answers 200 while this is true.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    pub fn ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The exposition text (OpenMetrics, ending in `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a fmt::Error from a String writer: not expected, but never panic.
            out.clear();
            let _ = writeln!(out, "# encoding metrics failed: {e}\n# EOF");
        }
        out
    }
}

fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn counter<N: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, unit, MetricType::Counter)?)
}

/// One gauge family with a `target` label, one series per replication target.
fn per_target<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    targets: &[TargetStatus],
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: impl Fn(&TargetStatus) -> N,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for t in targets {
        let labels: &[(&str, &str)] = &[("target", t.name.as_str())];
        ConstGauge::new(v(t)).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge family with `target` and `label` labels: per target, 1 for its current
/// value and 0 for the other `values` (a value outside them gets a series of its
/// own), so that a change is a value change, not a series appearing.
fn one_hot<'a>(
    e: &mut DescriptorEncoder,
    targets: &'a [TargetStatus],
    (name, help): (&str, &str),
    label: &str,
    values: &[&'a str],
    current: impl Fn(&'a TargetStatus) -> &'a str,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for t in targets {
        let cur = current(t);
        let extra = (!values.contains(&cur)).then_some(cur);
        for v in values.iter().copied().chain(extra) {
            let labels: &[(&str, &str)] = &[("target", t.name.as_str()), (label, v)];
            ConstGauge::new((v == cur) as i64).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for Inner {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut e;
        gauge(
            e,
            "ferry_node_ready",
            "1 once recovery has finished and the listeners are up (what /readyz reports).",
            None,
            self.ready.load(Ordering::Acquire) as i64,
        )?;
        let role = self.role.to_string();
        Info::new(vec![("node", self.node.as_str()), ("role", role.as_str())]).encode(
            e.encode_descriptor(
                "ferry_node_role",
                "This node's configured role.",
                None,
                MetricType::Info,
            )?,
        )?;
        let guard = self.source.read();
        let Some(src) = guard.as_ref() else {
            return Ok(()); // still recovering
        };
        let st = (src.status)();
        gauge(
            e,
            "ferry_node_epoch",
            "Replication epoch of this node.",
            None,
            st.epoch,
        )?;

        encode_journal(e, &st)?;
        encode_apply(e, &st)?;
        encode_role(e, &st, src.frontend.as_deref())
    }
}

/// The journal series (engine, fill, batches, positions).
fn encode_journal(e: &mut DescriptorEncoder, st: &NodeStatus) -> std::fmt::Result {
    let j = &st.journal;
    let fallback = j.fallback_reason.clone().unwrap_or_default();
    Info::new(vec![
        ("engine", j.engine.as_str()),
        ("fallback_reason", fallback.as_str()),
    ])
    .encode(e.encode_descriptor(
        "ferry_journal_engine",
        "Journal IO engine in use, and why it fell back to std IO (empty: no fallback).",
        None,
        MetricType::Info,
    )?)?;
    gauge(
        e,
        "ferry_journal_used",
        "Journal bytes holding records not yet released.",
        Some(&Unit::Bytes),
        j.used_bytes,
    )?;
    gauge(
        e,
        "ferry_journal_capacity",
        "Journal capacity (journal.size).",
        Some(&Unit::Bytes),
        j.capacity_bytes,
    )?;
    counter(
        e,
        "ferry_journal_batches",
        "Durable journal batch writes completed.",
        None,
        j.batches,
    )?;
    counter(
        e,
        "ferry_journal_records",
        "Records made durable in the journal.",
        None,
        j.records,
    )?;
    counter(
        e,
        "ferry_journal_written",
        "Bytes written to journal segments (headers and padding included).",
        Some(&Unit::Bytes),
        j.bytes_written,
    )?;
    counter(
        e,
        "ferry_journal_write",
        "Summed duration of durable batch writes (overlapping when several are in flight).",
        Some(&Unit::Seconds),
        j.write_seconds,
    )?;
    gauge(
        e,
        "ferry_journal_durable_seq",
        "Highest contiguous durable journal sequence.",
        None,
        st.durable_seq,
    )?;
    gauge(
        e,
        "ferry_journal_first_seq",
        "Oldest journal sequence still held (not released).",
        None,
        j.first_seq,
    )?;
    gauge(
        e,
        "ferry_journal_checkpoint_seq",
        "Sequence of the last checkpoint (bases fsynced up to it).",
        None,
        st.checkpoint_seq,
    )
}

/// The apply position of the volumes (base volumes on a primary, replicas on a
/// standby), and its lag behind the durable journal of the same snapshot.
fn encode_apply(e: &mut DescriptorEncoder, st: &NodeStatus) -> std::fmt::Result {
    let applied: Seq = st.applied_seq;
    gauge(
        e,
        "ferry_apply_applied_seq",
        "Highest contiguous sequence applied to the volumes.",
        None,
        applied,
    )?;
    gauge(
        e,
        "ferry_apply_lag_records",
        "Journal records durable but not yet applied to the volumes (durable - applied).",
        None,
        st.durable_seq.saturating_sub(applied),
    )
}

/// The role's own series: write path and targets on a primary, receive and apply
/// state on a standby.
fn encode_role(
    e: &mut DescriptorEncoder,
    st: &NodeStatus,
    frontend: Option<&Frontend>,
) -> std::fmt::Result {
    match &st.role {
        RoleStatus::Primary(p) => {
            gauge(
                e,
                "ferry_apply_failed",
                "1 once a base write failed (the group refuses writes until restart).",
                None,
                p.failed as i64,
            )?;
            gauge(
                e,
                "ferry_journal_last_seq",
                "Last sequence assigned by the journal.",
                None,
                st.last_seq,
            )?;
            if let Some(f) = frontend {
                f.encode(e)?;
            }
            // Targets exist only with replication configured: without, no families.
            if !st.targets.is_empty() {
                encode_targets(e, &st.targets)?;
            }
            if !p.archives.is_empty() {
                encode_archives(e, &p.archives)?;
            }
            Ok(())
        }
        RoleStatus::Standby(s) => {
            encode_pit(e, s)?;
            encode_standby(e, s)
        }
    }
}

/// One archive gauge family: name, help, unit, value.
type ArchiveFamily<'a> = (
    &'a str,
    &'a str,
    Option<&'a Unit>,
    fn(&ArchiveStatus) -> f64,
);

/// The archive targets (cold tier), one series per target.
fn encode_archives(e: &mut DescriptorEncoder, archives: &[ArchiveStatus]) -> std::fmt::Result {
    let families: [ArchiveFamily; 8] = [
        (
            "ferry_archive_archived_seq",
            "Newest write-set boundary the archive holds durably.",
            None,
            |a| a.archived_seq as f64,
        ),
        (
            "ferry_archive_uploaded",
            "Bytes this primary uploaded to the archive since it started (packs, bases).",
            Some(&Unit::Bytes),
            |a| a.bytes_uploaded as f64,
        ),
        (
            "ferry_archive_lag",
            "Age of the newest archived write-set while the archive is behind (0: current).",
            Some(&Unit::Seconds),
            |a| a.lag_seconds,
        ),
        (
            "ferry_archive_stopped",
            "1 once the target stopped (a newer primary archives there, or the archive refused this one).",
            None,
            |a| (a.state == "stopped") as i64 as f64,
        ),
        (
            "ferry_archive_stored",
            "Bytes of the packs and base indexes the archive's newest manifest names (base chunks not counted).",
            Some(&Unit::Bytes),
            |a| a.stored_bytes as f64,
        ),
        (
            "ferry_archive_compression_ratio",
            "Write-set bytes per stored byte in the packs this primary uploaded (0 before the first).",
            None,
            |a| a.compression_ratio.unwrap_or(0.0),
        ),
        (
            "ferry_archive_oldest_point_timestamp",
            "Time of the oldest point a restore can reach, the archive's oldest base (0: none).",
            Some(&Unit::Seconds),
            |a| a.oldest_point.as_ref().map_or(0.0, |p| p.timestamp_ns as f64 / 1e9),
        ),
        (
            "ferry_archive_last_upload_timestamp",
            "When this primary last uploaded a pack or a base (0: not since it started).",
            Some(&Unit::Seconds),
            |a| {
                a.last_upload
                    .as_deref()
                    .and_then(|t| parse_rfc3339(t).ok())
                    .map_or(0.0, |ns| ns as f64 / 1e9)
            },
        ),
    ];
    for (name, help, unit, v) in families {
        let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for a in archives {
            let labels: &[(&str, &str)] = &[("target", a.name.as_str())];
            ConstGauge::new(v(a)).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// The point-in-time window, when `[pit]` is on.
fn encode_pit(e: &mut DescriptorEncoder, s: &StandbyStatus) -> std::fmt::Result {
    let Some(w) = &s.pit.window else {
        return Ok(());
    };
    let oldest_ns = w.oldest.as_ref().map_or(0, |p| p.timestamp_ns);
    let newest_ns = w.newest.as_ref().map_or(0, |p| p.timestamp_ns);
    gauge(
        e,
        "ferry_pit_points",
        "Recovery points retained in the undo log.",
        None,
        w.points,
    )?;
    gauge(
        e,
        "ferry_pit_oldest_timestamp",
        "Primary clock time (Unix seconds) of the oldest retained point; 0 with none.",
        Some(&Unit::Seconds),
        oldest_ns as f64 / 1e9,
    )?;
    gauge(
        e,
        "ferry_pit_window",
        "Time between the oldest and the newest retained point.",
        Some(&Unit::Seconds),
        newest_ns.saturating_sub(oldest_ns) as f64 / 1e9,
    )?;
    gauge(
        e,
        "ferry_undo_used",
        "Bytes of undo log on disk.",
        Some(&Unit::Bytes),
        w.used_bytes,
    )?;
    gauge(
        e,
        "ferry_undo_capacity",
        "Undo log size limit (pit.max_bytes).",
        Some(&Unit::Bytes),
        w.max_bytes,
    )?;
    gauge(
        e,
        "ferry_pit_views",
        "Point-in-time views currently open.",
        None,
        w.open_views.len() as u64,
    )
}

/// The standby's session with its primary and its apply time.
fn encode_standby(e: &mut DescriptorEncoder, s: &StandbyStatus) -> std::fmt::Result {
    gauge(
        e,
        "ferry_standby_connected",
        "1 while the primary has a session with this standby.",
        None,
        s.primary.connected.is_some() as i64,
    )?;
    gauge(
        e,
        "ferry_standby_primary_seq",
        "Latest sequence the primary reported having.",
        None,
        s.primary.last_seq,
    )?;
    gauge(
        e,
        "ferry_standby_applied_primary_timestamp",
        "Primary clock time (Unix seconds) of the newest applied write-set; 0 before the first.",
        Some(&Unit::Seconds),
        s.applied_primary_time_ns as f64 / 1e9,
    )
}

/// The replication targets' series: positions and lag, then states and modes, then
/// the dirty-region tracking.
fn encode_targets(e: &mut DescriptorEncoder, targets: &[TargetStatus]) -> std::fmt::Result {
    encode_target_positions(e, targets)?;
    encode_target_states(e, targets)?;
    encode_target_tracking(e, targets)?;
    encode_target_wire(e, targets)
}

/// What the data frames to each target cost on the wire: bytes written (as plain
/// frames) against bytes sent, their ratio, and the time the bandwidth cap held
/// frames back.
fn encode_target_wire(e: &mut DescriptorEncoder, targets: &[TargetStatus]) -> std::fmt::Result {
    type Family = (
        &'static str,
        &'static str,
        Option<Unit>,
        fn(&TargetStatus) -> f64,
    );
    let counters: [Family; 4] = [
        (
            "ferry_replication_payload",
            "Bytes of the write-sets and resync data shipped to the target, as plain frames (what was written), since start.",
            Some(Unit::Bytes),
            |t| t.wire.payload_bytes as f64,
        ),
        (
            "ferry_replication_wire",
            "Bytes put on the wire for them (after compression and zero blocks sent as lengths) since start.",
            Some(Unit::Bytes),
            |t| t.wire.wire_bytes as f64,
        ),
        (
            "ferry_replication_zero",
            "Bytes of all-zero writes that travelled as their length only, since start.",
            Some(Unit::Bytes),
            |t| t.wire.zero_bytes as f64,
        ),
        (
            "ferry_replication_throttled",
            "Time the target's frames waited for its max_bandwidth cap, since start.",
            Some(Unit::Seconds),
            |t| t.wire.throttled_seconds,
        ),
    ];
    for (name, help, unit, v) in counters {
        let mut m = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for t in targets {
            let labels: &[(&str, &str)] = &[("target", t.name.as_str())];
            ConstCounter::new(v(t)).encode(m.encode_family(&labels)?)?;
        }
    }
    per_target(
        e,
        targets,
        "ferry_replication_compression_ratio",
        "Payload bytes per wire byte for the target (1: nothing saved; 0 before the first frame).",
        None,
        |t| t.wire.ratio.unwrap_or(0.0),
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_compression_level",
        "The zstd level the target's next compressed frame gets (0: not compressing).",
        None,
        |t| i64::from(t.wire.level),
    )
}

fn encode_target_positions(
    e: &mut DescriptorEncoder,
    targets: &[TargetStatus],
) -> std::fmt::Result {
    per_target(
        e,
        targets,
        "ferry_replication_lag",
        "Age of the oldest journal record the target does not hold durably (RPO); 0 when caught up.",
        Some(&Unit::Seconds),
        |t| t.lag_seconds,
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_lag",
        "Record bytes the target does not hold durably yet (a lower bound when far behind).",
        Some(&Unit::Bytes),
        |t| t.lag_bytes,
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_acked_seq",
        "Highest sequence the target holds durably.",
        None,
        |t| t.acked_seq,
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_applied_seq",
        "Highest sequence the target has applied to its replica volumes.",
        None,
        |t| t.applied_seq,
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_rtt",
        "Round-trip time of the target's connection.",
        Some(&Unit::Seconds),
        |t| t.rtt_us as f64 / 1e6,
    )
}

fn encode_target_states(e: &mut DescriptorEncoder, targets: &[TargetStatus]) -> std::fmt::Result {
    one_hot(
        e,
        targets,
        (
            "ferry_replication_target_state",
            "1 for the shipper's current state of the target, 0 for the others.",
        ),
        "state",
        &TARGET_STATES,
        |t| t.state.as_str(),
    )?;
    one_hot(
        e,
        targets,
        (
            "ferry_replication_target_mode",
            "1 for the target's effective mode (sync, async, or degraded: a sync target that missed sync_timeout_ms), 0 for the others.",
        ),
        "mode",
        &TARGET_MODES,
        |t| t.effective_mode.metric_str(),
    )
}

fn encode_target_tracking(e: &mut DescriptorEncoder, targets: &[TargetStatus]) -> std::fmt::Result {
    one_hot(
        e,
        targets,
        (
            "ferry_replication_target_tracking",
            "1 for how the journal tracks the target (streaming: it holds the journal; bitmap: its \
             writes are marked in a dirty-region map because it fell too far behind; resyncing: \
             its dirty regions are being copied), 0 for the others.",
        ),
        "mode",
        &crate::ship::target::MODES,
        |t| t.track.tracking.as_str(),
    )?;
    per_target(
        e,
        targets,
        "ferry_replication_dirty",
        "Bytes of the target's dirty regions (bitmap mode): what its next resync copies.",
        Some(&Unit::Bytes),
        |t| t.track.dirty_bytes,
    )?;
    let mut m = e.encode_descriptor(
        "ferry_replication_resync",
        "Bytes shipped to the target by bitmap resyncs (data and zero ranges) since start.",
        Some(&Unit::Bytes),
        MetricType::Counter,
    )?;
    for t in targets {
        let labels: &[(&str, &str)] = &[("target", t.name.as_str())];
        ConstCounter::new(t.track.resync_bytes).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// HTTP endpoint

/// A running metrics endpoint. Dropping it stops the server.
pub struct Endpoint {
    /// The bound address (the real port when the config said 0).
    pub addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

/// Binds `[metrics] listen` (when configured) and serves it until the returned
/// [`Endpoint`] is dropped. `Ok(None)` when the config has no `[metrics]` section.
pub async fn start(cfg: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Option<Endpoint>> {
    let Some(m) = &cfg.metrics else {
        return Ok(None);
    };
    Ok(Some(Endpoint::serve(bind(&m.listen).await?, metrics)?))
}

/// Binds a metrics listener at `listen` (`[metrics] listen`).
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let addr = ferry_api::config::parse_addr(listen).map_err(anyhow::Error::msg)?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics listener {addr} ([metrics] listen)"))
}

impl Endpoint {
    /// Serves `listener` until the endpoint is dropped.
    pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<Endpoint> {
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(serve(listener, metrics, stop_rx));
        tracing::info!("serving metrics on http://{addr}/metrics (also /healthz, /readyz)");
        Ok(Endpoint {
            addr,
            _stop: stop_tx,
        })
    }
}

/// The node's metrics endpoint, which a reload may move: the new listener is bound
/// first ([`bind`]; a failure leaves the old one serving), then [`EndpointSlot::switch`]
/// serves it and stops the old one.
pub struct EndpointSlot {
    metrics: Arc<Metrics>,
    endpoint: parking_lot::Mutex<Option<Endpoint>>,
}

impl EndpointSlot {
    pub fn new(metrics: Arc<Metrics>, endpoint: Option<Endpoint>) -> Arc<EndpointSlot> {
        Arc::new(EndpointSlot {
            metrics,
            endpoint: parking_lot::Mutex::new(endpoint),
        })
    }

    /// Where the endpoint listens now, if it runs.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.endpoint.lock().as_ref().map(|e| e.addr)
    }

    /// Serves `listener` (bound by [`bind`]) instead of the current endpoint, or no
    /// endpoint at all (`None`: `[metrics]` was removed). The old listener closes as
    /// its accept loop sees the stop; connections it accepted finish their answer.
    pub fn switch(&self, listener: Option<TcpListener>) -> anyhow::Result<Option<SocketAddr>> {
        let new = listener
            .map(|l| Endpoint::serve(l, self.metrics.clone()))
            .transpose()?;
        let addr = new.as_ref().map(|e| e.addr);
        let old = std::mem::replace(&mut *self.endpoint.lock(), new);
        drop(old);
        Ok(addr)
    }
}

/// Accepts connections until `stop` turns true or its sender is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let admission = Admission::new(MAX_CONNECTIONS);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok((slot, _)) = admission.admit_waiting(EVICTION_WAIT).await else {
            tracing::debug!(%peer, "metrics endpoint: every connection is being answered; closing");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            handle(sock, &metrics, &slot).await;
        });
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

enum Head {
    /// The request head (without the blank line).
    Complete(Vec<u8>),
    TooLarge,
    /// The peer closed before sending anything.
    Empty,
    Truncated,
}

async fn read_head(sock: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                Head::Empty
            } else {
                Head::Truncated
            });
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf[scan_from..]) {
            buf.truncate(scan_from + end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// Offset of the blank line ending a request head (`\r\n\r\n`, or a bare `\n\n`).
fn find_head_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find(|&i| b[i..].starts_with(b"\r\n\r\n") || b[i..].starts_with(b"\n\n"))
}

/// Routes a request head. Pure, so it is unit-tested with arbitrary input.
fn route(head: &[u8], metrics: &Metrics) -> Response {
    let Ok(text) = std::str::from_utf8(head) else {
        return Response::text(400, "bad request: not UTF-8");
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request line");
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Response::text(400, "bad request line");
    }
    if method != "GET" {
        return Response::text(405, "only GET is supported");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: metrics.render(),
        },
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if metrics.ready() => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "not ready"),
        _ => Response::text(404, "not found: try /metrics, /healthz or /readyz"),
    }
}

async fn handle(mut sock: TcpStream, metrics: &Metrics, slot: &Slot) {
    let head = tokio::select! {
        h = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)) => h,
        // Displaced by a newer connection while still waiting for its head.
        _ = slot.evicted() => return,
    };
    if !slot.busy() {
        return;
    }
    let resp = match head {
        Err(_) => Response::text(408, "request timeout"),
        Ok(Err(_)) | Ok(Ok(Head::Empty)) => return,
        Ok(Ok(Head::TooLarge)) => Response::text(431, "request head too large"),
        Ok(Ok(Head::Truncated)) => Response::text(400, "incomplete request"),
        Ok(Ok(Head::Complete(head))) => route(&head, metrics),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if resp.status == 405 {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&resp.body);
    let write = async {
        sock.write_all(out.as_bytes()).await?;
        sock.shutdown().await?;
        // Read what the client still sends (bounded) before closing: closing with
        // unread input makes the kernel send a reset, which can destroy the response
        // before the client has read it.
        let mut sink = [0u8; 4096];
        let mut left = 1usize << 20;
        while left > 0 {
            match sock.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        Ok::<(), std::io::Error>(())
    };
    if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!("metrics endpoint: writing a response: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str) -> u16 {
        let m = Metrics::new("n", Role::Primary);
        route(head.as_bytes(), &m).status
    }

    /// Issue 17: a flood of idle connections (more than the cap, none sending its
    /// request) never locks a scrape out.
    #[test]
    fn idle_connections_never_block_a_scrape() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let m = Metrics::new("n", Role::Primary);
        let thread = std::thread::spawn(move || rt.block_on(serve(listener, m, stop_rx)));
        let flood: Vec<_> = (0..4 * MAX_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let t = std::time::Instant::now();
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(t.elapsed() < REQUEST_TIMEOUT, "{:?}", t.elapsed());
        drop(flood);
        drop(_stop);
        thread.join().unwrap();
    }

    #[test]
    fn routes() {
        assert_eq!(status("GET /healthz HTTP/1.1\r\nHost: x"), 200);
        assert_eq!(status("GET /readyz HTTP/1.1"), 503);
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0"), 200);
        assert_eq!(status("GET /nope HTTP/1.1"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1"), 405);
        assert_eq!(status("GET  /metrics HTTP/1.1"), 400);
        assert_eq!(status("get /metrics HTTP/1.1"), 400);
        assert_eq!(status("GET metrics HTTP/1.1"), 400);
        assert_eq!(status("GET /metrics SPDY/3"), 400);
        assert_eq!(status(""), 400);
        assert_eq!(
            route(b"\xff\xfe /x", &Metrics::new("n", Role::Standby)).status,
            400
        );
    }

    #[test]
    fn head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn render_before_recovery_is_valid() {
        let m = Metrics::new("n", Role::Primary);
        let text = m.render();
        assert!(text.contains("ferry_node_ready 0"), "{text}");
        assert!(
            text.contains("ferry_node_role_info{node=\"n\",role=\"primary\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        m.set_ready(true);
        assert!(m.render().contains("ferry_node_ready 1"));
    }

    #[test]
    fn target_series_read_live_state() {
        use crate::ship::Replication;
        use ferry_journal::now_ns;
        let cfg = Config::parse(
            r#"
[node]
name = "primary"
role = "primary"
cluster_id = "00112233445566778899aabbccddeeff"
metadata_dir = "p"
[journal]
dir = "p/j"
size = "64MiB"
[control]
socket = "p/s"
[replication]
listen = "127.0.0.1:7000"
primary = "primary"
[[replication.target]]
name = "dr1"
address = "127.0.0.1:7001"
mode = "sync"
[[replication.target]]
name = "dr2"
address = "127.0.0.1:7002"
"#,
        )
        .unwrap();
        let targets = crate::ship::target_states(&cfg, 5, |_| false);
        let r = Replication::new(
            targets.clone(),
            crate::ship::SyncGate::new(targets.clone(), Duration::from_secs(1), None),
            Arc::new(crate::ship::SeqIndex::default()),
        );
        let then = now_ns() - 2_000_000_000;
        for seq in 1..=10 {
            r.index.push(seq, 4096, then);
        }
        targets[1].streaming_at(10);
        // dr1 (sync, at 5) misses the timeout of a write at 6.
        assert!(targets[0].sync_timeout(6, crate::ship::target::GatePosition::Durable));
        struct R(Replication);
        impl std::fmt::Debug for R {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("R")
            }
        }
        impl Collector for R {
            fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
                // The targets' rows of the status snapshot, as the collector renders them.
                encode_targets(&mut e, &self.0.status())
            }
        }
        let mut reg = Registry::default();
        reg.register_collector(Box::new(R(r)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        let has = |s: &str| assert!(out.contains(s), "missing {s}:\n{out}");
        has("ferry_replication_lag_bytes{target=\"dr1\"} 20480\n");
        has("ferry_replication_lag_bytes{target=\"dr2\"} 0\n");
        has("ferry_replication_lag_seconds{target=\"dr2\"} 0.0\n");
        has("ferry_replication_acked_seq{target=\"dr1\"} 5\n");
        has("ferry_replication_target_state{target=\"dr1\",state=\"connecting\"} 1\n");
        has("ferry_replication_target_state{target=\"dr1\",state=\"streaming\"} 0\n");
        has("ferry_replication_target_mode{target=\"dr1\",mode=\"degraded\"} 1\n");
        has("ferry_replication_target_mode{target=\"dr1\",mode=\"sync\"} 0\n");
        has("ferry_replication_target_mode{target=\"dr2\",mode=\"async\"} 1\n");
        has("ferry_replication_target_tracking{target=\"dr1\",mode=\"streaming\"} 1\n");
        has("ferry_replication_target_tracking{target=\"dr1\",mode=\"bitmap\"} 0\n");
        has("ferry_replication_dirty_bytes{target=\"dr2\"} 0\n");
        has("ferry_replication_resync_bytes_total{target=\"dr1\"} 0\n");
        // WAN: nothing shipped yet.
        has("ferry_replication_payload_bytes_total{target=\"dr1\"} 0");
        has("ferry_replication_wire_bytes_total{target=\"dr2\"} 0");
        has("ferry_replication_zero_bytes_total{target=\"dr1\"} 0");
        has("ferry_replication_throttled_seconds_total{target=\"dr1\"} 0");
        has("ferry_replication_compression_ratio{target=\"dr1\"} 0");
        has("ferry_replication_compression_level{target=\"dr1\"} 0\n");
        let lag: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("ferry_replication_lag_seconds{target=\"dr1\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((1.9..60.0).contains(&lag), "{lag}");
    }
}
