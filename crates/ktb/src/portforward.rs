//! The tunnel's transport through the apiserver: a port-forward to the
//! agent pod's tunnel port, the only path a laptop is guaranteed to have.
//!
//! Each connect is one port-forward (one WebSocket to the apiserver); the
//! ktb tunnel then multiplexes every caller over it, so the ~3 ms a
//! port-forward costs to open is paid once per tunnel, not per request.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Portforwarder};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use crate::tunnel::Transport;

pub struct PortForward {
    pub pods: Api<Pod>,
    pub pod: String,
    pub port: u16,
}

impl Transport for PortForward {
    type Io = Forwarded;

    async fn connect(&self) -> io::Result<Forwarded> {
        let mut forwarder = self
            .pods
            .portforward(&self.pod, &[self.port])
            .await
            .map_err(|e| {
                io::Error::other(format!("port-forward to pod {} failed: {e}", self.pod))
            })?;
        let stream = forwarder
            .take_stream(self.port)
            .ok_or_else(|| io::Error::other("port-forward opened without its stream"))?;
        Ok(Forwarded { stream, forwarder })
    }

    fn describe(&self) -> String {
        format!("pod/{} port {} (port-forward)", self.pod, self.port)
    }

    fn authority(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

/// A port-forwarded byte stream; the forwarding task ends with it.
pub struct Forwarded {
    stream: DuplexStream,
    forwarder: Portforwarder,
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

impl AsyncRead for Forwarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Forwarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
