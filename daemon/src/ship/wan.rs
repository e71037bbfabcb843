//! One target's WAN efficiency on the primary: its packer (zstd at an adaptive level,
//! zero-filled writes as their length: `ferry_proto::wan::Packer`), its bandwidth cap
//! (`ferry_proto::wan::TokenBucket`) and the counters status and /metrics show (bytes
//! written against bytes on the wire). The decisions are the pure code's; this module
//! gives them the clock and the counters, and the sessions (`ship::session` for
//! write-sets, `ship::catchup` for resync copies) send what [`Wan::prepare`] returns
//! once its release time has come.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_api::config::{Compress, TargetWan};
use ferry_api::status::WireStatus;
use ferry_proto::session::Negotiated;
use ferry_proto::wan::{Class, Packer, TokenBucket};
use ferry_proto::wire::Frame;
use parking_lot::Mutex;

/// A data frame ready for the wire: send `frame` at `release_at`, then report it with
/// [`Wan::sent`].
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) frame: Frame,
    pub(crate) release_at: Instant,
    prepared_at: Instant,
    pack_ns: u64,
    zstd_tried: bool,
    compressed: bool,
    plain_len: usize,
    wire_len: usize,
    zero_bytes: u64,
}

/// Frames of at most this many plain bytes are packed where they are (see
/// [`Wan::packs_inline`]) when compression is off: packing is then a zero scan that
/// stops at a record's first non-zero byte, or a copy of a few all-zero pages.
const PACK_INLINE_MAX: usize = 64 << 10;
/// The same with zstd on: 16 KiB take ≈ 30 µs at level 1 (≈ 250 µs at level 9, a
/// level the packer reaches only while the link, not the CPU, is the bottleneck).
const PACK_INLINE_MAX_ZSTD: usize = 16 << 10;

/// One target's WAN state (see the module docs).
#[derive(Debug)]
pub struct Wan {
    compress: Compress,
    max_bandwidth: Option<u64>,
    packer: Mutex<Packer>,
    bucket: Mutex<Option<TokenBucket>>,
    /// The bucket's clock origin.
    origin: Instant,
    /// The current session's peer reads Packed frames (protocol V3).
    peer_packed: AtomicBool,
    /// A session was negotiated at least once (so status can say why nothing is packed).
    negotiated: AtomicBool,
    payload_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    compressed_frames: AtomicU64,
    zero_bytes: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Wan {
    pub fn new(cfg: &TargetWan) -> Wan {
        let origin = Instant::now();
        Wan {
            compress: cfg.compress,
            max_bandwidth: cfg.max_bandwidth,
            packer: Mutex::new(Packer::new(cfg.compress == Compress::Zstd)),
            bucket: Mutex::new(
                cfg.max_bandwidth
                    .map(|r| TokenBucket::new(r, TokenBucket::default_burst(r), 0)),
            ),
            origin,
            peer_packed: AtomicBool::new(false),
            negotiated: AtomicBool::new(false),
            payload_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            compressed_frames: AtomicU64::new(0),
            zero_bytes: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        }
    }

    /// A session was negotiated: packed frames go only to a peer of protocol V3 (an
    /// older standby gets the plain frames, and the log says why nothing is compressed).
    pub(crate) fn session_started(&self, target: &str, negotiated: Negotiated) {
        let packed = negotiated.has_packed();
        self.peer_packed.store(packed, Ordering::Relaxed);
        self.negotiated.store(true, Ordering::Relaxed);
        if !packed && self.compress == Compress::Zstd {
            tracing::warn!(
                target = %target,
                version = negotiated.version,
                "compress = \"zstd\" is configured but the standby speaks protocol V{} \
                 (compression needs V3): shipping uncompressed",
                negotiated.version
            );
        }
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Whether [`prepare`](Self::prepare) of `frame` is cheap enough to run on the
    /// runtime's thread. A larger frame goes through `block_in_place`, which hands
    /// the worker to another thread and back (thread wake-ups and context switches,
    /// tens of µs on two cores): for the small write-sets of low queue depths that
    /// hand-off cost more than the packing, once per write.
    pub(crate) fn packs_inline(&self, frame: &Frame) -> bool {
        let max = if self.compress == Compress::Zstd && self.peer_packed.load(Ordering::Relaxed) {
            PACK_INLINE_MAX_ZSTD
        } else {
            PACK_INLINE_MAX
        };
        plain_len(frame) <= max
    }

    /// Packs a data frame (to a V3 peer) and takes its wire bytes from the bucket.
    /// Blocking for a large frame (compression, copies): call it where the runtime
    /// allows that, or where [`packs_inline`](Self::packs_inline) says it is cheap.
    pub(crate) fn prepare(&self, frame: Frame, class: Class) -> anyhow::Result<Outgoing> {
        let t0 = Instant::now();
        let zero_bytes = zero_bytes(&frame);
        let out = if self.peer_packed.load(Ordering::Relaxed) {
            self.packer
                .lock()
                .pack(frame)
                .context("packing a data frame")?
        } else {
            ferry_proto::wan::PackOut {
                plain_len: plain_len(&frame),
                wire_len: plain_len(&frame),
                frame,
                zstd_tried: false,
                compressed: false,
                zero_records: 0,
            }
        };
        let prepared_at = Instant::now();
        let wait = match self.bucket.lock().as_mut() {
            Some(b) => b.take(self.now_ns(), out.wire_len, class),
            None => Duration::ZERO,
        };
        Ok(Outgoing {
            zero_bytes: if out.zero_records > 0 { zero_bytes } else { 0 },
            frame: out.frame,
            release_at: prepared_at + wait,
            prepared_at,
            pack_ns: (prepared_at - t0).as_nanos() as u64,
            zstd_tried: out.zstd_tried,
            compressed: out.compressed,
            plain_len: out.plain_len,
            wire_len: out.wire_len,
        })
    }

    /// `o` is on the wire: counts it, and lets the packer weigh how long it waited for
    /// the link (cap and transport) against how long packing took.
    pub(crate) fn sent(&self, o: &Outgoing) {
        let waited = o.prepared_at.elapsed().as_nanos() as u64;
        let throttled = o.release_at.saturating_duration_since(o.prepared_at);
        self.throttled_ns
            .fetch_add(throttled.as_nanos() as u64, Ordering::Relaxed);
        self.payload_bytes
            .fetch_add(o.plain_len as u64, Ordering::Relaxed);
        self.wire_bytes
            .fetch_add(o.wire_len as u64, Ordering::Relaxed);
        self.zero_bytes.fetch_add(o.zero_bytes, Ordering::Relaxed);
        if o.compressed {
            self.compressed_frames.fetch_add(1, Ordering::Relaxed);
        }
        self.packer.lock().observe(o.zstd_tried, o.pack_ns, waited);
    }

    /// The target's `wire` in status.
    pub fn status(&self) -> WireStatus {
        let compressing = self.compress == Compress::Zstd
            && (self.peer_packed.load(Ordering::Relaxed)
                || !self.negotiated.load(Ordering::Relaxed));
        let compress = match self.compress {
            Compress::Off => "off".to_string(),
            Compress::Zstd if compressing => "zstd".to_string(),
            Compress::Zstd => "off (the standby speaks a protocol older than V3)".to_string(),
        };
        let payload_bytes = self.payload_bytes.load(Ordering::Relaxed);
        let wire_bytes = self.wire_bytes.load(Ordering::Relaxed);
        WireStatus {
            compress,
            level: if compressing {
                self.packer.lock().level()
            } else {
                0
            },
            payload_bytes,
            wire_bytes,
            ratio: (wire_bytes > 0).then(|| payload_bytes as f64 / wire_bytes as f64),
            compressed_frames: self.compressed_frames.load(Ordering::Relaxed),
            zero_bytes: self.zero_bytes.load(Ordering::Relaxed),
            max_bandwidth: self.max_bandwidth,
            throttled_seconds: self.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Completes at `at`, a held frame's release time (`None`: never; the sessions'
/// select branch is disabled then anyway).
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Bytes the frame takes on the wire as it is.
fn plain_len(f: &Frame) -> usize {
    match f {
        Frame::WriteSet(ws) => ws.encoded_len(),
        Frame::ResyncData(d) => ferry_proto::wire::HEADER_LEN + d.payload_len(),
        Frame::Packed(p) => p.encoded_len(),
        _ => 0,
    }
}

/// Bytes of the frame's all-zero writes (what travels as lengths when packed).
fn zero_bytes(f: &Frame) -> u64 {
    match f {
        Frame::WriteSet(ws) => ws
            .records
            .iter()
            .filter(|r| ferry_proto::packed::is_zero_write(r))
            .map(|r| r.data.len() as u64)
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_proto::wire::{RecordOp, WireRecord, WriteSet};

    fn ws(data: Bytes) -> Frame {
        Frame::WriteSet(WriteSet {
            epoch: 1,
            first_seq: 1,
            last_seq: 1,
            timestamp_ns: 0,
            records: vec![WireRecord {
                seq: 1,
                volume: 0,
                op: RecordOp::Write,
                offset: 0,
                length: data.len() as u32,
                data,
            }],
        })
    }

    /// Small frames are packed in place, large ones off the runtime; with zstd on a
    /// V3 session the bound is lower (compression costs more per byte).
    #[test]
    fn small_frames_pack_inline() {
        let frame = |n: usize| ws(Bytes::from(vec![7u8; n]));
        let off = Wan::new(&TargetWan {
            compress: Compress::Off,
            max_bandwidth: None,
        });
        off.session_started("t", Negotiated { version: 3 });
        assert!(off.packs_inline(&frame(4096)));
        assert!(off.packs_inline(&frame(32 << 10)));
        assert!(!off.packs_inline(&frame(1 << 20)));
        let zstd = Wan::new(&TargetWan {
            compress: Compress::Zstd,
            max_bandwidth: None,
        });
        zstd.session_started("t", Negotiated { version: 3 });
        assert!(zstd.packs_inline(&frame(4096)));
        assert!(!zstd.packs_inline(&frame(32 << 10)));
        // An older peer gets plain frames: nothing is compressed, the larger bound holds.
        zstd.session_started("t", Negotiated { version: 2 });
        assert!(zstd.packs_inline(&frame(32 << 10)));
    }

    /// Status counts bytes written against bytes on the wire, and says when the
    /// standby is too old for compression (then frames go plain).
    #[test]
    fn counters_ratio_and_an_old_peer() {
        let w = Wan::new(&TargetWan {
            compress: Compress::Zstd,
            max_bandwidth: None,
        });
        w.session_started("t", Negotiated { version: 3 });
        let text = Bytes::from("ferry ".repeat(20_000).into_bytes());
        let o = w.prepare(ws(text.clone()), Class::Live).unwrap();
        assert!(matches!(o.frame, Frame::Packed(_)));
        w.sent(&o);
        let st = w.status();
        assert_eq!(st.compress, "zstd");
        assert_eq!(st.level, 1);
        assert_eq!(st.compressed_frames, 1);
        assert!(st.ratio.unwrap() > 10.0, "{st:?}");
        let zeros = w
            .prepare(ws(Bytes::from(vec![0u8; 8192])), Class::Live)
            .unwrap();
        w.sent(&zeros);
        assert_eq!(w.status().zero_bytes, 8192);
        w.session_started("t", Negotiated { version: 2 });
        let o = w.prepare(ws(text), Class::Live).unwrap();
        assert!(
            matches!(o.frame, Frame::WriteSet(_)),
            "a V2 peer gets plain frames"
        );
        let st = w.status();
        assert!(st.compress.starts_with("off (the standby speaks"), "{st:?}");
        assert_eq!(st.level, 0);
    }

    /// With a cap, a frame past the burst is released later, by what the bucket says.
    #[test]
    fn the_cap_delays_the_release() {
        let w = Wan::new(&TargetWan {
            compress: Compress::Off,
            max_bandwidth: Some(1_000_000),
        });
        // The burst is 256 KiB (a tenth of a second of 1 MB/s is less).
        let a = w
            .prepare(ws(Bytes::from(vec![7u8; 200_000])), Class::Live)
            .unwrap();
        assert!(a.release_at <= Instant::now(), "within the burst");
        let b = w
            .prepare(ws(Bytes::from(vec![7u8; 600_000])), Class::Bulk)
            .unwrap();
        let wait = b.release_at - b.prepared_at;
        assert!(wait > Duration::from_millis(500), "{wait:?}");
        w.sent(&b);
        assert!(w.status().throttled_seconds > 0.5);
    }
}
