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
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};

use ktb_kube::lease::{self, Holder, Liveness};
use ktb_kube::names::SESSION_LABEL;
use ktb_kube::service::{self, Restored};

use crate::cluster::{api_error, list_managed, Cluster};
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

/// What vanished sessions left in a namespace, judged by the apiserver's
/// clock; what `clean` repairs and `ktb doctor` reports.
pub struct Survey {
    /// Sessions whose Lease is renewed: never touched.
    pub live: Vec<Holder>,
    /// Leases nobody renewed for their duration, and for how long they
    /// have been silent.
    pub expired: Vec<(Lease, Duration)>,
    /// Services still marked by a session without a live Lease: the
    /// Service's name and that session.
    pub marked: Vec<(String, String)>,
    /// Agent pods of a session that has no Lease at all: the pod's name
    /// and its session.
    pub orphans: Vec<(String, String)>,
}

impl Survey {
    /// Whether there is anything to repair.
    pub fn is_clean(&self) -> bool {
        self.expired.is_empty() && self.marked.is_empty() && self.orphans.is_empty()
    }
}

/// Looks at what ktb labelled in the cluster's namespace, changing nothing.
pub async fn survey(cluster: &Cluster) -> anyhow::Result<Survey> {
    let ns = &cluster.namespace;
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), ns);
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), ns);

    // Pods before Leases: a pod seen here had its Lease created before it.
    let agent_pods = list_managed(&pods).await?;
    let all_leases = list_managed(&leases).await?;
    let server_now = lease::server_now(&leases).await?;
    let mut live = Vec::new();
    let mut live_sessions = BTreeSet::new();
    let mut expired = Vec::new();
    for lease in all_leases.iter() {
        let Some(session) = lease::session_of(lease) else {
            continue;
        };
        match lease::liveness(lease, server_now) {
            Liveness::Live => {
                live.push(lease::holder(lease));
                live_sessions.insert(session.to_owned());
            }
            Liveness::Expired { silent } => expired.push((lease.clone(), silent)),
        }
    }
    let with_lease: BTreeSet<&str> = all_leases.iter().filter_map(lease::session_of).collect();
    let marked = services
        .list(&ListParams::default())
        .await
        .map_err(api_error)
        .with_context(|| format!("cannot list the Services of namespace {ns}"))?
        .items
        .iter()
        .filter_map(|svc| {
            let session = service::session_of(svc)?;
            (!live_sessions.contains(session)).then(|| {
                (
                    svc.metadata.name.clone().unwrap_or_default(),
                    session.to_owned(),
                )
            })
        })
        .collect();
    // Objects whose session has no Lease at all (garbage collection would
    // get them too, eventually).
    let orphans = agent_pods
        .iter()
        .filter_map(|pod| {
            let session = pod.metadata.labels.as_ref()?.get(SESSION_LABEL)?;
            (!with_lease.contains(session.as_str())).then(|| {
                (
                    pod.metadata.name.clone().unwrap_or_default(),
                    session.clone(),
                )
            })
        })
        .collect();
    Ok(Survey {
        live,
        expired,
        marked,
        orphans,
    })
}

pub async fn run(cluster: &Cluster, dry_run: bool, reporter: &Reporter) -> anyhow::Result<()> {
    let ns = &cluster.namespace;
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), ns);
    let survey = survey(cluster).await?;
    for holder in &survey.live {
        reporter.progress(format!("leaving alone the live session of {holder}"));
    }
    for (name, session) in &survey.marked {
        if dry_run {
            reporter.progress(format!(
                "would restore Service {ns}/{name} (left by session {session})"
            ));
            continue;
        }
        match service::restore(&cluster.client, ns, name, session).await? {
            Restored::NotOurs { session: now } => reporter.progress(format!(
                "left Service {ns}/{name} alone: session {now} took it meanwhile"
            )),
            restored => reporter.progress(format!(
                "restored Service {ns}/{name} ({restored}), left by session {session}"
            )),
        }
    }
    for (lease, silent) in &survey.expired {
        let holder = lease::holder(lease);
        let name = lease.metadata.name.clone().unwrap_or_default();
        let silent = silent.as_secs();
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
    for (name, session) in &survey.orphans {
        if dry_run {
            reporter.progress(format!(
                "would delete the orphaned objects of session {session} ({name})"
            ));
        } else {
            AgentPod::existing(&cluster.client, ns, name).delete().await;
            reporter.progress(format!(
                "deleted the orphaned objects of session {session} ({name})"
            ));
        }
    }
    if survey.is_clean() {
        reporter.progress(format!("nothing to clean in namespace {ns}"));
    }
    Ok(())
}
