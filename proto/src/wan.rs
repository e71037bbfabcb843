//! WAN efficiency of one replication target, as pure decisions (no IO, no clock:
//! times are arguments): which data frames travel packed and how hard they are
//! compressed ([`Packer`]), and when the bytes may go on the wire ([`TokenBucket`]).
//!
//! **Packing** (only to a peer that negotiated V3; `crate::packed` has the layout):
//! * A write record whose data are all zeros travels as its length (always: it only
//!   saves bytes).
//! * With compression on, the frame's body is compressed with zstd. It goes
//!   compressed only if that saves at least 1/[`MIN_SAVING_DIVISOR`] of it; otherwise
//!   it goes raw and the failure is remembered: after `k` incompressible frames in a
//!   row the next `min(2^k, MAX_SKIP)` frames are not tried at all, so a stream of
//!   random data costs one compression attempt per [`MAX_SKIP`] + 1 frames.
//! * A frame with nothing to gain (no zero record, not compressed) goes as the plain
//!   V1 frame, which the sender emits without copying its data.
//!
//! **Adaptive level.** The level starts at [`MIN_LEVEL`] (zstd 1: cheap). Every
//! [`LEVEL_WINDOW`] compressed frames the caller's measurements decide: if the frames
//! waited for the link (token bucket and transport) more than twice as long as they
//! took to pack, the link is the bottleneck and CPU is spare — one level up (at most
//! [`MAX_LEVEL`]); if packing took more than twice as long as the link wait, the CPU
//! is the bottleneck — one level down. It settles where both are about equal.
//!
//! **Bandwidth cap.** A token bucket over the bytes put on the wire: a frame takes
//! its length at once (the bucket may go into debt) and waits until the debt is paid,
//! so by any time `t` the bytes released since the start are at most
//! `rate × t + burst`. Two classes share it: live replication, and bulk traffic
//! (resync copies, initial sync, catching up from journal segments). Bulk waits until
//! the bucket would still hold [`Class::Bulk`]'s reserve (a quarter of the burst)
//! after it, so a live frame due meanwhile finds tokens at once instead of queuing
//! behind a bulk backlog: bulk yields to live, and both stay under the cap.

use std::time::Duration;

use bytes::Bytes;

use crate::packed::{self, Packed};
use crate::wire::{EncodeError, Frame, HEADER_LEN};

/// zstd level a target starts at (and never goes below).
pub const MIN_LEVEL: i32 = 1;
/// Highest level the adaptive rule reaches (beyond it zstd gets much slower for
/// little gain on block data).
pub const MAX_LEVEL: i32 = 9;
/// Compressed frames between two level decisions.
pub const LEVEL_WINDOW: u32 = 16;
/// A body goes compressed only if zstd saves at least 1/16 of it.
pub const MIN_SAVING_DIVISOR: usize = 16;
/// Most frames sent raw without a try after incompressible ones.
pub const MAX_SKIP: u32 = 64;

/// What [`Packer::pack`] made of a frame.
#[derive(Debug)]
pub struct PackOut {
    /// The frame to send: the plain frame or a [`Frame::Packed`].
    pub frame: Frame,
    /// Bytes the plain frame takes on the wire (what was written, in effect).
    pub plain_len: usize,
    /// Bytes `frame` takes on the wire.
    pub wire_len: usize,
    /// zstd ran on this frame (whether or not its result was kept).
    pub zstd_tried: bool,
    /// The frame travels zstd-compressed.
    pub compressed: bool,
    /// Write records that travel as their length only.
    pub zero_records: usize,
}

/// One target's packing policy (see the module docs).
#[derive(Debug)]
pub struct Packer {
    compress: bool,
    level: i32,
    /// Incompressible frames in a row.
    fails: u32,
    /// Frames still to send without trying zstd.
    skip: u32,
    window: Window,
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    frames: u32,
    pack_ns: u64,
    wait_ns: u64,
}

impl Packer {
    /// `compress`: the target's `compress = "zstd"` (zero records are elided either way).
    pub fn new(compress: bool) -> Packer {
        Packer {
            compress,
            level: MIN_LEVEL,
            fails: 0,
            skip: 0,
            window: Window::default(),
        }
    }

    /// The zstd level the next compressed frame gets.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Packs a data frame (WriteSet or ResyncData; any other frame is returned as it
    /// is) for a peer that speaks V3.
    pub fn pack(&mut self, frame: Frame) -> Result<PackOut, EncodeError> {
        let plain_len = match &frame {
            Frame::WriteSet(ws) => ws.encoded_len(),
            Frame::ResyncData(d) => HEADER_LEN + d.payload_len(),
            _ => return Ok(plain(frame, 0)),
        };
        let try_zstd = self.compress && self.skip == 0;
        self.skip = self.skip.saturating_sub(1);
        let zeros = match &frame {
            Frame::WriteSet(ws) => ws
                .records
                .iter()
                .filter(|r| packed::is_zero_write(r))
                .count(),
            _ => 0,
        };
        if !try_zstd && zeros == 0 {
            return Ok(plain(frame, plain_len));
        }
        let (raw, zero_records) = packed::raw_body(&frame)?;
        let mut zstd = None;
        if try_zstd {
            let z = packed::compress(&raw, self.level)?;
            if z.len() + raw.len() / MIN_SAVING_DIVISOR <= raw.len() {
                self.fails = 0;
                zstd = Some(z);
            } else {
                self.fails = self.fails.saturating_add(1);
                self.skip = 1u32
                    .checked_shl(self.fails)
                    .unwrap_or(MAX_SKIP)
                    .min(MAX_SKIP);
            }
        }
        let compressed = zstd.is_some();
        if !compressed && zero_records == 0 {
            let mut out = plain(frame, plain_len);
            out.zstd_tried = try_zstd;
            return Ok(out);
        }
        let p = Packed::assemble(frame, Bytes::from(raw), zstd)?;
        Ok(PackOut {
            wire_len: p.encoded_len(),
            frame: Frame::Packed(p),
            plain_len,
            zstd_tried: try_zstd,
            compressed,
            zero_records,
        })
    }

    /// After a frame went out: how long packing it took and how long it then waited
    /// for the link (bucket and transport). Only frames zstd ran on count; every
    /// [`LEVEL_WINDOW`] of them may move the level by one (module docs).
    pub fn observe(&mut self, zstd_tried: bool, pack_ns: u64, link_wait_ns: u64) {
        if !zstd_tried {
            return;
        }
        let w = &mut self.window;
        w.frames += 1;
        w.pack_ns = w.pack_ns.saturating_add(pack_ns);
        w.wait_ns = w.wait_ns.saturating_add(link_wait_ns);
        if w.frames < LEVEL_WINDOW {
            return;
        }
        let Window {
            pack_ns, wait_ns, ..
        } = std::mem::take(w);
        if wait_ns > pack_ns.saturating_mul(2) {
            self.level = (self.level + 1).min(MAX_LEVEL);
        } else if pack_ns > wait_ns.saturating_mul(2) {
            self.level = (self.level - 1).max(MIN_LEVEL);
        }
    }
}

fn plain(frame: Frame, plain_len: usize) -> PackOut {
    PackOut {
        frame,
        plain_len,
        wire_len: plain_len,
        zstd_tried: false,
        compressed: false,
        zero_records: 0,
    }
}

/// Whose bytes a frame carries (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Live replication: write-sets of a target that is caught up.
    Live,
    /// Resync and initial-sync copies, and write-sets read back from journal segments
    /// while a target catches up: they yield to live traffic.
    Bulk,
}

/// Smallest burst of a bucket: a few frames' worth of small writes.
pub const MIN_BURST: u64 = 256 << 10;

/// A token bucket over wire bytes (module docs). Times are nanoseconds on any
/// monotonic clock the caller keeps.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket of `rate` bytes per second (> 0) holding at most `burst` bytes
    /// (at least [`MIN_BURST`]).
    pub fn new(rate_bytes_per_s: u64, burst: u64, now_ns: u64) -> TokenBucket {
        let burst = burst.max(MIN_BURST) as f64;
        TokenBucket {
            rate: rate_bytes_per_s.max(1) as f64,
            burst,
            tokens: burst,
            last_ns: now_ns,
        }
    }

    /// The default burst for a rate: a tenth of a second of it (at least [`MIN_BURST`]).
    pub fn default_burst(rate_bytes_per_s: u64) -> u64 {
        (rate_bytes_per_s / 10).max(MIN_BURST)
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    fn refill(&mut self, now_ns: u64) {
        // A clock that went backwards adds nothing (and does not move `last_ns` back).
        let dt = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        self.tokens = (self.tokens + self.rate * dt as f64 / 1e9).min(self.burst);
    }

    /// Takes `bytes` for a frame of `class` at `now_ns`; returns how long the frame
    /// must wait before it goes on the wire (zero: now).
    pub fn take(&mut self, now_ns: u64, bytes: usize, class: Class) -> Duration {
        self.refill(now_ns);
        self.tokens -= bytes as f64;
        let floor = match class {
            Class::Live => 0.0,
            Class::Bulk => self.burst / 4.0,
        };
        if self.tokens >= floor {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((floor - self.tokens) / self.rate)
    }

    /// Tokens now (negative: debt still to be paid by waiting frames).
    pub fn tokens(&mut self, now_ns: u64) -> f64 {
        self.refill(now_ns);
        self.tokens
    }
}
