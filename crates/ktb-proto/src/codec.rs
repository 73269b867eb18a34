//! Framing: one [`Frame`] per WebSocket binary message.
//!
//! The one module that knows every message family: it reads the kind byte,
//! hands the body to its family, and refuses what is too large or left over,
//! all with the primitives of `wire`, so that limits and error handling for
//! untrusted bytes live in exactly one place. Decoding never panics and never
//! allocates more than the message it was given; encoding of `Data` can be done
//! in place (see [`data_frame_buffer`]) so bulk bytes are copied once, from the
//! socket into the buffer that becomes the WebSocket message.

use bytes::{BufMut, Bytes, BytesMut};

use crate::auth::{Nonce, Proof};
use crate::handshake::messages::{Hello, Welcome};
use crate::tcp::Target;
use crate::udp;
use crate::wire::{kind, Reader};
pub use crate::wire::{DecodeError, MAX_FRAME_LEN, MAX_PAYLOAD};

/// Bytes in front of a `Data` payload: kind and stream id.
pub const DATA_HEADER_LEN: usize = 5;
/// Longest `Reset` reason kept; longer ones are cut (never rejected).
pub const MAX_REASON_LEN: usize = 512;

pub type StreamId = u32;

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    /// The agent's random challenge, answered by `Proof`.
    Challenge(Nonce),
    /// The client's signature over the challenge (see [`crate::auth`]).
    Proof(Proof),
    /// Ask the peer to connect a new stream to `target`.
    Open {
        stream: StreamId,
        target: Target,
    },
    /// The peer reached the stream's target.
    Opened {
        stream: StreamId,
    },
    Data {
        stream: StreamId,
        payload: Bytes,
    },
    /// The sender will send no more data on this stream (TCP half-close).
    Fin {
        stream: StreamId,
    },
    /// The stream is dead in both directions, with the reason why.
    Reset {
        stream: StreamId,
        reason: String,
    },
    /// The receiver delivered `bytes` more bytes; the sender may send that much more.
    Credit {
        stream: StreamId,
        bytes: u32,
    },
    Datagram(udp::Datagram),
    /// The UDP flow is closed; the receiver may drop its state.
    FlowEnd {
        flow: udp::FlowId,
    },
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        match self {
            Frame::Hello(hello) => {
                out.put_u8(kind::HELLO);
                hello.encode_body(&mut out);
            }
            Frame::Welcome(welcome) => {
                out.put_u8(kind::WELCOME);
                welcome.encode_body(&mut out);
            }
            Frame::Challenge(nonce) => {
                out.put_u8(kind::CHALLENGE);
                out.put_slice(&nonce.0);
            }
            Frame::Proof(proof) => {
                out.put_u8(kind::PROOF);
                out.put_slice(&proof.0);
            }
            Frame::Open { stream, target } => {
                put_stream_header(&mut out, kind::OPEN, *stream);
                target.encode(&mut out);
            }
            Frame::Opened { stream } => put_stream_header(&mut out, kind::OPENED, *stream),
            Frame::Data { stream, payload } => {
                put_stream_header(&mut out, kind::DATA, *stream);
                out.put_slice(payload);
            }
            Frame::Fin { stream } => put_stream_header(&mut out, kind::FIN, *stream),
            Frame::Reset { stream, reason } => {
                put_stream_header(&mut out, kind::RESET, *stream);
                out.put_slice(truncate_reason(reason).as_bytes());
            }
            Frame::Credit { stream, bytes } => {
                put_stream_header(&mut out, kind::CREDIT, *stream);
                out.put_u32(*bytes);
            }
            Frame::Datagram(datagram) => {
                out.put_u8(kind::DATAGRAM);
                datagram.encode_body(&mut out);
            }
            Frame::FlowEnd { flow } => {
                out.put_u8(kind::FLOW_END);
                out.put_u32(*flow);
            }
        }
        out.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        match self {
            Frame::Data { payload, .. } => DATA_HEADER_LEN + payload.len(),
            Frame::Datagram(d) => 32 + d.payload.len(),
            _ => 64,
        }
    }

    /// Decodes one frame. `Data` and `Datagram` payloads share `bytes`' memory.
    pub fn decode(bytes: Bytes) -> Result<Frame, DecodeError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(DecodeError::TooLarge { len: bytes.len() });
        }
        let mut r = Reader::new(bytes)?;
        let frame = match r.kind {
            kind::HELLO => Frame::Hello(Hello::decode_body(&mut r)?),
            kind::WELCOME => Frame::Welcome(Welcome::decode_body(&mut r)?),
            kind::CHALLENGE => Frame::Challenge(Nonce(r.array()?)),
            kind::PROOF => Frame::Proof(Proof(r.array()?)),
            kind::OPEN => Frame::Open {
                stream: r.u32()?,
                target: Target::decode(&mut r)?,
            },
            kind::OPENED => Frame::Opened { stream: r.u32()? },
            kind::DATA => Frame::Data {
                stream: r.u32()?,
                payload: r.rest(),
            },
            kind::FIN => Frame::Fin { stream: r.u32()? },
            kind::RESET => Frame::Reset {
                stream: r.u32()?,
                reason: truncate_reason(&String::from_utf8_lossy(&r.rest())).to_owned(),
            },
            kind::CREDIT => Frame::Credit {
                stream: r.u32()?,
                bytes: r.u32()?,
            },
            kind::DATAGRAM => Frame::Datagram(udp::Datagram::decode_body(&mut r)?),
            kind::FLOW_END => Frame::FlowEnd { flow: r.u32()? },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

fn put_stream_header(out: &mut BytesMut, kind: u8, stream: StreamId) {
    out.put_u8(kind);
    out.put_u32(stream);
}

fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A buffer to read a `Data` payload into, with room for the header in front.
/// Pass it to [`finish_data_frame`] once filled.
pub fn data_frame_buffer(payload_capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(DATA_HEADER_LEN + payload_capacity);
    buf.put_bytes(0, DATA_HEADER_LEN);
    buf
}

/// Writes the `Data` header in front of a payload read into a
/// [`data_frame_buffer`], giving the encoded frame without copying the payload.
pub fn finish_data_frame(mut buf: BytesMut, stream: StreamId) -> Bytes {
    debug_assert!(buf.len() >= DATA_HEADER_LEN);
    buf[0] = kind::DATA;
    buf[1..DATA_HEADER_LEN].copy_from_slice(&stream.to_be_bytes());
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{NONCE_LEN, PROOF_LEN};
    use crate::handshake::messages::{Resolver, PROTOCOL_VERSION};
    use proptest::prelude::*;
    use std::net::{IpAddr, SocketAddr};

    /// Addresses as the wire carries them: no IPv6 flow info or scope.
    fn addr() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), any::<u16>()).prop_map(SocketAddr::from)
    }

    fn target() -> impl Strategy<Value = Target> {
        prop_oneof![
            any::<u16>().prop_map(|port| Target::AgentPort { port }),
            addr().prop_map(Target::Addr),
            ("[a-z0-9.-]{1,60}", any::<u16>()).prop_map(|(host, port)| Target::Host { host, port }),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let payload = proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from);
        prop_oneof![
            (any::<u16>(), any::<[u8; NONCE_LEN]>()).prop_map(|(v, nonce)| Frame::Hello(Hello {
                min_version: v,
                max_version: v.saturating_add(1),
                nonce: Nonce(nonce),
            })),
            any::<[u8; NONCE_LEN]>().prop_map(|nonce| Frame::Challenge(Nonce(nonce))),
            proptest::collection::vec(any::<u8>(), PROOF_LEN).prop_map(|bytes| {
                Frame::Proof(Proof(bytes.try_into().expect("PROOF_LEN bytes")))
            }),
            (
                proptest::collection::vec(any::<u16>(), 0..8),
                "[ -~]{0,40}",
                proptest::collection::vec(addr(), 0..3),
                proptest::collection::vec("[a-z0-9.-]{1,40}", 0..6),
            )
                .prop_map(|(ports, agent, nameservers, search)| Frame::Welcome(
                    Welcome {
                        version: PROTOCOL_VERSION,
                        ports,
                        agent,
                        resolver: Resolver {
                            nameservers,
                            search,
                        },
                    }
                )),
            (any::<u32>(), target()).prop_map(|(stream, target)| Frame::Open { stream, target }),
            any::<u32>().prop_map(|stream| Frame::Opened { stream }),
            (any::<u32>(), payload.clone())
                .prop_map(|(stream, payload)| Frame::Data { stream, payload }),
            any::<u32>().prop_map(|stream| Frame::Fin { stream }),
            (any::<u32>(), "\\PC{0,100}")
                .prop_map(|(stream, reason)| Frame::Reset { stream, reason }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }),
            (any::<u32>(), addr(), payload).prop_map(|(flow, peer, payload)| {
                Frame::Datagram(udp::Datagram {
                    flow,
                    peer,
                    payload,
                })
            }),
            any::<u32>().prop_map(|flow| Frame::FlowEnd { flow }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in frame()) {
            prop_assert_eq!(Frame::decode(frame.encode()), Ok(frame));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(Bytes::from(bytes));
        }

        #[test]
        fn a_cut_frame_is_an_error_not_a_different_frame(frame in frame(), cut in 1usize..16) {
            let encoded = frame.encode();
            prop_assume!(!matches!(frame, Frame::Data { .. } | Frame::Reset { .. } | Frame::Datagram(_)));
            prop_assume!(cut < encoded.len());
            prop_assert!(Frame::decode(encoded.slice(..encoded.len() - cut)).is_err());
        }
    }

    #[test]
    fn in_place_data_frame_matches_encode() {
        let mut buf = data_frame_buffer(16);
        buf.extend_from_slice(b"hello");
        let frame = Frame::Data {
            stream: 7,
            payload: Bytes::from_static(b"hello"),
        };
        assert_eq!(finish_data_frame(buf, 7), frame.encode());
    }

    #[test]
    fn oversize_frames_are_refused_before_parsing() {
        let big = Bytes::from(vec![kind::DATA; MAX_FRAME_LEN + 1]);
        assert_eq!(
            Frame::decode(big),
            Err(DecodeError::TooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
    }

    #[test]
    fn reasons_are_cut_the_same_way_when_decoded() {
        // Found by `cargo fuzz run decode`: invalid UTF-8 grows into
        // replacement characters past the limit, and must not decode to a
        // reason that re-encodes differently.
        let mut raw = vec![kind::RESET, 0, 0, 0, 1];
        raw.extend(std::iter::repeat_n(0xff, 300));
        let frame = Frame::decode(Bytes::from(raw)).unwrap();
        assert_eq!(Frame::decode(frame.encode()), Ok(frame));
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let Ok(Frame::Reset { reason: cut, .. }) =
            Frame::decode(Frame::Reset { stream: 1, reason }.encode())
        else {
            panic!("reset must decode");
        };
        assert!(cut.len() <= MAX_REASON_LEN && cut.chars().all(|c| c == 'é'));
    }
}
