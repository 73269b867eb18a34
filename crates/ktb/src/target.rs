//! Which Service, and which of its ports go to which local port.
//!
//! Everything here only reads the cluster: a Service that cannot be
//! exchanged, or an `--expose` that matches none (or several) of its ports,
//! is refused before anything is changed, with the Service's ports listed.

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

use ktb_kube::selector::display;
use ktb_kube::service::selector_of;

use crate::expose::ExposeArg;
use crate::service_ports::{container_port_named, describe, get_service, is_named_by};

/// A port the Service targets, as its pods declare it: an agent pod that
/// stands in for them declares it alike, so the Service finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredPort {
    pub number: u16,
    /// The name the workload's pods give this port: the one a named
    /// `targetPort` refers to; `None` when the Service targets it by number.
    pub name: Option<String>,
    /// `TCP`, `UDP` or `SCTP`, as the Service port says.
    pub protocol: String,
}

/// A Service port carried to a local port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRoute {
    pub local: u16,
    pub service_port: i32,
    /// Where the Service sends traffic: the port the agent must listen on.
    pub target_port: u16,
}

/// Every port the Service targets, numbered and named as its pods declare
/// them, for the agent pod to declare alike. A named target port no pod
/// declares is left out here; exposing it fails in [`resolve_ports`].
pub async fn declared_ports(pods: &Api<Pod>, service: &Service) -> Vec<DeclaredPort> {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut declared: Vec<DeclaredPort> = Vec::new();
    for port in ports {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let (number, name) = match &port.target_port {
            None => (port.port, None),
            Some(IntOrString::Int(target)) => (*target, None),
            Some(IntOrString::String(named)) => match named_target_port(pods, service, named).await
            {
                Ok(number) => (number, Some(named.clone())),
                Err(_) => continue,
            },
        };
        let Ok(number) = u16::try_from(number) else {
            continue;
        };
        let taken = declared.iter().any(|d| {
            (d.number, &d.protocol) == (number, &protocol) || (name.is_some() && d.name == name)
        });
        if !taken {
            declared.push(DeclaredPort {
                number,
                name,
                protocol,
            });
        }
    }
    declared
}

/// The Service a command line names: `orders`, `svc/orders` or
/// `service/orders`, as kubectl accepts them.
pub fn service_name(argument: &str) -> String {
    argument
        .trim_start_matches("svc/")
        .trim_start_matches("service/")
        .to_owned()
}

/// Reads the Service and checks that ktb can stand in for it.
pub async fn exchangeable_service(
    services: &Api<Service>,
    name: &str,
    namespace: &str,
) -> anyhow::Result<Service> {
    let service = get_service(services, name, namespace).await?;
    let spec = service.spec.as_ref().context("the Service has no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        anyhow::bail!(
            "Service {name} is an ExternalName alias for {:?}: it has no pods to stand in for",
            spec.external_name
        );
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        anyhow::bail!(
            "Service {name} is headless (clusterIP: None): callers resolve pod addresses directly, \
             so changing its selector would not move their traffic reliably"
        );
    }
    if selector_of(&service).is_empty() {
        anyhow::bail!(
            "Service {name} has no selector: its endpoints are managed by hand or by a controller, \
             and ktb can only exchange Services that select pods"
        );
    }
    Ok(service)
}

/// Matches every `--expose` to exactly one Service port.
pub async fn resolve_ports(
    pods: &Api<Pod>,
    service: &Service,
    exposes: &[ExposeArg],
) -> anyhow::Result<Vec<PortRoute>> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let listing = || format!("Service {name} has ports: {}", describe(&ports));
    let mut routes = Vec::new();
    for expose in exposes {
        let matches: Vec<&ServicePort> = match &expose.remote {
            None if ports.len() == 1 => ports.iter().collect(),
            None => ports
                .iter()
                .filter(|p| p.port == i32::from(expose.local))
                .collect(),
            Some(remote) => ports.iter().filter(|p| port_matches(p, remote)).collect(),
        };
        let wanted = expose
            .remote
            .clone()
            .unwrap_or_else(|| expose.local.to_string());
        let port = match matches.as_slice() {
            [port] => *port,
            [] => anyhow::bail!(
                "--expose {}: no port {wanted} on the Service. {}",
                expose.local,
                listing()
            ),
            _ => anyhow::bail!(
                "--expose {}: {wanted} matches several ports; name one as LOCAL:REMOTE. {}",
                expose.local,
                listing()
            ),
        };
        let target_port = match &port.target_port {
            None => port.port,
            Some(IntOrString::Int(target)) => *target,
            Some(IntOrString::String(named)) => named_target_port(pods, service, named).await?,
        };
        let target_port = u16::try_from(target_port)
            .with_context(|| format!("invalid target port {target_port}"))?;
        if routes
            .iter()
            .any(|r: &PortRoute| r.target_port == target_port)
        {
            anyhow::bail!("target port {target_port} is exposed twice");
        }
        routes.push(PortRoute {
            local: expose.local,
            service_port: port.port,
            target_port,
        });
    }
    Ok(routes)
}

fn port_matches(port: &ServicePort, remote: &str) -> bool {
    is_named_by(port, remote)
        || match &port.target_port {
            Some(IntOrString::Int(t)) => remote.parse::<i32>().ok() == Some(*t),
            Some(IntOrString::String(t)) => t == remote,
            None => false,
        }
}

/// A named target port means whatever the selected pods call that name.
async fn named_target_port(pods: &Api<Pod>, service: &Service, named: &str) -> anyhow::Result<i32> {
    let selector = display(&selector_of(service));
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    let found = list
        .items
        .iter()
        .find_map(|pod| container_port_named(pod, named));
    found.with_context(|| {
        format!("the Service's target port {named:?} is a name, and no pod matching {selector} declares a port of that name")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, port: i32, target: IntOrString) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target_port: Some(target),
            ..ServicePort::default()
        }
    }

    #[test]
    fn ports_match_by_name_number_or_target() {
        let http = port("http", 80, IntOrString::Int(8080));
        assert!(port_matches(&http, "http"));
        assert!(port_matches(&http, "80"));
        assert!(port_matches(&http, "8080"));
        assert!(!port_matches(&http, "443"));
        let named = port("web", 80, IntOrString::String("web-port".into()));
        assert!(port_matches(&named, "web-port"));
        assert_eq!(describe(&[http, named]), "http 80→8080, web 80→web-port");
    }
}
