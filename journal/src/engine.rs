//! IO engines: how the writer thread gets one aligned buffer durably onto disk.
//!
//! The writer stages each round's bytes (optional segment header block, the batch,
//! optional trailing zero block) in the engine's own aligned buffer and asks for one
//! durable write. Why the engine owns the buffer: io_uring can then register it once
//! as a fixed buffer and nobody can free it while the kernel still uses it.
//!
//! * [`UringEngine`]: `io-uring` on the writer thread, `IORING_OP_WRITE(_FIXED)` with
//!   `RWF_DSYNC` (FUA on capable devices); falls back to a linked `fdatasync` if the
//!   kernel rejects `RWF_DSYNC`.
//! * [`StdEngine`]: `pwrite` + `fdatasync`.
//!
//! Both are used with O_DIRECT files where the filesystem allows it.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
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
}

/// Heap buffer aligned to 4 KiB (O_DIRECT needs aligned memory).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// Why: the buffer is plain owned memory; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}

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
        file.write_all_at(data, offset)?;
        file.sync_data()
    }
}

// ---------------------------------------------------------------- io_uring

const UD_WRITE: u64 = 1;
const UD_FSYNC: u64 = 2;
/// One write in flight plus its linked fdatasync: a tiny ring is enough.
const RING_ENTRIES: u32 = 8;

/// io_uring engine (one write in flight, durable per write).
pub struct UringEngine {
    // Field order matters: the ring is dropped (and the registration released)
    // before the buffer it points at.
    ring: io_uring::IoUring,
    buf: AlignedBuf,
    /// The staging buffer is registered as fixed buffer 0: saves the per-IO page
    /// pinning of the batch buffer, which is reused for every round.
    registered: bool,
    /// RWF_DSYNC on the write (true) or a linked IORING_OP_FSYNC(DATASYNC).
    use_rwf_dsync: bool,
}

impl UringEngine {
    pub fn new(initial_len: usize) -> io::Result<UringEngine> {
        let mut ring = io_uring::IoUring::new(RING_ENTRIES)?;
        nop_roundtrip(&mut ring)?;
        let mut eng = UringEngine {
            ring,
            buf: AlignedBuf::new_zeroed(initial_len),
            registered: false,
            use_rwf_dsync: true,
        };
        eng.register();
        Ok(eng)
    }

    /// Same engine, but durability by a linked `IORING_OP_FSYNC(DATASYNC)` after
    /// each write instead of RWF_DSYNC (what kernels without RWF_DSYNC support get;
    /// exposed so the path is tested everywhere).
    pub fn new_linked_fsync(initial_len: usize) -> io::Result<UringEngine> {
        let mut e = UringEngine::new(initial_len)?;
        e.use_rwf_dsync = false;
        Ok(e)
    }

    /// Whether the staging buffer is registered as a fixed buffer (needs
    /// RLIMIT_MEMLOCK headroom on older kernels).
    pub fn uses_fixed_buffer(&self) -> bool {
        self.registered
    }

    /// Whether durability comes from RWF_DSYNC (true) or a linked fdatasync.
    pub fn uses_rwf_dsync(&self) -> bool {
        self.use_rwf_dsync
    }

    fn register(&mut self) {
        let iov = libc::iovec {
            iov_base: self.buf.as_ptr() as *mut libc::c_void,
            iov_len: self.buf.len(),
        };
        // SAFETY: the buffer lives in self and is unregistered (or the ring dropped)
        // before it is freed (see `staging` and the field order).
        match unsafe { self.ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => self.registered = true,
            Err(e) => {
                // Why only debug: fixed buffers are an optimisation (RLIMIT_MEMLOCK
                // may be small); plain writes work the same.
                tracing::debug!(
                    "io_uring: registering the staging buffer failed ({e}); using plain writes"
                );
                self.registered = false;
            }
        }
    }

    fn submit_write(
        &mut self,
        file: &File,
        start: usize,
        len: usize,
        offset: u64,
    ) -> io::Result<usize> {
        use io_uring::{opcode, squeue, types};
        let fd = types::Fd(file.as_raw_fd());
        // SAFETY: start + len <= buf.len() (checked by caller).
        let ptr = unsafe { self.buf.as_ptr().add(start) };
        let n = len.min(1 << 30) as u32;
        let flags = if self.use_rwf_dsync {
            libc::RWF_DSYNC
        } else {
            0
        };
        let write = if self.registered {
            opcode::WriteFixed::new(fd, ptr, n, 0)
                .offset(offset)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Write::new(fd, ptr, n)
                .offset(offset)
                .rw_flags(flags)
                .build()
        }
        .user_data(UD_WRITE);
        let mut expected = 1;
        // SAFETY: the buffer stays alive and untouched until the completion is reaped below.
        unsafe {
            let mut sq = self.ring.submission();
            if self.use_rwf_dsync {
                sq.push(&write)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            } else {
                let fsync = opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(UD_FSYNC);
                sq.push(&write.flags(squeue::Flags::IO_LINK))
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                sq.push(&fsync)
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                expected = 2;
            }
        }
        let mut write_res: Option<i32> = None;
        let mut fsync_res: Option<i32> = None;
        let mut reaped = 0;
        while reaped < expected {
            match self.ring.submit_and_wait(expected - reaped) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                match cqe.user_data() {
                    UD_WRITE => write_res = Some(cqe.result()),
                    UD_FSYNC => fsync_res = Some(cqe.result()),
                    other => {
                        return Err(io::Error::other(format!(
                            "unexpected io_uring completion {other}"
                        )))
                    }
                }
            }
        }
        let w = write_res.ok_or_else(|| io::Error::other("io_uring write completion missing"))?;
        if w < 0 {
            return Err(io::Error::from_raw_os_error(-w));
        }
        if let Some(f) = fsync_res {
            // A short write cancels the linked fsync (-ECANCELED); the caller
            // retries the rest, and that retry carries its own fsync.
            if f < 0 && !(f == -libc::ECANCELED && (w as usize) < n as usize) {
                return Err(io::Error::from_raw_os_error(-f));
            }
        }
        Ok(w as usize)
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn staging(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if self.buf.len() < len {
            if self.registered {
                self.ring.submitter().unregister_buffers()?;
                self.registered = false;
            }
            self.buf = AlignedBuf::new_zeroed(len);
            self.register();
        }
        Ok(&mut self.buf.as_mut_slice()[..len])
    }
    fn write_staged(&mut self, file: &File, len: usize, offset: u64) -> io::Result<()> {
        if len > self.buf.len() {
            return Err(io::Error::other("staged length exceeds buffer"));
        }
        let mut done = 0usize;
        // Bounded: every iteration either makes progress or returns an error
        // (plus at most one switch away from RWF_DSYNC).
        while done < len {
            match self.submit_write(file, done, len - done, offset + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "io_uring write returned 0",
                    ))
                }
                Ok(n) => done += n,
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e)
                    if self.use_rwf_dsync
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                        ) =>
                {
                    tracing::warn!(
                        "io_uring: RWF_DSYNC rejected ({e}); using linked fdatasync instead"
                    );
                    self.use_rwf_dsync = false;
                }
                Err(e) => return Err(e),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
) -> Result<(Box<dyn IoEngine>, Option<String>), String> {
    match choice {
        EngineChoice::Std => Ok((Box::new(StdEngine::new(initial_len)), None)),
        EngineChoice::IoUring => {
            probe_io_uring()?;
            let e = UringEngine::new(initial_len)
                .map_err(|e| explain_io_uring_failure(&e, io_uring_disabled_sysctl()))?;
            Ok((Box::new(e), None))
        }
        EngineChoice::Auto => match probe_io_uring().and_then(|()| {
            UringEngine::new(initial_len)
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
