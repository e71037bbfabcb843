//! Failpoints at the IO edges of the journal and the undo log (cargo feature
//! `failpoints`; the names are listed in `journal/FAILPOINTS.md`). Without the
//! feature [`check`] is an inlined `Ok(())` and the `fail` crate is not built.
//!
//! A failpoint configured with `return(ERRNO)` (for example `3*return(ENOSPC)`)
//! makes the guarded call fail with that errno, as the system call would; a bare
//! `return` injects EIO. The other `fail` actions (`sleep`, `pause`, `panic`) work
//! as documented by the crate.

use std::io;

/// Fails with the injected error if failpoint `name` is active.
#[inline]
pub(crate) fn check(name: &str) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    if let Some(e) = fail::eval(name, injected) {
        return Err(e);
    }
    let _ = name;
    Ok(())
}

/// The error a `return(ARG)` action injects: ARG is an errno name or number.
#[cfg(feature = "failpoints")]
fn injected(arg: Option<String>) -> io::Error {
    let errno = match arg.as_deref().map(str::trim) {
        Some("ENOSPC") => libc::ENOSPC,
        Some("EDQUOT") => libc::EDQUOT,
        Some("EMFILE") => libc::EMFILE,
        Some("ENFILE") => libc::ENFILE,
        Some("EAGAIN") => libc::EAGAIN,
        Some("EINTR") => libc::EINTR,
        Some(n) => n.parse().unwrap_or(libc::EIO),
        None => libc::EIO,
    };
    io::Error::from_raw_os_error(errno)
}
