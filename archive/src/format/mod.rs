//! The archive's formats, pure (no IO, no clock): packs of write-sets, base images of
//! content-addressed chunks, and the manifest that indexes both with an SM3 hash
//! chain. Byte layouts, object names and crash cases: archive/FORMAT.md.
pub mod base;
pub mod manifest;
pub mod pack;
pub mod sealed;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unsupported format version {0}")]
    Version(u16),
    #[error("checksum mismatch in the {0}")]
    Checksum(&'static str),
    #[error("compression: {0}")]
    Compress(String),
    #[error("{0}")]
    Invalid(String),
}

/// SM3 of `parts` concatenated, as lowercase hex.
pub fn sm3_hex(parts: &[&[u8]]) -> String {
    use sm3::{Digest, Sm3};
    let mut h = Sm3::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}
