//! What the machine looked like before `cluster up`, so that `cluster down`
//! can put it back and then prove it did.
//!
//! A Kubernetes node touches far more of the host than its own files: the
//! kubelet writes sysctls and directories under `/var` and `/usr`, bind
//! mounts its root dir, creates cgroups; containerd and CNI create network
//! namespaces, veths, bridges and mounts; kube-proxy and the kubelet create
//! nftables tables. A snapshot is a set of strings per category (one
//! interface, mount point, table, `sysctl=value`, ...). `down` undoes what
//! is new in each category, snapshots again, and fails listing any
//! difference that remains.

use super::process;
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Sysctls that the cluster (kubelet, CNI bridge, this tooling) changes.
pub const SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

/// Paths outside the state dir that the components create despite being
/// configured to keep everything in it.
pub const WATCHED_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
    "/var/lib/cni",
    "/run/containerd",
    "/var/lib/containerd",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni",
    "/etc/kubernetes",
    "/run/netns",
    "/etc/netns",
    "/run/runc",
    "/run/xtables.lock",
];

pub type Snapshot = BTreeMap<String, BTreeSet<String>>;

pub fn take() -> Result<Snapshot> {
    let mut s = Snapshot::new();
    s.insert(
        "interface".into(),
        lines(&process::run("ip", &["-o", "link", "show"])?, |l| {
            // "3: name@peer: <...>" -> "name"
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        }),
    );
    s.insert(
        "route".into(),
        lines(
            &process::run("ip", &["route", "show", "table", "all"])?,
            |l| Some(l.trim().to_owned()),
        ),
    );
    s.insert(
        "netns".into(),
        lines(&process::run("ip", &["netns", "list"])?, |l| {
            l.split_whitespace().next().map(str::to_owned)
        }),
    );
    s.insert("mount".into(), mount_points()?);
    s.insert("nft-table".into(), nft_tables()?);
    s.insert("nft-rule".into(), nft_rules()?);
    s.insert(
        "sysctl".into(),
        SYSCTLS
            .iter()
            .filter_map(|k| read_sysctl(k).map(|v| format!("{k}={v}")))
            .collect(),
    );
    s.insert("cgroup".into(), cgroups()?);
    s.insert("path".into(), watched_paths());
    Ok(s)
}

pub fn save(s: &Snapshot, path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(s)?)?;
    Ok(())
}

pub fn load(path: &Path) -> Result<Snapshot> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// What is in `after` but not `before` (`+`) and the reverse (`-`), per category.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let empty = BTreeSet::new();
    let cats: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for cat in cats {
        let b = before.get(cat).unwrap_or(&empty);
        let a = after.get(cat).unwrap_or(&empty);
        for x in a.difference(b) {
            out.push(format!("+ {cat}: {x}"));
        }
        for x in b.difference(a) {
            out.push(format!("- {cat}: {x}"));
        }
    }
    out
}

/// The items of category `cat` that are new since `before`.
pub fn added(before: &Snapshot, after: &Snapshot, cat: &str) -> Vec<String> {
    match (before.get(cat), after.get(cat)) {
        (Some(b), Some(a)) => a.difference(b).cloned().collect(),
        (None, Some(a)) => a.iter().cloned().collect(),
        _ => Vec::new(),
    }
}

fn lines(text: &str, f: impl Fn(&str) -> Option<String>) -> BTreeSet<String> {
    text.lines()
        .filter_map(f)
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn mount_points() -> Result<BTreeSet<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(lines(&info, |l| l.split(' ').nth(4).map(unescape_mount)))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `FAMILY NAME` of every nftables table.
fn nft_tables() -> Result<BTreeSet<String>> {
    Ok(lines(&process::run("nft", &["list", "tables"])?, |l| {
        l.strip_prefix("table ").map(str::to_owned)
    }))
}

/// Every rule line, prefixed with its table and chain, without counters.
fn nft_rules() -> Result<BTreeSet<String>> {
    let text = process::run("nft", &["-s", "list", "ruleset"])?;
    let mut out = BTreeSet::new();
    let (mut table, mut chain) = (String::new(), String::new());
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("table ") {
            table = t.trim_end_matches(" {").to_owned();
        } else if let Some(c) = line.strip_prefix("chain ") {
            chain = c.trim_end_matches(" {").to_owned();
        } else if !line.is_empty() && line != "}" {
            out.insert(format!("{table} / {chain}: {line}"));
        }
    }
    Ok(out)
}

pub fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(sysctl_path(key))
        .ok()
        .map(|v| v.trim().to_owned())
}

pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(sysctl_path(key), value)?;
    Ok(())
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Top-level cgroups of every mounted hierarchy (`/sys/fs/cgroup/CTRL/NAME`).
fn cgroups() -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for h in hierarchies() {
        if let Ok(entries) = std::fs::read_dir(&h) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.insert(e.path().to_string_lossy().into_owned());
                }
            }
        }
    }
    Ok(out)
}

/// The cgroup hierarchy roots: each mount of type cgroup or cgroup2.
pub fn hierarchies() -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| pre.split(' ').nth(4).map(unescape_mount))?
        })
        .collect()
}

fn watched_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in WATCHED_PATHS {
        if Path::new(p).symlink_metadata().is_ok() {
            out.insert((*p).to_owned());
            // Entries matter where other tools keep theirs (e.g. /etc/netns).
            if let Ok(entries) = std::fs::read_dir(p) {
                for e in entries.flatten() {
                    out.insert(e.path().to_string_lossy().into_owned());
                }
            }
        }
    }
    out
}
