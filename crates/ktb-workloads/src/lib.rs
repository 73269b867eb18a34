//! Shared pieces of the test workloads that `cargo xtask cluster up` packs
//! into images (`ktb.test/http-echo:dev` and friends) for the test cluster.
//!
//! They exist so that end-to-end tests can tell *which* pod answered and
//! push bytes through Services, port-forwards and tunnels without pulling
//! anything from a registry: each binary is static (musl), depends only on
//! std and tokio, listens on the port given by `PORT` (or its default), and
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
