//! The port-forward spoken as SPDY/3.1 inside the WebSocket
//! (`SPDY/3.1+portforward.k8s.io`, Kubernetes 1.30 and later), as kubectl
//! speaks it.
//!
//! Why not the simpler channel protocol: the apiserver passes SPDY's bytes
//! through to the container runtime's SPDY server, which streams them,
//! while the runtime's handler for channel messages (containerd's, at
//! least) reads each message whole into a slice grown step by step and
//! unmasks it byte by byte. On the test cluster that handler alone cost
//! 3.7 CPU seconds per GiB of tunnel traffic, against 1.7 for kubectl's
//! SPDY (README, "Performance").
//!
//! One port, kubectl's layout: stream 1 carries the pod side's error text
//! (ktb sends nothing on it), stream 3 the port's bytes; both carry the
//! port and request id 0 in their headers, which is how the server pairs
//! them. The server keeps no SPDY flow-control windows, so neither does
//! ktb: TCP's backpressure is the only one.
//!
//! [`SpdyStream`] is the data stream as a byte stream, with no task or
//! buffer of its own between the tunnel and the WebSocket: each write goes
//! out as one data frame in one WebSocket message (up to [`MESSAGE`]
//! bytes), and reads take the server's frames apart with
//! [`frame::Deframer`] as the tunnel asks for bytes. A pipe and a pump task
//! in between cost the CLI two more copies of every byte and a task wake-up
//! per message each way.
//!
//! The server's pings are answered on the writing side, with the tunnel's
//! next write or flush (its keepalive writes every few seconds): answering
//! from a read would register the reader as the WebSocket's write waker and
//! could leave the tunnel's writer waiting for a wake-up that never comes.
//! The Kubernetes ping loop only logs a late answer.

mod frame;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use self::frame::{Deframer, Event, HeaderBlocks, HEAD_LEN};
use super::MESSAGE;

/// The client's streams are odd; kubectl's first port uses 1 and 3.
const ERROR_STREAM: u32 = 1;
const DATA_STREAM: u32 = 3;
/// The most of the pod side's error text kept for the log.
const MAX_ERROR_TEXT: usize = 4096;

/// One port-forward's data stream, read and written in place.
pub struct SpdyStream<S> {
    ws: WebSocketStream<S>,
    deframer: Deframer,
    /// Data payloads read from the server and not yet handed to the
    /// tunnel, oldest first; what one WebSocket message held, at most.
    unread: VecDeque<Bytes>,
    /// The id of the server's latest ping, until it is answered.
    pong: Option<u32>,
    /// Why reading ended, once it has: the data stream finished, the
    /// connection went away or was reset. Reads then return end of file.
    ended: Option<String>,
    /// The pod side's error text (stream 1), logged when reading ends.
    error_text: Vec<u8>,
    /// Named in the log.
    pod: String,
}

impl<S> SpdyStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Opens the error and data streams for `port`; the stream is ready
    /// for bytes once the opening is on its way.
    pub(super) async fn open(
        mut ws: WebSocketStream<S>,
        port: u16,
        pod: String,
    ) -> io::Result<Self> {
        ws.send(Message::Binary(opening(port)))
            .await
            .map_err(websocket_error)?;
        Ok(SpdyStream {
            ws,
            deframer: Deframer::default(),
            unread: VecDeque::new(),
            pong: None,
            ended: None,
            error_text: Vec::new(),
            pod,
        })
    }

    /// Takes in one message from the server.
    fn take(&mut self, bytes: Bytes) {
        let mut events = Vec::new();
        if let Err(e) = self.deframer.feed(bytes, &mut events) {
            self.end(format!("not SPDY/3: {e}"));
            return;
        }
        for event in events {
            match event {
                Event::Data {
                    stream: DATA_STREAM,
                    bytes,
                } => self.unread.push_back(bytes),
                Event::Data {
                    stream: ERROR_STREAM,
                    bytes,
                } => {
                    let room = MAX_ERROR_TEXT.saturating_sub(self.error_text.len());
                    self.error_text
                        .extend_from_slice(&bytes[..room.min(bytes.len())]);
                }
                Event::Ping { id } if id % 2 == 0 => self.pong = Some(id),
                Event::Finished {
                    stream: DATA_STREAM,
                } => self.end("the pod side finished the data stream".into()),
                Event::GoAway { status } => {
                    self.end(format!("the server went away (status {status})"))
                }
                Event::Reset { stream, status } => self.end(format!(
                    "the server reset stream {stream} (status {status})"
                )),
                Event::Data { .. } | Event::Ping { .. } | Event::Finished { .. } => {}
            }
        }
    }

    /// Reading is over; says why in the log, with the pod side's error text.
    fn end(&mut self, why: String) {
        if self.ended.is_some() {
            return;
        }
        if self.error_text.is_empty() {
            tracing::debug!(pod = %self.pod, "port-forward ended: {why}");
        } else {
            let error = String::from_utf8_lossy(&self.error_text);
            tracing::warn!(pod = %self.pod, %error, "port-forward error ({why})");
        }
        self.ended = Some(why);
    }

    /// Queues the answer to the server's ping, if one is due, ahead of
    /// whatever is written next.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(id) = self.pong {
            ready!(self.ws.poll_ready_unpin(cx)).map_err(websocket_error)?;
            self.ws
                .start_send_unpin(Message::Binary(frame::ping(id)))
                .map_err(websocket_error)?;
            self.pong = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S> AsyncRead for SpdyStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(front) = this.unread.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    this.unread.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended.is_some() {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.take(bytes),
                Some(Ok(Message::Close(_))) | None => {
                    this.end("the apiserver closed the WebSocket".into())
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    this.end(format!("the WebSocket failed: {e}"));
                    return Poll::Ready(Err(websocket_error(e)));
                }
            }
        }
    }
}

impl<S> AsyncWrite for SpdyStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        ready!(this.ws.poll_ready_unpin(cx)).map_err(websocket_error)?;
        let n = buf.len().min(MESSAGE);
        let mut message = BytesMut::with_capacity(HEAD_LEN + n);
        message.put_slice(&frame::data_head(DATA_STREAM, false, n));
        message.put_slice(&buf[..n]);
        this.ws
            .start_send_unpin(Message::Binary(message.freeze()))
            .map_err(websocket_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.ws)
            .poll_flush(cx)
            .map_err(websocket_error)
    }

    /// Closes the WebSocket, which ends the forward on the server: it
    /// passes no half-close on to the pod (README, `ktb forward`).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.ws)
            .poll_close(cx)
            .map_err(websocket_error)
    }
}

fn websocket_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// The connection's first message: the error stream opened and at once
/// finished on ktb's side (it only listens), then the data stream.
fn opening(port: u16) -> bytes::Bytes {
    let port = port.to_string();
    let headers = |kind| {
        [
            ("streamtype", kind),
            ("port", port.as_str()),
            ("requestid", "0"),
        ]
    };
    let mut blocks = HeaderBlocks::default();
    let mut opening = BytesMut::new();
    opening.put(blocks.syn_stream(ERROR_STREAM, &headers("error")));
    opening.put_slice(&frame::finish(ERROR_STREAM));
    opening.put(blocks.syn_stream(DATA_STREAM, &headers("data")));
    opening.freeze()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What Go's SPDY framer (moby/spdystream v0.5.0, which containerd and
    /// kubelet serve port-forwards with) reads as SYN_STREAM 1 {streamtype:
    /// error, port: 8080, requestid: 0}, an empty data frame finishing
    /// stream 1, and SYN_STREAM 3 {streamtype: data, port: 8080, requestid:
    /// 0}: checked once with a Go program reading these bytes through
    /// `spdy.NewFramer(...).ReadFrame()`.
    const OPENING_8080: &str = "\
        8003000100000053000000010000000000007801003d00c2ff000000030000000a73747265616d74797065\
        000000056572726f7200000004706f72740000000438303830000000097265717565737469640000000130\
        000000ffff0000000101000000800300010000005000000003000000000000003c00c3ff000000030000000a\
        73747265616d74797065000000046461746100000004706f7274000000043830383000000009726571756573\
        7469640000000130000000ffff";

    #[test]
    fn the_opening_is_what_go_s_spdy_framer_reads_as_kubectl_s_streams() {
        let hex: String = opening(8080).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, OPENING_8080);
    }

    // The stream against a stand-in server that reads its frames with the
    // same deframer (a client's SYN_STREAMs are control frames it skips).

    /// The next events the server reads, at least one.
    async fn read<S>(
        server: &mut tokio_tungstenite::WebSocketStream<S>,
        deframer: &mut Deframer,
    ) -> Vec<Event>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut events = Vec::new();
        while events.is_empty() {
            let Some(Ok(Message::Binary(bytes))) = server.next().await else {
                panic!("the pump's side ended");
            };
            deframer.feed(bytes, &mut events).unwrap();
        }
        events
    }

    fn data(stream: u32, fin: bool, payload: &[u8]) -> Message {
        let mut frame = frame::data_head(stream, fin, payload.len()).to_vec();
        frame.extend_from_slice(payload);
        Message::Binary(frame.into())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_pings_are_answered_and_fin_ends_the_stream() {
        let (client, mut server) = super::super::loopback::websocket().await;
        let open = SpdyStream::open(client, 8080, "web-0".into());
        let mut ours = tokio::time::timeout(Duration::from_secs(5), open)
            .await
            .unwrap()
            .unwrap();
        let mut deframer = Deframer::default();
        // The opening: nothing in it but stream 1's empty, finishing frame.
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Finished {
                stream: ERROR_STREAM
            }]
        );

        ours.write_all(b"hello").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Data {
                stream: DATA_STREAM,
                bytes: Bytes::from_static(b"hello")
            }]
        );

        server.send(Message::Binary(frame::ping(2))).await.unwrap();
        server
            .send(data(ERROR_STREAM, false, b"not for the tunnel"))
            .await
            .unwrap();
        server.send(data(DATA_STREAM, false, b"wor")).await.unwrap();
        server.send(data(DATA_STREAM, true, b"ld")).await.unwrap();
        let mut back = [0; 5];
        ours.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"world");
        let end = tokio::time::timeout(Duration::from_secs(5), ours.read(&mut back)).await;
        assert!(
            matches!(end, Ok(Ok(0))),
            "reading did not end after FIN: {end:?}"
        );

        // The ping read on the way is answered ahead of the next write.
        ours.write_all(b"!").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Ping { id: 2 }]
        );
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Data {
                stream: DATA_STREAM,
                bytes: Bytes::from_static(b"!")
            }]
        );
    }
}
