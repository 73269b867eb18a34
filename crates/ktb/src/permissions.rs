//! What each command may have to do in a namespace: the one list, per
//! command, of the verbs ktb uses there.
//!
//! Three readers share these lists, so none of them can drift from the
//! code: every command's [`preflight`](crate::preflight) checks its own
//! before changing anything, `ktb doctor` checks every command's, and the
//! Roles in `deploy/rbac/` grant exactly them (a unit test parses those
//! files and compares: `deploy/rbac/<command>.yaml` grants one command's
//! verbs and nothing else, `developer.yaml` all of them).
//!
//! Some verbs exist only because an agent pod's own Role holds them:
//! Kubernetes lets nobody create a Role granting more than they hold
//! themselves (RBAC escalation prevention), so the developer needs every
//! verb their agent's Role names (`session::agent_pod` tests that).

use ktb_kube::workload::Kind;

/// One permission: a verb on a resource (and subresource) in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// `get`, `list`, `create`, `patch`, `delete`.
    pub verb: &'static str,
    /// The API group: `""` (core), `apps`, `coordination.k8s.io`, …
    pub group: &'static str,
    /// `pods`, `services`, `leases`, …
    pub resource: &'static str,
    /// `portforward`, `scale`, or `""` for the resource itself.
    pub subresource: &'static str,
}

pub const fn need(verb: &'static str, group: &'static str, resource: &'static str) -> Need {
    Need {
        verb,
        group,
        resource,
        subresource: "",
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        Ok(())
    }
}

/// The file with the Role that grants every command's verbs at once.
pub const DEVELOPER_ROLE_FILE: &str = "deploy/rbac/developer.yaml";

/// A command, as far as permissions go: each variant has a Role file of
/// its own in `deploy/rbac/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `ktb exchange` in selector mode, the default.
    Exchange,
    /// `ktb exchange --mode scale`, on a Deployment or a StatefulSet.
    ExchangeScale,
    /// `ktb mesh`, as a member that may also be the one creating the router.
    Mesh,
    /// `ktb preview`.
    Preview,
    /// `ktb forward`.
    Forward,
    /// `ktb connect`, discovering the ranges (its default) or with `--dns hosts`.
    Connect,
    /// `ktb status` in one namespace.
    Status,
    /// `ktb recover`.
    Recover,
    /// `ktb clean` (not `--local`, which touches only this machine).
    Clean,
}

impl Command {
    /// Every command, in the order `ktb doctor` lists them.
    pub const ALL: [Command; 9] = [
        Command::Exchange,
        Command::ExchangeScale,
        Command::Mesh,
        Command::Preview,
        Command::Forward,
        Command::Connect,
        Command::Status,
        Command::Recover,
        Command::Clean,
    ];

    /// How it is typed: `exchange`, `exchange --mode scale`, …
    pub fn invocation(self) -> &'static str {
        match self {
            Command::Exchange => "exchange",
            Command::ExchangeScale => "exchange --mode scale",
            Command::Mesh => "mesh",
            Command::Preview => "preview",
            Command::Forward => "forward",
            Command::Connect => "connect",
            Command::Status => "status",
            Command::Recover => "recover",
            Command::Clean => "clean",
        }
    }

    /// The file whose Role grants this command's verbs and no other:
    /// `deploy/rbac/exchange.yaml`, …
    pub fn role_file(self) -> &'static str {
        match self {
            Command::Exchange => "deploy/rbac/exchange.yaml",
            Command::ExchangeScale => "deploy/rbac/exchange-scale.yaml",
            Command::Mesh => "deploy/rbac/mesh.yaml",
            Command::Preview => "deploy/rbac/preview.yaml",
            Command::Forward => "deploy/rbac/forward.yaml",
            Command::Connect => "deploy/rbac/connect.yaml",
            Command::Status => "deploy/rbac/status.yaml",
            Command::Recover => "deploy/rbac/recover.yaml",
            Command::Clean => "deploy/rbac/clean.yaml",
        }
    }

    /// The name of that Role: `ktb-exchange`, `ktb-exchange-scale`, …
    pub fn role_name(self) -> String {
        let file = self.role_file();
        let stem = file
            .strip_prefix("deploy/rbac/")
            .and_then(|f| f.strip_suffix(".yaml"))
            .unwrap_or(file);
        format!("ktb-{stem}")
    }

    /// Every verb the command may need, whichever way it is run: what
    /// `ktb doctor` checks and the command's Role grants. A command run
    /// checks the part its flags and the cluster call for.
    pub fn needs(self) -> Vec<Need> {
        match self {
            Command::Exchange => exchange(None),
            Command::ExchangeScale => union(&[
                &exchange(Some(Kind::Deployment)),
                &exchange(Some(Kind::StatefulSet)),
            ]),
            Command::Mesh => union(&[MESH, AGENT]),
            Command::Preview => union(&[PREVIEW, AGENT]),
            Command::Forward => FORWARD.to_vec(),
            Command::Connect => connect(true, true),
            Command::Status => STATUS.to_vec(),
            Command::Recover => union(&[RECOVER, SCALE_BACK]),
            Command::Clean => union(&[CLEAN, SCALE_BACK]),
        }
    }
}

/// `lists` concatenated, each permission once, in first-seen order.
fn union(lists: &[&[Need]]) -> Vec<Need> {
    let mut all: Vec<Need> = Vec::new();
    for need in lists.iter().flat_map(|list| list.iter()) {
        if !all.contains(need) {
            all.push(*need);
        }
    }
    all
}

const fn sub(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
) -> Need {
    Need {
        verb,
        group,
        resource,
        subresource,
    }
}

/// Verbs to start an agent pod for a session and reach it: the pod, its
/// ServiceAccount and RBAC, the session Lease. Every command that starts one
/// needs them (exchange, mesh, preview, connect, and `ktb doctor`'s
/// throwaway agent).
pub const AGENT: &[Need] = &[
    need("create", "", "pods"),
    need("get", "", "pods"),
    need("delete", "", "pods"),
    // kube's port-forward is a WebSocket, authorized as `get`; from
    // Kubernetes 1.35 the apiserver also requires `create` for it.
    sub("get", "", "pods", "portforward"),
    sub("create", "", "pods", "portforward"),
    need("create", "", "serviceaccounts"),
    need("delete", "", "serviceaccounts"),
    need("create", "rbac.authorization.k8s.io", "roles"),
    need("delete", "rbac.authorization.k8s.io", "roles"),
    need("create", "rbac.authorization.k8s.io", "rolebindings"),
    need("delete", "rbac.authorization.k8s.io", "rolebindings"),
    // create also reads the apiserver's clock (a dry-run create); get: the
    // agent's Role may read its Lease, which its creator must hold.
    need("create", "coordination.k8s.io", "leases"),
    need("get", "coordination.k8s.io", "leases"),
    need("patch", "coordination.k8s.io", "leases"),
    need("delete", "coordination.k8s.io", "leases"),
];

/// Exchange, every mode, on top of the agent's: the Service (read, then
/// repointed; the agent's Role may restore it), its pods (what a named
/// target port means, which workload is behind it), reading the holder of
/// the Service's Lease and who meshes the Service, to refuse naming them.
const EXCHANGE: &[Need] = &[
    need("get", "", "services"),
    need("patch", "", "services"),
    need("list", "", "pods"),
    need("get", "coordination.k8s.io", "leases"),
    need("list", "coordination.k8s.io", "leases"),
];

/// What `exchange` needs: every mode's verbs, and in scale mode (`Some`
/// with the kind of workload found behind the Service) its scale
/// subresource and the ReplicaSet between a Deployment and its pods. The
/// agent's Role may scale the workload back, so `get` and `patch` on the
/// subresource both count.
pub fn exchange(scale: Option<Kind>) -> Vec<Need> {
    let mut needs = union(&[EXCHANGE, AGENT]);
    if let Some(kind) = scale {
        let (resource, group) = (kind.resource(), "apps");
        needs.extend([
            need("get", group, "replicasets"),
            need("get", group, resource),
            sub("get", group, resource, "scale"),
            sub("patch", group, resource, "scale"),
        ]);
    }
    union(&[&needs])
}

/// Mesh, on top of the agent's: the Service (read; patched when this
/// member creates the router), the Service selecting the original pods
/// (created by the first member, deleted with the router), the pods (named
/// target ports), the Leases of other members and of the exchange lock.
const MESH: &[Need] = &[
    need("get", "", "services"),
    need("patch", "", "services"),
    need("create", "", "services"),
    need("delete", "", "services"),
    need("list", "", "pods"),
    need("get", "coordination.k8s.io", "leases"),
    need("list", "coordination.k8s.io", "leases"),
];

/// Preview, on top of the agent's: the new Service, created and deleted;
/// `patch` because the agent's Role may restore it, like an exchanged one.
const PREVIEW: &[Need] = &[
    need("get", "", "services"),
    need("create", "", "services"),
    need("patch", "", "services"),
    need("delete", "", "services"),
    need("get", "coordination.k8s.io", "leases"),
];

/// Forward: the Service, its pods, and the port-forward (a WebSocket
/// authorized as `get`; from Kubernetes 1.35 the apiserver also requires
/// `create`). No agent, nothing created.
const FORWARD: &[Need] = &[
    need("get", "", "services"),
    need("list", "", "pods"),
    sub("get", "", "pods", "portforward"),
    sub("create", "", "pods", "portforward"),
];

/// What `connect` needs: the agent's verbs; Services and pods listed to
/// discover the ranges (`discover`: tun mode without `--cidr`); Services
/// listed for the hosts block (`hosts`: `--dns hosts`).
pub fn connect(discover: bool, hosts: bool) -> Vec<Need> {
    let mut needs = AGENT.to_vec();
    if discover {
        needs.extend([need("list", "", "services"), need("list", "", "pods")]);
    }
    if hosts {
        needs.push(need("list", "", "services"));
    }
    union(&[&needs])
}

/// Status in one namespace: the sessions' Leases and agent pods, and the
/// apiserver's clock (a dry-run create of a Lease).
const STATUS: &[Need] = &[
    need("list", "", "pods"),
    need("list", "coordination.k8s.io", "leases"),
    need("create", "coordination.k8s.io", "leases"),
];

/// Recover: the session's Lease (read, judged by the apiserver's clock,
/// deleted), the members of a meshed Service, the Service restored.
const RECOVER: &[Need] = &[
    need("get", "coordination.k8s.io", "leases"),
    need("list", "coordination.k8s.io", "leases"),
    need("create", "coordination.k8s.io", "leases"),
    need("delete", "coordination.k8s.io", "leases"),
    need("get", "", "services"),
    need("patch", "", "services"),
];

/// Clean: everything ktb labels, listed; Services restored, expired Leases
/// deleted (only while unchanged since judged), orphaned agents' objects
/// deleted.
const CLEAN: &[Need] = &[
    need("list", "", "pods"),
    need("list", "", "services"),
    need("get", "", "services"),
    need("patch", "", "services"),
    need("list", "coordination.k8s.io", "leases"),
    need("create", "coordination.k8s.io", "leases"),
    need("delete", "coordination.k8s.io", "leases"),
    need("delete", "", "pods"),
    need("delete", "", "serviceaccounts"),
    need("delete", "rbac.authorization.k8s.io", "roles"),
    need("delete", "rbac.authorization.k8s.io", "rolebindings"),
];

/// Restoring a Service exchanged in scale mode (recover, clean): the
/// workload scaled back through its scale subresource.
const SCALE_BACK: &[Need] = &[
    sub("patch", "apps", "deployments", "scale"),
    sub("patch", "apps", "statefulsets", "scale"),
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

    use super::*;

    /// One permission as RBAC spells it: group, `resource[/subresource]`, verb.
    type Grant = (String, String, String);

    fn grant(need: &Need) -> Grant {
        let resource = match need.subresource {
            "" => need.resource.to_owned(),
            sub => format!("{}/{sub}", need.resource),
        };
        (need.group.to_owned(), resource, need.verb.to_owned())
    }

    /// The Role and RoleBinding in `file` (relative to the workspace).
    fn read(file: &str) -> (Role, RoleBinding) {
        let path = format!("{}/../../{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        let of_kind = |kind: &str| {
            let found: Vec<&serde_json::Value> =
                documents.iter().filter(|d| d["kind"] == kind).collect();
            assert_eq!(found.len(), 1, "{path}: not exactly one {kind}");
            found[0].clone()
        };
        (
            serde_json::from_value(of_kind("Role")).unwrap_or_else(|e| panic!("{path}: {e}")),
            serde_json::from_value(of_kind("RoleBinding"))
                .unwrap_or_else(|e| panic!("{path}: {e}")),
        )
    }

    /// Every permission `role` grants, refusing what a list of verbs
    /// cannot be compared with (wildcards, rules limited to names).
    fn grants(role: &Role, file: &str) -> BTreeSet<Grant> {
        let mut all = BTreeSet::new();
        for rule in role.rules.iter().flatten() {
            assert!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "{file}: a rule limited to names or URLs"
            );
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        assert!(
                            ![group, resource, verb].iter().any(|s| s.contains('*')),
                            "{file}: a wildcard"
                        );
                        all.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        all
    }

    fn wanted(needs: &[Need]) -> BTreeSet<Grant> {
        needs.iter().map(grant).collect()
    }

    #[test]
    fn each_commands_role_grants_exactly_what_the_command_lists() {
        for command in Command::ALL {
            let file = command.role_file();
            let (role, binding) = read(file);
            let name = command.role_name();
            assert_eq!(role.metadata.name.as_deref(), Some(name.as_str()), "{file}");
            assert_eq!(
                binding.role_ref.name, name,
                "{file}: the binding binds another Role"
            );
            let granted = grants(&role, file);
            let needed = wanted(&command.needs());
            let missing: Vec<_> = needed.difference(&granted).collect();
            let extra: Vec<_> = granted.difference(&needed).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{file} drifted from `ktb {}`: it lacks {missing:?} and grants {extra:?} beyond",
                command.invocation()
            );
        }
    }

    #[test]
    fn the_developer_role_grants_every_commands_verbs_and_no_more() {
        let (role, binding) = read(DEVELOPER_ROLE_FILE);
        assert_eq!(role.metadata.name.as_deref(), Some("ktb-developer"));
        assert_eq!(binding.role_ref.name, "ktb-developer");
        let granted = grants(&role, DEVELOPER_ROLE_FILE);
        let needed: BTreeSet<Grant> = Command::ALL
            .iter()
            .flat_map(|c| wanted(&c.needs()))
            .collect();
        let missing: Vec<_> = needed.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(
            missing.is_empty(),
            "{DEVELOPER_ROLE_FILE} lacks {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "{DEVELOPER_ROLE_FILE} grants {extra:?}, which no command lists"
        );
    }

    #[test]
    fn a_run_never_needs_more_than_its_commands_role() {
        let role = |command: Command| wanted(&command.needs());
        let every_run = [
            (Command::Exchange, exchange(None)),
            (Command::ExchangeScale, exchange(Some(Kind::Deployment))),
            (Command::ExchangeScale, exchange(Some(Kind::StatefulSet))),
            (Command::Connect, connect(false, false)),
            (Command::Connect, connect(true, false)),
            (Command::Connect, connect(false, true)),
        ];
        for (command, run) in every_run {
            let extra: Vec<_> = wanted(&run).difference(&role(command)).cloned().collect();
            assert!(extra.is_empty(), "a run of {command:?} needs {extra:?}");
        }
        assert!(
            wanted(AGENT).is_subset(&role(Command::Connect)),
            "ktb doctor's throwaway agent is a connect agent"
        );
    }

    #[test]
    fn role_names_follow_their_files() {
        assert_eq!(Command::ExchangeScale.role_name(), "ktb-exchange-scale");
        assert_eq!(Command::Clean.role_name(), "ktb-clean");
        let names: BTreeSet<String> = Command::ALL.iter().map(|c| c.role_name()).collect();
        assert_eq!(names.len(), Command::ALL.len(), "two commands share a Role");
    }
}
