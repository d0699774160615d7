//! The accept loop and each connection's lifetime: a cap on open connections, a deadline for a request head,
//! an idle timeout, and a graceful stop. `axum::serve` has none of the first three, so imagegate serves
//! connections itself with hyper (HTTP/1.1 and HTTP/2 by prior knowledge, like `axum::serve`).
//!
//! - `max_connections`: a connection accepted while that many are open is closed at once (the client sees a
//!   reset or an empty answer), so a flood of idle sockets cannot use up file descriptors or memory.
//! - `header_read_timeout`: a request head (HTTP/1.1) must arrive whole within this time of the connection
//!   opening or of the previous answer ending; a connection that sends nothing, or a head byte by byte, is
//!   closed. hyper times the head of every HTTP/1.1 request; the watchdog here times the first bytes (before
//!   hyper knows the protocol) and HTTP/2 connections that never send a request.
//! - `idle_timeout`: a connection with no request in flight for this long is closed (HTTP/2 gets a GOAWAY).
//!   For HTTP/1.1 the wait for the next head is also bounded by `header_read_timeout`, whichever is shorter.
//!
//! What this does not bound: a request whose body trickles in (bounded by `server.request_timeout` and the
//! body limits) and the number of connections per client address (a reverse proxy's job): `docs/security.md`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Connection-level limits (`[server]` settings).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serve `router` on `listener` until `shutdown` resolves; then stop accepting, ask every connection to finish
/// (idle ones close at once, busy ones after their answer) and return when all have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let refused_log = RateLimitedLog::default();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Closing at once, rather than leaving it in the backlog, tells the client now and frees the socket.
            refused_log.warn(limits.max_connections);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tracker.spawn(connection(tcp, peer, router.clone(), limits, stop.clone(), permit));
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Errors of one connection (reset before accept) are skipped; others (out of file descriptors) are logged
/// and accepting pauses briefly so the loop does not spin.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One connection, from accept to close.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    stop: CancellationToken,
    _open: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let tracked = activity.clone();
    let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let in_flight = InFlight::begin(tracked.clone());
        let router = router.clone();
        async move {
            // The peer address, as axum's `ConnectInfo` (the console's sign-in back-off reads it).
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = router.oneshot(request).await?;
            // The request counts as in flight until its answer's body is sent or dropped (streams included).
            Ok::<_, std::convert::Infallible>(response.map(move |body| {
                Body::new(body.map_frame(move |frame| {
                    let _in_flight = &in_flight;
                    frame
                }))
            }))
        }
    });
    // Before its first bytes, a connection has until its first deadline (`header_read_timeout`), as below.
    let first_deadline = activity.deadline(&limits).unwrap_or_else(far_future);
    let protocol = tokio::select! {
        sniffed = sniff(&tcp) => match sniffed {
            Ok(Some(protocol)) => protocol,
            // Closed before sending anything, or broken.
            Ok(None) | Err(_) => return,
        },
        () = stop.cancelled() => return,
        () = tokio::time::sleep_until(first_deadline) => {
            tracing::debug!("closing a connection that sent nothing");
            return;
        }
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut builder = match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_only(),
        Protocol::Undecided => builder,
    };
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = activity.changed.notified() => {}
            () = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() && !closing => {
                if activity.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!("closing an idle connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 by prior knowledge: the connection opened with the whole HTTP/2 preface.
    Http2,
    /// The bytes so far begin the preface without completing it: `auto` reads on and decides.
    Undecided,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of `tcp` from its first bytes, peeked at (left in the socket); `None` when it closed first.
///
/// hyper-util's `auto` would read those bytes itself and hand them back to hyper before the rest: hyper's
/// first read then returns only them and its second grows its read buffer from 8 to 16 KiB, which every open
/// HTTP/1.1 connection kept for its lifetime (docs/performance.md, "Held requests"). Told the protocol, `auto`
/// reads nothing itself and hyper reads the request straight from the socket.
async fn sniff(tcp: &TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = tcp.peek(&mut first).await?;
    Ok(match n {
        0 => None,
        n if first[..n] != H2_PREFACE[..n] => Some(Protocol::Http1),
        n if n == H2_PREFACE.len() => Some(Protocol::Http2),
        _ => Some(Protocol::Undecided),
    })
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// Requests in flight on one connection and when it last had none.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Requests started so far.
    served: AtomicU64,
    /// Milliseconds after `opened` when the last request in flight ended.
    idle_since_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// When the connection is to be closed if nothing happens before; `None` while a request is in flight.
    /// Before its first request a connection has `header_read_timeout`; afterwards `idle_timeout`.
    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let allowed = if self.served.load(Ordering::Acquire) == 0 {
            limits.header_read_timeout.min(limits.idle_timeout)
        } else {
            limits.idle_timeout
        };
        Some(since + allowed)
    }
}

/// One request in flight: counted from the moment hyper hands it over until its answer is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.served.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_one();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// A warning about refused connections at most once a second (a flood must not flood the log too).
#[derive(Default)]
struct RateLimitedLog {
    refused: AtomicU64,
    last_second: AtomicU64,
}

impl RateLimitedLog {
    fn warn(&self, cap: usize) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let second = crate::time::now_secs();
        if self.last_second.swap(second, Ordering::Relaxed) != second {
            tracing::warn!(
                max_connections = cap,
                refused_total = refused,
                "closed a new connection: server.max_connections are open"
            );
        }
    }
}
