//! The changes `ktb connect` makes to this machine, each recorded in the
//! [`Journal`], and how each is taken back.
//!
//! Routes and devices go through `ip` (iproute2), the tool every Linux
//! machine has and every administrator can read back. DNS is switched by
//! putting ktb's server first in `resolv.conf` while keeping the original
//! servers after it: if ktb dies without cleaning up, the resolver library
//! finds nothing listening on ktb's address, moves on at once, and the
//! machine's DNS keeps working until `ktb clean --local` removes the line.
//!
//! Nothing ktb takes back may hurt what is not ktb's: the device is deleted
//! only while the interface with its name is the one ktb created, and files
//! lose only ktb's marked line or block. Files are written atomically
//! (temporary file, fsync, rename) where they can be, since a half-written
//! `resolv.conf` breaks every lookup on the machine; where they cannot
//! (a bind-mounted `/etc/resolv.conf`, as containers and network namespaces
//! have) they are written in place and synced.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tun_rs::AsyncDevice;

use super::journal::{Change, Journal};
use super::{dns, tun};

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
pub const HOSTS: &str = "/etc/hosts";
/// Where Linux describes the network interfaces of this network namespace.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Bits of a TUN/TAP device's `tun_flags` (linux/if_tun.h): a TUN (not
/// TAP) device, and one that outlives the processes that opened it.
const IFF_TUN: u32 = 0x0001;
const IFF_PERSIST: u32 = 0x0800;
/// Present when SELinux is on.
const SELINUX_FS: &str = "/sys/fs/selinux/enforce";
/// Linux's limit on interface names, the terminating NUL left out.
const MAX_DEVICE_NAME: usize = 15;

/// The TUN device ktb created, as the journal identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnDevice {
    /// The name it was created with (`--device`, `ktb0` by default).
    pub name: String,
    /// Its interface index (ifindex) right after ktb created it. The kernel
    /// hands indexes out in increasing order, so a device created later
    /// under the same name has another one: the name alone does not say
    /// whether the device is still ktb's.
    pub index: u32,
}

/// A network interface as this machine has it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    /// Its interface index (ifindex).
    pub index: u32,
    /// Whether it is a TUN device (as ktb creates); `false` for any other
    /// kind, TAP devices included.
    pub tun: bool,
    /// Whether it is a persistent TUN/TAP device, one made to outlive the
    /// process that opened it (`ip tuntap add`, VPN clients). ktb never
    /// makes its device persistent, so such a device is never ktb's.
    pub persistent: bool,
}

/// What undoing the device does, given what has its name now.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceUndo {
    /// The interface is ktb's device: delete it.
    Delete,
    /// No interface has the name: the device went with the process that
    /// held it open. Nothing to do.
    Gone,
    /// Another interface has the name now; it is left alone, for the
    /// reason given.
    NotOurs(String),
}

/// Decides whether the interface named like ktb's device is still it.
pub fn device_undo(device: &OwnDevice, now: Option<Interface>) -> DeviceUndo {
    let Some(now) = now else {
        return DeviceUndo::Gone;
    };
    if now.index != device.index {
        DeviceUndo::NotOurs(format!(
            "it has interface index {}, ktb's device had {}",
            now.index, device.index
        ))
    } else if !now.tun || now.persistent {
        DeviceUndo::NotOurs("it is not the non-persistent TUN device ktb creates".into())
    } else {
        DeviceUndo::Delete
    }
}

/// The interface called `name` in this network namespace, if there is one.
pub(super) fn interface(name: &str) -> anyhow::Result<Option<Interface>> {
    interface_in(Path::new(SYS_CLASS_NET), name)
}

/// How long a device that Linux is still unregistering (its sysfs files
/// answer EINVAL or ENODEV, both seen right after a TUN device's descriptor
/// closed) may take to vanish before it counts as gone.
const UNREGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// [`interface`], read from a sysfs `class/net` directory at `root`.
fn interface_in(root: &Path, name: &str) -> anyhow::Result<Option<Interface>> {
    let deadline = std::time::Instant::now() + UNREGISTER_WAIT;
    loop {
        match read_interface(root, name) {
            Err(e) if unregistering(&e) => {
                if std::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            read => return read,
        }
    }
}

fn unregistering(error: &anyhow::Error) -> bool {
    /// Linux's EINVAL and ENODEV.
    const EINVAL: i32 = 22;
    const ENODEV: i32 = 19;
    matches!(
        error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error),
        Some(EINVAL | ENODEV)
    )
}

fn read_interface(root: &Path, name: &str) -> anyhow::Result<Option<Interface>> {
    check_device_name(name)?;
    let dir = root.join(name);
    let read = |file: &str| match std::fs::read_to_string(dir.join(file)) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.join(file).display())),
    };
    let Some(index) = read("ifindex")? else {
        return Ok(None);
    };
    let index = index
        .parse()
        .with_context(|| format!("{} holds no interface index", dir.display()))?;
    // Only TUN/TAP devices have `tun_flags`, written as `0x1001`.
    let flags = match read("tun_flags")? {
        Some(text) => Some(
            u32::from_str_radix(text.trim_start_matches("0x"), 16)
                .with_context(|| format!("cannot read the TUN flags of {name} ({text})"))?,
        ),
        None => None,
    };
    Ok(Some(Interface {
        index,
        tun: flags.is_some_and(|f| f & IFF_TUN != 0),
        persistent: flags.is_some_and(|f| f & IFF_PERSIST != 0),
    }))
}

/// Refuses a device name Linux would refuse, or that would reach outside
/// sysfs' directory of interfaces.
fn check_device_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_DEVICE_NAME
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
    if !valid {
        anyhow::bail!(
            "{name:?} cannot be a network device name: use at most {MAX_DEVICE_NAME} characters \
             without `/`, `:` or spaces (e.g. --device ktb0)"
        );
    }
    Ok(())
}

/// Refuses a device name some interface already has: creating a TUN
/// device of that name would take over that device if it is a persistent
/// TUN device (a VPN's `tun0`) and fail otherwise, and ktb must never be
/// the one to delete it. Cheap and read-only, so callable before anything
/// changes.
pub fn check_device_free(name: &str) -> anyhow::Result<()> {
    if let Some(taken) = interface(name)? {
        let kind = if taken.tun {
            "a TUN device, perhaps a VPN's"
        } else {
            "an interface"
        };
        anyhow::bail!(
            "{name} already exists on this machine ({kind}, interface index {}); ktb creates a \
             device of its own and leaves others alone: pick a free name with --device",
            taken.index
        );
    }
    Ok(())
}

/// Whether this process may create TUN devices: the device file opens
/// (opening it alone creates nothing), and its effective capabilities
/// (`/proc/self/status`) hold CAP_NET_ADMIN, which creating an interface
/// and its routes takes.
#[derive(Debug)]
pub struct TunAccess {
    /// Opening `/dev/net/tun` read-write: `Ok`, or why not (NotFound: no
    /// node; PermissionDenied: not this user's).
    pub opened: io::Result<()>,
    /// `Some(true)`/`Some(false)`: CAP_NET_ADMIN held or not; `None`: the
    /// capabilities could not be read (no CapEff line).
    pub net_admin: Option<bool>,
}

/// The device file every TUN device is made through.
pub const TUN_NODE: &str = "/dev/net/tun";

/// Linux's number for CAP_NET_ADMIN (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// This process's [`TunAccess`]; read-only.
pub fn tun_access() -> TunAccess {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_NODE)
        .map(drop);
    let net_admin = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| holds_net_admin(&status));
    TunAccess { opened, net_admin }
}

/// Whether the `CapEff` line of a `/proc/PID/status` holds CAP_NET_ADMIN;
/// `None` if there is no such line.
pub fn holds_net_admin(status: &str) -> Option<bool> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Refuses, before anything changes, to go on where creating the device
/// `name` would fail: no `/dev/net/tun` to open, or no CAP_NET_ADMIN. An
/// unknown capability is let through; creating the device will tell.
pub fn check_may_create_device(name: &str) -> anyhow::Result<()> {
    let access = tun_access();
    match access.opened {
        Err(e) => Err(cannot_create(name, e)),
        Ok(()) if access.net_admin == Some(false) => {
            Err(cannot_create(name, io::ErrorKind::PermissionDenied.into()))
        }
        Ok(()) => Ok(()),
    }
}

/// Why the device `name` cannot be created, and what to do.
fn cannot_create(name: &str, e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "creating the TUN device {name} needs root or CAP_NET_ADMIN: run ktb with sudo, \
             or use `--mode socks5`, which needs neither"
        ),
        _ => anyhow::anyhow!(
            "cannot create the TUN device {name}: {e} (is {TUN_NODE} there? `modprobe tun` loads it)"
        ),
    }
}

/// Creates the TUN device `name` and records it, once it is known to be
/// the one ktb created.
pub fn create_device(
    journal: &mut Journal,
    name: &str,
) -> anyhow::Result<(AsyncDevice, OwnDevice)> {
    check_device_free(name)?;
    let tun = tun::create(name).map_err(|e| cannot_create(name, e))?;
    let created = interface(name)?;
    let device = match created {
        Some(i) if i.tun && !i.persistent => OwnDevice {
            name: name.to_owned(),
            index: i.index,
        },
        // Someone made a device of that name since the check: ktb's handle
        // is dropped, which leaves theirs as it was.
        _ => anyhow::bail!(
            "the device {name} ktb opened is not one it created ({created:?}); another program \
             made it at the same moment: pick a free name with --device"
        ),
    };
    journal.record(Change::Device(device.clone()))?;
    Ok((tun, device))
}

/// Undoes [`create_device`]: deletes the device if it is still ktb's, and
/// says so when another interface has taken the name.
pub fn remove_device(device: &OwnDevice) -> anyhow::Result<()> {
    let name = &device.name;
    match device_undo(device, interface(name)?) {
        DeviceUndo::Delete => ip_ignoring_missing(&["link", "del", "dev", name]),
        DeviceUndo::Gone => Ok(()),
        DeviceUndo::NotOurs(why) => {
            tracing::warn!("leaving the interface {name} alone: {why}");
            Ok(())
        }
    }
}

/// Routes each range into ktb's device.
pub fn add_routes(
    journal: &mut Journal,
    ranges: &[Ipv4Net],
    device: &OwnDevice,
) -> anyhow::Result<()> {
    let name = &device.name;
    for net in ranges {
        let net = net.to_string();
        journal.record(Change::Route {
            net: net.clone(),
            device: device.clone(),
        })?;
        let output = std::process::Command::new("ip")
            .args(["route", "add", &net, "dev", name])
            .output()
            .context("cannot run `ip` (install iproute2)")?;
        if !output.status.success() {
            anyhow::bail!(
                "cannot route {net} into {name}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Undoes one route of [`add_routes`], while ktb's device is there: a
/// route dies with its device, and a new device of that name has routes
/// that are not ktb's to delete.
pub fn remove_route(net: &str, device: &OwnDevice) -> anyhow::Result<()> {
    if device_undo(device, interface(&device.name)?) != DeviceUndo::Delete {
        return Ok(());
    }
    ip_ignoring_missing(&["route", "del", net, "dev", &device.name])
}

/// Runs `ip`; "no such device/route" counts as done, since the change
/// is already gone (a TUN device vanishes with the process that held it).
fn ip_ignoring_missing(args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let gone = ["Cannot find device", "No such process", "No such device"]
        .iter()
        .any(|m| stderr.contains(m));
    if output.status.success() || gone {
        Ok(())
    } else {
        anyhow::bail!("`ip {}` failed: {}", args.join(" "), stderr.trim())
    }
}

/// The servers a `resolv.conf` lists, to forward other names to.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    ktb_proto::handshake::Resolver::parse_resolv_conf(resolv_conf).nameservers
}

/// What starts the comment of ktb's `nameserver` line, before the session.
pub const RESOLV_MARK: &str = "# ktb connect ";

/// ktb's `nameserver` line for a session. Resolvers read the address and
/// ignore the rest of the line (glibc and musl alike), so the comment can
/// mark the line as ktb's and name the session: undo removes exactly it.
pub fn resolv_line(server: IpAddr, session: &str) -> String {
    format!("nameserver {server} {RESOLV_MARK}{session}: removed when it exits")
}

/// Puts `line` ahead of the existing nameservers, touching no other byte
/// where it can, so that removing the line gives the file back as it was.
pub fn with_line_first(resolv_conf: &str, line: &str) -> String {
    let mut out = String::with_capacity(resolv_conf.len() + line.len() + 2);
    let mut added = false;
    for existing in resolv_conf.split_inclusive('\n') {
        if !added && existing.trim_start().starts_with("nameserver") {
            out.push_str(line);
            out.push('\n');
            added = true;
        }
        out.push_str(existing);
    }
    if !added {
        if !out.is_empty() && !out.ends_with('\n') {
            // The one byte removal does not take back: the line must start a line.
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Where `path` links to, when that is one of systemd-resolved's files,
/// which it rewrites: [`switch_resolv_conf`] refuses to edit those.
pub fn managed_by_resolved(path: &Path) -> Option<PathBuf> {
    std::fs::read_link(path)
        .ok()
        .filter(|target| target.to_string_lossy().contains("systemd"))
}

/// systemd-resolved's stub resolver, the one server its stub file lists.
pub const RESOLVED_STUB: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53));

/// How `resolv.conf` is set up, as far as `connect --dns resolv` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvConf {
    /// A link into systemd-resolved's files (the link's target) listing
    /// only resolved's stub, 127.0.0.53: every lookup goes through
    /// resolved, so connect registers the cluster's domains with it
    /// (`connect::resolved`) and leaves the file alone.
    ResolvedStub(PathBuf),
    /// A link into systemd-resolved's files (the link's target) listing
    /// other servers (resolved's `resolv.conf` of uplink servers):
    /// programs ask those directly, past resolved, and resolved rewrites
    /// the file, so connect refuses it.
    ResolvedUplink(PathBuf),
    /// Any other file, plain or written by another manager: connect puts
    /// its line first ([`switch_resolv_conf`]).
    File,
}

/// Which [`ResolvConf`] the file at `path` is.
pub fn resolv_conf_kind(path: &Path) -> ResolvConf {
    let Some(target) = managed_by_resolved(path) else {
        return ResolvConf::File;
    };
    let servers = std::fs::read_to_string(path)
        .map(|text| nameservers(&text))
        .unwrap_or_default();
    if !servers.is_empty() && servers.iter().all(|s| s.ip() == RESOLVED_STUB) {
        ResolvConf::ResolvedStub(target)
    } else {
        ResolvConf::ResolvedUplink(target)
    }
}

/// Points `resolv.conf` at ktb's DNS server; returns the upstream servers
/// it listed. Refuses a file managed by systemd-resolved, which would
/// overwrite it: its stub file is for `connect::resolved` instead.
pub fn switch_resolv_conf(
    journal: &mut Journal,
    path: &Path,
    server: IpAddr,
    session: &str,
) -> anyhow::Result<Vec<SocketAddr>> {
    if let Some(target) = managed_by_resolved(path) {
        anyhow::bail!(
            "{} links to systemd-resolved's {}, which lists no stub (127.0.0.53) and which resolved \
             rewrites: link it to /run/systemd/resolve/stub-resolv.conf (then connect registers \
             with resolved), or use `--dns hosts`, which writes cluster Services into /etc/hosts",
            path.display(),
            target.display()
        );
    }
    let original =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let upstream = nameservers(&original)
        .into_iter()
        .filter(|s| s.ip() != server)
        .collect();
    let line = resolv_line(server, session);
    journal.record(Change::Line {
        path: path.to_owned(),
        line: line.clone(),
    })?;
    write_file(path, &with_line_first(&original, &line))?;
    Ok(upstream)
}

/// Undoes [`switch_resolv_conf`]: every line equal to `line` goes, every
/// other line stays as it is now.
pub fn remove_line(path: &Path, line: &str) -> anyhow::Result<()> {
    edit_file(path, |text| {
        text.split_inclusive('\n')
            .filter(|l| l.trim_end() != line)
            .collect()
    })
}

/// One `/etc/hosts` line, checked: its names come from the cluster, and a
/// newline or `#` in one would add lines of its own or hide the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    ip: IpAddr,
    names: Vec<String>,
}

impl HostEntry {
    pub fn new<S: Into<String>>(
        ip: IpAddr,
        names: impl IntoIterator<Item = S>,
    ) -> anyhow::Result<HostEntry> {
        let names = names.into_iter().map(Into::into).collect::<Vec<String>>();
        if names.is_empty() {
            anyhow::bail!("a hosts line for {ip} needs a name");
        }
        for name in &names {
            dns::check_name(name).with_context(|| format!("not writing {ip} {name} into hosts"))?;
        }
        Ok(HostEntry { ip, names })
    }
}

impl std::fmt::Display for HostEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.ip, self.names.join(" "))
    }
}

/// Appends a marked block of `entries` to the hosts file.
pub fn add_hosts_block(
    journal: &mut Journal,
    path: &Path,
    session: &str,
    entries: &[HostEntry],
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
    for entry in entries {
        text.push_str(&format!("{entry}\n"));
    }
    text.push_str(&format!("{end}\n"));
    write_file(path, &text)
}

/// Undoes [`add_hosts_block`]: the lines from `begin` to `end` (inclusive)
/// go, every other line stays as it is now.
pub fn remove_block(path: &Path, begin: &str, end: &str) -> anyhow::Result<()> {
    edit_file(path, |text| without_block(text, begin, end))
}

fn without_block(text: &str, begin: &str, end: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if !inside && bare == begin {
            inside = true;
        } else if inside && bare == end {
            inside = false;
        } else if !inside {
            out.push_str(line);
        }
    }
    out
}

/// Rewrites a file with `edit` applied to its content as it is now; leaves
/// it untouched when that changes nothing or the file is gone.
fn edit_file(path: &Path, edit: impl FnOnce(&str) -> String) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let edited = edit(&text);
    if edited == text {
        return Ok(());
    }
    write_file(path, &edited)
}

/// How [`write_file`] got the content into the file.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// A new file renamed over the old one: readers saw the old content or
    /// the new, never a mix.
    Replaced,
    /// The file itself overwritten, since it could not (or should not) be
    /// replaced.
    InPlace,
}

/// Writes `content` into the file at `path` durably, atomically where the
/// file can be replaced and in place where it cannot. A symbolic link is
/// followed, so the link stays and its target gets the content. Where
/// SELinux is on, files are written in place: a new file would get its
/// directory's default label, not the file's own (`resolv.conf` is
/// `net_conf_t`), and the daemons that manage the file could then be
/// denied writing it.
pub fn write_file(path: &Path, content: &str) -> anyhow::Result<()> {
    let keep_label = Path::new(SELINUX_FS).exists();
    let written = write_file_with(path, content, keep_label, |from, to| {
        std::fs::rename(from, to)
    })?;
    tracing::debug!(path = %path.display(), ?written, "wrote");
    Ok(())
}

/// [`write_file`] with the SELinux decision and the rename step given, so
/// tests can make the rename fail as it does on a bind mount.
fn write_file_with(
    path: &Path,
    content: &str,
    keep_label: bool,
    rename: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> anyhow::Result<Written> {
    let path = match std::fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("cannot resolve {}", path.display())),
    };
    let replaced = if keep_label && path.exists() {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "SELinux would label a new file differently",
        ))
    } else {
        replace(&path, content, rename)
    };
    match replaced {
        Ok(()) => Ok(Written::Replaced),
        Err(e) if cannot_replace(&e) => {
            write_in_place(&path, content).with_context(|| {
                format!(
                    "cannot write {} (in place, as it cannot be replaced: {e})",
                    path.display()
                )
            })?;
            Ok(Written::InPlace)
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// Errors that mean the file cannot be replaced, though it may well be
/// writable: a mount point (EBUSY: a bind-mounted `/etc/resolv.conf`),
/// another file system (EXDEV), a directory ktb may not create a file in
/// (EACCES, EPERM, EROFS), an owner ktb cannot give the new file (EPERM).
fn cannot_replace(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ResourceBusy
            | io::ErrorKind::CrossesDevices
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::ReadOnlyFilesystem
    )
}

/// Writes a new file next to `path`, with its mode and owner, syncs it and
/// renames it over `path`.
fn replace(
    path: &Path,
    content: &str,
    rename: impl FnOnce(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.ktb-{}", std::process::id()));
    // Left by a crash of a process with this pid; `create_new` below then
    // refuses whatever appears there instead of writing through it.
    let _ = std::fs::remove_file(&tmp);
    let written = write_new(&tmp, path, content).and_then(|()| rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself is durable once the directory is; the content is
    // already, so a failure here is no reason to report the write failed.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot sync the directory");
    }
    Ok(())
}

/// Creates `tmp` with `content`, and the mode and owner of `like` if it exists.
fn write_new(tmp: &Path, like: &Path, content: &str) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o644);
    let mut file = options.open(tmp)?;
    match std::fs::metadata(like) {
        Ok(old) => {
            file.set_permissions(old.permissions())?;
            #[cfg(unix)]
            keep_owner(&file, &old)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

/// Gives `file` the owner of `old`, the file it replaces.
#[cfg(unix)]
fn keep_owner(file: &File, old: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let new = file.metadata()?;
    if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
        std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()))?;
    }
    Ok(())
}

/// Overwrites the file from its start, then cuts it to length: unlike
/// truncating first, this never shows a reader an empty file.
fn write_in_place(path: &Path, content: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(content.as_bytes())?;
    file.set_len(content.len() as u64)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn the_capability_is_read_from_the_effective_set() {
        let root = "Name:\tktb\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(holds_net_admin(root), Some(true));
        let user = "CapPrm:\t0000000000001000\nCapEff:\t0000000000000000\n";
        assert_eq!(holds_net_admin(user), Some(false));
        assert_eq!(holds_net_admin("CapEff:\t0000000000001000\n"), Some(true));
        assert_eq!(holds_net_admin("Name:\tktb\n"), None);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ktb-system-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ktb0(index: u32) -> OwnDevice {
        OwnDevice {
            name: "ktb0".into(),
            index,
        }
    }

    #[test]
    fn only_the_device_ktb_created_is_deleted() {
        let tun = |index, persistent| Interface {
            index,
            tun: true,
            persistent,
        };
        assert_eq!(
            device_undo(&ktb0(7), Some(tun(7, false))),
            DeviceUndo::Delete
        );
        assert_eq!(device_undo(&ktb0(7), None), DeviceUndo::Gone);
        // ktb's device went with its process; a VPN made one of that name.
        assert!(matches!(
            device_undo(&ktb0(7), Some(tun(12, false))),
            DeviceUndo::NotOurs(why) if why.contains("12") && why.contains('7')
        ));
        assert!(matches!(
            device_undo(&ktb0(7), Some(tun(7, true))),
            DeviceUndo::NotOurs(_)
        ));
        let bridge = Interface {
            index: 7,
            tun: false,
            persistent: false,
        };
        assert!(matches!(
            device_undo(&ktb0(7), Some(bridge)),
            DeviceUndo::NotOurs(_)
        ));
    }

    #[test]
    fn a_device_being_unregistered_is_told_from_a_failed_read() {
        let read_failing_with = |errno| {
            anyhow::Error::new(io::Error::from_raw_os_error(errno)).context("cannot read ifindex")
        };
        // EINVAL and ENODEV: sysfs answers so while the device goes away.
        assert!(unregistering(&read_failing_with(22)));
        assert!(unregistering(&read_failing_with(19)));
        // EACCES is a real failure, to report.
        assert!(!unregistering(&read_failing_with(13)));
    }

    #[test]
    fn interfaces_are_read_from_sysfs() {
        let root = temp_dir("sysfs");
        for (name, index, flags) in [
            ("ktb0", "7\n", Some("0x1001\n")),
            ("tun0", "3\n", Some("0x1801\n")),
            ("eth0", "2\n", None),
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("ifindex"), index).unwrap();
            if let Some(flags) = flags {
                std::fs::write(root.join(name).join("tun_flags"), flags).unwrap();
            }
        }
        let read = |name| interface_in(&root, name).unwrap();
        assert_eq!(
            read("ktb0"),
            Some(Interface {
                index: 7,
                tun: true,
                persistent: false
            })
        );
        assert_eq!(
            read("tun0"),
            Some(Interface {
                index: 3,
                tun: true,
                persistent: true
            })
        );
        assert_eq!(
            read("eth0"),
            Some(Interface {
                index: 2,
                tun: false,
                persistent: false
            })
        );
        assert_eq!(read("wg0"), None);
        for bad in ["", "..", "a/b", "ktb 0", "a-very-long-device-name"] {
            assert!(interface_in(&root, bad).is_err(), "{bad:?}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ktb_goes_first_and_the_rest_stays() {
        let original =
            "search corp.example\nnameserver 192.0.2.1\nnameserver 192.0.2.2\noptions timeout:1\n";
        let line = resolv_line("127.0.0.153".parse().unwrap(), "1a2b3c4d");
        let switched = with_line_first(original, &line);
        assert_eq!(
            nameservers(&switched),
            ["127.0.0.153:53", "192.0.2.1:53", "192.0.2.2:53"].map(|s| s.parse().unwrap())
        );
        assert!(switched.starts_with("search corp.example\n"));
        assert!(switched.ends_with("options timeout:1\n"));
        assert_eq!(nameservers(&with_line_first("", &line)).len(), 1);
        let no_newline = "search corp.example\nnameserver 192.0.2.1";
        assert_eq!(
            with_line_first(no_newline, &line),
            format!("search corp.example\n{line}\nnameserver 192.0.2.1")
        );
        assert_eq!(
            with_line_first("search corp.example", &line),
            format!("search corp.example\n{line}\n")
        );
    }

    #[test]
    fn restoring_resolv_conf_removes_only_ktbs_line() {
        let dir = temp_dir("resolv");
        let path = dir.join("resolv.conf");
        let server = "127.0.0.153".parse().unwrap();
        let line = resolv_line(server, "1a2b3c4d");
        // Another session's line (a crashed ktb's, say) is not this one's.
        let other = resolv_line(server, "00000000");
        let now = format!(
            "search corp.example\n{line}\nnameserver 192.0.2.1\n{other}\nnameserver 10.8.0.1 # added by the VPN meanwhile\n"
        );
        std::fs::write(&path, &now).unwrap();
        remove_line(&path, &line).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("search corp.example\nnameserver 192.0.2.1\n{other}\nnameserver 10.8.0.1 # added by the VPN meanwhile\n")
        );
        remove_line(&dir.join("gone"), &line).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolved_s_stub_file_is_told_from_its_uplink_file_and_from_plain_files() {
        let dir = temp_dir("resolved-kind");
        let resolve = dir.join("run/systemd/resolve");
        std::fs::create_dir_all(&resolve).unwrap();
        let stub = resolve.join("stub-resolv.conf");
        std::fs::write(
            &stub,
            "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n",
        )
        .unwrap();
        let uplink = resolve.join("resolv.conf");
        std::fs::write(&uplink, "nameserver 192.0.2.1\n").unwrap();
        let empty = resolve.join("empty.conf");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        let link = dir.join("resolv.conf");
        for (target, kind) in [
            (&stub, ResolvConf::ResolvedStub(stub.clone())),
            (&uplink, ResolvConf::ResolvedUplink(uplink.clone())),
            (&empty, ResolvConf::ResolvedUplink(empty.clone())),
        ] {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
            assert_eq!(resolv_conf_kind(&link), kind);
        }
        // The stub's address in a plain file: edited as any file is.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, "nameserver 127.0.0.53\n").unwrap();
        assert_eq!(resolv_conf_kind(&link), ResolvConf::File);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_block_is_removed_exactly() {
        let text = "127.0.0.1 localhost\n# BEGIN ktb\n10.96.0.5 web\n# END ktb\n::1 localhost\n";
        assert_eq!(
            without_block(text, "# BEGIN ktb", "# END ktb"),
            "127.0.0.1 localhost\n::1 localhost\n"
        );
        let untouched = "no markers\nhere";
        assert_eq!(
            without_block(untouched, "# BEGIN ktb", "# END ktb"),
            untouched
        );
    }

    #[test]
    fn host_entries_refuse_what_would_break_the_file() {
        let ip = "10.96.0.5".parse().unwrap();
        let entry = HostEntry::new(ip, ["web", "web.shop.svc.cluster.local"]).unwrap();
        assert_eq!(
            entry.to_string(),
            "10.96.0.5 web web.shop.svc.cluster.local"
        );
        for bad in ["web\n10.0.0.1 bank.example", "web # x", "web#x", "", "-web"] {
            assert!(HostEntry::new(ip, [bad]).is_err(), "{bad:?}");
        }
        assert!(HostEntry::new(ip, Vec::<String>::new()).is_err());
    }

    #[test]
    fn files_are_replaced_atomically_keeping_mode_and_links() {
        let dir = temp_dir("atomic");
        let real = dir.join("real.conf");
        std::fs::write(&real, "old\n").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.join("link.conf");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let inode = std::fs::metadata(&real).unwrap().ino();

        let written = write_file_with(&link, "new\n", false, |a, b| std::fs::rename(a, b)).unwrap();
        assert_eq!(written, Written::Replaced);
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new\n");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        let meta = std::fs::metadata(&real).unwrap();
        assert_ne!(meta.ino(), inode, "a new file took the old one's place");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary file left"
        );

        write_file(&dir.join("fresh.json"), "{}").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("fresh.json")).unwrap(),
            "{}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_renamed_over_is_written_in_place() {
        let dir = temp_dir("in-place");
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.1\nnameserver 192.0.2.2\n").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        for (error, shorter) in [
            (io::ErrorKind::ResourceBusy, "nameserver 10.0.0.1\n"),
            (io::ErrorKind::CrossesDevices, "x\n"),
        ] {
            // What rename(2) says when the file is a bind mount (EBUSY) or
            // on another file system than its directory (EXDEV).
            let written = write_file_with(&path, shorter, false, |_, _| Err(error.into())).unwrap();
            assert_eq!(written, Written::InPlace);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), shorter);
            assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        }
        // Under SELinux the file keeps its inode, and so its label.
        let written =
            write_file_with(&path, "z\n", true, |_, _| unreachable!("not replaced")).unwrap();
        assert_eq!(written, Written::InPlace);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        // Any other failure is reported, the file left as it was.
        let failed = write_file_with(&path, "y\n", false, |_, _| {
            Err(io::ErrorKind::StorageFull.into())
        });
        assert!(format!("{:#}", failed.unwrap_err()).contains("cannot write"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
