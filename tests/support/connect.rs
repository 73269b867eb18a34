//! What the connect-level end-to-end tests share: `ktb connect` run as a
//! developer on a laptop with a state directory of the test's own, and the
//! laptop's state (resolv.conf, hosts, routes, links) to compare before and
//! after, byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::cluster::{
    command_as, netns_command, run_bounded, workspace_bin, As, Spawned, AGENT_IMAGE,
};

/// The line ktb writes once connected.
pub const READY: &str = "Ctrl-C disconnects";
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ktb connect` may change on the laptop, to compare before/after.
#[derive(Debug, PartialEq, Eq)]
pub struct LaptopState {
    pub resolv_conf: Vec<u8>,
    pub hosts: Vec<u8>,
    pub routes: String,
    pub links: String,
}

pub fn laptop_file(who: As, name: &str) -> PathBuf {
    let path = Path::new("/etc/netns").join(laptop(who)).join(name);
    assert!(
        path.exists(),
        "{} missing: the laptop must have its own copy, or ktb would change this machine's (cargo xtask cluster up creates it)",
        path.display()
    );
    path
}

pub fn laptop_state(who: As) -> LaptopState {
    let ip = |args: &[&str]| {
        let out = in_laptop_cmd(who, "ip", args);
        assert!(out.status.success(), "ip {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    LaptopState {
        resolv_conf: std::fs::read(laptop_file(who, "resolv.conf")).expect("resolv.conf"),
        hosts: std::fs::read(laptop_file(who, "hosts")).expect("hosts"),
        routes: ip(&["route", "show", "table", "all"]),
        links: ip(&["-o", "link", "show"])
            .lines()
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The developer's laptop (network namespace).
pub fn laptop(who: As) -> &'static str {
    who.netns().expect("a developer has a laptop")
}

/// A program run on the developer's laptop (bounded).
pub fn in_laptop_cmd(who: As, program: &str, args: &[&str]) -> Output {
    let mut cmd = netns_command(laptop(who), program);
    cmd.args(args);
    run_bounded(cmd, COMMAND_TIMEOUT)
}

pub fn ktb_cmd(who: As, args: &[&str], state_dir: &Path) -> Command {
    let mut cmd = command_as(who, workspace_bin("ktb", "ktb"));
    cmd.env("KUBECONFIG", who.kubeconfig())
        .env("KTB_STATE_DIR", state_dir)
        .args(args);
    cmd
}

pub fn connect_args<'a>(namespace: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "connect",
        "-n",
        namespace,
        "--agent-image",
        AGENT_IMAGE,
        "--image-pull-policy",
        "Never",
        "--grace",
        "5s",
    ];
    args.extend_from_slice(extra);
    args
}

/// A state directory of the test's own (the journal lives there).
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn new(test: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("ktb-state-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn start_connect(who: As, namespace: &str, extra: &[&str], state: &StateDir) -> Spawned {
    let args = connect_args(namespace, extra);
    eprintln!("+ [{}] ktb {}", who.user(), args.join(" "));
    let mut ktb = Spawned::start("ktb connect", ktb_cmd(who, &args, &state.0));
    ktb.wait_for_stderr(READY, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("ktb connect never became ready: {e}"));
    ktb
}

pub fn stop(ktb: &mut Spawned, signal: i32) {
    ktb.signal(signal);
    let status = ktb.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "ktb still running {EXIT_TIMEOUT:?} after signal {signal}:\n{}",
            ktb.stderr()
        )
    });
    if signal == libc::SIGINT {
        assert_eq!(
            status.code(),
            Some(0),
            "ktb connect exited {status}:\n{}",
            ktb.stderr()
        );
    }
}
