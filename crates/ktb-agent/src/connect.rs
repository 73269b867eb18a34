//! Connect role: the laptop's connections and datagrams, sent on from inside
//! the cluster.
//!
//! The laptop names a destination (an address, or a host name for the
//! cluster's DNS to resolve); the agent dials it with a timeout and bridges
//! the stream, or resets the stream with the dial error so the laptop can
//! report it. UDP gets one socket per flow, closed after a quiet period.
//!
//! Some destinations are not "the cluster" but the agent's own machine:
//! loopback reaches the agent's pod (its tunnel endpoint, anything beside
//! it), link-local reaches the node's cloud metadata service (credentials
//! of the node, at 169.254.169.254). The agent refuses those unless a flag
//! allows them ([`DialPolicy`]), and never dials what cannot be a peer
//! (unspecified, multicast, broadcast). The agent's own nameservers are
//! always allowed, on port 53: they are what `Welcome` tells the client to
//! ask, and node-local DNS caches listen on link-local addresses
//! (169.254.20.10). Host names are resolved first and
//! every address checked; the agent dials only addresses it checked, so a
//! name cannot point elsewhere between check and dial.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ktb_proto::tcp::Target;
use ktb_proto::udp::{Datagram, FlowId};
use ktb_proto::{Incoming, Session, Stream};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A UDP flow with no traffic for this long is closed.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Most UDP flows one client may hold open.
const MAX_FLOWS: usize = 1024;

/// What kind of address the agent will not dial on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// 127.0.0.0/8, ::1: the agent's own pod.
    Loopback,
    /// 169.254.0.0/16, fe80::/10: the node's link, cloud metadata.
    LinkLocal,
    /// 0.0.0.0/8, ::: "this host" (Linux connects it to loopback).
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
}

impl Special {
    /// The kind of `ip`, if it is special; IPv4 in IPv6 clothing counts as IPv4.
    pub fn of(ip: IpAddr) -> Option<Special> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Special::of_v4(v4),
            IpAddr::V6(v6) => {
                let first = v6.segments()[0];
                if v6.is_loopback() {
                    Some(Special::Loopback)
                } else if v6.is_unspecified() {
                    Some(Special::Unspecified)
                } else if first & 0xffc0 == 0xfe80 {
                    Some(Special::LinkLocal)
                } else if v6.is_multicast() {
                    Some(Special::Multicast)
                } else {
                    None
                }
            }
        }
    }

    fn of_v4(ip: Ipv4Addr) -> Option<Special> {
        if ip.is_loopback() {
            Some(Special::Loopback)
        } else if ip.is_link_local() {
            Some(Special::LinkLocal)
        } else if ip.octets()[0] == 0 {
            Some(Special::Unspecified)
        } else if ip.is_multicast() {
            Some(Special::Multicast)
        } else if ip.is_broadcast() {
            Some(Special::Broadcast)
        } else {
            None
        }
    }
}

impl fmt::Display for Special {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Special::Loopback => "a loopback address (the agent's own pod)",
            Special::LinkLocal => "a link-local address (where clouds serve node credentials)",
            Special::Unspecified => "an unspecified address",
            Special::Multicast => "a multicast address",
            Special::Broadcast => "the broadcast address",
        })
    }
}

/// Which special destinations the client may reach anyway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialPolicy {
    /// `--allow-loopback`.
    pub allow_loopback: bool,
    /// `--allow-link-local`.
    pub allow_link_local: bool,
    /// The nameservers of the agent's `resolv.conf` (port 53), allowed
    /// whatever their address.
    pub nameservers: Arc<[SocketAddr]>,
}

impl DialPolicy {
    /// `Ok` to dial `addr`, or the reason it is refused, naming the flag
    /// that would allow it.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let Some(kind) = Special::of(addr.ip()) else {
            return Ok(());
        };
        if self.nameservers.contains(&addr) {
            return Ok(());
        }
        let flag = match kind {
            Special::Loopback if self.allow_loopback => return Ok(()),
            Special::LinkLocal if self.allow_link_local => return Ok(()),
            Special::Loopback => "; the agent allows it with --allow-loopback",
            Special::LinkLocal => "; the agent allows it with --allow-link-local",
            Special::Unspecified | Special::Multicast | Special::Broadcast => "",
        };
        Err(format!("the agent refuses to dial {addr}: {kind}{flag}"))
    }
}

/// Handles everything the client starts on one tunnel.
pub async fn serve_requests(
    session: Session,
    mut incoming: mpsc::Receiver<Incoming>,
    connect_role: bool,
    dial_timeout: Duration,
    policy: DialPolicy,
) {
    let mut flows = Flows::default();
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Stream { stream, target } if connect_role => {
                tokio::spawn(dial_and_bridge(
                    stream,
                    target,
                    dial_timeout,
                    policy.clone(),
                ));
            }
            Incoming::Stream { stream, .. } => stream
                .reset("this agent is in exchange role and does not dial out (use `ktb connect`)"),
            Incoming::Datagram(datagram) if connect_role => match policy.check(datagram.peer) {
                Ok(()) => flows.send(&session, datagram).await,
                Err(reason) => tracing::debug!(%reason, "dropping a datagram"),
            },
            Incoming::Datagram(_) => {}
            Incoming::FlowEnd(flow) => flows.end(flow),
        }
    }
}

async fn dial_and_bridge(
    stream: Stream,
    target: Target,
    dial_timeout: Duration,
    policy: DialPolicy,
) {
    let dialed = tokio::time::timeout(dial_timeout, dial(&target, &policy)).await;
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(reason)) => return stream.reset(&reason),
        Err(_) => {
            return stream.reset(&format!(
                "cannot reach {target} from the cluster: no answer in {dial_timeout:?}"
            ))
        }
    };
    let _ = tcp.set_nodelay(true);
    stream.accept();
    if let Err(e) = stream.bridge_tcp(tcp).await {
        tracing::debug!(%target, error = %e, "connect stream failed");
    }
}

/// Connects to `target` if the policy allows it; the error is the reason
/// the client is told.
async fn dial(target: &Target, policy: &DialPolicy) -> Result<TcpStream, String> {
    let candidates: Vec<SocketAddr> = match target {
        Target::Addr(addr) => vec![*addr],
        Target::Host { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| format!("cannot resolve {target} in the cluster: {e}"))?
            .collect(),
        Target::AgentPort { .. } => {
            return Err("agent ports are opened by the agent, not the client".into())
        }
    };
    let mut refusal = None;
    let mut last_error = None;
    for addr in candidates {
        if let Err(reason) = policy.check(addr) {
            refusal.get_or_insert(reason);
            continue;
        }
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match (last_error, refusal) {
        (Some(e), _) => format!("cannot reach {target} from the cluster: {e}"),
        (None, Some(reason)) if matches!(target, Target::Host { .. }) => {
            format!("{target} resolves only to addresses the agent refuses: {reason}")
        }
        (None, Some(reason)) => reason,
        (None, None) => format!("cannot resolve {target} in the cluster: no addresses"),
    })
}

#[derive(Default)]
struct Flows {
    open: HashMap<FlowId, Flow>,
}

struct Flow {
    socket: Arc<UdpSocket>,
    replies: JoinHandle<()>,
}

impl Flows {
    async fn send(&mut self, session: &Session, datagram: Datagram) {
        self.open.retain(|_, flow| !flow.replies.is_finished());
        if !self.open.contains_key(&datagram.flow) {
            if self.open.len() >= MAX_FLOWS {
                tracing::warn!("too many UDP flows: dropping a datagram");
                return;
            }
            let Some(flow) = Flow::open(session.clone(), datagram.flow, datagram.peer).await else {
                return;
            };
            self.open.insert(datagram.flow, flow);
        }
        let flow = &self.open[&datagram.flow];
        if let Err(e) = flow.socket.send_to(&datagram.payload, datagram.peer).await {
            tracing::debug!(peer = %datagram.peer, error = %e, "UDP send failed");
        }
    }

    fn end(&mut self, flow: FlowId) {
        if let Some(flow) = self.open.remove(&flow) {
            flow.replies.abort();
        }
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        for flow in self.open.values() {
            flow.replies.abort();
        }
    }
}

impl Flow {
    async fn open(session: Session, id: FlowId, peer: SocketAddr) -> Option<Flow> {
        let local: SocketAddr = if peer.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = match UdpSocket::bind(local).await {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a UDP socket");
                return None;
            }
        };
        let replies = tokio::spawn(relay_replies(session, id, Arc::clone(&socket)));
        Some(Flow { socket, replies })
    }
}

async fn relay_replies(session: Session, flow: FlowId, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, from) = match tokio::time::timeout(FLOW_IDLE, socket.recv_from(&mut buf)).await {
            Ok(Ok(received)) => received,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "UDP receive failed");
                break;
            }
            Err(_) => break,
        };
        let datagram = Datagram {
            flow,
            peer: from,
            payload: Bytes::copy_from_slice(&buf[..n]),
        };
        if session.send_datagram(datagram).await.is_err() {
            return;
        }
    }
    session.end_flow(flow);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special(ip: &str) -> Option<Special> {
        Special::of(ip.parse().unwrap())
    }

    #[test]
    fn the_agents_own_machine_is_special() {
        assert_eq!(special("127.0.0.1"), Some(Special::Loopback));
        assert_eq!(special("127.255.0.9"), Some(Special::Loopback));
        assert_eq!(special("::1"), Some(Special::Loopback));
        assert_eq!(special("::ffff:127.0.0.1"), Some(Special::Loopback));
        assert_eq!(special("169.254.169.254"), Some(Special::LinkLocal));
        assert_eq!(special("::ffff:169.254.169.254"), Some(Special::LinkLocal));
        assert_eq!(special("fe80::1"), Some(Special::LinkLocal));
        assert_eq!(special("febf::1"), Some(Special::LinkLocal));
        assert_eq!(special("0.0.0.0"), Some(Special::Unspecified));
        assert_eq!(special("0.1.2.3"), Some(Special::Unspecified));
        assert_eq!(special("::"), Some(Special::Unspecified));
        assert_eq!(special("224.0.0.1"), Some(Special::Multicast));
        assert_eq!(special("ff02::1"), Some(Special::Multicast));
        assert_eq!(special("255.255.255.255"), Some(Special::Broadcast));
    }

    #[test]
    fn cluster_addresses_are_ordinary() {
        for ip in [
            "10.96.0.10",
            "172.16.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "fd00::1",
            "fec0::1",
            "2001:db8::1",
            "128.0.0.1",
            "169.253.0.1",
        ] {
            assert_eq!(special(ip), None, "{ip}");
        }
    }

    #[test]
    fn refusals_name_the_flag_that_allows_them() {
        let strict = DialPolicy::default();
        let loopback = strict.check("127.0.0.1:80".parse().unwrap()).unwrap_err();
        assert!(loopback.contains("--allow-loopback"), "{loopback}");
        let metadata = strict
            .check("169.254.169.254:80".parse().unwrap())
            .unwrap_err();
        assert!(metadata.contains("--allow-link-local"), "{metadata}");
        let broadcast = strict
            .check("255.255.255.255:80".parse().unwrap())
            .unwrap_err();
        assert!(!broadcast.contains("--allow"), "{broadcast}");
        assert!(strict.check("10.96.0.1:443".parse().unwrap()).is_ok());

        let open = DialPolicy {
            allow_loopback: true,
            allow_link_local: true,
            ..DialPolicy::default()
        };
        assert!(open.check("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(open.check("[fe80::1]:80".parse().unwrap()).is_ok());
        assert!(
            open.check("0.0.0.0:80".parse().unwrap()).is_err(),
            "never a peer"
        );
    }

    #[test]
    fn the_agents_own_nameservers_are_allowed_on_port_53_only() {
        let node_local_dns: SocketAddr = "169.254.20.10:53".parse().unwrap();
        let policy = DialPolicy {
            nameservers: Arc::from([node_local_dns]),
            ..DialPolicy::default()
        };
        assert!(policy.check(node_local_dns).is_ok());
        assert!(policy.check("169.254.20.10:80".parse().unwrap()).is_err());
        assert!(policy.check("169.254.169.254:53".parse().unwrap()).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused() {
        let target = Target::Host {
            host: "localhost".into(),
            port: 9,
        };
        let reason = dial(&target, &DialPolicy::default()).await.unwrap_err();
        assert!(
            reason.contains("resolves only to addresses the agent refuses"),
            "{reason}"
        );
        assert!(reason.contains("--allow-loopback"), "{reason}");
    }
}
