//! Starting the cluster's daemons detached from `cargo xtask`, and stopping
//! exactly the processes this tooling started, by PID.
//!
//! Each daemon runs in its own session (via `setsid`) so that neither the
//! end of `cargo xtask cluster up` nor a Ctrl-C in its terminal stops it;
//! its PID and start time go to `<state>/pids/NAME` so that `down` (a
//! different process, perhaps in a later session) signals that process and
//! no other, even if the PID was reused meanwhile.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon this tooling started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    pub name: String,
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: tells a reused PID from ours.
    pub start_time: u64,
}

fn pid_dir(state: &Path) -> PathBuf {
    state.join("pids")
}

/// Start `program args` as daemon `name`, output appended to `<logs>/NAME.log`.
pub fn spawn(
    state: &Path,
    logs: &Path,
    name: &str,
    program: &Path,
    args: &[String],
) -> Result<Daemon> {
    std::fs::create_dir_all(logs)?;
    std::fs::create_dir_all(pid_dir(state))?;
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // `setsid` without --fork execs in place (we are not a group leader), so
    // the child's PID is the daemon's PID.
    let child = Command::new("setsid")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    let pid = child.id();
    // The exec of setsid into the program is quick; the start time is the
    // same before and after it.
    let start_time = start_time(pid)
        .with_context(|| format!("{name} exited at once; see {}", log_path.display()))?;
    let daemon = Daemon {
        name: name.to_owned(),
        pid,
        start_time,
    };
    std::fs::write(pid_dir(state).join(name), format!("{pid} {start_time}\n"))?;
    // The child is reaped by init once xtask exits; dropping the handle
    // neither waits for nor kills it.
    drop(child);
    Ok(daemon)
}

/// The daemons recorded in the state dir, in start order.
pub fn recorded(state: &Path) -> Result<Vec<Daemon>> {
    let dir = pid_dir(state);
    let mut daemons = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path())?;
        let mut fields = text.split_whitespace();
        let (Some(pid), Some(start)) = (fields.next(), fields.next()) else {
            bail!("malformed PID record {}", entry.path().display());
        };
        let modified = entry.metadata()?.modified()?;
        daemons.push((
            modified,
            Daemon {
                name,
                pid: pid.parse()?,
                start_time: start.parse()?,
            },
        ));
    }
    daemons.sort_by_key(|(modified, _)| *modified);
    Ok(daemons.into_iter().map(|(_, d)| d).collect())
}

/// Whether the recorded process is still the one we started.
pub fn alive(daemon: &Daemon) -> bool {
    start_time(daemon.pid).ok() == Some(daemon.start_time) && !is_zombie(daemon.pid)
}

/// Stop a daemon: SIGTERM, then SIGKILL after `grace`; forget its record.
pub fn stop(state: &Path, daemon: &Daemon, grace: Duration) -> Result<()> {
    if alive(daemon) {
        // A daemon that exits before the signal reaches it is stopped too.
        signal(daemon.pid, "TERM")?;
        if !wait_gone(daemon, grace) {
            eprintln!(
                "  {} (pid {}) ignored SIGTERM for {grace:?}; SIGKILL",
                daemon.name, daemon.pid
            );
            signal(daemon.pid, "KILL")?;
            if !wait_gone(daemon, Duration::from_secs(10)) {
                bail!("{} (pid {}) survived SIGKILL", daemon.name, daemon.pid);
            }
        }
    }
    let record = pid_dir(state).join(&daemon.name);
    if record.exists() {
        std::fs::remove_file(record)?;
    }
    Ok(())
}

/// SIGKILL a process that is not a recorded daemon but that one of ours
/// started (a container, a containerd shim), identified by the caller.
pub fn kill_started_by_us(pid: u32) -> Result<()> {
    if let Ok(start) = start_time(pid) {
        signal(pid, "KILL")?;
        let d = Daemon {
            name: String::new(),
            pid,
            start_time: start,
        };
        if !wait_gone(&d, Duration::from_secs(10)) {
            bail!("pid {pid} survived SIGKILL");
        }
    }
    Ok(())
}

fn wait_gone(daemon: &Daemon, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(daemon) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    !alive(daemon)
}

/// Sends signal `name` ("INT", "TERM", "KILL") to process `pid` with
/// kill(1) (xtask binds no libc). Ok(false) when no such process is left
/// to receive it, which only the caller can judge: a daemon that exited on
/// its own is stopped, a session that exited before Ctrl-C is a failure.
pub fn signal(pid: u32, name: &str) -> Result<bool> {
    kill(name, &pid.to_string())
}

/// [`signal`] to every process of group `pgid`: what the group leader
/// started (a fuzzer's workers) ends with it.
pub fn signal_group(pgid: u32, name: &str) -> Result<bool> {
    kill(name, &format!("-{pgid}"))
}

fn kill(name: &str, target: &str) -> Result<bool> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), "--", target])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    Ok(status.success())
}

fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is parenthesised and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field 22 of /proc/PID/stat (index 19 after the command name).
pub fn start_time(pid: u32) -> Result<u64> {
    let fields = stat_fields(pid)?;
    Ok(fields.get(19).context("short stat")?.parse()?)
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid)
        .map(|f| f.first().map(String::as_str) == Some("Z"))
        .unwrap_or(false)
}

/// Every PID whose command line contains `needle` (e.g. the containerd
/// socket path that our shims are started with).
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.split('\0').any(|a| a.contains(needle)) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Resident and proportional set size of a process in KiB (0 if it is
/// gone). The Kubernetes daemons share one multi-call binary, so summing
/// RSS counts its pages once per process; PSS divides shared pages.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let field = |file: &str, name: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    };
    (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
}

/// Run a command to completion, failing with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    stdout_of(program, args, out)
}

/// Whether `program` is on PATH, as the shell would find it.
pub fn on_path(program: &str) -> bool {
    run("sh", &["-c", &format!("command -v {program}")]).is_ok()
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    stdout_of(program, args, out)
}

/// The output of a finished command, or an error quoting all it printed.
fn stdout_of(program: &str, args: &[&str], out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_signal_says_whether_its_process_was_there() {
        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id();
        assert!(signal(pid, "TERM").unwrap());
        assert_eq!(sleeper.wait().unwrap().signal(), Some(15));
        // Reaped, the PID names nobody. Signal 0 only asks, so a process
        // that reused the PID meanwhile would not be touched.
        assert!(!signal(pid, "0").unwrap());
    }
}
