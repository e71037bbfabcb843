//! The sealed (encrypted) object: how an encrypted archive stores a pack or a chunk.
//! The object's stored bytes (a whole pack, or a chunk's zstd bytes: compressed before
//! encryption) are encrypted with SM4-GCM under a fresh random data key wrapped by the
//! node's key-encryption key, exactly the journal's at-rest scheme (ferry-gm's
//! `atrest`). Pure: bytes in, bytes out. Layout and nonce rule: archive/FORMAT.md.
use ferry_gm::atrest::{DataKey, Kek, KeyId, WrappedKey, KEY_ID_LEN, WRAPPED_KEY_LEN};
use ferry_gm::{MAX_PLAINTEXT_LEN, TAG_LEN};

use super::FormatError;

pub const MAGIC: [u8; 8] = *b"FERRYEO\0";
pub const VERSION: u16 = 1;
/// Header: magic, version, kind, reserved, key id, wrapped data key, plaintext length.
pub const HEADER_LEN: usize = 24 + WRAPPED_KEY_LEN + 8;
/// Offset of the wrapped key: the bytes before it are the wrap's associated data.
const WRAP_AT: usize = 24;
/// Each object has its own random data key and one encrypted piece, so the one nonce
/// `unit_nonce(0, 0)` never repeats under a key.
const UNIT: u64 = 0;
const PIECE: u32 = 0;

/// What a sealed object holds (bound into its header, so a chunk cannot be served
/// as a pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Pack = 1,
    Chunk = 2,
}

/// Why a sealed object was refused.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("encrypted with key {stored}, but the key file holds key {given}")]
    WrongKey { stored: KeyId, given: KeyId },
    #[error("encrypted with key {0}: give its key file")]
    NoKey(KeyId),
    #[error("not encrypted, but the archive is")]
    NotSealed,
    #[error("authentication failed: the object was altered (or is not the one named)")]
    Authentication,
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("encryption: {0}")]
    Crypto(ferry_gm::Error),
}

/// True when `b` starts like a sealed object.
pub fn is_sealed(b: &[u8]) -> bool {
    b.starts_with(&MAGIC)
}

/// The key id a sealed object names (checked before anything is decrypted).
pub fn key_id(b: &[u8]) -> Result<KeyId, SealError> {
    if !is_sealed(b) {
        return Err(SealError::NotSealed);
    }
    if b.len() < HEADER_LEN + TAG_LEN {
        return Err(FormatError::Truncated {
            need: HEADER_LEN + TAG_LEN,
            have: b.len(),
        }
        .into());
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&b[16..16 + KEY_ID_LEN]);
    Ok(KeyId(id))
}

/// Seals `plain` as object `name` of `kind` under a fresh data key.
pub fn seal(kek: &Kek, kind: ObjectKind, name: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let dk = DataKey::generate().map_err(SealError::Crypto)?;
    seal_with(kek, &dk, |aad| kek.wrap(&dk, aad), kind, name, plain)
}

/// [`seal`] with a given data key and wrap: known-answer tests only.
fn seal_with(
    kek: &Kek,
    dk: &DataKey,
    wrap: impl FnOnce(&[u8]) -> Result<WrappedKey, ferry_gm::Error>,
    kind: ObjectKind,
    name: &str,
    plain: &[u8],
) -> Result<Vec<u8>, SealError> {
    if plain.len() as u64 > MAX_PLAINTEXT_LEN {
        return Err(FormatError::Invalid(format!("{name}: too large to encrypt")).into());
    }
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&kek.id().0);
    let w = wrap(&out[..WRAP_AT]).map_err(SealError::Crypto)?;
    out.extend_from_slice(&w.0);
    out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    let aad = aad(&out[..HEADER_LEN], name);
    out.extend_from_slice(plain);
    let tag = dk
        .seal(UNIT, PIECE, &aad, &mut out[HEADER_LEN..])
        .map_err(SealError::Crypto)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// The body's associated data: the whole header and the object's name (an object
/// copied under another name fails authentication).
fn aad(header: &[u8], name: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + name.len());
    a.extend_from_slice(header);
    a.extend_from_slice(name.as_bytes());
    a
}

/// Checks and decrypts sealed object `name` of `kind`, with the key of `kek`'s ring
/// that the object names (an older key after a rotation, or the current one).
pub fn open(kek: &Kek, kind: ObjectKind, name: &str, b: &[u8]) -> Result<Vec<u8>, SealError> {
    let stored = key_id(b)?;
    let Some(kek) = kek.for_id(stored) else {
        return Err(SealError::WrongKey {
            stored,
            given: kek.id(),
        });
    };
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(FormatError::Version(version).into());
    }
    if u16::from_le_bytes([b[10], b[11]]) != kind as u16 {
        return Err(SealError::Authentication);
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[HEADER_LEN - 8..HEADER_LEN]);
    let len = u64::from_le_bytes(len);
    if len != (b.len() - HEADER_LEN - TAG_LEN) as u64 {
        return Err(SealError::Authentication);
    }
    let mut w = [0u8; WRAPPED_KEY_LEN];
    w.copy_from_slice(&b[WRAP_AT..WRAP_AT + WRAPPED_KEY_LEN]);
    let dk = kek
        .unwrap(&WrappedKey(w), &b[..WRAP_AT])
        .map_err(|_| SealError::Authentication)?;
    let (body, tag) = b[HEADER_LEN..].split_at(b.len() - HEADER_LEN - TAG_LEN);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag);
    let mut plain = body.to_vec();
    dk.open(UNIT, PIECE, &aad(&b[..HEADER_LEN], name), &mut plain, &t)
        .map_err(|_| SealError::Authentication)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> Kek {
        Kek::from_bytes(b"0123456789abcdef")
    }

    #[test]
    fn round_trip_and_every_tamper_refused() {
        let k = kek();
        let plain = b"FERRY-MARKER compressed bytes".repeat(3);
        let s = seal(&k, ObjectKind::Chunk, "chunks/ab/abcd", &plain).expect("seal");
        assert_eq!(s.len(), HEADER_LEN + plain.len() + TAG_LEN);
        assert!(!s.windows(12).any(|w| w == b"FERRY-MARKER"));
        let back = open(&k, ObjectKind::Chunk, "chunks/ab/abcd", &s).expect("open");
        assert_eq!(back, plain);
        for i in 0..s.len() * 8 {
            let mut bad = s.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                open(&k, ObjectKind::Chunk, "chunks/ab/abcd", &bad).is_err(),
                "bit {i} accepted"
            );
        }
        for n in 0..s.len() {
            assert!(open(&k, ObjectKind::Chunk, "chunks/ab/abcd", &s[..n]).is_err());
        }
        assert!(matches!(
            open(&k, ObjectKind::Chunk, "chunks/ab/abce", &s),
            Err(SealError::Authentication)
        ));
        assert!(matches!(
            open(&k, ObjectKind::Pack, "chunks/ab/abcd", &s),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn wrong_key_is_refused_naming_both_ids() {
        let s = seal(&kek(), ObjectKind::Pack, "p", b"x").expect("seal");
        let other = Kek::from_bytes(&[9; 16]);
        let e = open(&other, ObjectKind::Pack, "p", &s).expect_err("wrong key");
        let text = e.to_string();
        assert!(text.contains(&kek().id().to_string()) && text.contains(&other.id().to_string()));
        assert!(matches!(
            open(&kek(), ObjectKind::Pack, "p", b"plain"),
            Err(SealError::NotSealed)
        ));
    }

    /// The layout frozen: a change would make every encrypted archive unreadable.
    #[test]
    fn golden_bytes() {
        let k = kek();
        let dk = DataKey::from_bytes(&[0x11; 16]);
        let s = seal_with(
            &k,
            &dk,
            |aad| k.wrap_with_nonce(&dk, aad, &[0x22; 12]),
            ObjectKind::Pack,
            "packs/x.fpk",
            b"ferry",
        )
        .expect("seal");
        assert_eq!(hex::encode(&s), GOLDEN);
        assert_eq!(
            open(&k, ObjectKind::Pack, "packs/x.fpk", &s).expect("open"),
            b"ferry"
        );
    }

    const GOLDEN: &str = "4645525259454f0001000100000000007facb18cf132385d222222222222222222222222649793007d486fbbf369c5851c65b20fbcd30ab8e33bdb716b766a789bfacf1205000000000000004784743898ee237fa2bf169f3c28840a602cba5c40";
}
