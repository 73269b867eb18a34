//! Router role: the shared router of a Service that several developers
//! mesh at once (`ktb mesh`).
//!
//! The meshed Service points at this pod. On each of the Service's target
//! ports, [`crate::route`] sends a request carrying a developer's mark to
//! that developer's agent pod and everything else to the origin: a
//! ktb-managed Service selecting the original pods.
//!
//! Who the members are is read from the cluster, not told by anyone: each
//! developer's membership is a Lease labelled with the Service, carrying
//! the mark and the member's agent pod IP. Polling the list once a second
//! makes a join or a leave take effect within a second without the router
//! accepting any connection from a laptop. The oldest member wins when two
//! claim one mark, which `ktb mesh` refuses anyway.
//!
//! The router's own Lease (`ktb-mesh-<svc>`) owns the router pod and the
//! origin Service. The router renews it while it runs, so `status` and
//! `clean` see a live router, and a dead router's Lease expires. When no
//! member has existed for [`EMPTY_FOR`] (the last one left, or every
//! member's agent ended its session after its laptop vanished), the router
//! restores the Service (only if it is still marked with the router's
//! session), keeps serving for [`DRAIN`] while kube-proxy catches up, and
//! deletes its own Lease with preconditions; garbage
//! collection removes the rest. If someone else took the Lease over, the
//! router touches nothing and exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

use ktb_kube::lease::{self, Released};
use ktb_kube::mesh::Membership;
use ktb_kube::service::Restored;

use crate::attachment::Attachment;
use crate::probe::Probes;
use crate::route::{self, Mark, Member, PortRoute, Router};
use crate::{listen, server, Config};

/// How often the member list is read.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How long the router waits with no member before it restores the
/// Service: long enough for a developer who is joining (their Lease exists
/// before the router is looked for) not to meet a router tearing down.
const EMPTY_FOR: Duration = Duration::from_secs(3);
/// How long the router keeps serving after restoring the Service, before
/// it deletes its Lease (and garbage collection this pod): callers that
/// picked the router before kube-proxy saw the restore still get answers.
const DRAIN: Duration = Duration::from_secs(3);
/// Bound on one call to the apiserver, so one slow answer delays a round,
/// never the router's end.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound router, ready to [`run`](MeshRouter::run).
pub struct MeshRouter {
    config: Arc<Config>,
    service: String,
    ports: Vec<(tokio::net::TcpListener, PortRoute)>,
    ready: Option<tokio::net::TcpListener>,
}

impl MeshRouter {
    /// Binds every routed port and the readiness port, so a failure is
    /// reported before the pod is ready.
    pub async fn bind(config: Config) -> anyhow::Result<MeshRouter> {
        let service = config
            .mesh_of
            .clone()
            .context("the router role needs --mesh-of")?;
        let mut ports = Vec::new();
        for &(port, origin) in &config.routes {
            let addr = SocketAddr::new(config.expose_address, port);
            let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
            let route = PortRoute {
                origin,
                member_port: port,
            };
            ports.push((listener, route));
        }
        let ready = match config.ready_listen {
            Some(addr) => Some(
                listen(addr)
                    .with_context(|| format!("cannot listen for readiness probes on {addr}"))?,
            ),
            None => None,
        };
        Ok(MeshRouter {
            config: Arc::new(config),
            service,
            ports,
            ready,
        })
    }

    /// Routes until `shutdown`, or until the last member is gone and the
    /// Service is restored.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let router = Router::new();
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, route) in self.ports {
            tasks.spawn(route::serve_port(listener, Arc::clone(&router), route));
        }
        if let Some(ready) = self.ready {
            let attachment = Arc::new(Attachment::new(Vec::new(), Arc::clone(&self.config)));
            let probes = Arc::new(Probes::new(None, None));
            tasks.spawn(server::serve(
                ready,
                server::Endpoint::Readiness,
                attachment,
                probes,
                None,
            ));
        }
        tracing::info!(service = %self.service, routes = ?self.config.routes, "router ready");
        let keeper = Keeper::new(&self.config, &self.service).await?;
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down"),
            _ = keeper.keep(&router) => tracing::info!("router's session over: exiting"),
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// What the router keeps in step with the cluster: its members and its Lease.
struct Keeper {
    client: kube::Client,
    leases: Api<Lease>,
    namespace: String,
    service: String,
    lease: String,
    session: String,
    renew_every: Duration,
}

impl Keeper {
    async fn new(config: &Config, service: &str) -> anyhow::Result<Keeper> {
        let client = kube::Client::try_default()
            .await
            .context("no access to the Kubernetes API")?;
        let namespace = config.namespace.clone().context("--namespace")?;
        Ok(Keeper {
            leases: Api::namespaced(client.clone(), &namespace),
            client,
            namespace,
            service: service.into(),
            lease: config.lease.clone().context("--lease")?,
            session: config.session.clone().context("--session")?,
            renew_every: (config.grace / 3).max(Duration::from_secs(1)),
        })
    }

    /// Returns once the router's session is over.
    async fn keep(&self, router: &Router) {
        let Some(mut own) = self.own_lease().await else {
            return;
        };
        let mut last_member = Instant::now();
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            match self.members().await {
                Ok(members) => {
                    if !members.is_empty() {
                        last_member = Instant::now();
                    }
                    router.set_members(members.into_iter().filter_map(routable).collect());
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot list the mesh members"),
            }
            if last_renewal.elapsed() >= self.renew_every {
                match tokio::time::timeout(CALL_TIMEOUT, lease::renew(&self.leases, &own)).await {
                    Ok(Ok(Ok(renewed))) => {
                        own = renewed;
                        last_renewal = Instant::now();
                    }
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot renew the router's Lease")
                    }
                    Ok(Err(lost)) => {
                        tracing::info!(%lost, "the router's session is over; touching nothing");
                        return;
                    }
                    Err(_) => tracing::warn!("renewing the router's Lease timed out"),
                }
            }
            if last_member.elapsed() >= EMPTY_FOR && self.end(&own).await {
                return;
            }
        }
    }

    /// The router's Lease as it is now, if it is still this router's.
    async fn own_lease(&self) -> Option<Lease> {
        match self.leases.get_opt(&self.lease).await {
            Ok(Some(lease)) if lease::session_of(&lease) == Some(self.session.as_str()) => {
                Some(lease)
            }
            Ok(_) => {
                tracing::info!(lease = %self.lease, "the router's Lease is gone or another session's");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the router's Lease");
                None
            }
        }
    }

    /// Every member of the Service, oldest first.
    async fn members(&self) -> anyhow::Result<Vec<Membership>> {
        tokio::time::timeout(
            CALL_TIMEOUT,
            ktb_kube::mesh::members(&self.leases, &self.service),
        )
        .await
        .context("listing the members timed out")?
        .context("cannot list the members")
    }

    /// Restores the Service and deletes the router's Lease; false if the
    /// restore failed (tried again next round).
    async fn end(&self, own: &Lease) -> bool {
        tracing::info!(service = %self.service, "no member left: restoring the Service");
        match ktb_kube::service::restore(
            &self.client,
            &self.namespace,
            &self.service,
            &self.session,
        )
        .await
        {
            Ok(Restored::NotOurs { session }) => {
                tracing::info!(%session, "the Service belongs to another session now; left alone")
            }
            Ok(restored) => {
                tracing::info!(%restored, "Service restored; draining");
                tokio::time::sleep(DRAIN).await;
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot restore the Service");
                return false;
            }
        }
        match lease::release(&self.leases, own).await {
            Ok(Released::Deleted | Released::Gone) => {}
            Ok(Released::NotOurs(holder)) => {
                tracing::info!(%holder, "the router's Lease belongs to another session now")
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "cannot delete the router's Lease"),
        }
        true
    }
}

/// Where a member's requests go, once its agent pod has an IP and its mark
/// parses; `None` while it is still starting or already leaving (it still
/// counts as a member, so the router does not tear down under it).
fn routable(member: Membership) -> Option<Member> {
    Some(Member {
        mark: Mark::parse(&member.mark).ok()?,
        upstream: member.upstream?,
        name: member.holder.owner.to_string(),
    })
}
