//! The primary write path: volumes and their NBD export, ordered application to the bases.
pub mod apply;
pub mod frontend;
pub mod volume;
