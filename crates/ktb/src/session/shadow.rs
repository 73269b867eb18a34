//! A session's agent pod standing in for callers (the "shadow"): created,
//! ready, reached over the transport the developer chose, its tunnel open,
//! and the path from a Service to it proven by traffic.
//!
//! Exchange, mesh and preview all stand a shadow in for a Service's
//! callers; they differ only in what points callers at it (the exchanged
//! Service's selector, the shared mesh router, a new Service), which stays
//! in each command's module. The transport is decided once, so the tunnel
//! and the proof always take the same path. `ktb doctor` starts one too,
//! in connect role with no Service, to time the way to it and remove it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ktb_kube::names::AGENT_TUNNEL_PORT;
use ktb_proto::auth::ClientKey;
use ktb_proto::SessionConfig;

use crate::cluster::Cluster;
use crate::expose::Expose;
use crate::portforward::PortForward;
use crate::proof;
use crate::report::Reporter;
use crate::session::agent_pod::{AgentPod, AgentPodSpec};
use crate::target::PortRoute;
use crate::tunnel::{self, Direct, RunningTunnel, TunnelConfig};

/// How the laptop reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// A port-forward through the apiserver: works wherever kubectl does.
    PortForward,
    /// TCP straight to the pod's IP, for laptops that can reach pod IPs
    /// (a VPN into the cluster network, or `ktb connect`).
    Direct,
}

impl TransportKind {
    fn describe(self) -> &'static str {
        match self {
            TransportKind::PortForward => "port-forward through the apiserver",
            TransportKind::Direct => "direct to the pod IP",
        }
    }
}

/// How this machine reaches the agent: decided once, used by the tunnel
/// and by the path proof alike.
#[derive(Clone)]
enum AgentTransport {
    PortForward(PortForward),
    Direct(Direct),
}

/// A ready agent pod and the way to it.
pub struct Shadow {
    pub pod: AgentPod,
    ip: IpAddr,
    kind: TransportKind,
    transport: AgentTransport,
}

impl Shadow {
    /// Creates the agent pod and waits until it is ready; on failure the
    /// pod's objects are deleted again.
    pub async fn start(
        cluster: &Cluster,
        spec: &AgentPodSpec<'_>,
        transport: TransportKind,
        reporter: &Reporter,
    ) -> anyhow::Result<Shadow> {
        reporter.progress(format!("creating agent pod {}", spec.name));
        let pod = AgentPod::create(&cluster.client, &cluster.namespace, spec).await?;
        let ready = async {
            reporter.progress("waiting for the agent pod to be ready");
            pod.wait_ready(spec.settings.ready_timeout).await?;
            pod.pod_ip().await
        };
        let ip = match ready.await {
            Ok(ip) => ip,
            Err(e) => {
                pod.delete().await;
                return Err(e);
            }
        };
        let kind = transport;
        let transport = match transport {
            TransportKind::PortForward => AgentTransport::PortForward(PortForward {
                client: cluster.client.clone(),
                namespace: cluster.namespace.clone(),
                pod: pod.name.clone(),
                port: AGENT_TUNNEL_PORT,
            }),
            TransportKind::Direct => AgentTransport::Direct(Direct {
                addr: SocketAddr::new(ip, AGENT_TUNNEL_PORT).to_string(),
            }),
        };
        Ok(Shadow {
            pod,
            ip,
            kind,
            transport,
        })
    }

    /// The pod's IP on the cluster network.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Opens the tunnel that carries the agent's callers on `routes` to
    /// this machine's local ports.
    pub async fn open_tunnel(
        &self,
        routes: &[PortRoute],
        key: ClientKey,
        reporter: &Reporter,
    ) -> anyhow::Result<RunningTunnel> {
        reporter.progress(format!("opening the tunnel ({})", self.kind.describe()));
        let config = TunnelConfig {
            key: Arc::new(key),
            session: SessionConfig::default(),
        };
        let role = tunnel::exchange_role(
            routes
                .iter()
                .map(|r| Expose {
                    local: r.local,
                    remote: Some(r.target_port),
                })
                .collect(),
        );
        match self.transport.clone() {
            AgentTransport::PortForward(t) => RunningTunnel::start(t, config, role, reporter).await,
            AgentTransport::Direct(t) => RunningTunnel::start(t, config, role, reporter).await,
        }
    }

    /// Proves that callers of Service `qualified` reach this agent on every
    /// route (see [`proof`]); `mark` for a mesh member.
    pub async fn prove(
        &self,
        qualified: &str,
        routes: &[PortRoute],
        mark: Option<&str>,
    ) -> anyhow::Result<()> {
        match &self.transport {
            AgentTransport::PortForward(t) => proof::prove(t, qualified, routes, mark).await,
            AgentTransport::Direct(t) => proof::prove(t, qualified, routes, mark).await,
        }
    }

    /// Proves that callers of Service `qualified` no longer reach this
    /// agent on any route (see [`proof`]); `mark` for a mesh member.
    pub async fn prove_handed_back(
        &self,
        qualified: &str,
        routes: &[PortRoute],
        mark: Option<&str>,
    ) -> anyhow::Result<()> {
        match &self.transport {
            AgentTransport::PortForward(t) => {
                proof::prove_handed_back(t, qualified, routes, mark).await
            }
            AgentTransport::Direct(t) => proof::prove_handed_back(t, qualified, routes, mark).await,
        }
    }
}
