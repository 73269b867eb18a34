//! What a connection may cost the agent before it has proved who it is.
//!
//! Anyone who reaches an endpoint can connect: with the tunnel on the pod
//! network, anyone in the cluster; bound to 127.0.0.1, anyone allowed to
//! port-forward to the pod. Until the client's proof verifies, a connection
//! gets little, so that no number of them can exhaust the agent's memory
//! or keep it busy:
//!
//! - at most [`MAX_CONNECTIONS`] TCP connections per endpoint, tunnels
//!   included; one more is closed as soon as it is accepted;
//! - at most [`MAX_HANDSHAKES`] of them not yet authenticated; one more is
//!   closed as soon as it is accepted too, rather than queued, so a flood
//!   costs an accept and a close;
//! - the whole handshake — HTTP request, WebSocket upgrade, `Hello`, proof —
//!   must be over by a deadline set when the connection is accepted;
//! - hyper buffers at most [`HTTP_BUFFER`] of request, and after the
//!   upgrade the agent reads at most [`HANDSHAKE_READ_LIMIT`] bytes until
//!   the proof verifies (`Hello` and `Proof` take ~160 with their WebSocket
//!   framing); a client that sends more is dropped.
//!
//! A pending handshake therefore holds at most the WebSocket's read buffer
//! (128 KiB, allocated up front by tungstenite) plus a few KiB, and all of
//! them together about [`MAX_HANDSHAKES`] × 144 KiB ≈ 2.3 MiB.
//!
//! Availability against someone who keeps re-opening connections is not a
//! goal: whoever may port-forward to the pod may also delete it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// TCP connections open at once on one endpoint.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections on one endpoint that have not proved their key yet.
pub const MAX_HANDSHAKES: usize = 16;
/// Bytes of WebSocket messages read from a client before its proof verifies.
pub const HANDSHAKE_READ_LIMIT: usize = 4 * 1024;
/// hyper's read buffer for the HTTP request (its minimum is 8 KiB).
pub const HTTP_BUFFER: usize = 16 * 1024;

/// The admission limits of one endpoint.
pub struct Gate {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    handshake_timeout: Duration,
}

impl Gate {
    pub fn new(handshake_timeout: Duration) -> Self {
        Gate {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            handshake_timeout,
        }
    }

    /// Admits a connection just accepted, or says to close it at once.
    pub fn admit(&self) -> Option<Admission> {
        let connection = Arc::clone(&self.connections).try_acquire_owned().ok()?;
        let handshake = Arc::clone(&self.handshakes).try_acquire_owned().ok()?;
        Some(Admission {
            _connection: connection,
            handshake: Mutex::new(Some(handshake)),
            deadline: Instant::now() + self.handshake_timeout,
        })
    }
}

/// One admitted connection's places in its endpoint's limits; dropping it
/// gives them back.
pub struct Admission {
    _connection: OwnedSemaphorePermit,
    /// `Some` until the client is authenticated.
    handshake: Mutex<Option<OwnedSemaphorePermit>>,
    /// When the handshake must be over.
    pub deadline: Instant,
}

impl Admission {
    /// The client proved its key: it no longer counts as a handshake.
    pub fn authenticated(&self) {
        self.handshake.lock().expect("admission lock").take();
    }
}

/// A connection whose reads are capped in total until [`lift`](Self::lift).
pub struct ReadLimit<S> {
    io: S,
    /// The cap, for the error that reports it.
    limit: usize,
    /// Bytes that may still be read; `None` once lifted.
    remaining: Option<usize>,
}

impl<S> ReadLimit<S> {
    pub fn new(io: S, limit: usize) -> Self {
        ReadLimit {
            io,
            limit,
            remaining: Some(limit),
        }
    }

    /// The client is authenticated: reads are limited by the WebSocket
    /// configuration and flow control from now on.
    pub fn lift(&mut self) {
        self.remaining = None;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(remaining) = &mut this.remaining {
            let read = buf.filled().len() - before;
            *remaining = remaining.checked_sub(read).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the client sent more than {} bytes before authenticating",
                        this.limit
                    ),
                )
            })?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn admissions_stop_at_the_handshake_limit_and_come_back() {
        let gate = Gate::new(Duration::from_secs(5));
        let mut admitted: Vec<_> = (0..MAX_HANDSHAKES).map(|_| gate.admit().unwrap()).collect();
        assert!(gate.admit().is_none(), "one handshake too many");
        admitted[0].authenticated();
        let more = gate
            .admit()
            .expect("an authenticated client frees its handshake place");
        assert!(gate.admit().is_none());
        drop(more);
        admitted.pop();
        assert!(gate.admit().is_some());
    }

    #[test]
    fn authenticated_connections_still_count_against_the_connection_limit() {
        let gate = Gate::new(Duration::from_secs(5));
        let tunnels: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let admission = gate.admit().unwrap();
                admission.authenticated();
                admission
            })
            .collect();
        assert!(gate.admit().is_none());
        drop(tunnels);
        assert!(gate.admit().is_some());
    }

    #[tokio::test]
    async fn reads_beyond_the_limit_fail_until_lifted() {
        let (mut client, agent) = tokio::io::duplex(64 * 1024);
        let mut limited = ReadLimit::new(agent, 10);
        client.write_all(&[1; 8]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(limited.read(&mut buf).await.unwrap(), 8);
        client.write_all(&[2; 8]).await.unwrap();
        let err = limited.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let (mut client, agent) = tokio::io::duplex(64 * 1024);
        let mut limited = ReadLimit::new(agent, 10);
        limited.lift();
        client.write_all(&[3; 1000]).await.unwrap();
        assert_eq!(limited.read(&mut [0u8; 2000]).await.unwrap(), 1000);
    }
}
