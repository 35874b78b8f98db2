//! The push port's accept loop (the side port's too): hyper serving a
//! router with a deadline on each phase of a connection and a cap on their
//! number, so that a slow or hostile sender holds neither memory, nor a
//! `max_in_flight` place, nor the shutdown for long.
//!
//! A connection is [`Phase::Waiting`] for a request (new, or kept alive
//! after an answer) for at most `ingest.idle_timeout` (hyper's header
//! timer, which starts as soon as it waits), in [`Phase::Head`] from the
//! first byte of a request for at most `ingest.header_timeout` (ours), and
//! [`Phase::Busy`] while the router answers, reading the body within
//! `ingest.body_timeout` ([`Deadline`]).

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use super::logged::Throttle;
use crate::settings::IngestSettings;

/// TCP keepalive on accepted sockets: a sender that vanished without a
/// FIN is noticed after about 60 + 3 × 10 s even mid-request.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// The most a connection buffers of a request head (hyper's read buffer;
/// its default is 400 KiB): a longer head is answered 431. Uincall's are
/// well under 2 KiB; this bounds what slow heads hold to 64 KiB each.
const MAX_BUFFER_BYTES: usize = 64 * 1024;

/// The `ingest.*` bounds of the push port.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    header_timeout: Duration,
    body_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    shutdown_timeout: Duration,
}

impl Limits {
    pub(super) fn new(i: &IngestSettings) -> Limits {
        Limits {
            header_timeout: i.header_timeout,
            body_timeout: i.body_timeout,
            idle_timeout: i.idle_timeout,
            max_connections: i.max_connections,
            shutdown_timeout: i.shutdown_timeout,
        }
    }
}

/// Serves `router` on `listener` until `stop`; then stops accepting, lets
/// the requests in flight be answered, closes the connections without one
/// at once and, after `ingest.shutdown_timeout`, all the others. Returns
/// only once no connection task is left.
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let over_cap = Throttle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, mostly: give closing ones a moment.
                warn!(error = %e, "accepting a connection failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse_over_cap(&over_cap, peer, limits.max_connections);
            drop(stream);
            continue;
        };
        keepalive(&stream);
        let conn = connection(stream, peer, router.clone(), limits, stop.clone(), permit);
        connections.spawn(conn);
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "connections still open after ingest.shutdown_timeout: closed"
        );
    }
    connections.shutdown().await;
}

/// Logs a connection closed over `ingest.max_connections`, at most once a
/// second (the sender chooses how many).
fn refuse_over_cap(throttle: &Throttle, peer: SocketAddr, max: usize) {
    if let Some(not_logged) = throttle.admit() {
        warn!(
            %peer,
            max_connections = max,
            not_logged,
            "connection closed: ingest.max_connections open (logged at most once a second; not_logged: those closed since the last line)"
        );
    }
}

fn keepalive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "TCP keepalive not set on a connection");
    }
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request; `served` once it answered one.
    Waiting { served: bool },
    /// A request's head has been arriving since then.
    Head(Instant),
    /// The router has the request.
    Busy,
}

impl Phase {
    /// A byte arrived: the first of a head when waiting.
    fn on_bytes(&mut self) -> bool {
        let waiting = matches!(self, Phase::Waiting { .. });
        if waiting {
            *self = Phase::Head(Instant::now());
        }
        waiting
    }

    /// When the head must be complete.
    fn head_deadline(self, header_timeout: Duration) -> Option<Instant> {
        match self {
            Phase::Head(since) => Some(since + header_timeout),
            _ => None,
        }
    }

    /// On stop, whether the connection is closed at once: nothing to
    /// answer (hyper itself would wait for a first request, or the rest of
    /// a head, on a connection that has not answered one yet).
    fn close_on_stop(self) -> bool {
        matches!(self, Phase::Waiting { served: false } | Phase::Head(_))
    }
}

/// Serves one connection until it closes, its head is late, or the stop
/// closes it; holds its `max_connections` place until then.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    _place: OwnedSemaphorePermit,
) {
    let (phase, mut phase_seen) = watch::channel(Phase::Waiting { served: false });
    let phase = Arc::new(phase);
    let io = TokioIo::new(Watched {
        stream,
        phase: phase.clone(),
    });
    let service = requests(router, peer, limits, phase);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Hyper's header timer starts as soon as a connection waits for a
        // request: that is the idle timeout. The head's own is below.
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_BUFFER_BYTES)
        .serve_connection(io, TowerToHyperService::new(service));
    let mut conn = pin!(conn);
    let mut stopping = false;
    loop {
        let head_deadline = phase_seen
            .borrow_and_update()
            .head_deadline(limits.header_timeout);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                if phase_seen.borrow().close_on_stop() {
                    return;
                }
                // Answers the request in flight, then closes.
                conn.as_mut().graceful_shutdown();
            }
            _ = sleep_until(head_deadline), if head_deadline.is_some() => {
                // Not logged higher: the sender chooses how many.
                debug!(%peer, "connection closed: request head not complete within ingest.header_timeout");
                return;
            }
            Ok(()) = phase_seen.changed() => {}
        }
    }
}

/// The router serving one connection's requests: each body under
/// `ingest.body_timeout`, the peer's address on it, and the connection's
/// phase told when a request starts and when it is answered.
fn requests(
    router: Router,
    peer: SocketAddr,
    limits: Limits,
    phase: Arc<watch::Sender<Phase>>,
) -> impl tower::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |req: hyper::Request<Incoming>| {
        phase.send_replace(Phase::Busy);
        let mut req = req.map(|body| Body::new(Deadline::new(body, limits.body_timeout)));
        req.extensions_mut().insert(ConnectInfo(peer));
        let (call, phase) = (router.clone().oneshot(req), phase.clone());
        async move {
            let answer = call.await;
            phase.send_replace(Phase::Waiting { served: true });
            answer
        }
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// The socket, noting the first byte of each request head.
struct Watched {
    stream: TcpStream,
    phase: Arc<watch::Sender<Phase>>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.phase.send_if_modified(Phase::on_bytes);
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that fails with [`BodyTimedOut`] unless it has arrived
/// whole within `ingest.body_timeout` of its head: a total deadline, where
/// a per-read one lets a slow drip through.
struct Deadline {
    body: Incoming,
    expires: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(body: Incoming, timeout: Duration) -> Deadline {
        Deadline {
            body,
            expires: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.expires.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A body that did not arrive whole within `ingest.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the body did not arrive whole within ingest.body_timeout")]
pub(super) struct BodyTimedOut;

/// Whether reading a body failed at `ingest.body_timeout`.
pub(super) fn timed_out(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        source = err.source();
    }
    false
}
