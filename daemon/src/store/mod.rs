//! Node-local storage: the crash-safe node metadata.
pub mod meta;
