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
pub mod dns_cache;
pub mod journal;
pub mod netstack;
pub mod outbound;
pub mod ranges;
#[cfg(target_os = "linux")]
pub mod resolved;
pub mod socks;
pub mod system;
pub mod tun;
#[cfg(target_os = "linux")]
mod vnet;

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

use ktb_kube::lease::{self, Kind as LeaseKind};
use ktb_kube::names::{connect_lease, AGENT_TUNNEL_PORT};
use ktb_proto::auth::ClientKey;
use ktb_proto::SessionConfig;

use crate::cluster::Cluster;
use crate::permissions::{self, Command};
use crate::portforward::PortForward;
use crate::preflight;
use crate::report::Reporter;
use crate::session as sessions;
use crate::session::agent_pod::{session_labels, AgentPod, AgentPodSpec, AgentRole, AgentSettings};
use crate::session::keep_alive::keep_alive;
use crate::session::lock::{self, Lock, Taken};
use crate::tunnel::{RunningTunnel, TunnelConfig};
use journal::Journal;
use outbound::Outbound;

/// How this machine's programs reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A TUN device and routes: every program, every protocol (needs root
    /// or CAP_NET_ADMIN).
    Tun,
    /// A SOCKS5 proxy on loopback: programs that are told to use it; no root.
    Socks5,
}

/// How cluster names reach this machine's resolver (tun mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// ktb's DNS server first in /etc/resolv.conf, the original servers
    /// after it; where resolv.conf links to systemd-resolved's stub, the
    /// cluster's domains registered with resolved on ktb's device instead
    /// (`connect::resolved`, Linux).
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
    /// The longest, in seconds, ktb's DNS server keeps the cluster's
    /// answers (tun mode, `--dns resolv`); zero keeps none.
    pub dns_cache_ttl: u32,
    /// Replaces the discovered ranges when not empty.
    pub cidrs: Vec<Ipv4Net>,
    pub excludes: Vec<Ipv4Net>,
    /// Route ranges even where they overlap an existing route.
    pub force_routes: bool,
    pub device: String,
    pub socks: SocketAddr,
    pub state_dir: PathBuf,
    pub grace: Duration,
    pub agent: AgentSettings,
}

/// Connects until `shutdown` completes; the cluster and this machine are
/// left as they were found whether this returns `Ok` or `Err`.
pub async fn run(
    cluster: &Cluster,
    options: ConnectOptions,
    reporter: &Reporter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    anyhow::ensure!(
        options.mode != Mode::Tun || cfg!(target_os = "linux"),
        "connect --mode tun is Linux-only for now (its routes and DNS are set with Linux's tools); \
         on this machine use --mode socks5, which needs no privileges"
    );
    let started = Instant::now();
    let ns = cluster.namespace.clone();
    let needs = permissions::connect(
        options.cidrs.is_empty() && options.mode == Mode::Tun,
        options.dns == DnsMode::Hosts,
    );
    preflight::check(cluster, Command::Connect, &needs).await?;

    // Before anything is created: another connect on this machine is
    // refused here, and a crashed one's leftovers (its device among them)
    // are undone, so the checks below see this machine as it is.
    let mut journal = match options.mode {
        Mode::Tun => Some(Journal::start(&options.state_dir)?),
        Mode::Socks5 => None,
    };
    let prepared = async {
        let ranges = match options.mode {
            Mode::Tun => {
                system::check_may_create_device(&options.device)?;
                system::check_device_free(&options.device)?;
                plan_ranges(cluster, &options, reporter).await?
            }
            Mode::Socks5 => Vec::new(),
        };
        let socks = match options.mode {
            Mode::Socks5 => Some(tokio::net::TcpListener::bind(options.socks).await.with_context(|| {
                format!("cannot listen on {} for SOCKS5 (is another proxy there? pick one with --socks)", options.socks)
            })?),
            Mode::Tun => None,
        };
        let owner = sessions::owner(cluster).await?;
        anyhow::Ok((ranges, socks, owner))
    };
    let (ranges, socks, owner) = match prepared.await {
        Ok(prepared) => prepared,
        Err(e) => {
            undo_local(journal, reporter);
            return Err(e);
        }
    };
    let session = owner.session.clone();
    let leases = Api::<Lease>::namespaced(cluster.client.clone(), &ns);
    let objects = connect_lease(&session);
    let wanted = lease::new_lease(&objects, LeaseKind::Connect, &owner, options.grace);
    let lease = match lock::take(&leases, &wanted).await {
        Ok(Taken::Fresh(lease)) => lease,
        taken => {
            undo_local(journal, reporter);
            taken?;
            anyhow::bail!("a Lease named after this new session already exists; try again");
        }
    };
    let outcome = tokio::select! {
        outcome = start_agent(cluster, &options, &session, &objects, &lease, reporter) => outcome,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted")),
    };
    let (mut tunnel, outbound) = match outcome {
        Ok(up) => up,
        Err(e) => {
            sessions::end(cluster, &objects, &lease, reporter).await;
            undo_local(journal, reporter);
            return Err(e);
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    let plan = LocalPlan {
        options: &options,
        session: &session,
        ranges: &ranges,
        reporter,
        cluster,
    };
    let local = tokio::select! {
        local = start_local(&plan, outbound, socks, journal.as_mut(), &mut tasks) => local,
        _ = &mut shutdown => Err(anyhow::anyhow!("interrupted")),
    };
    let served = match local {
        Ok(summary) => {
            reporter.progress(format!(
                "✔ connected to namespace {ns} in {:.1} s: {summary}. Ctrl-C disconnects",
                started.elapsed().as_secs_f64(),
            ));
            keep_alive(&lease, reporter, &mut shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        Err(e) => Err(e),
    };
    tasks.abort_all();
    undo_local(journal, reporter);
    tunnel.stop().await;
    sessions::end(cluster, &objects, &lease, reporter).await;
    reporter.progress("disconnected");
    served
}

/// The ranges to route: discovered or given, minus the exclusions and the
/// apiserver, and refused where they would take an existing route's traffic.
async fn plan_ranges(
    cluster: &Cluster,
    options: &ConnectOptions,
    reporter: &Reporter,
) -> anyhow::Result<Vec<Ipv4Net>> {
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
        reporter.warn(format!(
            "{range} overlaps the route {route}; routing it anyway (--force-routes)"
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
    reporter: &Reporter,
) -> anyhow::Result<(RunningTunnel, Outbound)> {
    let key = ClientKey::generate()?;
    let spec = AgentPodSpec {
        name: objects,
        session,
        role: AgentRole::Connect {
            key: key.public().to_string(),
        },
        lease: lease.name(),
        tunnel_on_pod_network: false,
        declared_ports: Vec::new(),
        settings: &options.agent,
        grace: options.grace,
        owner: lease.owner(),
        labels: session_labels(session),
        scaled: None,
    };
    reporter.progress(format!("starting agent pod {objects}"));
    let agent = AgentPod::create(&cluster.client, &cluster.namespace, &spec).await?;
    agent.wait_ready(options.agent.ready_timeout).await?;
    reporter.progress("opening the tunnel (port-forward through the apiserver)");
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
    let tunnel =
        RunningTunnel::start(transport, config, Arc::new(outbound.clone()), reporter).await?;
    Ok((tunnel, outbound))
}

/// Undoes this machine's changes, newest first.
fn undo_local(journal: Option<Journal>, reporter: &Reporter) {
    let Some(journal) = journal else {
        return;
    };
    let changed = !journal.changes().is_empty();
    match journal.undo() {
        Ok(()) if changed => reporter.progress("restored this machine's network and DNS settings"),
        Ok(()) => {}
        Err(e) => reporter.warn(format!("{e:#}")),
    }
}

/// What was decided before the local side starts.
#[derive(Clone, Copy)]
struct LocalPlan<'a> {
    options: &'a ConnectOptions,
    session: &'a str,
    ranges: &'a [Ipv4Net],
    reporter: &'a Reporter,
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
        reporter,
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
    let (tun, device) = system::create_device(journal, &options.device)?;
    tasks.spawn(tun::serve(tun, outbound.clone()));
    system::add_routes(journal, ranges, &device)?;
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
            let resolv_conf = Path::new(system::RESOLV_CONF);
            let (upstream, summary) = match system::resolv_conf_kind(resolv_conf) {
                system::ResolvConf::ResolvedStub(_) => {
                    let domains = register_with_resolved(journal, &device, &outbound).await?;
                    let summary = format!(
                        "DNS: {domains} answered at {} (registered with systemd-resolved on {}), \
                         other names by the laptop's own servers",
                        dns::LISTEN.ip(),
                        device.name
                    );
                    (Vec::new(), summary)
                }
                system::ResolvConf::ResolvedUplink(_) | system::ResolvConf::File => {
                    let upstream = system::switch_resolv_conf(
                        journal,
                        resolv_conf,
                        dns::LISTEN.ip(),
                        session,
                    )?;
                    let others = upstream
                        .iter()
                        .map(|s| s.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    let summary = format!(
                        "DNS: cluster names answered at {} (resolv.conf), other names by {others}",
                        dns::LISTEN.ip()
                    );
                    (upstream, summary)
                }
            };
            tasks.spawn(dns::serve(
                dns::Answerer::new(outbound, upstream, options.dns_cache_ttl),
                udp,
                tcp,
            ));
            summary
        }
        DnsMode::Hosts => {
            let entries = hosts_lines(cluster, &outbound.resolver(), reporter).await?;
            let count = entries.len();
            system::add_hosts_block(journal, Path::new(system::HOSTS), session, &entries)?;
            format!("DNS: {count} Services in /etc/hosts")
        }
        DnsMode::Off => "DNS: off".to_owned(),
    };
    Ok(format!("{routed} routed through {}; {dns}", device.name))
}

/// Registers the cluster's domains with systemd-resolved on ktb's device;
/// returns them as `resolvectl` shows them, for the summary.
#[cfg(target_os = "linux")]
async fn register_with_resolved(
    journal: &mut Journal,
    device: &system::OwnDevice,
    outbound: &Outbound,
) -> anyhow::Result<String> {
    let domains = resolved::link_domains(&outbound.resolver())?;
    resolved::register(journal, device, dns::LISTEN, &domains).await?;
    Ok(domains
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" "))
}

/// Tun mode is Linux-only (see [`run`]), and so is systemd-resolved.
#[cfg(not(target_os = "linux"))]
async fn register_with_resolved(
    _journal: &mut Journal,
    _device: &system::OwnDevice,
    _outbound: &Outbound,
) -> anyhow::Result<String> {
    anyhow::bail!("systemd-resolved is Linux's: use --dns hosts")
}

/// `/etc/hosts` lines for the namespace's Services: every spelling a pod
/// of the namespace could use. A Service whose name or ClusterIP could not
/// be a hosts line is left out, with a warning.
async fn hosts_lines(
    cluster: &Cluster,
    resolver: &ktb_proto::handshake::Resolver,
    reporter: &Reporter,
) -> anyhow::Result<Vec<system::HostEntry>> {
    let ns = &cluster.namespace;
    let domain = dns::cluster_domain(resolver)?;
    let services = Api::<Service>::namespaced(cluster.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .context("cannot list the namespace's Services for /etc/hosts")?;
    let mut entries = Vec::new();
    for service in &services.items {
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let Some(ip) = service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) else {
            continue;
        };
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let entry = ip
            .parse()
            .with_context(|| format!("its ClusterIP {ip:?} is no IP address"))
            .and_then(|ip| {
                system::HostEntry::new(
                    ip,
                    [
                        name.to_owned(),
                        format!("{name}.{ns}"),
                        format!("{name}.{ns}.svc"),
                        format!("{name}.{ns}.svc.{domain}"),
                    ],
                )
            });
        match entry {
            Ok(entry) => entries.push(entry),
            Err(e) => reporter.warn(format!("Service {name:?} left out of /etc/hosts: {e:#}")),
        }
    }
    Ok(entries)
}
