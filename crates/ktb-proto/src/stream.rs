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
//!
//! What the reader task queues for a stream is bounded by credit alone, in
//! bytes and in frames: every `Data` frame costs at least
//! [`MIN_DATA_COST`], empty ones and anything after `Fin` are protocol
//! violations, and payloads are copied out of the WebSocket's read buffer
//! (a queued slice of it would keep the whole buffer alive).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::codec::{data_frame_buffer, finish_data_frame, Frame, StreamId};
use crate::handshake::close_code;
use crate::session::{frame, local_close, CloseReason, Inner};

/// Credit every stream starts with in each direction. Part of the protocol
/// (version 3): a sender may send this much at once, before it hears
/// anything from the receiver, who may then widen the window with `Credit`.
pub const INITIAL_WINDOW: u32 = 64 * 1024;
/// The widest window a receiver may grant one stream. Part of the protocol
/// (version 4): a sender refuses credit beyond it, so both ends must agree
/// on it, whatever window each end's own configuration grants.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;
/// The least credit one `Data` frame costs, whatever its length, so that a
/// receiver queues at most window / `MIN_DATA_COST` frames for a stream: a
/// frame's bookkeeping would otherwise cost more than its bytes.
pub const MIN_DATA_COST: u32 = 256;

/// The largest `Data` payload a sender reads at once: three quarters of
/// the narrowest window. A receiver returns credit once a quarter of its
/// window is delivered, so a sender waiting for credit always has more
/// than that quarter in flight, and the two never wait on each other
/// (with whole-window chunks they did: found by a unit test).
pub const MAX_CHUNK: usize = INITIAL_WINDOW as usize * 3 / 4;

/// Credit a `Data` frame of `len` payload bytes consumes.
pub(crate) fn data_cost(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX).max(MIN_DATA_COST)
}

/// What the reader task hands a stream.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    Fin,
    Reset(String),
}

/// The session's side of a stream: where the reader task delivers frames.
/// The inbound queue is unbounded as a channel but bounded by credit: at
/// most `window` bytes in at most `window / MIN_DATA_COST` frames, one
/// `Fin` and one `Reset`.
pub(crate) struct StreamSlot {
    inbound: mpsc::UnboundedSender<Inbound>,
    credit: Arc<Semaphore>,
    in_flight: Arc<AtomicU32>,
    /// The receive window granted to the peer, shared with the [`Stream`]
    /// that resizes it (see [`crate::window`]): from [`INITIAL_WINDOW`] to
    /// the session's `lone_window`, as far as its receive budget allows.
    window: Arc<AtomicU32>,
    /// The peer sent `Fin`: it may send nothing more on this stream.
    fin_received: bool,
    /// `Some` until the peer answers a stream this side opened.
    opened: Option<oneshot::Sender<Result<(), String>>>,
    opened_here: bool,
}

impl StreamSlot {
    /// Queues data unless the peer broke the stream's rules: data after
    /// `Fin`, an empty frame, or more than the window it was granted.
    pub(crate) fn deliver_data(&mut self, id: StreamId, payload: &[u8]) -> Result<(), CloseReason> {
        if self.fin_received {
            return Err(local_close(
                close_code::MALFORMED,
                format!("Data after Fin on stream {id}"),
            ));
        }
        if payload.is_empty() {
            return Err(local_close(
                close_code::MALFORMED,
                format!("empty Data frame on stream {id}"),
            ));
        }
        let cost = data_cost(payload.len());
        let in_flight = self
            .in_flight
            .fetch_add(cost, Ordering::AcqRel)
            .saturating_add(cost);
        let window = self.window();
        if in_flight > window {
            return Err(local_close(
                close_code::FLOW_CONTROL,
                format!(
                    "the peer sent {in_flight} bytes of credit on stream {id}, whose window is {window}"
                ),
            ));
        }
        self.deliver(Inbound::Data(Bytes::copy_from_slice(payload)));
        Ok(())
    }

    /// Queues the peer's half-close; a second one is a protocol violation.
    pub(crate) fn deliver_fin(&mut self, id: StreamId) -> Result<(), CloseReason> {
        if std::mem::replace(&mut self.fin_received, true) {
            return Err(local_close(
                close_code::MALFORMED,
                format!("duplicate Fin on stream {id}"),
            ));
        }
        self.deliver(Inbound::Fin);
        Ok(())
    }

    fn deliver(&self, inbound: Inbound) {
        // The stream may be gone already; its bytes have nowhere to go.
        let _ = self.inbound.send(inbound);
    }

    /// Adds credit, refusing grants beyond the widest window a receiver
    /// may grant ([`MAX_WINDOW`]): the peer would be inventing credit.
    pub(crate) fn grant(&mut self, id: StreamId, bytes: u32) -> Result<(), CloseReason> {
        if self
            .credit
            .available_permits()
            .saturating_add(bytes as usize)
            > MAX_WINDOW as usize
        {
            return Err(local_close(
                close_code::FLOW_CONTROL,
                format!(
                    "the peer granted {bytes} bytes of credit on stream {id}, beyond the window of {MAX_WINDOW}"
                ),
            ));
        }
        self.credit.add_permits(bytes as usize);
        Ok(())
    }

    /// The peer reached the target of a stream this side opened; `Opened`
    /// for a stream the peer opened itself is a protocol violation.
    pub(crate) fn confirm_open(&mut self, id: StreamId) -> Result<(), CloseReason> {
        if !self.opened_here {
            return Err(local_close(
                close_code::MALFORMED,
                format!("Opened for stream {id}, which the peer opened itself"),
            ));
        }
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(Ok(()));
        }
        Ok(())
    }

    /// (the window granted to the peer, the credit it used that this side
    /// has not returned yet: bytes queued or being written out).
    pub(crate) fn receive_usage(&self) -> (u32, u32) {
        (self.window(), self.in_flight.load(Ordering::Acquire))
    }

    pub(crate) fn window(&self) -> u32 {
        self.window.load(Ordering::Acquire)
    }

    /// Sets the window; only under the session's state lock, which keeps
    /// the windows' sum within the receive budget.
    pub(crate) fn set_window(&self, window: u32) {
        self.window.store(window, Ordering::Release);
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
    /// This side's receive window (see [`StreamSlot::window`]).
    window: Arc<AtomicU32>,
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
    pub(crate) fn new(
        id: StreamId,
        inner: Arc<Inner>,
        opened_here: bool,
        window: u32,
    ) -> (StreamSlot, Stream) {
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let in_flight = Arc::new(AtomicU32::new(0));
        let window = Arc::new(AtomicU32::new(window));
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
            window: Arc::clone(&window),
            fin_received: false,
            opened: opened_tx,
            opened_here,
        };
        let stream = Stream {
            id,
            inner,
            window,
            inbound: inbound_rx,
            credit,
            in_flight,
            opened: opened_rx,
            finished: false,
        };
        (slot, stream)
    }

    /// A stream this side could not open (the session's stream limit):
    /// never on the wire, it fails like a stream the peer reset, with
    /// `reason`, so its owner resets the caller the usual way.
    pub(crate) fn refused(inner: Arc<Inner>, reason: &str) -> Stream {
        // Id 0 belongs to neither side, so no frame can ever match it.
        let (slot, mut stream) = Stream::new(0, inner, true, INITIAL_WINDOW);
        slot.fail(reason);
        stream.finished = true;
        stream
    }

    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Tells the peer that this side reached the stream's target.
    pub fn accept(&self) {
        self.inner
            .send_control(frame(Frame::Opened { stream: self.id }));
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

    /// [`Stream::bridge`] to a TCP connection. If the stream fails, the
    /// connection is closed with a reset rather than a FIN, so its peer sees
    /// an error, as a real network would show it, not an orderly (and
    /// misleading) end of data.
    pub async fn bridge_tcp(self, mut tcp: tokio::net::TcpStream) -> Result<(), StreamError> {
        let (reader, writer) = tcp.split();
        let result = self.bridge(reader, writer).await;
        if result.is_err() {
            let _ = tcp.set_zero_linger();
        }
        result
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
                &self.window,
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
        self.inner.send_control(frame(reset));
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
    let max_chunk = inner.config.chunk.clamp(1, MAX_CHUNK);
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
            .acquire_many(data_cost(n))
            .await
            .map_err(|_| StreamError::Peer("the stream was reset".into()))?
            .forget();
        let data = tokio_tungstenite::tungstenite::Message::Binary(finish_data_frame(buf, id));
        inner.data.send(data).await.map_err(|_| tunnel_closed())?;
    }
}

/// Peer → local: write, return credit (resizing the window as it goes),
/// honour `Fin` and `Reset`.
async fn downstream<W: AsyncWrite + Unpin>(
    id: StreamId,
    inner: &Inner,
    window: &AtomicU32,
    inbound: &mut mpsc::UnboundedReceiver<Inbound>,
    in_flight: &AtomicU32,
    mut writer: W,
) -> Result<(), StreamError> {
    let mut unreturned = 0u32;
    loop {
        let Some(inbound) = inbound.recv().await else {
            return Err(StreamError::Peer("the tunnel closed".into()));
        };
        match inbound {
            Inbound::Data(bytes) => {
                writer.write_all(&bytes).await.map_err(StreamError::Local)?;
                unreturned += data_cost(bytes.len());
                // Returning credit in quarters keeps the sender busy
                // without a frame per write.
                if unreturned >= (window.load(Ordering::Acquire) / 4).max(1) {
                    // Before the window narrows, so the reader never
                    // compares the old usage with the new window.
                    in_flight.fetch_sub(unreturned, Ordering::AcqRel);
                    let bytes = inner.resize_window(id, unreturned, Instant::now());
                    if bytes > 0 {
                        inner.send_control(frame(Frame::Credit { stream: id, bytes }));
                    }
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
