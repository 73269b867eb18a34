//! The dead man's switch: if the laptop vanishes, the agent restores the
//! Service itself (exchange) and ends the session (exchange and connect).
//!
//! The laptop shows it is alive in two ways: an attached tunnel, and the
//! renewals of the session's Lease (which continue while a tunnel
//! reconnects). When neither has been seen for the grace period, the agent
//! puts the Service's saved selector back and deletes the Lease; garbage
//! collection then removes the session's objects, this pod included.
//! Renewals are judged by when the agent *saw* the renew time change, not
//! by the time written in it, so clock skew between laptop and cluster
//! cannot fire the switch early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};

use crate::attachment::Attachment;

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What to restore, and when.
#[derive(Debug, Clone)]
pub struct DeadMan {
    pub namespace: String,
    /// The Service to restore; `None` for a connect session, which changed none.
    pub service: Option<String>,
    pub lease: String,
    pub grace: Duration,
}

impl DeadMan {
    /// Returns once the session is over for good: restored after the grace
    /// period, or ended by the CLI (its Lease deleted).
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
        let mut last_renewal = None;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if attachment.session().is_some() {
                last_alive = Instant::now();
                continue;
            }
            match leases.get_opt(&self.lease).await {
                Ok(Some(lease)) => {
                    let renewal = lease.spec.and_then(|s| s.renew_time).map(|t| t.0);
                    if renewal != last_renewal {
                        last_renewal = renewal;
                        last_alive = Instant::now();
                    }
                }
                Ok(None) => {
                    tracing::info!(lease = %self.lease, "the session's Lease is gone: the session has ended");
                    if self.restore(&client).await {
                        return;
                    }
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the session's Lease"),
            }
            if last_alive.elapsed() > self.grace {
                tracing::warn!(grace = ?self.grace, "no sign of the laptop for the grace period: ending the session");
                if !self.restore(&client).await {
                    // Keep the Lease: it is how `ktb clean` finds this
                    // session. Try again on the next round.
                    continue;
                }
                match leases
                    .delete(&self.lease, &DeleteParams::background())
                    .await
                {
                    Ok(_) => {
                        tracing::info!(lease = %self.lease, "deleted the session's Lease; its objects follow")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot delete the session's Lease"),
                }
                return;
            }
        }
    }

    /// Whether the Service (if any) is back as it was.
    async fn restore(&self, client: &kube::Client) -> bool {
        let Some(service) = &self.service else {
            return true;
        };
        match ktb_kube::service::restore(client, &self.namespace, service).await {
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
