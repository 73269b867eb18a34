//! TCP test servers (`ktb.test/tcp-echo:dev`):
//! - port 9000 (or `PORT`), echo: every byte received on a connection is
//!   sent back on it, until the peer closes its side;
//! - port 9001, digest: reads until the peer half-closes, then answers
//!   `LEN SHA256HEX` of what it received and closes;
//! - port 9002, speaks first: sends the first [`GREETING_LEN`] bytes of the
//!   pattern, half-closes, reads until the peer half-closes too, and logs
//!   `speaks-first received LEN SHA256HEX` (it can no longer answer).

use ktb_workloads::half_close::{self, GREETING_LEN};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let echo = TcpListener::bind(ktb_workloads::listen_addr(9000)).await?;
    let digest = TcpListener::bind(("::", 9001)).await?;
    let speaks_first = TcpListener::bind(("::", 9002)).await?;
    eprintln!(
        "tcp-echo on {} (digest on 9001, speaks-first on 9002) in pod {}",
        echo.local_addr()?,
        ktb_workloads::pod_name()
    );
    // Errors in a connection only mean the peer went away; the client
    // reports what it expected and did not get.
    let serve = async {
        tokio::try_join!(
            serve(echo, |mut conn| async move {
                let (mut rd, mut wr) = conn.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            }),
            serve(digest, |mut conn| async move {
                if let Ok((len, hasher)) = hash_to_end(&mut conn).await {
                    let answer = format!("{}\n", half_close::summary(len, hasher));
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                }
            }),
            serve(speaks_first, |mut conn| async move {
                let _ = greet_then_listen(&mut conn).await;
            }),
        )
        .map(drop)
    };
    tokio::select! {
        r = serve => r,
        _ = ktb_workloads::shutdown_signal() => Ok(()),
    }
}

async fn serve<F, Fut>(listener: TcpListener, handle: F) -> std::io::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (conn, _) = listener.accept().await?;
        tokio::spawn(handle(conn));
    }
}

async fn hash_to_end(reader: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u64, Sha256)> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((len, hasher));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

async fn greet_then_listen(conn: &mut TcpStream) -> std::io::Result<()> {
    for chunk in half_close::chunks(GREETING_LEN) {
        conn.write_all(&chunk).await?;
    }
    conn.shutdown().await?;
    let (len, hasher) = hash_to_end(conn).await?;
    eprintln!("speaks-first received {}", half_close::summary(len, hasher));
    Ok(())
}
