//! Codec benchmark: what framing costs per message, beside the code it
//! measures. `cargo bench -p ktb-proto` prints medians of several runs.
//!
//! `Data` is the hot path (every tunnelled byte); `Credit` is the most
//! frequent control frame. In-place encoding of `Data` is measured against
//! the copying `Frame::encode` it replaces on the data path.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use ktb_proto::codec::{data_frame_buffer, finish_data_frame};
use ktb_proto::Frame;

const RUNS: usize = 7;

/// Median nanoseconds per call of `f` over `RUNS` runs of `iterations`.
fn median_ns(iterations: u32, mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn report(name: &str, ns: f64, bytes: usize) {
    let throughput = if bytes > 0 {
        format!("{:>8.2} GB/s", bytes as f64 / ns)
    } else {
        String::new()
    };
    println!("{name:<38} {ns:>10.1} ns {throughput}");
}

fn main() {
    let payload = Bytes::from(vec![0xabu8; 64 * 1024 - 5]);
    let encoded = Frame::Data {
        stream: 7,
        payload: payload.clone(),
    }
    .encode();
    // Both variants start from bytes "read from a socket" (the copy from
    // `payload`); the copying one then encodes them into a second buffer.
    report(
        "read + encode Data 64 KiB (copying)",
        median_ns(2_000, || {
            let read = Bytes::copy_from_slice(black_box(&payload));
            drop(
                Frame::Data {
                    stream: 7,
                    payload: read,
                }
                .encode(),
            );
        }),
        payload.len(),
    );
    report(
        "read + encode Data 64 KiB (in place)",
        median_ns(2_000, || {
            let mut buf = data_frame_buffer(payload.len());
            buf.extend_from_slice(black_box(&payload));
            drop(finish_data_frame(buf, 7));
        }),
        payload.len(),
    );
    report(
        "decode Data 64 KiB",
        median_ns(200_000, || drop(Frame::decode(black_box(encoded.clone())))),
        payload.len(),
    );
    let credit = Frame::Credit {
        stream: 7,
        bytes: 262_144,
    };
    let credit_bytes = credit.encode();
    report(
        "encode Credit",
        median_ns(1_000_000, || drop(black_box(&credit).encode())),
        0,
    );
    report(
        "decode Credit",
        median_ns(1_000_000, || {
            drop(Frame::decode(black_box(credit_bytes.clone())))
        }),
        0,
    );
}
