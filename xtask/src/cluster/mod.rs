//! The project's test cluster: a real single-node Kubernetes that this
//! repository builds and runs itself, plus two simulated developer laptops.
//!
//! End-to-end tests need a cluster that behaves like a real one (real
//! apiserver, kubelet, containerd, kube-proxy in iptables mode, CoreDNS,
//! RBAC) but that no test can escape from: nothing is pulled from a
//! registry, nothing a pod sends may leave the machine, and `down` must
//! leave the machine exactly as `up` found it. The pieces:
//!
//! - [`admin`]: the admin's kubectl, for benchmarks and the demo;
//! - [`build`]: the Go components (pinned upstream releases, from
//!   `tests/cluster/*`), cached under `~/.cache/ktb/`, and the images:
//!   registry-free OCI archives for containerd, written by the `ktb-image`
//!   crate, which `ktb agent image export` writes the agent image with too;
//! - [`pki`]: certificates and kubeconfigs (admin, components, developers);
//! - [`net`]: the node network, the laptops and the firewall;
//! - [`config`]: every component's configuration file and the add-on manifests;
//! - [`process`]: starting daemons detached and stopping them by PID;
//! - [`snapshot`]: what the machine looked like before `up`, to restore and
//!   verify after `down`;
//! - [`lifecycle`]: `up`, `down` and their ordering.

mod admin;
mod build;
mod config;
mod lifecycle;
mod net;
mod pki;
mod process;
mod snapshot;

pub use admin::Admin;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
pub use process::{on_path, signal, signal_group};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum Command {
    /// Build (or reuse cached) components and start the cluster.
    Up,
    /// Stop everything `up` started and restore the machine.
    Down,
    /// Rebuild the workspace's images (agent, workloads) and import them
    /// into the running cluster.
    Images,
    /// Stop the kube-apiserver and start it again with the same command
    /// line, as an upgrade or a crash would (for fault tests); returns once
    /// it is ready again.
    RestartApiserver,
    /// Show what is running.
    Status,
    /// Print the environment for `admin`, `dev-a` or `dev-b`.
    Env { name: String },
}

/// Whether the test cluster is up (every daemon alive, the apiserver ready).
pub fn is_up() -> Result<bool> {
    lifecycle::is_up(&Layout::new()?)
}

/// The delaying proxy of the far-laptop benchmarks, built from its Go
/// module into the cache like the cluster's own components.
pub fn toxiproxy() -> Result<PathBuf> {
    build::toxiproxy(&Layout::new()?)
}

/// The kubeconfig of `user` (`admin`, `dev-a`, `dev-b`).
pub fn kubeconfig(user: &str) -> Result<PathBuf> {
    Ok(Layout::new()?.kubeconfig(user))
}

pub fn run(command: Command) -> Result<()> {
    let layout = Layout::new()?;
    match command {
        Command::Up => lifecycle::up(&layout),
        Command::Down => lifecycle::down(&layout),
        Command::Status => lifecycle::status(&layout),
        Command::Images => lifecycle::reload_images(&layout),
        Command::RestartApiserver => lifecycle::restart_apiserver(&layout),
        Command::Env { name } => {
            print!("{}", env_script(&layout, &name)?);
            Ok(())
        }
    }
}

/// Pinned component versions: part of every cache key.
pub const K8S_VERSION: &str = "v1.34.4";
pub const ETCD_VERSION: &str = "v3.6.16";
pub const COREDNS_VERSION: &str = "v1.14.7";
/// Toxiproxy, the far-laptop benchmarks' delaying proxy (`bench::far`).
pub const TOXIPROXY_VERSION: &str = "v2.5.0";

/// The node's name, and its address on the node network (`NODE_BRIDGE`):
/// the apiserver and the kubelet listen here, never on loopback or the uplink.
pub const NODE_NAME: &str = "ktb-node";
pub const NODE_IP: &str = "10.77.0.1";
pub const NODE_PREFIX: u8 = 24;
pub const NODE_BRIDGE: &str = "ktbnode0";
pub const APISERVER_PORT: u16 = 6443;

/// Pods: one /24 of the cluster range on the CNI bridge.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const POD_CIDR: &str = "10.244.0.0/24";
pub const POD_GATEWAY: &str = "10.244.0.1";
pub const CNI_BRIDGE: &str = "ktbcni0";

/// Services, the `kubernetes` Service and the cluster DNS.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const DNS_IP: &str = "10.96.0.10";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The namespace both developers work in (the developer Role is bound to
/// group `developers` there), and one only `dev-b` may use.
pub const SHARED_NAMESPACE: &str = "team-a";
pub const DEV_B_NAMESPACE: &str = "team-b";

/// Images imported into containerd (namespace `k8s.io`); never pulled.
pub const PAUSE_IMAGE: &str = "ktb.test/pause:dev";
pub const COREDNS_IMAGE: &str = "ktb.test/coredns:dev";
pub const AGENT_IMAGE: &str = "ktb.test/ktb-agent:dev";
pub const HTTP_ECHO_IMAGE: &str = "ktb.test/http-echo:dev";
pub const GRPC_ECHO_IMAGE: &str = "ktb.test/grpc-echo:dev";
pub const TCP_ECHO_IMAGE: &str = "ktb.test/tcp-echo:dev";
pub const UDP_ECHO_IMAGE: &str = "ktb.test/udp-echo:dev";

/// A simulated developer laptop: a network namespace that reaches the
/// apiserver and nothing else of the cluster.
pub struct Laptop {
    pub netns: &'static str,
    pub user: &'static str,
    pub namespace: &'static str,
    pub ip: &'static str,
    /// The host end of its veth pair, a port of `NODE_BRIDGE`.
    pub host_veth: &'static str,
}

pub const LAPTOPS: [Laptop; 2] = [
    Laptop {
        netns: "laptop-a",
        user: "dev-a",
        namespace: SHARED_NAMESPACE,
        ip: "10.77.0.11",
        host_veth: "ktbl-laptop-a",
    },
    Laptop {
        netns: "laptop-b",
        user: "dev-b",
        namespace: SHARED_NAMESPACE,
        ip: "10.77.0.12",
        host_veth: "ktbl-laptop-b",
    },
];

/// Where things live. The state dir holds everything a running cluster
/// writes (etcd data, containerd and kubelet roots, certificates, logs,
/// PIDs); the cache dir holds build outputs shared across sessions.
pub struct Layout {
    pub workspace: PathBuf,
    pub state: PathBuf,
    pub cache: PathBuf,
}

impl Layout {
    fn new() -> Result<Self> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let state = std::env::var_os("KTB_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/ktb-cluster"));
        let cache = match std::env::var_os("KTB_CACHE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .context("neither XDG_CACHE_HOME nor HOME is set")?;
                base.join("ktb")
            }
        };
        Ok(Self {
            workspace,
            state,
            cache,
        })
    }

    /// Symlinks to the cached binaries in use (kubectl among them).
    pub fn bin(&self) -> PathBuf {
        self.state.join("bin")
    }
    pub fn kubectl(&self) -> PathBuf {
        self.bin().join("kubectl")
    }
    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.state.join("kubeconfig").join(format!("{user}.yaml"))
    }
    pub fn logs(&self) -> PathBuf {
        self.state.join("logs")
    }
    /// Runtime data that `down` deletes (everything else in the state dir
    /// is small and kept for post-mortems).
    pub fn run(&self) -> PathBuf {
        self.state.join("run")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.run().join("containerd").join("containerd.sock")
    }
}

/// The shell environment for `admin`, `dev-a` or `dev-b`.
fn env_script(layout: &Layout, name: &str) -> Result<String> {
    let mut out = String::new();
    let kubeconfig = layout.kubeconfig(name);
    if name == "admin" {
        out.push_str("# Cluster admin (system:masters), from this machine's own network.\n");
    } else if let Some(laptop) = LAPTOPS.iter().find(|l| l.user == name) {
        out.push_str(&format!(
            "# Developer {name} (group developers), working in namespace {ns}.\n\
             # Run commands on the laptop with: ip netns exec {netns} COMMAND\n\
             export KTB_LAPTOP_NETNS={netns}\n\
             export KTB_NAMESPACE={ns}\n",
            ns = laptop.namespace,
            netns = laptop.netns,
        ));
    } else {
        bail!("unknown identity {name:?}: expected admin, dev-a or dev-b");
    }
    if !kubeconfig.exists() {
        bail!(
            "{} does not exist: is the cluster up? (cargo xtask cluster up)",
            kubeconfig.display()
        );
    }
    out.push_str(&format!(
        "export KTB_CLUSTER_DIR={state}\n\
         export KUBECONFIG={kc}\n\
         export PATH={bin}:\"$PATH\"\n",
        state = layout.state.display(),
        kc = kubeconfig.display(),
        bin = layout.bin().display(),
    ));
    Ok(out)
}
