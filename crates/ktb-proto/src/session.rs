//! A live tunnel: many streams and datagrams over one [`Link`].
//!
//! Two tasks own the socket. The reader decodes frames and hands them to
//! per-stream queues without ever waiting on a stream, so a slow consumer
//! cannot stall the others; per-stream credit (see [`crate::stream`]) keeps
//! those queues bounded. The writer sends control frames (open, credit,
//! reset) ahead of bulk data so a busy stream cannot delay another stream's
//! flow-control updates, coalesces queued messages into one flush, and sends
//! keepalive pings. Any protocol violation closes the whole tunnel with a
//! reason, because after one the peer's state can no longer be trusted.
//!
//! Everything a session holds is bounded whatever the peer sends:
//! - at most [`SessionConfig::max_streams`] streams; more are reset with a
//!   reason, whichever side opens them;
//! - receive windows add up to at most [`SessionConfig::receive_budget`]:
//!   every stream gets [`INITIAL_WINDOW`], and streams are widened to
//!   [`SessionConfig::window`] (a stream alone to
//!   [`SessionConfig::lone_window`], see [`crate::window`]) first come,
//!   first served, while what the budget holds beyond
//!   `max_streams × INITIAL_WINDOW` lasts;
//! - the control queue holds [`CONTROL_QUEUE`] frames: it only fills when
//!   the peer stops reading while it keeps making this side answer, and
//!   then the tunnel is closed (waiting instead would stall the reader,
//!   which must never wait, and dropping control frames would corrupt flow
//!   control);
//! - frames for streams that ended are ignored with no state kept; frames
//!   that make no sense (a stream the peer never opened, a reused id, data
//!   after `Fin`…) close the tunnel. Stream ids only grow: when they run
//!   out, the tunnel closes rather than wrap.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::codec::{Frame, StreamId};
use crate::handshake::{close_code, close_frame, Welcome};
use crate::link::Link;
use crate::stream::{Stream, StreamSlot, INITIAL_WINDOW, MAX_CHUNK, MAX_WINDOW};
use crate::tcp::Target;
use crate::udp::{Datagram, FlowId};
use crate::window::{self, Activity};

/// Control frames waiting for the writer before the tunnel counts as stuck.
pub const CONTROL_QUEUE: usize = 8192;
/// Data frames (at most [`MAX_CHUNK`] each) waiting for the writer, all
/// streams together. Every frame queued here is one a new stream's first
/// bytes or a request wait behind, so the queue holds a few writer batches,
/// not a window: 16 frames are 768 KiB, about 8 ms of a port-forward's
/// bulk pace, where 64 were 3 MiB. Streams wait for a slot in turn (tokio's
/// channel wakes waiting senders in order), which shares the link fairly.
const DATA_QUEUE: usize = 16;
/// How long the writer tries to get the close frame out once the tunnel ended.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Tuning of one tunnel. The defaults suit loopback and port-forward alike.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The receive window granted to a stream while others carry data too
    /// (from [`INITIAL_WINDOW`] to [`MAX_WINDOW`]).
    pub window: u32,
    /// The receive window granted to a stream while it is the only one
    /// carrying data (from `window` to [`MAX_WINDOW`]; see
    /// [`crate::window`]).
    pub lone_window: u32,
    /// Largest `Data` payload read from a socket at once (at most
    /// [`MAX_CHUNK`]). Reads start smaller and grow while the socket keeps
    /// filling them, so idle streams do not each pin a full chunk.
    pub chunk: usize,
    /// How often to ping the peer.
    pub keepalive_interval: Duration,
    /// Silence after which the peer counts as dead.
    pub keepalive_timeout: Duration,
    /// Streams and datagrams the peer may have waiting for the application
    /// to pick them up; beyond that new streams are reset and datagrams dropped.
    pub incoming_queue: usize,
    /// Streams open at once, both directions together; more are reset.
    pub max_streams: usize,
    /// Bytes this side may have to buffer for the whole session: the sum
    /// of every stream's receive window. `max_streams × INITIAL_WINDOW` of
    /// it is reserved so that every stream can open; the rest widens
    /// streams to `window`.
    pub receive_budget: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            // What a stream beside others has in flight is what their
            // requests queue behind in the path's buffers (the
            // apiserver's, the kubelet's, a proxy's). At 20 ms a request
            // beside a bulk echo waited at p99 3.6–4.0× the round trip
            // with 4 MiB and 2.2–2.3× with 2 MiB (exchange; connect 4.4×
            // and 2.4×), 8× with 16 MiB. A stream alone is not held to it
            // (`lone_window`).
            window: 2 * 1024 * 1024,
            // A stream alone delays no one: 16 MiB moved 0.91× a
            // port-forward's bulk at 20 ms, where 4 MiB moved 0.66×.
            lone_window: MAX_WINDOW,
            // One allocation of exactly 48 KiB per frame: large enough for
            // few frames per byte, small enough to stay in malloc's arenas
            // (larger blocks are mmapped and page-faulted in on every read).
            chunk: MAX_CHUNK - crate::codec::DATA_HEADER_LEN,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(20),
            incoming_queue: 4096,
            // Room for a Service's real callers beside a flood of idle
            // ones (2,000 in the project's flood test) from the cluster.
            max_streams: 2048,
            // 128 MiB so that 2048 streams can open, 64 MiB to widen 32
            // of them side by side, or one alone. With every stream also
            // holding at most one read chunk (96 MiB), the worst case
            // stays under the agent pod's 384 MiB limit.
            receive_budget: 192 * 1024 * 1024,
        }
    }
}

impl SessionConfig {
    /// What the budget holds beyond every stream's initial window.
    fn widening_budget(&self) -> usize {
        self.receive_budget
            .saturating_sub(self.max_streams.saturating_mul(INITIAL_WINDOW as usize))
    }

    /// The window beside other streams, as the protocol allows it.
    fn wide_window(&self) -> u32 {
        self.window.clamp(INITIAL_WINDOW, MAX_WINDOW)
    }

    /// The window of a stream alone, as the protocol allows it.
    fn lone_window(&self) -> u32 {
        self.lone_window.clamp(self.wide_window(), MAX_WINDOW)
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

/// What a session holds right now, for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams open, both directions.
    pub streams: usize,
    /// Receive windows granted to the peer, summed: the most this side can
    /// be made to buffer; never above [`SessionConfig::receive_budget`].
    pub granted: usize,
    /// Credit the peer has used and this side not yet returned: bytes
    /// queued for delivery (each frame counted at least
    /// [`crate::stream::MIN_DATA_COST`]).
    pub buffered: usize,
}

/// A handle to a running tunnel. Cheap to clone; the tunnel lives until it is
/// closed or the connection fails, not until the handles are dropped.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) side: Side,
    pub(crate) config: SessionConfig,
    /// Small frames that must not wait behind bulk data; see [`CONTROL_QUEUE`].
    control: mpsc::Sender<Message>,
    /// Data, FIN and datagrams, in order per stream; bounded for backpressure.
    pub(crate) data: mpsc::Sender<Message>,
    state: Mutex<State>,
    closed: watch::Sender<Option<CloseReason>>,
    /// Becomes true when the writer has stopped (close frame sent or socket dead).
    writer_done: watch::Receiver<bool>,
}

struct State {
    streams: HashMap<StreamId, StreamSlot>,
    /// The id of the next stream this side opens; only grows. Allocated
    /// under the lock that also queues the `Open`, so `Open`s leave in id
    /// order even when many tasks open streams at once.
    next_stream: StreamId,
    /// Window bytes granted beyond [`INITIAL_WINDOW`], over open streams.
    widened: usize,
    /// Which streams brought data lately: whether a stream is alone.
    activity: Activity,
    /// The highest id the peer has opened (0: none yet). Its ids must grow,
    /// so anything at or below this was used once and is never valid again.
    peer_high: StreamId,
    closed: bool,
}

impl State {
    /// Forgets a stream, returning its widening to the budget.
    fn remove(&mut self, id: StreamId) -> Option<StreamSlot> {
        let slot = self.streams.remove(&id)?;
        self.widened -= (slot.window() - INITIAL_WINDOW) as usize;
        Some(slot)
    }
}

/// Why a stream could not be registered.
enum Unregistered {
    Closed,
    /// The session's limits; the reason is told to whoever opened it.
    Refused(String),
}

/// The receive queues of a session, for [`Session::start`] and the fuzzer.
struct Queues {
    control: mpsc::Receiver<Message>,
    data: mpsc::Receiver<Message>,
    writer_done: watch::Sender<bool>,
}

impl Session {
    /// Starts the tunnel on a link that has completed the handshake.
    /// Returns the handle and the queue of what the peer starts.
    pub fn start<L: Link>(
        link: L,
        side: Side,
        config: SessionConfig,
    ) -> (Session, mpsc::Receiver<Incoming>) {
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_queue.max(1));
        let (inner, queues) = Inner::new(side, config);
        let (sink, stream) = link.split();
        let keepalive = inner.config.keepalive_interval;
        let closed = inner.closed.subscribe();
        tokio::spawn(async move {
            let Queues {
                control,
                data,
                writer_done,
            } = queues;
            write_loop(sink, control, data, closed, keepalive).await;
            writer_done.send_replace(true);
        });
        tokio::spawn(read_loop(stream, Arc::clone(&inner), incoming_tx));
        (Session { inner }, incoming_rx)
    }

    /// Opens a stream to `target` on the peer. Data may be written at once;
    /// [`Stream::opened`] tells whether the peer reached the target. Beyond
    /// the session's stream limit the stream comes back already reset,
    /// with the reason.
    pub fn open(&self, target: Target) -> Result<Stream, SessionClosed> {
        let inner = &self.inner;
        let mut state = inner.state.lock().expect("state lock");
        let id = state.next_stream;
        let Some(next) = id.checked_add(2) else {
            drop(state);
            inner.shut_down(local_close(
                close_code::OVERLOADED,
                "this tunnel used up its 2^31 stream ids; reconnect",
            ));
            return Err(self.closed_error());
        };
        let (stream, widened) = match inner.register(&mut state, id, true) {
            Ok(registered) => registered,
            Err(Unregistered::Refused(reason)) => {
                drop(state);
                return Ok(Stream::refused(Arc::clone(inner), &reason));
            }
            Err(Unregistered::Closed) => {
                drop(state);
                return Err(self.closed_error());
            }
        };
        state.next_stream = next;
        let queued = inner
            .control
            .try_send(frame(Frame::Open { stream: id, target }));
        drop(state);
        if let Err(TrySendError::Full(_)) = queued {
            inner.overloaded();
        }
        inner.send_widening(id, widened);
        Ok(stream)
    }

    /// Agent side: completes the handshake. Sent ahead of anything else on
    /// the tunnel, so call it before the session can open streams.
    pub fn welcome(&self, welcome: Welcome) {
        self.inner.send_control(frame(Frame::Welcome(welcome)));
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
        self.inner.send_control(frame(Frame::FlowEnd { flow }));
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

    /// Streams, granted windows and buffered bytes right now.
    pub fn stats(&self) -> SessionStats {
        self.inner.stats()
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
    fn new(side: Side, config: SessionConfig) -> (Arc<Inner>, Queues) {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let (closed_tx, _) = watch::channel(None);
        let (writer_done_tx, writer_done_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            side,
            config,
            control: control_tx,
            data: data_tx,
            state: Mutex::new(State {
                streams: HashMap::new(),
                next_stream: side.first_stream_id(),
                widened: 0,
                activity: Activity::default(),
                peer_high: 0,
                closed: false,
            }),
            closed: closed_tx,
            writer_done: writer_done_rx,
        });
        let queues = Queues {
            control: control_rx,
            data: data_rx,
            writer_done: writer_done_tx,
        };
        (inner, queues)
    }

    /// Creates the bookkeeping for stream `id` within the session's limits;
    /// says whether its window was widened beyond [`INITIAL_WINDOW`].
    fn register(
        self: &Arc<Self>,
        state: &mut State,
        id: StreamId,
        opened_here: bool,
    ) -> Result<(Stream, bool), Unregistered> {
        if state.closed {
            return Err(Unregistered::Closed);
        }
        if state.streams.len() >= self.config.max_streams {
            return Err(Unregistered::Refused(format!(
                "too many streams on this tunnel (limit {}): try again when some have finished",
                self.config.max_streams
            )));
        }
        let widening = (self.config.wide_window() - INITIAL_WINDOW) as usize;
        let widened = widening > 0 && state.widened + widening <= self.config.widening_budget();
        let window = if widened {
            state.widened += widening;
            self.config.wide_window()
        } else {
            INITIAL_WINDOW
        };
        let (slot, stream) = Stream::new(id, Arc::clone(self), opened_here, window);
        state.streams.insert(id, slot);
        Ok((stream, widened))
    }

    /// Grants a widened stream the rest of its window.
    fn send_widening(&self, id: StreamId, widened: bool) {
        if widened {
            let bytes = self.config.wide_window() - INITIAL_WINDOW;
            self.send_control(frame(Frame::Credit { stream: id, bytes }));
        }
    }

    /// Stream `id` delivered `returned` bytes of credit: moves its window
    /// towards the one it deserves now (see [`crate::window`]) and says
    /// how much credit to send the peer.
    pub(crate) fn resize_window(&self, id: StreamId, returned: u32, now: Instant) -> u32 {
        let mut state = self.state.lock().expect("state lock");
        let target = match state.activity.is_alone(id, now) {
            true => self.config.lone_window(),
            false => self.config.wide_window(),
        };
        let spare = self.config.widening_budget().saturating_sub(state.widened);
        // A stream refused before it was registered has no window to resize.
        let Some(slot) = state.streams.get(&id) else {
            return returned;
        };
        let current = slot.window();
        let resized = window::resize(current, target, returned, spare);
        slot.set_window(resized.window);
        state.widened = state.widened + resized.window as usize - current as usize;
        resized.credit
    }

    pub(crate) fn forget_stream(&self, id: StreamId) {
        self.state.lock().expect("state lock").remove(id);
    }

    /// Queues a control frame. A full queue means the peer has not read
    /// for a long while as it kept this side answering; the tunnel closes.
    /// Never call with the state lock held.
    pub(crate) fn send_control(&self, message: Message) {
        if let Err(TrySendError::Full(_)) = self.control.try_send(message) {
            self.overloaded();
        }
    }

    /// The control queue is full: see [`Inner::send_control`].
    fn overloaded(&self) {
        self.shut_down(local_close(
            close_code::OVERLOADED,
            format!("the peer stopped reading while {CONTROL_QUEUE} control frames waited for it"),
        ));
    }

    fn stats(&self) -> SessionStats {
        let state = self.state.lock().expect("state lock");
        let (granted, buffered) = state.streams.values().map(StreamSlot::receive_usage).fold(
            (0, 0),
            |(granted, buffered), (window, used)| {
                (granted + window as usize, buffered + used as usize)
            },
        );
        SessionStats {
            streams: state.streams.len(),
            granted,
            buffered,
        }
    }

    /// Ends the tunnel once: resets every stream with the reason and wakes
    /// the writer, which sends a close frame for closes decided on this side.
    pub(crate) fn shut_down(&self, reason: CloseReason) {
        let slots = {
            let mut state = self.state.lock().expect("state lock");
            if state.closed {
                return;
            }
            state.closed = true;
            state.widened = 0;
            std::mem::take(&mut state.streams)
        };
        let message = reason.to_string();
        for (_, slot) in slots {
            slot.fail(&message);
        }
        self.closed.send_replace(Some(reason));
    }
}

pub(crate) fn frame(frame: Frame) -> Message {
    Message::Binary(frame.encode())
}

pub(crate) fn local_close(code: u16, reason: impl Into<String>) -> CloseReason {
    CloseReason {
        code: Some(code),
        reason: reason.into(),
        by_peer: false,
    }
}

/// Where the writer took a message from.
enum Queued {
    /// Open, opened, credit, reset, flow end, welcome, ping: written as
    /// soon as possible.
    Control(Message),
    /// A stream's data or fin, or a datagram.
    Data(Message),
}

async fn write_loop<L: Link>(
    mut sink: SplitSink<L, Message>,
    mut control: mpsc::Receiver<Message>,
    mut data: mpsc::Receiver<Message>,
    mut closed: watch::Receiver<Option<CloseReason>>,
    keepalive_interval: Duration,
) {
    /// Messages written before one flush: enough to fill large TCP writes,
    /// few enough that control frames are never held back for long.
    const BATCH: usize = 32;
    let mut keepalive = tokio::time::interval(keepalive_interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A data message is written only after every control message queued
    // so far: a stream's `Open` is queued before its first `Data`, but
    // on a multi-threaded runtime both may arrive between this task's look
    // at the control queue and its look at the data queue, and data for a
    // stream the peer has not heard of closes the tunnel.
    'tunnel: loop {
        let mut next = Some(tokio::select! {
            biased;
            Some(message) = control.recv() => Queued::Control(message),
            _ = closed.changed() => break,
            Some(message) = data.recv() => Queued::Data(message),
            _ = keepalive.tick() => Queued::Control(Message::Ping(Default::default())),
        });
        for _ in 0..BATCH {
            let queued = match next.take() {
                Some(queued) => queued,
                None => match control.try_recv() {
                    Ok(message) => Queued::Control(message),
                    Err(_) => match data.try_recv() {
                        Ok(message) => Queued::Data(message),
                        Err(_) => break,
                    },
                },
            };
            let message = match queued {
                Queued::Control(message) => message,
                Queued::Data(message) => {
                    // Bounded: the control queue holds CONTROL_QUEUE frames.
                    for _ in 0..CONTROL_QUEUE {
                        let Ok(earlier) = control.try_recv() else {
                            break;
                        };
                        if sink.feed(earlier).await.is_err() {
                            break 'tunnel;
                        }
                    }
                    message
                }
            };
            if sink.feed(message).await.is_err() {
                break 'tunnel;
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    // Say why, when this side decided; briefly, since a peer that stopped
    // reading would make us wait forever.
    let reason = closed.borrow().clone();
    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
        if let Some(CloseReason {
            code: Some(code),
            reason,
            by_peer: false,
        }) = reason
        {
            let _ = sink
                .send(Message::Close(Some(close_frame(code, &reason))))
                .await;
        }
        let _ = sink.close().await;
    })
    .await;
}

async fn read_loop<L: Link>(
    mut stream: SplitStream<L>,
    inner: Arc<Inner>,
    incoming: mpsc::Sender<Incoming>,
) {
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

/// Whether a frame's stream is one that cannot exist: id 0, an id of ours
/// not handed out yet, or one of the peer's above any it opened. (Ids below
/// those were open once; their late frames are ignored.)
fn never_opened(inner: &Inner, state: &State, id: StreamId) -> bool {
    id == 0
        || if inner.side.opened_by_peer(id) {
            id > state.peer_high
        } else {
            id >= state.next_stream
        }
}

/// The slot of stream `id` if it is open: `Ok(None)` for one that ended
/// (its late frames are ignored), an error for one that never existed. An
/// open stream is never one that [`never_opened`] rules out, so that check
/// may come first and the map be searched once.
fn open_slot<'s>(
    inner: &Inner,
    state: &'s mut State,
    id: StreamId,
    what: &str,
) -> Result<Option<&'s mut StreamSlot>, CloseReason> {
    if never_opened(inner, state, id) {
        return Err(local_close(
            close_code::MALFORMED,
            format!("{what} for stream {id}, which was never opened"),
        ));
    }
    Ok(state.streams.get_mut(&id))
}

/// Runs `f` on the slot of an open stream (see [`open_slot`]).
fn with_slot(
    inner: &Inner,
    id: StreamId,
    what: &str,
    f: impl FnOnce(&mut StreamSlot) -> Result<(), CloseReason>,
) -> Result<(), CloseReason> {
    let mut state = inner.state.lock().expect("state lock");
    match open_slot(inner, &mut state, id, what)? {
        Some(slot) => f(slot),
        None => Ok(()),
    }
}

/// Routes one frame from the peer. Never waits: queues towards the
/// application are either credit-bounded or dropped when full.
fn dispatch(
    inner: &Arc<Inner>,
    incoming: &mpsc::Sender<Incoming>,
    bytes: bytes::Bytes,
) -> Result<(), CloseReason> {
    let decoded = Frame::decode(bytes)
        .map_err(|e| local_close(close_code::MALFORMED, format!("malformed frame: {e}")))?;
    match decoded {
        Frame::Data { stream, payload } => {
            let mut state = inner.state.lock().expect("state lock");
            if let Some(slot) = open_slot(inner, &mut state, stream, "Data")? {
                slot.deliver_data(stream, &payload)?;
                state.activity.record(stream, Instant::now());
            }
        }
        Frame::Fin { stream } => with_slot(inner, stream, "Fin", |slot| slot.deliver_fin(stream))?,
        Frame::Reset { stream, reason } => {
            let removed = {
                let mut state = inner.state.lock().expect("state lock");
                match open_slot(inner, &mut state, stream, "Reset")? {
                    Some(_) => state.remove(stream),
                    None => None,
                }
            };
            if let Some(slot) = removed {
                slot.fail(&reason);
            }
        }
        Frame::Credit { stream, bytes } => {
            with_slot(inner, stream, "Credit", |slot| slot.grant(stream, bytes))?
        }
        Frame::Opened { stream } => {
            with_slot(inner, stream, "Opened", |slot| slot.confirm_open(stream))?
        }
        Frame::Open { stream: id, target } => {
            let registered = {
                let mut state = inner.state.lock().expect("state lock");
                if !inner.side.opened_by_peer(id) || id <= state.peer_high {
                    return Err(local_close(
                        close_code::MALFORMED,
                        format!(
                            "invalid stream id {id} in Open: the peer's ids must be {} and grow",
                            if inner.side == Side::Client {
                                "odd"
                            } else {
                                "even"
                            }
                        ),
                    ));
                }
                state.peer_high = id;
                inner.register(&mut state, id, false)
            };
            let stream = match registered {
                Ok((stream, widened)) => {
                    inner.send_widening(id, widened);
                    stream
                }
                Err(Unregistered::Refused(reason)) => {
                    inner.send_control(frame(Frame::Reset { stream: id, reason }));
                    return Ok(());
                }
                Err(Unregistered::Closed) => return Ok(()),
            };
            if let Err(TrySendError::Full(Incoming::Stream { stream, .. })) =
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
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Challenge(_) | Frame::Proof(_) => {
            return Err(local_close(
                close_code::MALFORMED,
                "handshake frame after the handshake",
            ));
        }
    }
    Ok(())
}

/// Feeds `frames` to a session's reader as if a peer sent them, with no
/// socket and no tasks, and checks the session's bounds after each one.
/// Panics if a bound is broken; stops at the first frame that closes the
/// tunnel. For the fuzzer and property tests.
#[doc(hidden)]
pub fn dispatch_for_fuzzing(side: Side, config: SessionConfig, frames: &[bytes::Bytes]) {
    let (incoming_tx, mut incoming_rx) = mpsc::channel(config.incoming_queue.max(1));
    let (inner, mut queues) = Inner::new(side, config);
    let mut accepted = Vec::new();
    for bytes in frames {
        if dispatch(&inner, &incoming_tx, bytes.clone()).is_err() {
            break;
        }
        // Keep every other stream the peer opens (it stays registered) and
        // drop the rest (reset at once), like an application would.
        while let Ok(item) = incoming_rx.try_recv() {
            if let Incoming::Stream { stream, .. } = item {
                if stream.id() % 4 < 2 {
                    accepted.push(stream);
                }
            }
        }
        while queues.control.try_recv().is_ok() {}
        while queues.data.try_recv().is_ok() {}
        let config = &inner.config;
        let stats = inner.stats();
        let state = inner.state.lock().expect("state lock");
        assert!(stats.streams <= config.max_streams, "{stats:?}");
        assert!(
            stats.granted
                <= config
                    .receive_budget
                    .max(config.max_streams * INITIAL_WINDOW as usize),
            "{stats:?}"
        );
        assert!(state.widened <= config.widening_budget());
        for slot in state.streams.values() {
            let (window, used) = slot.receive_usage();
            assert!(
                used <= window,
                "a stream buffers {used} of a {window} window"
            );
        }
    }
    drop(accepted);
    queues.writer_done.send_replace(true);
}

#[cfg(test)]
mod tests {
    //! A session against a raw WebSocket peer that misbehaves on purpose.

    use super::*;
    use crate::handshake::websocket_config;
    use crate::stream::INITIAL_WINDOW;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    type Peer = WebSocketStream<tokio::io::DuplexStream>;

    async fn session_with_raw_peer() -> (Session, mpsc::Receiver<Incoming>, Peer) {
        session_with_config(SessionConfig::default(), 1 << 20).await
    }

    async fn session_with_config(
        config: SessionConfig,
        pipe: usize,
    ) -> (Session, mpsc::Receiver<Incoming>, Peer) {
        let (a, b) = tokio::io::duplex(pipe);
        let ours =
            WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
        let peer =
            WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config())).await;
        let (session, incoming) = Session::start(ours, Side::Agent, config);
        (session, incoming, peer)
    }

    async fn send(peer: &mut Peer, frame: Frame) {
        peer.send(Message::Binary(frame.encode())).await.unwrap();
    }

    fn open(stream: StreamId) -> Frame {
        Frame::Open {
            stream,
            target: Target::AgentPort { port: 80 },
        }
    }

    fn data(stream: StreamId, payload: &'static [u8]) -> Frame {
        Frame::Data {
            stream,
            payload: bytes::Bytes::from_static(payload),
        }
    }

    /// The peer opens `stream`; returns it as the application gets it.
    async fn peer_opens(
        peer: &mut Peer,
        incoming: &mut mpsc::Receiver<Incoming>,
        stream: StreamId,
    ) -> Stream {
        send(peer, open(stream)).await;
        match tokio::time::timeout(Duration::from_secs(10), incoming.recv()).await {
            Ok(Some(Incoming::Stream { stream, .. })) => stream,
            other => panic!("expected stream {stream}, got {other:?}"),
        }
    }

    /// Sends `frames` and expects the tunnel to close with `code` and a
    /// reason containing `words`.
    async fn violation_closes(frames: Vec<Frame>, code: u16, words: &str) {
        let (session, mut incoming, mut peer) = session_with_raw_peer().await;
        let _kept = peer_opens(&mut peer, &mut incoming, 2).await;
        for frame in frames {
            send(&mut peer, frame).await;
        }
        let reason = tokio::time::timeout(Duration::from_secs(10), session.closed())
            .await
            .expect("the tunnel closes");
        assert_eq!(reason.code, Some(code), "{reason}");
        assert!(reason.reason.contains(words), "{reason}");
        assert_ne!(peer_sees_the_end(&mut peer).await, Some(1000));
    }

    #[tokio::test]
    async fn an_empty_data_frame_is_a_violation() {
        violation_closes(vec![data(2, b"")], close_code::MALFORMED, "empty Data").await;
    }

    #[tokio::test]
    async fn a_second_fin_is_a_violation() {
        let fins = vec![Frame::Fin { stream: 2 }, Frame::Fin { stream: 2 }];
        violation_closes(fins, close_code::MALFORMED, "duplicate Fin").await;
    }

    #[tokio::test]
    async fn data_after_fin_is_a_violation() {
        let frames = vec![Frame::Fin { stream: 2 }, data(2, b"late")];
        violation_closes(frames, close_code::MALFORMED, "Data after Fin").await;
    }

    #[tokio::test]
    async fn frames_for_streams_never_opened_are_violations() {
        // The peer's parity, above anything it opened.
        violation_closes(vec![data(6, b"x")], close_code::MALFORMED, "never opened").await;
        // Ours, not handed out yet.
        let credit = Frame::Credit {
            stream: 99,
            bytes: 1,
        };
        violation_closes(vec![credit], close_code::MALFORMED, "never opened").await;
        violation_closes(
            vec![Frame::Reset {
                stream: 0,
                reason: String::new(),
            }],
            close_code::MALFORMED,
            "never opened",
        )
        .await;
    }

    #[tokio::test]
    async fn a_reused_or_decreasing_stream_id_is_a_violation() {
        let reset = Frame::Reset {
            stream: 2,
            reason: "done".into(),
        };
        violation_closes(
            vec![reset, open(2)],
            close_code::MALFORMED,
            "must be even and grow",
        )
        .await;
        violation_closes(
            vec![open(6), open(4)],
            close_code::MALFORMED,
            "invalid stream id 4",
        )
        .await;
    }

    #[tokio::test]
    async fn opened_for_the_peers_own_stream_is_a_violation() {
        let opened = Frame::Opened { stream: 2 };
        violation_closes(vec![opened], close_code::MALFORMED, "which the peer opened").await;
    }

    #[tokio::test]
    async fn credit_beyond_the_window_is_a_violation() {
        let credit = Frame::Credit {
            stream: 2,
            bytes: u32::MAX,
        };
        violation_closes(vec![credit], close_code::FLOW_CONTROL, "beyond the window").await;
    }

    #[tokio::test]
    async fn late_frames_for_ended_streams_are_ignored() {
        let (session, mut incoming, mut peer) = session_with_raw_peer().await;
        let ended = peer_opens(&mut peer, &mut incoming, 2).await;
        ended.reset("the application refused it");
        for frame in [
            data(2, b"in flight"),
            Frame::Fin { stream: 2 },
            Frame::Fin { stream: 2 },
            Frame::Credit {
                stream: 2,
                bytes: 10,
            },
            Frame::Reset {
                stream: 2,
                reason: "crossed".into(),
            },
        ] {
            send(&mut peer, frame).await;
        }
        let _next = peer_opens(&mut peer, &mut incoming, 4).await;
        assert!(!session.is_closed());
        assert_eq!(session.stats().streams, 1, "no state kept for stream 2");
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_reset_with_a_reason_either_way() {
        let config = SessionConfig {
            max_streams: 2,
            ..SessionConfig::default()
        };
        let (session, mut incoming, mut peer) = session_with_config(config, 1 << 20).await;
        let _a = peer_opens(&mut peer, &mut incoming, 2).await;
        let _b = session.open(Target::AgentPort { port: 1 }).unwrap();
        // The peer's third stream: reset on the wire.
        send(&mut peer, open(4)).await;
        let reset = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(Ok(Message::Binary(bytes))) = peer.next().await {
                    if let Ok(Frame::Reset { stream: 4, reason }) = Frame::decode(bytes) {
                        return reason;
                    }
                }
            }
        })
        .await
        .expect("stream 4 is reset");
        assert!(reset.contains("too many streams"), "{reset}");
        // This side's third stream: refused before it reaches the wire.
        let mut refused = session.open(Target::AgentPort { port: 1 }).unwrap();
        let reason = refused.opened().await.unwrap_err();
        assert!(
            reason.contains("too many streams on this tunnel (limit 2)"),
            "{reason}"
        );
        assert_eq!(session.stats().streams, 2);
        assert!(!session.is_closed());
    }

    #[tokio::test]
    async fn windows_add_up_to_the_receive_budget() {
        let config = SessionConfig {
            max_streams: 8,
            receive_budget: 8 * INITIAL_WINDOW as usize + 2 * 1024 * 1024,
            window: 1024 * 1024,
            ..SessionConfig::default()
        };
        let budget = config.receive_budget;
        let (session, mut incoming, mut peer) = session_with_config(config, 1 << 20).await;
        let mut streams = Vec::new();
        for id in (2..=16).step_by(2) {
            streams.push(peer_opens(&mut peer, &mut incoming, id).await);
        }
        let stats = session.stats();
        assert_eq!(stats.streams, 8);
        // Two streams fit the widening part of the budget, six keep the initial window.
        assert_eq!(stats.granted, 2 * 1024 * 1024 + 6 * INITIAL_WINDOW as usize);
        assert!(stats.granted <= budget);
        // A finished stream gives its widening back to the next one.
        drop(streams.remove(0));
        let _next = peer_opens(&mut peer, &mut incoming, 18).await;
        assert_eq!(session.stats().granted, stats.granted);
    }

    #[tokio::test]
    async fn stream_ids_are_never_reused() {
        let (session, _incoming, _peer) = session_with_raw_peer().await;
        session.inner.state.lock().unwrap().next_stream = u32::MAX - 2;
        let last = session.open(Target::AgentPort { port: 1 }).unwrap();
        assert_eq!(last.id(), u32::MAX - 2);
        let err = session.open(Target::AgentPort { port: 1 }).unwrap_err();
        assert_eq!(err.0.code, Some(close_code::OVERLOADED), "{err}");
        assert!(err.0.reason.contains("stream ids"), "{err}");
        assert!(session.is_closed());
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_cannot_grow_the_control_queue() {
        // Every stream the peer opens is refused (limit 0), so each Open
        // makes this side queue a Reset the peer never reads.
        let config = SessionConfig {
            max_streams: 0,
            ..SessionConfig::default()
        };
        let (session, _incoming, peer) = session_with_config(config, 64 * 1024).await;
        let (mut sink, _unread) = peer.split();
        let flood = async {
            for id in (2..).step_by(2).take(4 * CONTROL_QUEUE) {
                if sink.send(Message::Binary(open(id).encode())).await.is_err() {
                    break;
                }
            }
        };
        let reason = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                _ = flood => session.closed().await,
                reason = session.closed() => reason,
            }
        })
        .await
        .expect("the tunnel closes");
        assert_eq!(reason.code, Some(close_code::OVERLOADED), "{reason}");
    }

    /// Two sessions over a pipe, the agent echoing every stream the
    /// client opens; over WebSocket or over records.
    async fn echoing_pair(config: SessionConfig, records: bool) -> Session {
        let (a, b) = tokio::io::duplex(1 << 20);
        if records {
            let (client, agent) = tokio::join!(crate::link::client(b), crate::link::accept(a));
            echo_over(agent.unwrap(), client.unwrap(), config)
        } else {
            let agent =
                WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
            let client =
                WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config())).await;
            echo_over(agent, client, config)
        }
    }

    fn echo_over(agent: impl Link, client: impl Link, config: SessionConfig) -> Session {
        let (_agent, mut incoming) = Session::start(agent, Side::Agent, config.clone());
        tokio::spawn(async move {
            while let Some(Incoming::Stream { stream, .. }) = incoming.recv().await {
                stream.accept();
                let (here, there) = tokio::io::duplex(64 * 1024);
                let (r, w) = tokio::io::split(here);
                tokio::spawn(stream.bridge(r, w));
                let (mut r, mut w) = tokio::io::split(there);
                tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await });
            }
        });
        Session::start(client, Side::Client, config).0
    }

    #[tokio::test]
    async fn narrow_windows_never_stall_whatever_the_write_sizes() {
        narrow_windows_never_stall_over(false).await;
    }

    #[tokio::test]
    async fn narrow_windows_never_stall_over_records() {
        narrow_windows_never_stall_over(true).await;
    }

    async fn narrow_windows_never_stall_over(records: bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // No widening: every stream keeps INITIAL_WINDOW, where a chunk
        // larger than three quarters of the window could wait for credit
        // the receiver holds back below its return threshold.
        let config = SessionConfig {
            max_streams: 4,
            receive_budget: 4 * INITIAL_WINDOW as usize,
            ..SessionConfig::default()
        };
        let session = echoing_pair(config, records).await;
        let stream = session.open(Target::AgentPort { port: 1 }).unwrap();
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (r, w) = tokio::io::split(theirs);
        tokio::spawn(stream.bridge(r, w));
        let (mut reader, mut writer) = tokio::io::split(ours);
        let sizes = [
            10_000, 65_531, 3, 40_000, 65_531, 16_383, 65_531, 1, 50_000, 65_531,
        ];
        let total: usize = sizes.iter().sum::<usize>() * 20;
        let writes = tokio::spawn(async move {
            for round in 0..20 {
                for (i, size) in sizes.iter().enumerate() {
                    writer
                        .write_all(&vec![(round + i) as u8; *size])
                        .await
                        .unwrap();
                    if i % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            writer.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut echoed))
            .await
            .expect("the stream never stalls")
            .unwrap();
        writes.await.unwrap();
        assert_eq!(echoed.len(), total);
    }

    /// Bridges `stream` to a pipe and echoes `bytes` through it; returns
    /// the pipe's ends, so the stream stays open for more.
    async fn echo_through(
        stream: Stream,
        bytes: usize,
    ) -> (
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    ) {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (r, w) = tokio::io::split(theirs);
        tokio::spawn(stream.bridge(r, w));
        let (mut reader, mut writer) = tokio::io::split(ours);
        echo_more(&mut reader, &mut writer, bytes).await;
        (reader, writer)
    }

    async fn echo_more(
        reader: &mut (impl tokio::io::AsyncRead + Unpin),
        writer: &mut (impl tokio::io::AsyncWrite + Unpin),
        bytes: usize,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let chunk = vec![7u8; 64 * 1024];
        let write = async {
            for _ in 0..bytes / chunk.len() {
                writer.write_all(&chunk).await.unwrap();
            }
        };
        let mut back = vec![0u8; bytes / chunk.len() * chunk.len()];
        let read = reader.read_exact(&mut back);
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .expect("the echo never stalls")
            .1
            .unwrap();
    }

    #[tokio::test]
    async fn a_stream_alone_widens_and_narrows_back_beside_another() {
        let kib = 1024;
        let config = SessionConfig {
            window: 256 * kib,
            lone_window: 1024 * kib,
            ..SessionConfig::default()
        };
        let session = echoing_pair(config, true).await;
        let bulk = session.open(Target::AgentPort { port: 1 }).unwrap();
        let (mut bulk_r, mut bulk_w) = echo_through(bulk, 8 * 1024 * kib as usize).await;
        assert_eq!(
            session.stats().granted,
            1024 * kib as usize,
            "the only stream with data widens to lone_window"
        );

        let requests = session.open(Target::AgentPort { port: 1 }).unwrap();
        let (mut req_r, mut req_w) = echo_through(requests, 64 * kib as usize).await;
        for _ in 0..16 {
            echo_more(&mut req_r, &mut req_w, 64 * kib as usize).await;
            echo_more(&mut bulk_r, &mut bulk_w, 512 * kib as usize).await;
        }
        assert_eq!(
            session.stats().granted,
            2 * 256 * kib as usize,
            "beside a stream carrying data, the bulk stream narrows back to window"
        );
    }

    proptest::proptest! {
        /// Any sequence of frames, valid or not, keeps the session within
        /// its bounds (checked after every frame by `dispatch_for_fuzzing`).
        #[test]
        fn arbitrary_frame_sequences_stay_bounded(
            frames in proptest::collection::vec(fuzz_frame(), 0..64),
            side in proptest::prop_oneof![proptest::strategy::Just(Side::Agent), proptest::strategy::Just(Side::Client)],
        ) {
            let config = SessionConfig {
                max_streams: 3,
                receive_budget: 3 * INITIAL_WINDOW as usize + 300_000,
                window: 200_000,
                incoming_queue: 2,
                ..SessionConfig::default()
            };
            dispatch_for_fuzzing(side, config, &frames);
        }
    }

    /// Frames on a handful of stream ids, so that sequences hit live streams.
    fn fuzz_frame() -> impl proptest::strategy::Strategy<Value = bytes::Bytes> {
        use proptest::prelude::*;
        let id = 0u32..12;
        prop_oneof![
            id.clone().prop_map(|stream| open(stream).encode()),
            (id.clone(), 0usize..70_000).prop_map(|(stream, len)| Frame::Data {
                stream,
                payload: vec![7u8; len].into()
            }
            .encode()),
            id.clone().prop_map(|stream| Frame::Fin { stream }.encode()),
            id.clone()
                .prop_map(|stream| Frame::Opened { stream }.encode()),
            id.clone().prop_map(|stream| Frame::Reset {
                stream,
                reason: "r".into()
            }
            .encode()),
            (id, any::<u32>()).prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }.encode()),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(bytes::Bytes::from),
        ]
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
