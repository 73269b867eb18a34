//! Checking permissions before changing anything.
//!
//! A command that fails half-way through for lack of a verb leaves work to
//! undo and a confusing message; asking the apiserver first (one
//! SelfSubjectAccessReview per verb, in parallel) lets ktb say exactly what
//! is missing and change nothing.

use futures_util::future::join_all;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::cluster::Cluster;
use crate::refusal::Refusal;

/// One permission: a verb on a resource (and subresource) in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
}

pub const fn need(verb: &'static str, group: &'static str, resource: &'static str) -> Need {
    Need {
        verb,
        group,
        resource,
        subresource: "",
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        Ok(())
    }
}

/// Fails naming every missing permission, or succeeds if all are granted.
pub async fn check(cluster: &Cluster, needs: &[Need]) -> anyhow::Result<()> {
    let api = Api::<SelfSubjectAccessReview>::all(cluster.client.clone());
    let reviews = needs.iter().map(|need| {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(cluster.namespace.clone()),
                    verb: Some(need.verb.into()),
                    group: Some(need.group.into()),
                    resource: Some(need.resource.into()),
                    subresource: (!need.subresource.is_empty()).then(|| need.subresource.into()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let api = api.clone();
        async move { api.create(&PostParams::default(), &review).await }
    });
    let mut missing = Vec::new();
    for (need, result) in needs.iter().zip(join_all(reviews).await) {
        let allowed = result?.status.is_some_and(|s| s.allowed);
        if !allowed {
            missing.push(need.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Refusal::Forbidden(format!(
        "missing permission in namespace {ns}: {list}.\n\
         Nothing was changed. Ask a cluster admin to grant the Role in deploy/rbac/developer.yaml \
         (Role ktb-developer) to you in namespace {ns}.",
        ns = cluster.namespace,
        list = missing.join(", ")
    ))
    .into())
}
