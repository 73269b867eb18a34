//! The data path of `ktb mesh`: one router pod shared by several
//! developers, deciding request by request where each goes.
//!
//! The meshed Service points at the router. A request carrying a member's
//! [`Mark`] goes to that member's shadow pod, any other to the original pods
//! (through a Service that still selects them). Each accepted connection is
//! sniffed ([`sniff`]) without consuming anything: HTTP/1 and prior-knowledge
//! HTTP/2 are served by hyper and routed per request or stream
//! ([`forward`]); everything else is carried to the original pods byte for
//! byte, as only HTTP says whose a request is. Upstream connections are
//! pooled ([`upstream`]), so an unmarked request normally costs one parse
//! and one write on an open connection. Who the members are is decided
//! elsewhere and handed in with [`Router::set_members`].

mod forward;
mod mark;
mod router;
mod sniff;
mod upstream;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

pub use mark::Mark;
pub use router::{Member, Router};
pub use sniff::SNIFF_TIMEOUT;
pub use upstream::CONNECT_TIMEOUT;

use forward::Port;
use sniff::Protocol;

/// How long a caller may take to send a request's headers. hyper also
/// counts the idle time before a keep-alive connection's next request, so
/// this closes idle connections too: longer than the idle timeouts of
/// common client pools (Go: 90 s), so that the client, not the router,
/// closes first and never sends a request into a closing connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Streams one HTTP/2 caller may have open at once. Each holds a task and
/// an upstream stream; gRPC clients seldom open more than 100.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Copy buffer per direction for byte-for-byte connections: large enough
/// for bulk transfers to move in few system calls.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Where one meshed port's traffic goes.
#[derive(Clone, Copy, Debug)]
pub struct PortRoute {
    /// Unmatched traffic (and non-HTTP connections): the Service that
    /// selects the original pods, at its port.
    pub origin: SocketAddr,
    /// Matched traffic goes to `member.upstream:member_port`.
    pub member_port: u16,
}

/// Serves one meshed port forever (the caller aborts the task to stop).
pub async fn serve_port(listener: TcpListener, router: Arc<Router>, route: PortRoute) {
    let port = Arc::new(Port::new(router, route));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(?route, error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_connection(tcp, peer, Arc::clone(&port)));
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, port: Arc<Port>) {
    let protocol = sniff::sniff(&tcp).await;
    let served = match protocol {
        Protocol::Http1 => {
            let service = service_fn(move |req| {
                let port = Arc::clone(&port);
                async move { Ok::<_, std::convert::Infallible>(port.forward_http1(req).await) }
            });
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await
        }
        Protocol::Http2 => {
            let service = service_fn(move |req| {
                let port = Arc::clone(&port);
                async move { Ok::<_, std::convert::Infallible>(port.forward_http2(req).await) }
            });
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .adaptive_window(true)
                .serve_connection(TokioIo::new(tcp), service)
                .await
        }
        Protocol::Raw => {
            bridge_to_origin(tcp, peer, port.route().origin).await;
            return;
        }
    };
    if let Err(e) = served {
        tracing::debug!(%peer, ?protocol, error = %e, "connection ended with an error");
    }
}

/// Carries a non-HTTP connection to the original pods unchanged, each
/// direction's end (FIN) passed on as it comes.
async fn bridge_to_origin(mut caller: TcpStream, peer: SocketAddr, origin: SocketAddr) {
    let mut callee = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(origin)).await {
        Ok(Ok(callee)) => callee,
        failed => {
            let reason = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {CONNECT_TIMEOUT:?}"),
            };
            tracing::warn!(%peer, %origin, %reason, "cannot reach the original pods: resetting the caller");
            crate::exchange::abort(caller);
            return;
        }
    };
    let _ = callee.set_nodelay(true);
    if let Err(e) = splice(&mut caller, &mut callee).await {
        tracing::debug!(%peer, %origin, error = %e, "byte-for-byte connection ended with an error");
    }
}

/// Copies both ways until both directions have ended, shutting down each
/// side's writing when the other side's reading ends (half-close).
async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, SPLICE_BUFFER, SPLICE_BUFFER).await
}
