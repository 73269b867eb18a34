//! Proving the path from the Service to this agent, so the laptop only
//! says "ready" once callers really arrive.
//!
//! The laptop asks (`GET /probe?port=P&target=T`); the agent dials its own
//! Service's ClusterIP on port P, writes an HTTP request whose path is a
//! fresh random nonce, and waits for a connection starting with that
//! request line on its listener for target port T. It is an HTTP request
//! so that a Service meshed by several developers routes it like any other:
//! a member's probe carries its mark (`&mark=NAME=VALUE`) and the shared
//! router sends it to that member's agent. The listener peeks at the first
//! bytes of each connection only while a probe is pending on its port, and
//! swallows the probe's connection, so the laptop's process never sees it;
//! every other connection is carried on untouched (a peek consumes nothing).
//!
//! The same probe proves the way back: when the laptop hands the Service
//! back, it waits until probes are accepted by another endpoint (the
//! connection is answered, closed or left silent by someone else) before it
//! closes the tunnel, so no caller is still being sent to a shadow that is
//! going away. One probe at a time, and the ClusterIP is read from the
//! apiserver once (it never changes for a Service), so the endpoint, which
//! answers before authentication, costs a caller at most one connection to
//! this agent's own Service per probe.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OnceCell};

/// How long a probe connection may take to arrive through the Service.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a listener waits for the first bytes of a connection while a
/// probe is pending on its port: callers of server-speaks-first protocols
/// wait this long, once, and only during a probe.
const PEEK_TIMEOUT: Duration = Duration::from_millis(200);
/// Hex digits of the nonce in the probe's path.
const NONCE_HEX: usize = 32;
/// The probe's request line up to its nonce.
const PROBE_PREFIX: &str = "GET /.ktb-probe/";
/// What a listener recognises: the request line up to the end of the nonce.
const SIGNATURE_LEN: usize = PROBE_PREFIX.len() + NONCE_HEX;

type Signature = [u8; SIGNATURE_LEN];

/// Where a probe's connection, accepted by the Service, went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    /// On this agent's listener: callers of the Service reach this agent.
    Here,
    /// On another endpoint: it answered or closed the connection, or kept
    /// silent past [`ARRIVAL_TIMEOUT`] while nothing arrived here.
    Elsewhere,
}

/// A header the probe request carries: a mesh member's mark, as
/// restricted as `ktb mesh` restricts it ([`ktb_kube::mesh::split_mark`]),
/// since the endpoint that asks for a probe answers before authentication
/// and must not let anyone write arbitrary bytes into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeMark {
    name: String,
    value: String,
}

impl ProbeMark {
    /// Parses `NAME=VALUE`; `None` for anything else.
    pub fn parse(text: &str) -> Option<ProbeMark> {
        let (name, value) = ktb_kube::mesh::split_mark(text)?;
        Some(ProbeMark {
            name: name.into(),
            value: value.into(),
        })
    }
}

/// The probe's request: its first [`SIGNATURE_LEN`] bytes are the signature.
fn probe_request(nonce: &[u8; NONCE_HEX / 2], mark: Option<&ProbeMark>) -> (Signature, Vec<u8>) {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let mark = mark
        .map(|m| format!("{}: {}\r\n", m.name, m.value))
        .unwrap_or_default();
    let request = format!(
        "{PROBE_PREFIX}{hex} HTTP/1.1\r\nhost: ktb-probe\r\n{mark}connection: close\r\n\r\n"
    );
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(&request.as_bytes()[..SIGNATURE_LEN]);
    (signature, request.into_bytes())
}

/// The Service this agent stands in for, and the probe in flight.
pub struct Probes {
    /// `(namespace, name)` of the Service; `None` in connect role.
    service: Option<(String, String)>,
    cluster_ip: OnceCell<IpAddr>,
    pending: Mutex<Option<Pending>>,
    single_flight: tokio::sync::Mutex<()>,
}

/// A probe waiting for its connection on `port`.
struct Pending {
    port: u16,
    signature: Signature,
    arrived: Option<oneshot::Sender<()>>,
}

impl Probes {
    pub fn new(namespace: Option<String>, service: Option<String>) -> Probes {
        Probes {
            service: namespace.zip(service),
            cluster_ip: OnceCell::new(),
            pending: Mutex::new(None),
            single_flight: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `tcp`, just accepted on `port`, is the pending probe's
    /// connection (then it is consumed here).
    pub async fn claims(&self, port: u16, tcp: &TcpStream) -> bool {
        let signature = match &*self.pending.lock().expect("probe lock") {
            Some(pending) if pending.port == port => pending.signature,
            _ => return false,
        };
        let mut first = [0u8; SIGNATURE_LEN];
        let peeked = tokio::time::timeout(PEEK_TIMEOUT, async {
            loop {
                match tcp.peek(&mut first).await {
                    Ok(n) if n < SIGNATURE_LEN && n > 0 && first[..n] == signature[..n] => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Ok(n) => return n == SIGNATURE_LEN && first == signature,
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if peeked {
            let mut pending = self.pending.lock().expect("probe lock");
            if let Some(arrived) = pending.as_mut().and_then(|p| p.arrived.take()) {
                let _ = arrived.send(());
            }
        }
        peeked
    }

    /// Dials the Service on `service_port` and tells whether the connection
    /// landed on the listener of `target`. The error (the Service could not
    /// be dialled at all) is the reason, for the laptop.
    pub async fn run(
        &self,
        service_port: u16,
        target: u16,
        mark: Option<ProbeMark>,
    ) -> Result<Landed, String> {
        let Ok(_only_one) = self.single_flight.try_lock() else {
            return Err("another probe is running; try again".into());
        };
        let ip = self.cluster_ip().await?;
        let (signature, request) = probe_request(&rand::random(), mark.as_ref());
        let (arrived, arrival) = oneshot::channel();
        *self.pending.lock().expect("probe lock") = Some(Pending {
            port: target,
            signature,
            arrived: Some(arrived),
        });
        let result = self
            .dial(SocketAddr::new(ip, service_port), &request, arrival)
            .await;
        *self.pending.lock().expect("probe lock") = None;
        result.map_err(|reason| format!("{reason} (target port {target})"))
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        request: &[u8],
        mut arrival: oneshot::Receiver<()>,
    ) -> Result<Landed, String> {
        let mut tcp = match tokio::time::timeout(ARRIVAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(format!("cannot connect to the Service at {addr}: {e}")),
            Err(_) => {
                return Err(format!(
                    "no answer from the Service at {addr} within {ARRIVAL_TIMEOUT:?}"
                ))
            }
        };
        tcp.write_all(request)
            .await
            .map_err(|e| format!("cannot write to the Service at {addr}: {e}"))?;
        let mut answer = [0u8; 1];
        let landed = tokio::time::timeout(ARRIVAL_TIMEOUT, async {
            tokio::select! {
                // A claimed probe is signalled before its connection is
                // dropped, so arrival wins over the EOF that follows it.
                biased;
                arrived = &mut arrival => if arrived.is_ok() { Landed::Here } else { Landed::Elsewhere },
                _ = tcp.read(&mut answer) => match arrival.try_recv() {
                    Ok(()) => Landed::Here,
                    Err(_) => Landed::Elsewhere,
                },
            }
        })
        .await;
        Ok(landed.unwrap_or(Landed::Elsewhere))
    }

    async fn cluster_ip(&self) -> Result<IpAddr, String> {
        let Some((namespace, name)) = &self.service else {
            return Err("this agent stands in for no Service".into());
        };
        self.cluster_ip
            .get_or_try_init(|| async {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| format!("no access to the Kubernetes API: {e}"))?;
                let service = Api::<Service>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map_err(|e| format!("cannot read Service {name}: {e}"))?;
                service
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .and_then(|ip| ip.parse().ok())
                    .ok_or_else(|| format!("Service {name} has no ClusterIP"))
            })
            .await
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_an_http_request_carrying_the_mark() {
        let mark = ProbeMark::parse("x-ktb-mark=dev-a.1f").unwrap();
        let (signature, request) = probe_request(&[0xab; NONCE_HEX / 2], Some(&mark));
        let text = String::from_utf8(request).unwrap();
        assert!(text.starts_with(&format!("GET /.ktb-probe/{} HTTP/1.1\r\n", "ab".repeat(16))));
        assert!(text.contains("\r\nx-ktb-mark: dev-a.1f\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        assert_eq!(&signature[..], &text.as_bytes()[..SIGNATURE_LEN]);
    }

    #[test]
    fn a_mark_cannot_smuggle_bytes_into_the_request() {
        for bad in ["x=a\r\nevil: 1", "x", "=v", "x=", "x y=v", "x=v:w"] {
            assert!(ProbeMark::parse(bad).is_none(), "{bad:?}");
        }
    }
}
