//! `ferryctl archive export`: one archived point of a volume served read-only over NBD
//! straight from the archive ([`ferry_archive::view`] does the indexing, fetching,
//! checking and caching; this module puts it behind ferry-nbd and runs until a
//! signal). Every request is logged only when it fails: a missing or changed object
//! is an EIO to the client and a line on stderr naming the object.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use ferry_api::timefmt::format_rfc3339;
use ferry_archive::view::{ArchiveView, ViewOptions};
use ferry_archive::ArchiveStore;
use ferry_nbd::{Export, ExportError, ExportFlags, ExportRegistry, Extent};
use ferryctl::cli::ArchivePointArgs;
use serde_json::json;

/// How to serve the view.
pub struct Serve {
    pub listen: String,
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes: u64,
    pub json: bool,
}

struct ViewExport {
    view: ArchiveView,
}

impl ViewExport {
    /// The client gets EIO; the operator gets the object's name.
    fn failed(&self, what: &str, offset: u64, len: u64, e: impl std::fmt::Display) -> ExportError {
        eprintln!(
            "ferryctl archive export: {what} {offset}+{len} of '{}' failed: {e}",
            self.view.info().volume
        );
        ExportError::Io(e.to_string())
    }
}

const READ_ONLY: &str = "an archived point is read-only";

impl Export for ViewExport {
    fn name(&self) -> &str {
        &self.view.info().volume
    }

    fn size(&self) -> u64 {
        self.view.info().size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: true,
            can_trim: false,
            can_write_zeroes: false,
            // Immutable content: every connection sees the same bytes.
            can_multi_conn: true,
            send_fua: false,
            send_flush: false,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.view
            .read(offset, len as u64)
            .await
            .map(Bytes::from)
            .map_err(|e| self.failed("read", offset, len as u64, e))
    }

    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly(READ_ONLY.into()))
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    async fn trim(&self, _: u64, _: u32) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly(READ_ONLY.into()))
    }

    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly(READ_ONLY.into()))
    }

    async fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        Ok(self
            .view
            .extents(offset, len, max)
            .into_iter()
            .map(|e| {
                if e.hole {
                    Extent::hole(e.len)
                } else {
                    Extent::data(e.len)
                }
            })
            .collect())
    }
}

/// The one export, under its volume's name and as the default.
struct OneExport(Arc<ViewExport>);

impl ExportRegistry for OneExport {
    type E = ViewExport;

    fn lookup(&self, name: &str) -> Option<Arc<ViewExport>> {
        (name.is_empty() || name == self.0.name()).then(|| self.0.clone())
    }

    fn names(&self) -> Vec<String> {
        vec![self.0.name().to_string()]
    }

    fn default_export(&self) -> Option<String> {
        Some(self.0.name().to_string())
    }
}

/// The volume to serve: the one named, or the archive's only one.
async fn volume_name(store: &ArchiveStore, volume: Option<&str>) -> anyhow::Result<String> {
    if let Some(v) = volume {
        return Ok(v.to_string());
    }
    let m = store
        .latest_manifest()
        .await?
        .with_context(|| format!("{} holds no archive", store.url()))?;
    match m.volumes.as_slice() {
        [one] => Ok(one.name.clone()),
        vols => anyhow::bail!(
            "the archive holds {} volumes ({}): name one with --volume",
            vols.len(),
            vols.iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn export(
    url: &str,
    key_file: Option<&std::path::Path>,
    volume: Option<&str>,
    point: &ArchivePointArgs,
    serve: Serve,
) -> anyhow::Result<()> {
    let target = crate::archive::target(point)?;
    let store = crate::archive::open_store(url, key_file)?;
    let listener = std::net::TcpListener::bind(&serve.listen)
        .with_context(|| format!("binding the NBD listener on {}", serve.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // Reads fetch objects while other connections' reads run: two workers, the
    // machine's usual share.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the IO runtime")?;
    rt.block_on(async {
        let name = volume_name(&store, volume).await?;
        let opts = ViewOptions {
            cache_bytes: serve.cache_bytes,
            cache_dir: serve.cache_dir.clone(),
        };
        let view = ArchiveView::open(store, &name, &target, opts)
            .await
            .with_context(|| format!("opening '{name}' in {url}"))?;
        announce(&view, addr, serve.json);
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = stop.send(true);
        });
        let registry = Arc::new(OneExport(Arc::new(ViewExport { view })));
        let cfg = ferry_nbd::ServerConfig {
            shutdown_grace: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        ferry_nbd::serve(listener, registry, cfg, stop_rx)
            .await
            .context("NBD server")
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default disposition still ends the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// One line once the export is ready: scripts wait for it before connecting.
fn announce(view: &ArchiveView, addr: std::net::SocketAddr, json_out: bool) {
    use std::io::Write;
    let i = view.info();
    let uri = format!("nbd://{addr}/{}", i.volume);
    if json_out {
        println!(
            "{}",
            json!({
                "volume": i.volume,
                "size": i.size,
                "seq": i.seq,
                "time": format_rfc3339(i.timestamp_ns),
                "base_seq": i.base_seq,
                "packs_read": i.packs_read,
                "indexes_read": i.indexes_read,
                "bytes_read": i.bytes_read,
                "runs": i.runs,
                "chunks_stored": i.chunks_stored,
                "open_seconds": i.open_time.as_secs_f64(),
                "listen": addr.to_string(),
                "uri": uri,
            })
        );
    } else {
        println!(
            "exporting '{}' at seq {} ({}) read-only on {uri}: base at seq {}, {} packs indexed ({} read whole, {} runs), {} chunks stored; opened in {:.3} s",
            i.volume,
            i.seq,
            format_rfc3339(i.timestamp_ns),
            i.base_seq,
            i.packs_read + i.indexes_read,
            i.packs_read,
            i.runs,
            i.chunks_stored,
            i.open_time.as_secs_f64()
        );
    }
    let _ = std::io::stdout().flush();
}
