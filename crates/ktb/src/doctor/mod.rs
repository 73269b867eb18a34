//! `ktb doctor`: everything ktb needs, checked before a command needs it,
//! each check a row saying PASS, WARN or FAIL, what was found, and on a
//! WARN or FAIL what to do about it.
//!
//! The checks run in the order a command would meet them: the kubeconfig
//! ([`cluster`]), the apiserver ([`cluster`]), each command's permissions
//! ([`rbac`]), a throwaway agent reached through a port-forward
//! ([`agent`]), what crashed sessions left in the namespace ([`sessions`]),
//! and on this machine the TUN device ([`tun`]), the resolver `connect
//! --dns` would edit ([`dns`]) and `connect`'s journal ([`journal`]). A
//! check the cluster is needed for is left out when it cannot be reached
//! (the row saying so is the FAIL to fix first); the local ones always run.
//!
//! Only the agent check changes anything: it creates a session Lease, an
//! agent pod and its RBAC for a few seconds and removes them, also when it
//! fails or Ctrl-C arrives. Every other check reads. The library returns the
//! rows; the binary prints them and exits 1 if any FAILs ([`verdict`]).

pub mod agent;
pub mod cluster;
pub mod dns;
pub mod journal;
pub mod rbac;
pub mod sessions;
pub mod tun;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;

use crate::cluster::KubeOptions;
use crate::permissions;
use crate::report::Reporter;
use crate::session::agent_pod::AgentSettings;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `pass`: what ktb needs is there.
    Pass,
    /// `warn`: ktb works, but something will get in the way of some of it
    /// (a mode, a command) or is worth repairing; the hint says what.
    Warn,
    /// `fail`: a command will not work until this is fixed; the hint says how.
    Fail,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One row of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked: `kubeconfig`, `cluster`, `rbac exchange` (one per
    /// command), `agent`, `sessions`, `tun`, `dns`, `journal`.
    pub name: String,
    /// `pass`, `warn` or `fail` in JSON; `PASS`, `WARN`, `FAIL` in the table.
    pub status: Status,
    /// What was found, in one line.
    pub detail: String,
    /// What to do about it; on every WARN and FAIL, never on a PASS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::hinted(Status::Warn, name.into(), detail.into(), hint.into())
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::hinted(Status::Fail, name.into(), detail.into(), hint.into())
    }

    fn hinted(status: Status, name: String, detail: String, hint: String) -> Check {
        Check {
            name,
            status,
            detail,
            hint: Some(hint),
        }
    }
}

/// What `ktb doctor` is told.
pub struct DoctorOptions {
    /// The cluster and namespace, as for every command.
    pub kube: KubeOptions,
    /// How to run the throwaway agent; `None` leaves that check out
    /// (`--no-agent`), and with it every write to the cluster.
    pub agent: Option<AgentSettings>,
    /// Where `ktb connect` keeps its journal.
    pub state_dir: PathBuf,
}

/// Ctrl-C during the checks: nothing is printed, and the throwaway agent,
/// if it was started, has been removed (or a warning said why not).
#[derive(Debug, thiserror::Error)]
#[error("interrupted before the checks were done")]
pub struct Interrupted;

/// Runs every check. Fails only when `shutdown` completes first (after
/// removing the throwaway agent, if it was started).
pub async fn run(
    options: &DoctorOptions,
    reporter: &Reporter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Vec<Check>> {
    tokio::pin!(shutdown);
    let mut checks = Vec::new();
    reporter.progress("checking the kubeconfig and the cluster");
    let reached = interruptible(&mut shutdown, cluster::check(&options.kube, &mut checks)).await?;
    if let Some(cluster) = reached {
        reporter.progress("checking permissions");
        let missing = interruptible(&mut shutdown, rbac::check(&cluster, &mut checks)).await?;
        if let Some(settings) = &options.agent {
            let lacking: Vec<_> = permissions::AGENT
                .iter()
                .filter(|need| missing.as_ref().is_some_and(|m| m.contains(need)))
                .copied()
                .collect();
            checks.push(if lacking.is_empty() {
                agent::check(&cluster, settings, reporter, &mut shutdown).await?
            } else {
                agent::not_tried(&lacking)
            });
        }
        reporter.progress("looking for what crashed sessions left");
        checks.push(interruptible(&mut shutdown, sessions::check(&cluster)).await?);
    }
    checks.push(tun::check());
    checks.push(dns::check(std::path::Path::new(
        crate::connect::system::RESOLV_CONF,
    )));
    checks.push(journal::check(&options.state_dir));
    Ok(checks)
}

/// `step`, unless `shutdown` completes first.
async fn interruptible<T>(
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    step: impl Future<Output = T>,
) -> Result<T, Interrupted> {
    tokio::select! {
        value = step => Ok(value),
        _ = shutdown.as_mut() => Err(Interrupted),
    }
}

/// `step`, failing with `what` when it takes over `timeout`.
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    step: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {timeout:?}"))?
}

/// The doctor's outcome as a command's: an error naming every failed
/// check (exit code 1), or `Ok` when none failed (warnings included).
pub fn verdict(checks: &[Check]) -> anyhow::Result<()> {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.name.as_str())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} check{} failed ({}): see their hints",
        failed.len(),
        if failed.len() == 1 { "" } else { "s" },
        failed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_serialise_with_lowercase_statuses_and_no_hint_on_a_pass() {
        let rows = [
            Check::pass("cluster", "answers"),
            Check::fail("rbac exchange", "missing patch services", "grant it"),
        ];
        let json = serde_json::to_value(rows).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"name": "cluster", "status": "pass", "detail": "answers"},
                {"name": "rbac exchange", "status": "fail", "detail": "missing patch services", "hint": "grant it"},
            ])
        );
    }

    #[test]
    fn only_a_fail_fails_the_doctor() {
        let warned = [
            Check::pass("cluster", "ok"),
            Check::warn("dns", "NetworkManager", "use --dns hosts"),
        ];
        assert!(verdict(&warned).is_ok());
        let failed = [
            Check::fail("rbac mesh", "x", "y"),
            Check::warn("tun", "x", "y"),
            Check::fail("agent", "x", "y"),
        ];
        let message = verdict(&failed).unwrap_err().to_string();
        assert_eq!(
            message,
            "2 checks failed (rbac mesh, agent): see their hints"
        );
    }
}
