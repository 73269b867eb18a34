//! The tunnel's transport through the apiserver: a port-forward to the
//! agent pod's tunnel port, the only path a laptop is guaranteed to have.
//! `ktb forward` opens the same port-forwards to the pods it reaches.
//!
//! Each connect is one port-forward WebSocket to the apiserver; the ktb
//! tunnel multiplexes every caller over it, so the milliseconds a
//! port-forward costs to open are paid once per tunnel, not per request.
//! [`upgrade`] opens it, offering SPDY first; the chosen protocol's pump
//! ([`spdy`] or [`channel`]) then moves bytes between it and an in-memory
//! pipe whose other end is the returned stream.

mod channel;
mod spdy;
mod upgrade;

use std::io;

use kube::Client;
use tokio::io::DuplexStream;

use self::upgrade::Protocol;
use crate::tunnel::{LinkKind, Transport};

/// Bytes buffered between the tunnel and the port-forward, each way: one
/// message. The tunnel lets control frames and other streams' data pass a
/// bulk stream only in its own queue; what waits in this pipe waits in
/// order. With 1 MiB here, a request beside a bulk stream waited 3.3× a
/// 20 ms round trip at p99, with one message 2.9× (README, "A laptop 20
/// ms away").
const PIPE: usize = MESSAGE;
/// Largest message sent to the apiserver. Every message costs the
/// programs behind it: with 64 KiB, `cargo xtask bench exchange` measured
/// the apiserver, the kubelet and containerd 0.32 CPU s per GiB more and a
/// one-stream download at 230 MiB/s instead of 264, while the CLI spent
/// the same 1.22 s per GiB (2026-12-05).
const MESSAGE: usize = 256 * 1024;

#[derive(Clone)]
pub struct PortForward {
    pub client: Client,
    pub namespace: String,
    pub pod: String,
    pub port: u16,
}

impl Transport for PortForward {
    type Io = DuplexStream;

    async fn connect(&self) -> io::Result<DuplexStream> {
        let failed = |reason: String| {
            io::Error::other(format!("port-forward to pod {} failed: {reason}", self.pod))
        };
        let request =
            kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", self.namespace))
                .portforward(&self.pod, &[self.port])
                .map_err(|e| failed(e.to_string()))?;
        let (protocol, socket) = upgrade::open(&self.client, request).await.map_err(failed)?;
        tracing::debug!(pod = %self.pod, "port-forward open, speaking {protocol}");
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let pod = self.pod.clone();
        match protocol {
            Protocol::Spdy => tokio::spawn(spdy::pump(socket, theirs, self.port, pod)),
            Protocol::Channel => tokio::spawn(channel::pump(socket, theirs, pod)),
        };
        Ok(ours)
    }

    fn describe(&self) -> String {
        format!("pod/{} port {} (port-forward)", self.pod, self.port)
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }

    fn link(&self) -> LinkKind {
        LinkKind::Records
    }
}

/// A WebSocket over loopback TCP standing in for the apiserver, for the
/// pumps' tests.
#[cfg(test)]
mod loopback {
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::WebSocketStream;

    /// The client's end and the server's end of one WebSocket.
    pub async fn websocket() -> (WebSocketStream<TcpStream>, WebSocketStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_tungstenite::accept_async(tcp).await.unwrap()
        };
        let client = async {
            let tcp = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            tokio_tungstenite::client_async(url, tcp).await.unwrap().0
        };
        tokio::join!(client, server)
    }
}
