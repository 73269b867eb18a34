//! The agent's endpoints: readiness, the upgrade to a tunnel, and a
//! tunnel's records link (through a port-forward, see [`ktb_proto::link`]).
//! On the tunnel endpoint a connection's first byte tells them apart: the
//! records link's magic, a TLS handshake (the direct transport, see
//! [`crate::tls`], with HTTP inside), or plain HTTP.
//!
//! hyper parses HTTP so that a port scanner, a health checker or garbage
//! bytes only ever cost one connection. Every connection passes the
//! endpoint's [`Gate`] when it is accepted and keeps its [`Admission`] for
//! life: until the client has proved its key it is held to a deadline and a
//! few KiB of reads (see [`crate::preauth`]). The tunnel endpoint also
//! answers `/readyz`; a separate readiness endpoint (`--ready-listen`)
//! answers nothing else, so the tunnel can stay on the pod's loopback while
//! the kubelet probes another port.

use std::convert::Infallible;
use std::net::SocketAddr;
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
use ktb_proto::{link, Link, Session, SessionConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::attachment::Attachment;
use crate::preauth::{Admission, Gate, ReadLimit, HANDSHAKE_READ_LIMIT, HTTP_BUFFER};
use crate::probe::{Landed, ProbeMark, Probes};
use crate::tls::AgentTls;

/// The path of the tunnel endpoint.
pub const TUNNEL_PATH: &str = "/tunnel";
/// The path the laptop asks to prove the Service reaches this agent
/// (`?port=SERVICE_PORT&target=LISTEN_PORT`, see [`crate::probe`]).
pub const PROBE_PATH: &str = "/probe";
/// The path that answers the SHA-256 of the agent's TLS certificate (see
/// [`crate::tls`]), for the laptop to ask through a port-forward.
pub const TLS_FINGERPRINT_PATH: &str = "/tls-fingerprint";
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/tunnel` and `/readyz`.
    Tunnel,
    /// `/readyz` only.
    Readiness,
}

/// Serves `listener` until the task is dropped; `tls` (the tunnel
/// endpoint's) accepts the direct transport's TLS connections.
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    attachment: Arc<Attachment>,
    probes: Arc<Probes>,
    tls: Option<Arc<AgentTls>>,
) {
    let gate = Gate::new(attachment.config().handshake_timeout);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admission) = gate.admit() else {
            tracing::debug!(%peer, ?endpoint, "too many connections: closing a new one at once");
            crate::exchange::abort(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let _ = ktb_proto::socket::limit_unsent(&tcp);
        let served = Served {
            endpoint,
            attachment: Arc::clone(&attachment),
            probes: Arc::clone(&probes),
            tls: tls.clone(),
        };
        tokio::spawn(async move {
            let admission = Arc::new(admission);
            let first = match endpoint {
                Endpoint::Tunnel => first_byte(&tcp, admission.deadline).await,
                Endpoint::Readiness => None,
            };
            match (first, &served.tls) {
                (Some(byte), _) if byte == link::MAGIC[0] => {
                    attach_records(tcp, served.attachment, admission).await
                }
                (Some(TLS_HANDSHAKE), Some(tls)) => {
                    let accepted =
                        tokio::time::timeout_at(admission.deadline, tls.acceptor.accept(tcp)).await;
                    match accepted {
                        Ok(Ok(tls)) => serve_http(tls, peer, served, admission).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not complete by the deadline")
                        }
                    }
                }
                _ => serve_http(tcp, peer, served, admission).await,
            }
        });
    }
}

/// What one connection of an endpoint is served with.
struct Served {
    endpoint: Endpoint,
    attachment: Arc<Attachment>,
    probes: Arc<Probes>,
    tls: Option<Arc<AgentTls>>,
}

/// The connection's first byte, without taking it: a records link's magic
/// (see [`ktb_proto::link`]) and a TLS handshake never start an HTTP
/// request. `None` if none arrived by the deadline.
async fn first_byte(tcp: &TcpStream, deadline: tokio::time::Instant) -> Option<u8> {
    let mut first = [0];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0]),
        _ => None,
    }
}

/// A records link, as the laptop opens through a port-forward.
async fn attach_records(tcp: TcpStream, attachment: Arc<Attachment>, admission: Arc<Admission>) {
    let io = ReadLimit::new(tcp, HANDSHAKE_READ_LIMIT);
    match tokio::time::timeout_at(admission.deadline, link::accept(io)).await {
        Ok(Ok(records)) => {
            attach(records, |r| r.get_mut().lift(), attachment, admission).await;
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "refused a tunnel"),
        Err(_) => tracing::debug!("records preamble not complete by the deadline"),
    }
}

async fn serve_http(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    peer: SocketAddr,
    served: Served,
    admission: Arc<Admission>,
) {
    let deadline = admission.deadline;
    let served = Arc::new(served);
    let service = {
        let admission = Arc::clone(&admission);
        service_fn(move |req| {
            let served = Arc::clone(&served);
            let admission = Arc::clone(&admission);
            async move { Ok::<_, Infallible>(route(req, &served, &admission).await) }
        })
    };
    // All of the connection's HTTP before the deadline, however
    // many requests it makes: an HTTP client gets no more time
    // than a tunnel's handshake, and an upgraded connection keeps
    // the deadline for its handshake. (Not `keep_alive(false)`:
    // hyper would then answer the upgrade with `Connection: close`.)
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .max_buf_size(HTTP_BUFFER)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    match tokio::time::timeout_at(deadline, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error")
        }
        Err(_) => tracing::debug!(%peer, "HTTP request not complete by the deadline"),
    }
}

async fn route(
    req: Request<Body>,
    served: &Served,
    admission: &Arc<Admission>,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path(), served.endpoint) {
        (&Method::GET, "/readyz" | "/healthz", _) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, PROBE_PATH, Endpoint::Tunnel) => {
            run_probe(req.uri().query(), &served.probes).await
        }
        (&Method::GET, TUNNEL_PATH, Endpoint::Tunnel) => {
            upgrade(req, Arc::clone(&served.attachment), Arc::clone(admission))
        }
        (&Method::GET, TLS_FINGERPRINT_PATH, Endpoint::Tunnel) => match &served.tls {
            Some(tls) => text(StatusCode::OK, format!("{}\n", tls.fingerprint)),
            None => text(StatusCode::NOT_FOUND, "this agent serves no TLS\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this is a ktb agent (try /readyz)\n",
        ),
    }
}

/// `GET /probe?port=P&target=T[&mark=NAME=VALUE]`: 200 once a connection
/// to the Service's port P arrived on this agent's port T, 409 when another
/// endpoint took it, 503 with the reason when the Service could not be
/// dialled. A mesh member's probe carries its mark, so the shared
/// router sends it here rather than to the original pods.
async fn run_probe(query: Option<&str>, probes: &Probes) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    };
    let number = |name: &str| param(name).and_then(|v| v.parse::<u16>().ok());
    let (Some(port), Some(target)) = (number("port"), number("target")) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected /probe?port=P&target=T[&mark=NAME=VALUE]\n",
        );
    };
    let mark = match param("mark").map(ProbeMark::parse) {
        None => None,
        Some(Some(mark)) => Some(mark),
        Some(None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "a probe's mark is NAME=VALUE of letters, digits, '.', '_' and '-'\n",
            )
        }
    };
    let (status, body) = match probes.run(port, target, mark).await {
        Ok(Landed::Here) => (StatusCode::OK, "arrived\n".to_owned()),
        Ok(Landed::Elsewhere) => (
            StatusCode::CONFLICT,
            format!("another endpoint of the Service took the connection (port {port})\n"),
        ),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// Answers the WebSocket upgrade and hands the connection to [`attach`].
fn upgrade(
    mut req: Request<Body>,
    attachment: Arc<Attachment>,
    admission: Arc<Admission>,
) -> Response<Full<Bytes>> {
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
        match tokio::time::timeout_at(admission.deadline, on_upgrade).await {
            Ok(Ok(upgraded)) => {
                let io = ReadLimit::new(TokioIo::new(upgraded), HANDSHAKE_READ_LIMIT);
                let ws =
                    WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket_config()))
                        .await;
                attach(ws, |ws| ws.get_mut().lift(), attachment, admission).await
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            Err(_) => tracing::debug!("WebSocket upgrade not complete by the deadline"),
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

/// Runs the handshake on a link whose reads are held to
/// [`HANDSHAKE_READ_LIMIT`] until `lift`, then serves the tunnel until it
/// ends. The connection keeps its place in the endpoint's limits
/// (`admission`) for as long as it lives.
async fn attach<L: Link>(
    mut ws: L,
    lift: impl FnOnce(&mut L),
    attachment: Arc<Attachment>,
    admission: Arc<Admission>,
) {
    let config = attachment.config();
    let Some(key) = config.client_key else {
        tracing::warn!("refused a tunnel: this agent has no client key");
        return;
    };
    let version = match agent_handshake(&mut ws, key, admission.deadline).await {
        Ok(version) => version,
        Err(e) => {
            tracing::warn!(error = %e, "refused a tunnel");
            return;
        }
    };
    lift(&mut ws);
    admission.authenticated();
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
    let requests = tokio::spawn(crate::connect::serve_requests(
        session.clone(),
        incoming,
        config.connect,
        config.dial_timeout,
        config.dial_policy(),
    ));
    let reason = session.closed().await;
    requests.abort();
    tracing::info!(%reason, "client detached");
}
