//! Failpoints at ferryd's own IO edges (cargo feature `failpoints`, which also turns
//! on ferry-journal's; names in `daemon/FAILPOINTS.md`). Without the feature
//! [`check`] is an inlined `Ok(())` and the `fail` crate is not built. The daemon
//! arms them from the `FAILPOINTS` environment variable at start-up (`main.rs`), so
//! tests that run real ferryd processes can inject faults.
//!
//! `return(ERRNO)` makes the guarded call fail with that errno (`EIO`, `ENOSPC`,
//! `EDQUOT` or a number); a bare `return` is EIO. `N*return` fails N times, then
//! the call goes through.

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
        Some("EIO") | None => libc::EIO,
        Some(n) => n.parse().unwrap_or(libc::EIO),
    };
    io::Error::from_raw_os_error(errno)
}
