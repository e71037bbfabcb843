//! Node-local storage: the volumes' backing stores ([`base`]) and the crash-safe node
//! metadata ([`meta`]).
pub mod base;
pub mod meta;
