//! One session layer under every command that puts something in the
//! cluster (`exchange`, `connect`): who the session is, the Lease it holds,
//! its agent pod, keeping it alive, and ending it.
//!
//! A session's life, whatever the command:
//! 1. [`owner`]: the developer, this machine and a new random session id,
//!    kept as separate fields on everything the session writes;
//! 2. [`lock::take`]: the session's Lease, created, or refused with who
//!    holds it, or taken over from a session that the apiserver's clock
//!    says is silent;
//! 3. [`agent_pod::AgentPod::create`]: the agent pod and what it needs, all
//!    owned by the Lease (garbage collection removes them with it);
//! 4. [`keep_alive::keep_alive`]: renewals until Ctrl-C, each conditional
//!    on still owning the Lease; a Lease lost to someone else ends the
//!    session without touching theirs;
//! 5. [`end`]: the agent's objects deleted by name, then the Lease released
//!    if it is still ours. Never the Lease first: another session could
//!    start while ours is still in place.
//!
//! What a command does between 3 and 5 (switching a Service, routes and DNS
//! on this machine) stays in the command's own module.

pub mod agent_pod;
pub mod keep_alive;
pub mod lock;
pub mod shadow;

use ktb_kube::lease::{Owner, Released};
use rand::Rng;

use crate::cluster::Cluster;
use crate::report::Reporter;
use agent_pod::AgentPod;
use lock::Lock;

/// Who this session is: the developer as the apiserver knows them, this
/// machine, and a fresh session id.
pub async fn owner(cluster: &Cluster) -> anyhow::Result<Owner> {
    Ok(Owner {
        user: cluster.whoami().await?,
        host: crate::cluster::hostname(),
        session: format!("{:08x}", rand::rng().random::<u32>()),
    })
}

/// Ends a session: deletes its agent pod and the objects beside it (named
/// after this session, so never a colleague's), then releases its Lease if
/// it is still this session's.
pub async fn end(cluster: &Cluster, objects: &str, lock: &Lock, reporter: &Reporter) {
    AgentPod::existing(&cluster.client, &cluster.namespace, objects)
        .delete()
        .await;
    match lock.release().await {
        Ok(Released::Deleted | Released::Gone) => {}
        Ok(Released::NotOurs(holder)) => reporter.progress(format!(
            "the Lease {} belongs to {holder} now; left it alone",
            lock.name()
        )),
        Err(e) => reporter.warn(format!("{e:#}")),
    }
}
