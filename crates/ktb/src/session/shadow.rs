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
use std::time::Duration;

use ktb_kube::names::AGENT_TUNNEL_PORT;
use ktb_proto::auth::ClientKey;
use ktb_proto::SessionConfig;

use crate::cluster::Cluster;
use crate::expose::Expose;
use crate::pinned_tls::{self, PinnedTls};
use crate::portforward::PortForward;
use crate::proof;
use crate::report::Reporter;
use crate::session::agent_pod::{AgentPod, AgentPodSpec};
use crate::target::PortRoute;
use crate::tunnel::{self, RunningTunnel, Transport, TunnelConfig};

/// How the laptop reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// A port-forward through the apiserver: works wherever kubectl does.
    PortForward,
    /// TLS straight to the pod's IP, its certificate pinned (see
    /// [`crate::pinned_tls`]), for laptops that can reach pod IPs (a VPN
    /// into the cluster network, or `ktb connect`).
    Direct,
    /// Direct when the pod's IP answers from here, else the port-forward.
    Auto,
}

impl TransportKind {
    /// Whether the agent must listen on the pod network, not loopback only.
    pub fn dials_pod_ip(self) -> bool {
        matches!(self, TransportKind::Direct | TransportKind::Auto)
    }
}

/// How long `--transport auto` waits for the pod's IP before it takes the
/// port-forward: an unroutable address fails at once, but one whose
/// packets are dropped on the way only times out.
const AUTO_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How this machine reaches the agent: decided once, used by the tunnel
/// and by the path proof alike.
#[derive(Clone)]
enum AgentTransport {
    PortForward(PortForward),
    Direct(PinnedTls),
}

impl AgentTransport {
    /// Decides the way to the agent at `ip` for `kind`; a port-forward
    /// always carries the certificate's fingerprint (see
    /// [`crate::pinned_tls`]).
    async fn choose(
        kind: TransportKind,
        port_forward: PortForward,
        ip: IpAddr,
        reporter: &Reporter,
    ) -> anyhow::Result<AgentTransport> {
        let addr = SocketAddr::new(ip, AGENT_TUNNEL_PORT).to_string();
        match kind {
            TransportKind::PortForward => Ok(AgentTransport::PortForward(port_forward)),
            TransportKind::Direct => {
                let pin = pinned_tls::fetch_fingerprint(&port_forward).await?;
                Ok(AgentTransport::Direct(PinnedTls::new(addr, pin)))
            }
            TransportKind::Auto => {
                let direct = async {
                    let pin = pinned_tls::fetch_fingerprint(&port_forward).await?;
                    let tls = PinnedTls::new(addr.clone(), pin);
                    tokio::time::timeout(AUTO_DIAL_TIMEOUT, tls.connect())
                        .await
                        .map_err(|_| anyhow::anyhow!("no answer in {AUTO_DIAL_TIMEOUT:?}"))??;
                    anyhow::Ok(tls)
                };
                match direct.await {
                    Ok(tls) => {
                        reporter
                            .progress(format!("the pod IP {ip} answers from here: going direct"));
                        Ok(AgentTransport::Direct(tls))
                    }
                    Err(e) => {
                        reporter.progress(format!(
                            "the pod IP {ip} does not answer from here ({e:#}): taking the port-forward"
                        ));
                        Ok(AgentTransport::PortForward(port_forward))
                    }
                }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            AgentTransport::PortForward(_) => "port-forward through the apiserver".into(),
            AgentTransport::Direct(t) => format!("direct to {}", t.describe()),
        }
    }
}

/// A ready agent pod and the way to it.
pub struct Shadow {
    pub pod: AgentPod,
    ip: IpAddr,
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
            let ip = pod.pod_ip().await?;
            let port_forward = PortForward {
                client: cluster.client.clone(),
                namespace: cluster.namespace.clone(),
                pod: pod.name.clone(),
                port: AGENT_TUNNEL_PORT,
            };
            let transport = AgentTransport::choose(transport, port_forward, ip, reporter).await?;
            anyhow::Ok((ip, transport))
        };
        match ready.await {
            Ok((ip, transport)) => Ok(Shadow { pod, ip, transport }),
            Err(e) => {
                pod.delete().await;
                Err(e)
            }
        }
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
        reporter.progress(format!(
            "opening the tunnel ({})",
            self.transport.describe()
        ));
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
