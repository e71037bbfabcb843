//! Serve one in-memory export over NBD, for trying clients by hand and for
//! quick measurements (`qemu-img bench`, `nbdinfo`, `nbdcopy`):
//!
//! ```text
//! cargo run --release -p ferry-nbd --features test-util --example serve_mem -- 127.0.0.1:10809 256 fill
//! ```
//!
//! Arguments: listen address, size in MiB, and `fill` to write the whole
//! export first (otherwise it starts as one hole). Runs until killed.

use std::sync::Arc;

use ferry_nbd::{MapRegistry, MemExport, ServerConfig};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let fill = args.next().as_deref() == Some("fill");
    let vol = Arc::new(MemExport::new("vol0", mib << 20).with_fast_zero(true));
    if fill {
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        for m in 0..mib {
            vol.fill(m << 20, &chunk);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("serving vol0 ({mib} MiB) on nbd://{}/vol0", l.local_addr()?);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let reg = Arc::new(MapRegistry::new(vec![vol]));
        ferry_nbd::serve(l, reg, ServerConfig::default(), rx).await
    })
}
