//! The port-forward spoken as the channel protocol (`v4.channel.k8s.io`):
//! one channel byte in front of each WebSocket message, each channel's
//! first message naming its port. The apiserver falls back to it when it
//! cannot tunnel SPDY (before Kubernetes 1.30, or with the
//! `PortForwardWebsockets` feature off).
//!
//! It is spoken here rather than through kube's `Portforwarder`, whose loop
//! sends 4 KiB messages flushed one at a time: reading up to [`MESSAGE`]
//! bytes per message more than doubled tunnel throughput on the test
//! cluster.

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::Message;

use super::MESSAGE;

/// Channel 0 carries the port's data; channel 1 its error text.
const DATA: u8 = 0;
const ERROR: u8 = 1;

/// Moves bytes between the pipe and the port-forward until either side
/// ends; then both are dropped, which the tunnel sees as a lost connection.
pub(super) async fn pump<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    pipe: DuplexStream,
    pod: String,
) where
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_an_error_ends_the_pipe() {
        let (client, mut server) = super::super::loopback::websocket().await;
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(pump(client, theirs, "web-0".into()));
        // Each channel's first message names the port (8080), not data.
        for channel in [DATA, ERROR] {
            let prefix = vec![channel, 0x90, 0x1f];
            server.send(Message::Binary(prefix.into())).await.unwrap();
        }
        ours.write_all(b"hello").await.unwrap();
        let Some(Ok(Message::Binary(sent))) = server.next().await else {
            panic!("the pump sent nothing");
        };
        assert_eq!(sent.as_ref(), b"\x00hello");
        server
            .send(Message::Binary(b"\x00world".to_vec().into()))
            .await
            .unwrap();
        let mut back = [0; 5];
        ours.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"world");

        server
            .send(Message::Binary(b"\x01connection refused".to_vec().into()))
            .await
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), ours.read(&mut back)).await;
        assert!(
            matches!(end, Ok(Ok(0))),
            "the pipe did not end after an error: {end:?}"
        );
    }
}
