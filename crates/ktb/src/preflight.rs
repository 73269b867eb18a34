//! Checking permissions before changing anything.
//!
//! A command that fails half-way through for lack of a verb leaves work to
//! undo and a confusing message; asking the apiserver first (one
//! SelfSubjectAccessReview per verb, in parallel) lets ktb say exactly what
//! is missing and change nothing.

use std::time::Duration;

use anyhow::Context;
use futures_util::future::join_all;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::cluster::Cluster;
use crate::permissions::{Command, Need, DEVELOPER_ROLE_FILE};
use crate::refusal::Refusal;

/// The longest the apiserver may take to answer every review together.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(15);

/// Which of `needs` the developer lacks in the cluster's namespace, asked
/// of the apiserver with one SelfSubjectAccessReview each, in parallel.
pub async fn missing(cluster: &Cluster, needs: &[Need]) -> anyhow::Result<Vec<Need>> {
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
    let answers = tokio::time::timeout(REVIEW_TIMEOUT, join_all(reviews))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the apiserver did not answer the permission checks (SelfSubjectAccessReview) \
                 within {REVIEW_TIMEOUT:?}; check the cluster's health and try again"
            )
        })?;
    let mut missing = Vec::new();
    for (need, answer) in needs.iter().zip(answers) {
        let answer = answer.with_context(|| {
            format!("cannot ask the apiserver whether you may {need} (SelfSubjectAccessReview)")
        })?;
        if !answer.status.is_some_and(|s| s.allowed) {
            missing.push(*need);
        }
    }
    Ok(missing)
}

/// How a developer gets `command`'s verbs in `namespace`: the Roles that
/// grant them.
pub fn remedy(command: Command, namespace: &str) -> String {
    format!(
        "Ask a cluster admin to grant you the Role in {file} (Role {role}: this command's verbs), \
         or {all} (Role ktb-developer: every command's), in namespace {namespace}",
        file = command.role_file(),
        role = command.role_name(),
        all = DEVELOPER_ROLE_FILE,
    )
}

/// Fails naming every missing permission of `needs` (the part of
/// `command`'s verbs this run calls for), or succeeds if all are granted.
pub async fn check(cluster: &Cluster, command: Command, needs: &[Need]) -> anyhow::Result<()> {
    let missing = missing(cluster, needs).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing
        .iter()
        .map(Need::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Err(Refusal::Forbidden(format!(
        "missing permission in namespace {ns} for `ktb {invocation}`: {list}.\n\
         Nothing was changed. {remedy}.",
        ns = cluster.namespace,
        invocation = command.invocation(),
        remedy = remedy(command, &cluster.namespace),
    ))
    .into())
}
