//! Shared pieces of the test workloads that `cargo xtask cluster up` packs
//! into images (`ktb.test/http-echo:dev` and friends) for the test cluster.
//!
//! They exist so that end-to-end tests can tell *which* pod answered and
//! push bytes through Services, port-forwards and tunnels without pulling
//! anything from a registry: each binary is static (musl), depends on std
//! and tokio (grpc-echo and http-echo's relay also on hyper, tonic and
//! prost), listens on the port given by `PORT` (or its default), and
//! exits promptly on SIGTERM so pod deletion does not wait for the grace
//! period.

use std::net::{Ipv6Addr, SocketAddr};

/// The name of the pod this process runs in: `POD_NAME` if the pod spec
/// sets it from the downward API, else the hostname (which Kubernetes sets
/// to the pod name), else `unknown`.
pub fn pod_name() -> String {
    if let Ok(name) = std::env::var("POD_NAME") {
        if !name.is_empty() {
            return name;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The address to listen on: every address (dual-stack where the kernel
/// allows it) on `PORT` or `default_port`.
pub fn listen_addr(default_port: u16) -> SocketAddr {
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default_port);
    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
}

/// Resolves when the process receives SIGTERM or SIGINT. As PID 1 of a
/// container a process without handlers ignores both, and the kubelet would
/// wait the whole termination grace period before killing it.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// DNS query timing for benchmarks: the same code measures a query from a
/// pod to CoreDNS (the floor) and from a laptop through `ktb connect`.
pub mod dns {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};

    /// A recursive query for the A record of `name`, as sent on the wire.
    pub fn a_query(id: u16, name: &str) -> Vec<u8> {
        let mut query = Vec::with_capacity(18 + name.len());
        query.extend_from_slice(&id.to_be_bytes());
        // Flags: recursion desired; one question, no other records.
        query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.trim_end_matches('.').split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        query
    }

    /// Sends `count` queries one after the other and returns each one's
    /// round trip; a query unanswered within a second fails the run.
    pub fn latencies(server: SocketAddr, name: &str, count: u16) -> std::io::Result<Vec<Duration>> {
        let socket = UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 1500];
        let mut times = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            let query = a_query(id, name);
            let sent = Instant::now();
            socket.send(&query)?;
            loop {
                let n = socket.recv(&mut buf)?;
                // A late answer to an earlier query is skipped.
                if n >= 2 && buf[..2] == id.to_be_bytes() {
                    break;
                }
            }
            times.push(sent.elapsed());
        }
        Ok(times)
    }
}

/// Transfers that end with a half-close, for tests of connect's TCP: the
/// bytes sent are a fixed pattern, so each end can check by SHA-256 that
/// nothing was lost, added or reordered.
pub mod half_close {
    use sha2::{Digest, Sha256};

    /// What a server that speaks first (tcp-echo's port 9002) sends before
    /// it half-closes.
    pub const GREETING_LEN: u64 = 1024 * 1024;

    /// Fills `buf` with the pattern's bytes from `offset` on. Not constant
    /// and not periodic at any power of two, so a lost or shifted segment
    /// changes the digest.
    fn fill(buf: &mut [u8], offset: u64) {
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = (at.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (at % 251) as u8;
        }
    }

    /// The first `len` bytes of the pattern, in pieces of at most 64 KiB.
    pub fn chunks(len: u64) -> impl Iterator<Item = Vec<u8>> {
        const CHUNK: u64 = 64 * 1024;
        (0..len.div_ceil(CHUNK)).map(move |i| {
            let offset = i * CHUNK;
            let mut chunk = vec![0u8; (len - offset).min(CHUNK) as usize];
            fill(&mut chunk, offset);
            chunk
        })
    }

    /// `LEN HEX`: what the digest server answers for `len` bytes hashed
    /// into `hasher`.
    pub fn summary(len: u64, hasher: Sha256) -> String {
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{len} {hex}")
    }

    /// The summary of the first `len` bytes of the pattern.
    pub fn expected(len: u64) -> String {
        let mut hasher = Sha256::new();
        chunks(len).for_each(|chunk| hasher.update(&chunk));
        summary(len, hasher)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn chunks_cover_the_pattern_exactly_and_continue_it_across_pieces() {
            let lens: Vec<usize> = chunks(2 * 65536 + 1).map(|c| c.len()).collect();
            assert_eq!(lens, [65536, 65536, 1]);
            assert_eq!(chunks(0).count(), 0);
            let whole: Vec<u8> = chunks(70_000).flatten().collect();
            let mut direct = vec![0u8; 70_000];
            fill(&mut direct, 0);
            assert_eq!(whole, direct);
        }
    }
}
