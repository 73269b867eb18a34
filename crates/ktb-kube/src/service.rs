//! Pointing a Service at a shadow pod, and back.
//!
//! Selector mode rewrites the selector; scale mode leaves the spec alone and
//! scales the workload behind it to zero. Either way what was changed is
//! written in an annotation on the Service itself, so whoever restores
//! (the CLI, the agent, `ktb recover` on another machine) finds it there.
//! Every write is a merge patch carrying the Service's `resourceVersion`,
//! so a concurrent change by someone else (a GitOps controller, a
//! colleague) makes it fail instead of being silently overwritten.
//! Restoring is idempotent: a Service without ktb's annotations is already
//! original. It is also owned: every restore names the session it undoes,
//! and a Service now held by another session is left exactly as it is, so
//! a laptop that wakes up late, an agent whose session was taken over, or a
//! `ktb clean` racing a new exchange never undoes a colleague's session.

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Map, Value};

use crate::names::{ORIGINAL_REPLICAS, ORIGINAL_SELECTOR, SESSION};
use crate::selector::{display, Selector};
use crate::workload::{self, Replicas};

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The Service carried no ktb annotation: nothing to do.
    AlreadyOriginal,
    /// The Service belongs to another session now (`session`); it was
    /// left alone.
    NotOurs { session: String },
    /// The selector was put back (selector mode) and/or the workload
    /// scaled back (scale mode).
    Changed {
        selector: Option<Selector>,
        replicas: Option<Replicas>,
    },
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restored::AlreadyOriginal => write!(f, "already original"),
            Restored::NotOurs { session } => {
                write!(f, "left alone: it belongs to session {session} now")
            }
            Restored::Changed { selector, replicas } => {
                let mut parts = Vec::new();
                if let Some(selector) = selector {
                    parts.push(format!("selector {}", display(selector)));
                }
                if let Some(r) = replicas {
                    parts.push(format!(
                        "{:?} {} back to {} replicas",
                        r.kind, r.name, r.replicas
                    ));
                }
                write!(f, "{}", parts.join(", "))
            }
        }
    }
}

pub fn selector_of(service: &Service) -> Selector {
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default()
}

/// The selector ktb saved on the Service, if it is exchanged.
pub fn saved_selector(service: &Service) -> anyhow::Result<Option<Selector>> {
    let annotations = service.metadata.annotations.as_ref();
    let Some(saved) = annotations.and_then(|a| a.get(ORIGINAL_SELECTOR)) else {
        return Ok(None);
    };
    let selector = serde_json::from_str(saved)
        .with_context(|| format!("annotation {ORIGINAL_SELECTOR} is not a selector"))?;
    Ok(Some(selector))
}

/// A merge patch that makes the selector exactly `to` (keys of `from` that
/// `to` lacks are deleted with `null`).
fn selector_patch(from: &Selector, to: &Selector) -> Value {
    let mut selector = Map::new();
    for key in from.keys().filter(|k| !to.contains_key(*k)) {
        selector.insert(key.clone(), Value::Null);
    }
    for (key, value) in to {
        selector.insert(key.clone(), Value::String(value.clone()));
    }
    Value::Object(selector)
}

fn resource_version(service: &Service) -> anyhow::Result<&str> {
    service
        .metadata
        .resource_version
        .as_deref()
        .context("the Service has no resourceVersion")
}

/// Points `service` at the pods labelled `shadow`, saving its selector.
pub async fn point_at_shadow(
    api: &Api<Service>,
    service: &Service,
    shadow: &Selector,
    session: &str,
) -> anyhow::Result<Service> {
    let name = service
        .metadata
        .name
        .as_deref()
        .context("the Service has no name")?;
    let original = selector_of(service);
    let patch = json!({
        "metadata": {
            "resourceVersion": resource_version(service)?,
            "annotations": {
                ORIGINAL_SELECTOR: serde_json::to_string(&original)?,
                SESSION: session,
            },
        },
        "spec": { "selector": selector_patch(&original, shadow) },
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("cannot point Service {name} at the shadow pod"))
}

/// Scale mode: records the workload's replica count on the Service (its
/// spec is left as it is) before the workload is scaled to zero.
pub async fn mark_scaled(
    api: &Api<Service>,
    service: &Service,
    replicas: &Replicas,
    session: &str,
) -> anyhow::Result<()> {
    let name = service
        .metadata
        .name
        .as_deref()
        .context("the Service has no name")?;
    let patch = json!({
        "metadata": {
            "resourceVersion": resource_version(service)?,
            "annotations": { ORIGINAL_REPLICAS: replicas.to_string(), SESSION: session },
        },
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .with_context(|| format!("cannot record the replica count on Service {name}"))
}

/// The session a Service is exchanged by, if any.
pub fn session_of(service: &Service) -> Option<&str> {
    service
        .metadata
        .annotations
        .as_ref()?
        .get(SESSION)
        .map(String::as_str)
}

/// Undoes whatever `session` recorded on the Service: scales the workload
/// back, puts the selector back, removes the annotations. A Service marked
/// by another session is left alone. Retries on conflicting concurrent
/// writes, since restoring must not give up.
pub async fn restore(
    client: &Client,
    ns: &str,
    name: &str,
    session: &str,
) -> anyhow::Result<Restored> {
    let api = Api::<Service>::namespaced(client.clone(), ns);
    for _ in 0..5 {
        let service = api
            .get(name)
            .await
            .with_context(|| format!("cannot read Service {name}"))?;
        let annotations = service.metadata.annotations.clone().unwrap_or_default();
        let selector = saved_selector(&service)?;
        let replicas = match annotations.get(ORIGINAL_REPLICAS) {
            Some(saved) => Some(saved.parse::<Replicas>().map_err(anyhow::Error::msg)?),
            None => None,
        };
        match annotations.get(SESSION) {
            None if selector.is_none() && replicas.is_none() => {
                return Ok(Restored::AlreadyOriginal)
            }
            Some(other) if other != session => {
                return Ok(Restored::NotOurs {
                    session: other.clone(),
                })
            }
            _ => {}
        }
        if let Some(r) = &replicas {
            workload::scale(client, ns, r.kind, &r.name, r.replicas).await?;
        }
        let mut patch = json!({
            "metadata": {
                "resourceVersion": resource_version(&service)?,
                "annotations": { ORIGINAL_SELECTOR: null, ORIGINAL_REPLICAS: null, SESSION: null },
            },
        });
        if let Some(original) = &selector {
            patch["spec"] = json!({ "selector": selector_patch(&selector_of(&service), original) });
        }
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(Restored::Changed { selector, replicas }),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot restore Service {name}")),
        }
    }
    anyhow::bail!("cannot restore Service {name}: it kept changing under us (5 conflicts in a row)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(pairs: &[(&str, &str)]) -> Selector {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_patch_makes_the_selector_exactly_the_target() {
        let from = selector(&[("app", "orders"), ("tier", "web")]);
        let to = selector(&[("ktb.dev/session", "abc")]);
        assert_eq!(
            selector_patch(&from, &to),
            json!({"app": null, "tier": null, "ktb.dev/session": "abc"})
        );
        assert_eq!(
            selector_patch(&to, &from),
            json!({"ktb.dev/session": null, "app": "orders", "tier": "web"})
        );
    }

    #[test]
    fn a_service_without_the_annotation_has_nothing_saved() {
        assert_eq!(saved_selector(&Service::default()).unwrap(), None);
    }
}
