//! The Lease a session holds, seen from the laptop: take it, renew it,
//! hand it back, and every one of those writes conditional on still owning
//! it (the rules are in [`ktb_kube::lease`]).
//!
//! Taking a Lease name that exists means deciding whether its session is
//! alive, by the apiserver's clock. A live one is refused with who holds it
//! and since when. An expired one is taken over in two conditional steps:
//! the caller first undoes what that session changed, then the old Lease is
//! deleted with its UID and resourceVersion as preconditions and a new one
//! created, so the new session has a new UID and owns nothing of the old.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};

use ktb_kube::lease::{self, Holder, Liveness, Lost, Released};

/// A Lease this session holds. `current` is the Lease as last written by
/// this session: its resourceVersion is the precondition of the next write.
pub struct Lock {
    leases: Api<Lease>,
    current: Mutex<Box<Lease>>,
}

/// The outcome of trying to take a Lease.
pub enum Taken {
    /// Created: this session holds it.
    Fresh(Lock),
    /// Another session holds it and is alive.
    Held(Holder),
    /// Another session held it but has been silent for longer than the
    /// Lease's duration: the caller undoes that session, then calls
    /// [`take_over`].
    Expired {
        stale: Box<Lease>,
        holder: Holder,
        silent: Duration,
    },
}

/// How often a create is retried when the Lease it collided with vanishes
/// before it can be read (its holder released it at that moment).
const TAKE_ATTEMPTS: usize = 3;

/// Creates `wanted`, or says who holds a Lease of that name.
pub async fn take(leases: &Api<Lease>, wanted: &Lease) -> anyhow::Result<Taken> {
    let name = wanted.metadata.name.clone().unwrap_or_default();
    for _ in 0..TAKE_ATTEMPTS {
        let existing = match leases.create(&PostParams::default(), wanted).await {
            Ok(lease) => return Ok(Taken::Fresh(Lock::new(leases, lease))),
            Err(kube::Error::Api(status)) if status.code == 409 => leases
                .get_opt(&name)
                .await
                .with_context(|| format!("cannot read Lease {name}"))?,
            Err(e) => return Err(e).with_context(|| format!("cannot create Lease {name}")),
        };
        let Some(existing) = existing else {
            continue;
        };
        let holder = lease::holder(&existing);
        return Ok(
            match lease::liveness(&existing, lease::server_now(leases).await?) {
                Liveness::Live => Taken::Held(holder),
                Liveness::Expired { silent } => Taken::Expired {
                    stale: Box::new(existing),
                    holder,
                    silent,
                },
            },
        );
    }
    anyhow::bail!("cannot take Lease {name}: it kept appearing and vanishing; try again")
}

/// Takes `wanted`; a Lease of that name whose session the apiserver's clock
/// says is silent is replaced, after `undo` has undone what that session
/// changed (it is told who held it and for how long it was silent).
/// `Err(holder)` when a live session holds it, or took it meanwhile.
pub async fn take_or_replace(
    leases: &Api<Lease>,
    wanted: &Lease,
    undo: impl AsyncFnOnce(&Holder, Duration) -> anyhow::Result<()>,
) -> anyhow::Result<Result<Lock, Holder>> {
    let mut taken = take(leases, wanted).await?;
    if let Taken::Expired {
        stale,
        holder,
        silent,
    } = taken
    {
        undo(&holder, silent).await?;
        taken = take_over(leases, &stale, wanted).await?;
    }
    Ok(match taken {
        Taken::Fresh(lock) => Ok(lock),
        Taken::Held(holder) | Taken::Expired { holder, .. } => Err(holder),
    })
}

/// Replaces the expired Lease `stale` with `wanted`: deletes exactly that
/// Lease (if it was renewed or replaced meanwhile, nothing is deleted and the
/// new holder is named), then creates ours.
async fn take_over(leases: &Api<Lease>, stale: &Lease, wanted: &Lease) -> anyhow::Result<Taken> {
    match lease::release(leases, stale).await? {
        Released::Deleted | Released::Gone => {}
        Released::NotOurs(holder) => return Ok(Taken::Held(holder)),
    }
    match take(leases, wanted).await? {
        Taken::Expired { holder, .. } => Ok(Taken::Held(holder)),
        taken => Ok(taken),
    }
}

impl Lock {
    fn new(leases: &Api<Lease>, lease: Lease) -> Lock {
        Lock {
            leases: leases.clone(),
            current: Mutex::new(Box::new(lease)),
        }
    }

    fn snapshot(&self) -> Lease {
        *self.current.lock().expect("lease lock").clone()
    }

    pub fn name(&self) -> String {
        self.snapshot().metadata.name.unwrap_or_default()
    }

    /// An owner reference to this Lease, for every object of the session.
    pub fn owner(&self) -> OwnerReference {
        lease::owner_reference(&self.snapshot())
    }

    /// How often to renew: a third of the Lease's duration, so two
    /// renewals may fail before it expires.
    pub fn renew_every(&self) -> Duration {
        (lease::duration_of(&self.snapshot()) / 3).max(Duration::from_secs(1))
    }

    /// Renews the Lease if it is still ours. The outer error means the
    /// session is over (someone else holds the Lease, or nobody); the inner
    /// one is a failed call, worth retrying.
    pub async fn renew(&self) -> Result<anyhow::Result<()>, Lost> {
        let mine = self.snapshot();
        Ok(match lease::renew(&self.leases, &mine).await? {
            Ok(renewed) => {
                **self.current.lock().expect("lease lock") = renewed;
                Ok(())
            }
            Err(e) => Err(e),
        })
    }

    /// Records `annotations` on the Lease (e.g. where a mesh member's agent
    /// is), under the same condition as a renewal. A conflict with a write
    /// of our own is retried from what is there now.
    pub async fn annotate(
        &self,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        for _ in 0..3 {
            let mine = self.snapshot();
            let written = lease::annotate(&self.leases, &mine, annotations)
                .await
                .map_err(|lost| anyhow::anyhow!("this session is over: {lost}"))??;
            let done = written
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| annotations.iter().all(|(k, v)| a.get(k) == Some(v)));
            **self.current.lock().expect("lease lock") = written;
            if done {
                return Ok(());
            }
        }
        anyhow::bail!("cannot annotate Lease {}: it kept changing", self.name())
    }

    /// Hands the Lease back if it is still ours; says so if it is not.
    pub async fn release(&self) -> anyhow::Result<Released> {
        lease::release(&self.leases, &self.snapshot()).await
    }
}
