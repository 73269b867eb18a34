//! `ktb clean`: repair what vanished sessions left in a namespace, and
//! never touch a live one.
//!
//! A session is live while the apiserver sees its Lease written to within
//! the Lease's duration, judged by the apiserver's clock alone (see
//! [`ktb_kube::lease`]): a colleague's laptop clock, ahead or behind, changes
//! nothing. Everything else ktb finds is a leftover: a Lease nobody renews
//! (its laptop is gone and its agent did not get to restore), a Service
//! still marked by a session without a live Lease, objects labelled with a
//! session that has no Lease. Every repair is conditional on what was
//! judged: a Service is restored only while it still names the vanished
//! session, a Lease is deleted only while unchanged since it was judged
//! expired, and pods are listed before Leases, so a session that starts
//! while `clean` runs is never mistaken for an orphan.

use std::collections::BTreeSet;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};

use ktb_kube::lease::{self, Liveness};
use ktb_kube::names::SESSION_LABEL;
use ktb_kube::service::{self, Restored};

use crate::cluster::{list_managed, Cluster};
use crate::report::Reporter;
use crate::session::agent_pod::AgentPod;

/// `ktb clean --local`: undoes what a `ktb connect` that did not exit
/// cleanly changed on this machine, from its journal.
pub fn local(state_dir: &std::path::Path, reporter: &Reporter) -> anyhow::Result<()> {
    let path = crate::connect::journal::journal_path(state_dir);
    let Some(journal) = crate::connect::journal::Journal::load(&path)? else {
        reporter.progress(format!(
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
    reporter.progress(format!(
        "undid {count} local changes of an earlier `ktb connect` ({})",
        path.display()
    ));
    Ok(())
}

pub async fn run(cluster: &Cluster, dry_run: bool, reporter: &Reporter) -> anyhow::Result<()> {
    let ns = &cluster.namespace;
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), ns);
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), ns);

    // Pods before Leases: a pod seen here had its Lease created before it.
    let agent_pods = list_managed(&pods).await?;
    let all_leases = list_managed(&leases).await?;
    let server_now = lease::server_now(&leases).await?;
    let mut live = BTreeSet::new();
    let mut expired = Vec::new();
    for lease in all_leases.iter() {
        let Some(session) = lease::session_of(lease) else {
            continue;
        };
        match lease::liveness(lease, server_now) {
            Liveness::Live => {
                reporter.progress(format!(
                    "leaving alone the live session of {}",
                    lease::holder(lease)
                ));
                live.insert(session.to_owned());
            }
            Liveness::Expired { silent } => expired.push((lease, silent)),
        }
    }
    let with_lease: BTreeSet<&str> = all_leases.iter().filter_map(lease::session_of).collect();

    let mut cleaned = 0;
    for svc in services.list(&ListParams::default()).await?.items {
        let Some(session) = service::session_of(&svc).map(str::to_owned) else {
            continue;
        };
        if live.contains(&session) {
            continue;
        }
        let name = svc.metadata.name.clone().unwrap_or_default();
        cleaned += 1;
        if dry_run {
            reporter.progress(format!(
                "would restore Service {ns}/{name} (left by session {session})"
            ));
            continue;
        }
        match service::restore(&cluster.client, ns, &name, &session).await? {
            Restored::NotOurs { session: now } => reporter.progress(format!(
                "left Service {ns}/{name} alone: session {now} took it meanwhile"
            )),
            restored => reporter.progress(format!(
                "restored Service {ns}/{name} ({restored}), left by session {session}"
            )),
        }
    }

    for (lease, silent) in expired {
        let holder = lease::holder(lease);
        let name = lease.metadata.name.clone().unwrap_or_default();
        let silent = silent.as_secs();
        cleaned += 1;
        if dry_run {
            reporter.progress(format!(
                "would remove the expired session of {holder} (Lease {name}, silent for {silent}s)"
            ));
        } else if lease::delete_if_unchanged(&leases, lease).await? {
            reporter.progress(format!(
                "removed the expired session of {holder} (Lease {name}, silent for {silent}s) and its objects"
            ));
        } else {
            reporter.progress(format!(
                "left Lease {name} alone: it was renewed or replaced while clean looked at it"
            ));
        }
    }

    // Objects whose session has no Lease at all (garbage collection would
    // get them too, eventually; this makes it now).
    for pod in agent_pods {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let Some(session) = labels.get(SESSION_LABEL) else {
            continue;
        };
        if with_lease.contains(session.as_str()) {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        cleaned += 1;
        if dry_run {
            reporter.progress(format!(
                "would delete the orphaned objects of session {session} ({name})"
            ));
        } else {
            AgentPod::existing(&cluster.client, ns, &name)
                .delete()
                .await;
            reporter.progress(format!(
                "deleted the orphaned objects of session {session} ({name})"
            ));
        }
    }
    if cleaned == 0 {
        reporter.progress(format!("nothing to clean in namespace {ns}"));
    }
    Ok(())
}
