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
//! them. Bytes from the tunnel go out as one data frame per WebSocket
//! message, up to [`MESSAGE`] bytes, read into a buffer with room in front
//! for both heads and written from it (the WebSocket framing is ktb's own,
//! [`super::websocket`]); the server's frames come back cut anywhere and
//! [`frame::Deframer`] puts them together. The server's pings, SPDY's and
//! the WebSocket's, are answered. The Kubernetes servers keep no SPDY
//! flow-control windows, so neither does ktb: TCP's backpressure is the
//! only one.

mod frame;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use self::frame::{Deframer, Event, HeaderBlocks, HEAD_LEN};
use super::websocket::{self, Incoming, HEAD_ROOM};
use super::MESSAGE;

/// The client's streams are odd; kubectl's first port uses 1 and 3.
const ERROR_STREAM: u32 = 1;
const DATA_STREAM: u32 = 3;
/// The most of the pod side's error text kept for the log.
const MAX_ERROR_TEXT: usize = 4096;
/// Answers to the server's pings (SPDY's and the WebSocket's) waiting to
/// be written: it sends one every few seconds.
const ANSWERS_QUEUED: usize = 4;
/// Where the tunnel's bytes start in a message's buffer: after room for
/// the WebSocket head and the SPDY data frame's head.
const PAYLOAD_AT: usize = HEAD_ROOM + HEAD_LEN;
/// Room made in the read buffer before each read from the connection:
/// more than the 16 KiB of plaintext one TLS record carries.
const READ_AHEAD: usize = 64 * 1024;

/// Moves bytes between the pipe and the port-forward until either side
/// ends; then both are dropped, which the tunnel sees as a lost connection.
pub(super) async fn pump<S>(socket: S, pipe: DuplexStream, port: u16, pod: String)
where
    S: AsyncRead + AsyncWrite,
{
    let (from_pod_socket, to_pod_socket) = tokio::io::split(socket);
    let (from_tunnel, to_tunnel) = tokio::io::split(pipe);
    let (answers, answers_rx) = mpsc::channel(ANSWERS_QUEUED);
    tokio::select! {
        _ = to_pod(to_pod_socket, from_tunnel, answers_rx, port) => {}
        _ = from_pod(from_pod_socket, to_tunnel, answers, &pod) => {}
    }
}

/// Writes the opening, then each read from the tunnel as one data frame
/// in one WebSocket message, and the answers to the server's pings between
/// them.
async fn to_pod<W: AsyncWrite + Unpin>(
    mut socket: W,
    mut from_tunnel: ReadHalf<DuplexStream>,
    mut answers: mpsc::Receiver<Bytes>,
    port: u16,
) {
    let mut next = websocket::binary_copy(&opening(port));
    loop {
        if socket.write_all(&next).await.is_err() || socket.flush().await.is_err() {
            return;
        }
        let mut message = BytesMut::with_capacity(PAYLOAD_AT + MESSAGE);
        message.resize(PAYLOAD_AT, 0);
        next = tokio::select! {
            read = from_tunnel.read_buf(&mut message) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    message[HEAD_ROOM..PAYLOAD_AT]
                        .copy_from_slice(&frame::data_head(DATA_STREAM, false, n));
                    websocket::binary(message)
                }
            },
            Some(answer) = answers.recv() => answer,
        };
    }
}

/// Reads the server's frames, passing the data stream's bytes to the
/// tunnel and the pings to [`to_pod`] to answer, until the data stream or
/// the connection ends.
async fn from_pod<R: AsyncRead + Unpin>(
    mut socket: R,
    mut to_tunnel: WriteHalf<DuplexStream>,
    answers: mpsc::Sender<Bytes>,
    pod: &str,
) {
    let mut frames = websocket::Decoder::default();
    let mut deframer = Deframer::default();
    let mut buffer = BytesMut::new();
    let mut events = Vec::new();
    let mut error_text = Vec::new();
    'connection: loop {
        let bytes = match frames.decode(&mut buffer) {
            Ok(Some(Incoming::Data(bytes))) => bytes,
            Ok(Some(Incoming::Ping(payload))) => {
                if answers.send(websocket::pong(&payload)).await.is_err() {
                    break;
                }
                continue;
            }
            Ok(Some(Incoming::Close)) => break,
            Ok(None) => {
                buffer.reserve(READ_AHEAD);
                match socket.read_buf(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            Err(e) => {
                tracing::warn!(%pod, error = %e, "port-forward: not a WebSocket");
                break;
            }
        };
        if let Err(e) = deframer.feed(bytes, &mut events) {
            tracing::warn!(%pod, error = %e, "port-forward: not SPDY/3");
            break;
        }
        for event in events.drain(..) {
            match event {
                Event::Data {
                    stream: DATA_STREAM,
                    bytes,
                } => {
                    if to_tunnel.write_all(&bytes).await.is_err() {
                        break 'connection;
                    }
                }
                Event::Data {
                    stream: ERROR_STREAM,
                    bytes,
                } => {
                    let room = MAX_ERROR_TEXT.saturating_sub(error_text.len());
                    error_text.extend_from_slice(&bytes[..room.min(bytes.len())]);
                }
                Event::Ping { id } if id % 2 == 0 => {
                    let answer = websocket::binary_copy(&frame::ping(id));
                    if answers.send(answer).await.is_err() {
                        break 'connection;
                    }
                }
                Event::Finished {
                    stream: DATA_STREAM,
                }
                | Event::GoAway { .. } => break 'connection,
                Event::Reset { stream, status } => {
                    tracing::warn!(%pod, stream, status, "port-forward: the server reset a stream");
                    break 'connection;
                }
                Event::Data { .. } | Event::Ping { .. } | Event::Finished { .. } => {}
            }
        }
    }
    if !error_text.is_empty() {
        let error = String::from_utf8_lossy(&error_text);
        tracing::warn!(%pod, %error, "port-forward error");
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

    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

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

    // The pump against a stand-in server that reads its frames with the
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
    async fn bytes_cross_both_ways_pings_are_answered_and_fin_ends_the_pipe() {
        let (client, mut server) = super::super::loopback::websocket().await;
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(pump(client, theirs, 8080, "web-0".into()));
        let mut deframer = Deframer::default();
        // The opening: nothing in it but stream 1's empty, finishing frame.
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Finished {
                stream: ERROR_STREAM
            }]
        );

        ours.write_all(b"hello").await.unwrap();
        let sent = read(&mut server, &mut deframer).await;
        assert_eq!(
            sent,
            [Event::Data {
                stream: DATA_STREAM,
                bytes: Bytes::from_static(b"hello")
            }]
        );

        server.send(Message::Binary(frame::ping(2))).await.unwrap();
        assert_eq!(
            read(&mut server, &mut deframer).await,
            [Event::Ping { id: 2 }]
        );

        server
            .send(Message::Ping(Bytes::from_static(b"beat")))
            .await
            .unwrap();
        let answer = server.next().await;
        assert!(
            matches!(&answer, Some(Ok(Message::Pong(payload))) if payload.as_ref() == b"beat"),
            "the WebSocket ping was answered with {answer:?}"
        );

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
            "the pipe did not end after FIN: {end:?}"
        );
    }

    #[tokio::test]
    async fn a_bulk_stream_crosses_whole_both_ways() {
        const LEN: usize = 3 << 20;
        let (client, mut server) = super::super::loopback::websocket().await;
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(pump(client, theirs, 8080, "web-0".into()));
        let sent: Vec<u8> = (0..LEN).map(|i| (i * 31 + i / 4093) as u8).collect();
        let (mut ours_read, mut ours_write) = tokio::io::split(ours);
        let upload = async {
            ours_write.write_all(&sent).await.unwrap();
        };
        let server_side = async {
            let mut deframer = Deframer::default();
            let mut arrived = Vec::new();
            while arrived.len() < LEN {
                for event in read(&mut server, &mut deframer).await {
                    if let Event::Data {
                        stream: DATA_STREAM,
                        bytes,
                    } = event
                    {
                        arrived.extend_from_slice(&bytes);
                    }
                }
            }
            // Back in messages longer than a 16-bit length describes.
            for piece in sent.chunks(100 * 1024) {
                server.send(data(DATA_STREAM, false, piece)).await.unwrap();
            }
            arrived
        };
        let download = async {
            let mut back = vec![0; LEN];
            ours_read.read_exact(&mut back).await.unwrap();
            back
        };
        let run = async { tokio::join!(upload, server_side, download) };
        let ((), arrived, back) = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("3 MiB each way took over 30 s");
        assert!(arrived == sent, "the upload arrived changed");
        assert!(back == sent, "the download arrived changed");
    }
}
