//! A base image: one volume as it was at one sequence, as a list of fixed-size chunks
//! named by their content's SM3 (`chunks/<sm3>`), so a chunk that did not change since
//! the last base is not uploaded again, and an all-zero chunk is not stored at all.
use serde::{Deserialize, Serialize};

use super::{sm3_hex, FormatError};

pub const BASE_FORMAT: u32 = 1;
/// Chunk size: 1 MiB, large enough for object-storage request costs, small enough
/// that a 4k change re-uploads little.
pub const CHUNK_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub format: u32,
    pub volume: u32,
    pub size: u64,
    pub chunk_size: u64,
    /// The sequence the image is consistent at.
    pub seq: u64,
    /// Per chunk: its content's SM3 (hex), or `None` for all zeros.
    pub chunks: Vec<Option<String>>,
}

impl Base {
    pub fn object_name(epoch: u64, seq: u64, volume: u32) -> String {
        format!("bases/{epoch:08}/{seq:020}-{volume}.json")
    }

    pub fn chunk_count(size: u64) -> u64 {
        size.div_ceil(CHUNK_SIZE)
    }

    pub fn from_json(b: &[u8]) -> Result<Base, FormatError> {
        let base: Base =
            serde_json::from_slice(b).map_err(|e| FormatError::Invalid(format!("base: {e}")))?;
        if base.format != BASE_FORMAT {
            return Err(FormatError::Version(base.format as u16));
        }
        if base.chunk_size != CHUNK_SIZE || base.chunks.len() as u64 != Base::chunk_count(base.size)
        {
            return Err(FormatError::Invalid(
                "base: chunk list does not cover the volume".into(),
            ));
        }
        Ok(base)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The chunk's name: `None` when it is all zeros (nothing stored).
pub fn chunk_id(data: &[u8]) -> Option<String> {
    if data.iter().all(|&b| b == 0) {
        None
    } else {
        Some(sm3_hex(&[data]))
    }
}

pub fn chunk_object(id: &str) -> String {
    format!("chunks/{}/{id}", &id[..2.min(id.len())])
}
