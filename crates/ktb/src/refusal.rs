//! Why a command refused to act, told apart from every other failure.
//!
//! People read the message; scripts and CI wrappers read the exit code, and
//! the two refusals ask for different reactions: a Service a colleague
//! holds is worth trying again later (or meshing instead), a missing
//! permission needs a cluster admin, and neither is worth retrying at once.
//! Commands raise a [`Refusal`] where they decide to refuse; a `403
//! Forbidden` from the apiserver anywhere in an error's chain counts as a
//! missing permission too, so a verb the preflight did not foresee is
//! classified the same way, except the apiserver's refusal to create in a
//! namespace being deleted, which no Role would fix. [`kind_of`] sorts any
//! error, and the binary maps each [`Kind`] to its exit code.

/// A refusal raised by a command; its message is the whole explanation
/// (what, who, what to do), so it displays as is.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Someone else holds what the command asked for: a colleague's live
    /// session on the Service, their mark, or an object of that name.
    #[error("{0}")]
    Held(String),
    /// The developer lacks a permission; the message names the verbs and
    /// the Role that grants them.
    #[error("{0}")]
    Forbidden(String),
}

/// How a command failed, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else: a bad argument the flags could not catch, an
    /// unreachable cluster, a Service that does not exist, a broken tunnel.
    Failed,
    /// [`Refusal::Held`]: try again once they are done.
    Held,
    /// [`Refusal::Forbidden`], or the apiserver answered 403.
    Forbidden,
}

/// Sorts `error` by the first refusal or 403 in its chain.
pub fn kind_of(error: &anyhow::Error) -> Kind {
    error
        .chain()
        .find_map(|cause| {
            if let Some(refusal) = cause.downcast_ref::<Refusal>() {
                return Some(match refusal {
                    Refusal::Held(_) => Kind::Held,
                    Refusal::Forbidden(_) => Kind::Forbidden,
                });
            }
            match cause.downcast_ref::<kube::Error>() {
                Some(kube::Error::Api(status)) if missing_permission(status) => {
                    Some(Kind::Forbidden)
                }
                _ => None,
            }
        })
        .unwrap_or(Kind::Failed)
}

/// Whether the apiserver's answer is a permission the caller lacks: a 403,
/// but not the namespace being deleted.
pub fn missing_permission(status: &kube::core::Status) -> bool {
    status.code == 403 && !namespace_terminating(status)
}

/// The apiserver's refusal to create in a namespace being deleted: a 403
/// whose cause is `NamespaceTerminating`.
pub fn namespace_terminating(status: &kube::core::Status) -> bool {
    status.code == 403
        && status.details.as_ref().is_some_and(|details| {
            details
                .causes
                .iter()
                .any(|cause| cause.reason == "NamespaceTerminating")
        })
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    fn api_error(code: u16) -> kube::Error {
        let status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "leases.coordination.k8s.io is forbidden",
            "reason": "Forbidden",
            "code": code,
        }))
        .expect("a Status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_refusal_is_found_under_context() {
        let held = anyhow::Error::from(Refusal::Held("Service a/b is exchanged by x".into()))
            .context("cannot exchange");
        assert_eq!(kind_of(&held), Kind::Held);
        let forbidden: anyhow::Result<()> =
            Err(Refusal::Forbidden("missing permission".into())).context("preflight");
        assert_eq!(kind_of(&forbidden.unwrap_err()), Kind::Forbidden);
    }

    #[test]
    fn only_a_403_from_the_apiserver_counts_as_forbidden() {
        let forbidden = anyhow::Error::from(api_error(403)).context("listing Leases");
        assert_eq!(kind_of(&forbidden), Kind::Forbidden);
        let conflict = anyhow::Error::from(api_error(409)).context("patching the Service");
        assert_eq!(kind_of(&conflict), Kind::Failed);
        assert_eq!(kind_of(&anyhow::anyhow!("tunnel closed")), Kind::Failed);
    }

    #[test]
    fn a_refusal_displays_as_its_message_alone() {
        let message = "Service shop/orders is exchanged by alice on box since 10:00";
        assert_eq!(Refusal::Held(message.into()).to_string(), message);
    }
}
