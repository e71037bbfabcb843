//! The fixed-newstyle handshake: greeting, then option haggling (export list
//! and info, header style, metadata contexts, the STARTTLS policy) up to the
//! export the client enters transmission with, or up to the TLS upgrade
//! after which haggling starts over inside TLS.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::admission::Slot;
use crate::proto::{self, Caps, Mode};
use crate::server::End;
use crate::{Export, ExportRegistry, ServerConfig};

/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub(crate) const PREFERRED_BLOCK: u32 = 4096;

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    typ: u32,
    data: &[u8],
) -> Result<(), End> {
    wr.write_all(&proto::encode_opt_reply(option, typ, data))
        .await
        .map_err(End::Io)
}

/// Option-haggling state of one connection.
struct Haggle<'a, R: ExportRegistry> {
    registry: &'a R,
    cfg: &'a ServerConfig,
    no_zeroes: bool,
    mode: Mode,
    /// Canonical name of the export `base:allocation` was selected for.
    meta_for: Option<String>,
    tls: TlsPhase,
}

/// Where the connection stands with TLS; decides what STARTTLS gets and
/// which options are answered at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPhase {
    /// TLS is off on this server: STARTTLS is an unsupported option.
    Unavailable,
    /// Plain, and may upgrade (`TlsPolicy::Optional`).
    Offered,
    /// Plain, and must upgrade before anything else (`TlsPolicy::Require`).
    Required,
    /// Inside TLS: a second STARTTLS is a client error.
    Active,
}

/// What the handshake hands to the transmission phase.
pub(crate) struct Negotiated<E> {
    pub(crate) export: Arc<E>,
    pub(crate) mode: Mode,
    pub(crate) block_status: bool,
}

/// Outcome of one option.
enum Step<E> {
    Continue,
    Go(Arc<E>),
    StartTls,
}

/// How option haggling ended (short of a disconnect).
pub(crate) enum Haggled<E> {
    /// Enter transmission with this export.
    Go(Negotiated<E>),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// The greeting and the client's flags. Returns whether the client asked
/// for `NO_ZEROES` (the flags are not sent again after a TLS upgrade).
pub(crate) async fn greet<Rd, W>(rd: &mut Rd, wr: &mut W) -> Result<bool, End>
where
    Rd: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_greeting())
        .await
        .map_err(End::Io)?;
    wr.flush().await.map_err(End::Io)?;
    let mut cf = [0u8; 4];
    rd.read_exact(&mut cf)
        .await
        .map_err(|e| End::from_read(e, "client flags"))?;
    let cflags = proto::decode_client_flags(cf)
        .map_err(|v| End::Protocol(format!("unknown client flags {v:#x}")))?;
    Ok(cflags.no_zeroes)
}

/// Option haggling from a clean state: at the start of the session, and
/// again inside TLS, where everything negotiated in the clear is forgotten
/// (the spec's rule; cf. CVE-2021-3716, a header style negotiated before
/// TLS leaking into the encrypted session).
pub(crate) async fn haggle<R, Rd, W>(
    rd: &mut Rd,
    wr: &mut W,
    registry: &R,
    cfg: &ServerConfig,
    no_zeroes: bool,
    tls: TlsPhase,
    slot: &Slot,
) -> Result<Haggled<R::E>, End>
where
    R: ExportRegistry,
    Rd: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut h = Haggle {
        registry,
        cfg,
        no_zeroes,
        mode: Mode::Simple,
        meta_for: None,
        tls,
    };
    loop {
        // Waiting for the client's next option: the connection may be
        // displaced by a newcomer at the connection cap. Busy while an
        // option is answered, so a client that has seen its GO reply is
        // never displaced.
        slot.idle();
        let (option, data) = read_option(rd, wr).await?;
        if !slot.busy() {
            return Err(End::Evicted);
        }
        let step = h.option(wr, option, &data).await?;
        wr.flush().await.map_err(End::Io)?;
        match step {
            Step::Continue => {}
            Step::StartTls => return Ok(Haggled::StartTls),
            Step::Go(export) => {
                // Contexts selected for another export do not carry over (the
                // client may not send BLOCK_STATUS then; it gets EINVAL).
                let block_status = h.meta_for.as_deref() == Some(export.name());
                return Ok(Haggled::Go(Negotiated {
                    export,
                    mode: h.mode,
                    block_status,
                }));
            }
        }
    }
}

/// Read one option header and its (bounded) payload.
async fn read_option<Rd, W>(rd: &mut Rd, wr: &mut W) -> Result<(u32, Vec<u8>), End>
where
    Rd: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut h = [0u8; proto::OPT_HEADER_LEN];
    match rd.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(End::Eof),
        Err(e) => return Err(End::Io(e)),
    }
    let oh = proto::decode_opt_header(&h).map_err(|e| End::Protocol(e.to_string()))?;
    if oh.len > proto::MAX_OPTION_LEN {
        // We cannot skip the payload without reading up to 4 GiB, so
        // tell the client why and hang up (spec allows a hard
        // disconnect for denial-of-service behaviour).
        let _ = send_opt_reply(wr, oh.option, proto::REP_ERR_TOO_BIG, b"option too large").await;
        let _ = wr.flush().await;
        return Err(End::Protocol(format!(
            "option {} length {} exceeds limit {}",
            oh.option,
            oh.len,
            proto::MAX_OPTION_LEN
        )));
    }
    let mut data = vec![0u8; oh.len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(|e| End::from_read(e, "option payload"))?;
    Ok((oh.option, data))
}

impl<R: ExportRegistry> Haggle<'_, R> {
    fn resolve(&self, name: &str) -> Option<Arc<R::E>> {
        if name.is_empty() {
            self.registry
                .default_export()
                .and_then(|n| self.registry.lookup(&n))
        } else {
            self.registry.lookup(name)
        }
    }

    fn caps(&self, export: &R::E) -> Caps {
        Caps {
            flags: export.flags(),
            mode: self.mode,
        }
    }

    async fn option<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<Step<R::E>, End> {
        if self.tls == TlsPhase::Required
            && option != proto::OPT_STARTTLS
            && option != proto::OPT_ABORT
        {
            return self.tls_required(wr, option).await;
        }
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(wr, data).await.map(Step::Go),
            proto::OPT_STARTTLS => self.starttls(wr, data).await,
            proto::OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_opt_reply(wr, option, proto::REP_ACK, &[]).await;
                let _ = wr.flush().await;
                Err(End::ClientDisc)
            }
            proto::OPT_LIST => self.list(wr, data).await.map(|()| Step::Continue),
            proto::OPT_INFO | proto::OPT_GO => self.info_go(wr, option, data).await,
            proto::OPT_STRUCTURED_REPLY | proto::OPT_EXTENDED_HEADERS => {
                let (typ, msg) = self.header_style(option, data);
                send_opt_reply(wr, option, typ, msg.as_bytes()).await?;
                Ok(Step::Continue)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(wr, option, data).await?;
                Ok(Step::Continue)
            }
            other => {
                // Anything unknown: the session continues.
                debug!(option = other, "unsupported NBD option");
                send_opt_reply(wr, other, proto::REP_ERR_UNSUP, &[]).await?;
                Ok(Step::Continue)
            }
        }
    }

    /// Forced TLS before the upgrade: the same error for every option, so
    /// nothing (export names, sizes, which names exist) is revealed in the
    /// clear. EXPORT_NAME has no error reply: hang up, as the spec says.
    async fn tls_required<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
    ) -> Result<Step<R::E>, End> {
        if option == proto::OPT_EXPORT_NAME {
            return Err(End::Protocol("EXPORT_NAME before the required TLS".into()));
        }
        debug!(option, "option before the required TLS upgrade");
        let msg = b"TLS required: send NBD_OPT_STARTTLS first";
        send_opt_reply(wr, option, proto::REP_ERR_TLS_REQD, msg).await?;
        Ok(Step::Continue)
    }

    /// NBD_OPT_STARTTLS: acknowledge, and the caller runs the TLS handshake
    /// once the ACK is flushed.
    async fn starttls<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: &[u8],
    ) -> Result<Step<R::E>, End> {
        let option = proto::OPT_STARTTLS;
        let (typ, msg): (u32, &[u8]) = match self.tls {
            TlsPhase::Unavailable => (proto::REP_ERR_UNSUP, b""),
            TlsPhase::Active => (proto::REP_ERR_INVALID, b"TLS is already active"),
            _ if !data.is_empty() => (proto::REP_ERR_INVALID, b"STARTTLS takes no data"),
            TlsPhase::Offered | TlsPhase::Required => {
                send_opt_reply(wr, option, proto::REP_ACK, &[]).await?;
                return Ok(Step::StartTls);
            }
        };
        debug!(reply = typ, "STARTTLS refused");
        send_opt_reply(wr, option, typ, msg).await?;
        Ok(Step::Continue)
    }

    /// OPT_EXPORT_NAME cannot fail gracefully: any problem means
    /// terminating the session, as the spec mandates.
    async fn export_name<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: &[u8],
    ) -> Result<Arc<R::E>, End> {
        if self.mode == Mode::Extended {
            // Its reply cannot tell the client which headers follow.
            return Err(End::Protocol(
                "EXPORT_NAME after extended headers were negotiated".into(),
            ));
        }
        if data.len() > proto::MAX_STRING_LEN {
            return Err(End::Protocol("EXPORT_NAME name too long".into()));
        }
        let name = std::str::from_utf8(data)
            .map_err(|_| End::Protocol("EXPORT_NAME name is not UTF-8".into()))?;
        let export = self
            .resolve(name)
            .ok_or_else(|| End::Protocol(format!("EXPORT_NAME unknown export {name:?}")))?;
        let tflags = proto::transmission_flags(&self.caps(&export));
        wr.write_all(&proto::encode_export_name_reply(
            export.size(),
            tflags,
            self.no_zeroes,
        ))
        .await
        .map_err(End::Io)?;
        Ok(export)
    }

    async fn list<W: AsyncWrite + Unpin>(&mut self, wr: &mut W, data: &[u8]) -> Result<(), End> {
        let option = proto::OPT_LIST;
        if !data.is_empty() {
            return send_opt_reply(wr, option, proto::REP_ERR_INVALID, b"LIST takes no data").await;
        }
        for name in self.registry.names() {
            let rep = proto::encode_rep_server(&name);
            send_opt_reply(wr, option, proto::REP_SERVER, &rep).await?;
        }
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await
    }

    async fn info_go<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<Step<R::E>, End> {
        let req = match proto::decode_info_request(data) {
            Err(proto::InfoRequestError::TooBig(n)) => {
                warn!(len = n, "INFO/GO export name too long");
                send_opt_reply(wr, option, proto::REP_ERR_TOO_BIG, b"name too long").await?;
                return Ok(Step::Continue);
            }
            Err(e @ proto::InfoRequestError::Invalid(_)) => {
                warn!(error = %e, "malformed INFO/GO option");
                let msg = e.to_string();
                send_opt_reply(wr, option, proto::REP_ERR_INVALID, msg.as_bytes()).await?;
                return Ok(Step::Continue);
            }
            Ok(req) => req,
        };
        let Some(export) = self.resolve(&req.name) else {
            info!(export = %req.name, "client asked for unknown export");
            send_opt_reply(wr, option, proto::REP_ERR_UNKNOWN, b"unknown export").await?;
            return Ok(Step::Continue);
        };
        let tflags = proto::transmission_flags(&self.caps(&export));
        let info = proto::encode_info_export(export.size(), tflags);
        send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        if req.infos.contains(&proto::INFO_NAME) {
            let info = proto::encode_info_name(export.name());
            send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        }
        // Always sent: min 1 means no alignment demands, max tells the
        // client our payload limit.
        let info = proto::encode_info_block_size(1, PREFERRED_BLOCK, self.cfg.max_payload);
        send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await?;
        Ok(if option == proto::OPT_GO {
            Step::Go(export)
        } else {
            Step::Continue
        })
    }

    /// STRUCTURED_REPLY / EXTENDED_HEADERS: the reply type and message.
    /// Either resets the selected metadata contexts, whose reply shape
    /// depends on the header style.
    fn header_style(&mut self, option: u32, data: &[u8]) -> (u32, &'static str) {
        if !data.is_empty() {
            return (proto::REP_ERR_INVALID, "option takes no data");
        }
        let want = if option == proto::OPT_EXTENDED_HEADERS {
            Mode::Extended
        } else {
            Mode::Structured
        };
        if self.mode == want {
            return (proto::REP_ERR_INVALID, "already negotiated");
        }
        if self.mode == Mode::Extended {
            // Spec: extended headers take precedence; no downgrade.
            return (proto::REP_ERR_EXT_HEADER_REQD, "extended headers in use");
        }
        self.mode = want;
        self.meta_for = None;
        (proto::REP_ACK, "")
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<(), End> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_for = None;
        }
        if self.mode == Mode::Simple {
            let msg = b"negotiate structured replies or extended headers first";
            return send_opt_reply(wr, option, proto::REP_ERR_INVALID, msg).await;
        }
        let req = match proto::decode_meta_request(data) {
            Ok(r) => r,
            Err(why) => {
                return send_opt_reply(wr, option, proto::REP_ERR_INVALID, why.as_bytes()).await
            }
        };
        let Some(export) = self.resolve(&req.name) else {
            return send_opt_reply(wr, option, proto::REP_ERR_UNKNOWN, b"unknown export").await;
        };
        // LIST with no query lists everything; otherwise only what a query
        // names. Unknown namespaces and leaves are ignored, as required.
        let selected = if set {
            req.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
        } else {
            req.queries.is_empty() || req.queries.iter().any(|q| proto::list_query_matches(q))
        };
        if selected {
            // LIST replies carry id 0 (reserved); SET's id is the real one.
            let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
            let rep = proto::encode_meta_context(id, proto::BASE_ALLOCATION);
            send_opt_reply(wr, option, proto::REP_META_CONTEXT, &rep).await?;
            if set {
                self.meta_for = Some(export.name().to_owned());
            }
        }
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await
    }
}
