//! Ready means traffic flows: before ktb says a Service reaches this
//! machine, it proves it; before it closes the tunnel, it proves the
//! Service has gone back.
//!
//! A switched selector is only a promise: the EndpointSlice controller must
//! list the shadow pod under every port (a named target port the pod does
//! not declare leaves the port out, and callers time out), and kube-proxy
//! must program the node. So for every exposed port the agent is asked
//! (`GET /probe`, over the same transport as the tunnel) to dial the
//! Service's ClusterIP on that port and to recognise its own connection
//! arriving on the listener behind it; the probe never reaches the laptop's
//! process. Until every port has been seen several times in a row (one
//! arrival only shows that some of the node's rules know the shadow), or
//! the time is up, nothing is announced; a path that never works is an
//! error, and the exchange is undone.
//!
//! Handing back is the same promise in reverse: kube-proxy keeps sending
//! callers to the shadow until it has caught up with the restored
//! endpoints, and a shadow that stops serving before then turns their calls
//! into timeouts. So the tunnel stays open until probes on every port land
//! on another endpoint several times in a row (the agent answers 409).

use std::time::{Duration, Instant};

use crate::agent_http::get;
use crate::target::PortRoute;
use crate::tunnel::Transport;

/// How long the Service may take to reach the shadow pod: endpoint
/// controllers and kube-proxy usually need well under a second.
const PROOF_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a probe that did not give the wanted answer.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// How long the Service may take to stop reaching the shadow pod once it
/// is restored; a scaled workload's pods must start within it too.
const HANDBACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Probes in a row that must give the wanted answer, and the pause between
/// them: a node whose rules still list old endpoints beside the new ones
/// sends a probe to an old one with a chance of one in the number of
/// endpoints, so five in a row leave little to luck.
const IN_A_ROW: u32 = 5;
const IN_A_ROW_EVERY: Duration = Duration::from_millis(100);
/// One probe request, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent's probe answered (see the agent's `GET /probe`).
enum Probed {
    /// 200: the connection arrived at the agent.
    Here,
    /// 409: another endpoint of the Service took it.
    Elsewhere,
    /// Anything else, with the reason: the Service could not be dialled,
    /// or the agent could not be asked.
    Unknown(String),
}

/// Waits until connections to the Service reach the agent on every route
/// [`IN_A_ROW`] times in a row: one arrival only shows that some of the
/// node's rules know the shadow, and a caller may still be sent to a scaled
/// workload's pod that is already gone. A mesh member passes its mark
/// (`NAME=VALUE`): its probe is then a request the shared router must send
/// to this member.
pub async fn prove<T: Transport>(
    transport: &T,
    qualified: &str,
    routes: &[PortRoute],
    mark: Option<&str>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + PROOF_TIMEOUT;
    for route in routes {
        let path = probe_path(route, mark);
        if let Err(reason) = in_a_row(transport, &path, Want::Here, deadline).await {
            anyhow::bail!(
                "callers of Service {qualified} port {} do not reach ktb's agent pod after {PROOF_TIMEOUT:?} ({}). \
                 Its endpoints may not list the pod for that port (a named targetPort the workload's pods \
                 do not declare?) or kube-proxy may not be running; ktb undoes what it changed",
                route.service_port,
                reason.trim()
            );
        }
    }
    Ok(())
}

/// Waits until connections to the Service on every route land on another
/// endpoint [`IN_A_ROW`] times in a row; only then may the agent stop
/// serving. A mesh member passes its mark, so the probe asks whether the
/// shared router still sends this member's requests here.
pub async fn prove_handed_back<T: Transport>(
    transport: &T,
    qualified: &str,
    routes: &[PortRoute],
    mark: Option<&str>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + HANDBACK_TIMEOUT;
    for route in routes {
        let path = probe_path(route, mark);
        if let Err(reason) = in_a_row(transport, &path, Want::Elsewhere, deadline).await {
            anyhow::bail!(
                "callers of Service {qualified} port {} still do not reach another endpoint after {HANDBACK_TIMEOUT:?} ({})",
                route.service_port,
                reason.trim()
            );
        }
    }
    Ok(())
}

/// Which answer a proof waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Connections arrive at the agent.
    Here,
    /// Connections arrive at another endpoint.
    Elsewhere,
}

/// Probes `path` until [`IN_A_ROW`] answers in a row are `want`; past
/// `deadline`, the reason the last probe gave.
async fn in_a_row<T: Transport>(
    transport: &T,
    path: &str,
    want: Want,
    deadline: Instant,
) -> Result<(), String> {
    let mut seen = 0;
    loop {
        let reason = match (probe(transport, path).await, want) {
            (Probed::Here, Want::Here) | (Probed::Elsewhere, Want::Elsewhere) => {
                seen += 1;
                if seen == IN_A_ROW {
                    return Ok(());
                }
                tokio::time::sleep(IN_A_ROW_EVERY).await;
                continue;
            }
            (Probed::Here, Want::Elsewhere) => "they still arrive here".to_owned(),
            (Probed::Elsewhere, Want::Here) => "another endpoint took the connection".to_owned(),
            (Probed::Unknown(reason), _) => reason,
        };
        seen = 0;
        if Instant::now() >= deadline {
            return Err(reason);
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

fn probe_path(route: &PortRoute, mark: Option<&str>) -> String {
    let mark = mark.map(|m| format!("&mark={m}")).unwrap_or_default();
    format!(
        "/probe?port={}&target={}{mark}",
        route.service_port, route.target_port
    )
}

/// Asks the agent for one probe.
async fn probe<T: Transport>(transport: &T, path: &str) -> Probed {
    match tokio::time::timeout(REQUEST_TIMEOUT, get(transport, path)).await {
        Ok(Ok((200, _))) => Probed::Here,
        Ok(Ok((409, _))) => Probed::Elsewhere,
        Ok(Ok((_, answer))) => Probed::Unknown(answer),
        Ok(Err(e)) => Probed::Unknown(format!("cannot ask the agent: {e}")),
        Err(_) => Probed::Unknown(format!(
            "the agent did not answer within {REQUEST_TIMEOUT:?}"
        )),
    }
}
