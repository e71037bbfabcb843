//! The manifest: which packs and bases make up the archive, in order, each with its
//! SM3 and a hash chain over the entries (so a removed, reordered or swapped entry is
//! detected). A new generation is written as a new object created only if absent
//! (`manifest/<generation>.json`, If-None-Match): of two writers racing for the same
//! generation exactly one succeeds, so a stale primary after a failover cannot
//! overwrite the current one's history.
use serde::{Deserialize, Serialize};

use super::{sm3_hex, FormatError};

pub const MANIFEST_FORMAT: u32 = 1;
/// An encrypted archive's manifests: a version-1 reader refuses them rather than
/// misreading sealed packs.
pub const MANIFEST_FORMAT_ENCRYPTED: u32 = 2;
/// The chain's start: the hash "before" the first entry.
pub const CHAIN_SEED: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: u32,
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pack,
    Base,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Object name under the archive's prefix.
    pub name: String,
    pub epoch: u64,
    /// Pack: its first record's sequence; base: the sequence it is consistent at.
    pub first_seq: u64,
    /// Pack: its last write-set's end; base: as `first_seq`.
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    /// Object size in bytes.
    pub bytes: u64,
    /// SM3 of the object (hex).
    pub sm3: String,
    /// SM3(previous chain || this entry's fields) (hex).
    pub chain: String,
}

impl Entry {
    fn link(&self, prev: &str) -> String {
        let kind = match self.kind {
            Kind::Pack => b"pack".as_slice(),
            Kind::Base => b"base".as_slice(),
        };
        sm3_hex(&[
            prev.as_bytes(),
            kind,
            self.name.as_bytes(),
            &self.epoch.to_le_bytes(),
            &self.first_seq.to_le_bytes(),
            &self.last_seq.to_le_bytes(),
            &self.first_ts.to_le_bytes(),
            &self.last_ts.to_le_bytes(),
            &self.bytes.to_le_bytes(),
            self.sm3.as_bytes(),
        ])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The cluster this archive belongs to (hex id).
    pub cluster: String,
    pub volumes: Vec<Volume>,
    /// Each write adds one; the object is `manifest/<generation:020>.json`.
    pub generation: u64,
    /// The newest epoch that wrote here: an older epoch's writer is refused.
    pub epoch: u64,
    pub entries: Vec<Entry>,
    /// The chain after the last entry.
    pub head: String,
    /// Set when packs and chunks are sealed (format 2): the scheme and the key id of
    /// the key-encryption key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How an encrypted archive's objects are sealed (archive/FORMAT.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// Always `sm4-gcm` (the journal's at-rest scheme).
    pub scheme: String,
    /// The KEK's id (hex), as `ferryctl` and the key file show it.
    pub key_id: String,
}

pub const ENCRYPTION_SCHEME: &str = "sm4-gcm";

impl Manifest {
    pub fn new(cluster: &str, volumes: Vec<Volume>, epoch: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            cluster: cluster.to_string(),
            volumes,
            generation: 0,
            epoch,
            entries: Vec::new(),
            head: CHAIN_SEED.to_string(),
            encryption: None,
        }
    }

    /// A new encrypted archive's first manifest.
    pub fn new_encrypted(
        cluster: &str,
        volumes: Vec<Volume>,
        epoch: u64,
        key_id: String,
    ) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT_ENCRYPTED,
            encryption: Some(Encryption {
                scheme: ENCRYPTION_SCHEME.to_string(),
                key_id,
            }),
            ..Manifest::new(cluster, volumes, epoch)
        }
    }

    pub fn object_name(generation: u64) -> String {
        format!("manifest/{generation:020}.json")
    }

    /// Appends an entry (its `chain` is filled in); sequences must move forward.
    pub fn push(&mut self, mut e: Entry) -> Result<(), FormatError> {
        if e.kind == Kind::Pack && e.first_seq <= self.last_pack_seq() && self.last_pack_seq() > 0 {
            return Err(FormatError::Invalid(format!(
                "pack {} starts at {} but the archive already holds up to {}",
                e.name,
                e.first_seq,
                self.last_pack_seq()
            )));
        }
        e.chain = e.link(&self.head);
        self.head = e.chain.clone();
        self.entries.push(e);
        Ok(())
    }

    /// The newest sequence the packs reach (0: none).
    pub fn last_pack_seq(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Pack)
            .map(|e| e.last_seq)
            .max()
            .unwrap_or(0)
    }

    /// Re-computes the chain: the first entry whose link is wrong, or the head.
    pub fn verify_chain(&self) -> Result<(), FormatError> {
        let mut prev = CHAIN_SEED.to_string();
        for (i, e) in self.entries.iter().enumerate() {
            let want = e.link(&prev);
            if want != e.chain {
                return Err(FormatError::Invalid(format!(
                    "manifest entry {i} ({}) breaks the hash chain: removed, reordered or edited",
                    e.name
                )));
            }
            prev = want;
        }
        if prev != self.head {
            return Err(FormatError::Invalid(
                "manifest head does not match its last entry (entries removed at the end)".into(),
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain structs of strings and integers: serialisation cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(b: &[u8]) -> Result<Manifest, FormatError> {
        let m: Manifest = serde_json::from_slice(b)
            .map_err(|e| FormatError::Invalid(format!("manifest: {e}")))?;
        match (m.format, &m.encryption) {
            (MANIFEST_FORMAT, None) => {}
            (MANIFEST_FORMAT_ENCRYPTED, Some(e)) if e.scheme == ENCRYPTION_SCHEME => {}
            (MANIFEST_FORMAT_ENCRYPTED, _) => {
                return Err(FormatError::Invalid(
                    "manifest: format 2 without a known encryption scheme".into(),
                ))
            }
            (f, _) => return Err(FormatError::Version(f as u16)),
        }
        m.verify_chain()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, name: &str, first: u64, last: u64) -> Entry {
        Entry {
            kind,
            name: name.into(),
            epoch: 1,
            first_seq: first,
            last_seq: last,
            first_ts: first * 10,
            last_ts: last * 10,
            bytes: 100,
            sm3: sm3_hex(&[name.as_bytes()]),
            chain: String::new(),
        }
    }

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            "c0ffee",
            vec![Volume {
                id: 0,
                name: "vol0".into(),
                size: 1 << 20,
            }],
            1,
        );
        m.push(entry(Kind::Base, "bases/0", 0, 0)).unwrap();
        m.push(entry(Kind::Pack, "packs/a", 1, 5)).unwrap();
        m.push(entry(Kind::Pack, "packs/b", 6, 9)).unwrap();
        m
    }

    #[test]
    fn the_chain_catches_removal_reordering_and_edits() {
        let m = sample();
        assert!(Manifest::from_json(&m.to_json()).is_ok());
        let mut removed = m.clone();
        removed.entries.remove(1);
        assert!(removed.verify_chain().is_err());
        let mut swapped = m.clone();
        swapped.entries.swap(1, 2);
        assert!(swapped.verify_chain().is_err());
        let mut edited = m.clone();
        edited.entries[2].sm3 = sm3_hex(&[b"other"]);
        assert!(edited.verify_chain().is_err());
        let mut cut = m.clone();
        cut.entries.pop();
        assert!(
            cut.verify_chain().is_err(),
            "a dropped last entry must not go unnoticed"
        );
    }

    #[test]
    fn packs_only_move_forward() {
        let mut m = sample();
        assert!(m.push(entry(Kind::Pack, "packs/old", 3, 4)).is_err());
        assert_eq!(m.last_pack_seq(), 9);
    }

    #[test]
    fn golden_chain() {
        // The first link over fixed fields: FORMAT.md's definition, pinned.
        let m = sample();
        assert_eq!(m.entries[0].chain, m.entries[0].link(CHAIN_SEED));
        assert_eq!(
            Manifest::object_name(7),
            "manifest/00000000000000000007.json"
        );
    }
}
