//! `ktb connect`: this machine reaches pod IPs, ClusterIPs and cluster DNS
//! names as if it sat inside the cluster.
//!
//! The phases, undone in reverse on exit, on error and (for the local ones,
//! through the [`journal`]) after a crash: check permissions and plan the
//! ranges (read-only; a range that would steal an existing route is refused
//! before anything changes) → take a session Lease and start a connect-role
//! agent pod it owns → open the tunnel through a port-forward → TUN device,
//! routes and DNS (tun mode) or a SOCKS5 proxy (socks5 mode) → serve,
//! renewing the Lease, until Ctrl-C. If this machine vanishes, the agent
//! deletes the Lease after the grace period and the pod goes with it.

pub mod dns;
pub mod journal;
pub mod outbound;
pub mod ranges;
pub mod socks;
pub mod system;
pub mod tun;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::Ipv4Net;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use rand::Rng;

use ktb_kube::names::{connect_lease, AGENT_TUNNEL_PORT};
use ktb_proto::{ClientKey, SessionConfig};

use crate::cluster::Cluster;
use crate::exchange::lock::{self, Lock, Taken};
use crate::exchange::shadow::{session_labels, Shadow, ShadowSpec};
use crate::portforward::PortForward;
use crate::preflight::{self, need};
use crate::tunnel::{RunningTunnel, TunnelConfig};
use journal::Journal;
use outbound::Outbound;

/// How this machine's programs reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A TUN device and routes: every program, every protocol (needs root
    /// or CAP_NET_ADMIN).
    Tun,
    /// A SOCKS5 proxy on loopback: programs that are told to use it; no root.
    Socks5,
}

/// How cluster names reach this machine's resolver (tun mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsMode {
    /// ktb's DNS server first in /etc/resolv.conf, the original servers after it.
    Resolv,
    /// The namespace's Services written into a marked block of /etc/hosts.
    Hosts,
    /// No cluster names; addresses only.
    Off,
}

/// Everything `connect` is told.
pub struct ConnectOptions {
    pub mode: Mode,
    pub dns: DnsMode,
    /// Replaces the discovered ranges when not empty.
    pub cidrs: Vec<Ipv4Net>,
    pub excludes: Vec<Ipv4Net>,
    /// Route ranges even where they overlap an existing route.
    pub force_routes: bool,
    pub device: String,
    pub socks: SocketAddr,
    pub state_dir: PathBuf,
    pub grace: Duration,
    pub agent_image: String,
    pub pull_policy: String,
    pub ready_timeout: Duration,
}

fn say(message: impl std::fmt::Display) {
    eprintln!("ktb: {message}");
}

/// Connects until `shutdown` completes; the cluster and this machine are
/// left as they were found whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: ConnectOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let started = Instant::now();
    let ns = cluster.namespace.clone();
    let mut needs = crate::exchange::shadow::AGENT_NEEDS.to_vec();
    if options.cidrs.is_empty() && options.mode == Mode::Tun {
        needs.extend([need("list", "", "services"), need("list", "", "pods")]);
    }
    if options.dns == DnsMode::Hosts {
        needs.push(need("list", "", "services"));
    }
    preflight::check(cluster, &needs).await?;
    let ranges = match options.mode {
        Mode::Tun => plan_ranges(cluster, &options).await?,
        Mode::Socks5 => Vec::new(),
    };
    let socks = match options.mode {
        Mode::Socks5 => Some(tokio::net::TcpListener::bind(options.socks).await.with_context(|| {
            format!("cannot listen on {} for SOCKS5 (is another proxy there? pick one with --socks)", options.socks)
        })?),
        Mode::Tun => None,
    };

    // Before the cluster is touched: another connect on this machine is
    // refused here, and a crashed one's leftovers are undone.
    let mut journal = match options.mode {
        Mode::Tun => Some(Journal::start(&options.state_dir)?),
        Mode::Socks5 => None,
    };
    let session = format!("{:08x}", rand::rng().random::<u32>());
    let identity = format!("{}@{}", cluster.whoami().await?, crate::cluster::hostname());
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    let wanted = lock::new_lease(&connect_lease(&session), &identity, &session, options.grace);
    let Taken::Fresh(lease) = lock::take(&leases, wanted).await? else {
        anyhow::bail!("a Lease named after this new session already exists; try again");
    };
    let objects = format!("ktb-connect-{session}");
    let outcome = tokio::select! {
        outcome = start_agent(cluster, &options, &session, &objects, &lease) => outcome,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted")),
    };
    let (mut tunnel, outbound) = match outcome {
        Ok(up) => up,
        Err(e) => {
            remove_session(cluster, &objects, &lease).await;
            undo_local(journal);
            return Err(e);
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    let plan = LocalPlan {
        options: &options,
        session: &session,
        ranges: &ranges,
        cluster,
    };
    let local = tokio::select! {
        local = start_local(&plan, outbound, socks, journal.as_mut(), &mut tasks) => local,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted")),
    };
    let served = match local {
        Ok(summary) => {
            say(format!(
                "✔ connected to namespace {ns} in {:.1} s: {summary}. Ctrl-C disconnects",
                started.elapsed().as_secs_f64(),
            ));
            keep_alive(&lease, &mut shutdown).await
        }
        Err(e) => Err(e),
    };
    tasks.abort_all();
    undo_local(journal);
    tunnel.stop().await;
    remove_session(cluster, &objects, &lease).await;
    say("disconnected");
    served
}

/// The ranges to route: discovered or given, minus the exclusions and the
/// apiserver, and refused where they would take an existing route's traffic.
async fn plan_ranges(cluster: &Cluster, options: &ConnectOptions) -> anyhow::Result<Vec<Ipv4Net>> {
    let wanted = if options.cidrs.is_empty() {
        let found = ranges::discover(&cluster.client, &cluster.namespace).await?;
        if found.is_empty() {
            anyhow::bail!(
                "no pod or Service addresses are visible in namespace {}: pass the cluster's ranges with --cidr",
                cluster.namespace
            );
        }
        found
    } else {
        options.cidrs.clone()
    };
    let mut holes = options.excludes.clone();
    holes.extend(
        cluster
            .apiserver_addresses()
            .await
            .into_iter()
            .filter_map(ranges::host),
    );
    let planned = ranges::exclude(&wanted, &holes);
    let routes = std::fs::read_to_string("/proc/net/route")
        .map(|text| ranges::parse_proc_routes(&text))
        .unwrap_or_default();
    if let Some((piece, route)) = ranges::conflict(&planned, &routes, &options.device) {
        // Name the range as the user or the discovery gave it.
        let range = wanted
            .iter()
            .find(|w| w.contains(&piece))
            .copied()
            .unwrap_or(piece);
        if !options.force_routes {
            anyhow::bail!(
                "the cluster range {range} overlaps the route {route} this machine already has \
                 (a VPN, a container bridge or the LAN?): routing it into ktb would take that traffic away. \
                 Leave it out with --exclude {}, set the ranges with --cidr, or route it anyway with --force-routes",
                route.net
            );
        }
        say(format!(
            "warning: {range} overlaps the route {route}; routing it anyway (--force-routes)"
        ));
    }
    Ok(planned)
}

/// Creates the connect-role agent pod (owned by the Lease) and opens the
/// tunnel to it.
async fn start_agent(
    cluster: &Cluster,
    options: &ConnectOptions,
    session: &str,
    objects: &str,
    lease: &Lock,
) -> anyhow::Result<(RunningTunnel, Outbound)> {
    let key = ClientKey::generate()?;
    let public_key = key.public().to_string();
    let spec = ShadowSpec {
        name: objects,
        session,
        service: None,
        lease: &lease.name(),
        token: &public_key,
        target_ports: Vec::new(),
        image: &options.agent_image,
        pull_policy: &options.pull_policy,
        grace: options.grace,
        owner: lease.owner(),
        labels: session_labels(session),
        scaled: None,
    };
    say(format!("starting agent pod {objects}"));
    let agent = Shadow::create(&cluster.client, &cluster.namespace, &spec).await?;
    agent.wait_ready(options.ready_timeout).await?;
    say("opening the tunnel (port-forward through the apiserver)");
    let transport = PortForward {
        client: cluster.client.clone(),
        namespace: cluster.namespace.clone(),
        pod: objects.to_owned(),
        port: AGENT_TUNNEL_PORT,
    };
    let config = TunnelConfig {
        key: Arc::new(key),
        session: SessionConfig::default(),
    };
    let outbound = Outbound::default();
    let tunnel = RunningTunnel::start(transport, config, Arc::new(outbound.clone())).await?;
    Ok((tunnel, outbound))
}

/// Renews the Lease until shutdown; losing it ends the session. Shutdown
/// is watched on its own, so a renewal stuck on a slow apiserver never
/// delays Ctrl-C.
async fn keep_alive(
    lease: &Lock,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let every = lease.renew_every();
    let renewing = async {
        let mut renew = tokio::time::interval(every);
        loop {
            renew.tick().await;
            match tokio::time::timeout(every, lease.renew()).await {
                Ok(renewed) => renewed
                    .context("lost the session's Lease (was it cleaned up from elsewhere?)")?,
                Err(_) => say(format!(
                    "warning: renewing the session's Lease took over {every:?}; retrying"
                )),
            }
        }
    };
    tokio::select! {
        _ = shutdown.as_mut() => Ok(()),
        failed = renewing => failed,
    }
}

/// Undoes this machine's changes, newest first.
fn undo_local(journal: Option<Journal>) {
    let Some(journal) = journal else {
        return;
    };
    let changed = !journal.changes().is_empty();
    match journal.undo() {
        Ok(()) if changed => say("restored this machine's network and DNS settings"),
        Ok(()) => {}
        Err(e) => say(format!("error: {e:#}")),
    }
}

async fn remove_session(cluster: &Cluster, objects: &str, lease: &Lock) {
    Shadow::existing(&cluster.client, &cluster.namespace, objects)
        .delete()
        .await;
    if let Err(e) = lease.release().await {
        say(format!("warning: {e:#}"));
    }
}

/// What was decided before the local side starts.
#[derive(Clone, Copy)]
struct LocalPlan<'a> {
    options: &'a ConnectOptions,
    session: &'a str,
    ranges: &'a [Ipv4Net],
    cluster: &'a Cluster,
}

/// Starts what runs on this machine: the SOCKS proxy, or the TUN device
/// with its routes and DNS (each change in the journal first). Returns the
/// summary for the user.
async fn start_local(
    plan: &LocalPlan<'_>,
    outbound: Outbound,
    socks: Option<tokio::net::TcpListener>,
    journal: Option<&mut Journal>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<String> {
    let LocalPlan {
        options,
        session,
        ranges,
        cluster,
    } = *plan;
    if let Some(listener) = socks {
        let addr = listener.local_addr()?;
        tasks.spawn(socks::serve(listener, outbound));
        return Ok(format!(
            "SOCKS5 proxy on {addr}, names resolved in the cluster (use socks5h://{addr})"
        ));
    }
    let journal = journal.context("tun mode keeps a journal")?;
    let device = &options.device;
    system::record_device(journal, device)?;
    let tun = tun::create(device).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "creating the TUN device {device} needs root or CAP_NET_ADMIN: run ktb with sudo, \
             or use `--mode socks5`, which needs neither"
        ),
        _ => anyhow::anyhow!(
            "cannot create the TUN device {device}: {e} (is /dev/net/tun there? `modprobe tun` loads it)"
        ),
    })?;
    tasks.spawn(tun::serve(tun, outbound.clone()));
    system::add_routes(journal, ranges, device)?;
    let routed = ranges
        .iter()
        .map(Ipv4Net::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let dns = match options.dns {
        DnsMode::Resolv => {
            dns::check_cluster_dns(&outbound).await?;
            let listen_error = || format!("cannot listen for DNS on {}", dns::LISTEN);
            let udp = tokio::net::UdpSocket::bind(dns::LISTEN)
                .await
                .with_context(listen_error)?;
            let tcp = tokio::net::TcpListener::bind(dns::LISTEN)
                .await
                .with_context(listen_error)?;
            let upstream = system::switch_resolv_conf(
                journal,
                Path::new(system::RESOLV_CONF),
                dns::LISTEN.ip(),
            )?;
            let others = upstream
                .iter()
                .map(|s| s.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            tasks.spawn(dns::serve(dns::Answerer::new(outbound, upstream), udp, tcp));
            format!(
                "DNS: cluster names answered at {} (resolv.conf), other names by {others}",
                dns::LISTEN.ip()
            )
        }
        DnsMode::Hosts => {
            let lines = hosts_lines(cluster, &outbound.resolver()).await?;
            let count = lines.len();
            system::add_hosts_block(journal, Path::new(system::HOSTS), session, &lines)?;
            format!("DNS: {count} Services in /etc/hosts")
        }
        DnsMode::Off => "DNS: off".to_owned(),
    };
    Ok(format!("{routed} routed through {device}; {dns}"))
}

/// `/etc/hosts` lines for the namespace's Services: every spelling a pod
/// of the namespace could use.
async fn hosts_lines(
    cluster: &Cluster,
    resolver: &ktb_proto::handshake::Resolver,
) -> anyhow::Result<Vec<String>> {
    let ns = &cluster.namespace;
    let domain = dns::cluster_domain(resolver);
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .context("cannot list the namespace's Services for /etc/hosts")?;
    Ok(services
        .items
        .iter()
        .filter_map(|s| {
            let name = s.metadata.name.as_deref()?;
            let ip = s.spec.as_ref()?.cluster_ip.as_deref()?;
            (ip != "None" && !ip.is_empty()).then(|| {
                format!("{ip} {name} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.{domain}")
            })
        })
        .collect())
}
