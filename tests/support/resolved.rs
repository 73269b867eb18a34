//! A real systemd-resolved for tests, without installing it: the Debian
//! package is downloaded (`apt-get download`, the version of the
//! `libsystemd-shared` this machine has) and unpacked with `dpkg -x` under
//! the repository's `target/systemd-resolved/`. Installing it would replace
//! this machine's `/etc/resolv.conf`; this never touches it.
//!
//! A [`Sandbox`] runs resolved in a network namespace (a laptop's, or one
//! of the test's own) and a private mount namespace made for it, where
//! - `/etc` is an overlay over this machine's (writes land in a tmpfs):
//!   `resolv.conf` links to resolved's stub file, `passwd` and `group`
//!   know the `systemd-resolve` user resolved drops to, `hosts` is the
//!   laptop's, and `systemd/resolved.conf` names the global DNS server;
//! - `/run/systemd` is a tmpfs (resolved's runtime files), `/sys` is the
//!   namespace's own (interfaces as the netns has them, as `ip netns exec`
//!   does);
//! - a private `dbus-daemon` is the system bus (`DBUS_SYSTEM_BUS_ADDRESS`),
//!   with resolved's own bus policy and root allowed everything.
//!
//! The namespace is held by a `sleep` this module starts; commands enter
//! it with `nsenter`. Every process here is stopped by its own PID, every
//! wait is bounded, and nothing outside the namespaces changes.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::{run_bounded, Spawned};

/// How long one command in the sandbox may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The user resolved drops to when started as root, as the package's
/// sysusers file names it; its ids only need to be free on this machine.
const USER: &str = "systemd-resolve";
const USER_ID: u32 = 991;

/// The names of `tests/resolved_e2e.rs` and its probe (`tests/bin/`): the
/// laptop's own server answers [`OUTSIDE`], ktb's resolver [`SERVICE`].
pub const OUTSIDE: &str = "outside.test";
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
pub const SERVICE: &str = "web.team-a.svc.cluster.local";
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);

/// The repository's `target/systemd-resolved/`, where the package is unpacked.
fn unpack_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/systemd-resolved")
        .components()
        .collect()
}

fn run_ok(cmd: Command, what: &str) -> String {
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The unpacked package's root, downloading and unpacking it the first
/// time: the `systemd-resolved` of the same version as this machine's
/// `libsystemd-shared`, which its binaries link against.
pub fn unpacked() -> PathBuf {
    let dir = unpack_dir();
    let root = dir.join("root");
    if root.join("lib/systemd/systemd-resolved").is_file() {
        return root;
    }
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f=${Version}", "libsystemd-shared"]);
    let version = run_ok(
        query,
        "dpkg-query libsystemd-shared (is this Debian or Ubuntu?)",
    );
    std::fs::create_dir_all(&dir).expect("create target/systemd-resolved");
    let mut download = Command::new("apt-get");
    download
        .current_dir(&dir)
        .args(["download", &format!("systemd-resolved={}", version.trim())]);
    run_ok(download, "apt-get download systemd-resolved");
    let deb = std::fs::read_dir(&dir)
        .expect("read target/systemd-resolved")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the downloaded .deb");
    let mut unpack = Command::new("dpkg");
    unpack.arg("-x").arg(&deb).arg(&root);
    run_ok(unpack, "dpkg -x systemd-resolved");
    assert!(
        root.join("lib/systemd/systemd-resolved").is_file(),
        "the package has no lib/systemd/systemd-resolved"
    );
    root
}

/// What the sandbox's `/etc` gets besides the stub link.
#[derive(Default)]
pub struct Setup {
    /// A file to copy over `/etc/hosts` (the laptop's own).
    pub hosts: Option<PathBuf>,
    /// resolved's global DNS server (`DNS=` in resolved.conf): the
    /// laptop's own servers, where every name outside ktb's domains goes.
    pub global_dns: Option<Ipv4Addr>,
}

/// resolved and its bus in a network namespace and a private mount namespace.
pub struct Sandbox {
    /// The test's files: bus socket, config, logs, process ids. On this
    /// machine's disk, so tests outside the namespace read them too.
    pub dir: PathBuf,
    /// The unpacked package's root (`resolvectl` is in `usr/bin`).
    pub root: PathBuf,
    holder: Spawned,
    /// dbus-daemon and systemd-resolved, started by the setup script.
    daemons: Vec<(i32, &'static str)>,
}

const SETUP: &str = r#"
set -eu
# Everything below stays in this mount namespace.
mount --make-rprivate /
umount -l /sys
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs "$SCRATCH"
mkdir "$SCRATCH/upper" "$SCRATCH/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$SCRATCH/upper,workdir=$SCRATCH/work" /etc
if getent passwd "$USER_ID" >/dev/null || getent passwd "$RESOLVE_USER" >/dev/null; then
  echo "uid $USER_ID or $RESOLVE_USER exists here; pick another" >&2; exit 1
fi
echo "$RESOLVE_USER:x:$USER_ID:$USER_ID:systemd Resolver:/:/usr/sbin/nologin" >> /etc/passwd
echo "$RESOLVE_USER:x:$USER_ID:" >> /etc/group
if [ -n "$HOSTS_FILE" ]; then cat "$HOSTS_FILE" > /etc/hosts; fi
mkdir -p /etc/systemd
printf '[Resolve]\nDNS=%s\n' "$GLOBAL_DNS" > /etc/systemd/resolved.conf
rm -f /etc/resolv.conf
ln -s ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
mount -t tmpfs -o mode=755 tmpfs /run/systemd
dbus-daemon --config-file="$DIR/bus.conf" --nofork --nopidfile 2>"$DIR/dbus.log" &
echo $! > "$DIR/dbus.pid"
for i in $(seq 100); do [ -S "$DIR/bus.sock" ] && break; sleep 0.05; done
[ -S "$DIR/bus.sock" ] || { echo "dbus-daemon did not listen" >&2; exit 1; }
DBUS_SYSTEM_BUS_ADDRESS="unix:path=$DIR/bus.sock" SYSTEMD_LOG_LEVEL=debug NOTIFY_SOCKET= \
  "$ROOT/lib/systemd/systemd-resolved" >"$DIR/resolved.log" 2>&1 &
echo $! > "$DIR/resolved.pid"
echo ready
exec sleep 900
"#;

impl Sandbox {
    /// Starts resolved in `netns` (a name under `/run/netns`); ready, its
    /// name owned on the bus, when this returns.
    pub fn start(netns: &str, setup: Setup) -> Sandbox {
        let root = unpacked();
        let dir = unpack_dir().join(format!("sandbox-{netns}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("scratch")).expect("sandbox dir");
        std::fs::write(dir.join("bus.conf"), bus_config(&dir, &root)).expect("bus.conf");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
            ])
            .arg(SETUP)
            .env("DIR", &dir)
            .env("ROOT", &root)
            .env("SCRATCH", dir.join("scratch"))
            .env("RESOLVE_USER", USER)
            .env("USER_ID", USER_ID.to_string())
            .env("HOSTS_FILE", setup.hosts.unwrap_or_default())
            .env(
                "GLOBAL_DNS",
                setup
                    .global_dns
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
            );
        let mut holder = Spawned::start(&format!("resolved sandbox {netns}"), cmd);
        let ready = holder.wait_for_stdout("ready", Duration::from_secs(20));
        let mut sandbox = Sandbox {
            dir,
            root,
            holder,
            daemons: Vec::new(),
        };
        for (file, binary) in [
            ("dbus.pid", "dbus-daemon"),
            ("resolved.pid", "systemd-resolved"),
        ] {
            if let Ok(pid) = std::fs::read_to_string(sandbox.dir.join(file)) {
                if let Ok(pid) = pid.trim().parse() {
                    sandbox.daemons.push((pid, binary));
                }
            }
        }
        ready.unwrap_or_else(|e| panic!("the resolved sandbox did not start: {e}"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = sandbox.resolvectl(&["status"]);
            if status.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "systemd-resolved is not on the private bus after 15 s: {}\nresolved's log:\n{}",
                String::from_utf8_lossy(&status.stderr),
                sandbox.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sandbox
    }

    /// The private system bus, as `DBUS_SYSTEM_BUS_ADDRESS` names it.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.join("bus.sock").display())
    }

    /// `program` inside the sandbox's namespaces, on its bus; `nsenter`
    /// execs it, so the child's PID is the program's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder.pid()))
            .args(["--mount", "--net", "--"])
            .arg(program)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus_address());
        cmd
    }

    /// A command in the sandbox, bounded.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    /// The unpacked `resolvectl` in the sandbox.
    pub fn resolvectl(&self, args: &[&str]) -> Output {
        let resolvectl = self.root.join("usr/bin/resolvectl");
        let mut cmd = self.command(&resolvectl);
        cmd.args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    /// `resolvectl ARGS`' stdout; the command must succeed.
    pub fn resolvectl_ok(&self, args: &[&str]) -> String {
        let out = self.resolvectl(args);
        assert!(
            out.status.success(),
            "resolvectl {args:?}: {}\nresolved's log (end):\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `getent hosts NAME` in the sandbox: the address, or why not.
    pub fn getent(&self, name: &str) -> Result<String, String> {
        let out = self.run("getent", &["hosts", name]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!("getent hosts {name}: exit {}", out.status))
        }
    }

    /// resolved's debug log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("resolved.log")).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for &(pid, binary) in &self.daemons {
            // Only while the PID is still the process started here.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(binary) {
                // SAFETY: kill(2) on a PID just checked to be our daemon.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemons.iter().any(|&(pid, _)| running(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The holder (Spawned) is stopped by its own drop, after this;
        // the mount namespace goes with its last process.
        self.holder.signal(libc::SIGKILL);
        let _ = self.holder.wait_exit(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `pid` runs; a zombie (its parent, the holder, does not reap)
/// has stopped.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// The private bus: root may do anything, everyone else what the system
/// bus allows (Debian's defaults), and resolved's own policy file.
fn bus_config(dir: &Path, root: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
        socket = dir.join("bus.sock").display(),
        policy = root
            .join("usr/share/dbus-1/system.d/org.freedesktop.resolve1.conf")
            .display(),
    )
}

/// A network namespace of the test's own (`PREFIX-PID`), loopback up;
/// deleted when dropped.
pub struct OwnNetns(pub String);

impl OwnNetns {
    pub fn new(prefix: &str) -> OwnNetns {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = run_bounded(ip(&["netns", "del", &name]), COMMAND_TIMEOUT);
        run_ok(ip(&["netns", "add", &name]), "ip netns add");
        run_ok(
            ip(&["-n", &name, "link", "set", "lo", "up"]),
            "ip link set lo up",
        );
        OwnNetns(name)
    }
}

impl Drop for OwnNetns {
    fn drop(&mut self) {
        let _ = run_bounded(ip(&["netns", "del", &self.0]), COMMAND_TIMEOUT);
    }
}

fn ip(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// A DNS server standing for the laptop's own servers: answers `A`
/// queries for the names it is given, NXDOMAIN for every other name, and
/// keeps every name it was asked. Runs in a network namespace on a thread
/// of its own until dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    pub fn start(netns: &str, addr: SocketAddr, names: &[(&str, Ipv4Addr)]) -> FakeUpstream {
        FakeUpstream::start_in(Some(format!("/run/netns/{netns}")), addr, names)
    }

    /// [`FakeUpstream::start`] in this process's own network namespace.
    pub fn start_here(addr: SocketAddr, names: &[(&str, Ipv4Addr)]) -> FakeUpstream {
        FakeUpstream::start_in(None, addr, names)
    }

    fn start_in(
        netns: Option<String>,
        addr: SocketAddr,
        names: &[(&str, Ipv4Addr)],
    ) -> FakeUpstream {
        let names: Vec<(String, Ipv4Addr)> = names
            .iter()
            .map(|(n, ip)| (n.to_ascii_lowercase(), *ip))
            .collect();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let (asked, stop) = (asked.clone(), stop.clone());
            std::thread::spawn(move || {
                if let Some(path) = netns {
                    let file = std::fs::File::open(&path).expect("netns");
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on a valid namespace fd, for this thread only.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}");
                }
                let socket = UdpSocket::bind(addr);
                let socket = match socket {
                    Ok(s) => {
                        let _ = bound_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                socket
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((name, reply)) = fake_reply(&buf[..n], &names) {
                        asked.lock().unwrap().push(name);
                        let _ = socket.send_to(&reply, from);
                    }
                }
            })
        };
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the fake upstream thread")
            .unwrap_or_else(|e| panic!("the fake upstream cannot bind {addr}: {e}"));
        FakeUpstream {
            addr,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    /// Every name asked so far, lower case, no trailing dot.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The question's name and the reply to `query`: one A record when the
/// name is known and an A is asked, no records otherwise (NXDOMAIN for an
/// unknown name). `None` for what does not parse.
fn fake_reply(query: &[u8], names: &[(String, Ipv4Addr)]) -> Option<(String, Vec<u8>)> {
    if query.len() < 12 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
        at += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    let question_end = at + 5;
    let question = query.get(12..question_end)?;
    let name = labels.join(".");
    let known = names.iter().find(|(n, _)| *n == name).map(|(_, ip)| *ip);
    let mut reply = Vec::new();
    reply.extend_from_slice(&query[..2]);
    let rcode = if known.is_some() { 0 } else { 3 };
    reply.extend_from_slice(&[0x81, 0x80 | rcode]);
    reply.extend_from_slice(&[0, 1]);
    let answer = known.filter(|_| qtype == 1);
    reply.extend_from_slice(&[0, u8::from(answer.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let Some(ip) = answer {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some((name, reply))
}
