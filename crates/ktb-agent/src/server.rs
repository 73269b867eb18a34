//! The agent's HTTP endpoint: readiness, and the upgrade to a tunnel.
//!
//! hyper parses HTTP so that a port scanner, a health checker or garbage
//! bytes only ever cost one connection; header reads are time-limited so a
//! slow client cannot pin a task forever.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming as Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ktb_proto::handshake::{agent_handshake, websocket_config, Welcome};
use ktb_proto::session::Side;
use ktb_proto::{Session, SessionConfig};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::attachment::Attachment;

/// The path of the tunnel endpoint.
pub const TUNNEL_PATH: &str = "/tunnel";
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, attachment: Arc<Attachment>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "cannot accept a tunnel connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let attachment = Arc::clone(&attachment);
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, Arc::clone(&attachment)));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

async fn route(
    req: Request<Body>,
    attachment: Arc<Attachment>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/readyz" | "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, TUNNEL_PATH) => upgrade(req, attachment),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this is a ktb agent (try /readyz)\n",
        ),
    };
    Ok(response)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// Answers the WebSocket upgrade and hands the connection to [`attach`].
fn upgrade(mut req: Request<Body>, attachment: Arc<Attachment>) -> Response<Full<Bytes>> {
    let is_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    };
    if !is_websocket {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => attach(TokioIo::new(upgraded), attachment).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

/// Runs the handshake, then serves the tunnel until it ends.
async fn attach<S>(io: S, attachment: Arc<Attachment>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket_config())).await;
    let config = attachment.config();
    let version = match agent_handshake(&mut ws, config.token()).await {
        Ok(version) => version,
        Err(e) => {
            tracing::warn!(error = %e, "refused a tunnel");
            return;
        }
    };
    let (session, incoming) = Session::start(ws, Side::Agent, SessionConfig::default());
    let welcome = Welcome {
        version,
        ports: attachment.ports().to_vec(),
        agent: concat!("ktb-agent ", env!("CARGO_PKG_VERSION")).into(),
        resolver: config.resolver.clone(),
    };
    if !attachment.attach(session.clone(), welcome) {
        return;
    }
    tracing::info!("client attached");
    let dial_timeout = config.dial_timeout;
    let connect_role = config.connect;
    let requests = tokio::spawn(crate::connect::serve_requests(
        session.clone(),
        incoming,
        connect_role,
        dial_timeout,
    ));
    let reason = session.closed().await;
    requests.abort();
    tracing::info!(%reason, "client detached");
}
