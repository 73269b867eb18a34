//! Which address ranges `ktb connect` sends into the tunnel.
//!
//! A developer usually may not read cluster-wide objects (nodes, the
//! ServiceCIDR API), so the ranges are guessed from what is visible in the
//! namespace — the ClusterIPs of its Services and the IPs of its pods — and
//! widened to covering prefixes, each at least a /16, since a cluster hands
//! out pod and Service addresses from a few wide blocks, and at most a /12,
//! so that a few scattered addresses never route whole private networks
//! away from the LAN or a VPN. A hostNetwork pod's IP is its node's
//! address, on whatever network the nodes sit on, so it is no clue. When
//! the user may read nodes' `podCIDR`s and ServiceCIDRs, those exact ranges
//! win, if none is wider than the guesses may be.
//! `--cidr` replaces the guess, `--exclude` cuts holes in it, and the
//! apiserver's own address is always cut out: the tunnel rides on it.
//!
//! A range that overlaps a route this machine already has on purpose (a
//! VPN, a docker bridge, the LAN: any route more specific than the default
//! one) would silently take that traffic away, so it is refused with both
//! named, unless the user forces it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ListParams};

/// The narrowest prefix guessed around visible addresses: clusters hand
/// out addresses from blocks at least this wide.
const NARROWEST_GUESS: u8 = 16;
/// The widest prefix discovery routes. Kubernetes' widest default block is
/// a /12 (kubeadm's Service range 10.96.0.0/12), so a cluster's ranges fit;
/// wider ones are what whole sites and VPNs use (10.0.0.0/8), and routing
/// one of those into the tunnel would take their traffic away.
const WIDEST_GUESS: u8 = 12;

/// Ranges seen in the cluster, before exclusions.
pub async fn discover(client: &kube::Client, namespace: &str) -> anyhow::Result<Vec<Ipv4Net>> {
    let exact = exact_ranges(client).await;
    if !exact.is_empty() {
        return Ok(Ipv4Net::aggregate(&exact));
    }
    let services = Api::<Service>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let service_ips = services
        .items
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ips.clone())
        .flatten()
        .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
        .collect::<Vec<_>>();
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await?;
    let mut guessed = covering(&service_ips);
    guessed.extend(covering(&pod_addresses(&pods.items)));
    Ok(Ipv4Net::aggregate(&guessed))
}

/// The pods' own IPv4 addresses. A hostNetwork pod has its node's address,
/// as does any pod whose IP is its host's, so those are left out.
pub fn pod_addresses(pods: &[Pod]) -> Vec<Ipv4Addr> {
    pods.iter()
        .filter(|p| {
            !p.spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false)
        })
        .filter_map(|p| p.status.as_ref())
        .flat_map(|status| {
            let host_ips = status
                .host_ips
                .iter()
                .flatten()
                .map(|h| h.ip.as_str())
                .chain(status.host_ip.as_deref())
                .collect::<Vec<_>>();
            status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.as_str())
                .filter(move |ip| !host_ips.contains(ip))
                .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Node pod CIDRs and ServiceCIDRs, if this user may read them.
async fn exact_ranges(client: &kube::Client) -> Vec<Ipv4Net> {
    let Ok(nodes) = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return Vec::new();
    };
    let Ok(cidrs) = Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return Vec::new();
    };
    let parse = |cidrs: Vec<String>| -> Vec<Ipv4Net> {
        cidrs.iter().filter_map(|c| c.parse().ok()).collect()
    };
    let node_cidrs = parse(
        nodes
            .items
            .iter()
            .filter_map(|n| n.spec.as_ref()?.pod_cidrs.clone())
            .flatten()
            .collect(),
    );
    let service_cidrs = parse(
        cidrs
            .items
            .iter()
            .filter_map(|c| c.spec.as_ref()?.cidrs.clone())
            .flatten()
            .collect(),
    );
    exact(node_cidrs, service_cidrs)
}

/// The cluster's own ranges when they can be routed as they are: pod and
/// Service ranges both (one alone would drop the other kind), none wider
/// than a /[`WIDEST_GUESS`]. Empty means: guess instead.
fn exact(node_cidrs: Vec<Ipv4Net>, service_cidrs: Vec<Ipv4Net>) -> Vec<Ipv4Net> {
    if node_cidrs.is_empty() || service_cidrs.is_empty() {
        return Vec::new();
    }
    let ranges = node_cidrs
        .into_iter()
        .chain(service_cidrs)
        .collect::<Vec<_>>();
    if let Some(wide) = ranges.iter().find(|r| r.prefix_len() < WIDEST_GUESS) {
        tracing::warn!(
            "the cluster's range {wide} is wider than a /{WIDEST_GUESS}, which ktb does not route \
             unasked; routing ranges guessed from the namespace's addresses instead \
             (--cidr routes the ranges you give it)"
        );
        return Vec::new();
    }
    ranges
}

/// Prefixes holding every address, each between a /12 and a /16 (see
/// `WIDEST_GUESS`, `NARROWEST_GUESS`): the addresses that share a /12 are covered by the
/// smallest prefix holding them all, so addresses far apart get prefixes of
/// their own instead of one spanning everything between.
pub fn covering(ips: &[Ipv4Addr]) -> Vec<Ipv4Net> {
    let mut groups = BTreeMap::<Ipv4Net, Vec<Ipv4Addr>>::new();
    for ip in ips {
        let block = Ipv4Net::new(*ip, WIDEST_GUESS)
            .expect("a valid prefix length")
            .trunc();
        groups.entry(block).or_default().push(*ip);
    }
    groups
        .values()
        .map(|group| {
            let mut net = Ipv4Net::new(group[0], NARROWEST_GUESS)
                .expect("a valid prefix length")
                .trunc();
            // Ends at the group's /12 at the latest, which holds them all.
            while !group.iter().all(|ip| net.contains(ip)) {
                net = net.supernet().expect("a /12 has a supernet");
            }
            net
        })
        .collect()
}

/// `ranges` with every `hole` cut out, as few prefixes as possible.
pub fn exclude(ranges: &[Ipv4Net], holes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut out = ranges.to_vec();
    for hole in holes {
        out = out.iter().flat_map(|net| subtract(*net, *hole)).collect();
    }
    Ipv4Net::aggregate(&out)
}

fn subtract(net: Ipv4Net, hole: Ipv4Net) -> Vec<Ipv4Net> {
    if hole.contains(&net) {
        return Vec::new();
    }
    if !net.contains(&hole) {
        return vec![net];
    }
    net.subnets(net.prefix_len() + 1)
        .expect("a net holding a smaller hole can be halved")
        .flat_map(|half| subtract(half, hole))
        .collect()
}

/// A route this machine had before ktb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub net: Ipv4Net,
    pub device: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dev {}", self.net, self.device)
    }
}

/// IPv4 routes of the main table, from `/proc/net/route` (its addresses are
/// little-endian hex).
pub fn parse_proc_routes(text: &str) -> Vec<Route> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_le_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields = line.split_whitespace().collect::<Vec<_>>();
            let (device, dest, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            let net = Ipv4Net::with_netmask(hex(dest)?, hex(mask)?).ok()?;
            Some(Route {
                net,
                device: (*device).to_owned(),
            })
        })
        .collect()
}

/// The first existing route (other than the default and ktb's own device)
/// that a range would take traffic from.
pub fn conflict(
    ranges: &[Ipv4Net],
    routes: &[Route],
    own_device: &str,
) -> Option<(Ipv4Net, Route)> {
    ranges.iter().find_map(|range| {
        routes
            .iter()
            .filter(|r| r.net.prefix_len() > 0 && r.device != own_device)
            .find(|r| r.net.contains(range) || range.contains(&r.net))
            .map(|r| (*range, r.clone()))
    })
}

/// The apiserver's address as a host route to cut out, when it is IPv4.
pub fn host(ip: IpAddr) -> Option<Ipv4Net> {
    match ip {
        IpAddr::V4(v4) => Some(Ipv4Net::from(v4)),
        IpAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ips<const N: usize>(ips: [&str; N]) -> [Ipv4Addr; N] {
        ips.map(|s| s.parse().unwrap())
    }

    #[test]
    fn visible_addresses_widen_to_a_covering_block() {
        let same = ips(["10.96.0.1", "10.96.14.7", "10.96.200.3"]);
        assert_eq!(covering(&same), [net("10.96.0.0/16")]);
        let spread = ips(["10.96.0.1", "10.100.0.1"]);
        assert_eq!(covering(&spread), [net("10.96.0.0/13")]);
        assert!(covering(&[]).is_empty());
    }

    #[test]
    fn no_guess_is_wider_than_a_slash_12() {
        // Once this widened to 0.0.0.0/0, taking every route of the machine.
        let far = ips(["10.96.0.1", "172.16.5.4", "10.244.1.9"]);
        assert_eq!(
            covering(&far),
            [
                net("10.96.0.0/16"),
                net("10.244.0.0/16"),
                net("172.16.0.0/16")
            ]
        );
        let across_a_slash_12 = ips(["10.95.0.1", "10.96.0.1"]);
        assert_eq!(
            covering(&across_a_slash_12),
            [net("10.95.0.0/16"), net("10.96.0.0/16")]
        );
        let whole_block = ips(["10.96.0.1", "10.111.255.254"]);
        assert_eq!(covering(&whole_block), [net("10.96.0.0/12")]);
    }

    #[test]
    fn exact_ranges_wider_than_a_slash_12_are_not_routed() {
        let pods = vec![net("10.244.0.0/24"), net("10.244.1.0/24")];
        assert_eq!(
            exact(pods.clone(), vec![net("10.96.0.0/12")]),
            [
                net("10.244.0.0/24"),
                net("10.244.1.0/24"),
                net("10.96.0.0/12")
            ]
        );
        assert!(exact(pods.clone(), vec![net("10.0.0.0/8")]).is_empty());
        assert!(exact(pods, Vec::new()).is_empty());
    }

    fn pod(ip: &str, host_ip: &str, host_network: Option<bool>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p" },
            "spec": { "containers": [], "hostNetwork": host_network },
            "status": { "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": host_ip, "hostIPs": [{ "ip": host_ip }] },
        }))
        .unwrap()
    }

    #[test]
    fn host_network_pods_are_no_clue_to_the_cluster_ranges() {
        let pods = [
            pod("10.244.1.7", "192.168.10.21", None),
            pod("10.244.2.9", "192.168.10.22", Some(false)),
            // kube-proxy, CNI agents: the node's address on the office LAN.
            pod("192.168.10.21", "192.168.10.21", Some(true)),
            // The same, with hostNetwork not reported.
            pod("192.168.10.22", "192.168.10.22", None),
        ];
        let found = pod_addresses(&pods);
        assert_eq!(found, ips(["10.244.1.7", "10.244.2.9"]));
        assert_eq!(covering(&found), [net("10.244.0.0/16")]);
    }

    #[test]
    fn holes_are_cut_out_and_the_rest_kept() {
        let out = exclude(&[net("10.0.0.0/8")], &[net("10.77.0.1/32")]);
        assert!(!out
            .iter()
            .any(|n| n.contains(&"10.77.0.1".parse::<Ipv4Addr>().unwrap())));
        assert!(out
            .iter()
            .any(|n| n.contains(&"10.77.0.2".parse::<Ipv4Addr>().unwrap())));
        assert!(out
            .iter()
            .any(|n| n.contains(&"10.96.0.1".parse::<Ipv4Addr>().unwrap())));
        assert_eq!(out.len(), 24, "one prefix per halving: {out:?}");
        assert_eq!(
            exclude(&[net("10.96.0.0/16")], &[net("10.0.0.0/8")]),
            vec![]
        );
        assert_eq!(
            exclude(&[net("10.96.0.0/16")], &[net("192.168.0.0/16")]),
            vec![net("10.96.0.0/16")]
        );
    }

    #[test]
    fn proc_routes_parse_and_conflicts_name_the_route() {
        let text =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t01004D0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    ktb0\t0000600A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let routes = parse_proc_routes(text);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].to_string(), "10.77.0.0/24 dev eth0");
        assert_eq!(conflict(&[net("10.96.0.0/16")], &routes, "ktb0"), None);
        assert_eq!(
            conflict(&[net("10.96.0.0/16"), net("10.77.0.0/16")], &routes, "ktb0"),
            Some((net("10.77.0.0/16"), routes[1].clone()))
        );
    }
}
