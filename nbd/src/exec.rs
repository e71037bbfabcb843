//! Running a validated request against the export: reads (sparse when
//! chunked replies allow), block status, 64-bit trim/zero in pieces, cache;
//! each turned into its reply.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use tracing::{debug, warn};

use crate::proto::{self, Action, Mode};
use crate::reply::{errno_text, error_part, Head, Part, Permits, Reply, ReplyTo};
use crate::{Export, ExportError, Extent};

/// Most descriptors in one block status reply. The spec suggests at most
/// 2^20; 4096 keeps a reply (and the export's work for it) small while a
/// client walking a fragmented export still needs few requests.
const MAX_STATUS_EXTENTS: usize = 4096;
/// Byte permits a block status request holds: its reply (16 bytes per
/// extended descriptor) plus the export's extent list.
pub(crate) const STATUS_REPLY_BYTES: u32 =
    (MAX_STATUS_EXTENTS * (16 + std::mem::size_of::<Extent>()) + 8) as u32;
/// Reads at least this large (with chunked replies, without DF) ask the
/// export for holes first and send them as OFFSET_HOLE chunks. Smaller
/// reads skip the lookup: they are the latency-critical random I/O, and a
/// hole in a few KiB saves next to nothing on the wire.
const SPARSE_READ_MIN: u32 = 64 << 10;
/// Most content chunks in one sparse read reply; past that, the rest of
/// the range is sent as data.
const MAX_READ_EXTENTS: usize = 64;
/// Trim and write-zeroes are passed to the export in pieces of at most this
/// size (the export API has 32-bit lengths; 64-bit ones arrive with
/// extended headers). 1 GiB: aligned, and few calls for any real request.
const LARGE_OP_PIECE: u32 = 1 << 30;

/// Run one validated request against the export and build its reply.
pub(crate) async fn execute<E: Export>(
    export: &E,
    action: Action,
    body: Bytes,
    to: ReplyTo,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    let res: Result<(), ExportError> = match action {
        Action::Read { offset, len, df } => {
            return read(export, to, offset, len, df, permits, peer).await
        }
        Action::BlockStatus {
            offset,
            len,
            req_one,
        } => return block_status(export, to, offset, len, req_one, permits, peer).await,
        Action::Write { offset, fua, .. } => export.write(offset, body, fua).await,
        Action::Flush => export.flush().await,
        Action::Trim { offset, len, fua } => {
            let r = in_pieces(offset, len, |o, l| export.trim(o, l)).await;
            flush_if(export, r, fua).await
        }
        Action::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => {
            let r = in_pieces(offset, len, |o, l| export.write_zeroes(o, l, may_trim)).await;
            flush_if(export, r, fua).await
        }
        Action::Cache { offset, len } => export.cache(offset, len).await,
        // Handled inline by the reader; listed for exhaustiveness.
        Action::Noop | Action::Disconnect => Ok(()),
    };
    match res {
        Ok(()) => Reply::ok(to, Some(permits)),
        Err(e) => export_error(to, e, permits, peer),
    }
}

fn export_error(to: ReplyTo, e: ExportError, permits: Permits, peer: SocketAddr) -> Reply {
    let handle = to.handle;
    match e {
        ExportError::Io(_) => warn!(%peer, handle, error = %e, "NBD export I/O error"),
        _ => debug!(%peer, handle, error = %e, "NBD export request failed"),
    }
    let errno = e.nbd_errno();
    Reply::error(to, errno, errno_text(errno), Some(permits))
}

/// Trim and write-zeroes lengths are 64-bit with extended headers but the
/// export API takes 32 bits: cut the range into aligned pieces, in order,
/// stopping at the first failure.
async fn in_pieces<F, Fut>(offset: u64, len: u64, mut f: F) -> Result<(), ExportError>
where
    F: FnMut(u64, u32) -> Fut,
    Fut: Future<Output = Result<(), ExportError>>,
{
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(u64::from(LARGE_OP_PIECE)) as u32;
        f(offset + done, n).await?;
        done += u64::from(n);
    }
    Ok(())
}

async fn flush_if<E: Export>(
    export: &E,
    r: Result<(), ExportError>,
    fua: bool,
) -> Result<(), ExportError> {
    // The export API has no FUA on trim/zero; a flush afterwards gives the
    // same durability guarantee.
    r?;
    if fua {
        export.flush().await?;
    }
    Ok(())
}

/// READ: one data reply, or (structured, large enough, no DF) content
/// chunks that send holes as OFFSET_HOLE instead of zeroes.
async fn read<E: Export>(
    export: &E,
    to: ReplyTo,
    offset: u64,
    len: u32,
    df: bool,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    if to.mode == Mode::Simple || df || len < SPARSE_READ_MIN {
        return match read_exact(export, offset, len).await {
            Ok(d) => Reply::data(to, d, permits),
            Err(e) => export_error(to, e, permits, peer),
        };
    }
    let extents = match export
        .extents(offset, u64::from(len), MAX_READ_EXTENTS)
        .await
    {
        Ok(v) => runs(v, u64::from(len), MAX_READ_EXTENTS, true),
        Err(e) => {
            // Allocation status is an optimisation here: read it all.
            debug!(%peer, error = %e, "extents for a sparse read failed");
            vec![Extent::data(u64::from(len))]
        }
    };
    let mut parts = Vec::with_capacity(extents.len());
    let mut pos = offset;
    for e in extents {
        // Extents never exceed the read's 32-bit length.
        let n = e.len as u32;
        if e.zero {
            parts.push(Part {
                head: Head::Chunk(proto::encode_offset_hole(to.chunk(), false, pos, n)),
                body: None,
            });
        } else {
            match read_exact(export, pos, n).await {
                Ok(d) => parts.push(Part {
                    head: Head::Chunk(proto::encode_offset_data(to.chunk(), false, pos, d.len())),
                    body: Some(d),
                }),
                Err(e) => {
                    warn!(%peer, handle = to.handle, error = %e, "NBD export read failed");
                    let errno = e.nbd_errno();
                    parts.push(error_part(to, false, errno, errno_text(errno), Some(pos)));
                    break;
                }
            }
        }
        pos += e.len;
    }
    // Everything was read before the first byte is sent, so the last chunk
    // can carry DONE: no error can follow it.
    chunks_reply(to, parts, permits)
}

/// Build a reply from chunks, setting DONE on the last one.
fn chunks_reply(to: ReplyTo, mut parts: Vec<Part>, permits: Permits) -> Reply {
    let Some(mut last) = parts.pop() else {
        return Reply::ok(to, Some(permits));
    };
    if let Head::Chunk(h) = &mut last.head {
        h.set_done();
    }
    parts.push(last);
    let mut it = parts.into_iter();
    let first = it.next().unwrap_or_else(|| Part {
        head: Head::Chunk(proto::encode_none(to.chunk())),
        body: None,
    });
    Reply {
        first,
        rest: it.collect(),
        _permits: Some(permits),
    }
}

/// A read that must return exactly `len` bytes; anything else would
/// desynchronise the client's stream, so it becomes an I/O error.
async fn read_exact<E: Export>(export: &E, offset: u64, len: u32) -> Result<Bytes, ExportError> {
    let d = export.read(offset, len).await?;
    if d.len() != len as usize {
        return Err(ExportError::Io(format!(
            "export returned {} bytes for a {len}-byte read",
            d.len()
        )));
    }
    Ok(d)
}

/// Normalise an export's extent list for a request of `len` bytes: drop
/// empty extents, cut at `len`, merge neighbours with equal status, keep at
/// most `max` (at least one); whatever the list leaves uncovered of a read
/// becomes data when `fill` is set, so a sparse read covers its range.
fn runs(v: Vec<Extent>, len: u64, max: usize, fill: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len().min(max));
    let mut covered = 0u64;
    for e in v {
        if covered >= len {
            break;
        }
        let n = e.len.min(len - covered);
        if n == 0 {
            continue;
        }
        let full = out.len() >= max.max(1);
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += n,
            _ if full => break,
            _ => out.push(Extent { len: n, ..e }),
        }
        covered += n;
    }
    if fill && covered < len {
        match out.last_mut() {
            Some(l) if !l.hole && !l.zero => l.len += len - covered,
            // Possibly one run past `max`: still bounded.
            _ => out.push(Extent::data(len - covered)),
        }
    }
    out
}

/// BLOCK_STATUS for `base:allocation`: one status chunk (with DONE), at
/// most MAX_STATUS_EXTENTS descriptors (one with REQ_ONE).
async fn block_status<E: Export>(
    export: &E,
    to: ReplyTo,
    offset: u64,
    len: u64,
    req_one: bool,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
    let extents = match export.extents(offset, len, max).await {
        Ok(v) => v,
        Err(e) => return export_error(to, e, permits, peer),
    };
    // A prefix is a valid answer; the client asks again for the rest.
    let mut runs = runs(extents, len, max, false);
    if to.mode != Mode::Extended {
        // Compact requests have 32-bit lengths, so their extents fit; this
        // only guards against an inconsistent export.
        runs.retain(|e| e.len <= u64::from(u32::MAX));
    }
    if runs.is_empty() {
        runs.push(Extent::data(len.min(u64::from(u32::MAX))));
    }
    let d: Vec<proto::Descriptor> = runs
        .iter()
        .map(|e| proto::Descriptor {
            len: e.len,
            flags: e.flags(),
        })
        .collect();
    let (typ, payload) = proto::block_status_payload(to.mode, proto::BASE_ALLOCATION_ID, &d);
    let head = proto::encode_chunk(to.chunk(), proto::REPLY_FLAG_DONE, typ, &[], payload.len());
    Reply::single(
        Part {
            head: Head::Chunk(head),
            body: Some(Bytes::from(payload)),
        },
        Some(permits),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hole(len: u64) -> Extent {
        Extent::hole(len)
    }
    fn data(len: u64) -> Extent {
        Extent::data(len)
    }

    #[test]
    fn runs_normalise_export_answers() {
        // Empty extents dropped, neighbours merged, cut at the length.
        let v = vec![data(0), hole(10), hole(5), data(20), data(100)];
        assert_eq!(runs(v, 30, 10, false), vec![hole(15), data(15)]);
        // At most `max` runs; a prefix is enough for block status...
        let v = vec![hole(10), data(10), hole(10), data(10)];
        assert_eq!(runs(v.clone(), 40, 2, false), vec![hole(10), data(10)]);
        // ...while a read covers its range (the rest is data).
        assert_eq!(runs(v, 40, 2, true), vec![hole(10), data(30)]);
        assert_eq!(runs(vec![hole(10)], 40, 1, true), vec![hole(10), data(30)]);
        // An export that answers nothing: a read is all data.
        assert_eq!(runs(vec![], 40, 4, true), vec![data(40)]);
        assert_eq!(runs(vec![], 40, 4, false), vec![]);
        // Allocated zeroes stay distinct from holes.
        let z = Extent {
            len: 8,
            hole: false,
            zero: true,
        };
        assert_eq!(runs(vec![z, hole(8)], 16, 4, false), vec![z, hole(8)]);
    }
}
