//! The dead man's switch: if the laptop vanishes, the agent restores the
//! Service itself (exchange) and ends the session (exchange and connect).
//!
//! The laptop shows it is alive in two ways: an attached tunnel, and the
//! renewals of the session's Lease (which continue while a tunnel
//! reconnects). When neither has been seen for the grace period, the agent
//! puts the Service's saved selector back and deletes the Lease; garbage
//! collection then removes the session's objects, this pod included.
//! Renewals are judged by when the agent *saw* the Lease change, not by the
//! time written in it, so clock skew between laptop and cluster cannot fire
//! the switch early.
//!
//! Both writes are owned: the restore only undoes a Service still marked
//! with this agent's session, and the Lease is deleted only while it is the
//! very Lease (UID) this agent started under. If another session took the
//! Lease over, this agent's session is already over and it touches nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use ktb_kube::lease::{self, Released};
use ktb_kube::service::Restored;
use kube::api::Api;

use crate::attachment::Attachment;

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What to restore, and when.
#[derive(Debug, Clone)]
pub struct DeadMan {
    pub namespace: String,
    /// The Service to restore; `None` for a connect session, which changed none.
    pub service: Option<String>,
    pub lease: String,
    /// The session id the CLI gave this agent (on the Lease and the Service).
    pub session: String,
    pub grace: Duration,
}

/// What the agent saw of its Lease on one check.
enum Seen {
    /// The session's own Lease (its UID and session id).
    Ours(Box<Lease>),
    /// No Lease, or another session's: this session has ended.
    Ended,
    /// The apiserver did not answer; judge again next round.
    Unknown,
}

impl DeadMan {
    /// Returns once the session is over for good: restored after the grace
    /// period, or ended by the CLI (its Lease deleted) or by a takeover.
    pub async fn watch(self, attachment: Arc<Attachment>) {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "no access to the Kubernetes API: cannot restore the Service if the laptop vanishes");
                return std::future::pending().await;
            }
        };
        let leases = Api::<Lease>::namespaced(client.clone(), &self.namespace);
        let mut last_alive = Instant::now();
        let mut ours: Option<Lease> = None;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if attachment.session().is_some() {
                last_alive = Instant::now();
                continue;
            }
            match self.look(&leases, ours.as_ref()).await {
                Seen::Ours(lease) => {
                    let moved = ours.as_ref().map(|l| &l.metadata.resource_version)
                        != Some(&lease.metadata.resource_version);
                    if moved {
                        last_alive = Instant::now();
                    }
                    ours = Some(*lease);
                }
                Seen::Ended => {
                    tracing::info!(lease = %self.lease, "the session's Lease is gone or another session's: the session has ended");
                    if self.restore(&client).await {
                        return;
                    }
                    continue;
                }
                Seen::Unknown => {}
            }
            // Only a Lease read as ours can be released as ours.
            let Some(lease) = ours.as_ref().filter(|_| last_alive.elapsed() > self.grace) else {
                continue;
            };
            tracing::warn!(grace = ?self.grace, "no sign of the laptop for the grace period: ending the session");
            // Keep the Lease while the restore fails: it is how `ktb clean`
            // finds this session. Try again next round.
            if self.restore(&client).await {
                self.release(&leases, lease).await;
                return;
            }
        }
    }

    async fn look(&self, leases: &Api<Lease>, ours: Option<&Lease>) -> Seen {
        match leases.get_opt(&self.lease).await {
            Ok(Some(lease)) => {
                let same_object = ours.is_none_or(|o| o.metadata.uid == lease.metadata.uid);
                if same_object && lease::session_of(&lease) == Some(self.session.as_str()) {
                    Seen::Ours(Box::new(lease))
                } else {
                    Seen::Ended
                }
            }
            Ok(None) => Seen::Ended,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the session's Lease");
                Seen::Unknown
            }
        }
    }

    async fn release(&self, leases: &Api<Lease>, lease: &Lease) {
        match lease::release(leases, lease).await {
            Ok(Released::Deleted) => {
                tracing::info!(lease = %self.lease, "deleted the session's Lease; its objects follow")
            }
            Ok(Released::Gone) => {}
            Ok(Released::NotOurs(holder)) => {
                tracing::info!(%holder, "the Lease belongs to another session now; left alone")
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "cannot delete the session's Lease"
            ),
        }
    }

    /// Whether the Service (if any) is no longer this session's.
    async fn restore(&self, client: &kube::Client) -> bool {
        let Some(service) = &self.service else {
            return true;
        };
        match ktb_kube::service::restore(client, &self.namespace, service, &self.session).await {
            Ok(Restored::NotOurs { session }) => {
                tracing::info!(%service, %session, "the Service belongs to another session now; left alone");
                true
            }
            Ok(restored) => {
                tracing::info!(%service, %restored, "Service restored");
                true
            }
            Err(e) => {
                tracing::error!(%service, error = format!("{e:#}"), "cannot restore the Service");
                false
            }
        }
    }
}
