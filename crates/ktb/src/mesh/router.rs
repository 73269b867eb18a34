//! The shared router of a meshed Service, seen from a joining or leaving
//! member.
//!
//! The router is held by its own Lease (`ktb-mesh-<svc>`, a session of its
//! own), taken with the session layer's rules: the first member creates it;
//! a live one is joined as it is; an expired one (the router pod died and
//! stopped renewing) is undone and replaced. The member that creates it
//! writes, all owned by that Lease: a Service selecting the original pods
//! with the original's ports (`ktb-origin-<svc>`, where unmarked traffic
//! goes), the router pod, and finally the meshed Service's selector,
//! pointed at the router with the original saved on the Service as
//! exchange does. From then on the router pod renews its Lease and ends
//! itself when no member is left (see the agent's `mesh` module), so a
//! member leaving only has to wait for that.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};

use ktb_kube::lease::{self, Holder, Kind as LeaseKind, Owner};
use ktb_kube::names::{mesh_lease, mesh_origin_service, session_objects};
use ktb_kube::service::{self, selector_of, Restored};
use rand::Rng;

use super::MeshOptions;
use crate::cluster::Cluster;
use crate::report::Reporter;
use crate::session::agent_pod::{session_labels, session_meta, AgentPod, AgentPodSpec, AgentRole};
use crate::session::lock::{self, Lock};
use crate::target::DeclaredPort;

/// How long a leaving member waits for the router to restore the Service
/// once no member is left: the router notices within a second and waits
/// a few more for a joining member.
const RESTORE_WAIT: Duration = Duration::from_secs(20);

/// Makes sure a live router stands in front of the Service.
pub async fn ensure(
    cluster: &Cluster,
    original: &Service,
    declared: &[DeclaredPort],
    owner: &Owner,
    options: &MeshOptions,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let name = original.metadata.name.clone().unwrap_or_default();
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let router_owner = Owner {
        session: format!("{:08x}", rand::rng().random::<u32>()),
        ..owner.clone()
    };
    let wanted = lease::new_lease(
        &mesh_lease(&name),
        LeaseKind::MeshRouter,
        &router_owner,
        options.grace,
    );
    let undo = async |holder: &Holder, silent: Duration| {
        reporter.progress(format!(
            "the Service's router (session {}) has been silent for {}s: replacing it",
            holder.owner.session,
            silent.as_secs()
        ));
        service::restore(
            &cluster.client,
            &cluster.namespace,
            &name,
            &holder.owner.session,
        )
        .await
        .map(drop)
    };
    match lock::take_or_replace(&leases, &wanted, undo).await? {
        Ok(lock) => {
            let objects = session_objects(&name, &router_owner.session);
            reporter.progress(format!("starting the Service's router {objects}"));
            let created = create(
                cluster,
                &name,
                declared,
                &router_owner.session,
                &lock,
                options,
            )
            .await;
            if created.is_err() {
                AgentPod::existing(&cluster.client, &cluster.namespace, &objects)
                    .delete()
                    .await;
                let _ = lock.release().await;
            }
            created
        }
        Err(holder) => {
            reporter.progress(format!(
                "joining the Service's router (started by {holder})"
            ));
            Ok(())
        }
    }
}

/// Creates the origin Service, the router pod, and points the Service at it.
async fn create(
    cluster: &Cluster,
    name: &str,
    declared: &[DeclaredPort],
    session: &str,
    lock: &Lock,
    options: &MeshOptions,
) -> anyhow::Result<()> {
    let services = Api::<Service>::namespaced(cluster.client.clone(), &cluster.namespace);
    // We hold the router's Lease and no exchange holds the Service, so a
    // session still marked on it is a dead one's leftover.
    let mut current = services.get(name).await?;
    if let Some(left_by) = service::session_of(&current).map(str::to_owned) {
        if let Restored::Changed { .. } =
            service::restore(&cluster.client, &cluster.namespace, name, &left_by).await?
        {
            current = services.get(name).await?;
        }
    }
    let origin = create_origin(&services, &current, session, lock).await?;
    let origin_ip: std::net::IpAddr = origin
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .context("the Service selecting the original pods got no ClusterIP")?;
    let routes = routes(&current, declared, origin_ip);
    let pod_name = session_objects(name, session);
    let spec = AgentPodSpec {
        name: &pod_name,
        session,
        role: AgentRole::MeshRouter {
            service: name,
            routes,
        },
        lease: lock.name(),
        tunnel_on_pod_network: false,
        declared_ports: declared.to_vec(),
        settings: &options.agent,
        grace: options.grace,
        owner: lock.owner(),
        labels: session_labels(session),
        scaled: None,
    };
    let router = AgentPod::create(&cluster.client, &cluster.namespace, &spec).await?;
    router.wait_ready(options.agent.ready_timeout).await?;
    service::point_at_shadow(&services, &current, &session_labels(session), session).await?;
    Ok(())
}

/// For every TCP port of the Service: the target port the router listens
/// on, and the origin Service's address for the same Service port.
fn routes(
    service: &Service,
    declared: &[DeclaredPort],
    origin: std::net::IpAddr,
) -> Vec<(u16, SocketAddr)> {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let target = match &p.target_port {
                None => u16::try_from(p.port).ok()?,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok()?,
                Some(IntOrString::String(named)) => {
                    declared
                        .iter()
                        .find(|d| d.name.as_deref() == Some(named))?
                        .number
                }
            };
            Some((target, SocketAddr::new(origin, u16::try_from(p.port).ok()?)))
        })
        .collect()
}

/// The Service selecting the original pods, with the original's ports,
/// owned by the router's Lease. One left over by a router whose Lease is
/// gone (garbage collection not done yet) is replaced.
async fn create_origin(
    services: &Api<Service>,
    original: &Service,
    session: &str,
    lock: &Lock,
) -> anyhow::Result<Service> {
    let name = mesh_origin_service(original.metadata.name.as_deref().unwrap_or_default());
    let ports = original
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let origin = Service {
        metadata: session_meta(&name, session, lock.owner()),
        spec: Some(ServiceSpec {
            selector: Some(selector_of(original)),
            ports: Some(
                ports
                    .into_iter()
                    .map(|p| ServicePort {
                        node_port: None,
                        ..p
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    for _ in 0..2 {
        match services.create(&PostParams::default(), &origin).await {
            Ok(created) => return Ok(created),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let _ = services.delete(&name, &DeleteParams::foreground()).await;
                wait_gone(services, &name).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot create Service {name}")),
        }
    }
    anyhow::bail!("Service {name} exists and could not be replaced; `ktb clean` removes leftovers")
}

async fn wait_gone(services: &Api<Service>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(None) = services.get_opt(name).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After this member left: if nobody else meshes the Service, waits until
/// the router has restored it, and says so; otherwise says who remains.
pub async fn after_leave(cluster: &Cluster, name: &str, reporter: &Reporter) {
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let services = Api::<Service>::namespaced(cluster.client.clone(), &cluster.namespace);
    let qualified = format!("{}/{name}", cluster.namespace);
    let deadline = Instant::now() + RESTORE_WAIT;
    loop {
        let members = ktb_kube::mesh::members(&leases, name)
            .await
            .unwrap_or_default();
        if !members.is_empty() {
            reporter.progress(format!(
                "left the mesh of Service {qualified}; still meshed by {}",
                ktb_kube::mesh::describe(&members)
            ));
            return;
        }
        let router = leases.get_opt(&mesh_lease(name)).await.ok().flatten();
        let marked = services
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| service::session_of(&s).is_some());
        if router.is_none() && !marked {
            reporter.progress(format!(
                "restored Service {qualified}: no one meshes it any more"
            ));
            return;
        }
        if Instant::now() >= deadline {
            reporter.warn(format!(
                "Service {qualified} is still pointed at its router {RESTORE_WAIT:?} after the last member left; \
                 the router restores it on its own, or run `ktb recover {name}`"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
