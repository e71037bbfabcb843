//! ferry's cold tier: an archive of a volume group in S3-compatible object storage (or
//! a directory), made of write-set packs and content-addressed base images indexed by
//! a hash-chained manifest, and restore to any write-set boundary it holds.
//!
//! - [`format`](mod@format): the pure formats (no IO).
//! - [`store`]: the object store behind a URL (`s3://bucket/prefix`, `file:///dir`).
//! - [`writer`]: what the primary's archive target calls: write-sets in, packs out.
//! - [`restore`]: a point back into a file or device, every object's hash checked.
//! - [`compact`]: packs merged into coarser levels and thinned to the retention grid,
//!   what the grid no longer needs dropped, garbage collected.
//! - [`view`]: a point read in place from the bucket (what `ferryctl archive export` serves).
//! - [`seed`]: a point restored into a new standby, with the marker its ferryd starts from.
pub mod compact;
pub mod format;
pub mod restore;
pub mod seed;
pub mod store;
pub mod view;
pub mod writer;

pub use format::FormatError;
pub use store::{ArchiveStore, StoreError};
