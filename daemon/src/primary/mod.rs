//! The primary write path: volumes and their NBD export (with its TLS policy), ordered
//! application to the bases.
pub mod apply;
pub mod frontend;
pub mod nbd_tls;
pub mod volume;
