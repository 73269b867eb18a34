//! Cluster names on a machine whose resolver is systemd-resolved.
//!
//! Why this exists: when `/etc/resolv.conf` is a link to resolved's stub
//! file (`nameserver 127.0.0.53`), resolved owns the file and rewrites it
//! whenever the network changes, so the `nameserver` line `--dns resolv`
//! puts first elsewhere would not last. resolved has an API for exactly
//! this instead: a program that brings up a link tells resolved, over
//! D-Bus (`org.freedesktop.resolve1.Manager` on the system bus), which DNS
//! server answers for that link and which domains are routed to it. Every
//! lookup on the machine reaches resolved (through the stub, NSS or its
//! API), and resolved sends a name to a link's servers only when the name
//! ends in one of that link's domains: every other name stays with the
//! laptop's own servers, untouched by ktb.
//!
//! The logic: on ktb's TUN device (by its interface index) set
//! - the DNS server: ktb's local resolver ([`super::dns::LISTEN`],
//!   127.0.0.153:53). resolved accepts a loopback server on a non-loopback
//!   link and asks it from the host's own stack over `lo`; measured with
//!   systemd 252 (Debian 12): queries for the link's domains arrived at
//!   127.0.0.153 from 127.0.0.1 and no DNS packet went into the TUN
//!   device. So the resolver needs no address of its own on the device;
//! - the domains ([`link_domains`]): the namespace's domain and
//!   `svc.<cluster domain>` as search domains, so `web` and `web.team-a`
//!   complete as they do in a pod (and as `--dns resolv` completes them
//!   elsewhere), and the cluster domain as a routing-only domain
//!   (`~cluster.local`), so every name under it goes to ktb and nothing
//!   else is completed with it. Search domains are in resolved's stub file
//!   too, so as in a pod a lookup that fails elsewhere (`example.org`'s
//!   missing AAAA) is retried by the C library as
//!   `example.org.team-a.svc.cluster.local`: a cluster name, sent to ktb;
//!   the name itself never is;
//! - the link is no default route for names, and LLMNR, multicast DNS,
//!   DNSSEC and DNS-over-TLS are off on it: the cluster's DNS signs
//!   nothing, ktb's resolver speaks plain DNS, and multicast queries into
//!   the tunnel would only be dropped by the agent.
//!
//! The change is journaled before the first call ([`Change::ResolvedLink`]):
//! on exit, and by `ktb clean --local` after a crash, the link's settings
//! are reverted (`RevertLink`) while the device is still ktb's. A device
//! that is gone took its settings with it: resolved forgets a link when it
//! disappears, which is also what happens when ktb is killed (its TUN
//! device is not persistent).
//!
//! Changing a link's DNS is a privileged call: resolved lets root through
//! and asks polkit for anyone else. `ktb connect --mode tun` runs as root
//! (it creates a device), so a refusal names polkit and says to run as root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use ktb_proto::handshake::Resolver;

use super::dns;
use super::journal::{Change, Journal};
use super::system::{self, DeviceUndo, OwnDevice};

/// resolved's well-known name, object and interface on the system bus.
const DESTINATION: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// The longest connecting to the bus or one call to resolved may take.
const BUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long resolved may take to see a device ktb just created.
const LINK_APPEARS: Duration = Duration::from_secs(3);
/// Linux's address family numbers, as `SetLinkDNS` takes them.
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

/// One domain of ktb's link, as `SetLinkDomains` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDomain {
    /// The domain, checked as a DNS name, lower case, no trailing dot
    /// (`team-a.svc.cluster.local`, `svc.cluster.local`, `cluster.local`).
    pub name: String,
    /// `true`: a routing domain only (`~cluster.local` in `resolvectl`):
    /// names under it go to ktb's server, none are completed with it.
    /// `false`: also a search domain, completing single-label names
    /// (resolved) and failed names (the search line of resolved's stub file).
    pub routing_only: bool,
}

impl std::fmt::Display for LinkDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tilde = if self.routing_only { "~" } else { "" };
        write!(f, "{tilde}{}", self.name)
    }
}

/// The domains to register for the cluster the agent's `resolver` names:
/// the namespace's domain and `svc.<domain>` to search (what `--dns
/// resolv` completes short names with), the cluster domain to route.
pub fn link_domains(resolver: &Resolver) -> anyhow::Result<Vec<LinkDomain>> {
    let domain = dns::cluster_domain(resolver)?;
    let mut domains = Vec::new();
    if let Some(namespace) = dns::namespace_domain(resolver, &domain)? {
        domains.push(LinkDomain {
            name: namespace,
            routing_only: false,
        });
    }
    domains.push(LinkDomain {
        name: format!("svc.{domain}"),
        routing_only: false,
    });
    domains.push(LinkDomain {
        name: domain,
        routing_only: true,
    });
    Ok(domains)
}

/// `SetLinkDNS`'s address records: `(family, raw address bytes)`.
fn dns_records(server: SocketAddr) -> anyhow::Result<Vec<(i32, Vec<u8>)>> {
    // SetLinkDNS has no port (SetLinkDNSEx does, from systemd 246 on); ktb's
    // resolver is on 53, so the older call serves every resolved.
    anyhow::ensure!(
        server.port() == 53,
        "ktb's DNS server listens on port {}, and systemd-resolved is told port 53",
        server.port()
    );
    Ok(vec![match server.ip() {
        IpAddr::V4(ip) => (AF_INET, ip.octets().to_vec()),
        IpAddr::V6(ip) => (AF_INET6, ip.octets().to_vec()),
    }])
}

/// The bus resolved's API is on, or why it cannot be reached.
async fn system_bus() -> anyhow::Result<zbus::Connection> {
    match tokio::time::timeout(BUS_TIMEOUT, zbus::Connection::system()).await {
        Ok(Ok(bus)) => Ok(bus),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "/etc/resolv.conf is systemd-resolved's, but the D-Bus system bus cannot be reached \
             ({e}): start dbus (`systemctl start dbus`), or connect with `--dns hosts`"
        )),
        Err(_) => Err(anyhow::anyhow!(
            "/etc/resolv.conf is systemd-resolved's, but the D-Bus system bus did not answer in \
             {BUS_TIMEOUT:?}: check dbus (`systemctl status dbus`), or connect with `--dns hosts`"
        )),
    }
}

/// What a failed call to resolved means.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Nobody owns resolved's name on the bus: resolved is not running.
    NotRunning,
    /// resolved (or the bus) denied the call: polkit said no, or would
    /// have to ask interactively.
    Denied,
    /// This resolved has no such method (one older than the call).
    UnknownMethod,
    /// resolved does not know the interface: it has not seen a device
    /// that was just created yet, or has already forgotten one that is
    /// going away (with its settings).
    NoSuchLink,
    /// Anything else: no answer in time, a bad argument, a broken bus.
    Other,
}

/// Sorts a D-Bus error by its name.
fn refusal(error_name: Option<&str>) -> Refusal {
    match error_name {
        Some(
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner",
        ) => Refusal::NotRunning,
        Some(
            "org.freedesktop.DBus.Error.AccessDenied"
            | "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
            | "org.freedesktop.DBus.Error.AuthFailed",
        ) => Refusal::Denied,
        Some("org.freedesktop.DBus.Error.UnknownMethod") => Refusal::UnknownMethod,
        Some("org.freedesktop.resolve1.NoSuchLink") => Refusal::NoSuchLink,
        _ => Refusal::Other,
    }
}

fn error_name(error: &zbus::Error) -> Option<String> {
    match error {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(fdo) => Some(zbus::DBusError::name(fdo.as_ref()).to_string()),
        _ => None,
    }
}

/// A failed call: its [`Refusal`] and the error to report.
struct Failed {
    /// What kind of failure, to decide whether it matters (an unknown
    /// refinement does not; resolved not running does not on revert).
    refusal: Refusal,
    /// One sentence for the user: what failed and what to do.
    error: anyhow::Error,
}

/// Calls `method` of resolved's manager with `body`, bounded.
async fn call<B>(bus: &zbus::Connection, method: &str, device: &str, body: &B) -> Result<(), Failed>
where
    B: serde::Serialize + zbus::DynamicType,
{
    let called = tokio::time::timeout(
        BUS_TIMEOUT,
        bus.call_method(Some(DESTINATION), PATH, Some(MANAGER), method, body),
    )
    .await;
    let error = match called {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(Failed {
                refusal: Refusal::Other,
                error: anyhow::anyhow!(
                    "systemd-resolved did not answer {method} for {device} in {BUS_TIMEOUT:?}: \
                     check it (`systemctl status systemd-resolved`), or connect with `--dns hosts`"
                ),
            })
        }
    };
    let refusal = refusal(error_name(&error).as_deref());
    let error = match refusal {
        Refusal::NotRunning => anyhow::anyhow!(
            "/etc/resolv.conf is systemd-resolved's, but resolved is not on the system bus \
             ({error}): start it (`systemctl start systemd-resolved`), or connect with `--dns hosts`"
        ),
        Refusal::Denied => anyhow::anyhow!(
            "systemd-resolved refused to let ktb set the DNS of {device} ({error}; polkit grants \
             it to root): run ktb as root (sudo), or connect with `--dns hosts`"
        ),
        Refusal::NoSuchLink => anyhow::anyhow!(
            "systemd-resolved does not know {device} ({error}), though ktb created it: check \
             `resolvectl status`, or connect with `--dns hosts`"
        ),
        Refusal::UnknownMethod | Refusal::Other => anyhow::anyhow!(
            "systemd-resolved refused {method} for {device} ({error}): connect with `--dns hosts` \
             meanwhile, and report this with `resolvectl --version`"
        ),
    };
    Err(Failed { refusal, error })
}

/// Registers ktb's DNS server (`server`) and the cluster's `domains` with
/// systemd-resolved on ktb's `device`, journaled before the first call.
pub async fn register(
    journal: &mut Journal,
    device: &OwnDevice,
    server: SocketAddr,
    domains: &[LinkDomain],
) -> anyhow::Result<()> {
    let records = dns_records(server)?;
    let index = i32::try_from(device.index).context("the device's interface index is too large")?;
    let name = &device.name;
    let bus = system_bus().await?;
    journal.record(Change::ResolvedLink {
        device: device.clone(),
    })?;
    let wanted: Vec<(String, bool)> = domains
        .iter()
        .map(|d| (d.name.clone(), d.routing_only))
        .collect();
    let fail = |failed: Failed| failed.error;
    // resolved learns of new devices from the kernel, a moment after ktb
    // created its own: until then it knows no such link.
    let deadline = tokio::time::Instant::now() + LINK_APPEARS;
    loop {
        match call(&bus, "SetLinkDNS", name, &(index, records.clone())).await {
            Ok(()) => break,
            Err(Failed {
                refusal: Refusal::NoSuchLink,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(failed) => return Err(failed.error),
        }
    }
    call(&bus, "SetLinkDomains", name, &(index, wanted))
        .await
        .map_err(fail)?;
    // Refinements: a resolved too old for one of them still routes the
    // domains to ktb, so an unknown method is no reason to fail.
    let refinements: [(&str, Setting); 5] = [
        ("SetLinkDefaultRoute", Setting::Flag(false)),
        ("SetLinkLLMNR", Setting::Mode("no")),
        ("SetLinkMulticastDNS", Setting::Mode("no")),
        ("SetLinkDNSSEC", Setting::Mode("no")),
        ("SetLinkDNSOverTLS", Setting::Mode("no")),
    ];
    for (method, setting) in refinements {
        let called = match setting {
            Setting::Flag(flag) => call(&bus, method, name, &(index, flag)).await,
            Setting::Mode(mode) => call(&bus, method, name, &(index, mode)).await,
        };
        match called {
            Ok(()) => {}
            Err(Failed {
                refusal: Refusal::UnknownMethod,
                ..
            }) => tracing::debug!("this systemd-resolved has no {method}; left as it is"),
            Err(failed) => return Err(failed.error),
        }
    }
    Ok(())
}

/// One of the link settings [`register`] makes besides server and domains.
#[derive(Clone, Copy)]
enum Setting {
    /// A boolean (`SetLinkDefaultRoute`): `false`.
    Flag(bool),
    /// A mode string (`SetLinkLLMNR` and the like): `"no"`.
    Mode(&'static str),
}

/// Undoes [`register`]: `RevertLink` while `device` is still ktb's. A
/// device that is gone took its settings with it, and a machine where
/// neither the bus nor resolved answers has none to revert. Blocking: it
/// runs the call on a thread of its own, so the journal can undo from
/// anywhere, inside an async runtime or not.
pub fn revert(device: &OwnDevice) -> anyhow::Result<()> {
    if system::device_undo(device, system::interface(&device.name)?) != DeviceUndo::Delete {
        return Ok(());
    }
    let device = device.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime to talk to systemd-resolved")?
            .block_on(revert_link(&device))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("reverting the device's DNS settings panicked"))?
}

async fn revert_link(device: &OwnDevice) -> anyhow::Result<()> {
    let index = i32::try_from(device.index).context("the device's interface index is too large")?;
    let bus = match system_bus().await {
        Ok(bus) => bus,
        Err(e) => {
            tracing::debug!("no system bus, so no resolved settings to revert: {e:#}");
            return Ok(());
        }
    };
    match call(&bus, "RevertLink", &device.name, &(index,)).await {
        Ok(()) => Ok(()),
        // Not running, or the link already gone (the device is being
        // unregistered as its last handle closed): no settings are left.
        Err(Failed {
            refusal: Refusal::NotRunning | Refusal::NoSuchLink,
            ..
        }) => Ok(()),
        Err(failed) => Err(failed.error.context(format!(
            "cannot revert the DNS settings of {}; they go when the device goes (`ip link del {}`)",
            device.name, device.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(search: &[&str]) -> Resolver {
        Resolver {
            nameservers: vec!["10.96.0.10:53".parse().unwrap()],
            search: search.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn shown(domains: &[LinkDomain]) -> Vec<String> {
        domains.iter().map(LinkDomain::to_string).collect()
    }

    #[test]
    fn the_namespace_and_services_are_searched_and_the_cluster_domain_routed() {
        let pod = resolver(&[
            "team-a.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]);
        assert_eq!(
            shown(&link_domains(&pod).unwrap()),
            [
                "team-a.svc.cluster.local",
                "svc.cluster.local",
                "~cluster.local"
            ]
        );
        // Another cluster domain, spelled oddly; no namespace domain.
        let other = resolver(&["svc.Corp-Cluster.example", "lan"]);
        assert_eq!(
            shown(&link_domains(&other).unwrap()),
            ["svc.corp-cluster.example", "~corp-cluster.example"]
        );
        // No cluster domain: nothing to register, and it says so.
        let none = link_domains(&resolver(&["lan"])).unwrap_err();
        assert!(
            format!("{none:#}").contains("no cluster domain"),
            "{none:#}"
        );
        // A domain that is no DNS name is never handed to resolved.
        assert!(link_domains(&resolver(&["svc.cluster local"])).is_err());
    }

    #[test]
    fn the_server_is_told_as_family_and_raw_bytes() {
        assert_eq!(
            dns_records(dns::LISTEN).unwrap(),
            [(AF_INET, vec![127, 0, 0, 153])]
        );
        let v6: SocketAddr = "[fd00::53]:53".parse().unwrap();
        let (family, bytes) = dns_records(v6).unwrap().remove(0);
        assert_eq!((family, bytes.len()), (AF_INET6, 16));
        assert!(dns_records("127.0.0.153:5353".parse().unwrap()).is_err());
    }

    #[test]
    fn a_device_that_is_gone_has_nothing_to_revert() {
        // No interface has this name: resolved forgot the link with it,
        // and the bus is not even asked.
        let gone = OwnDevice {
            name: "ktbgone9".into(),
            index: 999_999,
        };
        revert(&gone).unwrap();
    }

    #[test]
    fn bus_errors_are_told_apart_by_name() {
        for (name, expected) in [
            (
                "org.freedesktop.DBus.Error.ServiceUnknown",
                Refusal::NotRunning,
            ),
            (
                "org.freedesktop.DBus.Error.NameHasNoOwner",
                Refusal::NotRunning,
            ),
            ("org.freedesktop.DBus.Error.AccessDenied", Refusal::Denied),
            (
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
                Refusal::Denied,
            ),
            (
                "org.freedesktop.DBus.Error.UnknownMethod",
                Refusal::UnknownMethod,
            ),
            ("org.freedesktop.resolve1.NoSuchLink", Refusal::NoSuchLink),
            ("org.freedesktop.resolve1.LinkBusy", Refusal::Other),
        ] {
            assert_eq!(refusal(Some(name)), expected, "{name}");
        }
        assert_eq!(refusal(None), Refusal::Other);
    }
}
