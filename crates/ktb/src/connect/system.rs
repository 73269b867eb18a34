//! The changes `ktb connect` makes to this machine, each recorded in the
//! [`Journal`] before it is made.
//!
//! Routes and devices go through `ip` (iproute2), the tool every Linux
//! machine has and every administrator can read back. DNS is switched by
//! putting ktb's server first in `resolv.conf` while keeping the original
//! servers after it: if ktb dies without cleaning up, the resolver library
//! finds nothing listening on ktb's address, moves on at once, and the
//! machine's DNS keeps working until `ktb clean --local` restores the file.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use ipnet::Ipv4Net;

use super::journal::{ip_ignoring_missing, write_in_place, Change, Journal};

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
pub const HOSTS: &str = "/etc/hosts";

/// Records the TUN device, which exists as soon as it is created.
pub fn record_device(journal: &mut Journal, name: &str) -> anyhow::Result<()> {
    journal.record(Change::Device { name: name.into() })
}

/// Routes each range into the device.
pub fn add_routes(journal: &mut Journal, ranges: &[Ipv4Net], device: &str) -> anyhow::Result<()> {
    for net in ranges {
        let net = net.to_string();
        journal.record(Change::Route {
            net: net.clone(),
            device: device.into(),
        })?;
        let output = std::process::Command::new("ip")
            .args(["route", "add", &net, "dev", device])
            .output()
            .context("cannot run `ip` (install iproute2)")?;
        if !output.status.success() {
            anyhow::bail!(
                "cannot route {net} into {device}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Deletes a device that failed half-way, outside the journal's undo.
pub fn delete_device(name: &str) {
    let _ = ip_ignoring_missing(&["link", "del", name]);
}

/// The servers a `resolv.conf` lists, to forward other names to.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    ktb_proto::handshake::Resolver::parse_resolv_conf(resolv_conf).nameservers
}

/// Puts `server` ahead of the existing nameservers.
pub fn with_nameserver_first(resolv_conf: &str, server: IpAddr) -> String {
    let line = format!("nameserver {server} # added by ktb connect; removed when it exits\n");
    let mut out = String::with_capacity(resolv_conf.len() + line.len());
    let mut added = false;
    for existing in resolv_conf.split_inclusive('\n') {
        if !added && existing.trim_start().starts_with("nameserver") {
            out.push_str(&line);
            added = true;
        }
        out.push_str(existing);
        if !existing.ends_with('\n') {
            out.push('\n');
        }
    }
    if !added {
        out.push_str(&line);
    }
    out
}

/// Points `resolv.conf` at ktb's DNS server; returns the upstream servers
/// it listed. Refuses a file managed by systemd-resolved, which would
/// overwrite it (and whose stub already sits in front of every lookup).
pub fn switch_resolv_conf(
    journal: &mut Journal,
    path: &Path,
    server: IpAddr,
) -> anyhow::Result<Vec<SocketAddr>> {
    if let Ok(target) = std::fs::read_link(path) {
        if target.to_string_lossy().contains("systemd") {
            anyhow::bail!(
                "{} is managed by systemd-resolved ({}); use `--dns hosts`, which writes cluster Services into /etc/hosts",
                path.display(),
                target.display()
            );
        }
    }
    let original =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let upstream = nameservers(&original)
        .into_iter()
        .filter(|s| s.ip() != server)
        .collect();
    journal.record(Change::File {
        path: path.to_owned(),
        original: original.clone(),
    })?;
    write_in_place(path, &with_nameserver_first(&original, server))?;
    Ok(upstream)
}

/// Appends a marked block of `lines` to the hosts file.
pub fn add_hosts_block(
    journal: &mut Journal,
    path: &Path,
    session: &str,
    lines: &[String],
) -> anyhow::Result<()> {
    let begin = format!("# BEGIN ktb connect {session}: cluster Services, removed when ktb exits");
    let end = format!("# END ktb connect {session}");
    let mut text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    journal.record(Change::Block {
        path: path.to_owned(),
        begin: begin.clone(),
        end: end.clone(),
    })?;
    if !text.is_empty() && !text.ends_with('\n') {
        // The one byte removal does not take back: a block must start a line.
        text.push('\n');
    }
    text.push_str(&format!("{begin}\n"));
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&end);
    text.push('\n');
    write_in_place(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktb_goes_first_and_the_rest_stays() {
        let original =
            "search corp.example\nnameserver 192.0.2.1\nnameserver 192.0.2.2\noptions timeout:1\n";
        let switched = with_nameserver_first(original, "127.0.0.153".parse().unwrap());
        assert_eq!(
            nameservers(&switched),
            ["127.0.0.153:53", "192.0.2.1:53", "192.0.2.2:53"].map(|s| s.parse().unwrap())
        );
        assert!(switched.starts_with("search corp.example\n"));
        assert!(switched.ends_with("options timeout:1\n"));
        assert_eq!(
            nameservers(&with_nameserver_first("", "127.0.0.153".parse().unwrap())).len(),
            1
        );
    }
}
