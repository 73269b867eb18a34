//! The ktb tunnel protocol: what the CLI on a developer's laptop and the agent
//! in the cluster say to each other, and the multiplexer that lets one
//! connection carry every TCP stream and UDP datagram of a session.
//!
//! The crate is shared by both ends so the two can never disagree about the
//! wire format. It is organised like the protocol itself: [`link`] carries
//! messages over a WebSocket or as records on a port-forward, [`codec`] frames
//! them, one module per message family ([`handshake`]'s messages, [`tcp`],
//! [`udp`]) defines their bodies, all written with the primitives of `wire`
//! (limits, kinds, bounds-checked reading), [`auth`] holds the session keys the
//! handshake proves, and [`session`] runs a live tunnel with per-stream flow
//! control and keepalive, its windows sized by `window`; [`socket`] keeps the
//! tunnel's socket from queueing bulk data ahead of it.
//!
//! # Wire format (protocol version 4)
//!
//! Every *binary* message of the link (a WebSocket message, or a record:
//! see [`link`]) carries exactly one frame. All integers are
//! big-endian. A frame starts with a one-byte kind; its body follows:
//!
//! | kind | name       | body                                                        |
//! |------|------------|-------------------------------------------------------------|
//! | 0x01 | `Hello`    | magic `b"ktb!"`, min version u16, max version u16, nonce len u8 (64), client nonce as 64 hex digits |
//! | 0x02 | `Welcome`  | chosen version u16, port count u16, ports u16…, agent build len u8, agent build, resolver |
//! | 0x03 | `Challenge`| agent nonce (32 bytes)                                      |
//! | 0x04 | `Proof`    | Ed25519 signature (64 bytes, see [`auth`])                  |
//! | 0x10 | `Open`     | stream u32, target (see [`tcp::Target`])                    |
//! | 0x11 | `Opened`   | stream u32                                                  |
//! | 0x12 | `Data`     | stream u32, payload (the rest of the message)               |
//! | 0x13 | `Fin`      | stream u32                                                  |
//! | 0x14 | `Reset`    | stream u32, reason (UTF-8, the rest of the message)         |
//! | 0x15 | `Credit`   | stream u32, bytes u32                                       |
//! | 0x20 | `Datagram` | flow u32, address (see [`udp`]), payload (the rest)         |
//! | 0x21 | `FlowEnd`  | flow u32                                                    |
//!
//! The client speaks first with `Hello`; the agent answers with a
//! `Challenge`, the client with a `Proof` of its session key, and the agent
//! with `Welcome` — or it closes the link with a close code from
//! [`handshake::close_code`] and a reason a person can act on. Streams opened
//! by the agent have odd ids, streams opened by the client even ids, so both
//! sides allocate without coordination; ids only grow and are never reused.
//!
//! Every stream starts with [`stream::INITIAL_WINDOW`] bytes of credit each
//! way; the receiver may widen it with `Credit` while its session-wide
//! receive budget allows, never beyond [`stream::MAX_WINDOW`] (the receiver
//! picks how far: see `window`), and returns `Credit` as it delivers bytes
//! to their destination.
//! A `Data` frame costs its length in credit, but at least
//! [`stream::MIN_DATA_COST`], so the number of frames a receiver queues is
//! bounded too. A peer that overruns its window, sends a frame larger than
//! [`codec::MAX_FRAME_LEN`], anything that does not decode or a frame
//! sequence that makes no sense (data after `Fin`, a stream it never
//! opened…) is disconnected with a close reason; nothing it sends can make
//! the process panic or buffer without bound. Liveness rides the link's
//! pings.

pub mod auth;
pub mod codec;
pub mod handshake;
pub mod link;
pub mod session;
pub mod socket;
pub mod stream;
pub mod tcp;
pub mod udp;
mod window;
mod wire;

pub use auth::{ClientKey, ClientPublicKey};
pub use codec::{DecodeError, Frame};
pub use link::Link;
pub use session::{CloseReason, Incoming, Session, SessionClosed, SessionConfig, Side};
pub use stream::{Stream, StreamError};
