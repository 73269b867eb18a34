//! Reading a Service and what its ports mean on the pods it selects, for
//! every command that follows a Service to its pods: `exchange` stands in
//! for them, `forward` reaches them.
//!
//! Read-only. A Service port is named by its number or its name; its
//! target port is a number or a name each pod gives one of its container
//! ports, so a named target port can only be resolved against a pod.

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;

/// Reads the Service `name`; a missing one is an error saying how to list
/// the namespace's Services.
pub async fn get_service(
    services: &Api<Service>,
    name: &str,
    namespace: &str,
) -> anyhow::Result<Service> {
    match services.get_opt(name).await {
        Ok(Some(service)) => Ok(service),
        Ok(None) => anyhow::bail!(
            "Service {name} not found in namespace {namespace} (`kubectl get services -n {namespace}` lists them; \
             is the namespace right?)"
        ),
        // The apiserver refuses a namespace that does not exist as it
        // refuses one the developer may not read, so both are said.
        Err(kube::Error::Api(status)) if crate::refusal::missing_permission(&status) => {
            Err(kube::Error::Api(status)).with_context(|| {
                format!(
                    "cannot read Service {name} in namespace {namespace}: you may not read \
                     Services there, or namespace {namespace} does not exist (is -n right?)"
                )
            })
        }
        Err(e) => Err(e).with_context(|| format!("cannot read Service {name} in namespace {namespace}")),
    }
}

/// Whether `remote` names this Service port, by its name or its number.
pub fn is_named_by(port: &ServicePort, remote: &str) -> bool {
    port.name.as_deref() == Some(remote) || remote.parse::<i32>().ok() == Some(port.port)
}

/// The container port `pod` gives the name `name`, if any of its
/// containers declares one.
pub fn container_port_named(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// The Service's ports for an error message: `http 80→8080, web 81→web-port`.
pub fn describe(ports: &[ServicePort]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    ports
        .iter()
        .map(|p| {
            let name = p
                .name
                .as_deref()
                .map(|n| format!("{n} "))
                .unwrap_or_default();
            let target = match &p.target_port {
                Some(IntOrString::Int(t)) => t.to_string(),
                Some(IntOrString::String(t)) => t.clone(),
                None => p.port.to_string(),
            };
            format!("{name}{}→{target}", p.port)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
