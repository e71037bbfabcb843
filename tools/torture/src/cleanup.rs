//! Cleanup on SIGINT/SIGTERM: a long run stopped with Ctrl-C must not leave daemons
//! running or loop filesystems mounted. Every daemon PID and every loop mount is
//! registered here while it exists; the signal handler only writes a byte to a pipe
//! (async-signal-safe), and a thread reading that pipe kills the registered PIDs,
//! unmounts and detaches, then exits with 130. (Normal ends and errors clean up
//! through the guards' `Drop`.)

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// (mount point, loop device)
static MOUNTS: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
static PIPE_WR: AtomicI32 = AtomicI32::new(-1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn add_pid(pid: u32) {
    lock(&PIDS).push(pid);
}

pub fn remove_pid(pid: u32) {
    lock(&PIDS).retain(|p| *p != pid);
}

pub fn add_mount(mnt: PathBuf, dev: String) {
    lock(&MOUNTS).push((mnt, dev));
}

pub fn remove_mount(dev: &str) {
    lock(&MOUNTS).retain(|(_, d)| d != dev);
}

extern "C" fn on_signal(_: libc::c_int) {
    let fd = PIPE_WR.load(Ordering::Relaxed);
    let b = [1u8];
    // SAFETY: write(2) is async-signal-safe; `b` outlives the call.
    unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
}

/// Installs the handlers and the cleanup thread.
pub fn install() -> std::io::Result<()> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two-element array we pass.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    PIPE_WR.store(fds[1], Ordering::Relaxed);
    let rd = fds[0];
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: read(2) into a one-byte buffer we own.
        while unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) } != 1 {}
        eprintln!("ferry-torture: interrupted; killing daemons and unmounting");
        for pid in lock(&PIDS).drain(..) {
            // SAFETY: kill(2) on a daemon this process spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for (mnt, dev) in lock(&MOUNTS).drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        std::process::exit(130);
    });
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only calls write(2).
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
