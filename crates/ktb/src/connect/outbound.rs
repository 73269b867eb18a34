//! The client end of a connect-role tunnel: this machine opens streams and
//! sends datagrams; the agent dials and relays them inside the cluster.
//!
//! The tunnel is re-dialed when it drops (see [`crate::tunnel`]), so the
//! current session lives in a watch channel: a connection that arrives while
//! the tunnel is down waits a moment for it instead of failing at once.
//! Datagram replies come back tagged with the flow id this side picked;
//! [`Flow`] routes them to whoever opened the flow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ktb_proto::handshake::{Resolver, Welcome};
use ktb_proto::tcp::Target;
use ktb_proto::udp::{Datagram, FlowId};
use ktb_proto::{Incoming, Session, Stream};
use tokio::sync::{mpsc, watch};

use crate::report::{Event, Reporter};
use crate::tunnel::{AttachError, ClientRole};

/// How long a new connection waits for a tunnel that is reconnecting.
const WAIT_FOR_TUNNEL: Duration = Duration::from_secs(5);
/// Replies queued per UDP flow before further ones are dropped.
const FLOW_QUEUE: usize = 64;

/// The connect role's shared state; cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

struct Inner {
    session: watch::Sender<Option<Session>>,
    resolver: watch::Sender<Resolver>,
    flows: Mutex<HashMap<FlowId, mpsc::Sender<Datagram>>>,
    next_flow: AtomicU32,
    /// Tunnels that came up so far; 0 before the first.
    tunnels: AtomicU64,
}

/// One UDP flow: datagrams out to any peer, replies in. Dropping it tells
/// the agent to close its socket.
pub struct Flow {
    id: FlowId,
    session: Session,
    replies: mpsc::Receiver<Datagram>,
    outbound: Outbound,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            inner: Arc::new(Inner {
                session: watch::channel(None).0,
                resolver: watch::channel(Resolver::default()).0,
                flows: Mutex::new(HashMap::new()),
                next_flow: AtomicU32::new(1),
                tunnels: AtomicU64::new(0),
            }),
        }
    }
}

impl Outbound {
    /// The live session, waiting a little if the tunnel is being re-dialed.
    pub async fn session(&self) -> std::io::Result<Session> {
        let mut rx = self.inner.session.subscribe();
        let live = tokio::time::timeout(WAIT_FOR_TUNNEL, async {
            rx.wait_for(|s| s.as_ref().is_some_and(|s| !s.is_closed()))
                .await
                .ok()
                .and_then(|s| s.clone())
        })
        .await;
        match live {
            Ok(Some(session)) => Ok(session),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("the tunnel to the cluster is down (waited {WAIT_FOR_TUNNEL:?})"),
            )),
        }
    }

    /// Opens a stream to `target` without waiting for the agent to reach
    /// it: bytes written at once travel right behind the open, so a new
    /// connection's first answer takes one round trip, not two. A refused
    /// dial arrives as the stream's failure.
    pub async fn open(&self, target: Target) -> std::io::Result<Stream> {
        let session = self.session().await?;
        session
            .open(target)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string()))
    }

    /// Opens a stream to `target` and waits until the agent reached it.
    pub async fn connect(&self, target: Target) -> std::io::Result<Stream> {
        let mut stream = self.open(target).await?;
        stream
            .opened()
            .await
            .map_err(|reason| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, reason))?;
        Ok(stream)
    }

    /// A new UDP flow on the live session.
    pub async fn flow(&self) -> std::io::Result<Flow> {
        let session = self.session().await?;
        let id = self.inner.next_flow.fetch_add(1, Ordering::Relaxed);
        let (tx, replies) = mpsc::channel(FLOW_QUEUE);
        self.inner.flows.lock().expect("flows lock").insert(id, tx);
        Ok(Flow {
            id,
            session,
            replies,
            outbound: self.clone(),
        })
    }

    /// The agent's resolver, as its last Welcome described it.
    pub fn resolver(&self) -> Resolver {
        self.inner.resolver.borrow().clone()
    }

    /// Which tunnel is up, counting from 1: a new number means the tunnel
    /// dropped and came back, and what was learnt through the old one
    /// (cached DNS answers) may no longer hold. Counted before the new
    /// session is handed out, so nothing learnt through the new tunnel
    /// carries an old number.
    pub fn tunnels(&self) -> u64 {
        self.inner.tunnels.load(Ordering::Acquire)
    }

    /// Waits until the first tunnel is up.
    pub async fn wait_up(&self) {
        let mut rx = self.inner.session.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }
}

impl ClientRole for Outbound {
    fn up(
        &self,
        welcome: &Welcome,
        session: &Session,
        reporter: &Reporter,
    ) -> Result<(), AttachError> {
        reporter.report(Event::TunnelUp {
            agent: welcome.agent.clone(),
            routes: Vec::new(),
        });
        self.inner.resolver.send_replace(welcome.resolver.clone());
        // Flows of the previous tunnel died with it on the agent's side.
        self.inner.flows.lock().expect("flows lock").clear();
        self.inner.tunnels.fetch_add(1, Ordering::Release);
        self.inner.session.send_replace(Some(session.clone()));
        Ok(())
    }

    fn incoming(&self, item: Incoming) {
        match item {
            Incoming::Stream { stream, .. } => {
                stream.reset("a connect client accepts no streams from the cluster")
            }
            Incoming::Datagram(datagram) => {
                let flows = self.inner.flows.lock().expect("flows lock");
                if let Some(tx) = flows.get(&datagram.flow) {
                    // Full queue: drop, as a congested network would.
                    let _ = tx.try_send(datagram);
                }
            }
            Incoming::FlowEnd(flow) => {
                self.inner.flows.lock().expect("flows lock").remove(&flow);
            }
        }
    }
}

impl Flow {
    pub async fn send(&self, peer: std::net::SocketAddr, payload: Bytes) -> std::io::Result<()> {
        self.session
            .send_datagram(Datagram {
                flow: self.id,
                peer,
                payload,
            })
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotConnected, e.to_string()))
    }

    /// The next reply; `None` once the flow or its tunnel has ended.
    pub async fn recv(&mut self) -> Option<Datagram> {
        self.replies.recv().await
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.outbound
            .inner
            .flows
            .lock()
            .expect("flows lock")
            .remove(&self.id);
        self.session.end_flow(self.id);
    }
}
