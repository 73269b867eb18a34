//! `ktb preview`: a process on this machine published as a new Service of
//! the namespace, for colleagues and cluster workloads to call by name
//! before it is ever deployed.
//!
//! The phases, undone in reverse on failure or exit: take the preview's
//! Lease (`ktb-preview-<name>`; a live one is refused with who holds it, an
//! expired one taken over) → refuse a Service of that name that exists →
//! start the agent pod and its tunnel → create the Service, selecting the
//! agent pod, owned by the Lease → prove that callers of the Service reach
//! this machine → serve, renewing the Lease, until Ctrl-C → delete the
//! Service (only the very object created), then the session. If this
//! machine vanishes, the agent deletes the Lease after the grace period and
//! garbage collection removes the Service and the pod: nothing to restore,
//! since nothing existing was changed.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};

use ktb_kube::lease::{self, Holder, Kind as LeaseKind};
use ktb_kube::names::{preview_lease, session_objects};
use ktb_proto::auth::ClientKey;

use crate::cluster::Cluster;
use crate::expose::Expose;
use crate::permissions::Command;
use crate::preflight;
use crate::refusal::Refusal;
use crate::report::Reporter;
use crate::session as sessions;
use crate::session::agent_pod::{
    session_labels, session_meta, AgentPodSpec, AgentRole, AgentSettings,
};
use crate::session::keep_alive::keep_alive;
use crate::session::lock::{self, Lock};
use crate::session::shadow::{Shadow, TransportKind};
use crate::target::PortRoute;
use crate::tunnel::RunningTunnel;

/// Everything `preview` is told.
pub struct PreviewOptions {
    /// The new Service's name.
    pub name: String,
    /// LOCAL[:PORT]: the Service's port (default LOCAL) to a local port.
    pub exposes: Vec<Expose>,
    pub transport: TransportKind,
    pub grace: Duration,
    pub agent: AgentSettings,
}

/// Runs a preview until `shutdown` completes; nothing of it is left
/// whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: PreviewOptions,
    reporter: &Reporter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let ns = cluster.namespace.clone();
    let name = options.name.clone();
    check_name(&name)?;
    let qualified = format!("{ns}/{name}");
    let routes = routes(&options.exposes)?;
    preflight::check(cluster, Command::Preview, &Command::Preview.needs()).await?;
    let services = Api::<Service>::namespaced(cluster.client.clone(), &ns);

    let owner = sessions::owner(cluster).await?;
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    let wanted = lease::new_lease(
        &preview_lease(&name),
        LeaseKind::Preview,
        &owner,
        options.grace,
    );
    let lock = take(&leases, &services, &wanted, &qualified, &name, reporter).await?;
    // After the Lease: a dead preview's Service was removed by the takeover.
    if let Err(e) = refuse_existing(&services, &qualified, &name).await {
        let _ = lock.release().await;
        return Err(e);
    }

    let objects = session_objects(&name, &owner.session);
    let outcome = tokio::select! {
        outcome = publish(cluster, &options, &routes, &owner.session, &lock, reporter) => outcome,
        _ = &mut shutdown => Err(Interrupted.into()),
    };
    let (mut tunnel, published) = match outcome {
        Ok(up) => up,
        Err(e) => {
            reporter.progress("undoing what this session changed");
            delete_ours(&services, &name, &owner.session).await;
            sessions::end(cluster, &objects, &lock, reporter).await;
            return if e.is::<Interrupted>() {
                Ok(())
            } else {
                Err(e)
            };
        }
    };
    let served = keep_alive(&lock, reporter, &mut shutdown).await;
    delete_exactly(&services, &published).await;
    reporter.progress(format!("removed Service {qualified}"));
    tunnel.stop().await;
    sessions::end(cluster, &objects, &lock, reporter).await;
    served.map_err(anyhow::Error::from)
}

/// The user stopped ktb before the preview was up; not an error.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// A Service name is a DNS label (RFC 1035): lower-case letters, digits
/// and '-', starting with a letter, at most 63 characters.
fn check_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    anyhow::ensure!(
        valid,
        "{name:?} is not a valid Service name: lower-case letters, digits and '-', starting with a letter, at most 63 characters"
    );
    Ok(())
}

fn routes(exposes: &[Expose]) -> anyhow::Result<Vec<PortRoute>> {
    let routes: Vec<PortRoute> = exposes
        .iter()
        .map(|e| {
            let port = e.remote.unwrap_or(e.local);
            PortRoute {
                local: e.local,
                service_port: i32::from(port),
                target_port: port,
            }
        })
        .collect();
    let mut ports: Vec<u16> = routes.iter().map(|r| r.target_port).collect();
    ports.sort_unstable();
    ports.dedup();
    anyhow::ensure!(
        ports.len() == routes.len(),
        "two --expose give the Service the same port; give each its own LOCAL:PORT"
    );
    Ok(routes)
}

async fn refuse_existing(
    services: &Api<Service>,
    qualified: &str,
    name: &str,
) -> anyhow::Result<()> {
    if let Some(existing) = services
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read Service {qualified}"))?
    {
        let by = existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ktb_kube::names::SESSION_LABEL))
            .map(|s| format!(" (published by ktb session {s})"))
            .unwrap_or_default();
        return Err(Refusal::Held(format!(
            "Service {qualified} already exists{by}; preview publishes a new Service: choose another name \
             (to send an existing Service's callers here, use `ktb exchange {name}` or `ktb mesh {name}`)"
        ))
        .into());
    }
    Ok(())
}

/// Takes the preview's Lease; an expired holder's Service is deleted
/// first (only if that session published it).
async fn take(
    leases: &Api<Lease>,
    services: &Api<Service>,
    wanted: &Lease,
    qualified: &str,
    name: &str,
    reporter: &Reporter,
) -> anyhow::Result<Lock> {
    let undo = async |holder: &Holder, silent: Duration| {
        reporter.progress(format!(
            "taking over the preview of {holder}, silent for {}s: removing its Service first",
            silent.as_secs()
        ));
        delete_ours(services, name, &holder.owner.session).await;
        Ok(())
    };
    match lock::take_or_replace(leases, wanted, undo).await? {
        Ok(lock) => Ok(lock),
        Err(holder) => Err(Refusal::Held(format!(
            "Service {qualified} is previewed by {holder}; choose another name, or ask them to stop"
        ))
        .into()),
    }
}

/// Starts the agent and its tunnel, creates the Service and proves it.
async fn publish(
    cluster: &Cluster,
    options: &PreviewOptions,
    routes: &[PortRoute],
    session: &str,
    lock: &Lock,
    reporter: &Reporter,
) -> anyhow::Result<(RunningTunnel, Service)> {
    let ns = cluster.namespace.as_str();
    let name = options.name.as_str();
    let qualified = format!("{ns}/{name}");
    let objects = session_objects(name, session);
    let key = ClientKey::generate()?;
    let spec = AgentPodSpec {
        name: &objects,
        session,
        role: AgentRole::Shadow {
            service: name,
            listen_ports: routes.iter().map(|r| r.target_port).collect(),
            key: key.public().to_string(),
        },
        lease: lock.name(),
        tunnel_on_pod_network: options.transport.dials_pod_ip(),
        declared_ports: Vec::new(),
        settings: &options.agent,
        grace: options.grace,
        owner: lock.owner(),
        labels: session_labels(session),
        scaled: None,
    };
    let shadow = Shadow::start(cluster, &spec, options.transport, reporter).await?;
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    let started = async {
        let tunnel = shadow.open_tunnel(routes, key, reporter).await?;
        reporter.progress(format!("creating Service {qualified}"));
        let published = services
            .create(
                &PostParams::default(),
                &service(name, session, routes, lock),
            )
            .await
            .with_context(|| format!("cannot create Service {qualified}"))?;
        reporter.progress("checking that callers of the Service arrive here");
        shadow.prove(&qualified, routes, None).await?;
        Ok::<_, anyhow::Error>((tunnel, published))
    };
    match started.await {
        Ok(up) => {
            let ports = routes
                .iter()
                .map(|r| format!("port {} → 127.0.0.1:{}", r.service_port, r.local))
                .collect::<Vec<_>>()
                .join(", ");
            reporter.progress(format!(
                "✔ Service {qualified} ({name}.{ns}.svc) now reaches this machine: {ports}. Ctrl-C removes it"
            ));
            Ok(up)
        }
        Err(e) => {
            shadow.pod.delete().await;
            Err(e)
        }
    }
}

/// The published Service: selects this session's agent pod, owned by the
/// session's Lease so it goes with it.
fn service(name: &str, session: &str, routes: &[PortRoute], lock: &Lock) -> Service {
    let named = routes.len() > 1;
    Service {
        metadata: session_meta(name, session, lock.owner()),
        spec: Some(ServiceSpec {
            selector: Some(session_labels(session)),
            ports: Some(
                routes
                    .iter()
                    .map(|r| ServicePort {
                        name: named.then(|| format!("port-{}", r.service_port)),
                        port: r.service_port,
                        target_port: Some(IntOrString::Int(i32::from(r.target_port))),
                        protocol: Some("TCP".into()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Deletes exactly the Service this session created (its UID).
async fn delete_exactly(services: &Api<Service>, published: &Service) {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: published.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let name = published.metadata.name.clone().unwrap_or_default();
    if let Err(e) = services.delete(&name, &params).await {
        tracing::debug!(error = %e, "the preview's Service was already gone or replaced");
    }
}

/// Deletes the Service `name` if `session` published it.
async fn delete_ours(services: &Api<Service>, name: &str, session: &str) {
    if let Ok(Some(existing)) = services.get_opt(name).await {
        let ours = existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ktb_kube::names::SESSION_LABEL))
            .is_some_and(|s| s == session);
        if ours {
            delete_exactly(services, &existing).await;
        }
    }
}
