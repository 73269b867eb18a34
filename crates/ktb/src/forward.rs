//! `ktb forward`: local ports that reach a Service's pods, like `kubectl
//! port-forward svc/NAME`, but still working after the pod behind them is
//! replaced (a rollout, an eviction, a crash).
//!
//! kubectl resolves the Service to one pod when it starts and dies with
//! that pod. Here every accepted local connection gets its own
//! port-forward through the apiserver ([`crate::portforward`]) straight to
//! a ready pod the Service selects: the current pick, re-used while it
//! works; when it cannot be opened (pod gone, stopped listening,
//! port-forward refused) the connection moves to the next ready pod, the
//! pick with it. The pods are listed again every [`REFRESH_EVERY`] (and at
//! once after a failure), so a rollout's new pods are picked as the old
//! ones go. Listening never stops, even while no pod is ready.
//!
//! Why a port-forward straight to the endpoint pod and not the ktb tunnel
//! through an agent pod: kubectl's path needs no pod of ours, so `forward`
//! creates nothing in the cluster (no Lease, no agent, nothing for `status`
//! to show or `clean` to repair, nothing left behind if this machine
//! vanishes) and needs only read access plus `pods/portforward`. The price
//! is paid per connection: opening a port-forward costs a few milliseconds
//! where a standing tunnel opens a stream almost for free (see the README's
//! exchange benchmark); a workload that opens many short connections would
//! be faster through a tunnel.
//!
//! How a refusal is told from an answer: a port-forward stream opens before
//! the kubelet dials the pod's port, and a failed dial comes back as the
//! stream ending. So until the pod has sent its first byte, the bytes the
//! client sent are kept (up to [`REPLAY_LIMIT`]); a stream that ends
//! without a byte within [`REFUSAL_WINDOW`] of opening counts as refused,
//! and the client's bytes are replayed to the next pod. The client sees
//! one connection that answered.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use ktb_kube::selector::display;
use ktb_kube::service::selector_of;

use crate::cluster::Cluster;
use crate::permissions::Command;
use crate::portforward::PortForward;
use crate::preflight;
use crate::report::Reporter;
use crate::service_ports::{container_port_named, describe, get_service, is_named_by};
use crate::tunnel::Transport;

/// Everything `forward` is told.
pub struct ForwardOptions {
    /// The Service (`web`, `svc/web`, `service/web`).
    pub service: String,
    /// What to forward; at least one.
    pub ports: Vec<PortSpec>,
    /// Local addresses to listen on (each port on each); at least one.
    pub addresses: Vec<IpAddr>,
}

/// `[LOCAL:]REMOTE`: the Service port REMOTE (its number or name) on the
/// local port LOCAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// The local port; `None` takes the Service port's number.
    pub local: Option<u16>,
    /// The Service port's number (`80`) or name (`http`).
    pub remote: String,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (local, remote) = match s.split_once(':') {
            Some((local, remote)) => {
                let local = local
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s:?}: LOCAL must be a port number from 1 to 65535"))?;
                (Some(local), remote)
            }
            None => (None, s),
        };
        if remote.is_empty() || remote.contains(':') {
            return Err(format!(
                "{s:?}: expected [LOCAL:]REMOTE, REMOTE a Service port's number or name (8080:80, 80, 8080:http)"
            ));
        }
        Ok(PortSpec {
            local,
            remote: remote.to_owned(),
        })
    }
}

/// How often the Service's pods are listed while all is well; a failed
/// connection asks for a listing at once.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// Listings never come closer than this, however many connections fail.
const RELIST_GAP: Duration = Duration::from_millis(100);
/// The longest a listing of pods may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest opening one port-forward may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that ends without a byte this soon after opening was refused
/// by the pod (the kubelet's failed dial), not closed by the program in it.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);
/// Client bytes kept for a replay while the pod has not answered; a client
/// that sends more first is committed to its pod.
const REPLAY_LIMIT: usize = 64 * 1024;
/// How long one local connection may wait for a pod that takes it, and
/// how many pods it tries, before it is closed.
const CONNECTION_PATIENCE: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: usize = 5;
/// Local connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;
/// Once the client stopped sending, how long the pod may stay silent
/// before the connection is closed (a client that vanished sends no FIN
/// twice).
const HALF_CLOSED_IDLE: Duration = Duration::from_secs(30);
/// Bytes moved per read, each way.
const CHUNK: usize = 32 * 1024;
/// How often "still no ready pod" and "connections were closed" are said.
const REMINDER_EVERY: Duration = Duration::from_secs(30);
const DROPPED_NOTICE_EVERY: Duration = Duration::from_secs(10);

/// Forwards until `shutdown` completes. Fails before listening if the
/// Service, a port or a permission is wrong, or a local port is taken;
/// once listening, only `shutdown` ends it.
pub async fn run(
    cluster: &Cluster,
    options: ForwardOptions,
    reporter: &Reporter,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let ns = cluster.namespace.as_str();
    let name = options
        .service
        .trim_start_matches("svc/")
        .trim_start_matches("service/")
        .to_owned();
    preflight::check(cluster, Command::Forward, &Command::Forward.needs()).await?;
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    let service = get_service(&services, &name, ns).await?;
    let selector = pod_selector(&service, &name)?;
    let routes = resolve_routes(&service, &name, &options.ports)?;
    let listeners = listen(&routes, &options.addresses, &name).await?;

    let (relist, relist_requests) = mpsc::channel(1);
    let endpoints = Arc::new(Endpoints {
        service: format!("svc/{name}"),
        selector,
        namespace: ns.to_owned(),
        client: cluster.client.clone(),
        ready: watch::channel(Vec::new()).0,
        relist,
        announced: AtomicBool::new(false),
        dropped: Mutex::new(DroppedNotice::default()),
        reporter: reporter.clone(),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(endpoints.clone().refresh_forever(relist_requests));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    for (listener, route) in listeners {
        tasks.spawn(serve_listener(
            listener,
            route,
            endpoints.clone(),
            slots.clone(),
        ));
    }

    let first = tokio::select! {
        pod = endpoints.first_pick() => pod,
        _ = &mut shutdown => return Ok(()),
    };
    let name = name.as_str();
    let forwards = routes
        .iter()
        .flat_map(|route| {
            options.addresses.iter().map(move |address| {
                format!(
                    "{} → svc/{name}:{}",
                    SocketAddr::new(*address, route.local),
                    route.service_port
                )
            })
        })
        .collect::<Vec<_>>()
        .join(", ");
    reporter.progress(format!(
        "✔ forwarding {forwards} (pod {first}). Ctrl-C stops"
    ));
    endpoints.announced.store(true, Ordering::Relaxed);
    shutdown.await;
    tasks.abort_all();
    Ok(())
}

/// The label selector of the Service's pods; a Service without one has no
/// pods ktb could choose from.
fn pod_selector(service: &Service, name: &str) -> anyhow::Result<String> {
    let spec = service.spec.as_ref().context("the Service has no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        anyhow::bail!(
            "Service {name} is an ExternalName alias for {}: it has no pods to forward to",
            spec.external_name.as_deref().unwrap_or("nothing")
        );
    }
    let selector = selector_of(service);
    if selector.is_empty() {
        anyhow::bail!(
            "Service {name} has no selector: its endpoints are managed by hand or by a controller, \
             so there are no pods ktb could pick; forward to a pod directly (`kubectl port-forward pod/NAME`)"
        );
    }
    Ok(display(&selector))
}

/// A port spec matched to one of the Service's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    local: u16,
    service_port: i32,
    target: Target,
}

/// Where a Service port sends traffic on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// This container port on every pod.
    Number(u16),
    /// The container port each pod gives this name (pods may differ).
    Named(String),
}

impl Target {
    /// The port on `pod`; `None` if the pod declares no port of the name.
    fn on(&self, pod: &Pod) -> Option<u16> {
        match self {
            Target::Number(port) => Some(*port),
            Target::Named(name) => {
                container_port_named(pod, name).and_then(|p| u16::try_from(p).ok())
            }
        }
    }
}

/// Matches every port spec to exactly one TCP port of the Service.
fn resolve_routes(service: &Service, name: &str, specs: &[PortSpec]) -> anyhow::Result<Vec<Route>> {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut routes: Vec<Route> = Vec::new();
    for spec in specs {
        let matching: Vec<_> = ports
            .iter()
            .filter(|p| is_named_by(p, &spec.remote))
            .collect();
        let Some(port) = matching
            .iter()
            .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        else {
            if matching.is_empty() {
                anyhow::bail!(
                    "Service {name} does not expose port {}: its ports are {}. Name one by number or name, as [LOCAL:]REMOTE",
                    spec.remote,
                    describe(&ports)
                );
            }
            anyhow::bail!(
                "port {} of Service {name} is not TCP: port-forward carries TCP only",
                spec.remote
            );
        };
        let number = |n: i32| {
            u16::try_from(n).with_context(|| format!("Service {name}: invalid port number {n}"))
        };
        let target = match &port.target_port {
            None => Target::Number(number(port.port)?),
            Some(IntOrString::Int(target)) => Target::Number(number(*target)?),
            Some(IntOrString::String(named)) => Target::Named(named.clone()),
        };
        let local = match spec.local {
            Some(local) => local,
            None => number(port.port)?,
        };
        if routes.iter().any(|r| r.local == local) {
            anyhow::bail!("local port {local} is given twice; give each REMOTE its own LOCAL, as LOCAL:REMOTE");
        }
        routes.push(Route {
            local,
            service_port: port.port,
            target,
        });
    }
    Ok(routes)
}

/// Binds every route's local port on every address, before any pod is
/// picked, so a taken port is reported at once.
async fn listen(
    routes: &[Route],
    addresses: &[IpAddr],
    name: &str,
) -> anyhow::Result<Vec<(TcpListener, Arc<Route>)>> {
    let mut listeners = Vec::new();
    for route in routes {
        let route = Arc::new(route.clone());
        for address in addresses {
            let local = SocketAddr::new(*address, route.local);
            let listener = match TcpListener::bind(local).await {
                Ok(listener) => listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                    "local port {local} is already in use (another program, or another `ktb forward`, listens there); \
                     pick a free one as LOCAL:REMOTE: `ktb forward {name} FREE_PORT:{}`",
                    route.service_port
                ),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => anyhow::bail!(
                    "cannot listen on {local}: ports below 1024 need root; pick LOCAL from 1024 up, as LOCAL:REMOTE"
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot listen on {local}"));
                }
            };
            listeners.push((listener, route.clone()));
        }
    }
    Ok(listeners)
}

/// A ready pod the Service selects.
#[derive(Debug, Clone)]
struct Candidate {
    name: String,
    pod: Pod,
}

/// The pods connections may go to, kept fresh by listing them.
struct Endpoints {
    /// `svc/NAME`, for messages.
    service: String,
    /// The Service's selector as `k=v,k=v`.
    selector: String,
    namespace: String,
    client: Client,
    /// Ready, not terminating pods as of the last listing, minus those that
    /// failed since: the current pick first, the rest newest first.
    ready: watch::Sender<Vec<Candidate>>,
    /// Asks for a listing now; one pending request is enough.
    relist: mpsc::Sender<()>,
    /// Whether the ready line has been said: pick changes before it are
    /// part of starting up, after it they are news.
    announced: AtomicBool,
    dropped: Mutex<DroppedNotice>,
    reporter: Reporter,
}

/// Local connections closed without reaching a pod, said at most every
/// [`DROPPED_NOTICE_EVERY`] with how many since the last time.
#[derive(Default)]
struct DroppedNotice {
    unsaid: u64,
    last_said: Option<Instant>,
}

/// What a listing found.
struct Listing {
    /// Ready, not terminating, newest first.
    ready: Vec<Candidate>,
    /// Every pod matching the selector.
    all: Vec<Pod>,
}

impl Endpoints {
    /// Lists the pods every [`REFRESH_EVERY`], or sooner when asked; says
    /// when there is no ready pod (again every [`REMINDER_EVERY`]) and when
    /// listing fails (once per outage, keeping the last pods known).
    async fn refresh_forever(self: Arc<Self>, mut requests: mpsc::Receiver<()>) -> Infallible {
        let mut no_pod_said: Option<Instant> = None;
        let mut listing_failed = false;
        loop {
            let started = Instant::now();
            match self.list().await {
                Ok(listing) => {
                    if listing_failed {
                        self.reporter
                            .progress(format!("{}: listing its pods works again", self.service));
                        listing_failed = false;
                    }
                    self.note_no_ready_pod(&listing, &mut no_pod_said);
                    self.replace(listing);
                }
                Err(e) => {
                    if !listing_failed {
                        self.reporter.warn(format!(
                            "{}: cannot list its pods ({e:#}); keeping the pods known so far and retrying every {}s",
                            self.service,
                            REFRESH_EVERY.as_secs()
                        ));
                        listing_failed = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until((started + REFRESH_EVERY).into()) => {}
                _ = requests.recv() => {
                    tokio::time::sleep_until((started + RELIST_GAP).into()).await;
                }
            }
        }
    }

    async fn list(&self) -> anyhow::Result<Listing> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let by_selector = ListParams::default().labels(&self.selector);
        let all = tokio::time::timeout(LIST_TIMEOUT, pods.list(&by_selector))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {LIST_TIMEOUT:?}"))?
            .map_err(crate::cluster::api_error)?
            .items;
        let mut ready: Vec<Candidate> = all
            .iter()
            .filter(|pod| is_ready(pod))
            .map(|pod| Candidate {
                name: pod.metadata.name.clone().unwrap_or_default(),
                pod: pod.clone(),
            })
            .collect();
        // Newest first: in a rollout the old pods are the ones about to go.
        ready.sort_by(|a, b| {
            b.pod
                .metadata
                .creation_timestamp
                .cmp(&a.pod.metadata.creation_timestamp)
        });
        Ok(Listing { ready, all })
    }

    /// Says that no pod is ready, with what the listing saw.
    fn note_no_ready_pod(&self, listing: &Listing, said: &mut Option<Instant>) {
        if !listing.ready.is_empty() {
            *said = None;
            return;
        }
        if said.is_some_and(|at| at.elapsed() < REMINDER_EVERY) {
            return;
        }
        let seen = if listing.all.is_empty() {
            format!("no pod matches {}", self.selector)
        } else {
            let states = listing
                .all
                .iter()
                .map(|pod| {
                    format!(
                        "{} {}",
                        pod.metadata.name.as_deref().unwrap_or("?"),
                        pod_state(pod)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("pods matching {}: {states}", self.selector)
        };
        self.reporter.progress(format!(
            "{}: no ready pod ({seen}); waiting for one, connections meanwhile wait up to {}s \
             (`kubectl get pods -n {} -l {}` shows them)",
            self.service,
            CONNECTION_PATIENCE.as_secs(),
            self.namespace,
            self.selector
        ));
        *said = Some(Instant::now());
    }

    /// Takes a listing's ready pods, keeping the current pick first if it is
    /// still among them.
    fn replace(&self, listing: Listing) {
        let gone_why = |name: &str| match listing
            .all
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
        {
            None => "is gone".to_owned(),
            Some(pod) => format!("is {}", pod_state(pod)),
        };
        self.change(
            |current| {
                let pick = current.first().map(|c| c.name.clone());
                let mut next = listing.ready.clone();
                if let Some(at) = pick.and_then(|p| next.iter().position(|c| c.name == p)) {
                    let kept = next.remove(at);
                    next.insert(0, kept);
                }
                *current = next;
            },
            gone_why,
        );
    }

    /// Applies `change` to the ready pods and says if the pick changed;
    /// `why` tells what happened to a pick that is no longer first.
    fn change(&self, change: impl FnOnce(&mut Vec<Candidate>), why: impl FnOnce(&str) -> String) {
        let mut before = None;
        let mut after = None;
        self.ready.send_if_modified(|ready| {
            before = ready.first().map(|c| c.name.clone());
            change(ready);
            after = ready.first().map(|c| c.name.clone());
            // Wake waiting connections whenever there is something to take.
            before != after || !ready.is_empty()
        });
        if before == after || !self.announced.load(Ordering::Relaxed) {
            return;
        }
        let message = match (before, after) {
            (Some(old), Some(new)) => {
                format!("pod {old} {}; now forwarding to pod {new}", why(&old))
            }
            (Some(old), None) => format!("pod {old} {}; no other pod is ready", why(&old)),
            (None, Some(new)) => format!("pod {new} is ready; forwarding to it"),
            (None, None) => return,
        };
        self.reporter
            .progress(format!("{}: {message}", self.service));
    }

    /// The first pick, once there is one.
    async fn first_pick(&self) -> String {
        let mut ready = self.ready.subscribe();
        loop {
            if let Some(pick) = ready.borrow_and_update().first() {
                return pick.name.clone();
            }
            // The sender lives in `self`: changed() cannot fail while we wait.
            let _ = ready.changed().await;
        }
    }

    /// The first ready pod that has `route`'s target port, with that
    /// port; waits for one until `deadline`. Pods that refused are not
    /// among them until a listing shows them ready again.
    async fn choose(&self, route: &Route, deadline: Instant) -> Option<(String, u16)> {
        let mut ready = self.ready.subscribe();
        loop {
            let found = ready
                .borrow_and_update()
                .iter()
                .find_map(|c| route.target.on(&c.pod).map(|port| (c.name.clone(), port)));
            if found.is_some() {
                return found;
            }
            let _ = self.relist.try_send(());
            match tokio::time::timeout_at(deadline.into(), ready.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// A pod refused a connection: it is dropped until a listing shows it
    /// ready again, and a listing is asked for.
    fn failed(&self, pod: &str, reason: &str) {
        self.change(
            |ready| ready.retain(|c| c.name != pod),
            |_| format!("refused a connection ({reason})"),
        );
        let _ = self.relist.try_send(());
    }

    /// A local connection reached no pod; said at most every
    /// [`DROPPED_NOTICE_EVERY`].
    fn dropped(&self, local: SocketAddr, reason: &str) {
        let mut notice = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        notice.unsaid += 1;
        if notice
            .last_said
            .is_some_and(|at| at.elapsed() < DROPPED_NOTICE_EVERY)
        {
            return;
        }
        self.reporter.warn(format!(
            "{}: closed {} connection(s) to {local} that reached no pod ({reason})",
            self.service, notice.unsaid
        ));
        notice.unsaid = 0;
        notice.last_said = Some(Instant::now());
    }
}

/// Ready to take connections: Running, condition Ready, not being deleted.
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|status| {
            status.phase.as_deref() == Some("Running")
                && status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// A pod's state in a few words, for messages.
fn pod_state(pod: &Pod) -> String {
    if pod.metadata.deletion_timestamp.is_some() {
        return "terminating".into();
    }
    if is_ready(pod) {
        return "ready".into();
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown");
    format!("not ready ({phase})")
}

/// Accepts on one local port for good; every connection is served on its
/// own task, at most [`MAX_CONNECTIONS`] at once across all ports.
async fn serve_listener(
    listener: TcpListener,
    route: Arc<Route>,
    endpoints: Arc<Endpoints>,
    slots: Arc<Semaphore>,
) -> Infallible {
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], route.local)));
    let mut connections = JoinSet::new();
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set stays as big as the live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        match accepted {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                let route = route.clone();
                let endpoints = endpoints.clone();
                connections.spawn(async move {
                    if let Err(reason) = serve_connection(client, &route, &endpoints).await {
                        endpoints.dropped(local, &reason);
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, keep listening.
                tracing::warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Carries one local connection to a pod, moving it to the next ready pod
/// while pods refuse it; Err with why if none took it in time.
async fn serve_connection(
    mut client: TcpStream,
    route: &Route,
    endpoints: &Endpoints,
) -> Result<(), String> {
    let deadline = Instant::now() + CONNECTION_PATIENCE;
    let mut relay = Relay::new();
    let mut refused_by: Vec<String> = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let Some((pod, port)) = endpoints.choose(route, deadline).await else {
            break;
        };
        let forward = PortForward {
            client: endpoints.client.clone(),
            namespace: endpoints.namespace.clone(),
            pod: pod.clone(),
            port,
        };
        let patience = deadline.saturating_duration_since(Instant::now());
        let opened = tokio::time::timeout(OPEN_TIMEOUT.min(patience), forward.connect()).await;
        let failure = match opened {
            Ok(Ok(stream)) => match relay.run(&mut client, stream).await {
                Relayed::Done => return Ok(()),
                Relayed::Refused => format!("pod {pod} closed port {port} at once"),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("port-forward to pod {pod} not open in {OPEN_TIMEOUT:?}"),
        };
        tracing::debug!(%pod, %failure, "trying the next pod");
        endpoints.failed(&pod, &failure);
        refused_by.push(failure);
    }
    Err(match refused_by.last() {
        None => format!(
            "no ready pod with its target port in {}s",
            CONNECTION_PATIENCE.as_secs()
        ),
        Some(last) => format!("{} attempt(s) refused; last: {last}", refused_by.len()),
    })
}

/// One local connection's bytes on their way to a pod.
struct Relay {
    /// What the client has sent, kept while no pod has answered so a
    /// refusing pod can be replaced; `None` once one answered or the client
    /// sent more than [`REPLAY_LIMIT`] first: the connection then stays
    /// with its pod.
    unanswered: Option<BytesMut>,
    /// The client has stopped sending (FIN).
    client_done: bool,
}

/// How a relay to one pod ended.
enum Relayed {
    /// The connection is over, whatever happened to it.
    Done,
    /// The pod ended the stream without a byte right after it opened: the
    /// client's bytes can go to another pod.
    Refused,
}

impl Relay {
    fn new() -> Self {
        Relay {
            unanswered: Some(BytesMut::new()),
            client_done: false,
        }
    }

    async fn run(&mut self, client: &mut TcpStream, mut pod: DuplexStream) -> Relayed {
        let opened = Instant::now();
        if let Some(sent) = &self.unanswered {
            if !sent.is_empty() && pod.write_all(sent).await.is_err() {
                return Relayed::Refused;
            }
        }
        // The stream has no half-close of its own (ending our side ends the
        // port-forward), so a client's FIN is not passed on: the pod's
        // answer still arrives, and the pod's end closes the connection.
        let refused =
            |relay: &Relay| relay.unanswered.is_some() && opened.elapsed() < REFUSAL_WINDOW;
        let mut from_client = vec![0u8; CHUNK];
        let mut from_pod = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                read = client.read(&mut from_client), if !self.client_done => match read {
                    Ok(0) => self.client_done = true,
                    Ok(n) => {
                        self.keep(&from_client[..n]);
                        if pod.write_all(&from_client[..n]).await.is_err() {
                            return if refused(self) { Relayed::Refused } else { Relayed::Done };
                        }
                    }
                    Err(_) => return Relayed::Done,
                },
                read = pod.read(&mut from_pod) => match read {
                    Ok(0) | Err(_) => {
                        if refused(self) {
                            return Relayed::Refused;
                        }
                        let _ = client.shutdown().await;
                        return Relayed::Done;
                    }
                    Ok(n) => {
                        self.commit();
                        if client.write_all(&from_pod[..n]).await.is_err() {
                            return Relayed::Done;
                        }
                    }
                },
                _ = tokio::time::sleep(HALF_CLOSED_IDLE), if self.client_done => return Relayed::Done,
            }
        }
    }

    /// Keeps client bytes for a replay, or commits if there are too many.
    fn keep(&mut self, bytes: &[u8]) {
        match &mut self.unanswered {
            Some(sent) if sent.len() + bytes.len() <= REPLAY_LIMIT => sent.extend_from_slice(bytes),
            _ => self.commit(),
        }
    }

    fn commit(&mut self) {
        self.unanswered = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn port(name: &str, number: i32, target: IntOrString, protocol: &str) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port: number,
            target_port: Some(target),
            protocol: Some(protocol.into()),
            ..ServicePort::default()
        }
    }

    #[test]
    fn port_specs_parse_with_and_without_local() {
        let spec = |s: &str| s.parse::<PortSpec>();
        assert_eq!(
            spec("8080:80"),
            Ok(PortSpec {
                local: Some(8080),
                remote: "80".into()
            })
        );
        assert_eq!(
            spec("http"),
            Ok(PortSpec {
                local: None,
                remote: "http".into()
            })
        );
        for bad in ["0:80", "x:80", "8080:", "", "1:2:3", "70000:80"] {
            assert!(spec(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn routes_follow_service_ports_by_number_or_name() {
        let svc = service(vec![
            port("http", 80, IntOrString::Int(8080), "TCP"),
            port("metrics", 9090, IntOrString::String("prom".into()), "TCP"),
            port("dns", 53, IntOrString::Int(5353), "UDP"),
        ]);
        let specs: Vec<PortSpec> = ["80", "19090:metrics"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let routes = resolve_routes(&svc, "web", &specs).unwrap();
        assert_eq!(
            routes,
            vec![
                Route {
                    local: 80,
                    service_port: 80,
                    target: Target::Number(8080)
                },
                Route {
                    local: 19090,
                    service_port: 9090,
                    target: Target::Named("prom".into())
                },
            ]
        );
        // The Service port, not the target port, is what REMOTE names.
        let error = resolve_routes(&svc, "web", &["8080".parse().unwrap()]).unwrap_err();
        assert!(
            error.to_string().contains("does not expose port 8080")
                && error.to_string().contains("http 80→8080"),
            "{error}"
        );
        let error = resolve_routes(&svc, "web", &["53".parse().unwrap()]).unwrap_err();
        assert!(error.to_string().contains("not TCP"), "{error}");
        let twice: Vec<PortSpec> = ["9000:80", "9000:metrics"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(resolve_routes(&svc, "web", &twice).is_err());
    }
}
