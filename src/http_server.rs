//! The HTTP server: accepting connections, what each may hold and for how long, and the
//! graceful end.
//!
//! `axum::serve` sets no timer, so hyper's header timeout never applies: a client that sends
//! half a request line, a body that stalls, or a keep-alive peer that vanished without a FIN
//! (NAT and load balancers drop idle flows) held its socket and task for ever. With enough of
//! them the process hit its open-file limit, stopped accepting, and its builds could not open
//! a log file or a socket. Here every connection waits at most `idle` for a request's headers
//! (also between keep-alive requests) and between pieces of a body, TCP keepalive finds dead
//! peers of long responses (`?follow=true`), and at most `max_connections` are served at once
//! (further ones wait in the listen backlog), below the open-file limit so builds keep theirs.

use axum::body::Body;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Keepalive probes on an idle connection: the first after this, then every `KEEPALIVE / 4`;
/// the kernel gives up after 4 unanswered, so a vanished peer is found within ~2 minutes.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// After accept fails for want of file descriptors, wait this long before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Never fewer connections than this, whatever the open-file limit.
const MIN_CONNECTIONS: usize = 64;

/// What one connection may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest wait for a request's headers (and between keep-alive requests) and between
    /// two pieces of a request body.
    pub idle: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Limits {
    /// `max_connections`, but at most three quarters of the open-file limit: the rest is for
    /// the builds' files and sockets (logs, sources, dockerd, registry, S3, Kafka).
    pub fn new(idle: Duration, max_connections: usize) -> Self {
        let cap = open_file_limit().map_or(usize::MAX, |n| (n / 4 * 3).max(MIN_CONNECTIONS));
        Self {
            idle,
            max_connections: max_connections.min(cap).max(1),
        }
    }
}

/// The soft open-file limit (RLIMIT_NOFILE), if known.
fn open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    usize::try_from(lim.rlim_cur).ok()
}

/// Raises the soft open-file limit to the hard one (as Go programs and nginx's
/// `worker_rlimit_nofile` do): systemd and many container runtimes start processes at 1024,
/// which a few hundred log followers and running builds use up. Returns the limit now set.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur);
            }
        }
    }
    Some(lim.rlim_cur)
}

/// Serves `router` on `listener` until `stop`, then lets each connection finish the request
/// it is in and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle);
    builder.http2().timer(TokioTimer::new());
    let mut was_full = false;
    loop {
        // A slot first, then accept: at the limit, new connections wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let full = slots.available_permits() == 0;
        if full && !was_full {
            tracing::warn!(
                max = limits.max_connections,
                "serving the most HTTP connections allowed; new ones wait until one closes"
            );
        }
        was_full = full;
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        keepalive(&stream);
        let idle = limits.idle;
        let service = TowerToHyperService::new(router.clone().map_request(
            move |req: Request<hyper::body::Incoming>| {
                req.map(|body| Body::new(tower_http::timeout::TimeoutBody::new(idle, body)))
            },
        ));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            // A peer that resets or times out is the peer's business, not an error of ours.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Turns TCP keepalive on, so a long response to a peer that vanished ends.
fn keepalive(stream: &tokio::net::TcpStream) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE / 4)
        .with_retries(4);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// A failed accept: a connection the peer reset before we took it is nothing; out of file
/// descriptors, wait a little for some to close instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept an HTTP connection (out of file descriptors? see RLIMIT_NOFILE)");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_below_the_open_file_limit() {
        let soft = open_file_limit().expect("RLIMIT_NOFILE");
        let limits = Limits::new(Duration::from_secs(1), usize::MAX);
        assert!(limits.max_connections <= (soft / 4 * 3).max(MIN_CONNECTIONS));
        assert_eq!(Limits::new(Duration::from_secs(1), 5).max_connections, 5);
    }
}
