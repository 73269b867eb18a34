//! The flags of the commands that hold a session in the cluster (exchange,
//! mesh, preview, connect) and the library options each becomes, so that
//! `main` only dispatches: what a flag means to ktb is said once, here.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use ktb::connect::{self, ConnectOptions};
use ktb::exchange::{self, ExchangeOptions};
use ktb::expose::{Expose, ExposeArg};
use ktb::mesh::{self, MeshOptions};
use ktb::preview::PreviewOptions;
use ktb::session::agent_pod::{AgentSettings, DEFAULT_AGENT_IMAGE};
use ktb::session::shadow::TransportKind;
use ktb_kube::grace::parse_duration;

/// `ktb exchange`.
#[derive(clap::Args)]
pub(crate) struct ExchangeArgs {
    /// The Service (`orders`, `svc/orders`).
    service: String,
    /// LOCAL[:REMOTE]: the Service port REMOTE (number, name or target
    /// port; default: its only port) goes to 127.0.0.1:LOCAL. Repeatable.
    #[arg(long, required = true)]
    expose: Vec<ExposeArg>,
    /// How traffic moves: rewrite the Service's selector, or scale the
    /// workload behind it to zero while the shadow pod takes its labels.
    #[arg(long, value_enum, default_value_t = ExchangeMode::Selector)]
    mode: ExchangeMode,
    /// How this machine reaches the agent.
    #[arg(long, value_enum, default_value_t = Transport::PortForward)]
    transport: Transport,
    /// How long the cluster waits for this machine after losing it
    /// before restoring the Service on its own.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    agent: AgentArgs,
}

/// `ktb mesh`.
#[derive(clap::Args)]
pub(crate) struct MeshArgs {
    /// The Service (`orders`, `svc/orders`).
    service: String,
    /// LOCAL[:REMOTE]: marked requests to the Service port REMOTE
    /// (number, name or target port; default: its only port) go to
    /// 127.0.0.1:LOCAL. Repeatable.
    #[arg(long, required = true)]
    expose: Vec<ExposeArg>,
    /// Your mark, NAME=VALUE (default: x-ktb-mark=<you>-<random>).
    #[arg(long)]
    header: Option<mesh::Mark>,
    /// How this machine reaches the agent.
    #[arg(long, value_enum, default_value_t = Transport::PortForward)]
    transport: Transport,
    /// How long the cluster waits for this machine after losing it
    /// before ending the membership on its own.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    agent: AgentArgs,
}

/// `ktb preview`.
#[derive(clap::Args)]
pub(crate) struct PreviewArgs {
    /// The new Service's name; refused if a Service of that name exists.
    name: String,
    /// LOCAL[:PORT]: the Service's port PORT (default: LOCAL) goes to
    /// 127.0.0.1:LOCAL. Repeatable.
    #[arg(long, required = true)]
    expose: Vec<Expose>,
    /// How this machine reaches the agent.
    #[arg(long, value_enum, default_value_t = Transport::PortForward)]
    transport: Transport,
    /// How long the cluster waits for this machine after losing it
    /// before removing the Service on its own.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    agent: AgentArgs,
}

/// `ktb connect`.
#[derive(clap::Args)]
pub(crate) struct ConnectArgs {
    /// tun: every program (root or CAP_NET_ADMIN); socks5: a proxy on
    /// loopback for programs told to use it (no root).
    #[arg(long, value_enum, default_value_t = ConnectMode::Tun)]
    mode: ConnectMode,
    /// How cluster names reach this machine's resolver (tun mode).
    #[arg(long, value_enum, default_value_t = Dns::Resolv)]
    dns: Dns,
    /// The longest ktb's DNS server (--dns resolv) keeps an answer from
    /// the cluster: each is kept for its own TTL (a "no such name" for
    /// its SOA's), but no longer than this; 0 turns the cache off.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = connect::dns_cache::DEFAULT_MAX_TTL,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(connect::dns_cache::MAX_TTL_LIMIT)),
    )]
    dns_cache_ttl: u32,
    /// A range to route into the cluster instead of the discovered ones (repeatable).
    #[arg(long = "cidr")]
    cidrs: Vec<ipnet::Ipv4Net>,
    /// A range to keep out of the tunnel (repeatable).
    #[arg(long = "exclude")]
    excludes: Vec<ipnet::Ipv4Net>,
    /// Route ranges even where they overlap a route this machine already has.
    #[arg(long)]
    force_routes: bool,
    /// Name of the TUN device.
    #[arg(long, default_value = "ktb0")]
    device: String,
    /// Where the SOCKS5 proxy listens (socks5 mode).
    #[arg(long, default_value = "127.0.0.1:1080")]
    socks: std::net::SocketAddr,
    /// Where the journal of local changes is kept.
    #[arg(long, env = "KTB_STATE_DIR", default_value = "/var/lib/ktb")]
    state_dir: PathBuf,
    /// How long the cluster waits for this machine after losing it
    /// before removing the agent on its own.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    agent: AgentArgs,
}

impl From<ExchangeArgs> for ExchangeOptions {
    fn from(args: ExchangeArgs) -> ExchangeOptions {
        ExchangeOptions {
            service: args.service,
            mode: args.mode.into(),
            transport: args.transport.into(),
            exposes: args.expose,
            grace: args.grace,
            agent: args.agent.into(),
        }
    }
}

impl From<MeshArgs> for MeshOptions {
    fn from(args: MeshArgs) -> MeshOptions {
        MeshOptions {
            service: args.service,
            exposes: args.expose,
            mark: args.header,
            transport: args.transport.into(),
            grace: args.grace,
            agent: args.agent.into(),
        }
    }
}

impl From<PreviewArgs> for PreviewOptions {
    fn from(args: PreviewArgs) -> PreviewOptions {
        PreviewOptions {
            name: args.name,
            exposes: args.expose,
            transport: args.transport.into(),
            grace: args.grace,
            agent: args.agent.into(),
        }
    }
}

impl From<ConnectArgs> for ConnectOptions {
    fn from(args: ConnectArgs) -> ConnectOptions {
        ConnectOptions {
            mode: args.mode.into(),
            dns: args.dns.into(),
            dns_cache_ttl: args.dns_cache_ttl,
            cidrs: args.cidrs,
            excludes: args.excludes,
            force_routes: args.force_routes,
            device: args.device,
            socks: args.socks,
            state_dir: args.state_dir,
            grace: args.grace,
            agent: args.agent.into(),
        }
    }
}

/// `exchange --mode`: how the Service's traffic moves to the shadow pod.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ExchangeMode {
    /// Point the Service's selector at the shadow pod; the original pods
    /// keep running untouched.
    Selector,
    /// The shadow pod takes the workload's pod labels and the Deployment or
    /// StatefulSet behind the Service is scaled to zero.
    Scale,
}

impl From<ExchangeMode> for exchange::Mode {
    fn from(mode: ExchangeMode) -> exchange::Mode {
        match mode {
            ExchangeMode::Selector => exchange::Mode::Selector,
            ExchangeMode::Scale => exchange::Mode::Scale,
        }
    }
}

/// `exchange --transport`: how this machine reaches the agent.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Transport {
    /// A port-forward through the apiserver: works wherever kubectl does.
    PortForward,
    /// TLS straight to the pod's IP (a VPN into the cluster network, or
    /// `ktb connect`), accepting only the certificate the agent made, whose
    /// fingerprint comes through a port-forward.
    Direct,
    /// Direct when the pod's IP answers from this machine, else the
    /// port-forward; says which it took.
    Auto,
}

impl From<Transport> for TransportKind {
    fn from(transport: Transport) -> TransportKind {
        match transport {
            Transport::PortForward => TransportKind::PortForward,
            Transport::Direct => TransportKind::Direct,
            Transport::Auto => TransportKind::Auto,
        }
    }
}

/// `connect --mode`.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ConnectMode {
    /// A TUN device and routes: every program, every protocol (needs root
    /// or CAP_NET_ADMIN).
    Tun,
    /// A SOCKS5 proxy on loopback: programs that are told to use it; no root.
    Socks5,
}

impl From<ConnectMode> for connect::Mode {
    fn from(mode: ConnectMode) -> connect::Mode {
        match mode {
            ConnectMode::Tun => connect::Mode::Tun,
            ConnectMode::Socks5 => connect::Mode::Socks5,
        }
    }
}

/// `connect --dns`.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Dns {
    /// ktb's DNS server first in /etc/resolv.conf, the original servers after it;
    /// where resolv.conf links to systemd-resolved's stub, the cluster's domains
    /// registered with resolved on ktb's device instead.
    Resolv,
    /// The namespace's Services written into a marked block of /etc/hosts.
    Hosts,
    /// No cluster names; addresses only.
    Off,
}

impl From<Dns> for connect::DnsMode {
    fn from(dns: Dns) -> connect::DnsMode {
        match dns {
            Dns::Resolv => connect::DnsMode::Resolv,
            Dns::Hosts => connect::DnsMode::Hosts,
            Dns::Off => connect::DnsMode::Off,
        }
    }
}

/// The agent pod every cluster-side command starts.
#[derive(clap::Args)]
pub(crate) struct AgentArgs {
    /// The agent image.
    #[arg(long, env = "KTB_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    agent_image: String,
    /// imagePullPolicy of the agent pod.
    #[arg(long, env = "KTB_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// How long to wait for the agent pod to become ready.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    ready_timeout: Duration,
}

impl From<AgentArgs> for AgentSettings {
    fn from(args: AgentArgs) -> AgentSettings {
        AgentSettings {
            image: args.agent_image,
            pull_policy: args.image_pull_policy,
            ready_timeout: args.ready_timeout,
        }
    }
}
