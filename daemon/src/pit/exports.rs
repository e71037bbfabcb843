//! Point-in-time views exported over NBD, each on its own listener, with its own
//! one-export registry; unexporting stops the server and drops the view.
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use serde_json::json;

use super::{Pit, PitView, Target};
use crate::store::base::Base;
use ferry_api::status::PitExport;
use ferry_api::timefmt::format_rfc3339;

/// Point-in-time views served over NBD, each on its own listener.
pub struct PitExports {
    pit: Arc<Pit>,
    scratch_dir: PathBuf,
    list: Mutex<Vec<ServedView>>,
}

struct ServedView {
    view: Arc<PitView>,
    addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The one-export registry of a view's NBD server.
struct ViewRegistry(Arc<PitView>);

impl ferry_nbd::ExportRegistry for ViewRegistry {
    type E = PitView;
    fn lookup(&self, name: &str) -> Option<Arc<PitView>> {
        (name == self.0.volume()).then(|| self.0.clone())
    }
    fn names(&self) -> Vec<String> {
        vec![self.0.volume().to_string()]
    }
    fn default_export(&self) -> Option<String> {
        Some(self.0.volume().to_string())
    }
}

impl PitExports {
    pub fn new(pit: Arc<Pit>, scratch_dir: PathBuf) -> PitExports {
        // Overlays of a previous run are scratch by definition: drop them.
        if let Ok(rd) = std::fs::read_dir(&scratch_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        PitExports {
            pit,
            scratch_dir,
            list: Mutex::new(Vec::new()),
        }
    }

    /// Opens a view and serves it on `listen`. Must run inside the tokio runtime.
    pub fn export(
        &self,
        base: Arc<Base>,
        target: &Target,
        listen: std::net::SocketAddr,
        writable: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the view's NBD listener on {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let scratch = writable.then(|| {
            self.scratch_dir.join(format!(
                "{}-{}-{}.scratch",
                base.name,
                std::process::id(),
                self.pit.next_view.load(Ordering::Relaxed)
            ))
        });
        let view = self.pit.open_view(base, target, scratch)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let cfg = ferry_nbd::ServerConfig {
            shutdown_grace: Duration::from_secs(2),
            ..Default::default()
        };
        let registry = Arc::new(ViewRegistry(view.clone()));
        let id = view.id();
        let task = tokio::spawn(async move {
            if let Err(e) = ferry_nbd::serve(listener, registry, cfg, stop_rx).await {
                tracing::warn!(id, "point-in-time view server: {e}");
            }
        });
        let point = view.point();
        let out = json!({
            "id": id,
            "volume": view.volume(),
            "seq": point.seq,
            "time": format_rfc3339(point.timestamp_ns),
            "listen": addr.to_string(),
            "uri": format!("nbd://{addr}/{}", view.volume()),
            "writable": writable,
            "undo_entries_read": view.entries,
            "open_seconds": view.opened_in.as_secs_f64(),
        });
        tracing::info!(id, %addr, seq = point.seq, writable, "point-in-time view exported");
        self.list.lock().push(ServedView {
            view,
            addr,
            stop,
            task,
        });
        Ok(out)
    }

    /// Stops the views named (one id, or all), waiting for their servers to close;
    /// a writable view's overlay is deleted with it.
    pub async fn unexport(&self, id: Option<u64>, all: bool) -> anyhow::Result<Vec<u64>> {
        let taken: Vec<ServedView> = {
            let mut list = self.list.lock();
            match (id, all) {
                (_, true) => list.drain(..).collect(),
                (Some(id), false) => {
                    let Some(i) = list.iter().position(|v| v.view.id() == id) else {
                        bail!("no point-in-time view with id {id} is exported");
                    };
                    vec![list.remove(i)]
                }
                (None, false) => match list.len() {
                    0 => bail!("no point-in-time view is exported"),
                    1 => list.drain(..).collect(),
                    n => bail!("{n} views are exported: name one with its id, or use --all"),
                },
            }
        };
        let mut ids = Vec::new();
        for v in taken {
            let _ = v.stop.send(true);
            let _ = v.task.await;
            ids.push(v.view.id());
            tracing::info!(id = v.view.id(), addr = %v.addr, "point-in-time view unexported");
            // Last reference: the view unregisters (unpinning its undo) and its
            // overlay file is removed.
            drop(v.view);
        }
        Ok(ids)
    }

    pub fn status(&self) -> Vec<PitExport> {
        self.list
            .lock()
            .iter()
            .map(|v| {
                let p = v.view.point();
                PitExport {
                    id: v.view.id(),
                    volume: v.view.volume().to_string(),
                    seq: p.seq,
                    time: format_rfc3339(p.timestamp_ns),
                    listen: v.addr.to_string(),
                    writable: v.view.writable(),
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::testrig::rig;
    use ferry_journal::Op;

    /// Stale overlays of a previous run go at start; an exported view is listed,
    /// serves on its own listener and is gone (overlay and pin) once unexported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn views_export_list_and_unexport() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(1, &[(Op::Write, 0, 8192, 0xaa)]);
        r.apply(2, &[(Op::Write, 4096, 8192, 0xbb)]);
        let scratch = r._dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        std::fs::write(scratch.join("old.scratch"), b"stale").unwrap();
        let ex = PitExports::new(r.pit.clone(), scratch.clone());
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "stale overlay kept"
        );
        assert!(ex.is_empty());
        let err = ex.unexport(None, false).await.unwrap_err().to_string();
        assert!(err.contains("no point-in-time view"), "{err}");

        let local: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let out = ex
            .export(r.base.clone(), &Target::Seq(1), local, true)
            .unwrap();
        assert_eq!(out["seq"], 1);
        assert_eq!(out["writable"], true);
        let addr: std::net::SocketAddr = out["listen"].as_str().unwrap().parse().unwrap();
        assert_ne!(addr.port(), 0);
        // The listener accepts connections (the NBD handshake is the server's own test).
        tokio::net::TcpStream::connect(addr).await.unwrap();
        let st = serde_json::to_value(ex.status()).unwrap();
        assert_eq!(st.as_array().map(Vec::len), Some(1));
        assert_eq!(st[0]["id"], out["id"]);
        assert_eq!(st[0]["volume"], "v");
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            1,
            "no overlay"
        );
        assert_eq!(r.pit.window_numbers().views, 1);

        let ro = ex
            .export(r.base.clone(), &Target::Seq(2), local, false)
            .unwrap();
        let err = ex.unexport(None, false).await.unwrap_err().to_string();
        assert!(err.contains("2 views are exported"), "{err}");
        let gone = ex.unexport(ro["id"].as_u64(), false).await.unwrap();
        assert_eq!(gone, vec![ro["id"].as_u64().unwrap()]);
        let gone = ex.unexport(None, true).await.unwrap();
        assert_eq!(gone, vec![out["id"].as_u64().unwrap()]);
        assert!(ex.is_empty());
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "overlay left"
        );
        assert_eq!(r.pit.window_numbers().views, 0, "view still pinned");
    }
}
