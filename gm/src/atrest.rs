//! Encryption at rest with SM4-GCM: the key-encryption key (KEK) and its key file, a
//! fresh data key per storage *unit* (a journal segment, an undo segment, a cold-tier
//! object) wrapped under the KEK, and the nonce rule for what a data key encrypts.
//! Pure: no file IO (the caller reads the key file and checks its permissions); the
//! only system call is the OS random number generator for new keys and wrap nonces.
//!
//! Why a data key per unit rather than the KEK itself: GCM must never see one
//! (key, nonce) pair twice. Nonces here are derived from where the bytes live (unit
//! number and position in the unit), and unit numbers can start over (a journal
//! directory wiped and created again under the same KEK). A data key drawn at random
//! each time a unit is *activated* scopes every derived nonce to one activation, so
//! a recycled or renumbered unit never repeats a pair. The caller's remaining duty
//! is that one activation writes each position at most once with different bytes
//! (rewriting the very same ciphertext, as a retried write does, reveals nothing).
//!
//! Key rotation: a key file may hold several KEKs (a *key ring*), oldest first; the
//! last one is the *current* key, which wraps every new data key, and the older ones
//! still unwrap the data keys stored under them (each unit names its KEK by id). A
//! [`Kek`] is that ring: [`Kek::id`], [`Kek::wrap`] and [`Kek::subkey`] use the
//! current key, [`Kek::for_id`] finds the key a stored unit names.
//!
//! Wrapping uses a random 96-bit nonce under the KEK (about 2^32 wraps per KEK keep
//! the collision probability below 2^-32; a journal activating a segment a second
//! for a century stays far below that).
//!
//! A wrong key is recognised by its [`KeyId`] (SM3 of a domain label and the key,
//! truncated) before anything is decrypted, so the error can name both ids; the wrap
//! tag still authenticates: an id that matches with a tag that does not means the
//! stored wrapped key was altered.

use crate::{sm3_digest, Error, Sm4Gcm, NONCE_LEN, TAG_LEN};
use zeroize::Zeroize;

/// Length of an SM4 key.
pub const KEY_LEN: usize = 16;
/// Length of a [`KeyId`].
pub const KEY_ID_LEN: usize = 8;
/// Bytes of a [`WrappedKey`] as stored: wrap nonce, encrypted data key, tag.
pub const WRAPPED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// First token of the one key line of a key file.
pub const KEY_FILE_TAG: &str = "ferry-sm4-kek-v1";

/// Domain label of the key id hash (so the id is never an SM3 of the bare key).
const KEY_ID_LABEL: &[u8] = b"ferry at-rest key id\0";
/// Domain label of the subkey root (see [`Kek::subkey`]).
const SUBKEY_LABEL: &[u8] = b"ferry at-rest subkey\0";

/// Names a KEK without revealing it: the first 8 bytes of SM3(label || key).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl core::fmt::Display for KeyId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl core::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why a key file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("no `{KEY_FILE_TAG} <key> <id>` line")]
    Missing,
    /// The same key twice in one ring (an edit gone wrong: rings only grow by
    /// `ferryctl key rotate`, which never repeats a key).
    #[error("key {0} appears more than once")]
    Duplicate(KeyId),
    /// [`Kek::key_file_without`]: the key to retire is not in the file.
    #[error("key {0} is not in the key file")]
    NotInRing(KeyId),
    /// [`Kek::key_file_without`]: the current key wraps every new data key.
    #[error("key {0} is the current key: rotate to a new key before retiring it")]
    RetireCurrent(KeyId),
    #[error("bad key line: {0}")]
    Malformed(&'static str),
    /// The id written next to the key is not the key's id: the file was edited or
    /// damaged (a key that is one typo away would otherwise only show up as "wrong
    /// key" on the next start).
    #[error("the key does not match its id (file says {stated}, key has {actual}): damaged or edited key file")]
    IdMismatch { stated: KeyId, actual: KeyId },
}

/// The key-encryption key: wraps and unwraps data keys. With older keys of its
/// ring ([`Kek::parse_key_file`] of a rotated file) it is the current key, and
/// [`Kek::for_id`] reaches the others.
#[derive(Clone)]
pub struct Kek {
    gcm: Sm4Gcm,
    id: KeyId,
    /// SM3(label || key): the root of [`Kek::subkey`], kept instead of the key.
    sub_root: [u8; 32],
    /// The ring's earlier keys, oldest first (empty for a lone key).
    older: Vec<Kek>,
}

impl Drop for Kek {
    fn drop(&mut self) {
        self.sub_root.zeroize();
    }
}

impl core::fmt::Debug for Kek {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id)
            .field("older", &self.older_ids())
            .finish_non_exhaustive()
    }
}

/// The id of the KEK `key`.
pub fn key_id(key: &[u8; KEY_LEN]) -> KeyId {
    let mut input = [0u8; KEY_ID_LABEL.len() + KEY_LEN];
    input[..KEY_ID_LABEL.len()].copy_from_slice(KEY_ID_LABEL);
    input[KEY_ID_LABEL.len()..].copy_from_slice(key);
    let d = sm3_digest(&input);
    input.zeroize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&d[..KEY_ID_LEN]);
    KeyId(id)
}

/// Fills `out` from the operating system's random number generator.
pub fn random_bytes(out: &mut [u8]) -> Result<(), Error> {
    getrandom::getrandom(out).map_err(|_| Error::Rng)
}

impl Kek {
    /// The KEK with these key bytes.
    pub fn from_bytes(key: &[u8; KEY_LEN]) -> Kek {
        let mut input = [0u8; SUBKEY_LABEL.len() + KEY_LEN];
        input[..SUBKEY_LABEL.len()].copy_from_slice(SUBKEY_LABEL);
        input[SUBKEY_LABEL.len()..].copy_from_slice(key);
        let sub_root = sm3_digest(&input);
        input.zeroize();
        Kek {
            gcm: Sm4Gcm::new(key),
            id: key_id(key),
            sub_root,
            older: Vec::new(),
        }
    }

    /// The ring of `keys`, oldest first: the last one is the current key.
    /// `None` for an empty list.
    pub fn ring(keys: Vec<Kek>) -> Option<Kek> {
        let mut keys = keys;
        let mut current = keys.pop()?;
        for k in &mut keys {
            k.older.clear();
        }
        current.older = keys;
        Some(current)
    }

    /// The key of this ring with id `id` (the current key or an older one): the one
    /// that unwraps a unit stored under `id`.
    pub fn for_id(&self, id: KeyId) -> Option<&Kek> {
        if self.id == id {
            return Some(self);
        }
        self.older.iter().find(|k| k.id == id)
    }

    /// Ids of the ring's older keys, oldest first.
    pub fn older_ids(&self) -> Vec<KeyId> {
        self.older.iter().map(|k| k.id).collect()
    }

    /// A secret derived from this KEK for one `purpose` (SM3(root || purpose), root =
    /// SM3(label || key)): a MAC key, e.g. the cold tier's keyed chunk ids, which must
    /// be the same every time for the same KEK and must not reveal the KEK.
    pub fn subkey(&self, purpose: &[u8]) -> [u8; 32] {
        use crate::Digest;
        let mut h = crate::Sm3::new();
        h.update(self.sub_root);
        h.update(purpose);
        h.finalize().into()
    }

    /// A new random KEK and the text of its key file (see [`Kek::parse_key_file`]).
    pub fn generate_key_file() -> Result<(Kek, String), Error> {
        let mut key = [0u8; KEY_LEN];
        random_bytes(&mut key)?;
        let kek = Kek::from_bytes(&key);
        let text = key_file_text(&key, kek.id);
        key.zeroize();
        Ok((kek, text))
    }

    /// Parses a key file: `#` comments and blank lines, and one or more lines
    /// `ferry-sm4-kek-v1 <32 hex digits: key> <16 hex digits: key id>`, oldest
    /// first; the last is the current key (see the module docs). Every id is checked
    /// against its key; a key listed twice is refused.
    pub fn parse_key_file(text: &str) -> Result<Kek, KeyFileError> {
        let mut keys: Vec<Kek> = Vec::new();
        for line in key_lines(text) {
            let k = parse_key_line(line)?;
            if keys.iter().any(|o| o.id == k.id) {
                return Err(KeyFileError::Duplicate(k.id));
            }
            keys.push(k);
        }
        Kek::ring(keys).ok_or(KeyFileError::Missing)
    }

    /// Key rotation: the text of key file `text` with a new random key appended as
    /// its current key (comments and the older keys kept as they are), and the new
    /// ring. `text` must parse ([`Kek::parse_key_file`]).
    pub fn rotated_key_file(text: &str) -> Result<(Kek, String), RotateError> {
        let ring = Kek::parse_key_file(text)?;
        let mut key = [0u8; KEY_LEN];
        random_bytes(&mut key)?;
        let new = Kek::from_bytes(&key);
        let mut line = key_line(&key, new.id);
        key.zeroize();
        let mut out = String::with_capacity(text.len() + line.len() + 64);
        out.push_str(text);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("# added by key rotation: the current key (the last key line)\n");
        out.push_str(&line);
        line.zeroize();
        let mut keys: Vec<Kek> = ring.older.clone();
        let mut current = ring;
        current.older.clear();
        keys.push(current);
        keys.push(new);
        let ring = Kek::ring(keys).ok_or(RotateError::Format(KeyFileError::Missing))?;
        Ok((ring, out))
    }

    /// Retiring a key: the text of key file `text` without the line of older key
    /// `id` (the current key cannot be retired). Whether any stored unit still needs
    /// `id` is the caller's check, made before it writes the result.
    pub fn key_file_without(text: &str, id: KeyId) -> Result<String, KeyFileError> {
        let ring = Kek::parse_key_file(text)?;
        if ring.id == id {
            return Err(KeyFileError::RetireCurrent(id));
        }
        if ring.for_id(id).is_none() {
            return Err(KeyFileError::NotInRing(id));
        }
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            let t = line.trim();
            let is_key = !t.is_empty() && !t.starts_with('#');
            if is_key && parse_key_line(t).is_ok_and(|k| k.id == id) {
                continue;
            }
            out.push_str(line);
        }
        Ok(out)
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Wraps `dk` under this KEK with a fresh random nonce; `aad` binds the wrapped
    /// key to where it is stored (the caller's header bytes).
    pub fn wrap(&self, dk: &DataKey, aad: &[u8]) -> Result<WrappedKey, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        self.wrap_with_nonce(dk, aad, &nonce)
    }

    /// [`Kek::wrap`] with a given nonce: for known-answer tests only (a repeated
    /// nonce under one KEK breaks GCM).
    #[doc(hidden)]
    pub fn wrap_with_nonce(
        &self,
        dk: &DataKey,
        aad: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<WrappedKey, Error> {
        let mut out = [0u8; WRAPPED_KEY_LEN];
        out[..NONCE_LEN].copy_from_slice(nonce);
        let (ct, tag_out) = out[NONCE_LEN..].split_at_mut(KEY_LEN);
        ct.copy_from_slice(&dk.key);
        let tag = self.gcm.seal_in_place(nonce, aad, ct)?;
        tag_out.copy_from_slice(&tag);
        Ok(WrappedKey(out))
    }

    /// Unwraps a data key stored with `aad`. [`Error::Authentication`]: the wrapped
    /// key or its `aad` was altered, or this is not the KEK it was wrapped under.
    pub fn unwrap(&self, w: &WrappedKey, aad: &[u8]) -> Result<DataKey, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&w.0[..NONCE_LEN]);
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&w.0[NONCE_LEN..NONCE_LEN + KEY_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&w.0[NONCE_LEN + KEY_LEN..]);
        self.gcm.open_in_place(&nonce, aad, &mut key, &tag)?;
        let dk = DataKey::from_bytes(&key);
        key.zeroize();
        Ok(dk)
    }
}

/// Why [`Kek::rotated_key_file`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Format(#[from] KeyFileError),
    #[error("no random key: {0}")]
    Rng(#[from] Error),
}

/// The key lines of a key file (comments and blank lines skipped), trimmed.
fn key_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// One key line: `ferry-sm4-kek-v1 <key hex> <id hex>`, the id checked.
fn parse_key_line(line: &str) -> Result<Kek, KeyFileError> {
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(KEY_FILE_TAG) {
        return Err(KeyFileError::Malformed(
            "does not start with the format tag",
        ));
    }
    let (Some(key_hex), Some(id_hex), None) = (words.next(), words.next(), words.next()) else {
        return Err(KeyFileError::Malformed(
            "expected the tag, the key and its id",
        ));
    };
    let mut key = [0u8; KEY_LEN];
    let mut stated = [0u8; KEY_ID_LEN];
    if !parse_hex(key_hex, &mut key) {
        key.zeroize();
        return Err(KeyFileError::Malformed("the key is not 32 hex digits"));
    }
    if !parse_hex(id_hex, &mut stated) {
        key.zeroize();
        return Err(KeyFileError::Malformed("the key id is not 16 hex digits"));
    }
    let kek = Kek::from_bytes(&key);
    key.zeroize();
    if kek.id.0 != stated {
        return Err(KeyFileError::IdMismatch {
            stated: KeyId(stated),
            actual: kek.id,
        });
    }
    Ok(kek)
}

/// The key line of `key` (newline-terminated).
fn key_line(key: &[u8; KEY_LEN], id: KeyId) -> String {
    let mut hex = String::with_capacity(2 * KEY_LEN);
    for b in key {
        hex.push_str(&format!("{b:02x}"));
    }
    let line = format!("{KEY_FILE_TAG} {hex} {id}\n");
    hex.zeroize();
    line
}

fn key_file_text(key: &[u8; KEY_LEN], id: KeyId) -> String {
    let mut line = key_line(key, id);
    let text = format!(
        "# ferry SM4 key-encryption key (encryption at rest). Secret: mode 0600, never\n\
         # copied next to the data it protects. Losing it loses the encrypted journal.\n\
         # `ferryctl key rotate` appends new keys: the last key line is the current key.\n\
         {line}"
    );
    line.zeroize();
    text
}

/// Decodes exactly `2 * out.len()` hex digits into `out`.
fn parse_hex(s: &str, out: &mut [u8]) -> bool {
    if s.len() != 2 * out.len() || !s.is_ascii() {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        match u8::from_str_radix(&s[2 * i..2 * i + 2], 16) {
            Ok(v) => *o = v,
            Err(_) => return false,
        }
    }
    true
}

/// A data key wrapped under a KEK, as stored: nonce || encrypted key || tag.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WrappedKey(pub [u8; WRAPPED_KEY_LEN]);

impl core::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("WrappedKey(..)")
    }
}

/// One unit's data key. Encrypts pieces of the unit with the nonce
/// [`unit_nonce`]`(unit, index)`.
#[derive(Clone)]
pub struct DataKey {
    key: [u8; KEY_LEN],
    gcm: Sm4Gcm,
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl core::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Nonce of piece `index` of unit `unit`: `unit` (8 bytes LE) || `index` (4 bytes LE).
pub fn unit_nonce(unit: u64, index: u32) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&unit.to_le_bytes());
    n[8..].copy_from_slice(&index.to_le_bytes());
    n
}

impl DataKey {
    /// A new random data key (one per unit activation).
    pub fn generate() -> Result<DataKey, Error> {
        let mut key = [0u8; KEY_LEN];
        random_bytes(&mut key)?;
        let dk = DataKey::from_bytes(&key);
        key.zeroize();
        Ok(dk)
    }

    /// The data key with these bytes (known-answer tests, unwrapping).
    pub fn from_bytes(key: &[u8; KEY_LEN]) -> DataKey {
        DataKey {
            key: *key,
            gcm: Sm4Gcm::new(key),
        }
    }

    /// Encrypts piece `index` of unit `unit` in place; returns the tag over `aad` and
    /// the ciphertext.
    pub fn seal(
        &self,
        unit: u64,
        index: u32,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Error> {
        self.gcm.seal_in_place(&unit_nonce(unit, index), aad, buf)
    }

    /// Checks the tag, then decrypts in place (unchanged on an error).
    pub fn open(
        &self,
        unit: u64,
        index: u32,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        self.gcm
            .open_in_place(&unit_nonce(unit, index), aad, buf, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEK_BYTES: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn key_file_round_trips_and_checks_its_id() {
        let (kek, text) = Kek::generate_key_file().expect("rng");
        assert_eq!(Kek::parse_key_file(&text).expect("parse").id(), kek.id());
        let line = text
            .lines()
            .find(|l| l.starts_with(KEY_FILE_TAG))
            .expect("key line");
        let parts: Vec<&str> = line.split(' ').collect();
        // One key digit changed: the id no longer matches.
        let flipped = if parts[1].starts_with('0') { "1" } else { "0" };
        let edited = format!("{} {}{} {}", parts[0], flipped, &parts[1][1..], parts[2]);
        assert!(matches!(
            Kek::parse_key_file(&edited),
            Err(KeyFileError::IdMismatch { .. })
        ));
        assert_eq!(
            Kek::parse_key_file("# only\n").err(),
            Some(KeyFileError::Missing)
        );
        assert_eq!(
            Kek::parse_key_file(&format!("{line}\n{line}\n")).err(),
            Some(KeyFileError::Duplicate(kek.id()))
        );
        assert!(matches!(
            Kek::parse_key_file(&format!("{} zz {}", KEY_FILE_TAG, parts[2])),
            Err(KeyFileError::Malformed(_))
        ));
    }

    /// Known answers (frozen from this implementation, whose SM4-GCM is checked
    /// against RustCrypto in tests/differential.rs): a change in the id, nonce or wrap
    /// layout would make every stored journal unreadable, so it must show up here.
    #[test]
    fn known_answers() {
        let kek = Kek::from_bytes(&KEK_BYTES);
        assert_eq!(kek.id().to_string(), KEK_ID_HEX);
        let dk = DataKey::from_bytes(&[0x11; 16]);
        let w = kek.wrap_with_nonce(&dk, b"aad", &[0x22; 12]).expect("wrap");
        assert_eq!(hex(&w.0), WRAPPED_HEX);
        let mut buf = *b"ferry at rest!!!";
        let tag = dk.seal(7, 3, b"hdr", &mut buf).expect("seal");
        assert_eq!(hex(&buf), SEALED_HEX);
        assert_eq!(hex(&tag), TAG_HEX);
        assert_eq!(unit_nonce(7, 3), [7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]);
        // Also checked against OpenSSL's SM3 (Python hashlib) when frozen.
        assert_eq!(hex(&kek.subkey(b"p")[..8]), SUBKEY_P_HEX);
        assert_ne!(kek.subkey(b"p"), kek.subkey(b"q"));
        let back = kek.unwrap(&w, b"aad").expect("unwrap");
        back.open(7, 3, b"hdr", &mut buf, &tag).expect("open");
        assert_eq!(&buf, b"ferry at rest!!!");
    }

    #[test]
    fn every_tamper_is_refused() {
        let kek = Kek::from_bytes(&KEK_BYTES);
        let dk = DataKey::from_bytes(&[0x11; 16]);
        let w = kek.wrap(&dk, b"aad").expect("wrap");
        for i in 0..WRAPPED_KEY_LEN * 8 {
            let mut bad = w;
            bad.0[i / 8] ^= 1 << (i % 8);
            assert_eq!(kek.unwrap(&bad, b"aad").err(), Some(Error::Authentication));
        }
        assert_eq!(kek.unwrap(&w, b"aaD").err(), Some(Error::Authentication));
        let other = Kek::from_bytes(&[9; 16]);
        assert_ne!(other.id(), kek.id());
        assert_eq!(other.unwrap(&w, b"aad").err(), Some(Error::Authentication));

        let plain = [0x5a_u8; 100];
        let mut ct = plain;
        let tag = dk.seal(1, 2, b"h", &mut ct).expect("seal");
        for i in 0..ct.len() * 8 {
            let mut bad = ct;
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                dk.open(1, 2, b"h", &mut bad, &tag),
                Err(Error::Authentication)
            );
        }
        for i in 0..TAG_LEN * 8 {
            let mut bad_tag = tag;
            bad_tag[i / 8] ^= 1 << (i % 8);
            let mut c = ct;
            assert_eq!(
                dk.open(1, 2, b"h", &mut c, &bad_tag),
                Err(Error::Authentication)
            );
        }
        // Same bytes at another position, unit or header: refused.
        let mut c = ct;
        assert_eq!(
            dk.open(1, 3, b"h", &mut c, &tag),
            Err(Error::Authentication)
        );
        assert_eq!(
            dk.open(2, 2, b"h", &mut c, &tag),
            Err(Error::Authentication)
        );
        assert_eq!(
            dk.open(1, 2, b"H", &mut c, &tag),
            Err(Error::Authentication)
        );
        dk.open(1, 2, b"h", &mut c, &tag).expect("open");
        assert_eq!(c, plain);
    }

    /// Rotation appends a current key and keeps the older ones reachable by id;
    /// retiring removes an older key only; a lone key file is a ring of one.
    #[test]
    fn rotation_and_retirement() {
        let (first, text) = Kek::generate_key_file().expect("rng");
        assert!(first.older_ids().is_empty());
        let (ring, text2) = Kek::rotated_key_file(&text).expect("rotate");
        assert!(text2.starts_with(&text), "the old text is kept as it is");
        assert_ne!(ring.id(), first.id());
        assert_eq!(ring.older_ids(), vec![first.id()]);
        let parsed = Kek::parse_key_file(&text2).expect("parse");
        assert_eq!(parsed.id(), ring.id());
        assert_eq!(parsed.older_ids(), vec![first.id()]);
        // A data key wrapped under the first key still unwraps through the ring,
        // and new wraps use the current key.
        let dk = DataKey::from_bytes(&[3; 16]);
        let w = first.wrap(&dk, b"a").expect("wrap");
        let old = parsed.for_id(first.id()).expect("older key in the ring");
        old.unwrap(&w, b"a").expect("unwrap with the older key");
        assert_eq!(parsed.unwrap(&w, b"a").err(), Some(Error::Authentication));
        assert!(parsed.for_id(KeyId([0; 8])).is_none());
        let (ring3, text3) = Kek::rotated_key_file(&text2).expect("rotate again");
        assert_eq!(ring3.older_ids(), vec![first.id(), ring.id()]);
        assert_eq!(
            Kek::key_file_without(&text3, ring3.id()).err(),
            Some(KeyFileError::RetireCurrent(ring3.id()))
        );
        assert_eq!(
            Kek::key_file_without(&text3, KeyId([1; 8])).err(),
            Some(KeyFileError::NotInRing(KeyId([1; 8])))
        );
        let retired = Kek::key_file_without(&text3, first.id()).expect("retire");
        let back = Kek::parse_key_file(&retired).expect("parse");
        assert_eq!(back.id(), ring3.id());
        assert_eq!(back.older_ids(), vec![ring.id()]);
        assert!(retired.contains("# added by key rotation"));
        assert_eq!(
            Kek::rotated_key_file("# nothing\n").err(),
            Some(RotateError::Format(KeyFileError::Missing))
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const KEK_ID_HEX: &str = "7facb18cf132385d";
    const WRAPPED_HEX: &str =
        "222222222222222222222222649793007d486fbbf369c5851c65b20f7296292b5b420b3aa5580335b3a9979e";
    const SEALED_HEX: &str = "88e34e967a7f1bab9f5d8c9783c76479";
    const TAG_HEX: &str = "2809dc6f4fcaec21d8dc01597464b1b7";
    const SUBKEY_P_HEX: &str = "d19c2ec5408a5e39";
}
