//! WebSocket frames (RFC 6455) as the client of a port-forward writes and
//! reads them, encoded and decoded without I/O so every byte is
//! unit-tested. The SPDY pump speaks them on the upgraded connection.
//!
//! Why not tungstenite, which the channel pump still uses: its writer
//! copies each message into a send buffer, masks it there and, after every
//! partial write, moves what is left of the buffer to its front. Under a
//! bulk download those moves were 11 % of the CLI's samples (`perf
//! record`, README "Performance"). Here a message is masked in place, in
//! the buffer the tunnel's bytes were read into, behind a head written
//! into room the caller left in front ([`HEAD_ROOM`]); the server's
//! payloads are passed on as slices of the read buffer.
//!
//! Only what a port-forward needs: binary messages and pongs out; in, the
//! payload bytes of binary messages, passed on as they arrive, not a whole
//! message at a time (the SPDY deframer takes bytes cut anywhere, so where
//! frames and fragments end does not matter), pings to answer, and the
//! close that ends the connection. No extension is offered, so a frame
//! with a reserved bit set is a broken peer, as is a masked server frame.

use bytes::{Buf, Bytes, BytesMut};

/// Room a message's buffer keeps in front of its payload for the longest
/// client head: 2 bytes, an 8-byte length, the 4-byte masking key.
pub const HEAD_ROOM: usize = 14;

const FIN: u8 = 0x80;
const RESERVED: u8 = 0x70;
const MASKED: u8 = 0x80;
/// A control frame's payload is at most this long (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

// Opcodes (RFC 6455 §5.2).
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

/// Makes `buffer`, whose payload follows [`HEAD_ROOM`] bytes left for the
/// head, into one final binary frame, masked in place.
pub fn binary(buffer: BytesMut) -> Bytes {
    seal(BINARY, buffer)
}

/// A binary frame carrying a copy of `payload`, for small messages.
pub fn binary_copy(payload: &[u8]) -> Bytes {
    binary(with_head_room(payload))
}

/// The answer to a ping that carried `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    seal(PONG, with_head_room(payload))
}

fn with_head_room(payload: &[u8]) -> BytesMut {
    let mut buffer = BytesMut::with_capacity(HEAD_ROOM + payload.len());
    buffer.resize(HEAD_ROOM, 0);
    buffer.extend_from_slice(payload);
    buffer
}

fn seal(opcode: u8, mut buffer: BytesMut) -> Bytes {
    let len = buffer.len() - HEAD_ROOM;
    let key: [u8; 4] = rand::random();
    mask(&mut buffer[HEAD_ROOM..], key);
    let mut head = [0; HEAD_ROOM];
    head[0] = FIN | opcode;
    let length_end = match len {
        0..=125 => {
            head[1] = MASKED | len as u8;
            2
        }
        126..=0xffff => {
            head[1] = MASKED | 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            head[1] = MASKED | 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    head[length_end..length_end + 4].copy_from_slice(&key);
    let head = &head[..length_end + 4];
    let start = HEAD_ROOM - head.len();
    buffer[start..HEAD_ROOM].copy_from_slice(head);
    buffer.advance(start);
    buffer.freeze()
}

/// XORs `payload` with the masking key, 8 bytes at a time (what the
/// compiler turns into vector instructions) and the tail byte by byte.
fn mask(payload: &mut [u8], key: [u8; 4]) {
    let [a, b, c, d] = key;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = payload.chunks_exact_mut(8);
    for word in &mut words {
        let masked = u64::from_ne_bytes((&*word).try_into().expect("8 bytes")) ^ wide;
        word.copy_from_slice(&masked.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the key starts over with it.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// What the server sent, in the order it sent it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Payload bytes of a binary message, a frame's whole payload or part.
    Data(Bytes),
    /// A ping, to answer with a [`pong`] carrying the same payload.
    Ping(Bytes),
    /// The server closes the connection.
    Close,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the server masked a frame (only clients mask)")]
    Masked,
    #[error("a frame sets reserved bits {0:#04x} though no extension was agreed")]
    Reserved(u8),
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("a control frame is fragmented or longer than 125 bytes")]
    Control,
}

/// Reads the server's frames out of the bytes of the connection, which
/// arrive cut anywhere.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Payload bytes of the current data frame not passed on yet; 0
    /// between frames.
    remaining: u64,
    /// Whether the message the current data frame belongs to is binary
    /// (passed on) or text (skipped: a port-forward sends none). A
    /// continuation frame keeps its message's kind.
    binary: bool,
}

impl Decoder {
    /// The next thing `buffer` holds, its bytes taken from the buffer;
    /// `Ok(None)` when more bytes are needed first.
    pub fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        loop {
            if self.remaining > 0 {
                if buffer.is_empty() {
                    return Ok(None);
                }
                let n = self.remaining.min(buffer.len() as u64) as usize;
                self.remaining -= n as u64;
                let payload = buffer.split_to(n).freeze();
                if self.binary {
                    return Ok(Some(Incoming::Data(payload)));
                }
                continue;
            }
            let Some(head) = Head::parse(buffer)? else {
                return Ok(None);
            };
            if head.opcode & 0x8 == 0 {
                self.binary = match head.opcode {
                    CONTINUATION => self.binary,
                    TEXT => false,
                    BINARY => true,
                    other => return Err(FrameError::Opcode(other)),
                };
                buffer.advance(head.len);
                self.remaining = head.payload;
                continue;
            }
            if !head.fin || head.payload > MAX_CONTROL as u64 {
                return Err(FrameError::Control);
            }
            let end = head.len + head.payload as usize;
            if buffer.len() < end {
                return Ok(None);
            }
            let payload = buffer.split_to(end).split_off(head.len).freeze();
            match head.opcode {
                PING => return Ok(Some(Incoming::Ping(payload))),
                CLOSE => return Ok(Some(Incoming::Close)),
                PONG => {}
                other => return Err(FrameError::Opcode(other)),
            }
        }
    }
}

/// A frame's head, as the server sends it (unmasked).
struct Head {
    fin: bool,
    opcode: u8,
    /// The head's own length: 2, 4 or 10 bytes.
    len: usize,
    /// The payload's length.
    payload: u64,
}

impl Head {
    /// The head at the start of `buffer`, if it is all there; the buffer
    /// is left as it is.
    fn parse(buffer: &[u8]) -> Result<Option<Head>, FrameError> {
        let [first, second, ..] = *buffer else {
            return Ok(None);
        };
        if first & RESERVED != 0 {
            return Err(FrameError::Reserved(first & RESERVED));
        }
        if second & MASKED != 0 {
            return Err(FrameError::Masked);
        }
        let (len, payload) = match second & 0x7f {
            126 => match buffer.get(2..4) {
                Some(bytes) => (4, u64::from(u16::from_be_bytes([bytes[0], bytes[1]]))),
                None => return Ok(None),
            },
            127 => match buffer.get(2..10) {
                Some(bytes) => (10, u64::from_be_bytes(bytes.try_into().expect("8 bytes"))),
                None => return Ok(None),
            },
            short => (2, u64::from(short)),
        };
        Ok(Some(Head {
            fin: first & FIN != 0,
            opcode: first & 0x0f,
            len,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `frame` as the server reads it: its opcode and unmasked payload.
    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(frame[0] & FIN, FIN, "ktb's frames are final");
        assert_eq!(frame[1] & MASKED, MASKED, "ktb's frames are masked");
        let (at, len) = match frame[1] & 0x7f {
            126 => (4, usize::from(u16::from_be_bytes([frame[2], frame[3]]))),
            127 => (
                10,
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            ),
            short => (2, usize::from(short)),
        };
        let key = &frame[at..at + 4];
        let payload = &frame[at + 4..];
        assert_eq!(payload.len(), len);
        let payload = payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k);
        (frame[0] & 0x0f, payload.collect())
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn every_length_form_is_masked_and_read_back() {
        // 7-bit, 16-bit and 64-bit lengths, at and around their limits, and
        // tails of every length after the 8-byte words.
        for len in [
            0,
            1,
            7,
            8,
            9,
            125,
            126,
            127,
            0xffff,
            0x10000,
            256 * 1024 + 3,
        ] {
            let sent = payload(len);
            let mut buffer = BytesMut::zeroed(HEAD_ROOM);
            buffer.extend_from_slice(&sent);
            let frame = binary(buffer);
            assert_eq!(unmask(&frame), (BINARY, sent), "{len} bytes");
        }
        assert_eq!(unmask(&pong(b"beat")), (PONG, b"beat".to_vec()));
        assert_eq!(
            unmask(&binary_copy(b"opening")),
            (BINARY, b"opening".to_vec())
        );
    }

    #[test]
    fn each_frame_has_its_own_key() {
        let keys: std::collections::HashSet<Vec<u8>> = (0..8)
            .map(|_| binary_copy(b"same payload")[2..6].to_vec())
            .collect();
        assert!(keys.len() > 1, "eight frames shared one masking key");
    }

    /// An unmasked server frame.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            len @ 0..=125 => frame.push(len as u8),
            len @ 126..=0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    /// Everything `bytes` decodes to, fed `step` bytes at a time; data
    /// joined into one item between other items.
    fn decode_all(bytes: &[u8], step: usize) -> Result<Vec<Incoming>, FrameError> {
        let mut decoder = Decoder::default();
        let mut buffer = BytesMut::new();
        let mut out: Vec<Incoming> = Vec::new();
        for piece in bytes.chunks(step) {
            buffer.extend_from_slice(piece);
            while let Some(incoming) = decoder.decode(&mut buffer)? {
                match (out.last_mut(), incoming) {
                    (Some(Incoming::Data(joined)), Incoming::Data(more)) => {
                        *joined = [joined.as_ref(), more.as_ref()].concat().into();
                    }
                    (_, incoming) => out.push(incoming),
                }
            }
        }
        assert!(buffer.is_empty(), "bytes left undecoded");
        Ok(out)
    }

    #[test]
    fn server_frames_decode_alike_however_the_bytes_are_cut() {
        let big = payload(70_000);
        let mut stream = Vec::new();
        stream.extend(server_frame(BINARY, b"he")); // a first fragment...
        stream.extend(server_frame(FIN | PING, b"are you there"));
        stream.extend(server_frame(FIN | CONTINUATION, b"llo")); // ...and its last
        stream.extend(server_frame(FIN | TEXT, b"skipped"));
        stream.extend(server_frame(FIN | PONG, b""));
        stream.extend(server_frame(FIN | BINARY, &big));
        stream.extend(server_frame(FIN | BINARY, &payload(300)));
        stream.extend(server_frame(FIN | CLOSE, &[0x03, 0xe8]));
        // The text and the pong between them skipped, the rest of the data
        // arrives as one run.
        let mut after_ping = b"llo".to_vec();
        after_ping.extend(&big);
        after_ping.extend(payload(300));
        let expected = vec![
            Incoming::Data(Bytes::from_static(b"he")),
            Incoming::Ping(Bytes::from_static(b"are you there")),
            Incoming::Data(after_ping.into()),
            Incoming::Close,
        ];
        for step in [1, 2, 3, 13, 4096, stream.len()] {
            let decoded = decode_all(&stream, step).unwrap();
            // Not assert_eq!: a mismatch would print 70 KB.
            assert!(decoded == expected, "step {step}: {} items", decoded.len());
        }
    }

    #[test]
    fn broken_or_hostile_frames_are_refused() {
        let refused = |frame: Vec<u8>| decode_all(&frame, frame.len()).unwrap_err();
        let mut masked = server_frame(FIN | BINARY, b"x");
        masked[1] |= MASKED;
        assert_eq!(refused(masked), FrameError::Masked);
        assert_eq!(
            refused(server_frame(FIN | 0x40 | BINARY, b"x")),
            FrameError::Reserved(0x40)
        );
        assert_eq!(
            refused(server_frame(FIN | 0x3, b"x")),
            FrameError::Opcode(0x3)
        );
        assert_eq!(
            refused(server_frame(FIN | 0xb, b"")),
            FrameError::Opcode(0xb)
        );
        assert_eq!(refused(server_frame(PING, b"")), FrameError::Control);
        assert_eq!(
            refused(server_frame(FIN | PING, &[0; 126])),
            FrameError::Control
        );
    }

    #[test]
    fn a_huge_length_is_streamed_not_buffered() {
        // A frame claiming 2^62 bytes: what arrives is passed on as it
        // comes, nothing waits for the rest.
        let mut frame = vec![FIN | BINARY, 127];
        frame.extend_from_slice(&(1u64 << 62).to_be_bytes());
        frame.extend_from_slice(b"abc");
        let mut decoder = Decoder::default();
        let mut buffer = BytesMut::from(&frame[..]);
        assert_eq!(
            decoder.decode(&mut buffer).unwrap(),
            Some(Incoming::Data(Bytes::from_static(b"abc")))
        );
        assert_eq!(decoder.decode(&mut buffer).unwrap(), None);
        assert!(buffer.is_empty());
    }
}
