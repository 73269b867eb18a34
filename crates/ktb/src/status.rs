//! `ktb status`: every ktb session of a namespace, as the cluster holds
//! it: no local file is read, so it shows colleagues' sessions and this
//! machine's alike (kt-connect users know this as `birdseye`).
//!
//! A session is its Lease: kind and Service from its labels and name, the developer
//! and machine from its annotations, since when (as its laptop wrote it)
//! and the last write the apiserver stamped on it. Health is judged like
//! `clean` judges it, by the apiserver's clock: `live`, `expired` (`ktb
//! clean` would repair it), or `orphaned` for an agent pod whose Lease is
//! gone (garbage collection, or `clean`, removes it).

use std::collections::BTreeSet;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use serde::Serialize;

use ktb_kube::lease::{self, Liveness};
use ktb_kube::names::{KIND_LABEL, MARK_ANNOTATION, SERVICE_LABEL, SESSION_LABEL};

use crate::cluster::{list_managed, Cluster};

/// One session, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub namespace: String,
    /// `exchange`, `connect`, `mesh` (one developer's membership),
    /// `mesh-router` (the router shared by a Service's members), `preview`,
    /// or `unknown` for an orphaned pod.
    pub kind: String,
    /// The Service exchanged, meshed or published; `None` for connect.
    pub service: Option<String>,
    /// A mesh member's mark, `NAME=VALUE`; `None` for other kinds.
    pub mark: Option<String>,
    pub user: String,
    pub host: String,
    pub session: String,
    /// When the session started, as its laptop wrote it.
    pub since: Option<String>,
    /// The last write the apiserver recorded on its Lease (its own clock).
    pub last_renewal: Option<String>,
    pub health: Health,
}

/// How a session is doing, judged by the apiserver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Its Lease is renewed: its laptop (or agent) is there.
    Live,
    /// Its Lease has not been renewed for its duration: `ktb clean` repairs it.
    Expired,
    /// An agent pod without a Lease: garbage collection or `ktb clean` removes it.
    Orphaned,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Live => "live",
            Health::Expired => "expired",
            Health::Orphaned => "orphaned",
        })
    }
}

/// Every session in the cluster's namespace, or in every namespace the
/// developer may list Leases in (`all_namespaces`).
pub async fn sessions(cluster: &Cluster, all_namespaces: bool) -> anyhow::Result<Vec<SessionRow>> {
    let (leases, pods) = if all_namespaces {
        (
            Api::<Lease>::all(cluster.client.clone()),
            Api::<Pod>::all(cluster.client.clone()),
        )
    } else {
        (
            Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace),
            Api::<Pod>::namespaced(cluster.client.clone(), &cluster.namespace),
        )
    };
    let where_ = if all_namespaces {
        "in every namespace (that needs `list` on leases and pods cluster-wide; try -n NAMESPACE)"
            .to_owned()
    } else {
        format!("in namespace {}", cluster.namespace)
    };
    // Pods before Leases, as `clean` does: a pod listed here had its Lease first.
    let agent_pods = list_managed(&pods)
        .await
        .with_context(|| format!("cannot list ktb's pods {where_}"))?;
    let all = list_managed(&leases)
        .await
        .with_context(|| format!("cannot list ktb's Leases {where_}"))?;
    let clock = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let server_now = lease::server_now(&clock).await?;
    let mut rows: Vec<SessionRow> = all.iter().map(|l| lease_row(l, server_now)).collect();
    let with_lease: BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r.namespace.clone(), r.session.clone()))
        .collect();
    rows.extend(agent_pods.iter().filter_map(|pod| {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let session = pod.metadata.labels.as_ref()?.get(SESSION_LABEL)?.clone();
        (!with_lease.contains(&(namespace.clone(), session.clone()))).then(|| SessionRow {
            namespace,
            kind: "unknown".into(),
            service: None,
            mark: None,
            user: "unknown".into(),
            host: "unknown".into(),
            session,
            since: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            last_renewal: None,
            health: Health::Orphaned,
        })
    }));
    rows.sort_by(|a, b| {
        (&a.namespace, &a.kind, &a.service).cmp(&(&b.namespace, &b.kind, &b.service))
    });
    Ok(rows)
}

fn lease_row(lease: &Lease, server_now: Timestamp) -> SessionRow {
    let holder = lease::holder(lease);
    let name = lease.metadata.name.clone().unwrap_or_default();
    let labels = lease.metadata.labels.clone().unwrap_or_default();
    let kind = labels
        .get(KIND_LABEL)
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    // A member Lease names its Service in a label; the others are named
    // after it (`ktb-<kind>-<service>`).
    let service = labels.get(SERVICE_LABEL).cloned().or_else(|| {
        let prefix = match kind.as_str() {
            "exchange" => "ktb-exchange-",
            "mesh-router" => "ktb-mesh-",
            "preview" => "ktb-preview-",
            _ => return None,
        };
        name.strip_prefix(prefix).map(str::to_owned)
    });
    let mark = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MARK_ANNOTATION))
        .cloned();
    SessionRow {
        namespace: lease.metadata.namespace.clone().unwrap_or_default(),
        service,
        mark,
        kind,
        user: holder.owner.user,
        host: holder.owner.host,
        session: holder.owner.session,
        since: holder.since.map(|t| t.to_string()),
        last_renewal: lease::last_write(lease).map(|t| t.to_string()),
        health: match lease::liveness(lease, server_now) {
            Liveness::Live => Health::Live,
            Liveness::Expired { .. } => Health::Expired,
        },
    }
}
