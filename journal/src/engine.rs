//! IO engines: how the writer thread gets one aligned buffer durably onto disk.
//!
//! The writer stages each round's bytes (optional segment header block, the batch,
//! optional trailing zero block) in one of the engine's own aligned buffers (one per
//! in-flight slot) and asks for one durable write. io_uring can keep several writes
//! in flight (`submit_staged` + `wait_oldest`, results in submission order); std IO
//! is synchronous (one in flight). Why the engine owns the buffer: io_uring can then register it once
//! as a fixed buffer and nobody can free it while the kernel still uses it.
//!
//! * [`UringEngine`]: `io-uring` on the writer thread, `IORING_OP_WRITE(_FIXED)` with
//!   `RWF_DSYNC` (FUA on capable devices); falls back to a linked `fdatasync` if the
//!   kernel rejects `RWF_DSYNC`.
//! * [`StdEngine`]: `pwrite` + `fdatasync`.
//!
//! Both are used with O_DIRECT files where the filesystem allows it.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::ptr::NonNull;

use crate::format::BLOCK_SIZE;

/// One durable-write engine. Lives on (and is only used by) the writer thread.
pub trait IoEngine: Send {
    /// Short name for logs and metrics: "io_uring" or "std".
    fn name(&self) -> &'static str;
    /// Returns the engine's 4 KiB-aligned staging buffer, at least `len` bytes
    /// (contents unspecified: the caller fills every byte it writes).
    fn staging(&mut self, len: usize) -> io::Result<&mut [u8]>;
    /// Writes the first `len` bytes of the staging buffer at `offset` and returns
    /// only once they are durable (or with the error). `len` and `offset` are
    /// multiples of 4 KiB.
    fn write_staged(&mut self, file: &File, len: usize, offset: u64) -> io::Result<()>;

    /// How many writes this engine can have in flight (staging slots
    /// `0..max_inflight()`). 1 (the default): `submit_staged` does the whole
    /// durable write before it returns.
    fn max_inflight(&self) -> usize {
        1
    }
    /// The 4 KiB-aligned staging buffer of `slot`, at least `len` bytes. Never
    /// called for a slot whose write is in flight.
    fn staging_slot(&mut self, slot: usize, len: usize) -> io::Result<&mut [u8]> {
        if slot != 0 {
            return Err(io::Error::other(format!(
                "engine has no staging slot {slot}"
            )));
        }
        self.staging(len)
    }
    /// Starts the durable write of the first `len` bytes of `slot`'s buffer at
    /// `offset`. `Ok`: the write is queued and its result comes from
    /// [`IoEngine::wait_oldest`], in submission order. `Err`: this write failed
    /// (writes submitted earlier are still reported by `wait_oldest`).
    /// Default (synchronous engines): does the whole write now.
    fn submit_staged(
        &mut self,
        slot: usize,
        file: &File,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        if slot != 0 {
            return Err(io::Error::other(format!(
                "engine has no staging slot {slot}"
            )));
        }
        self.write_staged(file, len, offset)
    }
    /// Waits for the oldest submitted write and returns its result (durable or
    /// the error). Results come strictly in submission order, even if the device
    /// completes a later write first. Default: synchronous engines finished the
    /// write in `submit_staged`.
    fn wait_oldest(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Heap buffer aligned to 4 KiB (O_DIRECT needs aligned memory).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// Why: the buffer is plain owned memory; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    pub fn new_zeroed(len: usize) -> AlignedBuf {
        let len = len.max(BLOCK_SIZE).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        // BLOCK_SIZE is a power of two and len > 0, so the layout is valid.
        let layout = Layout::from_size_align(len, BLOCK_SIZE).unwrap_or_else(|_| unreachable!());
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed) at allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, BLOCK_SIZE) {
            // SAFETY: allocated with this exact layout in new_zeroed.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

// ---------------------------------------------------------------- std

/// pwrite + fdatasync.
pub struct StdEngine {
    buf: AlignedBuf,
}

impl StdEngine {
    pub fn new(initial_len: usize) -> StdEngine {
        StdEngine {
            buf: AlignedBuf::new_zeroed(initial_len),
        }
    }
}

impl IoEngine for StdEngine {
    fn name(&self) -> &'static str {
        "std"
    }
    fn staging(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if self.buf.len() < len {
            self.buf = AlignedBuf::new_zeroed(len);
        }
        Ok(&mut self.buf.as_mut_slice()[..len])
    }
    fn write_staged(&mut self, file: &File, len: usize, offset: u64) -> io::Result<()> {
        let data = self
            .buf
            .as_slice()
            .get(..len)
            .ok_or_else(|| io::Error::other("staged length exceeds buffer"))?;
        crate::failpoint::check("journal::std_pwrite")?;
        file.write_all_at(data, offset)?;
        crate::failpoint::check("journal::fdatasync")?;
        file.sync_data()
    }
}

// ---------------------------------------------------------------- io_uring

/// user_data of a CQE: `slot << 1 | kind`.
const UD_WRITE: u64 = 0;
const UD_FSYNC: u64 = 1;
/// Each in-flight write uses at most two SQEs (write + linked fdatasync).
const RING_ENTRIES: u32 = 2 * crate::format::MAX_INFLIGHT_BATCHES;

/// One submitted write (possibly resubmitted in pieces after a short write).
struct InFlight {
    slot: usize,
    /// The writer keeps the file open until the write is reaped.
    fd: RawFd,
    len: usize,
    offset: u64,
    /// Bytes durably written so far.
    done: usize,
    /// Current piece: bytes asked for, and whether it carried RWF_DSYNC.
    piece: u32,
    dsync: bool,
    /// CQEs still expected for the current piece.
    outstanding: u8,
    write_res: Option<i32>,
    fsync_res: Option<i32>,
    /// Final outcome, once known.
    result: Option<io::Result<()>>,
}

/// io_uring engine: up to `max_inflight()` durable writes in flight, one registered
/// staging buffer per slot; results are handed out strictly in submission order.
pub struct UringEngine {
    // Field order matters: the ring is dropped (and the registration released)
    // before the buffers it points at (and `Drop` first reaps in-flight writes).
    ring: io_uring::IoUring,
    bufs: Vec<AlignedBuf>,
    /// The staging buffers are registered as fixed buffers 0..n: saves the per-IO
    /// page pinning of the batch buffers, which are reused for every round.
    registered: bool,
    /// RWF_DSYNC on the write (true) or a linked IORING_OP_FSYNC(DATASYNC).
    use_rwf_dsync: bool,
    /// Submitted writes, oldest first.
    inflight: VecDeque<InFlight>,
}

impl UringEngine {
    /// One write in flight (as before pipelining).
    pub fn new(initial_len: usize) -> io::Result<UringEngine> {
        UringEngine::with_depth(initial_len, 1, true)
    }

    /// `depth` staging slots (1 ..= MAX_INFLIGHT_BATCHES), durability by RWF_DSYNC
    /// (`rwf_dsync`) or by a linked `IORING_OP_FSYNC(DATASYNC)` after each write.
    pub fn with_depth(
        initial_len: usize,
        depth: usize,
        rwf_dsync: bool,
    ) -> io::Result<UringEngine> {
        let depth = depth.clamp(1, crate::format::MAX_INFLIGHT_BATCHES as usize);
        let mut ring = io_uring::IoUring::new(RING_ENTRIES)?;
        nop_roundtrip(&mut ring)?;
        let mut eng = UringEngine {
            ring,
            bufs: (0..depth)
                .map(|_| AlignedBuf::new_zeroed(initial_len))
                .collect(),
            registered: false,
            use_rwf_dsync: rwf_dsync,
            inflight: VecDeque::new(),
        };
        eng.register();
        Ok(eng)
    }

    /// Same engine, but durability by a linked `IORING_OP_FSYNC(DATASYNC)` after
    /// each write instead of RWF_DSYNC (what kernels without RWF_DSYNC support get;
    /// exposed so the path is tested everywhere).
    pub fn new_linked_fsync(initial_len: usize) -> io::Result<UringEngine> {
        UringEngine::with_depth(initial_len, 1, false)
    }

    /// Whether the staging buffers are registered as fixed buffers (needs
    /// RLIMIT_MEMLOCK headroom on older kernels).
    pub fn uses_fixed_buffer(&self) -> bool {
        self.registered
    }

    /// Whether durability comes from RWF_DSYNC (true) or a linked fdatasync.
    pub fn uses_rwf_dsync(&self) -> bool {
        self.use_rwf_dsync
    }

    fn register(&mut self) {
        let iovs: Vec<libc::iovec> = self
            .bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers live in self and are unregistered (or the ring dropped)
        // before they are freed (see `staging_slot` and the field order).
        match unsafe { self.ring.submitter().register_buffers(&iovs) } {
            Ok(()) => self.registered = true,
            Err(e) => {
                // Why only debug: fixed buffers are an optimisation (RLIMIT_MEMLOCK
                // may be small); plain writes work the same.
                tracing::debug!(
                    "io_uring: registering the staging buffers failed ({e}); using plain writes"
                );
                self.registered = false;
            }
        }
    }

    /// Pushes the SQE(s) for the not yet written part of `inflight[idx]`.
    fn push_piece(&mut self, idx: usize) -> io::Result<()> {
        use io_uring::{opcode, squeue, types};
        let dsync = self.use_rwf_dsync;
        let registered = self.registered;
        let e = &mut self.inflight[idx];
        let buf = &self.bufs[e.slot];
        if e.len > buf.len() || e.done >= e.len {
            return Err(io::Error::other("staged length exceeds buffer"));
        }
        let fd = types::Fd(e.fd);
        // SAFETY: done < len <= buf.len() (checked above).
        let ptr = unsafe { buf.as_ptr().add(e.done) };
        let n = (e.len - e.done).min(1 << 30) as u32;
        let off = e.offset + e.done as u64;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let ud = (e.slot as u64) << 1;
        let write = if registered {
            opcode::WriteFixed::new(fd, ptr, n, e.slot as u16)
                .offset(off)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Write::new(fd, ptr, n)
                .offset(off)
                .rw_flags(flags)
                .build()
        }
        .user_data(ud | UD_WRITE);
        e.piece = n;
        e.dsync = dsync;
        e.write_res = None;
        e.fsync_res = None;
        // SAFETY: the buffer stays alive and untouched until the completion is reaped
        // (the writer does not restage a slot in flight; Drop reaps before freeing).
        unsafe {
            let mut sq = self.ring.submission();
            if dsync {
                sq.push(&write)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                e.outstanding = 1;
            } else {
                let fsync = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(ud | UD_FSYNC);
                if sq.capacity() - sq.len() < 2 {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
                sq.push(&write.flags(squeue::Flags::IO_LINK))
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                sq.push(&fsync)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                e.outstanding = 2;
            }
        }
        Ok(())
    }

    /// Hands queued SQEs to the kernel without waiting. Transient failures leave
    /// them queued: the next `submit_and_wait` submits them.
    fn kick(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for at least one CQE and processes every CQE available.
    fn reap(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let slot = (ud >> 1) as usize;
            let Some(idx) = self
                .inflight
                .iter()
                .position(|e| e.slot == slot && e.outstanding > 0)
            else {
                return Err(io::Error::other(format!(
                    "unexpected io_uring completion {ud}"
                )));
            };
            let e = &mut self.inflight[idx];
            if ud & 1 == UD_FSYNC {
                e.fsync_res = Some(res);
            } else {
                e.write_res = Some(res);
            }
            e.outstanding -= 1;
            if e.outstanding == 0 {
                self.settle(idx);
            }
        }
        Ok(())
    }

    /// All CQEs of the current piece of `inflight[idx]` arrived: finish it or
    /// resubmit the rest (short write, EINTR/EAGAIN, RWF_DSYNC refused).
    fn settle(&mut self, idx: usize) {
        let e = &mut self.inflight[idx];
        let w = e.write_res.unwrap_or(-libc::EIO);
        let mut retry = false;
        if w < 0 {
            let errno = -w;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                retry = true;
            } else if e.dsync && (errno == libc::EINVAL || errno == libc::EOPNOTSUPP) {
                if self.use_rwf_dsync {
                    tracing::warn!(
                        "io_uring: RWF_DSYNC rejected ({}); using linked fdatasync instead",
                        io::Error::from_raw_os_error(errno)
                    );
                    self.use_rwf_dsync = false;
                }
                retry = true;
            } else {
                e.result = Some(Err(io::Error::from_raw_os_error(errno)));
            }
        } else if w == 0 {
            e.result = Some(Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "io_uring write returned 0",
            )));
        } else {
            match e.fsync_res {
                // A short write cancels the linked fsync (-ECANCELED); the rest is
                // resubmitted and carries its own fsync.
                Some(f) if f < 0 && !(f == -libc::ECANCELED && (w as u32) < e.piece) => {
                    e.result = Some(Err(io::Error::from_raw_os_error(-f)));
                }
                _ => {
                    e.done += w as usize;
                    if e.done >= e.len {
                        e.result = Some(Ok(()));
                    } else {
                        retry = true;
                    }
                }
            }
        }
        if retry {
            if let Err(err) = self.push_piece(idx).and_then(|()| self.kick()) {
                let e = &mut self.inflight[idx];
                e.outstanding = 0;
                e.result = Some(Err(err));
            }
        }
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn staging(&mut self, len: usize) -> io::Result<&mut [u8]> {
        self.staging_slot(0, len)
    }
    fn write_staged(&mut self, file: &File, len: usize, offset: u64) -> io::Result<()> {
        if !self.inflight.is_empty() {
            return Err(io::Error::other("write_staged while writes are in flight"));
        }
        self.submit_staged(0, file, len, offset)?;
        self.wait_oldest()
    }
    fn max_inflight(&self) -> usize {
        self.bufs.len()
    }
    fn staging_slot(&mut self, slot: usize, len: usize) -> io::Result<&mut [u8]> {
        if slot >= self.bufs.len() {
            return Err(io::Error::other(format!("no staging slot {slot}")));
        }
        if self.inflight.iter().any(|e| e.slot == slot) {
            return Err(io::Error::other(format!(
                "staging slot {slot} is in flight"
            )));
        }
        if self.bufs[slot].len() < len {
            // Growing re-registers every buffer: let the other writes finish first
            // (their results stay queued for wait_oldest).
            while self.inflight.iter().any(|e| e.result.is_none()) {
                self.reap()?;
            }
            if self.registered {
                self.ring.submitter().unregister_buffers()?;
                self.registered = false;
            }
            self.bufs[slot] = AlignedBuf::new_zeroed(len);
            self.register();
        }
        Ok(&mut self.bufs[slot].as_mut_slice()[..len])
    }
    fn submit_staged(
        &mut self,
        slot: usize,
        file: &File,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        if slot >= self.bufs.len() || len > self.bufs[slot].len() || len == 0 {
            return Err(io::Error::other("staged length exceeds buffer"));
        }
        crate::failpoint::check("journal::uring_submit")?;
        if self.inflight.iter().any(|e| e.slot == slot) {
            return Err(io::Error::other(format!(
                "staging slot {slot} is in flight"
            )));
        }
        self.inflight.push_back(InFlight {
            slot,
            fd: file.as_raw_fd(),
            len,
            offset,
            done: 0,
            piece: 0,
            dsync: false,
            outstanding: 0,
            write_res: None,
            fsync_res: None,
            result: None,
        });
        let idx = self.inflight.len() - 1;
        if let Err(e) = self.push_piece(idx) {
            self.inflight.pop_back();
            return Err(e);
        }
        // The SQEs are queued: from here on the write is reported by wait_oldest
        // (whose submit_and_wait also submits anything a failed kick left queued).
        if let Err(e) = self.kick() {
            tracing::debug!("io_uring submit failed ({e}); retried by wait_oldest");
        }
        Ok(())
    }
    fn wait_oldest(&mut self) -> io::Result<()> {
        // Bounded by the kernel completing what was submitted.
        loop {
            match self.inflight.front() {
                None => return Err(io::Error::other("no io_uring write in flight")),
                Some(e) if e.result.is_some() => {
                    return self
                        .inflight
                        .pop_front()
                        .and_then(|e| e.result)
                        .unwrap_or_else(|| Err(io::Error::other("io_uring result missing")))
                        .and_then(|()| crate::failpoint::check("journal::uring_complete"));
                }
                Some(_) => self.reap()?,
            }
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel must be done with the staging buffers before they are freed.
        while self.inflight.iter().any(|e| e.outstanding > 0) {
            for e in self.inflight.iter_mut() {
                // No more retries: only wait for what is already submitted.
                if e.result.is_none() && e.outstanding == 0 {
                    e.result = Some(Err(io::Error::other("engine dropped")));
                }
            }
            let pending: usize = self.inflight.iter().map(|e| e.outstanding as usize).sum();
            if pending == 0 {
                break;
            }
            if self.reap_no_retry().is_err() {
                break;
            }
        }
    }
}

impl UringEngine {
    fn reap_no_retry(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let uds: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
        for ud in uds {
            let slot = (ud >> 1) as usize;
            if let Some(e) = self
                .inflight
                .iter_mut()
                .find(|e| e.slot == slot && e.outstanding > 0)
            {
                e.outstanding -= 1;
            }
        }
        Ok(())
    }
}

fn nop_roundtrip(ring: &mut io_uring::IoUring) -> io::Result<()> {
    let nop = io_uring::opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    ring.submit_and_wait(1)?;
    match ring.completion().next().map(|c| c.result()) {
        Some(r) if r >= 0 => Ok(()),
        Some(r) => Err(io::Error::from_raw_os_error(-r)),
        None => Err(io::Error::other("io_uring NOP completion missing")),
    }
}

// ---------------------------------------------------------------- probing

/// Value of `/proc/sys/kernel/io_uring_disabled` (0 enabled, 1 restricted to
/// `kernel.io_uring_group`/CAP_SYS_ADMIN, 2 disabled), if readable.
pub fn io_uring_disabled_sysctl() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Turns an io_uring set-up failure into an operator-readable reason. Pure, so the
/// wording of every case is unit-tested.
pub fn explain_io_uring_failure(err: &io::Error, disabled: Option<u8>) -> String {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup failed with ENOSYS: the kernel is built without io_uring".into(),
        Some(libc::EPERM) => match disabled {
            Some(2) => "io_uring_setup failed with EPERM: kernel.io_uring_disabled=2 (io_uring disabled for all processes)".into(),
            Some(1) => "io_uring_setup failed with EPERM: kernel.io_uring_disabled=1 (only CAP_SYS_ADMIN or members of kernel.io_uring_group may use io_uring)".into(),
            Some(v) => format!("io_uring_setup failed with EPERM although kernel.io_uring_disabled={v}: most likely blocked by a seccomp filter (container runtime profile)"),
            None => "io_uring_setup failed with EPERM (kernel.io_uring_disabled unreadable): blocked by seccomp or kernel.io_uring_disabled".into(),
        },
        _ => format!("io_uring set-up failed: {err}"),
    }
}

/// Actually sets up a ring and round-trips a NOP. `Err` holds the reason.
pub fn probe_io_uring() -> Result<(), String> {
    let disabled = io_uring_disabled_sysctl();
    let mut ring = io_uring::IoUring::new(2).map_err(|e| explain_io_uring_failure(&e, disabled))?;
    nop_roundtrip(&mut ring).map_err(|e| format!("io_uring probe: NOP round trip failed: {e}"))
}

/// Which engine to use: `Auto` probes io_uring and falls back to std IO.
/// With the `serde` feature it is spelled `auto`, `io_uring`, `std` (ferryd's
/// `journal.engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum EngineChoice {
    #[default]
    Auto,
    IoUring,
    Std,
}

/// Builds the engine for `choice`. Returns the engine and, when `Auto` fell back
/// to std IO, the reason (already logged with `tracing::warn`).
pub fn make_engine(
    choice: EngineChoice,
    initial_len: usize,
    depth: usize,
) -> Result<(Box<dyn IoEngine>, Option<String>), String> {
    match choice {
        EngineChoice::Std => Ok((Box::new(StdEngine::new(initial_len)), None)),
        EngineChoice::IoUring => {
            probe_io_uring()?;
            let e = UringEngine::with_depth(initial_len, depth, true)
                .map_err(|e| explain_io_uring_failure(&e, io_uring_disabled_sysctl()))?;
            Ok((Box::new(e), None))
        }
        EngineChoice::Auto => match probe_io_uring().and_then(|()| {
            UringEngine::with_depth(initial_len, depth, true)
                .map_err(|e| explain_io_uring_failure(&e, io_uring_disabled_sysctl()))
        }) {
            Ok(e) => Ok((Box::new(e), None)),
            Err(reason) => {
                tracing::warn!(reason = %reason, "journal: io_uring unavailable, falling back to the std IO engine");
                Ok((Box::new(StdEngine::new(initial_len)), Some(reason)))
            }
        },
    }
}
