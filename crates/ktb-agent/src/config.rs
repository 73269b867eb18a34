//! Agent configuration: flags, each with an environment variable, because the
//! agent is configured by a pod spec and tested as a local process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ktb_kube::grace::parse_duration;
use ktb_proto::handshake::Resolver;
use ktb_proto::ClientPublicKey;

use crate::connect::DialPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ktb-agent",
    version,
    about = "The ktb agent: the cluster end of a ktb tunnel"
)]
pub struct Config {
    /// Address of the tunnel endpoint: `/tunnel` (WebSocket) and `/readyz`.
    /// `127.0.0.1:7777` keeps it off the pod network: a port-forward still
    /// reaches it (it connects inside the pod), nothing else does.
    #[arg(long, env = "KTB_AGENT_LISTEN", default_value = "0.0.0.0:7777")]
    pub listen: SocketAddr,

    /// Another address serving only `/readyz`, for the kubelet's probe when
    /// the tunnel endpoint listens on loopback (e.g. `0.0.0.0:7778`).
    #[arg(long, env = "KTB_AGENT_READY_LISTEN")]
    pub ready_listen: Option<SocketAddr>,

    /// The session's public key, 64 hex digits: only the holder of its
    /// private half (the developer's `ktb`, which never writes it out) may
    /// attach. Public, so it may sit in the pod spec. A mesh router
    /// (`--mesh-of`) has no tunnel and no key.
    #[arg(
        long,
        env = "KTB_AGENT_CLIENT_KEY",
        required_unless_present = "mesh_of"
    )]
    pub client_key: Option<ClientPublicKey>,

    /// Time a new connection has for the whole handshake before it is
    /// dropped: HTTP request, WebSocket upgrade, Hello, proof of the key.
    #[arg(long, env = "KTB_AGENT_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Exchange role: ports to accept cluster callers on (repeat or comma-separate).
    #[arg(
        long = "expose-port",
        env = "KTB_AGENT_EXPOSE_PORTS",
        value_delimiter = ','
    )]
    pub expose_ports: Vec<u16>,

    /// Address the exposed ports listen on.
    #[arg(long, env = "KTB_AGENT_EXPOSE_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub expose_address: IpAddr,

    /// Connect role: dial addresses and relay UDP inside the cluster for the client.
    #[arg(long, env = "KTB_AGENT_CONNECT")]
    pub connect: bool,

    /// Connect role: the resolver configuration whose nameservers and search
    /// path the client uses for cluster names.
    #[arg(
        long,
        env = "KTB_AGENT_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: PathBuf,

    /// Read from `resolv_conf` at start (connect role only).
    #[arg(skip)]
    pub resolver: Resolver,

    /// Timeout for dialing a destination in connect role.
    #[arg(long, env = "KTB_AGENT_DIAL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub dial_timeout: Duration,

    /// Connect role: let the client dial loopback addresses (127.0.0.0/8,
    /// ::1), which reach the agent's own pod rather than the cluster.
    #[arg(long, env = "KTB_AGENT_ALLOW_LOOPBACK")]
    pub allow_loopback: bool,

    /// Connect role: let the client dial link-local addresses
    /// (169.254.0.0/16, fe80::/10), where clouds serve node credentials.
    /// (The pod's nameservers are allowed without it, on port 53.)
    #[arg(long, env = "KTB_AGENT_ALLOW_LINK_LOCAL")]
    pub allow_link_local: bool,

    /// Router role: the meshed Service whose shared router this agent is.
    /// It routes every request by its developer's mark (see
    /// [`crate::mesh`]), renews `--lease` while any developer is a member,
    /// and restores the Service and ends when none is left.
    #[arg(
        long,
        env = "KTB_AGENT_MESH_OF",
        requires_all = ["lease", "session", "namespace"],
        conflicts_with_all = ["connect", "service", "client_key"]
    )]
    pub mesh_of: Option<String>,

    /// Router role: `TARGET_PORT=ORIGIN_IP:PORT`, repeated or
    /// comma-separated. The router listens on each target port of the
    /// meshed Service; unmarked traffic goes to the origin address (the
    /// ktb-managed Service selecting the original pods), marked traffic to
    /// the member's agent on the same target port.
    #[arg(long = "route", env = "KTB_AGENT_ROUTES", value_delimiter = ',', value_parser = parse_route)]
    pub routes: Vec<(u16, SocketAddr)>,

    /// The Service this agent stands in for: restored by the agent itself if
    /// the laptop vanishes (needs --lease and --namespace too).
    #[arg(long, env = "KTB_AGENT_SERVICE", requires_all = ["lease", "namespace"])]
    pub service: Option<String>,

    /// The session's Lease, renewed by the laptop while it lives; deleted by
    /// the agent when the laptop vanishes, which ends the session's objects.
    #[arg(long, env = "KTB_AGENT_LEASE", requires = "namespace")]
    pub lease: Option<String>,

    /// The session this agent belongs to: it restores the Service only while
    /// the Service is still marked with this session.
    #[arg(long, env = "KTB_AGENT_SESSION", requires = "lease")]
    pub session: Option<String>,

    /// The namespace of the Service and the Lease.
    #[arg(long, env = "KTB_AGENT_NAMESPACE")]
    pub namespace: Option<String>,

    /// How long the laptop may be silent before the agent restores the Service.
    #[arg(long, env = "KTB_AGENT_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Log format.
    #[arg(long, env = "KTB_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_route(text: &str) -> Result<(u16, SocketAddr), String> {
    let (port, origin) = text
        .split_once('=')
        .ok_or_else(|| format!("expected TARGET_PORT=ORIGIN_IP:PORT, got {text:?}"))?;
    let port = port
        .parse()
        .map_err(|e| format!("bad target port {port:?}: {e}"))?;
    let origin = origin
        .parse()
        .map_err(|e| format!("bad origin address {origin:?}: {e}"))?;
    Ok((port, origin))
}

impl Config {
    /// In connect role, what the pod's resolver is configured with.
    pub fn read_resolver(&mut self) -> anyhow::Result<()> {
        if self.connect {
            let text = std::fs::read_to_string(&self.resolv_conf).with_context(|| {
                format!(
                    "cannot read the resolver configuration {}",
                    self.resolv_conf.display()
                )
            })?;
            self.resolver = Resolver::parse_resolv_conf(&text);
        }
        Ok(())
    }

    /// The dead man's switch, when the agent belongs to a session's Lease.
    pub fn dead_man(&self) -> Option<crate::deadman::DeadMan> {
        Some(crate::deadman::DeadMan {
            namespace: self.namespace.clone()?,
            service: self.service.clone(),
            lease: self.lease.clone()?,
            session: self.session.clone()?,
            grace: self.grace,
        })
    }

    /// Which destinations the connect role may dial.
    pub fn dial_policy(&self) -> DialPolicy {
        DialPolicy {
            allow_loopback: self.allow_loopback,
            allow_link_local: self.allow_link_local,
            nameservers: self.resolver.nameservers.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn ports_come_comma_separated_from_the_environment() {
        let config =
            Config::try_parse_from(["ktb-agent", "--client-key", KEY, "--expose-port", "80,8080"])
                .unwrap();
        assert_eq!(config.expose_ports, vec![80, 8080]);
        assert_eq!(config.client_key.unwrap().to_string(), KEY);
    }

    #[test]
    fn a_client_key_is_required_and_checked() {
        let missing = Config::try_parse_from(["ktb-agent"])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("--client-key"), "{missing}");
        let wrong = Config::try_parse_from(["ktb-agent", "--client-key", "s3cret"])
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("64 hexadecimal digits"), "{wrong}");
    }

    #[test]
    fn a_router_takes_routes_and_no_key() {
        let config = Config::try_parse_from([
            "ktb-agent",
            "--mesh-of",
            "orders",
            "--lease",
            "ktb-mesh-orders",
            "--session",
            "1a2b3c4d",
            "--namespace",
            "team-a",
            "--route",
            "8080=10.96.0.20:80,9090=10.96.0.20:9090",
        ])
        .unwrap();
        assert_eq!(config.client_key, None);
        assert_eq!(
            config.routes,
            vec![
                (8080, "10.96.0.20:80".parse().unwrap()),
                (9090, "10.96.0.20:9090".parse().unwrap())
            ]
        );
        let keyed = Config::try_parse_from([
            "ktb-agent",
            "--mesh-of",
            "o",
            "--lease",
            "l",
            "--session",
            "s",
            "--namespace",
            "n",
            "--client-key",
            KEY,
        ]);
        assert!(
            keyed.is_err(),
            "a router accepts no tunnel, so takes no key"
        );
    }
}
