//! `ktb recover <svc>`: put an exchanged Service back from any machine.
//!
//! Reads the selector ktb saved on the Service itself, so it needs neither
//! the laptop that exchanged it nor its Lease. Idempotent: a Service without
//! ktb's annotation is reported as already original. Your own sessions are
//! always recovered (after a crash the lock still looks live until the grace
//! period ends); another developer's session whose lock is still renewed is
//! left alone unless forced. The session's Lease is removed, and with it, by
//! garbage collection, every object that session created.

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};

use ktb_kube::names::exchange_lease;
use ktb_kube::service::{self, Restored};

use crate::cluster::Cluster;
use crate::exchange::lock::holder_of;

pub async fn run(cluster: &Cluster, name: &str, force: bool) -> anyhow::Result<()> {
    let qualified = format!("{}/{name}", cluster.namespace);
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let lease_name = exchange_lease(name);
    let lease = leases.get_opt(&lease_name).await?;
    if let Some(lease) = &lease {
        let holder = holder_of(lease);
        let me = cluster.whoami().await?;
        let mine = holder.identity.split('@').next() == Some(me.as_str());
        if !holder.expired && !mine && !force {
            anyhow::bail!(
                "Service {qualified} is exchanged by {holder}, whose lock is still being renewed (their ktb \
                 may be running and restores it on exit); `ktb recover --force {name}` restores it anyway"
            );
        }
    }
    match service::restore(&cluster.client, &cluster.namespace, name).await? {
        Restored::AlreadyOriginal => eprintln!("ktb: Service {qualified} is already original"),
        restored => eprintln!("ktb: restored Service {qualified} ({restored})"),
    }
    if let Some(lease) = lease {
        match leases
            .delete(&lease_name, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        eprintln!(
            "ktb: removed the session of {} and its objects",
            holder_of(&lease)
        );
    }
    Ok(())
}
