//! Local servers that stand in for the developer's process.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// A running server; aborted when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes every connection, honouring half-close: after the peer's FIN the
/// echo finishes and then sends its own FIN.
pub async fn echo() -> Server {
    serve_tcp(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

/// Reads until the peer's FIN, then answers `received N bytes` and closes:
/// only a correct half-close lets the answer arrive.
pub async fn count_then_reply() -> Server {
    serve_tcp(|mut tcp| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(_) => return,
            }
        }
        let _ = tcp
            .write_all(format!("received {total} bytes").as_bytes())
            .await;
        let _ = tcp.shutdown().await;
    })
    .await
}

async fn serve_tcp<F, Fut>(handle: F) -> Server
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A deep accept queue, as a real server would have: with tokio's
    // default of 128 a burst of callers overflows it and gets reset.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(([127, 0, 0, 1], 0).into())
        .expect("bind local server");
    let listener = socket.listen(4096).expect("listen");
    let addr = listener.local_addr().expect("local server address");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(handle(tcp));
        }
    });
    Server { addr, task }
}

/// Echoes every datagram back to its sender.
pub async fn udp_echo() -> Server {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP echo");
    let addr = socket.local_addr().expect("UDP echo address");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Server { addr, task }
}

/// A loopback port with nothing listening on it (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}
