//! The connections of `kiln serve`: accepting them, bounding how many are open, and closing the
//! ones that say nothing.
//!
//! `axum::serve` has neither a header-read timeout nor a connection limit, and a hostile tester
//! showed what that costs: silent connections are held forever, and with 1100 of them the
//! process runs out of descriptors and answers nobody. So kiln drives its HTTP/1 connections
//! itself: on Linux its own (see [`http1`]: files go out with sendfile), elsewhere hyper's, as
//! axum's `serve-with-hyper` example does:
//!
//! - **Header timeout.** A connection that has not sent a complete request head within the
//!   timeout is closed (`http1`; hyper's `header_read_timeout` elsewhere). The clock starts
//!   whenever a head is awaited: on a new connection, and on a keep-alive connection after its
//!   response, so it also bounds idle keep-alive.
//! - **Stall timeout.** The kernel's TCP_USER_TIMEOUT drops a connection whose client has
//!   acknowledged nothing for the stall timeout: sent data left unacknowledged (a node powered
//!   off mid-download), or a receive window kept shut (a client that stopped reading: Linux
//!   counts zero-window probing against the timeout since 5.11). A slow download that
//!   progresses is never cut, however long it takes (the tests read 256 KiB every 50 ms for
//!   twice the timeout); a client that reads in bursts must not pause longer than the timeout
//!   (curl's --limit-rate pauses for seconds after a burst).
//! - **Connection cap.** At most `max_connections` are open. A new connection beyond the cap
//!   closes the oldest connection that has no request in progress (idle keep-alive, or not yet a
//!   complete request: what nginx does with its "reusable" connections when it runs out); only
//!   when every open connection has a request in progress does the newcomer wait for one to end
//!   (which the stall timeout bounds), and accepting with it: later ones wait in the kernel's
//!   queue. Silent connections can then neither exhaust descriptors nor keep a download out,
//!   and a download is never cut for them. The slots are kiln's own: a tokio `Semaphore` around
//!   accept would make newcomers wait behind silent connections, and tower's `ConcurrencyLimit`
//!   counts requests, not connections; neither can close an idle connection to make room.
//! - **Graceful stop** (SIGINT/SIGTERM): no new connections; idle ones close, requests in
//!   flight finish (a stop signal every connection watches; hyper-util's `GracefulShutdown`
//!   elsewhere).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;
use tokio::sync::Notify;

#[cfg(target_os = "linux")]
use super::http1;

/// How long a client may take to send a request head (and how long a keep-alive connection may
/// stay idle). IPA and Ironic send their request as soon as they are connected.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a download may go without the client acknowledging any data. IPA itself gives up
/// after 60 s without data; twice that leaves room for a client whose disk stalls for a while.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections open at once. A lab's nodes each download with one GET; a few dozen nodes, their
/// conductor's HEADs and checksum requests, and a browser fit many times over.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;

/// Descriptors kept for everything that is not a connection (listener, stdio, the runtime,
/// checksum caches being written).
const RESERVED_DESCRIPTORS: u64 = 64;

/// What `kiln serve` allows a client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub stall_timeout: Duration,
}

impl Limits {
    /// These limits with `max_connections` lowered to what the descriptor limit allows: a
    /// connection holds its socket and the file it sends. The soft limit is first raised to the
    /// hard one (as Go's runtime does), so the cap, not the limit, is what a client meets.
    pub fn fit_descriptors(self) -> Result<Limits> {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) =
            getrlimit(Resource::RLIMIT_NOFILE).context("reading the descriptor limit")?;
        // Enough for any cap; also keeps clear of RLIM_INFINITY, which Linux refuses here.
        let wanted = hard.min(1 << 16);
        let soft = if soft < wanted && setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).is_ok() {
            wanted
        } else {
            soft
        };
        let fits = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS) / 2).unwrap_or(1);
        Ok(Limits {
            max_connections: self.max_connections.min(fits).max(1),
            ..self
        })
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Slots::new(limits.max_connections));
    let server = Server::new(router, limits);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let (stream, peer, conn) = accepted;
        if let Err(e) = set_stall_timeout(&stream, limits.stall_timeout) {
            eprintln!("{peer}: setting TCP_USER_TIMEOUT: {e}; a stalled download keeps its place");
        }
        server.spawn(stream, peer, conn);
    }
    server.shutdown().await;
}

/// On Linux, kiln's own HTTP/1.1 connections, which send files with sendfile (see [`http1`]).
#[cfg(target_os = "linux")]
struct Server {
    driver: http1::Driver,
    stop: tokio::sync::watch::Sender<bool>,
}

#[cfg(target_os = "linux")]
impl Server {
    fn new(router: axum::Router, limits: Limits) -> Server {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        Server {
            driver: http1::Driver {
                router,
                header_timeout: limits.header_timeout,
                stop: stopped,
            },
            stop,
        }
    }

    fn spawn(&self, stream: tokio::net::TcpStream, peer: SocketAddr, conn: Arc<Connection>) {
        let driver = self.driver.clone();
        tokio::spawn(http1::serve_connection(stream, peer, conn, driver));
    }

    /// Tells every connection to stop (idle ones at once, busy ones after their answer) and
    /// waits until all have ended: each holds a receiver of `stop`.
    async fn shutdown(self) {
        self.stop.send_replace(true);
        drop(self.driver);
        self.stop.closed().await;
    }
}

#[cfg(target_os = "linux")]
impl http1::Place for Connection {
    type Busy = InRequest;

    fn begin_request(self: &Arc<Self>) -> InRequest {
        Connection::begin_request(self)
    }

    fn close_signal(&self) -> &Notify {
        &self.close
    }
}

#[cfg(not(target_os = "linux"))]
use hyper_connections::Server;

#[cfg(not(target_os = "linux"))]
mod hyper_connections {
    //! Elsewhere than Linux (a Mac serving a lab): hyper's HTTP/1 connections, with the header
    //! timeout and graceful stop hyper-util provides; a file's bytes go through a 1 MiB buffer.

    use super::*;
    use axum::body::{Body, Bytes};
    use axum::extract::ConnectInfo;
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tower::ServiceExt;

    pub(super) struct Server {
        router: axum::Router,
        http: hyper::server::conn::http1::Builder,
        graceful: GracefulShutdown,
    }

    impl Server {
        pub(super) fn new(router: axum::Router, limits: Limits) -> Server {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            Server {
                router,
                http,
                graceful: GracefulShutdown::new(),
            }
        }

        pub(super) fn spawn(
            &self,
            stream: tokio::net::TcpStream,
            peer: SocketAddr,
            conn: Arc<Connection>,
        ) {
            let service = hyper::service::service_fn({
                let (router, conn) = (self.router.clone(), conn.clone());
                move |req| handle(router.clone(), peer, conn.clone(), req)
            });
            let http_conn = self
                .graceful
                .watch(self.http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                tokio::select! {
                    _ = http_conn => {}
                    // Only a connection without a request in progress is told to close. A request
                    // arriving in the instant between is cut, as in any keep-alive close race;
                    // clients retry such requests.
                    () = conn.close.notified() => {}
                }
                drop(conn);
            });
        }

        pub(super) async fn shutdown(self) {
            self.graceful.shutdown().await;
        }
    }

    /// One request through the router, with the client's address for the access log; the connection
    /// counts as busy until the response body is dropped (sent, or the client gone).
    async fn handle(
        router: axum::Router,
        peer: SocketAddr,
        conn: Arc<Connection>,
        mut req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<BusyBody>, Infallible> {
        let busy = conn.begin_request();
        req.extensions_mut().insert(ConnectInfo(peer));
        let resp = router.oneshot(req.map(Body::new)).await?;
        Ok(resp.map(|body| BusyBody { body, _busy: busy }))
    }

    /// A response body that keeps its connection busy (not to be closed for a newcomer) until it is
    /// dropped.
    struct BusyBody {
        body: Body,
        _busy: InRequest,
    }

    impl http_body::Body for BusyBody {
        type Data = Bytes;
        type Error = axum::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
            Pin::new(&mut self.get_mut().body).poll_frame(cx)
        }

        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.body.size_hint()
        }
    }
}

/// Lets the kernel drop the connection when its client acknowledges nothing for `timeout`.
#[cfg(target_os = "linux")]
fn set_stall_timeout(stream: &tokio::net::TcpStream, timeout: Duration) -> nix::Result<()> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::TcpUserTimeout, &ms)
}

/// TCP_USER_TIMEOUT is Linux's; elsewhere (a Mac serving a lab) a stalled download keeps its
/// connection until the client goes, as before.
#[cfg(not(target_os = "linux"))]
fn set_stall_timeout(_stream: &tokio::net::TcpStream, _timeout: Duration) -> nix::Result<()> {
    Ok(())
}

/// The next connection, once there is room for it. Room is made after accepting, not before:
/// an idle connection is closed only for a connection that has arrived.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Slots>,
) -> (tokio::net::TcpStream, SocketAddr, Arc<Connection>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, peer, slots.acquire().await),
            // Out of descriptors or memory despite the cap (files being hashed count too): the
            // connection waits in the kernel's queue; try again shortly, as hyper 0.14 did.
            Err(e) if is_resource_error(&e) => {
                eprintln!("accepting a connection: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The client went away before we took it.
            Err(_) => {}
        }
    }
}

fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The open connections, and which of them have no request in progress.
struct Slots {
    max: usize,
    open: Mutex<Open>,
    /// Told when a connection ends.
    freed: Notify,
}

struct Open {
    count: usize,
    next_id: u64,
    /// Connections without a request in progress, oldest first, with their close signal.
    idle: BTreeMap<u64, Arc<Notify>>,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max,
            open: Mutex::new(Open {
                count: 0,
                next_id: 0,
                idle: BTreeMap::new(),
            }),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Room for one more connection: at once below the cap; at the cap, after closing the
    /// oldest idle connection, or when a busy one ends.
    async fn acquire(self: &Arc<Self>) -> Arc<Connection> {
        loop {
            {
                let mut open = self.lock();
                if open.count < self.max {
                    open.count += 1;
                    let id = open.next_id;
                    open.next_id += 1;
                    let close = Arc::new(Notify::new());
                    open.idle.insert(id, close.clone());
                    return Arc::new(Connection {
                        slots: self.clone(),
                        id,
                        close,
                        requests: AtomicUsize::new(0),
                    });
                }
                // notify_one keeps the signal for a task not yet waiting on it.
                if let Some((_, close)) = open.idle.pop_first() {
                    close.notify_one();
                }
            }
            self.freed.notified().await;
        }
    }
}

/// One open connection's place among the slots; the place is freed when the last reference (the
/// connection's task, its service, its response bodies) is dropped.
struct Connection {
    slots: Arc<Slots>,
    id: u64,
    close: Arc<Notify>,
    /// Requests in progress (changed under the slots' lock).
    requests: AtomicUsize,
}

impl Connection {
    fn begin_request(self: &Arc<Self>) -> InRequest {
        let mut open = self.slots.lock();
        if self.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            open.idle.remove(&self.id);
        }
        InRequest(self.clone())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.count -= 1;
        open.idle.remove(&self.id);
        drop(open);
        self.slots.freed.notify_one();
    }
}

/// A request in progress on a connection; when the last one ends, the connection is idle again.
struct InRequest(Arc<Connection>);

impl Drop for InRequest {
    fn drop(&mut self) {
        let conn = &self.0;
        let mut open = conn.slots.lock();
        if conn.requests.fetch_sub(1, Ordering::Relaxed) == 1 {
            open.idle.insert(conn.id, conn.close.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let slots = Arc::new(Slots::new(2));
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        let busy = a.begin_request();
        // The cap is reached: a is busy, so b (idle) is told to close; c gets its place once b
        // is gone.
        let c = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire().await })
        };
        b.close.notified().await;
        drop(b);
        let c = c.await.unwrap();
        assert_eq!(slots.lock().count, 2);
        // a idle again, c newer: a is the one closed next.
        drop(busy);
        let d = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire().await })
        };
        a.close.notified().await;
        drop(a);
        let _d = d.await.unwrap();
        drop(c);
        assert_eq!(slots.lock().count, 1);
    }
}
