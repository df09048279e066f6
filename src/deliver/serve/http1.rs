//! kiln's own HTTP/1.1 connections on Linux, so that a file's bytes go from the page cache to the
//! socket with sendfile(2) instead of through a buffer in user space.
//!
//! hyper writes only the buffers a body yields; it has no way to hand the kernel a descriptor.
//! So on Linux kiln reads the request head itself (with httparse, the parser hyper uses), turns
//! it into an `http::Request` and calls the same axum `Router` as every platform does: which
//! files are served, conditionals, ranges, checksum files, the index and the access log all stay
//! in `serve`. Only how an answer reaches the socket is decided here. A response that carries a
//! [`SendFile`] (a GET of a file, 200 or 206, set by `serve_file`) has its head written here and
//! its body sent with sendfile from the descriptor opened for that request, so a rename of the
//! image does not disturb it; every other answer is small and is written from memory.
//!
//! Kept as hyper did it: persistent connections (HTTP/1.1 unless `Connection: close`, HTTP/1.0
//! only with `keep-alive`), pipelined requests answered in order, HEAD without a body, 400 for a
//! malformed head and 431 for one too large, and the header timeout, counted from when a head is
//! awaited (a new connection, or a keep-alive one after its answer). Request bodies (nothing kiln
//! serves takes one) are not read: the connection closes after answering such a request, so no
//! body can be mistaken for the next request.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// A request head larger than this is answered 431 (hyper's limit is of the same order).
const MAX_HEAD: usize = 64 << 10;

/// Header fields in one request head (hyper's default).
const MAX_HEADERS: usize = 100;

/// Bytes given to one sendfile call: the socket takes what fits in its buffer anyway; the bound
/// keeps one call from reading far ahead on a cold page cache while other connections wait.
const SENDFILE_CHUNK: u64 = 8 << 20;

/// The body of a response as a part of an open file, for the connection to send with sendfile.
/// The answer's own body is empty; the access log counts the bytes sent in `sent`.
#[derive(Clone)]
pub struct SendFile {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
    sent: Arc<AtomicU64>,
}

impl SendFile {
    pub fn new(file: std::fs::File, offset: u64, len: u64) -> SendFile {
        SendFile {
            file: Arc::new(file),
            offset,
            len,
            sent: Arc::default(),
        }
    }

    /// The count of bytes the kernel has taken from this file for the client, so far.
    pub fn sent(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }
}

/// What a connection needs of its place among the open connections (see `connections`).
pub trait Place: Send + Sync + 'static {
    /// Held while a request is in progress: the connection is busy, not to be closed.
    type Busy: Send;
    fn begin_request(self: &Arc<Self>) -> Self::Busy;
    /// Told when this connection, idle, is to close to make room for a newcomer.
    fn close_signal(&self) -> &Notify;
}

/// How a connection is driven: the router, the header timeout, and the stop signal (true once
/// the server shuts down).
#[derive(Clone)]
pub struct Driver {
    pub router: axum::Router,
    pub header_timeout: Duration,
    pub stop: watch::Receiver<bool>,
}

/// A request head read from the connection.
enum Head {
    Request {
        // Boxed: a request is some 240 bytes, a refusal two.
        req: Box<Request<Body>>,
        keep_alive: bool,
    },
    /// Not a request kiln can answer; answered with this status, then the connection closes.
    Refused(StatusCode),
}

/// Serves requests on `stream` until the client or the server ends the connection.
pub async fn serve_connection<P: Place>(
    mut stream: TcpStream,
    peer: SocketAddr,
    place: Arc<P>,
    mut driver: Driver,
) {
    // Bytes read but not yet parsed: the start of the next (pipelined) request.
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head = tokio::select! {
            head = tokio::time::timeout(driver.header_timeout, read_head(&mut stream, &mut buf)) => head,
            () = place.close_signal().notified() => break,
            _ = driver.stop.wait_for(|stop| *stop) => break,
        };
        // Timed out, closed by the client, or a broken connection.
        let Ok(Ok(Some(head))) = head else { break };
        let (req, keep_alive) = match head {
            Head::Request { req, keep_alive } => (*req, keep_alive),
            Head::Refused(status) => {
                let _ = stream.write_all(&refusal(status)).await;
                break;
            }
        };
        let busy = place.begin_request();
        let answered = exchange(&mut stream, peer, &driver.router, req, keep_alive).await;
        drop(busy);
        if !matches!(answered, Ok(true)) || *driver.stop.borrow() {
            break;
        }
    }
    // FIN rather than a bare close: the client reads the last answer to its end.
    let _ = stream.shutdown().await;
}

/// Reads until `buf` holds a complete request head, and takes it out of `buf`. `None` when the
/// client closed the connection (between requests, or inside a head).
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let mut chunk = [0u8; 8192];
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf) {
                return Ok(Some(head));
            }
            if buf.len() > MAX_HEAD {
                return Ok(Some(Head::Refused(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                )));
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The request head at the start of `buf`, taken out of it; `None` while it is incomplete.
fn parse_head(buf: &mut Vec<u8>) -> Option<Head> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let (head, len) = match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(len)) => (to_request(&parsed), len),
        Err(httparse::Error::TooManyHeaders) => {
            return Some(Head::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Err(_) => return Some(Head::Refused(StatusCode::BAD_REQUEST)),
    };
    buf.drain(..len);
    Some(head)
}

/// The parsed head as a request for the router, and whether the connection may stay open after
/// the answer.
fn to_request(parsed: &httparse::Request<'_, '_>) -> Head {
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = Request::builder()
        .method(parsed.method.unwrap_or_default())
        .uri(parsed.path.unwrap_or_default())
        .version(version);
    for field in parsed.headers.iter() {
        builder = builder.header(field.name, field.value);
    }
    let Ok(req) = builder.body(Body::empty()) else {
        return Head::Refused(StatusCode::BAD_REQUEST);
    };
    let keep_alive = persistent(version, req.headers()) && !has_body(req.headers());
    Head::Request {
        req: Box::new(req),
        keep_alive,
    }
}

/// Whether the client asks to keep the connection (RFC 9112 §9.3).
fn persistent(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_10 => has("keep-alive"),
        _ => !has("close"),
    }
}

/// Whether the request announces a body (which kiln does not read).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// One request through the router and its answer onto the socket. `Ok(true)` when the
/// connection stays open for the next request.
async fn exchange(
    stream: &mut TcpStream,
    peer: SocketAddr,
    router: &axum::Router,
    mut req: Request<Body>,
    keep_alive: bool,
) -> io::Result<bool> {
    let head_only = req.method() == Method::HEAD;
    let version = req.version();
    req.extensions_mut().insert(ConnectInfo(peer));
    let Ok(resp) = router.clone().oneshot(req).await;
    let (mut parts, body) = resp.into_parts();
    let file = parts.extensions.remove::<SendFile>();
    let bodiless = head_only
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    // Small answers (index, checksum files, errors) are collected, so they go out with their
    // length; a file's length is set by `serve_file`, and its (empty) body, which holds the
    // access log line, is kept until the file is sent or the client is gone.
    let (bytes, body) = match (&file, bodiless) {
        (None, false) => {
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(io::Error::other)?;
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            (bytes, None)
        }
        _ => (Default::default(), Some(body)),
    };
    let mut out = response_head(parts.status, &mut parts.headers, version, keep_alive);
    out.extend_from_slice(&bytes);
    let file = file.filter(|_| !bodiless);
    if file.is_some() {
        // Not worth failing the answer for: without the cork the bytes go out all the same.
        let _ = set_cork(stream, true);
    }
    stream.write_all(&out).await?;
    if let Some(file) = &file {
        send_file(stream, file).await?;
        // Uncorking sends the last, partial segment.
        let _ = set_cork(stream, false);
    }
    drop(body);
    Ok(keep_alive)
}

/// The status line and header fields of an answer, with Date and the connection's fate added.
fn response_head(
    status: StatusCode,
    headers: &mut HeaderMap,
    version: Version,
    keep_alive: bool,
) -> Vec<u8> {
    if !headers.contains_key(header::DATE) {
        let now = httpdate::fmt_http_date(SystemTime::now());
        if let Ok(v) = HeaderValue::from_str(&now) {
            headers.insert(header::DATE, v);
        }
    }
    if !keep_alive {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// TCP_CORK, nginx's `tcp_nopush`: while a file goes out, only full segments are sent, and the
/// head rides in the first one with the body's first bytes. (nix 0.31 has no sockopt for it.)
fn set_cork(stream: &TcpStream, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::from(on);
    // SAFETY: a socket descriptor kept open by `stream`, and a c_int of the length passed.
    let done = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The whole answer to a request kiln refuses to read.
fn refusal(status: StatusCode) -> Vec<u8> {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response_head(status, &mut headers, Version::HTTP_11, false)
}

/// Sends the file's part with sendfile(2), counting what the kernel takes in `file.sent`. An
/// error when the client goes away (or stalls past the stall timeout, which the kernel enforces),
/// or when the file has become shorter than its part since it was opened.
async fn send_file(stream: &TcpStream, file: &SendFile) -> io::Result<()> {
    let mut offset = i64::try_from(file.offset).map_err(io::Error::other)?;
    let mut left = file.len;
    while left > 0 {
        let count = usize::try_from(left.min(SENDFILE_CHUNK)).unwrap_or(1 << 20);
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(stream, &*file.file, Some(&mut offset), count)
                .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than when it was opened",
                ));
            }
            Ok(n) => {
                file.sent.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // A client on loopback may take every byte at once: let the other connections run.
        tokio::task::consume_budget().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<u8>, Option<Head>) {
        let mut buf = text.as_bytes().to_vec();
        let head = parse_head(&mut buf);
        (buf, head)
    }

    #[test]
    fn heads_are_taken_one_at_a_time() {
        let (rest, head) = parse("GET /a.raw HTTP/1.1\r\nHost: k\r\n\r\nHEAD /b");
        let Some(Head::Request { req, keep_alive }) = head else {
            panic!("not a request")
        };
        assert_eq!(req.uri().path(), "/a.raw");
        assert!(keep_alive);
        assert_eq!(rest, b"HEAD /b");
        assert!(parse("HEAD /b").1.is_none());
    }

    #[test]
    fn connection_fate_follows_version_and_header() {
        let keep = |text: &str| match parse(text).1 {
            Some(Head::Request { keep_alive, .. }) => keep_alive,
            _ => panic!("not a request: {text}"),
        };
        assert!(!keep("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!keep("POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"));
    }

    #[test]
    fn malformed_heads_are_refused() {
        for text in [
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            "\x01\x02 / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(text).1, Some(Head::Refused(StatusCode::BAD_REQUEST))),
                "{text:?}"
            );
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            parse(&many).1,
            Some(Head::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        ));
    }
}
