//! Helpers shared by the workspace's integration tests: a tunnel harness
//! (agent and CLI in one process, on loopback), local servers to stand
//! behind it, a TCP proxy that can cut the tunnel, and a byte generator.
//!
//! Everything binds to 127.0.0.1 on ephemeral ports and every wait is
//! bounded, so tests cannot hang or touch anything off this machine.

pub mod cluster;
pub mod connect;
pub mod exchange;
pub mod harness;
pub mod proxy;
pub mod rbac;
pub mod resolved;
pub mod servers;

use std::time::Duration;

/// The longest any single step of a test may take before it fails.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Fails the test with `what` if `future` does not finish in [`STEP_TIMEOUT`].
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {STEP_TIMEOUT:?}: {what}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough to produce
/// hundreds of MiB in a test without dominating its time.
pub struct ByteSource(u64);

impl ByteSource {
    pub fn new(seed: u64) -> Self {
        ByteSource(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}
