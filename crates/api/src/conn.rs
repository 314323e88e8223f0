//! Connections: the accept loop, with the limits that keep idle or slow
//! clients from holding the server's file handles.
//!
//! - A connection must send its first request head within
//!   `header_read_timeout`; an HTTP/1.1 connection must send each next head
//!   within it too (counted from the end of the previous response), so
//!   slowloris and idle keep-alive connections are closed.
//! - A connection with no request in flight for `idle_timeout` is closed
//!   gracefully (HTTP/2: GOAWAY). Open streams (a StreamingPull, a long
//!   download) keep a connection busy, however long they last.
//! - HTTP/2 pings find peers that went away without closing.
//! - At most `max_connections` are served at once; beyond that a new
//!   connection gets a short 503 and is closed, so the server keeps file
//!   handles for its store, jobs and the connections it serves.
//! - Shutdown stops accepting, shuts every connection down gracefully and
//!   waits at most [`DRAIN_TIMEOUT`] before dropping what is left.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// How long shutdown waits for open connections before closing them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections answered 503 at the same time; more are closed unanswered.
const MAX_REJECTING: usize = 256;
/// How long a refused connection may take to read its 503.
const REJECT_TIME: Duration = Duration::from_secs(1);
/// Upper bound of the default connection cap.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// HTTP/2 ping interval and how long a ping may go unanswered.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct ConnLimits {
    /// Connections served at once; `None`: 3/4 of the open-file limit, at
    /// most 10,000.
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: None,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ConnLimits {
    fn cap(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| {
                let nofile = nofile_limit().unwrap_or(1024);
                DEFAULT_MAX_CONNECTIONS.min(usize::try_from(nofile / 4 * 3).unwrap_or(usize::MAX))
            })
            .max(1)
    }
}

/// The soft and hard `RLIMIT_NOFILE`.
fn nofile_rlimit() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we hand it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// The soft `RLIMIT_NOFILE`.
pub fn nofile_limit() -> std::io::Result<u64> {
    Ok(nofile_rlimit()?.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the default soft
/// limit, often 1024, runs out long before memory does) and returns the
/// soft limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = nofile_rlimit()?;
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we hand it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Where shutdown is: connections watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish what is in flight, then close.
    Draining,
    /// The drain time is over: drop the connection now.
    Closing,
}

/// Serves `app` on `listener` until `signal` resolves; then calls
/// `on_stop` (which ends long streams) and drains.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnLimits,
    signal: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
) {
    let cap = limits.cap();
    let slots = Arc::new(Semaphore::new(cap));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    tracing::debug!(max_connections = cap, "accepting connections");
    tokio::pin!(signal);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut signal => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        // Without TCP_NODELAY, Nagle holds a gRPC response's small trailer frame
        // until the client's delayed ACK: ~40 ms per call (see bench/broker-results.md).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "connection cap {cap} reached: answering 503");
            if let Ok(p) = rejecting.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    reject(tcp).await;
                    drop(p);
                });
            }
            continue;
        };
        tokio::spawn(serve_one(
            builder.clone(),
            tcp,
            remote,
            app.clone(),
            limits.clone(),
            phase_rx.clone(),
            slot,
        ));
    }
    drop(listener);
    on_stop();
    let _ = phase_tx.send(Phase::Draining);
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
        let _ = phase_tx.send(Phase::Closing);
    }
}

async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    // EMFILE and the like: the pending connection stays in the backlog;
    // give open ones a moment to close instead of spinning.
    tracing::warn!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A fast answer to a connection beyond the cap.
async fn reject(mut tcp: TcpStream) {
    const BODY: &str =
        "pubrun is serving its maximum number of connections (--max-connections); retry later\n";
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(REJECT_TIME, async {
        tcp.write_all(resp.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent: closing with unread data would reset
        // the connection before the client read the answer.
        let mut buf = [0u8; 4096];
        while tcp.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Requests of one connection in flight (a response counts until its body
/// is finished or dropped), and whether it ever sent one.
#[derive(Clone, Copy, Default)]
struct Activity {
    in_flight: usize,
    seen: bool,
}

/// Counts one request in flight while alive.
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn new(tx: Arc<watch::Sender<Activity>>) -> Self {
        tx.send_modify(|a| {
            a.in_flight += 1;
            a.seen = true;
        });
        InFlight(tx)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| a.in_flight -= 1);
    }
}

/// A response body that keeps its request counted until it ends.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves when the connection has had nothing in flight for too long:
/// `first` before its first request, `idle` after.
async fn idle_for(mut rx: watch::Receiver<Activity>, first: Duration, idle: Duration) {
    loop {
        let now = *rx.borrow_and_update();
        if now.in_flight == 0 {
            let wait = if now.seen { idle } else { first };
            tokio::select! {
                _ = tokio::time::sleep(wait) => return,
                r = rx.changed() => if r.is_err() { return std::future::pending().await },
            }
        } else if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

async fn serve_one(
    builder: Builder<TokioExecutor>,
    tcp: TcpStream,
    remote: SocketAddr,
    app: Router,
    limits: ConnLimits,
    mut phase: watch::Receiver<Phase>,
    _slot: OwnedSemaphorePermit,
) {
    let (activity_tx, activity_rx) = watch::channel(Activity::default());
    let activity_tx = Arc::new(activity_tx);
    let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        let in_flight = InFlight::new(activity_tx.clone());
        let app = app.clone();
        async move {
            let resp = tower::ServiceExt::oneshot(app, req.map(Body::new)).await?;
            Ok::<_, Infallible>(resp.map(|inner| {
                Body::new(Tracked {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let idle = idle_for(activity_rx, limits.header_read_timeout, limits.idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut idle, if !closing => {
                tracing::debug!(%remote, "closing an idle connection");
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            r = phase.changed() => {
                let now = if r.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                match now {
                    Phase::Serving => {}
                    Phase::Draining if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Phase::Draining => {}
                    Phase::Closing => return,
                }
            }
        }
    }
}
