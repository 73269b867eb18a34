//! Setting up the two forwarding paths under test, as real processes:
//! OpenSSH's `sshd` + `ssh -R`, and `ktb-agent` + `ktb attach` from the
//! release build. Every process is started here and killed by its own
//! handle when the path is dropped.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::wait_until_listening;

/// A child process killed (by its PID, through its handle) on drop.
pub(super) struct Process {
    child: Child,
}

impl Process {
    pub(super) fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Process> {
        let log = fs::File::create(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(Process { child })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What Ctrl-C in its terminal does: SIGINT, without waiting.
    pub(super) fn interrupt(&self) -> anyhow::Result<()> {
        let delivered = crate::cluster::signal(self.pid(), "INT")?;
        anyhow::ensure!(delivered, "process {} exited before Ctrl-C", self.pid());
        Ok(())
    }

    /// Waits for the process to exit on its own.
    pub(super) fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("process {} did not exit within {timeout:?}", self.pid())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program`, run in network namespace `netns` (`ip netns exec`) when
/// there is one, else in this process's own.
pub(super) fn in_netns(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

pub fn build_release(workspace: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "ktb",
            "-p",
            "ktb-agent",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "building ktb and ktb-agent failed");
    Ok(())
}

/// `kubectl port-forward` from a free loopback port to `port` of `pod`,
/// logging to `log`; returns once it listens, with where it listens.
pub(super) async fn port_forward(
    cluster: &crate::cluster::Admin,
    namespace: &str,
    pod: &str,
    port: u16,
    log: &Path,
) -> anyhow::Result<(Process, SocketAddr)> {
    let local = free_port()?;
    let process = Process::spawn(
        &mut cluster.command(&[
            "-n",
            namespace,
            "port-forward",
            &format!("pod/{pod}"),
            &format!("{local}:{port}"),
        ]),
        log,
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], local));
    wait_until_listening(addr, &format!("kubectl port-forward to {pod}")).await?;
    Ok((process, addr))
}

/// A loopback port that was free a moment ago.
pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    anyhow::ensure!(
        status.success(),
        "{:?} failed: {status}",
        command.get_program()
    );
    Ok(())
}

/// `ssh -R`: callers connect to sshd's forwarded port; the ssh client
/// carries each connection back to the local server.
pub struct SshPath {
    pub entry: SocketAddr,
    _client: Process,
    _server: Process,
}

pub(super) const SSHD: &str = "/usr/sbin/sshd";

impl SshPath {
    pub async fn start(scratch: &Path, local: SocketAddr) -> anyhow::Result<SshPath> {
        ensure_sshd()?;
        let keys = SshKeys::generate(scratch)?;
        let (host_key, client_key, authorized) = (&keys.host, &keys.client, &keys.authorized);
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd")?;
        let sshd_port = free_port()?;
        let config = scratch.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nLogLevel ERROR\n",
                host_key.display(),
                scratch.join("sshd.pid").display(),
                authorized.display()
            ),
        )?;
        let server = Process::spawn(
            Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config),
            &scratch.join("sshd.log"),
        )?;
        wait_until_listening(([127, 0, 0, 1], sshd_port).into(), "sshd").await?;

        let forwarded = free_port()?;
        let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?
            .trim()
            .to_owned();
        let client = Process::spawn(
            &mut ssh_remote_forward(
                client_key,
                sshd_port,
                &format!("127.0.0.1:{forwarded}:{local}"),
                &user,
            ),
            &scratch.join("ssh.log"),
        )?;
        let entry = ([127, 0, 0, 1], forwarded).into();
        wait_until_listening(entry, "ssh -R").await?;
        Ok(SshPath {
            entry,
            _client: client,
            _server: server,
        })
    }
}

/// Throwaway ed25519 keys under `scratch`: the server's host key, the
/// client's key, and the file authorizing the client.
pub(super) struct SshKeys {
    pub(super) host: PathBuf,
    pub(super) client: PathBuf,
    pub(super) authorized: PathBuf,
}

impl SshKeys {
    pub(super) fn generate(scratch: &Path) -> anyhow::Result<SshKeys> {
        let keys = SshKeys {
            host: scratch.join("host_key"),
            client: scratch.join("client_key"),
            authorized: scratch.join("authorized_keys"),
        };
        for key in [&keys.host, &keys.client] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(key))?;
        }
        fs::copy(keys.client.with_extension("pub"), &keys.authorized)?;
        Ok(keys)
    }
}

/// `ssh -N -R FORWARD` to `user` at 127.0.0.1:`port` with `key`, never
/// asking anything: kt-connect's transport, as it runs it.
pub(super) fn ssh_remote_forward(key: &Path, port: u16, forward: &str, user: &str) -> Command {
    let mut ssh = Command::new("ssh");
    ssh.args(["-N", "-T", "-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"])
        .arg("-i")
        .arg(key)
        .arg("-p")
        .arg(port.to_string())
        .arg("-R")
        .arg(forward)
        .arg(format!("{user}@127.0.0.1"));
    ssh
}

/// The benchmark compares against Debian's OpenSSH server; install it when
/// missing (the machines run as root), and say so.
pub(super) fn ensure_sshd() -> anyhow::Result<()> {
    if Path::new(SSHD).exists() {
        return Ok(());
    }
    eprintln!("installing Debian's openssh-server for the ssh -R baseline");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "openssh-server",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("sshd is needed for the ssh -R baseline: apt-get install openssh-server")
}

/// The ktb tunnel: callers connect to the agent's exposed port.
pub struct KtbPath {
    pub entry: SocketAddr,
    cli: Process,
    agent: Process,
}

impl KtbPath {
    pub async fn start(
        workspace: &Path,
        scratch: &Path,
        local: SocketAddr,
    ) -> anyhow::Result<KtbPath> {
        let bin = |name: &str| -> PathBuf { workspace.join("target/release").join(name) };
        let (tunnel_port, exposed_port) = (free_port()?, free_port()?);
        // `ktb attach` makes the session's key and prints its public half,
        // which the agent is started with; the CLI retries until the agent
        // listens.
        let cli_log = scratch.join("ktb.log");
        let cli = Process::spawn(
            Command::new(bin("ktb"))
                .args(["attach", "--agent", &format!("127.0.0.1:{tunnel_port}")])
                .arg("--expose")
                .arg(format!("{}:{exposed_port}", local.port())),
            &cli_log,
        )?;
        let client_key = wait_for_client_key(&cli_log).await?;
        let agent = Process::spawn(
            Command::new(bin("ktb-agent"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{tunnel_port}"))
                .args(["--client-key", &client_key])
                .args([
                    "--expose-address",
                    "127.0.0.1",
                    "--expose-port",
                    &exposed_port.to_string(),
                ]),
            &scratch.join("agent.log"),
        )?;
        wait_until_listening(([127, 0, 0, 1], tunnel_port).into(), "ktb-agent").await?;
        for _ in 0..100 {
            if fs::read_to_string(&cli_log)?.contains("tunnel up") {
                return Ok(KtbPath {
                    entry: ([127, 0, 0, 1], exposed_port).into(),
                    cli,
                    agent,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "ktb attach did not report the tunnel up: {}",
            fs::read_to_string(&cli_log)?
        )
    }

    pub fn agent_peak_rss_kib(&self) -> anyhow::Result<u64> {
        peak_rss_kib(self.agent.pid())
    }

    pub fn cli_peak_rss_kib(&self) -> anyhow::Result<u64> {
        peak_rss_kib(self.cli.pid())
    }
}

/// The public key `ktb attach` printed in `log`: the 64 hex digits after
/// `--client-key`.
async fn wait_for_client_key(log: &Path) -> anyhow::Result<String> {
    const MARK: &str = "--client-key ";
    for _ in 0..100 {
        let text = fs::read_to_string(log)?;
        if let Some(key) = text
            .find(MARK)
            .and_then(|at| text.get(at + MARK.len()..at + MARK.len() + 64))
        {
            return Ok(key.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "ktb attach did not print its public key: {}",
        fs::read_to_string(log)?
    )
}

/// `VmHWM` of a process: the most resident memory it ever had.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}
