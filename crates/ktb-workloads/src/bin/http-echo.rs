//! HTTP echo (`ktb.test/http-echo:dev`, port 8080): answers every request
//! with `200 OK` and the name of the pod that served it as the body (one
//! line) and in the `x-ktb-pod` header, so tests can see which pod a
//! Service, port-forward or tunnel reached. HTTP/1.1 keep-alive with
//! `Content-Length` request bodies; chunked request bodies are refused.

use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Request heads larger than this are refused: a test workload, not a server.
const MAX_HEAD: usize = 64 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let pod: Arc<str> = ktb_workloads::pod_name().into();
    let listener = TcpListener::bind(ktb_workloads::listen_addr(8080)).await?;
    eprintln!("http-echo on {} in pod {pod}", listener.local_addr()?);
    let serve = async {
        loop {
            let (conn, _) = listener.accept().await?;
            let pod = pod.clone();
            tokio::spawn(async move {
                // Errors only mean the peer went away or spoke nonsense.
                let _ = serve_connection(conn, &pod).await;
            });
        }
    };
    tokio::select! {
        r = serve => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}

async fn serve_connection(conn: TcpStream, pod: &str) -> std::io::Result<()> {
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
        let body = format!("{pod}\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-ktb-pod: {pod}\r\nconnection: {}\r\n\r\n",
            body.len(),
            if close { "close" } else { "keep-alive" },
        );
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(body.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}
