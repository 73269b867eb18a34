//! The first exchange on a tunnel: version negotiation and authentication.
//!
//! ```text
//! client                                   agent
//!   Hello {versions, client nonce}  ──▶    version check
//!                                   ◀──    Challenge {agent nonce}
//!   Proof {signature}               ──▶    signature check ([`crate::auth`])
//!                                   ◀──    Welcome {version, ports, resolver}
//! ```
//!
//! The client proposes the range of protocol versions it speaks; the agent
//! picks the highest common one or refuses. `Hello` keeps its version-1
//! layout (magic, version range, one short string) so that any two releases
//! can at least read each other's version range and say they differ: the
//! string that held a shared token up to version 2 holds the client's nonce,
//! as 64 hex digits, since version 3. Refusals are WebSocket close frames
//! with a code from [`close_code`] and a reason that names what to do,
//! because the person reading it is a developer staring at a terminal, not
//! a protocol engineer.
//!
//! The agent's side is a state machine ([`AgentHandshake`]) fed one message
//! at a time, so that it is tested and fuzzed without a socket; the agent
//! bounds the whole handshake in time and size before authentication (see
//! `ktb-agent`'s `preauth` module).
//!
//! The messages themselves (`Hello`, `Welcome`, the versions they carry)
//! are a family of their own in `messages`, beside `tcp` and `udp`: the
//! codec decodes them without depending on this procedure.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

pub(crate) mod messages;

use crate::auth::{ClientKey, ClientPublicKey, KeyError, Nonce};
use crate::codec::{Frame, MAX_FRAME_LEN};
pub use crate::link::{close_code, close_frame};
use crate::link::{highest_common_version, Link};
pub use messages::{Hello, Resolver, Welcome, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// How long the client waits for the whole handshake (the agent applies
/// its own, configurable, limit).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refusal waits for its close frame to leave.
const REFUSAL_FLUSH: Duration = Duration::from_secs(1);

/// Picks the version to speak, or explains why there is none.
pub fn negotiate(client_min: u16, client_max: u16) -> Result<u16, String> {
    highest_common_version(
        (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
        (client_min, client_max),
    )
    .ok_or_else(|| {
        format!(
            "version mismatch: client speaks {client_min}..={client_max}, \
             agent speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; use CLI and agent of one release"
        )
    })
}

/// WebSocket limits both ends apply after the handshake: nothing larger
/// than a frame is buffered. (Before authentication the agent reads far
/// less: see `ktb-agent`'s `preauth`.)
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_LEN))
        .max_frame_size(Some(MAX_FRAME_LEN))
        .write_buffer_size(256 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
}

/// Why a handshake failed; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the agent refused the tunnel: {reason}")]
    Refused { code: u16, reason: String },
    #[error("the peer sent an invalid handshake: {0}")]
    Malformed(String),
    #[error("no complete handshake within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed during the handshake")]
    Closed,
    #[error("websocket error during the handshake: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("cannot take part in the handshake: {0}")]
    Key(#[from] KeyError),
}

/// The agent refuses the client: close code and the reason it is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    fn malformed(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: close_code::MALFORMED,
            reason: reason.into(),
        }
    }
}

/// What the agent does after a message of the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this frame (the challenge) and feed the next message.
    Reply(Frame),
    /// The client proved it holds the key; speak this protocol version.
    Authenticated { version: u16 },
}

/// The agent's side of the handshake, one message at a time.
pub struct AgentHandshake {
    key: ClientPublicKey,
    expect: Expect,
}

/// Where the handshake stands.
enum Expect {
    /// Nothing received yet.
    Hello,
    /// The challenge went out; the client must answer it.
    Proof {
        version: u16,
        challenge: Nonce,
        client_nonce: Nonce,
    },
    /// Authenticated or refused: any further message is a caller's bug.
    Over,
}

/// Told to a client whose proof does not verify: the usual cause is a
/// second developer (or a second `ktb`) aiming at someone else's agent.
pub const WRONG_KEY: &str =
    "wrong client key: this agent belongs to another ktb session (its --client-key is not yours)";

impl AgentHandshake {
    /// The agent only accepts the holder of the private half of `key`.
    pub fn new(key: ClientPublicKey) -> Self {
        AgentHandshake {
            key,
            expect: Expect::Hello,
        }
    }

    /// Feeds one binary message from the client.
    pub fn on_message(&mut self, message: Bytes) -> Result<Step, Refusal> {
        match std::mem::replace(&mut self.expect, Expect::Over) {
            Expect::Hello => {
                let (min, max) = Hello::peek_versions(&message)
                    .ok_or_else(|| Refusal::malformed(first_frame_problem(message.clone())))?;
                let version = negotiate(min, max).map_err(|reason| Refusal {
                    code: close_code::VERSION_MISMATCH,
                    reason,
                })?;
                let Ok(Frame::Hello(hello)) = Frame::decode(message.clone()) else {
                    return Err(Refusal::malformed(first_frame_problem(message)));
                };
                let challenge = Nonce::random().map_err(|e| Refusal {
                    code: close_code::INTERNAL,
                    reason: e.to_string(),
                })?;
                self.expect = Expect::Proof {
                    version,
                    challenge,
                    client_nonce: hello.nonce,
                };
                Ok(Step::Reply(Frame::Challenge(challenge)))
            }
            Expect::Proof {
                version,
                challenge,
                client_nonce,
            } => match Frame::decode(message) {
                Ok(Frame::Proof(proof)) if self.key.verify(&challenge, &client_nonce, &proof) => {
                    Ok(Step::Authenticated { version })
                }
                Ok(Frame::Proof(_)) => Err(Refusal {
                    code: close_code::UNAUTHORIZED,
                    reason: WRONG_KEY.into(),
                }),
                Ok(_) => Err(Refusal::malformed("expected Proof after the challenge")),
                Err(e) => Err(Refusal::malformed(format!("invalid Proof: {e}"))),
            },
            Expect::Over => Err(Refusal::malformed("the handshake is already over")),
        }
    }
}

/// Why a first message is not a usable `Hello`.
fn first_frame_problem(message: Bytes) -> String {
    match Frame::decode(message) {
        Ok(Frame::Hello(_)) => "invalid Hello".into(),
        Ok(_) => "expected Hello as the first frame".into(),
        Err(e) => format!("invalid Hello: {e}"),
    }
}

/// Client side: `Hello`, answer the challenge, wait for `Welcome` or the
/// agent's refusal, all within [`HANDSHAKE_TIMEOUT`].
pub async fn client_handshake<L: Link>(
    ws: &mut L,
    key: &ClientKey,
) -> Result<Welcome, HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let hello = Hello::new()?;
    let nonce = hello.nonce;
    send(ws, Frame::Hello(hello), deadline).await?;
    let challenge = match receive(ws, deadline).await? {
        Frame::Challenge(challenge) => challenge,
        other => {
            return Err(HandshakeError::Malformed(format!(
                "expected Challenge, got {other:?}"
            )))
        }
    };
    send(ws, Frame::Proof(key.prove(&challenge, &nonce)), deadline).await?;
    match receive(ws, deadline).await? {
        Frame::Welcome(welcome) => Ok(welcome),
        other => Err(HandshakeError::Malformed(format!(
            "expected Welcome, got {other:?}"
        ))),
    }
}

async fn send<L: Link>(ws: &mut L, frame: Frame, deadline: Instant) -> Result<(), HandshakeError> {
    tokio::time::timeout_at(deadline, ws.send(Message::Binary(frame.encode())))
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))??;
    Ok(())
}

/// The agent's next frame; its close frame becomes [`HandshakeError::Refused`].
async fn receive<L: Link>(ws: &mut L, deadline: Instant) -> Result<Frame, HandshakeError> {
    let reply = tokio::time::timeout_at(deadline, ws.next())
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?;
    match reply {
        Some(Ok(Message::Binary(bytes))) => {
            Frame::decode(bytes).map_err(|e| HandshakeError::Malformed(e.to_string()))
        }
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

/// Agent side: runs [`AgentHandshake`] on the WebSocket until the client is
/// authenticated, closing with the reason when it is refused; gives up at
/// `deadline`. Returns the version to speak; the agent answers `Welcome`
/// through [`crate::Session::welcome`] once it is ready to carry streams, so
/// a client never hears "welcome" before callers can be served.
pub async fn agent_handshake<L: Link>(
    ws: &mut L,
    key: ClientPublicKey,
    deadline: Instant,
) -> Result<u16, HandshakeError> {
    let timed_out = || HandshakeError::Timeout(deadline.saturating_duration_since(Instant::now()));
    let mut handshake = AgentHandshake::new(key);
    loop {
        let message = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return Err(HandshakeError::Closed),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
            Ok(Some(Ok(_))) => {
                return refuse(ws, Refusal::malformed("expected binary handshake frames")).await
            }
        };
        match handshake.on_message(message) {
            Ok(Step::Reply(frame)) => {
                tokio::time::timeout_at(deadline, ws.send(Message::Binary(frame.encode())))
                    .await
                    .map_err(|_| timed_out())??
            }
            Ok(Step::Authenticated { version }) => return Ok(version),
            Err(refusal) => return refuse(ws, refusal).await,
        }
    }
}

async fn refuse<L: Link, T>(ws: &mut L, refusal: Refusal) -> Result<T, HandshakeError> {
    let Refusal { code, reason } = refusal;
    // Best effort, briefly: the peer may be gone or not reading, and the
    // refusal stands either way.
    let close = Message::Close(Some(close_frame(code, &reason)));
    let _ = tokio::time::timeout(REFUSAL_FLUSH, async {
        ws.send(close).await?;
        SinkExt::close(ws).await
    })
    .await;
    Err(HandshakeError::Refused { code, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::kind;

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

    fn hello() -> Hello {
        Hello::new().unwrap()
    }

    /// A whole handshake against the state machine; returns its outcome.
    fn run(agent_key: ClientPublicKey, client_key: &ClientKey) -> Result<Step, Refusal> {
        let mut agent = AgentHandshake::new(agent_key);
        let hello = hello();
        let Ok(Step::Reply(Frame::Challenge(challenge))) =
            agent.on_message(Frame::Hello(hello.clone()).encode())
        else {
            panic!("a Hello is answered with a challenge");
        };
        let proof = client_key.prove(&challenge, &hello.nonce);
        agent.on_message(Frame::Proof(proof).encode())
    }

    #[test]
    fn the_key_holder_is_authenticated() {
        let key = ClientKey::generate().unwrap();
        assert_eq!(
            run(key.public(), &key),
            Ok(Step::Authenticated {
                version: PROTOCOL_VERSION
            })
        );
    }

    #[test]
    fn another_key_is_refused_with_advice() {
        let key = ClientKey::generate().unwrap();
        let other = ClientKey::generate().unwrap();
        let refusal = run(key.public(), &other).unwrap_err();
        assert_eq!(refusal.code, close_code::UNAUTHORIZED);
        assert!(
            refusal.reason.contains("another ktb session"),
            "{refusal:?}"
        );
        assert!(refusal.reason.len() <= 123, "fits a close frame");
    }

    #[test]
    fn a_proof_from_another_connection_does_not_replay() {
        let key = ClientKey::generate().unwrap();
        let hello = hello();
        let mut first = AgentHandshake::new(key.public());
        let Ok(Step::Reply(Frame::Challenge(challenge))) =
            first.on_message(Frame::Hello(hello.clone()).encode())
        else {
            panic!("challenge");
        };
        let recorded = Frame::Proof(key.prove(&challenge, &hello.nonce)).encode();
        assert!(matches!(
            first.on_message(recorded.clone()),
            Ok(Step::Authenticated { .. })
        ));
        // The same Hello and the recorded proof on a new connection: the
        // agent's challenge is new, so the proof no longer answers it.
        let mut second = AgentHandshake::new(key.public());
        assert!(matches!(
            second.on_message(Frame::Hello(hello).encode()),
            Ok(Step::Reply(Frame::Challenge(c))) if c != challenge
        ));
        assert_eq!(
            second.on_message(recorded).unwrap_err().code,
            close_code::UNAUTHORIZED
        );
    }

    #[test]
    fn out_of_order_and_garbage_messages_are_malformed() {
        let key = ClientKey::generate().unwrap();
        let mut agent = AgentHandshake::new(key.public());
        let proof = Frame::Proof(key.prove(&hello().nonce, &hello().nonce));
        let refusal = agent.on_message(proof.encode()).unwrap_err();
        assert_eq!(refusal.code, close_code::MALFORMED);
        assert!(refusal.reason.contains("expected Hello"), "{refusal:?}");

        let mut agent = AgentHandshake::new(key.public());
        agent.on_message(Frame::Hello(hello()).encode()).unwrap();
        let refusal = agent
            .on_message(Frame::Hello(hello()).encode())
            .unwrap_err();
        assert!(refusal.reason.contains("expected Proof"), "{refusal:?}");
        assert!(
            agent.on_message(Bytes::new()).is_err(),
            "over after a refusal"
        );

        let mut agent = AgentHandshake::new(key.public());
        let refusal = agent
            .on_message(Bytes::from_static(b"\x01ktb"))
            .unwrap_err();
        assert!(refusal.reason.contains("invalid Hello"), "{refusal:?}");
    }

    /// The version-2 agent's reading of `Hello`: magic, range, a UTF-8
    /// string, nothing after.
    fn read_as_version_2(message: &[u8]) -> Option<(u16, u16)> {
        let (min, max) = Hello::peek_versions(message)?;
        let rest = &message[1 + MAGIC.len() + 4..];
        let (len, string) = rest.split_first()?;
        (string.len() == usize::from(*len) && std::str::from_utf8(string).is_ok())
            .then_some((min, max))
    }

    #[test]
    fn old_and_new_releases_tell_each_other_the_versions_differ() {
        // A version-3 Hello as a version-2 agent reads it: a version range
        // it can negotiate with (and refuse, naming both ranges).
        let ours = Frame::Hello(hello()).encode();
        assert_eq!(
            read_as_version_2(&ours),
            Some((MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))
        );
        // A version-2 Hello (with its token) at this agent.
        let mut old = vec![kind::HELLO];
        old.extend_from_slice(MAGIC);
        old.extend_from_slice(&[0, 2, 0, 2, 4]);
        old.extend_from_slice(b"abcd");
        let key = ClientKey::generate().unwrap();
        let refusal = AgentHandshake::new(key.public())
            .on_message(Bytes::from(old))
            .unwrap_err();
        assert_eq!(refusal.code, close_code::VERSION_MISMATCH);
        assert!(
            refusal.reason.contains("client speaks 2..=2")
                && refusal.reason.contains(&format!(
                    "agent speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
                )),
            "{refusal:?}"
        );
    }

    #[tokio::test]
    async fn client_and_agent_complete_the_handshake_over_a_websocket() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::WebSocketStream;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let agent_ws =
            WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config())).await;
        let client_ws =
            WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config())).await;
        handshake_over(agent_ws, client_ws).await;
    }

    #[tokio::test]
    async fn client_and_agent_complete_the_handshake_over_records() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        // The client's preamble and Hello leave before the agent answers.
        let client_ws = crate::link::client(b).await.unwrap();
        let agent_ws = crate::link::accept(a).await.unwrap();
        handshake_over(agent_ws, client_ws).await;
    }

    async fn handshake_over(mut agent_ws: impl Link, mut client_ws: impl Link) {
        let key = ClientKey::generate().unwrap();
        let public = key.public();
        let agent = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let version = agent_handshake(&mut agent_ws, public, deadline).await;
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                ports: vec![80],
                agent: "test".into(),
                resolver: Resolver::default(),
            };
            agent_ws
                .send(Message::Binary(Frame::Welcome(welcome).encode()))
                .await
                .unwrap();
            version
        });
        let welcome = client_handshake(&mut client_ws, &key).await.unwrap();
        assert_eq!(welcome.ports, [80]);
        assert_eq!(agent.await.unwrap().unwrap(), PROTOCOL_VERSION);
    }
}
