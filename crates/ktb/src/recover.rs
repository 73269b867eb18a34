//! `ktb recover <svc>`: put an exchanged or meshed Service back from any
//! machine.
//!
//! Reads the selector ktb saved on the Service itself, so it needs neither
//! the laptop that exchanged it nor its Lease. Idempotent: a Service without
//! ktb's annotation is reported as already original. Your own sessions are
//! always recovered (after a crash the Lease still looks live until its
//! duration has passed); another developer's session whose Lease the
//! apiserver still sees renewed is left alone unless forced. Every write
//! names the session it undoes, so a session that starts meanwhile is
//! never touched. The session's Lease is removed, and with it, by garbage
//! collection, every object that session created. For a meshed Service
//! the session is its shared router's: a live router is named with its
//! members and left alone unless forced.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;

use ktb_kube::lease::{self, Liveness, Released};
use ktb_kube::names::{exchange_lease, mesh_lease};
use ktb_kube::service::{self, Restored};

use crate::cluster::Cluster;
use crate::refusal::Refusal;
use crate::report::Reporter;

pub async fn run(
    cluster: &Cluster,
    name: &str,
    force: bool,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let qualified = format!("{}/{name}", cluster.namespace);
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let services = Api::<Service>::namespaced(cluster.client.clone(), &cluster.namespace);
    let lease = match leases.get_opt(&exchange_lease(name)).await? {
        Some(lease) => Some(lease),
        None => leases.get_opt(&mesh_lease(name)).await?,
    };
    if let Some(lease) = &lease {
        let holder = lease::holder(lease);
        let mine = holder.owner.user == cluster.whoami().await?;
        let live = lease::liveness(lease, lease::server_now(&leases).await?) == Liveness::Live;
        let meshed = lease.metadata.name.as_deref() == Some(mesh_lease(name).as_str());
        if live && meshed && !force {
            let members = ktb_kube::mesh::members(&leases, name).await?;
            return Err(Refusal::Held(format!(
                "Service {qualified} is meshed through a live router (members: {}); it restores the Service \
                 when the last member leaves; `ktb recover --force {name}` restores it anyway",
                if members.is_empty() { "none left, it is ending".to_owned() } else { ktb_kube::mesh::describe(&members) }
            ))
            .into());
        }
        if live && !mine && !force {
            return Err(Refusal::Held(format!(
                "Service {qualified} is exchanged by {holder}, whose Lease is still being renewed (their ktb \
                 may be running and restores it on exit); `ktb recover --force {name}` restores it anyway"
            ))
            .into());
        }
    }
    let Some(current) = services.get_opt(name).await? else {
        anyhow::bail!("Service {qualified} not found (is the namespace right?)");
    };
    match service::session_of(&current) {
        None => reporter.progress(format!("Service {qualified} is already original")),
        Some(session) => {
            match service::restore(&cluster.client, &cluster.namespace, name, session).await? {
                Restored::AlreadyOriginal => {
                    reporter.progress(format!("Service {qualified} is already original"))
                }
                restored => reporter.progress(format!("restored Service {qualified} ({restored})")),
            }
        }
    }
    if let Some(lease) = lease {
        let holder = lease::holder(&lease);
        match lease::release(&leases, &lease).await? {
            Released::Deleted => {
                reporter.progress(format!("removed the session of {holder} and its objects"))
            }
            Released::Gone => {}
            Released::NotOurs(now) => {
                reporter.progress(format!("left the Lease alone: it belongs to {now} now"))
            }
        }
    }
    Ok(())
}
