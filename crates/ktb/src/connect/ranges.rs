//! Which address ranges `ktb connect` sends into the tunnel.
//!
//! A developer usually may not read cluster-wide objects (nodes, the
//! ServiceCIDR API), so the ranges are guessed from what is visible in the
//! namespace — the ClusterIPs of its Services and the IPs of its pods — and
//! widened to covering prefixes, each at least a /16, since a cluster hands
//! out pod and Service addresses from a few wide blocks. When the user may
//! read nodes' `podCIDR`s and ServiceCIDRs, those exact ranges win.
//! `--cidr` replaces the guess, `--exclude` cuts holes in it, and the
//! apiserver's own address is always cut out: the tunnel rides on it.
//!
//! A range that overlaps a route this machine already has on purpose (a
//! VPN, a docker bridge, the LAN: any route more specific than the default
//! one) would silently take that traffic away, so it is refused with both
//! named, unless the user forces it.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ListParams};

/// The widest guess made from visible addresses of one kind.
const GUESS_PREFIX: u8 = 16;

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
    let pod_ips = pods
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ips.clone())
        .flatten()
        .filter_map(|ip| ip.ip.parse::<Ipv4Addr>().ok())
        .collect::<Vec<_>>();
    let guessed = [covering(&service_ips), covering(&pod_ips)]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    Ok(Ipv4Net::aggregate(&guessed))
}

/// Node pod CIDRs and ServiceCIDRs, if this user may read them.
async fn exact_ranges(client: &kube::Client) -> Vec<Ipv4Net> {
    let mut ranges = Vec::new();
    let Ok(nodes) = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return ranges;
    };
    let Ok(cidrs) = Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return ranges;
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
    // Only both together are exact; one alone would drop the other kind.
    if !node_cidrs.is_empty() && !service_cidrs.is_empty() {
        ranges.extend(node_cidrs.into_iter().chain(service_cidrs));
    }
    ranges
}

/// The smallest prefix, no narrower than [`GUESS_PREFIX`], holding every address.
pub fn covering(ips: &[Ipv4Addr]) -> Option<Ipv4Net> {
    let first = *ips.first()?;
    let mut net = Ipv4Net::new(first, GUESS_PREFIX).ok()?.trunc();
    while !ips.iter().all(|ip| net.contains(ip)) {
        net = net.supernet()?;
    }
    Some(net)
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

    #[test]
    fn visible_addresses_widen_to_a_covering_block() {
        let ips = ["10.96.0.1", "10.96.14.7", "10.96.200.3"].map(|s| s.parse().unwrap());
        assert_eq!(covering(&ips), Some(net("10.96.0.0/16")));
        let spread = ["10.96.0.1", "10.100.0.1"].map(|s| s.parse().unwrap());
        assert_eq!(covering(&spread), Some(net("10.96.0.0/13")));
        assert_eq!(covering(&[]), None);
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
