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

use crate::format::manifest::Manifest;
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
}

impl std::fmt::Debug for ArchiveStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArchiveStore({})", self.url)
    }
}

impl ArchiveStore {
    /// Opens the store behind `url` (a `file://` directory is created if missing).
    pub fn open(url: &str) -> Result<ArchiveStore, StoreError> {
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
        })
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
        Ok(Some(m))
    }
}
