//! Names, labels and annotations ktb puts on cluster objects.

/// Annotation on an exchanged Service: its original selector as JSON.
pub const ORIGINAL_SELECTOR: &str = "ktb.dev/original-selector";
/// Annotation on an exchanged Service: which session holds it.
pub const SESSION: &str = "ktb.dev/session";
/// Annotation on a Service exchanged in scale mode: the workload behind it
/// and its replica count, e.g. `Deployment/orders=3`.
pub const ORIGINAL_REPLICAS: &str = "ktb.dev/original-replicas";
/// Label on every object a session creates: the session id.
pub const SESSION_LABEL: &str = "ktb.dev/session";
/// Label on a session's Lease: what kind of session (`exchange`, `connect`).
pub const KIND_LABEL: &str = "ktb.dev/kind";
/// Annotations on a session's Lease: the developer (as the apiserver knows
/// them) and their machine, kept apart so no one parses `user@host`.
pub const USER_ANNOTATION: &str = "ktb.dev/user";
pub const HOST_ANNOTATION: &str = "ktb.dev/host";
/// Label on a mesh member's Lease: the meshed Service, so the router and
/// `exchange` find every member of one Service with one list.
pub const SERVICE_LABEL: &str = "ktb.dev/service";
/// Annotation on a mesh member's Lease: its mark, `NAME=VALUE`.
pub const MARK_ANNOTATION: &str = "ktb.dev/mark";
/// Annotation on a mesh member's Lease: the IP of its agent pod, where the
/// router sends the member's requests; absent until that pod is ready.
pub const UPSTREAM_ANNOTATION: &str = "ktb.dev/upstream";
/// Label on every object ktb creates, whatever the session.
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_VALUE: &str = "ktb";
/// Port the agent's tunnel endpoint listens on inside the pod (on its
/// loopback unless the laptop dials the pod IP).
pub const AGENT_TUNNEL_PORT: u16 = 7777;
/// Port of the agent's readiness endpoint, for the kubelet.
pub const AGENT_READY_PORT: u16 = 7778;

/// The Lease that locks `service` for exchange.
pub fn exchange_lease(service: &str) -> String {
    format!("ktb-exchange-{service}")
}

/// The Lease of a `ktb connect` session, which owns its agent pod.
pub fn connect_lease(session: &str) -> String {
    format!("ktb-connect-{session}")
}

/// The Lease of `ktb doctor`'s throwaway agent, which owns its pod.
pub fn doctor_lease(session: &str) -> String {
    format!("ktb-doctor-{session}")
}

/// Name of the objects (pod, service account, role, role binding) of a session.
pub fn session_objects(service: &str, session: &str) -> String {
    format!("ktb-{service}-{session}")
}

/// The Lease of a meshed Service's shared router: held while the Service
/// points at the router, renewed by the router pod itself.
pub fn mesh_lease(service: &str) -> String {
    format!("ktb-mesh-{service}")
}

/// The Lease of one developer's membership in a meshed Service.
pub fn mesh_member_lease(service: &str, session: &str) -> String {
    format!("ktb-mesh-{service}-{session}")
}

/// The ktb-managed Service selecting a meshed Service's original pods,
/// where the router sends unmarked traffic.
pub fn mesh_origin_service(service: &str) -> String {
    format!("ktb-origin-{service}")
}

/// The Lease of a `ktb preview` session, which owns the published Service.
pub fn preview_lease(service: &str) -> String {
    format!("ktb-preview-{service}")
}

/// How long an agent asked to stop (SIGTERM: its pod deleted gracefully)
/// keeps serving while a laptop is still attached: the laptop hands the
/// Service back and detaches first. The agent pod's termination grace
/// period is this plus [`AGENT_EXIT_MARGIN_SECS`], so the kubelet never kills
/// it mid-drain.
pub const AGENT_DRAIN_LIMIT_SECS: u64 = 25;
/// Time the agent has to close its tunnel with a reason after a drain.
pub const AGENT_EXIT_MARGIN_SECS: u64 = 5;
