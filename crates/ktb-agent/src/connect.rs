//! Connect role: the laptop's connections and datagrams, sent on from inside
//! the cluster.
//!
//! The laptop names a destination (an address, or a host name for the
//! cluster's DNS to resolve); the agent dials it with a timeout and bridges
//! the stream, or resets the stream with the dial error so the laptop can
//! report it. UDP gets one socket per flow, closed after a quiet period.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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

/// Handles everything the client starts on one tunnel.
pub async fn serve_requests(
    session: Session,
    mut incoming: mpsc::Receiver<Incoming>,
    connect_role: bool,
    dial_timeout: Duration,
) {
    let mut flows = Flows::default();
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Stream { stream, target } if connect_role => {
                tokio::spawn(dial_and_bridge(stream, target, dial_timeout));
            }
            Incoming::Stream { stream, .. } => stream
                .reset("this agent is in exchange role and does not dial out (use `ktb connect`)"),
            Incoming::Datagram(datagram) if connect_role => flows.send(&session, datagram).await,
            Incoming::Datagram(_) => {}
            Incoming::FlowEnd(flow) => flows.end(flow),
        }
    }
}

async fn dial_and_bridge(stream: Stream, target: Target, dial_timeout: Duration) {
    let dialed = match &target {
        Target::Addr(addr) => tokio::time::timeout(dial_timeout, TcpStream::connect(addr)).await,
        Target::Host { host, port } => {
            tokio::time::timeout(dial_timeout, TcpStream::connect((host.as_str(), *port))).await
        }
        Target::AgentPort { .. } => {
            stream.reset("agent ports are opened by the agent, not the client");
            return;
        }
    };
    let mut tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return stream.reset(&format!("cannot reach {target} from the cluster: {e}")),
        Err(_) => {
            return stream.reset(&format!(
                "cannot reach {target} from the cluster: no answer in {dial_timeout:?}"
            ))
        }
    };
    let _ = tcp.set_nodelay(true);
    stream.accept();
    let (reader, writer) = tcp.split();
    if let Err(e) = stream.bridge(reader, writer).await {
        tracing::debug!(%target, error = %e, "connect stream failed");
        crate::exchange::abort(tcp);
    }
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
