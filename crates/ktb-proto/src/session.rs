//! A live tunnel: many streams and datagrams over one WebSocket.
//!
//! Two tasks own the socket. The reader decodes frames and hands them to
//! per-stream queues without ever waiting on a stream, so a slow consumer
//! cannot stall the others; per-stream credit (see [`crate::stream`]) keeps
//! those queues bounded. The writer sends control frames (open, credit,
//! reset) ahead of bulk data so a busy stream cannot delay another stream's
//! flow-control updates, coalesces queued messages into one flush, and sends
//! keepalive pings. Any protocol violation closes the whole tunnel with a
//! reason, because after one the peer's state can no longer be trusted.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::codec::{Frame, StreamId};
use crate::handshake::{close_code, close_frame, Welcome};
use crate::stream::{Inbound, Stream, StreamSlot};
use crate::tcp::Target;
use crate::udp::{Datagram, FlowId};

/// Tuning of one tunnel. The defaults suit loopback and port-forward alike.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Bytes a sender may have in flight per stream; also the most a
    /// receiver ever buffers for one stream.
    pub window: u32,
    /// Largest `Data` payload read from a socket at once. Reads start
    /// smaller and grow while the socket keeps filling them, so idle
    /// streams do not each pin a full chunk.
    pub chunk: usize,
    /// How often to ping the peer.
    pub keepalive_interval: Duration,
    /// Silence after which the peer counts as dead.
    pub keepalive_timeout: Duration,
    /// Streams and datagrams the peer may have waiting for the application
    /// to pick them up; beyond that new streams are reset and datagrams dropped.
    pub incoming_queue: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            window: 1024 * 1024,
            // One allocation of exactly 64 KiB per frame: large enough for
            // few frames per byte, small enough to stay in malloc's arenas
            // (larger blocks are mmapped and page-faulted in on every read).
            chunk: 64 * 1024 - crate::codec::DATA_HEADER_LEN,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(20),
            incoming_queue: 4096,
        }
    }
}

/// Which end of the tunnel this is; decides the parity of stream ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Agent,
}

impl Side {
    fn first_stream_id(self) -> StreamId {
        match self {
            Side::Client => 2,
            Side::Agent => 1,
        }
    }

    fn opened_by_peer(self, id: StreamId) -> bool {
        (id % 2 == 1) == (self == Side::Client)
    }
}

/// Something the peer started.
#[derive(Debug)]
pub enum Incoming {
    /// A new stream; [`Stream::accept`] or [`Stream::reset`] it.
    Stream {
        stream: Stream,
        target: Target,
    },
    Datagram(Datagram),
    FlowEnd(FlowId),
}

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code, when there was a close frame.
    pub code: Option<u16>,
    pub reason: String,
    /// Whether the peer (rather than this side) ended it.
    pub by_peer: bool,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.by_peer {
            "peer closed the tunnel"
        } else {
            "tunnel closed"
        };
        match self.code {
            Some(code) => write!(f, "{who} ({code}): {}", self.reason),
            None => write!(f, "{who}: {}", self.reason),
        }
    }
}

/// The tunnel is closed; carries why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SessionClosed(pub CloseReason);

/// A handle to a running tunnel. Cheap to clone; the tunnel lives until it is
/// closed or the connection fails, not until the handles are dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) side: Side,
    pub(crate) config: SessionConfig,
    /// Small frames that must not wait behind bulk data.
    pub(crate) control: mpsc::UnboundedSender<Message>,
    /// Data, FIN and datagrams, in order per stream; bounded for backpressure.
    pub(crate) data: mpsc::Sender<Message>,
    pub(crate) state: Mutex<State>,
    next_stream: AtomicU32,
    closed: watch::Sender<Option<CloseReason>>,
    /// Becomes true when the writer has stopped (close frame sent or socket dead).
    writer_done: watch::Receiver<bool>,
}

pub(crate) struct State {
    pub(crate) streams: HashMap<StreamId, StreamSlot>,
    closed: bool,
}

impl Session {
    /// Starts the tunnel on a WebSocket that has completed the handshake.
    /// Returns the handle and the queue of what the peer starts.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        side: Side,
        config: SessionConfig,
    ) -> (Session, mpsc::Receiver<Incoming>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_queue);
        let (closed_tx, closed_rx) = watch::channel(None);
        let (writer_done_tx, writer_done_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            side,
            config,
            control: control_tx,
            data: data_tx,
            state: Mutex::new(State {
                streams: HashMap::new(),
                closed: false,
            }),
            next_stream: AtomicU32::new(side.first_stream_id()),
            closed: closed_tx,
            writer_done: writer_done_rx,
        });
        let (sink, stream) = ws.split();
        let keepalive = inner.config.keepalive_interval;
        tokio::spawn(async move {
            write_loop(sink, control_rx, data_rx, closed_rx, keepalive).await;
            writer_done_tx.send_replace(true);
        });
        tokio::spawn(read_loop(stream, Arc::clone(&inner), incoming_tx));
        (Session { inner }, incoming_rx)
    }

    /// Opens a stream to `target` on the peer. Data may be written at once;
    /// [`Stream::opened`] tells whether the peer reached the target.
    pub fn open(&self, target: Target) -> Result<Stream, SessionClosed> {
        let id = self.inner.next_stream.fetch_add(2, Ordering::Relaxed);
        let stream = self.inner.register(id, true)?;
        let _ = self
            .inner
            .control
            .send(frame(Frame::Open { stream: id, target }));
        Ok(stream)
    }

    /// Agent side: completes the handshake. Sent ahead of anything else on
    /// the tunnel, so call it before the session can open streams.
    pub fn welcome(&self, welcome: Welcome) {
        let _ = self.inner.control.send(frame(Frame::Welcome(welcome)));
    }

    /// Sends a datagram; waits only when the tunnel's send queue is full.
    pub async fn send_datagram(&self, datagram: Datagram) -> Result<(), SessionClosed> {
        self.inner
            .data
            .send(frame(Frame::Datagram(datagram)))
            .await
            .map_err(|_| self.closed_error())
    }

    /// Tells the peer that this side is done with `flow`.
    pub fn end_flow(&self, flow: FlowId) {
        let _ = self.inner.control.send(frame(Frame::FlowEnd { flow }));
    }

    /// Closes the tunnel, telling the peer why. Every stream is reset.
    pub fn close(&self, code: u16, reason: &str) {
        self.inner.shut_down(CloseReason {
            code: Some(code),
            reason: reason.to_owned(),
            by_peer: false,
        });
    }

    /// Closes the tunnel and waits (at most `timeout`) until the close frame
    /// is on the wire, so a process that exits next still says goodbye.
    pub async fn close_and_flush(&self, code: u16, reason: &str, timeout: Duration) {
        self.close(code, reason);
        let mut done = self.inner.writer_done.clone();
        let _ = tokio::time::timeout(timeout, done.wait_for(|done| *done)).await;
    }

    /// Waits until the tunnel has ended, and says why.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.inner.closed.subscribe();
        let reason = rx.wait_for(Option::is_some).await;
        match reason {
            Ok(reason) => reason.clone().expect("waited for Some"),
            Err(_) => unreachable!("the sender lives in `inner`, which we hold"),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }

    fn closed_error(&self) -> SessionClosed {
        let reason = self.inner.closed.borrow().clone();
        SessionClosed(reason.unwrap_or_else(|| CloseReason {
            code: None,
            reason: "tunnel closed".into(),
            by_peer: false,
        }))
    }
}

impl Inner {
    /// Creates the bookkeeping for stream `id` unless the tunnel is closed.
    fn register(
        self: &Arc<Self>,
        id: StreamId,
        opened_here: bool,
    ) -> Result<Stream, SessionClosed> {
        let mut state = self.state.lock().expect("state lock");
        if state.closed {
            drop(state);
            return Err(Session {
                inner: Arc::clone(self),
            }
            .closed_error());
        }
        let (slot, stream) = Stream::new(id, Arc::clone(self), opened_here);
        state.streams.insert(id, slot);
        Ok(stream)
    }

    pub(crate) fn forget_stream(&self, id: StreamId) {
        self.state.lock().expect("state lock").streams.remove(&id);
    }

    /// Ends the tunnel once: resets every stream with the reason and tells
    /// the writer to send a close frame (for closes decided on this side).
    fn shut_down(&self, reason: CloseReason) {
        let slots = {
            let mut state = self.state.lock().expect("state lock");
            if state.closed {
                return;
            }
            state.closed = true;
            std::mem::take(&mut state.streams)
        };
        let message = reason.to_string();
        for (_, slot) in slots {
            slot.fail(&message);
        }
        if let (false, Some(code)) = (reason.by_peer, reason.code) {
            let _ = self
                .control
                .send(Message::Close(Some(close_frame(code, &reason.reason))));
        }
        self.closed.send_replace(Some(reason));
    }
}

pub(crate) fn frame(frame: Frame) -> Message {
    Message::Binary(frame.encode())
}

fn local_close(code: u16, reason: impl Into<String>) -> CloseReason {
    CloseReason {
        code: Some(code),
        reason: reason.into(),
        by_peer: false,
    }
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut control: mpsc::UnboundedReceiver<Message>,
    mut data: mpsc::Receiver<Message>,
    mut closed: watch::Receiver<Option<CloseReason>>,
    keepalive_interval: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Messages written before one flush: enough to fill large TCP writes,
    /// few enough that control frames are never held back for long.
    const BATCH: usize = 32;
    let mut keepalive = tokio::time::interval(keepalive_interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            Some(message) = control.recv() => message,
            Some(message) = data.recv() => message,
            _ = keepalive.tick() => Message::Ping(Default::default()),
            _ = closed.changed() => break,
        };
        let mut closing = matches!(first, Message::Close(_));
        if sink.feed(first).await.is_err() {
            break;
        }
        for _ in 1..BATCH {
            if closing {
                break;
            }
            let next = match control.try_recv() {
                Ok(message) => message,
                Err(_) => match data.try_recv() {
                    Ok(message) => message,
                    Err(_) => break,
                },
            };
            closing = matches!(next, Message::Close(_));
            if sink.feed(next).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || closing {
            break;
        }
    }
    let _ = sink.close().await;
}

async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    inner: Arc<Inner>,
    incoming: mpsc::Sender<Incoming>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = inner.config.keepalive_timeout;
    let mut closed = inner.closed.subscribe();
    let reason = loop {
        let next = tokio::select! {
            next = tokio::time::timeout(timeout, stream.next()) => next,
            _ = closed.changed() => return,
        };
        let message = match next {
            Err(_) => {
                break local_close(
                    close_code::DEAD_PEER,
                    format!("no sign of life from the peer for {}s", timeout.as_secs()),
                )
            }
            Ok(None) => break peer_gone("connection closed without a close frame"),
            Ok(Some(Err(tungstenite::Error::Capacity(e)))) => {
                break local_close(close_code::MALFORMED, format!("frame too large: {e}"))
            }
            Ok(Some(Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )))) => break peer_gone("the peer dropped the connection without a close frame"),
            Ok(Some(Err(tungstenite::Error::Protocol(e)))) => {
                break local_close(
                    close_code::MALFORMED,
                    format!("websocket protocol error: {e}"),
                )
            }
            Ok(Some(Err(e))) => break peer_gone(&format!("connection lost: {e}")),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Binary(bytes) => {
                if let Err(reason) = dispatch(&inner, &incoming, bytes) {
                    break reason;
                }
            }
            Message::Close(frame) => {
                break CloseReason {
                    code: frame.as_ref().map(|f| f.code.into()),
                    reason: frame
                        .map_or_else(|| "no reason given".into(), |f| f.reason.to_string()),
                    by_peer: true,
                }
            }
            Message::Text(_) => {
                break local_close(
                    close_code::MALFORMED,
                    "text messages are not part of the ktb protocol",
                )
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };
    tracing::debug!(%reason, "tunnel ended");
    inner.shut_down(reason);
}

fn peer_gone(reason: &str) -> CloseReason {
    CloseReason {
        code: None,
        reason: reason.to_owned(),
        by_peer: true,
    }
}

/// Routes one frame from the peer. Never waits: queues towards the
/// application are either credit-bounded or dropped when full.
fn dispatch(
    inner: &Arc<Inner>,
    incoming: &mpsc::Sender<Incoming>,
    bytes: bytes::Bytes,
) -> Result<(), CloseReason> {
    let frame = Frame::decode(bytes)
        .map_err(|e| local_close(close_code::MALFORMED, format!("malformed frame: {e}")))?;
    match frame {
        Frame::Data { stream, payload } => {
            let state = inner.state.lock().expect("state lock");
            if let Some(slot) = state.streams.get(&stream) {
                slot.deliver_data(payload, inner.config.window)
                    .map_err(|e| local_close(close_code::FLOW_CONTROL, e))?;
            }
        }
        Frame::Fin { stream } => {
            if let Some(slot) = inner.state.lock().expect("state lock").streams.get(&stream) {
                slot.deliver(Inbound::Fin);
            }
        }
        Frame::Reset { stream, reason } => {
            let slot = inner
                .state
                .lock()
                .expect("state lock")
                .streams
                .remove(&stream);
            if let Some(slot) = slot {
                slot.fail(&reason);
            }
        }
        Frame::Credit { stream, bytes } => {
            let mut state = inner.state.lock().expect("state lock");
            if let Some(slot) = state.streams.get_mut(&stream) {
                slot.grant(bytes, inner.config.window)
                    .map_err(|e| local_close(close_code::FLOW_CONTROL, e))?;
            }
        }
        Frame::Opened { stream } => {
            if let Some(slot) = inner
                .state
                .lock()
                .expect("state lock")
                .streams
                .get_mut(&stream)
            {
                slot.confirm_open();
            }
        }
        Frame::Open { stream: id, target } => {
            let duplicate = inner
                .state
                .lock()
                .expect("state lock")
                .streams
                .contains_key(&id);
            if !inner.side.opened_by_peer(id) || duplicate {
                return Err(local_close(
                    close_code::MALFORMED,
                    format!("invalid stream id {id} in Open"),
                ));
            }
            let Ok(stream) = inner.register(id, false) else {
                return Ok(());
            };
            if let Err(mpsc::error::TrySendError::Full(Incoming::Stream { stream, .. })) =
                incoming.try_send(Incoming::Stream { stream, target })
            {
                stream.reset("too many connections waiting to be accepted");
            }
        }
        Frame::Datagram(datagram) => {
            // Full queue: drop, as a congested network would.
            let _ = incoming.try_send(Incoming::Datagram(datagram));
        }
        Frame::FlowEnd { flow } => {
            let _ = incoming.try_send(Incoming::FlowEnd(flow));
        }
        Frame::Hello(_) | Frame::Welcome(_) => {
            return Err(local_close(
                close_code::MALFORMED,
                "handshake frame after the handshake",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A session against a raw WebSocket peer that misbehaves on purpose.

    use super::*;
    use crate::handshake::websocket_config;
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn session_with_raw_peer() -> (
        Session,
        mpsc::Receiver<Incoming>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let ours =
            WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
        let peer =
            WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config())).await;
        let (session, incoming) = Session::start(ours, Side::Agent, SessionConfig::default());
        (session, incoming, peer)
    }

    /// Waits until the peer sees the tunnel end; returns the close code if
    /// a close frame came first (the peer may instead hit the closed pipe
    /// while answering a ping, which is just as much an end).
    async fn peer_sees_the_end(peer: &mut WebSocketStream<tokio::io::DuplexStream>) -> Option<u16> {
        let wait = async {
            loop {
                match peer.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the tunnel ends in time")
    }

    #[tokio::test]
    async fn garbage_after_the_handshake_closes_the_tunnel_with_a_reason() {
        let (session, _incoming, mut peer) = session_with_raw_peer().await;
        peer.send(Message::Binary(vec![0x7f, 1, 2].into()))
            .await
            .unwrap();
        let reason = session.closed().await;
        assert_eq!(reason.code, Some(close_code::MALFORMED));
        assert!(
            reason.reason.contains("unknown frame kind 0x7f"),
            "{reason}"
        );
        assert_ne!(peer_sees_the_end(&mut peer).await, Some(1000));
    }

    #[tokio::test]
    async fn overrunning_the_window_closes_the_tunnel() {
        let (session, mut incoming, mut peer) = session_with_raw_peer().await;
        let open = Frame::Open {
            stream: 2,
            target: Target::AgentPort { port: 80 },
        };
        peer.send(Message::Binary(open.encode())).await.unwrap();
        let Some(Incoming::Stream {
            stream: _kept_unread,
            ..
        }) = incoming.recv().await
        else {
            panic!("expected the stream");
        };
        let chunk = bytes::Bytes::from(vec![0u8; 64 * 1024]);
        let frames = SessionConfig::default().window as usize / chunk.len() + 1;
        for _ in 0..frames {
            let data = Frame::Data {
                stream: 2,
                payload: chunk.clone(),
            };
            if peer.send(Message::Binary(data.encode())).await.is_err() {
                break;
            }
        }
        let reason = session.closed().await;
        assert_eq!(reason.code, Some(close_code::FLOW_CONTROL));
        assert!(reason.reason.contains("window"), "{reason}");
        assert_ne!(peer_sees_the_end(&mut peer).await, Some(1000));
    }

    #[tokio::test]
    async fn a_peer_opening_with_our_parity_is_refused() {
        let (session, _incoming, mut peer) = session_with_raw_peer().await;
        let open = Frame::Open {
            stream: 1,
            target: Target::AgentPort { port: 80 },
        };
        peer.send(Message::Binary(open.encode())).await.unwrap();
        assert_eq!(session.closed().await.code, Some(close_code::MALFORMED));
        assert_ne!(peer_sees_the_end(&mut peer).await, Some(1000));
    }

    #[tokio::test]
    async fn a_silent_peer_is_declared_dead() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let ours =
            WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
        let config = SessionConfig {
            keepalive_interval: Duration::from_millis(50),
            keepalive_timeout: Duration::from_millis(200),
            ..SessionConfig::default()
        };
        let (session, _incoming) = Session::start(ours, Side::Agent, config);
        let reason = tokio::time::timeout(Duration::from_secs(10), session.closed())
            .await
            .unwrap();
        assert_eq!(reason.code, Some(close_code::DEAD_PEER), "{reason}");
    }
}
