//! The archive's object store, named by a URL: `s3://bucket/prefix` (any
//! S3-compatible service; credentials and endpoint from the environment: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` — never from ferry's config)
//! or `file:///dir` (tests, NAS). Only what the archive needs: immutable puts, a
//! create-if-absent put for manifests, gets and listing.
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use ferry_gm::atrest::Kek;

use crate::format::base::{chunk_object, CHUNK_SIZE};
use crate::format::manifest::Manifest;
use crate::format::sealed::{self, ObjectKind, SealError};
use crate::format::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive URL '{url}': {why}")]
    Url { url: String, why: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("{name}: {source}")]
    Format { name: String, source: FormatError },
    #[error("{name}: SM3 differs from the manifest's: the object was changed or replaced")]
    Digest { name: String },
    #[error("another writer created manifest generation {generation} first: this writer is stale (a newer primary archives here)")]
    LostRace { generation: u64 },
    #[error("{0}")]
    Refused(String),
    #[error("{name}: {source}")]
    Sealed { name: String, source: SealError },
    #[error("the archive is encrypted with key {0}: give its key file")]
    KeyNeeded(String),
    #[error("the archive is encrypted with key {stored}, but the key file holds key {given}")]
    WrongKey { stored: String, given: String },
    #[error("the archive is not encrypted, but a key was given (key {0}): an archive is encrypted from its first object or never")]
    NotEncrypted(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    /// The key-encryption key: packs and chunks are sealed with its current key and
    /// opened with the key each names (a ring after a rotation).
    kek: Option<Kek>,
    /// The key an existing encrypted archive was begun with (its manifest's key
    /// id): chunk ids are keyed by it for the archive's whole life, whatever the
    /// ring's current key, or deduplication and chunk checks would break after a
    /// rotation. Set by [`ArchiveStore::check_key`]; unset: the current key (a new
    /// archive records that one).
    archive_key: std::sync::OnceLock<ferry_gm::atrest::KeyId>,
    /// Object lock (WORM) retention in days: no object younger is ever deleted.
    lock_days: Option<u64>,
}

/// One listed object: its name under the prefix, size and last modification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub bytes: u64,
    /// ns since the Unix epoch (the store's clock).
    pub modified_ns: u64,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArchiveStore({})", self.url)
    }
}

impl ArchiveStore {
    /// Opens the store behind `url` (a `file://` directory is created if missing).
    pub fn open(url: &str) -> Result<ArchiveStore, StoreError> {
        ArchiveStore::open_locked(url, None)
    }

    /// As [`open`](Self::open), for a bucket with S3 Object Lock: every upload carries
    /// a SHA-256 checksum (S3 refuses a PUT into a locked bucket without one), and
    /// [`delete`](Self::delete) refuses objects younger than `lock_days`. The lock
    /// itself is the bucket's default retention (object_store 0.12 cannot set the
    /// per-object `x-amz-object-lock-*` headers; FORMAT.md, "Object lock").
    pub fn open_locked(url: &str, lock_days: Option<u64>) -> Result<ArchiveStore, StoreError> {
        let bad = |why: &str| StoreError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not an absolute file path"))?;
                std::fs::create_dir_all(&dir)?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
                (Arc::new(fs), String::new())
            }
            "s3" => {
                let bucket = parsed.host_str().ok_or_else(|| bad("no bucket"))?;
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                if lock_days.is_some() {
                    b = b.with_checksum_algorithm(object_store::aws::Checksum::SHA256);
                }
                if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                    // A loopback or on-premises endpoint (MinIO, Ceph RGW) often speaks
                    // plain HTTP and path-style addressing.
                    b = b
                        .with_endpoint(&endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                let s3 = b.build().map_err(|e| bad(&e.to_string()))?;
                (Arc::new(s3), parsed.path().trim_matches('/').to_string())
            }
            s => return Err(bad(&format!("scheme '{s}' (use s3:// or file://)"))),
        };
        Ok(ArchiveStore {
            store,
            prefix: ObjPath::from(prefix),
            url: url.to_string(),
            kek: None,
            archive_key: std::sync::OnceLock::new(),
            lock_days,
        })
    }

    /// The object lock retention in days, if any.
    pub fn lock_days(&self) -> Option<u64> {
        self.lock_days
    }

    /// Whether an object modified at `modified_ns` is still locked at `now_ns`.
    pub fn locked(&self, modified_ns: u64, now_ns: u64) -> bool {
        self.lock_days.is_some_and(|d| {
            modified_ns.saturating_add(d.saturating_mul(86_400_000_000_000)) > now_ns
        })
    }

    /// This store with the node's key-encryption key: a new archive is created
    /// encrypted, an existing one must have been encrypted with this key.
    pub fn with_kek(mut self, kek: Option<Kek>) -> ArchiveStore {
        self.kek = kek;
        self
    }

    pub fn kek(&self) -> Option<&Kek> {
        self.kek.as_ref()
    }

    /// Refuses `m` unless its encryption matches the key given (none for none).
    pub fn check_key(&self, m: &Manifest) -> Result<(), StoreError> {
        match (&m.encryption, &self.kek) {
            (None, None) => Ok(()),
            (Some(e), None) => Err(StoreError::KeyNeeded(e.key_id.clone())),
            (None, Some(k)) => Err(StoreError::NotEncrypted(k.id().to_string())),
            (Some(e), Some(k)) => match ring_key(k, &e.key_id) {
                Some(id) => {
                    // One archive per store: the first manifest checked pins it.
                    let _ = self.archive_key.set(id);
                    Ok(())
                }
                None => Err(StoreError::WrongKey {
                    stored: e.key_id.clone(),
                    given: k.id().to_string(),
                }),
            },
        }
    }

    /// Seals `plain` as object `name` when the archive is encrypted.
    pub fn seal(
        &self,
        kind: ObjectKind,
        name: &str,
        plain: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        match &self.kek {
            None => Ok(plain),
            Some(k) => sealed::seal(k, kind, name, &plain).map_err(|source| StoreError::Sealed {
                name: name.to_string(),
                source,
            }),
        }
    }

    /// The plaintext of stored object `name`: opened when the archive is encrypted; a
    /// sealed object without a key is refused naming its key id.
    pub fn unseal(&self, kind: ObjectKind, name: &str, stored: Bytes) -> Result<Bytes, StoreError> {
        let err = |source| StoreError::Sealed {
            name: name.to_string(),
            source,
        };
        match &self.kek {
            Some(k) => Ok(sealed::open(k, kind, name, &stored).map_err(err)?.into()),
            None if sealed::is_sealed(&stored) => {
                Err(err(SealError::NoKey(sealed::key_id(&stored).map_err(err)?)))
            }
            None => Ok(stored),
        }
    }

    /// A chunk's id: SM3 of its bytes, or in an encrypted archive HMAC-SM3 under a
    /// key derived from the KEK (FORMAT.md: why ids are keyed).
    pub fn chunk_id(&self, data: &[u8]) -> Option<String> {
        use hmac::{Hmac, KeyInit, Mac};
        if data.iter().all(|&b| b == 0) {
            return None;
        }
        let Some(k) = &self.kek else {
            return crate::format::base::chunk_id(data);
        };
        // HMAC pads a key shorter than the block (64 bytes) with zeros: done here so
        // the infallible block-sized constructor applies.
        let k = self
            .archive_key
            .get()
            .and_then(|&id| k.for_id(id))
            .unwrap_or(k);
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&k.subkey(CHUNK_ID_PURPOSE));
        let mut mac = Hmac::<sm3::Sm3>::new(&key.into());
        key.iter_mut().for_each(|b| *b = 0);
        mac.update(data);
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// Stores a chunk's bytes (compressed, then sealed in an encrypted archive);
    /// returns the stored size.
    pub async fn put_chunk(&self, id: &str, data: &[u8], level: i32) -> Result<u64, StoreError> {
        let name = chunk_object(id);
        let z = zstd::bulk::compress(data, level)?;
        let stored = self.seal(ObjectKind::Chunk, &name, z)?;
        let n = stored.len() as u64;
        self.put(&name, stored).await?;
        Ok(n)
    }

    /// Chunk `id`'s bytes, `want` long, checked against its id; with the stored size.
    pub async fn get_chunk(&self, id: &str, want: usize) -> Result<(Vec<u8>, u64), StoreError> {
        let name = chunk_object(id);
        let stored = self.get(&name).await?;
        let n = stored.len() as u64;
        let z = self.unseal(ObjectKind::Chunk, &name, stored)?;
        let data = zstd::bulk::decompress(&z, CHUNK_SIZE as usize)
            .map_err(|_| StoreError::Digest { name: name.clone() })?;
        if data.len() != want || self.chunk_id(&data).as_deref() != Some(id) {
            return Err(StoreError::Digest { name });
        }
        Ok((data, n))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            p = p.child(part);
        }
        p
    }

    /// Writes an immutable object (a pack, chunk or base: the same name always holds the
    /// same bytes, so a retried upload after a crash rewrites it harmlessly).
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// Creates `name` only if absent: `Ok(false)` when it exists already.
    pub async fn create(&self, name: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(name), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        Ok(self.store.get(&self.path(name)).await?.bytes().await?)
    }

    /// Bytes `range` of object `name` (clipped by the store at the object's end): how
    /// a reader takes a pack's header and extent index without its body.
    pub async fn get_range(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        Ok(self.store.get_range(&self.path(name), range).await?)
    }

    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        match self.store.head(&self.path(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Names (relative to the prefix) under `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let base = self.path(dir);
        let strip = if self.prefix.as_ref().is_empty() {
            0
        } else {
            self.prefix.as_ref().len() + 1
        };
        let metas: Vec<_> = self.store.list(Some(&base)).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| m.location.as_ref()[strip..].to_string())
            .collect())
    }

    /// Names, sizes and modification times under `dir`.
    pub async fn list_meta(&self, dir: &str) -> Result<Vec<Listed>, StoreError> {
        let base = self.path(dir);
        let strip = if self.prefix.as_ref().is_empty() {
            0
        } else {
            self.prefix.as_ref().len() + 1
        };
        let metas: Vec<_> = self.store.list(Some(&base)).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                name: m.location.as_ref()[strip..].to_string(),
                bytes: m.size,
                modified_ns: m
                    .last_modified
                    .timestamp_nanos_opt()
                    .map_or(0, |n| n.max(0) as u64),
            })
            .collect())
    }

    /// Deletes `listed` (gone already: fine). Refused while object lock holds it: the
    /// archive's own garbage collection never asks the store to break a lock.
    pub async fn delete(&self, listed: &Listed, now_ns: u64) -> Result<(), StoreError> {
        if self.locked(listed.modified_ns, now_ns) {
            return Err(StoreError::Refused(format!(
                "{}: under object lock for {} days after its upload ({} s ago)",
                listed.name,
                self.lock_days.unwrap_or(0),
                now_ns.saturating_sub(listed.modified_ns) / 1_000_000_000
            )));
        }
        match self.store.delete(&self.path(&listed.name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a manifest generation newer than `generation` exists. A create of
    /// generation G can succeed although a newer one exists when garbage collection
    /// deleted an old G (a writer idle across compactions): such a G is never the
    /// newest, so the committer treats it as a lost race (FORMAT.md, "Writers").
    pub async fn newer_manifest(&self, generation: u64) -> Result<bool, StoreError> {
        let offset = self.path(&Manifest::object_name(generation));
        let mut newer = self
            .store
            .list_with_offset(Some(&self.path("manifest")), &offset);
        Ok(newer.try_next().await?.is_some())
    }

    /// The newest manifest, its chain verified; `None` for an empty archive.
    pub async fn latest_manifest(&self) -> Result<Option<Manifest>, StoreError> {
        let mut names = self.list("manifest").await?;
        names.sort();
        let Some(name) = names.pop() else {
            return Ok(None);
        };
        let bytes = self.get(&name).await?;
        let m = Manifest::from_json(&bytes).map_err(|source| StoreError::Format {
            name: name.clone(),
            source,
        })?;
        if Manifest::object_name(m.generation) != name {
            return Err(StoreError::Refused(format!(
                "{name} holds generation {}",
                m.generation
            )));
        }
        self.check_key(&m)?;
        Ok(Some(m))
    }
}

/// The id of the key of ring `k` whose hex id is `hex`, if the ring holds it.
fn ring_key(k: &Kek, hex: &str) -> Option<ferry_gm::atrest::KeyId> {
    std::iter::once(k.id())
        .chain(k.older_ids())
        .find(|id| id.to_string() == hex)
}

/// What the chunk-id MAC key is derived for (ferry-gm `Kek::subkey`).
const CHUNK_ID_PURPOSE: &[u8] = b"ferry archive chunk id";
