//! The ktb agent: the process in the cluster that the developer's laptop
//! tunnels to.
//!
//! It serves one HTTP port: `/tunnel` upgrades to the WebSocket tunnel of
//! [`ktb_proto`], `/readyz` tells Kubernetes it is up (optionally also on a
//! port of its own, so the tunnel can listen on loopback only). Only the
//! holder of the session's private key may attach: the agent knows its
//! public half (`--client-key`) and checks a proof on every connection,
//! within the limits of [`preauth`]. In *exchange* role it
//! listens on the ports of the Service it stands in for and carries every
//! caller to the attached laptop ([`exchange`]); in *connect* role it dials
//! addresses and relays datagrams inside the cluster on the laptop's behalf
//! ([`connect`]); in *router* role it is the shared router of a Service
//! that several developers mesh, and accepts no tunnel at all ([`mesh`]).
//! One laptop is attached at a time; a newer attachment
//! replaces an older one, which is what a reconnecting laptop needs. When it
//! stands in for a Service, a dead man's switch ([`deadman`]) restores that
//! Service if the laptop vanishes.

pub mod attachment;
pub mod config;
pub mod connect;
pub mod deadman;
pub mod exchange;
pub mod mesh;
pub mod preauth;
pub mod probe;
pub mod route;
pub mod server;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};

pub use config::Config;

use attachment::Attachment;
use probe::Probes;

/// An agent with its sockets bound, ready to [`run`](Agent::run).
pub struct Agent {
    config: Arc<Config>,
    tunnel: TcpListener,
    /// `--ready-listen`, when given.
    ready: Option<TcpListener>,
    exposed: Vec<TcpListener>,
}

/// Pending connections the kernel may queue per listener. A burst of
/// callers beyond the default (1024 in tokio) would be dropped and then
/// reset; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// How long SIGTERM waits for an attached laptop to detach.
const DRAIN_LIMIT: std::time::Duration =
    std::time::Duration::from_secs(ktb_kube::names::AGENT_DRAIN_LIMIT_SECS);

pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Agent {
    /// Binds the tunnel port and every exposed port, so that a failure to
    /// bind is reported before anything is announced as ready.
    pub async fn bind(config: Config) -> anyhow::Result<Agent> {
        let tunnel = listen(config.listen)
            .with_context(|| format!("cannot listen for tunnels on {}", config.listen))?;
        let ready = match config.ready_listen {
            Some(addr) => Some(
                listen(addr)
                    .with_context(|| format!("cannot listen for readiness probes on {addr}"))?,
            ),
            None => None,
        };
        let mut exposed = Vec::new();
        for port in &config.expose_ports {
            let addr = SocketAddr::new(config.expose_address, *port);
            let listener =
                listen(addr).with_context(|| format!("cannot listen on exposed port {addr}"))?;
            exposed.push(listener);
        }
        Ok(Agent {
            config: Arc::new(config),
            tunnel,
            ready,
            exposed,
        })
    }

    /// Where the tunnel endpoint listens.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Where the readiness-only endpoint listens, when there is one.
    pub fn ready_addr(&self) -> Option<SocketAddr> {
        self.ready
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The exposed ports as bound (port 0 in the config becomes a real port).
    pub fn exposed_addrs(&self) -> Vec<SocketAddr> {
        self.exposed
            .iter()
            .map(|l| l.local_addr().expect("bound listener has an address"))
            .collect()
    }

    /// Serves until `shutdown` completes, then closes every tunnel with a reason.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ports = self.exposed_addrs().iter().map(SocketAddr::port).collect();
        let attachment = Arc::new(Attachment::new(ports, Arc::clone(&self.config)));
        let probes = Arc::new(Probes::new(
            self.config.namespace.clone(),
            self.config.service.clone(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for listener in self.exposed {
            tasks.spawn(exchange::serve_port(
                listener,
                Arc::clone(&attachment),
                Arc::clone(&probes),
            ));
        }
        let tls = Arc::new(tls::AgentTls::generate()?);
        tasks.spawn(server::serve(
            self.tunnel,
            server::Endpoint::Tunnel,
            Arc::clone(&attachment),
            Arc::clone(&probes),
            Some(tls),
        ));
        if let Some(ready) = self.ready {
            tasks.spawn(server::serve(
                ready,
                server::Endpoint::Readiness,
                Arc::clone(&attachment),
                Arc::clone(&probes),
                None,
            ));
        }
        tracing::info!(tunnel = %self.config.listen, ready = ?self.config.ready_listen, ports = ?attachment.ports(), connect = self.config.connect, "agent ready");
        let session_over = async {
            match self.config.dead_man() {
                Some(dead_man) => dead_man.watch(Arc::clone(&attachment)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown => {
                tracing::info!("shutting down");
                attachment.detached(DRAIN_LIMIT).await;
            }
            _ = session_over => tracing::info!("session over: exiting"),
        }
        attachment.shut_down().await;
        tasks.shutdown().await;
        Ok(())
    }
}
