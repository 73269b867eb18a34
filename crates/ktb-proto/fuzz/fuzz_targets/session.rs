//! A live session's reader fed an arbitrary sequence of frames from an
//! authenticated peer: it must never panic, and after every frame the
//! session stays within its bounds (streams, receive budget, each stream's
//! window), which `dispatch_for_fuzzing` checks.
//!
//! Raw bytes rarely decode to frames that touch live streams, so most of
//! the input is read as a description of frames on a handful of stream
//! ids: per frame an operation byte, a stream byte and two length bytes.
#![no_main]

use bytes::Bytes;
use ktb_proto::session::{dispatch_for_fuzzing, Side};
use ktb_proto::tcp::Target;
use ktb_proto::{Frame, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((side, mut rest)) = data.split_first() else {
        return;
    };
    let side = if side % 2 == 0 { Side::Agent } else { Side::Client };
    let mut frames = Vec::new();
    while let [op, stream, a, b, tail @ ..] = rest {
        rest = tail;
        let stream = u32::from(*stream % 16);
        let n = u16::from_be_bytes([*a, *b]);
        let frame = match op % 8 {
            0 => Frame::Open {
                stream,
                target: Target::AgentPort { port: n },
            },
            1 => Frame::Data {
                stream,
                payload: Bytes::from(vec![0x5a; usize::from(n) * 2]),
            },
            2 => Frame::Fin { stream },
            3 => Frame::Opened { stream },
            4 => Frame::Reset {
                stream,
                reason: "fuzz".into(),
            },
            5 => Frame::Credit {
                stream,
                bytes: u32::from(n) << (op >> 3),
            },
            6 => Frame::FlowEnd { flow: stream },
            _ => {
                let len = usize::from(n).min(rest.len());
                let (raw, tail) = rest.split_at(len);
                rest = tail;
                frames.push(Bytes::copy_from_slice(raw));
                continue;
            }
        };
        frames.push(frame.encode());
    }
    let config = SessionConfig {
        max_streams: 4,
        receive_budget: 4 * 64 * 1024 + 256 * 1024,
        window: 192 * 1024,
        incoming_queue: 2,
        ..SessionConfig::default()
    };
    dispatch_for_fuzzing(side, config, &frames);
});
