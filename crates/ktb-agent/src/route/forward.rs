//! Forwarding one HTTP request to the upstream its headers choose.
//!
//! Each request (HTTP/1) or stream (HTTP/2) is looked up in the member table
//! on its own, so one keep-alive connection can carry requests for several
//! developers. The request keeps its method, target, headers and body;
//! HTTP/1's hop-by-hop headers describe only the hop they arrived on and are
//! dropped both ways, except what an upgrade needs. `TE: trailers` is kept:
//! it says the caller accepts trailers, which the router passes on as they
//! come. Responses pass through as the upstream sent them; the router
//! writes a response itself only when it cannot reach the upstream (502)
//! or cannot express the request (CONNECT, a target hyper cannot re-aim).
//!
//! Upgrades: `Upgrade: h2c` (HTTP/1.1 to cleartext HTTP/2) is deprecated by
//! RFC 9113 and a server may ignore any `Upgrade`, so the router drops it
//! (with `HTTP2-Settings`) and answers in HTTP/1.1, still routing every
//! request; clients then stay on HTTP/1.1. Any other upgrade (WebSocket)
//! goes to the chosen upstream, and on its `101 Switching Protocols` the
//! two upgraded connections are joined byte for byte.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::router::{Member, Router};
use super::PortRoute;

/// A response body: the upstream's, streamed, or the router's own text.
pub type Body = Either<Incoming, Full<Bytes>>;

/// How long both sides of an accepted upgrade may take to hand over their
/// connections. Both are ready as soon as the 101 is written; the bound
/// only keeps a task from waiting on a peer that vanished meanwhile.
const UPGRADE_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that only concern one HTTP/1 hop (RFC 9110 §7.6.1), besides
/// `Connection` itself and the headers it names.
const HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// One meshed port: where its requests may go.
pub struct Port {
    router: Arc<Router>,
    route: PortRoute,
    /// `route.origin` as a URI authority, made once: most requests go there.
    origin_authority: Authority,
}

/// Where one request goes.
struct Upstream {
    addr: SocketAddr,
    /// `None`: the original pods.
    member: Option<Arc<Member>>,
}

impl Upstream {
    fn name(&self) -> &str {
        self.member
            .as_ref()
            .map_or("the original pods", |member| member.name.as_str())
    }
}

/// What an HTTP/1 request asks to switch to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// No (valid) upgrade.
    None,
    /// Only `h2c`: ignored, see the module comment.
    H2c,
    /// Anything else, e.g. `websocket`: passed to the upstream.
    Other,
}

impl Port {
    pub fn new(router: Arc<Router>, route: PortRoute) -> Port {
        Port {
            router,
            route,
            origin_authority: authority_of(route.origin),
        }
    }

    pub fn route(&self) -> PortRoute {
        self.route
    }

    fn upstream_for(&self, headers: &HeaderMap) -> Upstream {
        match self.router.member_for(headers) {
            Some(member) => Upstream {
                addr: SocketAddr::new(member.upstream, self.route.member_port),
                member: Some(member),
            },
            None => Upstream {
                addr: self.route.origin,
                member: None,
            },
        }
    }

    pub async fn forward_http1(&self, mut req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::CONNECT {
            // The pooling client would aim CONNECT at the upstream's own
            // address instead of the requested one.
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "ktb mesh: CONNECT is not supported through the mesh router\n".to_owned(),
            );
        }
        let upstream = self.upstream_for(req.headers());
        let upgrade = requested_upgrade(req.headers());
        strip_hop_by_hop(req.headers_mut(), upgrade == Upgrade::Other);
        if upgrade == Upgrade::H2c {
            req.headers_mut().remove(HTTP2_SETTINGS);
        }
        let authority = match upstream.member {
            None => self.origin_authority.clone(),
            Some(_) => authority_of(upstream.addr),
        };
        let Some(uri) = aimed_at(authority, req.uri()) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("ktb mesh: cannot forward request target {}\n", req.uri()),
            );
        };
        *req.uri_mut() = uri;
        let downstream = (upgrade == Upgrade::Other).then(|| hyper::upgrade::on(&mut req));
        let mut response = match self.router.upstreams.send_http1(req).await {
            Ok(response) => response,
            Err(e) => return bad_gateway(&upstream, &e),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(downstream) = downstream else {
                let e = anyhow::anyhow!("it switched protocols without being asked to");
                return bad_gateway(&upstream, &e);
            };
            join_upgraded(downstream, hyper::upgrade::on(&mut response), upstream);
        } else {
            strip_hop_by_hop(response.headers_mut(), false);
        }
        response.map(Either::Left)
    }

    pub async fn forward_http2(&self, mut req: Request<Incoming>) -> Response<Body> {
        let upstream = self.upstream_for(req.headers());
        if req.uri().authority().is_none() {
            // HTTP/2 requires :authority or a Host header from the client,
            // but the upstream connection needs the former.
            let Some(uri) = aimed_at(authority_of(upstream.addr), req.uri()) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("ktb mesh: cannot forward request target {}\n", req.uri()),
                );
            };
            *req.uri_mut() = uri;
        }
        match self.router.upstreams.send_http2(upstream.addr, req).await {
            Ok(response) => response.map(Either::Left),
            Err(e) => bad_gateway(&upstream, &e),
        }
    }
}

fn requested_upgrade(headers: &HeaderMap) -> Upgrade {
    let Some(protocols) = headers.get(header::UPGRADE) else {
        return Upgrade::None;
    };
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .any(|token| token.eq_ignore_ascii_case(b"upgrade"));
    if !connection_says_upgrade {
        return Upgrade::None;
    }
    if tokens(protocols).all(|protocol| protocol.eq_ignore_ascii_case(b"h2c")) {
        Upgrade::H2c
    } else {
        Upgrade::Other
    }
}

/// The comma-separated, space-trimmed, non-empty elements of a header value.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(|token| token.trim_ascii())
        .filter(|token| !token.is_empty())
}

/// Drops HTTP/1 hop-by-hop headers. With `keep_upgrade`, `Upgrade` stays and
/// `Connection` becomes just `upgrade`, which is all the next hop needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let accepts_trailers = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Empty (no allocation) unless the sender listed headers.
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for value in &listed {
        for token in tokens(value) {
            if keep_upgrade && token.eq_ignore_ascii_case(b"upgrade") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
        }
    }
    headers.remove(header::CONNECTION);
    for name in HOP_BY_HOP {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `uri`'s path and query, aimed at `authority` over plain HTTP; `None`
/// when they cannot form such a URI.
fn aimed_at(authority: Authority, uri: &Uri) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

fn authority_of(addr: SocketAddr) -> Authority {
    Authority::from_maybe_shared(Bytes::from(addr.to_string()))
        .expect("a socket address prints as a valid URI authority")
}

/// Once both sides have handed over their connections, carries bytes
/// between them until both directions end.
fn join_upgraded(downstream: OnUpgrade, upstream_side: OnUpgrade, upstream: Upstream) {
    tokio::spawn(async move {
        let handover = tokio::time::timeout(UPGRADE_HANDOVER_TIMEOUT, async {
            tokio::try_join!(downstream, upstream_side)
        });
        match handover.await {
            Ok(Ok((caller, callee))) => {
                let (mut caller, mut callee) = (TokioIo::new(caller), TokioIo::new(callee));
                if let Err(e) = super::splice(&mut caller, &mut callee).await {
                    tracing::debug!(upstream = upstream.name(), error = %e, "upgraded connection ended");
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = upstream.name(), error = %e, "upgrade failed")
            }
            Err(_) => tracing::debug!(
                upstream = upstream.name(),
                "upgrade not handed over within {UPGRADE_HANDOVER_TIMEOUT:?}"
            ),
        }
    });
}

fn bad_gateway(upstream: &Upstream, error: &anyhow::Error) -> Response<Body> {
    tracing::warn!(upstream = upstream.name(), addr = %upstream.addr, error = format!("{error:#}"), "cannot reach upstream");
    text(
        StatusCode::BAD_GATEWAY,
        format!(
            "ktb mesh: cannot reach {} at {}: {error:#}\n",
            upstream.name(),
            upstream.addr
        ),
    )
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
