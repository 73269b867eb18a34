//! `ktb mesh`: several developers share one Service; only requests
//! carrying a developer's mark reach that developer's laptop, all others
//! reach the original pods.
//!
//! Each developer is a member: a Lease of their own (`ktb-mesh-<svc>-<session>`,
//! labelled with the Service, carrying the mark) that owns their agent pod,
//! exactly like an exchange's shadow, except that nothing points the
//! Service at it. The Service points at one shared router instead
//! ([`router`]), which the first member creates and which routes each
//! request by the marks it reads from the member Leases.
//!
//! The phases, undone in reverse on failure or exit: check the Service and
//! ports (read-only) → check permissions → refuse if it is exchanged or the
//! mark is taken → take the member Lease → start the agent pod and the
//! tunnel → record the pod's IP on the Lease → make sure the router stands
//! → prove that a marked request reaches this laptop → serve, renewing the
//! Lease, until Ctrl-C → delete the agent pod and the member Lease → if no
//! member is left, wait for the router to restore the Service.
//! Nothing here ever changes another member's Lease; the router is changed
//! only through its own Lease's rules ([`router`]).

pub mod router;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use rand::Rng;

use ktb_kube::lease::{self, Kind as LeaseKind, Owner};
use ktb_kube::names::{
    exchange_lease, mesh_member_lease, session_objects, MARK_ANNOTATION, SERVICE_LABEL,
    UPSTREAM_ANNOTATION,
};
use ktb_proto::auth::ClientKey;

use crate::cluster::Cluster;
use crate::expose::ExposeArg;
use crate::permissions::Command;
use crate::preflight;
use crate::refusal::Refusal;
use crate::report::Reporter;
use crate::session as sessions;
use crate::session::agent_pod::{session_labels, AgentPodSpec, AgentRole, AgentSettings};
use crate::session::keep_alive::keep_alive;
use crate::session::lock::{self, Lock, Taken};
use crate::session::shadow::{Shadow, TransportKind};
use crate::target::{self, PortRoute};
use crate::tunnel::RunningTunnel;

/// Everything `mesh` is told.
pub struct MeshOptions {
    pub service: String,
    pub exposes: Vec<ExposeArg>,
    /// The developer's own mark; `None` generates one.
    pub mark: Option<Mark>,
    pub transport: TransportKind,
    pub grace: Duration,
    pub agent: AgentSettings,
}

/// The header of a generated mark.
pub const DEFAULT_MARK_HEADER: &str = "x-ktb-mark";

/// A request's mark, `NAME=VALUE`: a valid header name (kept lowercase)
/// and value that the agent's probe accepts, each of letters, digits, `.`,
/// `_` and `-`. Parsed where the command line is, so a malformed one is a
/// usage error before anything reaches the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub header: String,
    pub value: String,
}

impl std::str::FromStr for Mark {
    type Err = String;

    fn from_str(text: &str) -> Result<Mark, String> {
        match ktb_kube::mesh::split_mark(text) {
            Some((header, value)) => Ok(Mark {
                header: header.to_ascii_lowercase(),
                value: value.to_owned(),
            }),
            None => Err(format!(
                "expected NAME=VALUE, each of letters, digits, '.', '_' or '-' \
                 (e.g. --header {DEFAULT_MARK_HEADER}=alice)"
            )),
        }
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.header, self.value)
    }
}

/// A mark of this developer's own: their user name (made header-safe) and
/// a random suffix, so two sessions of one developer do not collide.
fn generated_mark(owner: &Owner) -> Mark {
    let user: String = owner
        .user
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    Mark {
        header: DEFAULT_MARK_HEADER.to_owned(),
        value: format!(
            "{}-{:04x}",
            user.trim_matches('-'),
            rand::rng().random::<u16>()
        ),
    }
}

/// Runs a membership until `shutdown` completes; what it changed is undone
/// whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: MeshOptions,
    reporter: &Reporter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let ns = cluster.namespace.clone();
    let services = Api::<Service>::namespaced(cluster.client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), &ns);
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    let name = target::service_name(&options.service);
    let qualified = format!("{ns}/{name}");

    let original = target::exchangeable_service(&services, &name, &ns).await?;
    let routes = target::resolve_ports(&pods, &original, &options.exposes).await?;
    let declared = target::declared_ports(&pods, &original).await;
    preflight::check(cluster, Command::Mesh, &Command::Mesh.needs()).await?;
    refuse_if_exchanged(&leases, &name, &qualified).await?;

    let owner = sessions::owner(cluster).await?;
    let mark = options
        .mark
        .clone()
        .unwrap_or_else(|| generated_mark(&owner))
        .to_string();
    refuse_if_mark_taken(&leases, &name, &mark).await?;
    let lock = take_membership(&leases, &name, &owner, &mark, options.grace).await?;

    let objects = session_objects(&name, &owner.session);
    let member = Member {
        name: &name,
        qualified: &qualified,
        owner: &owner,
        mark: &mark,
        routes: &routes,
        declared: &declared,
    };
    let outcome = tokio::select! {
        outcome = join(cluster, &options, &member, &lock, &original, reporter) => outcome,
        _ = &mut shutdown => Err(Interrupted.into()),
    };
    let mut tunnel = match outcome {
        Ok(tunnel) => tunnel,
        Err(e) => {
            reporter.progress("undoing what this session changed");
            sessions::end(cluster, &objects, &lock, reporter).await;
            router::after_leave(cluster, &name, reporter).await;
            return if e.is::<Interrupted>() {
                Ok(())
            } else {
                Err(e)
            };
        }
    };
    let served = keep_alive(&lock, reporter, &mut shutdown).await;
    if served.is_ok() {
        leave_routes(&lock, reporter).await;
    }
    tunnel.stop().await;
    sessions::end(cluster, &objects, &lock, reporter).await;
    router::after_leave(cluster, &name, reporter).await;
    served.map_err(anyhow::Error::from)
}

/// How long the router may take to see a change of the member Leases: it
/// reads them every second, so this is two of its rounds and a slow answer
/// from the apiserver.
const ROUTER_SEES_WITHIN: Duration = Duration::from_millis(2500);

/// Takes this member out of the router's table before its agent goes, so
/// requests carrying our mark reach the original pods instead of an agent
/// that is no longer there: the upstream is withdrawn from the Lease (it
/// still counts as a member, so the router does not tear down meanwhile),
/// and the router is given the time to read it.
async fn leave_routes(lock: &Lock, reporter: &Reporter) {
    let withdrawn = BTreeMap::from([(UPSTREAM_ANNOTATION.to_owned(), "leaving".to_owned())]);
    match lock.annotate(&withdrawn).await {
        Ok(()) => tokio::time::sleep(ROUTER_SEES_WITHIN).await,
        Err(e) => reporter.warn(format!("{e:#}")),
    }
}

/// The user stopped ktb before the membership was up; not an error.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// What was decided before the member Lease was taken.
struct Member<'a> {
    name: &'a str,
    qualified: &'a str,
    owner: &'a Owner,
    /// `name=value`, the header name in lower case.
    mark: &'a str,
    routes: &'a [PortRoute],
    declared: &'a [target::DeclaredPort],
}

/// A Service one developer exchanges has no room for a mesh.
async fn refuse_if_exchanged(
    leases: &Api<Lease>,
    name: &str,
    qualified: &str,
) -> anyhow::Result<()> {
    if let Some(lock) = leases.get_opt(&exchange_lease(name)).await? {
        return Err(Refusal::Held(format!(
            "Service {qualified} is exchanged by {}: all its traffic goes to their laptop, so it cannot be meshed. \
             Ask them to stop (if their session is dead, `ktb recover {name}` restores it)",
            lease::holder(&lock)
        ))
        .into());
    }
    Ok(())
}

async fn refuse_if_mark_taken(leases: &Api<Lease>, name: &str, mark: &str) -> anyhow::Result<()> {
    let members = ktb_kube::mesh::members(leases, name).await?;
    if let Some(taken) = members.iter().find(|m| m.mark.eq_ignore_ascii_case(mark)) {
        return Err(Refusal::Held(format!(
            "the mark {mark} is already used on Service {name} by {}; choose another with --header NAME=VALUE",
            taken.holder
        ))
        .into());
    }
    Ok(())
}

/// The member Lease: new for every session, so it is always ours fresh.
async fn take_membership(
    leases: &Api<Lease>,
    name: &str,
    owner: &Owner,
    mark: &str,
    grace: Duration,
) -> anyhow::Result<Lock> {
    let mut wanted = lease::new_lease(
        &mesh_member_lease(name, &owner.session),
        LeaseKind::Mesh,
        owner,
        grace,
    );
    let meta = &mut wanted.metadata;
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(SERVICE_LABEL.into(), name.into());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(MARK_ANNOTATION.into(), mark.into());
    match lock::take(leases, &wanted).await? {
        Taken::Fresh(lock) => Ok(lock),
        Taken::Held(holder) | Taken::Expired { holder, .. } => anyhow::bail!(
            "the member Lease of this session is held by {holder}: a session id collided; try again"
        ),
    }
}

/// Starts this member's agent, the router if none stands, and proves that
/// a marked request reaches this laptop.
async fn join(
    cluster: &Cluster,
    options: &MeshOptions,
    member: &Member<'_>,
    lock: &Lock,
    original: &Service,
    reporter: &Reporter,
) -> anyhow::Result<RunningTunnel> {
    let objects = session_objects(member.name, &member.owner.session);
    let key = ClientKey::generate()?;
    let spec = AgentPodSpec {
        name: &objects,
        session: &member.owner.session,
        role: AgentRole::Shadow {
            service: member.name,
            listen_ports: member.routes.iter().map(|r| r.target_port).collect(),
            key: key.public().to_string(),
        },
        lease: lock.name(),
        tunnel_on_pod_network: options.transport.dials_pod_ip(),
        declared_ports: member.declared.to_vec(),
        settings: &options.agent,
        grace: options.grace,
        owner: lock.owner(),
        labels: session_labels(&member.owner.session),
        scaled: None,
    };
    let shadow = Shadow::start(cluster, &spec, options.transport, reporter).await?;
    let started = async {
        let tunnel = shadow.open_tunnel(member.routes, key, reporter).await?;
        lock.annotate(&BTreeMap::from([(
            UPSTREAM_ANNOTATION.to_owned(),
            shadow.ip().to_string(),
        )]))
        .await?;
        router::ensure(
            cluster,
            original,
            member.declared,
            member.owner,
            options,
            reporter,
        )
        .await?;
        reporter.progress("checking that requests carrying the mark arrive here");
        shadow
            .prove(member.qualified, member.routes, Some(member.mark))
            .await?;
        Ok::<_, anyhow::Error>(tunnel)
    };
    match started.await {
        Ok(tunnel) => {
            announce(cluster, member, reporter);
            Ok(tunnel)
        }
        Err(e) => {
            shadow.pod.delete().await;
            Err(e)
        }
    }
}

fn announce(cluster: &Cluster, member: &Member<'_>, reporter: &Reporter) {
    let (header, value) = member.mark.split_once('=').unwrap_or((member.mark, ""));
    let ports = member
        .routes
        .iter()
        .map(|r| format!("port {} → 127.0.0.1:{}", r.service_port, r.local))
        .collect::<Vec<_>>()
        .join(", ");
    let first = member.routes.first().map(|r| r.service_port).unwrap_or(80);
    reporter.progress(format!(
        "✔ requests to Service {} carrying {header}: {value} (or a baggage entry {header}={value}) now reach this machine: {ports}; \
         all others reach its pods. Every service on the way must pass the header on",
        member.qualified
    ));
    reporter.progress(format!(
        "  try: curl -H '{header}: {value}' http://{}.{}.svc:{first}/ . Ctrl-C leaves the mesh",
        member.name, cluster.namespace
    ));
}

#[cfg(test)]
mod tests {
    use super::Mark;

    #[test]
    fn a_mark_is_name_equals_value_with_the_name_in_lower_case() {
        let mark: Mark = "X-Dev=alice.1".parse().unwrap();
        assert_eq!(mark.header, "x-dev");
        assert_eq!(mark.value, "alice.1");
        assert_eq!(mark.to_string(), "x-dev=alice.1");
        for bad in ["bad header", "x-mark", "=a", "a=", "a=b=c", "a=b c"] {
            let refused = bad.parse::<Mark>().expect_err(bad);
            assert!(refused.contains("expected NAME=VALUE"), "{bad}: {refused}");
        }
    }
}
