//! Loopback tests of the router: tiny upstreams that answer with their own
//! name, the router between them and a client, every wait bounded.
//!
//! Members listen on 127.0.0.2 and 127.0.0.3 at one port (the member port
//! is shared, as in the cluster); the origin on 127.0.0.1.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Bound on every step of a test.
const STEP: Duration = Duration::from_secs(10);

const DEV_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const DEV_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Nothing listens here.
const DEV_C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

fn member(mark: &str, upstream: IpAddr) -> Member {
    let mark = Mark::parse(mark).unwrap();
    Member {
        name: format!("{} on vm (session 1a2b3c4d)", mark.value),
        mark,
        upstream,
    }
}

fn dev_a_and_b() -> Vec<Member> {
    vec![
        member("x-ktb-mark=dev-a", DEV_A),
        member("x-ktb-mark=dev-b", DEV_B),
    ]
}

/// A response body of one data frame and, when asked, trailers naming the
/// server: what a gRPC server sends.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.data.take() {
            Some(data) => Some(Frame::data(data)),
            None => self.trailers.take().map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }
}

/// Answers `NAME METHOD TARGET host=HOST body=BODY headers=NAMES`, with
/// trailers when the request says `te: trailers`; an upgrade request gets
/// a 101, then `NAME:` and an echo of whatever the caller sends.
async fn identity(name: &'static str, mut req: Request<Incoming>) -> Response<WithTrailers> {
    if req.headers().contains_key(header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(within("server upgrade", upgrade).await.unwrap());
            io.write_all(format!("{name}:").as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            loop {
                let n = within("upgraded read", io.read(&mut buf)).await.unwrap();
                if n == 0 {
                    break;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut response = Response::new(WithTrailers {
            data: None,
            trailers: None,
        });
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return response;
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            let host = req.headers().get(header::HOST)?;
            Some(host.to_str().ok()?.to_owned())
        })
        .unwrap_or_default();
    let mut names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    let head = format!(
        "{name} {} {} host={host} headers={}",
        req.method(),
        req.uri().path_and_query().map_or("", |pq| pq.as_str()),
        names.join(",")
    );
    let wants_trailers = req
        .headers()
        .get(header::TE)
        .is_some_and(|te| te == "trailers");
    let body = within("request body", req.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let text = format!("{head} body={}", String::from_utf8_lossy(&body));
    let trailers = wants_trailers.then(|| {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-served-by", HeaderValue::from_static(name));
        trailers
    });
    Response::new(WithTrailers {
        data: Some(Bytes::from(text)),
        trailers,
    })
}

/// Serves [`identity`] on every connection, in HTTP/2 (prior knowledge)
/// or HTTP/1.1 with upgrades.
fn spawn_identity(listener: TcpListener, name: &'static str, http2: bool) {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let service =
                service_fn(
                    move |req| async move { Ok::<_, Infallible>(identity(name, req).await) },
                );
            let io = TokioIo::new(tcp);
            tokio::spawn(async move {
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
}

/// Listeners on DEV_A and DEV_B at one port, and that port.
async fn member_listeners() -> (TcpListener, TcpListener, u16) {
    for _ in 0..20 {
        let a = TcpListener::bind((DEV_A, 0)).await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = TcpListener::bind((DEV_B, port)).await {
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Origin, dev-a and dev-b identity upstreams and a router in front of
/// them (with dev-a and dev-b as members); returns the router's address.
async fn identity_mesh(http2: bool) -> (SocketAddr, Arc<Router>) {
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    spawn_identity(origin, "origin", http2);
    let (a, b, member_port) = member_listeners().await;
    spawn_identity(a, "dev-a", http2);
    spawn_identity(b, "dev-b", http2);
    let router = Router::new();
    router.set_members(dev_a_and_b());
    let addr = start_router(&router, origin_addr, member_port).await;
    (addr, router)
}

async fn start_router(router: &Arc<Router>, origin: SocketAddr, member_port: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let route = PortRoute {
        origin,
        member_port,
    };
    tokio::spawn(serve_port(listener, Arc::clone(router), route));
    addr
}

/// The header names an [`identity`] upstream says it received.
fn received_headers(body: &str) -> Vec<&str> {
    let after = body.split_once(" headers=").map_or("", |(_, after)| after);
    after
        .split(' ')
        .next()
        .unwrap_or_default()
        .split(',')
        .collect()
}

type Http1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One HTTP/1.1 keep-alive connection to the router.
async fn http1_connection(router: SocketAddr) -> Http1Sender {
    let tcp = within("connect", TcpStream::connect(router)).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    sender
}

fn request(target: &str, mark: Option<(&str, &str)>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(target).header(header::HOST, "svc.test");
    if let Some((name, value)) = mark {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send_http1(sender: &mut Http1Sender, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    within("connection ready", sender.ready()).await.unwrap();
    let response = within("response", sender.send_request(req)).await.unwrap();
    let status = response.status();
    let body = within("response body", response.into_body().collect())
        .await
        .unwrap();
    (status, String::from_utf8(body.to_bytes().to_vec()).unwrap())
}

#[tokio::test]
async fn http1_keep_alive_connection_routes_every_request_on_its_own() {
    let (router, _) = identity_mesh(false).await;
    let mut connection = http1_connection(router).await;
    let cases = [
        (Some(("x-ktb-mark", "dev-a")), "dev-a"),
        (Some(("x-ktb-mark", "dev-b")), "dev-b"),
        (None, "origin"),
        (Some(("X-KTB-Mark", "dev-a")), "dev-a"),
        (
            Some(("baggage", "a=1,x-ktb-mark=dev-b;prop=1, b=2")),
            "dev-b",
        ),
        (Some(("x-ktb-mark", "dev-z")), "origin"),
    ];
    for (mark, expected) in cases {
        let (status, body) = send_http1(&mut connection, request("/path?q=1", mark, "hello")).await;
        assert_eq!(status, StatusCode::OK);
        let expected = format!("{expected} POST /path?q=1 host=svc.test ");
        assert!(body.starts_with(&expected), "{mark:?}: {body:?}");
        assert!(body.ends_with(" body=hello"), "{body:?}");
    }
}

#[tokio::test]
async fn http1_hop_by_hop_headers_are_dropped_and_h2c_upgrade_is_ignored() {
    let (router, _) = identity_mesh(false).await;
    let mut connection = http1_connection(router).await;
    let mut req = request("/", Some(("x-ktb-mark", "dev-a")), "");
    let headers = req.headers_mut();
    for (name, value) in [
        ("connection", "x-private, keep-alive"),
        ("x-private", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("x-end-to-end", "1"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    let (status, body) = send_http1(&mut connection, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("dev-a "), "{body:?}");
    let received = received_headers(&body);
    assert!(received.contains(&"x-end-to-end"), "{body:?}");
    for dropped in ["x-private", "keep-alive", "proxy-connection", "connection"] {
        assert!(
            !received.contains(&dropped),
            "{dropped} reached the upstream: {body:?}"
        );
    }

    let mut req = request("/h2c", None, "");
    let headers = req.headers_mut();
    headers.insert(
        "connection",
        HeaderValue::from_static("Upgrade, HTTP2-Settings"),
    );
    headers.insert("upgrade", HeaderValue::from_static("h2c"));
    headers.insert(
        "http2-settings",
        HeaderValue::from_static("AAMAAABkAAQCAAAAAAIAAAAA"),
    );
    let (status, body) = send_http1(&mut connection, req).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(body.starts_with("origin POST /h2c "), "{body:?}");
    let received = received_headers(&body);
    assert!(
        !received.contains(&"upgrade") && !received.contains(&"http2-settings"),
        "{body:?}"
    );
    // Still HTTP/1.1 on the same connection, still routed per request.
    let (_, body) = send_http1(
        &mut connection,
        request("/", Some(("x-ktb-mark", "dev-b")), ""),
    )
    .await;
    assert!(body.starts_with("dev-b "), "{body:?}");
}

#[tokio::test]
async fn h2c_prior_knowledge_routes_every_stream_and_keeps_trailers() {
    let (router, _) = identity_mesh(true).await;
    let tcp = within("connect", TcpStream::connect(router)).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let cases = [
        (Some("dev-a"), "dev-a"),
        (Some("dev-b"), "dev-b"),
        (None, "origin"),
        (Some("dev-b"), "dev-b"),
        (Some("dev-a"), "dev-a"),
    ];
    let streams = cases.map(|(mark, expected)| {
        let mut sender = sender.clone();
        async move {
            let mut builder = Request::post("http://svc.test/pkg.Service/Call?x=1")
                .header(header::TE, "trailers");
            if let Some(mark) = mark {
                builder = builder.header("x-ktb-mark", mark);
            }
            let req = builder
                .body(Full::new(Bytes::from_static(b"grpc")))
                .unwrap();
            let response = within("h2 response", sender.send_request(req))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let collected = within("h2 body", response.into_body().collect())
                .await
                .unwrap();
            let trailers = collected
                .trailers()
                .cloned()
                .expect("trailers passed through");
            assert_eq!(trailers["x-served-by"], expected);
            let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
            let head = format!("{expected} POST /pkg.Service/Call?x=1 host=svc.test ");
            assert!(body.starts_with(&head), "{mark:?}: {body:?}");
            assert!(
                received_headers(&body).contains(&"te"),
                "te: trailers lost: {body:?}"
            );
            assert!(body.ends_with(" body=grpc"), "{body:?}");
        }
    });
    within("all streams", futures_join(streams)).await;
}

/// Runs the futures concurrently on one task.
async fn futures_join<F: std::future::Future<Output = ()>>(futures: [F; 5]) {
    let [a, b, c, d, e] = futures;
    tokio::join!(a, b, c, d, e);
}

#[tokio::test]
async fn set_members_applies_to_the_next_request_on_an_open_connection() {
    let (router_addr, router) = identity_mesh(false).await;
    router.set_members(Vec::new());
    assert_eq!(router.member_count(), 0);
    let mut connection = http1_connection(router_addr).await;
    let marked = || request("/", Some(("x-ktb-mark", "dev-a")), "");
    let (_, body) = send_http1(&mut connection, marked()).await;
    assert!(body.starts_with("origin "), "{body:?}");
    router.set_members(dev_a_and_b());
    assert_eq!(router.member_count(), 2);
    let (_, body) = send_http1(&mut connection, marked()).await;
    assert!(body.starts_with("dev-a "), "{body:?}");
    router.set_members(vec![member("x-ktb-mark=dev-a", DEV_B)]);
    let (_, body) = send_http1(&mut connection, marked()).await;
    assert!(body.starts_with("dev-b "), "{body:?}");
}

#[tokio::test]
async fn websocket_style_upgrade_is_bridged_to_the_chosen_member() {
    let (router, _) = identity_mesh(false).await;
    let mut connection = http1_connection(router).await;
    let mut req = request("/ws", Some(("x-ktb-mark", "dev-b")), "");
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    req.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    within("ready", connection.ready()).await.unwrap();
    let response = within("101", connection.send_request(req)).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = within("client upgrade", hyper::upgrade::on(response))
        .await
        .unwrap();
    let mut io = TokioIo::new(upgraded);
    within("write", io.write_all(b"ping")).await.unwrap();
    let mut echoed = [0u8; 10];
    within("read", io.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(&echoed, b"dev-b:ping");
}

#[tokio::test]
async fn unreachable_upstream_gets_502_naming_it() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let router = Router::new();
    router.set_members(vec![member("x-ktb-mark=dev-c", DEV_C)]);
    let addr = start_router(&router, closed_addr, closed_addr.port()).await;
    let mut connection = http1_connection(addr).await;
    let (status, body) = send_http1(
        &mut connection,
        request("/", Some(("x-ktb-mark", "dev-c")), ""),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("dev-c on vm (session 1a2b3c4d)"), "{body:?}");
    assert!(body.contains("127.0.0.4"), "{body:?}");
    let (status, body) = send_http1(&mut connection, request("/", None, "")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("the original pods"), "{body:?}");
}

/// An origin that greets first when `banner` is given, then echoes until
/// the caller stops writing, then closes its side.
async fn spawn_echo_origin(banner: Option<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        if let Some(banner) = banner {
            tcp.write_all(banner).await.unwrap();
        }
        let (mut reader, mut writer) = tcp.split();
        within("echo", tokio::io::copy(&mut reader, &mut writer))
            .await
            .unwrap();
        writer.shutdown().await.unwrap();
    });
    addr
}

#[tokio::test]
async fn non_http_bytes_reach_the_origin_unchanged_with_half_close() {
    let origin = spawn_echo_origin(None).await;
    let router = start_router(&Router::new(), origin, 1).await;
    let mut tcp = within("connect", TcpStream::connect(router)).await.unwrap();
    let sent: Vec<u8> = b"\x00\x01\x02 not HTTP\r\n"
        .iter()
        .copied()
        .chain(0..=255)
        .collect();
    within("write", tcp.write_all(&sent)).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("echo to end", tcp.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, sent);
}

#[tokio::test]
async fn server_speaks_first_protocol_reaches_the_origin() {
    let origin = spawn_echo_origin(Some(b"220 origin ready\r\n")).await;
    let router = start_router(&Router::new(), origin, 1).await;
    let mut tcp = within("connect", TcpStream::connect(router)).await.unwrap();
    let mut banner = [0u8; 18];
    within("banner", tcp.read_exact(&mut banner)).await.unwrap();
    assert_eq!(&banner, b"220 origin ready\r\n");
    within("write", tcp.write_all(b"QUIT\r\n")).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within("echo to end", tcp.read_to_end(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, b"QUIT\r\n");
}
