//! The first exchange on a tunnel: version negotiation and authentication.
//!
//! The client proposes the range of protocol versions it speaks and presents
//! the session's secret token; the agent picks the highest common version or
//! refuses. Refusals are WebSocket close frames with a code from
//! [`close_code`] and a reason that names what to do, because the person
//! reading it is a developer staring at a terminal, not a protocol engineer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::codec::{put_short_string, DecodeError, Frame, Reader, MAX_FRAME_LEN};
use crate::tcp::{get_socket_addr, put_socket_addr};

/// The version this build speaks. Bump it for any incompatible change to the
/// wire format, and keep [`MIN_PROTOCOL_VERSION`] at the oldest one still
/// understood.
///
/// Version 2: `Welcome` tells the client the agent's resolver (for `ktb connect`).
pub const PROTOCOL_VERSION: u16 = 2;
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Four bytes that make a stray connection (or another protocol) obvious.
pub const MAGIC: &[u8; 4] = b"ktb!";
/// How long the agent waits for `Hello` before dropping the connection.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket close codes (private range 4000–4999) used when refusing a peer.
pub mod close_code {
    /// The client's token is missing or wrong.
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The ports the agent accepts connections on for this client (exchange role).
    pub ports: Vec<u16>,
    /// The agent's build, for diagnostics.
    pub agent: String,
    /// How the agent resolves names: what `ktb connect` asks for cluster
    /// names, with the search path of the agent's namespace.
    pub resolver: Resolver,
}

/// The agent's DNS configuration, as its pod's `resolv.conf` gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolver {
    pub nameservers: Vec<SocketAddr>,
    /// Search domains, most specific first (`ns.svc.cluster.local`, …).
    pub search: Vec<String>,
}

impl Resolver {
    /// Reads `nameserver` and `search` lines of a `resolv.conf`.
    pub fn parse_resolv_conf(text: &str) -> Resolver {
        let mut resolver = Resolver::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                        resolver.nameservers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("search") => resolver.search = words.map(str::to_owned).collect(),
                _ => {}
            }
        }
        resolver
    }
}

impl Hello {
    pub fn new(token: impl Into<String>) -> Self {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            token: token.into(),
        }
    }

    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_slice(MAGIC);
        out.put_u16(self.min_version);
        out.put_u16(self.max_version);
        put_short_string(out, &self.token);
    }

    pub(crate) fn decode_body(r: &mut Reader) -> Result<Self, DecodeError> {
        if r.take(MAGIC.len())?.as_ref() != MAGIC {
            return Err(DecodeError::Invalid { field: "magic" });
        }
        Ok(Hello {
            min_version: r.u16()?,
            max_version: r.u16()?,
            token: r.short_string("token")?,
        })
    }
}

impl Welcome {
    pub(crate) fn encode_body(&self, out: &mut BytesMut) {
        out.put_u16(self.version);
        out.put_u16(self.ports.len() as u16);
        for port in &self.ports {
            out.put_u16(*port);
        }
        put_short_string(out, &self.agent);
        let Resolver {
            nameservers,
            search,
        } = &self.resolver;
        out.put_u8(nameservers.len().min(u8::MAX.into()) as u8);
        for server in nameservers.iter().take(u8::MAX.into()) {
            put_socket_addr(out, server);
        }
        out.put_u8(search.len().min(u8::MAX.into()) as u8);
        for domain in search.iter().take(u8::MAX.into()) {
            put_short_string(out, domain);
        }
    }

    pub(crate) fn decode_body(r: &mut Reader) -> Result<Self, DecodeError> {
        let version = r.u16()?;
        let count = r.u16()?;
        let ports = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
        let agent = r.short_string("agent build")?;
        let count = r.u8()?;
        let nameservers = (0..count)
            .map(|_| get_socket_addr(r))
            .collect::<Result<_, _>>()?;
        let count = r.u8()?;
        let search = (0..count)
            .map(|_| r.short_string("search domain"))
            .collect::<Result<_, _>>()?;
        Ok(Welcome {
            version,
            ports,
            agent,
            resolver: Resolver {
                nameservers,
                search,
            },
        })
    }
}

/// Picks the version to speak, or explains why there is none.
pub fn negotiate(client_min: u16, client_max: u16) -> Result<u16, String> {
    let chosen = client_max.min(PROTOCOL_VERSION);
    if client_min > client_max || chosen < client_min.max(MIN_PROTOCOL_VERSION) {
        return Err(format!(
            "version mismatch: client speaks {client_min}..={client_max}, \
             agent speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; use CLI and agent of one release"
        ));
    }
    Ok(chosen)
}

/// Compares tokens in constant time, so response timing reveals nothing.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// WebSocket limits both ends apply: nothing larger than a frame is buffered.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_LEN))
        .max_frame_size(Some(MAX_FRAME_LEN))
        .write_buffer_size(256 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
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

/// Why a handshake failed; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the agent refused the tunnel: {reason}")]
    Refused { code: u16, reason: String },
    #[error("the peer sent an invalid handshake: {0}")]
    Malformed(String),
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed during the handshake")]
    Closed,
    #[error("websocket error during the handshake: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Client side: say `Hello`, wait for `Welcome` or the agent's refusal.
pub async fn client_handshake<S>(
    ws: &mut WebSocketStream<S>,
    token: &str,
) -> Result<Welcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(Frame::Hello(Hello::new(token)).encode()))
        .await?;
    let reply = tokio::time::timeout(HELLO_TIMEOUT, ws.next())
        .await
        .map_err(|_| HandshakeError::Timeout(HELLO_TIMEOUT))?;
    match reply {
        Some(Ok(Message::Binary(bytes))) => match Frame::decode(bytes) {
            Ok(Frame::Welcome(welcome)) => Ok(welcome),
            Ok(other) => Err(HandshakeError::Malformed(format!(
                "expected Welcome, got {other:?}"
            ))),
            Err(e) => Err(HandshakeError::Malformed(e.to_string())),
        },
        Some(Ok(Message::Close(Some(frame)))) => Err(HandshakeError::Refused {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        }),
        Some(Ok(other)) => Err(HandshakeError::Malformed(format!(
            "unexpected message {other:?}"
        ))),
        Some(Err(e)) => Err(e.into()),
        None => Err(HandshakeError::Closed),
    }
}

/// Agent side: waits for `Hello` and checks version and token, closing
/// with the reason when they fail. Returns the version to speak; the agent
/// answers `Welcome` through [`crate::Session::welcome`] once it is ready to
/// carry streams, so a client never hears "welcome" before callers can be
/// served.
pub async fn agent_handshake<S>(
    ws: &mut WebSocketStream<S>,
    token: &str,
) -> Result<u16, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(HELLO_TIMEOUT, ws.next())
        .await
        .map_err(|_| HandshakeError::Timeout(HELLO_TIMEOUT))?;
    let hello = match first {
        Some(Ok(Message::Binary(bytes))) => match Frame::decode(bytes) {
            Ok(Frame::Hello(hello)) => hello,
            Ok(_) => {
                return refuse(
                    ws,
                    close_code::MALFORMED,
                    "expected Hello as the first frame".into(),
                )
                .await
            }
            Err(e) => {
                return refuse(ws, close_code::MALFORMED, format!("invalid Hello: {e}")).await
            }
        },
        Some(Ok(_)) => {
            return refuse(
                ws,
                close_code::MALFORMED,
                "expected a binary Hello frame".into(),
            )
            .await
        }
        Some(Err(e)) => return Err(e.into()),
        None => return Err(HandshakeError::Closed),
    };
    let version = match negotiate(hello.min_version, hello.max_version) {
        Ok(version) => version,
        Err(reason) => return refuse(ws, close_code::VERSION_MISMATCH, reason).await,
    };
    if !token_matches(token, &hello.token) {
        let reason = "invalid session token: this agent belongs to another ktb session";
        return refuse(ws, close_code::UNAUTHORIZED, reason.into()).await;
    }
    Ok(version)
}

async fn refuse<S, T>(
    ws: &mut WebSocketStream<S>,
    code: u16,
    reason: String,
) -> Result<T, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = close_frame(code, &reason);
    // Best effort: the peer may already be gone, and the refusal stands either way.
    let _ = ws.close(Some(frame)).await;
    Err(HandshakeError::Refused { code, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_nameservers_and_search_path() {
        let resolver = Resolver::parse_resolv_conf(
            "# pod\nsearch team-a.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver not-an-ip\noptions ndots:5\n",
        );
        assert_eq!(resolver.nameservers, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(
            resolver.search,
            [
                "team-a.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 9), Ok(PROTOCOL_VERSION));
        assert_eq!(
            negotiate(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            Ok(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn a_mismatch_names_both_ranges() {
        let err = negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3).unwrap_err();
        assert!(err.contains(&format!(
            "client speaks {}..={}",
            PROTOCOL_VERSION + 1,
            PROTOCOL_VERSION + 3
        )));
        assert!(err.contains(&format!(
            "agent speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
        )));
        assert!(negotiate(3, 2).is_err());
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", ""));
    }
}
