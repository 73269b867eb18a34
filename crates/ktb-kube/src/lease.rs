//! A session's Lease: who holds it, whether it is still alive, and the
//! only writes ktb ever makes to one.
//!
//! Every ktb session (an exchange, a connect) is one `coordination.k8s.io`
//! Lease. It names the developer, the machine and the session; it is renewed
//! while the session lives; and it owns every object the session creates, so
//! deleting it lets the garbage collector remove whatever a crash left.
//!
//! Many developers share a namespace, so two rules keep one session from
//! ever damaging another:
//!
//! - **Every write is conditional on owning the Lease.** A renewal is a
//!   patch carrying the `resourceVersion` this session last saw, a release
//!   is a delete with the Lease's UID and `resourceVersion` as
//!   preconditions. A laptop that wakes up after its Lease was taken over
//!   therefore changes nothing of its successor's: its writes fail, and
//!   [`Lost`] says who holds the Lease now. A takeover deletes the old Lease
//!   (conditionally) and creates a new one, so the new session has a new UID
//!   and owns none of the old session's leftovers.
//! - **No machine's clock decides for another.** A Lease counts as expired
//!   when the apiserver has not recorded a write to it for its duration,
//!   judged by two readings of the *apiserver's* clock: the time it stamped
//!   on the Lease's last write (`managedFields`, `creationTimestamp`) and its
//!   current time (the `creationTimestamp` of a dry-run create). A laptop
//!   whose clock is minutes off neither expires live sessions nor keeps dead
//!   ones alive. The `renewTime` a laptop writes is shown to people, never
//!   compared.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use crate::names::{
    HOST_ANNOTATION, KIND_LABEL, MANAGED_LABEL, MANAGED_VALUE, SESSION_LABEL, USER_ANNOTATION,
};

/// The field manager of renewals, so the apiserver stamps their time.
const FIELD_MANAGER: &str = "ktb";
/// The apiserver stamps times to the second: a Lease is judged expired only
/// once it has been silent this much longer than its duration.
const CLOCK_RESOLUTION: Duration = Duration::from_secs(2);

/// Who a session is: kept as separate fields on the Lease (labels and
/// annotations), never parsed back out of one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The user name the apiserver knows the developer by (`dev-a`).
    pub user: String,
    /// The developer's machine, as its hostname says.
    pub host: String,
    /// A random id, new for every run of a command (8 hex digits).
    pub session: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} (session {})",
            self.user, self.host, self.session
        )
    }
}

/// What kind of session a Lease belongs to (label `ktb.dev/kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ktb exchange`: the Lease locks one Service (`ktb-exchange-<svc>`).
    Exchange,
    /// `ktb connect`: the Lease only owns the session's agent pod.
    Connect,
    /// `ktb mesh`, one developer's membership (`ktb-mesh-<svc>-<session>`):
    /// owns that developer's agent pod; carries the mark and the pod's IP.
    Mesh,
    /// The shared router of a meshed Service (`ktb-mesh-<svc>`): created by
    /// the first member, renewed by the router pod, owns the router and the
    /// Service selecting the original pods.
    MeshRouter,
    /// `ktb preview`: owns the published Service and the agent pod behind it.
    Preview,
    /// `ktb doctor`'s throwaway agent (`ktb-doctor-<session>`): owns the
    /// agent pod for the seconds the check takes.
    Doctor,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Exchange => "exchange",
            Kind::Connect => "connect",
            Kind::Mesh => "mesh",
            Kind::MeshRouter => "mesh-router",
            Kind::Preview => "preview",
            Kind::Doctor => "doctor",
        }
    }
}

/// A Lease as read from the cluster, for messages and decisions.
#[derive(Debug, Clone)]
pub struct Holder {
    pub owner: Owner,
    /// When the session took the Lease, as its laptop wrote it (display only).
    pub since: Option<Timestamp>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.owner)?;
        if let Some(since) = self.since {
            write!(f, " since {}", since.strftime("%Y-%m-%d %H:%M:%S UTC"))?;
        }
        Ok(())
    }
}

/// Reads who holds `lease`. Leases written before the owner was kept in
/// separate fields show their `holderIdentity` as the user.
pub fn holder(lease: &Lease) -> Holder {
    let labels = lease.metadata.labels.clone().unwrap_or_default();
    let annotations = lease.metadata.annotations.clone().unwrap_or_default();
    let spec = lease.spec.clone().unwrap_or_default();
    let unknown = || "unknown".to_owned();
    Holder {
        owner: Owner {
            user: annotations
                .get(USER_ANNOTATION)
                .cloned()
                .or(spec.holder_identity)
                .unwrap_or_else(unknown),
            host: annotations
                .get(HOST_ANNOTATION)
                .cloned()
                .unwrap_or_else(unknown),
            session: labels.get(SESSION_LABEL).cloned().unwrap_or_else(unknown),
        },
        since: spec.acquire_time.map(|t| t.0),
    }
}

/// The session id recorded on a Lease, if ktb wrote it.
pub fn session_of(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .labels
        .as_ref()?
        .get(SESSION_LABEL)
        .map(String::as_str)
}

/// A Lease for a new session, to be created.
pub fn new_lease(name: &str, kind: Kind, owner: &Owner, duration: Duration) -> Lease {
    let now = MicroTime(Timestamp::now());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (SESSION_LABEL.to_owned(), owner.session.clone()),
                (KIND_LABEL.to_owned(), kind.label().to_owned()),
                (MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([
                (USER_ANNOTATION.to_owned(), owner.user.clone()),
                (HOST_ANNOTATION.to_owned(), owner.host.clone()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(format!("{}@{}", owner.user, owner.host)),
            lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    }
}

/// The Lease's duration.
pub fn duration_of(lease: &Lease) -> Duration {
    let seconds = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(30).max(1))
}

/// An owner reference to `lease`, for every object of its session: as the
/// controller, so no ReplicaSet or StatefulSet whose selector matches a
/// shadow pod (scale mode) adopts it.
pub fn owner_reference(lease: &Lease) -> OwnerReference {
    OwnerReference {
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        name: lease.metadata.name.clone().unwrap_or_default(),
        uid: lease.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        ..OwnerReference::default()
    }
}

/// Whether a Lease's session is still alive, by the apiserver's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Written to within its duration: its laptop (or the laptop's renewals
    /// while a tunnel reconnects) is there.
    Live,
    /// Not written to for longer than its duration; `silent` is how long.
    Expired { silent: Duration },
}

/// The last time the apiserver recorded a write to `lease`, by its own clock.
pub fn last_write(lease: &Lease) -> Option<Timestamp> {
    let stamped = lease
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.time.as_ref().map(|t| t.0));
    let created = lease.metadata.creation_timestamp.as_ref().map(|t| t.0);
    stamped.chain(created).max()
}

/// Judges `lease` at `server_now` (a reading of the apiserver's clock).
pub fn liveness(lease: &Lease, server_now: Timestamp) -> Liveness {
    let Some(written) = last_write(lease) else {
        return Liveness::Live;
    };
    let silent = server_now
        .duration_since(written)
        .max(SignedDuration::ZERO)
        .unsigned_abs();
    if silent > duration_of(lease) + CLOCK_RESOLUTION {
        Liveness::Expired { silent }
    } else {
        Liveness::Live
    }
}

/// The apiserver's current time: the creation time it stamps on a Lease it
/// is asked to create in dry-run (nothing is stored).
pub async fn server_now(leases: &Api<Lease>) -> anyhow::Result<Timestamp> {
    let probe = Lease {
        metadata: ObjectMeta {
            generate_name: Some("ktb-clock-".into()),
            ..ObjectMeta::default()
        },
        ..Lease::default()
    };
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let created = leases
        .create(&params, &probe)
        .await
        .context("cannot read the apiserver's clock (a dry-run create of a Lease)")?;
    created
        .metadata
        .creation_timestamp
        .map(|t| t.0)
        .context("the apiserver stamped no creation time on a dry-run Lease")
}

/// Why a conditional write to a Lease did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Lost {
    /// The Lease is gone: the agent ended the session after the grace
    /// period, or `ktb recover`/`ktb clean` did.
    #[error("its Lease {lease} is gone (the agent ends a session whose laptop was silent for the grace period; `ktb recover` and `ktb clean` end abandoned ones)")]
    Gone { lease: String },
    /// Another session holds a Lease of that name now.
    #[error("its Lease {lease} now belongs to {holder}")]
    TakenOver { lease: String, holder: Holder },
}

/// Whether `current` is still the Lease `mine` was read as: same object
/// (UID) and same session. Anything else is someone else's.
fn same_session(mine: &Lease, current: &Lease) -> bool {
    mine.metadata.uid == current.metadata.uid && session_of(mine) == session_of(current)
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// Renews `mine` (the Lease as this session last saw it), only if nobody
/// else wrote to it meanwhile. Returns the renewed Lease, or [`Lost`]
/// when it belongs to someone else now (outer error) or the apiserver failed
/// (inner error, worth retrying).
pub async fn renew(leases: &Api<Lease>, mine: &Lease) -> Result<anyhow::Result<Lease>, Lost> {
    write(leases, mine, json!({})).await
}

/// Sets `annotations` on `mine` and renews it, under the same condition
/// as [`renew`].
pub async fn annotate(
    leases: &Api<Lease>,
    mine: &Lease,
    annotations: &BTreeMap<String, String>,
) -> Result<anyhow::Result<Lease>, Lost> {
    write(leases, mine, json!({ "annotations": annotations })).await
}

/// A renewal merged with `metadata`, conditional on `mine`'s resourceVersion.
async fn write(
    leases: &Api<Lease>,
    mine: &Lease,
    mut metadata: serde_json::Value,
) -> Result<anyhow::Result<Lease>, Lost> {
    let name = mine.metadata.name.clone().unwrap_or_default();
    metadata["resourceVersion"] = json!(mine.metadata.resource_version);
    let patch = json!({
        "metadata": metadata,
        "spec": { "renewTime": MicroTime(Timestamp::now()) },
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match leases.patch(&name, &params, &Patch::Merge(&patch)).await {
        Ok(renewed) => Ok(Ok(renewed)),
        Err(e) if is_status(&e, 404) => Err(Lost::Gone { lease: name }),
        Err(e) if is_status(&e, 409) => match leases.get_opt(&name).await {
            Ok(None) => Err(Lost::Gone { lease: name }),
            // Still ours, changed by someone's label or annotation edit:
            // the next write goes from what is there now.
            Ok(Some(current)) if same_session(mine, &current) => Ok(Ok(current)),
            Ok(Some(current)) => Err(Lost::TakenOver {
                lease: name,
                holder: holder(&current),
            }),
            Err(e) => Ok(Err(e).context("cannot read the session's Lease after a conflict")),
        },
        Err(e) => Ok(Err(e).with_context(|| format!("cannot write Lease {name}"))),
    }
}

/// What a conditional delete did.
#[derive(Debug)]
pub enum Released {
    Deleted,
    /// Nothing to delete: already gone.
    Gone,
    /// The Lease belongs to another session now; it was left alone.
    NotOurs(Holder),
}

/// Deletes `lease` only if it is exactly as read: same UID, same
/// resourceVersion. Returns false when it changed or is gone.
pub async fn delete_if_unchanged(leases: &Api<Lease>, lease: &Lease) -> anyhow::Result<bool> {
    let name = lease.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: lease.metadata.uid.clone(),
            resource_version: lease.metadata.resource_version.clone(),
        }),
        ..DeleteParams::background()
    };
    match leases.delete(&name, &params).await {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot delete Lease {name}")),
    }
}

/// Deletes the Lease `mine` if it is still this session's: UID and
/// resourceVersion as preconditions, re-read if only the version moved
/// (this session's own renewal in flight).
pub async fn release(leases: &Api<Lease>, mine: &Lease) -> anyhow::Result<Released> {
    let name = mine.metadata.name.clone().unwrap_or_default();
    let mut seen = mine.clone();
    for _ in 0..3 {
        if delete_if_unchanged(leases, &seen).await? {
            return Ok(Released::Deleted);
        }
        match leases.get_opt(&name).await? {
            None => return Ok(Released::Gone),
            Some(current) if same_session(mine, &current) => seen = current,
            Some(current) => return Ok(Released::NotOurs(holder(&current))),
        }
    }
    anyhow::bail!("cannot delete Lease {name}: it kept changing (3 conflicts in a row)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};

    fn owner() -> Owner {
        Owner {
            user: "dev-a".into(),
            host: "laptop-a".into(),
            session: "0badcafe".into(),
        }
    }

    fn written_at(lease: &mut Lease, at: Timestamp) {
        lease.metadata.creation_timestamp = Some(Time(at - SignedDuration::from_secs(600)));
        lease.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            time: Some(Time(at)),
            ..ManagedFieldsEntry::default()
        }]);
    }

    #[test]
    fn the_owner_reads_back_field_by_field() {
        let lease = new_lease("l", Kind::Exchange, &owner(), Duration::from_secs(30));
        let holder = holder(&lease);
        assert_eq!(holder.owner, owner());
        assert!(holder
            .to_string()
            .starts_with("dev-a on laptop-a (session 0badcafe) since "));
        assert_eq!(session_of(&lease), Some("0badcafe"));
    }

    #[test]
    fn liveness_compares_two_readings_of_the_apiservers_clock() {
        let server_now = Timestamp::now();
        let mut lease = new_lease("l", Kind::Connect, &owner(), Duration::from_secs(30));
        written_at(&mut lease, server_now - SignedDuration::from_secs(10));
        assert_eq!(liveness(&lease, server_now), Liveness::Live);
        written_at(&mut lease, server_now - SignedDuration::from_secs(60));
        assert_eq!(
            liveness(&lease, server_now),
            Liveness::Expired {
                silent: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn a_laptops_renew_time_never_decides() {
        let server_now = Timestamp::now();
        let mut lease = new_lease("l", Kind::Exchange, &owner(), Duration::from_secs(30));
        written_at(&mut lease, server_now - SignedDuration::from_secs(5));
        // A laptop whose clock is ten minutes behind wrote this.
        lease.spec.as_mut().unwrap().renew_time =
            Some(MicroTime(server_now - SignedDuration::from_secs(600)));
        assert_eq!(liveness(&lease, server_now), Liveness::Live);
    }

    #[test]
    fn another_object_or_session_of_the_same_name_is_not_ours() {
        let mut mine = new_lease("l", Kind::Exchange, &owner(), Duration::from_secs(30));
        mine.metadata.uid = Some("uid-1".into());
        let mut successor = mine.clone();
        assert!(same_session(&mine, &successor));
        successor.metadata.uid = Some("uid-2".into());
        assert!(!same_session(&mine, &successor));
    }
}
