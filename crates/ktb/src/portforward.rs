//! The tunnel's transport through the apiserver: a port-forward to the
//! agent pod's tunnel port, the only path a laptop is guaranteed to have.
//!
//! Each connect is one port-forward WebSocket to the apiserver; the ktb
//! tunnel multiplexes every caller over it, so the milliseconds a
//! port-forward costs to open are paid once per tunnel, not per request.
//! The port-forward channel protocol (`v4.channel.k8s.io`: one channel byte
//! in front of each message; each channel's first message is its port) is
//! spoken here rather than through kube's `Portforwarder`, whose loop
//! sends 4 KiB messages flushed one at a time: reading up to 256 KiB per
//! message more than doubled tunnel throughput on the test cluster.

use std::io;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::Message;

use crate::tunnel::{LinkKind, Transport};

/// Bytes buffered between the tunnel and the port-forward, each way.
const PIPE: usize = 1 << 20;
/// Largest message sent to the apiserver.
const MESSAGE: usize = 256 * 1024;
/// Channel 0 carries the port's data; channel 1 its error text.
const DATA: u8 = 0;
const ERROR: u8 = 1;

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
        let connection = self.client.connect(request).await.map_err(|e| {
            failed(match &e {
                kube::Error::Api(status) => status.message.clone(),
                other => other.to_string(),
            })
        })?;
        let (ours, theirs) = tokio::io::duplex(PIPE);
        tokio::spawn(pump(connection.into_stream(), theirs, self.pod.clone()));
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

/// Moves bytes between the pipe and the port-forward until either side
/// ends; then both are dropped, which the tunnel sees as a lost connection.
async fn pump<S>(ws: tokio_tungstenite::WebSocketStream<S>, pipe: DuplexStream, pod: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut from_tunnel, mut to_tunnel) = tokio::io::split(pipe);
    let to_pod = async {
        loop {
            let mut message = BytesMut::with_capacity(1 + MESSAGE);
            message.put_u8(DATA);
            match from_tunnel.read_buf(&mut message).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if sink.send(Message::Binary(message.freeze())).await.is_err() {
                return;
            }
        }
    };
    let from_pod = async {
        let mut initialised = [false; 2];
        while let Some(Ok(message)) = stream.next().await {
            let Message::Binary(mut bytes) = message else {
                if message.is_close() {
                    return;
                }
                continue;
            };
            if bytes.is_empty() {
                continue;
            }
            let channel = bytes.split_to(1)[0];
            match channel {
                // The first message of each channel names its port.
                DATA | ERROR if !initialised[usize::from(channel)] => {
                    initialised[usize::from(channel)] = true
                }
                DATA if to_tunnel.write_all(&bytes).await.is_err() => return,
                DATA => {}
                ERROR => {
                    tracing::warn!(%pod, error = %String::from_utf8_lossy(&bytes), "port-forward error");
                    return;
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = to_pod => {}
        _ = from_pod => {}
    }
}
