//! The agent pod of a session and what it needs: the session's public key
//! (in its environment: nothing secret enters the cluster; the private half
//! never leaves the laptop), and a ServiceAccount whose Role allows exactly
//! what the agent may have to do on its own when the laptop vanishes
//! (get/patch the exchanged Service, get/delete the session's Lease).
//! Exchange calls it the shadow pod; `ktb connect` runs the same pod in
//! connect role, with no Service. Its tunnel endpoint listens on the pod's
//! loopback, which a port-forward reaches and the pod network does not,
//! unless the laptop dials the pod IP itself (`--transport direct`); the
//! kubelet's readiness probe has a port of its own.
//!
//! Every object is owned by the session's Lease, so the garbage collector
//! removes them when the Lease goes, whoever deletes it; the CLI still
//! deletes them explicitly on exit so nothing lingers while GC catches up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccount, Sysctl,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::Client;

use ktb_kube::names::{
    AGENT_DRAIN_LIMIT_SECS, AGENT_EXIT_MARGIN_SECS, AGENT_READY_PORT, AGENT_TUNNEL_PORT,
    MANAGED_LABEL, MANAGED_VALUE, SESSION_LABEL,
};
use ktb_kube::workload::Kind;

use crate::target::DeclaredPort;

/// The agent image a release of ktb runs unless told otherwise
/// (`--agent-image`, config key `agent-image`): the one the release
/// workflow pushes for this version (`.github/workflows/release.yml`).
/// Clusters that cannot pull it mirror it (`ktb agent image export`).
pub const DEFAULT_AGENT_IMAGE: &str =
    concat!("ghcr.io/ktb-dev/ktb-agent:", env!("CARGO_PKG_VERSION"));

/// How to run agent pods, as the developer configured it (`--agent-image`,
/// `--image-pull-policy`, `--ready-timeout`); the same for every command.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The image reference, [`DEFAULT_AGENT_IMAGE`] unless configured
    /// (a mirror, `ktb.test/ktb-agent:dev` on the test cluster).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`, as Kubernetes spells it.
    pub pull_policy: String,
    /// How long the pod may take to become ready.
    pub ready_timeout: Duration,
}

/// What the agent does, which decides its environment and its Role.
pub enum AgentRole<'a> {
    /// Stands in for callers of `service` (exchange, a mesh member,
    /// preview) on `listen_ports`, the target ports of the exposed Service
    /// ports, and carries them to the laptop; `key` is the session's public
    /// key (64 hex digits): the agent accepts only a client proving it holds
    /// the private half. Its dead man's switch restores `service` only while
    /// the Service is marked with this session.
    Shadow {
        service: &'a str,
        listen_ports: Vec<u16>,
        key: String,
    },
    /// Dials inside the cluster for the laptop (`ktb connect`); `key` as above.
    Connect { key: String },
    /// The shared router of the meshed `service`: listens on each target
    /// port of `routes` and sends unmarked traffic to the origin address
    /// paired with it. Accepts no tunnel, so holds no key.
    MeshRouter {
        service: &'a str,
        routes: Vec<(u16, std::net::SocketAddr)>,
    },
}

/// What the agent pod is for.
pub struct AgentPodSpec<'a> {
    pub name: &'a str,
    pub session: &'a str,
    pub role: AgentRole<'a>,
    pub lease: String,
    /// Whether the tunnel endpoint listens on the pod network (the laptop
    /// dials the pod IP, `--transport direct`) rather than on loopback only.
    pub tunnel_on_pod_network: bool,
    /// Every port the Service targets, as the pod declares them; empty in
    /// connect role.
    pub declared_ports: Vec<DeclaredPort>,
    pub settings: &'a AgentSettings,
    pub grace: Duration,
    pub owner: OwnerReference,
    /// The labels the pod carries: the session's own (selector mode), or the
    /// workload's pod labels plus the session's (scale mode).
    pub labels: BTreeMap<String, String>,
    /// Scale mode: the workload the agent may have to scale back.
    pub scaled: Option<(Kind, String)>,
}

/// The objects of one session, for cleanup.
pub struct AgentPod {
    client: Client,
    namespace: String,
    pub name: String,
}

/// The labels that mark an object as this session's.
pub fn session_labels(session: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (SESSION_LABEL.to_owned(), session.to_owned()),
        (MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned()),
    ])
}

/// The metadata of an object a session creates: its name, the session's
/// labels, and the session's Lease as its owner (garbage collection
/// removes it with the Lease).
pub fn session_meta(name: &str, session: &str, owner: OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(session_labels(session)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

impl AgentPodSpec<'_> {
    fn meta(&self) -> ObjectMeta {
        session_meta(self.name, self.session, self.owner.clone())
    }

    fn role(&self) -> Role {
        let rule = |group: &str, resource: &str, name: &str, verbs: &[&str]| PolicyRule {
            api_groups: Some(vec![group.into()]),
            resources: Some(vec![resource.into()]),
            resource_names: Some(vec![name.into()]),
            verbs: verbs.iter().map(|v| (*v).into()).collect(),
            ..PolicyRule::default()
        };
        let (service, lease_verbs): (_, &[&str]) = match &self.role {
            AgentRole::Shadow { service, .. } => (Some(*service), &["get", "delete"]),
            AgentRole::Connect { .. } => (None, &["get", "delete"]),
            // The router renews its own Lease and reads every member's.
            AgentRole::MeshRouter { service, .. } => (Some(*service), &["get", "patch", "delete"]),
        };
        let members = matches!(self.role, AgentRole::MeshRouter { .. }).then(|| PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".into()]),
            resources: Some(vec!["leases".into()]),
            verbs: vec!["list".into()],
            ..PolicyRule::default()
        });
        Role {
            metadata: self.meta(),
            rules: Some(
                [
                    service.map(|service| rule("", "services", service, &["get", "patch"])),
                    Some(rule(
                        "coordination.k8s.io",
                        "leases",
                        &self.lease,
                        lease_verbs,
                    )),
                    members,
                    self.scaled.as_ref().map(|(kind, name)| {
                        rule(
                            "apps",
                            &format!("{}/scale", kind.resource()),
                            name,
                            &["get", "patch"],
                        )
                    }),
                ]
                .into_iter()
                .flatten()
                .collect(),
            ),
        }
    }

    fn role_binding(&self, namespace: &str) -> RoleBinding {
        RoleBinding {
            metadata: self.meta(),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: self.name.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: self.name.into(),
                namespace: Some(namespace.into()),
                ..Subject::default()
            }]),
        }
    }

    fn pod(&self) -> Pod {
        let mut meta = self.meta();
        meta.labels = Some(self.labels.clone());
        Pod {
            metadata: meta,
            spec: Some(PodSpec {
                service_account_name: Some(self.name.into()),
                restart_policy: Some("OnFailure".into()),
                termination_grace_period_seconds: Some(
                    (AGENT_DRAIN_LIMIT_SECS + AGENT_EXIT_MARGIN_SECS) as i64,
                ),
                security_context: Some(pod_security()),
                containers: vec![self.container()],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn container(&self) -> Container {
        Container {
            name: "agent".into(),
            image: Some(self.settings.image.clone()),
            image_pull_policy: Some(self.settings.pull_policy.clone()),
            env: Some(self.env()),
            ports: Some(self.container_ports()),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/readyz".into()),
                    port: IntOrString::Int(i32::from(AGENT_READY_PORT)),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(1),
                ..Probe::default()
            }),
            resources: Some(agent_resources()),
            security_context: Some(container_security()),
            ..Container::default()
        }
    }

    fn env(&self) -> Vec<EnvVar> {
        let env = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            ..EnvVar::default()
        };
        let tunnel_ip = if self.tunnel_on_pod_network {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let tunnel = |key: &str| {
            [
                env("KTB_AGENT_CLIENT_KEY", key.into()),
                env(
                    "KTB_AGENT_LISTEN",
                    format!("{tunnel_ip}:{AGENT_TUNNEL_PORT}"),
                ),
            ]
        };
        let role = match &self.role {
            AgentRole::Shadow {
                service,
                listen_ports,
                key,
            } => {
                let ports = listen_ports.iter().map(u16::to_string);
                let mut role = vec![
                    env("KTB_AGENT_SERVICE", (*service).into()),
                    env(
                        "KTB_AGENT_EXPOSE_PORTS",
                        ports.collect::<Vec<_>>().join(","),
                    ),
                ];
                role.extend(tunnel(key));
                role
            }
            AgentRole::Connect { key } => {
                let mut role = vec![env("KTB_AGENT_CONNECT", "true".into())];
                role.extend(tunnel(key));
                role
            }
            AgentRole::MeshRouter { service, routes } => {
                let routes = routes
                    .iter()
                    .map(|(port, origin)| format!("{port}={origin}"));
                vec![
                    env("KTB_AGENT_MESH_OF", (*service).into()),
                    env("KTB_AGENT_ROUTES", routes.collect::<Vec<_>>().join(",")),
                ]
            }
        };
        let namespace = EnvVar {
            name: "KTB_AGENT_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        };
        role.into_iter()
            .chain([
                env(
                    "KTB_AGENT_READY_LISTEN",
                    format!("0.0.0.0:{AGENT_READY_PORT}"),
                ),
                env("KTB_AGENT_LEASE", self.lease.clone()),
                env("KTB_AGENT_SESSION", self.session.into()),
                env("KTB_AGENT_GRACE", format!("{}s", self.grace.as_secs())),
                env("KTB_AGENT_LOG_FORMAT", "json".into()),
                namespace,
            ])
            .collect()
    }

    /// The readiness port, and every port the Service targets under the name
    /// the workload gives it: a Service whose `targetPort` is a name only
    /// reaches pods that declare a port of that name.
    fn container_ports(&self) -> Vec<ContainerPort> {
        let ready = ContainerPort {
            name: Some("ktb-ready".into()),
            container_port: i32::from(AGENT_READY_PORT),
            ..ContainerPort::default()
        };
        let targets = self.declared_ports.iter().map(|p| ContainerPort {
            name: p.name.clone(),
            container_port: i32::from(p.number),
            protocol: Some(p.protocol.clone()),
            ..ContainerPort::default()
        });
        std::iter::once(ready).chain(targets).collect()
    }
}

/// Non-root, no privilege escalation, seccomp on.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        // Lets the non-root agent listen on the Service's target port even
        // below 1024; a "safe" sysctl, namespaced to the pod.
        sysctls: Some(vec![Sysctl {
            name: "net.ipv4.ip_unprivileged_port_start".into(),
            value: "0".into(),
        }]),
        ..PodSecurityContext::default()
    }
}

/// Read-only root, every capability dropped.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Small requests so any node fits the agent; a memory limit so a flood
/// cannot take the node's memory with it, above the most the agent can be
/// made to buffer (see `deploy/README.md`).
fn agent_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("10m".into())),
            ("memory".to_owned(), Quantity("16Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("384Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

impl AgentPod {
    /// The objects of a session by name, e.g. to clean up after an
    /// interrupted start.
    pub fn existing(client: &Client, namespace: &str, name: &str) -> AgentPod {
        AgentPod {
            client: client.clone(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Creates the objects in dependency order; on failure, deletes what
    /// was created before returning the error.
    pub async fn create(
        client: &Client,
        namespace: &str,
        spec: &AgentPodSpec<'_>,
    ) -> anyhow::Result<AgentPod> {
        let pod = AgentPod {
            client: client.clone(),
            namespace: namespace.into(),
            name: spec.name.into(),
        };
        if let Err(e) = pod.create_all(spec).await {
            pod.delete().await;
            return Err(e);
        }
        Ok(pod)
    }

    async fn create_all(&self, spec: &AgentPodSpec<'_>) -> anyhow::Result<()> {
        let pp = PostParams::default();
        let ns = self.namespace.as_str();
        let account = ServiceAccount {
            metadata: spec.meta(),
            ..ServiceAccount::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&pp, &account)
            .await
            .context("cannot create the agent's ServiceAccount")?;
        Api::<Role>::namespaced(self.client.clone(), ns)
            .create(&pp, &spec.role())
            .await
            .context("cannot create the agent's Role")?;
        Api::<RoleBinding>::namespaced(self.client.clone(), ns)
            .create(&pp, &spec.role_binding(ns))
            .await
            .context("cannot create the agent's RoleBinding")?;
        Api::<Pod>::namespaced(self.client.clone(), ns)
            .create(&pp, &spec.pod())
            .await
            .context("cannot create the agent pod")?;
        Ok(())
    }

    /// Waits until the pod is Ready, failing early on errors that will not
    /// fix themselves (image not found, crash loop).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let pod = pods
                .get(&self.name)
                .await
                .context("cannot read the agent pod")?;
            let status = pod.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                return Ok(());
            }
            let waiting = status
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                .find(|w| {
                    matches!(
                        w.reason.as_deref(),
                        Some(
                            "ErrImagePull"
                                | "ImagePullBackOff"
                                | "ErrImageNeverPull"
                                | "CrashLoopBackOff"
                                | "CreateContainerConfigError"
                                | "InvalidImageName"
                        )
                    )
                });
            if let Some(waiting) = waiting {
                anyhow::bail!(
                    "the agent pod cannot start: {} ({})",
                    waiting.reason.clone().unwrap_or_default(),
                    waiting.message.clone().unwrap_or_default()
                );
            }
            if status.phase.as_deref() == Some("Failed") {
                anyhow::bail!(
                    "the agent pod failed: {}",
                    status.message.unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the agent pod was not ready within {timeout:?} (phase {})",
                    status.phase.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The pod's IP, once it has one.
    pub async fn pod_ip(&self) -> anyhow::Result<std::net::IpAddr> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get(&self.name)
            .await?;
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .context("the agent pod has no IP")?;
        ip.parse().with_context(|| format!("invalid pod IP {ip}"))
    }

    /// Deletes the pod gracefully: its endpoints stop counting it as ready
    /// at once, while the agent keeps serving the callers kube-proxy still
    /// sends it until the laptop detaches (see `ktb-agent`'s drain).
    pub async fn retire(&self) -> anyhow::Result<()> {
        match delete::<Pod>(
            &self.client,
            &self.namespace,
            &self.name,
            &DeleteParams::default(),
        )
        .await
        {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete agent pod {}", self.name)),
        }
    }

    /// Deletes every object of the session; missing ones are fine.
    pub async fn delete(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::background()
        };
        let ns = self.namespace.as_str();
        let name = self.name.as_str();
        let results = [
            delete::<Pod>(&self.client, ns, name, &dp).await,
            delete::<RoleBinding>(&self.client, ns, name, &dp).await,
            delete::<Role>(&self.client, ns, name, &dp).await,
            delete::<ServiceAccount>(&self.client, ns, name, &dp).await,
        ];
        for result in results {
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not delete a session object (the Lease's garbage collection will)")
                }
            }
        }
    }
}

async fn delete<K>(
    client: &Client,
    ns: &str,
    name: &str,
    dp: &DeleteParams,
) -> Result<(), kube::Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .delete(name, dp)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::permissions::{self, Command};

    /// Kubernetes lets nobody create a Role granting what they do not hold
    /// (escalation prevention): every verb of an agent's Role must be among
    /// the verbs its command checks and its Role file grants.
    #[test]
    fn an_agents_role_never_grants_more_than_its_creator_is_checked_for() {
        let settings = AgentSettings {
            image: "ktb-agent".into(),
            pull_policy: "Never".into(),
            ready_timeout: Duration::from_secs(1),
        };
        let shadow = || AgentRole::Shadow {
            service: "web",
            listen_ports: vec![8080],
            key: "00".repeat(32),
        };
        let router = || AgentRole::MeshRouter {
            service: "web",
            routes: Vec::new(),
        };
        let connect = || AgentRole::Connect {
            key: "00".repeat(32),
        };
        let cases: [(AgentRole, Option<Kind>, Vec<crate::permissions::Need>); 7] = [
            (shadow(), None, permissions::exchange(None)),
            (
                shadow(),
                Some(Kind::Deployment),
                permissions::exchange(Some(Kind::Deployment)),
            ),
            (
                shadow(),
                Some(Kind::StatefulSet),
                permissions::exchange(Some(Kind::StatefulSet)),
            ),
            (shadow(), None, Command::Mesh.needs()),
            (router(), None, Command::Mesh.needs()),
            (shadow(), None, Command::Preview.needs()),
            (connect(), None, permissions::connect(false, false)),
        ];
        for (role, scaled, needs) in cases {
            let spec = AgentPodSpec {
                name: "ktb-web-1",
                session: "1",
                role,
                lease: "ktb-exchange-web".into(),
                tunnel_on_pod_network: false,
                declared_ports: Vec::new(),
                settings: &settings,
                grace: Duration::from_secs(30),
                owner: OwnerReference::default(),
                labels: session_labels("1"),
                scaled: scaled.map(|kind| (kind, "web".to_owned())),
            };
            for rule in spec.role().rules.unwrap_or_default() {
                for group in rule.api_groups.iter().flatten() {
                    for resource in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            let (resource, sub) =
                                resource.split_once('/').unwrap_or((resource, ""));
                            assert!(
                                needs.iter().any(|n| n.verb == verb
                                    && n.group == group
                                    && n.resource == resource
                                    && n.subresource == sub),
                                "the agent's Role grants {verb} {resource}/{sub} ({group}), \
                                 which its creator is not checked for: {needs:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
