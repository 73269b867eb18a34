//! Agent configuration: flags, each with an environment variable, because the
//! agent is configured by a pod spec and tested as a local process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

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

    /// Timeout for dialing a destination in connect role.
    #[arg(long, env = "KTB_AGENT_DIAL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub dial_timeout: Duration,

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

    pub fn token(&self) -> &str {
        self.token.as_deref().unwrap_or_default()
    }
}

/// Durations as `250ms`, `10s` or `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn ports_come_comma_separated_from_the_environment() {
        let config =
            Config::try_parse_from(["ktb-agent", "--token", "t", "--expose-port", "80,8080"])
                .unwrap();
        assert_eq!(config.expose_ports, vec![80, 8080]);
    }
}
