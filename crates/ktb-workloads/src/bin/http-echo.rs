//! HTTP echo (`ktb.test/http-echo:dev`, port 8080): answers every request
//! with `200 OK` and the name of the pod that served it as the body (one
//! line) and in the `x-ktb-pod` header, so tests can see which pod a
//! Service, port-forward or tunnel reached. HTTP/1.1 keep-alive with
//! `Content-Length` request bodies; chunked request bodies are refused.
//!
//! With `KTB_ECHO_CALL=http://HOST[:PORT]/PATH` set, it is one hop of a
//! chain: every request first GETs that URL (the system resolver, HTTP/1.1,
//! bounded by a timeout) and the answer is this pod's line followed by the
//! callee's body, so a test sees every process a call went through, in
//! order. A failed hop answers 502 (or 504 on timeout) with this pod's line
//! and the reason.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Request heads larger than this are refused: a test workload, not a server.
const MAX_HEAD: usize = 64 * 1024;
/// The environment variable naming the URL to call first.
const CALL_ENV: &str = "KTB_ECHO_CALL";
/// The longest the call to `KTB_ECHO_CALL` may take, connection included;
/// below the 3 s the test clients wait for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let pod: Arc<str> = ktb_workloads::pod_name().into();
    let next_hop = next_hop().map_err(std::io::Error::other)?.map(Arc::new);
    let listener = TcpListener::bind(ktb_workloads::listen_addr(8080)).await?;
    match &next_hop {
        Some(url) => eprintln!(
            "http-echo on {} in pod {pod}, calling {url} first",
            listener.local_addr()?
        ),
        None => eprintln!("http-echo on {} in pod {pod}", listener.local_addr()?),
    }
    let serve = async {
        loop {
            let (conn, _) = listener.accept().await?;
            // Answers are small and come in one write; without this a
            // keep-alive client waits out its delayed ACK on every request.
            let _ = conn.set_nodelay(true);
            let pod = pod.clone();
            let next_hop = next_hop.clone();
            tokio::spawn(async move {
                // Errors only mean the peer went away or spoke nonsense.
                let _ = serve_connection(conn, &pod, next_hop.as_deref()).await;
            });
        }
    };
    tokio::select! {
        r = serve => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}

/// `KTB_ECHO_CALL`, checked: an `http://` URL with a host; None when unset.
fn next_hop() -> Result<Option<Uri>, String> {
    let Ok(url) = std::env::var(CALL_ENV) else {
        return Ok(None);
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{CALL_ENV}={url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "{CALL_ENV}={url:?}: only http://HOST[:PORT]/PATH is supported"
        ));
    }
    Ok(Some(uri))
}

async fn serve_connection(
    conn: TcpStream,
    pod: &str,
    next_hop: Option<&Uri>,
) -> std::io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut request_line = String::new();
        if rd.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut size = request_line.len();
        let http10 = request_line.trim_end().ends_with("HTTP/1.0");
        let mut content_length = 0u64;
        let mut close = http10;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            let n = rd.read_line(&mut line).await?;
            size += n;
            if n == 0 || size > MAX_HEAD {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = !value.eq_ignore_ascii_case("identity"),
                "connection" if value.eq_ignore_ascii_case("close") => close = true,
                "connection" if value.eq_ignore_ascii_case("keep-alive") => close = false,
                _ => {}
            }
        }
        if chunked {
            let msg = "chunked request bodies are not supported\n";
            let head = format!(
                "HTTP/1.1 411 Length Required\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                msg.len()
            );
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(msg.as_bytes()).await?;
            return Ok(());
        }
        tokio::io::copy(&mut (&mut rd).take(content_length), &mut tokio::io::sink()).await?;
        let (status, body) = answer(pod, next_hop).await;
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-ktb-pod: {pod}\r\nconnection: {}\r\n\r\n",
            body.len(),
            if close { "close" } else { "keep-alive" },
        );
        wr.write_all(format!("{head}{body}").as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// The status line's code and reason and the body: this pod's line, then
/// what the next hop answered when there is one.
async fn answer(pod: &str, next_hop: Option<&Uri>) -> (&'static str, String) {
    let Some(url) = next_hop else {
        return ("200 OK", format!("{pod}\n"));
    };
    match tokio::time::timeout(CALL_TIMEOUT, get(url)).await {
        Ok(Ok(body)) => (
            "200 OK",
            format!("{pod}\n{}", String::from_utf8_lossy(&body)),
        ),
        Ok(Err(e)) => ("502 Bad Gateway", format!("{pod}\ncalling {url}: {e}\n")),
        Err(_) => (
            "504 Gateway Timeout",
            format!("{pod}\ncalling {url}: no answer within {CALL_TIMEOUT:?}\n"),
        ),
    }
}

/// One GET of `url` on a connection of its own; the body of a 2xx answer.
async fn get(url: &Uri) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    let host = url.host().ok_or("no host")?;
    // An IPv6 literal comes bracketed out of the URL; the resolver wants it bare.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let conn = TcpStream::connect((bare_host, url.port_u16().unwrap_or(80))).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    // Ends once the answer is read and `sender` is dropped.
    tokio::spawn(connection);
    let request = http::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            url.authority().map_or(host, |a| a.as_str()),
        )
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()).into());
    }
    Ok(body)
}
