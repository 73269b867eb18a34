//! The primitives every message family is written in: the limits on a
//! frame, the kind byte that opens it, bounds-checked reading of untrusted
//! bytes and the one error it can give. The families ([`crate::handshake`],
//! [`crate::tcp`], [`crate::udp`]) are written with it, so none of them
//! needs the codec, which frames them all.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest payload of one `Data` or `Datagram` frame.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Largest frame either side accepts: a payload plus the longest header.
/// Larger WebSocket messages are refused before they are buffered.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD + 64;

/// The first byte of every frame: which message it is (the table in the
/// crate's documentation).
pub(crate) mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const CHALLENGE: u8 = 0x03;
    pub const PROOF: u8 = 0x04;
    pub const OPEN: u8 = 0x10;
    pub const OPENED: u8 = 0x11;
    pub const DATA: u8 = 0x12;
    pub const FIN: u8 = 0x13;
    pub const RESET: u8 = 0x14;
    pub const CREDIT: u8 = 0x15;
    pub const DATAGRAM: u8 = 0x20;
    pub const FLOW_END: u8 = 0x21;
}

/// Why bytes from the peer are not a frame. The session closes the tunnel
/// with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("frame of kind 0x{kind:02x} is truncated")]
    Truncated { kind: u8 },
    #[error("frame of kind 0x{kind:02x} has {extra} unexpected trailing bytes")]
    Trailing { kind: u8, extra: usize },
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge { len: usize },
    #[error("invalid {field}")]
    Invalid { field: &'static str },
}

/// Bounds-checked reading of a frame body; every short read is a
/// [`DecodeError::Truncated`] naming the frame kind.
pub(crate) struct Reader {
    /// The frame's kind byte, read when the reader was made.
    pub(crate) kind: u8,
    bytes: Bytes,
}

impl Reader {
    pub(crate) fn new(bytes: Bytes) -> Result<Self, DecodeError> {
        let kind = *bytes.first().ok_or(DecodeError::Empty)?;
        Ok(Reader {
            kind,
            bytes: bytes.slice(1..),
        })
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated { kind: self.kind }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.bytes.len() < n {
            return Err(self.truncated());
        }
        Ok(self.bytes.split_to(n))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed (u8) UTF-8 string.
    pub(crate) fn short_string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Invalid { field })
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing {
                kind: self.kind,
                extra,
            }),
        }
    }
}

/// Writes a length-prefixed (u8) string, cutting it at 255 bytes on a char boundary.
pub(crate) fn put_short_string(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u8::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u8(end as u8);
    out.put_slice(&s.as_bytes()[..end]);
}
