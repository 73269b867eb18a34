//! The doctor's first two rows: the kubeconfig the flags select (which
//! file, which context, which namespace) and whether the apiserver it
//! names answers, with its version and who it takes us for.
//!
//! Read exactly as every command reads them ([`crate::cluster::target`]),
//! so `--kubeconfig`, `--context` and `-n` mean the same here; the first
//! contact gets a few seconds, not a command's patience, so an unreachable
//! cluster is reported quickly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{bounded, Check};
use crate::cluster::{self, Cluster, KubeOptions, Target};

/// How long the apiserver may take to answer its version.
const CONTACT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it may take to say who we are.
const WHOAMI_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds the `kubeconfig` and `cluster` rows; the cluster when it answers.
pub async fn check(kube: &KubeOptions, checks: &mut Vec<Check>) -> Option<Cluster> {
    let target = match cluster::target(kube).await {
        Ok(target) => target,
        Err(e) => {
            checks.push(Check::fail(
                "kubeconfig",
                format!("{e:#}"),
                "point ktb at a kubeconfig that works with kubectl: --kubeconfig FILE, KUBECONFIG, \
                 or ~/.kube/config; `kubectl config get-contexts` lists its contexts (pick one with \
                 --context). The checks that need the cluster were skipped",
            ));
            return None;
        }
    };
    checks.push(Check::pass("kubeconfig", describe(&target)));
    let server = target.server.clone();
    let context = target.context.clone();
    let started = Instant::now();
    match target.reach(CONTACT_TIMEOUT).await {
        Ok((cluster, version)) => {
            let took = started.elapsed();
            let user = match bounded("who am I", WHOAMI_TIMEOUT, cluster.whoami()).await {
                Ok(user) => user,
                Err(e) => format!("an unknown user ({e:#})"),
            };
            checks.push(Check::pass(
                "cluster",
                format!(
                    "{server} answers in {} ms: Kubernetes {}; you are {user}",
                    took.as_millis(),
                    version.git_version
                ),
            ));
            Some(cluster)
        }
        Err(e) => {
            checks.push(Check::fail(
                "cluster",
                format!("{e:#}"),
                format!(
                    "is this the right context ({context})? Connect the VPN or network the cluster \
                     needs; `kubectl --context {context} version` should answer too. The checks \
                     that need the cluster were skipped"
                ),
            ));
            None
        }
    }
}

/// `context kind-ktb from FILE, namespace shop, server https://…`.
fn describe(target: &Target) -> String {
    format!(
        "context {} from {}, namespace {}, server {}",
        target.context,
        files(&target.files),
        target.namespace,
        target.server
    )
}

fn files(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}
