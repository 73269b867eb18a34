//! The whole path a cluster command takes to its agent, tried for real: a
//! session Lease, an agent pod owned by it (as `connect` runs one: no
//! Service involved), ready, reached through a port-forward, the tunnel's
//! handshake completed with the session's key, timed; then everything
//! removed.
//!
//! The agent is started by the session layer every command uses
//! ([`Shadow::start`], [`Shadow::open_tunnel`], [`session::end`]), so a
//! PASS here means those commands' agents start too. Removal always
//! happens: after a success, a failure, or Ctrl-C (`shutdown`), bounded in
//! time; if even that fails, the agent's dead man's switch ends the session
//! after [`GRACE`] and garbage collection removes what the Lease owns.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

use ktb_kube::lease::{self, Kind as LeaseKind};
use ktb_kube::names::doctor_lease;
use ktb_proto::auth::ClientKey;

use super::{bounded, interruptible, Check, Interrupted};
use crate::cluster::Cluster;
use crate::permissions::Need;
use crate::report::{Event, Reporter};
use crate::session::agent_pod::{session_labels, AgentPodSpec, AgentRole, AgentSettings};
use crate::session::lock::{self, Lock, Taken};
use crate::session::shadow::{Shadow, TransportKind};
use crate::session::{self, owner};

const NAME: &str = "agent";
/// The Lease's duration: how long the cluster waits for this machine,
/// were the doctor to vanish mid-check, before the agent removes itself.
pub const GRACE: Duration = Duration::from_secs(30);
/// How long taking the Lease may take.
const LEASE_TIMEOUT: Duration = Duration::from_secs(15);
/// On top of the agent's ready timeout: creating its objects, and the
/// tunnel (which gives up on its own after 30 s).
const TRIAL_MARGIN: Duration = Duration::from_secs(45);
/// How long removing everything may take before the dead man's switch is
/// left to do it.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(20);
/// A tunnel slower than this to open works, but every command will feel it.
const SLOW_TUNNEL: Duration = Duration::from_secs(3);

/// How long each step took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From creating the agent's objects to the pod being ready.
    pub ready: Duration,
    /// From dialing the port-forward to the tunnel's handshake completed.
    pub tunnel: Duration,
}

/// The row when the developer may not start an agent at all.
pub fn not_tried(lacking: &[Need]) -> Check {
    let list = lacking
        .iter()
        .map(Need::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Check::warn(
        NAME,
        format!("not tried: starting an agent needs {list}"),
        "see the rbac rows above for the Role that grants them",
    )
}

/// Starts a throwaway agent, tunnels to it and removes it. `Err` only when
/// interrupted, after the removal.
pub async fn check(
    cluster: &Cluster,
    settings: &AgentSettings,
    reporter: &Reporter,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Check, Interrupted> {
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &cluster.namespace);
    let taking = bounded("taking a session Lease", LEASE_TIMEOUT, async {
        let owner = owner(cluster).await?;
        let wanted = lease::new_lease(
            &doctor_lease(&owner.session),
            LeaseKind::Doctor,
            &owner,
            GRACE,
        );
        match lock::take(&leases, &wanted).await? {
            Taken::Fresh(lock) => Ok((owner.session, lock)),
            _ => anyhow::bail!("a Lease named after this new session already exists; try again"),
        }
    });
    // Not interruptible: a Lease created just before Ctrl-C must be
    // released like any other, and this step is bounded anyway.
    let (session, lock) = match taking.await {
        Ok(taken) => taken,
        Err(e) => {
            return Ok(Check::fail(
                NAME,
                format!("cannot start a session: {e:#}"),
                "the rbac rows name any missing verb; otherwise the apiserver refused or was \
                 slow: try again",
            ))
        }
    };
    let objects = doctor_lease(&session);
    let budget = settings.ready_timeout + TRIAL_MARGIN;
    let trial = bounded(
        "starting and reaching the agent",
        budget,
        trial(cluster, &session, &lock, settings, reporter),
    );
    let outcome = interruptible(shutdown, trial).await;
    reporter.progress(format!("removing agent pod {objects}"));
    let removed = tokio::time::timeout(
        REMOVAL_TIMEOUT,
        session::end(cluster, &objects, &lock, reporter),
    )
    .await
    .is_ok();
    let Ok(outcome) = outcome else {
        if !removed {
            let (left, what_now) = left_behind(&objects);
            reporter.warn(format!("{left}: {what_now}"));
        }
        return Err(Interrupted);
    };
    Ok(judge(&objects, &settings.image, outcome, removed))
}

/// What to say when removing the agent did not finish in time.
fn left_behind(objects: &str) -> (String, String) {
    (
        format!("could not remove agent pod {objects} within {REMOVAL_TIMEOUT:?}"),
        format!(
            "it removes itself within {GRACE:?} (its Lease is no longer renewed); \
             `ktb status` shows it until then, `ktb clean` removes it now"
        ),
    )
}

/// What the trial's outcome means.
fn judge(objects: &str, image: &str, outcome: anyhow::Result<Timing>, removed: bool) -> Check {
    if !removed {
        let (detail, hint) = left_behind(objects);
        return Check::warn(NAME, detail, hint);
    }
    match outcome {
        Ok(Timing { ready, tunnel }) => {
            let detail = format!(
                "agent pod ready in {:.1} s, tunnel through a port-forward with handshake in {} ms; removed",
                ready.as_secs_f64(),
                tunnel.as_millis()
            );
            if tunnel > SLOW_TUNNEL {
                Check::warn(
                    NAME,
                    detail,
                    "the port-forward path (apiserver → kubelet) is slow: every command that \
                     tunnels (exchange, mesh, preview, connect) waits that long to start",
                )
            } else {
                Check::pass(NAME, detail)
            }
        }
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}; removed"),
            format!(
                "check that the nodes can run the agent image {image} (--agent-image, \
                 --image-pull-policy) and that port-forwards to pods work (`kubectl port-forward`); \
                 the agent pod's events (`kubectl get events`) say why it did not start"
            ),
        ),
    }
}

/// The agent started, reached and timed; the tunnel closed again. The
/// tunnel's last complaint, if it never came up, ends the error.
async fn trial(
    cluster: &Cluster,
    session: &str,
    lock: &Lock,
    settings: &AgentSettings,
    reporter: &Reporter,
) -> anyhow::Result<Timing> {
    let key = ClientKey::generate()?;
    let objects = doctor_lease(session);
    let spec = AgentPodSpec {
        name: &objects,
        session,
        role: AgentRole::Connect {
            key: key.public().to_string(),
        },
        lease: lock.name(),
        tunnel_on_pod_network: false,
        declared_ports: Vec::new(),
        settings,
        grace: GRACE,
        owner: lock.owner(),
        labels: session_labels(session),
        scaled: None,
    };
    let started = Instant::now();
    let shadow = Shadow::start(cluster, &spec, TransportKind::PortForward, reporter).await?;
    let ready = started.elapsed();
    let last_down = Arc::new(Mutex::new(None));
    let watching = {
        let (outer, last_down) = (reporter.clone(), Arc::clone(&last_down));
        Reporter::new(move |event| {
            if let Event::TunnelDown { reason, .. } = &event {
                *last_down.lock().expect("last_down lock") = Some(reason.clone());
            }
            outer.report(event);
        })
    };
    let dialed = Instant::now();
    let mut tunnel = match shadow.open_tunnel(&[], key, &watching).await {
        Ok(tunnel) => tunnel,
        Err(e) => {
            let last = last_down.lock().expect("last_down lock").take();
            return Err(match last {
                Some(reason) => e.context(format!("the tunnel never came up (last: {reason})")),
                None => e,
            });
        }
    };
    let tunnel_took = dialed.elapsed();
    tunnel.stop().await;
    Ok(Timing {
        ready,
        tunnel: tunnel_took,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;
    use crate::permissions::need;

    const OK: Timing = Timing {
        ready: Duration::from_millis(2300),
        tunnel: Duration::from_millis(180),
    };

    #[test]
    fn a_quick_tunnel_passes_a_slow_one_warns_a_failure_fails() {
        let pass = judge("ktb-doctor-1", "img", Ok(OK), true);
        assert_eq!(pass.status, Status::Pass);
        assert_eq!(
            pass.detail,
            "agent pod ready in 2.3 s, tunnel through a port-forward with handshake in 180 ms; removed"
        );
        let slow = Timing {
            tunnel: Duration::from_secs(4),
            ..OK
        };
        assert_eq!(judge("p", "img", Ok(slow), true).status, Status::Warn);
        let failed = judge(
            "p",
            "ktb-agent:9",
            Err(anyhow::anyhow!("ErrImagePull")),
            true,
        );
        assert_eq!(failed.status, Status::Fail);
        assert!(
            failed.detail.starts_with("ErrImagePull"),
            "{}",
            failed.detail
        );
        assert!(failed.hint.unwrap().contains("ktb-agent:9"));
    }

    #[test]
    fn a_pod_left_behind_is_said_whatever_the_outcome() {
        let left = judge("ktb-doctor-1", "img", Ok(OK), false);
        assert_eq!(left.status, Status::Warn);
        assert!(left.detail.contains("ktb-doctor-1"), "{}", left.detail);
        assert!(left.hint.unwrap().contains("ktb clean"));
    }

    #[test]
    fn lacking_permissions_are_named_not_tried() {
        let row = not_tried(&[need("create", "", "pods")]);
        assert_eq!(row.status, Status::Warn);
        assert_eq!(row.detail, "not tried: starting an agent needs create pods");
    }
}
