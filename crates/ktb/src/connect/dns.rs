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
//!
//! Where systemd-resolved is the machine's resolver ([`super::resolved`]),
//! it sends this server only names of the cluster's domains and there are
//! no upstream servers: the cluster's "no such name" is then the answer.
//!
//! Every program on the machine trusts these answers, so a reply is taken
//! only from the server asked, with the query's id and question; anything
//! else on the socket is dropped, as a stub resolver would. The cluster is
//! asked with an id of ktb's own choosing, not the client's. The domains
//! the agent reports are checked before they are used.
//!
//! What the cluster said is kept for its TTL ([`super::dns_cache`]), so a
//! name asked again is answered here, without the tunnel or the upstream
//! servers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::Name;
use ktb_proto::handshake::Resolver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::dns_cache::{ClusterCache, Key, Said};
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
/// The largest UDP reply a client takes unless its query says more with
/// EDNS (RFC 1035).
const PLAIN_UDP_REPLY: u16 = 512;
/// The longest DNS name and label in text form (RFC 1035).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Answers queries; shared by the UDP and TCP servers.
pub struct Answerer {
    outbound: Outbound,
    upstream: Vec<SocketAddr>,
    /// What the cluster said lately about candidate names.
    cache: ClusterCache,
    dropped: Dropped,
}

/// Replies dropped for not being the answer to the query asked. A few are
/// late duplicates; many are someone guessing query ids to slip a forged
/// answer in, which is why the running count goes with each log line.
#[derive(Default)]
struct Dropped(AtomicU64);

impl Dropped {
    fn note(&self, from: SocketAddr, why: &str) {
        let count = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%from, dropped = count, "dropped a DNS reply: {why}");
    }
}

impl Answerer {
    /// `cache_ttl`: the longest, in seconds, the cluster's answers are
    /// kept (`--dns-cache-ttl`); zero keeps none.
    pub fn new(outbound: Outbound, upstream: Vec<SocketAddr>, cache_ttl: u32) -> Arc<Answerer> {
        Arc::new(Answerer {
            outbound,
            upstream,
            cache: ClusterCache::new(cache_ttl),
            dropped: Dropped::default(),
        })
    }

    /// The reply to one query, or `None` when nobody answered. A query that
    /// does not parse is not answered: no reply to it could be checked.
    pub async fn answer(self: &Arc<Self>, query: Bytes) -> Option<Vec<u8>> {
        let message = match Message::from_vec(&query) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "not answering a DNS query that does not parse");
                return None;
            }
        };
        let candidates = match message.queries.first() {
            Some(question) => {
                // Which names reach ktb at all, countable from outside
                // (`KTB_LOG=ktb::connect::dns=debug`).
                tracing::debug!(name = %question.name(), "a DNS query arrived");
                cluster_candidates(question.name(), &self.outbound.resolver())
            }
            None => Vec::new(),
        };
        if candidates.is_empty() {
            return self.upstream(&query, &message).await;
        }
        // Answered from the cache: no upstream query to start and cancel.
        if let Some(reply) = self.cached(&message, &candidates) {
            return Some(reply);
        }
        if self.upstream.is_empty() {
            // Only the cluster answers (systemd-resolved sends ktb nothing
            // but the cluster's domains): its "no such name" is the answer.
            let mut no_such_name = true;
            for candidate in candidates {
                match self.ask_cluster(&message, &candidate).await {
                    Asked::Answer(reply) => return Some(reply),
                    Asked::NoSuchName => {}
                    Asked::NoAnswer => no_such_name = false,
                }
            }
            let code = if no_such_name {
                ResponseCode::NXDomain
            } else {
                ResponseCode::ServFail
            };
            return reply_code(&message, code);
        }
        let this = Arc::clone(self);
        let (upstream_query, upstream_message) = (query.clone(), message.clone());
        let upstream =
            tokio::spawn(async move { this.upstream(&upstream_query, &upstream_message).await });
        for candidate in candidates {
            if let Asked::Answer(reply) = self.ask_cluster(&message, &candidate).await {
                upstream.abort();
                return Some(reply);
            }
        }
        upstream.await.ok().flatten()
    }

    /// The cached reply for the first of `candidates` the cluster knows,
    /// rewritten for the question asked; `None` unless the cache holds
    /// what the cluster said of every candidate up to it.
    fn cached(&self, question: &Message, candidates: &[Name]) -> Option<Vec<u8>> {
        for candidate in candidates {
            if let Some(reply) = self.cached_answer(question, candidate)? {
                return Some(reply);
            }
        }
        None
    }

    /// What the cache holds of `candidate` for `question`: `Some(None)`
    /// when the cluster said there is no such name, `Some(Some(reply))`
    /// its reply rewritten for the question, `None` when it has nothing
    /// this client can take.
    fn cached_answer(&self, question: &Message, candidate: &Name) -> Option<Option<Vec<u8>>> {
        let key = Key::new(candidate, question.queries.first()?);
        match self
            .cache
            .get(&key, self.outbound.tunnels(), Instant::now())?
        {
            Said::NoSuchName => Some(None),
            Said::Reply(reply) => cached_reply(reply, question, candidate).map(Some),
        }
    }

    /// The cluster's answer for `candidate`, rewritten for the question
    /// asked, or why there is none.
    async fn ask_cluster(&self, question: &Message, candidate: &Name) -> Asked {
        match self.cached_answer(question, candidate) {
            Some(Some(reply)) => return Asked::Answer(reply),
            Some(None) => return Asked::NoSuchName,
            None => {}
        }
        self.ask_cluster_now(question, candidate)
            .await
            .unwrap_or(Asked::NoAnswer)
    }

    /// [`Answerer::ask_cluster`] through the tunnel; `None` when nothing
    /// usable came back.
    async fn ask_cluster_now(&self, question: &Message, candidate: &Name) -> Option<Asked> {
        let server = *self.outbound.resolver().nameservers.first()?;
        let key = Key::new(candidate, question.queries.first()?);
        let tunnel = self.outbound.tunnels();
        let mut query = question.clone();
        query.metadata.id = rand::random();
        query.queries.first_mut()?.set_name(candidate.clone());
        let reply = ask_through_tunnel(&self.outbound, server, &query, &self.dropped).await?;
        // One line per round trip to the cluster: what a cached name no
        // longer costs, countable from outside (`KTB_LOG=ktb::connect::dns=debug`).
        tracing::debug!(name = %candidate, code = %reply.metadata.response_code, "asked the cluster's DNS");
        self.cache.keep(key, &reply, tunnel, Instant::now());
        match reply.metadata.response_code {
            ResponseCode::NoError => for_question(reply, question, candidate).map(Asked::Answer),
            ResponseCode::NXDomain => Some(Asked::NoSuchName),
            _ => None,
        }
    }

    /// Forwards the query unchanged to the machine's own servers in turn;
    /// `message` is the query parsed, to check replies against.
    async fn upstream(&self, query: &[u8], message: &Message) -> Option<Vec<u8>> {
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
            let deadline = Instant::now() + QUERY_TIMEOUT;
            let mut buf = vec![0u8; 4096];
            while let Ok(Ok((n, from))) =
                tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
            {
                match check_reply(message, *server, from, &buf[..n]) {
                    Ok(_) => {
                        buf.truncate(n);
                        return Some(buf);
                    }
                    Err(why) => self.dropped.note(from, &why),
                }
            }
        }
        reply_code(message, ResponseCode::ServFail)
    }
}

/// What asking the cluster about one candidate name came to.
enum Asked {
    /// Its reply, rewritten for the question asked.
    Answer(Vec<u8>),
    /// NXDOMAIN: the cluster has no such name.
    NoSuchName,
    /// No usable reply: none in time, or an error other than NXDOMAIN.
    NoAnswer,
}

/// The cluster's `reply` about `candidate` as the answer to `question`:
/// its id, its question, and the name asked where the reply names the
/// candidate.
fn for_question(mut reply: Message, question: &Message, candidate: &Name) -> Option<Vec<u8>> {
    let asked = question.queries.first()?.name().clone();
    reply.metadata.id = question.metadata.id;
    reply.queries = question.queries.clone();
    for record in &mut reply.answers {
        if record.name.eq_case(candidate) || record.name == *candidate {
            record.name = asked.clone();
        }
    }
    reply.to_vec().ok()
}

/// [`for_question`] for a reply kept for another client's query: `None`
/// when it is larger than this client takes over UDP (the cluster is
/// asked instead); and without EDNS when this client's query had none, as a
/// server must answer (RFC 6891 §7). The cookie is dropped: it echoes the
/// other query's client cookie, which this client would reject as forged
/// (RFC 7873 §5.3); a reply without one is a server without cookies.
fn cached_reply(mut reply: Message, question: &Message, candidate: &Name) -> Option<Vec<u8>> {
    if question.edns.is_none() {
        reply.edns = None;
    }
    if let Some(edns) = reply.edns.as_mut() {
        edns.options_mut().remove(EdnsCode::Cookie);
    }
    let limit = question.edns.as_ref().map_or(PLAIN_UDP_REPLY, |edns| {
        edns.max_payload().max(PLAIN_UDP_REPLY)
    });
    for_question(reply, question, candidate).filter(|wire| wire.len() <= usize::from(limit))
}

/// Sends `query` to the cluster's DNS server through the tunnel and waits
/// for its reply, dropping whatever else arrives on the flow.
async fn ask_through_tunnel(
    outbound: &Outbound,
    server: SocketAddr,
    query: &Message,
    dropped: &Dropped,
) -> Option<Message> {
    let mut flow = outbound.flow().await.ok()?;
    flow.send(server, query.to_vec().ok()?.into()).await.ok()?;
    let deadline = Instant::now() + QUERY_TIMEOUT;
    loop {
        let datagram = tokio::time::timeout_at(deadline, flow.recv())
            .await
            .ok()??;
        match check_reply(query, server, datagram.peer, &datagram.payload) {
            Ok(reply) => return Some(reply),
            Err(why) => dropped.note(datagram.peer, &why),
        }
    }
}

/// The reply, if it is the answer to `query` from `server`; otherwise why
/// it is not.
fn check_reply(
    query: &Message,
    server: SocketAddr,
    from: SocketAddr,
    reply: &[u8],
) -> Result<Message, String> {
    if from != server {
        return Err(format!(
            "it came from {from}, not from {server}, the server asked"
        ));
    }
    let reply = Message::from_vec(reply).map_err(|e| format!("it does not parse: {e}"))?;
    if reply.metadata.message_type != MessageType::Response {
        return Err("it is not a response".into());
    }
    if reply.metadata.id != query.metadata.id {
        return Err(format!(
            "it carries id {}, the query {}",
            reply.metadata.id, query.metadata.id
        ));
    }
    if reply.queries != query.queries {
        return Err("it answers another question".into());
    }
    Ok(reply)
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
        cluster_domain(&resolver)?
    ))?;
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.add_query(hickory_proto::op::Query::query(
        name,
        hickory_proto::rr::RecordType::A,
    ));
    query.metadata.recursion_desired = true;
    match ask_through_tunnel(outbound, server, &query, &Dropped::default()).await {
        Some(_) => Ok(()),
        None => anyhow::bail!(
            "the agent cannot reach the cluster's DNS server {server} (no answer in {QUERY_TIMEOUT:?}): \
             is CoreDNS running, or a NetworkPolicy blocking the agent? Use --dns off to connect without cluster names"
        ),
    }
}

/// An answer of no records with `code`: SERVFAIL says "try elsewhere"
/// rather than leaving the client to time out, NXDOMAIN that the name is
/// not there.
fn reply_code(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut message = query.clone();
    message.metadata.message_type = MessageType::Response;
    message.metadata.response_code = code;
    message.metadata.recursion_available = true;
    message.to_vec().ok()
}

/// The cluster names `name` may stand for, most likely first; none when
/// the agent's search path names no valid cluster domain.
pub fn cluster_candidates(name: &Name, resolver: &Resolver) -> Vec<Name> {
    let domains = cluster_domain(resolver)
        .and_then(|domain| Ok((namespace_domain(resolver, &domain)?, domain)));
    let (namespace_domain, domain) = match domains {
        Ok(domains) => domains,
        Err(e) => {
            tracing::debug!("asking no cluster names: {e:#}");
            return Vec::new();
        }
    };
    let text = name.to_ascii().to_ascii_lowercase();
    let text = text.trim_end_matches('.');
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

/// The cluster's DNS domain, read off the agent's search path
/// (`svc.<domain>`, as kubelet writes it) and checked, since it goes into
/// queries and `/etc/hosts`. There is no default to fall back on: a
/// cluster's domain need not be `cluster.local`, and guessing it wrong
/// would send every cluster name to the wrong place.
pub fn cluster_domain(resolver: &Resolver) -> anyhow::Result<String> {
    let domain = resolver
        .search
        .iter()
        .find_map(|s| s.strip_prefix("svc."))
        .with_context(|| {
            format!(
                "the agent's resolv.conf names no cluster domain (no `svc.<domain>` in its search \
                 path {:?}), so cluster names cannot be completed: use --dns off",
                resolver.search
            )
        })?;
    check_name(domain).context(
        "the cluster domain the agent reported is refused; is the agent's pod DNS configured \
         oddly? Use --dns off to connect without cluster names",
    )?;
    Ok(domain.to_ascii_lowercase())
}

/// The agent's namespace's domain (`<namespace>.svc.<domain>`), which
/// completes bare names, checked like the cluster domain.
pub fn namespace_domain(resolver: &Resolver, domain: &str) -> anyhow::Result<Option<String>> {
    let suffix = format!(".svc.{domain}");
    let Some(namespace) = resolver
        .search
        .iter()
        .find(|s| s.to_ascii_lowercase().ends_with(&suffix))
    else {
        return Ok(None);
    };
    check_name(namespace).context("the namespace domain the agent reported is refused")?;
    Ok(Some(namespace.to_ascii_lowercase()))
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
            "{name:?} is not a valid DNS name (letters, digits and inner hyphens; \
             labels of at most {MAX_LABEL} characters, {MAX_NAME} in all)"
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

    fn with_search(search: &[&str]) -> Resolver {
        Resolver {
            search: search.iter().map(|s| s.to_string()).collect(),
            ..resolver()
        }
    }

    #[test]
    fn the_cluster_domain_is_checked_before_use() {
        assert_eq!(cluster_domain(&resolver()).unwrap(), "cluster.local");
        assert_eq!(
            cluster_domain(&with_search(&["svc.Corp-Cluster.example"])).unwrap(),
            "corp-cluster.example"
        );
        let long_label = format!("svc.{}.local", "a".repeat(64));
        let long_name = format!("svc.{}", ["abcdefghi"; 26].join("."));
        for bad in [
            "svc.cluster.local\n10.0.0.1 bank.example",
            "svc.cluster local",
            "svc.cluster.local#",
            "svc.clus_ter.local",
            "svc.-cluster.local",
            "svc.cluster..local",
            "svc.",
            &long_label,
            &long_name,
        ] {
            let refused = cluster_domain(&with_search(&[bad]));
            assert!(refused.is_err(), "{bad:?} was taken");
            assert!(candidates_with(&[bad], "web").is_empty(), "{bad:?}");
        }
        let message = format!(
            "{:#}",
            cluster_domain(&with_search(&["corp.example"])).unwrap_err()
        );
        assert!(message.contains("names no cluster domain"), "{message}");
        // A bad namespace domain: no completion of bare names either.
        assert!(
            candidates_with(&["te am.svc.cluster.local", "svc.cluster.local"], "web").is_empty()
        );
    }

    fn candidates_with(search: &[&str], name: &str) -> Vec<Name> {
        cluster_candidates(&Name::from_ascii(name).unwrap(), &with_search(search))
    }

    fn query(name: &str) -> Message {
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        query
    }

    /// `query`'s reply, with its id changed by `id_delta` and answering
    /// `name`, carrying `answer` as its one A record.
    fn reply(query: &Message, id_delta: u16, name: &str, answer: Ipv4Addr) -> Vec<u8> {
        let mut reply = query.clone();
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.id = query.metadata.id.wrapping_add(id_delta);
        reply.queries[0].set_name(Name::from_ascii(name).unwrap());
        reply.answers.push(hickory_proto::rr::Record::from_rdata(
            reply.queries[0].name().clone(),
            60,
            hickory_proto::rr::RData::A(answer.into()),
        ));
        reply.to_vec().unwrap()
    }

    #[test]
    fn only_the_server_asked_with_the_id_and_question_asked_is_believed() {
        let asked = query("web.team-a.svc.cluster.local.");
        let server: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let good = reply(
            &asked,
            0,
            "WEB.team-a.svc.cluster.local.",
            Ipv4Addr::new(10, 96, 0, 5),
        );
        assert!(check_reply(&asked, server, server, &good).is_ok());
        let elsewhere: SocketAddr = "10.244.3.3:53".parse().unwrap();
        assert!(check_reply(&asked, server, elsewhere, &good)
            .unwrap_err()
            .contains("not from 10.96.0.10:53"));
        let other_port: SocketAddr = "10.96.0.10:5353".parse().unwrap();
        assert!(check_reply(&asked, server, other_port, &good).is_err());
        let wrong_id = reply(
            &asked,
            1,
            "web.team-a.svc.cluster.local.",
            Ipv4Addr::LOCALHOST,
        );
        assert!(check_reply(&asked, server, server, &wrong_id)
            .unwrap_err()
            .contains("id 4243"));
        let other_name = reply(&asked, 0, "bank.example.", Ipv4Addr::LOCALHOST);
        assert!(check_reply(&asked, server, server, &other_name)
            .unwrap_err()
            .contains("another question"));
        let not_a_response = asked.to_vec().unwrap();
        assert!(check_reply(&asked, server, server, &not_a_response).is_err());
        assert!(check_reply(&asked, server, server, b"\x10\x92garbage").is_err());
    }

    #[tokio::test]
    async fn forged_upstream_replies_are_dropped_and_the_real_one_passed_on() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = upstream.local_addr().unwrap();
        let answerer = Answerer::new(Outbound::default(), vec![server], 60);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (n, client) = upstream.recv_from(&mut buf).await.unwrap();
            let asked = Message::from_vec(&buf[..n]).unwrap();
            let forged = Ipv4Addr::new(6, 6, 6, 6);
            // Forgeries guess the id wrong, or answer another name.
            for fake in [
                reply(&asked, 1, "www.example.com.", forged),
                reply(&asked, 0, "bank.example.", forged),
            ] {
                upstream.send_to(&fake, client).await.unwrap();
            }
            let real = reply(&asked, 0, "www.example.com.", Ipv4Addr::new(192, 0, 2, 80));
            upstream.send_to(&real, client).await.unwrap();
        });
        let asked = query("www.example.com.");
        let answer = answerer
            .answer(asked.to_vec().unwrap().into())
            .await
            .expect("answered");
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, 4242);
        assert_eq!(
            answer.answers[0].data,
            hickory_proto::rr::RData::A(Ipv4Addr::new(192, 0, 2, 80).into())
        );
        assert_eq!(answerer.dropped.0.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_query_that_does_not_parse_is_not_forwarded() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let answerer = Answerer::new(
            Outbound::default(),
            vec![upstream.local_addr().unwrap()],
            60,
        );
        assert_eq!(answerer.answer(Bytes::from_static(b"\x01")).await, None);
        let mut buf = [0u8; 512];
        let nothing = upstream.try_recv_from(&mut buf).unwrap_err();
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
    }
}
