//! The link under a tunnel: how its messages cross a byte stream.
//!
//! A tunnel is a sequence of messages: binary frames ([`crate::codec`]),
//! pings, pongs and one closing message with a code and a reason. The
//! session and the handshake are written once, for any [`Link`], and two
//! kinds of link carry them:
//!
//! - **WebSocket**, on a connection the laptop makes to the agent itself
//!   (`--transport direct`): a real WebSocket passes the proxies and load
//!   balancers a developer may have on the way.
//! - **Records** ([`Records`]), through the apiserver's port-forward. That
//!   already is a reliable byte stream inside a WebSocket of its own; a
//!   second WebSocket inside it would mask, unmask and parse every byte once
//!   more, on both ends, for nothing.
//!
//! # Records
//!
//! Each message is a record: kind u8, body length u32 (big-endian, at most
//! [`MAX_FRAME_LEN`]), body.
//!
//! | kind | message | body |
//! |------|---------|------|
//! | 0    | binary  | one tunnel frame |
//! | 1    | ping    | opaque |
//! | 2    | pong    | opaque |
//! | 3    | close   | empty, or code u16 and a UTF-8 reason |
//!
//! Both sides ping on their own schedule, so each hears the other without
//! pongs; a pong is accepted and ignored.
//!
//! A records link opens with a preamble each way, so that the link itself
//! is versioned apart from the protocol the handshake negotiates inside it:
//! the client sends [`MAGIC`] and the range of link versions it speaks
//! (min u16, max u16); the agent answers [`MAGIC`] and the version it picked,
//! or 0 followed by a close record naming both ranges. The client sends its
//! first frame right behind its preamble, so the preamble costs no round
//! trip. The first byte of [`MAGIC`] can never start an HTTP request: the
//! agent tells a records link from a WebSocket upgrade on the same port by
//! one byte. An agent older than records answers the preamble with an HTTP
//! error; the client reports that as a release mismatch, as the agent's
//! close message, so that every refusal reaches the user the same way.

use std::io;

use bytes::{Buf, BufMut, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::wire::MAX_FRAME_LEN;

/// Anything that carries a tunnel's messages both ways: a WebSocket, or
/// [`Records`] over a byte stream.
pub trait Link:
    Sink<Message, Error = tungstenite::Error>
    + Stream<Item = Result<Message, tungstenite::Error>>
    + Unpin
    + Send
    + 'static
{
}

impl<T> Link for T where
    T: Sink<Message, Error = tungstenite::Error>
        + Stream<Item = Result<Message, tungstenite::Error>>
        + Unpin
        + Send
        + 'static
{
}

/// Close codes (WebSocket's private range 4000–4999) a side ends a link
/// with, beside its reason.
pub mod close_code {
    /// The client could not prove it holds the session's private key.
    pub const UNAUTHORIZED: u16 = 4001;
    /// No protocol version in common.
    pub const VERSION_MISMATCH: u16 = 4002;
    /// The peer sent something that is not a valid frame at this point.
    pub const MALFORMED: u16 = 4003;
    /// The peer went silent for longer than the keepalive timeout.
    pub const DEAD_PEER: u16 = 4004;
    /// A newer client attached to the agent and replaced this one.
    pub const REPLACED: u16 = 4005;
    /// The peer sent more data on a stream than its credit allowed.
    pub const FLOW_CONTROL: u16 = 4006;
    /// The agent is shutting down.
    pub const SHUTDOWN: u16 = 4007;
    /// This side ran out of a bounded resource the peer kept filling (its
    /// queue of control frames to send, or stream ids); reconnecting helps.
    pub const OVERLOADED: u16 = 4008;
    /// Standard WebSocket code: this side failed on its own (no randomness).
    pub const INTERNAL: u16 = 1011;
}

/// A close frame, its reason cut to the 123 bytes WebSocket allows.
pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    const MAX_CLOSE_REASON: usize = 123;
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    }
}

/// Opens a records link's preamble. 0xFF starts no HTTP method.
pub const MAGIC: [u8; 4] = [0xFF, b'k', b't', b'b'];
/// The records link this release speaks, and the oldest it accepts.
pub const LINK_VERSION: u16 = 1;
pub const MIN_LINK_VERSION: u16 = 1;
/// The client's preamble: magic, min version, max version.
pub const CLIENT_PREAMBLE_LEN: usize = MAGIC.len() + 4;
/// The agent's preamble: magic, chosen version (0: none).
const AGENT_PREAMBLE_LEN: usize = MAGIC.len() + 2;
const HEADER_LEN: usize = 5;
/// The most the read buffer grows for one pending record: a data frame
/// (48 KiB payload by default) and its header fit.
const READ_STEP: usize = 64 * 1024;
/// Encoded records are written out once this many bytes wait: several
/// frames per write, and never much more than one port-forward message.
const WRITE_BATCH: usize = 256 * 1024;

mod kind {
    pub const BINARY: u8 = 0;
    pub const PING: u8 = 1;
    pub const PONG: u8 = 2;
    pub const CLOSE: u8 = 3;
}

/// A tunnel's messages as records on a byte stream (see the module docs).
pub type Records<S> = Framed<S, RecordCodec>;

/// Client side: sends the preamble and returns the link at once; the
/// agent's answer is checked as the first thing read.
pub async fn client<S>(mut io: S) -> io::Result<Records<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preamble = BytesMut::with_capacity(CLIENT_PREAMBLE_LEN);
    preamble.put_slice(&MAGIC);
    preamble.put_u16(MIN_LINK_VERSION);
    preamble.put_u16(LINK_VERSION);
    io.write_all(&preamble).await?;
    Ok(framed(io, Preamble::Expected))
}

/// Agent side, once the first byte was [`MAGIC`]'s: reads the client's
/// preamble and answers it. A client whose range misses ours gets a close
/// record that says so, and an error comes back.
pub async fn accept<S>(mut io: S) -> io::Result<Records<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preamble = [0; CLIENT_PREAMBLE_LEN];
    io.read_exact(&mut preamble).await?;
    if preamble[..MAGIC.len()] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a ktb records link: wrong magic",
        ));
    }
    let min = u16::from_be_bytes([preamble[4], preamble[5]]);
    let max = u16::from_be_bytes([preamble[6], preamble[7]]);
    let mut answer = BytesMut::with_capacity(AGENT_PREAMBLE_LEN);
    answer.put_slice(&MAGIC);
    let Some(chosen) = highest_common_version((MIN_LINK_VERSION, LINK_VERSION), (min, max)) else {
        let reason = format!(
            "link version mismatch: client speaks {min}..={max}, agent \
             {MIN_LINK_VERSION}..={LINK_VERSION}; use CLI and agent of one release"
        );
        answer.put_u16(0);
        let close = Message::Close(Some(close_frame(close_code::VERSION_MISMATCH, &reason)));
        RecordCodec::default()
            .encode(close, &mut answer)
            .map_err(io::Error::other)?;
        io.write_all(&answer).await?;
        let _ = io.shutdown().await;
        return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
    };
    answer.put_u16(chosen);
    io.write_all(&answer).await?;
    Ok(framed(io, Preamble::Done))
}

/// The highest version in both inclusive ranges (min, max), if any; a
/// range whose min exceeds its max holds none. The handshake picks its
/// protocol version this way too.
pub(crate) fn highest_common_version(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let chosen = theirs.1.min(ours.1);
    (theirs.0 <= theirs.1 && chosen >= theirs.0.max(ours.0)).then_some(chosen)
}

fn framed<S: AsyncRead + AsyncWrite>(io: S, preamble: Preamble) -> Records<S> {
    let mut framed = Framed::new(io, RecordCodec { preamble });
    framed.set_backpressure_boundary(WRITE_BATCH);
    framed
}

/// Where the reading side stands with the agent's preamble.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Preamble {
    /// Client side, before the agent's preamble was read.
    Expected,
    /// Read (client), or never expected (agent).
    #[default]
    Done,
    /// The peer is no records agent: its refusal was reported as a close
    /// message, and whatever else it sends is dropped.
    Refused,
}

/// Encodes and decodes records; see the module docs.
#[derive(Debug, Default)]
pub struct RecordCodec {
    preamble: Preamble,
}

impl RecordCodec {
    /// Checks the agent's preamble; `Some` is the refusal to report.
    fn read_preamble(&mut self, src: &mut BytesMut) -> Option<Message> {
        let refusal = if src[..MAGIC.len()] != MAGIC {
            // Close reasons hold 123 bytes: the status line, cut, fits.
            let answer = String::from_utf8_lossy(&src[..src.len().min(32)]).into_owned();
            let answer = answer.lines().next().unwrap_or_default().to_owned();
            if answer.starts_with("HTTP/") {
                Some(format!(
                    "the agent is older than this CLI ({answer}); \
                     use an agent image of this CLI's release"
                ))
            } else {
                Some("the agent's answer is not a ktb records link".to_owned())
            }
        } else {
            let version = u16::from_be_bytes([src[4], src[5]]);
            src.advance(AGENT_PREAMBLE_LEN);
            // Version 0: the agent's close record that follows says why.
            (version > LINK_VERSION)
                .then(|| format!("the agent picked link version {version}, which this CLI lacks"))
        };
        self.preamble = Preamble::Done;
        refusal.map(|reason| {
            self.preamble = Preamble::Refused;
            src.clear();
            Message::Close(Some(close_frame(close_code::VERSION_MISMATCH, &reason)))
        })
    }
}

impl Decoder for RecordCodec {
    type Item = Message;
    type Error = tungstenite::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, tungstenite::Error> {
        match self.preamble {
            Preamble::Refused => {
                src.clear();
                return Ok(None);
            }
            Preamble::Expected if src.len() < AGENT_PREAMBLE_LEN => return Ok(None),
            Preamble::Expected => {
                if let Some(refusal) = self.read_preamble(src) {
                    return Ok(Some(refusal));
                }
            }
            Preamble::Done => {}
        }
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: len,
                    max_size: MAX_FRAME_LEN,
                },
            ));
        }
        if src.len() < HEADER_LEN + len {
            // Room for the rest of a data frame in one read; no more, so
            // that a header alone cannot make an unauthenticated peer cost
            // a whole frame's buffer.
            src.reserve((HEADER_LEN + len - src.len()).min(READ_STEP));
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len).freeze();
        let message = match kind {
            kind::BINARY => Message::Binary(body),
            kind::PING => Message::Ping(body),
            kind::PONG => Message::Pong(body),
            kind::CLOSE => Message::Close(close_body(body)?),
            other => {
                return Err(tungstenite::Error::Protocol(
                    ProtocolError::UnknownDataFrameType(other),
                ))
            }
        };
        Ok(Some(message))
    }
}

fn close_body(mut body: bytes::Bytes) -> Result<Option<CloseFrame>, tungstenite::Error> {
    if body.is_empty() {
        return Ok(None);
    }
    if body.len() < 2 {
        return Err(tungstenite::Error::Protocol(
            ProtocolError::InvalidCloseSequence,
        ));
    }
    let code = body.get_u16();
    let reason = String::from_utf8_lossy(&body);
    Ok(Some(close_frame(code, &reason)))
}

impl Encoder<Message> for RecordCodec {
    type Error = tungstenite::Error;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), tungstenite::Error> {
        let (kind, body): (u8, &[u8]) = match &message {
            Message::Binary(bytes) => (kind::BINARY, bytes),
            Message::Ping(bytes) => (kind::PING, bytes),
            Message::Pong(bytes) => (kind::PONG, bytes),
            Message::Close(None) => (kind::CLOSE, &[]),
            Message::Close(Some(frame)) => {
                let reason = frame.reason.as_bytes();
                dst.reserve(HEADER_LEN + 2 + reason.len());
                dst.put_u8(kind::CLOSE);
                dst.put_u32((2 + reason.len()) as u32);
                dst.put_u16(frame.code.into());
                dst.put_slice(reason);
                return Ok(());
            }
            Message::Text(_) | Message::Frame(_) => {
                return Err(tungstenite::Error::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only binary, ping, pong and close messages travel as records",
                )))
            }
        };
        dst.reserve(HEADER_LEN + body.len());
        dst.put_u8(kind);
        dst.put_u32(body.len() as u32);
        dst.put_slice(body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};

    use super::*;

    async fn pair() -> (
        Records<tokio::io::DuplexStream>,
        Records<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client = client(a).await.unwrap();
        let agent = accept(b).await.unwrap();
        (client, agent)
    }

    #[tokio::test]
    async fn every_message_kind_crosses_both_ways() {
        let (mut client, mut agent) = pair().await;
        let big = bytes::Bytes::from(vec![7u8; MAX_FRAME_LEN]);
        let messages = vec![
            Message::Binary(big),
            Message::Binary(bytes::Bytes::from_static(b"x")),
            Message::Ping(bytes::Bytes::from_static(b"p")),
            Message::Pong(bytes::Bytes::new()),
            Message::Close(Some(close_frame(4002, "bye"))),
            Message::Close(None),
        ];
        for message in &messages {
            client.send(message.clone()).await.unwrap();
            assert_eq!(agent.next().await.unwrap().unwrap(), *message);
            agent.send(message.clone()).await.unwrap();
            assert_eq!(client.next().await.unwrap().unwrap(), *message);
        }
    }

    #[tokio::test]
    async fn a_record_longer_than_a_frame_is_refused_before_it_is_buffered() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut client = client(a).await.unwrap();
        let agent = tokio::spawn(async move {
            let mut agent = accept(b).await.unwrap();
            agent.next().await
        });
        let mut header = BytesMut::new();
        header.put_u8(kind::BINARY);
        header.put_u32(MAX_FRAME_LEN as u32 + 1);
        client.get_mut().write_all(&header).await.unwrap();
        let received = agent.await.unwrap();
        assert!(
            matches!(received, Some(Err(tungstenite::Error::Capacity(_)))),
            "{received:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_record_kind_is_a_protocol_error() {
        let (mut client, mut agent) = pair().await;
        client.get_mut().write_all(&[9, 0, 0, 0, 0]).await.unwrap();
        let received = agent.next().await;
        assert!(
            matches!(received, Some(Err(tungstenite::Error::Protocol(_)))),
            "{received:?}"
        );
    }

    async fn client_hears(answer: &'static [u8]) -> (u16, String) {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut client = client(a).await.unwrap();
        b.write_all(answer).await.unwrap();
        match client.next().await {
            Some(Ok(Message::Close(Some(frame)))) => (frame.code.into(), frame.reason.to_string()),
            other => panic!("expected a close message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_agent_that_speaks_http_is_a_release_mismatch() {
        let (code, reason) = client_hears(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        assert_eq!(code, close_code::VERSION_MISMATCH);
        assert!(reason.contains("HTTP/1.1 400 Bad Request"), "{reason}");
        assert!(
            reason.contains("agent image of this CLI's release"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn an_agent_without_a_common_link_version_says_both_ranges() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut preamble = BytesMut::new();
        preamble.put_slice(&MAGIC);
        preamble.put_u16(LINK_VERSION + 1);
        preamble.put_u16(LINK_VERSION + 2);
        b.write_all(&preamble).await.unwrap();
        let agent = tokio::spawn(accept(a));
        let mut answer = Vec::new();
        b.read_to_end(&mut answer).await.unwrap();
        assert!(agent.await.unwrap().is_err());
        let mut codec = RecordCodec {
            preamble: Preamble::Expected,
        };
        let mut src = BytesMut::from(&answer[..]);
        let Some(Message::Close(Some(frame))) = codec.decode(&mut src).unwrap() else {
            panic!("expected the agent's close record");
        };
        assert_eq!(u16::from(frame.code), close_code::VERSION_MISMATCH);
        assert!(
            frame.reason.contains("client speaks 2..=3"),
            "{}",
            frame.reason
        );
    }
}
