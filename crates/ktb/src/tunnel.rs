//! Keeping a tunnel to an agent up.
//!
//! One tunnel carries every connection of a session, so it is dialed once
//! and re-dialed with exponential backoff whenever it drops: streams in
//! flight fail (their callers see a reset), new ones work as soon as the
//! tunnel is back. Errors that retrying cannot fix — a key the agent does
//! not know, a protocol version mismatch, a port the agent does not expose
//! — end the attachment at once with the agent's own explanation.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ktb_proto::handshake::{
    client_handshake, close_code, websocket_config, HandshakeError, Welcome, HANDSHAKE_TIMEOUT,
};
use ktb_proto::session::Side;
use ktb_proto::{ClientKey, Incoming, Link, Session, SessionConfig};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::expose::{Expose, LocalDialer, Routes};
use crate::report::{Event, Reporter};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown waits for the close frame to reach the agent.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// How bytes reach the agent's tunnel endpoint: directly over TCP, or (for
/// clusters) through a port-forward.
pub trait Transport: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn connect(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
    /// Shown in messages: where the tunnel goes.
    fn describe(&self) -> String;
    /// `host:port` for the WebSocket request line.
    fn authority(&self) -> String;
    /// How the tunnel's messages travel on this transport's connections.
    fn link(&self) -> LinkKind;
}

/// The two links of [`ktb_proto::link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// An HTTP upgrade to a WebSocket: a connection the laptop makes
    /// itself may cross proxies that only pass real WebSockets.
    WebSocket,
    /// Length-prefixed records: a port-forward already is a WebSocket, and
    /// a second one inside it only costs masking and parsing.
    Records,
}

/// Plain TCP to an address the laptop can reach (`--transport direct`).
#[derive(Clone)]
pub struct Direct {
    pub addr: String,
}

impl Transport for Direct {
    type Io = TcpStream;

    async fn connect(&self) -> io::Result<TcpStream> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {} in {CONNECT_TIMEOUT:?}", self.addr),
                )
            })??;
        tcp.set_nodelay(true)?;
        ktb_proto::socket::limit_unsent(&tcp)?;
        Ok(tcp)
    }

    fn describe(&self) -> String {
        self.addr.clone()
    }

    fn authority(&self) -> String {
        self.addr.clone()
    }

    fn link(&self) -> LinkKind {
        LinkKind::WebSocket
    }
}

/// What `ktb attach` needs.
pub struct AttachOptions {
    /// The session's private key; the agent knows its public half.
    pub key: Arc<ClientKey>,
    pub exposes: Vec<Expose>,
    pub session: SessionConfig,
}

/// Why attaching gave up for good.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    BadExpose(String),
}

/// What the client does with a tunnel: serve the streams the agent starts
/// (exchange), or start its own (connect).
pub trait ClientRole: Send + Sync + 'static {
    /// The tunnel is up: check the agent's offer and get ready. An error
    /// ends the attachment for good.
    fn up(
        &self,
        welcome: &Welcome,
        session: &Session,
        reporter: &Reporter,
    ) -> Result<(), AttachError>;
    /// Something the agent started or sent.
    fn incoming(&self, item: Incoming);
}

/// Exchange role: the agent's callers go to local ports.
struct ServeExposes {
    exposes: Vec<Expose>,
    dialer: Mutex<Option<LocalDialer>>,
}

impl ClientRole for ServeExposes {
    fn up(
        &self,
        welcome: &Welcome,
        _session: &Session,
        reporter: &Reporter,
    ) -> Result<(), AttachError> {
        let routes =
            Routes::resolve(&self.exposes, &welcome.ports).map_err(AttachError::BadExpose)?;
        reporter.report(Event::TunnelUp {
            agent: welcome.agent.clone(),
            routes: routes.list(),
        });
        *self.dialer.lock().expect("dialer lock") =
            Some(LocalDialer::new(routes, reporter.clone()));
        Ok(())
    }

    fn incoming(&self, item: Incoming) {
        let dialer = self.dialer.lock().expect("dialer lock").clone();
        if let (Incoming::Stream { stream, target }, Some(dialer)) = (item, dialer) {
            tokio::spawn(async move { dialer.serve(stream, target).await });
        }
    }
}

/// The exchange role for `exposes`, for [`RunningTunnel::start`].
pub fn exchange_role(exposes: Vec<Expose>) -> Arc<impl ClientRole> {
    Arc::new(ServeExposes {
        exposes,
        dialer: Mutex::new(None),
    })
}

/// Attaches to the agent and serves its streams until `shutdown` completes
/// or a fatal error occurs; transient failures are retried forever.
pub async fn attach<T: Transport>(
    transport: T,
    options: AttachOptions,
    reporter: Reporter,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AttachError> {
    let tunnel = TunnelConfig {
        key: options.key,
        session: options.session,
    };
    attach_as(
        transport,
        tunnel,
        exchange_role(options.exposes),
        reporter,
        shutdown,
    )
    .await
}

/// How to open a tunnel: the session's key and settings.
#[derive(Clone)]
pub struct TunnelConfig {
    /// Proves to the agent, on every connection, that this is its client.
    pub key: Arc<ClientKey>,
    pub session: SessionConfig,
}

/// Keeps a tunnel up for `role` until `shutdown` completes or a fatal error
/// occurs; transient failures are retried forever.
pub async fn attach_as<T: Transport, R: ClientRole>(
    transport: T,
    config: TunnelConfig,
    role: Arc<R>,
    reporter: Reporter,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AttachError> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::default();
    let live = Mutex::new(None);
    loop {
        let outcome = tokio::select! {
            outcome = connect_and_serve(&transport, &config, &*role, &reporter, &mut backoff, &live) => outcome,
            _ = &mut shutdown => {
                let session = live.lock().expect("live session lock").take();
                if let Some(session) = session {
                    session.close_and_flush(1000, "the ktb client is shutting down", GOODBYE_TIMEOUT).await;
                }
                return Ok(());
            }
        };
        let reason = match outcome {
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(reason)) => reason,
            Ok(reason) => reason,
        };
        let retry_in = backoff.next_delay();
        reporter.report(Event::TunnelDown { reason, retry_in });
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

enum Failure {
    Fatal(AttachError),
    Retry(String),
}

/// One tunnel's life: dial, handshake, serve until it drops. The live
/// session is left in `live` so that shutdown can close it politely.
async fn connect_and_serve<T: Transport, R: ClientRole>(
    transport: &T,
    config: &TunnelConfig,
    role: &R,
    reporter: &Reporter,
    backoff: &mut Backoff,
    live: &Mutex<Option<Session>>,
) -> Result<String, Failure> {
    let where_to = transport.describe();
    let io = transport
        .connect()
        .await
        .map_err(|e| Failure::Retry(format!("cannot reach the agent at {where_to}: {e}")))?;
    match transport.link() {
        LinkKind::Records => {
            let records = ktb_proto::link::client(io).await.map_err(|e| {
                Failure::Retry(format!("cannot reach the agent at {where_to}: {e}"))
            })?;
            serve(records, config, role, reporter, backoff, live).await
        }
        LinkKind::WebSocket => {
            let url = format!("ws://{}/tunnel", transport.authority());
            // Bounded: an agent that accepts the connection and then says
            // nothing must not hold the client forever.
            let upgrade =
                tokio_tungstenite::client_async_with_config(url, io, Some(websocket_config()));
            let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade)
                .await
                .map_err(|_| {
                    Failure::Retry(format!(
                        "the agent at {where_to} did not answer the tunnel request in {HANDSHAKE_TIMEOUT:?}"
                    ))
                })?
                .map_err(|e| {
                    Failure::Retry(format!(
                        "the agent at {where_to} did not accept a tunnel: {e}"
                    ))
                })?;
            serve(ws, config, role, reporter, backoff, live).await
        }
    }
}

/// Handshake on a dialed link, then the session until it drops.
async fn serve<L: Link, R: ClientRole>(
    mut ws: L,
    config: &TunnelConfig,
    role: &R,
    reporter: &Reporter,
    backoff: &mut Backoff,
    live: &Mutex<Option<Session>>,
) -> Result<String, Failure> {
    let welcome = match client_handshake(&mut ws, &config.key).await {
        Ok(welcome) => welcome,
        Err(HandshakeError::Refused { code, reason })
            if code == close_code::UNAUTHORIZED || code == close_code::VERSION_MISMATCH =>
        {
            return Err(Failure::Fatal(AttachError::Refused(format!(
                "the agent refused the tunnel: {reason}"
            ))))
        }
        Err(e) => return Err(Failure::Retry(e.to_string())),
    };
    let (session, mut incoming) = Session::start(ws, Side::Client, config.session.clone());
    if let Err(e) = role.up(&welcome, &session, reporter) {
        session.close(1000, "the client cannot use this agent");
        return Err(Failure::Fatal(e));
    }
    backoff.reset();
    *live.lock().expect("live session lock") = Some(session.clone());
    while let Some(item) = incoming.recv().await {
        role.incoming(item);
    }
    let closed = session.closed().await;
    // Only a client holding this session's private key can attach, and this
    // process never runs two tunnels at once: being replaced means another
    // process holds the key. Reconnecting would only evict it in turn, for
    // ever, with callers alternating between the two.
    if closed.by_peer && closed.code == Some(close_code::REPLACED) {
        return Err(Failure::Fatal(AttachError::Refused(format!(
            "{closed}: another client with this session's key took over the agent; this one stops"
        ))));
    }
    Ok(closed.to_string())
}

/// A tunnel kept up in the background by a command (`exchange`,
/// `connect`): started once the first tunnel is up, stopped on exit.
pub struct RunningTunnel {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AttachError>>,
}

impl RunningTunnel {
    /// Starts the tunnel and waits until it is up for the first time; an
    /// agent refusing it, or no tunnel within the timeout, is an error.
    /// Events after that go to `reporter`.
    pub async fn start<T: Transport, R: ClientRole>(
        transport: T,
        config: TunnelConfig,
        role: Arc<R>,
        reporter: &Reporter,
    ) -> anyhow::Result<RunningTunnel> {
        const FIRST_TUNNEL_TIMEOUT: Duration = Duration::from_secs(30);
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let outer = reporter.clone();
        let reporter = Reporter::new(move |event| {
            if matches!(event, Event::TunnelUp { .. }) {
                let _ = up_tx.send(());
            }
            outer.report(event);
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(attach_as(transport, config, role, reporter, async {
            let _ = stopped.await;
        }));
        let mut running = RunningTunnel {
            stop: Some(stop),
            task,
        };
        match tokio::time::timeout(FIRST_TUNNEL_TIMEOUT, up_rx.recv()).await {
            Ok(Some(())) => Ok(running),
            _ if running.task.is_finished() => {
                let result = (&mut running.task).await;
                Err(match result {
                    Ok(Err(e)) => anyhow::Error::from(e),
                    _ => anyhow::anyhow!("the tunnel ended before it came up"),
                })
            }
            _ => {
                running.stop().await;
                anyhow::bail!("the tunnel did not come up within {FIRST_TUNNEL_TIMEOUT:?}")
            }
        }
    }

    /// Closes the tunnel politely (at most a few seconds).
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.task).await;
    }
}

/// Exponential backoff with jitter, so many laptops that lost the same
/// cluster do not all come back in the same millisecond.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let jitter = rand::rng().random_range(0.8..1.2);
        let delay = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] < Duration::from_millis(300));
        assert!(delays[9] <= BACKOFF_MAX.mul_f64(1.2) && delays[9] >= BACKOFF_MAX.mul_f64(0.8));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(300));
    }
}
