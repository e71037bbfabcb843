//! `ferryd --config FILE`: runs one ferry node; `ferryd --check-config FILE` validates
//! one. Owns the process edges: logging set-up, the single-instance lock, how a fatal
//! error is printed, and the re-exec after a role change.
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;
use clap::Parser;
use ferryd::cli::{Args, LogFormat};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return check_config(path);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or the journal they are
    // noise that breaks grep.
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let format = args.log_format;
    match format {
        LogFormat::Text => sub.init(),
        LogFormat::Json => sub.json().init(),
    }
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once: as a JSON record where logs are machine-read, else as a plain line.
            let msg = ferryd::error_chain(&e);
            match format {
                LogFormat::Json => tracing::error!("{msg}"),
                LogFormat::Text => eprintln!("ferryd: {msg}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the same load and validation as a start, nothing else.
fn check_config(path: &Path) -> std::process::ExitCode {
    match ferry_api::config::Config::load(path) {
        Ok(cfg) => {
            println!(
                "config OK: {} (node {}, {})",
                path.display(),
                cfg.node.name,
                cfg.node.role
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferryd: {}", ferryd::error_chain(&e.into()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = &args.config else {
        anyhow::bail!("--config FILE is required");
    };
    let cfg = ferry_api::config::Config::load(config)?;
    let _lock = lock_node(&cfg.node.metadata_dir)?;
    // Test builds only (feature `failpoints`): faults named in $FAILPOINTS are armed
    // for the life of the process (daemon/FAILPOINTS.md).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .thread_name("ferryd-rt")
        .build()
        .context("starting the async runtime")?;
    // The handlers go in before anything is served: created inside the future, they
    // were installed only at its first poll, after the ready line, so a SIGTERM sent
    // right after it took the default action and killed the process mid-serve.
    let shutdown = {
        let _rt = rt.enter();
        shutdown_signal()
    };
    let exit = rt.block_on(ferryd::node::run_from(cfg, Some(config.clone()), shutdown))?;
    drop(rt);
    if exit == ferryd::node::Exit::Restart {
        // Same PID (systemd keeps tracking it), fresh process: the new role starts from
        // recovery exactly as after a restart. Every fd of ours is close-on-exec.
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("locating the ferryd binary")?;
        let err = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .exec();
        return Err(anyhow::anyhow!("re-executing {}: {err}", exe.display()));
    }
    Ok(())
}

/// Takes the node's single-instance lock: an exclusive `flock` on
/// `<metadata_dir>/ferryd.pid`, which then holds our pid. Held until the process ends
/// or re-executes (the descriptor is close-on-exec, and the new image takes it again).
/// A second ferryd on the same node learns who holds it instead of redb's bare
/// "Database already open".
fn lock_node(metadata_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(metadata_dir)
        .with_context(|| format!("creating {}", metadata_dir.display()))?;
    let path = metadata_dir.join("ferryd.pid");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        let mut text = String::new();
        // The holder may not have written its pid yet: then say so, not a wrong number.
        let pid = match file.read_to_string(&mut text) {
            Ok(_) if !text.trim().is_empty() => text.trim().to_string(),
            _ => "unknown".to_string(),
        };
        anyhow::bail!(
            "another ferryd (pid {pid}) runs this node (metadata {}); stop it first, or give this one its own config",
            metadata_dir.display()
        );
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// Async workers: half the cores (at least one), because the journal writer, its
/// completion thread and the segment helper are threads of their own; on 2 cores one
/// worker measured ~7% more 4k write IOPS than two (fewer cross-thread wake-ups).
/// `TOKIO_WORKER_THREADS` overrides.
fn worker_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2).max(1)
}

/// SIGTERM (systemd stop) or SIGINT (Ctrl-C) start a drain; a second one is ignored
/// because the drain is already bounded. The handlers are installed when this is
/// called (inside the runtime), not when the returned future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// mimalloc instead of glibc malloc: every NBD request allocates and frees a few small
/// objects (task, buffers, channel) across threads, and glibc's arena locking and
/// fastbin consolidation showed in profiles; 4k random writes at QD32 measured ~10%
/// more IOPS with it (README, "Dependencies").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
