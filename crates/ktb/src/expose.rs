//! `--expose local[:remote]`: which local port answers which agent port, and
//! the dialing of local processes for streams the agent sends.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ktb_proto::tcp::Target;
use ktb_proto::Stream;
use tokio::net::TcpStream;

use crate::report::{Event, Reporter};

/// How long a local process may take to accept a connection.
const LOCAL_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// `--expose LOCAL[:REMOTE]` as typed: REMOTE may name a port (a Service
/// port by name, number or target port for `exchange`; a number for the
/// agent's ports in [`Expose`]); without it the only port (or the one
/// numbered like LOCAL) is meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposeArg {
    pub local: u16,
    pub remote: Option<String>,
}

impl FromStr for ExposeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (local, remote) = match s.split_once(':') {
            Some((local, remote)) if !remote.is_empty() && !remote.contains(':') => (local, Some(remote.to_owned())),
            Some(_) => return Err(format!("invalid --expose {s:?}: expected LOCAL[:REMOTE], e.g. 8080 or 8080:80 or 8080:http")),
            None => (s, None),
        };
        let local = local
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                format!("invalid local port in --expose {s:?}: expected a number from 1 to 65535")
            })?;
        Ok(ExposeArg { local, remote })
    }
}

/// One `--expose` argument whose REMOTE is an agent port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expose {
    pub local: u16,
    /// The agent (or Service) port; `None` means "the same as local".
    pub remote: Option<u16>,
}

impl FromStr for Expose {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ExposeArg { local, remote } = s.parse()?;
        let remote = remote
            .map(|r| {
                r.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("invalid port {r:?} in --expose {s:?}: expected LOCAL[:REMOTE], e.g. 8080 or 8080:80")
                })
            })
            .transpose()?;
        Ok(Expose { local, remote })
    }
}

/// Maps agent ports to local addresses, checked against what the agent
/// actually listens on.
#[derive(Debug, Clone)]
pub struct Routes {
    by_agent_port: HashMap<u16, SocketAddr>,
}

impl Routes {
    /// Resolves `--expose` flags against the agent's ports. `--expose 8080`
    /// means agent port 8080, or the agent's only port when it has one.
    pub fn resolve(exposes: &[Expose], agent_ports: &[u16]) -> Result<Routes, String> {
        let listing = || {
            let ports: Vec<String> = agent_ports.iter().map(u16::to_string).collect();
            format!("the agent listens on: {}", ports.join(", "))
        };
        let mut by_agent_port = HashMap::new();
        for expose in exposes {
            let remote = match expose.remote {
                Some(remote) => remote,
                None if agent_ports.contains(&expose.local) => expose.local,
                None if agent_ports.len() == 1 => agent_ports[0],
                None => {
                    return Err(format!(
                        "--expose {}: which agent port? {}",
                        expose.local,
                        listing()
                    ))
                }
            };
            if !agent_ports.contains(&remote) {
                return Err(format!(
                    "--expose {}:{remote}: port {remote} is not exposed; {}",
                    expose.local,
                    listing()
                ));
            }
            let local = SocketAddr::from((Ipv4Addr::LOCALHOST, expose.local));
            if by_agent_port.insert(remote, local).is_some() {
                return Err(format!("agent port {remote} is exposed twice"));
            }
        }
        Ok(Routes { by_agent_port })
    }

    pub fn list(&self) -> Vec<(u16, SocketAddr)> {
        let mut routes: Vec<_> = self.by_agent_port.iter().map(|(p, a)| (*p, *a)).collect();
        routes.sort();
        routes
    }
}

/// Carries agent streams to local processes, reporting a dead local port
/// once per outage.
#[derive(Clone)]
pub struct LocalDialer {
    routes: Arc<Routes>,
    /// Per local address: whether it is currently known to be unreachable.
    unreachable: Arc<HashMap<SocketAddr, AtomicBool>>,
    reporter: Reporter,
}

impl LocalDialer {
    pub fn new(routes: Routes, reporter: Reporter) -> Self {
        let unreachable = routes
            .by_agent_port
            .values()
            .map(|a| (*a, AtomicBool::new(false)))
            .collect();
        LocalDialer {
            routes: Arc::new(routes),
            unreachable: Arc::new(unreachable),
            reporter,
        }
    }

    /// Connects `stream` to the local process for `target`, or resets it
    /// with the reason; runs until the stream ends.
    pub async fn serve(&self, stream: Stream, target: Target) {
        let Target::AgentPort { port } = target else {
            return stream.reset("the ktb CLI accepts only exchanged connections from the agent");
        };
        let Some(&local) = self.routes.by_agent_port.get(&port) else {
            return stream.reset(&format!(
                "agent port {port} is not exposed by this ktb session"
            ));
        };
        let dialed = tokio::time::timeout(LOCAL_DIAL_TIMEOUT, TcpStream::connect(local)).await;
        let tcp = match dialed {
            Ok(Ok(tcp)) => {
                self.mark(local, None);
                tcp
            }
            Ok(Err(e)) => {
                let error = e.to_string();
                stream.reset(&format!(
                    "nothing listens on {local} on the developer's machine ({error})"
                ));
                return self.mark(local, Some(error));
            }
            Err(_) => {
                let error = format!("no answer in {LOCAL_DIAL_TIMEOUT:?}");
                stream.reset(&format!(
                    "{local} on the developer's machine did not accept ({error})"
                ));
                return self.mark(local, Some(error));
            }
        };
        let _ = tcp.set_nodelay(true);
        stream.accept();
        if let Err(e) = stream.bridge_tcp(tcp).await {
            tracing::debug!(%local, error = %e, "stream failed");
        }
    }

    /// Records whether `local` answered, reporting only changes.
    fn mark(&self, local: SocketAddr, error: Option<String>) {
        let was_unreachable = self.unreachable[&local].swap(error.is_some(), Ordering::AcqRel);
        match error {
            Some(error) if !was_unreachable => self
                .reporter
                .report(Event::LocalUnreachable { addr: local, error }),
            None if was_unreachable => self.reporter.report(Event::LocalBack { addr: local }),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expose(s: &str) -> Expose {
        s.parse().unwrap()
    }

    #[test]
    fn expose_args_parse_with_named_remotes() {
        assert_eq!(
            "8080".parse(),
            Ok(ExposeArg {
                local: 8080,
                remote: None
            })
        );
        assert_eq!(
            "8080:http".parse(),
            Ok(ExposeArg {
                local: 8080,
                remote: Some("http".into())
            })
        );
        for bad in ["", "0", "x", "8080:", "1:2:3", "99999"] {
            assert!(bad.parse::<ExposeArg>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expose_parses_local_and_remote() {
        assert_eq!(
            expose("8080"),
            Expose {
                local: 8080,
                remote: None
            }
        );
        assert_eq!(
            expose("8080:80"),
            Expose {
                local: 8080,
                remote: Some(80)
            }
        );
        for bad in ["", "x", "0", "8080:", "8080:http", "70000", "1:2:3"] {
            assert!(bad.parse::<Expose>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn routes_follow_the_agent_ports() {
        let routes = Routes::resolve(&[expose("8080")], &[80]).unwrap();
        assert_eq!(routes.list(), vec![(80, "127.0.0.1:8080".parse().unwrap())]);
        let routes = Routes::resolve(&[expose("8080:81"), expose("9090")], &[81, 9090]).unwrap();
        assert_eq!(routes.list().len(), 2);
    }

    #[test]
    fn unknown_and_ambiguous_ports_list_what_exists() {
        let err = Routes::resolve(&[expose("8080:81")], &[80, 443]).unwrap_err();
        assert!(
            err.contains("port 81 is not exposed") && err.contains("80, 443"),
            "{err}"
        );
        let err = Routes::resolve(&[expose("8080")], &[80, 443]).unwrap_err();
        assert!(
            err.contains("which agent port") && err.contains("80, 443"),
            "{err}"
        );
        assert!(Routes::resolve(&[expose("1:80"), expose("2:80")], &[80]).is_err());
    }
}
