//! An agent and an attached CLI in one process, as the exchange data path
//! runs them: callers connect to the agent's exposed port, the CLI carries
//! each connection to a local server.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ktb::expose::Expose;
use ktb::report::{Event, Reporter};
use ktb::tunnel::{attach, AttachError, AttachOptions, Direct};
use ktb_agent::config::LogFormat;
use ktb_agent::{Agent, Config};
use ktb_proto::{ClientKey, ClientPublicKey, SessionConfig};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::proxy::CuttableProxy;

/// Agent configuration for loopback tests: one exposed ephemeral port,
/// and the defaults of a real agent otherwise (in connect role, loopback
/// destinations are refused: tests that dial local servers say so).
pub fn agent_config(connect: bool, client_key: ClientPublicKey) -> Config {
    Config {
        listen: (Ipv4Addr::LOCALHOST, 0).into(),
        ready_listen: None,
        client_key: Some(client_key),
        handshake_timeout: Duration::from_secs(5),
        expose_ports: vec![0],
        expose_address: Ipv4Addr::LOCALHOST.into(),
        connect,
        resolv_conf: "/etc/resolv.conf".into(),
        resolver: Default::default(),
        dial_timeout: Duration::from_secs(5),
        allow_loopback: false,
        allow_link_local: false,
        mesh_of: None,
        routes: Vec::new(),
        service: None,
        lease: None,
        session: None,
        namespace: None,
        grace: Duration::from_secs(30),
        log_format: LogFormat::Text,
    }
}

/// A running agent; shut down when dropped.
pub struct RunningAgent {
    pub tunnel: SocketAddr,
    pub exposed: SocketAddr,
    /// The readiness-only endpoint, when the configuration asked for one.
    pub ready: Option<SocketAddr>,
    /// The private key of the agent's client, as the laptop would hold it.
    pub key: Arc<ClientKey>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningAgent {
    pub async fn start(connect: bool) -> Self {
        Self::start_with(connect, |_| {}).await
    }

    /// An agent whose configuration `adjust` changes first.
    pub async fn start_with(connect: bool, adjust: impl FnOnce(&mut Config)) -> Self {
        let key = Arc::new(ClientKey::generate().expect("a session key"));
        let mut config = agent_config(connect, key.public());
        adjust(&mut config);
        let agent = Agent::bind(config).await.expect("agent binds");
        let tunnel = agent.tunnel_addr();
        let exposed = agent.exposed_addrs()[0];
        let ready = agent.ready_addr();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            agent
                .run(async { drop(stopped.await) })
                .await
                .expect("agent runs");
        });
        RunningAgent {
            tunnel,
            exposed,
            ready,
            key,
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// Events the CLI reported, for assertions.
#[derive(Clone, Default)]
pub struct Events {
    seen: Arc<Mutex<Vec<Event>>>,
    changed: Arc<Notify>,
}

impl Events {
    pub fn reporter(&self) -> Reporter {
        let events = self.clone();
        Reporter::new(move |event| {
            events.seen.lock().unwrap().push(event);
            events.changed.notify_waiters();
        })
    }

    pub fn all(&self) -> Vec<Event> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, matches: impl Fn(&Event) -> bool) -> usize {
        self.all().iter().filter(|e| matches(e)).count()
    }

    /// Waits until at least `n` events match.
    pub async fn wait_for(&self, n: usize, what: &str, matches: impl Fn(&Event) -> bool) {
        crate::within(what, async {
            loop {
                let changed = self.changed.notified();
                if self.count(&matches) >= n {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
            }
        })
        .await
    }
}

/// Agent + CLI attached through a cuttable proxy, serving `local`.
pub struct Bridge {
    pub agent: RunningAgent,
    pub proxy: CuttableProxy,
    pub events: Events,
    client: JoinHandle<Result<(), AttachError>>,
}

impl Bridge {
    /// Starts everything and waits until the tunnel is up.
    pub async fn start(local: SocketAddr) -> Self {
        init_test_logging();
        Self::attach(RunningAgent::start(false).await, local).await
    }

    /// Attaches a CLI to `agent` and waits until the tunnel is up.
    pub async fn attach(agent: RunningAgent, local: SocketAddr) -> Self {
        let proxy = CuttableProxy::start(agent.tunnel).await;
        let events = Events::default();
        let options = AttachOptions {
            key: Arc::clone(&agent.key),
            exposes: vec![Expose {
                local: local.port(),
                remote: Some(agent.exposed.port()),
            }],
            session: SessionConfig::default(),
        };
        let transport = Direct {
            addr: proxy.addr.to_string(),
        };
        let client = tokio::spawn(attach(
            transport,
            options,
            events.reporter(),
            std::future::pending(),
        ));
        events
            .wait_for(1, "tunnel up", |e| matches!(e, Event::TunnelUp { .. }))
            .await;
        Bridge {
            agent,
            proxy,
            events,
            client,
        }
    }

    /// Where cluster callers connect.
    pub fn caller_addr(&self) -> SocketAddr {
        self.agent.exposed
    }

    pub fn client_is_running(&self) -> bool {
        !self.client.is_finished()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.client.abort();
    }
}

/// Logs of agent and CLI on stderr when `KTB_TEST_LOG` is set (e.g. `debug`).
pub fn init_test_logging() {
    if let Ok(filter) = std::env::var("KTB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}
