//! The cluster's networks and the firewall that keeps tests inside them.
//!
//! - The node network: bridge `NODE_BRIDGE` holding the node address, where
//!   the apiserver and kubelet listen, as on a real node's NIC.
//! - The laptops: one network namespace each, a veth into the node bridge,
//!   a default route via the node, and their own `/etc/netns/NAME/resolv.conf`
//!   and `hosts`.
//! - The guard: an nftables table of this tooling's own (removed as a whole
//!   by `down`) that lets laptops reach the apiserver port and nothing else,
//!   keeps pods from reaching the laptops, and drops anything a pod sends
//!   that would be forwarded out of the CNI bridge, or anything forwarded to
//!   the machine's uplink: no test traffic can leave this machine.

use super::{
    process, snapshot, Laptop, APISERVER_PORT, CLUSTER_CIDR, CNI_BRIDGE, LAPTOPS, NODE_BRIDGE,
    NODE_IP, NODE_PREFIX, SERVICE_CIDR,
};
use anyhow::{Context, Result};

/// The nftables table holding the guard rules.
pub const GUARD_TABLE: &str = "ktb-guard";

pub fn create_node_network() -> Result<()> {
    process::run("ip", &["link", "add", NODE_BRIDGE, "type", "bridge"])?;
    process::run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{NODE_IP}/{NODE_PREFIX}"),
            "dev",
            NODE_BRIDGE,
        ],
    )?;
    process::run("ip", &["link", "set", NODE_BRIDGE, "up"])?;
    Ok(())
}

/// Create the laptops. Must run before containerd and the kubelet start:
/// `ip netns add` may turn /run/netns into a mount point, which pods'
/// network namespaces (pinned under /run/netns too) do not survive.
pub fn create_laptops() -> Result<()> {
    for laptop in &LAPTOPS {
        create_laptop(laptop).with_context(|| format!("creating {}", laptop.netns))?;
    }
    Ok(())
}

fn create_laptop(l: &Laptop) -> Result<()> {
    let dir = format!("/etc/netns/{}", l.netns);
    std::fs::create_dir_all(&dir)?;
    // Nothing answers DNS on a laptop until a tool (ktb) provides it; the
    // loopback nameserver makes lookups fail at once instead of timing out.
    std::fs::write(
        format!("{dir}/resolv.conf"),
        "# Simulated developer laptop: no DNS server until ktb provides one.\n\
         nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )?;
    // The laptop's own hosts file, with a name only the laptop knows
    // (TEST-NET-1, never contacted): `ktb connect` must keep it resolving,
    // and may only ever touch this copy, never the machine's /etc/hosts.
    std::fs::write(
        format!("{dir}/hosts"),
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n192.0.2.10 laptop-only.test\n",
    )?;
    process::run("ip", &["netns", "add", l.netns])?;
    process::run(
        "ip",
        &[
            "link",
            "add",
            l.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            l.netns,
        ],
    )?;
    process::run(
        "ip",
        &["link", "set", l.host_veth, "master", NODE_BRIDGE, "up"],
    )?;
    let ns = |args: &[&str]| -> Result<String> {
        let mut full = vec!["netns", "exec", l.netns, "ip"];
        full.extend_from_slice(args);
        process::run("ip", &full)
    };
    ns(&["link", "set", "lo", "up"])?;
    ns(&[
        "addr",
        "add",
        &format!("{}/{NODE_PREFIX}", l.ip),
        "dev",
        "eth0",
    ])?;
    ns(&["link", "set", "eth0", "up"])?;
    // A default route through the node, as a laptop on the office network
    // would have: whether cluster addresses are reachable is then up to the
    // guard rules, not to a missing route.
    ns(&["route", "add", "default", "via", NODE_IP])?;
    Ok(())
}

/// The machine's uplink: the interface of the default route.
fn uplink() -> Result<Option<String>> {
    let out = process::run("ip", &["-o", "route", "show", "default"])?;
    Ok(out
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_owned))
}

pub fn install_guard() -> Result<()> {
    let (uplink_forward, uplink_output) = match uplink()? {
        Some(dev) => (
            format!("oifname \"{dev}\" counter drop comment \"nothing forwarded leaves by the uplink\"\n"),
            format!(
                "oifname \"{dev}\" ip daddr {{ {CLUSTER_CIDR}, {SERVICE_CIDR} }} counter drop \
                 comment \"cluster addresses are never sent to the uplink\"\n"
            ),
        ),
        None => (String::new(), String::new()),
    };
    let rules = format!(
        "table inet {GUARD_TABLE} {{\n\
         chain input {{\n\
           type filter hook input priority -10; policy accept;\n\
           iifname \"{NODE_BRIDGE}\" ct state established,related accept\n\
           iifname \"{NODE_BRIDGE}\" ip daddr {NODE_IP} tcp dport {APISERVER_PORT} accept comment \"laptops: the apiserver\"\n\
           iifname \"{NODE_BRIDGE}\" counter drop comment \"laptops: nothing else on the node\"\n\
         }}\n\
         chain forward {{\n\
           type filter hook forward priority -10; policy accept;\n\
           iifname \"{NODE_BRIDGE}\" counter drop comment \"laptops: nothing through the node\"\n\
           oifname \"{NODE_BRIDGE}\" counter drop comment \"pods: not the laptops\"\n\
           iifname \"{CNI_BRIDGE}\" oifname != \"{CNI_BRIDGE}\" counter drop comment \"pods: nothing leaves the pod network\"\n\
           {uplink_forward}\
         }}\n\
         chain output {{\n\
           type filter hook output priority -10; policy accept;\n\
           {uplink_output}\
         }}\n\
         }}\n"
    );
    process::run_with_input("nft", &["-f", "-"], &rules)?;
    Ok(())
}

/// Forwarding (pod -> ClusterIP -> pod) and bridge netfilter (kube-proxy's
/// rules must see traffic between pods on the same bridge). The old values
/// are in the `up` snapshot; `down` restores them.
pub fn set_sysctls() -> Result<()> {
    snapshot::write_sysctl("net.ipv4.ip_forward", "1")?;
    snapshot::write_sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
    Ok(())
}
