//! What crashed sessions left in the namespace: Leases nobody renews,
//! Services still pointing at a session without a live Lease, agent pods
//! whose Lease is gone.
//!
//! Found exactly as `ktb clean` finds them ([`clean::survey`]: judged by the
//! apiserver's clock, never a laptop's), so the hint can promise that `ktb
//! clean` repairs what is listed and `ktb recover` restores a Service. Only
//! reads; leftovers are a WARN, since other Services and commands still work.

use std::time::Duration;

use ktb_kube::lease;

use super::{bounded, Check};
use crate::clean::{self, Survey};
use crate::cluster::Cluster;

const NAME: &str = "sessions";
/// How long looking may take.
const SURVEY_TIMEOUT: Duration = Duration::from_secs(15);

/// The row for the cluster's namespace.
pub async fn check(cluster: &Cluster) -> Check {
    match bounded(
        "looking for leftovers",
        SURVEY_TIMEOUT,
        clean::survey(cluster),
    )
    .await
    {
        Ok(survey) => judge(&survey, &cluster.namespace),
        Err(e) => Check::warn(
            NAME,
            format!("cannot look for leftovers: {e:#}"),
            "looking takes the read verbs of deploy/rbac/clean.yaml (see the rbac rows)",
        ),
    }
}

/// What `survey` of `namespace` means.
pub fn judge(survey: &Survey, namespace: &str) -> Check {
    if survey.is_clean() {
        return Check::pass(
            NAME,
            format!(
                "nothing left by crashed sessions in namespace {namespace} ({} live)",
                survey.live.len()
            ),
        );
    }
    let mut found = Vec::new();
    for (l, silent) in &survey.expired {
        found.push(format!(
            "expired Lease {} of {}, silent for {} s",
            l.metadata.name.as_deref().unwrap_or_default(),
            lease::holder(l).owner,
            silent.as_secs()
        ));
    }
    for (service, session) in &survey.marked {
        found.push(format!(
            "Service {service} still switched by session {session}"
        ));
    }
    for (pod, session) in &survey.orphans {
        found.push(format!(
            "agent pod {pod} of session {session}, without a Lease"
        ));
    }
    let mut hint = String::from("`ktb clean` repairs all of it (`ktb clean --dry-run` shows how)");
    if let Some((service, _)) = survey.marked.first() {
        hint.push_str(&format!(
            "; `ktb recover {service}` restores just that Service"
        ));
    }
    Check::warn(
        NAME,
        format!("in namespace {namespace}: {}", found.join("; ")),
        hint,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;
    use ktb_kube::lease::{new_lease, Kind, Owner};

    fn survey() -> Survey {
        Survey {
            live: Vec::new(),
            expired: Vec::new(),
            marked: Vec::new(),
            orphans: Vec::new(),
        }
    }

    #[test]
    fn a_clean_namespace_passes() {
        let row = judge(&survey(), "shop");
        assert_eq!(row.status, Status::Pass);
        assert_eq!(
            row.detail,
            "nothing left by crashed sessions in namespace shop (0 live)"
        );
    }

    #[test]
    fn leftovers_warn_naming_each_and_the_commands_that_repair_them() {
        let owner = Owner {
            user: "dev-b".into(),
            host: "laptop-b".into(),
            session: "0badcafe".into(),
        };
        let lease = new_lease(
            "ktb-exchange-web",
            Kind::Exchange,
            &owner,
            Duration::from_secs(30),
        );
        let leftovers = Survey {
            expired: vec![(lease, Duration::from_secs(95))],
            marked: vec![("web".into(), "0badcafe".into())],
            orphans: vec![("ktb-connect-12345678".into(), "12345678".into())],
            ..survey()
        };
        let row = judge(&leftovers, "shop");
        assert_eq!(row.status, Status::Warn);
        assert_eq!(
            row.detail,
            "in namespace shop: expired Lease ktb-exchange-web of dev-b on laptop-b \
             (session 0badcafe), silent for 95 s; Service web still switched by session \
             0badcafe; agent pod ktb-connect-12345678 of session 12345678, without a Lease"
        );
        let hint = row.hint.unwrap();
        assert!(hint.contains("`ktb clean`"), "{hint}");
        assert!(hint.contains("`ktb recover web`"), "{hint}");
    }
}
