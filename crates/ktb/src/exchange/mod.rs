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
//! after the grace period. The Lease, the agent pod, renewals and the end
//! of the session are the [`crate::session`] layer's; this module keeps
//! only what is exchange's own: the Service, its ports and its workload.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;

use ktb_kube::lease::{self, Holder, Kind as LeaseKind, Owner};
use ktb_kube::names::{exchange_lease, mesh_lease, session_objects};
use ktb_kube::selector::display;
use ktb_kube::service::{self, selector_of, Restored};
use ktb_kube::workload::{self, Found};
use ktb_proto::auth::ClientKey;

use crate::cluster::Cluster;
use crate::expose::ExposeArg;
use crate::permissions::{self, Command};
use crate::preflight;
use crate::refusal::Refusal;
use crate::report::Reporter;
use crate::session as sessions;
use crate::session::agent_pod::{session_labels, AgentPodSpec, AgentRole, AgentSettings};
use crate::session::keep_alive::keep_alive;
use crate::session::lock::{self, Lock};
use crate::session::shadow::Shadow;
pub use crate::session::shadow::TransportKind;
use crate::target::{self, DeclaredPort, PortRoute};
use crate::tunnel::RunningTunnel;

/// Everything `exchange` is told.
pub struct ExchangeOptions {
    pub service: String,
    pub mode: Mode,
    pub transport: TransportKind,
    pub exposes: Vec<ExposeArg>,
    pub grace: Duration,
    pub agent: AgentSettings,
}

/// How the Service's traffic is moved to the shadow pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Runs an exchange until `shutdown` completes; the cluster is left as it
/// was found whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: ExchangeOptions,
    reporter: &Reporter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let ns = cluster.namespace.clone();
    let services = Api::<Service>::namespaced(cluster.client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), &ns);
    let name = target::service_name(&options.service);
    let qualified = format!("{ns}/{name}");

    let original = target::exchangeable_service(&services, &name, &ns).await?;
    let routes = target::resolve_ports(&pods, &original, &options.exposes).await?;
    let declared = target::declared_ports(&pods, &original).await;
    let workload = match options.mode {
        Mode::Selector => None,
        Mode::Scale => {
            Some(workload::behind_service(&cluster.client, &ns, &selector_of(&original)).await?)
        }
    };
    let (command, needs) = match &workload {
        None => (Command::Exchange, permissions::exchange(None)),
        Some(found) => (
            Command::ExchangeScale,
            permissions::exchange(Some(found.replicas.kind)),
        ),
    };
    preflight::check(cluster, command, &needs).await?;
    warn_about_closed_local_ports(&routes, reporter).await;

    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    refuse_if_meshed(&leases, &name, &qualified).await?;
    let owner = sessions::owner(cluster).await?;
    let lock = lock_service(cluster, &leases, &name, &owner, options.grace, reporter).await?;

    let objects = session_objects(&name, &owner.session);
    let plan = Plan {
        name: &name,
        qualified: &qualified,
        session: &owner.session,
        routes: &routes,
        declared: &declared,
        workload: workload.as_ref(),
    };
    let outcome = tokio::select! {
        outcome = exchange_locked(cluster, &options, &plan, &lock, reporter) => outcome,
        _ = &mut shutdown => Err(Interrupted.into()),
    };
    let mut exchanged = match outcome {
        Ok(exchanged) => exchanged,
        Err(e) => {
            reporter.progress("undoing what this session changed");
            restore_service(cluster, &name, &owner.session, reporter).await;
            sessions::end(cluster, &objects, &lock, reporter).await;
            return if e.is::<Interrupted>() {
                Ok(())
            } else {
                Err(e)
            };
        }
    };
    let watch_drift = options.mode == Mode::Selector;
    let served = tokio::select! {
        served = keep_alive(&lock, reporter, &mut shutdown) => served.map_err(anyhow::Error::from),
        never = warn_once_if_drifted(&services, &name, &owner.session, watch_drift, lock.renew_every(), reporter) => match never {},
    };
    // Callers go back to the original pods first; only then does the
    // tunnel that was serving them close.
    hand_back(cluster, &exchanged.shadow, &plan, reporter).await;
    exchanged.tunnel.stop().await;
    sessions::end(cluster, &objects, &lock, reporter).await;
    served
}

/// The user stopped ktb before the exchange was up; not an error.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// Takes the Service's Lease: refused with who holds it while that session
/// lives; taken over, after undoing that session's change, once the
/// apiserver has not seen it renewed for its duration.
async fn lock_service(
    cluster: &Cluster,
    leases: &Api<Lease>,
    name: &str,
    owner: &Owner,
    grace: Duration,
    reporter: &Reporter,
) -> anyhow::Result<Lock> {
    let wanted = lease::new_lease(&exchange_lease(name), LeaseKind::Exchange, owner, grace);
    let undo = async |holder: &Holder, silent: Duration| {
        reporter.progress(format!(
            "taking over the lock of {holder}, silent for {}s: restoring what that session changed first",
            silent.as_secs()
        ));
        service::restore(
            &cluster.client,
            &cluster.namespace,
            name,
            &holder.owner.session,
        )
        .await
        .map(drop)
    };
    match lock::take_or_replace(leases, &wanted, undo).await? {
        Ok(lock) => Ok(lock),
        Err(holder) => Err(Refusal::Held(format!(
            "Service {}/{name} is exchanged by {holder}; ask them to stop, or use `ktb mesh` to share it \
             (only requests you mark reach you)",
            cluster.namespace
        ))
        .into()),
    }
}

/// A Service that developers mesh is shared: taking all of it would take
/// their marked traffic too.
async fn refuse_if_meshed(leases: &Api<Lease>, name: &str, qualified: &str) -> anyhow::Result<()> {
    let members = ktb_kube::mesh::members(leases, name).await?;
    let router = leases.get_opt(&mesh_lease(name)).await?;
    if members.is_empty() && router.is_none() {
        return Ok(());
    }
    let who = if members.is_empty() {
        "a router whose last member just left (it restores the Service within seconds; try again)"
            .to_owned()
    } else {
        ktb_kube::mesh::describe(&members)
    };
    Err(Refusal::Held(format!(
        "Service {qualified} is meshed by {who}; join them with `ktb mesh {name}` (only requests you mark reach you), \
         or ask them to leave"
    ))
    .into())
}

/// What was decided before the lock: the session and how its ports and
/// workload map.
#[derive(Clone, Copy)]
struct Plan<'a> {
    name: &'a str,
    qualified: &'a str,
    session: &'a str,
    routes: &'a [PortRoute],
    declared: &'a [DeclaredPort],
    workload: Option<&'a Found>,
}

/// A switched Service's shadow pod and the tunnel behind it.
struct Exchanged {
    shadow: Shadow,
    tunnel: RunningTunnel,
}

/// Creates the shadow pod, brings the tunnel up and switches the Service;
/// on error, what it created is returned to the caller's teardown through
/// the Lease (which owns everything) and an explicit delete.
async fn exchange_locked(
    cluster: &Cluster,
    options: &ExchangeOptions,
    plan: &Plan<'_>,
    lock: &Lock,
    reporter: &Reporter,
) -> anyhow::Result<Exchanged> {
    let ns = cluster.namespace.as_str();
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    restore_leftover(cluster, plan, reporter).await?;
    let original = services.get(plan.name).await?;
    let objects = session_objects(plan.name, plan.session);
    let key = ClientKey::generate()?;
    let spec = shadow_spec(options, plan, lock, &objects, &key);
    let shadow = Shadow::start(cluster, &spec, options.transport, reporter).await?;
    let started = async {
        let tunnel = shadow.open_tunnel(plan.routes, key, reporter).await?;
        switch_service(cluster, &services, &original, plan, reporter).await?;
        reporter.progress("checking that callers of the Service arrive at the shadow pod");
        shadow.prove(plan.qualified, plan.routes, None).await?;
        Ok::<_, anyhow::Error>(tunnel)
    };
    match started.await {
        Ok(tunnel) => {
            let ports = plan
                .routes
                .iter()
                .map(|r| format!("port {} → 127.0.0.1:{}", r.service_port, r.local))
                .collect::<Vec<_>>()
                .join(", ");
            reporter.progress(format!(
                "✔ Service {} now reaches this machine: {ports}. Ctrl-C restores it",
                plan.qualified
            ));
            Ok(Exchanged { shadow, tunnel })
        }
        Err(e) => {
            shadow.pod.delete().await;
            Err(e)
        }
    }
}

/// The lock is ours now, so any session still marked on the Service has
/// lost its Lease: its saved selector comes back before we save ours.
async fn restore_leftover(
    cluster: &Cluster,
    plan: &Plan<'_>,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let services = Api::<Service>::namespaced(cluster.client.clone(), &cluster.namespace);
    let current = services.get(plan.name).await?;
    let Some(left_by) = service::session_of(&current).map(str::to_owned) else {
        return Ok(());
    };
    let restored =
        service::restore(&cluster.client, &cluster.namespace, plan.name, &left_by).await?;
    if let Restored::Changed { .. } = restored {
        reporter.progress(format!(
            "restored Service {} left behind by session {left_by} ({restored})",
            plan.qualified
        ));
    }
    Ok(())
}

fn shadow_spec<'a>(
    options: &'a ExchangeOptions,
    plan: &Plan<'a>,
    lock: &'a Lock,
    objects: &'a str,
    key: &ClientKey,
) -> AgentPodSpec<'a> {
    let session_labels = session_labels(plan.session);
    AgentPodSpec {
        name: objects,
        session: plan.session,
        role: AgentRole::Shadow {
            service: plan.name,
            listen_ports: plan.routes.iter().map(|r| r.target_port).collect(),
            key: key.public().to_string(),
        },
        lease: lock.name(),
        tunnel_on_pod_network: options.transport.dials_pod_ip(),
        declared_ports: plan.declared.to_vec(),
        settings: &options.agent,
        grace: options.grace,
        owner: lock.owner(),
        labels: match plan.workload {
            None => session_labels,
            Some(found) => found
                .template_labels
                .clone()
                .into_iter()
                .chain(session_labels)
                .collect(),
        },
        scaled: plan
            .workload
            .map(|f| (f.replicas.kind, f.replicas.name.clone())),
    }
}

/// Moves the Service's callers to the shadow pod: its selector (selector
/// mode) or its workload's replicas (scale mode), saved on the Service first.
async fn switch_service(
    cluster: &Cluster,
    services: &Api<Service>,
    original: &Service,
    plan: &Plan<'_>,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    match plan.workload {
        None => {
            reporter.progress(format!(
                "pointing Service {} at the shadow pod",
                plan.qualified
            ));
            let shadow = session_labels(plan.session);
            service::point_at_shadow(services, original, &shadow, plan.session).await?;
        }
        Some(found) => {
            let r = &found.replicas;
            reporter.progress(format!(
                "scaling {:?} {} from {} to 0 replicas",
                r.kind, r.name, r.replicas
            ));
            service::mark_scaled(services, original, r, plan.session).await?;
            workload::scale(&cluster.client, &cluster.namespace, r.kind, &r.name, 0).await?;
        }
    }
    Ok(())
}

/// Someone (a GitOps controller, a colleague) changed the selector while
/// we hold it: say so once, and do not fight it. Never returns.
async fn warn_once_if_drifted(
    services: &Api<Service>,
    name: &str,
    session: &str,
    watch: bool,
    every: Duration,
    reporter: &Reporter,
) -> std::convert::Infallible {
    if watch {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Ok(Ok(current)) = tokio::time::timeout(every, services.get(name)).await else {
                continue;
            };
            // Another session's mark means our Lease was taken over: the
            // renewals say so, with who and since when.
            if service::session_of(&current).is_some_and(|s| s != session) {
                continue;
            }
            let selector = selector_of(&current);
            if selector
                .get(ktb_kube::names::SESSION_LABEL)
                .map(String::as_str)
                != Some(session)
            {
                reporter.warn(format!(
                    "Service {name}'s selector was changed by someone else while exchanged (now {}); \
                     traffic may no longer reach you. ktb will not fight it; on exit it restores the selector it saved",
                    display(&selector)
                ));
                break;
            }
        }
    }
    std::future::pending().await
}

/// Puts the Service back, then keeps the shadow serving until callers are
/// proven to reach the workload's pods again: a shadow that went away
/// while kube-proxy still sent callers to it would turn their calls into
/// timeouts. The shadow pod is deleted gracefully first, so its endpoint
/// stops counting as ready at once (in scale mode nothing else deselects
/// it) while the agent still serves.
async fn hand_back(cluster: &Cluster, shadow: &Shadow, plan: &Plan<'_>, reporter: &Reporter) {
    let Some(restored) = restore_service(cluster, plan.name, plan.session, reporter).await else {
        return;
    };
    if let Err(e) = shadow.pod.retire().await {
        reporter.warn(format!("{e:#}"));
    }
    if let Restored::Changed {
        replicas: Some(r), ..
    } = restored
    {
        let ready = workload::wait_ready(
            &cluster.client,
            &cluster.namespace,
            r.kind,
            &r.name,
            r.replicas.min(1),
            WORKLOAD_BACK_TIMEOUT,
        );
        if !ready.await {
            reporter.warn(format!(
                "{:?} {} has no ready pod yet after {WORKLOAD_BACK_TIMEOUT:?}",
                r.kind, r.name
            ));
        }
    }
    reporter.progress("waiting until callers reach the workload's pods again");
    if let Err(e) = shadow
        .prove_handed_back(plan.qualified, plan.routes, None)
        .await
    {
        reporter.warn(format!("{e:#}; closing the tunnel anyway"));
    }
}

/// Puts the Service back if this session still holds it; on failure says
/// how to retry (the agent will also restore it once the grace period has
/// passed). Returns what was undone, when this session had changed it.
async fn restore_service(
    cluster: &Cluster,
    name: &str,
    session: &str,
    reporter: &Reporter,
) -> Option<Restored> {
    let qualified = format!("{}/{name}", cluster.namespace);
    match service::restore(&cluster.client, &cluster.namespace, name, session).await {
        Ok(Restored::AlreadyOriginal) => reporter.progress(format!("restored Service {qualified} (it was never switched)")),
        Ok(restored @ Restored::NotOurs { .. }) => reporter.progress(format!("Service {qualified}: {restored}")),
        Ok(restored) => {
            reporter.progress(format!("restored Service {qualified} ({restored})"));
            return Some(restored);
        }
        Err(e) => reporter.warn(format!(
            "could not restore Service {qualified}: {e:#}\n     run `ktb recover {name}` to retry; the agent will also restore it"
        )),
    }
    None
}

/// Says early that nothing listens locally; callers would be reset.
async fn warn_about_closed_local_ports(routes: &[PortRoute], reporter: &Reporter) {
    for route in routes {
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], route.local));
        let probe = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(local),
        )
        .await;
        if !matches!(probe, Ok(Ok(_))) {
            reporter.warn(format!(
                "nothing listens on {local} yet; callers will be reset until something does"
            ));
        }
    }
}
