//! Test support: a blocking raw NBD client that can speak both correct and
//! deliberately broken protocol (simple, structured and extended replies;
//! compact and extended requests; metadata contexts), and a harness running
//! [`serve`] in-process on its own runtime thread.
//!
//! Blocking std sockets are used on purpose: tests can then interleave raw
//! byte-level steps freely, and the server's runtime lives on separate
//! threads so a blocked test thread never starves it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::proto::{self, Mode, Request};
use crate::{rustls, serve, ExportRegistry, ServerConfig};

/// In-process server on 127.0.0.1 with an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn start<R: ExportRegistry>(registry: Arc<R>, cfg: ServerConfig) -> TestServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (sd_tx, sd_rx) = watch::channel(false);
        let thread = std::thread::spawn(move || -> io::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = addr_tx.send(l.local_addr()?);
                serve(l, registry, cfg, sd_rx).await
            })
        });
        let addr = addr_rx
            .recv()
            .expect("test NBD server failed to start (bind?)");
        TestServer {
            addr,
            shutdown: sd_tx,
            thread: Some(thread),
        }
    }

    /// `nbd://` URI for an export, as qemu/libnbd tools expect.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Signal shutdown and wait for `serve` to return; yields its result and
    /// how long the shutdown took.
    pub fn shutdown(mut self) -> (io::Result<()>, Duration) {
        let t = Instant::now();
        let _ = self.shutdown.send(true);
        let r = match self.thread.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("server thread panicked"))),
            None => Ok(()),
        };
        (r, t.elapsed())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

/// What GO/INFO told us about an export.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub tflags: u16,
    /// (minimum, preferred, maximum)
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
}

/// The client's connection: the TCP socket, or TLS on it after STARTTLS.
enum Wire {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(t) => t.get_mut(),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.write(buf),
            Wire::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.flush(),
            Wire::Tls(t) => t.flush(),
        }
    }
}

/// Blocking raw NBD client. All reads time out (10 s) so a server bug makes
/// a test fail instead of hang.
pub struct TestClient {
    s: Wire,
    next_handle: u64,
    /// Header style, switched by [`TestClient::structured_reply`] and
    /// [`TestClient::extended_headers`] when the server accepts.
    pub mode: Mode,
}

/// One reply message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Simple { error: u32, handle: u64 },
    Chunk(Chunk),
}

/// One structured or extended reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    /// The request offset echoed by an extended header.
    pub req_offset: Option<u64>,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & proto::REPLY_FLAG_DONE != 0
    }

    /// The error value of an error chunk.
    pub fn error(&self) -> Option<u32> {
        if self.typ & (1 << 15) == 0 {
            return None;
        }
        Some(self.payload.get(0..4).map(be32).unwrap_or(u32::MAX))
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap_or_default())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap_or_default())
}

/// A status chunk: context id and (length, flags) descriptors.
pub type Status = (u32, Vec<(u64, u32)>);

/// Largest reply payload the client accepts (bounds its allocations).
const MAX_REPLY_PAYLOAD: u64 = (64 << 20) + 64;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

impl TestClient {
    /// TCP connect only; nothing read or sent.
    pub fn connect(addr: SocketAddr) -> io::Result<TestClient> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(TestClient {
            s: Wire::Plain(s),
            next_handle: 1,
            mode: Mode::Simple,
        })
    }

    /// Connect, check the greeting, send FIXED_NEWSTYLE|NO_ZEROES.
    pub fn start(addr: SocketAddr) -> io::Result<TestClient> {
        let mut c = TestClient::connect(addr)?;
        let hs = c.read_greeting()?;
        if hs & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::other("server is not fixed newstyle"));
        }
        c.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())?;
        Ok(c)
    }

    /// Connect and GO to `name`; fails if the server refuses.
    pub fn open(addr: SocketAddr, name: &str) -> io::Result<(TestClient, ExportInfo)> {
        let mut c = TestClient::start(addr)?;
        match c.go(name)? {
            Ok(info) => Ok((c, info)),
            Err(rep) => Err(io::Error::other(format!("GO refused: {rep:#x}"))),
        }
    }

    /// The TCP socket (under TLS too: raw bytes written here bypass it).
    pub fn stream(&mut self) -> &mut TcpStream {
        self.s.tcp()
    }

    pub fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)?;
        self.s.flush()
    }

    /// `NBD_OPT_STARTTLS`; on `ACK` the TLS handshake, after which every
    /// message goes through TLS. Returns the server's error reply type if it
    /// refused, or the handshake's error if that failed.
    pub fn starttls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> io::Result<Result<(), u32>> {
        self.send_option(proto::OPT_STARTTLS, &[])?;
        let r = self.read_opt_reply()?;
        if r.typ != proto::REP_ACK {
            return Ok(Err(r.typ));
        }
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(io::Error::other)?;
        let mut conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        if matches!(self.s, Wire::Tls(_)) {
            return Err(io::Error::other("STARTTLS inside TLS"));
        }
        // A second handle on the socket: on a failed handshake the client
        // keeps the plain one, to watch the server hang up.
        let mut sock = self.s.tcp().try_clone()?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        self.s = Wire::Tls(Box::new(rustls::StreamOwned::new(conn, sock)));
        Ok(Ok(()))
    }

    /// The cipher suite the TLS session negotiated; `None` when plain.
    pub fn tls_suite(&self) -> Option<rustls::CipherSuite> {
        match &self.s {
            Wire::Tls(t) => t.conn.negotiated_cipher_suite().map(|s| s.suite()),
            _ => None,
        }
    }

    pub fn recv(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// Half-close: the server sees EOF.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.s.tcp().shutdown(Shutdown::Write)
    }

    /// True if the server closed the connection (EOF or reset) within the
    /// timeout, discarding any bytes that arrive first.
    pub fn expect_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Read and check the 18-byte greeting; returns the handshake flags.
    pub fn read_greeting(&mut self) -> io::Result<u16> {
        let g = self.recv(proto::GREETING_LEN)?;
        if g[0..8] != proto::NBDMAGIC.to_be_bytes() || g[8..16] != proto::IHAVEOPT.to_be_bytes() {
            return Err(io::Error::other("bad greeting magic"));
        }
        Ok(u16::from_be_bytes([g[16], g[17]]))
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// Send an option header claiming `len` bytes without the data.
    pub fn send_option_header(&mut self, option: u32, len: u32) -> io::Result<()> {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b)
    }

    pub fn read_opt_reply(&mut self) -> io::Result<OptReply> {
        let h = self.recv(20)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        if magic != proto::OPT_REPLY_MAGIC {
            return Err(io::Error::other(format!(
                "bad option reply magic {magic:#x}"
            )));
        }
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
        if len > 1 << 20 {
            return Err(io::Error::other(format!("option reply too long: {len}")));
        }
        let data = self.recv(len as usize)?;
        Ok(OptReply { option, typ, data })
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_GO; `Err(reply type)` on a server error reply.
    pub fn go(&mut self, name: &str) -> io::Result<Result<ExportInfo, u32>> {
        self.info_or_go(proto::OPT_GO, name)
    }

    /// NBD_OPT_INFO; the session stays in option haggling.
    pub fn info(&mut self, name: &str) -> io::Result<Result<ExportInfo, u32>> {
        self.info_or_go(proto::OPT_INFO, name)
    }

    fn info_or_go(&mut self, opt: u32, name: &str) -> io::Result<Result<ExportInfo, u32>> {
        let payload = Self::info_payload(name, &[proto::INFO_BLOCK_SIZE, proto::INFO_NAME]);
        self.send_option(opt, &payload)?;
        let mut info = ExportInfo::default();
        let mut got_export = false;
        loop {
            let r = self.read_opt_reply()?;
            if r.option != opt {
                return Err(io::Error::other("reply for wrong option"));
            }
            match r.typ {
                proto::REP_ACK if got_export => return Ok(Ok(info)),
                proto::REP_ACK => return Err(io::Error::other("ACK without INFO_EXPORT")),
                proto::REP_INFO if r.data.len() >= 2 => {
                    let d = &r.data;
                    match u16::from_be_bytes([d[0], d[1]]) {
                        proto::INFO_EXPORT if d.len() == 12 => {
                            info.size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                            info.tflags = u16::from_be_bytes([d[10], d[11]]);
                            got_export = true;
                        }
                        proto::INFO_BLOCK_SIZE if d.len() == 14 => {
                            let g = |i: usize| {
                                u32::from_be_bytes(d[i..i + 4].try_into().unwrap_or_default())
                            };
                            info.block_size = Some((g(2), g(6), g(10)));
                        }
                        proto::INFO_NAME => {
                            info.name = Some(String::from_utf8_lossy(&d[2..]).into_owned());
                        }
                        t => {
                            return Err(io::Error::other(format!(
                                "bad info type {t} len {}",
                                d.len()
                            )))
                        }
                    }
                }
                t if t & (1 << 31) != 0 => return Ok(Err(t)),
                t => return Err(io::Error::other(format!("unexpected reply type {t:#x}"))),
            }
        }
    }

    /// NBD_OPT_LIST; export names or the error reply type.
    pub fn list(&mut self) -> io::Result<Result<Vec<String>, u32>> {
        self.send_option(proto::OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let r = self.read_opt_reply()?;
            match r.typ {
                proto::REP_ACK => return Ok(Ok(names)),
                proto::REP_SERVER if r.data.len() >= 4 => {
                    let n =
                        u32::from_be_bytes(r.data[0..4].try_into().unwrap_or_default()) as usize;
                    let name = r
                        .data
                        .get(4..4 + n)
                        .ok_or_else(|| io::Error::other("bad REP_SERVER"))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                t if t & (1 << 31) != 0 => return Ok(Err(t)),
                t => return Err(io::Error::other(format!("unexpected reply type {t:#x}"))),
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME; returns (size, transmission flags).
    pub fn export_name(&mut self, name: &str, no_zeroes: bool) -> io::Result<(u64, u16)> {
        self.send_option(proto::OPT_EXPORT_NAME, name.as_bytes())?;
        let r = self.recv(if no_zeroes { 10 } else { 134 })?;
        Ok((
            u64::from_be_bytes(r[0..8].try_into().unwrap_or_default()),
            u16::from_be_bytes([r[8], r[9]]),
        ))
    }

    pub fn alloc_handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Send a request header (+ payload, if any) without waiting, in the
    /// negotiated header form. Flags are sent as given (no PAYLOAD_LEN is
    /// added), so tests can send exactly what they mean.
    pub fn send_request(
        &mut self,
        typ: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let r = Request {
            flags,
            typ,
            handle,
            offset,
            len,
        };
        let mut b = Vec::with_capacity(proto::EXTENDED_REQUEST_LEN + payload.len());
        if self.mode == Mode::Extended {
            b.extend_from_slice(&proto::encode_extended_request(&r));
        } else {
            b.extend_from_slice(&proto::encode_request(&r));
        }
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Read a simple reply header: (error, handle).
    pub fn read_reply(&mut self) -> io::Result<(u32, u64)> {
        match self.read_msg()? {
            Msg::Simple { error, handle } => Ok((error, handle)),
            Msg::Chunk(c) => Err(io::Error::other(format!(
                "expected a simple reply, got chunk {c:?}"
            ))),
        }
    }

    /// Read one reply message of any kind (payload of chunks included;
    /// a simple READ reply's data is left on the socket).
    pub fn read_msg(&mut self) -> io::Result<Msg> {
        let m = self.recv(4)?;
        let magic = be32(&m);
        let (hl, ext) = match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let h = self.recv(12)?;
                return Ok(Msg::Simple {
                    error: be32(&h[0..4]),
                    handle: be64(&h[4..12]),
                });
            }
            proto::STRUCTURED_REPLY_MAGIC => (proto::STRUCTURED_REPLY_LEN, false),
            proto::EXTENDED_REPLY_MAGIC => (proto::EXTENDED_REPLY_LEN, true),
            m => return Err(io::Error::other(format!("bad reply magic {m:#x}"))),
        };
        let h = self.recv(hl - 4)?;
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let typ = u16::from_be_bytes([h[2], h[3]]);
        let handle = be64(&h[4..12]);
        let (req_offset, len) = if ext {
            (Some(be64(&h[12..20])), be64(&h[20..28]))
        } else {
            (None, u64::from(be32(&h[12..16])))
        };
        if len > MAX_REPLY_PAYLOAD {
            return Err(io::Error::other(format!("chunk payload too long: {len}")));
        }
        let payload = self.recv(len as usize)?;
        Ok(Msg::Chunk(Chunk {
            flags,
            typ,
            handle,
            req_offset,
            payload,
        }))
    }

    /// Read chunks of one reply up to and including the DONE chunk.
    pub fn read_chunks(&mut self, handle: u64) -> io::Result<Vec<Chunk>> {
        let mut v = Vec::new();
        loop {
            match self.read_msg()? {
                Msg::Chunk(c) => {
                    Self::expect_handle(c.handle, handle)?;
                    let done = c.done();
                    v.push(c);
                    if done {
                        return Ok(v);
                    }
                }
                Msg::Simple { .. } if !v.is_empty() => {
                    return Err(io::Error::other("simple reply inside a chunked reply"))
                }
                Msg::Simple { error, handle: h } => {
                    Self::expect_handle(h, handle)?;
                    return Ok(vec![Chunk {
                        flags: proto::REPLY_FLAG_DONE,
                        typ: if error == 0 {
                            proto::REPLY_TYPE_NONE
                        } else {
                            proto::REPLY_TYPE_ERROR
                        },
                        handle: h,
                        req_offset: None,
                        payload: error.to_be_bytes().to_vec(),
                    }]);
                }
            }
        }
    }

    fn expect_handle(got: u64, want: u64) -> io::Result<()> {
        if got != want {
            return Err(io::Error::other(format!("reply handle {got} != {want}")));
        }
        Ok(())
    }

    /// The error of a reply without data, whatever its shape.
    fn reply_error(&mut self, handle: u64) -> io::Result<u32> {
        if self.mode == Mode::Simple {
            let (err, got) = self.read_reply()?;
            Self::expect_handle(got, handle)?;
            return Ok(err);
        }
        let chunks = self.read_chunks(handle)?;
        Ok(chunks.iter().find_map(Chunk::error).unwrap_or(0))
    }

    /// Synchronous READ: data, or the NBD error value. With chunked replies
    /// the chunks are reassembled (holes as zeroes) and must cover the range
    /// exactly once.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.read_flags(offset, len, 0)
    }

    pub fn read_flags(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> io::Result<Result<Vec<u8>, u32>> {
        let h = self.alloc_handle();
        self.send_request(proto::CMD_READ, flags, h, offset, len.into(), &[])?;
        if self.mode == Mode::Simple {
            let (err, got) = self.read_reply()?;
            Self::expect_handle(got, h)?;
            if err != 0 {
                return Ok(Err(err));
            }
            return Ok(Ok(self.recv(len as usize)?));
        }
        let chunks = self.read_chunks(h)?;
        assemble_read(&chunks, offset, len)
    }

    /// Synchronous WRITE; returns the NBD error value (0 = success). Adds
    /// PAYLOAD_LEN under extended headers, as the spec requires.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        let h = self.alloc_handle();
        let flags = if self.mode == Mode::Extended {
            flags | proto::CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        self.send_request(proto::CMD_WRITE, flags, h, offset, data.len() as u64, data)?;
        self.reply_error(h)
    }

    /// Synchronous command without payload in either direction (FLUSH,
    /// TRIM, WRITE_ZEROES, CACHE, or anything invalid); returns the error
    /// value.
    pub fn cmd(&mut self, typ: u16, flags: u16, offset: u64, len: u64) -> io::Result<u32> {
        let h = self.alloc_handle();
        self.send_request(typ, flags, h, offset, len, &[])?;
        self.reply_error(h)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.cmd(proto::CMD_FLUSH, 0, 0, 0)
    }

    /// Synchronous BLOCK_STATUS: (context id, [(length, flags)]) of the
    /// single status chunk, or the error value.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        flags: u16,
    ) -> io::Result<Result<Status, u32>> {
        let h = self.alloc_handle();
        self.send_request(proto::CMD_BLOCK_STATUS, flags, h, offset, len, &[])?;
        let chunks = self.read_chunks(h)?;
        if let Some(e) = chunks.iter().find_map(Chunk::error) {
            return Ok(Err(e));
        }
        let [c] = chunks.as_slice() else {
            return Err(io::Error::other(format!("{} status chunks", chunks.len())));
        };
        parse_status(c).map(Ok)
    }

    /// NBD_OPT_STRUCTURED_REPLY; returns the reply type (ACK switches mode).
    pub fn structured_reply(&mut self) -> io::Result<u32> {
        self.header_option(proto::OPT_STRUCTURED_REPLY, Mode::Structured)
    }

    /// NBD_OPT_EXTENDED_HEADERS; returns the reply type (ACK switches mode).
    pub fn extended_headers(&mut self) -> io::Result<u32> {
        self.header_option(proto::OPT_EXTENDED_HEADERS, Mode::Extended)
    }

    fn header_option(&mut self, opt: u32, mode: Mode) -> io::Result<u32> {
        self.send_option(opt, &[])?;
        let r = self.read_opt_reply()?;
        if r.typ == proto::REP_ACK {
            self.mode = mode;
        }
        Ok(r.typ)
    }

    /// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: the (id, name) pairs,
    /// or the error reply type.
    pub fn meta_context(
        &mut self,
        opt: u32,
        export: &str,
        queries: &[&str],
    ) -> io::Result<Result<Vec<(u32, String)>, u32>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send_option(opt, &d)?;
        let mut out = Vec::new();
        loop {
            let r = self.read_opt_reply()?;
            match r.typ {
                proto::REP_ACK => return Ok(Ok(out)),
                proto::REP_META_CONTEXT if r.data.len() >= 4 => out.push((
                    be32(&r.data),
                    String::from_utf8_lossy(&r.data[4..]).into_owned(),
                )),
                t if t & (1 << 31) != 0 => return Ok(Err(t)),
                t => return Err(io::Error::other(format!("unexpected reply type {t:#x}"))),
            }
        }
    }

    /// NBD_CMD_DISC, then wait for the server to close.
    pub fn disconnect(mut self) -> io::Result<()> {
        let h = self.alloc_handle();
        self.send_request(proto::CMD_DISC, 0, h, 0, 0, &[])?;
        if self.expect_closed() {
            Ok(())
        } else {
            Err(io::Error::other("server did not close after DISC"))
        }
    }
}

/// Reassemble a chunked READ reply, checking the content chunks lie inside
/// the request, do not overlap and (without error) cover it.
pub fn assemble_read(chunks: &[Chunk], offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
    let mut buf = vec![0u8; len as usize];
    let mut seen = vec![false; len as usize];
    let mut mark = |at: u64, n: u64| -> io::Result<std::ops::Range<usize>> {
        let start = at
            .checked_sub(offset)
            .filter(|s| s + n <= u64::from(len) && n > 0)
            .ok_or_else(|| io::Error::other(format!("chunk {at}+{n} outside the request")))?;
        let r = start as usize..(start + n) as usize;
        if seen[r.clone()].iter().any(|s| *s) {
            return Err(io::Error::other("overlapping content chunks"));
        }
        seen[r.clone()].fill(true);
        Ok(r)
    };
    for c in chunks {
        if let Some(e) = c.error() {
            return Ok(Err(e));
        }
        let p = &c.payload;
        match c.typ {
            proto::REPLY_TYPE_OFFSET_DATA if p.len() > 8 => {
                let r = mark(be64(p), (p.len() - 8) as u64)?;
                buf[r].copy_from_slice(&p[8..]);
            }
            proto::REPLY_TYPE_OFFSET_HOLE if p.len() == 12 => {
                mark(be64(p), u64::from(be32(&p[8..12])))?;
            }
            proto::REPLY_TYPE_NONE if p.is_empty() => {}
            t => {
                return Err(io::Error::other(format!(
                    "unexpected chunk type {t} in a read"
                )))
            }
        }
    }
    if seen.iter().any(|s| !s) {
        return Err(io::Error::other("read reply does not cover the request"));
    }
    Ok(Ok(buf))
}

/// Parse a BLOCK_STATUS or BLOCK_STATUS_EXT chunk.
pub fn parse_status(c: &Chunk) -> io::Result<Status> {
    let p = &c.payload;
    let bad = || io::Error::other(format!("malformed status chunk {c:?}"));
    match c.typ {
        proto::REPLY_TYPE_BLOCK_STATUS if p.len() >= 12 && (p.len() - 4) % 8 == 0 => Ok((
            be32(p),
            p[4..]
                .chunks_exact(8)
                .map(|d| (u64::from(be32(&d[0..4])), be32(&d[4..8])))
                .collect(),
        )),
        proto::REPLY_TYPE_BLOCK_STATUS_EXT if p.len() >= 24 && (p.len() - 8) % 16 == 0 => {
            if be32(&p[4..8]) as usize != (p.len() - 8) / 16 {
                return Err(bad());
            }
            let d = p[8..]
                .chunks_exact(16)
                .map(|d| {
                    let flags = be64(&d[8..16]);
                    (be64(&d[0..8]), u32::try_from(flags).unwrap_or(u32::MAX))
                })
                .collect();
            Ok((be32(p), d))
        }
        _ => Err(bad()),
    }
}
