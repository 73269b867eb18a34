//! The table of members, shared by every meshed port, and the upstream
//! connections they share.
//!
//! The table is read on every request and replaced rarely (a developer joins
//! or leaves), so it sits behind a read-write lock and a lookup holds the
//! read lock only while comparing headers. A request keeps the member it was
//! given (an `Arc`), so replacing the table never disturbs one in flight.

use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};

use http::HeaderMap;

use super::mark::Mark;
use super::upstream::Upstreams;

/// A developer taking part in the mesh.
#[derive(Clone, Debug)]
pub struct Member {
    /// Requests carrying this mark go to this member.
    pub mark: Mark,
    /// The developer's shadow pod; it is reached on the same port as the
    /// original pods (see [`super::PortRoute::member_port`]).
    pub upstream: IpAddr,
    /// Who this is, for messages and logs, e.g.
    /// "dev-a on vm (session 1a2b3c4d)".
    pub name: String,
}

/// Decides, request by request, which member (if any) a request belongs to,
/// and holds the pooled connections to every upstream.
pub struct Router {
    /// Checked in order: the first member whose mark matches wins.
    members: RwLock<Vec<Arc<Member>>>,
    pub(super) upstreams: Upstreams,
}

impl Router {
    /// A router with no members: everything goes to the original pods.
    pub fn new() -> Arc<Router> {
        Arc::new(Router {
            members: RwLock::new(Vec::new()),
            upstreams: Upstreams::new(),
        })
    }

    /// Replaces the table at once. Requests in flight keep their upstream;
    /// the next request, even on an open keep-alive connection, sees the
    /// new table.
    pub fn set_members(&self, members: Vec<Member>) {
        let members = members.into_iter().map(Arc::new).collect();
        *self.members.write().unwrap_or_else(PoisonError::into_inner) = members;
    }

    pub fn member_count(&self) -> usize {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The member a request with these headers belongs to; `None` for the
    /// original pods.
    pub(super) fn member_for(&self, headers: &HeaderMap) -> Option<Arc<Member>> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|member| member.mark.matches(headers))
            .cloned()
    }
}
