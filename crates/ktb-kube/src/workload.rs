//! The workload behind a Service, for scale mode: found through the
//! Service's pods, scaled through the `scale` subresource (the only write
//! the developer Role grants on workloads).

use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;
use serde_json::json;

use crate::selector::{display, Selector};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    StatefulSet,
}

impl Kind {
    /// The resource name, as RBAC rules spell it.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Deployment => "deployments",
            Kind::StatefulSet => "statefulsets",
        }
    }
}

/// A workload and a replica count: what scale mode saved, as
/// `Deployment/orders=3` in the Service's annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicas {
    pub kind: Kind,
    pub name: String,
    pub replicas: i32,
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{}={}", self.kind, self.name, self.replicas)
    }
}

impl FromStr for Replicas {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("invalid saved replica count {s:?}");
        let (workload, replicas) = s.split_once('=').ok_or_else(invalid)?;
        let (kind, name) = workload.split_once('/').ok_or_else(invalid)?;
        let kind = match kind {
            "Deployment" => Kind::Deployment,
            "StatefulSet" => Kind::StatefulSet,
            _ => return Err(invalid()),
        };
        Ok(Replicas {
            kind,
            name: name.into(),
            replicas: replicas.parse().map_err(|_| invalid())?,
        })
    }
}

/// The workload whose pods a Service selects, with its current replica
/// count and the labels of its pod template.
pub struct Found {
    pub replicas: Replicas,
    pub template_labels: Selector,
}

pub async fn behind_service(
    client: &Client,
    ns: &str,
    selector: &Selector,
) -> anyhow::Result<Found> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&display(selector)))
        .await?;
    let owners: Vec<(String, String)> = list
        .items
        .iter()
        .filter_map(|p| {
            let owner = p
                .metadata
                .owner_references
                .as_ref()?
                .iter()
                .find(|o| o.controller == Some(true))?;
            Some((owner.kind.clone(), owner.name.clone()))
        })
        .collect();
    let Some((kind, name)) = owners.first().cloned() else {
        anyhow::bail!(
            "scale mode needs running pods of a Deployment or StatefulSet behind the Service; \
             none of the pods matching {} has one (use the default selector mode)",
            display(selector)
        );
    };
    if owners.iter().any(|o| *o != (kind.clone(), name.clone())) {
        anyhow::bail!("the Service selects pods of several workloads; scale mode would stop all of them (use selector mode)");
    }
    match kind.as_str() {
        "ReplicaSet" => {
            let rs = Api::<ReplicaSet>::namespaced(client.clone(), ns).get(&name).await?;
            let deployment = rs
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Deployment")
                .map(|o| o.name.clone())
                .with_context(|| format!("ReplicaSet {name} belongs to no Deployment: scale mode cannot restore it"))?;
            let d = Api::<Deployment>::namespaced(client.clone(), ns).get(&deployment).await?;
            let spec = d.spec.unwrap_or_default();
            Ok(Found {
                replicas: Replicas {
                    kind: Kind::Deployment,
                    name: deployment,
                    replicas: spec.replicas.unwrap_or(1),
                },
                template_labels: spec.template.metadata.and_then(|m| m.labels).unwrap_or_default(),
            })
        }
        "StatefulSet" => {
            let s = Api::<StatefulSet>::namespaced(client.clone(), ns).get(&name).await?;
            let spec = s.spec.unwrap_or_default();
            Ok(Found {
                replicas: Replicas {
                    kind: Kind::StatefulSet,
                    name,
                    replicas: spec.replicas.unwrap_or(1),
                },
                template_labels: spec.template.metadata.and_then(|m| m.labels).unwrap_or_default(),
            })
        }
        other => anyhow::bail!("the Service's pods are owned by a {other}; scale mode supports Deployments and StatefulSets"),
    }
}

/// Sets the replica count through the `scale` subresource.
pub async fn scale(
    client: &Client,
    ns: &str,
    kind: Kind,
    name: &str,
    replicas: i32,
) -> anyhow::Result<()> {
    let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
    let pp = PatchParams::default();
    let result = match kind {
        Kind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), ns)
                .patch_scale(name, &pp, &patch)
                .await
        }
        Kind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), ns)
                .patch_scale(name, &pp, &patch)
                .await
        }
    };
    result
        .map(drop)
        .with_context(|| format!("cannot scale {kind:?} {name} to {replicas}"))
}

/// Waits (at most `timeout`) until the workload has `wanted` ready
/// replicas, so the shadow pod is removed only once the originals serve.
pub async fn wait_ready(
    client: &Client,
    ns: &str,
    kind: Kind,
    name: &str,
    wanted: i32,
    timeout: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let ready = match kind {
            Kind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .and_then(|d| d.status?.ready_replicas),
            Kind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .ok()
                .and_then(|s| s.status?.ready_replicas),
        };
        if ready.unwrap_or(0) >= wanted {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_replicas_round_trip() {
        let saved = Replicas {
            kind: Kind::Deployment,
            name: "orders".into(),
            replicas: 3,
        };
        assert_eq!(saved.to_string(), "Deployment/orders=3");
        assert_eq!("Deployment/orders=3".parse(), Ok(saved));
        assert!("Pod/x=1".parse::<Replicas>().is_err());
        assert!("Deployment/orders".parse::<Replicas>().is_err());
    }
}
