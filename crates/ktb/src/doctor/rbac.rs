//! One row per command: may this developer run it in this namespace?
//!
//! Every command's verbs come from [`crate::permissions`], the lists the
//! commands' own preflights check, and are asked of the apiserver with the
//! preflight's machinery: each distinct verb once (SelfSubjectAccessReview),
//! then sorted back to the commands. A command missing verbs is a FAIL that
//! names them and the Role file granting them ([`preflight::remedy`], the
//! words a refused command uses too).

use super::Check;
use crate::cluster::Cluster;
use crate::permissions::Command;
use crate::permissions::Need;
use crate::preflight;

/// Adds a row per command. Returns every verb found missing, or `None`
/// when the apiserver could not be asked (the rows then say why).
pub async fn check(cluster: &Cluster, checks: &mut Vec<Check>) -> Option<Vec<Need>> {
    let mut all: Vec<Need> = Vec::new();
    for need in Command::ALL.iter().flat_map(|c| c.needs()) {
        if !all.contains(&need) {
            all.push(need);
        }
    }
    match preflight::missing(cluster, &all).await {
        Ok(missing) => {
            checks.extend(
                Command::ALL
                    .iter()
                    .map(|&command| row(command, &cluster.namespace, &missing)),
            );
            Some(missing)
        }
        Err(e) => {
            checks.push(Check::fail(
                "rbac",
                format!("cannot check permissions: {e:#}"),
                "every authenticated user may ask (SelfSubjectAccessReview); if the apiserver \
                 refuses that, ask a cluster admin why",
            ));
            None
        }
    }
}

/// The row of `command`, given every verb the developer lacks in `namespace`.
pub fn row(command: Command, namespace: &str, missing: &[Need]) -> Check {
    let name = format!("rbac {}", command.invocation());
    let needs = command.needs();
    let lacking: Vec<Need> = needs
        .iter()
        .filter(|n| missing.contains(n))
        .copied()
        .collect();
    if lacking.is_empty() {
        return Check::pass(
            name,
            format!("all {} verbs granted in namespace {namespace}", needs.len()),
        );
    }
    let list = lacking
        .iter()
        .map(Need::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Check::fail(
        name,
        format!("missing in namespace {namespace}: {list}"),
        preflight::remedy(command, namespace),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;
    use crate::permissions::need;

    #[test]
    fn a_command_fails_naming_only_its_own_missing_verbs_and_its_role_file() {
        let missing = [need("patch", "", "services"), need("create", "", "nodes")];
        let exchange = row(Command::Exchange, "shop", &missing);
        assert_eq!(exchange.name, "rbac exchange");
        assert_eq!(exchange.status, Status::Fail);
        assert_eq!(exchange.detail, "missing in namespace shop: patch services");
        let hint = exchange.hint.unwrap();
        assert!(hint.contains("deploy/rbac/exchange.yaml"), "{hint}");
        assert!(hint.contains("Role ktb-exchange"), "{hint}");
        assert!(hint.contains("deploy/rbac/developer.yaml"), "{hint}");

        let forward = row(Command::Forward, "shop", &missing);
        assert_eq!(forward.status, Status::Pass);
        assert_eq!(forward.detail, "all 4 verbs granted in namespace shop");
        assert_eq!(forward.hint, None);
    }
}
