//! Agent configuration: flags, each with an environment variable, because the
//! agent is configured by a pod spec and tested as a local process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ktb_kube::grace::parse_duration;
use ktb_proto::handshake::Resolver;

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
    /// Address of the HTTP endpoint: `/tunnel` (WebSocket) and `/readyz`.
    #[arg(long, env = "KTB_AGENT_LISTEN", default_value = "0.0.0.0:7777")]
    pub listen: SocketAddr,

    /// File holding the session token (mount the session's Secret here).
    #[arg(long, env = "KTB_AGENT_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// The session token itself; prefer --token-file outside tests.
    #[arg(long, env = "KTB_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

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

impl Config {
    /// The token, from the file when one is given.
    pub fn resolve_token(&mut self) -> anyhow::Result<()> {
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            self.token = Some(token.trim().to_owned());
        }
        match &self.token {
            Some(token) if !token.is_empty() => Ok(()),
            _ => anyhow::bail!("no session token: pass --token-file (or KTB_AGENT_TOKEN_FILE)"),
        }
    }

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

    pub fn token(&self) -> &str {
        self.token.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_comma_separated_from_the_environment() {
        let config =
            Config::try_parse_from(["ktb-agent", "--token", "t", "--expose-port", "80,8080"])
                .unwrap();
        assert_eq!(config.expose_ports, vec![80, 8080]);
    }
}
