//! The local DNS server of `ktb connect`: cluster names through the tunnel,
//! every other name to the machine's own servers, unchanged.
//!
//! A name is asked of the cluster only when it can be a cluster name: the
//! cluster domain itself (`orders.shop.svc.cluster.local`), a name ending in
//! `.svc`, a bare name (`orders`, completed with the namespace's search
//! domain) or two labels (`orders.shop`, a Service in another namespace).
//! Those queries go as UDP datagrams through the tunnel to the cluster's
//! DNS server, as the agent's own resolver names it; the answer is
//! rewritten to the name that was asked. Names the cluster does not know,
//! and all others, go byte for byte to the upstream servers that
//! `resolv.conf` listed before ktb, which are asked at the same time so that
//! a miss in the cluster costs no extra wait.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::Name;
use ktb_proto::handshake::Resolver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::outbound::Outbound;

/// Where the server listens: a loopback address of its own, so it neither
/// collides with a resolver already on 127.0.0.1 or systemd-resolved's
/// 127.0.0.53, nor depends on the TUN device.
pub const LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 153)), 53);
/// How long one server (cluster or upstream) may take to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries answered at once; more wait, as a busy server's would.
const MAX_IN_FLIGHT: usize = 256;
/// A TCP client silent this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The longest DNS name and label in text form (RFC 1035).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Answers queries; shared by the UDP and TCP servers.
pub struct Answerer {
    outbound: Outbound,
    upstream: Vec<SocketAddr>,
}

impl Answerer {
    pub fn new(outbound: Outbound, upstream: Vec<SocketAddr>) -> Arc<Answerer> {
        Arc::new(Answerer { outbound, upstream })
    }

    /// The reply to one query, or `None` when nobody answered.
    pub async fn answer(self: &Arc<Self>, query: Bytes) -> Option<Vec<u8>> {
        let parsed = Message::from_vec(&query).ok();
        let asked = parsed
            .as_ref()
            .and_then(|m| m.queries.first().map(|q| q.name().clone()));
        let candidates = match &asked {
            Some(name) => cluster_candidates(name, &self.outbound.resolver()),
            None => Vec::new(),
        };
        let (Some(message), false) = (parsed, candidates.is_empty()) else {
            return self.upstream(&query).await;
        };
        let this = Arc::clone(self);
        let upstream_query = query.clone();
        let upstream = tokio::spawn(async move { this.upstream(&upstream_query).await });
        for candidate in candidates {
            if let Some(reply) = self.ask_cluster(&message, &candidate).await {
                upstream.abort();
                return Some(reply);
            }
        }
        upstream.await.ok().flatten()
    }

    /// The cluster's answer for `candidate`, rewritten for the question
    /// asked; `None` if the cluster does not know the name.
    async fn ask_cluster(&self, question: &Message, candidate: &Name) -> Option<Vec<u8>> {
        let server = *self.outbound.resolver().nameservers.first()?;
        let mut query = question.clone();
        let asked = query.queries.first()?.name().clone();
        query.queries.first_mut()?.set_name(candidate.clone());
        let bytes = query.to_vec().ok()?;
        let mut flow = self.outbound.flow().await.ok()?;
        flow.send(server, bytes.into()).await.ok()?;
        let reply = tokio::time::timeout(QUERY_TIMEOUT, flow.recv())
            .await
            .ok()??;
        let mut reply = Message::from_vec(&reply.payload).ok()?;
        if reply.metadata.response_code != ResponseCode::NoError {
            return None;
        }
        reply.metadata.id = question.metadata.id;
        reply.queries = question.queries.clone();
        for record in &mut reply.answers {
            if record.name.eq_case(candidate) || record.name == *candidate {
                record.name = asked.clone();
            }
        }
        reply.to_vec().ok()
    }

    /// Forwards the query unchanged to the machine's own servers in turn.
    async fn upstream(&self, query: &[u8]) -> Option<Vec<u8>> {
        for server in &self.upstream {
            let local: SocketAddr = if server.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(socket) = UdpSocket::bind(local).await else {
                continue;
            };
            if socket.connect(server).await.is_err() || socket.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) = tokio::time::timeout(QUERY_TIMEOUT, socket.recv(&mut buf)).await {
                buf.truncate(n);
                return Some(buf);
            }
        }
        servfail(query)
    }
}

/// Asks the cluster's DNS, through the agent, for the apiserver's Service,
/// which every cluster has: a connect whose cluster names cannot resolve
/// should say so now, not on the developer's first request.
pub async fn check_cluster_dns(outbound: &Outbound) -> anyhow::Result<()> {
    let resolver = outbound.resolver();
    let Some(server) = resolver.nameservers.first().copied() else {
        anyhow::bail!("the agent's pod has no nameserver in its resolv.conf: cluster names cannot resolve (use --dns off)");
    };
    let name = Name::from_ascii(format!(
        "kubernetes.default.svc.{}.",
        cluster_domain(&resolver)
    ))?;
    let mut query = Message::query();
    query.add_query(hickory_proto::op::Query::query(
        name,
        hickory_proto::rr::RecordType::A,
    ));
    query.metadata.recursion_desired = true;
    let mut flow = outbound.flow().await?;
    flow.send(server, query.to_vec()?.into()).await?;
    match tokio::time::timeout(QUERY_TIMEOUT, flow.recv()).await {
        Ok(Some(_)) => Ok(()),
        _ => anyhow::bail!(
            "the agent cannot reach the cluster's DNS server {server} (no answer in {QUERY_TIMEOUT:?}): \
             is CoreDNS running, or a NetworkPolicy blocking the agent? Use --dns off to connect without cluster names"
        ),
    }
}

/// An answer that says "try elsewhere" rather than leaving the client to
/// time out.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(query).ok()?;
    message.metadata.message_type = MessageType::Response;
    message.metadata.response_code = ResponseCode::ServFail;
    message.to_vec().ok()
}

/// The cluster names `name` may stand for, most likely first.
pub fn cluster_candidates(name: &Name, resolver: &Resolver) -> Vec<Name> {
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.trim_end_matches('.');
    let domain = cluster_domain(resolver);
    let namespace_domain = resolver
        .search
        .iter()
        .find(|s| s.ends_with(&format!(".svc.{domain}")));
    let labels = text.split('.').filter(|l| !l.is_empty()).count();
    let full = if text == domain || text.ends_with(&format!(".{domain}")) {
        Some(text.to_owned())
    } else if text.ends_with(".svc") {
        Some(format!("{text}.{domain}"))
    } else {
        match (labels, namespace_domain) {
            (1, Some(ns)) => Some(format!("{text}.{ns}")),
            (2, _) => Some(format!("{text}.svc.{domain}")),
            _ => None,
        }
    };
    full.and_then(|f| Name::from_ascii(format!("{f}.")).ok())
        .into_iter()
        .collect()
}

/// The cluster's DNS domain, read off the search path (`svc.<domain>`).
pub fn cluster_domain(resolver: &Resolver) -> String {
    resolver
        .search
        .iter()
        .find_map(|s| s.strip_prefix("svc."))
        .unwrap_or("cluster.local")
        .to_owned()
}

/// Checks that `name` is a host name: labels of ASCII letters, digits and
/// inner hyphens, 1 to 63 characters each, 253 in all, no trailing dot
/// (RFC 1123). Names from the cluster end up in queries and in
/// `/etc/hosts`, where a space, a newline or a `#` would change what the
/// file says.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let label_ok = |label: &str| {
        (1..=MAX_LABEL).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.split('.').all(label_ok) {
        anyhow::bail!(
            "{name:?} is not a valid DNS name (letters, digits and inner hyphens;              labels of at most {MAX_LABEL} characters, {MAX_NAME} in all)"
        );
    }
    Ok(())
}

/// Serves DNS over UDP and TCP on the bound sockets until dropped.
pub async fn serve(answerer: Arc<Answerer>, udp: UdpSocket, tcp: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let udp = Arc::new(udp);
    let tcp_answerer = Arc::clone(&answerer);
    let tcp_limit = Arc::clone(&limit);
    let tcp_server = async move {
        loop {
            let Ok((conn, _)) = tcp.accept().await else {
                continue;
            };
            let answerer = Arc::clone(&tcp_answerer);
            let limit = Arc::clone(&tcp_limit);
            tokio::spawn(serve_tcp(conn, answerer, limit));
        }
    };
    let udp_server = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                return;
            };
            let query = Bytes::copy_from_slice(&buf[..n]);
            let (answerer, udp) = (Arc::clone(&answerer), Arc::clone(&udp));
            tokio::spawn(async move {
                if let Some(reply) = answerer.answer(query).await {
                    let _ = udp.send_to(&reply, from).await;
                }
                drop(permit);
            });
        }
    };
    tokio::join!(tcp_server, udp_server);
}

/// DNS over TCP: two-byte length, message; several per connection.
async fn serve_tcp(mut conn: TcpStream, answerer: Arc<Answerer>, limit: Arc<Semaphore>) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, conn.read_u16()).await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if conn.read_exact(&mut query).await.is_err() {
            return;
        }
        let Ok(_permit) = limit.acquire().await else {
            return;
        };
        let Some(reply) = answerer.answer(query.into()).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if conn.write_u16(len).await.is_err() || conn.write_all(&reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> Resolver {
        Resolver {
            nameservers: vec!["10.96.0.10:53".parse().unwrap()],
            search: [
                "team-a.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    fn candidates(name: &str) -> Vec<String> {
        cluster_candidates(&Name::from_ascii(name).unwrap(), &resolver())
            .iter()
            .map(Name::to_ascii)
            .collect()
    }

    #[test]
    fn every_cluster_spelling_becomes_the_full_name() {
        let full = vec!["web.team-a.svc.cluster.local.".to_owned()];
        assert_eq!(candidates("web"), full);
        assert_eq!(candidates("web."), full);
        assert_eq!(candidates("web.team-a"), full);
        assert_eq!(candidates("web.team-a.svc"), full);
        assert_eq!(candidates("web.team-a.svc.cluster.local."), full);
        assert_eq!(candidates("WEB.Team-A.svc"), full);
    }

    #[test]
    fn other_names_never_reach_the_cluster() {
        assert!(candidates("www.example.com.").is_empty());
        assert!(candidates("a.b.c.d.").is_empty());
        // Two labels may be a Service in a namespace: asked, and on a miss
        // answered by the upstream servers.
        assert_eq!(
            candidates("example.com"),
            vec!["example.com.svc.cluster.local."]
        );
    }
}
