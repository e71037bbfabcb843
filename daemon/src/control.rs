//! Control socket: one JSON request per line, one JSON response per line, over a Unix
//! socket. `ferryctl` is the client. Requests: `{"cmd":"status"}`.
//!
//! The socket is created mode 0600 (root and the daemon's user); role-based access from
//! peer credentials arrives with the service-hardening work.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted; requests are tiny.
const MAX_REQUEST: usize = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(v: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result: Some(v),
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Binds the control socket. A leftover socket file from a crashed daemon is replaced;
/// a socket that still answers means another ferryd owns this node: refuse.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("control socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "control socket {} is live: another ferryd is running with this config",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod control socket {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    handler: Handler,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(stream, h).await {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn serve_one(stream: UnixStream, handler: Handler) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines.read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let resp = if line.len() > MAX_REQUEST {
            Response::err(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => handler(req),
                Err(e) => Response::err(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

use tokio::io::AsyncReadExt;

/// Client side, used by `ferryctl`: one request, one response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach ferryd at {} (is it running with this config?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reader = std::io::BufReader::new(s);
    let mut resp = String::new();
    reader
        .read_line(&mut resp)
        .context("reading ferryd's response")?;
    serde_json::from_str(&resp).with_context(|| format!("malformed response from ferryd: {resp:?}"))
}
