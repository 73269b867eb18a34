//! Connections from the router to the upstreams (original pods and
//! members' shadow pods), kept open and reused across requests.
//!
//! HTTP/1.1 goes through hyper-util's pooling client: one idle pool per
//! upstream address, keep-alive, and a retry when a pooled connection turns
//! out to have been closed before the request was written. HTTP/2 keeps one
//! multiplexed prior-knowledge connection per upstream address, made here
//! rather than by the pooling client because that client would rewrite
//! `:authority` to the upstream's address; sending the request as received
//! keeps the caller's `:authority`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// How long connecting to an upstream may take. Upstreams are pods on the
/// cluster network, normally reached in a millisecond; this only bounds how
/// long a caller waits for a 502 when a pod is gone and its packets vanish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle pooled HTTP/1.1 connection is kept. It bounds idle
/// sockets per upstream; an upstream that closes sooner (Node.js: after
/// 5 s) costs nothing, as the pool retries on a fresh connection a request
/// it could not write.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The sending half of one HTTP/2 connection, shared by every stream to
/// that upstream; `None` until first needed. The async lock makes
/// concurrent first requests share one connection instead of each dialing.
type Http2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>>;

pub struct Upstreams {
    http1: Client<HttpConnector, Incoming>,
    /// Keyed by upstream address; entries of departed members stay (a few
    /// bytes each) with their connection closed by the pod's end.
    http2: Mutex<HashMap<SocketAddr, Http2Slot>>,
}

impl Upstreams {
    pub fn new() -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Upstreams {
            http1,
            http2: Mutex::new(HashMap::new()),
        }
    }

    /// Sends an HTTP/1 request whose URI names the upstream (absolute form).
    pub async fn send_http1(&self, req: Request<Incoming>) -> anyhow::Result<Response<Incoming>> {
        Ok(self.http1.request(req).await?)
    }

    /// Sends an HTTP/2 request to `addr` over the shared connection. A
    /// request the connection refused before sending it (the upstream had
    /// just closed it) is sent once more on a new connection.
    pub async fn send_http2(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
    ) -> anyhow::Result<Response<Incoming>> {
        let slot = Arc::clone(
            self.http2
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(addr)
                .or_default(),
        );
        let mut sender = http2_sender(&slot, addr, false).await?;
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut failed) => match failed.take_message() {
                Some(req) => {
                    let mut sender = http2_sender(&slot, addr, true).await?;
                    Ok(sender.send_request(req).await?)
                }
                None => Err(failed.into_error().into()),
            },
        }
    }
}

/// The slot's connection, made now when there is none, it has closed, or
/// `replace` says the current one just refused a request.
async fn http2_sender(
    slot: &Http2Slot,
    addr: SocketAddr,
    replace: bool,
) -> anyhow::Result<http2::SendRequest<Incoming>> {
    let mut current = slot.lock().await;
    if let Some(sender) = current.as_ref().filter(|s| !replace && !s.is_closed()) {
        return Ok(sender.clone());
    }
    let sender = connect_http2(addr).await?;
    *current = Some(sender.clone());
    Ok(sender)
}

async fn connect_http2(addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Incoming>> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await.context("tcp connect")?;
        let _ = tcp.set_nodelay(true);
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(TokioIo::new(tcp))
            .await
            .context("HTTP/2 handshake")
    };
    let (sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| anyhow::anyhow!("no HTTP/2 connection within {CONNECT_TIMEOUT:?}"))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
        }
    });
    Ok(sender)
}
