//! One multiplexed stream and its flow control.
//!
//! A stream is bridged to a local byte stream (a TCP socket, or later a
//! userspace TCP connection) by two halves running together: *upstream*
//! reads local bytes and sends them once the peer has granted credit;
//! *downstream* writes the peer's bytes locally and returns credit as they
//! are written. Credit is a semaphore of bytes, so a sender that outruns its
//! receiver simply waits, and the receiver never holds more than one window
//! per stream. Half-close travels as `Fin`; any failure as `Reset`, which the
//! bridge's owner turns into a TCP reset so callers see what a real network
//! would show them.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::codec::{data_frame_buffer, finish_data_frame, Frame, StreamId};
use crate::session::{frame, Inner};

/// What the reader task hands a stream.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    Fin,
    Reset(String),
}

/// The session's side of a stream: where the reader task delivers frames.
pub(crate) struct StreamSlot {
    inbound: mpsc::UnboundedSender<Inbound>,
    credit: Arc<Semaphore>,
    in_flight: Arc<AtomicU32>,
    opened: Option<oneshot::Sender<Result<(), String>>>,
}

impl StreamSlot {
    /// Queues data unless the peer overran the window it was granted.
    pub(crate) fn deliver_data(&self, payload: Bytes, window: u32) -> Result<(), String> {
        let len = payload.len() as u32;
        let in_flight = self
            .in_flight
            .fetch_add(len, Ordering::AcqRel)
            .saturating_add(len);
        if in_flight > window {
            return Err(format!(
                "the peer sent {in_flight} bytes on a stream with a window of {window}"
            ));
        }
        self.deliver(Inbound::Data(payload));
        Ok(())
    }

    pub(crate) fn deliver(&self, inbound: Inbound) {
        // The stream may be gone already; its bytes have nowhere to go.
        let _ = self.inbound.send(inbound);
    }

    /// Adds credit, refusing grants that exceed what was ever sent.
    pub(crate) fn grant(&mut self, bytes: u32, window: u32) -> Result<(), String> {
        if self
            .credit
            .available_permits()
            .saturating_add(bytes as usize)
            > window as usize
        {
            return Err(format!(
                "the peer granted {bytes} bytes of credit beyond the window of {window}"
            ));
        }
        self.credit.add_permits(bytes as usize);
        Ok(())
    }

    pub(crate) fn confirm_open(&mut self) {
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Ok(()));
        }
    }

    /// Kills the stream: wakes both halves of its bridge with `reason`.
    pub(crate) fn fail(mut self, reason: &str) {
        self.deliver(Inbound::Reset(reason.to_owned()));
        self.credit.close();
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Err(reason.to_owned()));
        }
    }
}

/// How a bridged stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The local socket failed; the peer has been sent a reset.
    #[error("local connection failed: {0}")]
    Local(#[source] io::Error),
    /// The peer reset the stream or the tunnel ended.
    #[error("{0}")]
    Peer(String),
}

/// One stream of a [`crate::Session`]. Dropping it without finishing a
/// bridge resets it on the peer.
#[derive(Debug)]
pub struct Stream {
    id: StreamId,
    inner: Arc<Inner>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    credit: Arc<Semaphore>,
    in_flight: Arc<AtomicU32>,
    opened: Option<oneshot::Receiver<Result<(), String>>>,
    finished: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(id: StreamId, inner: Arc<Inner>, opened_here: bool) -> (StreamSlot, Stream) {
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(inner.config.window as usize));
        let in_flight = Arc::new(AtomicU32::new(0));
        let (opened_tx, opened_rx) = if opened_here {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let slot = StreamSlot {
            inbound: inbound_tx,
            credit: Arc::clone(&credit),
            in_flight: Arc::clone(&in_flight),
            opened: opened_tx,
        };
        let stream = Stream {
            id,
            inner,
            inbound: inbound_rx,
            credit,
            in_flight,
            opened: opened_rx,
            finished: false,
        };
        (slot, stream)
    }

    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Tells the peer that this side reached the stream's target.
    pub fn accept(&self) {
        let _ = self
            .inner
            .control
            .send(frame(Frame::Opened { stream: self.id }));
    }

    /// Refuses or aborts the stream, telling the peer why.
    pub fn reset(mut self, reason: &str) {
        self.send_reset(reason);
    }

    /// For a stream opened on this side: waits until the peer reached the
    /// target (`Ok`) or refused it (`Err` with the peer's reason).
    pub async fn opened(&mut self) -> Result<(), String> {
        match self.opened.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| Err("tunnel closed".into())),
            None => Ok(()),
        }
    }

    /// Copies bytes both ways between this stream and a local connection
    /// until both directions have finished or either side fails.
    pub async fn bridge<R, W>(mut self, reader: R, writer: W) -> Result<(), StreamError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let result = {
            let up = upstream(self.id, &self.inner, &self.credit, reader);
            let down = downstream(
                self.id,
                &self.inner,
                &mut self.inbound,
                &self.in_flight,
                writer,
            );
            tokio::try_join!(up, down).map(|_| ())
        };
        match &result {
            Err(StreamError::Local(e)) => self.send_reset(&e.to_string()),
            Ok(()) | Err(StreamError::Peer(_)) => {
                self.finished = true;
                self.inner.forget_stream(self.id);
            }
        }
        result
    }

    fn send_reset(&mut self, reason: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.inner.forget_stream(self.id);
        let reset = Frame::Reset {
            stream: self.id,
            reason: reason.to_owned(),
        };
        let _ = self.inner.control.send(frame(reset));
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.send_reset("the stream was abandoned");
    }
}

/// First read of a stream; later reads adapt (see [`next_read_size`]).
const MIN_READ: usize = 4 * 1024;

/// Doubles the read size after a read that filled the buffer (more is
/// waiting), halves it after one that used less than a quarter.
fn next_read_size(current: usize, read: usize, max: usize) -> usize {
    if read >= current {
        (current * 2).min(max)
    } else if read < current / 4 {
        (current / 2).max(MIN_READ.min(max))
    } else {
        current
    }
}

/// Local → peer: read, wait for credit, send; `Fin` at end of input.
async fn upstream<R: AsyncRead + Unpin>(
    id: StreamId,
    inner: &Inner,
    credit: &Semaphore,
    mut reader: R,
) -> Result<(), StreamError> {
    let max_chunk = inner.config.chunk.min(inner.config.window as usize);
    let mut read_size = max_chunk.min(MIN_READ);
    let tunnel_closed = || StreamError::Peer("the tunnel closed".into());
    loop {
        let mut buf = data_frame_buffer(read_size);
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(StreamError::Local)?;
        read_size = next_read_size(read_size, n, max_chunk);
        if n == 0 {
            let fin = frame(Frame::Fin { stream: id });
            return inner.data.send(fin).await.map_err(|_| tunnel_closed());
        }
        credit
            .acquire_many(n as u32)
            .await
            .map_err(|_| StreamError::Peer("the stream was reset".into()))?
            .forget();
        let data = tokio_tungstenite::tungstenite::Message::Binary(finish_data_frame(buf, id));
        inner.data.send(data).await.map_err(|_| tunnel_closed())?;
    }
}

/// Peer → local: write, return credit, honour `Fin` and `Reset`.
async fn downstream<W: AsyncWrite + Unpin>(
    id: StreamId,
    inner: &Inner,
    inbound: &mut mpsc::UnboundedReceiver<Inbound>,
    in_flight: &AtomicU32,
    mut writer: W,
) -> Result<(), StreamError> {
    // Returning credit in quarters keeps the sender busy without a frame per write.
    let threshold = (inner.config.window / 4).max(1);
    let mut unreturned = 0u32;
    loop {
        let Some(inbound) = inbound.recv().await else {
            return Err(StreamError::Peer("the tunnel closed".into()));
        };
        match inbound {
            Inbound::Data(bytes) => {
                writer.write_all(&bytes).await.map_err(StreamError::Local)?;
                unreturned += bytes.len() as u32;
                if unreturned >= threshold {
                    in_flight.fetch_sub(unreturned, Ordering::AcqRel);
                    let credit = Frame::Credit {
                        stream: id,
                        bytes: unreturned,
                    };
                    let _ = inner.control.send(frame(credit));
                    unreturned = 0;
                }
            }
            Inbound::Fin => return writer.shutdown().await.map_err(StreamError::Local),
            Inbound::Reset(reason) => return Err(StreamError::Peer(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_grows_under_load_and_shrinks_when_idle() {
        let max = 64 * 1024 - 5;
        let mut size = MIN_READ;
        for _ in 0..10 {
            size = next_read_size(size, size, max);
        }
        assert_eq!(size, max, "a busy stream reaches the full chunk");
        for _ in 0..10 {
            size = next_read_size(size, 10, max);
        }
        assert_eq!(size, MIN_READ, "a trickle goes back to the smallest read");
        assert_eq!(
            next_read_size(8192, 4096, max),
            8192,
            "a half-full read keeps the size"
        );
    }
}
