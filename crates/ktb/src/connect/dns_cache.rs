//! What the cluster's DNS said lately, kept by `ktb connect`'s DNS server
//! ([`super::dns`]) so that a name asked again is answered on this
//! machine instead of through the tunnel.
//!
//! Each cluster name costs a round trip through the apiserver's
//! port-forward, the agent and CoreDNS, and programs ask the same few names
//! over and over (many clients resolve again for every new connection);
//! kt-connect keeps such a cache for the same reason (`--dnsCacheTtl`).
//!
//! Only the cluster's side is kept, keyed by the candidate name it was
//! asked (lowercased), the record type and the class: its reply, records
//! or "no records of that type" (NOERROR, empty answer), which is passed
//! on as the cluster sent it; and its "no such name" (NXDOMAIN), after
//! which the upstream servers answer. The upstream servers' answers are not
//! kept: those servers are this machine's own, and its stub resolver may
//! cache them already. A reply is kept until its shortest record TTL runs
//! out, a negative one for the SOA's negative TTL (RFC 2308), and never
//! longer than the user's `--dns-cache-ttl`. Failures (SERVFAIL, REFUSED,
//! no answer) and truncated replies are never kept: asking again is the
//! only way past them. When a new tunnel comes up, everything learnt
//! through the old one is dropped: while it was down, Services may have
//! been deleted or recreated with another ClusterIP.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::time::Instant;

/// `--dns-cache-ttl` unless told: kt-connect's `--dnsCacheTtl` default.
/// CoreDNS gives Service records a TTL of 5 s, so this mostly bounds
/// clusters configured for longer TTLs: a Service deleted and recreated
/// with another ClusterIP is seen within a minute at worst.
pub const DEFAULT_MAX_TTL: u32 = 60;
/// The longest `--dns-cache-ttl` may keep anything: a day, as common
/// resolvers cap TTLs (unbound's `cache-max-ttl`).
pub const MAX_TTL_LIMIT: u32 = 86_400;
/// Entries kept at most: far more distinct (name, type) pairs than one
/// machine's programs ask of a namespace within a TTL, and with replies of
/// at most [`MAX_REPLY_BYTES`] at most 16 MiB (a few hundred KiB typical).
pub const MAX_ENTRIES: usize = 4096;
/// Larger replies (as encoded) are not kept: the local server reads
/// queries and upstream replies into buffers of this size too.
const MAX_REPLY_BYTES: usize = 4096;
/// How long "no such name" is kept when the cluster's reply has no SOA to
/// say (CoreDNS always sends one; its own default TTL is 5 s).
const NEGATIVE_TTL_WITHOUT_SOA: u32 = 5;

/// The cache; shared by every query the server answers.
pub struct ClusterCache {
    /// The longest anything is kept, whatever its TTL; zero keeps nothing.
    max_ttl: u32,
    state: Mutex<State>,
}

struct State {
    entries: HashMap<Key, Entry>,
    /// The tunnel the entries were learnt through, as
    /// [`super::outbound::Outbound::tunnels`] counts them.
    tunnel: u64,
    /// Counts uses, to find the least recently used entry.
    uses: u64,
}

/// What a cached reply answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The candidate name asked of the cluster, lowercased, with its final dot.
    name: String,
    record_type: RecordType,
    class: DNSClass,
}

impl Key {
    /// The key of `question` asked of the cluster as `candidate`.
    pub fn new(candidate: &Name, question: &Query) -> Key {
        Key {
            name: candidate.to_ascii().to_ascii_lowercase(),
            record_type: question.query_type(),
            class: question.query_class(),
        }
    }
}

struct Entry {
    said: Said,
    stored: Instant,
    expires: Instant,
    /// [`State::uses`] when it was last stored or used.
    used: u64,
}

/// What the cluster said about a name.
#[derive(Debug, Clone, PartialEq)]
pub enum Said {
    /// Its reply, for the candidate name and with ktb's query id: records,
    /// or none of the type asked. From the cache, every TTL is less the
    /// whole seconds it spent there.
    Reply(Message),
    /// NXDOMAIN: not a name of the cluster's; the upstream servers answer.
    NoSuchName,
}

impl ClusterCache {
    /// A cache keeping nothing longer than `max_ttl` seconds (capped at
    /// [`MAX_TTL_LIMIT`]); zero turns it off.
    pub fn new(max_ttl: u32) -> ClusterCache {
        ClusterCache {
            max_ttl: max_ttl.min(MAX_TTL_LIMIT),
            state: Mutex::new(State {
                entries: HashMap::new(),
                tunnel: 0,
                uses: 0,
            }),
        }
    }

    /// What the cluster said for `key`, if it is still fresh at `now` and
    /// was learnt through `tunnel`, the one up now. The first look after a
    /// new tunnel came up empties the cache.
    pub fn get(&self, key: &Key, tunnel: u64, now: Instant) -> Option<Said> {
        if self.max_ttl == 0 {
            return None;
        }
        let mut guard = self.state.lock().expect("dns cache lock");
        let state = &mut *guard;
        if !state.on_tunnel(tunnel) {
            return None;
        }
        state.uses += 1;
        let uses = state.uses;
        let entry = state.entries.get_mut(key)?;
        if entry.expires <= now {
            state.entries.remove(key);
            return None;
        }
        entry.used = uses;
        Some(match &entry.said {
            Said::NoSuchName => Said::NoSuchName,
            Said::Reply(reply) => {
                let age = now.duration_since(entry.stored).as_secs();
                Said::Reply(aged(reply, u32::try_from(age).unwrap_or(u32::MAX)))
            }
        })
    }

    /// Keeps the cluster's `reply` for `key`, learnt at `now` through
    /// `tunnel`, for as long as it says, if it may be kept at all. A reply
    /// through a tunnel that has since been replaced is not kept.
    pub fn keep(&self, key: Key, reply: &Message, tunnel: u64, now: Instant) {
        if self.max_ttl == 0 {
            return;
        }
        let Some((said, ttl)) = self.lifetime(reply) else {
            return;
        };
        if !reply
            .to_vec()
            .is_ok_and(|wire| wire.len() <= MAX_REPLY_BYTES)
        {
            return;
        }
        let mut state = self.state.lock().expect("dns cache lock");
        if !state.on_tunnel(tunnel) {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES && !state.entries.contains_key(&key) {
            state.make_room(now);
        }
        state.uses += 1;
        let entry = Entry {
            said,
            stored: now,
            expires: now + Duration::from_secs(ttl.into()),
            used: state.uses,
        };
        state.entries.insert(key, entry);
    }

    /// Forgets everything. (ktb itself empties the cache by tunnel
    /// number, see [`ClusterCache::get`].)
    #[cfg(test)]
    fn flush(&self) {
        self.state.lock().expect("dns cache lock").entries.clear();
    }

    /// Entries held, fresh or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().expect("dns cache lock").entries.len()
    }

    /// What `reply` tells for how many seconds, capped; `None` if it is
    /// not to be kept.
    fn lifetime(&self, reply: &Message) -> Option<(Said, u32)> {
        if reply.metadata.truncation {
            return None;
        }
        let (said, ttl) = match reply.metadata.response_code {
            ResponseCode::NoError if !reply.answers.is_empty() => {
                let shortest = reply
                    .answers
                    .iter()
                    .chain(&reply.authorities)
                    .chain(&reply.additionals)
                    .map(|record| record.ttl)
                    .min()?;
                (Said::Reply(reply.clone()), shortest)
            }
            ResponseCode::NoError => (Said::Reply(reply.clone()), negative_ttl(reply)),
            ResponseCode::NXDomain => (Said::NoSuchName, negative_ttl(reply)),
            _ => return None,
        };
        let ttl = ttl.min(self.max_ttl);
        (ttl > 0).then_some((said, ttl))
    }
}

impl State {
    /// Whether entries learnt through `tunnel` belong here: a newer tunnel
    /// than the entries' empties the cache; an older one's are refused.
    fn on_tunnel(&mut self, tunnel: u64) -> bool {
        if tunnel > self.tunnel {
            self.entries.clear();
            self.tunnel = tunnel;
        }
        tunnel == self.tunnel
    }

    /// Drops the expired entries, or if none is, the least recently used
    /// one. A scan of at most [`MAX_ENTRIES`], only when full and only
    /// after a round trip through the tunnel, which costs far more.
    fn make_room(&mut self, now: Instant) {
        self.entries.retain(|_, entry| entry.expires > now);
        if self.entries.len() < MAX_ENTRIES {
            return;
        }
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, entry)| entry.used)
            .map(|(key, _)| key.clone());
        if let Some(oldest) = oldest {
            self.entries.remove(&oldest);
        }
    }
}

/// How long the cluster's "no such name" or "no such record" holds: the
/// SOA's negative TTL, the lesser of its MINIMUM and its own TTL
/// (RFC 2308 §5).
fn negative_ttl(reply: &Message) -> u32 {
    reply
        .authorities
        .iter()
        .find_map(|record| match &record.data {
            RData::SOA(soa) => Some(soa.minimum.min(record.ttl)),
            _ => None,
        })
        .unwrap_or(NEGATIVE_TTL_WITHOUT_SOA)
}

/// `reply` as it stands `age` seconds later: every TTL that much lower.
fn aged(reply: &Message, age: u32) -> Message {
    let mut reply = reply.clone();
    for record in reply
        .answers
        .iter_mut()
        .chain(&mut reply.authorities)
        .chain(&mut reply.additionals)
    {
        record.ttl = record.ttl.saturating_sub(age);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::MessageType;
    use hickory_proto::rr::rdata::SOA;
    use hickory_proto::rr::Record;
    use std::net::Ipv4Addr;

    const TUNNEL: u64 = 1;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn key(text: &str) -> Key {
        Key::new(&name(text), &Query::query(name(text), RecordType::A))
    }

    /// The cluster's reply for `text` with `code`, and one A record of
    /// each TTL in `ttls`.
    fn reply(text: &str, code: ResponseCode, ttls: &[u32]) -> Message {
        let mut reply = Message::query();
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.response_code = code;
        reply.add_query(Query::query(name(text), RecordType::A));
        for (i, ttl) in ttls.iter().enumerate() {
            let address = Ipv4Addr::from(0x0a60_0001 + u32::try_from(i).unwrap());
            reply.answers.push(Record::from_rdata(
                name(text),
                *ttl,
                RData::A(address.into()),
            ));
        }
        reply
    }

    /// `reply` with an SOA in its authority section, as CoreDNS sends
    /// with a negative answer.
    fn with_soa(mut reply: Message, ttl: u32, minimum: u32) -> Message {
        let soa = SOA::new(
            name("ns.dns.cluster.local."),
            name("hostmaster.cluster.local."),
            1,
            7200,
            1800,
            86400,
            minimum,
        );
        reply.authorities.push(Record::from_rdata(
            name("cluster.local."),
            ttl,
            RData::SOA(soa),
        ));
        reply
    }

    fn ttls(said: Option<Said>) -> Vec<u32> {
        match said {
            Some(Said::Reply(reply)) => reply.answers.iter().map(|r| r.ttl).collect(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    const WEB: &str = "web.team-a.svc.cluster.local.";

    #[test]
    fn a_reply_is_kept_until_its_shortest_ttl_with_ttls_counting_down() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        cache.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NoError, &[30, 10]),
            TUNNEL,
            t0,
        );
        assert_eq!(ttls(cache.get(&key(WEB), TUNNEL, t0)), [30, 10]);
        let later = t0 + Duration::from_millis(4_700);
        assert_eq!(ttls(cache.get(&key(WEB), TUNNEL, later)), [26, 6]);
        // Any spelling of the name finds it.
        assert!(cache
            .get(&key("WEB.Team-A.svc.cluster.local."), TUNNEL, later)
            .is_some());
        let almost = t0 + Duration::from_millis(9_999);
        assert_eq!(ttls(cache.get(&key(WEB), TUNNEL, almost)), [21, 1]);
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, t0 + Duration::from_secs(10)),
            None
        );
        assert_eq!(cache.len(), 0, "an expired entry is dropped when found");
        // Another type of the same name is another entry.
        let aaaa = Key::new(&name(WEB), &Query::query(name(WEB), RecordType::AAAA));
        cache.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NoError, &[30]),
            TUNNEL,
            t0,
        );
        assert_eq!(cache.get(&aaaa, TUNNEL, t0), None);
    }

    #[test]
    fn every_lifetime_is_capped_and_zero_keeps_nothing() {
        let cache = ClusterCache::new(60);
        let t0 = Instant::now();
        cache.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NoError, &[3600]),
            TUNNEL,
            t0,
        );
        assert_eq!(
            ttls(cache.get(&key(WEB), TUNNEL, t0 + Duration::from_secs(59))),
            [3541]
        );
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, t0 + Duration::from_secs(60)),
            None
        );

        cache.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NoError, &[30, 0]),
            TUNNEL,
            t0,
        );
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, t0),
            None,
            "a reply with a TTL of 0 was kept"
        );

        let off = ClusterCache::new(0);
        off.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NoError, &[30]),
            TUNNEL,
            t0,
        );
        assert_eq!(off.get(&key(WEB), TUNNEL, t0), None);
        assert_eq!(off.len(), 0);
        assert_eq!(ClusterCache::new(u32::MAX).max_ttl, MAX_TTL_LIMIT);
    }

    #[test]
    fn no_such_name_is_kept_for_the_soa_negative_ttl() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        let nxdomain = with_soa(reply(WEB, ResponseCode::NXDomain, &[]), 30, 7);
        cache.keep(key(WEB), &nxdomain, TUNNEL, t0);
        let at = |secs| t0 + Duration::from_millis(secs);
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, at(6_999)),
            Some(Said::NoSuchName)
        );
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, at(7_000)),
            None,
            "SOA minimum 7 s"
        );
        // The SOA's own TTL, when lower, bounds it instead.
        let nxdomain = with_soa(reply(WEB, ResponseCode::NXDomain, &[]), 3, 7);
        cache.keep(key(WEB), &nxdomain, TUNNEL, t0);
        assert_eq!(cache.get(&key(WEB), TUNNEL, at(3_000)), None, "SOA TTL 3 s");
        // Without an SOA, a short default.
        cache.keep(
            key(WEB),
            &reply(WEB, ResponseCode::NXDomain, &[]),
            TUNNEL,
            t0,
        );
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, at(4_999)),
            Some(Said::NoSuchName)
        );
        assert_eq!(cache.get(&key(WEB), TUNNEL, at(5_000)), None);
    }

    #[test]
    fn no_records_of_the_type_is_kept_as_the_reply_with_its_soa_aged() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        let no_data = with_soa(reply(WEB, ResponseCode::NoError, &[]), 30, 5);
        cache.keep(key(WEB), &no_data, TUNNEL, t0);
        match cache.get(&key(WEB), TUNNEL, t0 + Duration::from_secs(2)) {
            Some(Said::Reply(kept)) => {
                assert!(kept.answers.is_empty());
                assert_eq!(kept.authorities[0].ttl, 28);
            }
            other => panic!("expected the no-data reply, got {other:?}"),
        }
        assert_eq!(
            cache.get(&key(WEB), TUNNEL, t0 + Duration::from_secs(5)),
            None
        );
    }

    #[test]
    fn failures_and_truncated_replies_are_never_kept() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            cache.keep(
                key(WEB),
                &with_soa(reply(WEB, code, &[30]), 30, 30),
                TUNNEL,
                t0,
            );
        }
        let mut truncated = reply(WEB, ResponseCode::NoError, &[30]);
        truncated.metadata.truncation = true;
        cache.keep(key(WEB), &truncated, TUNNEL, t0);
        // 300 records of 16 bytes each: more than MAX_REPLY_BYTES.
        let huge = reply(WEB, ResponseCode::NoError, &[30; 300]);
        cache.keep(key(WEB), &huge, TUNNEL, t0);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_size_bound_holds_dropping_expired_then_least_recently_used() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        let names: Vec<String> = (0..MAX_ENTRIES + 500)
            .map(|i| format!("svc-{i}.team-a.svc.cluster.local."))
            .collect();
        // The first one is short-lived, the second used again and again.
        cache.keep(
            key(&names[0]),
            &reply(&names[0], ResponseCode::NoError, &[1]),
            TUNNEL,
            t0,
        );
        for (i, n) in names.iter().enumerate().skip(1) {
            let now = t0 + Duration::from_secs(2);
            cache.keep(key(n), &reply(n, ResponseCode::NoError, &[60]), TUNNEL, now);
            assert!(cache.len() <= MAX_ENTRIES, "{} entries", cache.len());
            assert!(
                cache.get(&key(&names[1]), TUNNEL, now).is_some(),
                "after {i}"
            );
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        let now = t0 + Duration::from_secs(2);
        let last = names.last().unwrap();
        assert!(cache.get(&key(last), TUNNEL, now).is_some());
        assert!(
            cache.get(&key(&names[2]), TUNNEL, now).is_none(),
            "least recently used"
        );
    }

    #[test]
    fn flush_and_a_new_tunnel_empty_it_and_an_old_tunnel_adds_nothing() {
        let cache = ClusterCache::new(300);
        let t0 = Instant::now();
        let web = reply(WEB, ResponseCode::NoError, &[30]);
        cache.keep(key(WEB), &web, TUNNEL, t0);
        cache.flush();
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.get(&key(WEB), TUNNEL, t0), None);

        cache.keep(key(WEB), &web, TUNNEL, t0);
        assert_eq!(cache.get(&key(WEB), TUNNEL + 1, t0), None);
        assert_eq!(cache.len(), 0, "the new tunnel flushed it");
        // A late reply through the old tunnel is not kept.
        cache.keep(key(WEB), &web, TUNNEL, t0);
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.get(&key(WEB), TUNNEL, t0), None);
    }
}

/// The cache as `ktb connect`'s DNS server uses it: a fake cluster DNS
/// server at the agent's end of a real tunnel session, counting the
/// queries that reach it.
#[cfg(test)]
mod through_the_answerer {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use ktb_proto::handshake::Resolver;

    use super::super::dns::Answerer;
    use super::super::outbound::Outbound;

    fn resolver() -> Resolver {
        Resolver {
            nameservers: vec!["10.96.0.10:53".parse().unwrap()],
            search: ["team-a.svc.cluster.local", "svc.cluster.local"]
                .map(String::from)
                .to_vec(),
        }
    }

    fn query(name: &str, id: u16) -> Message {
        let mut query = Message::query();
        query.metadata.id = id;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        query
    }

    /// How the fake cluster DNS answers a query (as the agent relays it).
    type Respond = fn(&Message) -> Message;

    /// A tunnel up on `outbound` whose agent end is a fake cluster DNS
    /// server answering with `respond`; returns how many queries it got.
    async fn fake_tunnel(outbound: &Outbound, respond: Respond) -> Arc<AtomicU64> {
        use crate::tunnel::ClientRole;
        use ktb_proto::handshake::{websocket_config, Welcome};
        use ktb_proto::udp::Datagram;
        use ktb_proto::{Incoming, Session, SessionConfig, Side};
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::WebSocketStream;

        let (a, b) = tokio::io::duplex(1 << 16);
        let agent_ws = WebSocketStream::from_raw_socket(a, Role::Server, Some(websocket_config()));
        let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, Some(websocket_config()));
        let (agent, mut to_agent) =
            Session::start(agent_ws.await, Side::Agent, SessionConfig::default());
        let (client, mut to_client) =
            Session::start(client_ws.await, Side::Client, SessionConfig::default());
        let welcome = Welcome {
            version: 1,
            ports: Vec::new(),
            agent: "fake".into(),
            resolver: resolver(),
        };
        outbound
            .up(&welcome, &client, &crate::report::Reporter::new(|_| {}))
            .unwrap();
        let pump = outbound.clone();
        tokio::spawn(async move {
            while let Some(item) = to_client.recv().await {
                pump.incoming(item);
            }
        });
        let asks = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&asks);
        tokio::spawn(async move {
            while let Some(item) = to_agent.recv().await {
                let Incoming::Datagram(datagram) = item else {
                    continue;
                };
                counted.fetch_add(1, Ordering::Relaxed);
                let query = Message::from_vec(&datagram.payload).unwrap();
                let reply = Datagram {
                    payload: respond(&query).to_vec().unwrap().into(),
                    ..datagram
                };
                agent.send_datagram(reply).await.unwrap();
            }
        });
        asks
    }

    /// The cluster's reply: `code`, and for NOERROR `query`'s name (as
    /// CoreDNS spells it) at 10.96.0.5, TTL 30.
    fn cluster_reply(query: &Message, code: ResponseCode) -> Message {
        let mut reply = query.clone();
        reply.metadata.message_type = MessageType::Response;
        reply.metadata.response_code = code;
        if code == ResponseCode::NoError {
            reply.answers.push(Record::from_rdata(
                query.queries[0].name().clone(),
                30,
                RData::A(Ipv4Addr::new(10, 96, 0, 5).into()),
            ));
        }
        reply
    }

    /// `name`'s A query with id `id`, and the reply `answerer` gives it.
    async fn ask(answerer: &Arc<Answerer>, name: &str, id: u16) -> Message {
        let asked = query(name, id);
        let reply = answerer.answer(asked.to_vec().unwrap().into()).await;
        Message::from_vec(&reply.expect("answered")).unwrap()
    }

    #[tokio::test]
    async fn a_repeated_cluster_name_is_answered_from_the_cache_as_the_answer_to_its_own_query() {
        let outbound = Outbound::default();
        let asks = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::NoError)).await;
        let answerer = Answerer::new(outbound, Vec::new(), 60);
        let first = ask(&answerer, "web.", 7).await;
        assert_eq!(first.metadata.id, 7);
        assert_eq!(asks.load(Ordering::Relaxed), 1);
        for (id, name) in [(8, "WEB.team-a."), (9, "web.team-a.svc.")] {
            let again = ask(&answerer, name, id).await;
            assert_eq!(asks.load(Ordering::Relaxed), 1, "{name} asked the cluster");
            assert_eq!(again.metadata.id, id);
            assert_eq!(
                again.queries,
                query(name, id).queries,
                "the question of {name}"
            );
            assert_eq!(again.answers.len(), 1);
            assert!(again.answers[0]
                .name
                .eq_case(&Name::from_ascii(name).unwrap()));
            assert!(again.answers[0].ttl <= 30);
            assert_eq!(
                again.answers[0].data,
                RData::A(Ipv4Addr::new(10, 96, 0, 5).into())
            );
        }
        // Another name is asked.
        ask(&answerer, "api.", 10).await;
        assert_eq!(asks.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_new_tunnel_empties_the_cache() {
        let outbound = Outbound::default();
        let first = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::NoError)).await;
        let answerer = Answerer::new(outbound.clone(), Vec::new(), 60);
        ask(&answerer, "web.", 1).await;
        ask(&answerer, "web.", 2).await;
        assert_eq!(first.load(Ordering::Relaxed), 1);
        let second = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::NoError)).await;
        ask(&answerer, "web.", 3).await;
        ask(&answerer, "web.", 4).await;
        assert_eq!(second.load(Ordering::Relaxed), 1, "asked again once");
        assert_eq!(first.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn servfail_is_asked_again_and_no_such_name_is_not() {
        let outbound = Outbound::default();
        let asks = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::ServFail)).await;
        let answerer = Answerer::new(outbound.clone(), Vec::new(), 60);
        for id in 1..=3 {
            let reply = ask(&answerer, "web.", id).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        }
        assert_eq!(asks.load(Ordering::Relaxed), 3);

        let asks = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::NXDomain)).await;
        for id in 1..=3 {
            // No upstream servers: their SERVFAIL, after the cluster's miss.
            ask(&answerer, "gone.", id).await;
        }
        assert_eq!(asks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_cache_ttl_of_zero_asks_the_cluster_every_time() {
        let outbound = Outbound::default();
        let asks = fake_tunnel(&outbound, |q| cluster_reply(q, ResponseCode::NoError)).await;
        let answerer = Answerer::new(outbound, Vec::new(), 0);
        for id in 1..=3 {
            assert_eq!(ask(&answerer, "web.", id).await.answers.len(), 1);
        }
        assert_eq!(asks.load(Ordering::Relaxed), 3);
    }
}
