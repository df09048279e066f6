//! `kiln serve DIR`: node images over HTTP the way Ironic and ironic-python-agent need them.
//!
//! HEAD answers with Content-Length, Last-Modified and an ETag; GET streams whole files or one
//! byte range (206, or 416 when unsatisfiable); If-None-Match and If-Modified-Since answer 304;
//! nothing is compressed. `<image>.sha256sum` and `<image>.sha512sum` exist for every image (see [`checksum`]). Only
//! regular files inside DIR are served: traversal in any encoding, symlinks leading out or to
//! hidden or partial files, hidden and partial files themselves, FIFOs and devices are 404. A
//! response streams from the file it opened, so replacing an image by rename does not disturb
//! downloads in flight; on Linux the connection sends it with sendfile(2) (see `http1`), elsewhere
//! it is read in 1 MiB chunks. `/` lists the images: JSON for programs (as `/index.json`), an HTML
//! table for a browser (see [`index_page`]). The access log (one line per request) counts the bytes
//! actually sent, also when the client goes away mid-download.

pub mod check;
pub mod checksum;
pub mod connections;
#[cfg(target_os = "linux")]
mod http1;
mod index_page;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Image formats IPA accepts, by extension.
const IMAGE_EXTENSIONS: &[&str] = &["raw", "img", "qcow2"];

struct Served {
    root: PathBuf,
    checksums: checksum::Checksums,
}

pub use connections::Limits;

/// Serves `dir` on `listen` within `limits` until SIGINT or SIGTERM.
pub fn run(dir: &Path, listen: SocketAddr, limits: Limits) -> Result<()> {
    let root = dir
        .canonicalize()
        .with_context(|| format!("serving {}", dir.display()))?;
    if !root.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let limits = limits.fit_descriptors()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let state = Arc::new(Served {
            root: root.clone(),
            checksums: checksum::Checksums::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state)
            .layer(axum::middleware::from_fn(access_log));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        eprintln!(
            "serving {} on http://{} (at most {} connections; {} s to send a request, \
             {} s without progress ends a download)",
            root.display(),
            listener.local_addr()?,
            limits.max_connections,
            limits.header_timeout.as_secs_f64(),
            limits.stall_timeout.as_secs_f64()
        );
        connections::serve(listener, app, limits, shutdown()).await;
        eprintln!("stopped");
        Ok(())
    })
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    eprintln!("shutting down: finishing downloads in flight");
}

/// Writes the access log line when the response body is finished — or dropped, when the
/// client went away — with the bytes actually sent and the whole duration. The connection keeps
/// the body of a file it sends with sendfile until it is sent, and counts in `sent` as it goes.
struct LogLine {
    prefix: String,
    started: Instant,
    sent: Arc<AtomicU64>,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        eprintln!(
            "{} {} {:.3}s",
            self.prefix,
            self.sent.load(Ordering::Relaxed),
            self.started.elapsed().as_secs_f64()
        );
    }
}

async fn access_log(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    use futures_util::StreamExt;
    let started = Instant::now();
    let prefix = format!("{} {} {}", peer.ip(), req.method(), req.uri().path());
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    let line = LogLine {
        prefix: format!("{prefix} {}", parts.status.as_u16()),
        started,
        sent: sent_counter(&parts),
    };
    let stream = body.into_data_stream().map(move |chunk| {
        // Borrow the whole struct: capturing only the field would drop the line (and log) now.
        let line = &line;
        if let Ok(c) = &chunk {
            line.sent.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Where the bytes of this answer are counted: a file sent with sendfile counts its own.
#[cfg(target_os = "linux")]
fn sent_counter(parts: &axum::http::response::Parts) -> Arc<AtomicU64> {
    parts
        .extensions
        .get::<http1::SendFile>()
        .map(http1::SendFile::sent)
        .unwrap_or_default()
}

#[cfg(not(target_os = "linux"))]
fn sent_counter(_parts: &axum::http::response::Parts) -> Arc<AtomicU64> {
    Arc::default()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// Maps a request path to a file inside `root`, or `None` (404) for anything else.
pub fn resolve(root: &Path, raw_path: &str) -> Option<PathBuf> {
    // Decode once; a path whose decoding has '/', '\\' or NUL inside a segment is refused, so
    // %2f and %5c tricks cannot smuggle separators.
    let mut rel = PathBuf::new();
    for seg in raw_path.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .ok()?;
        if !servable_name(&decoded) || decoded.contains(['/', '\\', '\0']) {
            return None;
        }
        rel.push(decoded.as_ref());
    }
    resolve_relative(root, &rel)
}

/// Maps one name found in `root` (not a URL: nothing is decoded, so a `%20` in it stays) to the
/// file it serves, or `None` when it is not served.
fn resolve_name(root: &Path, name: &str) -> Option<PathBuf> {
    if !servable_name(name) || name.contains(['/', '\\', '\0']) {
        return None;
    }
    resolve_relative(root, Path::new(name))
}

/// `rel` (made of servable names) inside `root`, when it resolves to a servable file there.
fn resolve_relative(root: &Path, rel: &Path) -> Option<PathBuf> {
    let full = root.join(rel).canonicalize().ok()?;
    // A symlink may point anywhere; only what resolves inside the root is served, and only when
    // the names it resolves to would be served themselves: a link to a hidden or partial file is
    // that file.
    let inside = full.strip_prefix(root).ok()?;
    if !inside
        .components()
        .all(|c| c.as_os_str().to_str().is_some_and(servable_name))
    {
        return None;
    }
    Some(full)
}

/// Whether a name (one path segment) may be served: not `.`/`..`, not hidden, not partial.
fn servable_name(name: &str) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".partial"))
}

async fn handle(
    State(s): State<Arc<Served>>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let path = uri.path();
    if path == "/index.json" {
        return index(&s, false).await;
    }
    if path == "/" {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        let mut resp = index(&s, index_page::prefers_html(accept)).await;
        // `/` answers HTML or JSON by `Accept`: a cache must not hand a browser's page to a program.
        resp.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Accept"));
        return resp;
    }
    if let Some(resp) = checksum_file::<sha2::Sha256>(&s, path).await {
        return resp;
    }
    if let Some(resp) = checksum_file::<sha2::Sha512>(&s, path).await {
        return resp;
    }
    let Some(file_path) = resolve(&s.root, path) else {
        return not_found();
    };
    serve_file(&file_path, &method, &headers).await
}

/// `<image>.<algorithm>sum` for an image that has no such file on disk: kiln computes it. `None`
/// when `path` is not such a request.
async fn checksum_file<A: checksum::Algorithm>(s: &Served, path: &str) -> Option<Response> {
    let image_path = path.strip_suffix(&format!(".{}sum", A::NAME))?;
    let img = resolve(&s.root, image_path)?;
    if !is_image(&img) || resolve(&s.root, path).is_some() {
        return None;
    }
    let Some((file, meta)) = open_regular(img.clone()).await else {
        return Some(not_found());
    };
    Some(match s.checksums.of::<A>(&img, file, &meta).await {
        Ok(hex) => {
            let name = img
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // `<hex>  <name>`: the coreutils format Ironic parses, for any algorithm.
            let body = crate::artifact::manifest::sha256sum_line(&hex, &name);
            ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    })
}

/// Opens `path` for reading when, and only when, it is a regular file: checked on the name
/// before opening and again on the opened descriptor (the name may be replaced in between).
/// O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer (which parked
/// one blocking thread per request until every download stalled); it changes nothing for regular
/// files. `None` (404) for anything else, or when the file cannot be opened.
async fn open_regular(path: PathBuf) -> Option<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = move || {
        if !std::fs::metadata(&path).ok()?.is_file() {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .ok()?;
        let meta = file.metadata().ok().filter(|m| m.is_file())?;
        Some((file, meta))
    };
    tokio::task::spawn_blocking(open).await.ok().flatten()
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e))
}

/// A strong validator from size and modification time (nanoseconds).
fn etag(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "\"{:x}-{:x}{:09x}\"",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

enum Range {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range (RFC 9110 14.1.2); several ranges are answered with the whole file.
fn parse_range(value: &str, size: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => (start, end.min(size.saturating_sub(1))),
        (Ok(start), Err(_)) if b.is_empty() => (start, size.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => {
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        _ => return Range::Whole,
    };
    if size == 0 || range.0 >= size {
        return Range::Unsatisfiable;
    }
    Range::Part(range.0, range.1)
}

/// The byte range (first, last) a `Range:` header asks of a `size`-byte file, when kiln answers
/// it with a 206: the seam the fuzz target `http_range` checks (always inside the file).
pub fn satisfiable_range(value: &str, size: u64) -> Option<(u64, u64)> {
    match parse_range(value, size) {
        Range::Part(first, last) => Some((first, last)),
        Range::Whole | Range::Unsatisfiable => None,
    }
}

/// Answers HEAD and GET for one file, with kiln's conditional and range handling.
///
/// Not tower-http's `ServeFile` (0.6, in the lock through reqwest, without its `fs` feature):
/// it opens the path itself, so the regular-file check on the opened descriptor and the
/// O_NONBLOCK open (`open_regular`) could not cover the file it streams, and a rename between
/// kiln's check and its open would serve another file; it sends no ETag and does not answer
/// If-None-Match with 304; it answers several ranges with 416 where kiln sends the whole file
/// (200, as RFC 9110 allows); and its `fs` feature would add http-range-header, mime and
/// mime_guess for the two content types kiln sends.
async fn serve_file(path: &Path, method: &Method, headers: &HeaderMap) -> Response {
    // Metadata of the opened file: a rename replacing the name does not change what we send.
    let Some((file, meta)) = open_regular(path.to_path_buf()).await else {
        return not_found();
    };
    let size = meta.len();
    let tag = etag(&meta);
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let last_modified = httpdate::fmt_http_date(modified);
    let mut base = file_headers(path, &tag, &last_modified);
    if is_not_modified(headers, &tag, modified) {
        return (StatusCode::NOT_MODIFIED, base).into_response();
    }

    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(Range::Whole, |r| parse_range(r, size));
    let (status, start, len) = match range {
        Range::Whole => (StatusCode::OK, 0, size),
        Range::Part(a, b) => {
            base.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")).expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        Range::Unsatisfiable => {
            base.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return (StatusCode::RANGE_NOT_SATISFIABLE, base).into_response();
        }
    };
    base.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if method == Method::HEAD {
        return (status, base).into_response();
    }
    file_response(status, base, file, start, len).await
}

/// An answer whose body is `len` bytes of `file` from `start`. On Linux the connection sends
/// them with sendfile (see [`http1`]); the body itself is empty.
#[cfg(target_os = "linux")]
async fn file_response(
    status: StatusCode,
    headers: HeaderMap,
    file: std::fs::File,
    start: u64,
    len: u64,
) -> Response {
    let mut resp = (status, headers).into_response();
    resp.extensions_mut()
        .insert(http1::SendFile::new(file, start, len));
    resp
}

/// An answer whose body is `len` bytes of `file` from `start`, read in 1 MiB chunks.
#[cfg(not(target_os = "linux"))]
async fn file_response(
    status: StatusCode,
    headers: HeaderMap,
    file: std::fs::File,
    start: u64,
    len: u64,
) -> Response {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "seek failed\n").into_response();
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 1 << 20);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The headers every answer for the file carries: validators, Accept-Ranges, Content-Type.
fn file_headers(path: &Path, tag: &str, last_modified: &str) -> HeaderMap {
    let mut base = HeaderMap::new();
    base.insert(
        header::ETAG,
        HeaderValue::from_str(tag).expect("etag is ascii"),
    );
    base.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_str(last_modified).expect("date is ascii"),
    );
    base.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let content_type = if path
        .extension()
        .is_some_and(|e| e == "sha256sum" || e == "sha512sum" || e == "json")
    {
        "text/plain"
    } else {
        "application/octet-stream"
    };
    base.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    base
}

/// Whether the client's copy is current: If-None-Match when sent (RFC 9110 §13.1.3: it
/// overrides If-Modified-Since), else If-Modified-Since against `modified`, to the second.
fn is_not_modified(headers: &HeaderMap, tag: &str, modified: SystemTime) -> bool {
    match headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        Some(inm) => inm.split(',').any(|t| t.trim() == tag || t.trim() == "*"),
        None => headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .is_some_and(|since| {
                let secs = |t: SystemTime| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                };
                secs(modified) <= secs(since)
            }),
    }
}

#[derive(Serialize)]
struct Entry {
    name: String,
    size: u64,
    sha256: String,
    format: &'static str,
    modified: String,
}

/// The index as JSON, or as an HTML page for a browser (`html`).
async fn index(s: &Served, html: bool) -> Response {
    match listing(s).await {
        Ok(v) if html => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            index_page::render(&v),
        )
            .into_response(),
        Ok(v) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

/// The served images, by name, each opened like a download (so a FIFO is skipped, not waited on).
async fn listing(s: &Served) -> Result<Vec<Entry>> {
    use std::os::unix::fs::FileExt;
    let root = s.root.clone();
    let names = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .with_context(|| format!("listing {}", root.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    })
    .await
    .context("listing task")??;
    let mut v = Vec::new();
    for name in names {
        // The name as it is on disk: a URL's decoding would make `a%20b.raw` of `a b.raw`.
        let Some(p) = resolve_name(&s.root, &name).filter(|p| is_image(p)) else {
            continue;
        };
        let Some((file, meta)) = open_regular(p.clone()).await else {
            continue;
        };
        let mut head = vec![0u8; 512];
        let n = file
            .read_at(&mut head, 0)
            .with_context(|| format!("reading {}", p.display()))?;
        head.truncate(n);
        v.push(Entry {
            format: check::classify(&head).name(),
            sha256: s.checksums.of::<sha2::Sha256>(&p, file, &meta).await?,
            size: meta.len(),
            modified: httpdate::fmt_http_date(meta.modified()?),
            name,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(matches!(
            parse_range("bytes=0-99", 1000),
            Range::Part(0, 99)
        ));
        assert!(matches!(
            parse_range("bytes=900-", 1000),
            Range::Part(900, 999)
        ));
        assert!(matches!(
            parse_range("bytes=-100", 1000),
            Range::Part(900, 999)
        ));
        assert!(matches!(
            parse_range("bytes=0-5000", 1000),
            Range::Part(0, 999)
        ));
        assert!(matches!(
            parse_range("bytes=1000-", 1000),
            Range::Unsatisfiable
        ));
        assert!(matches!(parse_range("bytes=0-1,5-9", 1000), Range::Whole));
        assert!(matches!(parse_range("items=0-1", 1000), Range::Whole));
    }

    #[test]
    fn only_files_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("a.raw"), "x").unwrap();
        std::fs::write(root.join(".hidden"), "x").unwrap();
        std::fs::write(root.join("b.raw.tmp"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("out.raw")).unwrap();
        std::os::unix::fs::symlink(root.join("a.raw"), root.join("in.raw")).unwrap();
        std::os::unix::fs::symlink(".hidden", root.join("to-hidden.raw")).unwrap();
        std::os::unix::fs::symlink("b.raw.tmp", root.join("to-tmp.raw")).unwrap();
        std::fs::create_dir(root.join(".dir")).unwrap();
        std::fs::write(root.join(".dir/c.raw"), "x").unwrap();
        std::os::unix::fs::symlink(".dir", root.join("dir")).unwrap();
        assert!(resolve(&root, "/a.raw").is_some());
        assert!(resolve(&root, "/in.raw").is_some());
        // A listed name is taken as it is on disk, never URL-decoded.
        std::fs::write(root.join("a%20b.raw"), "x").unwrap();
        assert!(resolve_name(&root, "a%20b.raw").is_some());
        assert!(resolve(&root, "/a%20b.raw").is_none());
        assert!(resolve(&root, "/a%2520b.raw").is_some());
        for bad in [
            ".hidden",
            "b.raw.tmp",
            "out.raw",
            "to-hidden.raw",
            "..",
            "dir/c.raw",
        ] {
            assert!(resolve_name(&root, bad).is_none(), "{bad} resolved");
        }
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc%2Fpasswd",
            "/..%2fetc/passwd",
            "/a.raw%00",
            "/.hidden",
            "/b.raw.tmp",
            "/out.raw",
            "//etc/passwd",
            "/%5c..%5cetc",
            "/to-hidden.raw",
            "/to-tmp.raw",
            "/dir/c.raw",
        ] {
            assert!(resolve(&root, bad).is_none(), "{bad} resolved");
        }
    }
}
