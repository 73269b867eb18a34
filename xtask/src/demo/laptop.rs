//! dev-a at laptop-a: the processes the demo runs on the simulated laptop.
//!
//! Everything runs inside the laptop's network namespace (`ip netns exec`,
//! which execs in place, so a child's PID is the program's): the local
//! backend, the workspace's `http-echo` on the laptop's loopback, and ktb
//! as developer dev-a with dev-a's kubeconfig and namespace-scoped rights.
//! ktb's own lines are shown indented under the step that started it; a
//! ktb session counts as started at its `✔` ready line. Ending a session
//! is what a developer does, SIGINT, and waits for ktb to restore; a
//! session still running when the demo fails is ended the same way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::app::LAPTOP_NAME;
use super::Interrupted;
use crate::cluster::{self, LAPTOPS, SHARED_NAMESPACE};

/// The local backend's port on the laptop's loopback.
const BACKEND_PORT: u16 = 18080;
/// From starting ktb to its ready line: an agent pod is scheduled, started
/// and reached through the apiserver.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// From SIGINT to ktb's exit, the Service restored and proven.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a wait looks at the Ctrl-C flag.
const POLL: Duration = Duration::from_millis(200);

pub struct Laptop {
    netns: &'static str,
    kubeconfig: PathBuf,
    ktb: PathBuf,
    workloads: PathBuf,
    interrupted: Interrupted,
}

impl Laptop {
    pub fn new(workspace: &Path, interrupted: Interrupted) -> anyhow::Result<Laptop> {
        let laptop = &LAPTOPS[0];
        let debug = workspace.join("target/debug");
        Ok(Laptop {
            netns: laptop.netns,
            kubeconfig: cluster::kubeconfig(laptop.user)?,
            ktb: debug.join("ktb"),
            workloads: debug,
            interrupted,
        })
    }

    /// `--expose` for the local backend, to the Service's port 80.
    pub fn backend_expose(&self) -> String {
        format!("{BACKEND_PORT}:80")
    }

    /// The workspace's http-echo on the laptop's loopback, answering as
    /// [`LAPTOP_NAME`]; stopped when dropped.
    pub fn serve_backend(&self) -> anyhow::Result<Process> {
        println!("   $ PORT={BACKEND_PORT} http-echo   (on laptop-a)");
        let mut command = self.command(&self.workloads.join("http-echo"));
        command
            .env("PORT", BACKEND_PORT.to_string())
            .env("POD_NAME", LAPTOP_NAME);
        let server = Process::spawn(command, "http-echo")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let address = format!("127.0.0.1:{BACKEND_PORT}");
        loop {
            let mut probe = self.command(&self.workloads.join("probe"));
            probe.args(["tcp", &address]);
            if probe.output()?.status.success() {
                return Ok(server);
            }
            anyhow::ensure!(
                Instant::now() < deadline && !self.interrupted.load(Ordering::SeqCst),
                "the local backend does not listen on {address}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `ktb ARGS` as dev-a, once it says it is ready.
    pub fn ktb(&self, args: &[&str]) -> anyhow::Result<Session> {
        println!("   $ ktb {}", args.join(" "));
        let mut command = self.command(&self.ktb);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .args(["-n", SHARED_NAMESPACE])
            // The cluster pulls nothing: the agent image was imported.
            .args(["--agent-image", cluster::AGENT_IMAGE])
            .args(["--image-pull-policy", "Never"])
            .stderr(Stdio::piped());
        let mut process = Process::spawn(command, "ktb")?;
        let stderr = process.child.stderr.take().expect("piped stderr");
        let (lines, seen) = mpsc::sync_channel(256);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                println!("     │ {line}");
                // The demo stops listening once ktb is ready or gone.
                let _ = lines.try_send(line);
            }
        });
        let session = Session {
            process,
            lines: seen,
            interrupted: self.interrupted.clone(),
        };
        session.wait_ready()?;
        Ok(session)
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.netns])
            .arg(program)
            .stdin(Stdio::null());
        command
    }
}

/// A child process of the demo, killed by PID when dropped if it still runs.
pub struct Process {
    child: Child,
    name: &'static str,
}

impl Process {
    fn spawn(mut command: Command, name: &'static str) -> anyhow::Result<Process> {
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name} on laptop-a: {e}"))?;
        Ok(Process { child, name })
    }

    /// Waits up to `timeout` for the exit; None if it still runs.
    fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGINT; whether it arrived shows in how the process exits.
    fn interrupt(&self) -> anyhow::Result<()> {
        cluster::signal(self.child.id(), "INT")?;
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            eprintln!("   (stopping {})", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running ktb session.
pub struct Session {
    process: Process,
    /// ktb's stderr, line by line.
    lines: Receiver<String>,
    interrupted: Interrupted,
}

impl Session {
    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            anyhow::ensure!(
                !self.interrupted.load(Ordering::SeqCst),
                "interrupted while ktb was starting"
            );
            match self.lines.recv_timeout(POLL) {
                Ok(line) if line.contains('✔') => return Ok(()),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("ktb ended before it was ready (its lines are above)")
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "ktb was not ready within {READY_TIMEOUT:?}"
            );
        }
    }

    /// What Ctrl-C in ktb's terminal does: SIGINT, then ktb restores what
    /// it changed and exits 0.
    pub fn interrupt_and_wait(mut self) -> anyhow::Result<()> {
        self.process.interrupt()?;
        match self.process.wait_exit(EXIT_TIMEOUT)? {
            Some(status) if status.success() => Ok(()),
            Some(status) => anyhow::bail!("ktb exited with {status} after Ctrl-C"),
            None => anyhow::bail!("ktb did not exit within {EXIT_TIMEOUT:?} of Ctrl-C"),
        }
    }
}

impl Drop for Session {
    /// A session left running by a failed step ends as the developer would
    /// end it; only one that ignores SIGINT is killed.
    fn drop(&mut self) {
        if let Ok(None) = self.process.child.try_wait() {
            let _ = self.process.interrupt();
            let _ = self.process.wait_exit(EXIT_TIMEOUT);
        }
    }
}
