//! Replies: simple replies and structured/extended chunks as built by the
//! request tasks, and the writer task that owns the socket's write half.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::debug;

use crate::proto::{self, Mode};

/// Permits held by a request until its reply has been written.
pub(crate) struct Permits {
    pub(crate) _count: OwnedSemaphorePermit,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

/// Header bytes of one reply message: a simple reply, or a chunk header
/// with the fixed part of its payload.
pub(crate) enum Head {
    Simple([u8; proto::SIMPLE_REPLY_LEN]),
    Chunk(proto::ChunkHead),
}

impl Head {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Head::Simple(b) => b,
            Head::Chunk(c) => c.as_bytes(),
        }
    }
}

/// One message on the wire: header, then the body if any.
pub(crate) struct Part {
    pub(crate) head: Head,
    pub(crate) body: Option<Bytes>,
}

/// A complete reply: every part is written back to back, so chunks of one
/// reply are never interleaved with other replies (allowed, but pointless).
pub(crate) struct Reply {
    pub(crate) first: Part,
    pub(crate) rest: Vec<Part>,
    pub(crate) _permits: Option<Permits>,
}

/// The request a reply answers, and how replies look on this connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyTo {
    pub(crate) mode: Mode,
    pub(crate) typ: u16,
    pub(crate) handle: u64,
    pub(crate) offset: u64,
}

impl ReplyTo {
    pub(crate) fn chunk(&self) -> proto::ChunkTo {
        proto::ChunkTo {
            mode: self.mode,
            handle: self.handle,
            req_offset: self.offset,
        }
    }

    /// Replies to this request are chunks (READ once structured replies are
    /// on, everything once extended headers are).
    pub(crate) fn chunked(&self) -> bool {
        match self.mode {
            Mode::Simple => false,
            Mode::Structured => self.typ == proto::CMD_READ,
            Mode::Extended => true,
        }
    }
}

impl Reply {
    pub(crate) fn single(first: Part, permits: Option<Permits>) -> Reply {
        Reply {
            first,
            rest: Vec::new(),
            _permits: permits,
        }
    }

    /// Success without data.
    pub(crate) fn ok(to: ReplyTo, permits: Option<Permits>) -> Reply {
        let head = if to.chunked() {
            Head::Chunk(proto::encode_none(to.chunk()))
        } else {
            Head::Simple(proto::encode_simple_reply(to.handle, 0))
        };
        Reply::single(Part { head, body: None }, permits)
    }

    /// Failure of the whole request. Once chunks are possible the error
    /// travels as an ERROR chunk, which carries a message for humans (the
    /// spec prefers it, and READ must never get a simple reply then).
    pub(crate) fn error(to: ReplyTo, errno: u32, msg: &str, permits: Option<Permits>) -> Reply {
        if to.mode == Mode::Simple {
            let head = Head::Simple(proto::encode_simple_reply(to.handle, errno));
            return Reply::single(Part { head, body: None }, permits);
        }
        Reply::single(error_part(to, true, errno, msg, None), permits)
    }

    /// A read's data in one piece.
    pub(crate) fn data(to: ReplyTo, data: Bytes, permits: Permits) -> Reply {
        let head = if to.mode == Mode::Simple {
            Head::Simple(proto::encode_simple_reply(to.handle, 0))
        } else {
            Head::Chunk(proto::encode_offset_data(
                to.chunk(),
                true,
                to.offset,
                data.len(),
            ))
        };
        Reply::single(
            Part {
                head,
                body: Some(data),
            },
            Some(permits),
        )
    }
}

pub(crate) fn error_part(to: ReplyTo, done: bool, errno: u32, msg: &str, at: Option<u64>) -> Part {
    let payload = proto::error_payload(errno, msg, at);
    Part {
        head: Head::Chunk(proto::encode_error(
            to.chunk(),
            done,
            at.is_some(),
            payload.len(),
        )),
        body: Some(Bytes::from(payload)),
    }
}

pub(crate) async fn writer_task<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Reply>,
    mut wr: BufWriter<W>,
    peer: SocketAddr,
) {
    let res: io::Result<()> = async {
        while let Some(r) = rx.recv().await {
            write_reply(&mut wr, r).await?;
            // Batch whatever is already queued, then flush once. Replies tend to come
            // in bursts (one journal batch completes many requests at once), so yield
            // once before flushing: request tasks woken together get to queue their
            // replies, and one send carries them all. Syscalls are the dominant cost
            // per request on small machines and VMs.
            loop {
                while let Ok(r) = rx.try_recv() {
                    write_reply(&mut wr, r).await?;
                }
                tokio::task::yield_now().await;
                if rx.is_empty() {
                    break;
                }
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    }
    .await;
    if let Err(e) = res {
        debug!(%peer, error = %e, "NBD reply write failed");
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut BufWriter<W>, r: Reply) -> io::Result<()> {
    for p in std::iter::once(&r.first).chain(r.rest.iter()) {
        wr.write_all(p.head.as_bytes()).await?;
        if let Some(d) = &p.body {
            wr.write_all(d).await?;
        }
    }
    Ok(())
}

/// A short human-readable reason for an NBD error value (sent in error
/// chunks; the server log has the details).
pub(crate) fn errno_text(errno: u32) -> &'static str {
    match errno {
        proto::EPERM => "operation not permitted (read-only export)",
        proto::EIO => "input/output error",
        proto::ENOMEM => "out of memory",
        proto::EINVAL => "invalid request",
        proto::ENOSPC => "beyond the end of the export, or no space",
        proto::EOVERFLOW => "request too large",
        proto::ENOTSUP => "not supported (zeroing is not fast)",
        proto::ESHUTDOWN => "server shutting down",
        _ => "request failed",
    }
}
