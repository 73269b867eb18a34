//! SPDY/3.1 frames: as much of the protocol as a port-forward client
//! speaks, encoded and decoded without I/O so every byte is unit-tested.
//!
//! A frame is an 8-byte head and a payload. Control frames (high bit set)
//! carry the version (3), a type, flags and a 24-bit length; data frames
//! carry a 31-bit stream id, flags and a 24-bit length.
//!
//! Header blocks are zlib streams, one per connection and direction, with
//! the SPDY dictionary. A client may write them uncompressed: stored deflate
//! blocks, each followed by the empty stored block that marks a sync flush,
//! exactly what zlib emits at level 0. The server then never needs the
//! dictionary (the stream does not declare one), and ktb needs no zlib.
//! The server's header blocks (its replies) are never read: a port-forward
//! client needs nothing from them, only their stream ids.
//!
//! [`Deframer`] turns the bytes of a connection, cut anywhere, into
//! [`Event`]s; a data frame's payload is passed on as it arrives, without
//! waiting for the whole frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version in every control frame's head.
const VERSION: u16 = 3;
pub const HEAD_LEN: usize = 8;
/// The largest payload a frame's 24-bit length can describe.
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// The largest control frame read: a port-forward's replies and pings are
/// tens of bytes; more is a broken or hostile peer.
const MAX_CONTROL: usize = 64 * 1024;

/// FLAG_FIN: the sender's last frame on the stream.
const FIN: u8 = 0x01;

// Control frame types (SPDY/3.1 §2.6) that a port-forward client sends or
// acts on; the others (SETTINGS, HEADERS, WINDOW_UPDATE) are read and
// ignored: the Kubernetes servers do no flow control.
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;

/// zlib's two-byte stream header: deflate, 32 KiB window, no dictionary,
/// "fastest" level (its check bits make the pair a multiple of 31).
const ZLIB_HEADER: [u8; 2] = [0x78, 0x01];
/// A deflate stream's empty, non-final stored block: a sync flush.
const SYNC_FLUSH: [u8; 5] = [0x00, 0x00, 0x00, 0xff, 0xff];
/// The most a stored block holds (its length field is 16 bits).
const MAX_STORED: usize = u16::MAX as usize;

/// The head of a data frame on `stream` whose payload is `len` bytes.
pub fn data_head(stream: u32, fin: bool, len: usize) -> [u8; HEAD_LEN] {
    assert!(
        len <= MAX_PAYLOAD,
        "a data frame's payload is at most 16 MiB"
    );
    let mut head = [0; HEAD_LEN];
    head[..4].copy_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    head[4..].copy_from_slice(&(len as u32).to_be_bytes());
    head[4] = if fin { FIN } else { 0 };
    head
}

/// A data frame with no payload and FLAG_FIN: "I send no more on `stream`".
pub fn finish(stream: u32) -> [u8; HEAD_LEN] {
    data_head(stream, true, 0)
}

/// A PING frame carrying `id`.
pub fn ping(id: u32) -> Bytes {
    let mut frame = control_head(PING, 0, 4);
    frame.put_u32(id);
    frame.freeze()
}

/// The client's side of the connection's header compression: whether its
/// zlib stream has begun (its header goes in front of the first block).
#[derive(Debug, Default)]
pub struct HeaderBlocks {
    started: bool,
}

impl HeaderBlocks {
    /// A SYN_STREAM opening `stream` (odd: the client's) with `headers`,
    /// whose names must be lower case, as SPDY requires.
    pub fn syn_stream(&mut self, stream: u32, headers: &[(&str, &str)]) -> Bytes {
        let block = self.block(headers);
        let mut frame = control_head(SYN_STREAM, 0, 10 + block.len());
        frame.put_u32(stream & 0x7fff_ffff);
        frame.put_u32(0); // associated stream: none
        frame.put_u16(0); // priority 0 (highest), slot 0
        frame.put_slice(&block);
        frame.freeze()
    }

    /// `headers` as SPDY/3's name/value block, in stored deflate blocks.
    fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut plain = Vec::new();
        plain.put_u32(headers.len() as u32);
        for (name, value) in headers {
            debug_assert_eq!(
                *name,
                name.to_ascii_lowercase(),
                "SPDY header names are lower case"
            );
            plain.put_u32(name.len() as u32);
            plain.put_slice(name.as_bytes());
            plain.put_u32(value.len() as u32);
            plain.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(plain.len() + 16);
        if !std::mem::replace(&mut self.started, true) {
            out.put_slice(&ZLIB_HEADER);
        }
        for chunk in plain.chunks(MAX_STORED) {
            let len = chunk.len() as u16;
            out.put_u8(0x00); // BFINAL 0, BTYPE 00 (stored), padding
            out.put_u16_le(len);
            out.put_u16_le(!len);
            out.put_slice(chunk);
        }
        out.put_slice(&SYNC_FLUSH);
        out
    }
}

fn control_head(kind: u16, flags: u8, len: usize) -> BytesMut {
    let mut frame = BytesMut::with_capacity(HEAD_LEN + len);
    frame.put_u16(0x8000 | VERSION);
    frame.put_u16(kind);
    frame.put_u32((u32::from(flags) << 24) | len as u32);
    frame
}

/// What the server said, in the order it said it.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Payload bytes of a data frame on `stream`: a frame may arrive as
    /// several of these.
    Data { stream: u32, bytes: Bytes },
    /// The server sends no more on `stream` (FLAG_FIN on a data frame or a
    /// SYN_REPLY).
    Finished { stream: u32 },
    /// The server reset `stream` with a SPDY status code (1 PROTOCOL_ERROR,
    /// 3 REFUSED_STREAM, 5 CANCEL, ...).
    Reset { stream: u32, status: u32 },
    /// A PING the server started (even id): echo it back, or it may give
    /// up on the connection. Odd ids are answers to ours.
    Ping { id: u32 },
    /// The server opens no more streams; the connection is ending.
    GoAway { status: u32 },
}

/// The frames of a byte stream cut at arbitrary places.
#[derive(Debug, Default)]
pub struct Deframer {
    /// The bytes of a head, or of a control frame's payload, received so far.
    partial: BytesMut,
    state: State,
}

#[derive(Debug, Default)]
enum State {
    /// Collecting the next frame's 8-byte head in `partial`.
    #[default]
    Head,
    /// Inside a data frame on `stream`: `left` payload bytes still to
    /// come, then FLAG_FIN if `fin`.
    Data { stream: u32, left: usize, fin: bool },
    /// Collecting a control frame's `len`-byte payload in `partial`.
    Control { kind: u16, flags: u8, len: usize },
}

/// A byte stream that is not SPDY/3: the connection cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a control frame of SPDY version {0}, not 3")]
    Version(u16),
    #[error("a control frame of {0} bytes (at most {MAX_CONTROL} expected)")]
    Oversized(usize),
    #[error("a {kind} frame of {len} bytes, too short for its fields")]
    Truncated { kind: u16, len: usize },
}

impl Deframer {
    /// Reads `bytes`, the next piece of the stream, appending what they
    /// complete to `events`.
    pub fn feed(&mut self, mut bytes: Bytes, events: &mut Vec<Event>) -> Result<(), FrameError> {
        loop {
            match self.state {
                State::Data { stream, left, fin } => {
                    let take = left.min(bytes.len());
                    if take > 0 {
                        let piece = bytes.split_to(take);
                        events.push(Event::Data {
                            stream,
                            bytes: piece,
                        });
                    }
                    if take < left {
                        self.state = State::Data {
                            stream,
                            left: left - take,
                            fin,
                        };
                        return Ok(());
                    }
                    if fin {
                        events.push(Event::Finished { stream });
                    }
                    self.state = State::Head;
                }
                State::Head => {
                    if !self.fill(&mut bytes, HEAD_LEN) {
                        return Ok(());
                    }
                    let mut head = self.partial.split().freeze();
                    let first = head.get_u32();
                    let flags = head[0];
                    let len = (head.get_u32() & 0x00ff_ffff) as usize;
                    self.state = if first & 0x8000_0000 == 0 {
                        State::Data {
                            stream: first,
                            left: len,
                            fin: flags & FIN != 0,
                        }
                    } else {
                        let version = ((first >> 16) & 0x7fff) as u16;
                        if version != VERSION {
                            return Err(FrameError::Version(version));
                        }
                        if len > MAX_CONTROL {
                            return Err(FrameError::Oversized(len));
                        }
                        State::Control {
                            kind: first as u16,
                            flags,
                            len,
                        }
                    };
                }
                State::Control { kind, flags, len } => {
                    if !self.fill(&mut bytes, len) {
                        return Ok(());
                    }
                    let payload = self.partial.split().freeze();
                    events.extend(control(kind, flags, payload)?);
                    self.state = State::Head;
                }
            }
        }
    }

    /// Moves bytes into `partial` until it holds `want`; false if `bytes`
    /// ran out first.
    fn fill(&mut self, bytes: &mut Bytes, want: usize) -> bool {
        let take = (want - self.partial.len()).min(bytes.len());
        self.partial.put(bytes.split_to(take));
        self.partial.len() == want
    }
}

/// The event a control frame stands for, if a client acts on it (a
/// SYN_REPLY only matters when it finishes its stream at once).
fn control(kind: u16, flags: u8, mut payload: Bytes) -> Result<Option<Event>, FrameError> {
    let need = match kind {
        SYN_REPLY | PING => 4,
        RST_STREAM | GOAWAY => 8,
        _ => 0,
    };
    if payload.len() < need {
        return Err(FrameError::Truncated {
            kind,
            len: payload.len(),
        });
    }
    Ok(match kind {
        SYN_REPLY if flags & FIN != 0 => Some(Event::Finished {
            stream: payload.get_u32() & 0x7fff_ffff,
        }),
        RST_STREAM => Some(Event::Reset {
            stream: payload.get_u32() & 0x7fff_ffff,
            status: payload.get_u32(),
        }),
        PING => Some(Event::Ping {
            id: payload.get_u32(),
        }),
        GOAWAY => {
            payload.advance(4);
            Some(Event::GoAway {
                status: payload.get_u32(),
            })
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Server frames as Go's framer writes them, in every kind a client
    /// meets: a reply (its header block is never read), data, a ping, a
    /// setting, a finished stream, a reset and a goaway.
    fn server_frames() -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut reply = control_head(SYN_REPLY, 0, 4 + 6);
        reply.put_u32(3);
        reply.put_slice(&[0x78, 0xbb, 1, 2, 3, 4]);
        bytes.extend_from_slice(&reply);
        bytes.extend_from_slice(&data_head(3, false, 5));
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&ping(2));
        let mut settings = control_head(4, 0, 12);
        settings.put_u32(1);
        settings.put_u64(0x0700_0000_0001_0000);
        bytes.extend_from_slice(&settings);
        bytes.extend_from_slice(&data_head(1, true, 4));
        bytes.extend_from_slice(b"oops");
        let mut reset = control_head(RST_STREAM, 0, 8);
        reset.put_u32(5);
        reset.put_u32(3);
        bytes.extend_from_slice(&reset);
        let mut goaway = control_head(GOAWAY, 0, 8);
        goaway.put_u32(3);
        goaway.put_u32(0);
        bytes.extend_from_slice(&goaway);
        bytes
    }

    fn expected() -> Vec<Event> {
        vec![
            Event::Data {
                stream: 3,
                bytes: Bytes::from_static(b"hello"),
            },
            Event::Ping { id: 2 },
            Event::Data {
                stream: 1,
                bytes: Bytes::from_static(b"oops"),
            },
            Event::Finished { stream: 1 },
            Event::Reset {
                stream: 5,
                status: 3,
            },
            Event::GoAway { status: 0 },
        ]
    }

    /// Joins consecutive data pieces of one stream, as a reader sees them.
    fn merged(events: Vec<Event>) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for event in events {
            if let (
                Some(Event::Data {
                    stream: last,
                    bytes: before,
                }),
                Event::Data { stream, bytes },
            ) = (out.last_mut(), &event)
            {
                if last == stream {
                    *before = [before.as_ref(), bytes.as_ref()].concat().into();
                    continue;
                }
            }
            out.push(event);
        }
        out
    }

    #[test]
    fn frames_cut_anywhere_read_the_same() {
        let all = Bytes::from(server_frames());
        for cut in 0..=all.len() {
            let mut deframer = Deframer::default();
            let mut events = Vec::new();
            deframer.feed(all.slice(..cut), &mut events).unwrap();
            deframer.feed(all.slice(cut..), &mut events).unwrap();
            assert_eq!(merged(events), expected(), "cut at byte {cut}");
        }
        let mut deframer = Deframer::default();
        let mut events = Vec::new();
        for byte in all.iter() {
            deframer
                .feed(Bytes::copy_from_slice(&[*byte]), &mut events)
                .unwrap();
        }
        assert_eq!(merged(events), expected(), "one byte at a time");
    }

    #[test]
    fn data_is_passed_on_before_its_frame_is_complete() {
        let mut deframer = Deframer::default();
        let mut events = Vec::new();
        let mut start = data_head(3, true, 1000).to_vec();
        start.extend_from_slice(&[7; 10]);
        deframer.feed(start.into(), &mut events).unwrap();
        assert_eq!(
            events,
            [Event::Data {
                stream: 3,
                bytes: Bytes::from_static(&[7; 10])
            }]
        );
        events.clear();
        deframer
            .feed(Bytes::from_static(&[8; 990]), &mut events)
            .unwrap();
        assert_eq!(
            events,
            [
                Event::Data {
                    stream: 3,
                    bytes: Bytes::from_static(&[8; 990])
                },
                Event::Finished { stream: 3 }
            ]
        );
    }

    #[test]
    fn what_is_not_spdy_3_is_refused() {
        let read = |bytes: Vec<u8>| Deframer::default().feed(bytes.into(), &mut Vec::new());
        let mut spdy2 = control_head(PING, 0, 4).to_vec();
        spdy2[1] = 2;
        assert_eq!(read(spdy2), Err(FrameError::Version(2)));
        let huge = control_head(SYN_REPLY, 0, MAX_CONTROL + 1).to_vec();
        assert_eq!(read(huge), Err(FrameError::Oversized(MAX_CONTROL + 1)));
        let mut short = control_head(RST_STREAM, 0, 4).to_vec();
        short.put_u32(1);
        assert_eq!(
            read(short),
            Err(FrameError::Truncated {
                kind: RST_STREAM,
                len: 4
            })
        );
    }

    #[test]
    fn a_data_head_carries_stream_fin_and_length() {
        assert_eq!(data_head(3, false, 0x01_0203), [0, 0, 0, 3, 0, 1, 2, 3]);
        assert_eq!(
            data_head(3, true, MAX_PAYLOAD),
            [0, 0, 0, 3, 1, 0xff, 0xff, 0xff]
        );
        assert_eq!(finish(1), [0, 0, 0, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn only_the_first_header_block_begins_the_zlib_stream() {
        let mut blocks = HeaderBlocks::default();
        let first = blocks.syn_stream(1, &[("port", "80")]);
        let second = blocks.syn_stream(3, &[("port", "80")]);
        assert_eq!(first.len(), second.len() + ZLIB_HEADER.len());
        assert_eq!(first[18..20], ZLIB_HEADER);
        assert!(first.ends_with(&SYNC_FLUSH) && second.ends_with(&SYNC_FLUSH));
        // A block too long for one stored block is cut into several.
        let long = "x".repeat(MAX_STORED + 1);
        let big = HeaderBlocks::default().syn_stream(1, &[("port", &long)]);
        let plain = 4 + 4 + 4 + 4 + long.len();
        let stored = plain + 2 * 5;
        assert_eq!(
            big.len(),
            HEAD_LEN + 10 + ZLIB_HEADER.len() + stored + SYNC_FLUSH.len()
        );
    }
}
