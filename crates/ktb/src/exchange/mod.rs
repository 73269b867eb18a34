//! `ktb exchange`: callers of a cluster Service reach the developer's
//! local process instead.
//!
//! The phases, each undone in reverse if a later one fails or the user
//! stops: check the Service and ports (read-only) → check permissions
//! (read-only) → lock the Service (Lease) → create the shadow pod and its
//! objects → wait until it is ready → open the tunnel through a
//! port-forward → point the Service at the shadow pod → serve, renewing the
//! lock, until Ctrl-C / SIGTERM / SIGHUP → restore the Service, delete the
//! session's objects, release the lock. The Service is switched only once
//! the tunnel is up, so callers never meet a shadow pod with nobody behind
//! it; and if the laptop vanishes, the agent restores the Service itself
//! after the grace period.

pub mod lock;
pub mod shadow;
pub mod target;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use rand::Rng;

use ktb_kube::names::{exchange_lease, session_objects, AGENT_TUNNEL_PORT};
use ktb_kube::service::{self, display, selector_of, Restored};
use ktb_kube::workload::{self, Found, Kind};
use ktb_proto::{ClientKey, SessionConfig};

use crate::cluster::Cluster;
use crate::expose::Expose;
use crate::portforward::PortForward;
use crate::preflight::{self, need, Need};
use crate::tunnel::{self, Direct, RunningTunnel, TunnelConfig};
use lock::{Lock, Taken};
use shadow::{session_labels, Shadow, ShadowSpec};
use target::{ExposeArg, PortRoute};

/// Everything `exchange` is told.
pub struct ExchangeOptions {
    pub service: String,
    pub mode: Mode,
    pub transport: TransportKind,
    pub exposes: Vec<ExposeArg>,
    pub grace: Duration,
    pub agent_image: String,
    pub pull_policy: String,
    pub ready_timeout: Duration,
}

/// How the laptop reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// A port-forward through the apiserver: works wherever kubectl does.
    PortForward,
    /// TCP straight to the pod's IP, for laptops that can reach pod IPs
    /// (a VPN into the cluster network, or `ktb connect`).
    Direct,
}

impl TransportKind {
    fn describe(self) -> &'static str {
        match self {
            TransportKind::PortForward => "port-forward through the apiserver",
            TransportKind::Direct => "direct to the pod IP",
        }
    }
}

/// How the Service's traffic is moved to the shadow pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Point the Service's selector at the shadow pod; the original pods
    /// keep running untouched.
    Selector,
    /// The shadow pod takes the workload's pod labels and the Deployment or
    /// StatefulSet behind the Service is scaled to zero; the Service's spec
    /// is not touched.
    Scale,
}

/// How long teardown keeps the shadow pod while a scaled-down workload
/// comes back.
const WORKLOAD_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Verbs every mode needs on top of the agent's, checked before anything
/// changes: the Service, and taking over an expired Lease.
const EXCHANGE_NEEDS: &[Need] = &[
    need("get", "", "services"),
    need("patch", "", "services"),
    need("get", "coordination.k8s.io", "leases"),
    need("update", "coordination.k8s.io", "leases"),
];

/// What scale mode needs on top, for the kind of workload found.
fn scale_needs(kind: Kind) -> [Need; 3] {
    let (resource, group) = (kind.resource(), "apps");
    [
        need("get", group, resource),
        Need {
            verb: "get",
            group,
            resource,
            subresource: "scale",
        },
        Need {
            verb: "patch",
            group,
            resource,
            subresource: "scale",
        },
    ]
}

fn say(message: impl std::fmt::Display) {
    eprintln!("ktb: {message}");
}

/// Runs an exchange until `shutdown` completes; the cluster is left as it
/// was found whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: ExchangeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let ns = cluster.namespace.clone();
    let services = Api::<Service>::namespaced(cluster.client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), &ns);
    let name = options
        .service
        .trim_start_matches("svc/")
        .trim_start_matches("service/")
        .to_owned();
    let qualified = format!("{ns}/{name}");

    let original = target::exchangeable_service(&services, &name, &ns).await?;
    let routes = target::resolve_ports(&pods, &original, &options.exposes).await?;
    let mut needs = [EXCHANGE_NEEDS, shadow::AGENT_NEEDS].concat();
    let workload = match options.mode {
        Mode::Selector => None,
        Mode::Scale => {
            needs.extend([need("list", "", "pods"), need("get", "apps", "replicasets")]);
            let found =
                workload::behind_service(&cluster.client, &ns, &selector_of(&original)).await?;
            needs.extend(scale_needs(found.replicas.kind));
            Some(found)
        }
    };
    preflight::check(cluster, &needs).await?;
    warn_about_closed_local_ports(&routes).await;

    let session: String = format!("{:08x}", rand::rng().random::<u32>());
    let identity = format!("{}@{}", cluster.whoami().await?, crate::cluster::hostname());
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    let lock = lock_service(cluster, &leases, &name, &identity, &session, options.grace).await?;

    let objects = session_objects(&name, &session);
    let plan = Plan {
        name: &name,
        qualified: &qualified,
        session: &session,
        routes: &routes,
        workload: workload.as_ref(),
    };
    let outcome = tokio::select! {
        outcome = exchange_locked(cluster, &options, &plan, &lock) => outcome,
        _ = &mut shutdown => Err(Interrupted.into()),
    };
    let mut tunnel = match outcome {
        Ok(tunnel) => tunnel,
        Err(e) => {
            say("undoing what this session changed");
            restore_service(cluster, &name).await;
            remove_session(cluster, &objects, &lock).await;
            return if e.is::<Interrupted>() {
                Ok(())
            } else {
                Err(e)
            };
        }
    };
    let watch_selector = options.mode == Mode::Selector;
    let served = serve(
        &services,
        &name,
        &session,
        watch_selector,
        &lock,
        &mut shutdown,
    )
    .await;
    // Callers go back to the original pods first; only then does the
    // tunnel that was serving them close.
    restore_service(cluster, &name).await;
    tunnel.stop().await;
    remove_session(cluster, &objects, &lock).await;
    served
}

/// The user stopped ktb before the exchange was up; not an error.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

async fn lock_service(
    cluster: &Cluster,
    leases: &Api<Lease>,
    name: &str,
    identity: &str,
    session: &str,
    grace: Duration,
) -> anyhow::Result<Lock> {
    let wanted = lock::new_lease(&exchange_lease(name), identity, session, grace);
    match lock::take(leases, wanted.clone()).await? {
        Taken::Fresh(lock) => Ok(lock),
        Taken::Held(holder) => anyhow::bail!(
            "Service {}/{name} is exchanged by {holder}; ask them to stop, or use `ktb mesh` to share it \
             (only requests you mark reach you)",
            cluster.namespace
        ),
        Taken::Stale(stale, holder) => {
            say(format!("taking over the expired lock of {holder}: restoring what that session changed first"));
            service::restore(&cluster.client, &cluster.namespace, name).await?;
            lock::take_over(leases, stale, wanted).await
        }
    }
}

/// What was decided before the lock: the session and how its ports and
/// workload map.
#[derive(Clone, Copy)]
struct Plan<'a> {
    name: &'a str,
    qualified: &'a str,
    session: &'a str,
    routes: &'a [PortRoute],
    workload: Option<&'a Found>,
}

/// Creates the shadow pod, brings the tunnel up and switches the Service;
/// on error, what it created is returned to the caller's teardown through
/// the Lease (which owns everything) and an explicit delete.
async fn exchange_locked(
    cluster: &Cluster,
    options: &ExchangeOptions,
    plan: &Plan<'_>,
    lock: &Lock,
) -> anyhow::Result<RunningTunnel> {
    let Plan {
        name,
        qualified,
        session,
        routes,
        workload,
    } = *plan;
    let ns = cluster.namespace.as_str();
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    // The lock is ours now: a Service still marked by a vanished session
    // whose Lease is gone gets its saved selector back before we save ours.
    if let restored @ Restored::Changed { .. } = service::restore(&cluster.client, ns, name).await?
    {
        say(format!(
            "restored Service {qualified} left behind by an earlier session ({restored})"
        ));
    }
    let original = services.get(name).await?;
    let objects = session_objects(name, session);
    let key = ClientKey::generate()?;
    let public_key = key.public().to_string();
    let lease_name = lock.name();
    let spec = ShadowSpec {
        name: &objects,
        session,
        service: Some(name),
        lease: &lease_name,
        token: &public_key,
        target_ports: routes.iter().map(|r| r.target_port).collect(),
        image: &options.agent_image,
        pull_policy: &options.pull_policy,
        grace: options.grace,
        owner: lock.owner(),
        labels: match workload {
            None => session_labels(session),
            Some(found) => found
                .template_labels
                .clone()
                .into_iter()
                .chain(session_labels(session))
                .collect(),
        },
        scaled: workload.map(|f| (f.replicas.kind, f.replicas.name.clone())),
    };
    say(format!("creating shadow pod {objects}"));
    let shadow = Shadow::create(&cluster.client, ns, &spec).await?;
    let started = async {
        say("waiting for the shadow pod to be ready");
        shadow.wait_ready(options.ready_timeout).await?;
        say(format!(
            "opening the tunnel ({})",
            options.transport.describe()
        ));
        let tunnel_config = TunnelConfig {
            key: Arc::new(key),
            session: SessionConfig::default(),
        };
        let role = tunnel::exchange_role(
            routes
                .iter()
                .map(|r| Expose {
                    local: r.local,
                    remote: Some(r.target_port),
                })
                .collect(),
        );
        let tunnel = match options.transport {
            TransportKind::PortForward => {
                let transport = PortForward {
                    client: cluster.client.clone(),
                    namespace: ns.to_owned(),
                    pod: objects.clone(),
                    port: AGENT_TUNNEL_PORT,
                };
                RunningTunnel::start(transport, tunnel_config.clone(), Arc::clone(&role)).await?
            }
            TransportKind::Direct => {
                let ip = shadow.pod_ip().await?;
                let transport = Direct {
                    addr: std::net::SocketAddr::new(ip, AGENT_TUNNEL_PORT).to_string(),
                };
                RunningTunnel::start(transport, tunnel_config, role).await?
            }
        };
        match workload {
            None => {
                say(format!("pointing Service {qualified} at the shadow pod"));
                service::point_at_shadow(&services, &original, &session_labels(session), session)
                    .await?;
            }
            Some(found) => {
                let r = &found.replicas;
                say(format!(
                    "scaling {:?} {} from {} to 0 replicas",
                    r.kind, r.name, r.replicas
                ));
                service::mark_scaled(&services, &original, r, session).await?;
                workload::scale(&cluster.client, ns, r.kind, &r.name, 0).await?;
            }
        }
        Ok::<_, anyhow::Error>(tunnel)
    };
    match started.await {
        Ok(tunnel) => {
            let ports = routes
                .iter()
                .map(|r| format!("port {} → 127.0.0.1:{}", r.service_port, r.local))
                .collect::<Vec<_>>()
                .join(", ");
            say(format!(
                "✔ Service {qualified} now reaches this machine: {ports}. Ctrl-C restores it"
            ));
            Ok(tunnel)
        }
        Err(e) => {
            shadow.delete().await;
            Err(e)
        }
    }
}

/// Keeps the exchange alive: renews the lock, watches for someone else
/// changing the Service, until shutdown or the lock is lost.
async fn serve(
    services: &Api<Service>,
    name: &str,
    session: &str,
    watch_selector: bool,
    lock: &Lock,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let renew_every = lock.renew_every();
    let mut renew = tokio::time::interval(renew_every);
    let mut warned_drift = !watch_selector;
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(()),
            _ = renew.tick() => {
                lock.renew().await.context("lost the lock on the Service (was the session cleaned up from elsewhere?)")?;
                if !warned_drift {
                    warned_drift = warn_if_drifted(services, name, session).await;
                }
            }
        }
    }
}

/// Someone (a GitOps controller, a colleague) changed the selector while
/// we hold it: say so once, and do not fight it.
async fn warn_if_drifted(services: &Api<Service>, name: &str, session: &str) -> bool {
    let Ok(current) = services.get(name).await else {
        return false;
    };
    let selector = selector_of(&current);
    if selector
        .get(ktb_kube::names::SESSION_LABEL)
        .map(String::as_str)
        == Some(session)
    {
        return false;
    }
    say(format!(
        "warning: Service {name}'s selector was changed by someone else while exchanged (now {}); \
         traffic may no longer reach you. ktb will not fight it; on exit it restores the selector it saved",
        display(&selector)
    ));
    true
}

/// Puts the Service back; on failure says how to retry (the agent will
/// also restore it once the grace period has passed).
async fn restore_service(cluster: &Cluster, name: &str) {
    let qualified = format!("{}/{name}", cluster.namespace);
    match service::restore(&cluster.client, &cluster.namespace, name).await {
        Ok(Restored::AlreadyOriginal) => say(format!("restored Service {qualified} (it was never switched)")),
        Ok(restored) => {
            say(format!("restored Service {qualified} ({restored})"));
            if let Restored::Changed { replicas: Some(r), .. } = restored {
                // Keep the shadow pod serving until the originals are back.
                let ready = workload::wait_ready(&cluster.client, &cluster.namespace, r.kind, &r.name, r.replicas.min(1), WORKLOAD_BACK_TIMEOUT);
                if !ready.await {
                    say(format!("warning: {:?} {} has no ready pod yet after {WORKLOAD_BACK_TIMEOUT:?}", r.kind, r.name));
                }
            }
        }
        Err(e) => say(format!(
            "error: could not restore Service {qualified}: {e:#}\n     run `ktb recover {name}` to retry; the agent will also restore it"
        )),
    }
}

/// Deletes the session's objects, then releases the lock: never the lock
/// first, or another session could start while ours is still in place.
async fn remove_session(cluster: &Cluster, objects: &str, lock: &Lock) {
    Shadow::existing(&cluster.client, &cluster.namespace, objects)
        .delete()
        .await;
    if let Err(e) = lock.release().await {
        say(format!("warning: {e:#}"));
    }
}

/// Says early that nothing listens locally; callers would be reset.
async fn warn_about_closed_local_ports(routes: &[PortRoute]) {
    for route in routes {
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], route.local));
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(local),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            say(format!("warning: nothing listens on {local} yet; callers will be reset until something does"));
        }
    }
}
