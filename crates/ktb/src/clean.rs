//! `ktb clean`: repair what vanished sessions left in a namespace, and
//! never touch a live one.
//!
//! A session is live while its Lease is renewed. Everything else ktb finds
//! is a leftover: a Lease nobody renews (its laptop is gone and its agent
//! did not get to restore), a Service still pointing at a session without a
//! Lease, objects labelled with a session that has no Lease. Services are
//! restored first, then the leftovers deleted.

use std::collections::BTreeSet;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams};

use ktb_kube::names::{MANAGED_LABEL, MANAGED_VALUE, SESSION, SESSION_LABEL};
use ktb_kube::service;

use crate::cluster::Cluster;
use crate::exchange::lock::holder_of;
use crate::exchange::shadow::Shadow;

fn say(message: impl std::fmt::Display) {
    eprintln!("ktb: {message}");
}

/// `ktb clean --local`: undoes what a `ktb connect` that did not exit
/// cleanly changed on this machine, from its journal.
pub fn local(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let path = crate::connect::journal::journal_path(state_dir);
    let Some(journal) = crate::connect::journal::Journal::load(&path)? else {
        say(format!(
            "nothing to clean on this machine (no journal at {})",
            path.display()
        ));
        return Ok(());
    };
    if let Some(pid) = journal.live_owner() {
        anyhow::bail!("`ktb connect` (pid {pid}) still runs and will undo its changes itself: stop it with Ctrl-C");
    }
    let count = journal.changes().len();
    journal.undo()?;
    say(format!(
        "undid {count} local changes of an earlier `ktb connect` ({})",
        path.display()
    ));
    Ok(())
}

pub async fn run(cluster: &Cluster, dry_run: bool) -> anyhow::Result<()> {
    let ns = &cluster.namespace;
    let managed = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}"));
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), ns);
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);

    let mut live = BTreeSet::new();
    let mut expired = Vec::new();
    for lease in leases.list(&managed).await?.items {
        let holder = holder_of(&lease);
        let Some(session) = holder.session.clone() else {
            continue;
        };
        if holder.expired {
            expired.push((lease, holder));
        } else {
            say(format!(
                "leaving alone the live session {session} of {holder}"
            ));
            live.insert(session);
        }
    }

    let mut cleaned = 0;
    for service in services.list(&ListParams::default()).await?.items {
        let annotations = service.metadata.annotations.clone().unwrap_or_default();
        let Some(session) = annotations.get(SESSION) else {
            continue;
        };
        if live.contains(session) {
            continue;
        }
        let name = service.metadata.name.clone().unwrap_or_default();
        cleaned += 1;
        if dry_run {
            say(format!(
                "would restore Service {ns}/{name} (left by session {session})"
            ));
        } else {
            let restored = service::restore(&cluster.client, ns, &name).await?;
            say(format!(
                "restored Service {ns}/{name} ({restored}), left by session {session}"
            ));
        }
    }

    for (lease, holder) in expired {
        let name = lease.metadata.name.clone().unwrap_or_default();
        cleaned += 1;
        if dry_run {
            say(format!(
                "would remove the expired session of {holder} (Lease {name})"
            ));
            continue;
        }
        leases.delete(&name, &DeleteParams::background()).await?;
        say(format!(
            "removed the expired session of {holder} (Lease {name}) and its objects"
        ));
    }

    // Objects whose session has no Lease at all (garbage collection would
    // get them too, eventually; this makes it now).
    let sessions = leases
        .list(&managed)
        .await?
        .items
        .iter()
        .filter_map(|l| l.metadata.labels.as_ref()?.get(SESSION_LABEL).cloned())
        .collect::<BTreeSet<_>>();
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client.clone(), ns);
    for pod in pods.list(&managed).await?.items {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let Some(session) = labels.get(SESSION_LABEL) else {
            continue;
        };
        if sessions.contains(session) || live.contains(session) {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        cleaned += 1;
        if dry_run {
            say(format!(
                "would delete the orphaned objects of session {session} ({name})"
            ));
        } else {
            Shadow::existing(&cluster.client, ns, &name).delete().await;
            say(format!(
                "deleted the orphaned objects of session {session} ({name})"
            ));
        }
    }
    if cleaned == 0 {
        say(format!("nothing to clean in namespace {ns}"));
    }
    Ok(())
}
