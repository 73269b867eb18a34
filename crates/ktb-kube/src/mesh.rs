//! Who meshes a Service: every developer's membership is a Lease labelled
//! with the Service, so one list answers, for the router, for `ktb mesh`
//! (a mark already taken) and for `ktb exchange` (refused, naming them).

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};

use crate::lease::{self, Holder, Kind};
use std::net::IpAddr;

use crate::names::{KIND_LABEL, MARK_ANNOTATION, SERVICE_LABEL, UPSTREAM_ANNOTATION};

/// One developer meshing a Service.
#[derive(Debug, Clone)]
pub struct Membership {
    pub holder: Holder,
    /// The mark, `NAME=VALUE`, as the member's Lease records it.
    pub mark: String,
    /// The member's agent pod, where the router sends its requests; `None`
    /// while that pod is starting, or once the member is leaving.
    pub upstream: Option<IpAddr>,
}

/// Splits a mark `NAME=VALUE` whose parts are both 1 to 128 letters,
/// digits, `.`, `_` or `-`: a valid header name and value, and nothing
/// the agent's probe endpoint (which answers before authentication) could
/// be made to write into a request beyond one header.
pub fn split_mark(text: &str) -> Option<(&str, &str)> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    text.split_once('=')
        .filter(|(name, value)| plain(name) && plain(value))
}

/// The label selector of the member Leases of `service`.
pub fn members_selector(service: &str) -> String {
    format!(
        "{SERVICE_LABEL}={service},{KIND_LABEL}={}",
        Kind::Mesh.label()
    )
}

/// Every member of `service`, oldest first.
pub async fn members(leases: &Api<Lease>, service: &str) -> kube::Result<Vec<Membership>> {
    let mut list = leases
        .list(&ListParams::default().labels(&members_selector(service)))
        .await?
        .items;
    list.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
    });
    Ok(list
        .iter()
        .map(|l| {
            let annotations = l.metadata.annotations.clone().unwrap_or_default();
            Membership {
                holder: lease::holder(l),
                mark: annotations
                    .get(MARK_ANNOTATION)
                    .cloned()
                    .unwrap_or_default(),
                upstream: annotations
                    .get(UPSTREAM_ANNOTATION)
                    .and_then(|ip| ip.parse().ok()),
            }
        })
        .collect())
}

/// "dev-a on vm (session 1a2b3c4d) since …, dev-b on …", for messages.
pub fn describe(members: &[Membership]) -> String {
    members
        .iter()
        .map(|m| m.holder.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
