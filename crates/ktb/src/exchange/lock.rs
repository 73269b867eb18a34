//! One developer per Service: a `coordination.k8s.io` Lease, renewed while
//! the session lives.
//!
//! The Lease says who holds the Service and since when, so a second
//! developer gets a name and a time instead of a broken Service. A Lease
//! that nobody renewed for its duration belongs to a laptop that vanished;
//! it may be taken over once that session's changes are undone. The Lease
//! is also the owner of every object a session creates, so deleting it
//! lets the garbage collector remove whatever a crash left behind.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use ktb_kube::names::{MANAGED_LABEL, MANAGED_VALUE, SESSION_LABEL};

/// Who holds a lock, for messages.
#[derive(Debug, Clone)]
pub struct Holder {
    pub identity: String,
    pub since: Option<Timestamp>,
    pub expired: bool,
    pub session: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.identity)?;
        if let Some(since) = self.since {
            let ago = Timestamp::now().duration_since(since).as_secs().max(0);
            write!(
                f,
                " since {} ({} ago)",
                since.strftime("%Y-%m-%d %H:%M:%S UTC"),
                human(ago)
            )?;
        }
        Ok(())
    }
}

fn human(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

pub fn holder_of(lease: &Lease) -> Holder {
    let spec = lease.spec.clone().unwrap_or_default();
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    let renewed = spec.renew_time.or(spec.acquire_time.clone()).map(|t| t.0);
    let expired = renewed.is_none_or(|t| Timestamp::now().duration_since(t).as_secs() > duration);
    Holder {
        identity: spec.holder_identity.unwrap_or_else(|| "someone".into()),
        since: spec.acquire_time.map(|t| t.0),
        expired,
        session: lease
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SESSION_LABEL))
            .cloned(),
    }
}

/// A lease this session holds.
pub struct Lock {
    pub leases: Api<Lease>,
    pub lease: Lease,
}

/// The outcome of trying to take a lock.
pub enum Taken {
    Fresh(Lock),
    /// Someone else holds a live lease.
    Held(Holder),
    /// The lease expired; the caller must undo that session, then call
    /// [`take_over`].
    Stale(Lease, Holder),
}

pub fn new_lease(name: &str, identity: &str, session: &str, duration: Duration) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (SESSION_LABEL.to_owned(), session.to_owned()),
                (MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.into()),
            lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    }
}

pub async fn take(leases: &Api<Lease>, wanted: Lease) -> anyhow::Result<Taken> {
    let name = wanted.metadata.name.clone().unwrap_or_default();
    match leases.create(&PostParams::default(), &wanted).await {
        Ok(lease) => Ok(Taken::Fresh(Lock {
            leases: leases.clone(),
            lease,
        })),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = leases
                .get(&name)
                .await
                .with_context(|| format!("cannot read Lease {name}"))?;
            let holder = holder_of(&existing);
            Ok(if holder.expired {
                Taken::Stale(existing, holder)
            } else {
                Taken::Held(holder)
            })
        }
        Err(e) => Err(e).with_context(|| format!("cannot create Lease {name}")),
    }
}

/// Replaces an expired lease with ours; fails if it changed meanwhile.
pub async fn take_over(
    leases: &Api<Lease>,
    stale: Lease,
    mut wanted: Lease,
) -> anyhow::Result<Lock> {
    let name = wanted.metadata.name.clone().unwrap_or_default();
    wanted.metadata.resource_version = stale.metadata.resource_version;
    let lease = leases
        .replace(&name, &PostParams::default(), &wanted)
        .await
        .with_context(|| format!("cannot take over the expired Lease {name}"))?;
    Ok(Lock {
        leases: leases.clone(),
        lease,
    })
}

impl Lock {
    pub fn name(&self) -> String {
        self.lease.metadata.name.clone().unwrap_or_default()
    }

    /// An owner reference to this lease, for every object of the session.
    pub fn owner(&self) -> OwnerReference {
        OwnerReference {
            api_version: "coordination.k8s.io/v1".into(),
            kind: "Lease".into(),
            name: self.name(),
            uid: self.lease.metadata.uid.clone().unwrap_or_default(),
            // As the controller, so no ReplicaSet or StatefulSet whose
            // selector matches the shadow pod (scale mode) adopts it.
            controller: Some(true),
            ..OwnerReference::default()
        }
    }

    /// How often to renew: a third of the lease's duration, so two
    /// renewals may fail before it expires.
    pub fn renew_every(&self) -> Duration {
        let seconds = self
            .lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .unwrap_or(30);
        Duration::from_secs((u64::try_from(seconds).unwrap_or(30) / 3).max(1))
    }

    pub async fn renew(&self) -> anyhow::Result<()> {
        let patch = json!({ "spec": { "renewTime": MicroTime(Timestamp::now()) } });
        self.leases
            .patch(&self.name(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .with_context(|| format!("cannot renew Lease {}", self.name()))
    }

    pub async fn release(&self) -> anyhow::Result<()> {
        match self
            .leases
            .delete(&self.name(), &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete Lease {}", self.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_lease_is_held_and_an_old_one_expired() {
        let lease = new_lease("l", "dev-a@laptop", "s1", Duration::from_secs(30));
        let holder = holder_of(&lease);
        assert!(!holder.expired);
        assert_eq!(holder.session.as_deref(), Some("s1"));
        assert!(holder.to_string().starts_with("dev-a@laptop since "));

        let mut old = lease;
        let spec = old.spec.as_mut().unwrap();
        let long_ago =
            MicroTime(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(120));
        spec.renew_time = Some(long_ago);
        assert!(holder_of(&old).expired);
    }
}
