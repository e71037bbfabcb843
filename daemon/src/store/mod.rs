//! Node-local storage: the volumes' backing stores ([`base`]) and the crash-safe node
//! metadata ([`meta`]); failpoints at their IO edges (`failpoint`, tests only).
pub mod base;
pub(crate) mod failpoint;
pub mod meta;
